//! One attachment: the frames exchanged over one socket to vsockd, from the
//! `OK` line until the socket breaks, the session completes, or the stub is
//! stopped.
//!
//! # States
//!
//! Sending is either *idle* or *in a frame* (`tx`): a frame is chosen only
//! when no other is in progress, so frames are whole on the wire, and it is
//! written with as many non-blocking `sendmsg` calls as the socket needs.
//! The choice, in order: `ABORT` if asked for, `ACK` if one is due (and
//! always first on a new socket), `DATA` from `wire_sent` while bytes wait,
//! `END` once every byte is out. Once the session is complete (both `END`s
//! acknowledged both ways) nothing is left to send, and the link waits for
//! vsockd to close the socket.
//!
//! Receiving reads whatever the socket has into `rx`; complete frames are
//! checked (fields, checksum, offset) and applied to the shared state under
//! its lock. A frame whose payload does not fit in the receive ring stays in
//! `rx` (*blocked*) and reading pauses until the application makes room.
//!
//! # Invariants
//!
//! - `wire_sent` starts at the offset vsockd's `OK` gave and counts whole
//!   `DATA` frames written on this socket; `DATA` goes out in order from it.
//! - An `ACK` from vsockd may not pass `wire_sent` (plus one once `END` is
//!   written): vsockd acknowledges only whole frames. So the bytes of the
//!   frame in progress are always still in the resend ring.
//! - A received `DATA` starts exactly at `delivered()`; none follows `END`.
//! - Anything else from vsockd is a break: the socket is dropped and the
//!   partly received or sent frame with it.

use std::io::{self, IoSlice, Read};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;

use log::debug;

use crate::frame::{
    FrameHeader, FrameKind, FRAME_HEADER_BYTES, H2G_WINDOW_BYTES, MAX_DATA_PAYLOAD_BYTES,
    MAX_FRAME_BYTES,
};
use crate::session::state::{Shared, State};
use crate::sys::{self, Interest};

/// Bytes read from the socket ahead of applying them: several whole frames.
const RX_BUFFER_BYTES: usize = 4 * MAX_FRAME_BYTES;

/// Why [`Link::run`] returned.
#[derive(Debug)]
pub enum LinkEnd {
    /// The stub's generation is over (`stop()` or the session dropped).
    Stopped,
    /// The socket broke or vsockd closed it; the text says how.
    Broken(String),
    /// `ABORT` was sent.
    Aborted,
}

/// A frame being written.
struct Outgoing {
    header: FrameHeader,
    encoded: [u8; FRAME_HEADER_BYTES],
    /// Header and payload bytes written so far.
    written: usize,
}

impl Outgoing {
    fn new(header: FrameHeader) -> Outgoing {
        Outgoing {
            encoded: header.encode(),
            header,
            written: 0,
        }
    }
}

/// Bytes read but not yet applied: `buffer[start..end]`.
struct RxBuffer {
    buffer: Vec<u8>,
    start: usize,
    end: usize,
}

impl RxBuffer {
    fn filled(&self) -> &[u8] {
        &self.buffer[self.start..self.end]
    }

