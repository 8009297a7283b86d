//! A hostile guest's crafted IPv6 frames against lume's real bridge guard
//! (`bridge lume`, docs/networking.md "IPv6 (nat and host-only)") on real
//! taps: in a namespace the test creates, a bridge `lume0` with lume's
//! gateway addresses (2001:db8:64::1, fe80::1) and three guests' taps as
//! lume would have them: A (the attacker) and B (its victim) with the
//! network's IPv6, C kept off it (a VM under a network policy). The test
//! writes A's frames into its tap and reads what reaches B's and C's.

mod common;

use common::sh;

use common::frames::{plain, sum16};

use std::io::Write;
use std::net::Ipv6Addr;
use std::time::Duration;

use lume::firewall::GuestPort;
use lume::network::kernel::tap::Tap;
use lume::network::prefix6::Prefix6;
use lume::vm::config::MacAddress;

const MAC_A: [u8; 6] = [0x52, 0x54, 0, 0xaa, 0, 0x0a];
const MAC_B: [u8; 6] = [0x52, 0x54, 0, 0xaa, 0, 0x0b];
const MAC_C: [u8; 6] = [0x52, 0x54, 0, 0xaa, 0, 0x0c];
const GATEWAY: &str = "2001:db8:64::1";

fn prefix() -> Prefix6 {
    "2001:db8:64::/64".parse().unwrap()
}

fn eui(mac: [u8; 6]) -> Ipv6Addr {
    prefix().eui64(MacAddress(mac))
}

fn fold(s: u32) -> u16 {
    !(sum16(&[(s >> 24) as u8, (s >> 16) as u8, (s >> 8) as u8, s as u8]) as u16)
}

/// The frames that arrive on `tap` within `wait`, without their
/// virtio-net header.
fn drain(tap: &Tap, wait: Duration) -> Vec<Vec<u8>> {
    common::frames::drain(tap, wait)
        .into_iter()
        .map(|f| f[10..].to_vec())
        .collect()
}

/// An Ethernet frame carrying IPv6 with `next` as next header; `l4` gets
/// its checksum at `csum_at` (ICMPv6 2, UDP 6) over the pseudo header.
fn ipv6(
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    next: u8,
    mut l4: Vec<u8>,
    csum_at: Option<usize>,
) -> Vec<u8> {
    if let Some(at) = csum_at {
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&src.octets());
        pseudo.extend_from_slice(&dst.octets());
        pseudo.extend_from_slice(&(l4.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, next]);
        let c = fold(sum16(&pseudo) + sum16(&l4));
        l4[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
    let mut f = Vec::new();
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x86, 0xdd]);
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    f.extend_from_slice(&[next, 255]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&l4);
    f
}

fn all_nodes() -> ([u8; 6], Ipv6Addr) {
    ([0x33, 0x33, 0, 0, 0, 1], "ff02::1".parse().unwrap())
}

/// A neighbour advertisement for `target` (override set, `router` or not)
/// with `lladdr` as its link-layer address, to all nodes.
fn na(src_mac: [u8; 6], src: Ipv6Addr, target: Ipv6Addr, router: bool, tag: u8) -> Vec<u8> {
    let mut b = vec![
        136,
        0,
        0,
        0,
        0x20 | if router { 0x80 } else { 0 },
        0,
        0,
        tag,
    ];
    b.extend_from_slice(&target.octets());
    b.extend_from_slice(&[2, 1]);
    b.extend_from_slice(&src_mac);
    let (dm, d) = all_nodes();
    ipv6(src_mac, dm, src, d, 58, b, Some(2))
}

/// A neighbour solicitation for `target` from `src` (`::`: duplicate
/// address detection) to B's solicited-node group.
fn ns(src_mac: [u8; 6], src: Ipv6Addr, target: Ipv6Addr, tag: u8) -> Vec<u8> {
    ns_with(src_mac, src, target, tag, Some(src_mac))
}

/// [`ns`] with `lladdr` as its source link-layer address option (none
/// from `::`, which carries a duplicate-address nonce instead).
fn ns_with(
    src_mac: [u8; 6],
    src: Ipv6Addr,
    target: Ipv6Addr,
    tag: u8,
    lladdr: Option<[u8; 6]>,
) -> Vec<u8> {
    let mut b = vec![135, 0, 0, 0, 0, 0, 0, tag];
    b.extend_from_slice(&target.octets());
    match (src.is_unspecified(), lladdr) {
        (true, _) => b.extend_from_slice(&[14, 1, 1, 2, 3, 4, 5, 6]),
        (false, Some(mac)) => {
            b.extend_from_slice(&[1, 1]);
            b.extend_from_slice(&mac);
        }
        (false, None) => {}
    }
    let t = target.octets();
    let group = Ipv6Addr::from([
        0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, t[13], t[14], t[15],
    ]);
    let gm = [0x33, 0x33, 0xff, t[13], t[14], t[15]];
    ipv6(src_mac, gm, src, group, 58, b, Some(2))
}

