//! Writing a VM's memory into a snapshot: what to read for each memory
//! block, and the live writer.
//!
//! # What is read
//!
//! [`VmMemory`] is the checkpoint writer's view of a VM's memory at the
//! pause instant. For each memory block it decides, without touching the
//! memory when it can:
//!
//! - *in parent* (incremental snapshots): no page of the block changed since
//!   the parent snapshot ([`crate::vstate::dirty`]);
//! - *zero*: no page of the block was ever populated in the host process
//!   (neither present nor swapped out in `/proc/self/pagemap`): the guest
//!   never touched it, so it is zero, and reading it would only populate
//!   zero pages. So a snapshot costs what the guest touched, not what it
//!   was configured with;
//! - *from the restore checkpoint*: in a VM lazily restored and not fully
//!   resident yet, a block the loader has not brought in holds exactly what
//!   the checkpoint it is restored from holds; it is read from there, never
//!   through guest memory (which would fault it in);
//! - otherwise the bytes in guest memory.
//!
//! # Live snapshots: why a forked writer
//!
//! A live snapshot must hold memory exactly as it was at the pause instant
//! while the guest runs on. The writer runs in a child process forked
//! during the pause: `fork` gives the child a copy-on-write view of the
//! whole address space, guest memory included, frozen at that instant. When
//! the guest (through KVM) or a device thread then writes a page, the
//! kernel copies that 4 KiB page for the writer first — the copy-before-
//! write the point-in-time guarantee needs, done by the kernel's own
//! mechanism, for every writer at once, with nothing to arm on each block
//! and nothing to track in the VMM.
//!
//! The alternative, userfaultfd write protection, needs a handler that
//! copies each block out before letting the write through, a second
//! registration mode on memory a lazy restore already serves from
//! userfaultfd, and a workaround for never-populated pages on kernels
//! without `UFFD_FEATURE_WP_UNPOPULATED` (which silently stay writable).
//! Forking has none of these. Its costs: the pause includes copying the
//! process's page tables (proportional to the memory the guest touched, not
//! to its size), and the guest's first write to each page while the writer
//! runs takes a copy fault, as with write protection. Memory in use grows by
//! what the guest rewrites meanwhile, at most one copy of guest memory.
//!
//! The child only reads memory and writes the checkpoint file: it never
//! logs (another thread may have held the logger's lock at the fork), never
//! touches the VM's file descriptors, dies with the VMM (`PR_SET_PDEATHSIG`)
//! so an interrupted snapshot leaves only a partial directory that restore
//! refuses, and reports its result as one JSON line on a pipe.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::checkpoint::source::BlockHint;
use crate::checkpoint::{
    self, MemorySource, ReadError, Reader, ReaderOptions, Region, SourceError, WriteError, WriteStats, WriterOptions,
};
use crate::devices::virtio::block::image::copy_sparse;
use crate::persist::{self, Identity, PersistError, SnapshotWriter, VirtioBackend};
use crate::error_chain;
use crate::vstate::dirty::DirtyPages;
use crate::vstate::memory::{GuestMemoryMmap, PAGE_SIZE};

/// A lazily restored VM's memory not loaded yet.
pub(crate) struct NotResident {
    /// The checkpoint the VM is restored from.
    pub(crate) reader: Reader,
    /// Per block of `reader`: whether it is in guest memory.
    pub(crate) resident: Vec<bool>,
}

/// A VM's memory as a checkpoint source; see the module documentation.
pub(crate) struct VmMemory {
    mem: GuestMemoryMmap,
    /// Pages ever populated (present or swapped), once scanned.
    touched: Option<DirtyPages>,
    not_resident: Option<NotResident>,
    /// For an incremental snapshot: pages changed since the parent.
    changed: Option<DirtyPages>,
    /// For a backup whose tracking was lost: the CRC-32C of every block of
    /// the previous backup (its retired record), and the first block of
    /// each region; a block with the same CRC is in the parent.
    retired: Option<(Vec<u32>, Vec<usize>, u64)>,
}

impl VmMemory {
    pub(crate) fn new(mem: GuestMemoryMmap, not_resident: Option<NotResident>, changed: Option<DirtyPages>) -> Self {
        VmMemory { mem, touched: None, not_resident, changed, retired: None }
    }

