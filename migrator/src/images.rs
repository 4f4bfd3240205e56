//! Images at rest. They hold the whole memory of a process, so they live
//! in a state directory only root can enter (checked, not assumed, when
//! it already exists), in a fresh directory with a random name per
//! migration, and files are created exclusively, without following
//! symlinks, relative to a descriptor of that directory.
//!
//! Each migration's directory is a tmpfs of its own (at most
//! `memory_limit` bytes): images are written once and read once, so they
//! never touch a disk, and unmounting frees them at once. Where a tmpfs
//! cannot be mounted the directory stays on the state directory's disk.

use std::{
    ffi::CString,
    fs::File,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{
            ffi::OsStrExt as _,
            fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _},
        },
    },
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum ImagesError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "state directory {path} is not safe for process images: {why}; {fix} (or give another --work-dir, which is created mode 0700)"
    )]
    Unsafe {
        path: PathBuf,
        why: String,
        fix: String,
    },
    #[error("image name `{0}` refused (not a plain file name)")]
    BadName(String),
}

/// The directory every migration's images live under.
#[derive(Clone, Debug)]
pub struct StateDir {
    path: PathBuf,
    /// Size of each migration's tmpfs.
    memory_limit: u64,
}

impl StateDir {
    /// Create it (mode 0700) if missing; otherwise it must be a real
    /// directory owned by us that no group or other user can enter.
    pub fn open(path: &Path) -> Result<Self, ImagesError> {
        let io = |action: &'static str| {
            move |source| ImagesError::Io {
                action,
                path: path.to_owned(),
                source,
            }
        };
        match std::fs::symlink_metadata(path) {
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(io("creating the parent of"))?;
                }
                std::fs::DirBuilder::new()
                    .mode(0o700)
                    .create(path)
                    .map_err(io("creating"))?;
            }
            Err(err) => return Err(io("reading")(err)),
            Ok(meta) => {
                let unsafe_dir = |why: String, fix: String| ImagesError::Unsafe {
                    path: path.to_owned(),
                    why,
                    fix,
                };
                if !meta.file_type().is_dir() {
                    return Err(unsafe_dir(
                        "it is a symlink or not a directory".into(),
                        "remove it".into(),
                    ));
                }
                // SAFETY: geteuid has no preconditions.
                let me = unsafe { libc::geteuid() };
                if meta.uid() != me {
                    return Err(unsafe_dir(
                        format!("it is owned by uid {}, not by us (uid {me})", meta.uid()),
                        format!("`chown root: {}`", path.display()),
                    ));
                }
                if meta.mode() & 0o077 != 0 {
                    return Err(unsafe_dir(
                        format!(
                            "mode {:o} lets group or others in",
                            meta.permissions().mode() & 0o7777
                        ),
                        format!("`chmod 700 {}`", path.display()),
                    ));
                }
            }
        }
        Ok(Self {
            path: path.to_owned(),
            memory_limit: crate::system::memory_total_bytes() / 2,
        })
    }

    /// Each migration's images may take at most `bytes` of memory.
    pub fn with_memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = bytes;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Remove what sessions named `PREFIX-*` left behind (a process killed
    /// mid-migration): their tmpfs unmounted, their files gone.
    pub fn remove_stale(&self, prefix: &str) {
        let Ok(entries) = std::fs::read_dir(&self.path) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            if entry
                .file_name()
                .to_string_lossy()
                .starts_with(&format!("{prefix}-"))
            {
                let path = entry.path();
                unmount(&path);
                let _ = std::fs::remove_dir_all(&path);
            }
        }
    }

    /// A fresh directory for one migration: `PREFIX-<random>`, mode 0700.
    pub fn new_session(&self, prefix: &str) -> Result<SessionDir, ImagesError> {
        let mut random = [0u8; 8];
        getrandom::fill(&mut random).map_err(|err| ImagesError::Io {
            action: "drawing a random name in",
            path: self.path.clone(),
            source: std::io::Error::other(err.to_string()),
        })?;
        let name: String = random.iter().map(|b| format!("{b:02x}")).collect();
        let path = self.path.join(format!("{prefix}-{name}"));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|source| ImagesError::Io {
                action: "creating",
                path: path.clone(),
                source,
            })?;
        let in_memory = match mount_tmpfs(&path, self.memory_limit) {
            Ok(()) => true,
            Err(err) => {
                tracing::warn!(
                    "images of this migration stay on disk in {}: mounting a tmpfs there failed: {err}",
                    path.display()
                );
                false
            }
        };
        let dir = open_dir(&path)?;
        Ok(SessionDir {
            path,
            dir,
            in_memory,
        })
    }
}

