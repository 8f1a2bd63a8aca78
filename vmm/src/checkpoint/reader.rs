//! The checkpoint reader: validates a file up front, then serves memory
//! blocks at random (for a userfaultfd handler) or in order (for an eager
//! restore).
//!
//! [`Reader::open`] reads and checks the header, the footer and the whole
//! index (layout in [`super::format`]) before it returns, so every later
//! read only has to check the data it reads: the block's CRC-32C.
//!
//! Random reads go through a small LRU cache of storage blocks as stored
//! on disk (still compressed). A fault reads the whole storage block
//! holding its memory block once; faults on its neighbours then only
//! decompress. Decompressed blocks are not cached: a restore copies the
//! whole memory block into the guest on the first fault, so the same
//! block is not asked for twice. With a cache of 0 storage blocks, a read
//! fetches only the requested block's stored bytes.
//!
//! A `Reader` is `Send + Sync` and every method takes `&self`, so one
//! reader can serve a fault-handling thread and others at once.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use super::format::{
    align_up, decode_index, BlockEntry, BlockKind, BlockMap, Footer, FormatError, Header, Region,
    StorageEntry, ALIGN, FOOTER_LEN, HEADER_FIXED_LEN,
};

/// Number of a memory block, counted across all regions.
pub type BlockIndex = usize;

/// Most threads [`Reader::read_all_parallel`] starts.
pub const MAX_THREADS: usize = 256;

/// Default number of storage blocks the random-access cache keeps.
pub const DEFAULT_CACHED_STORAGE_BLOCKS: usize = 8;

/// Errors of the checkpoint reader. Errors about one block name the block
/// and the file offset of its stored bytes.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Opening the file or reading its metadata failed.
    #[error("cannot open {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Opening the file again with O_DIRECT failed.
    #[error("cannot open {path} with O_DIRECT")]
    OpenDirect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The path is not a regular file.
    #[error("{path} is {what}, not a checkpoint file")]
    CheckFileType { path: PathBuf, what: &'static str },
    /// The file ends before the part that must be there.
    #[error("{path} is truncated: it is {len} bytes but its {part} needs {needed}")]
    CheckLength {
        path: PathBuf,
        len: u64,
        part: &'static str,
        needed: u64,
    },
    /// Reading the header, footer or index failed.
    #[error("cannot read the {part} of {path} at offset {offset}")]
    ReadMetadata {
        path: PathBuf,
        part: &'static str,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    /// The header, footer or index is damaged or not a checkpoint's.
    #[error("{path} is not a valid checkpoint")]
    Decode {
        path: PathBuf,
        #[source]
        source: FormatError,
    },
    /// The block number is past the last block.
    #[error("block {block} does not exist (the checkpoint has {count} blocks)")]
    FindBlock { block: BlockIndex, count: usize },
    /// The caller's buffer cannot hold the block.
    #[error("buffer of {len} bytes is too small for block {block} of {needed} bytes")]
    CheckBuffer {
        block: BlockIndex,
        len: usize,
        needed: usize,
    },
    /// Reading a block's stored bytes failed.
    #[error("cannot read block {block} (storage block {storage_block}) at offset {offset}")]
    ReadBlock {
        block: BlockIndex,
        storage_block: u32,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    /// Decompressing a block failed.
    #[error("cannot decompress block {block} at offset {offset}")]
    Decompress {
        block: BlockIndex,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    /// A block decompressed to the wrong length.
    #[error("block {block} at offset {offset} decompressed to {got} bytes instead of {expected}")]
    CheckDecompressedLength {
        block: BlockIndex,
        offset: u64,
        got: usize,
        expected: usize,
    },
    /// A block's content does not match its checksum.
    #[error("checksum mismatch in block {block} at offset {offset}: index says {stored:#010x}, data gives {computed:#010x}")]
    CheckCrc {
        block: BlockIndex,
        offset: u64,
        stored: u32,
        computed: u32,
    },
    /// The caller's sink refused a block during a parallel read.
    #[error("cannot store block {block}")]
    Sink {
        block: BlockIndex,
        #[source]
        source: SinkError,
    },
    /// A parallel reader thread panicked.
    #[error("a reader thread stopped unexpectedly")]
    JoinThread,
}

/// What a sink of [`Reader::read_all_parallel`] may fail with.
pub type SinkError = Box<dyn std::error::Error + Send + Sync>;

/// Where [`Reader::read_all_parallel`] delivers blocks, from any thread.
pub type BlockSink<'a> = dyn Fn(&BlockInfo, &[u8]) -> Result<(), SinkError> + Sync + 'a;

/// How a reader serves random reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReaderOptions {
    /// Storage blocks kept in the cache. 0 disables the cache: a read then
    /// fetches only the requested block's stored bytes.
    pub cached_storage_blocks: usize,
    /// Read block data with `O_DIRECT`, bypassing the page cache (the
    /// header, footer and index are still read through it). Reads are
    /// widened to 4 KiB boundaries, which the format guarantees for
    /// storage blocks. The file system must support `O_DIRECT`.
    pub direct_io: bool,
}

impl Default for ReaderOptions {
    fn default() -> Self {
        ReaderOptions {
            cached_storage_blocks: DEFAULT_CACHED_STORAGE_BLOCKS,
            direct_io: false,
        }
    }
}

/// Where and how one memory block is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BlockInfo {
    /// Block number.
    pub index: BlockIndex,
    /// Zero, raw or zstd.
    pub kind: BlockKind,
    /// Guest-physical address of the block's first byte.
    pub guest_addr: u64,
    /// Decompressed length (the memory block size, or less for the last
    /// block of a region).
    pub len: usize,
    /// Stored length (0 for zero blocks).
    pub stored_len: u32,
    /// Storage block holding it (0 for zero blocks).
    pub storage_block: u32,
    /// File offset of the stored bytes (0 for zero blocks).
    pub file_offset: u64,
    /// CRC-32C of the decompressed content (0 for zero blocks).
    pub crc: u32,
}

/// Counts for `inspect`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Format version, "major.minor".
    pub version: String,
    /// Memory block size in bytes.
    pub memory_block_size: u32,
    /// Storage block size in bytes.
    pub storage_block_size: u32,
    /// Guest memory regions.
    pub regions: Vec<Region>,
    /// Guest memory bytes.
    pub memory_bytes: u64,
    /// Memory blocks in all.
    pub blocks: usize,
    /// Memory blocks elided as zero.
    pub zero_blocks: usize,
    /// Memory blocks stored raw.
    pub raw_blocks: usize,
    /// Memory blocks stored compressed.
    pub zstd_blocks: usize,
    /// Storage blocks.
    pub storage_blocks: usize,
    /// Bytes of stored blocks, padding excluded.
    pub stored_bytes: u64,
    /// File length.
    pub file_bytes: u64,
    /// Guest memory bytes per file byte.
    pub compression_ratio: f64,
}

