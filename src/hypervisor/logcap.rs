//! Bounded logs of what a VM writes: the guest's serial console and QEMU's
//! stderr reach the supervisor through pipes, and a pump thread appends them
//! to `console.log` / `qemu.log`. A file that would grow past the cap is
//! renamed to `<name>.1` (replacing the older one) and started afresh, so the
//! newest output is always kept and both together stay within twice the cap.
//! Every chunk is written as soon as it is read, so `tail -f` sees lines at
//! once.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The cap of each log file.
pub const LOG_CAP: u64 = 8 << 20;

/// Tests only: a smaller cap in bytes (never a larger one).
pub const LOG_CAP_ENV: &str = "LUME_TEST_LOG_CAP";

/// The cap in force: [`LOG_CAP`], or a smaller one from [`LOG_CAP_ENV`].
pub fn cap() -> u64 {
    std::env::var(LOG_CAP_ENV)
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|c| (1..LOG_CAP).contains(c))
        .unwrap_or(LOG_CAP)
}

/// Opens a log lume writes: never through a symlink, private (0600), closed
/// on exec; `truncate` starts it empty, else it is appended to.
pub fn open_log(path: &Path, truncate: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY);
    if truncate {
        o.truncate(true);
    } else {
        o.append(true);
    }
    o.open(path)
}

/// A log file with a size cap and one rotated predecessor.
#[derive(Debug)]
pub struct CappedLog {
    path: PathBuf,
    old: PathBuf,
    file: File,
    size: u64,
    cap: u64,
}

impl CappedLog {
    /// Starts `path` empty and removes the predecessor of an earlier run.
    pub fn create(path: &Path, cap: u64) -> io::Result<Self> {
        let mut old = path.as_os_str().to_owned();
        old.push(".1");
        let old = PathBuf::from(old);
        match fs::remove_file(&old) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        Ok(Self {
            file: open_log(path, true)?,
            path: path.to_path_buf(),
            old,
            size: 0,
            cap: cap.max(1),
        })
    }

    /// Appends `data`, rotating first when it would pass the cap. Of a chunk
    /// larger than the cap only its newest `cap` bytes are kept.
    pub fn write(&mut self, mut data: &[u8]) -> io::Result<()> {
        if data.len() as u64 > self.cap {
            data = &data[data.len() - self.cap as usize..];
        }
        if self.size + data.len() as u64 > self.cap {
            fs::rename(&self.path, &self.old)?;
            self.file = open_log(&self.path, true)?;
            self.size = 0;
        }
        self.file.write_all(data)?;
        self.size += data.len() as u64;
        Ok(())
    }
}

/// Copies everything read from `input` into a capped log at `path` until
/// end of file, on a thread of its own.
pub fn pump(input: File, path: &Path, cap: u64) -> io::Result<std::thread::JoinHandle<()>> {
    pump_into(input, CappedLog::create(path, cap)?)
}

/// Appends one piece (a line) to the log at `path`, which several writers
/// append to (O_APPEND): first [`trim`]med so that the piece fits the cap.
pub fn append(path: &Path, data: &[u8], cap: u64) -> io::Result<()> {
    trim(path, cap.saturating_sub(data.len() as u64))?;
    open_log(path, false)?.write_all(data)
}

/// Keeps a log that writers append to (O_APPEND, possibly from descriptors
/// they keep) within `cap`: a larger one is copied to `PATH.1` and emptied
/// in place, so every writer goes on at its new end.
pub fn trim(path: &Path, cap: u64) -> io::Result<()> {
    let f = open_log(path, false)?;
    if f.metadata()?.len() <= cap {
        return Ok(());
    }
    let mut old = path.as_os_str().to_owned();
    old.push(".1");
    let old = PathBuf::from(old);
    let _ = fs::remove_file(&old);
    io::copy(&mut File::open(path)?, &mut open_log(&old, true)?)?;
    f.set_len(0)
}

fn pump_into(mut input: File, mut log: CappedLog) -> io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("lume-log".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match input.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        if log.write(&buf[..n]).is_err() {
                            // Keep draining so the writer never blocks.
                            continue;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
        })
}

/// A pipe whose read end stays with lume (close-on-exec) and whose write end
/// is given to QEMU.
pub fn pipe() -> io::Result<(File, std::os::fd::OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    Ok((File::from(r), w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_written_by_appending_are_trimmed_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lume.log");
        // A writer that keeps its descriptor (a supervisor's stderr).
        let mut kept = open_log(&path, false).unwrap();
        kept.write_all(&[b'a'; 3000]).unwrap();
        trim(&path, 4000).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().len(), 3000, "under the cap");
        // Another writer appends line by line (the watcher's repairs).
        for _ in 0..20 {
            append(&path, &[b'b'; 100], 4000).unwrap();
        }
        assert!(fs::metadata(&path).unwrap().len() <= 4000);
        assert!(fs::metadata(dir.path().join("lume.log.1")).unwrap().len() <= 4100);
        kept.write_all(b"newest\n").unwrap();
        let text = fs::read(&path).unwrap();
        assert!(text.ends_with(b"newest\n"));
        assert!(
            text.len() <= 4000 + 7,
            "the kept descriptor writes at the new end"
        );
    }

    #[test]
    fn a_flood_stays_bounded_and_keeps_the_newest_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(dir.path().join("console.log.1"), b"old run").unwrap();
        let (r, w) = pipe().unwrap();
        let cap = 10_000;
        let t = pump(r, &path, cap).unwrap();
        let mut w = File::from(w);
        for i in 0..20_000 {
            writeln!(w, "line {i}").unwrap();
        }
        drop(w);
        t.join().unwrap();
        let now = std::fs::read_to_string(&path).unwrap();
        let before = std::fs::read_to_string(dir.path().join("console.log.1")).unwrap();
        assert!(now.len() as u64 <= cap && before.len() as u64 <= cap);
        assert!(now.ends_with("line 19999\n"), "{now}");
        assert!(!before.contains("old run"));
    }

    #[test]
    fn never_writes_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let path = dir.path().join("qemu.log");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        assert!(CappedLog::create(&path, 100).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    }
}
