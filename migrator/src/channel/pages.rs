//! The dump's memory, streamed while it is dumped: CRIU's page-server
//! protocol (page-map headers and pages one way, a byte per opened image
//! and a closing status the other) carried through this channel, never
//! through a second connection. On the source, `criu dump` writes it into
//! a local socket ([`forward`] sends what comes out as data frames and
//! writes the answers back); on the agent, [`deliver`] feeds the frames to
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

/// Source: relay CRIU's page stream from `socket` to the agent until CRIU
/// closes it and the agent says its page server has every byte. Returns
/// the bytes sent.
pub async fn forward<S>(channel: &mut Channel<S>, socket: UnixStream) -> Result<u64, ChannelError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut from_criu, mut to_criu) = socket.into_split();
    let mut buf = vec![0u8; DATA_CHUNK];
    let mut sent = 0u64;
    let mut criu_done = false;
    loop {
        tokio::select! {
            read = from_criu.read(&mut buf), if !criu_done => {
                let n = read?;
                if n == 0 {
                    criu_done = true;
                    channel.send(&Message::PagesEnd { bytes: sent }).await?;
                } else {
                    channel.send_data(&buf[..n]).await?;
                    sent += n as u64;
                }
            }
            frame = channel.next_frame(None) => match frame? {
                // An answer for CRIU; once CRIU is gone nobody reads it.
                Frame::Data(answer) => {
                    if !criu_done {
                        to_criu.write_all(&answer).await?;
                    }
                }
                Frame::Message(payload) => {
                    return match serde_json::from_slice::<Message>(&payload)? {
                        Message::PagesDone { bytes } if criu_done && bytes == sent => Ok(sent),
                        Message::PagesDone { bytes } => Err(ChannelError::Frame(format!(
                            "the agent's page server got {bytes} bytes of {sent} sent{}",
                            if criu_done { "" } else { " so far" }
                        ))),
                        Message::Refused { reason } | Message::Failed { reason, .. } => {
                            Err(ChannelError::Refused(super::printable(&reason)))
                        }
                        other => Err(ChannelError::Unexpected {
                            expected: "page-stream data or pages-done",
                            got: other.name(),
                        }),
                    };
                }
            }
        }
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
                    channel
                        .send(&Message::Refused {
                            reason: reason.clone(),
                        })
                        .await?;
                    return Err(ChannelError::Refused(reason));
                }
                // Writes to the images' tmpfs: copies into memory, done
                // in place rather than handed to another thread per chunk.
                if let Err(err) = store.feed(&pages, &mut replies) {
                    let reason = err.to_string();
                    channel
                        .send(&Message::Refused {
                            reason: reason.clone(),
                        })
                        .await?;
                    return Err(ChannelError::Refused(reason));
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
