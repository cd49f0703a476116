//! The eBPF backend: loads the programs of `ebpf/programs` (embedded in this binary),
//! attaches them to the root of cgroup2, and writes the maps. Maps and links are pinned in the
//! node's bpffs folder, so translation goes on while the agent is down, and a restarted
//! agent adopts them: the links found pinned are never attached again, and the bookkeeping
//! (ids, generations) is read back from the maps.
//!
//! A service change is made visible in one step: the new backend set is written into the
//! service's unused generation of slots, then the service's entry is replaced (count and
//! generation together); readers see the whole old or the whole new set. The cost is the
//! service's own backends, whatever the number of services.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use aya::maps::{HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use aya::{Ebpf, EbpfLoader};
use swarmnet_ebpf_common::*;
use swarmnet_types::{SinkError, TaskId};
use tracing::{info, warn};

use super::host::{Host, HostError};
use super::{BackendRow, BackendState, Kind, LbBackend, ServiceLb, ServiceRow};
use crate::bpf_link::LinkTarget;
use crate::netns::NsWorker;

/// The programs, built by `build.rs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/swarmnet-lb"));

const MAPS: [&str; 8] = [MAP_SERVICES, MAP_SLOTS, MAP_BACKENDS, MAP_NETNS, MAP_RR, MAP_HANDED, MAP_REVNAT, MAP_UDP_AFFINITY];
const PROGRAMS: [&str; 4] = [PROG_CONNECT4, PROG_SENDMSG4, PROG_RECVMSG4, PROG_GETPEERNAME4];

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("this binary was built without the eBPF programs (AYA_BUILD_SKIP)")]
    NotBuilt,
    #[error("another swarmnet agent holds the load balancer of this node ({0})")]
    Locked(PathBuf),
    #[error("load balancer lock {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("load the eBPF object (maps pinned in {pins}): {source}")]
    Load {
        pins: PathBuf,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("program {prog}: {what}: {source}")]
    Program {
        prog: &'static str,
        what: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("map {map}: {what}: {source}")]
    Map {
        map: &'static str,
        what: String,
        #[source]
        source: Box<MapError>,
    },
    #[error("map {0} is missing from the object")]
    NoMap(&'static str),
    #[error("{what}: all {max} ids are in use")]
    Full { what: &'static str, max: u32 },
    #[error(transparent)]
    Host(#[from] super::host::HostError),
    #[error("{0}")]
    Other(String),
}

pub(crate) fn map_err(map: &'static str, what: impl Into<String>) -> impl FnOnce(MapError) -> EbpfError {
    let what = what.into();
    move |source| EbpfError::Map { map, what, source: Box::new(source) }
}

pub(crate) fn prog_err<E: std::error::Error + Send + Sync + 'static>(prog: &'static str, what: &'static str) -> impl FnOnce(E) -> EbpfError {
    move |e| EbpfError::Program { prog, what, source: Box::new(e) }
}

pub(crate) fn be(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

fn ip_of(v: u32) -> Ipv4Addr {
    Ipv4Addr::from(v.to_ne_bytes())
}

/// Ids in 0..max, the lowest free one after a cursor (amortised O(1)).
#[derive(Default)]
struct Ids {
    used: BTreeSet<u32>,
    next: u32,
}

impl Ids {
    fn alloc(&mut self, what: &'static str, max: u32) -> Result<u32, EbpfError> {
        for k in 0..max {
            let id = (self.next + k) % max;
            if self.used.insert(id) {
                self.next = (id + 1) % max;
                return Ok(id);
            }
        }
        Err(EbpfError::Full { what, max })
    }

    fn free(&mut self, id: u32) {
        self.used.remove(&id);
    }
}

/// What the agent knows of one VIP's entries (read back from the maps at start).
#[derive(Clone, Debug, Default)]
struct Svc {
    id: u32,
    gen: u32,
    /// Slots written, per generation.
    written: [u32; 2],
    /// Backend address → backend id.
    backends: BTreeMap<u32, u32>,
}

struct TaskNs {
    cookie: u64,
    netns: File,
    vnis: Vec<u32>,
}

struct Inner {
    services: HashMap<MapData, u32, Service>,
    slots: HashMap<MapData, SlotKey, Slot>,
    backends: HashMap<MapData, u32, Backend>,
    netns: HashMap<MapData, NetnsKey, u32>,
    handed: PerCpuArray<MapData, u64>,
    svc: BTreeMap<u32, Svc>,
    svc_ids: Ids,
    backend_ids: Ids,
    /// Task → its namespace (cookie, a handle on it) and its networks' VNIs, as added by
    /// this agent.
    tasks: BTreeMap<TaskId, TaskNs>,
    zeros: usize,
}

pub struct EbpfLb {
    inner: Arc<Mutex<Inner>>,
    ns: NsWorker,
    /// Links this one replaced that still work, kept attached until the node's tasks have
    /// moved to its cgroup.
    retired: Mutex<Vec<FdLink>>,
    /// Held for the agent's life: one agent per node programs its load balancer.
    _lock: File,
    /// Loaded programs; their links are pinned.
    _ebpf: Mutex<Ebpf>,
}

fn lock(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    inner.lock().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn take<K: aya::Pod, V: aya::Pod>(ebpf: &mut Ebpf, name: &'static str) -> Result<HashMap<MapData, K, V>, EbpfError> {
    let m = ebpf.take_map(name).ok_or(EbpfError::NoMap(name))?;
    HashMap::try_from(m).map_err(map_err(name, "open"))
}

fn lock_file(path: &Path) -> Result<File, EbpfError> {
    let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path).map_err(|source| EbpfError::Lock { path: path.into(), source })?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(EbpfError::Locked(path.into()));
        }
        return Err(EbpfError::Lock { path: path.into(), source: e });
    }
    Ok(f)
}

