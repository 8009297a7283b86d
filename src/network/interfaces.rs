//! Host network interface discovery, and which interfaces `bridged` mode can
//! use. Everything comes from sysfs (`/sys/class/net/<if>/...`), the IPv4
//! routing table (`/proc/net/route`) and `getifaddrs(3)` for addresses; no
//! interface is changed.
//!
//! Classification, first match wins:
//!
//! | evidence                                              | kind       |
//! |-------------------------------------------------------|------------|
//! | `type` 772                                            | loopback   |
//! | `tun_flags` with IFF_TAP / IFF_TUN                    | tap / tun  |
//! | `uevent` DEVTYPE bridge, bond, vlan, wlan             | as named   |
//! | DEVTYPE wireguard                                     | tun        |
//! | DEVTYPE macvlan or macvtap                            | macvlan    |
//! | `bridge/`, `bonding/`, `wireless/` or `phy80211`      | bridge, bond, wifi |
//! | `type` not 1: NONE, PPP, IP-in-IP, SIT, GRE tunnels   | tun        |
//! | `type` not 1: anything else                           | other      |
//! | `macvtap/`, or a `lower_*` link and iflink != ifindex | macvlan    |
//! | a `device` link (real hardware)                       | ethernet   |
//! | no `device`, iflink != ifindex                        | veth       |
//! | no `device`, iflink == ifindex (dummy, ifb, vxlan...) | other      |

use std::collections::HashMap;
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// What kind of link an interface is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum InterfaceType {
    Ethernet,
    Wifi,
    Bridge,
    Bond,
    Vlan,
    Veth,
    Tun,
    Tap,
    Macvlan,
    Loopback,
    Other,
}

/// One host interface as `bridged` mode sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HostInterface {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: InterfaceType,
    /// operstate from sysfs: "up", "down", "unknown", "dormant", ...
    pub state: String,
    pub mac_address: Option<String>,
    /// CIDR strings like "192.0.2.10/24".
    pub ipv4: Vec<String>,
    /// Carries the IPv4 default route (the lowest-metric one if several).
    pub is_default: bool,
    pub bridgeable: bool,
    /// Why the interface is not bridgeable; `None` when it is.
    pub reason: Option<String>,
    /// The bridge or bond (or other master) it is enslaved to, if any.
    #[serde(skip)]
    pub master: Option<String>,
}

/// Where discovery reads from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPaths {
    pub sys_class_net: PathBuf,
    pub proc_net_route: PathBuf,
    /// Interfaces the kernel reports as veth (rtnetlink link kind). sysfs
    /// tells a veth only by its peer's index differing from its own, and a
    /// peer in another network namespace can have the same index.
    pub veths: std::collections::HashSet<String>,
}

