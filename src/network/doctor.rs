//! `lume network doctor`: one line per check of the host and every running
//! VM, each failed check saying what to do. Exit status 0 when all pass.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::interfaces;
use super::privilege::has_net_admin;
use super::shared::{Member, Networks};
use crate::firewall::foreign::{Finding, FindingKind};
use crate::firewall::nft::Nft;
use crate::firewall::{FirewallDriver, ForeignDrop};
use crate::vm::Context;
use crate::vm::details::{guest_address, policy_in_force};
use crate::vm::lock::VmLock;

/// One check.
#[derive(Debug, Clone, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    /// What was found, for a person (a VM's policy as readable rules:
    /// `allow-out 198.51.100.2/32:8000/tcp; isolate`).
    pub detail: String,
    /// A VM's policy check only: the policy as in VMDetails'
    /// `network.policy` (`{allowOut, denyOut, isolate}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub policy: Option<super::policy::Policy>,
}

/// Every check, in order.
#[derive(Debug, Clone, Serialize, Default, utoipa::ToSchema)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    fn add(&mut self, name: impl Into<String>, ok: bool, detail: impl Into<String>) {
        self.checks.push(Check {
            name: name.into(),
            ok,
            detail: detail.into(),
            policy: None,
        });
    }

    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }
}

/// The `/dev/net/tun` check: a device this user may not open is a matter
/// of rights (only nat, host and bridged need it), not a missing module.
fn tun_verdict(open: Result<(), &std::io::Error>, admin: bool) -> (bool, String) {
    match open {
        Ok(()) => (true, "present".to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied && !admin => (
            true,
            "present, but only root may open it: nat, host and bridged need root (run lume as root); network user needs no tun device".to_string(),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => (
            false,
            format!("cannot open it ({e}): check its permissions (crw-rw-rw- root:root, or at least root's read and write)"),
        ),
        Err(e) => (
            false,
            format!("cannot open it ({e}): load the tun module (modprobe tun)"),
        ),
    }
}

/// On the PATH, or where root's tools live (dnsmasq and nft are in
/// /usr/sbin, which a user's PATH often lacks; lume's service finds them).
fn in_path(binary: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(std::path::PathBuf::from))
        .any(|d| d.join(binary).is_file())
}

/// How long the doctor waits for the guests, all probed at once: one
/// deadline for every probe, whatever the number of VMs.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(1);

/// What probing a guest's address found.
#[derive(Debug)]
enum Probe {
    /// A TCP connection to the SSH port was accepted or refused: the
    /// guest's stack is alive (the SSH port, because a network policy lets
    /// the guest answer the host there).
    Answered,
    /// Nothing came back before the doctor's deadline.
    TimedOut,
    /// The connection failed otherwise (no route, host unreachable).
    Failed(std::io::Error),
}

/// Probes `ip` until `deadline`.
fn probe(ip: Ipv4Addr, deadline: Instant) -> Probe {
    let to = SocketAddr::from((ip, crate::guest::ssh::SSH_PORT));
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Probe::TimedOut;
    }
    match TcpStream::connect_timeout(&to, left) {
        Ok(_) => Probe::Answered,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Probe::Answered,
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Probe::TimedOut,
        Err(e) => Probe::Failed(e),
    }
}

/// Probes every address at once, under one deadline [`PROBE_DEADLINE`]
/// from now; the results in the order of `ips`.
fn probe_all(ips: &[Ipv4Addr]) -> Vec<Probe> {
    let deadline = Instant::now() + PROBE_DEADLINE;
    std::thread::scope(|scope| {
        let handles: Vec<_> = ips
            .iter()
            .map(|&ip| {
                std::thread::Builder::new()
                    .name("lume-doctor-probe".into())
                    .spawn_scoped(scope, move || probe(ip, deadline))
            })
            .collect();
        handles
            .into_iter()
            .zip(ips)
            .map(|(h, &ip)| match h {
                Ok(h) => h.join().unwrap_or(Probe::TimedOut),
                // No thread to be had: probe here, within what is left.
                Err(_) => probe(ip, deadline),
            })
            .collect()
    })
}

/// The check of a guest whose address was probed.
fn probe_verdict(ip: Ipv4Addr, mode: &str, p: &Probe) -> (bool, String) {
    match p {
        Probe::Answered => (true, format!("{ip} answers ({mode})")),
        Probe::TimedOut => (
            false,
            format!(
                "{ip} does not answer ({mode}): no reply within {} s; check the guest's firewall and console.log, and the checks above",
                PROBE_DEADLINE.as_secs_f32()
            ),
        ),
        Probe::Failed(e) => (
            false,
            format!(
                "{ip} does not answer ({mode}): {e}; check the guest's firewall and console.log, and the checks above"
            ),
        ),
    }
}

/// Runs every check.
pub fn run(ctx: &Context) -> Report {
    run_with(ctx, Arc::new(Nft))
}

