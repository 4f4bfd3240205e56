//! CRIU's cache of its kernel probes, for the CRIUs we start around the
//! freeze window. Each CRIU request probes the kernel first (about 25-30
//! ms here) unless `/run/criu.kdat` holds the answers, and CRIU keeps that
//! file only on a tmpfs, so that it never outlives the boot it describes.
//! Where `/run` is not one (this lab's VM), [`KdatCache`] is a tmpfs of
//! our own, filled once when the agent starts, and reaches CRIU two ways:
//!
//! - `/run/criu.kdat` becomes a symlink to it before each restore
//!   ([`KdatCache::publish`]).
//!   The restore's CRIU runs in the host's mount namespace (the process it
//!   restores lives there) and reads its probes through the link: 25-30
//!   ms less inside every freeze window. The link dies with the tmpfs (at
//!   the latest at reboot: then CRIU finds nothing and probes), so it can
//!   never hand CRIU answers about another boot.
//! - The `criu lazy-pages` daemon, which starts while the process is
//!   frozen, sees the tmpfs as `/run` in a mount namespace of its own
//!   ([`with_cached_probes`]), whatever became of the link.
//!
//! Where `/run` is a tmpfs, CRIU caches by itself and nothing is done.

use std::{
    ffi::CString,
    os::unix::{ffi::OsStrExt as _, process::CommandExt as _},
    path::Path,
    process::{Command, Stdio},
};

use super::CriuBinary;
use crate::images::{SessionDir, StateDir};

/// Name prefix of the cache's directory in the agent's work directory.
pub const KDAT_PREFIX: &str = "criu-run";
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// A tmpfs holding a filled `criu.kdat`, shown to CRIU as `/run`.
pub struct KdatCache {
    /// Unmounted and removed on drop.
    dir: Option<SessionDir>,
}

impl KdatCache {
    /// The cache, unless `/run` is a tmpfs already (then `Ok(None)`).
    /// Fills it with `criu check`.
    pub fn prepare(criu: &CriuBinary, state: &StateDir) -> Result<Option<Self>, String> {
        if run_is_tmpfs() {
            return Ok(None);
        }
        let dir = state.new_session(KDAT_PREFIX).map_err(|e| e.to_string())?;
        if !dir.in_memory() {
            dir.remove();
            return Err("its directory could not be a tmpfs".to_owned());
        }
        let path = dir.path().to_owned();
        let cache = KdatCache { dir: Some(dir) };
        let mut check = Command::new(&criu.path);
        check
            .arg("check")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        with_cached_probes(&mut check, &path)?;
        let status = check
            .status()
            .map_err(|e| format!("running `criu check`: {e}"))?;
        if !path.join(KDAT_FILE).exists() {
            return Err(format!("`criu check` ({status}) wrote no criu.kdat"));
        }
        Ok(Some(cache))
    }

    /// The directory CRIU is to see as `/run` ([`with_cached_probes`]).
    pub fn run_dir(&self) -> Option<&Path> {
        self.dir.as_ref().map(SessionDir::path)
    }

    /// Make `/run/criu.kdat` lead to this cache, unless it does already
    /// or is a file of someone else's (left alone). Called right before
    /// each restore (a `readlink` when the link is in place): a link that
    /// another agent replaced or removed (on a lab machine), or that
    /// leads to a cache since unmounted, is mended in time for it.
    pub fn publish(&self) -> Result<(), String> {
        let Some(dir) = self.run_dir() else {
            return Ok(());
        };
        let (link, cache) = (Path::new(PUBLISHED), dir.join(KDAT_FILE));
        match std::fs::read_link(link) {
            Ok(target) if target == cache => return Ok(()),
            Ok(_) => {}
            Err(_) if link.symlink_metadata().is_ok() => return Ok(()),
            Err(_) => {}
        }
        // A new link under another name, then renamed over the old one:
        // CRIU sees either, never none half made.
        let staged = Path::new("/run").join(format!(".criu.kdat.{}", std::process::id()));
        let _ = std::fs::remove_file(&staged);
        std::os::unix::fs::symlink(&cache, &staged)
            .and_then(|()| std::fs::rename(&staged, link))
            .map_err(|e| {
                let _ = std::fs::remove_file(&staged);
                format!("linking {PUBLISHED} to {}: {e}", dir.display())
            })
    }
}

/// Where CRIU looks for its cache (its build's run directory).
const PUBLISHED: &str = "/run/criu.kdat";
const KDAT_FILE: &str = "criu.kdat";

/// Start `command` (a CRIU) in a mount namespace of its own where
/// `run_dir`, a [`KdatCache`]'s, is `/run`.
pub fn with_cached_probes(command: &mut Command, run_dir: &Path) -> Result<(), String> {
    let cache = CString::new(run_dir.as_os_str().as_bytes())
        .map_err(|_| "cache path with a NUL byte".to_owned())?;
    // SAFETY: between fork and exec only async-signal-safe calls
    // (unshare, mount) on strings made before the fork.
    unsafe {
        command.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWNS) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Nothing of what follows reaches the host's mounts.
            let private = libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            );
            if private != 0
                || libc::mount(
                    cache.as_ptr(),
                    c"/run".as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

impl Drop for KdatCache {
    fn drop(&mut self) {
        if let Some(dir) = self.dir.take() {
            // Our link only: another agent's stays.
            if std::fs::read_link(PUBLISHED).is_ok_and(|target| target.starts_with(dir.path())) {
                let _ = std::fs::remove_file(PUBLISHED);
            }
            dir.remove();
        }
    }
}

/// Whether `/run` is a tmpfs (where CRIU keeps its cache by itself).
fn run_is_tmpfs() -> bool {
    // SAFETY: statfs into a zeroed struct we own.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid NUL-terminated path and a struct to fill.
    let rc = unsafe { libc::statfs(c"/run".as_ptr(), &mut fs) };
    rc == 0 && fs.f_type as i64 == TMPFS_MAGIC
}
