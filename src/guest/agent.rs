//! A small client for the QEMU guest agent (`qemu-ga`): QGA's JSON protocol
//! over the VM's virtio-serial channel `org.qemu.guest_agent.0`, which QEMU
//! exposes as the Unix socket `qga.sock` in the VM directory.
//!
//! Everything on this socket comes from the guest and is untrusted: replies
//! are read with a deadline and a size cap, and only the reply to our own
//! `guest-sync-delimited` id is taken as proof that an agent answers. A VM
//! whose guest runs no agent still has the socket (QEMU owns it): writes are
//! buffered and nothing ever comes back, so every exchange has a short
//! deadline.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// File name of the guest agent socket inside the VM directory.
pub const QGA_SOCKET: &str = "qga.sock";

/// The virtio-serial port name qemu-ga looks for in the guest.
pub const QGA_PORT_NAME: &str = "org.qemu.guest_agent.0";

/// QEMU's id of that port (named in its VSERPORT_CHANGE events).
pub const QGA_PORT_ID: &str = "qga-port";

/// How long an agent may take to answer `guest-sync-delimited` and
/// `guest-ping` when it is not known whether the guest opened the channel.
pub const PING_TIMEOUT: Duration = Duration::from_secs(3);

/// How long an agent may take to answer when a program in the guest holds
/// the channel open (a busy TCG guest can be slow).
pub const PING_TIMEOUT_OPEN: Duration = Duration::from_secs(10);

/// The most lume reads from the guest for one exchange.
const MAX_REPLY: usize = 64 << 10;

/// Why an exchange with the guest agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("Cannot connect to the guest agent socket {path}")]
    Connect {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("Guest agent I/O failed")]
    Io(#[from] io::Error),
    #[error(
        "No guest agent answered within {0:?}: install and start qemu-guest-agent in the guest"
    )]
    NoAnswer(Duration),
    #[error("The guest agent closed the connection")]
    Closed,
    #[error(
        "No guest agent runs (nothing in the guest has opened its channel): install and start qemu-guest-agent in the guest"
    )]
    NotOpen,
    #[error("The guest agent sent more than {MAX_REPLY} bytes without a complete reply")]
    TooLong,
    #[error("The guest agent refused '{command}': {desc}")]
    Command { command: String, desc: String },
}

/// What `guest-shutdown` asks the guest to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownMode {
    Powerdown,
    Reboot,
}

impl ShutdownMode {
    fn as_str(self) -> &'static str {
        match self {
            Self::Powerdown => "powerdown",
            Self::Reboot => "reboot",
        }
    }
}

/// A connection to a guest agent.
pub struct Agent {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Agent {
    /// Connects to `<vm_dir>/qga.sock` through `/proc/self/fd/N/` (long
    /// storage paths stay within the Unix socket limit).
    pub fn connect_in(vm_dir: &Path) -> Result<Self, AgentError> {
        let display = vm_dir.join(QGA_SOCKET).display().to_string();
        let connect_err = |source| AgentError::Connect {
            path: display.clone(),
            source,
        };
        let dir = File::options()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(vm_dir)
            .map_err(connect_err)?;
        let short = format!("/proc/self/fd/{}/{QGA_SOCKET}", dir.as_raw_fd());
        let stream = UnixStream::connect(&short).map_err(connect_err)?;
        Ok(Self::from_stream(stream))
    }

    /// Uses an already connected socket (an agent listening on a Unix socket
    /// of its own, `qemu-ga -m unix-listen`).
    pub fn from_stream(stream: UnixStream) -> Self {
        Self {
            stream,
            buf: Vec::new(),
        }
    }

    /// Proves an agent answers: `guest-sync-delimited` with a fresh id
    /// (which also discards whatever an earlier client left in the channel),
    /// then `guest-ping`, all within `within`.
    pub fn ping(&mut self, within: Duration) -> Result<(), AgentError> {
        let deadline = Instant::now() + within;
        let id = crate::util::random::u64() >> 12;
        // 0xFF makes the agent drop any partial request before this one.
        self.send_raw(&[0xff])?;
        self.send(&json!({"execute": "guest-sync-delimited", "arguments": {"id": id}}))?;
        loop {
            let reply = self.read_reply(deadline, within)?;
            if reply.get("return").and_then(Value::as_u64) == Some(id) {
                break;
            }
            // A stale reply meant for an earlier client: keep reading.
        }
        self.command("guest-ping", None, deadline, within)?;
        Ok(())
    }

