//! Changed-block tracking for a disk: which [`DISK_BLOCK_SIZE`] blocks the
//! guest wrote (or discarded, or zeroed) since the tracker was last taken.
//!
//! The device marks a request's blocks before it changes the file, so a
//! take that runs with the device thread held (as backups do, in the
//! pause) never misses a write that already reached the file. Backups take
//! the set for the blocks to copy and give it back if they fail.
//!
//! While a backup copies the blocks it took, a [`BeforeWrite`] hook sees
//! every request's blocks before the request changes the file, so the
//! backup can copy a block out before the guest overwrites it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// Tracking granularity: 64 KiB, the checkpoint format's default memory
/// block size, so a disk block is one block of a disk checkpoint.
pub const DISK_BLOCK_SIZE: u64 = 64 << 10;

/// Called with the first and last block of every write, discard or
/// write-zeroes request before it changes the file.
pub trait BeforeWrite: Send + Sync {
    fn before_write(&self, first: u64, last: u64);
}

/// One bit per [`DISK_BLOCK_SIZE`] block of a disk.
pub struct ChangedBlocks {
    words: Vec<AtomicU64>,
    blocks: u64,
    /// Whether `hook` is set: the write path's only cost without one.
    hooked: AtomicBool,
    hook: Mutex<Option<Arc<dyn BeforeWrite>>>,
}

impl std::fmt::Debug for ChangedBlocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangedBlocks").field("blocks", &self.blocks).field("hooked", &self.hooked).finish()
    }
}

impl ChangedBlocks {
    /// No block changed, for a disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        let blocks = size.div_ceil(DISK_BLOCK_SIZE);
        ChangedBlocks {
            words: (0..blocks.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            blocks,
            hooked: AtomicBool::new(false),
            hook: Mutex::new(None),
        }
    }

    /// Sets (or with `None` removes) the hook every write calls first.
    pub fn set_before_write(&self, hook: Option<Arc<dyn BeforeWrite>>) {
        let mut slot = self.hook.lock().unwrap_or_else(PoisonError::into_inner);
        self.hooked.store(hook.is_some(), Ordering::Release);
        *slot = hook;
    }

    /// How many blocks the disk has.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Marks the blocks `offset .. offset + len` touches.
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || self.blocks == 0 {
            return;
        }
        let first = offset / DISK_BLOCK_SIZE;
        let last = (offset.saturating_add(len - 1) / DISK_BLOCK_SIZE).min(self.blocks - 1);
        for block in first..=last {
            self.words[(block / 64) as usize].fetch_or(1 << (block % 64), Ordering::AcqRel);
        }
        if self.hooked.load(Ordering::Acquire) {
            let hook = self.hook.lock().unwrap_or_else(PoisonError::into_inner).clone();
            if let Some(hook) = hook {
                hook.before_write(first, last);
            }
        }
    }

    /// The blocks changed since the previous take, and a new interval.
    pub fn take(&self) -> Vec<u64> {
        self.words.iter().map(|w| w.swap(0, Ordering::AcqRel)).collect()
    }

    /// Gives back blocks a failed backup took.
    pub fn give_back(&self, bits: &[u64]) {
        for (word, bits) in self.words.iter().zip(bits) {
            word.fetch_or(*bits, Ordering::AcqRel);
        }
    }
}

/// Whether `block` is set in a bitmap from [`ChangedBlocks::take`].
pub fn is_set(bits: &[u64], block: u64) -> bool {
    bits.get((block / 64) as usize).is_some_and(|w| w & (1 << (block % 64)) != 0)
}

/// How many blocks a bitmap holds.
pub fn count(bits: &[u64]) -> u64 {
    bits.iter().map(|w| u64::from(w.count_ones())).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_marks_every_block_it_touches_and_a_take_clears_them() {
        let changed = ChangedBlocks::new(1 << 20);
        assert_eq!(changed.blocks(), 16);
        changed.mark(DISK_BLOCK_SIZE - 512, 1024);
        changed.mark(15 * DISK_BLOCK_SIZE, DISK_BLOCK_SIZE);
        let bits = changed.take();
        assert_eq!(count(&bits), 3);
        assert!(is_set(&bits, 0) && is_set(&bits, 1) && is_set(&bits, 15));
        assert!(!is_set(&bits, 2));
        assert_eq!(count(&changed.take()), 0, "a take starts a new interval");
    }

    #[test]
    fn a_hook_sees_each_write_before_it_and_is_removed() {
        struct Seen(Mutex<Vec<(u64, u64)>>);
        impl BeforeWrite for Seen {
            fn before_write(&self, first: u64, last: u64) {
                self.0.lock().expect("lock").push((first, last));
            }
        }
        let changed = ChangedBlocks::new(1 << 20);
        let seen = Arc::new(Seen(Mutex::new(Vec::new())));
        changed.set_before_write(Some(seen.clone()));
        changed.mark(DISK_BLOCK_SIZE - 1, 2);
        changed.set_before_write(None);
        changed.mark(0, 1);
        assert_eq!(*seen.0.lock().expect("lock"), [(0, 1)]);
    }

    #[test]
    fn given_back_blocks_return_and_a_range_past_the_end_is_clamped() {
        let changed = ChangedBlocks::new(3 * DISK_BLOCK_SIZE + 512);
        assert_eq!(changed.blocks(), 4);
        changed.mark(3 * DISK_BLOCK_SIZE, u64::MAX);
        let bits = changed.take();
        assert_eq!(count(&bits), 1);
        changed.mark(0, 1);
        changed.give_back(&bits);
        let again = changed.take();
        assert!(is_set(&again, 0) && is_set(&again, 3));
        assert_eq!(count(&again), 2);
        changed.mark(0, 0);
        assert_eq!(count(&changed.take()), 0, "an empty range marks nothing");
    }
}