/// [`run`] against the firewall `fw`.
fn run_with(ctx: &Context, fw: Arc<dyn FirewallDriver>) -> Report {
    let mut r = Report::default();
    let admin = has_net_admin();
    // Without CAP_NET_ADMIN only user mode (passt) and none can start: that
    // is this user's setup, not a fault, when passt is there; what needs
    // root is reported as such, and passes.
    let user_mode = in_path("passt");
    let service = (!admin).then(|| {
        let path = super::handoff::socket_path();
        (
            std::os::unix::net::UnixStream::connect(&path).map(drop),
            path,
        )
    });
    r.add(
        "privileges",
        admin || user_mode,
        if admin {
            "CAP_NET_ADMIN present: nat, host and bridged can start".to_string()
        } else if let Some((Ok(()), path)) = &service {
            format!(
                "no CAP_NET_ADMIN: nat, host and bridged go through lume's service, which answers on {}; network user and none run directly",
                path.display()
            )
        } else if let Some((Err(e), path)) = &service
            && e.kind() != std::io::ErrorKind::NotFound
        {
            format!(
                "no CAP_NET_ADMIN, and lume's service socket {} refuses this user ({e}): nat, host and bridged need the service (group lume, see `lume run`'s message) or root; network user and none work",
                path.display()
            )
        } else if user_mode {
            "no CAP_NET_ADMIN: network user (and none) work; nat, host and bridged need root (or setcap cap_net_admin,cap_net_raw+ep on the binary)".to_string()
        } else {
            "no CAP_NET_ADMIN and no passt: no network mode but none can start; install passt (apt-get install passt) for network user, or run lume as root for nat, host and bridged".to_string()
        },
    );
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun");
    let (ok, detail) = tun_verdict(tun.as_ref().map(drop), admin);
    r.add("/dev/net/tun", ok, detail);
    for (binary, package) in [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("qemu-img", "qemu-utils"),
        ("passt", "passt"),
        ("dnsmasq", "dnsmasq-base"),
        ("nft", "nftables"),
    ] {
        let found = in_path(binary);
        r.add(
            binary,
            found,
            if found {
                "found".to_string()
            } else {
                format!("not found: apt-get install {package}")
            },
        );
    }

    let nets = Networks::from_settings(&ctx.settings).map(|n| n.with_firewall(fw.clone()));
    match &nets {
        // lume's networks are root's (its runtime directory is private):
        // a user cannot see their members, not even their own VMs'.
        Ok(_) if !admin => r.add(
            "lume's networks",
            true,
            "not visible to this user: root (lume's service) runs them; `sudo lume network doctor` checks the bridges, dnsmasq and the firewall",
        ),
        Ok(nets) => shared_checks(&mut r, nets),
        Err(e) => r.add("network settings", false, crate::error_chain(e)),
    }

    let drops = fw.foreign_drops();
    match (&drops, &nets) {
        (Ok(drops), Ok(nets)) => foreign_checks(&mut r, drops, nets),
        (Ok(_), Err(_)) => {}
        (Err(_), _) if !admin => r.add(
            "other firewalls",
            true,
            "Listing the firewall needs root: run `sudo lume network doctor` to check it (network user does not use the host's firewall)",
        ),
        (Err(e), _) => r.add(
            "other firewalls",
            false,
            format!("Cannot list the ruleset: {e}"),
        ),
    }
    if let Ok(nets) = &nets {
        legacy_check(&mut r, nets);
    }
    let brnf = std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables")
        .map(|v| v.trim() == "1")
        .unwrap_or(false);
    // Base chains at the forward hook (not the bridge family's) whose
    // policy drops: with br_netfilter they see frames bridged between the
    // ports of a Linux bridge, with that bridge as input and output.
    let forward_drops: Vec<&ForeignDrop> = drops
        .as_deref()
        .unwrap_or_default()
        .iter()
        .filter(|d| d.hook == "forward" && d.family != "bridge" && d.how == "policy drop")
        .collect();
    // The Linux bridges running VMs' taps sit in (not those on a plain
    // interface, whose tap is joined to a macvlan and bypasses the bridge
    // code), each with the chains that drop its frames: none where a rule
    // of the user's in the tool's chain (DOCKER-USER, ufw-user-forward)
    // accepts the bridge by name.
    let mut bridges: Vec<String> = ctx
        .store
        .list()
        .unwrap_or_default()
        .iter()
        .filter_map(|vm| vm.running_state())
        .filter_map(|s| super::driver::of(&s.network_mode).host_bridge(&s))
        .collect();
    bridges.sort();
    bridges.dedup();
    // Chains where lume's own accept for the bridge sits (it keeps one in
    // DOCKER-USER, ufw's and firewalld's forward chains while a VM is
    // bridged onto it): another tool's policy lume accommodated.
    let accommodated: Vec<(&String, Vec<String>)> = bridges
        .iter()
        .map(|b| {
            let places = forward_drops
                .iter()
                .filter_map(|d| d.accommodated_for(&[b.as_str()]))
                .collect::<Vec<_>>();
            (b, places)
        })
        .filter(|(_, p)| !p.is_empty())
        .collect();
    let dropped: Vec<(&String, Vec<String>)> = bridges
        .iter()
        .map(|b| {
            let chains = forward_drops
                .iter()
                .filter(|d| {
                    d.user_accepted_for(&[b.as_str()]).is_none()
                        && d.accommodated_for(&[b.as_str()]).is_none()
                })
                .map(|d| format!("table {} {} chain {}", d.family, d.table, d.chain))
                .collect::<Vec<_>>();
            (b, chains)
        })
        .filter(|(_, c)| !c.is_empty())
        .collect();
    let accommodate = nets.as_ref().is_ok_and(|n| n.accommodate);
    r.add(
        "br_netfilter",
        !brnf || dropped.is_empty(),
        br_netfilter_detail(
            brnf,
            !forward_drops.is_empty(),
            &bridges,
            &dropped,
            &accommodated,
            accommodate,
        ),
    );

    match interfaces::discover() {
        Ok(list) => {
            let detail = match list.iter().find(|i| i.is_default) {
                Some(i) if i.bridgeable => {
                    format!("{} carries the default route and can be bridged", i.name)
                }
                Some(i) => format!(
                    "{} carries the default route and cannot be bridged ({}); plain `bridged` uses {}",
                    i.name,
                    i.reason.as_deref().unwrap_or("unknown reason"),
                    interfaces::choose_default(&list)
                        .map(|c| c.name.clone())
                        .unwrap_or_else(|_| "no interface: use nat or user".into())
                ),
                None => "no IPv4 default route".to_string(),
            };
            r.add("default route", true, detail);
        }
        Err(e) => r.add("default route", false, crate::error_chain(&e)),
    }

    vm_checks(&mut r, ctx);
    if let Ok(nets) = &nets {
        let log = super::heal::repairs_log(nets);
        if let Ok(text) = std::fs::read_to_string(&log) {
            let recent: Vec<&str> = text.lines().rev().take(5).collect();
            if !recent.is_empty() {
                r.add(
                    "recent repairs",
                    true,
                    format!(
                        "{} (full log: {})",
                        recent.into_iter().rev().collect::<Vec<_>>().join(" | "),
                        log.display()
                    ),
                );
            }
        }
    }
    r
}

