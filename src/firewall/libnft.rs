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
//! The library opens its netlink socket without `SOCK_CLOEXEC`, so no
//! thread that may fork holds it: one worker thread per process owns every
//! context, on a descriptor table of its own (`unshare(CLONE_FILES)`, then
//! its copies of the process's descriptors closed, so that no lock or pipe
//! outlives its owner's close), and runs the commands other threads hand
//! it. A child forked by any other
//! thread cannot inherit the socket, not even one forked while a context
//! is being created; the worker itself never forks. The children that face
//! guests (QEMU, dnsmasq, passt, virtiofsd) also mark every descriptor they
//! were not handed close-on-exec before their exec ([`crate::util::fds`]).

use std::collections::HashMap;
use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};

/// `NFT_CTX_OUTPUT_STATELESS` in `<nftables/libnftables.h>`.
pub const OUTPUT_STATELESS: c_uint = 1 << 2;
/// `NFT_CTX_OUTPUT_HANDLE`.
pub const OUTPUT_HANDLE: c_uint = 1 << 3;
/// `NFT_CTX_OUTPUT_JSON`.
pub const OUTPUT_JSON: c_uint = 1 << 4;

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
    /// Keeps the functions above loaded (for the worker's life: the
    /// process's).
    _lib: libloading::Library,
}

impl Lib {
    fn load() -> Option<Lib> {
        // SAFETY: loading libnftables runs its initialisers, which only
        // set up the library's own state; the symbols are looked up with
        // the signatures libnftables.h declares for them, and the library
        // stays loaded while they are used (it is kept in `_lib`).
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

/// A command for the worker, from a thread in the network namespace
/// `netns` (nsfs inode) whose thread id is `tid`.
struct Request {
    netns: u64,
    tid: libc::pid_t,
    /// `None`: only make sure a context for `netns` exists ([`warm`]).
    command: Option<(c_uint, CString)>,
    reply: mpsc::Sender<Option<Result<String, String>>>,
}

/// The worker's end of things: the library, a context per namespace (with
/// the namespace held open, so it is neither freed nor its inode reused
/// while the context lives), and the namespace it is in now.
struct Worker {
    lib: Lib,
    contexts: HashMap<u64, (*mut c_void, File)>,
    current: u64,
}

impl Worker {
    /// A context for `netns`, created on first use, entering the asking
    /// thread's namespace to create it when it is not the worker's.
    fn context(&mut self, netns: u64, tid: libc::pid_t) -> Option<*mut c_void> {
        if !self.contexts.contains_key(&netns) {
            let ns = File::open(format!("/proc/self/task/{tid}/ns/net")).ok()?;
            if ns.metadata().ok()?.ino() != netns {
                return None;
            }
            enter(&mut self.current, netns, &ns)?;
            // SAFETY: nft_ctx_new(0) is NFT_CTX_DEFAULT; the two calls after
            // it only switch the new context's output and errors to buffers.
            let ptr = unsafe { (self.lib.ctx_new)(0) };
            if ptr.is_null() {
                return None;
            }
            // SAFETY: `ptr` is the context just created.
            unsafe {
                (self.lib.buffer_output)(ptr);
                (self.lib.buffer_error)(ptr);
            }
            self.contexts.insert(netns, (ptr, ns));
        }
        let (ptr, ns) = self.contexts.get(&netns)?;
        // Interface names in a command are looked up in the worker's
        // namespace: it is the context's.
        enter(&mut self.current, netns, ns)?;
        Some(*ptr)
    }

    fn run(
        &mut self,
        netns: u64,
        tid: libc::pid_t,
        flags: c_uint,
        cmd: &CStr,
    ) -> Option<Result<String, String>> {
        let ctx = self.context(netns, tid)?;
        let lib = &self.lib;
        // SAFETY: the context is valid and only this thread uses it; `cmd`
        // is a NUL-terminated string that outlives the call; the buffers the
        // library returns are its own, valid until the next call on the
        // context, and copied at once.
        let (status, out, err) = unsafe {
            (lib.set_output_flags)(ctx, flags);
            let status = (lib.run_cmd)(ctx, cmd.as_ptr());
            let text = |p: *const c_char| {
                if p.is_null() {
                    String::new()
                } else {
                    CStr::from_ptr(p).to_string_lossy().into_owned()
                }
            };
            (
                status,
                text((lib.output_buffer)(ctx)),
                text((lib.error_buffer)(ctx)),
            )
        };
        Some(if status == 0 {
            Ok(out)
        } else {
            Err(err.trim().to_string())
        })
    }
}

/// Puts the worker in namespace `netns` (opened as `ns`) unless `current`
/// says it is there.
fn enter(current: &mut u64, netns: u64, ns: &File) -> Option<()> {
    if *current != netns {
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
        *current = netns;
    }
    Some(())
}

/// The worker's queue. A worker that cannot start (no library, no
/// descriptor table of its own) drops its end: every request then fails
/// at once, and its caller runs `nft`.
static QUEUE: OnceLock<Mutex<mpsc::Sender<Request>>> = OnceLock::new();

fn queue() -> &'static Mutex<mpsc::Sender<Request>> {
    QUEUE.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        let _ = std::thread::Builder::new()
            .name("lume-nft".into())
            .spawn(move || {
                // A descriptor table of this thread's own: the library's
                // sockets never appear in the one other threads fork from.
                if nix::sched::unshare(nix::sched::CloneFlags::CLONE_FILES).is_err() {
                    return;
                }
                // The copy holds every descriptor open at this moment: an
                // open file description (a lock's, a pipe's write end) lives
                // as long as any copy, so this thread keeps none of them.
                // SAFETY: close_range closes this thread's own copies only
                // (its table is private now); the standard streams stay.
                if unsafe { libc::syscall(libc::SYS_close_range, 3, libc::c_uint::MAX, 0) } != 0 {
                    return;
                }
                // Its standard streams too (the library writes to buffers):
                // a pipe another process waits on to close is not kept open.
                let Ok(null) = File::options().read(true).write(true).open("/dev/null") else {
                    return;
                };
                for fd in 0..3 {
                    // SAFETY: dup2 onto this thread's own descriptors 0-2.
                    if unsafe { libc::dup2(null.as_raw_fd(), fd) } < 0 {
                        return;
                    }
                }
                drop(null);
                let (Some(lib), Some(current)) = (Lib::load(), thread_netns()) else {
                    return;
                };
                let mut worker = Worker {
                    lib,
                    contexts: HashMap::new(),
                    current,
                };
                for req in rx {
                    let answer = match &req.command {
                        Some((flags, cmd)) => worker.run(req.netns, req.tid, *flags, cmd),
                        None => worker
                            .context(req.netns, req.tid)
                            .map(|_| Ok(String::new())),
                    };
                    let _ = req.reply.send(answer);
                }
            });
        Mutex::new(tx)
    })
}