    /// Asks the guest to power off or reboot through its own init system.
    /// qemu-ga sends no reply when the request succeeds (the guest is going
    /// down), only an error when it fails: an error within `grace` is
    /// returned, silence counts as accepted.
    pub fn shutdown(&mut self, mode: ShutdownMode, grace: Duration) -> Result<(), AgentError> {
        let command = "guest-shutdown";
        self.send(&json!({"execute": command, "arguments": {"mode": mode.as_str()}}))?;
        match self.read_reply(Instant::now() + grace, grace) {
            Ok(reply) => match reply.get("error") {
                Some(e) => Err(AgentError::Command {
                    command: command.into(),
                    desc: desc(e),
                }),
                None => Ok(()),
            },
            Err(AgentError::NoAnswer(_) | AgentError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Freezes (`true`) or thaws the guest's filesystems
    /// (`guest-fsfreeze-freeze` / `guest-fsfreeze-thaw`); the number of
    /// filesystems the agent froze or thawed.
    pub fn fsfreeze(&mut self, freeze: bool, within: Duration) -> Result<u64, AgentError> {
        self.ping(within)?;
        let cmd = if freeze {
            "guest-fsfreeze-freeze"
        } else {
            "guest-fsfreeze-thaw"
        };
        let r = self.command(cmd, None, Instant::now() + within, within)?;
        Ok(r.as_u64().unwrap_or(0))
    }

    fn command(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        deadline: Instant,
        within: Duration,
    ) -> Result<Value, AgentError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        self.send(&msg)?;
        let reply = self.read_reply(deadline, within)?;
        if let Some(e) = reply.get("error") {
            return Err(AgentError::Command {
                command: command.into(),
                desc: desc(e),
            });
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }

    fn send(&mut self, msg: &Value) -> Result<(), AgentError> {
        let mut text = serde_json::to_vec(msg).map_err(io::Error::from)?;
        text.push(b'\n');
        self.send_raw(&text)
    }

    fn send_raw(&mut self, bytes: &[u8]) -> Result<(), AgentError> {
        // A guest that reads nothing cannot block lume: the socket buffer is
        // far larger than what lume sends, and writes time out anyway.
        self.stream
            .set_write_timeout(Some(Duration::from_secs(1)))?;
        self.stream.write_all(bytes)?;
        Ok(())
    }

    /// The next JSON object from the agent, before `deadline`. The 0xFF
    /// delimiter of `guest-sync-delimited` and anything that is not a JSON
    /// object (noise from a hostile or confused guest) are skipped.
    fn read_reply(&mut self, deadline: Instant, within: Duration) -> Result<Value, AgentError> {
        loop {
            while let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let start = line.iter().rposition(|&b| b == 0xff).map_or(0, |p| p + 1);
                if let Ok(v @ Value::Object(_)) = serde_json::from_slice::<Value>(&line[start..]) {
                    return Ok(v);
                }
            }
            if self.buf.len() > MAX_REPLY {
                return Err(AgentError::TooLong);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(AgentError::NoAnswer(within));
            }
            self.stream.set_read_timeout(Some(left))?;
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(AgentError::Closed),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(AgentError::NoAnswer(within));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// The `desc` of a QGA error object, bounded (it comes from the guest).
fn desc(e: &Value) -> String {
    let d = e["desc"].as_str().unwrap_or("unknown error");
    d.chars()
        .filter(|c| !c.is_control())
        .take(200)
        .collect::<String>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A socket that accepts and never answers, as QEMU's end of the
    /// channel does when no agent runs in the guest.
    #[test]
    fn a_channel_without_an_agent_is_no_answer_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(QGA_SOCKET);
        let listener = UnixListener::bind(&path).unwrap();
        let mut agent = Agent::connect_in(dir.path()).unwrap();
        let (_held, _) = listener.accept().unwrap();
        let e = agent.ping(Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, AgentError::NoAnswer(_)), "{e:?}");
        assert!(e.to_string().starts_with("No guest agent answered"), "{e}");
    }

    /// A guest that floods the channel with garbage and stale replies gets
    /// neither unbounded memory nor a false "agent present".
    #[test]
    fn a_flooding_guest_is_cut_off() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let flood = std::thread::spawn(move || {
            let junk = vec![b'x'; 8192];
            while theirs.write_all(&junk).is_ok() {}
        });
        let mut agent = Agent::from_stream(ours);
        let e = agent.ping(Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, AgentError::TooLong), "{e:?}");
        drop(agent);
        flood.join().unwrap();

        // A reply to another id is stale, not proof of an agent.
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        theirs
            .write_all(b"\xff{\"return\": 1}\n{\"return\": {}}\nnot json\n")
            .unwrap();
        let mut agent = Agent::from_stream(ours);
        let e = agent.ping(Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, AgentError::NoAnswer(_)), "{e:?}");
        drop(theirs);
    }
}
