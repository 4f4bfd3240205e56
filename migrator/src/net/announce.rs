//! Telling the link who owns an address now: gratuitous ARP (IPv4) and
//! unsolicited neighbour advertisements with the override flag (IPv6).
//! Whether the peers listened is proven separately, by an echo round trip
//! ([`super::roundtrip`]).
//!
//! Frames are built with pnet's packet types and sent on an AF_PACKET
//! channel (pnet datalink). Blocking: call from a blocking task.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use pnet::{
    datalink::{self, Channel, DataLinkSender, NetworkInterface},
    packet::{
        arp::{ArpHardwareTypes, ArpOperations, MutableArpPacket},
        ethernet::{EtherTypes, MutableEthernetPacket},
        icmpv6::{
            Icmpv6Code, Icmpv6Packet, Icmpv6Types,
            ndp::{MutableNeighborAdvertPacket, NdpOption, NdpOptionTypes, NeighborAdvertFlags},
        },
        ip::IpNextHeaderProtocols,
        ipv6::MutableIpv6Packet,
    },
    util::MacAddr,
};

#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("interface `{0}` does not exist in this network namespace (see `ip link`)")]
    NoSuchInterface(String),
    #[error("interface `{0}` has no MAC address; only Ethernet-like links are supported")]
    NoMac(String),
    #[error("opening a packet socket on {iface}: {source}")]
    Open {
        iface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("sending on {iface}: {source}")]
    Send {
        iface: String,
        #[source]
        source: std::io::Error,
    },
}

pub struct Link {
    name: String,
    mac: MacAddr,
    tx: Box<dyn DataLinkSender>,
}

impl Link {
    pub fn open(name: &str) -> Result<Self, AnnounceError> {
        let interface: NetworkInterface = datalink::interfaces()
            .into_iter()
            .find(|interface| interface.name == name)
            .ok_or_else(|| AnnounceError::NoSuchInterface(name.to_owned()))?;
        let mac = interface
            .mac
            .filter(|mac| !mac.is_zero())
            .ok_or_else(|| AnnounceError::NoMac(name.to_owned()))?;
        let config = datalink::Config::default();
        let open_error = |source| AnnounceError::Open {
            iface: name.to_owned(),
            source,
        };
        match datalink::channel(&interface, config).map_err(open_error)? {
            Channel::Ethernet(tx, _) => Ok(Self {
                name: name.to_owned(),
                mac,
                tx,
            }),
            _ => Err(open_error(std::io::ErrorKind::Unsupported.into())),
        }
    }

    fn send(&mut self, frame: &[u8]) -> Result<(), AnnounceError> {
        let error = |source| AnnounceError::Send {
            iface: self.name.clone(),
            source,
        };
        match self.tx.send_to(frame, None) {
            Some(result) => result.map_err(error),
            None => Err(error(std::io::ErrorKind::WriteZero.into())),
        }
    }

    /// One gratuitous ARP or unsolicited NA for `ip`.
    pub fn announce(&mut self, ip: IpAddr) -> Result<(), AnnounceError> {
        let frame = match ip {
            IpAddr::V4(ip) => arp_frame(self.mac, ip, ip),
            IpAddr::V6(ip) => unsolicited_na(self.mac, ip),
        };
        self.send(&frame)
    }
}

/// An ARP request from (`mac`, `sender`) for `target`. With sender ==
/// target it is a gratuitous ARP.
fn arp_frame(mac: MacAddr, sender: Ipv4Addr, target: Ipv4Addr) -> Vec<u8> {
    let mut frame = vec![0u8; 14 + 28];
    {
        let mut ethernet = MutableEthernetPacket::new(&mut frame).unwrap_or_else(|| unreachable!());
        ethernet.set_destination(MacAddr::broadcast());
        ethernet.set_source(mac);
        ethernet.set_ethertype(EtherTypes::Arp);
    }
    let mut arp = MutableArpPacket::new(&mut frame[14..]).unwrap_or_else(|| unreachable!());
    arp.set_hardware_type(ArpHardwareTypes::Ethernet);
    arp.set_protocol_type(EtherTypes::Ipv4);
    arp.set_hw_addr_len(6);
    arp.set_proto_addr_len(4);
    arp.set_operation(ArpOperations::Request);
    arp.set_sender_hw_addr(mac);
    arp.set_sender_proto_addr(sender);
    arp.set_target_hw_addr(MacAddr::zero());
    arp.set_target_proto_addr(target);
    frame
}

/// Ethernet + IPv6 header around an ICMPv6 body, checksum filled in.
fn icmpv6_frame(
    mac: MacAddr,
    dst_mac: MacAddr,
    src: Ipv6Addr,
    dst: Ipv6Addr,
    mut body: Vec<u8>,
) -> Vec<u8> {
    let checksum = {
        let packet = Icmpv6Packet::new(&body).unwrap_or_else(|| unreachable!());
        pnet::packet::icmpv6::checksum(&packet, &src, &dst)
    };
    body[2..4].copy_from_slice(&checksum.to_be_bytes());
    let mut frame = vec![0u8; 14 + 40 + body.len()];
    {
        let mut ethernet = MutableEthernetPacket::new(&mut frame).unwrap_or_else(|| unreachable!());
        ethernet.set_destination(dst_mac);
        ethernet.set_source(mac);
        ethernet.set_ethertype(EtherTypes::Ipv6);
    }
    let mut ip = MutableIpv6Packet::new(&mut frame[14..]).unwrap_or_else(|| unreachable!());
    ip.set_version(6);
    ip.set_payload_length(body.len() as u16);
    ip.set_next_header(IpNextHeaderProtocols::Icmpv6);
    // Neighbour discovery is only accepted with hop limit 255 (RFC 4861).
    ip.set_hop_limit(255);
    ip.set_source(src);
    ip.set_destination(dst);
    ip.set_payload(&body);
    frame
}

fn link_layer_option(kind: pnet::packet::icmpv6::ndp::NdpOptionType, mac: MacAddr) -> NdpOption {
    NdpOption {
        option_type: kind,
        length: 1, // in units of 8 bytes: type, length, 6-byte MAC
        data: mac.octets().to_vec(),
    }
}

/// Unsolicited NA to all nodes: "`ip` is at `mac`", override set.
fn unsolicited_na(mac: MacAddr, ip: Ipv6Addr) -> Vec<u8> {
    let mut body = vec![0u8; 24 + 8];
    {
        let mut na = MutableNeighborAdvertPacket::new(&mut body).unwrap_or_else(|| unreachable!());
        na.set_icmpv6_type(Icmpv6Types::NeighborAdvert);
        na.set_icmpv6_code(Icmpv6Code(0));
        na.set_flags(NeighborAdvertFlags::Override);
        na.set_target_addr(ip);
        na.set_options(&[link_layer_option(NdpOptionTypes::TargetLLAddr, mac)]);
    }
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    icmpv6_frame(mac, MacAddr(0x33, 0x33, 0, 0, 0, 1), ip, all_nodes, body)
}
