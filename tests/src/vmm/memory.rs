//! Guest RAM: one memfd, mapped shared here with vm-memory and handed to
//! the backend with SET_MEM_TABLE, like QEMU's
//! `memory-backend-memfd,share=on`.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::Ordering;

use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// The guest's memory: a single region at `base` of `size` bytes.
pub struct GuestRam {
    mem: GuestMemoryMmap,
    file: File,
    base: u64,
    size: u64,
    host: u64,
}

fn mem_err(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(format!("guest memory: {e}"))
}

impl GuestRam {
    /// Creates `size` bytes of guest memory at guest physical address
    /// `base`, backed by a memfd.
    pub fn new(base: u64, size: u64) -> io::Result<GuestRam> {
        if size == 0 || size % 4096 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("guest memory size {size} is not a positive multiple of 4096"),
            ));
        }
        let name = CString::new("vsockd-vmm-ram").expect("no NUL in name");
        // SAFETY: memfd_create with a valid C string; the result is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd was just created and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size)?;
        let region =
            MmapRegion::<()>::from_file(FileOffset::new(file.try_clone()?, 0), size as usize)
                .map_err(mem_err)?;
        let host = region.as_ptr() as u64;
        let region = GuestRegionMmap::new(region, GuestAddress(base))
            .ok_or_else(|| mem_err("region overflows the address space"))?;
        let mem = GuestMemoryMmap::from_regions(vec![region]).map_err(mem_err)?;
        Ok(GuestRam {
            mem,
            file,
            base,
            size,
            host,
        })
    }

    /// First guest physical address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// One past the last guest physical address.
    pub fn end(&self) -> u64 {
        self.base + self.size
    }

    /// The VMM's virtual address of a guest physical address (what
    /// SET_VRING_ADDR carries).
    pub fn host_addr(&self, gpa: u64) -> u64 {
        debug_assert!(gpa >= self.base && gpa <= self.end());
        self.host + (gpa - self.base)
    }

    /// The SET_MEM_TABLE entry for this memory.
    pub fn region_info(&self) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: self.base,
            memory_size: self.size,
            userspace_addr: self.host,
            mmap_offset: 0,
            mmap_handle: self.file.as_raw_fd(),
        }
    }

    /// The vm-memory view of the memory.
    pub fn mem(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Copies `buf` to guest memory at `gpa`. The driver only writes to
    /// addresses it laid out itself, so a failure is a bug here.
    pub fn write(&self, gpa: u64, buf: &[u8]) {
        self.mem
            .write_slice(buf, GuestAddress(gpa))
            .unwrap_or_else(|e| panic!("guest write of {} bytes at {gpa:#x}: {e}", buf.len()));
    }

    /// Copies guest memory at `gpa` into `buf`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) {
        self.mem
            .read_slice(buf, GuestAddress(gpa))
            .unwrap_or_else(|e| panic!("guest read of {} bytes at {gpa:#x}: {e}", buf.len()));
    }

    /// Fills `len` bytes at `gpa` with zeroes.
    pub fn zero(&self, gpa: u64, len: u64) {
        let z = [0u8; 4096];
        let mut off = 0;
        while off < len {
            let n = (len - off).min(z.len() as u64) as usize;
            self.write(gpa + off, &z[..n]);
            off += n as u64;
        }
    }

    pub fn load_u16(&self, gpa: u64, order: Ordering) -> u16 {
        let v: u16 = self
            .mem
            .load(GuestAddress(gpa), order)
            .unwrap_or_else(|e| panic!("guest load at {gpa:#x}: {e}"));
        u16::from_le(v)
    }

    pub fn store_u16(&self, gpa: u64, v: u16, order: Ordering) {
        self.mem
            .store(v.to_le(), GuestAddress(gpa), order)
            .unwrap_or_else(|e| panic!("guest store at {gpa:#x}: {e}"))
    }

    pub fn read_u16(&self, gpa: u64) -> u16 {
        let mut b = [0u8; 2];
        self.read(gpa, &mut b);
        u16::from_le_bytes(b)
    }

    pub fn read_u32(&self, gpa: u64) -> u32 {
        let mut b = [0u8; 4];
        self.read(gpa, &mut b);
        u32::from_le_bytes(b)
    }
}

/// Hands out aligned, non-overlapping pieces of guest memory.
pub struct Bump {
    next: u64,
    end: u64,
}

impl Bump {
    pub fn new(ram: &GuestRam) -> Bump {
        Bump {
            next: ram.base(),
            end: ram.end(),
        }
    }

    /// `len` bytes aligned to `align` (a power of two).
    pub fn take(&mut self, len: u64, align: u64, what: &str) -> io::Result<u64> {
        let start = (self.next + align - 1) & !(align - 1);
        match start.checked_add(len) {
            Some(end) if end <= self.end => {
                self.next = end;
                Ok(start)
            }
            _ => Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!(
                    "guest memory too small: {len} more bytes needed for {what} ({} left)",
                    self.end.saturating_sub(start)
                ),
            )),
        }
    }
}
