//! The policy as an eBPF program for a direct-action `cls_bpf` filter on the
//! tap's ingress (= what the guest sends).
//!
//! The program is straight-line compare-and-jump code over fixed offsets,
//! read with `BPF_LD_ABS` (which the verifier accepts for `SCHED_CLS`):
//!
//! 1. VLAN-tagged frames (`__sk_buff.vlan_present`: the kernel took the tag
//!    off before tc), frames shorter than 42 bytes, frames with a pending
//!    offload (below), not from the VM's MAC,
//!    neither IPv4 nor ARP (IPv6, QinQ, …), IPv4 with options or
//!    fragmented: dropped. Every later load is within the first 42 bytes,
//!    so no load can fail (a failing `LD_ABS` would end the program with
//!    0 = pass);
//! 2. ARP: passed when the sender MAC is the VM's and the sender address
//!    the guest's (or 0.0.0.0; any address while it is not known);
//! 3. IPv4 source: the guest's address, or 0.0.0.0 for a DHCP request;
//!    anything else (a spoofed source) is dropped;
//! 4. DHCP to broadcast (or the gateway), DNS (UDP/TCP 53) to the gateway,
//!    TCP from the guest's SSH port to the gateway with ACK set (replies
//!    to connections the host opened to it: never a SYN of the guest's):
//!    passed;
//! 5. deny rules, then the isolated ranges: dropped;
//! 6. allow rules: passed; then everything else dropped if there was any
//!    allow rule, passed otherwise.
//! 7. nat, host: a frame that passes must be addressed to lume's bridge
//!    (its pinned MAC), or be a broadcast (ARP, DHCP), which the program
//!    redirects into the bridge's own receive path (`bpf_redirect` with
//!    `BPF_F_INGRESS`): the host sees it, no other port does. So a
//!    policed guest reaches no other VM at layer 2, whatever addresses
//!    its frames carry.
//!
//! **Pending offloads.** The tap carries a virtio-net header, so the guest
//! can mark a frame "needs checksum" with the checksum's place anywhere in
//! its headers (the kernel writes it when the frame leaves, after every
//! hook: a port or address the program allowed would be rewritten), or
//! hand over one large frame for the kernel to cut up. A policed VM's
//! virtio-net device offers no transmit offload (`csum=off`, see
//! `attach::policy_device_options`), so a well-behaved guest never sends
//! either; the program drops both:
//! - segmentation: `__sk_buff.gso_size` is not 0;
//! - a pending checksum (`CHECKSUM_PARTIAL`, which `__sk_buff` does not
//!   show): `bpf_l4_csum_replace` without a pseudo header changes the
//!   field it is given on every frame *except* one whose checksum is
//!   pending. The program applies it to the first two bytes, reads them
//!   back, drops the frame when they did not change, and otherwise puts the
//!   saved bytes back with `bpf_skb_store_bytes`.
//!
//! The guest keeps its receive offloads (checksums already checked,
//! large segments): what the host sends it is not the guest's to forge.

use std::net::Ipv4Addr;
use std::os::fd::{FromRawFd, OwnedFd};

use super::skb::SkbLayout;
use super::{Cidr, ISOLATED_RANGES, Policy, Rule};

/// What the program needs to know of the VM's network.
#[derive(Debug, Clone)]
pub struct Context {
    pub mac: [u8; 6],
    /// The guest's reserved address (nat, host), or in bridged mode its
    /// DHCP lease once the snooper saw it; `None` until then: no source or
    /// ARP address check.
    pub guest: Option<Ipv4Addr>,
    /// lume's address on the bridge (dnsmasq: DHCP and DNS); `None` in
    /// bridged mode: DHCP then goes to broadcast only, DNS is not excepted.
    pub gateway: Option<Ipv4Addr>,
    /// The networks of the host's own addresses (each address with its
    /// prefix length, host bits cleared), for `isolate`.
    pub host_nets: Vec<Cidr>,
    /// nat, host: lume's bridge. Every frame that passes is addressed to
    /// the bridge's MAC, or is a broadcast the program hands to the
    /// bridge's own receive path: nothing a policed guest sends reaches
    /// another VM at layer 2. `None` in bridged mode (the LAN's hosts are
    /// many).
    pub bridge: Option<Bridge>,
    /// The kernel's `struct sk_buff` layout ([`SkbLayout::running`]):
    /// with it, offloaded frames whose checksum goes where it belongs pass
    /// on to the rules; without it every offloaded frame is dropped.
    pub skb: Option<SkbLayout>,
}

/// lume's bridge, as the program sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bridge {
    /// Its MAC, pinned by lume: the only unicast destination a policed
    /// guest's frames may have.
    pub mac: [u8; 6],
    /// Its interface index: broadcasts that pass go into the bridge's own
    /// receive path (to the host only), never out of its other ports.
    pub index: u32,
}

/// "No verdict": the frame goes on to the next filter (bridged mode's
/// redirect to the macvlan) or, with none left, on its way as usual.
const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_SHOT: i32 = 2;

/// `struct bpf_insn`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

// Opcode pieces (linux/bpf_common.h, linux/bpf.h).
const LD: u8 = 0x00;
const LDX: u8 = 0x01;
const ALU: u8 = 0x04;
const JMP: u8 = 0x05;
const JMP32: u8 = 0x06;
const ALU64: u8 = 0x07;
const W: u8 = 0x00;
const H: u8 = 0x08;
const B: u8 = 0x10;
const ABS: u8 = 0x20;
const MEM: u8 = 0x60;
const K: u8 = 0x00;
const X: u8 = 0x08;
const AND: u8 = 0x50;
const MOV: u8 = 0xb0;
const RSH: u8 = 0x70;
const JA: u8 = 0x00;
const JEQ: u8 = 0x10;
const JGT: u8 = 0x20;
const JNE: u8 = 0x50;
const JLT: u8 = 0xa0;
const EXIT: u8 = 0x90;
const CALL: u8 = 0x80;
const ADD: u8 = 0x00;

// Helpers (uapi/linux/bpf.h `enum bpf_func_id`).
const SKB_STORE_BYTES: i32 = 9;
const L4_CSUM_REPLACE: i32 = 11;
const REDIRECT: i32 = 23;
const BPF_F_INGRESS: i32 = 1;
const SKB_LOAD_BYTES: i32 = 26;

/// Registers: r0 scratch/return, r1 context on entry, r6 context (LD_ABS
/// needs it there), r7 protocol, r8 destination, r9 ports.
const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
const R5: u8 = 5;
const R6: u8 = 6;
const R7: u8 = 7;
const R8: u8 = 8;
const R9: u8 = 9;
const R10: u8 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Drop,
    /// The policy lets the frame through (then, nat and host, the bridge
    /// check: [`to_the_bridge_only`]).
    Pass,
    /// Through, no further check.
    Accept,
    Label(usize),
}

