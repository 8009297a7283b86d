//! lume's requests to a registry for manifests, blobs and uploads: the
//! distribution API's handful of calls, each bounded.
//!
//! `oci-client` 0.18 reads a failed request's answer whole (an endless
//! error body fills the memory of the root process doing the transfer)
//! and, holding credentials, runs its own token exchange again outside
//! lume's checks (see [`super::token`]). So every request goes through
//! the transfer's [`Session`] instead:
//!
//! - `Authorization` is sent only to the registry's own scheme, host and
//!   port: never with an upload `Location` elsewhere, and reqwest drops it
//!   on a redirect to another host;
//! - error answers are read up to [`MAX_ERROR_BODY`] bytes within
//!   [`ERROR_BODY_DEADLINE`], manifests up to [`MAX_MANIFEST`] bytes within
//!   [`EXCHANGE_DEADLINE`]; blob bodies are streamed to the caller, which
//!   holds them to the manifest's size and a minimum rate;
//! - an upload `Location` may not go from HTTPS down to plain HTTP;
//! - an upload's body is held to [`MIN_WINDOW_BYTES`] per [`RATE_WINDOW`],
//!   its answer must come within [`READ_TIMEOUT`] of the body's end, and
//!   the whole upload within 10 minutes plus one per MiB: a chunk need not
//!   fit in one read timeout, nor may a registry hold it for days.
//!
//! A failed request is a [`RequestFailure`], sorted by [`classify`].

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use reqwest::{Method, StatusCode, Url, header};

use super::token::{
    EXCHANGE_DEADLINE, MAX_ERROR_BODY, MAX_MANIFEST, READ_TIMEOUT, Session, read_capped, within,
};
use super::{ImageRef, RegistryError, RequestFailure, classify};

/// An upload that moves fewer bytes than this per [`RATE_WINDOW`] is
/// broken off.
pub const MIN_WINDOW_BYTES: u64 = 64 << 10;
/// The window of [`MIN_WINDOW_BYTES`].
pub const RATE_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// How long reading a failed request's answer may take.
pub const ERROR_BODY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// A blob's bytes as the registry streams them.
pub type BlobStream = BoxStream<'static, Result<bytes::Bytes, reqwest::Error>>;

/// A blob request's answer.
pub enum Blob {
    /// From the offset asked for.
    Partial(BlobStream),
    /// From its start (the registry ignored the range).
    Full(BlobStream),
}

impl Session {
    fn url(&self, path: &str) -> Url {
        self.base
            .join(path)
            .expect("a path joins the registry's URL")
    }

    /// Whether `url` is the registry's own origin (the credentials' only
    /// destination).
    fn own(&self, url: &Url) -> bool {
        url.scheme() == self.base.scheme()
            && url.host_str() == self.base.host_str()
            && url.port_or_known_default() == self.base.port_or_known_default()
    }

    fn request(&self, method: Method, url: Url) -> reqwest::RequestBuilder {
        self.request_on(&self.http, method, url)
    }

    fn request_on(
        &self,
        http: &reqwest::Client,
        method: Method,
        url: Url,
    ) -> reqwest::RequestBuilder {
        let own = self.own(&url);
        let mut req = http.request(method, url);
        if own && let Some(h) = self.header.lock().expect("never poisoned").as_ref() {
            req = req.header(header::AUTHORIZATION, h);
        }
        req
    }

    fn send_failed(&self, image: &ImageRef) -> impl Fn(reqwest::Error) -> RegistryError {
        let (registry, image) = (image.registry.clone(), image.to_string());
        move |e| self.explain(classify(e.into(), &registry, &image))
    }

