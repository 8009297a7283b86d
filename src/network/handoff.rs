//! lume without sudo: the privileged half of a `nat`, `host` or `bridged`
//! network, done by the service for a member of group `lume`.
//!
//! A user's own supervisor (`lume run` as that user, in `~/.lume`) lacks
//! CAP_NET_ADMIN. It asks `lume serve` (root, `lume.socket`) over the Unix
//! socket, `POST /lume/network/handoff`, for the network of one VM. The
//! server knows the calling process from `SO_PEERCRED` (uid and pid), takes
//! a pidfd on it and starts a *keeper* (`lume net-keeper`, root, its own
//! session) which attaches the network exactly as a root `lume run` would,
//! except that:
//!
//! - everything root creates lives in root's runtime directory
//!   (`<runtime>/handoff/u<uid>-<vm>`): root never opens, reads or writes a
//!   path in the user's home, so no symlink, FIFO or swapped file there can
//!   reach root. QEMU, the disk, config.json and the logs stay the user's,
//!   used by the user's own processes with the user's rights;
//! - the tap is handed over, not named: the keeper sends its descriptor to
//!   the user's supervisor over the very connection of the request
//!   (`SCM_RIGHTS`, one byte before the HTTP answer), and keeps no copy, so
//!   the tap vanishes with the user's QEMU and nobody else can attach to it;
//! - root's settings (config.yaml of root) choose bridges and subnets; the
//!   user's config.yaml is never read by root;
//! - a user who is not root gets the member rules of
//!   [`super::attach::AttachOptions::member`]: no host port below 1024,
//!   none a host service uses (held while the VM runs), no MAC another
//!   running VM uses, bridged only onto root's `memberBridges`.
//!
//! The keeper holds the network for as long as the user's supervisor
//! lives (its pidfd), then takes it down. It outlives a stopped or
//! restarted service (`KillMode=process` in lume.service), as VMs'
//! supervisors do.

use std::io::{self, BufRead as _, Read as _, Write as _};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::NetworkMode;
use super::attach::{self, AttachError, AttachOptions, Attachment};
use super::policy::Policy;
use super::publish::PortMapping;
use crate::vm::config::MacAddress;

/// The socket of the packaged service (`lume.socket`).
pub const DEFAULT_SOCKET: &str = "/run/lume-api.sock";
/// Names another socket (tests; a service started elsewhere).
pub const SOCKET_ENV: &str = "LUME_SOCKET";
/// The group whose members the packaged service serves.
pub const SERVICE_GROUP: &str = "lume";
/// The route of the hand-off.
pub const ROUTE: &str = "/lume/network/handoff";
/// The descriptor the keeper receives the supervisor's pidfd on.
const KEEPER_PIDFD: i32 = 3;
/// The descriptor the keeper receives the client's connection on.
const KEEPER_CLIENT: i32 = 4;
/// The byte that carries the tap's descriptor, before the HTTP answer.
const TAP_MARK: u8 = 0;
/// The most VMs one user (not root) may have on lume's networks through the
/// service at once: each holds an address, a tap and a keeper.
pub const MAX_PER_USER: usize = 32;

/// The socket this user's lume asks.
pub fn socket_path() -> PathBuf {
    std::env::var_os(SOCKET_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(DEFAULT_SOCKET), PathBuf::from)
}

/// What a user's supervisor asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HandoffRequest {
    pub name: String,
    pub network: NetworkMode,
    pub mac: MacAddress,
    #[serde(default)]
    pub publish: Vec<PortMapping>,
    /// The VM's network policy, put in force by the keeper on the tap before
    /// it is handed over. Left out when empty, so that a run without one
    /// still works with a service from before policies went through it
    /// (one with a policy is refused by such a service: unknown field).
    #[serde(default, skip_serializing_if = "Policy::is_empty")]
    pub policy: Policy,
}

/// What the service made: the tap to open and what is known of the guest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Handed {
    pub device: String,
    pub ip_address: Option<Ipv4Addr>,
    pub parent: Option<String>,
    pub uplink: Option<String>,
    pub note: Option<String>,
    /// Whether the VM's device may offer the guest transmit offloads (false
    /// under a policy when the keeper's filter drops offloaded frames, see
    /// `attach::transmit_offload`); true when a service from before this
    /// field leaves it out.
    #[serde(default = "offload_by_default")]
    pub transmit_offload: bool,
}

fn offload_by_default() -> bool {
    true
}

