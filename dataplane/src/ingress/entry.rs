//! The routing mesh's entry program (ADR 0015): loads `sn_ingress` (embedded in this
//! binary), attaches it at tc ingress of the node's underlay interface (TCX), and writes
//! its maps. Maps and the link are pinned in the node's bpffs folder (`ingress-v1`, beside
//! the load balancer's), so flows keep going while the agent is down; a restarted agent
//! replaces the program in the pinned link (never a second copy) and reads its bookkeeping
//! back from the maps.
//!
//! A port's change is made visible in one step, as in the load balancer: its new task list
//! goes into the port's unused generation of slots, then the port's entry is replaced.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use crate::bpf_link::LinkTarget;
use crate::lb::ebpf::{be, map_err, prog_err, take, EbpfError};
use crate::lb::host::HostError;
use aya::maps::{Array, HashMap, MapData, MapError, PerCpuHashMap};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::SchedClassifierLink;
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use swarmnet_ebpf_common::*;
use tracing::info;

/// The program, built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/swarmnet-ingress"));

const MAPS: [&str; 6] = [MAP_ING_CFG, MAP_ING_PORTS, MAP_ING_SLOTS, MAP_ING_RR, MAP_ING_FLOWS, MAP_ING_HANDED];

/// Where the entry program sends what it takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EntryConfig {
    /// The node's underlay address: only packets to it are taken; the source of the VXLAN
    /// packets the program makes.
    pub vtep: Ipv4Addr,
    /// The underlay interface's index (the program's own).
    pub uplink_index: u32,
    /// The node's port into the ingress network (`sning0`): its index and MAC.
    pub port_index: u32,
    pub port_mac: [u8; 6],
    /// The ingress network's MTU, VNI, and the cluster's VXLAN port.
    pub mtu: u32,
    pub vni: u32,
    pub vxlan_port: u16,
}

/// What the agent knows of one port's entries.
#[derive(Clone, Debug, Default)]
struct PortSt {
    id: u32,
    gen: u32,
    /// Slots written, per generation.
    written: [u32; 2],
    /// The task list of the live generation (None: unknown, read back at start).
    live: Option<Vec<IngTask>>,
}

/// Detaches the entry program an earlier agent of this node pinned in `pins` (this one does
/// not use it: it would keep handing flows out from maps nothing updates). True if there was
/// one.
pub fn detach_pinned(pins: &Path) -> Result<bool, EbpfError> {
    let pin = pins.join(format!("link_{PROG_INGRESS}"));
    if !pin.exists() {
        return Ok(false);
    }
    let link = PinnedLink::from_pin(&pin).map_err(prog_err(PROG_INGRESS, "open pinned link"))?;
    // Unpinned, the link goes when its last descriptor (this one) closes.
    drop(link.unpin().map_err(prog_err(PROG_INGRESS, "unpin link"))?);
    Ok(true)
}

/// The entry program of this node and its maps.
pub struct Entry {
    cfg: Array<MapData, IngCfg>,
    ports: HashMap<MapData, IngPortKey, IngPort>,
    slots: HashMap<MapData, SlotKey, IngTask>,
    handed: PerCpuHashMap<MapData, IngHandKey, u64>,
    known: BTreeMap<IngPortKey, PortSt>,
    ids: BTreeSet<u32>,
    /// The interface it is attached to.
    pub iface: String,
    _ebpf: Ebpf,
}

