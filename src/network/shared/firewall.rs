//! The firewall state the members imply, written to lume's table and to
//! lume's accepts in other tools' chains; `firewallAccommodation` changes.

use super::*;

impl Networks {
    /// `firewallAccommodation` as config.yaml says now, when it differs
    /// from the value in use (an unreadable file changes nothing).
    pub fn accommodation_changed(&self) -> Option<bool> {
        let now = Settings::load_from(&self.settings_file)
            .ok()?
            .get_bool("firewallAccommodation")
            .ok()?
            .unwrap_or(true);
        (now != self.accommodate).then_some(now)
    }

    /// Applies a changed `firewallAccommodation` to every running VM: puts
    /// lume's accepts in other tools' chains, or removes them, and rewrites
    /// lume's table (its marks). Returns what it did, for the log; `None`
    /// when a join or leave holds the network lock (the next check retries).
    pub fn apply_accommodation(&mut self, on: bool) -> Option<String> {
        let path = self.root.join("network.lock");
        let Ok(Some(_guard)) = VmLock::acquire_within(&path, Duration::from_millis(200)) else {
            return None;
        };
        self.accommodate = on;
        Some(match self.apply_firewall() {
            Ok(()) => accommodation_note(on, &self.settings_file),
            Err(e) => format!(
                "{}, but lume's firewall could not be rewritten: {}",
                accommodation_note(on, &self.settings_file),
                crate::error_chain(&e)
            ),
        })
    }

    /// The firewall state every live member implies; `tools`: whether a
    /// chain lume accommodates exists (only then does its table mark packets).
    pub fn firewall_state(&self, tools: bool) -> FirewallState {
        let nat_members = self.nat.members();
        let host_members = self.host.members();
        let bridge_net = |n: &SharedNet| BridgeNet {
            bridge: n.bridge.clone(),
            subnet: n.subnet(),
            prefix6: n.prefix6(),
        };
        let nat6 = self.nat.prefix6();
        let host6 = self.host.prefix6();
        // A guest's IPv6 address on its network: the EUI-64 one lume's
        // DHCPv6 reserves (published ports lead there); none for a guest
        // kept off IPv6.
        let ip6 = |m: &Member, p: Option<crate::network::prefix6::Prefix6>| {
            p.filter(|_| !m.no_ipv6).map(|p| p.eui64(m.mac))
        };
        FirewallState {
            nat: (!nat_members.is_empty()).then(|| bridge_net(&self.nat)),
            host: (!host_members.is_empty()).then(|| bridge_net(&self.host)),
            dnat: nat_members
                .iter()
                .flat_map(|m| {
                    m.publish.iter().map(|p| Dnat {
                        host_ip: p.host_ip,
                        host_port: p.host_port,
                        proto: p.proto,
                        guest: m.ip,
                        guest6: ip6(m, nat6),
                        guest_port: p.guest_port,
                    })
                })
                .collect(),
            ports: nat_members
                .iter()
                .map(|m| (m, nat6))
                .chain(host_members.iter().map(|m| (m, host6)))
                .map(|(m, p)| crate::firewall::GuestPort {
                    tap: m.tap.clone(),
                    mac: m.mac,
                    ip: m.ip,
                    prefix6: p.filter(|_| !m.no_ipv6),
                })
                .collect(),
            accommodate: self.accommodate && tools,
        }
    }

    /// The bridges other tools' firewalls must let through: none when
    /// accommodation is off; lume's NAT and host-only bridges while a VM is
    /// a member, and each Linux bridge a VM not provably dead is bridged onto.
    pub fn openings(&self) -> Vec<Opening> {
        if !self.accommodate {
            return Vec::new();
        }
        let mut out: Vec<Opening> = [&self.nat, &self.host]
            .into_iter()
            .filter(|n| !n.members().is_empty())
            .map(|n| Opening {
                bridge: n.bridge.clone(),
                nat: n.kind == Kind::Nat,
                gateway: n.subnet().gateway(),
                gateway6: n.prefix6().map(|p| p.gateway()),
                bridged: false,
            })
            .collect();
        let mut bridges: Vec<String> = self
            .bridged_members()
            .into_iter()
            .filter(BridgedMember::alive)
            .map(|m| m.bridge)
            .filter(|b| *b != self.nat.bridge && *b != self.host.bridge)
            .collect();
        bridges.sort();
        bridges.dedup();
        out.extend(bridges.iter().map(|b| Opening::bridged(b)));
        out
    }

