//! VM networking. `mode` is the user-facing choice; `driver` holds one file
//! per mode behind one trait; `attach` is what every mode shares when it
//! turns into what QEMU needs for one run.

pub mod attach;
pub mod dhcp_snoop;
pub mod dnsmasq;
pub mod doctor;
pub mod driver;
pub mod guest6;
pub mod handoff;
pub mod heal;
pub mod interfaces;
pub mod kernel;
pub mod mode;
pub mod ndp_snoop;
pub mod passt;
pub mod policy;
pub mod prefix6;
pub mod privilege;
pub mod publish;
pub mod resolvers;
pub mod rundir;
pub mod shared;
pub mod subnet;
pub mod uplink;
pub mod user;

pub use mode::NetworkMode;