impl Entry {
    /// Loads (or adopts) the program and its maps, pinned under `pins` (the node's
    /// `ingress-v1` folder), and attaches it at tc ingress of `iface`. A pinned link is
    /// adopted only if it is attached to `iface` now; one that is severed (its interface is
    /// gone) or attached to another interface is replaced. It takes nothing until
    /// [`Entry::configure`].
    pub fn open(pins: &Path, iface: &str) -> Result<Entry, EbpfError> {
        if OBJECT.is_empty() {
            return Err(EbpfError::NotBuilt);
        }
        let pins = pins.to_path_buf();
        let index = nix::net::if_::if_nametoindex(iface).map_err(|e| EbpfError::Other(format!("interface {iface}: {e}")))?;
        std::fs::create_dir_all(&pins).map_err(|source| HostError::Io { what: "create bpffs folder", path: pins.clone(), source })?;
        let mut loader = EbpfLoader::new();
        let paths: Vec<(&str, PathBuf)> = MAPS.iter().map(|m| (*m, pins.join(m))).collect();
        for (m, p) in &paths {
            loader.map_pin_path(m, p.as_path());
        }
        let mut ebpf = loader.load(OBJECT).map_err(|source| EbpfError::Load { pins: pins.clone(), source: Box::new(source) })?;
        let prog: &mut SchedClassifier =
            ebpf.program_mut(PROG_INGRESS).ok_or_else(|| EbpfError::Other(format!("program {PROG_INGRESS} is missing from the object")))?.try_into().map_err(prog_err(PROG_INGRESS, "type"))?;
        prog.load().map_err(prog_err(PROG_INGRESS, "load (verifier)"))?;
        let pin = pins.join(format!("link_{PROG_INGRESS}"));
        let replaced = match crate::bpf_link::pinned_target(&pin) {
            Ok(LinkTarget::Tcx(i)) if i == index => None,
            Ok(target) => {
                // Severed, or on an interface that is no longer the underlay: unpinned (it
                // detaches when this descriptor closes) and a new link is attached.
                let old = PinnedLink::from_pin(&pin).map_err(prog_err(PROG_INGRESS, "open pinned link"))?;
                drop(old.unpin().map_err(prog_err(PROG_INGRESS, "unpin the link it replaces"))?);
                Some(target)
            }
            Err(e) if pin.exists() => return Err(EbpfError::Program { prog: PROG_INGRESS, what: "read what the pinned link is attached to", source: Box::new(e) }),
            Err(_) => None,
        };
        if let Some(target) = replaced {
            info!(iface, ?target, "routing mesh: the pinned entry link was not attached to the underlay interface: replaced");
        }
        let adopted = match PinnedLink::from_pin(&pin) {
            Ok(old) => {
                // An earlier agent's link: this program replaces the one in it, atomically
                // (attaching again would stack a second copy).
                let link = SchedClassifierLink::try_from(FdLink::from(old)).map_err(prog_err(PROG_INGRESS, "adopt the pinned link"))?;
                let id = prog.attach_to_link(link).map_err(prog_err(PROG_INGRESS, "replace the program in the pinned link"))?;
                // The pin holds the link; this descriptor may go.
                drop(prog.take_link(id).map_err(prog_err(PROG_INGRESS, "take link"))?);
                true
            }
            Err(_) => {
                let id = prog.attach(iface, TcAttachType::Ingress).map_err(prog_err(PROG_INGRESS, "attach (tcx ingress)"))?;
                let link: FdLink = prog.take_link(id).map_err(prog_err(PROG_INGRESS, "take link"))?.try_into().map_err(prog_err(PROG_INGRESS, "link"))?;
                link.pin(&pin).map_err(prog_err(PROG_INGRESS, "pin link"))?;
                false
            }
        };
        let cfg_map = ebpf.take_map(MAP_ING_CFG).ok_or(EbpfError::NoMap(MAP_ING_CFG))?;
        let cfg = Array::try_from(cfg_map).map_err(map_err(MAP_ING_CFG, "open"))?;
        let ports = take::<IngPortKey, IngPort>(&mut ebpf, MAP_ING_PORTS)?;
        let slots = take::<SlotKey, IngTask>(&mut ebpf, MAP_ING_SLOTS)?;
        let handed_map = ebpf.take_map(MAP_ING_HANDED).ok_or(EbpfError::NoMap(MAP_ING_HANDED))?;
        let handed = PerCpuHashMap::try_from(handed_map).map_err(map_err(MAP_ING_HANDED, "open"))?;
        let mut e = Entry { cfg, ports, slots, handed, known: BTreeMap::new(), ids: BTreeSet::new(), iface: iface.to_string(), _ebpf: ebpf };
        e.recover()?;
        info!(iface, pins = %pins.display(), adopted, ports = e.known.len(), "routing mesh: eBPF entry program attached");
        Ok(e)
    }

    /// Rebuilds the bookkeeping from the maps (an earlier agent's work).
    fn recover(&mut self) -> Result<(), EbpfError> {
        let mut by_id: BTreeMap<u32, IngPortKey> = BTreeMap::new();
        for r in self.ports.iter() {
            let (k, p) = r.map_err(map_err(MAP_ING_PORTS, "read"))?;
            self.ids.insert(p.id);
            by_id.insert(p.id, k);
            self.known.insert(k, PortSt { id: p.id, gen: p.gen, written: [0, 0], live: None });
        }
        let mut orphans = Vec::new();
        for r in self.slots.keys() {
            let k = r.map_err(map_err(MAP_ING_SLOTS, "read"))?;
            match by_id.get(&k.svc).and_then(|pk| self.known.get_mut(pk)) {
                Some(s) => {
                    let g = (k.gen & 1) as usize;
                    s.written[g] = s.written[g].max(k.slot + 1);
                }
                None => orphans.push(k),
            }
        }
        for k in orphans {
            let _ = self.slots.remove(&k);
        }
        Ok(())
    }

