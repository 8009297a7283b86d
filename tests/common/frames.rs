//! Frames written to and read from real taps (`Tap::create`, with a
//! virtio-net header) by the frame-level tests.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use lume::network::kernel::tap::Tap;

/// The 16-bit one's complement sum of `data`, folded (not inverted).
pub fn sum16(data: &[u8]) -> u32 {
    let mut s: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        s += u32::from(w);
    }
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s
}

/// `frame` behind an empty virtio-net header (no offload asked for).
pub fn plain(frame: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; 10];
    f.extend_from_slice(frame);
    f
}

/// Everything that arrives on `tap` within `wait` (as the kernel writes
/// it: the virtio-net header, then the frame).
pub fn drain(tap: &Tap, wait: Duration) -> Vec<Vec<u8>> {
    // SAFETY: fcntl on a descriptor the Tap owns; only flags change.
    unsafe {
        let fl = libc::fcntl(tap.fd.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(tap.fd.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    let mut file = std::fs::File::from(tap.fd.try_clone().unwrap());
    let mut frames = Vec::new();
    let end = Instant::now() + wait;
    let mut buf = vec![0u8; 65536];
    while Instant::now() < end {
        match file.read(&mut buf) {
            Ok(n) => frames.push(buf[..n].to_vec()),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    frames
}
