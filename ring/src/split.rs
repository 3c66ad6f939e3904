//! One split virtqueue (virtio 1.2, 2.7) as the device side sees it.
//!
//! States: a [`SplitRing`] exists only while its queue is started; the
//! backend creates it when the frontend starts the ring and drops it when the
//! ring is stopped (GET_VRING_BASE). Between those points:
//!
//! * `next_avail` counts the chains popped. [`SplitRing::pop`] advances it,
//!   [`SplitRing::unpop`] steps back over a chain the device could not use
//!   yet (an RX buffer with nothing to put in it).
//! * `next_used` counts used elements written to the used ring; `published`
//!   is the value last stored in `used->idx`. Elements between the two are
//!   staged: written, but invisible to the driver until
//!   [`SplitRing::publish`] makes the whole batch visible with one release
//!   store.
//!
//! Invariant: `published <= next_used <= next_avail` (in wrapping order) and
//! `next_avail - published <= size`, so the driver never sees an element for
//! a chain it did not make available, and never more than the queue holds.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend as _};

use crate::chain::{Chain, ChainError};
use crate::{GuestMemory, RingError};

/// Maximum queue size of a split virtqueue (virtio 1.2, 2.7).
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// `avail->flags`: the driver does not want interrupts (virtio 1.2, 2.7.7).
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
/// `used->flags`: the device does not want kicks (virtio 1.2, 2.7.8).
const VRING_USED_F_NO_NOTIFY: u16 = 1;
/// Bytes before the ring array in the available and used rings (flags, idx).
const RING_HEADER_BYTES: u64 = 4;
/// Bytes of one available-ring entry.
const AVAIL_ELEM_BYTES: u64 = 2;
/// Bytes of one used-ring element.
const USED_ELEM_BYTES: u64 = 8;

/// One used-ring element (virtio 1.2, 2.7.8), little endian.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct UsedElem {
    id: u32,
    len: u32,
}

// SAFETY: `UsedElem` is `repr(C)` with two u32 fields and no padding, so every
// byte pattern is valid.
unsafe impl ByteValued for UsedElem {}

/// Guest-physical addresses of a queue's three parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RingAddresses {
    /// Descriptor table.
    pub desc: u64,
    /// Available (driver) ring.
    pub avail: u64,
    /// Used (device) ring.
    pub used: u64,
}

/// The device side of one split virtqueue.
#[derive(Debug)]
pub struct SplitRing {
    size: u16,
    addrs: RingAddresses,
    event_idx: bool,
    next_avail: Wrapping<u16>,
    next_used: Wrapping<u16>,
    published: Wrapping<u16>,
    /// Heads of the staged used elements, kept when asked for
    /// ([`SplitRing::track_used_heads`]) so an inflight log can be told
    /// which chains a publish returned.
    staged_heads: Option<Vec<u16>>,
}

impl SplitRing {
    /// Builds a ring over `mem` after checking that every part is aligned and
    /// inside guest memory. `next_avail` is where popping starts (the
    /// frontend's SET_VRING_BASE); the used index is read from guest memory.
    pub fn new(
        mem: &GuestMemory,
        size: u32,
        addrs: RingAddresses,
        event_idx: bool,
        next_avail: u16,
    ) -> Result<Self, RingError> {
        if size == 0 || size > u32::from(MAX_QUEUE_SIZE) || !size.is_power_of_two() {
            return Err(RingError::InvalidSize {
                size,
                max: MAX_QUEUE_SIZE,
            });
        }
        let qs = u64::from(size);
        let parts = [
            ("descriptor table", addrs.desc, 16, qs * 16),
            (
                "available ring",
                addrs.avail,
                2,
                RING_HEADER_BYTES + qs * 2 + 2,
            ),
            ("used ring", addrs.used, 4, RING_HEADER_BYTES + qs * 8 + 2),
        ];
        for (part, addr, align, len) in parts {
            let len = len as usize;
            if addr % align != 0 || !mem.check_range(GuestAddress(addr), len) {
                return Err(RingError::BadRingAddress { part, addr, len });
            }
        }
        let used_idx: u16 = mem.load(GuestAddress(addrs.used + 2), Ordering::Acquire)?;
        let used_idx = Wrapping(u16::from_le(used_idx));
        Ok(SplitRing {
            size: size as u16,
            addrs,
            event_idx,
            next_avail: Wrapping(next_avail),
            next_used: used_idx,
            published: used_idx,
            staged_heads: None,
        })
    }