    /// Where what the program takes goes (`None`: the node is not on the ingress network;
    /// nothing is taken).
    pub fn configure(&mut self, to: Option<&EntryConfig>) -> Result<(), EbpfError> {
        let c = match to {
            Some(t) => IngCfg {
                vtep: be(t.vtep),
                ifindex: t.port_index,
                mac_hi: u32::from_ne_bytes([t.port_mac[0], t.port_mac[1], t.port_mac[2], t.port_mac[3]]),
                mac_lo: u32::from_ne_bytes([t.port_mac[4], t.port_mac[5], 0, 0]),
                mtu: t.mtu,
                vni: t.vni,
                vxlan_port: u32::from(t.vxlan_port),
                uplink: t.uplink_index,
            },
            None => IngCfg::default(),
        };
        self.cfg.set(0, c, 0).map_err(map_err(MAP_ING_CFG, "write"))
    }

    /// Makes the maps hold exactly `want`: published port (ingress mode) → its active tasks
    /// (ingress address, node's underlay address), in order. A port not in `want` is left
    /// to the kernel's path.
    pub fn set(&mut self, want: &BTreeMap<IngPortKey, Vec<(Ipv4Addr, Ipv4Addr)>>) -> Result<(), EbpfError> {
        let gone: Vec<IngPortKey> = self.known.keys().filter(|k| !want.contains_key(k)).copied().collect();
        for k in gone {
            self.remove(&k)?;
        }
        for (k, tasks) in want {
            let ips: Vec<IngTask> = tasks.iter().map(|(ip, vtep)| IngTask { ip: be(*ip), vtep: be(*vtep) }).collect();
            let st = match self.known.get(k) {
                Some(s) => s.clone(),
                None => {
                    let id = (0..MAX_ING_PORTS).find(|i| !self.ids.contains(i)).ok_or(EbpfError::Full { what: "published ports", max: MAX_ING_PORTS })?;
                    PortSt { id, gen: 1, written: [0, 0], live: None }
                }
            };
            if st.live.as_ref() == Some(&ips) {
                continue;
            }
            let gen = 1 - (st.gen & 1);
            let g = gen as usize;
            let what = || format!("port {}/{}", k.port, if k.proto == 6 { "tcp" } else { "udp" });
            for (i, ip) in ips.iter().enumerate() {
                self.slots.insert(SlotKey { svc: st.id, gen, slot: i as u32 }, *ip, 0).map_err(map_err(MAP_ING_SLOTS, what()))?;
            }
            self.ports.insert(*k, IngPort { id: st.id, count: ips.len() as u32, gen, _pad: 0 }, 0).map_err(map_err(MAP_ING_PORTS, what()))?;
            // Slots past the new count in this generation belonged to an older list.
            for i in ips.len() as u32..st.written[g] {
                let _ = self.slots.remove(&SlotKey { svc: st.id, gen, slot: i });
            }
            let mut written = st.written;
            written[g] = ips.len() as u32;
            self.ids.insert(st.id);
            self.known.insert(*k, PortSt { id: st.id, gen, written, live: Some(ips) });
        }
        Ok(())
    }

    fn remove(&mut self, k: &IngPortKey) -> Result<(), EbpfError> {
        let Some(st) = self.known.remove(k) else { return Ok(()) };
        match self.ports.remove(k) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(MAP_ING_PORTS, "remove")(e)),
        }
        for g in 0..2u32 {
            for i in 0..st.written[g as usize] {
                let _ = self.slots.remove(&SlotKey { svc: st.id, gen: g, slot: i });
            }
        }
        self.ids.remove(&st.id);
        Ok(())
    }

    /// Flows handed to each task by this program, summed over CPUs.
    pub fn handed(&self) -> Result<BTreeMap<IngHandKey, u64>, EbpfError> {
        let mut out = BTreeMap::new();
        for r in self.handed.iter() {
            let (k, v) = r.map_err(map_err(MAP_ING_HANDED, "read"))?;
            out.insert(k, v.iter().sum());
        }
        Ok(out)
    }
}
