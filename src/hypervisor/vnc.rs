//! The VNC display of a running VM.
//!
//! QEMU's own VNC server listens on a Unix socket in the VM's 0700 directory
//! (`vnc.sock`, `password=on`); the supervisor binds the TCP port on
//! 127.0.0.1 itself and forwards each connection to that socket. Binding
//! first means port 0 is the kernel's pick of a free port and a named port
//! that is taken fails before QEMU starts: there is no window in which
//! another program can take the port between choosing and listening. The
//! password is given to QEMU through QMP (`set_password`) before the port
//! accepts anything, so it never appears on a command line; until it is set
//! QEMU refuses every VNC login.
//!
//! VNC's password authentication (RFB "VNC authentication") uses at most 8
//! characters of the password: QEMU and every client ignore the rest.
//!
//! Any local user can connect to the port, so connections are limited:
//! at most [`Limits::per_uid`] at once per local uid (the socket's owner,
//! from the kernel's sock_diag, as the API server finds its callers), at
//! most [`Limits::total`] in all, and a connection whose client has not sent
//! the whole RFB handshake up to its ClientInit ([`LOGIN_BYTES`]) within
//! [`Limits::login_timeout`] is closed: idle sockets cannot lock the owner
//! out. A client that sent that much has either logged in or been refused
//! by QEMU (which then closes the connection).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use super::qmp::{Qmp, QmpError};

/// QEMU's VNC socket, relative to the VM directory (QEMU's working directory).
pub const VNC_SOCKET: &str = "vnc.sock";

/// The environment variable through which `run --detach` hands a
/// `--vnc-password` to its supervisor (never its command line).
pub const PASSWORD_ENV: &str = "LUME_VNC_PASSWORD";

/// What a client sends up to and including its ClientInit: the protocol
/// version (12 bytes), the chosen security type (1, RFB 3.7 and 3.8), the
/// answer to the 16-byte challenge (16), ClientInit (1). RFB 3.3 has no
/// security-type byte: 29 bytes then include ClientInit; in 3.7/3.8 they
/// complete the password answer, which QEMU then accepts or refuses.
pub const LOGIN_BYTES: u64 = 29;

/// The limits on one VM's VNC connections.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections at once from one local uid.
    pub per_uid: usize,
    /// Connections at once in all.
    pub total: usize,
    /// How long a client has to send its handshake ([`LOGIN_BYTES`]).
    pub login_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            per_uid: 4,
            total: 32,
            login_timeout: Duration::from_secs(30),
        }
    }
}

/// The password taken from [`PASSWORD_ENV`] by [`take_password_env`].
static ENV_PASSWORD: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// Takes `LUME_VNC_PASSWORD` out of this process's environment (so that no
/// program lume starts inherits it) and keeps it for [`env_password`].
///
/// # Safety
/// Changes the environment: call it while the process has one thread.
pub unsafe fn take_password_env() {
    let p = std::env::var(PASSWORD_ENV).ok();
    // SAFETY: the caller guarantees no other thread exists.
    unsafe { std::env::remove_var(PASSWORD_ENV) };
    let _ = ENV_PASSWORD.set(p);
}

/// The `LUME_VNC_PASSWORD` this process was started with, if any.
pub fn env_password() -> Option<String> {
    ENV_PASSWORD.get().cloned().flatten()
}

/// `lume run … --vnc-password P …` as the same command without the option,
/// with `P` to hand over in [`PASSWORD_ENV`]; `None` when `args` (the whole
/// command line, program first) is not a `run` with a `--vnc-password`.
pub fn strip_password_arg(
    args: &[std::ffi::OsString],
) -> Option<(Vec<std::ffi::OsString>, String)> {
    if args.get(1).and_then(|a| a.to_str()) != Some("run") {
        return None;
    }
    let mut out = Vec::with_capacity(args.len());
    let mut password = None;
    let mut i = 0;
    while i < args.len() {
        let a = args[i].to_str().unwrap_or("");
        if a == "--" {
            out.extend(args[i..].iter().cloned());
            break;
        }
        if a == "--vnc-password" && i + 1 < args.len() {
            password = args[i + 1].to_str().map(str::to_string);
            i += 2;
            continue;
        }
        if let Some(p) = a.strip_prefix("--vnc-password=") {
            password = Some(p.to_string());
            i += 1;
            continue;
        }
        out.push(args[i].clone());
        i += 1;
    }
    password.map(|p| (out, p))
}

