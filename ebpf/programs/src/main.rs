//! The service-VIP load balancer at the socket layer (ADR 0009): a task's `connect()` (TCP,
//! connected UDP) or unconnected `sendto()` to `VIP:port` is steered to a task of the service
//! once, at the system call, so no packet is ever rewritten; `getpeername()` and the source
//! address of a UDP reply are turned back into `VIP:port`. Only sockets made in a task's
//! network namespace on a network the service is on are touched (`SN_NETNS`); anything else
//! passes untouched.
//!
//! Kernel code never panics: every failure is a verdict (pass untouched, or refuse).
#![no_std]
#![no_main]

use aya_ebpf::bindings::BPF_F_NO_PREALLOC;
use aya_ebpf::helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval};
use aya_ebpf::macros::{cgroup_sock_addr, map};
use aya_ebpf::maps::{HashMap, LruHashMap, PerCpuArray};
use aya_ebpf::programs::SockAddrContext;
use aya_ebpf::EbpfContext;
use swarmnet_ebpf_common::*;

const AF_INET: u32 = 2;
const IPPROTO_TCP: u32 = 6;
const IPPROTO_UDP: u32 = 17;
const ECONNREFUSED: i32 = 111;
/// Let the system call go on (as translated, or untouched).
const PROCEED: i32 = 1;
/// Refuse it (with the errno set by `bpf_set_retval`).
const REJECT: i32 = 0;

#[map(name = "SN_SERVICES")]
static SERVICES: HashMap<u32, Service> = HashMap::with_max_entries(MAX_SERVICES, BPF_F_NO_PREALLOC);
#[map(name = "SN_SLOTS")]
static SLOTS: HashMap<SlotKey, Slot> = HashMap::with_max_entries(MAX_SLOTS, 0);
#[map(name = "SN_BACKENDS")]
static BACKENDS: HashMap<u32, Backend> = HashMap::with_max_entries(MAX_BACKENDS, BPF_F_NO_PREALLOC);
#[map(name = "SN_NETNS")]
static NETNS: HashMap<NetnsKey, u32> = HashMap::with_max_entries(MAX_NETNS, BPF_F_NO_PREALLOC);
#[map(name = "SN_RR")]
static RR: PerCpuArray<u32> = PerCpuArray::with_max_entries(MAX_SERVICES, 0);
#[map(name = "SN_HANDED")]
static HANDED: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);
#[map(name = "SN_REVNAT")]
static REVNAT: LruHashMap<SockKey, VipPort> = LruHashMap::with_max_entries(MAX_REVNAT, 0);
#[map(name = "SN_UDP_AFF")]
static UDP_AFF: LruHashMap<SockKey, Slot> = LruHashMap::with_max_entries(MAX_UDP_AFFINITY, 0);

#[cgroup_sock_addr(connect4)]
pub fn sn_connect4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, false)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sn_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, true)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sn_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx);
    // The verifier allows nothing else here.
    PROCEED
}

#[cgroup_sock_addr(getpeername4)]
pub fn sn_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx);
    PROCEED
}

fn refuse() -> i32 {
    // SAFETY: a helper call with a plain integer; allowed in connect4 and sendmsg4.
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REJECT
}

