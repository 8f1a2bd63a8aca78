//! Which guest pages changed since the VM's latest snapshot: what an
//! incremental snapshot writes (and what incremental backups will copy).
//!
//! Guest memory is written by two kinds of writers, and each has its own
//! record:
//!
//! - the guest's vCPUs, through KVM's dirty page log
//!   (`KVM_MEM_LOG_DIRTY_PAGES` on every memory slot, read and cleared with
//!   `KVM_GET_DIRTY_LOG`);
//! - the VMM's own threads (virtio devices filling buffers and used rings,
//!   the boot loader), through the page bitmap vm-memory keeps per region
//!   (see [`super::memory::GuestMemoryMmap`]).
//!
//! What does *not* count as a change: pages the lazy loader copies in from
//! the snapshot being restored (`UFFDIO_COPY` writes neither record), and an
//! eager restore's load (its marks are cleared when the restore finishes),
//! because those pages equal the snapshot they came from.
//!
//! KVM's log is switched on when the VM gets its first snapshot to be
//! relative to: at a restore (before any vCPU runs), or just before the
//! pause of the first snapshot of a booted VM (writes in between are logged
//! and taken in the pause). Until then there is nothing an
//! incremental snapshot could build on, and a booting guest keeps KVM's
//! 2 MiB mappings (logging makes KVM map memory in 4 KiB pages so it can
//! see each first write).
//!
//! [`DirtyLog::take`] hands out the pages changed since the previous take
//! and starts a new interval; a snapshot that then fails gives them back
//! with [`DirtyLog::give_back`], so the next one still writes them.
//!
//! Backups (`crate::backup`) keep their own interval on the same record:
//! once a VM has a backup, every take also adds the pages it read to the
//! set changed since that backup. [`DirtyLog::take_for_backup`] hands that
//! set out and starts a new one, leaving the snapshot interval as it was,
//! so snapshots and backups may interleave in any order.

use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::MmapRegion;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::memory::{GuestMemoryMmap, GuestRegionMmap, PAGE_SIZE};
use super::vm::{self, VmError};

/// Errors of dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// Switching KVM's dirty log on failed.
    #[error("cannot switch on dirty page logging")]
    Enable(#[source] VmError),
    /// KVM_GET_DIRTY_LOG failed.
    #[error("cannot read KVM's dirty page log of memory slot {0}")]
    GetLog(u32, #[source] kvm_ioctls::Error),
}

/// A set of guest pages, one bit per 4 KiB page of each memory region.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DirtyPages {
    /// Per region: bit `p % 64` of word `p / 64` is page `p`.
    regions: Vec<Vec<u64>>,
}

impl DirtyPages {
    /// No page of `mem`.
    pub fn none(mem: &GuestMemoryMmap) -> Self {
        let regions = mem.iter().map(|r| vec![0u64; pages_of(r.len()).div_ceil(64)]).collect();
        DirtyPages { regions }
    }

    /// The pages whose bits are set in `regions` (one bitmap per region,
    /// in the layout above).
    pub fn from_bitmaps(regions: Vec<Vec<u64>>) -> Self {
        DirtyPages { regions }
    }

    /// Adds every page of `other`.
    pub fn merge(&mut self, other: &DirtyPages) {
        for (mine, theirs) in self.regions.iter_mut().zip(&other.regions) {
            for (a, b) in mine.iter_mut().zip(theirs) {
                *a |= b;
            }
        }
    }

    /// Adds page `page` (counted from the region's start) of region
    /// `region`.
    pub fn insert(&mut self, region: usize, page: u64) {
        let page = page as usize;
        if let Some(word) = self.regions.get_mut(region).and_then(|r| r.get_mut(page / 64)) {
            *word |= 1 << (page % 64);
        }
    }

    /// ORs a bitmap in the same layout into region `region`.
    fn merge_region(&mut self, region: usize, bits: &[u64]) {
        if let Some(mine) = self.regions.get_mut(region) {
            for (a, b) in mine.iter_mut().zip(bits) {
                *a |= b;
            }
        }
    }

    /// Whether any page overlapping bytes `offset .. offset + len` of region
    /// `region` is in the set. Out of range counts as changed, so a caller
    /// never drops data on a mistake.
    pub fn any(&self, region: usize, offset: u64, len: usize) -> bool {
        let Some(bits) = self.regions.get(region) else { return true };
        if len == 0 {
            return false;
        }
        let first = (offset / PAGE_SIZE as u64) as usize;
        let last = ((offset + len as u64 - 1) / PAGE_SIZE as u64) as usize;
        (first..=last).any(|p| bits.get(p / 64).is_none_or(|w| w & (1 << (p % 64)) != 0))
    }