    /// Compares every block with `crcs` (one per block of `block_size`, as
    /// a retired record lists them) instead of knowing what changed.
    pub(crate) fn compare_with(&mut self, crcs: Vec<u32>, block_size: u64) {
        let mut first = Vec::new();
        let mut next = 0;
        for region in self.mem.iter() {
            first.push(next);
            next += region.len().div_ceil(block_size) as usize;
        }
        self.retired = Some((crcs, first, block_size));
    }

    /// Whether block `offset .. offset + len` of `region` has the CRC the
    /// retired record lists for it.
    fn same_as_retired(&self, region: usize, offset: u64, len: usize) -> bool {
        let Some((crcs, first, block_size)) = &self.retired else { return false };
        let Some(start) = first.get(region) else { return false };
        let index = start + (offset / block_size) as usize;
        let Some(&want) = crcs.get(index) else { return false };
        let never_touched = matches!(&self.touched, Some(t) if !t.any(region, offset, len)) && self.not_loaded_in(region, offset, len).is_none();
        let crc = if never_touched {
            crate::backup::disk::zero_crc(len)
        } else {
            let mut scratch = Vec::new();
            match self.block(region, offset, len, &mut scratch) {
                Ok(bytes) => crc32c::crc32c(bytes),
                Err(_) => return false,
            }
        };
        crc == want
    }

    /// `Some` when part of the block is still only in the restore checkpoint.
    fn not_loaded_in(&self, region: usize, offset: u64, len: usize) -> Option<usize> {
        let start = self.region_start(region)?;
        self.not_loaded(start + offset, len).next()
    }

    /// Reads which pages of guest memory were ever populated, from
    /// `/proc/self/pagemap`. Without it every block is read.
    pub(crate) fn scan_touched(&mut self) -> std::io::Result<()> {
        let pagemap = File::open("/proc/self/pagemap")?;
        let mut touched = Vec::new();
        for region in self.mem.iter() {
            let host = self
                .mem
                .get_host_address(region.start_addr())
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))? as u64;
            touched.push(populated_pages(&pagemap, host, region.len())?);
        }
        self.touched = Some(DirtyPages::from_bitmaps(touched));
        Ok(())
    }

    fn region_start(&self, region: usize) -> Option<u64> {
        self.mem.iter().nth(region).map(|r| r.start_addr().0)
    }

    /// The restore checkpoint's blocks overlapping `gpa .. gpa + len`
    /// that are not in guest memory.
    fn not_loaded(&self, gpa: u64, len: usize) -> impl Iterator<Item = usize> + '_ {
        let blocks = self.not_resident.as_ref().map(|nr| {
            let first = nr.reader.block_of(gpa);
            let last = nr.reader.block_of(gpa + len as u64 - 1);
            match (first, last) {
                (Some(a), Some(b)) => (a..=b).filter(|&i| !nr.resident.get(i).copied().unwrap_or(true)).collect(),
                _ => Vec::new(),
            }
        });
        blocks.into_iter().flatten()
    }
}

/// Bit per page of `len` bytes at host address `host`: set when the page is
/// present or swapped out (pagemap bits 63 and 62).
fn populated_pages(pagemap: &File, host: u64, len: u64) -> std::io::Result<Vec<u64>> {
    const CHUNK: usize = 64 << 10;
    let pages = (len as usize).div_ceil(PAGE_SIZE);
    let mut bits = vec![0u64; pages.div_ceil(64)];
    let mut buf = vec![0u8; CHUNK * 8];
    let mut page = 0;
    while page < pages {
        let n = CHUNK.min(pages - page);
        let at = (host / PAGE_SIZE as u64 + page as u64) * 8;
        pagemap.read_exact_at(&mut buf[..n * 8], at)?;
        for (i, entry) in buf[..n * 8].chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(entry.try_into().unwrap_or_default());
            if e & (3 << 62) != 0 {
                let p = page + i;
                bits[p / 64] |= 1 << (p % 64);
            }
        }
        page += n;
    }
    Ok(bits)
}

impl MemorySource for VmMemory {
    fn regions(&self) -> Vec<Region> {
        self.mem.regions()
    }

