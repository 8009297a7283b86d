//! `run.json`: what the supervisor of a running VM publishes for other
//! commands. It is only trusted while the VM lock is held; a stale file from a
//! killed supervisor is ignored and replaced by the next run.

use std::net::IpAddr;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

use crate::hypervisor::accel::Accel;
use crate::network::NetworkMode;
use crate::network::publish::PortMapping;
use crate::util::atomic::write_private;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunState {
    /// The supervisor process.
    pub pid: u32,
    pub qemu_pid: u32,
    pub accelerator: Accel,
    /// The mode this run uses (the saved one or the `--network` override).
    pub network_mode: NetworkMode,
    /// Unix time the VM started.
    pub started_at: u64,
    /// The guest's address once known.
    #[serde(default, deserialize_with = "lenient")]
    pub ip_address: Option<IpAddr>,
    /// Bridged: the global IPv6 addresses the guest announced in its
    /// neighbour discovery this run (at most 8), sorted; what the guest
    /// claims, shown only.
    #[serde(
        default,
        deserialize_with = "lenient_list",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ipv6_addresses: Vec<std::net::Ipv6Addr>,
    /// The host-side network device, if any.
    #[serde(default)]
    pub host_device: Option<String>,
    /// Ports published for this run.
    #[serde(default)]
    pub published: Vec<PortMapping>,
    /// The bridge or parent interface of the host device.
    #[serde(default)]
    pub parent: Option<String>,
    /// A limit of this network attachment.
    #[serde(default)]
    pub note: Option<String>,
    /// dnsmasq's lease file for NAT and host-only VMs.
    #[serde(default)]
    pub lease_file: Option<std::path::PathBuf>,
    /// User mode with IPv6: the file the guest's IPv6 addresses are
    /// recorded in (see [`crate::network::passt::read_guest6`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest6_file: Option<std::path::PathBuf>,
    /// The MAC address of this run.
    #[serde(default, deserialize_with = "lenient")]
    pub mac_address: Option<crate::vm::config::MacAddress>,
    /// Whether a program in the guest holds the guest agent's channel open
    /// (QEMU's VSERPORT_CHANGE events); `None` when not known.
    #[serde(default)]
    pub guest_agent: Option<bool>,
    /// Bridged on a plain interface: the macvlan on `parent` that joins the
    /// tap (`host_device`) to it, re-created when the parent returns. Runs
    /// started before lume did this have a macvtap as `host_device` instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uplink: Option<String>,
    /// The network policy this run enforces (the saved one or the run's).
    #[serde(
        default,
        skip_serializing_if = "crate::network::policy::Policy::is_empty"
    )]
    pub network_policy: crate::network::policy::Policy,
    /// The loopback port of the VM's VNC display (see hypervisor/vnc.rs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vnc_port: Option<u16>,
    /// The VNC password of this run: only in this 0600 file, shown as part
    /// of `vncUrl` to those who may read the VM's details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vnc_password: Option<String>,
    /// The directories shared with the guest in this run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared_directories: Vec<crate::hypervisor::virtiofs::ShareState>,
}

/// An address field of run.json (or of a snapshot's record) as written by
/// any release: a value lume
/// cannot read (edited by hand, not a string, a form it does not know) is
/// unknown, never a reason to misread the whole file: an unreadable
/// run.json would make a running VM look stopped.
pub(crate) fn lenient<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
{
    Ok(Option::<serde_json::Value>::deserialize(d)?
        .as_ref()
        .and_then(serde_json::Value::as_str)
        .and_then(|s| s.parse().ok()))
}

/// A list of addresses in run.json: entries lume cannot read are left
/// out, and a value that is not a list is an empty one, for the same
/// reason as [`lenient`].
pub(crate) fn lenient_list<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
{
    Ok(Option::<serde_json::Value>::deserialize(d)?
        .as_ref()
        .and_then(serde_json::Value::as_array)
        .map(|a| a.iter().filter_map(|v| v.as_str()?.parse().ok()).collect())
        .unwrap_or_default())
}

impl RunState {
    /// Whether the supervisor this file names still exists.
    pub fn supervisor_alive(&self) -> bool {
        std::fs::read(format!("/proc/{}/cmdline", self.pid))
            .map(|c| String::from_utf8_lossy(&c).contains("lume"))
            .unwrap_or(false)
    }