impl HostPaths {
    /// The running host's `/sys/class/net` and `/proc/net/route`.
    pub fn system() -> Self {
        Self {
            sys_class_net: PathBuf::from("/sys/class/net"),
            proc_net_route: PathBuf::from("/proc/net/route"),
            veths: super::kernel::netlink::Netlink::open()
                .and_then(|mut nl| nl.links())
                .map(|links| {
                    links
                        .into_iter()
                        .filter(|l| l.kind.as_deref() == Some("veth"))
                        .map(|l| l.name)
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// Why the host's interfaces could not be listed.
#[derive(Debug, thiserror::Error)]
pub enum InterfaceError {
    #[error("Cannot list network interfaces in {} (is sysfs mounted at /sys?)", path.display())]
    List {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot read {} of interface {name} (is sysfs mounted at /sys?)", path.display())]
    Read {
        name: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot read the IPv4 routing table {} (is /proc mounted?)", path.display())]
    Routes {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Cannot read the host's IPv4 addresses (getifaddrs failed); try again")]
    Addresses(#[source] io::Error),
}

/// Why `bridged` mode cannot use an interface.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BridgeError {
    #[error(
        "No host interface can be bridged: {}. Use --network nat or --network user instead",
        describe_all(.interfaces)
    )]
    NoneBridgeable {
        /// Every interface with the reason it is not bridgeable.
        interfaces: Vec<(String, String)>,
    },
    #[error("Interface '{name}' does not exist on this host: {}", alternatives(.bridgeable))]
    NoSuchInterface {
        name: String,
        bridgeable: Vec<String>,
    },
    #[error("Interface '{name}' cannot be bridged: {reason}. {}", alternatives(.bridgeable))]
    NotBridgeable {
        name: String,
        reason: String,
        bridgeable: Vec<String>,
    },
}

fn describe_all(interfaces: &[(String, String)]) -> String {
    if interfaces.is_empty() {
        return "the host has no network interfaces".to_string();
    }
    interfaces
        .iter()
        .map(|(name, reason)| format!("{name} ({reason})"))
        .collect::<Vec<_>>()
        .join("; ")
}

fn alternatives(bridgeable: &[String]) -> String {
    if bridgeable.is_empty() {
        "This host has no bridgeable interface: use --network nat or --network user".to_string()
    } else {
        format!(
            "Bridgeable interfaces: {} (use bridged:<interface>), or use --network nat or --network user",
            bridgeable.join(", ")
        )
    }
}

fn bridgeable_names(list: &[HostInterface]) -> Vec<String> {
    list.iter()
        .filter(|i| i.bridgeable)
        .map(|i| i.name.clone())
        .collect()
}

/// The real host's interfaces: sysfs, `/proc/net/route` and `getifaddrs`.
pub fn discover() -> Result<Vec<HostInterface>, InterfaceError> {
    let ipv4 = ipv4_addresses()?;
    discover_at(&HostPaths::system(), &ipv4)
}

/// Interfaces under `paths`, with IPv4 addresses taken from `ipv4`
/// (interface name to CIDR strings), sorted by name. A missing route file
/// means no default route.
pub fn discover_at(
    paths: &HostPaths,
    ipv4: &HashMap<String, Vec<String>>,
) -> Result<Vec<HostInterface>, InterfaceError> {
    let list_err = |source| InterfaceError::List {
        path: paths.sys_class_net.clone(),
        source,
    };
    let mut raw = Vec::new();
    for entry in fs::read_dir(&paths.sys_class_net).map_err(list_err)? {
        let entry = entry.map_err(list_err)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // `bonding_masters` is a plain file next to the interface links.
        if !paths.sys_class_net.join(&name).is_dir() {
            continue;
        }
        match read_raw(&paths.sys_class_net, &name, paths.veths.contains(&name)) {
            Ok(Some(r)) => raw.push(r),
            // Removed while we looked.
            Ok(None) => {}
            Err(e) => return Err(e),
        }
    }
    raw.sort_by(|a, b| a.name.cmp(&b.name));

    let default = match fs::read_to_string(&paths.proc_net_route) {
        Ok(text) => default_route_interface(&text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(source) => {
            return Err(InterfaceError::Routes {
                path: paths.proc_net_route.clone(),
                source,
            });
        }
    };

    let kinds: HashMap<&str, &InterfaceType> =
        raw.iter().map(|r| (r.name.as_str(), &r.kind)).collect();
    let list = raw
        .iter()
        .map(|r| {
            let reason = not_bridgeable_reason(r, &kinds);
            HostInterface {
                name: r.name.clone(),
                kind: r.kind.clone(),
                state: r.state.clone(),
                mac_address: r.mac.clone(),
                ipv4: ipv4.get(&r.name).cloned().unwrap_or_default(),
                is_default: default.as_deref() == Some(r.name.as_str()),
                bridgeable: reason.is_none(),
                reason,
                master: r.master.clone(),
            }
        })
        .collect();
    Ok(list)
}

/// The interface plain `bridged` uses: the default-route interface if it is
/// bridgeable; otherwise (say the default route goes through a VPN tunnel)
/// the best bridgeable one: up before down, then with an IPv4 address before
/// without, then ethernet/bond/vlan before bridges before veths, then by
/// name. Never a tunnel.
pub fn choose_default(list: &[HostInterface]) -> Result<&HostInterface, BridgeError> {
    if let Some(i) = list.iter().find(|i| i.is_default && i.bridgeable) {
        return Ok(i);
    }
    let rank = |i: &HostInterface| {
        let kind = match i.kind {
            InterfaceType::Ethernet | InterfaceType::Bond | InterfaceType::Vlan => 0,
            InterfaceType::Bridge => 1,
            _ => 2,
        };
        (i.state != "up", i.ipv4.is_empty(), kind)
    };
    // min_by_key keeps the first of equal keys, so ties go by list order.
    list.iter()
        .filter(|i| i.bridgeable)
        .min_by_key(|i| rank(i))
        .ok_or_else(|| BridgeError::NoneBridgeable {
            interfaces: list
                .iter()
                .map(|i| {
                    let reason = i.reason.clone().unwrap_or_default();
                    (i.name.clone(), reason)
                })
                .collect(),
        })
}

/// The interface `bridged:<name>` uses, if it exists and is bridgeable.
pub fn check_bridgeable<'a>(
    list: &'a [HostInterface],
    name: &str,
) -> Result<&'a HostInterface, BridgeError> {
    let Some(i) = list.iter().find(|i| i.name == name) else {
        return Err(BridgeError::NoSuchInterface {
            name: name.to_string(),
            bridgeable: bridgeable_names(list),
        });
    };
    if i.bridgeable {
        return Ok(i);
    }
    Err(BridgeError::NotBridgeable {
        name: name.to_string(),
        reason: i.reason.clone().unwrap_or_default(),
        bridgeable: bridgeable_names(list),
    })
}

/// What sysfs says about one interface, before the cross-interface checks.
#[derive(Debug)]
struct RawInterface {
    name: String,
    kind: InterfaceType,
    state: String,
    mac: Option<String>,
    master: Option<String>,
    /// For macvlan and friends: the interface it sits on.
    lower: Option<String>,
    /// The interface's alias (`ifalias`): lume marks its own bridges `lume`.
    alias: Option<String>,
}

const ARPHRD_ETHER: u32 = 1;
const ARPHRD_PPP: u32 = 512;
const ARPHRD_TUNNEL: u32 = 768;
const ARPHRD_TUNNEL6: u32 = 769;
const ARPHRD_LOOPBACK: u32 = 772;
const ARPHRD_SIT: u32 = 776;
const ARPHRD_IPGRE: u32 = 778;
const ARPHRD_IP6GRE: u32 = 823;
const ARPHRD_NONE: u32 = 65534;
const IFF_TUN: u32 = 0x0001;
const IFF_TAP: u32 = 0x0002;

/// Reads one interface directory; `Ok(None)` if it vanished meanwhile.
fn read_raw(root: &Path, name: &str, veth: bool) -> Result<Option<RawInterface>, InterfaceError> {
    let dir = root.join(name);
    let read = |file: &str| -> Result<Option<String>, InterfaceError> {
        let path = dir.join(file);
        match fs::read_to_string(&path) {
            Ok(s) => Ok(Some(s.trim().to_string())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            // Some attributes (e.g. `address` of a few drivers) refuse reads.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(None),
            Err(source) => Err(InterfaceError::Read {
                name: name.to_string(),
                path,
                source,
            }),
        }
    };
    let Some(arphrd) = read("type")? else {
        return Ok(None);
    };
    let arphrd: u32 = arphrd.parse().unwrap_or(0);
    let uevent = read("uevent")?.unwrap_or_default();
    let devtype = uevent
        .lines()
        .find_map(|l| l.strip_prefix("DEVTYPE="))
        .map(str::to_string);
    let tun_flags = read("tun_flags")?.and_then(|s| parse_hex(&s));
    let ifindex = read("ifindex")?;
    let iflink = read("iflink")?;
    let linked_elsewhere = matches!((&ifindex, &iflink), (Some(a), Some(b)) if a != b);
    let has = |p: &str| dir.join(p).symlink_metadata().is_ok();
    let link_name = |p: &str| {
        fs::read_link(dir.join(p))
            .ok()
            .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
    };
    let lower = lower_link(&dir);

    let kind = if arphrd == ARPHRD_LOOPBACK {
        InterfaceType::Loopback
    } else if let Some(flags) = tun_flags {
        if flags & IFF_TAP != 0 {
            InterfaceType::Tap
        } else if flags & IFF_TUN != 0 {
            InterfaceType::Tun
        } else {
            InterfaceType::Other
        }
    } else if let Some(kind) = devtype.as_deref().and_then(kind_of_devtype) {
        kind
    } else if has("bridge") {
        InterfaceType::Bridge
    } else if has("bonding") {
        InterfaceType::Bond
    } else if has("wireless") || has("phy80211") {
        InterfaceType::Wifi
    } else if arphrd != ARPHRD_ETHER {
        match arphrd {
            ARPHRD_NONE | ARPHRD_PPP | ARPHRD_TUNNEL | ARPHRD_TUNNEL6 | ARPHRD_SIT
            | ARPHRD_IPGRE | ARPHRD_IP6GRE => InterfaceType::Tun,
            _ => InterfaceType::Other,
        }
    } else if has("macvtap") || (lower.is_some() && linked_elsewhere) {
        InterfaceType::Macvlan
    } else if has("device") {
        InterfaceType::Ethernet
    } else if linked_elsewhere || veth {
        InterfaceType::Veth
    } else {
        InterfaceType::Other
    };

    let mac = read("address")?.filter(|m| !m.is_empty() && m.chars().any(|c| !"0:".contains(c)));
    Ok(Some(RawInterface {
        name: name.to_string(),
        kind,
        state: read("operstate")?.unwrap_or_else(|| "unknown".to_string()),
        alias: read("ifalias")?.filter(|a| !a.is_empty()),
        mac,
        master: link_name("master"),
        lower,
    }))
}

fn kind_of_devtype(devtype: &str) -> Option<InterfaceType> {
    Some(match devtype {
        "bridge" => InterfaceType::Bridge,
        "bond" => InterfaceType::Bond,
        "vlan" => InterfaceType::Vlan,
        "wlan" => InterfaceType::Wifi,
        "wireguard" => InterfaceType::Tun,
        "macvlan" | "macvtap" => InterfaceType::Macvlan,
        _ => return None,
    })
}

/// The name in the first `lower_<name>` entry, if any.
fn lower_link(dir: &Path) -> Option<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_prefix("lower_")
                .map(str::to_string)
        })
        .collect();
    names.sort();
    names.into_iter().next()
}

fn parse_hex(s: &str) -> Option<u32> {
    let s = s.trim();
    let digits = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    u32::from_str_radix(digits, 16).ok()
}

fn not_bridgeable_reason(
    r: &RawInterface,
    kinds: &HashMap<&str, &InterfaceType>,
) -> Option<String> {
    if r.kind == InterfaceType::Bridge
        && r.alias.as_deref() == Some(crate::network::shared::BRIDGE_MARK)
    {
        // Bridging onto it would put a guest next to the NAT/host-only
        // guests, outside the guard lume keeps on its own ports.
        return Some(
            "lume's own NAT or host-only bridge: use --network nat or --network host".to_string(),
        );
    }
    let by_kind = match r.kind {
        InterfaceType::Ethernet
        | InterfaceType::Veth
        | InterfaceType::Bond
        | InterfaceType::Vlan
        | InterfaceType::Bridge => None,
        InterfaceType::Wifi => Some(
            "Wi-Fi cannot be bridged: the access point drops frames from other MAC addresses; use --network nat or user"
                .to_string(),
        ),
        InterfaceType::Tun => Some(
            "tunnel (VPN) interface: it carries IP packets, not Ethernet frames; use --network nat or user, which follow the host's routing"
                .to_string(),
        ),
        InterfaceType::Tap => Some("a tap device belongs to another VM or program".to_string()),
        InterfaceType::Loopback => {
            Some("loopback interface: its traffic never leaves this host".to_string())
        }
        InterfaceType::Macvlan => Some(match &r.lower {
            Some(parent) => format!(
                "already a macvlan/macvtap of {parent}: bridge its parent (bridged:{parent})"
            ),
            None => "already a macvlan/macvtap of another interface: bridge its parent".to_string(),
        }),
        InterfaceType::Other => Some(
            "not an Ethernet device a VM can share (dummy, ifb, overlay or unknown link type)"
                .to_string(),
        ),
    };
    if by_kind.is_some() {
        return by_kind;
    }
    let master = r.master.as_deref()?;
    Some(match kinds.get(master) {
        Some(InterfaceType::Bridge) => {
            format!("already part of bridge {master}: use bridged:{master}")
        }
        Some(InterfaceType::Bond) => format!("already part of bond {master}: use bridged:{master}"),
        _ => format!("already enslaved to {master}"),
    })
}

/// The interface of the lowest-metric IPv4 default route in the text of
/// `/proc/net/route` (columns Iface Destination Gateway Flags RefCnt Use
/// Metric Mask ..., addresses in hex).
fn default_route_interface(text: &str) -> Option<String> {
    const RTF_UP: u32 = 0x0001;
    let mut best: Option<(u32, &str)> = None;
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 8 {
            continue;
        }
        let (Some(dest), Some(flags), Ok(metric), Some(mask)) = (
            parse_hex(cols[1]),
            parse_hex(cols[3]),
            cols[6].parse::<u32>(),
            parse_hex(cols[7]),
        ) else {
            continue;
        };
        if dest != 0 || mask != 0 || flags & RTF_UP == 0 {
            continue;
        }
        if best.is_none_or(|(m, _)| metric < m) {
            best = Some((metric, cols[0]));
        }
    }
    best.map(|(_, name)| name.to_string())
}

/// The host's IPv4 addresses by interface name, as CIDR strings. Labels
/// such as `eth0:1` count for `eth0`.
fn ipv4_addresses() -> Result<HashMap<String, Vec<String>>, InterfaceError> {
    let list =
        nix::ifaddrs::getifaddrs().map_err(|e| InterfaceError::Addresses(io::Error::from(e)))?;
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    for ifa in list {
        let Some(addr) = sockaddr_ipv4(ifa.address.as_ref()) else {
            continue;
        };
        let prefix = sockaddr_ipv4(ifa.netmask.as_ref()).map_or(32, |m| u32::from(m).count_ones());
        let name = ifa
            .interface_name
            .split(':')
            .next()
            .unwrap_or_default()
            .to_string();
        out.entry(name)
            .or_default()
            .push(format!("{addr}/{prefix}"));
    }
    Ok(out)
}

/// The IPv4 address in `sa`, if it is an AF_INET address.
fn sockaddr_ipv4(sa: Option<&nix::sys::socket::SockaddrStorage>) -> Option<Ipv4Addr> {
    Some(sa?.as_sockaddr_in()?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use tempfile::TempDir;

    /// A fake `/sys/class/net` plus route file in a temporary directory.
    struct Fake {
        dir: TempDir,
    }

    impl Fake {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            fs::create_dir(dir.path().join("net")).unwrap();
            fs::write(dir.path().join("route"), ROUTE_HEADER).unwrap();
            Self { dir }
        }

        fn paths(&self) -> HostPaths {
            HostPaths {
                sys_class_net: self.dir.path().join("net"),
                proc_net_route: self.dir.path().join("route"),
                veths: ["vpeer".to_string()].into(),
            }
        }

        /// An interface with the attributes every interface has.
        fn iface(
            &self,
            name: &str,
            arphrd: u32,
            ifindex: u32,
            iflink: u32,
            devtype: Option<&str>,
        ) -> PathBuf {
            let d = self.dir.path().join("net").join(name);
            fs::create_dir(&d).unwrap();
            fs::write(d.join("type"), format!("{arphrd}\n")).unwrap();
            fs::write(d.join("ifindex"), format!("{ifindex}\n")).unwrap();
            fs::write(d.join("iflink"), format!("{iflink}\n")).unwrap();
            let mut uevent = String::new();
            if let Some(t) = devtype {
                uevent.push_str(&format!("DEVTYPE={t}\n"));
            }
            uevent.push_str(&format!("INTERFACE={name}\nIFINDEX={ifindex}\n"));
            fs::write(d.join("uevent"), uevent).unwrap();
            let mac = if arphrd == ARPHRD_ETHER {
                format!("52:54:00:00:00:{ifindex:02x}\n")
            } else if arphrd == ARPHRD_LOOPBACK {
                "00:00:00:00:00:00\n".to_string()
            } else {
                "\n".to_string()
            };
            fs::write(d.join("address"), mac).unwrap();
            fs::write(d.join("operstate"), "up\n").unwrap();
            d
        }

        fn route(&self, lines: &[&str]) {
            let mut text = ROUTE_HEADER.to_string();
            for l in lines {
                text.push_str(l);
                text.push('\n');
            }
            fs::write(self.dir.path().join("route"), text).unwrap();
        }

        fn discover(&self) -> Vec<HostInterface> {
            discover_at(&self.paths(), &HashMap::new()).unwrap()
        }
    }

    const ROUTE_HEADER: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n";

    fn default_via(iface: &str, metric: u32) -> String {
        format!("{iface}\t00000000\t010200C0\t0003\t0\t0\t{metric}\t00000000\t0\t0\t0")
    }

    fn get<'a>(list: &'a [HostInterface], name: &str) -> &'a HostInterface {
        list.iter().find(|i| i.name == name).unwrap()
    }