/// Whether the NAT dnsmasq forwards to the resolvers the host uses now.
fn dns_check(r: &mut Report, net: &super::shared::SharedNet) {
    use super::resolvers::{HOST_RESOLV_CONF, host_servers};
    let name = format!("dns {}", net.bridge);
    let given = net.dnsmasq().servers().unwrap_or_default().join(", ");
    let file = resolv_conf_named(std::path::Path::new(HOST_RESOLV_CONF));
    let (ok, detail) = dns_verdict(
        &file,
        &given,
        host_servers(std::path::Path::new(HOST_RESOLV_CONF)),
    );
    r.add(name, ok, detail);
}

/// How the doctor names the resolv.conf it compared: the path, and where
/// a symlink leads (`/etc/resolv.conf -> /run/systemd/resolve/stub-resolv.conf`).
fn resolv_conf_named(path: &std::path::Path) -> String {
    match std::fs::canonicalize(path) {
        Ok(real) if real != path => format!("{} -> {}", path.display(), real.display()),
        _ => path.display().to_string(),
    }
}

/// The `dns` check: `file` as the doctor names it, `given` the servers
/// dnsmasq forwards to, `host` what that file names.
fn dns_verdict(
    file: &str,
    given: &str,
    host: Result<Vec<String>, std::io::Error>,
) -> (bool, String) {
    match host {
        Ok(host) if host.join(", ") == given => (
            true,
            format!("guests' queries go to the host's resolvers as {file} names them: {given}"),
        ),
        Ok(host) => (
            false,
            format!(
                "dnsmasq forwards to {} but {file}, as this doctor's process sees it, names {}: lume's watcher updates it within a second; if this stays, check that a watcher runs, and whether the VMs' lume runs in another mount namespace (a systemd unit with a private /etc) that sees another resolv.conf — then this check compares the wrong file: run the doctor in that namespace (`nsenter -m -t PID lume network doctor`, PID being `pid` in a running VM's run.json)",
                if given.is_empty() { "nothing" } else { given },
                host.join(", ")
            ),
        ),
        Err(e) => (
            false,
            format!("Cannot read {file} ({e}): guests keep the servers {given}; restore the file"),
        ),
    }
}

/// Other tables' drops: accommodated ones (lume's accepts sit in the chain
/// that tool keeps for them) pass naming the tool and chain; any other drop
/// of lume's traffic (a VPN kill switch) fails: lume must not override it.
/// Then each rule met on the way that drops some of that traffic, named
/// with its chain: another tool's policy lume accommodated, a rule of yours
/// in a tool's chain that lume's accepts come after, or a policy lume must
/// not override (lume keeps its accepts out of a chain whose accept would
/// bypass it).
fn foreign_checks(r: &mut Report, drops: &[ForeignDrop], nets: &Networks) {
    let active = nets.active_bridges();
    let mut any = false;
    for d in drops {
        let bridges = nets.bridges_for_hook(&d.family, &d.hook);
        if active.is_empty() {
            if d.family != "ip6" && d.affects(&[nets.nat.bridge.as_str()]) {
                any = true;
                r.add(
                    "other firewalls",
                    true,
                    format!(
                        "{d}: no NAT or host-only VM runs now; {}",
                        match (is_tool_table(d), nets.accommodate) {
                            (true, true) => "lume puts its accepts in this tool's chain while they run",
                            (true, false) => "it would drop their traffic: firewallAccommodation is false, so lume leaves this tool's chain alone",
                            (false, _) => "it would drop their traffic, and lume does not override it",
                        }
                    ),
                );
            }
            continue;
        }
        if bridges.is_empty() || !d.affects(&bridges) {
            continue;
        }
        any = true;
        let findings = d.findings(&bridges, nets.accommodate);
        let (ok, detail) = foreign_verdict(d, &bridges, nets.accommodate, &findings);
        r.add("other firewalls", ok, detail);
        let list = bridges.join(" and ");
        for f in &findings {
            r.add(
                "other firewalls",
                !f.fails(),
                format!(
                    "table {} {} chain {} ({} hook): {}",
                    d.family,
                    d.table,
                    d.chain,
                    d.hook,
                    f.describe(&list)
                ),
            );
        }
    }
    if !any {
        r.add(
            "other firewalls",
            true,
            "no other table drops traffic of lume's bridges",
        );
    }
}

/// The policies of `INPUT` and `FORWARD` in an `iptables-save -t filter`
/// text (`:FORWARD DROP [0:0]`), and whether any rule names `bridge`
/// as its in- or out-interface with an ACCEPT (the admin's own accepts).
fn legacy_policies(save: &str, bridge: &str) -> (Option<String>, Option<String>, bool) {
    let mut input = None;
    let mut forward = None;
    let mut accepted = false;
    for line in save.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some(":INPUT") => input = words.next().map(str::to_string),
            Some(":FORWARD") => forward = words.next().map(str::to_string),
            Some("-A") => {
                let w: Vec<&str> = line.split_whitespace().collect();
                let names = w
                    .windows(2)
                    .any(|p| matches!(p[0], "-i" | "-o") && p[1] == bridge);
                let accept = w.windows(2).any(|p| p == ["-j", "ACCEPT"]);
                accepted |= names && accept;
            }
            _ => {}
        }
    }
    (input, forward, accepted)
}

