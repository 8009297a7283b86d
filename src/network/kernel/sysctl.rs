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
