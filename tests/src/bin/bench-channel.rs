//! `cargo xtask bench channel`: what TLS costs the image stream. 256 MiB
//! of image-sized data frames go through the real channel (TLS 1.3,
//! token-authenticated) and through a plain TCP socket written the same
//! way (frame header, then the payload from its buffer), alternating in
//! the same run, over loopback; sender and receiver each pinned to a CPU
//! of their own. Prints MiB/s of both and the ratio of their times (median
//! over rounds). Figures, not a test. Target: TLS time at most 1.15x
//! plain.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    future::Future,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::StreamExt as _;
use migrator::channel::{
    self, Acceptor, Credentials, DATA_CHUNK,
    codec::{Frame, FrameCodec, data_header},
    token::Token,
};
use migrator_tests::pin_to_cpu;
use tokio::{
    io::AsyncWriteExt as _,
    net::{TcpListener, TcpStream},
};
use tokio_util::codec::Framed;

const TOTAL: usize = 256 << 20;

/// Run `future` on a runtime of its own on a thread pinned to `cpu`;
/// with its result, the CPU time the thread took (user and system), which
/// other load on the machine disturbs far less than the wall clock.
fn on_cpu<T: Send + 'static>(
    cpu: usize,
    future: impl Future<Output = T> + Send + 'static,
) -> std::thread::JoinHandle<(T, Duration)> {
    std::thread::spawn(move || {
        pin_to_cpu(cpu);
        let result = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(future);
        (result, thread_cpu_time())
    })
}

fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to fill.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// One way through: the wall time from the first byte sent to the last
/// received, and the CPU time both ends took.
struct Run {
    wall: Duration,
    cpu: Duration,
}

fn listener() -> std::net::TcpListener {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    listener
}

fn through_tls(token: &Path, payload: &Bytes) -> Run {
    let std_listener = listener();
    let address = std_listener.local_addr().unwrap();
    let receiver_token = token.to_owned();
    let receiver = on_cpu(1, async move {
        let listener = TcpListener::from_std(std_listener).unwrap();
        let acceptor = Acceptor::new(Credentials::Token(
            Token::from_file(&receiver_token).unwrap(),
        ))
        .unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let mut channel = acceptor.accept(tcp).await.unwrap();
        let mut got = 0;
        while got < TOTAL {
            got += channel.receive_data().await.unwrap().len();
        }
    });
    let (token, payload) = (token.to_owned(), payload.clone());
    let sender = on_cpu(0, async move {
        let credentials = Credentials::Token(Token::from_file(&token).unwrap());
        let mut channel = channel::connect(address, None, &credentials, Duration::from_secs(5))
            .await
            .unwrap();
        let started = Instant::now();
        for _ in 0..TOTAL / DATA_CHUNK {
            channel.send_data(&payload).await.unwrap();
        }
        started
    });
    let (started, sender_cpu) = sender.join().unwrap();
    let ((), receiver_cpu) = receiver.join().unwrap();
    Run {
        wall: started.elapsed(),
        cpu: sender_cpu + receiver_cpu,
    }
}

fn through_plain(payload: &Bytes) -> Run {
    let std_listener = listener();
    let address = std_listener.local_addr().unwrap();
    let receiver = on_cpu(1, async move {
        let listener = TcpListener::from_std(std_listener).unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let mut codec = FrameCodec::pre_auth();
        codec.authenticated();
        let mut framed = Framed::new(tcp, codec);
        let mut got = 0;
        while got < TOTAL {
            match framed.next().await.unwrap().unwrap() {
                Frame::Data(data) => got += data.len(),
                Frame::Message(_) => unreachable!(),
            }
        }
    });
    let payload = payload.clone();
    let sender = on_cpu(0, async move {
        let mut tcp = TcpStream::connect(address).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let started = Instant::now();
        for _ in 0..TOTAL / DATA_CHUNK {
            tcp.write_all(&data_header(payload.len()).unwrap())
                .await
                .unwrap();
            tcp.write_all(&payload).await.unwrap();
        }
        started
    });
    let (started, sender_cpu) = sender.join().unwrap();
    let ((), receiver_cpu) = receiver.join().unwrap();
    Run {
        wall: started.elapsed(),
        cpu: sender_cpu + receiver_cpu,
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    // Rounds are cheap and single ones noisy: at least 21.
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|r| r.parse().ok())
        .unwrap_or(21)
        .max(21);
    let scratch: PathBuf =
        std::env::temp_dir().join(format!("bench-channel-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let token = scratch.join("token");
    migrator_tests::lab::write_token(&token).unwrap();
    let payload = Bytes::from(
        (0..DATA_CHUNK)
            .map(|i| (i * 7 % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let mib = (TOTAL >> 20) as f64;
    let (mut ratios, mut cpu_ratios) = (Vec::new(), Vec::new());
    let (mut tls_rates, mut plain_rates) = (Vec::new(), Vec::new());
    let (mut tls_cpu, mut plain_cpu) = (Vec::new(), Vec::new());
    println!(
        "{rounds} alternating rounds of {mib:.0} MiB each way, 1 MiB frames, loopback, sender and receiver pinned to CPUs 0 and 1; CPU: both ends' threads, user and system"
    );
    for round in 1..=rounds {
        let tls = through_tls(&token, &payload);
        let plain = through_plain(&payload);
        let (tls_rate, plain_rate) = (mib / tls.wall.as_secs_f64(), mib / plain.wall.as_secs_f64());
        let (tls_ms, plain_ms) = (tls.cpu.as_secs_f64() * 1e3, plain.cpu.as_secs_f64() * 1e3);
        println!(
            "  round {round}: TLS {tls_rate:7.0} MiB/s {tls_ms:5.0} ms CPU   plain {plain_rate:7.0} MiB/s {plain_ms:5.0} ms CPU   time ratio {:.3}",
            tls.wall.as_secs_f64() / plain.wall.as_secs_f64()
        );
        ratios.push(tls.wall.as_secs_f64() / plain.wall.as_secs_f64());
        cpu_ratios.push(tls_ms / plain_ms);
        tls_rates.push(tls_rate);
        plain_rates.push(plain_rate);
        tls_cpu.push(tls_ms);
        plain_cpu.push(plain_ms);
    }
    let (low, high) = ratios
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
    println!(
        "median: TLS {:.0} MiB/s, plain {:.0} MiB/s, TLS time / plain time {:.3} (rounds {low:.3} .. {high:.3}; target <= 1.15)",
        median(&mut tls_rates),
        median(&mut plain_rates),
        median(&mut ratios)
    );
    println!(
        "median CPU for {mib:.0} MiB: TLS {:.0} ms, plain {:.0} ms, ratio {:.3}",
        median(&mut tls_cpu),
        median(&mut plain_cpu),
        median(&mut cpu_ratios)
    );
    let _ = std::fs::remove_dir_all(&scratch);
}