/// Detaches the programs an earlier agent attached and pinned for this node (it used eBPF;
/// this one does not: stale programs would translate before nftables sees the VIP). Returns
/// how many links went.
pub fn detach_pinned(host: &Host) -> Result<usize, EbpfError> {
    let mut n = 0;
    for prog in PROGRAMS {
        let pin = host.pins.join(format!("link_{prog}"));
        if !pin.exists() {
            continue;
        }
        let link = PinnedLink::from_pin(&pin).map_err(prog_err(prog, "open pinned link"))?;
        // Unpinned, the link goes when its last descriptor (this one) closes.
        let fd = link.unpin().map_err(prog_err(prog, "unpin link"))?;
        drop(fd);
        n += 1;
    }
    Ok(n)
}

impl EbpfLb {
    /// Loads (or adopts) the programs and maps of this node. `lock` is a file of the node's
    /// data dir held for the agent's life.
    pub fn open(host: &Host, ns: NsWorker, lock: &Path) -> Result<EbpfLb, EbpfError> {
        if OBJECT.is_empty() {
            return Err(EbpfError::NotBuilt);
        }
        let lock = lock_file(lock)?;
        let mut loader = EbpfLoader::new();
        let paths: Vec<(&str, PathBuf)> = MAPS.iter().map(|m| (*m, host.pins.join(m))).collect();
        for (m, p) in &paths {
            loader.map_pin_path(m, p.as_path());
        }
        let mut ebpf = loader.load(OBJECT).map_err(|source| EbpfError::Load { pins: host.pins.clone(), source: Box::new(source) })?;
        let cgroup = host.attach_dir()?;
        let cgroup_id = crate::bpf_link::cgroup_id(&host.attach_to).map_err(|source| HostError::Io { what: "read the id of cgroup", path: host.attach_to.clone(), source })?;
        let node_cgroup = crate::bpf_link::cgroup_id(&host.cgroup).ok();
        let (mut adopted, mut replaced) = (0, 0);
        let mut retired = Vec::new();
        // Links of an agent before issue 22 on the node's own cgroup: detached once the new
        // ones are attached (until then both translate, and the second finds nothing to do).
        let mut superseded = Vec::new();
        for prog in PROGRAMS {
            let pin = host.pins.join(format!("link_{prog}"));
            let replacing = match crate::bpf_link::pinned_target(&pin) {
                // Attached where this agent attaches by an earlier agent and still pinned:
                // attaching again would stack a second copy.
                Ok(LinkTarget::Cgroup(id)) if id == cgroup_id => {
                    adopted += 1;
                    continue;
                }
                // Pinned but attached elsewhere (the node's own cgroup, where agents before
                // issue 22 attached; the cgroup of the layout before issue 19, whose tasks
                // move into the node's next) or severed (its cgroup is gone): a new link
                // replaces it, attached and pinned before the old one is unpinned (a failure
                // on the way leaves the old one working). An old one that still works stays
                // attached until its tasks have moved (`release_retired`).
                Ok(target) => Some(target),
                Err(e) if pin.exists() => return Err(EbpfError::Program { prog, what: "read what the pinned link is attached to", source: Box::new(e) }),
                Err(_) => None,
            };
            let p: &mut CgroupSockAddr = ebpf.program_mut(prog).ok_or_else(|| EbpfError::Other(format!("program {prog} is missing from the object")))?.try_into().map_err(prog_err(prog, "type"))?;
            p.load().map_err(prog_err(prog, "load (verifier)"))?;
            // A link (no flags: the kernel refuses any with one) sits beside other links
            // there (another node's on this kernel, a lab's, any other software's): each
            // program acts only for the namespaces in its own map.
            let id = p.attach(&cgroup, CgroupAttachMode::Single).map_err(prog_err(prog, "attach"))?;
            let link: FdLink = p.take_link(id).map_err(prog_err(prog, "take link"))?.try_into().map_err(prog_err(prog, "link"))?;
            let Some(target) = replacing else {
                link.pin(&pin).map_err(prog_err(prog, "pin link"))?;
                continue;
            };
            // (bpffs refuses a '.' in a name.)
            let fresh = host.pins.join(format!("link_{prog}_new"));
            let _ = std::fs::remove_file(&fresh);
            let fresh_link = link.pin(&fresh).map_err(prog_err(prog, "pin link"))?;
            let old = match PinnedLink::from_pin(&pin).map_err(prog_err(prog, "open pinned link")).and_then(|l| l.unpin().map_err(prog_err(prog, "unpin the link it replaces"))) {
                Ok(old) => old,
                Err(e) => {
                    // The new one goes (its pin removed, its last descriptor closed).
                    let _ = std::fs::remove_file(&fresh);
                    drop(fresh_link);
                    return Err(e);
                }
            };
            std::fs::rename(&fresh, &pin).map_err(|e| EbpfError::Other(format!("program {prog}: rename {} to {}: {e}", fresh.display(), pin.display())))?;
            info!(program = prog, ?target, cgroup = %host.attach_to.display(), "load balancer: a pinned link attached elsewhere is replaced");
            if matches!(target, LinkTarget::Cgroup(id) if Some(id) == node_cgroup) {
                superseded.push(old);
            } else if !target.severed() {
                retired.push(old);
            }
            replaced += 1;
        }
        drop(superseded);
        let services = take::<u32, Service>(&mut ebpf, MAP_SERVICES)?;
        let slots = take::<SlotKey, Slot>(&mut ebpf, MAP_SLOTS)?;
        let backends = take::<u32, Backend>(&mut ebpf, MAP_BACKENDS)?;
        let netns = take::<NetnsKey, u32>(&mut ebpf, MAP_NETNS)?;
        let handed_map: Map = ebpf.take_map(MAP_HANDED).ok_or(EbpfError::NoMap(MAP_HANDED))?;
        let handed = PerCpuArray::try_from(handed_map).map_err(map_err(MAP_HANDED, "open"))?;
        let zeros = aya::util::nr_cpus().map_err(|(what, e)| EbpfError::Other(format!("{what}: {e}")))?;
        let mut inner = Inner { services, slots, backends, netns, handed, svc: BTreeMap::new(), svc_ids: Ids::default(), backend_ids: Ids::default(), tasks: BTreeMap::new(), zeros };
        inner.recover()?;
        info!(cgroup = %host.attach_to.display(), pins = %host.pins.display(), programs_adopted = adopted, links_replaced = replaced, vips = inner.svc.len(), "load balancer: eBPF programs attached");
        Ok(EbpfLb { inner: Arc::new(Mutex::new(inner)), ns, retired: Mutex::new(retired), _lock: lock, _ebpf: Mutex::new(ebpf) })
    }