/// A program being built: instructions plus jumps to patch.
#[derive(Default)]
struct Asm {
    insns: Vec<Insn>,
    fixups: Vec<(usize, Target)>,
    labels: Vec<Option<usize>>,
    /// Where [`Target::Pass`] goes when not straight to the exit.
    pass_via: Option<usize>,
}

impl Asm {
    fn emit(&mut self, code: u8, dst: u8, src: u8, off: i16, imm: i32) {
        self.insns.push(Insn {
            code,
            regs: (src << 4) | dst,
            off,
            imm,
        });
    }
    fn label(&mut self) -> usize {
        self.labels.push(None);
        self.labels.len() - 1
    }
    fn bind(&mut self, l: usize) {
        self.labels[l] = Some(self.insns.len());
    }
    /// r0 = packet[off] (network order, zero-extended).
    fn load(&mut self, size: u8, off: i32) {
        self.emit(LD | ABS | size, 0, 0, 0, off);
    }
    fn mov_reg(&mut self, dst: u8, src: u8) {
        self.emit(ALU64 | MOV | X, dst, src, 0, 0);
    }
    fn and(&mut self, dst: u8, mask: u32) {
        self.emit(ALU | AND | K, dst, 0, 0, mask as i32);
    }
    /// 32-bit compare of `reg` with `imm`, jumping to `t` when `op` holds.
    fn jump_if(&mut self, op: u8, reg: u8, imm: u32, t: Target) {
        self.fixups.push((self.insns.len(), t));
        self.emit(JMP32 | op | K, reg, 0, 0, imm as i32);
    }
    /// 32-bit compare of `a` with `b`, jumping to `t` when `op` holds.
    fn jump_if_reg(&mut self, op: u8, a: u8, b: u8, t: Target) {
        self.fixups.push((self.insns.len(), t));
        self.emit(JMP32 | op | X, a, b, 0, 0);
    }
    fn mov_imm(&mut self, dst: u8, imm: i32) {
        self.emit(ALU64 | MOV | K, dst, 0, 0, imm);
    }
    /// `dst` = the frame pointer + `off` (a stack slot).
    fn stack_ptr(&mut self, dst: u8, off: i32) {
        self.mov_reg(dst, R10);
        self.emit(ALU64 | ADD | K, dst, 0, 0, off);
    }
    /// Calls helper `id` (arguments in r1-r5, already set) and drops the
    /// frame when it returns anything but 0.
    fn call_or_drop(&mut self, id: i32) {
        self.emit(JMP | CALL, 0, 0, 0, id);
        self.jump_if(JNE, R0, 0, Target::Drop);
    }
    /// `bpf_skb_load_bytes(ctx, off, stack + slot, 2)`.
    fn copy_two_bytes(&mut self, off: i32, slot: i32) {
        self.mov_reg(R1, R6);
        self.mov_imm(R2, off);
        self.stack_ptr(R3, slot);
        self.mov_imm(R4, 2);
        self.call_or_drop(SKB_LOAD_BYTES);
    }
    fn goto(&mut self, t: Target) {
        self.fixups.push((self.insns.len(), t));
        self.emit(JMP | JA, 0, 0, 0, 0);
    }
    /// Jumps to `t` when `reg & mask != value`.
    fn unless_masked(&mut self, reg: u8, mask: u32, value: u32, t: Target) {
        if mask == 0 {
            return;
        }
        self.mov_reg(R0, reg);
        if mask != u32::MAX {
            self.and(R0, mask);
        }
        self.jump_if(JNE, R0, value, t);
    }
    fn finish(mut self) -> Result<Vec<Insn>, CompileError> {
        let drop_at = self.insns.len();
        self.emit(ALU | MOV | K, R0, 0, 0, TC_ACT_SHOT);
        self.emit(JMP | EXIT, 0, 0, 0, 0);
        let accept_at = self.insns.len();
        self.emit(ALU64 | MOV | K, R0, 0, 0, TC_ACT_UNSPEC);
        self.emit(JMP | EXIT, 0, 0, 0, 0);
        for (at, t) in std::mem::take(&mut self.fixups) {
            let dest = match (t, self.pass_via) {
                (Target::Drop, _) => drop_at,
                (Target::Pass, None) | (Target::Accept, _) => accept_at,
                (Target::Pass, Some(l)) | (Target::Label(l), _) => {
                    self.labels[l].expect("every label is bound")
                }
            };
            // A jump's offset is an i16: a program too long for one is
            // refused, never wrapped around to another instruction.
            self.insns[at].off = i16::try_from(dest as i64 - at as i64 - 1)
                .map_err(|_| CompileError::TooLong(self.insns.len()))?;
        }
        Ok(self.insns)
    }
}

/// Why a policy could not be compiled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CompileError {
    #[error(
        "The network policy's eBPF program is too long ({0} instructions: a jump cannot reach its end); use fewer rules (merge them into wider CIDRs or port ranges)"
    )]
    TooLong(usize),
    #[error(
        "This host has too many IPv4 networks for --isolate ({0}, at most {max}); remove addresses or use --allow-out/--deny-out rules instead",
        max = MAX_HOST_NETS
    )]
    TooManyHostNets(usize),
}

/// At most this many host networks are compiled into an `--isolate` policy
/// (each costs a few instructions per frame; beyond it the VM does not
/// start rather than run with a partial isolation).
pub const MAX_HOST_NETS: usize = 1024;

// Offsets from the start of the Ethernet frame (cls_bpf at ingress runs
// with the MAC header pushed back).
const ETH_DST: i32 = 0;
const ETH_SRC: i32 = 6;
const ETH_TYPE: i32 = 12;
const IP_VHL: i32 = 14;
const IP_FRAG: i32 = 20;
const IP_PROTO: i32 = 23;
const IP_SRC: i32 = 26;
const IP_DST: i32 = 30;
const L4_PORTS: i32 = 34;
const ARP_SHA: i32 = 22;
const ARP_SPA: i32 = 28;
/// `struct __sk_buff`: `len`, `vlan_present`, `gso_size`
/// (uapi/linux/bpf.h).
const SKB_LEN: i16 = 0;
const SKB_VLAN_PRESENT: i16 = 20;
const SKB_GSO_SIZE: i16 = 176;
const MIN_LEN: u32 = 42;
/// TCP's flags byte, and the end of a TCP header without options, after
/// an IPv4 header without options.
const TCP_FLAGS: i32 = 47;
/// A DHCP message's client hardware address (after an IPv4 header without
/// options and the UDP header).
const DHCP_CHADDR: i32 = 70;
const TCP_HEADER_END: u32 = 54;
const TCP_ACK: u32 = 0x10;
/// The smallest segment size a guest may ask the host to cut a frame into
/// (Linux's `tcp_min_snd_mss` default).
const MIN_GSO_SIZE: u32 = 48;

