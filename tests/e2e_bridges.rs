//! lume's shared bridges, in a throw-away network namespace: lume deletes
//! only bridges it created (marked with the alias "lume") and refuses to take
//! over an existing one; a member whose liveness cannot be decided keeps the
//! network up.

mod common;

use std::path::PathBuf;

use common::Netns;
use lume::network::kernel::netlink::Netlink;
use lume::network::shared::{
    JoinRequest, Kind, Liveness, Member, Networks, SharedError, SharedNet, liveness_of,
};
use lume::vm::config::MacAddress;
use lume::vm::lock::VmLock;

fn net(kind: Kind, bridge: &str, subnet: &str, dir: PathBuf) -> SharedNet {
    SharedNet {
        kind,
        bridge: bridge.into(),
        configured: subnet.parse().unwrap(),
        explicit: true,
        configured6: None,
        dir,
    }
}

#[test]
fn a_foreign_bridge_is_refused_and_never_deleted() {
    let ns = Netns::new("bm");
    ns.exec_ok("ip link add br0 type bridge && ip link set br0 up");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    let (refused, own_alias) = ns.within(move || {
        let foreign = net(Kind::Host, "br0", "192.0.2.0/24", root.join("host"));
        let refused = match foreign.bring_up() {
            Err(e @ SharedError::ForeignBridge { .. }) => e.to_string(),
            other => panic!("br0 was adopted: {other:?}"),
        };
        foreign.take_down();
        let mut nl = Netlink::open().unwrap();
        assert!(nl.link_info("br0").unwrap().is_some(), "br0 was deleted");

        let own = net(Kind::Host, "lumetb0", "198.51.100.0/24", root.join("own"));
        own.bring_up().unwrap();
        own.bring_up().unwrap(); // its own bridge: used again
        let alias = nl.link_info("lumetb0").unwrap().unwrap().alias;
        own.take_down();
        assert!(
            nl.link_info("lumetb0").unwrap().is_none(),
            "own bridge left"
        );
        (refused, alias)
    });
    assert!(
        refused.starts_with("hostBridge 'br0' is an existing interface that lume did not create")
            && refused.contains("--network bridged:br0"),
        "{refused}"
    );
    assert_eq!(own_alias.as_deref(), Some("lume"));
    assert!(ns.exec_ok("ip -o link show br0").contains("br0"));
}

#[test]
fn an_undecidable_liveness_tears_nothing_down() {
    let ns = Netns::new("bl");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("run");
    let vm_dir = tmp.path().join("vm");
    std::fs::create_dir_all(&vm_dir).unwrap();
    let lock = vm_dir.join(".lock");
    assert_eq!(liveness_of(&vm_dir), Liveness::Dead, "no lock file");
    let held = VmLock::try_acquire(&lock).unwrap().unwrap();
    assert_eq!(liveness_of(&vm_dir), Liveness::Alive);
    drop(held);
    assert_eq!(liveness_of(&vm_dir), Liveness::Dead, "lock free");
    // A lock that cannot be checked (a symlink loop: ELOOP).
    std::fs::remove_file(&lock).unwrap();
    std::os::unix::fs::symlink(".lock", &lock).unwrap();
    assert_eq!(liveness_of(&vm_dir), Liveness::Unknown);

    let (kept, bridge_kept, collected, bridge_gone) = ns.within(move || {
        let nets = Networks {
            root: root.clone(),
            nat: net(Kind::Nat, "lumetn0", "203.0.113.0/24", root.join("nat")),
            accommodate: true,
            settings_file: root.join("config.yaml"),
            firewall: std::sync::Arc::new(lume::firewall::nft::Nft),
            host: net(Kind::Host, "lumeth0", "192.0.2.0/24", root.join("host")),
        };
        nets.host.bring_up().unwrap();
        let member = Member {
            vm: "v".into(),
            vm_dir: vm_dir.clone(),
            mac: MacAddress([2, 0, 0, 0, 0, 9]),
            ip: "192.0.2.2".parse().unwrap(),
            tap: "ltnone".into(),
            publish: Vec::new(),
            no_ipv6: false,
        };
        let members = nets.host.dir.join("members");
        std::fs::create_dir_all(&members).unwrap();
        let record = members.join(format!("{}.json", member.id()));
        std::fs::write(&record, serde_json::to_vec(&member).unwrap()).unwrap();
        let mut nl = Netlink::open().unwrap();

        nets.collect().unwrap();
        let kept = record.exists();
        let bridge_kept = nl.link_info("lumeth0").unwrap().is_some();

        // Provably dead now: collected, and the network taken down.
        std::fs::remove_file(vm_dir.join(".lock")).unwrap();
        nets.collect().unwrap();
        let collected = !record.exists();
        let bridge_gone = nl.link_info("lumeth0").unwrap().is_none();
        (kept, bridge_kept, collected, bridge_gone)
    });
    assert!(kept && bridge_kept, "an undecidable member was collected");
    assert!(collected && bridge_gone, "a dead member was not collected");
}