    /// Detaches the links this one replaced (attached to the cgroup of the layout before
    /// issue 19): called once the node's tasks have moved out of it. Returns how many went.
    pub fn release_retired(&self) -> usize {
        let mut r = self.retired.lock().unwrap_or_else(|p| p.into_inner());
        let n = r.len();
        // Unpinned, a link goes when its last descriptor (this one) closes.
        r.clear();
        n
    }

    /// A connected UDP socket still points at a task that left the VIP: close it, so the
    /// application sees an error instead of sending into nothing (a new socket is steered to
    /// a task that is there).
    async fn close_udp(&self, vip: Ipv4Addr, vni: u32, gone: Vec<Ipv4Addr>) -> Result<(), SinkError> {
        if gone.is_empty() {
            return Ok(());
        }
        let spaces = self.blocking(move |i| Ok(i.netns_on(vni))).await?;
        for ns in spaces {
            for ip in &gone {
                let ip = *ip;
                let f = ns.try_clone()?;
                match self.ns.run(move |ctx| ctx.destroy_udp_to(&f, ip)).await {
                    Ok(Ok(0)) => {}
                    Ok(Ok(n)) => info!(vip = %vip, backend = %ip, sockets = n, "load balancer: closed UDP sockets connected to a task that left"),
                    Ok(Err(e)) => warn!(vip = %vip, backend = %ip, error = %e, "load balancer: could not close UDP sockets connected to a task that left"),
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    async fn blocking<R: Send + 'static>(&self, f: impl FnOnce(&mut Inner) -> Result<R, EbpfError> + Send + 'static) -> Result<R, SinkError> {
        let inner = self.inner.clone();
        let r = tokio::task::spawn_blocking(move || f(&mut lock(&inner))).await.map_err(|e| format!("load balancer worker: {e}"))?;
        Ok(r?)
    }
}

impl Inner {
    /// Rebuilds the bookkeeping from what the maps hold (an earlier agent's work).
    fn recover(&mut self) -> Result<(), EbpfError> {
        let mut by_id: BTreeMap<u32, u32> = BTreeMap::new();
        for r in self.services.iter() {
            let (vip, s) = r.map_err(map_err(MAP_SERVICES, "read"))?;
            self.svc_ids.used.insert(s.id);
            by_id.insert(s.id, vip);
            self.svc.insert(vip, Svc { id: s.id, gen: s.gen, ..Default::default() });
        }
        // Slots and backends of a service that never got its entry (an agent killed while it
        // programmed a new VIP) are deleted: their ids would otherwise stay taken, and come
        // back under an unrelated VIP once its service id is reused.
        let mut orphan_slots = Vec::new();
        for r in self.slots.keys() {
            let k = r.map_err(map_err(MAP_SLOTS, "read"))?;
            match by_id.get(&k.svc).and_then(|vip| self.svc.get_mut(vip)) {
                Some(s) => {
                    let g = (k.gen & 1) as usize;
                    s.written[g] = s.written[g].max(k.slot + 1);
                }
                None => orphan_slots.push(k),
            }
        }
        let mut orphan_backends = Vec::new();
        for r in self.backends.iter() {
            let (id, b) = r.map_err(map_err(MAP_BACKENDS, "read"))?;
            match by_id.get(&b.svc).and_then(|vip| self.svc.get_mut(vip)) {
                Some(s) => {
                    self.backend_ids.used.insert(id);
                    s.backends.insert(b.ip, id);
                }
                None => orphan_backends.push(id),
            }
        }
        for k in &orphan_slots {
            let _ = self.slots.remove(k);
        }
        for id in orphan_backends {
            self.free_backend(id);
        }
        Ok(())
    }

    /// Programs `svc`; returns the backend addresses it no longer has. Ids are taken first,
    /// all or nothing: a service that cannot get them (a full map) changes nothing, and its
    /// old set stays live.
    fn set(&mut self, svc: &ServiceLb) -> Result<Vec<Ipv4Addr>, EbpfError> {
        let vip = be(svc.vip);
        let (st, new_service) = match self.svc.get(&vip) {
            Some(s) => (s.clone(), false),
            None => (Svc { id: self.svc_ids.alloc("services", MAX_SERVICES)?, gen: 1, ..Default::default() }, true),
        };
        let mut fresh = Vec::new();
        let mut ids: BTreeMap<u32, u32> = BTreeMap::new();
        for b in &svc.backends {
            let ip = be(b.ip);
            let id = match st.backends.get(&ip) {
                Some(id) => *id,
                // A free id's counter is 0 (reset when it was freed).
                None => match self.backend_ids.alloc("backends", MAX_BACKENDS) {
                    Ok(id) => {
                        fresh.push(id);
                        id
                    }
                    Err(e) => {
                        // Nothing was written for them: only the ids go back.
                        for id in &fresh {
                            self.backend_ids.free(*id);
                        }
                        if new_service {
                            self.svc_ids.free(st.id);
                        }
                        return Err(e);
                    }
                },
            };
            ids.insert(ip, id);
        }
        match self.write(svc, st, ids) {
            Ok(gone) => Ok(gone),
            Err((st_id, e)) => {
                self.undo(new_service.then_some(st_id), &fresh);
                Err(e)
            }
        }
    }

    /// Gives back what a failed write took.
    fn undo(&mut self, service: Option<u32>, backends: &[u32]) {
        for id in backends {
            self.free_backend(*id);
        }
        if let Some(id) = service {
            self.svc_ids.free(id);
        }
    }

    /// Writes a service whose ids are taken: backends, the new generation's slots, then the
    /// service entry (the one step), then what is left over.
    fn write(&mut self, svc: &ServiceLb, mut st: Svc, ids: BTreeMap<u32, u32>) -> Result<Vec<Ipv4Addr>, (u32, EbpfError)> {
        let vip = be(svc.vip);
        let fail = |e: EbpfError| (st.id, e);
        let state_of = |b: &super::BackendLb| match b.state {
            BackendState::Active => BACKEND_ACTIVE,
            BackendState::Draining => BACKEND_DRAINING,
        };
        // New backends' entries first (nothing reads them before the flip); existing ones
        // change state only after it, so a failure leaves them as the live set has them.
        for b in svc.backends.iter().filter(|b| !st.backends.contains_key(&be(b.ip))) {
            let ip = be(b.ip);
            self.backends.insert(ids[&ip], Backend { ip, state: state_of(b), svc: st.id }, 0).map_err(map_err(MAP_BACKENDS, format!("write backend {}", b.ip))).map_err(fail)?;
        }
        let active: Vec<(u32, u32)> = svc.backends.iter().filter(|b| b.state == BackendState::Active).map(|b| (be(b.ip), ids[&be(b.ip)])).collect();
        let gen = st.gen ^ 1;
        let count = u32::try_from(active.len()).map_err(|_| fail(EbpfError::Full { what: "slots of one service", max: u32::MAX }))?;
        for (i, (ip, id)) in (0u32..).zip(&active) {
            if let Err(e) = self.slots.insert(SlotKey { svc: st.id, gen, slot: i }, Slot { ip: *ip, backend: *id }, 0) {
                // What was written of this generation is deleted by the next change.
                st.written[gen as usize] = st.written[gen as usize].max(i);
                self.svc.entry(vip).and_modify(|s| s.written = st.written);
                return Err(fail(map_err(MAP_SLOTS, format!("write slot {i} of {}", svc.vip))(e)));
            }
        }
        // The one step: the new set becomes visible.
        self.services.insert(vip, Service { id: st.id, vni: svc.vni, count, gen }, 0).map_err(map_err(MAP_SERVICES, format!("write {}", svc.vip))).map_err(fail)?;
        for b in svc.backends.iter().filter(|b| st.backends.contains_key(&be(b.ip))) {
            let ip = be(b.ip);
            let _ = self.backends.insert(ids[&ip], Backend { ip, state: state_of(b), svc: st.id }, 0);
        }
        for i in count..st.written[gen as usize] {
            let _ = self.slots.remove(&SlotKey { svc: st.id, gen, slot: i });
        }
        st.written[gen as usize] = count;
        st.gen = gen;
        let mut gone = Vec::new();
        for (ip, id) in std::mem::take(&mut st.backends) {
            if !ids.contains_key(&ip) {
                self.free_backend(id);
                gone.push(ip_of(ip));
            }
        }
        st.backends = ids;
        self.svc.insert(vip, st);
        Ok(gone)
    }

    /// Forgets a backend; its counter goes back to 0 for whoever gets the id next.
    fn free_backend(&mut self, id: u32) {
        let _ = self.backends.remove(&id);
        if let Ok(zero) = PerCpuValues::try_from(vec![0u64; self.zeros]) {
            let _ = self.handed.set(id, zero, 0);
        }
        self.backend_ids.free(id);
    }

    /// Handles on the namespaces of this node's tasks on network `vni`.
    fn netns_on(&self, vni: u32) -> Vec<File> {
        self.tasks.values().filter(|t| t.vnis.contains(&vni)).filter_map(|t| t.netns.try_clone().ok()).collect()
    }

    /// Removes the VIP; returns its network's VNI and the backend addresses it had.
    fn remove(&mut self, vip: Ipv4Addr) -> Result<(u32, Vec<Ipv4Addr>), EbpfError> {
        let key = be(vip);
        let vni = self.services.get(&key, 0).map(|s| s.vni).unwrap_or(0);
        match self.services.remove(&key) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(MAP_SERVICES, format!("remove {vip}"))(e)),
        }
        if let Some(st) = self.svc.remove(&key) {
            for gen in 0..2u32 {
                for i in 0..st.written[gen as usize] {
                    let _ = self.slots.remove(&SlotKey { svc: st.id, gen, slot: i });
                }
            }
            for id in st.backends.values() {
                self.free_backend(*id);
            }
            self.svc_ids.free(st.id);
            return Ok((vni, st.backends.keys().map(|ip| ip_of(*ip)).collect()));
        }
        Ok((vni, Vec::new()))
    }

    fn read(&self) -> Result<Vec<ServiceRow>, EbpfError> {
        let mut rows: BTreeMap<u32, ServiceRow> = BTreeMap::new();
        let mut by_id: BTreeMap<u32, u32> = BTreeMap::new();
        for r in self.services.iter() {
            let (vip, s) = r.map_err(map_err(MAP_SERVICES, "read"))?;
            by_id.insert(s.id, vip);
            rows.insert(vip, ServiceRow { vip: ip_of(vip), vni: s.vni, backends: Vec::new() });
        }
        for r in self.backends.iter() {
            let (id, b) = r.map_err(map_err(MAP_BACKENDS, "read"))?;
            let Some(row) = by_id.get(&b.svc).and_then(|vip| rows.get_mut(vip)) else { continue };
            let connections = self.handed.get(&id, 0).map(|v| v.iter().sum()).unwrap_or(0);
            let state = if b.state == BACKEND_ACTIVE { BackendState::Active } else { BackendState::Draining };
            row.backends.push(BackendRow { ip: ip_of(b.ip), state, connections });
        }
        let mut out: Vec<ServiceRow> = rows.into_values().collect();
        for r in &mut out {
            r.backends.sort_by_key(|b| b.ip);
        }
        Ok(out)
    }
}

#[async_trait::async_trait]
impl LbBackend for EbpfLb {
    fn kind(&self) -> Kind {
        Kind::Ebpf
    }

