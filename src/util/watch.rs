//! Waiting for a file to be written into a directory, woken by inotify
//! rather than polling on a timer.

use std::os::fd::AsFd as _;
use std::path::Path;
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

/// A watch on one directory for files created, closed after writing, or
/// renamed into it (how lume's atomic writes land).
pub struct DirWatch {
    /// `None` where inotify cannot be used (no instance or watch left
    /// under the user's limits): [`Self::wait`] then only sleeps.
    inotify: Option<Inotify>,
}

impl DirWatch {
    pub fn new(dir: &Path) -> Self {
        let inotify = Inotify::init(InitFlags::IN_CLOEXEC | InitFlags::IN_NONBLOCK)
            .ok()
            .filter(|i| {
                i.add_watch(
                    dir,
                    AddWatchFlags::IN_MOVED_TO
                        | AddWatchFlags::IN_CREATE
                        | AddWatchFlags::IN_CLOSE_WRITE
                        | AddWatchFlags::IN_ONLYDIR,
                )
                .is_ok()
            });
        Self { inotify }
    }

    /// Returns once something was written into the directory since the
    /// last call (or the watch began), or `timeout` (at most 60 s) passed.
    pub fn wait(&mut self, timeout: Duration) {
        let ms = timeout.as_millis().min(60_000) as u16;
        let Some(inotify) = &self.inotify else {
            std::thread::sleep(timeout);
            return;
        };
        let mut fds = [PollFd::new(inotify.as_fd(), PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, PollTimeout::from(ms)) {
            // Drained (a few reads at most: a writer that never stops must
            // not keep the caller from its deadline): the next wait waits
            // for what comes after.
            Ok(n) if n > 0 => {
                for _ in 0..4 {
                    if !inotify.read_events().is_ok_and(|e| !e.is_empty()) {
                        break;
                    }
                }
            }
            Ok(_) => {}
            // Interrupted by a signal, or a broken instance: never spin.
            Err(_) => std::thread::sleep(timeout.min(Duration::from_millis(5))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A file renamed into the directory wakes the wait at once, not at
    /// its timeout; with nothing written the wait lasts its timeout.
    #[test]
    fn a_rename_into_the_directory_ends_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = DirWatch::new(dir.path());
        assert!(w.inotify.is_some());
        let t = Instant::now();
        w.wait(Duration::from_millis(50));
        assert!(t.elapsed() >= Duration::from_millis(50));
        let path = dir.path().join("run.json");
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            crate::util::atomic::write_runtime(&path, b"{}").unwrap();
        });
        let t = Instant::now();
        w.wait(Duration::from_secs(30));
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
        writer.join().unwrap();
    }
}