    /// Keeps the heads of used elements until [`SplitRing::take_published_heads`].
    pub fn track_used_heads(&mut self) {
        self.staged_heads = Some(Vec::with_capacity(usize::from(self.size)));
    }

    /// Moves the heads published so far into `out` (cleared first); call
    /// after [`SplitRing::publish`].
    pub fn take_published_heads(&mut self, out: &mut Vec<u16>) {
        out.clear();
        let staged = usize::from(self.staged());
        if let Some(heads) = &mut self.staged_heads {
            let n = heads.len().saturating_sub(staged);
            out.extend(heads.drain(..n));
        }
    }

    /// The value last stored in `used->idx`.
    pub fn published(&self) -> u16 {
        self.published.0
    }

    /// Reads `used->idx` from guest memory.
    pub fn guest_used_idx(mem: &GuestMemory, addrs: &RingAddresses) -> Result<u16, RingError> {
        let idx: u16 = mem.load(GuestAddress(addrs.used + 2), Ordering::Acquire)?;
        Ok(u16::from_le(idx))
    }

    /// Stores `used->idx` in guest memory: recovery publishing a batch
    /// whose used elements a dead process wrote but never published.
    pub fn store_used_idx(
        mem: &GuestMemory,
        addrs: &RingAddresses,
        idx: u16,
    ) -> Result<(), RingError> {
        mem.store(idx.to_le(), GuestAddress(addrs.used + 2), Ordering::Release)?;
        Ok(())
    }

    /// Reads the head id in used element `pos` (taken modulo the queue
    /// size) from guest memory, for recovery. `None` if it is unreadable or
    /// not a valid head.
    pub fn used_head_at(&self, mem: &GuestMemory, pos: u16) -> Option<u16> {
        let slot = u64::from(pos % self.size);
        let addr = GuestAddress(self.addrs.used + RING_HEADER_BYTES + slot * USED_ELEM_BYTES);
        let elem: UsedElem = mem.read_obj(addr).ok()?;
        u16::try_from(u32::from_le(elem.id))
            .ok()
            .filter(|&h| h < self.size)
    }

