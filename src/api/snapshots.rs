//! `/lume/vms/{name}/snapshots…`: the REST door onto `lume snapshot`
//! (docs/snapshots.md). Every route goes through [`on_vm`], so who may
//! touch the VM is checked as for the other VM routes.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::extract::{ApiQuery, OptionalJsonBody, VmPath, Who};
use super::routes::{Message, StorageQuery, on_vm, run, unexpected};
use crate::vm::actions::SnapshotOp;
use crate::vm::details::VmDetails;
use crate::vm::snapshot::Snapshot;
use crate::vm::{Action, Outcome, VmName};

type ApiResult<T> = Result<T, ApiError>;

/// `POST /lume/vms/{name}/snapshots` (the body may be left out).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateSnapshotRequest {
    /// The snapshot's name (default: `snapshot-<unix time>`): 1 to 64
    /// letters, digits, '.', '_' or '-', starting with a letter or digit.
    pub name: Option<String>,
    /// Also save the running VM's memory.
    #[serde(default)]
    pub memory: bool,
    pub storage: Option<String>,
}

/// The answer to a restore: the VM's details afterwards.
#[derive(Debug, Serialize, ToSchema)]
pub struct Restored {
    pub message: String,
    pub snapshot: Snapshot,
    pub vm: VmDetails,
}

fn snap_path(vm: &str, snap: &str) -> ApiResult<(VmName, String)> {
    let vm = VmName::parse(vm).map_err(|e| ApiError::bad_request(e.to_string()))?;
    crate::vm::snapshot::validate_name(snap).map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok((vm, snap.to_string()))
}

/// A VM's snapshots, oldest first (`lume snapshot list NAME -f json`).
#[utoipa::path(get, path = "/lume/vms/{name}/snapshots", tag = "snapshots",
    params(("name" = String, Path, description = "VM name"), StorageQuery),
    responses(
        (status = 200, description = "The VM's snapshots", body = [Snapshot]),
        (status = 400, description = "Invalid name", body = ErrorBody),
        (status = 404, description = "No such VM", body = ErrorBody),
    ))]
pub async fn list_snapshots(
    State(st): State<Arc<AppState>>,
    Who(caller): Who,
    VmPath(vm): VmPath,
    ApiQuery(q): ApiQuery<StorageQuery>,
) -> ApiResult<Json<Vec<Snapshot>>> {
    let name = vm.clone();
    match on_vm(&st, &caller, q.storage.as_deref(), &vm, move |ctx| {
        run(
            ctx,
            Action::Snapshot {
                name,
                op: SnapshotOp::List,
            },
        )
    })
    .await?
    {
        Outcome::Snapshots(s) => Ok(Json(s)),
        o => Err(unexpected(&o)),
    }
}

/// Take a snapshot (`lume snapshot create`): of the disk (a running VM
/// needs its guest agent to freeze its filesystems), or with `memory` of
/// the whole running VM.
#[utoipa::path(post, path = "/lume/vms/{name}/snapshots", tag = "snapshots",
    params(("name" = String, Path, description = "VM name"), StorageQuery),
    request_body(content = Option<CreateSnapshotRequest>, description = "Optional", content_type = "application/json"),
    responses(
        (status = 201, description = "Taken", body = Snapshot),
        (status = 400, description = "Invalid name, an unknown field", body = ErrorBody),
        (status = 404, description = "No such VM", body = ErrorBody),
        (status = 409, description = "The VM is starting, runs ephemeral, has no guest agent (without memory), is stopped (with memory), or the name is taken", body = ErrorBody),
        (status = 500, description = "It failed", body = ErrorBody),
    ))]
pub async fn create_snapshot(
    State(st): State<Arc<AppState>>,
    Who(caller): Who,
    VmPath(vm): VmPath,
    ApiQuery(q): ApiQuery<StorageQuery>,
    OptionalJsonBody(r): OptionalJsonBody<CreateSnapshotRequest>,
) -> ApiResult<(StatusCode, Json<Snapshot>)> {
    if let Some(s) = &r.name {
        crate::vm::snapshot::validate_name(s).map_err(|e| ApiError::bad_request(e.to_string()))?;
    }
    let storage = r.storage.as_deref().or(q.storage.as_deref());
    let name = vm.clone();
    let op = SnapshotOp::Create {
        snap: r.name,
        memory: r.memory,
    };
    match on_vm(&st, &caller, storage, &vm, move |ctx| {
        run(ctx, Action::Snapshot { name, op })
    })
    .await?
    {
        Outcome::SnapshotTaken(s) => Ok((StatusCode::CREATED, Json(s))),
        o => Err(unexpected(&o)),
    }
}

