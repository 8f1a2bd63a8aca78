//! The checkpoint writer: cuts guest memory into memory blocks, compresses
//! them on every core, and stages them into storage blocks.
//!
//! Pipeline (file layout in [`super::format`]):
//!
//! ```text
//!  source ──► N compression threads ──► this thread ──► I/O thread ──► file
//!             (batches of blocks,        (puts batches   (one positioned
//!              at most 2·N in flight)     in order into   write per full
//!                                         the staging     storage block)
//!                                         buffer)
//! ```
//!
//! Memory is bounded: at most `2·N` batches of about 1 MiB of input each are
//! in flight, and two staging buffers exist, one being filled while the
//! other is written.
//!
//! Crash safety: everything is written to a temporary file in the target's
//! directory; the footer goes last; the file is synced, renamed over the
//! target, and the directory is synced. A write interrupted at any point
//! leaves either the old target or no target, plus at worst a stray
//! `.NAME.*.tmp` file that has no footer and so never opens as a checkpoint.
//!
//! Layers: with [`WriterOptions::parent_index_crc`] the file is written as
//! a layer on top of that parent, and blocks the source hints as
//! [`BlockHint::Parent`] are recorded as in the parent without being read.
//! [`flatten`] merges a chain of layers back into one plain file.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::format::{
    align_up, BlockChecksum, valid_memory_block_size, valid_storage_block_size, BlockEntry, BlockKind, BlockMap,
    Footer, FormatError, Header, StorageEntry, BLOCK_ENTRY_LEN, FOOTER_LEN, STORAGE_ENTRY_LEN,
};
use super::reader::Reader;
use super::source::{BlockHint, MemorySource, ReaderSource, SourceError};

/// Default memory block size: 64 KiB. In the benchmark (see
/// docs/checkpoint-format.md) it wrote fastest, within 1% of the best file
/// size, and kept a warm single-block read near 25 µs.
pub const DEFAULT_MEMORY_BLOCK_SIZE: u32 = 64 << 10;
/// Default storage (staging) block size: 1 MiB. Larger staging buffers
/// did not write faster in the benchmark, while a cold read of a whole
/// storage block grows with its size.
pub const DEFAULT_STORAGE_BLOCK_SIZE: u32 = 1 << 20;
/// Default zstd level: fast.
pub const DEFAULT_LEVEL: i32 = 1;

/// Most compression threads a write starts, whatever it is asked for.
pub const MAX_THREADS: usize = 256;

/// Input handed to one compression job, in bytes (rounded to whole blocks).
const BATCH_BYTES: usize = 1 << 20;

/// A zstd frame is kept only when it saves at least 1/32 of the block;
/// otherwise decompressing it costs more than the bytes it saves.
const MIN_SAVING_DIVISOR: usize = 32;

