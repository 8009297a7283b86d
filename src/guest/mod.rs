//! What lume does inside a guest from outside: the QEMU guest agent, graceful
//! power-off and reboot, whether SSH answers.

pub mod agent;
pub mod power;
pub mod reach;
