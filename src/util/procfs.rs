//! What lume reads of other processes in /proc.

use std::path::Path;

/// The real uid of the process whose /proc directory is `proc_dir`
/// (`Uid:` in its `status`); `None` when it is gone or unreadable. The
/// real uid, unlike the owner of /proc/PID, does not turn into root when
/// a process makes itself non-dumpable.
pub fn real_uid(proc_dir: &Path) -> Option<u32> {
    let status = std::fs::read_to_string(proc_dir.join("status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// [`real_uid`] of process `pid`.
pub fn real_uid_of(pid: u32) -> Option<u32> {
    real_uid(Path::new(&format!("/proc/{pid}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_own_real_uid_is_read() {
        assert_eq!(
            real_uid_of(std::process::id()),
            Some(nix::unistd::getuid().as_raw())
        );
        assert_eq!(real_uid(Path::new("/proc/no-such-process")), None);
    }
}