/// An upgrade keeps running VMs' network: a bridge the previous release
/// created (no mark) while its VMs still run is adopted and marked by the
/// next VM that joins, not refused.
#[test]
fn a_bridge_of_the_previous_release_with_running_vms_is_adopted() {
    let ns = Netns::new("bu");
    // What the previous release left while one of its VMs runs: the bridge
    // without a mark, the VM's tap in it, its membership record.
    ns.exec_ok(
        "ip link add lumetu0 type bridge && ip addr add 192.0.2.1/24 dev lumetu0 && ip link set lumetu0 up \
         && ip tuntap add ltuold mode tap && ip link set ltuold master lumetu0 \
         && ip tuntap add ltunew mode tap",
    );
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("run");
    let old_vm = tmp.path().join("old");
    std::fs::create_dir_all(&old_vm).unwrap();
    let _running = VmLock::try_acquire(&old_vm.join(".lock")).unwrap().unwrap();
    let members = root.join("host/members");
    std::fs::create_dir_all(&members).unwrap();
    let old = Member {
        vm: "old".into(),
        vm_dir: old_vm.clone(),
        mac: MacAddress([2, 0, 0, 0, 0, 1]),
        ip: "192.0.2.2".parse().unwrap(),
        tap: "ltuold".into(),
        publish: Vec::new(),
        no_ipv6: false,
    };
    // The record exactly as the previous release wrote it.
    std::fs::write(
        members.join(format!("{}.json", old.id())),
        format!(
            r#"{{"vm":"old","vmDir":"{}","mac":"02:00:00:00:00:01","ip":"192.0.2.2","tap":"ltuold","publish":[]}}"#,
            old_vm.display()
        ),
    )
    .unwrap();
    std::fs::write(root.join("host/subnet"), "192.0.2.0/24").unwrap();
    // Its dnsmasq, started with its configuration (no `user=` line).
    let dir = root.join("host");
    std::fs::create_dir_all(dir.join("hosts.d")).unwrap();
    std::fs::write(dir.join("dnsmasq.leases"), "").unwrap();
    let old_conf = format!(
        "# Written by lume; replaced at every start.\ninterface=lumetu0\nbind-interfaces\nexcept-interface=lo\n\
         listen-address=192.0.2.1\ndhcp-range=192.0.2.2,192.0.2.254,255.255.255.0,3600\n\
         dhcp-hostsdir={d}/hosts.d\ndhcp-leasefile={d}/dnsmasq.leases\npid-file={d}/dnsmasq.pid\n\
         dhcp-authoritative\ndhcp-rapid-commit\nno-hosts\nlog-facility={d}/dnsmasq.log\nlog-dhcp\n\
         dhcp-option=option:router\ndhcp-option=option:dns-server\nport=0\n",
        d = dir.display()
    );
    std::fs::write(dir.join("dnsmasq.conf"), old_conf).unwrap();
    ns.exec_ok(&format!(
        "dnsmasq --conf-file={}",
        dir.join("dnsmasq.conf").display()
    ));
    let old_pid = std::fs::read_to_string(dir.join("dnsmasq.pid")).unwrap();
    let new_vm = tmp.path().join("new");
    std::fs::create_dir_all(&new_vm).unwrap();
    let (joined, alias, kept, restarted) = ns.within(move || {
        let nets = Networks {
            root: root.clone(),
            nat: net(Kind::Nat, "lumetv0", "203.0.113.0/24", root.join("nat")),
            accommodate: true,
            settings_file: root.join("config.yaml"),
            firewall: std::sync::Arc::new(lume::firewall::nft::Nft),
            host: net(Kind::Host, "lumetu0", "192.0.2.0/24", root.join("host")),
        };
        let joined = nets.join(&JoinRequest {
            kind: Kind::Host,
            vm: "new",
            vm_dir: &new_vm,
            mac: MacAddress([2, 0, 0, 0, 0, 2]),
            tap: "ltunew",
            publish: &[],
            exclusive_mac: false,
            ipv6: true,
        });
        // Waits for the dnsmasq the join started, as a run's supervisor does.
        let joined = joined.map(|mut j| {
            if let Some(start) = j.dnsmasq.take() {
                start.wait().unwrap();
            }
            j.ip
        });
        let mut nl = Netlink::open().unwrap();
        let alias = nl.link_info("lumetu0").unwrap().unwrap().alias;
        let kept = nets.host.members().len();
        let dns = nets.host.dnsmasq();
        let restarted = dns.pid().map(|p| p.to_string());
        let conf = std::fs::read_to_string(dns.conf_path()).unwrap();
        nets.host.take_down();
        (joined, alias, kept, (restarted, conf))
    });
    let (restarted, conf) = restarted;
    assert_eq!(joined.unwrap().to_string(), "192.0.2.3");
    assert_eq!(alias.as_deref(), Some("lume"), "the bridge was not marked");
    assert_eq!(
        kept, 2,
        "the running VM of the previous release lost its record"
    );
    // Its dnsmasq could not read the private reservations: restarted with
    // this release's configuration.
    assert!(restarted.is_some(), "dnsmasq is not running");
    assert_ne!(restarted.as_deref(), Some(old_pid.trim()));
    assert!(conf.contains("\nuser="), "{conf}");
}