/// The keeper's one line on standard output.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum KeeperAnswer {
    Ok(Handed),
    Refused { status: u16, message: String },
}

/// Why the service could not give a user the network.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error(
        "Network mode '{mode}' needs root or lume's service, which serves only group '{SERVICE_GROUP}', and you are not in it: ask an administrator to run 'sudo usermod -aG {SERVICE_GROUP} {user}', then log in again (or run lume as root); --network user and none need no privileges"
    )]
    NotInGroup { mode: NetworkMode, user: String },
    #[error(
        "Network mode '{mode}' needs lume's service, and you are in group '{SERVICE_GROUP}', but not in this login session (it started before you joined): log out and in again, or run 'newgrp {SERVICE_GROUP}' in this shell"
    )]
    GroupNotInSession { mode: NetworkMode },
    #[error(
        "Cannot use lume's service socket {path} although this session is in group '{SERVICE_GROUP}': the socket is {found}, not mode 0660 with group '{SERVICE_GROUP}'; an administrator restarts it (sudo systemctl restart lume.socket) or fixes SocketMode/SocketGroup in lume.socket"
    )]
    SocketAccess { path: PathBuf, found: String },
    #[error(
        "Network mode '{mode}' needs root or lume's service, and lume's service is installed but its socket {path} is not there: start it (sudo systemctl enable --now lume.socket), or run lume as root; --network user and none need no privileges"
    )]
    ServiceStopped { mode: NetworkMode, path: PathBuf },
    #[error(
        "Network mode '{mode}' needs lume's service, and nothing answers on its socket {path}: restart it (sudo systemctl restart lume.socket lume.service; journalctl -u lume.service says why it stopped), or run lume as root"
    )]
    ServiceNotAnswering { mode: NetworkMode, path: PathBuf },
    #[error(
        "Cannot reach lume's service on {path}: check that it runs (systemctl status lume.socket lume.service) or run lume as root"
    )]
    Unreachable {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("The lume service refused the network for this VM: {0}")]
    Refused(String),
    #[error(
        "The lume service answered something unexpected ({0}): make sure the installed lume package and this lume are the same version"
    )]
    Protocol(String),
}

/// Why a hand-off request is refused by the service (each with its status).
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(
        "The network hand-off is served only on lume's Unix socket, where the kernel names the calling process: connect to {DEFAULT_SOCKET}"
    )]
    NotUnix,
    #[error("Network mode '{0}' needs no privilege: run it without lume's service")]
    Unprivileged(NetworkMode),
    #[error(
        "Host port {0} is below 1024: only root may publish it; publish a port from 1024 up (for example --publish 8022:22)"
    )]
    PrivilegedPort(u16),
    #[error("Invalid VM name: {0}")]
    Name(String),
    #[error("The calling process (pid {0}) is gone or is not the caller's")]
    Process(i32),
    #[error("Cannot start the network keeper")]
    Spawn(#[source] io::Error),
    #[error(transparent)]
    Policy(#[from] super::policy::PolicyError),
}

impl RequestError {
    /// The HTTP status of this refusal.
    pub fn status(&self) -> u16 {
        match self {
            Self::PrivilegedPort(_) => 403,
            Self::NotUnix
            | Self::Unprivileged(_)
            | Self::Name(_)
            | Self::Process(_)
            | Self::Policy(_) => 400,
            Self::Spawn(_) => 500,
        }
    }
}

/// The checks the service makes before anything exists, for caller `uid`.
pub fn check_request(uid: u32, req: &HandoffRequest) -> Result<(), RequestError> {
    crate::vm::VmName::parse(&req.name).map_err(|e| RequestError::Name(e.to_string()))?;
    if !req.network.needs_net_admin() {
        return Err(RequestError::Unprivileged(req.network.clone()));
    }
    if uid != 0
        && let Err(AttachError::MemberPrivilegedPort(port)) =
            attach::check_member_ports(&req.publish)
    {
        return Err(RequestError::PrivilegedPort(port));
    }
    req.policy.check(&req.network)?;
    Ok(())
}

// ---------------------------------------------------------------- client

/// Whether this process must hand `mode` to the service: it needs
/// CAP_NET_ADMIN, which this process lacks.
pub fn needed(mode: &NetworkMode) -> bool {
    mode.needs_net_admin() && !super::privilege::has_net_admin()
}

fn user_name() -> String {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map_or_else(|| "$USER".into(), |u| u.name)
}

/// Connects to the service, or says in one message what to do: without a
/// service, that the mode needs root (or the service); outside the group,
/// how to join it.
fn connect(mode: &NetworkMode) -> Result<std::os::unix::net::UnixStream, AttachError> {
    let path = socket_path();
    match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if Path::new(SOCKET_UNIT).exists() {
                Err(HandoffError::ServiceStopped {
                    mode: mode.clone(),
                    path,
                }
                .into())
            } else {
                Err(AttachError::NeedsNetAdmin(mode.clone()))
            }
        }
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            Err(HandoffError::ServiceNotAnswering {
                mode: mode.clone(),
                path,
            }
            .into())
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            Err(denied(mode, &path, &crate::vm::Caller::current()).into())
        }
        Err(source) => Err(HandoffError::Unreachable { path, source }.into()),
    }
}

