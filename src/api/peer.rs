//! Who is on the other end of a connection, decided once per connection.
//!
//! A TCP client on this host is the owner of its own socket: the kernel's
//! sock_diag (INET_DIAG) lookup of that exact connection (the client's
//! address and port, connected to ours) gives its uid and inode, as identd
//! does. A Unix socket client is given by `SO_PEERCRED`. A socket held by a
//! process lume runs for a VM (QEMU, passt: known by name, by a parent that
//! runs lume's own executable, or as a running VM's `qemuPid`) belongs to a
//! guest: a user-mode guest reaches the host's loopback through it, so it is
//! never a caller.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use netlink_packet_core::{NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use netlink_packet_sock_diag::SockDiagMessage;
use netlink_packet_sock_diag::constants::{AF_INET, AF_INET6, IPPROTO_TCP, TCP_TIME_WAIT};
use netlink_packet_sock_diag::inet::{ExtensionFlags, InetRequest, SocketId, StateFlags};
use netlink_sys::protocols::NETLINK_SOCK_DIAG;

/// Why the owner of a connection could not be found.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("Cannot open a sock_diag netlink socket: the kernel needs CONFIG_INET_DIAG")]
    Socket(#[source] std::io::Error),
    #[error("Cannot ask the kernel who owns the connection from {0}")]
    Query(SocketAddr, #[source] std::io::Error),
    #[error(
        "No local socket connects from {0}: the client is not a process on this host (use the API token)"
    )]
    NotLocal(SocketAddr),
    #[error(
        "The client at {0} has already closed its connection, so no process owns it any more: keep the connection open until the answer arrives"
    )]
    Gone(SocketAddr),
    #[error("The kernel's answer about the connection from {0} cannot be read: {1}")]
    Answer(SocketAddr, String),
}

/// The owner of a client's socket, as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketOwner {
    pub uid: u32,
    pub inode: u32,
}

/// A v4-mapped IPv6 address (a dual-stack listener's IPv4 client) as IPv4.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// The owner of the TCP socket whose own address is `client` and which is
/// connected to `server`: the other end of a connection this server accepted.
pub fn tcp_socket_owner(client: SocketAddr, server: SocketAddr) -> Result<SocketOwner, PeerError> {
    let (client, server) = (canonical(client), canonical(server));
    let family = match (client.ip(), server.ip()) {
        (IpAddr::V4(_), IpAddr::V4(_)) => AF_INET,
        (IpAddr::V6(_), IpAddr::V6(_)) => AF_INET6,
        _ => return Err(PeerError::NotLocal(client)),
    };
    let socket = netlink_sys::Socket::new(NETLINK_SOCK_DIAG).map_err(PeerError::Socket)?;
    socket
        .connect(&netlink_sys::SocketAddr::new(0, 0))
        .map_err(PeerError::Socket)?;
    let mut header = NetlinkHeader::default();
    // One exact socket, not a dump.
    header.flags = NLM_F_REQUEST;
    let mut packet = NetlinkMessage::new(
        header,
        SockDiagMessage::InetRequest(InetRequest {
            family,
            protocol: IPPROTO_TCP,
            extensions: ExtensionFlags::empty(),
            states: StateFlags::all(),
            socket_id: SocketId {
                source_port: client.port(),
                destination_port: server.port(),
                source_address: client.ip(),
                destination_address: server.ip(),
                interface_id: 0,
                // INET_DIAG_NOCOOKIE: any socket with these addresses.
                cookie: [0xff; 8],
            },
        })
        .into(),
    );
    packet.finalize();
    let mut buf = vec![0; packet.buffer_len()];
    packet.serialize(&mut buf[..]);
    socket
        .send(&buf, 0)
        .map_err(|e| PeerError::Query(client, e))?;
    let mut reply = vec![0u8; 8192];
    let n = socket
        .recv(&mut &mut reply[..], 0)
        .map_err(|e| PeerError::Query(client, e))?;
    let msg = <NetlinkMessage<SockDiagMessage>>::deserialize(&reply[..n])
        .map_err(|e| PeerError::Answer(client, e.to_string()))?;
    match msg.payload {
        NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(r)) => {
            let id = &r.header.socket_id;
            // The kernel looked up exactly this connection; make sure.
            if canonical(SocketAddr::new(id.source_address, id.source_port)) != client
                || canonical(SocketAddr::new(id.destination_address, id.destination_port)) != server
            {
                return Err(PeerError::Answer(
                    client,
                    format!("it describes another socket ({id:?})"),
                ));
            }
            // A closed client's socket lingers as a time-wait or orphaned
            // socket: the kernel reports uid 0 and inode 0 for it, which
            // must never pass for root.
            if r.header.state == TCP_TIME_WAIT || r.header.inode == 0 {
                return Err(PeerError::Gone(client));
            }
            Ok(SocketOwner {
                uid: r.header.uid,
                inode: r.header.inode,
            })
        }
        NetlinkPayload::Error(e) if e.raw_code().abs() == libc::ENOENT => {
            Err(PeerError::NotLocal(client))
        }
        NetlinkPayload::Error(e) => Err(PeerError::Query(client, e.to_io())),
        other => Err(PeerError::Answer(
            client,
            format!("unexpected message type {}", other.message_type()),
        )),
    }
}