/// Errors of the checkpoint writer.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The options cannot be used.
    #[error("invalid writer options: {reason}")]
    CheckOptions { reason: String },
    /// The memory source's layout cannot be written.
    #[error("cannot lay out the checkpoint header")]
    BuildHeader(#[source] FormatError),
    /// The output path has no file name.
    #[error("output path {path} does not name a file")]
    CheckOutput { path: PathBuf },
    /// Creating the temporary file failed.
    #[error("cannot create temporary file {path}")]
    CreateTemp {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Writing the header failed.
    #[error("cannot write the header")]
    WriteHeader(#[source] std::io::Error),
    /// The source hinted a parent block, but the write has no parent.
    #[error("the source says memory block {block} is in the parent checkpoint, but the write names no parent (WriterOptions::parent_index_crc is None)")]
    CheckHint { block: usize },
    /// A chain to flatten ends in a layer whose parent was not opened.
    #[error(
        "cannot flatten {path}: it is a layer on top of a parent checkpoint that was not opened"
    )]
    CheckChain { path: PathBuf },
    /// Reading a memory block from the source failed.
    #[error("cannot read memory block {block}")]
    ReadSource {
        block: usize,
        #[source]
        source: SourceError,
    },
    /// Creating a zstd context or compressing a block failed.
    #[error("cannot compress memory block {block}")]
    Compress {
        block: usize,
        #[source]
        source: std::io::Error,
    },
    /// Writing a storage block failed.
    #[error("cannot write storage block {storage_block} at offset {offset}")]
    WriteStorage {
        storage_block: usize,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    /// A compression or I/O thread stopped without reporting.
    #[error("a writer thread stopped unexpectedly")]
    JoinThread,
    /// Writing the index or footer failed.
    #[error("cannot write the index at offset {offset}")]
    WriteIndex {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    /// Syncing the temporary file failed.
    #[error("cannot sync {path}")]
    SyncFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Renaming the temporary file over the target failed.
    #[error("cannot rename {from} to {to}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Syncing the target's directory failed.
    #[error("cannot sync directory {dir}")]
    SyncDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How to write a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriterOptions {
    /// Memory block size: a power of two from 4 KiB to 2 MiB.
    pub memory_block_size: u32,
    /// Storage block size: a multiple of 4 KiB, at least the memory block
    /// size, at most 64 MiB.
    pub storage_block_size: u32,
    /// zstd level (negative levels are faster, up to 22 smaller).
    pub level: i32,
    /// Compression threads; 0 means one per available core. At most
    /// [`MAX_THREADS`].
    pub threads: usize,
    /// Write a layer on top of the checkpoint whose index CRC this is
    /// ([`Reader::index_crc`]): the file is then 1.1 with the layered flag,
    /// and blocks the source hints [`BlockHint::Parent`] are recorded as in
    /// the parent. `None` writes a plain, self-contained 1.0 file.
    pub parent_index_crc: Option<u32>,
    /// How blocks are checked: CRC-32C by default (1.0 and 1.1 files);
    /// XXH64 makes the file 1.2 (see the format's documentation).
    pub checksum: BlockChecksum,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            memory_block_size: DEFAULT_MEMORY_BLOCK_SIZE,
            storage_block_size: DEFAULT_STORAGE_BLOCK_SIZE,
            level: DEFAULT_LEVEL,
            threads: 0,
            parent_index_crc: None,
            checksum: BlockChecksum::Crc32c,
        }
    }
}

/// What a finished write did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Memory blocks elided as zero.
    pub zero_blocks: u64,
    /// Memory blocks stored raw.
    pub raw_blocks: u64,
    /// Memory blocks stored zstd-compressed.
    pub zstd_blocks: u64,
    /// Memory blocks recorded as in the parent checkpoint.
    pub parent_blocks: u64,
    /// Storage blocks written.
    pub storage_blocks: u64,
    /// Guest memory bytes the checkpoint covers: every block's length,
    /// whether it was read, hinted zero or hinted in the parent.
    pub bytes_in: u64,
    /// Bytes of stored (compressed or raw) blocks, padding excluded.
    pub bytes_stored: u64,
    /// Length of the finished file.
    pub file_bytes: u64,
    /// Wall time from start to the synced directory.
    pub elapsed: Duration,
}

/// One compressed batch of consecutive memory blocks.
struct Batch {
    seq: usize,
    first_block: usize,
    /// Per block: kind, CRC, stored length; stored bytes are back to back
    /// in `data`.
    blocks: Vec<(BlockKind, u32, u32)>,
    data: Vec<u8>,
    bytes_in: u64,
}

/// Scheduling state shared by the compression threads.
struct Schedule {
    next: usize,
    consumed: usize,
    abort: bool,
}

/// What the compression threads share.
struct Shared<'s> {
    source: &'s dyn MemorySource,
    map: &'s BlockMap,
    /// Whether parent hints may be recorded.
    layered: bool,
    checksum: BlockChecksum,
    level: i32,
    blocks_per_batch: usize,
    batches: usize,
    window: usize,
    schedule: Mutex<Schedule>,
    wake: Condvar,
    spare_buffers: Mutex<Vec<Vec<u8>>>,
}

impl Shared<'_> {
    /// Takes the next batch number, waiting while the window is full;
    /// `None` when there is no more work or the write is aborting.
    fn take_job(&self) -> Option<usize> {
        let mut st = self.schedule.lock().unwrap_or_else(PoisonError::into_inner);
        while !st.abort && st.next < self.batches && st.next >= st.consumed + self.window {
            st = self.wake.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        if st.abort || st.next >= self.batches {
            return None;
        }
        st.next += 1;
        Some(st.next - 1)
    }

    fn mark_consumed(&self) {
        let mut st = self.schedule.lock().unwrap_or_else(PoisonError::into_inner);
        st.consumed += 1;
        self.wake.notify_all();
    }

    fn abort(&self) {
        let mut st = self.schedule.lock().unwrap_or_else(PoisonError::into_inner);
        st.abort = true;
        self.wake.notify_all();
    }
}