    pub fn load(path: &Path) -> Option<Self> {
        let text = std::fs::read(path).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        write_private(
            path,
            &serde_json::to_vec_pretty(self).expect("state serialises"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// run.json as the earlier release wrote it (`to_vec_pretty` of its
    /// RunState, whose addresses were strings).
    const EARLIER: &str = r#"{
  "pid": 4242,
  "qemuPid": 4243,
  "accelerator": "tcg",
  "networkMode": "nat",
  "startedAt": 1764460800,
  "ipAddress": "192.0.2.15",
  "hostDevice": "lume-tap3",
  "published": [],
  "parent": "lume0",
  "note": null,
  "leaseFile": "/run/lume/0/nat/leases",
  "macAddress": "52:54:00:12:34:56",
  "guestAgent": true,
  "vncPort": 5901,
  "vncPassword": "secret"
}"#;

    #[test]
    fn run_json_of_the_earlier_release_loads_and_is_written_the_same() {
        let s: RunState = serde_json::from_str(EARLIER).unwrap();
        assert_eq!(s.ip_address, Some("192.0.2.15".parse().unwrap()));
        assert_eq!(s.mac_address, Some("52:54:00:12:34:56".parse().unwrap()));
        assert_eq!(s.guest_agent, Some(true));
        // The same file, byte for byte: the addresses are the same strings.
        assert_eq!(
            String::from_utf8(serde_json::to_vec_pretty(&s).unwrap()).unwrap(),
            EARLIER
        );
    }

    fn with(field: &str, value: serde_json::Value) -> RunState {
        let mut v: serde_json::Value = serde_json::from_str(EARLIER).unwrap();
        v[field] = value;
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn an_address_lume_cannot_read_is_unknown_and_the_run_still_loads() {
        for bad in [
            serde_json::json!("192.0.2.999"),
            serde_json::json!(""),
            serde_json::json!("not an address"),
            serde_json::json!(42),
            serde_json::json!(["192.0.2.15"]),
            serde_json::json!({"v4": "192.0.2.15"}),
        ] {
            let s = with("ipAddress", bad.clone());
            assert_eq!(s.ip_address, None, "{bad}");
            // Everything else is still there: the VM stays listable as running.
            assert_eq!((s.pid, s.qemu_pid), (4242, 4243));
            assert!(s.mac_address.is_some());
        }
        for bad in [
            serde_json::json!("52:54:00:12:34"),
            serde_json::json!("zz:54:00:12:34:56"),
            // Multicast: never a guest's own address.
            serde_json::json!("01:00:5e:00:00:01"),
            serde_json::json!(7),
        ] {
            let s = with("macAddress", bad.clone());
            assert_eq!(s.mac_address, None, "{bad}");
            assert_eq!(s.ip_address, Some("192.0.2.15".parse().unwrap()));
        }
        // Missing or null: unknown, as before.
        assert_eq!(with("ipAddress", serde_json::Value::Null).ip_address, None);
        let mut v: serde_json::Value = serde_json::from_str(EARLIER).unwrap();
        v.as_object_mut().unwrap().remove("macAddress");
        v.as_object_mut().unwrap().remove("ipAddress");
        let s: RunState = serde_json::from_value(v).unwrap();
        assert_eq!((s.ip_address, s.mac_address), (None, None));
    }

    #[test]
    fn ipv6_addresses_lume_cannot_read_are_left_out() {
        let s = with(
            "ipv6Addresses",
            serde_json::json!([
                "2001:db8:ff::5",
                "not one",
                7,
                "192.0.2.1",
                "2001:db8:ff::6"
            ]),
        );
        assert_eq!(
            s.ipv6_addresses,
            vec![
                "2001:db8:ff::5".parse::<std::net::Ipv6Addr>().unwrap(),
                "2001:db8:ff::6".parse().unwrap()
            ]
        );
        for bad in [serde_json::json!("2001:db8:ff::5"), serde_json::json!({})] {
            let s = with("ipv6Addresses", bad.clone());
            assert!(s.ipv6_addresses.is_empty(), "{bad}");
            assert_eq!(s.pid, 4242);
        }
        let v = serde_json::to_value(with("ipv6Addresses", serde_json::json!([]))).unwrap();
        assert!(
            v.get("ipv6Addresses").is_none(),
            "an empty list is not written"
        );
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["ipv6Addresses"][1], "2001:db8:ff::6");
    }

    #[test]
    fn other_spellings_of_an_address_are_read_and_written_canonically() {
        let s = with("macAddress", serde_json::json!("52-54-00-AB-CD-EF"));
        assert_eq!(s.mac_address.unwrap().to_string(), "52:54:00:ab:cd:ef");
        let s = with("ipAddress", serde_json::json!("2001:db8::15"));
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["ipAddress"], "2001:db8::15");
    }

    #[test]
    fn a_saved_run_json_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run.json");
        std::fs::write(&p, EARLIER).unwrap();
        let s = RunState::load(&p).unwrap();
        s.save(&p).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), EARLIER);
    }
}
