//! The connection between `migrator migrate` (source) and `migrator agent`
//! (destination): frames over TCP, a mutual token challenge before
//! anything else, JSON control messages and raw image bytes.
//!
//! Frame: kind (1 byte), length (u32, big endian), payload. Lengths are
//! bounded so a peer cannot make the other side allocate at will.

pub mod auth;
pub mod message;

use std::{io, path::Path};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

pub use message::Message;

pub const PROTOCOL_VERSION: u32 = 1;

const KIND_MESSAGE: u8 = 1;
const KIND_DATA: u8 = 2;
/// Largest control message and largest data chunk.
const MAX_MESSAGE: u32 = 1 << 20;
pub const DATA_CHUNK: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
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
}

/// One end of the connection, framed.
pub struct Channel<S> {
    stream: S,
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Channel<S> {
    pub fn new(stream: S) -> Self {
        Self { stream }
    }

    pub async fn send(&mut self, message: &Message) -> Result<(), ProtocolError> {
        let bytes = serde_json::to_vec(message)?;
        self.write_frame(KIND_MESSAGE, &bytes).await
    }

    pub async fn send_data(&mut self, data: &[u8]) -> Result<(), ProtocolError> {
        self.write_frame(KIND_DATA, data).await
    }

    async fn write_frame(&mut self, kind: u8, payload: &[u8]) -> Result<(), ProtocolError> {
        let len = u32::try_from(payload.len())
            .map_err(|_| ProtocolError::Frame("payload over 4 GiB".into()))?;
        let mut header = [0u8; 5];
        header[0] = kind;
        header[1..].copy_from_slice(&len.to_be_bytes());
        self.stream.write_all(&header).await?;
        self.stream.write_all(payload).await?;
        Ok(())
    }

    async fn read_frame(&mut self) -> Result<(u8, Vec<u8>), ProtocolError> {
        let mut header = [0u8; 5];
        match self.stream.read_exact(&mut header).await {
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(ProtocolError::Closed);
            }
            Err(err) => return Err(err.into()),
        }
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        let limit = match header[0] {
            KIND_MESSAGE => MAX_MESSAGE,
            KIND_DATA => DATA_CHUNK as u32,
            other => return Err(ProtocolError::Frame(format!("unknown frame kind {other}"))),
        };
        if len > limit {
            return Err(ProtocolError::Frame(format!(
                "frame of {len} bytes, limit {limit}"
            )));
        }
        let mut payload = vec![0u8; len as usize];
        self.stream.read_exact(&mut payload).await?;
        Ok((header[0], payload))
    }

    pub async fn receive(&mut self) -> Result<Message, ProtocolError> {
        match self.read_frame().await? {
            (KIND_MESSAGE, payload) => Ok(serde_json::from_slice(&payload)?),
            _ => Err(ProtocolError::Frame(
                "data where a message was expected".into(),
            )),
        }
    }

    pub async fn receive_data(&mut self) -> Result<Vec<u8>, ProtocolError> {
        match self.read_frame().await? {
            (KIND_DATA, payload) => Ok(payload),
            (_, payload) => match serde_json::from_slice::<Message>(&payload) {
                Ok(Message::Failed { reason, .. } | Message::Refused { reason }) => {
                    Err(ProtocolError::Refused(reason))
                }
                _ => Err(ProtocolError::Frame(
                    "a message where data was expected".into(),
                )),
            },
        }
    }

    /// Send a whole file: a `File` message, then its bytes in chunks.
    /// Returns the bytes sent.
    pub async fn send_file(&mut self, path: &Path, name: &str) -> Result<u64, ProtocolError> {
        let mut file = tokio::fs::File::open(path).await?;
        let size = file.metadata().await?.len();
        self.send(&Message::File {
            name: name.to_owned(),
            size,
        })
        .await?;
        let mut buf = vec![0u8; DATA_CHUNK];
        let mut sent = 0u64;
        while sent < size {
            let n = file.read(&mut buf).await?;
            if n == 0 {
                return Err(ProtocolError::Frame(format!(
                    "{} shrank while being sent",
                    path.display()
                )));
            }
            self.send_data(&buf[..n]).await?;
            sent += n as u64;
        }
        Ok(sent)
    }
}

/// Read the shared token: the file's content without surrounding
/// whitespace, at least 16 characters.
pub fn read_token(path: &Path) -> Result<Vec<u8>, String> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        format!(
            "token file {}: {err}; create one on both hosts, e.g. `head -c 32 /dev/urandom | base64 > {}` and `chmod 600` it",
            path.display(),
            path.display()
        )
    })?;
    let token = text.trim();
    if token.len() < 16 {
        return Err(format!(
            "token file {}: the token is {} characters, need at least 16 (e.g. `head -c 32 /dev/urandom | base64`)",
            path.display(),
            token.len()
        ));
    }
    Ok(token.as_bytes().to_vec())
}