/// The longest password lume accepts (VNC itself uses the first 8 characters).
pub const MAX_PASSWORD_LEN: usize = 64;

/// Why the VNC display cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum VncError {
    #[error(
        "VNC port {port} on 127.0.0.1 is in use or not allowed: choose another with --vnc-port, or --vnc-port 0 for a free one"
    )]
    Bind {
        port: u16,
        #[source]
        source: io::Error,
    },
    #[error("Cannot set the VNC password through QMP; see the VM's qemu.log")]
    Password(#[source] QmpError),
    #[error(
        "The VNC password must be 1 to {MAX_PASSWORD_LEN} printable ASCII characters (VNC uses the first 8): choose another --vnc-password"
    )]
    BadPassword,
}

/// Checks a password a user chose.
pub fn check_password(p: &str) -> Result<(), VncError> {
    if p.is_empty() || p.len() > MAX_PASSWORD_LEN || !p.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(VncError::BadPassword);
    }
    Ok(())
}

/// A random 8-character password (letters and digits, from getrandom(2)):
/// all that VNC authentication uses.
pub fn random_password() -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut b = [0u8; 8];
    crate::util::random::fill(&mut b);
    b.iter()
        .map(|x| ALPHABET[*x as usize % ALPHABET.len()] as char)
        .collect()
}

/// lume's `vncUrl`: `vnc://:PASSWORD@127.0.0.1:PORT` (characters that
/// would end the user-info part are percent-encoded).
pub fn url(port: u16, password: &str) -> String {
    let mut enc = String::new();
    for b in password.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b) {
            enc.push(b as char);
        } else {
            enc.push_str(&format!("%{b:02X}"));
        }
    }
    format!("vnc://:{enc}@127.0.0.1:{port}")
}

/// The viewers lume opens for `--display vnc|native` and `lume attach`, in
/// this order: virt-viewer's `remote-viewer`, which takes lume's `vnc://`
/// URL with its password, then the desktop's handler for `vnc://` URLs.
pub const VIEWERS: &[&str] = &["remote-viewer", "xdg-open"];

/// Why no viewer shows the display.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoViewer {
    #[error(
        "no graphical session (neither DISPLAY nor WAYLAND_DISPLAY is set; sudo drops them unless told to keep them)"
    )]
    NoSession,
    #[error("no viewer is installed (install virt-viewer for remote-viewer)")]
    NotInstalled,
    #[error("{0} exited at once ({1})")]
    Failed(&'static str, String),
}

/// Opens `url` in the first viewer of [`VIEWERS`] found in PATH, when a
/// graphical session is there (`DISPLAY` or `WAYLAND_DISPLAY`);
/// `remote-viewer` is given the connection file `vv` instead when there is
/// one (it ignores a password in a `vnc://` URL, and the file keeps the
/// password off its command line); returns the
/// viewer started (still running after a short moment), or why none shows
/// the display (then the caller prints the URL).
pub fn open_viewer(url: &str, vv: Option<&Path>) -> Result<&'static str, NoViewer> {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("DISPLAY").is_none() && std::env::var_os("WAYLAND_DISPLAY").is_none() {
        return Err(NoViewer::NoSession);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut failed = None;
    for viewer in VIEWERS {
        let Some(exe) = std::env::split_paths(&path)
            .map(|d| d.join(viewer))
            .find(|p| p.is_file())
        else {
            continue;
        };
        let mut cmd = std::process::Command::new(exe);
        match vv {
            Some(file) if *viewer == "remote-viewer" => cmd.arg(file),
            _ => cmd.arg(url),
        };
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: setsid is async-signal-safe; the viewer gets a session of
        // its own and outlives lume.
        unsafe {
            cmd.pre_exec(|| {
                nix::unistd::setsid()?;
                Ok(())
            });
        }
        let Ok(mut child) = cmd.spawn() else { continue };
        // A viewer that cannot show anything (no display server reachable,
        // a broken handler) usually exits at once: then try the next one.
        let deadline = std::time::Instant::now() + Duration::from_millis(500);
        let exited = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => break None,
            }
        };
        match exited {
            // xdg-open hands the URL to a handler and exits 0.
            Some(status) if !status.success() => {
                failed = Some(NoViewer::Failed(viewer, status.to_string()));
            }
            _ => return Ok(viewer),
        }
    }
    Err(failed.unwrap_or(NoViewer::NotInstalled))
}

