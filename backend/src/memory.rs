//! The guest memory table a frontend sends (SET_MEM_TABLE): the regions
//! mapped into this process, and the translation of frontend virtual
//! addresses (used by SET_VRING_ADDR) to guest-physical ones.

use std::fs::File;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// One region as the frontend described it.
#[derive(Debug, Clone, Copy)]
struct RegionInfo {
    guest_phys_addr: u64,
    size: u64,
    user_addr: u64,
}

/// Guest memory plus what is needed to translate frontend addresses.
pub struct MemoryTable {
    pub mem: GuestMemoryMmap<()>,
    regions: Vec<RegionInfo>,
}

/// A region of a memory table, as received.
pub struct RegionSpec {
    pub guest_phys_addr: u64,
    pub size: u64,
    pub user_addr: u64,
    pub mmap_offset: u64,
    pub file: File,
}

impl RegionSpec {
    /// A region as recorded, with its file.
    pub fn new(r: &vsockd_persist::session::MemRegionRecord, file: File) -> Self {
        RegionSpec {
            guest_phys_addr: r.guest_phys_addr,
            size: r.size,
            user_addr: r.user_addr,
            mmap_offset: r.mmap_offset,
            file,
        }
    }
}

impl MemoryTable {
    /// Maps every region shared and read-write.
    pub fn map(specs: Vec<RegionSpec>) -> Result<Self, String> {
        let mut regions = Vec::with_capacity(specs.len());
        let mut mapped = Vec::with_capacity(specs.len());
        for s in specs {
            let size =
                usize::try_from(s.size).map_err(|_| format!("region size {} too large", s.size))?;
            let mapping = MmapRegion::<()>::build(
                Some(FileOffset::new(s.file, s.mmap_offset)),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
            )
            .map_err(|e| {
                format!(
                    "cannot map guest region at {:#x} ({} bytes, offset {:#x}): {e}",
                    s.guest_phys_addr, s.size, s.mmap_offset
                )
            })?;
            let region = GuestRegionMmap::new(mapping, GuestAddress(s.guest_phys_addr))
                .ok_or_else(|| format!("guest region at {:#x} overflows", s.guest_phys_addr))?;
            mapped.push(region);
            regions.push(RegionInfo {
                guest_phys_addr: s.guest_phys_addr,
                size: s.size,
                user_addr: s.user_addr,
            });
        }
        mapped.sort_by_key(vm_memory::GuestMemoryRegion::start_addr);
        let mem =
            GuestMemoryMmap::from_regions(mapped).map_err(|e| format!("bad memory table: {e}"))?;
        Ok(MemoryTable { mem, regions })
    }

    /// Translates a frontend virtual address to a guest-physical one.
    pub fn va_to_gpa(&self, va: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| va >= r.user_addr && va - r.user_addr < r.size)
            .map(|r| va - r.user_addr + r.guest_phys_addr)
    }
}
