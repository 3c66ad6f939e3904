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
//!   batch, so RX resumes popping at `used->idx`. TX chains may be held
//!   (parked), so TX resumes at `used->idx` plus the chains its inflight
//!   log shows in flight, and those chains are handled again, oldest first,
//!   as if just popped.
//!
//! Every chain the dead worker popped is thus either in the used ring or
//! handled again, never lost. Finally both queues are notified once: a
//! notification the dead worker owed may never have been sent, and a
//! spurious one costs the driver nothing.

use std::fs::File;
use std::os::fd::AsRawFd;

use log::{info, warn};
use vsockd_persist::session::*;
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
    /// over. Returns false when there was no session to adopt.
    pub fn adopt(&mut self, fds: &mut FdSet) -> Result<bool, String> {
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
        let mut resubmit = Vec::new();
        for (q, r) in rec.vrings.iter().enumerate().take(NUM_QUEUES) {
            if r.flags & VRING_STARTED == 0 {
                continue;
            }
            let (mem, addrs) = self.ring_addrs(q)?;
            let used = SplitRing::guest_used_idx(&mem.mem, &addrs)
                .map_err(|e| format!("queue {q}: {e}"))?;
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
        self.resubmit_tx(&resubmit);
        for q in [RX_QUEUE, TX_QUEUE] {
            if self.vrings[q].ring.is_some() {
                self.notify(q);
            }
        }
        Ok(true)
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
        let result = heads.iter().try_for_each(|&head| {
            match ring.walk_head(mem, chain, head) {
                Ok(()) => handle_tx_chain(ring, mem, muxer, chain)?,
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
