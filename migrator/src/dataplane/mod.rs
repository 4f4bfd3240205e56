//! The eBPF data plane: the TC classifiers built from `migrator-ebpf`,
//! embedded in this binary, their attachment to interfaces, and the flow
//! table they share through pinned maps.
//!
//! Pin layout under the root (default `/sys/fs/bpf/migrator/netns-<inode>`,
//! one per network namespace so lab "hosts" sharing one bpffs stay apart):
//! `maps/<NAME>` for every map, `links/<iface>@<direction>` for TCX links,
//! `links/<iface>@netlink` recording clsact filters on older kernels.

mod attach;
pub mod btf;
pub mod lock;
pub mod logs;
pub mod spec;
pub mod status;
pub mod table;

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::MapError,
    programs::{ProgramError, SchedClassifier},
};
use migrator_common::{SockLayout, paths::BPF_PIN_ROOT};

pub use attach::{AttachMode, Attachment, attached_interfaces, detach, detach_if_unused};
pub use table::{Entry, FlowEntry, FlowTable, HeldPacketOwned, ServiceEntry};

/// The eBPF object built by `build.rs` (aya-build) from `migrator-ebpf`.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/migrator-tc"));

pub const INGRESS_PROGRAM: &str = "migrator_ingress";
pub const EGRESS_PROGRAM: &str = "migrator_egress";
pub const RETRANSMIT_BTF_PROGRAM: &str = "migrator_tcp_retransmit_btf";
pub const RETRANSMIT_TRACEFS_PROGRAM: &str = "migrator_tcp_retransmit";
/// The kernel tracepoint both retransmit programs follow.
const RETRANSMIT_TRACEPOINT: &str = "tcp_retransmit_skb";

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(
        "loading the eBPF object failed: {0} (needs root or CAP_BPF + CAP_NET_ADMIN; `migrator doctor` checks)"
    )]
    Load(#[from] EbpfError),
    #[error(
        "the eBPF object has no program `{0}`: the build is inconsistent, rebuild with `cargo xtask build`"
    )]
    MissingProgram(&'static str),
    #[error(
        "the eBPF object has no map `{0}`: the build is inconsistent, rebuild with `cargo xtask build`"
    )]
    MissingMap(&'static str),
    #[error("program `{name}`: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map `{name}`: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    #[error(
        "no data plane is attached in this network namespace ({path} cannot be opened: {source}); run `migrator attach --iface IF` or `migrator freeze`, which attaches"
    )]
    NotAttached {
        path: PathBuf,
        #[source]
        source: MapError,
    },
    #[error("interface `{0}` does not exist in this network namespace (see `ip link`)")]
    NoSuchInterface(String),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("attaching to `{iface}` ({direction}): {source}")]
    Attach {
        iface: String,
        direction: &'static str,
        #[source]
        source: ProgramError,
    },
}

/// Which side of an interface a classifier sits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const BOTH: [Self; 2] = [Self::Ingress, Self::Egress];

    pub const fn program_name(self) -> &'static str {
        match self {
            Self::Ingress => INGRESS_PROGRAM,
            Self::Egress => EGRESS_PROGRAM,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        }
    }
}

/// The pin root for this thread's network namespace.
pub fn default_pin_root() -> PathBuf {
    use std::os::unix::fs::MetadataExt as _;
    let netns = std::fs::metadata("/proc/thread-self/ns/net")
        .map(|meta| meta.ino())
        .unwrap_or(0);
    Path::new(BPF_PIN_ROOT).join(format!("netns-{netns}"))
}

/// Where the maps of the data plane pinned under `pin_root` live.
pub fn maps_dir(pin_root: &Path) -> PathBuf {
    pin_root.join("maps")
}

/// The loaded data plane: both classifiers verified and loaded into the
/// kernel, maps created (or reused from pins).
pub struct Dataplane {
    ebpf: Ebpf,
    pin_root: Option<PathBuf>,
}

impl Dataplane {
    /// Load with private maps (tests, doctor): nothing is pinned.
    pub fn load() -> Result<Self, DataplaneError> {
        Self::from_ebpf(Ebpf::load(EBPF_OBJECT)?, None)
    }

