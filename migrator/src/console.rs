//! Where diagnostics go: stderr, except while a full-screen view owns the
//! terminal. Then lines are kept instead: the view shows the latest one
//! (with a count) in its status line, and all of them are written to
//! stderr, in order, once the terminal is restored. Nothing is drawn over
//! the view, and nothing is lost.
//!
//! Log records (`tracing`) reach this through [`writer`], plain messages
//! through [`say`].

use std::{
    io::Write as _,
    sync::{Mutex, MutexGuard},
};

/// Lines kept while a view owns the terminal; `None` when writing through.
static KEPT: Mutex<Option<Vec<String>>> = Mutex::new(None);

fn kept() -> MutexGuard<'static, Option<Vec<String>>> {
    // A panic while holding the lock leaves plain data behind: keep going.
    KEPT.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Print one message (to stderr, or keep it while a view owns the
/// terminal).
pub fn say(message: impl AsRef<str>) {
    emit(message.as_ref().as_bytes());
}

fn emit(bytes: &[u8]) {
    let mut guard = kept();
    match guard.as_mut() {
        Some(lines) => {
            let text = strip_escapes(&String::from_utf8_lossy(bytes));
            lines.extend(
                text.lines()
                    .filter(|line| !line.trim().is_empty())
                    .map(str::to_owned),
            );
        }
        None => {
            let mut stderr = std::io::stderr().lock();
            let _ = stderr.write_all(bytes);
            if !bytes.ends_with(b"\n") {
                let _ = stderr.write_all(b"\n");
            }
        }
    }
}

/// Whether output to `stream` may carry colour: only on a terminal, and
/// never with `NO_COLOR` set to anything but the empty string
/// (<https://no-color.org>).
pub fn colour_allowed(stream: &impl std::io::IsTerminal) -> bool {
    stream.is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty())
}

/// For `tracing_subscriber::fmt().with_writer(console::writer)`: each
/// record is written whole, then the writer is dropped, which emits it.
pub fn writer() -> RecordWriter {
    RecordWriter { buf: Vec::new() }
}

pub struct RecordWriter {
    buf: Vec<u8>,
}

impl std::io::Write for RecordWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for RecordWriter {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            emit(&self.buf);
        }
    }
}

/// While alive, messages are kept rather than written. Dropping it (after
/// the terminal is restored) writes them all to stderr.
pub struct Hold {
    _private: (),
}

impl Hold {
    pub fn begin() -> Self {
        kept().get_or_insert_with(Vec::new);
        Self { _private: () }
    }

    /// How many messages are kept, and the latest one.
    pub fn status(&self) -> Option<(usize, String)> {
        kept()
            .as_ref()
            .and_then(|lines| Some((lines.len(), lines.last()?.clone())))
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        let lines = kept().take().unwrap_or_default();
        let mut stderr = std::io::stderr().lock();
        for line in lines {
            let _ = writeln!(stderr, "{line}");
        }
    }
}

/// Drop ANSI escape sequences (colours from the log formatter): they
/// would corrupt a status line.
fn strip_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // Parameters, then one final byte in @..~.
                for next in chars.by_ref() {
                    if ('@'..='~').contains(&next) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_are_stripped() {
        assert_eq!(
            strip_escapes("\u{1b}[33m WARN\u{1b}[0m migrator: x"),
            " WARN migrator: x"
        );
        assert_eq!(strip_escapes("plain"), "plain");
    }

    #[test]
    fn held_messages_are_counted_and_the_latest_is_shown() {
        let hold = Hold::begin();
        say("first");
        {
            let mut record = writer();
            let _ = record.write_all(b"\x1b[2m2026\x1b[0m second\n");
        }
        let (count, last) = hold.status().unwrap_or_default();
        assert_eq!(count, 2);
        assert_eq!(last, "2026 second");
        drop(hold);
        assert!(kept().is_none(), "writing through again after the hold");
    }
}
