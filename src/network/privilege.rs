//! Privilege checks: the modes that create host devices need CAP_NET_ADMIN.

/// CAP_NET_ADMIN's bit in the capability sets.
const CAP_NET_ADMIN: u32 = 12;

/// Whether this process has CAP_NET_ADMIN in its effective set.
pub fn has_net_admin() -> bool {
    effective_caps().is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

fn effective_caps() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}
