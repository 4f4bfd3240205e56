//! Proving where a peer's packets for the service address go: an ICMP
//! echo request sent from the service address to the peer, and its reply
//! received here. Whatever steers the peer's traffic for that address (its
//! neighbour cache on a shared link, the routers' tables in a routed
//! network), the reply follows it, so an answer here means the peer's
//! packets reach this host now. Echo is answered by the peer's kernel and
//! touches none of its connections.
//!
//! Raw ICMP sockets bound to the service address (root, CAP_NET_RAW);
//! blocking: call from a blocking task.

use std::{
    io,
    mem::size_of,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use pnet::packet::icmp::{self, IcmpTypes, echo_request::MutableEchoRequestPacket};

const ICMP_ECHO_REPLY: u8 = 0;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;

/// One peer to prove: probes go from `from` (a service address of the
/// peer's family) to `peer`.
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    pub from: IpAddr,
    pub peer: IpAddr,
}

/// Send a probe to every peer every `every` until each has answered, or
/// until `timeout` for the `required` ones and `optional_wait` for the
/// others. For each, when its first answer came (from the call's start),
/// or None.
pub fn round_trips(
    probes: &[Probe],
    required: &[bool],
    timeout: Duration,
    optional_wait: Duration,
    every: Duration,
) -> io::Result<Vec<Option<Duration>>> {
    let started = Instant::now();
    // Our echo identifier: the replies to another prober's echo (a raw
    // socket sees every ICMP message to its address) are not ours.
    let id = (std::process::id() as u16)
        ^ (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.subsec_nanos()) as u16);
    let sockets = probes
        .iter()
        .map(|probe| open(probe.from))
        .collect::<io::Result<Vec<_>>>()?;
    let mut answered: Vec<Option<Duration>> = vec![None; probes.len()];
    let mut seq: u16 = 0;
    let mut next_send = started;
    let waiting = |answered: &[Option<Duration>]| {
        let elapsed = started.elapsed();
        answered.iter().enumerate().any(|(i, answer)| {
            let limit = if required.get(i).copied().unwrap_or(true) {
                timeout
            } else {
                optional_wait.min(timeout)
            };
            answer.is_none() && elapsed < limit
        })
    };
    while waiting(&answered) {
        if Instant::now() >= next_send {
            seq = seq.wrapping_add(1);
            for ((probe, socket), done) in probes.iter().zip(&sockets).zip(&answered) {
                if done.is_none() {
                    // A send that fails (no route yet, no neighbour) is
                    // just a probe without answer: the next one may pass.
                    let _ = send_echo(socket, probe.peer, id, seq);
                }
            }
            next_send += every;
        }
        let wait = next_send
            .saturating_duration_since(Instant::now())
            .min(timeout.saturating_sub(started.elapsed()))
            .max(Duration::from_micros(100));
        let mut fds: Vec<libc::pollfd> = sockets
            .iter()
            .map(|s| libc::pollfd {
                fd: s.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: fds is a valid array of pollfd for the call's duration.
        let ready = unsafe {
            libc::poll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                wait.as_millis().max(1) as i32,
            )
        };
        if ready <= 0 {
            continue;
        }
        for (i, fd) in fds.iter().enumerate() {
            if fd.revents & libc::POLLIN == 0 {
                continue;
            }
            while let Some(from) = receive_reply(&sockets[i], probes[i].from, id) {
                for (j, probe) in probes.iter().enumerate() {
                    if probe.peer == from
                        && probe.from.is_ipv4() == from.is_ipv4()
                        && answered[j].is_none()
                    {
                        answered[j] = Some(started.elapsed());
                    }
                }
            }
        }
    }
    Ok(answered)
}

fn open(from: IpAddr) -> io::Result<OwnedFd> {
    let (domain, protocol) = match from {
        IpAddr::V4(_) => (libc::AF_INET, libc::IPPROTO_ICMP),
        IpAddr::V6(_) => (libc::AF_INET6, libc::IPPROTO_ICMPV6),
    };
    // SAFETY: socket has no memory preconditions; the fd is owned below.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by socket and is owned by nobody else.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // Sent from the service address; replies to it only.
    let (addr, len) = super::sockaddr(SocketAddr::new(from, 0));
    // SAFETY: addr holds a sockaddr of `len` bytes for the socket's family.
    if unsafe { libc::bind(socket.as_raw_fd(), (&raw const addr).cast(), len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

fn send_echo(socket: &OwnedFd, to: IpAddr, id: u16, seq: u16) -> io::Result<()> {
    let mut buf = [0u8; 16];
    {
        let mut echo = MutableEchoRequestPacket::new(&mut buf)
            .ok_or_else(|| io::Error::other("echo buffer too small"))?;
        echo.set_icmp_type(IcmpTypes::EchoRequest);
        echo.set_identifier(id);
        echo.set_sequence_number(seq);
        echo.set_payload(b"migrator");
    }
    if to.is_ipv4() {
        let checksum = icmp::checksum(
            &icmp::IcmpPacket::new(&buf).ok_or_else(|| io::Error::other("echo packet"))?,
        );
        buf[2..4].copy_from_slice(&checksum.to_be_bytes());
    } else {
        // Same layout as ICMP's echo; the kernel fills in ICMPv6's
        // checksum (it covers a pseudo-header only it knows in full).
        buf[0] = ICMPV6_ECHO_REQUEST;
        buf[2..4].copy_from_slice(&[0, 0]);
    }
    super::send_to(socket, &buf, SocketAddr::new(to, 0))
}

/// The next echo reply of ours waiting on `socket`: who sent it. Other
/// ICMP (a raw socket sees every message to its address) is skipped.
fn receive_reply(socket: &OwnedFd, local: IpAddr, id: u16) -> Option<IpAddr> {
    loop {
        let mut buf = [0u8; 1500];
        // SAFETY: all-zero is a valid sockaddr_storage.
        let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        // SAFETY: buf and addr are valid for the lengths given.
        let n = unsafe {
            libc::recvfrom(
                socket.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&raw mut addr).cast(),
                &mut len,
            )
        };
        if n <= 0 {
            return None;
        }
        let data = &buf[..n as usize];
        let icmp = if local.is_ipv4() {
            // IPv4 raw sockets hand over the IP header too.
            let ihl = usize::from(data.first()? & 0x0f) * 4;
            data.get(ihl..)?
        } else {
            data
        };
        let reply_type = if local.is_ipv4() {
            ICMP_ECHO_REPLY
        } else {
            ICMPV6_ECHO_REPLY
        };
        if icmp.len() >= 8
            && icmp[0] == reply_type
            && u16::from_be_bytes([icmp[4], icmp[5]]) == id
            && let Some(from) = peer_of(&addr)
        {
            return Some(from);
        }
    }
}

fn peer_of(addr: &libc::sockaddr_storage) -> Option<IpAddr> {
    match i32::from(addr.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let v4: &libc::sockaddr_in =
                unsafe { &*(addr as *const _ as *const libc::sockaddr_in) };
            Some(IpAddr::from(u32::from_be(v4.sin_addr.s_addr).to_be_bytes()))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let v6: &libc::sockaddr_in6 =
                unsafe { &*(addr as *const _ as *const libc::sockaddr_in6) };
            Some(IpAddr::from(v6.sin6_addr.s6_addr))
        }
        _ => None,
    }
}
