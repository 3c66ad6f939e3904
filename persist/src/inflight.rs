//! The inflight log of one split virtqueue, in the layout of the vhost-user
//! spec ("Inflight I/O tracking"; libvhost-user and DPDK use the same):
//! a 16-byte header `{u64 features; u16 version = 1; u16 desc_num;
//! u16 last_batch_head; u16 used_idx}` followed by `desc_num` 16-byte
//! entries `{u8 inflight; u8 padding[5]; u16 next; u64 counter}`, one per
//! descriptor head.
//!
//! States of a head: not in flight (`inflight == 0`), or popped and not
//! yet returned (`inflight == 1`, `counter` = its pop order).
//!
//! Transitions and their order:
//! * pop: `counter` is stored, then `inflight = 1`. A crash between the two
//!   leaves the head not in flight, and recovery pops it again from the
//!   available ring (nothing was done with it).
//! * return: the used elements are written and `used->idx` is published in
//!   guest memory (the ring's job), then each returned head gets
//!   `inflight = 0`, then the header's `used_idx` takes the published
//!   value.
//!
//! Recovery is exact because guest memory outlives the worker and holds the
//! used ring: if the header's `used_idx` differs from `used->idx` in guest
//! memory, the worker died inside a return, and the used elements between
//! the two (the heads of that one batch, which cannot have been popped
//! again yet) are cleared. Then the heads still in flight are exactly the
//! chains popped and never returned, `next_avail = used->idx + in flight`,
//! and resubmitting them oldest counter first restores the pop order. The
//! spec's single-head rule (`last_batch_head`) is the one-element case of
//! this; `last_batch_head` is still kept for frontends that read the log.

use std::sync::atomic::{fence, AtomicU16, AtomicU8, Ordering};
use std::sync::Arc;

use vm_memory::ByteValued;

use crate::PersistError;

/// Bytes of the log header.
pub const INFLIGHT_HEADER_BYTES: usize = 16;
/// Bytes of one descriptor entry.
pub const INFLIGHT_DESC_BYTES: usize = 16;
/// Layout version of the split-ring log (vhost-user spec).
pub const INFLIGHT_VERSION: u16 = 1;

/// Bytes of the log of a queue of `queue_size` descriptors, as the spec
/// sizes it: `align_up(16 * queue_size + 16, 64)`.
pub const fn inflight_bytes(queue_size: u16) -> usize {
    (INFLIGHT_DESC_BYTES * queue_size as usize + INFLIGHT_HEADER_BYTES).next_multiple_of(64)
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct Header {
    features: u64,
    version: u16,
    desc_num: u16,
    last_batch_head: u16,
    used_idx: u16,
}

// SAFETY: `repr(C)`, integers without padding (8 + 2 * 4 = 16 bytes).
unsafe impl ByteValued for Header {}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct Desc {
    inflight: u8,
    padding: [u8; 5],
    next: u16,
    counter: u64,
}

// SAFETY: `repr(C)`, integers without padding (1 + 5 + 2 + 8 = 16 bytes).
unsafe impl ByteValued for Desc {}

const _: () = assert!(std::mem::size_of::<Header>() == INFLIGHT_HEADER_BYTES);
const _: () = assert!(std::mem::size_of::<Desc>() == INFLIGHT_DESC_BYTES);

/// What recovery found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Where popping resumes: `used->idx` plus the heads in flight.
    pub next_avail: u16,
    /// Heads popped and never returned, oldest first: resubmit them in
    /// this order.
    pub resubmit: Vec<u16>,
}

/// Where a queue stands as its log records it, read by a process that only
/// looks (see [`summarize`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InflightSummary {
    /// Descriptors of the queue the log was formatted for.
    pub queue_size: u16,
    /// The used index last published and recorded.
    pub used_idx: u16,
    /// Heads popped and not yet returned.
    pub in_flight: u16,
}

impl InflightSummary {
    /// The next available index the device pops: every head in flight was
    /// popped after the last one returned.
    pub fn last_avail_idx(&self) -> u16 {
        self.used_idx.wrapping_add(self.in_flight)
    }
}

