//! What a worker keeps for its successor: the state region's session
//! record, TX inflight log and RX commit state, and the fds deposited with
//! the keeper. (Connections are kept by the muxer, through
//! `conn_store::RegionStore`.)
//!
//! The RX inflight log is kept too, for those who read the region (`vsockd
//! status` in the keeper), not for recovery: it is formatted when the RX
//! ring starts or is adopted and takes the used index after each RX
//! publish, and never shows a head in flight (RX chains are returned in the
//! batch that popped them).
//!
//! Fd-store ids of session fds are derived from the control message that
//! brought them: `FIRST_WORKER_ID + seq * 64 + slot` (slot: memory region
//! 0-7, kick eventfd 8 + queue, call eventfd 16 + queue). A message applied
//! twice (its worker died before recording it) deposits under the same
//! ids, replacing the first copies, and a new message never reuses an id
//! an older record may still name. Ids that the session record stops
//! naming are withdrawn once the record that drops them is written.

use std::collections::BTreeSet;
use std::os::fd::RawFd;

use log::warn;
use vsockd_persist::fdstore::well_known::FIRST_WORKER_ID;
use vsockd_persist::session::SessionRecord;
use vsockd_persist::slot::ConnRecord;
use vsockd_persist::{Channel, FdKeeper, InflightLog, Record, Region};

/// Fd slot of a memory region, a kick or a call eventfd.
#[derive(Debug, Clone, Copy)]
pub enum FdSlot {
    Memory(usize),
    Kick(usize),
    Call(usize),
}

/// Fd-store ids per control message.
const IDS_PER_MESSAGE: u64 = 64;

/// The worker's persistent state.
pub struct Persistence {
    pub region: Region,
    pub session: Record<SessionRecord>,
    pub tx_log: InflightLog,
    /// The RX log: its used index only (see the module doc).
    pub rx_log: InflightLog,
    keeper: Channel,
    /// Sequence number of the control message being applied.
    pub msg_seq: u64,
    /// Ids the last written session record names.
    named: BTreeSet<u64>,
    /// Heads returned by the last TX publish.
    pub published: Vec<u16>,
}

impl Persistence {
    pub fn new(region: Region, keeper: Channel) -> Option<Self> {
        let session = region.session();
        let rx_log = region.inflight(0)?;
        let tx_log = region.inflight(1)?;
        let named = session
            .read()
            .map(|c| c.body.fd_ids().collect())
            .unwrap_or_default();
        Some(Persistence {
            region,
            session,
            tx_log,
            rx_log,
            keeper,
            msg_seq: 0,
            named,
            published: Vec::new(),
        })
    }

    /// The id for `slot` of the message being applied.
    pub fn fd_id(&self, slot: FdSlot) -> u64 {
        let n = match slot {
            FdSlot::Memory(i) => i as u64,
            FdSlot::Kick(q) => 8 + q as u64,
            FdSlot::Call(q) => 16 + q as u64,
        };
        FIRST_WORKER_ID + self.msg_seq * IDS_PER_MESSAGE + n
    }

    /// Deposits fds with the keeper. A failure means the keeper is gone,
    /// and with it the session: it is logged, and the worker finds out on
    /// its next read of the link.
    pub fn deposit(&self, items: &[(u64, RawFd)]) {
        if let Err(e) = self.keeper.deposit(items) {
            warn!("cannot deposit fds with the keeper: {e}");
        }
    }

    /// Withdraws ids from the keeper.
    pub fn withdraw(&self, ids: &[u64]) {
        if ids.is_empty() {
            return;
        }
        if let Err(e) = self.keeper.withdraw(ids) {
            warn!("cannot withdraw fds from the keeper: {e}");
        }
    }

    /// Writes `record`, then withdraws the ids the previous record named
    /// and this one does not.
    pub fn write_session(&mut self, record: &SessionRecord) {
        self.session.write(record);
        let named: BTreeSet<u64> = record.fd_ids().collect();
        let stale: Vec<u64> = self.named.difference(&named).copied().collect();
        self.withdraw(&stale);
        self.named = named;
    }

    /// Frees every connection slot (the session's connections are gone)
    /// and settles the RX commit state.
    pub fn free_conn_slots(&self) {
        let free = ConnRecord::default();
        for i in 0..self.region.geometry().conn_slots {
            if let Some(mut slot) = self.region.slot(i) {
                if slot.read().is_some_and(|c| c.body.uid != 0) {
                    slot.write(&free);
                }
            }
        }
        let rings = self.region.rings();
        self.region
            .rx_mark_confirmed(rings.rx_pending_batch.max(rings.rx_confirmed_batch));
    }

    /// The reply saved for message `seq`, if that message was the last one
    /// applied.
    pub fn saved_reply(&self, seq: u64) -> Option<Vec<u8>> {
        let rec = self.session.read()?.body;
        (rec.msg_seq == seq && seq != 0).then(|| rec.reply().to_vec())
    }
}
