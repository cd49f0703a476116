//! Namespace work on one dedicated OS thread. `setns` changes only the calling thread, so
//! no tokio worker ever calls it: jobs are sent here, run with a small current-thread
//! runtime of their own, and hand back plain values and file descriptors.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::mpsc;

use nix::sched::{setns, unshare, CloneFlags};

use crate::netlink::{self, Netlink};

#[derive(Debug, thiserror::Error)]
pub enum NsError {
    #[error("namespace thread: {0}")]
    Io(#[from] std::io::Error),
    #[error("namespace thread: {what}: {source}")]
    Sys {
        what: String,
        #[source]
        source: nix::Error,
    },
    #[error("namespace thread has stopped")]
    Gone,
    #[error(transparent)]
    Netlink(#[from] netlink::Error),
}

type Job = Box<dyn FnOnce(&mut NsCtx) + Send>;

/// What a job gets: the thread's runtime, the node's own namespace, and a netlink handle in it.
pub struct NsCtx {
    rt: tokio::runtime::Runtime,
    home: File,
    home_nl: Netlink,
}

impl NsCtx {
    /// Runs a future on this thread's runtime (spawned netlink connections make progress
    /// only while a future is being driven here).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Netlink in the node's own namespace (the one the daemon was started in).
    pub fn home(&self) -> &Netlink {
        &self.home_nl
    }

    fn back_home(&self) -> Result<(), NsError> {
        setns(self.home.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NsError::Sys { what: "return to the node namespace".into(), source })
    }

    /// Makes a new, empty network namespace and returns a handle on it; the thread stays in
    /// the node's namespace. The namespace lives as long as a handle or a process holds it.
    pub fn new_netns(&mut self) -> Result<File, NsError> {
        unshare(CloneFlags::CLONE_NEWNET).map_err(|source| NsError::Sys { what: "unshare a network namespace".into(), source })?;
        let ns = File::open("/proc/thread-self/ns/net");
        self.back_home()?;
        Ok(ns?)
    }

    /// Opens a UDP socket and a TCP listener on `addr` inside `ns` (for a task's resolver).
    /// Sockets keep the namespace they were made in after the thread leaves it.
    pub fn sockets_in(&mut self, ns: &File, addr: std::net::SocketAddr) -> Result<(std::net::UdpSocket, std::net::TcpListener), NsError> {
        setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NsError::Sys { what: "enter a task namespace".into(), source })?;
        let made = (|| -> std::io::Result<_> {
            use socket2::{Domain, Protocol, Socket, Type};
            let udp = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
            // Room for a burst of queries while the runtime is busy.
            udp.set_recv_buffer_size(1 << 20)?;
            udp.bind(&addr.into())?;
            let tcp = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
            tcp.set_reuse_address(true)?;
            tcp.bind(&addr.into())?;
            tcp.listen(128)?;
            Ok((std::net::UdpSocket::from(udp), std::net::TcpListener::from(tcp)))
        })();
        self.back_home()?;
        Ok(made?)
    }

    /// The cookie of network namespace `ns` (what `bpf_get_netns_cookie` answers for its
    /// sockets), read with `SO_NETNS_COOKIE` on a socket made inside it.
    pub fn netns_cookie(&mut self, ns: &File) -> Result<u64, NsError> {
        setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NsError::Sys { what: "enter a task namespace".into(), source })?;
        let got = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).and_then(|s| {
            const SO_NETNS_COOKIE: libc::c_int = 71;
            let mut cookie: u64 = 0;
            let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
            // SAFETY: getsockopt writes at most `len` bytes into `cookie`, a live u64 on
            // this stack frame, and stores the written length in `len`; the fd is open for
            // the duration of the call (owned by `s`).
            let rc = unsafe { libc::getsockopt(s.as_raw_fd(), libc::SOL_SOCKET, SO_NETNS_COOKIE, (&mut cookie as *mut u64).cast(), &mut len) };
            if rc != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(cookie)
        });
        self.back_home()?;
        Ok(got?)
    }

    /// Closes the UDP sockets of namespace `ns` connected to `dst` (see
    /// [`netlink::destroy_udp_connected_to`]).
    pub fn destroy_udp_to(&mut self, ns: &File, dst: std::net::Ipv4Addr) -> Result<usize, NsError> {
        setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NsError::Sys { what: "enter a task namespace".into(), source })?;
        let r = netlink::destroy_udp_connected_to(dst);
        self.back_home()?;
        Ok(r?)
    }

    /// Opens a netlink socket inside `ns`. The socket stays in `ns` after the thread leaves.
    pub fn netlink_in(&mut self, ns: &File) -> Result<Netlink, NsError> {
        setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NsError::Sys { what: "enter a task namespace".into(), source })?;
        let opened = {
            let _guard = self.rt.enter();
            Netlink::open()
        };
        self.back_home()?;
        let (nl, conn) = opened?;
        self.rt.spawn(conn);
        Ok(nl)
    }
}

#[derive(Clone)]
pub struct NsWorker {
    tx: mpsc::Sender<Job>,
}

impl NsWorker {
    /// Starts the thread in the caller's current network namespace.
    pub fn start() -> Result<NsWorker, NsError> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), NsError>>();
        std::thread::Builder::new().name("sn-netns".into()).spawn(move || {
            let setup = (|| -> Result<NsCtx, NsError> {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                let home = File::open("/proc/thread-self/ns/net")?;
                let (home_nl, conn) = {
                    let _guard = rt.enter();
                    Netlink::open()?
                };
                rt.spawn(conn);
                Ok(NsCtx { rt, home, home_nl })
            })();
            let mut ctx = match setup {
                Ok(c) => {
                    let _ = ready_tx.send(Ok(()));
                    c
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            while let Ok(job) = rx.recv() {
                job(&mut ctx);
            }
        })?;
        ready_rx.recv().map_err(|_| NsError::Gone)??;
        Ok(NsWorker { tx })
    }

    /// Runs `f` on the namespace thread and returns its result.
    pub async fn run<R, F>(&self, f: F) -> Result<R, NsError>
    where
        R: Send + 'static,
        F: FnOnce(&mut NsCtx) -> R + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Box::new(move |ctx| {
                let _ = tx.send(f(ctx));
            }))
            .map_err(|_| NsError::Gone)?;
        rx.await.map_err(|_| NsError::Gone)
    }
}

/// Runs `f` on a thread of its own that enters network namespace `ns` first, and waits for
/// it (blocking: call it off the async threads). For one-off work in a task's namespace
/// (a netlink socket opened there stays there) without the namespace worker: the thread ends
/// with the job, so no thread of the daemon is ever left in a task's namespace.
pub fn in_netns<R: Send>(ns: &File, f: impl FnOnce() -> R + Send) -> Result<R, NsError> {
    std::thread::scope(|sc| {
        sc.spawn(|| {
            setns(ns.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| NsError::Sys { what: "enter a task namespace".into(), source })?;
            Ok(f())
        })
        .join()
        .map_err(|_| NsError::Gone)?
    })
}

/// The raw fd of a namespace handle, for netlink's IFLA_NET_NS_FD and for `setns` in a child.
pub fn raw(ns: &File) -> i32 {
    ns.as_raw_fd()
}
