//! `nat`: lume's bridge `lume0` with DHCP, DNS and masquerade (the default).
//! Published ports are DNAT rules in lume's table.

use super::Publishing;
use super::lume_bridge::LumeBridge;
use crate::network::shared::Kind;

pub(super) const NAT: LumeBridge = LumeBridge {
    kind: Kind::Nat,
    publishing: Publishing::Dnat,
};
