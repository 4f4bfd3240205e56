//! The dump's memory, streamed while it is dumped: CRIU's page-server
//! protocol (page-map headers and pages one way, a byte per opened image
//! and a closing status the other) carried through this channel, never
//! through a second connection. On the source, `criu dump` writes it into
//! a local socket ([`forward`] sends what comes out as data frames and
//! writes the answers back); on the agent, [`deliver`] writes the frames
//! into the socket of `criu page-server`, which writes the images there.
//!
//! Both ends read and write at once: CRIU waits for the page server's
//! answer to each opened page map, so neither direction may wait for the
//! other to finish.

use std::time::Instant;

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::UnixStream,
};

use super::{Channel, ChannelError, DATA_CHUNK, Message, codec::Frame};

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

/// Agent: write the source's page stream into the page server's `socket`
/// and its answers back, refusing a stream over `limit` bytes, until the
/// source says CRIU closed its end and the page server has closed ours.
pub async fn deliver<S>(
    channel: &mut Channel<S>,
    socket: UnixStream,
    limit: u64,
    deadline: Instant,
) -> Result<u64, ChannelError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut from_server, mut to_server) = socket.into_split();
    let mut buf = vec![0u8; 64 << 10];
    let mut received = 0u64;
    let (mut source_done, mut server_done) = (false, false);
    while !(source_done && server_done) {
        tokio::select! {
            frame = channel.next_frame(Some(deadline)), if !source_done => match frame? {
                Frame::Data(pages) => {
                    received += pages.len() as u64;
                    if received > limit {
                        let reason = format!(
                            "page stream over the {} MiB announced at preflight (with room to spare)",
                            limit >> 20
                        );
                        channel.send(&Message::Refused { reason: reason.clone() }).await?;
                        return Err(ChannelError::Refused(reason));
                    }
                    to_server.write_all(&pages).await?;
                }
                Frame::Message(payload) => match serde_json::from_slice::<Message>(&payload)? {
                    Message::PagesEnd { bytes } if bytes == received => source_done = true,
                    Message::PagesEnd { bytes } => {
                        return Err(ChannelError::Frame(format!(
                            "page stream incomplete: got {received} bytes, source sent {bytes}"
                        )));
                    }
                    other => {
                        return Err(ChannelError::Unexpected {
                            expected: "page-stream data or pages-end",
                            got: other.name(),
                        });
                    }
                },
            },
            read = from_server.read(&mut buf), if !server_done => {
                let n = read?;
                if n == 0 {
                    server_done = true;
                } else {
                    channel.send_data(&buf[..n]).await?;
                }
            }
        }
    }
    channel
        .send(&Message::PagesDone { bytes: received })
        .await?;
    Ok(received)
}