/// `connect4` and `sendmsg4` (`unconnected_udp`): VIP:port → a task's address:port.
#[inline(always)]
fn forward(ctx: &SockAddrContext, unconnected_udp: bool) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the context pointer the kernel passed; these fields are readable in
    // every sock_addr program, and read whole (no narrow access).
    let (family, protocol, vip, port) = unsafe { ((*sa).user_family, (*sa).protocol, (*sa).user_ip4, (*sa).user_port) };
    if family != AF_INET || (protocol != IPPROTO_TCP && protocol != IPPROTO_UDP) {
        return PROCEED;
    }
    // SAFETY: the value is copied at once; the map is updated only by replacing whole
    // elements (no preallocation: a replaced element is freed after an RCU grace period).
    let Some(svc) = (unsafe { SERVICES.get(vip) }).copied() else { return PROCEED };
    // SAFETY: a helper reading the context it was given.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: only presence is looked at.
    if unsafe { NETNS.get(NetnsKey { cookie: netns, vni: svc.vni, _pad: 0 }) }.is_none() {
        // Not a task on the service's network: the VIP means nothing here.
        return PROCEED;
    }
    if svc.count == 0 {
        return refuse();
    }
    // SAFETY: a helper reading the context it was given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let flow = SockKey { cookie, ip: vip, port };
    let mut chosen: Option<Slot> = None;
    if unconnected_udp {
        // An unconnected UDP socket keeps talking to the task it was given, while that task
        // is active (each sendto() comes here).
        // SAFETY: values are copied at once.
        if let Some(s) = unsafe { UDP_AFF.get(flow) }.copied() {
            // SAFETY: as above.
            if let Some(b) = unsafe { BACKENDS.get(s.backend) }.copied() {
                if b.state == BACKEND_ACTIVE && b.ip == s.ip && b.svc == svc.id {
                    chosen = Some(s);
                }
            }
        }
    }
    let slot = match chosen {
        Some(s) => s,
        None => {
            // Round robin per CPU: each CPU's sequence is exact, so the shares of N tasks stay
            // within (number of CPUs) of each other. (The result of an atomic add cannot be
            // trusted on this toolchain; a per-CPU counter needs none.)
            let Some(rr) = RR.get_ptr_mut(svc.id) else { return refuse() };
            // SAFETY: `rr` points at this CPU's slot of an array element that exists; the
            // program runs with migration disabled.
            let n = unsafe {
                let n = *rr;
                *rr = n.wrapping_add(1);
                n
            };
            match pick(&svc, n).or_else(|| {
                // A reader held across two changes can hold a generation whose slots the
                // second change already trimmed: look once more at the live entry.
                // SAFETY: value copied at once.
                let again = unsafe { SERVICES.get(vip) }.copied()?;
                pick(&again, n)
            }) {
                Some(s) => s,
                // No slot for a published service: refuse rather than send a SYN to nowhere.
                None => return refuse(),
            }
        }
    };
    // SAFETY: writable fields of the context, written whole.
    unsafe { (*sa).user_ip4 = slot.ip };
    if chosen.is_none() {
        // A new connection or UDP flow (later datagrams of a flow found it above): its
        // reverse entry, its affinity, and one more for the backend's count.
        let _ = REVNAT.insert(SockKey { cookie, ip: slot.ip, port }, VipPort { vip, port }, 0);
        if unconnected_udp {
            let _ = UDP_AFF.insert(flow, slot, 0);
        }
        if let Some(h) = HANDED.get_ptr_mut(slot.backend) {
            // SAFETY: this CPU's slot of an existing element.
            unsafe { *h = (*h).wrapping_add(1) };
        }
    }
    PROCEED
}

/// The `n`th pick of `svc`'s live generation.
#[inline(always)]
fn pick(svc: &Service, n: u32) -> Option<Slot> {
    let i = n.checked_rem(svc.count)?;
    // SAFETY: value copied at once.
    unsafe { SLOTS.get(SlotKey { svc: svc.id, gen: svc.gen, slot: i }) }.copied()
}

/// `recvmsg4` and `getpeername4`: a task's address:port → the VIP:port the socket asked for.
#[inline(always)]
fn reverse(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    // SAFETY: readable fields of the context, read whole.
    let (family, ip, port) = unsafe { ((*sa).user_family, (*sa).user_ip4, (*sa).user_port) };
    if family != AF_INET {
        return;
    }
    // SAFETY: a helper reading the context it was given.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: value copied at once.
    if let Some(v) = unsafe { REVNAT.get(SockKey { cookie, ip, port }) }.copied() {
        // SAFETY: writable fields of the context, written whole.
        unsafe {
            (*sa).user_ip4 = v.vip;
            (*sa).user_port = v.port;
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