/// Put the VM back to a snapshot (`lume snapshot restore`): a running VM
/// is forced off first; a memory snapshot (or a VM that was running) is
/// started again, a memory snapshot resuming where it was.
#[utoipa::path(post, path = "/lume/vms/{name}/snapshots/{snapshot}/restore", tag = "snapshots",
    params(("name" = String, Path, description = "VM name"),
           ("snapshot" = String, Path, description = "Snapshot name"), StorageQuery),
    responses(
        (status = 200, description = "Restored", body = Restored),
        (status = 400, description = "Invalid name", body = ErrorBody),
        (status = 404, description = "No such VM or snapshot", body = ErrorBody),
        (status = 409, description = "Busy; the VM runs ephemeral; a memory snapshot whose CPUs, memory or network mode differ from the VM's now, or whose address another running VM has", body = ErrorBody),
        (status = 500, description = "It failed", body = ErrorBody),
    ))]
pub async fn restore_snapshot(
    State(st): State<Arc<AppState>>,
    Who(caller): Who,
    Path((vm, snap)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<StorageQuery>,
) -> ApiResult<Json<Restored>> {
    let (vm, snap) = snap_path(&vm, &snap)?;
    let name = vm.clone();
    match on_vm(&st, &caller, q.storage.as_deref(), &vm, move |ctx| {
        let o = run(
            ctx,
            Action::Snapshot {
                name: name.clone(),
                op: SnapshotOp::Restore { snap },
            },
        );
        // A started supervisor is this server's child: reap it when it exits.
        super::reap_supervisor(&ctx.store, &name);
        o
    })
    .await?
    {
        Outcome::SnapshotRestored { snapshot, details } => Ok(Json(Restored {
            message: format!("VM restored to snapshot '{}'", snapshot.name),
            snapshot,
            vm: details,
        })),
        o => Err(unexpected(&o)),
    }
}

/// Delete a snapshot (`lume snapshot delete`); the others and the VM's
/// disk stay as they are.
#[utoipa::path(delete, path = "/lume/vms/{name}/snapshots/{snapshot}", tag = "snapshots",
    params(("name" = String, Path, description = "VM name"),
           ("snapshot" = String, Path, description = "Snapshot name"), StorageQuery),
    responses(
        (status = 200, description = "Deleted", body = Message),
        (status = 400, description = "Invalid name", body = ErrorBody),
        (status = 404, description = "No such VM or snapshot", body = ErrorBody),
        (status = 409, description = "Another snapshot command runs", body = ErrorBody),
    ))]
pub async fn delete_snapshot(
    State(st): State<Arc<AppState>>,
    Who(caller): Who,
    Path((vm, snap)): Path<(String, String)>,
    ApiQuery(q): ApiQuery<StorageQuery>,
) -> ApiResult<Json<Message>> {
    let (vm, snap) = snap_path(&vm, &snap)?;
    let name = vm.clone();
    match on_vm(&st, &caller, q.storage.as_deref(), &vm, move |ctx| {
        run(
            ctx,
            Action::Snapshot {
                name,
                op: SnapshotOp::Delete { snap },
            },
        )
    })
    .await?
    {
        Outcome::SnapshotDeleted { name, snap } => Ok(Json(Message::new(format!(
            "Snapshot '{snap}' of VM '{name}' deleted"
        )))),
        o => Err(unexpected(&o)),
    }
}

/// Merge a stopped VM's layered disk into a plain `disk.img` (`lume
/// snapshot flatten`): refused while the VM runs or has snapshots.
#[utoipa::path(post, path = "/lume/vms/{name}/flatten", tag = "snapshots",
    params(("name" = String, Path, description = "VM name"), StorageQuery),
    responses(
        (status = 200, description = "Flattened (or plain already)", body = Message),
        (status = 400, description = "Invalid name", body = ErrorBody),
        (status = 404, description = "No such VM", body = ErrorBody),
        (status = 409, description = "The VM runs, or has snapshots", body = ErrorBody),
        (status = 500, description = "It failed", body = ErrorBody),
    ))]
pub async fn flatten_vm(
    State(st): State<Arc<AppState>>,
    Who(caller): Who,
    VmPath(vm): VmPath,
    ApiQuery(q): ApiQuery<StorageQuery>,
) -> ApiResult<Json<Message>> {
    let name = vm.clone();
    match on_vm(&st, &caller, q.storage.as_deref(), &vm, move |ctx| {
        run(
            ctx,
            Action::Snapshot {
                name,
                op: SnapshotOp::Flatten,
            },
        )
    })
    .await?
    {
        Outcome::Flattened { name, layers } => Ok(Json(Message::new(if layers == 0 {
            format!("VM '{name}' has a plain disk already: nothing to flatten")
        } else {
            format!("VM '{name}' flattened: {layers} layer(s) merged into a plain disk.img")
        }))),
        o => Err(unexpected(&o)),
    }
}
