//! A record in shared memory that a crash never leaves half-written, as far
//! as a reader can tell: two copies (A and B), each with a sequence number
//! and a checksum.
//!
//! Writing: the copy with the lower sequence number (the older one, or one
//! left torn) is overwritten. Its sequence number is first set to 0
//! ("being written"), then the body and checksum are stored, then the new
//! sequence number (the other copy's plus one), each step ordered after
//! the one before by a release fence. The other copy, the last complete
//! one, is never touched during a write.
//!
//! Reading (recovery, with no writer left): a copy is complete when its
//! sequence number is not 0 and its checksum matches its sequence number
//! and body. The newest complete copy wins; [`Record::read_where`] lets the
//! caller reject the newest when an outside condition shows it was not
//! confirmed (the RX commit rule), falling back to the older copy, which is
//! then exactly the state before the last write.
//!
//! Invariant: at every instant at least one copy is complete once the
//! record has been written twice, and the newest complete copy is the last
//! write that finished. A crash during the very first write leaves no
//! complete copy: the record reads as never written.

use std::marker::PhantomData;
use std::sync::atomic::{fence, AtomicU64, Ordering};
use std::sync::Arc;

use vm_memory::ByteValued;

/// One copy: sequence number, checksum, body.
#[repr(C)]
#[derive(Clone, Copy)]
struct Copy<T> {
    seq: u64,
    sum: u64,
    body: T,
}

/// Bytes a record of `T` takes in the region.
pub const fn record_bytes<T>() -> usize {
    2 * std::mem::size_of::<Copy<T>>()
}

/// FNV-1a, 64 bits, over the sequence number and the body.
fn checksum(seq: u64, body: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET_BASIS;
    for b in seq.to_le_bytes().iter().chain(body) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(PRIME);
    }
    h
}

/// A complete copy read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed<T> {
    /// Its sequence number: how many writes the record has seen.
    pub seq: u64,
    /// The body.
    pub body: T,
}

/// Reads the copy at `p` if it is complete.
///
/// # Safety
///
/// `p` must be 8-aligned and valid for reads of one `Copy<T>`.
unsafe fn read_copy_at<T: ByteValued>(p: *const Copy<T>) -> Option<Committed<T>> {
    // SAFETY: `seq` is the first field of an 8-aligned copy (caller);
    // AtomicU64 has u64's layout, and a load does not write.
    let seq = unsafe { &*std::ptr::addr_of!((*p).seq).cast::<AtomicU64>() }.load(Ordering::Acquire);
    if seq == 0 {
        return None;
    }
    // SAFETY: the copy is readable (caller), and `T` is ByteValued, so any
    // bytes found there are a valid `T`.
    let (sum, body) = unsafe {
        (
            std::ptr::read_volatile(std::ptr::addr_of!((*p).sum)),
            std::ptr::read_volatile(std::ptr::addr_of!((*p).body)),
        )
    };
    (checksum(seq, body.as_slice()) == sum).then_some(Committed { seq, body })
}

/// The newest of two copies read back that `confirmed` accepts.
fn newest<T>(
    mut copies: [Option<Committed<T>>; 2],
    confirmed: impl Fn(&Committed<T>) -> bool,
) -> Option<Committed<T>> {
    copies.sort_by_key(|c| std::cmp::Reverse(c.as_ref().map_or(0, |c| c.seq)));
    copies.into_iter().flatten().find(|c| confirmed(c))
}

/// The newest complete copy of the record at `ptr`, read without a
/// [`Record`]: for a process that only looks at the region while a worker
/// may be writing it (a copy being written fails its checksum, and the
/// other one is taken).
///
/// # Safety
///
/// `ptr` must be 8-aligned and valid for reads of [`record_bytes::<T>()`]
/// bytes.
pub(crate) unsafe fn peek<T: ByteValued>(ptr: *const u8) -> Option<Committed<T>> {
    let copies = ptr.cast::<Copy<T>>();
    // SAFETY: the record holds two copies (caller).
    let read = |i: usize| unsafe { read_copy_at(copies.add(i)) };
    newest([read(0), read(1)], |_| true)
}

