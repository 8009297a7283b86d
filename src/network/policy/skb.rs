//! Where the running kernel keeps, in `struct sk_buff`, what decides where a
//! pending checksum will be written: `csum_start`, `csum_offset` and
//! `mac_header`. With them the policy program checks that a guest's
//! transmit offload (checksum left for the host, a large frame to cut up)
//! writes only the transport header's checksum field, and lets such frames
//! through; without them it drops every offloaded frame and the guest gets
//! no transmit offload (see `bpf`'s "Pending offloads").
//!
//! `__sk_buff` shows none of these fields, and their offsets change with
//! the kernel's version and configuration. The program reaches them through
//! the kernel's `bpf_cast_to_kern_ctx` kfunc (Linux 6.2+), called by its
//! BTF id, with loads the verifier checks against the kernel's BTF
//! (`/sys/kernel/btf/vmlinux`, read with `btf-rs`). Found once per boot
//! (reading the BTF takes a few hundred milliseconds: the result is kept in
//! root's `/run/lume/skb-layout`, keyed by the boot's id), once per process
//! after that, and only used once a program using them has loaded.

use std::path::Path;
use std::sync::OnceLock;

use btf_rs::{Btf, Type};

/// Byte offsets in `struct sk_buff`, and the kfunc's BTF id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SkbLayout {
    pub cast_to_kern_ctx: u32,
    pub mac_header: i16,
    pub csum_start: i16,
    pub csum_offset: i16,
}

/// Why the layout is not known (the policy then drops offloaded frames).
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("The kernel's BTF (/sys/kernel/btf/vmlinux) cannot be read: {0}")]
    Btf(String),
    #[error("The kernel's BTF has no {0}")]
    Missing(&'static str),
    #[error("The kernel refused a program reading struct sk_buff: {0}")]
    Refused(nix::errno::Errno),
}

impl SkbLayout {
    /// The running kernel's layout, read and tried once per process (and
    /// read from the BTF once per boot).
    pub fn running() -> Option<SkbLayout> {
        static LAYOUT: OnceLock<Option<SkbLayout>> = OnceLock::new();
        *LAYOUT.get_or_init(|| {
            let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
            let boot = boot.trim();
            let cache = Path::new(CACHE);
            if let Some(l) = cached(cache, boot).filter(|l| l.try_load().is_ok()) {
                return Some(l);
            }
            let l = Self::read("/sys/kernel/btf/vmlinux").ok()?;
            l.try_load().ok()?;
            keep(cache, boot, &l);
            Some(l)
        })
    }

    /// The layout as the BTF at `path` describes it.
    pub fn read(path: &str) -> Result<SkbLayout, LayoutError> {
        let btf = Btf::from_file(path).map_err(|e| LayoutError::Btf(e.to_string()))?;
        let cast_to_kern_ctx = btf
            .resolve_ids_by_name("bpf_cast_to_kern_ctx")
            .ok()
            .and_then(|ids| {
                ids.into_iter()
                    .find(|id| matches!(btf.resolve_type_by_id(*id), Ok(Type::Func(_))))
            })
            .ok_or(LayoutError::Missing("bpf_cast_to_kern_ctx kfunc"))?;
        let skb = btf
            .resolve_types_by_name("sk_buff")
            .ok()
            .and_then(|ts| ts.into_iter().find(|t| matches!(t, Type::Struct(_))))
            .ok_or(LayoutError::Missing("struct sk_buff"))?;
        let field = |name: &'static str| {
            u16_field(&btf, &skb, name, 0)
                .and_then(|bits| i16::try_from(bits / 8).ok())
                .ok_or(LayoutError::Missing(name))
        };
        let l = SkbLayout {
            cast_to_kern_ctx,
            mac_header: field("mac_header")?,
            csum_start: field("csum_start")?,
            csum_offset: field("csum_offset")?,
        };
        if l.plausible() {
            Ok(l)
        } else {
            Err(LayoutError::Missing("plausible sk_buff checksum fields"))
        }
    }

    /// `csum_offset` right after `csum_start` (they share a word in every
    /// kernel with them), all within the first 512 bytes of `sk_buff`.
    fn plausible(&self) -> bool {
        self.csum_offset == self.csum_start + 2
            && (0..512).contains(&self.csum_start)
            && (0..512).contains(&self.mac_header)
    }

    /// Loads (and drops) a program that reads the three fields, as the
    /// policy's does: the kernel must accept the kfunc (it needs the JIT,
    /// among others) before a policy relies on it.
    fn try_load(&self) -> Result<(), LayoutError> {
        let insns = super::bpf::read_skb_fields(self);
        super::bpf::load(&insns)
            .map(drop)
            .map_err(|e| LayoutError::Refused(e.errno()))
    }
}