/// Rules in iptables-legacy (Docker or ufw on a host whose `iptables` is
/// the legacy one) live outside nftables: lume neither sees nor
/// accommodates them, yet a `FORWARD` or `INPUT` policy DROP there drops
/// lume's guests' traffic all the same. The kernel lists the legacy tables
/// that exist in `/proc/net/ip_tables_names`.
fn legacy_check(r: &mut Report, nets: &Networks) {
    let tables = std::fs::read_to_string("/proc/net/ip_tables_names").unwrap_or_default();
    if !tables.lines().any(|t| t.trim() == "filter") {
        return;
    }
    let name = "iptables-legacy";
    let nat = nets.nat.bridge.as_str();
    let host = nets.host.bridge.as_str();
    let save = std::process::Command::new("iptables-legacy-save")
        .args(["-t", "filter"])
        .output();
    let save = match save {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).into_owned(),
        _ => {
            r.add(
                name,
                false,
                "the kernel has an iptables-legacy filter table, which lume cannot see or accommodate, and iptables-legacy-save cannot list it: run `iptables-legacy -S` to check that its INPUT and FORWARD policies do not drop lume's traffic (apt-get install iptables)",
            );
            return;
        }
    };
    let (input, forward, accepted) = legacy_policies(&save, nat);
    let drops = |p: &Option<String>| p.as_deref().is_some_and(|p| p == "DROP");
    let hooks: Vec<&str> = [("FORWARD", drops(&forward)), ("INPUT", drops(&input))]
        .into_iter()
        .filter(|(_, d)| *d)
        .map(|(h, _)| h)
        .collect();
    if hooks.is_empty() {
        r.add(
            name,
            true,
            "an iptables-legacy filter table exists; its INPUT and FORWARD policies accept (lume does not see its rules)",
        );
    } else if accepted {
        r.add(
            name,
            true,
            format!(
                "iptables-legacy's filter table has policy DROP on {} and rules of yours accepting {nat}: lume does not see or accommodate legacy rules, so they must keep letting its guests' traffic through",
                hooks.join(" and ")
            ),
        );
    } else {
        r.add(
            name,
            false,
            format!(
                "iptables-legacy's filter table has policy DROP on {} (Docker or ufw using iptables-legacy?): it drops the traffic of {nat} and {host} (forwarding, DHCP, DNS), and lume cannot see or accommodate legacy rules. Switch the host to iptables-nft (update-alternatives --set iptables /usr/sbin/iptables-nft, then restart Docker or ufw), or accept lume's bridges there yourself (docs/networking.md, \"iptables-legacy\")",
                hooks.join(" and ")
            ),
        );
    }
}

/// Whether a drop of another table that affects `bridges` (active lume
/// bridges) lets their traffic through, and why; `findings`: the rules
/// that drop some of it ([`ForeignDrop::findings`]).
fn foreign_verdict(
    d: &ForeignDrop,
    bridges: &[&str],
    accommodate: bool,
    findings: &[Finding],
) -> (bool, String) {
    let list = bridges.join(" and ");
    let chain = d.tool_chain.as_deref().unwrap_or("that tool's chain");
    if let Some(place) = d.accommodated_for(bridges) {
        return (
            true,
            format!(
                "{d}: another tool's policy, accommodated: lume accepts the traffic of {list} in {place}"
            ),
        );
    }
    if let Some(place) = d.user_accepted_for(bridges).filter(|_| is_tool_table(d)) {
        return (
            true,
            format!(
                "{d}: another tool's policy; rules of your own in {place} accept traffic of {list} (firewallAccommodation is {accommodate}): lume does not check them further — if the VMs' traffic fails, compare them with the rules in docs/networking.md"
            ),
        );
    }
    let withheld: Vec<&str> = findings
        .iter()
        .filter_map(|f| match &f.kind {
            FindingKind::Withheld { targets } => Some(targets.iter().map(String::as_str)),
            _ => None,
        })
        .flatten()
        .collect();
    if accommodate && !withheld.is_empty() {
        let mut places = withheld.clone();
        places.dedup();
        return (
            false,
            format!(
                "{d}: it drops traffic of {list}, and lume keeps its accepts out of {}: a rule after them that is no tool's own (named below) drops some of that traffic, a policy lume must not override — an accept there would bypass it; accept {list} yourself where that rule still applies, or remove the rule",
                places.join(", ")
            ),
        );
    }
    match (accommodate, is_tool_table(d)) {
        (true, true) => (
            false,
            format!(
                "{d}: lume's accepts for {list} are missing from {chain}; lume's watcher puts them back within a second — if this stays, check the watcher below"
            ),
        ),
        (false, true) => (
            false,
            format!(
                "{d}: it drops traffic to or from {list}, and firewallAccommodation is false in config.yaml, so lume leaves {chain} alone: accept {list} there yourself (the rules are in docs/networking.md), or set firewallAccommodation: true"
            ),
        ),
        (_, false) => (
            false,
            format!(
                "{d}: a policy lume must not override (a VPN kill switch or another firewall): it drops traffic to or from {list}; lume does not bypass it — allow {list} there, or use --network user (passt: the guest's traffic leaves as the host's own, through the VPN)"
            ),
        ),
    }
}

/// A drop whose chain leads to one lume accommodates (Docker's, ufw's, firewalld's).
fn is_tool_table(d: &ForeignDrop) -> bool {
    d.tool_chain.is_some()
}

/// Whether lume's table is as lume last wrote it.
fn table_check(r: &mut Report, nets: &Networks) {
    let before = nets.firewall.generation();
    match nets.firewall.listing() {
        Ok(Some(now)) if nets.as_written(&now, before) => {
            r.add("firewall table inet lume", true, "intact")
        }
        Ok(Some(_)) if !nets.root.join("nft.listing").exists() => r.add(
            "firewall table inet lume",
            false,
            "not confirmed as written: nftables changed (by any tool) right after lume's last write, before the watcher's check; the watcher writes lume's tables again within a second — run the doctor again",
        ),
        Ok(Some(_)) => r.add(
            "firewall table inet lume",
            false,
            "changed by something else: lume's watcher restores it",
        ),
        Ok(None) => r.add(
            "firewall table inet lume",
            false,
            "missing: lume's watcher restores it; check nothing keeps flushing the ruleset",
        ),
        Err(e) => r.add("firewall table inet lume", false, e.to_string()),
    }
}