/// Compiles `policy` for a VM. The policy must not be empty.
pub fn compile(policy: &Policy, ctx: &Context) -> Result<Vec<Insn>, CompileError> {
    if policy.isolate && ctx.host_nets.len() > MAX_HOST_NETS {
        return Err(CompileError::TooManyHostNets(ctx.host_nets.len()));
    }
    let mut a = Asm::default();
    a.mov_reg(R6, R1);
    // A VLAN tag: the kernel has taken it off the frame before tc sees it
    // (skb->vlan_present), so the offsets below would read the inner
    // frame while the tag still takes it to another VLAN. Dropped.
    a.emit(LDX | MEM | W, R0, R6, SKB_VLAN_PRESENT, 0);
    a.jump_if(JNE, R0, 0, Target::Drop);
    a.emit(LDX | MEM | W, R0, R6, SKB_LEN, 0);
    a.jump_if(JLT, R0, MIN_LEN, Target::Drop);
    drop_pending_offloads(&mut a, ctx.skb.as_ref());
    let m = ctx.mac;
    a.load(H, ETH_SRC);
    a.jump_if(
        JNE,
        R0,
        u32::from(u16::from_be_bytes([m[0], m[1]])),
        Target::Drop,
    );
    a.load(W, ETH_SRC + 2);
    a.jump_if(
        JNE,
        R0,
        u32::from_be_bytes([m[2], m[3], m[4], m[5]]),
        Target::Drop,
    );
    a.load(H, ETH_TYPE);
    let ipv4 = a.label();
    a.jump_if(JEQ, R0, 0x0800, Target::Label(ipv4));
    a.jump_if(JNE, R0, 0x0806, Target::Drop);
    // ARP: the guest speaks for its own MAC, and for its own address only
    // (when known).
    a.load(H, ARP_SHA);
    a.jump_if(
        JNE,
        R0,
        u32::from(u16::from_be_bytes([m[0], m[1]])),
        Target::Drop,
    );
    a.load(W, ARP_SHA + 2);
    a.jump_if(
        JNE,
        R0,
        u32::from_be_bytes([m[2], m[3], m[4], m[5]]),
        Target::Drop,
    );
    match ctx.guest {
        Some(guest) => {
            a.load(W, ARP_SPA);
            a.jump_if(JEQ, R0, u32::from(guest), Target::Pass);
            a.jump_if(JEQ, R0, 0, Target::Pass);
            a.goto(Target::Drop);
        }
        None => a.goto(Target::Pass),
    }

    a.bind(ipv4);
    a.load(B, IP_VHL);
    a.jump_if(JNE, R0, 0x45, Target::Drop);
    a.load(H, IP_FRAG);
    a.and(R0, 0x3fff);
    a.jump_if(JNE, R0, 0, Target::Drop);
    a.load(B, IP_PROTO);
    a.mov_reg(R7, R0);
    a.load(W, IP_DST);
    a.mov_reg(R8, R0);
    a.load(W, L4_PORTS);
    a.mov_reg(R9, R0);
    // A DHCP request speaks for the VM's own MAC only (chaddr): no leases
    // taken, declined or released in another VM's name or a made-up one.
    let not_dhcp_client = a.label();
    a.jump_if(JNE, R7, 17, Target::Label(not_dhcp_client));
    a.jump_if(JNE, R9, (68 << 16) | 67, Target::Label(not_dhcp_client));
    a.emit(LDX | MEM | W, R0, R6, SKB_LEN, 0);
    a.jump_if(JLT, R0, DHCP_CHADDR as u32 + 6, Target::Drop);
    a.load(H, DHCP_CHADDR);
    a.jump_if(
        JNE,
        R0,
        u32::from(u16::from_be_bytes([m[0], m[1]])),
        Target::Drop,
    );
    a.load(W, DHCP_CHADDR + 2);
    a.jump_if(
        JNE,
        R0,
        u32::from_be_bytes([m[2], m[3], m[4], m[5]]),
        Target::Drop,
    );
    a.bind(not_dhcp_client);
    let source_ok = a.label();
    if let Some(guest) = ctx.guest {
        a.load(W, IP_SRC);
        a.jump_if(JEQ, R0, u32::from(guest), Target::Label(source_ok));
        a.jump_if(JNE, R0, 0, Target::Drop);
        // Source 0.0.0.0: only a DHCP request (UDP 68 -> 67).
        a.jump_if(JNE, R7, 17, Target::Drop);
        a.jump_if(JNE, R9, (68 << 16) | 67, Target::Drop);
        a.jump_if(JEQ, R8, u32::MAX, Target::Pass);
        a.goto(Target::Drop);
    }
    a.bind(source_ok);
    // DHCP: broadcast, and to lume's dnsmasq (renewals go to the server).
    // Bridged (no gateway): broadcast only, never unicast to an address
    // the policy would not let through otherwise; a client's unicast
    // renewal falls back to rebinding by broadcast.
    let not_dhcp = a.label();
    a.jump_if(JNE, R7, 17, Target::Label(not_dhcp));
    a.jump_if(JNE, R9, (68 << 16) | 67, Target::Label(not_dhcp));
    a.jump_if(JEQ, R8, u32::MAX, Target::Pass);
    if let Some(gw) = ctx.gateway {
        a.jump_if(JEQ, R8, u32::from(gw), Target::Pass);
    }
    a.bind(not_dhcp);
    if let Some(gw) = ctx.gateway {
        // Replies to connections the host opened to the guest's SSH port
        // (lume ssh, lume_exec, the doctor's probe): TCP from port 22 to the
        // gateway with ACK set, never a bare SYN, so the guest cannot open
        // a connection to the host, and the host reaches no other port of
        // the guest. The flags byte is read only when the frame holds a
        // whole TCP header.
        let not_reply = a.label();
        a.jump_if(JNE, R8, u32::from(gw), Target::Label(not_reply));
        a.jump_if(JNE, R7, 6, Target::Label(not_reply));
        a.mov_reg(R0, R9);
        a.emit(ALU | RSH | K, R0, 0, 0, 16);
        a.jump_if(
            JNE,
            R0,
            u32::from(crate::guest::ssh::SSH_PORT),
            Target::Label(not_reply),
        );
        a.emit(LDX | MEM | W, R0, R6, SKB_LEN, 0);
        a.jump_if(JLT, R0, TCP_HEADER_END, Target::Label(not_reply));
        a.load(B, TCP_FLAGS);
        a.and(R0, TCP_ACK);
        a.jump_if(JNE, R0, 0, Target::Pass);
        a.bind(not_reply);
        let not_dns = a.label();
        a.jump_if(JNE, R8, u32::from(gw), Target::Label(not_dns));
        let dns_proto = a.label();
        a.jump_if(JEQ, R7, 17, Target::Label(dns_proto));
        a.jump_if(JNE, R7, 6, Target::Label(not_dns));
        a.bind(dns_proto);
        a.mov_reg(R0, R9);
        a.and(R0, 0xffff);
        a.jump_if(JEQ, R0, 53, Target::Pass);
        a.bind(not_dns);
    }

    for r in &policy.deny_out {
        rule(&mut a, r, Target::Drop);
    }
    if policy.isolate {
        let nets = ISOLATED_RANGES
            .iter()
            .map(|(addr, p)| Cidr::new(*addr, *p))
            .chain(ctx.host_nets.iter().copied())
            // Each prefix covers the host's own address in it.
            // The gateway is one of the host's addresses; named anyway.
            .chain(ctx.gateway.map(|g| Cidr::new(g, 32)));
        for net in nets {
            rule(
                &mut a,
                &Rule {
                    net,
                    ports: None,
                    proto: None,
                },
                Target::Drop,
            );
        }
    }
    for r in &policy.allow_out {
        rule(&mut a, r, Target::Pass);
    }
    a.goto(if policy.allow_out.is_empty() {
        Target::Pass
    } else {
        Target::Drop
    });
    if let Some(bridge) = ctx.bridge {
        a.pass_via = Some(to_the_bridge_only(&mut a, &bridge));
    }
    a.finish()
}

