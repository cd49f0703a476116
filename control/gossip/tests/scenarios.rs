//! Gossip scenarios on the in-memory network (no root, no sockets, virtual time).

use std::net::Ipv4Addr;
use std::time::Duration;

use swarmnet_gossip::memnet::MemNet;
use swarmnet_gossip::Config;
use swarmnet_types::{Endpoint, EndpointState};

fn ep(net: &str, id: &str, last: u8, node: usize) -> Endpoint {
    Endpoint {
        network: net.into(),
        id: id.into(),
        task_name: format!("web.{last}"),
        service_name: "web".into(),
        service_id: "svc".into(),
        aliases: vec![],
        ip: Ipv4Addr::new(10, 0, 0, last),
        mac: [2, 0x42, 10, 0, 0, last],
        vtep: format!("10.210.0.{}", node + 1).parse().expect("ip"),
        vip: Some(Ipv4Addr::new(10, 0, 0, 2)),
        ports: vec![],
        state: EndpointState::Active,
    }
}

fn has(net: &MemNet, i: usize, network: &str, id: &str) -> bool {
    net.nodes[i].table().endpoints(network).iter().any(|e| e.id == id)
}

fn everyone(net: &MemNet, nodes: &[usize], network: &str, id: &str, present: bool) -> bool {
    nodes.iter().all(|i| has(net, *i, network, id) == present)
}

/// A cluster of `n` whose members all joined network "a".
fn cluster(n: usize) -> MemNet {
    let mut net = MemNet::new(n, Config::default());
    net.join_all();
    let all = net.run_until(Duration::from_secs(10), |m| m.nodes.iter().all(|g| g.members().count() == n - 1));
    assert!(all.is_some(), "membership converges");
    for i in 0..n {
        net.with(i, |g, now| g.join_network("a", now));
    }
    net.run_for(Duration::from_millis(200));
    net
}

#[test]
fn a_change_reaches_every_member_fast_and_a_delete_too() {
    let mut net = cluster(10);
    let all: Vec<usize> = (0..10).collect();
    net.with(3, |g, now| g.set_endpoint(ep("a", "t1", 3, 3), now));
    let t = net.run_until(Duration::from_secs(5), |m| everyone(m, &all, "a", "t1", true)).expect("spread");
    assert!(t < Duration::from_millis(50), "pushed at once, took {t:?}");
    let got = net.nodes[7].table().endpoints("a")[0].clone();
    assert_eq!(*got, ep("a", "t1", 3, 3), "every field arrives");
    net.with(3, |g, now| g.remove_endpoint("a", "t1", now));
    net.run_until(Duration::from_secs(5), |m| everyone(m, &all, "a", "t1", false)).expect("delete spreads");
}

#[test]
fn only_members_of_a_network_get_its_entries() {
    let mut net = MemNet::new(4, Config::default());
    net.join_all();
    net.run_until(Duration::from_secs(10), |m| m.nodes.iter().all(|g| g.members().count() == 3)).expect("members");
    for i in 0..3 {
        net.with(i, |g, now| g.join_network("a", now));
    }
    net.run_for(Duration::from_millis(100));
    net.with(0, |g, now| g.set_endpoint(ep("a", "t1", 3, 0), now));
    net.run_for(Duration::from_secs(12));
    assert!(everyone(&net, &[0, 1, 2], "a", "t1", true));
    assert!(!has(&net, 3, "a", "t1"), "node 3 never joined a");
    assert_eq!(net.nodes[3].table().len(), 0);
    // Node 3 joins later and fetches the table at once.
    net.with(3, |g, now| g.join_network("a", now));
    let t = net.run_until(Duration::from_secs(5), |m| has(m, 3, "a", "t1")).expect("fetched on join");
    assert!(t < Duration::from_millis(100), "fetched on join, not at the next round: {t:?}");
}

