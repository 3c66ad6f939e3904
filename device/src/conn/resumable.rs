//! A resumable session's host side: frames read from and written to the
//! host stream (see `crate::session` for the state and its invariants, and
//! `docs/resumable-sessions.md` for the wire format).
//!
//! Reading. The head of the stream is peeked, never consumed, until what
//! it holds is complete: a control frame (24 bytes) is then read and
//! applied; a `DATA` frame is read only once all of it is in the socket
//! (`FIONREAD`), straight into guest buffers when the guest has credit and
//! buffers for all of it, else into the staging buffer. Its checksum is
//! checked before any of its bytes is published. So between two calls the
//! stream always sits on a frame boundary: nothing read is half applied.
//!
//! Writing. One frame at a time leaves the writer, and the next is chosen
//! only once it is written whole: an owed `ACK`, then `DATA` from the
//! buffer of unacknowledged guest bytes (at most 64 KiB each), then the
//! `END` once the guest shut down its sending side and every byte before
//! it was framed.
//!
//! Anything wrong with the stream (EOF, an I/O error, a bad frame) sets
//! `broken`; the muxer then detaches the session (or ends it) and nothing
//! else is read or written on that stream.

use std::io;
use std::num::Wrapping;

use log::debug;

use super::{owe, Broken, ConnError, Connection, State};
use crate::host::HostStream;
use crate::iov::{peek_fd, queued_fd, read_fd, write_fd, GuestIovs, IovWindow};
use crate::packet::*;
use crate::session::*;
use vsockd_persist::resume::ResumeRecord;

/// What the head of the host stream holds.
enum Head {
    /// Not a complete header yet (or the stream broke).
    Nothing,
    /// The client closed its stream.
    Eof,
    Frame(Frame),
}

impl<S: HostStream> Connection<S> {
    /// Marks the session's stream broken (the first reason wins).
    pub(crate) fn break_stream(&mut self, reason: String, tell: bool) {
        self.host_readable = false;
        if self.broken.is_none() {
            self.broken = Some(Broken {
                reason,
                tell,
                end: false,
            });
        }
    }

    /// Ends the session: the guest gets an RST, the token is forgotten.
    pub(crate) fn end_session(&mut self, reason: String, tell: bool) {
        self.host_readable = false;
        self.broken = Some(Broken {
            reason,
            tell,
            end: true,
        });
    }

    fn attached(&self) -> bool {
        self.stream.is_some() && self.broken.is_none()
    }

    /// h2g offset the next `DATA` frame must start at.
    fn h2g_next(&self) -> u64 {
        self.session
            .as_ref()
            .map_or(0, |s| s.h2g_offset(self.tx_cnt.0) + s.staging.len() as u64)
    }

    /// h2g offset to acknowledge: what the guest has, plus the `END` once
    /// the guest was told.
    pub(crate) fn h2g_ack_value(&self) -> u64 {
        let ended = self.local_shutdown & SHUTDOWN_SEND != 0;
        self.session
            .as_ref()
            .map_or(0, |s| s.h2g_offset(self.tx_cnt.0) + u64::from(ended))
    }

    /// The answer to a `RESUME`: the h2g offset vsockd has, the client's
    /// `END` included (with the word `END`) once it was read.
    pub(crate) fn resume_reply(&self) -> String {
        let bytes = self
            .session
            .as_ref()
            .map_or(0, |s| s.h2g_offset(self.tx_cnt.0));
        if self.host_eof {
            format!("OK {} END\n", bytes + 1)
        } else {
            format!("OK {bytes}\n")
        }
    }

    /// g2h offsets: (acknowledged, received from the guest).
    pub(crate) fn g2h_window(&self) -> (u64, u64) {
        let acked = self
            .session
            .as_ref()
            .map_or(0, |s| s.g2h_acked(self.fwd_cnt.0));
        (acked, acked + u64::from((self.rx_cnt - self.fwd_cnt).0))
    }

    /// The g2h offset just past everything a client may have received: the
    /// bytes from the guest, and their `END` once the guest shut down.
    pub(crate) fn g2h_end(&self) -> u64 {
        let ended = self.peer_shutdown & SHUTDOWN_SEND != 0;
        self.g2h_window().1 + u64::from(ended)
    }

    pub(super) fn session_can_send(&self) -> bool {
        let Some(s) = &self.session else { return false };
        matches!(self.state, State::Established)
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
            && (!s.staging.is_empty() || (self.attached() && self.host_readable))
    }

