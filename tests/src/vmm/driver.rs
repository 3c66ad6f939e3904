//! The guest half: a virtio-vsock driver over the rings in guest memory,
//! behaving like Linux's (net/vmw_vsock/virtio_transport*.c).
//!
//! All driver state sits behind one mutex. The driver thread waits on the
//! call eventfds and a control eventfd; it reads the used rings of the
//! queues that were signalled, delivers RX packets to connections, refills
//! the RX ring, and puts queued packets on the TX ring. Application threads
//! (streams, listeners) take the same mutex, put their packets on the TX
//! ring themselves and wait on the condition variable.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::frontend::{QueueSetup, VhostFrontend};
use super::memory::{Bump, GuestRam};
use super::options::{TxLayout, VmOptions, VmStats, MAX_TX_PIECES};
use super::packet::*;
use super::ring::{Desc, DriverRing, Link, RawEntry, RingAddrs, Token, DESC_F_WRITE};

/// Queue indices (virtio 1.2, 5.10.2).
pub const RX: usize = 0;
pub const TX: usize = 1;
pub const EVENT: usize = 2;

/// Event buffers Linux keeps posted.
const EVENT_BUFS: u32 = 8;
/// Bytes left between the pieces of a TX packet split over descriptors,
/// so that a device assuming contiguity reads garbage.
const TX_GAP: u64 = 64;
/// Guest memory for the data of injected descriptors.
const SCRATCH_BYTES: u64 = (1 << 20) + (128 << 10);
/// Anomalies kept (the first ones).
const MAX_ANOMALIES: usize = 1000;

/// Where everything lives in guest memory.
pub(crate) struct Layout {
    /// Two sets of ring addresses: a driver reset moves to the other one.
    pub rings: [Vec<RingAddrs>; 2],
    rx_bufs: u64,
    pub rx_count: u32,
    ev_bufs: u64,
    tx_slots: u64,
    tx_slot_size: u64,
    pub tx_slot_count: u32,
    scratch: u64,
}

impl Layout {
    fn new(ram: &GuestRam, o: &VmOptions) -> io::Result<Layout> {
        let mut bump = Bump::new(ram);
        let mut rings: [Vec<RingAddrs>; 2] = [Vec::new(), Vec::new()];
        for set in rings.iter_mut() {
            for _ in 0..o.queues {
                set.push(RingAddrs::allocate(&mut bump, o.queue_size)?);
            }
        }
        let rx_count = u32::from(o.queue_size);
        let rx_bufs = bump.take(
            u64::from(rx_count) * u64::from(o.rx_buf_size),
            4096,
            "RX buffers",
        )?;
        let ev_bufs = bump.take(4 * u64::from(EVENT_BUFS), 64, "event buffers")?;
        let tx_slot_size =
            (HDR_LEN as u64 + o.tx_max_payload as u64 + TX_GAP * (MAX_TX_PIECES as u64 + 2))
                .next_multiple_of(4096);
        let tx_slot_count = u32::from(o.queue_size).min(256);
        let tx_slots = bump.take(tx_slot_size * u64::from(tx_slot_count), 4096, "TX buffers")?;
        let scratch = bump.take(SCRATCH_BYTES, 4096, "injected descriptors")?;
        Ok(Layout {
            rings,
            rx_bufs,
            rx_count,
            ev_bufs,
            tx_slots,
            tx_slot_size,
            tx_slot_count,
            scratch,
        })
    }

    fn rx_buf(&self, o: &VmOptions, i: u32) -> u64 {
        self.rx_bufs + u64::from(i) * u64::from(o.rx_buf_size)
    }

    fn ev_buf(&self, i: u32) -> u64 {
        self.ev_bufs + 4 * u64::from(i)
    }

    fn tx_slot(&self, i: u32) -> u64 {
        self.tx_slots + u64::from(i) * self.tx_slot_size
    }
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// REQUEST sent, waiting for RESPONSE or RST.
    Connecting,
    /// Connected (possibly half closed).
    Established,
    /// This side closed (SHUTDOWN sent); waiting for the peer's RST.
    Closing,
    /// Gone from the connection table.
    Closed,
}

/// A snapshot of a connection, for tests.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub local_port: u32,
    pub peer_port: u32,
    pub state: ConnState,
    /// SHUTDOWN flags received.
    pub peer_shutdown: u32,
    /// SHUTDOWN flags sent.
    pub local_shutdown: u32,
    /// Whether the peer sent RST.
    pub peer_reset: bool,
    /// Bytes received and not yet read.
    pub rx_buffered: u32,
    /// Bytes the application has read (the fwd_cnt advertised).
    pub fwd_cnt: u32,
    /// Payload bytes sent.
    pub tx_cnt: u32,
    /// The peer's last advertised buf_alloc and fwd_cnt.
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// Bytes the driver may still send.
    pub credit: u32,
}

pub(crate) struct Conn {
    local_port: u32,
    peer_port: u32,
    state: ConnState,
    rx: VecDeque<Vec<u8>>,
    rx_off: usize,
    rx_bytes: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
    last_fwd_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
    peer_shutdown: u32,
    local_shutdown: u32,
    peer_reset: bool,
    /// The handshake completed (it may have been closed since).
    connected: bool,
    /// Linux's SOCK_DONE: the connection is over for the peer.
    done: bool,
    /// Still in the port table (packets can reach it).
    indexed: bool,
    /// The error reads and writes report once buffered data is read.
    error: Option<(io::ErrorKind, String)>,
    close_deadline: Option<Instant>,
    close_timed_out: bool,
    /// No stream refers to it any more: remove it once closed.
    orphan: bool,
}

impl Conn {
    fn new(local_port: u32, peer_port: u32, state: ConnState, buf_alloc: u32) -> Conn {
        Conn {
            local_port,
            peer_port,
            state,
            rx: VecDeque::new(),
            rx_off: 0,
            rx_bytes: 0,
            buf_alloc,
            fwd_cnt: 0,
            last_fwd_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            peer_shutdown: 0,
            local_shutdown: 0,
            peer_reset: false,
            connected: state == ConnState::Established,
            done: false,
            indexed: true,
            error: None,
            close_deadline: None,
            close_timed_out: false,
            orphan: false,
        }
    }

    fn credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn info(&self) -> ConnInfo {
        ConnInfo {
            local_port: self.local_port,
            peer_port: self.peer_port,
            state: self.state,
            peer_shutdown: self.peer_shutdown,
            local_shutdown: self.local_shutdown,
            peer_reset: self.peer_reset,
            rx_buffered: self.rx_bytes,
            fwd_cnt: self.fwd_cnt,
            tx_cnt: self.tx_cnt,
            peer_buf_alloc: self.peer_buf_alloc,
            peer_fwd_cnt: self.peer_fwd_cnt,
            credit: self.credit(),
        }
    }
}

/// A TX slot and ring room held for a packet being copied in.
struct TxReservation {
    slot: u32,
    pieces: usize,
    generation: u64,
}

/// A packet waiting for room on the TX ring.
struct OutPkt {
    hdr: Header,
    payload: Vec<u8>,
}

pub(crate) struct Listener {
    backlog: VecDeque<u64>,
}

