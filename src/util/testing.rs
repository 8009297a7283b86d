//! Helpers for tests only.

use std::process::{Child, Command};
use std::time::Duration;

/// Spawns `cmd`, whose program is a file the test has just written. While
/// another test thread forks, its child holds that file's write descriptor
/// until it execs, and exec fails with ETXTBSY for that moment: try again.
pub fn spawn_fresh_program(cmd: &mut Command) -> Child {
    for _ in 0..200 {
        match cmd.spawn() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other.unwrap(),
        }
    }
    panic!("the freshly written program stayed busy for 4 s");
}
