//! Attaching the policy program with a tcx link (`BPF_LINK_CREATE`,
//! `BPF_TCX_INGRESS`, Linux 6.6+): the program runs on the tap's ingress
//! before any classic tc filter, and stays attached for as long as lume
//! holds the link's descriptor. `tc qdisc del … ingress` and `tc filter
//! del` do not touch it: unlike a `cls_bpf` filter, there is nothing for
//! tc to remove, so no window in which a guest's frames pass unfiltered.
//! Kernels without tcx get the `cls_bpf` filter of [`super::tc`].
//!
//! The `bpf(2)` commands used (uapi/linux/bpf.h): `BPF_LINK_CREATE`,
//! `BPF_LINK_UPDATE` (swap the program in one step), `BPF_OBJ_GET_INFO_BY_FD`
//! on the link (still attached, and to what), `BPF_PROG_QUERY` (the
//! programs on a tap, for `lume get` and the doctor, which do not hold the
//! link) and `BPF_PROG_GET_FD_BY_ID` (their names).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::errno::Errno;

const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_TCX_INGRESS: u32 = 46;
/// Before every other program on the tap's ingress.
const BPF_F_BEFORE: u32 = 1 << 3;

/// `bpf(cmd, attr)`; a new descriptor or a value, or the errno.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> Result<i64, Errno> {
    // SAFETY: every caller passes a `#[repr(C)]` bpf_attr prefix for `cmd`,
    // zero past the fields it sets, whose pointers (if any) point to
    // buffers of the sizes given that outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as u32,
        )
    };
    if r < 0 { Err(Errno::last()) } else { Ok(r) }
}

fn owned(fd: i64) -> OwnedFd {
    // SAFETY: `fd` was just returned by bpf(2) as a new descriptor that
    // nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

/// Attaches `prog` first on the ingress of interface `ifindex`; the link
/// lasts as long as the returned descriptor.
pub fn attach(ifindex: u32, prog: &OwnedFd) -> Result<OwnedFd, Errno> {
    #[repr(C)]
    #[derive(Default)]
    struct Attr {
        prog_fd: u32,
        target_ifindex: u32,
        attach_type: u32,
        flags: u32,
        relative_fd: u32,
        _pad: u32,
        expected_revision: u64,
        _rest: [u64; 4],
    }
    let mut attr = Attr {
        prog_fd: prog.as_raw_fd() as u32,
        target_ifindex: ifindex,
        attach_type: BPF_TCX_INGRESS,
        flags: BPF_F_BEFORE,
        ..Default::default()
    };
    bpf(BPF_LINK_CREATE, &mut attr).map(owned)
}

/// Swaps the link's program for `prog` in one step.
pub fn update(link: &OwnedFd, prog: &OwnedFd) -> Result<(), Errno> {
    #[repr(C)]
    #[derive(Default)]
    struct Attr {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let mut attr = Attr {
        link_fd: link.as_raw_fd() as u32,
        new_prog_fd: prog.as_raw_fd() as u32,
        ..Default::default()
    };
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}

/// `bpf_*_info` of the object behind `fd`, as 32-bit words.
fn info(fd: &OwnedFd) -> Result<[u32; 32], Errno> {
    #[repr(C)]
    struct Attr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut info = [0u32; 32];
    let mut attr = Attr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: std::mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

/// The link's program id and the interface it is attached to (0 once
/// something detached it): `struct bpf_link_info` is type, id, prog_id,
/// then (8-aligned) `tcx.ifindex`.
pub fn link_state(link: &OwnedFd) -> Result<(u32, u32), Errno> {
    let i = info(link)?;
    Ok((i[2], i[4]))
}

/// The ids of the programs lume named `lume_policy` among the tcx programs
/// on the ingress of interface `ifindex` (none without tcx).
pub fn lume_programs(ifindex: u32) -> Result<Vec<u32>, Errno> {
    #[repr(C)]
    #[derive(Default)]
    struct Attr {
        target_ifindex: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        count: u32,
        _pad: u32,
        prog_attach_flags: u64,
        link_ids: u64,
        link_attach_flags: u64,
        revision: u64,
    }
    let mut ids = [0u32; 64];
    let mut attr = Attr {
        target_ifindex: ifindex,
        attach_type: BPF_TCX_INGRESS,
        prog_ids: ids.as_mut_ptr() as u64,
        count: ids.len() as u32,
        ..Default::default()
    };
    match bpf(BPF_PROG_QUERY, &mut attr) {
        Ok(_) => {}
        // No tcx on this kernel, or nothing attached yet.
        Err(Errno::EINVAL | Errno::ENOENT) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    }
    let n = (attr.count as usize).min(ids.len());
    Ok(ids[..n]
        .iter()
        .copied()
        .filter(|id| is_lume_policy(*id))
        .collect())
}

/// Whether program `id` is named `lume_policy` (`bpf_prog_info.name`, 16
/// bytes at byte 64).
fn is_lume_policy(id: u32) -> bool {
    #[repr(C)]
    #[derive(Default)]
    struct Attr {
        prog_id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let mut attr = Attr {
        prog_id: id,
        ..Default::default()
    };
    let Ok(fd) = bpf(BPF_PROG_GET_FD_BY_ID, &mut attr).map(owned) else {
        return false;
    };
    let Ok(words) = info(&fd) else { return false };
    let name: Vec<u8> = words[16..20].iter().flat_map(|w| w.to_ne_bytes()).collect();
    name.starts_with(b"lume_policy")
}