    /// Number of pages in the set.
    pub fn count(&self) -> u64 {
        self.regions.iter().flatten().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// The whole-region bitmap of the VMM's own writes (the region's
/// `GuestMemoryRegion::bitmap` is a slice view without reset).
fn vmm_bitmap(region: &GuestRegionMmap) -> &AtomicBitmap {
    let mapping: &MmapRegion<AtomicBitmap> = region;
    mapping.bitmap()
}

fn pages_of(bytes: u64) -> usize {
    (bytes as usize).div_ceil(PAGE_SIZE)
}

/// The VM's dirty tracking.
#[derive(Debug, Default)]
pub struct DirtyLog {
    /// Whether KVM logs the guest's writes.
    on: bool,
    /// Pages of a snapshot that failed, waiting for the next one.
    carried: Option<DirtyPages>,
    /// Pages changed since the VM's latest backup, once it has one.
    since_backup: Option<DirtyPages>,
}

impl DirtyLog {
    /// Whether tracking runs, i.e. pages changed since the latest snapshot
    /// are known.
    pub fn is_on(&self) -> bool {
        self.on
    }

    /// Starts tracking from now: switches KVM's log on for every slot and
    /// forgets what the VMM's threads wrote so far.
    pub fn start(&mut self, vm: &VmFd, mem: &GuestMemoryMmap) -> Result<(), DirtyError> {
        vm::register_memory(vm, mem, true).map_err(DirtyError::Enable)?;
        for region in mem.iter() {
            vmm_bitmap(region).reset();
        }
        self.on = true;
        self.carried = None;
        self.since_backup = None;
        Ok(())
    }

    /// The pages written since the previous take (or [`Self::start`]), and
    /// a new interval from now. Call it with the vCPUs paused and the
    /// device threads held, so that no write falls between the two
    /// records.
    pub fn take(&mut self, vm: &VmFd, mem: &GuestMemoryMmap) -> Result<DirtyPages, DirtyError> {
        let mut pages = self.carried.take().unwrap_or_else(|| DirtyPages::none(mem));
        for (index, region) in mem.iter().enumerate() {
            let slot = index as u32;
            let kvm = vm.get_dirty_log(slot, region.len() as usize).map_err(|e| {
                // Nothing was lost yet: keep what was carried.
                DirtyError::GetLog(slot, e)
            });
            let kvm = match kvm {
                Ok(bits) => bits,
                Err(e) => {
                    self.carried = Some(pages);
                    return Err(e);
                }
            };
            let vmm = vmm_bitmap(region).get_and_reset();
            if let Some(since) = &mut self.since_backup {
                since.merge_region(index, &kvm);
                since.merge_region(index, &vmm);
            }
            pages.merge_region(index, &kvm);
            pages.merge_region(index, &vmm);
        }
        Ok(pages)
    }

    /// For a backup, with the vCPUs paused and the device threads held:
    /// the pages changed since the VM's latest backup (`None` when it has
    /// none, or tracking started after it), and a new backup interval from
    /// now. The snapshot interval is left as it was.
    pub fn take_for_backup(&mut self, vm: &VmFd, mem: &GuestMemoryMmap) -> Result<Option<DirtyPages>, DirtyError> {
        let pages = self.take(vm, mem)?;
        self.give_back(pages);
        let since = self.since_backup.replace(DirtyPages::none(mem));
        Ok(since)
    }

    /// Gives back what a failed backup took: `pages` from
    /// [`Self::take_for_backup`], merged into what changed since.
    pub fn give_back_backup(&mut self, pages: Option<DirtyPages>) {
        match (pages, &mut self.since_backup) {
            (Some(pages), Some(since)) => since.merge(&pages),
            // The failed backup was the first: there is still no backup to
            // count changes from.
            (None, since) => *since = None,
            (Some(pages), since @ None) => *since = Some(pages),
        }
    }

    /// Gives back pages a failed snapshot took, so the next snapshot
    /// writes them.
    pub fn give_back(&mut self, pages: DirtyPages) {
        match &mut self.carried {
            Some(carried) => carried.merge(&pages),
            None => self.carried = Some(pages),
        }
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    #[test]
    fn pages_answer_by_byte_range() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        let mut pages = DirtyPages::none(&mem);
        assert!(!pages.any(0, 0, 1 << 20));
        pages.merge_region(0, &[1 << 5]);
        assert_eq!(pages.count(), 1);
        assert!(pages.any(0, 5 * 4096, 1));
        assert!(pages.any(0, 4 * 4096 + 4095, 2), "a range that reaches into page 5");
        assert!(!pages.any(0, 6 * 4096, 64 << 10));
        assert!(!pages.any(0, 0, 5 * 4096));
        assert!(pages.any(7, 0, 1), "an unknown region counts as changed");
    }

    #[test]
    fn device_writes_are_recorded_by_the_memory_bitmap() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20), (GuestAddress(2 << 20), 1 << 20)])
            .expect("memory");
        mem.write_obj(7u64, GuestAddress((2 << 20) + 3 * 4096)).expect("write");
        let region = mem.iter().nth(1).expect("second region");
        let bits = vmm_bitmap(region).get_and_reset();
        let mut pages = DirtyPages::none(&mem);
        pages.merge_region(1, &bits);
        assert!(pages.any(1, 3 * 4096, 8));
        assert!(!pages.any(0, 0, 1 << 20));
        assert_eq!(pages.count(), 1);
    }

    #[test]
    fn the_backup_interval_collects_every_take_and_a_failed_backup_gives_its_pages_back() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        let mut log = DirtyLog { on: true, ..DirtyLog::default() };
        let mut a = DirtyPages::none(&mem);
        a.merge_region(0, &[0b1]);
        // No backup yet: nothing to count from.
        log.give_back_backup(None);
        assert!(log.since_backup.is_none());
        log.since_backup = Some(DirtyPages::none(&mem));
        log.since_backup.as_mut().expect("since").merge(&a);
        let mut b = DirtyPages::none(&mem);
        b.merge_region(0, &[0b10]);
        log.give_back_backup(Some(b));
        assert_eq!(log.since_backup.as_ref().map(DirtyPages::count), Some(2));
        log.give_back_backup(None);
        assert!(log.since_backup.is_none(), "a failed first backup leaves no interval");
    }

    #[test]
    fn given_back_pages_merge() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        let mut log = DirtyLog::default();
        let mut a = DirtyPages::none(&mem);
        a.merge_region(0, &[0b1]);
        let mut b = DirtyPages::none(&mem);
        b.merge_region(0, &[0b100]);
        log.give_back(a);
        log.give_back(b);
        assert_eq!(log.carried.as_ref().map(DirtyPages::count), Some(2));
    }
}
