//! What a process tree holds on the network: its PIDs (the root and every
//! descendant, from `/proc/PID/task/TID/children`) and its TCP sockets,
//! matched by inode between `/proc/PID/fd` and the `/proc/PID/net/tcp{,6}`
//! tables of the tree's own network namespace.

use std::{
    collections::{BTreeSet, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use crate::dataplane::spec::FlowSpec;

#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("process {0} does not exist (see `ps -p {0}`)")]
    NoSuchProcess(i32),
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A process tree and its TCP sockets.
#[derive(Clone, Debug, Default)]
pub struct ProcessNetwork {
    /// Root first, then descendants.
    pub pids: Vec<i32>,
    /// Established connections (local = this host's side).
    pub connections: Vec<FlowSpec>,
    /// Listening sockets.
    pub listening: Vec<SocketAddr>,
    /// Whether the root is the init of a PID namespace of its own (then
    /// its PIDs cannot collide with anything on a destination).
    pub own_pid_namespace: bool,
}

impl ProcessNetwork {
    /// Every local address the tree's sockets use.
    pub fn local_addresses(&self) -> BTreeSet<IpAddr> {
        self.connections
            .iter()
            .map(|flow| flow.local.ip())
            .chain(self.listening.iter().map(SocketAddr::ip))
            .collect()
    }
}

fn read(path: &str) -> Result<String, DiscoverError> {
    std::fs::read_to_string(path).map_err(|source| DiscoverError::Read {
        path: path.to_owned(),
        source,
    })
}

pub fn discover(root: i32) -> Result<ProcessNetwork, DiscoverError> {
    if root <= 0 || !Path::new(&format!("/proc/{root}")).exists() {
        return Err(DiscoverError::NoSuchProcess(root));
    }
    let pids = crate::system::process_tree(root);
    let mut inodes = HashSet::new();
    for pid in &pids {
        let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue; // exited meanwhile
        };
        for entry in entries.flatten() {
            if let Ok(target) = std::fs::read_link(entry.path())
                && let Some(inode) = target
                    .to_str()
                    .and_then(|t| t.strip_prefix("socket:["))
                    .and_then(|t| t.strip_suffix(']'))
                    .and_then(|t| t.parse::<u64>().ok())
            {
                inodes.insert(inode);
            }
        }
    }
    let mut network = ProcessNetwork {
        own_pid_namespace: is_pid_namespace_init(root),
        pids,
        ..ProcessNetwork::default()
    };
    for (table, v6) in [("tcp", false), ("tcp6", true)] {
        let text = read(&format!("/proc/{root}/net/{table}"))?;
        for socket in parse_tcp_table(&text, v6) {
            if !inodes.contains(&socket.inode) {
                continue;
            }
            match socket.state {
                TCP_ESTABLISHED => network.connections.push(FlowSpec {
                    local: socket.local,
                    remote: socket.remote,
                }),
                TCP_LISTEN => network.listening.push(socket.local),
                _ => {}
            }
        }
    }
    Ok(network)
}

/// True when `/proc/PID/status` lists the process as PID 1 of its
/// innermost PID namespace.
pub fn is_pid_namespace_init(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("NSpid:"))
                .map(|ids| {
                    let ids: Vec<&str> = ids.split_whitespace().collect();
                    ids.len() > 1 && ids.last() == Some(&"1")
                })
        })
        .unwrap_or(false)
}

const TCP_ESTABLISHED: u8 = 0x01;
const TCP_LISTEN: u8 = 0x0a;

#[derive(Debug, PartialEq, Eq)]
struct TcpSocket {
    local: SocketAddr,
    remote: SocketAddr,
    state: u8,
    inode: u64,
}

/// Rows of `/proc/net/tcp` or `tcp6`: addresses are hex in the kernel's
/// byte order (each 32-bit word as the host stores it).
fn parse_tcp_table(text: &str, v6: bool) -> Vec<TcpSocket> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            Some(TcpSocket {
                local: parse_endpoint(fields.get(1)?, v6)?,
                remote: parse_endpoint(fields.get(2)?, v6)?,
                state: u8::from_str_radix(fields.get(3)?, 16).ok()?,
                inode: fields.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

fn parse_endpoint(text: &str, v6: bool) -> Option<SocketAddr> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..addr.len() / 8)
        .map(|i| u32::from_str_radix(&addr[i * 8..i * 8 + 8], 16).ok())
        .collect::<Option<_>>()?;
    let ip = if v6 {
        if words.len() != 4 {
            return None;
        }
        let mut bytes = [0u8; 16];
        for (i, word) in words.iter().enumerate() {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        let v6 = Ipv6Addr::from(bytes);
        // Dual-stack sockets show IPv4 peers as v4-mapped addresses.
        match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        }
    } else {
        IpAddr::V4(Ipv4Addr::from(words.first()?.to_ne_bytes()))
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_kernel_tcp_tables() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 640012C6:D2F7 010012C6:2328 01 00000000:00000000 00:00000000 00000000     0        0 31337 1 0000000000000000 20 4 30 10 -1\n";
        let sockets = parse_tcp_table(v4, false);
        assert_eq!(
            sockets,
            vec![TcpSocket {
                local: "198.18.0.100:54007".parse().unwrap(),
                remote: "198.18.0.1:9000".parse().unwrap(),
                state: TCP_ESTABLISHED,
                inode: 31337,
            }]
        );
        let v6 = "  sl  local_address                         remote_address                        st\n   0: B80D0120000000000000000000010000:A9BB B80D0120000000000000000001000000:2328 01 00000000:00000000 00:00000000 00000000     0        0 4242 1\n";
        let sockets = parse_tcp_table(v6, true);
        assert_eq!(sockets[0].local, "[2001:db8::100]:43451".parse().unwrap());
        assert_eq!(sockets[0].inode, 4242);
    }
}
