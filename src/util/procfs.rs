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

/// When process `pid` started (field 22 of /proc/PID/stat, in clock ticks
/// since boot): with the pid, it names one process, never a later one that
/// reused the pid.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name, which may hold spaces and parentheses.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The file name of the program process `pid` runs (`/proc/PID/exe`),
/// without the " (deleted)" the kernel adds once the file was replaced.
pub fn program_name(pid: u32) -> Option<String> {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let name = exe.file_name()?.to_string_lossy().into_owned();
    Some(name.strip_suffix(" (deleted)").unwrap_or(&name).to_string())
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

    #[test]
    fn a_child_is_named_by_its_start_time_and_program() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pid = child.id();
        let started = start_time(pid).unwrap();
        assert!(started >= start_time(std::process::id()).unwrap());
        assert_eq!(start_time(pid), Some(started));
        assert_eq!(program_name(pid).as_deref(), Some("sleep"));
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(start_time(pid), None);
        assert_eq!(program_name(pid), None);
    }
}
