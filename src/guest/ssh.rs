//! `lume ssh NAME [COMMAND…]`: a shell or one command in a running guest,
//! through the system's OpenSSH client.
//!
//! Why OpenSSH and not an SSH library: `ssh` already does everything a user
//! expects of an interactive session (terminal modes, window size, escape
//! sequences, agent and X11 refusal, keep-alives), its host-key checking is
//! the one users know, and its exit status is the remote command's. lume
//! only chooses the options:
//!
//! - `-i` lume's key ([`super::keys`]) with `IdentitiesOnly=yes`, `-F none`
//!   (the user's ~/.ssh/config does not change where lume connects);
//! - `UserKnownHostsFile=<vm dir>/known_hosts` with `HostKeyAlias=lume-<name>`
//!   and `StrictHostKeyChecking=accept-new`: the guest's host key is learned
//!   on first contact and checked on every later one (a changed key is
//!   refused); the file goes away with the VM (delete, re-create), and a
//!   clone starts without it;
//! - the address: the one `lume get` shows (nat, host, bridged), or in
//!   `user` mode the loopback port forwarded to the guest's port 22;
//! - `-p PASSWORD`: given to ssh through `SSH_ASKPASS` (this very program,
//!   see [`ASKPASS_ENV`]); without it, `BatchMode=yes` (never a prompt).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::network::driver::SshRoute;
use crate::network::publish::{PortMapping, Proto};
use crate::vm::state::RunState;

/// Set in the environment of `ssh` when a password is given: lume, started
/// by ssh as its askpass program, prints the variable's value and exits.
pub const ASKPASS_ENV: &str = "LUME_SSH_ASKPASS_PASSWORD";
/// The known-hosts file in the VM directory.
pub const KNOWN_HOSTS: &str = "known_hosts";
/// The guest port lume forwards in user mode.
pub const SSH_PORT: u16 = 22;

/// Why `lume ssh` cannot connect.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("VM '{0}' is not running: start it with `lume run {0} --detach`")]
    NotRunning(String),
    #[error(
        "VM '{0}' has no IP address yet: wait for it to boot (`lume get {0}` shows the address once the guest has a DHCP lease)"
    )]
    NoAddress(String),
    #[error(
        "VM '{0}' runs in network mode 'none': there is no network to reach it through; change it with `lume set {0} --network nat` and restart it"
    )]
    NoNetwork(String),
    #[error(
        "VM '{0}' runs in user mode without a forwarded SSH port: restart it with this lume (`lume stop {0}; lume run {0} -d`) or publish one (`--publish 127.0.0.1:2222:22`)"
    )]
    NoForward(String),
    #[error(
        "VM '{name}' did not answer SSH within {secs} s ({why}): it may still be booting; try again, give a longer --timeout, or look at its console ({console})"
    )]
    NotReady {
        name: String,
        secs: u64,
        why: &'static str,
        console: String,
    },
    #[error(
        "The ssh client was not found: install openssh-client (apt-get install openssh-client)"
    )]
    NoClient,
    #[error("Cannot run ssh")]
    Spawn(#[source] std::io::Error),
    #[error(
        "The command was cancelled: its ssh was stopped, and the guest kills the command at its timeout at the latest; run it again if needed"
    )]
    Cancelled,
}

/// Where to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
}

/// Where to reach a running VM: in user mode the forwarded loopback port
/// from `run.json`, else `address` (the guest's address as `lume get`
/// knows it).
pub fn target(name: &str, state: &RunState, address: Option<String>) -> Result<Target, SshError> {
    let route = crate::network::driver::of(&state.network_mode).ssh_route();
    if route == SshRoute::LoopbackForward {
        let fwd = state
            .published
            .iter()
            .find(|p| p.guest_port == SSH_PORT && p.proto == Proto::Tcp)
            .ok_or_else(|| SshError::NoForward(name.into()))?;
        let host = match fwd.host_ip {
            Some(ip) if !ip.is_unspecified() => ip.to_string(),
            _ => "127.0.0.1".into(),
        };
        return Ok(Target {
            host,
            port: fwd.host_port,
        });
    }
    if route == SshRoute::Unreachable {
        return Err(SshError::NoNetwork(name.into()));
    }
    let ip = address
        .filter(|ip| !ip.is_empty())
        .ok_or_else(|| SshError::NoAddress(name.into()))?;
    Ok(Target { host: ip, port: 22 })
}

