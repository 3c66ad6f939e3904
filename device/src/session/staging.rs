//! Host-to-guest bytes of a resumable session that were read and checked
//! but that the guest has no room for yet: a FIFO of at most
//! [`H2G_WINDOW_BYTES`](super::H2G_WINDOW_BYTES), allocated while it holds
//! something and freed when it drains, so idle sessions cost nothing.
//!
//! Staged bytes are not persisted: they are not acknowledged to the
//! client, which sends them again after a break.

/// The staging FIFO.
#[derive(Debug, Default)]
pub struct Staging {
    buf: Vec<u8>,
    /// Bytes at the front already given to the guest.
    head: usize,
}

impl Staging {
    /// Bytes held.
    pub fn len(&self) -> usize {
        self.buf.len() - self.head
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes held, oldest first.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.head..]
    }

    /// Room for `len` more bytes at the back, zeroed, to read into: they
    /// are held from now on, unless dropped with [`Staging::truncate`].
    pub fn reserve(&mut self, len: usize) -> &mut [u8] {
        if self.head > 0 && self.head == self.buf.len() {
            self.clear();
        }
        let at = self.buf.len();
        self.buf.resize(at + len, 0);
        &mut self.buf[at..]
    }

    /// Drops the last `len` bytes (a frame that failed its check).
    pub fn truncate(&mut self, len: usize) {
        let keep = self.buf.len().saturating_sub(len).max(self.head);
        self.buf.truncate(keep);
    }

    /// Takes `n` bytes off the front.
    pub fn consume(&mut self, n: usize) {
        self.head = (self.head + n).min(self.buf.len());
        if self.head == self.buf.len() {
            self.clear();
        }
    }

    /// Empties it and frees its memory.
    pub fn clear(&mut self) {
        self.buf = Vec::new();
        self.head = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_order_and_memory_freed_when_drained() {
        let mut s = Staging::default();
        s.reserve(3).copy_from_slice(b"abc");
        s.reserve(2).copy_from_slice(b"de");
        s.consume(2);
        assert_eq!(s.bytes(), b"cde");
        s.reserve(4).copy_from_slice(b"xxxx");
        s.truncate(4);
        assert_eq!(s.bytes(), b"cde");
        s.consume(3);
        assert!(s.is_empty());
        assert_eq!(s.buf.capacity(), 0);
    }
}