#[test]
fn a_missed_join_event_does_not_make_entries_rejected_forever() {
    let mut net = cluster(3);
    // Node 2 cannot hear node 0 while node 0 joins network b and publishes on it.
    net.cut(0, 2);
    net.with(0, |g, now| g.join_network("b", now));
    net.with(2, |g, now| g.join_network("b", now));
    net.with(0, |g, now| g.set_endpoint(ep("b", "x", 9, 0), now));
    net.run_for(Duration::from_millis(500));
    assert!(!has(&net, 2, "b", "x"));
    net.heal(0, 2);
    // Only 0 holds x: repaired when 0 or 2 picks the other for a round (each picks one of
    // its two peers every 10 s), so within a few rounds.
    net.run_until(Duration::from_secs(40), |m| has(m, 2, "b", "x")).expect("repaired by anti-entropy");
    // And 2's own entries on b reach 0, whose view of 2's membership was stale.
    net.with(2, |g, now| g.set_endpoint(ep("b", "y", 8, 2), now));
    net.run_until(Duration::from_secs(15), |m| has(m, 0, "b", "y")).expect("0 takes 2's entries");
}

#[test]
fn a_short_partition_removes_nothing_and_a_dead_node_goes_everywhere() {
    let mut net = cluster(5);
    let others = [0, 1, 3, 4];
    net.with(2, |g, now| g.set_endpoint(ep("a", "t2", 12, 2), now));
    net.run_for(Duration::from_millis(100));
    assert!(everyone(&net, &others, "a", "t2", true));
    // Shorter than the failure detector needs: nothing is removed anywhere.
    net.isolate(2);
    net.run_for(Duration::from_millis(700));
    net.rejoin(2);
    net.run_for(Duration::from_secs(5));
    assert!(everyone(&net, &others, "a", "t2", true), "a blip removes nothing");
    assert!(net.events.iter().all(|(_, e)| !matches!(e, swarmnet_gossip::Event::NodeDown(_))), "no node declared down");
    // Dead for real: its entries go from every node.
    net.crash(2);
    let t = net.run_until(Duration::from_secs(20), |m| everyone(m, &others, "a", "t2", false)).expect("removed");
    assert!(t < Duration::from_secs(5), "failure detection and the host probe took {t:?}");
}

#[test]
fn a_restarted_node_replaces_its_old_entries() {
    let mut net = cluster(4);
    let others = [0, 2, 3];
    net.with(1, |g, now| {
        g.set_endpoint(ep("a", "old1", 20, 1), now);
        g.set_endpoint(ep("a", "old2", 21, 1), now);
    });
    net.run_for(Duration::from_millis(100));
    assert!(everyone(&net, &others, "a", "old1", true));
    net.crash(1);
    net.run_for(Duration::from_millis(200));
    net.restart(1);
    net.with(1, |g, now| g.set_endpoint(ep("a", "new1", 22, 1), now));
    let t = net.run_until(Duration::from_secs(10), |m| everyone(m, &others, "a", "new1", true)).expect("new entry");
    assert!(t < Duration::from_secs(1), "the new generation is taken without waiting for failure detection: {t:?}");
    // What the new generation did not publish again goes after the handover.
    let t = net.run_until(Duration::from_secs(10), |m| everyone(m, &others, "a", "old1", false) && everyone(m, &others, "a", "old2", false)).expect("replaced");
    assert!(t < Config::default().handover + Duration::from_secs(1), "old entries gone after the handover: {t:?}");
}

