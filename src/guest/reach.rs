//! Whether a running guest's SSH port answers (VMDetails `sshAvailable`,
//! the ssh column of `lume ls`), as lume does: a TCP connection to port 22
//! of the VM's address with a short timeout.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::network::NetworkMode;
use crate::network::driver::SshRoute;

use crate::vm::state::RunState;

/// How long `sshAvailable` waits for port 22 through user mode's loopback
/// forward.
pub const SSH_PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// How long `sshAvailable` waits for port 22 of a guest's own address. The
/// guest is on a link of this host's (lume's bridge, or the LAN): a guest
/// whose network is up answers within milliseconds, SYN-ACK or reset, even
/// under TCG on a loaded host; a guest that has its lease but has not
/// configured it yet answers nothing, and the wait is all lost — each
/// `lume get` polled for the address right after the lease waited the
/// whole timeout.
pub const ADDRESS_PROBE_TIMEOUT: Duration = Duration::from_millis(150);

/// Where the guest's SSH server is reached from this host: in `user` mode
/// the loopback port lume forwards to guest port 22 (recorded in run.json),
/// else port 22 of the guest's address.
pub fn ssh_target(state: &RunState, address: Option<IpAddr>) -> Option<SocketAddr> {
    if crate::network::driver::of(&state.network_mode).ssh_route() == SshRoute::LoopbackForward {
        let t = crate::guest::ssh::target("", state, None).ok()?;
        return Some(SocketAddr::new(t.host.parse().ok()?, t.port));
    }
    Some(SocketAddr::new(address?, 22))
}

/// Whether something accepts a TCP connection at `target` within `timeout`.
pub fn port_answers(target: SocketAddr, timeout: Duration) -> bool {
    TcpStream::connect_timeout(&target, timeout).is_ok()
}

/// How long a user-mode probe waits for the guest's first bytes.
pub const USER_BANNER_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether the guest's SSH server answers at `target` (from [`ssh_target`]).
/// Port 22 of a guest's address: it accepts a TCP connection, as lume
/// checks. User mode: passt, the host end of the forward, accepts every
/// connection itself whether or not the guest listens (and resets it when
/// the guest does not), and reaches the guest only once the client has
/// sent something: the probe sends an SSH identification line, and only the
/// guest's answer (sshd's banner) within [`USER_BANNER_TIMEOUT`] counts.
/// `wait`: how long port 22 of a guest's own address may take to accept
/// ([`ADDRESS_PROBE_TIMEOUT`] for `sshAvailable`, which is polled;
/// [`SSH_PROBE_TIMEOUT`] where one answer decides, as for a power request).
pub fn ssh_answers(mode: &NetworkMode, target: SocketAddr, wait: Duration) -> bool {
    if crate::network::driver::of(mode).ssh_route() != SshRoute::LoopbackForward {
        return port_answers(target, wait);
    }
    let Ok(mut s) = TcpStream::connect_timeout(&target, SSH_PROBE_TIMEOUT) else {
        return false;
    };
    if s.set_read_timeout(Some(USER_BANNER_TIMEOUT)).is_err()
        || s.set_write_timeout(Some(USER_BANNER_TIMEOUT)).is_err()
    {
        return false;
    }
    // passt opens the guest side of a forwarded connection only once the
    // client sends something: send our identification first (RFC 4253
    // lets either side start).
    if s.write_all(b"SSH-2.0-lume-probe\r\n").is_err() {
        return false;
    }
    let mut first = [0u8; 4];
    matches!(s.read(&mut first), Ok(n) if n > 0)
}

/// The file in a running VM's directory where its supervisor records its
/// own SSH probes while the guest boots (see [`Prober`]).
pub const PROBE_FILE: &str = "ssh.probe";

/// How often the supervisor probes while the guest boots.
const PROBE_PERIOD: Duration = Duration::from_millis(250);

