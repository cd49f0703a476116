//! Task output (issue 21). A task's stdout and stderr are pipes to a writer process of its
//! own (`swarmnet task-log`, started beside the task and, like it, outliving the daemon),
//! which stamps each line with the time it was read and its stream and keeps the file under
//! a size cap by rotating it (`<id>.log`, `<id>.log.1`, … the oldest last). The daemon reads
//! these files for `service logs`: [`read_all`] for what is there, [`Follower`] for what
//! comes next.
//!
//! A stored line is `<unix time in ns> <o|e> <text>\n`; a line longer than [`MAX_LINE`] is
//! cut into several (as Docker cuts at 16 KiB).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use swarmnet_api::logs::{LogLine, LogStream};

/// The longest line kept as one; a longer one is cut.
pub const MAX_LINE: usize = 16 << 10;

/// How task output is kept on a node.
#[derive(Clone, Debug)]
pub struct LogConfig {
    /// The writer's argv before its own arguments: this binary and `task-log`.
    pub cmd: Vec<String>,
    /// A file is rotated once it would grow past this many bytes.
    pub max_size: u64,
    /// Files kept per task, the current one included (at least 1).
    pub max_files: u32,
}

impl LogConfig {
    /// Docker's `local` log driver's defaults, smaller: 10 MiB, 3 files.
    pub const DEFAULT_MAX_SIZE: u64 = 10 << 20;
    pub const DEFAULT_MAX_FILES: u32 = 3;

    /// The writer's full argv for the file `path`.
    pub fn argv(&self, path: &Path) -> Vec<String> {
        let mut v = self.cmd.clone();
        v.extend(["--file".into(), path.display().to_string(), "--max-size".into(), self.max_size.to_string(), "--max-files".into(), self.max_files.max(1).to_string()]);
        v
    }
}

/// A task's log file, then its rotated ones: `path`, `path.1`, … `path.{n-1}`.
pub fn rotated(path: &Path, n: u32) -> PathBuf {
    if n == 0 {
        return path.to_path_buf();
    }
    let mut s = path.as_os_str().to_os_string();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

/// Every file of a task's log that exists, the oldest first.
pub fn files(path: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    // Rotated files are numbered without gaps; 64 is far above any cap in use.
    for n in (1..64).rev() {
        let p = rotated(path, n);
        if p.exists() {
            out.push(p);
        }
    }
    if path.exists() {
        out.push(path.to_path_buf());
    }
    out
}

/// Removes a task's log files; the paths that could not be removed.
pub fn remove(path: &Path) -> Vec<String> {
    files(path).into_iter().filter_map(|p| std::fs::remove_file(&p).err().map(|e| format!("{}: {e}", p.display()))).collect()
}

/// Log files of ended tasks a node keeps (the newest by change time); older ones go when
/// another task ends. Docker keeps its task history's logs the same way (5 tasks a slot).
pub const ENDED_KEPT: usize = 10;

/// Removes the log files of ended tasks in `dir` beyond the newest `keep` (a task in
/// `live` is never one); returns what could not be removed.
pub fn prune(dir: &Path, live: &std::collections::HashSet<String>, keep: usize) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut ended: Vec<(std::time::SystemTime, PathBuf)> = rd
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let id = name.strip_suffix(".log")?;
            if live.contains(id) {
                return None;
            }
            Some((e.metadata().ok()?.modified().ok()?, e.path()))
        })
        .collect();
    ended.sort_by_key(|e| std::cmp::Reverse(e.0));
    let mut failed = Vec::new();
    for (_, path) in ended.into_iter().skip(keep) {
        failed.extend(remove(&path));
        let _ = std::fs::remove_file(path.with_extension("log-writer.err"));
    }
    failed
}

/// Appends one stored line (`text` without its newline; cut to [`MAX_LINE`] by the caller).
pub fn encode(ts_ns: u64, stream: LogStream, text: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(ts_ns.to_string().as_bytes());
    out.extend_from_slice(match stream {
        LogStream::Stdout => b" o ",
        LogStream::Stderr => b" e ",
    });
    out.extend_from_slice(text);
    out.push(b'\n');
}

/// One stored line back (without its newline); None for a line this format did not write
/// (a file of an older version, where output was stored raw: shown as stdout at time 0).
pub fn decode(line: &[u8]) -> Option<(u64, LogStream, &[u8])> {
    let sp = line.iter().position(|b| *b == b' ')?;
    let ts: u64 = std::str::from_utf8(&line[..sp]).ok()?.parse().ok()?;
    let rest = &line[sp + 1..];
    let stream = match rest.get(..2)? {
        b"o " => LogStream::Stdout,
        b"e " => LogStream::Stderr,
        _ => return None,
    };
    Some((ts, stream, &rest[2..]))
}

