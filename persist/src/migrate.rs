//! Layout migration: a build maps state regions of its own layout version
//! and migrates those of the older versions it knows, so that an upgrade
//! may change the layout.
//!
//! A migration never writes the region it migrates. It copies it into a
//! new memfd (only the extents that hold data: the data areas are mostly
//! holes) and migrates the copy one version at a time, then stamps it
//! with this build's version and the version it came from. So the worker
//! being replaced, quiesced with the old region mapped, can resume on it
//! untouched if the upgrade fails at any point; the keeper keeps the old
//! memfd until the new worker serves.
//!
//! Versions known:
//! * 2: the first layout of a binary with `vsockd upgrade`. Version 1
//!   predates upgrades, and a binary that wrote it has no way to hand its
//!   region to another binary, so no build needs to read it.
//! * 3: layout 2 with the resume table (resumable host sessions) after the
//!   data areas. The step from 2 extends the file: the new table reads as
//!   zeroes, no session, which is what a layout-2 worker had.
//! * 4, only in a build with feature `layout-next`: a test layout, layout
//!   3 under the next number, so that tests can upgrade to a binary with a
//!   newer layout (a migration) and back (a refusal).
//!
//! Invariant of every layout: the header's fields up to the geometry
//! (magic, version, header size, region size, generation, geometry) stay
//! at their offsets, so that any build can tell what a region is before it
//! knows how to read the rest (see `Stamp`).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use vm_memory::ByteValued;

use crate::region::{Header, Layout};
use crate::shm::SharedMemory;
use crate::{Geometry, PersistError, LAYOUT_VERSION};

/// The oldest layout version this build migrates from.
pub const OLDEST_LAYOUT_VERSION: u32 = 2;
/// Bytes copied per read and write.
const COPY_CHUNK_BYTES: usize = 1 << 20;

/// One step: migrates the copy in the memfd, laid out for the geometry,
/// from version `v` to `v + 1`, in place.
type Step = fn(&OwnedFd, &Geometry) -> Result<(), PersistError>;

/// The step from version `version`, if this build knows one.
fn step_from(version: u32) -> Option<Step> {
    match version {
        2 => Some(add_resume_table),
        #[cfg(feature = "layout-next")]
        3 => Some(same_parts),
        _ => None,
    }
}

/// 2 to 3: the resume table follows every part of layout 2, so the file
/// grows to hold it, and the new bytes read as zeroes (no session).
fn add_resume_table(copy: &OwnedFd, geometry: &Geometry) -> Result<(), PersistError> {
    let layout = Layout::of(geometry)?;
    let len = SharedMemory::file_len(copy)?;
    if len > layout.resume as u64 {
        return Err(PersistError::Migration(format!(
            "a layout-2 region for {geometry:?} is {} bytes, this one is {len}",
            layout.resume
        )));
    }
    set_len(copy, layout.total as u64).map_err(|e| PersistError::Migration(format!("grow: {e}")))
}

/// A step between layouts whose parts are the same.
#[cfg(feature = "layout-next")]
fn same_parts(_copy: &OwnedFd, _geometry: &Geometry) -> Result<(), PersistError> {
    Ok(())
}

/// The version of the formatted region in `fd` if it is older than this
/// build's and this build migrates from it; `None` if it is this build's.
/// Errors as mapping would: a region this build cannot read, or laid out
/// for another geometry.
pub fn needs_migration(fd: &OwnedFd, geometry: &Geometry) -> Result<Option<u32>, PersistError> {
    let header = read_header(fd)?.ok_or(PersistError::NotFormatted)?;
    header.check_version()?;
    if header.version() == LAYOUT_VERSION {
        return Ok(None);
    }
    header.check_geometry_only(geometry)?;
    Ok(Some(header.version()))
}

/// Migrates the region in `fd` to this build's layout in a new memfd,
/// which it returns; `fd` is read, never written.
pub fn migrate(fd: &OwnedFd, geometry: &Geometry) -> Result<OwnedFd, PersistError> {
    let Some(from) = needs_migration(fd, geometry)? else {
        return Err(PersistError::Migration(format!(
            "the region already has layout version {LAYOUT_VERSION}"
        )));
    };
    let copy = SharedMemory::create_fd(c"vsockd-state")?;
    let len = SharedMemory::file_len(fd)?;
    copy_extents(fd, &copy, len).map_err(|e| PersistError::Migration(format!("copy: {e}")))?;
    for v in from..LAYOUT_VERSION {
        let step = step_from(v)
            .ok_or_else(|| PersistError::Migration(format!("no step from layout version {v}")))?;
        step(&copy, geometry)?;
    }
    let layout = Layout::of(geometry)?;
    let mut header = read_header(&copy)?.ok_or(PersistError::NotFormatted)?;
    header.restamp(from, layout.total as u64);
    write_header(&copy, &header).map_err(|e| PersistError::Migration(format!("stamp: {e}")))?;
    log::info!("state region migrated from layout version {from} to {LAYOUT_VERSION}");
    Ok(copy)
}