    /// A host with one of everything.
    fn zoo() -> Fake {
        let f = Fake::new();
        let eth0 = f.iface("eth0", 1, 2, 2, None);
        symlink(
            "../../../devices/pci0000:00/0000:00:03.0",
            eth0.join("device"),
        )
        .unwrap();

        let wlan0 = f.iface("wlan0", 1, 3, 3, Some("wlan"));
        symlink(
            "../../../devices/pci0000:00/0000:00:14.3",
            wlan0.join("device"),
        )
        .unwrap();
        fs::create_dir(wlan0.join("wireless")).unwrap();
        // Wi-Fi recognised without DEVTYPE too.
        let wlan1 = f.iface("wlan1", 1, 17, 17, None);
        symlink("../../../devices/usb1/1-1", wlan1.join("device")).unwrap();
        symlink("../../ieee80211/phy1", wlan1.join("phy80211")).unwrap();

        let lume0 = f.iface("lume0", 1, 30, 30, Some("bridge"));
        fs::create_dir(lume0.join("bridge")).unwrap();
        fs::write(lume0.join("ifalias"), "lume\n").unwrap();
        let br0 = f.iface("br0", 1, 4, 4, Some("bridge"));
        fs::create_dir(br0.join("bridge")).unwrap();
        fs::create_dir(br0.join("brif")).unwrap();
        symlink("../enp1s0", br0.join("lower_enp1s0")).unwrap();
        let port = f.iface("enp1s0", 1, 5, 5, None);
        symlink(
            "../../../devices/pci0000:00/0000:01:00.0",
            port.join("device"),
        )
        .unwrap();
        symlink("../br0", port.join("master")).unwrap();
        fs::create_dir(port.join("brport")).unwrap();

        let bond0 = f.iface("bond0", 1, 6, 6, Some("bond"));
        fs::create_dir(bond0.join("bonding")).unwrap();
        let slave = f.iface("enp2s0", 1, 7, 7, None);
        symlink(
            "../../../devices/pci0000:00/0000:02:00.0",
            slave.join("device"),
        )
        .unwrap();
        symlink("../bond0", slave.join("master")).unwrap();

        let vlan = f.iface("eth0.10", 1, 8, 2, Some("vlan"));
        symlink("../eth0", vlan.join("lower_eth0")).unwrap();

        f.iface("veth0", 1, 9, 10, None);

        let tun0 = f.iface("tun0", ARPHRD_NONE, 11, 11, None);
        fs::write(tun0.join("tun_flags"), "0x1001\n").unwrap();
        let tap0 = f.iface("tap0", 1, 12, 12, None);
        fs::write(tap0.join("tun_flags"), "0x1002\n").unwrap();

        f.iface("wg0", ARPHRD_NONE, 13, 13, Some("wireguard"));
        let lo = f.iface("lo", ARPHRD_LOOPBACK, 1, 1, None);
        fs::write(lo.join("operstate"), "unknown\n").unwrap();

        let mvt = f.iface("macvtap0", 1, 14, 2, None);
        fs::create_dir(mvt.join("macvtap")).unwrap();
        symlink("../eth0", mvt.join("lower_eth0")).unwrap();
        let mv = f.iface("mv0", 1, 15, 2, None);
        symlink("../eth0", mv.join("lower_eth0")).unwrap();

        f.iface("dummy0", 1, 16, 16, None);
        // A veth whose peer, in another namespace, has the same index: only
        // the kernel's link kind tells it from a dummy.
        f.iface("vpeer", 1, 17, 17, None);
        f.iface("sit0", ARPHRD_SIT, 18, 18, None);
        // Not an interface.
        fs::write(f.dir.path().join("net/bonding_masters"), "bond0\n").unwrap();
        f
    }

