//! Keeping the connection table for a successor process, and adopting it.
//!
//! Commit points (see `crate::store` for what a slot holds):
//! * TX: before a packet is applied its connection's `rx_cnt` is noted;
//!   after, the chain's [`TxMeta`] is stored, then the slot with
//!   `last_tx_counter` = the chain's inflight counter. The backend returns
//!   the chain to the guest only after that. Between two commits of a slot
//!   at most one packet's bytes enter its shared buffer, and they land
//!   outside the bytes the last committed copy holds (the credit bound), so
//!   a committed copy never names bytes that were overwritten.
//! * Host events: after each host read or write, before the chains it
//!   finished go back to the guest.
//! * RX: a batch's changes are committed together, each slot tagged with
//!   the batch number ([`Muxer::commit_rx`]); the backend then marks the
//!   batch pending, publishes `used->idx` and marks it confirmed
//!   ([`Muxer::rx_published`]). A slot copy whose batch was never marked
//!   pending is rolled back to the older copy; a pending batch is rolled
//!   forward (its used elements are already in guest memory).
//! * Removal: a free record. A connection removed inside an RX batch keeps
//!   its host stream until the batch is confirmed, since rolling the batch
//!   back brings the connection back.
//!
//! Adoption ([`Muxer::adopt`], [`Muxer::resubmit_tx`],
//! [`Muxer::finish_adoption`]): connections come back from their records
//! and kept streams. A TX chain the dead process had in flight is handled
//! again unless its connection's `last_tx_counter` shows it was applied;
//! then only the part of its payload still owed to the host,
//! `[fwd_cnt, txbuf_start)` intersected with the chain's bytes, is parked
//! again. Once every chain is resubmitted, each connection's parked bytes
//! must be exactly `[fwd_cnt, txbuf_start)`; a connection where they are
//! not is reset, and logged.
//!
//! Handshakes in the middle ([`Muxer::finish_handshakes`]): a host client
//! whose `CONNECT` line was read into its slot's line area connects; a
//! guest connect recorded as `Connecting` is connected on its kept stream
//! (a connect already made answers EISCONN). Neither is ever made twice.
//!
//! Resumable sessions: a session's record (`ResumeRecord`) is written
//! before its connection's whenever it changed. Adopted after a crash, an
//! attached session is detached (its stream closed, its client resumes);
//! adopted in a hand-over (the predecessor quiesced for an upgrade) it
//! carries on on its stream from the writer position its predecessor
//! recorded. A host client whose `RESUME` line was read before a crash is
//! closed: its reply may have been sent, so it asks again.
//!
//! Not kept: RSTs owed for unknown connections (a guest that sent to a
//! dead connection during the crash sees its packet go unanswered, and its
//! own timeout applies), and readiness, which is assumed (an extra read
//! costs one EAGAIN).

use std::io;
use std::os::fd::AsRawFd;

use log::{debug, info, warn};

use super::{Muxer, FIRST_LOCAL_PORT};
use crate::conn::{Connection, State};
use crate::connect_line::{parse as parse_line, Line, MAX_LINE_BYTES};
use crate::host::{Host, HostStream};
use crate::iov::GuestIovs;
use crate::packet::HEADER_SIZE_BYTES;
use crate::session::{monotonic_now_ns, Session};
use crate::store::{ConnRecord, ConnStore, ResumeRecord, TxMeta};
use crate::txbuf::ring_bytes;

/// A TX chain as the backend popped it: its head, and its inflight
/// counter (pop order, from 1; 0 when nothing is persisted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxChain {
    pub head: u16,
    pub counter: u64,
}

/// A connection found in the store, with its kept host stream (`None`
/// only for a detached resumable session) and, for a resumable session,
/// its session record.
pub struct Adopted<S> {
    pub slot: usize,
    pub record: ConnRecord,
    pub stream: Option<S>,
    pub resume: Option<ResumeRecord>,
}

/// The muxer's persistence state.
pub(super) struct Keep {
    pub store: Box<dyn ConnStore>,
    /// Number of the next RX batch.
    next_rx_batch: u64,
    /// `fill_rx` is running: removals wait for the batch's commit.
    pub in_rx: bool,
    /// Slots changed by the RX batch being filled.
    rx_dirty: Vec<usize>,
    /// Slots freed by it.
    rx_freed: Vec<usize>,
    /// Streams and areas to release once the batch is confirmed:
    /// (slot, uid, discard the area).
    after_rx: Vec<(usize, u64, bool)>,
}

fn free_record(rx_batch: u64) -> ConnRecord {
    ConnRecord {
        rx_batch,
        ..Default::default()
    }
}

