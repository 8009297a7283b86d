//! `POST /lume/network/handoff`: the privileged half of a user's `nat`,
//! `host` or `bridged` network ([`crate::network::handoff`]). Served only on
//! the Unix socket, for the process on the other end (`SO_PEERCRED`), as
//! the caller [`super::auth`] admitted (root, the server's user, a member
//! of the API group). Not in the OpenAPI document: lume's own CLI is its
//! only client.

use axum::Json;
use axum::extract::ConnectInfo;
use axum::http::StatusCode;

use super::error::ApiError;
use super::extract::{JsonBody, Who};
use super::peer::Connection;
use crate::network::handoff::{self, Handed, HandoffRequest, KeeperAnswer, RequestError};

fn refusal(e: &RequestError) -> ApiError {
    ApiError::new(
        StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST),
        e.to_string(),
    )
}

pub async fn handoff_network(
    Who(caller): Who,
    ConnectInfo(conn): ConnectInfo<Connection>,
    JsonBody(req): JsonBody<HandoffRequest>,
) -> Result<Json<Handed>, ApiError> {
    // The kernel's word on who is calling, and which process: the caller
    // admitted for this connection must be that same uid.
    let Some((uid, pid, fd)) = conn.unix_peer().filter(|(uid, ..)| *uid == caller.uid) else {
        return Err(refusal(&RequestError::NotUnix));
    };
    // The connection (and so `fd`) lives until this handler's answer is
    // written: hyper serves one request at a time on it.
    let answer = tokio::task::spawn_blocking(move || handoff::serve_request(uid, pid, fd, &req))
        .await
        .map_err(|e| ApiError::internal(&e))?;
    match answer {
        Ok(KeeperAnswer::Ok(handed)) => {
            super::log(&format!(
                "Network hand-off for uid {uid} (pid {pid}): tap {}",
                handed.device
            ));
            Ok(Json(handed))
        }
        Ok(KeeperAnswer::Refused { status, message }) => Err(ApiError::new(
            StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            message,
        )),
        Err(e) => Err(refusal(&e)),
    }
}
