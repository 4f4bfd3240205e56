//! Flow and service-IP specs as users write them, and back.
//!
//! Flows: `LOCAL_IP:PORT=REMOTE_IP:PORT`, IPv6 in brackets:
//! `[2001:db8::2]:5000=[2001:db8::1]:7000`. Services: `IP` or `IP:PORT`
//! (`[IPv6]:PORT`).

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    str::FromStr,
};

use migrator_common::{
    FlowKey, ServiceKey,
    flow::{FAMILY_IPV4, FAMILY_IPV6},
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("flow `{0}`: expected LOCAL_IP:PORT=REMOTE_IP:PORT (IPv6 as [ADDR]:PORT)")]
    FlowShape(String),
    #[error("flow `{spec}`: `{part}` is not an IP:PORT endpoint (IPv6 as [ADDR]:PORT)")]
    Endpoint { spec: String, part: String },
    #[error("flow `{0}`: local and remote must both be IPv4 or both IPv6")]
    MixedFamilies(String),
    #[error("flow `{0}`: port 0 is not a TCP connection's port")]
    ZeroPort(String),
    #[error("service `{0}`: expected IP or IP:PORT (IPv6 as ADDR or [ADDR]:PORT)")]
    Service(String),
}

/// A four-tuple as given on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowSpec {
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

impl FromStr for FlowSpec {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<Self, SpecError> {
        let (local, remote) = spec
            .split_once('=')
            .ok_or_else(|| SpecError::FlowShape(spec.to_owned()))?;
        let endpoint = |part: &str| {
            part.trim()
                .parse::<SocketAddr>()
                .map_err(|_| SpecError::Endpoint {
                    spec: spec.to_owned(),
                    part: part.to_owned(),
                })
        };
        let (local, remote) = (endpoint(local)?, endpoint(remote)?);
        if local.is_ipv4() != remote.is_ipv4() {
            return Err(SpecError::MixedFamilies(spec.to_owned()));
        }
        if local.port() == 0 || remote.port() == 0 {
            return Err(SpecError::ZeroPort(spec.to_owned()));
        }
        Ok(Self { local, remote })
    }
}

impl FlowSpec {
    pub fn key(&self) -> FlowKey {
        match (self.local.ip(), self.remote.ip()) {
            (IpAddr::V4(local), IpAddr::V4(remote)) => FlowKey::v4(
                local.octets(),
                self.local.port(),
                remote.octets(),
                self.remote.port(),
            ),
            (local, remote) => FlowKey::v6(
                v6_octets(local),
                self.local.port(),
                v6_octets(remote),
                self.remote.port(),
            ),
        }
    }

    pub fn from_key(key: &FlowKey) -> Self {
        Self {
            local: SocketAddr::new(key_addr(&key.local_addr, key.family), key.local_port),
            remote: SocketAddr::new(key_addr(&key.remote_addr, key.family), key.remote_port),
        }
    }
}

impl fmt::Display for FlowSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.local, self.remote)
    }
}

fn v6_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V6(v6) => v6.octets(),
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
    }
}

fn key_addr(bytes: &[u8; 16], family: u8) -> IpAddr {
    if family == FAMILY_IPV4 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    }
}

/// A service IP, optionally one port (None: every port).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    pub ip: IpAddr,
    pub port: Option<u16>,
}

impl FromStr for ServiceSpec {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<Self, SpecError> {
        let spec = spec.trim();
        if let Ok(ip) = spec.parse::<IpAddr>() {
            return Ok(Self { ip, port: None });
        }
        match spec.parse::<SocketAddr>() {
            Ok(addr) if addr.port() != 0 => Ok(Self {
                ip: addr.ip(),
                port: Some(addr.port()),
            }),
            _ => Err(SpecError::Service(spec.to_owned())),
        }
    }
}

impl ServiceSpec {
    pub fn key(&self) -> ServiceKey {
        let port = self.port.unwrap_or(0);
        match self.ip {
            IpAddr::V4(v4) => {
                let mut addr = [0u8; 16];
                addr[..4].copy_from_slice(&v4.octets());
                ServiceKey::new(addr, FAMILY_IPV4, port)
            }
            IpAddr::V6(v6) => ServiceKey::new(v6.octets(), FAMILY_IPV6, port),
        }
    }

    pub fn from_key(key: &ServiceKey) -> Self {
        Self {
            ip: key_addr(&key.addr, key.family),
            port: (key.port != 0).then_some(key.port),
        }
    }
}

impl fmt::Display for ServiceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => write!(f, "{}", SocketAddr::new(self.ip, port)),
            None => write!(f, "{}", self.ip),
        }
    }
}

/// A duration as users write it: `30s`, `500ms`, `2m`, `1.5s`.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration: write e.g. 30s, 500ms or 2m"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" | "" => value,
        "m" | "min" => value * 60.0,
        _ => return Err(format!("`{text}`: unknown unit `{unit}` (use ms, s or m)")),
    };
    if !seconds.is_finite() || seconds <= 0.0 {
        return Err(format!("`{text}`: the duration must be positive"));
    }
    Ok(std::time::Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flows_round_trip_through_keys() {
        for text in [
            "198.18.0.2:5000=198.18.0.1:7000",
            "[2001:db8::2]:5000=[2001:db8::1]:7000",
        ] {
            let spec: FlowSpec = text.parse().unwrap();
            assert_eq!(FlowSpec::from_key(&spec.key()), spec);
            assert_eq!(spec.to_string(), text);
        }
    }

    #[test]
    fn bad_flows_say_what_is_wrong() {
        assert!(matches!(
            "198.18.0.2:5000".parse::<FlowSpec>(),
            Err(SpecError::FlowShape(_))
        ));
        assert!(matches!(
            "198.18.0.2=198.18.0.1:7000".parse::<FlowSpec>(),
            Err(SpecError::Endpoint { .. })
        ));
        assert!(matches!(
            "198.18.0.2:1=[2001:db8::1]:7000".parse::<FlowSpec>(),
            Err(SpecError::MixedFamilies(_))
        ));
        assert!(matches!(
            "198.18.0.2:0=198.18.0.1:7000".parse::<FlowSpec>(),
            Err(SpecError::ZeroPort(_))
        ));
        let message = "2001:db8::2:5000=x"
            .parse::<FlowSpec>()
            .unwrap_err()
            .to_string();
        assert!(message.contains("[ADDR]:PORT"), "{message}");
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("30s"),
            Ok(std::time::Duration::from_secs(30))
        );
        assert_eq!(
            parse_duration("500ms"),
            Ok(std::time::Duration::from_millis(500))
        );
        assert_eq!(
            parse_duration("2m"),
            Ok(std::time::Duration::from_secs(120))
        );
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5h").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn services_with_and_without_port() {
        let any: ServiceSpec = "198.18.0.5".parse().unwrap();
        assert_eq!(any.port, None);
        assert_eq!(any.key().port, 0);
        let one: ServiceSpec = "[2001:db8::5]:80".parse().unwrap();
        assert_eq!(one.port, Some(80));
        assert_eq!(ServiceSpec::from_key(&one.key()), one);
        assert_eq!("2001:db8::5".parse::<ServiceSpec>().unwrap().port, None);
        assert!("nope".parse::<ServiceSpec>().is_err());
    }
}