impl Keep {
    pub fn new(store: Box<dyn ConnStore>) -> Self {
        Keep {
            store,
            next_rx_batch: 1,
            in_rx: false,
            rx_dirty: Vec::new(),
            rx_freed: Vec::new(),
            after_rx: Vec::new(),
        }
    }

    /// Gives a new connection its uid and shared buffer, and keeps its
    /// stream (before any record names the uid).
    pub fn prepare<S: HostStream>(
        &mut self,
        slot: usize,
        conn: &mut Connection<S>,
        buf_alloc: u32,
    ) {
        let uid = self.store.next_uid();
        self.prepare_kept(slot, conn, buf_alloc, uid);
        if let Some(fd) = conn.fd() {
            self.store.keep_stream(conn.uid, fd);
        }
    }

    /// [`Keep::prepare`] for a connection whose stream the store keeps
    /// already, under `uid` (a host client the keeper accepted): it gets
    /// that uid, and its stream is not kept a second time.
    pub fn prepare_kept<S: HostStream>(
        &mut self,
        slot: usize,
        conn: &mut Connection<S>,
        buf_alloc: u32,
        uid: u64,
    ) {
        conn.uid = uid;
        if ring_bytes(buf_alloc as usize) <= self.store.data_bytes() {
            if let Some(area) = self.store.data_area(slot) {
                // SAFETY: `ConnStore`'s contract: the area is valid as long
                // as the store, which the muxer keeps longer than any
                // connection, and it belongs to this slot alone.
                unsafe { conn.use_shared_buffer(area) };
            }
        }
    }

    /// Connection `conn` left slot `slot`.
    pub fn freed<S: HostStream>(&mut self, slot: usize, conn: &Connection<S>) {
        let discard = conn.used_shared_buffer();
        let stream = conn.stream_uid().unwrap_or(0);
        if self.in_rx {
            self.rx_freed.push(slot);
            self.after_rx.push((slot, stream, discard));
            return;
        }
        self.store.commit(slot, &free_record(conn.rx_batch));
        crate::crash_point::hit("conn-freed");
        if stream != 0 {
            self.store.release_streams(&[stream]);
        }
        if discard {
            self.store.discard_data(slot);
        }
    }

    /// Frees slot `slot`, whose connection `record` could not be adopted,
    /// and releases its stream.
    fn abandon(&mut self, slot: usize, record: &ConnRecord, stream_uid: u64) {
        self.store.commit(slot, &free_record(record.rx_batch));
        if stream_uid != 0 {
            self.store.release_streams(&[stream_uid]);
        }
    }

    /// Frees every slot in `conns` at once (device reset).
    pub fn free_all<S: HostStream>(&mut self, conns: &[Option<Connection<S>>]) {
        let mut uids = Vec::new();
        for (slot, conn) in conns.iter().enumerate() {
            let Some(conn) = conn else { continue };
            self.store.commit(slot, &free_record(conn.rx_batch));
            if conn.used_shared_buffer() {
                self.store.discard_data(slot);
            }
            uids.extend(conn.stream_uid());
        }
        self.store.release_streams(&uids);
        self.rx_dirty.clear();
    }

    /// Connection `conn` in `slot` changed in the RX batch being filled.
    pub fn rx_touched<S>(&mut self, slot: usize, conn: &mut Connection<S>) {
        if !conn.rx_dirty {
            conn.rx_dirty = true;
            self.rx_dirty.push(slot);
        }
    }
}

impl<H: Host> Muxer<H> {
    /// Commits slot `slot` if its connection changed since its last
    /// commit (no-op without a store or a connection).
    pub(super) fn commit(&mut self, slot: usize) {
        let (Some(k), Some(Some(conn))) = (&mut self.keep, self.conns.get_mut(slot)) else {
            return;
        };
        commit_conn(k, slot, conn);
    }

    /// A TX packet was applied to the connection in `slot`, whose uid and
    /// `rx_cnt` were `before`: stores where the chain's payload went, then
    /// the connection.
    pub(super) fn tx_applied(
        &mut self,
        slot: usize,
        chain: Option<TxChain>,
        before: Option<(u64, u32)>,
        len: usize,
    ) {
        let (Some(k), Some(Some(conn))) = (&mut self.keep, self.conns.get_mut(slot)) else {
            return;
        };
        if let (Some(chain), Some((uid, offset))) = (chain, before) {
            if chain.counter != 0 && conn.uid == uid {
                let meta = TxMeta {
                    counter: chain.counter,
                    conn_uid: uid,
                    offset,
                    len: len as u32,
                };
                k.store.note_tx(chain.head, &meta);
                conn.last_tx_counter = chain.counter;
            }
        }
        commit_conn(k, slot, conn);
    }

