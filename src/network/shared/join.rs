//! Joining and leaving the shared networks under the namespace's network
//! lock, the address each VM gets, and collecting what killed supervisors left.

use super::*;

/// Leaves a shared network when an attachment is dropped.
#[derive(Debug)]
pub struct SharedTeardown {
    pub networks: Networks,
    pub kind: Kind,
    /// The membership key ([`member_id`]).
    pub id: String,
}

impl crate::network::attach::Teardown for SharedTeardown {
    fn teardown(self: Box<Self>) {
        let _ = self.networks.leave(self.kind, &self.id);
    }
}

/// Leaves the Linux bridge a tap was joined to: lume's accept for the
/// bridge in other tools' chains goes with the last VM on it.
#[derive(Debug)]
pub struct BridgedTeardown {
    pub networks: Networks,
    /// The record's key ([`member_id`]).
    pub id: String,
}

impl crate::network::attach::Teardown for BridgedTeardown {
    fn teardown(self: Box<Self>) {
        let _ = self.networks.leave_bridged(&self.id);
    }
}

/// A VM's request to join one of lume's shared networks ([`Networks::join`]).
#[derive(Debug, Clone, Copy)]
pub struct JoinRequest<'a> {
    pub kind: Kind,
    pub vm: &'a str,
    /// The VM's directory: with `vm`, the membership key ([`member_id`]).
    pub vm_dir: &'a Path,
    pub mac: MacAddress,
    /// The VM's tap, put in the bridge.
    pub tap: &'a str,
    /// Host ports forwarded to the guest (nat only).
    pub publish: &'a [PortMapping],
    /// A member's VM (see [`crate::network::attach::AttachOptions::member`]):
    /// a MAC address another running VM of lume's networks uses is refused.
    pub exclusive_mac: bool,
    /// Whether the guest gets the network's IPv6 (not under a network
    /// policy, which lets no IPv6 out: the guest is then not told of it).
    pub ipv6: bool,
}

impl JoinRequest<'_> {
    /// The membership key ([`member_id`]).
    pub fn id(&self) -> String {
        member_id(self.vm, self.vm_dir)
    }
}

/// A VM's place in a shared network ([`Networks::join`]).
#[derive(Debug)]
pub struct Joined {
    /// The address reserved for it.
    pub ip: Ipv4Addr,
    /// A note for the user (the subnet lume chose, and why).
    pub note: Option<String>,
    /// The network's dnsmasq, when this join started it: still starting,
    /// to be waited for before the guest runs.
    pub dnsmasq: Option<crate::network::dnsmasq::Starting>,
}

impl Networks {
    /// Adds a VM to a shared network: brings the bridge, dnsmasq and the
    /// firewall up as needed, reserves an address and returns it (with
    /// dnsmasq's start, when under way).
    /// With [`JoinRequest::exclusive_mac`], a MAC address another running
    /// VM of lume's networks uses is refused, under the network lock: two
    /// requests cannot both pass.
    pub fn join(&self, req: &JoinRequest) -> Result<Joined, SharedError> {
        let guard = self.lock()?;
        let rewrite = self.collect_records_locked();
        let joined = self.join_locked(req);
        let (joined, record) = match joined {
            Ok(j) => j,
            Err(e) => {
                if rewrite {
                    // Refused before its firewall write: what the collection
                    // changed still reaches the firewall.
                    let _ = self.apply_firewall();
                }
                return Err(e);
            }
        };
        // The table is written outside the records' critical section, so
        // that VMs starting together share one write (see
        // [`Self::firewall_catch_up`]); the guest runs only once it is.
        drop(guard);
        if let Err(e) = self.firewall_catch_up(record) {
            // Leave nothing half set up: drop the record, collect the rest,
            // and write the table without the VM (a write that failed half
            // way may have left its rules). A dnsmasq start is waited for
            // first.
            drop(joined);
            if let Ok(_guard) = self.lock() {
                let _ = self.get(req.kind).remove_member(&req.id());
                self.collect_records_locked();
                let _ = self.apply_firewall();
            }
            return Err(e);
        }
        Ok(joined)
    }

