//! What lume does for and inside a guest from outside: the cloud-init NoCloud
//! seed that provisions it (cloudinit.rs), the per-user SSH key pair lume logs
//! in with (keys.rs), `lume ssh` (ssh.rs), the QEMU guest agent, graceful
//! power-off and reboot, whether SSH answers.

pub mod agent;
pub mod cloudinit;
pub mod keys;
pub mod power;
pub mod reach;
pub mod ssh;
