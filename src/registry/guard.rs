//! The gate every connection of a public-only transfer goes through.
//!
//! `oci-client` 0.18 builds its own HTTP client and follows, unchecked,
//! what a registry tells it: the token `realm` URL of a 401, redirects of
//! manifest and blob requests, the `Location` of an upload. It offers no
//! way to give it a DNS resolver, but it does take a proxy. So for an API
//! caller without `apiPrivateImageUrls`, lume runs this small HTTP proxy on
//! loopback for the length of the transfer and points the client at it:
//!
//! - an HTTPS connection arrives as `CONNECT host:port`: the proxy resolves
//!   the name itself, refuses it when any address it resolves to (or the
//!   IP literal) is loopback, link-local, private or otherwise not public
//!   ([`crate::image::download::is_private`]), and connects to exactly the
//!   address it checked (no second lookup, so DNS rebinding cannot lead
//!   elsewhere);
//! - a plain-HTTP request is refused outright (a public registry speaks
//!   HTTPS; plain HTTP would have the proxy forward requests itself).
//!
//! TLS stays end to end between the client and the registry: the proxy
//! only ever sees the host and port.
//!
//! Only the transfer's own client may use it: a connection from a socket
//! another user owns (sock_diag, as the API and the VNC forwarder tell
//! their peers) is closed at once, before it counts towards the
//! [`MAX_CONNECTIONS`] open at a time, so other local users can neither
//! fill the gate nor tunnel through root's process; and every request
//! must carry the gate's random secret (`Proxy-Authorization`), checked
//! before anything else is read into a decision, so no other program of
//! the same user plants refusals either.

use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::image::download::is_private;

/// Largest request head the proxy reads.
const MAX_HEAD: usize = 8 << 10;
/// How long a client may take to send its request head.
const HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long connecting to the registry may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Most tunnels open at once (a transfer uses a few).
pub const MAX_CONNECTIONS: usize = 32;
/// The proxy user name the secret goes with.
const PROXY_USER: &str = "lume";

/// A running gate; it stops when dropped.
pub struct Gate {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
    refusals: Refusals,
    /// What the client proves it is the transfer's with.
    secret: String,
}

/// The hosts the gate refused (the transfer's own requests only), kept
/// so that the transfer's error says why: a refused proxy connection
/// reaches the client as a failed connect, the same as an unreachable
/// host.
#[derive(Clone, Default)]
pub struct Refusals(std::sync::Arc<std::sync::Mutex<Vec<(String, Refusal)>>>);

/// Most refusals kept.
const MAX_REFUSALS: usize = 16;

impl Refusals {
    fn record(&self, host: &str, r: &Refusal) {
        let mut all = self.0.lock().expect("never poisoned");
        if all.len() < MAX_REFUSALS {
            all.push((host.to_ascii_lowercase(), r.clone()));
        }
    }

