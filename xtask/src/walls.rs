//! The architecture's walls (ADR 0008) are Cargo dependencies; this test fails if someone
//! opens one, e.g. gives the manager a path to netlink. It walks the resolved graph of
//! normal (not dev) dependencies that `cargo metadata` reports for this machine.

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;
    use std::process::Command;

    use serde_json::Value;

    fn cargo() -> String {
        std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
    }

    fn host() -> String {
        let out = Command::new("rustc").arg("-vV").output().expect("run rustc -vV");
        String::from_utf8_lossy(&out.stdout).lines().find_map(|l| l.strip_prefix("host: ").map(str::to_string)).expect("rustc -vV names the host")
    }

    /// Package name → names of its normal dependencies, for every package in the graph.
    fn graph() -> BTreeMap<String, BTreeSet<String>> {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("Cargo.toml");
        let out = Command::new(cargo()).args(["metadata", "--format-version", "1", "--offline", "--filter-platform", &host(), "--manifest-path"]).arg(&manifest).output().expect("run cargo metadata");
        assert!(out.status.success(), "cargo metadata failed: {}", String::from_utf8_lossy(&out.stderr));
        let m: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata JSON");
        let names: BTreeMap<&str, &str> = m["packages"].as_array().expect("packages").iter().filter_map(|p| Some((p["id"].as_str()?, p["name"].as_str()?))).collect();
        let mut g = BTreeMap::new();
        for node in m["resolve"]["nodes"].as_array().expect("resolve") {
            let Some(name) = node["id"].as_str().and_then(|id| names.get(id)) else { continue };
            let deps: BTreeSet<String> = node["deps"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|d| d["dep_kinds"].as_array().is_some_and(|k| k.iter().any(|k| k["kind"].is_null())))
                .filter_map(|d| d["pkg"].as_str().and_then(|id| names.get(id)).map(|n| n.to_string()))
                .collect();
            g.insert(name.to_string(), deps);
        }
        g
    }

    fn closure(name: &str, g: &BTreeMap<String, BTreeSet<String>>) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![name.to_string()];
        while let Some(n) = todo.pop() {
            for d in g.get(&n).into_iter().flatten() {
                if seen.insert(d.clone()) {
                    todo.push(d.clone());
                }
            }
        }
        seen
    }

    #[test]
    fn the_walls_between_crates_hold() {
        let g = graph();
        let ours = ["swarmnet-types", "swarmnet-api", "swarmnet-manager", "swarmnet-agent", "swarmnet-gossip", "swarmnet-dns", "swarmnet-dataplane", "swarmnet-control"];
        for must in ours {
            assert!(g.contains_key(must), "{must} is not in the dependency graph");
        }
        let walls: &[(&str, &[&str])] = &[
            ("swarmnet-types", &["swarmnet-api", "swarmnet-manager", "swarmnet-agent", "swarmnet-gossip", "swarmnet-dns", "swarmnet-dataplane"]),
            ("swarmnet-api", &["swarmnet-manager", "swarmnet-agent", "swarmnet-gossip", "swarmnet-dns", "swarmnet-dataplane"]),
            // The manager never touches a packet: no netlink, no eBPF, no gossip sockets.
            ("swarmnet-manager", &["swarmnet-agent", "swarmnet-gossip", "swarmnet-dns", "swarmnet-dataplane", "swarmnet-ebpf", "aya", "rtnetlink", "netlink-packet-route", "hickory-server"]),
            ("swarmnet-gossip", &["swarmnet-manager", "swarmnet-agent", "swarmnet-dns", "swarmnet-dataplane"]),
            ("swarmnet-dns", &["swarmnet-manager", "swarmnet-agent", "swarmnet-gossip", "swarmnet-dataplane"]),
            ("swarmnet-dataplane", &["swarmnet-manager", "swarmnet-agent", "swarmnet-gossip", "swarmnet-dns"]),
            ("swarmnet-agent", &["swarmnet-manager"]),
        ];
        for (krate, forbidden) in walls {
            let deps = closure(krate, &g);
            for f in *forbidden {
                assert!(!deps.contains(*f), "{krate} depends on {f}: that wall must hold (ADR 0008)");
            }
        }
        let bin = closure("swarmnet-control", &g);
        assert!(bin.contains("swarmnet-manager") && bin.contains("swarmnet-agent"), "the binary composes both sides: {bin:?}");
        // Benchmark-only code is not in the shipped binary (issue 19).
        assert!(!bin.contains("swarmnet-sim"), "the shipped binary depends on the benchmarks' simulator");
    }
}
