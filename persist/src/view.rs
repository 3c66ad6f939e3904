//! A read-only view of the state region, for a process that reports on it
//! (the keeper answering `vsockd status`) while a worker writes it.
//!
//! The view maps the memfd with `PROT_READ`: whatever it is asked, it
//! cannot change what a worker recovers from. It is opened only once the
//! region is formatted (a worker formats it, header last), and refuses a
//! region laid out for another geometry or version, as [`Region::open`]
//! does.
//!
//! What it reads is consistent per part, not across parts: each A/B record
//! is read as its newest complete copy (a copy being written fails its
//! checksum), and each inflight log's header and flags as they stand.
//! Figures taken while the worker is busy are therefore those of some
//! instant close to the read, part by part; at rest they are exact.
//!
//! [`Region::open`]: crate::Region::open

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::inflight::{summarize, InflightSummary};
use crate::record::peek;
use crate::region::{Header, Layout};
use crate::session::SessionRecord;
use crate::shm::SharedMemory;
use crate::slot::ConnRecord;
use crate::{Geometry, PersistError};

/// The state region, mapped for reading.
#[derive(Debug)]
pub struct RegionView {
    shm: SharedMemory,
    geometry: Geometry,
    layout: Layout,
}

impl RegionView {
    /// Maps the region in `fd` for reading. Fails with
    /// [`PersistError::NotFormatted`] while no worker has formatted it yet
    /// (try again later), and as [`Region::open`](crate::Region::open)
    /// does for a region this build cannot read.
    pub fn open(fd: OwnedFd, geometry: Geometry) -> Result<Self, PersistError> {
        let layout = Layout::of(&geometry)?;
        if SharedMemory::file_len(&fd)? < layout.total as u64 {
            return Err(PersistError::NotFormatted);
        }
        let shm = SharedMemory::map_read_only(fd, layout.total)?;
        // SAFETY: the mapping is page aligned and longer than the header.
        let header = unsafe { Header::read(shm.as_ptr()) };
        if !header.is_formatted() {
            return Err(PersistError::NotFormatted);
        }
        header.check(&geometry, &layout)?;
        Ok(RegionView {
            shm,
            geometry,
            layout,
        })
    }

    fn at(&self, offset: usize) -> *const u8 {
        debug_assert!(offset < self.shm.len());
        self.shm.as_ptr().wrapping_add(offset)
    }

    /// The geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// Generation of the worker that took the region over last (0: none).
    pub fn generation(&self) -> u64 {
        let offset = std::mem::offset_of!(Header, generation);
        // SAFETY: the header starts the mapping; `generation` is an
        // 8-aligned u64 in it, which AtomicU64 has the layout of, and a
        // load does not write the read-only page.
        let field = unsafe { &*self.at(offset).cast::<AtomicU64>() };
        field.load(Ordering::Acquire)
    }

    /// The session as last recorded (None: no control message applied
    /// since the region was formatted, or none readable).
    pub fn session(&self) -> Option<SessionRecord> {
        // SAFETY: the session part is 8-aligned, inside the mapping and
        // sized for the record.
        unsafe { peek::<SessionRecord>(self.at(self.layout.session)) }.map(|c| c.body)
    }

    /// The inflight log of queue `q` (0 RX, 1 TX), if it was formatted.
    pub fn inflight(&self, q: usize) -> Option<InflightSummary> {
        let offset = *self.layout.inflight.get(q)?;
        // SAFETY: the log part is 64-aligned, inside the mapping and sized
        // for the largest queue.
        unsafe { summarize(self.at(offset), self.geometry.max_queue_size) }
    }

    /// Every connection slot in use, as its newest complete copy.
    pub fn live_connections(&self) -> impl Iterator<Item = ConnRecord> + '_ {
        (0..self.geometry.conn_slots).filter_map(move |i| {
            let offset = self.layout.slots + self.layout.slot_stride * i as usize;
            // SAFETY: slot `i` exists, is 64-aligned and sized for the
            // record.
            let rec = unsafe { peek::<ConnRecord>(self.at(offset)) }?;
            (rec.body.uid != 0).then_some(rec.body)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::{VRING_ENABLED, VRING_STARTED};
    use crate::Region;

    fn geometry() -> Geometry {
        Geometry {
            max_queue_size: 64,
            conn_slots: 8,
            conn_data_bytes: crate::page_size() as u64,
        }
    }

    fn memfd() -> OwnedFd {
        SharedMemory::create_fd(c"vsockd-view-test").unwrap()
    }

    fn dup(fd: &OwnedFd) -> OwnedFd {
        fd.try_clone().unwrap()
    }

    #[test]
    fn refuses_a_region_not_yet_formatted() {
        let fd = memfd();
        let e = RegionView::open(dup(&fd), geometry()).unwrap_err();
        assert!(matches!(e, PersistError::NotFormatted), "{e}");
        // Sized but not formatted (a worker died before its header store).
        drop(SharedMemory::map(dup(&fd), Layout::of(&geometry()).unwrap().total).unwrap());
        let e = RegionView::open(dup(&fd), geometry()).unwrap_err();
        assert!(matches!(e, PersistError::NotFormatted), "{e}");
        Region::open(dup(&fd), geometry()).unwrap();
        let mut other = geometry();
        other.conn_slots = 9;
        assert!(RegionView::open(dup(&fd), other).is_err());
        assert!(RegionView::open(dup(&fd), geometry()).is_ok());
    }

    #[test]
    fn sees_what_the_worker_stores() {
        let fd = memfd();
        let (region, _) = Region::open(dup(&fd), geometry()).unwrap();
        let view = RegionView::open(dup(&fd), geometry()).unwrap();
        assert_eq!(view.generation(), 0);
        assert_eq!(view.session(), None);
        assert_eq!(view.inflight(1), None);
        assert_eq!(view.live_connections().count(), 0);

        region.next_generation();
        region.next_generation();
        let mut s = SessionRecord::default();
        s.vrings[1].size = 16;
        s.vrings[1].flags = VRING_ENABLED | VRING_STARTED;
        region.session().write(&s);
        let mut tx = region.inflight(1).unwrap();
        tx.format(16, 7).unwrap();
        tx.mark(3);
        for (i, uid) in [(0, 5), (4, 6), (6, 0)] {
            let rec = ConnRecord {
                uid,
                state: 3,
                ..Default::default()
            };
            region.slot(i).unwrap().write(&rec);
        }

        assert_eq!(view.generation(), 2);
        assert_eq!(view.session().map(|s| s.vrings[1].size), Some(16));
        let tx = view.inflight(1).unwrap();
        assert_eq!((tx.queue_size, tx.used_idx, tx.in_flight), (16, 7, 1));
        assert_eq!(tx.last_avail_idx(), 8);
        assert_eq!(view.inflight(0), None);
        assert_eq!(view.inflight(2), None);
        let uids: Vec<u64> = view.live_connections().map(|c| c.uid).collect();
        assert_eq!(uids, [5, 6]);
    }
}
