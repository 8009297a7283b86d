//! lume's options, fields, commands and routes that lume on Linux refuses,
//! and why, in the words both doors (CLI and API) use. Every refusal names
//! what was refused; docs/compatibility.md lists them all.

/// Refused because it needs macOS.
pub const MACOS_ONLY: &str = "it is for macOS guests, which need an Apple host";

/// Refused because lume on Linux does not have it (yet).
pub const NOT_YET: &str = "not yet implemented";
