//! Verified byte streams.
//!
//! Byte `k` of the stream with seed `s` is a pseudo-random function of
//! `(s, k)`: the stream is cut into 8-byte words, word `w` is
//! `mix(s, w)` in little-endian order. A receiver that knows the seed can
//! check every byte at its offset, so a lost, duplicated, reordered or
//! corrupted byte is found and the first bad offset named.

/// Number of bytes in one pattern word.
pub const WORD: u64 = 8;

/// The 64-bit word at word index `w` of the stream with seed `seed`.
#[inline]
pub fn word(seed: u64, w: u64) -> u64 {
    // splitmix64 finaliser over a combination of seed and index.
    let mut z = seed
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(w.wrapping_mul(0xd1b5_4a32_d192_ed03))
        .wrapping_add(0x632b_e59b_d9b4_e019);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Byte `k` of the stream with seed `seed`.
#[inline]
pub fn byte_at(seed: u64, k: u64) -> u8 {
    word(seed, k / WORD).to_le_bytes()[(k % WORD) as usize]
}

/// Fills `buf` with the stream bytes starting at offset `offset`.
pub fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut k = offset;
    let mut i = 0usize;
    // Unaligned head.
    while i < buf.len() && k % WORD != 0 {
        buf[i] = byte_at(seed, k);
        i += 1;
        k += 1;
    }
    // Whole words.
    let mut chunks = buf[i..].chunks_exact_mut(WORD as usize);
    let mut w = k / WORD;
    for c in &mut chunks {
        c.copy_from_slice(&word(seed, w).to_le_bytes());
        w += 1;
    }
    let rest = chunks.into_remainder();
    let base = w * WORD;
    for (j, b) in rest.iter_mut().enumerate() {
        *b = byte_at(seed, base + j as u64);
    }
}

/// Checks that `buf` holds the stream bytes starting at offset `offset`.
/// Returns the index within `buf` of the first byte that differs.
pub fn check(seed: u64, offset: u64, buf: &[u8]) -> Option<usize> {
    let mut k = offset;
    let mut i = 0usize;
    while i < buf.len() && k % WORD != 0 {
        if buf[i] != byte_at(seed, k) {
            return Some(i);
        }
        i += 1;
        k += 1;
    }
    let mut w = k / WORD;
    let body = &buf[i..];
    let mut chunks = body.chunks_exact(WORD as usize);
    for c in &mut chunks {
        let want = word(seed, w).to_le_bytes();
        if c != want {
            let j = c
                .iter()
                .zip(want.iter())
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Some(i + j);
        }
        i += WORD as usize;
        w += 1;
    }
    let base = w * WORD;
    for (j, b) in chunks.remainder().iter().enumerate() {
        if *b != byte_at(seed, base + j as u64) {
            return Some(i + j);
        }
    }
    None
}

/// The seed a peer answers with in the bidirectional modes: a stream with
/// seed `s` is answered with a stream with seed `reply_seed(s)`.
pub fn reply_seed(seed: u64) -> u64 {
    !seed
}

/// Finds which of the seeds `base, base+1, .., base+count-1` starts with
/// the given first 8 bytes. Used to tell apart concurrent streams that
/// each carry the seed `base + i`.
pub fn identify(first: &[u8; 8], base: u64, count: u64) -> Option<u64> {
    let w = u64::from_le_bytes(*first);
    (0..count)
        .map(|i| base.wrapping_add(i))
        .find(|&s| word(s, 0) == w)
}

/// Incremental verifier of one stream.
#[derive(Debug, Clone)]
pub struct Verifier {
    seed: u64,
    received: u64,
    first_bad: Option<u64>,
}

impl Verifier {
    pub fn new(seed: u64) -> Self {
        Self::at(seed, 0)
    }

    /// A verifier whose next expected byte is at `offset`.
    pub fn at(seed: u64, offset: u64) -> Self {
        Verifier {
            seed,
            received: offset,
            first_bad: None,
        }
    }

    /// Feeds the next bytes of the stream.
    pub fn feed(&mut self, buf: &[u8]) {
        if self.first_bad.is_none() {
            if let Some(i) = check(self.seed, self.received, buf) {
                self.first_bad = Some(self.received + i as u64);
            }
        }
        self.received += buf.len() as u64;
    }

    /// Bytes fed so far (including the starting offset).
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Offset of the first byte that did not match, if any.
    pub fn first_bad(&self) -> Option<u64> {
        self.first_bad
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// True when exactly `expected` bytes arrived and all matched.
    pub fn ok(&self, expected: u64) -> bool {
        self.first_bad.is_none() && self.received == expected
    }
}

/// Incremental generator of one stream.
#[derive(Debug, Clone)]
pub struct Generator {
    seed: u64,
    offset: u64,
}

impl Generator {
    pub fn new(seed: u64) -> Self {
        Generator { seed, offset: 0 }
    }

    /// Fills `buf` with the next bytes and advances.
    pub fn next_into(&mut self, buf: &mut [u8]) {
        fill(self.seed, self.offset, buf);
        self.offset += buf.len() as u64;
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_matches_byte_at_at_any_alignment() {
        for off in 0..20u64 {
            for len in 0..40usize {
                let mut b = vec![0u8; len];
                fill(7, off, &mut b);
                for (i, x) in b.iter().enumerate() {
                    assert_eq!(*x, byte_at(7, off + i as u64));
                }
                assert_eq!(check(7, off, &b), None);
            }
        }
    }

    #[test]
    fn check_names_first_bad_byte() {
        let mut b = vec![0u8; 1000];
        fill(1, 3, &mut b);
        b[517] ^= 1;
        b[900] ^= 1;
        assert_eq!(check(1, 3, &b), Some(517));
    }

    #[test]
    fn verifier_detects_loss_duplication_and_reordering() {
        let mut s = vec![0u8; 4096];
        fill(9, 0, &mut s);
        // loss
        let mut v = Verifier::new(9);
        v.feed(&s[..100]);
        v.feed(&s[101..]);
        assert_eq!(v.first_bad(), Some(100));
        // duplication
        let mut v = Verifier::new(9);
        v.feed(&s[..200]);
        v.feed(&s[150..]);
        assert_eq!(v.first_bad(), Some(200));
        // reordering of two chunks
        let mut v = Verifier::new(9);
        v.feed(&s[1000..2000]);
        v.feed(&s[..1000]);
        assert_eq!(v.first_bad(), Some(0));
        // intact
        let mut v = Verifier::new(9);
        for c in s.chunks(333) {
            v.feed(c);
        }
        assert!(v.ok(4096));
        assert!(!v.ok(4095));
    }

    #[test]
    fn different_seeds_differ_and_identify_finds_the_seed() {
        let mut a = [0u8; 64];
        let mut b = [0u8; 64];
        fill(100, 0, &mut a);
        fill(101, 0, &mut b);
        assert_ne!(a, b);
        let first: [u8; 8] = b[..8].try_into().unwrap();
        assert_eq!(identify(&first, 100, 64), Some(101));
        assert_eq!(identify(&first, 102, 64), None);
    }
}
