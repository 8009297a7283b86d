//! The registry's token exchange, done by lume itself.
//!
//! `oci-client` 0.18 fetches the token `realm` a registry names in its
//! `WWW-Authenticate` challenge with the caller's Basic credentials
//! whatever host the realm is on, and over plain HTTP if the realm says
//! so; it reads token answers, manifests and error answers whole, without
//! a size cap; and it runs that exchange again on its own whenever it
//! holds credentials. It offers no setting for any of it. So lume speaks
//! to registries with its own bounded client (this module and
//! [`super::wire`]):
//!
//! - asks the registry (`GET /v2/`, no credentials) how it authenticates;
//! - for a Bearer challenge, fetches the token itself: the realm must be
//!   HTTPS (plain HTTP only for a loopback realm or one in
//!   `LUME_INSECURE_REGISTRIES`), credentials go to it only when it is on
//!   the registry's own host or the user named its host in
//!   `LUME_TOKEN_REALMS` (Docker Hub's `auth.docker.io`, for instance),
//!   redirects are followed only a few times, never from HTTPS down to
//!   plain HTTP, and never with the credentials to another host (reqwest
//!   drops them), and the answer is read up to
//!   [`MAX_TOKEN_ANSWER`] bytes;
//! - for a Basic challenge, sends the credentials to the registry itself
//!   (it asked for them); with no challenge, nothing;
//! - renews a token before it expires ([`Session::keep_fresh`]).
//!
//! The [`Session`] then carries the `Authorization` for every request of
//! the transfer (manifests, blobs, uploads: [`super::wire`]).

use futures_util::StreamExt;

use super::auth::RegistryAuth;
use super::guard::{Gate, Refusals};
use super::{ImageRef, RegistryError, classify, excerpt};

/// Environment variable: token realm hosts (comma-separated) that may
/// receive the registry's credentials although they are not on its host.
pub const TOKEN_REALMS_ENV: &str = "LUME_TOKEN_REALMS";
/// Largest token answer read.
pub const MAX_TOKEN_ANSWER: usize = 64 << 10;
/// Largest manifest read (lume's manifests are a few KiB; one part per
/// 512 MB of disk keeps even a 4 TB disk's under 4 MiB).
pub const MAX_MANIFEST: usize = 4 << 20;
/// How long a request may wait for each read, and (reqwest counts from
/// the request's start) for its answer's head.
pub(super) const READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
/// Most redirects followed.
const MAX_REDIRECTS: usize = 5;
/// Largest error body read (only an excerpt is passed on).
pub(super) const MAX_ERROR_BODY: usize = 16 << 10;

/// How lume talks to one registry for one transfer.
pub struct Session {
    /// `Authorization` for requests to the registry's own host (renewed
    /// with the token).
    pub(super) header: std::sync::Mutex<Option<String>>,
    pub(super) http: reqwest::Client,
    /// The same without a read timeout, for uploads.
    pub(super) upload_http: reqwest::Client,
    /// `SCHEME://HOST[:PORT]` of the registry.
    pub(super) base: reqwest::Url,
    /// For a token: how to fetch the next one, and when this one was.
    refresh: Option<Refresh>,
    /// The gate's refusals, in a public-only transfer.
    pub(super) refusals: Option<Refusals>,
    /// The registry's name, as the user gave it.
    registry: String,
}

/// What a token is fetched anew from.
struct Refresh {
    image: ImageRef,
    /// The registry's own origin (where credentials may go).
    base: reqwest::Url,
    realm: String,
    service: Option<String>,
    basic: Option<(String, String)>,
    push: bool,
    public_only: bool,
    /// When the token in use was fetched, and how long it lasts.
    state: tokio::sync::Mutex<(std::time::Instant, std::time::Duration)>,
}

/// How long a token lasts when its answer does not say (the distribution
/// spec's default), and at least.
const TOKEN_LIFETIME: u64 = 60;

/// A `WWW-Authenticate` challenge.
#[derive(Debug, PartialEq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
    Other,
}

