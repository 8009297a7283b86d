//! The processes lume owns around a VM, from outside its supervisor: the
//! detached supervisor `run --detach` starts in a session of its own (a
//! fork of the CLI, or lume re-executing itself), and forcing a running
//! VM's QEMU off (QMP `quit`, then SIGKILL).

use std::fs;
use std::io::{self, Read as _, Write as _};
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::wait::{WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::qmp::Qmp;
use super::supervisor::{EXIT_ALREADY_RUNNING, EXIT_BUSY, START_LOG_ENV};

/// Why a detached supervisor could not be started or followed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// lume could not start its own executable as the VM's supervisor.
    #[error(
        "Cannot start lume's VM supervisor (lume's own executable, {exe}): {source}. If lume was upgraded, rebuilt or removed since this process started, restart `lume serve` (or run the command again)"
    )]
    SupervisorSpawn {
        exe: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The kernel refused a new process for the supervisor.
    #[error(
        "Cannot start the VM's supervisor process: end some processes or free memory, then run the command again"
    )]
    SupervisorFork(#[source] io::Error),
    /// The supervisor's standard input could not be opened.
    #[error(
        "Cannot open /dev/null for the VM's supervisor: this host needs a working /dev/null (a character device)"
    )]
    NullDevice(#[source] io::Error),
    #[error("Cannot follow lume's VM supervisor while it starts")]
    SupervisorWait(#[source] nix::Error),
}

/// This very program, for a detached supervisor to run: `/proc/self/exe`
/// reaches the executable this process runs even after its file was
/// replaced (a rebuild, `apt upgrade`) or removed, where its path (what
/// `current_exe` gives, then with " (deleted)") no longer does. The
/// supervisor so always matches the server that starts it. Its argv[0] is
/// the path, for `ps`.
pub fn supervisor_command() -> Command {
    let mut cmd = Command::new(SELF_EXE);
    cmd.arg0(own_exe_name());
    cmd
}

const SELF_EXE: &str = "/proc/self/exe";

/// The path this process was started from, without the kernel's " (deleted)".
fn own_exe_name() -> PathBuf {
    match std::env::current_exe() {
        Ok(p) => {
            let text = p.to_string_lossy();
            match text.strip_suffix(" (deleted)") {
                Some(t) => PathBuf::from(t),
                None => p,
            }
        }
        Err(_) => PathBuf::from("lume"),
    }
}

/// How a detached supervisor ended before it reported the VM running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EarlyExit {
    /// Another supervisor runs the VM.
    AlreadyRunning,
    /// Another lume command holds the VM.
    Busy,
    /// It failed: what its log says (each line's "Error: " taken off).
    Failed { log: PathBuf, messages: String },
}

/// A supervisor started in a session of its own, logging to `start_log`
/// until it holds the VM (then it renames that file to the VM's log).
#[derive(Debug)]
pub struct Detached {
    pid: Pid,
    start_log: PathBuf,
    log: PathBuf,
}

/// Whether this process may start a detached supervisor by forking without
/// exec ([`Detached::fork`]): it runs a single thread (a fork copies only
/// the calling thread, with whatever locks the others held); it holds no
/// close-on-exec descriptor from 3 on but those in `handed` (anything else
/// belongs to some part of this process the supervisor would go on
/// using, where exec would have closed it); and its command line names
/// lume, as [`crate::vm::state::RunState::supervisor_alive`] knows a
/// supervisor. Otherwise ([`Detached::spawn`]) lume starts itself again.
pub fn can_fork(handed: &[RawFd]) -> bool {
    let threads = fs::read_dir("/proc/self/task").map_or(0, Iterator::count);
    let name = std::env::args_os().next().unwrap_or_default();
    fork_allowed(threads, &name, &unexpected_descriptors(handed))
}

/// [`can_fork`]'s verdict from what it read: the process's thread count
/// (0: unknown), its command name, its unexpected descriptors.
fn fork_allowed(threads: usize, name: &std::ffi::OsStr, unexpected: &[RawFd]) -> bool {
    threads == 1 && name.to_string_lossy().contains("lume") && unexpected.is_empty()
}

/// This process's close-on-exec descriptors from 3 on that are not in
/// `handed`.
fn unexpected_descriptors(handed: &[RawFd]) -> Vec<RawFd> {
    let Some(open) = crate::util::fds::open_descriptors() else {
        return vec![-1];
    };
    open.into_iter()
        .filter(|fd| *fd >= 3 && !handed.contains(fd))
        .filter(|fd| {
            // SAFETY: F_GETFD only reads the descriptor's flags; a closed
            // one (the listing's) fails.
            let flags = unsafe { libc::fcntl(*fd, libc::F_GETFD) };
            flags >= 0 && flags & libc::FD_CLOEXEC != 0
        })
        .collect()
}