/// The header of the region in `fd`, `None` if it is not formatted.
fn read_header(fd: &OwnedFd) -> Result<Option<Header>, PersistError> {
    let mut header = Header::default();
    let bytes = header.as_mut_slice();
    let n = pread(fd, bytes, 0).map_err(PersistError::Io)?;
    if n < bytes.len() || !header.is_formatted() {
        return Ok(None);
    }
    Ok(Some(header))
}

fn write_header(fd: &OwnedFd, header: &Header) -> io::Result<()> {
    let bytes = header.as_slice();
    let n = pwrite(fd, bytes, 0)?;
    if n < bytes.len() {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short write"));
    }
    Ok(())
}

/// Copies the first `len` bytes of `src` into `dst`, sized `len`: only the
/// extents that hold data (SEEK_DATA and SEEK_HOLE), the holes stay holes.
fn copy_extents(src: &OwnedFd, dst: &OwnedFd, len: u64) -> io::Result<()> {
    set_len(dst, len)?;
    let size = len as libc::off_t;
    let mut buf = vec![0u8; COPY_CHUNK_BYTES];
    let mut at: libc::off_t = 0;
    while at < size {
        // SAFETY: lseek(2) on a descriptor we hold.
        let data = unsafe { libc::lseek(src.as_raw_fd(), at, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                // No data past `at`.
                return Ok(());
            }
            return Err(e);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(src.as_raw_fd(), data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let end = hole.min(size);
        let mut off = data;
        while off < end {
            let want = usize::try_from(end - off).map_or(buf.len(), |n| n.min(buf.len()));
            let n = pread(src, &mut buf[..want], off)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the region shrank while copied",
                ));
            }
            let mut done = 0;
            while done < n {
                let w = pwrite(dst, &buf[done..n], off + done as libc::off_t)?;
                if w == 0 {
                    return Err(io::Error::new(io::ErrorKind::WriteZero, "short write"));
                }
                done += w;
            }
            off += n as libc::off_t;
        }
        at = end;
    }
    Ok(())
}