    #[test]
    fn classifies_every_kind() {
        use InterfaceType::*;
        let list = zoo().discover();
        let table: Vec<(&str, InterfaceType, bool)> = list
            .iter()
            .map(|i| (i.name.as_str(), i.kind.clone(), i.bridgeable))
            .collect();
        assert_eq!(
            table,
            vec![
                ("bond0", Bond, true),
                ("br0", Bridge, true),
                ("dummy0", Other, false),
                ("enp1s0", Ethernet, false),
                ("enp2s0", Ethernet, false),
                ("eth0", Ethernet, true),
                ("eth0.10", Vlan, true),
                ("lo", Loopback, false),
                ("lume0", Bridge, false),
                ("macvtap0", Macvlan, false),
                ("mv0", Macvlan, false),
                ("sit0", Tun, false),
                ("tap0", Tap, false),
                ("tun0", Tun, false),
                ("veth0", Veth, true),
                ("vpeer", Veth, true),
                ("wg0", Tun, false),
                ("wlan0", Wifi, false),
                ("wlan1", Wifi, false),
            ]
        );
        for i in &list {
            assert_eq!(i.bridgeable, i.reason.is_none(), "{}", i.name);
        }
    }

    #[test]
    fn reasons_and_attributes() {
        let list = zoo().discover();
        let reason = |n: &str| get(&list, n).reason.clone().unwrap();
        assert_eq!(
            reason("enp1s0"),
            "already part of bridge br0: use bridged:br0"
        );
        assert_eq!(
            reason("enp2s0"),
            "already part of bond bond0: use bridged:bond0"
        );
        assert_eq!(get(&list, "enp1s0").master.as_deref(), Some("br0"));
        assert!(reason("wlan0").starts_with("Wi-Fi cannot be bridged"));
        assert!(reason("tun0").starts_with("tunnel (VPN) interface"));
        assert!(reason("wg0").starts_with("tunnel (VPN) interface"));
        assert!(reason("tap0").contains("another VM"));
        assert!(reason("lo").starts_with("loopback"));
        assert!(reason("macvtap0").contains("macvlan/macvtap of eth0"));

        let eth0 = get(&list, "eth0");
        assert_eq!(eth0.mac_address.as_deref(), Some("52:54:00:00:00:02"));
        assert_eq!(eth0.state, "up");
        assert_eq!(get(&list, "lo").mac_address, None);
        assert_eq!(get(&list, "lo").state, "unknown");
        assert_eq!(get(&list, "tun0").mac_address, None);
        assert!(list.iter().all(|i| !i.is_default));
    }