pub(crate) struct State {
    /// The rings are started and the guest runs.
    pub running: bool,
    /// A frontend connection exists.
    pub attached: bool,
    pub shutdown: bool,
    /// Process every queue at the next service, notified or not (after a
    /// start: the guest handles interrupts that came while it was paused).
    force_process: bool,
    pub guest_cid: u64,
    event_idx: bool,
    pub rings: Vec<DriverRing>,
    /// Which of the two ring sets is in use.
    pub ring_set: usize,
    pub stopped_bases: Option<Vec<u16>>,
    kicks: Vec<EventFd>,
    rx_free: Vec<u32>,
    ev_free: Vec<u32>,
    tx_slots_free: Vec<u32>,
    pub hold_rx: bool,
    pending: VecDeque<OutPkt>,
    pending_bytes: usize,
    /// TX slots application threads are filling without the lock, and the
    /// descriptors kept for them.
    tx_reservations: usize,
    tx_reserved_descs: usize,
    /// Changes whenever the TX slots and rings are rebuilt, so that a
    /// reservation from before is not committed to the new rings.
    tx_generation: u64,
    conns: HashMap<u64, Conn>,
    by_ports: HashMap<(u32, u32), u64>,
    listeners: HashMap<u32, Listener>,
    next_id: u64,
    next_port: u32,
    injections: HashMap<u64, Option<u32>>,
    /// Descriptors of chains injected on the RX queue, to read what the
    /// device wrote into them.
    injected_rx: HashMap<u64, Vec<RawEntry>>,
    next_injection: u64,
    scratch_next: u64,
    pub stats: VmStats,
    pub anomalies: Vec<String>,
}

/// Everything the VM, its streams and the driver thread share.
pub(crate) struct Inner {
    pub opts: VmOptions,
    pub ram: GuestRam,
    pub layout: Layout,
    pub socket: PathBuf,
    state: Mutex<State>,
    cond: Condvar,
    ctl: EventFd,
    calls: Vec<EventFd>,
    /// The vhost-user connection; lifecycle operations hold this lock
    /// first, then the state lock, never the other way round.
    pub fe: Mutex<Option<VhostFrontend>>,
}

fn random_u32() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut z = (t.as_nanos() as u64) ^ (u64::from(std::process::id()) << 32);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as u32
}

/// Linux's LAST_RESERVED_PORT.
const LAST_RESERVED_PORT: u32 = 1023;

pub(crate) fn err(kind: io::ErrorKind, msg: impl Into<String>) -> io::Error {
    io::Error::new(kind, msg.into())
}

/// Waits on `cond` until `deadline` (forever when `None`); returns false
/// when the deadline has passed.
fn wait<'a>(
    cond: &Condvar,
    g: MutexGuard<'a, State>,
    deadline: Option<Instant>,
) -> (MutexGuard<'a, State>, bool) {
    match deadline {
        None => (cond.wait(g).unwrap_or_else(|e| e.into_inner()), true),
        Some(d) => {
            let now = Instant::now();
            if now >= d {
                return (g, false);
            }
            let (g, _) = cond
                .wait_timeout(g, d - now)
                .unwrap_or_else(|e| e.into_inner());
            (g, true)
        }
    }
}

/// Raw descriptor address: data placed in guest memory by the driver, or
/// any guest physical address.
#[derive(Debug, Clone)]
pub enum RawAddr {
    Data(Vec<u8>),
    Gpa(u64),
}

/// One descriptor of an injected chain.
#[derive(Debug, Clone)]
pub struct RawDesc {
    pub addr: RawAddr,
    /// Length in the descriptor; the data's length when `None`.
    pub len: Option<u32>,
    /// Flags other than NEXT.
    pub flags: u16,
    /// `None`: NEXT to the following entry, or the end for the last one.
    pub link: Option<Link>,
}

impl RawDesc {
    /// A device-readable descriptor holding `bytes`.
    pub fn data(bytes: impl Into<Vec<u8>>) -> RawDesc {
        RawDesc {
            addr: RawAddr::Data(bytes.into()),
            len: None,
            flags: 0,
            link: None,
        }
    }

    /// A descriptor at an arbitrary guest physical address.
    pub fn at(gpa: u64, len: u32) -> RawDesc {
        RawDesc {
            addr: RawAddr::Gpa(gpa),
            len: Some(len),
            flags: 0,
            link: None,
        }
    }

    /// Marks it device-writable.
    pub fn writable(mut self) -> RawDesc {
        self.flags |= DESC_F_WRITE;
        self
    }

    /// Adds flags.
    pub fn flags(mut self, f: u16) -> RawDesc {
        self.flags |= f;
        self
    }

    /// Overrides the length.
    pub fn len(mut self, len: u32) -> RawDesc {
        self.len = Some(len);
        self
    }

    /// Sets where NEXT points.
    pub fn link(mut self, l: Link) -> RawDesc {
        self.link = Some(l);
        self
    }
}

/// What happened to an injected chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Injection {
    /// The head descriptor's index.
    pub head: u16,
    /// Whether the device put it on the used ring in time.
    pub returned: bool,
    /// The used length it reported.
    pub used_len: Option<u32>,
}