    fn hint(&self, region: usize, offset: u64, len: usize) -> BlockHint {
        if let Some(changed) = &self.changed {
            if !changed.any(region, offset, len) {
                return BlockHint::Parent;
            }
        }
        if self.same_as_retired(region, offset, len) {
            return BlockHint::Parent;
        }
        let Some(start) = self.region_start(region) else { return BlockHint::Read };
        if self.not_loaded(start + offset, len).next().is_some() {
            return BlockHint::Read;
        }
        match &self.touched {
            Some(touched) if !touched.any(region, offset, len) => BlockHint::Zero,
            _ => BlockHint::Read,
        }
    }

    fn block<'a>(
        &'a self,
        region: usize,
        offset: u64,
        len: usize,
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], SourceError> {
        let start = self.region_start(region).ok_or(SourceError::CheckRange { region, offset, end: offset })?;
        let gpa = start + offset;
        let Some(nr) = self.not_resident.as_ref().filter(|_| self.not_loaded(gpa, len).next().is_some()) else {
            return self.mem.block(region, offset, len, scratch);
        };
        // Some of it is still only in the restore checkpoint: each restore
        // block's part from guest memory if it is in, from the checkpoint
        // if not (reading it through memory would fault it in, or, in the
        // forked writer, read zeros).
        let outside = || SourceError::CheckRange { region, offset, end: offset + len as u64 };
        let first = nr.reader.block_of(gpa).ok_or_else(outside)?;
        let last = nr.reader.block_of(gpa + len as u64 - 1).ok_or_else(outside)?;
        scratch.resize(len, 0);
        let mut buf = Vec::new();
        for block in first..=last {
            let info = nr.reader.block_info(block).ok_or_else(outside)?;
            // The overlap of the restore block and this one.
            let from = info.guest_addr.max(gpa);
            let to = (info.guest_addr + info.len as u64).min(gpa + len as u64);
            let dst = &mut scratch[(from - gpa) as usize..(to - gpa) as usize];
            if nr.resident.get(block).copied().unwrap_or(true) {
                self.mem
                    .read_slice(dst, GuestAddress(from))
                    .map_err(|source| SourceError::ReadGuestMemory { addr: from, source })?;
                continue;
            }
            buf.resize(info.len, 0);
            let data = nr.reader.read_block(block, &mut buf).map_err(|e| SourceError::ReadImage {
                offset: info.guest_addr,
                source: std::io::Error::other(error_chain(&e)),
            })?;
            dst.copy_from_slice(&data[(from - info.guest_addr) as usize..(to - info.guest_addr) as usize]);
        }
        Ok(&scratch[..len])
    }
}

/// What a snapshot's writer wrote: memory, and a backup's disks.
#[derive(Clone, Debug, Default)]
pub struct Written {
    /// The memory checkpoint's figures.
    pub memory: WriteStats,
    /// Each disk checkpoint's figures (backups only).
    pub disks: Vec<WriteStats>,
}

/// A memory write running in a child process.
pub(crate) struct ChildWriter {
    pid: libc::pid_t,
    result: OwnedFd,
}

/// Forks a child that writes `source` to `path` as a checkpoint, then each
/// of a backup's `disks` ([`crate::backup::disk`]), and exits. Call it with
/// the vCPUs paused and the device threads held: the child sees memory as
/// it is at this instant.
pub(crate) fn fork_writer(
    path: PathBuf,
    mut source: VmMemory,
    options: WriterOptions,
    disks: Vec<crate::backup::disk::DiskJob>,
) -> std::io::Result<ChildWriter> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 fills the two-element array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned here only.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: fork has no memory-safety preconditions; the child below
    // only runs code that takes no lock another thread may have held (see
    // the module documentation) and leaves with _exit.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if pid == 0 {
        drop(read_end);
        // SAFETY: prctl and getppid have no memory-safety preconditions.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != parent {
                libc::_exit(3);
            }
        }
        log::set_max_level(log::LevelFilter::Off);
        // Confined before reading the guest's memory: the writer's filter
        // under the main thread's, inherited through the fork.
        let written = crate::seccomp::confine(crate::seccomp::ThreadKind::Writer)
            .map_err(|e| e.to_string())
            .and_then(|()| source.scan_touched().map_err(|e| format!("cannot read /proc/self/pagemap: {e}")))
            .and_then(|()| checkpoint::write_checkpoint(&path, &source, &options, &mut |_, _| {}).map_err(|e| error_chain(&e)))
            .and_then(|memory| {
                let disks = disks.iter().map(crate::backup::disk::write_job).collect::<Result<Vec<_>, _>>()?;
                Ok((memory, disks))
            });
        let line = match written {
            Ok((memory, disks)) => serde_json::json!({
                "ok": stats_to_json(&memory),
                "disks": disks.iter().map(stats_to_json).collect::<Vec<_>>(),
            }),
            Err(msg) => serde_json::json!({ "error": msg }),
        };
        let mut out = File::from(write_end);
        let code = i32::from(out.write_all(line.to_string().as_bytes()).is_err() || line.get("error").is_some());
        // SAFETY: leaving the child without running the parent's
        // destructors or exit handlers.
        unsafe { libc::_exit(code) }
    }
    drop(write_end);
    Ok(ChildWriter { pid, result: read_end })
}

