//! Self-healing. While NAT or host-only VMs run, one watcher per network
//! namespace puts lume's state back whenever something else changes it: a
//! VPN client or firewall reload flushing the ruleset, forwarding switched
//! off, the bridge or a tap's membership lost, dnsmasq killed. It wakes on
//! kernel events (links, addresses, routes, nftables) and checks every
//! [`PERIOD`] anyway, so a missed event costs at most that long.
//!
//! While only VMs bridged onto Linux bridges run, it keeps lume's accepts
//! for those bridges in other tools' chains.
//!
//! Every supervisor of a NAT or host-only VM, or of a VM bridged onto a
//! Linux bridge, runs a [`Healer`]; the one that
//! holds `<runtime>/watcher.lock` watches, the others wait on the lock, so
//! when the watching VM stops another takes over within [`PERIOD`].

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::kernel::events::Events;
use super::shared::{Networks, Warning};
use crate::util::time::timestamp;
use crate::vm::lock::VmLock;

/// The longest a change goes unnoticed when its event is missed.
pub const PERIOD: Duration = Duration::from_millis(250);

/// A running watcher thread; dropping it stops the thread.
#[derive(Debug)]
pub struct Healer {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Healer {
    pub fn start(networks: Networks) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || run(&networks, &flag));
        Self {
            stop,
            handle: Some(handle),
        }
    }
}

impl Drop for Healer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The file where every repair and warning of this namespace is recorded.
pub fn repairs_log(networks: &Networks) -> std::path::PathBuf {
    networks.root.join("repairs.log")
}

/// Appends one timestamped line to the namespace's repair log and to the log
/// of every VM using the shared networks.
fn record(networks: &Networks, line: &str) {
    let stamped = format!("[{}] {line}\n", timestamp());
    let mut targets = vec![repairs_log(networks)];
    for net in [&networks.nat, &networks.host] {
        targets.extend(net.members().into_iter().map(|m| m.vm_dir.join("lume.log")));
    }
    targets.extend(
        networks
            .bridged_members()
            .into_iter()
            .map(|m| m.vm_dir.join("lume.log")),
    );
    for path in targets {
        // Capped like every log: repairs can repeat for as long as something
        // keeps undoing them.
        let _ = crate::hypervisor::logcap::append(
            &path,
            stamped.as_bytes(),
            crate::hypervisor::logcap::cap(),
        );
    }
}

fn run(networks: &Networks, stop: &AtomicBool) {
    let lock_path = networks.root.join("watcher.lock");
    while !stop.load(Ordering::SeqCst) {
        match VmLock::try_acquire(&lock_path) {
            Ok(Some(lock)) => {
                watch(networks, stop);
                drop(lock);
            }
            _ => std::thread::sleep(PERIOD),
        }
    }
}

/// The watching loop, while this process holds the watcher lock.
fn watch(networks: &Networks, stop: &AtomicBool) {
    let mut networks = networks.clone();
    let mut events = Events::open();
    let mut warned: HashSet<Warning> = HashSet::new();
    record(
        &networks,
        &format!(
            "watcher: process {} now watches lume's networks ({} event sources, check every {} ms)",
            std::process::id(),
            events.sources(),
            PERIOD.as_millis()
        ),
    );
    let mut tick: u32 = 0;
    // Other tools' drops as last listed, for the warnings: listed again
    // after an nftables event or once a second, not for a link's or a
    // route's event (a VM's tap coming or going).
    let mut drops = None;
    while !stop.load(Ordering::SeqCst) {
        let woken = events.wait(PERIOD);
        if stop.load(Ordering::SeqCst) {
            break;
        }
        // Links, addresses, dnsmasq and forwarding are checked through
        // netlink and /proc every pass; the firewall needs a ruleset
        // listing, so it is checked on nftables events and every 4th pass
        // (about once a second).
        tick = tick.wrapping_add(1);
        let slow = tick.is_multiple_of(4);
        // config.yaml's firewallAccommodation applies to every running VM
        // within a second, whatever the value this watcher started with;
        // read before each firewall check, so that a VM started with
        // another value (an nftables event) is not undone with the old one.
        if (woken.nft || slow)
            && let Some(on) = networks.accommodation_changed()
        {
            match networks.apply_accommodation(on) {
                Some(note) => record(&networks, &note),
                // A join or leave holds the lock: not with the old value now.
                None => continue,
            }
        }
        for repair in networks.heal(woken.nft || slow) {
            record(&networks, &format!("repaired: {repair}"));
        }
        if slow {
            networks.cap_logs();
        }
        if !(woken.nft || woken.net || slow) {
            continue;
        }
        if woken.nft || slow {
            drops = None;
        }
        let now: HashSet<Warning> = networks.warnings_with(&mut drops).into_iter().collect();
        for w in now.difference(&warned) {
            record(&networks, &format!("warning: {w}"));
        }
        for w in warned.difference(&now) {
            record(&networks, &format!("resolved: {w}"));
        }
        warned = now;
    }
}
