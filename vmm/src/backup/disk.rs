//! Disks in backups: what is copied out in the pause, the disk checkpoint
//! written from it, and the image rebuilt from a chain at restore.
//!
//! A disk checkpoint is an ordinary checkpoint file (`docs/checkpoint-
//! format.md`) with one region, guest address 0 and the disk's size, cut
//! into [`DISK_BLOCK_SIZE`] blocks: the same layers, checksums and chains
//! as memory.
//!
//! In the pause, a backup only marks the blocks it needs — every written
//! block for a full or checksum backup, the changed ones for a tracked one
//! — and creates a sparse staging file beside the checkpoint. The guest
//! runs on: the forked writer copies the marked blocks into the staging
//! file (`copy_file_range`, so the kernel copies within its page cache, or
//! shares extents where the file system can), and the block device copies
//! a marked block first when the guest is about to overwrite it
//! ([`CopyOut`]). The writer then turns the staging file into the
//! checkpoint and removes it.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};

use crate::checkpoint::{self, BlockChecksum, BlockHint, BlockKind, MemorySource, Reader, Region, SourceError, WriteStats, WriterOptions};
use crate::devices::virtio::block::changed::{self, BeforeWrite, DISK_BLOCK_SIZE};

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
    /// Brings the blocks into the staging file.
    pub(crate) copy: Arc<CopyOut>,
    /// The staging file is the result (a live snapshot's copy of the
    /// disk): no checkpoint is written and the file is kept.
    pub(crate) raw: bool,
}

// Block states, one byte per block in memory shared by the VMM and the
// forked writer.
// 0: not part of the backup.
/// Part of the backup and not copied yet.
const NEEDED: u8 = 1;
/// Being copied into the staging file (by the VMM or the writer).
const COPYING: u8 = 2;
/// In the staging file.
const COPIED: u8 = 3;
/// The copy failed: the backup fails.
const FAILED: u8 = 4;

/// One atomic byte per block in an anonymous `MAP_SHARED` mapping, which
/// `fork` shares instead of copying: the VMM and its forked writer see the
/// same states.
struct SharedStates {
    ptr: std::ptr::NonNull<AtomicU8>,
    len: usize,
}

// SAFETY: the mapping is only accessed through atomics.
unsafe impl Send for SharedStates {}
// SAFETY: as above.
unsafe impl Sync for SharedStates {}

impl SharedStates {
    fn new(len: usize) -> std::io::Result<Self> {
        let bytes = len.max(1);
        // SAFETY: a new anonymous mapping; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = std::ptr::NonNull::new(ptr.cast::<AtomicU8>()).ok_or_else(std::io::Error::last_os_error)?;
        Ok(SharedStates { ptr, len })
    }

    fn get(&self, block: u64) -> &AtomicU8 {
        assert!((block as usize) < self.len, "block {block} past the disk's {} blocks", self.len);
        // SAFETY: in bounds (checked), zero-initialised by mmap, which is
        // a valid AtomicU8; the mapping lives as long as `self`.
        unsafe { &*self.ptr.as_ptr().add(block as usize) }
    }
}

impl Drop for SharedStates {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping `new` made, which nothing borrows now.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len.max(1)) };
    }
}

/// Copy-before-write of one disk during a backup: the blocks the backup
/// needs, as they were in its pause, reach the staging file whoever gets
/// to them first — the forked writer copying them in order, or the VMM's
/// block device about to overwrite one (the [`BeforeWrite`] hook). Each
/// block is claimed by one compare-and-swap, so it is copied once and
/// never after the guest changed it.
pub(crate) struct CopyOut {
    states: SharedStates,
    blocks: u64,
    size: u64,
    image: File,
    staging: File,
    staging_path: PathBuf,
    /// The forked writer, as a pidfd: readable once it ended.
    writer: OnceLock<OwnedFd>,
    /// Blocks the VMM copied because the guest was about to write them.
    before_write: AtomicU64,
    /// The block data the backup needs (written blocks, not holes).
    needed_bytes: u64,
}