/// A router advertisement for 2001:db8:666::/64 from `src`.
fn ra(src_mac: [u8; 6], src: Ipv6Addr, tag: u8) -> Vec<u8> {
    let mut b = vec![134, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, tag];
    b.extend_from_slice(&[3, 4, 64, 0xc0]);
    b.extend_from_slice(&86400u32.to_be_bytes());
    b.extend_from_slice(&14400u32.to_be_bytes());
    b.extend_from_slice(&[0; 4]);
    b.extend_from_slice(&"2001:db8:666::".parse::<Ipv6Addr>().unwrap().octets());
    let (dm, d) = all_nodes();
    ipv6(src_mac, dm, src, d, 58, b, Some(2))
}

/// UDP from `src` to `dst` (B's MAC), carrying `tag`.
fn udp(src_mac: [u8; 6], src: Ipv6Addr, dst_mac: [u8; 6], dst: Ipv6Addr, tag: &[u8]) -> Vec<u8> {
    let mut b = vec![0x9c, 0x40, 0, 9];
    b.extend_from_slice(&((8 + tag.len()) as u16).to_be_bytes());
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(tag);
    ipv6(src_mac, dst_mac, src, dst, 17, b, Some(6))
}

/// `frame`'s IPv6 payload behind an atomic fragment header.
fn fragmented(frame: &[u8]) -> Vec<u8> {
    let mut f = frame[..54].to_vec();
    let next = f[20];
    f[20] = 44;
    let len = u16::from_be_bytes([f[18], f[19]]) + 8;
    f[18..20].copy_from_slice(&len.to_be_bytes());
    f.extend_from_slice(&[next, 0, 0, 0, 0, 0, 0, 7]);
    f.extend_from_slice(&frame[54..]);
    f
}

/// The frames from A's MAC among `frames`.
fn from_a(frames: &[Vec<u8>]) -> Vec<&Vec<u8>> {
    frames.iter().filter(|f| f[6..12] == MAC_A).collect()
}