/// The unit file the package installs.
const SOCKET_UNIT: &str = "/lib/systemd/system/lume.socket";

/// Why the socket refused this process: not in group lume; in it, but not
/// in this session; or in it, and the socket is not the group's.
fn denied(mode: &NetworkMode, path: &Path, session: &crate::vm::Caller) -> HandoffError {
    use std::os::unix::fs::MetadataExt as _;
    let group = nix::unistd::Group::from_name(SERVICE_GROUP).ok().flatten();
    let in_session = group.as_ref().is_some_and(|g| {
        session.groups.contains(&g.gid.as_raw()) || session.gid == Some(g.gid.as_raw())
    });
    if in_session {
        let found = std::fs::metadata(path).map_or_else(
            |e| format!("not readable ({e})"),
            |m| {
                let owner = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(m.gid()))
                    .ok()
                    .flatten()
                    .map_or_else(|| m.gid().to_string(), |g| g.name);
                format!("mode {:04o} with group '{owner}'", m.mode() & 0o7777)
            },
        );
        return HandoffError::SocketAccess {
            path: path.to_path_buf(),
            found,
        };
    }
    // The user database (getgrouplist) says whether a new login would be.
    if crate::vm::Caller::from_uid(session.uid).in_group(SERVICE_GROUP) {
        return HandoffError::GroupNotInSession { mode: mode.clone() };
    }
    HandoffError::NotInGroup {
        mode: mode.clone(),
        user: user_name(),
    }
}

/// Checks before a run that the service can be asked (`run`'s preflight).
pub fn check_service(mode: &NetworkMode) -> Result<(), AttachError> {
    connect(mode).map(drop)
}

/// One HTTP/1.1 request on the service's socket: the status and body.
fn post(mode: &NetworkMode, body: &[u8]) -> Result<(u16, Vec<u8>, Option<OwnedFd>), AttachError> {
    let mut stream = connect(mode)?;
    let path = socket_path();
    let io_err = |source| HandoffError::Unreachable {
        path: path.clone(),
        source,
    };
    let head = format!(
        "POST {ROUTE} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).map_err(io_err)?;
    stream.write_all(body).map_err(io_err)?;
    // On success the service first sends one byte carrying the tap.
    let (first, fd) = receive_fd(&stream).map_err(io_err)?;
    let mut answer = Vec::new();
    let tap = match (first, fd) {
        (Some(TAP_MARK), Some(fd)) => Some(fd),
        (Some(b), _) => {
            answer.push(b);
            None
        }
        (None, _) => None,
    };
    stream
        .take(1 << 20)
        .read_to_end(&mut answer)
        .map_err(io_err)?;
    let (status, body) = parse_response(&answer)?;
    Ok((status, body, tap))
}

/// Reads one byte and the descriptor that may come with it.
fn receive_fd(
    stream: &std::os::unix::net::UnixStream,
) -> io::Result<(Option<u8>, Option<OwnedFd>)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut byte = [0u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let mut fd = None;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for raw in fds {
                // SAFETY: the kernel just installed this descriptor in this
                // process for us; nothing else owns it.
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                if fd.is_none() {
                    fd = Some(owned);
                }
            }
        }
    }
    let got = msg.bytes;
    Ok(((got == 1).then_some(byte[0]), fd))
}