    /// The error for a request `res` answered with a failure: its
    /// distribution error codes when it sent them, else its status, with
    /// an excerpt of at most [`MAX_ERROR_BODY`] bytes read within
    /// [`ERROR_BODY_DEADLINE`].
    async fn failed(&self, res: reqwest::Response, image: &ImageRef) -> RegistryError {
        let code = res.status().as_u16();
        let url = res.url().to_string();
        let body = tokio::time::timeout(ERROR_BODY_DEADLINE, read_capped(res, MAX_ERROR_BODY))
            .await
            .ok()
            .and_then(Result::ok)
            .flatten()
            .unwrap_or_default();
        classify(
            RequestFailure::answer(code, url, &body),
            &image.registry,
            &image.to_string(),
        )
    }

    /// The manifest of `image` (a tag or digest), at most [`MAX_MANIFEST`]
    /// bytes, as the registry sent it.
    pub async fn manifest(
        &self,
        image: &ImageRef,
        accept: &[&str],
    ) -> Result<Vec<u8>, RegistryError> {
        within(EXCHANGE_DEADLINE, &image.registry, async {
            let oref = image.oci();
            let reference = oref
                .digest()
                .or_else(|| oref.tag())
                .unwrap_or("latest")
                .to_string();
            let url = self.url(&format!("/v2/{}/manifests/{reference}", oref.repository()));
            let fail = self.send_failed(image);
            let res = self
                .request(Method::GET, url)
                .header(header::ACCEPT, accept.join(", "))
                .send()
                .await
                .map_err(&fail)?;
            if !res.status().is_success() {
                return Err(self.failed(res, image).await);
            }
            read_capped(res, MAX_MANIFEST)
                .await
                .map_err(&fail)?
                .ok_or_else(|| RegistryError::TooLong {
                    registry: image.registry.clone(),
                    what: "manifest",
                    max: MAX_MANIFEST,
                })
        })
        .await
    }

    /// Blob `digest` of `image`'s repository from byte `from` on.
    pub async fn blob(
        &self,
        image: &ImageRef,
        digest: &str,
        from: u64,
    ) -> Result<Blob, RegistryError> {
        let url = self.blob_url(image, digest);
        let mut req = self.request(Method::GET, url);
        if from > 0 {
            req = req.header(header::RANGE, format!("bytes={from}-"));
        }
        let res = req.send().await.map_err(self.send_failed(image))?;
        match res.status() {
            StatusCode::PARTIAL_CONTENT if from > 0 => {
                Ok(Blob::Partial(res.bytes_stream().boxed()))
            }
            StatusCode::OK if from == 0 => Ok(Blob::Partial(res.bytes_stream().boxed())),
            StatusCode::OK => Ok(Blob::Full(res.bytes_stream().boxed())),
            _ => Err(self.failed(res, image).await),
        }
    }

    fn blob_url(&self, image: &ImageRef, digest: &str) -> Url {
        self.url(&format!("/v2/{}/blobs/{digest}", image.oci().repository()))
    }