/// A loopback port for user mode's automatic SSH forward: one the kernel
/// hands out as free now (passt binds it a moment later).
pub fn free_loopback_port() -> Option<PortMapping> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0)).ok()?;
    let port = l.local_addr().ok()?.port();
    Some(PortMapping {
        host_ip: Some(std::net::Ipv4Addr::LOCALHOST),
        host_port: port,
        guest_port: SSH_PORT,
        proto: Proto::Tcp,
    })
}

/// What `lume ssh` was asked.
#[derive(Debug, Clone)]
pub struct SshRequest {
    pub vm_name: String,
    pub vm_dir: PathBuf,
    pub user: String,
    pub password: Option<String>,
    /// lume's private key, when there is one.
    pub key: Option<PathBuf>,
    /// Empty for an interactive shell.
    pub command: Vec<String>,
    /// Whether to ask for a terminal (interactive, on a terminal).
    pub tty: bool,
    pub connect_timeout: Duration,
}

/// The `ssh` command line for `req` to `to`.
pub fn command(req: &SshRequest, to: &Target) -> Command {
    let mut c = Command::new("ssh");
    let mut args: Vec<OsString> = vec!["-F".into(), "none".into()];
    let opt = |args: &mut Vec<OsString>, o: String| {
        args.push("-o".into());
        args.push(o.into());
    };
    let known = req.vm_dir.join(KNOWN_HOSTS);
    opt(
        &mut args,
        format!("UserKnownHostsFile={}", ssh_path(&known)),
    );
    opt(&mut args, "GlobalKnownHostsFile=/dev/null".into());
    opt(&mut args, format!("HostKeyAlias=lume-{}", req.vm_name));
    opt(&mut args, "StrictHostKeyChecking=accept-new".into());
    opt(&mut args, "UpdateHostKeys=no".into());
    opt(
        &mut args,
        format!("ConnectTimeout={}", req.connect_timeout.as_secs().max(1)),
    );
    opt(&mut args, "ServerAliveInterval=15".into());
    opt(&mut args, "LogLevel=ERROR".into());
    opt(&mut args, "ForwardAgent=no".into());
    opt(&mut args, "ForwardX11=no".into());
    if let Some(key) = &req.key {
        args.push("-i".into());
        args.push(key.clone().into());
        opt(&mut args, "IdentitiesOnly=yes".into());
    }
    if let Some(pw) = &req.password {
        opt(&mut args, "BatchMode=no".into());
        opt(&mut args, "NumberOfPasswordPrompts=1".into());
        c.env(ASKPASS_ENV, pw);
        c.env("SSH_ASKPASS", askpass_program());
        c.env("SSH_ASKPASS_REQUIRE", "force");
        c.env(
            "DISPLAY",
            std::env::var_os("DISPLAY").unwrap_or(":0".into()),
        );
    } else {
        opt(&mut args, "BatchMode=yes".into());
    }
    args.push("-p".into());
    args.push(to.port.to_string().into());
    args.push(if req.tty { "-t" } else { "-T" }.into());
    // Options end before the destination: a user name such as
    // `-oProxyCommand=…` is then a name, never an option, and ssh parses
    // nothing after it as one.
    args.push("--".into());
    args.push(format!("{}@{}", req.user, to.host).into());
    if !req.command.is_empty() {
        // ssh joins its arguments with spaces for the remote shell, as lume does.
        args.push(req.command.join(" ").into());
    }
    c.args(args);
    c
}

/// A path for an ssh_config value (quoted: the VM directory may hold spaces).
fn ssh_path(p: &Path) -> String {
    format!("\"{}\"", p.display())
}

/// This program, for ssh to run as its askpass helper.
fn askpass_program() -> PathBuf {
    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("lume"))
}

/// If this process was started by ssh as the askpass helper, prints the
/// password and returns true.
pub fn serve_askpass() -> bool {
    match std::env::var_os(ASKPASS_ENV) {
        Some(pw) if std::env::var_os("SSH_ASKPASS").is_some() => {
            use std::io::Write;
            let mut out = std::io::stdout();
            let _ = out.write_all(pw.as_encoded_bytes());
            let _ = out.write_all(b"\n");
            true
        }
        _ => false,
    }
}

