//! Small helpers shared by every module: atomic file writes, randomness, time.

pub mod atomic;
pub mod fds;
pub mod random;
#[cfg(test)]
pub mod testing;
pub mod time;
