//! Whether a running guest's SSH port answers (VMDetails `sshAvailable`,
//! the ssh column of `lume ls`), as lume does: a TCP connection to port 22
//! of the VM's address with a short timeout.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

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
