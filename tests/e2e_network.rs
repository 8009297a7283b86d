//! End to end, the network modes, in namespaces the tests create (see
//! `common::Lan`): a bridged VM leased by the LAN's own DHCP server, NAT VMs
//! masqueraded as the host and reachable through a published port, a
//! host-only VM that reaches the host but not the LAN, and nothing left over
//! after the VMs stop.

mod common;

use std::net::IpAddr;
use std::time::Duration;

use common::{HOST_UPLINK_IP, LAN_PEER, Lan, Recorder, wait_console, wait_for};
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(180);

fn links(ns: &common::Netns) -> String {
    ns.exec_ok("ip -br link")
}

#[test]
fn bridged_vm_is_a_peer_on_the_lan() {
    let t = Lan::new("nb");
    t.create("br1", "bridged:up0", &[], "");
    t.lume_ok(&["run", "br1", "--detach"]);
    let console = wait_console(&t.home, "br1", "LUME-GUEST: lease eth0 198.51.100.1", BOOT);
    let leased = console
        .lines()
        .find_map(|l| l.strip_prefix("LUME-GUEST: lease eth0 "))
        .and_then(|l| l.split('/').next())
        .unwrap()
        .to_string();
    // Leased by the LAN's dnsmasq from its own range, not by lume.
    let last: u8 = leased.rsplit('.').next().unwrap().parse().unwrap();
    assert!((100..=150).contains(&last), "{leased}");
    let d = wait_for(
        "lume get to report the DHCP address",
        Duration::from_secs(20),
        || {
            let d = t.get("br1");
            (d["ipAddress"] == leased.as_str()).then_some(d)
        },
    );
    assert_eq!(d["network"]["mode"], "bridged:up0");
    assert_eq!(d["network"]["parent"], "up0");
    let dev = d["network"]["hostDevice"].as_str().unwrap().to_string();
    assert!(
        dev.starts_with("lt"),
        "a tap joined to a plain interface by a macvlan: {dev}"
    );
    assert_eq!(d["network"]["attachment"], "attached");
    assert!(
        d["network"]["note"]
            .as_str()
            .unwrap()
            .contains("cannot reach this host")
    );

    // A LAN peer reaches the guest directly.
    let page = wait_for(
        "the guest's page from the LAN",
        Duration::from_secs(20),
        || {
            t.lan
                .http_get(&format!("{leased}:80"))
                .filter(|p| p.contains("lume-test-guest"))
        },
    );
    assert!(page.contains(d["macAddress"].as_str().unwrap()));

    // Plain `bridged` picks the uplink even while a VPN-like tun holds the routes.
    t.host.exec_ok(
        "ip tuntap add dev tun0 mode tun && ip addr add 192.0.2.77/32 dev tun0 && ip link set tun0 up && \
         ip route add 0.0.0.0/1 dev tun0 && ip route add 128.0.0.0/1 dev tun0",
    );
    t.create("br2", "bridged", &[], "");
    t.lume_ok(&["run", "br2", "--detach"]);
    assert_eq!(t.get("br2")["network"]["parent"], "up0");
    wait_console(&t.home, "br2", "LUME-GUEST: lease eth0 198.51.100.1", BOOT);

    // Refusals name the interfaces that would work.
    let err = t.lume_fails(&["create", "x", "--network", "bridged:eth9"]);
    assert!(
        err.contains("'eth9' does not exist") && err.contains("up0"),
        "{err}"
    );
    let err = t.lume_fails(&["create", "x", "--network", "bridged:tun0"]);
    assert!(
        err.contains("cannot be bridged") && err.contains("up0"),
        "{err}"
    );
    let err = t.lume_fails(&["run", "br1", "--network", "bridged:lo"]);
    assert!(err.contains("'lo' cannot be bridged"), "{err}");

    t.lume_ok(&["stop", "br1"]);
    t.lume_ok(&["stop", "br2"]);
    let after = links(&t.host);
    assert!(!after.contains("lmv") && !after.contains("lt"), "{after}");
}

