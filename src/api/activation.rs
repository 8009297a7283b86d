//! systemd socket activation (`sd_listen_fds`): `lume.socket` binds
//! `/run/lume-api.sock` (mode 0660, group `lume`) and starts `lume serve`
//! with the listening socket as descriptor 3, `LISTEN_FDS=1` and
//! `LISTEN_PID` set to the server's pid. Only a listening Unix stream
//! socket is accepted: anything else systemd (or whoever set the
//! variables) passed is refused by name.

use std::os::fd::{BorrowedFd, FromRawFd as _, OwnedFd};

use nix::sys::socket::{
    AddressFamily, SockType, SockaddrLike as _, getsockname, getsockopt, sockopt,
};

/// The first descriptor systemd passes.
const FIRST_FD: i32 = 3;

/// Why the descriptors systemd passed cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    #[error(
        "LISTEN_FDS is {0:?}: systemd passes a number of sockets; start lume serve from lume.socket or without LISTEN_FDS"
    )]
    BadCount(String),
    #[error(
        "systemd passed {0} sockets: lume.socket must have exactly one ListenStream= (a Unix socket path)"
    )]
    Count(usize),
    #[error(
        "Descriptor {0} that systemd passed is not a listening Unix stream socket: lume.socket must use ListenStream=/run/lume-api.sock (a path, not a port)"
    )]
    NotUnixStream(i32),
}

/// The listening socket systemd passed to this process, if any. The
/// variables are removed either way, so that the VMs' supervisors this
/// server starts never take the socket for theirs.
pub fn listener() -> Result<Option<std::os::unix::net::UnixListener>, ActivationError> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    // SAFETY: called before the server starts any thread (no runtime yet),
    // so nothing reads the environment concurrently.
    unsafe {
        std::env::remove_var("LISTEN_PID");
        std::env::remove_var("LISTEN_FDS");
        std::env::remove_var("LISTEN_FDNAMES");
    }
    let ours = pid
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let Some(fds) = fds.filter(|_| ours) else {
        return Ok(None);
    };
    let n: usize = fds
        .trim()
        .parse()
        .map_err(|_| ActivationError::BadCount(fds.clone()))?;
    if n != 1 {
        return Err(ActivationError::Count(n));
    }
    // SAFETY: systemd's protocol hands descriptor 3 to this process; it is
    // only borrowed to inspect it here.
    let fd = unsafe { BorrowedFd::borrow_raw(FIRST_FD) };
    if !is_listening_unix_stream(fd) {
        return Err(ActivationError::NotUnixStream(FIRST_FD));
    }
    // Not inherited by the supervisors and QEMUs this server starts.
    let _ = nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    // SAFETY: descriptor 3 is a socket nothing else in this process owns
    // (checked above); the listener takes ownership of it.
    let owned = unsafe { OwnedFd::from_raw_fd(FIRST_FD) };
    Ok(Some(owned.into()))
}

/// Whether `fd` is a Unix stream socket in the listening state.
pub fn is_listening_unix_stream(fd: BorrowedFd<'_>) -> bool {
    let stream = getsockopt(&fd, sockopt::SockType).is_ok_and(|t| t == SockType::Stream);
    let listening = getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false);
    let unix =
        getsockname::<nix::sys::socket::SockaddrStorage>(std::os::fd::AsRawFd::as_raw_fd(&fd))
            .ok()
            .and_then(|a| a.family())
            == Some(AddressFamily::Unix);
    stream && listening && unix
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd as _;

    #[test]
    fn only_a_listening_unix_stream_socket_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let l = std::os::unix::net::UnixListener::bind(dir.path().join("s")).unwrap();
        assert!(is_listening_unix_stream(l.as_fd()));
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(
            !is_listening_unix_stream(a.as_fd()),
            "connected, not listening"
        );
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(!is_listening_unix_stream(tcp.as_fd()), "TCP");
        let d = std::os::unix::net::UnixDatagram::unbound().unwrap();
        assert!(!is_listening_unix_stream(d.as_fd()), "datagram");
        let f = std::fs::File::open("/dev/null").unwrap();
        assert!(!is_listening_unix_stream(f.as_fd()), "not a socket");
    }
}
