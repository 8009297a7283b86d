//! Repairs: puts what lume's running VMs need back after something else
//! changed it (called by the watcher, [`crate::network::heal`]).

use super::*;

impl Networks {
    /// Keeps the logs that guests make grow (dnsmasq's) within their cap.
    pub fn cap_logs(&self) {
        for net in [&self.nat, &self.host] {
            net.dnsmasq().cap_log(crate::network::dnsmasq::LOG_CAP);
        }
    }

    /// Puts everything lume's running NAT and host-only VMs need back in
    /// place: bridges, gateway addresses, tap membership, dnsmasq, IPv4
    /// forwarding and lume's firewall table. Returns what it repaired.
    /// The firewall is listed (an `nft` process) only when `check_firewall`
    /// is set: on nftables events and once a second.
    pub fn heal(&self, check_firewall: bool) -> Vec<String> {
        let path = self.root.join("network.lock");
        // Never wait long: a join or leave in progress is itself a repair.
        let Ok(Some(_guard)) = VmLock::acquire_within(&path, Duration::from_millis(200)) else {
            return Vec::new();
        };
        let mut repairs = Vec::new();
        let mut any = false;
        let mut collected = false;
        for net in [&self.nat, &self.host] {
            let (members, dead): (Vec<Member>, Vec<Member>) =
                net.members().into_iter().partition(Member::alive);
            // A supervisor that was killed cannot leave: collect its share now.
            for m in dead.iter().filter(|_| !members.is_empty()) {
                if net.remove_member(&m.id()).is_ok() {
                    collected = true;
                    repairs.push(format!(
                        "VM '{}' stopped without leaving {} (its supervisor died): removed its reservation and published ports",
                        m.vm, net.bridge
                    ));
                }
            }
            if members.is_empty() {
                continue;
            }
            any = true;
            if let Err(e) = net.heal(&members, &mut repairs) {
                repairs.push(format!(
                    "could not repair the {} network: {}",
                    net.bridge,
                    crate::error_chain(&e)
                ));
            }
        }
        let mut bridged = false;
        for m in self.bridged_members() {
            if m.alive() {
                bridged = true;
            } else if self.remove_bridged(&m.id()).is_ok() {
                collected = true;
                repairs.push(format!(
                    "VM '{}' bridged onto {} stopped without leaving (its supervisor died): removed its record",
                    m.vm, m.bridge
                ));
            }
        }
        if collected && let Err(e) = self.apply_firewall() {
            repairs.push(format!(
                "could not rewrite lume's firewall table: {}",
                crate::error_chain(&e)
            ));
        }
        if (any || bridged) && check_firewall {
            self.heal_firewall(any, &mut repairs);
        }
        repairs
    }

    /// The firewall part of [`Self::heal`] (under the network lock): puts
    /// lume's table back when it is missing or changed (`any`: NAT or
    /// host-only VMs run, which need it) and lume's accepts in other tools'
    /// chains. When the ruleset's generation is the one a full check found
    /// everything in place at, nothing (lume's or another tool's) has
    /// changed since: nothing is listed (each listing holds the whole
    /// ruleset, and this runs every second and on every nftables event).
    pub(crate) fn heal_firewall(&self, any: bool, repairs: &mut Vec<String>) {
        // Read before the check: a change during it moves the generation
        // on, so the next pass checks again.
        let generation = self.firewall.generation();
        if generation.is_some() && self.checked().map(|c| c.generation) == generation {
            return;
        }
        let before = repairs.len();
        let tools = self.heal_firewall_listed(generation, any, repairs);
        let checked = self.root.join(CHECKED_GENERATION);
        match (generation, tools) {
            // Everything was in place: nothing to say, nothing written.
            (Some(generation), Some(tools)) if repairs.len() == before => {
                let c = CheckedRuleset { generation, tools };
                let _ = crate::util::atomic::write_runtime(&checked, c.to_string().as_bytes());
            }
            _ => {
                let _ = fs::remove_file(&checked);
            }
        }
    }

    /// The generation at which the last full check found everything in
    /// place, and whether another tool's chain existed then.
    fn checked(&self) -> Option<CheckedRuleset> {
        fs::read_to_string(self.root.join(CHECKED_GENERATION))
            .ok()?
            .parse()
            .ok()
    }

    /// Whether the ruleset at `now` (its generation read by the caller;
    /// `None`: not known) is one a full check found in place with no
    /// other tool's chain, or the one lume's last write left when there
    /// was no such chain before it: a write then has nothing to plan
    /// around and need not list it. A generation read earlier than the
    /// last change only ever fails to match, which costs a listing.
    pub(super) fn unchanged_without_tools(&self, now: Option<RulesetGeneration>) -> bool {
        now.is_some_and(
            |generation| match self.checked().filter(|c| c.generation == generation) {
                Some(checked) => !checked.tools,
                None => self.written_without_tools(generation),
            },
        )
    }

