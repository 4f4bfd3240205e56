//! The eBPF data plane: the TC classifiers built from `migrator-ebpf`,
//! embedded in this binary, and typed access to their maps.

use aya::{
    Ebpf, EbpfError,
    maps::{HashMap, MapData, MapError},
    programs::{ProgramError, SchedClassifier},
};
use migrator_common::{FlowKey, FlowPolicy, FlowStats};

/// The eBPF object built by `build.rs` (aya-build) from `migrator-ebpf`.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/migrator-tc"));

pub const INGRESS_PROGRAM: &str = "migrator_ingress";
pub const EGRESS_PROGRAM: &str = "migrator_egress";
pub const FLOWS_MAP: &str = "FLOWS";
pub const STATS_MAP: &str = "STATS";

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
}

/// Which side of an interface a classifier sits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const fn program_name(self) -> &'static str {
        match self {
            Self::Ingress => INGRESS_PROGRAM,
            Self::Egress => EGRESS_PROGRAM,
        }
    }
}

/// The loaded data plane: both classifiers verified and loaded into the
/// kernel, maps created.
pub struct Dataplane {
    ebpf: Ebpf,
}

impl Dataplane {
    /// Load the embedded object and both classifiers into the kernel.
    pub fn load() -> Result<Self, DataplaneError> {
        let mut ebpf = Ebpf::load(EBPF_OBJECT)?;
        for name in [INGRESS_PROGRAM, EGRESS_PROGRAM] {
            let program: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or(DataplaneError::MissingProgram(name))?
                .try_into()
                .map_err(|source| DataplaneError::Program { name, source })?;
            program
                .load()
                .map_err(|source| DataplaneError::Program { name, source })?;
        }
        Ok(Self { ebpf })
    }

    pub fn classifier(
        &mut self,
        direction: Direction,
    ) -> Result<&mut SchedClassifier, DataplaneError> {
        let name = direction.program_name();
        self.ebpf
            .program_mut(name)
            .ok_or(DataplaneError::MissingProgram(name))?
            .try_into()
            .map_err(|source| DataplaneError::Program { name, source })
    }

    pub fn flows(&mut self) -> Result<HashMap<&mut MapData, FlowKey, FlowPolicy>, DataplaneError> {
        self.map(FLOWS_MAP)
    }

    pub fn stats(&mut self) -> Result<HashMap<&mut MapData, FlowKey, FlowStats>, DataplaneError> {
        self.map(STATS_MAP)
    }

    fn map<V: aya::Pod>(
        &mut self,
        name: &'static str,
    ) -> Result<HashMap<&mut MapData, FlowKey, V>, DataplaneError> {
        let map = self
            .ebpf
            .map_mut(name)
            .ok_or(DataplaneError::MissingMap(name))?;
        HashMap::try_from(map).map_err(|source| DataplaneError::Map { name, source })
    }

    /// Start tracking `key` with `policy`, counters zeroed.
    pub fn track(&mut self, key: FlowKey, policy: FlowPolicy) -> Result<(), DataplaneError> {
        self.stats()?
            .insert(key, FlowStats::default(), 0)
            .map_err(|source| DataplaneError::Map {
                name: STATS_MAP,
                source,
            })?;
        self.flows()?
            .insert(key, policy, 0)
            .map_err(|source| DataplaneError::Map {
                name: FLOWS_MAP,
                source,
            })
    }

    pub fn flow_stats(&mut self, key: &FlowKey) -> Result<Option<FlowStats>, DataplaneError> {
        match self.stats()?.get(key, 0) {
            Ok(stats) => Ok(Some(stats)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(DataplaneError::Map {
                name: STATS_MAP,
                source,
            }),
        }
    }
}