/// The network namespace the calling thread is in (its nsfs inode).
fn thread_netns() -> Option<u64> {
    std::fs::metadata("/proc/thread-self/ns/net")
        .ok()
        .map(|m| m.ino())
}

fn ask(
    command: Option<(c_uint, CString)>,
) -> Option<mpsc::Receiver<Option<Result<String, String>>>> {
    let queue = queue();
    let (reply, answer) = mpsc::channel();
    let req = Request {
        netns: thread_netns()?,
        tid: nix::unistd::gettid().as_raw(),
        command,
        reply,
    };
    queue
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send(req)
        .ok()?;
    Some(answer)
}

/// Why libnftables gave no output.
#[derive(Debug, thiserror::Error)]
pub enum LibnftError {
    /// nft's error text.
    #[error("{0}")]
    Refused(String),
    #[error(
        "libnftables did not answer within {} s; lume uses the nft command in this process from now on: try again",
        ANSWER_WITHIN.as_secs()
    )]
    NoAnswer,
}

/// How long a command may take before the worker is given up.
const ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

/// Set when the worker did not answer in time: nothing more is asked of it.
static GIVEN_UP: AtomicBool = AtomicBool::new(false);

/// Runs `cmd` (nft's command language, one transaction) with `flags`
/// (`OUTPUT_*`), in the calling thread's network namespace: its output, or
/// why not. `None` when the library is not available here: run `nft`
/// instead. A command the worker did not answer within 30 s is not run
/// again (it may yet be applied): it fails, and later ones use `nft`.
pub fn run(flags: c_uint, cmd: &str) -> Option<Result<String, LibnftError>> {
    if GIVEN_UP.load(Ordering::Relaxed) {
        return None;
    }
    let cmd = CString::new(cmd).ok()?;
    let answer = ask(Some((flags, cmd)))?;
    match answer.recv_timeout(ANSWER_WITHIN) {
        Ok(reply) => reply.map(|r| r.map_err(LibnftError::Refused)),
        Err(mpsc::RecvTimeoutError::Timeout) => {
            GIVEN_UP.store(true, Ordering::Relaxed);
            Some(Err(LibnftError::NoAnswer))
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => None,
    }
}

/// Loads the library and makes this namespace's context in the background,
/// so that the first [`run`] finds them ready.
pub fn warm() {
    if !GIVEN_UP.load(Ordering::Relaxed) {
        let _ = ask(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The netfilter netlink sockets in the descriptor table of task `task`
    /// of this process (`/proc/self/task/TID`, or `/proc/self` for the
    /// table every forking thread shares), by their inode.
    fn netfilter_sockets(task: &str) -> Vec<String> {
        // The sockets of the task's namespace, protocol 12 (NETLINK_NETFILTER).
        let table = std::fs::read_to_string(format!("{task}/net/netlink")).unwrap();
        let ours: Vec<&str> = table
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(1) == Some(&"12")).then(|| *f.last().unwrap())
            })
            .collect();
        std::fs::read_dir(format!("{task}/fd"))
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .filter_map(|l| {
                let l = l.to_string_lossy().into_owned();
                let ino = l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string();
                ours.contains(&ino.as_str()).then_some(ino)
            })
            .collect()
    }

    #[test]
    fn the_library_answers_like_nft_in_the_callers_namespace_and_no_forking_thread_holds_its_socket()
     {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let ns = crate::util::testing::TestNetns::new(format!("lnft{}", std::process::id()));
        let (listed, bad, shared) = ns.run(move || {
            run(
                0,
                "add table inet lumetest; add set inet lumetest s { type ipv4_addr; }",
            )
            .expect("libnftables is installed with nftables")
            .expect("add table");
            let listed = run(OUTPUT_JSON, "list tables").unwrap().expect("list");
            let bad = run(
                0,
                "add chain inet lumetest c { type nat hook bogus priority 0; }",
            );
            // This thread's table is the one every other thread forks from.
            (listed, bad, netfilter_sockets("/proc/thread-self"))
        });
        assert!(listed.contains("\"lumetest\""), "{listed}");
        let nft = ns.sh("nft list table inet lumetest");
        assert!(nft.contains("set s"), "{nft}");
        // Written in the asking thread's namespace, not the process's.
        let root = std::process::Command::new("nft")
            .args(["list", "table", "inet", "lumetest"])
            .output()
            .unwrap();
        assert!(!root.status.success());
        let bad = bad.unwrap().expect_err("a bogus hook is refused");
        assert!(
            matches!(&bad, LibnftError::Refused(t) if t.starts_with("Error:")),
            "{bad}"
        );
        // The socket is the worker's alone.
        assert_eq!(shared, Vec::<String>::new());
        assert!(netfilter_sockets("/proc/self").is_empty());
        let worker = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|t| std::fs::read_to_string(t.join("comm")).is_ok_and(|c| c.trim() == "lume-nft"))
            .expect("the worker thread");
        // And nothing else of the process: a copy of a lock's or a pipe's
        // descriptor would keep it held or open after its owner closed it.
        let others: Vec<String> = std::fs::read_dir(worker.join("fd"))
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) > Some(2))
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .map(|l| l.to_string_lossy().into_owned())
            .filter(|l| !l.starts_with("socket:[") && !l.starts_with("net:["))
            .collect();
        assert_eq!(others, Vec::<String>::new());
        let held: Vec<String> = ns.run(move || {
            // Its namespace is the test's now: its netlink table is there.
            netfilter_sockets(worker.to_str().unwrap())
        });
        assert!(!held.is_empty(), "the worker holds the context's socket");
    }
}
