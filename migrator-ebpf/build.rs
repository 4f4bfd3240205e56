//! Rebuild when bpf-linker changes: it is the eBPF crate's linker, which
//! cargo does not track on its own.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