/// Parses the first challenge of a `WWW-Authenticate` value
/// (`Bearer realm="…",service="…",scope="…"`).
pub fn parse_challenge(value: &str) -> Challenge {
    let value = value.trim();
    let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
    if scheme.eq_ignore_ascii_case("basic") {
        return Challenge::Basic;
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Challenge::Other;
    }
    let mut params: Vec<(String, String)> = Vec::new();
    let mut s = rest.trim_start();
    while !s.is_empty() {
        let Some(eq) = s.find('=') else { break };
        let key = s[..eq].trim().to_ascii_lowercase();
        s = &s[eq + 1..];
        let val;
        if let Some(q) = s.strip_prefix('"') {
            let mut out = String::new();
            let mut chars = q.char_indices();
            let mut end = q.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            out.push(n);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => out.push(c),
                }
            }
            val = out;
            s = &q[end.min(q.len())..];
        } else {
            let end = s.find(',').unwrap_or(s.len());
            val = s[..end].trim().to_string();
            s = &s[end..];
        }
        params.push((key, val));
        s = s.trim_start().trim_start_matches(',').trim_start();
    }
    let get = |k: &str| {
        params
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    match get("realm") {
        Some(realm) => Challenge::Bearer {
            realm,
            service: get("service"),
        },
        None => Challenge::Other,
    }
}

/// Whether credentials for the registry at `base` may go to the token
/// realm `realm`: on the registry's own origin (scheme, host and port,
/// the scheme's default port when none is written), or on a host the user
/// named in [`TOKEN_REALMS_ENV`] — `HOST` for the realm's default port,
/// `HOST:PORT` for another. Another port of the same host is another
/// service (on loopback, any local user's).
pub fn realm_gets_credentials(base: &reqwest::Url, realm: &reqwest::Url) -> bool {
    let same = realm.scheme() == base.scheme()
        && realm.host() == base.host()
        && realm.port_or_known_default() == base.port_or_known_default();
    same || std::env::var(TOKEN_REALMS_ENV).is_ok_and(|v| named_in(realm, &v))
}

/// Whether `entries` (comma-separated, as [`TOKEN_REALMS_ENV`]) name
/// `realm`'s host: `HOST:PORT` (the default port may be spelled out), or
/// plain `HOST` for a realm on its scheme's default port.
fn named_in(realm: &reqwest::Url, entries: &str) -> bool {
    let host = realm.host_str().unwrap_or_default();
    let mut names = Vec::new();
    if let Some(port) = realm.port_or_known_default() {
        names.push(with_port(host, Some(port)));
    }
    if realm.port().is_none() {
        let bare = host_port(realm);
        names.push(
            bare.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
        );
        names.push(bare);
    }
    entries
        .split(',')
        .map(str::trim)
        .any(|h| !h.is_empty() && names.iter().any(|n| n.eq_ignore_ascii_case(h)))
}