    /// Walks the chain starting at `head` without popping anything: a chain
    /// popped by a previous process, resubmitted after recovery.
    pub fn walk_head(
        &self,
        mem: &GuestMemory,
        chain: &mut Chain,
        head: u16,
    ) -> Result<(), ChainError> {
        chain.walk(mem, GuestAddress(self.addrs.desc), self.size, head)
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Index of the next available-ring entry to pop.
    pub fn next_avail(&self) -> u16 {
        self.next_avail.0
    }

    /// Index of the next used-ring element to write.
    pub fn next_used(&self) -> u16 {
        self.next_used.0
    }

    /// Reads the driver's `avail->idx`.
    fn avail_idx(&self, mem: &GuestMemory, order: Ordering) -> Result<Wrapping<u16>, RingError> {
        let idx: u16 = mem.load(GuestAddress(self.addrs.avail + 2), order)?;
        Ok(Wrapping(u16::from_le(idx)))
    }

    /// Pops the next available chain into `chain`.
    ///
    /// `Ok(None)`: nothing available. `Ok(Some(Err(e)))`: a chain was taken
    /// but is malformed; give `e.head` back with [`SplitRing::push_used`]
    /// (length 0). `Err`: the ring itself is broken (the driver moved
    /// `avail->idx` impossibly far, or the ring is unreadable).
    pub fn pop(
        &mut self,
        mem: &GuestMemory,
        chain: &mut Chain,
    ) -> Result<Option<Result<(), ChainError>>, RingError> {
        let avail_idx = self.avail_idx(mem, Ordering::Acquire)?;
        let ahead = avail_idx - self.next_avail;
        if ahead.0 == 0 {
            return Ok(None);
        }
        // Chains in flight (popped, not yet used) plus the new ones can never
        // exceed the queue size.
        if (avail_idx - self.published).0 > self.size {
            return Err(RingError::AvailIndexOutOfRange {
                avail_idx: avail_idx.0,
                next_avail: self.next_avail.0,
                ahead: ahead.0,
                size: self.size,
            });
        }
        let slot = u64::from(self.next_avail.0 % self.size);
        let entry = GuestAddress(self.addrs.avail + RING_HEADER_BYTES + slot * AVAIL_ELEM_BYTES);
        let head: u16 = mem.load(entry, Ordering::Acquire)?;
        self.next_avail += Wrapping(1);
        let head = u16::from_le(head);
        if head >= self.size {
            // No chain has this head, so there is nothing to give back:
            // `push_used` refuses it and the caller only logs it.
            return Ok(Some(Err(ChainError {
                head,
                kind: crate::ChainErrorKind::IndexOutOfRange(head),
            })));
        }
        Ok(Some(chain.walk(
            mem,
            GuestAddress(self.addrs.desc),
            self.size,
            head,
        )))
    }

    /// Gives back the chain popped last, so the next pop returns it again.
    pub fn unpop(&mut self) {
        self.next_avail -= Wrapping(1);
    }

    /// Stages a used element for chain `head` with `len` bytes written.
    /// The driver sees it after the next [`SplitRing::publish`].
    pub fn push_used(&mut self, mem: &GuestMemory, head: u16, len: u32) -> Result<(), RingError> {
        if head >= self.size {
            return Err(RingError::HeadOutOfRange {
                head,
                size: self.size,
            });
        }
        let slot = u64::from(self.next_used.0 % self.size);
        let addr = GuestAddress(self.addrs.used + RING_HEADER_BYTES + slot * USED_ELEM_BYTES);
        let elem = UsedElem {
            id: u32::from(head).to_le(),
            len: len.to_le(),
        };
        mem.write_obj(elem, addr)?;
        self.next_used += Wrapping(1);
        if let Some(heads) = &mut self.staged_heads {
            heads.push(head);
        }
        Ok(())
    }

    /// Number of staged, unpublished used elements.
    pub fn staged(&self) -> u16 {
        (self.next_used - self.published).0
    }

    /// Makes every staged used element visible with one store to
    /// `used->idx`, and says whether the driver asked to be notified of it
    /// (EVENT_IDX: `used_event` was crossed; otherwise the driver did not set
    /// `VRING_AVAIL_F_NO_INTERRUPT`).
    pub fn publish(&mut self, mem: &GuestMemory) -> Result<bool, RingError> {
        let old = self.published;
        let new = self.next_used;
        if old == new {
            return Ok(false);
        }
        // The release store orders the used elements before the index.
        mem.store(
            new.0.to_le(),
            GuestAddress(self.addrs.used + 2),
            Ordering::Release,
        )?;
        self.published = new;
        // The index store must be visible before we read the driver's
        // suppression state (virtio 1.2, 2.7.10).
        fence(Ordering::SeqCst);
        if self.event_idx {
            let addr =
                self.addrs.avail + RING_HEADER_BYTES + u64::from(self.size) * AVAIL_ELEM_BYTES;
            let used_event: u16 = mem.load(GuestAddress(addr), Ordering::Relaxed)?;
            let used_event = Wrapping(u16::from_le(used_event));
            // vring_need_event(): notify if used_event lies in [old, new).
            Ok((new - used_event - Wrapping(1)) < (new - old))
        } else {
            let flags: u16 = mem.load(GuestAddress(self.addrs.avail), Ordering::Relaxed)?;
            Ok(u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0)
        }
    }

    /// Asks the driver to kick when it makes more chains available, then
    /// says whether some arrived meanwhile (in which case the caller must
    /// process them: the kick for them may never come).
    pub fn enable_notification(&mut self, mem: &GuestMemory) -> Result<bool, RingError> {
        if self.event_idx {
            let addr = self.addrs.used + RING_HEADER_BYTES + u64::from(self.size) * USED_ELEM_BYTES;
            mem.store(
                self.next_avail.0.to_le(),
                GuestAddress(addr),
                Ordering::Relaxed,
            )?;
        } else {
            mem.store(0u16, GuestAddress(self.addrs.used), Ordering::Relaxed)?;
        }
        fence(Ordering::SeqCst);
        Ok(self.avail_idx(mem, Ordering::Acquire)? != self.next_avail)
    }

    /// Tells the driver that kicks are not needed while the device is
    /// draining the ring anyway. With EVENT_IDX this is a no-op: the driver
    /// kicks only when it crosses `avail_event`, which we leave behind.
    pub fn disable_notification(&mut self, mem: &GuestMemory) -> Result<(), RingError> {
        if !self.event_idx {
            mem.store(
                VRING_USED_F_NO_NOTIFY.to_le(),
                GuestAddress(self.addrs.used),
                Ordering::Relaxed,
            )?;
        }
        Ok(())
    }
}
