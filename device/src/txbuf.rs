//! Bytes the guest sent that the host socket has not taken yet.
//!
//! Normally guest payload goes straight from guest memory to the host socket
//! with `writev` and this buffer stays empty (and unallocated). Only when the
//! host socket is full is the rest copied here, so the descriptor chain can be
//! returned at once and a slow host reader stalls only its own connection.
//!
//! The buffer always holds the newest bytes of the guest-to-host stream:
//! what it holds ends at the connection's `rx_cnt`, which the caller passes
//! in (`end`). It keeps only how many bytes it holds; where a byte sits
//! follows from its stream offset alone (offset modulo the ring size, a
//! power of two, so wrapping u32 offsets map consistently). That is what
//! lets a successor process adopt a buffer kept in shared memory from two
//! numbers in the connection's record: `rx_cnt` and the bytes held.
//!
//! Invariant: `len() <= limit`, and the limit is the connection's
//! `buf_alloc`, the credit the guest was granted. A guest that keeps to its
//! credit can therefore never overflow it; one that does not is reset.
//! Because every byte held, and every byte a push writes, lies within one
//! credit window `[fwd_cnt, rx_cnt)` of at most `limit <= ring` bytes, a
//! push never overwrites a byte that is still held.

use std::io;
use std::num::Wrapping;
use std::os::fd::RawFd;

use crate::iov::{write_fd, GuestIovs};

/// Where the bytes live.
#[derive(Debug)]
enum Storage {
    /// Allocated on first use and freed when drained.
    Heap(Box<[u8]>),
    /// A fixed area of shared memory that a successor can adopt.
    Shared { ptr: *mut u8 },
}

/// A bounded FIFO of the newest stream bytes.
#[derive(Debug)]
pub struct TxBuf {
    storage: Storage,
    held: usize,
    limit: usize,
    /// Ring size: the smallest power of two holding `limit` bytes.
    ring: usize,
    /// A byte was ever stored.
    used: bool,
}

/// Bytes of ring a buffer limited to `limit` bytes uses.
pub fn ring_bytes(limit: usize) -> usize {
    limit.max(1).next_power_of_two()
}

