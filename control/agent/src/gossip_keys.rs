//! The gossip keys the manager handed this node (issue 11), kept in
//! `<data-dir>/node/gossip-keys.json` (mode 0600) so that a restarted agent speaks gossip
//! before its session with the manager is back.

use std::path::{Path, PathBuf};

use swarmnet_api::GossipKeySet;
use swarmnet_gossip::seal::Keyring;
use swarmnet_gossip::server::{Cmd, GossipHandle};
use tracing::{error, info, warn};

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join("node").join("gossip-keys.json")
}

pub fn keyring(set: &GossipKeySet) -> Result<Keyring, String> {
    let raw = set.keys.iter().map(|k| Ok((k.id, k.bytes()?))).collect::<Result<Vec<_>, String>>()?;
    Keyring::with_send(&raw, set.send)
}

/// The keys saved in a node's data dir.
pub fn load(data_dir: &Path) -> Result<GossipKeySet, String> {
    let p = path(data_dir);
    swarmnet_dataplane::state::read_json::<GossipKeySet>(&p).map_err(|e| format!("{}: {e}", p.display()))?.ok_or_else(|| format!("no gossip keys in {}", p.display()))
}

/// Hands the keys to the gossip loop.
pub fn install(gossip: &GossipHandle, keys: &GossipKeySet) -> Result<(), String> {
    let ring = keyring(keys)?;
    gossip.send(Cmd::Keys(Box::new(ring))).map_err(|e| format!("gossip: {e}"))
}

/// The keys an earlier run saved, handed to the gossip loop; false if there were none.
pub fn restore(gossip: &GossipHandle, data_dir: &Path) -> bool {
    let p = path(data_dir);
    match swarmnet_dataplane::state::read_json::<GossipKeySet>(&p) {
        Ok(Some(keys)) if !keys.keys.is_empty() => match install(gossip, &keys) {
            Ok(()) => {
                info!(keys = keys.keys.len(), "gossip keys restored from the last run");
                true
            }
            Err(e) => {
                error!(path = %p.display(), error = %e, "saved gossip keys are unusable: gossip waits for the manager's");
                false
            }
        },
        Ok(_) => false,
        Err(e) => {
            warn!(path = %p.display(), error = %e, "saved gossip keys cannot be read: gossip waits for the manager's");
            false
        }
    }
}

/// New keys from the manager: used at once, then saved. False if they could not be used.
pub async fn update(gossip: &GossipHandle, data_dir: &Path, keys: &GossipKeySet) -> bool {
    if let Err(e) = install(gossip, keys) {
        error!(error = %e, "the manager's gossip keys are unusable: this node cannot speak gossip");
        return false;
    }
    let p = path(data_dir);
    let keys = keys.clone();
    let saved = tokio::task::spawn_blocking(move || swarmnet_dataplane::state::write_json(&p, &keys, 0o600)).await;
    if !matches!(saved, Ok(Ok(()))) {
        warn!("the gossip keys could not be saved: a restart waits for the manager before gossip speaks");
    }
    true
}