    /// Whether the registry holds blob `digest` in `image`'s repository.
    pub async fn blob_exists(&self, image: &ImageRef, digest: &str) -> Result<bool, RegistryError> {
        let res = self
            .request(Method::HEAD, self.blob_url(image, digest))
            .send()
            .await
            .map_err(self.send_failed(image))?;
        match res.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.failed(res, image).await),
        }
    }

    /// Uploads blob `digest` of `size` bytes (`body`) into `image`'s
    /// repository in one request (`POST` for a session, then `PUT` of the
    /// body to its `Location`), held to a minimum rate.
    pub async fn upload<S>(
        &self,
        image: &ImageRef,
        digest: &str,
        size: u64,
        body: S,
    ) -> Result<(), RegistryError>
    where
        S: futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static,
    {
        let fail = self.send_failed(image);
        let start = self.url(&format!("/v2/{}/blobs/uploads/", image.oci().repository()));
        let res = self
            .request(Method::POST, start.clone())
            .header(header::CONTENT_LENGTH, "0")
            .send()
            .await
            .map_err(&fail)?;
        if res.status() != StatusCode::ACCEPTED {
            return Err(self.failed(res, image).await);
        }
        let mut put = self.location(&res, &start, image)?;
        put.query_pairs_mut().append_pair("digest", digest);
        let progress = std::sync::Arc::new(Progress::default());
        let counted = {
            let progress = progress.clone();
            futures_util::TryStreamExt::inspect_ok(body, move |b| {
                progress.add(b.len() as u64, size)
            })
        };
        let req = self
            .request_on(&self.upload_http, Method::PUT, put)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, size.to_string())
            .body(reqwest::Body::wrap_stream(counted))
            .send();
        let res = held_to(
            req,
            &progress,
            size,
            &image.registry,
            Limits::for_upload(size),
        )
        .await?
        .map_err(&fail)?;
        if res.status() != StatusCode::CREATED {
            return Err(self.failed(res, image).await);
        }
        Ok(())
    }

    /// An upload session's `Location`, relative to `from`: not from HTTPS
    /// down to plain HTTP.
    fn location(
        &self,
        res: &reqwest::Response,
        from: &Url,
        image: &ImageRef,
    ) -> Result<Url, RegistryError> {
        let bad = |why: &str| RegistryError::Protocol {
            registry: image.registry.clone(),
            detail: format!("its upload location {why}"),
        };
        let text = res
            .headers()
            .get(header::LOCATION)
            .ok_or_else(|| bad("is missing"))?
            .to_str()
            .map_err(|_| bad("is not text"))?;
        let url = from
            .join(text)
            .map_err(|_| bad(&format!("is not a URL: {}", super::excerpt(text))))?;
        match url.scheme() {
            "https" => Ok(url),
            // Plain HTTP only where the registry already speaks it, and
            // to a host where lume would speak it at all.
            "http"
                if from.scheme() == "http"
                    && super::auth::plain_http(&super::token::host_port(&url)) =>
            {
                Ok(url)
            }
            _ => Err(bad(&format!(
                "leaves HTTPS: {}",
                super::excerpt(url.as_str())
            ))),
        }
    }

    /// Puts `manifest` (of media type `media_type`) as `image`'s tag.
    pub async fn push_manifest(
        &self,
        image: &ImageRef,
        manifest: Vec<u8>,
        media_type: &str,
    ) -> Result<(), RegistryError> {
        let url = self.url(&format!(
            "/v2/{}/manifests/{}",
            image.oci().repository(),
            image.tag
        ));
        let res = self
            .request(Method::PUT, url)
            .header(header::CONTENT_TYPE, media_type)
            .body(manifest)
            .send()
            .await
            .map_err(self.send_failed(image))?;
        if !res.status().is_success() {
            return Err(self.failed(res, image).await);
        }
        Ok(())
    }
}

/// How far an upload's body went: bytes handed to the connection, and
/// when the last of them was.
#[derive(Default)]
struct Progress {
    sent: std::sync::atomic::AtomicU64,
    done: std::sync::OnceLock<tokio::time::Instant>,
}

impl Progress {
    fn add(&self, n: u64, size: u64) {
        let total = self.sent.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
        if total >= size {
            self.done.get_or_init(tokio::time::Instant::now);
        }
    }
}

/// What an upload is held to.
struct Limits {
    /// The window of the minimum rate ([`MIN_WINDOW_BYTES`] per
    /// [`RATE_WINDOW`], scaled).
    window: std::time::Duration,
    /// From the body's end to the answer.
    answer: std::time::Duration,
    /// The whole upload: a registry reading just above the minimum rate
    /// would otherwise hold a push (and its VM) for days.
    overall: std::time::Duration,
}

impl Limits {
    /// For an upload of `size` bytes: 10 minutes plus one per MiB (so at
    /// least about 17 KiB/s on average: a 512 MB chunk within 9 hours).
    fn for_upload(size: u64) -> Self {
        Self {
            window: RATE_WINDOW,
            answer: READ_TIMEOUT,
            overall: std::time::Duration::from_secs(600 + (size >> 20) * 60),
        }
    }
}

