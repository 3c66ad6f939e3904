//! The state a session's handle and its I/O thread (the *stub*) share.
//!
//! # Lifecycle
//!
//! ```text
//!            stop()                 both ENDs acknowledged
//! Running ─────────▶ Stopped   Running ──────────────────▶ Finished
//!    ▲                  │
//!    └──── start() ─────┘      Running ── RESUME refused / reattach timeout / ABORT ──▶ Failed
//! ```
//!
//! - `Running`: a stub thread exists; it is either *attached* (it owns a
//!   socket to vsockd: `attached_since` is set) or reattaching after a break.
//! - `Stopped`: no stub, no socket; buffers and offsets are kept.
//! - `Finished` and `Failed` are final: no stub runs again.
//!
//! Every stub carries the `generation` it was started with; `stop()` bumps
//! the generation, and a stub that finds another one exits without touching
//! the state further.
//!
//! # Offsets and invariants
//!
//! Host to guest ([`Outbound`]): the resend ring holds the bytes
//! `[acknowledged, written)`; `acknowledged` only grows. Guest to host
//! ([`Inbound`]): the receive ring holds `[consumed, delivered)`; what the
//! session acknowledges and resumes from is `consumed_offset()`, what the
//! application has read (plus one once it has read the guest's `END`), never
//! more, and `ack_sent <= consumed_offset()` always.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::SessionFailure;
use crate::options::Options;
use crate::ring::ByteRing;
use crate::session::Disconnect;
use crate::token::Token;
use crate::wake::Waker;

/// Guest bytes buffered for the application at most; the stub stops
/// reading from vsockd while this is full. vsockd itself holds back once
/// its receive buffer (1 MiB by default) is unacknowledged, so this is
/// rarely reached.
pub const RECEIVE_BUFFER_BYTES: usize = 4 << 20;

/// Called on every break.
pub type DisconnectCallback = Arc<dyn Fn(&Disconnect) + Send + Sync>;

/// Where the session is in its life (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    Running,
    Stopped,
    Finished,
    Failed(SessionFailure),
}

/// The immutable parts, the state, and the means to wait and wake.
pub struct Shared {
    pub uds_path: PathBuf,
    pub token: Token,
    pub host_port: Option<u32>,
    pub opts: Options,
    pub waker: Waker,
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    pub fn new(
        uds_path: PathBuf,
        token: Token,
        host_port: Option<u32>,
        opts: Options,
        waker: Waker,
        state: State,
    ) -> Shared {
        Shared {
            uds_path,
            token,
            host_port,
            opts,
            waker,
            state: Mutex::new(state),
            changed: Condvar::new(),
        }
    }

    /// Locks the state. A panic elsewhere while it was locked does not make
    /// it unusable: every update leaves it consistent before it can panic.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for [`Shared::notify`].
    pub fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed
            .wait(guard)
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for [`Shared::notify`] or `timeout`.
    pub fn wait_timeout<'a>(
        &self,
        guard: MutexGuard<'a, State>,
        timeout: Duration,
    ) -> MutexGuard<'a, State> {
        match self.changed.wait_timeout(guard, timeout) {
            Ok((guard, _)) => guard,
            Err(poisoned) => poisoned.into_inner().0,
        }
    }

    /// Tells every waiting caller the state changed.
    pub fn notify(&self) {
        self.changed.notify_all();
    }

    /// Makes the stub look at the state again (once per stub loop).
    pub fn wake_stub(&self, state: &mut State) {
        if !state.wake_pending {
            state.wake_pending = true;
            self.waker.wake();
        }
    }
}

/// Everything that changes.
pub struct State {
    pub lifecycle: Lifecycle,
    /// Bumped by `stop()`; a stub of another generation exits.
    pub generation: u64,
    pub stub: Option<JoinHandle<()>>,
    /// Set while a socket carries the session.
    pub attached_since: Option<Instant>,
    pub reattach_count: u64,
    pub break_count: u64,
    pub on_disconnect: Option<DisconnectCallback>,
    /// A wake-up is on its way to the stub (cleared by the stub each loop).
    pub wake_pending: bool,
    /// `abort()` was called: the stub sends `ABORT` next.
    pub abort_requested: bool,
    /// The message of the last `ERROR` frame from vsockd.
    pub last_error_frame: Option<String>,
    pub h2g: Outbound,
    pub g2h: Inbound,
}