    async fn set(&self, svcs: &[ServiceLb]) -> Vec<Result<(), SinkError>> {
        let batch = svcs.to_vec();
        let n = batch.len();
        let done = match self.blocking(move |i| Ok(batch.iter().map(|s| i.set(s)).collect::<Vec<_>>())).await {
            Ok(d) => d,
            Err(e) => return (0..n).map(|_| Err(e.to_string().into())).collect(),
        };
        let mut out = Vec::with_capacity(n);
        for (svc, r) in svcs.iter().zip(done) {
            out.push(match r {
                Ok(gone) => self.close_udp(svc.vip, svc.vni, gone).await,
                Err(e) => Err(e.into()),
            });
        }
        out
    }

    async fn remove(&self, vips: &[Ipv4Addr]) -> Vec<Result<(), SinkError>> {
        let batch = vips.to_vec();
        let n = batch.len();
        let done = match self.blocking(move |i| Ok(batch.iter().map(|v| i.remove(*v)).collect::<Vec<_>>())).await {
            Ok(d) => d,
            Err(e) => return (0..n).map(|_| Err(e.to_string().into())).collect(),
        };
        let mut out = Vec::with_capacity(n);
        for (vip, r) in vips.iter().zip(done) {
            out.push(match r {
                Ok((vni, gone)) => self.close_udp(*vip, vni, gone).await,
                Err(e) => Err(e.into()),
            });
        }
        out
    }