    /// Puts lume's accepts in other tools' chains in order (removes them
    /// all when nothing needs them). A chain that vanishes between listing
    /// and writing (a firewall restarting) fails the transaction: it is
    /// listed and tried once more.
    pub fn accommodate(&self) -> Result<Accommodated, SharedError> {
        self.accommodate_from(None)
    }

    /// [`Self::accommodate`] planned from `rs` when given (a listing taken
    /// moments ago under the network lock; lume's own tables play no part
    /// in the plan), saving an `nft` run. A retry lists afresh.
    pub(super) fn accommodate_from(
        &self,
        rs: Option<Ruleset>,
    ) -> Result<Accommodated, SharedError> {
        let openings = self.openings();
        let first = match rs {
            Some(rs) => self.firewall.accommodate_with(rs, &openings),
            None => self.firewall.accommodate(&openings),
        };
        match first {
            Err(FirewallError::Accommodation(_)) => Ok(self.firewall.accommodate(&openings)?),
            other => Ok(other?),
        }
    }

    /// Writes lume's table for the current members (removes it when none),
    /// puts lume's accepts in other tools' chains (removes them when none),
    /// and remembers how the firewall lists the table, to notice changes later.
    pub fn apply_firewall(&self) -> Result<(), SharedError> {
        self.write_firewall(self.firewall.generation()).map(|_| ())
    }

    /// [`Self::apply_firewall`], returning whether lume's table now marks
    /// packets for other tools' chains and what changed in those chains
    /// (for the watcher's log). `now`: the ruleset's generation as the
    /// caller last read it (see [`Self::unchanged_without_tools`]).
    pub(super) fn write_firewall(
        &self,
        now: Option<RulesetGeneration>,
    ) -> Result<(bool, Vec<String>), SharedError> {
        // One listing tells whether other tools' chains are there and
        // plans lume's accepts in them; none when nothing changed since a
        // check found no such chain (the watcher's, see `heal_firewall`)
        // or since lume's own last write, when none was there before it.
        let rs = if self.unchanged_without_tools(now) {
            Ruleset::default()
        } else {
            self.firewall.ruleset()?
        };
        let tools = self.accommodate && rs.tools_present();
        // The listing (or the check) saw the ruleset at `now` if it is
        // still at `now` when the write reads it.
        let seen = now.map(|g| (g, rs.tools_present()));
        self.write_firewall_from(tools, Some(rs), seen)
    }

    /// Whether lume's table marked packets for other tools' chains when it
    /// was last written.
    pub(super) fn marks(&self) -> bool {
        fs::read_to_string(self.root.join("foreign.marks")).is_ok_and(|v| v.trim() == "1")
    }

    /// [`Self::write_firewall`] with `tools`: whether Docker's, ufw's or
    /// firewalld's chains are there (known or assumed; a wrong assumption
    /// is corrected by the caller once it has listed the ruleset).
    pub(super) fn write_firewall_with(
        &self,
        tools: bool,
    ) -> Result<(bool, Vec<String>), SharedError> {
        self.write_firewall_from(tools, None, None)
    }

