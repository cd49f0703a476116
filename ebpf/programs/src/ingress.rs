//! The routing mesh's entry program (issue 10, ADR 0015): tc ingress on the node's underlay
//! interface. A client's packet to a published port (ingress mode) of the node's underlay
//! address is given a task (round robin, once per flow) and put, unchanged but for its
//! Ethernet header, on the ingress network towards that task: a task on another node gets
//! it in a VXLAN packet the program makes and sends back out of the underlay interface
//! (the kernel fills in the next hop's MAC); a task on this node gets it out of the node's
//! port `sning0`, whose bridge sends it to the task.
//! The task's namespace DNATs it to itself and its reply, whose source is then the address
//! and port the client asked for, leaves through the task's own node straight to the client
//! (direct server return): the entry node sees one direction only, and keeps no connection
//! tracking for it.
//!
//! What this program does not take goes on to the kernel's path (the node's nftables
//! table, ADR 0011), which answers the same port: a TCP segment of a flow it never saw the
//! SYN of, a port with no active task (refused there), a fragment, a datagram bigger than
//! the ingress network's MTU, traffic from the node itself or from its tasks.
//!
//! Kernel code never panics: every failure is a verdict (pass to the kernel's path).
#![no_std]
#![no_main]

use aya_ebpf::bindings::{bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_NO_PREALLOC, TC_ACT_OK, TC_ACT_SHOT};
use aya_ebpf::helpers::{bpf_ktime_get_ns, bpf_redirect, bpf_redirect_neigh};
use aya_ebpf::macros::{classifier, map};
use aya_ebpf::maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap};
use aya_ebpf::programs::TcContext;
use swarmnet_ebpf_common::*;

const ETH_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const TCP: u8 = 6;
const UDP: u8 = 17;
const FIN: u8 = 0x01;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;
/// A UDP flow idle for this long is new again (the kernel's UDP conntrack timeout).
const UDP_IDLE_NS: u64 = 30_000_000_000;
/// Outer IPv4 + UDP + VXLAN + inner Ethernet.
const ENCAP_LEN: usize = 20 + 8 + 8 + 14;

#[map(name = "SN_ING_CFG")]
static CFG: Array<IngCfg> = Array::with_max_entries(1, 0);
#[map(name = "SN_ING_PORTS")]
static PORTS: HashMap<IngPortKey, IngPort> = HashMap::with_max_entries(MAX_ING_PORTS, BPF_F_NO_PREALLOC);
#[map(name = "SN_ING_SLOTS")]
static SLOTS: HashMap<SlotKey, IngTask> = HashMap::with_max_entries(MAX_ING_SLOTS, BPF_F_NO_PREALLOC);
#[map(name = "SN_ING_RR")]
static RR: PerCpuArray<u32> = PerCpuArray::with_max_entries(MAX_ING_PORTS, 0);
#[map(name = "SN_ING_FLOWS")]
static FLOWS: LruHashMap<IngFlowKey, IngFlow> = LruHashMap::with_max_entries(MAX_ING_FLOWS, 0);
#[map(name = "SN_ING_HANDED")]
static HANDED: PerCpuHashMap<IngHandKey, u64> = PerCpuHashMap::with_max_entries(MAX_ING_HANDED, BPF_F_NO_PREALLOC);

#[classifier]
pub fn sn_ingress(ctx: TcContext) -> i32 {
    match take(&ctx) {
        Some(verdict) => verdict,
        None => TC_ACT_OK,
    }
}