    /// [`Self::join`] under the network lock, after the collection: the
    /// VM's record, address, bridge, dnsmasq and tap; returns the record's
    /// number for the firewall write that must follow.
    pub(super) fn join_locked(&self, req: &JoinRequest) -> Result<(Joined, u64), SharedError> {
        let &JoinRequest {
            kind,
            vm,
            vm_dir,
            mac,
            tap,
            publish,
            exclusive_mac,
            ipv6,
        } = req;
        if exclusive_mac {
            self.check_mac_locked(mac, &member_id(vm, vm_dir))?;
        }
        let net = self.get(kind);
        let mut note = None;
        if net.members().is_empty() {
            let other = match kind {
                Kind::Nat => self.host.subnet(),
                Kind::Host => self.nat.subnet(),
            };
            let (subnet, why) = net.resolve_subnet(&other)?;
            crate::network::rundir::private_dir(self.base(), &net.dir).map_err(|source| {
                SharedError::Runtime {
                    path: net.dir.clone(),
                    source,
                }
            })?;
            fs::write(net.dir.join("subnet"), subnet.to_string()).map_err(|source| {
                SharedError::Runtime {
                    path: net.dir.clone(),
                    source,
                }
            })?;
            let _ = crate::network::rundir::private_file(&net.dir.join("subnet"));
            let prefix6 = net.configured6;
            if let Some(p) = prefix6 {
                net.check_prefix6(p)?;
            }
            crate::util::atomic::write_runtime(
                &net.dir.join("subnet6"),
                prefix6
                    .map_or_else(|| "none".to_string(), |p| p.to_string())
                    .as_bytes(),
            )
            .map_err(|source| SharedError::Runtime {
                path: net.dir.clone(),
                source,
            })?;
            note = why;
        }
        let id = member_id(vm, vm_dir);
        self.check_ports(&id, publish)?;
        let leases = fs::read_to_string(net.dnsmasq().lease_path())
            .map(|t| crate::network::dnsmasq::parse_leases(&t))
            .unwrap_or_default();
        let ip = net.allocate(
            &net.members(),
            &id,
            mac,
            &leases,
            crate::util::time::unix_now(),
        )?;
        let member = Member {
            vm: vm.to_string(),
            vm_dir: vm_dir.to_path_buf(),
            mac,
            ip,
            tap: tap.to_string(),
            publish: publish.to_vec(),
            no_ipv6: !ipv6,
        };
        // VMs already running on this network (started by this release or an
        // earlier one, whose bridges carry no mark) prove the bridge is lume's.
        let running_before = net
            .members()
            .iter()
            .any(|m| m.id() != id && m.liveness() == Liveness::Alive);
        let joined = (|| {
            net.write_member(&member)?;
            net.bring_up_adopting(running_before)?;
            let dns = net.dnsmasq();
            dns.reserve(&id, mac, ip)?;
            // Waited for after the firewall write, before the guest runs;
            // on an error below, dropped, which waits for it.
            let dnsmasq = dns.start_overlapped()?;
            let mut nl = Netlink::open()?;
            nl.set_master(tap, &net.bridge)?;
            // The port itself has no IPv6 of its own to announce to its guest.
            sysctl::ipv6_off(tap);
            nl.set_up(tap)?;
            Ok::<_, SharedError>(dnsmasq)
        })();
        match joined {
            Ok(dnsmasq) => Ok((Joined { ip, note, dnsmasq }, self.record_joined())),
            Err(e) => {
                // Leave nothing half set up: drop the record, collect the rest.
                let _ = net.remove_member(&id);
                self.collect_locked();
                Err(e)
            }
        }
    }

    /// Refuses `mac` when another live VM of lume's networks (nat, host, or
    /// bridged onto a Linux bridge) uses it; `id` is the asking VM's
    /// [`member_id`]. The caller holds the network lock.
    pub(super) fn check_mac_locked(&self, mac: MacAddress, id: &str) -> Result<(), SharedError> {
        let shared = [&self.nat, &self.host]
            .into_iter()
            .flat_map(|n| n.members())
            .find(|m| m.mac == mac && m.id() != id && m.alive())
            .map(|m| m.vm);
        let bridged = || {
            self.bridged_members()
                .into_iter()
                .find(|m| m.mac == Some(mac) && m.id() != id && m.alive())
                .map(|m| m.vm)
        };
        match shared.or_else(bridged) {
            Some(vm) => Err(SharedError::MacTaken { mac, vm }),
            None => Ok(()),
        }
    }