/// A dead agent is not a dead host (issue 12): its entries stay while its host answers
/// probes, so its tasks stay reachable; a restart that publishes them again loses nothing.
#[test]
fn a_killed_agent_keeps_its_entries_while_its_host_answers() {
    let mut net = cluster(4);
    let others = [0, 1, 3];
    net.with(2, |g, now| g.set_endpoint(ep("a", "t", 40, 2), now));
    net.run_for(Duration::from_millis(100));
    assert!(everyone(&net, &others, "a", "t", true));
    net.events.clear();
    net.kill_agent(2);
    net.run_for(Duration::from_secs(8));
    assert!(net.events.iter().any(|(_, e)| matches!(e, swarmnet_gossip::Event::NodeDown(id) if id.node == "n2")), "declared down");
    assert!(everyone(&net, &others, "a", "t", true), "entries kept while the host answers");
    net.restart(2);
    net.with(2, |g, now| g.set_endpoint(ep("a", "t", 40, 2), now));
    net.run_for(Duration::from_secs(10));
    assert!(everyone(&net, &others, "a", "t", true));
    let removed = net.events.iter().any(|(i, e)| *i != 2 && matches!(e, swarmnet_gossip::Event::Endpoint(c) if c.id == "t" && c.new.is_none()));
    assert!(!removed, "the entry was never removed anywhere");
}

/// ... but not forever: the hold ends, and at once when the manager's node list drops it.
#[test]
fn a_dead_agents_entries_go_when_the_hold_ends_or_the_manager_drops_the_node() {
    let mut net = cluster(4);
    let others = [0, 1, 3];
    net.with(2, |g, now| g.set_endpoint(ep("a", "t", 41, 2), now));
    net.run_for(Duration::from_millis(100));
    net.kill_agent(2);
    let hold = Config::default().dead_agent_hold;
    let t = net.run_until(hold + Duration::from_secs(10), |m| everyone(m, &others, "a", "t", false)).expect("gone after the hold");
    assert!(t > hold / 2 && t < hold + Duration::from_secs(5), "{t:?}");

    let mut net = cluster(4);
    net.with(2, |g, now| g.set_endpoint(ep("a", "t", 41, 2), now));
    net.run_for(Duration::from_millis(100));
    net.kill_agent(2);
    net.run_for(Duration::from_secs(5));
    assert!(everyone(&net, &others, "a", "t", true));
    let list: Vec<_> = [0, 1, 3].iter().map(|i| swarmnet_gossip::memnet::addr_of(*i)).collect();
    for i in others {
        net.with(i, |g, now| g.set_nodes(&list, now));
    }
    assert!(everyone(&net, &others, "a", "t", false), "gone as soon as the manager no longer lists the node");
}

/// A node cut off from everyone is declared dead and declares them dead; when the link is
/// back it rejoins at once under a new generation (not at foca's next periodic announce).
#[test]
fn a_partition_of_any_length_heals_within_seconds() {
    for cut in [Duration::from_secs(3), Duration::from_secs(8), Duration::from_secs(30)] {
        let mut net = cluster(4);
        let others = [0, 1, 3];
        net.with(2, |g, now| g.set_endpoint(ep("a", "t", 42, 2), now));
        net.with(0, |g, now| g.set_endpoint(ep("a", "z", 43, 0), now));
        net.run_for(Duration::from_millis(100));
        net.isolate(2);
        net.run_for(cut);
        if cut >= Duration::from_secs(8) {
            // Declared down (about 2.5 s) and its host unanswering (1 s): gone.
            assert!(everyone(&net, &others, "a", "t", false), "a cut-off host's entries go ({cut:?})");
            assert!(!has(&net, 2, "a", "z"), "and it drops the others'");
        }
        net.rejoin(2);
        let t = net.run_until(Duration::from_secs(60), |m| everyone(m, &others, "a", "t", true) && has(m, 2, "a", "z") && m.nodes.iter().all(|g| g.members().count() == 3)).expect("healed");
        assert!(t < Duration::from_secs(3), "a {cut:?} partition healed in {t:?}");
    }
}

#[test]
fn a_node_declared_dead_comes_back_with_its_entries() {
    let mut net = cluster(4);
    let others = [0, 1, 3];
    net.with(2, |g, now| g.set_endpoint(ep("a", "t", 30, 2), now));
    net.run_for(Duration::from_millis(100));
    net.isolate(2);
    net.run_until(Duration::from_secs(20), |m| everyone(m, &others, "a", "t", false)).expect("declared dead");
    net.rejoin(2);
    let t = net.run_until(Duration::from_secs(60), |m| everyone(m, &others, "a", "t", true)).expect("back after the partition heals");
    assert!(t < Duration::from_secs(3), "healed in {t:?}");
}