/// What to read of a task's log.
#[derive(Clone, Copy, Debug, Default)]
pub struct Select {
    /// Only lines stamped at or after this time (unix ns).
    pub since_ns: Option<u64>,
    /// Only the last this many lines (after `since`).
    pub tail: Option<u64>,
}

fn line_of(task: &str, raw: &[u8]) -> LogLine {
    let raw = raw.strip_suffix(b"\n").unwrap_or(raw);
    match decode(raw) {
        Some((ts_ns, stream, text)) => LogLine { task_id: task.to_string(), ts_ns, stream, text: String::from_utf8_lossy(text).into_owned() },
        None => LogLine { task_id: task.to_string(), ts_ns: 0, stream: LogStream::Stdout, text: String::from_utf8_lossy(raw).into_owned() },
    }
}

/// Every line of task `task`'s log at `path` (its rotated files first) that `sel` selects,
/// in order, and where its current file ends (to follow from). A task without a log yet has
/// no lines.
pub fn read_all(task: &str, path: &Path, sel: Select) -> std::io::Result<(Vec<LogLine>, Option<Follower>)> {
    // A rotation while the files are read shifts them under the reader: read again.
    let ino = || std::fs::metadata(path).map(|m| m.ino()).ok();
    for _ in 0..3 {
        let before = ino();
        let r = read_all_once(task, path, sel)?;
        if ino() == before {
            return Ok(r);
        }
    }
    read_all_once(task, path, sel)
}

fn read_all_once(task: &str, path: &Path, sel: Select) -> std::io::Result<(Vec<LogLine>, Option<Follower>)> {
    let mut kept: VecDeque<LogLine> = VecDeque::new();
    let cap = sel.tail.map(|t| usize::try_from(t).unwrap_or(usize::MAX));
    if cap == Some(0) {
        return Ok((Vec::new(), Follower::at_end(task, path)));
    }
    let mut push = |l: LogLine| {
        if sel.since_ns.is_some_and(|s| l.ts_ns < s) {
            return;
        }
        kept.push_back(l);
        if cap.is_some_and(|c| kept.len() > c) {
            kept.pop_front();
        }
    };
    let mut follower = None;
    let all = files(path);
    for (i, p) in all.iter().enumerate() {
        let f = match File::open(p) {
            Ok(f) => f,
            // Rotated away meanwhile (the caller reads again).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(std::io::Error::new(e.kind(), format!("{}: {e}", p.display()))),
        };
        let current = i + 1 == all.len() && p == path;
        let ino = f.metadata()?.ino();
        let mut r = BufReader::new(f);
        let mut buf = Vec::new();
        let mut pos = 0u64;
        loop {
            buf.clear();
            let n = r.read_until(b'\n', &mut buf)?;
            if n == 0 {
                break;
            }
            // A line being written now (no newline yet) is read when it is whole.
            if current && buf.last() != Some(&b'\n') {
                break;
            }
            pos += n as u64;
            push(line_of(task, &buf));
        }
        if current {
            follower = Some(Follower { task: task.to_string(), path: path.to_path_buf(), file: Some(r.into_inner()), ino, pos });
        }
    }
    let follower = follower.or_else(|| Follower::at_end(task, path).or(Some(Follower { task: task.to_string(), path: path.to_path_buf(), file: None, ino: 0, pos: 0 })));
    Ok((kept.into(), follower))
}

/// Reads a task's log as it grows, across rotations (a file rotated away is read to its end
/// before the new one is opened).
#[derive(Debug)]
pub struct Follower {
    task: String,
    path: PathBuf,
    file: Option<File>,
    ino: u64,
    pos: u64,
}

impl Follower {
    /// From the current end of the log (nothing of what is there now): after its last
    /// whole line, so that a record being written is read whole later.
    fn at_end(task: &str, path: &Path) -> Option<Follower> {
        let mut f = File::open(path).ok()?;
        let len = f.metadata().ok()?.len();
        let back = len.min(64 << 10);
        f.seek(SeekFrom::Start(len - back)).ok()?;
        let mut tail = Vec::new();
        (&mut f).take(back).read_to_end(&mut tail).ok()?;
        let pos = match tail.iter().rposition(|b| *b == b'\n') {
            Some(i) => len - back + i as u64 + 1,
            None if back < len => len,
            None => 0,
        };
        let ino = f.metadata().ok()?.ino();
        Some(Follower { task: task.to_string(), path: path.to_path_buf(), file: Some(f), ino, pos })
    }

