//! The dump's memory, streamed while it is dumped: CRIU's page-server
//! protocol (page-map headers and pages one way, a byte per opened image
//! and a closing status the other) carried through this channel, never
//! through a second connection. On the source, `criu dump` writes it into
//! a local socket ([`relay`] sends what comes out as data frames and
//! writes the answers back; [`finish`] or, if the dump failed and runs
//! again, [`restart`] once CRIU closed it); on the agent, [`deliver`] feeds the frames to
//! a [`PageStore`], which writes the page images there and answers.
//!
//! The source reads and writes at once: CRIU waits for the answer to each
//! opened page map, so neither direction may wait for the other.

use std::time::Instant;

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::UnixStream,
};

use super::{Channel, ChannelError, DATA_CHUNK, Message, codec::Frame};
use crate::criu::page_stream::PageStore;

/// A socket to CRIU's page-server protocol, for tokio.
pub fn unix_stream(fd: std::os::fd::OwnedFd) -> Result<UnixStream, String> {
    let socket = std::os::unix::net::UnixStream::from(fd);
    socket
        .set_nonblocking(true)
        .and_then(|()| UnixStream::from_std(socket))
        .map_err(|e| format!("a page socket: {e}"))
}

/// Source: relay CRIU's page stream from `socket` to the agent, and the
/// agent's answers back, until CRIU closes its end (its pages are all
/// out, or it failed). Returns the bytes sent. Whether the stream counts
/// is CRIU's verdict: then [`finish`] or [`restart`].
pub async fn relay<S>(channel: &mut Channel<S>, socket: UnixStream) -> Result<u64, ChannelError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut from_criu, mut to_criu) = socket.into_split();
    let mut buf = vec![0u8; DATA_CHUNK];
    let mut sent = 0u64;
    loop {
        tokio::select! {
            read = from_criu.read(&mut buf) => {
                let n = read?;
                if n == 0 {
                    return Ok(sent);
                }
                channel.send_data(&buf[..n]).await?;
                sent += n as u64;
            }
            frame = channel.next_frame(None) => match frame? {
                Frame::Data(answer) => to_criu.write_all(&answer).await?,
                Frame::Message(payload) => {
                    return Err(not_awaited(serde_json::from_slice(&payload)?, "page-stream data"));
                }
            }
        }
    }
}

/// Source, CRIU having dumped: tell the agent the stream of `sent` bytes
/// is over, and wait until its page server has written all of it.
pub async fn finish<S>(channel: &mut Channel<S>, sent: u64) -> Result<(), ChannelError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    channel.send(&Message::PagesEnd { bytes: sent }).await?;
    match next_message(channel).await? {
        Message::PagesDone { bytes } if bytes == sent => Ok(()),
        Message::PagesDone { bytes } => Err(ChannelError::Frame(format!(
            "the agent's page server got {bytes} bytes of {sent} sent"
        ))),
        other => Err(not_awaited(other, "pages-done")),
    }
}

/// Source, CRIU's dump having failed: have the agent drop the page images
/// so far, and wait until no answer for the old stream can follow.
pub async fn restart<S>(channel: &mut Channel<S>) -> Result<(), ChannelError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    channel.send(&Message::PagesRestart).await?;
    match next_message(channel).await? {
        Message::PagesRestarted => Ok(()),
        other => Err(not_awaited(other, "pages-restarted")),
    }
}

/// The agent's next message; answers still on their way to a CRIU that
/// is gone are skipped (nobody reads them).
async fn next_message<S>(channel: &mut Channel<S>) -> Result<Message, ChannelError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        if let Frame::Message(payload) = channel.next_frame(None).await? {
            return Ok(serde_json::from_slice(&payload)?);
        }
    }
}

/// The error for a message other than the one awaited: the agent's
/// refusal as such, anything else as unexpected.
fn not_awaited(message: Message, expected: &'static str) -> ChannelError {
    match message {
        Message::Refused { reason } | Message::Failed { reason, .. } => {
            ChannelError::Refused(super::printable(&reason))
        }
        other => ChannelError::Unexpected {
            expected,
            got: other.name(),
        },
    }
}

/// Agent: write the source's page stream into `store` (page-map and
/// pages images) and send its answers back, refusing a stream over
/// `limit` bytes, until the source says CRIU closed its end. Returns the
/// bytes received.
pub async fn deliver<S>(
    channel: &mut Channel<S>,
    store: &mut PageStore<'_>,
    limit: u64,
    deadline: Instant,
) -> Result<u64, ChannelError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut received = 0u64;
    let mut replies = Vec::new();
    loop {
        match channel.next_frame(Some(deadline)).await? {
            Frame::Data(pages) => {
                received += pages.len() as u64;
                if received > limit {
                    let reason = format!(
                        "page stream over the {} MiB announced at preflight (with room to spare)",
                        limit >> 20
                    );
                    return Err(refuse(channel, reason).await);
                }
                // Writes to the images' tmpfs: copies into memory, done
                // in place rather than handed to another thread per chunk.
                if let Err(err) = store.feed(&pages, &mut replies) {
                    return Err(refuse(channel, err.to_string()).await);
                }
                if !replies.is_empty() {
                    channel.send_data(&replies).await?;
                    replies.clear();
                }
            }
            Frame::Message(payload) => match serde_json::from_slice::<Message>(&payload)? {
                Message::PagesEnd { bytes } if bytes == received && store.closed() => break,
                Message::PagesEnd { bytes } => {
                    return Err(ChannelError::Frame(format!(
                        "page stream incomplete: got {received} bytes{}, source sent {bytes}",
                        if store.closed() { "" } else { " and no close" }
                    )));
                }
                // The dump failed and runs again: a new stream from the
                // start (the tree still frozen at the source).
                Message::PagesRestart => {
                    if let Err(err) = store.discard() {
                        return Err(refuse(channel, err.to_string()).await);
                    }
                    received = 0;
                    channel.send(&Message::PagesRestarted).await?;
                }
                other => {
                    return Err(ChannelError::Unexpected {
                        expected: "page-stream data or pages-end",
                        got: other.name(),
                    });
                }
            },
        }
    }
    channel
        .send(&Message::PagesDone { bytes: received })
        .await?;
    Ok(received)
}

/// Tell the source why the stream is refused; the error to end with (the
/// channel's own, if even that could not be sent).
async fn refuse<S>(channel: &mut Channel<S>, reason: String) -> ChannelError
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match channel
        .send(&Message::Refused {
            reason: reason.clone(),
        })
        .await
    {
        Ok(()) => ChannelError::Refused(reason),
        Err(err) => err,
    }
}