/// Drops a frame the kernel would still checksum or segment after the
/// program read it, unless `skb` is known and the checksum goes to the
/// TCP or UDP header's own field (see the module's "Pending offloads").
fn drop_pending_offloads(a: &mut Asm, skb: Option<&SkbLayout>) {
    let pending = a.label();
    let done = a.label();
    // The first two bytes, saved at fp-8.
    a.copy_two_bytes(0, -8);
    // bpf_l4_csum_replace(ctx, 0, from 0, diff 1, flags 0): a field
    // changed by a difference, unless the frame's checksum is pending.
    a.mov_reg(R1, R6);
    a.mov_imm(R2, 0);
    a.mov_imm(R3, 0);
    a.mov_imm(R4, 1);
    a.mov_imm(R5, 0);
    a.call_or_drop(L4_CSUM_REPLACE);
    a.copy_two_bytes(0, -16);
    a.emit(LDX | MEM | H, R7, R10, -8, 0);
    a.emit(LDX | MEM | H, R0, R10, -16, 0);
    a.jump_if_reg(JEQ, R0, R7, Target::Label(pending));
    // Not pending: put the two bytes back; a frame to segment without a
    // pending checksum is no guest's (segmentation needs one).
    a.mov_reg(R1, R6);
    a.mov_imm(R2, 0);
    a.stack_ptr(R3, -8);
    a.mov_imm(R4, 2);
    a.mov_imm(R5, 0);
    a.call_or_drop(SKB_STORE_BYTES);
    a.emit(LDX | MEM | W, R0, R6, SKB_GSO_SIZE, 0);
    a.jump_if(JNE, R0, 0, Target::Drop);
    a.goto(Target::Label(done));

    a.bind(pending);
    let Some(skb) = skb else {
        a.goto(Target::Drop);
        a.bind(done);
        return;
    };
    // IPv4 without options (checked again below), checksum from the
    // transport header on (mac_header + 34) into TCP's field (16) or UDP's
    // (6): the kernel writes nothing else, and cuts a large frame at the
    // transport header the program reads.
    a.load(H, ETH_TYPE);
    a.jump_if(JNE, R0, 0x0800, Target::Drop);
    a.load(B, IP_VHL);
    a.jump_if(JNE, R0, 0x45, Target::Drop);
    // Segments of fewer bytes than Linux's smallest MSS (48): one frame
    // the host would cut into thousands of packets.
    let whole = a.label();
    a.emit(LDX | MEM | W, R0, R6, SKB_GSO_SIZE, 0);
    a.jump_if(JEQ, R0, 0, Target::Label(whole));
    a.jump_if(JLT, R0, MIN_GSO_SIZE, Target::Drop);
    a.bind(whole);
    read_skb(a, skb);
    a.emit(ALU64 | ADD | K, R1, 0, 0, L4_PORTS);
    a.jump_if_reg(JNE, R2, R1, Target::Drop);
    a.mov_reg(R7, R3);
    a.load(B, IP_PROTO);
    let udp = a.label();
    a.jump_if(JNE, R0, 6, Target::Label(udp));
    a.jump_if(JNE, R7, 16, Target::Drop);
    a.goto(Target::Label(done));
    a.bind(udp);
    a.jump_if(JNE, R0, 17, Target::Drop);
    a.jump_if(JNE, R7, 6, Target::Drop);
    a.bind(done);
}

/// r1 = skb->mac_header, r2 = skb->csum_start, r3 = skb->csum_offset
/// (context in r6), through `bpf_cast_to_kern_ctx`.
fn read_skb(a: &mut Asm, skb: &SkbLayout) {
    a.mov_reg(R1, R6);
    // BPF_PSEUDO_KFUNC_CALL: imm is the kfunc's id in the kernel's BTF.
    a.emit(JMP | CALL, 0, 2, 0, skb.cast_to_kern_ctx as i32);
    a.emit(LDX | MEM | H, R1, R0, skb.mac_header, 0);
    a.emit(LDX | MEM | H, R2, R0, skb.csum_start, 0);
    a.emit(LDX | MEM | H, R3, R0, skb.csum_offset, 0);
}

/// A program that only reads the fields (and passes every frame): loaded
/// once to learn whether the kernel accepts [`read_skb`].
pub(super) fn read_skb_fields(skb: &SkbLayout) -> Vec<Insn> {
    let mut a = Asm::default();
    a.mov_reg(R6, R1);
    read_skb(&mut a, skb);
    a.mov_imm(R0, TC_ACT_UNSPEC);
    a.emit(JMP | EXIT, 0, 0, 0, 0);
    a.insns
}

/// What passes, checked once more for nat and host (see the module's 7.):
/// to the bridge's MAC, or a broadcast handed to the bridge's receive path.
fn to_the_bridge_only(a: &mut Asm, bridge: &Bridge) -> usize {
    let m = bridge.mac;
    let epilogue = a.label();
    let broadcast = a.label();
    a.bind(epilogue);
    a.load(H, ETH_DST);
    a.jump_if(
        JNE,
        R0,
        u32::from(u16::from_be_bytes([m[0], m[1]])),
        Target::Label(broadcast),
    );
    a.load(W, ETH_DST + 2);
    a.jump_if(
        JEQ,
        R0,
        u32::from_be_bytes([m[2], m[3], m[4], m[5]]),
        Target::Accept,
    );
    a.bind(broadcast);
    a.load(H, ETH_DST);
    a.jump_if(JNE, R0, 0xffff, Target::Drop);
    a.load(W, ETH_DST + 2);
    a.jump_if(JNE, R0, u32::MAX, Target::Drop);
    // Broadcast: ARP, or IPv4 to 255.255.255.255 (DHCP).
    let redirect = a.label();
    a.load(H, ETH_TYPE);
    a.jump_if(JEQ, R0, 0x0806, Target::Label(redirect));
    a.load(W, IP_DST);
    a.jump_if(JNE, R0, u32::MAX, Target::Drop);
    a.bind(redirect);
    a.mov_imm(R1, bridge.index as i32);
    a.mov_imm(R2, BPF_F_INGRESS);
    a.emit(JMP | CALL, 0, 0, 0, REDIRECT);
    a.emit(JMP | EXIT, 0, 0, 0, 0);
    epilogue
}

