//! The node's state files (tasks, sandboxes, identity): JSON written atomically, so a crash
//! or a concurrent save never leaves a half-written or mixed file, and read back with
//! corruption reported instead of taken for "nothing saved".
//!
//! A write goes to a temporary file of its own in the same directory (unique per process
//! and per write, so two saves at once never share one), is synced, then renamed over the
//! target; the directory is synced so the rename survives a power cut.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is corrupt: {source}")]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("state for {path} cannot be encoded: {source}")]
    Encode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io { path: path.to_path_buf(), source }
}

static SEQ: AtomicU64 = AtomicU64::new(0);

/// Writes `value` as JSON to `path` atomically, with permissions `mode` (e.g. 0o600).
pub fn write_json<T: Serialize>(path: &Path, value: &T, mode: u32) -> Result<(), StateError> {
    let body = serde_json::to_vec_pretty(value).map_err(|source| StateError::Encode { path: path.to_path_buf(), source })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.{}.tmp", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(path)(e));
    }
    // The rename is durable once the directory is.
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(path))
}

/// Reads `path` as JSON: `Ok(None)` if it does not exist, an error if it cannot be read or
/// does not parse (a truncated or damaged file is never taken for an empty state).
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StateError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path)(e)),
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|source| StateError::Corrupt { path: path.to_path_buf(), source })
}

/// Moves a corrupt state file out of the way (to `<name>.corrupt-<unix time>`), keeping it
/// for a person to look at, so that the next save does not overwrite the evidence.
pub fn set_aside(path: &Path) -> Result<PathBuf, StateError> {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let to = path.with_file_name(format!("{name}.corrupt-{secs}"));
    std::fs::rename(path, &to).map_err(io(path))?;
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("sn-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    #[test]
    fn round_trip_missing_and_corrupt() {
        let d = dir("rt");
        let p = d.join("state.json");
        assert!(read_json::<BTreeMap<String, u32>>(&p).expect("absent").is_none());
        let v = BTreeMap::from([("a".to_string(), 1u32)]);
        write_json(&p, &v, 0o600).expect("write");
        assert_eq!(read_json::<BTreeMap<String, u32>>(&p).expect("read"), Some(v));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777, 0o600);
        std::fs::write(&p, b"{\"a\": 1").expect("truncate");
        let e = read_json::<BTreeMap<String, u32>>(&p).expect_err("corrupt");
        assert!(matches!(e, StateError::Corrupt { .. }), "{e}");
        assert!(e.to_string().contains("state.json is corrupt"), "{e}");
        let aside = set_aside(&p).expect("aside");
        assert!(!p.exists() && aside.exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn concurrent_writes_never_share_a_temporary_file() {
        let d = dir("conc");
        let p = d.join("state.json");
        let threads: Vec<_> = (0..8u32)
            .map(|i| {
                let p = p.clone();
                std::thread::spawn(move || {
                    for j in 0..50u32 {
                        write_json(&p, &vec![i; j as usize], 0o644).expect("every write succeeds");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let v: Vec<u32> = read_json(&p).expect("read").expect("present");
        assert!(v.iter().all(|x| *x == v[0]), "one writer's whole value, never a mix");
        let left: Vec<_> = std::fs::read_dir(&d).expect("ls").flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".tmp")).collect();
        assert!(left.is_empty(), "no temporary file is left behind");
        let _ = std::fs::remove_dir_all(&d);
    }
}