impl CopyOut {
    /// In the pause: marks the blocks `blocks` needs of `disk` and creates
    /// the (sparse) staging file. Nothing is copied yet.
    pub(crate) fn prepare(disk: &File, size: u64, blocks: &DiskBlocks, staging: &Path) -> std::io::Result<Arc<CopyOut>> {
        let count = size.div_ceil(DISK_BLOCK_SIZE);
        let needed = match blocks {
            DiskBlocks::Changed(bits) => bits.clone(),
            // Every block with data now; holes stay holes.
            DiskBlocks::All | DiskBlocks::Compare(_) => data_blocks(disk, size),
        };
        let states = SharedStates::new(count as usize)?;
        let mut needed_bytes = 0;
        for block in 0..count {
            if changed::is_set(&needed, block) {
                states.get(block).store(NEEDED, Ordering::Relaxed);
                needed_bytes += DISK_BLOCK_SIZE.min(size - block * DISK_BLOCK_SIZE);
            }
        }
        let out = OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(staging)?;
        out.set_len(size)?;
        Ok(Arc::new(CopyOut {
            states,
            blocks: count,
            size,
            image: disk.try_clone()?,
            staging: out,
            staging_path: staging.to_path_buf(),
            writer: OnceLock::new(),
            before_write: AtomicU64::new(0),
            needed_bytes,
        }))
    }

    /// Names the forked writer, so that the VMM stops waiting on a block
    /// it claimed if it dies.
    pub(crate) fn set_writer(&self, pid: libc::pid_t) {
        // SAFETY: pidfd_open takes a pid and flags and returns a new
        // descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd >= 0 {
            // SAFETY: a new descriptor this call owns.
            let _ = self.writer.set(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        }
    }

    /// Blocks the VMM copied ahead of the guest's writes.
    pub(crate) fn copied_before_write(&self) -> u64 {
        self.before_write.load(Ordering::Relaxed)
    }

    /// The bytes of block data the backup copies.
    pub(crate) fn needed_bytes(&self) -> u64 {
        self.needed_bytes
    }

    /// Copies `block` into the staging file if it is still needed and this
    /// caller wins it: `None` when someone else has (or had) it.
    fn claim(&self, block: u64) -> Option<std::io::Result<()>> {
        let state = self.states.get(block);
        state.compare_exchange(NEEDED, COPYING, Ordering::AcqRel, Ordering::Acquire).ok()?;
        let offset = block * DISK_BLOCK_SIZE;
        let result = copy_range(&self.image, &self.staging, offset, DISK_BLOCK_SIZE.min(self.size - offset));
        state.store(if result.is_ok() { COPIED } else { FAILED }, Ordering::Release);
        Some(result)
    }

    /// Waits while someone else copies `block`; returns its state, or
    /// `COPYING` when `alive` says the copier is gone.
    fn wait(&self, block: u64, alive: impl Fn() -> bool) -> u8 {
        let state = self.states.get(block);
        let mut spins = 0u32;
        loop {
            let now = state.load(Ordering::Acquire);
            if now != COPYING {
                return now;
            }
            spins += 1;
            if spins < 100 {
                std::hint::spin_loop();
            } else {
                if spins % 64 == 0 && !alive() {
                    return COPYING;
                }
                std::thread::sleep(std::time::Duration::from_micros(20));
            }
        }
    }

    fn writer_alive(&self) -> bool {
        let Some(fd) = self.writer.get() else { return true };
        let mut poll = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, no wait.
        unsafe { libc::poll(&mut poll, 1, 0) == 0 }
    }

    /// In the forked writer: brings every block still needed into the
    /// staging file, in order.
    fn copy_all(&self) -> Result<(), String> {
        let failed = |block: u64, why: String| {
            format!("cannot copy disk block {block} into {}: {why}", self.staging_path.display())
        };
        for block in 0..self.blocks {
            let state = match self.claim(block) {
                Some(Ok(())) => COPIED,
                Some(Err(e)) => return Err(failed(block, e.to_string())),
                // The VMM has it: it finishes the copy before it lets the
                // guest write, and this process dies with it.
                None => self.wait(block, || true),
            };
            if state == FAILED {
                return Err(failed(block, "the copy before the guest's write failed".into()));
            }
        }
        self.staging.sync_data().map_err(|e| failed(self.blocks, e.to_string()))
    }
}

/// The copy-before-write hooks of one snapshot or backup, each on its
/// disk's tracker; dropped when it is over, done or failed, after which
/// writes go straight through.
#[derive(Default)]
pub(crate) struct CopyHooks(Vec<(Arc<changed::ChangedBlocks>, Arc<CopyOut>)>);

