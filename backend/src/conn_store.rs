//! The device's connection store over the state region: slots and data
//! areas in the region, TX metadata in its table, host streams kept by the
//! keeper under `conn_stream(uid)` (deposited here, or by the keeper
//! itself for the host clients it accepts, whose recording is marked in
//! the region: `Region::note_host_client`).

use std::os::fd::RawFd;

use log::warn;
use vsockd_device::store::{ConnRecord, ConnStore, ResumeRecord, TxMeta};
use vsockd_persist::fdstore::well_known::conn_stream;
use vsockd_persist::{Channel, FdKeeper, Record, Region};

/// Connection slots in the state region.
pub struct RegionStore {
    region: Region,
    slots: Vec<Record<ConnRecord>>,
    resumes: Vec<Record<ResumeRecord>>,
    keeper: Channel,
}

impl RegionStore {
    pub fn new(region: Region, keeper: Channel) -> Self {
        let slots = (0..region.geometry().conn_slots)
            .map_while(|i| region.slot(i))
            .collect();
        let resumes = (0..region.geometry().conn_slots)
            .map_while(|i| region.resume(i))
            .collect();
        RegionStore {
            region,
            slots,
            resumes,
            keeper,
        }
    }
}

// SAFETY: data areas are the region's, mapped as long as `region` (which
// the store owns) lives, one per slot and used only by that slot's
// connection.
unsafe impl ConnStore for RegionStore {
    fn slots(&self) -> usize {
        self.slots.len()
    }

    fn data_bytes(&self) -> usize {
        self.region.geometry().conn_data_bytes as usize
    }

    fn data_area(&self, slot: usize) -> Option<*mut u8> {
        let i = u32::try_from(slot).ok()?;
        self.region.data(i).map(|(ptr, _)| ptr)
    }

    fn discard_data(&mut self, slot: usize) {
        if let Ok(i) = u32::try_from(slot) {
            self.region.discard_data(i);
        }
    }

    fn next_uid(&mut self) -> u64 {
        self.region.take_conn_uid()
    }

    fn keep_stream(&mut self, uid: u64, fd: RawFd) {
        if let Err(e) = self.keeper.deposit(&[(conn_stream(uid), fd)]) {
            warn!("cannot give connection {uid}'s host stream to the keeper: {e}");
        }
    }

    fn kept_stream_recorded(&mut self, uid: u64) {
        self.region.note_host_client(uid);
    }

    fn release_streams(&mut self, uids: &[u64]) {
        if uids.is_empty() {
            return;
        }
        let ids: Vec<u64> = uids.iter().map(|&u| conn_stream(u)).collect();
        for chunk in ids.chunks(MAX_IDS_PER_FRAME) {
            if let Err(e) = self.keeper.withdraw(chunk) {
                warn!("cannot take host streams back from the keeper: {e}");
            }
        }
    }

    fn commit(&mut self, slot: usize, rec: &ConnRecord) {
        if let Some(r) = self.slots.get_mut(slot) {
            r.write(rec);
        }
    }

    fn commit_resume(&mut self, slot: usize, rec: &ResumeRecord) {
        if let Some(r) = self.resumes.get_mut(slot) {
            r.write(rec);
        }
    }

    fn note_tx(&mut self, head: u16, meta: &TxMeta) {
        self.region.set_tx_meta(head, meta);
    }

    fn tx_meta(&self, head: u16) -> Option<TxMeta> {
        self.region.tx_meta(head)
    }
}

/// Ids per withdraw frame (8 bytes each, well inside a datagram).
const MAX_IDS_PER_FRAME: usize = 4096;
