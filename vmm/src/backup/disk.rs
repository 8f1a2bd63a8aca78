//! Disks in backups: what is copied out in the pause, the disk checkpoint
//! written from it, and the image rebuilt from a chain at restore.
//!
//! A disk checkpoint is an ordinary checkpoint file (`docs/checkpoint-
//! format.md`) with one region, guest address 0 and the disk's size, cut
//! into [`DISK_BLOCK_SIZE`] blocks: the same layers, checksums and chains
//! as memory.
//!
//! In the pause, the blocks a backup needs are copied into a sparse
//! staging file beside the checkpoint (`copy_file_range`, so the kernel
//! copies within its page cache, or shares extents where the file system
//! can): every written block for a full backup, only the changed ones for
//! an incremental one. The guest then writes its disk freely; the forked
//! writer turns the staging file into the checkpoint and removes it.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::checkpoint::{self, BlockHint, BlockKind, MemorySource, Reader, Region, SourceError, WriteStats, WriterOptions};
use crate::devices::virtio::block::changed::{self, DISK_BLOCK_SIZE};
use crate::devices::virtio::block::image::copy_sparse;

/// Which blocks of a disk a backup stores.
#[derive(Debug, Clone)]
pub(crate) enum DiskBlocks {
    /// Every block (a full backup).
    All,
    /// The blocks set in this bitmap ([`changed::ChangedBlocks::take`]);
    /// the rest are in the previous backup.
    Changed(Vec<u64>),
    /// The blocks whose CRC-32C differs from these, one per block (the
    /// retired record of the previous backup); the rest are in it.
    Compare(Vec<u32>),
}

/// One disk's part of a backup, from the pause to its checkpoint.
#[derive(Debug)]
pub(crate) struct DiskJob {
    /// The staging copy, removed once the checkpoint is written.
    pub(crate) staging: PathBuf,
    /// The disk checkpoint.
    pub(crate) out: PathBuf,
    /// The disk's size in bytes.
    pub(crate) size: u64,
    pub(crate) blocks: DiskBlocks,
    /// The previous backup's disk checkpoint, for an incremental one.
    pub(crate) parent_index_crc: Option<u32>,
}

/// Copies what `blocks` needs of `disk` into a new staging file; returns
/// the data bytes copied. Runs in the pause.
pub(crate) fn stage(disk: &File, size: u64, blocks: &DiskBlocks, staging: &Path) -> std::io::Result<u64> {
    match blocks {
        DiskBlocks::All | DiskBlocks::Compare(_) => Ok(copy_sparse(disk, staging)?.bytes_copied),
        DiskBlocks::Changed(bits) => {
            let out = OpenOptions::new().write(true).create_new(true).open(staging)?;
            out.set_len(size)?;
            let mut copied = 0;
            let total = size.div_ceil(DISK_BLOCK_SIZE);
            let mut block = 0;
            while block < total {
                if !changed::is_set(bits, block) {
                    block += 1;
                    continue;
                }
                // A run of changed blocks in one call.
                let first = block;
                while block < total && changed::is_set(bits, block) {
                    block += 1;
                }
                let start = first * DISK_BLOCK_SIZE;
                let end = (block * DISK_BLOCK_SIZE).min(size);
                copy_range(disk, &out, start, end - start)?;
                copied += end - start;
            }
            out.sync_data()?;
            Ok(copied)
        }
    }
}

/// Copies `len` bytes at `offset` from `src` to the same offset of `dst`.
fn copy_range(src: &File, dst: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let mut done = 0u64;
    while done < len {
        let mut from = (offset + done) as libc::loff_t;
        let mut to = from;
        // SAFETY: both descriptors are open; the offsets are valid pointers
        // to locals the call updates.
        let n = unsafe {
            libc::copy_file_range(src.as_raw_fd(), &mut from, dst.as_raw_fd(), &mut to, (len - done) as usize, 0)
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::EXDEV | libc::ENOSYS | libc::EOPNOTSUPP | libc::EINVAL)) {
                return copy_by_reading(src, dst, offset + done, len - done);
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the disk ended early"));
        }
        done += n as u64;
    }
    Ok(())
}

