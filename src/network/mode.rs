//! The network mode of a VM: how it is parsed from the command line, printed
//! back, and stored in `config.json` as `networkMode`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Every network mode as written on a command line: the one list that the
/// unknown-mode error, `--network`'s help (clap's `help = concat!(…)`) and
/// MCP's schema (`#[doc = concat!(…)]`) print. Tests check that each entry
/// parses and prints back as listed, that every mode is listed, and that
/// the REST schema's description (utoipa reads only literal doc comments)
/// says the same.
#[macro_export]
macro_rules! network_modes {
    () => {
        "nat, bridged, bridged:<interface>, host, user, none"
    };
}

/// How a VM is connected.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum NetworkMode {
    /// A lume-managed bridge with DHCP, DNS and masquerade (the default).
    #[default]
    Nat,
    /// A peer on a host interface's LAN; `None` picks the default-route interface.
    Bridged(Option<String>),
    /// A lume-managed bridge that reaches only the host and other host-only VMs.
    Host,
    /// QEMU user-mode networking: no privileges needed, follows the host's routing.
    User,
    /// No network device at all.
    None,
}

/// Why a network mode was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModeError {
    #[error("Unknown network mode '{0}': use one of {modes}", modes = crate::network_modes!())]
    Unknown(String),
    #[error(
        "Invalid interface name '{0}' in network mode: interface names are 1 to 15 characters without '/', ':' or spaces"
    )]
    BadInterface(String),
}

/// Whether `name` could be a Linux interface name (IFNAMSIZ - 1, no separators).
pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name.chars().any(|c| {
            // The kernel's rules, plus what would change the meaning of a
            // name in an nft rule (a quote ends it, `*` makes it a wildcard).
            matches!(c, '/' | ':' | '"' | '\\' | '*' | '\'') || c.is_whitespace() || c.is_control()
        })
}

impl NetworkMode {
    /// Whether this mode needs CAP_NET_ADMIN on the host.
    pub fn needs_net_admin(&self) -> bool {
        super::driver::of(self).needs_net_admin()
    }

    /// Whether ports can be published in this mode (nat: DNAT; user: QEMU forwarding).
    /// Bridged VMs are on the LAN themselves; host-only and none have no way out.
    pub fn supports_publish(&self) -> bool {
        !matches!(
            super::driver::of(self).publishing(),
            super::driver::Publishing::Unsupported(_)
        )
    }
}

impl FromStr for NetworkMode {
    type Err = ModeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim();
        let lower = trimmed.to_ascii_lowercase();
        match lower.as_str() {
            "nat" => return Ok(Self::Nat),
            "bridged" | "bridged:" => return Ok(Self::Bridged(None)),
            "host" => return Ok(Self::Host),
            "user" => return Ok(Self::User),
            "none" => return Ok(Self::None),
            _ => {}
        }
        if lower.starts_with("bridged:") {
            // Interface names are case-sensitive: keep the user's spelling.
            let iface = &trimmed["bridged:".len()..];
            if !valid_ifname(iface) {
                return Err(ModeError::BadInterface(iface.to_string()));
            }
            return Ok(Self::Bridged(Some(iface.to_string())));
        }
        Err(ModeError::Unknown(s.to_string()))
    }
}

impl fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Nat => f.write_str("nat"),
            Self::Bridged(None) => f.write_str("bridged"),
            Self::Bridged(Some(i)) => write!(f, "bridged:{i}"),
            Self::Host => f.write_str("host"),
            Self::User => f.write_str("user"),
            Self::None => f.write_str("none"),
        }
    }
}

impl Serialize for NetworkMode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for NetworkMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_mode_case_insensitively() {
        assert_eq!("NAT".parse(), Ok(NetworkMode::Nat));
        assert_eq!("Bridged".parse(), Ok(NetworkMode::Bridged(None)));
        assert_eq!("bridged:".parse(), Ok(NetworkMode::Bridged(None)));
        assert_eq!(
            "BRIDGED:eth0".parse(),
            Ok(NetworkMode::Bridged(Some("eth0".into())))
        );
        assert_eq!("host".parse(), Ok(NetworkMode::Host));
        assert_eq!("User".parse(), Ok(NetworkMode::User));
        assert_eq!("none".parse(), Ok(NetworkMode::None));
    }

    /// The one list of modes names every mode once, each as it parses and
    /// prints back (a new mode fails to compile below until it is listed).
    #[test]
    fn the_listed_modes_are_every_mode() {
        let mut seen = Vec::new();
        for name in crate::network_modes!().split(", ") {
            let s = name.replace("<interface>", "enp3s0");
            let mode: NetworkMode = s.parse().unwrap();
            assert_eq!(mode.to_string(), s);
            seen.push(match mode {
                NetworkMode::Nat => 0,
                NetworkMode::Bridged(None) => 1,
                NetworkMode::Bridged(Some(_)) => 2,
                NetworkMode::Host => 3,
                NetworkMode::User => 4,
                NetworkMode::None => 5,
            });
        }
        assert_eq!(seen, (0..=5).collect::<Vec<_>>());
    }

    /// Each door's help for the network option prints the list.
    #[test]
    fn every_help_text_prints_the_list() {
        use clap::CommandFactory as _;
        let list = crate::network_modes!();
        let cli = crate::cli::Cli::command();
        let create = cli.find_subcommand("create").unwrap();
        let arg = create
            .get_arguments()
            .find(|a| a.get_id() == "network")
            .unwrap();
        let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
        assert!(help.contains(list), "--network: {help:?}");
        let rest = serde_json::to_value(
            <crate::api::routes::CreateVmRequest as utoipa::PartialSchema>::schema(),
        )
        .unwrap();
        let rest = rest["properties"]["network"]["description"].to_string();
        assert!(rest.contains(list), "REST: {rest}");
        let mcp =
            serde_json::to_value(rmcp::schemars::schema_for!(crate::mcp::CreateArgs)).unwrap();
        let mcp = mcp["properties"]["network"]["description"].to_string();
        assert!(mcp.contains(list), "MCP: {mcp}");
    }

    #[test]
    fn prints_back_what_it_parsed() {
        for s in ["nat", "bridged", "bridged:enp3s0", "host", "user", "none"] {
            assert_eq!(s.parse::<NetworkMode>().unwrap().to_string(), s);
        }
    }

    #[test]
    fn refuses_unknown_modes_and_bad_interfaces() {
        let err = "vpn".parse::<NetworkMode>().unwrap_err();
        assert!(err.to_string().contains("nat, bridged"));
        assert!("bridged:../x".parse::<NetworkMode>().is_err());
        assert!(
            "bridged:averyveryverylongname"
                .parse::<NetworkMode>()
                .is_err()
        );
        assert!("bridged:a b".parse::<NetworkMode>().is_err());
        for bad in ["e*", "a\"b", "a\\b", "a'b"] {
            assert!(!valid_ifname(bad), "{bad}");
        }
        assert!(valid_ifname("br-1a2b.10"));
    }

    #[test]
    fn serde_round_trip() {
        let m = NetworkMode::Bridged(Some("br0".into()));
        let j = serde_json::to_string(&m).unwrap();
        assert_eq!(j, "\"bridged:br0\"");
        assert_eq!(serde_json::from_str::<NetworkMode>(&j).unwrap(), m);
    }
}
