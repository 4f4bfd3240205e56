//! The lab's peer: servers that push a byte pattern to every client and
//! check that the client echoes it back unchanged. It is the judge of a
//! migration, because it is the side that is not moved: it sees lost,
//! duplicated or reordered bytes, resets, and the longest stall.
//!
//! `lab-peer --listen ADDR:PORT [--listen ...] --report FILE`
//! writes FILE (JSON, atomically) every 100 ms and once more on SIGTERM.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::json;

const CHUNK: usize = 1000;
const PUSH_EVERY: Duration = Duration::from_millis(10);

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn pattern(i: u64) -> u8 {
    (i % 251) as u8
}

#[derive(Default)]
struct Connection {
    local: String,
    remote: String,
    pushed: u64,
    echoed: u64,
    /// First wrong byte, or how the connection ended ("reset", "eof").
    error: Option<String>,
    longest_gap_ms: f64,
    longest_gap_at_ms: f64,
    /// Stalls of 30 ms or more: (wall clock at the stall's start, ms since
    /// the Unix epoch; length in ms), the most recent 200.
    stalls: Vec<(f64, f64)>,
    /// Wall clock (ms since the Unix epoch) of the last echoed bytes.
    last_echo_unix_ms: f64,
}

fn unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1e3)
        .unwrap_or(0.0)
}

type Shared = Arc<Mutex<Vec<Connection>>>;

fn serve(stream: TcpStream, slot: usize, shared: Shared, started: Instant) {
    let mut writer = stream.try_clone().unwrap();
    let pusher_shared = shared.clone();
    thread::spawn(move || {
        let mut offset = 0u64;
        while !STOP.load(Ordering::Relaxed) {
            let chunk: Vec<u8> = (offset..offset + CHUNK as u64).map(pattern).collect();
            if writer.write_all(&chunk).is_err() {
                return; // the reader records why
            }
            offset += CHUNK as u64;
            pusher_shared.lock().unwrap()[slot].pushed = offset;
            thread::sleep(PUSH_EVERY);
        }
    });
    let mut reader = stream;
    let mut buf = vec![0u8; 65_536];
    let mut offset = 0u64;
    let mut last = None::<Instant>;
    loop {
        let result = reader.read(&mut buf);
        let now = Instant::now();
        let mut all = shared.lock().unwrap();
        let conn = &mut all[slot];
        let n = match result {
            Ok(0) => {
                conn.error.get_or_insert("eof".into());
                return;
            }
            Ok(n) => n,
            Err(err) => {
                let what = if err.kind() == std::io::ErrorKind::ConnectionReset {
                    "reset".to_owned()
                } else {
                    format!("read: {err}")
                };
                conn.error.get_or_insert(what);
                return;
            }
        };
        if let Some(last) = last {
            let gap = now.duration_since(last).as_secs_f64() * 1e3;
            if gap >= 30.0 {
                if conn.stalls.len() == 200 {
                    conn.stalls.remove(0);
                }
                conn.stalls.push((unix_ms() - gap, gap));
            }
            if gap > conn.longest_gap_ms {
                conn.longest_gap_ms = gap;
                conn.longest_gap_at_ms = last.duration_since(started).as_secs_f64() * 1e3;
            }
        }
        last = Some(now);
        conn.last_echo_unix_ms = unix_ms();
        for (i, byte) in buf[..n].iter().enumerate() {
            let at = offset + i as u64;
            if *byte != pattern(at) && conn.error.is_none() {
                conn.error = Some(format!(
                    "echo byte {at} is {byte}, expected {}",
                    pattern(at)
                ));
            }
        }
        offset += n as u64;
        conn.echoed = offset;
    }
}

fn report(shared: &Shared, path: &PathBuf) {
    let all = shared.lock().unwrap();
    let connections: Vec<_> = all
        .iter()
        .map(|c| {
            json!({
                "local": c.local, "remote": c.remote,
                "pushed": c.pushed, "echoed": c.echoed,
                "error": c.error,
                "longest_gap_ms": c.longest_gap_ms,
                "longest_gap_at_ms": c.longest_gap_at_ms,
                "stalls": c.stalls,
                "last_echo_unix_ms": c.last_echo_unix_ms,
            })
        })
        .collect();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, json!({ "connections": connections }).to_string()).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn main() {
    let mut listen = Vec::<SocketAddr>::new();
    let mut report_path = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--listen" => listen.push(args.next().unwrap().parse().expect("--listen ADDR:PORT")),
            "--report" => report_path = Some(PathBuf::from(args.next().unwrap())),
            other => {
                panic!("unknown argument {other}; usage: lab-peer --listen ADDR:PORT --report FILE")
            }
        }
    }
    let report_path = report_path.expect("--report FILE");
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    let started = Instant::now();
    let shared: Shared = Arc::default();
    for addr in listen {
        let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        let shared = shared.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let slot = {
                    let mut all = shared.lock().unwrap();
                    all.push(Connection {
                        local: stream.local_addr().unwrap().to_string(),
                        remote: stream.peer_addr().unwrap().to_string(),
                        ..Connection::default()
                    });
                    all.len() - 1
                };
                let shared = shared.clone();
                thread::spawn(move || serve(stream, slot, shared, started));
            }
        });
    }
    while !STOP.load(Ordering::Relaxed) {
        report(&shared, &report_path);
        thread::sleep(Duration::from_millis(100));
    }
    report(&shared, &report_path);
}
