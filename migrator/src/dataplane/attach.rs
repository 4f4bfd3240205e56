//! Attaching the classifiers to an interface so they outlive this process:
//! TCX links pinned in bpffs (kernel >= 6.6), or clsact + cls_bpf filters
//! (older kernels, or on request) whose priority and handle are recorded
//! so a later `detach` finds them.

use std::{
    fs,
    path::{Path, PathBuf},
};

use aya::programs::{
    LinkOrder, TcAttachType,
    links::{FdLink, PinnedLink},
    tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
};

use super::{Dataplane, DataplaneError, Direction};
use crate::system::KernelVersion;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum AttachMode {
    /// TCX on kernels >= 6.6, clsact otherwise.
    #[default]
    Auto,
    /// TCX links (kernel >= 6.6).
    Tcx,
    /// clsact qdisc + cls_bpf filters (any kernel).
    Clsact,
}

/// How an interface is attached, as found in the pin root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attachment {
    Tcx,
    Clsact,
}

fn links_dir(root: &Path) -> PathBuf {
    root.join("links")
}

/// bpffs refuses names with dots; interface names cannot hold ':', so a
/// VLAN's `eth0.100` is pinned as `eth0:100`.
fn pin_name(iface: &str) -> String {
    iface.replace('.', ":")
}

fn tcx_pin(root: &Path, iface: &str, direction: Direction) -> PathBuf {
    links_dir(root).join(format!("{}@{}", pin_name(iface), direction.name()))
}

fn clsact_record(root: &Path, iface: &str) -> PathBuf {
    links_dir(root).join(format!("{}@netlink", pin_name(iface)))
}

const fn attach_type(direction: Direction) -> TcAttachType {
    match direction {
        Direction::Ingress => TcAttachType::Ingress,
        Direction::Egress => TcAttachType::Egress,
    }
}

fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> DataplaneError {
    let path = path.to_owned();
    move |source| DataplaneError::Io {
        action,
        path,
        source,
    }
}

fn interface_exists(iface: &str) -> bool {
    Path::new("/sys/class/net").join(iface).exists() || {
        // /sys may show another namespace (mounted before setns); ask the kernel.
        let Ok(name) = std::ffi::CString::new(iface) else {
            return false;
        };
        // SAFETY: `name` is a valid NUL-terminated string.
        unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
    }
}

/// The rule for whoever stops using the data plane (a migration, a
/// watcher): once nothing is tracked, nothing stays attached or pinned.
/// Returns whether it detached.
pub fn detach_if_unused(root: &Path, table: &super::FlowTable) -> bool {
    if !table.is_empty() {
        return false;
    }
    for iface in attached_interfaces(root) {
        let _ = detach(root, &iface);
    }
    true
}

/// How `iface` is attached under `root`, if at all.
pub fn attachment(root: &Path, iface: &str) -> Option<Attachment> {
    if tcx_pin(root, iface, Direction::Ingress).exists() {
        Some(Attachment::Tcx)
    } else if clsact_record(root, iface).exists() {
        Some(Attachment::Clsact)
    } else {
        None
    }
}

/// Interfaces with an attachment recorded under `root`.
pub fn attached_interfaces(root: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(links_dir(root))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let (iface, kind) = name.rsplit_once('@')?;
            matches!(kind, "ingress" | "netlink").then(|| iface.replace(':', "."))
        })
        .collect();
    names.sort();
    names.dedup();
    names
}

impl Dataplane {
    /// Attach both classifiers to `iface` unless already attached. Returns
    /// the attachment and whether this call made it.
    pub fn attach(
        &mut self,
        iface: &str,
        mode: AttachMode,
    ) -> Result<(Attachment, bool), DataplaneError> {
        let root = self.pin_root.clone().ok_or(DataplaneError::MissingMap(
            "pinned maps: load with Dataplane::load_pinned",
        ))?;
        if !interface_exists(iface) {
            // Loading pinned the maps; with nothing attached they go again.
            let _ = detach(&root, iface);
            return Err(DataplaneError::NoSuchInterface(iface.to_owned()));
        }
        if let Some(existing) = attachment(&root, iface) {
            return Ok((existing, false));
        }
        let links = links_dir(&root);
        fs::create_dir_all(&links).map_err(io("creating", &links))?;
        let use_tcx = match mode {
            AttachMode::Tcx => true,
            AttachMode::Clsact => false,
            AttachMode::Auto => KernelVersion::running()
                .ok()
                .and_then(|(_, version)| version)
                .is_some_and(|version| version >= KernelVersion::TCX),
        };
        tracing::debug!(
            "attaching to {iface} with {} ({mode:?} asked), links pinned in {}",
            if use_tcx { "TCX" } else { "clsact" },
            links.display()
        );
        let (result, how) = if use_tcx {
            (self.attach_tcx(&root, iface), Attachment::Tcx)
        } else {
            (self.attach_clsact(&root, iface), Attachment::Clsact)
        };
        if let Err(err) = result {
            // Leave nothing half-attached behind; the attach error is the
            // one worth reporting.
            let _ = detach(&root, iface);
            return Err(err);
        }
        Ok((how, true))
    }

