//! The session record, and adoption: how a worker writes down the session
//! after each control message, and how its successor rebuilds the device
//! from what it wrote.
//!
//! What is rebuilt, and from where:
//! * features, memory table, vring sizes, addresses, bases, enable state
//!   and stop points: from the session record, exactly as after the last
//!   control message applied (see `vsockd_persist::session`);
//! * guest memory, kick and call eventfds: from the fds the keeper handed
//!   over, by the ids the record names;
//! * a running ring's indices: from guest memory, which outlived the dead
//!   worker. `next_used` is `used->idx`. RX chains are never held across a
//!   batch, so RX resumes popping at `used->idx`, after rolling forward a
//!   batch marked pending but not published (its used elements are in
//!   guest memory and its connections' records are written). TX chains
//!   may be held (parked), so TX resumes at `used->idx` plus the chains its
//!   inflight log shows in flight;
//! * connections: from their slots, each read as of the last RX batch
//!   marked pending (a copy from a later batch is rolled back to the older
//!   copy, and the slot rewritten so that the older copy is the newest),
//!   with their host streams from the keeper and their buffered bytes in
//!   their data areas (a host client the keeper accepted and a worker
//!   recorded is adopted the same way, under the keeper's uid; one no
//!   record names is the event loop's to take, after adoption);
//! * then the TX chains in flight are handled again, oldest first: the
//!   muxer skips what their connections' records say was applied and
//!   parks again what was not yet forwarded (see the device's `keep`).
//!
//! Every chain the dead worker popped is thus either in the used ring or
//! handled again, never lost. Finally both queues are notified once: a
//! notification the dead worker owed may never have been sent, and a
//! spurious one costs the driver nothing.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use log::{info, warn};
use vsockd_device::Adopted;
use vsockd_persist::fdstore::well_known::{conn_stream, is_keeper_conn_uid};
use vsockd_persist::session::*;
use vsockd_persist::slot::ConnRecord;
use vsockd_persist::FdSet;
use vsockd_ring::SplitRing;

use super::{handle_tx_chain, StopPoint, VsockDevice, NUM_QUEUES, RX_QUEUE, TX_QUEUE};
use crate::memory::{MemoryTable, RegionSpec};
use crate::persistence::FdSlot;

impl VsockDevice {
    /// Deposits `file` with the keeper under the id of `slot` for the
    /// message being applied; returns the id (None without a keeper).
    pub(super) fn keep_fd(&self, slot: FdSlot, file: &File) -> Option<u64> {
        let p = self.persist.as_ref()?;
        let id = p.fd_id(slot);
        p.deposit(&[(id, file.as_raw_fd())]);
        Some(id)
    }

    fn session_record(&self, seq: u64) -> SessionRecord {
        let mut rec = SessionRecord {
            msg_seq: seq,
            acked_features: self.acked_features,
            acked_protocol_features: self.acked_protocol_features,
            mem_regions: self.mem_records.len() as u32,
            ..Default::default()
        };
        rec.regions[..self.mem_records.len()].copy_from_slice(&self.mem_records);
        for (v, r) in self.vrings.iter().zip(rec.vrings.iter_mut()) {
            r.size = v.size;
            r.base = v.base;
            if let Some((d, a, u)) = v.addrs_va {
                (r.desc, r.avail, r.used) = (d, a, u);
                r.flags |= VRING_ADDRS;
            }
            if let (Some(id), true) = (v.kick_id, v.kick.is_some()) {
                r.kick_fd_id = id;
                r.flags |= VRING_KICK;
            }
            if let (Some(id), true) = (v.call_id, v.call.is_some()) {
                r.call_fd_id = id;
                r.flags |= VRING_CALL;
            }
            if v.enabled {
                r.flags |= VRING_ENABLED;
            }
            if v.ring.is_some() {
                r.flags |= VRING_STARTED;
            }
            if let Some(sp) = v.stop_point {
                r.flags |= VRING_STOP_POINT;
                r.stop_base = sp.base;
                if let Some((d, a, u)) = sp.addrs_va {
                    (r.stop_desc, r.stop_avail, r.stop_used) = (d, a, u);
                    r.flags |= VRING_STOP_ADDRS;
                }
            }
        }
        rec
    }

    /// Records that control message `seq` was applied and answered with
    /// `reply` (empty: no reply). No-op without a keeper.
    pub fn commit_session(&mut self, seq: u64, reply: &[u8]) {
        if self.persist.is_none() {
            return;
        }
        let mut rec = self.session_record(seq);
        if !rec.set_reply(reply) {
            warn!(
                "the reply to control message {seq} is {} bytes, too long to keep: a worker restart right now would answer it empty",
                reply.len()
            );
        }
        if let Some(p) = &mut self.persist {
            p.write_session(&rec);
        }
    }

