//! Builds the eBPF crate for bpfel-unknown-none (nightly, build-std=core,
//! bpf-linker) and leaves the object in OUT_DIR for `include_bytes_aligned!`.
//! Prerequisites come from `cargo xtask setup`.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("reading the workspace metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|package| package.name.as_str() == "migrator-ebpf")
        .ok_or_else(|| anyhow!("the migrator-ebpf package is missing from the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("migrator-ebpf manifest has no parent directory"))?;
    aya_build::build_ebpf(
        [Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context("building the eBPF programs (run `cargo xtask setup` if nightly, rust-src or bpf-linker is missing)")
}
