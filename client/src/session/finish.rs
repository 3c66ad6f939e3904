//! Ending a session: `END` (`shutdown_write`), waiting for
//! acknowledgements, a clean `close`, and `abort`.

use std::time::{Duration, Instant};

use crate::error::{ClientError, SessionFailure};
use crate::session::state::{Lifecycle, State};
use crate::session::Session;

impl Session {
    /// Sends `END` after the last byte written: the guest reads EOF once
    /// it has every byte. Later writes fail with
    /// [`ClientError::WriteShutDown`]. Calling it again does nothing.
    pub fn shutdown_write(&self) -> Result<(), ClientError> {
        let mut state = self.shared.lock();
        if let Some(failure) = state.failure() {
            return Err(failure.clone().into());
        }
        if !state.h2g.end_requested {
            state.h2g.end_requested = true;
            self.shared.wake_stub(&mut state);
        }
        Ok(())
    }

    /// Blocks until vsockd has acknowledged every byte written, and the
    /// `END` if [`Session::shutdown_write`] was called, or `timeout`
    /// passes ([`ClientError::TimedOut`]). While the session is stopped,
    /// nothing gets acknowledged.
    pub fn flush_acknowledged(&self, timeout: Duration) -> Result<(), ClientError> {
        self.wait_for(timeout, "acknowledgement of every byte written", |state| {
            if state.h2g.all_acknowledged() || state.lifecycle == Lifecycle::Finished {
                return Some(Ok(()));
            }
            state.failure().map(|failure| Err(failure.clone().into()))
        })
    }

    /// Sends `ABORT`: vsockd resets the guest connection and forgets the
    /// session. A detached or stopped session reattaches first, to say so.
    /// Waits up to `Options::reattach_timeout` for the frame to be written.
    pub fn abort(self) -> Result<(), ClientError> {
        let stopped = {
            let mut state = self.shared.lock();
            match &state.lifecycle {
                Lifecycle::Finished => return Err(ClientError::Ended),
                Lifecycle::Failed(failure) => return Err(failure.clone().into()),
                Lifecycle::Running | Lifecycle::Stopped => {}
            }
            state.abort_requested = true;
            self.shared.wake_stub(&mut state);
            state.lifecycle == Lifecycle::Stopped
        };
        if stopped {
            self.start()?;
        }
        let timeout = self.shared.opts.reattach_timeout;
        self.wait_for(timeout, "sending ABORT", |state| match &state.lifecycle {
            Lifecycle::Failed(SessionFailure::Aborted) => Some(Ok(())),
            Lifecycle::Failed(failure) => Some(Err(failure.clone().into())),
            Lifecycle::Finished => Some(Err(ClientError::Ended)),
            Lifecycle::Running | Lifecycle::Stopped => None,
        })
    }

    /// Finishes the session cleanly: sends `END` (if
    /// [`Session::shutdown_write`] was not called), waits for the guest's
    /// `END` and for vsockd to acknowledge ours, acknowledges the guest's,
    /// and closes. A stopped session is started first.
    ///
    /// Nothing is discarded: if guest bytes the application has not read
    /// are buffered (now, or arrive before the guest's `END`), this fails
    /// with [`ClientError::UnreadData`] and the session is dropped without
    /// ending (vsockd keeps it for its grace period). Read until a read
    /// returns 0 first. There is no timeout: the guest decides when its
    /// side ends; use [`Session::abort`] to give up.
    pub fn close(self) -> Result<(), ClientError> {
        self.shutdown_write()?;
        let stopped = self.shared.lock().lifecycle == Lifecycle::Stopped;
        if stopped {
            self.start()?;
        }
        let shared = &self.shared;
        let mut state = shared.lock();
        loop {
            match &state.lifecycle {
                Lifecycle::Finished => return Ok(()),
                Lifecycle::Failed(failure) => return Err(failure.clone().into()),
                Lifecycle::Running | Lifecycle::Stopped => {}
            }
            let g2h = &mut state.g2h;
            if !g2h.pending.is_empty() {
                return Err(ClientError::UnreadData {
                    bytes: g2h.pending.len() as u64,
                });
            }
            if g2h.end == Some(g2h.consumed) && !g2h.end_consumed {
                // The application did not read the EOF itself: nothing
                // is lost by reading it for it.
                g2h.end_consumed = true;
                g2h.ack_wanted = true;
                shared.wake_stub(&mut state);
            }
            state = shared.wait(state);
        }
    }

    /// Waits until `done` returns a result, or `timeout`.
    fn wait_for(
        &self,
        timeout: Duration,
        what: &'static str,
        done: impl Fn(&State) -> Option<Result<(), ClientError>>,
    ) -> Result<(), ClientError> {
        // A timeout too long to represent is no timeout.
        let deadline = Instant::now().checked_add(timeout);
        let mut state = self.shared.lock();
        loop {
            if let Some(result) = done(&state) {
                return result;
            }
            state = match deadline {
                None => self.shared.wait(state),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(ClientError::TimedOut { what, timeout });
                    }
                    self.shared.wait_timeout(state, deadline - now)
                }
            };
        }
    }
}