#[test]
fn hostile_ipv6_frames_do_not_get_past_the_bridge_guard() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return;
    }
    let netns = common::Netns::new("g6");
    netns.within(|| {
        // The taps have no IPv6 of their own (as lume's): nothing but
        // what crosses the bridge reaches their guests.
        sh("sysctl -qw net.ipv6.conf.default.disable_ipv6=1");
        let a = Tap::create("lta").unwrap();
        let b = Tap::create("ltb").unwrap();
        let c = Tap::create("ltc").unwrap();
        sh("ip link add lume0 type bridge && \
             for k in accept_ra=0 autoconf=0 accept_dad=0 addr_gen_mode=1 disable_ipv6=0; do \
               sysctl -qw net.ipv6.conf.lume0.$k; done && \
             ip link set lume0 up && ip addr add 2001:db8:64::1/64 dev lume0 nodad && \
             ip addr add fe80::1/64 dev lume0 nodad && ip addr add 203.0.113.1/24 dev lume0 && \
             for t in lta ltb ltc; do ip link set $t master lume0 && ip link set $t up; done");
        let port = |tap: &str, mac: [u8; 6], ip: &str, v6: bool| GuestPort {
            tap: tap.into(),
            mac: MacAddress(mac),
            ip: ip.parse().unwrap(),
            prefix6: v6.then(prefix),
        };
        // A's VM started first, then B's and C's, as lume writes them:
        // the tables whole, then only what B and C add.
        use lume::firewall::{FirewallState, nft};
        let state = |ports: Vec<GuestPort>| FirewallState {
            ports,
            ..Default::default()
        };
        let first = state(vec![port("lta", MAC_A, "203.0.113.10", true)]);
        let all = state(vec![
            port("lta", MAC_A, "203.0.113.10", true),
            port("ltb", MAC_B, "203.0.113.11", true),
            port("ltc", MAC_C, "203.0.113.12", false),
        ]);
        let change = nft::change_script(&nft::tables(&first), &nft::tables(&all)).unwrap();
        let file = std::env::temp_dir().join(format!("lume-g6-{}.nft", std::process::id()));
        for script in [nft::script(&first), change] {
            std::fs::write(&file, script).unwrap();
            sh(&format!("nft -f {}", file.display()));
        }
        std::fs::remove_file(&file).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        drain(&b, Duration::from_millis(300));
        drain(&c, Duration::from_millis(10));
        let write = |frame: &[u8]| {
            let mut f = std::fs::File::from(a.fd.try_clone().unwrap());
            f.write_all(&plain(frame)).unwrap();
        };
        let gw: Ipv6Addr = GATEWAY.parse().unwrap();
        let gw_ll: Ipv6Addr = "fe80::1".parse().unwrap();
        let a_ip = eui(MAC_A);
        let b_ll = Prefix6::link_local(MacAddress(MAC_B));

        // The control: A's own traffic to B, from its reserved address,
        // and to all nodes, reaches B (and C gets no IPv6 at all).
        write(&udp(MAC_A, a_ip, MAC_B, eui(MAC_B), b"control-unicast"));
        let (dm, d) = all_nodes();
        write(&udp(MAC_A, a_ip, dm, d, b"control-multicast"));
        // A's own neighbour discovery: a solicitation for B naming A's MAC,
        // a duplicate-address probe (with its nonce) for an address of A's.
        write(&ns(MAC_A, a_ip, eui(MAC_B), 20));
        write(&ns(MAC_A, Ipv6Addr::UNSPECIFIED, prefix().host(0xa1), 21));
        let got = drain(&b, Duration::from_millis(500));
        let icmp = |t: u8, tag: u8| {
            from_a(&got)
                .iter()
                .any(|f| f[20] == 58 && f[54] == t && f[61] == tag)
        };
        assert!(icmp(135, 20), "A's solicitation for B did not reach B");
        assert!(icmp(135, 21), "A's duplicate-address probe did not reach B");
        for tag in [&b"control-unicast"[..], b"control-multicast"] {
            assert!(
                from_a(&got)
                    .iter()
                    .any(|f| f.windows(tag.len()).any(|w| w == tag)),
                "{} did not reach B: {got:02x?}",
                String::from_utf8_lossy(tag)
            );
        }
        let to_c = drain(&c, Duration::from_millis(200));
        assert!(
            to_c.iter().all(|f| f[12..14] != [0x86, 0xdd]),
            "IPv6 reached the guest kept off it: {to_c:02x?}"
        );

        // The attacks: each must not reach B.
        let attacks: Vec<(&str, Vec<u8>)> = vec![
            (
                "an advertisement of the gateway's address",
                na(MAC_A, a_ip, gw, true, 1),
            ),
            (
                "an advertisement of the gateway's link-local address",
                na(MAC_A, a_ip, gw_ll, true, 2),
            ),
            (
                "an advertisement from the gateway's address",
                na(MAC_A, gw, gw, true, 3),
            ),
            (
                "a solicitation from the gateway's address",
                ns(MAC_A, gw, eui(MAC_B), 4),
            ),
            (
                "a solicitation from the gateway's link-local address",
                ns(MAC_A, gw_ll, b_ll, 5),
            ),
            (
                "an advertisement of B's reserved address",
                na(MAC_A, a_ip, eui(MAC_B), false, 6),
            ),
            (
                "an advertisement of B's link-local address",
                na(MAC_A, a_ip, b_ll, false, 7),
            ),
            (
                "a duplicate address probe for B's link-local address",
                ns(MAC_A, Ipv6Addr::UNSPECIFIED, b_ll, 8),
            ),
            (
                "a duplicate address probe for the gateway",
                ns(MAC_A, Ipv6Addr::UNSPECIFIED, gw, 9),
            ),
            (
                "a router advertisement",
                ra(MAC_A, Prefix6::link_local(MacAddress(MAC_A)), 10),
            ),
            (
                "a fragmented advertisement of B's address",
                fragmented(&na(MAC_A, a_ip, eui(MAC_B), false, 11)),
            ),
            (
                "a source outside the /64",
                udp(
                    MAC_A,
                    "2001:db8:99::1".parse().unwrap(),
                    MAC_B,
                    eui(MAC_B),
                    b"outside",
                ),
            ),
            (
                "a solicitation naming B's MAC as A's",
                ns_with(MAC_A, a_ip, eui(MAC_B), 12, Some(MAC_B)),
            ),
            (
                "a solicitation naming the broadcast MAC",
                ns_with(MAC_A, a_ip, eui(MAC_B), 13, Some([0xff; 6])),
            ),
            ("an advertisement naming B's MAC", {
                let mut f = na(MAC_A, a_ip, a_ip, false, 14);
                let n = f.len();
                f[n - 6..].copy_from_slice(&MAC_B);
                f
            }),
        ];
        for (what, frame) in &attacks {
            write(frame);
            let got = drain(&b, Duration::from_millis(300));
            // A sends nothing but what the test writes.
            assert!(
                from_a(&got).iter().all(|f| f[12..14] != [0x86, 0xdd]),
                "{what} reached B: {:02x?}",
                from_a(&got)
            );
        }

        // Many made-up sources: at most 16 besides A's reserved ones pass.
        for i in 0..40u16 {
            let src = prefix().host(0x5000 + u64::from(i));
            write(&udp(
                MAC_A,
                src,
                MAC_B,
                eui(MAC_B),
                format!("many-{i}").as_bytes(),
            ));
        }
        let got = drain(&b, Duration::from_millis(800));
        let passed = from_a(&got)
            .iter()
            .filter(|f| f.windows(5).any(|w| w == b"many-"))
            .count();
        assert_eq!(
            passed,
            lume::firewall::nft::SOURCES6,
            "sources past the cap"
        );
        // A's reserved address still passes after the cap is reached.
        write(&udp(MAC_A, a_ip, MAC_B, eui(MAC_B), b"reserved-after-cap"));
        let got = drain(&b, Duration::from_millis(300));
        assert!(
            from_a(&got)
                .iter()
                .any(|f| f.ends_with(b"reserved-after-cap")),
            "A's reserved address after the cap"
        );
    });
}
