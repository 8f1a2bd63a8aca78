//! Guest memory: anonymous mappings laid out around the MMIO gap, each
//! starting on a 2 MiB boundary of the host's address space.
//!
//! Why the alignment: KVM maps guest memory into the nested page tables
//! (EPT/NPT) with 2 MiB entries only where the guest-physical and host-virtual
//! addresses agree modulo 2 MiB and the host backs the range with a
//! transparent huge page. A plain `mmap` lands on any 4 KiB boundary, and then
//! every 2 MiB guest page straddles two host huge pages: KVM falls back to
//! 4 KiB entries and the guest takes one nested page fault per 4 KiB it first
//! touches (about 20,000 more during a 1 GiB boot, measured in the test
//! host; see the boot benchmark). Every RAM range starts on a 2 MiB-aligned
//! guest address ([`layout::ram_ranges`]), so aligning the host side is enough.

use std::io;
use std::ptr;

use std::num::NonZeroUsize;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::GuestAddress;

use crate::layout;

/// Guest memory. Each region carries a bitmap of the 4 KiB pages written
/// through vm-memory, i.e. by the VMM's own threads (virtio devices, the
/// boot loader); KVM's dirty log covers what the guest writes. Together
/// they are what [`super::dirty`] reports.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;

/// The page size of the dirty bitmaps.
pub const PAGE_SIZE: usize = 4096;

/// The host's transparent huge page size on x86_64.
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

/// Protection and flags of every guest RAM mapping.
const PROT: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;
const FLAGS: libc::c_int = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;

/// Errors while creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap of the guest RAM failed.
    #[error("cannot allocate {0} MiB of guest memory")]
    Allocate(u64, #[source] io::Error),
    /// vm-memory refused the mapping or the layout.
    #[error("cannot describe {0} MiB of guest memory")]
    Describe(u64, #[source] vm_memory::mmap::FromRangesError),
}

/// Maps `size` bytes of anonymous memory starting on a [`HUGE_PAGE_SIZE`]
/// boundary: maps `size` plus one huge page, then unmaps the slack before
/// and after the aligned start.
///
/// The mapping is never unmapped: vm-memory does not own a mapping it did
/// not make, and guest memory lives as long as the process (one VM per
/// process).
fn map_aligned(size: usize) -> io::Result<*mut u8> {
    let total = size
        .checked_add(HUGE_PAGE_SIZE)
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a new anonymous mapping at an address the kernel picks; no
    // existing memory is affected.
    let base = unsafe { libc::mmap(ptr::null_mut(), total, PROT, FLAGS, -1, 0) };
    if base == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let base = base as usize;
    let start = base.next_multiple_of(HUGE_PAGE_SIZE);
    let head = start - base;
    let tail = total - head - size;
    // SAFETY: both ranges lie inside the mapping just made and outside
    // [start, start + size), which is what we keep; nothing refers to them.
    unsafe {
        if head > 0 && libc::munmap(base as *mut libc::c_void, head) != 0 {
            return Err(io::Error::last_os_error());
        }
        if tail > 0 && libc::munmap((start + size) as *mut libc::c_void, tail) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(start as *mut u8)
}

/// Allocates `mem_size` bytes of guest RAM as laid out by
/// [`layout::ram_ranges`], each range's host mapping 2 MiB-aligned.
pub fn create_guest_memory(mem_size: u64) -> Result<GuestMemoryMmap, MemoryError> {
    let mib = mem_size >> 20;
    let mut regions = Vec::new();
    for (start, size) in layout::ram_ranges(mem_size) {
        let size = usize::try_from(size).map_err(|_| MemoryError::Allocate(mib, io::ErrorKind::InvalidInput.into()))?;
        let addr = map_aligned(size).map_err(|e| MemoryError::Allocate(mib, e))?;
        // SAFETY: `addr` and `size` are exactly the mapping map_aligned just
        // made, which stays mapped for the life of the process.
        let mapping = unsafe {
            MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::new(size, NonZeroUsize::MIN.saturating_add(PAGE_SIZE - 1)))
                .with_mmap_prot(PROT).with_mmap_flags(FLAGS).with_raw_mmap_pointer(addr)
        }
        .build()
            .map_err(|e| MemoryError::Describe(mib, e.into()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or(MemoryError::Describe(mib, vm_memory::mmap::FromRangesError::InvalidGuestRegion))?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| MemoryError::Describe(mib, e.into()))
}

#[cfg(test)]
mod tests {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

    use super::*;

    #[test]
    fn memory_has_the_requested_size() {
        let mem = create_guest_memory(64 << 20).expect("memory");
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.last_addr(), GuestAddress((64 << 20) - 1));
    }

    #[test]
    fn host_mappings_agree_with_guest_addresses_modulo_2_mib() {
        // Above the MMIO gap too: two ranges, each must be aligned.
        let mem = create_guest_memory(layout::MMIO_GAP_START + (4 << 20)).expect("memory");
        assert_eq!(mem.num_regions(), 2);
        for region in mem.iter() {
            let host = region.get_host_address(vm_memory::MemoryRegionAddress(0)).expect("host address") as usize;
            assert_eq!(host % HUGE_PAGE_SIZE, 0, "region at {:#x}", region.start_addr().0);
            assert_eq!(region.start_addr().0 as usize % HUGE_PAGE_SIZE, 0);
        }
    }

    #[test]
    fn guest_memory_is_writable_end_to_end() {
        use vm_memory::Bytes;
        let mem = create_guest_memory(8 << 20).expect("memory");
        mem.write_obj(0xa5u8, GuestAddress(0)).expect("first byte");
        mem.write_obj(0x5au8, GuestAddress((8 << 20) - 1)).expect("last byte");
        assert_eq!(mem.read_obj::<u8>(GuestAddress((8 << 20) - 1)).expect("read"), 0x5a);
    }
}