    /// Rebuilds the device from the session record and the fds handed
    /// over. `handover`: the dead worker quiesced for this one (an
    /// upgrade). Returns false when there was no session to adopt.
    pub fn adopt(&mut self, fds: &mut FdSet, handover: bool) -> Result<bool, String> {
        let Some(rec) = self
            .persist
            .as_ref()
            .and_then(|p| p.session.read())
            .map(|c| c.body)
        else {
            return Ok(false);
        };
        if let Some(p) = &mut self.persist {
            p.msg_seq = rec.msg_seq;
        }
        self.acked_features = rec.acked_features;
        self.acked_protocol_features = rec.acked_protocol_features;
        if rec.mem_regions > 0 {
            let mut specs = Vec::new();
            for r in rec.regions() {
                let fd = fds
                    .take(r.fd_id)
                    .ok_or_else(|| format!("guest memory fd {} was not handed over", r.fd_id))?;
                specs.push(RegionSpec::new(r, File::from(fd)));
            }
            self.memory = Some(MemoryTable::map(specs)?);
            self.mem_records = rec.regions().to_vec();
        }
        let mut take = |flag: u32, flags: u32, id: u64| -> Result<Option<File>, String> {
            if flags & flag == 0 {
                return Ok(None);
            }
            fds.take(id)
                .map(|fd| Some(File::from(fd)))
                .ok_or_else(|| format!("eventfd {id} was not handed over"))
        };
        for (q, r) in rec.vrings.iter().enumerate() {
            let v = &mut self.vrings[q];
            v.size = r.size;
            v.base = r.base;
            v.addrs_va = (r.flags & VRING_ADDRS != 0).then_some((r.desc, r.avail, r.used));
            v.kick = take(VRING_KICK, r.flags, r.kick_fd_id)?;
            v.kick_id = v.kick.as_ref().map(|_| r.kick_fd_id);
            v.call = take(VRING_CALL, r.flags, r.call_fd_id)?;
            v.call_id = v.call.as_ref().map(|_| r.call_fd_id);
            v.enabled = r.flags & VRING_ENABLED != 0;
            v.stop_point = (r.flags & VRING_STOP_POINT != 0).then_some(StopPoint {
                base: r.stop_base,
                addrs_va: (r.flags & VRING_STOP_ADDRS != 0).then_some((
                    r.stop_desc,
                    r.stop_avail,
                    r.stop_used,
                )),
            });
        }
        let rings = self
            .persist
            .as_ref()
            .ok_or("no state region")?
            .region
            .rings();
        let rx_pending = rings.rx_pending_batch > rings.rx_confirmed_batch;
        let mut resubmit = Vec::new();
        for (q, r) in rec.vrings.iter().enumerate().take(NUM_QUEUES) {
            if r.flags & VRING_STARTED == 0 {
                continue;
            }
            let (mem, addrs) = self.ring_addrs(q)?;
            let mut used = SplitRing::guest_used_idx(&mem.mem, &addrs)
                .map_err(|e| format!("queue {q}: {e}"))?;
            if q == RX_QUEUE && rx_pending && rings.rx_pending_used != u64::from(used) {
                let target = rings.rx_pending_used as u16;
                let ahead = target.wrapping_sub(used);
                if u32::from(ahead) > r.size {
                    return Err(format!(
                        "RX batch {} publishes used index {target}, {ahead} past the guest's {used}",
                        rings.rx_pending_batch
                    ));
                }
                SplitRing::store_used_idx(&mem.mem, &addrs, target)
                    .map_err(|e| format!("queue {q}: {e}"))?;
                info!(
                    "RX batch {} published on adoption: used index {used} -> {target}",
                    rings.rx_pending_batch
                );
                used = target;
            }
            self.vrings[q].base = used;
            if q == TX_QUEUE {
                let probe = self.build_ring(q)?;
                let mem = &self.memory.as_ref().ok_or("no memory")?.mem;
                let p = self.persist.as_mut().ok_or("no state region")?;
                let size = probe.size();
                let recovered = p
                    .tx_log
                    .recover(size, used, |pos| probe.used_head_at(mem, pos))
                    .map_err(|e| e.to_string())?;
                self.vrings[q].base = recovered.next_avail;
                resubmit = recovered.resubmit;
            }
            let ring = self.build_ring(q)?;
            if q == RX_QUEUE {
                // Nothing in flight between RX batches.
                let p = self.persist.as_mut().ok_or("no state region")?;
                p.rx_log
                    .format(ring.size(), ring.next_used())
                    .map_err(|e| e.to_string())?;
            }
            info!(
                "queue {q} adopted: next_avail {} next_used {}{}",
                ring.next_avail(),
                ring.next_used(),
                if q == TX_QUEUE {
                    format!(", {} chains in flight", resubmit.len())
                } else {
                    String::new()
                }
            );
            self.install_ring(q, ring).map_err(|e| e.to_string())?;
        }
        let last_batch = rings.rx_pending_batch.max(rings.rx_confirmed_batch);
        self.adopt_connections(fds, last_batch, handover)?;
        self.resubmit_tx(&resubmit);
        self.muxer.finish_adoption();
        for q in [RX_QUEUE, TX_QUEUE] {
            if self.vrings[q].ring.is_some() {
                self.notify(q);
            }
        }
        Ok(true)
    }

