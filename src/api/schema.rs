//! OpenAPI schemas of the responses whose Rust types live elsewhere
//! (`VmDetails`, `HostInterface`). They only describe the JSON; the tests
//! below keep them in step with the real types.
#![allow(dead_code)]

use utoipa::ToSchema;

/// lume's `diskSize`: bytes really used, and the disk's size.
#[derive(ToSchema)]
#[schema(as = DiskSize)]
pub struct DiskSizeDoc {
    pub allocated: u64,
    pub total: u64,
}

/// How the VM is (or, when stopped, will be) connected.
#[derive(ToSchema)]
#[schema(as = NetworkDetails, rename_all = "camelCase")]
pub struct NetworkDetailsDoc {
    /// The effective mode: the run's override while running, else the saved one.
    pub mode: String,
    /// The host-side device (tap or macvtap) while running.
    pub host_device: Option<String>,
    /// The bridge or parent interface the device is attached to.
    pub parent: Option<String>,
    /// Published ports as `[HOST_IP:]HOST_PORT:GUEST_PORT/PROTO`.
    pub published_ports: Vec<String>,
    /// A limit worth knowing about this mode.
    pub note: Option<String>,
}

/// One VM: exactly the JSON of `lume get NAME -f json`. Every key is always present.
#[derive(ToSchema)]
#[schema(as = VmDetails, rename_all = "camelCase")]
pub struct VmDetailsDoc {
    #[schema(example = "web")]
    pub name: String,
    #[schema(example = "linux")]
    pub os: Option<String>,
    pub cpu_count: Option<u32>,
    /// Bytes.
    pub memory_size: Option<u64>,
    pub disk_size: Option<DiskSizeDoc>,
    #[schema(example = "1024x768")]
    pub display: Option<String>,
    /// `running`, `stopped`, or `invalid` when the config cannot be read.
    #[schema(example = "running")]
    pub status: String,
    /// Always null: VMs run headless.
    pub vnc_url: Option<String>,
    /// The guest's address once known.
    pub ip_address: Option<String>,
    /// Always null: SSH is not probed.
    pub ssh_available: Option<bool>,
    /// `default`, or the storage path.
    pub location_name: String,
    pub shared_directories: Vec<String>,
    /// The saved network mode.
    #[schema(example = "nat")]
    pub network_mode: Option<String>,
    pub mac_address: Option<String>,
    /// `kvm` or `tcg` while running, else null.
    pub accelerator: Option<String>,
    pub network: Option<NetworkDetailsDoc>,
    /// Why the VM is `invalid`; null otherwise.
    pub error: Option<String>,
}

/// One host interface, as `lume config network interfaces -f json` prints it.
#[derive(ToSchema)]
#[schema(as = HostInterface, rename_all = "camelCase")]
pub struct HostInterfaceDoc {
    pub name: String,
    /// ethernet, wifi, bridge, bond, vlan, veth, tun, tap, macvlan, loopback or other.
    #[schema(rename = "type")]
    pub kind: String,
    /// operstate: up, down, unknown, …
    pub state: String,
    pub mac_address: Option<String>,
    /// CIDR strings like `192.0.2.10/24`.
    pub ipv4: Vec<String>,
    /// Carries the IPv4 default route.
    pub is_default: bool,
    pub bridgeable: bool,
    /// Why the interface is not bridgeable; null when it is.
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use utoipa::PartialSchema;

    use super::*;
    use crate::network::interfaces::{HostInterface, InterfaceType};
    use crate::vm::details::{DiskSize, NetworkDetails, VmDetails};

    fn properties<T: PartialSchema>() -> BTreeSet<String> {
        let v = serde_json::to_value(T::schema()).unwrap();
        v["properties"]
            .as_object()
            .expect("an object schema")
            .keys()
            .cloned()
            .collect()
    }

    fn keys(v: serde_json::Value) -> BTreeSet<String> {
        v.as_object().unwrap().keys().cloned().collect()
    }

    #[test]
    fn vm_details_schema_matches_the_json() {
        let d = VmDetails {
            name: "a".into(),
            os: None,
            cpu_count: None,
            memory_size: None,
            disk_size: Some(DiskSize {
                allocated: 0,
                total: 0,
            }),
            display: None,
            status: "stopped".into(),
            vnc_url: None,
            ip_address: None,
            ssh_available: None,
            location_name: "default".into(),
            shared_directories: vec![],
            network_mode: None,
            mac_address: None,
            accelerator: None,
            network: Some(NetworkDetails {
                mode: "nat".into(),
                host_device: None,
                parent: None,
                published_ports: vec![],
                note: None,
            }),
            error: None,
        };
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(properties::<VmDetailsDoc>(), keys(v.clone()));
        assert_eq!(properties::<DiskSizeDoc>(), keys(v["diskSize"].clone()));
        assert_eq!(
            properties::<NetworkDetailsDoc>(),
            keys(v["network"].clone())
        );
    }

    #[test]
    fn host_interface_schema_matches_the_json() {
        let i = HostInterface {
            name: "eth0".into(),
            kind: InterfaceType::Ethernet,
            state: "up".into(),
            mac_address: None,
            ipv4: vec![],
            is_default: true,
            bridgeable: true,
            reason: None,
            master: None,
        };
        assert_eq!(
            properties::<HostInterfaceDoc>(),
            keys(serde_json::to_value(&i).unwrap())
        );
    }
}