    #[test]
    fn addresses_and_json() {
        let f = zoo();
        let ipv4 = HashMap::from([("eth0".to_string(), vec!["192.0.2.10/24".to_string()])]);
        let list = discover_at(&f.paths(), &ipv4).unwrap();
        let eth0 = get(&list, "eth0");
        assert_eq!(eth0.ipv4, vec!["192.0.2.10/24"]);
        let json = serde_json::to_value(eth0).unwrap();
        assert_eq!(json["type"], "ethernet");
        assert_eq!(json["macAddress"], "52:54:00:00:00:02");
        assert_eq!(json["isDefault"], false);
        assert_eq!(json["reason"], serde_json::Value::Null);
        assert!(json.get("master").is_none());
    }

    #[test]
    fn default_route_lowest_metric() {
        let f = zoo();
        f.route(&[
            "eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0",
            &default_via("bond0", 600),
            &default_via("eth0", 100),
            // Not up: ignored.
            "br0\t00000000\t010200C0\t0002\t0\t0\t0\t00000000\t0\t0\t0",
        ]);
        let list = f.discover();
        let defaults: Vec<&str> = list
            .iter()
            .filter(|i| i.is_default)
            .map(|i| i.name.as_str())
            .collect();
        assert_eq!(defaults, vec!["eth0"]);
        assert_eq!(choose_default(&list).unwrap().name, "eth0");
    }