    /// [`Self::write_firewall_with`], planning the accepts in other tools'
    /// chains from `rs` when given. `seen`: a generation of the ruleset
    /// and whether other tools' chains were in it then (as `rs` shows),
    /// kept in the record of a write that started from that generation.
    pub(super) fn write_firewall_from(
        &self,
        tools: bool,
        rs: Option<Ruleset>,
        seen: Option<(RulesetGeneration, bool)>,
    ) -> Result<(bool, Vec<String>), SharedError> {
        // Under the network lock no record changes while the table is
        // written: the generation read now is the one the table shows.
        let generation = self.generation(MEMBERS_GENERATION);
        let state = self.firewall_state(tools);
        let (done, recorded) = if state.is_empty() {
            // Accepts in other chains first: nothing of lume's outlives its table.
            let done = self.accommodate_from(rs)?;
            let _ = fs::remove_file(self.root.join(WRITTEN_TABLES));
            self.firewall.apply(&state)?;
            (done, None)
        } else {
            let recorded = self.write_tables(&state, seen)?;
            (self.accommodate_from(rs)?, recorded)
        };
        // Whether the table marks packets for other tools' chains: the
        // watcher rewrites it when such a tool appears or goes.
        let marks = self.root.join("foreign.marks");
        let _ =
            crate::util::atomic::write_runtime(&marks, if state.accommodate { b"1" } else { b"0" });
        let saved = self.root.join("nft.listing");
        if recorded.is_some() && self.firewall.generation() == recorded {
            // The ruleset is provably lume's write and nothing since: the
            // watcher lists it as its baseline while that still holds
            // ([`Self::as_written`]), off the VM's way to its start.
            let _ = fs::remove_file(&saved);
        } else {
            match self.firewall.listing()? {
                Some(text) => {
                    let _ = crate::util::atomic::write_runtime(&saved, text.as_bytes());
                }
                None => {
                    let _ = fs::remove_file(&saved);
                }
            }
        }
        match generation {
            Some(g) => self.set_generation(WRITTEN_GENERATION, g),
            // Not known what this write covered: no join may count on it.
            None => {
                let _ = fs::remove_file(self.root.join(WRITTEN_GENERATION));
            }
        }
        Ok((state.accommodate, done.changes))
    }

    /// Writes lume's tables for `state` (not empty): only what differs
    /// from the last write when the ruleset's generation shows nothing
    /// changed since (a VM's start or stop then adds or deletes its own
    /// few elements), else whole. Records what it wrote, and the
    /// generation after it, when that is provably the ruleset as written
    /// (it moved by exactly this write); else no record, and the next
    /// write is whole.
    fn write_tables(
        &self,
        state: &FirewallState,
        seen: Option<(RulesetGeneration, bool)>,
    ) -> Result<Option<RulesetGeneration>, SharedError> {
        let record = self.root.join(WRITTEN_TABLES);
        let before = self.firewall.generation();
        let last = self
            .written_tables()
            .filter(|w| before.is_some_and(|g| g.to_string() == w.generation));
        // No write may be taken for one that did not happen.
        let _ = fs::remove_file(&record);
        // Whether other tools' chains were there when this write started.
        let mut tools = seen
            .filter(|(g, _)| Some(*g) == before)
            .map(|(_, present)| present);
        let (mut before, mut tables, mut transactions) = match &last {
            Some(w) => {
                let tables = self.firewall.apply_change(&w.tables, state)?;
                let moved = u32::from(w.tables != tables);
                (before, tables, moved)
            }
            None => (before, self.firewall.apply(state)?, 1),
        };
        let mut after = self.firewall.generation();
        let proven = |b: Option<RulesetGeneration>, a: Option<RulesetGeneration>, n: u32| {
            matches!((b, a), (Some(b), Some(a))
                if a.namespace == b.namespace && a.number == b.number.wrapping_add(n))
        };
        if last.is_some() && transactions == 1 && !proven(before, after, 1) {
            // Another change landed around the change in place: what it
            // did to lume's tables may remain beside it. Written whole.
            before = after;
            tools = None;
            tables = self.firewall.apply(state)?;
            transactions = 1;
            after = self.firewall.generation();
        }
        if let Some(a) = after.filter(|_| proven(before, after, transactions))
            && let Some(boot) = boot_id()
        {
            let w = WrittenTables {
                format: WRITTEN_TABLES_FORMAT,
                boot,
                generation: a.to_string(),
                tables,
                tools,
            };
            if let Ok(json) = serde_json::to_vec(&w)
                && crate::util::atomic::write_runtime(&record, &json).is_ok()
            {
                return Ok(Some(a));
            }
        }
        Ok(None)
    }

