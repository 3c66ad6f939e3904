//! The stub: the session's I/O thread.
//!
//! # States
//!
//! ```text
//!            ┌────────── RESUME accepted ───────────┐
//!            ▼                                      │
//!        Attached ── EOF, I/O error, ERROR, ──▶ Reattaching ── refused / timeout ──▶ (Failed)
//!            │        bad frame (callback)          │
//!            │                                      └── refused once complete ──▶ (Finished)
//!            ├── ABORT sent ──▶ (Failed: aborted)
//!            └── generation over (stop) ──▶ exit     (and from Reattaching too)
//! ```
//!
//! A session is complete when both `END`s are acknowledged both ways; vsockd
//! then closes the socket. Since a dying worker closes it too, the stub
//! confirms the end with a `RESUME`: refused means ended (Finished), accepted
//! means it was a break after all (reported, and the `ACK` is sent again).
//!
//! A stub is started with a socket already attached (by `connect`,
//! `resume` or `start`, which attach in the caller's thread so their errors
//! reach the caller). It owns that socket and every later one. It writes to
//! the shared state only while its generation is current, so a stopped
//! stub that has not exited yet changes nothing.

use std::sync::Arc;
use std::thread::{self, JoinHandle};

use log::warn;

use crate::error::{ClientError, SessionFailure};
use crate::session::attach::{reattach, ReattachEnd};
use crate::session::link::{Link, LinkEnd};
use crate::session::state::{Lifecycle, Shared};
use crate::session::Disconnect;

/// Starts a stub for `generation` on an attached `link`.
pub fn spawn(
    shared: Arc<Shared>,
    generation: u64,
    link: Link,
) -> Result<JoinHandle<()>, ClientError> {
    thread::Builder::new()
        .name("vsockd-session".to_owned())
        .spawn(move || run(&shared, generation, link))
        .map_err(|source| ClientError::Spawn { source })
}

fn run(shared: &Shared, generation: u64, mut link: Link) {
    loop {
        let reason = match link.run(shared, generation) {
            LinkEnd::Stopped => return,
            LinkEnd::Aborted => {
                return finish(
                    shared,
                    generation,
                    Lifecycle::Failed(SessionFailure::Aborted),
                )
            }
            LinkEnd::Broken(reason) => reason,
        };
        drop(link);
        // vsockd closes the socket once the session is complete; a worker
        // dying at that moment looks the same. A RESUME tells them apart:
        // refused, the session ended; accepted, it was a break.
        let complete = shared.lock().is_complete();
        if !complete && !report_break(shared, generation, reason.clone()) {
            return;
        }
        link = match reattach(shared, generation, false, true) {
            Ok(link) => {
                if complete && !report_break(shared, generation, reason) {
                    return;
                }
                link
            }
            Err(ReattachEnd::Stopped) => return,
            Err(ReattachEnd::Finished) => {
                return finish(shared, generation, Lifecycle::Finished);
            }
            Err(ReattachEnd::Failed(failure)) => {
                warn!("session {:?} failed: {failure}", shared.token);
                return finish(shared, generation, Lifecycle::Failed(failure));
            }
        };
    }
}

/// Marks the session detached and tells the callback. Returns false if the
/// stub's generation is over.
fn report_break(shared: &Shared, generation: u64, reason: String) -> bool {
    let (disconnect, callback) = {
        let mut state = shared.lock();
        if state.generation != generation {
            return false;
        }
        let attached_for = state
            .attached_since
            .take()
            .map(|since| since.elapsed())
            .unwrap_or_default();
        state.break_count += 1;
        let disconnect = Disconnect {
            reason,
            attached_for,
            received: state.g2h.consumed_offset(),
            sent: state.h2g.written(),
            acknowledged: state.h2g.acknowledged,
            break_number: state.break_count,
        };
        shared.notify();
        (disconnect, state.on_disconnect.clone())
    };
    warn!(
        "session {:?} lost its connection to vsockd after {:?}: {}; reattaching",
        shared.token, disconnect.attached_for, disconnect.reason
    );
    if let Some(callback) = callback {
        callback(&disconnect);
    }
    true
}

fn finish(shared: &Shared, generation: u64, lifecycle: Lifecycle) {
    let mut state = shared.lock();
    if state.generation == generation {
        state.lifecycle = lifecycle;
        state.attached_since = None;
    }
    shared.notify();
}