/// The status and body of an HTTP/1.1 response read to its end (the
/// server closes the connection; `Content-Length` or chunks are handled).
fn parse_response(answer: &[u8]) -> Result<(u16, Vec<u8>), HandoffError> {
    let bad = |what: &str| HandoffError::Protocol(what.to_string());
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no HTTP header"))?;
    let head = std::str::from_utf8(&answer[..split]).map_err(|_| bad("a header not in UTF-8"))?;
    let mut body = answer[split + 4..].to_vec();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| bad("no HTTP status"))?;
    let chunked = lines.any(|l| {
        l.to_ascii_lowercase()
            .replace(' ', "")
            .starts_with("transfer-encoding:chunked")
    });
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(end) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = std::str::from_utf8(&rest[..end])
                .ok()
                .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
                .ok_or_else(|| bad("a bad chunk"))?;
            if size == 0 {
                break;
            }
            let start = end + 2;
            let chunk = rest
                .get(start..start + size)
                .ok_or_else(|| bad("a short chunk"))?;
            out.extend_from_slice(chunk);
            rest = rest.get(start + size + 2..).unwrap_or_default();
        }
        body = out;
    }
    Ok((status, body))
}

/// Asks the service for `mode`'s network for this user's VM `vm` and opens
/// the tap it made: the attachment to give QEMU. The service takes the
/// network down when this process exits.
pub fn attach_remote(
    mode: &NetworkMode,
    vm: &str,
    mac: MacAddress,
    publish: &[PortMapping],
    policy: &Policy,
) -> Result<Attachment, AttachError> {
    let request = HandoffRequest {
        name: vm.to_string(),
        network: mode.clone(),
        mac,
        publish: publish.to_vec(),
        policy: policy.clone(),
    };
    let body = serde_json::to_vec(&request).map_err(|e| HandoffError::Protocol(e.to_string()))?;
    let (status, body, tap) = post(mode, &body)?;
    if status != 200 {
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("message")?.as_str().map(str::to_string))
            .unwrap_or_else(|| format!("HTTP status {status}"));
        if status == 403 && message.starts_with(crate::api::auth::NOT_SERVED) {
            return Err(HandoffError::NotInGroup {
                mode: mode.clone(),
                user: user_name(),
            }
            .into());
        }
        return Err(HandoffError::Refused(message).into());
    }
    let handed: Handed = serde_json::from_slice(&body)
        .map_err(|e| HandoffError::Protocol(format!("its answer: {e}")))?;
    let fd = tap.ok_or_else(|| HandoffError::Protocol("no tap descriptor came with it".into()))?;
    if !is_tap(&fd) {
        return Err(
            HandoffError::Protocol("the descriptor that came with it is not a tap".into()).into(),
        );
    }
    Ok(attach::handed_off(mac, fd, handed))
}

/// Whether `fd` is a tap (`/dev/net/tun` with an interface attached).
fn is_tap(fd: &OwnedFd) -> bool {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
        .is_ok_and(|t| t.lines().any(|l| l.starts_with("iff:")))
}

// ---------------------------------------------------------------- server

/// `lume serve`'s side: checks the request, takes a pidfd on the calling
/// process `pid` (which must be `uid`'s) and starts the keeper; returns
/// the keeper's answer.
pub fn serve_request(
    uid: u32,
    pid: i32,
    client: std::os::fd::RawFd,
    req: &HandoffRequest,
) -> Result<KeeperAnswer, RequestError> {
    check_request(uid, req)?;
    if client == KEEPER_PIDFD {
        // Never the case (the runtime's own descriptors come first), and
        // the pidfd's place in the keeper would overwrite it.
        return Err(RequestError::Spawn(io::Error::other(
            "the connection is on descriptor 3",
        )));
    }
    let pidfd = pidfd_open(pid).map_err(|_| RequestError::Process(pid))?;
    // The pidfd is of the process that owns the connection now (it waits for
    // this answer); its uid must still be the caller's (not a reused pid).
    if u32::try_from(pid)
        .ok()
        .and_then(crate::util::procfs::real_uid_of)
        != Some(uid)
    {
        return Err(RequestError::Process(pid));
    }
    use std::os::unix::process::CommandExt as _;
    let mut cmd = std::process::Command::new("/proc/self/exe");
    // The very server's executable (even replaced by an upgrade), named
    // `lume` in ps rather than /proc/self/exe.
    cmd.arg0("lume");
    cmd.arg("net-keeper")
        .arg("--uid")
        .arg(uid.to_string())
        .arg("--name")
        .arg(&req.name)
        .arg("--network")
        .arg(req.network.to_string())
        .arg("--mac")
        .arg(req.mac.to_string());
    for p in &req.publish {
        cmd.arg("--publish").arg(p.to_string());
    }
    if !req.policy.is_empty() {
        // The keeper parses and checks it again (its arguments are JSON
        // from this server, never a person's).
        let json = serde_json::to_string(&req.policy)
            .map_err(|e| RequestError::Spawn(io::Error::other(e)))?;
        cmd.arg("--policy").arg(json);
    }
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped());
    let raw = pidfd.as_raw_fd();
    // SAFETY: only async-signal-safe calls (setsid, dup2) between fork and
    // exec; `raw` and `client` stay open in the parent until spawn returns
    // (`client` is the connection being served, alive during this request).
    // The client's fd must not be 3 (the pidfd's place) when duplicated:
    // a listener's connections are never below the runtime's own fds.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid()?;
            if libc::dup2(raw, KEEPER_PIDFD) < 0 || libc::dup2(client, KEEPER_CLIENT) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(RequestError::Spawn)?;
    drop(pidfd);
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = io::BufReader::new(out).read_line(&mut line);
    }
    let answer = serde_json::from_str(line.trim()).unwrap_or_else(|_| {
        // No answer: it died. Reap it and report.
        let status = child.wait().ok();
        KeeperAnswer::Refused {
            status: 500,
            message: format!(
                "The network keeper ended without an answer ({}): see the service's log (journalctl -u lume.service)",
                status.map_or_else(|| "unknown status".into(), |s| s.to_string())
            ),
        }
    });
    // The keeper runs on in its own session; a thread reaps it.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(answer)
}

fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new
    // descriptor or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// `lume net-keeper`'s arguments (from `lume serve`, never from people).
#[derive(Debug, clap::Args)]
pub struct KeeperArgs {
    #[arg(long)]
    pub uid: u32,
    #[arg(long)]
    pub name: String,
    #[arg(long)]
    pub network: NetworkMode,
    #[arg(long)]
    pub mac: MacAddress,
    #[arg(long)]
    pub publish: Vec<PortMapping>,
    /// The VM's policy as config.json's `networkPolicy` JSON.
    #[arg(long)]
    pub policy: Option<String>,
}

/// The keeper's private directory for one user's VM.
fn keeper_dir(uid: u32, name: &str) -> PathBuf {
    super::shared::runtime_root()
        .join("handoff")
        .join(format!("u{uid}-{name}"))
}

/// Runs the keeper: attaches, answers one line on stdout, holds the
/// network until the supervisor (the pidfd on descriptor 3) exits, takes
/// it down. Exit status 0 after a clean take-down.
pub fn keep(args: KeeperArgs) -> anyhow::Result<i32> {
    let Some(pidfd) = inherited(KEEPER_PIDFD) else {
        anyhow::bail!("The net-keeper command is started by lume serve only (no descriptor 3)");
    };
    let answer = match hold(&args, &pidfd) {
        Ok((handed, held)) => {
            println!("{}", serde_json::to_string(&KeeperAnswer::Ok(handed))?);
            let _ = io::stdout().flush();
            // Nothing more for the server: its pipe is let go (stdout
            // becomes /dev/null).
            if let Ok(null) = std::fs::OpenOptions::new().write(true).open("/dev/null") {
                // SAFETY: dup2 onto descriptor 1 (stdout, whose Rust handle
                // stays valid: it now writes to /dev/null).
                unsafe { libc::dup2(null.as_raw_fd(), 1) };
            }
            wait_for_exit(pidfd.as_fd_borrowed());
            take_down(held);
            return Ok(0);
        }
        Err((status, message)) => KeeperAnswer::Refused { status, message },
    };
    println!("{}", serde_json::to_string(&answer)?);
    Ok(1)
}

trait AsFdBorrowed {
    fn as_fd_borrowed(&self) -> BorrowedFd<'_>;
}
impl AsFdBorrowed for OwnedFd {
    fn as_fd_borrowed(&self) -> BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(self)
    }
}

/// What the keeper holds while the user's VM runs.
struct Held {
    attachment: Attachment,
    device: String,
    dir: PathBuf,
    _lock: crate::vm::lock::VmLock,
}