#[test]
fn garbage_is_dropped_and_counted_and_the_cluster_keeps_working() {
    let mut net = cluster(3);
    let before = net.nodes[1].stats.clone();
    net.inject(0, 1, b"", false);
    net.inject(0, 1, b"hello world", false);
    net.inject(0, 1, &[b'S', b'N', 3, 1, 0xff, 0xff, 0xff], false);
    net.inject(0, 1, &[b'S', b'N', 3, 2, 0xff, 0xff, 0xff], true);
    net.inject(0, 1, &[b'S', b'N', 2, 9], false);
    net.inject(0, 1, &vec![b'S'; 5000], false);
    let s = &net.nodes[1].stats;
    assert_eq!(s.malformed - before.malformed, 5);
    assert_eq!(s.oversized - before.oversized, 1);
    // A replayed push changes nothing and counts as stale.
    net.record = true;
    net.with(0, |g, now| g.set_endpoint(ep("a", "r", 40, 0), now));
    net.run_for(Duration::from_millis(10));
    net.record = false;
    let add: Vec<u8> = net.recorded.iter().find(|(f, t, _, s)| *f == 0 && *t == 1 && !*s).map(|r| r.2.clone()).expect("a push from 0 to 1");
    net.with(0, |g, now| g.remove_endpoint("a", "r", now));
    net.run_for(Duration::from_millis(10));
    assert!(!has(&net, 1, "a", "r"));
    let stale = net.nodes[1].stats.stale;
    net.inject(0, 1, &add, false);
    assert!(!has(&net, 1, "a", "r"), "a replayed add does not undo the delete");
    assert_eq!(net.nodes[1].stats.stale, stale + 1, "the replay is counted");
    net.run_for(Duration::from_secs(3));
    assert!(net.nodes[1].members().count() == 2, "still a member of a working cluster");
}

#[test]
fn large_tables_respect_the_mtu_and_converge() {
    let mut net = cluster(3);
    net.with(0, |g, now| {
        for k in 0..200u32 {
            let mut e = ep("a", &format!("task-{k:04}"), (k % 250) as u8, 0);
            e.aliases = vec![format!("alias-{k}")];
            g.set_endpoint(e, now);
        }
    });
    net.run_for(Duration::from_millis(100));
    assert_eq!(net.dropped_mtu, 0, "no UDP packet above 1400 bytes");
    assert_eq!(net.nodes[2].table().endpoints("a").len(), 200);
    // A node joining later gets all 200 over the stream.
    let mut big = MemNet::new(3, Config::default());
    big.join_all();
    big.run_until(Duration::from_secs(10), |m| m.nodes.iter().all(|g| g.members().count() == 2)).expect("members");
    big.with(0, |g, now| {
        g.join_network("a", now);
        for k in 0..200u32 {
            g.set_endpoint(ep("a", &format!("task-{k:04}"), (k % 250) as u8, 0), now);
        }
    });
    big.run_for(Duration::from_millis(100));
    big.with(2, |g, now| g.join_network("a", now));
    big.run_until(Duration::from_secs(5), |m| m.nodes[2].table().endpoints("a").len() == 200).expect("bulk sync");
    assert_eq!(big.dropped_mtu, 0);
}

#[test]
fn a_lost_push_is_repaired_by_anti_entropy() {
    let mut net = cluster(3);
    net.cut(0, 2);
    net.with(0, |g, now| g.set_endpoint(ep("a", "lost", 50, 0), now));
    net.run_for(Duration::from_millis(50));
    net.heal(0, 2);
    assert!(!has(&net, 2, "a", "lost"));
    // A newer push arrives; the older one stays lost until anti-entropy notices.
    net.with(0, |g, now| g.set_endpoint(ep("a", "later", 51, 0), now));
    net.run_for(Duration::from_millis(50));
    assert!(has(&net, 2, "a", "later"));
    net.run_until(Duration::from_secs(30), |m| has(m, 2, "a", "lost")).expect("repaired");
}