impl State {
    pub fn new(opts: &Options) -> State {
        State {
            lifecycle: Lifecycle::Running,
            generation: 0,
            stub: None,
            attached_since: None,
            reattach_count: 0,
            break_count: 0,
            on_disconnect: None,
            wake_pending: false,
            abort_requested: false,
            last_error_frame: None,
            h2g: Outbound {
                resend: ByteRing::new(opts.max_unacked_bytes),
                acknowledged: 0,
                end_requested: false,
                end_acknowledged: false,
                peer_received: 0,
            },
            g2h: Inbound {
                pending: ByteRing::new(RECEIVE_BUFFER_BYTES),
                consumed: 0,
                end: None,
                end_consumed: false,
                ack_sent: 0,
                ack_wanted: false,
                stub_needs_space: false,
                confirmed: (!opts.acknowledge_on_read).then_some(0),
            },
        }
    }

    /// Both streams ended and each side acknowledged the other's `END`:
    /// vsockd forgets the session.
    pub fn is_complete(&self) -> bool {
        self.h2g.end_acknowledged
            && self.g2h.end_consumed
            && self.g2h.ack_sent >= self.g2h.consumed_offset()
    }

    /// The final failure, if any.
    pub fn failure(&self) -> Option<&SessionFailure> {
        match &self.lifecycle {
            Lifecycle::Failed(failure) => Some(failure),
            _ => None,
        }
    }
}

/// The host-to-guest stream.
pub struct Outbound {
    /// Bytes `[acknowledged, written())`, kept to send again.
    pub resend: ByteRing,
    /// Bytes vsockd acknowledged.
    pub acknowledged: u64,
    /// `shutdown_write()` was called: `END` goes at `written()`.
    pub end_requested: bool,
    pub end_acknowledged: bool,
    /// The offset vsockd gave in its last `OK` to `RESUME`.
    pub peer_received: u64,
}

impl Outbound {
    /// The offset after the last byte the application wrote.
    pub fn written(&self) -> u64 {
        self.acknowledged + self.resend.len() as u64
    }

    /// The highest offset vsockd may acknowledge: every byte, plus one for
    /// the `END` once it was asked for.
    pub fn stream_limit(&self) -> u64 {
        self.written() + u64::from(self.end_requested)
    }

    /// Everything written (and the `END`, if asked for) is acknowledged.
    pub fn all_acknowledged(&self) -> bool {
        self.resend.is_empty() && (!self.end_requested || self.end_acknowledged)
    }

    /// vsockd has everything before `offset` (the `END` too if `offset` is
    /// past the last byte): drop it from the resend ring.
    pub fn acknowledge(&mut self, offset: u64) {
        let written = self.written();
        let bytes = offset.min(written);
        if bytes > self.acknowledged {
            self.resend.consume((bytes - self.acknowledged) as usize);
            self.acknowledged = bytes;
        }
        if self.end_requested && offset > written {
            self.end_acknowledged = true;
        }
    }
}

/// The guest-to-host stream.
pub struct Inbound {
    /// Bytes `[consumed, delivered())`, waiting for the application.
    pub pending: ByteRing,
    /// Bytes the application has read.
    pub consumed: u64,
    /// The guest's `END` offset, once received on the current attachment
    /// (or consumed).
    pub end: Option<u64>,
    /// The application read the `END` (a read returned 0).
    pub end_consumed: bool,
    /// The highest `ACK` written to vsockd.
    pub ack_sent: u64,
    /// The application asks for an `ACK` of what it consumed.
    pub ack_wanted: bool,
    /// The stub holds a frame that does not fit in `pending`.
    pub stub_needs_space: bool,
    /// With manual acknowledgements, the offset the application said it
    /// recorded (`None`: acknowledge on read).
    pub confirmed: Option<u64>,
}

