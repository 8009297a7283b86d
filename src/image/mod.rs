//! Disk images: formats (our own header parser), where an image comes from
//! (a host path or an http(s) URL), the download, and the import into a VM's
//! raw disk.

pub mod download;
pub mod format;
pub mod import;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Where `--image` takes a disk from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource {
    /// A file on the host, opened with the caller's rights.
    Path(PathBuf),
    /// An `http://` or `https://` URL, downloaded by lume.
    Url(String),
}

/// Why an `--image` value or a checksum is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error(
        "Image URL scheme '{0}' is not supported: give an http:// or https:// URL, or the path of a local file"
    )]
    Scheme(String),
    #[error("Image URL '{0}' is not a valid URL: give an http:// or https:// URL with a host")]
    BadUrl(String),
    #[error("The image path is empty: give a file path or an http(s) URL")]
    Empty,
    #[error(
        "'{0}' is not a SHA-256 checksum: give 64 hexadecimal digits (as printed by sha256sum)"
    )]
    BadSha256(String),
}

impl ImageSource {
    /// Whether lume downloads this image.
    pub fn is_url(&self) -> bool {
        matches!(self, Self::Url(_))
    }
}

impl FromStr for ImageSource {
    type Err = SourceError;

    /// A value with `scheme://` is a URL (http and https only); anything
    /// else is a path.
    fn from_str(s: &str) -> Result<Self, SourceError> {
        if s.is_empty() {
            return Err(SourceError::Empty);
        }
        let Some((scheme, _)) = s.split_once("://") else {
            return Ok(Self::Path(PathBuf::from(s)));
        };
        let valid_scheme = !scheme.is_empty()
            && scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
        if !valid_scheme {
            // Such as "./a://b": a path after all.
            return Ok(Self::Path(PathBuf::from(s)));
        }
        match scheme.to_ascii_lowercase().as_str() {
            "http" | "https" => {}
            other => return Err(SourceError::Scheme(other.to_string())),
        }
        let uri: ureq::http::Uri = s.parse().map_err(|_| SourceError::BadUrl(s.into()))?;
        if uri.host().is_none_or(str::is_empty) {
            return Err(SourceError::BadUrl(s.into()));
        }
        Ok(Self::Url(s.to_string()))
    }
}

impl fmt::Display for ImageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Path(p) => write!(f, "{}", p.display()),
            Self::Url(u) => f.write_str(u),
        }
    }
}

/// An expected SHA-256 digest (`--image-sha256`).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sha256Digest(pub [u8; 32]);

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl FromStr for Sha256Digest {
    type Err = SourceError;

    fn from_str(s: &str) -> Result<Self, SourceError> {
        let t = s.trim();
        let bad = || SourceError::BadSha256(s.to_string());
        if t.len() != 64 || !t.is_ascii() {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        for (i, o) in out.iter_mut().enumerate() {
            *o = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(Self(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_paths_or_http_urls_only() {
        let p = |s: &str| s.parse::<ImageSource>();
        assert_eq!(p("/a/b.qcow2"), Ok(ImageSource::Path("/a/b.qcow2".into())));
        assert_eq!(p("rel.img"), Ok(ImageSource::Path("rel.img".into())));
        assert!(p("https://example.org/d.raw.xz").unwrap().is_url());
        assert!(p("HTTP://192.0.2.1:8080/d").unwrap().is_url());
        for bad in ["file:///etc/shadow", "ftp://h/x", "gopher://h/", "data://x"] {
            assert!(matches!(p(bad), Err(SourceError::Scheme(_))), "{bad}");
        }
        assert!(matches!(p("http:///nohost"), Err(SourceError::BadUrl(_))));
        assert!(matches!(p("http://a b/"), Err(SourceError::BadUrl(_))));
        assert_eq!(p(""), Err(SourceError::Empty));
    }

    #[test]
    fn sha256_is_64_hex_digits() {
        let hex = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let d: Sha256Digest = hex.parse().unwrap();
        assert_eq!(d.to_string(), hex);
        assert_eq!(
            hex.to_uppercase()
                .parse::<Sha256Digest>()
                .unwrap()
                .to_string(),
            hex
        );
        assert!(hex[1..].parse::<Sha256Digest>().is_err());
        assert!(format!("{}g", &hex[1..]).parse::<Sha256Digest>().is_err());
        assert!("é".repeat(32).parse::<Sha256Digest>().is_err());
    }
}