/// Reads the log at `ptr` without taking it over: `None` if it was never
/// formatted (or for more descriptors than `capacity`). A worker may be
/// writing it meanwhile; the figures are then those of an instant close to
/// the call, not necessarily one the worker went through.
///
/// # Safety
///
/// `ptr` must be 8-aligned and valid for reads of
/// [`inflight_bytes(capacity)`] bytes.
pub(crate) unsafe fn summarize(ptr: *const u8, capacity: u16) -> Option<InflightSummary> {
    // SAFETY: the header lies at `ptr` (caller).
    let header = unsafe { std::ptr::read_volatile(ptr.cast::<Header>()) };
    if header.version != INFLIGHT_VERSION || header.desc_num == 0 || header.desc_num > capacity {
        return None;
    }
    let descs = ptr.wrapping_add(INFLIGHT_HEADER_BYTES).cast::<Desc>();
    let in_flight = (0..header.desc_num)
        .filter(|&h| {
            // SAFETY: `h < desc_num <= capacity`, so the entry lies in the
            // area; AtomicU8 has u8's layout and a load does not write.
            let flag = unsafe {
                &*std::ptr::addr_of!((*descs.add(usize::from(h))).inflight).cast::<AtomicU8>()
            };
            flag.load(Ordering::Acquire) != 0
        })
        .count() as u16;
    Some(InflightSummary {
        queue_size: header.desc_num,
        used_idx: header.used_idx,
        in_flight,
    })
}

/// The log of one queue, in shared memory.
pub struct InflightLog {
    base: *mut u8,
    /// Descriptor entries in use: the queue's size.
    size: u16,
    /// Capacity of the area (the largest queue size it was laid out for).
    capacity: u16,
    next_counter: u64,
    _keep: Option<Arc<dyn Send + Sync>>,
}

impl std::fmt::Debug for InflightLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InflightLog(size {})", self.size)
    }
}

impl InflightLog {
    /// The log area at `ptr`, laid out for queues of up to `capacity`
    /// descriptors.
    ///
    /// # Safety
    ///
    /// `ptr` must be 8-aligned and valid for reads and writes of
    /// [`inflight_bytes(capacity)`] bytes while `keep` lives (or forever if
    /// `None`), and written by nothing else meanwhile.
    pub unsafe fn at(ptr: *mut u8, capacity: u16, keep: Option<Arc<dyn Send + Sync>>) -> Self {
        InflightLog {
            base: ptr,
            size: 0,
            capacity,
            next_counter: 1,
            _keep: keep,
        }
    }

    fn header(&self) -> *mut Header {
        self.base.cast()
    }

    fn desc(&self, head: u16) -> *mut Desc {
        debug_assert!(head < self.capacity);
        // SAFETY: `head < capacity`, so the entry lies inside the area.
        unsafe {
            self.base
                .add(INFLIGHT_HEADER_BYTES)
                .cast::<Desc>()
                .add(usize::from(head))
        }
    }

    fn inflight_flag(&self, head: u16) -> &AtomicU8 {
        // SAFETY: the entry is in the area (`desc`); AtomicU8 has u8's
        // layout.
        unsafe { &*std::ptr::addr_of_mut!((*self.desc(head)).inflight).cast::<AtomicU8>() }
    }

    fn used_idx_field(&self) -> &AtomicU16 {
        // SAFETY: the header is in the area and `used_idx` is 2-aligned;
        // AtomicU16 has u16's layout.
        unsafe { &*std::ptr::addr_of_mut!((*self.header()).used_idx).cast::<AtomicU16>() }
    }

    /// Starts a fresh log for a queue of `size` descriptors whose used
    /// index is `used_idx`: nothing in flight.
    pub fn format(&mut self, size: u16, used_idx: u16) -> Result<(), PersistError> {
        if size == 0 || size > self.capacity {
            return Err(PersistError::QueueSize {
                size,
                max: self.capacity,
            });
        }
        self.size = size;
        // Counters keep rising across restarts of the ring: records made
        // before (a connection's last chain applied) compare with them.
        // SAFETY: header and entries lie in the area (`at`), which only
        // this log writes.
        unsafe {
            std::ptr::write_bytes(self.base, 0, inflight_bytes(size));
            std::ptr::write_volatile(
                self.header(),
                Header {
                    features: 0,
                    version: INFLIGHT_VERSION,
                    desc_num: size,
                    last_batch_head: 0,
                    used_idx,
                },
            );
        }
        fence(Ordering::Release);
        Ok(())
    }