fn shared_checks(r: &mut Report, nets: &Networks) {
    let mut active = false;
    let routes = nets.route_warnings();
    for net in [&nets.nat, &nets.host] {
        let members: Vec<Member> = net
            .members()
            .into_iter()
            .filter(|m| VmLock::is_held(&m.vm_dir.join(".lock")).unwrap_or(false))
            .collect();
        let name = format!("bridge {}", net.bridge);
        if members.is_empty() {
            r.add(name, true, "not in use (no VM of this mode runs)");
            continue;
        }
        active = true;
        let subnet = net.subnet();
        let state = super::kernel::netlink::Netlink::open().and_then(|mut nl| {
            let info = nl.link_info(&net.bridge)?;
            let addrs = match &info {
                Some(_) => nl.addresses_v4(&net.bridge)?,
                None => Vec::new(),
            };
            Ok((info, addrs))
        });
        match state {
            Ok((None, _)) => r.add(
                name,
                false,
                "missing: lume's watcher recreates it; if this stays, restart the VMs",
            ),
            Ok((Some(i), _)) if !i.up => r.add(
                name,
                false,
                "down: lume's watcher sets it up; if this stays, run `ip link set dev BRIDGE up`"
                    .replace("BRIDGE", &net.bridge),
            ),
            Ok((Some(_), addrs)) if !addrs.contains(&(subnet.gateway(), subnet.prefix)) => r.add(
                name,
                false,
                format!(
                    "lacks its address {}/{}: lume's watcher restores it",
                    subnet.gateway(),
                    subnet.prefix
                ),
            ),
            Ok(_) => r.add(
                name,
                true,
                format!(
                    "up, {}/{}, {} VM(s), dnsmasq {}",
                    subnet.gateway(),
                    subnet.prefix,
                    members.len(),
                    if net.dnsmasq().pid().is_some() {
                        "running"
                    } else {
                        "NOT running"
                    }
                ),
            ),
            Err(e) => r.add(name, false, crate::error_chain(&e)),
        }
        if net.dnsmasq().pid().is_none() {
            r.add(
                format!("dnsmasq {}", net.bridge),
                false,
                "not running: guests get no DHCP leases; lume's watcher restarts it",
            );
        }
        if net.kind == super::shared::Kind::Nat {
            dns_check(r, net);
        }
        ipv6_check(r, net);
        for w in routes.iter().filter(|w| w.bridge == net.bridge) {
            r.add("routes", false, w.text.clone());
        }
    }
    if !active {
        r.add("routes", true, "no NAT or host-only VM runs");
        return;
    }
    if !r.checks.iter().any(|c| c.name == "routes") {
        r.add("routes", true, "no route captures a lume subnet");
    }
    table_check(r, nets);
    let nat_active = nets
        .nat
        .members()
        .iter()
        .any(|m| VmLock::is_held(&m.vm_dir.join(".lock")).unwrap_or(false));
    if nat_active {
        let on = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .map(|v| v.trim() == "1")
            .unwrap_or(false);
        r.add(
            "ipv4 forwarding",
            on,
            if on {
                "on while NAT VMs run"
            } else {
                "off: NAT VMs cannot reach anything; lume's watcher switches it back on"
            },
        );
    }
    if nat_active && nets.nat.prefix6().is_some() {
        let on = !super::kernel::sysctl::forwarding6_off();
        r.add(
            "ipv6 forwarding",
            on,
            if on {
                "on while NAT VMs with IPv6 run"
            } else {
                "off: NAT VMs reach nothing over IPv6; lume's watcher switches it back on"
            },
        );
    }
    let watching = VmLock::is_held(&nets.root.join("watcher.lock")).unwrap_or(false);
    r.add(
        "watcher",
        watching,
        if watching {
            "a supervisor watches and repairs lume's networks"
        } else {
            "no supervisor watches lume's networks: restart one NAT or host-only VM"
        },
    );
}

/// A running network's IPv6: none (`natSubnet6: none`, or a kernel
/// without IPv6), or the bridge with its address and its protections.
fn ipv6_check(r: &mut Report, net: &super::shared::SharedNet) {
    let name = format!("ipv6 {}", net.bridge);
    let key = match net.kind {
        super::shared::Kind::Nat => "natSubnet6",
        super::shared::Kind::Host => "hostSubnet6",
    };
    let running = net.prefix6();
    let asked = net.configured6;
    // The prefix is the one recorded when the network's first VM started;
    // config.yaml's applies when the network next comes up.
    let pending = (running != asked).then(|| {
        format!(
            "; config.yaml now asks for {key}: {}, which applies once the last VM on {} stops and the next one starts",
            asked.map_or_else(|| "none".to_string(), |p| p.to_string()),
            net.bridge
        )
    });
    let Some(p) = running else {
        let why = if !super::prefix6::kernel_has_ipv6() {
            "this kernel has no IPv6".to_string()
        } else if !net.dir.join("subnet6").exists() {
            "the network came up under a release of lume before IPv6".to_string()
        } else {
            format!("{key} was none when its first VM started")
        };
        r.add(
            name,
            true,
            format!(
                "none on this network ({why}){}",
                pending.unwrap_or_default()
            ),
        );
        return;
    };
    let addrs =
        super::kernel::netlink::Netlink::open().and_then(|mut nl| nl.addresses_v6(&net.bridge));
    let mut problems = Vec::new();
    match &addrs {
        Err(e) => problems.push(crate::error_chain(e)),
        Ok(a) => {
            for want in [p.gateway(), super::prefix6::BRIDGE_LINK_LOCAL] {
                if !a.contains(&(want, 64)) {
                    problems.push(format!("lacks its address {want}/64"));
                }
            }
        }
    }
    match super::kernel::sysctl::ipv6_bridge_off_settings(&net.bridge) {
        Err(e) => problems.push(format!("cannot read the bridge's IPv6 settings: {e}")),
        Ok(wrong) => {
            if wrong.iter().any(|(k, _)| *k == "disable_ipv6") {
                problems.push("IPv6 is switched off on the bridge".into());
            }
            let others: Vec<&str> = wrong
                .into_iter()
                .map(|(k, _)| k)
                .filter(|k| *k != "disable_ipv6")
                .collect();
            if !others.is_empty() {
                problems.push(format!(
                    "the bridge's IPv6 settings {} are not as lume sets them (it would take router advertisements, redirects or addresses from guests)",
                    others.join(", ")
                ));
            }
        }
    }
    let pending = pending.unwrap_or_default();
    if problems.is_empty() {
        r.add(
            name,
            true,
            format!(
                "{}/64, router advertisements and DHCPv6 from dnsmasq{pending}",
                p.gateway()
            ),
        );
    } else {
        r.add(
            name,
            false,
            format!(
                "{}: lume's watcher puts it back within a second; if this stays, restart the VMs{pending}",
                problems.join("; ")
            ),
        );
    }
}