    /// Attaches `stream`, kept under `stream_uid`, to this session, whose
    /// new client has the g2h bytes before `received` (the caller checked
    /// it lies in `[acknowledged, g2h_end]`): they count as acknowledged,
    /// and frames go on from there.
    pub(crate) fn attach(&mut self, stream: S, stream_uid: u64, received: u64) {
        let (_, have) = self.g2h_window();
        if let Some(s) = &mut self.session {
            s.drop_link_state();
            s.stream_uid = stream_uid;
            s.detached_at_ns = 0;
            s.g2h_sent = received.min(have);
            s.end_sent = received > have;
        }
        self.stream = Some(stream);
        self.broken = None;
        self.host_readable = true;
        self.host_rdhup = false;
        self.host_hup = false;
        self.apply_client_ack(received);
        let ack = self.h2g_ack_value();
        if let Some(s) = &mut self.session {
            s.acked_sent = ack;
        }
    }

    /// Guest payload of a resumable session: copied into the buffer, where
    /// it stays until the client acknowledges it, then framed.
    pub(super) fn session_on_rw(
        &mut self,
        pkt: &GuestIovs<'_>,
        len: usize,
    ) -> Result<(), ConnError> {
        let free = self.txbuf.free();
        self.txbuf
            .push_guest(pkt, HEADER_SIZE_BYTES, len, self.rx_cnt.0)
            .map_err(|()| ConnError::CreditExceeded { len, free })?;
        self.session_write();
        Ok(())
    }

    /// Applies the client's acknowledgement of g2h offset `ack`: the bytes
    /// before it leave the buffer and their credit goes back to the guest.
    fn apply_client_ack(&mut self, ack: u64) {
        let (acked, received) = self.g2h_window();
        let Some(s) = &mut self.session else { return };
        let max = s.g2h_sent + u64::from(s.end_sent);
        if ack < acked || ack > max {
            return self.break_stream(
                format!(
                    "ACK {ack} outside what was sent and not yet acknowledged ({acked} to {max})"
                ),
                true,
            );
        }
        if ack > received {
            s.end_acked = true;
        }
        let n = (ack.min(received) - acked) as usize;
        self.txbuf.release(n);
        self.fwd_cnt += Wrapping(n as u32);
    }

    /// The client's `END` at `offset`: once every byte before it is in the
    /// guest, the guest reads EOF.
    fn take_client_end(&mut self, offset: u64) {
        let next = self.h2g_next();
        if self.host_eof || self.session.as_ref().is_some_and(|s| s.end_pending) {
            return self.break_stream("a second END".to_string(), true);
        }
        if offset != next {
            return self.break_stream(format!("END at offset {offset}, expected {next}"), true);
        }
        if let Some(s) = &mut self.session {
            s.end_pending = true;
        }
        self.finish_client_end();
    }

    /// Passes a pending client `END` on once nothing is staged before it.
    fn finish_client_end(&mut self) {
        let Some(s) = &mut self.session else { return };
        if !s.end_pending || !s.staging.is_empty() {
            return;
        }
        s.end_pending = false;
        self.host_eof = true;
        self.host_readable = false;
        self.shutdown_flags |= SHUTDOWN_SEND;
        debug!("{}: client END: owe SHUTDOWN(SEND)", self.key);
        self.owe(owe::SHUTDOWN);
    }

    /// Peeks at the head of the host stream.
    fn peek_head(&mut self) -> Head {
        let Some(fd) = self.fd().filter(|_| self.broken.is_none()) else {
            return Head::Nothing;
        };
        let mut raw = [0u8; FRAME_HEADER_BYTES];
        match peek_fd(fd, &mut raw) {
            Ok(0) => Head::Eof,
            Ok(n) if n < FRAME_HEADER_BYTES => {
                if self.host_rdhup {
                    // The client went away in the middle of a header.
                    return Head::Eof;
                }
                self.host_readable = false;
                Head::Nothing
            }
            Ok(_) => match Frame::parse_from_client(&raw) {
                Ok(f) => Head::Frame(f),
                Err(e) => {
                    self.break_stream(format!("bad frame header: {e}"), true);
                    Head::Nothing
                }
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.host_readable = false;
                Head::Nothing
            }
            Err(e) => {
                self.break_stream(format!("read: {e}"), false);
                Head::Nothing
            }
        }
    }

