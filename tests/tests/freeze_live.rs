//! The lock on a real TCP connection between two network namespaces: the
//! peer keeps sending while the local side's flow is frozen, then the
//! flow is released (or the deadline lifts the lock by itself).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use migrator::dataplane::{FlowTable, spec::FlowSpec};
use migrator_common::{EVENT_PEER_RETRANSMIT, FlowPolicy};
use migrator_tests::{
    migrator_bin,
    netns::{Netns, veth},
    require_root,
    wire::{PacketSocket, in_netns},
};
use pnet::packet::{
    Packet as _,
    ethernet::{EtherTypes, EthernetPacket},
    ip::IpNextHeaderProtocols,
    ipv4::Ipv4Packet,
    ipv6::Ipv6Packet,
    tcp::TcpPacket,
};

const CHUNK: usize = 1000;
const SEND_EVERY: Duration = Duration::from_millis(10);

/// Byte `i` of the stream: a pattern that exposes loss, duplication and
/// reordering.
fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

struct Lab {
    local: Netns,
    peer: Netns,
    local_addr: SocketAddr,
    peer_ip: std::net::IpAddr,
}

fn lab(tag: &str, v6: bool) -> Lab {
    let local = Netns::new(&format!("{tag}-l"));
    let peer = Netns::new(&format!("{tag}-p"));
    veth(
        &local,
        "lv",
        &["198.18.7.1/24", "2001:db8:7::1/64"],
        &peer,
        "pv",
        &["198.18.7.2/24", "2001:db8:7::2/64"],
    );
    let (local_ip, peer_ip) = if v6 {
        (
            "2001:db8:7::1".parse().unwrap(),
            "2001:db8:7::2".parse().unwrap(),
        )
    } else {
        ("198.18.7.1".parse().unwrap(), "198.18.7.2".parse().unwrap())
    };
    Lab {
        local,
        peer,
        local_addr: SocketAddr::new(local_ip, 5000),
        peer_ip,
    }
}

fn migrator(ns: &Netns, args: &[&str]) -> String {
    let out = ns
        .command(migrator_bin().to_str().unwrap())
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "migrator {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Freeze one flow on the local side's interface; returns once locked.
fn freeze(lab: &Lab, flow: &str, deadline: &str) {
    migrator(
        &lab.local,
        &[
            "freeze",
            "--iface",
            "lv",
            "--flow",
            flow,
            "--deadline",
            deadline,
        ],
    );
}

fn flow_status(ns: &Netns) -> serde_json::Value {
    let status: serde_json::Value =
        serde_json::from_str(&migrator(ns, &["status", "--json"])).unwrap();
    status["flows"][0].clone()
}

/// TCP state from TCP_INFO (1 = ESTABLISHED).
fn tcp_state(stream: &TcpStream) -> u8 {
    // SAFETY: tcp_info is plain data; the kernel writes at most `len` bytes.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
        let rc = libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        );
        assert_eq!(rc, 0);
        info.tcpi_state
    }
}

