//! Prometheus metrics, for `watch --metrics-addr` (the connections of a
//! move, live) and `agent --metrics-addr` (migrations received): a
//! `prometheus-client` registry, served over HTTP by hyper with
//! timeouts, so a slow or stuck scraper cannot hold a connection open.
//!
//! Names carry their unit (`_seconds`, `_bytes`) and counters end in
//! `_total` (the OpenMetrics text format). Per-connection series are
//! labelled `local` and `remote`; on hosts with many connections
//! `--no-connection-labels` sums them into one series per metric.

pub mod connections;
pub mod migrations;

use std::{convert::Infallible, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// A request's headers must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection lives longer than this, whatever the client does.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(15);

/// The OpenMetrics text format, as Prometheus asks for it.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serve `registry` at `/metrics` (and `/`) on `listener`, forever.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors, or the like: try again shortly.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| answer(request, registry.clone()));
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await;
        });
    }
}

async fn answer(
    request: Request<hyper::body::Incoming>,
    registry: Arc<Registry>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = request.uri().path();
    let response = if path == "/metrics" || path == "/" {
        let mut text = String::new();
        match prometheus_client::encoding::text::encode(&mut text, &registry) {
            Ok(()) => Response::builder()
                .header(hyper::header::CONTENT_TYPE, CONTENT_TYPE)
                .body(Full::new(Bytes::from(text))),
            Err(_) => Response::builder()
                .status(StatusCode::INTERNAL_SERVER_ERROR)
                .body(Full::new(Bytes::from_static(
                    b"encoding the metrics failed\n",
                ))),
        }
    } else {
        Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::from_static(b"not found: try /metrics\n")))
    };
    Ok(response.unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))))
}

/// Bind `addr` and serve `registry` there in the background.
pub async fn spawn_server(
    addr: std::net::SocketAddr,
    registry: Registry,
) -> Result<(), std::io::Error> {
    let listener = TcpListener::bind(addr).await?;
    tokio::spawn(serve(listener, Arc::new(registry)));
    Ok(())
}