    fn open(&mut self, p: &Path) -> std::io::Result<bool> {
        match File::open(p) {
            Ok(f) => {
                self.ino = f.metadata()?.ino();
                self.file = Some(f);
                self.pos = 0;
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Whole lines written since the last call (at most about `max` of them, then the rest
    /// at the next call).
    pub fn poll(&mut self, max: usize) -> std::io::Result<Vec<LogLine>> {
        let mut out = Vec::new();
        if self.file.is_none() && !self.open(&self.path.clone())? {
            // The task has not written yet (its log appears when it starts).
            return Ok(out);
        }
        self.read_whole_lines(&mut out, max)?;
        if out.len() >= max {
            return Ok(out);
        }
        let Ok(m) = std::fs::metadata(&self.path) else { return Ok(out) };
        if m.ino() == self.ino {
            return Ok(out);
        }
        // Rotated: the file now at `path` is another one. The old one is read to its end
        // (it no longer grows), then every file rotated after it, oldest first, then `path`.
        self.read_whole_lines(&mut out, usize::MAX)?;
        if let Some(rest) = self.partial_tail()? {
            out.push(rest);
        }
        let newer: Vec<PathBuf> = {
            let mut at = None;
            for n in 1..64 {
                match std::fs::metadata(rotated(&self.path, n)) {
                    Ok(m) if m.ino() == self.ino => {
                        at = Some(n);
                        break;
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            // Not found among the rotated files (removed already, or one file kept): only
            // `path` is newer.
            (1..at.unwrap_or(1)).rev().map(|n| rotated(&self.path, n)).collect()
        };
        for p in newer {
            if self.open(&p)? {
                self.read_whole_lines(&mut out, usize::MAX)?;
                if let Some(rest) = self.partial_tail()? {
                    out.push(rest);
                }
            }
        }
        if self.open(&self.path.clone())? {
            self.read_whole_lines(&mut out, max)?;
        }
        Ok(out)
    }

    fn read_whole_lines(&mut self, out: &mut Vec<LogLine>, max: usize) -> std::io::Result<()> {
        let Some(f) = self.file.as_mut() else { return Ok(()) };
        f.seek(SeekFrom::Start(self.pos))?;
        let mut r = BufReader::new(f);
        let mut buf = Vec::new();
        while out.len() < max {
            buf.clear();
            let n = r.read_until(b'\n', &mut buf)?;
            if n == 0 || buf.last() != Some(&b'\n') {
                break;
            }
            self.pos += n as u64;
            out.push(line_of(&self.task, &buf));
        }
        Ok(())
    }

    /// A last line without its newline in a file that will not grow any more.
    fn partial_tail(&mut self) -> std::io::Result<Option<LogLine>> {
        let Some(f) = self.file.as_mut() else { return Ok(None) };
        f.seek(SeekFrom::Start(self.pos))?;
        let mut rest = Vec::new();
        f.read_to_end(&mut rest)?;
        self.pos += rest.len() as u64;
        Ok((!rest.is_empty()).then(|| line_of(&self.task, &rest)))
    }
}

/// The writer process (`swarmnet task-log`): reads the task's stdout on fd 0 and its stderr
/// on fd 3 until both end, and stores each line stamped. Returns when both have ended.
pub fn write_until_closed(path: &Path, max_size: u64, max_files: u32) -> std::io::Result<()> {
    use std::os::fd::FromRawFd;
    let out = Arc::new(Mutex::new(Rotator::open(path, max_size, max_files)?));
    // SAFETY: fd 3 is the read end of the task's stderr pipe, put there by the daemon when
    // it started this process (`spawn_log_writer`); nothing else in this process owns it.
    let err = unsafe { File::from_raw_fd(3) };
    let o2 = out.clone();
    let t = std::thread::spawn(move || copy_lines(err, LogStream::Stderr, &o2));
    let r1 = copy_lines(std::io::stdin().lock(), LogStream::Stdout, &out);
    let r2 = t.join().map_err(|_| std::io::Error::other("the stderr reader panicked"))?;
    r1.and(r2)
}

fn now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)).unwrap_or(0)
}

/// Reads `input` to its end, storing each line. A record that cannot be stored (a full
/// disk, a rotation that failed) is dropped and said on the writer's stderr, and reading
/// goes on: the task never blocks on a full pipe nor dies of a closed one because of its
/// log.
fn copy_lines(input: impl Read, stream: LogStream, out: &Mutex<Rotator>) -> std::io::Result<()> {
    let mut r = BufReader::with_capacity(64 << 10, input);
    let mut line = Vec::new();
    let mut rec = Vec::new();
    let mut dropped = 0u64;
    loop {
        line.clear();
        let n = (&mut r).take(MAX_LINE as u64).read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        let text = line.strip_suffix(b"\n").unwrap_or(&line);
        rec.clear();
        encode(now_ns(), stream, text, &mut rec);
        match out.lock().unwrap_or_else(|p| p.into_inner()).write(&rec) {
            Ok(()) if dropped > 0 => {
                eprintln!("task log: {dropped} lines could not be stored and were dropped");
                dropped = 0;
            }
            Ok(()) => {}
            Err(e) => {
                if dropped == 0 {
                    eprintln!("task log: a line cannot be stored ({e}): dropping lines until it can");
                }
                dropped += 1;
            }
        }
    }
}

/// The current file, rotated when a record would take it past the cap.
struct Rotator {
    path: PathBuf,
    file: File,
    size: u64,
    max_size: u64,
    max_files: u32,
}

impl Rotator {
    fn open(path: &Path, max_size: u64, max_files: u32) -> std::io::Result<Rotator> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(Rotator { path: path.to_path_buf(), file, size, max_size, max_files: max_files.max(1) })
    }

    /// One record, written whole with one call (a reader never sees half of it unless it
    /// reads while the call runs; it only takes lines that end).
    fn write(&mut self, rec: &[u8]) -> std::io::Result<()> {
        if self.size > 0 && self.size + rec.len() as u64 > self.max_size {
            self.rotate()?;
        }
        self.file.write_all(rec)?;
        self.size += rec.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        if self.max_files <= 1 {
            // One file only: a new one (a reader of the old one reads it to its end and
            // sees the new inode).
            std::fs::remove_file(&self.path)?;
            self.file = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
            self.size = 0;
            return Ok(());
        }
        let _ = std::fs::remove_file(rotated(&self.path, self.max_files - 1));
        for n in (1..self.max_files - 1).rev() {
            let _ = std::fs::rename(rotated(&self.path, n), rotated(&self.path, n + 1));
        }
        std::fs::rename(&self.path, rotated(&self.path, 1))?;
        self.file = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("swarmnet-tasklog-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("temp dir");
        d
    }

    fn texts(lines: &[LogLine]) -> Vec<String> {
        lines.iter().map(|l| l.text.clone()).collect()
    }

    #[test]
    fn a_record_round_trips_and_raw_lines_still_read() {
        let mut b = Vec::new();
        encode(1_700_000_000_123_456_789, LogStream::Stderr, b"hello world", &mut b);
        assert_eq!(b, b"1700000000123456789 e hello world\n");
        assert_eq!(decode(&b[..b.len() - 1]), Some((1_700_000_000_123_456_789, LogStream::Stderr, &b"hello world"[..])));
        assert_eq!(decode(b"plain output of an older version"), None);
        let l = line_of("t", b"plain output\n");
        assert_eq!((l.ts_ns, l.text.as_str()), (0, "plain output"));
    }

    #[test]
    fn rotation_keeps_the_cap_and_reading_spans_the_files_in_order() {
        let d = dir("rotate");
        let path = d.join("t.log");
        let mut r = Rotator::open(&path, 100, 3).expect("open");
        for i in 0..20 {
            let mut rec = Vec::new();
            encode(i, LogStream::Stdout, format!("line {i:02}").as_bytes(), &mut rec);
            r.write(&rec).expect("write");
        }
        let fs = files(&path);
        assert_eq!(fs.len(), 3, "{fs:?}");
        for f in &fs {
            assert!(std::fs::metadata(f).expect("meta").len() <= 100, "{f:?} over the cap");
        }
        let (lines, _) = read_all("t", &path, Select::default()).expect("read");
        let t = texts(&lines);
        assert_eq!(t.last().map(String::as_str), Some("line 19"));
        let nums: Vec<u64> = lines.iter().map(|l| l.ts_ns).collect();
        assert!(nums.windows(2).all(|w| w[1] == w[0] + 1), "in order, none missing within what is kept: {nums:?}");
        let (tail, _) = read_all("t", &path, Select { tail: Some(2), since_ns: None }).expect("tail");
        assert_eq!(texts(&tail), ["line 18", "line 19"]);
        let (since, _) = read_all("t", &path, Select { tail: None, since_ns: Some(17) }).expect("since");
        assert_eq!(texts(&since), ["line 17", "line 18", "line 19"]);
        let (none, _) = read_all("t", &path, Select { tail: Some(0), since_ns: None }).expect("tail 0");
        assert!(none.is_empty());
        assert!(remove(&path).is_empty());
        assert!(files(&path).is_empty());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn pruning_keeps_live_tasks_and_the_newest_ended() {
        let d = dir("prune");
        for (i, id) in ["a", "b", "c", "live"].iter().enumerate() {
            let p = d.join(format!("{id}.log"));
            std::fs::write(&p, b"x\n").expect("write");
            std::fs::write(rotated(&p, 1), b"x\n").expect("write");
            let t = std::time::SystemTime::now() - std::time::Duration::from_secs(100 - i as u64);
            std::fs::File::options().write(true).open(&p).and_then(|f| f.set_modified(t)).expect("mtime");
        }
        std::fs::write(d.join("a.resolv.conf"), b"").expect("other file");
        let live: std::collections::HashSet<String> = ["live".to_string()].into();
        assert!(prune(&d, &live, 1).is_empty());
        let mut left: Vec<String> = std::fs::read_dir(&d).expect("dir").flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, ["a.resolv.conf", "c.log", "c.log.1", "live.log", "live.log.1"]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_follower_sees_new_lines_across_a_rotation_and_never_half_a_line() {
        let d = dir("follow");
        let path = d.join("t.log");
        let (_, f) = read_all("t", &path, Select::default()).expect("read");
        let mut f = f.expect("a follower even before the log exists");
        assert!(f.poll(100).expect("poll").is_empty());
        let mut r = Rotator::open(&path, 20, 2).expect("open");
        let rec = |i: u64| {
            let mut b = Vec::new();
            encode(i, LogStream::Stdout, format!("n{i}").as_bytes(), &mut b);
            b
        };
        r.write(&rec(1)).expect("write");
        assert_eq!(texts(&f.poll(100).expect("poll")), ["n1"]);
        // Half a record: not yet.
        r.file.write_all(b"2 o hal").expect("write");
        r.size += 7;
        assert!(f.poll(100).expect("poll").is_empty());
        r.file.write_all(b"f\n").expect("write");
        r.size += 2;
        // Records of 7 bytes, files of 20: the third record goes to a new file.
        r.write(&rec(3)).expect("write");
        assert_eq!(files(&path).len(), 2, "rotated once");
        assert_eq!(texts(&f.poll(100).expect("poll")), ["half", "n3"]);
        r.write(&rec(4)).expect("write");
        r.write(&rec(5)).expect("write");
        assert_eq!(texts(&f.poll(100).expect("poll")), ["n4", "n5"]);
        // Several rotations between two polls: every file still there is read, in order.
        let mut r3 = Rotator::open(&d.join("u.log"), 20, 4).expect("open");
        let (_, f3) = read_all("u", &d.join("u.log"), Select::default()).expect("read");
        let mut f3 = f3.expect("follower");
        r3.write(&rec(1)).expect("write");
        assert_eq!(texts(&f3.poll(100).expect("poll")), ["n1"]);
        for i in 2..8 {
            r3.write(&rec(i)).expect("write");
        }
        assert_eq!(texts(&f3.poll(100).expect("poll")), ["n2", "n3", "n4", "n5", "n6", "n7"]);
        // One file kept: each rotation a new file, followed too.
        let mut r1 = Rotator::open(&d.join("v.log"), 20, 1).expect("open");
        let (_, f1) = read_all("v", &d.join("v.log"), Select::default()).expect("read");
        let mut f1 = f1.expect("follower");
        r1.write(&rec(1)).expect("write");
        r1.write(&rec(2)).expect("write");
        assert_eq!(texts(&f1.poll(100).expect("poll")), ["n1", "n2"]);
        r1.write(&rec(3)).expect("write");
        r1.write(&rec(4)).expect("write");
        assert_eq!(texts(&f1.poll(100).expect("poll")), ["n3", "n4"]);
        assert_eq!(files(&d.join("v.log")).len(), 1);
        let _ = std::fs::remove_dir_all(&d);
    }
}
