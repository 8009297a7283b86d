//! lume's shared bridges, in a throw-away network namespace: lume deletes
//! only bridges it created (marked with the alias "lume") and refuses to take
//! over an existing one; a member whose liveness cannot be decided keeps the
//! network up.

mod common;

use std::path::PathBuf;

use common::Netns;
use lume::network::netlink::Netlink;
use lume::network::shared::{
    Kind, Liveness, Member, Networks, SharedError, SharedNet, liveness_of,
};
use lume::vm::config::MacAddress;
use lume::vm::lock::VmLock;

fn net(kind: Kind, bridge: &str, subnet: &str, dir: PathBuf) -> SharedNet {
    SharedNet {
        kind,
        bridge: bridge.into(),
        configured: subnet.parse().unwrap(),
        explicit: true,
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