    async fn read(&self) -> Result<Vec<ServiceRow>, SinkError> {
        self.blocking(|i| i.read()).await
    }

    async fn add_task(&self, task: &TaskId, netns: &File, vnis: &[u32]) -> Result<(), SinkError> {
        let f = netns.try_clone()?;
        let handle = netns.try_clone()?;
        let cookie = self.ns.run(move |ctx| ctx.netns_cookie(&f)).await??;
        let (task, vnis) = (task.clone(), vnis.to_vec());
        self.blocking(move |i| {
            for vni in &vnis {
                i.netns.insert(NetnsKey { cookie, vni: *vni, _pad: 0 }, 1, 0).map_err(map_err(MAP_NETNS, format!("add task {task} on vni {vni}")))?;
            }
            i.tasks.insert(task, TaskNs { cookie, netns: handle, vnis });
            Ok(())
        })
        .await
    }

    async fn remove_task(&self, task: &TaskId, netns: Option<&File>, vnis: &[u32]) -> Result<(), SinkError> {
        let t = task.clone();
        let known = self.blocking(move |i| Ok(i.tasks.remove(&t))).await?;
        let (cookie, vnis) = match (known, netns) {
            (Some(k), _) => (k.cookie, k.vnis),
            (None, Some(f)) => {
                let f = f.try_clone()?;
                (self.ns.run(move |ctx| ctx.netns_cookie(&f)).await??, vnis.to_vec())
            }
            (None, None) => return Ok(()),
        };
        self.blocking(move |i| {
            for vni in vnis {
                let _ = i.netns.remove(&NetnsKey { cookie, vni, _pad: 0 });
            }
            Ok(())
        })
        .await
    }
}
