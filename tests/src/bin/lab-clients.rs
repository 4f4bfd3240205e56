//! The lab's HTTP clients, for `cargo xtask run --server`: keep-alive
//! clients asking every 10 ms on one connection each, and a new client
//! every `--every-ms` (each on its own thread: one request, then it
//! closes), against every `--connect ADDR:PORT` in turn. The verdict goes
//! to `--report FILE` (rewritten whole every 200 ms): requests, failures
//! with what failed, new clients, their slowest connect.
//!
//! `lab-clients --connect ADDR:PORT [--connect ...] [--keepalive N]
//! [--every-ms N] --report FILE`
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    net::{SocketAddr, TcpStream},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use migrator_tests::http::get;

#[derive(Default)]
struct Verdict {
    keepalive_requests: u64,
    new_clients: u64,
    failures: Vec<String>,
    slowest_connect_ms: f64,
    connects_over_1s: u64,
}

fn main() {
    let mut targets = Vec::<SocketAddr>::new();
    let (mut keepalive, mut every_ms, mut report) = (4usize, 20u64, None);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--connect" => targets.push(args.next().unwrap().parse().expect("--connect ADDR:PORT")),
            "--keepalive" => keepalive = args.next().unwrap().parse().expect("--keepalive N"),
            "--every-ms" => every_ms = args.next().unwrap().parse().expect("--every-ms N"),
            "--report" => report = Some(args.next().expect("--report FILE")),
            other => panic!("unknown argument {other}"),
        }
    }
    let report = report.expect("--report FILE");
    assert!(!targets.is_empty(), "--connect ADDR:PORT");
    let verdict = Arc::new(Mutex::new(Verdict::default()));
    for i in 0..keepalive {
        let (to, verdict) = (targets[i % targets.len()], verdict.clone());
        thread::spawn(move || {
            let fail = |what: String| verdict.lock().unwrap().failures.push(what);
            let mut stream = match TcpStream::connect(to) {
                Ok(stream) => stream,
                Err(e) => return fail(format!("keep-alive client of {to}: connecting: {e}")),
            };
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            loop {
                if let Err(e) = get(&mut stream) {
                    return fail(format!("keep-alive client of {to}: {e}"));
                }
                verdict.lock().unwrap().keepalive_requests += 1;
                thread::sleep(Duration::from_millis(10));
            }
        });
    }
    {
        let verdict = verdict.clone();
        thread::spawn(move || {
            for i in 0.. {
                let (to, verdict) = (targets[i % targets.len()], verdict.clone());
                thread::spawn(move || {
                    let started = Instant::now();
                    let result = TcpStream::connect_timeout(&to, Duration::from_secs(10))
                        .map_err(|e| format!("connecting: {e}"))
                        .and_then(|mut stream| {
                            let waited = started.elapsed().as_secs_f64() * 1e3;
                            stream
                                .set_read_timeout(Some(Duration::from_secs(5)))
                                .unwrap();
                            get(&mut stream).map(|()| waited)
                        });
                    let mut verdict = verdict.lock().unwrap();
                    verdict.new_clients += 1;
                    match result {
                        Ok(waited) => {
                            verdict.slowest_connect_ms = verdict.slowest_connect_ms.max(waited);
                            verdict.connects_over_1s += u64::from(waited > 1000.0);
                        }
                        Err(e) => verdict.failures.push(format!("new client of {to}: {e}")),
                    }
                });
                thread::sleep(Duration::from_millis(every_ms));
            }
        });
    }
    loop {
        thread::sleep(Duration::from_millis(200));
        let text = {
            let v = verdict.lock().unwrap();
            serde_json::json!({
                "keepalive_requests": v.keepalive_requests,
                "new_clients": v.new_clients,
                "slowest_connect_ms": v.slowest_connect_ms,
                "connects_over_1s": v.connects_over_1s,
                "failures": v.failures,
            })
            .to_string()
        };
        let temporary = format!("{report}.tmp");
        std::fs::write(&temporary, text).unwrap();
        std::fs::rename(&temporary, &report).unwrap();
    }
}