/// A process lume runs for a VM: QEMU, or the passt network helper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmHelper {
    pub pid: u32,
    pub program: String,
}

/// Whether a program (the basename of `/proc/PID/exe`, perhaps with
/// " (deleted)") is one lume runs for a VM.
pub fn is_vm_helper_program(basename: &str) -> bool {
    let name = basename.trim_end_matches(" (deleted)");
    name.starts_with("qemu-system") || name == "passt" || name.starts_with("passt.")
}

/// The program a process runs: the basename of its executable, else (when
/// that cannot be read) its command name.
fn program(proc_dir: &Path) -> Option<String> {
    if let Ok(exe) = std::fs::read_link(proc_dir.join("exe")) {
        return exe
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .or_else(|| Some(exe.to_string_lossy().into_owned()));
    }
    std::fs::read_to_string(proc_dir.join("comm"))
        .ok()
        .map(|c| c.trim_end().to_string())
}

/// Whether a process holds the socket with this inode. A process whose
/// descriptors cannot be read counts as holding it (refusing is the safe
/// answer about a VM helper).
fn holds_socket(proc_dir: &Path, inode: u64) -> bool {
    let wanted = format!("socket:[{inode}]");
    let Ok(fds) = std::fs::read_dir(proc_dir.join("fd")) else {
        return proc_dir.exists();
    };
    fds.filter_map(Result::ok)
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .any(|target| target.as_os_str() == wanted.as_str())
}

