//! Bytes the guest sent that the host socket has not taken yet.
//!
//! Normally guest payload goes straight from guest memory to the host socket
//! with `writev` and this buffer stays empty (and unallocated). Only when the
//! host socket is full is the rest copied here, so the descriptor chain can be
//! returned at once and a slow host reader stalls only its own connection.
//!
//! Invariant: `len() <= capacity`, and the capacity is the connection's
//! `buf_alloc`, the credit the guest was granted. A guest that keeps to its
//! credit can therefore never overflow it; one that does not is reset.

use std::io;
use std::os::fd::RawFd;

use crate::iov::{write_fd, GuestIovs};

/// A bounded FIFO of bytes, allocated on first use and freed when drained.
#[derive(Debug)]
pub struct TxBuf {
    data: Box<[u8]>,
    head: usize,
    len: usize,
    capacity: usize,
}

impl TxBuf {
    /// An empty buffer that will hold at most `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        TxBuf {
            data: Box::new([]),
            head: 0,
            len: 0,
            capacity,
        }
    }

    /// Bytes held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Room left.
    pub fn free(&self) -> usize {
        self.capacity - self.len
    }

    /// Appends `len` bytes of `src` starting at `offset`. Fails without
    /// copying anything if they do not fit.
    pub fn push_guest(&mut self, src: &GuestIovs<'_>, offset: usize, len: usize) -> Result<(), ()> {
        if len > self.free() {
            return Err(());
        }
        if self.data.is_empty() && len > 0 {
            self.data = vec![0u8; self.capacity].into_boxed_slice();
            self.head = 0;
        }
        let mut copied = 0;
        while copied < len {
            let tail = (self.head + self.len) % self.capacity;
            let chunk = (len - copied).min(self.capacity - tail);
            let n = src.read_at(offset + copied, &mut self.data[tail..tail + chunk]);
            self.len += n;
            copied += n;
            if n < chunk {
                break;
            }
        }
        Ok(())
    }

    /// Puts `len` bytes of `src` starting at `offset` before everything
    /// held (bytes that come earlier in the stream). Fails without copying
    /// anything if they do not fit.
    pub fn push_front_guest(
        &mut self,
        src: &GuestIovs<'_>,
        offset: usize,
        len: usize,
    ) -> Result<(), ()> {
        if len > self.free() || offset + len > src.len() {
            return Err(());
        }
        if self.data.is_empty() && len > 0 {
            self.data = vec![0u8; self.capacity].into_boxed_slice();
            self.head = 0;
        }
        let start = (self.head + self.capacity - len) % self.capacity.max(1);
        let first = len.min(self.capacity - start);
        src.read_at(offset, &mut self.data[start..start + first]);
        src.read_at(offset + first, &mut self.data[..len - first]);
        self.head = start;
        self.len += len;
        Ok(())
    }

    /// Writes as much as `fd` takes; returns bytes written. Frees the
    /// storage once empty so idle connections cost no buffer memory.
    pub fn flush_to(&mut self, fd: RawFd) -> io::Result<usize> {
        let mut total = 0;
        while self.len > 0 {
            let first = (self.capacity - self.head).min(self.len);
            let second = self.len - first;
            let a = &self.data[self.head..self.head + first];
            let b = &self.data[..second];
            let n = match write_fd(fd, &[a, b]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            self.head = (self.head + n) % self.capacity;
            self.len -= n;
            total += n;
            if n < first + second {
                break;
            }
        }
        if self.len == 0 {
            self.data = Box::new([]);
            self.head = 0;
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    fn guest(buf: &mut Vec<u8>) -> Vec<libc::iovec> {
        vec![libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }]
    }

    #[test]
    fn wraps_and_preserves_order() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut src: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let iovs = guest(&mut src);
        // SAFETY: `src` outlives `g` and is not otherwise accessed meanwhile.
        let g = unsafe { GuestIovs::new(&iovs) };
        let mut t = TxBuf::new(16);
        assert!(t.push_guest(&g, 0, 10).is_ok());
        assert_eq!(t.flush_to(a.as_raw_fd()).unwrap(), 10);
        assert!(t.is_empty());
        assert!(t.push_guest(&g, 10, 12).is_ok());
        assert!(t.push_guest(&g, 22, 4).is_ok());
        assert_eq!(t.push_guest(&g, 26, 1), Err(()), "over capacity");
        assert_eq!(t.len(), 16);
        assert_eq!(t.flush_to(a.as_raw_fd()).unwrap(), 16);
        let mut got = [0u8; 26];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got[..], &src[..26]);
    }

    #[test]
    fn partial_flush_when_socket_is_full() {
        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        // Fill the socket first.
        let junk = vec![0u8; 1 << 16];
        while write_fd(a.as_raw_fd(), &[&junk]).is_ok() {}
        let mut src = vec![7u8; 100];
        let iovs = guest(&mut src);
        // SAFETY: `src` outlives `g` and is not otherwise accessed meanwhile.
        let g = unsafe { GuestIovs::new(&iovs) };
        let mut t = TxBuf::new(128);
        t.push_guest(&g, 0, 100).unwrap();
        assert_eq!(t.flush_to(a.as_raw_fd()).unwrap(), 0);
        assert_eq!(t.len(), 100);
        // Drain the reader; now the buffer goes through.
        b.set_nonblocking(true).unwrap();
        let mut sink = vec![0u8; 1 << 20];
        while b.read(&mut sink).map(|n| n > 0).unwrap_or(false) {}
        assert_eq!(t.flush_to(a.as_raw_fd()).unwrap(), 100);
    }
}
