//! The vsock device proper: the connection table, the host listener, and the
//! two packet paths.
//!
//! * TX (guest to host): [`Muxer::handle_tx`] takes one packet, validates it
//!   and drives the connection it belongs to.
//! * RX (host to guest): [`Muxer::fill_rx`] fills one guest buffer with the
//!   next packet owed: RSTs for unknown connections first, then connections
//!   round-robin from the RX queue.
//! * Host events: [`Muxer::process_host_events`] drains the muxer's own epoll
//!   set (edge-triggered), accepting host clients and turning readiness into
//!   RX work or buffered-byte flushes.
//! * Host clients accepted elsewhere (by the keeper, which holds their
//!   streams from the instant it accepts them): [`Muxer::add_host_client`]
//!   takes them as if accepted here, under the uid they come with.
//!
//! * Resumable host sessions (`sessions`): a client's `RESUME` attaches a
//!   new host stream to a session, a broken stream detaches it, and a
//!   session detached longer than the grace period is reset.
//! * Persistence (`keep`): with a [`ConnStore`] the table is the store's
//!   slots, and every change is committed as `crate::store` describes;
//!   [`Muxer::adopt`] rebuilds the table in a successor process.
//!
//! Invariant: a connection index is in the RX queue whenever its
//! `in_rx_queue` flag is set; the flag is set only while the connection has
//! RX work or had it when queued. Stale queue entries (removed or
//! re-used slots whose flag is clear) are skipped, so the queue never makes
//! a connection send twice what it owes once.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use log::{debug, info, warn};
use vm_memory::ByteValued;

use crate::conn::{owe, Connection, State, MAX_RX_BATCH};
use crate::connect_line::{find_line, parse as parse_line, Line, LineError, MAX_LINE_BYTES};
use crate::crash_point;
use crate::host::Host;
use crate::iov::{peek_fd, read_fd, GuestIovs};
use crate::packet::*;
use crate::session::Token;
use crate::store::ConnStore;
use crate::{ConnCounts, ConnKey, DeviceError};

mod keep;
mod sessions;

use keep::Keep;
pub use keep::{Adopted, TxChain};

/// Token of the host listener in the muxer's epoll set.
const LISTENER_TOKEN: u64 = u64::MAX;
/// Token of the grace-period timer in the muxer's epoll set.
const TIMER_TOKEN: u64 = u64::MAX - 1;
/// RSTs for unknown connections waiting for RX buffers; more are dropped.
const MAX_ORPHAN_RSTS: usize = 1024;
/// First host-side port handed to host-initiated connections (as Firecracker).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// Epoll events one wait returns at most.
const EVENTS_PER_WAIT: usize = 256;

/// Device settings.
#[derive(Debug, Clone, Copy)]
pub struct MuxerConfig {
    /// The guest's CID.
    pub guest_cid: u64,
    /// Receive buffer advertised to the guest per connection, in bytes.
    pub buf_alloc: u32,
    /// Most connections at once (with a store, also at most its slots).
    pub max_connections: usize,
    /// How long a resumable session stays open with no host client
    /// attached before the guest connection is reset.
    pub resume_grace: std::time::Duration,
}

/// Counters for logs and status.
#[derive(Debug, Default, Clone, Copy)]
pub struct MuxerStats {
    /// Packets dropped or answered with RST because they were malformed.
    pub bad_packets: u64,
    /// Connections reset by us.
    pub resets_sent: u64,
}

/// The vsock device over a [`Host`].
pub struct Muxer<H: Host> {
    cfg: MuxerConfig,
    host: H,
    epoll: OwnedFd,
    conns: Vec<Option<Connection<H::Stream>>>,
    free_slots: Vec<usize>,
    by_key: HashMap<ConnKey, usize>,
    rx_queue: VecDeque<usize>,
    orphan_rsts: VecDeque<PacketHeader>,
    next_local_port: u32,
    scratch: Vec<libc::iovec>,
    events: Vec<epoll::Event>,
    stats: MuxerStats,
    /// TX chain heads done with, for the backend to return to the used ring.
    completed_tx: Vec<u16>,
    /// TX chains parked over all connections, and the most allowed.
    parked_chains: usize,
    park_limit: usize,
    /// Where connections are kept for a successor, if anywhere.
    keep: Option<Keep>,
    /// Resumable sessions by token.
    sessions: HashMap<Token, usize>,
    /// Fires when the first grace period ends (a timerfd).
    timer: OwnedFd,
    /// Sessions owed an `ACK` once the RX batch being filled is published.
    rx_acks: Vec<usize>,
}