/// Runs `request` (an upload of `size` bytes whose body went as far as
/// `progress` says) within `limits`.
async fn held_to<F: std::future::Future>(
    request: F,
    progress: &Progress,
    size: u64,
    registry: &str,
    limits: Limits,
) -> Result<F::Output, RegistryError> {
    let min = MIN_WINDOW_BYTES * limits.window.as_millis() as u64 / RATE_WINDOW.as_millis() as u64;
    let start = tokio::time::Instant::now();
    tokio::pin!(request);
    let mut last = 0;
    let mut tick = start + limits.window;
    loop {
        // The next look: the rate's window, the answer's deadline once
        // the body is out, the whole upload's.
        let mut wake = tick.min(start + limits.overall);
        if let Some(done) = progress.done.get() {
            wake = wake.min(*done + limits.answer);
        }
        tokio::select! {
            out = &mut request => return Ok(out),
            () = tokio::time::sleep_until(wake) => {}
        }
        let now = tokio::time::Instant::now();
        let sent = progress.sent.load(std::sync::atomic::Ordering::Relaxed);
        let fail = |detail: String| {
            Err(RegistryError::Protocol {
                registry: registry.to_string(),
                detail,
            })
        };
        if now >= start + limits.overall {
            return fail(format!(
                "an upload of {size} bytes did not finish within {} minutes; check the network",
                limits.overall.as_secs() / 60
            ));
        }
        if let Some(done) = progress.done.get() {
            if now >= *done + limits.answer {
                return fail(format!(
                    "it did not answer an upload within {} s of its end",
                    limits.answer.as_secs()
                ));
            }
        } else if now >= tick {
            if sent - last < min {
                return fail(format!(
                    "an upload moved {} bytes in {} s, slower than lume waits for ({} KiB a minute); check the network",
                    sent - last,
                    limits.window.as_secs(),
                    MIN_WINDOW_BYTES >> 10
                ));
            }
            last = sent;
        }
        if now >= tick {
            tick += limits.window;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upload is not held to one read timeout as a whole: a slow but
    /// moving body goes on past it; one that stalls is broken off after a
    /// window; an answer that never comes after the body ends is given
    /// up on.
    #[tokio::test]
    async fn uploads_are_held_to_a_rate_not_a_timeout() {
        // Windows of 50 ms stand for minutes; the answer deadline is 3 of
        // them, the whole upload 20.
        let w = std::time::Duration::from_millis(50);
        let limits = || Limits {
            window: w,
            answer: 3 * w,
            overall: 20 * w,
        };
        let per_window = MIN_WINDOW_BYTES * 50 / RATE_WINDOW.as_millis() as u64;
        // Moving twice the minimum for ten windows (past the answer's
        // deadline, which counts from the body's end only): fine.
        let p = Progress::default();
        let size = 100 * per_window;
        let moving = async {
            for _ in 0..10 {
                tokio::time::sleep(w / 2).await;
                p.add(per_window, size);
            }
            "answered"
        };
        let out = held_to(moving, &p, size, "r", limits()).await;
        assert_eq!(out.unwrap(), "answered");

        // Stalled after the first bytes: broken off.
        let p = Progress::default();
        let stalled = async {
            p.add(1 << 20, 4 << 20);
            std::future::pending::<()>().await
        };
        let e = held_to(stalled, &p, 4 << 20, "r", limits())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("slower than lume waits for"), "{e}");

        // The body went, the answer never comes: given up on, counted
        // from the body's end.
        let p = Progress::default();
        p.add(4 << 20, 4 << 20);
        let start = tokio::time::Instant::now();
        let e = held_to(std::future::pending::<()>(), &p, 4 << 20, "r", limits())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("did not answer an upload"), "{e}");
        let took = start.elapsed();
        assert!(took >= 3 * w && took < 5 * w, "{took:?}");

        // Just above the minimum rate for ever: the whole upload's limit.
        let p = Progress::default();
        let creeping = async {
            loop {
                tokio::time::sleep(w / 2).await;
                p.add(per_window, u64::MAX);
            }
        };
        let e = held_to(creeping, &p, u64::MAX, "r", limits())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("did not finish within"), "{e}");
    }
}
