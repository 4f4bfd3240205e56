//! `cargo xtask bench channel`: what TLS costs the image stream. 256 MiB
//! of image-sized data frames go through the real channel (TLS 1.3,
//! token-authenticated) and through a plain TCP socket with the same
//! framing, alternating in the same run, over loopback. Prints MiB/s of
//! both and the ratio of their times (median over rounds). Figures, not a
//! test. Target: TLS time at most 1.15x plain.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use migrator::channel::{
    self, Acceptor, Credentials, DATA_CHUNK,
    codec::{Frame, FrameCodec},
    token::Token,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;

const TOTAL: usize = 256 << 20;

async fn through_tls(credentials_file: &std::path::Path, payload: &Bytes) -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let acceptor = Acceptor::new(Credentials::Token(
        Token::from_file(credentials_file).unwrap(),
    ))
    .unwrap();
    let receiver = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut channel = acceptor.accept(tcp).await.unwrap();
        let mut got = 0;
        while got < TOTAL {
            got += channel.receive_data().await.unwrap().len();
        }
    });
    let credentials = Credentials::Token(Token::from_file(credentials_file).unwrap());
    let mut channel = channel::connect(address, None, &credentials, Duration::from_secs(5))
        .await
        .unwrap();
    let started = Instant::now();
    for _ in 0..TOTAL / DATA_CHUNK {
        channel.send_data(payload.clone()).await.unwrap();
    }
    receiver.await.unwrap();
    started.elapsed()
}

async fn through_plain(payload: &Bytes) -> Duration {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address: SocketAddr = listener.local_addr().unwrap();
    let receiver = tokio::spawn(async move {
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
    let tcp = TcpStream::connect(address).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let mut codec = FrameCodec::pre_auth();
    codec.authenticated();
    let mut framed = Framed::new(tcp, codec);
    let started = Instant::now();
    for _ in 0..TOTAL / DATA_CHUNK {
        framed.send(Frame::Data(payload.clone())).await.unwrap();
    }
    receiver.await.unwrap();
    started.elapsed()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|r| r.parse().ok())
        .unwrap_or(5)
        .max(1);
    let scratch = std::env::temp_dir().join(format!("bench-channel-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let token = scratch.join("token");
    migrator_tests::lab::write_token(&token).unwrap();
    // Image pages are not compressible noise, but TLS does not care.
    let payload = Bytes::from(
        (0..DATA_CHUNK)
            .map(|i| (i * 7 % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mib = (TOTAL >> 20) as f64;
    let mut ratios = Vec::new();
    let (mut tls_rates, mut plain_rates) = (Vec::new(), Vec::new());
    println!("{rounds} alternating rounds of {mib:.0} MiB each way, 1 MiB frames, loopback");
    for round in 1..=rounds {
        let tls = runtime.block_on(through_tls(&token, &payload));
        let plain = runtime.block_on(through_plain(&payload));
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