    fn consume(&mut self, count: usize) {
        self.start += count;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Room to read into, after moving a partial frame to the front when
    /// the tail has no room for a whole one.
    fn space(&mut self) -> &mut [u8] {
        if self.buffer.len() - self.end < MAX_FRAME_BYTES && self.start > 0 {
            self.buffer.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buffer[self.end..]
    }
}

/// One socket carrying the session.
pub struct Link {
    stream: UnixStream,
    rx: RxBuffer,
    rx_blocked: bool,
    tx: Option<Outgoing>,
    wire_sent: u64,
    end_sent: bool,
    abort_sent: bool,
    /// Acknowledge what was consumed first thing on a new socket, whether
    /// or not vsockd counts the `RESUME` offset as an acknowledgement.
    ack_on_attach: bool,
}

impl Link {
    /// Takes over `stream` right after vsockd's `OK`, with the state's
    /// offsets already set from it.
    pub fn new(stream: UnixStream, state: &State) -> io::Result<Link> {
        stream.set_nonblocking(true)?;
        stream.set_read_timeout(None)?;
        Ok(Link {
            stream,
            rx: RxBuffer {
                buffer: vec![0; RX_BUFFER_BYTES],
                start: 0,
                end: 0,
            },
            rx_blocked: false,
            tx: None,
            wire_sent: state.h2g.acknowledged,
            end_sent: state.h2g.end_acknowledged,
            abort_sent: false,
            ack_on_attach: state.g2h.ack_target() > 0,
        })
    }

    /// Moves frames both ways until the link ends.
    pub fn run(&mut self, shared: &Shared, generation: u64) -> LinkEnd {
        loop {
            let interest = {
                let mut state = shared.lock();
                if state.generation != generation {
                    return LinkEnd::Stopped;
                }
                state.wake_pending = false;
                if let Err(reason) = self.apply_received(shared, &mut state) {
                    return LinkEnd::Broken(reason);
                }
                if self.abort_sent {
                    return LinkEnd::Aborted;
                }
                if self.tx.is_none() {
                    self.tx = self.next_frame(&mut state, shared.opts.ack_every_bytes);
                }
                Interest {
                    readable: !self.rx_blocked,
                    writable: self.tx.is_some(),
                }
            };

            let mut progressed = false;
            if interest.writable {
                match self.write_some(shared) {
                    Ok(wrote) => progressed |= wrote,
                    Err(reason) => return LinkEnd::Broken(self.last_words(shared, reason)),
                }
                if self.abort_sent {
                    // vsockd closes the socket at once: nothing more to read.
                    return LinkEnd::Aborted;
                }
            }
            if interest.readable {
                match self.read_some() {
                    Ok(read) => progressed |= read,
                    Err(reason) => return LinkEnd::Broken(reason),
                }
            }
            if progressed {
                continue;
            }

            let ready = match sys::wait(self.stream.as_fd(), interest, shared.waker.fd()) {
                Ok(ready) => ready,
                Err(err) => return LinkEnd::Broken(format!("poll on vsockd's socket: {err}")),
            };
            if ready.woken {
                shared.waker.drain();
            }
            if ready.socket_hung_up && !interest.readable {
                let reason = "vsockd closed the connection".to_owned();
                return LinkEnd::Broken(self.last_words(shared, reason));
            }
        }
    }

    /// After a failed write: vsockd may have said why it closed the socket
    /// (an `ERROR` frame) before our write failed. Reads and applies what
    /// is left; the first problem found there explains the break better.
    fn last_words(&mut self, shared: &Shared, reason: String) -> String {
        while let Ok(true) = self.read_some() {}
        let mut state = shared.lock();
        match self.apply_received(shared, &mut state) {
            Err(explained) => explained,
            Ok(()) => reason,
        }
    }

    /// Picks the next frame to send, if any.
    fn next_frame(&mut self, state: &mut State, ack_every_bytes: u64) -> Option<Outgoing> {
        if state.abort_requested {
            return Some(Outgoing::new(FrameHeader::control(FrameKind::Abort, 0)));
        }
        if self.ack_on_attach || state.g2h.ack_due(ack_every_bytes) {
            self.ack_on_attach = false;
            state.g2h.ack_wanted = false;
            let offset = state.g2h.ack_target();
            return Some(Outgoing::new(FrameHeader::control(FrameKind::Ack, offset)));
        }
        let written = state.h2g.written();
        // Never past the window beyond what vsockd acknowledged.
        let sendable = written.min(state.h2g.acknowledged + H2G_WINDOW_BYTES);
        if self.wire_sent < sendable {
            let len = (sendable - self.wire_sent).min(MAX_DATA_PAYLOAD_BYTES as u64) as usize;
            let start = (self.wire_sent - state.h2g.acknowledged) as usize;
            let payload = state.h2g.resend.slices(start, len);
            let header = FrameHeader::new(FrameKind::Data, self.wire_sent, payload);
            return Some(Outgoing::new(header));
        }
        if state.h2g.end_requested
            && self.wire_sent == written
            && !self.end_sent
            && !state.h2g.end_acknowledged
        {
            return Some(Outgoing::new(FrameHeader::control(FrameKind::End, written)));
        }
        None
    }

    /// Writes what the socket takes of the frame in progress. Returns
    /// whether anything was written.
    fn write_some(&mut self, shared: &Shared) -> Result<bool, String> {
        let Some(mut out) = self.tx.take() else {
            return Ok(false);
        };
        let mut state = shared.lock();
        let payload_len = out.header.len as usize;
        let payload = if payload_len == 0 {
            [&[][..], &[][..]]
        } else {
            let start = (out.header.offset - state.h2g.acknowledged) as usize;
            state.h2g.resend.slices(start, payload_len)
        };
        let slices = unwritten(&out.encoded, payload, out.written);
        match sys::send_vectored(self.stream.as_fd(), &slices) {
            Ok(0) => Err("vsockd's socket accepted no bytes".to_owned()),
            Ok(count) => {
                out.written += count;
                if out.written == FRAME_HEADER_BYTES + payload_len {
                    self.frame_sent(&mut state, &out.header);
                    shared.notify();
                } else {
                    self.tx = Some(out);
                }
                Ok(true)
            }
            Err(err) => {
                self.tx = Some(out);
                match err.kind() {
                    io::ErrorKind::WouldBlock => Ok(false),
                    io::ErrorKind::Interrupted => Ok(true),
                    _ => Err(format!("writing to vsockd: {err}")),
                }
            }
        }
    }

    /// Records a frame written whole.
    fn frame_sent(&mut self, state: &mut State, header: &FrameHeader) {
        debug!(
            "sent {:?} frame: offset {}, {} bytes",
            header.kind, header.offset, header.len
        );
        match header.kind {
            FrameKind::Data => self.wire_sent += u64::from(header.len),
            FrameKind::Ack => state.g2h.ack_sent = state.g2h.ack_sent.max(header.offset),
            FrameKind::End => self.end_sent = true,
            FrameKind::Abort => self.abort_sent = true,
            FrameKind::Error => {}
        }
    }

    /// Reads what the socket has. Returns whether anything was read.
    fn read_some(&mut self) -> Result<bool, String> {
        let space = self.rx.space();
        if space.is_empty() {
            return Ok(false);
        }
        match (&self.stream).read(space) {
            Ok(0) => Err("vsockd closed the connection (EOF)".to_owned()),
            Ok(count) => {
                self.rx.end += count;
                Ok(true)
            }
            Err(err) => match err.kind() {
                io::ErrorKind::WouldBlock => Ok(false),
                io::ErrorKind::Interrupted => Ok(true),
                _ => Err(format!("reading from vsockd: {err}")),
            },
        }
    }

    /// Checks and applies every whole frame in `rx`. An error is a break.
    fn apply_received(&mut self, shared: &Shared, state: &mut State) -> Result<(), String> {
        self.rx_blocked = false;
        let mut changed = false;
        let result = loop {
            let bytes = self.rx.filled();
            let Some(header_bytes) = bytes.first_chunk::<FRAME_HEADER_BYTES>() else {
                break Ok(());
            };
            let header = match FrameHeader::decode(header_bytes) {
                Ok(header) => header,
                Err(fault) => break Err(format!("bad frame from vsockd: {fault}")),
            };
            let total = header.frame_bytes();
            if bytes.len() < total {
                break Ok(());
            }
            let payload = &bytes[FRAME_HEADER_BYTES..total];
            if let Err(fault) = header.verify(payload) {
                break Err(format!(
                    "bad {:?} frame from vsockd at offset {}: {fault}",
                    header.kind, header.offset
                ));
            }
            match header.kind {
                FrameKind::Data => {
                    if let Some(end) = state.g2h.end {
                        break Err(format!("DATA frame from vsockd after END at {end}"));
                    }
                    let expected = state.g2h.delivered();
                    if header.offset != expected {
                        break Err(format!(
                            "DATA frame from vsockd at offset {}, expected {expected}",
                            header.offset
                        ));
                    }
                    if state.g2h.pending.free() < payload.len() {
                        self.rx_blocked = true;
                        state.g2h.stub_needs_space = true;
                        break Ok(());
                    }
                    state.g2h.pending.push(payload);
                }
                FrameKind::Ack => {
                    let limit = self.wire_sent + u64::from(self.end_sent);
                    if header.offset > limit {
                        break Err(format!(
                            "ACK from vsockd at offset {}, past the {limit} sent",
                            header.offset
                        ));
                    }
                    state.h2g.acknowledge(header.offset);
                }
                FrameKind::End => {
                    let expected = state.g2h.delivered();
                    if state.g2h.end.is_some() || header.offset != expected {
                        break Err(format!(
                            "END frame from vsockd at offset {}, expected one at {expected}",
                            header.offset
                        ));
                    }
                    state.g2h.end = Some(header.offset);
                }
                FrameKind::Error => {
                    let message = String::from_utf8_lossy(payload).into_owned();
                    let reason = format!("vsockd reported an error: {message}");
                    state.last_error_frame = Some(message);
                    break Err(reason);
                }
                FrameKind::Abort => break Err("ABORT frame from vsockd".to_owned()),
            }
            debug!(
                "received {:?} frame: offset {}, {} bytes",
                header.kind, header.offset, header.len
            );
            changed = true;
            self.rx.consume(total);
        };
        if changed {
            shared.notify();
        }
        result
    }
}

/// The part of a frame (header, then payload in up to two slices) after
/// its first `written` bytes: the parts with something left, each from
/// where it was left. Finished parts become empty slices.
fn unwritten<'a>(
    header: &'a [u8; FRAME_HEADER_BYTES],
    payload: [&'a [u8]; 2],
    written: usize,
) -> [IoSlice<'a>; 3] {
    let mut skip = written;
    [&header[..], payload[0], payload[1]].map(|part| {
        let from = skip.min(part.len());
        skip -= from;
        IoSlice::new(&part[from..])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unwritten_skips_whole_and_partial_parts() {
        let header = [7u8; FRAME_HEADER_BYTES];
        let payload: [&[u8]; 2] = [b"abc", b"de"];
        let join = |slices: [IoSlice<'_>; 3]| -> Vec<u8> {
            slices.iter().flat_map(|s| s.iter().copied()).collect()
        };
        assert_eq!(join(unwritten(&header, payload, 0)).len(), 29);
        assert_eq!(join(unwritten(&header, payload, 23)), b"\x07abcde");
        assert_eq!(join(unwritten(&header, payload, 24)), b"abcde");
        assert_eq!(join(unwritten(&header, payload, 26)), b"cde");
        assert_eq!(join(unwritten(&header, payload, 27)), b"de");
        assert!(join(unwritten(&header, payload, 29)).is_empty());
    }
}