impl Inbound {
    /// The offset the next `DATA` from vsockd must start at.
    pub fn delivered(&self) -> u64 {
        self.consumed + self.pending.len() as u64
    }

    /// What the application consumed, as the protocol counts offsets: the
    /// `END` takes one. This is what is acknowledged and resumed from.
    pub fn consumed_offset(&self) -> u64 {
        self.consumed + u64::from(self.end_consumed)
    }

    /// The offset to acknowledge: what the application consumed, capped
    /// by what it confirmed when it acknowledges by hand.
    pub fn ack_target(&self) -> u64 {
        let consumed = self.consumed_offset();
        self.confirmed.map_or(consumed, |c| c.min(consumed))
    }

    /// Whether the stub should send an `ACK` now.
    pub fn ack_due(&self, ack_every_bytes: u64) -> bool {
        let target = self.ack_target();
        target > self.ack_sent
            && (self.ack_wanted || target - self.ack_sent >= ack_every_bytes.max(1))
    }

    /// Forgets what was received but not consumed, before a `RESUME` from
    /// `consumed_offset()`: vsockd sends it all again.
    pub fn rewind(&mut self) {
        self.pending.clear();
        if !self.end_consumed {
            self.end = None;
        }
        self.stub_needs_space = false;
        self.ack_wanted = self.ack_target() > self.ack_sent;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State::new(&Options {
            max_unacked_bytes: 16,
            ..Options::default()
        })
    }

    #[test]
    fn acknowledging_drops_bytes_and_then_the_end() {
        let mut st = state();
        st.h2g.resend.push(b"0123456789");
        st.h2g.acknowledge(4);
        assert_eq!((st.h2g.acknowledged, st.h2g.written()), (4, 10));
        assert_eq!(st.h2g.resend.slices(0, 1)[0], b"4");
        st.h2g.acknowledge(2);
        assert_eq!(st.h2g.acknowledged, 4, "acknowledgements never go down");
        st.h2g.end_requested = true;
        assert_eq!(st.h2g.stream_limit(), 11);
        st.h2g.acknowledge(10);
        assert!(!st.h2g.end_acknowledged);
        assert!(!st.h2g.all_acknowledged());
        st.h2g.acknowledge(11);
        assert!(st.h2g.end_acknowledged);
        assert!(st.h2g.all_acknowledged());
    }

    #[test]
    fn ack_is_due_when_asked_or_after_enough_bytes() {
        let mut st = state();
        assert!(!st.g2h.ack_due(4));
        st.g2h.consumed = 3;
        assert!(!st.g2h.ack_due(4));
        st.g2h.ack_wanted = true;
        assert!(st.g2h.ack_due(4));
        st.g2h.ack_wanted = false;
        st.g2h.consumed = 4;
        assert!(st.g2h.ack_due(4));
        st.g2h.ack_sent = 4;
        assert!(!st.g2h.ack_due(4));
    }

    #[test]
    fn rewind_keeps_only_what_was_consumed() {
        let mut st = state();
        st.g2h.consumed = 5;
        st.g2h.pending.push(b"abc");
        st.g2h.end = Some(8);
        st.g2h.rewind();
        assert_eq!(st.g2h.delivered(), 5);
        assert_eq!(st.g2h.end, None);
        assert!(st.g2h.ack_wanted);

        st.g2h.end = Some(5);
        st.g2h.end_consumed = true;
        st.g2h.rewind();
        assert_eq!(st.g2h.end, Some(5));
        assert_eq!(st.g2h.consumed_offset(), 6);
    }

    #[test]
    fn complete_needs_both_ends_acknowledged() {
        let mut st = state();
        st.h2g.end_requested = true;
        st.h2g.acknowledge(1);
        st.g2h.end = Some(0);
        st.g2h.end_consumed = true;
        assert!(!st.is_complete(), "the guest's END is not acknowledged yet");
        st.g2h.ack_sent = 1;
        assert!(st.is_complete());
    }
}
