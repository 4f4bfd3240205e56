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
//!
//! Their TCP timestamps are blanked (the option becomes NOPs, SYNs keep
//! theirs). The moment the lock lets go, the peer's live segments race the
//! held ones into the socket; one that wins carries a newer timestamp, and
//! the socket would then drop every held segment after it as old (PAWS:
//! seen here as `TcpExtPAWSEstab`), leaving a hole the peer fills only at
//! its next retransmit timeout, about 200 ms later. A segment without the
//! option is not checked against it (Linux accepts one on a connection
//! that uses timestamps).

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

/// TCP option kinds (RFC 9293, RFC 7323).
const OPTION_END: u8 = 0;
const OPTION_NOP: u8 = 1;
const OPTION_TIMESTAMPS: u8 = 8;

/// Overwrite the timestamps option of the TCP header `tcp` (header and
/// payload) with NOPs, unless it is a SYN (whose option negotiates them).
fn blank_timestamps(tcp: &mut [u8]) {
    use pnet::packet::tcp::TcpFlags;
    let Some(&offset) = tcp.get(12) else {
        return;
    };
    if tcp.get(13).is_some_and(|flags| flags & TcpFlags::SYN != 0) {
        return;
    }
    let header = (usize::from(offset >> 4) * 4).min(tcp.len());
    let mut at = 20;
    while at < header {
        match tcp[at] {
            OPTION_END => break,
            OPTION_NOP => at += 1,
            kind => {
                let Some(&len) = tcp.get(at + 1) else { break };
                let len = usize::from(len);
                if len < 2 || at + len > header {
                    break;
                }
                if kind == OPTION_TIMESTAMPS {
                    tcp[at..at + len].fill(OPTION_NOP);
                }
                at += len;
            }
        }
    }
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
                blank_timestamps(bytes.get_mut(header_len..)?);
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
                blank_timestamps(bytes.get_mut(40..)?);
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

#[cfg(test)]
mod tests {
    use super::*;
    use pnet::packet::{
        ethernet::MutableEthernetPacket,
        tcp::{TcpFlags, TcpPacket},
    };
    use std::net::Ipv4Addr;

    /// An Ethernet + IPv4 + TCP frame whose options are NOP, NOP, TS.
    fn frame(flags: u8) -> Vec<u8> {
        let (tcp_len, payload) = (32, 5);
        let mut frame = vec![0u8; 14 + 20 + tcp_len + payload];
        MutableEthernetPacket::new(&mut frame)
            .unwrap()
            .set_ethertype(EtherTypes::Ipv4);
        let mut ip = MutableIpv4Packet::new(&mut frame[14..]).unwrap();
        ip.set_version(4);
        ip.set_header_length(5);
        ip.set_total_length((20 + tcp_len + payload) as u16);
        ip.set_ttl(64);
        ip.set_next_level_protocol(IpNextHeaderProtocols::Tcp);
        ip.set_source(Ipv4Addr::new(198, 18, 0, 1));
        ip.set_destination(Ipv4Addr::new(198, 18, 0, 100));
        let tcp = &mut frame[34..];
        tcp[0..2].copy_from_slice(&9000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&40000u16.to_be_bytes());
        tcp[12] = ((tcp_len / 4) as u8) << 4;
        tcp[13] = flags;
        tcp[20..32].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 7, 0, 0, 0, 9]);
        tcp[32..].copy_from_slice(b"hello");
        frame
    }

    #[test]
    fn held_segments_lose_their_timestamps_and_keep_a_valid_checksum() {
        let rebuilt = rebuild(&frame(TcpFlags::ACK | TcpFlags::PSH)).unwrap();
        let tcp = TcpPacket::new(&rebuilt.bytes[20..]).unwrap();
        assert_eq!(&rebuilt.bytes[40..52], &[1u8; 12]);
        assert_eq!(tcp.payload(), b"hello");
        let (source, destination) = (Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 100));
        assert_eq!(
            tcp.get_checksum(),
            tcp::ipv4_checksum(&tcp, &source, &destination)
        );
    }

    #[test]
    fn a_syn_keeps_its_timestamps() {
        let rebuilt = rebuild(&frame(TcpFlags::SYN)).unwrap();
        assert_eq!(&rebuilt.bytes[42..44], &[8, 10]);
        assert!(rebuilt.syn);
    }
}