/// Reads at most `max` bytes of `res`'s body; `None` when it is longer.
pub(super) async fn read_capped(
    res: reqwest::Response,
    max: usize,
) -> Result<Option<Vec<u8>>, reqwest::Error> {
    if res.content_length().is_some_and(|n| n > max as u64) {
        return Ok(None);
    }
    let mut body = Vec::new();
    let mut stream = res.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if body.len() + chunk.len() > max {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// Asks `image`'s registry how it authenticates and, for a Bearer
/// challenge, fetches a token (for pushing when `push`). With `gate`
/// (public-only transfers) every connection goes through it and only
/// HTTPS is spoken.
pub async fn authorize(
    image: &ImageRef,
    auth: &RegistryAuth,
    push: bool,
    gate: Option<&Gate>,
) -> Result<Session, RegistryError> {
    let refusals = gate.map(Gate::refusals);
    within_deadline(&image.registry, authorize_now(image, auth, push, gate))
        .await
        .map_err(|e| Refusals::explain(refusals.as_ref(), e, &image.registry))
}

/// How long the exchange with the registry (its first answer, the token)
/// or one manifest fetch may take as a whole: the per-read timeout alone
/// lets a registry that sends a byte a minute hold a transfer for weeks.
pub const EXCHANGE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);

async fn within_deadline<T>(
    registry: &str,
    f: impl std::future::Future<Output = Result<T, RegistryError>>,
) -> Result<T, RegistryError> {
    within(EXCHANGE_DEADLINE, registry, f).await
}

pub(super) async fn within<T>(
    deadline: std::time::Duration,
    registry: &str,
    f: impl std::future::Future<Output = Result<T, RegistryError>>,
) -> Result<T, RegistryError> {
    tokio::time::timeout(deadline, f).await.unwrap_or_else(|_| {
        Err(RegistryError::Protocol {
            registry: registry.to_string(),
            detail: format!(
                "it did not finish answering within {} s",
                deadline.as_secs()
            ),
        })
    })
}

async fn authorize_now(
    image: &ImageRef,
    auth: &RegistryAuth,
    push: bool,
    gate: Option<&Gate>,
) -> Result<Session, RegistryError> {
    let registry = image.registry.clone();
    let image_s = image.to_string();
    let fail = |e: reqwest::Error| classify(e.into(), &registry, &image_s);
    let client = |read_timeout: Option<std::time::Duration>| {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(30))
            .user_agent(concat!("lume-linux/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::custom(|a| {
                // A few redirects, never from HTTPS down to plain HTTP
                // (reqwest drops Authorization on a redirect to another
                // host).
                let down = a.url().scheme() != "https"
                    && a.previous().iter().any(|u| u.scheme() == "https");
                if a.previous().len() > MAX_REDIRECTS || down {
                    a.stop()
                } else {
                    a.follow()
                }
            }));
        if let Some(t) = read_timeout {
            builder = builder.read_timeout(t);
        }
        if let Some(g) = gate {
            builder = builder.proxy(g.proxy()?);
        }
        builder.build()
    };
    let http = client(Some(READ_TIMEOUT)).map_err(fail)?;
    // reqwest's read timeout runs from the request's start to its answer's
    // head: an upload's whole body would have to go within it. Uploads
    // are held to a minimum rate instead (`wire`).
    let upload_http = client(None).map_err(fail)?;
    let scheme = if gate.is_none() && super::auth::plain_http(&registry) {
        "http"
    } else {
        "https"
    };
    let base = format!("{scheme}://{}", image.oci().resolve_registry());
    let base = reqwest::Url::parse(&base)
        .map_err(|e| RegistryError::BadRegistry(excerpt(&format!("{base}: {e}"))))?;
    let res = http
        .get(base.join("/v2/").expect("a path joins"))
        .send()
        .await
        .map_err(fail)?;
    let challenge = res
        .headers()
        .get(reqwest::header::WWW_AUTHENTICATE)
        .and_then(|h| h.to_str().ok())
        .map(parse_challenge);
    drop(res);
    let basic = match auth {
        RegistryAuth::Basic(u, p) => Some((u.clone(), p.clone())),
        RegistryAuth::Anonymous => None,
    };
    let mut refresh = None;
    let header = match challenge {
        Some(Challenge::Bearer { realm, service }) => {
            let mut r = Refresh {
                image: image.clone(),
                base: base.clone(),
                realm,
                service,
                basic: basic.clone(),
                push,
                public_only: gate.is_some(),
                state: tokio::sync::Mutex::new((
                    std::time::Instant::now(),
                    std::time::Duration::ZERO,
                )),
            };
            let (token, life) = exchange(&http, &r).await?;
            *r.state.get_mut() = (std::time::Instant::now(), life);
            refresh = Some(r);
            Some(format!("Bearer {token}"))
        }
        // The registry asked for the credentials itself.
        Some(Challenge::Basic) if basic.is_some() => {
            let (u, p) = basic.clone().expect("checked");
            Some(format!(
                "Basic {}",
                base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    format!("{u}:{p}")
                )
            ))
        }
        // No challenge (or one lume cannot answer): nothing is sent.
        _ => None,
    };
    Ok(Session {
        header: std::sync::Mutex::new(header),
        http,
        upload_http,
        base,
        refresh,
        refusals: gate.map(Gate::refusals),
        registry,
    })
}

/// `HOST[:PORT]` of `url`, as registries are named (`[V6]:PORT`).
pub(super) fn host_port(url: &reqwest::Url) -> String {
    with_port(url.host_str().unwrap_or_default(), url.port())
}

/// `HOST[:PORT]`, an IPv6 `HOST` in brackets before a port.
fn with_port(host: &str, port: Option<u16>) -> String {
    match port {
        Some(p) if host.contains(':') && !host.starts_with('[') => format!("[{host}]:{p}"),
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    }
}