/// One page of an I/O buffer, aligned as `O_DIRECT` needs.
#[repr(C, align(4096))]
#[derive(Clone, Copy)]
struct Page([u8; ALIGN as usize]);

// Page must be exactly its bytes, no padding, for IoBuf's byte views.
const _: () = assert!(std::mem::size_of::<Page>() == ALIGN as usize);

/// A page-aligned buffer holding `len` bytes of file data at `skip`.
#[derive(Default)]
struct IoBuf {
    pages: Vec<Page>,
    skip: usize,
    len: usize,
}

impl IoBuf {
    /// The whole buffer as bytes.
    fn all_mut(&mut self) -> &mut [u8] {
        let len = self.pages.len() * ALIGN as usize;
        // SAFETY: Page is repr(C) around a byte array with no padding (size
        // asserted above), so the Vec's pages are `len` initialised,
        // contiguous bytes, exclusively borrowed through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.pages.as_mut_ptr().cast::<u8>(), len) }
    }

    /// The data bytes.
    fn bytes(&self) -> &[u8] {
        let len = self.pages.len() * ALIGN as usize;
        // SAFETY: as in `all_mut`, with a shared borrow of `self`.
        let all = unsafe { std::slice::from_raw_parts(self.pages.as_ptr().cast::<u8>(), len) };
        &all[self.skip..self.skip + self.len]
    }
}

/// Small LRU cache of storage blocks as stored.
#[derive(Default)]
struct Cache {
    tick: u64,
    slots: Vec<(u32, u64, Arc<IoBuf>)>,
}

/// Reusable decompression state.
struct Scratch {
    dctx: zstd::bulk::Decompressor<'static>,
    buf: IoBuf,
}

/// An open, validated checkpoint file.
pub struct Reader {
    file: File,
    /// The same file opened with O_DIRECT, when asked for.
    direct: Option<File>,
    path: PathBuf,
    file_len: u64,
    header: Header,
    map: BlockMap,
    storage: Vec<StorageEntry>,
    entries: Vec<BlockEntry>,
    options: ReaderOptions,
    cache: Mutex<Cache>,
    scratch: Mutex<Vec<Scratch>>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("path", &self.path)
            .field("blocks", &self.entries.len())
            .finish_non_exhaustive()
    }
}

impl Reader {
    /// Opens and validates a checkpoint with default options.
    pub fn open(path: &Path) -> Result<Self, ReadError> {
        Self::open_with(path, ReaderOptions::default())
    }

