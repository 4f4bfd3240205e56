//! Delivering held packets to the local stack after a restore: the peer's
//! segments that arrived while the connection was frozen, written back as
//! if they had just been received, so the restored socket acknowledges
//! them at once instead of waiting for the peer's next backed-off
//! retransmit.
//!
//! Each packet goes through a raw socket with the IP header included (the
//! source stays the peer) to its local destination, which the kernel
//! delivers over loopback into TCP. The TCP checksum is recomputed: frames
//! captured at TC on virtual or offloading NICs carry only a partial one.

use std::{
    net::{IpAddr, SocketAddr},
    os::fd::{FromRawFd as _, OwnedFd},
};

use crate::dataplane::spec::FlowSpec;

use pnet::packet::{
    Packet as _,
    ethernet::{EtherTypes, EthernetPacket},
    ip::IpNextHeaderProtocols,
    ipv4::{self, Ipv4Packet, MutableIpv4Packet},
    ipv6::Ipv6Packet,
    tcp::{self, MutableTcpPacket},
};

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("opening a raw {family} socket: {source}")]
    Socket {
        family: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("sending a held packet to {to}: {source}")]
    Send {
        to: IpAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Raw sockets for both families, opened once per delivery batch.
pub struct Injector {
    v4: OwnedFd,
    v6: OwnedFd,
}

/// A raw socket that takes whole IP packets (IPPROTO_RAW implies
/// IP_HDRINCL, and IPV6_HDRINCL for IPv6).
fn raw_socket(domain: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket call; the fd is owned from here on.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::IPPROTO_RAW,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Injector {
    pub fn open() -> Result<Self, InjectError> {
        Ok(Self {
            v4: raw_socket(libc::AF_INET).map_err(|source| InjectError::Socket {
                family: "IPv4",
                source,
            })?,
            v6: raw_socket(libc::AF_INET6).map_err(|source| InjectError::Socket {
                family: "IPv6",
                source,
            })?,
        })
    }

    /// Deliver one held Ethernet frame; returns its connection, and
    /// whether it opens one (a new client's SYN). Frames that are not TCP
    /// over IPv4 or IPv6 are skipped (None).
    pub fn deliver(&self, frame: &[u8]) -> Result<Option<(FlowSpec, bool)>, InjectError> {
        let Some(packet) = rebuild(frame) else {
            return Ok(None);
        };
        let (fd, to) = match packet.destination {
            IpAddr::V4(_) => (&self.v4, SocketAddr::new(packet.destination, 0)),
            IpAddr::V6(_) => (&self.v6, SocketAddr::new(packet.destination, 0)),
        };
        super::send_to(fd, &packet.bytes, to).map_err(|source| InjectError::Send {
            to: packet.destination,
            source,
        })?;
        Ok(Some((packet.flow, packet.syn)))
    }
}

/// An IP packet ready to send: the frame without its Ethernet header, the
/// TCP checksum (and the IPv4 header checksum) recomputed.
#[derive(Debug, PartialEq, Eq)]
pub struct Rebuilt {
    pub destination: IpAddr,
    /// The connection, seen from the receiving host.
    pub flow: FlowSpec,
    /// A SYN without ACK: a client opening the connection.
    pub syn: bool,
    pub bytes: Vec<u8>,
}

/// SYN set, ACK not: the first segment of a connection.
fn opens(flags: u8) -> bool {
    use pnet::packet::tcp::TcpFlags;
    flags & TcpFlags::SYN != 0 && flags & TcpFlags::ACK == 0
}

pub fn rebuild(frame: &[u8]) -> Option<Rebuilt> {
    let ethernet = EthernetPacket::new(frame)?;
    match ethernet.get_ethertype() {
        EtherTypes::Ipv4 => {
            let ip = Ipv4Packet::new(ethernet.payload())?;
            if ip.get_next_level_protocol() != IpNextHeaderProtocols::Tcp {
                return None;
            }
            // Trim Ethernet padding: the IP length is the truth.
            let total = usize::from(ip.get_total_length()).min(ethernet.payload().len());
            let mut bytes = ethernet.payload()[..total].to_vec();
            let header_len = usize::from(ip.get_header_length()) * 4;
            let (source, destination) = (ip.get_source(), ip.get_destination());
            let ports = {
                let mut tcp = MutableTcpPacket::new(bytes.get_mut(header_len..)?)?;
                let checksum = tcp::ipv4_checksum(&tcp.to_immutable(), &source, &destination);
                tcp.set_checksum(checksum);
                (
                    tcp.get_source(),
                    tcp.get_destination(),
                    opens(tcp.get_flags()),
                )
            };
            let mut ip = MutableIpv4Packet::new(&mut bytes)?;
            let checksum = ipv4::checksum(&ip.to_immutable());
            ip.set_checksum(checksum);
            Some(Rebuilt {
                destination: IpAddr::V4(destination),
                flow: FlowSpec {
                    local: SocketAddr::new(IpAddr::V4(destination), ports.1),
                    remote: SocketAddr::new(IpAddr::V4(source), ports.0),
                },
                syn: ports.2,
                bytes,
            })
        }
        EtherTypes::Ipv6 => {
            let ip = Ipv6Packet::new(ethernet.payload())?;
            if ip.get_next_header() != IpNextHeaderProtocols::Tcp {
                return None;
            }
            let total = (40 + usize::from(ip.get_payload_length())).min(ethernet.payload().len());
            let mut bytes = ethernet.payload()[..total].to_vec();
            let (source, destination) = (ip.get_source(), ip.get_destination());
            let ports = {
                let mut tcp = MutableTcpPacket::new(bytes.get_mut(40..)?)?;
                let checksum = tcp::ipv6_checksum(&tcp.to_immutable(), &source, &destination);
                tcp.set_checksum(checksum);
                (
                    tcp.get_source(),
                    tcp.get_destination(),
                    opens(tcp.get_flags()),
                )
            };
            Some(Rebuilt {
                destination: IpAddr::V6(destination),
                flow: FlowSpec {
                    local: SocketAddr::new(IpAddr::V6(destination), ports.1),
                    remote: SocketAddr::new(IpAddr::V6(source), ports.0),
                },
                syn: ports.2,
                bytes,
            })
        }
        _ => None,
    }
}
