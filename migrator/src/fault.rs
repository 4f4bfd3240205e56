//! Faults injected on purpose, so that tests can run what follows a
//! failure that real components produce only now and then (CRIU's dump
//! failing once, as its parasite sometimes does here). Named in the
//! `MIGRATOR_FAULTS` environment variable, comma-separated; each fires
//! once per process. Unset, nothing fires.
//!
//! - `dump-fails` (source): the first `criu dump` fails at its post-dump
//!   notification (every page already out), as a CRIU failure would.
//! - `dump-fails-unfrozen` (source): the first `criu dump` fails at its
//!   pre-dump notification, right after the flows were locked and before
//!   CRIU froze the tree: the earliest a frozen migration's dump can fail.
//! - `restore-fails` (agent): the first restore fails before CRIU
//!   restores anything, as the destination host's restore failing would.
//! - `restored-reply-lost` (agent): the answer to the first commit is
//!   never sent (the connection closes instead), as when the link fails
//!   right after the hand-over.
//! - `restored-pause` (agent): the first restored copy stays restored and
//!   stopped 300 ms longer before the agent says it is ready, so that a
//!   test can act at that moment (a slow announce would do the same).
//! - `transfer-pause` (source): the first transfer waits 300 ms once it
//!   began, before any image goes, so that a test can act at that moment
//!   (the images of a small process cross in about a millisecond).
//! - `lazy-pages-dies` (agent): with a lazy restore, the `criu lazy-pages`
//!   daemon is SIGKILLed right after the restore, before the agent says
//!   it is ready, as a daemon crashing or killed by the OOM killer would.
//! - `lazy-pages-dies-at-release` (agent): with a lazy restore, the daemon
//!   is SIGKILLed once the commit came, right before the release, the
//!   memory not yet filled (one filling from local images is stopped
//!   right after the restore; with post-copy its requests are no longer
//!   relayed from then on).

use std::sync::Mutex;

/// The variable that names the faults to inject.
pub const ENV: &str = "MIGRATOR_FAULTS";

/// Faults that fired in this process.
static FIRED: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());

/// Whether the fault `name` is asked for and has not fired yet; it counts
/// as fired from now on.
pub fn fires(name: &'static str) -> bool {
    let Ok(asked) = std::env::var(ENV) else {
        return false;
    };
    if !asked.split(',').any(|fault| fault.trim() == name) {
        return false;
    }
    let mut fired = FIRED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if fired.contains(&name) {
        return false;
    }
    fired.push(name);
    tracing::warn!("injecting the fault {name} ({ENV})");
    true
}

/// Whether the fault `name` has fired in this process.
pub fn fired(name: &'static str) -> bool {
    FIRED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .contains(&name)
}

pub const DUMP_FAILS: &str = "dump-fails";
pub const DUMP_FAILS_UNFROZEN: &str = "dump-fails-unfrozen";
pub const RESTORED_REPLY_LOST: &str = "restored-reply-lost";
pub const RESTORE_FAILS: &str = "restore-fails";
pub const LAZY_PAGES_DIES: &str = "lazy-pages-dies";
pub const LAZY_PAGES_DIES_AT_RELEASE: &str = "lazy-pages-dies-at-release";
pub const RESTORED_PAUSE: &str = "restored-pause";
pub const TRANSFER_PAUSE: &str = "transfer-pause";
