//! Kernel plumbing, with no policy of lume's: rtnetlink (links, addresses,
//! routes, tc), tap devices, the kernel's network events, packet sockets
//! and the network sysctls lume switches.

pub mod events;
pub mod netlink;
pub mod packet;
pub mod sysctl;
pub mod tap;
