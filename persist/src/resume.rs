//! A resumable host session's persisted state: one A/B
//! [`Record`](crate::Record) per connection slot, in the region's resume
//! table (see `docs/resumable-sessions.md` for the protocol).
//!
//! The connection's own record ([`ConnRecord`](crate::slot::ConnRecord))
//! keeps the vsock counters, wrapping u32, and its data area keeps the
//! guest bytes the host client has not acknowledged. This record adds
//! what the session needs besides: the token, the host stream carrying it,
//! and the 64-bit stream offsets of the protocol.
//!
//! The two records are written separately, and a connection record may be
//! rolled back one RX batch on adoption, so an offset is not stored as a
//! value that must match the other record: it is stored as a *base pair*,
//! the 64-bit offset together with the u32 counter it corresponded to at
//! one instant. The offset at any other instant is the base plus the
//! signed difference of the counters, which is exact as long as the two
//! instants are less than 2 GiB of stream apart; the device writes a new
//! base pair at least every 1 GiB. So whichever copies of the two records a
//! successor finds, the offsets it derives are those of the connection
//! record it adopts.
//!
//! The fields from `out_kind` on describe the host stream's writer between
//! two frames' bytes; they are exact only when written by a worker that
//! quiesced for an upgrade, and only its successor reads them. After a
//! crash the successor detaches every session instead (a socket call may
//! have been cut in the middle of a frame), and the client resumes.
//!
//! A record belongs to the connection whose uid it names: one left behind
//! by an earlier connection of the slot is ignored.

use vm_memory::ByteValued;

/// `flags`: the host client acknowledged the end of the guest's stream.
pub const RESUME_G2H_END_ACKED: u32 = 1;

/// A resumable session's state.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResumeRecord {
    /// Uid of the connection the session belongs to (0: none).
    pub conn_uid: u64,
    /// Fd-store uid of the host stream carrying the session; 0 while
    /// detached.
    pub stream_uid: u64,
    /// The session's token.
    pub token: [u8; 16],
    /// Host-to-guest offset the guest had received when the connection's
    /// `tx_cnt` was `h2g_tx_cnt`.
    pub h2g_base: u64,
    /// Guest-to-host offset the host client had acknowledged when the
    /// connection's `fwd_cnt` was `g2h_fwd_cnt`.
    pub g2h_base: u64,
    pub h2g_tx_cnt: u32,
    pub g2h_fwd_cnt: u32,
    /// `CLOCK_MONOTONIC` time the session was detached, in nanoseconds;
    /// 0 while attached.
    pub detached_at_ns: u64,
    /// `RESUME_*` bits.
    pub flags: u32,
    /// Kind of the frame being written when the worker quiesced (0: none).
    pub out_kind: u8,
    pub _pad: [u8; 3],
    /// Its payload bytes.
    pub out_len: u32,
    /// Its bytes (header and payload) already written.
    pub out_written: u32,
    /// Its offset field.
    pub out_offset: u64,
    /// Guest-to-host offset after the last byte framed for the host.
    pub g2h_sent: u64,
    /// Host-to-guest offset the last ACK sent to the host client named.
    pub h2g_acked_sent: u64,
}

// SAFETY: `repr(C)`: two u64, a 16-byte array, two u64, two u32, a u64,
// a u32, a u8 and a 3-byte array, two u32, three u64: 104 bytes, every
// field at its natural alignment, no padding; every byte pattern is valid.
unsafe impl ByteValued for ResumeRecord {}

const _: () = assert!(std::mem::size_of::<ResumeRecord>() == 104);

/// The 64-bit offset at counter `now`, from a base pair taken at counter
/// `then`: `base` plus the signed u32 difference.
pub fn offset_at(base: u64, then: u32, now: u32) -> u64 {
    let delta = now.wrapping_sub(then) as i32;
    base.wrapping_add_signed(i64::from(delta))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_follow_the_counter_across_its_wrap_and_back() {
        assert_eq!(offset_at(10, 5, 5), 10);
        assert_eq!(offset_at(10, 5, 105), 110);
        // A connection record one batch older than the base pair.
        assert_eq!(offset_at(5_000_000_000, 100, 40), 4_999_999_940);
        // The u32 counter wraps; the offset does not.
        assert_eq!(offset_at(1 << 32, u32::MAX - 9, 20), (1 << 32) + 30);
        assert_eq!(offset_at((1 << 32) + 30, 20, u32::MAX - 9), 1 << 32);
    }
}
