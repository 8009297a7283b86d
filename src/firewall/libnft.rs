//! nftables through libnftables, the library the `nft` command is built
//! on, loaded at run time (`libnftables.so.1`, installed with nftables).
//!
//! Why not an `nft` process per command: each costs a process start and,
//! after a transaction that deleted anything (lume's table is replaced
//! whole: `add table; delete table; table { ... }`), the kernel holds the
//! process's exit until an RCU grace period has passed, when it closes its
//! netfilter socket — about 10 ms here, before QEMU may start. One context
//! per process keeps its socket open: a command takes well under a
//! millisecond, and the grace period passes while lume goes on.
//!
//! The same commands and the same text as `nft` (the command is a thin
//! front end to this library), in the calling thread's network namespace
//! (a context per namespace); where the library cannot be loaded the
//! caller runs `nft` instead ([`run`] returns `None`).
//!
//! The library opens its netlink socket without `SOCK_CLOEXEC`: lume marks
//! it close-on-exec at once, and the children that face guests (QEMU,
//! dnsmasq, passt, virtiofsd) also mark every descriptor they were not
//! handed close-on-exec before their exec ([`crate::util::fds`]), so none
//! of them can hold a socket that changes the host's firewall with root's
//! rights.

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::os::unix::fs::MetadataExt;
use std::sync::{Mutex, OnceLock};

/// `NFT_CTX_OUTPUT_STATELESS` in `<nftables/libnftables.h>`.
pub const OUTPUT_STATELESS: c_uint = 1 << 2;
/// `NFT_CTX_OUTPUT_HANDLE`.
pub const OUTPUT_HANDLE: c_uint = 1 << 3;
/// `NFT_CTX_OUTPUT_JSON`.
pub const OUTPUT_JSON: c_uint = 1 << 4;

/// `NETLINK_NETFILTER` (`<linux/netlink.h>`).
const NETLINK_NETFILTER: c_int = 12;

type CtxNew = unsafe extern "C" fn(u32) -> *mut c_void;
type CtxInt = unsafe extern "C" fn(*mut c_void) -> c_int;
type CtxStr = unsafe extern "C" fn(*mut c_void) -> *const c_char;
type CtxSetFlags = unsafe extern "C" fn(*mut c_void, c_uint);
type RunCmd = unsafe extern "C" fn(*mut c_void, *const c_char) -> c_int;

/// The library's entry points lume uses (libnftables(3)).
struct Lib {
    ctx_new: CtxNew,
    buffer_output: CtxInt,
    buffer_error: CtxInt,
    output_buffer: CtxStr,
    error_buffer: CtxStr,
    set_output_flags: CtxSetFlags,
    run_cmd: RunCmd,
    /// Keeps the functions above loaded (never unloaded).
    _lib: libloading::Library,
}

impl Lib {
    fn load() -> Option<Lib> {
        // SAFETY: loading libnftables runs its initialisers, which only
        // set up the library's own state; the symbols are looked up with
        // the signatures libnftables.h declares for them, and the library
        // stays loaded for the life of the process (it is kept in `_lib`
        // inside a static).
        unsafe {
            let lib = libloading::Library::new("libnftables.so.1").ok()?;
            Some(Lib {
                ctx_new: *lib.get::<CtxNew>(b"nft_ctx_new\0").ok()?,
                buffer_output: *lib.get::<CtxInt>(b"nft_ctx_buffer_output\0").ok()?,
                buffer_error: *lib.get::<CtxInt>(b"nft_ctx_buffer_error\0").ok()?,
                output_buffer: *lib.get::<CtxStr>(b"nft_ctx_get_output_buffer\0").ok()?,
                error_buffer: *lib.get::<CtxStr>(b"nft_ctx_get_error_buffer\0").ok()?,
                set_output_flags: *lib.get::<CtxSetFlags>(b"nft_ctx_output_set_flags\0").ok()?,
                run_cmd: *lib.get::<RunCmd>(b"nft_run_cmd_from_buffer\0").ok()?,
                _lib: lib,
            })
        }
    }
}

/// A libnftables context, created in the network namespace `netns`.
struct Ctx {
    ptr: *mut c_void,
    netns: u64,
}

// SAFETY: a context is only used under `CONTEXTS`' mutex, by one thread at
// a time; libnftables keeps no thread-local state in it.
unsafe impl Send for Ctx {}

static LIB: OnceLock<Option<Lib>> = OnceLock::new();
/// This process's contexts, one per network namespace a thread of it asked
/// from (lume's commands stay in one; unit tests enter others): created on
/// first use, never freed (the process's exit closes their sockets). A
/// context holds its namespace, so its inode is not reused meanwhile.
static CONTEXTS: Mutex<Vec<Ctx>> = Mutex::new(Vec::new());

