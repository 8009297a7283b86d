//! `user` mode through passt: one unprivileged passt process per VM, owned by
//! the VM's supervisor, speaking QEMU's stream protocol (a 4-byte big-endian
//! length before every Ethernet frame) over a socketpair.
//!
//! passt 0.0~git20230309 (Debian 12) connects whatever destination a guest
//! frame names, loopback included: a crafted SYN to 127.0.0.1, 0.0.0.0, ::1
//! or ::ffff:127.0.0.1 reaches the host's loopback services even with
//! `--no-map-gw` (checked by `tests/e2e_loopback.rs`). So lume sits between
//! QEMU and passt: a relay in the supervisor passes every frame from passt
//! to QEMU unchanged, and from QEMU to passt (unless the VM opted in to host
//! loopback) only ARP, IPv4 and IPv6 frames whose destination is not a
//! loopback or "this host" address ([`guest_frame_allowed`]). It never
//! passes on the neighbour solicitations that would make the guest give
//! up its IPv6 address ([`NdGuard`]).
//!
//! IPv6: with an IPv6 default route, passt answers the guest's router
//! solicitation with the /64 of the host's own global address (autonomous,
//! on-link, "managed" flag set) and its DHCPv6 server hands out the host's
//! own address; it NATs the guest's IPv6 flows to the host's sockets as it
//! does IPv4's. The relay notes the global addresses the guest uses in that
//! prefix ([`Seen6`]), which VMDetails lists. Without an IPv6 default route
//! passt is run `--ipv4-only` and sends no router advertisement: the guest
//! has no IPv6 route and fails at once.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, Shutdown};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::publish::{PortMapping, Proto};
use super::user::UserNet;

/// Why passt could not be started.
#[derive(Debug, thiserror::Error)]
pub enum PasstError {
    #[error(
        "passt was not found: user-mode networking needs it (apt-get install passt), or use --network none"
    )]
    Missing,
    #[error("Cannot start passt for user-mode networking")]
    Spawn(#[source] io::Error),
    #[error(
        "passt exited at once ({status}): {messages}; see {log} and check that the published host ports are free"
    )]
    Exited {
        status: String,
        messages: String,
        log: PathBuf,
    },
    #[error(
        "The user 'nobody' does not exist: lume runs passt as nobody when started as root; create that user, or run lume as an unprivileged user for --network user"
    )]
    NoUnprivilegedUser,
    #[error("Cannot create the socket between QEMU and passt")]
    Socket(#[source] io::Error),
}

/// The passt binary: `passt` on PATH.
pub fn find_passt() -> Result<PathBuf, PasstError> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join("passt"))
        .find(|p| p.is_file())
        .ok_or(PasstError::Missing)
}

/// passt's `-t`/`-u` value for the mappings of one protocol (`none` if none).
fn port_spec(publish: &[PortMapping], proto: Proto) -> Vec<String> {
    let specs: Vec<String> = publish
        .iter()
        .filter(|p| p.proto == proto)
        .map(|p| match p.host_ip {
            Some(ip) => format!("{ip}/{}:{}", p.host_port, p.guest_port),
            None => format!("{}:{}", p.host_port, p.guest_port),
        })
        .collect();
    if specs.is_empty() {
        vec!["none".into()]
    } else {
        specs
    }
}

/// The MAC address passt uses towards the guest (its own fallback value).
const PASST_MAC: &str = "9a:55:9a:55:9a:55";

/// Whether this network namespace has an IPv4 default route
/// (`/proc/net/route`, readable without privileges).
fn has_ipv4_default_route() -> bool {
    std::fs::read_to_string("/proc/net/route")
        .map(|t| {
            t.lines()
                .skip(1)
                .any(|l| l.split_whitespace().nth(1) == Some("00000000"))
        })
        .unwrap_or(false)
}

/// The /64 prefixes passt 0.0~git20230309 may advertise to the guest: those
/// of the global addresses on the interfaces of the host's IPv6 default
/// routes (passt takes the first route's interface as its template and
/// advertises the /64 of one of its addresses, whatever the host's own
/// prefix length). Empty without an IPv6 default route: passt then has no
/// IPv6 for the guest. Read from
/// `/proc/net/ipv6_route` and `/proc/net/if_inet6` (no privileges needed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Uplink6 {
    /// The upper 64 bits of each prefix.
    pub prefixes: Vec<u64>,
}