impl ChildWriter {
    /// The child's process id.
    pub(crate) fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// Waits for the child to end; its figures, or why it failed.
    pub(crate) fn wait(self) -> Result<Written, String> {
        let mut text = String::new();
        let read = File::from(self.result).read_to_string(&mut text);
        let mut status = 0;
        loop {
            // SAFETY: waits for our own child; `status` is a valid out
            // pointer.
            let rc = unsafe { libc::waitpid(self.pid, &mut status, 0) };
            if rc >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                break;
            }
        }
        let how = if libc::WIFSIGNALED(status) {
            format!("was killed by signal {}", libc::WTERMSIG(status))
        } else {
            format!("exited with status {}", libc::WEXITSTATUS(status))
        };
        if let Err(e) = read {
            return Err(format!("cannot read the memory writer's result: {e}"));
        }
        let value: serde_json::Value = serde_json::from_str(text.trim())
            .map_err(|_| format!("the memory writer process {} {how} without a result", self.pid))?;
        if let Some(msg) = value.get("error").and_then(|m| m.as_str()) {
            return Err(msg.to_owned());
        }
        let garbled = || format!("the memory writer process {} {how} with a garbled result", self.pid);
        let memory = value.get("ok").and_then(stats_from_json).ok_or_else(garbled)?;
        let disks = match value.get("disks").and_then(|d| d.as_array()) {
            Some(list) => list.iter().map(stats_from_json).collect::<Option<Vec<_>>>().ok_or_else(garbled)?,
            None => Vec::new(),
        };
        Ok(Written { memory, disks })
    }
}

fn stats_to_json(s: &WriteStats) -> serde_json::Value {
    serde_json::json!([
        s.zero_blocks,
        s.raw_blocks,
        s.zstd_blocks,
        s.parent_blocks,
        s.storage_blocks,
        s.bytes_in,
        s.bytes_stored,
        s.file_bytes,
        s.elapsed.as_nanos() as u64,
    ])
}

fn stats_from_json(v: &serde_json::Value) -> Option<WriteStats> {
    let n: Vec<u64> = v.as_array()?.iter().map(serde_json::Value::as_u64).collect::<Option<_>>()?;
    let [zero_blocks, raw_blocks, zstd_blocks, parent_blocks, storage_blocks, bytes_in, bytes_stored, file_bytes, nanos] =
        n[..]
    else {
        return None;
    };
    Some(WriteStats {
        zero_blocks,
        raw_blocks,
        zstd_blocks,
        parent_blocks,
        storage_blocks,
        bytes_in,
        bytes_stored,
        file_bytes,
        elapsed: Duration::from_nanos(nanos),
    })
}

