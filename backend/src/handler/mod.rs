//! The vhost-user device: answers the frontend's requests and runs the
//! rings.
//!
//! Ring lifecycle (vhost-user spec, "Ring states"): a ring is *started* by
//! SET_VRING_KICK once its size, addresses and base are known, and
//! *stopped* by GET_VRING_BASE, which returns the next available index. With
//! VHOST_USER_F_PROTOCOL_FEATURES negotiated a ring also needs
//! SET_VRING_ENABLE(1) before it is processed; without, it is enabled when
//! started.
//!
//! Stop and start again with the same base and ring addresses is a VM
//! pause: connections carry on. A start from a different base or with rings
//! elsewhere means the driver reset the device (QEMU sends no other sign of
//! it): every connection is dropped, as the vsock spec requires of a device
//! reset. Comparing addresses as well as the base catches a reset even when
//! the rings happened to stop at an index that is a multiple of 65536.
//!
//! Invariant: RX chains are returned in the batch that popped them; TX
//! chains may be held (parked on a connection whose host stream is full),
//! but every one is returned before its ring stops or guest memory is
//! remapped (`unpark_tx`), so a stopped ring's base is also its used index
//! and nothing is lost when the frontend stops or resets it.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

use log::{debug, info, warn};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::VhostUserBackendReqHandlerMut;
use vhost::vhost_user::{Error as VhostError, GpuBackend, Result as VhostResult};
use vhost::VhostUserMemoryRegionBase;
use vsockd_device::packet::HEADER_SIZE_BYTES;
use vsockd_device::{GuestIovs, Muxer, TxChain};
use vsockd_persist::session::{MemRegionRecord, MAX_MEM_REGIONS};
use vsockd_ring::{Chain, RingAddresses, SplitRing};

use crate::memory::{MemoryTable, RegionSpec};
use crate::persistence::{FdSlot, Persistence};
use crate::unix_host::UnixHost;

mod adopt;
mod status;

/// Queue indices (virtio 1.2, 5.10.2).
pub const RX_QUEUE: usize = 0;
pub const TX_QUEUE: usize = 1;
pub const EVENT_QUEUE: usize = 2;
pub const NUM_QUEUES: usize = 3;

/// RX buffers filled per batch: 16 Linux-sized (4 KiB) buffers take one
/// 64 KiB read from a host socket.
const RX_BATCH: usize = 16;
const _: () = assert!(RX_BATCH <= vsockd_device::MAX_RX_BATCH);

/// VIRTIO_F_VERSION_1 (virtio 1.2, 6).
const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_RING_F_EVENT_IDX (virtio 1.2, 6).
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

/// Epoll token of a queue's kick eventfd in the event loop.
pub const fn kick_token(queue: usize) -> u64 {
    0x100 + queue as u64
}

/// Settings of the device.
#[derive(Debug, Clone, Copy)]
pub struct DeviceConfig {
    pub guest_cid: u64,
    pub max_queue_size: u16,
}

#[derive(Default)]
struct Vring {
    size: u32,
    /// Frontend virtual addresses of desc, avail, used.
    addrs_va: Option<(u64, u64, u64)>,
    base: u16,
    kick: Option<File>,
    call: Option<File>,
    /// Fd-store ids of `kick` and `call` (with a keeper).
    kick_id: Option<u64>,
    call_id: Option<u64>,
    enabled: bool,
    ring: Option<SplitRing>,
    /// Base and addresses when the ring was last stopped, until it starts
    /// again.
    stop_point: Option<StopPoint>,
}

/// Where a stopped ring stood. A restart from the same point is a VM pause;
/// from anywhere else, a driver reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StopPoint {
    base: u16,
    addrs_va: Option<(u64, u64, u64)>,
}

/// The device state one vhost-user session works on.
pub struct VsockDevice {
    cfg: DeviceConfig,
    loop_epoll: RawFd,
    acked_features: u64,
    acked_protocol_features: u64,
    memory: Option<MemoryTable>,
    vrings: [Vring; NUM_QUEUES],
    pub muxer: Muxer<UnixHost>,
    chain: Chain,
    rx_chains: Vec<Chain>,
    /// TX heads the muxer is done with, on their way to the used ring.
    completed_tx: Vec<u16>,
    /// The memory table as the frontend sent it, with fd-store ids.
    mem_records: Vec<MemRegionRecord>,
    /// State kept for a successor (with a keeper).
    persist: Option<Persistence>,
}

