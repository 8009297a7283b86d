//! End to end, NAT on a host whose other firewalls drop forwarded and input
//! traffic: Docker's iptables-nft rules (FORWARD policy drop, DOCKER-USER,
//! DOCKER-FORWARD …), ufw's (INPUT and FORWARD policy drop, its before/user
//! chains) and firewalld's `inet firewalld` table (final rejects), IPv4 and
//! IPv6 sides, loaded in the test's host namespace from
//! tests/host_firewalls/ with `iptables-nft-restore` and `nft -f` — never
//! by running those tools. All three at once: every base chain must accept,
//! so the guest's lease, its connections to the LAN and its published port
//! prove that lume's accepts are in each of them from the first start.
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

use common::{HOST_UPLINK_IP, LAN_PEER, Lan, Netns, Recorder, wait_console, wait_for};
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(180);

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

/// The chains holding lume's rules, each with whether they are its first rules.
fn placed(ns: &Netns) -> Vec<(String, bool)> {
    let rules = lume_rules(ns);
    let mut chains: Vec<String> = rules.iter().map(|r| r.0.clone()).collect();
    chains.dedup();
    chains
        .into_iter()
        .map(|c| {
            let ours: Vec<usize> = rules.iter().filter(|r| r.0 == c).map(|r| r.1).collect();
            let first = ours.iter().enumerate().all(|(i, p)| i == *p);
            (c, first)
        })
        .collect()
}

const CHAINS: [&str; 7] = [
    "ip filter DOCKER-USER",
    "ip6 filter DOCKER-USER",
    "ip filter ufw-user-forward",
    "ip filter ufw-user-input",
    "ip6 filter ufw6-user-forward",
    "inet firewalld filter_FORWARD",
    "inet firewalld filter_INPUT",
];

fn assert_all_placed(ns: &Netns) {
    let p = placed(ns);
    for c in CHAINS {
        assert!(
            p.iter().any(|(chain, first)| chain == c && *first),
            "lume's accepts at the top of {c}: {p:?}"
        );
    }
    assert_eq!(p.len(), CHAINS.len(), "nowhere else: {p:?}");
}

/// Polls until lume's accepts are at the top of `chain` again; returns how long it took.
fn back_in(ns: &Netns, chain: &str) -> Duration {
    let start = Instant::now();
    wait_for(
        &format!("lume's accepts back in {chain}"),
        Duration::from_secs(5),
        || {
            placed(ns)
                .iter()
                .any(|(c, first)| c == chain && *first)
                .then_some(())
        },
    );
    start.elapsed()
}

fn count_from(peer: &Recorder, from: IpAddr) -> usize {
    peer.sources().iter().filter(|s| **s == from).count()
}