impl Detached {
    /// Starts `cmd` (from [`supervisor_command`], its output already sent
    /// to `start_log`) in a new session, so that it outlives this process
    /// and the caller's terminal. `log` is the VM's own log, where the
    /// start log goes once the supervisor holds the VM. If it cannot be
    /// started, the start log (which nobody else will ever use) is removed
    /// and the error names lume's own executable, not QEMU.
    pub fn spawn(cmd: &mut Command, start_log: &Path, log: &Path) -> Result<Self, ProcessError> {
        cmd.env(START_LOG_ENV, start_log);
        // SAFETY: setsid and cloexec_from only make system calls
        // (async-signal-safe); setsid detaches the supervisor from the
        // caller's terminal and session so it outlives this process.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()?;
                // Nothing the caller left open is held for the VM's life:
                // the supervisor gets its files as /proc/<pid>/fd/N.
                crate::util::fds::cloexec_from(3);
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| {
            let _ = fs::remove_file(start_log);
            ProcessError::SupervisorSpawn {
                exe: own_exe_name(),
                source,
            }
        })?;
        // Followed by its pid from now on (dropping `child` leaves it be).
        Ok(Self {
            pid: Pid::from_raw(child.id() as i32),
            start_log: start_log.to_path_buf(),
            log: log.to_path_buf(),
        })
    }

    /// Starts `supervise` in a child of this process, in a new session,
    /// without exec: what [`Self::spawn`] does, without starting lume's
    /// executable again and reading its configuration again (about 3 ms
    /// of every detached start). Only when [`can_fork`] says so. The child
    /// writes to `output` (the start log, open for appending) on its
    /// standard output and error, reads nothing, and exits with what
    /// `supervise` returns: it never comes back to the caller's code.
    pub fn fork(
        start_log: &Path,
        log: &Path,
        output: fs::File,
        handed: &[RawFd],
        supervise: impl FnOnce() -> i32,
    ) -> Result<Self, ProcessError> {
        let null = fs::File::open("/dev/null").map_err(|e| {
            let _ = fs::remove_file(start_log);
            ProcessError::NullDevice(e)
        })?;
        // Nothing of this process's own output is written twice.
        let _ = io::stdout().flush();
        // The child starts on this CPU, which falls idle as this process
        // waits for it (`util::cpu`).
        let here = crate::util::cpu::StartHere::pin();
        // SAFETY: the caller checked `can_fork`: this process runs a single
        // thread, so the child's copy of it holds no lock another thread
        // held, and the child may allocate.
        let forked = unsafe { nix::unistd::fork() };
        // Both give themselves their CPUs back.
        drop(here);
        match forked {
            Ok(nix::unistd::ForkResult::Parent { child }) => Ok(Self {
                pid: child,
                start_log: start_log.to_path_buf(),
                log: log.to_path_buf(),
            }),
            Ok(nix::unistd::ForkResult::Child) => {
                // Never back into the caller's frames: a panic ends the child.
                let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let detached = nix::unistd::setsid().map(drop).and_then(|()| {
                        nix::unistd::dup2_stdin(&null)?;
                        nix::unistd::dup2_stdout(&output)?;
                        nix::unistd::dup2_stderr(&output)?;
                        Ok(())
                    });
                    drop(null);
                    drop(output);
                    if let Err(e) = detached {
                        eprintln!(
                            "Error: Cannot detach the VM's supervisor from this terminal: {e}"
                        );
                        return 1;
                    }
                    // What the caller's own caller left open goes, as exec
                    // would close what this process opened (`can_fork`).
                    crate::util::fds::close_from_3_except(handed);
                    // SAFETY: the child runs a single thread (see above).
                    unsafe { std::env::set_var(START_LOG_ENV, start_log) };
                    supervise()
                }))
                .unwrap_or(101);
                std::process::exit(code)
            }
            Err(e) => {
                let _ = fs::remove_file(start_log);
                Err(ProcessError::SupervisorFork(e.into()))
            }
        }
    }

    /// The supervisor's process id (run.json's `pid` once it runs the VM).
    pub fn id(&self) -> u32 {
        self.pid.as_raw() as u32
    }

    /// How the supervisor ended, if it did.
    pub fn exited(&mut self) -> Result<Option<EarlyExit>, ProcessError> {
        let code = match nix::sys::wait::waitpid(self.pid, Some(WaitPidFlag::WNOHANG))
            .map_err(ProcessError::SupervisorWait)?
        {
            WaitStatus::Exited(_, code) => Some(code),
            WaitStatus::Signaled(..) => None,
            _ => return Ok(None),
        };
        // Still under its own name if it never got the VM's lock.
        let log = if self.start_log.exists() {
            self.start_log.clone()
        } else {
            self.log.clone()
        };
        let mut messages = String::new();
        let _ = fs::File::open(&log).and_then(|mut f| f.read_to_string(&mut messages));
        if log == self.start_log {
            let _ = fs::remove_file(&self.start_log);
        }
        match code {
            Some(EXIT_ALREADY_RUNNING) => return Ok(Some(EarlyExit::AlreadyRunning)),
            Some(EXIT_BUSY) => return Ok(Some(EarlyExit::Busy)),
            _ => {}
        }
        // Its lines already say "Error: …"; the caller's error says it once.
        let messages = messages
            .trim()
            .lines()
            .map(|l| l.strip_prefix("Error: ").unwrap_or(l))
            .collect::<Vec<_>>()
            .join("\n");
        Ok(Some(EarlyExit::Failed { log, messages }))
    }

    /// Gives up on a supervisor that did not start in time: kills it and
    /// removes its start log.
    pub fn abandon(self) {
        let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGKILL);
        let _ = fs::remove_file(&self.start_log);
    }
}

