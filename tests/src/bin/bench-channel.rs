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

/// Run `future` on a runtime of its own on a thread pinned to `cpu`.
fn on_cpu<T: Send + 'static>(
    cpu: usize,
    future: impl Future<Output = T> + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        pin_to_cpu(cpu);
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(future)
    })
}

fn listener() -> std::net::TcpListener {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    listener
}

fn through_tls(token: &Path, payload: &Bytes) -> Duration {
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
    let started = sender.join().unwrap();
    receiver.join().unwrap();
    started.elapsed()
}

fn through_plain(payload: &Bytes) -> Duration {
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
    let started = sender.join().unwrap();
    receiver.join().unwrap();
    started.elapsed()
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
    let mut ratios = Vec::new();
    let (mut tls_rates, mut plain_rates) = (Vec::new(), Vec::new());
    println!(
        "{rounds} alternating rounds of {mib:.0} MiB each way, 1 MiB frames, loopback, sender and receiver pinned to CPUs 0 and 1"
    );
    for round in 1..=rounds {
        let tls = through_tls(&token, &payload);
        let plain = through_plain(&payload);
        let (tls_rate, plain_rate) = (mib / tls.as_secs_f64(), mib / plain.as_secs_f64());
        println!(
            "  round {round}: TLS {tls_rate:7.0} MiB/s   plain {plain_rate:7.0} MiB/s   time ratio {:.3}",
            tls.as_secs_f64() / plain.as_secs_f64()
        );
        ratios.push(tls.as_secs_f64() / plain.as_secs_f64());
        tls_rates.push(tls_rate);
        plain_rates.push(plain_rate);
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
    let _ = std::fs::remove_dir_all(&scratch);
}
