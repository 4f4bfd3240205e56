//! The channel between `migrator migrate` (source) and `migrator agent`
//! (destination): one TLS 1.3 connection (`tls`) carrying every byte,
//! control messages (JSON) and image bytes alike, in frames (`codec`).
//! There is no plaintext mode. Before both sides are authenticated
//! (`auth`: token proofs bound to the session, or certificates) only a
//! hello and proofs in small frames pass.

pub mod auth;
pub mod codec;
pub mod message;
pub mod pages;
pub mod post_copy;
pub mod tls;
pub mod token;

use std::{
    io,
    net::SocketAddr,
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::{SinkExt as _, StreamExt as _};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, BufReader},
    net::TcpStream,
};
use tokio_rustls::{TlsAcceptor, TlsConnector, TlsStream};
use tokio_util::codec::Framed;

pub use codec::DATA_CHUNK;
use codec::{Frame, FrameCodec};
pub use message::Message;
pub use tls::Credentials;

pub const PROTOCOL_VERSION: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("the other side closed the connection")]
    Closed,
    #[error("malformed frame: {0}")]
    Frame(String),
    #[error("malformed message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("unexpected message: expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
    #[error("the other side refused: {0}")]
    Refused(String),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error(
        "TLS handshake with {peer} failed: {reason} (both hosts must use the same --token-file, or certificates from the same --ca)"
    )]
    Handshake { peer: SocketAddr, reason: String },
    #[error("no answer from the other side within {0:?}")]
    Timeout(Duration),
    #[error(transparent)]
    Setup(#[from] tls::TlsSetupError),
}

/// One end of the connection, framed; `S` is the TLS stream (or, in unit
/// tests, an in-memory pipe).
pub struct Channel<S> {
    framed: Framed<S, FrameCodec>,
    /// This session's TLS exporter value, which token proofs are bound to.
    exporter: [u8; token::EXPORTER_LEN],
    /// Every receive or send gives up after this long.
    idle_timeout: Duration,
    /// And in any case at this moment (a lock's deadline).
    hard_deadline: Option<Instant>,
}

/// The channel as used between hosts. rustls reads the socket 4 KiB at a
/// time; a buffer underneath turns that into one system call per 256 KiB
/// (TLS throughput about +7% in `cargo xtask bench channel`).
pub type TlsChannel = Channel<TlsStream<BufReader<TcpStream>>>;

/// Socket reads below TLS.
const READ_BUFFER: usize = 256 << 10;

/// What rustls may hold encrypted before it must be written out: a whole
/// data frame. Its default (64 KiB) cuts each 1 MiB frame into 16 socket
/// writes; this way one `writev` carries a frame (`bench channel`, CPU of
/// both ends per 256 MiB: 270-420 ms before, 255-285 ms after).
const SEND_BUFFER: usize = DATA_CHUNK + (64 << 10);

impl<S: AsyncRead + AsyncWrite + Unpin> Channel<S> {
    fn new(stream: S, exporter: [u8; token::EXPORTER_LEN]) -> Self {
        Self {
            framed: Framed::new(stream, FrameCodec::pre_auth()),
            exporter,
            idle_timeout: Duration::from_secs(30),
            hard_deadline: None,
        }
    }

    /// No wait on this channel lasts past `deadline` from now on.
    pub fn set_hard_deadline(&mut self, deadline: Instant) {
        self.hard_deadline = Some(deadline);
    }

    /// How long the next wait may last: the idle timeout, cut short by
    /// `deadline` and the hard deadline.
    fn wait_limit(&self, deadline: Option<Instant>) -> Duration {
        [deadline, self.hard_deadline]
            .into_iter()
            .flatten()
            .map(|at| at.saturating_duration_since(Instant::now()))
            .fold(self.idle_timeout, Duration::min)
    }

    /// How long any receive waits for the other side.
    pub fn set_idle_timeout(&mut self, timeout: Duration) {
        self.idle_timeout = timeout;
    }

    fn authenticated(&mut self) {
        self.framed.codec_mut().authenticated();
    }

    pub async fn send(&mut self, message: &Message) -> Result<(), ChannelError> {
        let bytes = serde_json::to_vec(message)?;
        self.send_frame(Frame::Message(bytes.into())).await
    }