    /// [`Self::heal_firewall`]'s check, listing the ruleset; whether
    /// another tool's chain exists (`None`: not known).
    fn heal_firewall_listed(
        &self,
        generation: Option<RulesetGeneration>,
        any: bool,
        repairs: &mut Vec<String>,
    ) -> Option<bool> {
        // After a flush (the usual case) lume's table is simply gone:
        // `nft list tables` says so in the same few milliseconds
        // whatever the size of the ruleset, and the table is written
        // back before anything is listed (the listing of a ruleset with
        // many VMs' rules takes tens of milliseconds). Whether other
        // tools' chains are there is taken from the last write, and
        // corrected below once the ruleset is listed.
        let gone = any && matches!(self.firewall.present(), Ok(false));
        let saved = fs::read_to_string(self.root.join("nft.listing")).ok();
        let listing = if gone {
            Ok(None)
        } else {
            self.firewall.listing()
        };
        match listing {
            Ok(Some(current)) if self.as_written(&current, generation) => {
                if saved.is_none() {
                    // The write left taking the baseline to this check.
                    let path = self.root.join("nft.listing");
                    let _ = crate::util::atomic::write_runtime(&path, current.as_bytes());
                }
            }
            // Only bridged VMs run: lume's table is not needed.
            Ok(current) if !any && current == saved => {}
            Ok(current) => {
                let what = match (&current, &saved) {
                    (None, _) => "missing",
                    // The write left the baseline to this check, and
                    // nftables changed (by anyone) before it looked:
                    // not known whether lume's tables did.
                    (Some(_), None) => {
                        "not confirmed as written (nftables changed before the check)"
                    }
                    (Some(_), Some(_)) => "changed",
                };
                let written = if gone {
                    self.write_firewall_with(self.accommodate && self.marks())
                } else {
                    self.write_firewall(generation)
                };
                match written {
                    Ok((_, changes)) => {
                        repairs.push(format!("nftables table inet lume was {what}: restored it"));
                        repairs.extend(changes);
                    }
                    Err(e) => repairs.push(format!(
                        "nftables table inet lume is {what} and could not be restored: {}",
                        crate::error_chain(&e)
                    )),
                }
            }
            // Only bridged VMs run, on a host without nftables:
            // nothing to watch in the firewall.
            Err(FirewallError::NftMissing) if !any => {}
            Err(e) => repairs.push(format!("cannot list nftables: {e}")),
        }
        // Docker restarting, `ufw reload` or `firewall-cmd --reload`
        // rewrite their chains without lume's accepts.
        match self.accommodate() {
            Ok(done) => {
                repairs.extend(done.changes);
                let marks = self.marks();
                if self.accommodate && done.tools != marks {
                    // The tools may change again while lume writes (a
                    // chain deleted, then another tool's table loaded):
                    // the log says what was written, not what was seen.
                    match self.write_firewall(generation) {
                        Ok((now, changes)) => {
                            repairs.extend(changes);
                            if now != marks {
                                repairs.push(if now {
                                    "Docker's, ufw's or firewalld's chains appeared: lume's table now marks replies and published ports for its accepts there"
                                } else {
                                    "no Docker, ufw or firewalld chain is left: lume's table no longer marks packets"
                                }.to_string());
                            }
                        }
                        Err(e) => repairs.push(format!(
                            "could not rewrite lume's firewall table: {}",
                            crate::error_chain(&e)
                        )),
                    }
                }
                Some(done.tools)
            }
            Err(SharedError::Firewall(FirewallError::NftMissing)) if !any => None,
            Err(e) => {
                repairs.push(format!(
                    "could not put lume's accepts back in other tools' chains: {}",
                    crate::error_chain(&e)
                ));
                None
            }
        }
    }
}

/// The ruleset generation at which the watcher's last full firewall check
/// found everything in place ([`Networks::heal_firewall`]).
const CHECKED_GENERATION: &str = "nft.checked";

