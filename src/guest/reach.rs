//! Whether a running guest's SSH port answers (VMDetails `sshAvailable`,
//! the ssh column of `lume ls`), as lume does: a TCP connection to port 22
//! of the VM's address with a short timeout.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use crate::vm::state::RunState;

/// How long `sshAvailable` waits for port 22.
pub const SSH_PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// Where the guest's SSH server is reached from this host: in `user` mode
/// the loopback port lume forwards to guest port 22 (recorded in run.json),
/// else port 22 of the guest's address.
pub fn ssh_target(state: &RunState, address: Option<&str>) -> Option<SocketAddr> {
    if state.network_mode == crate::network::NetworkMode::User {
        let t = crate::guest::ssh::target("", state, None).ok()?;
        return Some(SocketAddr::new(t.host.parse().ok()?, t.port));
    }
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
