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

/// Closes every descriptor from 3 on but those in `keep`: for a forked
/// child that goes on without exec (a detached supervisor), which then
/// holds nothing of its parent's, not even what the parent's own caller
/// left open, but what it was handed.
pub fn close_from_3_except(keep: &[RawFd]) {
    let mut keep: Vec<RawFd> = keep.iter().copied().filter(|fd| *fd >= 3).collect();
    keep.sort_unstable();
    keep.dedup();
    let mut first: RawFd = 3;
    for k in keep.into_iter().chain([RawFd::MAX]) {
        if k > first {
            close_range(first, k - 1);
        }
        first = k.saturating_add(1);
    }
}

/// close_range(2) from `first` to `last`, or descriptor by descriptor on a
/// kernel before 5.9 (up to the open descriptors /proc/self/fd lists).
fn close_range(first: RawFd, last: RawFd) {
    // SAFETY: close_range only closes descriptors; the caller owns them.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            last as libc::c_uint,
            0,
        )
    };
    if r == 0 {
        return;
    }
    for fd in open_descriptors()
        .unwrap_or_default()
        .into_iter()
        .filter(|fd| (first..=last).contains(fd))
    {
        // SAFETY: closing a descriptor the caller owns (the listing's own
        // is closed already: EBADF, harmless).
        unsafe { libc::close(fd) };
    }
}

/// This process's open descriptors, as /proc/self/fd lists them (read
/// whole first; the listing's own descriptor is among them, closed again
/// by the time the caller looks at it). `None` without /proc.
pub fn open_descriptors() -> Option<Vec<RawFd>> {
    let dir = std::fs::read_dir("/proc/self/fd").ok()?;
    Some(
        dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
    )
}

/// Places `sources` at descriptors 3, 4, … for a child between fork and
/// exec, open across exec (`dup2` clears close-on-exec). Each is first
/// copied above every target, into `copies` (as long as `sources`,
/// allocated before the fork), so that placing one never overwrites a
/// source not yet placed; the copies are close-on-exec.
///
/// Done in the child, not in the parent: the child is single-threaded, so
/// growing its descriptor table costs nothing, where in a threaded parent
/// (lume's supervisor) the kernel waits for an RCU grace period to free
/// the old table — 10–20 ms on a busy machine, measured on every VM start
/// when the copies were made above 64 in the parent. Only system calls:
/// async-signal-safe.
pub fn place_from_3(sources: &[RawFd], copies: &mut [RawFd]) -> std::io::Result<()> {
    let above = 3 + sources.len() as RawFd;
    for (src, copy) in sources.iter().zip(copies.iter_mut()) {
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) only makes a new descriptor.
        let c = unsafe { libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, above) };
        if c < 0 {
            return Err(std::io::Error::last_os_error());
        }
        *copy = c;
    }
    for (i, copy) in copies.iter().take(sources.len()).enumerate() {
        // SAFETY: dup2 onto a target below every copy, which therefore
        // holds no copy not yet placed.
        if unsafe { libc::dup2(*copy, 3 + i as RawFd) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
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

    /// Everything from 3 on is closed but what is kept, around and between
    /// the kept ones.
    #[test]
    fn only_the_kept_descriptors_stay_open() {
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new("sh");
        cmd.args([
            "-c",
            "for fd in 3 4 5 6 7 8 9; do test -e /proc/self/fd/$fd && echo $fd; done",
        ]);
        // SAFETY: the closure only makes system calls (dup2,
        // close_range), between fork and exec: close_range exists on
        // every kernel this test runs on (5.9 and later); the fallback of
        // older ones allocates, safe only in a single-threaded child, as
        // a forked supervisor is.
        unsafe {
            cmd.pre_exec(|| {
                for fd in 3..=9 {
                    libc::dup2(0, fd);
                }
                close_from_3_except(&[9, 5, 2, 5]);
                Ok(())
            });
        }
        let out = String::from_utf8(cmd.output().unwrap().stdout).unwrap();
        assert_eq!(out.lines().collect::<Vec<_>>(), vec!["5", "9"]);
    }

    /// Sources that sit on each other's targets (4 goes to 3 and 3 to 4)
    /// arrive each where it belongs, open across exec; nothing else is.
    #[test]
    fn descriptors_are_placed_from_3_whatever_they_were() {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let dir = tempfile::tempdir().unwrap();
        let names = ["a", "b", "c"];
        let files: Vec<std::fs::File> = names
            .iter()
            .map(|n| std::fs::File::create(dir.path().join(n)).unwrap())
            .collect();
        let raw: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
        let sources = vec![raw[1], raw[0], raw[2]];
        let mut copies = vec![-1; sources.len()];
        let mut cmd = std::process::Command::new("sh");
        cmd.args([
            "-c",
            "for fd in 3 4 5 6; do readlink /proc/self/fd/$fd || echo none; done",
        ]);
        // SAFETY: place_from_3 and cloexec_from only make system calls.
        unsafe {
            cmd.pre_exec(move || {
                place_from_3(&sources, &mut copies)?;
                cloexec_from(3 + sources.len() as RawFd);
                Ok(())
            });
        }
        let out = String::from_utf8(cmd.output().unwrap().stdout).unwrap();
        let got: Vec<&str> = out.lines().collect();
        let want = |n: &str| dir.path().join(n).display().to_string();
        assert_eq!(
            got,
            vec![want("b").as_str(), &want("a"), &want("c"), "none"]
        );
        drop(files);
    }
}