    /// `e` as the user should see it in a transfer that has a gate which
    /// kept `refusals` (none: `e` as it is): a connection the gate refused
    /// is named as such, not as an unreachable registry — when `e` is a
    /// failed connect to a host the gate refused. The one place a
    /// transfer's errors meet its gate ([`super::token`]'s exchange and
    /// every request of its `Session`).
    pub fn explain(
        refusals: Option<&Self>,
        e: super::RegistryError,
        registry: &str,
    ) -> super::RegistryError {
        use super::RegistryError as E;
        let Some(refusals) = refusals else {
            return e;
        };
        let host = match &e {
            E::Unreachable {
                source: super::RequestFailure::Transport(r),
                ..
            } => r.url().and_then(|u| u.host_str()).map(|h| {
                h.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_ascii_lowercase()
            }),
            _ => None,
        };
        let Some(host) = host else {
            return e;
        };
        let refusal = refusals
            .0
            .lock()
            .expect("never poisoned")
            .iter()
            .find(|(h, _)| *h == host)
            .map(|(_, r)| r.clone());
        match refusal {
            Some(Refusal::Private(addr)) => E::PrivateDestination {
                registry: registry.to_string(),
                addr,
            },
            Some(Refusal::Unresolved) => E::Unresolved {
                registry: registry.to_string(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the name did not resolve when the transfer connected",
                ),
            },
            _ => e,
        }
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Gate {
    /// Starts the gate on the current tokio runtime.
    pub async fn start() -> std::io::Result<Self> {
        Self::start_with(is_private).await
    }

    /// A gate refusing the addresses `refused` says yes to.
    async fn start_with(refused: fn(IpAddr) -> bool) -> std::io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let refusals = Refusals::default();
        let mut raw = [0u8; 24];
        crate::util::random::fill(&mut raw);
        let secret = super::format::hex(&raw);
        let expected = format!(
            "Basic {}",
            base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                format!("{PROXY_USER}:{secret}")
            )
        );
        let log = refusals.clone();
        let open = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        let me = nix::unistd::geteuid().as_raw();
        let task = tokio::spawn(async move {
            let expected: std::sync::Arc<str> = expected.into();
            loop {
                let conn = match listener.accept().await {
                    Ok((conn, _)) => conn,
                    // Out of descriptors, say: the gate goes on.
                    Err(_) => {
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Another user's socket: closed before it takes a place.
                if owner(&conn) != Some(me) {
                    continue;
                }
                // Over the cap, the connection is dropped at once.
                let Ok(permit) = open.clone().try_acquire_owned() else {
                    continue;
                };
                let (log, expected) = (log.clone(), expected.clone());
                tokio::spawn(async move {
                    serve(conn, refused, &log, &expected).await;
                    drop(permit);
                });
            }
        });
        Ok(Self {
            addr,
            task,
            refusals,
            secret,
        })
    }

    /// The proxy setting for the transfer's client: the gate, with its
    /// secret.
    pub fn proxy(&self) -> reqwest::Result<reqwest::Proxy> {
        Ok(reqwest::Proxy::all(self.url())?.basic_auth(PROXY_USER, &self.secret))
    }

    /// What the gate refused, for explaining the transfer's errors.
    pub fn refusals(&self) -> Refusals {
        self.refusals.clone()
    }

    /// The proxy URL for the client.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Why the gate refused a connection (sent back as the proxy's answer).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Not the transfer's client (no or a wrong secret).
    Stranger,
    Malformed,
    PlainHttp,
    Private(IpAddr),
    Unresolved,
}

async fn serve(mut conn: TcpStream, refused: fn(IpAddr) -> bool, log: &Refusals, expected: &str) {
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut conn)).await {
        Ok(Ok(h)) => h,
        _ => return,
    };
    if !authorized(&head, expected) {
        let _ = refuse(&mut conn, &Refusal::Stranger).await;
        return;
    }
    let target = match parse_connect(&head) {
        Ok(t) => t,
        Err(r) => {
            let _ = refuse(&mut conn, &r).await;
            return;
        }
    };
    let addr = match resolve_allowed(&target.0, target.1, refused).await {
        Ok(a) => a,
        Err(r) => {
            log.record(&target.0, &r);
            let _ = refuse(&mut conn, &r).await;
            return;
        }
    };
    let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        _ => {
            let _ = conn
                .write_all(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
                .await;
            return;
        }
    };
    if conn
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await
        .is_err()
    {
        return;
    }
    let mut upstream = upstream;
    let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
}

/// The uid owning the other end of `conn` (a loopback connection).
fn owner(conn: &TcpStream) -> Option<u32> {
    let (client, server) = (conn.peer_addr().ok()?, conn.local_addr().ok()?);
    crate::api::peer::tcp_socket_owner(client, server)
        .ok()
        .map(|o| o.uid)
}

/// Whether the request head carries the gate's secret.
fn authorized(head: &[u8], expected: &str) -> bool {
    let Ok(text) = std::str::from_utf8(head) else {
        return false;
    };
    let given = text.lines().skip(1).find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.trim()
            .eq_ignore_ascii_case("proxy-authorization")
            .then(|| value.trim())
    });
    // Compared in full whatever the first difference (no timing hint).
    given.is_some_and(|g| {
        g.len() == expected.len()
            && g.bytes()
                .zip(expected.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    })
}

async fn refuse(conn: &mut TcpStream, why: &Refusal) -> std::io::Result<()> {
    let text = match why {
        Refusal::Stranger => {
            return conn
                .write_all(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await;
        }
        Refusal::Private(ip) => format!("refused: {ip} is not a public address"),
        Refusal::PlainHttp => "refused: plain HTTP".into(),
        Refusal::Malformed => "refused: malformed request".into(),
        Refusal::Unresolved => "refused: the name does not resolve".into(),
    };
    conn.write_all(
        format!(
            "HTTP/1.1 403 Forbidden\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
            text.len()
        )
        .as_bytes(),
    )
    .await
}

/// Reads up to the blank line ending the request head (and not beyond:
/// after a CONNECT the client waits for the answer before sending more).
async fn read_head(conn: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD || conn.read(&mut byte).await? == 0 {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
        head.push(byte[0]);
    }
    Ok(head)
}

/// `CONNECT host:port HTTP/1.x` → `(host, port)`; anything else refused.
pub fn parse_connect(head: &[u8]) -> Result<(String, u16), Refusal> {
    let text = std::str::from_utf8(head).map_err(|_| Refusal::Malformed)?;
    let line = text.lines().next().ok_or(Refusal::Malformed)?;
    let mut words = line.split(' ');
    let (Some(method), Some(target)) = (words.next(), words.next()) else {
        return Err(Refusal::Malformed);
    };
    if method != "CONNECT" {
        return Err(Refusal::PlainHttp);
    }
    let (host, port) = target.rsplit_once(':').ok_or(Refusal::Malformed)?;
    let port: u16 = port.parse().map_err(|_| Refusal::Malformed)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(Refusal::Malformed);
    }
    Ok((host.to_string(), port))
}