    /// The record of lume's last write of its tables, when it is one this
    /// build wrote since the system started.
    fn written_tables(&self) -> Option<WrittenTables> {
        let b = fs::read(self.root.join(WRITTEN_TABLES)).ok()?;
        serde_json::from_slice::<WrittenTables>(&b)
            .ok()
            .filter(|w| w.format == WRITTEN_TABLES_FORMAT && Some(&w.boot) == boot_id().as_ref())
    }

    /// Whether lume's last write left the ruleset at `now` with no other
    /// tool's chain in it (see [`WrittenTables::tools`]).
    pub(super) fn written_without_tools(&self, now: RulesetGeneration) -> bool {
        self.written_tables()
            .is_some_and(|w| w.tools == Some(false) && w.generation == now.to_string())
    }

    /// The ruleset's generation right after lume's last write of its
    /// tables, when that write left them provably as written.
    fn written_generation(&self) -> Option<RulesetGeneration> {
        self.written_tables()?.generation.parse().ok()
    }

    /// Whether `listing`, taken after the ruleset's generation was read as
    /// `before`, shows lume's tables as lume wrote them: the same as the
    /// listing saved after the write, or (none saved: the write left
    /// taking it to the watcher) the generation is still the one right
    /// after that write, before and after the listing.
    pub(crate) fn as_written(&self, listing: &str, before: Option<RulesetGeneration>) -> bool {
        match fs::read_to_string(self.root.join("nft.listing")) {
            Ok(saved) => saved == listing,
            Err(_) => {
                before.is_some()
                    && self.written_generation() == before
                    && self.firewall.generation() == before
            }
        }
    }

