//! What crosses the link between the lab's hosts, for tests that attack
//! it or look at it: code run inside a namespace, a capture of every frame
//! on an interface (AF_PACKET), and a TCP relay that can flip a byte.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

/// Run `f` on a thread that lives in the network namespace at `netns`.
pub fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<T> {
    let path = netns.to_owned();
    thread::spawn(move || {
        enter(&path);
        f()
    })
}

/// New clients from the namespace at `netns`, one every `every` until
/// `stop`, to `targets` in turn, each `attempt` on a thread of its own (one
/// waiting for its SYN's answer does not hold up the next arrival).
/// Joined, the handle gives every attempt's result, in order.
pub fn arrivals<T: Send + 'static>(
    netns: &Path,
    targets: Vec<SocketAddr>,
    every: Duration,
    stop: Arc<AtomicBool>,
    attempt: fn(SocketAddr) -> Result<T, String>,
) -> JoinHandle<Vec<Result<T, String>>> {
    in_netns(netns, move || {
        let mut attempts = Vec::new();
        for to in targets.iter().copied().cycle() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            attempts.push(thread::spawn(move || attempt(to)));
            thread::sleep(every);
        }
        attempts
            .into_iter()
            .map(|attempt| attempt.join().unwrap())
            .collect()
    })
}

fn enter(netns: &PathBuf) {
    let file = std::fs::File::open(netns).expect("open the namespace");
    // SAFETY: setns on this thread with a namespace fd we own.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

/// An AF_PACKET socket that sees every frame of an interface of the
/// calling thread's network namespace. Receives give up after 50 ms, so a
/// capture loop can check whether to stop.
pub struct PacketSocket(OwnedFd);

impl PacketSocket {
    /// `receive_buffer`: bytes the kernel may queue (SO_RCVBUFFORCE).
    pub fn open(iface: &str, receive_buffer: Option<i32>) -> Self {
        // SAFETY: plain socket syscalls on an fd we then own; the sockaddr
        // is zeroed before use and every option value outlives its call.
        unsafe {
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                i32::from((libc::ETH_P_ALL as u16).to_be()),
            );
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let socket = Self(OwnedFd::from_raw_fd(fd));
            let name = std::ffi::CString::new(iface).unwrap();
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            addr.sll_ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
            let rc = libc::bind(
                fd,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(rc, 0, "bind AF_PACKET to {iface}");
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: 50_000,
            };
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                size_of::<libc::timeval>() as u32,
            );
            if let Some(room) = receive_buffer {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&raw const room).cast(),
                    size_of::<i32>() as u32,
                );
            }
            socket
        }
    }

    /// The next frame's length in `buf`; None when none came in time.
    pub fn recv(&self, buf: &mut [u8]) -> Option<usize> {
        // SAFETY: recv writes at most buf.len() bytes into buf.
        let n = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        usize::try_from(n).ok().filter(|n| *n > 0)
    }
}

/// Every frame seen on an interface, until stopped.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<u8>>>,
}

impl Capture {
    pub fn start(netns: &Path, iface: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let flag = stop.clone();
        let iface = iface.to_owned();
        let thread = in_netns(netns, move || {
            // Room for bursts: a lost frame would hide what crossed.
            let socket = PacketSocket::open(&iface, Some(64 << 20));
            let _ = ready_tx.send(());
            let mut seen = Vec::new();
            let mut buf = vec![0u8; 256 * 1024];
            while !flag.load(Ordering::Relaxed) {
                if let Some(n) = socket.recv(&mut buf) {
                    seen.extend_from_slice(&buf[..n]);
                }
            }
            seen
        });
        let _ = ready_rx.recv_timeout(Duration::from_secs(5));
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stop and return every byte of every frame seen.
    pub fn finish(mut self) -> Vec<u8> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .map(|t| t.join().unwrap_or_default())
            .unwrap_or_default()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// A TCP relay in a namespace: accepts on `listen`, connects to `target`
/// for each connection, copies both ways. With `flip_at`, the byte at that
/// offset of the client-to-server stream of the first connection is
/// inverted on its way (a man in the middle changing one bit of data).
pub struct Relay {
    pub listen: SocketAddr,
    /// Bytes relayed client to server, all connections.
    pub forwarded: Arc<AtomicU64>,
    /// Whether the byte was flipped.
    pub flipped: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Relay {
    pub fn start(
        netns: &Path,
        listen: SocketAddr,
        target: SocketAddr,
        flip_at: Option<u64>,
    ) -> Self {
        let forwarded = Arc::new(AtomicU64::new(0));
        let flipped = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (fw, fl, st) = (forwarded.clone(), flipped.clone(), stop.clone());
        in_netns(netns, move || {
            let listener = TcpListener::bind(listen).expect("relay listen");
            listener.set_nonblocking(true).unwrap();
            let _ = ready_tx.send(());
            let mut first = true;
            while !st.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    thread::sleep(Duration::from_millis(5));
                    continue;
                };
                client.set_nonblocking(false).unwrap();
                let Ok(server) = TcpStream::connect(target) else {
                    continue;
                };
                let flip = if first { flip_at } else { None };
                first = false;
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (fw, fl) = (fw.clone(), fl.clone());
                thread::spawn(move || pipe(client, server, flip, Some((fw, fl))));
                thread::spawn(move || pipe(s2, c2, None, None));
            }
        });
        let _ = ready_rx.recv_timeout(Duration::from_secs(5));
        Self {
            listen,
            forwarded,
            flipped,
            stop,
        }
    }
}

impl Drop for Relay {
    /// Stops accepting; connections end with their ends (the pipes hold
    /// the only descriptors, so a closed relay resets what still arrives).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

type Counters = (Arc<AtomicU64>, Arc<AtomicBool>);

fn pipe(mut from: TcpStream, mut to: TcpStream, flip_at: Option<u64>, counters: Option<Counters>) {
    let mut buf = vec![0u8; 64 * 1024];
    let mut offset = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(at) = flip_at
            && at >= offset
            && at < offset + n as u64
        {
            buf[(at - offset) as usize] ^= 0xff;
            if let Some((_, flipped)) = &counters {
                flipped.store(true, Ordering::Relaxed);
            }
        }
        offset += n as u64;
        if let Some((forwarded, _)) = &counters {
            forwarded.fetch_add(n as u64, Ordering::Relaxed);
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    // Either end gone (closed, reset, or unwritable): the relay tears the
    // whole connection down, both sockets both ways, and once both pipes
    // end no descriptor is left, so what the other end still sends is
    // reset as it would be without a relay. (A half-close, or descriptors
    // kept elsewhere, left a sender writing into the relay's full buffer
    // until its own deadline.)
    let _ = from.shutdown(std::net::Shutdown::Both);
    let _ = to.shutdown(std::net::Shutdown::Both);
}