    /// Load with maps pinned under `pin_root/maps`, reusing maps already
    /// pinned there so every process works on the same flow table.
    pub fn load_pinned(pin_root: &Path) -> Result<Self, DataplaneError> {
        crate::system::ensure_bpffs().map_err(|source| DataplaneError::Io {
            action: "mounting bpffs at",
            path: PathBuf::from(crate::system::BPFFS),
            source,
        })?;
        let maps_dir = maps_dir(pin_root);
        std::fs::create_dir_all(&maps_dir).map_err(|source| DataplaneError::Io {
            action: "creating",
            path: maps_dir.clone(),
            source,
        })?;
        let mut loader = EbpfLoader::new();
        let paths: Vec<(&'static str, PathBuf)> = table::ALL_MAPS
            .iter()
            .map(|name| (*name, maps_dir.join(name)))
            .collect();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        // The programs' log ring too: any process here can read it.
        let log_ring = maps_dir.join(logs::LOG_MAP);
        loader.map_pin_path(logs::LOG_MAP, log_ring.as_path());
        let ebpf = loader.load(EBPF_OBJECT)?;
        Self::from_ebpf(ebpf, Some(pin_root.to_owned()))
    }

    fn from_ebpf(ebpf: Ebpf, pin_root: Option<PathBuf>) -> Result<Self, DataplaneError> {
        let mut dataplane = Self { ebpf, pin_root };
        for direction in Direction::BOTH {
            dataplane
                .classifier(direction)?
                .load()
                .map_err(|source| DataplaneError::Program {
                    name: direction.program_name(),
                    source,
                })?;
        }
        Ok(dataplane)
    }

    /// Forward the programs' log messages into `tracing` while the
    /// returned forwarder lives (see [`logs`]).
    pub fn forward_logs(&mut self) -> Option<logs::LogForwarder> {
        logs::forward(&mut self.ebpf)
    }

    pub fn classifier(
        &mut self,
        direction: Direction,
    ) -> Result<&mut SchedClassifier, DataplaneError> {
        self.program(direction.program_name())
    }

    /// A program of the object, as the type it must be.
    fn program<'a, T>(&'a mut self, name: &'static str) -> Result<&'a mut T, DataplaneError>
    where
        &'a mut aya::programs::Program: TryInto<&'a mut T, Error = ProgramError>,
    {
        self.ebpf
            .program_mut(name)
            .ok_or(DataplaneError::MissingProgram(name))?
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })
    }

    /// Take the maps out as a [`FlowTable`] (the programs keep using them).
    pub fn take_table(&mut self) -> Result<FlowTable, DataplaneError> {
        let ebpf = &mut self.ebpf;
        FlowTable::from_maps(|name| ebpf.take_map(name).ok_or(DataplaneError::MissingMap(name)))
    }

    /// Count our own retransmits of tracked flows for as long as this data
    /// plane is loaded: through the BTF tracepoint (no tracefs needed),
    /// else the classic one (needs tracefs mounted).
    pub fn attach_retransmit_counter(
        &mut self,
    ) -> Result<RetransmitCounter, RetransmitCounterError> {
        let btf = match self.attach_btf_retransmit_counter() {
            Ok(()) => return Ok(RetransmitCounter::BtfTracepoint),
            Err(why) => why,
        };
        match self.attach_tracefs_retransmit_counter() {
            Ok(()) => Ok(RetransmitCounter::TracefsTracepoint),
            Err(tracefs) => Err(RetransmitCounterError { btf, tracefs }),
        }
    }

    fn attach_btf_retransmit_counter(&mut self) -> Result<(), String> {
        // Read the kernel's BTF only here, where the counter needs it, not
        // on every load of the data plane.
        let layout = sock_layout().as_ref().map_err(Clone::clone)?;
        if layout.known == 0 {
            return Err("the socket layout is unknown".into());
        }
        let map = self
            .ebpf
            .map_mut(SOCK_LAYOUT_MAP)
            .ok_or_else(|| DataplaneError::MissingMap(SOCK_LAYOUT_MAP).to_string())?;
        let mut slot: aya::maps::Array<_, SockLayout> =
            aya::maps::Array::try_from(map).map_err(|e| format!("{SOCK_LAYOUT_MAP}: {e}"))?;
        slot.set(0, *layout, 0)
            .map_err(|e| format!("{SOCK_LAYOUT_MAP}: {e}"))?;
        let kernel_btf = aya::Btf::from_sys_fs().map_err(|e| e.to_string())?;
        let program: &mut aya::programs::BtfTracePoint = self
            .program(RETRANSMIT_BTF_PROGRAM)
            .map_err(|e| e.to_string())?;
        program
            .load(RETRANSMIT_TRACEPOINT, &kernel_btf)
            .map_err(|e| format!("loading: {e}"))?;
        program.attach().map_err(|e| format!("attaching: {e}"))?;
        Ok(())
    }

    fn attach_tracefs_retransmit_counter(&mut self) -> Result<(), String> {
        let program: &mut aya::programs::TracePoint = self
            .program(RETRANSMIT_TRACEFS_PROGRAM)
            .map_err(|e| e.to_string())?;
        program.load().map_err(|e| format!("loading: {e}"))?;
        program
            .attach("tcp", RETRANSMIT_TRACEPOINT)
            .map_err(|e| format!("attaching: {e}"))?;
        Ok(())
    }
}

/// How our own side's retransmits are being counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetransmitCounter {
    /// `tp_btf/tcp_retransmit_skb`: a BPF link, no tracefs involved.
    BtfTracepoint,
    /// `tcp:tcp_retransmit_skb` through tracefs (kernels whose BTF we
    /// cannot use).
    TracefsTracepoint,
}

impl RetransmitCounter {
    pub const fn describe(self) -> &'static str {
        match self {
            Self::BtfTracepoint => "BTF tracepoint tp_btf/tcp_retransmit_skb (no tracefs needed)",
            Self::TracefsTracepoint => {
                "classic tracepoint tcp:tcp_retransmit_skb through tracefs (this kernel's BTF could not be used)"
            }
        }
    }
}

/// Neither retransmit program could be attached: why, for each.
#[derive(Debug, thiserror::Error)]
#[error("local retransmits are not counted: BTF tracepoint: {btf}; classic tracepoint: {tracefs}")]
pub struct RetransmitCounterError {
    pub btf: String,
    pub tracefs: String,
}

impl RetransmitCounterError {
    pub const fn fix(&self) -> &'static str {
        "run a kernel with BTF (CONFIG_DEBUG_INFO_BTF, /sys/kernel/btf/vmlinux), or mount tracefs: `mount -t tracefs tracefs /sys/kernel/tracing`"
    }
}

/// Where `struct sock` keeps addresses and ports on this kernel, read from
/// its BTF once per process.
fn sock_layout() -> &'static Result<SockLayout, String> {
    static LAYOUT: OnceLock<Result<SockLayout, String>> = OnceLock::new();
    LAYOUT.get_or_init(|| {
        btf::Btf::from_sys_fs()
            .and_then(|btf| btf.sock_layout())
            .map_err(|e| e.to_string())
    })
}

/// The one-entry map the BTF counter reads the layout from (retransmit.rs).
const SOCK_LAYOUT_MAP: &str = "SOCK_LAYOUT";
