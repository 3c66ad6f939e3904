//! A memfd mapped shared into this process: the memory a successor process
//! maps again to find what its predecessor stored.
//!
//! Stores to the mapping are ordinary memory stores into the page cache of
//! the memfd. They survive the death of the process that made them (SIGKILL
//! included) with no syscall and no flush: the kernel keeps the pages as
//! long as any process holds the memfd, and the next mapping sees every
//! store the dead process executed.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;

use crate::PersistError;

/// A shared, read-write mapping of a whole memfd.
#[derive(Debug)]
pub struct SharedMemory {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
}

impl SharedMemory {
    /// Creates a memfd named `name` (visible in /proc/<pid>/fd), not yet
    /// sized or mapped: hand it to [`SharedMemory::map`].
    pub fn create_fd(name: &CStr) -> Result<OwnedFd, PersistError> {
        // SAFETY: memfd_create(2) with a NUL-terminated name; the result is
        // checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(PersistError::Create(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Maps `fd`, growing the file to `len` bytes first if it is smaller
    /// (new bytes read as zero).
    pub fn map(fd: OwnedFd, len: usize) -> Result<Self, PersistError> {
        // SAFETY: fstat(2) into a zeroed local struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above; `st` is valid for writes.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
            return Err(PersistError::Map(io::Error::last_os_error()));
        }
        if (st.st_size as u64) < len as u64 {
            // SAFETY: ftruncate(2) on our own descriptor.
            if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } < 0 {
                return Err(PersistError::Map(io::Error::last_os_error()));
            }
        }
        if len == 0 {
            return Err(PersistError::Map(io::Error::new(
                io::ErrorKind::InvalidInput,
                "empty state region",
            )));
        }
        // SAFETY: a new shared mapping of `len` bytes of a file that is at
        // least that long; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(PersistError::Map(io::Error::last_os_error()));
        }
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| PersistError::Map(io::Error::other("mmap returned null")))?;
        Ok(SharedMemory { fd, ptr, len })
    }

    /// Maps the first `len` bytes of `fd` for reading only: a process that
    /// looks at what another one stores, and cannot change it. Fails if the
    /// file is shorter than `len` (it is never grown).
    pub fn map_read_only(fd: OwnedFd, len: usize) -> Result<Self, PersistError> {
        if len == 0 || Self::file_len(&fd)? < len as u64 {
            return Err(PersistError::Map(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the file is shorter than the {len} bytes to map"),
            )));
        }
        // SAFETY: a new read-only shared mapping of `len` bytes of a file
        // that is at least that long; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(PersistError::Map(io::Error::last_os_error()));
        }
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| PersistError::Map(io::Error::other("mmap returned null")))?;
        Ok(SharedMemory { fd, ptr, len })
    }

    /// Size of the file now, in bytes.
    pub fn file_len(fd: &OwnedFd) -> Result<u64, PersistError> {
        // SAFETY: fstat(2) into a zeroed local struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
            return Err(PersistError::Map(io::Error::last_os_error()));
        }
        Ok(st.st_size as u64)
    }

    /// The memfd.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Start of the mapping (not writable if mapped with
    /// [`SharedMemory::map_read_only`]).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: an empty mapping is refused by [`SharedMemory::map`].
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Gives the pages of `[offset, offset + len)` back to the kernel; they
    /// read as zero afterwards. Used for buffers that drained.
    pub fn discard(&self, offset: usize, len: usize) {
        let page = page_size();
        let start = offset.next_multiple_of(page);
        let end = (offset + len) / page * page;
        if end <= start || end > self.len {
            return;
        }
        // SAFETY: the range lies inside our mapping and is page aligned;
        // MADV_REMOVE only frees pages (they read back as zero).
        unsafe {
            libc::madvise(
                self.ptr.as_ptr().add(start).cast(),
                end - start,
                libc::MADV_REMOVE,
            );
        }
    }
}

/// The page size.
pub fn page_size() -> usize {
    // SAFETY: sysconf(3) has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `map`; nothing
        // borrowed from it outlives `self`.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}