impl CopyHooks {
    /// Hooks `copy` into `changed` (the disk's write path).
    pub(crate) fn add(&mut self, changed: &Arc<changed::ChangedBlocks>, copy: &Arc<CopyOut>) {
        changed.set_before_write(Some(Arc::clone(copy) as Arc<dyn BeforeWrite>));
        self.0.push((Arc::clone(changed), Arc::clone(copy)));
    }

    /// Names the forked writer ([`CopyOut::set_writer`]).
    pub(crate) fn set_writer(&self, pid: libc::pid_t) {
        for (_, copy) in &self.0 {
            copy.set_writer(pid);
        }
    }

    /// The disk data the copies take, in bytes.
    pub(crate) fn needed_bytes(&self) -> u64 {
        self.0.iter().map(|(_, c)| c.needed_bytes()).sum()
    }

    /// Blocks copied ahead of the guest's writes.
    pub(crate) fn copied_before_write(&self) -> u64 {
        self.0.iter().map(|(_, c)| c.copied_before_write()).sum()
    }
}

impl Drop for CopyHooks {
    fn drop(&mut self) {
        for (changed, _) in &self.0 {
            changed.set_before_write(None);
        }
    }
}

impl std::fmt::Debug for CopyOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CopyOut").field("staging", &self.staging_path).field("blocks", &self.blocks).finish()
    }
}