impl Uplink6 {
    /// This network namespace's, now.
    pub fn of_host() -> Self {
        let routes = std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
        let addrs = std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default();
        Self::parse(&routes, &addrs)
    }

    /// From the text of `/proc/net/ipv6_route` and `/proc/net/if_inet6`.
    pub fn parse(routes: &str, addrs: &str) -> Self {
        const RTF_UP: u32 = 0x1;
        const RTF_REJECT: u32 = 0x200;
        // dest plen src plen next-hop metric refcnt use flags device
        let devices: Vec<&str> = routes
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                let flags = u32::from_str_radix(f.get(8)?, 16).ok()?;
                (f.len() == 10
                    && f[0].bytes().all(|b| b == b'0')
                    && f[1] == "00"
                    && flags & RTF_UP != 0
                    && flags & RTF_REJECT == 0
                    && f[9] != "lo")
                    .then(|| f[9])
            })
            .collect();
        // address index prefix-length scope flags device
        let mut prefixes: Vec<u64> = addrs
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                if f.len() != 6 || !devices.contains(&f[5]) || f[3] != "00" || f[0].len() != 32 {
                    return None;
                }
                let a = u128::from_str_radix(f[0], 16).ok()?;
                Some((a >> 64) as u64)
            })
            .collect();
        prefixes.sort_unstable();
        prefixes.dedup();
        Self { prefixes }
    }

    /// Whether passt gives the guest IPv6.
    pub fn usable(&self) -> bool {
        !self.prefixes.is_empty()
    }

    fn contains(&self, a: Ipv6Addr) -> bool {
        self.prefixes.contains(&((u128::from(a) >> 64) as u64))
    }
}

/// The most guest IPv6 addresses [`Seen6`] records in a run.
const MAX_SEEN6: usize = 8;

/// The guest's global IPv6 addresses in passt's prefixes, as its frames
/// show them (the source of any IPv6 packet; the target of duplicate
/// address detection, which the guest sends before using an address), in
/// a file of the run directory, one a line ([`read_guest6`]). The first
/// [`MAX_SEEN6`] only: a guest sending from ever new addresses makes no
/// more than that many writes.
#[derive(Debug)]
struct Seen6 {
    uplink: Uplink6,
    file: PathBuf,
    addrs: Vec<Ipv6Addr>,
}

impl Seen6 {
    fn note(&mut self, frame: &[u8]) {
        if self.addrs.len() >= MAX_SEEN6 {
            return;
        }
        let Some(a) = guest6_claim(frame).filter(|a| self.uplink.contains(*a)) else {
            return;
        };
        if self.addrs.contains(&a) {
            return;
        }
        self.addrs.push(a);
        let text: String = self.addrs.iter().map(|a| format!("{a}\n")).collect();
        // Runtime information: atomic, no fsync needed.
        let _ = crate::util::atomic::write_runtime(&self.file, text.as_bytes());
    }
}

/// The global unicast address an IPv6 frame from the guest claims as the
/// guest's: its source, or, for duplicate address detection (a neighbour
/// solicitation from ::), its target.
fn guest6_claim(frame: &[u8]) -> Option<Ipv6Addr> {
    if frame.get(12..14)? != [0x86, 0xdd] {
        return None;
    }
    let addr = |at: usize| -> Option<Ipv6Addr> {
        let b: [u8; 16] = frame.get(at..at + 16)?.try_into().ok()?;
        Some(Ipv6Addr::from(b))
    };
    let a = if is_dad(frame) { addr(62)? } else { addr(22)? };
    // 2000::/3, the global unicast space.
    (a.segments()[0] & 0xe000 == 0x2000).then_some(a)
}

/// Whether a frame is an IPv6 duplicate address detection probe: a
/// neighbour solicitation from :: ([`solicited`]).
fn is_dad(frame: &[u8]) -> bool {
    matches!(solicited(frame), Some((true, _)))
}