    #[test]
    fn choose_default_skips_vpn_default_route() {
        let f = zoo();
        // The VPN's tunnel carries the default route; the uplink is eth0.
        f.route(&[&default_via("tun0", 0), &default_via("eth0", 100)]);
        let ipv4 = HashMap::from([
            ("eth0".to_string(), vec!["192.0.2.10/24".to_string()]),
            ("tun0".to_string(), vec!["198.51.100.2/32".to_string()]),
        ]);
        let list = discover_at(&f.paths(), &ipv4).unwrap();
        assert!(get(&list, "tun0").is_default);
        assert!(!get(&list, "eth0").is_default);
        assert_eq!(choose_default(&list).unwrap().name, "eth0");

        // Same with only the tunnel's default route: bond0 and br0 come
        // first by name, but a down bond or bridge loses to an up ethernet.
        f.route(&[&default_via("wg0", 0)]);
        fs::write(f.dir.path().join("net/bond0/operstate"), "down\n").unwrap();
        let list = f.discover();
        assert!(get(&list, "wg0").is_default);
        assert_eq!(choose_default(&list).unwrap().name, "eth0");
    }

    #[test]
    fn choose_default_none_bridgeable() {
        let f = Fake::new();
        f.iface("lo", ARPHRD_LOOPBACK, 1, 1, None);
        let wlan = f.iface("wlan0", 1, 2, 2, Some("wlan"));
        fs::create_dir(wlan.join("wireless")).unwrap();
        f.iface("wg0", ARPHRD_NONE, 3, 3, Some("wireguard"));
        f.route(&[&default_via("wg0", 0)]);
        let list = f.discover();
        let err = choose_default(&list).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("No host interface can be bridged: "),
            "{msg}"
        );
        assert!(msg.contains("wlan0 (Wi-Fi cannot be bridged"), "{msg}");
        assert!(msg.contains("wg0 (tunnel (VPN) interface"), "{msg}");
        assert!(msg.contains("lo (loopback"), "{msg}");
        assert!(
            msg.ends_with("Use --network nat or --network user instead"),
            "{msg}"
        );

