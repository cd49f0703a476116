//! What a pinned eBPF link is attached to, read from the kernel (`BPF_OBJ_GET`, then
//! `BPF_OBJ_GET_INFO_BY_FD`): aya 0.14's `LinkInfo` gives a link's id and program but not its
//! target. A daemon uses it to tell a pinned link it can adopt (attached to the node's cgroup,
//! or to the underlay interface it uses now) from one it must replace (severed: its cgroup or
//! interface is gone; or attached to something else).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// `enum bpf_link_type`.
const BPF_LINK_TYPE_CGROUP: u32 = 3;
const BPF_LINK_TYPE_TCX: u32 = 11;

/// What a link is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkTarget {
    /// A cgroup, by its id (the inode number of its cgroup2 folder); 0: the cgroup is gone
    /// (the link is severed).
    Cgroup(u64),
    /// A TCX hook of an interface, by its index in the daemon's namespace; 0: the interface
    /// is gone (severed).
    Tcx(u32),
    /// Another kind of link (its `bpf_link_type`).
    Other(u32),
}

impl LinkTarget {
    pub fn severed(self) -> bool {
        matches!(self, LinkTarget::Cgroup(0) | LinkTarget::Tcx(0))
    }
}

/// `union bpf_attr` as `BPF_OBJ_GET` reads it. The padding is a field: the kernel refuses
/// (EINVAL) an attribute whose bytes past the last field it knows are not zero.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `union bpf_attr` as `BPF_OBJ_GET_INFO_BY_FD` reads it.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// Room for `struct bpf_link_info` (type, id, prog_id, then a union aligned to 8 at offset
/// 16); the kernel writes at most `info_len` bytes.
#[repr(C, align(8))]
struct LinkInfoBuf([u8; 96]);

fn bpf(cmd: libc::c_long, attr: *mut libc::c_void, size: usize) -> std::io::Result<libc::c_long> {
    // SAFETY: bpf(2) reads (and for GET_INFO writes) `size` bytes at `attr`, which the
    // callers pass as a live, exclusively borrowed attribute struct of exactly that size; any
    // pointer inside it points to memory that outlives the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(rc)
}

/// Opens the object pinned at `path` (a descriptor of its own; the pin stays).
fn obj_get(path: &Path) -> std::io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut attr = ObjGetAttr { pathname: c.as_ptr() as u64, ..Default::default() };
    let fd = bpf(BPF_OBJ_GET, (&mut attr as *mut ObjGetAttr).cast(), std::mem::size_of::<ObjGetAttr>())?;
    let fd = i32::try_from(fd).map_err(std::io::Error::other)?;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What the link pinned at `path` is attached to (an error if nothing is pinned there).
pub fn pinned_target(path: &Path) -> std::io::Result<LinkTarget> {
    let fd = obj_get(path)?;
    let mut buf = LinkInfoBuf([0; 96]);
    let mut attr = InfoAttr { bpf_fd: u32::try_from(fd.as_raw_fd()).map_err(std::io::Error::other)?, info_len: 96, info: buf.0.as_mut_ptr() as u64 };
    bpf(BPF_OBJ_GET_INFO_BY_FD, (&mut attr as *mut InfoAttr).cast(), std::mem::size_of::<InfoAttr>())?;
    Ok(parse(&buf.0))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_ne_bytes(w)
}

/// The target from a `struct bpf_link_info` as the kernel wrote it.
fn parse(b: &[u8; 96]) -> LinkTarget {
    match u32_at(b, 0) {
        BPF_LINK_TYPE_CGROUP => {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[16..24]);
            LinkTarget::Cgroup(u64::from_ne_bytes(w))
        }
        BPF_LINK_TYPE_TCX => LinkTarget::Tcx(u32_at(b, 16)),
        other => LinkTarget::Other(other),
    }
}

/// The id of a cgroup (what a cgroup link's info names): the inode of its cgroup2 folder.
pub fn cgroup_id(folder: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(folder)?.ino())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_infos_are_read_by_type() {
        let mut b = [0u8; 96];
        b[0..4].copy_from_slice(&3u32.to_ne_bytes());
        b[16..24].copy_from_slice(&4242u64.to_ne_bytes());
        assert_eq!(parse(&b), LinkTarget::Cgroup(4242));
        b[0..4].copy_from_slice(&11u32.to_ne_bytes());
        b[16..24].copy_from_slice(&0u64.to_ne_bytes());
        assert!(parse(&b).severed(), "a TCX link whose interface is gone");
        b[16..20].copy_from_slice(&7u32.to_ne_bytes());
        assert_eq!(parse(&b), LinkTarget::Tcx(7));
        b[0..4].copy_from_slice(&6u32.to_ne_bytes());
        assert_eq!(parse(&b), LinkTarget::Other(6));
        assert!(pinned_target(Path::new("/nonexistent/pin")).is_err());
    }
}
