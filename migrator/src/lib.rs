//! migrator moves a running Linux process with live TCP connections to
//! another host. This library holds every subsystem; the `migrator` binary
//! is a thin clap front end over it.
//!
//! - [`dataplane`]: the eBPF TC programs (network lock, counters) and their maps.
//! - [`criu`]: finding and checking CRIU.
//! - [`doctor`]: the preflight report.

pub mod agent;
pub mod channel;
pub mod console;
pub mod criu;
pub mod dataplane;
pub mod doctor;
pub mod fault;
pub mod images;
pub mod metrics;
pub mod migrate;
pub mod net;
pub mod report;
pub mod system;
pub mod watch;