impl TxBuf {
    /// An empty heap buffer that will hold at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        TxBuf {
            storage: Storage::Heap(Box::new([])),
            held: 0,
            limit,
            ring: ring_bytes(limit),
            used: false,
        }
    }

    /// A buffer over shared memory at `ptr` that already holds `held`
    /// bytes (the newest of the stream, placed by their offsets).
    ///
    /// # Safety
    ///
    /// `ptr` must be valid for reads and writes of [`ring_bytes(limit)`]
    /// bytes for the buffer's whole life, and nothing else may use them
    /// meanwhile.
    pub unsafe fn shared(limit: usize, ptr: *mut u8, held: usize) -> Result<Self, ()> {
        if held > limit {
            return Err(());
        }
        Ok(TxBuf {
            storage: Storage::Shared { ptr },
            held,
            limit,
            ring: ring_bytes(limit),
            used: held > 0,
        })
    }

    /// True when a byte was ever stored.
    pub fn was_used(&self) -> bool {
        self.used
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.held
    }

    /// True when nothing is held.
    pub fn is_empty(&self) -> bool {
        self.held == 0
    }

    /// Room left.
    pub fn free(&self) -> usize {
        self.limit - self.held
    }

    fn data(&mut self) -> &mut [u8] {
        let ring = self.ring;
        match &mut self.storage {
            Storage::Heap(b) => {
                if b.is_empty() {
                    *b = vec![0u8; ring].into_boxed_slice();
                }
                b
            }
            // SAFETY: `shared`'s contract: `ring` bytes at `ptr`, ours alone.
            Storage::Shared { ptr } => unsafe { std::slice::from_raw_parts_mut(*ptr, ring) },
        }
    }

    fn pos(&self, offset: Wrapping<u32>) -> usize {
        offset.0 as usize & (self.ring - 1)
    }

    /// Copies `len` bytes of `src` from `src_offset` to the places of
    /// stream offsets `[at, at + len)`.
    fn copy_in(&mut self, at: Wrapping<u32>, src: &GuestIovs<'_>, src_offset: usize, len: usize) {
        self.used |= len > 0;
        let mut done = 0;
        while done < len {
            let p = self.pos(at + Wrapping(done as u32));
            let chunk = (len - done).min(self.ring - p);
            let data = self.data();
            let n = src.read_at(src_offset + done, &mut data[p..p + chunk]);
            done += chunk;
            if n < chunk {
                break;
            }
        }
    }

    /// Appends `len` bytes of `src` starting at `offset`: the stream bytes
    /// that end at `end` (the connection's `rx_cnt` counting them). Fails
    /// without copying anything if they do not fit.
    pub fn push_guest(
        &mut self,
        src: &GuestIovs<'_>,
        offset: usize,
        len: usize,
        end: u32,
    ) -> Result<(), ()> {
        if len > self.free() {
            return Err(());
        }
        self.copy_in(Wrapping(end) - Wrapping(len as u32), src, offset, len);
        self.held += len;
        Ok(())
    }

    /// Puts `len` bytes of `src` starting at `offset` before everything
    /// held (bytes that come earlier in the stream; what is held still ends
    /// at `end`). Fails without copying anything if they do not fit.
    pub fn push_front_guest(
        &mut self,
        src: &GuestIovs<'_>,
        offset: usize,
        len: usize,
        end: u32,
    ) -> Result<(), ()> {
        if len > self.free() || offset + len > src.len() {
            return Err(());
        }
        let at = Wrapping(end) - Wrapping((self.held + len) as u32);
        self.copy_in(at, src, offset, len);
        self.held += len;
        Ok(())
    }

    /// The bytes at stream offsets `[from, from + len)`, which must lie
    /// within what is held (ending at `end`), as at most two slices (the
    /// ring may wrap). `None` if they do not.
    pub fn slices(&mut self, from: u32, len: usize, end: u32) -> Option<(&[u8], &[u8])> {
        let start_of_held = Wrapping(end) - Wrapping(self.held as u32);
        let skip = (Wrapping(from) - start_of_held).0 as usize;
        if skip > self.held || len > self.held - skip {
            return None;
        }
        let start = self.pos(Wrapping(from));
        let first = (self.ring - start).min(len);
        let second = len - first;
        let data = self.data();
        let (head, tail) = data.split_at(start);
        Some((&tail[..first], &head[..second]))
    }

    /// Drops the `n` oldest bytes held (the host client acknowledged
    /// them). A heap buffer frees its storage once empty.
    pub fn release(&mut self, n: usize) {
        self.held -= n.min(self.held);
        if self.held == 0 {
            if let Storage::Heap(b) = &mut self.storage {
                *b = Box::new([]);
            }
        }
    }

    /// Writes as much as `fd` takes of what is held (ending at `end`);
    /// returns bytes written. A heap buffer frees its storage once empty,
    /// so idle connections cost no buffer memory.
    pub fn flush_to(&mut self, fd: RawFd, end: u32) -> io::Result<usize> {
        let mut total = 0;
        while self.held > 0 {
            let start = self.pos(Wrapping(end) - Wrapping(self.held as u32));
            let first = (self.ring - start).min(self.held);
            let second = self.held - first;
            let data = self.data();
            let (a, b) = (&data[start..start + first], &data[..second]);
            let n = match write_fd(fd, &[a, b]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            };
            self.held -= n;
            total += n;
            if n < first + second {
                break;
            }
        }
        if self.held == 0 {
            if let Storage::Heap(b) = &mut self.storage {
                *b = Box::new([]);
            }
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
        assert!(t.push_guest(&g, 0, 10, 10).is_ok());
        assert_eq!(t.flush_to(a.as_raw_fd(), 10).unwrap(), 10);
        assert!(t.is_empty());
        assert!(t.push_guest(&g, 10, 12, 22).is_ok());
        assert!(t.push_guest(&g, 22, 4, 26).is_ok());
        assert_eq!(t.push_guest(&g, 26, 1, 27), Err(()), "over capacity");
        assert_eq!(t.len(), 16);
        assert_eq!(t.flush_to(a.as_raw_fd(), 26).unwrap(), 16);
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
        t.push_guest(&g, 0, 100, 100).unwrap();
        assert_eq!(t.flush_to(a.as_raw_fd(), 100).unwrap(), 0);
        assert_eq!(t.len(), 100);
        // Drain the reader; now the buffer goes through.
        b.set_nonblocking(true).unwrap();
        let mut sink = vec![0u8; 1 << 20];
        while b.read(&mut sink).map(|n| n > 0).unwrap_or(false) {}
        assert_eq!(t.flush_to(a.as_raw_fd(), 100).unwrap(), 100);
    }

    #[test]
    fn slices_name_held_bytes_across_the_wrap_and_release_drops_the_oldest() {
        let mut src: Vec<u8> = (0..64u8).collect();
        let iovs = guest(&mut src);
        // SAFETY: `src` outlives `g` and is not otherwise accessed meanwhile.
        let g = unsafe { GuestIovs::new(&iovs) };
        let mut t = TxBuf::new(16);
        let mut end = u32::MAX - 5;
        for chunk in [(0, 10), (10, 6)] {
            end = end.wrapping_add(chunk.1 as u32);
            t.push_guest(&g, chunk.0, chunk.1, end).unwrap();
        }
        let first = end.wrapping_sub(16);
        let (a, b) = t.slices(first.wrapping_add(3), 10, end).unwrap();
        assert_eq!([a, b].concat(), (3..13u8).collect::<Vec<_>>());
        assert!(
            t.slices(first.wrapping_add(3), 14, end).is_none(),
            "past the end"
        );
        assert!(
            t.slices(first.wrapping_sub(1), 2, end).is_none(),
            "before the start"
        );
        t.release(4);
        assert_eq!(t.len(), 12);
        assert!(t.slices(first, 1, end).is_none(), "released");
        let (a, b) = t.slices(first.wrapping_add(4), 12, end).unwrap();
        assert_eq!([a, b].concat(), (4..16u8).collect::<Vec<_>>());
        t.release(100);
        assert!(t.is_empty());
    }

    /// A buffer in shared memory, abandoned with bytes held (its process
    /// died) and adopted from its length and `rx_cnt` alone, gives the
    /// same bytes in the same order, across the u32 wrap of the offsets.
    #[test]
    fn shared_buffer_is_adopted_from_its_length_and_end() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut src: Vec<u8> = (0..200u8).collect();
        let iovs = guest(&mut src);
        // SAFETY: `src` outlives `g` and is not otherwise accessed meanwhile.
        let g = unsafe { GuestIovs::new(&iovs) };
        let limit = 100;
        let mut area = vec![0u8; ring_bytes(limit)];
        assert_eq!(area.len(), 128);
        let mut end = Wrapping(u32::MAX - 40);
        {
            // SAFETY: `area` is ring_bytes(limit) long and used by one buffer at a time.
            let mut t = unsafe { TxBuf::shared(limit, area.as_mut_ptr(), 0) }.unwrap();
            // Stream bytes 0..30 at offsets end-30.., then 30..90 crossing
            // the u32 wrap, then 10 parked bytes put in front.
            end += Wrapping(30);
            t.push_guest(&g, 0, 30, end.0).unwrap();
            end += Wrapping(60);
            t.push_guest(&g, 30, 60, end.0).unwrap();
            assert_eq!(t.push_guest(&g, 90, 11, (end + Wrapping(11)).0), Err(()));
            assert_eq!(t.len(), 90);
        }
        // SAFETY: as above; the first buffer is gone.
        let mut t = unsafe { TxBuf::shared(limit, area.as_mut_ptr(), 90) }.unwrap();
        assert!(unsafe { TxBuf::shared(limit, area.as_mut_ptr(), 101) }.is_err());
        assert_eq!(t.flush_to(a.as_raw_fd(), end.0).unwrap(), 90);
        let mut got = [0u8; 90];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got[..], &src[..90]);
        // Bytes put in front come out first.
        end += Wrapping(5);
        t.push_guest(&g, 150, 5, end.0).unwrap();
        t.push_front_guest(&g, 100, 20, end.0).unwrap();
        assert_eq!(t.flush_to(a.as_raw_fd(), end.0).unwrap(), 25);
        let mut got = [0u8; 25];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got[..20], &src[100..120]);
        assert_eq!(&got[20..], &src[150..155]);
    }
}
