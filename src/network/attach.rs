//! What a network mode hands QEMU for one run, and how it is taken down.
//! Each mode validates before QEMU starts, sets up its host side, and
//! returns QEMU arguments plus the guest's address when it is known.

use super::NetworkMode;
use super::privilege::has_net_admin;
use super::publish::{PortMapping, PublishError, check_unique};
use super::user::UserNet;
use crate::vm::config::MacAddress;

/// Why a network could not be attached.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(
        "Network mode '{0}' needs the CAP_NET_ADMIN capability: run lume as root (sudo lume ...), or give the binary the capability (sudo setcap cap_net_admin+ep $(command -v lume)); --network user needs no privileges"
    )]
    NeedsNetAdmin(NetworkMode),
    #[error(
        "Network mode '{0}' is not available in this version of lume yet: use --network user (no privileges needed) or --network none"
    )]
    NotYet(NetworkMode),
    #[error(
        "Ports cannot be published in network mode '{0}': publishing works with nat and user; a bridged VM is reachable on the LAN at its own address"
    )]
    PublishNotSupported(NetworkMode),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error(transparent)]
    UserSubnet(#[from] super::user::BadSubnet),
}

/// A network attached for one run. Dropping it tears the host side down.
#[derive(Debug, Default)]
pub struct Attachment {
    /// Arguments for QEMU (netdev and device).
    pub qemu_args: Vec<String>,
    /// The guest's address if the mode knows it up front.
    pub ip_address: Option<String>,
    /// The host-side device, if any.
    pub host_device: Option<String>,
}

/// Options that apply to every mode.
#[derive(Debug, Clone, Default)]
pub struct AttachOptions {
    /// `userSubnet` from config.yaml.
    pub user_net: Option<String>,
    /// Ports to publish for this run.
    pub publish: Vec<PortMapping>,
}

/// Checks, before anything is created, that `mode` can start here.
pub fn validate(mode: &NetworkMode, opts: &AttachOptions) -> Result<(), AttachError> {
    if !opts.publish.is_empty() && !mode.supports_publish() {
        return Err(AttachError::PublishNotSupported(mode.clone()));
    }
    check_unique(&opts.publish)?;
    if let Some(s) = &opts.user_net {
        s.parse::<UserNet>()?;
    }
    if mode.needs_net_admin() && !has_net_admin() {
        return Err(AttachError::NeedsNetAdmin(mode.clone()));
    }
    match mode {
        NetworkMode::User | NetworkMode::None => Ok(()),
        other => Err(AttachError::NotYet(other.clone())),
    }
}

/// Sets up `mode` for a VM with `mac`.
pub fn attach(
    mode: &NetworkMode,
    mac: MacAddress,
    opts: &AttachOptions,
) -> Result<Attachment, AttachError> {
    validate(mode, opts)?;
    let device = |netdev: &str| format!("virtio-net-pci,netdev={netdev},mac={mac}");
    match mode {
        NetworkMode::None => Ok(Attachment::default()),
        NetworkMode::User => {
            let net: UserNet = match &opts.user_net {
                Some(s) => s.parse()?,
                None => UserNet::default(),
            };
            Ok(Attachment {
                qemu_args: vec![
                    "-netdev".into(),
                    net.netdev("net0", &opts.publish),
                    "-device".into(),
                    device("net0"),
                ],
                ip_address: Some(net.guest_address().to_string()),
                host_device: None,
            })
        }
        other => Err(AttachError::NotYet(other.clone())),
    }
}