/// How long the last record of a prober that has stopped stands for the
/// port's state; after that `sshAvailable` probes again itself.
const PROBE_FRESH_MS: u64 = 1_500;

/// How often a prober still at work rewrites an unchanged record, and how
/// long such a record stands: a prober that stops without its last record
/// (its supervisor stopped with Ctrl-Z, or starved) leaves a record that
/// ends within seconds, at a write every few seconds while a guest boots.
const PROBE_HEARTBEAT: Duration = Duration::from_secs(5);
const PROBING_STANDS_MS: u64 = 10_000;

/// How long after the VM's start the supervisor probes at most (a guest
/// that drops every connection to port 22 would otherwise be probed for
/// its whole run).
const PROBE_FOR: Duration = Duration::from_secs(600);

/// One probe, as the supervisor records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Probed {
    /// Where it probed; `None`: the guest had no address yet.
    target: Option<SocketAddr>,
    available: bool,
    /// When, in milliseconds of `CLOCK_BOOTTIME` (the same clock in every
    /// process, whatever the wall clock does).
    at: u64,
    /// Whether the prober goes on (`false`: its last record).
    probing: bool,
}

fn boot_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
        .unwrap_or(0)
}

/// The supervisor's answer for `target`, if its record stands (one of a
/// prober at work, under [`PROBING_STANDS_MS`] old, or the last one of a
/// prober that stopped under [`PROBE_FRESH_MS`] ago): `sshAvailable` then needs no probe of its
/// own. Only asked for a running VM, whose supervisor removed any earlier
/// run's record before the VM counted as running. This is what spares
/// `lume get`, polled for the address while the guest boots, the wait of a
/// probe sent before the guest has configured its lease (a connection
/// that is never answered, [`ADDRESS_PROBE_TIMEOUT`] lost on every call).
/// A record of no address or of another one says "not available": the
/// prober has not reached the guest there yet. `None`: no record that
/// stands (the prober stopped, or an earlier release's supervisor runs the
/// VM): probe.
pub fn recorded(dir: &Path, target: SocketAddr) -> Option<bool> {
    // Root's own file in the VM's directory, never what a link there
    // points to, and never more than a record's size.
    let text = crate::util::atomic::read_capped(&dir.join(PROBE_FILE), 4096)?;
    let p: Probed = serde_json::from_slice(&text).ok()?;
    let now = boot_ms();
    // A record from the future is no record; nor is one of a prober that
    // has missed its heartbeats.
    let stands = if p.probing {
        PROBING_STANDS_MS
    } else {
        PROBE_FRESH_MS
    };
    if p.at > now || now - p.at > stands {
        return None;
    }
    Some(p.available && p.target == Some(target))
}

/// How a connection to port 22 ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Knock {
    Accepted,
    /// Refused (a reset): the guest's network is up, nothing listens yet.
    Refused,
    /// Nothing came back within the wait, or the guest is not reachable
    /// yet (no neighbour answers for its address).
    Silent,
    /// This host could not probe (out of descriptors or ports, …): it
    /// says nothing of the guest.
    Failed,
}

fn knock(target: SocketAddr) -> Knock {
    match TcpStream::connect_timeout(&target, ADDRESS_PROBE_TIMEOUT) {
        Ok(_) => Knock::Accepted,
        Err(e) => knocked(e.kind()),
    }
}

/// What a failed connection says of the guest.
fn knocked(kind: std::io::ErrorKind) -> Knock {
    use std::io::ErrorKind as K;
    match kind {
        K::ConnectionRefused => Knock::Refused,
        K::TimedOut | K::HostUnreachable | K::NetworkUnreachable => Knock::Silent,
        _ => Knock::Failed,
    }
}

/// Removes the record when the prober ends without its last one (stopped,
/// failed, or a panic): readers then probe themselves.
struct ClearUnlessKept {
    path: PathBuf,
    keep: bool,
}

