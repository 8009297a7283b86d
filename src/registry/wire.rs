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
//! - an upload `Location` may not go from HTTPS down to plain HTTP.
//!
//! `oci-client` still provides the reference and error types.

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use oci_client::errors::{OciDistributionError, OciEnvelope};
use reqwest::{Method, StatusCode, Url, header};

use super::token::{EXCHANGE_DEADLINE, MAX_ERROR_BODY, MAX_MANIFEST, Session, read_capped, within};
use super::{ImageRef, RegistryError, classify};

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
        let own = self.own(&url);
        let mut req = self.http.request(method, url);
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
        let e = match serde_json::from_slice::<OciEnvelope>(&body) {
            Ok(envelope) if !envelope.errors.is_empty() => {
                OciDistributionError::RegistryError { envelope, url }
            }
            _ => OciDistributionError::ServerError {
                code,
                url,
                message: String::from_utf8_lossy(&body).into_owned(),
            },
        };
        classify(e, &image.registry, &image.to_string())
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

    /// Uploads blob `digest` of `size` bytes into `image`'s repository in
    /// one request (`POST` for a session, then `PUT` of the body to its
    /// `Location`).
    pub async fn upload(
        &self,
        image: &ImageRef,
        digest: &str,
        size: u64,
        body: reqwest::Body,
    ) -> Result<(), RegistryError> {
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
        let res = self
            .request(Method::PUT, put)
            .header(header::CONTENT_TYPE, "application/octet-stream")
            .header(header::CONTENT_LENGTH, size.to_string())
            .body(body)
            .send()
            .await
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