    /// Attach one classifier and take ownership of its link (dropping the
    /// link would detach it).
    fn attach_direction(
        &mut self,
        iface: &str,
        direction: Direction,
        options: TcAttachOptions,
    ) -> Result<SchedClassifierLink, DataplaneError> {
        let err = |source| DataplaneError::Attach {
            iface: iface.to_owned(),
            direction: direction.name(),
            source,
        };
        let program = self.classifier(direction)?;
        let id = program
            .attach_with_options(iface, attach_type(direction), options)
            .map_err(err)?;
        program.take_link(id).map_err(err)
    }

    fn attach_tcx(&mut self, root: &Path, iface: &str) -> Result<(), DataplaneError> {
        for direction in Direction::BOTH {
            let link = self.attach_direction(
                iface,
                direction,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )?;
            let fd_link: FdLink =
                link.try_into()
                    .map_err(
                        |source: aya::programs::links::LinkError| DataplaneError::Io {
                            action: "taking the TCX link of",
                            path: PathBuf::from(iface),
                            source: std::io::Error::other(source.to_string()),
                        },
                    )?;
            let pin = tcx_pin(root, iface, direction);
            fd_link.pin(&pin).map_err(|source| DataplaneError::Io {
                action: "pinning the TCX link at",
                path: pin.clone(),
                source: std::io::Error::other(source.to_string()),
            })?;
        }
        Ok(())
    }

    fn attach_clsact(&mut self, root: &Path, iface: &str) -> Result<(), DataplaneError> {
        // EEXIST: the qdisc is there already (ours or someone else's).
        if let Err(err) = tc::qdisc_add_clsact(iface) {
            let exists =
                matches!(&err, tc::TcError::NetlinkError(e) if e.to_string().contains("exists"));
            if !exists {
                return Err(DataplaneError::Attach {
                    iface: iface.to_owned(),
                    direction: "clsact qdisc",
                    source: err.into(),
                });
            }
        }
        // bpffs holds no regular files: each filter is recorded as an empty
        // directory `<direction>-<priority>-<handle>`, written before the
        // link is let go so a failure half-way can still be undone.
        let record = clsact_record(root, iface);
        for direction in Direction::BOTH {
            let link = self.attach_direction(
                iface,
                direction,
                TcAttachOptions::Netlink(NlOptions::default()),
            )?;
            let err = |source| DataplaneError::Attach {
                iface: iface.to_owned(),
                direction: direction.name(),
                source,
            };
            let priority = link.priority().map_err(err)?;
            let handle = u32::from(link.handle().map_err(err)?);
            let entry = record.join(format!("{}-{priority}-{handle}", direction.name()));
            fs::create_dir_all(&entry).map_err(io("recording the filter at", &entry))?;
            // The filter must outlive this process: dropping the link would
            // remove it. `detach` rebuilds it from the record.
            std::mem::forget(link);
        }
        Ok(())
    }
}

/// Detach both classifiers from `iface`, whatever part of an attachment
/// exists (so it also undoes one that failed half-way). When no interface
/// is left, the pinned maps and the root go too. Returns false if nothing
/// was attached.
pub fn detach(root: &Path, iface: &str) -> Result<bool, DataplaneError> {
    let mut detached = false;
    for direction in Direction::BOTH {
        let pin = tcx_pin(root, iface, direction);
        if !pin.exists() {
            continue;
        }
        let link = PinnedLink::from_pin(&pin).map_err(|source| DataplaneError::Io {
            action: "opening the pinned link",
            path: pin.clone(),
            source: std::io::Error::other(source.to_string()),
        })?;
        // Unpinned and closed, the link's last reference is gone and the
        // kernel detaches the program.
        drop(link.unpin().map_err(io("unpinning", &pin))?);
        detached = true;
    }
    let record = clsact_record(root, iface);
    if record.exists() {
        let entries = fs::read_dir(&record).map_err(io("reading", &record))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let mut words = name.split('-');
            let (Some(direction), Some(priority), Some(handle)) =
                (words.next(), words.next(), words.next())
            else {
                continue;
            };
            let direction = if direction == "ingress" {
                Direction::Ingress
            } else {
                Direction::Egress
            };
            let (Ok(priority), Ok(handle)) = (priority.parse::<u16>(), handle.parse::<u32>())
            else {
                continue;
            };
            // An interface that is gone took its filters with it.
            if let Ok(link) = SchedClassifierLink::attached(
                iface,
                attach_type(direction),
                priority,
                TcHandle::from(handle),
                None,
            ) {
                drop(link); // dropping an NlLink removes the filter
            }
            let entry = entry.path();
            fs::remove_dir(&entry).map_err(io("removing", &entry))?;
        }
        fs::remove_dir(&record).map_err(io("removing", &record))?;
        detached = true;
    }
    if attached_interfaces(root).is_empty() {
        remove_pins(root)?;
    }
    Ok(detached)
}

/// Remove the pinned maps and the (then empty) pin directories.
fn remove_pins(root: &Path) -> Result<(), DataplaneError> {
    let maps = super::maps_dir(root);
    if let Ok(entries) = fs::read_dir(&maps) {
        for entry in entries.flatten() {
            let path = entry.path();
            fs::remove_file(&path).map_err(io("unpinning", &path))?;
        }
    }
    for dir in [maps, links_dir(root), root.to_owned()] {
        match fs::remove_dir(&dir) {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(DataplaneError::Io {
                    action: "removing",
                    path: dir,
                    source,
                });
            }
        }
    }
    Ok(())
}