fn hold(args: &KeeperArgs, pidfd: &OwnedFd) -> Result<(Handed, Held), (u16, String)> {
    let fail = |status: u16| move |e: &dyn std::fmt::Display| (status, e.to_string());
    if !is_pidfd(pidfd) {
        return Err((
            500,
            "The net-keeper command is started by lume serve only".into(),
        ));
    }
    let policy: Policy = match &args.policy {
        Some(json) => serde_json::from_str(json).map_err(|e| {
            (
                400,
                format!("The network policy of the hand-off is not valid: {e}"),
            )
        })?,
        None => Policy::default(),
    };
    let req = HandoffRequest {
        name: args.name.clone(),
        network: args.network.clone(),
        mac: args.mac,
        publish: args.publish.clone(),
        policy,
    };
    check_request(args.uid, &req).map_err(|e| (e.status(), e.to_string()))?;
    let dir = keeper_dir(args.uid, &args.name);
    let base = super::shared::runtime_root();
    if args.uid != 0 {
        let live = live_handoffs(&base.join("handoff"), args.uid);
        if live >= MAX_PER_USER {
            return Err((
                429,
                format!(
                    "User {} already has {live} VMs on lume's networks through the service, the most one user may: stop one first",
                    args.uid
                ),
            ));
        }
    }
    let lock = keeper_lock(&base, &dir, &args.name, args.uid)?;
    // From here this keeper owns the directory: a refusal removes it.
    let cleanup = RemoveOnDrop(Some(dir.clone()));
    let settings = crate::settings::Settings::load().map_err(|e| fail(500)(&e))?;
    let opts = AttachOptions {
        user_net: None,
        publish: args.publish.clone(),
        settings,
        vm: Some((args.name.clone(), dir.clone())),
        host_loopback: false,
        // Enforced on the tap exactly as for a root run (the filter before
        // QEMU exists, the guard in this keeper while the VM runs); a
        // policy that cannot be attached refuses the hand-off.
        policy: req.policy.clone(),
        member: args.uid != 0,
    };
    let mut attachment =
        attach::attach(&args.network, &args.name, &dir, args.mac, &opts).map_err(|e| {
            let status = match e {
                AttachError::MemberPrivilegedPort(_) | AttachError::MemberBridge(_) => 403,
                AttachError::MemberPortInUse { .. }
                | AttachError::Shared(super::shared::SharedError::MacTaken { .. })
                | AttachError::Shared(super::shared::SharedError::PortTaken { .. }) => 409,
                AttachError::Publish(_)
                | AttachError::PublishNotSupported(_)
                | AttachError::LoopbackPublish(..)
                | AttachError::Bridge(_)
                | AttachError::OwnBridge(..)
                | AttachError::Policy(_) => 400,
                _ => 500,
            };
            (status, e.to_string())
        })?;
    // The keeper holds the attachment for the VM's life: dnsmasq's start
    // is waited for now, and a failure refuses the hand-off.
    attachment
        .await_dnsmasq()
        .map_err(|e| (500, e.to_string()))?;
    let device = attachment
        .host_device
        .clone()
        .ok_or_else(|| (500, "The network has no tap device".to_string()))?;
    // The tap goes to the user's supervisor; the keeper keeps no copy.
    let tap = attachment
        .fds
        .pop()
        .ok_or_else(|| (500, "The network has no tap descriptor".to_string()))?;
    send_fd(&tap).map_err(|e| fail(500)(&e))?;
    drop(tap);
    let handed = Handed {
        device: device.clone(),
        ip_address: attachment.reserved,
        parent: attachment.parent.clone(),
        uplink: attachment.uplink.clone(),
        note: attachment.note.clone(),
        transmit_offload: attach::transmit_offload(&req.policy),
    };
    cleanup.keep();
    Ok((
        handed,
        Held {
            attachment,
            device,
            dir,
            _lock: lock,
        },
    ))
}

