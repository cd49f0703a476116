//! The endpoint table: one entry per task endpoint per network, owned by the node that runs
//! the task. An entry's stamp is (owner generation, owner clock): a restarted owner has a
//! higher generation; within one, the owner's clock only grows. Deletes are tombstones,
//! reaped after a while; anti-entropy sends an owner's whole set, so a reaped tombstone
//! cannot bring a stale entry back.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use swarmnet_types::{Change, Endpoint};

pub use swarmnet_types::NodeId;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub owner: NodeId,
    pub gen: u64,
    pub version: u64,
    pub network: String,
    pub id: String,
    /// None: a tombstone.
    pub value: Option<Arc<Endpoint>>,
}

impl Item {
    fn stamp(&self) -> (u64, u64) {
        (self.gen, self.version)
    }
}

/// An owner's entries in one network as of its stamp (gen, version): what anti-entropy sends.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OwnerSet {
    pub network: String,
    pub owner: NodeId,
    pub gen: u64,
    pub version: u64,
    pub items: Vec<Item>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    /// Taken (the change it made, if any, is in the list returned beside it).
    Changed,
    /// Older than or equal to what we hold (a replay, or news we already had).
    Stale,
    /// A network this node has not joined.
    NotJoined,
    /// The owner is known dead at that generation.
    DeadOwner,
}

/// What anti-entropy compares per owner.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub stamp: (u64, u64),
    pub sum: u64,
}