    /// A counter in the runtime directory: 0 when missing, `None` when it
    /// cannot be read or is not a number (a join then writes: see
    /// [`Self::firewall_catch_up`]).
    fn generation(&self, name: &str) -> Option<u64> {
        match fs::read_to_string(self.root.join(name)) {
            Ok(t) => t.trim().parse().ok(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(0),
            Err(_) => None,
        }
    }

    fn set_generation(&self, name: &str, value: u64) {
        let path = self.root.join(name);
        let _ = crate::util::atomic::write_runtime(&path, value.to_string().as_bytes());
    }

    /// Counts a join's new record (under the network lock) and returns its
    /// number: the join's firewall write is done once a table written with
    /// this many records is in place ([`Self::firewall_catch_up`]).
    pub(super) fn record_joined(&self) -> u64 {
        // Above every write so far, whatever happened to the members'
        // counter (lost, unreadable): only a write after this record can
        // cover it. A counter that cannot be written only costs writes.
        let next = [MEMBERS_GENERATION, WRITTEN_GENERATION]
            .iter()
            .map(|name| self.generation(name).unwrap_or(0))
            .max()
            .unwrap_or(0)
            + 1;
        self.set_generation(MEMBERS_GENERATION, next);
        next
    }

    /// Writes lume's firewall unless a write since record `joined` already
    /// did (takes the network lock). VMs started together join one after
    /// another under the lock without writing the table each time; the
    /// first to write it writes every record so far, and the others find
    /// their record written and go on: one `nft` transaction for a batch
    /// of starts instead of one each, and never a VM started before a
    /// table with its rules is in place.
    pub(super) fn firewall_catch_up(&self, joined: u64) -> Result<(), SharedError> {
        let _guard = self.lock()?;
        let covered = |name| self.generation(name).is_some_and(|g| g >= joined);
        if covered(WRITTEN_GENERATION) && covered(MEMBERS_GENERATION) {
            return Ok(());
        }
        self.apply_firewall()
    }
}

/// lume's tables as its last write left them, with the ruleset's
/// generation right after that write ([`Networks::write_tables`]).
const WRITTEN_TABLES: &str = "firewall.tables";

/// The layout of [`WrittenTables`] and of the tables it holds: a record
/// of another layout is not used (the next write is whole).
const WRITTEN_TABLES_FORMAT: u32 = 1;

#[derive(Serialize, Deserialize)]
struct WrittenTables {
    format: u32,
    /// The system's boot (`/proc/sys/kernel/random/boot_id`): where /run
    /// outlives a reboot, a record of an earlier boot whose numbers happen
    /// to match is not used.
    boot: String,
    /// As [`RulesetGeneration`] writes itself.
    generation: String,
    tables: crate::firewall::Tables,
    /// Whether other tools' chains (Docker's, ufw's, firewalld's) were in
    /// the ruleset just before this write, when that is known: if not,
    /// they are not after it either, and while the ruleset stays at this
    /// generation the next write need not list it to find out. (Absent
    /// in records of earlier builds: not known.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tools: Option<bool>,
}

/// This boot's identity; `None` when it cannot be read (no record is
/// then written or used: every write is whole).
fn boot_id() -> Option<String> {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The number of join records counted so far in this namespace.
const MEMBERS_GENERATION: &str = "members.generation";
/// The count the last successful firewall write saw.
const WRITTEN_GENERATION: &str = "firewall.generation";

/// The log line for a changed `firewallAccommodation`.
pub(super) fn accommodation_note(on: bool, file: &Path) -> String {
    if on {
        format!(
            "firewallAccommodation changed to true in {}: lume puts its accepts in Docker's, ufw's and firewalld's chains for every running VM",
            file.display()
        )
    } else {
        format!(
            "firewallAccommodation changed to false in {}: lume removed its accepts from Docker's, ufw's and firewalld's chains and leaves them alone for every running VM",
            file.display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NAT VM number `n` (its address .n, its port 80nn published).
    fn member(dir: &Path, n: u8) -> Member {
        Member {
            vm: format!("v{n}"),
            vm_dir: dir.join(format!("v{n}")),
            mac: format!("52:54:00:12:34:{n:02x}").parse().unwrap(),
            ip: format!("192.168.64.{n}").parse().unwrap(),
            tap: format!("ltv{n}"),
            publish: vec![format!("80{n:02}:22").parse().unwrap()],
            no_ipv6: false,
        }
    }

    /// VMs started together: a join whose record a later write already
    /// covered writes nothing; one recorded after the last write writes.
    #[test]
    fn joins_covered_by_a_later_write_do_not_write_again() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("net");
        let fw = std::sync::Arc::new(crate::firewall::fake::FakeFirewall::default());
        let nets = Networks::in_dir(&root, fw.clone());
        // Whole or changed from the last write.
        let writes = |fw: &crate::firewall::fake::FakeFirewall| fw.applies() + fw.changes();
        let member = |n: u8| member(dir.path(), n);
        nets.add_member(Kind::Nat, &member(2));
        let first = nets.record_joined();
        nets.add_member(Kind::Nat, &member(3));
        let second = nets.record_joined();
        nets.firewall_catch_up(second).unwrap();
        assert_eq!(writes(&fw), 1);
        assert_eq!(fw.state().unwrap().dnat.len(), 2, "both joins written");
        nets.firewall_catch_up(first).unwrap();
        assert_eq!(writes(&fw), 1, "the first join's record was written");

        nets.add_member(Kind::Nat, &member(4));
        let third = nets.record_joined();
        nets.firewall_catch_up(third).unwrap();
        assert_eq!(writes(&fw), 2);
        assert_eq!(fw.state().unwrap().dnat.len(), 3);

        // The members' counter alone lost: the next join still numbers
        // itself above the last write, and writes.
        std::fs::remove_file(root.join(MEMBERS_GENERATION)).unwrap();
        nets.add_member(Kind::Nat, &member(5));
        let fourth = nets.record_joined();
        assert!(fourth > third, "{fourth} after {third}");
        nets.firewall_catch_up(fourth).unwrap();
        assert_eq!(writes(&fw), 3);
        assert_eq!(fw.state().unwrap().dnat.len(), 4);
        // A counter that is not a number: a join writes.
        std::fs::write(root.join(WRITTEN_GENERATION), "garbled").unwrap();
        nets.firewall_catch_up(fourth).unwrap();
        assert_eq!(writes(&fw), 4);

        // Counters lost (a runtime directory from an earlier release, or
        // unreadable): a join writes rather than trusting them.
        std::fs::remove_file(root.join(MEMBERS_GENERATION)).unwrap();
        std::fs::remove_file(root.join(WRITTEN_GENERATION)).unwrap();
        nets.firewall_catch_up(fourth).unwrap();
        assert_eq!(writes(&fw), 5);
    }

    /// Networks in a temporary directory (`net` in it) on a fake firewall.
    fn fake_networks() -> (
        tempfile::TempDir,
        std::sync::Arc<crate::firewall::fake::FakeFirewall>,
        Networks,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let fw = std::sync::Arc::new(crate::firewall::fake::FakeFirewall::default());
        let nets = Networks::in_dir(&dir.path().join("net"), fw.clone());
        (dir, fw, nets)
    }

    /// A write right after lume's own, with no other tool's chain in the
    /// ruleset before it, does not list the ruleset to find out again;
    /// after another tool's change, with Docker's chain there, or from a
    /// record of an earlier build (no `tools`), it does.
    #[test]
    fn a_write_after_lumes_own_lists_the_ruleset_only_when_not_known() {
        let (dir, fw, nets) = fake_networks();
        let member = |n: u8| member(dir.path(), n);
        let record = dir.path().join("net").join(WRITTEN_TABLES);
        nets.add_member(Kind::Nat, &member(2));
        nets.apply_firewall().unwrap();
        assert_eq!(fw.rulesets(), 1, "nothing known yet");
        assert!(
            std::fs::read_to_string(&record)
                .unwrap()
                .contains("\"tools\":false")
        );
        nets.add_member(Kind::Nat, &member(3));
        nets.apply_firewall().unwrap();
        assert_eq!(
            (fw.rulesets(), fw.changes()),
            (1, 1),
            "known from the write"
        );
        fw.changed();
        nets.add_member(Kind::Nat, &member(4));
        nets.apply_firewall().unwrap();
        assert_eq!(fw.rulesets(), 2, "another tool's change");
        // Docker's chain appears (its own commit): listed, and every write
        // after it lists again.
        *fw.docker.lock().unwrap() = true;
        fw.changed();
        nets.add_member(Kind::Nat, &member(5));
        nets.apply_firewall().unwrap();
        assert_eq!(fw.rulesets(), 3);
        assert!(
            std::fs::read_to_string(&record)
                .unwrap()
                .contains("\"tools\":true")
        );
        nets.add_member(Kind::Nat, &member(6));
        nets.apply_firewall().unwrap();
        assert_eq!(fw.rulesets(), 4, "Docker's chain was there");
        *fw.docker.lock().unwrap() = false;
        fw.changed();
        nets.apply_firewall().unwrap();
        assert_eq!(fw.rulesets(), 5);
        // An earlier build's record says nothing of other tools.
        let text = std::fs::read_to_string(&record).unwrap();
        std::fs::write(&record, text.replace(",\"tools\":false", "")).unwrap();
        assert!(!std::fs::read_to_string(&record).unwrap().contains("tools"));
        nets.add_member(Kind::Nat, &member(7));
        nets.apply_firewall().unwrap();
        assert_eq!(fw.rulesets(), 6, "not known from an earlier build's record");
        nets.add_member(Kind::Nat, &member(8));
        nets.apply_firewall().unwrap();
        assert_eq!(fw.rulesets(), 6);
    }

    /// A write changes the tables from the last write's only when the
    /// ruleset's generation shows nothing changed since; any other change
    /// (another tool's, a flush, a record that cannot be read) makes the
    /// next write whole.
    #[test]
    fn only_a_ruleset_as_lume_left_it_is_changed_in_place() {
        let (dir, fw, nets) = fake_networks();
        let member = |n: u8| member(dir.path(), n);
        let record = dir.path().join("net").join(WRITTEN_TABLES);
        nets.add_member(Kind::Nat, &member(2));
        nets.apply_firewall().unwrap();
        assert_eq!(
            (fw.applies(), fw.changes()),
            (1, 0),
            "the first write is whole"
        );
        assert!(record.exists());
        nets.add_member(Kind::Nat, &member(3));
        nets.apply_firewall().unwrap();
        assert_eq!((fw.applies(), fw.changes()), (1, 1), "a join changes it");
        assert_eq!(fw.state().unwrap().ports.len(), 2);
        nets.nat.remove_member(&member(3).id()).unwrap();
        nets.apply_firewall().unwrap();
        assert_eq!((fw.applies(), fw.changes()), (1, 2), "so does a leave");
        assert_eq!(fw.state().unwrap().ports.len(), 1);

        // Another tool's change since: whole.
        fw.changed();
        nets.add_member(Kind::Nat, &member(3));
        nets.apply_firewall().unwrap();
        assert_eq!((fw.applies(), fw.changes()), (2, 2));
        // A flush: whole.
        fw.flush();
        nets.apply_firewall().unwrap();
        assert_eq!((fw.applies(), fw.changes()), (3, 2));
        assert_eq!(fw.state().unwrap().ports.len(), 2);
        // A record that cannot be read, or none: whole.
        std::fs::write(&record, "{").unwrap();
        nets.apply_firewall().unwrap();
        assert_eq!((fw.applies(), fw.changes()), (4, 2));
        nets.apply_firewall().unwrap();
        assert_eq!((fw.applies(), fw.changes()), (4, 3), "recorded again");
        // Another tool's change landing around the change in place: the
        // tables are written whole at once, and that write recorded.
        nets.add_member(Kind::Nat, &member(4));
        *fw.interfere.lock().unwrap() = true;
        nets.apply_firewall().unwrap();
        assert_eq!((fw.applies(), fw.changes()), (5, 4));
        assert!(record.exists());
        nets.nat.remove_member(&member(4).id()).unwrap();
        nets.apply_firewall().unwrap();
        assert_eq!((fw.applies(), fw.changes()), (5, 5));
        // A record of another layout, or of an earlier boot: whole.
        for (from, to) in [
            ("\"format\":1", "\"format\":0"),
            ("\"boot\":\"", "\"boot\":\"0"),
        ] {
            let text = std::fs::read_to_string(&record).unwrap();
            assert!(text.contains(from), "{text}");
            std::fs::write(&record, text.replacen(from, to, 1)).unwrap();
            let applies = fw.applies();
            nets.apply_firewall().unwrap();
            assert_eq!(fw.applies(), applies + 1);
        }
        // Nothing changed: the change writes nothing and keeps the record.
        let g = fw.generation();
        nets.apply_firewall().unwrap();
        assert_eq!(fw.generation(), g);
        assert!(record.exists());
        // The last VM gone: the tables and the record go.
        for n in [2, 3] {
            nets.nat.remove_member(&member(n).id()).unwrap();
        }
        nets.apply_firewall().unwrap();
        assert_eq!(fw.state(), None);
        assert!(!record.exists());
        nets.add_member(Kind::Nat, &member(2));
        nets.apply_firewall().unwrap();
        assert_eq!((fw.applies(), fw.changes()), (9, 6), "whole again");
    }

    #[test]
    fn the_watcher_sees_firewall_accommodation_change_in_config_yaml() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("config.yaml");
        let mut nets = Networks::from_settings(&Settings::load_from(&file).unwrap()).unwrap();
        assert!(nets.accommodate, "on by default");
        assert_eq!(nets.accommodation_changed(), None);
        std::fs::write(
            &file,
            "natSubnet: 10.9.0.0/24\nfirewallAccommodation: false\n",
        )
        .unwrap();
        assert_eq!(nets.accommodation_changed(), Some(false));
        nets.accommodate = false;
        assert_eq!(nets.accommodation_changed(), None);
        // `lume config set` writes the string form too; removing the key means true.
        std::fs::write(&file, "firewallAccommodation: 'true'\n").unwrap();
        assert_eq!(nets.accommodation_changed(), Some(true));
        std::fs::write(&file, "{}\n").unwrap();
        assert_eq!(nets.accommodation_changed(), Some(true));
        // An unreadable file changes nothing.
        std::fs::write(&file, "firewallAccommodation: [\n").unwrap();
        assert_eq!(nets.accommodation_changed(), None);
        let note = accommodation_note(false, &file);
        assert!(
            note.starts_with("firewallAccommodation changed to false in ")
                && note.contains("removed its accepts"),
            "{note}"
        );
        assert!(!note.contains("appeared"));
    }
}