    /// Commits what the RX batch just filled changed, tagged with a new
    /// batch number, which it returns (`None`: nothing to commit). The
    /// caller marks the batch pending, publishes it, then calls
    /// [`Muxer::rx_published`].
    pub fn commit_rx(&mut self) -> Option<u64> {
        let k = self.keep.as_mut()?;
        if k.rx_dirty.is_empty() && k.rx_freed.is_empty() {
            return None;
        }
        let batch = k.next_rx_batch;
        k.next_rx_batch += 1;
        for slot in k.rx_freed.drain(..) {
            k.store.commit(slot, &free_record(batch));
        }
        for slot in std::mem::take(&mut k.rx_dirty) {
            if let Some(Some(conn)) = self.conns.get_mut(slot) {
                conn.rx_dirty = false;
                conn.rx_batch = batch;
                commit_conn(k, slot, conn);
            }
        }
        Some(batch)
    }

    /// The streams of connections the published RX batch removed are
    /// released.
    pub(super) fn release_after_rx(&mut self) {
        let Some(k) = &mut self.keep else { return };
        if k.after_rx.is_empty() {
            return;
        }
        let uids: Vec<u64> = k
            .after_rx
            .iter()
            .map(|&(_, uid, _)| uid)
            .filter(|&u| u != 0)
            .collect();
        k.store.release_streams(&uids);
        for (slot, _, discard) in std::mem::take(&mut k.after_rx) {
            if discard {
                k.store.discard_data(slot);
            }
        }
    }

    /// Rebuilds the connection table from what a dead process stored:
    /// `conns` are the live slots' records with their kept streams, and
    /// `last_rx_batch` the newest RX batch the records may carry. Call on a
    /// muxer with a store and no connections. `handover`: the dead process
    /// quiesced for this one (an upgrade), so resumable sessions stay
    /// attached. Returns the connections adopted.
    pub fn adopt(
        &mut self,
        conns: Vec<Adopted<H::Stream>>,
        last_rx_batch: u64,
        handover: bool,
    ) -> usize {
        let Some(k) = &mut self.keep else { return 0 };
        k.next_rx_batch = last_rx_batch + 1;
        let data_bytes = k.store.data_bytes();
        let mut adopted = 0;
        for Adopted {
            slot,
            record,
            stream,
            resume,
        } in conns
        {
            let resume = resume.filter(|r| r.conn_uid == record.uid && record.uid != 0);
            let stream_uid = match (&stream, &resume) {
                (None, _) => 0,
                (Some(_), Some(r)) => r.stream_uid,
                (Some(_), None) => record.uid,
            };
            let Some(k) = &mut self.keep else {
                return adopted;
            };
            let area = k
                .store
                .data_area(slot)
                .filter(|_| ring_bytes(record.buf_alloc as usize) <= data_bytes);
            let built = match area {
                // SAFETY: `ConnStore`'s contract, as in `Keep::prepare`; the
                // dead process's connection no longer uses the area.
                Some(area) => unsafe { Connection::from_record(&record, stream, area) },
                None => Err(format!(
                    "credit {} does not fit a {data_bytes}-byte data area",
                    record.buf_alloc
                )),
            };
            debug!(
                "slot {slot}: adopting host:{} guest:{} fwd_cnt {} rx_cnt {} txbuf_start {} last_tx_counter {} rx_batch {}",
                record.local_port,
                record.peer_port,
                record.fwd_cnt,
                record.rx_cnt,
                record.txbuf_start,
                record.last_tx_counter,
                record.rx_batch
            );
            let built = built.and_then(|mut c| {
                match &resume {
                    Some(r) => adopt_session(k, slot, &mut c, r, handover)?,
                    None if c.stream.is_none() => return Err("no host stream".to_string()),
                    None => {}
                }
                Ok(c)
            });
            let conn = match built {
                Ok(c) => c,
                Err(e) => {
                    warn!(
                        "connection slot {slot} (host:{} guest:{}) cannot be adopted: {e}; closing it",
                        record.local_port, record.peer_port
                    );
                    k.abandon(slot, &record, stream_uid);
                    continue;
                }
            };
            let stream_uid = conn.stream_uid().unwrap_or(0);
            if let Err(e) = self.insert_adopted(slot, conn) {
                warn!("connection slot {slot}: cannot poll its host stream: {e}; closing it");
                if let Some(k) = &mut self.keep {
                    k.abandon(slot, &record, stream_uid);
                }
                continue;
            }
            adopted += 1;
        }
        self.free_slots = (0..self.conns.len())
            .rev()
            .filter(|&s| self.conns[s].is_none())
            .collect();
        let highest = self
            .conns
            .iter()
            .flatten()
            .map(|c| c.key.local_port)
            .filter(|&p| p >= FIRST_LOCAL_PORT)
            .max();
        if let Some(p) = highest.and_then(|p| p.checked_add(1)) {
            self.next_local_port = p.max(FIRST_LOCAL_PORT);
        }
        self.finish_handshakes(handover);
        self.arm_grace_timer();
        if adopted > 0 {
            info!("{adopted} connections adopted");
        }
        adopted
    }