/// Most TX chains one connection parks; later ones are copied. Four 64 KiB
/// packets keep a stream busy while the host reader catches up.
pub const MAX_PARKED_PER_CONN: usize = 4;

impl<H: Host> Muxer<H> {
    /// A device with no connections, polling `host`'s listener.
    pub fn new(cfg: MuxerConfig, host: H) -> Result<Self, DeviceError> {
        let fd = epoll::create(true).map_err(DeviceError::Epoll)?;
        // SAFETY: `epoll::create` returned a new descriptor that we own.
        let epoll = unsafe { OwnedFd::from_raw_fd(fd) };
        if let Some(lfd) = host.listener_fd() {
            let ev = epoll::Event::new(epoll::Events::EPOLLIN, LISTENER_TOKEN);
            epoll::ctl(fd, epoll::ControlOptions::EPOLL_CTL_ADD, lfd, ev)
                .map_err(DeviceError::Epoll)?;
        }
        let timer = sessions::grace_timer().map_err(DeviceError::Timer)?;
        let ev = epoll::Event::new(epoll::Events::EPOLLIN, TIMER_TOKEN);
        epoll::ctl(
            fd,
            epoll::ControlOptions::EPOLL_CTL_ADD,
            timer.as_raw_fd(),
            ev,
        )
        .map_err(DeviceError::Epoll)?;
        Ok(Muxer {
            cfg,
            host,
            epoll,
            conns: Vec::new(),
            free_slots: Vec::new(),
            by_key: HashMap::new(),
            rx_queue: VecDeque::new(),
            orphan_rsts: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            scratch: Vec::with_capacity(32),
            events: vec![epoll::Event::new(epoll::Events::empty(), 0); EVENTS_PER_WAIT],
            stats: MuxerStats::default(),
            completed_tx: Vec::new(),
            parked_chains: 0,
            park_limit: 0,
            keep: None,
            sessions: HashMap::new(),
            timer,
            rx_acks: Vec::new(),
        })
    }

    /// The epoll descriptor to poll for host events (readable when
    /// [`Muxer::process_host_events`] has work).
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// The host side.
    pub fn host(&self) -> &H {
        &self.host
    }

    /// Counters.
    pub fn stats(&self) -> MuxerStats {
        self.stats
    }

    /// Open connections, host clients still sending their line included.
    pub fn connection_count(&self) -> usize {
        self.conns.len() - self.free_slots.len()
    }

    /// Open connections by phase.
    pub fn connection_counts(&self) -> ConnCounts {
        let mut counts = ConnCounts::default();
        for c in self.conns.iter().flatten() {
            counts.add(Some(c.phase()));
        }
        counts
    }

    /// True when [`Muxer::fill_rx`] may have a packet to give.
    pub fn has_rx_work(&self) -> bool {
        !self.orphan_rsts.is_empty() || !self.rx_queue.is_empty()
    }

    /// Drops every connection (device reset, or the frontend went away).
    /// Host streams are closed; the guest is not told (its driver is gone).
    pub fn reset(&mut self) {
        self.completed_tx.clear();
        self.parked_chains = 0;
        let n = self.connection_count();
        if n > 0 {
            info!("device reset: closing {n} connections");
        }
        // Every slot is freed at once, and every stream released at once.
        let mut keep = self.keep.take();
        if let Some(k) = &mut keep {
            k.free_all(&self.conns);
        }
        for slot in 0..self.conns.len() {
            self.remove(slot);
        }
        self.keep = keep;
        self.conns.clear();
        self.free_slots.clear();
        self.rx_queue.clear();
        self.orphan_rsts.clear();
        self.sessions.clear();
        self.rx_acks.clear();
        self.arm_grace_timer();
    }

