//! The state region: one memfd that every worker incarnation maps, laid out
//! as a versioned header followed by fixed parts.
//!
//! ```text
//!   header        magic, layout version, geometry, worker generation
//!   session       SessionRecord (A/B record)
//!   rings         RX batch commit record, next connection uid, last
//!                 host client a worker took from the keeper
//!   inflight[2]   inflight logs of the RX and TX queues (vhost-user layout)
//!   tx_meta       one TxMeta per TX descriptor head
//!   slots         one ConnRecord (A/B record) per connection slot
//!   data          one buffer area per connection slot, page aligned
//!   resume        one ResumeRecord (A/B record) per connection slot
//!                 (since layout 3)
//! ```
//!
//! The geometry (largest queue size, number of slots, bytes of each data
//! area) comes from the command line and is recorded in the header; every
//! offset follows from it, so a successor with the same geometry finds
//! every part where its predecessor left it. A region with another layout
//! version or geometry is refused with an error naming the difference.
//!
//! A new memfd reads as zeroes; the first worker formats it (header last,
//! so a region whose header is in place is completely formatted).

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vm_memory::ByteValued;

use crate::inflight::{inflight_bytes, InflightLog};
use crate::record::{record_bytes, Record};
use crate::resume::ResumeRecord;
use crate::session::SessionRecord;
use crate::shm::{page_size, SharedMemory};
use crate::slot::{ConnRecord, TxMeta};
use crate::PersistError;

/// "VSOCKDST": a vsockd state region.
pub const MAGIC: [u8; 8] = *b"VSOCKDST";
/// Layout version this build reads and writes (2: `last_host_client_uid`).
#[cfg(not(feature = "layout-next"))]
pub const LAYOUT_VERSION: u32 = 3;
/// Layout version of a build with feature `layout-next`: a test layout one
/// past the current one (see `migrate`), so that tests can upgrade to a
/// binary with a newer layout, and back.
#[cfg(feature = "layout-next")]
pub const LAYOUT_VERSION: u32 = 4;
/// Bytes reserved for the header.
const HEADER_BYTES: usize = 4096;
/// Bytes reserved for the rings part.
const RINGS_BYTES: usize = 64;

/// The sizes every offset follows from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Largest queue size the device accepts.
    pub max_queue_size: u16,
    /// Connection slots.
    pub conn_slots: u32,
    /// Bytes of each slot's data area (a multiple of the page size).
    pub conn_data_bytes: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Header {
    magic: [u8; 8],
    version: u32,
    header_bytes: u32,
    region_bytes: u64,
    pub(crate) generation: u64,
    max_queue_size: u32,
    conn_slots: u32,
    conn_data_bytes: u64,
    /// The layout version this region was migrated from, the last time
    /// it was (0: never; a region formatted at its version).
    pub(crate) migrated_from: u32,
    _reserved: u32,
}

// SAFETY: `repr(C)`, integers and a byte array, no padding (56 bytes).
unsafe impl ByteValued for Header {}

impl Header {
    /// The header at the start of a mapping.
    ///
    /// # Safety
    ///
    /// `base` must be 8-aligned and valid for reads of `HEADER_BYTES`.
    pub(crate) unsafe fn read(base: *const u8) -> Header {
        // SAFETY: as the caller promises.
        unsafe { std::ptr::read_volatile(base.cast::<Header>()) }
    }

    /// True once the region is formatted (the header is stored last).
    pub(crate) fn is_formatted(&self) -> bool {
        self.magic != [0; 8]
    }

    /// Checks that a formatted region is one this build reads, laid out
    /// for `geometry`.
    pub(crate) fn check(&self, geometry: &Geometry, layout: &Layout) -> Result<(), PersistError> {
        self.check_version()?;
        if self.version < LAYOUT_VERSION {
            return Err(PersistError::LayoutOlder {
                found: self.version,
            });
        }
        self.check_geometry(geometry, layout)
    }