/// Jumps to `verdict` when the packet (registers r7-r9) matches `r`.
fn rule(a: &mut Asm, r: &Rule, verdict: Target) {
    let next = a.label();
    let skip = Target::Label(next);
    a.unless_masked(R8, r.net.mask(), u32::from(r.net.addr), skip);
    match (r.proto, r.ports) {
        (Some(p), _) => a.jump_if(JNE, R7, u32::from(p.number()), skip),
        (None, Some(_)) => {
            let l4 = a.label();
            a.jump_if(JEQ, R7, 6, Target::Label(l4));
            a.jump_if(JNE, R7, 17, skip);
            a.bind(l4);
        }
        (None, None) => {}
    }
    if let Some((lo, hi)) = r.ports {
        a.mov_reg(R0, R9);
        a.and(R0, 0xffff);
        a.jump_if(JLT, R0, u32::from(lo), skip);
        a.jump_if(JGT, R0, u32::from(hi), skip);
    }
    a.goto(verdict);
    a.bind(next);
}

/// Why the program could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "Cannot load the network policy's eBPF program ({errno}): the kernel needs CONFIG_BPF_SYSCALL and CONFIG_NET_CLS_BPF, and lume needs CAP_BPF/CAP_SYS_ADMIN (run as root); the VM was not started"
    )]
    Unavailable { errno: nix::errno::Errno },
    #[error(
        "The kernel's verifier refused the network policy's eBPF program ({errno}); the VM was not started. Report this as a lume bug with the verifier's last lines: {log}"
    )]
    Refused {
        errno: nix::errno::Errno,
        log: String,
    },
    #[error(transparent)]
    Compile(#[from] CompileError),
}

impl LoadError {
    /// The kernel's answer (EINVAL for a compile error, which never reached
    /// it).
    pub fn errno(&self) -> nix::errno::Errno {
        match self {
            LoadError::Unavailable { errno } | LoadError::Refused { errno, .. } => *errno,
            LoadError::Compile(_) => nix::errno::Errno::EINVAL,
        }
    }
}

/// `union bpf_attr` for BPF_PROG_LOAD (the leading fields; the rest zero).
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    _rest: [u64; 12],
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
/// The verifier's log when a load is retried to say why it failed.
const LOG_SIZE: usize = 16 * 1024 * 1024;

/// A loaded program: its descriptor keeps it alive until the filter holds
/// it; `id` names it in the kernel (a filter dump shows it).
#[derive(Debug)]
pub struct Loaded {
    pub fd: OwnedFd,
    pub id: u32,
}

fn prog_load(insns: &[Insn], log: Option<&mut Vec<u8>>) -> Result<OwnedFd, nix::errno::Errno> {
    let license = c"GPL";
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        ..Default::default()
    };
    if let Some(log) = log {
        attr.log_level = 1;
        attr.log_size = log.len() as u32;
        attr.log_buf = log.as_mut_ptr() as u64;
    }
    attr.prog_name[..11].copy_from_slice(b"lume_policy");
    // SAFETY: `attr` is a valid, fully initialised bpf_attr prefix whose
    // pointers (instructions, license, log buffer) outlive the call; the
    // size passed is the struct's own, the tail is zero as the kernel wants.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &mut attr as *mut ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>() as u32,
        )
    };
    if fd < 0 {
        return Err(nix::errno::Errno::last());
    }
    // SAFETY: the syscall returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The kernel's id of the program behind `fd` (BPF_OBJ_GET_INFO_BY_FD).
fn prog_id(fd: &OwnedFd) -> Result<u32, nix::errno::Errno> {
    use std::os::fd::AsRawFd;
    // struct bpf_prog_info's first fields: type, id, tag[8], ...
    let mut info = [0u32; 64];
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: 8,
        info: info.as_mut_ptr() as u64,
    };
    // SAFETY: a valid BPF_OBJ_GET_INFO_BY_FD attr; the kernel writes at
    // most `info_len` (8) bytes into `info`, which is larger and outlives
    // the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET_INFO_BY_FD,
            &mut attr as *mut InfoAttr,
            std::mem::size_of::<InfoAttr>() as u32,
        )
    };
    if r < 0 {
        return Err(nix::errno::Errno::last());
    }
    Ok(info[1])
}

