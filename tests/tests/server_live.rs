//! A real server as it is run: Debian's nginx, a master and two workers
//! sharing listening sockets on the service addresses, moved there and
//! back while keep-alive clients keep asking and new clients keep
//! arriving, in the lab with the real kernel and CRIU.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    net::{SocketAddr, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use migrator_tests::{
    http::get,
    lab::{DST, PEER, SERVICE_V4, SERVICE_V6, SRC},
    migration::{HTTP_PORT, MigrationLab},
    wire::{self, in_netns},
};

fn targets() -> [SocketAddr; 2] {
    [
        format!("{SERVICE_V4}:{HTTP_PORT}").parse().unwrap(),
        format!("[{SERVICE_V6}]:{HTTP_PORT}").parse().unwrap(),
    ]
}

/// Ten moves there and back with `--hold`: no request fails, no
/// connection resets, every new client gets in within 50 ms of the
/// longest freeze window (its SYN, if it came during the freeze, held and
/// delivered to the listening socket), and the listening sockets keep
/// accepting.
#[test]
fn nginx_moves_ten_times_with_keepalive_and_new_clients() {
    let mut lab = MigrationLab::new("ngx");
    let mut pid = lab.start_nginx();
    let stop = Arc::new(AtomicBool::new(false));
    let peer = lab.lab.netns_path(PEER);
    // Keep-alive clients: one connection each, a request every 10 ms.
    let keepalive: Vec<_> = (0..4)
        .map(|i| {
            let stop = stop.clone();
            in_netns(&peer, move || {
                let to = targets()[i % 2];
                let mut stream = TcpStream::connect(to).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                let mut requests = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    get(&mut stream)
                        .map_err(|e| format!("keep-alive {to}, request {requests}: {e}"))?;
                    requests += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok::<u64, String>(requests)
            })
        })
        .collect();
    // New clients: one every 20 ms, each on its own thread, one request.
    let arrivals = wire::arrivals(
        &peer,
        targets().to_vec(),
        Duration::from_millis(20),
        stop.clone(),
        |to: SocketAddr| {
            let started = Instant::now();
            let mut stream = TcpStream::connect_timeout(&to, Duration::from_secs(5))
                .map_err(|e| format!("connecting to {to}: {e}"))?;
            let waited = started.elapsed();
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            get(&mut stream).map_err(|e| format!("new client of {to}: {e}"))?;
            Ok::<Duration, String>(waited)
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    let mut windows = Vec::new();
    for round in 0..10 {
        let (from, to) = if round % 2 == 0 {
            (SRC, DST)
        } else {
            (DST, SRC)
        };
        let run = lab.migrate(from, to, pid, &["--hold"]);
        assert!(run.success, "move {round} {from} -> {to}: {}", run.stderr);
        let report = run.report.unwrap();
        pid = report["destination_pid"].as_i64().unwrap() as i32;
        assert_eq!(MigrationLab::netns_of(pid), Some(lab.netns_inode(to)));
        // The whole tree moved: the master and its two workers.
        assert_eq!(migrator::system::process_tree(pid).len(), 3, "{report}");
        windows.push(report["freeze_window_ms"].as_f64().unwrap());
        std::thread::sleep(Duration::from_millis(300));
    }
    stop.store(true, Ordering::Relaxed);
    for client in keepalive {
        let requests = client.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
        assert!(requests > 100, "{requests} requests");
    }
    let attempts = arrivals.join().unwrap();
    let failed: Vec<&String> = attempts.iter().filter_map(|a| a.as_ref().err()).collect();
    assert!(failed.is_empty(), "new clients that failed: {failed:?}");
    let longest = windows.iter().copied().fold(0.0, f64::max);
    let slowest = attempts
        .iter()
        .filter_map(|a| a.as_ref().ok())
        .map(|waited| waited.as_secs_f64() * 1e3)
        .fold(0.0, f64::max);
    eprintln!(
        "{} new clients, slowest connect {slowest:.1} ms; freeze windows {windows:.1?} ms",
        attempts.len()
    );
    assert!(
        slowest <= longest + 50.0,
        "a new client waited {slowest:.1} ms; the longest freeze was {longest:.1} ms"
    );
}
