//! End to end, NAT on a host whose other firewalls drop forwarded and input
//! traffic: Docker's iptables-nft rules (FORWARD policy drop, DOCKER-USER,
//! DOCKER-FORWARD …), ufw's (INPUT and FORWARD policy drop, its before/user
//! chains) and firewalld's `inet firewalld` table (final rejects), IPv4 and
//! IPv6 sides, loaded in the test's host namespace from
//! tests/host_firewalls/ with `iptables-nft-restore` and `nft -f` — never
//! by running those tools. All three at once: every base chain must accept,
//! so the guest's lease, its connections to the LAN and its published port
//! prove that lume's accepts are in each of them from the first start.
//! They sit below the admin's own rules: a deny of the admin's in
//! `DOCKER-USER` or in ufw's user chain keeps blocking its destination (a
//! second LAN address) while the guest's other traffic flows; an iptables
//! kill switch appended to `FORWARD` after Docker's and ufw's jumps keeps
//! lume's accepts out of those chains (they would bypass it); a Docker
//! network with a custom bridge name stays Docker's to guard; and DNS or
//! DHCP accepts open only lume's gateway address, not the host's others.
//! Each tool then rewrites its rules (a Docker restart, `ufw reload`,
//! `firewall-cmd --reload`) and lume's accepts are back within a second; a
//! kill switch still blocks and the doctor says lume does not override it;
//! the last VM's stop and the collection after a killed supervisor leave
//! nothing of lume's in those chains; `firewallAccommodation: false` keeps
//! lume out of them (and, changed while a VM runs, is applied within a
//! second); the user's own accepts from docs/networking.md then let NAT work.

mod common;

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    HOST_UPLINK_IP, HOST_UPLINK6, LAN_PEER, LAN_PEER6, Lan, Netns, Recorder, wait_console, wait_for,
};
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(180);

/// The test's config.yaml: the host-only subnet leaves 192.0.2.128/25 to a
/// Docker network's bridge.
const SETTINGS: &str = "natSubnet: 203.0.113.0/24\nhostSubnet: 192.0.2.0/25\nuserSubnet: 198.51.100.0/24\nnatSubnet6: 2001:db8:64::/64\nhostSubnet6: 2001:db8:65::/64\n";

/// A second address of the LAN, the one the admin's denies name.
const OTHER_PEER: &str = "198.51.100.3";

/// A "container" behind Docker's network bridge custom0.
const CONTAINER: &str = "192.0.2.130";

/// The comment lume's rules in other tools' chains carry.
const PREFIX: &str = "lume: ";

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/host_firewalls")
        .join(name)
        .display()
        .to_string()
}

/// lume's rules outside its own table: (family table chain, position in the
/// chain, comment), from `nft -j list ruleset`.
fn lume_rules(ns: &Netns) -> Vec<(String, usize, String)> {
    let v: Value = serde_json::from_str(&ns.exec_ok("nft -j list ruleset")).unwrap();
    let mut pos: std::collections::HashMap<String, usize> = Default::default();
    let mut out = Vec::new();
    for r in v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i.get("rule"))
    {
        let chain = format!(
            "{} {} {}",
            r["family"].as_str().unwrap(),
            r["table"].as_str().unwrap(),
            r["chain"].as_str().unwrap()
        );
        let n = pos.entry(chain.clone()).or_default();
        if let Some(c) = r["comment"].as_str().filter(|c| c.starts_with(PREFIX)) {
            out.push((chain, *n, c.to_string()));
        }
        *n += 1;
    }
    out
}

/// Whether a rule's expressions are a bare RETURN or reject (with a counter).
fn final_verdict(expr: &Value) -> bool {
    let e = expr.as_array().unwrap();
    e.iter().all(|x| {
        x.get("counter").is_some() || x.get("return").is_some() || x.get("reject").is_some()
    }) && e
        .iter()
        .any(|x| x.get("return").is_some() || x.get("reject").is_some())
}

/// The chains holding lume's rules, each with whether they sit together
/// below every other rule but a final RETURN (Docker's) or reject (firewalld's).
fn placed(ns: &Netns) -> Vec<(String, bool)> {
    let v: Value = serde_json::from_str(&ns.exec_ok("nft -j list ruleset")).unwrap();
    let mut chains: std::collections::BTreeMap<String, Vec<(bool, Value)>> = Default::default();
    for r in v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i.get("rule"))
    {
        let chain = format!(
            "{} {} {}",
            r["family"].as_str().unwrap(),
            r["table"].as_str().unwrap(),
            r["chain"].as_str().unwrap()
        );
        let lume = r["comment"].as_str().is_some_and(|c| c.starts_with(PREFIX));
        chains
            .entry(chain)
            .or_default()
            .push((lume, r["expr"].clone()));
    }
    chains
        .into_iter()
        .filter(|(_, rules)| rules.iter().any(|r| r.0))
        .map(|(c, rules)| {
            let first = rules.iter().position(|r| r.0).unwrap();
            let n = rules.iter().filter(|r| r.0).count();
            let together = rules[first..first + n].iter().all(|r| r.0);
            let tail = &rules[first + n..];
            let below = tail.is_empty() || (tail.len() == 1 && final_verdict(&tail[0].1));
            (c, together && below)
        })
        .collect()
}

