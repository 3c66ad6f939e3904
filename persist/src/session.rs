//! The session part of the state region: what the frontend told the device
//! (features, memory table, vring set-up) and the last control message the
//! worker applied, with its reply.
//!
//! It is one A/B [`Record`](crate::Record), written once after each
//! control message is applied, so "the message's effects on the session"
//! and "the message was applied, here is its reply" become visible
//! together. A worker that dies while applying message `n` leaves the
//! record of message `n - 1`; its successor applies `n` again from that
//! state. A worker that dies after the write but before the keeper got the
//! reply leaves `msg_seq == n`; its successor sends the saved reply instead
//! of applying `n` twice. Either way the frontend sees each message applied
//! exactly once.
//!
//! File descriptors are named by fd-store ids (see [`crate::fdstore`]):
//! the fds themselves live in the keeper.

use vm_memory::ByteValued;

/// Memory regions of a SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS in the
/// vhost-user spec).
pub const MAX_MEM_REGIONS: usize = 8;
/// Vrings of a vsock device: rx, tx, event (virtio 1.2, 5.10.2).
pub const NUM_VRINGS: usize = 3;
/// Largest reply saved: a 12-byte vhost-user header plus GET_CONFIG's
/// 12-byte preamble and up to 256 bytes of config space, rounded up.
pub const MAX_REPLY_BYTES: usize = 512;

/// One guest memory region.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemRegionRecord {
    pub guest_phys_addr: u64,
    pub size: u64,
    pub user_addr: u64,
    pub mmap_offset: u64,
    /// Fd-store id of the region's file.
    pub fd_id: u64,
}

// SAFETY: `repr(C)`, five u64, no padding: every byte pattern is valid.
unsafe impl ByteValued for MemRegionRecord {}

/// [`VringRecord::flags`]: SET_VRING_ADDR was received.
pub const VRING_ADDRS: u32 = 1;
/// [`VringRecord::flags`]: a kick fd is stored.
pub const VRING_KICK: u32 = 1 << 1;
/// [`VringRecord::flags`]: a call fd is stored.
pub const VRING_CALL: u32 = 1 << 2;
/// [`VringRecord::flags`]: enabled (SET_VRING_ENABLE 1).
pub const VRING_ENABLED: u32 = 1 << 3;
/// [`VringRecord::flags`]: started (kick received, not stopped since).
pub const VRING_STARTED: u32 = 1 << 4;
/// [`VringRecord::flags`]: stopped by GET_VRING_BASE, and the stop point
/// is kept until the next start.
pub const VRING_STOP_POINT: u32 = 1 << 5;
/// [`VringRecord::flags`]: the stop point has ring addresses.
pub const VRING_STOP_ADDRS: u32 = 1 << 6;

/// One vring's set-up.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VringRecord {
    /// Frontend virtual addresses of the descriptor table, available and
    /// used rings.
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// The same at the last stop.
    pub stop_desc: u64,
    pub stop_avail: u64,
    pub stop_used: u64,
    /// Fd-store ids of the kick and call eventfds.
    pub kick_fd_id: u64,
    pub call_fd_id: u64,
    pub size: u32,
    /// Next available index when the ring starts (SET_VRING_BASE, or where
    /// it stopped).
    pub base: u16,
    pub stop_base: u16,
    pub flags: u32,
    pub _pad: u32,
}

// SAFETY: `repr(C)`, integers laid out without padding (8 * 8 + 4 + 2 + 2 +
// 4 + 4 = 80 bytes, alignment 8): every byte pattern is valid.
unsafe impl ByteValued for VringRecord {}

/// The session.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionRecord {
    /// Sequence number of the last control message applied (0: none).
    pub msg_seq: u64,
    pub acked_features: u64,
    pub acked_protocol_features: u64,
    /// Regions in `regions` (0: no memory table yet).
    pub mem_regions: u32,
    /// Bytes of `reply` that are the reply to message `msg_seq` (0: it has
    /// none).
    pub reply_len: u32,
    pub regions: [MemRegionRecord; MAX_MEM_REGIONS],
    pub vrings: [VringRecord; NUM_VRINGS],
    pub reply: [u8; MAX_REPLY_BYTES],
}

// SAFETY: `repr(C)` made of u64, u32 pairs, and arrays of ByteValued types
// with sizes that keep 8-byte alignment (no padding): every byte pattern is
// valid.
unsafe impl ByteValued for SessionRecord {}

impl Default for SessionRecord {
    fn default() -> Self {
        SessionRecord {
            msg_seq: 0,
            acked_features: 0,
            acked_protocol_features: 0,
            mem_regions: 0,
            reply_len: 0,
            regions: [MemRegionRecord::default(); MAX_MEM_REGIONS],
            vrings: [VringRecord::default(); NUM_VRINGS],
            reply: [0; MAX_REPLY_BYTES],
        }
    }
}

impl SessionRecord {
    /// The saved reply.
    pub fn reply(&self) -> &[u8] {
        &self.reply[..(self.reply_len as usize).min(MAX_REPLY_BYTES)]
    }

    /// Saves `reply`; false if it is too long to keep (then none is kept).
    pub fn set_reply(&mut self, reply: &[u8]) -> bool {
        if reply.len() > MAX_REPLY_BYTES {
            self.reply_len = 0;
            return false;
        }
        self.reply[..reply.len()].copy_from_slice(reply);
        self.reply_len = reply.len() as u32;
        true
    }

    /// The memory regions in use.
    pub fn regions(&self) -> &[MemRegionRecord] {
        &self.regions[..(self.mem_regions as usize).min(MAX_MEM_REGIONS)]
    }

    /// Every fd-store id the session refers to.
    pub fn fd_ids(&self) -> impl Iterator<Item = u64> + '_ {
        let regions = self.regions().iter().map(|r| r.fd_id);
        let vrings = self.vrings.iter().flat_map(|v| {
            [
                (v.flags & VRING_KICK != 0).then_some(v.kick_fd_id),
                (v.flags & VRING_CALL != 0).then_some(v.call_fd_id),
            ]
            .into_iter()
            .flatten()
        });
        regions.chain(vrings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_keep_the_layout() {
        assert_eq!(std::mem::size_of::<MemRegionRecord>(), 40);
        assert_eq!(std::mem::size_of::<VringRecord>(), 80);
        assert_eq!(
            std::mem::size_of::<SessionRecord>(),
            32 + 40 * MAX_MEM_REGIONS + 80 * NUM_VRINGS + MAX_REPLY_BYTES
        );
    }

    #[test]
    fn reply_and_fd_ids() {
        let mut s = SessionRecord::default();
        assert!(s.set_reply(b"abc"));
        assert_eq!(s.reply(), b"abc");
        assert!(!s.set_reply(&[0u8; MAX_REPLY_BYTES + 1]));
        assert_eq!(s.reply(), b"");
        s.mem_regions = 2;
        s.regions[0].fd_id = 10;
        s.regions[1].fd_id = 11;
        s.regions[2].fd_id = 99; // beyond mem_regions: not referred to
        s.vrings[1].flags = VRING_KICK | VRING_CALL;
        s.vrings[1].kick_fd_id = 20;
        s.vrings[1].call_fd_id = 21;
        s.vrings[0].flags = VRING_CALL;
        s.vrings[0].call_fd_id = 30;
        s.vrings[0].kick_fd_id = 31; // no VRING_KICK: not referred to
        let mut ids: Vec<u64> = s.fd_ids().collect();
        ids.sort_unstable();
        assert_eq!(ids, [10, 11, 20, 21, 30]);
    }
}
