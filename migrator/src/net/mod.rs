//! The host's network as a migration sees it: which connections a process
//! tree holds ([`discover`]), the service addresses ([`address`], over
//! rtnetlink) and announcing them on the link ([`announce`], GARP and
//! unsolicited NA built with pnet) and delivering held packets
//! ([`inject`]), and proving by an ICMP round trip that a peer's packets
//! for the service address reach this host ([`roundtrip`]).

pub mod address;
pub mod announce;
pub mod bird;
pub mod discover;
pub mod inject;
pub mod roundtrip;

use std::{
    net::SocketAddr,
    os::fd::{AsRawFd as _, OwnedFd},
};

/// `addr` as the C socket address the kernel takes, with its length.
pub(crate) fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and
            // suitably aligned for it.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(v6) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: v6.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: v6.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: as above, for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Send one datagram (or raw packet) on `fd` to `to`.
pub(crate) fn send_to(fd: &OwnedFd, bytes: &[u8], to: SocketAddr) -> std::io::Result<()> {
    let (addr, len) = sockaddr(to);
    // SAFETY: bytes and addr are valid for the lengths given.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            0,
            (&raw const addr).cast(),
            len,
        )
    };
    if sent < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}
