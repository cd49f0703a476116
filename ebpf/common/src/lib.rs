//! The load balancer's maps, as both sides see them (ADR 0009). Every type is `#[repr(C)]`,
//! made of `u32`/`u64` only, so there is no implicit padding (map keys are hashed as raw
//! bytes: a padding byte left undefined would make lookups miss).
//!
//! Addresses are IPv4 in network byte order, as `bpf_sock_addr.user_ip4` holds them
//! (`u32::from_ne_bytes(ip.octets())`); ports as `user_port` holds them (the low 16 bits,
//! network order).
#![no_std]

/// Map names, as the loader finds and pins them.
pub const MAP_SERVICES: &str = "SN_SERVICES";
pub const MAP_SLOTS: &str = "SN_SLOTS";
pub const MAP_BACKENDS: &str = "SN_BACKENDS";
pub const MAP_NETNS: &str = "SN_NETNS";
pub const MAP_RR: &str = "SN_RR";
pub const MAP_HANDED: &str = "SN_HANDED";
pub const MAP_REVNAT: &str = "SN_REVNAT";
pub const MAP_UDP_AFFINITY: &str = "SN_UDP_AFF";

/// Program names (the functions in `swarmnet-ebpf`).
pub const PROG_CONNECT4: &str = "sn_connect4";
pub const PROG_SENDMSG4: &str = "sn_sendmsg4";
pub const PROG_RECVMSG4: &str = "sn_recvmsg4";
pub const PROG_GETPEERNAME4: &str = "sn_getpeername4";

/// Sizes of the maps.
pub const MAX_SERVICES: u32 = 65_536;
pub const MAX_BACKENDS: u32 = 262_144;
/// Slots of both generations of every service.
pub const MAX_SLOTS: u32 = 2 * MAX_BACKENDS;
pub const MAX_NETNS: u32 = 65_536;
pub const MAX_REVNAT: u32 = 1 << 20;
pub const MAX_UDP_AFFINITY: u32 = 1 << 18;

/// `SN_SERVICES`: VIP → the service behind it. Written in one step (its `gen` and `count`
/// say which slots are live), so a reader sees a whole old or a whole new backend set.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Index of the service in `SN_RR` (0..MAX_SERVICES), given by the loader.
    pub id: u32,
    /// The VNI of the network the VIP belongs to: translated only for a socket whose network
    /// namespace is a task's on that network.
    pub vni: u32,
    /// Active backends in generation `gen`; 0: connect() fails with ECONNREFUSED.
    pub count: u32,
    /// Which generation of `SN_SLOTS` is live (0 or 1).
    pub gen: u32,
}

/// `SN_SLOTS` key: the `slot`th active backend of service `svc` in generation `gen`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotKey {
    pub svc: u32,
    pub gen: u32,
    pub slot: u32,
}

/// `SN_SLOTS` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slot {
    /// The task's address.
    pub ip: u32,
    /// Index of the backend in `SN_HANDED` and key in `SN_BACKENDS`.
    pub backend: u32,
}

pub const BACKEND_ACTIVE: u32 = 1;
pub const BACKEND_DRAINING: u32 = 2;

/// `SN_BACKENDS`: backend id → what `lb ls` shows and what a sticky UDP flow checks.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub ip: u32,
    /// `BACKEND_ACTIVE` or `BACKEND_DRAINING`.
    pub state: u32,
    /// The service's id.
    pub svc: u32,
}

/// `SN_NETNS` key: a task's network namespace (its cookie) on a network (its VNI).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetnsKey {
    pub cookie: u64,
    pub vni: u32,
    pub _pad: u32,
}

/// `SN_REVNAT` key: a socket (its cookie) and the backend address it was sent to;
/// `SN_UDP_AFF` key: a socket and the VIP:port it sends to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockKey {
    pub cookie: u64,
    pub ip: u32,
    pub port: u32,
}

/// `SN_REVNAT` value: what the application asked for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipPort {
    pub vip: u32,
    pub port: u32,
}