    /// Checks the magic, and that this build reads the layout version or
    /// migrates from it.
    pub(crate) fn check_version(&self) -> Result<(), PersistError> {
        if self.magic != MAGIC {
            return Err(PersistError::NotARegion);
        }
        if self.version > LAYOUT_VERSION {
            return Err(PersistError::LayoutTooNew {
                found: self.version,
                known: LAYOUT_VERSION,
            });
        }
        if self.version < crate::migrate::OLDEST_LAYOUT_VERSION {
            return Err(PersistError::LayoutUnsupported {
                found: self.version,
            });
        }
        Ok(())
    }

    /// Checks the recorded geometry against `geometry`: every layout this
    /// build knows records it in the same fields.
    pub(crate) fn check_geometry(
        &self,
        geometry: &Geometry,
        layout: &Layout,
    ) -> Result<(), PersistError> {
        self.check_geometry_only(geometry)?;
        if self.region_bytes != layout.total as u64 {
            return Err(PersistError::Geometry(format!(
                "the region is {} bytes, this worker lays {geometry:?} out in {}",
                self.region_bytes, layout.total
            )));
        }
        Ok(())
    }

    /// Checks the recorded geometry, not the size it gives in this
    /// build's layout (an older layout may differ).
    pub(crate) fn check_geometry_only(&self, geometry: &Geometry) -> Result<(), PersistError> {
        let found = Geometry {
            max_queue_size: self.max_queue_size as u16,
            conn_slots: self.conn_slots,
            conn_data_bytes: self.conn_data_bytes,
        };
        if found != *geometry {
            return Err(PersistError::Geometry(format!(
                "the region was laid out for {found:?}, this worker expects {geometry:?}"
            )));
        }
        Ok(())
    }

    pub(crate) fn version(&self) -> u32 {
        self.version
    }

    /// Stamps a migrated copy: this build's version, migrated from
    /// `from`, `region_bytes` long.
    pub(crate) fn restamp(&mut self, from: u32, region_bytes: u64) {
        self.version = LAYOUT_VERSION;
        self.migrated_from = from;
        self.region_bytes = region_bytes;
    }

    #[cfg(test)]
    pub(crate) fn set_version(&mut self, version: u32) {
        self.version = version;
    }
}

/// The header fields that lie at the same offsets in every layout
/// version, read without mapping the region: what a process that does
/// not know the layout (a keeper of another build) may rely on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    /// Layout version (0: not formatted).
    pub version: u32,
    /// Generation of the worker that took the region over last.
    pub generation: u64,
    /// The layout it was migrated from, the last time it was (0: never).
    pub migrated_from: u32,
}

impl Stamp {
    /// Reads the stamp of the region in memfd `fd`.
    pub fn read(fd: &OwnedFd) -> std::io::Result<Stamp> {
        use std::os::fd::AsRawFd;
        let mut header = Header::default();
        let bytes = header.as_mut_slice();
        // SAFETY: pread(2) into a local buffer of `bytes.len()` bytes.
        let n = unsafe { libc::pread(fd.as_raw_fd(), bytes.as_mut_ptr().cast(), bytes.len(), 0) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if (n as usize) < bytes.len() || !header.is_formatted() {
            return Ok(Stamp {
                version: 0,
                generation: 0,
                migrated_from: 0,
            });
        }
        Ok(Stamp {
            version: header.version,
            generation: header.generation,
            migrated_from: header.migrated_from,
        })
    }
}

/// Commit state of the RX queue and the connection uid counters.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RingsState {
    /// RX batch being committed (its slots written, used->idx maybe not
    /// yet published).
    pub rx_pending_batch: u64,
    /// Last RX batch known published.
    pub rx_confirmed_batch: u64,
    /// Used index the pending batch publishes (a u16, stored in a u64 so
    /// that every field is one atomic word).
    pub rx_pending_used: u64,
    /// Last connection uid handed out.
    pub last_conn_uid: u64,
    /// Highest uid of a host client the keeper accepted (keeper range,
    /// see `fdstore::well_known`) whose connection a worker has recorded;
    /// 0 before the first. Raised only after the record is written, so a
    /// keeper-held client stream above it was never recorded by anyone.
    pub last_host_client_uid: u64,
}

