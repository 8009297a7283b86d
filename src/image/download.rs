//! Downloading an image over http(s) as one stream that survives a broken
//! connection: when the body breaks off, the rest is asked for with an HTTP
//! `Range` request (guarded by `If-Range`, so a file that changed on the
//! server is never stitched together from two versions), a bounded number
//! of times.
//!
//! The client is ureq 3 (blocking, small, maintained, rustls for https with
//! the Mozilla root store of `webpki-roots`, no OpenSSL): the import runs on
//! a plain thread and reads the body like a file. Redirects are followed at
//! most [`MAX_REDIRECTS`] times and only to http/https (ureq speaks nothing
//! else); no `Accept-Encoding` is sent, so the bytes hashed are the bytes of
//! the file.

use std::io::{self, Read};
use std::time::Duration;

use ureq::ResponseExt;
use ureq::http::{StatusCode, header};

/// Redirects followed before the download is refused.
pub const MAX_REDIRECTS: u32 = 5;
/// How often a broken transfer is resumed before the download fails.
pub const MAX_RESUMES: u32 = 5;
/// No byte for this long: the connection counts as broken.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a download failed.
#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error("Cannot download {url}: check the address, the network and any proxy settings")]
    Request {
        url: String,
        #[source]
        source: ureq::Error,
    },
    #[error("Cannot download {url}: the server answered HTTP {status}; check the URL")]
    Status { url: String, status: u16 },
    #[error(
        "The download of {url} broke off at byte {at} and did not resume after {attempts} attempts: try again later"
    )]
    Interrupted {
        url: String,
        at: u64,
        attempts: u32,
        #[source]
        source: io::Error,
    },
    #[error(
        "The download of {url} broke off at byte {at} and the server cannot resume it ({why}): try again"
    )]
    NoResume {
        url: String,
        at: u64,
        why: &'static str,
    },
    #[error(
        "{url} is larger than {limit} bytes, the most lume accepts for this disk: give a larger --disk-size if the image is right"
    )]
    TooLarge { url: String, limit: u64 },
}

impl DownloadError {
    /// Carried through `io::Read`; recovered by [`DownloadError::from_io`].
    fn into_io(self) -> io::Error {
        io::Error::other(self)
    }

    /// The download error inside an I/O error from [`Download`]'s `read`,
    /// if it is one (by type, never by text).
    pub fn from_io(e: io::Error) -> Result<Self, io::Error> {
        if e.get_ref().is_some_and(|i| i.is::<DownloadError>()) {
            let inner = e.into_inner().expect("checked above");
            Ok(*inner.downcast::<DownloadError>().expect("checked above"))
        } else {
            Err(e)
        }
    }
}

/// An open download: `Read` gives the file's bytes in order, resuming
/// transparently after a broken connection.
pub struct Download {
    agent: ureq::Agent,
    /// The URL the first request ended at (after redirects); resumes go there.
    url: String,
    /// `If-Range` validator: a strong ETag or Last-Modified.
    validator: Option<String>,
    body: Option<ureq::BodyReader<'static>>,
    pos: u64,
    len: Option<u64>,
    limit: u64,
    resumes: u32,
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(MAX_REDIRECTS)
        .max_redirects_will_error(true)
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .timeout_per_read(Some(READ_TIMEOUT))
        .user_agent(concat!("lume/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

fn header_str(resp: &ureq::http::Response<ureq::Body>, name: header::HeaderName) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

impl Download {
    /// Sends the request; refuses an answer other than 200 and a declared
    /// size above `limit`.
    pub fn open(url: &str, limit: u64) -> Result<Self, DownloadError> {
        let agent = agent();
        let resp = agent
            .get(url)
            .call()
            .map_err(|source| DownloadError::Request {
                url: url.to_string(),
                source,
            })?;
        if resp.status() != StatusCode::OK {
            return Err(DownloadError::Status {
                url: url.to_string(),
                status: resp.status().as_u16(),
            });
        }
        let len = resp.body().content_length();
        if len.is_some_and(|l| l > limit) {
            return Err(DownloadError::TooLarge {
                url: url.to_string(),
                limit,
            });
        }
        let validator = header_str(&resp, header::ETAG)
            .filter(|e| !e.starts_with("W/"))
            .or_else(|| header_str(&resp, header::LAST_MODIFIED));
        let final_url = resp.get_uri().to_string();
        Ok(Self {
            agent,
            url: final_url,
            validator,
            body: Some(resp.into_body().into_reader()),
            pos: 0,
            len,
            limit,
            resumes: 0,
        })
    }

    /// The size the server declared, if it did.
    pub fn declared_len(&self) -> Option<u64> {
        self.len
    }

    /// Asks for the rest from `pos` on.
    fn resume(&mut self, cause: io::Error) -> Result<(), DownloadError> {
        self.body = None;
        if self.resumes >= MAX_RESUMES {
            return Err(DownloadError::Interrupted {
                url: self.url.clone(),
                at: self.pos,
                attempts: self.resumes,
                source: cause,
            });
        }
        self.resumes += 1;
        std::thread::sleep(Duration::from_millis(200 * u64::from(self.resumes)));
        let no_resume = |why| DownloadError::NoResume {
            url: self.url.clone(),
            at: self.pos,
            why,
        };
        let Some(validator) = &self.validator else {
            return Err(no_resume(
                "it names no ETag or Last-Modified to resume against",
            ));
        };
        let mut req = self
            .agent
            .get(&self.url)
            .header(header::RANGE, format!("bytes={}-", self.pos))
            .header(header::IF_RANGE, validator.as_str());
        // Resume against the same representation only.
        req = req.header(header::ACCEPT_ENCODING, "identity");
        let resp = match req.call() {
            Ok(r) => r,
            // The connection may still be down: count it and try again.
            Err(e) => return self.resume(io::Error::other(e)),
        };
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {}
            StatusCode::OK => {
                return Err(no_resume("the file changed or ranges are not supported"));
            }
            s if s.is_server_error() => {
                return self.resume(io::Error::other(format!("HTTP {s}")));
            }
            s => {
                return Err(DownloadError::Status {
                    url: self.url.clone(),
                    status: s.as_u16(),
                });
            }
        }
        // Content-Range: bytes START-END/TOTAL must start where we are.
        let range = header_str(&resp, header::CONTENT_RANGE).unwrap_or_default();
        let start = range
            .strip_prefix("bytes ")
            .and_then(|r| r.split('-').next())
            .and_then(|s| s.parse::<u64>().ok());
        if start != Some(self.pos) {
            return Err(no_resume("it answered another byte range"));
        }
        self.body = Some(resp.into_body().into_reader());
        Ok(())
    }
}

impl Read for Download {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let Some(body) = self.body.as_mut() else {
                return Ok(0);
            };
            let cause = match body.read(buf) {
                Ok(0) if self.len.is_some_and(|l| self.pos < l) => {
                    io::Error::from(io::ErrorKind::UnexpectedEof)
                }
                Ok(0) => return Ok(0),
                Ok(n) => {
                    self.pos += n as u64;
                    if self.pos > self.limit {
                        return Err(DownloadError::TooLarge {
                            url: self.url.clone(),
                            limit: self.limit,
                        }
                        .into_io());
                    }
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => e,
            };
            self.resume(cause).map_err(DownloadError::into_io)?;
        }
    }
}