/// The routing mesh's entry program (issue 10, ADR 0015): its maps and program name.
pub const MAP_ING_CFG: &str = "SN_ING_CFG";
pub const MAP_ING_PORTS: &str = "SN_ING_PORTS";
pub const MAP_ING_SLOTS: &str = "SN_ING_SLOTS";
pub const MAP_ING_RR: &str = "SN_ING_RR";
pub const MAP_ING_FLOWS: &str = "SN_ING_FLOWS";
pub const MAP_ING_HANDED: &str = "SN_ING_HANDED";
pub const PROG_INGRESS: &str = "sn_ingress";

pub const MAX_ING_PORTS: u32 = 4_096;
pub const MAX_ING_SLOTS: u32 = 2 * 65_536;
pub const MAX_ING_FLOWS: u32 = 1 << 18;
pub const MAX_ING_HANDED: u32 = 65_536;

/// `SN_ING_CFG[0]`: where the node's entry program sends what it takes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngCfg {
    /// The node's underlay address (network order): only packets to it are taken, and it is
    /// the source of the VXLAN packets the program makes.
    pub vtep: u32,
    /// Index of the node's port into the ingress network (`sning0`): the way to a task on
    /// this node; 0: take nothing.
    pub ifindex: u32,
    /// Its MAC, the inner source of the frames put on the ingress network (bytes 0..4, 4..6).
    pub mac_hi: u32,
    pub mac_lo: u32,
    /// The ingress network's MTU: a bigger datagram is left to the kernel's path.
    pub mtu: u32,
    /// The ingress network's VNI and the cluster's VXLAN port (host order).
    pub vni: u32,
    pub vxlan_port: u32,
    /// Index of the underlay interface (the program's own): the way to another node's task.
    pub uplink: u32,
}

/// `SN_ING_PORTS` key: protocol (6, 17) and published port (host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct IngPortKey {
    pub proto: u32,
    pub port: u32,
}

/// `SN_ING_PORTS` value, replaced whole (count and generation together).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngPort {
    /// Index in `SN_ING_RR` and `svc` of its slots.
    pub id: u32,
    /// Active tasks in generation `gen`; 0: left to the kernel's path (which refuses).
    pub count: u32,
    pub gen: u32,
    pub _pad: u32,
}

/// `SN_ING_FLOWS` key: a client's flow to a published port of the node's underlay address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngFlowKey {
    pub saddr: u32,
    /// Source port << 16 | destination port (host order).
    pub ports: u32,
    pub proto: u32,
}

/// `SN_ING_SLOTS` value and the task of a flow: its ingress address and its node's
/// underlay address (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngTask {
    pub ip: u32,
    pub vtep: u32,
}

/// `SN_ING_FLOWS` value: the task the flow was given and when.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IngFlow {
    pub task: IngTask,
    /// TCP: the sequence number of the SYN that started the flow (a SYN with the same one is
    /// a retransmission).
    pub syn_seq: u32,
    /// TCP: 1 once the client sent a FIN or a RST on it: a new SYN from the same port may
    /// then start a new connection (with another task).
    pub closing: u32,
    /// `bpf_ktime_get_ns` of the pick (UDP: of the last datagram).
    pub ts: u64,
}

/// `SN_ING_HANDED` key: flows handed to task `ip` on published port `proto`/`port`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct IngHandKey {
    pub proto: u32,
    pub port: u32,
    pub ip: u32,
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: each type is #[repr(C)], Copy, made of u32/u64 fields with no implicit
    // padding, and every bit pattern is a valid value.
    unsafe impl aya::Pod for Service {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SlotKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Slot {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Backend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for NetnsKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for VipPort {}
    // SAFETY: as above.
    unsafe impl aya::Pod for IngCfg {}
    // SAFETY: as above.
    unsafe impl aya::Pod for IngPortKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for IngPort {}
    // SAFETY: as above.
    unsafe impl aya::Pod for IngFlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for IngFlow {}
    // SAFETY: as above.
    unsafe impl aya::Pod for IngTask {}
    // SAFETY: as above.
    unsafe impl aya::Pod for IngHandKey {}
}