#[test]
fn nat_and_host_only_vms() {
    let t = Lan::new("nn");
    let peer = Recorder::start(&t.lan, &format!("{LAN_PEER}:9000"));
    let probe = format!("lume.probe={LAN_PEER}:9000");
    let bound = format!("{HOST_UPLINK_IP}:8090:80");
    t.create(
        "nat1",
        "nat",
        &["--publish", "8080:80", "--publish", &bound],
        &probe,
    );
    t.create("nat2", "nat", &[], &probe);
    t.create("ho", "host", &[], &probe);
    let forward_before = t.host.exec_ok("cat /proc/sys/net/ipv4/ip_forward");
    for vm in ["nat1", "nat2", "ho"] {
        t.lume_ok(&["run", vm, "--detach"]);
    }
    let mut addrs = Vec::new();
    for vm in ["nat1", "nat2", "ho"] {
        let subnet = if vm == "ho" { "192.0.2." } else { "203.0.113." };
        wait_console(
            &t.home,
            vm,
            &format!("LUME-GUEST: lease eth0 {subnet}"),
            BOOT,
        );
        let d = wait_for(
            &format!("{vm}'s address from lume's leases"),
            Duration::from_secs(20),
            || {
                let d = t.get(vm);
                d["ipAddress"].as_str().map(str::to_string)
            },
        );
        assert!(d.starts_with(subnet), "{vm}: {d}");
        addrs.push(d);
    }
    assert_ne!(addrs[0], addrs[1], "distinct NAT addresses");
    // lume changes the firewall through a netfilter socket of its own
    // (libnftables): none of them reaches QEMU or dnsmasq, the processes
    // that face guests.
    let held = t.host.exec_ok(
        r#"n=0; me=$(readlink /proc/self/ns/net)
        for p in $(pgrep -x 'qemu-system-x86|dnsmasq'); do
          [ "$(readlink /proc/$p/ns/net)" = "$me" ] || continue; n=$((n+1))
          for f in /proc/$p/fd/*; do
            l=$(readlink "$f") || continue
            case $l in socket:*) i=${l#socket:[}; i=${i%]}
              awk -v i="$i" -v p="$p" '$2 == 12 && $10 == i { print "process " p " holds netfilter socket " i }' /proc/self/net/netlink;;
            esac
          done
        done; echo "checked $n""#,
    );
    assert_eq!(held.trim(), "checked 5", "{held}");
    let nat1: Value = t.get("nat1");
    assert_eq!(nat1["network"]["parent"], "lume0");

    // NAT guests reach the LAN peer, masqueraded as the host.
    wait_console(
        &t.home,
        "nat1",
        "LUME-GUEST: probe ok",
        Duration::from_secs(30),
    );
    wait_console(
        &t.home,
        "nat2",
        "LUME-GUEST: probe ok",
        Duration::from_secs(30),
    );
    let sources = peer.sources();
    assert!(!sources.is_empty());
    let host_ip: IpAddr = HOST_UPLINK_IP.parse().unwrap();
    assert!(sources.iter().all(|s| *s == host_ip), "{sources:?}");

    // The host reaches NAT and host-only guests directly.
    for ip in [&addrs[0], &addrs[1], &addrs[2]] {
        let page = t.host.http_get(&format!("{ip}:80"));
        assert!(
            page.is_some_and(|p| p.contains("lume-test-guest")),
            "host to {ip}"
        );
    }
    // The published port answers from the LAN and from the host itself,
    // through the host's own address.
    for from in [&t.lan, &t.host] {
        let page = from
            .http_get(&format!("{HOST_UPLINK_IP}:8080"))
            .unwrap_or_default();
        assert!(
            page.contains(nat1["macAddress"].as_str().unwrap()),
            "from {}: {page}",
            from.name
        );
    }
    // A port published on one host address answers there (from the LAN
    // and the host), and not on the host's other addresses.
    for from in [&t.lan, &t.host] {
        let page = from
            .http_get(&format!("{HOST_UPLINK_IP}:8090"))
            .unwrap_or_default();
        assert!(
            page.contains(nat1["macAddress"].as_str().unwrap()),
            "8090 from {}: {page}",
            from.name
        );
    }
    t.host.exec_ok("ip addr add 198.51.100.3/24 dev up0");
    assert!(
        t.lan.http_get("198.51.100.3:8090").is_none(),
        "a port bound to {HOST_UPLINK_IP} answered on another host address"
    );
    assert!(
        t.lan
            .http_get("198.51.100.3:8080")
            .unwrap_or_default()
            .contains(nat1["macAddress"].as_str().unwrap()),
        "a port published on every address did not answer on the second one"
    );
    // The LAN cannot reach NAT guests directly, nor the host-only guest.
    t.lan.exec_ok(
        "ip route add 203.0.113.0/24 via 198.51.100.2 && ip route add 192.0.2.0/24 via 198.51.100.2",
    );
    assert!(
        t.lan.http_get(&format!("{}:80", addrs[0])).is_none(),
        "LAN to NAT guest"
    );
    assert!(
        t.lan.http_get(&format!("{}:80", addrs[2])).is_none(),
        "LAN to host-only guest"
    );

    // The host-only guest never reaches the LAN.
    std::thread::sleep(Duration::from_secs(2));
    let ho = std::fs::read_to_string(t.home.vm_dir("ho").join("console.log")).unwrap();
    assert!(
        ho.contains("LUME-GUEST: probe fail") && !ho.contains("LUME-GUEST: probe ok"),
        "{ho}"
    );
    let ho_ip: IpAddr = addrs[2].parse().unwrap();
    assert!(!peer.sources().contains(&ho_ip));

    // A host port is published once per namespace.
    t.create("nat3", "nat", &["--publish", "8080:81"], "");
    let err = t.lume_fails(&["run", "nat3", "--detach"]);
    assert!(
        err.contains("Host port 8080/tcp is already published by VM 'nat1'"),
        "{err}"
    );
    // A VM of the same name in another storage location is another member.
    let other = t.home.path().join("other-storage");
    let o = other.to_str().unwrap();
    let args = common::guest_create_args("nat2", "nat", &["--storage", o], "");
    t.lume_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    t.lume_ok(&["run", "nat2", "--detach", "--storage", o]);
    let twin = wait_for("the twin's address", Duration::from_secs(60), || {
        let d: Value =
            serde_json::from_str(&t.lume_ok(&["get", "nat2", "-f", "json", "--storage", o]))
                .ok()?;
        d[0]["ipAddress"].as_str().map(str::to_string)
    });
    assert!(!addrs.contains(&twin), "{twin} vs {addrs:?}");
    t.lume_ok(&["stop", "nat2", "--storage", o]);
    assert!(
        t.host.http_get(&format!("{}:80", addrs[1])).is_some(),
        "nat2 in the default storage still served"
    );

    // Stopping one NAT VM keeps the network for the other.
    t.lume_ok(&["stop", "nat2"]);
    assert!(links(&t.host).contains("lume0"));
    assert!(t.host.http_get(&format!("{}:80", addrs[0])).is_some());

    for vm in ["nat1", "ho"] {
        t.lume_ok(&["stop", vm]);
    }
    // Nothing left: links, firewall table, dnsmasq, forwarding restored.
    let l = links(&t.host);
    assert!(
        !l.contains("lume0") && !l.contains("lume-host0") && !l.contains("lt"),
        "{l}"
    );
    let tables = t.host.exec_ok("nft list tables");
    assert!(!tables.contains("lume"), "{tables}");
    let procs = common::sh(&format!(
        "for p in $(ip netns pids {}); do cat /proc/$p/comm 2>/dev/null; done; true",
        t.host.name
    ));
    assert!(!procs.contains("dnsmasq"), "{procs}");
    assert_eq!(
        t.host.exec_ok("cat /proc/sys/net/ipv4/ip_forward"),
        forward_before
    );
}

#[test]
fn a_killed_supervisor_leaves_nothing_after_the_next_command() {
    let t = Lan::new("nk");
    t.create("k1", "nat", &["--publish", "8081:80"], "");
    t.create("k2", "bridged:up0", &[], "");
    t.create("k3", "nat", &[], "");
    t.lume_ok(&["run", "k3", "--detach"]);
    t.lume_ok(&["run", "k1", "--detach"]);
    t.lume_ok(&["run", "k2", "--detach"]);
    for vm in ["k1", "k2"] {
        let state: Value = serde_json::from_str(
            &std::fs::read_to_string(t.home.vm_dir(vm).join("run.json")).unwrap(),
        )
        .unwrap();
        common::sh(&format!("kill -9 {}", state["pid"]));
    }
    wait_for("both VMs stopped", Duration::from_secs(10), || {
        (t.get("k1")["status"] == "stopped" && t.get("k2")["status"] == "stopped").then_some(())
    });
    // k3 still runs: its watcher collects k1's share of the NAT network (its
    // published port) without waiting for a lume command.
    wait_for("k3's watcher to collect k1", Duration::from_secs(5), || {
        let log = std::fs::read_to_string(t.home.vm_dir("k3").join("lume.log")).ok()?;
        log.contains("VM 'k1' stopped without leaving lume0")
            .then_some(())
    });
    let rules = t.host.exec_ok("nft list table inet lume");
    assert!(!rules.contains("8081"), "{rules}");
    t.lume_ok(&["stop", "k3"]);
    // A macvtap recorded by a supervisor killed before it wrote run.json.
    t.host
        .exec_ok("ip link add link up0 name lmvdead01 type macvtap mode bridge");
    std::fs::write(t.home.vm_dir("k2").join(".macvtap"), "lmvdead01").unwrap();
    // The next lume command that touches the network collects the rest
    // (`stop` of a VM that is not running is an error, as lume's).
    assert!(t.lume_fails(&["stop", "k1"]).contains("is not running"));
    assert!(t.lume_fails(&["stop", "k2"]).contains("is not running"));
    let l = links(&t.host);
    assert!(
        !l.contains("lume0") && !l.contains("lmv") && !l.contains("lt"),
        "{l}"
    );
    assert!(!t.host.exec_ok("nft list tables").contains("lume"));
    assert!(!t.home.vm_dir("k2").join(".macvtap").exists());
    // And both start again at once.
    t.lume_ok(&["run", "k1", "--detach"]);
    wait_console(&t.home, "k1", "LUME-GUEST: lease eth0 203.0.113.", BOOT);
    t.lume_ok(&["stop", "k1"]);
}

#[test]
fn bridged_on_a_linux_bridge_joins_it_with_a_tap() {
    let t = Lan::new("ns");
    // A server-style host: the uplink is enslaved to a bridge that holds the address.
    t.host.exec_ok(
        "ip link add hbr0 type bridge && ip link set up0 master hbr0 && ip link set hbr0 up && \
         ip addr del 198.51.100.2/24 dev up0 && ip addr add 198.51.100.2/24 dev hbr0 && \
         ip route add default via 198.51.100.1",
    );
    let err = t.lume_fails(&["create", "x", "--network", "bridged:up0"]);
    assert!(
        err.contains("part of bridge hbr0") && err.contains("hbr0"),
        "{err}"
    );
    t.create("tb", "bridged", &[], "");
    // Docker on the host: it loads br_netfilter, so the frames between the
    // bridge's ports cross its FORWARD chain, whose policy drops. lume keeps
    // an accept for hbr0's own traffic in DOCKER-USER while the VM runs:
    // the guest gets its lease from the LAN from its first start.
    let brnf = t
        .host
        .exec_ok("cat /proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null || true")
        .trim()
        == "1";
    let docker =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/host_firewalls/docker.rules");
    let load_docker = || {
        t.host
            .exec_ok(&format!("iptables-nft-restore < {}", docker.display()));
    };
    if brnf {
        load_docker();
    } else {
        eprintln!(
            "br_netfilter is not available in this kernel: lume's accept for bridged frames and its doctor check are not exercised"
        );
    }
    let lume_rules = || -> Vec<String> {
        t.host
            .exec_ok("nft -a list ruleset")
            .lines()
            .filter(|l| l.contains("comment \"lume: ") && !l.contains("table inet lume"))
            .map(|l| l.trim().to_string())
            .collect()
    };
    t.lume_ok(&["run", "tb", "--detach"]);
    let d = t.get("tb");
    assert_eq!(d["network"]["parent"], "hbr0");
    let tap = d["network"]["hostDevice"].as_str().unwrap().to_string();
    assert!(tap.starts_with("lt"), "{tap}");
    assert!(
        t.host
            .exec_ok("ip -br link show master hbr0")
            .contains(&tap)
    );
    let console = wait_console(&t.home, "tb", "LUME-GUEST: lease eth0 198.51.100.1", BOOT);
    let leased = console
        .lines()
        .find_map(|l| l.strip_prefix("LUME-GUEST: lease eth0 "))
        .and_then(|l| l.split('/').next())
        .unwrap()
        .to_string();
    wait_for("the snooped address", Duration::from_secs(20), || {
        (t.get("tb")["ipAddress"] == leased.as_str()).then_some(())
    });
    let log = std::fs::read_to_string(t.home.vm_dir("tb").join("lume.log")).unwrap();
    assert!(
        log.contains(&format!("Guest address from DHCP: {leased}")),
        "{log}"
    );
    // On a bridge the host itself reaches the guest too.
    assert!(
        t.host
            .http_get(&format!("{leased}:80"))
            .is_some_and(|p| p.contains("lume-test-guest"))
    );
    let from_lan = || {
        t.lan
            .http_get(&format!("{leased}:80"))
            .is_some_and(|p| p.contains("lume-test-guest"))
    };
    assert!(from_lan());
    if brnf {
        let doctor = || {
            let out = t.host.lume(&t.home, &["network", "doctor", "-f", "json"]);
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            v["checks"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == "br_netfilter")
                .cloned()
                .unwrap()
        };
        // Exactly one accept, for hbr0's own traffic, below Docker's rules.
        let rules = lume_rules();
        assert_eq!(rules.len(), 1, "{rules:?}");
        assert!(
            rules[0].starts_with("iifname \"hbr0\" oifname \"hbr0\"")
                && rules[0].contains("accept comment \"lume: hbr0 bridged\""),
            "{rules:?}"
        );
        let user = t.host.exec_ok("iptables-nft -S DOCKER-USER");
        assert!(
            user.contains("-A DOCKER-USER -i hbr0 -o hbr0 -m comment --comment \"lume: hbr0 bridged\" -j ACCEPT"),
            "{user}"
        );
        let check = doctor();
        assert_eq!(check["ok"], true, "{check}");
        assert!(
            check["detail"].as_str().unwrap().contains(
                "another tool's policy lume accommodated: lume's accept for frames bridged on hbr0 is in Docker's chain ip filter DOCKER-USER"
            ),
            "{check}"
        );
        // Docker restarting rewrites its chains without lume's accept: the
        // watcher puts it back.
        // (The watcher wakes on the nftables event, often before this test
        // could list the flushed chain: its log proves the repair.)
        load_docker();
        wait_for("lume's accept back", Duration::from_secs(5), || {
            let log =
                std::fs::read_to_string(t.home.vm_dir("tb").join("lume.log")).unwrap_or_default();
            (log.contains("repaired: added lume's accepts to Docker's chain ip filter DOCKER-USER")
                && lume_rules().len() == 1)
                .then_some(())
        });
        assert!(from_lan());

        // Turned off: the watcher takes lume's accept out within a second,
        // the LAN is cut off and the doctor gives the rule to add.
        t.home.write_settings(
            "natSubnet: 203.0.113.0/24\nhostSubnet: 192.0.2.0/24\nuserSubnet: 198.51.100.0/24\nfirewallAccommodation: false\nnatSubnet6: 2001:db8:64::/64\nhostSubnet6: 2001:db8:65::/64\n",
        );
        wait_for("lume's accept gone", Duration::from_secs(5), || {
            lume_rules().is_empty().then_some(())
        });
        let check = doctor();
        let detail = check["detail"].as_str().unwrap();
        assert_eq!(check["ok"], false, "{check}");
        assert!(
            detail.contains("frames bridged on hbr0 to table ip filter chain FORWARD")
                && detail.contains("firewallAccommodation is false")
                && detail.contains("iptables -I DOCKER-USER -i hbr0 -o hbr0 -j ACCEPT"),
            "{detail}"
        );
        assert!(
            !from_lan(),
            "Docker's policy drop lets bridged frames through"
        );
        t.host
            .exec_ok("iptables-nft -I DOCKER-USER -i hbr0 -o hbr0 -j ACCEPT");
        wait_for(
            "the LAN reaching the guest",
            Duration::from_secs(10),
            || from_lan().then_some(()),
        );
        let check = doctor();
        assert_eq!(check["ok"], true, "{check}");
        assert!(
            check["detail"]
                .as_str()
                .unwrap()
                .contains("rules of yours there accept hbr0"),
            "{check}"
        );
        // On again (the user's rule gone): lume's accept is back.
        t.host
            .exec_ok("iptables-nft -D DOCKER-USER -i hbr0 -o hbr0 -j ACCEPT");
        t.home.write_settings(
            "natSubnet: 203.0.113.0/24\nhostSubnet: 192.0.2.0/24\nuserSubnet: 198.51.100.0/24\nnatSubnet6: 2001:db8:64::/64\nhostSubnet6: 2001:db8:65::/64\n",
        );
        wait_for("lume's accept back", Duration::from_secs(5), || {
            (lume_rules().len() == 1).then_some(())
        });
        assert!(from_lan());
    }
    t.lume_ok(&["stop", "tb"]);
    assert!(!links(&t.host).contains(&tap));
    // Nothing of lume's is left in Docker's chains.
    assert_eq!(lume_rules(), Vec::<String>::new());
    if brnf {
        assert!(
            !t.host
                .exec_ok("iptables-nft -S DOCKER-USER")
                .contains("lume: ")
        );
        // A killed supervisor leaves its accept until the next lume command
        // that touches the VM collects it with the VM's record.
        t.lume_ok(&["run", "tb", "--detach"]);
        assert_eq!(lume_rules().len(), 1, "{:?}", lume_rules());
        let state: Value = serde_json::from_str(
            &std::fs::read_to_string(t.home.vm_dir("tb").join("run.json")).unwrap(),
        )
        .unwrap();
        common::sh(&format!("kill -9 {}", state["pid"]));
        wait_for("the VM stopped", Duration::from_secs(10), || {
            (t.get("tb")["status"] == "stopped").then_some(())
        });
        assert!(t.lume_fails(&["stop", "tb"]).contains("is not running"));
        assert_eq!(lume_rules(), Vec::<String>::new());
    }
}

/// lume waits for dnsmasq's start only once QEMU is spawned: a dnsmasq
/// that cannot start (here the DHCP port is taken) still fails the run with
/// dnsmasq's own message, and leaves no QEMU, tap, bridge, dnsmasq or
/// firewall table behind; the next run, with the port free, works.
#[test]
fn a_dnsmasq_that_cannot_start_fails_the_run_and_leaves_nothing() {
    let t = Lan::new("nd");
    t.create("d1", "nat", &[], "");
    let blocker = t
        .host
        .within(|| std::net::UdpSocket::bind("0.0.0.0:67").unwrap());
    let err = t.lume_fails(&["run", "d1", "--detach"]);
    assert!(
        err.contains("dnsmasq did not start for bridge lume0")
            && err.contains("Address already in use"),
        "{err}"
    );
    assert_eq!(t.get("d1")["status"], "stopped");
    assert!(!t.home.vm_dir("d1").join("run.json").exists());
    // No process is left in the namespace (QEMU, dnsmasq, a supervisor).
    let pids = common::sh(&format!("ip netns pids {}", t.host.name));
    assert_eq!(pids.trim(), "", "processes left in the namespace");
    let l = links(&t.host);
    assert!(
        !l.contains("lume0") && !l.contains("lt"),
        "nothing left: {l}"
    );
    assert!(!t.host.exec_ok("nft list tables").contains("lume"));
    drop(blocker);
    t.lume_ok(&["run", "d1", "--detach"]);
    assert_eq!(t.get("d1")["status"], "running");
    t.lume_ok(&["stop", "d1"]);
}

#[test]
fn a_chosen_nat_subnet_that_collides_with_a_route_is_refused() {
    let t = Lan::new("nc");
    t.host
        .exec_ok("ip route add 203.0.113.0/25 via 198.51.100.1");
    t.create("c1", "nat", &[], "");
    let err = t.lume_fails(&["run", "c1", "--detach"]);
    assert!(
        err.contains("natSubnet 203.0.113.0/24 collides with the host route 203.0.113.0/25 via 198.51.100.1 dev up0"),
        "{err}"
    );
    let l = links(&t.host);
    assert!(
        !l.contains("lume0") && !l.contains("lt"),
        "nothing left: {l}"
    );
    assert!(!t.host.exec_ok("nft list tables").contains("lume"));
    assert_eq!(t.get("c1")["status"], "stopped");
}

/// NAT VMs started at the same instant share their firewall writes (the
/// first to write the table writes every VM joined so far): each still
/// starts only once a table with its own rules is in place, gets an
/// address of its own, and its published port reaches it.
#[test]
fn nat_vms_started_together_each_get_their_address_and_port() {
    let t = Lan::new("nt");
    let vms = ["t1", "t2", "t3", "t4"];
    for (i, vm) in vms.iter().enumerate() {
        t.create(vm, "nat", &["--publish", &format!("{}:80", 8301 + i)], "");
    }
    let t = &t;
    std::thread::scope(|s| {
        let runs: Vec<_> = vms
            .iter()
            .map(|vm| s.spawn(move || t.lume_ok(&["run", vm, "--detach"])))
            .collect();
        for r in runs {
            r.join().unwrap();
        }
    });
    // Every `run --detach` has returned: every VM's rules are in the table.
    let rules = t.host.exec_ok("nft list table inet lume");
    for port in 8301..8305 {
        assert!(rules.contains(&port.to_string()), "{port}: {rules}");
    }
    let mut addrs = Vec::new();
    for vm in vms {
        wait_console(&t.home, vm, "LUME-GUEST: lease eth0 203.0.113.", BOOT);
        let ip = wait_for("the address in lume get", Duration::from_secs(20), || {
            t.get(vm)["ipAddress"].as_str().map(str::to_string)
        });
        addrs.push(ip);
    }
    let mut distinct = addrs.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), vms.len(), "{addrs:?}");
    for (i, vm) in vms.iter().enumerate() {
        let mac = t.get(vm)["macAddress"].as_str().unwrap().to_string();
        let page = wait_for("the published port", Duration::from_secs(20), || {
            t.lan
                .http_get(&format!("{HOST_UPLINK_IP}:{}", 8301 + i))
                .filter(|p| p.contains(&mac))
        });
        assert!(page.contains(&mac));
    }
    for vm in vms {
        t.lume_ok(&["stop", vm]);
    }
    assert!(!t.host.exec_ok("nft list tables").contains("lume"));
}
