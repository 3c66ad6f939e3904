//! A fixed-capacity byte ring: the resend buffer (host-to-guest bytes not
//! yet acknowledged) and the receive buffer (guest bytes not yet read).
//!
//! Invariant: the bytes in the ring are `storage[head..]` followed by
//! `storage[..head + len - capacity]` when they wrap, and `len <= capacity`.

/// A byte queue of fixed capacity whose contents can be borrowed as (at
/// most) two slices.
pub struct ByteRing {
    storage: Vec<u8>,
    head: usize,
    len: usize,
}

impl ByteRing {
    /// An empty ring that holds up to `capacity` bytes (at least one). The
    /// memory is zeroed lazily by the allocator, so a large idle ring costs
    /// address space, not pages.
    pub fn new(capacity: usize) -> ByteRing {
        ByteRing {
            storage: vec![0; capacity.max(1)],
            head: 0,
            len: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.storage.len()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn free(&self) -> usize {
        self.capacity() - self.len
    }

    /// Appends as much of `data` as fits; returns how much that was.
    pub fn push(&mut self, data: &[u8]) -> usize {
        let count = data.len().min(self.free());
        let tail = (self.head + self.len) % self.capacity();
        let first = count.min(self.capacity() - tail);
        self.storage[tail..tail + first].copy_from_slice(&data[..first]);
        self.storage[..count - first].copy_from_slice(&data[first..count]);
        self.len += count;
        count
    }

    /// Moves up to `out.len()` bytes from the front into `out`; returns how
    /// many.
    pub fn pop_into(&mut self, out: &mut [u8]) -> usize {
        let count = out.len().min(self.len);
        let [first, second] = self.slices(0, count);
        out[..first.len()].copy_from_slice(first);
        out[first.len()..count].copy_from_slice(second);
        self.consume(count);
        count
    }

    /// Drops `count` bytes (at most all) from the front.
    pub fn consume(&mut self, count: usize) {
        let count = count.min(self.len);
        self.head = (self.head + count) % self.capacity();
        self.len -= count;
        if self.len == 0 {
            self.head = 0;
        }
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.head = 0;
        self.len = 0;
    }

    /// The `count` bytes starting `start` bytes after the front, as two
    /// slices (the second empty unless they wrap). Clamped to the contents.
    pub fn slices(&self, start: usize, count: usize) -> [&[u8]; 2] {
        let start = start.min(self.len);
        let count = count.min(self.len - start);
        let begin = (self.head + start) % self.capacity();
        let first = count.min(self.capacity() - begin);
        [
            &self.storage[begin..begin + first],
            &self.storage[..count - first],
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents(ring: &ByteRing) -> Vec<u8> {
        let [a, b] = ring.slices(0, ring.len());
        [a, b].concat()
    }

    #[test]
    fn push_stops_at_capacity() {
        let mut ring = ByteRing::new(4);
        assert_eq!(ring.push(b"abcdef"), 4);
        assert_eq!(ring.free(), 0);
        assert_eq!(contents(&ring), b"abcd");
        assert_eq!(ring.push(b"x"), 0);
    }

    #[test]
    fn wraps_and_reads_back_in_order() {
        let mut ring = ByteRing::new(5);
        ring.push(b"abc");
        ring.consume(2);
        assert_eq!(ring.push(b"defg"), 4);
        let [a, b] = ring.slices(0, 5);
        assert_eq!((a, b), (&b"cde"[..], &b"fg"[..]));
        assert_eq!(ring.slices(2, 10), [&b"e"[..], &b"fg"[..]]);
        assert_eq!(ring.slices(3, 1), [&b"f"[..], &b""[..]]);
        let mut out = [0u8; 3];
        assert_eq!(ring.pop_into(&mut out), 3);
        assert_eq!(&out, b"cde");
        assert_eq!(contents(&ring), b"fg");
        let mut out = [0u8; 8];
        assert_eq!(ring.pop_into(&mut out), 2);
        assert!(ring.is_empty());
    }

    #[test]
    fn long_random_use_matches_a_simple_queue() {
        let mut ring = ByteRing::new(97);
        let mut model = std::collections::VecDeque::new();
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut byte = 0u8;
        for _ in 0..10_000 {
            if next() % 2 == 0 {
                let data: Vec<u8> = (0..next() % 60)
                    .map(|_| {
                        byte = byte.wrapping_add(1);
                        byte
                    })
                    .collect();
                let pushed = ring.push(&data);
                model.extend(&data[..pushed]);
            } else {
                let mut out = vec![0u8; (next() % 60) as usize];
                let count = ring.pop_into(&mut out);
                let expected: Vec<u8> = model.drain(..count).collect();
                assert_eq!(&out[..count], &expected[..]);
            }
            assert_eq!(ring.len(), model.len());
        }
    }
}
