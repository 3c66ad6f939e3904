//! Descriptor chains flattened into iovecs over guest memory.
//!
//! A chain is walked once when it is popped. Each descriptor's guest range is
//! translated to host addresses (split where it crosses a memory region) and
//! appended to the readable or writable list. The walk enforces the rules of
//! the virtio 1.2 spec, 2.7.4 and 2.7.5: indices below the queue size, no more
//! descriptors than the queue holds (so a loop ends), device-readable
//! descriptors before device-writable ones, no indirect descriptors (the
//! feature is not offered), every byte inside guest memory.
//!
//! Invariant: after a successful walk, every iovec in a [`Chain`] lies inside a
//! mapping of the [`GuestMemory`](crate::GuestMemory) it was walked over, so
//! the iovecs stay valid for as long as that memory object is alive.

use std::fmt;

use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend as _, GuestMemoryRegion};

use crate::GuestMemory;

/// Descriptor flag: the chain continues at `next` (virtio 1.2, 2.7.5).
pub(crate) const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the buffer is device-writable (virtio 1.2, 2.7.5).
pub(crate) const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer holds an indirect table (virtio 1.2, 2.7.5.3).
pub(crate) const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// Size of one descriptor table entry in bytes.
pub(crate) const DESC_SIZE_BYTES: u64 = 16;

/// One descriptor table entry (virtio 1.2, 2.7.5), little endian.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
pub(crate) struct Descriptor {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

// SAFETY: `Descriptor` is `repr(C)`, made only of integers, with no padding
// (8 + 4 + 2 + 2 = 16 bytes, alignment 8), so every byte pattern is valid.
unsafe impl ByteValued for Descriptor {}

/// Why a chain could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainErrorKind {
    /// A descriptor index at or above the queue size.
    IndexOutOfRange(u16),
    /// More descriptors than the queue holds: the chain loops.
    TooLong,
    /// A readable descriptor after a writable one.
    ReadableAfterWritable,
    /// An indirect descriptor, which this device does not negotiate.
    Indirect,
    /// A buffer that is not entirely inside guest memory.
    OutsideGuestMemory { addr: u64, len: u32 },
    /// The descriptor table entry itself could not be read.
    DescriptorUnreadable(u16),
}

impl fmt::Display for ChainErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::IndexOutOfRange(i) => write!(f, "descriptor index {i} is out of range"),
            Self::TooLong => write!(f, "chain is longer than the queue (loop)"),
            Self::ReadableAfterWritable => {
                write!(f, "device-readable descriptor after a device-writable one")
            }
            Self::Indirect => write!(f, "indirect descriptor (not negotiated)"),
            Self::OutsideGuestMemory { addr, len } => {
                write!(f, "buffer {addr:#x}+{len} is outside guest memory")
            }
            Self::DescriptorUnreadable(i) => write!(f, "descriptor {i} cannot be read"),
        }
    }
}

/// A chain that could not be walked, with the head to give back to the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainError {
    /// Head index of the chain. Below the queue size unless `kind` is
    /// `IndexOutOfRange` of this same head, which cannot be given back.
    pub head: u16,
    /// What was wrong with it.
    pub kind: ChainErrorKind,
}

impl fmt::Display for ChainError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "chain with head {}: {}", self.head, self.kind)
    }
}

impl std::error::Error for ChainError {}

/// One descriptor chain as iovecs into guest memory. Reused across pops, so
/// popping allocates nothing once the vectors have grown to their working size.
pub struct Chain {
    head: u16,
    readable: Vec<libc::iovec>,
    writable: Vec<libc::iovec>,
    readable_len: usize,
    writable_len: usize,
}

impl Default for Chain {
    fn default() -> Self {
        Self::new()
    }
}