/// The name of the connection file for virt-viewer in the VM directory.
pub const VIEWER_FILE: &str = "viewer.vv";

/// Writes `<vm_dir>/viewer.vv` (0600, atomically): virt-viewer's connection
/// file for this display, with its password.
pub fn write_viewer_file(
    vm_dir: &Path,
    port: u16,
    password: &str,
) -> io::Result<std::path::PathBuf> {
    let path = vm_dir.join(VIEWER_FILE);
    let text = format!(
        "[virt-viewer]\ntype=vnc\nhost=127.0.0.1\nport={port}\npassword={password}\ndelete-this-file=0\n"
    );
    crate::util::atomic::write_private(&path, text.as_bytes())?;
    Ok(path)
}

/// Binds 127.0.0.1:`port` (0: a free port the kernel picks).
pub fn bind(port: u16) -> Result<TcpListener, VncError> {
    TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .map_err(|source| VncError::Bind { port, source })
}

/// Gives QEMU the VNC password.
pub fn set_password(qmp: &mut Qmp, password: &str) -> Result<(), VncError> {
    qmp.execute(
        "set_password",
        Some(json!({ "protocol": "vnc", "password": password })),
    )
    .map(|_| ())
    .map_err(VncError::Password)
}

/// The loopback port forwarding to QEMU's VNC socket; closed when dropped.
pub struct VncForwarder {
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    pub port: u16,
}

impl VncForwarder {
    /// Starts accepting on `listener`; every connection is joined to
    /// `<vm_dir>/vnc.sock` (reached through a descriptor of the directory,
    /// so a long path and a renamed directory do not matter).
    pub fn start(listener: TcpListener, vm_dir: &Path) -> io::Result<Self> {
        Self::start_with(listener, vm_dir, Limits::default())
    }

    /// [`Self::start`] with other limits.
    pub fn start_with(listener: TcpListener, vm_dir: &Path, limits: Limits) -> io::Result<Self> {
        let port = listener.local_addr()?.port();
        let dir = File::options()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(vm_dir)?;
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (listener.clone(), stop.clone());
        // Open connections per socket owner (u32::MAX: owner unknown).
        let active: Arc<Mutex<HashMap<u32, usize>>> = Arc::default();
        std::thread::Builder::new()
            .name("vnc-accept".into())
            .spawn(move || {
                let sock = format!("/proc/self/fd/{}/{VNC_SOCKET}", dir.as_raw_fd());
                for conn in l.incoming() {
                    if s.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(tcp) = conn else { continue };
                    let uid = match (tcp.peer_addr(), tcp.local_addr()) {
                        (Ok(client), Ok(server)) => {
                            crate::api::peer::tcp_socket_owner(client, server)
                                .map(|o| o.uid)
                                .unwrap_or(u32::MAX)
                        }
                        _ => u32::MAX,
                    };
                    {
                        let mut a = active.lock().unwrap_or_else(|e| e.into_inner());
                        let total: usize = a.values().sum();
                        let mine = a.entry(uid).or_insert(0);
                        if *mine >= limits.per_uid || total >= limits.total {
                            continue; // dropped: closed at once
                        }
                        *mine += 1;
                    }
                    let release = {
                        let a = active.clone();
                        move || {
                            let mut a = a.lock().unwrap_or_else(|e| e.into_inner());
                            if let Some(n) = a.get_mut(&uid) {
                                *n = n.saturating_sub(1);
                                if *n == 0 {
                                    a.remove(&uid);
                                }
                            }
                        }
                    };
                    let Ok(unix) = UnixStream::connect(&sock) else {
                        release();
                        continue;
                    };
                    let spawned = std::thread::Builder::new().name("vnc-conn".into()).spawn({
                        let release = release.clone();
                        move || {
                            let _ = join(tcp, unix, limits.login_timeout);
                            release();
                        }
                    });
                    if spawned.is_err() {
                        release();
                    }
                }
                drop(dir);
            })?;
        Ok(Self {
            listener,
            stop,
            port,
        })
    }
}

