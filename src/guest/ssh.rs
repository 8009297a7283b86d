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

use crate::network::NetworkMode;
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
    if state.network_mode == NetworkMode::User {
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
    if state.network_mode == NetworkMode::None {
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
    store: &crate::vm::store::Store,
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
        let address = crate::vm::details::VmDetails::read(store, vm).ip_address;
        let why = match target(name, &state, address) {
            Ok(to) => {
                let answers = to
                    .host
                    .parse::<std::net::IpAddr>()
                    .map(|ip| {
                        crate::guest::reach::ssh_answers(&state.network_mode, (ip, to.port).into())
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

/// Runs `cmd` (from [`command`], no terminal) with standard input closed,
/// collecting its output; kills it after `timeout` (zero: no limit).
pub fn run_captured(mut cmd: Command, timeout: Duration) -> Result<Captured, SshError> {
    use std::io::Read;
    use std::process::Stdio;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => SshError::NoClient,
        _ => SshError::Spawn(e),
    })?;
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
        if let Some(status) = child.try_wait().map_err(SshError::Spawn)? {
            use std::os::unix::process::ExitStatusExt;
            break status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
        }
        if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
            let _ = child.kill();
            let _ = child.wait();
            timed_out = true;
            break 124;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
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

    fn state(mode: NetworkMode) -> RunState {
        RunState {
            pid: 1,
            qemu_pid: 2,
            accelerator: Accel::Tcg,
            network_mode: mode,
            started_at: 0,
            ip_address: Some("192.0.2.10".into()),
            host_device: None,
            published: vec!["127.0.0.1:40022:22".parse().unwrap()],
            parent: None,
            note: None,
            lease_file: None,
            mac_address: None,
            guest_agent: None,
            uplink: None,
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
}