/// Counts TCP segments sent by `from` that reach the peer's interface,
/// split into (any, RST), while `counting` is set.
struct Capture {
    seen: Arc<AtomicU64>,
    /// Frames longer than one MTU: GSO/GRO aggregates.
    oversize: Arc<AtomicU64>,
    resets: Arc<AtomicU64>,
    counting: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Capture {
    fn start(peer: &Netns, ifname: &'static str, from: SocketAddr) -> Self {
        let (seen, resets, oversize) = (
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let (counting, stop) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let (s, r, o, c, st) = (
            seen.clone(),
            resets.clone(),
            oversize.clone(),
            counting.clone(),
            stop.clone(),
        );
        let thread = in_netns(&peer.path(), move || {
            let socket = PacketSocket::open(ifname, None);
            let mut buf = vec![0u8; 256 * 1024];
            while !st.load(Ordering::Relaxed) {
                let Some(n) = socket.recv(&mut buf) else {
                    continue;
                };
                if !c.load(Ordering::Relaxed) {
                    continue;
                }
                if let Some(rst) = segment_from(&buf[..n], from) {
                    s.fetch_add(1, Ordering::Relaxed);
                    if n > 1514 {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    if rst {
                        r.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        Self {
            seen,
            oversize,
            resets,
            counting,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Some(is_rst) if the frame is a TCP segment from `from`.
fn segment_from(frame: &[u8], from: SocketAddr) -> Option<bool> {
    let eth = EthernetPacket::new(frame)?;
    let (src, tcp_bytes) = match eth.get_ethertype() {
        EtherTypes::Ipv4 => {
            let ip = Ipv4Packet::new(eth.payload())?;
            (ip.get_next_level_protocol() == IpNextHeaderProtocols::Tcp)
                .then(|| (std::net::IpAddr::V4(ip.get_source()), ip.payload().to_vec()))?
        }
        EtherTypes::Ipv6 => {
            let ip = Ipv6Packet::new(eth.payload())?;
            (ip.get_next_header() == IpNextHeaderProtocols::Tcp)
                .then(|| (std::net::IpAddr::V6(ip.get_source()), ip.payload().to_vec()))?
        }
        _ => return None,
    };
    let tcp = TcpPacket::new(&tcp_bytes)?;
    (src == from.ip() && tcp.get_source() == from.port()).then(|| tcp.get_flags() & 0x04 != 0)
}

/// A connection where the peer pushes a chunk every 10 ms and the local
/// side checks every byte.
struct Stream {
    local: TcpStream,
    peer: TcpStream,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    sender: Option<thread::JoinHandle<()>>,
    receiver: Option<thread::JoinHandle<Result<u64, String>>>,
}

impl Stream {
    fn open(lab: &Lab) -> Self {
        Self::open_paced(lab, CHUNK, SEND_EVERY)
    }

    /// The peer writes `chunk` bytes every `every`.
    fn open_paced(lab: &Lab, chunk: usize, every: Duration) -> Self {
        let bind = lab.local_addr;
        let listener = lab.local.run(move || TcpListener::bind(bind).unwrap());
        let target = lab.local_addr;
        let peer = lab.peer.run(move || TcpStream::connect(target).unwrap());
        let (local, _) = listener.accept().unwrap();
        let (stop, sent, received) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
            Arc::new(AtomicU64::new(0)),
        );
        let mut writer = peer.try_clone().unwrap();
        let (stop_w, sent_w) = (stop.clone(), sent.clone());
        let sender = thread::spawn(move || {
            let mut offset = 0u64;
            while !stop_w.load(Ordering::Relaxed) {
                let bytes: Vec<u8> = (offset..offset + chunk as u64).map(pattern).collect();
                writer.write_all(&bytes).unwrap();
                offset += chunk as u64;
                sent_w.store(offset, Ordering::Relaxed);
                thread::sleep(every);
            }
            writer.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let mut reader = local.try_clone().unwrap();
        let received_r = received.clone();
        let receiver = thread::spawn(move || {
            let mut offset = 0u64;
            let mut buf = vec![0u8; 65_536];
            loop {
                let n = reader
                    .read(&mut buf)
                    .map_err(|e| format!("read after {offset} bytes: {e}"))?;
                if n == 0 {
                    return Ok(offset);
                }
                for (i, byte) in buf[..n].iter().enumerate() {
                    let at = offset + i as u64;
                    if *byte != pattern(at) {
                        return Err(format!("byte {at} is {byte}, expected {}", pattern(at)));
                    }
                }
                offset += n as u64;
                received_r.store(offset, Ordering::Relaxed);
            }
        });
        Self {
            local,
            peer,
            stop,
            sent,
            received,
            sender: Some(sender),
            receiver: Some(receiver),
        }
    }

    /// Stop the peer, wait for the local side to read to EOF; returns
    /// (bytes sent, bytes received in order).
    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.sender.take().unwrap().join().unwrap();
        let received = self
            .receiver
            .take()
            .unwrap()
            .join()
            .unwrap()
            .expect("stream intact");
        (self.sent.load(Ordering::Relaxed), received)
    }
}

fn freeze_release_keeps_the_connection(tag: &str, v6: bool, attach_mode: &str) {
    require_root();
    let lab = lab(tag, v6);
    migrator(
        &lab.local,
        &["attach", "--iface", "lv", "--mode", attach_mode],
    );
    let stream = Stream::open(&lab);
    let peer_addr = stream.peer.local_addr().unwrap();
    assert_eq!(peer_addr.ip(), lab.peer_ip);
    let flow = format!("{}={}", lab.local_addr, peer_addr);
    let capture = Capture::start(&lab.peer, "pv", lab.local_addr);
    thread::sleep(Duration::from_millis(300));

    freeze(&lab, &flow, "30s");
    capture.counting.store(true, Ordering::Relaxed);
    let frozen_at = Instant::now();
    let received_at_freeze = stream.received.load(Ordering::Relaxed);
    thread::sleep(Duration::from_millis(2_500));
    capture.counting.store(false, Ordering::Relaxed);

    let during = flow_status(&lab.local);
    assert_eq!(during["mode"], "freeze");
    assert_backoff_spacing(&lab);
    let retransmits = during["counters"]["peer_retransmits"].as_u64().unwrap();
    // RTO backoff from 200 ms: resends near 0.2, 0.6, 1.4 s into the freeze.
    assert!(
        retransmits >= 3,
        "peer retransmits after 2.5 s frozen: {during}"
    );
    assert!(during["counters"]["dropped"].as_u64().unwrap() > retransmits);
    assert_eq!(
        capture.seen.load(Ordering::Relaxed),
        0,
        "segments (ACKs) from the frozen side reached the peer"
    );
    assert_eq!(capture.resets.load(Ordering::Relaxed), 0);
    // Little or nothing arrived while frozen (at most what was in flight).
    assert!(stream.received.load(Ordering::Relaxed) - received_at_freeze <= 64 * 1024);
    assert_eq!(tcp_state(&stream.local), 1, "local side left ESTABLISHED");
    assert_eq!(tcp_state(&stream.peer), 1, "peer side left ESTABLISHED");

    migrator(&lab.local, &["release", "--iface", "lv", "--flow", &flow]);
    let dropped_at_release = flow_status(&lab.local)["counters"]["dropped"]
        .as_u64()
        .unwrap();
    thread::sleep(Duration::from_millis(1_500));
    let after = flow_status(&lab.local);
    assert_eq!(after["mode"], "observe");
    assert_eq!(
        after["counters"]["dropped"].as_u64().unwrap(),
        dropped_at_release
    );
    let (sent, received) = stream.finish();
    assert_eq!(received, sent, "every byte delivered once, in order");
    assert!(sent > 0 && frozen_at.elapsed() > Duration::from_secs(3));

    migrator(&lab.local, &["detach", "--iface", "lv"]);
    assert!(!lab.local.pin_root().exists(), "detach left pins behind");
    let filters = lab
        .local
        .output("tc", &["filter", "show", "dev", "lv", "ingress"]);
    assert!(
        !String::from_utf8_lossy(&filters.stdout).contains("migrator"),
        "detach left a TC filter behind"
    );
}

/// The peer's retransmits, read from the event ring, come at its RTO
/// backoff: each gap about twice the one before (0.2, 0.6, 1.4 s ... into
/// the freeze). A tail-loss probe may come first and is not an RTO, so the
/// last three retransmits are compared.
fn assert_backoff_spacing(lab: &Lab) {
    let mut table = FlowTable::open_pinned(&lab.local.pin_root()).unwrap();
    let times: Vec<f64> = table
        .drain_events()
        .iter()
        .filter(|event| event.kind == EVENT_PEER_RETRANSMIT)
        .map(|event| event.timestamp_ns as f64 / 1e9)
        .collect();
    assert!(times.len() >= 3, "retransmit events: {times:?}");
    let last = &times[times.len() - 3..];
    let (first_gap, second_gap) = (last[1] - last[0], last[2] - last[1]);
    let ratio = second_gap / first_gap;
    assert!(
        (1.6..=2.5).contains(&ratio),
        "retransmit gaps {first_gap:.3} s then {second_gap:.3} s (ratio {ratio:.2}), events at {times:?}"
    );
    eprintln!("retransmit gaps {first_gap:.3} s, {second_gap:.3} s, events at {times:?}");
}

#[test]
fn freeze_and_release_ipv4() {
    freeze_release_keeps_the_connection("f4", false, "auto");
}

/// The fallback for kernels without TCX, forced on this one.
#[test]
fn freeze_and_release_ipv4_with_clsact_filters() {
    freeze_release_keeps_the_connection("fc", false, "clsact");
}

#[test]
fn freeze_and_release_ipv6() {
    freeze_release_keeps_the_connection("f6", true, "auto");
}

/// Segments, not skbs: a bulk stream whose packets cross our classifiers
/// as super-packets (the peer's TSO/GSO aggregates, or with the peer's
/// offloads off, the ones GRO builds on our side) is counted in MSS-sized
/// segments, frozen and released whole, and arrives intact.
fn aggregates_are_counted_as_segments(tag: &str, peer_offloads: &str, local_gro: &str) {
    require_root();
    let lab = lab(tag, false);
    let ethtool = |ns: &Netns, args: &[&str]| {
        let out = ns.output("ethtool", args);
        assert!(out.status.success(), "ethtool {args:?}: {out:?}");
    };
    ethtool(
        &lab.peer,
        &["-K", "pv", "tso", peer_offloads, "gso", peer_offloads],
    );
    ethtool(&lab.local, &["-K", "lv", "gro", local_gro]);
    migrator(&lab.local, &["attach", "--iface", "lv"]);
    let stream = Stream::open_paced(&lab, 256 * 1024, Duration::from_millis(2));
    let peer_addr = stream.peer.local_addr().unwrap();
    let flow = format!("{}={}", lab.local_addr, peer_addr);
    let key = flow.parse::<FlowSpec>().unwrap().key();
    let mut table = FlowTable::open_pinned(&lab.local.pin_root()).unwrap();
    table.set_flow(key, FlowPolicy::observe()).unwrap();
    let capture = Capture::start(&lab.local, "lv", peer_addr);
    capture.counting.store(true, Ordering::Relaxed);
    thread::sleep(Duration::from_millis(1_000));
    freeze(&lab, &flow, "30s");
    thread::sleep(Duration::from_millis(700));
    migrator(&lab.local, &["release", "--iface", "lv", "--flow", &flow]);
    thread::sleep(Duration::from_millis(700));
    capture.counting.store(false, Ordering::Relaxed);
    let (sent, received) = stream.finish();
    assert_eq!(received, sent, "every byte delivered once, in order");

    assert!(
        capture.oversize.load(Ordering::Relaxed) > 0,
        "no aggregate crossed lv: the test did not exercise GSO/GRO"
    );
    let stats = table.flow_stats(&key).unwrap().unwrap();
    // Counting skbs would give one packet per up to 64 KiB.
    assert!(
        stats.packets_in * 1514 >= stats.bytes_in,
        "{} packets for {} bytes in: aggregates counted as one packet",
        stats.packets_in,
        stats.bytes_in
    );
    assert!(stats.bytes_in >= received, "{stats:?}");
    assert!(stats.dropped > 0, "nothing dropped while frozen: {stats:?}");
    migrator(&lab.local, &["detach", "--iface", "lv"]);
}

#[test]
fn peer_gso_super_packets_count_as_segments() {
    aggregates_are_counted_as_segments("gso", "on", "off");
}

#[test]
fn local_gro_aggregates_count_as_segments() {
    aggregates_are_counted_as_segments("gro", "off", "on");
}

#[test]
fn lock_fails_open_at_its_deadline_without_userspace() {
    require_root();
    let lab = lab("dl", false);
    let stream = Stream::open(&lab);
    let flow = format!("{}={}", lab.local_addr, stream.peer.local_addr().unwrap());
    thread::sleep(Duration::from_millis(200));
    // The freeze command exits at once: from here on no migrator process
    // exists, exactly as if it had been killed mid-migration.
    freeze(&lab, &flow, "1s");
    // Someone watching hears it from the kernel program (aya-log) when
    // the lock lets traffic through again.
    let watch = lab
        .local
        .command(migrator_bin().to_str().unwrap())
        .args([
            "watch",
            "--plain",
            "--interval",
            "200ms",
            "--ip",
            "198.18.7.1",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(500));
    let before_deadline = stream.received.load(Ordering::Relaxed);
    // Past the deadline plus the peer's next backed-off retransmit.
    thread::sleep(Duration::from_millis(3_000));
    let status = flow_status(&lab.local);
    assert_eq!(status["mode"], "freeze");
    assert_eq!(status["effective_mode"], "observe");
    assert!(
        stream.received.load(Ordering::Relaxed) > before_deadline + 10 * CHUNK as u64,
        "traffic did not resume after the deadline"
    );
    // SAFETY: kill has no memory preconditions; SIGTERM ends watch cleanly.
    unsafe { libc::kill(watch.id() as i32, libc::SIGTERM) };
    let said = watch.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&said.stderr);
    let expired: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("migrator::ebpf") && l.contains("passed its deadline"))
        .collect();
    assert_eq!(expired.len(), 1, "once per flow, from the kernel: {said}");
    assert!(expired[0].contains("local port 5000"), "{said}");
    let (sent, received) = stream.finish();
    assert_eq!(received, sent);
}

#[test]
fn bad_input_changes_nothing() {
    require_root();
    let lab = lab("bad", false);
    let run = |args: &[&str]| lab.local.output(migrator_bin().to_str().unwrap(), args);
    let out = run(&[
        "freeze",
        "--iface",
        "nope0",
        "--flow",
        "198.18.7.1:5000=198.18.7.2:6000",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("interface `nope0` does not exist"));
    let out = run(&["freeze", "--iface", "lv", "--flow", "198.18.7.1:5000"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected LOCAL_IP:PORT=REMOTE_IP:PORT"));
    assert!(
        !lab.local.pin_root().exists(),
        "a refused command left pins behind"
    );
    let out = run(&["release", "--iface", "lv", "--all"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not attached"));
}
