//! After the dump: the images to the agent, the service addresses given
//! up here, and (with --hold) the peers' packets held so far.

use std::{collections::HashMap, path::Path, time::Instant};

use super::{MigrateOptions, Progress, dump::Frozen};
use crate::{
    channel::{self, ChannelError, Message, TlsChannel},
    criu::page_source::Pagemap,
    dataplane::lock::MigrationLock,
    report::{self, PhaseClock, Report},
};

/// The images are at the agent and the addresses are no longer ours.
pub(super) struct Released {
    pub channel: TlsChannel,
    pub frozen_at: Instant,
    pub handover_by: Instant,
    /// Each flow's packets in at the moment we gave the addresses up.
    pub packets_at_ip_release: Vec<u64>,
    /// The peers' packets are held (--hold): those that still reach us
    /// go with the commit.
    pub hold: bool,
    /// The destination restores lazily (--lazy-restore): after `Restored`
    /// it says when the memory is filled.
    pub lazy_restore: bool,
    /// And its lazy pages are still here: we answer for them until the
    /// memory is filled (--post-copy).
    pub post_copy: bool,
}

pub(super) async fn transfer_and_release(
    options: &MigrateOptions,
    frozen: Frozen,
    clock: &mut PhaseClock,
    report: &mut Report,
    progress: &mut Progress,
) -> Result<Released, String> {
    let Frozen {
        mut channel,
        netlink,
        addresses: removed_plan,
        frozen_at,
        handover_by,
    } = frozen;
    // transfer
    let phase = clock.begin(report::TRANSFER);
    if crate::fault::fires(crate::fault::TRANSFER_PAUSE) {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    let sent = send_images(&mut channel, &progress.images, options.post_copy)
        .await
        .map_err(|err| format!("transfer: {err}"));
    report.image_bytes += clock.end_with(phase, sent)?;

    // ip-release: the old host stops owning the service addresses.
    let phase = clock.begin(report::IP_RELEASE);
    for (address, iface_name, index) in removed_plan {
        match netlink.remove(address.ip).await {
            Ok(_) => progress.removed.push((address, iface_name, index)),
            Err(err) => {
                clock.end(phase, false);
                return Err(format!("ip-release: {err}"));
            }
        }
    }
    let packets_at_ip_release: Vec<u64> = progress
        .lock
        .as_ref()
        .map(|lock| lock.counters().iter().map(|(_, s)| s.packets_in).collect())
        .unwrap_or_default();
    clock.end(phase, true);

    // Held packets go with the restore request: the agent delivers them
    // to the restored sockets right after its release.
    if options.hold {
        send_held(&mut channel, progress)
            .await
            .map_err(|e| format!("sending held packets: {e}"))?;
    }

    Ok(Released {
        channel,
        frozen_at,
        handover_by,
        packets_at_ip_release,
        hold: options.hold,
        lazy_restore: options.lazy_restore,
        post_copy: options.post_copy,
    })
}

/// The peers' packets our lock held since the last call, to the agent.
pub(super) async fn send_held(
    channel: &mut TlsChannel,
    progress: &mut Progress,
) -> Result<(), ChannelError> {
    let held = progress
        .lock
        .as_mut()
        .map(MigrationLock::drain_held)
        .unwrap_or_default();
    channel
        .send(&Message::Held {
            count: held.len() as u64,
        })
        .await?;
    for packet in &held {
        channel.send_data(&packet.frame).await?;
    }
    Ok(())
}

/// Every image of `dir`; with `post_copy`, of each pages image only what
/// the restore reads itself (the lazy pages are asked for later).
async fn send_images(
    channel: &mut TlsChannel,
    dir: &Path,
    post_copy: bool,
) -> Result<u64, ChannelError> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_file()))
        .collect();
    entries.sort_by_key(std::fs::DirEntry::file_name);
    let mut eager = if post_copy {
        eager_parts(&entries)?
    } else {
        HashMap::new()
    };
    let (mut files, mut bytes) = (0u64, 0u64);
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let parts = eager.remove(&name);
        bytes += channel.send_file_parts(&entry.path(), &name, parts).await?;
        files += 1;
    }
    channel.send(&Message::FilesDone { files, bytes }).await?;
    match channel.receive().await? {
        Message::FilesOk => Ok(bytes),
        Message::Refused { reason } => Err(ChannelError::Refused(channel::printable(&reason))),
        other => Err(ChannelError::Unexpected {
            expected: "files-ok",
            got: other.name(),
        }),
    }
}

/// By pages image name: the parts the restore reads itself, from the page
/// maps that point at it.
fn eager_parts(
    entries: &[std::fs::DirEntry],
) -> Result<HashMap<String, Vec<(u64, u64)>>, ChannelError> {
    let mut parts = HashMap::new();
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("pagemap-") && name.ends_with(".img")) {
            continue;
        }
        let map = Pagemap::read(&entry.path())
            .map_err(|err| ChannelError::Frame(format!("post-copy: {err}")))?;
        parts.insert(format!("pages-{}.img", map.pages_id), map.eager_extents());
    }
    Ok(parts)
}
