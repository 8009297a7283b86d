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

/// Whether a `Content-Type` is JSON (`application/json`, parameters allowed).
fn is_json(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|media| media.trim().eq_ignore_ascii_case("application/json"))
}

/// Whether a request body is acceptable as JSON. With an `Origin` header
/// (a browser: the CSRF defence) it must be declared JSON, so that a web
/// page cannot send one: the content types a page may send without the
/// browser asking first (forms, `text/plain`) are refused with 415, and so
/// is a non-empty body without any. Without `Origin` (curl, whose `-d` says
/// form, python's `requests` with `data=`), a body that parses as JSON is
/// taken whatever its content type, as lume's server does. An empty body
/// without a content type is no body at all.
pub fn check_content_type(
    content_type: Option<&str>,
    origin: bool,
    body: &[u8],
) -> Result<(), ApiError> {
    match content_type {
        Some(ct) if is_json(ct) => return Ok(()),
        None if body.is_empty() => return Ok(()),
        _ => {}
    }
    if !origin && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_ok() {
        return Ok(());
    }
    let given = content_type.unwrap_or("none");
    Err(ApiError::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        if origin {
            format!(
                "The request body must be JSON: a request with an Origin header (from a browser) must send the header 'Content-Type: application/json' (the request's Content-Type: {given})"
            )
        } else {
            format!(
                "The request body must be JSON: send a JSON object, with the header 'Content-Type: application/json' (the request's Content-Type: {given})"
            )
        },
    ))
}

async fn body_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    let content_type = req
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("?").to_string());
    let origin = req.headers().contains_key(axum::http::header::ORIGIN);
    // A caller must send the whole body promptly: a connection that holds
    // a request open by trickling (or never sending) its body is answered
    // 408 and closed.
    let timeout = super::listen::Limits::from_env().header_timeout;
    let read = tokio::time::timeout(timeout, Bytes::from_request(req, state))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "The request body did not arrive within {} ms: send the whole body (Content-Length bytes) with the request",
                    timeout.as_millis()
                ),
            )
        })?;
    let bytes = read.map_err(|r| {
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
    })?;
    check_content_type(content_type.as_deref(), origin, &bytes)?;
    Ok(bytes)
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

    #[test]
    fn bodies_from_browsers_must_be_declared_json() {
        for ok in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
        ] {
            for origin in [true, false] {
                assert!(check_content_type(Some(ok), origin, b"{}").is_ok(), "{ok}");
                assert!(check_content_type(Some(ok), origin, b"").is_ok(), "{ok}");
            }
        }
        assert!(check_content_type(None, true, b"").is_ok());
        assert!(check_content_type(None, false, b"").is_ok());
        for bad in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/jsonx",
        ] {
            // A browser (Origin): refused even when the body is JSON.
            let e = check_content_type(Some(bad), true, b"{}").unwrap_err();
            assert_eq!(e.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{bad}");
            assert!(e.message.contains(bad), "{}", e.message);
            // A program (no Origin): JSON is JSON, whatever the header says.
            assert!(check_content_type(Some(bad), false, b"{\"a\": 1}").is_ok());
            let e = check_content_type(Some(bad), false, b"a=1").unwrap_err();
            assert_eq!(e.status, StatusCode::UNSUPPORTED_MEDIA_TYPE, "{bad}");
        }
        let e = check_content_type(None, true, b"{}").unwrap_err();
        assert!(e.message.contains("Content-Type: none"), "{}", e.message);
        assert!(check_content_type(None, false, b"{}").is_ok());
    }

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