/// Waits for a new masqueraded connection from the guest at the LAN peer.
fn flows(peer: &Recorder, what: &str) {
    let host: IpAddr = HOST_UPLINK_IP.parse().unwrap();
    let n = count_from(peer, host);
    wait_for(what, Duration::from_secs(5), || {
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
    let probe = format!("lume.probe={LAN_PEER}:9000");
    t.create("web", "nat", &["--publish", "8080:80"], &probe);
    t.lume_ok(&["run", "web", "--detach"]);
    assert_all_placed(&t.host);

    // From the first start: a lease (DHCP through ufw's INPUT drop and
    // firewalld's reject), the LAN peer, the published port.
    wait_console(&t.home, "web", "LUME-GUEST: probe ok", BOOT);
    let host_ip: IpAddr = HOST_UPLINK_IP.parse().unwrap();
    assert!(peer.sources().iter().all(|s| *s == host_ip));
    let mac = t.get("web")["macAddress"].as_str().unwrap().to_string();
    let published = || {
        t.lan
            .http_get(&format!("{HOST_UPLINK_IP}:8080"))
            .is_some_and(|p| p.contains(&mac))
    };
    assert!(published(), "the published port through every firewall");
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
        "firewalld's chain inet firewalld filter_FORWARD",
        "firewalld's chain inet firewalld filter_INPUT",
    ] {
        assert!(
            fw.iter()
                .any(|(ok, d)| *ok && d.contains("accommodated") && d.contains(place)),
            "{place}: {fw:?}"
        );
    }

    // A Docker restart flushes and recreates DOCKER-USER (one iptables
    // transaction here: as separate commands, lume's watcher may put its
    // accepts back between the flush and `-X`, which then fails).
    t.host.exec_ok(
        "printf '*filter\\n-D FORWARD -j DOCKER-USER\\n-F DOCKER-USER\\n-X DOCKER-USER\\n\
         -N DOCKER-USER\\n-I FORWARD -j DOCKER-USER\\nCOMMIT\\n' | iptables-nft-restore -n",
    );
    let took = back_in(&t.host, "ip filter DOCKER-USER");
    eprintln!("lume's accepts back in DOCKER-USER after {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    flows(&peer, "traffic after the Docker restart");
    // `ufw reload` rewrites its user chains from user.rules.
    t.host.exec_ok(
        "iptables-nft -F ufw-user-input && iptables-nft -F ufw-user-forward && \
         iptables-nft -A ufw-user-input -p tcp --dport 22 -j ACCEPT && ip6tables-nft -F ufw6-user-forward",
    );
    let took = back_in(&t.host, "ip filter ufw-user-forward");
    eprintln!("lume's accepts back in ufw's chains after {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    // `firewall-cmd --reload` replaces its table whole.
    t.host.exec_ok(&format!(
        "(echo 'table inet firewalld'; echo 'delete table inet firewalld'; cat {}) | nft -f -",
        fixture("firewalld.nft")
    ));
    let took = back_in(&t.host, "inet firewalld filter_FORWARD");
    eprintln!("lume's accepts back in firewalld's table after {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
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
                "repaired: inserted lume's accepts at the top of {chain}"
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
    std::thread::sleep(Duration::from_secs(1));
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
    t.lume_ok(&["stop", "web"]);
    assert_eq!(lume_rules(&t.host), Vec::new());
    assert!(!t.host.exec_ok("nft list tables").contains("inet lume"));

    // Turned off: lume leaves those chains alone and the doctor says why NAT fails.
    t.home.write_settings(
        "natSubnet: 203.0.113.0/24\nhostSubnet: 192.0.2.0/24\nuserSubnet: 198.51.100.0/24\nfirewallAccommodation: false\n",
    );
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
         iptables-nft -A ufw-user-input -i lume0 -p udp --dport 67 -j ACCEPT && \
         iptables-nft -A ufw-user-input -i lume0 -p udp --dport 53 -j ACCEPT && \
         iptables-nft -A ufw-user-input -i lume0 -p tcp --dport 53 -j ACCEPT",
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
    assert!(
        fw.iter().any(|(ok, d)| *ok
            && d.contains("table ip filter chain FORWARD")
            && d.contains("rules of your own in Docker's chain ip filter DOCKER-USER")),
        "{fw:?}"
    );
    t.lume_ok(&["stop", "web", "--timeout", "1"]);
    t.host
        .exec_ok(&format!("nft -f {}", fixture("firewalld.nft")));

    // On by default again, on a host without those tools: lume's table marks
    // nothing; Docker starting while the VM runs gets lume's accepts and the
    // marks within a second.
    t.home.write_settings(
        "natSubnet: 203.0.113.0/24\nhostSubnet: 192.0.2.0/24\nuserSubnet: 198.51.100.0/24\n",
    );
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
    wait_for("the mark chain", Duration::from_secs(1), || {
        marks().then_some(())
    });
    eprintln!("lume's accepts in a newly started Docker's DOCKER-USER after {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");

    // The setting changed while the VM runs: the watcher applies it within a second.
    t.home.write_settings(
        "natSubnet: 203.0.113.0/24\nhostSubnet: 192.0.2.0/24\nuserSubnet: 198.51.100.0/24\nfirewallAccommodation: false\n",
    );
    wait_for("lume's accepts removed", Duration::from_secs(2), || {
        lume_rules(&t.host).is_empty().then_some(())
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(lume_rules(&t.host), Vec::new(), "not put back");
    t.home.write_settings(
        "natSubnet: 203.0.113.0/24\nhostSubnet: 192.0.2.0/24\nuserSubnet: 198.51.100.0/24\n",
    );
    let took = back_in(&t.host, "ip filter DOCKER-USER");
    assert!(took < Duration::from_secs(2), "{took:?}");
    let log = std::fs::read_to_string(t.home.vm_dir("web").join("lume.log")).unwrap();
    assert!(
        log.contains("firewallAccommodation changed to false in ")
            && log.contains("firewallAccommodation changed to true in "),
        "{log}"
    );
    t.lume_ok(&["stop", "web", "--timeout", "1"]);
    assert_eq!(lume_rules(&t.host), Vec::new());
}