        let err = check_bridgeable(&list, "eth0").unwrap_err();
        assert_eq!(
            err.to_string(),
            "Interface 'eth0' does not exist on this host: This host has no bridgeable interface: use --network nat or --network user"
        );
    }

    #[test]
    fn check_bridgeable_errors_list_alternatives() {
        let list = zoo().discover();
        assert_eq!(check_bridgeable(&list, "br0").unwrap().name, "br0");
        assert_eq!(check_bridgeable(&list, "veth0").unwrap().name, "veth0");

        let err = check_bridgeable(&list, "eth9").unwrap_err();
        assert_eq!(
            err,
            BridgeError::NoSuchInterface {
                name: "eth9".to_string(),
                bridgeable: ["bond0", "br0", "eth0", "eth0.10", "veth0", "vpeer"]
                    .map(String::from)
                    .to_vec(),
            }
        );
        assert_eq!(
            err.to_string(),
            "Interface 'eth9' does not exist on this host: Bridgeable interfaces: bond0, br0, eth0, eth0.10, veth0, vpeer (use bridged:<interface>), or use --network nat or --network user"
        );

        let msg = check_bridgeable(&list, "enp1s0").unwrap_err().to_string();
        assert!(
            msg.starts_with("Interface 'enp1s0' cannot be bridged: already part of bridge br0: use bridged:br0. Bridgeable interfaces: bond0, br0,"),
            "{msg}"
        );
        let msg = check_bridgeable(&list, "wlan0").unwrap_err().to_string();
        assert!(msg.contains("Wi-Fi cannot be bridged"), "{msg}");
        assert!(
            msg.contains("Bridgeable interfaces: bond0, br0, eth0"),
            "{msg}"
        );
    }

    #[test]
    fn route_file_missing_means_no_default() {
        let f = zoo();
        fs::remove_file(f.dir.path().join("route")).unwrap();
        assert!(f.discover().iter().all(|i| !i.is_default));
        let err = discover_at(
            &HostPaths {
                sys_class_net: f.dir.path().join("nope"),
                proc_net_route: f.dir.path().join("route"),
                veths: Default::default(),
            },
            &HashMap::new(),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("Cannot list network interfaces in ")
        );
    }

    #[test]
    fn parses_route_table() {
        let text = format!(
            "{ROUTE_HEADER}{}\n{}\nbad line\n",
            default_via("a", 5),
            default_via("b", 1)
        );
        assert_eq!(default_route_interface(&text).as_deref(), Some("b"));
        assert_eq!(default_route_interface(ROUTE_HEADER), None);
    }

    #[test]
    fn real_host_loopback() {
        let list = discover().unwrap();
        let lo = get(&list, "lo");
        assert_eq!(lo.kind, InterfaceType::Loopback);
        assert!(!lo.bridgeable);
        assert!(lo.reason.is_some());
        assert!(lo.ipv4.iter().any(|a| a == "127.0.0.1/8"), "{:?}", lo.ipv4);
    }
}
