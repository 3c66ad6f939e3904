//! Resumable host sessions (`docs/resumable-sessions.md`): the state one
//! connection keeps besides its vsock counters, and how it is persisted.
//!
//! A session is *attached* while a host stream carries it and *detached*
//! otherwise:
//!
//! ```text
//!   CONNECT <p> resumable --guest accepts--> Attached --socket breaks--> Detached
//!                                              ^  (EOF, error, bad frame,   |
//!                                              |   worker crash)            |
//!                                              +-------RESUME <token>-------+
//!   Detached --grace period expires--> guest RST, token forgotten
//!   either --both streams ended and acknowledged, guest RST, ABORT--> ended
//! ```
//!
//! Guest to host (g2h): every guest byte is copied into the connection's
//! buffer in its data area (shared memory) and stays there until the host
//! client acknowledges it; the credit the guest gets back (`fwd_cnt`) is
//! what the client acknowledged. So the buffer holds exactly `[fwd_cnt,
//! rx_cnt)`, at most `buf_alloc` bytes, and a successor finds every byte
//! the client may still ask for. `g2h_sent` is how far frames were written
//! to the current stream; after a `RESUME` it is the client's offset.
//!
//! Host to guest (h2g): a `DATA` frame is read only whole and checked
//! before any of its bytes is published to the guest: straight into guest
//! buffers when the guest has room for all of it, otherwise into the
//! staging buffer (so that the `ACK`s behind it are read), from which the
//! guest gets it as its credit allows. The offset the guest has is
//! `tx_cnt`'s. An `ACK` naming it is sent only after the RX batch that
//! delivered the bytes is published: an acknowledged byte is in the guest
//! even if the worker dies right after.
//!
//! Offsets are 64-bit; the vsock counters are u32. The session keeps for
//! each direction a base pair (see `vsockd_persist::resume`) that maps the
//! counter to the offset, renewed every [`REBASE_BYTES`].
//!
//! Exactness across a worker crash: everything either side acknowledged
//! is in the state region, and a successor detaches every attached session
//! (a socket call may have been cut in the middle of a frame), so the
//! client resumes from the offsets both sides really have. A live upgrade
//! quiesces between two wakeups, with no frame read half and the writer's
//! position recorded ([`Session::handover_record`]): the successor carries
//! on on the same stream. A session holding staged bytes is detached at
//! the quiesce instead (staged bytes are not in the region).

mod frame;
mod staging;
mod token;

pub use frame::{
    error_frame, Checksum, Frame, FrameError, Kind, FRAME_HEADER_BYTES, MAX_DATA_PAYLOAD_BYTES,
};
pub use staging::Staging;
pub use token::Token;

use vsockd_persist::resume::{offset_at, ResumeRecord, RESUME_G2H_END_ACKED};

/// How many h2g bytes beyond those the guest has received a client may
/// send (`docs/resumable-sessions.md`, "Flow and acknowledgement"): what
/// the staging buffer holds at most.
pub const H2G_WINDOW_BYTES: u64 = 256 * 1024;
/// The guest's received offset is acknowledged after this many bytes.
pub const ACK_EVERY_BYTES: u64 = 64 * 1024;
/// Stream bytes after which a base pair is renewed (half of what it can
/// span).
pub const REBASE_BYTES: u32 = 1 << 30;
/// `flags` bit, in a hand-over record only: the g2h `END` frame was sent.
const HANDOVER_G2H_END_SENT: u32 = 1 << 16;
/// `flags` bit, in a hand-over record only: an `ACK` is owed.
const HANDOVER_ACK_OWED: u32 = 1 << 17;

/// A frame being written to the host stream.
#[derive(Debug, Clone, Copy)]
pub struct OutFrame {
    pub frame: Frame,
    pub header: [u8; FRAME_HEADER_BYTES],
    /// Bytes of header and payload written so far.
    pub written: usize,
}

impl OutFrame {
    pub fn new(frame: Frame) -> Self {
        OutFrame {
            frame,
            header: frame.to_bytes(),
            written: 0,
        }
    }

    /// Header and payload bytes.
    pub fn total(&self) -> usize {
        FRAME_HEADER_BYTES + self.frame.len as usize
    }
}