/// The network namespace the calling thread is in (its nsfs inode).
fn thread_netns() -> Option<u64> {
    std::fs::metadata("/proc/thread-self/ns/net")
        .ok()
        .map(|m| m.ino())
}

/// Runs `cmd` (nft's command language, one transaction) with `flags`
/// (`OUTPUT_*`), in the calling thread's network namespace: its output, or
/// nft's error text. `None` when the library is not available here: run
/// `nft` instead.
pub fn run(flags: c_uint, cmd: &str) -> Option<Result<String, String>> {
    let lib = LIB.get_or_init(Lib::load).as_ref()?;
    let netns = thread_netns()?;
    let cmd = CString::new(cmd).ok()?;
    let mut contexts = CONTEXTS.lock().unwrap_or_else(|p| p.into_inner());
    if !contexts.iter().any(|c| c.netns == netns) {
        // SAFETY: nft_ctx_new(0) is NFT_CTX_DEFAULT; the two calls after it
        // only switch the new context's output and errors to buffers.
        let ptr = unsafe { (lib.ctx_new)(0) };
        if ptr.is_null() {
            return None;
        }
        // SAFETY: `ptr` is the context just created.
        unsafe {
            (lib.buffer_output)(ptr);
            (lib.buffer_error)(ptr);
        }
        contexts.push(Ctx { ptr, netns });
    }
    let ctx = contexts.iter().find(|c| c.netns == netns)?;
    // The library may open its socket (again) during a command: every
    // netfilter netlink socket of the process is marked close-on-exec
    // before anything else can run here.
    crate::util::fds::cloexec_netlink(NETLINK_NETFILTER);
    // SAFETY: the context is valid and used by this thread alone (the
    // mutex); `cmd` is a NUL-terminated string that outlives the call; the
    // buffers the library returns are its own, valid until the next call
    // on the context, and copied at once.
    let (status, out, err) = unsafe {
        (lib.set_output_flags)(ctx.ptr, flags);
        let status = (lib.run_cmd)(ctx.ptr, cmd.as_ptr());
        let text = |p: *const c_char| {
            if p.is_null() {
                String::new()
            } else {
                CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        (
            status,
            text((lib.output_buffer)(ctx.ptr)),
            text((lib.error_buffer)(ctx.ptr)),
        )
    };
    crate::util::fds::cloexec_netlink(NETLINK_NETFILTER);
    Some(if status == 0 {
        Ok(out)
    } else {
        Err(err.trim().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether every netfilter netlink socket of this process is
    /// close-on-exec.
    fn netfilter_sockets() -> Vec<(i32, bool)> {
        crate::util::fds::netlink_sockets(NETLINK_NETFILTER)
            .into_iter()
            .map(|fd| {
                let flags = nix::fcntl::fcntl(
                    // SAFETY: `fd` is open in this process (just listed).
                    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
                    nix::fcntl::FcntlArg::F_GETFD,
                )
                .unwrap_or(0);
                (fd, flags & libc::FD_CLOEXEC != 0)
            })
            .collect()
    }

    #[test]
    fn the_library_answers_like_nft_and_its_socket_is_not_inherited() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let ns = crate::util::testing::TestNetns::new(format!("lnft{}", std::process::id()));
        let (listed, bad, sockets) = ns.run(move || {
            // A namespace of its own: the first context of this test
            // process may be bound elsewhere, then `run` says so (None).
            let Some(first) = run(
                0,
                "add table inet lumetest; add set inet lumetest s { type ipv4_addr; }",
            ) else {
                return (None, None, Vec::new());
            };
            first.expect("add table");
            let listed = run(OUTPUT_JSON, "list tables").map(|r| r.expect("list"));
            let bad = run(
                0,
                "add chain inet lumetest c { type nat hook bogus priority 0; }",
            );
            (listed, bad, netfilter_sockets())
        });
        let Some(listed) = listed else {
            // Bound to another namespace: the process fallback is used there.
            return;
        };
        assert!(listed.contains("\"lumetest\""), "{listed}");
        let nft = ns.sh("nft list table inet lumetest");
        assert!(nft.contains("set s"), "{nft}");
        // Written in the thread's namespace, not the process's.
        let root = std::process::Command::new("nft")
            .args(["list", "table", "inet", "lumetest"])
            .output()
            .unwrap();
        assert!(!root.status.success());
        let bad = bad
            .expect("same namespace")
            .expect_err("a bogus hook is refused");
        assert!(bad.starts_with("Error:"), "{bad}");
        assert!(!sockets.is_empty());
        assert!(sockets.iter().all(|(_, cloexec)| *cloexec), "{sockets:?}");
    }
}