/// An A/B record of `T` at a fixed place in shared memory. It keeps the
/// memory it lives in mapped (`keep`).
pub struct Record<T> {
    copies: *mut Copy<T>,
    _keep: Option<Arc<dyn Send + Sync>>,
    _body: PhantomData<T>,
}

impl<T> std::fmt::Debug for Record<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Record@{:p}", self.copies)
    }
}

impl<T: ByteValued> Record<T> {
    /// The record at `ptr`, in memory that `keep` keeps mapped.
    ///
    /// # Safety
    ///
    /// `ptr` must be aligned to 8 and valid for reads and writes of
    /// [`record_bytes::<T>()`] bytes for as long as `keep` lives (or
    /// forever if `None`), and no other [`Record`] may write those bytes
    /// meanwhile.
    pub unsafe fn at(ptr: *mut u8, keep: Option<Arc<dyn Send + Sync>>) -> Self {
        debug_assert_eq!(ptr as usize % 8, 0);
        Record {
            copies: ptr.cast(),
            _keep: keep,
            _body: PhantomData,
        }
    }

    fn copy_ptr(&self, i: usize) -> *mut Copy<T> {
        // SAFETY: `i` is 0 or 1 and the record holds two copies (`at`).
        unsafe { self.copies.add(i) }
    }

    fn seq(&self, i: usize) -> &AtomicU64 {
        // SAFETY: `seq` is the first field of an 8-aligned `Copy`, valid
        // for the record's lifetime; AtomicU64 has u64's layout.
        unsafe { &*std::ptr::addr_of_mut!((*self.copy_ptr(i)).seq).cast::<AtomicU64>() }
    }

    /// Reads copy `i` if it is complete.
    fn read_copy(&self, i: usize) -> Option<Committed<T>> {
        // SAFETY: copy `i` lies in valid memory (`at`).
        unsafe { read_copy_at(self.copy_ptr(i)) }
    }

    /// The newest complete copy, if any.
    pub fn read(&self) -> Option<Committed<T>> {
        self.read_where(|_| true)
    }

    /// The newest complete copy that `confirmed` accepts. The older copy is
    /// considered only when the newer one is rejected or torn.
    pub fn read_where(&self, confirmed: impl Fn(&Committed<T>) -> bool) -> Option<Committed<T>> {
        newest([self.read_copy(0), self.read_copy(1)], confirmed)
    }

    /// Sequence number of the newest copy (complete or not), 0 if none.
    pub fn last_seq(&self) -> u64 {
        self.seq(0)
            .load(Ordering::Relaxed)
            .max(self.seq(1).load(Ordering::Relaxed))
    }