/// Sizes the file in `fd` to `len` bytes (new bytes read as zeroes).
fn set_len(fd: &OwnedFd, len: u64) -> io::Result<()> {
    let size = libc::off_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "region too large"))?;
    // SAFETY: ftruncate(2) on a descriptor we hold.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn pread(fd: &OwnedFd, buf: &mut [u8], offset: libc::off_t) -> io::Result<usize> {
    loop {
        // SAFETY: pread(2) into `buf`, valid for its length.
        let n = unsafe { libc::pread(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), offset) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn pwrite(fd: &OwnedFd, buf: &[u8], offset: libc::off_t) -> io::Result<usize> {
    loop {
        // SAFETY: pwrite(2) from `buf`, valid for its length.
        let n = unsafe { libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), offset) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Region;

    fn geometry() -> Geometry {
        Geometry {
            max_queue_size: 256,
            conn_slots: 4,
            conn_data_bytes: 64 * 1024,
        }
    }

    fn memfd() -> OwnedFd {
        SharedMemory::create_fd(c"migrate-test").unwrap()
    }

    /// Sets the version in the header of the region in `fd`.
    fn set_version(fd: &OwnedFd, v: u32) {
        let mut h = read_header(fd).unwrap().unwrap();
        h.set_version(v);
        write_header(fd, &h).unwrap();
    }

    #[test]
    fn the_current_layout_needs_none_and_a_newer_or_unknown_one_is_refused() {
        let fd = memfd();
        Region::open(fd.try_clone().unwrap(), geometry()).unwrap();
        assert_eq!(needs_migration(&fd, &geometry()).unwrap(), None);
        assert!(migrate(&fd, &geometry()).is_err());
        set_version(&fd, LAYOUT_VERSION + 1);
        let e = needs_migration(&fd, &geometry()).unwrap_err();
        assert!(matches!(e, PersistError::LayoutTooNew { .. }), "{e}");
        set_version(&fd, 1);
        let e = needs_migration(&fd, &geometry()).unwrap_err();
        assert!(
            matches!(e, PersistError::LayoutUnsupported { found: 1 }),
            "{e}"
        );
        let e = needs_migration(&memfd(), &geometry()).unwrap_err();
        assert!(matches!(e, PersistError::NotFormatted), "{e}");
    }

    #[test]
    fn extents_are_copied_and_holes_stay_holes() {
        let src = memfd();
        let len = 8 << 20;
        let dst = memfd();
        // Data at the start, in the middle and in the last page.
        for (off, byte) in [(0, 1u8), (3 << 20, 2), (len - 10, 3)] {
            pwrite(&src, &[byte; 10], off as libc::off_t).unwrap();
        }
        // SAFETY: ftruncate(2) on a memfd we own.
        assert_eq!(
            unsafe { libc::ftruncate(src.as_raw_fd(), len as libc::off_t) },
            0
        );
        copy_extents(&src, &dst, len as u64).unwrap();
        assert_eq!(SharedMemory::file_len(&dst).unwrap(), len as u64);
        for (off, byte) in [(0, 1u8), (3 << 20, 2), (len - 10, 3), (5 << 20, 0)] {
            let mut got = [9u8; 10];
            pread(&dst, &mut got, off as libc::off_t).unwrap();
            assert_eq!(got, [byte; 10], "at {off}");
        }
        // SAFETY: lseek(2) on a memfd we own.
        let hole = unsafe { libc::lseek(dst.as_raw_fd(), 0, libc::SEEK_HOLE) };
        assert!(hole < len as libc::off_t, "the copy has no hole");
    }

    /// A layout-2 region (layout 3 without its resume table) migrates:
    /// every part it had keeps its bytes, and the new table reads empty.
    #[test]
    fn layout_2_gains_an_empty_resume_table() {
        use crate::resume::ResumeRecord;
        use crate::slot::ConnRecord;
        use crate::Stamp;
        let fd = memfd();
        let (r, _) = Region::open(fd.try_clone().unwrap(), geometry()).unwrap();
        r.next_generation();
        let rec = ConnRecord {
            uid: 9,
            rx_cnt: 1234,
            ..Default::default()
        };
        r.slot(3).unwrap().write(&rec);
        let (ptr, len) = r.data(3).unwrap();
        // SAFETY: the data area of slot 3 is `len` bytes.
        unsafe { std::ptr::write_bytes(ptr.add(len - 100), 0x5a, 100) };
        // What a layout-2 worker left: the resume table was not there.
        let v2_len = Layout::of(&geometry()).unwrap().resume as u64;
        r.resume(1).unwrap().write(&ResumeRecord {
            conn_uid: 77,
            ..Default::default()
        });
        drop(r);
        set_len(&fd, v2_len).unwrap();
        set_version(&fd, 2);
        assert_eq!(needs_migration(&fd, &geometry()).unwrap(), Some(2));
        let copy = migrate(&fd, &geometry()).unwrap();
        assert_eq!(
            SharedMemory::file_len(&fd).unwrap(),
            v2_len,
            "original written"
        );
        let stamp = Stamp::read(&copy).unwrap();
        assert_eq!((stamp.version, stamp.migrated_from), (LAYOUT_VERSION, 2));
        let r = Region::open_existing(copy, geometry()).unwrap();
        assert_eq!(r.generation(), 1);
        assert_eq!(r.slot(3).unwrap().read().unwrap().body, rec);
        let (ptr, len) = r.data(3).unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { *ptr.add(len - 1) }, 0x5a);
        for i in 0..geometry().conn_slots {
            assert!(r.resume(i).unwrap().read().is_none(), "resume record {i}");
        }
    }

    /// A migrated layout-2 region of another size is refused.
    #[test]
    fn a_layout_2_region_of_the_wrong_size_is_refused() {
        let fd = memfd();
        Region::open(fd.try_clone().unwrap(), geometry()).unwrap();
        set_version(&fd, 2);
        let e = migrate(&fd, &geometry()).unwrap_err();
        assert!(matches!(e, PersistError::Migration(_)), "{e}");
    }

    /// An older layout this build knows is copied, migrated and stamped;
    /// the original is not written.
    #[cfg(feature = "layout-next")]
    #[test]
    fn an_older_layout_is_migrated_into_a_copy() {
        use crate::Stamp;
        let fd = memfd();
        let (r, _) = Region::open(fd.try_clone().unwrap(), geometry()).unwrap();
        r.next_generation();
        r.note_host_client(crate::fdstore::well_known::FIRST_KEEPER_CONN_UID + 7);
        drop(r);
        set_version(&fd, 3);
        assert_eq!(needs_migration(&fd, &geometry()).unwrap(), Some(3));
        let copy = migrate(&fd, &geometry()).unwrap();
        assert_eq!(Stamp::read(&fd).unwrap().version, 3);
        let stamp = Stamp::read(&copy).unwrap();
        assert_eq!(
            (stamp.version, stamp.migrated_from, stamp.generation),
            (4, 3, 1)
        );
        let r = Region::open_existing(copy, geometry()).unwrap();
        assert_eq!(
            r.last_host_client_uid(),
            crate::fdstore::well_known::FIRST_KEEPER_CONN_UID + 7
        );
    }
}