    /// Image bytes go from their buffer to the stream: no copy into the
    /// encoder's (the frame layout is the codec's).
    pub async fn send_data(&mut self, data: &[u8]) -> Result<(), ChannelError> {
        let header = codec::data_header(data.len())?;
        let wait = self.wait_limit(None);
        // Every send flushes, so the encoder's buffer is empty here.
        let stream = self.framed.get_mut();
        let write = async {
            stream.write_all(&header).await?;
            stream.write_all(data).await?;
            stream.flush().await
        };
        tokio::time::timeout(wait, write)
            .await
            .map_err(|_| ChannelError::Timeout(wait))?
            .map_err(ChannelError::Io)
    }

    /// A peer that stops reading makes a send wait: not longer than the
    /// idle timeout.
    async fn send_frame(&mut self, frame: Frame) -> Result<(), ChannelError> {
        let wait = self.wait_limit(None);
        tokio::time::timeout(wait, self.framed.send(frame))
            .await
            .map_err(|_| ChannelError::Timeout(wait))?
    }

    async fn next_frame(&mut self, deadline: Option<Instant>) -> Result<Frame, ChannelError> {
        let wait = self.wait_limit(deadline);
        match tokio::time::timeout(wait, self.framed.next()).await {
            Err(_) => Err(ChannelError::Timeout(wait)),
            Ok(None) => Err(ChannelError::Closed),
            Ok(Some(frame)) => frame,
        }
    }

    pub async fn receive(&mut self) -> Result<Message, ChannelError> {
        self.receive_before(None).await
    }

    /// Receive a message, giving up at `deadline` (or the idle timeout,
    /// whichever comes first).
    pub async fn receive_before(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<Message, ChannelError> {
        match self.next_frame(deadline).await? {
            Frame::Message(payload) => Ok(serde_json::from_slice(&payload)?),
            Frame::Data(_) => Err(ChannelError::Frame(
                "data where a message was expected".into(),
            )),
        }
    }

    pub async fn receive_data(&mut self) -> Result<Bytes, ChannelError> {
        match self.next_frame(None).await? {
            Frame::Data(payload) => Ok(payload),
            Frame::Message(payload) => match serde_json::from_slice::<Message>(&payload) {
                Ok(Message::Failed { reason, .. } | Message::Refused { reason }) => {
                    Err(ChannelError::Refused(reason))
                }
                _ => Err(ChannelError::Frame(
                    "a message where data was expected".into(),
                )),
            },
        }
    }

    /// Send a whole file: a `File` message, then its bytes in chunks.
    /// Returns the bytes sent. The file is read in place, not through
    /// tokio's thread pool: images are in memory (tmpfs), where a read
    /// costs microseconds and a hop to another thread and back costs more
    /// (the small workload's transfer inside the freeze: dozens of files).
    pub async fn send_file(&mut self, path: &Path, name: &str) -> Result<u64, ChannelError> {
        self.send_file_parts(path, name, None).await
    }

    /// Send only `extents` (offset, length; in order, apart) of a file:
    /// the other end keeps its size and leaves the rest a hole.
    pub async fn send_file_parts(
        &mut self,
        path: &Path,
        name: &str,
        extents: Option<Vec<(u64, u64)>>,
    ) -> Result<u64, ChannelError> {
        use std::os::unix::fs::FileExt as _;
        let file = std::fs::File::open(path)?;
        let size = file.metadata()?.len();
        let parts = extents.clone().unwrap_or_else(|| vec![(0, size)]);
        if let Some((at, len)) = parts
            .iter()
            .find(|(at, len)| at.saturating_add(*len) > size)
        {
            return Err(ChannelError::Frame(format!(
                "{}: bytes {at}..{} asked for, the file has {size}",
                path.display(),
                at + len
            )));
        }
        self.send(&Message::File {
            name: name.to_owned(),
            size,
            extents,
        })
        .await?;
        // One buffer for the whole file: nothing allocated or cleared per
        // chunk on the way out.
        let longest = parts.iter().map(|(_, len)| *len).max().unwrap_or(0);
        let mut chunk = vec![0u8; DATA_CHUNK.min(usize::try_from(longest).unwrap_or(DATA_CHUNK))];
        let mut sent = 0u64;
        for (at, len) in parts {
            let mut done = 0u64;
            while done < len {
                let want = chunk
                    .len()
                    .min(usize::try_from(len - done).unwrap_or(usize::MAX));
                let n = file.read_at(&mut chunk[..want], at + done)?;
                if n == 0 {
                    return Err(ChannelError::Frame(format!(
                        "{} shrank while being sent",
                        path.display()
                    )));
                }
                self.send_data(&chunk[..n]).await?;
                done += n as u64;
            }
            sent += len;
        }
        Ok(sent)
    }

    /// No wait on this channel is bound to the hard deadline any more
    /// (the lock it stood for was released).
    pub fn clear_hard_deadline(&mut self) {
        self.hard_deadline = None;
    }
}

/// The source's side: TCP connect, TLS, then proof of who both ends are.
/// `server_name`: what the agent's certificate must name (certificate
/// mode); the address dialled if not given.
pub async fn connect(
    to: SocketAddr,
    server_name: Option<&str>,
    credentials: &Credentials,
    timeout: Duration,
) -> Result<TlsChannel, ChannelError> {
    let config = tls::client_config(credentials)?;
    let name = match (credentials, server_name) {
        (Credentials::Certificates { .. }, Some(name)) => {
            rustls::pki_types::ServerName::try_from(name.to_owned()).map_err(|_| {
                ChannelError::Auth(format!(
                    "--server-name {name:?} is not a DNS name or address"
                ))
            })?
        }
        (Credentials::Certificates { .. }, None) => to.ip().into(),
        // Token mode: the certificate proves nothing, any valid name.
        (Credentials::Token(_), _) => rustls::pki_types::ServerName::try_from("migrator")
            .map_err(|_| ChannelError::Auth("server name".into()))?,
    };
    let handshake = async {
        let tcp = TcpStream::connect(to).await.map_err(|e| {
            ChannelError::Io(io::Error::new(
                e.kind(),
                format!("agent {to}: {e} (is `migrator agent` running there?)"),
            ))
        })?;
        let _ = tcp.set_nodelay(true);
        let mut stream = TlsConnector::from(config)
            .connect(name, BufReader::with_capacity(READ_BUFFER, tcp))
            .await
            .map_err(|e| ChannelError::Handshake {
                peer: to,
                reason: e.to_string(),
            })?;
        stream.get_mut().1.set_buffer_limit(Some(SEND_BUFFER));
        let exporter = exporter(stream.get_ref().1)?;
        let mut channel = Channel::new(TlsStream::Client(stream), exporter);
        // In TLS 1.3 the agent judges our certificate after our side of
        // the handshake is done: its verdict arrives as an alert on the
        // first read.
        auth::client(&mut channel, credentials)
            .await
            .map_err(|err| match err {
                ChannelError::Io(io) if io.kind() == io::ErrorKind::InvalidData => {
                    ChannelError::Handshake {
                        peer: to,
                        reason: io.to_string(),
                    }
                }
                other => other,
            })?;
        Ok(channel)
    };
    tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| ChannelError::Timeout(timeout))?
}

