//! The membership store: one record per VM on a shared network (and per VM
//! bridged onto a Linux bridge), alive while the VM's lock is held.

use super::*;

/// A VM's membership record.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    pub vm: String,
    pub vm_dir: PathBuf,
    pub mac: MacAddress,
    pub ip: Ipv4Addr,
    pub tap: String,
    #[serde(default)]
    pub publish: Vec<PortMapping>,
    /// The guest is not given the network's IPv6 (a VM under a network
    /// policy); records of earlier releases, whose networks had no IPv6,
    /// read as false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_ipv6: bool,
}

/// A running VM bridged onto a Linux bridge of the user's (`bridged:br0`,
/// its tap in that bridge): while one runs, lume keeps its accept for the
/// bridge's own traffic in other tools' chains (with br_netfilter, Docker's
/// `FORWARD` policy drops frames between the bridge's ports). One record
/// per VM in `<runtime>/bridged/`, so VMs on the same bridge never conflict:
/// the accept stays while any of them lives.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BridgedMember {
    pub vm: String,
    pub vm_dir: PathBuf,
    pub bridge: String,
    /// The guest's MAC address (records of older releases have none).
    #[serde(default)]
    pub mac: Option<MacAddress>,
}

impl BridgedMember {
    pub fn id(&self) -> String {
        member_id(&self.vm, &self.vm_dir)
    }

    pub(super) fn alive(&self) -> bool {
        liveness_of(&self.vm_dir) != Liveness::Dead
    }
}

/// The key of a VM's membership: its name plus a hash of its directory, so
/// VMs of the same name in two storage locations never share a record.
pub fn member_id(vm: &str, vm_dir: &Path) -> String {
    let mut h: u32 = 0x811c_9dc5; // FNV-1a
    for b in vm_dir.as_os_str().as_encoded_bytes() {
        h = (h ^ u32::from(*b)).wrapping_mul(0x0100_0193);
    }
    format!("{vm}-{h:08x}")
}

impl Member {
    pub fn id(&self) -> String {
        member_id(&self.vm, &self.vm_dir)
    }

    /// Whether the member's VM runs, as far as its lock can tell.
    pub fn liveness(&self) -> Liveness {
        liveness_of(&self.vm_dir)
    }

    /// Not provably dead: a member whose lock cannot be checked keeps its
    /// share of the network (ports, reservation, the bridge itself).
    pub(super) fn alive(&self) -> bool {
        self.liveness() != Liveness::Dead
    }
}

/// What a VM's lock says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// The lock is held: the supervisor runs.
    Alive,
    /// The lock is free, or its file (or the VM directory) is gone.
    Dead,
    /// The lock could not be checked (permissions, a symlink, I/O): nothing
    /// may be torn down on that basis.
    Unknown,
}

/// The liveness of the VM in `vm_dir` (see [`Liveness`]).
pub fn liveness_of(vm_dir: &Path) -> Liveness {
    match VmLock::is_held(&vm_dir.join(".lock")) {
        Ok(true) => Liveness::Alive,
        Ok(false) => Liveness::Dead,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Liveness::Dead,
        Err(_) => Liveness::Unknown,
    }
}

impl Networks {
    pub(super) fn bridged_dir(&self) -> PathBuf {
        self.root.join("bridged")
    }

    /// The records of VMs bridged onto Linux bridges (dead ones included).
    pub fn bridged_members(&self) -> Vec<BridgedMember> {
        let Ok(entries) = fs::read_dir(self.bridged_dir()) else {
            return Vec::new();
        };
        let mut v: Vec<BridgedMember> = entries
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| serde_json::from_slice(&fs::read(e.path()).ok()?).ok())
            .filter(|m: &BridgedMember| crate::network::mode::valid_ifname(&m.bridge))
            .collect();
        v.sort_by(|a, b| a.vm.cmp(&b.vm));
        v
    }

    pub(super) fn remove_bridged(&self, id: &str) -> Result<(), SharedError> {
        match fs::remove_file(self.bridged_dir().join(format!("{id}.json"))) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(SharedError::Runtime {
                path: self.bridged_dir(),
                source,
            }),
        }
    }
}

impl SharedNet {
    pub(super) fn members_dir(&self) -> PathBuf {
        self.dir.join("members")
    }

    /// Every membership record.
    pub fn members(&self) -> Vec<Member> {
        let Ok(entries) = fs::read_dir(self.members_dir()) else {
            return Vec::new();
        };
        let mut v: Vec<Member> = entries
            .filter_map(Result::ok)
            .filter_map(|e| serde_json::from_slice(&fs::read(e.path()).ok()?).ok())
            .collect();
        v.sort_by(|a, b| a.vm.cmp(&b.vm));
        v
    }

    pub(super) fn write_member(&self, m: &Member) -> Result<(), SharedError> {
        let dir = self.members_dir();
        let io = |source| SharedError::Runtime {
            path: dir.clone(),
            source,
        };
        fs::create_dir_all(&dir).map_err(io)?;
        crate::network::rundir::private_dir(&dir, &dir).map_err(io)?;
        let path = dir.join(format!("{}.json", m.id()));
        crate::util::atomic::write_runtime(
            &path,
            &serde_json::to_vec_pretty(m).expect("member serialises"),
        )
        .map_err(io)?;
        crate::network::rundir::private_file(&path).map_err(io)
    }

    pub(super) fn remove_member(&self, id: &str) -> Result<(), SharedError> {
        self.dnsmasq().release(id);
        match fs::remove_file(self.members_dir().join(format!("{id}.json"))) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(SharedError::Runtime {
                path: self.members_dir(),
                source,
            }),
        }
    }
}