// SAFETY: `repr(C)`, five u64, no padding (40 bytes).
unsafe impl ByteValued for RingsState {}

/// Offsets of the parts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    pub(crate) session: usize,
    pub(crate) rings: usize,
    pub(crate) inflight: [usize; 2],
    tx_meta: usize,
    pub(crate) slots: usize,
    pub(crate) slot_stride: usize,
    data: usize,
    /// The resume table, right after the data areas.
    pub(crate) resume: usize,
    resume_stride: usize,
    pub(crate) total: usize,
}

impl Layout {
    pub(crate) fn of(g: &Geometry) -> Result<Self, PersistError> {
        let page = page_size();
        let align = |n: usize| n.next_multiple_of(64);
        let session = HEADER_BYTES;
        let rings = session + align(record_bytes::<SessionRecord>());
        let inflight0 = rings + RINGS_BYTES;
        let log = inflight_bytes(g.max_queue_size);
        let inflight1 = inflight0 + log;
        let tx_meta = inflight1 + log;
        let slots = tx_meta + align(std::mem::size_of::<TxMeta>() * usize::from(g.max_queue_size));
        let slot_stride = align(record_bytes::<ConnRecord>());
        let data = (slots + slot_stride * g.conn_slots as usize).next_multiple_of(page);
        let data_bytes = usize::try_from(g.conn_data_bytes)
            .ok()
            .filter(|n| n % page == 0)
            .ok_or_else(|| {
                PersistError::Geometry(format!(
                    "data area of {} bytes is not a multiple of the page size",
                    g.conn_data_bytes
                ))
            })?;
        let resume = (g.conn_slots as usize)
            .checked_mul(data_bytes)
            .and_then(|n| n.checked_add(data))
            .ok_or_else(|| PersistError::Geometry(format!("{g:?} is too large")))?;
        let resume_stride = align(record_bytes::<ResumeRecord>());
        let total = (resume + resume_stride * g.conn_slots as usize).next_multiple_of(page);
        Ok(Layout {
            session,
            rings,
            inflight: [inflight0, inflight1],
            tx_meta,
            slots,
            slot_stride,
            data,
            resume,
            resume_stride,
            total,
        })
    }
}

/// The mapped state region.
#[derive(Debug, Clone)]
pub struct Region {
    shm: Arc<SharedMemory>,
    geometry: Geometry,
    layout: Layout,
}

// SAFETY: the mapping is plain shared memory that lives as long as the
// `SharedMemory`; moving it between threads changes nothing.
unsafe impl Send for SharedMemory {}
// SAFETY: as above; concurrent access goes through atomics or is excluded
// by the single-writer rule of each part.
unsafe impl Sync for SharedMemory {}

impl Region {
    /// Maps the region in `fd` (a memfd), formatting it if it is new.
    /// Returns the region and whether it was new.
    pub fn open(fd: OwnedFd, geometry: Geometry) -> Result<(Self, bool), PersistError> {
        let existing = SharedMemory::file_len(&fd)?;
        let region = Region::map(fd, geometry)?;
        let (header, layout) = (region.header(), region.layout);
        if existing == 0 || header.magic == [0; 8] {
            region.format();
            return Ok((region, true));
        }
        header.check(&geometry, &layout)?;
        Ok((region, false))
    }

    /// Maps the region in `fd`, which a worker formatted already, without
    /// writing to it: a standby worker checks that it can read the region
    /// before it takes anything over. Fails with
    /// [`PersistError::NotFormatted`] on a region nobody formatted.
    pub fn open_existing(fd: OwnedFd, geometry: Geometry) -> Result<Self, PersistError> {
        if SharedMemory::file_len(&fd)? == 0 {
            return Err(PersistError::NotFormatted);
        }
        let region = Region::map(fd, geometry)?;
        let header = region.header();
        if !header.is_formatted() {
            return Err(PersistError::NotFormatted);
        }
        header.check(&geometry, &region.layout)?;
        Ok(region)
    }

