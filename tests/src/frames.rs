//! Ethernet/IPv4/IPv6/TCP frames built with pnet's packet types.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use pnet::{
    packet::{
        ethernet::{EtherTypes, MutableEthernetPacket},
        ip::IpNextHeaderProtocols,
        ipv4::{self, MutableIpv4Packet},
        ipv6::MutableIpv6Packet,
        tcp::{self, MutableTcpPacket, TcpFlags},
        udp::MutableUdpPacket,
    },
    util::MacAddr,
};

pub use pnet::packet::tcp::TcpFlags as Flags;

const ETH: usize = 14;
const IPV4: usize = 20;
const IPV6: usize = 40;
const TCP: usize = 20;

/// One TCP segment to put on the wire.
#[derive(Clone, Debug)]
pub struct Segment {
    pub src: IpAddr,
    pub src_port: u16,
    pub dst: IpAddr,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
    pub window: u16,
    pub payload: Vec<u8>,
}

impl Segment {
    pub fn new(src: IpAddr, src_port: u16, dst: IpAddr, dst_port: u16) -> Self {
        Self {
            src,
            src_port,
            dst,
            dst_port,
            seq: 1000,
            ack: 1,
            flags: TcpFlags::ACK,
            window: 65_535,
            payload: Vec::new(),
        }
    }

    pub fn seq(mut self, seq: u32) -> Self {
        self.seq = seq;
        self
    }

    pub fn flags(mut self, flags: u8) -> Self {
        self.flags = flags;
        self
    }

    pub fn payload(mut self, len: usize) -> Self {
        self.payload = (0..len).map(|i| (i % 251) as u8).collect();
        self
    }

    /// The full Ethernet frame with valid IP and TCP checksums.
    pub fn frame(&self) -> Vec<u8> {
        let tcp_len = TCP + self.payload.len();
        let mut tcp_bytes = vec![0u8; tcp_len];
        {
            let mut tcp = MutableTcpPacket::new(&mut tcp_bytes).expect("buffer fits a TCP header");
            tcp.set_source(self.src_port);
            tcp.set_destination(self.dst_port);
            tcp.set_sequence(self.seq);
            tcp.set_acknowledgement(self.ack);
            tcp.set_data_offset(5);
            tcp.set_flags(self.flags);
            tcp.set_window(self.window);
            tcp.set_payload(&self.payload);
            let checksum = match (self.src, self.dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => tcp::ipv4_checksum(&tcp.to_immutable(), &s, &d),
                (IpAddr::V6(s), IpAddr::V6(d)) => tcp::ipv6_checksum(&tcp.to_immutable(), &s, &d),
                _ => panic!("mixed address families in one segment"),
            };
            tcp.set_checksum(checksum);
        }
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                ipv4_frame(s, d, IpNextHeaderProtocols::Tcp.0, &tcp_bytes)
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                ipv6_frame(s, d, IpNextHeaderProtocols::Tcp.0, &tcp_bytes)
            }
            _ => panic!("mixed address families in one segment"),
        }
    }
}

fn ethernet(ethertype: pnet::packet::ethernet::EtherType, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0u8; ETH + payload.len()];
    let mut eth = MutableEthernetPacket::new(&mut frame).expect("buffer fits an Ethernet header");
    eth.set_destination(MacAddr::new(0x02, 0, 0, 0, 0, 0x01));
    eth.set_source(MacAddr::new(0x02, 0, 0, 0, 0, 0x02));
    eth.set_ethertype(ethertype);
    eth.set_payload(payload);
    frame
}

pub fn ipv4_frame(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, l4: &[u8]) -> Vec<u8> {
    let mut ip_bytes = vec![0u8; IPV4 + l4.len()];
    {
        let mut ip = MutableIpv4Packet::new(&mut ip_bytes).expect("buffer fits an IPv4 header");
        ip.set_version(4);
        ip.set_header_length(5);
        ip.set_total_length((IPV4 + l4.len()) as u16);
        ip.set_ttl(64);
        ip.set_next_level_protocol(pnet::packet::ip::IpNextHeaderProtocol(protocol));
        ip.set_source(src);
        ip.set_destination(dst);
        ip.set_payload(l4);
        let checksum = ipv4::checksum(&ip.to_immutable());
        ip.set_checksum(checksum);
    }
    ethernet(EtherTypes::Ipv4, &ip_bytes)
}

pub fn ipv6_frame(src: Ipv6Addr, dst: Ipv6Addr, next_header: u8, l4: &[u8]) -> Vec<u8> {
    let mut ip_bytes = vec![0u8; IPV6 + l4.len()];
    {
        let mut ip = MutableIpv6Packet::new(&mut ip_bytes).expect("buffer fits an IPv6 header");
        ip.set_version(6);
        ip.set_payload_length(l4.len() as u16);
        ip.set_next_header(pnet::packet::ip::IpNextHeaderProtocol(next_header));
        ip.set_hop_limit(64);
        ip.set_source(src);
        ip.set_destination(dst);
        ip.set_payload(l4);
    }
    ethernet(EtherTypes::Ipv6, &ip_bytes)
}

/// A UDP datagram between the same kind of endpoints, for pass-through tests.
pub fn udp_v4(src: Ipv4Addr, src_port: u16, dst: Ipv4Addr, dst_port: u16) -> Vec<u8> {
    let mut udp_bytes = vec![0u8; 8 + 4];
    {
        let mut udp = MutableUdpPacket::new(&mut udp_bytes).expect("buffer fits a UDP header");
        udp.set_source(src_port);
        udp.set_destination(dst_port);
        udp.set_length(12);
    }
    ipv4_frame(src, dst, IpNextHeaderProtocols::Udp.0, &udp_bytes)
}
