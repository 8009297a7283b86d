//! What lume does for and inside a guest from outside: the cloud-init NoCloud
//! seed that provisions it (cloudinit.rs), the per-user SSH key pair lume logs
//! in with (keys.rs), and `lume ssh` (ssh.rs).

pub mod cloudinit;
pub mod keys;
pub mod ssh;