/// Stops the compression threads when the placing loop exits, whatever way.
struct AbortOnDrop<'a, 's>(&'a Shared<'s>);

impl Drop for AbortOnDrop<'_, '_> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Whether every byte of `bytes` is zero.
fn is_zero(bytes: &[u8]) -> bool {
    let mut chunks = bytes.chunks_exact(512);
    for chunk in &mut chunks {
        // OR-folding a fixed-size chunk vectorizes; exit early per chunk.
        if chunk.iter().fold(0u8, |acc, b| acc | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|&b| b == 0)
}

/// Compresses one batch of blocks.
fn compress_batch(
    shared: &Shared<'_>,
    seq: usize,
    compressor: &mut zstd::bulk::Compressor<'static>,
    scratch: &mut Vec<u8>,
    zbuf: &mut Vec<u8>,
) -> Result<Batch, WriteError> {
    let first_block = seq * shared.blocks_per_batch;
    let end_block = (first_block + shared.blocks_per_batch).min(shared.map.block_count());
    let mut data = shared
        .spare_buffers
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .pop()
        .unwrap_or_default();
    data.clear();
    let mut blocks = Vec::with_capacity(end_block - first_block);
    let mut bytes_in = 0u64;
    for block in first_block..end_block {
        let (region, offset, len) = shared.map.locate(block);
        match shared.source.hint(region, offset, len) {
            BlockHint::Read => {}
            BlockHint::Zero => {
                bytes_in += len as u64;
                blocks.push((BlockKind::Zero, 0, 0));
                continue;
            }
            BlockHint::Parent if shared.layered => {
                bytes_in += len as u64;
                blocks.push((BlockKind::Parent, 0, 0));
                continue;
            }
            BlockHint::Parent => return Err(WriteError::CheckHint { block }),
        }
        let bytes = shared
            .source
            .block(region, offset, len, scratch)
            .map_err(|source| WriteError::ReadSource { block, source })?;
        bytes_in += len as u64;
        if is_zero(bytes) {
            blocks.push((BlockKind::Zero, 0, 0));
            continue;
        }
        let crc = shared.checksum.of(bytes);
        zbuf.clear();
        let compressed = compressor
            .compress_to_buffer(bytes, zbuf)
            .map_err(|source| WriteError::Compress { block, source })?;
        if compressed + len / MIN_SAVING_DIVISOR <= len && compressed > 0 {
            data.extend_from_slice(&zbuf[..compressed]);
            blocks.push((BlockKind::Zstd, crc, compressed as u32));
        } else {
            data.extend_from_slice(bytes);
            blocks.push((BlockKind::Raw, crc, len as u32));
        }
    }
    Ok(Batch {
        seq,
        first_block,
        blocks,
        data,
        bytes_in,
    })
}

/// Body of one compression thread.
fn compression_thread(shared: &Shared<'_>, results: mpsc::Sender<Result<Batch, WriteError>>) {
    let block_size = shared.map.block_len(0);
    let compressor = zstd::bulk::Compressor::new(shared.level).and_then(|mut c| {
        // Our own CRC covers the content; zstd's would be redundant.
        c.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(false))?;
        c.set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(true))?;
        Ok(c)
    });
    let mut compressor = match compressor {
        Ok(c) => c,
        Err(source) => {
            let _ = results.send(Err(WriteError::Compress { block: 0, source }));
            return;
        }
    };
    let mut scratch = Vec::new();
    let mut zbuf = Vec::with_capacity(zstd::zstd_safe::compress_bound(block_size));
    while let Some(seq) = shared.take_job() {
        let batch = compress_batch(shared, seq, &mut compressor, &mut scratch, &mut zbuf);
        let failed = batch.is_err();
        if results.send(batch).is_err() || failed {
            return;
        }
    }
}

