//! Changed-block tracking for a disk: which [`DISK_BLOCK_SIZE`] blocks the
//! guest wrote (or discarded, or zeroed) since the tracker was last taken.
//!
//! The device marks a request's blocks before it changes the file, so a
//! take that runs with the device thread held (as backups do, in the
//! pause) never misses a write that already reached the file. Backups take
//! the set for the blocks to copy and give it back if they fail.

use std::sync::atomic::{AtomicU64, Ordering};

/// Tracking granularity: 64 KiB, the checkpoint format's default memory
/// block size, so a disk block is one block of a disk checkpoint.
pub const DISK_BLOCK_SIZE: u64 = 64 << 10;

/// One bit per [`DISK_BLOCK_SIZE`] block of a disk.
#[derive(Debug)]
pub struct ChangedBlocks {
    words: Vec<AtomicU64>,
    blocks: u64,
}

impl ChangedBlocks {
    /// No block changed, for a disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        let blocks = size.div_ceil(DISK_BLOCK_SIZE);
        ChangedBlocks { words: (0..blocks.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(), blocks }
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