const CHAINS: [&str; 8] = [
    "ip filter DOCKER-USER",
    "ip6 filter DOCKER-USER",
    "ip filter ufw-user-forward",
    "ip filter ufw-user-input",
    "ip6 filter ufw6-user-forward",
    "ip6 filter ufw6-user-input",
    "inet firewalld filter_FORWARD",
    "inet firewalld filter_INPUT",
];

fn assert_all_placed(ns: &Netns) {
    let p = placed(ns);
    for c in CHAINS {
        assert!(
            p.iter().any(|(chain, below)| chain == c && *below),
            "lume's accepts below the other rules of {c}: {p:?}"
        );
    }
    assert_eq!(p.len(), CHAINS.len(), "nowhere else: {p:?}");
}

/// Polls until lume's accepts are below the other rules of `chain` again;
/// returns how long it took.
/// How long lume's accepts took to come back below the rules of `chain`.
/// The watcher repairs within a second on an idle machine (printed by the
/// callers, see docs/networking.md); the bound here only tells "late" from
/// "never", so a loaded CI machine does not fail a timing.
fn back_in(ns: &Netns, chain: &str) -> Duration {
    let start = Instant::now();
    wait_for(
        &format!("lume's accepts back in {chain}"),
        Duration::from_secs(15),
        || {
            placed(ns)
                .iter()
                .any(|(c, below)| c == chain && *below)
                .then_some(())
        },
    );
    start.elapsed()
}

fn count_from(peer: &Recorder, from: IpAddr) -> usize {
    peer.sources().iter().filter(|s| **s == from).count()
}

/// Asserts that the guest's probes of `blocked` stay blocked while its
/// connections to the LAN peer flow (two more of them: a full probe round
/// in between, each round tries every target).
fn blocked_while_flowing(peer: &Recorder, blocked: &Recorder, what: &str) {
    std::thread::sleep(Duration::from_millis(1500));
    let n = blocked.sources().len();
    flows(peer, what);
    flows(peer, what);
    assert_eq!(blocked.sources().len(), n, "{what}: blocked");
}

/// Waits for a new connection at `rec`.
fn reaches(rec: &Recorder, what: &str) {
    let n = rec.sources().len();
    wait_for(what, Duration::from_secs(10), || {
        (rec.sources().len() > n).then_some(())
    });
}

/// Waits for a new masqueraded connection from the guest at the LAN peer.
fn flows(peer: &Recorder, what: &str) {
    let host: IpAddr = HOST_UPLINK_IP.parse().unwrap();
    let n = count_from(peer, host);
    wait_for(what, Duration::from_secs(10), || {
        (count_from(peer, host) > n).then_some(())
    });
}

