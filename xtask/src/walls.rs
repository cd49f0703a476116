//! The architecture's walls (ADR 0008) are Cargo dependencies; this test fails if someone
//! opens one, e.g. gives the manager a path to netlink.

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::{Path, PathBuf};

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default()
    }

    /// Our crates (name → directory), from the workspace's `[workspace.dependencies]`.
    fn crates() -> BTreeMap<String, PathBuf> {
        let text = std::fs::read_to_string(root().join("Cargo.toml")).expect("workspace Cargo.toml");
        text.lines()
            .filter(|l| l.starts_with("swarmnet-"))
            .filter_map(|l| {
                let (name, rest) = l.split_once('=')?;
                let path = rest.split("path = \"").nth(1)?.split('"').next()?;
                Some((name.trim().to_string(), root().join(path)))
            })
            .collect()
    }

    /// The swarmnet crates `dir`'s manifest names in `[dependencies]` (not dev).
    fn direct(dir: &Path) -> BTreeSet<String> {
        let text = std::fs::read_to_string(dir.join("Cargo.toml")).expect("crate Cargo.toml");
        let mut section = String::new();
        let mut out = BTreeSet::new();
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                section = line.to_string();
                continue;
            }
            if section == "[dependencies]" && line.starts_with("swarmnet-") {
                let name: String = line.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
                out.insert(name);
            }
        }
        out
    }

    fn closure(name: &str, all: &BTreeMap<String, PathBuf>) -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![name.to_string()];
        while let Some(n) = todo.pop() {
            let Some(dir) = all.get(&n) else { continue };
            for d in direct(dir) {
                if seen.insert(d.clone()) {
                    todo.push(d);
                }
            }
        }
        seen
    }

    #[test]
    fn the_walls_between_crates_hold() {
        let all = crates();
        for must in ["swarmnet-types", "swarmnet-api", "swarmnet-manager", "swarmnet-agent", "swarmnet-gossip", "swarmnet-dns", "swarmnet-dataplane"] {
            assert!(all.contains_key(must), "{must} is not in the workspace's dependencies: {all:?}");
        }
        let walls: &[(&str, &[&str])] = &[
            ("swarmnet-types", &["swarmnet-api", "swarmnet-manager", "swarmnet-agent", "swarmnet-gossip", "swarmnet-dns", "swarmnet-dataplane"]),
            ("swarmnet-api", &["swarmnet-manager", "swarmnet-agent", "swarmnet-gossip", "swarmnet-dns", "swarmnet-dataplane"]),
            ("swarmnet-manager", &["swarmnet-agent", "swarmnet-gossip", "swarmnet-dns", "swarmnet-dataplane", "swarmnet-ebpf"]),
            ("swarmnet-gossip", &["swarmnet-manager", "swarmnet-agent", "swarmnet-dns", "swarmnet-dataplane"]),
            ("swarmnet-dns", &["swarmnet-manager", "swarmnet-agent", "swarmnet-gossip", "swarmnet-dataplane"]),
            ("swarmnet-dataplane", &["swarmnet-manager", "swarmnet-agent", "swarmnet-gossip", "swarmnet-dns"]),
            ("swarmnet-agent", &["swarmnet-manager"]),
        ];
        for (krate, forbidden) in walls {
            let deps = closure(krate, &all);
            for f in *forbidden {
                assert!(!deps.contains(*f), "{krate} depends on {f} (through {deps:?}): that wall must hold (ADR 0008)");
            }
        }
        // And the binary composes both sides.
        let bin = closure("swarmnet-control", &BTreeMap::from([("swarmnet-control".to_string(), root().join("control"))]));
        assert!(bin.contains("swarmnet-manager") && bin.contains("swarmnet-agent"), "{bin:?}");
    }
}