    /// Makes the next counter at least `at_least`: a successor raises it
    /// past every counter its records name, so counters never repeat in a
    /// region's life.
    pub fn raise_counter(&mut self, at_least: u64) {
        self.next_counter = self.next_counter.max(at_least);
    }

    /// Records that `head` was popped; returns its counter (0 for a head
    /// out of range, which is not recorded).
    pub fn mark(&mut self, head: u16) -> u64 {
        if head >= self.size {
            return 0;
        }
        let counter = self.next_counter;
        self.next_counter += 1;
        // SAFETY: the entry lies in the area (`head < size <= capacity`).
        unsafe {
            std::ptr::write_volatile(std::ptr::addr_of_mut!((*self.desc(head)).counter), counter);
        }
        self.inflight_flag(head).store(1, Ordering::Release);
        counter
    }

    /// Records that `head` went back to the driver: call after the used
    /// index that holds it was published, then [`InflightLog::set_used_idx`].
    pub fn clear(&mut self, head: u16) {
        if head < self.size {
            self.inflight_flag(head).store(0, Ordering::Release);
            // SAFETY: the header lies in the area.
            unsafe {
                std::ptr::write_volatile(
                    std::ptr::addr_of_mut!((*self.header()).last_batch_head),
                    head,
                );
            }
        }
    }

    /// Records the used index just published, after clearing its heads.
    pub fn set_used_idx(&mut self, used_idx: u16) {
        self.used_idx_field().store(used_idx, Ordering::Release);
    }

    /// The counter `head` was last marked with (0 if out of range).
    pub fn counter(&self, head: u16) -> u64 {
        if head >= self.size {
            return 0;
        }
        // SAFETY: the entry lies in the area (`head < size <= capacity`).
        unsafe { std::ptr::read_volatile(std::ptr::addr_of!((*self.desc(head)).counter)) }
    }

    /// True when `head` is in flight.
    pub fn is_inflight(&self, head: u16) -> bool {
        head < self.size && self.inflight_flag(head).load(Ordering::Acquire) != 0
    }

