//! `Read` and `Write` for a session: copies between the application's
//! buffers and the session's rings, waiting while there is nothing to read
//! or no room to write.

use std::io::{self, Read, Write};

use crate::error::ClientError;
use crate::session::state::Lifecycle;
use crate::session::Session;

impl Session {
    /// Copies guest bytes into `buf`; 0 at the guest's `END` once every
    /// byte before it was read.
    fn read_bytes(&self, buf: &mut [u8]) -> Result<usize, ClientError> {
        if buf.is_empty() {
            return Ok(0);
        }
        let shared = &self.shared;
        let ack_every_bytes = shared.opts.ack_every_bytes;
        let mut state = shared.lock();
        loop {
            let g2h = &mut state.g2h;
            if !g2h.pending.is_empty() {
                let count = g2h.pending.pop_into(buf);
                g2h.consumed += count as u64;
                let unacknowledged = g2h.consumed_offset() - g2h.ack_sent;
                let mut wake = std::mem::take(&mut g2h.stub_needs_space);
                if g2h.pending.is_empty() || unacknowledged >= ack_every_bytes {
                    g2h.ack_wanted = true;
                    wake = true;
                }
                if wake {
                    shared.wake_stub(&mut state);
                }
                return Ok(count);
            }
            if g2h.end == Some(g2h.consumed) {
                if !g2h.end_consumed {
                    g2h.end_consumed = true;
                    g2h.ack_wanted = true;
                    shared.wake_stub(&mut state);
                    shared.notify();
                }
                return Ok(0);
            }
            if g2h.consumed_offset() > g2h.ack_sent && !g2h.ack_wanted {
                // Nothing buffered: acknowledge everything read so far.
                g2h.ack_wanted = true;
                shared.wake_stub(&mut state);
            }
            match &state.lifecycle {
                Lifecycle::Failed(failure) => return Err(failure.clone().into()),
                Lifecycle::Finished => return Ok(0),
                Lifecycle::Running | Lifecycle::Stopped => {}
            }
            state = shared.wait(state);
        }
    }

    /// Copies as much of `buf` as the resend ring has room for, waiting
    /// for room when it is full.
    fn write_bytes(&self, buf: &[u8]) -> Result<usize, ClientError> {
        if buf.is_empty() {
            return Ok(0);
        }
        let shared = &self.shared;
        let mut state = shared.lock();
        loop {
            match &state.lifecycle {
                Lifecycle::Failed(failure) => return Err(failure.clone().into()),
                Lifecycle::Finished => return Err(ClientError::Ended),
                Lifecycle::Running | Lifecycle::Stopped => {}
            }
            if state.h2g.end_requested {
                return Err(ClientError::WriteShutDown);
            }
            let count = state.h2g.resend.push(buf);
            if count > 0 {
                shared.wake_stub(&mut state);
                return Ok(count);
            }
            state = shared.wait(state);
        }
    }
}

impl Read for &Session {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Ok(self.read_bytes(buf)?)
    }
}

impl Read for Session {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for &Session {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(self.write_bytes(buf)?)
    }

    /// Waits until vsockd has acknowledged every byte written, up to
    /// `Options::reattach_timeout`.
    fn flush(&mut self) -> io::Result<()> {
        Ok(self.flush_acknowledged(self.shared.opts.reattach_timeout)?)
    }
}

impl Write for Session {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&*self).flush()
    }
}