/// A record's hash, to be summed into a checksum: FNV-1a over its id and stamp, then
/// MurmurHash3's finalizer. Without the finalizer, FNV's last steps only xor a stamp's low
/// byte in and multiply, so the difference a newer version makes depends on a few low bits:
/// two records each one version behind cancelled out in a sum often enough that 2,000
/// simulated nodes kept a node with two stale membership records forever (issue 23).
pub(crate) fn fnv(id: &[u8], gen: u64, version: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.iter().chain(&gen.to_le_bytes()).chain(&version.to_le_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// A network's name or an entry's id, as the table keys it.
type Name = Arc<str>;

/// One entry as the table holds it: the names are in the keys (the network's shared by the
/// process, the owner's too), the endpoint is the one the sinks are handed (issue 23: the
/// table took about 900 B per entry holding `Item`s under string keys, its index repeating
/// the keys).
#[derive(Clone, Debug)]
struct Slot {
    owner: Name,
    gen: u64,
    version: u64,
    value: Option<Arc<Endpoint>>,
    /// When it became a tombstone.
    tomb: Option<u64>,
}

impl Slot {
    fn stamp(&self) -> (u64, u64) {
        (self.gen, self.version)
    }

    fn item(&self, network: &str, id: &str) -> Item {
        Item { owner: self.owner.to_string(), gen: self.gen, version: self.version, network: network.to_string(), id: id.to_string(), value: self.value.clone() }
    }
}

#[derive(Default)]
pub struct Table {
    /// Per network, per id.
    entries: BTreeMap<Name, BTreeMap<Name, Slot>>,
    /// The keys of each owner's entries: what one owner has is found without going through
    /// the whole table (every exchange asks it for each owner: O(N x E) before, issue 23).
    owned: BTreeMap<Name, BTreeSet<(Name, Name)>>,
    joined: BTreeSet<String>,
    /// Highest generation seen per owner whose entries came here (on a network this node
    /// joined, taken or not); older generations are gone. Keyed by the process's shared
    /// copy of the name. Other owners are left out (10,000 members on each of 10,000
    /// simulated nodes, most of them publishing nothing on this node's networks). Not
    /// pruned: bounded by the owners that ever published here.
    gens: BTreeMap<Name, u64>,
    /// Owners declared dead, at the generation they died with.
    dead: BTreeMap<NodeId, u64>,
    /// Newer generations seen, for the caller's handover (`take_new_generations`).
    new_gens: Vec<(NodeId, u64)>,
}

fn change(network: &str, id: &str, old: Option<Arc<Endpoint>>, new: Option<Arc<Endpoint>>) -> Option<Change> {
    (old != new).then(|| Change { network: network.to_string(), id: id.to_string(), old, new })
}

impl Table {
    fn slot(&self, key: &(Name, Name)) -> Option<&Slot> {
        self.entries.get(&key.0)?.get(&key.1)
    }

    /// Puts an entry in, and in its owner's index.
    fn put(&mut self, key: (Name, Name), slot: Slot) {
        let owner = slot.owner.clone();
        if let Some(old) = self.entries.entry(key.0.clone()).or_default().insert(key.1.clone(), slot) {
            if old.owner != owner {
                self.unindex(&old.owner, &key);
            }
        }
        self.owned.entry(owner).or_default().insert(key);
    }

    fn unindex(&mut self, owner: &str, key: &(Name, Name)) {
        if let Some(keys) = self.owned.get_mut(owner) {
            keys.remove(key);
            if keys.is_empty() {
                self.owned.remove(owner);
            }
        }
    }

    /// Takes an entry out, and out of its owner's index.
    fn take(&mut self, key: &(Name, Name)) -> Option<Slot> {
        let net = self.entries.get_mut(&key.0)?;
        let slot = net.remove(&key.1)?;
        if net.is_empty() {
            self.entries.remove(&key.0);
        }
        self.unindex(&slot.owner, key);
        Some(slot)
    }

    /// The keys `owner` has entries under (in `network` only, if given).
    fn keys_of(&self, owner: &str, network: Option<&str>) -> Vec<(Name, Name)> {
        let Some(keys) = self.owned.get(owner) else { return Vec::new() };
        match network {
            Some(net) => {
                let Some((net, _)) = self.entries.get_key_value(net) else { return Vec::new() };
                keys.range((net.clone(), Name::from(""))..).take_while(|(n, _)| n == net).cloned().collect()
            }
            None => keys.iter().cloned().collect(),
        }
    }

    /// Takes the entries of `keys` out: the changes their going makes.
    fn take_all(&mut self, keys: Vec<(Name, Name)>) -> Vec<Change> {
        keys.into_iter()
            .filter_map(|k| {
                let slot = self.take(&k)?;
                change(&k.0, &k.1, slot.value, None)
            })
            .collect()
    }

    pub fn joined(&self) -> &BTreeSet<String> {
        &self.joined
    }

    pub fn join(&mut self, network: &str) {
        self.joined.insert(network.to_string());
    }

    /// Leaves a network: every entry of it goes.
    pub fn leave(&mut self, network: &str) -> Vec<Change> {
        self.joined.remove(network);
        let keys: Vec<(Name, Name)> = self.entries.get_key_value(network).map(|(n, m)| m.keys().map(|id| (n.clone(), id.clone())).collect()).unwrap_or_default();
        self.take_all(keys)
    }

    /// The entry `id` of `network`, tombstones included.
    pub fn get(&self, network: &str, id: &str) -> Option<Item> {
        self.entries.get(network)?.get(id).map(|s| s.item(network, id))
    }

    /// The endpoints of `network` (tombstones left out), shared with the table.
    pub fn endpoints(&self, network: &str) -> Vec<Arc<Endpoint>> {
        self.entries.get(network).map(|m| m.values().filter_map(|s| s.value.clone()).collect()).unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.entries.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// A newer generation of `owner` exists (it restarted, or rejoined after being declared
    /// down). Its older entries are not dropped here: the new generation re-publishes what
    /// it still has, entry by entry, and the caller drops what was not re-published a
    /// handover time later ([`Table::drop_older`]; [`Table::take_new_generations`] says
    /// when). Dropping at once would cut the data path of a restarted agent's live tasks.
    ///
    /// An owner this table holds no entry of has nothing to hand over, and its generation is
    /// not kept: the caller notes the generation an owner is alive at before it applies that
    /// owner's entries ([`Table::note_generation`]), and [`Table::apply`] notes each entry's.
    pub fn owner_generation(&mut self, owner: &str, gen: u64) {
        if !self.gens.contains_key(owner) && !self.owned.contains_key(owner) {
            if self.dead.get(owner).is_some_and(|d| *d < gen) {
                self.dead.remove(owner);
            }
            return;
        }
        self.note_generation(owner, gen);
    }

    /// `owner` exists at generation `gen`: kept, whether or not it has entries here.
    pub fn note_generation(&mut self, owner: &str, gen: u64) {
        let known = self.gens.get(owner).copied().unwrap_or(0);
        if gen <= known {
            return;
        }
        self.gens.insert(crate::ident::name(owner), gen);
        if self.dead.get(owner).is_some_and(|d| *d < gen) {
            self.dead.remove(owner);
        }
        if known > 0 {
            // A first generation replaces nothing.
            self.new_gens.push((owner.to_string(), gen));
        }
    }

    /// `owner` is alive at generation `gen` (after this node started over from a partition,
    /// its verdicts of death were its own isolation): its entries are taken again.
    pub fn revive(&mut self, owner: &str, gen: u64) {
        if self.dead.get(owner).is_some_and(|d| *d <= gen) {
            self.dead.remove(owner);
        }
    }

    /// The owners seen with a newer generation since the last call.
    pub fn take_new_generations(&mut self) -> Vec<(NodeId, u64)> {
        std::mem::take(&mut self.new_gens)
    }

    /// Drops `owner`'s entries older than generation `gen` (the handover is over).
    pub fn drop_older(&mut self, owner: &str, gen: u64) -> Vec<Change> {
        self.drop_owner_where(owner, |s| s.gen < gen)
    }

    /// `owner` died at generation `gen`: its entries go, and stay gone until it comes back
    /// with a newer generation.
    pub fn owner_dead(&mut self, owner: &str, gen: u64) -> Vec<Change> {
        let d = self.dead.entry(owner.to_string()).or_insert(gen);
        *d = (*d).max(gen);
        self.drop_owner_where(owner, |s| s.gen <= gen)
    }

    fn drop_owner_where(&mut self, owner: &str, f: impl Fn(&Slot) -> bool) -> Vec<Change> {
        let keys: Vec<(Name, Name)> = self.keys_of(owner, None).into_iter().filter(|k| self.slot(k).is_some_and(&f)).collect();
        self.take_all(keys)
    }

    /// Applies one entry if it is newer than what we hold.
    pub fn apply(&mut self, item: Item, now_ms: u64) -> (Applied, Vec<Change>) {
        if !self.joined.contains(&item.network) {
            return (Applied::NotJoined, Vec::new());
        }
        if self.dead.get(&item.owner).is_some_and(|g| item.gen <= *g) {
            return (Applied::DeadOwner, Vec::new());
        }
        let mut changes = Vec::new();
        self.note_generation(&item.owner, item.gen);
        if self.gens.get(item.owner.as_str()).is_some_and(|g| item.gen < *g) {
            return (Applied::Stale, changes);
        }
        let (net, held) = match self.entries.get_key_value(item.network.as_str()) {
            Some((n, m)) => (n.clone(), m.get_key_value(item.id.as_str())),
            None => (crate::ident::name(&item.network), None),
        };
        let (id, old) = match held {
            Some((_, cur)) if (cur.stamp(), &*cur.owner) >= (item.stamp(), item.owner.as_str()) => {
                return (Applied::Stale, changes);
            }
            Some((id, cur)) => (id.clone(), cur.value.clone()),
            None => (Name::from(item.id.as_str()), None),
        };
        let Item { owner, gen, version, value, .. } = item;
        // An unchanged value re-published (a restart's handover, a rejoin's re-stamp) keeps
        // the copy the sinks hold: no change reaches them to swap theirs.
        let value = match (&old, value) {
            (Some(o), Some(v)) if **o == *v => Some(o.clone()),
            (_, v) => v,
        };
        let tomb = value.is_none().then_some(now_ms);
        let slot = Slot { owner: crate::ident::name(&owner), gen, version, value: value.clone(), tomb };
        changes.extend(change(&net, &id, old, value));
        self.put((net, id), slot);
        (Applied::Changed, changes)
    }

    /// Per owner in `network`: the newest stamp we hold and a checksum of all its entries'
    /// stamps (so a lost older change shows even when a newer one arrived).
    pub fn digest(&self, network: &str) -> BTreeMap<NodeId, Summary> {
        let mut d: BTreeMap<NodeId, Summary> = BTreeMap::new();
        for (id, s) in self.entries.get(network).into_iter().flatten() {
            // The owner's name is copied once per owner, not once per entry.
            let e = match d.get_mut(&*s.owner) {
                Some(e) => e,
                None => d.entry(s.owner.to_string()).or_default(),
            };
            e.stamp = e.stamp.max(s.stamp());
            e.sum = e.sum.wrapping_add(fnv(id.as_bytes(), s.gen, s.version));
        }
        d
    }

    /// Every entry `owner` has in `network`, tombstones included.
    pub fn owner_items(&self, network: &str, owner: &str) -> Vec<Item> {
        self.keys_of(owner, Some(network)).iter().filter_map(|k| Some(self.slot(k)?.item(&k.0, &k.1))).collect()
    }

    /// Applies an owner's set as of stamp (`gen`, `version`). When the owner itself sent it
    /// (`authoritative`), it is complete: entries of that owner we hold at or below that
    /// stamp and not in the set are gone. A set relayed by another node may lack entries, so
    /// then only its entries are applied.
    pub fn apply_owner_set(&mut self, set: OwnerSet, authoritative: bool, now_ms: u64) -> Vec<Change> {
        let OwnerSet { network, owner, gen, version, items } = set;
        let (network, owner) = (network.as_str(), owner.as_str());
        if !self.joined.contains(network) {
            return Vec::new();
        }
        let mut changes = Vec::new();
        let ids: BTreeSet<String> = items.iter().map(|i| i.id.clone()).collect();
        for i in items {
            if i.owner == owner && i.network == network {
                changes.extend(self.apply(i, now_ms).1);
            }
        }
        if !authoritative {
            return changes;
        }
        let gone: Vec<(Name, Name)> = self.keys_of(owner, Some(network)).into_iter().filter(|k| !ids.contains(&*k.1) && self.slot(k).is_some_and(|s| s.stamp() <= (gen, version))).collect();
        changes.extend(self.take_all(gone));
        changes
    }

    /// Forgets tombstones older than `ttl_ms`.
    pub fn reap(&mut self, now_ms: u64, ttl_ms: u64) -> usize {
        let gone: Vec<(Name, Name)> =
            self.entries.iter().flat_map(|(n, m)| m.iter().filter(|(_, s)| s.tomb.is_some_and(|t| now_ms.saturating_sub(t) >= ttl_ms)).map(move |(id, _)| (n.clone(), id.clone()))).collect();
        for k in &gone {
            self.take(k);
        }
        gone.len()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use swarmnet_types::EndpointState;

    pub fn ep(net: &str, id: &str, last: u8) -> Endpoint {
        Endpoint {
            network: net.into(),
            id: id.into(),
            task_name: format!("web.{last}"),
            service_name: "web".into(),
            service_id: "s".into(),
            aliases: vec![],
            ip: Ipv4Addr::new(10, 0, 0, last),
            mac: [2, 0x42, 10, 0, 0, last],
            vtep: "10.210.0.1".parse().expect("ip"),
            vip: None,
            ports: vec![],
            state: EndpointState::Active,
        }
    }

    fn item(owner: &str, gen: u64, version: u64, id: &str, value: Option<Endpoint>) -> Item {
        Item { owner: owner.into(), gen, version, network: "n".into(), id: id.into(), value: value.map(Arc::new) }
    }

    #[test]
    fn newer_wins_replays_are_stale_and_unjoined_networks_are_ignored() {
        let mut t = Table::default();
        assert_eq!(t.apply(item("a", 1, 1, "e1", Some(ep("n", "e1", 3))), 0).0, Applied::NotJoined);
        t.join("n");
        assert!(matches!(t.apply(item("a", 1, 1, "e1", Some(ep("n", "e1", 3))), 0).0, Applied::Changed));
        assert_eq!(t.apply(item("a", 1, 1, "e1", Some(ep("n", "e1", 3))), 0).0, Applied::Stale);
        let (a, ch) = t.apply(item("a", 1, 2, "e1", None), 5);
        assert!(matches!(a, Applied::Changed));
        assert_eq!(ch[0].new, None);
        assert!(t.endpoints("n").is_empty());
        assert_eq!(t.apply(item("a", 1, 1, "e1", Some(ep("n", "e1", 3))), 0).0, Applied::Stale, "an old add cannot undo a delete");
        assert_eq!(t.reap(100, 50), 1);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn a_new_generation_replaces_the_old_one_and_the_dead_stay_dead() {
        let mut t = Table::default();
        t.join("n");
        t.apply(item("a", 1, 1, "e1", Some(ep("n", "e1", 3))), 0);
        t.apply(item("a", 1, 2, "e2", Some(ep("n", "e2", 4))), 0);
        let (_, ch) = t.apply(item("a", 2, 1, "e3", Some(ep("n", "e3", 5))), 0);
        assert_eq!(ch.len(), 1, "e3 added; e1 and e2 stay until the handover ends: {ch:?}");
        assert_eq!(t.endpoints("n").len(), 3);
        assert_eq!(t.take_new_generations(), vec![("a".to_string(), 2)]);
        assert_eq!(t.apply(item("a", 1, 9, "e4", Some(ep("n", "e4", 6))), 0).0, Applied::Stale, "nothing new from the old generation");
        // e2 re-published by the new generation survives the handover; e1 does not.
        t.apply(item("a", 2, 2, "e2", Some(ep("n", "e2", 4))), 0);
        let ch = t.drop_older("a", 2);
        assert_eq!(ch.len(), 1, "{ch:?}");
        assert_eq!(t.endpoints("n").len(), 2);
        let ch = t.owner_dead("a", 2);
        assert_eq!(ch.len(), 2);
        assert_eq!(t.apply(item("a", 2, 9, "e3", Some(ep("n", "e3", 5))), 0).0, Applied::DeadOwner);
        assert!(matches!(t.apply(item("a", 3, 1, "e3", Some(ep("n", "e3", 5))), 0).0, Applied::Changed));
    }

    #[test]
    fn an_owner_set_removes_what_it_no_longer_has() {
        let mut t = Table::default();
        t.join("n");
        t.apply(item("a", 1, 1, "e1", Some(ep("n", "e1", 3))), 0);
        t.apply(item("a", 1, 2, "e2", Some(ep("n", "e2", 4))), 0);
        t.apply(item("b", 1, 1, "f1", Some(ep("n", "f1", 9))), 0);
        // a deleted e1 and reaped the tombstone; its set at (1,5) has only e2.
        // A relayed set removes nothing.
        let set = OwnerSet { network: "n".into(), owner: "a".into(), gen: 1, version: 5, items: vec![item("a", 1, 2, "e2", Some(ep("n", "e2", 4)))] };
        let relayed = t.apply_owner_set(set.clone(), false, 0);
        assert!(relayed.is_empty());
        let ch = t.apply_owner_set(set, true, 0);
        assert_eq!(ch.len(), 1);
        assert_eq!(ch[0].id, "e1");
        let d = t.digest("n");
        assert_eq!(d["a"].stamp, (1, 2));
        assert_eq!(d["b"].stamp, (1, 1));
        // Same newest stamp, one older entry missing: the checksums differ.
        let mut u = Table::default();
        u.join("n");
        u.apply(item("a", 1, 2, "e2", Some(ep("n", "e2", 4))), 0);
        u.apply(item("a", 1, 1, "x", Some(ep("n", "x", 5))), 0);
        let mut v = Table::default();
        v.join("n");
        v.apply(item("a", 1, 2, "e2", Some(ep("n", "e2", 4))), 0);
        assert_eq!(u.digest("n")["a"].stamp, v.digest("n")["a"].stamp);
        assert_ne!(u.digest("n")["a"].sum, v.digest("n")["a"].sum);
        assert_eq!(t.endpoints("n").len(), 2);
    }

    /// The owners' index holds exactly the table's keys, each under its entry's owner.
    fn assert_indexed(t: &Table) {
        let mut from_index: Vec<(Name, (Name, Name))> = t.owned.iter().flat_map(|(o, ks)| ks.iter().map(move |k| (o.clone(), k.clone()))).collect();
        let mut from_entries: Vec<(Name, (Name, Name))> = t.entries.iter().flat_map(|(n, m)| m.iter().map(move |(id, s)| (s.owner.clone(), (n.clone(), id.clone())))).collect();
        from_index.sort();
        from_entries.sort();
        assert_eq!(from_index, from_entries);
        assert!(t.owned.values().all(|ks| !ks.is_empty()));
        assert!(t.entries.values().all(|m| !m.is_empty()));
    }

    #[test]
    fn the_owners_index_follows_every_change() {
        let mut t = Table::default();
        t.join("n");
        t.join("m");
        t.apply(item("a", 1, 1, "e1", Some(ep("n", "e1", 3))), 0);
        t.apply(item("a", 1, 2, "e2", Some(ep("n", "e2", 4))), 0);
        t.apply(Item { network: "m".into(), ..item("a", 1, 3, "e9", Some(ep("m", "e9", 7))) }, 0);
        t.apply(item("b", 1, 1, "f1", Some(ep("n", "f1", 9))), 0);
        assert_indexed(&t);
        // An entry taken over by another owner (a newer stamp) moves to its index.
        t.apply(item("b", 1, 5, "e2", Some(ep("n", "e2", 4))), 0);
        assert_indexed(&t);
        assert_eq!(t.owner_items("n", "a").len(), 1);
        assert_eq!(t.owner_items("n", "b").len(), 2);
        assert_eq!(t.owner_items("m", "a").len(), 1);
        let set = OwnerSet { network: "n".into(), owner: "b".into(), gen: 1, version: 5, items: vec![item("b", 1, 5, "e2", Some(ep("n", "e2", 4)))] };
        assert_eq!(t.apply_owner_set(set, true, 0).len(), 1, "f1 gone");
        assert_indexed(&t);
        t.apply(item("a", 1, 4, "e1", None), 10);
        assert_eq!(t.reap(100, 50), 1);
        assert_indexed(&t);
        assert_eq!(t.owner_dead("b", 1).len(), 1);
        assert_indexed(&t);
        assert_eq!(t.leave("m").len(), 1);
        assert_indexed(&t);
        assert!(t.is_empty());
    }

    #[test]
    fn an_unchanged_value_republished_keeps_the_shared_copy() {
        let mut t = Table::default();
        t.join("n");
        let (_, ch) = t.apply(item("a", 1, 1, "e1", Some(ep("n", "e1", 3))), 0);
        let held = ch[0].new.clone().expect("added");
        // The owner restarted and publishes the same endpoint again: no change, same copy.
        let (a, ch) = t.apply(item("a", 2, 1, "e1", Some(ep("n", "e1", 3))), 0);
        assert_eq!((a, ch.len()), (Applied::Changed, 0));
        assert!(Arc::ptr_eq(&held, &t.endpoints("n")[0]), "the sinks' copy is the table's");
    }

    #[test]
    fn records_one_version_behind_do_not_cancel_in_a_sum() {
        // Pairs of owners each one version behind, against the same owners current: with
        // plain FNV-1a, many such pairs summed to the same checksum.
        let owners: Vec<String> = (0..200).map(|i| format!("n{i}")).collect();
        let mut collisions = 0;
        for a in &owners {
            for b in &owners {
                if a < b {
                    let behind = fnv(a.as_bytes(), 1, 0).wrapping_add(fnv(b.as_bytes(), 1, 0));
                    let current = fnv(a.as_bytes(), 1, 1).wrapping_add(fnv(b.as_bytes(), 1, 1));
                    collisions += usize::from(behind == current);
                }
            }
        }
        assert_eq!(collisions, 0);
    }
}
