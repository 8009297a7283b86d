//! Randomness from the kernel (getrandom(2), through the `getrandom`
//! crate); used for MAC addresses and temporary names, where a weak source
//! would cause collisions.

/// Fills `buf` with random bytes from the kernel.
pub fn fill(buf: &mut [u8]) {
    if let Err(e) = getrandom::fill(buf) {
        // Only on a kernel without getrandom(2) and without /dev/urandom:
        // nothing lume can do without randomness.
        panic!("getrandom(2) failed: {e}");
    }
}

/// A random 64-bit number.
pub fn u64() -> u64 {
    let mut b = [0u8; 8];
    fill(&mut b);
    u64::from_ne_bytes(b)
}

#[cfg(test)]
mod tests {
    #[test]
    fn bytes_differ_between_calls_and_fill_the_whole_buffer() {
        let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
        super::fill(&mut a);
        super::fill(&mut b);
        assert_ne!(a, b);
        // 64 zero bytes from a working source: practically never.
        assert_ne!(a, [0u8; 64]);
        assert_ne!(super::u64(), super::u64());
    }
}