/// The token exchange with `realm`: the token and how long it lasts.
async fn exchange(
    http: &reqwest::Client,
    r: &Refresh,
) -> Result<(String, std::time::Duration), RegistryError> {
    let (image, realm, push, public_only) = (&r.image, r.realm.as_str(), r.push, r.public_only);
    let basic = r.basic.as_ref();
    let registry = &image.registry;
    let bad = |why: String| RegistryError::TokenRealm {
        registry: registry.clone(),
        realm: excerpt(realm),
        why,
    };
    let url = reqwest::Url::parse(realm).map_err(|e| bad(format!("it is not a URL ({e})")))?;
    url.host_str()
        .ok_or_else(|| bad("it names no host".into()))?;
    match url.scheme() {
        "https" => {}
        "http" if !public_only && super::auth::plain_http(&host_port(&url)) => {}
        _ => {
            return Err(bad(format!(
                "it is not HTTPS; plain HTTP is spoken only to loopback hosts and those in {}",
                super::auth::INSECURE_ENV
            )));
        }
    }
    if basic.is_some() && !realm_gets_credentials(&r.base, &url) {
        return Err(RegistryError::ForeignRealm {
            registry: registry.clone(),
            realm_host: excerpt(&host_port(&url)),
        });
    }
    let repo = image.oci().repository().to_string();
    let scope = if push {
        format!("repository:{repo}:pull,push")
    } else {
        format!("repository:{repo}:pull")
    };
    let mut query = vec![("scope", scope)];
    if let Some(s) = r.service.clone() {
        query.push(("service", s));
    }
    let mut req = http.get(url).query(&query);
    if let Some((u, p)) = basic {
        req = req.basic_auth(u, Some(p));
    }
    let image_s = image.to_string();
    let fail = |e: reqwest::Error| classify(e.into(), registry, &image_s);
    let res = req.send().await.map_err(fail)?;
    let status = res.status();
    if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
        return Err(RegistryError::Unauthorized {
            registry: registry.clone(),
            sent: basic.is_some(),
            api: false,
        });
    }
    let body = read_capped(res, MAX_TOKEN_ANSWER).await.map_err(fail)?;
    let Some(body) = body else {
        return Err(RegistryError::TooLong {
            registry: registry.clone(),
            what: "token answer",
            max: MAX_TOKEN_ANSWER,
        });
    };
    if !status.is_success() {
        return Err(bad(format!(
            "it answered {status}: {}",
            excerpt(&String::from_utf8_lossy(&body))
        )));
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        token: Option<String>,
        access_token: Option<String>,
        expires_in: Option<u64>,
    }
    let answer: Answer = serde_json::from_slice(&body)
        .map_err(|e| bad(format!("its answer is not a token ({e})")))?;
    let life = std::time::Duration::from_secs(
        answer
            .expires_in
            .unwrap_or(TOKEN_LIFETIME)
            .clamp(TOKEN_LIFETIME, 24 * 3600),
    );
    let token = answer
        .token
        .or(answer.access_token)
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| bad("its answer holds no usable token".into()))?;
    Ok((token, life))
}

impl Session {
    /// Fetches a new token when two thirds of the current one's life have
    /// passed. Called before each blob request, so a transfer outlives its
    /// tokens.
    pub async fn keep_fresh(&self) -> Result<(), RegistryError> {
        within_deadline(&self.registry, self.renew())
            .await
            .map_err(|e| self.explain(e))
    }

    /// `e` with the gate's refusals taken into account.
    pub(super) fn explain(&self, e: RegistryError) -> RegistryError {
        Refusals::explain(self.refusals.as_ref(), e, &self.registry)
    }