    /// Maps the region in `fd` laid out for `geometry` (sizing the file).
    fn map(fd: OwnedFd, geometry: Geometry) -> Result<Self, PersistError> {
        let layout = Layout::of(&geometry)?;
        let shm = Arc::new(SharedMemory::map(fd, layout.total)?);
        Ok(Region {
            shm,
            geometry,
            layout,
        })
    }

    fn header(&self) -> Header {
        // SAFETY: the header lies at the start of the mapping, which is
        // larger than HEADER_BYTES.
        unsafe { Header::read(self.shm.as_ptr()) }
    }

    fn format(&self) {
        // SAFETY: every part lies inside the mapping (`Layout::of` sized
        // it); nothing else uses the region while it is formatted.
        unsafe {
            std::ptr::write_bytes(self.shm.as_ptr(), 0, self.layout.data);
            let resume = self.layout.resume;
            std::ptr::write_bytes(self.at(resume), 0, self.layout.total - resume);
        }
        let header = Header {
            magic: MAGIC,
            version: LAYOUT_VERSION,
            header_bytes: HEADER_BYTES as u32,
            region_bytes: self.layout.total as u64,
            generation: 0,
            max_queue_size: u32::from(self.geometry.max_queue_size),
            conn_slots: self.geometry.conn_slots,
            conn_data_bytes: self.geometry.conn_data_bytes,
            migrated_from: 0,
            _reserved: 0,
        };
        std::sync::atomic::fence(Ordering::Release);
        // SAFETY: as `header`.
        unsafe { std::ptr::write_volatile(self.shm.as_ptr().cast::<Header>(), header) };
    }

    fn keep(&self) -> Option<Arc<dyn Send + Sync>> {
        Some(self.shm.clone())
    }

    fn at(&self, offset: usize) -> *mut u8 {
        debug_assert!(offset < self.shm.len());
        // SAFETY: callers pass offsets of parts inside the mapping.
        unsafe { self.shm.as_ptr().add(offset) }
    }

    fn generation_field(&self) -> &AtomicU64 {
        let offset = std::mem::offset_of!(Header, generation);
        // SAFETY: the field is 8-aligned inside the header; AtomicU64 has
        // u64's layout.
        unsafe { &*self.at(offset).cast::<AtomicU64>() }
    }

    /// The geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The memfd.
    pub fn fd(&self) -> &OwnedFd {
        self.shm.fd()
    }

    /// Generation of the worker that owns the region now (0: none yet).
    pub fn generation(&self) -> u64 {
        self.generation_field().load(Ordering::Acquire)
    }

    /// Takes the region over for a new worker: returns its generation.
    pub fn next_generation(&self) -> u64 {
        self.generation_field().fetch_add(1, Ordering::AcqRel) + 1
    }

    /// The session record. One writer at a time.
    pub fn session(&self) -> Record<SessionRecord> {
        // SAFETY: the session part is 8-aligned and sized for the record.
        unsafe { Record::at(self.at(self.layout.session), self.keep()) }
    }

    fn rings_field(&self, offset: usize) -> &AtomicU64 {
        // SAFETY: the rings part is 64-aligned and RINGS_BYTES long, and
        // every field read or written through here is a u64 at an 8-aligned
        // offset inside it; AtomicU64 has u64's layout.
        unsafe { &*self.at(self.layout.rings + offset).cast::<AtomicU64>() }
    }

    /// The RX commit state and uid counter as they stand.
    pub fn rings(&self) -> RingsState {
        let used = self
            .rings_field(std::mem::offset_of!(RingsState, rx_pending_used))
            .load(Ordering::Acquire);
        RingsState {
            rx_pending_batch: self
                .rings_field(std::mem::offset_of!(RingsState, rx_pending_batch))
                .load(Ordering::Acquire),
            rx_confirmed_batch: self
                .rings_field(std::mem::offset_of!(RingsState, rx_confirmed_batch))
                .load(Ordering::Acquire),
            rx_pending_used: used,
            last_conn_uid: self
                .rings_field(std::mem::offset_of!(RingsState, last_conn_uid))
                .load(Ordering::Acquire),
            last_host_client_uid: self.last_host_client_uid(),
        }
    }

