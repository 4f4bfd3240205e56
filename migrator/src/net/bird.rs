//! Asking BIRD (the routing daemon that announces the service addresses
//! with `--takeover bgp`) how its BGP sessions are, over its control
//! socket: the line protocol `birdc` speaks. A reply is lines of a
//! four-digit code and `-` (more follows) or ` ` (the last line), or a
//! leading space (more of the previous code); `0000` ends a reply that
//! went well, codes from 8000 one that did not.
//!
//! Only reads: announcing and withdrawing is BIRD's own `direct`
//! protocol watching the link the addresses go on (see the README).

use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

#[derive(Debug, thiserror::Error)]
pub enum BirdError {
    #[error(
        "BIRD's control socket {path}: {source} (is BIRD running, and is that its socket? see `birdc -s {path} show status`)"
    )]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("talking to BIRD: {0}")]
    Io(#[from] io::Error),
    #[error("BIRD refused `{command}`: {reply}")]
    Refused { command: String, reply: String },
}

/// One protocol instance as `show protocols` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Protocol {
    pub name: String,
    pub proto: String,
    pub state: String,
    /// For BGP, the session state: `Established` when it is up.
    pub info: String,
}

impl Protocol {
    pub fn established(&self) -> bool {
        self.proto == "BGP" && self.info.starts_with("Established")
    }
}

pub struct Bird {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Bird {
    pub fn connect(path: &Path) -> Result<Self, BirdError> {
        let connect_error = |source| BirdError::Connect {
            path: path.display().to_string(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(connect_error)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let writer = stream.try_clone()?;
        let mut bird = Self {
            reader: BufReader::new(stream),
            writer,
        };
        // The greeting: "0001 BIRD 2.0.12 ready."
        bird.reply("(greeting)")?;
        Ok(bird)
    }

    /// Run one command; the reply's lines, codes stripped.
    pub fn command(&mut self, command: &str) -> Result<Vec<String>, BirdError> {
        self.writer.write_all(format!("{command}\n").as_bytes())?;
        self.reply(command)
    }

    fn reply(&mut self, command: &str) -> Result<Vec<String>, BirdError> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(BirdError::Io(io::ErrorKind::UnexpectedEof.into()));
            }
            let line = line.trim_end_matches('\n');
            let (code, last, text) = parse_line(line);
            if let Some(code) = code
                && last
            {
                if code >= 8000 {
                    return Err(BirdError::Refused {
                        command: command.to_owned(),
                        reply: text.to_owned(),
                    });
                }
                if !text.trim().is_empty() {
                    lines.push(text.to_owned());
                }
                return Ok(lines);
            }
            lines.push(text.to_owned());
        }
    }

    /// Every protocol instance, from `show protocols`.
    pub fn protocols(&mut self) -> Result<Vec<Protocol>, BirdError> {
        let lines = self.command("show protocols")?;
        Ok(parse_protocols(&lines))
    }
}

/// (code, whether it is the reply's last line, text).
fn parse_line(line: &str) -> (Option<u16>, bool, &str) {
    let bytes = line.as_bytes();
    if bytes.len() >= 5 && bytes[..4].iter().all(u8::is_ascii_digit) {
        let code = line[..4].parse().ok();
        return (code, bytes[4] == b' ', &line[5..]);
    }
    (None, false, line.strip_prefix(' ').unwrap_or(line))
}

/// The table of `show protocols` (a header, then one line each: name,
/// protocol, table, state, since (one or two words), info).
fn parse_protocols(lines: &[String]) -> Vec<Protocol> {
    lines
        .iter()
        .filter(|line| !line.starts_with("Name "))
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.len() < 4 {
                return None;
            }
            // Since is a time (or a date and a time); Info follows it.
            let info_from = words
                .iter()
                .skip(4)
                .position(|w| !w.contains(':') && !w.contains('-') && !w.contains('.'))
                .map_or(words.len(), |at| at + 4);
            Some(Protocol {
                name: words[0].to_owned(),
                proto: words[1].to_owned(),
                state: words[3].to_owned(),
                info: words[info_from..].join(" "),
            })
        })
        .collect()
}

/// BGP sessions on the BIRD at `socket`: an error unless at least one is
/// configured and every one is established (what a host that must
/// announce or withdraw the service address needs).
pub fn check_sessions(socket: &Path) -> Result<Vec<Protocol>, String> {
    let protocols = Bird::connect(socket)
        .and_then(|mut bird| bird.protocols())
        .map_err(|e| e.to_string())?;
    let bgp: Vec<Protocol> = protocols.into_iter().filter(|p| p.proto == "BGP").collect();
    if bgp.is_empty() {
        return Err(format!(
            "BIRD at {} has no BGP protocol: nothing would announce the service addresses (see `birdc -s {} show protocols`)",
            socket.display(),
            socket.display()
        ));
    }
    let down: Vec<String> = bgp
        .iter()
        .filter(|p| !p.established())
        .map(|p| format!("{} ({} {})", p.name, p.state, p.info))
        .collect();
    if !down.is_empty() {
        return Err(format!(
            "BIRD's BGP sessions are not all established: {} (see `birdc -s {} show protocols all`)",
            down.join(", "),
            socket.display()
        ));
    }
    Ok(bgp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_protocols_reply_is_read_line_by_line() {
        let reply = [
            "2002-Name       Proto      Table      State  Since         Info",
            "1002-device1    Device     ---        up     14:25:22.844  ",
            " up4        BGP        ---        up     14:25:23.738  Established   ",
            " up6        BGP        ---        start  2026-12-01 14:25:24  Active        Socket: Connection refused",
            "0000 ",
        ];
        let parsed: Vec<(Option<u16>, bool)> = reply
            .iter()
            .map(|l| {
                let (code, last, _) = parse_line(l);
                (code, last)
            })
            .collect();
        assert_eq!(
            parsed,
            [
                (Some(2002), false),
                (Some(1002), false),
                (None, false),
                (None, false),
                (Some(0), true)
            ]
        );
        let lines: Vec<String> = reply[..4]
            .iter()
            .map(|l| parse_line(l).2.to_owned())
            .collect();
        let protocols = parse_protocols(&lines);
        assert_eq!(protocols.len(), 3);
        assert!(protocols[1].established());
        assert_eq!(protocols[2].name, "up6");
        assert_eq!(protocols[2].state, "start");
        assert_eq!(protocols[2].info, "Active Socket: Connection refused");
        assert!(!protocols[2].established());
    }
}