/// The verdict for a packet this program takes; None: the kernel's path has it.
#[inline(always)]
fn take(ctx: &TcContext) -> Option<i32> {
    let cfg = *CFG.get(0)?;
    if cfg.ifindex == 0 {
        return None;
    }
    if u16::from_be(ctx.load::<u16>(12).ok()?) != ETH_P_IP {
        return None;
    }
    let vihl: u8 = ctx.load(ETH_LEN).ok()?;
    let ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return None;
    }
    // A fragment (more follow, or not the first) carries no ports to go by.
    if u16::from_be(ctx.load::<u16>(ETH_LEN + 6).ok()?) & 0x3fff != 0 {
        return None;
    }
    let proto: u8 = ctx.load(ETH_LEN + 9).ok()?;
    if proto != TCP && proto != UDP {
        return None;
    }
    let daddr: u32 = ctx.load(ETH_LEN + 16).ok()?;
    if daddr != cfg.vtep {
        return None;
    }
    let saddr: u32 = ctx.load(ETH_LEN + 12).ok()?;
    let l4 = ETH_LEN + ihl;
    let ports = u32::from_be(ctx.load::<u32>(l4).ok()?);
    let dport = ports & 0xffff;
    // SAFETY: the value is copied at once; entries are replaced whole.
    let port = unsafe { PORTS.get(IngPortKey { proto: proto as u32, port: dport }) }.copied()?;
    let key = IngFlowKey { saddr, ports, proto: proto as u32 };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: value copied at once.
    let known = unsafe { FLOWS.get(key) }.copied();
    let task = if proto == TCP {
        let flags: u8 = ctx.load(l4 + 13).ok()?;
        let syn = flags & (SYN | ACK | RST | FIN) == SYN;
        let seq: u32 = if syn { ctx.load(l4 + 4).ok()? } else { 0 };
        match known {
            // A segment of a known flow; the client closing it lets its port start anew.
            Some(f) if !syn => {
                if flags & (FIN | RST) != 0 && f.closing == 0 {
                    let _ = FLOWS.insert(key, IngFlow { closing: 1, ..f }, 0);
                }
                f.task
            }
            // Its SYN again (a retransmission: the same sequence number), or a SYN on a flow
            // the client has not closed (not a new connection: the task's stack answers it
            // as TCP says; never another task, which would break the open one).
            Some(f) if f.syn_seq == seq || f.closing == 0 => f.task,
            // A segment of a flow this program did not start: the kernel's connection
            // tracking knows it (or calls it invalid and drops it).
            _ if !syn => return None,
            _ => pick(&port, &key, dport, proto, seq, now)?,
        }
    } else {
        // A datagram bigger than the ingress network carries is left to the kernel's path,
        // which fragments it (the program does not).
        // SAFETY: the context pointer the kernel passed; a plain field read.
        let gso = unsafe { (*ctx.skb.skb).gso_size };
        if gso == 0 && ctx.len() > cfg.mtu + ETH_LEN as u32 {
            return None;
        }
        match known {
            Some(f) if now.wrapping_sub(f.ts) < UDP_IDLE_NS => {
                let _ = FLOWS.insert(key, IngFlow { ts: now, ..f }, 0);
                f.task
            }
            _ => pick(&port, &key, dport, proto, 0, now)?,
        }
    };
    let o = task.ip.to_ne_bytes();
    let hi = cfg.mac_hi.to_ne_bytes();
    let lo = cfg.mac_lo.to_ne_bytes();
    // The frame on the ingress network: to the task's MAC (02:42 + its address), from the
    // node's port.
    let inner: [u8; 12] = [0x02, 0x42, o[0], o[1], o[2], o[3], hi[0], hi[1], hi[2], hi[3], lo[0], lo[1]];
    let len = ctx.len() as usize;
    if task.vtep == cfg.vtep || len + ENCAP_LEN > 65_535 + ETH_LEN {
        // A task of this node (or a packet too big to wrap): through the node's port. From
        // here on the flow is this program's: a packet it cannot send is dropped (the client
        // sends it again), never left to the table, which would pick a task of its own.
        if ctx.store(0, &inner, 0).is_err() {
            return Some(TC_ACT_SHOT);
        }
        // SAFETY: a helper with plain integers; it returns TC_ACT_REDIRECT.
        return Some(unsafe { bpf_redirect(cfg.ifindex, 0) } as i32);
    }
    Some(encap(ctx, &cfg, &task, &inner, saddr ^ ports, len - ETH_LEN))
}

