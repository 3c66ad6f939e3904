//! One guest connection bridged to one host stream: the state machine and
//! its credit accounting (virtio 1.2, 5.10.6.3).
//!
//! States:
//!
//! ```text
//!   host client connects                 guest REQUEST
//!          |                                   |
//!          v                                   v
//!     AwaitLine --CONNECT <port>--> LocalInit  Connecting
//!                 (owe REQUEST)        |       |   host connect ok
//!                          guest RESPONSE      |   (owe RESPONSE)
//!                          (write "OK <p>")    v
//!                                  +----> Established
//! ```
//!
//! `Connecting` is recorded, with the host stream already kept, before the
//! host connect is made: a successor that finds it repeats the connect on
//! that same socket, which either completes it or finds it done (EISCONN),
//! so a host service never sees one guest connect twice. A failed connect
//! owes the guest an RST.
//!
//! A connection leaves the table when the guest sends RST, or right after we
//! send one (owed on any error, on a guest protocol violation, or when both
//! sides have shut down). Half-closes are tracked per direction:
//! `peer_shutdown` holds the guest's SHUTDOWN flags, `local_shutdown` the
//! flags we sent. A guest SEND shutdown becomes `shutdown(SHUT_WR)` on the
//! host stream once every byte before it reached the host; host EOF becomes
//! a SHUTDOWN(SEND) to the guest once every byte before it reached the guest.
//!
//! A host client that asked for a resumable session (`CONNECT <port>
//! resumable`) has a [`Session`]: its host stream carries frames, and its
//! guest-to-host bytes stay in the buffer until the client acknowledges
//! them (see `crate::session` and `resumable`); its stream may be absent
//! while no client is attached.
//!
//! Credit invariants, with all counters wrapping u32 as on the wire:
//! * guest to host: `rx_cnt - fwd_cnt == parked.bytes() + txbuf.len() <=
//!   buf_alloc`; `fwd_cnt` counts bytes the host stream accepted. Bytes the
//!   host stream has not taken wait in guest memory, in TX chains parked on
//!   the connection (see `parked`), or, past the parking limits, in our
//!   buffer; either way a slow host reader holds at most `buf_alloc` bytes,
//!   and parked bytes come before buffered ones.
//! * host to guest: we read from the host only what the guest has room for,
//!   `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`; the rest waits in the host
//!   socket, which pushes back on the host writer.

mod resumable;

use std::io;
use std::num::Wrapping;
use std::os::fd::RawFd;

use log::{debug, warn};

use crate::host::HostStream;
use crate::iov::{write_fd, GuestIovs, IovWindow};
use crate::packet::*;
use crate::parked::Parked;
use crate::phase::ConnPhase;
use crate::session::Session;
use crate::txbuf::TxBuf;
use crate::ConnKey;
use vsockd_persist::slot::ConnRecord;

/// [`ConnRecord::state`] values.
pub(crate) mod rec_state {
    pub const AWAIT_LINE: u8 = 1;
    pub const LOCAL_INIT: u8 = 2;
    pub const ESTABLISHED: u8 = 3;
    pub const CLOSING: u8 = 4;
    pub const CONNECTING: u8 = 5;
}

/// [`ConnRecord::host_flags`] bits.
pub(crate) mod rec_host {
    pub const EOF: u8 = 1;
    pub const WRITE_SHUT: u8 = 2;
}

/// Control packets a connection owes the guest, as bits.
pub(crate) mod owe {
    pub const REQUEST: u8 = 1;
    pub const RESPONSE: u8 = 2;
    pub const SHUTDOWN: u8 = 4;
    pub const CREDIT_UPDATE: u8 = 8;
    pub const RST: u8 = 16;
}

/// Where a connection is in its life.
#[derive(Debug)]
pub(crate) enum State {
    /// A host client connected; its `CONNECT <port>` line is not complete
    /// yet (what it sent of it waits in the socket).
    AwaitLine,
    /// The guest sent REQUEST; the connect to the host service is being
    /// made.
    Connecting,
    /// REQUEST owed or sent to the guest; waiting for RESPONSE.
    LocalInit,
    /// Data flows.
    Established,
    /// RST owed or sent: every further packet is ignored until removal.
    Closing,
}