    /// Opens and validates a checkpoint.
    pub fn open_with(path: &Path, options: ReaderOptions) -> Result<Self, ReadError> {
        let file = File::open(path).map_err(|source| ReadError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_file(file, path.to_path_buf(), options)
    }

    /// Validates an already open file; `path` only names it in errors.
    pub fn from_file(file: File, path: PathBuf, options: ReaderOptions) -> Result<Self, ReadError> {
        let meta = file.metadata().map_err(|source| ReadError::Open {
            path: path.clone(),
            source,
        })?;
        let direct = if options.direct_io && meta.is_file() {
            // Reopen through /proc so that callers holding only a File can
            // still ask for O_DIRECT.
            let fd_path = format!("/proc/self/fd/{}", file.as_raw_fd());
            let direct = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(fd_path)
                .map_err(|source| ReadError::OpenDirect {
                    path: path.clone(),
                    source,
                })?;
            Some(direct)
        } else {
            None
        };
        if meta.is_dir() {
            return Err(ReadError::CheckFileType {
                path,
                what: "a directory",
            });
        }
        if !meta.is_file() {
            return Err(ReadError::CheckFileType {
                path,
                what: "not a regular file",
            });
        }
        let file_len = meta.len();
        let decode = |path: &Path, source| ReadError::Decode {
            path: path.to_path_buf(),
            source,
        };
        let read_at = |path: &Path, part, offset, buf: &mut [u8]| {
            file.read_exact_at(buf, offset)
                .map_err(|source| ReadError::ReadMetadata {
                    path: path.to_path_buf(),
                    part,
                    offset,
                    source,
                })
        };

        if file_len < HEADER_FIXED_LEN as u64 {
            return Err(ReadError::CheckLength {
                path,
                len: file_len,
                part: "header",
                needed: HEADER_FIXED_LEN as u64,
            });
        }
        let mut fixed = [0u8; HEADER_FIXED_LEN];
        read_at(&path, "header", 0, &mut fixed)?;
        // Bounded by MAX_HEADER_LEN in decode_len.
        let header_len = Header::decode_len(&fixed).map_err(|e| decode(&path, e))?;
        if file_len < header_len as u64 {
            return Err(ReadError::CheckLength {
                path,
                len: file_len,
                part: "header",
                needed: header_len as u64,
            });
        }
        let mut head = vec![0u8; header_len];
        read_at(&path, "header", 0, &mut head)?;
        let header = Header::decode(&head).map_err(|e| decode(&path, e))?;

        let min_len = header.data_offset() + FOOTER_LEN as u64;
        if file_len < min_len {
            return Err(ReadError::CheckLength {
                path,
                len: file_len,
                part: "header page and footer",
                needed: min_len,
            });
        }
        let footer_offset = file_len - FOOTER_LEN as u64;
        let mut foot = [0u8; FOOTER_LEN];
        read_at(&path, "footer", footer_offset, &mut foot)?;
        let map = BlockMap::new(&header.regions, header.memory_block_size);
        let footer = Footer::decode(&foot, footer_offset, &header, map.block_count() as u64)
            .map_err(|e| decode(&path, e))?;

        // Footer::decode checked index_offset + index_len == footer_offset,
        // so this allocation is bounded by the file's real length.
        let mut index = vec![0u8; footer.index_len as usize];
        read_at(&path, "index", footer.index_offset, &mut index)?;
        let (storage, entries) =
            decode_index(&index, &header, &footer, &map).map_err(|e| decode(&path, e))?;

        Ok(Reader {
            file,
            direct,
            path,
            file_len,
            header,
            map,
            storage,
            entries,
            options,
            cache: Mutex::new(Cache::default()),
            scratch: Mutex::new(Vec::new()),
        })
    }

    /// Reads `len` bytes of block data at `offset` into `buf`, widened to
    /// page boundaries with O_DIRECT. `len` is bounded by the storage block
    /// size, checked at open.
    fn read_data(&self, offset: u64, len: usize, buf: &mut IoBuf) -> std::io::Result<()> {
        let (start, end, file) = match &self.direct {
            Some(direct) => (
                offset / ALIGN * ALIGN,
                align_up(offset + len as u64),
                direct,
            ),
            None => (offset, offset + len as u64, &self.file),
        };
        let span = (end - start) as usize;
        buf.pages
            .resize(span.div_ceil(ALIGN as usize), Page([0; ALIGN as usize]));
        file.read_exact_at(&mut buf.all_mut()[..span], start)?;
        buf.skip = (offset - start) as usize;
        buf.len = len;
        Ok(())
    }

    /// The file's path, as given.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The decoded header: version, block sizes, regions.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Number of memory blocks.
    pub fn block_count(&self) -> usize {
        self.entries.len()
    }

    /// Number of storage blocks.
    pub fn storage_block_count(&self) -> usize {
        self.storage.len()
    }

    /// File offset of storage block `i`.
    pub fn storage_block_offset(&self, i: usize) -> Option<u64> {
        self.storage.get(i).map(|s| s.file_offset)
    }

    /// The memory block holding guest-physical address `gpa`.
    pub fn block_of(&self, gpa: u64) -> Option<BlockIndex> {
        self.map.block_of(gpa)
    }

    /// Where and how block `block` is stored.
    pub fn block_info(&self, block: BlockIndex) -> Option<BlockInfo> {
        let entry = self.entries.get(block)?;
        let (_, _, len) = self.map.locate(block);
        let file_offset = match entry.kind {
            BlockKind::Zero => 0,
            _ => self.storage[entry.storage_block as usize].file_offset + u64::from(entry.offset),
        };
        Some(BlockInfo {
            index: block,
            kind: entry.kind,
            guest_addr: self.map.guest_addr(block),
            len,
            stored_len: entry.stored_len,
            storage_block: entry.storage_block,
            file_offset,
            crc: entry.crc,
        })
    }

    /// Counts of blocks by kind, sizes and ratio.
    pub fn summary(&self) -> Summary {
        let count = |k| self.entries.iter().filter(|e| e.kind == k).count();
        let stored_bytes = self.entries.iter().map(|e| u64::from(e.stored_len)).sum();
        Summary {
            version: format!(
                "{}.{}",
                self.header.version_major, self.header.version_minor
            ),
            memory_block_size: self.header.memory_block_size,
            storage_block_size: self.header.storage_block_size,
            regions: self.header.regions.clone(),
            memory_bytes: self.header.memory_bytes,
            blocks: self.entries.len(),
            zero_blocks: count(BlockKind::Zero),
            raw_blocks: count(BlockKind::Raw),
            zstd_blocks: count(BlockKind::Zstd),
            storage_blocks: self.storage.len(),
            stored_bytes,
            file_bytes: self.file_len,
            compression_ratio: self.header.memory_bytes as f64 / self.file_len as f64,
        }
    }

    /// Reads block `block`, decompressed and checksum-verified, into the
    /// start of `buf`, and returns that part of `buf`. `buf` must hold at
    /// least the block's length. On error, `buf`'s content is unspecified.
    pub fn read_block<'b>(
        &self,
        block: BlockIndex,
        buf: &'b mut [u8],
    ) -> Result<&'b [u8], ReadError> {
        let info = self.block_info(block).ok_or(ReadError::FindBlock {
            block,
            count: self.entries.len(),
        })?;
        if buf.len() < info.len {
            return Err(ReadError::CheckBuffer {
                block,
                len: buf.len(),
                needed: info.len,
            });
        }
        let out = &mut buf[..info.len];
        if info.kind == BlockKind::Zero {
            out.fill(0);
            return Ok(out);
        }
        if self.options.cached_storage_blocks > 0 {
            let storage = self.cached_storage_block(&info)?;
            let start =
                (info.file_offset - self.storage[info.storage_block as usize].file_offset) as usize;
            let stored = &storage.bytes()[start..start + info.stored_len as usize];
            self.with_scratch(&info, |s| decode_block(&info, stored, out, &mut s.dctx))?;
        } else if info.kind == BlockKind::Raw && self.direct.is_none() {
            // Straight into the caller's buffer: no copy.
            self.file
                .read_exact_at(out, info.file_offset)
                .map_err(|source| read_error(&info, info.file_offset, source))?;
            check_crc(&info, out)?;
        } else {
            self.with_scratch(&info, |s| {
                self.read_data(info.file_offset, info.stored_len as usize, &mut s.buf)
                    .map_err(|source| read_error(&info, info.file_offset, source))?;
                decode_block(&info, s.buf.bytes(), out, &mut s.dctx)
            })?;
        }
        Ok(out)
    }

    /// Empties the storage block cache, releasing its memory.
    pub fn clear_cache(&self) {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache.slots.clear();
    }

    /// A sequential reader of every block in order, reading each storage
    /// block once: the bulk path for an eager restore and for `verify`.
    pub fn sequential(&self) -> Sequential<'_> {
        self.sequential_range(0..self.entries.len())
    }

    /// A sequential reader of blocks `range` (clamped to the block count).
    pub fn sequential_range(&self, range: std::ops::Range<BlockIndex>) -> Sequential<'_> {
        Sequential {
            reader: self,
            next: range.start,
            end: range.end.min(self.entries.len()),
            loaded: None,
            storage_buf: IoBuf::default(),
            out: vec![0u8; self.header.memory_block_size as usize],
            zeros: vec![0u8; self.header.memory_block_size as usize],
            scratch: None,
        }
    }

    /// Reads every block on `threads` threads (0: one per core; at most
    /// [`MAX_THREADS`]) and hands
    /// each, decompressed and checked, to `sink` (zero blocks as zeros:
    /// check `kind` to skip them). Blocks arrive in no particular order.
    /// Work is split at storage block boundaries, so each storage block is
    /// read once. Stops at the first error any thread meets, which need not
    /// be the lowest-numbered bad block (use [`Reader::verify`] for that).
    pub fn read_all_parallel(&self, threads: usize, sink: &BlockSink<'_>) -> Result<(), ReadError> {
        let threads = match threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n.min(MAX_THREADS),
        };
        // Unit k runs from the first block stored in storage block k to the
        // first block of storage block k + 1; unit 0 starts at block 0.
        let mut starts = vec![0];
        let mut last_sb = 0;
        for (i, e) in self.entries.iter().enumerate() {
            if e.kind != BlockKind::Zero && e.storage_block != last_sb {
                last_sb = e.storage_block;
                starts.push(i);
            }
        }
        starts.push(self.entries.len());
        let next_unit = std::sync::atomic::AtomicUsize::new(0);
        let failure: Mutex<Option<ReadError>> = Mutex::new(None);
        let failed = std::sync::atomic::AtomicBool::new(false);
        let work = || {
            use std::sync::atomic::Ordering::Relaxed;
            while !failed.load(Relaxed) {
                let unit = next_unit.fetch_add(1, Relaxed);
                if unit + 1 >= starts.len() {
                    return;
                }
                let mut seq = self.sequential_range(starts[unit]..starts[unit + 1]);
                while let Some(block) = seq.next_block() {
                    let result = block.and_then(|(info, data)| {
                        sink(&info, data).map_err(|source| ReadError::Sink {
                            block: info.index,
                            source,
                        })
                    });
                    if let Err(err) = result {
                        failed.store(true, Relaxed);
                        failure
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .get_or_insert(err);
                        return;
                    }
                }
            }
        };
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..threads).map(|_| scope.spawn(work)).collect();
            handles
                .into_iter()
                .try_for_each(|h| h.join().map_err(|_| ReadError::JoinThread))
        })?;
        match failure.into_inner().unwrap_or_else(PoisonError::into_inner) {
            Some(err) => Err(err),
            None => Ok(()),
        }
    }

    /// Reads and checks every block; returns the number of blocks checked,
    /// or the first bad block's error.
    pub fn verify(&self) -> Result<usize, ReadError> {
        let mut seq = self.sequential();
        let mut checked = 0;
        while let Some(block) = seq.next_block() {
            block?;
            checked += 1;
        }
        Ok(checked)
    }

    /// The storage block holding `info`'s block, from the cache or the file.
    fn cached_storage_block(&self, info: &BlockInfo) -> Result<Arc<IoBuf>, ReadError> {
        let sb = info.storage_block;
        {
            let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            cache.tick += 1;
            let tick = cache.tick;
            if let Some(slot) = cache.slots.iter_mut().find(|s| s.0 == sb) {
                slot.1 = tick;
                return Ok(Arc::clone(&slot.2));
            }
        }
        // Read outside the lock so other threads' hits are not held up.
        let entry = self.storage[sb as usize];
        let mut data = IoBuf::default();
        self.read_data(entry.file_offset, entry.stored_len as usize, &mut data)
            .map_err(|source| read_error(info, entry.file_offset, source))?;
        let data = Arc::new(data);
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        cache.tick += 1;
        let tick = cache.tick;
        if cache.slots.len() < self.options.cached_storage_blocks {
            cache.slots.push((sb, tick, Arc::clone(&data)));
        } else if let Some(oldest) = cache.slots.iter_mut().min_by_key(|s| s.1) {
            *oldest = (sb, tick, Arc::clone(&data));
        }
        Ok(data)
    }

    /// Runs `f` with pooled decompression state.
    fn with_scratch<T>(
        &self,
        info: &BlockInfo,
        f: impl FnOnce(&mut Scratch) -> Result<T, ReadError>,
    ) -> Result<T, ReadError> {
        let mut scratch = self.take_scratch(info)?;
        let result = f(&mut scratch);
        self.return_scratch(scratch);
        result
    }

    /// Decompression state from the pool, or new.
    fn take_scratch(&self, info: &BlockInfo) -> Result<Scratch, ReadError> {
        let pooled = self
            .scratch
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        match pooled {
            Some(s) => Ok(s),
            None => Ok(Scratch {
                dctx: new_decompressor(info)?,
                buf: IoBuf::default(),
            }),
        }
    }

    fn return_scratch(&self, scratch: Scratch) {
        self.scratch
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(scratch);
    }
}

