//! Service addresses over rtnetlink: which interface holds an address, add
//! one (IPv6 without duplicate address detection, so it is usable at once
//! rather than "tentative" for a second or two), remove one.

use std::net::IpAddr;

use futures::TryStreamExt as _;
use rtnetlink::packet_route::{
    address::{AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage},
    link::LinkAttribute,
};

#[derive(Debug, thiserror::Error)]
pub enum AddressError {
    #[error("opening a netlink socket: {0}")]
    Connect(#[source] std::io::Error),
    #[error("interface `{0}` does not exist in this network namespace (see `ip link`)")]
    NoSuchInterface(String),
    #[error("{action} {ip}/{prefix} on {iface}: {source}")]
    Change {
        action: &'static str,
        ip: IpAddr,
        prefix: u8,
        iface: String,
        #[source]
        source: Box<rtnetlink::Error>,
    },
    #[error("listing {what}: {source}")]
    List {
        what: &'static str,
        #[source]
        source: Box<rtnetlink::Error>,
    },
}

/// An address as assigned to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Assigned {
    pub ip: IpAddr,
    pub prefix: u8,
    pub index: u32,
}

pub struct Netlink {
    handle: rtnetlink::Handle,
}

impl Netlink {
    /// Must run inside a tokio runtime: the connection is a task on it.
    pub fn connect() -> Result<Self, AddressError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(AddressError::Connect)?;
        tokio::spawn(connection);
        Ok(Self { handle })
    }

    pub async fn link_index(&self, name: &str) -> Result<u32, AddressError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(link.header.index),
            // The kernel answers ENODEV for an unknown name.
            Ok(None) | Err(_) => Err(AddressError::NoSuchInterface(name.to_owned())),
        }
    }

    /// Name of the interface with `index`.
    pub async fn link_name(&self, index: u32) -> Result<String, AddressError> {
        let mut links = self.handle.link().get().match_index(index).execute();
        let link = links
            .try_next()
            .await
            .map_err(|source| AddressError::List {
                what: "interfaces",
                source: Box::new(source),
            })?
            .ok_or_else(|| AddressError::NoSuchInterface(format!("#{index}")))?;
        link.attributes
            .iter()
            .find_map(|attribute| match attribute {
                LinkAttribute::IfName(name) => Some(name.clone()),
                _ => None,
            })
            .ok_or_else(|| AddressError::NoSuchInterface(format!("#{index}")))
    }

    /// Every address of every interface in this namespace.
    pub async fn addresses(&self) -> Result<Vec<Assigned>, AddressError> {
        Ok(self
            .messages()
            .await?
            .iter()
            .filter_map(|message| {
                Some(Assigned {
                    ip: address_of(message)?,
                    prefix: message.header.prefix_len,
                    index: message.header.index,
                })
            })
            .collect())
    }

    /// Where `ip` is assigned, if anywhere.
    pub async fn find(&self, ip: IpAddr) -> Result<Option<Assigned>, AddressError> {
        Ok(self.addresses().await?.into_iter().find(|a| a.ip == ip))
    }

    /// Where `ip` is assigned, with the interface's name.
    pub async fn holder(&self, ip: IpAddr) -> Result<Option<(Assigned, String)>, AddressError> {
        match self.find(ip).await? {
            Some(found) => Ok(Some((found, self.link_name(found.index).await?))),
            None => Ok(None),
        }
    }

    /// Names of the interfaces holding any of `ips` (one address listing
    /// for all of them).
    pub async fn interfaces_holding(
        &self,
        ips: &std::collections::BTreeSet<IpAddr>,
    ) -> Result<std::collections::BTreeSet<String>, AddressError> {
        let indexes: std::collections::BTreeSet<u32> = self
            .addresses()
            .await?
            .into_iter()
            .filter(|assigned| ips.contains(&assigned.ip))
            .map(|assigned| assigned.index)
            .collect();
        let mut names = std::collections::BTreeSet::new();
        for index in indexes {
            names.insert(self.link_name(index).await?);
        }
        Ok(names)
    }

    async fn messages(&self) -> Result<Vec<AddressMessage>, AddressError> {
        self.handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|source| AddressError::List {
                what: "addresses",
                source: Box::new(source),
            })
    }

    /// Add `ip/prefix` to the interface; IPv6 with `nodad`.
    pub async fn add(
        &self,
        iface: &str,
        index: u32,
        ip: IpAddr,
        prefix: u8,
    ) -> Result<(), AddressError> {
        let mut request = self.handle.address().add(index, ip, prefix);
        if ip.is_ipv6() {
            let message = request.message_mut();
            message.header.flags |= AddressHeaderFlags::Nodad;
            message
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        request
            .execute()
            .await
            .map_err(|source| AddressError::Change {
                action: "adding",
                ip,
                prefix,
                iface: iface.to_owned(),
                source: Box::new(source),
            })
    }

    /// Remove `ip` from wherever it is assigned. False if it was not.
    pub async fn remove(&self, ip: IpAddr) -> Result<bool, AddressError> {
        let Some(message) = self
            .messages()
            .await?
            .into_iter()
            .find(|message| address_of(message) == Some(ip))
        else {
            return Ok(false);
        };
        let (prefix, index) = (message.header.prefix_len, message.header.index);
        let iface = self
            .link_name(index)
            .await
            .unwrap_or_else(|_| format!("#{index}"));
        self.handle
            .address()
            .del(message)
            .execute()
            .await
            .map_err(|source| AddressError::Change {
                action: "removing",
                ip,
                prefix,
                iface,
                source: Box::new(source),
            })?;
        Ok(true)
    }
}

/// The interface-local address of a message (IFA_LOCAL for IPv4, where
/// IFA_ADDRESS can be a point-to-point peer; IFA_ADDRESS for IPv6).
fn address_of(message: &AddressMessage) -> Option<IpAddr> {
    let pick = |want_local: bool| {
        message
            .attributes
            .iter()
            .find_map(|attribute| match attribute {
                AddressAttribute::Local(ip) if want_local => Some(*ip),
                AddressAttribute::Address(ip) if !want_local => Some(*ip),
                _ => None,
            })
    };
    pick(true).or_else(|| pick(false))
}

/// True if `ip` lies inside `network/prefix`.
pub fn contains(network: IpAddr, prefix: u8, ip: IpAddr) -> bool {
    match (network, ip) {
        (IpAddr::V4(net), IpAddr::V4(ip)) => {
            let mask = u32::MAX
                .checked_shl(32 - u32::from(prefix.min(32)))
                .unwrap_or(0);
            u32::from(net) & mask == u32::from(ip) & mask
        }
        (IpAddr::V6(net), IpAddr::V6(ip)) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(prefix.min(128)))
                .unwrap_or(0);
            u128::from(net) & mask == u128::from(ip) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_containment() {
        let net: IpAddr = "198.18.0.2".parse().unwrap();
        assert!(contains(net, 24, "198.18.0.1".parse().unwrap()));
        assert!(!contains(net, 24, "198.18.1.1".parse().unwrap()));
        assert!(!contains(net, 32, "198.18.0.1".parse().unwrap()));
        assert!(contains(net, 0, "10.0.0.1".parse().unwrap()));
        let net6: IpAddr = "2001:db8::2".parse().unwrap();
        assert!(contains(net6, 64, "2001:db8::1".parse().unwrap()));
        assert!(!contains(net6, 128, "2001:db8::1".parse().unwrap()));
        assert!(!contains(net6, 64, "198.18.0.1".parse().unwrap()));
    }
}
