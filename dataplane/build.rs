//! Builds the load balancer's eBPF programs (`ebpf/programs`) with aya-build: the machine's
//! nightly toolchain, `-Z build-std=core`, target bpfel-unknown-none, bpf-linker. The object
//! lands at `$OUT_DIR/swarmnet-lb` and is embedded in the binary. With `AYA_BUILD_SKIP=1` an
//! empty file stands in for it, and the daemon says at start that it has no eBPF programs.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../ebpf/common/src");
    println!("cargo:rerun-if-changed=../ebpf/programs/src");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let skip = std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if skip {
        std::fs::write(out.join("swarmnet-lb"), b"")?;
        std::fs::write(out.join("swarmnet-ingress"), b"")?;
        return Ok(());
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ebpf/programs");
    let root = root.to_str().ok_or("the workspace path is not UTF-8")?;
    aya_build::build_ebpf([aya_build::Package { name: "swarmnet-ebpf", root_dir: root, ..Default::default() }], aya_build::Toolchain::default())
        .map_err(|e| format!("building the eBPF programs (nightly + rust-src + bpf-linker; `bash .ci/setup` installs them): {e:#}"))?;
    Ok(())
}