fn read_error(info: &BlockInfo, offset: u64, source: std::io::Error) -> ReadError {
    ReadError::ReadBlock {
        block: info.index,
        storage_block: info.storage_block,
        offset,
        source,
    }
}

fn new_decompressor(info: &BlockInfo) -> Result<zstd::bulk::Decompressor<'static>, ReadError> {
    zstd::bulk::Decompressor::new().map_err(|source| ReadError::Decompress {
        block: info.index,
        offset: info.file_offset,
        source,
    })
}

/// Checks `data` against the block's CRC.
fn check_crc(info: &BlockInfo, data: &[u8]) -> Result<(), ReadError> {
    let computed = crc32c::crc32c(data);
    if computed != info.crc {
        return Err(ReadError::CheckCrc {
            block: info.index,
            offset: info.file_offset,
            stored: info.crc,
            computed,
        });
    }
    Ok(())
}

/// Turns a block's stored bytes into its content in `out` (exactly the
/// block's length) and checks its CRC.
fn decode_block(
    info: &BlockInfo,
    stored: &[u8],
    out: &mut [u8],
    dctx: &mut zstd::bulk::Decompressor<'static>,
) -> Result<(), ReadError> {
    match info.kind {
        BlockKind::Zero => out.fill(0),
        BlockKind::Raw => out.copy_from_slice(stored),
        BlockKind::Zstd => {
            // The output is bounded by `out`: a frame claiming more fails.
            let got =
                dctx.decompress_to_buffer(stored, out)
                    .map_err(|source| ReadError::Decompress {
                        block: info.index,
                        offset: info.file_offset,
                        source,
                    })?;
            if got != out.len() {
                return Err(ReadError::CheckDecompressedLength {
                    block: info.index,
                    offset: info.file_offset,
                    got,
                    expected: out.len(),
                });
            }
        }
    }
    check_crc(info, out)
}