    /// Carries on the handshakes the dead process was in the middle of:
    /// a host client whose line it had read (its line area holds a
    /// newline) connects, and a guest connect recorded as `Connecting` is
    /// connected on its kept stream.
    fn finish_handshakes(&mut self, handover: bool) {
        for slot in 0..self.conns.len() {
            let Some(conn) = &self.conns[slot] else {
                continue;
            };
            match conn.state {
                State::Connecting => self.finish_guest_connect(slot),
                State::AwaitLine => {
                    let Some(area) = self.line_area(slot) else {
                        continue;
                    };
                    // SAFETY: the slot's data area, valid for
                    // `MAX_LINE_BYTES` (`line_area` checks), and only read.
                    let bytes = unsafe { std::slice::from_raw_parts(area, MAX_LINE_BYTES) };
                    let Some(len) = bytes.iter().position(|&b| b == b'\n').map(|nl| nl + 1) else {
                        // Nothing consumed: the line is still in the socket.
                        continue;
                    };
                    let line = parse_line(&bytes[..len]);
                    if matches!(line, Ok(Line::Resume { .. })) && !handover {
                        // Its reply may have been sent: the client asks again.
                        info!("slot {slot}: a RESUME was being answered at the restart: closing that client");
                        self.remove(slot);
                        continue;
                    }
                    debug!("slot {slot}: the handshake line was read before the restart");
                    self.take_connect_line(slot, line);
                }
                _ => {}
            }
        }
    }

    fn insert_adopted(&mut self, slot: usize, conn: Connection<H::Stream>) -> io::Result<()> {
        if self.conns.len() <= slot {
            self.conns.resize_with(slot + 1, || None);
        }
        let events = epoll::Events::EPOLLIN
            | epoll::Events::EPOLLOUT
            | epoll::Events::EPOLLRDHUP
            | epoll::Events::EPOLLET;
        let ev = epoll::Event::new(events, slot as u64);
        if let Some(fd) = conn.fd() {
            epoll::ctl(
                self.epoll.as_raw_fd(),
                epoll::ControlOptions::EPOLL_CTL_ADD,
                fd,
                ev,
            )?;
        }
        if !matches!(conn.state, State::AwaitLine) {
            self.by_key.insert(conn.key, slot);
        }
        if let Some(s) = &conn.session {
            self.sessions.insert(s.token, slot);
        }
        self.conns[slot] = Some(conn);
        Ok(())
    }

    /// Handles again TX chain `chain`, which a dead process popped and
    /// never returned. Returns true when it can be returned now (as
    /// [`Muxer::handle_tx_parking`]).
    ///
    /// # Safety
    ///
    /// As [`Muxer::handle_tx_parking`].
    pub unsafe fn resubmit_tx(&mut self, chain: TxChain, pkt: &GuestIovs<'_>) -> bool {
        let applied = self.keep.as_ref().and_then(|k| {
            let meta = k.store.tx_meta(chain.head)?;
            if meta.counter != chain.counter || chain.counter == 0 {
                return None;
            }
            let slot = self
                .conns
                .iter()
                .position(|c| c.as_ref().is_some_and(|c| c.uid == meta.conn_uid))?;
            let conn = self.conns[slot].as_ref()?;
            (conn.last_tx_counter >= chain.counter).then_some((slot, meta))
        });
        let Some((slot, meta)) = applied else {
            debug!(
                "resubmitted chain {} (counter {}) was not applied: {:?}",
                chain.head,
                chain.counter,
                self.keep.as_ref().and_then(|k| k.store.tx_meta(chain.head))
            );
            // SAFETY: the caller's contract.
            return unsafe { self.handle_tx_parking(chain, pkt) };
        };
        // SAFETY: the caller's contract.
        !unsafe { self.repark(slot, chain.head, pkt, &meta) }
    }

