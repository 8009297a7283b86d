//! Small helpers shared by every module: atomic file writes, randomness,
//! time, what lume reads of other processes in /proc.

pub mod atomic;
pub mod cpu;
pub mod fds;
pub mod procfs;
pub mod random;
#[cfg(test)]
pub mod testing;
pub mod time;
pub mod watch;
