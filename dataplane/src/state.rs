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
use std::sync::{Arc, Mutex};

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
    write_bytes(path, &body, mode)
}

fn write_bytes(path: &Path, body: &[u8], mode: u32) -> Result<(), StateError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.{}.tmp", std::process::id(), SEQ.fetch_add(1, Ordering::Relaxed)));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        f.write_all(body)?;
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

/// Reads `path` as JSON; a file that does not parse is set aside (see [`set_aside`]) and
/// reported through the error log, and the caller starts from `T::default()` knowing it.
/// Returns the value and, if the file was corrupt, where it was kept.
pub fn read_or_set_aside<T: DeserializeOwned + Default>(path: &Path) -> Result<(T, Option<PathBuf>), StateError> {
    match read_json(path) {
        Ok(v) => Ok((v.unwrap_or_default(), None)),
        Err(StateError::Corrupt { .. }) => Ok((T::default(), Some(set_aside(path)?))),
        Err(e) => Err(e),
    }
}

/// One state file written from async code: the value is serialised by the caller (a
/// consistent snapshot), the write runs on a blocking thread so no async worker waits on
/// fsync, and writes that finish out of order never leave an older snapshot in place.
pub struct StateFile {
    path: PathBuf,
    mode: u32,
    seq: AtomicU64,
    written: Arc<Mutex<u64>>,
}

impl StateFile {
    pub fn new(path: PathBuf, mode: u32) -> StateFile {
        StateFile { path, mode, seq: AtomicU64::new(0), written: Arc::new(Mutex::new(0)) }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `value`; returns once it is on disk (or a newer value is).
    pub async fn save<T: Serialize>(&self, value: &T) -> Result<(), StateError> {
        self.prepare(value)?.write().await
    }

    /// Serialises `value` and gives it its place in the order of writes. Call it while
    /// holding whatever lock makes `value` a consistent snapshot; write it after.
    pub fn prepare<T: Serialize>(&self, value: &T) -> Result<Pending, StateError> {
        let body = serde_json::to_vec_pretty(value).map_err(|source| StateError::Encode { path: self.path.clone(), source })?;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(Pending { body, seq, path: self.path.clone(), mode: self.mode, written: self.written.clone() })
    }
}

/// A snapshot ready to be written (see [`StateFile::prepare`]).
#[must_use]
pub struct Pending {
    body: Vec<u8>,
    seq: u64,
    path: PathBuf,
    mode: u32,
    written: Arc<Mutex<u64>>,
}

impl Pending {
    pub async fn write(self) -> Result<(), StateError> {
        let path = self.path.clone();
        let join = tokio::task::spawn_blocking(move || {
            let mut w = self.written.lock().unwrap_or_else(|p| p.into_inner());
            if *w > self.seq {
                return Ok(());
            }
            write_bytes(&self.path, &self.body, self.mode)?;
            *w = self.seq;
            Ok(())
        });
        match join.await {
            Ok(r) => r,
            Err(e) => Err(StateError::Io { path, source: std::io::Error::other(e) }),
        }
    }
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn background_saves_end_with_the_newest_value() {
        let d = dir("bg");
        let f = Arc::new(StateFile::new(d.join("state.json"), 0o644));
        let saves: Vec<_> = (0..100u32)
            .map(|i| {
                let f = f.clone();
                tokio::spawn(async move { f.save(&i).await })
            })
            .collect();
        for s in saves {
            s.await.expect("join").expect("save");
        }
        f.save(&1000u32).await.expect("last save");
        assert_eq!(read_json::<u32>(f.path()).expect("read"), Some(1000));
        let (v, aside) = read_or_set_aside::<u32>(f.path()).expect("read");
        assert_eq!((v, aside), (1000, None));
        std::fs::write(f.path(), b"10").expect("write");
        std::fs::write(f.path(), b"{").expect("corrupt");
        let (v, aside) = read_or_set_aside::<u32>(f.path()).expect("set aside");
        assert_eq!(v, 0);
        assert!(aside.is_some_and(|p| p.exists()));
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