    /// Writes `body` as the new newest copy; returns its sequence number.
    pub fn write(&mut self, body: &T) -> u64 {
        let (s0, s1) = (
            self.seq(0).load(Ordering::Relaxed),
            self.seq(1).load(Ordering::Relaxed),
        );
        let target = usize::from(s1 < s0);
        let seq = s0.max(s1) + 1;
        let sum = checksum(seq, body.as_slice());
        self.seq(target).store(0, Ordering::Relaxed);
        fence(Ordering::Release);
        // SAFETY: the copy lies in valid memory that only this record
        // writes (`at`).
        unsafe {
            let p = self.copy_ptr(target);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).body), *body);
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).sum), sum);
        }
        fence(Ordering::Release);
        self.seq(target).store(seq, Ordering::Release);
        seq
    }

    /// Forgets both copies: the record reads as never written.
    pub fn clear(&mut self) {
        self.seq(0).store(0, Ordering::Release);
        self.seq(1).store(0, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[repr(C)]
    #[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
    struct Body {
        a: u64,
        b: u32,
        c: u32,
    }
    // SAFETY: plain integers, no padding.
    unsafe impl ByteValued for Body {}

    fn mem() -> Vec<u64> {
        vec![0u64; record_bytes::<Body>() / 8]
    }

    fn body(a: u64) -> Body {
        Body { a, b: 7, c: 9 }
    }

    #[test]
    fn never_written_reads_none_then_newest_wins() {
        let mut m = mem();
        // SAFETY: `m` is 8-aligned and large enough, used by one record.
        let mut r = unsafe { Record::<Body>::at(m.as_mut_ptr().cast(), None) };
        assert_eq!(r.read(), None);
        assert_eq!(r.write(&body(1)), 1);
        assert_eq!(r.read().map(|c| c.body), Some(body(1)));
        for i in 2..10 {
            assert_eq!(r.write(&body(i)), i);
            assert_eq!(
                r.read(),
                Some(Committed {
                    seq: i,
                    body: body(i)
                })
            );
        }
    }

    /// A write cut short anywhere (the process died inside `write`) reads
    /// back as the previous complete write.
    #[test]
    fn torn_write_reads_as_the_previous_one() {
        let mut m = mem();
        // SAFETY: `m` is 8-aligned and large enough, used by one record.
        let mut r = unsafe { Record::<Body>::at(m.as_mut_ptr().cast(), None) };
        r.write(&body(1));
        r.write(&body(2));
        let before = m.clone();
        // SAFETY: as above.
        let mut r = unsafe { Record::<Body>::at(m.as_mut_ptr().cast(), None) };
        r.write(&body(3));
        let after = m.clone();
        let half = before.len() / 2;
        // The write went to copy 0, the older one (seq 1).
        let target = 0;
        assert_ne!(before[target..half], after[target..half]);
        assert_eq!(before[half..], after[half..]);
        // Its sequence number is cleared first; then any prefix of the
        // other words may have been stored when the process died.
        for stored in 0..half {
            let mut torn = before.clone();
            torn[target] = 0;
            torn[target + 1..target + 1 + stored]
                .copy_from_slice(&after[target + 1..target + 1 + stored]);
            // SAFETY: as above.
            let r = unsafe { Record::<Body>::at(torn.as_mut_ptr().cast(), None) };
            assert_eq!(
                r.read(),
                Some(Committed {
                    seq: 2,
                    body: body(2)
                }),
                "{stored} words stored"
            );
        }
        // SAFETY: as above.
        let r = unsafe { Record::<Body>::at(m.as_mut_ptr().cast(), None) };
        assert_eq!(
            r.read(),
            Some(Committed {
                seq: 3,
                body: body(3)
            })
        );
    }

    #[test]
    fn corrupted_body_is_rejected_by_its_checksum() {
        let mut m = mem();
        // SAFETY: as above.
        let mut r = unsafe { Record::<Body>::at(m.as_mut_ptr().cast(), None) };
        r.write(&body(1));
        r.write(&body(2));
        // Copy 1 holds seq 2; flip a bit of its body.
        let words = m.len();
        m[words / 2 + 2] ^= 1;
        // SAFETY: as above.
        let r = unsafe { Record::<Body>::at(m.as_mut_ptr().cast(), None) };
        assert_eq!(
            r.read(),
            Some(Committed {
                seq: 1,
                body: body(1)
            })
        );
    }

    #[test]
    fn read_where_falls_back_to_the_older_copy() {
        let mut m = mem();
        // SAFETY: as above.
        let mut r = unsafe { Record::<Body>::at(m.as_mut_ptr().cast(), None) };
        r.write(&body(1));
        r.write(&body(2));
        assert_eq!(
            r.read_where(|c| c.body.a != 2).map(|c| c.body),
            Some(body(1))
        );
        assert_eq!(r.read_where(|_| false), None);
        r.clear();
        assert_eq!(r.read(), None);
    }

    /// `peek` (a reader without a `Record`) sees what `read` sees, torn
    /// copies included.
    #[test]
    fn peek_reads_as_read() {
        let mut m = mem();
        // SAFETY: `m` is 8-aligned and holds a record of `Body`.
        assert_eq!(unsafe { peek::<Body>(m.as_ptr().cast()) }, None);
        // SAFETY: as above.
        let mut r = unsafe { Record::<Body>::at(m.as_mut_ptr().cast(), None) };
        r.write(&body(1));
        r.write(&body(2));
        r.write(&body(3));
        // SAFETY: as above.
        let seen = unsafe { peek::<Body>(m.as_ptr().cast()) };
        assert_eq!(seen.map(|c| (c.seq, c.body)), Some((3, body(3))));
        // Copy 0 holds seq 3: a writer has just cleared its sequence.
        m[0] = 0;
        // SAFETY: as above.
        let seen = unsafe { peek::<Body>(m.as_ptr().cast()) };
        assert_eq!(seen.map(|c| (c.seq, c.body)), Some((2, body(2))));
    }
}
