//! Post-copy's page traffic, after the release (`migrate --post-copy`):
//! the destination's `criu lazy-pages` daemon asks for the pages it
//! lacks with CRIU's page-server protocol on a local socket;
//! [`ask_source`] (agent) turns each request into a `PagesWanted`
//! message and writes the source's answer back to the daemon, and
//! [`receive_answering`] (source) reads the pages from its dump's
//! images. One request at a time, in the daemon's order, which is the
//! order in which it waits for the answers.

use std::{os::unix::fs::FileExt as _, time::Instant};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::UnixStream,
};

use super::{Channel, ChannelError, DATA_CHUNK, Message};
use crate::criu::{
    page_source::PageSource,
    page_stream::{
        PAGE, PE_PRESENT, PS_IOV_ADD_F, PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE, PS_IOV_GET, RECORD,
    },
};

/// The daemon asks for at most 4 MiB at once (CRIU's MAX_XFER_LEN); a
/// request for more is not one of its own.
const MAX_PAGES: u64 = (4 << 20) / PAGE;

/// CRIU's `struct page_server_iov`: cmd, 4 bytes padding, nr_pages,
/// vaddr, dst_id (the host's byte order).
fn record(cmd: u32, pages: u64, vaddr: u64, id: u64) -> [u8; RECORD] {
    let mut out = [0u8; RECORD];
    out[..4].copy_from_slice(&cmd.to_ne_bytes());
    out[8..16].copy_from_slice(&pages.to_ne_bytes());
    out[16..24].copy_from_slice(&vaddr.to_ne_bytes());
    out[24..32].copy_from_slice(&id.to_ne_bytes());
    out
}

fn parse(record: &[u8; RECORD]) -> (u32, u64, u64, u64) {
    let word = |at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&record[at..at + 8]);
        u64::from_ne_bytes(bytes)
    };
    let mut cmd = [0u8; 4];
    cmd.copy_from_slice(&record[..4]);
    (u32::from_ne_bytes(cmd), word(8), word(16), word(24))
}

/// Agent: relay the daemon's requests on `daemon` to the source and its
/// pages back, until the daemon has every page (it says goodbye and
/// closes its end). Returns how many pages came. An error leaves the
/// daemon waiting for pages that will not come: the caller must end it
/// (and the process it fills).
pub async fn ask_source<S>(
    channel: &mut Channel<S>,
    daemon: &mut UnixStream,
) -> Result<u64, ChannelError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut pages_in = 0u64;
    while let Some(pages) = relay_one(channel, daemon).await? {
        pages_in += pages;
    }
    Ok(pages_in)
}

/// Agent: one request of the daemon, relayed and answered (how many
/// pages came), or None once the daemon closed its end.
pub async fn relay_one<S>(
    channel: &mut Channel<S>,
    daemon: &mut UnixStream,
) -> Result<Option<u64>, ChannelError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut request = [0u8; RECORD];
    match daemon.read_exact(&mut request).await {
        Ok(_) => {}
        // Gone after its goodbye: every page is in.
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(err) => return Err(err.into()),
    }
    let (cmd, pages, vaddr, id) = parse(&request);
    match cmd & 0xffff {
        PS_IOV_GET if (1..=MAX_PAGES).contains(&pages) => {
            channel
                .send(&Message::PagesWanted { id, vaddr, pages })
                .await?;
            let header = channel.receive_data().await?;
            let answered: Option<[u8; RECORD]> = header.as_ref().try_into().ok();
            let Some((_, got, at, of)) = answered.as_ref().map(parse) else {
                return Err(ChannelError::Frame(
                    "a page answer without its record".into(),
                ));
            };
            if (got, at, of) != (pages, vaddr, id) {
                return Err(ChannelError::Frame(format!(
                    "asked for {pages} pages at {vaddr:#x} of {id}, got {got} at {at:#x} of {of}"
                )));
            }
            daemon.write_all(&header).await?;
            let mut left = pages * PAGE;
            while left > 0 {
                let chunk = channel.receive_data().await?;
                if chunk.len() as u64 > left {
                    return Err(ChannelError::Frame("more page bytes than asked for".into()));
                }
                daemon.write_all(&chunk).await?;
                left -= chunk.len() as u64;
            }
            Ok(Some(pages))
        }
        // Done: it waits for our status, then closes.
        PS_IOV_CLOSE | PS_IOV_FORCE_CLOSE => {
            daemon.write_all(&0i32.to_ne_bytes()).await?;
            Ok(Some(0))
        }
        other => Err(ChannelError::Frame(format!(
            "the lazy-pages daemon sent command {other:#x} ({pages} pages)"
        ))),
    }
}

/// Source: the next message other than `PagesWanted`, answering those
/// from `source` meanwhile (the destination's restore itself may need
/// lazy pages, before it is ready). Without a source, a `PagesWanted` is
/// returned like any message. A request we cannot answer is told as
/// `Failed` (the destination then ends its copy) and is an error.
pub async fn receive_answering<S>(
    channel: &mut Channel<S>,
    mut source: Option<&mut PageSource>,
    deadline: Option<Instant>,
) -> Result<Message, ChannelError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut chunk = Vec::new();
    loop {
        let message = channel.receive_before(deadline).await?;
        let (Some(source), Message::PagesWanted { id, vaddr, pages }) =
            (source.as_deref_mut(), &message)
        else {
            return Ok(message);
        };
        let (id, vaddr, pages) = (*id, *vaddr, *pages);
        let found = if (1..=MAX_PAGES).contains(&pages) {
            source.locate(id, vaddr, pages).map_err(|e| e.to_string())
        } else {
            Err(format!(
                "{pages} pages asked for at once (at most {MAX_PAGES})"
            ))
        };
        let (file, offset) = match found {
            Ok(found) => found,
            Err(reason) => {
                let reason = format!("the source cannot answer: {reason}");
                channel
                    .send(&Message::Failed {
                        phase: crate::report::MEMORY_FILL.to_owned(),
                        reason: reason.clone(),
                    })
                    .await?;
                return Err(ChannelError::Refused(reason));
            }
        };
        let header = record(PS_IOV_ADD_F | (PE_PRESENT << 16), pages, vaddr, id);
        channel.send_data(&header).await?;
        let total = pages * PAGE;
        let mut done = 0u64;
        while done < total {
            let n = usize::try_from(total - done).map_or(DATA_CHUNK, |n| n.min(DATA_CHUNK));
            chunk.resize(n, 0);
            file.read_exact_at(&mut chunk, offset + done)?;
            channel.send_data(&chunk).await?;
            done += n as u64;
        }
    }
}
