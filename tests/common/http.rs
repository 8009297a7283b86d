//! A small HTTP/1.1 server with byte ranges, run inside a network namespace
//! a test creates: what `lume create --image URL` downloads from in the tests.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::Netns;

/// A served file: bytes in memory, or a file on the host read at each request
/// (for images too large to keep in memory).
#[derive(Clone)]
pub enum Body {
    Bytes(Arc<Vec<u8>>),
    File(PathBuf),
}

/// What the test server serves and what it saw.
#[derive(Default)]
pub struct Files {
    /// Path → body.
    bodies: HashMap<String, Body>,
    /// Request lines with their Range header, in order.
    seen: Vec<String>,
}

/// A small HTTP/1.1 server on 127.0.0.1 (or the address given to
/// [`Server::start_on`]) inside `ns`. Paths:
/// `/f/NAME` the file; `/drop/NAME` the first answer stops after half the
/// body (Content-Length announces all of it), later ones honour Range;
/// `/noetag/NAME` the same without ETag; `/always/NAME` every answer breaks
/// off after 1 KiB; `/slow/NAME` 64 KiB every 100 ms; `/to/PATH` redirects to PATH;
/// `/tofile` redirects to file:///etc/passwd; `/loop` redirects to itself;
/// `/huge` announces 100 GiB; `/lo/PATH` redirects to PATH on 127.0.0.1.
/// [`Server::start`] listens on every address of the namespace, so
/// [`Server::url_via`] reaches it through any of them.
pub struct Server {
    ip: String,
    port: u16,
    files: Arc<Mutex<Files>>,
}

impl Server {
    pub fn start(ns: &Netns) -> Self {
        Self::start_on(ns, "0.0.0.0")
    }

    /// Listens on `ip` (an address of `ns`), port chosen by the kernel.
    pub fn start_on(ns: &Netns, ip: &str) -> Self {
        let bind = format!("{ip}:0");
        let files = Arc::new(Mutex::new(Files::default()));
        let (tx, rx) = std::sync::mpsc::channel();
        let shared = files.clone();
        ns.spawn_in(move || {
            let l = TcpListener::bind(&bind).unwrap();
            tx.send(l.local_addr().unwrap().port()).unwrap();
            let dropped = Arc::new(Mutex::new(std::collections::HashSet::new()));
            for conn in l.incoming() {
                let Ok(conn) = conn else { continue };
                let (files, dropped) = (shared.clone(), dropped.clone());
                std::thread::spawn(move || {
                    let _ = serve(conn, &files, &dropped);
                });
            }
        });
        let port = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        Self {
            ip: ip.to_string(),
            port,
            files,
        }
    }

    pub fn put(&self, name: &str, body: Vec<u8>) {
        self.files
            .lock()
            .unwrap()
            .bodies
            .insert(name.to_string(), Body::Bytes(Arc::new(body)));
    }

    /// Serves the host file `path` as NAME, read at each request.
    pub fn put_file(&self, name: &str, path: PathBuf) {
        self.files
            .lock()
            .unwrap()
            .bodies
            .insert(name.to_string(), Body::File(path));
    }

    pub fn url(&self, path: &str) -> String {
        let host = if self.ip == "0.0.0.0" {
            "127.0.0.1"
        } else {
            &self.ip
        };
        self.url_via(host, path)
    }

    /// The URL of `path` through `host`, an address of the namespace.
    pub fn url_via(&self, host: &str, path: &str) -> String {
        format!("http://{host}:{}{path}", self.port)
    }

    pub fn seen(&self) -> Vec<String> {
        self.files.lock().unwrap().seen.clone()
    }
}

fn serve(
    conn: TcpStream,
    files: &Mutex<Files>,
    dropped: &Mutex<std::collections::HashSet<String>>,
) -> std::io::Result<()> {
    let mut r = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range: Option<u64> = None;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("range: bytes=") {
            range = v.trim().trim_end_matches('-').parse().ok();
        }
    }
    files
        .lock()
        .unwrap()
        .seen
        .push(format!("{path} range={range:?}"));
    let mut w = conn;
    if path == "/loop" {
        return write!(
            w,
            "HTTP/1.1 302 Found\r\nLocation: /loop\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
    }
    if path == "/huge" {
        // Announces 100 GiB: refused before a byte is read.
        return write!(
            w,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            100u64 << 30
        );
    }
    if let Some(to) = path.strip_prefix("/lo") {
        let port = w.local_addr()?.port();
        return write!(
            w,
            "HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{port}{to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
    }
    if let Some(to) = path.strip_prefix("/to") {
        let loc = if to == "file" {
            "file:///etc/passwd".to_string()
        } else {
            to.to_string()
        };
        return write!(
            w,
            "HTTP/1.1 302 Found\r\nLocation: {loc}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
    }
    let (kind, name) = path[1..].split_once('/').unwrap_or(("", ""));
    let body = files.lock().unwrap().bodies.get(name).cloned();
    let body = match body {
        Some(Body::Bytes(b)) => b,
        Some(Body::File(p)) => return serve_file(w, &p, range),
        None => {
            return write!(
                w,
                "HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\nConnection: close\r\n\r\nnot found"
            );
        }
    };
    let start = range.unwrap_or(0).min(body.len() as u64) as usize;
    // `noetag`: nothing to resume against.
    let etag = if kind == "noetag" {
        String::new()
    } else {
        format!("ETag: \"{}\"\r\n", body.len())
    };
    if start > 0 || range.is_some() {
        write!(
            w,
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{}\r\n{etag}Connection: close\r\n\r\n",
            body.len() - start,
            body.len() - 1,
            body.len()
        )?;
    } else {
        write!(
            w,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\n{etag}Connection: close\r\n\r\n",
            body.len()
        )?;
    }
    let rest = &body[start..];
    match kind {
        "drop" | "noetag" if dropped.lock().unwrap().insert(format!("{kind}{name}")) => {
            w.write_all(&rest[..rest.len() / 2])?;
            w.flush()?;
            // Gone mid-body: the client must resume.
            w.shutdown(std::net::Shutdown::Both)
        }
        "always" => {
            // Every answer breaks off after 1 KiB.
            w.write_all(&rest[..1024.min(rest.len())])?;
            w.flush()?;
            w.shutdown(std::net::Shutdown::Both)
        }
        "slow" => {
            for c in rest.chunks(64 << 10) {
                w.write_all(c)?;
                std::thread::sleep(Duration::from_millis(100));
            }
            Ok(())
        }
        _ => w.write_all(rest),
    }
}

/// A file from the host, whole or from `range`, streamed (no breaks).
fn serve_file(mut w: TcpStream, path: &std::path::Path, range: Option<u64>) -> std::io::Result<()> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let start = range.unwrap_or(0).min(len);
    let etag = format!("ETag: \"{len}\"\r\n");
    if range.is_some() {
        write!(
            w,
            "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{len}\r\n{etag}Connection: close\r\n\r\n",
            len - start,
            len.saturating_sub(1)
        )?;
    } else {
        write!(
            w,
            "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nAccept-Ranges: bytes\r\n{etag}Connection: close\r\n\r\n"
        )?;
    }
    f.seek(SeekFrom::Start(start))?;
    std::io::copy(&mut f, &mut w)?;
    w.flush()
}
