//! A small QMP client: line-delimited JSON over the VM's Unix socket.
//! The socket is reached through `/proc/self/fd/N/qmp.sock` with N an O_PATH
//! descriptor of the VM directory, so a long storage path never exceeds the
//! 108-byte limit of a Unix socket address.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};

/// File name of the QMP socket inside the VM directory.
pub const QMP_SOCKET: &str = "qmp.sock";

/// A second QMP monitor that only the supervisor uses, to follow QEMU's
/// events (a QMP socket serves one client at a time: `qmp.sock` stays free
/// for commands).
pub const EVENTS_SOCKET: &str = "events.sock";

/// Why a QMP exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("Cannot connect to the VM's QMP socket {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP I/O failed")]
    Io(#[from] std::io::Error),
    #[error("QMP sent something that is not JSON")]
    Json(#[from] serde_json::Error),
    #[error("QMP closed the connection")]
    Closed,
    #[error("QMP command '{command}' failed: {desc}")]
    Command { command: String, desc: String },
}

/// Sends `data` with one descriptor attached (SCM_RIGHTS); the bytes sent.
fn send_with_fd(
    sock: std::os::fd::RawFd,
    data: &[u8],
    fd: std::os::fd::RawFd,
) -> std::io::Result<usize> {
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points to `space` bytes, room for one header and
    // one descriptor, so CMSG_FIRSTHDR is non-null and CMSG_DATA is inside
    // the buffer; iov points to `data`, alive for the call.
    let n = unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c) as *mut libc::c_int, fd);
        libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL)
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// A connected, negotiated QMP session.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to `<vm_dir>/qmp.sock` and leaves capabilities negotiation done.
    pub fn connect(vm_dir: &Path) -> Result<Self, QmpError> {
        Self::connect_to(vm_dir, QMP_SOCKET)
    }

    /// Connects to the monitor `<vm_dir>/<socket>`.
    pub fn connect_to(vm_dir: &Path, socket: &str) -> Result<Self, QmpError> {
        let display = vm_dir.join(socket).display().to_string();
        let connect_err = |source| QmpError::Connect {
            path: display.clone(),
            source,
        };
        let dir = File::options()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
            .open(vm_dir)
            .map_err(connect_err)?;
        let short = format!("/proc/self/fd/{}/{socket}", dir.as_raw_fd());
        let stream = UnixStream::connect(&short).map_err(connect_err)?;
        drop(dir);
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let writer = stream.try_clone()?;
        let mut qmp = Self {
            reader: BufReader::new(stream),
            writer,
        };
        // Greeting, then capabilities negotiation.
        qmp.read_message()?;
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Waits for the next asynchronous event (no timeout): `Closed` once
    /// QEMU has gone.
    pub fn next_event(&mut self) -> Result<Value, QmpError> {
        self.reader.get_ref().set_read_timeout(None)?;
        loop {
            let msg = self.read_message()?;
            if msg.get("event").is_some() {
                return Ok(msg);
            }
        }
    }

    fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(QmpError::Closed);
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// Hands QEMU an open descriptor under `name` (`getfd`, the descriptor
    /// travels as SCM_RIGHTS with the command), for `fd:NAME` URIs.
    pub fn send_fd(&mut self, name: &str, fd: std::os::fd::RawFd) -> Result<(), QmpError> {
        let mut text = serde_json::to_vec(&json!({
            "execute": "getfd",
            "arguments": {"fdname": name}
        }))?;
        text.push(b'\n');
        let sent = send_with_fd(self.writer.as_raw_fd(), &text, fd)?;
        if sent != text.len() {
            self.writer.write_all(&text[sent..])?;
        }
        loop {
            let reply = self.read_message()?;
            if reply.get("return").is_some() {
                return Ok(());
            }
            if let Some(e) = reply.get("error") {
                return Err(QmpError::Command {
                    command: "getfd".into(),
                    desc: e["desc"].as_str().unwrap_or("unknown error").to_string(),
                });
            }
        }
    }

    /// Runs one command and returns its `return` value; events are skipped.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut text = serde_json::to_vec(&msg)?;
        text.push(b'\n');
        self.writer.write_all(&text)?;
        loop {
            let reply = self.read_message()?;
            if let Some(r) = reply.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = reply.get("error") {
                return Err(QmpError::Command {
                    command: command.to_string(),
                    desc: e["desc"].as_str().unwrap_or("unknown error").to_string(),
                });
            }
            // An asynchronous event: keep reading.
        }
    }
}