fn doctor(t: &Lan) -> (bool, Vec<Value>) {
    let out = t.host.lume(&t.home, &["network", "doctor", "-f", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    (
        out.status.success(),
        v["checks"].as_array().unwrap().clone(),
    )
}

fn firewall_lines(checks: &[Value]) -> Vec<(bool, String)> {
    checks
        .iter()
        .filter(|c| c["name"] == "other firewalls")
        .map(|c| (c["ok"] == true, c["detail"].as_str().unwrap().to_string()))
        .collect()
}

#[test]
fn nat_works_through_docker_ufw_and_firewalld() {
    let t = Lan::new("hf");
    t.home.write_settings(SETTINGS);
    t.with_ipv6();
    t.lan
        .exec_ok(&format!("ip addr add {OTHER_PEER}/24 dev br0"));
    // Docker's network custom0 with one "container".
    let ct = Netns::new("hfc");
    t.host.exec_ok(&format!(
        "ip link add custom0 type bridge && ip addr add 192.0.2.129/25 dev custom0 && \
         ip link set custom0 up && ip link add ctport type veth peer name eth0 netns {} && \
         ip link set ctport master custom0 && ip link set ctport up",
        ct.name
    ));
    ct.exec_ok(&format!(
        "ip addr add {CONTAINER}/25 dev eth0 && ip link set eth0 up && ip route add default via 192.0.2.129"
    ));
    // The host's other firewalls, as Docker, ufw and firewalld leave them.
    t.host.exec_ok(&format!(
        "iptables-nft-restore < {} && iptables-nft-restore -n < {} && \
         ip6tables-nft-restore < {} && ip6tables-nft-restore -n < {} && nft -f {}",
        fixture("docker.rules"),
        fixture("ufw.rules"),
        fixture("docker6.rules"),
        fixture("ufw6.rules"),
        fixture("firewalld.nft"),
    ));
    let peer = Recorder::start(&t.lan, &format!("{LAN_PEER}:9000"));
    let peer6 = Recorder::start(&t.lan, &format!("[{LAN_PEER6}]:9000"));
    let other = Recorder::start(&t.lan, &format!("{OTHER_PEER}:9000"));
    let container = Recorder::start(&ct, &format!("{CONTAINER}:9000"));
    // A service of the host on another of its addresses, on DNS's port.
    let host_dns = Recorder::start(&t.host, &format!("{HOST_UPLINK_IP}:53"));
    let probe = format!(
        "lume.probes={LAN_PEER}:9000,{OTHER_PEER}:9000,{CONTAINER}:9000,{HOST_UPLINK_IP}:53,[{LAN_PEER6}]:9000"
    );
    t.create("web", "nat", &["--publish", "8080:80"], &probe);
    t.lume_ok(&["run", "web", "--detach"]);
    assert_all_placed(&t.host);

    // From the first start: a lease (DHCP through ufw's INPUT drop and
    // firewalld's reject), the LAN peer, the published port.
    wait_console(
        &t.home,
        "web",
        &format!("LUME-GUEST: probe ok {LAN_PEER}:9000"),
        BOOT,
    );
    let host_ip: IpAddr = HOST_UPLINK_IP.parse().unwrap();
    assert!(peer.sources().iter().all(|s| *s == host_ip));
    let mac = t.get("web")["macAddress"].as_str().unwrap().to_string();
    let published = || {
        t.lan
            .http_get(&format!("{HOST_UPLINK_IP}:8080"))
            .is_some_and(|p| p.contains(&mac))
    };
    assert!(published(), "the published port through every firewall");
    // The same over IPv6: the guest's address from lume's router
    // advertisement (its solicitation through ufw's INPUT drop), out
    // masqueraded through Docker's and ufw's IPv6 FORWARD drops and
    // firewalld's reject, the published port in.
    wait_console(
        &t.home,
        "web",
        &format!("LUME-GUEST: probe ok [{LAN_PEER6}]:9000"),
        Duration::from_secs(60),
    );
    let host6: IpAddr = HOST_UPLINK6.parse().unwrap();
    assert!(peer6.sources().iter().all(|s| *s == host6));
    assert!(
        t.lan
            .http_get(&format!("[{HOST_UPLINK6}]:8080"))
            .is_some_and(|p| p.contains(&mac)),
        "the published port over IPv6 through every firewall"
    );
    // The tables stay iptables-nft's: Docker's and ufw's iptables still read them.
    let saved = t.host.exec_ok("iptables-nft -S && ip6tables-nft -S");
    assert!(
        saved.contains(
            "-A DOCKER-USER -i lume0 -m comment --comment \"lume: lume0 egress\" -j ACCEPT"
        ),
        "{saved}"
    );
    // The doctor names each accommodated policy with its tool and chain.
    let (healthy, checks) = doctor(&t);
    let fw = firewall_lines(&checks);
    assert!(healthy, "{checks:?}");
    for place in [
        "Docker's chain ip filter DOCKER-USER",
        "ufw's chain ip filter ufw-user-forward",
        "ufw's chain ip filter ufw-user-input",
        "ufw's chain ip6 filter ufw6-user-input",
        "firewalld's chain inet firewalld filter_FORWARD",
        "firewalld's chain inet firewalld filter_INPUT",
    ] {
        assert!(
            fw.iter()
                .any(|(ok, d)| *ok && d.contains("accommodated") && d.contains(place)),
            "{place}: {fw:?}"
        );
    }

    // Docker's network with a custom bridge name stays Docker's to guard
    // (its DROP for traffic from outside the network applies), and lume's
    // DNS accept opens the gateway, not the host's other addresses.
    reaches(&other, "the second LAN address");
    reaches(&other, "the second LAN address again");
    assert!(container.sources().is_empty(), "custom0 is Docker's");
    assert!(host_dns.sources().is_empty(), "only the gateway's port 53");
    let docker = t.host.exec_ok("iptables-nft -S DOCKER-USER");
    for bridge in ["docker0", "custom0", "docker_gwbridge"] {
        assert!(
            docker.contains(&format!("-A DOCKER-USER -i lume0 -o {bridge} -m comment")),
            "{docker}"
        );
    }
    assert!(!docker.contains("br+"), "{docker}");
    // ufw's own drop for DHCP broadcasts, after lume's accepts, is named as
    // ufw's policy; firewalld's final reject as firewalld's.
    for owner in ["ufw's own rule", "firewalld's own rule"] {
        assert!(
            fw.iter().any(|(ok, d)| *ok
                && d.contains(owner)
                && d.contains("another tool's policy lume accommodated")),
            "{owner}: {fw:?}"
        );
    }

    // The admin's deny appended to DOCKER-USER (Docker 28 has no RETURN
    // there): lume's accepts move below it within a second; the deny holds.
    let deny = format!("DOCKER-USER -i lume0 -d {OTHER_PEER} -j DROP");
    t.host.exec_ok(&format!("iptables-nft -A {deny}"));
    let took = back_in(&t.host, "ip filter DOCKER-USER");
    eprintln!("lume's accepts below the admin's new rule in DOCKER-USER after {took:?}");
    assert!(
        t.host
            .exec_ok("iptables-nft -S DOCKER-USER")
            .lines()
            .nth(1)
            .is_some_and(|l| l.contains(&format!("-d {OTHER_PEER}/32")) && l.ends_with("-j DROP")),
        "the admin's rule first"
    );
    blocked_while_flowing(&peer, &other, "the admin's deny in DOCKER-USER");
    let (healthy, checks) = doctor(&t);
    let fw = firewall_lines(&checks);
    assert!(healthy, "{checks:?}");
    assert!(
        fw.iter().any(|(ok, d)| *ok
            && d.contains(
                "chain ip filter DOCKER-USER, rule `iifname \"lume0\" ip daddr 198.51.100.3"
            )
            && d.contains("a rule of yours in Docker's chain ip filter DOCKER-USER")),
        "{fw:?}"
    );
    t.host.exec_ok(&format!("iptables-nft -D {deny}"));
    reaches(&other, "the second LAN address once the deny is gone");

    // `ufw route deny` writes to ufw-user-forward, which comes after
    // DOCKER-USER: lume keeps its accepts out of DOCKER-USER and puts the
    // ones in ufw's chain below the deny; the deny holds.
    let deny = format!("ufw-user-forward -i lume0 -d {OTHER_PEER} -j DROP");
    t.host.exec_ok(&format!("iptables-nft -A {deny}"));
    // The traffic first (blocked_while_flowing gives the watcher 1.5 s).
    blocked_while_flowing(&peer, &other, "the admin's deny in ufw-user-forward");
    wait_for(
        "lume's accepts out of DOCKER-USER",
        Duration::from_secs(10),
        || {
            (!placed(&t.host)
                .iter()
                .any(|(c, _)| c == "ip filter DOCKER-USER"))
            .then_some(())
        },
    );
    back_in(&t.host, "ip filter ufw-user-forward");
    let (_, checks) = doctor(&t);
    let fw = firewall_lines(&checks);
    assert!(
        fw.iter().any(|(ok, d)| *ok
            && d.contains("table ip filter chain FORWARD")
            && d.contains(
                "chain ip filter ufw-user-forward, rule `iifname \"lume0\" ip daddr 198.51.100.3"
            )
            && d.contains(
                "comes after the place of lume's accepts in Docker's chain ip filter DOCKER-USER"
            )
            && d.contains("a policy lume must not override")),
        "{fw:?}"
    );
    assert!(
        fw.iter().any(|(ok, d)| *ok
            && d.contains("table ip filter chain FORWARD")
            && d.contains("accommodated: lume accepts the traffic of lume0 in ufw's chain ip filter ufw-user-forward")),
        "{fw:?}"
    );
    let log = std::fs::read_to_string(t.home.vm_dir("web").join("lume.log")).unwrap();
    assert!(
        log.contains("repaired: removed lume's accepts from Docker's chain ip filter DOCKER-USER: rule `iifname \"lume0\" ip daddr 198.51.100.3"),
        "{log}"
    );
    t.host.exec_ok(&format!("iptables-nft -D {deny}"));
    back_in(&t.host, "ip filter DOCKER-USER");
    reaches(&other, "the second LAN address once ufw's deny is gone");

    // An iptables kill switch appended to FORWARD, after Docker's and ufw's
    // jumps: lume's accepts in their chains would bypass it, so they go and
    // the guest's traffic stops; the doctor names the rule.
    t.host.exec_ok("iptables-nft -A FORWARD -o up0 -j DROP");
    std::thread::sleep(Duration::from_millis(1500));
    let n = peer.sources().len();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(peer.sources().len(), n, "the iptables kill switch blocks");
    wait_for(
        "lume's accepts out of ip filter's forward chains",
        Duration::from_secs(10),
        || {
            (!placed(&t.host)
                .iter()
                .any(|(c, _)| c == "ip filter DOCKER-USER" || c == "ip filter ufw-user-forward"))
            .then_some(())
        },
    );
    let (healthy, checks) = doctor(&t);
    let fw = firewall_lines(&checks);
    assert!(!healthy);
    assert!(
        fw.iter().any(|(ok, d)| !*ok
            && d.contains("table ip filter chain FORWARD (forward hook): policy drop")
            && d.contains("lume keeps its accepts out of Docker's chain ip filter DOCKER-USER")),
        "{fw:?}"
    );
    assert!(
        fw.iter().any(
            |(_, d)| d.contains("chain ip filter FORWARD, rule `oifname \"up0\"")
                && d.contains("a policy lume must not override")
        ),
        "{fw:?}"
    );
    t.host.exec_ok("iptables-nft -D FORWARD -o up0 -j DROP");
    back_in(&t.host, "ip filter DOCKER-USER");
    flows(&peer, "traffic once the iptables kill switch is gone");
    assert_all_placed(&t.host);

    // A Docker restart flushes and recreates DOCKER-USER (one iptables
    // transaction here: as separate commands, lume's watcher may put its
    // accepts back between the flush and `-X`, which then fails).
    t.host.exec_ok(
        "printf '*filter\\n-D FORWARD -j DOCKER-USER\\n-F DOCKER-USER\\n-X DOCKER-USER\\n\
         -N DOCKER-USER\\n-I FORWARD -j DOCKER-USER\\nCOMMIT\\n' | iptables-nft-restore -n",
    );
    let took = back_in(&t.host, "ip filter DOCKER-USER");
    eprintln!("lume's accepts back in DOCKER-USER after {took:?}");
    eprintln!("repaired after {took:?}");
    flows(&peer, "traffic after the Docker restart");
    // `ufw reload` rewrites its user chains from user.rules.
    t.host.exec_ok(
        "iptables-nft -F ufw-user-input && iptables-nft -F ufw-user-forward && \
         iptables-nft -A ufw-user-input -p tcp --dport 22 -j ACCEPT && ip6tables-nft -F ufw6-user-forward",
    );
    let took = back_in(&t.host, "ip filter ufw-user-forward");
    eprintln!("lume's accepts back in ufw's chains after {took:?}");
    eprintln!("repaired after {took:?}");
    // `firewall-cmd --reload` replaces its table whole.
    t.host.exec_ok(&format!(
        "(echo 'table inet firewalld'; echo 'delete table inet firewalld'; cat {}) | nft -f -",
        fixture("firewalld.nft")
    ));
    let took = back_in(&t.host, "inet firewalld filter_FORWARD");
    eprintln!("lume's accepts back in firewalld's table after {took:?}");
    eprintln!("repaired after {took:?}");
    flows(&peer, "traffic after ufw and firewalld reloads");
    assert_all_placed(&t.host);
    assert!(published(), "the published port after the reloads");
    // Each rewrite really removed them, and each repair is logged.
    let log = std::fs::read_to_string(t.home.vm_dir("web").join("lume.log")).unwrap();
    for chain in [
        "Docker's chain ip filter DOCKER-USER",
        "ufw's chain ip filter ufw-user-forward",
        "ufw's chain ip filter ufw-user-input",
        "ufw's chain ip6 filter ufw6-user-forward",
        "firewalld's chain inet firewalld filter_FORWARD",
        "firewalld's chain inet firewalld filter_INPUT",
    ] {
        assert!(
            log.contains(&format!(
                "repaired: added lume's accepts to {chain}, below the rules there"
            )),
            "{chain}: {log}"
        );
    }

    // A kill switch is not another tool's chain: it blocks, it is named, it stays.
    t.host.exec_ok(
        "nft add table inet killswitch && \
         nft 'add chain inet killswitch ksforward { type filter hook forward priority 0; policy drop; }'",
    );
    let (healthy, checks) = doctor(&t);
    let fw = firewall_lines(&checks);
    assert!(!healthy);
    assert!(
        fw.iter().any(|(ok, d)| !*ok
            && d.contains("table inet killswitch chain ksforward")
            && d.contains("must not override")),
        "{fw:?}"
    );
    assert!(
        fw.iter()
            .any(|(ok, d)| *ok && d.contains("Docker's chain ip filter DOCKER-USER")),
        "{fw:?}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    let n = count_from(&peer, host_ip);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(count_from(&peer, host_ip), n, "the kill switch blocks");
    assert!(t.host.exec_ok("nft list tables").contains("killswitch"));
    assert_all_placed(&t.host);
    // The watcher's log warns about the kill switch; a tool's policy only
    // while its chains were being rewritten (Docker's FORWARD without its
    // jump to DOCKER-USER does drop), each such warning resolved since.
    let log = std::fs::read_to_string(t.home.vm_dir("web").join("lume.log")).unwrap();
    assert!(
        log.contains("warning: table inet killswitch chain ksforward"),
        "{log}"
    );
    for line in log.lines() {
        if let Some((_, w)) = line.split_once("] warning: ")
            && (w.starts_with("table ip filter") || w.starts_with("table inet firewalld"))
        {
            eprintln!("transient warning: {w}");
            assert!(log.contains(&format!("resolved: {w}")), "{w}: {log}");
        }
    }
    t.host.exec_ok("nft delete table inet killswitch");
    flows(&peer, "traffic once the kill switch is gone");

    // The last VM stops: nothing of lume's in the other tools' chains, which stay.
    t.lume_ok(&["stop", "web"]);
    assert_eq!(lume_rules(&t.host), Vec::new());
    let after = t.host.exec_ok("iptables-nft -S && nft list tables");
    assert!(
        after.contains("-P FORWARD DROP")
            && after.contains("-N DOCKER-USER")
            && after.contains("-A ufw-user-input -p tcp -m tcp --dport 22 -j ACCEPT")
            && after.contains("table inet firewalld")
            && !after.contains("table inet lume"),
        "{after}"
    );

    // A killed supervisor: the next command collects its accepts too.
    t.lume_ok(&["run", "web", "--detach"]);
    assert_all_placed(&t.host);
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(t.home.vm_dir("web").join("run.json")).unwrap(),
    )
    .unwrap();
    common::sh(&format!("kill -9 {}", state["pid"]));
    wait_for("the VM stopped", Duration::from_secs(10), || {
        (t.get("web")["status"] == "stopped").then_some(())
    });
    // It is not running (an error, as lume's), and what it left is collected.
    assert!(t.lume_fails(&["stop", "web"]).contains("is not running"));
    assert_eq!(lume_rules(&t.host), Vec::new());
    assert!(!t.host.exec_ok("nft list tables").contains("inet lume"));

    // Turned off: lume leaves those chains alone and the doctor says why NAT fails.
    t.home
        .write_settings(&format!("{SETTINGS}firewallAccommodation: false\n"));
    t.lume_ok(&["run", "web", "--detach"]);
    assert_eq!(lume_rules(&t.host), Vec::new());
    assert!(
        !t.host
            .exec_ok("nft list table inet lume")
            .contains("chain foreign_mark")
    );
    let (healthy, checks) = doctor(&t);
    let fw = firewall_lines(&checks);
    assert!(!healthy);
    assert!(
        fw.iter().any(|(ok, d)| !*ok
            && d.contains("table ip filter chain FORWARD")
            && d.contains("firewallAccommodation is false")),
        "{fw:?}"
    );
    t.lume_ok(&["stop", "web", "--timeout", "1"]);
    assert_eq!(lume_rules(&t.host), Vec::new());

    // Still off, with the user's own accepts as docs/networking.md gives
    // them for Docker and ufw (firewalld's table set aside meanwhile):
    // egress, replies, published ports, DHCP and DNS all pass, and the
    // doctor recognises the accepts.
    t.host.exec_ok("nft delete table inet firewalld");
    t.host.exec_ok(
        "iptables-nft -I DOCKER-USER -o lume0 -m conntrack --ctstate DNAT -j ACCEPT && \
         iptables-nft -I DOCKER-USER -o lume0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT && \
         iptables-nft -I DOCKER-USER -i lume0 -j ACCEPT && \
         iptables-nft -A ufw-user-forward -i lume0 -j ACCEPT && \
         iptables-nft -A ufw-user-forward -o lume0 -m conntrack --ctstate DNAT -j ACCEPT && \
         iptables-nft -A ufw-user-input -i lume0 -d 203.0.113.1 -p udp --dport 67 -j ACCEPT && \
         iptables-nft -A ufw-user-input -i lume0 -d 255.255.255.255 -p udp --dport 67 -j ACCEPT && \
         iptables-nft -A ufw-user-input -i lume0 -d 203.0.113.1 -p udp --dport 53 -j ACCEPT && \
         iptables-nft -A ufw-user-input -i lume0 -d 203.0.113.1 -p tcp --dport 53 -j ACCEPT && \
         ip6tables-nft -I DOCKER-USER -o lume0 -m conntrack --ctstate DNAT -j ACCEPT && \
         ip6tables-nft -I DOCKER-USER -o lume0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT && \
         ip6tables-nft -I DOCKER-USER -i lume0 -j ACCEPT && \
         ip6tables-nft -A ufw6-user-forward -i lume0 -j ACCEPT && \
         ip6tables-nft -A ufw6-user-forward -o lume0 -m conntrack --ctstate DNAT -j ACCEPT && \
         ip6tables-nft -A ufw6-user-input -i lume0 -d ff02::1:2 -p udp --dport 547 -j ACCEPT && \
         ip6tables-nft -A ufw6-user-input -i lume0 -d 2001:db8:64::1 -p udp --dport 53 -j ACCEPT && \
         ip6tables-nft -A ufw6-user-input -i lume0 -d 2001:db8:64::1 -p tcp --dport 53 -j ACCEPT",
    );
    t.lume_ok(&["run", "web", "--detach"]);
    assert_eq!(lume_rules(&t.host), Vec::new());
    let n = count_from(&peer, host_ip);
    wait_for("traffic through the user's own accepts", BOOT, || {
        (count_from(&peer, host_ip) > n).then_some(())
    });
    assert!(published(), "the published port through the user's accepts");
    let (healthy, checks) = doctor(&t);
    let fw = firewall_lines(&checks);
    assert!(healthy, "{checks:?}");
    // FORWARD's policy is not even reached by lume0's traffic: the
    // user's accepts in DOCKER-USER, followed from FORWARD, take it first.
    assert!(
        fw.iter()
            .all(|(ok, d)| *ok && !d.contains("table ip filter chain FORWARD")),
        "{fw:?}"
    );
    assert!(
        fw.iter().any(|(ok, d)| *ok
            && d.contains("table ip filter chain INPUT")
            && d.contains("rules of your own in ufw's chain ip filter ufw-user-input")),
        "{fw:?}"
    );
    assert!(host_dns.sources().is_empty(), "only the gateway's port 53");
    t.lume_ok(&["stop", "web", "--timeout", "1"]);
    t.host
        .exec_ok(&format!("nft -f {}", fixture("firewalld.nft")));

    // On by default again, on a host without those tools: lume's table marks
    // nothing; Docker starting while the VM runs gets lume's accepts and the
    // marks within a second.
    t.home.write_settings(SETTINGS);
    t.host.exec_ok(
        "nft delete table ip filter && nft delete table ip nat && nft delete table ip6 filter && \
         nft delete table inet firewalld",
    );
    t.lume_ok(&["run", "web", "--detach"]);
    let marks = || {
        t.host
            .exec_ok("nft list table inet lume")
            .contains("chain foreign_mark")
    };
    assert!(!marks(), "no mark without another tool");
    t.host.exec_ok(&format!(
        "iptables-nft-restore < {}",
        fixture("docker.rules")
    ));
    let took = back_in(&t.host, "ip filter DOCKER-USER");
    wait_for("the mark chain", Duration::from_secs(10), || {
        marks().then_some(())
    });
    eprintln!("lume's accepts in a newly started Docker's DOCKER-USER after {took:?}");
    eprintln!("repaired after {took:?}");

    // The setting changed while the VM runs: the watcher applies it within a second.
    t.home
        .write_settings(&format!("{SETTINGS}firewallAccommodation: false\n"));
    wait_for("lume's accepts removed", Duration::from_secs(10), || {
        lume_rules(&t.host).is_empty().then_some(())
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(lume_rules(&t.host), Vec::new(), "not put back");
    t.home.write_settings(SETTINGS);
    let took = back_in(&t.host, "ip filter DOCKER-USER");
    eprintln!("repaired after {took:?}");
    // The watcher logs a change right after applying it.
    wait_for(
        "the watcher's log of both changes",
        Duration::from_secs(10),
        || {
            let log = std::fs::read_to_string(t.home.vm_dir("web").join("lume.log")).unwrap();
            (log.contains("firewallAccommodation changed to false in ")
                && log.contains("firewallAccommodation changed to true in "))
            .then_some(())
        },
    );
    t.lume_ok(&["stop", "web", "--timeout", "1"]);
    assert_eq!(lume_rules(&t.host), Vec::new());
}

/// A TCP connection from inside `ns` to `addr`, within two seconds.
fn connects(ns: &Netns, addr: &str) -> bool {
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    ns.within(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok())
}

/// A host namespace with lume0 (a namespace on it stands for a NAT guest,
/// 203.0.113.10), Docker's docker0 with a "container" (192.0.2.2) and an
/// uplink to a LAN peer (198.51.100.2), forwarding on, and `rules`
/// (fixtures) loaded with iptables-nft-restore, the first flushing.
struct Routed {
    host: Netns,
    guest: Netns,
    ct: Netns,
    lan: Netns,
}

impl Routed {
    fn new(tag: &str, rules: &[&str]) -> Self {
        let host = Netns::new(tag);
        let guest = Netns::new(&format!("{tag}g"));
        let ct = Netns::new(&format!("{tag}c"));
        let lan = Netns::new(&format!("{tag}l"));
        host.exec_ok(&format!(
            "sysctl -qw net.ipv4.ip_forward=1 && \
             ip link add lume0 type bridge && ip addr add 203.0.113.1/24 dev lume0 && ip link set lume0 up && \
             ip link add gport type veth peer name eth0 netns {g} && ip link set gport master lume0 && ip link set gport up && \
             ip link add docker0 type bridge && ip addr add 192.0.2.1/24 dev docker0 && ip link set docker0 up && \
             ip link add cport type veth peer name eth0 netns {c} && ip link set cport master docker0 && ip link set cport up && \
             ip link add uplink type veth peer name eth0 netns {l} && ip addr add 198.51.100.1/24 dev uplink && ip link set uplink up",
            g = guest.name,
            c = ct.name,
            l = lan.name
        ));
        guest.exec_ok("ip addr add 203.0.113.10/24 dev eth0 && ip link set eth0 up && ip route add default via 203.0.113.1");
        ct.exec_ok("ip addr add 192.0.2.2/24 dev eth0 && ip link set eth0 up && ip route add default via 192.0.2.1");
        lan.exec_ok("ip addr add 198.51.100.2/24 dev eth0 && ip link set eth0 up && ip route add default via 198.51.100.1");
        for (i, r) in rules.iter().enumerate() {
            let flag = if i == 0 { "" } else { "-n " };
            host.exec_ok(&format!("iptables-nft-restore {flag}< {}", fixture(r)));
        }
        Self {
            host,
            guest,
            ct,
            lan,
        }
    }

    /// lume's own table for a NAT network on lume0 (marking replies for its
    /// accepts elsewhere) and its accommodation of the other tools' chains,
    /// as a NAT VM's start does, run in the host namespace.
    fn accommodate(&self) -> lume::firewall::Accommodated {
        use lume::firewall::{BridgeNet, FirewallDriver, FirewallState, Opening, nft::Nft};
        self.host
            .within(|| {
                Nft.apply(&FirewallState {
                    nat: Some(BridgeNet {
                        bridge: "lume0".into(),
                        subnet: "203.0.113.0/24".parse().unwrap(),
                        prefix6: None,
                    }),
                    accommodate: true,
                    ..Default::default()
                })?;
                Nft.accommodate(&[Opening {
                    bridge: "lume0".into(),
                    nat: true,
                    gateway: "203.0.113.1".parse().unwrap(),
                    gateway6: None,
                    bridged: false,
                }])
            })
            .expect("lume's table and accommodation apply")
    }
}

/// Docker up to 27 together with ufw, the usual pair on a developer's
/// Ubuntu: Docker's `DOCKER` chain accepts published ports and otherwise
/// returns to `FORWARD`, which goes on into ufw's chains. lume's egress
/// accept in `ufw-user-forward` must not be what lets a guest reach a
/// container's unpublished port (a LAN neighbour cannot: ufw's routed
/// policy drops it). Real kernel, real nftables, lume's own accommodation
/// code; no VM needed: a namespace stands for the guest on lume0.
#[test]
fn docker_27_with_ufw_keeps_containers_guarded_from_guests() {
    let t = Routed::new("hd27", &["docker27.rules", "ufw.rules"]);
    let peer = Recorder::start(&t.lan, "198.51.100.2:9000");
    let published = Recorder::start(&t.ct, "192.0.2.2:80");
    let unpublished = Recorder::start(&t.ct, "192.0.2.2:9000");
    // Without lume's accepts, ufw's routed policy drops the guest's traffic.
    assert!(!connects(&t.guest, "198.51.100.2:9000"));

    let done = t.accommodate();
    assert!(!done.changes.is_empty(), "{:?}", done.changes);

    assert!(
        connects(&t.guest, "198.51.100.2:9000"),
        "the LAN through ufw"
    );
    wait_for("the LAN peer's record", Duration::from_secs(10), || {
        (!peer.sources().is_empty()).then_some(())
    });
    assert!(
        connects(&t.guest, "192.0.2.2:80"),
        "a published port, as Docker's chain accepts it"
    );
    wait_for("the container's record", Duration::from_secs(10), || {
        (!published.sources().is_empty()).then_some(())
    });
    assert!(
        !connects(&t.guest, "192.0.2.2:9000"),
        "a container's unpublished port is Docker's and ufw's to guard: {}",
        t.host.exec_ok("nft list chain ip filter ufw-user-forward")
    );
    assert!(unpublished.sources().is_empty());

    // ufw-docker's after.rules (a popular way to run both) jumps from
    // DOCKER-USER to ufw-user-forward first, ahead of Docker's own chains:
    // lume's egress accept there must still not reach the container.
    t.host
        .exec_ok("iptables-nft -I DOCKER-USER -j ufw-user-forward");
    t.accommodate();
    assert!(connects(&t.guest, "198.51.100.2:9000"), "the LAN still");
    assert!(
        !connects(&t.guest, "192.0.2.2:9000"),
        "ufw-docker's jump: {}",
        t.host.exec_ok("nft list table ip filter")
    );
    assert!(unpublished.sources().is_empty());
}

/// The `iptables-legacy` check of `lume network doctor -f json` in `ns`.
fn legacy_line(ns: &Netns, home: &common::Home) -> Option<(bool, String)> {
    let out = ns.lume(home, &["network", "doctor", "-f", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "iptables-legacy")
        .map(|c| (c["ok"] == true, c["detail"].as_str().unwrap().to_string()))
}

/// Docker on a host whose `iptables` is iptables-legacy: its FORWARD policy
/// drop is outside nftables, so lume can neither see nor accommodate it,
/// and a NAT VM has no network. The doctor must say so and what to do
/// (it named nothing before); the admin's own accept for lume0 there
/// satisfies it; a namespace without legacy tables has no such line.
#[test]
fn docker_on_iptables_legacy_is_named_by_the_doctor() {
    let home = common::Home::new();
    let host = Netns::new("hleg");
    assert_eq!(legacy_line(&host, &home), None, "no legacy table yet");
    host.exec_ok(&format!(
        "iptables-legacy-restore < {}",
        fixture("docker27.rules")
    ));
    let (ok, detail) = legacy_line(&host, &home).expect("the doctor names iptables-legacy");
    assert!(!ok, "{detail}");
    assert!(
        detail.contains("policy DROP on FORWARD") && detail.contains("iptables-nft"),
        "{detail}"
    );
    host.exec_ok("iptables-legacy -I DOCKER-USER -i lume0 -j ACCEPT");
    let (ok, detail) = legacy_line(&host, &home).unwrap();
    assert!(ok, "{detail}");
    // No lume rule is ever written there.
    assert!(!host.exec_ok("iptables-legacy-save").contains("lume: "));
}

/// An iptables kill switch that rejects rather than drops (`-j REJECT`,
/// which iptables-nft stores as a target nftables has no expression for),
/// appended to `FORWARD` after Docker's and ufw's jumps: lume's accepts in
/// their chains would end the packet's way before it, so they must stay
/// out, and the guest's traffic out through the uplink stays blocked.
#[test]
fn an_iptables_reject_kill_switch_is_not_bypassed() {
    let t = Routed::new("hrej", &["docker.rules", "ufw.rules"]);
    t.host
        .exec_ok("iptables-nft -A FORWARD -o uplink -j REJECT --reject-with icmp-host-prohibited");
    let _peer = Recorder::start(&t.lan, "198.51.100.2:9000");
    let done = t.accommodate();
    assert!(
        !connects(&t.guest, "198.51.100.2:9000"),
        "the kill switch blocks: {:?}\n{}",
        done.changes,
        t.host.exec_ok("nft list table ip filter")
    );
    // It is the kill switch that blocks: without it the guest gets out.
    let handle = t.host.exec_ok(
        "nft -a list chain ip filter FORWARD | grep 'oifname \"uplink\"' | sed 's/.*# handle //'",
    );
    t.host.exec_ok(&format!(
        "nft delete rule ip filter FORWARD handle {}",
        handle.trim()
    ));
    t.accommodate();
    assert!(
        connects(&t.guest, "198.51.100.2:9000"),
        "without the kill switch"
    );
}

/// Docker with libvirt's iptables rules (libvirt up to 9): libvirt rejects
/// new connections into its NAT network virbr0 (`LIBVIRT_FWI -o virbr0 -j
/// REJECT`). A lume guest must get to the LAN (libvirt's reject is no
/// reason to keep lume's accepts out of Docker's chain) and must not open
/// connections to a libvirt guest (lume's accepts must not skip libvirt's
/// chains), as a LAN neighbour cannot.
#[test]
fn libvirt_s_iptables_rules_stay_libvirt_s_and_do_not_stop_nat() {
    let t = Routed::new("hlv", &["docker.rules", "libvirt.rules"]);
    let lv = Netns::new("hlvv");
    t.host.exec_ok(&format!(
        "ip link add virbr0 type bridge && ip addr add 192.0.2.129/25 dev virbr0 && ip link set virbr0 up && \
         ip link add vport type veth peer name eth0 netns {} && ip link set vport master virbr0 && ip link set vport up",
        lv.name
    ));
    lv.exec_ok("ip addr add 192.0.2.130/25 dev eth0 && ip link set eth0 up && ip route add default via 192.0.2.129");
    let _peer = Recorder::start(&t.lan, "198.51.100.2:9000");
    let vm = Recorder::start(&lv, "192.0.2.130:9000");
    let done = t.accommodate();
    assert!(
        connects(&t.guest, "198.51.100.2:9000"),
        "the LAN: {:?}\n{}",
        done.changes,
        t.host.exec_ok("nft list table ip filter")
    );
    assert!(
        !connects(&t.guest, "192.0.2.130:9000"),
        "libvirt's guest is libvirt's to guard: {}",
        t.host.exec_ok("nft list chain ip filter DOCKER-USER")
    );
    assert!(vm.sources().is_empty());
}