impl Chain {
    /// An empty chain, ready to be filled by [`SplitRing::pop`](crate::SplitRing::pop).
    pub fn new() -> Self {
        Chain {
            head: 0,
            readable: Vec::with_capacity(8),
            writable: Vec::with_capacity(8),
            readable_len: 0,
            writable_len: 0,
        }
    }

    /// The head descriptor index, to be used in the used-ring element.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Device-readable buffers, in chain order.
    pub fn readable(&self) -> &[libc::iovec] {
        &self.readable
    }

    /// Device-writable buffers, in chain order.
    pub fn writable(&self) -> &[libc::iovec] {
        &self.writable
    }

    /// Total bytes of the readable buffers.
    pub fn readable_len(&self) -> usize {
        self.readable_len
    }

    /// Total bytes of the writable buffers.
    pub fn writable_len(&self) -> usize {
        self.writable_len
    }

    fn clear(&mut self, head: u16) {
        self.head = head;
        self.readable.clear();
        self.writable.clear();
        self.readable_len = 0;
        self.writable_len = 0;
    }

    /// Walks the chain starting at `head` of a descriptor table of `size`
    /// entries at `desc_table`, replacing this chain's contents.
    pub(crate) fn walk(
        &mut self,
        mem: &GuestMemory,
        desc_table: GuestAddress,
        size: u16,
        head: u16,
    ) -> Result<(), ChainError> {
        self.clear(head);
        let err = |kind| ChainError { head, kind };
        if head >= size {
            return Err(err(ChainErrorKind::IndexOutOfRange(head)));
        }
        let mut index = head;
        let mut count: u32 = 0;
        loop {
            count += 1;
            if count > u32::from(size) {
                return Err(err(ChainErrorKind::TooLong));
            }
            let addr = desc_table.0 + u64::from(index) * DESC_SIZE_BYTES;
            let desc: Descriptor = mem
                .read_obj(GuestAddress(addr))
                .map_err(|_| err(ChainErrorKind::DescriptorUnreadable(index)))?;
            let flags = u16::from_le(desc.flags);
            if flags & VIRTQ_DESC_F_INDIRECT != 0 {
                return Err(err(ChainErrorKind::Indirect));
            }
            let (buf_addr, buf_len) = (u64::from_le(desc.addr), u32::from_le(desc.len));
            let writable = flags & VIRTQ_DESC_F_WRITE != 0;
            if !writable && !self.writable.is_empty() {
                return Err(err(ChainErrorKind::ReadableAfterWritable));
            }
            self.map(mem, buf_addr, buf_len, writable).map_err(|()| {
                err(ChainErrorKind::OutsideGuestMemory {
                    addr: buf_addr,
                    len: buf_len,
                })
            })?;
            if flags & VIRTQ_DESC_F_NEXT == 0 {
                return Ok(());
            }
            index = u16::from_le(desc.next);
            if index >= size {
                return Err(err(ChainErrorKind::IndexOutOfRange(index)));
            }
        }
    }

    /// Translates one guest buffer into iovecs, one per memory region it spans.
    fn map(&mut self, mem: &GuestMemory, addr: u64, len: u32, writable: bool) -> Result<(), ()> {
        let mut addr = addr;
        let mut left = u64::from(len);
        while left > 0 {
            let region = mem.find_region(GuestAddress(addr)).ok_or(())?;
            let offset = region.to_region_addr(GuestAddress(addr)).ok_or(())?;
            let in_region = region.len() - offset.0;
            let take = left.min(in_region);
            let ptr = region.get_host_address(offset).map_err(|_| ())?;
            let iov = libc::iovec {
                iov_base: ptr.cast(),
                // `take` is at most `len`, a u32, so it fits in usize.
                iov_len: take as usize,
            };
            if writable {
                self.writable.push(iov);
                self.writable_len += take as usize;
            } else {
                self.readable.push(iov);
                self.readable_len += take as usize;
            }
            addr = addr.checked_add(take).ok_or(())?;
            left -= take;
        }
        Ok(())
    }
}