/// The muxer may hold at most 1/4 of the TX queue's chains parked while
/// host streams are full, so the guest keeps room for other connections.
const PARKED_SHARE_OF_TX_QUEUE: usize = 4;

fn err_io(e: io::Error) -> VhostError {
    VhostError::ReqHandlerError(e)
}

fn invalid(msg: String) -> VhostError {
    warn!("frontend request refused: {msg}");
    VhostError::ReqHandlerError(io::Error::new(io::ErrorKind::InvalidInput, msg))
}

impl VsockDevice {
    pub fn new(cfg: DeviceConfig, loop_epoll: RawFd, muxer: Muxer<UnixHost>) -> Self {
        VsockDevice {
            cfg,
            loop_epoll,
            acked_features: 0,
            acked_protocol_features: 0,
            memory: None,
            vrings: Default::default(),
            muxer,
            chain: Chain::new(),
            rx_chains: (0..RX_BATCH).map(|_| Chain::new()).collect(),
            completed_tx: Vec::new(),
            mem_records: Vec::new(),
            persist: None,
        }
    }

    /// Keeps the session in the state region from now on.
    pub fn set_persistence(&mut self, p: Persistence) {
        self.persist = Some(p);
    }

    /// Acked virtio and vhost-user protocol features.
    pub fn features(&self) -> (u64, u64) {
        (self.acked_features, self.acked_protocol_features)
    }

    /// The persistent state, if any.
    pub fn persistence(&mut self) -> Option<&mut Persistence> {
        self.persist.as_mut()
    }

    fn offered_features() -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn event_idx(&self) -> bool {
        self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0
    }

