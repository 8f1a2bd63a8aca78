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
//!
//! Chains: a layered checkpoint marks the blocks that did not change since
//! its parent as [`BlockKind::Parent`]. [`Reader::open_chain`] (or
//! [`Reader::attach_parent`]) opens a layer on top of its parent after
//! checking that they describe the same memory and that the parent is the
//! one the layer was written on (its index CRC). Every read then resolves
//! a block to the newest layer that holds it: [`BlockInfo::layer`] says
//! which, 0 being the newest file. A reader opened alone on a layered file
//! reports its parent blocks as such and refuses to read them.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use super::format::{
    align_up, BlockChecksum, decode_index, BlockEntry, BlockKind, BlockMap, Footer, FormatError, Header, Region,
    StorageEntry, ALIGN, FOOTER_LEN, HEADER_FIXED_LEN,
};

/// Most files one chain may hold.
pub const MAX_CHAIN_DEPTH: usize = 1024;

/// Zero blocks of a chain handed to one parallel reader thread at a time.
const ZERO_BLOCKS_PER_UNIT: usize = 4096;

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
    /// The block is in a parent checkpoint that was not opened.
    #[error("block {block} is in the parent checkpoint, which was not opened")]
    ReadParentBlock { block: BlockIndex },
    /// Reading a block from an older layer of a chain failed.
    #[error("in layer {layer} of the chain, {path}")]
    ReadLayer {
        layer: usize,
        path: PathBuf,
        #[source]
        source: Box<ReadError>,
    },
    /// Duplicating a file descriptor for [`Reader::try_clone`] failed.
    #[error("cannot duplicate the descriptor of {path}")]
    CloneFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// [`Reader::open_chain`] was given no files.
    #[error("a checkpoint chain needs at least one file")]
    CheckChainEmpty,
    /// A chain holds more files than [`MAX_CHAIN_DEPTH`].
    #[error("{path} cannot sit on top of a chain of {depth} files: at most {MAX_CHAIN_DEPTH} are allowed")]
    CheckChainDepth { path: PathBuf, depth: usize },
    /// A layer and its parent describe different memory.
    #[error("{path} cannot sit on top of {parent}: {reason}")]
    CheckChainGeometry {
        path: PathBuf,
        parent: PathBuf,
        reason: String,
    },
    /// The parent is not the checkpoint the layer was written on.
    #[error("layer {path} was written on top of a parent whose index checksum was {expected:#010x}; {parent} has {found:#010x}: it is not that parent, or it changed")]
    CheckParentCrc {
        path: PathBuf,
        parent: PathBuf,
        expected: u32,
        found: u32,
    },
    /// A plain (self-contained) file was put on top of another.
    #[error("{path} is not a layered checkpoint, so it cannot sit on top of {parent}")]
    CheckLayered { path: PathBuf, parent: PathBuf },
    /// The oldest file of a chain is itself a layer on a missing parent.
    #[error("{path} is a layer on top of a parent checkpoint (index checksum {parent_index_crc:#010x}), but no parent was given after it")]
    CheckChainBottom {
        path: PathBuf,
        parent_index_crc: u32,
    },
    /// The layer already has a parent.
    #[error("{path} already has a parent checkpoint attached")]
    CheckAttached { path: PathBuf },
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

/// Where and how one memory block is stored. For a chain, this describes
/// the block in the layer that holds its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BlockInfo {
    /// Block number.
    pub index: BlockIndex,
    /// Zero, raw or zstd; parent only when the block is in a parent
    /// checkpoint that was not opened.
    pub kind: BlockKind,
    /// Layer of the chain holding the block: 0 is the newest file (the one
    /// the reader was opened on), 1 its parent, and so on. The storage
    /// block and file offset below are in that layer's file.
    pub layer: usize,
    /// Guest-physical address of the block's first byte.
    pub guest_addr: u64,
    /// Decompressed length (the memory block size, or less for the last
    /// block of a region).
    pub len: usize,
    /// Stored length (0 for zero and parent blocks).
    pub stored_len: u32,
    /// Storage block holding it (0 for zero and parent blocks).
    pub storage_block: u32,
    /// File offset of the stored bytes (0 for zero and parent blocks).
    pub file_offset: u64,
    /// Checksum of the decompressed content (0 for zero and parent
    /// blocks), of the kind its layer uses.
    pub crc: u32,
    /// How its layer checks block content.
    pub checksum: BlockChecksum,
}

/// One file of a chain, for `inspect`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LayerSummary {
    /// The file's path, as given.
    pub path: PathBuf,
    /// Its index CRC, which a layer on top of it records.
    pub index_crc: u32,
    /// Blocks whose content this layer supplies to the chain (zero blocks
    /// included; blocks a newer layer overrides excluded).
    pub blocks: usize,
}

/// Counts for `inspect`. Block and byte counts are the file's own (the
/// newest layer's, for a chain); `chain` says what each layer supplies.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Format version, "major.minor".
    pub version: String,
    /// How the file checks its blocks' content.
    pub checksum: BlockChecksum,
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
    /// Memory blocks in the parent checkpoint.
    pub parent_blocks: usize,
    /// CRC of the file's index: what a layer on top of it records.
    pub index_crc: u32,
    /// For a layered file: its parent's index CRC.
    pub parent_index_crc: Option<u32>,
    /// Files in the opened chain (1 for a file opened alone).
    pub chain_depth: usize,
    /// The opened chain, newest first.
    pub chain: Vec<LayerSummary>,
    /// Blocks in a parent checkpoint that was not opened.
    pub unresolved_blocks: usize,
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

