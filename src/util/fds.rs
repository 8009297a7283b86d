//! Which descriptors a child inherits.
//!
//! lume opens its own descriptors close-on-exec; a library that does not
//! (libnftables' netlink socket, see [`crate::firewall::libnft`]) has its
//! sockets marked by [`cloexec_netlink`], and the children that face guests
//! mark everything they were not handed by [`cloexec_from`] between fork
//! and exec, so a descriptor another thread opened in the meantime cannot
//! leak into them either.

use std::os::fd::RawFd;

/// `CLOSE_RANGE_CLOEXEC` (`<linux/close_range.h>`, Linux 5.11).
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

/// An integer socket option of `fd`, if it is a socket.
fn sockopt(fd: RawFd, name: libc::c_int) -> Option<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are valid for writing and sized for an int
    // option; on a descriptor that is not a socket the call fails (ENOTSOCK)
    // and changes nothing.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(v)
}

/// This process's netlink sockets of `protocol` (`NETLINK_*`).
pub fn netlink_sockets(protocol: libc::c_int) -> Vec<RawFd> {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<RawFd>().ok())
        .filter(|&fd| {
            sockopt(fd, libc::SO_DOMAIN) == Some(libc::AF_NETLINK)
                && sockopt(fd, libc::SO_PROTOCOL) == Some(protocol)
        })
        .collect()
}

/// Marks every netlink socket of `protocol` in this process close-on-exec.
pub fn cloexec_netlink(protocol: libc::c_int) {
    for fd in netlink_sockets(protocol) {
        // SAFETY: F_GETFD/F_SETFD only read and set the descriptor's flags;
        // on a descriptor closed meanwhile they fail harmlessly.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

/// Marks every descriptor from `first` on close-on-exec. For a child
/// between fork and exec: it only makes system calls (async-signal-safe).
pub fn cloexec_from(first: RawFd) {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC closes nothing, it only
    // sets the flag on the open descriptors in the range.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        )
    };
    if r == 0 {
        return;
    }
    // A kernel before 5.11: descriptor by descriptor, up to the limit.
    // SAFETY: sysconf and fcntl are async-signal-safe; fcntl on a closed
    // descriptor fails harmlessly.
    unsafe {
        let max = libc::sysconf(libc::_SC_OPEN_MAX).clamp(0, 65_536) as RawFd;
        for fd in first..max {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn netlink_sockets_are_found_and_marked() {
        // A netlink socket opened without SOCK_CLOEXEC, as libnftables does.
        // SAFETY: a plain socket(2) call; the descriptor is closed below.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE) };
        assert!(fd >= 0);
        assert!(netlink_sockets(libc::NETLINK_ROUTE).contains(&fd));
        assert!(!netlink_sockets(12).contains(&fd));
        let file = std::fs::File::open("/proc/self/status").unwrap();
        assert!(!netlink_sockets(libc::NETLINK_ROUTE).contains(&file.as_raw_fd()));
        cloexec_netlink(libc::NETLINK_ROUTE);
        // SAFETY: reading the flags of the socket opened above, then closing it.
        unsafe {
            assert_ne!(libc::fcntl(fd, libc::F_GETFD) & libc::FD_CLOEXEC, 0);
            libc::close(fd);
        }
    }
}
