//! Why one of lume's requests to a registry failed, as the wire saw it
//! ([`super::wire`], [`super::token`]); [`super::classify`] sorts it into
//! a [`super::RegistryError`].
//!
//! The distribution API's error envelope
//! (`{"errors":[{"code":…,"message":…}]}`) is read with the small serde
//! types here: lume acts on a handful of its codes only.

/// Why a request to a registry failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestFailure {
    /// No answer, or a broken one: the connection, TLS, a timeout, a body
    /// cut off. reqwest's error says which (`is_connect`, `is_timeout`;
    /// a TLS handshake with a plain-HTTP server in its source chain).
    #[error(transparent)]
    Transport(#[from] reqwest::Error),
    /// The registry answered with a failure status and a distribution
    /// error envelope (at least one entry).
    #[error("Registry error: url {url}, envelope: {envelope}")]
    Errors {
        status: u16,
        url: String,
        envelope: Envelope,
    },
    /// The registry answered with a failure status and no envelope:
    /// `body` is what was read of its answer (bounded by the caller).
    #[error("Server error: url {url}, code: {status}, message: {body}")]
    Status {
        status: u16,
        url: String,
        body: String,
    },
}

impl RequestFailure {
    /// The failure for an answer of `status` from `url` whose body began
    /// with `body`: its envelope when it is one with entries, else the
    /// status and the text.
    pub fn answer(status: u16, url: String, body: &[u8]) -> Self {
        match serde_json::from_slice::<Envelope>(body) {
            Ok(envelope) if !envelope.errors.is_empty() => Self::Errors {
                status,
                url,
                envelope,
            },
            _ => Self::Status {
                status,
                url,
                body: String::from_utf8_lossy(body).into_owned(),
            },
        }
    }
}

/// The distribution API's error answer.
#[derive(Debug, serde::Deserialize)]
pub struct Envelope {
    pub errors: Vec<ApiError>,
}

/// One entry of an [`Envelope`] (its `detail` is not read).
#[derive(Debug, serde::Deserialize)]
pub struct ApiError {
    pub code: ErrorCode,
    #[serde(default)]
    pub message: String,
}

/// The codes lume acts on; any other is kept as it came.
#[derive(Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    ManifestUnknown,
    NameUnknown,
    NotFound,
    Unauthorized,
    Denied,
    #[serde(untagged)]
    Other(String),
}

impl ErrorCode {
    /// The repository, the tag or the manifest does not exist.
    pub fn not_found(&self) -> bool {
        matches!(
            self,
            Self::ManifestUnknown | Self::NameUnknown | Self::NotFound
        )
    }

    /// The credentials (or their absence) were refused.
    pub fn refused(&self) -> bool {
        matches!(self, Self::Unauthorized | Self::Denied)
    }
}

impl std::fmt::Display for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let errors: Vec<String> = self
            .errors
            .iter()
            .map(|e| format!("OCI API error: {}", e.message))
            .collect();
        write!(f, "OCI API errors: [{}]", errors.join("\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_and_other_answers() {
        let f = RequestFailure::answer(
            404,
            "https://r/v2/a/manifests/x".into(),
            br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{"Tag":"x"}},{"code":"ARTIFACT_LOCKED"}]}"#,
        );
        let RequestFailure::Errors { envelope, .. } = &f else {
            panic!("{f:?}");
        };
        assert_eq!(envelope.errors[0].code, ErrorCode::ManifestUnknown);
        assert!(envelope.errors[0].code.not_found());
        assert_eq!(
            envelope.errors[1].code,
            ErrorCode::Other("ARTIFACT_LOCKED".into())
        );
        assert_eq!(
            f.to_string(),
            "Registry error: url https://r/v2/a/manifests/x, envelope: OCI API errors: [OCI API error: manifest unknown\nOCI API error: ]"
        );
        // No entries, or not an envelope: the status and the text.
        for body in [&br#"{"errors":[]}"#[..], b"<html>busy</html>", b""] {
            let f = RequestFailure::answer(503, "https://r/v2/".into(), body);
            assert!(
                matches!(&f, RequestFailure::Status { status: 503, body: b, .. } if b.as_bytes() == body),
                "{f:?}"
            );
        }
        assert_eq!(
            RequestFailure::answer(500, "https://r/v2/".into(), b"oops").to_string(),
            "Server error: url https://r/v2/, code: 500, message: oops"
        );
    }
}