#[test]
fn a_digest_from_a_sender_not_yet_known_is_answered_at_its_gossip_address() {
    use std::net::SocketAddr;
    use std::time::Instant;
    use swarmnet_gossip::{Gossip, Ident, Out};
    let (a, b, c): (SocketAddr, SocketAddr, SocketAddr) = ("10.210.0.1:7946".parse().expect("a"), "10.210.0.2:7946".parse().expect("b"), "10.210.0.3:7946".parse().expect("c"));
    let t0 = Instant::now();
    let mut ga = Gossip::new(Ident::new("a", a, 1), Config::default(), 1, t0);
    let mut gb = Gossip::new(Ident::new("b", b, 1), Config::default(), 2, t0);
    let mut gc = Gossip::new(Ident::new("c", c, 1), Config::default(), 3, t0);
    ga.join_via(&[b], t0);
    let mut now = t0;
    let mut digest = None;
    for _ in 0..100 {
        now += Duration::from_millis(50);
        ga.tick(now);
        for o in ga.take_out() {
            match o {
                Out::Udp { data, .. } => gb.handle(a, &data, false, now),
                // Kept for c once a knows b; b is not given it.
                Out::Stream { data, .. } if ga.member_count() == 1 => digest = digest.or(Some(data)),
                _ => {}
            }
        }
        gb.tick(now);
        for o in gb.take_out() {
            match o {
                Out::Udp { data, .. } => ga.handle(b, &data, false, now),
                Out::Stream { data, .. } => ga.handle(b, &data, true, now),
                Out::Probe { .. } => {}
            }
        }
    }
    let digest = digest.expect("a started an exchange with b");
    // c has never heard of a; the stream comes from an ephemeral port.
    let ephemeral: SocketAddr = "10.210.0.1:40123".parse().expect("ephemeral");
    gc.handle(ephemeral, &digest, true, now);
    let replies: Vec<SocketAddr> = gc.take_out().into_iter().filter_map(|o| if let Out::Stream { to, .. } = o { Some(to) } else { None }).collect();
    // (c may also start an exchange with b, whom a's view told it of.)
    assert!(replies.contains(&a), "no reply to a's gossip address {a}: {replies:?}");
    assert!(!replies.contains(&ephemeral), "a reply went to the stream's ephemeral port: {replies:?}");
    // The same digest from another host: it names a's address, which is not the host it
    // came from. Answering it would send d's replies to a host that did not ask (a
    // reflection); it is left unanswered and counted. (What it carries is still taken: d
    // may then start exchanges of its own with the members its view names, as with any
    // view. The reflection of replies is what goes.)
    let mut gd = Gossip::new(Ident::new("d", "10.210.0.4:7946".parse().expect("d"), 1), Config::default(), 4, t0);
    gd.handle("10.210.0.99:40123".parse().expect("elsewhere"), &digest, true, now);
    let to_a = gd.take_out().into_iter().filter(|o| matches!(o, Out::Stream { to, .. } if *to == a)).count();
    assert_eq!(to_a, 0, "a digest from another host than the one it names was answered there");
    assert_eq!(gd.stats.unanswered, 1);
    // By datagram (whose source address can be forged), an exchange is not taken at all.
    let mut ge = Gossip::new(Ident::new("e", "10.210.0.5:7946".parse().expect("e"), 1), Config::default(), 5, t0);
    ge.handle(a, &digest, false, now);
    assert!(ge.take_out().is_empty(), "a digest by datagram was acted on");
    assert_eq!((ge.stats.malformed, ge.member_count()), (1, 0));
}