/// Where staged storage blocks go: the I/O thread's inbox, and the
/// buffers it hands back.
struct Staging {
    buffer: Vec<u8>,
    to_io: mpsc::SyncSender<(Vec<u8>, u64)>,
    from_io: mpsc::Receiver<Vec<u8>>,
    next_offset: u64,
    storage: Vec<StorageEntry>,
}

impl Staging {
    /// Pads the staging buffer and hands it to the I/O thread. Returns
    /// `false` when the I/O thread has stopped (its error says why).
    fn flush(&mut self) -> bool {
        if self.buffer.is_empty() {
            return true;
        }
        let stored_len = self.buffer.len() as u32;
        let entry = StorageEntry {
            file_offset: self.next_offset,
            stored_len,
        };
        self.buffer.resize(entry.padded_len() as usize, 0);
        let Ok(mut next) = self.from_io.recv() else {
            return false;
        };
        next.clear();
        let full = std::mem::replace(&mut self.buffer, next);
        if self.to_io.send((full, entry.file_offset)).is_err() {
            return false;
        }
        self.next_offset += entry.padded_len();
        self.storage.push(entry);
        true
    }
}

/// Asks the kernel to start writing `len` bytes at `offset` back to disk
/// now, without waiting, so the final fsync has little left to flush and
/// disk writes overlap compression. Only a hint: failures are ignored.
fn start_writeback(file: &File, offset: u64, len: usize) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range only reads its integer arguments; `file`
    // keeps the descriptor open for the duration of the call.
    let rc = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
    if rc != 0 {
        log::debug!(
            "sync_file_range failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Output of the data phase.
struct DataOutcome {
    storage: Vec<StorageEntry>,
    entries: Vec<BlockEntry>,
    stats: WriteStats,
    index_offset: u64,
}

/// Compresses and writes every memory block after the header.
fn write_data(
    file: &File,
    header: &Header,
    map: &BlockMap,
    source: &dyn MemorySource,
    options: &WriterOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<DataOutcome, WriteError> {
    let threads = match options.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n.min(MAX_THREADS),
    };
    let block_size = header.memory_block_size as usize;
    let blocks_per_batch = (BATCH_BYTES / block_size).max(1);
    let block_count = map.block_count();
    let shared = Shared {
        source,
        map,
        layered: header.is_layered(),
        checksum: header.checksum,
        level: options.level,
        blocks_per_batch,
        batches: block_count.div_ceil(blocks_per_batch),
        window: 2 * threads,
        schedule: Mutex::new(Schedule {
            next: 0,
            consumed: 0,
            abort: false,
        }),
        wake: Condvar::new(),
        spare_buffers: Mutex::new(Vec::new()),
    };
    let staging_cap = align_up(u64::from(header.storage_block_size)) as usize;

    std::thread::scope(|scope| {
        let _abort = AbortOnDrop(&shared);
        let (result_tx, result_rx) = mpsc::channel();
        for _ in 0..threads {
            let tx = result_tx.clone();
            let shared = &shared;
            scope.spawn(move || compression_thread(shared, tx));
        }
        drop(result_tx);

        let (to_io, io_inbox) = mpsc::sync_channel::<(Vec<u8>, u64)>(1);
        let (io_return, from_io) = mpsc::channel::<Vec<u8>>();
        let _ = io_return.send(Vec::with_capacity(staging_cap));
        let io = scope.spawn(move || -> Result<(), WriteError> {
            for (storage_block, (buf, offset)) in io_inbox.into_iter().enumerate() {
                file.write_all_at(&buf, offset)
                    .map_err(|source| WriteError::WriteStorage {
                        storage_block,
                        offset,
                        source,
                    })?;
                start_writeback(file, offset, buf.len());
                // The placing loop may have finished; nothing to hand back to.
                let _ = io_return.send(buf);
            }
            Ok(())
        });

        let mut staging = Staging {
            buffer: Vec::with_capacity(staging_cap),
            to_io,
            from_io,
            next_offset: header.data_offset(),
            storage: Vec::new(),
        };
        let placed = place_batches(&shared, &result_rx, &mut staging, header, progress);
        // Closing the inbox lets the I/O thread finish the queued writes.
        let Staging {
            storage,
            next_offset,
            to_io,
            ..
        } = staging;
        drop(to_io);
        let io_result = io.join().map_err(|_| WriteError::JoinThread)?;
        // An I/O error explains a placing failure, so it goes first.
        io_result?;
        let (entries, stats) = placed?;
        Ok(DataOutcome {
            storage,
            entries,
            stats,
            index_offset: next_offset,
        })
    })
}

/// Receives compressed batches, puts them in block order into storage
/// blocks, and hands full storage blocks to the I/O thread.
fn place_batches(
    shared: &Shared<'_>,
    results: &mpsc::Receiver<Result<Batch, WriteError>>,
    staging: &mut Staging,
    header: &Header,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(Vec<BlockEntry>, WriteStats), WriteError> {
    let storage_cap = header.storage_block_size as usize;
    let mut entries = Vec::with_capacity(shared.map.block_count());
    let mut stats = WriteStats::default();
    let mut pending: BTreeMap<usize, Batch> = BTreeMap::new();
    let mut next_seq = 0;
    let mut done = 0u64;
    progress(0, header.memory_bytes);
    while next_seq < shared.batches {
        let batch = match pending.remove(&next_seq) {
            Some(batch) => batch,
            None => {
                let batch = results.recv().map_err(|_| WriteError::JoinThread)??;
                if batch.seq != next_seq {
                    pending.insert(batch.seq, batch);
                    continue;
                }
                batch
            }
        };
        let mut at = 0usize;
        for (i, &(kind, crc, stored_len)) in batch.blocks.iter().enumerate() {
            let entry = match kind {
                BlockKind::Zero => {
                    stats.zero_blocks += 1;
                    BlockEntry::ZERO
                }
                BlockKind::Parent => {
                    stats.parent_blocks += 1;
                    BlockEntry::PARENT
                }
                BlockKind::Raw | BlockKind::Zstd => {
                    let len = stored_len as usize;
                    if staging.buffer.len() + len > storage_cap && !staging.flush() {
                        return Err(WriteError::JoinThread);
                    }
                    let entry = BlockEntry {
                        kind,
                        storage_block: staging.storage.len() as u32,
                        offset: staging.buffer.len() as u32,
                        stored_len,
                        crc,
                    };
                    staging.buffer.extend_from_slice(&batch.data[at..at + len]);
                    at += len;
                    stats.bytes_stored += u64::from(stored_len);
                    if kind == BlockKind::Raw {
                        stats.raw_blocks += 1;
                    } else {
                        stats.zstd_blocks += 1;
                    }
                    entry
                }
            };
            debug_assert_eq!(entries.len(), batch.first_block + i);
            entries.push(entry);
        }
        done += batch.bytes_in;
        stats.bytes_in += batch.bytes_in;
        shared
            .spare_buffers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(batch.data);
        shared.mark_consumed();
        next_seq += 1;
        progress(done, header.memory_bytes);
    }
    if !staging.flush() {
        return Err(WriteError::JoinThread);
    }
    Ok((entries, stats))
}

/// A temporary file beside the target, removed unless committed.
struct TempFile {
    path: PathBuf,
    file: File,
    committed: bool,
}

impl TempFile {
    fn create(target: &Path) -> Result<Self, WriteError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let name = target.file_name().ok_or_else(|| WriteError::CheckOutput {
            path: target.to_path_buf(),
        })?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let temp_name = format!(".{}.{}.{n}.tmp", name.to_string_lossy(), std::process::id());
        let path = target.with_file_name(temp_name);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| WriteError::CreateTemp {
                path: path.clone(),
                source,
            })?;
        Ok(TempFile {
            path,
            file,
            committed: false,
        })
    }

    /// Syncs the file, renames it over `target`, and syncs the directory so
    /// the rename itself survives a crash.
    fn commit(mut self, target: &Path) -> Result<(), WriteError> {
        self.file
            .sync_all()
            .map_err(|source| WriteError::SyncFile {
                path: self.path.clone(),
                source,
            })?;
        fs::rename(&self.path, target).map_err(|source| WriteError::Rename {
            from: self.path.clone(),
            to: target.to_path_buf(),
            source,
        })?;
        self.committed = true;
        let dir = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| WriteError::SyncDir { dir, source })
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed {
            if let Err(err) = fs::remove_file(&self.path) {
                log::warn!(
                    "cannot remove temporary file {}: {err}",
                    self.path.display()
                );
            }
        }
    }
}

