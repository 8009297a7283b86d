//! The network sysctls lume switches: IPv4 forwarding for NAT (put back as
//! it was when the last NAT VM leaves) and IPv6 on lume's bridges.

use std::fs;
use std::io;
use std::path::Path;

/// The IPv4 forwarding switch.
pub const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Switches IPv6 off on a lume bridge (lume gives no IPv6 there): the host
/// then takes no router advertisement, redirect or address from a guest,
/// even while lume's bridge table is being rewritten. Whether it was on.
pub fn ipv6_off(bridge: &str) -> bool {
    let path = format!("/proc/sys/net/ipv6/conf/{bridge}/disable_ipv6");
    match fs::read_to_string(&path) {
        Ok(v) if v.trim() == "1" => false,
        Ok(_) => fs::write(&path, "1").is_ok(),
        // No IPv6 in this kernel (or no such bridge): nothing to switch off.
        Err(_) => false,
    }
}

/// Whether IPv4 forwarding is off (`false` when it cannot be read).
pub fn forwarding_off() -> bool {
    fs::read_to_string(IP_FORWARD)
        .map(|v| v.trim() != "1")
        .unwrap_or(false)
}

/// Switches IPv4 forwarding on.
pub fn forwarding_set_on() -> io::Result<()> {
    fs::write(IP_FORWARD, "1")
}

/// Switches IPv4 forwarding on, remembering in `dir` the value it had.
pub fn forwarding_on(dir: &Path) -> io::Result<()> {
    let saved = dir.join("ip_forward.saved");
    let current = fs::read_to_string(IP_FORWARD)?;
    if !saved.exists() {
        fs::write(&saved, current.trim())?;
        let _ = crate::network::rundir::private_file(&saved);
    }
    if current.trim() != "1" {
        fs::write(IP_FORWARD, "1")?;
    }
    Ok(())
}

/// Puts IPv4 forwarding back to what it was (remembered in `dir`) before
/// lume needed it.
pub fn forwarding_restore(dir: &Path) {
    let saved = dir.join("ip_forward.saved");
    if let Ok(v) = fs::read_to_string(&saved) {
        let _ = fs::write(IP_FORWARD, v.trim());
        let _ = fs::remove_file(&saved);
    }
}

/// The IPv6 forwarding switch (writing it sets every interface's).
pub const IP6_FORWARD: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

fn conf6(interface: &str, key: &str) -> String {
    format!("/proc/sys/net/ipv6/conf/{interface}/{key}")
}

/// What a lume bridge with IPv6 must never do with what its guests send:
/// take a router advertisement (a guest would become the host's router),
/// configure an address from one, follow a redirect; and it skips
/// duplicate address detection on its own addresses (they are lume's), and
/// makes no link-local address of its own: lume gives it `fe80::1`, which
/// the bridge guard keeps every guest from claiming.
/// IPv6 itself is switched on last.
const BRIDGE6_ON: [(&str, &str); 7] = [
    ("accept_ra", "0"),
    ("autoconf", "0"),
    ("accept_redirects", "0"),
    ("accept_dad", "0"),
    ("addr_gen_mode", "1"),
    ("router_solicitations", "0"),
    ("disable_ipv6", "0"),
];

/// Switches IPv6 on for a lume bridge with an IPv6 network, its
/// protections ([`BRIDGE6_ON`]) first. Whether anything had to change.
pub fn ipv6_bridge_on(bridge: &str) -> io::Result<bool> {
    let wrong = ipv6_bridge_off_settings(bridge)?;
    for (key, want) in &wrong {
        fs::write(conf6(bridge, key), want)?;
    }
    Ok(!wrong.is_empty())
}

/// The settings of a lume bridge with IPv6 that are not as
/// [`ipv6_bridge_on`] leaves them, with the value it sets, in its order
/// (`disable_ipv6` last).
pub fn ipv6_bridge_off_settings(bridge: &str) -> io::Result<Vec<(&'static str, &'static str)>> {
    let mut wrong = Vec::new();
    for (key, want) in BRIDGE6_ON {
        if fs::read_to_string(conf6(bridge, key))?.trim() != want {
            wrong.push((key, want));
        }
    }
    Ok(wrong)
}

/// Whether IPv6 forwarding is off (`false` when it cannot be read).
pub fn forwarding6_off() -> bool {
    fs::read_to_string(IP6_FORWARD)
        .map(|v| v.trim() != "1")
        .unwrap_or(false)
}

/// The interfaces (and `default`, which new ones copy) that take router
/// advertisements as a host (`accept_ra` 1): with forwarding on they would
/// stop, and the host would lose the IPv6 routes it learns from its
/// network's router.
fn hosts_taking_advertisements() -> Vec<String> {
    let Ok(dir) = fs::read_dir("/proc/sys/net/ipv6/conf") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name != "all")
        .filter(|name| fs::read_to_string(conf6(name, "accept_ra")).is_ok_and(|v| v.trim() == "1"))
        .collect()
}

/// Switches IPv6 forwarding on, remembering in `dir` what it changed: the
/// forwarding switch, and `accept_ra` 1 → 2 on every interface (and
/// `default`) that takes router advertisements, so the host keeps taking
/// them with forwarding on.
pub fn forwarding6_on(dir: &Path) -> io::Result<()> {
    let saved = dir.join("ip6_forward.saved");
    let current = fs::read_to_string(IP6_FORWARD)?;
    let mut record = if saved.exists() {
        fs::read_to_string(&saved)?
    } else {
        format!("all/forwarding={}\n", current.trim())
    };
    if current.trim() == "1" {
        // On already (a router, Docker with IPv6): the host's interfaces
        // take advertisements as their owner set them; nothing to change.
        if !saved.exists() {
            crate::util::atomic::write_runtime(&saved, record.as_bytes())?;
        }
        return Ok(());
    }
    // Everything recorded before anything changes: a kill at any point
    // leaves a record that puts back at most what is already so.
    let planned = hosts_taking_advertisements();
    for name in &planned {
        record.push_str(&format!("{name}/accept_ra=1\n"));
    }
    crate::util::atomic::write_runtime(&saved, record.as_bytes())?;
    for name in &planned {
        match fs::write(conf6(name, "accept_ra"), "2") {
            // Gone since it was listed: nothing to keep taking.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            other => other?,
        }
    }
    fs::write(IP6_FORWARD, "1")
}

/// Puts back what [`forwarding6_on`] changed, forwarding first (so the
/// interfaces' `accept_ra` 1 means what it meant before).
pub fn forwarding6_restore(dir: &Path) {
    let saved = dir.join("ip6_forward.saved");
    let Ok(text) = fs::read_to_string(&saved) else {
        return;
    };
    let mut lines: Vec<(&str, &str)> = text.lines().filter_map(|l| l.split_once('=')).collect();
    lines.sort_by_key(|(k, _)| *k != "all/forwarding");
    for (key, value) in lines {
        // Only names as written above: INTERFACE/accept_ra or all/forwarding.
        let Some((interface, what)) = key.split_once('/') else {
            continue;
        };
        if interface.contains("..") || !["accept_ra", "forwarding"].contains(&what) {
            continue;
        }
        let _ = fs::write(conf6(interface, what), value);
    }
    let _ = fs::remove_file(&saved);
}