/// Runs `cmd`, killing it after `timeout` (none when zero). Returns the exit
/// code: the remote command's, 255 for an ssh error, 124 on timeout.
pub fn run(mut cmd: Command, timeout: Duration) -> Result<i32, SshError> {
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => SshError::NoClient,
        _ => SshError::Spawn(e),
    })?;
    let deadline = (!timeout.is_zero()).then(|| std::time::Instant::now() + timeout);
    loop {
        if let Some(status) = child.try_wait().map_err(SshError::Spawn)? {
            use std::os::unix::process::ExitStatusExt;
            return Ok(status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)));
        }
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(124);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How long `lume ssh -t 0` waits for a guest to answer SSH.
pub const SSH_WAIT_NO_TIMEOUT: u64 = 300;

/// Waits until the running VM has an address and its SSH port accepts a
/// connection, up to `timeout` seconds (0: [`SSH_WAIT_NO_TIMEOUT`]), as a
/// user who just ran `lume run -d` expects; `waiting` is told why at every
/// poll (twice a second) while it waits. Errors at once when the VM is (or
/// goes) down or can never be reached.
pub fn wait_ready(
    vm: &crate::vm::store::Vm,
    name: &str,
    timeout: u64,
    waiting: &mut dyn FnMut(&str),
) -> Result<Target, SshError> {
    use std::time::Instant;
    let secs = if timeout == 0 {
        SSH_WAIT_NO_TIMEOUT
    } else {
        timeout
    };
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let state = vm
            .running_state()
            .ok_or_else(|| SshError::NotRunning(name.to_string()))?;
        // The guest's (IPv4) address; its SSH port is probed once, below.
        // Not an IPv6 one: a bridged guest's are what it announced, and
        // lume would connect wherever it claims to be.
        let address = crate::vm::details::guest_address(&state).map(|ip| ip.to_string());
        let why = match target(name, &state, address) {
            Ok(to) => {
                let answers = to
                    .host
                    .parse::<std::net::IpAddr>()
                    .map(|ip| {
                        crate::guest::reach::ssh_answers(
                            &state.network_mode,
                            (ip, to.port).into(),
                            crate::guest::reach::SSH_PROBE_TIMEOUT,
                        )
                    })
                    // A host name: leave it to ssh.
                    .unwrap_or(true);
                if answers {
                    return Ok(to);
                }
                "its SSH port does not answer yet"
            }
            Err(SshError::NoAddress(_)) => "it has no IP address yet",
            Err(e) => return Err(e),
        };
        if Instant::now() >= deadline {
            return Err(SshError::NotReady {
                name: name.to_string(),
                secs,
                why,
                console: vm.dir.join("console.log").display().to_string(),
            });
        }
        waiting(&format!(
            "Waiting for VM '{name}' to answer SSH ({why}; up to {secs} s)..."
        ));
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// What one command run over SSH gave back: its exit status (124 when it was
/// stopped at its timeout, as `timeout(1)` says; 255 when ssh itself failed),
/// and its standard output and error, each kept up to [`CAPTURE_LIMIT`] bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
    /// Output past [`CAPTURE_LIMIT`] was dropped.
    pub truncated: bool,
}

/// How much of each of a command's standard output and error is kept: a
/// guest is untrusted and may print without end.
pub const CAPTURE_LIMIT: usize = 1 << 20;

/// The remote command that runs a script read from standard input, killed
/// by the guest after `secs` seconds: the command itself never appears on
/// ssh's command line (no other host user sees it in `ps`), and without a
/// terminal sshd would not stop it when the connection goes. The whole
/// script is read before it runs; it runs with standard input at its end.
pub fn script_command(secs: u64) -> Vec<String> {
    vec![format!(
        "timeout -s KILL {} sh -c \"$(cat)\" </dev/null",
        secs.max(1)
    )]
}