/// The doctor's `br_netfilter` line: whether bridged frames reach
/// iptables/nftables (`brnf`), whether a FORWARD chain drops by policy,
/// the Linux bridges running VMs use, those whose frames such a chain
/// drops (with the chains), those lume's own accepts let through (with
/// where they are), and whether `firewallAccommodation` is on.
fn br_netfilter_detail(
    brnf: bool,
    forward_drop: bool,
    bridges: &[String],
    dropped: &[(&String, Vec<String>)],
    accommodated: &[(&String, Vec<String>)],
    accommodate: bool,
) -> String {
    if !brnf {
        return "bridged frames are not passed to iptables/nftables".to_string();
    }
    if !forward_drop {
        return "br_netfilter is on, but no FORWARD chain drops by policy".to_string();
    }
    let fix = |b: &str| {
        let why = if accommodate {
            "lume has no accept for the bridge in that tool's chain (a policy lume must not override comes after its place, see the firewall checks above; the bridge is Docker's or libvirt's own, whose isolation lume leaves to them; or the tool has no chain for other software): "
        } else {
            "firewallAccommodation is false in config.yaml, so lume leaves other tools' chains alone: "
        };
        format!(
            "{why}accept the bridge's own traffic there (with Docker: `iptables -I DOCKER-USER -i {b} -o {b} -j ACCEPT`; with ufw: `ufw route allow in on {b} out on {b}`), or set net.bridge.bridge-nf-call-iptables=0 if nothing on this host needs it"
        )
    };
    if let Some((b, chains)) = dropped.first() {
        let mut text = format!(
            "br_netfilter passes frames bridged on {b} to {}, whose policy drops them: VMs bridged onto {b} get no traffic (no DHCP lease); a policy lume must not override; {}",
            chains.join(" and "),
            fix(b)
        );
        for (b, _) in &dropped[1..] {
            text.push_str(&format!("; the same for {b}"));
        }
        return text;
    }
    if bridges.is_empty() {
        return if accommodate {
            "br_netfilter passes bridged frames to a FORWARD chain with policy drop (no VM bridged onto a Linux bridge runs now): while one runs, lume keeps an accept for its bridge's own traffic in that tool's chain (another tool's policy lume accommodates)".to_string()
        } else {
            format!(
                "br_netfilter passes bridged frames to a FORWARD chain with policy drop (no VM bridged onto a Linux bridge runs now): such VMs would lose their traffic; {}",
                fix("<bridge>")
            )
        };
    }
    let mut parts = Vec::new();
    for (b, places) in accommodated {
        parts.push(format!(
            "another tool's policy lume accommodated: lume's accept for frames bridged on {b} is in {}",
            places.join(", ")
        ));
    }
    let yours: Vec<&str> = bridges
        .iter()
        .filter(|b| !accommodated.iter().any(|(a, _)| a == b))
        .map(String::as_str)
        .collect();
    if !yours.is_empty() {
        parts.push(format!("rules of yours there accept {}", yours.join(", ")));
    }
    format!(
        "br_netfilter passes bridged frames to a FORWARD chain with policy drop; {}",
        parts.join("; ")
    )
}