/// Where the layout is kept for the boot (root's, 0600 in the 0700
/// `/run/lume`).
const CACHE: &str = "/run/lume/skb-layout";

/// The layout kept for boot `boot`, if any: a regular file of root's that
/// only root can change, not a link.
fn cached(path: &Path, boot: &str) -> Option<SkbLayout> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let m = f.metadata().ok()?;
    if !m.is_file() || m.uid() != 0 || m.mode() & 0o022 != 0 || m.len() > 256 {
        return None;
    }
    let mut text = String::new();
    f.read_to_string(&mut text).ok()?;
    let mut w = text.split_whitespace();
    if w.next()? != boot {
        return None;
    }
    let mut n = || w.next()?.parse::<i64>().ok();
    let l = SkbLayout {
        cast_to_kern_ctx: u32::try_from(n()?).ok()?,
        mac_header: i16::try_from(n()?).ok()?,
        csum_start: i16::try_from(n()?).ok()?,
        csum_offset: i16::try_from(n()?).ok()?,
    };
    l.plausible().then_some(l)
}

/// Keeps `l` for boot `boot` (as root only; a failure only costs the next
/// process the BTF read).
fn keep(path: &Path, boot: &str, l: &SkbLayout) {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    let Some(dir) = path.parent() else { return };
    if crate::network::rundir::private_dir(dir, dir).is_err() {
        return;
    }
    let text = format!(
        "{boot} {} {} {} {}\n",
        l.cast_to_kern_ctx, l.mac_header, l.csum_start, l.csum_offset
    );
    let _ = crate::util::atomic::write_private(path, text.as_bytes());
}

/// The bit offset of the 16-bit field `name` in `ty`, looking into
/// anonymous structs and unions, `base` bits into the outer struct.
fn u16_field(btf: &Btf, ty: &Type, name: &str, base: u32) -> Option<u32> {
    let members = match ty {
        Type::Struct(s) | Type::Union(s) => &s.members,
        _ => return None,
    };
    for m in members {
        let offset = base + m.bit_offset();
        let member_name = btf.resolve_name(m).unwrap_or_default();
        let member_type = btf.resolve_chained_type(m).ok()?;
        if member_name.is_empty() {
            if let Some(found) = u16_field(btf, &member_type, name, offset) {
                return Some(found);
            }
        } else if member_name == name {
            return (m.bitfield_size().unwrap_or(0) == 0
                && offset.is_multiple_of(8)
                && int_size(btf, member_type) == Some(2))
            .then_some(offset);
        }
    }
    None
}

/// The size of an integer type, through typedefs and qualifiers.
fn int_size(btf: &Btf, mut ty: Type) -> Option<usize> {
    for _ in 0..16 {
        ty = match ty {
            Type::Int(i) => return Some(i.size()),
            Type::Typedef(ref t) => btf.resolve_chained_type(t).ok()?,
            Type::Const(ref t) | Type::Volatile(ref t) | Type::Restrict(ref t) => {
                btf.resolve_chained_type(t).ok()?
            }
            _ => return None,
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine's kernel (6.2+, with BTF) has the layout, and a program
    /// reading it loads.
    #[test]
    fn the_running_kernel_has_the_layout() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (BPF)");
            return;
        }
        let l = SkbLayout::read("/sys/kernel/btf/vmlinux").unwrap();
        assert!(l.cast_to_kern_ctx > 0);
        assert_eq!(l.csum_offset, l.csum_start + 2, "{l:?}");
        assert!(l.mac_header > 0 && l.mac_header < 256, "{l:?}");
        let insns = super::super::bpf::read_skb_fields(&l);
        if let Err(e) = super::super::bpf::load(&insns) {
            panic!("{e}");
        }
        assert_eq!(SkbLayout::running(), Some(l));
        assert!(matches!(
            SkbLayout::read("/nonexistent"),
            Err(LayoutError::Btf(_))
        ));
    }

    /// The boot's copy is used only for that boot, only when root's and
    /// not writable by others.
    #[test]
    fn the_kept_layout_is_for_its_boot_and_roots_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("skb-layout");
        let l = SkbLayout {
            cast_to_kern_ctx: 63537,
            mac_header: 182,
            csum_start: 136,
            csum_offset: 138,
        };
        std::fs::write(&path, "b1 63537 182 136 138\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let root = nix::unistd::geteuid().is_root();
        assert_eq!(cached(&path, "b1"), root.then_some(l));
        assert_eq!(cached(&path, "b2"), None);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(cached(&path, "b1"), None);
        std::fs::write(&path, "b1 63537 182 136 140\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(cached(&path, "b1"), None, "offset not after start");
        std::fs::write(&path, "b1 63537 182 136\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(cached(&path, "b1"), None);
        std::fs::write(&path, "b1 63537 182 136 138\n").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        assert_eq!(cached(&link, "b1"), None);
    }
}
