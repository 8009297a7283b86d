//! Which descriptors a child inherits.
//!
//! lume opens its own descriptors close-on-exec; a library may not (see
//! [`crate::firewall::libnft`]), so the children that face guests mark
//! everything they were not handed close-on-exec between fork and exec
//! ([`cloexec_from`]).

use std::os::fd::RawFd;

/// `CLOSE_RANGE_CLOEXEC` (`<linux/close_range.h>`, Linux 5.11).
const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;

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
    // A kernel before 5.11: descriptor by descriptor up to the hard limit
    // (closing them instead would also close the pipe through which the
    // parent learns that exec failed).
    // SAFETY: getrlimit and fcntl are async-signal-safe system calls;
    // fcntl on a closed descriptor fails harmlessly.
    unsafe {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_max.min(65_536) as RawFd
        } else {
            65_536
        };
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

    #[test]
    fn a_child_gets_only_what_it_was_handed() {
        // A descriptor opened without O_CLOEXEC, as a library might.
        let path = std::ffi::CString::new("/proc/self/status").unwrap();
        // SAFETY: open(2) with a live NUL-terminated path; closed below.
        let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY) };
        assert!(fd >= 3);
        // Far above what `sh` opens for itself.
        // SAFETY: dup2 onto a free number, then the first copy is closed.
        let fd = unsafe {
            let high = libc::dup2(fd, 123);
            libc::close(fd);
            high
        };
        assert_eq!(fd, 123);
        let check = format!("test -e /proc/self/fd/{fd} && echo inherited || echo closed");
        let run = |mark: bool| {
            let mut cmd = std::process::Command::new("sh");
            cmd.args(["-c", &check]);
            if mark {
                use std::os::unix::process::CommandExt;
                // SAFETY: cloexec_from only makes system calls.
                unsafe {
                    cmd.pre_exec(|| {
                        cloexec_from(3);
                        Ok(())
                    });
                }
            }
            String::from_utf8(cmd.output().unwrap().stdout).unwrap()
        };
        assert_eq!(run(false).trim(), "inherited");
        assert_eq!(run(true).trim(), "closed");
        // SAFETY: closing the descriptor opened above.
        unsafe { libc::close(fd) };
    }
}