/// An open, validated checkpoint file, and the chain of parents opened
/// under it if it is a layer.
pub struct Reader {
    file: File,
    /// The same file opened with O_DIRECT, when asked for.
    direct: Option<File>,
    path: PathBuf,
    file_len: u64,
    header: Header,
    map: BlockMap,
    /// The index, shared with clones: it never changes after open.
    storage: Arc<[StorageEntry]>,
    entries: Arc<[BlockEntry]>,
    index_crc: u32,
    options: ReaderOptions,
    cache: Mutex<Cache>,
    scratch: Mutex<Vec<Scratch>>,
    /// The parent layer, for a layered file opened in a chain.
    parent: Option<Arc<Reader>>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("path", &self.path)
            .field("blocks", &self.entries.len())
            .field("parent", &self.parent)
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
            storage: storage.into(),
            entries: entries.into(),
            index_crc: footer.index_crc,
            options,
            cache: Mutex::new(Cache::default()),
            scratch: Mutex::new(Vec::new()),
            parent: None,
        })
    }

    /// Opens a chain of checkpoints, newest first: each file but the last
    /// must be a layer written on top of the file after it, and the last
    /// must be self-contained. Every file is opened with `options` (so each
    /// has its own storage block cache). Returns the newest file's reader,
    /// which resolves every block through the chain.
    pub fn open_chain(paths: &[PathBuf], options: ReaderOptions) -> Result<Self, ReadError> {
        let (oldest, newer) = paths.split_last().ok_or(ReadError::CheckChainEmpty)?;
        let mut reader = Self::open_with(oldest, options)?;
        if let Some(crc) = reader.header.parent_index_crc {
            return Err(ReadError::CheckChainBottom {
                path: reader.path,
                parent_index_crc: crc,
            });
        }
        for path in newer.iter().rev() {
            reader = Self::open_with(path, options)?.attach_parent(Arc::new(reader))?;
        }
        Ok(reader)
    }

    /// Puts this layer on top of `parent` (which may itself be a chain),
    /// after checking that this file is layered and has no parent yet, that
    /// both describe the same regions with the same memory block size, and
    /// that `parent`'s index CRC is the one this layer was written on.
    pub fn attach_parent(mut self, parent: Arc<Reader>) -> Result<Self, ReadError> {
        let Some(expected) = self.header.parent_index_crc else {
            return Err(ReadError::CheckLayered {
                path: self.path,
                parent: parent.path.clone(),
            });
        };
        if self.parent.is_some() {
            return Err(ReadError::CheckAttached { path: self.path });
        }
        let depth = parent.chain_depth();
        if depth >= MAX_CHAIN_DEPTH {
            return Err(ReadError::CheckChainDepth {
                path: self.path,
                depth,
            });
        }
        let geometry = |reason: String| ReadError::CheckChainGeometry {
            path: self.path.clone(),
            parent: parent.path.clone(),
            reason,
        };
        let (mine, theirs) = (&self.header, &parent.header);
        if mine.memory_block_size != theirs.memory_block_size {
            return Err(geometry(format!(
                "their memory block sizes differ ({} and {} bytes)",
                mine.memory_block_size, theirs.memory_block_size
            )));
        }
        if mine.regions != theirs.regions {
            return Err(geometry(format!(
                "their memory regions differ ({} and {})",
                describe_regions(&mine.regions),
                describe_regions(&theirs.regions)
            )));
        }
        if expected != parent.index_crc {
            return Err(ReadError::CheckParentCrc {
                path: self.path,
                parent: parent.path.clone(),
                expected,
                found: parent.index_crc,
            });
        }
        self.parent = Some(parent);
        Ok(self)
    }

    /// An independent reader of the same open files, its parents included:
    /// the descriptors are duplicated (no path is opened again) and the
    /// clone gets its own caches and locks, so a clone made before `fork()`
    /// holds no lock that a thread of the parent process could have held.
    /// The decoded index is shared, read-only.
    pub fn try_clone(&self) -> Result<Self, ReadError> {
        let clone_err = |source| ReadError::CloneFile {
            path: self.path.clone(),
            source,
        };
        let parent = match &self.parent {
            Some(parent) => Some(Arc::new(parent.try_clone()?)),
            None => None,
        };
        Ok(Reader {
            file: self.file.try_clone().map_err(clone_err)?,
            direct: self
                .direct
                .as_ref()
                .map(File::try_clone)
                .transpose()
                .map_err(clone_err)?,
            path: self.path.clone(),
            file_len: self.file_len,
            header: self.header.clone(),
            map: self.map.clone(),
            storage: Arc::clone(&self.storage),
            entries: Arc::clone(&self.entries),
            index_crc: self.index_crc,
            options: self.options,
            cache: Mutex::new(Cache::default()),
            scratch: Mutex::new(Vec::new()),
            parent,
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

    /// The decoded header: version, block sizes, regions, parent CRC.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// CRC of this file's index (from its footer): what a layer written on
    /// top of this checkpoint records as its parent's.
    pub fn index_crc(&self) -> u32 {
        self.index_crc
    }

    /// For a layered file: the index CRC of the parent it was written on.
    pub fn parent_index_crc(&self) -> Option<u32> {
        self.header.parent_index_crc
    }

    /// The parent layer, when one was opened under this file.
    pub fn parent(&self) -> Option<&Arc<Reader>> {
        self.parent.as_ref()
    }

    /// The files of the chain, newest (this one) first.
    pub fn layers(&self) -> Vec<&Reader> {
        let mut layers = vec![self];
        let mut layer = self;
        while let Some(parent) = &layer.parent {
            layers.push(parent);
            layer = parent;
        }
        layers
    }

    /// Number of files in the chain: 1 for a file opened alone.
    pub fn chain_depth(&self) -> usize {
        self.layers().len()
    }

    /// Number of memory blocks.
    pub fn block_count(&self) -> usize {
        self.entries.len()
    }

    /// Number of storage blocks in this file.
    pub fn storage_block_count(&self) -> usize {
        self.storage.len()
    }

    /// File offset of storage block `i` of this file.
    pub fn storage_block_offset(&self, i: usize) -> Option<u64> {
        self.storage.get(i).map(|s| s.file_offset)
    }

    /// The memory block holding guest-physical address `gpa`.
    pub fn block_of(&self, gpa: u64) -> Option<BlockIndex> {
        self.map.block_of(gpa)
    }

    /// The layer holding block `block`'s content and its number (0 for
    /// this file): the first one down the chain whose entry is not a
    /// parent block, or the last one opened.
    fn resolve(&self, block: BlockIndex) -> Option<(usize, &Reader)> {
        let mut layer = self;
        let mut depth = 0;
        loop {
            let entry = layer.entries.get(block)?;
            match &layer.parent {
                Some(parent) if entry.kind == BlockKind::Parent => {
                    layer = parent;
                    depth += 1;
                }
                _ => return Some((depth, layer)),
            }
        }
    }

    /// Where and how block `block` is stored in this file itself, as layer
    /// `layer` of a chain.
    fn own_block_info(&self, block: BlockIndex, layer: usize) -> Option<BlockInfo> {
        let entry = self.entries.get(block)?;
        let (_, _, len) = self.map.locate(block);
        let file_offset = match entry.kind {
            BlockKind::Zero | BlockKind::Parent => 0,
            _ => self.storage[entry.storage_block as usize].file_offset + u64::from(entry.offset),
        };
        Some(BlockInfo {
            index: block,
            kind: entry.kind,
            layer,
            guest_addr: self.map.guest_addr(block),
            len,
            stored_len: entry.stored_len,
            storage_block: entry.storage_block,
            file_offset,
            crc: entry.crc,
            checksum: self.header.checksum,
        })
    }

    /// Where and how block `block` is stored, in the layer of the chain that
    /// holds it (see [`BlockInfo::layer`]).
    pub fn block_info(&self, block: BlockIndex) -> Option<BlockInfo> {
        let (layer, reader) = self.resolve(block)?;
        reader.own_block_info(block, layer)
    }

    /// Counts of blocks by kind, sizes and ratio, and the chain.
    pub fn summary(&self) -> Summary {
        let count = |k| self.entries.iter().filter(|e| e.kind == k).count();
        let stored_bytes = self.entries.iter().map(|e| u64::from(e.stored_len)).sum();
        let layers = self.layers();
        let mut supplied = vec![0usize; layers.len()];
        let mut unresolved_blocks = 0;
        for block in 0..self.entries.len() {
            if let Some((layer, reader)) = self.resolve(block) {
                if reader.entries[block].kind == BlockKind::Parent {
                    unresolved_blocks += 1;
                } else {
                    supplied[layer] += 1;
                }
            }
        }
        let chain = layers
            .iter()
            .zip(supplied)
            .map(|(layer, blocks)| LayerSummary {
                path: layer.path.clone(),
                index_crc: layer.index_crc,
                blocks,
            })
            .collect();
        Summary {
            version: format!(
                "{}.{}",
                self.header.version_major, self.header.version_minor
            ),
            checksum: self.header.checksum,
            memory_block_size: self.header.memory_block_size,
            storage_block_size: self.header.storage_block_size,
            regions: self.header.regions.clone(),
            memory_bytes: self.header.memory_bytes,
            blocks: self.entries.len(),
            zero_blocks: count(BlockKind::Zero),
            raw_blocks: count(BlockKind::Raw),
            zstd_blocks: count(BlockKind::Zstd),
            parent_blocks: count(BlockKind::Parent),
            index_crc: self.index_crc,
            parent_index_crc: self.header.parent_index_crc,
            chain_depth: layers.len(),
            chain,
            unresolved_blocks,
            storage_blocks: self.storage.len(),
            stored_bytes,
            file_bytes: self.file_len,
            compression_ratio: self.header.memory_bytes as f64 / self.file_len as f64,
        }
    }

    /// Reads block `block`, decompressed and checksum-verified, into the
    /// start of `buf`, and returns that part of `buf`; for a chain, from the
    /// layer that holds it. `buf` must hold at least the block's length. On
    /// error, `buf`'s content is unspecified.
    pub fn read_block<'b>(
        &self,
        block: BlockIndex,
        buf: &'b mut [u8],
    ) -> Result<&'b [u8], ReadError> {
        let (layer, reader) = self.resolve(block).ok_or(ReadError::FindBlock {
            block,
            count: self.entries.len(),
        })?;
        let info = reader
            .own_block_info(block, layer)
            .expect("resolve found the entry");
        if buf.len() < info.len {
            return Err(ReadError::CheckBuffer {
                block,
                len: buf.len(),
                needed: info.len,
            });
        }
        reader
            .read_own_block(&info, &mut buf[..info.len])
            .map_err(|err| in_layer(layer, reader, err))
    }

    /// Reads block `info` of this file itself into `out`, exactly the
    /// block's length.
    fn read_own_block<'b>(
        &self,
        info: &BlockInfo,
        out: &'b mut [u8],
    ) -> Result<&'b [u8], ReadError> {
        match info.kind {
            BlockKind::Zero => {
                out.fill(0);
                return Ok(out);
            }
            BlockKind::Parent => return Err(ReadError::ReadParentBlock { block: info.index }),
            BlockKind::Raw | BlockKind::Zstd => {}
        }
        if self.options.cached_storage_blocks > 0 {
            let storage = self.cached_storage_block(info)?;
            let start =
                (info.file_offset - self.storage[info.storage_block as usize].file_offset) as usize;
            let stored = &storage.bytes()[start..start + info.stored_len as usize];
            self.with_scratch(info, |s| decode_block(info, stored, out, &mut s.dctx))?;
        } else if info.kind == BlockKind::Raw && self.direct.is_none() {
            // Straight into the caller's buffer: no copy.
            self.file
                .read_exact_at(out, info.file_offset)
                .map_err(|source| read_error(info, info.file_offset, source))?;
            check_crc(info, out)?;
        } else {
            self.with_scratch(info, |s| {
                self.read_data(info.file_offset, info.stored_len as usize, &mut s.buf)
                    .map_err(|source| read_error(info, info.file_offset, source))?;
                decode_block(info, s.buf.bytes(), out, &mut s.dctx)
            })?;
        }
        Ok(out)
    }

    /// Empties the storage block caches of every layer, releasing their
    /// memory.
    pub fn clear_cache(&self) {
        for layer in self.layers() {
            let mut cache = layer.cache.lock().unwrap_or_else(PoisonError::into_inner);
            cache.slots.clear();
        }
    }

    /// A sequential reader of every block in order, resolved through the
    /// chain, reading each storage block of each layer once: the bulk path
    /// for an eager restore and for `verify`.
    pub fn sequential(&self) -> Sequential<'_> {
        self.sequential_range(0..self.entries.len())
    }

    /// A sequential reader of blocks `range` (clamped to the block count).
    pub fn sequential_range(&self, range: std::ops::Range<BlockIndex>) -> Sequential<'_> {
        let end = range.end.min(self.entries.len());
        self.sequential_of(Blocks::Range(range.start..end), true)
    }

    /// A sequential reader of `blocks`, resolved through the chain when
    /// `resolve` is set, otherwise from this file alone (parent blocks then
    /// fail to read).
    fn sequential_of<'r>(&'r self, blocks: Blocks<'r>, resolve: bool) -> Sequential<'r> {
        let layers = if resolve { self.layers() } else { vec![self] };
        let block_size = self.header.memory_block_size as usize;
        Sequential {
            reader: self,
            loaded: vec![None; layers.len()],
            storage_bufs: (0..layers.len()).map(|_| IoBuf::default()).collect(),
            layers,
            blocks,
            out: vec![0u8; block_size],
            zeros: vec![0u8; block_size],
            scratch: None,
        }
    }

    /// Reads every block on `threads` threads (0: one per core; at most
    /// [`MAX_THREADS`]) and hands
    /// each, decompressed and checked, to `sink` (zero blocks as zeros:
    /// check `kind` to skip them), resolved through the chain. Blocks
    /// arrive in no particular order, each once.
    /// Work is split at storage block boundaries (of each layer, for a
    /// chain), so each storage block is read once. Stops at the first error
    /// any thread meets, which need not be the lowest-numbered bad block
    /// (use [`Reader::verify`] for that).
    pub fn read_all_parallel(&self, threads: usize, sink: &BlockSink<'_>) -> Result<(), ReadError> {
        let threads = match threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n.min(MAX_THREADS),
        };
        let (order, units) = match self.parent {
            None => (None, self.plain_units()),
            Some(_) => {
                let (order, units) = self.chain_units();
                (Some(order), units)
            }
        };
        let next_unit = std::sync::atomic::AtomicUsize::new(0);
        let failure: Mutex<Option<ReadError>> = Mutex::new(None);
        let failed = std::sync::atomic::AtomicBool::new(false);
        let work = || {
            use std::sync::atomic::Ordering::Relaxed;
            while !failed.load(Relaxed) {
                let unit = next_unit.fetch_add(1, Relaxed);
                let Some(range) = units.get(unit) else {
                    return;
                };
                let blocks = match &order {
                    None => Blocks::Range(range.clone()),
                    Some(order) => Blocks::List(order[range.clone()].iter()),
                };
                let mut seq = self.sequential_of(blocks, true);
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

    /// Work units of a file without a parent: block ranges, each from the
    /// first block stored in storage block k to the first block of storage
    /// block k + 1; unit 0 starts at block 0.
    fn plain_units(&self) -> Vec<std::ops::Range<BlockIndex>> {
        let mut starts = vec![0];
        let mut last_sb = 0;
        for (i, e) in self.entries.iter().enumerate() {
            if matches!(e.kind, BlockKind::Raw | BlockKind::Zstd) && e.storage_block != last_sb {
                last_sb = e.storage_block;
                starts.push(i);
            }
        }
        starts.push(self.entries.len());
        starts.windows(2).map(|w| w[0]..w[1]).collect()
    }

    /// Work units of a chain: the blocks in an order that groups them by
    /// the layer and storage block holding them, and ranges of that order,
    /// one per storage block of each layer, then zero (and unresolved
    /// parent) blocks in chunks.
    fn chain_units(&self) -> (Vec<BlockIndex>, Vec<std::ops::Range<usize>>) {
        let depth = self.chain_depth();
        // Per layer, the stored blocks it supplies; the last list holds the
        // blocks with nothing to read.
        let mut lists: Vec<Vec<BlockIndex>> = vec![Vec::new(); depth + 1];
        for block in 0..self.entries.len() {
            if let Some((layer, reader)) = self.resolve(block) {
                match reader.entries[block].kind {
                    BlockKind::Raw | BlockKind::Zstd => lists[layer].push(block),
                    BlockKind::Zero | BlockKind::Parent => lists[depth].push(block),
                }
            }
        }
        let layers = self.layers();
        let mut order = Vec::with_capacity(self.entries.len());
        let mut units = Vec::new();
        for (layer, list) in lists.into_iter().enumerate() {
            let mut start = order.len();
            let mut last_sb = None;
            for block in list {
                let split = match layers.get(layer) {
                    Some(reader) => {
                        let sb = reader.entries[block].storage_block;
                        let split = last_sb.is_some_and(|last| last != sb);
                        last_sb = Some(sb);
                        split
                    }
                    None => order.len() - start >= ZERO_BLOCKS_PER_UNIT,
                };
                if split {
                    units.push(start..order.len());
                    start = order.len();
                }
                order.push(block);
            }
            if order.len() > start {
                units.push(start..order.len());
            }
        }
        (order, units)
    }

    /// Reads and checks every block, resolved through the chain; returns
    /// the number of blocks checked, or the first bad block's error. A
    /// block in a parent checkpoint that was not opened is an error.
    pub fn verify(&self) -> Result<usize, ReadError> {
        let mut seq = self.sequential();
        let mut checked = 0;
        while let Some(block) = seq.next_block() {
            block?;
            checked += 1;
        }
        Ok(checked)
    }

    /// Reads and checks every block this file itself holds (zero blocks
    /// included), skipping its parent blocks whether or not a parent is
    /// open; returns the number of blocks checked.
    pub fn verify_layer(&self) -> Result<usize, ReadError> {
        let mut seq = self.sequential_of(Blocks::Range(0..self.entries.len()), false);
        let mut checked = 0;
        while let Some(block) = seq.next_block() {
            match block {
                Ok(_) => checked += 1,
                Err(ReadError::ReadParentBlock { .. }) => {}
                Err(err) => return Err(err),
            }
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

/// `err`, met reading from `reader` as layer `layer` of a chain, named
/// with that layer's file when it is not the newest one.
fn in_layer(layer: usize, reader: &Reader, err: ReadError) -> ReadError {
    match layer {
        0 => err,
        _ => ReadError::ReadLayer {
            layer,
            path: reader.path.clone(),
            source: Box::new(err),
        },
    }
}

/// A short description of a region list for error messages.
fn describe_regions(regions: &[Region]) -> String {
    let total: u64 = regions.iter().map(|r| r.size).sum();
    let first = regions.first().map_or(0, |r| r.guest_addr);
    format!(
        "{} region{} from {first:#x}, {total} bytes",
        regions.len(),
        if regions.len() == 1 { "" } else { "s" }
    )
}

fn read_error(info: &BlockInfo, offset: u64, source: std::io::Error) -> ReadError {
    // The index said the bytes were there when the file was opened.
    let source = if source.kind() == std::io::ErrorKind::UnexpectedEof {
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the file ends before the block does: it was truncated after it was opened",
        )
    } else {
        source
    };
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

/// Checks `data` against the block's checksum.
fn check_crc(info: &BlockInfo, data: &[u8]) -> Result<(), ReadError> {
    let computed = info.checksum.of(data);
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
        BlockKind::Parent => return Err(ReadError::ReadParentBlock { block: info.index }),
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

/// Which blocks a [`Sequential`] reads, in order.
enum Blocks<'a> {
    /// Consecutive block numbers.
    Range(std::ops::Range<BlockIndex>),
    /// Listed blocks (for a chain's parallel read), increasing within one
    /// layer's storage block.
    List(std::slice::Iter<'a, BlockIndex>),
}

impl Iterator for Blocks<'_> {
    type Item = BlockIndex;

    fn next(&mut self) -> Option<BlockIndex> {
        match self {
            Blocks::Range(range) => range.next(),
            Blocks::List(list) => list.next().copied(),
        }
    }
}

/// Reads every block in order; see [`Reader::sequential`].
pub struct Sequential<'r> {
    reader: &'r Reader,
    /// The chain, newest first; only `reader` when not resolving parents.
    layers: Vec<&'r Reader>,
    blocks: Blocks<'r>,
    /// Per layer: which of its storage blocks `storage_bufs` holds.
    loaded: Vec<Option<u32>>,
    storage_bufs: Vec<IoBuf>,
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
    /// For a chain, the content comes from the layer that holds it. After
    /// an error the next call moves on to the following block.
    pub fn next_block(&mut self) -> Option<Result<(BlockInfo, &[u8]), ReadError>> {
        let block = self.blocks.next()?;
        // The last layer in `layers` is where resolution stops.
        let (layer, reader) = self
            .layers
            .iter()
            .enumerate()
            .find(|(depth, layer)| {
                *depth + 1 == self.layers.len()
                    || layer.entries.get(block).map(|e| e.kind) != Some(BlockKind::Parent)
            })
            .map(|(depth, layer)| (depth, *layer))?;
        let info = reader.own_block_info(block, layer)?;
        match info.kind {
            BlockKind::Zero => Some(Ok((info, &self.zeros[..info.len]))),
            BlockKind::Parent => Some(Err(in_layer(
                layer,
                reader,
                ReadError::ReadParentBlock { block },
            ))),
            BlockKind::Raw | BlockKind::Zstd => Some(
                self.load(reader, &info)
                    .map(|()| (info, &self.out[..info.len]))
                    .map_err(|err| in_layer(layer, reader, err)),
            ),
        }
    }

    /// Decodes `info`'s block of layer `reader` into `out`, reading its
    /// storage block unless it is the one last read from that layer.
    fn load(&mut self, reader: &Reader, info: &BlockInfo) -> Result<(), ReadError> {
        let entry = reader.storage[info.storage_block as usize];
        let buf = &mut self.storage_bufs[info.layer];
        let loaded = &mut self.loaded[info.layer];
        if *loaded != Some(info.storage_block) {
            *loaded = None;
            reader
                .read_data(entry.file_offset, entry.stored_len as usize, buf)
                .map_err(|source| read_error(info, entry.file_offset, source))?;
            *loaded = Some(info.storage_block);
        }
        let start = (info.file_offset - entry.file_offset) as usize;
        let stored = &buf.bytes()[start..start + info.stored_len as usize];
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
            parent_index_crc: None,
            ..WriterOptions::default()
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

    // ---- chains ------------------------------------------------------------

    use crate::checkpoint::format::FLAG_PARENT;
    use crate::checkpoint::source::{BlockHint, HintedSource};
    use crate::checkpoint::writer::{flatten, WriteError, WriteStats};

    /// Length of the low region of the chain tests: 20 whole blocks and a
    /// 100-byte tail; the high region at 4 GiB has 6 blocks.
    const LOW: usize = 20 * 4096 + 100;
    const HIGH_BLOCKS: usize = 6;
    const BLOCKS: usize = 21 + HIGH_BLOCKS;

    /// Block `i`'s range in the flat image (low region, then high).
    fn span(i: usize) -> std::ops::Range<usize> {
        if i < 21 {
            i * 4096..(i * 4096 + 4096).min(LOW)
        } else {
            let start = LOW + (i - 21) * 4096;
            start..start + 4096
        }
    }

    /// The flat-image block of (region, offset).
    fn block_at(region: usize, offset: u64) -> usize {
        region * 21 + offset as usize / 4096
    }

    /// Content of block `i` at `version`: text-like or pseudo-random.
    fn fill(image: &mut [u8], i: usize, version: u64) {
        let range = span(i);
        if (i as u64 + version) % 3 == 0 {
            for (k, b) in image[range].iter_mut().enumerate() {
                *b = b"layer chain text "[(k + version as usize) % 17];
            }
        } else {
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (i as u64) << 8 ^ version;
            for b in &mut image[range] {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        }
    }

    /// The three versions of memory: base, mid (changes some blocks of
    /// base) and top (changes some of mid), and the blocks each changed.
    struct Versions {
        images: [Vec<u8>; 3],
        changed: [Vec<usize>; 3],
    }

    fn versions() -> Versions {
        let mut base = vec![0u8; LOW + HIGH_BLOCKS * 4096];
        for i in 0..BLOCKS {
            if ![0, 7, 15, 24].contains(&i) {
                fill(&mut base, i, 0);
            }
        }
        let mut mid = base.clone();
        // 5 becomes zero over base data; 7 gets data where base had zero.
        let mid_changed = vec![3, 5, 7, 12, 20, 22];
        for &i in &mid_changed {
            if i == 5 {
                mid[span(i)].fill(0);
            } else {
                fill(&mut mid, i, 1);
            }
        }
        let mut top = mid.clone();
        // 10 becomes zero over base data, hinted zero (not read).
        let top_changed = vec![0, 3, 10, 12, 23];
        for &i in &top_changed {
            if i == 10 {
                top[span(i)].fill(0);
            } else {
                fill(&mut top, i, 2);
            }
        }
        Versions {
            images: [base, mid, top],
            changed: [(0..BLOCKS).collect(), mid_changed, top_changed],
        }
    }

    fn chain_options(parent_index_crc: Option<u32>) -> WriterOptions {
        WriterOptions {
            memory_block_size: 4096,
            storage_block_size: 8192,
            level: 1,
            threads: 2,
            parent_index_crc,
            ..WriterOptions::default()
        }
    }

    /// Writes version `v` to `path`, on top of `parent` (its index CRC)
    /// when given, hinting unchanged blocks as in the parent and block 10
    /// of the top as zero. Returns the stats and the blocks read.
    fn write_version(
        path: &Path,
        versions: &Versions,
        v: usize,
        parent: Option<u32>,
    ) -> (WriteStats, Vec<usize>) {
        let image = &versions.images[v];
        let changed = &versions.changed[v];
        let source = HintedSource::new(
            ImageSource::new(vec![(0, &image[..LOW]), (1 << 32, &image[LOW..])]),
            |region, offset| {
                let block = block_at(region, offset);
                if v == 2 && block == 10 {
                    BlockHint::Zero
                } else if v == 0 || changed.contains(&block) {
                    BlockHint::Read
                } else {
                    BlockHint::Parent
                }
            },
        );
        // The middle layer checks its blocks with XXH64, the others with
        // CRC-32C: every chain test reads layers of both kinds.
        let checksum = if v == 1 { BlockChecksum::Xxh64 } else { BlockChecksum::Crc32c };
        let options = WriterOptions { checksum, ..chain_options(parent) };
        let stats = write_checkpoint(path, &source, &options, &mut |_, _| {}).expect("writes");
        let reads = source.reads.lock().expect("not poisoned");
        let mut read: Vec<usize> = reads.iter().map(|&(r, o)| block_at(r, o)).collect();
        read.sort_unstable();
        (stats, read)
    }

    /// Files base, mid and top of [`versions`], each on the previous one.
    struct Chain {
        _dir: tempfile::TempDir,
        versions: Versions,
        paths: [PathBuf; 3],
    }

    impl Chain {
        fn new() -> Self {
            let dir = tempfile::tempdir().expect("temp dir");
            let versions = versions();
            let paths = ["base", "mid", "top"].map(|n| dir.path().join(n));
            write_version(&paths[0], &versions, 0, None);
            let base_crc = Reader::open(&paths[0]).expect("opens").index_crc();
            write_version(&paths[1], &versions, 1, Some(base_crc));
            let mid_crc = Reader::open(&paths[1]).expect("opens").index_crc();
            write_version(&paths[2], &versions, 2, Some(mid_crc));
            Chain {
                _dir: dir,
                versions,
                paths,
            }
        }

        /// Newest first.
        fn newest_first(&self) -> Vec<PathBuf> {
            self.paths.iter().rev().cloned().collect()
        }

        fn open(&self, options: ReaderOptions) -> Reader {
            Reader::open_chain(&self.newest_first(), options).expect("chain opens")
        }

        /// The resolved memory of block `i`.
        fn expected(&self, i: usize) -> &[u8] {
            &self.versions.images[2][span(i)]
        }

        /// The layer (0 = top) that holds block `i`.
        fn expected_layer(&self, i: usize) -> usize {
            if self.versions.changed[2].contains(&i) {
                0
            } else if self.versions.changed[1].contains(&i) {
                1
            } else {
                2
            }
        }
    }

    #[test]
    fn a_layer_rebased_on_its_flattened_parents_reads_the_same_and_keeps_its_index() {
        let chain = Chain::new();
        let dir = tempfile::tempdir().expect("temp dir");
        let lower = Reader::open_chain(&chain.newest_first()[1..], ReaderOptions::default()).expect("mid and base");
        let flat = dir.path().join("flat");
        crate::checkpoint::flatten(&lower, &flat, &WriterOptions::default(), &mut |_, _| {}).expect("flattens");
        let flat_crc = Reader::open(&flat).expect("opens").index_crc();
        let top = dir.path().join("top");
        crate::checkpoint::rebase_layer(&chain.paths[2], &top, flat_crc).expect("rebases");

        let old = Reader::open(&chain.paths[2]).expect("opens");
        let rebased = Reader::open(&top).expect("opens");
        assert_eq!(rebased.index_crc(), old.index_crc(), "the layer's index is unchanged");
        assert_eq!(rebased.parent_index_crc(), Some(flat_crc));
        let two = Reader::open_chain(&[top.clone(), flat.clone()], ReaderOptions::default()).expect("chain of two");
        assert_eq!(two.verify_layer().expect("verifies"), old.verify_layer().expect("verifies"));
        let mut buf = vec![0u8; 4096];
        for i in 0..BLOCKS {
            assert!(two.read_block(i, &mut buf).expect("reads") == chain.expected(i), "block {i}");
        }
        // The old parent is not this layer's parent any more.
        let err = Reader::open_chain(&[top, chain.paths[1].clone()], ReaderOptions::default());
        assert!(err.is_err(), "a rebased layer opened on its old parent");
        // Only layers are rebased.
        assert!(crate::checkpoint::rebase_layer(&flat, &dir.path().join("x"), 1).is_err());
    }

    #[test]
    fn layered_write_records_hints_without_reading_those_blocks() {
        let dir = tempfile::tempdir().expect("temp dir");
        let versions = versions();
        let base = dir.path().join("base");
        let (base_stats, _) = write_version(&base, &versions, 0, None);
        assert_eq!(base_stats.parent_blocks, 0);
        let base_crc = Reader::open(&base).expect("opens").index_crc();
        let mid = dir.path().join("mid");
        let (stats, read) = write_version(&mid, &versions, 1, Some(base_crc));
        assert_eq!(read, versions.changed[1]);
        assert_eq!(stats.parent_blocks, (BLOCKS - 6) as u64);
        assert_eq!(stats.zero_blocks, 1);
        assert_eq!(stats.raw_blocks + stats.zstd_blocks, 5);
        assert_eq!(stats.bytes_in, versions.images[1].len() as u64);

        let alone = Reader::open(&mid).expect("a layer opens alone");
        assert_eq!(alone.parent_index_crc(), Some(base_crc));
        // The middle layer has XXH64 block checksums (write_version).
        assert_eq!(alone.header().version_minor, 2);
        let bytes = std::fs::read(&mid).expect("read");
        assert_eq!(bytes[28..32], (FLAG_PARENT | crate::checkpoint::format::FLAG_XXH64).to_le_bytes());
        assert_eq!(bytes[40..48], u64::from(base_crc).to_le_bytes());
        let mut buf = vec![0u8; 4096];
        for i in 0..BLOCKS {
            let info = alone.block_info(i).expect("exists");
            assert_eq!(info.layer, 0);
            if versions.changed[1].contains(&i) {
                assert_ne!(info.kind, BlockKind::Parent, "block {i}");
                let got = alone.read_block(i, &mut buf).expect("reads its own block");
                assert!(got == &versions.images[1][span(i)], "block {i}");
            } else {
                assert_eq!(info.kind, BlockKind::Parent, "block {i}");
                let err = alone
                    .read_block(i, &mut buf)
                    .expect_err("parent not opened");
                assert_eq!(
                    err.to_string(),
                    format!("block {i} is in the parent checkpoint, which was not opened")
                );
            }
        }
        assert!(matches!(
            alone.verify(),
            Err(ReadError::ReadParentBlock { .. })
        ));
        assert_eq!(alone.verify_layer().expect("own blocks sound"), 6);
    }

    #[test]
    fn top_layer_zero_hint_is_not_read() {
        let chain = Chain::new();
        let dir = tempfile::tempdir().expect("temp dir");
        let mid_crc = Reader::open(&chain.paths[1]).expect("opens").index_crc();
        let (stats, read) = write_version(&dir.path().join("t"), &chain.versions, 2, Some(mid_crc));
        assert_eq!(read, vec![0, 3, 12, 23]);
        assert_eq!(stats.zero_blocks, 1);
    }

    #[test]
    fn writer_refuses_a_parent_hint_without_a_parent() {
        let image = vec![1u8; 4 * 4096];
        let source = HintedSource::new(ImageSource::flat(&image), |_, offset| {
            if offset == 2 * 4096 {
                BlockHint::Parent
            } else {
                BlockHint::Read
            }
        });
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("c");
        let err = write_checkpoint(&path, &source, &chain_options(None), &mut |_, _| {})
            .expect_err("no parent");
        assert!(matches!(err, WriteError::CheckHint { block: 2 }), "{err:?}");
        assert!(
            err.to_string().contains("parent_index_crc is None"),
            "{err}"
        );
        assert!(!path.exists());
    }

    #[test]
    fn chain_of_three_resolves_every_block_to_the_newest_layer() {
        let chain = Chain::new();
        for cached in [DEFAULT_CACHED_STORAGE_BLOCKS, 0] {
            let reader = chain.open(ReaderOptions {
                cached_storage_blocks: cached,
                ..ReaderOptions::default()
            });
            assert_eq!(reader.chain_depth(), 3);
            assert_eq!(reader.block_count(), BLOCKS);
            let mut buf = vec![0xeeu8; 4096];
            for i in (0..BLOCKS).rev() {
                let info = reader.block_info(i).expect("exists");
                assert_eq!(info.layer, chain.expected_layer(i), "block {i}");
                assert_ne!(info.kind, BlockKind::Parent, "block {i}");
                let got = reader.read_block(i, &mut buf).expect("reads");
                assert!(got == chain.expected(i), "block {i}");
            }
            // A newer zero overrides older data, in the top and in the middle.
            let top_zero = reader.block_info(10).expect("exists");
            assert_eq!((top_zero.kind, top_zero.layer), (BlockKind::Zero, 0));
            let mid_zero = reader.block_info(5).expect("exists");
            assert_eq!((mid_zero.kind, mid_zero.layer), (BlockKind::Zero, 1));
            assert_ne!(
                chain.versions.images[0][span(5)],
                chain.versions.images[2][span(5)]
            );
        }
    }

    #[test]
    fn sequential_and_verify_deliver_each_chain_block_once() {
        let chain = Chain::new();
        let reader = chain.open(ReaderOptions::default());
        let mut seq = reader.sequential();
        let mut seen = 0;
        while let Some(block) = seq.next_block() {
            let (info, data) = block.expect("reads");
            assert_eq!(info.index, seen);
            assert!(data == chain.expected(seen), "block {seen}");
            seen += 1;
        }
        assert_eq!(seen, BLOCKS);
        let mut seq = reader.sequential_range(2..6);
        let mut got = Vec::new();
        while let Some(block) = seq.next_block() {
            let (info, data) = block.expect("reads");
            assert_eq!(data, chain.expected(info.index));
            got.push(info.index);
        }
        assert_eq!(got, vec![2, 3, 4, 5]);
        assert_eq!(reader.verify().expect("sound"), BLOCKS);
    }

    #[test]
    fn read_all_parallel_delivers_each_chain_block_once() {
        let chain = Chain::new();
        let reader = chain.open(ReaderOptions::default());
        for threads in [1, 3] {
            let seen = Mutex::new(vec![0u32; BLOCKS]);
            reader
                .read_all_parallel(threads, &|info, data| {
                    assert!(data == chain.expected(info.index), "block {}", info.index);
                    assert_eq!(info.layer, chain.expected_layer(info.index));
                    seen.lock().expect("not poisoned")[info.index] += 1;
                    Ok(())
                })
                .expect("reads");
            let seen = seen.into_inner().expect("not poisoned");
            assert!(seen.iter().all(|&n| n == 1), "{seen:?}");
        }
    }

    #[test]
    fn chain_units_read_each_storage_block_of_each_layer_once() {
        let chain = Chain::new();
        let reader = chain.open(ReaderOptions::default());
        let (order, units) = reader.chain_units();
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..BLOCKS).collect::<Vec<_>>());
        let mut keys = Vec::new();
        for unit in &units {
            let infos: Vec<BlockInfo> = order[unit.clone()]
                .iter()
                .map(|&i| reader.block_info(i).expect("exists"))
                .collect();
            if infos[0].kind != BlockKind::Zero {
                let key = (infos[0].layer, infos[0].storage_block);
                assert!(infos.iter().all(|b| (b.layer, b.storage_block) == key));
                keys.push(key);
            }
        }
        let count = keys.len();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), count, "a storage block is split across units");
    }

    #[test]
    fn open_chain_refuses_a_parent_with_another_index_crc() {
        let chain = Chain::new();
        let paths = vec![chain.paths[2].clone(), chain.paths[0].clone()];
        let err = Reader::open_chain(&paths, ReaderOptions::default()).expect_err("wrong parent");
        assert!(matches!(err, ReadError::CheckParentCrc { .. }), "{err:?}");
        let text = err.to_string();
        for needed in [
            chain.paths[2].to_str().expect("utf-8"),
            chain.paths[0].to_str().expect("utf-8"),
            "it is not that parent, or it changed",
        ] {
            assert!(text.contains(needed), "{text}");
        }
    }

    #[test]
    fn open_chain_refuses_a_parent_that_changed() {
        let chain = Chain::new();
        // Rewrite the base with other content: same geometry, new index.
        let mut other = chain.versions.images[0].clone();
        fill(&mut other, 1, 9);
        let source = ImageSource::new(vec![(0, &other[..LOW]), (1 << 32, &other[LOW..])]);
        write_checkpoint(
            &chain.paths[0],
            &source,
            &chain_options(None),
            &mut |_, _| {},
        )
        .expect("rewrites");
        let err = Reader::open_chain(&chain.newest_first(), ReaderOptions::default())
            .expect_err("base changed");
        assert!(matches!(err, ReadError::CheckParentCrc { .. }), "{err:?}");
    }

    #[test]
    fn open_chain_refuses_a_parent_with_other_geometry() {
        let chain = Chain::new();
        let dir = tempfile::tempdir().expect("temp dir");
        let image = &chain.versions.images[0];
        let big_blocks = dir.path().join("big");
        let options = WriterOptions {
            memory_block_size: 8192,
            ..chain_options(None)
        };
        let source = ImageSource::new(vec![(0, &image[..LOW]), (1 << 32, &image[LOW..])]);
        write_checkpoint(&big_blocks, &source, &options, &mut |_, _| {}).expect("writes");
        let one_region = dir.path().join("flat");
        write_checkpoint(
            &one_region,
            &ImageSource::flat(image),
            &chain_options(None),
            &mut |_, _| {},
        )
        .expect("writes");
        for (parent, reason) in [
            (&big_blocks, "memory block sizes differ"),
            (&one_region, "memory regions differ"),
        ] {
            let paths = vec![chain.paths[1].clone(), parent.clone()];
            let err =
                Reader::open_chain(&paths, ReaderOptions::default()).expect_err("other geometry");
            assert!(
                matches!(err, ReadError::CheckChainGeometry { .. }),
                "{err:?}"
            );
            let text = err.to_string();
            assert!(text.contains(reason), "{text}");
            assert!(text.contains(parent.to_str().expect("utf-8")), "{text}");
            assert!(
                text.contains(chain.paths[1].to_str().expect("utf-8")),
                "{text}"
            );
        }
    }

    #[test]
    fn open_chain_refuses_a_layered_bottom_and_a_plain_file_on_top() {
        let chain = Chain::new();
        let paths = vec![chain.paths[2].clone(), chain.paths[1].clone()];
        let err = Reader::open_chain(&paths, ReaderOptions::default()).expect_err("no base");
        assert!(matches!(err, ReadError::CheckChainBottom { .. }), "{err:?}");
        assert!(err.to_string().contains("no parent was given after it"));
        let paths = vec![chain.paths[0].clone(), chain.paths[0].clone()];
        let err = Reader::open_chain(&paths, ReaderOptions::default()).expect_err("plain on top");
        assert!(matches!(err, ReadError::CheckLayered { .. }), "{err:?}");
        assert!(matches!(
            Reader::open_chain(&[], ReaderOptions::default()),
            Err(ReadError::CheckChainEmpty)
        ));
    }

    #[test]
    fn attach_parent_builds_a_chain_and_refuses_a_second_parent() {
        let chain = Chain::new();
        let base = Arc::new(Reader::open(&chain.paths[0]).expect("opens"));
        let mid = Reader::open(&chain.paths[1])
            .expect("opens")
            .attach_parent(Arc::clone(&base))
            .expect("mid sits on base");
        let mid = Arc::new(mid);
        let top = Reader::open(&chain.paths[2])
            .expect("opens")
            .attach_parent(Arc::clone(&mid))
            .expect("top sits on mid");
        assert_eq!(top.verify().expect("sound"), BLOCKS);
        let err = top.attach_parent(mid).expect_err("has a parent");
        assert!(matches!(err, ReadError::CheckAttached { .. }), "{err:?}");
    }

    #[test]
    fn a_middle_layer_without_its_parent_names_the_layer() {
        let chain = Chain::new();
        let mid = Arc::new(Reader::open(&chain.paths[1]).expect("opens"));
        let top = Reader::open(&chain.paths[2])
            .expect("opens")
            .attach_parent(mid)
            .expect("top sits on mid");
        let mut buf = vec![0u8; 4096];
        // Block 1 is in the base, which was not opened.
        let info = top.block_info(1).expect("exists");
        assert_eq!((info.kind, info.layer), (BlockKind::Parent, 1));
        let err = top.read_block(1, &mut buf).expect_err("base missing");
        assert!(
            matches!(err, ReadError::ReadLayer { layer: 1, .. }),
            "{err:?}"
        );
        assert!(top.read_block(3, &mut buf).is_ok());
        let summary = top.summary();
        assert_eq!(summary.chain_depth, 2);
        assert_eq!(
            summary.unresolved_blocks,
            (0..BLOCKS)
                .filter(|&i| chain.expected_layer(i) == 2)
                .count()
        );
    }

    #[test]
    fn summary_counts_parent_blocks_and_what_each_layer_supplies() {
        let chain = Chain::new();
        let reader = chain.open(ReaderOptions::default());
        let summary = reader.summary();
        assert_eq!(summary.version, "1.1");
        assert_eq!(summary.parent_blocks, BLOCKS - 5);
        assert_eq!(summary.chain_depth, 3);
        let mid_crc = Reader::open(&chain.paths[1]).expect("opens").index_crc();
        assert_eq!(summary.parent_index_crc, Some(mid_crc));
        assert_eq!(summary.chain[1].index_crc, mid_crc);
        let supplied: Vec<usize> = summary.chain.iter().map(|l| l.blocks).collect();
        let expected: Vec<usize> = (0..3)
            .map(|l| {
                (0..BLOCKS)
                    .filter(|&i| chain.expected_layer(i) == l)
                    .count()
            })
            .collect();
        assert_eq!(supplied, expected);
        assert_eq!(summary.unresolved_blocks, 0);
    }

    #[test]
    fn flatten_writes_the_resolved_memory_as_one_plain_file() {
        let chain = Chain::new();
        let reader = chain.open(ReaderOptions::default());
        let out = chain.paths[0].with_file_name("flat");
        let stats =
            flatten(&reader, &out, &WriterOptions::default(), &mut |_, _| {}).expect("flattens");
        assert_eq!(stats.parent_blocks, 0);
        assert_eq!(stats.bytes_in, chain.versions.images[2].len() as u64);
        let flat = Reader::open(&out).expect("opens");
        assert_eq!(flat.parent_index_crc(), None);
        assert_eq!(flat.summary().version, "1.0");
        assert_eq!(flat.header().memory_block_size, 4096);
        assert_eq!(flat.header().regions, reader.header().regions);
        let mut buf = vec![0u8; 4096];
        for i in 0..BLOCKS {
            let got = flat.read_block(i, &mut buf).expect("reads");
            assert!(got == chain.expected(i), "block {i}");
        }
        let zeros = (0..BLOCKS)
            .filter(|&i| chain.expected(i).iter().all(|&b| b == 0))
            .count();
        assert_eq!(stats.zero_blocks, zeros as u64);
    }

    #[test]
    fn flatten_refuses_a_layer_whose_parent_was_not_opened() {
        let chain = Chain::new();
        let alone = Reader::open(&chain.paths[2]).expect("opens");
        let out = chain.paths[0].with_file_name("flat");
        let err = flatten(&alone, &out, &WriterOptions::default(), &mut |_, _| {})
            .expect_err("incomplete chain");
        assert!(matches!(err, WriteError::CheckChain { .. }), "{err:?}");
        assert!(!out.exists());
    }

    #[test]
    fn try_clone_reads_the_chain_without_reopening_its_paths() {
        let chain = Chain::new();
        let reader = chain.open(ReaderOptions::default());
        let mut buf = vec![0u8; 4096];
        reader.read_block(1, &mut buf).expect("warms the cache");
        for path in &chain.paths {
            std::fs::remove_file(path).expect("remove");
        }
        let clone = reader.try_clone().expect("clones");
        drop(reader);
        assert_eq!(clone.chain_depth(), 3);
        for i in 0..BLOCKS {
            let got = clone.read_block(i, &mut buf).expect("reads");
            assert!(got == chain.expected(i), "block {i}");
        }
        assert_eq!(clone.verify().expect("sound"), BLOCKS);
    }

    #[test]
    fn try_clone_has_its_own_cache() {
        let chain = Chain::new();
        let reader = chain.open(ReaderOptions::default());
        let mut buf = vec![0u8; 4096];
        reader.read_block(1, &mut buf).expect("reads");
        let clone = reader.try_clone().expect("clones");
        let slots = |r: &Reader| r.cache.lock().expect("not poisoned").slots.len();
        // Block 1 is in the base, layer 2.
        assert_eq!(slots(reader.layers()[2]), 1);
        assert_eq!(slots(clone.layers()[2]), 0);
        let parent = |r: &Reader| Arc::clone(r.parent().expect("has a parent"));
        assert!(!Arc::ptr_eq(&parent(&reader), &parent(&clone)));
        assert!(!std::ptr::eq(&reader.cache, &clone.cache));
    }

    #[test]
    fn plain_files_are_still_written_and_read_as_1_0() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (path, low, high) = write_sample(dir.path(), &small());
        let bytes = std::fs::read(&path).expect("read");
        assert_eq!(bytes[10..12], [0, 0]);
        assert_eq!(bytes[28..32], [0, 0, 0, 0]);
        assert_eq!(bytes[40..48], [0; 8]);
        let reader = Reader::open_chain(&[path], ReaderOptions::default()).expect("opens");
        assert_eq!(reader.chain_depth(), 1);
        assert_eq!(reader.parent_index_crc(), None);
        let mut buf = vec![0u8; 4096];
        for i in 0..reader.block_count() {
            let info = reader.block_info(i).expect("exists");
            assert_eq!(info.layer, 0);
            let got = reader.read_block(i, &mut buf).expect("reads");
            assert_eq!(got, expected_block(&low, &high, &info));
        }
    }

    /// Sets block `block`'s kind byte in the file at `path` and makes its
    /// index and footer checksums agree again.
    fn patch_block_kind(path: &Path, block: usize, kind: u8) {
        use crate::checkpoint::format::{BLOCK_ENTRY_LEN, STORAGE_ENTRY_LEN};
        let mut bytes = std::fs::read(path).expect("read");
        let foot = bytes.len() - FOOTER_LEN;
        let le64 = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
        let index_offset = le64(&bytes, foot + 8) as usize;
        let storage_blocks = le64(&bytes, foot + 24) as usize;
        let entry = index_offset + storage_blocks * STORAGE_ENTRY_LEN + block * BLOCK_ENTRY_LEN;
        bytes[entry] = kind;
        bytes[entry + 4..entry + BLOCK_ENTRY_LEN].fill(0);
        let index_crc = crc32c::crc32c(&bytes[index_offset..foot]);
        bytes[foot + 44..foot + 48].copy_from_slice(&index_crc.to_le_bytes());
        let footer_crc = crc32c::crc32c(&bytes[foot..foot + FOOTER_LEN - 4]);
        bytes[foot + FOOTER_LEN - 4..].copy_from_slice(&footer_crc.to_le_bytes());
        std::fs::write(path, bytes).expect("write");
    }

    #[test]
    fn a_parent_block_in_a_plain_file_is_refused_at_open() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (path, ..) = write_sample(dir.path(), &small());
        // Block 0 is a zero block: only its kind changes.
        patch_block_kind(&path, 0, BlockKind::Parent.to_byte());
        let err = Reader::open(&path).expect_err("parent block without the flag");
        let text = anyhow_like(&err);
        assert!(text.contains("bad index entry for block 0"), "{text}");
        assert!(text.contains("does not mark the file as layered"), "{text}");
    }

    /// The error and its sources, joined.
    fn anyhow_like(err: &dyn std::error::Error) -> String {
        let mut text = err.to_string();
        let mut source = err.source();
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        text
    }
}