    async fn renew(&self) -> Result<(), RegistryError> {
        let Some(r) = &self.refresh else {
            return Ok(());
        };
        let mut state = r.state.lock().await;
        if state.0.elapsed() < state.1 * 2 / 3 {
            return Ok(());
        }
        let (token, life) = exchange(&self.http, r).await?;
        *state = (std::time::Instant::now(), life);
        *self.header.lock().expect("never poisoned") = Some(format!("Bearer {token}"));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://ghcr.io/token",service="ghcr.io",scope="repository:a/b:pull""#
            ),
            Challenge::Bearer {
                realm: "https://ghcr.io/token".into(),
                service: Some("ghcr.io".into())
            }
        );
        assert_eq!(
            parse_challenge(r#"bearer service="x", realm="https://a\"b/""#),
            Challenge::Bearer {
                realm: "https://a\"b/".into(),
                service: Some("x".into())
            }
        );
        assert_eq!(parse_challenge(r#"Basic realm="test""#), Challenge::Basic);
        assert_eq!(parse_challenge("Bearer service=x"), Challenge::Other);
        assert_eq!(parse_challenge("Negotiate"), Challenge::Other);
        assert_eq!(
            parse_challenge(r#"Bearer realm="unterminated"#),
            Challenge::Bearer {
                realm: "unterminated".into(),
                service: None
            }
        );
    }

    #[test]
    fn credentials_only_to_the_registrys_own_origin() {
        let u = |s: &str| reqwest::Url::parse(s).unwrap();
        let gets = |base: &str, realm: &str| realm_gets_credentials(&u(base), &u(realm));
        assert!(gets("https://ghcr.io", "https://ghcr.io/token"));
        assert!(gets("https://ghcr.io", "https://GHCR.io:443/token"));
        assert!(gets("http://127.0.0.1:5000", "http://127.0.0.1:5000/token"));
        assert!(gets("http://[::1]:5000", "http://[0:0::1]:5000/token"));
        // Another port or scheme of the same host: another service.
        assert!(!gets(
            "http://127.0.0.1:5000",
            "http://127.0.0.1:5007/token"
        ));
        assert!(!gets("https://r.example", "http://r.example/token"));
        assert!(!gets("https://r.example", "https://r.example:8443/token"));
        assert!(!gets(
            "http://127.0.0.1:5000",
            "http://127.0.0.2:5000/token"
        ));
        assert!(!gets(
            "https://ghcr.io",
            "https://ghcr.io.evil.example/token"
        ));
        assert!(!gets(
            "https://registry-1.docker.io",
            "https://auth.docker.io/token"
        ));
        // What LUME_TOKEN_REALMS may say.
        let named = |realm: &str, entries: &str| named_in(&u(realm), entries);
        assert!(named("https://auth.docker.io/token", "auth.docker.io"));
        assert!(named(
            "https://auth.docker.io/token",
            "x, AUTH.docker.io:443"
        ));
        assert!(named("http://127.0.0.2:5101/token", "127.0.0.2:5101"));
        assert!(!named("http://127.0.0.2:5101/token", "127.0.0.2"));
        assert!(!named(
            "https://auth.docker.io:8443/token",
            "auth.docker.io"
        ));
        assert!(named("https://[::1]:8443/t", "[::1]:8443"));
        assert!(named("https://[::1]/t", "::1"));
        assert!(!named("https://auth.docker.io/token", ""));
    }

    /// A registry on loopback that hands out numbered tokens and records
    /// the Authorization of each blob request.
    async fn token_registry() -> (
        std::net::SocketAddr,
        std::sync::Arc<std::sync::Mutex<(u32, Vec<String>)>>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new((0u32, Vec::new())));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match c.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let path = head.split(' ').nth(1).unwrap_or("").to_string();
                    let auth = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .starts_with("authorization:")
                                .then(|| l[14..].trim().to_string())
                        })
                        .unwrap_or_default();
                    let answer = if path == "/v2/" {
                        format!(
                            "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"http://{addr}/token\",service=\"t\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        )
                    } else if path.starts_with("/token") {
                        let n = {
                            let mut l = log.lock().unwrap();
                            l.0 += 1;
                            l.0
                        };
                        let body = format!("{{\"token\":\"t{n}\",\"expires_in\":60}}");
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        )
                    } else {
                        log.lock().unwrap().1.push(auth);
                        "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                            .to_string()
                    };
                    let _ = c.write_all(answer.as_bytes()).await;
                });
            }
        });
        (addr, seen)
    }

    /// A transfer longer than its token's life goes on with a new token:
    /// fetched when two thirds of the old one's life have passed, and the
    /// one sent from then on.
    #[tokio::test]
    async fn tokens_are_renewed_before_they_expire() {
        let (addr, seen) = token_registry().await;
        let image = ImageRef::parse("img:v1", &addr.to_string(), "test").unwrap();
        let session = authorize(&image, &RegistryAuth::Anonymous, false, None)
            .await
            .unwrap();
        let digest = format!("sha256:{}", "0".repeat(64));
        let exists = async || {
            session.keep_fresh().await.unwrap();
            session.blob_exists(&image, &digest).await.unwrap();
        };
        exists().await;
        exists().await;
        {
            let r = session.refresh.as_ref().unwrap();
            let mut state = r.state.lock().await;
            state.0 -= std::time::Duration::from_secs(41);
        }
        exists().await;
        let seen = seen.lock().unwrap();
        assert_eq!(seen.0, 2, "one token at first, one renewal");
        assert_eq!(seen.1, ["Bearer t1", "Bearer t1", "Bearer t2"]);
    }

    /// A registry that never finishes answering (a byte now and then
    /// keeps every read within its timeout) is cut off as a whole.
    #[test]
    fn an_exchange_that_never_ends_is_cut_off() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let never = std::future::pending::<Result<(), RegistryError>>();
        let e = rt
            .block_on(within(
                std::time::Duration::from_millis(50),
                "r.example",
                never,
            ))
            .unwrap_err();
        assert!(
            matches!(e, RegistryError::Protocol { ref registry, .. } if registry == "r.example"),
            "{e}"
        );
        assert!(e.to_string().contains("did not finish answering"), "{e}");
    }
}