/// Wraps the packet (`ip_len` bytes of IP) in VXLAN to the task's node and sends it out of
/// the underlay interface; the kernel's neighbour table gives the next hop's MAC.
#[inline(always)]
fn encap(ctx: &TcContext, cfg: &IngCfg, task: &IngTask, inner: &[u8; 12], entropy: u32, ip_len: usize) -> i32 {
    let flags = (BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP | BPF_F_ADJ_ROOM_ENCAP_L2_ETH) as u64 | ((ETH_LEN as u64 & 0xff) << 56);
    if ctx.adjust_room(ENCAP_LEN as i32, BPF_ADJ_ROOM_MAC, flags).is_err() {
        // The flow is this program's: dropped (the client sends it again), not left to the
        // table, which would pick a task of its own.
        return TC_ACT_SHOT;
    }
    let total = (ip_len + ENCAP_LEN) as u16;
    let udp_len = (ip_len + ENCAP_LEN - 20) as u16;
    let s = cfg.vtep.to_ne_bytes();
    let d = task.vtep.to_ne_bytes();
    let t = total.to_be_bytes();
    let mut h: [u8; ENCAP_LEN] = [0; ENCAP_LEN];
    // IPv4: no options, no DF (as the kernel's VXLAN), TTL 64, UDP.
    h[0] = 0x45;
    h[2] = t[0];
    h[3] = t[1];
    h[8] = 64;
    h[9] = UDP;
    h[12] = s[0];
    h[13] = s[1];
    h[14] = s[2];
    h[15] = s[3];
    h[16] = d[0];
    h[17] = d[1];
    h[18] = d[2];
    h[19] = d[3];
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 20 {
        sum += ((h[i] as u32) << 8) | h[i + 1] as u32;
        i += 2;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    let c = (!(sum as u16)).to_be_bytes();
    h[10] = c[0];
    h[11] = c[1];
    // UDP: a source port from the flow (spreads flows over the receiver's queues), no
    // checksum (allowed for IPv4, as the kernel's VXLAN does by default).
    let e = entropy ^ (entropy >> 16);
    let sport = (49_152 + (e & 0x3fff)) as u16;
    let sp = sport.to_be_bytes();
    let dp = (cfg.vxlan_port as u16).to_be_bytes();
    let ul = udp_len.to_be_bytes();
    h[20] = sp[0];
    h[21] = sp[1];
    h[22] = dp[0];
    h[23] = dp[1];
    h[24] = ul[0];
    h[25] = ul[1];
    // VXLAN: the I flag and the VNI.
    h[28] = 0x08;
    h[32] = (cfg.vni >> 16) as u8;
    h[33] = (cfg.vni >> 8) as u8;
    h[34] = cfg.vni as u8;
    // The inner Ethernet header.
    let mut k = 0;
    while k < 12 {
        h[36 + k] = inner[k];
        k += 1;
    }
    h[48] = 0x08;
    h[49] = 0x00;
    if ctx.store(ETH_LEN, &h, 0).is_err() {
        // Half made: drop it rather than send garbage (the client retransmits).
        return TC_ACT_SHOT;
    }
    // SAFETY: a helper with plain integers and no parameters block (the kernel looks up
    // the next hop of the outer destination); it returns TC_ACT_REDIRECT.
    unsafe { bpf_redirect_neigh(cfg.uplink, core::ptr::null_mut(), 0, 0) as i32 }
}

/// A new flow: the next active task of the port, round robin (exact on each CPU).
#[inline(always)]
fn pick(port: &IngPort, key: &IngFlowKey, dport: u32, proto: u8, syn_seq: u32, now: u64) -> Option<IngTask> {
    let i = {
        let rr = RR.get_ptr_mut(port.id)?;
        // SAFETY: this CPU's slot of an existing element; the program runs with migration
        // disabled.
        let n = unsafe {
            let n = *rr;
            *rr = n.wrapping_add(1);
            n
        };
        // None when the port has no active task: the kernel's path refuses it.
        n.checked_rem(port.count)?
    };
    // SAFETY: value copied at once.
    let task = unsafe { SLOTS.get(SlotKey { svc: port.id, gen: port.gen, slot: i }) }.copied()?;
    FLOWS.insert(key, IngFlow { task, syn_seq, closing: 0, ts: now }, 0).ok()?;
    let hk = IngHandKey { proto: proto as u32, port: dport, ip: task.ip };
    match HANDED.get_ptr_mut(hk) {
        // SAFETY: this CPU's copy of an existing element.
        Some(h) => unsafe { *h = (*h).wrapping_add(1) },
        None => {
            let _ = HANDED.insert(hk, 1u64, 0);
        }
    }
    Some(task)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