/// The target of a neighbour solicitation (ICMPv6 type 135 right after the
/// IPv6 header), and whether it comes from :: (duplicate address
/// detection).
fn solicited(frame: &[u8]) -> Option<(bool, Ipv6Addr)> {
    if frame.get(12..14)? != [0x86, 0xdd] || *frame.get(20)? != 58 || *frame.get(54)? != 135 {
        return None;
    }
    let target: [u8; 16] = frame.get(62..78)?.try_into().ok()?;
    let dad = frame.get(22..38)?.iter().all(|b| *b == 0);
    Some((dad, Ipv6Addr::from(target)))
}

/// Whether `target`'s interface identifier is the EUI-64 one of the frame's
/// source MAC: the address stateless autoconfiguration gives the sender.
fn own_eui64(frame: &[u8], target: Ipv6Addr) -> bool {
    let Some(mac) = frame.get(6..12).and_then(|m| m.try_into().ok()) else {
        return false;
    };
    u128::from(target) as u64
        == super::prefix6::eui64_interface_id(crate::vm::config::MacAddress(mac))
}

/// The most addresses [`NdGuard`] remembers.
const MAX_CLAIMED: usize = 16;

/// Keeps passt 0.0~git20230309 from taking the guest's IPv6 addresses: it
/// leaves duplicate address detection (solicitations from ::) unanswered,
/// but answers every other neighbour solicitation with its own MAC, one
/// for the guest's own still tentative address too; a guest that connects
/// to its new address before detection ended (1 s) asks for it, gets that
/// answer and gives the address up ("IPv6 duplicate address ... used by
/// 9a:55:9a:55:9a:55"). So no solicitation for an address the guest
/// probed for (the first [`MAX_CLAIMED`]) or for its own EUI-64 address in
/// any prefix (asked for before its probe) goes to passt. Nothing else is
/// on the guest's link to answer them.
#[derive(Debug, Default)]
struct NdGuard {
    claimed: Vec<Ipv6Addr>,
}

impl NdGuard {
    /// Whether `frame` may go to passt.
    fn passes(&mut self, frame: &[u8]) -> bool {
        match solicited(frame) {
            Some((true, target)) => {
                if self.claimed.len() < MAX_CLAIMED && !self.claimed.contains(&target) {
                    self.claimed.push(target);
                }
                true
            }
            Some((false, target)) => !self.claimed.contains(&target) && !own_eui64(frame, target),
            None => true,
        }
    }
}

/// The guest's IPv6 addresses recorded in `file` (user mode; see
/// [`Passt::guest6_file`]), sorted. The file is in the VM's directory, which
/// its owner may change: it is opened without following a symlink and read
/// only so far, and anything but an address is skipped.
pub fn read_guest6(file: &Path) -> Vec<Ipv6Addr> {
    let Some(bytes) = crate::util::atomic::read_capped(file, 64 * MAX_SEEN6 as u64) else {
        return Vec::new();
    };
    let text = String::from_utf8(bytes).unwrap_or_default();
    let mut addrs: Vec<Ipv6Addr> = text.lines().filter_map(|l| l.parse().ok()).collect();
    addrs.sort();
    addrs.dedup();
    addrs
}