fn vm_checks(r: &mut Report, ctx: &Context) {
    let Ok(vms) = ctx.store.list() else { return };
    let links = super::kernel::netlink::Netlink::open()
        .and_then(|mut nl| nl.links())
        .unwrap_or_default();
    // The guests' addresses to probe, all at once after this loop: where
    // their check goes in the report, the address and the mode.
    let mut pending: Vec<(usize, Ipv4Addr, String)> = Vec::new();
    for vm in vms {
        let Some(state) = vm.running_state() else {
            continue;
        };
        let name = format!("vm {}", vm.name);
        // Each VM's policy, and whether its filter is on its tap now.
        if !state.network_policy.is_empty() {
            let policy = &state.network_policy;
            let rules = policy.readable().join("; ");
            let device = super::driver::of(&state.network_mode).has_device();
            let (ok, detail) = match (policy_in_force(&state), device) {
                (Some(true), false) => (
                    true,
                    format!("in force (no network: nothing leaves the VM): {rules}"),
                ),
                (Some(true), _) => (
                    true,
                    format!(
                        "in force on {} ({}): {rules}",
                        state.host_device.as_deref().unwrap_or("?"),
                        if crate::network::attach::transmit_offload(policy) {
                            "the guest's offloads kept, checked by the filter"
                        } else {
                            "no transmit offload: this kernel's sk_buff layout is unknown to lume"
                        }
                    ),
                ),
                (None, _) => (
                    true,
                    format!(
                        "cannot be checked without CAP_NET_ADMIN (the lume service set up this VM's network and its keeper guards the filter on {}); run the doctor with sudo to check it. Policy: {rules}",
                        state.host_device.as_deref().unwrap_or("its tap")
                    ),
                ),
                _ => (
                    false,
                    format!(
                        "NOT in force: the filter on {} is gone (its link detached or its tc filter removed), so the VM's traffic is not filtered. The run's guard puts it back within 200 ms; if this check still fails when run again, stop the VM (lume stop {vm}) and start it again, which puts the policy back or refuses to start. Policy: {rules}",
                        state.host_device.as_deref().unwrap_or("its tap"),
                        vm = vm.name
                    ),
                ),
            };
            r.add(format!("{name} policy"), ok, detail);
            if let Some(c) = r.checks.last_mut() {
                c.policy = Some(policy.clone());
            }
        }
        let mode = state.network_mode.to_string();
        let ip = guest_address(&state).and_then(|ip| match ip {
            std::net::IpAddr::V4(v4) => Some(v4),
            std::net::IpAddr::V6(_) => None,
        });
        let facts = super::driver::DoctorVm {
            name: vm.name.as_str(),
            log: &vm.log_path(),
            state: &state,
            ip,
            links: &links,
        };
        match super::driver::of(&state.network_mode).doctor_check(&facts) {
            super::driver::VmCheck::Pass(detail) => r.add(name, true, detail),
            super::driver::VmCheck::Fail(detail) => r.add(name, false, detail),
            super::driver::VmCheck::Probe(ip) => {
                pending.push((r.checks.len(), ip, mode));
                r.add(name, false, "");
            }
        }
    }
    let ips: Vec<Ipv4Addr> = pending.iter().map(|(_, ip, _)| *ip).collect();
    for ((at, ip, mode), p) in pending.iter().zip(probe_all(&ips)) {
        let (ok, detail) = probe_verdict(*ip, mode, &p);
        r.checks[*at].ok = ok;
        r.checks[*at].detail = detail;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The doctor compares lume's table with what lume last wrote: missing
    /// and changed tables fail, an intact one passes.
    #[test]
    fn the_table_check_sees_a_flushed_or_changed_table() {
        use crate::firewall::fake::FakeFirewall;
        let dir = tempfile::tempdir().unwrap();
        let fw = Arc::new(FakeFirewall::default());
        let nets = Networks::in_dir(dir.path(), fw.clone());
        let check = |nets: &Networks| {
            let mut r = Report::default();
            table_check(&mut r, nets);
            let c = r.checks.pop().unwrap();
            assert_eq!(c.name, "firewall table inet lume");
            (c.ok, c.detail)
        };
        nets.add_member(
            super::super::shared::Kind::Nat,
            &Networks::test_member(&dir.path().join("vm")),
        );
        nets.apply_firewall().unwrap();
        // Nothing listed after the write (the ruleset is provably lume's
        // write): intact while the generation says so.
        assert!(!dir.path().join("nft.listing").exists());
        assert_eq!(check(&nets), (true, "intact".to_string()));
        // Another tool's change before the watcher took the listing.
        fw.changed();
        let (ok, detail) = check(&nets);
        assert!(
            !ok && detail.starts_with("not confirmed as written"),
            "{detail}"
        );
        // The watcher's check writes the tables again and takes the listing.
        nets.heal_firewall(true, &mut Vec::new());
        nets.heal_firewall(true, &mut Vec::new());
        assert!(dir.path().join("nft.listing").exists());
        assert_eq!(check(&nets), (true, "intact".to_string()));
        // Changed by somebody else (which moves the generation on).
        *fw.table.lock().unwrap() = Some(crate::firewall::FirewallState::default());
        fw.changed();
        let (ok, detail) = check(&nets);
        assert!(
            !ok && detail.starts_with("changed by something else"),
            "{detail}"
        );
        fw.flush();
        let (ok, detail) = check(&nets);
        assert!(!ok && detail.starts_with("missing:"), "{detail}");
    }

    /// The `br_netfilter` line tells lume's accommodation from a policy
    /// lume must not override, and gives the rule when lume has none there.
    #[test]
    fn a_tun_device_denied_to_a_user_is_a_matter_of_rights() {
        use std::io::{Error, ErrorKind};
        let denied = Error::from(ErrorKind::PermissionDenied);
        let (ok, detail) = tun_verdict(Err(&denied), false);
        assert!(ok, "{detail}");
        assert!(
            detail.contains("root") && !detail.contains("modprobe"),
            "{detail}"
        );
        let (ok, _) = tun_verdict(Err(&denied), true);
        assert!(!ok);
        let missing = Error::from(ErrorKind::NotFound);
        let (ok, detail) = tun_verdict(Err(&missing), false);
        assert!(!ok && detail.contains("modprobe tun"), "{detail}");
        assert_eq!(tun_verdict(Ok(()), false), (true, "present".to_string()));
    }

    /// A port that accepts or refuses answers; a deadline that has passed
    /// is said as such, not as a guest that does not exist.
    #[test]
    fn a_probe_says_answered_or_timed_out() {
        let lo = Ipv4Addr::LOCALHOST;
        let later = Instant::now() + Duration::from_secs(5);
        // Port 22 of the loopback: accepted or refused, both answer.
        assert!(matches!(probe(lo, later), Probe::Answered));
        assert!(matches!(probe(lo, Instant::now()), Probe::TimedOut));
        let (ok, detail) = probe_verdict(lo, "nat", &Probe::TimedOut);
        assert!(!ok && detail.contains("no reply within 1 s"), "{detail}");
        let (ok, detail) = probe_verdict(lo, "nat", &Probe::Answered);
        assert!(ok && detail == "127.0.0.1 answers (nat)", "{detail}");
        let unreachable = std::io::Error::from(std::io::ErrorKind::HostUnreachable);
        let (ok, detail) = probe_verdict(lo, "nat", &Probe::Failed(unreachable));
        assert!(
            !ok && detail.contains("does not answer (nat): "),
            "{detail}"
        );
        // Every address gets its own result, in order.
        let all = probe_all(&[lo, lo, lo]);
        assert_eq!(all.len(), 3);
        assert!(all.iter().all(|p| matches!(p, Probe::Answered)), "{all:?}");
    }

    #[test]
    fn br_netfilter_tells_accommodated_from_must_not_override() {
        let br0 = "br0".to_string();
        let bridges = [br0.clone()];
        let docker = vec!["Docker's chain ip filter DOCKER-USER".to_string()];
        let ok = br_netfilter_detail(true, true, &bridges, &[], &[(&br0, docker.clone())], true);
        assert!(
            ok.contains("another tool's policy lume accommodated: lume's accept for frames bridged on br0 is in Docker's chain ip filter DOCKER-USER")
                && !ok.contains("rules of yours"),
            "{ok}"
        );
        let chains = vec!["table ip filter chain FORWARD".to_string()];
        for (on, why) in [
            (false, "firewallAccommodation is false"),
            (true, "lume has no accept for the bridge"),
        ] {
            let bad = br_netfilter_detail(true, true, &bridges, &[(&br0, chains.clone())], &[], on);
            assert!(
                bad.contains("frames bridged on br0 to table ip filter chain FORWARD")
                    && bad.contains("a policy lume must not override")
                    && bad.contains(why)
                    && bad.contains("iptables -I DOCKER-USER -i br0 -o br0 -j ACCEPT"),
                "{bad}"
            );
        }
        let yours = br_netfilter_detail(true, true, &bridges, &[], &[], true);
        assert!(yours.contains("rules of yours there accept br0"), "{yours}");
        let idle = br_netfilter_detail(true, true, &[], &[], &[], true);
        assert!(idle.contains("lume keeps an accept"), "{idle}");
        let idle_off = br_netfilter_detail(true, true, &[], &[], &[], false);
        assert!(idle_off.contains("-i <bridge> -o <bridge>"), "{idle_off}");
    }

    fn docker_drop(user_accepts: Vec<(String, String)>) -> ForeignDrop {
        ForeignDrop::docker_forward_policy(user_accepts)
    }

    #[test]
    fn legacy_policies_and_the_admin_s_accepts_are_read_from_iptables_save() {
        let save = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n\
                    -A FORWARD -j DOCKER-USER\n-A FORWARD -i lume00 -j ACCEPT\n\
                    -A FORWARD -o lume0 -j DROP\nCOMMIT\n";
        assert_eq!(
            legacy_policies(save, "lume0"),
            (Some("ACCEPT".into()), Some("DROP".into()), false)
        );
        let save = format!("{save}-A DOCKER-USER -i lume0 -j ACCEPT\n");
        assert!(legacy_policies(&save, "lume0").2);
    }

    #[test]
    fn the_dns_check_names_the_resolv_conf_it_compared() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("stub-resolv.conf");
        std::fs::write(&real, "nameserver 127.0.0.53\n").unwrap();
        let link = dir.path().join("resolv.conf");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let file = resolv_conf_named(&link);
        assert_eq!(
            file,
            format!(
                "{} -> {}",
                link.display(),
                real.canonicalize().unwrap().display()
            )
        );
        assert_eq!(
            resolv_conf_named(&dir.path().join("none")),
            dir.path().join("none").display().to_string()
        );
        let (ok, d) = dns_verdict(&file, "10.0.0.1", Ok(vec!["127.0.0.53".into()]));
        assert!(!ok);
        assert!(
            d.contains(&format!(
                "but {file}, as this doctor's process sees it, names 127.0.0.53"
            )) && d.contains("mount namespace"),
            "{d}"
        );
        let (ok, d) = dns_verdict(
            "/etc/resolv.conf",
            "127.0.0.53",
            Ok(vec!["127.0.0.53".into()]),
        );
        assert!(
            ok && d.ends_with("as /etc/resolv.conf names them: 127.0.0.53"),
            "{d}"
        );
    }

    #[test]
    fn the_user_s_own_accepts_pass_when_accommodation_is_off() {
        let (ok, detail) = foreign_verdict(&docker_drop(Vec::new()), &["lume0"], false, &[]);
        assert!(!ok);
        assert!(
            detail.contains("firewallAccommodation is false"),
            "{detail}"
        );
        let mine = vec![(
            "Docker's chain ip filter DOCKER-USER".to_string(),
            "lume0".to_string(),
        )];
        let (ok, detail) = foreign_verdict(&docker_drop(mine.clone()), &["lume0"], false, &[]);
        assert!(ok, "{detail}");
        assert!(
            detail.contains(
                "rules of your own in Docker's chain ip filter DOCKER-USER accept traffic of lume0"
            ),
            "{detail}"
        );
        // Not for another bridge, and never for a table lume does not know.
        let (ok, _) = foreign_verdict(&docker_drop(mine.clone()), &["lume1"], false, &[]);
        assert!(!ok);
        let mut ks = docker_drop(mine);
        ks.tool_chain = None;
        let (ok, detail) = foreign_verdict(&ks, &["lume0"], false, &[]);
        assert!(!ok && detail.contains("must not override"), "{detail}");
    }

    #[test]
    fn a_drop_lume_keeps_out_of_the_way_of_is_named_with_its_chain() {
        use crate::firewall::foreign::{Ruleset, foreign_drops};
        // Docker 28 on iptables-nft and an iptables kill switch appended to
        // FORWARD after Docker's jumps; lume's accepts are kept out of
        // DOCKER-USER (none are there).
        let json = r#"{"nftables":[
          {"chain":{"family":"ip","table":"filter","name":"FORWARD","type":"filter","hook":"forward","prio":0,"policy":"drop"}},
          {"chain":{"family":"ip","table":"filter","name":"DOCKER-USER"}},
          {"rule":{"family":"ip","table":"filter","chain":"FORWARD","handle":1,"expr":[{"jump":{"target":"DOCKER-USER"}}]}},
          {"rule":{"family":"ip","table":"filter","chain":"FORWARD","handle":9,"expr":[{"match":{"op":"==","left":{"meta":{"key":"oifname"}},"right":"up0"}},{"counter":null},{"drop":null}]}}]}"#;
        let text = "table ip filter {\n\tchain FORWARD {\n\t\tjump DOCKER-USER # handle 1\n\t\toifname \"up0\" counter drop # handle 9\n\t}\n}\n";
        let drops = foreign_drops(&Ruleset::parse(json).with_text(text));
        let d = &drops[0];
        assert!(d.affects(&["lume0"]));
        let findings = d.findings(&["lume0"], true);
        let (ok, detail) = foreign_verdict(d, &["lume0"], true, &findings);
        assert!(!ok);
        assert!(
            detail.contains("lume keeps its accepts out of Docker's chain ip filter DOCKER-USER")
                && detail.contains("a policy lume must not override"),
            "{detail}"
        );
        assert_eq!(findings.len(), 1);
        assert_eq!(
            findings[0].describe("lume0"),
            "chain ip filter FORWARD, rule `oifname \"up0\" counter drop` (handle 9): drops some traffic of lume0 and comes after the place of lume's accepts in Docker's chain ip filter DOCKER-USER: a policy lume must not override — lume keeps its accepts out of there, as they would bypass it"
        );
        // Accommodation off: the usual advice, and the rule as a plain drop.
        let off = d.findings(&["lume0"], false);
        let (ok, detail) = foreign_verdict(d, &["lume0"], false, &off);
        assert!(
            !ok && detail.contains("firewallAccommodation is false"),
            "{detail}"
        );
        assert!(off[0].fails());
    }
}