impl BeforeWrite for CopyOut {
    fn before_write(&self, first: u64, last: u64) {
        for block in first..=last.min(self.blocks.saturating_sub(1)) {
            match self.claim(block) {
                Some(result) => {
                    // A failed copy fails the backup (the writer sees the
                    // state); the guest's write goes on.
                    if let Err(e) = result {
                        log::warn!("backup: cannot copy disk block {block} before the guest's write: {e}");
                    }
                    self.before_write.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    if self.wait(block, || self.writer_alive()) == COPYING {
                        log::warn!("backup: the writer died while copying disk block {block}");
                    }
                }
            }
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
    job.copy.copy_all()?;
    if job.raw {
        return Ok(WriteStats::default());
    }
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
        // Retired records list CRC-32Cs (block_crcs).
        checksum: BlockChecksum::Crc32c,
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
/// Backups are written with CRC-32C block checksums; a block of a layer
/// checked otherwise (a snapshot's XXH64) is refused, since its CRC-32C
/// is not known without reading it.
pub(crate) fn block_crcs(reader: &Reader) -> Result<Vec<u32>, String> {
    let full = reader.header().memory_block_size as usize;
    let full_zero = zero_crc(full);
    (0..reader.block_count())
        .map(|i| match reader.block_info(i) {
            Some(info) if info.kind == BlockKind::Zero => {
                Ok(if info.len == full { full_zero } else { zero_crc(info.len) })
            }
            Some(info) if info.checksum != BlockChecksum::Crc32c => Err(format!(
                "block {i} of {} is checked with {}, not CRC-32C",
                reader.layers()[info.layer].path().display(),
                info.checksum.name()
            )),
            Some(info) => Ok(info.crc),
            None => Ok(0),
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

    #[test]
    fn block_crcs_refuse_blocks_checked_with_xxh64() {
        let dir = tempfile::tempdir().expect("tempdir");
        let image = vec![7u8; 2 * DISK_BLOCK_SIZE as usize];
        let source = checkpoint::ImageSource::flat(&image);
        let mut crcs = Vec::new();
        for checksum in [BlockChecksum::Crc32c, BlockChecksum::Xxh64] {
            let path = dir.path().join(checksum.name());
            let options = WriterOptions { memory_block_size: DISK_BLOCK_SIZE as u32, checksum, ..WriterOptions::default() };
            checkpoint::write_checkpoint(&path, &source, &options, &mut |_, _| {}).expect("writes");
            crcs.push(block_crcs(&Reader::open(&path).expect("opens")));
        }
        let want = crc32c::crc32c(&image[..DISK_BLOCK_SIZE as usize]);
        assert_eq!(crcs[0].as_deref(), Ok(&[want, want][..]));
        let err = crcs[1].clone().expect_err("XXH64 blocks have no CRC-32C to give");
        assert!(err.contains("block 0") && err.contains("xxh64"), "{err}");
    }

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
        let job = |name: &str, blocks: DiskBlocks, parent: Option<u32>| {
            let staging = dir.path().join(format!("{name}.raw"));
            let copy = CopyOut::prepare(&f, size, &blocks, &staging).expect("prepare");
            DiskJob { staging, out: dir.path().join(format!("{name}.ckpt")), size, blocks, parent_index_crc: parent, copy, raw: false }
        };
        let image = |f: &File| {
            let mut v = vec![0u8; size as usize];
            f.read_exact_at(&mut v, 0).expect("read");
            v
        };

        let a = job("a", DiskBlocks::All, None);
        let sa = write_job(&a).expect("write a");
        assert!(!a.staging.exists(), "the staging file is removed");
        assert_eq!(sa.zstd_blocks + sa.raw_blocks, 3, "blocks 2, 3 and the tail");
        let point_a = image(&f);

        let ra = Reader::open(&a.out).expect("open a");
        let tracker = changed::ChangedBlocks::new(size);
        f.write_all_at(&[7u8; 10], 20 * DISK_BLOCK_SIZE).expect("write");
        tracker.mark(20 * DISK_BLOCK_SIZE, 10);
        let b = job("b", DiskBlocks::Changed(tracker.take()), Some(ra.index_crc()));
        assert_eq!(b.copy.needed_bytes(), DISK_BLOCK_SIZE);
        let sb = write_job(&b).expect("write b");
        assert_eq!(sb.parent_blocks, 40, "one block stored, the rest in the parent");
        let point_b = image(&f);

        // Tracking lost: the next layer compares against b's CRCs.
        let chain_b = Reader::open_chain(&[b.out.clone(), a.out.clone()], ReaderOptions::default()).expect("chain b");
        let crcs = block_crcs(&chain_b).expect("CRC-32C blocks");
        f.write_all_at(&[0u8; 4096], 3 * DISK_BLOCK_SIZE).expect("write");
        f.write_all_at(&[9u8; 1], 39 * DISK_BLOCK_SIZE).expect("write");
        let c = job("c", DiskBlocks::Compare(crcs), Some(chain_b.index_crc()));
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

    #[test]
    fn blocks_the_guest_overwrites_during_a_backup_are_copied_first_so_the_backup_holds_the_pause() {
        let dir = tempfile::tempdir().expect("tempdir");
        let blocks = 64;
        let size = blocks * DISK_BLOCK_SIZE;
        let f = disk(dir.path(), size);
        for block in 0..blocks {
            f.write_all_at(&[block as u8 + 1; 100], block * DISK_BLOCK_SIZE + 7).expect("write");
        }
        let mut at_pause = vec![0u8; size as usize];
        f.read_exact_at(&mut at_pause, 0).expect("read");
        let staging = dir.path().join("staging");
        let copy = CopyOut::prepare(&f, size, &DiskBlocks::All, &staging).expect("prepare");
        let job = DiskJob {
            staging,
            out: dir.path().join("disk.ckpt"),
            size,
            blocks: DiskBlocks::All,
            parent_index_crc: None,
            copy: Arc::clone(&copy),
            raw: false,
        };
        // The guest overwrites the last four blocks before the writer
        // starts, then every block, last first, while the writer copies
        // them first first: they meet half way.
        for block in blocks - 4..blocks {
            copy.before_write(block, block);
            f.write_all_at(&[0xdd; 4096], block * DISK_BLOCK_SIZE).expect("write");
        }
        let guest = {
            let (copy, f) = (Arc::clone(&copy), f.try_clone().expect("clone"));
            std::thread::spawn(move || {
                for block in (0..blocks).rev() {
                    copy.before_write(block, block);
                    f.write_all_at(&[0xee; 4096], block * DISK_BLOCK_SIZE).expect("write");
                }
            })
        };
        let stats = write_job(&job).expect("write");
        guest.join().expect("guest");
        assert_eq!(stats.raw_blocks + stats.zstd_blocks, blocks);
        assert!(copy.copied_before_write() >= 4, "the blocks written first were not copied ahead of the writes");
        let reader = Reader::open(&job.out).expect("open");
        let target = dir.path().join("point.img");
        rebuild(&reader, &target).expect("rebuild");
        assert!(std::fs::read(&target).expect("read") == at_pause, "the backup holds the disk as it was at the pause");
        // After the backup, writes go straight through.
        let copied = copy.copied_before_write();
        copy.before_write(0, blocks - 1);
        assert_eq!(copy.copied_before_write(), copied);
    }
}