/// The agent's side of the handshake, shared by every connection.
#[derive(Clone)]
pub struct Acceptor {
    tls: TlsAcceptor,
    credentials: Arc<Credentials>,
}

impl Acceptor {
    pub fn new(credentials: Credentials) -> Result<Self, ChannelError> {
        let config = tls::server_config(&credentials)?;
        Ok(Self {
            tls: TlsAcceptor::from(config),
            credentials: Arc::new(credentials),
        })
    }

    /// TLS, then proof of who both ends are; the caller bounds it in time.
    pub async fn accept(&self, tcp: TcpStream) -> Result<TlsChannel, ChannelError> {
        let peer = tcp.peer_addr()?;
        let _ = tcp.set_nodelay(true);
        let mut stream = self
            .tls
            .accept(BufReader::with_capacity(READ_BUFFER, tcp))
            .await
            .map_err(|e| ChannelError::Handshake {
                peer,
                reason: e.to_string(),
            })?;
        stream.get_mut().1.set_buffer_limit(Some(SEND_BUFFER));
        let exporter = exporter(stream.get_ref().1)?;
        let mut channel = Channel::new(TlsStream::Server(stream), exporter);
        auth::server(&mut channel, &self.credentials).await?;
        Ok(channel)
    }
}

/// This session's exporter value (RFC 8446 §7.5), which the token
/// proofs are bound to.
fn exporter<D>(
    connection: &rustls::ConnectionCommon<D>,
) -> Result<[u8; token::EXPORTER_LEN], ChannelError> {
    connection
        .export_keying_material([0u8; token::EXPORTER_LEN], token::EXPORTER_LABEL, None)
        .map_err(|e| ChannelError::Auth(format!("TLS exporter: {e}")))
}

/// Text from the other side, safe to print: control characters escaped.
pub fn printable(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_from_the_peer_are_escaped() {
        assert_eq!(printable("ok\u{1b}[2J\nx"), "ok\\u{1b}[2J\\nx");
        assert_eq!(printable("plain text é"), "plain text é");
    }
}
