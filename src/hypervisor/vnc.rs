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

use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use serde_json::json;

use super::qmp::{Qmp, QmpError};

/// QEMU's VNC socket, relative to the VM directory (QEMU's working directory).
pub const VNC_SOCKET: &str = "vnc.sock";

/// The environment variable through which `run --detach` hands a
/// `--vnc-password` to its supervisor (never its command line).
pub const PASSWORD_ENV: &str = "LUME_VNC_PASSWORD";

/// How many VNC connections one VM serves at once.
const MAX_CONNECTIONS: usize = 8;

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

/// Opens `url` in the first viewer of [`VIEWERS`] found in PATH, when a
/// graphical session is there (`DISPLAY` or `WAYLAND_DISPLAY`); returns the
/// viewer started, or `None` (then the caller prints the URL).
pub fn open_viewer(url: &str) -> Option<&'static str> {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("DISPLAY").is_none() && std::env::var_os("WAYLAND_DISPLAY").is_none() {
        return None;
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for viewer in VIEWERS {
        let Some(exe) = std::env::split_paths(&path)
            .map(|d| d.join(viewer))
            .find(|p| p.is_file())
        else {
            continue;
        };
        let mut cmd = std::process::Command::new(exe);
        cmd.arg(url)
            .stdin(std::process::Stdio::null())
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
        if cmd.spawn().is_ok() {
            return Some(viewer);
        }
    }
    None
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
        let port = listener.local_addr()?.port();
        let dir = File::options()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(vm_dir)?;
        let listener = Arc::new(listener);
        let stop = Arc::new(AtomicBool::new(false));
        let (l, s) = (listener.clone(), stop.clone());
        let active = Arc::new(AtomicUsize::new(0));
        std::thread::Builder::new()
            .name("vnc-accept".into())
            .spawn(move || {
                let sock = format!("/proc/self/fd/{}/{VNC_SOCKET}", dir.as_raw_fd());
                for conn in l.incoming() {
                    if s.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(tcp) = conn else { continue };
                    if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                        continue; // dropped: closed at once
                    }
                    let Ok(unix) = UnixStream::connect(&sock) else {
                        continue;
                    };
                    active.fetch_add(1, Ordering::SeqCst);
                    let a = active.clone();
                    let _ = std::thread::Builder::new()
                        .name("vnc-conn".into())
                        .spawn(move || {
                            let _ = join(tcp, unix);
                            a.fetch_sub(1, Ordering::SeqCst);
                        });
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

/// Copies both ways until either side closes.
fn join(tcp: TcpStream, unix: UnixStream) -> io::Result<()> {
    tcp.set_nodelay(true)?;
    let (mut tcp_r, mut unix_w) = (tcp.try_clone()?, unix.try_clone()?);
    let up = std::thread::spawn(move || {
        let _ = io::copy(&mut tcp_r, &mut unix_w);
        let _ = unix_w.shutdown(Shutdown::Write);
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

    #[test]
    fn a_taken_port_is_a_bind_error_and_port_0_is_loopback_only() {
        let l = bind(0).unwrap();
        let addr = l.local_addr().unwrap();
        assert!(addr.ip().is_loopback());
        assert!(matches!(bind(addr.port()), Err(VncError::Bind { .. })));
    }
}
