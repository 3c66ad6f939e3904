//! One split virtqueue (virtio 1.2, 2.7) as the driver sees it: it owns the
//! descriptor table and the available ring, and reads the used ring.
//!
//! Layout in guest memory: descriptor table (16 bytes per entry), available
//! ring (flags, idx, ring[size], used_event), used ring (flags, idx,
//! ring[size] of {id u32, len u32}, avail_event); all little endian.

use std::sync::atomic::{fence, Ordering};

use super::memory::{Bump, GuestRam};

/// Descriptor flag: the chain continues at `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: device-writable buffer.
pub const DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer holds an indirect descriptor table.
pub const DESC_F_INDIRECT: u16 = 4;
/// `used->flags`: the device does not want to be kicked.
const USED_F_NO_NOTIFY: u16 = 1;

/// Guest physical addresses of one queue's three parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingAddrs {
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl RingAddrs {
    /// Places a queue of `size` entries, with the alignments of virtio 1.2
    /// 2.7 (16, 2, 4) rounded up to pages as Linux's legacy layout does.
    pub fn allocate(bump: &mut Bump, size: u16) -> std::io::Result<RingAddrs> {
        let n = u64::from(size);
        Ok(RingAddrs {
            desc: bump.take(16 * n, 4096, "a descriptor table")?,
            avail: bump.take(6 + 2 * n, 4096, "an available ring")?,
            used: bump.take(6 + 8 * n, 4096, "a used ring")?,
        })
    }
}

/// What a chain on a ring carries, so its buffers can be recycled when the
/// device returns it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token {
    /// A TX packet in the given buffer slot.
    Tx(u32),
    /// An RX buffer.
    Rx(u32),
    /// An event-queue buffer.
    Event(u32),
    /// A chain put there by a test, with its id.
    Injected(u64),
}

/// One descriptor of a chain the driver builds: NEXT and `next` are set
/// for it.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
}

/// Where a raw descriptor points with `next`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// No NEXT flag: the chain ends here.
    End,
    /// NEXT to the descriptor allocated for entry `i` of the same chain.
    Entry(usize),
    /// NEXT to this raw table index, whatever it holds.
    Index(u16),
}

/// A descriptor exactly as a test wants it in the table.
#[derive(Debug, Clone, Copy)]
pub struct RawEntry {
    pub addr: u64,
    pub len: u32,
    /// Flags other than NEXT (WRITE, INDIRECT, or anything else).
    pub flags: u16,
    pub link: Link,
}

/// A returned chain.
#[derive(Debug, Clone, Copy)]
pub struct Used {
    pub token: Token,
    pub len: u32,
    pub head: u16,
}

/// The driver's side of one split virtqueue.
pub struct DriverRing {
    size: u16,
    addrs: RingAddrs,
    event_idx: bool,
    free: Vec<u16>,
    inflight: Vec<Option<(Token, Vec<u16>)>>,
    /// Next available index to fill (the driver's shadow of `avail->idx`).
    next_avail: u16,
    /// The `avail->idx` last stored.
    published: u16,
    /// Next used index to read.
    last_used: u16,
}

/// virtio 1.2, 2.7.10: whether moving an index from `old` to `new` passes
/// the other side's event index `event`.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

impl DriverRing {
    /// A fresh, empty ring at `addrs`; its memory is zeroed.
    pub fn new(ram: &GuestRam, size: u16, addrs: RingAddrs, event_idx: bool) -> DriverRing {
        let n = u64::from(size);
        ram.zero(addrs.desc, 16 * n);
        ram.zero(addrs.avail, 6 + 2 * n);
        ram.zero(addrs.used, 6 + 8 * n);
        DriverRing {
            size,
            addrs,
            event_idx,
            free: (0..size).rev().collect(),
            inflight: vec![None; size as usize],
            next_avail: 0,
            published: 0,
            last_used: 0,
        }
    }

    pub fn size(&self) -> u16 {
        self.size
    }

    pub fn addrs(&self) -> RingAddrs {
        self.addrs
    }

    /// Free descriptors.
    pub fn free_descs(&self) -> usize {
        self.free.len()
    }

    /// Chains made available and not yet returned.
    pub fn in_flight(&self) -> usize {
        self.size as usize - self.free.len()
    }