impl Inner {
    pub fn new(socket: PathBuf, opts: VmOptions) -> io::Result<Inner> {
        opts.validate()?;
        let ram = GuestRam::new(opts.mem_base, opts.mem_size)?;
        let layout = Layout::new(&ram, &opts)?;
        let calls = (0..opts.queues)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        let ctl = EventFd::new(EFD_NONBLOCK)?;
        let state = State {
            running: false,
            attached: false,
            shutdown: false,
            force_process: false,
            guest_cid: 0,
            event_idx: false,
            rings: Vec::new(),
            ring_set: 1,
            stopped_bases: None,
            kicks: Vec::new(),
            rx_free: Vec::new(),
            ev_free: Vec::new(),
            tx_slots_free: Vec::new(),
            hold_rx: false,
            pending: VecDeque::new(),
            pending_bytes: 0,
            tx_reservations: 0,
            tx_reserved_descs: 0,
            tx_generation: 0,
            conns: HashMap::new(),
            by_ports: HashMap::new(),
            listeners: HashMap::new(),
            next_id: 1,
            next_port: LAST_RESERVED_PORT + 1 + random_u32() % (u32::MAX - 2 - LAST_RESERVED_PORT),
            injections: HashMap::new(),
            injected_rx: HashMap::new(),
            next_injection: 1,
            scratch_next: 0,
            stats: VmStats::default(),
            anomalies: Vec::new(),
        };
        Ok(Inner {
            opts,
            ram,
            layout,
            socket,
            state: Mutex::new(state),
            cond: Condvar::new(),
            ctl,
            calls,
            fe: Mutex::new(None),
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn wake_driver(&self) {
        let _ = self.ctl.write(1);
    }

    pub fn notify_all(&self) {
        self.cond.notify_all();
    }

    fn anomaly(&self, st: &mut State, msg: String) {
        if st.anomalies.len() < MAX_ANOMALIES {
            eprintln!("virtual vm: device anomaly: {msg}");
            st.anomalies.push(msg);
        }
    }

    // ----- device lifecycle -----

    /// Starts the device over `fe`. `fresh`: a driver (re)initialisation,
    /// with new rings at the other ring set and base 0; otherwise a resume
    /// with the ring state and the bases returned at stop.
    pub fn start_device(&self, fe: &mut VhostFrontend, fresh: bool) -> io::Result<()> {
        let (setups, kicks) = {
            let mut st = self.lock();
            if fresh {
                st.ring_set ^= 1;
                st.event_idx = fe.event_idx();
                st.guest_cid = fe.guest_cid;
                let set = st.ring_set;
                let event_idx = st.event_idx;
                st.rings = self.layout.rings[set]
                    .iter()
                    .map(|a| DriverRing::new(&self.ram, self.opts.queue_size, *a, event_idx))
                    .collect();
                st.rx_free = (0..self.layout.rx_count).rev().collect();
                st.ev_free = if self.opts.queues > EVENT {
                    (0..EVENT_BUFS.min(u32::from(self.opts.queue_size)))
                        .rev()
                        .collect()
                } else {
                    Vec::new()
                };
                st.tx_slots_free = (0..self.layout.tx_slot_count).rev().collect();
                st.tx_generation += 1;
                st.stopped_bases = None;
            }
            let bases = match (&st.stopped_bases, fresh) {
                (Some(b), false) => b.clone(),
                (None, false) => {
                    return Err(err(io::ErrorKind::Other, "resume without a stop"));
                }
                (_, true) => vec![0; self.opts.queues],
            };
            let setups: Vec<QueueSetup> = st
                .rings
                .iter()
                .zip(bases)
                .map(|(r, base)| QueueSetup {
                    size: r.size(),
                    addrs: r.addrs(),
                    base,
                })
                .collect();
            // QEMU hands over new host notifiers at every start, created
            // signalled.
            let kicks = (0..self.opts.queues)
                .map(|_| {
                    let k = EventFd::new(EFD_NONBLOCK)?;
                    if self.opts.kick_on_start {
                        k.write(1)?;
                    }
                    Ok(k)
                })
                .collect::<io::Result<Vec<_>>>()?;
            st.kicks = kicks
                .iter()
                .map(|k| k.try_clone())
                .collect::<io::Result<Vec<_>>>()?;
            (setups, kicks)
        };
        fe.start(&self.ram, &setups, &kicks, &self.calls)?;
        let mut st = self.lock();
        st.running = true;
        st.attached = true;
        st.stopped_bases = None;
        st.force_process = true;
        if fresh {
            // Linux: virtio_vsock_probe fills the RX and event queues once
            // the device is ready, and kicks them.
            self.post_rx(&mut st);
            self.post_events(&mut st);
        }
        self.flush_tx(&mut st);
        drop(st);
        self.wake_driver();
        Ok(())
    }

    /// Stops the rings (VM stop); the guest does nothing until a start.
    pub fn stop_device(&self, fe: &mut VhostFrontend) -> io::Result<()> {
        {
            let mut st = self.lock();
            if !st.running {
                return Err(err(io::ErrorKind::Other, "the device is not running"));
            }
            st.running = false;
        }
        let bases = fe.stop()?;
        self.lock().stopped_bases = Some(bases);
        Ok(())
    }

    /// Everything the guest had is gone (driver reset, new VMM): every
    /// connection is reset, queued packets and injections are dropped.
    pub fn reset_guest_state(&self, why: &str) {
        let mut st = self.lock();
        st.running = false;
        st.pending.clear();
        st.pending_bytes = 0;
        st.injections.clear();
        st.injected_rx.clear();
        st.by_ports.clear();
        let ids: Vec<u64> = st.conns.keys().copied().collect();
        for id in ids {
            let c = st.conns.get_mut(&id).expect("listed");
            c.state = ConnState::Closed;
            c.indexed = false;
            c.done = true;
            if c.error.is_none() {
                c.error = Some((io::ErrorKind::ConnectionReset, why.to_string()));
            }
            if c.orphan {
                st.conns.remove(&id);
            }
        }
        for l in st.listeners.values_mut() {
            l.backlog.clear();
        }
        drop(st);
        self.notify_all();
    }

    // ----- rings -----

    fn kick(&self, st: &mut State, q: usize) {
        if st.rings[q].publish(&self.ram) {
            st.stats.kicks[q] += 1;
            let _ = st.kicks[q].write(1);
        }
    }

    fn post_rx(&self, st: &mut State) {
        if !st.running || st.hold_rx {
            return;
        }
        let per = if self.opts.rx_split_header { 2 } else { 1 };
        let size = self.opts.rx_buf_size;
        let mut added = false;
        while st.rings[RX].free_descs() >= per {
            let Some(b) = st.rx_free.pop() else { break };
            let addr = self.layout.rx_buf(&self.opts, b);
            let descs: Vec<Desc> = if self.opts.rx_split_header {
                vec![
                    Desc {
                        addr,
                        len: HDR_LEN as u32,
                        flags: DESC_F_WRITE,
                    },
                    Desc {
                        addr: addr + HDR_LEN as u64,
                        len: size - HDR_LEN as u32,
                        flags: DESC_F_WRITE,
                    },
                ]
            } else {
                vec![Desc {
                    addr,
                    len: size,
                    flags: DESC_F_WRITE,
                }]
            };
            st.rings[RX]
                .add(&self.ram, &descs, Token::Rx(b))
                .expect("descriptors counted");
            added = true;
        }
        if added {
            self.kick(st, RX);
        }
    }

    fn post_events(&self, st: &mut State) {
        if !st.running || st.rings.len() <= EVENT {
            return;
        }
        let mut added = false;
        while st.rings[EVENT].free_descs() >= 1 {
            let Some(b) = st.ev_free.pop() else { break };
            let d = Desc {
                addr: self.layout.ev_buf(b),
                len: 4,
                flags: DESC_F_WRITE,
            };
            st.rings[EVENT]
                .add(&self.ram, &[d], Token::Event(b))
                .expect("descriptors counted");
            added = true;
        }
        if added {
            self.kick(st, EVENT);
        }
    }

    /// Byte ranges of a packet of `total` bytes, one per descriptor.
    fn pieces(&self, total: usize) -> Vec<(usize, usize)> {
        match self.opts.tx_layout {
            TxLayout::Single => vec![(0, total)],
            TxLayout::HeaderThenPayload => {
                if total == HDR_LEN {
                    vec![(0, HDR_LEN)]
                } else {
                    vec![(0, HDR_LEN), (HDR_LEN, total)]
                }
            }
            TxLayout::PayloadSplit(n) => {
                let len = total - HDR_LEN;
                let mut v = vec![(0, HDR_LEN)];
                // Uneven cut points: piece i ends at len * (i+1)^2 / n^2.
                let mut start = HDR_LEN;
                for i in 1..=n {
                    let end = HDR_LEN + len * i * i / (n * n);
                    if end > start {
                        v.push((start, end));
                        start = end;
                    }
                }
                v
            }
            TxLayout::HeaderSplit(at) => vec![(0, at), (at, total)],
        }
    }

    /// Takes a TX slot and room for `pieces` descriptors, so that the
    /// packet can be copied into guest memory without the state lock (as
    /// Linux copies into an skb before taking the virtqueue lock). None
    /// when there is no room, packets wait in the queue, or the device is
    /// stopped.
    /// `queued`: the packet is the head of the queue, just taken off it;
    /// any other packet must wait behind what is queued.
    fn reserve_tx(&self, st: &mut State, pieces: usize, queued: bool) -> Option<TxReservation> {
        let free = st.rings[TX]
            .free_descs()
            .saturating_sub(st.tx_reserved_descs);
        let behind_queue = !queued && !st.pending.is_empty();
        if !st.running || behind_queue || st.tx_slots_free.is_empty() || free < pieces {
            return None;
        }
        let slot = st.tx_slots_free.pop()?;
        st.tx_reserved_descs += pieces;
        st.tx_reservations += 1;
        Some(TxReservation {
            slot,
            pieces,
            generation: st.tx_generation,
        })
    }

    /// Copies a packet into a reserved TX slot, laid out as `tx_layout`
    /// says; returns its descriptors. Needs no lock: the slot is ours.
    fn fill_slot(&self, slot: u32, hdr: &Header, payload: &[u8]) -> Vec<Desc> {
        let pieces = self.pieces(HDR_LEN + payload.len());
        let base = self.layout.tx_slot(slot);
        let hb = hdr.to_bytes();
        let mut descs = Vec::with_capacity(pieces.len());
        for (i, &(s, e)) in pieces.iter().enumerate() {
            let addr = base + s as u64 + TX_GAP * i as u64;
            if s < HDR_LEN {
                let he = e.min(HDR_LEN);
                self.ram.write(addr, &hb[s..he]);
                if e > HDR_LEN {
                    self.ram
                        .write(addr + (he - s) as u64, &payload[..e - HDR_LEN]);
                }
            } else {
                self.ram.write(addr, &payload[s - HDR_LEN..e - HDR_LEN]);
            }
            descs.push(Desc {
                addr,
                len: (e - s) as u32,
                flags: 0,
            });
        }
        descs
    }

    /// Puts a filled slot on the TX ring (not yet published). If the
    /// device stopped meanwhile the packet waits in the queue; if the
    /// rings were rebuilt (driver reset) it is dropped with its
    /// connection.
    fn commit_tx(
        &self,
        st: &mut State,
        r: TxReservation,
        descs: &[Desc],
        hdr: &Header,
        payload: &[u8],
    ) {
        st.tx_reserved_descs -= r.pieces;
        st.tx_reservations -= 1;
        if r.generation != st.tx_generation {
            return;
        }
        if !st.running {
            st.tx_slots_free.push(r.slot);
            st.pending_bytes += payload.len();
            st.pending.push_back(OutPkt {
                hdr: *hdr,
                payload: payload.to_vec(),
            });
            return;
        }
        st.rings[TX]
            .add(&self.ram, descs, Token::Tx(r.slot))
            .expect("descriptors reserved");
        st.stats.tx_packets += 1;
        st.stats.tx_bytes += payload.len() as u64;
        match hdr.op {
            OP_RST => st.stats.rst_sent += 1,
            OP_CREDIT_UPDATE => st.stats.credit_updates_sent += 1,
            _ => {}
        }
    }

    /// Puts one packet on the TX ring (not yet published). False when
    /// there is no room. `queued`: as `reserve_tx`.
    fn place(&self, st: &mut State, hdr: &Header, payload: &[u8], queued: bool) -> bool {
        let pieces = self.pieces(HDR_LEN + payload.len()).len();
        let Some(r) = self.reserve_tx(st, pieces, queued) else {
            return false;
        };
        let descs = self.fill_slot(r.slot, hdr, payload);
        self.commit_tx(st, r, &descs, hdr, payload);
        true
    }

    /// Sends a packet: straight onto the ring when nothing is queued before
    /// it and there is room, else queued. `publish`: make it visible and
    /// kick now (application threads); the driver thread publishes once
    /// per batch.
    fn send(&self, st: &mut State, hdr: Header, payload: &[u8], publish: bool) {
        if st.tx_reservations == 0 && self.place(st, &hdr, payload, false) {
            if publish {
                self.kick(st, TX);
            }
            return;
        }
        st.pending_bytes += payload.len();
        st.pending.push_back(OutPkt {
            hdr,
            payload: payload.to_vec(),
        });
    }

    /// Moves queued packets onto the TX ring while there is room.
    fn flush_tx(&self, st: &mut State) {
        if !st.running {
            return;
        }
        // Not while application threads copy into reserved slots: what
        // waits here may have to follow their packets (a SHUTDOWN after
        // the last write).
        while st.tx_reservations == 0 {
            let Some(p) = st.pending.pop_front() else {
                break;
            };
            // The head of the queue: packets behind it wait for it, not it
            // for them (regression: two queued packets blocked each other
            // forever).
            if self.place(st, &p.hdr, &p.payload, true) {
                st.pending_bytes -= p.payload.len();
            } else {
                st.pending.push_front(p);
                break;
            }
        }
        // Also publishes what the driver thread placed during its batch.
        self.kick(st, TX);
    }

    // ----- the driver thread -----

    /// One round of the driver thread after a wake-up.
    fn service(&self, st: &mut State, notified: [bool; 3]) {
        if st.running {
            let force = std::mem::take(&mut st.force_process);
            if force || notified[TX] {
                self.process_tx_used(st);
            }
            if force || notified[RX] {
                self.process_rx_used(st);
            }
            if st.rings.len() > EVENT && (force || notified[EVENT]) {
                self.process_events(st);
            }
        }
        self.check_timers(st);
        if st.running {
            self.post_rx(st);
            self.post_events(st);
            self.flush_tx(st);
        }
    }

    fn process_tx_used(&self, st: &mut State) {
        loop {
            while let Some(r) = st.rings[TX].pop_used(&self.ram) {
                st.stats.used[TX] += 1;
                match r {
                    Err(e) => self.anomaly(st, format!("TX queue: {e}")),
                    Ok(u) => match u.token {
                        Token::Tx(slot) => {
                            st.tx_slots_free.push(slot);
                        }
                        Token::Injected(id) => {
                            if let Some(v) = st.injections.get_mut(&id) {
                                *v = Some(u.len);
                            }
                        }
                        t => self.anomaly(st, format!("TX queue returned {t:?}")),
                    },
                }
            }
            if !st.rings[TX].enable_notifications(&self.ram) {
                break;
            }
        }
    }

    fn process_rx_used(&self, st: &mut State) {
        loop {
            while let Some(r) = st.rings[RX].pop_used(&self.ram) {
                st.stats.used[RX] += 1;
                match r {
                    Err(e) => self.anomaly(st, format!("RX queue: {e}")),
                    Ok(u) => match u.token {
                        Token::Rx(b) => {
                            let addr = self.layout.rx_buf(&self.opts, b);
                            let cap = self.opts.rx_buf_size;
                            self.rx_buffer(st, &[(addr, cap)], u.len);
                            st.rx_free.push(b);
                        }
                        Token::Injected(id) => {
                            if let Some(v) = st.injections.get_mut(&id) {
                                *v = Some(u.len);
                            }
                            // A packet the device wrote into an injected
                            // chain is delivered like any other.
                            if let Some(entries) = st.injected_rx.remove(&id) {
                                if u.len > 0 {
                                    let parts: Vec<(u64, u32)> = entries
                                        .iter()
                                        .filter(|e| e.flags & DESC_F_WRITE != 0)
                                        .map(|e| (e.addr, e.len))
                                        .collect();
                                    self.rx_buffer(st, &parts, u.len);
                                }
                            }
                        }
                        t => self.anomaly(st, format!("RX queue returned {t:?}")),
                    },
                }
            }
            if !st.rings[RX].enable_notifications(&self.ram) {
                break;
            }
        }
    }

    fn process_events(&self, st: &mut State) {
        loop {
            while let Some(r) = st.rings[EVENT].pop_used(&self.ram) {
                st.stats.used[EVENT] += 1;
                match r {
                    Err(e) => self.anomaly(st, format!("event queue: {e}")),
                    Ok(u) => match u.token {
                        Token::Event(b) => {
                            let id = self.ram.read_u32(self.layout.ev_buf(b));
                            st.ev_free.push(b);
                            st.stats.events += 1;
                            if u.len < 4 {
                                self.anomaly(st, format!("event of {} bytes", u.len));
                            } else if id == EVENT_TRANSPORT_RESET {
                                self.transport_reset(st);
                            } else {
                                self.anomaly(st, format!("unknown event id {id}"));
                            }
                        }
                        Token::Injected(id) => {
                            if let Some(v) = st.injections.get_mut(&id) {
                                *v = Some(u.len);
                            }
                        }
                        t => self.anomaly(st, format!("event queue returned {t:?}")),
                    },
                }
            }
            if !st.rings[EVENT].enable_notifications(&self.ram) {
                break;
            }
        }
    }

    /// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: Linux resets every connected
    /// socket with ECONNRESET.
    fn transport_reset(&self, st: &mut State) {
        let ids: Vec<u64> = st.conns.keys().copied().collect();
        for id in ids {
            let c = st.conns.get_mut(&id).expect("listed");
            if c.state == ConnState::Closed {
                continue;
            }
            c.state = ConnState::Closed;
            c.done = true;
            c.error = Some((
                io::ErrorKind::ConnectionReset,
                "transport reset event".to_string(),
            ));
            self.unindex(st, id);
        }
    }

    fn check_timers(&self, st: &mut State) {
        let now = Instant::now();
        let due: Vec<u64> = st
            .conns
            .iter()
            .filter(|(_, c)| {
                c.state == ConnState::Closing && c.close_deadline.is_some_and(|d| d <= now)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in due {
            // Linux's virtio_transport_close_timeout: RST, then done.
            let c = st.conns.get_mut(&id).expect("listed");
            c.close_timed_out = true;
            let hdr = self.conn_hdr(st.guest_cid, c, OP_RST, 0, 0);
            self.finish(st, id);
            self.send(st, hdr, &[], false);
        }
    }

    /// Reads and dispatches one used RX buffer made of `parts` (guest
    /// address, length), of which the device used `len` bytes.
    fn rx_buffer(&self, st: &mut State, parts: &[(u64, u32)], len: u32) {
        let cap: u32 = parts.iter().map(|p| p.1).sum();
        if (len as usize) < HDR_LEN {
            self.anomaly(
                st,
                format!("RX buffer returned with {len} bytes, less than a header"),
            );
            return;
        }
        let len = if len > cap {
            self.anomaly(
                st,
                format!("RX used length {len} exceeds the {cap}-byte buffer"),
            );
            cap
        } else {
            len
        };
        // The packet as the device wrote it, across the buffer's parts.
        let mut bytes = vec![0u8; len as usize];
        let mut off = 0usize;
        for &(addr, plen) in parts {
            if off == bytes.len() {
                break;
            }
            let n = (plen as usize).min(bytes.len() - off);
            let inside = addr >= self.ram.base()
                && addr
                    .checked_add(n as u64)
                    .is_some_and(|e| e <= self.ram.end());
            if inside {
                self.ram.read(addr, &mut bytes[off..off + n]);
            }
            off += n;
        }
        let hdr = Header::from_bytes(&bytes).expect("44 bytes");
        let room = len - HDR_LEN as u32;
        if hdr.len > room {
            self.anomaly(
                st,
                format!(
                    "RX {} packet says len {} but the used length {len} leaves {room} bytes: dropped",
                    op_name(hdr.op),
                    hdr.len
                ),
            );
            return;
        }
        if hdr.len < room {
            self.anomaly(
                st,
                format!(
                    "RX used length {len} is more than the {}-byte {} packet",
                    HDR_LEN as u32 + hdr.len,
                    op_name(hdr.op)
                ),
            );
        }
        bytes.truncate(HDR_LEN + hdr.len as usize);
        let payload = bytes.split_off(HDR_LEN);
        st.stats.rx_packets += 1;
        st.stats.rx_bytes += u64::from(hdr.len);
        self.handle_packet(st, hdr, payload);
    }

    fn conn_hdr(&self, cid: u64, c: &Conn, op: u16, flags: u32, len: u32) -> Header {
        Header {
            src_cid: cid,
            dst_cid: HOST_CID,
            src_port: c.local_port,
            dst_port: c.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: c.buf_alloc,
            fwd_cnt: c.fwd_cnt,
        }
    }

    /// Sends a control packet on connection `id`.
    fn send_ctl(&self, st: &mut State, id: u64, op: u16, flags: u32, publish: bool) {
        let cid = st.guest_cid;
        let Some(c) = st.conns.get_mut(&id) else {
            return;
        };
        let hdr = self.conn_hdr(cid, c, op, flags, 0);
        c.last_fwd_cnt = c.fwd_cnt;
        self.send(st, hdr, &[], publish);
    }

    /// Linux's virtio_transport_reset_no_sock: RST for a packet that
    /// matches no socket.
    fn reset_no_sock(&self, st: &mut State, h: &Header) {
        let hdr = Header {
            src_cid: st.guest_cid,
            dst_cid: h.src_cid,
            src_port: h.dst_port,
            dst_port: h.src_port,
            len: 0,
            type_: h.type_,
            op: OP_RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        };
        self.send(st, hdr, &[], false);
    }

    fn unindex(&self, st: &mut State, id: u64) {
        if let Some(c) = st.conns.get_mut(&id) {
            if c.indexed {
                c.indexed = false;
                let key = (c.local_port, c.peer_port);
                if st.by_ports.get(&key) == Some(&id) {
                    st.by_ports.remove(&key);
                }
            }
        }
    }

    /// The connection is over: closed, out of the table, and removed if
    /// no stream refers to it.
    fn finish(&self, st: &mut State, id: u64) {
        self.unindex(st, id);
        if let Some(c) = st.conns.get_mut(&id) {
            c.state = ConnState::Closed;
            c.done = true;
            if c.orphan {
                st.conns.remove(&id);
            }
        }
    }

    fn handle_packet(&self, st: &mut State, h: Header, payload: Vec<u8>) {
        if h.src_cid != HOST_CID || h.dst_cid != st.guest_cid {
            self.anomaly(
                st,
                format!(
                    "RX {} from {}:{} to {}:{} (expected from CID {HOST_CID} to CID {})",
                    op_name(h.op),
                    h.src_cid,
                    h.src_port,
                    h.dst_cid,
                    h.dst_port,
                    st.guest_cid
                ),
            );
        }
        if h.op == OP_RST {
            st.stats.rst_received += 1;
        }
        if h.type_ != TYPE_STREAM {
            self.anomaly(st, format!("RX packet of type {}", h.type_));
            if h.op != OP_RST {
                self.reset_no_sock(st, &h);
            }
            return;
        }
        let Some(&id) = st.by_ports.get(&(h.dst_port, h.src_port)) else {
            if h.op == OP_REQUEST {
                if let Some(l) = st.listeners.get(&h.dst_port) {
                    if l.backlog.len() < self.opts.listen_backlog {
                        self.accept_request(st, &h);
                        return;
                    }
                }
            }
            if h.op != OP_RST {
                self.reset_no_sock(st, &h);
            }
            return;
        };
        let guest_cid = st.guest_cid;
        let c = st.conns.get_mut(&id).expect("indexed connections exist");
        // virtio_transport_space_update
        let old_in_flight = c.tx_cnt.wrapping_sub(c.peer_fwd_cnt);
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        let in_flight = c.tx_cnt.wrapping_sub(c.peer_fwd_cnt);
        if in_flight > old_in_flight && in_flight > (1 << 31) {
            let msg = format!(
                "{}:{}: peer fwd_cnt {} is ahead of the {} bytes sent",
                c.local_port, c.peer_port, h.fwd_cnt, c.tx_cnt
            );
            self.anomaly(st, msg);
        }
        let c = st.conns.get_mut(&id).expect("indexed connections exist");
        match c.state {
            ConnState::Connecting => match h.op {
                OP_RESPONSE => {
                    c.state = ConnState::Established;
                    c.connected = true;
                }
                OP_RST => {
                    c.peer_reset = true;
                    c.error = Some((
                        io::ErrorKind::ConnectionReset,
                        format!("connect to port {}: reset by the peer", c.peer_port),
                    ));
                    self.finish(st, id);
                }
                op => {
                    c.error = Some((
                        io::ErrorKind::InvalidData,
                        format!("connect: unexpected {} (EPROTO)", op_name(op)),
                    ));
                    let hdr = self.conn_hdr(guest_cid, c, OP_RST, 0, 0);
                    self.finish(st, id);
                    self.send(st, hdr, &[], false);
                }
            },
            ConnState::Established => match h.op {
                OP_RW => {
                    if c.local_shutdown & SHUTDOWN_RCV != 0 {
                        // Linux drops data after SHUT_RD.
                    } else if u64::from(c.rx_bytes) + u64::from(h.len) > u64::from(c.buf_alloc) {
                        st.stats.credit_violations += 1;
                        let msg = format!(
                            "{}:{}: RW of {} bytes with {} buffered overruns buf_alloc {}: dropped",
                            c.local_port, c.peer_port, h.len, c.rx_bytes, c.buf_alloc
                        );
                        self.anomaly(st, msg);
                    } else if !payload.is_empty() {
                        c.rx_bytes += h.len;
                        c.rx.push_back(payload);
                    }
                }
                OP_CREDIT_UPDATE => {}
                OP_CREDIT_REQUEST => self.send_ctl(st, id, OP_CREDIT_UPDATE, 0, false),
                OP_SHUTDOWN => {
                    c.peer_shutdown |= h.flags & SHUTDOWN_BOTH;
                    if c.peer_shutdown == SHUTDOWN_BOTH {
                        if c.rx_bytes == 0 && !c.done {
                            let hdr = self.conn_hdr(guest_cid, c, OP_RST, 0, 0);
                            self.finish(st, id);
                            self.send(st, hdr, &[], false);
                        } else {
                            self.unindex(st, id);
                        }
                    }
                }
                OP_RST => {
                    c.peer_reset = true;
                    c.peer_shutdown = SHUTDOWN_BOTH;
                    self.finish(st, id);
                }
                op => {
                    let msg = format!(
                        "{}:{}: unexpected {} on an established connection",
                        c.local_port,
                        c.peer_port,
                        op_name(op)
                    );
                    self.anomaly(st, msg);
                }
            },
            ConnState::Closing => {
                if h.op == OP_RST {
                    c.peer_reset = true;
                    self.finish(st, id);
                }
            }
            ConnState::Closed => {}
        }
    }

    fn accept_request(&self, st: &mut State, h: &Header) {
        let id = st.next_id;
        st.next_id += 1;
        let mut c = Conn::new(
            h.dst_port,
            h.src_port,
            ConnState::Established,
            self.opts.buf_alloc,
        );
        c.peer_buf_alloc = h.buf_alloc;
        c.peer_fwd_cnt = h.fwd_cnt;
        st.conns.insert(id, c);
        st.by_ports.insert((h.dst_port, h.src_port), id);
        self.send_ctl(st, id, OP_RESPONSE, 0, false);
        st.listeners
            .get_mut(&h.dst_port)
            .expect("checked")
            .backlog
            .push_back(id);
    }

    // ----- what streams and listeners call -----

    fn conn(st: &mut State, id: u64) -> io::Result<&mut Conn> {
        st.conns
            .get_mut(&id)
            .ok_or_else(|| err(io::ErrorKind::NotConnected, "the connection is gone"))
    }

    fn alive(st: &State) -> io::Result<()> {
        if st.shutdown {
            return Err(err(io::ErrorKind::NotConnected, "the virtual VM is gone"));
        }
        Ok(())
    }

    pub fn connect(&self, port: u32, timeout: Duration) -> io::Result<u64> {
        let mut st = self.lock();
        Self::alive(&st)?;
        if !st.attached {
            return Err(err(io::ErrorKind::NotConnected, "no device"));
        }
        let local = loop {
            let p = st.next_port;
            st.next_port = if p >= u32::MAX - 2 {
                LAST_RESERVED_PORT + 1
            } else {
                p + 1
            };
            if !st.listeners.contains_key(&p) && !st.by_ports.keys().any(|k| k.0 == p) {
                break p;
            }
        };
        let id = st.next_id;
        st.next_id += 1;
        st.conns.insert(
            id,
            Conn::new(local, port, ConnState::Connecting, self.opts.buf_alloc),
        );
        st.by_ports.insert((local, port), id);
        self.send_ctl(&mut st, id, OP_REQUEST, 0, true);
        let deadline = Instant::now() + timeout;
        loop {
            let c = Self::conn(&mut st, id)?;
            // Connected, even if the peer closed again at once (a host
            // that accepts and closes): the application's reads see EOF.
            if c.connected {
                return Ok(id);
            }
            match c.state {
                ConnState::Connecting => {}
                _ => {
                    let e = c.error.clone().unwrap_or((
                        io::ErrorKind::ConnectionReset,
                        "connection closed while connecting".into(),
                    ));
                    st.conns.remove(&id);
                    return Err(err(e.0, e.1));
                }
            }
            let (g, left) = wait(&self.cond, st, Some(deadline));
            st = g;
            if !left {
                // Linux: ETIMEDOUT, the socket just goes back to closed.
                self.unindex(&mut st, id);
                st.conns.remove(&id);
                return Err(err(
                    io::ErrorKind::TimedOut,
                    format!("connect to port {port}: no RESPONSE within {timeout:?}"),
                ));
            }
        }
    }

    pub fn listen(&self, port: u32) -> io::Result<()> {
        let mut st = self.lock();
        Self::alive(&st)?;
        if st.listeners.contains_key(&port) || st.by_ports.keys().any(|k| k.0 == port) {
            return Err(err(
                io::ErrorKind::AddrInUse,
                format!("port {port} is in use"),
            ));
        }
        st.listeners.insert(
            port,
            Listener {
                backlog: VecDeque::new(),
            },
        );
        Ok(())
    }

    pub fn unlisten(&self, port: u32) {
        let mut st = self.lock();
        if let Some(l) = st.listeners.remove(&port) {
            for id in l.backlog {
                self.release(&mut st, id, false);
            }
        }
        drop(st);
        self.notify_all();
    }

    pub fn accept(&self, port: u32, timeout: Option<Duration>) -> io::Result<u64> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.lock();
        loop {
            Self::alive(&st)?;
            let l = st
                .listeners
                .get_mut(&port)
                .ok_or_else(|| err(io::ErrorKind::NotConnected, "not listening"))?;
            if let Some(id) = l.backlog.pop_front() {
                return Ok(id);
            }
            let (g, left) = wait(&self.cond, st, deadline);
            st = g;
            if !left {
                return Err(err(
                    io::ErrorKind::TimedOut,
                    format!("no connection to port {port} within {timeout:?}"),
                ));
            }
        }
    }

    pub fn write(&self, id: u64, buf: &[u8], timeout: Option<Duration>) -> io::Result<usize> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.lock();
        let mut sent = 0usize;
        let partial = |sent: usize, e: io::Error| if sent > 0 { Ok(sent) } else { Err(e) };
        while sent < buf.len() {
            if let Err(e) = Self::alive(&st) {
                return partial(sent, e);
            }
            // Data goes straight into the ring, never into the queue of
            // packets waiting for room: it is copied once, and waits in the
            // caller's buffer while the ring is full or control packets
            // wait before it.
            let ring_open = st.running && st.pending.is_empty();
            let cid = st.guest_cid;
            let c = match Self::conn(&mut st, id) {
                Ok(c) => c,
                Err(e) => return partial(sent, e),
            };
            if let Some((k, m)) = &c.error {
                return partial(sent, err(*k, m.clone()));
            }
            if c.local_shutdown & SHUTDOWN_SEND != 0
                || c.peer_shutdown & SHUTDOWN_RCV != 0
                || c.done
                || c.state != ConnState::Established
            {
                return partial(
                    sent,
                    err(
                        io::ErrorKind::BrokenPipe,
                        "the connection is closed for writing",
                    ),
                );
            }
            let credit = c.credit() as usize;
            if credit > 0 && ring_open {
                let n = credit.min(buf.len() - sent).min(self.opts.tx_max_payload);
                let pieces = self.pieces(HDR_LEN + n).len();
                if let Some(r) = self.reserve_tx(&mut st, pieces, false) {
                    let c = Self::conn(&mut st, id).expect("looked up above");
                    let hdr = self.conn_hdr(cid, c, OP_RW, 0, n as u32);
                    c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
                    c.last_fwd_cnt = c.fwd_cnt;
                    drop(st);
                    let chunk = &buf[sent..sent + n];
                    let descs = self.fill_slot(r.slot, &hdr, chunk);
                    st = self.lock();
                    self.commit_tx(&mut st, r, &descs, &hdr, chunk);
                    // Control packets queued meanwhile follow it.
                    self.flush_tx(&mut st);
                    sent += n;
                    continue;
                }
            }
            let (g, left) = wait(&self.cond, st, deadline);
            st = g;
            if !left {
                return partial(
                    sent,
                    err(
                        io::ErrorKind::TimedOut,
                        format!("write: no credit within {timeout:?}"),
                    ),
                );
            }
        }
        Ok(sent)
    }

    pub fn read(&self, id: u64, buf: &mut [u8], timeout: Option<Duration>) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut st = self.lock();
        loop {
            Self::alive(&st)?;
            let threshold = self.opts.credit_update_threshold;
            let c = Self::conn(&mut st, id)?;
            if c.rx_bytes > 0 {
                let mut n = 0;
                while n < buf.len() {
                    let Some(front) = c.rx.front() else { break };
                    let avail = &front[c.rx_off..];
                    let k = avail.len().min(buf.len() - n);
                    buf[n..n + k].copy_from_slice(&avail[..k]);
                    n += k;
                    c.rx_off += k;
                    if c.rx_off == front.len() {
                        c.rx.pop_front();
                        c.rx_off = 0;
                    }
                }
                c.rx_bytes -= n as u32;
                c.fwd_cnt = c.fwd_cnt.wrapping_add(n as u32);
                // virtio_transport_stream_do_dequeue (Linux 6.1).
                let free_space = c
                    .buf_alloc
                    .wrapping_sub(c.fwd_cnt.wrapping_sub(c.last_fwd_cnt));
                if free_space < threshold && c.state == ConnState::Established && !c.done {
                    self.send_ctl(&mut st, id, OP_CREDIT_UPDATE, 0, true);
                }
                return Ok(n);
            }
            if c.peer_shutdown & SHUTDOWN_SEND != 0
                || c.local_shutdown & SHUTDOWN_RCV != 0
                || c.done
                || c.state != ConnState::Established
            {
                return match &c.error {
                    Some((k, m)) => Err(err(*k, m.clone())),
                    None => Ok(0),
                };
            }
            let (g, left) = wait(&self.cond, st, deadline);
            st = g;
            if !left {
                return Err(err(
                    io::ErrorKind::TimedOut,
                    format!("read: nothing within {timeout:?}"),
                ));
            }
        }
    }

    /// Bytes readable without blocking.
    pub fn readable(&self, id: u64) -> io::Result<u32> {
        let mut st = self.lock();
        Ok(Self::conn(&mut st, id)?.rx_bytes)
    }

    pub fn shutdown(&self, id: u64, flags: u32) -> io::Result<()> {
        let mut st = self.lock();
        let c = Self::conn(&mut st, id)?;
        if c.state != ConnState::Established || c.done {
            return Err(err(io::ErrorKind::NotConnected, "not connected"));
        }
        let new = flags & !c.local_shutdown;
        c.local_shutdown |= flags;
        if new != 0 {
            self.send_ctl(&mut st, id, OP_SHUTDOWN, flags, true);
        }
        Ok(())
    }

    /// Linux's close of a stream socket: SHUTDOWN(RCV|SEND) unless the
    /// application shut it down already, then the peer's RST is awaited
    /// (the driver thread sends an RST itself after the close timeout).
    /// `wait`: the caller will wait for the end and remove the connection;
    /// otherwise it is removed once over. Returns whether there is an RST
    /// worth waiting for.
    fn release(&self, st: &mut State, id: u64, wait: bool) -> bool {
        let Some(c) = st.conns.get_mut(&id) else {
            return false;
        };
        c.orphan = !wait;
        match c.state {
            ConnState::Connecting => {
                self.unindex(st, id);
                st.conns.remove(&id);
                false
            }
            ConnState::Established => {
                let send_shutdown = c.local_shutdown == 0 && !c.done;
                c.local_shutdown = SHUTDOWN_BOTH;
                if c.done {
                    c.orphan = true;
                    self.finish(st, id);
                    return false;
                }
                c.state = ConnState::Closing;
                c.close_deadline = Some(Instant::now() + self.opts.close_timeout);
                // Out of the port table (the peer shut down both ways while
                // bytes were unread), no RST can reach it: nobody waits.
                let awaited = c.indexed;
                if !awaited {
                    c.orphan = true;
                }
                if send_shutdown {
                    self.send_ctl(st, id, OP_SHUTDOWN, SHUTDOWN_BOTH, true);
                }
                wait && awaited
            }
            ConnState::Closing => wait && c.indexed,
            ConnState::Closed => {
                st.conns.remove(&id);
                false
            }
        }
    }

    /// Closes without waiting (a dropped stream).
    pub fn close_async(&self, id: u64) {
        let mut st = self.lock();
        self.release(&mut st, id, false);
        drop(st);
        self.notify_all();
    }

    /// Closes and waits for the peer's RST; TimedOut when it did not come
    /// within the close timeout (an RST was sent instead, as Linux does).
    pub fn close(&self, id: u64) -> io::Result<()> {
        let mut st = self.lock();
        if !self.release(&mut st, id, true) {
            return Ok(());
        }
        // The driver thread enforces the close timeout.
        let limit = Instant::now() + self.opts.close_timeout + Duration::from_secs(5);
        loop {
            let (state, timed_out, port) = match st.conns.get(&id) {
                None => return Ok(()),
                Some(c) => (c.state, c.close_timed_out, c.peer_port),
            };
            if state == ConnState::Closed {
                st.conns.remove(&id);
                return if timed_out {
                    Err(err(
                        io::ErrorKind::TimedOut,
                        format!(
                            "close: no RST from peer port {port} within {:?}",
                            self.opts.close_timeout
                        ),
                    ))
                } else {
                    Ok(())
                };
            }
            let (g, left) = wait(&self.cond, st, Some(limit));
            st = g;
            if !left {
                if let Some(c) = st.conns.get_mut(&id) {
                    c.orphan = true;
                }
                return Err(err(
                    io::ErrorKind::TimedOut,
                    "close: the driver did not finish",
                ));
            }
        }
    }

    pub fn info(&self, id: u64) -> io::Result<ConnInfo> {
        let mut st = self.lock();
        Ok(Self::conn(&mut st, id)?.info())
    }

    pub fn conn_error(&self, id: u64) -> Option<(io::ErrorKind, String)> {
        let st = self.lock();
        st.conns.get(&id).and_then(|c| c.error.clone())
    }

    /// Connections in the table (streams, queued, closing).
    pub fn conn_count(&self) -> usize {
        self.lock().conns.len()
    }

    pub fn set_hold_rx(&self, hold: bool) {
        let mut st = self.lock();
        st.hold_rx = hold;
        if !hold {
            self.post_rx(&mut st);
        }
    }

    /// Puts a chain built from `descs` on queue `q` and waits for the
    /// device to return it.
    pub fn inject(&self, q: usize, descs: &[RawDesc], timeout: Duration) -> io::Result<Injection> {
        if q >= self.opts.queues {
            return Err(err(io::ErrorKind::InvalidInput, format!("no queue {q}")));
        }
        let mut st = self.lock();
        Self::alive(&st)?;
        if !st.running {
            return Err(err(
                io::ErrorKind::NotConnected,
                "the device is not running",
            ));
        }
        if descs.is_empty() || descs.len() > st.rings[q].free_descs() {
            return Err(err(
                io::ErrorKind::WouldBlock,
                format!(
                    "{} descriptors wanted, {} free on queue {q}",
                    descs.len(),
                    st.rings[q].free_descs()
                ),
            ));
        }
        let mut entries = Vec::with_capacity(descs.len());
        for (i, d) in descs.iter().enumerate() {
            let (addr, dlen) = match &d.addr {
                RawAddr::Gpa(a) => (*a, 0u32),
                RawAddr::Data(bytes) => {
                    let n = bytes.len() as u64;
                    if n > SCRATCH_BYTES {
                        return Err(err(io::ErrorKind::InvalidInput, "injected data too large"));
                    }
                    if st.scratch_next + n > SCRATCH_BYTES {
                        st.scratch_next = 0;
                    }
                    let a = self.layout.scratch + st.scratch_next;
                    st.scratch_next = (st.scratch_next + n).next_multiple_of(8);
                    self.ram.write(a, bytes);
                    (a, n as u32)
                }
            };
            let link = d.link.unwrap_or(if i + 1 < descs.len() {
                Link::Entry(i + 1)
            } else {
                Link::End
            });
            entries.push(RawEntry {
                addr,
                len: d.len.unwrap_or(dlen),
                flags: d.flags,
                link,
            });
        }
        let id = st.next_injection;
        st.next_injection += 1;
        let head = st.rings[q]
            .add_raw(&self.ram, &entries, Token::Injected(id))
            .expect("descriptors counted");
        st.injections.insert(id, None);
        if q == RX {
            st.injected_rx.insert(id, entries);
        }
        self.kick(&mut st, q);
        let deadline = Instant::now() + timeout;
        loop {
            match st.injections.get(&id) {
                Some(Some(len)) => {
                    let len = *len;
                    st.injections.remove(&id);
                    return Ok(Injection {
                        head,
                        returned: true,
                        used_len: Some(len),
                    });
                }
                Some(None) => {}
                None => {
                    return Ok(Injection {
                        head,
                        returned: false,
                        used_len: None,
                    })
                }
            }
            let (g, left) = wait(&self.cond, st, Some(deadline));
            st = g;
            if !left {
                return Ok(Injection {
                    head,
                    returned: false,
                    used_len: None,
                });
            }
        }
    }

    /// Puts a bare index on queue `q`'s available ring, naming no chain the
    /// driver built (an out-of-range head, say).
    pub fn inject_head(&self, q: usize, head: u16) -> io::Result<()> {
        let mut st = self.lock();
        if !st.running {
            return Err(err(
                io::ErrorKind::NotConnected,
                "the device is not running",
            ));
        }
        st.rings[q].add_bare_head(&self.ram, head);
        self.kick(&mut st, q);
        Ok(())
    }

    /// Waits until `pred` holds for the state (or the timeout).
    pub fn wait_until(&self, timeout: Duration, mut pred: impl FnMut(&State) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        loop {
            if pred(&st) {
                return true;
            }
            let (g, left) = wait(
                &self.cond,
                st,
                Some(deadline.min(Instant::now() + Duration::from_millis(50))),
            );
            st = g;
            if !left && Instant::now() >= deadline {
                return pred(&st);
            }
        }
    }

    pub fn shut_down(&self) {
        self.lock().shutdown = true;
        self.wake_driver();
        self.notify_all();
    }
}

impl State {
    /// The driver's state, for failure messages.
    pub fn describe(&self, ram: &GuestRam) -> String {
        let mut out = format!(
            "running {} attached {} hold_rx {} queued packets {} ({} bytes), rx buffers free {}, tx slots free {}\n",
            self.running,
            self.attached,
            self.hold_rx,
            self.pending.len(),
            self.pending_bytes,
            self.rx_free.len(),
            self.tx_slots_free.len()
        );
        for (q, r) in self.rings.iter().enumerate() {
            out.push_str(&format!("queue {q}: {}\n", r.describe(ram)));
        }
        out.push_str(&format!("{:?}\n", self.stats));
        let mut ids: Vec<&u64> = self.conns.keys().collect();
        ids.sort();
        for id in ids.iter().take(16) {
            out.push_str(&format!("conn {id}: {:?}\n", self.conns[id].info()));
        }
        if ids.len() > 16 {
            out.push_str(&format!("... {} connections in all\n", ids.len()));
        }
        out
    }

    /// RX buffers the device holds.
    pub fn rx_posted(&self) -> usize {
        self.rings.get(RX).map_or(0, |r| r.in_flight())
    }

    /// TX chains the device has not returned.
    pub fn tx_in_flight(&self) -> usize {
        self.rings.get(TX).map_or(0, |r| r.in_flight())
    }

    /// Packets waiting for room on the TX ring.
    pub fn tx_queued(&self) -> usize {
        self.pending.len()
    }
}

/// The driver thread: waits for used-buffer notifications and control
/// wake-ups, and services the rings.
pub(crate) fn run(inner: Arc<Inner>) {
    let mut fds: Vec<libc::pollfd> = inner
        .calls
        .iter()
        .map(|c| c.as_raw_fd())
        .chain(std::iter::once(inner.ctl.as_raw_fd()))
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let nq = inner.calls.len();
    loop {
        for p in fds.iter_mut() {
            p.revents = 0;
        }
        // SAFETY: fds is a valid array of pollfd for the duration of the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
        if r < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            eprintln!("virtual vm: poll: {}", io::Error::last_os_error());
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut counts = [0u64; 3];
        for q in 0..nq {
            if fds[q].revents & libc::POLLIN != 0 {
                counts[q] = inner.calls[q].read().unwrap_or(0);
            }
        }
        if fds[nq].revents & libc::POLLIN != 0 {
            let _ = inner.ctl.read();
        }
        let mut st = inner.lock();
        for (q, &n) in counts.iter().enumerate() {
            if n > 0 {
                st.stats.calls[q] += n;
                st.stats.interrupts[q] += 1;
            }
        }
        if st.shutdown {
            break;
        }
        inner.service(&mut st, [counts[0] > 0, counts[1] > 0, counts[2] > 0]);
        drop(st);
        inner.notify_all();
    }
}