impl Drop for ClearUnlessKept {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// The supervisor's SSH probes while its guest boots, for a guest reached
/// at its own address (nat, host, bridged): every [`PROBE_PERIOD`], from
/// the VM's start until port 22 first answers at all, accepting or
/// refusing (the guest's network is then up, and a probe of the caller's
/// own answers at once), or [`PROBE_FOR`] passed, or the VM stops.
/// Recorded in [`PROBE_FILE`] for [`recorded`] when the answer changes,
/// every [`PROBE_HEARTBEAT`] while it does not, and once more when it
/// stops; a probe this host could not make ends the probing without a
/// record. Stopped, and its record removed, when dropped (a probe waits at
/// most [`ADDRESS_PROBE_TIMEOUT`]).
pub struct Prober {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    file: PathBuf,
}

impl Prober {
    /// Starts probing where `target` says (read again before every probe:
    /// the address comes with the guest's lease).
    pub fn start(dir: &Path, target: impl Fn() -> Option<SocketAddr> + Send + 'static) -> Self {
        Self::start_with(dir, target, knock)
    }

    /// [`Self::start`] with its own way of probing (tests).
    fn start_with(
        dir: &Path,
        target: impl Fn() -> Option<SocketAddr> + Send + 'static,
        knock: fn(SocketAddr) -> Knock,
    ) -> Self {
        let file = dir.join(PROBE_FILE);
        let stop = Arc::new(AtomicBool::new(false));
        let (flag, path) = (stop.clone(), file.clone());
        let thread = std::thread::Builder::new()
            .name("lume-ssh-prober".into())
            .spawn(move || {
                let begun = Instant::now();
                let mut clear = ClearUnlessKept {
                    path: path.clone(),
                    keep: false,
                };
                let write = |p: &Probed| {
                    let json = serde_json::to_vec(p).expect("a probe serialises");
                    crate::util::atomic::write_runtime(&path, &json).is_ok()
                };
                let mut last: Option<(Probed, Instant)> = None;
                while !flag.load(Ordering::SeqCst) && begun.elapsed() < PROBE_FOR {
                    let t = Instant::now();
                    let to = target();
                    let k = to.map(knock);
                    if flag.load(Ordering::SeqCst) || k == Some(Knock::Failed) {
                        return;
                    }
                    // An answer of any kind ends the probing: this record
                    // is the last.
                    let p = Probed {
                        target: to,
                        available: k == Some(Knock::Accepted),
                        at: boot_ms(),
                        probing: k.is_none_or(|k| k == Knock::Silent),
                    };
                    let due = last.as_ref().is_none_or(|(l, written)| {
                        (l.target, l.available, l.probing) != (p.target, p.available, p.probing)
                            || written.elapsed() >= PROBE_HEARTBEAT
                    });
                    if due {
                        if !write(&p) {
                            return;
                        }
                        last = Some((p.clone(), Instant::now()));
                    }
                    if !p.probing {
                        clear.keep = true;
                        return;
                    }
                    std::thread::sleep(PROBE_PERIOD.saturating_sub(t.elapsed()));
                }
                // Out of time: the last record, which soon goes stale.
                if let Some((l, _)) = last.filter(|_| !flag.load(Ordering::SeqCst)) {
                    clear.keep = write(&Probed {
                        probing: false,
                        at: boot_ms(),
                        ..l
                    });
                }
            })
            .ok();
        Self { stop, thread, file }
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.file);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// The record as the prober last wrote it, waiting (at most 10 s) for
    /// one that `ok` accepts: read raw, so that a test thread stalled on a
    /// busy machine never misses a record that has since gone stale.
    fn record_where(dir: &Path, ok: impl Fn(&Probed) -> bool) -> Probed {
        let until = Instant::now() + Duration::from_secs(10);
        loop {
            let p = std::fs::read(dir.join(PROBE_FILE))
                .ok()
                .and_then(|t| serde_json::from_slice::<Probed>(&t).ok());
            match p {
                Some(p) if ok(&p) => return p,
                _ if Instant::now() > until => panic!("no such record: {p:?}"),
                _ => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    }

    /// A port that refuses connections and that no other test can take
    /// meanwhile: a socket bound to it that does not listen.
    fn refusing_port() -> (std::os::fd::OwnedFd, SocketAddr) {
        use nix::sys::socket::{
            AddressFamily, SockFlag, SockType, SockaddrIn, bind, getsockname, socket,
        };
        let fd = socket(
            AddressFamily::Inet,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &SockaddrIn::new(127, 0, 0, 1, 0),
        )
        .unwrap();
        let at: SockaddrIn = getsockname(std::os::fd::AsRawFd::as_raw_fd(&fd)).unwrap();
        (
            fd,
            SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, at.port())),
        )
    }