/// Reads every block in order; see [`Reader::sequential`].
pub struct Sequential<'r> {
    reader: &'r Reader,
    next: BlockIndex,
    end: BlockIndex,
    loaded: Option<u32>,
    storage_buf: IoBuf,
    out: Vec<u8>,
    zeros: Vec<u8>,
    /// Decompression state borrowed from the reader's pool.
    scratch: Option<Scratch>,
}

impl Drop for Sequential<'_> {
    fn drop(&mut self) {
        if let Some(scratch) = self.scratch.take() {
            self.reader.return_scratch(scratch);
        }
    }
}

impl Sequential<'_> {
    /// The next block's description and content (all zero for zero
    /// blocks: check `kind` to skip them), or `None` after the last block.
    /// After an error the next call moves on to the following block.
    pub fn next_block(&mut self) -> Option<Result<(BlockInfo, &[u8]), ReadError>> {
        if self.next >= self.end {
            return None;
        }
        let info = self.reader.block_info(self.next)?;
        self.next += 1;
        if info.kind == BlockKind::Zero {
            return Some(Ok((info, &self.zeros[..info.len])));
        }
        Some(self.load(&info).map(|()| (info, &self.out[..info.len])))
    }

    fn load(&mut self, info: &BlockInfo) -> Result<(), ReadError> {
        let entry = self.reader.storage[info.storage_block as usize];
        if self.loaded != Some(info.storage_block) {
            self.loaded = None;
            self.reader
                .read_data(
                    entry.file_offset,
                    entry.stored_len as usize,
                    &mut self.storage_buf,
                )
                .map_err(|source| read_error(info, entry.file_offset, source))?;
            self.loaded = Some(info.storage_block);
        }
        let start = (info.file_offset - entry.file_offset) as usize;
        let stored = &self.storage_buf.bytes()[start..start + info.stored_len as usize];
        let scratch = match &mut self.scratch {
            Some(s) => s,
            slot => slot.insert(self.reader.take_scratch(info)?),
        };
        decode_block(info, stored, &mut self.out[..info.len], &mut scratch.dctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::source::ImageSource;
    use crate::checkpoint::writer::{write_checkpoint, WriterOptions};

    /// Two regions with zero, text-like and random blocks.
    fn sample_regions() -> (Vec<u8>, Vec<u8>) {
        let mut low = vec![0u8; 40 * 4096 + 123];
        for (i, b) in low[4096..20 * 4096].iter_mut().enumerate() {
            *b = b"guest kernel text "[i % 18];
        }
        let mut x = 0x1234_5678_9abc_def1u64;
        for b in &mut low[24 * 4096..] {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let mut high = vec![0u8; 16 * 4096];
        high[5 * 4096 + 17] = 0xaa;
        (low, high)
    }

    fn write_sample(dir: &Path, options: &WriterOptions) -> (PathBuf, Vec<u8>, Vec<u8>) {
        let (low, high) = sample_regions();
        let path = dir.join("sample.ckpt");
        let source = ImageSource::new(vec![(0, &low[..]), (1 << 32, &high[..])]);
        write_checkpoint(&path, &source, options, &mut |_, _| {}).expect("writes");
        (path, low, high)
    }

    fn small() -> WriterOptions {
        WriterOptions {
            memory_block_size: 4096,
            storage_block_size: 3 * 4096,
            level: 3,
            threads: 2,
        }
    }

    fn expected_block(low: &[u8], high: &[u8], info: &BlockInfo) -> Vec<u8> {
        if info.guest_addr >= 1 << 32 {
            let off = (info.guest_addr - (1 << 32)) as usize;
            high[off..off + info.len].to_vec()
        } else {
            let off = info.guest_addr as usize;
            low[off..off + info.len].to_vec()
        }
    }

    #[test]
    fn read_block_returns_every_block_as_written() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (path, low, high) = write_sample(dir.path(), &small());
        for options in [
            ReaderOptions::default(),
            ReaderOptions {
                cached_storage_blocks: 0,
                ..ReaderOptions::default()
            },
        ] {
            let reader = Reader::open_with(&path, options).expect("opens");
            let mut buf = vec![0xffu8; 4096];
            for i in (0..reader.block_count()).rev() {
                let info = reader.block_info(i).expect("exists");
                let got = reader.read_block(i, &mut buf).expect("reads");
                assert_eq!(got, expected_block(&low, &high, &info), "block {i}");
            }
        }
    }

    #[test]
    fn sequential_returns_every_block_as_written() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (path, low, high) = write_sample(dir.path(), &small());
        let reader = Reader::open(&path).expect("opens");
        let mut seq = reader.sequential();
        let mut seen = 0;
        while let Some(block) = seq.next_block() {
            let (info, data) = block.expect("reads");
            assert_eq!(info.index, seen);
            assert_eq!(data, expected_block(&low, &high, &info), "block {seen}");
            seen += 1;
        }
        assert_eq!(seen, reader.block_count());
    }

    #[test]
    fn read_all_parallel_delivers_every_block_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (path, low, high) = write_sample(dir.path(), &small());
        let reader = Reader::open(&path).expect("opens");
        let seen = Mutex::new(vec![0u32; reader.block_count()]);
        reader
            .read_all_parallel(3, &|info, data| {
                assert_eq!(
                    data,
                    expected_block(&low, &high, info),
                    "block {}",
                    info.index
                );
                seen.lock().expect("not poisoned")[info.index] += 1;
                Ok(())
            })
            .expect("reads");
        assert!(seen
            .into_inner()
            .expect("not poisoned")
            .iter()
            .all(|&n| n == 1));
    }

    #[test]
    fn read_all_parallel_reports_the_sink_error_with_its_block() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (path, ..) = write_sample(dir.path(), &small());
        let reader = Reader::open(&path).expect("opens");
        let err = reader
            .read_all_parallel(2, &|info, _| {
                if info.index == 30 {
                    return Err("guest memory is gone".into());
                }
                Ok(())
            })
            .expect_err("sink fails");
        assert!(matches!(err, ReadError::Sink { block: 30, .. }), "{err:?}");
    }

    #[test]
    fn sequential_range_stops_at_its_end() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (path, ..) = write_sample(dir.path(), &small());
        let reader = Reader::open(&path).expect("opens");
        let mut seq = reader.sequential_range(10..13);
        let mut got = Vec::new();
        while let Some(block) = seq.next_block() {
            got.push(block.expect("reads").0.index);
        }
        assert_eq!(got, vec![10, 11, 12]);
    }

    #[test]
    fn block_of_maps_addresses_in_both_regions_and_none_in_the_hole() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (path, ..) = write_sample(dir.path(), &small());
        let reader = Reader::open(&path).expect("opens");
        assert_eq!(reader.block_of(0), Some(0));
        assert_eq!(reader.block_of(40 * 4096 + 122), Some(40));
        assert_eq!(reader.block_of(40 * 4096 + 123), None);
        assert_eq!(reader.block_of((1 << 32) + 5 * 4096), Some(46));
        let info = reader.block_info(46).expect("exists");
        assert_eq!(info.guest_addr, (1 << 32) + 5 * 4096);
        assert_eq!(info.kind, BlockKind::Zstd);
    }

    #[test]
    fn block_info_reports_kinds_and_short_tail_length() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (path, ..) = write_sample(dir.path(), &small());
        let reader = Reader::open(&path).expect("opens");
        assert_eq!(reader.block_info(0).expect("exists").kind, BlockKind::Zero);
        assert_eq!(reader.block_info(1).expect("exists").kind, BlockKind::Zstd);
        assert_eq!(reader.block_info(30).expect("exists").kind, BlockKind::Raw);
        assert_eq!(reader.block_info(40).expect("exists").len, 123);
        assert!(reader.block_info(reader.block_count()).is_none());
    }

    #[test]
    fn read_block_rejects_a_small_buffer_and_a_missing_block() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (path, ..) = write_sample(dir.path(), &small());
        let reader = Reader::open(&path).expect("opens");
        let mut small_buf = [0u8; 100];
        assert!(matches!(
            reader.read_block(1, &mut small_buf),
            Err(ReadError::CheckBuffer { .. })
        ));
        let mut buf = [0u8; 4096];
        assert!(matches!(
            reader.read_block(reader.block_count(), &mut buf),
            Err(ReadError::FindBlock { .. })
        ));
    }

    #[test]
    fn summary_counts_blocks_by_kind() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (path, ..) = write_sample(dir.path(), &small());
        let summary = Reader::open(&path).expect("opens").summary();
        assert_eq!(summary.blocks, 57);
        assert_eq!(
            summary.zero_blocks + summary.raw_blocks + summary.zstd_blocks,
            57
        );
        assert_eq!(summary.zstd_blocks, 19 + 1);
        assert_eq!(summary.raw_blocks, 17);
        assert_eq!(summary.zero_blocks, 20);
        assert_eq!(summary.version, "1.0");
        assert!(summary.compression_ratio > 1.0);
    }

    #[test]
    fn cache_serves_neighbours_after_the_file_is_damaged() {
        // A hit must not touch the disk: damage the file after the first
        // read and read a neighbour from the same storage block.
        let dir = tempfile::tempdir().expect("temp dir");
        let (path, low, _) = write_sample(dir.path(), &small());
        let reader = Reader::open(&path).expect("opens");
        let first = reader.block_info(1).expect("exists");
        let second = reader.block_info(2).expect("exists");
        assert_eq!(first.storage_block, second.storage_block);
        let mut buf = vec![0u8; 4096];
        reader.read_block(1, &mut buf).expect("reads");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("reopen");
        file.write_all_at(&vec![0x55; second.stored_len as usize], second.file_offset)
            .expect("damage");
        let got = reader.read_block(2, &mut buf).expect("served from cache");
        assert_eq!(got, &low[2 * 4096..3 * 4096]);
        let fresh = Reader::open_with(
            &path,
            ReaderOptions {
                cached_storage_blocks: 0,
                ..ReaderOptions::default()
            },
        )
        .expect("opens");
        assert!(fresh.read_block(2, &mut buf).is_err());
    }

    #[test]
    fn direct_io_reads_every_block_as_written() {
        // /tmp here is a disk file system; tmpfs would refuse O_DIRECT.
        let dir = tempfile::tempdir().expect("temp dir");
        let (path, low, high) = write_sample(dir.path(), &small());
        for cached in [0, 2] {
            let options = ReaderOptions {
                cached_storage_blocks: cached,
                direct_io: true,
            };
            let reader = Reader::open_with(&path, options).expect("opens with O_DIRECT");
            assert!(reader.direct.is_some());
            let mut buf = vec![0u8; 4096];
            for i in (0..reader.block_count()).rev() {
                let info = reader.block_info(i).expect("exists");
                let got = reader.read_block(i, &mut buf).expect("reads");
                assert_eq!(got, expected_block(&low, &high, &info), "block {i}");
            }
            assert_eq!(reader.verify().expect("sound"), reader.block_count());
        }
    }

    #[test]
    fn reader_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Reader>();
    }

    #[test]
    fn reads_from_many_threads_agree() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (path, low, high) = write_sample(dir.path(), &small());
        let reader = Reader::open_with(
            &path,
            ReaderOptions {
                cached_storage_blocks: 2,
                ..ReaderOptions::default()
            },
        )
        .expect("opens");
        std::thread::scope(|s| {
            for t in 0..4 {
                let (reader, low, high) = (&reader, &low, &high);
                s.spawn(move || {
                    let mut buf = vec![0u8; 4096];
                    for round in 0..5 {
                        for i in 0..reader.block_count() {
                            let i = (i * 7 + t + round) % reader.block_count();
                            let info = reader.block_info(i).expect("exists");
                            let got = reader.read_block(i, &mut buf).expect("reads");
                            assert_eq!(got, expected_block(low, high, &info));
                        }
                    }
                });
            }
        });
    }
}