/// The first address of `host`, when every address it resolves to is
/// public.
pub async fn resolve_public(host: &str, port: u16) -> Result<SocketAddr, Refusal> {
    resolve_allowed(host, port, is_private).await
}

async fn resolve_allowed(
    host: &str,
    port: u16,
    refused: fn(IpAddr) -> bool,
) -> Result<SocketAddr, Refusal> {
    let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((host, port))
            .await
            .map_err(|_| Refusal::Unresolved)?
            .collect(),
    };
    if let Some(a) = addrs.iter().find(|a| refused(a.ip())) {
        return Err(Refusal::Private(a.ip()));
    }
    addrs.first().copied().ok_or(Refusal::Unresolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gate's `Proxy-Authorization` header line.
    fn credential(gate: &Gate) -> String {
        format!(
            "Proxy-Authorization: Basic {}\r\n",
            base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                format!("{PROXY_USER}:{}", gate.secret)
            )
        )
    }

    /// `request` (a request line and headers) with the gate's secret.
    async fn ask(gate: &Gate, request: &str) -> String {
        let (line, rest) = request.split_once("\r\n").unwrap();
        ask_raw(gate, &format!("{line}\r\n{}{rest}", credential(gate))).await
    }

    async fn ask_raw(gate: &Gate, request: &str) -> String {
        let mut s = TcpStream::connect(gate.addr).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 512];
        // Read the answer's head only (a tunnel stays open).
        while !out.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The abuses the review found: a redirect or realm to a loopback
    /// address (IP literal or name), `localhost`, plain HTTP, a mapped
    /// IPv6 loopback; every one is refused before any connection.
    #[tokio::test]
    async fn the_gate_refuses_private_destinations() {
        // A loopback service the gate must never reach.
        let secret = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let port = secret.local_addr().unwrap().port();
        let gate = Gate::start().await.unwrap();
        for target in [
            format!("127.0.0.1:{port}"),
            format!("localhost:{port}"),
            format!("[::1]:{port}"),
            format!("[::ffff:127.0.0.1]:{port}"),
            "10.0.0.1:443".to_string(),
            "169.254.169.254:80".to_string(),
        ] {
            let answer = ask(
                &gate,
                &format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"),
            )
            .await;
            assert!(answer.starts_with("HTTP/1.1 403"), "{target}: {answer}");
        }
        let answer = ask(
            &gate,
            &format!("GET http://127.0.0.1:{port}/secret HTTP/1.1\r\nHost: x\r\n\r\n"),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
        // Nothing ever connected to the loopback service.
        let accepted =
            tokio::time::timeout(std::time::Duration::from_millis(200), secret.accept()).await;
        assert!(
            accepted.is_err(),
            "the gate connected to a loopback address"
        );
    }

    /// What the gate lets through is a real tunnel (here to a loopback
    /// echo service, with a gate that refuses nothing).
    #[tokio::test]
    async fn an_allowed_connect_is_tunnelled() {
        let echo = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let port = echo.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf).await.unwrap();
        });
        let gate = Gate::start_with(|_| false).await.unwrap();
        let mut s = TcpStream::connect(gate.addr).await.unwrap();
        s.write_all(
            format!(
                "CONNECT localhost:{port} HTTP/1.1\r\n{}\r\n",
                credential(&gate)
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut b).await.unwrap();
            head.push(b[0]);
        }
        assert!(head.starts_with(b"HTTP/1.1 200"), "{head:?}");
        s.write_all(b"hello").await.unwrap();
        let mut back = [0u8; 5];
        s.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"hello");
    }

    /// Only the transfer's own client may use the gate: another local user
    /// who finds its port gets a 407 without the secret (or with a wrong
    /// one), reaches nothing even where the gate would let the transfer
    /// through, and plants no refusal; connections over the cap are
    /// dropped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn strangers_cannot_use_the_gate() {
        let service = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let port = service.local_addr().unwrap().port();
        let gate = Gate::start_with(|_| false).await.unwrap();
        let connect = format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\n");
        let answer = ask_raw(&gate, &format!("{connect}\r\n")).await;
        assert!(answer.starts_with("HTTP/1.1 407"), "{answer}");
        let wrong = format!(
            "{connect}Proxy-Authorization: Basic {}\r\n\r\n",
            base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                format!("{PROXY_USER}:{}", "0".repeat(gate.secret.len()))
            )
        );
        assert!(ask_raw(&gate, &wrong).await.starts_with("HTTP/1.1 407"));
        let accepted =
            tokio::time::timeout(std::time::Duration::from_millis(200), service.accept()).await;
        assert!(accepted.is_err(), "a stranger tunnelled through the gate");
        // A refusal only counts when it was the transfer's own request.
        let private = Gate::start().await.unwrap();
        let a = ask_raw(&private, "CONNECT 10.0.0.1:443 HTTP/1.1\r\n\r\n").await;
        assert!(a.starts_with("HTTP/1.1 407"), "{a}");
        assert!(private.refusals.0.lock().unwrap().is_empty());
        // The cap: connections beyond it are closed unanswered.
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            held.push(TcpStream::connect(gate.addr).await.unwrap());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let mut extra = TcpStream::connect(gate.addr).await.unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(std::time::Duration::from_secs(2), extra.read(&mut buf))
            .await
            .expect("an extra connection is closed at once");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    }

    /// Another user cannot fill the gate: its connections are closed at
    /// once, before they take a place, and the transfer's own still get
    /// their tunnel while it holds forty of them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn another_users_connections_take_no_place() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let echo = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let port = echo.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 2];
                    if s.read_exact(&mut buf).await.is_ok() {
                        let _ = s.write_all(&buf).await;
                    }
                });
            }
        });
        let gate = Gate::start_with(|_| false).await.unwrap();
        let script = format!(
            "import socket,time\n\
             ss=[socket.create_connection(('127.0.0.1',{})) for _ in range(40)]\n\
             time.sleep(0.5)\n\
             closed=0\n\
             for s in ss:\n\
             \x20 s.settimeout(0.5)\n\
             \x20 try:\n\
             \x20   closed+=s.recv(1)==b''\n\
             \x20 except OSError: pass\n\
             print(closed,flush=True)\n\
             time.sleep(3)\n",
            gate.addr.port()
        );
        let mut stranger = std::process::Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "/usr/bin/python3",
                "-c",
            ])
            .arg(script)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let out = stranger.stdout.take().unwrap();
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line).unwrap();
            line
        })
        .await
        .unwrap();
        assert_eq!(line.trim(), "40", "the stranger's connections were kept");
        // While the stranger still holds its (closed) sockets, the
        // transfer's own connection is tunnelled.
        let answer = ask(
            &gate,
            &format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: x\r\n\r\n"),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let _ = stranger.kill();
        let _ = stranger.wait();
    }

    /// The registry client really goes through the gate: a pull from a
    /// loopback "registry" never reaches it (without the gate it would).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_client_connects_only_through_the_gate() {
        let registry = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let port = registry.local_addr().unwrap().port();
        let image =
            crate::registry::ImageRef::parse("a:1", &format!("127.0.0.1:{port}"), "test").unwrap();
        let gate = Gate::start().await.unwrap();
        let r = crate::registry::token::authorize(
            &image,
            &crate::registry::auth::RegistryAuth::Anonymous,
            false,
            Some(&gate),
        )
        .await;
        // Said as what it is, not as an unreachable registry.
        match r {
            Err(crate::registry::RegistryError::PrivateDestination { addr, .. }) => {
                assert_eq!(addr, IpAddr::from([127, 0, 0, 1]))
            }
            Err(e) => panic!("{e}"),
            Ok(_) => panic!("the gate let a loopback registry through"),
        }
        let accepted =
            tokio::time::timeout(std::time::Duration::from_millis(300), registry.accept()).await;
        assert!(accepted.is_err(), "the client went around the gate");
    }

    #[test]
    fn connect_lines() {
        assert_eq!(
            parse_connect(b"CONNECT ghcr.io:443 HTTP/1.1\r\n\r\n"),
            Ok(("ghcr.io".into(), 443))
        );
        assert_eq!(
            parse_connect(b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\n\r\n"),
            Ok(("2001:db8::1".into(), 443))
        );
        assert_eq!(
            parse_connect(b"GET http://a/ HTTP/1.1\r\n\r\n"),
            Err(Refusal::PlainHttp)
        );
        assert_eq!(
            parse_connect(b"CONNECT a HTTP/1.1\r\n\r\n"),
            Err(Refusal::Malformed)
        );
    }
}