    /// While the supervisor probes, `sshAvailable` takes its answer, for
    /// the address it probed only; the prober stops at the first answer,
    /// accepted or refused, and its last record then goes stale. A record
    /// that is a link, stale, from the future or unreadable counts for
    /// nothing; a prober's record at work stands a few seconds.
    #[test]
    fn the_supervisors_probes_answer_while_fresh_and_only_for_their_address() {
        let dir = tempfile::tempdir().unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let open = l.local_addr().unwrap();
        let elsewhere: SocketAddr = "127.0.0.1:9".parse().unwrap();
        // No address yet: recorded as not available, for any address.
        let addressed = Arc::new(AtomicBool::new(false));
        let a = addressed.clone();
        let p = Prober::start(dir.path(), move || a.load(Ordering::SeqCst).then_some(open));
        let first = record_where(dir.path(), |_| true);
        assert_eq!(
            (first.target, first.available, first.probing),
            (None, false, true)
        );
        // Still probing, the answer unchanged: no new record before the
        // heartbeat, and the one there stands.
        std::thread::sleep(Duration::from_millis(PROBE_FRESH_MS + 300));
        assert_eq!(record_where(dir.path(), |_| true), first);
        assert_eq!(recorded(dir.path(), open), Some(false));
        // The address comes: the next probe finds the port open, and that
        // is the last record.
        addressed.store(true, Ordering::SeqCst);
        let last = record_where(dir.path(), |p| p.target.is_some());
        assert_eq!(
            (last.target, last.available, last.probing),
            (Some(open), true, false)
        );
        // It goes stale, and the prober wrote nothing more.
        std::thread::sleep(Duration::from_millis(PROBE_FRESH_MS + 300));
        assert_eq!(recorded(dir.path(), open), None);
        assert_eq!(record_where(dir.path(), |_| true), last);
        drop(p);
        assert!(!dir.path().join(PROBE_FILE).exists());

        // A refusal ends the probing too: a probe of the caller's own
        // then answers at once.
        let (_held, refusing) = refusing_port();
        let p = Prober::start(dir.path(), move || Some(refusing));
        let last = record_where(dir.path(), |_| true);
        assert_eq!(
            (last.target, last.available, last.probing),
            (Some(refusing), false, false)
        );
        drop(p);

        let file = dir.path().join(PROBE_FILE);
        let write = |at: u64, probing: bool| {
            let p = Probed {
                target: Some(open),
                available: !probing,
                at,
                probing,
            };
            std::fs::write(&file, serde_json::to_vec(&p).unwrap()).unwrap();
        };
        write(boot_ms(), false);
        assert_eq!(recorded(dir.path(), open), Some(true));
        assert_eq!(recorded(dir.path(), elsewhere), Some(false));
        // A prober's record at work stands longer than a last one; not
        // past a few heartbeats (a prober stopped without its last record).
        write(boot_ms().saturating_sub(5_000), true);
        assert_eq!(recorded(dir.path(), open), Some(false));
        write(boot_ms().saturating_sub(PROBING_STANDS_MS + 1_000), true);
        assert_eq!(recorded(dir.path(), open), None);
        write(boot_ms() + 60_000, false);
        assert_eq!(recorded(dir.path(), open), None);
        write(boot_ms().saturating_sub(5_000), false);
        assert_eq!(recorded(dir.path(), open), None);
        std::fs::write(&file, b"{").unwrap();
        assert_eq!(recorded(dir.path(), open), None);
        // A link to a fresh record elsewhere is not followed.
        let other = tempfile::tempdir().unwrap();
        let real = other.path().join("real");
        std::fs::remove_file(&file).unwrap();
        write(boot_ms(), false);
        std::fs::rename(&file, &real).unwrap();
        std::os::unix::fs::symlink(&real, &file).unwrap();
        assert_eq!(recorded(dir.path(), open), None);
    }