    /// Rebuilds the connections from their slots as of RX batch
    /// `last_batch`, with their host streams from `fds`.
    fn adopt_connections(
        &mut self,
        fds: &mut FdSet,
        last_batch: u64,
        handover: bool,
    ) -> Result<(), String> {
        let p = self.persist.as_mut().ok_or("no state region")?;
        let region = p.region.clone();
        region.rx_mark_confirmed(last_batch);
        let mut found = Vec::new();
        let mut newest_batch = last_batch;
        // The worker's uid counter is raised past the uids records name,
        // and the host-client mark past the keeper uids they name.
        let mut highest_uid = 0;
        let mut highest_keeper_uid = 0;
        let mut saw_uid = |uid: u64| {
            if is_keeper_conn_uid(uid) {
                highest_keeper_uid = highest_keeper_uid.max(uid);
            } else {
                highest_uid = highest_uid.max(uid);
            }
        };
        let mut highest_counter = 0;
        for i in 0..region.geometry().conn_slots {
            let Some(mut slot) = region.slot(i) else {
                break;
            };
            let newest = slot.read();
            let Some(newest) = newest else { continue };
            newest_batch = newest_batch.max(newest.body.rx_batch);
            saw_uid(newest.body.uid);
            let accepted = slot.read_where(|c| c.body.rx_batch <= last_batch);
            let record = accepted.map(|c| c.body).unwrap_or_default();
            if accepted != Some(newest) {
                // The newest copy was rolled back: rewrite the accepted
                // state, so the next write cannot overwrite it.
                slot.write(&record);
            }
            saw_uid(record.uid);
            if record.uid == 0 {
                continue;
            }
            highest_counter = highest_counter.max(record.last_tx_counter);
            // A resumable session's stream is kept under the uid its
            // record names (0: detached, no stream).
            let resume = region
                .resume(i)
                .and_then(|r| r.read())
                .map(|c| c.body)
                .filter(|r| r.conn_uid == record.uid);
            let stream_uid = resume.map_or(record.uid, |r| r.stream_uid);
            saw_uid(stream_uid);
            let stream = match fds
                .take(conn_stream(stream_uid))
                .filter(|_| stream_uid != 0)
            {
                Some(fd) => Some(UnixStream::from(fd)),
                None if resume.is_some() => None,
                None => {
                    warn!(
                        "connection slot {i} (host:{} guest:{}): its host stream was not handed over; closing it",
                        record.local_port, record.peer_port
                    );
                    slot.write(&ConnRecord::default());
                    continue;
                }
            };
            if let Some(Err(e)) = stream.as_ref().map(|s| s.set_nonblocking(true)) {
                warn!("connection slot {i}: host stream: {e}");
            }
            found.push(Adopted {
                slot: i as usize,
                record,
                stream,
                resume,
            });
        }
        region.reserve_conn_uids(highest_uid);
        region.note_host_client(highest_keeper_uid);
        p.tx_log.raise_counter(highest_counter + 1);
        self.muxer.adopt(found, newest_batch, handover);
        Ok(())
    }

    /// Handles again the TX chains a dead worker had popped and not
    /// returned, in their original order.
    fn resubmit_tx(&mut self, heads: &[u16]) {
        if heads.is_empty() {
            return;
        }
        let Some(memory) = &self.memory else { return };
        let mem = &memory.mem;
        let Some(ring) = self.vrings[TX_QUEUE].ring.as_mut() else {
            return;
        };
        let chain = &mut self.chain;
        let muxer = &mut self.muxer;
        let log = self.persist.as_ref().map(|p| &p.tx_log);
        let result = heads.iter().try_for_each(|&head| {
            let counter = log.map_or(0, |l| l.counter(head));
            match ring.walk_head(mem, chain, head) {
                Ok(()) => handle_tx_chain(ring, mem, muxer, chain, counter, true)?,
                Err(e) => {
                    warn!("TX queue: resubmitted chain is malformed: {e}");
                    ring.push_used(mem, head, 0)?;
                }
            }
            Ok(())
        });
        self.end_batch(TX_QUEUE, result);
        self.return_completed_tx();
    }
}