    fn conn(&mut self, slot: usize) -> Option<&mut Connection<H::Stream>> {
        self.conns.get_mut(slot).and_then(Option::as_mut)
    }

    fn insert(&mut self, conn: Connection<H::Stream>) -> io::Result<usize> {
        self.insert_with(conn, None)
    }

    /// Inserts `conn` and records it. `kept`: the store keeps its stream
    /// already, under that uid (released here if it cannot be inserted).
    fn insert_with(
        &mut self,
        mut conn: Connection<H::Stream>,
        kept: Option<u64>,
    ) -> io::Result<usize> {
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None => {
                let slots = match &self.keep {
                    Some(k) => k.store.slots().min(self.cfg.max_connections),
                    None => self.cfg.max_connections,
                };
                if self.conns.len() >= slots {
                    if let (Some(k), Some(uid)) = (&mut self.keep, kept) {
                        k.store.release_streams(&[uid]);
                    }
                    return Err(io::Error::other(format!(
                        "all {slots} connection slots are in use (--max-connections)"
                    )));
                }
                self.conns.push(None);
                self.conns.len() - 1
            }
        };
        if let Some(k) = &mut self.keep {
            match kept {
                Some(uid) => k.prepare_kept(slot, &mut conn, self.cfg.buf_alloc, uid),
                None => k.prepare(slot, &mut conn, self.cfg.buf_alloc),
            }
        }
        if matches!(conn.state, State::AwaitLine) {
            if let Some(area) = self.line_area(slot) {
                // SAFETY: the slot's data area holds at least
                // `MAX_LINE_BYTES` (`line_area` checks) and belongs to the
                // connection being inserted, which has not used it yet.
                unsafe { std::ptr::write_bytes(area, 0, MAX_LINE_BYTES) };
            }
        }
        let events = epoll::Events::EPOLLIN
            | epoll::Events::EPOLLOUT
            | epoll::Events::EPOLLRDHUP
            | epoll::Events::EPOLLET;
        let ev = epoll::Event::new(events, slot as u64);
        let added = match conn.fd() {
            Some(fd) => epoll::ctl(
                self.epoll.as_raw_fd(),
                epoll::ControlOptions::EPOLL_CTL_ADD,
                fd,
                ev,
            ),
            None => Err(io::ErrorKind::NotConnected.into()),
        };
        if let Err(e) = added {
            self.free_slots.push(slot);
            if let Some(k) = &mut self.keep {
                k.store.release_streams(&[conn.uid]);
            }
            return Err(e);
        }
        self.conns[slot] = Some(conn);
        self.commit(slot);
        Ok(slot)
    }

    fn remove(&mut self, slot: usize) {
        let Some(mut conn) = self.conns.get_mut(slot).and_then(Option::take) else {
            return;
        };
        let before = self.completed_tx.len();
        conn.parked.abandon(&mut self.completed_tx);
        self.parked_chains -= self.completed_tx.len() - before;
        if let Some(fd) = conn.fd() {
            let _ = epoll::ctl(
                self.epoll.as_raw_fd(),
                epoll::ControlOptions::EPOLL_CTL_DEL,
                fd,
                epoll::Event::new(epoll::Events::empty(), 0),
            );
        }
        if self.by_key.get(&conn.key) == Some(&slot) {
            self.by_key.remove(&conn.key);
        }
        if let Some(s) = &conn.session {
            if self.sessions.get(&s.token) == Some(&slot) {
                self.sessions.remove(&s.token);
            }
        }
        if let Some(k) = &mut self.keep {
            k.freed(slot, &conn);
        }
        self.free_slots.push(slot);
        debug!("{}: removed", conn.key);
    }

    fn enqueue(&mut self, slot: usize) {
        if let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) {
            if !c.in_rx_queue && c.has_rx_work() {
                c.in_rx_queue = true;
                self.rx_queue.push_back(slot);
            }
        }
    }

    fn reset_conn(&mut self, slot: usize) {
        if let Some(c) = self.conn(slot) {
            c.reset();
            self.stats.resets_sent += 1;
            self.enqueue(slot);
        }
    }

    /// Queues an RST answering `hdr`, a packet for no known connection.
    fn orphan_rst(&mut self, hdr: &PacketHeader) {
        if hdr.op() == OP_RST {
            return;
        }
        if self.orphan_rsts.len() >= MAX_ORPHAN_RSTS {
            warn!("RST queue full: not answering {hdr:?}");
            return;
        }
        let mut rst = PacketHeader::default();
        rst.set_src_cid(HOST_CID)
            .set_dst_cid(self.cfg.guest_cid)
            .set_src_port(hdr.dst_port())
            .set_dst_port(hdr.src_port())
            .set_type(TYPE_STREAM)
            .set_op(OP_RST);
        self.orphan_rsts.push_back(rst);
        self.stats.resets_sent += 1;
    }

    /// Resets the connection a bad packet belongs to, or answers it with an
    /// RST if it belongs to none.
    fn reject(&mut self, hdr: &PacketHeader, why: &str) {
        self.stats.bad_packets += 1;
        warn!("bad packet from guest ({why}): {hdr:?}; resetting its connection");
        let key = ConnKey::of_guest_packet(hdr);
        match self.by_key.get(&key).copied() {
            Some(slot) => self.reset_conn(slot),
            None => self.orphan_rst(hdr),
        }
    }

    /// Handles one packet the guest sent: `pkt` is the readable part of a TX
    /// descriptor chain, header first. The chain can be returned at once.
    pub fn handle_tx(&mut self, pkt: &GuestIovs<'_>) {
        self.handle_tx_inner(pkt, None);
    }

    /// Switches persistence on: connections live in `store`'s slots from
    /// now on. Call before any connection exists.
    pub fn set_store(&mut self, store: Box<dyn ConnStore>) {
        self.keep = Some(Keep::new(store));
    }

    /// [`Muxer::handle_tx`] for chain `chain.head`, which the device may keep
    /// (park) while the host stream is full. Returns true when the chain
    /// can be returned now; otherwise its head comes back later from
    /// [`Muxer::take_completed_tx`].
    ///
    /// # Safety
    ///
    /// `pkt`'s buffers must stay mapped until `head` comes back from
    /// [`Muxer::take_completed_tx`], or [`Muxer::unpark_all`] or
    /// [`Muxer::reset`] is called: call `unpark_all` before guest memory
    /// is remapped or the TX ring stops.
    pub unsafe fn handle_tx_parking(&mut self, chain: TxChain, pkt: &GuestIovs<'_>) -> bool {
        !self.handle_tx_inner(pkt, Some(chain))
    }

    /// How many TX chains the device may hold in all (a share of the TX
    /// queue, so other connections keep room in the ring); 0 disables
    /// parking.
    pub fn set_park_limit(&mut self, chains: usize) {
        self.park_limit = chains;
    }

    /// TX chains held now.
    pub fn parked_chains(&self) -> usize {
        self.parked_chains
    }

    /// Moves the heads of TX chains done with into `out` (cleared first).
    pub fn take_completed_tx(&mut self, out: &mut Vec<u16>) {
        out.clear();
        std::mem::swap(out, &mut self.completed_tx);
    }

    /// Copies the bytes of every parked TX chain into its connection's
    /// buffer and completes the chains.
    pub fn unpark_all(&mut self) {
        if self.parked_chains == 0 {
            return;
        }
        debug!("unparking {} TX chains", self.parked_chains);
        for conn in self.conns.iter_mut().flatten() {
            conn.unpark(&mut self.completed_tx);
        }
        self.parked_chains = 0;
        // Their bytes are in the buffers now: recorded before the chains
        // go back.
        for slot in 0..self.conns.len() {
            self.commit(slot);
        }
    }

    /// Returns true when the chain was parked.
    fn handle_tx_inner(&mut self, pkt: &GuestIovs<'_>, chain: Option<TxChain>) -> bool {
        let mut raw = [0u8; HEADER_SIZE_BYTES];
        if pkt.read_at(0, &mut raw) < HEADER_SIZE_BYTES {
            self.stats.bad_packets += 1;
            warn!(
                "dropping TX buffer of {} bytes: shorter than a vsock header",
                pkt.len()
            );
            return false;
        }
        let hdr = PacketHeader::from_bytes(&raw);
        debug!("tx {hdr:?}");
        if hdr.src_cid() != self.cfg.guest_cid || hdr.dst_cid() != HOST_CID {
            self.stats.bad_packets += 1;
            warn!(
                "dropping packet with bad addresses (guest CID is {}): {hdr:?}",
                self.cfg.guest_cid
            );
            return false;
        }
        let payload = pkt.len() - HEADER_SIZE_BYTES;
        if hdr.type_() != TYPE_STREAM {
            self.reject(&hdr, "unsupported socket type");
            return false;
        }
        let len = hdr.len() as usize;
        if hdr.op() == OP_RW {
            if len != payload {
                self.reject(&hdr, &format!("header len {len}, buffer holds {payload}"));
                return false;
            }
        } else if len != 0 || payload != 0 {
            self.reject(&hdr, "control packet with payload");
            return false;
        }
        let key = ConnKey::of_guest_packet(&hdr);
        let Some(slot) = self.by_key.get(&key).copied() else {
            match hdr.op() {
                OP_REQUEST => self.guest_connect(&hdr, key, chain),
                OP_RST => {}
                OP_RESPONSE | OP_RW | OP_SHUTDOWN | OP_CREDIT_UPDATE | OP_CREDIT_REQUEST => {
                    debug!("{key}: {} for no connection: RST", op_name(hdr.op()));
                    self.orphan_rst(&hdr);
                }
                _ => self.reject(&hdr, "unknown op"),
            }
            return false;
        };
        let before = self.conn(slot).map(|c| (c.uid, c.rx_cnt()));
        let parked = self.handle_conn_packet(slot, &hdr, pkt, len, chain.map(|c| c.head));
        self.tx_applied(slot, chain, before, len);
        if self.conn(slot).is_some_and(|c| c.broken.is_some()) {
            // A session's stream that broke while its bytes were framed
            // is detached only now, after the chain's commit.
            self.detach(slot);
        }
        self.enqueue(slot);
        parked
    }

    /// Returns true when the packet's chain was parked.
    fn handle_conn_packet(
        &mut self,
        slot: usize,
        hdr: &PacketHeader,
        pkt: &GuestIovs<'_>,
        len: usize,
        head: Option<u16>,
    ) -> bool {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return false;
        };
        if hdr.op() == OP_RST {
            debug!("{}: guest RST", conn.key);
            if conn.session.is_some() {
                conn.end_session("the guest reset the connection".to_string(), true);
                self.tell_client(slot);
            }
            self.remove(slot);
            return false;
        }
        if conn.is_closing() {
            return false;
        }
        let park = head.filter(|_| {
            self.parked_chains < self.park_limit && conn.parked.len() < MAX_PARKED_PER_CONN
        });
        let mut parked = false;
        conn.update_peer_credit(hdr);
        let established = matches!(conn.state, State::Established);
        let result = match hdr.op() {
            OP_RESPONSE if matches!(conn.state, State::LocalInit) => conn.establish().map(|()| {
                debug!("{}: established (host-initiated)", conn.key);
            }),
            OP_RW if established => {
                let scratch = &mut self.scratch;
                // SAFETY: `park` is set only from `handle_tx_parking`, whose
                // contract is `on_rw`'s.
                unsafe { conn.on_rw(pkt, len, park, scratch) }.map(|p| {
                    parked = p;
                })
            }
            OP_SHUTDOWN if established => {
                conn.on_shutdown(hdr.flags());
                Ok(())
            }
            OP_CREDIT_UPDATE => Ok(()),
            OP_CREDIT_REQUEST => {
                conn.owe(owe::CREDIT_UPDATE);
                Ok(())
            }
            OP_REQUEST | OP_RESPONSE | OP_RW | OP_SHUTDOWN => {
                let state = format!("{:?}", conn.state);
                self.reject(hdr, &format!("unexpected in state {state}"));
                return false;
            }
            _ => {
                self.reject(hdr, "unknown op");
                return false;
            }
        };
        if let Err(e) = result {
            warn!("{}: resetting connection: {e}", conn.key);
            self.reset_conn(slot);
        }
        if parked {
            self.parked_chains += 1;
        }
        parked
    }

    /// The guest connects to host port `key.local_port`: the connection
    /// is recorded, its stream kept and the REQUEST's chain counted as
    /// applied before the host connect is made (see `conn`'s `Connecting`).
    fn guest_connect(&mut self, hdr: &PacketHeader, key: ConnKey, chain: Option<TxChain>) {
        let stream = match self.host.open(key.local_port) {
            Ok(s) => s,
            Err(e) => {
                warn!("{key}: cannot open a host stream: {e}: RST");
                return self.orphan_rst(hdr);
            }
        };
        let conn = Connection::new_guest_initiated(stream, key, hdr, self.cfg.buf_alloc);
        match self.insert(conn) {
            Ok(slot) => {
                self.by_key.insert(key, slot);
                let before = self.conn(slot).map(|c| (c.uid, c.rx_cnt()));
                self.tx_applied(slot, chain, before, 0);
                self.finish_guest_connect(slot);
            }
            Err(e) => {
                warn!("{key}: cannot take the connection: {e}: RST");
                self.orphan_rst(hdr);
            }
        }
    }

    /// Makes the host connect of the guest connect in `slot`, recorded in
    /// state `Connecting`: RESPONSE when it succeeds, RST when nobody
    /// listens.
    fn finish_guest_connect(&mut self, slot: usize) {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if !matches!(conn.state, State::Connecting) {
            return;
        }
        let key = conn.key;
        let connected = match &conn.stream {
            Some(stream) => self.host.connect(stream, key.local_port),
            None => Err(io::ErrorKind::NotConnected.into()),
        };
        match connected {
            Ok(()) => {
                crash_point::hit("guest-connect");
                conn.host_connected();
                debug!("{key}: established (guest-initiated)");
            }
            Err(e) => {
                debug!(
                    "{key}: no host service for port {}: {e}: RST",
                    key.local_port
                );
                self.reset_conn(slot);
            }
        }
        self.commit(slot);
        self.enqueue(slot);
    }

    /// Fills RX buffers, in order, with the packets owed to the guest:
    /// RSTs for unknown connections first, then connections round-robin, a
    /// connection's data spread over several buffers by one `readv`. Every
    /// buffer must hold at least a header. `lens[i]` gets the bytes written
    /// to `bufs[i]`; returns how many buffers (a prefix of `bufs`) were
    /// filled. The caller gives the rest back to the ring.
    pub fn fill_rx(&mut self, bufs: &[GuestIovs<'_>], lens: &mut [usize]) -> usize {
        let bufs = &bufs[..bufs.len().min(lens.len()).min(MAX_RX_BATCH)];
        if bufs.iter().any(|b| b.len() < HEADER_SIZE_BYTES) {
            return 0;
        }
        if let Some(k) = &mut self.keep {
            k.in_rx = true;
        }
        let filled = self.fill_rx_inner(bufs, lens);
        if let Some(k) = &mut self.keep {
            k.in_rx = false;
        }
        filled
    }

    fn fill_rx_inner(&mut self, bufs: &[GuestIovs<'_>], lens: &mut [usize]) -> usize {
        let mut i = 0;
        while i < bufs.len() {
            if let Some(rst) = self.orphan_rsts.pop_front() {
                debug!("rx {rst:?}");
                bufs[i].write_at(0, rst.as_slice());
                lens[i] = HEADER_SIZE_BYTES;
                i += 1;
                continue;
            }
            let Some(slot) = self.rx_queue.pop_front() else {
                break;
            };
            let guest_cid = self.cfg.guest_cid;
            let scratch = &mut self.scratch;
            let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                continue;
            };
            if !conn.in_rx_queue {
                continue;
            }
            conn.in_rx_queue = false;
            let fill = conn.fill_rx(guest_cid, &bufs[i..], &mut lens[i..], scratch);
            if conn.session.as_ref().is_some_and(|s| s.ack_after_publish)
                && !self.rx_acks.contains(&slot)
            {
                self.rx_acks.push(slot);
            }
            // A session may change without filling a buffer (an ACK read).
            if fill.is_some() || conn.session.is_some() {
                if let Some(k) = &mut self.keep {
                    k.rx_touched(slot, conn);
                }
            }
            if conn.broken.is_some() {
                self.detach(slot);
            }
            let Some(fill) = fill else {
                continue;
            };
            i += fill.buffers;
            if fill.close {
                self.remove(slot);
            } else {
                self.enqueue(slot);
            }
        }
        i
    }

    /// Handles everything ready on the host side, without blocking.
    pub fn process_host_events(&mut self) {
        loop {
            let n = match epoll::wait(self.epoll.as_raw_fd(), 0, &mut self.events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("host epoll wait failed: {e}");
                    return;
                }
            };
            for i in 0..n {
                let ev = self.events[i];
                let flags = epoll::Events::from_bits_truncate(ev.events);
                if ev.data == LISTENER_TOKEN {
                    self.accept_host_clients();
                } else if ev.data == TIMER_TOKEN {
                    self.grace_timer_fired();
                } else {
                    self.on_host_event(ev.data as usize, flags);
                }
            }
            if n < self.events.len() {
                return;
            }
        }
    }

    fn accept_host_clients(&mut self) {
        loop {
            match self.host.accept() {
                Ok(Some(stream)) => {
                    let conn = Connection::new_host_client(stream, self.cfg.buf_alloc);
                    match self.insert(conn) {
                        // Its line may already be there.
                        Ok(slot) => self.read_connect_line(slot),
                        Err(e) => warn!("cannot take a new host client, closing it: {e}"),
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    warn!("accepting a host client failed: {e}");
                    return;
                }
            }
        }
    }

    /// Takes host client `stream`, accepted by someone else (the keeper),
    /// whose stream the store already keeps under `uid`: the connection
    /// gets that uid and its stream is not kept again. Once its record is
    /// written the store is told ([`ConnStore::kept_stream_recorded`]);
    /// then its `CONNECT` line is read, as for a client accepted here.
    /// Without a store `uid` is not used. A client that cannot be taken is
    /// closed, its kept stream released.
    pub fn add_host_client(&mut self, stream: H::Stream, uid: u64) {
        let conn = Connection::new_host_client(stream, self.cfg.buf_alloc);
        match self.insert_with(conn, Some(uid)) {
            Ok(slot) => {
                if let Some(k) = &mut self.keep {
                    k.store.kept_stream_recorded(uid);
                }
                debug!("host client {uid} taken in slot {slot}");
                // Its line may already be there.
                self.read_connect_line(slot);
            }
            Err(e) => warn!("cannot take host client {uid}, closing it: {e}"),
        }
    }

    fn on_host_event(&mut self, slot: usize, flags: epoll::Events) {
        use epoll::Events as E;
        let Some(conn) = self.conn(slot) else {
            return;
        };
        let readable = flags.intersects(E::EPOLLIN | E::EPOLLRDHUP | E::EPOLLHUP | E::EPOLLERR);
        if flags.intersects(E::EPOLLRDHUP | E::EPOLLHUP) {
            conn.host_rdhup = true;
        }
        if flags.contains(E::EPOLLHUP) {
            conn.host_hup = true;
        }
        if matches!(conn.state, State::AwaitLine) {
            if readable {
                self.read_connect_line(slot);
            }
            return;
        }
        if readable {
            conn.host_readable = true;
        }
        if conn.session.is_some() {
            if readable {
                conn.session_read_host();
            }
            if flags.intersects(E::EPOLLOUT | E::EPOLLERR) {
                conn.session_write();
                conn.settle_now();
            }
            return self.after_session_io(slot);
        }
        if flags.intersects(E::EPOLLOUT | E::EPOLLERR) && !conn.is_closing() {
            let before = self.completed_tx.len();
            let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
                return;
            };
            let result = conn.on_host_writable(&mut self.scratch, &mut self.completed_tx);
            self.parked_chains -= self.completed_tx.len() - before;
            if let Err(e) = result {
                warn!("{}: resetting connection: {e}", conn.key);
                self.reset_conn(slot);
            }
            // Bytes forwarded are recorded before their chains go back.
            self.commit(slot);
        }
        self.enqueue(slot);
    }

    /// Takes a host client's `CONNECT <port>` line once it is complete.
    ///
    /// The line is peeked until its newline is there, then exactly its
    /// bytes are read, into the slot's line area (the start of its data
    /// area, zeroed when the client was recorded). A successor that finds
    /// a newline there knows the line was consumed, and takes it from
    /// there; one that finds none knows it is still in the socket. Bytes
    /// after the newline stay in the socket as stream data.
    fn read_connect_line(&mut self, slot: usize) {
        let Some(conn) = self.conn(slot) else { return };
        if !matches!(conn.state, State::AwaitLine) {
            return;
        }
        let Some(fd) = conn.fd() else { return };
        let mut peeked = [0u8; MAX_LINE_BYTES];
        let n = match peek_fd(fd, &mut peeked) {
            Ok(0) => {
                debug!("host client left before its CONNECT line");
                return self.remove(slot);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                debug!("host client read failed: {e}");
                return self.remove(slot);
            }
        };
        let len = match find_line(&peeked[..n]) {
            Ok(None) => return,
            Ok(Some(len)) => len,
            Err(e) => {
                warn!("closing host client: {e}");
                return self.remove(slot);
            }
        };
        let mut local = [0u8; MAX_LINE_BYTES];
        let line: &mut [u8] = match self.line_area(slot) {
            // SAFETY: the slot's data area, valid for `MAX_LINE_BYTES`
            // (`line_area` checks) and used by this connection alone
            // (`ConnStore`'s contract); nothing else holds a reference to
            // it while the connection waits for its line.
            Some(area) => unsafe { std::slice::from_raw_parts_mut(area, len) },
            None => &mut local[..len],
        };
        let mut got = 0;
        while got < len {
            match read_fd(fd, &mut line[got..]) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    debug!("host client read failed: {e}");
                    return self.remove(slot);
                }
            }
        }
        crash_point::hit("line-read");
        if got < len {
            // Only this process reads the socket: the bytes peeked are there.
            warn!("host client: {got} of the {len} bytes of its CONNECT line read; closing it");
            return self.remove(slot);
        }
        let parsed = parse_line(line);
        self.take_connect_line(slot, parsed);
    }

    /// The line area of `slot`: where its host client's `CONNECT` line is
    /// read to, so that a successor finds it. `None` without a store.
    pub(super) fn line_area(&self, slot: usize) -> Option<*mut u8> {
        let k = self.keep.as_ref()?;
        if k.store.data_bytes() < MAX_LINE_BYTES {
            return None;
        }
        k.store.data_area(slot)
    }

    /// The host client in `slot` sent a complete line: it connects, or
    /// resumes a session, or is closed if the line was malformed.
    pub(super) fn take_connect_line(&mut self, slot: usize, line: Result<Line, LineError>) {
        match line {
            Ok(Line::Connect { port, resumable }) => self.start_host_connect(slot, port, resumable),
            Ok(Line::Resume { token, received }) => {
                return self.resume_session(slot, token, received)
            }
            Err(e) => {
                warn!("closing host client: {e}");
                self.remove(slot);
            }
        }
        self.commit(slot);
    }

    fn start_host_connect(&mut self, slot: usize, port: u32, resumable: bool) {
        let local_port = self.alloc_local_port(port);
        let key = ConnKey {
            local_port,
            peer_port: port,
        };
        if resumable && !self.open_session(slot) {
            return;
        }
        let Some(conn) = self.conn(slot) else { return };
        conn.start_local_init(key);
        self.by_key.insert(key, slot);
        debug!("{key}: host client connects to guest port {port}");
        self.enqueue(slot);
    }

    fn alloc_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = if p == u32::MAX - 1 {
                FIRST_LOCAL_PORT
            } else {
                p + 1
            };
            let key = ConnKey {
                local_port: p,
                peer_port,
            };
            if !self.by_key.contains_key(&key) {
                return p;
            }
        }
    }
}