/// Errors of `stasis snapshot flatten`.
#[derive(Debug, thiserror::Error)]
pub enum FlattenError {
    /// Snapshot files.
    #[error(transparent)]
    Persist(#[from] PersistError),
    /// The memory chain could not be opened.
    #[error("cannot open the memory checkpoints of {}", .0.display())]
    Open(PathBuf, #[source] ReadError),
    /// The merged memory checkpoint could not be written.
    #[error("cannot write the merged memory checkpoint")]
    Write(#[source] WriteError),
    /// A disk could not be copied.
    #[error("cannot copy disk {} into the new snapshot", .0.display())]
    CopyDisk(PathBuf, #[source] std::io::Error),
    /// The output is one of the snapshots being merged.
    #[error("{} is part of the chain being merged; choose another --out", .0.display())]
    OutputInChain(PathBuf),
}

/// Merges the snapshot in `dir` and the parents it builds on into one
/// self-contained snapshot in `out` (a new snapshot id, the same VM id);
/// returns a one-line JSON summary.
pub fn flatten_snapshot(dir: &Path, out: &Path) -> Result<String, FlattenError> {
    let snapshot = persist::open_snapshot(dir)?;
    let chain = persist::snapshot_chain(dir, &snapshot.manifest, &snapshot.memory_path)?;
    if let Ok(target) = out.canonicalize() {
        if chain.iter().any(|layer| layer.dir.canonicalize().ok().as_ref() == Some(&target)) {
            return Err(FlattenError::OutputInChain(out.to_path_buf()));
        }
    }
    let layers: Vec<PathBuf> = chain.iter().map(|layer| layer.memory_path.clone()).collect();
    let reader = Reader::open_chain(&layers, ReaderOptions::default()).map_err(|e| FlattenError::Open(dir.to_path_buf(), e))?;
    let writer = SnapshotWriter::create(out)?;
    let options = WriterOptions {
        memory_block_size: reader.header().memory_block_size,
        storage_block_size: reader.header().storage_block_size,
        // A snapshot, as `stasis snapshot` writes it.
        checksum: checkpoint::BlockChecksum::Xxh64,
        ..Default::default()
    };
    let stats = checkpoint::flatten(&reader, &writer.memory_path(), &options, &mut |_, _| {}).map_err(FlattenError::Write)?;
    let vm_id = snapshot.manifest.vm_id.clone();
    let sources: Vec<PathBuf> = snapshot
        .state
        .virtio
        .iter()
        .filter_map(|saved| match &saved.backend {
            VirtioBackend::Block { file, .. } => Some(snapshot.file(dir, file)),
            _ => None,
        })
        .collect::<Result<_, _>>()?;
    let mut state = snapshot.state;
    let mut disks = 0;
    for saved in &mut state.virtio {
        if let VirtioBackend::Block { file, .. } = &mut saved.backend {
            let from = sources[disks].clone();
            let (name, to) = writer.disk_path(disks);
            disks += 1;
            File::open(&from)
                .and_then(|f| copy_sparse(&f, &to))
                .map_err(|e| FlattenError::CopyDisk(from.clone(), e))?;
            *file = name;
        }
    }
    writer.write_state(&state)?;
    let identity = Identity { id: persist::new_id(), vm_id, parent: None };
    let done = writer.commit(&state.machine, &identity)?;
    Ok(serde_json::json!({
        "dir": done.display().to_string(),
        "layers": chain.len(),
        "memory_bytes": stats.bytes_in,
        "memory_file_bytes": stats.file_bytes,
        "disks": disks,
    })
    .to_string())
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    #[test]
    fn untouched_memory_is_zero_without_reading_and_written_memory_is_read() {
        let mem = crate::vstate::memory::create_guest_memory(8 << 20).expect("memory");
        mem.write_obj(0xabu8, GuestAddress(3 << 20)).expect("write");
        let mut source = VmMemory::new(mem, None, None);
        source.scan_touched().expect("pagemap");
        assert_eq!(source.hint(0, 0, 64 << 10), BlockHint::Zero);
        assert_eq!(source.hint(0, 3 << 20, 64 << 10), BlockHint::Read);
    }

    #[test]
    fn unchanged_blocks_are_left_in_the_parent() {
        let mem = crate::vstate::memory::create_guest_memory(8 << 20).expect("memory");
        let mut changed = DirtyPages::none(&mem);
        changed.insert(0, (1 << 20) / PAGE_SIZE as u64 + 3);
        let source = VmMemory::new(mem, None, Some(changed));
        assert_eq!(source.hint(0, 0, 64 << 10), BlockHint::Parent);
        assert_eq!(source.hint(0, 1 << 20, 64 << 10), BlockHint::Read, "a block with one changed page is written");
    }

    #[test]
    fn blocks_not_loaded_yet_come_from_the_restore_checkpoint_and_the_rest_from_memory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("restore.ckpt");
        let image = vec![5u8; 4 << 20];
        checkpoint::write_checkpoint(&path, &checkpoint::ImageSource::flat(&image), &WriterOptions::default(), &mut |_, _| {})
            .expect("write");
        let reader = Reader::open(&path).expect("open");
        let mem = crate::vstate::memory::create_guest_memory(4 << 20).expect("memory");
        mem.write_slice(&[9u8; 4 << 20], GuestAddress(0)).expect("write");
        // Restore block 1 (64 KiB .. 128 KiB) is not in memory yet.
        let mut resident = vec![true; reader.block_count()];
        resident[1] = false;
        let source = VmMemory::new(mem, Some(NotResident { reader, resident }), None);
        let mut scratch = Vec::new();
        let data = source.block(0, 0, 256 << 10, &mut scratch).expect("block");
        assert!(data[..64 << 10].iter().all(|&b| b == 9), "a loaded block is read from memory");
        assert!(data[64 << 10..128 << 10].iter().all(|&b| b == 5), "a block not loaded is read from the checkpoint");
        assert!(data[128 << 10..].iter().all(|&b| b == 9));
        assert_eq!(source.hint(0, 64 << 10, 64 << 10), BlockHint::Read);
    }

    #[test]
    fn a_forked_writer_saves_memory_as_it_was_at_the_fork() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("memory.ckpt");
        let mem = crate::vstate::memory::create_guest_memory(4 << 20).expect("memory");
        mem.write_slice(&[7u8; 8192], GuestAddress(1 << 20)).expect("write");
        let source = VmMemory::new(mem.clone(), None, None);
        let child = fork_writer(path.clone(), source, WriterOptions::default(), Vec::new()).expect("fork");
        // Written after the fork: the checkpoint must not see it.
        mem.write_slice(&[9u8; 8192], GuestAddress(1 << 20)).expect("write");
        let stats = child.wait().expect("child wrote the checkpoint").memory;
        assert_eq!(stats.bytes_in, 4 << 20);
        let reader = Reader::open(&path).expect("opens");
        let block = reader.block_of(1 << 20).expect("block");
        let mut buf = vec![0u8; 64 << 10];
        let data = reader.read_block(block, &mut buf).expect("read");
        assert!(data[..8192].iter().all(|&b| b == 7), "the checkpoint holds memory from after the fork");
        assert_eq!(stats.zero_blocks as usize, reader.block_count() - 1, "untouched blocks are zero");
    }

    #[test]
    fn memory_compared_with_a_retired_record_stores_only_the_blocks_that_differ() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mem = crate::vstate::memory::create_guest_memory(4 << 20).expect("memory");
        mem.write_slice(&[7u8; 8192], GuestAddress(1 << 20)).expect("write");
        mem.write_slice(&[5u8; 100], GuestAddress(3 << 20)).expect("write");
        let base = dir.path().join("base.ckpt");
        let mut source = VmMemory::new(mem.clone(), None, None);
        source.scan_touched().expect("pagemap");
        checkpoint::write_checkpoint(&base, &source, &WriterOptions::default(), &mut |_, _| {}).expect("base");
        let reader = Reader::open(&base).expect("open base");
        let crcs = crate::backup::disk::block_crcs(&reader).expect("CRC-32C blocks");

        // One block changes, one untouched block gets data, one goes back to zero.
        mem.write_slice(&[8u8; 1], GuestAddress((1 << 20) + 5)).expect("write");
        mem.write_slice(&[1u8; 1], GuestAddress(2 << 20)).expect("write");
        mem.write_slice(&[0u8; 100], GuestAddress(3 << 20)).expect("write");
        let mut source = VmMemory::new(mem.clone(), None, None);
        source.scan_touched().expect("pagemap");
        source.compare_with(crcs, 64 << 10);
        let layer = dir.path().join("layer.ckpt");
        let options = WriterOptions { parent_index_crc: Some(reader.index_crc()), ..WriterOptions::default() };
        let stats = checkpoint::write_checkpoint(&layer, &source, &options, &mut |_, _| {}).expect("layer");
        assert_eq!(stats.parent_blocks as usize, reader.block_count() - 3, "three blocks differ");
        let chain = Reader::open_chain(&[layer, base], ReaderOptions::default()).expect("chain");
        let mut buf = vec![0u8; 64 << 10];
        let at = |gpa: u64, buf: &mut Vec<u8>| chain.read_block(chain.block_of(gpa).expect("block"), buf).expect("read").to_vec();
        assert_eq!(at(1 << 20, &mut buf)[5], 8);
        assert_eq!(at(2 << 20, &mut buf)[0], 1);
        assert!(at(3 << 20, &mut buf).iter().all(|&b| b == 0));
    }
}
