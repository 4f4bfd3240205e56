//! `migrator recover`: bring back a process from the images a migration
//! left behind (a rollback that failed, a killed `migrate`, an in-doubt
//! hand-over whose destination did not take over), and lift the lock.

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
    if !images.join("inventory.img").exists() {
        anyhow::bail!(
            "{} holds no CRIU images (no inventory.img); give the directory migrate named",
            images.display()
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
    let (criu, dir) = (criu.clone(), images.to_owned());
    let outcome = tokio::task::spawn_blocking(move || criu.restore(&dir, |_| Ok(()))).await??;
    recovered.pid = outcome.pid;
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