impl Drop for VncForwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // SAFETY: shutdown(2) on a descriptor this value owns (through the
        // Arc) wakes the accept loop; the descriptor stays valid until the
        // last Arc is dropped.
        unsafe {
            libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR);
        }
    }
}

/// Copies both ways until either side closes; closes both sides when the
/// client has not sent [`LOGIN_BYTES`] within `login_timeout`.
fn join(tcp: TcpStream, unix: UnixStream, login_timeout: Duration) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    let (mut tcp_r, mut unix_w) = (tcp.try_clone()?, unix.try_clone()?);
    let up = std::thread::spawn(move || {
        let deadline = Instant::now() + login_timeout;
        let mut sent = 0u64;
        let mut buf = vec![0u8; 16 << 10];
        let _ = tcp_r.set_read_timeout(Some(login_timeout.max(Duration::from_millis(1))));
        loop {
            match tcp_r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if unix_w.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    let before = sent;
                    sent += n as u64;
                    if before < LOGIN_BYTES && sent >= LOGIN_BYTES {
                        let _ = tcp_r.set_read_timeout(None);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if sent < LOGIN_BYTES
                        && matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                        ) =>
                {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        // Too slow to log in: close both ends.
                        let _ = tcp_r.shutdown(Shutdown::Both);
                        break;
                    }
                    let _ = tcp_r.set_read_timeout(Some(left));
                }
                Err(_) => break,
            }
        }
        let _ = unix_w.shutdown(Shutdown::Both);
    });
    let (mut unix_r, mut tcp_w) = (unix, tcp);
    let _ = io::copy(&mut unix_r, &mut tcp_w);
    let _ = tcp_w.shutdown(Shutdown::Both);
    let _ = unix_r.shutdown(Shutdown::Both);
    let _ = up.join();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_option_is_taken_off_the_command_line() {
        let v = |a: &[&str]| a.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        let (rest, p) = strip_password_arg(&v(&[
            "lume",
            "run",
            "vm",
            "--vnc-password",
            "s3",
            "--detach",
        ]))
        .unwrap();
        assert_eq!(
            (rest, p.as_str()),
            (v(&["lume", "run", "vm", "--detach"]), "s3")
        );
        let (rest, p) =
            strip_password_arg(&v(&["lume", "run", "--vnc-password=a=b", "vm"])).unwrap();
        assert_eq!((rest, p.as_str()), (v(&["lume", "run", "vm"]), "a=b"));
        assert!(strip_password_arg(&v(&["lume", "ls", "--vnc-password", "x"])).is_none());
        assert!(strip_password_arg(&v(&["lume", "run", "vm"])).is_none());
    }

    #[test]
    fn the_viewer_file_is_private_and_names_the_display() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = write_viewer_file(dir.path(), 5901, "s3cr:t@/").unwrap();
        assert_eq!(p, dir.path().join(VIEWER_FILE));
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(
            text.starts_with("[virt-viewer]\ntype=vnc\nhost=127.0.0.1\n"),
            "{text}"
        );
        assert!(
            text.contains("\nport=5901\n") && text.contains("\npassword=s3cr:t@/\n"),
            "{text}"
        );
    }

    #[test]
    fn passwords_are_checked_and_the_url_is_lumes_shape() {
        assert!(check_password("").is_err());
        assert!(check_password("with space").is_err());
        assert!(check_password(&"x".repeat(65)).is_err());
        assert!(check_password("s3cr:t@/").is_ok());
        let p = random_password();
        assert_eq!(p.len(), 8);
        assert_ne!(p, random_password());
        assert_eq!(url(5901, "abc"), "vnc://:abc@127.0.0.1:5901");
        assert_eq!(url(1, "a@b:c/"), "vnc://:a%40b%3Ac%2F@127.0.0.1:1");
    }

    /// Connects to `port` from a thread whose filesystem uid is `uid`: the
    /// socket is owned by that uid, as if that user had connected.
    fn connect_as(uid: u32, port: u16) -> TcpStream {
        std::thread::spawn(move || {
            // SAFETY: raw setfsuid changes this short-lived thread's
            // filesystem uid only.
            unsafe { libc::syscall(libc::SYS_setfsuid, uid) };
            let s = TcpStream::connect((Ipv4Addr::LOCALHOST, port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s
        })
        .join()
        .unwrap()
    }

    /// Whether the forwarder serves the connection: QEMU's greeting arrives.
    fn served(s: &mut TcpStream) -> bool {
        let mut b = [0u8; 12];
        match s.read_exact(&mut b) {
            Ok(()) => {
                assert_eq!(&b, b"RFB 003.008\n");
                true
            }
            Err(e) => {
                assert!(
                    !matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ),
                    "neither served nor closed: {e}"
                );
                false
            }
        }
    }

    /// Whether the connection was closed: end of file or reset, not silence.
    fn closed(s: &mut TcpStream) -> bool {
        let mut b = [0u8; 64];
        match s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
        }
    }

    #[test]
    fn idle_connections_cannot_lock_the_owner_out() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root to connect as another uid");
            return;
        }
        // QEMU's side: a Unix socket that greets as QEMU does and echoes.
        let dir = tempfile::tempdir().unwrap();
        let qemu = std::os::unix::net::UnixListener::bind(dir.path().join(VNC_SOCKET)).unwrap();
        std::thread::spawn(move || {
            for c in qemu.incoming() {
                let Ok(mut c) = c else { return };
                std::thread::spawn(move || {
                    let _ = c.write_all(b"RFB 003.008\n");
                    let mut r = c.try_clone().unwrap();
                    let _ = io::copy(&mut r, &mut c);
                });
            }
        });
        let limits = Limits {
            per_uid: 2,
            total: 3,
            login_timeout: Duration::from_secs(2),
        };
        let fwd = VncForwarder::start_with(bind(0).unwrap(), dir.path(), limits).unwrap();
        let port = fwd.port;
        const NOBODY: u32 = 65534;

        // One local user's idle sockets take its own share only.
        let mut idle: Vec<TcpStream> = (0..2).map(|_| connect_as(NOBODY, port)).collect();
        for s in &mut idle {
            assert!(served(s));
        }
        assert!(
            !served(&mut connect_as(NOBODY, port)),
            "a third of nobody's"
        );
        // The owner still gets in, and logs in (sends the whole handshake).
        let mut owner = connect_as(0, port);
        assert!(served(&mut owner));
        owner.write_all(&[b'x'; LOGIN_BYTES as usize]).unwrap();
        let mut echo = [0u8; LOGIN_BYTES as usize];
        owner.read_exact(&mut echo).unwrap();
        // The total is reached: nobody else is served.
        assert!(!served(&mut connect_as(0, port)), "past the total");

        // Past the login timeout the idle ones are closed, the logged-in one
        // is not, and the slots are free again.
        std::thread::sleep(Duration::from_millis(2600));
        for s in &mut idle {
            assert!(closed(s), "an idle connection outlived the login timeout");
        }
        owner.write_all(b"y").unwrap();
        let mut one = [0u8; 1];
        owner.read_exact(&mut one).unwrap();
        assert_eq!(&one, b"y");
        let mut again = connect_as(NOBODY, port);
        assert!(served(&mut again));
        drop(fwd);
    }

    #[test]
    fn a_taken_port_is_a_bind_error_and_port_0_is_loopback_only() {
        let l = bind(0).unwrap();
        let addr = l.local_addr().unwrap();
        assert!(addr.ip().is_loopback());
        assert!(matches!(bind(addr.port()), Err(VncError::Bind { .. })));
    }
}
