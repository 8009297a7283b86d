//! `host`: lume's bridge `lume-host0`, which reaches only this host and other
//! host-only VMs (no forwarding, no masquerade), so nothing is published.

use super::Publishing;
use super::lume_bridge::LumeBridge;
use crate::network::shared::Kind;

pub(super) const HOST: LumeBridge = LumeBridge {
    kind: Kind::Host,
    publishing: Publishing::Unsupported(
        "a host-only VM is reachable from this host at its own address",
    ),
};
