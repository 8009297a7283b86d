//! Request extractors whose every rejection is a JSON [`ApiError`]: the VM
//! name in the path, the query string, and size-limited JSON bodies.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::StatusCode;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::ApiError;
use crate::vm::{Caller, VmName};

/// The caller of this request, as [`super::auth::authorize`] decided it.
/// Without that decision the request is refused (never served as root).
#[derive(Debug, Clone)]
pub struct Who(pub Caller);

impl<S: Send + Sync> FromRequestParts<S> for Who {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .map(Who)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::FORBIDDEN,
                    "Cannot tell who is calling: the request is refused",
                )
            })
    }
}

/// The largest request body accepted.
pub const BODY_LIMIT: usize = 64 * 1024;

/// The `{name}` of a VM route, validated as a VM name (so `..%2Fx` is a 400).
#[derive(Debug)]
pub struct VmPath(pub VmName);

impl<S: Send + Sync> FromRequestParts<S> for VmPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|r| ApiError::new(r.status(), r.body_text()))?;
        VmName::parse(&raw)
            .map(VmPath)
            .map_err(|e| ApiError::bad_request(e.to_string()))
    }
}

/// A query string, parsed into `T`.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(q)| ApiQuery(q))
            .map_err(|r| ApiError::bad_request(r.body_text()))
    }
}

/// A JSON body that must be there.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

/// A JSON body that may be left out (an empty body is `T::default()`).
#[derive(Debug)]
pub struct OptionalJsonBody<T>(pub T);

async fn body_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "Request body too large: at most {} KiB is accepted",
                    BODY_LIMIT / 1024
                ),
            )
        } else {
            ApiError::new(r.status(), r.body_text())
        }
    })
}

/// Parses a JSON body; `None` when it is empty.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<Option<T>, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(bytes).map(Some).map_err(|e| {
        ApiError::bad_request(match e.classify() {
            serde_json::error::Category::Data => format!("Invalid request body: {e}"),
            _ => format!("Malformed JSON in the request body: {e}"),
        })
    })
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = body_bytes(req, state).await?;
        parse_json(&bytes)?
            .map(JsonBody)
            .ok_or_else(|| ApiError::bad_request("The request body is empty: send a JSON object"))
    }
}

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = body_bytes(req, state).await?;
        Ok(OptionalJsonBody(parse_json(&bytes)?.unwrap_or_default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize, PartialEq)]
    struct Sample {
        name: String,
    }

    #[test]
    fn malformed_and_invalid_bodies_are_told_apart() {
        let e = parse_json::<Sample>(b"{\"name\":").unwrap_err();
        assert!(e.message.starts_with("Malformed JSON"), "{}", e.message);
        let e = parse_json::<Sample>(b"{}").unwrap_err();
        assert!(e.message.contains("missing field `name`"), "{}", e.message);
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(parse_json::<Sample>(b" \n").unwrap(), None);
        assert_eq!(
            parse_json::<Sample>(b"{\"name\":\"a\"}").unwrap(),
            Some(Sample { name: "a".into() })
        );
    }
}