    /// The shadow available index (chains added so far).
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    fn write_desc(&self, ram: &GuestRam, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&addr.to_le_bytes());
        b[8..12].copy_from_slice(&len.to_le_bytes());
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        ram.write(self.addrs.desc + 16 * u64::from(i), &b);
    }

    fn push_avail(&mut self, ram: &GuestRam, head: u16) {
        let slot = u64::from(self.next_avail % self.size);
        ram.write(self.addrs.avail + 4 + 2 * slot, &head.to_le_bytes());
        self.next_avail = self.next_avail.wrapping_add(1);
    }

    /// Adds a chain (not yet visible to the device: see `publish`).
    /// Returns its head, or `None` when there are not enough free
    /// descriptors.
    pub fn add(&mut self, ram: &GuestRam, descs: &[Desc], token: Token) -> Option<u16> {
        if descs.is_empty() || descs.len() > self.free.len() {
            return None;
        }
        let idx: Vec<u16> = (0..descs.len())
            .map(|_| self.free.pop().expect("counted"))
            .collect();
        for (i, d) in descs.iter().enumerate() {
            let (flags, next) = match idx.get(i + 1) {
                Some(&n) => (d.flags | DESC_F_NEXT, n),
                None => (d.flags & !DESC_F_NEXT, 0),
            };
            self.write_desc(ram, idx[i], d.addr, d.len, flags, next);
        }
        let head = idx[0];
        self.inflight[head as usize] = Some((token, idx));
        self.push_avail(ram, head);
        Some(head)
    }

    /// Adds a chain of raw descriptors, linked as `entries` say.
    pub fn add_raw(&mut self, ram: &GuestRam, entries: &[RawEntry], token: Token) -> Option<u16> {
        if entries.is_empty() || entries.len() > self.free.len() {
            return None;
        }
        let idx: Vec<u16> = (0..entries.len())
            .map(|_| self.free.pop().expect("counted"))
            .collect();
        for (i, e) in entries.iter().enumerate() {
            let (flags, next) = match e.link {
                Link::End => (e.flags & !DESC_F_NEXT, 0),
                Link::Entry(j) => (e.flags | DESC_F_NEXT, idx[j.min(idx.len() - 1)]),
                Link::Index(n) => (e.flags | DESC_F_NEXT, n),
            };
            self.write_desc(ram, idx[i], e.addr, e.len, flags, next);
        }
        let head = idx[0];
        self.inflight[head as usize] = Some((token, idx));
        self.push_avail(ram, head);
        Some(head)
    }

    /// Puts a bare index on the available ring, owning no descriptor.
    pub fn add_bare_head(&mut self, ram: &GuestRam, head: u16) {
        self.push_avail(ram, head);
    }

    /// Makes the chains added since the last call visible with one store
    /// to `avail->idx`; returns whether the device wants a kick.
    pub fn publish(&mut self, ram: &GuestRam) -> bool {
        let old = self.published;
        let new = self.next_avail;
        if old == new {
            return false;
        }
        fence(Ordering::Release);
        ram.store_u16(self.addrs.avail + 2, new, Ordering::Release);
        self.published = new;
        // The store above must be visible before the device's suppression
        // state is read (Linux: virtio_mb before reading avail_event).
        fence(Ordering::SeqCst);
        if self.event_idx {
            let avail_event = ram.load_u16(
                self.addrs.used + 4 + 8 * u64::from(self.size),
                Ordering::Acquire,
            );
            need_event(avail_event, new, old)
        } else {
            ram.load_u16(self.addrs.used, Ordering::Acquire) & USED_F_NO_NOTIFY == 0
        }
    }

    /// The next returned chain, if any. An element that names no chain in
    /// flight is an error of the device.
    pub fn pop_used(&mut self, ram: &GuestRam) -> Option<Result<Used, String>> {
        let used_idx = ram.load_u16(self.addrs.used + 2, Ordering::Acquire);
        if used_idx == self.last_used {
            return None;
        }
        let ahead = used_idx.wrapping_sub(self.last_used);
        if ahead > self.size {
            let read = self.last_used;
            // Skip to the device's index: nothing after this can be trusted,
            // but the driver must not spin on it.
            self.last_used = used_idx;
            return Some(Err(format!(
                "used->idx {used_idx} is {ahead} entries ahead of the {read} read (queue size {})",
                self.size
            )));
        }
        let slot = u64::from(self.last_used % self.size);
        let elem = self.addrs.used + 4 + 8 * slot;
        let id = ram.read_u32(elem);
        let len = ram.read_u32(elem + 4);
        self.last_used = self.last_used.wrapping_add(1);
        let Some(entry) = usize::try_from(id)
            .ok()
            .and_then(|i| self.inflight.get_mut(i))
            .and_then(|e| e.take())
        else {
            return Some(Err(format!(
                "used element {} names descriptor {id}, which is not the head of a chain in flight",
                self.last_used.wrapping_sub(1)
            )));
        };
        let (token, descs) = entry;
        self.free.extend(descs.iter().rev());
        Some(Ok(Used {
            token,
            len,
            head: id as u16,
        }))
    }

    /// Asks for a notification at the next used element (with EVENT_IDX:
    /// `used_event = last read`); returns true when elements arrived
    /// meanwhile, so the caller must process again.
    pub fn enable_notifications(&mut self, ram: &GuestRam) -> bool {
        if self.event_idx {
            ram.store_u16(
                self.addrs.avail + 4 + 2 * u64::from(self.size),
                self.last_used,
                Ordering::Relaxed,
            );
        }
        fence(Ordering::SeqCst);
        ram.load_u16(self.addrs.used + 2, Ordering::Acquire) != self.last_used
    }

    /// The used index the device last published.
    pub fn device_used_idx(&self, ram: &GuestRam) -> u16 {
        ram.load_u16(self.addrs.used + 2, Ordering::Acquire)
    }

    /// The ring's indices, for failure messages.
    pub fn describe(&self, ram: &GuestRam) -> String {
        let n = u64::from(self.size);
        format!(
            "avail {} (published {}), used read {} of {}, free descs {}, used_event {}, avail_event {}, used flags {:#x}",
            self.next_avail,
            self.published,
            self.last_used,
            self.device_used_idx(ram),
            self.free.len(),
            ram.read_u16(self.addrs.avail + 4 + 2 * n),
            ram.read_u16(self.addrs.used + 4 + 8 * n),
            ram.read_u16(self.addrs.used),
        )
    }

    /// Tokens of every chain still in flight (on a reset, to recycle
    /// their buffers).
    pub fn drain_inflight(&mut self) -> Vec<Token> {
        let mut out = Vec::new();
        for e in self.inflight.iter_mut() {
            if let Some((t, descs)) = e.take() {
                self.free.extend(descs);
                out.push(t);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn need_event_matches_the_spec_formula() {
        // Device asked to be kicked when avail passes 5.
        assert!(need_event(5, 6, 5));
        assert!(need_event(5, 10, 0));
        assert!(!need_event(5, 5, 0));
        assert!(!need_event(5, 8, 6));
        // Wrapping.
        assert!(need_event(65535, 1, 65534));
    }

    #[test]
    fn chains_are_added_published_and_returned() {
        let ram = GuestRam::new(0x10000, 1 << 20).unwrap();
        let mut bump = Bump::new(&ram);
        let addrs = RingAddrs::allocate(&mut bump, 8).unwrap();
        let mut r = DriverRing::new(&ram, 8, addrs, true);
        let d = Desc {
            addr: 0x20000,
            len: 10,
            flags: 0,
        };
        let h = r.add(&ram, &[d, d], Token::Tx(1)).unwrap();
        assert_eq!(r.free_descs(), 6);
        assert!(r.publish(&ram));
        assert_eq!(ram.read_u16(addrs.avail + 2), 1);
        assert_eq!(ram.read_u16(addrs.avail + 4), h);
        // The first descriptor chains to the second.
        assert_eq!(
            ram.read_u16(addrs.desc + 16 * u64::from(h) + 12),
            DESC_F_NEXT
        );
        assert!(r.pop_used(&ram).is_none());
        // The device returns it.
        ram.write(addrs.used + 4, &u32::from(h).to_le_bytes());
        ram.write(addrs.used + 8, &7u32.to_le_bytes());
        ram.store_u16(addrs.used + 2, 1, Ordering::Release);
        let u = r.pop_used(&ram).unwrap().unwrap();
        assert_eq!((u.token, u.len), (Token::Tx(1), 7));
        assert_eq!(r.free_descs(), 8);
        assert!(!r.enable_notifications(&ram));
        assert_eq!(ram.read_u16(addrs.avail + 4 + 16), 1);
    }
}
