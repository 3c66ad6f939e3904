//! Errors of the ring layer.

use thiserror::Error;

/// What can go wrong when a ring is configured or used.
#[derive(Debug, Error)]
pub enum RingError {
    /// The queue size is zero, not a power of two or above the maximum.
    #[error("invalid queue size {size} (must be a power of two from 1 to {max})")]
    InvalidSize { size: u32, max: u16 },
    /// A ring part is misaligned or does not lie in guest memory.
    #[error("the {part} of the ring at guest address {addr:#x} ({len} bytes) is misaligned or outside guest memory")]
    BadRingAddress {
        part: &'static str,
        addr: u64,
        len: usize,
    },
    /// The driver moved `avail->idx` more than a queue size past what we consumed.
    #[error("avail->idx {avail_idx} is {ahead} entries ahead of next_avail {next_avail} on a queue of {size}")]
    AvailIndexOutOfRange {
        avail_idx: u16,
        next_avail: u16,
        ahead: u16,
        size: u16,
    },
    /// A used element for a head index the queue cannot have.
    #[error("head {head} is out of range for a queue of {size}")]
    HeadOutOfRange { head: u16, size: u16 },
    /// An access to a ring structure in guest memory failed.
    #[error("guest memory access to the ring failed: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}
