//! VM networking. `mode` is the user-facing choice; `attach` turns a mode into
//! what QEMU needs for one run; each mode has its own file.

pub mod attach;
pub mod dhcp_snoop;
pub mod dnsmasq;
pub mod doctor;
pub mod events;
pub mod handoff;
pub mod heal;
pub mod interfaces;
pub mod mode;
pub mod netlink;
pub mod passt;
pub mod policy;
pub mod privilege;
pub mod publish;
pub mod resolvers;
pub mod rundir;
pub mod shared;
pub mod subnet;
pub mod tap;
pub mod uplink;
pub mod user;

pub use mode::NetworkMode;
