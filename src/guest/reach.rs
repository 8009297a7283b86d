//! Whether a running guest's SSH port answers (VMDetails `sshAvailable`,
//! the ssh column of `lume ls`), as lume does: a TCP connection to port 22
//! of the VM's address with a short timeout.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use crate::vm::state::RunState;

/// How long `sshAvailable` waits for port 22.
pub const SSH_PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// Where the guest's SSH server is reached from this host.
///
/// INTEGRATION POINT (issue 12, `lume ssh`): in `user` mode the guest is
/// only reachable through a loopback port that lume forwards to guest port
/// 22 and records in run.json; return that address here for user mode.
/// Until then a user-mode VM reports `sshAvailable` only through `address`.
pub fn ssh_target(_state: &RunState, address: Option<&str>) -> Option<SocketAddr> {
    let ip: IpAddr = address?.parse().ok()?;
    Some(SocketAddr::new(ip, 22))
}

/// Whether something accepts a TCP connection at `target` within `timeout`.
pub fn port_answers(target: SocketAddr, timeout: Duration) -> bool {
    TcpStream::connect_timeout(&target, timeout).is_ok()
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
}