/// Runs `cmd` (from [`command`] with [`script_command`], no terminal),
/// writing `script` to its standard input and collecting its output. ssh
/// runs in a process group of its own, and gets SIGKILL if the thread that
/// started it (which waits here) or this process dies; the group is killed
/// after `timeout` (zero: no limit) or as soon as `cancelled` says so
/// (polled every 20 ms).
pub fn run_captured(
    mut cmd: Command,
    script: &str,
    timeout: Duration,
    cancelled: &dyn Fn() -> bool,
) -> Result<Captured, SshError> {
    use std::io::{Read, Write};
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes async-signal-safe calls (prctl, getppid, _exit).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent died before the line above: nobody would kill us.
            if libc::getppid() != parent {
                libc::_exit(255);
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => SshError::NoClient,
        _ => SshError::Spawn(e),
    })?;
    let group = nix::unistd::Pid::from_raw(child.id() as i32);
    let kill_group = |child: &mut std::process::Child| {
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        let _ = child.wait();
    };
    // The script goes in from a thread: ssh may not read it all before it
    // fails, and a full pipe must not block the wait below.
    let writer = child.stdin.take().map(|mut input| {
        let script = script.as_bytes().to_vec();
        std::thread::spawn(move || {
            // EPIPE when ssh is gone: its status says why.
            let _ = input.write_all(&script);
        })
    });
    // Each stream is drained to its end (so the command never blocks on a
    // full pipe) and kept up to the limit.
    let reader = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            let mut dropped = false;
            if let Some(mut p) = pipe {
                let mut buf = [0u8; 8192];
                while let Ok(n) = p.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let room = CAPTURE_LIMIT.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                    dropped |= n > room;
                }
            }
            (String::from_utf8_lossy(&kept).into_owned(), dropped)
        })
    };
    let out = reader(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = reader(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = (!timeout.is_zero()).then(|| std::time::Instant::now() + timeout);
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                use std::os::unix::process::ExitStatusExt;
                // Whatever ssh left in its group (an askpass helper) goes too.
                let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
                break status
                    .code()
                    .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
            }
            Ok(None) => {}
            Err(e) => {
                kill_group(&mut child);
                return Err(SshError::Spawn(e));
            }
        }
        if cancelled() {
            kill_group(&mut child);
            let _ = (out.join(), err.join());
            return Err(SshError::Cancelled);
        }
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            kill_group(&mut child);
            timed_out = true;
            break 124;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if let Some(w) = writer {
        let _ = w.join();
    }
    let (stdout, t1) = out.join().unwrap_or_default();
    let (stderr, t2) = err.join().unwrap_or_default();
    Ok(Captured {
        status,
        stdout,
        stderr,
        timed_out,
        truncated: t1 || t2,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::accel::Accel;
    use crate::network::NetworkMode;

    fn state(mode: NetworkMode) -> RunState {
        RunState {
            pid: 1,
            qemu_pid: 2,
            accelerator: Accel::Tcg,
            network_mode: mode,
            started_at: 0,
            ip_address: Some([192, 0, 2, 10].into()),
            ipv6_addresses: Vec::new(),
            host_device: None,
            published: vec!["127.0.0.1:40022:22".parse().unwrap()],
            parent: None,
            note: None,
            lease_file: None,
            guest6_file: None,
            mac_address: None,
            guest_agent: None,
            uplink: None,
            network_policy: Default::default(),
            vnc_port: None,
            vnc_password: None,
            shared_directories: Vec::new(),
        }
    }

    #[test]
    fn target_is_the_address_or_the_user_mode_forward() {
        let ip = Some("192.0.2.10".to_string());
        let t = target("v", &state(NetworkMode::Nat), ip.clone()).unwrap();
        assert_eq!(
            t,
            Target {
                host: "192.0.2.10".into(),
                port: 22
            }
        );
        let t = target("v", &state(NetworkMode::User), ip.clone()).unwrap();
        assert_eq!(
            t,
            Target {
                host: "127.0.0.1".into(),
                port: 40022
            }
        );
        let s = state(NetworkMode::Nat);
        assert!(matches!(target("v", &s, None), Err(SshError::NoAddress(_))));
        let mut s = state(NetworkMode::User);
        s.published.clear();
        assert!(matches!(target("v", &s, ip), Err(SshError::NoForward(_))));
    }

    #[test]
    fn command_pins_the_host_key_per_vm_and_never_prompts_without_a_password() {
        let req = SshRequest {
            vm_name: "web".into(),
            vm_dir: "/s/web".into(),
            user: "lume".into(),
            password: None,
            key: Some("/s/.ssh/id_ed25519".into()),
            command: vec!["echo".into(), "hi".into()],
            tty: false,
            connect_timeout: Duration::from_secs(10),
        };
        let c = command(
            &req,
            &Target {
                host: "192.0.2.10".into(),
                port: 22,
            },
        );
        let args: Vec<String> = c
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("UserKnownHostsFile=\"/s/web/known_hosts\""));
        assert!(joined.contains("StrictHostKeyChecking=accept-new"));
        assert!(joined.contains("HostKeyAlias=lume-web"));
        assert!(joined.contains("BatchMode=yes"));
        assert!(joined.contains("-i /s/.ssh/id_ed25519"));
        assert!(
            joined.ends_with("-T -- lume@192.0.2.10 echo hi"),
            "{joined}"
        );
        assert!(c.get_envs().all(|(k, _)| k != ASKPASS_ENV));
    }

    #[test]
    fn a_user_name_is_never_an_ssh_option() {
        // The real client, told to reach a closed port as a "user" that
        // would be a ProxyCommand if ssh took it for an option.
        let dir = tempfile::tempdir().unwrap();
        let mark = dir.path().join("ran");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let req = SshRequest {
            vm_name: "v".into(),
            vm_dir: dir.path().into(),
            user: format!("-oProxyCommand=touch {}", mark.display()),
            password: None,
            key: None,
            // Without `--` before the destination, this would be the host.
            command: vec!["somehost".into()],
            tty: false,
            connect_timeout: Duration::from_secs(5),
        };
        let to = Target {
            host: "127.0.0.1".into(),
            port,
        };
        let mut c = command(&req, &to);
        c.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let code = run(c, Duration::from_secs(30)).unwrap();
        assert_eq!(code, 255, "ssh fails to connect");
        // The ProxyCommand would have been `touch …/ran@127.0.0.1`.
        let ran: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("ran"))
            .collect();
        assert!(ran.is_empty(), "the user name ran as a ProxyCommand");
    }

    /// Whether process `pid` is gone (or a zombie about to be reaped).
    fn gone(pid: i32) -> bool {
        for _ in 0..250 {
            match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Err(_) => return true,
                Ok(s)
                    if s.rsplit(')')
                        .next()
                        .is_some_and(|r| r.trim_start().starts_with('Z')) =>
                {
                    return true;
                }
                Ok(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        false
    }

    /// A command that leaves a grandchild behind (as ssh's askpass, or a
    /// client that forks) and records its pid.
    fn forking(pidfile: &Path) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c").arg(format!(
            "sleep 300 & echo $! > '{}'; wait",
            pidfile.display()
        ));
        c
    }

    fn pid_in(pidfile: &Path) -> i32 {
        for _ in 0..250 {
            if let Ok(s) = std::fs::read_to_string(pidfile)
                && let Ok(p) = s.trim().parse()
            {
                return p;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("no pid in {}", pidfile.display());
    }

    /// Review finding: a cancelled exec stopped nothing.
    #[test]
    fn a_cancelled_command_is_killed_with_its_whole_group() {
        let t = tempfile::tempdir().unwrap();
        let pidfile = t.path().join("pid");
        let start = std::time::Instant::now();
        let e = run_captured(forking(&pidfile), "", Duration::from_secs(300), &|| {
            pidfile.exists() && start.elapsed() > Duration::from_millis(200)
        })
        .unwrap_err();
        assert!(matches!(e, SshError::Cancelled), "{e}");
        assert!(gone(pid_in(&pidfile)), "the group's other process survived");
    }

    #[test]
    fn a_command_past_its_timeout_is_killed_with_its_whole_group() {
        let t = tempfile::tempdir().unwrap();
        let pidfile = t.path().join("pid");
        let got =
            run_captured(forking(&pidfile), "", Duration::from_millis(500), &|| false).unwrap();
        assert!(got.timed_out && got.status == 124, "{got:?}");
        assert!(gone(pid_in(&pidfile)), "the group's other process survived");
    }

    /// Review finding: the command stood on ssh's command line (`ps`), and
    /// nothing stopped it in the guest. The remote side is run here by a
    /// local `sh`, as sshd runs it with the user's shell.
    #[test]
    fn the_script_goes_on_stdin_and_the_remote_side_bounds_it() {
        let remote = script_command(1);
        let argv = command(
            &SshRequest {
                vm_name: "v".into(),
                vm_dir: PathBuf::from("/nonexistent"),
                user: "lume".into(),
                password: None,
                key: None,
                command: remote.clone(),
                tty: false,
                connect_timeout: Duration::from_secs(1),
            },
            &Target {
                host: "192.0.2.10".into(),
                port: 22,
            },
        );
        let args: Vec<String> = argv
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(args.last(), remote.last(), "{args:?}");
        let run = |script: &str| {
            let mut c = Command::new("sh");
            c.arg("-c").arg(&remote[0]);
            run_captured(c, script, Duration::from_secs(30), &|| false).unwrap()
        };
        let got = run("echo secret-$((6*7)); cat; echo 'it''s' done\n");
        assert_eq!(got.stdout, "secret-42\nits done\n", "{got:?}");
        assert_eq!(got.status, 0);
        // The guest's `timeout -s KILL` stops it by itself.
        let got = run("sleep 30");
        assert_eq!(got.status, 137, "{got:?}");
        assert!(!got.timed_out);
    }
}
