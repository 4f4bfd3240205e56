//! Well-known paths shared by `migrator` and `cargo xtask setup`.

/// Private prefix where `cargo xtask setup` unpacks CRIU (and its library
/// closure) when the system has no CRIU new enough for this kernel.
pub const CRIU_PREFIX: &str = "/opt/migrator/criu";

/// Launcher script that runs the privately installed CRIU with its own
/// dynamic loader and libraries.
pub const CRIU_LAUNCHER: &str = "/opt/migrator/bin/criu";

/// Where the data plane pins its programs, links and maps.
pub const BPF_PIN_ROOT: &str = "/sys/fs/bpf/migrator";