fn copy_by_reading(src: &File, dst: &File, offset: u64, len: u64) -> std::io::Result<()> {
    let mut buf = vec![0u8; (1 << 20).min(len as usize)];
    let mut done = 0;
    while done < len {
        let n = buf.len().min((len - done) as usize);
        src.read_exact_at(&mut buf[..n], offset + done)?;
        dst.write_all_at(&buf[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// A staging file as a checkpoint source: one region at address 0.
struct StagedDisk<'a> {
    file: File,
    size: u64,
    /// Blocks to store; `None`: every block.
    store: Option<&'a [u64]>,
    /// Blocks holding data (not holes) in the staging file.
    data: Vec<u64>,
}

impl MemorySource for StagedDisk<'_> {
    fn regions(&self) -> Vec<Region> {
        vec![Region { guest_addr: 0, size: self.size }]
    }

    fn hint(&self, _region: usize, offset: u64, _len: usize) -> BlockHint {
        let block = offset / DISK_BLOCK_SIZE;
        if let Some(store) = self.store {
            if !changed::is_set(store, block) {
                return BlockHint::Parent;
            }
        }
        if changed::is_set(&self.data, block) {
            BlockHint::Read
        } else {
            BlockHint::Zero
        }
    }

    fn block<'a>(&'a self, region: usize, offset: u64, len: usize, scratch: &'a mut Vec<u8>) -> Result<&'a [u8], SourceError> {
        if offset.saturating_add(len as u64) > self.size {
            return Err(SourceError::CheckRange { region, offset, end: offset + len as u64 });
        }
        scratch.resize(len, 0);
        self.file.read_exact_at(&mut scratch[..len], offset).map_err(|source| SourceError::ReadImage { offset, source })?;
        Ok(&scratch[..len])
    }
}

/// Which blocks of `file` hold data, by `SEEK_DATA`/`SEEK_HOLE`; every
/// block where the file system cannot tell.
fn data_blocks(file: &File, size: u64) -> Vec<u64> {
    let blocks = size.div_ceil(DISK_BLOCK_SIZE);
    let mut bits = vec![0u64; blocks.div_ceil(64) as usize];
    let mut set = |from: u64, to: u64| {
        for block in from / DISK_BLOCK_SIZE..to.div_ceil(DISK_BLOCK_SIZE).min(blocks) {
            bits[(block / 64) as usize] |= 1 << (block % 64);
        }
    };
    let fd = file.as_raw_fd();
    let mut pos = 0u64;
    while pos < size {
        // SAFETY: lseek on an open descriptor.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO) {
                set(pos, size);
            }
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { size } else { (hole as u64).min(size) };
        set(data as u64, end);
        pos = end.max(data as u64 + 1);
    }
    bits
}

/// CRC-32C of an all-zero block of `len` bytes.
pub(crate) fn zero_crc(len: usize) -> u32 {
    crc32c::crc32c(&vec![0u8; len])
}

/// Writes the disk checkpoint of `job` from its staging file, then removes
/// the staging file. Runs in the forked writer.
pub(crate) fn write_job(job: &DiskJob) -> Result<WriteStats, String> {
    let file = File::open(&job.staging).map_err(|e| format!("cannot open {}: {e}", job.staging.display()))?;
    let data = data_blocks(&file, job.size);
    let compared;
    let store = match &job.blocks {
        DiskBlocks::All => None,
        DiskBlocks::Changed(bits) => Some(bits.as_slice()),
        DiskBlocks::Compare(crcs) => {
            compared = differing_blocks(&file, job.size, &data, crcs)
                .map_err(|e| format!("cannot read {}: {e}", job.staging.display()))?;
            Some(compared.as_slice())
        }
    };
    let source = StagedDisk { file, size: job.size, store, data };
    let options = WriterOptions {
        memory_block_size: DISK_BLOCK_SIZE as u32,
        parent_index_crc: job.parent_index_crc,
        ..WriterOptions::default()
    };
    let stats = checkpoint::write_checkpoint(&job.out, &source, &options, &mut |_, _| {}).map_err(|e| crate::error_chain(&e))?;
    std::fs::remove_file(&job.staging).map_err(|e| format!("cannot remove {}: {e}", job.staging.display()))?;
    Ok(stats)
}

/// The blocks of the staged disk whose CRC differs from `crcs`.
fn differing_blocks(file: &File, size: u64, data: &[u64], crcs: &[u32]) -> std::io::Result<Vec<u64>> {
    let blocks = size.div_ceil(DISK_BLOCK_SIZE);
    let mut bits = vec![0u64; blocks.div_ceil(64) as usize];
    let mut buf = vec![0u8; DISK_BLOCK_SIZE as usize];
    let full_zero = zero_crc(DISK_BLOCK_SIZE as usize);
    for block in 0..blocks {
        let offset = block * DISK_BLOCK_SIZE;
        let len = DISK_BLOCK_SIZE.min(size - offset) as usize;
        let crc = if changed::is_set(data, block) {
            file.read_exact_at(&mut buf[..len], offset)?;
            crc32c::crc32c(&buf[..len])
        } else if len == DISK_BLOCK_SIZE as usize {
            full_zero
        } else {
            zero_crc(len)
        };
        if crcs.get(block as usize) != Some(&crc) {
            bits[(block / 64) as usize] |= 1 << (block % 64);
        }
    }
    Ok(bits)
}

/// CRC-32C of every block's content a checkpoint (or chain) resolves to,
/// in block order, without reading any data: what a retired record keeps.
pub(crate) fn block_crcs(reader: &Reader) -> Vec<u32> {
    let full = reader.header().memory_block_size as usize;
    let full_zero = zero_crc(full);
    (0..reader.block_count())
        .map(|i| match reader.block_info(i) {
            Some(info) if info.kind == BlockKind::Zero => {
                if info.len == full {
                    full_zero
                } else {
                    zero_crc(info.len)
                }
            }
            Some(info) => info.crc,
            None => 0,
        })
        .collect()
}

/// Writes the disk a chain of disk checkpoints holds into a new sparse
/// image at `target`; returns the data bytes written.
pub(crate) fn rebuild(reader: &Reader, target: &Path) -> Result<u64, String> {
    let size: u64 = reader.header().regions.iter().map(|r| r.guest_addr + r.size).max().unwrap_or(0);
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(target)
        .map_err(|e| format!("cannot create {}: {e}", target.display()))?;
    out.set_len(size).map_err(|e| format!("cannot size {}: {e}", target.display()))?;
    let mut written = 0;
    let mut blocks = reader.sequential();
    while let Some(next) = blocks.next_block() {
        let (info, bytes) = next.map_err(|e| crate::error_chain(&e))?;
        if info.kind == BlockKind::Zero {
            continue;
        }
        out.write_all_at(bytes, info.guest_addr).map_err(|e| format!("cannot write {}: {e}", target.display()))?;
        written += bytes.len() as u64;
    }
    out.sync_all().map_err(|e| format!("cannot sync {}: {e}", target.display()))?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use crate::checkpoint::ReaderOptions;

    use super::*;

    fn disk(dir: &Path, size: u64) -> File {
        let f = OpenOptions::new().read(true).write(true).create_new(true).open(dir.join("disk.img")).expect("disk");
        f.set_len(size).expect("size");
        f
    }

    #[test]
    fn full_then_changed_then_compared_layers_rebuild_each_point_exactly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let size = 40 * DISK_BLOCK_SIZE + 4096;
        let f = disk(dir.path(), size);
        f.write_all_at(&[1u8; 5000], 3 * DISK_BLOCK_SIZE - 100).expect("write");
        f.write_all_at(b"tail", size - 4).expect("write");
        let job = |name: &str, blocks: DiskBlocks, parent: Option<u32>| DiskJob {
            staging: dir.path().join(format!("{name}.raw")),
            out: dir.path().join(format!("{name}.ckpt")),
            size,
            blocks,
            parent_index_crc: parent,
        };
        let image = |f: &File| {
            let mut v = vec![0u8; size as usize];
            f.read_exact_at(&mut v, 0).expect("read");
            v
        };

        let a = job("a", DiskBlocks::All, None);
        stage(&f, size, &a.blocks, &a.staging).expect("stage");
        let sa = write_job(&a).expect("write a");
        assert!(!a.staging.exists(), "the staging file is removed");
        assert_eq!(sa.zstd_blocks + sa.raw_blocks, 3, "blocks 2, 3 and the tail");
        let point_a = image(&f);

        let ra = Reader::open(&a.out).expect("open a");
        let tracker = changed::ChangedBlocks::new(size);
        f.write_all_at(&[7u8; 10], 20 * DISK_BLOCK_SIZE).expect("write");
        tracker.mark(20 * DISK_BLOCK_SIZE, 10);
        let b = job("b", DiskBlocks::Changed(tracker.take()), Some(ra.index_crc()));
        assert_eq!(stage(&f, size, &b.blocks, &b.staging).expect("stage"), DISK_BLOCK_SIZE);
        let sb = write_job(&b).expect("write b");
        assert_eq!(sb.parent_blocks, 40, "one block stored, the rest in the parent");
        let point_b = image(&f);

        // Tracking lost: the next layer compares against b's CRCs.
        let chain_b = Reader::open_chain(&[b.out.clone(), a.out.clone()], ReaderOptions::default()).expect("chain b");
        let crcs = block_crcs(&chain_b);
        f.write_all_at(&[0u8; 4096], 3 * DISK_BLOCK_SIZE).expect("write");
        f.write_all_at(&[9u8; 1], 39 * DISK_BLOCK_SIZE).expect("write");
        let c = job("c", DiskBlocks::Compare(crcs), Some(chain_b.index_crc()));
        stage(&f, size, &c.blocks, &c.staging).expect("stage");
        let sc = write_job(&c).expect("write c");
        assert_eq!(sc.parent_blocks, 39, "only the two blocks that differ are stored");
        let point_c = image(&f);

        for (chain, want, name) in [
            (vec![a.out.clone()], &point_a, "a"),
            (vec![b.out.clone(), a.out.clone()], &point_b, "b"),
            (vec![c.out.clone(), b.out.clone(), a.out.clone()], &point_c, "c"),
        ] {
            let reader = Reader::open_chain(&chain, ReaderOptions::default()).expect("chain");
            let target = dir.path().join(format!("{name}.img"));
            rebuild(&reader, &target).expect("rebuild");
            let got = std::fs::read(&target).expect("read back");
            assert!(got == *want, "point {name} rebuilds exactly");
        }
    }
}
