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
use std::net::{IpAddr, SocketAddr};
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
    #[error(
        "{url} leads to {addr}, a loopback, link-local or private address, which image URLs given through the API may not reach: use a public address, or let the server's owner allow it with `lume config set apiPrivateImageUrls true`"
    )]
    PrivateDestination { url: String, addr: IpAddr },
}

/// Which addresses a download may connect to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Destinations {
    /// Any address (the CLI: the user could fetch it themselves).
    #[default]
    Any,
    /// Public addresses only: no loopback, link-local, private (RFC 1918,
    /// unique local, shared 100.64/10), unspecified, broadcast or multicast
    /// address, checked on every connection (redirects and resumes
    /// included) after name resolution, so neither a redirect nor a DNS
    /// answer can lead elsewhere. For URLs that come through the API.
    PublicOnly,
}

/// Whether `ip` is an address an API caller's image URL may not reach.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                // Benchmarking (198.18/15) and the reserved 240/4.
                || (o[0] == 198 && (o[1] & 0xfe) == 18)
                || o[0] >= 240
                // IETF protocol assignments (DS-Lite, NAT64 discovery) and
                // the deprecated 6to4 relay anycast.
                || (o[0], o[1], o[2]) == (192, 0, 0)
                || (o[0], o[1], o[2]) == (192, 88, 99)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_private(IpAddr::V4(v4));
            }
            let seg = v6.segments();
            let embedded = |hi: u16, lo: u16| {
                is_private(IpAddr::V4(std::net::Ipv4Addr::from(
                    (u32::from(hi) << 16) | u32::from(lo),
                )))
            };
            // Addresses that carry an IPv4 address a gateway may lead to:
            // IPv4-compatible (::a.b.c.d), NAT64 (64:ff9b::/96), 6to4
            // (2002:AABB:CCDD::/48).
            if seg[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified() {
                return embedded(seg[6], seg[7]);
            }
            if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                return embedded(seg[6], seg[7]);
            }
            // IPv4-translated (::ffff:0:a.b.c.d).
            if seg[..6] == [0, 0, 0, 0, 0xffff, 0] {
                return embedded(seg[6], seg[7]);
            }
            // Only global unicast (2000::/3) is public; within it Teredo
            // (2001::/32), benchmarking (2001:2::/48) and ORCHID
            // (2001:10::/28) are not. The documentation prefix 2001:db8::/32
            // stays public, as the IPv4 documentation ranges do: lume's own
            // tests stand for the internet with them.
            if seg[0] & 0xe000 != 0x2000
                || seg[..2] == [0x2001, 0]
                || seg[..3] == [0x2001, 2, 0]
                || (seg[0] == 0x2001 && (seg[1] & 0xfff0) == 0x10)
            {
                return true;
            }
            if seg[0] == 0x2002 {
                return embedded(seg[1], seg[2]);
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00
                || (seg[0] & 0xffc0) == 0xfe80
                // Local-use NAT64 (64:ff9b:1::/48), discard-only (100::/64).
                || seg[..3] == [0x64, 0xff9b, 1]
                || seg[..4] == [0x100, 0, 0, 0]
        }
    }
}

/// The address a [`PublicResolver`] refused, carried inside ureq's I/O error.
#[derive(Debug, thiserror::Error)]
#[error("Refused private address {0}")]
struct Refused(IpAddr);

/// ureq's resolver, keeping only public addresses ([`Destinations::PublicOnly`]).
#[derive(Debug, Default)]
struct PublicResolver(ureq::unversioned::resolver::DefaultResolver);

impl ureq::unversioned::resolver::Resolver for PublicResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ureq::unversioned::resolver::ResolvedSocketAddrs, ureq::Error> {
        let all = self.0.resolve(uri, config, timeout)?;
        let mut kept = self.empty();
        let mut refused: Option<SocketAddr> = None;
        for a in all.iter() {
            if is_private(a.ip()) {
                refused.get_or_insert(*a);
            } else {
                kept.push(*a);
            }
        }
        match refused {
            // One private answer refuses the name: a host that resolves to
            // both is a rebinding attempt as likely as a mistake.
            Some(a) => Err(ureq::Error::Io(io::Error::new(
                io::ErrorKind::PermissionDenied,
                Refused(a.ip()),
            ))),
            None => Ok(kept),
        }
    }
}

/// A failed request as a [`DownloadError`].
fn request_error(url: &str, source: ureq::Error) -> DownloadError {
    match refused_addr(&source) {
        Some(addr) => DownloadError::PrivateDestination {
            url: url.to_string(),
            addr,
        },
        None => DownloadError::Request {
            url: url.to_string(),
            source,
        },
    }
}

/// The refused address inside a ureq error, if that is why it failed.
fn refused_addr(e: &ureq::Error) -> Option<IpAddr> {
    match e {
        ureq::Error::Io(io) => io
            .get_ref()
            .and_then(|i| i.downcast_ref::<Refused>())
            .map(|r| r.0),
        _ => None,
    }
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

fn agent(dest: Destinations) -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(MAX_REDIRECTS)
        .max_redirects_will_error(true)
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .timeout_per_read(Some(READ_TIMEOUT))
        .user_agent(concat!("lume/", env!("CARGO_PKG_VERSION")));
    match dest {
        Destinations::Any => config.build().into(),
        // No proxy from the environment here: it would be the proxy's
        // address that is checked, not the destination's.
        Destinations::PublicOnly => ureq::Agent::with_parts(
            config.proxy(None).build(),
            ureq::unversioned::transport::DefaultConnector::new(),
            PublicResolver::default(),
        ),
    }
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
    pub fn open(url: &str, limit: u64, dest: Destinations) -> Result<Self, DownloadError> {
        let agent = agent(dest);
        let resp = agent
            .get(url)
            .call()
            .map_err(|source| request_error(url, source))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_addresses_are_told_from_public_ones() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.64.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "::10.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::1",
            "2002:7f00:1::1",
            "2002:c0a8:101::1",
            "100::1",
            "198.18.0.1",
            "198.19.255.254",
            "240.0.0.1",
            "192.0.0.170",
            "192.88.99.1",
            "::ffff:0:7f00:1",
            "::ffff:0:a00:1",
            "fec0::1",
            "5f00::1",
            "2001::1",
            "2001:2::1",
            "2001:10::1",
        ] {
            assert!(is_private(a.parse().unwrap()), "{a}");
        }
        for a in [
            "192.0.2.80",
            "203.0.113.1",
            "8.8.8.8",
            "2001:db8::1",
            "172.32.0.1",
            "64:ff9b::808:808",
            "2002:808:808::1",
            "198.20.0.1",
            "2a00:1450:4001::1",
            "2606:4700::1111",
        ] {
            assert!(!is_private(a.parse().unwrap()), "{a}");
        }
    }
}