    /// Parks chain `head` again for what its payload still owes the host;
    /// returns true when it was parked.
    ///
    /// # Safety
    ///
    /// As [`Muxer::handle_tx_parking`].
    unsafe fn repark(
        &mut self,
        slot: usize,
        head: u16,
        pkt: &GuestIovs<'_>,
        meta: &TxMeta,
    ) -> bool {
        let Some(Some(conn)) = self.conns.get_mut(slot) else {
            return false;
        };
        // Offsets relative to fwd_cnt: the chain's payload starts at
        // `start` (negative when partly forwarded already), and parked
        // bytes end at `owed_end`.
        let fwd = conn.fwd_cnt();
        let start = i64::from(meta.offset.wrapping_sub(fwd) as i32);
        let owed_end = i64::from(conn.txbuf_start().wrapping_sub(fwd));
        let from = start.max(0);
        let to = (start + i64::from(meta.len)).min(owed_end);
        if to <= from {
            debug!(
                "{}: resubmitted chain {head} ({meta:?}) was fully forwarded",
                conn.key
            );
            return false;
        }
        let (offset, len) = ((from - start) as usize, (to - from) as usize);
        if HEADER_SIZE_BYTES + offset + len > pkt.len() {
            warn!(
                "{}: resubmitted chain {head} is shorter than its recorded payload: resetting",
                conn.key
            );
            self.reset_conn(slot);
            return false;
        }
        // SAFETY: the caller's contract.
        if unsafe { conn.repark(head, pkt, offset, len) } {
            debug!("{}: chain {head} parked again for {len} bytes", conn.key);
            self.parked_chains += 1;
            true
        } else {
            warn!(
                "{}: resubmitted chain {head} cannot be parked again: resetting",
                conn.key
            );
            self.reset_conn(slot);
            false
        }
    }

    /// Ends an adoption, after every chain was resubmitted: checks that
    /// each connection's parked bytes are those its record says, resets
    /// any where they are not, and queues every connection for RX (owed
    /// packets and host bytes).
    pub fn finish_adoption(&mut self) {
        for slot in 0..self.conns.len() {
            let Some(Some(conn)) = self.conns.get_mut(slot) else {
                continue;
            };
            if !conn.parked_bytes_match() {
                warn!(
                    "{}: the chains in flight do not hold the bytes its record owes the host: resetting",
                    conn.key
                );
                self.reset_conn(slot);
            }
            self.commit(slot);
            self.enqueue(slot);
        }
    }
}

/// The session a resumable connection's record describes, on `conn`
/// (just rebuilt from its record). After a crash an attached session is
/// detached: its stream is released and closed.
fn adopt_session<S: HostStream>(
    k: &mut Keep,
    slot: usize,
    conn: &mut Connection<S>,
    r: &ResumeRecord,
    handover: bool,
) -> Result<(), String> {
    let attached = conn.stream.is_some() && r.stream_uid != 0;
    let mut s = Session::from_record(r, handover && attached);
    if !attached {
        s.stream_uid = 0;
        if s.detached_at_ns == 0 {
            s.detached_at_ns = monotonic_now_ns();
        }
        conn.stream = None;
    } else if !handover {
        info!(
            "{}: resumable session detached by the restart; its client resumes",
            conn.key
        );
        k.store.release_streams(&[r.stream_uid]);
        conn.stream = None;
        s.stream_uid = 0;
        s.detached_at_ns = monotonic_now_ns();
    }
    conn.session = Some(Box::new(s));
    conn.resume_committed = Some(*r);
    if handover && attached {
        if let Some((kind, offset, len, written)) = Session::unfinished_frame(r) {
            if !conn.rebuild_out_frame(kind, offset, len, written) {
                return Err(format!(
                    "the frame its predecessor was writing ({kind:?} at {offset}, {len} bytes) is not buffered"
                ));
            }
        }
    }
    debug!("slot {slot}: resumable session adopted");
    Ok(())
}

/// Writes `conn`'s record to `slot` unless it is the one last written (a
/// resumable session's record first).
fn commit_conn<S: HostStream>(k: &mut Keep, slot: usize, conn: &mut Connection<S>) {
    // A slot changed by an RX batch is committed with the batch.
    debug_assert!(!conn.rx_dirty, "{}: committed inside an RX batch", conn.key);
    if conn.rx_dirty {
        return;
    }
    if let Some(rec) = conn.resume_record() {
        if conn.resume_committed.as_ref() != Some(&rec) {
            k.store.commit_resume(slot, &rec);
            conn.resume_committed = Some(rec);
        }
    }
    let rec = conn.record();
    if conn.committed.as_ref() != Some(&rec) {
        k.store.commit(slot, &rec);
        conn.committed = Some(rec);
    }
}
