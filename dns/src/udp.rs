//! Batched UDP I/O for the resolver: up to `BATCH` queries per `recvmmsg` and their answers
//! in one `sendmmsg` (nix's safe wrappers). Under load this halves the system calls and the
//! points where the sender is preempted by the woken client; with one query waiting it is
//! one call each way, as before. IPv4 only: the resolver listens on 127.0.0.11.

use std::io::{IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4};
use std::os::fd::RawFd;

use nix::sys::socket::{recvmmsg, sendmmsg, MsgFlags, MultiHeaders, SockaddrIn};

/// Queries taken per system call.
pub const BATCH: usize = 16;
/// Larger datagrams are cut by the kernel and then dropped: a query is a header, one name
/// (at most 255 bytes) and an OPT record. 16 KiB of buffers per task.
const MAX_QUERY: usize = 1024;

/// The receive buffers. nix's headers hold raw pointers (not `Send`), so they are made per
/// call, which keeps a `Batch` usable across `.await` in a spawned task.
pub struct Batch {
    bufs: Vec<Vec<u8>>,
}

/// One received datagram: which buffer, its length, its sender.
#[derive(Clone, Copy, Debug)]
pub struct Got {
    pub index: usize,
    pub len: usize,
    pub from: SocketAddr,
}

impl Default for Batch {
    fn default() -> Self {
        Batch { bufs: vec![vec![0u8; MAX_QUERY]; BATCH] }
    }
}

impl Batch {
    /// Takes what is waiting on `fd` without blocking (EAGAIN if nothing is). Truncated
    /// datagrams and senders that are not IPv4 are left out.
    pub fn recv(&mut self, fd: RawFd) -> std::io::Result<Vec<Got>> {
        let mut slices: Vec<[IoSliceMut<'_>; 1]> = self.bufs.iter_mut().map(|b| [IoSliceMut::new(&mut b[..])]).collect();
        let mut headers = MultiHeaders::<SockaddrIn>::preallocate(BATCH, None);
        let res = recvmmsg(fd, &mut headers, slices.iter_mut(), MsgFlags::MSG_DONTWAIT, None).map_err(std::io::Error::from)?;
        let mut out = Vec::with_capacity(BATCH);
        for (index, m) in res.enumerate() {
            if m.flags.contains(MsgFlags::MSG_TRUNC) {
                continue;
            }
            if let Some(a) = m.address {
                out.push(Got { index, len: m.bytes, from: SocketAddr::V4(SocketAddrV4::from(a)) });
            }
        }
        Ok(out)
    }

    pub fn data(&self, g: &Got) -> &[u8] {
        &self.bufs[g.index][..g.len.min(MAX_QUERY)]
    }

    /// Sends the first (up to `BATCH`) of `out` without blocking; how many went.
    pub fn send(&self, fd: RawFd, out: &[(Vec<u8>, SocketAddr)]) -> std::io::Result<usize> {
        let take = &out[..out.len().min(BATCH)];
        let slices: Vec<[IoSlice<'_>; 1]> = take.iter().map(|(b, _)| [IoSlice::new(b)]).collect();
        let addrs: Vec<Option<SockaddrIn>> = take
            .iter()
            .map(|(_, a)| match a {
                SocketAddr::V4(v4) => Some(SockaddrIn::from(*v4)),
                SocketAddr::V6(_) => None,
            })
            .collect();
        let mut headers = MultiHeaders::<SockaddrIn>::preallocate(take.len(), None);
        let res = sendmmsg(fd, &mut headers, slices.iter(), &addrs, [], MsgFlags::MSG_DONTWAIT).map_err(std::io::Error::from)?;
        Ok(res.count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_batch_in_and_out() {
        let server = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let client = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let mut b = Batch::default();
        let nothing = b.recv(server.as_raw_fd()).expect_err("nothing waiting");
        assert_eq!(nothing.kind(), std::io::ErrorKind::WouldBlock);
        for i in 0..(BATCH as u8 + 8) {
            client.send_to(&[i; 20], server.local_addr().expect("addr")).expect("send");
        }
        client.send_to(&vec![7u8; MAX_QUERY + 10], server.local_addr().expect("addr")).expect("send big");
        let got = b.recv(server.as_raw_fd()).expect("a batch");
        assert_eq!(got.len(), BATCH);
        assert_eq!(b.data(&got[3]), &[3u8; 20]);
        assert_eq!(got[0].from, client.local_addr().expect("addr"));
        let out: Vec<(Vec<u8>, SocketAddr)> = got.iter().map(|g| (b.data(g).to_vec(), g.from)).collect();
        let rest = b.recv(server.as_raw_fd()).expect("the rest");
        assert_eq!(rest.len(), 8, "the oversized datagram is left out");
        assert_eq!(b.send(server.as_raw_fd(), &out).expect("send"), BATCH);
        let mut buf = [0u8; 64];
        let (n, _) = client.recv_from(&mut buf).expect("answer");
        assert_eq!(&buf[..n], &[0u8; 20]);
    }
}
