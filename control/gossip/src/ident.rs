//! A node's identity, held once per process.
//!
//! Every node keeps each member's identity in several places: foca's member list, the live
//! members, the membership records, the timers. With a copy of the name and address in each,
//! identities were about half of a node's memory per member (issue 23). An [`Ident`] is a
//! pointer to one shared, immutable value: decoding an identity from the wire looks it up in
//! the process's table of identities (interning) and shares the one already held.
//!
//! The table keeps a strong reference to each identity and drops those nobody else holds
//! once it has doubled since it last did so: what it holds is bounded by twice the live
//! identities (plus a constant), whatever peers send.

use std::borrow::Borrow;
use std::collections::HashSet;
use std::fmt;
use std::hash::Hash;
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::table::NodeId;

/// What an identity is: the node, where it listens, and its generation (a restarted node
/// has a higher one).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct IdentParts {
    pub node: NodeId,
    pub addr: SocketAddr,
    pub gen: u64,
}

/// A node as the membership layer knows it (see the module's documentation). Compares,
/// orders and hashes by its parts; on the wire it is its parts.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ident(Arc<IdentParts>);

impl Ident {
    pub fn new(node: impl Into<NodeId>, addr: SocketAddr, gen: u64) -> Ident {
        intern(IdentParts { node: node.into(), addr, gen })
    }

    /// The same node and address under another generation.
    pub fn with_gen(&self, gen: u64) -> Ident {
        intern(IdentParts { gen, ..(*self.0).clone() })
    }
}

impl Deref for Ident {
    type Target = IdentParts;

    fn deref(&self) -> &IdentParts {
        &self.0
    }
}

impl fmt::Debug for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for Ident {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Ident {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Ident, D::Error> {
        IdentParts::deserialize(d).map(intern)
    }
}

/// A process's table of shared values.
struct Interned<T: ?Sized> {
    set: Option<HashSet<Arc<T>>>,
    /// How many it held after it last dropped the unused ones.
    kept: usize,
}

impl<T: ?Sized + Eq + Hash> Interned<T> {
    const fn new() -> Self {
        Interned { set: None, kept: 0 }
    }

    /// The shared value equal to `q`, made by `make` if none is held.
    fn get<Q: ?Sized + Eq + Hash>(&mut self, q: &Q, make: impl FnOnce() -> Arc<T>) -> Arc<T>
    where
        Arc<T>: Borrow<Q>,
    {
        let set = self.set.get_or_insert_with(HashSet::new);
        if let Some(held) = set.get(q) {
            return held.clone();
        }
        if set.len() >= PRUNE_FLOOR.max(2 * self.kept) {
            set.retain(|a| Arc::strong_count(a) > 1);
            self.kept = set.len();
        }
        let a = make();
        set.insert(a.clone());
        a
    }
}

static IDENTS: Mutex<Interned<IdentParts>> = Mutex::new(Interned::new());
static NAMES: Mutex<Interned<str>> = Mutex::new(Interned::new());

/// Below this many, a table is not pruned.
const PRUNE_FLOOR: usize = 1024;

fn intern(parts: IdentParts) -> Ident {
    // The table's contents stay valid whatever a panicking holder left half done.
    let mut t = IDENTS.lock().unwrap_or_else(|p| p.into_inner());
    Ident(t.get(&parts, || Arc::new(parts.clone())))
}

/// A node's name, held once per process: the maps keyed by node (membership records, the
/// table's generations) share it rather than each holding a copy.
pub fn name(node: &str) -> Arc<str> {
    let mut t = NAMES.lock().unwrap_or_else(|p| p.into_inner());
    t.get(node, || Arc::from(node))
}

/// Identities and names the process holds in its tables, and about how many bytes they take
/// (what a node holds once per member: the simulator's nodes share the tables).
pub fn interned() -> (usize, usize) {
    let (mut n, mut bytes) = (0, 0);
    let slot = std::mem::size_of::<usize>() * 2 + 1;
    if let Some(set) = IDENTS.lock().unwrap_or_else(|p| p.into_inner()).set.as_ref() {
        // The shared value with its two counts, the name's bytes, and the table's slot.
        n += set.len();
        bytes += set.capacity() * slot + set.iter().map(|a| std::mem::size_of::<IdentParts>() + 16 + a.node.len()).sum::<usize>();
    }
    if let Some(set) = NAMES.lock().unwrap_or_else(|p| p.into_inner()).set.as_ref() {
        bytes += set.capacity() * slot + set.iter().map(|a| 16 + a.len()).sum::<usize>();
    }
    (n, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_identities_share_one_value_and_the_wire_form_is_the_parts() {
        let addr: SocketAddr = "10.1.2.3:7946".parse().expect("addr");
        let a = Ident::new("intern-a", addr, 3);
        let b = Ident::new("intern-a".to_string(), addr, 3);
        assert!(Arc::ptr_eq(&a.0, &b.0));
        assert_eq!(a, b);
        assert_ne!(a, a.with_gen(4));
        assert_eq!(a.with_gen(4).gen, 4);
        let wire = postcard::to_allocvec(&a).expect("encode");
        assert_eq!(wire, postcard::to_allocvec(&IdentParts { node: "intern-a".into(), addr, gen: 3 }).expect("encode"));
        let back: Ident = postcard::from_bytes(&wire).expect("decode");
        assert!(Arc::ptr_eq(&back.0, &a.0), "decoding shares the identity held");
    }

    #[test]
    fn identities_nobody_holds_are_dropped_from_the_table() {
        let addr: SocketAddr = "10.1.2.4:7946".parse().expect("addr");
        let kept = Ident::new("intern-kept", addr, 1);
        // Far more distinct identities than the floor, none kept.
        for g in 0..(4 * PRUNE_FLOOR as u64) {
            drop(Ident::new("intern-gone", addr, g));
        }
        let (n, _) = interned();
        // Other tests in this process may hold some; the dropped ones are bounded.
        assert!(n < 3 * PRUNE_FLOOR + 64, "the table holds {n}");
        let again = Ident::new("intern-kept", addr, 1);
        assert!(Arc::ptr_eq(&kept.0, &again.0), "a held identity stays shared");
    }
}