/// A resumable session's state (see the module doc).
#[derive(Debug)]
pub struct Session {
    pub token: Token,
    /// Fd-store uid of the stream carrying the session; 0 while detached.
    pub stream_uid: u64,
    /// `CLOCK_MONOTONIC` nanoseconds it was detached at; 0 while attached.
    pub detached_at_ns: u64,
    // Host to guest.
    h2g_base: u64,
    h2g_tx_cnt: u32,
    /// Checked bytes the guest has not taken yet.
    pub staging: Staging,
    /// The client's `END` was read; the guest is told once `staging` is
    /// empty.
    pub end_pending: bool,
    /// h2g offset the last `ACK` sent named.
    pub acked_sent: u64,
    /// An `ACK` is due once the RX batch being filled is published.
    pub ack_after_publish: bool,
    /// An `ACK` is due now.
    pub ack_owed: bool,
    // Guest to host.
    g2h_base: u64,
    g2h_fwd_cnt: u32,
    /// g2h offset after the last byte framed on the current stream.
    pub g2h_sent: u64,
    /// The g2h `END` was framed on the current stream.
    pub end_sent: bool,
    /// The client acknowledged the g2h `END`.
    pub end_acked: bool,
    /// The frame being written, if one is not finished.
    pub out: Option<OutFrame>,
}

impl Session {
    /// A new session on stream `stream_uid`, with the connection's
    /// counters now at `tx_cnt` and `fwd_cnt` (offsets 0).
    pub fn new(token: Token, stream_uid: u64, tx_cnt: u32, fwd_cnt: u32) -> Self {
        Session {
            token,
            stream_uid,
            detached_at_ns: 0,
            h2g_base: 0,
            h2g_tx_cnt: tx_cnt,
            staging: Staging::default(),
            end_pending: false,
            acked_sent: 0,
            ack_after_publish: false,
            ack_owed: false,
            g2h_base: 0,
            g2h_fwd_cnt: fwd_cnt,
            g2h_sent: 0,
            end_sent: false,
            end_acked: false,
            out: None,
        }
    }

    /// h2g offset the guest has at counter `tx_cnt`.
    pub fn h2g_offset(&self, tx_cnt: u32) -> u64 {
        offset_at(self.h2g_base, self.h2g_tx_cnt, tx_cnt)
    }

    /// g2h offset the client acknowledged at counter `fwd_cnt`.
    pub fn g2h_acked(&self, fwd_cnt: u32) -> u64 {
        offset_at(self.g2h_base, self.g2h_fwd_cnt, fwd_cnt)
    }

    /// Renews a base pair that spans [`REBASE_BYTES`] or more; true when
    /// one was.
    pub fn rebase(&mut self, tx_cnt: u32, fwd_cnt: u32) -> bool {
        let mut changed = false;
        if tx_cnt.wrapping_sub(self.h2g_tx_cnt) >= REBASE_BYTES {
            self.h2g_base = self.h2g_offset(tx_cnt);
            self.h2g_tx_cnt = tx_cnt;
            changed = true;
        }
        if fwd_cnt.wrapping_sub(self.g2h_fwd_cnt) >= REBASE_BYTES {
            self.g2h_base = self.g2h_acked(fwd_cnt);
            self.g2h_fwd_cnt = fwd_cnt;
            changed = true;
        }
        changed
    }

    /// Forgets everything tied to the stream that carried the session:
    /// partial frames, staged bytes (the client sends them again), owed
    /// acknowledgements.
    pub fn drop_link_state(&mut self) {
        self.staging.clear();
        self.end_pending = false;
        self.ack_after_publish = false;
        self.ack_owed = false;
        self.out = None;
        self.end_sent = false;
    }

    /// The record kept after every change a successor must see; the
    /// writer's position is left out (a crash detaches the session).
    pub fn record(&self, conn_uid: u64) -> ResumeRecord {
        ResumeRecord {
            conn_uid,
            stream_uid: self.stream_uid,
            token: self.token.0,
            h2g_base: self.h2g_base,
            g2h_base: self.g2h_base,
            h2g_tx_cnt: self.h2g_tx_cnt,
            g2h_fwd_cnt: self.g2h_fwd_cnt,
            detached_at_ns: self.detached_at_ns,
            flags: if self.end_acked {
                RESUME_G2H_END_ACKED
            } else {
                0
            },
            ..Default::default()
        }
    }

    /// The record written when the worker quiesces for an upgrade: with
    /// the writer's exact position, for a successor that carries on on the
    /// same stream.
    pub fn handover_record(&self, conn_uid: u64) -> ResumeRecord {
        let mut r = self.record(conn_uid);
        r.g2h_sent = self.g2h_sent;
        r.h2g_acked_sent = self.acked_sent;
        if self.end_sent {
            r.flags |= HANDOVER_G2H_END_SENT;
        }
        if self.ack_owed {
            r.flags |= HANDOVER_ACK_OWED;
        }
        if let Some(out) = &self.out {
            r.out_kind = out.frame.kind.code();
            r.out_len = out.frame.len;
            r.out_written = out.written as u32;
            r.out_offset = out.frame.offset;
        }
        r
    }