/// The device and inode of the executable a process runs (`/proc/PID/exe`
/// followed), which a renamed or symlinked program cannot change.
fn exe_id(proc_dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata(proc_dir.join("exe"))
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// The parent pid of a process, from `/proc/PID/stat` (after the command
/// name, which may hold spaces and parentheses).
pub fn parent_pid(proc_dir: &Path) -> Option<u32> {
    let stat = std::fs::read_to_string(proc_dir.join("stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// How this server recognises the processes lume runs for VMs, beyond
/// their names (`qemu-system-*`, `passt`): where QEMU is a link to another
/// program (`/usr/libexec/qemu-kvm`) the name says nothing.
#[derive(Debug, Clone, Default)]
pub struct HelperRule {
    /// lume's own executable (device, inode): a process whose parent runs
    /// it, and which does not run it itself, is one a supervisor started.
    pub lume_exe: Option<(u64, u64)>,
    /// The `qemuPid` of every running VM in the server's location.
    pub qemu_pids: Vec<u32>,
}

impl HelperRule {
    /// The rule of this server: its own executable, and the QEMU pids that
    /// the supervisors of running VMs in `store` published.
    pub fn of_server(store: &crate::vm::store::Store) -> Self {
        let qemu_pids = store
            .list()
            .unwrap_or_default()
            .iter()
            .filter_map(|vm| vm.running_state())
            .map(|state| state.qemu_pid)
            .collect();
        Self {
            lume_exe: exe_id(Path::new("/proc/self")),
            qemu_pids,
        }
    }

    /// The process under `proc_dir` (`pid`), as a VM helper, if it is one.
    pub fn helper(&self, proc_root: &Path, pid: u32, proc_dir: &Path) -> Option<VmHelper> {
        let program = program(proc_dir)?;
        let is_helper = is_vm_helper_program(&program)
            || self.qemu_pids.contains(&pid)
            || self.lume_exe.is_some_and(|lume| {
                exe_id(proc_dir) != Some(lume)
                    && parent_pid(proc_dir)
                        .is_some_and(|ppid| exe_id(&proc_root.join(ppid.to_string())) == Some(lume))
            });
        is_helper.then_some(VmHelper { pid, program })
    }
}

/// The VM helper process of `uid` (under the proc tree `proc_root`) that
/// holds the socket `inode`, if any. Only helpers' descriptors are read.
pub fn vm_helper_holding(
    proc_root: &Path,
    uid: u32,
    inode: u64,
    rule: &HelperRule,
) -> Option<VmHelper> {
    let entries = std::fs::read_dir(proc_root).ok()?;
    for entry in entries.filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        if crate::util::procfs::real_uid(&dir) != Some(uid) {
            continue;
        }
        if let Some(helper) = rule.helper(proc_root, pid, &dir)
            && holds_socket(&dir, inode)
        {
            return Some(helper);
        }
    }
    None
}

/// Who a connection comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// A process of this uid on this host.
    User(u32),
    /// A process lume runs for a VM: traffic from a guest.
    Guest(VmHelper),
    /// The owner could not be found (a remote client, or a failed lookup).
    Unknown(String),
}

/// How a connection reached the server, recorded when it is accepted.
#[derive(Debug, Clone, Copy)]
enum Endpoint {
    Tcp {
        client: SocketAddr,
        server: SocketAddr,
    },
    Unix {
        uid: u32,
        pid: Option<i32>,
        /// The connection's descriptor, valid while the connection is
        /// served (for the network hand-off's descriptor passing).
        fd: std::os::fd::RawFd,
    },
    /// The peer could not be read at accept time.
    Unreadable,
}

/// The connection's facts, and its identity once computed (at the first
/// request, on a blocking thread, then kept for the connection's lifetime).
#[derive(Debug, Clone)]
pub struct Connection {
    endpoint: Endpoint,
    identity: Arc<tokio::sync::OnceCell<Identity>>,
}

impl Connection {
    fn new(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            identity: Arc::default(),
        }
    }

    /// Whether the client came through the Unix socket.
    pub fn is_unix(&self) -> bool {
        matches!(self.endpoint, Endpoint::Unix { .. })
    }

    /// The client's address, for the log.
    pub fn describe(&self) -> String {
        match self.endpoint {
            Endpoint::Tcp { client, .. } => client.to_string(),
            Endpoint::Unix { uid, pid, .. } => match pid {
                Some(pid) => format!("unix uid {uid} pid {pid}"),
                None => format!("unix uid {uid}"),
            },
            Endpoint::Unreadable => "unknown".into(),
        }
    }

    /// The origins a browser would give a page served by this very server
    /// on this connection's address (`http://127.0.0.1:7777`, and for a
    /// loopback address `http://localhost:7777`). A Unix socket has none.
    pub fn own_origins(&self) -> Vec<String> {
        let Endpoint::Tcp { server, .. } = self.endpoint else {
            return Vec::new();
        };
        let server = canonical(server);
        let mut hosts = vec![match server.ip() {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("[{ip}]"),
        }];
        if server.ip().is_loopback() {
            hosts.push("localhost".into());
        }
        let port = server.port();
        let mut origins: Vec<String> = hosts.iter().map(|h| format!("http://{h}:{port}")).collect();
        if port == 80 {
            origins.extend(hosts.iter().map(|h| format!("http://{h}")));
        }
        origins
    }

    /// Who is calling; computed once per connection. `storage` is the
    /// server's own VM location (its `--storage`), whose running VMs' QEMU
    /// processes are guests too ([`HelperRule::of_server`]).
    pub async fn identity(&self, storage: Option<std::path::PathBuf>) -> Identity {
        let endpoint = self.endpoint;
        self.identity
            .get_or_init(|| async move {
                tokio::task::spawn_blocking(move || {
                    let rule = HelperRule::of_server(&crate::vm::store::Store::new(storage));
                    identify(endpoint, &rule)
                })
                .await
                .unwrap_or_else(|e| Identity::Unknown(format!("The lookup failed: {e}")))
            })
            .await
            .clone()
    }
}

fn identify(endpoint: Endpoint, rule: &HelperRule) -> Identity {
    let proc_root = Path::new("/proc");
    match endpoint {
        Endpoint::Tcp { client, server } => match tcp_socket_owner(client, server) {
            Ok(owner) => match vm_helper_holding(proc_root, owner.uid, owner.inode.into(), rule) {
                Some(helper) => Identity::Guest(helper),
                None => Identity::User(owner.uid),
            },
            Err(e) => Identity::Unknown(crate::error_chain(&e)),
        },
        Endpoint::Unix { uid, pid, .. } => {
            let helper = pid.and_then(|pid| {
                let pid = u32::try_from(pid).ok()?;
                rule.helper(proc_root, pid, &proc_root.join(pid.to_string()))
            });
            match helper {
                Some(h) => Identity::Guest(h),
                None => Identity::User(uid),
            }
        }
        Endpoint::Unreadable => {
            Identity::Unknown("The connection's addresses cannot be read".into())
        }
    }
}

impl Connection {
    /// An accepted TCP connection from `client`.
    pub fn of_tcp(stream: &tokio::net::TcpStream, client: SocketAddr) -> Self {
        Self::new(match stream.local_addr() {
            Ok(server) => Endpoint::Tcp { client, server },
            Err(_) => Endpoint::Unreadable,
        })
    }

    /// An accepted Unix socket connection.
    pub fn of_unix(stream: &tokio::net::UnixStream) -> Self {
        Self::new(match stream.peer_cred() {
            Ok(cred) => Endpoint::Unix {
                uid: cred.uid(),
                pid: cred.pid(),
                fd: std::os::fd::AsRawFd::as_raw_fd(stream),
            },
            Err(_) => Endpoint::Unreadable,
        })
    }

    /// The uid and pid of a Unix socket's client (`SO_PEERCRED`, read when
    /// the connection was accepted) and the connection's descriptor, which
    /// stays valid while a request of this connection is being handled;
    /// `None` on TCP.
    pub fn unix_peer(&self) -> Option<(u32, i32, std::os::fd::RawFd)> {
        match self.endpoint {
            Endpoint::Unix {
                uid,
                pid: Some(pid),
                fd,
            } => Some((uid, pid, fd)),
            _ => None,
        }
    }

    /// Whose share of the connections this one takes: the local uid owning
    /// the client's socket (one sock_diag query; blocking), else the remote
    /// address. Decided at accept time, before any request.
    pub fn peer_key(&self) -> PeerKey {
        match self.endpoint {
            Endpoint::Tcp { client, server } => match tcp_socket_owner(client, server) {
                Ok(owner) => PeerKey::Uid(owner.uid),
                Err(PeerError::NotLocal(_)) => PeerKey::Remote(client.ip().to_canonical()),
                Err(_) => PeerKey::Unknown,
            },
            Endpoint::Unix { uid, .. } => PeerKey::Uid(uid),
            Endpoint::Unreadable => PeerKey::Unknown,
        }
    }
}

/// Whose share of the server's connections a connection takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerKey {
    /// A local user.
    Uid(u32),
    /// A client on another host (served only with a token).
    Remote(IpAddr),
    /// Neither could be found.
    Unknown,
}

