//! lume: a virtual-machine manager for Linux hosts on QEMU, with networking
//! that keeps working. See README.md for the architecture.

pub mod api;
pub mod cli;
pub mod compat;
pub mod firewall;
pub mod guest;
pub mod hypervisor;
pub mod image;
pub mod mcp;
pub mod network;
pub mod registry;
pub mod settings;
pub mod util;
pub mod vm;

/// An error and its causes on one line: `outer: inner: innermost`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = c.source();
    }
    s
}

/// Writes `e` to standard error as lume's commands end with it: `Error: `
/// and its message, then each cause its message does not already contain.
pub fn print_error(e: &dyn std::error::Error) {
    let top = e.to_string();
    eprintln!("Error: {top}");
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !top.contains(&msg) {
            eprintln!("  Caused by: {msg}");
        }
        cur = c.source();
    }
}