/// A tmpfs of `size` bytes on `path`, only root may enter.
fn mount_tmpfs(path: &Path, size: u64) -> std::io::Result<()> {
    let target = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("path with a NUL byte"))?;
    let options = CString::new(format!("size={size},mode=0700"))
        .map_err(|_| std::io::Error::other("options"))?;
    // SAFETY: mount with valid NUL-terminated strings; the result is
    // checked.
    let rc = unsafe {
        libc::mount(
            c"migrator-images".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            options.as_ptr().cast(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Detach whatever is mounted on `path` (nothing if nothing is).
fn unmount(path: &Path) {
    if let Ok(target) = CString::new(path.as_os_str().as_bytes()) {
        // SAFETY: umount2 with a valid NUL-terminated path.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

/// One migration's images.
#[derive(Debug)]
pub struct SessionDir {
    path: PathBuf,
    dir: OwnedFd,
    /// On a tmpfs of its own.
    in_memory: bool,
}

impl SessionDir {
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Create `name` in this directory: a new file (never an existing one,
    /// never through a symlink), mode 0600.
    pub fn create_file(&self, name: &str) -> Result<File, ImagesError> {
        let c_name = plain_name(name)?;
        // SAFETY: openat with a directory descriptor we own and a valid
        // NUL-terminated name; the result is checked before use.
        let fd = unsafe {
            libc::openat(
                self.dir.as_raw_fd(),
                c_name.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o600,
            )
        };
        if fd < 0 {
            return Err(ImagesError::Io {
                action: "creating",
                path: self.path.join(name),
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: a fresh descriptor we own.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    /// Remove `name` from this directory (gone already is fine).
    pub fn remove_file(&self, name: &str) -> Result<(), ImagesError> {
        let c_name = plain_name(name)?;
        // SAFETY: unlinkat with a directory descriptor we own and a valid
        // NUL-terminated name.
        if unsafe { libc::unlinkat(self.dir.as_raw_fd(), c_name.as_ptr(), 0) } < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::NotFound {
                return Err(ImagesError::Io {
                    action: "removing",
                    path: self.path.join(name),
                    source: err,
                });
            }
        }
        Ok(())
    }

    /// Whether the images live in memory (a tmpfs of their own).
    pub fn in_memory(&self) -> bool {
        self.in_memory
    }

    /// Remove the directory and everything in it.
    pub fn remove(self) {
        let Self {
            path,
            dir,
            in_memory,
        } = self;
        drop(dir);
        if in_memory {
            unmount(&path);
        }
        let _ = std::fs::remove_dir_all(&path);
    }
}

/// Room left on the disk after the images, besides their own size.
pub const DISK_RESERVE: u64 = 64 << 20;

/// Whether `bytes` of images fit in `dir` with the reserve to spare: on
/// its filesystem, and for a tmpfs in the memory available; `Err` says
/// how much is needed and how much there is.
pub fn check_room(dir: &Path, bytes: u64, in_memory: bool) -> Result<(), String> {
    let on_disk =
        free_bytes(dir).map_err(|e| format!("checking free space in {}: {e}", dir.display()))?;
    let available = crate::system::memory_available_bytes();
    let needed = bytes.saturating_add(DISK_RESERVE);
    if needed > on_disk {
        return Err(format!(
            "the images need about {} MiB (with {} MiB to spare) but {} has {} MiB free{}",
            bytes >> 20,
            DISK_RESERVE >> 20,
            dir.display(),
            on_disk >> 20,
            if in_memory {
                " (its tmpfs: raise the limit, the agent's --max-image-memory)"
            } else {
                ": free space there or choose another --work-dir"
            }
        ));
    }
    if in_memory && needed > available {
        return Err(format!(
            "the images need about {} MiB of memory (with {} MiB to spare) but this host has {} MiB available (MemAvailable): free memory, or move the process elsewhere",
            bytes >> 20,
            DISK_RESERVE >> 20,
            available >> 20
        ));
    }
    Ok(())
}

/// Free bytes on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("path with a NUL byte"))?;
    // SAFETY: all-zero is a valid statvfs.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs writes into the struct we own; the path is a valid
    // NUL-terminated string.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stats) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stats.f_bavail.saturating_mul(stats.f_frsize))
}

/// `name` as a single path component, for the `*at` calls.
fn plain_name(name: &str) -> Result<CString, ImagesError> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(ImagesError::BadName(name.to_owned()));
    }
    CString::new(name).map_err(|_| ImagesError::BadName(name.to_owned()))
}

fn open_dir(path: &Path) -> Result<OwnedFd, ImagesError> {
    let io = |source| ImagesError::Io {
        action: "opening",
        path: path.to_owned(),
        source,
    };
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io(std::io::Error::other("path with a NUL byte")))?;
    // SAFETY: open with a valid NUL-terminated path; checked below.
    let fd = unsafe {
        libc::open(
            c_path.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::io::Write as _;

    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("migrator-images-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        path
    }

    #[test]
    fn state_directory_is_created_private_and_checked() {
        let root = scratch("state");
        let state = StateDir::open(&root.join("state")).unwrap();
        let mode = std::fs::metadata(state.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        // An existing one with loose modes is refused, with the fix.
        std::fs::set_permissions(state.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = StateDir::open(state.path()).unwrap_err().to_string();
        assert!(
            err.contains("mode 777") && err.contains("chmod 700"),
            "{err}"
        );
        // A symlink in its place is refused.
        let link = root.join("link");
        std::os::unix::fs::symlink(state.path(), &link).unwrap();
        let err = StateDir::open(&link).unwrap_err().to_string();
        assert!(err.contains("symlink"), "{err}");
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn room_is_checked_with_a_reserve() {
        let dir = std::env::temp_dir();
        let err = check_room(&dir, u64::MAX / 4, false).unwrap_err();
        assert!(err.contains("MiB free"), "{err}");
        let free = free_bytes(&dir).unwrap();
        if free > DISK_RESERVE {
            assert!(check_room(&dir, 0, false).is_ok());
        }
    }

    #[test]
    fn files_are_new_private_and_never_followed() {
        let root = scratch("session");
        let state = StateDir::open(&root).unwrap();
        let session = state.new_session("incoming").unwrap();
        let other = state.new_session("incoming").unwrap();
        assert_ne!(session.path(), other.path(), "names are random");
        let mut file = session.create_file("pages-1.img").unwrap();
        file.write_all(b"memory").unwrap();
        let meta = std::fs::metadata(session.path().join("pages-1.img")).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // Not twice, not through a planted symlink, not outside.
        assert!(session.create_file("pages-1.img").is_err());
        std::os::unix::fs::symlink("/etc/hostname", session.path().join("core.img")).unwrap();
        assert!(session.create_file("core.img").is_err());
        assert!(session.create_file("../escape").is_err());
        session.remove();
        other.remove();
        let _ = std::fs::remove_dir_all(&root);
    }
}
