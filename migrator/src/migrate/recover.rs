//! `migrator recover`: after a migration that could not finish its own
//! rollback (a killed `migrate`, a rollback that failed, an in-doubt
//! hand-over whose destination did not take over), put the addresses
//! back, bring the process back from the images if it died here, and lift
//! the lock.
//!
//! A dump that never finished (no `stats-dump`: CRIU writes it only
//! once the tree is dumped and killed) left the tree running here, CRIU
//! having resumed it: then only the addresses and the lock need putting
//! right. A finished dump whose pages streamed to the destination has no
//! pages here: those images can only be restored there.

use std::path::Path;

use crate::{
    channel::message::ServiceAddress,
    criu::CriuBinary,
    dataplane::{self, FlowTable},
    net::address::Netlink,
};

/// What recover did, for the user.
pub struct Recovered {
    pub pid: Option<i32>,
    pub addresses_added: Vec<String>,
    pub flows_released: usize,
    pub services_released: usize,
    pub detached: Vec<String>,
}

/// Put the addresses back on `iface` (those missing), restore from
/// `images`, release every lock in this network namespace and detach.
pub async fn recover(
    images: &Path,
    addresses: &[ServiceAddress],
    iface: Option<&str>,
    criu: &CriuBinary,
) -> anyhow::Result<Recovered> {
    if !images.join(crate::criu::swrk::DUMP_LOG).exists() {
        anyhow::bail!(
            "{} holds no CRIU dump (no {}); give the directory migrate named",
            images.display(),
            crate::criu::swrk::DUMP_LOG
        );
    }
    let mut recovered = Recovered {
        pid: None,
        addresses_added: Vec::new(),
        flows_released: 0,
        services_released: 0,
        detached: Vec::new(),
    };
    if let Some(iface) = iface {
        let netlink = Netlink::connect()?;
        let index = netlink.link_index(iface).await?;
        for address in addresses {
            if netlink.find(address.ip).await?.is_none() {
                netlink
                    .add(iface, index, address.ip, address.prefix)
                    .await?;
                recovered
                    .addresses_added
                    .push(format!("{address} on {iface}"));
            }
        }
    }
    match dump_state(images)? {
        DumpState::Unfinished => {}
        DumpState::PagesElsewhere => anyhow::bail!(
            "the dump in {} finished and streamed the process's memory to the destination: these images hold no pages. The process runs there, or its images are kept there (the agent's log names them): run `migrator recover --images DIR` on the destination",
            images.display()
        ),
        DumpState::Complete => {
            let (criu, dir) = (criu.clone(), images.to_owned());
            let outcome =
                tokio::task::spawn_blocking(move || criu.restore(&dir, |_| Ok(()))).await??;
            recovered.pid = outcome.pid;
        }
    }
    let root = dataplane::default_pin_root();
    if let Ok(mut table) = FlowTable::open_pinned(&root) {
        (recovered.flows_released, recovered.services_released) = table.release_all()?;
        for iface in dataplane::attached_interfaces(&root) {
            dataplane::detach(&root, &iface)?;
            recovered.detached.push(iface);
        }
    }
    Ok(recovered)
}

/// How far the dump whose images these are got.
#[derive(Debug, PartialEq, Eq)]
enum DumpState {
    /// Not to its end: CRIU resumed the tree where it ran.
    Unfinished,
    /// Finished, with the pages sent to a page server elsewhere.
    PagesElsewhere,
    /// Finished, every image here.
    Complete,
}

fn dump_state(images: &Path) -> anyhow::Result<DumpState> {
    if !images.join(crate::criu::stats::DUMP_STATS_FILE).exists() {
        return Ok(DumpState::Unfinished);
    }
    let has_pages = std::fs::read_dir(images)?
        .filter_map(Result::ok)
        .any(|entry| entry.file_name().to_string_lossy().starts_with("pages-"));
    Ok(if has_pages {
        DumpState::Complete
    } else {
        DumpState::PagesElsewhere
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dump_is_judged_by_its_stats_and_its_pages() {
        let dir = std::env::temp_dir().join(format!("migrator-recover-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_default();
        let touch = |name: &str| std::fs::write(dir.join(name), b"x").unwrap_or_default();
        touch("inventory.img");
        touch("pagemap-1.img");
        assert_eq!(dump_state(&dir).ok(), Some(DumpState::Unfinished));
        touch(crate::criu::stats::DUMP_STATS_FILE);
        assert_eq!(dump_state(&dir).ok(), Some(DumpState::PagesElsewhere));
        touch("pages-1.img");
        assert_eq!(dump_state(&dir).ok(), Some(DumpState::Complete));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
