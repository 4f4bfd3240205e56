//! What the agent accepts from a source, checked before anything is
//! locked or written: addresses only from `--allow-ip`, a deadline no
//! longer than `--max-deadline`, flows only on the addresses that move,
//! image names that stay inside the session directory, held packets only
//! of the migrating flows, images that fit on the disk.

use std::{
    net::IpAddr,
    path::{Component, Path},
    time::Duration,
};

use crate::{
    channel::message::{PreflightRequest, ServiceAddress},
    dataplane::spec::FlowSpec,
    net::address::contains,
};

/// Limits on what a source may ask of this agent.
#[derive(Clone, Debug)]
pub struct AgentPolicy {
    /// Networks service addresses may come from (`--allow-ip`); empty:
    /// any address.
    pub allow: Vec<ServiceAddress>,
    /// The longest lock deadline a source may ask for.
    pub max_deadline: Duration,
}

impl Default for AgentPolicy {
    fn default() -> Self {
        Self {
            allow: Vec::new(),
            max_deadline: Duration::from_secs(120),
        }
    }
}

/// Bounds on what a source may send once accepted.
pub const MAX_FILES: u64 = 100_000;
pub const MAX_TOTAL_BYTES: u64 = 64 << 30;
/// Held packets a source may hand over, in one batch (the source's ring
/// holds 16 MiB of packets of at most 2 KiB).
pub const MAX_HELD: u64 = 16_384;
pub const MAX_HELD_BYTES: usize = 2048;
impl AgentPolicy {
    /// Everything in a preflight request that policy decides, with the
    /// flows parsed. `Err` says what was refused and why.
    pub fn check(&self, request: &PreflightRequest) -> Result<Vec<FlowSpec>, String> {
        if request.service_addresses.is_empty() {
            return Err("no service address to move".into());
        }
        if !self.allow.is_empty() {
            for address in &request.service_addresses {
                if !self
                    .allow
                    .iter()
                    .any(|net| contains(net.ip, net.prefix, address.ip))
                {
                    return Err(format!(
                        "service address {} is outside this agent's --allow-ip ({})",
                        address.ip,
                        self.allow
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
            }
        }
        let deadline = Duration::from_millis(request.deadline_ms);
        if deadline.is_zero() || deadline > self.max_deadline {
            return Err(format!(
                "lock deadline {deadline:?} refused: this agent allows up to {:?} (--max-deadline)",
                self.max_deadline
            ));
        }
        let services = request.service_ips();
        request
            .flows
            .iter()
            .map(|flow| {
                let flow: FlowSpec = flow.parse().map_err(|err| format!("{err}"))?;
                if services.contains(&flow.local.ip()) {
                    Ok(flow)
                } else {
                    Err(format!(
                        "flow {flow} is not on a service address that moves: refused"
                    ))
                }
            })
            .collect()
    }
}

/// A file name the source may write: one plain component, no dot files.
pub fn safe_name(name: &str) -> bool {
    let mut components = Path::new(name).components();
    matches!(components.next(), Some(Component::Normal(_)))
        && components.next().is_none()
        && !name.starts_with('.')
        && name.len() <= 255
}

/// A held packet must come from a peer to a migrating flow, or to a
/// service address that moves (what the source's service rule held: a new
/// client's SYN, a connection accepted after the discovery).
pub fn check_held(frame: &[u8], flows: &[FlowSpec], services: &[IpAddr]) -> Result<(), String> {
    if frame.len() > MAX_HELD_BYTES {
        return Err(format!(
            "held packet of {} bytes, over {MAX_HELD_BYTES}",
            frame.len()
        ));
    }
    let packet = crate::net::inject::rebuild(frame)
        .ok_or("a held packet that is not TCP over IP: refused")?;
    if flows.contains(&packet.flow) || services.contains(&packet.flow.local.ip()) {
        Ok(())
    } else {
        Err(format!(
            "a held packet of {}, which is not migrating: refused",
            packet.flow
        ))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn request(addresses: &[&str], flows: &[&str], deadline_ms: u64) -> PreflightRequest {
        PreflightRequest {
            pids: vec![1],
            own_pid_namespace: true,
            service_addresses: addresses.iter().map(|a| a.parse().unwrap()).collect(),
            flows: flows.iter().map(|f| (*f).to_owned()).collect(),
            deadline_ms,
            hold: false,
            page_stream: true,
            lazy_restore: false,
            post_copy: false,
            boot_id: String::new(),
            pid_namespace: 0,
            image_bytes: 0,
            echo_peers: Vec::new(),
            takeover: Default::default(),
        }
    }

    #[test]
    fn image_names_stay_inside_the_work_directory() {
        for ok in ["inventory.img", "pages-1.img", "stats-dump", "core-42.img"] {
            assert!(safe_name(ok), "{ok} refused");
        }
        for bad in [
            "../etc/passwd",
            "/etc/passwd",
            "a/b.img",
            "..",
            ".",
            "",
            ".hidden",
            &"x".repeat(256),
        ] {
            assert!(!safe_name(bad), "{bad:?} accepted");
        }
    }

    #[test]
    fn preflight_policy() {
        let policy = AgentPolicy {
            allow: vec!["198.18.0.0/24".parse().unwrap()],
            max_deadline: Duration::from_secs(60),
        };
        let flow = "198.18.0.100:4000=198.18.0.1:9000";
        assert_eq!(
            policy
                .check(&request(&["198.18.0.100"], &[flow], 30_000))
                .unwrap()
                .len(),
            1
        );
        let outside = policy
            .check(&request(&["198.19.0.100"], &[], 30_000))
            .unwrap_err();
        assert!(outside.contains("--allow-ip"), "{outside}");
        let long = policy
            .check(&request(&["198.18.0.100"], &[flow], u64::MAX))
            .unwrap_err();
        assert!(long.contains("--max-deadline"), "{long}");
        assert!(
            policy
                .check(&request(&["198.18.0.100"], &[flow], 0))
                .is_err()
        );
        let other = policy
            .check(&request(
                &["198.18.0.100"],
                &["198.18.0.7:22=198.18.0.1:9000"],
                30_000,
            ))
            .unwrap_err();
        assert!(other.contains("not on a service address"), "{other}");
        assert!(policy.check(&request(&[], &[], 30_000)).is_err());
    }

    #[test]
    fn held_packets_must_be_of_migrating_flows() {
        // An Ethernet + IPv4 + TCP frame from the peer to the service.
        let mut frame = vec![0u8; 14 + 20 + 20];
        frame[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip = &mut frame[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&40u16.to_be_bytes());
        ip[8] = 64;
        ip[9] = 6;
        ip[12..16].copy_from_slice(&[198, 18, 0, 1]);
        ip[16..20].copy_from_slice(&[198, 18, 0, 100]);
        let tcp = &mut frame[34..54];
        tcp[0..2].copy_from_slice(&9000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&4000u16.to_be_bytes());
        tcp[12] = 5 << 4;
        let flow: FlowSpec = "198.18.0.100:4000=198.18.0.1:9000".parse().unwrap();
        let other: FlowSpec = "198.18.0.100:4001=198.18.0.1:9000".parse().unwrap();
        assert_eq!(check_held(&frame, &[flow], &[]), Ok(()));
        assert!(check_held(&frame, &[other], &[]).is_err());
        // To an address that moves, though no listed flow: a new client's.
        let moving: IpAddr = "198.18.0.100".parse().unwrap();
        let staying: IpAddr = "198.18.0.101".parse().unwrap();
        assert_eq!(check_held(&frame, &[other], &[moving]), Ok(()));
        assert!(check_held(&frame, &[other], &[staying]).is_err());
        assert!(check_held(&[0u8; 10], &[flow], &[moving]).is_err());
        assert!(check_held(&vec![0u8; 4096], &[flow], &[moving]).is_err());
    }
}
