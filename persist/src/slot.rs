//! One connection's slot in the state region: everything a successor needs
//! to carry the connection on exactly, as one A/B
//! [`Record`](crate::Record) (see its module for why a crash never leaves
//! it half-written).
//!
//! A slot is free when no complete copy has a non-zero `uid`. The counters
//! are the wire counters of the vsock spec (virtio 1.2, 5.10.6.3), wrapping
//! u32: a successor resumes them unchanged because Linux overwrites its
//! view of our credit from every header we send.

use vm_memory::ByteValued;

/// A connection's persisted state.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConnRecord {
    /// Unique id of the connection (never reused in a region's life), also
    /// the fd-store id of its host stream; 0 in a free slot.
    pub uid: u64,
    /// Inflight counter of the last TX chain applied to this connection:
    /// a resubmitted chain at or below it was already applied.
    pub last_tx_counter: u64,
    /// The RX batch this copy was written in (see the RX commit rule).
    pub rx_batch: u64,
    pub state: u8,
    pub owed: u8,
    pub peer_shutdown: u8,
    pub local_shutdown: u8,
    pub shutdown_flags: u8,
    pub host_flags: u8,
    pub _pad: [u8; 2],
    pub local_port: u32,
    pub peer_port: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
    pub rx_cnt: u32,
    pub last_fwd_cnt_sent: u32,
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    pub tx_cnt: u32,
    /// Stream offset (in `rx_cnt` terms) of the first byte held in the
    /// slot's data area; the area holds `[txbuf_start, rx_cnt)`.
    pub txbuf_start: u32,
}

// SAFETY: `repr(C)`: three u64, six u8, a two-byte array and ten u32, 72
// bytes with no padding; every byte pattern is valid.
unsafe impl ByteValued for ConnRecord {}

const _: () = assert!(std::mem::size_of::<ConnRecord>() == 72);

/// Where a TX chain's payload sits in its connection's stream, stored when
/// the chain is applied: a chain resubmitted after a crash skips the bytes
/// its connection's `fwd_cnt` says were already forwarded.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxMeta {
    /// Inflight counter of the chain this entry describes.
    pub counter: u64,
    /// The connection it was applied to.
    pub conn_uid: u64,
    /// `rx_cnt` before its payload.
    pub offset: u32,
    /// Payload bytes.
    pub len: u32,
}

// SAFETY: `repr(C)`, two u64 and two u32, no padding.
unsafe impl ByteValued for TxMeta {}