    /// Adopts the log a dead worker left for a queue of `size`
    /// descriptors. `guest_used_idx` is `used->idx` read from guest memory,
    /// and `used_id(i)` the head in used-ring element `i` (taken modulo the
    /// queue size by the caller).
    pub fn recover(
        &mut self,
        size: u16,
        guest_used_idx: u16,
        used_id: impl Fn(u16) -> Option<u16>,
    ) -> Result<Recovered, PersistError> {
        // SAFETY: the header lies in the area.
        let header = unsafe { std::ptr::read_volatile(self.header()) };
        if header.version != INFLIGHT_VERSION || header.desc_num != size || size > self.capacity {
            return Err(PersistError::Inflight(format!(
                "log is version {} for {} descriptors; expected version {INFLIGHT_VERSION} for {size}",
                header.version, header.desc_num
            )));
        }
        self.size = size;
        // The worker died between publishing a batch and recording it.
        let behind = guest_used_idx.wrapping_sub(header.used_idx);
        if behind > size {
            return Err(PersistError::Inflight(format!(
                "used index {guest_used_idx} is {behind} ahead of the log's {}",
                header.used_idx
            )));
        }
        for k in 0..behind {
            let pos = header.used_idx.wrapping_add(k);
            match used_id(pos) {
                Some(head) if head < size => self.inflight_flag(head).store(0, Ordering::Release),
                other => {
                    return Err(PersistError::Inflight(format!(
                        "used element {pos} names head {other:?} (queue size {size})"
                    )))
                }
            }
        }
        self.set_used_idx(guest_used_idx);
        let mut resubmit: Vec<(u64, u16)> = (0..size)
            .filter(|&h| self.is_inflight(h))
            // SAFETY: the entry lies in the area.
            .map(|h| (unsafe { std::ptr::read_volatile(self.desc(h)) }.counter, h))
            .collect();
        resubmit.sort_unstable();
        let after_last = resubmit.last().map_or(1, |&(c, _)| c + 1);
        self.next_counter = self.next_counter.max(after_last);
        Ok(Recovered {
            next_avail: guest_used_idx.wrapping_add(resubmit.len() as u16),
            resubmit: resubmit.into_iter().map(|(_, h)| h).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QS: u16 = 8;

    fn area() -> Vec<u64> {
        vec![0u64; inflight_bytes(QS) / 8]
    }

    fn log(a: &mut [u64]) -> InflightLog {
        // SAFETY: `a` is 8-aligned, large enough for QS, used by one log.
        unsafe { InflightLog::at(a.as_mut_ptr().cast(), QS, None) }
    }

    #[test]
    fn spec_sizes() {
        assert_eq!(inflight_bytes(256), 4160);
        assert_eq!(inflight_bytes(1), 64);
    }

    #[test]
    fn resubmits_unreturned_heads_in_pop_order() {
        let mut a = area();
        let mut l = log(&mut a);
        l.format(QS, 100).unwrap();
        for h in [5, 2, 7, 0] {
            l.mark(h);
        }
        // 2 returned (published as used element 100).
        l.clear(2);
        l.set_used_idx(101);
        let mut l2 = log(&mut a);
        let r = l2.recover(QS, 101, |_| None).unwrap();
        assert_eq!(
            r,
            Recovered {
                next_avail: 104,
                resubmit: vec![5, 7, 0]
            }
        );
        // Counters continue after the newest.
        l2.mark(3);
        let r = log(&mut a).recover(QS, 101, |_| None).unwrap();
        assert_eq!(r.resubmit, vec![5, 7, 0, 3]);
    }

    /// The worker published a batch (used->idx moved in guest memory) but
    /// died before clearing its heads: the used ring says which they were.
    #[test]
    fn batch_published_but_not_recorded() {
        let mut a = area();
        let mut l = log(&mut a);
        l.format(QS, 65534).unwrap();
        for h in [1, 3, 4, 6] {
            l.mark(h);
        }
        // Used elements 65534, 65535, 0 hold heads 3, 1, 6; used->idx is 1.
        let used = |pos: u16| match pos {
            65534 => Some(3),
            65535 => Some(1),
            0 => Some(6),
            _ => None,
        };
        let r = log(&mut a).recover(QS, 1, used).unwrap();
        assert_eq!(
            r,
            Recovered {
                next_avail: 2,
                resubmit: vec![4]
            }
        );
    }

    #[test]
    fn pop_torn_before_the_flag_is_not_in_flight() {
        let mut a = area();
        let mut l = log(&mut a);
        l.format(QS, 0).unwrap();
        l.mark(1);
        // Died after storing head 2's counter, before its flag.
        let desc2 = l.desc(2);
        // SAFETY: the entry lies in `a`.
        unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*desc2).counter), 99) };
        let r = log(&mut a).recover(QS, 0, |_| None).unwrap();
        assert_eq!(r.resubmit, vec![1]);
        assert_eq!(r.next_avail, 1);
    }

    #[test]
    fn summary_counts_heads_in_flight() {
        let mut a = area();
        // SAFETY: `a` is 8-aligned and sized for QS.
        assert_eq!(unsafe { summarize(a.as_ptr().cast(), QS) }, None);
        let mut l = log(&mut a);
        l.format(4, 65535).unwrap();
        l.mark(2);
        l.mark(0);
        l.mark(3);
        l.clear(0);
        l.set_used_idx(0);
        // SAFETY: as above.
        let s = unsafe { summarize(a.as_ptr().cast(), QS) }.unwrap();
        assert_eq!(
            s,
            InflightSummary {
                queue_size: 4,
                used_idx: 0,
                in_flight: 2
            }
        );
        assert_eq!(s.last_avail_idx(), 2);
        // SAFETY: as above; a log for more descriptors than the area holds.
        assert_eq!(unsafe { summarize(a.as_ptr().cast(), 2) }, None);
    }

    #[test]
    fn refuses_a_log_that_does_not_match() {
        let mut a = area();
        let mut l = log(&mut a);
        l.format(4, 0).unwrap();
        assert!(log(&mut a).recover(QS, 0, |_| None).is_err());
        assert!(log(&mut a).recover(4, 9, |_| Some(0)).is_err());
        assert!(log(&mut a).recover(4, 1, |_| Some(7)).is_err());
        assert!(l.format(QS * 2, 0).is_err());
    }
}