    /// True when all of frame `f` is in the socket; otherwise waits for
    /// more (or breaks the stream if the client left mid-frame).
    fn frame_arrived(&mut self, f: &Frame) -> bool {
        let Some(fd) = self.fd() else { return false };
        let need = FRAME_HEADER_BYTES + f.len as usize;
        match queued_fd(fd) {
            Ok(n) if n >= need => true,
            Ok(_) if self.host_rdhup => {
                self.break_stream(
                    "the client left in the middle of a frame".to_string(),
                    false,
                );
                false
            }
            Ok(_) => {
                self.host_readable = false;
                false
            }
            Err(e) => {
                self.break_stream(format!("FIONREAD: {e}"), false);
                false
            }
        }
    }

    /// Reads exactly `buf.len()` bytes that are known to be in the socket.
    fn read_known(&mut self, buf: &mut [u8]) -> bool {
        let Some(fd) = self.fd() else { return false };
        let mut got = 0;
        while got < buf.len() {
            match read_fd(fd, &mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) => {
                    self.break_stream(format!("read: {e}"), false);
                    return false;
                }
            }
        }
        if got < buf.len() {
            self.break_stream(
                format!("{got} of {} bytes the socket held could be read", buf.len()),
                false,
            );
            return false;
        }
        true
    }

    /// Consumes and applies control frame `f` (whose header is complete in
    /// the socket). False when the stream broke or the session ended.
    fn take_control_frame(&mut self, f: Frame) -> bool {
        let mut raw = [0u8; FRAME_HEADER_BYTES];
        if !self.read_known(&mut raw) {
            return false;
        }
        if !f.verify(f.checksum_start()) {
            self.break_stream(format!("bad checksum in a {:?} frame", f.kind), true);
            return false;
        }
        debug!("{}: client {:?} {}", self.key, f.kind, f.offset);
        match f.kind {
            Kind::Ack => self.apply_client_ack(f.offset),
            Kind::End => self.take_client_end(f.offset),
            Kind::Abort => self.end_session("the client aborted the session".to_string(), false),
            Kind::Data | Kind::Error => {
                self.break_stream(format!("unexpected {:?} frame", f.kind), true)
            }
        }
        self.broken.is_none()
    }

    /// Checks where `DATA` frame `f` lies: at the next offset, inside the
    /// window. False (the stream broken) if not.
    fn data_in_place(&mut self, f: &Frame) -> bool {
        let next = self.h2g_next();
        if self.host_eof || self.session.as_ref().is_some_and(|s| s.end_pending) {
            self.break_stream("DATA after END".to_string(), true);
            return false;
        }
        if f.offset != next {
            self.break_stream(
                format!("DATA at offset {}, expected {next}", f.offset),
                true,
            );
            return false;
        }
        let delivered =
            self.h2g_next() - self.session.as_ref().map_or(0, |s| s.staging.len() as u64);
        if f.offset + u64::from(f.len) > delivered + H2G_WINDOW_BYTES {
            self.break_stream(
                format!(
                    "DATA up to offset {} exceeds the window ({H2G_WINDOW_BYTES} bytes past {delivered})",
                    f.offset + u64::from(f.len)
                ),
                true,
            );
            return false;
        }
        true
    }

    /// Reads `DATA` frame `f` into the staging buffer and checks it. False
    /// when it is not all there yet, or the stream broke.
    fn stage_frame(&mut self, f: Frame) -> bool {
        if !self.data_in_place(&f) || !self.frame_arrived(&f) {
            return false;
        }
        let mut raw = [0u8; FRAME_HEADER_BYTES];
        if !self.read_known(&mut raw) {
            return false;
        }
        let len = f.len as usize;
        let Some(fd) = self.fd() else { return false };
        let Some(s) = &mut self.session else {
            return false;
        };
        let area = s.staging.reserve(len);
        let mut got = 0;
        let mut failed = None;
        while got < len {
            match read_fd(fd, &mut area[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let mut sum = f.checksum_start();
        sum.update(area);
        let good = got == len && f.verify(sum);
        if !good {
            s.staging.truncate(len);
            let why = match failed {
                Some(e) => format!("read: {e}"),
                None if got < len => format!("{got} of the {len} bytes of a frame could be read"),
                None => format!("bad checksum in the DATA frame at offset {}", f.offset),
            };
            self.break_stream(why, true);
            return false;
        }
        debug!("{}: staged DATA {}+{len}", self.key, f.offset);
        true
    }

    /// Frames the host client sent, read outside an RX batch (the stream
    /// became readable): control frames are applied; a `DATA` frame the
    /// guest can take now is left for the RX path (zero copy), one it
    /// cannot is staged, so the frames behind it are read.
    pub(crate) fn session_read_host(&mut self) {
        if !matches!(self.state, State::Established) || self.session.is_none() {
            return;
        }
        while self.attached() {
            match self.peek_head() {
                Head::Nothing => break,
                Head::Eof => {
                    self.break_stream("the client closed its stream".to_string(), false);
                    break;
                }
                Head::Frame(f) if f.kind == Kind::Data => {
                    let staged = self.session.as_ref().map_or(0, |s| s.staging.len());
                    let guest_takes = self.peer_shutdown & SHUTDOWN_RCV == 0
                        && staged == 0
                        && self.peer_credit() as usize >= f.len as usize;
                    if guest_takes {
                        self.host_readable = true;
                        break;
                    }
                    if !self.stage_frame(f) {
                        break;
                    }
                }
                Head::Frame(f) => {
                    if !self.take_control_frame(f) {
                        break;
                    }
                }
            }
        }
        self.settle();
    }

    /// The RX path of a resumable session: fills guest buffers from the
    /// staging buffer, then with whole checked `DATA` frames from the
    /// stream, applying the control frames between them. Returns the
    /// buffers filled.
    pub(super) fn session_fill(
        &mut self,
        guest_cid: u64,
        bufs: &[GuestIovs<'_>],
        lens: &mut [usize],
        scratch: &mut Vec<libc::iovec>,
    ) -> Result<usize, ConnError> {
        let mut filled = 0;
        while filled < bufs.len() {
            let staged = self.session.as_ref().map_or(0, |s| s.staging.len());
            if staged > 0 {
                filled += self.fill_from_staging(guest_cid, &bufs[filled..], &mut lens[filled..]);
                if self.session.as_ref().is_some_and(|s| !s.staging.is_empty()) {
                    break;
                }
                self.finish_client_end();
                continue;
            }
            if !self.attached() || !self.host_readable || self.peer_credit() == 0 || self.host_eof {
                break;
            }
            match self.peek_head() {
                Head::Nothing => break,
                Head::Eof => {
                    self.break_stream("the client closed its stream".to_string(), false);
                    break;
                }
                Head::Frame(f) if f.kind == Kind::Data => {
                    if !self.data_in_place(&f) || !self.frame_arrived(&f) {
                        break;
                    }
                    let k = self.fill_direct(
                        f,
                        guest_cid,
                        &bufs[filled..],
                        &mut lens[filled..],
                        scratch,
                    );
                    if k > 0 {
                        filled += k;
                    } else if self.broken.is_some() || !self.stage_frame(f) {
                        break;
                    }
                }
                Head::Frame(f) => {
                    if !self.take_control_frame(f) {
                        break;
                    }
                }
            }
        }
        if filled > 0 {
            let value = self.h2g_ack_value();
            // Nothing more waiting: the client may be waiting for this ACK.
            let drained = !self.host_readable
                || self
                    .fd()
                    .is_none_or(|fd| queued_fd(fd).is_ok_and(|n| n == 0));
            if let Some(s) = &mut self.session {
                if value - s.acked_sent >= ACK_EVERY_BYTES || drained {
                    s.ack_after_publish = true;
                }
            }
        }
        self.settle();
        Ok(filled)
    }

    /// Payload room of an RX buffer.
    fn rx_room(b: &GuestIovs<'_>) -> usize {
        b.len()
            .saturating_sub(HEADER_SIZE_BYTES)
            .min(MAX_PAYLOAD_BYTES)
    }

    /// Gives the guest staged bytes, as many as its credit and `bufs`
    /// take. Returns the buffers filled.
    fn fill_from_staging(
        &mut self,
        guest_cid: u64,
        bufs: &[GuestIovs<'_>],
        lens: &mut [usize],
    ) -> usize {
        let mut filled = 0;
        for (b, len) in bufs.iter().zip(lens.iter_mut()) {
            let credit = self.peer_credit() as usize;
            let Some(s) = &mut self.session else { break };
            let n = Self::rx_room(b).min(credit).min(s.staging.len());
            if n == 0 {
                break;
            }
            b.write_at(HEADER_SIZE_BYTES, &s.staging.bytes()[..n]);
            s.staging.consume(n);
            self.put_rw_header(guest_cid, b, n);
            self.tx_cnt += Wrapping(n as u32);
            *len = HEADER_SIZE_BYTES + n;
            filled += 1;
        }
        filled
    }

    /// Reads `DATA` frame `f`, all of it in the socket, straight into the
    /// payload areas of `bufs` and checks it there; only then are their
    /// headers written. Returns the buffers filled: 0 when the guest has no
    /// room for all of it now (nothing read), or the frame failed its check
    /// (the stream broken; the buffers go back unused).
    fn fill_direct(
        &mut self,
        f: Frame,
        guest_cid: u64,
        bufs: &[GuestIovs<'_>],
        lens: &mut [usize],
        scratch: &mut Vec<libc::iovec>,
    ) -> usize {
        let len = f.len as usize;
        if (self.peer_credit() as usize) < len {
            return 0;
        }
        let mut raw = [0u8; FRAME_HEADER_BYTES];
        scratch.clear();
        scratch.push(libc::iovec {
            iov_base: raw.as_mut_ptr().cast(),
            iov_len: raw.len(),
        });
        let mut sizes = [0usize; super::MAX_RX_BATCH];
        let mut gathered = 0;
        let mut used = 0;
        for (b, size) in bufs.iter().zip(sizes.iter_mut()) {
            if gathered == len {
                break;
            }
            let want = Self::rx_room(b).min(len - gathered);
            let got = b.append_window(HEADER_SIZE_BYTES, want, scratch);
            *size = got;
            gathered += got;
            used += 1;
            if got < want {
                break;
            }
        }
        if gathered < len {
            return 0;
        }
        let Some(fd) = self.fd() else { return 0 };
        let window = IovWindow::gathered(scratch, FRAME_HEADER_BYTES + len);
        match window.readv_from(fd) {
            Ok(n) if n == FRAME_HEADER_BYTES + len => {}
            Ok(n) => {
                self.break_stream(
                    format!(
                        "{n} of the {} bytes of a frame could be read",
                        FRAME_HEADER_BYTES + len
                    ),
                    false,
                );
                return 0;
            }
            Err(e) => {
                self.break_stream(format!("read: {e}"), false);
                return 0;
            }
        }
        let mut sum = f.checksum_start();
        for (b, &size) in bufs.iter().zip(&sizes[..used]) {
            b.read_chunks(HEADER_SIZE_BYTES, size, |c| sum.update(c));
        }
        if !f.verify(sum) {
            self.break_stream(
                format!("bad checksum in the DATA frame at offset {}", f.offset),
                true,
            );
            return 0;
        }
        for (i, &size) in sizes[..used].iter().enumerate() {
            self.put_rw_header(guest_cid, &bufs[i], size);
            lens[i] = HEADER_SIZE_BYTES + size;
        }
        self.tx_cnt += Wrapping(len as u32);
        debug!("{}: DATA {}+{len} into {used} buffers", self.key, f.offset);
        used
    }

    /// Writes what the session owes the host client, frame after frame,
    /// until the stream is full or nothing is owed.
    pub(crate) fn session_write(&mut self) {
        let Some(fd) = self.fd() else { return };
        while self.broken.is_none() {
            if self.session.as_ref().is_some_and(|s| s.out.is_none()) {
                match self.next_out_frame() {
                    Some(out) => {
                        if let Some(s) = &mut self.session {
                            s.out = Some(out);
                        }
                    }
                    None => return,
                }
            }
            let Some(out) = self.session.as_ref().and_then(|s| s.out) else {
                return;
            };
            let header = &out.header[out.written.min(FRAME_HEADER_BYTES)..];
            let payload_done = out.written.saturating_sub(FRAME_HEADER_BYTES);
            let payload_left = out.frame.len as usize - payload_done;
            let (a, b) = if out.frame.kind == Kind::Data && payload_left > 0 {
                let (acked, _) = self.g2h_window();
                let from = self.fwd_cnt
                    + Wrapping((out.frame.offset + payload_done as u64 - acked) as u32);
                match self.txbuf.slices(from.0, payload_left, self.rx_cnt.0) {
                    Some(s) => s,
                    None => {
                        return self.break_stream(
                            format!("frame at {} is no longer buffered", out.frame.offset),
                            false,
                        )
                    }
                }
            } else {
                (&[][..], &[][..])
            };
            match write_fd(fd, &[header, a, b]) {
                Ok(n) => {
                    let Some(s) = &mut self.session else { return };
                    let Some(o) = &mut s.out else { return };
                    o.written += n;
                    if o.written < o.total() {
                        return;
                    }
                    s.out = None;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => return self.break_stream(format!("write: {e}"), false),
            }
        }
    }

    /// The next frame to write, if any: an owed `ACK`, `DATA`, the `END`.
    fn next_out_frame(&mut self) -> Option<OutFrame> {
        let ack = self.h2g_ack_value();
        let (_, received) = self.g2h_window();
        let guest_ended = self.peer_shutdown & SHUTDOWN_SEND != 0;
        let s = self.session.as_mut()?;
        if s.ack_owed {
            s.ack_owed = false;
            if ack > s.acked_sent {
                s.acked_sent = ack;
                return Some(OutFrame::new(Frame::bare(Kind::Ack, ack)));
            }
        }
        let sent = s.g2h_sent;
        if sent < received {
            let len = (received - sent).min(MAX_DATA_PAYLOAD_BYTES as u64) as u32;
            let frame = self.data_frame(sent, len)?;
            if let Some(s) = &mut self.session {
                s.g2h_sent += u64::from(len);
            }
            return Some(OutFrame::new(frame));
        }
        let s = self.session.as_mut()?;
        if guest_ended && !s.end_sent && !s.end_acked {
            s.end_sent = true;
            return Some(OutFrame::new(Frame::bare(Kind::End, received)));
        }
        None
    }

    /// A sealed `DATA` frame header for the g2h bytes `[offset, offset +
    /// len)`, checksummed from the buffer; `None` if they are not all
    /// buffered.
    fn data_frame(&mut self, offset: u64, len: u32) -> Option<Frame> {
        let (acked, _) = self.g2h_window();
        let from = self.fwd_cnt + Wrapping(offset.checked_sub(acked)? as u32);
        let mut frame = Frame::new(Kind::Data, offset, len);
        let mut sum = frame.checksum_start();
        let (a, b) = self.txbuf.slices(from.0, len as usize, self.rx_cnt.0)?;
        sum.update(a);
        sum.update(b);
        frame.seal(sum);
        Some(frame)
    }

    /// Rebuilds the frame a quiesced predecessor was writing (a hand-over):
    /// its header again, the checksum from the buffered bytes.
    pub(crate) fn rebuild_out_frame(
        &mut self,
        kind: Kind,
        offset: u64,
        len: u32,
        written: usize,
    ) -> bool {
        let frame = match kind {
            Kind::Data => match self.data_frame(offset, len) {
                Some(f) => f,
                None => return false,
            },
            other => Frame::bare(other, offset),
        };
        let out = OutFrame {
            written,
            ..OutFrame::new(frame)
        };
        if written > out.total() {
            return false;
        }
        if let Some(s) = &mut self.session {
            s.out = Some(out);
        }
        true
    }

    /// The session's record to keep (renewing its base pairs first when
    /// they span too much); `None` if it is not a session.
    pub(crate) fn resume_record(&mut self) -> Option<ResumeRecord> {
        let (tx_cnt, fwd_cnt, uid) = (self.tx_cnt.0, self.fwd_cnt.0, self.uid);
        let s = self.session.as_mut()?;
        s.rebase(tx_cnt, fwd_cnt);
        Some(s.record(uid))
    }

    /// The session's record for a successor in an upgrade, with the
    /// writer's position.
    pub(crate) fn handover_record(&mut self) -> Option<ResumeRecord> {
        let (tx_cnt, fwd_cnt, uid) = (self.tx_cnt.0, self.fwd_cnt.0, self.uid);
        let s = self.session.as_mut()?;
        s.rebase(tx_cnt, fwd_cnt);
        Some(s.handover_record(uid))
    }

    /// A resumable session's part of `settle`: it closes once both streams
    /// ended and each side acknowledged the other's `END`; the guest
    /// closing before the client's stream ended ends it too.
    pub(super) fn settle_session(&mut self) {
        if self.is_closing() || self.broken.as_ref().is_some_and(|b| b.end) {
            return;
        }
        let ack = self.h2g_ack_value();
        let Some(s) = &self.session else { return };
        let g2h_done = self.peer_shutdown & SHUTDOWN_SEND != 0 && s.end_acked;
        let h2g_told = self.local_shutdown & SHUTDOWN_SEND != 0;
        let h2g_done = h2g_told
            && s.acked_sent >= ack
            && s.out.is_none()
            && !s.ack_owed
            && !s.ack_after_publish;
        let h2g_ending = self.host_eof || s.end_pending;
        if g2h_done && h2g_done {
            debug!("{}: both streams ended and acknowledged: closing", self.key);
            self.reset();
        } else if g2h_done && self.peer_shutdown & SHUTDOWN_RCV != 0 && !h2g_ending {
            self.end_session(
                "the guest closed the connection before the client's stream ended".to_string(),
                true,
            );
        }
    }
}