/// How long a keeper waits for the previous keeper of the same VM (a run
/// just stopped, its network still being taken down).
const KEEPER_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Takes the keeper's lock in its private directory, waiting up to
/// [`KEEPER_WAIT`] for a previous keeper of the same VM to finish (it
/// removes the directory as it ends, so the lock is taken again on a
/// fresh directory until it is the one at the path).
fn keeper_lock(
    base: &Path,
    dir: &Path,
    name: &str,
    uid: u32,
) -> Result<crate::vm::lock::VmLock, (u16, String)> {
    let deadline = std::time::Instant::now() + KEEPER_WAIT;
    let path = dir.join(".lock");
    loop {
        super::rundir::private_dir(base, dir).map_err(|e| (500, e.to_string()))?;
        match crate::vm::lock::VmLock::try_acquire(&path) {
            Ok(Some(lock)) if lock.is_at(&path) => return Ok(lock),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err((500, e.to_string())),
        }
        if std::time::Instant::now() >= deadline {
            return Err((
                409,
                format!(
                    "VM '{name}' of uid {uid} already has a network from lume's service: another run of it is still running or still stopping; stop it (lume stop {name}) and try again"
                ),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Removes a keeper's directory when a refusal drops it (never another
/// keeper's: it is made only once this keeper holds the directory's lock).
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// How many hand-offs of `uid` are live under `root` (their keeper holds
/// the directory's lock).
fn live_handoffs(root: &Path, uid: u32) -> usize {
    let prefix = format!("u{uid}-");
    std::fs::read_dir(root)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .filter(|e| {
                    crate::vm::lock::VmLock::is_held(&e.path().join(".lock")).unwrap_or(true)
                })
                .count()
        })
        .unwrap_or(0)
}

/// Sends the tap to the client on the connection `lume serve` placed at
/// [`KEEPER_CLIENT`], then closes the keeper's copy of that connection.
fn send_fd(tap: &OwnedFd) -> io::Result<()> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let client = inherited(KEEPER_CLIENT)
        .ok_or_else(|| io::Error::other("no client connection on descriptor 4"))?;
    let fds = [tap.as_raw_fd()];
    let iov = [io::IoSlice::new(&[TAP_MARK])];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let sent = sendmsg::<()>(
        client.as_raw_fd(),
        &iov,
        &cmsg,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(io::Error::from)?;
    if sent != 1 {
        return Err(io::Error::other("the client's connection took no byte"));
    }
    Ok(())
}

/// Takes ownership of descriptor `fd` that `lume serve` placed in this
/// process, if it is open (never twice: [`keep`] takes 3, [`send_fd`] 4).
fn inherited(fd: i32) -> Option<OwnedFd> {
    // SAFETY: F_GETFD only reads the descriptor's flags; an unused number
    // gives EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return None;
    }
    // No child of this process gets it (a spawned `nft`, dnsmasq).
    // SAFETY: F_SETFD only sets the open descriptor's flags.
    unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
    // SAFETY: the descriptor is open and nothing else in this process
    // owns it: `lume serve` placed it before exec, and it is taken once.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether `fd` is a pidfd (its fdinfo names a `Pid:`).
fn is_pidfd(fd: &OwnedFd) -> bool {
    std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
        .is_ok_and(|t| t.lines().any(|l| l.starts_with("Pid:")))
}

/// Blocks until the process behind `pidfd` exits (the pidfd turns readable).
fn wait_for_exit(pidfd: BorrowedFd<'_>) {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    loop {
        let mut fds = [PollFd::new(pidfd, PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(n) if n > 0 => return,
            Err(nix::errno::Errno::EINTR) | Ok(_) => continue,
            Err(_) => return,
        }
    }
}

/// Takes the network down: the tap (if the user never opened it, it is
/// still persistent), then the shared network's share, then the directory.
fn take_down(held: Held) {
    if let Ok(mut nl) = super::kernel::netlink::Netlink::open() {
        let _ = nl.delete_link(&held.device);
    }
    let Held {
        attachment, dir, ..
    } = held;
    drop(attachment);
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(network: &str, publish: &[&str]) -> HandoffRequest {
        HandoffRequest {
            name: "dev".into(),
            network: network.parse().unwrap(),
            mac: "52:54:00:12:34:56".parse().unwrap(),
            publish: publish.iter().map(|p| p.parse().unwrap()).collect(),
            policy: Policy::default(),
        }
    }

    /// A group member could otherwise take the host's SSH port (DNAT from
    /// every host address to their guest).
    #[test]
    fn users_may_not_publish_privileged_ports() {
        let e = check_request(1000, &request("nat", &["22:22"])).unwrap_err();
        assert!(matches!(e, RequestError::PrivilegedPort(22)), "{e}");
        assert_eq!(e.status(), 403);
        assert!(e.to_string().starts_with("Host port 22 is below 1024"));
        assert!(check_request(1000, &request("nat", &["8022:22"])).is_ok());
        assert!(
            check_request(0, &request("nat", &["22:22"])).is_ok(),
            "root may"
        );
    }

    #[test]
    fn names_are_checked_and_unprivileged_modes_refused() {
        let mut r = request("nat", &[]);
        r.name = "../../etc".into();
        assert!(matches!(
            check_request(1000, &r),
            Err(RequestError::Name(_))
        ));
        assert!(matches!(
            check_request(1000, &request("user", &[])),
            Err(RequestError::Unprivileged(_))
        ));
        // Unknown fields are refused, not ignored.
        let e = serde_json::from_str::<HandoffRequest>(
            r#"{"name":"dev","network":"nat","mac":"52:54:00:12:34:56","vmDir":"/etc"}"#,
        );
        assert!(e.is_err());
    }

    /// The policy travels with the request (and only when there is one, so
    /// a run without one still works with an older service), and the
    /// service checks it as a root run does.
    #[test]
    fn the_policy_goes_with_the_request_and_is_checked() {
        let plain = serde_json::to_value(request("nat", &[])).unwrap();
        assert!(plain.get("policy").is_none(), "{plain}");
        let mut r = request("nat", &[]);
        r.policy = Policy::from_parts(&["198.51.100.2:8000/tcp".into()], &[], true).unwrap();
        let j = serde_json::to_string(&r).unwrap();
        assert!(
            j.contains(r#""policy":{"allowOut":["198.51.100.2/32:8000/tcp"],"isolate":true}"#),
            "{j}"
        );
        let back: HandoffRequest = serde_json::from_str(&j).unwrap();
        assert_eq!(back.policy, r.policy);
        assert!(check_request(1000, &back).is_ok());
        r.policy.deny_out = (0..=super::super::policy::MAX_RULES as u32)
            .map(|i| super::super::policy::Rule {
                net: super::super::policy::Cidr::new(Ipv4Addr::from(0x0a00_0000 + (i << 8)), 24),
                ports: None,
                proto: None,
            })
            .collect();
        let e = check_request(1000, &r).unwrap_err();
        assert!(matches!(e, RequestError::Policy(_)), "{e}");
        assert_eq!(e.status(), 400);
        // A rule that is not one never reaches the keeper.
        assert!(
            serde_json::from_str::<HandoffRequest>(
                r#"{"name":"dev","network":"nat","mac":"52:54:00:12:34:56","policy":{"allowOut":["10.0.0.1/8"]}}"#
            )
            .is_err()
        );
    }

    /// A member could otherwise hold every address of the NAT subnet with
    /// sleeping processes: only the live hand-offs of that uid count.
    #[test]
    fn live_handoffs_are_counted_per_user() {
        let root = tempfile::tempdir().unwrap();
        let mut held = Vec::new();
        for name in ["u1000-a", "u1000-b", "u1001-a", "u10000-a"] {
            let dir = root.path().join(name);
            std::fs::create_dir(&dir).unwrap();
            held.push(crate::vm::lock::VmLock::try_acquire(&dir.join(".lock")).unwrap());
        }
        // A keeper that ended: its lock is free.
        let dead = root.path().join("u1000-c");
        std::fs::create_dir(&dead).unwrap();
        drop(crate::vm::lock::VmLock::try_acquire(&dead.join(".lock")).unwrap());
        assert_eq!(live_handoffs(root.path(), 1000), 2);
        assert_eq!(live_handoffs(root.path(), 1001), 1);
        assert_eq!(live_handoffs(root.path(), 7), 0);
        drop(held);
        assert_eq!(live_handoffs(root.path(), 1000), 0);
    }

    /// `lume stop dev; lume run dev`: the new keeper waits for the old one,
    /// which removes its directory as it ends, and then holds a lock that
    /// is the one at the path (not on the removed directory's file).
    #[test]
    fn a_keeper_waits_for_the_previous_one_of_its_vm() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("handoff/u1000-dev");
        let lock = keeper_lock(base.path(), &dir, "dev", 1000).unwrap();
        let old_dir = dir.clone();
        let old = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            std::fs::remove_dir_all(&old_dir).unwrap();
            drop(lock);
        });
        let new = keeper_lock(base.path(), &dir, "dev", 1000).unwrap();
        old.join().unwrap();
        assert!(new.is_at(&dir.join(".lock")));
        // A refusal removes the directory only when this keeper made it.
        RemoveOnDrop(Some(dir.clone())).keep();
        assert!(dir.exists());
        drop(RemoveOnDrop(Some(dir.clone())));
        assert!(!dir.exists());
    }

    #[test]
    fn responses_are_read_plain_or_chunked() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain).unwrap(), (200, b"{}".to_vec()));
        let chunked =
            b"HTTP/1.1 403 Forbidden\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (403, b"abcde".to_vec()));
        assert!(parse_response(b"garbage").is_err());
    }
}
