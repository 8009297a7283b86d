//! Accepting and serving connections, with limits any local user could
//! otherwise exhaust: at most [`Limits::total`] connections at once, at most
//! [`Limits::per_peer`] of them from one local uid (or one remote address),
//! excess connections closed at once with no request read; a connection
//! that does not send a complete request head within
//! [`Limits::header_timeout`] (a new one, or an idle kept-alive one) is
//! closed. Served with hyper's HTTP/1 connection builder.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tower_service::Service as _;

use super::log;
use super::peer::{Connection, PeerKey};

/// The hidden environment variable that shortens the header and idle
/// timeout, in milliseconds (for tests).
pub const TIMEOUT_ENV: &str = "LUME_API_IDLE_TIMEOUT_MS";

/// How many connections, and for how long without a request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub total: usize,
    pub per_peer: usize,
    pub header_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            total: 512,
            per_peer: 64,
            header_timeout: Duration::from_secs(10),
        }
    }
}

impl Limits {
    /// The defaults, with the timeout from [`TIMEOUT_ENV`] when set.
    pub fn from_env() -> Self {
        let mut limits = Self::default();
        if let Some(ms) = std::env::var(TIMEOUT_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .filter(|ms| *ms > 0)
        {
            limits.header_timeout = Duration::from_millis(ms);
        }
        limits
    }
}

/// The connections open now: a permit each from `total`, and a count per peer.
pub struct Gate {
    limits: Limits,
    total: Arc<Semaphore>,
    per_peer: Mutex<HashMap<PeerKey, usize>>,
    /// When a refusal was last logged (at most one line every 10 s).
    last_note: Mutex<Option<Instant>>,
}

/// One admitted connection; dropping it frees its place.
pub struct Slot {
    gate: Arc<Gate>,
    key: PeerKey,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut peers = self.gate.per_peer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = peers.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                peers.remove(&self.key);
            }
        }
    }
}

impl Gate {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            total: Arc::new(Semaphore::new(limits.total)),
            per_peer: Mutex::default(),
            last_note: Mutex::default(),
        })
    }

    /// A place among all connections, if one is free.
    fn place(&self) -> Option<OwnedSemaphorePermit> {
        self.total.clone().try_acquire_owned().ok()
    }

    /// The connection of `key`, if that peer has a place left.
    fn admit(self: &Arc<Self>, key: PeerKey, permit: OwnedSemaphorePermit) -> Option<Slot> {
        let mut peers = self.per_peer.lock().unwrap_or_else(|e| e.into_inner());
        let n = peers.entry(key).or_default();
        if *n >= self.limits.per_peer {
            return None;
        }
        *n += 1;
        Some(Slot {
            gate: self.clone(),
            key,
            _permit: permit,
        })
    }

    /// Logs a refused connection, at most once every 10 seconds.
    fn note(&self, what: &str) {
        let mut last = self.last_note.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            *last = Some(Instant::now());
            log(what);
        }
    }

    /// Waits until every connection has ended.
    pub async fn drained(&self) {
        let all = u32::try_from(self.limits.total).unwrap_or(u32::MAX);
        let _ = self.total.acquire_many(all).await;
    }
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Something that accepts connections: a TCP or a Unix listener.
pub trait Accept: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(
        &self,
    ) -> impl std::future::Future<Output = std::io::Result<(Self::Io, Connection)>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> std::io::Result<(Self::Io, Connection)> {
        let (stream, client) = tokio::net::TcpListener::accept(self).await?;
        let conn = Connection::of_tcp(&stream, client);
        Ok((stream, conn))
    }
}

impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> std::io::Result<(Self::Io, Connection)> {
        let (stream, _) = tokio::net::UnixListener::accept(self).await?;
        let conn = Connection::of_unix(&stream);
        Ok((stream, conn))
    }
}

/// Accepts connections until `stop`, serving each on its own task; the
/// connections still open are then shut down gracefully (requests in
/// progress finish). Wait for them with [`Gate::drained`].
pub async fn serve<L: Accept>(
    listener: L,
    app: Router,
    gate: Arc<Gate>,
    stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stopped(stop.clone()) => return,
        };
        let (io, conn) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors, or a connection reset before accept:
                // wait a little rather than spin.
                gate.note(&format!("Cannot accept a connection: {e}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(permit) = gate.place() else {
            gate.note(&format!(
                "Refused connections: {} are open, the most this server keeps",
                gate.limits.total
            ));
            drop(io);
            continue;
        };
        let (app, gate, stop) = (app.clone(), gate.clone(), stop.clone());
        tokio::spawn(async move {
            let who = conn.clone();
            let key = tokio::task::spawn_blocking(move || who.peer_key())
                .await
                .unwrap_or(PeerKey::Unknown);
            let Some(slot) = gate.admit(key, permit) else {
                gate.note(&format!(
                    "Refused connections of {key}: it has {} open, the most one user may",
                    gate.limits.per_peer
                ));
                return;
            };
            serve_connection(io, conn, app, gate.limits.header_timeout, stop).await;
            drop(slot);
        });
    }
}

async fn serve_connection<I: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: I,
    conn: Connection,
    app: Router,
    header_timeout: Duration,
    stop: watch::Receiver<bool>,
) {
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(conn.clone()));
        let mut app = app.clone();
        async move { app.call(req).await }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // The header timeout runs while a request head is awaited: for a new
    // connection, and for a kept-alive one between requests.
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .keep_alive(true);
    let connection = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = connection.as_mut() => {}
        () = stopped(stop) => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_peer_gets_its_share() {
        let gate = Gate::new(Limits {
            total: 3,
            per_peer: 2,
            header_timeout: Duration::from_secs(1),
        });
        let nobody = PeerKey::Uid(65534);
        let a = gate.admit(nobody, gate.place().unwrap()).unwrap();
        let _b = gate.admit(nobody, gate.place().unwrap()).unwrap();
        assert!(gate.admit(nobody, gate.place().unwrap()).is_none());
        let _root = gate.admit(PeerKey::Uid(0), gate.place().unwrap()).unwrap();
        assert!(gate.place().is_none(), "three in all");
        drop(a);
        assert!(gate.admit(nobody, gate.place().unwrap()).is_some());
    }
}