    /// A probe this host cannot make says nothing of the guest: the
    /// prober stops and leaves no record (callers probe themselves).
    #[test]
    fn a_probe_this_host_cannot_make_leaves_no_record() {
        use std::io::ErrorKind as K;
        for (kind, k) in [
            (K::ConnectionRefused, Knock::Refused),
            (K::TimedOut, Knock::Silent),
            (K::HostUnreachable, Knock::Silent),
            (K::NetworkUnreachable, Knock::Silent),
            (K::AddrNotAvailable, Knock::Failed),
            (K::Other, Knock::Failed),
        ] {
            assert_eq!(knocked(kind), k, "{kind:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let at: SocketAddr = "127.0.0.1:22".parse().unwrap();
        // Silent first (a record), then out of descriptors: no record.
        static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        static SEEN: AtomicBool = AtomicBool::new(false);
        let p = Prober::start_with(
            dir.path(),
            move || Some(at),
            |_| match CALLS.fetch_add(1, Ordering::SeqCst) {
                0 => Knock::Silent,
                _ => {
                    // Not before the test has seen the first record.
                    while !SEEN.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Knock::Failed
                }
            },
        );
        let probed = record_where(dir.path(), |_| true);
        assert_eq!((probed.target, probed.probing), (Some(at), true));
        SEEN.store(true, Ordering::SeqCst);
        let until = Instant::now() + Duration::from_secs(10);
        while dir.path().join(PROBE_FILE).exists() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!dir.path().join(PROBE_FILE).exists());
        assert_eq!(CALLS.load(Ordering::SeqCst), 2, "it stopped at the failure");
        drop(p);
    }

    #[test]
    fn a_listening_port_answers_and_a_closed_one_does_not() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let open = l.local_addr().unwrap();
        assert!(port_answers(open, SSH_PROBE_TIMEOUT));
        drop(l);
        assert!(!port_answers(open, SSH_PROBE_TIMEOUT));
    }

    /// A user-mode forward that accepts and then resets (passt while the
    /// guest does not listen yet) is not SSH; one that sends a banner is.
    /// Elsewhere an accepted connection is enough, as lume.
    #[test]
    fn through_a_user_mode_forward_only_the_guests_banner_counts() {
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let silent_at = silent.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in silent.incoming() {
                drop(c);
            }
        });
        assert!(!ssh_answers(
            &NetworkMode::User,
            silent_at,
            SSH_PROBE_TIMEOUT
        ));
        assert!(ssh_answers(
            &NetworkMode::Nat,
            silent_at,
            ADDRESS_PROBE_TIMEOUT
        ));

        let sshd = TcpListener::bind("127.0.0.1:0").unwrap();
        let sshd_at = sshd.local_addr().unwrap();
        // Like passt in front of a listening guest: nothing comes back
        // until the client has sent something.
        std::thread::spawn(move || {
            for mut c in sshd.incoming().flatten() {
                let mut b = [0u8; 1];
                if c.read_exact(&mut b).is_ok() {
                    let _ = c.write_all(b"SSH-2.0-OpenSSH_9.2\r\n");
                }
            }
        });
        assert!(ssh_answers(&NetworkMode::User, sshd_at, SSH_PROBE_TIMEOUT));
    }
}