impl std::fmt::Display for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Uid(uid) => write!(f, "uid {uid}"),
            Self::Remote(ip) => write!(f, "remote address {ip}"),
            Self::Unknown => f.write_str("unidentified clients"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt as _;

    #[test]
    fn peer_keys_read_as_words_in_the_log() {
        assert_eq!(PeerKey::Uid(0).to_string(), "uid 0");
        assert_eq!(
            PeerKey::Remote("192.0.2.1".parse().unwrap()).to_string(),
            "remote address 192.0.2.1"
        );
    }

    fn socket_inode(fd: std::os::fd::RawFd) -> u64 {
        std::fs::metadata(format!("/proc/self/fd/{fd}"))
            .unwrap()
            .ino()
    }

    fn lookup_on(listen: &str) {
        use std::os::fd::AsRawFd as _;
        let listener = std::net::TcpListener::bind(listen).unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_accepted, client_addr) = listener.accept().unwrap();
        assert_eq!(client_addr, client.local_addr().unwrap());
        let owner = tcp_socket_owner(client_addr, listener.local_addr().unwrap()).unwrap();
        assert_eq!(owner.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(u64::from(owner.inode), socket_inode(client.as_raw_fd()));
        // The accepted side is not the client: its inode differs.
        assert_ne!(u64::from(owner.inode), socket_inode(_accepted.as_raw_fd()));
    }

    #[test]
    fn sock_diag_finds_the_owner_of_a_loopback_connection() {
        lookup_on("127.0.0.1:0");
    }

    #[test]
    fn sock_diag_finds_the_owner_of_an_ipv6_loopback_connection() {
        if std::net::TcpListener::bind("[::1]:0").is_err() {
            eprintln!("no IPv6 loopback here: skipped");
            return;
        }
        lookup_on("[::1]:0");
    }

    #[test]
    fn a_connection_that_does_not_exist_is_not_local() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let e = tcp_socket_owner(
            "127.0.0.1:9".parse().unwrap(),
            listener.local_addr().unwrap(),
        )
        .unwrap_err();
        assert!(matches!(e, PeerError::NotLocal(_)), "{e:?}");
    }

    /// A client that has closed its socket leaves a time-wait or orphaned
    /// socket owned by nobody (the kernel says uid 0): never root.
    #[test]
    fn a_closed_client_is_nobody() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(server).unwrap();
        let (accepted, client_addr) = listener.accept().unwrap();
        drop(client);
        // Wait until the kernel has processed the FIN (read returns EOF).
        let mut buf = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &accepted, &mut buf).unwrap(), 0);
        let e = tcp_socket_owner(client_addr, server).unwrap_err();
        assert!(matches!(e, PeerError::Gone(_)), "{e:?}");
    }

    #[test]
    fn helper_programs() {
        for yes in [
            "qemu-system-x86_64",
            "qemu-system-aarch64 (deleted)",
            "passt",
            "passt.avx2",
        ] {
            assert!(is_vm_helper_program(yes), "{yes}");
        }
        for no in ["lume", "curl", "qemu-img", "passtime", "python3", ""] {
            assert!(!is_vm_helper_program(no), "{no}");
        }
    }

    /// A copy of `sleep` called `name`, holding `socket` as its fd 3.
    fn spawn_holding(dir: &Path, name: &str, socket: std::net::TcpStream) -> std::process::Child {
        use std::os::fd::AsRawFd as _;
        use std::os::unix::process::CommandExt as _;
        let program = dir.join(name);
        std::fs::copy("/bin/sleep", &program).unwrap();
        let fd = socket.as_raw_fd();
        let mut cmd = std::process::Command::new(&program);
        cmd.arg("30");
        // SAFETY: the closure only calls dup2 and fcntl, which are
        // async-signal-safe, on a descriptor this process owns, in the child
        // between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let ok = if fd == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0) >= 0
                } else {
                    libc::dup2(fd, 3) >= 0
                };
                if ok {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        let child = crate::util::testing::spawn_fresh_program(&mut cmd);
        drop(socket);
        child
    }

    /// Two loopback connections: (the client side to hand to a helper, its
    /// address), (our own client, its address), and the server's address.
    struct Pair {
        listener: std::net::TcpListener,
        guest_side: Option<std::net::TcpStream>,
        guest_addr: SocketAddr,
        _ours: std::net::TcpStream,
        our_addr: SocketAddr,
        _accepted: Vec<std::net::TcpStream>,
    }

    fn pair() -> Pair {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let guest_side = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (a, guest_addr) = listener.accept().unwrap();
        let ours = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (b, our_addr) = listener.accept().unwrap();
        Pair {
            listener,
            guest_side: Some(guest_side),
            guest_addr,
            _ours: ours,
            our_addr,
            _accepted: vec![a, b],
        }
    }

    /// Waits (a child needs a moment to exec) for the helper holding `addr`.
    fn helper_of(p: &Pair, addr: SocketAddr, rule: &HelperRule) -> Option<VmHelper> {
        let server = p.listener.local_addr().unwrap();
        let uid = nix::unistd::geteuid().as_raw();
        (0..100).find_map(|_| {
            let owner = tcp_socket_owner(addr, server).unwrap();
            let h = vm_helper_holding(Path::new("/proc"), uid, owner.inode.into(), rule);
            if h.is_none() {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            h
        })
    }

    /// A real process called `passt` (a copy of `sleep`) holding a real
    /// loopback connection is found as a VM helper; the test process holding
    /// another one is not.
    #[test]
    fn a_process_called_passt_holding_the_socket_is_a_guest() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = pair();
        let mut child = spawn_holding(dir.path(), "passt", p.guest_side.take().unwrap());
        let rule = HelperRule::default();
        let found = helper_of(&p, p.guest_addr, &rule);
        let _ = child.kill();
        let _ = child.wait();
        let found = found.expect("the passt process holds the socket");
        assert_eq!(found.pid, child.id());
        assert_eq!(found.program, "passt");
        let server = p.listener.local_addr().unwrap();
        let owner = tcp_socket_owner(p.our_addr, server).unwrap();
        let uid = nix::unistd::geteuid().as_raw();
        assert_eq!(
            vm_helper_holding(Path::new("/proc"), uid, owner.inode.into(), &rule),
            None
        );
    }

    /// A program with any name is a guest when its parent runs lume's own
    /// executable (here the test binary plays lume: the child's parent is
    /// this process), or when its pid is a running VM's `qemuPid`; by its
    /// name alone it is not. lume itself is never its own helper.
    #[test]
    fn a_renamed_qemu_is_known_by_its_parent_or_its_pid() {
        let dir = tempfile::tempdir().unwrap();
        let mut p = pair();
        let mut child = spawn_holding(dir.path(), "qemu-kvm", p.guest_side.take().unwrap());
        let lume_like = HelperRule {
            lume_exe: exe_id(Path::new("/proc/self")),
            qemu_pids: Vec::new(),
        };
        let by_parent = helper_of(&p, p.guest_addr, &lume_like);
        let by_pid = helper_of(
            &p,
            p.guest_addr,
            &HelperRule {
                lume_exe: None,
                qemu_pids: vec![child.id()],
            },
        );
        // A rule without either: found by name only, which says nothing.
        let server = p.listener.local_addr().unwrap();
        let uid = nix::unistd::geteuid().as_raw();
        let owner = tcp_socket_owner(p.guest_addr, server).unwrap();
        let by_name = vm_helper_holding(
            Path::new("/proc"),
            uid,
            owner.inode.into(),
            &HelperRule::default(),
        );
        // This process runs the "lume" executable itself: not a helper.
        let ours = tcp_socket_owner(p.our_addr, server).unwrap();
        let lume_itself = vm_helper_holding(Path::new("/proc"), uid, ours.inode.into(), &lume_like);
        let _ = child.kill();
        let _ = child.wait();
        let by_parent = by_parent.expect("a child of lume holding the socket is a guest");
        assert_eq!(
            (by_parent.pid, by_parent.program.as_str()),
            (child.id(), "qemu-kvm")
        );
        assert_eq!(by_pid.expect("a qemuPid is a guest").pid, child.id());
        assert_eq!(by_name, None);
        assert_eq!(lume_itself, None);
    }
}
