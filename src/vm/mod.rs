//! The VM model and its lifecycle actions. The CLI and the HTTP API both
//! build an [`Action`] and hand it to [`execute`]; nothing else changes VMs.

pub mod actions;
pub mod caller;
pub mod config;
pub mod details;
pub mod location;
pub mod lock;
pub mod name;
pub mod size;
pub mod snapshot;
pub mod state;
pub mod store;

pub use actions::{Action, Context, CreateSpec, Outcome, RunSpec, SetSpec, VmError, execute};
pub use caller::Caller;
pub use name::VmName;

/// Which door an error is told through: each names its own commands
/// (CLI commands and flags, REST routes and fields, MCP tools and
/// arguments). Used by the errors whose "what to do next" names one
/// (snapshots, network policies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    Cli,
    Api,
    Mcp,
}