    /// The session a record describes. `handover`: it was written by a
    /// worker that quiesced for this successor, so the writer's position
    /// is taken too (the frame in progress is rebuilt by the caller, which
    /// has the bytes: see [`Session::unfinished_frame`]).
    pub fn from_record(r: &ResumeRecord, handover: bool) -> Session {
        let mut s = Session::new(Token(r.token), r.stream_uid, 0, 0);
        s.h2g_base = r.h2g_base;
        s.h2g_tx_cnt = r.h2g_tx_cnt;
        s.g2h_base = r.g2h_base;
        s.g2h_fwd_cnt = r.g2h_fwd_cnt;
        s.detached_at_ns = r.detached_at_ns;
        s.end_acked = r.flags & RESUME_G2H_END_ACKED != 0;
        if handover {
            s.g2h_sent = r.g2h_sent;
            s.acked_sent = r.h2g_acked_sent;
            s.end_sent = r.flags & HANDOVER_G2H_END_SENT != 0;
            s.ack_owed = r.flags & HANDOVER_ACK_OWED != 0;
        }
        s
    }

    /// The frame a hand-over record says was being written: kind, offset,
    /// payload length and bytes written. `None` if there was none or the
    /// record is not one this build wrote.
    pub fn unfinished_frame(r: &ResumeRecord) -> Option<(Kind, u64, u32, usize)> {
        let kind = match r.out_kind {
            0 => return None,
            k if k == Kind::Data.code() => Kind::Data,
            k if k == Kind::Ack.code() => Kind::Ack,
            k if k == Kind::End.code() => Kind::End,
            _ => return None,
        };
        Some((kind, r.out_offset, r.out_len, r.out_written as usize))
    }
}

/// `CLOCK_MONOTONIC` now, in nanoseconds (the clock every process on the
/// machine shares, so a successor measures a grace period its predecessor
/// started).
pub fn monotonic_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_survive_the_counters_wrapping_and_a_rebase() {
        let mut s = Session::new(Token([1; 16]), 7, u32::MAX - 100, 50);
        assert_eq!(s.h2g_offset(u32::MAX - 100), 0);
        assert_eq!(s.h2g_offset(99), 200);
        assert_eq!(s.g2h_acked(150), 100);
        assert!(!s.rebase(99, 150));
        let far = (u32::MAX - 100).wrapping_add(REBASE_BYTES);
        assert!(s.rebase(far, 150));
        assert_eq!(s.h2g_offset(far), u64::from(REBASE_BYTES));
        assert_eq!(
            s.h2g_offset(far.wrapping_add(10)),
            u64::from(REBASE_BYTES) + 10
        );
        // A connection record one batch behind the new base pair.
        assert_eq!(
            s.h2g_offset(far.wrapping_sub(10)),
            u64::from(REBASE_BYTES) - 10
        );
    }

    #[test]
    fn records_round_trip_and_the_writer_only_in_a_hand_over() {
        let mut s = Session::new(Token([9; 16]), 33, 1000, 2000);
        s.g2h_sent = 70_000;
        s.acked_sent = 5;
        s.end_acked = true;
        s.end_sent = true;
        s.out = Some(OutFrame {
            written: 30,
            ..OutFrame::new(Frame::new(Kind::Data, 4464, 65536))
        });
        let r = s.record(12);
        assert_eq!((r.conn_uid, r.stream_uid, r.token), (12, 33, [9; 16]));
        assert_eq!((r.g2h_sent, r.out_kind), (0, 0));
        let back = Session::from_record(&r, false);
        assert!(back.end_acked && !back.end_sent);
        assert_eq!(back.h2g_offset(1010), 10);
        assert_eq!(back.g2h_acked(2020), 20);
        let h = s.handover_record(12);
        assert_eq!(
            Session::unfinished_frame(&h),
            Some((Kind::Data, 4464, 65536, 30))
        );
        let back = Session::from_record(&h, true);
        assert_eq!(
            (back.g2h_sent, back.acked_sent, back.end_sent),
            (70_000, 5, true)
        );
        assert_eq!(Session::unfinished_frame(&r), None);
    }
}