    fn protocol_features_acked(&self) -> bool {
        self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// The frontend went away: forget the session, drop every connection.
    pub fn end_session(&mut self) {
        // Connections first: parked TX chains point into guest memory.
        self.muxer.reset();
        for q in 0..NUM_QUEUES {
            self.stop_ring(q);
        }
        self.vrings = Default::default();
        self.memory = None;
        self.mem_records.clear();
        self.acked_features = 0;
        self.acked_protocol_features = 0;
    }

    fn queue(&self, index: u32) -> VhostResult<usize> {
        let q = index as usize;
        if q < NUM_QUEUES {
            Ok(q)
        } else {
            Err(invalid(format!(
                "queue index {index} (the device has {NUM_QUEUES})"
            )))
        }
    }

    fn ring_addrs(&self, q: usize) -> Result<(&MemoryTable, RingAddresses), String> {
        let v = &self.vrings[q];
        let mem = self
            .memory
            .as_ref()
            .ok_or_else(|| format!("queue {q} started before SET_MEM_TABLE"))?;
        let (d, a, u) = v
            .addrs_va
            .ok_or_else(|| format!("queue {q} started before SET_VRING_ADDR"))?;
        let tr = |va: u64, what: &str| {
            mem.va_to_gpa(va)
                .ok_or_else(|| format!("queue {q} {what} address {va:#x} is not in guest memory"))
        };
        let addrs = RingAddresses {
            desc: tr(d, "descriptor")?,
            avail: tr(a, "available")?,
            used: tr(u, "used")?,
        };
        Ok((mem, addrs))
    }

    fn build_ring(&self, q: usize) -> Result<SplitRing, String> {
        let (mem, addrs) = self.ring_addrs(q)?;
        let mut ring = SplitRing::new(
            &mem.mem,
            self.vrings[q].size,
            addrs,
            self.event_idx(),
            self.vrings[q].base,
        )
        .map_err(|e| format!("queue {q}: {e}"))?;
        if q == TX_QUEUE && self.persist.is_some() {
            ring.track_used_heads();
        }
        Ok(ring)
    }

    fn start_ring(&mut self, q: usize) -> VhostResult<()> {
        let ring = self.build_ring(q).map_err(invalid)?;
        if let Some(p) = &mut self.persist {
            // A ring starts with nothing in flight.
            let log = match q {
                RX_QUEUE => Some(&mut p.rx_log),
                TX_QUEUE => Some(&mut p.tx_log),
                _ => None,
            };
            if let Some(log) = log {
                log.format(ring.size(), ring.next_used())
                    .map_err(|e| invalid(e.to_string()))?;
            }
        }
        self.install_ring(q, ring)
    }

    /// Makes `ring` queue `q`'s running ring: polls its kick.
    fn install_ring(&mut self, q: usize, ring: SplitRing) -> VhostResult<()> {
        if q != EVENT_QUEUE {
            if let Some(kick) = &self.vrings[q].kick {
                let ev = epoll::Event::new(epoll::Events::EPOLLIN, kick_token(q));
                epoll::ctl(
                    self.loop_epoll,
                    epoll::ControlOptions::EPOLL_CTL_ADD,
                    kick.as_raw_fd(),
                    ev,
                )
                .map_err(err_io)?;
            }
        }
        debug!(
            "queue {q} started: size {} next_avail {} next_used {}",
            ring.size(),
            ring.next_avail(),
            ring.next_used()
        );
        if q == TX_QUEUE {
            self.muxer
                .set_park_limit(usize::from(ring.size()) / PARKED_SHARE_OF_TX_QUEUE);
        }
        self.vrings[q].ring = Some(ring);
        if !self.protocol_features_acked() {
            self.vrings[q].enabled = true;
        }
        Ok(())
    }

    /// Stops a ring; returns its next available index.
    fn stop_ring(&mut self, q: usize) -> u16 {
        let v = &mut self.vrings[q];
        v.kick_id = None;
        if let Some(kick) = v.kick.take() {
            let _ = epoll::ctl(
                self.loop_epoll,
                epoll::ControlOptions::EPOLL_CTL_DEL,
                kick.as_raw_fd(),
                epoll::Event::new(epoll::Events::empty(), 0),
            );
        }
        if let Some(ring) = v.ring.take() {
            v.base = ring.next_avail();
            debug!("queue {q} stopped at {}", v.base);
        }
        v.base
    }

    /// Called when ring `q` starts: drops every connection if the ring does
    /// not resume where it stopped. Judged once per stop: the other rings'
    /// stop points are cleared with it, so connections opened between the
    /// rings' restarts survive.
    fn detect_reset(&mut self, q: usize) {
        let Some(stopped) = self.vrings[q].stop_point.take() else {
            return;
        };
        let now = StopPoint {
            base: self.vrings[q].base,
            addrs_va: self.vrings[q].addrs_va,
        };
        if q != EVENT_QUEUE && now != stopped {
            info!(
                "queue {q} restarts at {} (stopped at {}{}): the driver reset the device",
                now.base,
                stopped.base,
                if now.addrs_va != stopped.addrs_va {
                    ", rings moved"
                } else {
                    ""
                }
            );
            self.muxer.reset();
            for v in &mut self.vrings {
                v.stop_point = None;
            }
        }
    }

    /// Drains a kick eventfd.
    pub fn ack_kick(&self, q: usize) {
        if let Some(kick) = &self.vrings[q].kick {
            let mut buf = [0u8; 8];
            // SAFETY: reads 8 bytes into a local buffer from an eventfd.
            let _ = unsafe { libc::read(kick.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        }
    }

    fn running(&self, q: usize) -> bool {
        self.vrings[q].enabled && self.vrings[q].ring.is_some()
    }

    fn notify(&self, q: usize) {
        if let Some(call) = &self.vrings[q].call {
            let one = 1u64.to_ne_bytes();
            // SAFETY: writes 8 bytes from a local buffer to an eventfd.
            let rc = unsafe { libc::write(call.as_raw_fd(), one.as_ptr().cast(), one.len()) };
            if rc < 0 {
                warn!(
                    "queue {q}: call eventfd write failed: {}",
                    io::Error::last_os_error()
                );
            }
        }
    }

    /// Processes both data queues: every TX packet available, then as many
    /// RX packets as there is work and buffers for. Publishes each used ring
    /// once and notifies at most once per queue.
    pub fn process_queues(&mut self) {
        if self.running(TX_QUEUE) {
            self.process_tx();
        }
        if self.running(RX_QUEUE) {
            self.process_rx();
        }
    }

    /// Publishes a queue's staged used elements and notifies the driver if
    /// it asked to be; logs what went wrong in the batch.
    fn end_batch(&mut self, q: usize, result: Result<(), vsockd_ring::RingError>) {
        let Some(memory) = &self.memory else { return };
        let Some(ring) = self.vrings[q].ring.as_mut() else {
            return;
        };
        if let Err(e) = result {
            warn!("queue {q}: {e}");
        }
        let region = match q {
            RX_QUEUE => self.persist.as_ref().map(|p| &p.region),
            _ => None,
        };
        let notify = match publish_used(ring, &memory.mem, &mut self.muxer, region) {
            Ok(n) => n,
            Err(e) => {
                warn!("queue {q}: {e}");
                false
            }
        };
        if let Some(p) = &mut self.persist {
            if q == TX_QUEUE {
                // The chains are the driver's again: out of the log.
                ring.take_published_heads(&mut p.published);
                for &head in &p.published {
                    p.tx_log.clear(head);
                }
                p.tx_log.set_used_idx(ring.published());
            } else if q == RX_QUEUE {
                p.rx_log.set_used_idx(ring.published());
            }
        }
        if notify {
            self.notify(q);
        }
    }

    /// Host events: host streams read, written and closed, new host
    /// clients; then TX chains the muxer finished with go back to the
    /// guest.
    pub fn process_host_events(&mut self) {
        self.muxer.process_host_events();
        self.return_completed_tx();
    }

    /// The worker stops for an upgrade: resumable sessions record where
    /// their streams stand, for the successor.
    pub fn quiesce_sessions(&mut self) {
        self.muxer.quiesce_sessions();
    }

    /// Puts the TX chains the muxer is done with on the used ring and
    /// publishes them. With no TX ring (the session ended) there is nobody
    /// to return them to.
    fn return_completed_tx(&mut self) {
        self.muxer.take_completed_tx(&mut self.completed_tx);
        if self.completed_tx.is_empty() {
            return;
        }
        let (Some(memory), Some(ring)) = (&self.memory, self.vrings[TX_QUEUE].ring.as_mut()) else {
            debug!(
                "{} TX chains finished with no TX ring",
                self.completed_tx.len()
            );
            return;
        };
        let mem = &memory.mem;
        let result = self
            .completed_tx
            .iter()
            .try_for_each(|&head| ring.push_used(mem, head, 0));
        self.end_batch(TX_QUEUE, result);
    }

    /// Returns every parked TX chain, their bytes copied out of guest
    /// memory: before the memory is remapped or the TX ring stops.
    fn unpark_tx(&mut self) {
        self.muxer.unpark_all();
        self.return_completed_tx();
    }

    fn process_tx(&mut self) {
        let Some(memory) = &self.memory else { return };
        let mem = &memory.mem;
        let Some(ring) = self.vrings[TX_QUEUE].ring.as_mut() else {
            return;
        };
        let chain = &mut self.chain;
        let muxer = &mut self.muxer;
        let mut log = self.persist.as_mut().map(|p| &mut p.tx_log);
        let result: Result<(), vsockd_ring::RingError> = (|| loop {
            ring.disable_notification(mem)?;
            while let Some(popped) = ring.pop(mem, chain)? {
                let head = match &popped {
                    Ok(()) => chain.head(),
                    Err(e) => e.head,
                };
                let counter = log.as_deref_mut().map_or(0, |log| log.mark(head));
                match popped {
                    Ok(()) => handle_tx_chain(ring, mem, muxer, chain, counter, false)?,
                    Err(e) => give_back_malformed(ring, mem, "TX", e)?,
                }
            }
            if !ring.enable_notification(mem)? {
                return Ok(());
            }
        })();
        self.end_batch(TX_QUEUE, result);
        // Chains of connections the guest reset in this batch.
        self.return_completed_tx();
    }

    fn process_rx(&mut self) {
        let Some(memory) = &self.memory else { return };
        let mem = &memory.mem;
        let Some(ring) = self.vrings[RX_QUEUE].ring.as_mut() else {
            return;
        };
        let chains = &mut self.rx_chains;
        let muxer = &mut self.muxer;
        let region = self.persist.as_ref().map(|p| &p.region);
        let mut notify = false;
        let result: Result<(), vsockd_ring::RingError> = (|| {
            while muxer.has_rx_work() {
                // A batch of usable buffers, contiguous in ring order, so
                // the unused tail can be given back with `unpop`.
                let mut k = 0;
                while k < chains.len() {
                    let Some(popped) = ring.pop(mem, &mut chains[k])? else {
                        break;
                    };
                    let usable = match popped {
                        Ok(()) => chains[k].writable_len() >= HEADER_SIZE_BYTES,
                        Err(_) => false,
                    };
                    if usable {
                        k += 1;
                        continue;
                    }
                    if k > 0 {
                        // Dealt with at the head of the next batch.
                        ring.unpop();
                        break;
                    }
                    match popped {
                        Err(e) => give_back_malformed(ring, mem, "RX", e)?,
                        Ok(()) => {
                            warn!(
                                "RX queue: buffer {} of {} writable bytes cannot hold a header; returning it",
                                chains[0].head(),
                                chains[0].writable_len()
                            );
                            ring.push_used(mem, chains[0].head(), 0)?;
                        }
                    }
                }
                if k == 0 {
                    // Out of buffers with work left: ask for a kick, and go
                    // on if buffers came meanwhile.
                    if ring.enable_notification(mem)? {
                        continue;
                    }
                    return Ok(());
                }
                let bufs: [GuestIovs<'_>; RX_BATCH] = std::array::from_fn(|i| {
                    if i < k {
                        // SAFETY: as in `process_tx`.
                        unsafe { GuestIovs::new(chains[i].writable()) }
                    } else {
                        GuestIovs::empty()
                    }
                });
                let mut lens = [0usize; RX_BATCH];
                let filled = muxer.fill_rx(&bufs[..k], &mut lens[..k]);
                for (chain, &len) in chains[..filled].iter().zip(&lens[..filled]) {
                    ring.push_used(mem, chain.head(), len as u32)?;
                }
                for _ in filled..k {
                    ring.unpop();
                }
                // Each group is published at once: host bytes read into
                // guest buffers reach the guest (or the record) without
                // waiting for the rest of the batch.
                notify |= publish_used(ring, mem, muxer, region)?;
                if filled < k {
                    return Ok(());
                }
            }
            Ok(())
        })();
        self.end_batch(RX_QUEUE, result);
        if notify {
            self.notify(RX_QUEUE);
        }
    }
}

/// Publishes the used elements staged so far. With a state region (RX), the
/// connections they changed are committed and the batch marked pending
/// first, and marked confirmed after (see `adopt`). Returns whether the
/// driver asked to be notified.
fn publish_used(
    ring: &mut SplitRing,
    mem: &vsockd_ring::GuestMemory,
    muxer: &mut Muxer<UnixHost>,
    region: Option<&vsockd_persist::Region>,
) -> Result<bool, vsockd_ring::RingError> {
    let batch = region.and_then(|r| {
        muxer
            .commit_rx()
            .inspect(|&b| r.rx_mark_pending(b, ring.next_used()))
    });
    let notify = ring.publish(mem)?;
    if let (Some(b), Some(r)) = (batch, region) {
        r.rx_mark_confirmed(b);
    }
    muxer.rx_published();
    Ok(notify)
}

/// Hands one TX chain, walked over `mem`, to the muxer (`resubmitted`: a
/// dead worker had popped it), and returns it to the used ring unless the
/// muxer parked it.
fn handle_tx_chain(
    ring: &mut SplitRing,
    mem: &vsockd_ring::GuestMemory,
    muxer: &mut Muxer<UnixHost>,
    chain: &Chain,
    counter: u64,
    resubmitted: bool,
) -> Result<(), vsockd_ring::RingError> {
    // SAFETY: the chain was walked over `mem`, which stays mapped for this
    // whole call; every iovec lies inside it.
    let pkt = unsafe { GuestIovs::new(chain.readable()) };
    let tx = TxChain {
        head: chain.head(),
        counter,
    };
    // SAFETY: `mem` stays mapped until `unpark_tx` has run: `set_mem_table`
    // and the TX ring's stop call it first, and `end_session` resets the
    // muxer before unmapping.
    let done = unsafe {
        if resubmitted {
            muxer.resubmit_tx(tx, &pkt)
        } else {
            muxer.handle_tx_parking(tx, &pkt)
        }
    };
    if done {
        ring.push_used(mem, chain.head(), 0)?;
    }
    Ok(())
}

/// Returns a chain that could not be walked to the driver, unused.
fn give_back_malformed(
    ring: &mut SplitRing,
    mem: &vsockd_ring::GuestMemory,
    queue: &str,
    e: vsockd_ring::ChainError,
) -> Result<(), vsockd_ring::RingError> {
    warn!("{queue} queue: dropping malformed descriptor {e}");
    if e.head < ring.size() {
        ring.push_used(mem, e.head, 0)?;
    }
    Ok(())
}

fn unsupported(what: &'static str) -> VhostError {
    debug!("frontend request not supported: {what}");
    VhostError::InvalidOperation(what)
}

impl VhostUserBackendReqHandlerMut for VsockDevice {
    fn set_owner(&mut self) -> VhostResult<()> {
        Ok(())
    }

    fn reset_owner(&mut self) -> VhostResult<()> {
        info!("frontend reset the owner: dropping the session state");
        self.end_session();
        Ok(())
    }

    fn reset_device(&mut self) -> VhostResult<()> {
        info!("frontend reset the device");
        self.end_session();
        Ok(())
    }

    fn get_features(&mut self) -> VhostResult<u64> {
        Ok(Self::offered_features())
    }

    fn set_features(&mut self, features: u64) -> VhostResult<()> {
        let unknown = features & !Self::offered_features();
        if unknown != 0 {
            return Err(invalid(format!("features {unknown:#x} were not offered")));
        }
        debug!("features acked: {features:#x}");
        self.acked_features = features;
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy: Option<bool>,
    ) -> VhostResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if ctx.len() > MAX_MEM_REGIONS || ctx.len() != files.len() {
            return Err(invalid(format!(
                "memory table of {} regions with {} fds (at most {MAX_MEM_REGIONS})",
                ctx.len(),
                files.len()
            )));
        }
        let records: Vec<MemRegionRecord> = ctx
            .iter()
            .enumerate()
            .map(|(i, r)| MemRegionRecord {
                guest_phys_addr: r.guest_phys_addr,
                size: r.memory_size,
                user_addr: r.user_addr,
                mmap_offset: r.mmap_offset,
                fd_id: self
                    .persist
                    .as_ref()
                    .map_or(0, |p| p.fd_id(FdSlot::Memory(i))),
            })
            .collect();
        if let Some(p) = &self.persist {
            let items: Vec<(u64, RawFd)> = records
                .iter()
                .zip(&files)
                .map(|(r, f)| (r.fd_id, f.as_raw_fd()))
                .collect();
            p.deposit(&items);
        }
        let specs = records
            .iter()
            .zip(files)
            .map(|(r, file)| RegionSpec::new(r, file))
            .collect();
        let table = MemoryTable::map(specs).map_err(invalid)?;
        info!("guest memory table: {} regions", ctx.len());
        // Parked TX chains point into the old mapping.
        self.unpark_tx();
        self.memory = Some(table);
        self.mem_records = records;
        // Running rings keep their indices over the new mapping.
        for q in 0..NUM_QUEUES {
            if let Some(old) = self.vrings[q].ring.take() {
                self.vrings[q].base = old.next_avail();
                let ring = self.build_ring(q).map_err(invalid)?;
                self.vrings[q].ring = Some(ring);
            }
        }
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VhostResult<()> {
        let q = self.queue(index)?;
        if num == 0 || num > u32::from(self.cfg.max_queue_size) || !num.is_power_of_two() {
            return Err(invalid(format!(
                "queue {q} size {num} (must be a power of two up to {})",
                self.cfg.max_queue_size
            )));
        }
        self.vrings[q].size = num;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VhostResult<()> {
        let q = self.queue(index)?;
        self.vrings[q].addrs_va = Some((descriptor, available, used));
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VhostResult<()> {
        let q = self.queue(index)?;
        let base = u16::try_from(base).map_err(|_| invalid(format!("queue {q} base {base}")))?;
        self.vrings[q].base = base;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VhostResult<VhostUserVringState> {
        let q = self.queue(index)?;
        // Finish what the ring holds before it stops.
        if q != EVENT_QUEUE && self.running(q) {
            self.process_queues();
        }
        if q == TX_QUEUE {
            self.unpark_tx();
        }
        let base = self.stop_ring(q);
        self.vrings[q].enabled = false;
        self.vrings[q].stop_point = Some(StopPoint {
            base,
            addrs_va: self.vrings[q].addrs_va,
        });
        Ok(VhostUserVringState::new(index, u32::from(base)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        let q = self.queue(u32::from(index))?;
        self.stop_ring(q);
        let Some(fd) = fd else {
            return Err(invalid(format!(
                "queue {q}: polling mode (no kick fd) is not supported"
            )));
        };
        self.vrings[q].kick_id = self.keep_fd(FdSlot::Kick(q), &fd);
        self.vrings[q].kick = Some(fd);
        self.detect_reset(q);
        self.start_ring(q)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VhostResult<()> {
        let q = self.queue(u32::from(index))?;
        self.vrings[q].call_id = fd.as_ref().and_then(|f| self.keep_fd(FdSlot::Call(q), f));
        self.vrings[q].call = fd;
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VhostResult<()> {
        self.queue(u32::from(index))?;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VhostResult<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG)
    }

    fn set_protocol_features(&mut self, features: u64) -> VhostResult<()> {
        self.acked_protocol_features = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VhostResult<u64> {
        Ok(NUM_QUEUES as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VhostResult<()> {
        let q = self.queue(index)?;
        debug!("queue {q} enable={enable}");
        self.vrings[q].enabled = enable;
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VhostResult<Vec<u8>> {
        // struct virtio_vsock_config { le64 guest_cid; } (virtio 1.2, 5.10.4)
        let config = self.cfg.guest_cid.to_le_bytes();
        let (start, len) = (offset as usize, size as usize);
        match start.checked_add(len) {
            Some(end) if end <= config.len() => Ok(config[start..end].to_vec()),
            _ => Err(invalid(format!("config read of {len} bytes at {start}"))),
        }
    }

    fn set_config(&mut self, _o: u32, _b: &[u8], _f: VhostUserConfigFlags) -> VhostResult<()> {
        Err(unsupported("the vsock config space is read-only"))
    }

    fn set_gpu_socket(&mut self, _gpu: GpuBackend) -> VhostResult<()> {
        Err(unsupported("GPU_SET_SOCKET"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VhostResult<File> {
        Err(unsupported("GET_SHARED_OBJECT"))
    }

    fn get_inflight_fd(
        &mut self,
        _i: &VhostUserInflight,
    ) -> VhostResult<(VhostUserInflight, File)> {
        Err(unsupported("GET_INFLIGHT_FD"))
    }

    fn set_inflight_fd(&mut self, _i: &VhostUserInflight, _file: File) -> VhostResult<()> {
        Err(unsupported("SET_INFLIGHT_FD"))
    }

    fn get_max_mem_slots(&mut self) -> VhostResult<u64> {
        Err(unsupported("GET_MAX_MEM_SLOTS"))
    }

    fn add_mem_region(
        &mut self,
        _r: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy: Option<bool>,
    ) -> VhostResult<Option<VhostUserMemoryRegionBase>> {
        Err(unsupported("ADD_MEM_REG"))
    }

    fn remove_mem_region(&mut self, _r: &VhostUserSingleMemoryRegion) -> VhostResult<()> {
        Err(unsupported("REM_MEM_REG"))
    }

    fn set_device_state_fd(
        &mut self,
        _d: VhostTransferStateDirection,
        _p: VhostTransferStatePhase,
        _fd: File,
    ) -> VhostResult<Option<File>> {
        Err(unsupported("SET_DEVICE_STATE_FD"))
    }

    fn check_device_state(&mut self) -> VhostResult<()> {
        Err(unsupported("CHECK_DEVICE_STATE"))
    }

    fn get_shmem_config(&mut self) -> VhostResult<VhostUserShMemConfig> {
        Err(unsupported("GET_SHMEM_CONFIG"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VhostResult<()> {
        Err(unsupported("SET_LOG_BASE"))
    }
}
