//! The lab's workload, the process that gets migrated: it opens TCP
//! connections to the lab peer from the service addresses and echoes
//! every byte it receives. Plain blocking sockets and threads, nothing
//! CRIU-specific: any process like it can be moved.
//!
//! `lab-workload --from IP [--from IP] --connect ADDR:PORT [--connect ...]
//! [--ballast-mb N] [--children N]` binds each connection to the `--from`
//! address of its family; `--ballast-mb` keeps N MiB of written memory,
//! for a process whose images take a while to dump and send (a thread reads
//! it back every second and exits the process, closing every connection,
//! if one byte differs from the pattern written); `--children`
//! forks N idle child processes first, so the tree has more than one
//! process (they hold no sockets and outlive a parent that is killed);
//! `--marker TEXT` keeps TEXT in memory (for tests that look for the
//! process's memory on the wire); `--listen ADDR:PORT` also accepts
//! connections there and echoes them (a server that new clients reach
//! while it moves).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::FromRawFd as _,
    thread,
};

/// A TCP socket bound to `from` (port chosen by the kernel), connected to
/// `to`. std has no bind-before-connect, so the socket is made by hand.
fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    let (domain, addr, len) = sockaddr(SocketAddr::new(from, 0));
    // SAFETY: plain socket calls on a fresh fd; the sockaddr buffer is sized
    // for either family.
    unsafe {
        let fd = libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let rc = libc::bind(fd, (&raw const addr).cast(), len);
        assert_eq!(rc, 0, "bind {from}: {}", std::io::Error::last_os_error());
        let (_, target, len) = sockaddr(to);
        let rc = libc::connect(fd, (&raw const target).cast(), len);
        assert_eq!(rc, 0, "connect {to}: {}", std::io::Error::last_os_error());
        TcpStream::from_raw_fd(fd)
    }
}

/// Send back every byte, until the other side closes.
fn echo(stream: TcpStream) {
    let mut reader = stream.try_clone().unwrap();
    let mut writer = stream;
    let mut buf = vec![0u8; 65_536];
    loop {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if writer.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn sockaddr(addr: SocketAddr) -> (i32, libc::sockaddr_in6, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_in6 (and sockaddr_in prefix).
    let mut storage: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(v4) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(v4.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits inside sockaddr_in6.
            unsafe { std::ptr::write((&raw mut storage).cast(), sin) };
            (
                libc::AF_INET,
                storage,
                size_of::<libc::sockaddr_in>() as u32,
            )
        }
        SocketAddr::V6(v6) => {
            storage.sin6_family = libc::AF_INET6 as u16;
            storage.sin6_port = v6.port().to_be();
            storage.sin6_addr.s6_addr = v6.ip().octets();
            (
                libc::AF_INET6,
                storage,
                size_of::<libc::sockaddr_in6>() as u32,
            )
        }
    }
}

/// The ballast's byte at `index`: the page number, and the offset's low
/// bits, so that a page moved to the wrong place shows too.
fn ballast_byte(index: usize) -> u8 {
    ((index / 4096) as u8) ^ (index as u8 & 0x0f)
}

fn main() {
    let mut from = Vec::<IpAddr>::new();
    let mut connect = Vec::<SocketAddr>::new();
    let mut ballast_mb = 0usize;
    let mut children = 0usize;
    let mut marker = Vec::new();
    let mut listen = Vec::<SocketAddr>::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--from" => from.push(args.next().unwrap().parse().expect("--from IP")),
            "--connect" => connect.push(args.next().unwrap().parse().expect("--connect ADDR:PORT")),
            "--ballast-mb" => ballast_mb = args.next().unwrap().parse().expect("--ballast-mb N"),
            "--children" => children = args.next().unwrap().parse().expect("--children N"),
            "--marker" => marker = args.next().expect("--marker TEXT").into_bytes(),
            "--listen" => listen.push(args.next().unwrap().parse().expect("--listen ADDR:PORT")),
            other => panic!(
                "unknown argument {other}; usage: lab-workload --from IP --connect ADDR:PORT"
            ),
        }
    }
    // Before any thread exists, so each child is a plain copy.
    for _ in 0..children {
        // SAFETY: single-threaded here; the child only calls pause().
        if unsafe { libc::fork() } == 0 {
            loop {
                // SAFETY: pause has no preconditions.
                unsafe { libc::pause() };
            }
        }
    }
    // Distinct bytes per page, so no page is the zero page.
    let ballast: Vec<u8> = (0..ballast_mb << 20).map(ballast_byte).collect();
    let ballast = std::sync::Arc::new(ballast);
    if ballast_mb > 0 {
        let ballast = ballast.clone();
        thread::spawn(move || {
            loop {
                thread::sleep(std::time::Duration::from_secs(1));
                if let Some(at) = ballast
                    .iter()
                    .enumerate()
                    .position(|(i, byte)| *byte != ballast_byte(i))
                {
                    eprintln!("lab-workload: ballast differs at byte {at}");
                    std::process::exit(3);
                }
            }
        });
    }
    for at in listen {
        let listener = TcpListener::bind(at).unwrap_or_else(|e| panic!("listen {at}: {e}"));
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                thread::spawn(move || echo(stream));
            }
        });
    }
    let echoes: Vec<_> = connect
        .into_iter()
        .map(|to| {
            let source = *from
                .iter()
                .find(|ip| ip.is_ipv4() == to.is_ipv4())
                .expect("a --from address of the same family as each --connect");
            let stream = connect_from(source, to);
            thread::spawn(move || echo(stream))
        })
        .collect();
    for echo in echoes {
        let _ = echo.join();
    }
    std::hint::black_box(&ballast);
    std::hint::black_box(&marker);
}