impl SharedNet {
    /// Repairs this network for its live members.
    pub(super) fn heal(
        &self,
        members: &[Member],
        repairs: &mut Vec<String>,
    ) -> Result<(), SharedError> {
        let mut nl = Netlink::open()?;
        let subnet = self.subnet();
        match nl.link_info(&self.bridge)? {
            None => {
                self.bring_up()?;
                repairs.push(format!(
                    "bridge {} was missing: recreated it with {}/{}",
                    self.bridge,
                    subnet.gateway(),
                    subnet.prefix
                ));
            }
            Some(info) if !info.up => {
                nl.set_up(&self.bridge)?;
                repairs.push(format!("bridge {} was down: set it up", self.bridge));
            }
            Some(_) => {}
        }
        let prefix6 = self.prefix6();
        match prefix6 {
            Some(p) => {
                if self.ipv6_on()? {
                    repairs.push(format!(
                        "bridge {}'s IPv6 settings had been changed: put them back",
                        self.bridge
                    ));
                }
                let have = nl.addresses_v6(&self.bridge)?;
                for want in [p.gateway(), crate::network::prefix6::BRIDGE_LINK_LOCAL] {
                    if !have.contains(&(want, 64)) {
                        nl.add_address_v6(&self.bridge, want, 64)?;
                        repairs.push(format!(
                            "bridge {} had lost its address {want}/64: restored it",
                            self.bridge
                        ));
                    }
                }
            }
            None => {
                if sysctl::ipv6_off(&self.bridge) {
                    repairs.push(format!(
                        "bridge {} had IPv6 switched on: switched it off",
                        self.bridge
                    ));
                }
            }
        }
        let gw = (subnet.gateway(), subnet.prefix);
        if !nl.addresses_v4(&self.bridge)?.contains(&gw) {
            nl.add_address_v4(&self.bridge, gw.0, gw.1)?;
            repairs.push(format!(
                "bridge {} had lost its address {}/{}: restored it",
                self.bridge, gw.0, gw.1
            ));
        }
        let index = nl.link_index(&self.bridge)?;
        for m in members {
            if let Some(tap) = nl.link_info(&m.tap)? {
                if tap.master != index {
                    nl.set_master(&m.tap, &self.bridge)?;
                    repairs.push(format!(
                        "tap {} of VM '{}' had left {}: put it back",
                        m.tap, m.vm, self.bridge
                    ));
                }
                if !tap.up {
                    nl.set_up(&m.tap)?;
                    repairs.push(format!(
                        "tap {} of VM '{}' was down: set it up",
                        m.tap, m.vm
                    ));
                }
            }
        }
        let dns = self.dnsmasq_for(subnet, prefix6);
        if dns.pid().is_none() {
            for m in members {
                dns.reserve(&m.id(), m.mac, m.ip)?;
            }
            // Not a repair when a start under way (a VM joining) finished.
            if dns.ensure_running()? {
                repairs.push(format!(
                    "dnsmasq for {} was not running: restarted it with its leases",
                    self.bridge
                ));
            }
        }
        if self.kind == Kind::Nat && sysctl::forwarding_off() {
            sysctl::forwarding_set_on().map_err(SharedError::Forwarding)?;
            repairs.push("IPv4 forwarding had been switched off: switched it back on".into());
        }
        if self.kind == Kind::Nat && prefix6.is_some() && sysctl::forwarding6_off() {
            self.forwarding6_on()?;
            repairs.push("IPv6 forwarding had been switched off: switched it back on".into());
        }
        if let Some(servers) = dns.follow()? {
            repairs.push(format!(
                "the host's DNS servers changed: dnsmasq for {} now forwards to {}",
                self.bridge,
                servers.join(", ")
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::fake::FakeFirewall;

    /// A flush of lume's table (a VPN client or a firewall reload) is
    /// repaired by writing the state the members imply again; a table
    /// that is as lume wrote it is left alone.
    #[test]
    fn the_firewall_is_written_again_after_the_table_disappears() {
        let dir = tempfile::tempdir().unwrap();
        let fw = std::sync::Arc::new(FakeFirewall::default());
        let nets = Networks::in_dir(dir.path(), fw.clone());
        nets.add_member(Kind::Nat, &Networks::test_member(&dir.path().join("vm")));
        nets.apply_firewall().unwrap();
        let written = fw.state().expect("lume's table written");
        assert_eq!(written.dnat.len(), 1, "{written:?}");
        assert_eq!(fw.applies(), 1);

        let mut repairs = Vec::new();
        nets.heal_firewall(true, &mut repairs);
        assert!(repairs.is_empty(), "{repairs:?}");
        assert_eq!(fw.applies(), 1, "an intact table is not rewritten");

        fw.flush();
        nets.heal_firewall(true, &mut repairs);
        assert_eq!(
            repairs,
            ["nftables table inet lume was missing: restored it"],
            "{repairs:?}"
        );
        assert_eq!(fw.state(), Some(written.clone()));

        // Changed by somebody else (after a pass took the restored
        // table's listing): written back as well.
        repairs.clear();
        nets.heal_firewall(true, &mut repairs);
        assert!(repairs.is_empty(), "{repairs:?}");
        *fw.table.lock().unwrap() = Some(crate::firewall::FirewallState::default());
        fw.changed();
        repairs.clear();
        nets.heal_firewall(true, &mut repairs);
        assert_eq!(
            repairs,
            ["nftables table inet lume was changed: restored it"]
        );
        assert_eq!(fw.state(), Some(written));
    }

    /// A write that provably left the ruleset as written lists nothing:
    /// the watcher takes its baseline while the generation still says so,
    /// and repairs a table changed before it looked.
    #[test]
    fn the_watcher_takes_the_baseline_a_write_left_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let fw = std::sync::Arc::new(FakeFirewall::default());
        let nets = Networks::in_dir(dir.path(), fw.clone());
        nets.add_member(Kind::Nat, &Networks::test_member(&dir.path().join("vm")));
        let saved = dir.path().join("nft.listing");
        nets.apply_firewall().unwrap();
        assert!(!saved.exists());
        let listed = fw.listings();
        let mut repairs = Vec::new();
        nets.heal_firewall(true, &mut repairs);
        assert!(repairs.is_empty(), "{repairs:?}");
        assert_eq!(fw.listings(), listed + 1);
        assert_eq!(
            fs::read_to_string(&saved).ok(),
            fw.listing().unwrap(),
            "taken as the baseline"
        );

        // Changed between the write and the watcher's look: restored.
        let written = fw.state();
        fs::remove_file(&saved).unwrap();
        nets.apply_firewall().unwrap();
        assert!(!saved.exists());
        *fw.table.lock().unwrap() = Some(crate::firewall::FirewallState::default());
        fw.changed();
        nets.heal_firewall(true, &mut repairs);
        assert_eq!(
            repairs,
            [
                "nftables table inet lume was not confirmed as written (nftables changed before the check): restored it"
            ]
        );
        assert_eq!(fw.state(), written);
    }

    /// While the ruleset's generation stays where a full check found
    /// everything in place, the watcher's passes list nothing; a change by
    /// anyone makes the next pass check everything again.
    #[test]
    fn an_unchanged_ruleset_is_not_listed_again() {
        let dir = tempfile::tempdir().unwrap();
        let fw = std::sync::Arc::new(FakeFirewall::default());
        let nets = Networks::in_dir(dir.path(), fw.clone());
        nets.add_member(Kind::Nat, &Networks::test_member(&dir.path().join("vm")));
        nets.apply_firewall().unwrap();
        let mut repairs = Vec::new();
        nets.heal_firewall(true, &mut repairs);
        assert!(repairs.is_empty(), "{repairs:?}");
        let listed = fw.listings();
        for _ in 0..3 {
            nets.heal_firewall(true, &mut repairs);
        }
        assert!(repairs.is_empty(), "{repairs:?}");
        assert_eq!(fw.listings(), listed, "an unchanged ruleset was listed");

        // Another tool's change: checked in full, nothing to repair.
        fw.changed();
        nets.heal_firewall(true, &mut repairs);
        assert!(repairs.is_empty(), "{repairs:?}");
        assert!(fw.listings() > listed);
        let listed = fw.listings();
        nets.heal_firewall(true, &mut repairs);
        assert_eq!(fw.listings(), listed);

        // A flush is repaired at the next pass, and the pass after the
        // repair checks again (the repair moved the generation on).
        fw.flush();
        nets.heal_firewall(true, &mut repairs);
        assert_eq!(
            repairs,
            ["nftables table inet lume was missing: restored it"]
        );
        repairs.clear();
        nets.heal_firewall(true, &mut repairs);
        assert!(repairs.is_empty(), "{repairs:?}");
        assert!(fw.state().is_some());

        // A VM joining now writes without listing the whole ruleset: no
        // other tool's chain to plan around at this generation.
        let rulesets = fw.rulesets();
        nets.apply_firewall().unwrap();
        assert_eq!(fw.rulesets(), rulesets);
        // Not when the check saw one, or after any change.
        nets.heal_firewall(true, &mut repairs);
        let g = fw.generation().unwrap();
        let _ = fs::write(dir.path().join(CHECKED_GENERATION), format!("{g} 1"));
        nets.apply_firewall().unwrap();
        assert_eq!(fw.rulesets(), rulesets + 1);
        nets.heal_firewall(true, &mut repairs);
        fw.changed();
        nets.apply_firewall().unwrap();
        assert_eq!(fw.rulesets(), rulesets + 2);
        assert!(repairs.is_empty(), "{repairs:?}");

        // A record that cannot be read: the pass lists.
        let _ = fs::write(dir.path().join(CHECKED_GENERATION), "garbage");
        let listed = fw.listings();
        nets.heal_firewall(true, &mut repairs);
        assert!(fw.listings() > listed);
    }
}