    /// [`Self::check_mac_locked`] under the network lock (bridged onto a
    /// plain interface, which keeps no record here).
    pub fn check_mac(&self, mac: MacAddress, vm: &str, vm_dir: &Path) -> Result<(), SharedError> {
        let _guard = self.lock()?;
        self.check_mac_locked(mac, &member_id(vm, vm_dir))
    }

    /// Refuses host ports another NAT VM of this namespace already publishes
    /// (`id` is the asking VM's [`member_id`]).
    pub fn check_ports(&self, id: &str, publish: &[PortMapping]) -> Result<(), SharedError> {
        for other in self
            .nat
            .members()
            .iter()
            .filter(|m| m.id() != id && m.alive())
        {
            for p in publish {
                let clash = other.publish.iter().any(|q| {
                    q.host_port == p.host_port
                        && q.proto == p.proto
                        && (q.host_ip.is_none() || p.host_ip.is_none() || q.host_ip == p.host_ip)
                });
                if clash {
                    return Err(SharedError::PortTaken {
                        port: p.host_port,
                        proto: p.proto,
                        vm: other.vm.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Removes a VM (by [`member_id`]); the last one out takes the network down.
    pub fn leave(&self, kind: Kind, id: &str) -> Result<(), SharedError> {
        let _guard = self.lock()?;
        let net = self.get(kind);
        net.remove_member(id)?;
        self.collect_locked();
        self.apply_firewall()
    }

    /// Records a VM bridged onto the Linux bridge `bridge` and puts lume's
    /// accept for that bridge's own traffic in other tools' chains (unless
    /// `firewallAccommodation` is off). The record is written before the
    /// accept: a supervisor killed at any point leaves a record the next
    /// lume command collects, with the accept. The VM starts even when the
    /// accept cannot be placed (its bridge worked without lume's help
    /// before): without nft there is no iptables-nft chain to accommodate;
    /// any other failure is returned as a note, and the watcher retries.
    /// With `exclusive_mac`, a MAC another running VM uses is refused first
    /// (as in [`Self::join`]).
    pub fn join_bridged(
        &self,
        vm: &str,
        vm_dir: &Path,
        bridge: &str,
        mac: MacAddress,
        exclusive_mac: bool,
    ) -> Result<Option<String>, SharedError> {
        let _guard = self.lock()?;
        self.collect_locked();
        if exclusive_mac {
            self.check_mac_locked(mac, &member_id(vm, vm_dir))?;
        }
        let dir = self.bridged_dir();
        let io = |source| SharedError::Runtime {
            path: dir.clone(),
            source,
        };
        crate::network::rundir::private_dir(self.base(), &dir).map_err(io)?;
        let m = BridgedMember {
            vm: vm.to_string(),
            vm_dir: vm_dir.to_path_buf(),
            bridge: bridge.to_string(),
            mac: Some(mac),
        };
        let path = dir.join(format!("{}.json", m.id()));
        crate::util::atomic::write_runtime(
            &path,
            &serde_json::to_vec_pretty(&m).expect("member serialises"),
        )
        .map_err(io)?;
        crate::network::rundir::private_file(&path).map_err(io)?;
        match self.accommodate() {
            Ok(_) | Err(SharedError::Firewall(FirewallError::NftMissing)) => Ok(None),
            Err(e) => Ok(Some(format!(
                "lume could not yet put its accept for {bridge} in other tools' firewall chains ({}); its watcher retries every second — `lume network doctor` shows whether bridged frames pass",
                crate::error_chain(&e)
            ))),
        }
    }

    /// Removes a bridged VM's record (by [`member_id`]); lume's accept for
    /// its bridge goes with the last VM bridged onto it.
    pub fn leave_bridged(&self, id: &str) -> Result<(), SharedError> {
        let _guard = self.lock()?;
        self.remove_bridged(id)?;
        self.collect_locked();
        self.accommodate().map(|_| ())
    }

    /// Collects what killed supervisors left: records of VMs that no longer
    /// run, and whole networks nobody uses any more.
    pub fn collect(&self) -> Result<(), SharedError> {
        if !self.root.exists() {
            return Ok(());
        }
        let _guard = self.lock()?;
        self.collect_locked();
        Ok(())
    }

    /// Removes dead members and takes down networks nobody uses; rewrites
    /// the firewall only when that changed something.
    pub(super) fn collect_locked(&self) {
        if self.collect_records_locked() {
            let _ = self.apply_firewall();
        }
    }

    /// [`Self::collect_locked`] without the firewall: returns whether lume's
    /// firewall must be rewritten (something was removed, or nothing is left
    /// and a table or accepts may linger). A join rewrites it anyway once
    /// the VM is in, so it skips a rewrite here (four `nft` runs).
    pub(super) fn collect_records_locked(&self) -> bool {
        let mut changed = false;
        for net in [&self.nat, &self.host] {
            for m in net.members() {
                if !m.alive() {
                    let _ = net.remove_member(&m.id());
                    changed = true;
                }
            }
            if net.members().is_empty() && net.dir.exists() {
                net.take_down();
                changed = true;
            }
        }
        for m in self.bridged_members() {
            if !m.alive() {
                let _ = self.remove_bridged(&m.id());
                changed = true;
            }
        }
        // With no member left anywhere, a table (or accepts in other tools'
        // chains) left by an interrupted teardown or a crash goes too.
        let idle = self.nat.members().is_empty() && self.host.members().is_empty();
        changed || idle
    }
}

impl SharedNet {
    /// The lowest free address from .2 up (the VM's own earlier record is reused).
    /// The address for member `id` with `mac`: not another running VM's,
    /// and not one dnsmasq still leases to another MAC at `now` (a VM
    /// stopped or deleted within the lease time: dnsmasq would not give the
    /// address to anyone else and would hand the new VM one outside its
    /// reservation, which a network policy's source check then drops).
    /// The address dnsmasq leases to this MAC comes first (a restart keeps
    /// its address); when every free address is leased to others, the
    /// lowest free one.
    pub(super) fn allocate(
        &self,
        members: &[Member],
        id: &str,
        mac: MacAddress,
        leases: &[crate::network::dnsmasq::Lease],
        now: u64,
    ) -> Result<Ipv4Addr, SharedError> {
        let used: Vec<Ipv4Addr> = members
            .iter()
            .filter(|m| m.id() != id)
            .map(|m| m.ip)
            .collect();
        let mac = mac.to_string().to_ascii_lowercase();
        let live: Vec<&crate::network::dnsmasq::Lease> = leases
            .iter()
            .filter(|l| l.expires == 0 || l.expires > now)
            .collect();
        let subnet = self.subnet();
        let free: Vec<Ipv4Addr> = (2..2 + subnet.guest_capacity())
            .map(|n| subnet.host(n))
            .filter(|ip| !used.contains(ip))
            .collect();
        let own = live
            .iter()
            .filter(|l| l.mac == mac)
            .map(|l| l.ip)
            .find(|ip| free.contains(ip));
        let unleased = || {
            free.iter()
                .copied()
                .find(|ip| !live.iter().any(|l| l.ip == *ip && l.mac != mac))
        };
        own.or_else(unleased)
            .or_else(|| free.first().copied())
            .ok_or_else(|| SharedError::Full {
                bridge: self.bridge.clone(),
                subnet,
                capacity: subnet.guest_capacity(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VM stopped or deleted within dnsmasq's lease time keeps its
    /// address leased to its MAC: a new VM must not be given it (dnsmasq
    /// would hand that VM another address than its reservation).
    #[test]
    fn addresses_leased_to_other_macs_are_not_given_out() {
        let dir = tempfile::tempdir().unwrap();
        let nets =
            Networks::from_settings(&Settings::load_from(&dir.path().join("config.yaml")).unwrap())
                .unwrap();
        let net = nets.get(Kind::Nat);
        let s = net.subnet();
        let me: MacAddress = "52:54:00:00:00:01".parse().unwrap();
        let lease = |ip, mac: &str, expires| crate::network::dnsmasq::Lease {
            expires,
            mac: mac.into(),
            ip,
        };
        assert_eq!(net.allocate(&[], "a", me, &[], 100).unwrap(), s.host(2));
        let other = [lease(s.host(2), "52:54:00:00:00:02", 200)];
        assert_eq!(net.allocate(&[], "a", me, &other, 100).unwrap(), s.host(3));
        assert_eq!(
            net.allocate(&[], "a", me, &other, 300).unwrap(),
            s.host(2),
            "an expired lease holds nothing"
        );
        let mine = [lease(s.host(5), "52:54:00:00:00:01", 200)];
        assert_eq!(
            net.allocate(&[], "a", me, &mine, 100).unwrap(),
            s.host(5),
            "a restart keeps the address dnsmasq leases to the VM"
        );
    }
}