/// Whether /proc/<pid>/cmdline mentions `needle` (guards against pid reuse).
fn process_mentions(pid: u32, needle: &str) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(needle))
        .unwrap_or(false)
}

/// Sends one QMP command to the QEMU of the VM in `vm_dir`, trying again
/// until `within` has passed; whether QEMU accepted it.
pub fn qmp_command(vm_dir: &Path, command: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(mut q) = Qmp::connect(vm_dir)
            && q.execute(command, None).is_ok()
        {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How [`force_off`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForcedOff {
    /// QEMU accepted QMP `quit`.
    Quit,
    /// QEMU did not answer QMP within a second: it was sent SIGKILL.
    Killed,
    /// QEMU did not answer QMP and `qemu_pid` is no QEMU of this VM (gone,
    /// or the number now names another process): nothing was sent.
    NotFound,
}

/// Forces the QEMU of the VM in `vm_dir` off at once (its supervisor then
/// tears the rest down and releases the VM): QMP `quit`, or SIGKILL to
/// `qemu_pid` when QMP does not answer within a second and that process
/// is still a QEMU of this VM.
pub fn force_off(vm_dir: &Path, qemu_pid: u32) -> ForcedOff {
    if qmp_command(vm_dir, "quit", Duration::from_secs(1)) {
        return ForcedOff::Quit;
    }
    if !process_mentions(qemu_pid, &vm_dir.display().to_string()) {
        return ForcedOff::NotFound;
    }
    let Ok(pid) = i32::try_from(qemu_pid) else {
        return ForcedOff::NotFound;
    };
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    );
    ForcedOff::Killed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_supervisor_that_cannot_start_names_lume_and_leaves_no_start_log() {
        let dir = tempfile::tempdir().unwrap();
        let start_log = dir.path().join(".start-1234abcd.log");
        fs::write(&start_log, "").unwrap();
        let mut cmd = Command::new(dir.path().join("lume (deleted)"));
        let e = Detached::spawn(&mut cmd, &start_log, &dir.path().join("lume.log")).unwrap_err();
        assert!(matches!(e, ProcessError::SupervisorSpawn { .. }), "{e:?}");
        let text = crate::error_chain(&e);
        assert!(
            text.starts_with("Cannot start lume's VM supervisor"),
            "{text}"
        );
        assert!(text.contains("restart `lume serve`"), "{text}");
        assert!(
            !text.contains(crate::hypervisor::qemu::QEMU_BINARY),
            "{text}"
        );
        assert!(!start_log.exists());
    }

    /// A supervisor that failed before it held the VM: its start log's
    /// lines, said once, and the start log gone; the exit codes of "already
    /// running" and "busy" are told apart from a failure.
    #[test]
    fn an_early_exit_is_told_by_its_code_and_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("lume.log");
        let run = |script: &str| {
            let start_log = dir.path().join(".start-1.log");
            fs::write(&start_log, "").unwrap();
            let mut cmd = Command::new("/bin/sh");
            cmd.args(["-c", script]);
            cmd.stdout(crate::hypervisor::logcap::open_log(&start_log, false).unwrap());
            let mut d = Detached::spawn(&mut cmd, &start_log, &log).unwrap();
            loop {
                if let Some(exit) = d.exited().unwrap() {
                    assert!(!start_log.exists());
                    return exit;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        assert_eq!(
            run(&format!("exit {EXIT_ALREADY_RUNNING}")),
            EarlyExit::AlreadyRunning
        );
        assert_eq!(run(&format!("exit {EXIT_BUSY}")), EarlyExit::Busy);
        match run("echo 'Error: No room'; echo 'Error: Try later'; exit 1") {
            EarlyExit::Failed { log: l, messages } => {
                assert_eq!(l, dir.path().join(".start-1.log"));
                assert_eq!(messages, "No room\nTry later");
            }
            other => panic!("{other:?}"),
        }
    }

    /// A descriptor this process opened close-on-exec and did not hand to
    /// the supervisor stops the fork (it belongs to some part of this
    /// process); one without close-on-exec (as a caller hands its
    /// children) crosses exec too and does not.
    #[test]
    fn only_a_descriptor_exec_would_close_and_nobody_handed_over_stops_a_fork() {
        use std::os::fd::AsRawFd;
        let own = fs::File::open("/proc/self/status").unwrap();
        let fd = own.as_raw_fd();
        assert!(unexpected_descriptors(&[]).contains(&fd));
        assert!(!unexpected_descriptors(&[fd]).contains(&fd));
        let path = std::ffi::CString::new("/proc/self/status").unwrap();
        // SAFETY: open(2) with a live NUL-terminated path; closed below.
        let inherited = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY) };
        assert!(inherited >= 3);
        assert!(!unexpected_descriptors(&[]).contains(&inherited));
        // SAFETY: closing the descriptor opened above.
        unsafe { libc::close(inherited) };
    }

    /// Forked only from one thread (the child would copy only the calling
    /// thread, with whatever locks another held), under lume's name, with
    /// nothing of its own left open; each refuses alone.
    #[test]
    fn a_fork_needs_one_thread_lumes_name_and_nothing_left_open() {
        use std::ffi::OsStr;
        assert!(fork_allowed(1, OsStr::new("/usr/bin/lume"), &[]));
        assert!(!fork_allowed(2, OsStr::new("/usr/bin/lume"), &[]));
        assert!(!fork_allowed(0, OsStr::new("/usr/bin/lume"), &[]));
        assert!(!fork_allowed(1, OsStr::new("/usr/bin/vmtool"), &[]));
        assert!(!fork_allowed(1, OsStr::new("lume"), &[7]));
        // This test process runs the harness's threads.
        assert!(!can_fork(&[]));
    }

    /// What `supervisor_command` relies on: a process whose executable file
    /// was replaced still starts that same program through /proc/self/exe.
    #[test]
    fn proc_self_exe_reaches_a_replaced_executable() {
        let dir = tempfile::tempdir().unwrap();
        let prog = dir.path().join("prog");
        fs::copy("/bin/sh", &prog).unwrap();
        let mut child = crate::util::testing::spawn_fresh_program(
            Command::new(&prog).args(["-c", "sleep 0.5; /proc/self/exe -c 'exit 7'"]),
        );
        std::thread::sleep(Duration::from_millis(100));
        // Replaced the way upgrades do: a new file renamed over the old one.
        let new = dir.path().join("prog.new");
        fs::write(&new, "#!/bin/false\n").unwrap();
        fs::set_permissions(&new, fs::Permissions::from_mode(0o755)).unwrap();
        fs::rename(&new, &prog).unwrap();
        assert_eq!(child.wait().unwrap().code(), Some(7));
        assert_eq!(SELF_EXE, "/proc/self/exe");
    }

    /// Only a process that is this VM's QEMU is killed: a pid that names
    /// another process (reused) is left alone.
    #[test]
    fn force_off_kills_only_a_qemu_of_this_vm() {
        let dir = tempfile::tempdir().unwrap();
        let vm_dir = dir.path().join("vm-under-test");
        fs::create_dir(&vm_dir).unwrap();
        // No QMP socket: QEMU does not answer. A process that is not this
        // VM's (its command line does not name the VM's directory).
        let mut other = Command::new("sleep").arg("30").spawn().unwrap();
        assert_eq!(force_off(&vm_dir, other.id()), ForcedOff::NotFound);
        assert_eq!(other.try_wait().unwrap(), None);
        let _ = other.kill();
        let _ = other.wait();
        // One whose command line names it, as QEMU's does.
        let mut qemu = Command::new("sleep")
            .arg0(&vm_dir)
            .arg("30")
            .spawn()
            .unwrap();
        assert_eq!(force_off(&vm_dir, qemu.id()), ForcedOff::Killed);
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(qemu.wait().unwrap().signal(), Some(libc::SIGKILL));
    }
}