/// passt's arguments (the connected socket is descriptor 3). Without an
/// IPv4 default route passt finds no "external interface" and refuses to
/// start, so it is told to take loopback as its template (`-i lo`): the
/// guest still gets its address and published ports work (IPv6 is off).
/// Without `ipv6` (see [`Uplink6`]), passt is told `--ipv4-only`: it would
/// switch IPv6 off by itself without an IPv6 default route, but then lume,
/// not passt's own look at the host, decides what VMDetails reports.
pub fn arguments(
    net: &UserNet,
    publish: &[PortMapping],
    host_loopback: bool,
    default_route: bool,
    ipv6: bool,
) -> Vec<String> {
    let mut a: Vec<String> = [
        "--foreground",
        "--quiet",
        "--fd",
        "3",
        "--mac-addr",
        PASST_MAC,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if !default_route {
        a.extend(["--interface".into(), "lo".into()]);
    }
    if !(default_route && ipv6) {
        a.push("--ipv4-only".into());
    }
    a.extend([
        "--address".into(),
        net.guest_address().to_string(),
        "--netmask".into(),
        net.0.prefix.to_string(),
        "--gateway".into(),
        net.gateway().to_string(),
        "--dns-forward".into(),
        net.dns().to_string(),
    ]);
    if !host_loopback {
        // The gateway is not the host: connections to it are not redirected to 127.0.0.1/::1.
        a.push("--no-map-gw".into());
    }
    // Explicit -u: otherwise passt also forwards the TCP port numbers for UDP.
    for (flag, proto) in [("-t", Proto::Tcp), ("-u", Proto::Udp)] {
        for spec in port_spec(publish, proto) {
            a.push(flag.into());
            a.push(spec);
        }
    }
    a
}

/// Whether a frame from the guest may go on to passt: ARP, and IPv4/IPv6
/// whose destination passt would not turn into a connection to this host's
/// loopback (127.0.0.0/8, 0.0.0.0/8 — a connect to 0.0.0.0 reaches
/// 127.0.0.1 —, ::1, ::, IPv4-compatible and IPv4-mapped forms of those).
/// Anything else (VLAN tags, unknown ethertypes, truncated headers) is
/// dropped: passt has nothing to do with it.
pub fn guest_frame_allowed(frame: &[u8]) -> bool {
    let Some(ethertype) = frame.get(12..14) else {
        return false;
    };
    match u16::from_be_bytes([ethertype[0], ethertype[1]]) {
        0x0806 => true,
        0x0800 => match frame.get(30..34) {
            Some(d) => ipv4_allowed(Ipv4Addr::new(d[0], d[1], d[2], d[3])),
            None => false,
        },
        0x86dd => match frame.get(38..54) {
            Some(d) => {
                let mut b = [0u8; 16];
                b.copy_from_slice(d);
                ipv6_allowed(Ipv6Addr::from(b))
            }
            None => false,
        },
        _ => false,
    }
}

fn ipv4_allowed(a: Ipv4Addr) -> bool {
    !(a.is_loopback() || a.octets()[0] == 0)
}

fn ipv6_allowed(a: Ipv6Addr) -> bool {
    let o = a.octets();
    if a.is_loopback() || a.is_unspecified() {
        return false;
    }
    // ::a.b.c.d (IPv4-compatible) and ::ffff:a.b.c.d (IPv4-mapped).
    if o[..10].iter().all(|b| *b == 0) && (o[10..12] == [0, 0] || o[10..12] == [0xff, 0xff]) {
        return ipv4_allowed(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    }
    true
}

/// Largest frame relayed (QEMU's own NET_BUFSIZE); longer ones are skipped.
const MAX_FRAME: usize = 4096 + 65536;

/// How much the relay reads at once: many frames per system call.
const RELAY_BUFFER: usize = 1 << 20;

/// Copies QEMU's frames to passt, dropping the neighbour solicitations
/// [`NdGuard`] keeps from passt and (with `filter`) the frames
/// [`guest_frame_allowed`] refuses, and noting the guest's IPv6 addresses
/// in `seen`. Frames arrive as QEMU's stream netdev sends them (a 4-byte
/// big-endian length, then the frame); as many as one read brings are
/// parsed, and the allowed ones go to passt in one write, each with its
/// length right before it (this passt loses its place in the stream when a
/// read ends inside a length, which a length written apart from its frame
/// makes likely).
fn relay_filtered(mut from: UnixStream, mut to: UnixStream, filter: bool, mut seen: Option<Seen6>) {
    let mut buf = vec![0u8; RELAY_BUFFER.max(4 + MAX_FRAME)];
    let mut out = Vec::with_capacity(buf.len());
    let mut nd = NdGuard::default();
    let (mut have, mut skip) = (0usize, 0usize);
    'relay: loop {
        let n = match from.read(&mut buf[have..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        have += n;
        let mut pos = 0;
        out.clear();
        loop {
            if skip > 0 {
                // The rest of a frame too long for passt: read past it.
                let k = skip.min(have - pos);
                skip -= k;
                pos += k;
                if skip > 0 {
                    break;
                }
            }
            let Some(head) = buf.get(pos..pos + 4).filter(|_| have - pos >= 4) else {
                break;
            };
            let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
            if len > MAX_FRAME {
                pos += 4;
                skip = len;
                continue;
            }
            if have - pos - 4 < len {
                break;
            }
            let frame = &buf[pos + 4..pos + 4 + len];
            if let Some(seen) = seen.as_mut() {
                seen.note(frame);
            }
            if nd.passes(frame) && (!filter || guest_frame_allowed(frame)) {
                out.extend_from_slice(&buf[pos..pos + 4 + len]);
            }
            pos += 4 + len;
        }
        if !out.is_empty() && to.write_all(&out).is_err() {
            break 'relay;
        }
        buf.copy_within(pos..have, 0);
        have -= pos;
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

/// Copies bytes from `from` to `to` unchanged.
fn relay_plain(mut from: UnixStream, mut to: UnixStream) {
    let mut buf = vec![0u8; RELAY_BUFFER];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

/// A running passt and the relay in front of it. Dropping it stops passt
/// and waits for it and the relay threads.
#[derive(Debug)]
pub struct Passt {
    child: Child,
    /// Our ends of the sockets, to unblock the relay on drop.
    ends: Vec<UnixStream>,
    relays: Vec<JoinHandle<()>>,
    pub log: PathBuf,
    /// Where the relay records the guest's IPv6 addresses
    /// ([`read_guest6`]); `None` when passt gives the guest no IPv6.
    pub guest6_file: Option<PathBuf>,
}

impl Passt {
    /// Starts passt for `net` with `publish`, logging to `run_dir/passt.log`.
    /// Returns it and the descriptor QEMU's `-netdev stream` gets.
    pub fn start(
        net: &UserNet,
        publish: &[PortMapping],
        host_loopback: bool,
        run_dir: &Path,
    ) -> Result<(Self, OwnedFd), PasstError> {
        let binary = find_passt()?;
        let (ours, theirs) = UnixStream::pair().map_err(PasstError::Socket)?;
        let log = run_dir.join("passt.log");
        // Through a pipe into a capped log: whatever passt prints about a
        // guest's traffic cannot fill the host's disk.
        let (log_read, log_write) = crate::hypervisor::logcap::pipe().map_err(PasstError::Spawn)?;
        crate::hypervisor::logcap::pump(log_read, &log, crate::hypervisor::logcap::cap())
            .map_err(PasstError::Spawn)?;
        let log_file = std::fs::File::from(log_write);
        let passt_fd = theirs.as_raw_fd();
        let supervisor = nix::unistd::getpid();
        // As root, passt would switch to nobody by itself, and that change of
        // credentials clears PR_SET_PDEATHSIG: switch before exec instead,
        // then ask for the signal.
        let drop_to = if nix::unistd::geteuid().is_root() {
            let user = nix::unistd::User::from_name("nobody")
                .ok()
                .flatten()
                .ok_or(PasstError::NoUnprivilegedUser)?;
            Some((user.uid, user.gid))
        } else {
            None
        };
        let default_route = has_ipv4_default_route();
        let uplink6 = Some(Uplink6::of_host()).filter(|u| default_route && u.usable());
        let guest6_file = run_dir.join("guest-ipv6");
        // What an earlier run saw is not this run's.
        match std::fs::remove_file(&guest6_file) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(PasstError::Spawn(e)),
            _ => {}
        }
        let mut cmd = Command::new(&binary);
        cmd.args(arguments(
            net,
            publish,
            host_loopback,
            default_route,
            uplink6.is_some(),
        ))
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().map_err(PasstError::Spawn)?)
        .stderr(log_file);
        // SAFETY: the closure runs between fork and exec and only calls
        // async-signal-safe functions (setgroups, setgid, setuid, prctl,
        // getppid, setpgid, dup2, close_range or fcntl, _exit).
        unsafe {
            cmd.pre_exec(move || {
                if let Some((uid, gid)) = drop_to {
                    nix::unistd::setgroups(&[])?;
                    nix::unistd::setgid(gid)?;
                    nix::unistd::setuid(uid)?;
                }
                // Dies with the supervisor; its own process group keeps a
                // terminal's Ctrl-C away from it.
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
                if nix::unistd::getppid() != supervisor {
                    libc::_exit(1);
                }
                nix::unistd::setpgid(nix::unistd::Pid::from_raw(0), nix::unistd::Pid::from_raw(0))?;
                // dup2 leaves descriptor 3 without FD_CLOEXEC: passt inherits it.
                if libc::dup2(passt_fd, 3) < 0 {
                    return Err(io::Error::last_os_error());
                }
                // Nothing but descriptor 3 crosses exec.
                crate::util::fds::cloexec_from(4);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => PasstError::Missing,
            _ => PasstError::Spawn(e),
        })?;
        drop(theirs);
        let mut p = Self {
            child,
            ends: Vec::new(),
            relays: Vec::new(),
            log,
            guest6_file: uplink6.is_some().then(|| guest6_file.clone()),
        };
        p.check_started()?;
        // With host loopback the relay drops nothing; it still notes the
        // guest's IPv6 addresses.
        let seen = uplink6.map(|uplink| Seen6 {
            uplink,
            file: guest6_file,
            addrs: Vec::new(),
        });
        let (relay_end, qemu_end) = UnixStream::pair().map_err(PasstError::Socket)?;
        let clone = |s: &UnixStream| s.try_clone().map_err(PasstError::Socket);
        p.ends.push(clone(&ours)?);
        p.ends.push(clone(&relay_end)?);
        let (q_in, p_out) = (clone(&relay_end)?, clone(&ours)?);
        let filter = !host_loopback;
        p.relays.push(std::thread::spawn(move || {
            relay_filtered(q_in, p_out, filter, seen)
        }));
        p.relays
            .push(std::thread::spawn(move || relay_plain(ours, relay_end)));
        Ok((p, OwnedFd::from(qemu_end)))
    }

    /// passt refuses bad options and busy ports at once: give it a moment.
    fn check_started(&mut self) -> Result<(), PasstError> {
        let until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < until {
            if let Ok(Some(status)) = self.child.try_wait() {
                let messages = std::fs::read_to_string(&self.log).unwrap_or_default();
                let messages = messages
                    .lines()
                    .filter(|l| !l.contains("syslog") && !l.trim().is_empty())
                    .collect::<Vec<_>>()
                    .join("; ");
                return Err(PasstError::Exited {
                    status: status.to_string(),
                    messages,
                    log: self.log.clone(),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// passt's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            Signal::SIGTERM,
        );
        let until = Instant::now() + Duration::from_secs(2);
        while !matches!(self.child.try_wait(), Ok(Some(_))) {
            if Instant::now() > until {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for s in &self.ends {
            let _ = s.shutdown(Shutdown::Both);
        }
        for h in self.relays.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[0x52, 0x54, 0, 1, 2, 3]);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    fn v4(dst: [u8; 4]) -> Vec<u8> {
        let mut ip = vec![0x45, 0, 0, 40, 0, 1, 0, 0, 64, 6, 0, 0, 10, 0, 2, 15];
        ip.extend_from_slice(&dst);
        ip.extend_from_slice(&[0; 20]);
        eth(0x0800, &ip)
    }

    fn v6(dst: &str) -> Vec<u8> {
        let mut ip = vec![0x60, 0, 0, 0, 0, 20, 6, 64];
        ip.extend_from_slice(&"2001:db8::2".parse::<Ipv6Addr>().unwrap().octets());
        ip.extend_from_slice(&dst.parse::<Ipv6Addr>().unwrap().octets());
        ip.extend_from_slice(&[0; 20]);
        eth(0x86dd, &ip)
    }

    #[test]
    fn loopback_destinations_are_dropped() {
        for d in [[127, 0, 0, 1], [127, 1, 2, 3], [0, 0, 0, 0], [0, 1, 2, 3]] {
            assert!(!guest_frame_allowed(&v4(d)), "{d:?}");
        }
        for d in [
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "::ffff:0.0.0.0",
        ] {
            assert!(!guest_frame_allowed(&v6(d)), "{d}");
        }
    }

    #[test]
    fn other_destinations_pass() {
        for d in [
            [198, 51, 100, 1],
            [10, 0, 2, 2],
            [255, 255, 255, 255],
            [224, 0, 0, 1],
        ] {
            assert!(guest_frame_allowed(&v4(d)), "{d:?}");
        }
        for d in ["2001:db8::1", "fe80::1", "ff02::2", "::ffff:198.51.100.1"] {
            assert!(guest_frame_allowed(&v6(d)), "{d}");
        }
        assert!(guest_frame_allowed(&eth(0x0806, &[0; 28])));
    }

    #[test]
    fn truncated_and_unknown_frames_are_dropped() {
        let f = v4([198, 51, 100, 1]);
        for n in 0..34 {
            assert!(!guest_frame_allowed(&f[..n]), "{n}");
        }
        let f = v6("2001:db8::1");
        assert!(!guest_frame_allowed(&f[..53]));
        assert!(!guest_frame_allowed(&eth(0x8100, &[0; 64])), "VLAN tag");
        assert!(!guest_frame_allowed(&eth(0x88cc, &[0; 64])));
    }

    #[test]
    fn the_relay_passes_allowed_frames_and_skips_the_rest() {
        let (mut qemu, relay_in) = UnixStream::pair().unwrap();
        let (relay_out, mut passt) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || relay_filtered(relay_in, relay_out, true, None));
        let ok = v4([198, 51, 100, 1]);
        let huge = vec![0u8; MAX_FRAME + 1];
        let dad = ns("::", "2001:db8::9");
        let own = ns("fe80::1", "2001:db8::9");
        let other = ns("fe80::1", "2001:db8::8");
        // The sender's own EUI-64 address (eth()'s MAC is 52:54:00:01:02:03).
        let eui = ns("fe80::1", "2001:db8:ff::5054:ff:fe01:203");
        // Address resolution of another address passes, duplicate address
        // detection too (passt leaves it unanswered); of the address
        // the guest probed for (after the probe) it does not.
        let sent = [
            &v4([127, 0, 0, 1]),
            &huge,
            &ok,
            &v6("::1"),
            &other,
            &eui,
            &dad,
            &own,
            &ok,
        ];
        for f in sent {
            qemu.write_all(&(f.len() as u32).to_be_bytes()).unwrap();
            qemu.write_all(f).unwrap();
        }
        drop(qemu);
        let mut out = Vec::new();
        passt.read_to_end(&mut out).unwrap();
        t.join().unwrap();
        let mut want = Vec::new();
        for f in [&ok, &other, &dad, &ok] {
            want.extend_from_slice(&(f.len() as u32).to_be_bytes());
            want.extend_from_slice(f);
        }
        assert_eq!(out, want);
    }

    const ROUTES: &str = "\
20010db800ff00000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000002 00000000 00000001      up0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 20010db800ff00000000000000000001 00000400 00000001 00000000 00000003      up0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
";
    const ADDRS: &str = "\
20010db800ff00000000000000000002 03 40 00 82      up0
fe80000000000000048560fffe5ab8c8 03 40 20 c0      up0
00000000000000000000000000000001 01 80 10 80       lo
20010db800aa00000000000000000005 03 80 00 82      up0
20010db800bb00000000000000000005 04 40 00 82      up1
";

    #[test]
    fn the_uplink_prefixes_are_those_of_the_default_routes_interface() {
        let u = Uplink6::parse(ROUTES, ADDRS);
        assert_eq!(u.prefixes, [0x2001_0db8_00aa_0000, 0x2001_0db8_00ff_0000]);
        assert!(u.contains("2001:db8:ff::5054:ff:fe12:3456".parse().unwrap()));
        // A /128 on the host: passt still advertises its /64.
        assert!(u.contains("2001:db8:aa::1".parse().unwrap()));
        assert!(!u.contains("2001:db8:bb::1".parse().unwrap()));
        // A second default route (another uplink): its prefixes too.
        let two = format!(
            "{ROUTES}00000000000000000000000000000000 00 00000000000000000000000000000000 00 \
             20010db800bb00000000000000000001 00000800 00000001 00000000 00000003      up1\n"
        );
        assert!(Uplink6::parse(&two, ADDRS).contains("2001:db8:bb::1".parse().unwrap()));
        // Only the unreachable default route (no IPv6 uplink): nothing.
        let only_lo: String = ROUTES.lines().skip(2).map(|l| format!("{l}\n")).collect();
        assert!(!Uplink6::parse(&only_lo, ADDRS).usable());
        assert!(!Uplink6::parse("", ADDRS).usable());
        assert!(!Uplink6::parse("garbage\n1 2 3", "x").usable());
    }

    /// An ICMPv6 neighbour solicitation from `src` for `target`.
    fn ns(src: &str, target: &str) -> Vec<u8> {
        let mut ip = vec![0x60, 0, 0, 0, 0, 24, 58, 255];
        ip.extend_from_slice(&src.parse::<Ipv6Addr>().unwrap().octets());
        ip.extend_from_slice(&"ff02::1:ff12:3456".parse::<Ipv6Addr>().unwrap().octets());
        ip.extend_from_slice(&[135, 0, 0, 0, 0, 0, 0, 0]);
        ip.extend_from_slice(&target.parse::<Ipv6Addr>().unwrap().octets());
        eth(0x86dd, &ip)
    }

    #[test]
    fn the_guests_claims_are_its_sources_and_its_duplicate_address_detection() {
        let a: Ipv6Addr = "2001:db8::2".parse().unwrap();
        assert_eq!(guest6_claim(&v6("2001:db8::1")), Some(a));
        let t: Ipv6Addr = "2001:db8:ff::5054:ff:fe12:3456".parse().unwrap();
        assert_eq!(guest6_claim(&ns("::", &t.to_string())), Some(t));
        // Link-local, unspecified, not IPv6, truncated: no claim.
        assert_eq!(guest6_claim(&ns("fe80::1", &t.to_string())), None);
        assert_eq!(guest6_claim(&ns("::", "fe80::1")), None);
        assert_eq!(guest6_claim(&v4([198, 51, 100, 1])), None);
        assert_eq!(guest6_claim(&ns("::", &t.to_string())[..70]), None);
        assert!(is_dad(&ns("::", &t.to_string())));
        assert!(
            !is_dad(&ns("fe80::1", &t.to_string())),
            "address resolution"
        );
        assert!(!is_dad(&v6("2001:db8::1")));
    }

    #[test]
    fn seen_addresses_are_recorded_in_the_prefix_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("guest-ipv6");
        let mut seen = Seen6 {
            uplink: Uplink6 {
                prefixes: vec![0x2001_0db8_00ff_0000],
            },
            file: file.clone(),
            addrs: Vec::new(),
        };
        seen.note(&ns("::", "2001:db8:ff::9"));
        seen.note(&ns("::", "2001:db8:ee::9"));
        seen.note(&ns("::", "2001:db8:ff::9"));
        assert_eq!(
            read_guest6(&file),
            ["2001:db8:ff::9".parse::<Ipv6Addr>().unwrap()]
        );
        for i in 0..100 {
            seen.note(&ns("::", &format!("2001:db8:ff::{i:x}")));
        }
        assert_eq!(read_guest6(&file).len(), MAX_SEEN6);
        // Not followed: a symlink, another file's text.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(read_guest6(&link).is_empty());
        std::fs::write(&file, "root:x:0:0\n::1\n").unwrap();
        assert_eq!(read_guest6(&file), [Ipv6Addr::LOCALHOST]);
    }

    #[test]
    fn arguments_map_publish_and_the_loopback_choice() {
        let n: UserNet = "198.51.100.0/24".parse().unwrap();
        let p: Vec<PortMapping> = ["127.0.0.1:8080:80", "2222:22", "5353:53/udp"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let a = arguments(&n, &p, false, true, true).join(" ");
        assert!(!a.contains("--ipv4-only"), "{a}");
        assert!(!a.contains("--interface"), "{a}");
        assert!(a.contains("--fd 3"), "{a}");
        assert!(
            a.contains("--address 198.51.100.15 --netmask 24 --gateway 198.51.100.2"),
            "{a}"
        );
        assert!(a.contains("--dns-forward 198.51.100.3"), "{a}");
        assert!(a.contains("--no-map-gw"), "{a}");
        assert!(
            a.contains("-t 127.0.0.1/8080:80 -t 2222:22 -u 5353:53"),
            "{a}"
        );
        let a = arguments(&n, &[], true, false, true).join(" ");
        assert!(a.contains("--interface lo"), "{a}");
        assert!(
            a.contains("--ipv4-only"),
            "loopback has no IPv6 for the guest: {a}"
        );
        assert!(!a.contains("--no-map-gw"), "{a}");
        assert!(a.ends_with("-t none -u none"), "{a}");
        let a = arguments(&n, &[], false, true, false).join(" ");
        assert!(a.contains("--ipv4-only"), "{a}");
    }
}