/// Loads `insns` as a `SCHED_CLS` program. Without a verifier log first
/// (a log too small for a long program would fail the load itself); when
/// the load fails, once more with a large log to say why.
pub fn load(insns: &[Insn]) -> Result<Loaded, LoadError> {
    let fd = match prog_load(insns, None) {
        Ok(fd) => fd,
        Err(errno) => {
            let mut log = vec![0u8; LOG_SIZE];
            let again = prog_load(insns, Some(&mut log));
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            return Err(match again {
                // Not reproducible: report the first failure as it was.
                Ok(_) => LoadError::Unavailable { errno },
                Err(_) if text.trim().is_empty() => LoadError::Unavailable { errno },
                Err(errno) => LoadError::Refused {
                    errno,
                    log: text.lines().rev().take(3).collect::<Vec<_>>().join(" | "),
                },
            });
        }
    };
    let id = prog_id(&fd).map_err(|errno| LoadError::Unavailable { errno })?;
    Ok(Loaded { fd, id })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Context {
        Context {
            mac: [0x52, 0x54, 0, 1, 2, 3],
            guest: Some(Ipv4Addr::new(203, 0, 113, 50)),
            gateway: Some(Ipv4Addr::new(203, 0, 113, 1)),
            host_nets: vec![Cidr::new(Ipv4Addr::new(198, 51, 100, 0), 24)],
            bridge: Some(Bridge {
                mac: BRIDGE_MAC,
                index: 1,
            }),
            skb: SkbLayout::running(),
        }
    }

    #[test]
    fn every_jump_lands_inside_the_program() {
        let p = Policy::from_parts(
            &["198.51.100.2:8000/tcp".into(), "0.0.0.0/0:443".into()],
            &["10.0.0.0/8".into()],
            true,
        )
        .unwrap();
        let insns = compile(&p, &ctx()).unwrap();
        for (i, ins) in insns.iter().enumerate() {
            let class = ins.code & 0x07;
            if (class == JMP || class == JMP32) && ![EXIT, CALL].contains(&(ins.code & 0xf0)) {
                let dest = i as i64 + 1 + i64::from(ins.off);
                assert!(dest > i as i64 && (dest as usize) < insns.len(), "{i}");
            }
        }
        assert_eq!(insns.last().unwrap().code, JMP | EXIT);
    }

    /// Runs the loaded program on `frame` in the kernel (BPF_PROG_TEST_RUN)
    /// and returns its verdict.
    fn verdict(prog: &OwnedFd, frame: &[u8]) -> i32 {
        run(prog, frame, 0).0
    }

    /// Runs the loaded program on `frame`, as an skb with `gso_size`, and
    /// returns its verdict and the frame as the program left it.
    fn run(prog: &OwnedFd, frame: &[u8], gso_size: u32) -> (i32, Vec<u8>) {
        use std::os::fd::AsRawFd;
        #[repr(C)]
        #[derive(Default)]
        struct TestRun {
            prog_fd: u32,
            retval: u32,
            data_size_in: u32,
            data_size_out: u32,
            data_in: u64,
            data_out: u64,
            repeat: u32,
            duration: u32,
            ctx_size_in: u32,
            ctx_size_out: u32,
            ctx_in: u64,
            ctx_out: u64,
            flags: u32,
            cpu: u32,
            batch_size: u32,
            _pad: u32,
        }
        // `struct __sk_buff` up to and including `gso_size` (zeros but
        // for the fields test runs take: len is the frame's, gso_size).
        let mut ctx = [0u8; 184];
        ctx[SKB_GSO_SIZE as usize..SKB_GSO_SIZE as usize + 4]
            .copy_from_slice(&gso_size.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        let mut attr = TestRun {
            prog_fd: prog.as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_in: frame.as_ptr() as u64,
            data_size_out: out.len() as u32,
            data_out: out.as_mut_ptr() as u64,
            ctx_size_in: ctx.len() as u32,
            ctx_in: ctx.as_ptr() as u64,
            repeat: 1,
            ..Default::default()
        };
        // SAFETY: a valid BPF_PROG_TEST_RUN attr whose input buffers and
        // output buffer (of the size given) outlive the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                10 as libc::c_long,
                &mut attr as *mut TestRun,
                std::mem::size_of::<TestRun>() as u32,
            )
        };
        assert_eq!(r, 0, "BPF_PROG_TEST_RUN: {}", nix::errno::Errno::last());
        out.truncate(attr.data_size_out as usize);
        (attr.retval as i32, out)
    }

    const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 1, 2, 3];
    const BRIDGE_MAC: [u8; 6] = [0x02, 0xb0, 0, 0, 0, 1];
    const OTHER_VM_MAC: [u8; 6] = [0x52, 0x54, 0, 7, 7, 7];

    /// An Ethernet frame from `src_mac` carrying IPv4 `proto` from `src`
    /// to `dst`, ports `sport` -> `dport`, padded to 60 bytes; to the
    /// bridge's MAC (broadcast for 255.255.255.255).
    fn ipv4(
        src_mac: [u8; 6],
        src: [u8; 4],
        dst: [u8; 4],
        proto: u8,
        sport: u16,
        dport: u16,
    ) -> Vec<u8> {
        let mut f = if dst == [255; 4] {
            vec![0xff; 6]
        } else {
            BRIDGE_MAC.to_vec()
        };
        f.extend_from_slice(&src_mac);
        f.extend_from_slice(&[0x08, 0x00]);
        let ip = [0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, proto, 0, 0];
        f.extend_from_slice(&ip);
        f.extend_from_slice(&src);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&sport.to_be_bytes());
        f.extend_from_slice(&dport.to_be_bytes());
        f.resize(60, 0);
        if proto == 17 && (sport, dport) == (68, 67) {
            // A DHCP message: 236 bytes, the client's MAC at chaddr.
            f.resize(42 + 236, 0);
            f[70..76].copy_from_slice(&src_mac);
        }
        f
    }

    /// `frame` addressed at layer 2 to `mac`.
    fn to_mac(mac: [u8; 6], mut frame: Vec<u8>) -> Vec<u8> {
        frame[..6].copy_from_slice(&mac);
        frame
    }

    fn arp(src_mac: [u8; 6], spa: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&src_mac);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&src_mac);
        f.extend_from_slice(&spa);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&[203, 0, 113, 1]);
        f.resize(60, 0);
        f
    }

    /// A hostile guest's frames against a real policy in the kernel: only
    /// the allowed destination, DHCP and DNS to the gateway pass; spoofed
    /// MACs and sources, ARP for another address, IPv6, fragments, IP
    /// options, short frames, the host, other ports and protocols do not.
    #[test]
    fn the_kernel_runs_the_policy_as_a_hostile_guest_would_try_it() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let g = [203, 0, 113, 50];
        let gw = [203, 0, 113, 1];
        let allowed = [198, 51, 100, 2];
        let p = Policy::from_parts(&["198.51.100.2:8000/tcp".into()], &[], false).unwrap();
        let prog = load(&compile(&p, &ctx()).unwrap()).unwrap().fd;
        let v = |f: &[u8]| verdict(&prog, f);
        const OK: i32 = TC_ACT_UNSPEC;
        const SHOT: i32 = TC_ACT_SHOT;
        const REDIRECT: i32 = 7;
        // Allowed, and the exceptions every policy keeps.
        assert_eq!(v(&ipv4(GUEST_MAC, g, allowed, 6, 40000, 8000)), OK);
        assert_eq!(v(&ipv4(GUEST_MAC, g, gw, 17, 40000, 53)), OK);
        assert_eq!(v(&ipv4(GUEST_MAC, g, gw, 6, 40000, 53)), OK);
        // Replies to the host's connections (ACK set), any port; never a
        // SYN to the host, nor a frame too short to show its flags.
        let tcp_to_gw = |flags: u8| {
            let mut f = ipv4(GUEST_MAC, g, gw, 6, 22, 40000);
            f[47] = flags;
            f
        };
        let mut from_other_port = tcp_to_gw(0x10);
        from_other_port[34..36].copy_from_slice(&8080u16.to_be_bytes());
        assert_eq!(
            v(&from_other_port),
            SHOT,
            "a reply from another port than SSH's"
        );
        assert_eq!(v(&tcp_to_gw(0x10)), OK, "ACK");
        assert_eq!(v(&tcp_to_gw(0x12)), OK, "SYN-ACK");
        assert_eq!(v(&tcp_to_gw(0x14)), OK, "RST-ACK");
        assert_eq!(v(&tcp_to_gw(0x02)), SHOT, "SYN");
        assert_eq!(v(&tcp_to_gw(0x04)), SHOT, "RST");
        assert_eq!(v(&tcp_to_gw(0x10)[..53]), SHOT, "too short for flags");
        // Broadcasts go to the bridge's own receive path, not its ports.
        assert_eq!(v(&ipv4(GUEST_MAC, [0; 4], [255; 4], 17, 68, 67)), REDIRECT);
        assert_eq!(v(&ipv4(GUEST_MAC, g, gw, 17, 68, 67)), OK);
        assert_eq!(v(&arp(GUEST_MAC, g)), REDIRECT);
        assert_eq!(v(&to_mac(BRIDGE_MAC, arp(GUEST_MAC, g))), OK);
        // Everything else.
        for (what, f) in [
            ("next port", ipv4(GUEST_MAC, g, allowed, 6, 40000, 8001)),
            (
                "udp to the allowed port",
                ipv4(GUEST_MAC, g, allowed, 17, 40000, 8000),
            ),
            (
                "icmp to the allowed host",
                ipv4(GUEST_MAC, g, allowed, 1, 0x0800, 0),
            ),
            (
                "another address",
                ipv4(GUEST_MAC, g, [198, 51, 100, 3], 6, 40000, 8000),
            ),
            ("the gateway, not DNS", ipv4(GUEST_MAC, g, gw, 6, 40000, 22)),
            (
                "DNS elsewhere",
                ipv4(GUEST_MAC, g, [198, 51, 100, 3], 17, 40000, 53),
            ),
            (
                "spoofed MAC",
                ipv4([0x52, 0x54, 0, 9, 9, 9], g, allowed, 6, 40000, 8000),
            ),
            (
                "spoofed source",
                ipv4(GUEST_MAC, [203, 0, 113, 51], allowed, 6, 40000, 8000),
            ),
            (
                "source 0 not DHCP",
                ipv4(GUEST_MAC, [0; 4], allowed, 6, 40000, 8000),
            ),
            ("ARP for another address", arp(GUEST_MAC, [203, 0, 113, 51])),
            ("ARP from a spoofed MAC", arp([0x52, 0x54, 0, 9, 9, 9], g)),
            (
                "the allowed address, at layer 2 to another VM",
                to_mac(OTHER_VM_MAC, ipv4(GUEST_MAC, g, allowed, 6, 40000, 8000)),
            ),
            (
                "the allowed address, at layer 2 to everyone",
                to_mac([0xff; 6], ipv4(GUEST_MAC, g, allowed, 6, 40000, 8000)),
            ),
            (
                "DHCP, at layer 2 to another VM",
                to_mac(OTHER_VM_MAC, ipv4(GUEST_MAC, [0; 4], [255; 4], 17, 68, 67)),
            ),
            (
                "another VM not allowed",
                to_mac(
                    OTHER_VM_MAC,
                    ipv4(GUEST_MAC, g, [203, 0, 113, 7], 6, 40000, 8000),
                ),
            ),
            (
                "DNS to the gateway, at layer 2 to another VM",
                to_mac(OTHER_VM_MAC, ipv4(GUEST_MAC, g, gw, 17, 40000, 53)),
            ),
            (
                "DHCP to the gateway, at layer 2 to a multicast group",
                to_mac([0x01, 0, 0x5e, 0, 0, 1], ipv4(GUEST_MAC, g, gw, 17, 68, 67)),
            ),
            ("ARP to another VM", to_mac(OTHER_VM_MAC, arp(GUEST_MAC, g))),
            ("DHCP in another VM's name", {
                let mut f = ipv4(GUEST_MAC, [0; 4], [255; 4], 17, 68, 67);
                f[70..76].copy_from_slice(&OTHER_VM_MAC);
                f
            }),
            (
                "DHCP too short to name its client",
                ipv4(GUEST_MAC, [0; 4], [255; 4], 17, 68, 67)[..75].to_vec(),
            ),
        ] {
            assert_eq!(v(&f), SHOT, "{what}");
        }
        // Another VM, even one the rules allow, is never reached at layer 2
        // (only through the bridge's MAC, i.e. the host).
        let p = Policy::from_parts(&["203.0.113.7:8000/tcp".into()], &[], false).unwrap();
        let vm = load(&compile(&p, &ctx()).unwrap()).unwrap().fd;
        let f = ipv4(GUEST_MAC, g, [203, 0, 113, 7], 6, 40000, 8000);
        assert_eq!(verdict(&vm, &to_mac(OTHER_VM_MAC, f.clone())), SHOT);
        assert_eq!(verdict(&vm, &f), OK);
        // IP options: the ports would be elsewhere.
        let mut f = ipv4(GUEST_MAC, g, allowed, 6, 40000, 8000);
        f[14] = 0x46;
        assert_eq!(v(&f), SHOT, "IP options");
        // Fragments, first (MF) and later (offset).
        let mut f = ipv4(GUEST_MAC, g, allowed, 6, 40000, 8000);
        f[20] = 0x20;
        assert_eq!(v(&f), SHOT, "first fragment");
        let mut f = ipv4(GUEST_MAC, g, allowed, 6, 40000, 8000);
        f[21] = 0x10;
        assert_eq!(v(&f), SHOT, "later fragment");
        // IPv6 and VLAN-tagged frames, whatever they carry.
        let mut f = ipv4(GUEST_MAC, g, allowed, 6, 40000, 8000);
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(v(&f), SHOT, "IPv6");
        f[12..14].copy_from_slice(&[0x81, 0x00]);
        assert_eq!(v(&f), SHOT, "VLAN");
        // Too short to carry ports.
        let f = ipv4(GUEST_MAC, g, allowed, 6, 40000, 8000);
        assert_eq!(v(&f[..38]), SHOT, "short frame");

        // isolate + deny: the internet yes, minus the denied port; not the
        // host's networks, its addresses, private ranges or multicast.
        let p = Policy::from_parts(&[], &["0.0.0.0/0:25/tcp".into()], true).unwrap();
        let prog = load(&compile(&p, &ctx()).unwrap()).unwrap().fd;
        let v = |f: &[u8]| verdict(&prog, f);
        assert_eq!(v(&ipv4(GUEST_MAC, g, [192, 0, 2, 1], 6, 40000, 443)), OK);
        assert_eq!(v(&ipv4(GUEST_MAC, g, [192, 0, 2, 1], 1, 0x0800, 0)), OK);
        assert_eq!(v(&ipv4(GUEST_MAC, g, gw, 17, 40000, 53)), OK);
        for (what, dst, proto, port) in [
            ("denied port", [192, 0, 2, 1], 6, 25),
            ("the host's LAN", [198, 51, 100, 7], 6, 443),
            ("RFC 1918", [10, 1, 2, 3], 6, 443),
            ("RFC 1918", [192, 168, 1, 1], 6, 443),
            ("RFC 1918", [172, 20, 0, 1], 6, 443),
            ("link-local", [169, 254, 169, 254], 6, 80),
            ("CGNAT", [100, 100, 0, 1], 6, 443),
            ("loopback", [127, 0, 0, 1], 6, 443),
            ("multicast", [224, 0, 0, 251], 17, 5353),
            ("broadcast", [255, 255, 255, 255], 17, 9),
            ("the gateway, not DNS", gw, 6, 22),
        ] {
            assert_eq!(
                v(&ipv4(GUEST_MAC, g, dst, proto, 40000, port)),
                SHOT,
                "{what}"
            );
        }
    }

    /// Bridged: the guest's address and the DHCP server are the LAN's, so
    /// DHCP goes to any server and sources are not checked; the rest holds.
    #[test]
    fn frames_leave_unchanged_and_offloaded_ones_are_dropped() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: needs root (BPF)");
            return;
        }
        let p = Policy::from_parts(&["198.51.100.2:8000/udp".into()], &[], false).unwrap();
        let prog = load(&compile(&p, &ctx()).unwrap()).unwrap();
        let allowed = ipv4(
            GUEST_MAC,
            [203, 0, 113, 50],
            [198, 51, 100, 2],
            17,
            40000,
            8000,
        );
        // The pending-checksum probe writes the first two bytes and puts
        // them back: what leaves is what the guest sent.
        let (v, out) = run(&prog.fd, &allowed, 0);
        assert_eq!(v, TC_ACT_UNSPEC);
        assert_eq!(out, allowed);
        // A frame the kernel would still segment (a guest handing over one
        // large frame through the virtio-net header): dropped, even to an
        // allowed destination.
        assert_eq!(run(&prog.fd, &allowed, 1400).0, TC_ACT_SHOT);
    }

    #[test]
    fn bridged_policies_let_dhcp_reach_the_lans_server() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let ctx = Context {
            guest: None,
            gateway: None,
            bridge: None,
            ..ctx()
        };
        let p = Policy::from_parts(&["198.51.100.1:8000/tcp".into()], &[], true).unwrap();
        let prog = load(&compile(&p, &ctx).unwrap()).unwrap().fd;
        let v = |f: &[u8]| verdict(&prog, f);
        let g = [198, 51, 100, 120];
        assert_eq!(
            v(&ipv4(GUEST_MAC, [0; 4], [255; 4], 17, 68, 67)),
            TC_ACT_UNSPEC
        );
        assert_eq!(v(&ipv4(GUEST_MAC, g, [255; 4], 17, 68, 67)), TC_ACT_UNSPEC);
        // DHCP's ports are no tunnel: unicast to any address is not DHCP.
        assert_eq!(
            v(&ipv4(GUEST_MAC, g, [198, 51, 100, 1], 17, 68, 67)),
            TC_ACT_SHOT
        );
        assert_eq!(
            v(&ipv4(GUEST_MAC, g, [192, 0, 2, 1], 17, 68, 67)),
            TC_ACT_SHOT
        );
        assert_eq!(v(&arp(GUEST_MAC, g)), TC_ACT_UNSPEC);
        // ARP naming another MAC than the VM's (poisoning the LAN's caches).
        let mut f = arp(GUEST_MAC, g);
        f[22..28].copy_from_slice(&[0x52, 0x54, 0, 9, 9, 9]);
        assert_eq!(v(&f), TC_ACT_SHOT);
        // Isolated from the host's LAN (198.51.100.0/24 in ctx()), so the
        // allow rule inside it does not open it (deny and isolate first).
        assert_eq!(
            v(&ipv4(GUEST_MAC, g, [198, 51, 100, 1], 6, 40000, 8000)),
            TC_ACT_SHOT
        );
        assert_eq!(
            v(&ipv4(GUEST_MAC, g, [198, 51, 100, 1], 17, 40000, 53)),
            TC_ACT_SHOT
        );
        assert_eq!(
            v(&ipv4(GUEST_MAC, g, [192, 0, 2, 1], 6, 40000, 443)),
            TC_ACT_SHOT
        );
        assert_eq!(
            v(&ipv4([2, 0, 0, 0, 0, 1], g, [255; 4], 17, 68, 67)),
            TC_ACT_SHOT
        );
    }

    /// The kernel's verifier accepts the program at the documented maximum
    /// (MAX_RULES rules, with ports, plus --isolate and MAX_HOST_NETS host
    /// networks), and the rule just past it is refused by the check
    /// (root only).
    #[test]
    fn the_kernel_loads_the_largest_policy_allowed() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let allow: Vec<String> = (0..super::super::MAX_RULES - 1)
            .map(|i| {
                format!(
                    "198.51.{}.{}:{}-{}/tcp",
                    i / 256,
                    i % 256,
                    1000 + i,
                    2000 + i
                )
            })
            .collect();
        let p = Policy::from_parts(&allow, &["10.0.0.0/8:25".into()], true).unwrap();
        assert!(p.check(&crate::network::NetworkMode::Nat).is_ok());
        let mut c = ctx();
        c.host_nets = (0..MAX_HOST_NETS as u32)
            .map(|i| Cidr::new(Ipv4Addr::from(0x0a00_0000 + (i << 8)), 24))
            .collect();
        let loaded = load(&compile(&p, &c).unwrap()).unwrap();
        assert!(loaded.id > 0);
        let mut too_many = p.clone();
        too_many.allow_out.push("192.0.2.1".parse().unwrap());
        assert!(matches!(
            too_many.check(&crate::network::NetworkMode::Nat),
            Err(super::super::PolicyError::TooMany(_))
        ));
        c.host_nets.push(Cidr::new(Ipv4Addr::new(192, 0, 2, 0), 24));
        assert_eq!(
            compile(&p, &c).unwrap_err(),
            CompileError::TooManyHostNets(MAX_HOST_NETS + 1)
        );
    }

    /// A program the verifier refuses says so, with the verifier's words,
    /// not "the kernel lacks BPF".
    #[test]
    fn a_refused_program_is_reported_as_refused() {
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        // r0 is never set before exit.
        let bad = [Insn {
            code: JMP | EXIT,
            regs: 0,
            off: 0,
            imm: 0,
        }];
        match load(&bad) {
            Err(LoadError::Refused { log, .. }) => assert!(log.contains("R0"), "{log}"),
            other => panic!("{other:?}"),
        }
    }

    /// A jump that cannot reach its target is refused, never wrapped.
    #[test]
    fn a_jump_past_i16_is_refused() {
        let mut a = Asm::default();
        a.goto(Target::Drop);
        for _ in 0..40_000 {
            a.mov_reg(R0, R0);
        }
        assert!(matches!(a.finish(), Err(CompileError::TooLong(_))));
    }
}