    /// Marks RX batch `batch` pending: every slot it changed is written,
    /// and publishing it sets `used->idx` to `used`. The used index is
    /// stored first, so a batch number is never seen with another batch's
    /// index.
    pub fn rx_mark_pending(&self, batch: u64, used: u16) {
        self.rings_field(std::mem::offset_of!(RingsState, rx_pending_used))
            .store(u64::from(used), Ordering::Release);
        self.rings_field(std::mem::offset_of!(RingsState, rx_pending_batch))
            .store(batch, Ordering::Release);
    }

    /// Marks RX batch `batch` published.
    pub fn rx_mark_confirmed(&self, batch: u64) {
        self.rings_field(std::mem::offset_of!(RingsState, rx_confirmed_batch))
            .store(batch, Ordering::Release);
    }

    /// Hands out the next connection uid (from 1).
    pub fn take_conn_uid(&self) -> u64 {
        let field = self.rings_field(std::mem::offset_of!(RingsState, last_conn_uid));
        field.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Makes every uid up to `uid` taken.
    pub fn reserve_conn_uids(&self, uid: u64) {
        self.rings_field(std::mem::offset_of!(RingsState, last_conn_uid))
            .fetch_max(uid, Ordering::AcqRel);
    }

    /// Notes that the connection of host client `uid` (a keeper uid) is
    /// recorded; the mark only goes up.
    pub fn note_host_client(&self, uid: u64) {
        self.rings_field(std::mem::offset_of!(RingsState, last_host_client_uid))
            .fetch_max(uid, Ordering::AcqRel);
    }

    /// The highest keeper uid [`Region::note_host_client`] noted (0: none).
    pub fn last_host_client_uid(&self) -> u64 {
        self.rings_field(std::mem::offset_of!(RingsState, last_host_client_uid))
            .load(Ordering::Acquire)
    }

    /// The inflight log of queue `q` (0 RX, 1 TX). One writer at a time.
    pub fn inflight(&self, q: usize) -> Option<InflightLog> {
        let offset = *self.layout.inflight.get(q)?;
        // SAFETY: the log part is 64-aligned and sized for the largest
        // queue.
        Some(unsafe { InflightLog::at(self.at(offset), self.geometry.max_queue_size, self.keep()) })
    }

    /// The TX metadata entry of descriptor `head`.
    pub fn tx_meta(&self, head: u16) -> Option<TxMeta> {
        let p = self.tx_meta_ptr(head)?;
        // SAFETY: `tx_meta_ptr` checked the entry lies in the table.
        Some(unsafe { std::ptr::read_volatile(p) })
    }

    /// Stores the TX metadata entry of descriptor `head`.
    pub fn set_tx_meta(&self, head: u16, meta: &TxMeta) {
        if let Some(p) = self.tx_meta_ptr(head) {
            // SAFETY: as in `tx_meta`; one writer at a time.
            unsafe { std::ptr::write_volatile(p, *meta) };
            std::sync::atomic::fence(Ordering::Release);
        }
    }

    fn tx_meta_ptr(&self, head: u16) -> Option<*mut TxMeta> {
        (head < self.geometry.max_queue_size).then(|| {
            // SAFETY: the table has `max_queue_size` 8-aligned entries.
            unsafe {
                self.at(self.layout.tx_meta)
                    .cast::<TxMeta>()
                    .add(usize::from(head))
            }
        })
    }

    /// Connection slot `i`. One writer at a time.
    pub fn slot(&self, i: u32) -> Option<Record<ConnRecord>> {
        if i >= self.geometry.conn_slots {
            return None;
        }
        let offset = self.layout.slots + self.layout.slot_stride * i as usize;
        // SAFETY: slot `i` exists, is 64-aligned and sized for the record.
        Some(unsafe { Record::at(self.at(offset), self.keep()) })
    }

    /// Start and length of slot `i`'s data area.
    pub fn data(&self, i: u32) -> Option<(*mut u8, usize)> {
        if i >= self.geometry.conn_slots {
            return None;
        }
        let len = self.geometry.conn_data_bytes as usize;
        Some((self.at(self.layout.data + len * i as usize), len))
    }

    /// Resume record of connection slot `i`. One writer at a time.
    pub fn resume(&self, i: u32) -> Option<Record<ResumeRecord>> {
        if i >= self.geometry.conn_slots {
            return None;
        }
        let offset = self.layout.resume + self.layout.resume_stride * i as usize;
        // SAFETY: entry `i` exists, is 64-aligned and sized for the record.
        Some(unsafe { Record::at(self.at(offset), self.keep()) })
    }

    /// Gives back the pages of slot `i`'s data area (they read as zero).
    pub fn discard_data(&self, i: u32) {
        if i < self.geometry.conn_slots {
            let len = self.geometry.conn_data_bytes as usize;
            self.shm.discard(self.layout.data + len * i as usize, len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geometry() -> Geometry {
        Geometry {
            max_queue_size: 256,
            conn_slots: 4,
            conn_data_bytes: 64 * 1024,
        }
    }

    fn memfd() -> OwnedFd {
        SharedMemory::create_fd(c"vsockd-test").unwrap()
    }

    fn dup(fd: &OwnedFd) -> OwnedFd {
        fd.try_clone().unwrap()
    }

    #[test]
    fn formats_once_and_keeps_what_was_written() {
        let fd = memfd();
        let (r, fresh) = Region::open(dup(&fd), geometry()).unwrap();
        assert!(fresh);
        assert_eq!(r.next_generation(), 1);
        let s = SessionRecord {
            msg_seq: 42,
            ..Default::default()
        };
        r.session().write(&s);
        let (ptr, len) = r.data(3).unwrap();
        // SAFETY: the data area of slot 3 is `len` bytes.
        unsafe { std::ptr::write_bytes(ptr, 0xab, len) };
        drop(r);
        let (r, fresh) = Region::open(dup(&fd), geometry()).unwrap();
        assert!(!fresh);
        assert_eq!(r.generation(), 1);
        assert_eq!(r.session().read().unwrap().body.msg_seq, 42);
        let (ptr, len) = r.data(3).unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { *ptr.add(len - 1) }, 0xab);
        r.discard_data(3);
        // SAFETY: as above.
        assert_eq!(unsafe { *ptr.add(len - 1) }, 0);
        assert!(r.slot(4).is_none());
        assert!(r.inflight(2).is_none());
    }

    /// Regression: the first two uids handed out were both 1.
    #[test]
    fn connection_uids_are_unique_and_survive_a_reopen() {
        let fd = memfd();
        let (r, _) = Region::open(dup(&fd), geometry()).unwrap();
        let first: Vec<u64> = (0..3).map(|_| r.take_conn_uid()).collect();
        assert_eq!(first, vec![1, 2, 3]);
        drop(r);
        let (r, _) = Region::open(dup(&fd), geometry()).unwrap();
        assert_eq!(r.take_conn_uid(), 4);
        r.reserve_conn_uids(10);
        assert_eq!(r.take_conn_uid(), 11);
        r.rx_mark_pending(7, 300);
        r.rx_mark_confirmed(6);
        let rings = r.rings();
        assert_eq!(
            (
                rings.rx_pending_batch,
                rings.rx_pending_used,
                rings.rx_confirmed_batch
            ),
            (7, 300, 6)
        );
    }

    #[test]
    fn the_host_client_mark_only_goes_up_and_survives_a_reopen() {
        let fd = memfd();
        let (r, _) = Region::open(dup(&fd), geometry()).unwrap();
        assert_eq!(r.last_host_client_uid(), 0);
        let first = crate::fdstore::well_known::FIRST_KEEPER_CONN_UID;
        r.note_host_client(first + 2);
        r.note_host_client(first + 1);
        drop(r);
        let (r, _) = Region::open(dup(&fd), geometry()).unwrap();
        assert_eq!(r.last_host_client_uid(), first + 2);
        assert_eq!(r.rings().last_host_client_uid, first + 2);
        // Apart from the worker's own counter.
        assert_eq!(r.take_conn_uid(), 1);
    }

    #[test]
    fn refuses_other_geometry_versions_and_files() {
        let fd = memfd();
        Region::open(dup(&fd), geometry()).unwrap();
        let mut other = geometry();
        other.conn_slots = 5;
        let e = Region::open(dup(&fd), other).unwrap_err();
        assert!(e.to_string().contains("laid out for"), "{e}");
        // A newer layout version.
        let (r, _) = Region::open(dup(&fd), geometry()).unwrap();
        // SAFETY: `version` lies in the header.
        unsafe { *r.at(8).cast::<u32>() = LAYOUT_VERSION + 1 };
        let e = Region::open(dup(&fd), geometry()).unwrap_err();
        assert!(matches!(e, PersistError::LayoutTooNew { .. }), "{e}");
        // Something else entirely.
        // SAFETY: the magic lies in the header.
        unsafe { *r.at(0) = b'X' };
        let e = Region::open(dup(&fd), geometry()).unwrap_err();
        assert!(matches!(e, PersistError::NotARegion), "{e}");
        let mut bad = geometry();
        bad.conn_data_bytes = 1000;
        assert!(Region::open(memfd(), bad).is_err());
    }

    #[test]
    fn a_standby_opens_only_a_formatted_region_and_reads_its_stamp() {
        let fd = memfd();
        assert_eq!(Stamp::read(&fd).unwrap().version, 0);
        let e = Region::open_existing(dup(&fd), geometry()).unwrap_err();
        assert!(matches!(e, PersistError::NotFormatted), "{e}");
        let (r, _) = Region::open(dup(&fd), geometry()).unwrap();
        assert_eq!(r.next_generation(), 1);
        let standby = Region::open_existing(dup(&fd), geometry()).unwrap();
        assert_eq!(standby.generation(), 1);
        assert_eq!(
            Stamp::read(&fd).unwrap(),
            Stamp {
                version: LAYOUT_VERSION,
                generation: 1,
                migrated_from: 0,
            }
        );
        // SAFETY: `version` lies in the header.
        unsafe { *r.at(8).cast::<u32>() = LAYOUT_VERSION + 1 };
        let e = Region::open_existing(dup(&fd), geometry()).unwrap_err();
        assert!(matches!(e, PersistError::LayoutTooNew { .. }), "{e}");
    }

    #[test]
    fn parts_do_not_overlap() {
        let l = Layout::of(&geometry()).unwrap();
        assert!(l.session + record_bytes::<SessionRecord>() <= l.rings);
        assert!(l.rings + std::mem::size_of::<RingsState>() <= l.inflight[0]);
        assert!(l.inflight[0] + inflight_bytes(256) <= l.inflight[1]);
        assert!(l.inflight[1] + inflight_bytes(256) <= l.tx_meta);
        assert!(l.tx_meta + 256 * std::mem::size_of::<TxMeta>() <= l.slots);
        assert!(l.slots + 4 * l.slot_stride <= l.data);
        assert_eq!(l.resume, l.data + 4 * 64 * 1024);
        assert!(l.resume_stride >= record_bytes::<ResumeRecord>());
        assert!(l.resume + 4 * l.resume_stride <= l.total);
        assert_eq!(l.total % page_size(), 0);
    }

    #[test]
    fn resume_records_are_kept_per_slot() {
        let fd = memfd();
        let (r, _) = Region::open(dup(&fd), geometry()).unwrap();
        for i in 0..4 {
            assert!(r.resume(i).unwrap().read().is_none());
        }
        let rec = ResumeRecord {
            conn_uid: 5,
            token: [7; 16],
            ..Default::default()
        };
        r.resume(3).unwrap().write(&rec);
        assert!(r.resume(4).is_none());
        drop(r);
        let (r, _) = Region::open(dup(&fd), geometry()).unwrap();
        assert_eq!(r.resume(3).unwrap().read().unwrap().body, rec);
        assert!(r.resume(2).unwrap().read().is_none());
        assert!(r.slot(3).unwrap().read().is_none(), "slot and resume apart");
    }
}
