//! Published ports: `[HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp]`, as Docker
//! and Podman write them. Stored in config.json as these strings.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Proto {
    #[default]
    Tcp,
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
        })
    }
}

/// One published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortMapping {
    /// Host address to listen on; `None` means every address.
    pub host_ip: Option<Ipv4Addr>,
    pub host_port: u16,
    pub guest_port: u16,
    pub proto: Proto,
}

/// Why a `--publish` value was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PublishError {
    #[error(
        "Invalid --publish '{0}': write [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp], for example 8080:80 or 127.0.0.1:2222:22"
    )]
    Syntax(String),
    #[error("Invalid port in --publish '{0}': ports are 1 to 65535")]
    Port(String),
    #[error(
        "Invalid --publish '{0}': HOST_IP is an IPv4 address; a port published without one (8080:80) answers on every host address, IPv6 ones included where the network has IPv6"
    )]
    Ipv6Host(String),
    #[error("Host port {port}/{proto} is published twice: give each mapping its own host port")]
    Duplicate { port: u16, proto: Proto },
}

fn port(s: &str, whole: &str) -> Result<u16, PublishError> {
    if s.is_empty() || !s.chars().all(|c| c.is_ascii_digit()) {
        return Err(PublishError::Syntax(whole.to_string()));
    }
    match s.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(PublishError::Port(whole.to_string())),
    }
}

impl FromStr for PortMapping {
    type Err = PublishError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let whole = s.trim();
        let (spec, proto) = match whole.rsplit_once('/') {
            Some((spec, p)) => match p.to_ascii_lowercase().as_str() {
                "tcp" => (spec, Proto::Tcp),
                "udp" => (spec, Proto::Udp),
                _ => return Err(PublishError::Syntax(s.to_string())),
            },
            None => (whole, Proto::Tcp),
        };
        // `[2001:db8::5]:8080:80` or a bare IPv6 address before the ports.
        let address = spec.rsplitn(3, ':').nth(2).unwrap_or_default();
        if address
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::Ipv6Addr>()
            .is_ok()
        {
            return Err(PublishError::Ipv6Host(s.to_string()));
        }
        let parts: Vec<&str> = spec.split(':').collect();
        let (host_ip, host_port, guest_port) = match parts.as_slice() {
            [h, g] => (None, port(h, s)?, port(g, s)?),
            [ip, h, g] => {
                let ip: Ipv4Addr = ip
                    .parse()
                    .map_err(|_| PublishError::Syntax(s.to_string()))?;
                let ip = (!ip.is_unspecified()).then_some(ip);
                (ip, port(h, s)?, port(g, s)?)
            }
            _ => return Err(PublishError::Syntax(s.to_string())),
        };
        Ok(Self {
            host_ip,
            host_port,
            guest_port,
            proto,
        })
    }
}

impl fmt::Display for PortMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(ip) = self.host_ip {
            write!(f, "{ip}:")?;
        }
        write!(f, "{}:{}/{}", self.host_port, self.guest_port, self.proto)
    }
}

impl Serialize for PortMapping {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortMapping {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// Refuses two mappings of the same host port and protocol.
pub fn check_unique(list: &[PortMapping]) -> Result<(), PublishError> {
    for (i, a) in list.iter().enumerate() {
        if list[..i]
            .iter()
            .any(|b| b.host_port == a.host_port && b.proto == a.proto)
        {
            return Err(PublishError::Duplicate {
                port: a.host_port,
                proto: a.proto,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_docker_forms() {
        let m: PortMapping = "8080:80".parse().unwrap();
        assert_eq!(
            (m.host_ip, m.host_port, m.guest_port, m.proto),
            (None, 8080, 80, Proto::Tcp)
        );
        let m: PortMapping = "127.0.0.1:2222:22/TCP".parse().unwrap();
        assert_eq!(m.host_ip, Some(Ipv4Addr::LOCALHOST));
        assert_eq!(m.to_string(), "127.0.0.1:2222:22/tcp");
        let m: PortMapping = "5353:53/udp".parse().unwrap();
        assert_eq!(m.proto, Proto::Udp);
        assert_eq!("0.0.0.0:1:2".parse::<PortMapping>().unwrap().host_ip, None);
    }

    #[test]
    fn refuses_nonsense() {
        for s in [
            "80",
            "a:80",
            "8080:80/sctp",
            "1.2.3:80:80",
            "8080:",
            ":80",
            "1:2:3:4",
        ] {
            assert!(
                matches!(s.parse::<PortMapping>(), Err(PublishError::Syntax(_))),
                "{s}"
            );
        }
        for s in [
            "[2001:db8::5]:8080:80",
            "2001:db8::5:8080:80",
            "[::]:80:80/udp",
        ] {
            assert!(
                matches!(s.parse::<PortMapping>(), Err(PublishError::Ipv6Host(_))),
                "{s}"
            );
        }
        for s in ["0:80", "8080:70000"] {
            assert!(
                matches!(s.parse::<PortMapping>(), Err(PublishError::Port(_))),
                "{s}"
            );
        }
        let l: Vec<PortMapping> = ["8080:80", "8080:81"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert!(check_unique(&l).is_err());
        let l: Vec<PortMapping> = ["53:53/udp", "53:53/tcp"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert!(check_unique(&l).is_ok());
    }
}