/// Why a connection must be reset.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnError {
    #[error("host stream write failed: {0}")]
    HostWrite(#[source] io::Error),
    #[error("host stream read failed: {0}")]
    HostRead(#[source] io::Error),
    #[error("guest sent {len} bytes with only {free} bytes of credit left")]
    CreditExceeded { len: usize, free: usize },
    #[error("could not send the OK line to the host client: {0}")]
    OkLine(#[source] io::Error),
}

/// What filling RX buffers produced.
pub(crate) struct RxFill {
    /// Buffers filled, from the first one given.
    pub buffers: usize,
    /// The packet was an RST: remove the connection.
    pub close: bool,
}

/// Most RX buffers one `readv` fills.
pub const MAX_RX_BATCH: usize = 64;

/// Why a resumable session's stream must be dropped.
#[derive(Debug)]
pub(crate) struct Broken {
    /// For the log.
    pub reason: String,
    /// Tell the client first, with an `ERROR` frame carrying the reason.
    pub tell: bool,
    /// The session is over (the guest is reset, the token forgotten).
    pub end: bool,
}

/// One connection.
pub(crate) struct Connection<S> {
    /// The host stream; `None` only for a detached resumable session.
    pub stream: Option<S>,
    pub state: State,
    pub key: ConnKey,
    // Guest to host.
    buf_alloc: u32,
    fwd_cnt: Wrapping<u32>,
    rx_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    pub parked: Parked,
    txbuf: TxBuf,
    // Host to guest.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    tx_cnt: Wrapping<u32>,
    // Host stream readiness (edge-triggered) and ends.
    pub host_readable: bool,
    /// The host shut down its writing side (EPOLLRDHUP): EOF is ahead, so
    /// the stream stays readable until it is read.
    pub host_rdhup: bool,
    /// The host closed the stream entirely (EPOLLHUP).
    pub host_hup: bool,
    host_eof: bool,
    host_write_shut: bool,
    // Shutdown flags received from and sent to the guest.
    peer_shutdown: u32,
    local_shutdown: u32,
    owed: u8,
    shutdown_flags: u32,
    pub in_rx_queue: bool,
    // Persistence (with a store; see `crate::store`).
    /// Unique id, also the id its host stream is kept under (0: none).
    pub uid: u64,
    /// Inflight counter of the last TX chain applied.
    pub last_tx_counter: u64,
    /// The RX batch of its last RX commit.
    pub rx_batch: u64,
    /// Changed by the RX batch being filled.
    pub rx_dirty: bool,
    /// The record last committed.
    pub committed: Option<ConnRecord>,
    /// The resumable session, if it is one.
    pub session: Option<Box<Session>>,
    /// Its stream broke: the muxer detaches it (or ends it).
    pub broken: Option<Broken>,
    /// The session record last committed.
    pub resume_committed: Option<vsockd_persist::resume::ResumeRecord>,
}

impl<S: HostStream> Connection<S> {
    fn new(stream: S, state: State, key: ConnKey, buf_alloc: u32) -> Self {
        let mut c = Self::new_without_stream(state, key, buf_alloc);
        c.stream = Some(stream);
        c
    }

    fn new_without_stream(state: State, key: ConnKey, buf_alloc: u32) -> Self {
        Connection {
            stream: None,
            state,
            key,
            buf_alloc,
            fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            parked: Parked::default(),
            txbuf: TxBuf::new(buf_alloc as usize),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            host_readable: false,
            host_rdhup: false,
            host_hup: false,
            host_eof: false,
            host_write_shut: false,
            peer_shutdown: 0,
            local_shutdown: 0,
            owed: 0,
            shutdown_flags: 0,
            in_rx_queue: false,
            uid: 0,
            last_tx_counter: 0,
            rx_batch: 0,
            rx_dirty: false,
            committed: None,
            session: None,
            broken: None,
            resume_committed: None,
        }
    }

    /// The host stream's descriptor, if it has one.
    pub fn fd(&self) -> Option<RawFd> {
        self.stream.as_ref().map(|s| s.as_raw_fd())
    }

    /// The fd-store uid its host stream is kept under, if it has one.
    pub fn stream_uid(&self) -> Option<u64> {
        self.stream.as_ref()?;
        Some(self.session.as_ref().map_or(self.uid, |s| s.stream_uid))
    }

    /// A host client that has yet to send its CONNECT line.
    pub fn new_host_client(stream: S, buf_alloc: u32) -> Self {
        Self::new(stream, State::AwaitLine, ConnKey::default(), buf_alloc)
    }

    /// A guest connect, with the stream for its host connect not yet
    /// connected.
    pub fn new_guest_initiated(
        stream: S,
        key: ConnKey,
        hdr: &PacketHeader,
        buf_alloc: u32,
    ) -> Self {
        let mut c = Self::new(stream, State::Connecting, key, buf_alloc);
        c.update_peer_credit(hdr);
        c
    }

    /// The host connect of a guest connect succeeded: owe RESPONSE.
    pub fn host_connected(&mut self) {
        if matches!(self.state, State::Connecting) {
            self.state = State::Established;
            self.owed |= owe::RESPONSE;
        }
    }

    /// The host client sent `CONNECT <port>`: owe the guest a REQUEST.
    pub fn start_local_init(&mut self, key: ConnKey) {
        self.key = key;
        self.state = State::LocalInit;
        self.owed |= owe::REQUEST;
        // More stream bytes may already wait in the socket.
        self.host_readable = true;
    }

    /// Takes the credit fields every guest header carries.
    pub fn update_peer_credit(&mut self, hdr: &PacketHeader) {
        self.peer_buf_alloc = hdr.buf_alloc();
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt());
    }

    /// Bytes the guest can still take.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Where the connection is in its life.
    pub fn phase(&self) -> ConnPhase {
        match self.state {
            State::AwaitLine => ConnPhase::Handshake,
            State::LocalInit | State::Connecting => ConnPhase::Connecting,
            State::Established => ConnPhase::Established,
            State::Closing => ConnPhase::Closing,
        }
    }

    pub fn is_closing(&self) -> bool {
        matches!(self.state, State::Closing)
    }

    /// Owes the guest an RST; nothing else will be sent.
    pub fn reset(&mut self) {
        self.state = State::Closing;
        self.owed = owe::RST;
    }

    pub fn owe(&mut self, what: u8) {
        if !self.is_closing() {
            self.owed |= what;
        }
    }

    fn can_send_data(&self) -> bool {
        if self.session.is_some() {
            return self.session_can_send();
        }
        matches!(self.state, State::Established)
            && self.host_readable
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }

    /// True when the connection has something for the RX queue.
    pub fn has_rx_work(&self) -> bool {
        self.owed != 0 || self.can_send_data()
    }

    /// The guest answered our REQUEST: tell the host client, start the stream.
    pub fn establish(&mut self) -> Result<(), ConnError> {
        let line = match &self.session {
            Some(s) => format!("OK {} {}\n", self.key.local_port, s.token),
            None => format!("OK {}\n", self.key.local_port),
        };
        let Some(fd) = self.fd() else {
            return Err(ConnError::OkLine(io::ErrorKind::NotConnected.into()));
        };
        match write_fd(fd, &[line.as_bytes()]) {
            Ok(n) if n == line.len() => {
                self.state = State::Established;
                Ok(())
            }
            Ok(n) => Err(ConnError::OkLine(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("only {n} of {} bytes written", line.len()),
            ))),
            Err(e) => Err(ConnError::OkLine(e)),
        }
    }

    /// Forwards `len` payload bytes that follow the header in `pkt`, chain
    /// `park` of the TX queue if it may be parked. Returns true when it
    /// was: the chain is then returned through `completed` later.
    ///
    /// # Safety
    ///
    /// With `park` set, as [`Parked::push`].
    pub unsafe fn on_rw(
        &mut self,
        pkt: &GuestIovs<'_>,
        len: usize,
        park: Option<u16>,
        scratch: &mut Vec<libc::iovec>,
    ) -> Result<bool, ConnError> {
        let unforwarded = (self.rx_cnt - self.fwd_cnt).0 as usize;
        if unforwarded + len > self.buf_alloc as usize {
            return Err(ConnError::CreditExceeded {
                len,
                free: (self.buf_alloc as usize).saturating_sub(unforwarded),
            });
        }
        self.rx_cnt += Wrapping(len as u32);
        if self.session.is_some() {
            self.session_on_rw(pkt, len)?;
            self.settle();
            return Ok(false);
        }
        let mut written = 0;
        if let (true, Some(fd)) = (
            self.parked.is_empty() && self.txbuf.is_empty() && len > 0,
            self.fd(),
        ) {
            let window = pkt.window(HEADER_SIZE_BYTES, len, scratch);
            match window.writev_to(fd) {
                Ok(n) => written = n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(ConnError::HostWrite(e)),
            }
        }
        self.fwd_cnt += Wrapping(written as u32);
        let rest = len - written;
        let mut parked = false;
        if rest > 0 {
            if let Some(head) = park.filter(|_| self.txbuf.is_empty()) {
                // SAFETY: the caller's contract.
                parked = unsafe {
                    self.parked
                        .push(head, pkt, HEADER_SIZE_BYTES + written, rest)
                };
            }
            if !parked {
                let free = self.txbuf.free();
                self.txbuf
                    .push_guest(pkt, HEADER_SIZE_BYTES + written, rest, self.rx_cnt.0)
                    .map_err(|()| ConnError::CreditExceeded { len: rest, free })?;
            }
        }
        self.settle();
        Ok(parked)
    }

    /// The host stream became writable: push out parked, then buffered,
    /// guest bytes. Heads of parked chains fully written go to `completed`.
    pub fn on_host_writable(
        &mut self,
        scratch: &mut Vec<libc::iovec>,
        completed: &mut Vec<u16>,
    ) -> Result<(), ConnError> {
        if self.session.is_some() {
            self.session_write();
            self.settle();
            return Ok(());
        }
        let Some(fd) = self.fd() else { return Ok(()) };
        if !self.parked.is_empty() {
            let n = self
                .parked
                .write_to(fd, scratch, completed)
                .map_err(ConnError::HostWrite)?;
            self.fwd_cnt += Wrapping(n as u32);
        }
        if self.parked.is_empty() && !self.txbuf.is_empty() {
            let n = self
                .txbuf
                .flush_to(fd, self.rx_cnt.0)
                .map_err(ConnError::HostWrite)?;
            self.fwd_cnt += Wrapping(n as u32);
        }
        self.settle();
        Ok(())
    }

    /// Copies parked bytes into the buffer and returns their chains
    /// (guest memory is about to be remapped, or the ring stopped).
    pub fn unpark(&mut self, completed: &mut Vec<u16>) {
        if self
            .parked
            .copy_out(&mut self.txbuf, completed, self.rx_cnt.0)
            .is_err()
        {
            // Cannot happen while the credit invariant holds; if it did,
            // the bytes could not be kept, so the stream is broken.
            warn!(
                "{}: {} parked bytes do not fit the buffer: resetting",
                self.key,
                self.parked.bytes()
            );
            self.parked.abandon(completed);
            self.reset();
        }
    }

    /// The guest sent SHUTDOWN with `flags`.
    pub fn on_shutdown(&mut self, flags: u32) {
        self.peer_shutdown |= flags & SHUTDOWN_BOTH;
        if self.session.is_some() {
            // The guest's END may be due on the host stream.
            self.session_write();
        }
        self.settle();
    }

    /// Applies what waits for the buffer to drain or a session's ends,
    /// and decides on credit updates.
    pub(crate) fn settle_now(&mut self) {
        self.settle();
    }

    fn settle(&mut self) {
        if self.session.is_some() {
            self.settle_session();
        } else if self.parked.is_empty() && self.txbuf.is_empty() {
            if self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.host_write_shut {
                self.host_write_shut = true;
                if let Some(Err(e)) = self.stream.as_ref().map(|s| s.shutdown_write()) {
                    debug!("{}: host shutdown(SHUT_WR): {e}", self.key);
                }
            }
            if self.peer_shutdown == SHUTDOWN_BOTH {
                debug!("{}: guest closed, all bytes forwarded: RST", self.key);
                self.reset();
                return;
            }
        }
        // Tell the guest about freed credit before it runs dry: once its view
        // of our free space falls under half, any bytes forwarded since the
        // last header we sent are worth an update; and a quarter of
        // buf_alloc forwarded is worth one anyway, so that a streaming
        // guest never waits for credit while the host keeps up.
        let unadvertised = (self.fwd_cnt - self.last_fwd_cnt_sent).0;
        let guest_view_used = (self.rx_cnt - self.last_fwd_cnt_sent).0;
        let guest_view_free = self.buf_alloc.saturating_sub(guest_view_used);
        if unadvertised > 0
            && (guest_view_free < self.buf_alloc / 2 || unadvertised >= self.buf_alloc / 4)
        {
            self.owe(owe::CREDIT_UPDATE);
        }
    }

    fn header(&mut self, guest_cid: u64, op: u16, len: u32) -> PacketHeader {
        let mut h = PacketHeader::default();
        h.set_src_cid(HOST_CID)
            .set_dst_cid(guest_cid)
            .set_src_port(self.key.local_port)
            .set_dst_port(self.key.peer_port)
            .set_type(TYPE_STREAM)
            .set_op(op)
            .set_len(len)
            .set_buf_alloc(self.buf_alloc)
            .set_fwd_cnt(self.fwd_cnt.0);
        // Every header carries fwd_cnt, so it is also a credit update.
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.owed &= !owe::CREDIT_UPDATE;
        h
    }

    fn put_control(
        &mut self,
        guest_cid: u64,
        buf: &GuestIovs<'_>,
        lens: &mut [usize],
        op: u16,
        flags: u32,
    ) -> RxFill {
        let mut h = self.header(guest_cid, op, 0);
        h.set_flags(flags);
        debug!("rx {h:?}");
        buf.write_at(0, vm_memory::ByteValued::as_slice(&h));
        lens[0] = HEADER_SIZE_BYTES;
        RxFill {
            buffers: 1,
            close: op == OP_RST,
        }
    }

    /// Fills RX buffers (each at least a header long; `lens` as many) with
    /// the next packets this connection owes or has data for: one control
    /// packet, or data packets read from the host with a single `readv`.
    /// `None`: nothing to send.
    pub fn fill_rx(
        &mut self,
        guest_cid: u64,
        bufs: &[GuestIovs<'_>],
        lens: &mut [usize],
        scratch: &mut Vec<libc::iovec>,
    ) -> Option<RxFill> {
        let first = bufs.first()?;
        if self.owed & owe::RST != 0 {
            self.owed = 0;
            return Some(self.put_control(guest_cid, first, lens, OP_RST, 0));
        }
        if self.owed & owe::REQUEST != 0 {
            self.owed &= !owe::REQUEST;
            return Some(self.put_control(guest_cid, first, lens, OP_REQUEST, 0));
        }
        if self.owed & owe::RESPONSE != 0 {
            self.owed &= !owe::RESPONSE;
            return Some(self.put_control(guest_cid, first, lens, OP_RESPONSE, 0));
        }
        if self.can_send_data() {
            let read = if self.session.is_some() {
                self.session_fill(guest_cid, bufs, lens, scratch)
            } else {
                self.read_payload(guest_cid, bufs, lens, scratch)
            };
            match read {
                Ok(0) => {}
                Ok(buffers) => {
                    return Some(RxFill {
                        buffers,
                        close: false,
                    })
                }
                Err(e) => {
                    warn!("{}: resetting connection: {e}", self.key);
                    self.reset();
                    return Some(self.put_control(guest_cid, first, lens, OP_RST, 0));
                }
            }
        }
        if self.owed & owe::SHUTDOWN != 0 {
            self.owed &= !owe::SHUTDOWN;
            let flags = self.shutdown_flags & !self.local_shutdown;
            self.local_shutdown |= flags;
            if let Some(s) = &mut self.session {
                // The client's END reaches the guest: acknowledged once
                // this batch is published.
                s.ack_after_publish = true;
            }
            return Some(self.put_control(guest_cid, first, lens, OP_SHUTDOWN, flags));
        }
        if self.owed & owe::CREDIT_UPDATE != 0 {
            return Some(self.put_control(guest_cid, first, lens, OP_CREDIT_UPDATE, 0));
        }
        None
    }

    /// Writes an RW header for `len` payload bytes into `buf`.
    fn put_rw_header(&mut self, guest_cid: u64, buf: &GuestIovs<'_>, len: usize) {
        let h = self.header(guest_cid, OP_RW, len as u32);
        debug!("rx {h:?}");
        buf.write_at(0, vm_memory::ByteValued::as_slice(&h));
    }

    /// Reads host bytes into the buffers after their headers, with one
    /// `readv` across all of them, and writes an RW header into each buffer
    /// that got bytes. Returns the buffers filled; 0 means nothing was read
    /// (would block, or EOF, which owes a SHUTDOWN).
    fn read_payload(
        &mut self,
        guest_cid: u64,
        bufs: &[GuestIovs<'_>],
        lens: &mut [usize],
        scratch: &mut Vec<libc::iovec>,
    ) -> Result<usize, ConnError> {
        let mut credit = self.peer_credit() as usize;
        if credit == 0 {
            return Ok(0);
        }
        let room = |b: &GuestIovs<'_>| {
            b.len()
                .saturating_sub(HEADER_SIZE_BYTES)
                .min(MAX_PAYLOAD_BYTES)
        };
        // Gather the payload areas of as many buffers as credit allows.
        let mut sizes = [0usize; MAX_RX_BATCH];
        let mut gathered = 0;
        let mut total = 0;
        scratch.clear();
        for (b, size) in bufs.iter().zip(sizes.iter_mut()) {
            if credit == 0 {
                break;
            }
            let want = room(b).min(credit);
            let got = b.append_window(HEADER_SIZE_BYTES, want, scratch);
            *size = got;
            total += got;
            credit -= got;
            gathered += 1;
            if got < want {
                break;
            }
        }
        let window = IovWindow::gathered(scratch, total);
        let Some(fd) = self.fd() else { return Ok(0) };
        let n = match window.readv_from(fd) {
            Ok(0) => {
                self.host_eof = true;
                self.host_readable = false;
                // A Unix peer that closed (rather than shut down its writing
                // side) also gets the guest's writes refused.
                let flags = if self.host_hup {
                    SHUTDOWN_BOTH
                } else {
                    SHUTDOWN_SEND
                };
                debug!("{}: host EOF, owe SHUTDOWN({flags:#x})", self.key);
                self.shutdown_flags |= flags;
                self.owe(owe::SHUTDOWN);
                return Ok(0);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.host_readable = false;
                return Ok(0);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(0),
            Err(e) => return Err(ConnError::HostRead(e)),
        };
        // A short read drained the socket: wait for the next edge, unless
        // the host's EOF (already signalled) is still ahead.
        if n < total && !self.host_rdhup {
            self.host_readable = false;
        }
        self.tx_cnt += Wrapping(n as u32);
        let mut left = n;
        let mut filled = 0;
        for (i, &size) in sizes[..gathered].iter().enumerate() {
            if left == 0 {
                break;
            }
            let take = left.min(size);
            self.put_rw_header(guest_cid, &bufs[i], take);
            lens[i] = HEADER_SIZE_BYTES + take;
            left -= take;
            filled += 1;
        }
        Ok(filled)
    }
}

// Conversion to and from the state region's connection records, and what
// adoption needs besides.
impl<S: HostStream> Connection<S> {
    /// The connection's persistent state. Parked chains are not in it:
    /// they are in the TX inflight log, and the bytes they hold are
    /// `[fwd_cnt, txbuf_start)`.
    pub fn record(&self) -> ConnRecord {
        let mut r = ConnRecord {
            uid: self.uid,
            last_tx_counter: self.last_tx_counter,
            rx_batch: self.rx_batch,
            local_port: self.key.local_port,
            peer_port: self.key.peer_port,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt.0,
            rx_cnt: self.rx_cnt.0,
            last_fwd_cnt_sent: self.last_fwd_cnt_sent.0,
            peer_buf_alloc: self.peer_buf_alloc,
            peer_fwd_cnt: self.peer_fwd_cnt.0,
            tx_cnt: self.tx_cnt.0,
            txbuf_start: (self.rx_cnt - Wrapping(self.txbuf.len() as u32)).0,
            owed: self.owed,
            peer_shutdown: self.peer_shutdown as u8,
            local_shutdown: self.local_shutdown as u8,
            shutdown_flags: self.shutdown_flags as u8,
            host_flags: if self.host_eof { rec_host::EOF } else { 0 }
                | if self.host_write_shut {
                    rec_host::WRITE_SHUT
                } else {
                    0
                },
            ..Default::default()
        };
        r.state = match self.state {
            State::AwaitLine => rec_state::AWAIT_LINE,
            State::Connecting => rec_state::CONNECTING,
            State::LocalInit => rec_state::LOCAL_INIT,
            State::Established => rec_state::ESTABLISHED,
            State::Closing => rec_state::CLOSING,
        };
        r
    }

    /// Rebuilds a connection from its record and its host stream; its
    /// buffer is the shared area at `data`, holding `[txbuf_start,
    /// rx_cnt)`. The host stream's readiness is unknown: it is assumed
    /// readable (a read that finds nothing costs one EAGAIN).
    ///
    /// # Safety
    ///
    /// As [`Connection::use_shared_buffer`].
    pub unsafe fn from_record(
        rec: &ConnRecord,
        stream: Option<S>,
        data: *mut u8,
    ) -> Result<Self, String> {
        let state = match rec.state {
            rec_state::AWAIT_LINE => State::AwaitLine,
            rec_state::CONNECTING => State::Connecting,
            rec_state::LOCAL_INIT => State::LocalInit,
            rec_state::ESTABLISHED => State::Established,
            rec_state::CLOSING => State::Closing,
            other => return Err(format!("unknown state {other}")),
        };
        let held = Wrapping(rec.rx_cnt) - Wrapping(rec.txbuf_start);
        let unforwarded = Wrapping(rec.rx_cnt) - Wrapping(rec.fwd_cnt);
        if held > unforwarded || unforwarded.0 > rec.buf_alloc {
            return Err(format!(
                "{} bytes buffered, {} unforwarded, credit {}",
                held.0, unforwarded.0, rec.buf_alloc
            ));
        }
        let key = ConnKey {
            local_port: rec.local_port,
            peer_port: rec.peer_port,
        };
        let mut c = Self::new_without_stream(state, key, rec.buf_alloc);
        c.stream = stream;
        // SAFETY: the caller's contract.
        c.txbuf = unsafe { TxBuf::shared(rec.buf_alloc as usize, data, held.0 as usize) }
            .map_err(|()| "buffer larger than the credit".to_string())?;
        c.fwd_cnt = Wrapping(rec.fwd_cnt);
        c.rx_cnt = Wrapping(rec.rx_cnt);
        c.last_fwd_cnt_sent = Wrapping(rec.last_fwd_cnt_sent);
        c.peer_buf_alloc = rec.peer_buf_alloc;
        c.peer_fwd_cnt = Wrapping(rec.peer_fwd_cnt);
        c.tx_cnt = Wrapping(rec.tx_cnt);
        c.owed = rec.owed;
        c.peer_shutdown = u32::from(rec.peer_shutdown);
        c.local_shutdown = u32::from(rec.local_shutdown);
        c.shutdown_flags = u32::from(rec.shutdown_flags);
        c.host_eof = rec.host_flags & rec_host::EOF != 0;
        c.host_write_shut = rec.host_flags & rec_host::WRITE_SHUT != 0;
        c.host_readable = !c.host_eof;
        c.uid = rec.uid;
        c.last_tx_counter = rec.last_tx_counter;
        c.rx_batch = rec.rx_batch;
        c.committed = Some(*rec);
        Ok(c)
    }

    /// Stream offset (`rx_cnt` terms) of the first guest byte the host has
    /// not taken.
    pub fn fwd_cnt(&self) -> u32 {
        self.fwd_cnt.0
    }

    /// Host bytes sent to the guest.
    pub fn tx_cnt(&self) -> u32 {
        self.tx_cnt.0
    }

    /// Stream offset after the last guest byte received.
    pub fn rx_cnt(&self) -> u32 {
        self.rx_cnt.0
    }

    /// Stream offset of the first byte held in the buffer: parked chains
    /// hold `[fwd_cnt, txbuf_start)`.
    pub fn txbuf_start(&self) -> u32 {
        (self.rx_cnt - Wrapping(self.txbuf.len() as u32)).0
    }

    /// True when the buffer ever held a byte in shared memory.
    pub fn used_shared_buffer(&self) -> bool {
        self.txbuf.was_used()
    }

    /// Parks again, after a restart, chain `head` of an already applied
    /// packet: its payload bytes `[offset, offset + len)` (offsets into
    /// the payload) are still owed to the host. Parked bytes precede
    /// buffered ones whatever the limits, since guest memory is the only
    /// place they are. False if the chain cannot be parked.
    ///
    /// # Safety
    ///
    /// As [`Parked::push`].
    pub unsafe fn repark(
        &mut self,
        head: u16,
        pkt: &GuestIovs<'_>,
        offset: usize,
        len: usize,
    ) -> bool {
        // SAFETY: the caller's contract.
        unsafe { self.parked.push(head, pkt, HEADER_SIZE_BYTES + offset, len) }
    }

    /// True when the parked chains hold exactly the bytes the record says
    /// they do (`[fwd_cnt, txbuf_start)`), as after a complete adoption.
    pub fn parked_bytes_match(&self) -> bool {
        let owed = Wrapping(self.txbuf_start()) - self.fwd_cnt;
        owed.0 as usize == self.parked.bytes()
    }

    /// Keeps this new connection's buffer in shared memory at `data`, so a
    /// successor can adopt it.
    ///
    /// # Safety
    ///
    /// `data` must be valid for reads and writes of
    /// [`crate::store::data_area_bytes`] bytes for the connection's whole
    /// life and used by nothing else meanwhile.
    pub unsafe fn use_shared_buffer(&mut self, data: *mut u8) {
        debug_assert!(self.txbuf.is_empty());
        // SAFETY: the caller's contract; nothing is held yet.
        if let Ok(t) = unsafe { TxBuf::shared(self.buf_alloc as usize, data, 0) } {
            self.txbuf = t;
        }
    }
}

#[cfg(test)]
mod record_tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    fn guest_iovs(buf: &mut [u8]) -> Vec<libc::iovec> {
        vec![libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }]
    }

    /// A connection whose host reader stopped: bytes are buffered in
    /// shared memory. Rebuilt from its record over a duplicate of the same
    /// stream and the same memory (a worker restart), it has the same
    /// record, and the host then reads every byte once, in order.
    #[test]
    fn record_round_trip_keeps_buffered_bytes_and_counters() {
        let (ours, mut host) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut hdr = PacketHeader::default();
        hdr.set_buf_alloc(262_144).set_fwd_cnt(77);
        let key = ConnKey {
            local_port: 5000,
            peer_port: 1234,
        };
        let buf_alloc = 256 * 1024;
        let mut c =
            Connection::new_guest_initiated(ours.try_clone().unwrap(), key, &hdr, buf_alloc);
        c.host_connected();
        let mut area = vec![0u8; crate::store::data_area_bytes(buf_alloc)];
        // SAFETY: `area` outlives both connections below, used by one at a time.
        unsafe { c.use_shared_buffer(area.as_mut_ptr()) };
        // Send until the socket is full and about 100 KiB are buffered.
        let mut sent = Vec::new();
        let mut scratch = Vec::new();
        let mut i = 0u32;
        while c.txbuf.len() < 100_000 {
            let payload: Vec<u8> = (0..4000u32).map(|k| (k * 7 + i) as u8).collect();
            let mut pkt = vec![0u8; HEADER_SIZE_BYTES];
            pkt.extend_from_slice(&payload);
            let iovs = guest_iovs(&mut pkt);
            // SAFETY: `pkt` outlives `g`.
            let g = unsafe { GuestIovs::new(&iovs) };
            // SAFETY: no parking asked for.
            let parked = unsafe { c.on_rw(&g, payload.len(), None, &mut scratch) }.unwrap();
            assert!(!parked);
            sent.extend_from_slice(&payload);
            i += 1;
        }
        c.owe(owe::CREDIT_UPDATE);
        let rec = c.record();
        assert_eq!(rec.state, rec_state::ESTABLISHED);
        assert_eq!(ConnPhase::of_record(&rec), Some(c.phase()));
        assert_eq!(c.phase(), ConnPhase::Established);
        assert_eq!(rec.rx_cnt as usize, sent.len());
        assert_eq!((rec.rx_cnt - rec.txbuf_start) as usize, c.txbuf.len());
        assert_eq!(rec.peer_fwd_cnt, 77);
        drop(c);
        // SAFETY: as above; the first connection is gone.
        let mut c2 = unsafe {
            Connection::from_record(&rec, Some(ours.try_clone().unwrap()), area.as_mut_ptr())
        }
        .unwrap();
        assert_eq!(c2.record(), rec);
        assert!(c2.has_rx_work(), "owed credit update kept");
        // The host reads everything; the adopted buffer supplies the rest.
        host.set_nonblocking(false).unwrap();
        let want = sent.len();
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; want];
            host.read_exact(&mut got).unwrap();
            got
        });
        let mut completed = Vec::new();
        while !c2.txbuf.is_empty() {
            c2.on_host_writable(&mut scratch, &mut completed).unwrap();
            std::thread::yield_now();
        }
        assert_eq!(reader.join().unwrap(), sent);
        assert_eq!(c2.fwd_cnt, c2.rx_cnt);
        // A record that contradicts itself is refused, not trusted.
        let mut bad = rec;
        bad.txbuf_start = rec.rx_cnt.wrapping_sub(buf_alloc + 1);
        // SAFETY: as above.
        assert!(unsafe { Connection::from_record(&bad, Some(ours), area.as_mut_ptr()) }.is_err());
    }

    #[test]
    fn handshake_states_are_kept_in_the_record() {
        let (ours, _host) = UnixStream::pair().unwrap();
        let c = Connection::new_host_client(ours.try_clone().unwrap(), 4096);
        let rec = c.record();
        assert_eq!(rec.state, rec_state::AWAIT_LINE);
        assert_eq!(ConnPhase::of_record(&rec), Some(ConnPhase::Handshake));
        assert_eq!(c.phase(), ConnPhase::Handshake);
        let mut area = vec![0u8; 4096];
        // SAFETY: `area` is large enough and outlives the connection.
        let c2 = unsafe {
            Connection::from_record(&rec, Some(ours.try_clone().unwrap()), area.as_mut_ptr())
        }
        .unwrap();
        assert!(matches!(c2.state, State::AwaitLine), "{:?}", c2.state);
        drop(c2);

        let key = ConnKey {
            local_port: 80,
            peer_port: 1000,
        };
        let mut h = PacketHeader::default();
        h.set_buf_alloc(9999).set_fwd_cnt(5);
        let mut g = Connection::new_guest_initiated(ours.try_clone().unwrap(), key, &h, 4096);
        let rec = g.record();
        assert_eq!(rec.state, rec_state::CONNECTING);
        assert_eq!(ConnPhase::of_record(&rec), Some(ConnPhase::Connecting));
        assert_eq!(rec.owed, 0, "no RESPONSE before the host connect");
        // SAFETY: as above; `c2` is gone.
        let mut g2 =
            unsafe { Connection::from_record(&rec, Some(ours), area.as_mut_ptr()) }.unwrap();
        assert!(matches!(g2.state, State::Connecting), "{:?}", g2.state);
        assert_eq!(g2.peer_buf_alloc, 9999);
        g2.host_connected();
        g.host_connected();
        assert!(matches!(g2.state, State::Established));
        assert_eq!(g2.record().owed, owe::RESPONSE);
        assert_eq!(g2.record(), g.record());
    }
}