/// Writes a checkpoint of `source` to `path`.
///
/// `progress(done, total)` is called on this thread with guest memory bytes
/// processed so far and in all, first with `done == 0` and last with
/// `done == total`.
pub fn write_checkpoint(
    path: &Path,
    source: &dyn MemorySource,
    options: &WriterOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<WriteStats, WriteError> {
    let start = Instant::now();
    let levels = zstd::compression_level_range();
    if !levels.contains(&options.level) {
        return Err(WriteError::CheckOptions {
            reason: format!(
                "zstd level {} is outside {}..={}",
                options.level,
                levels.start(),
                levels.end()
            ),
        });
    }
    if !valid_memory_block_size(options.memory_block_size) {
        return Err(WriteError::CheckOptions {
            reason: format!(
                "memory block size {} is not a power of two from 4 KiB to 2 MiB",
                options.memory_block_size
            ),
        });
    }
    if !valid_storage_block_size(options.storage_block_size, options.memory_block_size) {
        return Err(WriteError::CheckOptions {
            reason: format!(
                "storage block size {} is not a multiple of 4 KiB from the memory block size ({}) to 64 MiB",
                options.storage_block_size, options.memory_block_size
            ),
        });
    }
    let header = Header::new_with(
        options.memory_block_size,
        options.storage_block_size,
        source.regions(),
        options.parent_index_crc,
        options.checksum,
    )
    .map_err(WriteError::BuildHeader)?;
    let map = BlockMap::new(&header.regions, header.memory_block_size);
    let temp = TempFile::create(path)?;

    let mut head = header.encode();
    head.resize(header.data_offset() as usize, 0);
    temp.file
        .write_all_at(&head, 0)
        .map_err(WriteError::WriteHeader)?;

    let data = write_data(&temp.file, &header, &map, source, options, progress)?;

    let mut index = Vec::with_capacity(
        data.storage.len() * STORAGE_ENTRY_LEN + data.entries.len() * BLOCK_ENTRY_LEN,
    );
    for s in &data.storage {
        s.encode_into(&mut index);
    }
    for e in &data.entries {
        e.encode_into(&mut index);
    }
    let footer = Footer {
        index_offset: data.index_offset,
        index_len: index.len() as u64,
        storage_blocks: data.storage.len() as u64,
        memory_blocks: data.entries.len() as u64,
        header_crc: header.crc,
        index_crc: crc32c::crc32c(&index),
    };
    index.extend_from_slice(&footer.encode());
    temp.file
        .write_all_at(&index, data.index_offset)
        .map_err(|source| WriteError::WriteIndex {
            offset: data.index_offset,
            source,
        })?;
    temp.commit(path)?;

    let mut stats = data.stats;
    stats.storage_blocks = data.storage.len() as u64;
    stats.file_bytes = data.index_offset + index.len() as u64;
    stats.elapsed = start.elapsed();
    log::info!(
        "wrote checkpoint {}: {} bytes of memory in {} bytes",
        path.display(),
        stats.bytes_in,
        stats.file_bytes
    );
    Ok(stats)
}

/// Writes the memory `chain` resolves to (a checkpoint, or the newest
/// layer of a chain opened with [`Reader::open_chain`]) into `out` as one
/// plain, self-contained checkpoint with the same regions and memory block
/// size.
///
/// From `options` only the storage block size (raised to the memory block
/// size when smaller), the level and the threads are used: the memory
/// block size is the chain's and the output has no parent. Blocks the
/// chain resolves to zero are not read. `out` may name one of the chain's
/// files: the new file replaces it only once complete, and the chain reads
/// through descriptors it already holds.
pub fn flatten(
    chain: &Reader,
    out: &Path,
    options: &WriterOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<WriteStats, WriteError> {
    if let Some(layer) = chain.layers().last() {
        if layer.header().is_layered() {
            return Err(WriteError::CheckChain {
                path: layer.path().to_path_buf(),
            });
        }
    }
    let memory_block_size = chain.header().memory_block_size;
    let options = WriterOptions {
        memory_block_size,
        storage_block_size: options.storage_block_size.max(memory_block_size),
        parent_index_crc: None,
        ..*options
    };
    write_checkpoint(out, &ReaderSource::new(chain), &options, progress)
}

/// Copies the layered checkpoint `from` to `to` (a new file), naming
/// another parent: the one whose index CRC is `parent_index_crc`. Blocks
/// and index are copied unchanged, so the copy keeps its index CRC and
/// the layers written on top of it stay valid; only the header's parent
/// CRC, the header CRC and the footer that binds to it change. For a
/// parent rewritten with the same content (a chain merged below a layer).
pub fn rebase_layer(from: &Path, to: &Path, parent_index_crc: u32) -> std::io::Result<()> {
    let invalid = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
    let reader = Reader::open(from).map_err(|e| invalid(crate::error_chain(&e)))?;
    let old = reader.header();
    if !old.is_layered() {
        return Err(invalid(format!("{} is not a layer on a parent checkpoint", from.display())));
    }
    let header = Header::new_with(
        old.memory_block_size,
        old.storage_block_size,
        old.regions.clone(),
        Some(parent_index_crc),
        old.checksum,
    )
    .map_err(|e| invalid(e.to_string()))?;
    let mut src = File::open(from)?;
    let len = src.metadata()?.len();
    let footer_at = len - FOOTER_LEN as u64;
    let mut foot = [0u8; FOOTER_LEN];
    src.read_exact_at(&mut foot, footer_at)?;
    let mut footer = Footer::decode(&foot, footer_at, old, reader.block_count() as u64)
        .map_err(|e| invalid(e.to_string()))?;
    footer.header_crc = header.crc;
    let mut dst = OpenOptions::new().write(true).create_new(true).open(to)?;
    std::io::copy(&mut src, &mut dst)?;
    dst.write_all_at(&header.encode(), 0)?;
    dst.write_all_at(&footer.encode(), footer_at)?;
    dst.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::source::ImageSource;

    fn mixed_image(len: usize) -> Vec<u8> {
        let mut image = vec![0u8; len];
        // Text-like (compressible) bytes in the first quarter.
        for (i, b) in image[..len / 4].iter_mut().enumerate() {
            *b = b"stasis checkpoint "[i % 18];
        }
        // Pseudo-random (incompressible) bytes in the third quarter.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for b in &mut image[len / 2..3 * len / 4] {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        image
    }

    /// Writes `image` to `path` with [`small_options`].
    fn write_small(path: &Path, image: &[u8]) -> WriteStats {
        write_checkpoint(
            path,
            &ImageSource::flat(image),
            &small_options(),
            &mut |_, _| {},
        )
        .expect("writes")
    }

    fn small_options() -> WriterOptions {
        WriterOptions {
            memory_block_size: 4096,
            storage_block_size: 16384,
            level: 1,
            threads: 2,
            parent_index_crc: None,
            ..WriterOptions::default()
        }
    }

    #[test]
    fn is_zero_finds_a_single_set_byte_anywhere() {
        let mut buf = vec![0u8; 5000];
        assert!(is_zero(&buf));
        for pos in [0, 511, 512, 4999] {
            buf[pos] = 1;
            assert!(!is_zero(&buf), "byte {pos}");
            buf[pos] = 0;
        }
    }

    #[test]
    fn write_counts_zero_raw_and_zstd_blocks() {
        let image = mixed_image(64 * 4096);
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("ckpt");
        let stats = write_small(&path, &image);
        assert_eq!(stats.zstd_blocks, 16);
        assert_eq!(stats.raw_blocks, 16);
        assert_eq!(stats.zero_blocks, 32);
        assert_eq!(stats.bytes_in, image.len() as u64);
        assert_eq!(stats.file_bytes, fs::metadata(&path).expect("exists").len());
    }

    #[test]
    fn write_reports_progress_up_to_the_total() {
        let image = mixed_image(3 << 20);
        let dir = tempfile::tempdir().expect("temp dir");
        let mut calls = Vec::new();
        write_checkpoint(
            &dir.path().join("ckpt"),
            &ImageSource::flat(&image),
            &WriterOptions::default(),
            &mut |done, total| calls.push((done, total)),
        )
        .expect("writes");
        assert_eq!(calls.first(), Some(&(0, 3 << 20)));
        assert_eq!(calls.last(), Some(&(3 << 20, 3 << 20)));
        assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0));
    }

    #[test]
    fn write_puts_storage_blocks_at_aligned_offsets() {
        let image = mixed_image(64 * 4096);
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("ckpt");
        let stats = write_small(&path, &image);
        let reader = crate::checkpoint::reader::Reader::open(&path).expect("opens");
        assert_eq!(reader.storage_block_count() as u64, stats.storage_blocks);
        for i in 0..reader.storage_block_count() {
            assert_eq!(reader.storage_block_offset(i).expect("exists") % 4096, 0);
        }
    }

    #[test]
    fn write_leaves_no_temporary_file_behind() {
        let image = mixed_image(16 * 4096);
        let dir = tempfile::tempdir().expect("temp dir");
        write_small(&dir.path().join("ckpt"), &image);
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("lists")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("ckpt")]);
    }

    /// A source whose block `fail_at` cannot be read.
    struct FailingSource {
        image: Vec<u8>,
        fail_at: u64,
    }

    impl MemorySource for FailingSource {
        fn regions(&self) -> Vec<crate::checkpoint::format::Region> {
            ImageSource::flat(&self.image).regions()
        }

        fn block<'a>(
            &'a self,
            region: usize,
            offset: u64,
            len: usize,
            _scratch: &'a mut Vec<u8>,
        ) -> Result<&'a [u8], SourceError> {
            if offset == self.fail_at {
                return Err(SourceError::CheckRange {
                    region,
                    offset,
                    end: offset,
                });
            }
            Ok(&self.image[offset as usize..offset as usize + len])
        }
    }

    #[test]
    fn failed_write_keeps_the_old_target_and_removes_the_temporary() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("ckpt");
        fs::write(&path, b"old").expect("write old");
        // Fail late, after several storage blocks went to the I/O thread.
        let source = FailingSource {
            image: mixed_image(1024 * 4096),
            fail_at: 900 * 4096,
        };
        let err = write_checkpoint(&path, &source, &small_options(), &mut |_, _| {})
            .expect_err("the source fails");
        assert!(
            matches!(err, WriteError::ReadSource { block: 900, .. }),
            "{err:?}"
        );
        assert_eq!(fs::read(&path).expect("old target"), b"old");
        assert_eq!(fs::read_dir(dir.path()).expect("lists").count(), 1);
    }

    #[test]
    fn write_refuses_overlapping_regions() {
        let dir = tempfile::tempdir().expect("temp dir");
        let bytes = [1u8; 8192];
        let source = ImageSource::new(vec![(0, &bytes[..]), (4096, &bytes[..])]);
        let err = write_checkpoint(
            &dir.path().join("ckpt"),
            &source,
            &small_options(),
            &mut |_, _| {},
        );
        assert!(matches!(err, Err(WriteError::BuildHeader(_))));
    }

    #[test]
    fn write_refuses_an_out_of_range_level_and_block_size() {
        let image = [0u8; 4096];
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("ckpt");
        let bad_level = WriterOptions {
            level: 1000,
            ..WriterOptions::default()
        };
        let err = write_checkpoint(
            &path,
            &ImageSource::flat(&image),
            &bad_level,
            &mut |_, _| {},
        );
        assert!(matches!(err, Err(WriteError::CheckOptions { .. })));
        let bad_block = WriterOptions {
            memory_block_size: 3000,
            ..WriterOptions::default()
        };
        let err = write_checkpoint(
            &path,
            &ImageSource::flat(&image),
            &bad_block,
            &mut |_, _| {},
        );
        assert!(matches!(err, Err(WriteError::CheckOptions { .. })));
        assert!(!path.exists());
    }

    #[test]
    fn write_into_a_missing_directory_names_the_temporary_file() {
        let image = [7u8; 4096];
        let err = write_checkpoint(
            Path::new("/nonexistent-stasis-dir/ckpt"),
            &ImageSource::flat(&image),
            &WriterOptions::default(),
            &mut |_, _| {},
        )
        .expect_err("no such directory");
        assert!(matches!(err, WriteError::CreateTemp { .. }));
    }
}
