//! nftables and conntrack without text or binaries (issue 19, ADR 0021), in namespaces of
//! their own: a typed transaction applies all or nothing, in the namespace it names and no
//! other; a VIP's UDP flows to one task are deleted over ctnetlink, the others' stay.

use std::fs::File;

use anyhow::{bail, Context, Result};
use swarmnet_dataplane::nft::{self, NfChainType, NfFamily, NfHook, SetItem, Statement, Tx};
use swarmnet_lab::{in_ns, require_root};

/// A network namespace of the test's own, removed when dropped.
struct Ns(String);

impl Ns {
    fn new(name: &str) -> Result<Ns> {
        require_root()?;
        let _ = std::process::Command::new("ip").args(["netns", "del", name]).output();
        let st = std::process::Command::new("ip").args(["netns", "add", name]).status()?;
        if !st.success() {
            bail!("ip netns add {name} failed");
        }
        in_ns(name, &["ip", "link", "set", "lo", "up"])?;
        Ok(Ns(name.to_string()))
    }

    fn file(&self) -> Result<File> {
        File::open(format!("/run/netns/{}", self.0)).with_context(|| format!("open namespace {}", self.0))
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

fn rt() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

#[test]
fn a_transaction_is_all_or_nothing_in_the_namespace_it_names() -> Result<()> {
    let ns = Ns::new("snx-nft-tx")?;
    let f = ns.file()?;
    let rt = rt()?;
    let mut tx = Tx::new();
    tx.replace_table(NfFamily::IP, "snx-nft");
    tx.add(nft::base_chain(NfFamily::IP, "snx-nft", "out", NfChainType::Filter, NfHook::Output, 0));
    tx.add(nft::rule(NfFamily::IP, "snx-nft", "out", vec![nft::counter()]));
    rt.block_on(nft::apply(Some(&f), &tx))?;
    let objs = rt.block_on(nft::list_table(Some(&f), NfFamily::IP, "snx-nft"))?.context("the table is in the namespace")?;
    assert!(objs.iter().any(|o| matches!(o, nft::NfListObject::Chain(c) if c.name == "out")));
    assert!(rt.block_on(nft::list_table(None, NfFamily::IP, "snx-nft"))?.is_none(), "nothing in the test's own namespace");
    // A transaction with a bad command in the middle changes nothing at all.
    let mut bad = Tx::new();
    bad.add(nft::chain(NfFamily::IP, "snx-nft", "new_one"));
    bad.delete(nft::chain(NfFamily::IP, "snx-nft", "no_such_chain"));
    bad.add(nft::chain(NfFamily::IP, "snx-nft", "another"));
    let e = rt.block_on(nft::apply(Some(&f), &bad)).expect_err("refused");
    assert!(e.to_string().contains("No such file or directory"), "nft's reason: {e}");
    let after = rt.block_on(nft::list_table(Some(&f), NfFamily::IP, "snx-nft"))?.context("table")?;
    let chains: Vec<String> = after.iter().filter_map(|o| if let nft::NfListObject::Chain(c) = o { Some(c.name.to_string()) } else { None }).collect();
    assert_eq!(chains, vec!["out".to_string()], "the half that was valid was not applied");
    Ok(())
}

/// Sends one UDP datagram from each of `n` sockets to VIP:9 (DNATed round robin).
const SEND: &str = "import socket, sys\nfor i in range(int(sys.argv[2])):\n    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n    s.sendto(b'x', (sys.argv[1], 9))\n    s.close()\n";

#[test]
fn a_vips_udp_flows_to_one_task_are_deleted_over_netlink_and_the_others_stay() -> Result<()> {
    let ns = Ns::new("snx-nft-ct")?;
    for a in ["10.99.0.1/24", "10.99.0.2/32", "10.99.0.3/32"] {
        in_ns(&ns.0, &["ip", "addr", "add", a, "dev", "lo"])?;
    }
    let f = ns.file()?;
    let rt = rt()?;
    // VIP 10.99.0.100 → 10.99.0.2 or .3, round robin, as the nftables load balancer does.
    let mut tx = Tx::new();
    tx.replace_table(NfFamily::IP, "snx-ct");
    tx.add(nft::base_chain(NfFamily::IP, "snx-ct", "out", NfChainType::NAT, NfHook::Output, -100));
    let arms = vec![SetItem::Mapping(nft::n(0), nft::s("10.99.0.2")), SetItem::Mapping(nft::n(1), nft::s("10.99.0.3"))];
    let to = nft::Expression::Named(nft::NamedExpression::Map(Box::new(nft::MapExpr { key: nft::numgen_inc(2), data: nft::set(arms) })));
    tx.add(nft::rule(
        NfFamily::IP,
        "snx-ct",
        "out",
        vec![nft::eq(nft::field("ip", "daddr"), nft::s("10.99.0.100")), Statement::DNAT(Some(nft::NAT { addr: Some(to), family: Some(nft::NATFamily::IP), port: None, flags: None }))],
    ));
    rt.block_on(nft::apply(Some(&f), &tx))?;
    in_ns(&ns.0, &["python3", "-c", SEND, "10.99.0.100", "6"])?;
    let delete = |backend: &str| -> Result<usize> {
        let vip = "10.99.0.100".parse()?;
        let backend = backend.parse()?;
        Ok(swarmnet_dataplane::netns::in_netns(&f, || swarmnet_dataplane::netlink::delete_udp_flows(vip, backend))??)
    };
    assert_eq!(delete("10.99.0.2")?, 3, "the three flows answered by .2");
    assert_eq!(delete("10.99.0.2")?, 0, "gone; asking again deletes nothing");
    assert_eq!(delete("10.99.0.3")?, 3, ".3's three flows were left until asked for");
    // The test's own namespace was never touched.
    assert_eq!(delete("10.99.0.3")?, 0);
    Ok(())
}
