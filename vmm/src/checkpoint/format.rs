//! On-disk layout of a stasis checkpoint file, format version 1.2.
//!
//! A checkpoint holds guest memory cut into fixed-size *memory blocks*.
//! Each memory block is stored as one of three kinds: elided when all zero,
//! zstd-compressed when that saves space, raw otherwise. Stored blocks are
//! packed in order into *storage blocks* (one staging buffer's worth each),
//! and an index at the end says where every memory block lives.
//!
//! A *layered* checkpoint (1.1, header flag [`FLAG_PARENT`]) may also mark
//! a block as being in its *parent* checkpoint: an older checkpoint of the
//! same memory, named by the CRC of its index. Plain checkpoints are still
//! written as 1.0, so 1.0 readers open them; 1.0 readers refuse layered
//! ones because of the flag.
//!
//! A 1.2 file (header flag [`FLAG_XXH64`]) checks each block's content
//! with the low 32 bits of its XXH64 (seed 0) instead of CRC-32C: the same
//! strength against damage, and cheap on every CPU, where CRC-32C is cheap
//! only where a CRC instruction runs at hardware speed (a 64 KiB block:
//! ~7 us of XXH64 against ~4 us of SSE 4.2 CRC natively, but ~30 us
//! against ~600 us under binary translation such as the test host's).
//! Snapshots write 1.2 files; backups stay 1.0/1.1, because their retired
//! records list CRC-32Cs.
//!
//! All integers are little-endian. All other checksums (header, index,
//! footer, and block content without [`FLAG_XXH64`]) are CRC-32C
//! (Castagnoli).
//!
//! ```text
//! offset 0           +------------------------------+
//!                    | header (48 bytes fixed)      |
//!                    | region table (16 B/region)   |
//!                    | header CRC (4 bytes)         |
//!                    | zero padding to 4 KiB        |
//! data_offset        +------------------------------+
//!                    | storage block 0              |  each starts 4 KiB
//!                    | zero padding to 4 KiB        |  aligned and is padded
//!                    | storage block 1 ...          |  to 4 KiB: O_DIRECT-able
//! index_offset       +------------------------------+
//!                    | storage table (16 B/block)   |
//!                    | block table (20 B/mem block) |
//! file_len - 64      +------------------------------+
//!                    | footer (64 bytes)            |
//! file_len           +------------------------------+
//! ```
//!
//! Header (fixed part):
//!
//! | off | size | field                                                |
//! |-----|------|------------------------------------------------------|
//! | 0   | 8    | magic `STASISCK`                                     |
//! | 8   | 2    | major version (1); other majors are rejected         |
//! | 10  | 2    | minor version: 0 plain, 1 layered, 2 with XXH64     |
//! |     |      | block checksums; any minor is read                   |
//! | 12  | 4    | header length: 48 + 16 × regions + 4                 |
//! | 16  | 4    | memory block size: power of two, 4 KiB ..= 2 MiB     |
//! | 20  | 4    | storage block size: multiple of 4 KiB, at least the  |
//! |     |      | memory block size, at most 64 MiB                    |
//! | 24  | 4    | region count, 1 ..= 1024                             |
//! | 28  | 4    | incompatible feature flags: bit 0 [`FLAG_PARENT`],   |
//! |     |      | bit 1 [`FLAG_XXH64`]; other bits are refused         |
//! | 32  | 8    | guest memory bytes: sum of the region sizes          |
//! | 40  | 8    | with [`FLAG_PARENT`]: the parent's index CRC in the  |
//! |     |      | low 32 bits, upper 32 bits zero; otherwise ignored   |
//!
//! Region table entry: guest-physical base (u64), size in bytes (u64).
//! Regions are sorted, non-overlapping and non-empty; their total is at most
//! 64 TiB. The header CRC covers every header byte before it.
//!
//! Memory blocks are numbered region by region, in address order: region
//! `r` holds `ceil(size_r / memory_block_size)` blocks and its last block
//! may be shorter than the memory block size.
//!
//! Storage table entry: file offset (u64, 4 KiB aligned), stored length
//! (u32, 1 ..= storage block size), reserved (u32, zero). Storage block 0
//! starts at `data_offset`; each next one starts where the previous one's
//! padded length ends, and the index starts where the last one ends.
//!
//! Block table entry: kind (u8: 0 zero, 1 raw, 2 zstd, 3 parent), 3
//! reserved bytes (zero), storage block number (u32), offset inside the
//! storage block (u32), stored length (u32), checksum of the block's
//! decompressed content (u32: CRC-32C, or XXH64's low half with
//! [`FLAG_XXH64`]). A zero or parent block has every other field
//! zero; parent blocks are allowed only with [`FLAG_PARENT`]. A raw block's stored
//! length equals its memory length; a zstd block's is shorter. Stored blocks
//! appear in block order, back to back: each starts where the previous
//! stored block ended, or at offset 0 of the next storage block, and each
//! storage block's stored length is the sum of the blocks it holds.
//!
//! Footer:
//!
//! | off | size | field                                               |
//! |-----|------|-----------------------------------------------------|
//! | 0   | 8    | magic `STASISIX`                                    |
//! | 8   | 8    | index offset                                        |
//! | 16  | 8    | index length: 16 × storage blocks + 20 × mem blocks |
//! | 24  | 8    | storage block count                                 |
//! | 32  | 8    | memory block count (must match the region table)    |
//! | 40  | 4    | header CRC (ties the footer to its header)          |
//! | 44  | 4    | index CRC, over the storage and block tables        |
//! | 48  | 12   | reserved, ignored                                   |
//! | 60  | 4    | footer CRC, over bytes 0..60                        |
//!
//! The footer is written last and the file is renamed into place only after
//! it is synced, so a file whose write was interrupted has no valid footer.
//! Every length and count read from a file is checked against the limits
//! above and against the file's real length before anything is allocated
//! from it.

use std::fmt;

/// Magic bytes at offset 0.
pub const MAGIC: [u8; 8] = *b"STASISCK";
/// Magic bytes at the start of the footer.
pub const FOOTER_MAGIC: [u8; 8] = *b"STASISIX";
/// Major format version this code reads and writes.
pub const VERSION_MAJOR: u16 = 1;
/// Highest minor format version this code writes: files with XXH64 block
/// checksums are 1.2.
pub const VERSION_MINOR: u16 = 2;
/// Minor version of plain (non-layered) files: they stay 1.0, so readers
/// that predate layers still open them.
pub const VERSION_MINOR_PLAIN: u16 = 0;
/// Minor version of layered files (those with [`FLAG_PARENT`]).
pub const VERSION_MINOR_LAYERED: u16 = 1;
/// Minor version of files with XXH64 block checksums ([`FLAG_XXH64`]),
/// layered or not.
pub const VERSION_MINOR_XXH64: u16 = 2;

/// Incompatible feature flag: the file is a layer on top of a parent
/// checkpoint; some of its blocks may be [`BlockKind::Parent`], and header
/// offset 40 holds the parent's index CRC.
pub const FLAG_PARENT: u32 = 1;
/// Incompatible feature flag: block checksums are XXH64's low 32 bits
/// ([`BlockChecksum::Xxh64`]) rather than CRC-32C.
pub const FLAG_XXH64: u32 = 2;
/// Every feature flag this code understands.
pub const KNOWN_FLAGS: u32 = FLAG_PARENT | FLAG_XXH64;

/// How a file checks its blocks' content (the block table's checksum).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockChecksum {
    /// CRC-32C (1.0 and 1.1 files).
    #[default]
    Crc32c,
    /// The low 32 bits of XXH64 with seed 0 (1.2 files, [`FLAG_XXH64`]).
    Xxh64,
}

impl BlockChecksum {
    /// The checksum of `data`.
    pub fn of(self, data: &[u8]) -> u32 {
        match self {
            BlockChecksum::Crc32c => crc32c::crc32c(data),
            BlockChecksum::Xxh64 => xxhash_rust::xxh64::xxh64(data, 0) as u32,
        }
    }

    /// Its name, as `inspect` shows it.
    pub fn name(self) -> &'static str {
        match self {
            BlockChecksum::Crc32c => "crc32c",
            BlockChecksum::Xxh64 => "xxh64",
        }
    }
}

/// Alignment of storage blocks and of the index, in bytes.
pub const ALIGN: u64 = 4096;
/// Smallest memory block size.
pub const MIN_MEMORY_BLOCK: u32 = 4 << 10;
/// Largest memory block size.
pub const MAX_MEMORY_BLOCK: u32 = 2 << 20;
/// Largest storage block size.
pub const MAX_STORAGE_BLOCK: u32 = 64 << 20;
/// Most guest memory regions a header may list.
pub const MAX_REGIONS: u32 = 1024;
/// Most guest memory a checkpoint may describe (64 TiB).
pub const MAX_GUEST_MEMORY: u64 = 1 << 46;

/// Length of the fixed part of the header.
pub const HEADER_FIXED_LEN: usize = 48;
/// Length of one region table entry.
pub const REGION_ENTRY_LEN: usize = 16;
/// Length of a CRC-32C field.
pub const CRC_LEN: usize = 4;
/// Length of the footer.
pub const FOOTER_LEN: usize = 64;
/// Length of one storage table entry.
pub const STORAGE_ENTRY_LEN: usize = 16;
/// Length of one block table entry.
pub const BLOCK_ENTRY_LEN: usize = 20;
/// Largest header: fixed part, a full region table and the CRC.
pub const MAX_HEADER_LEN: usize =
    HEADER_FIXED_LEN + REGION_ENTRY_LEN * MAX_REGIONS as usize + CRC_LEN;

/// Offsets of header fields, for error messages.
mod header_off {
    pub const HEADER_LEN: u64 = 12;
    pub const MEMORY_BLOCK: u64 = 16;
    pub const STORAGE_BLOCK: u64 = 20;
    pub const REGION_COUNT: u64 = 24;
    pub const FLAGS: u64 = 28;
    pub const MEMORY_BYTES: u64 = 32;
    pub const PARENT_INDEX_CRC: u64 = 40;
}

/// Errors found while decoding the header, footer or index.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    /// The first bytes are not the checkpoint magic.
    #[error("bad magic at offset 0: found {found:02x?}, expected \"STASISCK\"")]
    CheckMagic { found: [u8; 8] },
    /// The file was written by an incompatible format version.
    #[error("unsupported format version {major}.{minor} at offset 8 (this stasis reads {VERSION_MAJOR}.x)")]
    CheckVersion { major: u16, minor: u16 },
    /// The header's CRC does not match its content.
    #[error("header checksum mismatch at offset {offset}: stored {stored:#010x}, computed {computed:#010x}")]
    CheckHeaderCrc {
        offset: u64,
        stored: u32,
        computed: u32,
    },
    /// A header field is out of bounds or inconsistent.
    #[error("bad header field at offset {offset}: {reason}")]
    DecodeHeader { offset: u64, reason: String },
    /// The footer magic is missing: truncated or unfinished file.
    #[error("no footer at offset {offset}: the file is truncated or its write did not finish")]
    FindFooter { offset: u64 },
    /// The footer's CRC does not match its content.
    #[error("footer checksum mismatch at offset {offset}: stored {stored:#010x}, computed {computed:#010x}")]
    CheckFooterCrc {
        offset: u64,
        stored: u32,
        computed: u32,
    },
    /// A footer field is out of bounds or inconsistent.
    #[error("bad footer field at offset {offset}: {reason}")]
    DecodeFooter { offset: u64, reason: String },
    /// The index's CRC does not match its content.
    #[error("index checksum mismatch at offset {offset}: stored {stored:#010x}, computed {computed:#010x}")]
    CheckIndexCrc {
        offset: u64,
        stored: u32,
        computed: u32,
    },
    /// A storage table entry is out of bounds or inconsistent.
    #[error(
        "bad storage table entry for storage block {storage_block} at offset {offset}: {reason}"
    )]
    DecodeStorageEntry {
        storage_block: u64,
        offset: u64,
        reason: String,
    },
    /// A block table entry is out of bounds or inconsistent.
    #[error("bad index entry for block {block} at offset {offset}: {reason}")]
    DecodeBlockEntry {
        block: u64,
        offset: u64,
        reason: String,
    },
}

/// Reads a little-endian u16 at `off`; `buf` must hold it.
fn le_u16(buf: &[u8], off: usize) -> u16 {
    let mut b = [0u8; 2];
    b.copy_from_slice(&buf[off..off + 2]);
    u16::from_le_bytes(b)
}

/// Reads a little-endian u32 at `off`; `buf` must hold it.
pub(crate) fn le_u32(buf: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[off..off + 4]);
    u32::from_le_bytes(b)
}

/// Reads a little-endian u64 at `off`; `buf` must hold it.
pub(crate) fn le_u64(buf: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[off..off + 8]);
    u64::from_le_bytes(b)
}

/// Rounds `value` up to a multiple of [`ALIGN`].
pub const fn align_up(value: u64) -> u64 {
    value.div_ceil(ALIGN) * ALIGN
}

/// One guest memory region: where it sits in guest-physical space and how
/// large it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Region {
    /// Guest-physical address of the first byte.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// How a memory block is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockKind {
    /// All zero; nothing stored.
    Zero,
    /// Stored as is.
    Raw,
    /// Stored as one zstd frame.
    Zstd,
    /// Not stored here: the content is the parent checkpoint's block.
    Parent,
}

impl BlockKind {
    /// The kind's byte in the block table.
    pub fn to_byte(self) -> u8 {
        match self {
            BlockKind::Zero => 0,
            BlockKind::Raw => 1,
            BlockKind::Zstd => 2,
            BlockKind::Parent => 3,
        }
    }

    /// The kind a block table byte names, if any.
    pub fn from_byte(byte: u8) -> Option<Self> {
        match byte {
            0 => Some(BlockKind::Zero),
            1 => Some(BlockKind::Raw),
            2 => Some(BlockKind::Zstd),
            3 => Some(BlockKind::Parent),
            _ => None,
        }
    }
}

impl fmt::Display for BlockKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlockKind::Zero => "zero",
            BlockKind::Raw => "raw",
            BlockKind::Zstd => "zstd",
            BlockKind::Parent => "parent",
        })
    }
}

/// Whether `size` may be a memory block size.
pub fn valid_memory_block_size(size: u32) -> bool {
    size.is_power_of_two() && (MIN_MEMORY_BLOCK..=MAX_MEMORY_BLOCK).contains(&size)
}

/// Whether `size` may be a storage block size for `memory_block_size`.
pub fn valid_storage_block_size(size: u32, memory_block_size: u32) -> bool {
    u64::from(size) % ALIGN == 0 && size >= memory_block_size && size <= MAX_STORAGE_BLOCK
}

/// Checks both block sizes, naming the header field that is wrong.
fn check_block_sizes(memory_block_size: u32, storage_block_size: u32) -> Result<(), FormatError> {
    let bad = |offset, reason: String| FormatError::DecodeHeader { offset, reason };
    if !valid_memory_block_size(memory_block_size) {
        return Err(bad(
            header_off::MEMORY_BLOCK,
            format!(
                "memory block size {memory_block_size} is not a power of two from 4 KiB to 2 MiB"
            ),
        ));
    }
    if !valid_storage_block_size(storage_block_size, memory_block_size) {
        return Err(bad(
            header_off::STORAGE_BLOCK,
            format!(
                "storage block size {storage_block_size} is not a multiple of 4 KiB from the memory block size to 64 MiB"
            ),
        ));
    }
    Ok(())
}

/// Checks a region list: non-empty, at most [`MAX_REGIONS`], each region
/// non-empty and not wrapping, sorted, non-overlapping, total within
/// [`MAX_GUEST_MEMORY`]. Returns the total size or why it is refused.
pub fn check_regions(regions: &[Region]) -> Result<u64, String> {
    if regions.is_empty() {
        return Err("no memory regions".to_string());
    }
    if regions.len() > MAX_REGIONS as usize {
        return Err(format!(
            "{} regions, more than the limit of {MAX_REGIONS}",
            regions.len()
        ));
    }
    let mut total: u64 = 0;
    let mut prev_end: Option<u64> = None;
    for (i, r) in regions.iter().enumerate() {
        if r.size == 0 {
            return Err(format!("region {i} is empty"));
        }
        let end = r.guest_addr.checked_add(r.size).ok_or_else(|| {
            format!(
                "region {i} ({:#x} + {:#x}) wraps past 2^64",
                r.guest_addr, r.size
            )
        })?;
        if let Some(prev) = prev_end {
            if r.guest_addr < prev {
                return Err(format!(
                    "region {i} at {:#x} overlaps or precedes the region before it",
                    r.guest_addr
                ));
            }
        }
        prev_end = Some(end);
        total = total
            .checked_add(r.size)
            .filter(|t| *t <= MAX_GUEST_MEMORY)
            .ok_or_else(|| {
                format!("regions hold more than the limit of {MAX_GUEST_MEMORY} bytes")
            })?;
    }
    Ok(total)
}

/// The decoded header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Major format version.
    pub version_major: u16,
    /// Minor format version.
    pub version_minor: u16,
    /// Memory block size in bytes.
    pub memory_block_size: u32,
    /// Storage (staging) block size in bytes.
    pub storage_block_size: u32,
    /// Guest memory regions.
    pub regions: Vec<Region>,
    /// Sum of the region sizes.
    pub memory_bytes: u64,
    /// For a layered file ([`FLAG_PARENT`] set): the index CRC of the
    /// parent checkpoint it was written on top of.
    pub parent_index_crc: Option<u32>,
    /// How block content is checked ([`FLAG_XXH64`]).
    pub checksum: BlockChecksum,
    /// CRC-32C stored at the end of the header.
    pub crc: u32,
}

impl Header {
    /// Encoded length of a header with `regions` regions.
    pub fn encoded_len(regions: usize) -> usize {
        HEADER_FIXED_LEN + REGION_ENTRY_LEN * regions + CRC_LEN
    }

    /// Offset of the first storage block.
    pub fn data_offset(&self) -> u64 {
        align_up(Self::encoded_len(self.regions.len()) as u64)
    }

    /// Builds a header for a new plain (1.0) checkpoint, checking its
    /// parameters.
    pub fn new(
        memory_block_size: u32,
        storage_block_size: u32,
        regions: Vec<Region>,
    ) -> Result<Self, FormatError> {
        Self::new_layered(memory_block_size, storage_block_size, regions, None)
    }

    /// Builds a header for a new checkpoint with CRC-32C block checksums:
    /// layered (1.1, [`FLAG_PARENT`]) on top of the parent whose index CRC
    /// is `parent_index_crc` when that is given, plain (1.0) otherwise.
    pub fn new_layered(
        memory_block_size: u32,
        storage_block_size: u32,
        regions: Vec<Region>,
        parent_index_crc: Option<u32>,
    ) -> Result<Self, FormatError> {
        Self::new_with(memory_block_size, storage_block_size, regions, parent_index_crc, BlockChecksum::Crc32c)
    }

    /// [`Header::new_layered`] with the block checksum `checksum`: with
    /// [`BlockChecksum::Xxh64`] the file is 1.2, layered or not.
    pub fn new_with(
        memory_block_size: u32,
        storage_block_size: u32,
        regions: Vec<Region>,
        parent_index_crc: Option<u32>,
        checksum: BlockChecksum,
    ) -> Result<Self, FormatError> {
        let bad = |offset, reason: String| FormatError::DecodeHeader { offset, reason };
        check_block_sizes(memory_block_size, storage_block_size)?;
        let memory_bytes = check_regions(&regions).map_err(|r| bad(HEADER_FIXED_LEN as u64, r))?;
        let mut header = Header {
            version_major: VERSION_MAJOR,
            version_minor: match (checksum, parent_index_crc) {
                (BlockChecksum::Xxh64, _) => VERSION_MINOR_XXH64,
                (BlockChecksum::Crc32c, Some(_)) => VERSION_MINOR_LAYERED,
                (BlockChecksum::Crc32c, None) => VERSION_MINOR_PLAIN,
            },
            memory_block_size,
            storage_block_size,
            regions,
            memory_bytes,
            parent_index_crc,
            checksum,
            crc: 0,
        };
        let encoded = header.encode();
        header.crc = le_u32(&encoded, encoded.len() - CRC_LEN);
        Ok(header)
    }

    /// The incompatible feature flags this header sets.
    pub fn flags(&self) -> u32 {
        let parent = if self.parent_index_crc.is_some() { FLAG_PARENT } else { 0 };
        let xxh64 = if self.checksum == BlockChecksum::Xxh64 { FLAG_XXH64 } else { 0 };
        parent | xxh64
    }

    /// Whether the file is a layer on top of a parent checkpoint.
    pub fn is_layered(&self) -> bool {
        self.parent_index_crc.is_some()
    }

    /// Encodes the header, CRC included (computed afresh), without padding.
    pub fn encode(&self) -> Vec<u8> {
        let len = Self::encoded_len(self.regions.len());
        let mut buf = Vec::with_capacity(len);
        buf.extend_from_slice(&MAGIC);
        buf.extend_from_slice(&self.version_major.to_le_bytes());
        buf.extend_from_slice(&self.version_minor.to_le_bytes());
        buf.extend_from_slice(&(len as u32).to_le_bytes());
        buf.extend_from_slice(&self.memory_block_size.to_le_bytes());
        buf.extend_from_slice(&self.storage_block_size.to_le_bytes());
        buf.extend_from_slice(&(self.regions.len() as u32).to_le_bytes());
        buf.extend_from_slice(&self.flags().to_le_bytes());
        buf.extend_from_slice(&self.memory_bytes.to_le_bytes());
        let parent = u64::from(self.parent_index_crc.unwrap_or(0));
        buf.extend_from_slice(&parent.to_le_bytes());
        for r in &self.regions {
            buf.extend_from_slice(&r.guest_addr.to_le_bytes());
            buf.extend_from_slice(&r.size.to_le_bytes());
        }
        let crc = crc32c::crc32c(&buf);
        buf.extend_from_slice(&crc.to_le_bytes());
        buf
    }

    /// Decodes the fixed part far enough to learn the full header length.
    /// `fixed` must hold at least [`HEADER_FIXED_LEN`] bytes. Checks magic,
    /// version and the length bound, in that order, since a different
    /// major version may lay out everything after the version differently.
    pub fn decode_len(fixed: &[u8]) -> Result<usize, FormatError> {
        let mut magic = [0u8; 8];
        magic.copy_from_slice(&fixed[0..8]);
        if magic != MAGIC {
            return Err(FormatError::CheckMagic { found: magic });
        }
        let major = le_u16(fixed, 8);
        let minor = le_u16(fixed, 10);
        if major != VERSION_MAJOR {
            return Err(FormatError::CheckVersion { major, minor });
        }
        let header_len = le_u32(fixed, 12);
        let region_count = le_u32(fixed, 24);
        if region_count == 0 || region_count > MAX_REGIONS {
            return Err(FormatError::DecodeHeader {
                offset: header_off::REGION_COUNT,
                reason: format!("region count {region_count} is outside 1..={MAX_REGIONS}"),
            });
        }
        let expected = Self::encoded_len(region_count as usize);
        if header_len as usize != expected {
            return Err(FormatError::DecodeHeader {
                offset: header_off::HEADER_LEN,
                reason: format!("header length {header_len} does not match {region_count} regions (expected {expected})"),
            });
        }
        Ok(expected)
    }

    /// Decodes a whole header; `buf` must be exactly the length that
    /// [`Header::decode_len`] returned for its first bytes.
    pub fn decode(buf: &[u8]) -> Result<Self, FormatError> {
        let len = Self::decode_len(buf)?;
        if buf.len() != len {
            return Err(FormatError::DecodeHeader {
                offset: header_off::HEADER_LEN,
                reason: format!("header is {} bytes, expected {len}", buf.len()),
            });
        }
        let crc_off = len - CRC_LEN;
        let stored = le_u32(buf, crc_off);
        let computed = crc32c::crc32c(&buf[..crc_off]);
        if stored != computed {
            return Err(FormatError::CheckHeaderCrc {
                offset: crc_off as u64,
                stored,
                computed,
            });
        }
        let bad = |offset, reason: String| FormatError::DecodeHeader { offset, reason };
        let version_major = le_u16(buf, 8);
        let version_minor = le_u16(buf, 10);
        let memory_block_size = le_u32(buf, 16);
        let storage_block_size = le_u32(buf, 20);
        let region_count = le_u32(buf, 24) as usize;
        let flags = le_u32(buf, 28);
        let memory_bytes = le_u64(buf, 32);
        check_block_sizes(memory_block_size, storage_block_size)?;
        if flags & !KNOWN_FLAGS != 0 {
            return Err(bad(
                header_off::FLAGS,
                format!("unknown feature flags {:#x}", flags & !KNOWN_FLAGS),
            ));
        }
        // Without the flag the field is reserved, and 1.0 readers ignored it.
        let parent_index_crc = if flags & FLAG_PARENT != 0 {
            let field = le_u64(buf, header_off::PARENT_INDEX_CRC as usize);
            let crc = u32::try_from(field).map_err(|_| {
                bad(
                    header_off::PARENT_INDEX_CRC,
                    format!("parent index checksum field {field:#x} has its upper 32 bits set"),
                )
            })?;
            Some(crc)
        } else {
            None
        };
        let regions: Vec<Region> = (0..region_count)
            .map(|i| {
                let off = HEADER_FIXED_LEN + i * REGION_ENTRY_LEN;
                Region {
                    guest_addr: le_u64(buf, off),
                    size: le_u64(buf, off + 8),
                }
            })
            .collect();
        let total = check_regions(&regions).map_err(|r| bad(HEADER_FIXED_LEN as u64, r))?;
        if total != memory_bytes {
            return Err(bad(
                header_off::MEMORY_BYTES,
                format!("memory size {memory_bytes} differs from the regions' total {total}"),
            ));
        }
        Ok(Header {
            version_major,
            version_minor,
            memory_block_size,
            storage_block_size,
            regions,
            memory_bytes,
            parent_index_crc,
            checksum: if flags & FLAG_XXH64 != 0 { BlockChecksum::Xxh64 } else { BlockChecksum::Crc32c },
            crc: stored,
        })
    }
}

/// The decoded footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer {
    /// File offset of the storage table.
    pub index_offset: u64,
    /// Length of storage table plus block table.
    pub index_len: u64,
    /// Number of storage blocks.
    pub storage_blocks: u64,
    /// Number of memory blocks.
    pub memory_blocks: u64,
    /// CRC of the header this footer belongs to.
    pub header_crc: u32,
    /// CRC of the index.
    pub index_crc: u32,
}

impl Footer {
    /// Encodes the footer with its CRC.
    pub fn encode(&self) -> [u8; FOOTER_LEN] {
        let mut buf = [0u8; FOOTER_LEN];
        buf[0..8].copy_from_slice(&FOOTER_MAGIC);
        buf[8..16].copy_from_slice(&self.index_offset.to_le_bytes());
        buf[16..24].copy_from_slice(&self.index_len.to_le_bytes());
        buf[24..32].copy_from_slice(&self.storage_blocks.to_le_bytes());
        buf[32..40].copy_from_slice(&self.memory_blocks.to_le_bytes());
        buf[40..44].copy_from_slice(&self.header_crc.to_le_bytes());
        buf[44..48].copy_from_slice(&self.index_crc.to_le_bytes());
        let crc = crc32c::crc32c(&buf[..FOOTER_LEN - CRC_LEN]);
        buf[FOOTER_LEN - CRC_LEN..].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    /// Decodes a footer found at `footer_offset` in a file of `file_len`
    /// bytes whose header is `header`, checking every field against the
    /// header and the file length.
    pub fn decode(
        buf: &[u8; FOOTER_LEN],
        footer_offset: u64,
        header: &Header,
        memory_blocks: u64,
    ) -> Result<Self, FormatError> {
        if buf[0..8] != FOOTER_MAGIC {
            return Err(FormatError::FindFooter {
                offset: footer_offset,
            });
        }
        let crc_off = FOOTER_LEN - CRC_LEN;
        let stored = le_u32(buf, crc_off);
        let computed = crc32c::crc32c(&buf[..crc_off]);
        if stored != computed {
            return Err(FormatError::CheckFooterCrc {
                offset: footer_offset + crc_off as u64,
                stored,
                computed,
            });
        }
        let footer = Footer {
            index_offset: le_u64(buf, 8),
            index_len: le_u64(buf, 16),
            storage_blocks: le_u64(buf, 24),
            memory_blocks: le_u64(buf, 32),
            header_crc: le_u32(buf, 40),
            index_crc: le_u32(buf, 44),
        };
        let bad = |field: u64, reason: String| FormatError::DecodeFooter {
            offset: footer_offset + field,
            reason,
        };
        if footer.header_crc != header.crc {
            return Err(bad(
                40,
                format!(
                    "footer belongs to a header with checksum {:#010x}, not this one ({:#010x})",
                    footer.header_crc, header.crc
                ),
            ));
        }
        if footer.memory_blocks != memory_blocks {
            return Err(bad(
                32,
                format!(
                    "memory block count {} differs from the {memory_blocks} the regions need",
                    footer.memory_blocks
                ),
            ));
        }
        let data_offset = header.data_offset();
        if footer.index_offset < data_offset || footer.index_offset % ALIGN != 0 {
            return Err(bad(
                8,
                format!(
                    "index offset {} is not a 4 KiB aligned offset at or after the data start {data_offset}",
                    footer.index_offset
                ),
            ));
        }
        let index_end = footer.index_offset.checked_add(footer.index_len);
        if index_end != Some(footer_offset) {
            return Err(bad(
                16,
                format!(
                    "index at {} of length {} does not end where the footer starts ({footer_offset})",
                    footer.index_offset, footer.index_len
                ),
            ));
        }
        // Each storage block takes at least ALIGN bytes of the data area.
        let max_storage = (footer.index_offset - data_offset) / ALIGN;
        if footer.storage_blocks > max_storage {
            return Err(bad(
                24,
                format!(
                    "storage block count {} cannot fit in a data area of {} bytes",
                    footer.storage_blocks,
                    footer.index_offset - data_offset
                ),
            ));
        }
        let expected_len = footer.storage_blocks * STORAGE_ENTRY_LEN as u64
            + memory_blocks * BLOCK_ENTRY_LEN as u64;
        if footer.index_len != expected_len {
            return Err(bad(
                16,
                format!(
                    "index length {} does not match {} storage and {memory_blocks} memory blocks (expected {expected_len})",
                    footer.index_len, footer.storage_blocks
                ),
            ));
        }
        Ok(footer)
    }
}

/// One storage table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageEntry {
    /// File offset of the storage block.
    pub file_offset: u64,
    /// Bytes stored in it (before padding).
    pub stored_len: u32,
}

impl StorageEntry {
    /// Appends the encoded entry to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.file_offset.to_le_bytes());
        out.extend_from_slice(&self.stored_len.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
    }

    /// Decodes an entry from [`STORAGE_ENTRY_LEN`] bytes.
    pub fn decode(buf: &[u8]) -> Self {
        StorageEntry {
            file_offset: le_u64(buf, 0),
            stored_len: le_u32(buf, 8),
        }
    }

    /// The entry's length on disk, padding included.
    pub fn padded_len(&self) -> u64 {
        align_up(u64::from(self.stored_len))
    }
}

/// One block table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockEntry {
    /// How the block is stored.
    pub kind: BlockKind,
    /// Storage block holding it (0 for zero and parent blocks).
    pub storage_block: u32,
    /// Offset inside that storage block.
    pub offset: u32,
    /// Stored length.
    pub stored_len: u32,
    /// CRC-32C of the decompressed content (0 for zero and parent blocks).
    pub crc: u32,
}

impl BlockEntry {
    /// The entry of an all-zero block.
    pub const ZERO: BlockEntry = BlockEntry {
        kind: BlockKind::Zero,
        storage_block: 0,
        offset: 0,
        stored_len: 0,
        crc: 0,
    };

    /// The entry of a block whose content is in the parent checkpoint.
    pub const PARENT: BlockEntry = BlockEntry {
        kind: BlockKind::Parent,
        storage_block: 0,
        offset: 0,
        stored_len: 0,
        crc: 0,
    };

    /// Appends the encoded entry to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(self.kind.to_byte());
        out.extend_from_slice(&[0u8; 3]);
        out.extend_from_slice(&self.storage_block.to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.stored_len.to_le_bytes());
        out.extend_from_slice(&self.crc.to_le_bytes());
    }

    /// Decodes an entry from [`BLOCK_ENTRY_LEN`] bytes; `None` if the kind
    /// byte is unknown.
    pub fn decode(buf: &[u8]) -> Option<Self> {
        Some(BlockEntry {
            kind: BlockKind::from_byte(buf[0])?,
            storage_block: le_u32(buf, 4),
            offset: le_u32(buf, 8),
            stored_len: le_u32(buf, 12),
            crc: le_u32(buf, 16),
        })
    }
}

/// Decodes and cross-checks the index (storage table then block table).
///
/// `index` is exactly `footer.index_len` bytes read from
/// `footer.index_offset`; its CRC is checked first. Every entry is then
/// checked so that later reads cannot go out of bounds or return another
/// block's bytes: storage blocks tile the data area in order, and stored
/// memory blocks tile the storage blocks in order.
pub fn decode_index(
    index: &[u8],
    header: &Header,
    footer: &Footer,
    map: &BlockMap,
) -> Result<(Vec<StorageEntry>, Vec<BlockEntry>), FormatError> {
    let computed = crc32c::crc32c(index);
    if computed != footer.index_crc {
        return Err(FormatError::CheckIndexCrc {
            offset: footer.index_offset,
            stored: footer.index_crc,
            computed,
        });
    }
    let storage_count = footer.storage_blocks as usize;
    let storage_table_len = storage_count * STORAGE_ENTRY_LEN;
    let mut storage = Vec::with_capacity(storage_count);
    let mut expected_offset = header.data_offset();
    for (i, chunk) in index[..storage_table_len]
        .chunks_exact(STORAGE_ENTRY_LEN)
        .enumerate()
    {
        let entry = StorageEntry::decode(chunk);
        let bad = |reason: String| FormatError::DecodeStorageEntry {
            storage_block: i as u64,
            offset: footer.index_offset + (i * STORAGE_ENTRY_LEN) as u64,
            reason,
        };
        if entry.file_offset != expected_offset {
            return Err(bad(format!(
                "file offset {} is not where the previous block ends ({expected_offset})",
                entry.file_offset
            )));
        }
        if entry.stored_len == 0 || entry.stored_len > header.storage_block_size {
            return Err(bad(format!(
                "stored length {} is outside 1..={}",
                entry.stored_len, header.storage_block_size
            )));
        }
        expected_offset += entry.padded_len();
        if expected_offset > footer.index_offset {
            return Err(bad(format!(
                "block runs past the index start ({})",
                footer.index_offset
            )));
        }
        storage.push(entry);
    }
    if expected_offset != footer.index_offset {
        return Err(FormatError::DecodeFooter {
            offset: footer.index_offset + footer.index_len + 8,
            reason: format!(
                "data area ends at {expected_offset} but the index starts at {}",
                footer.index_offset
            ),
        });
    }

    let block_count = map.block_count();
    let mut blocks = Vec::with_capacity(block_count);
    // Where the next stored block must start: (storage block, offset).
    let mut cursor: Option<(u32, u32)> = None;
    let mut filled = vec![0u64; storage_count];
    for (i, chunk) in index[storage_table_len..]
        .chunks_exact(BLOCK_ENTRY_LEN)
        .enumerate()
    {
        let entry_offset = footer.index_offset + (storage_table_len + i * BLOCK_ENTRY_LEN) as u64;
        let bad = |reason: String| FormatError::DecodeBlockEntry {
            block: i as u64,
            offset: entry_offset,
            reason,
        };
        let entry = BlockEntry::decode(chunk)
            .ok_or_else(|| bad(format!("unknown block kind {}", chunk[0])))?;
        if chunk[1..4] != [0, 0, 0] {
            return Err(bad("reserved bytes are not zero".to_string()));
        }
        let block_len = map.block_len(i);
        match entry.kind {
            BlockKind::Zero => {
                if entry != BlockEntry::ZERO {
                    return Err(bad("zero block has non-zero fields".to_string()));
                }
            }
            BlockKind::Parent => {
                if !header.is_layered() {
                    return Err(bad(
                        "block is in a parent checkpoint, but the header does not mark the file as layered (feature flag bit 0)"
                            .to_string(),
                    ));
                }
                if entry != BlockEntry::PARENT {
                    return Err(bad("parent block has non-zero fields".to_string()));
                }
            }
            BlockKind::Raw | BlockKind::Zstd => {
                let ok_len = match entry.kind {
                    BlockKind::Raw => entry.stored_len as usize == block_len,
                    _ => entry.stored_len > 0 && (entry.stored_len as usize) < block_len,
                };
                if !ok_len {
                    return Err(bad(format!(
                        "{} block of {block_len} bytes has stored length {}",
                        entry.kind, entry.stored_len
                    )));
                }
                let sb = entry.storage_block as usize;
                let Some(se) = storage.get(sb) else {
                    return Err(bad(format!(
                        "storage block {sb} does not exist (there are {storage_count})"
                    )));
                };
                let expected = match cursor {
                    Some((cur_sb, cur_off)) if cur_sb == entry.storage_block => cur_off,
                    Some((cur_sb, _)) if cur_sb + 1 == entry.storage_block => 0,
                    None if entry.storage_block == 0 => 0,
                    _ => return Err(bad(format!("storage block {sb} is out of order"))),
                };
                if entry.offset != expected {
                    return Err(bad(format!(
                        "offset {} in storage block {sb} is not where the previous block ends ({expected})",
                        entry.offset
                    )));
                }
                let end = u64::from(entry.offset) + u64::from(entry.stored_len);
                if end > u64::from(se.stored_len) {
                    return Err(bad(format!(
                        "stored bytes {}..{end} run past storage block {sb}'s {} bytes",
                        entry.offset, se.stored_len
                    )));
                }
                filled[sb] = end;
                cursor = Some((entry.storage_block, end as u32));
            }
        }
        blocks.push(entry);
    }
    if let Some(sb) = (0..storage_count).find(|&sb| filled[sb] != u64::from(storage[sb].stored_len))
    {
        return Err(FormatError::DecodeStorageEntry {
            storage_block: sb as u64,
            offset: footer.index_offset + (sb * STORAGE_ENTRY_LEN) as u64,
            reason: format!(
                "stored length {} differs from the {} bytes its blocks fill",
                storage[sb].stored_len, filled[sb]
            ),
        });
    }
    Ok((storage, blocks))
}

/// Maps memory block numbers to guest addresses and back.
#[derive(Debug, Clone)]
pub struct BlockMap {
    regions: Vec<Region>,
    /// Number of the first block of each region, plus the total at the end.
    first_block: Vec<usize>,
    block_size: u64,
}

impl BlockMap {
    /// Builds the map of checked `regions` cut into `block_size` blocks.
    pub fn new(regions: &[Region], block_size: u32) -> Self {
        let block_size = u64::from(block_size);
        let mut first_block = Vec::with_capacity(regions.len() + 1);
        let mut next = 0usize;
        for r in regions {
            first_block.push(next);
            next += r.size.div_ceil(block_size) as usize;
        }
        first_block.push(next);
        BlockMap {
            regions: regions.to_vec(),
            first_block,
            block_size,
        }
    }

    /// Total number of memory blocks.
    pub fn block_count(&self) -> usize {
        self.first_block.last().copied().unwrap_or(0)
    }

    /// Region number, offset in the region and length of block `i`.
    /// `i` must be below [`BlockMap::block_count`].
    pub fn locate(&self, i: usize) -> (usize, u64, usize) {
        // The last region whose first block is at or before `i`.
        let r = self.first_block.partition_point(|&f| f <= i) - 1;
        let offset = (i - self.first_block[r]) as u64 * self.block_size;
        let len = (self.regions[r].size - offset).min(self.block_size);
        (r, offset, len as usize)
    }

    /// Guest-physical address of block `i`.
    pub fn guest_addr(&self, i: usize) -> u64 {
        let (r, offset, _) = self.locate(i);
        self.regions[r].guest_addr + offset
    }

    /// Length of block `i`.
    pub fn block_len(&self, i: usize) -> usize {
        self.locate(i).2
    }

    /// The block holding guest-physical address `gpa`, if any.
    pub fn block_of(&self, gpa: u64) -> Option<usize> {
        let r = self
            .regions
            .partition_point(|reg| reg.guest_addr <= gpa)
            .checked_sub(1)?;
        let region = &self.regions[r];
        let offset = gpa - region.guest_addr;
        if offset >= region.size {
            return None;
        }
        Some(self.first_block[r] + (offset / self.block_size) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_regions() -> Vec<Region> {
        vec![
            Region {
                guest_addr: 0,
                size: 3 * 4096 + 100,
            },
            Region {
                guest_addr: 1 << 32,
                size: 8192,
            },
        ]
    }

    #[test]
    fn header_round_trips_through_encode_and_decode() {
        let header = Header::new(4096, 1 << 20, two_regions()).expect("valid header");
        let bytes = header.encode();
        assert_eq!(bytes.len(), Header::encoded_len(2));
        assert_eq!(Header::decode(&bytes).expect("decodes"), header);
    }

    #[test]
    fn header_decode_rejects_wrong_magic_before_anything_else() {
        let mut bytes = Header::new(4096, 1 << 20, two_regions())
            .expect("valid")
            .encode();
        bytes[0] = b'X';
        assert!(matches!(
            Header::decode(&bytes),
            Err(FormatError::CheckMagic { .. })
        ));
    }

    #[test]
    fn header_decode_rejects_unknown_major_version() {
        let mut bytes = Header::new(4096, 1 << 20, two_regions())
            .expect("valid")
            .encode();
        bytes[8..10].copy_from_slice(&2u16.to_le_bytes());
        assert_eq!(
            Header::decode(&bytes),
            Err(FormatError::CheckVersion { major: 2, minor: 0 })
        );
    }

    #[test]
    fn header_new_rejects_block_size_that_is_not_a_power_of_two() {
        assert!(Header::new(12288, 1 << 20, two_regions()).is_err());
        assert!(Header::new(2048, 1 << 20, two_regions()).is_err());
        assert!(Header::new(4 << 20, 8 << 20, two_regions()).is_err());
    }

    #[test]
    fn header_new_rejects_storage_block_smaller_than_memory_block() {
        assert!(Header::new(2 << 20, 1 << 20, two_regions()).is_err());
    }

    #[test]
    fn check_regions_rejects_overlap_wrap_and_empty() {
        let overlap = [
            Region {
                guest_addr: 0,
                size: 8192,
            },
            Region {
                guest_addr: 4096,
                size: 4096,
            },
        ];
        assert!(check_regions(&overlap).is_err());
        let wrap = [Region {
            guest_addr: u64::MAX - 10,
            size: 4096,
        }];
        assert!(check_regions(&wrap).is_err());
        let empty = [Region {
            guest_addr: 0,
            size: 0,
        }];
        assert!(check_regions(&empty).is_err());
        assert!(check_regions(&[]).is_err());
    }

    #[test]
    fn footer_round_trips_and_rejects_a_flipped_bit() {
        let header = Header::new(4096, 1 << 20, two_regions()).expect("valid");
        let map = BlockMap::new(&header.regions, 4096);
        let footer = Footer {
            index_offset: 8192,
            index_len: 16 + 20 * map.block_count() as u64,
            storage_blocks: 1,
            memory_blocks: map.block_count() as u64,
            header_crc: header.crc,
            index_crc: 7,
        };
        let footer_offset = footer.index_offset + footer.index_len;
        let mut bytes = footer.encode();
        let decoded = Footer::decode(&bytes, footer_offset, &header, map.block_count() as u64);
        assert_eq!(decoded, Ok(footer));
        bytes[20] ^= 0x10;
        let decoded = Footer::decode(&bytes, footer_offset, &header, map.block_count() as u64);
        assert!(matches!(decoded, Err(FormatError::CheckFooterCrc { .. })));
    }

    #[test]
    fn block_map_numbers_blocks_region_by_region_with_short_tail() {
        let map = BlockMap::new(&two_regions(), 4096);
        assert_eq!(map.block_count(), 4 + 2);
        assert_eq!(map.locate(3), (0, 3 * 4096, 100));
        assert_eq!(map.locate(4), (1, 0, 4096));
        assert_eq!(map.guest_addr(5), (1 << 32) + 4096);
    }

    #[test]
    fn block_map_block_of_finds_blocks_and_rejects_holes() {
        let map = BlockMap::new(&two_regions(), 4096);
        assert_eq!(map.block_of(0), Some(0));
        assert_eq!(map.block_of(3 * 4096 + 99), Some(3));
        assert_eq!(map.block_of(3 * 4096 + 100), None);
        assert_eq!(map.block_of((1 << 32) + 8191), Some(5));
        assert_eq!(map.block_of((1 << 32) + 8192), None);
        assert_eq!(map.block_of(u64::MAX), None);
    }

    /// `bytes` with its header CRC recomputed.
    fn with_fresh_crc(mut bytes: Vec<u8>) -> Vec<u8> {
        let crc_off = bytes.len() - CRC_LEN;
        let crc = crc32c::crc32c(&bytes[..crc_off]);
        bytes[crc_off..].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    #[test]
    fn plain_header_is_version_1_0_without_flags() {
        let header = Header::new(4096, 1 << 20, two_regions()).expect("valid");
        let bytes = header.encode();
        assert_eq!(le_u16(&bytes, 10), 0);
        assert_eq!(le_u32(&bytes, 28), 0);
        assert_eq!(le_u64(&bytes, 40), 0);
        assert_eq!(header.parent_index_crc, None);
    }

    #[test]
    fn layered_header_round_trips_with_flag_and_parent_crc() {
        let header =
            Header::new_layered(4096, 1 << 20, two_regions(), Some(0xdead_beef)).expect("valid");
        let bytes = header.encode();
        assert_eq!(le_u16(&bytes, 10), 1);
        assert_eq!(le_u32(&bytes, 28), FLAG_PARENT);
        assert_eq!(le_u64(&bytes, 40), 0xdead_beef);
        let decoded = Header::decode(&bytes).expect("decodes");
        assert_eq!(decoded, header);
        assert_eq!(decoded.parent_index_crc, Some(0xdead_beef));
    }

    #[test]
    fn xxh64_header_is_version_1_2_with_its_flag_layered_or_not() {
        for parent in [None, Some(0xdead_beef)] {
            let header = Header::new_with(4096, 1 << 20, two_regions(), parent, BlockChecksum::Xxh64).expect("valid");
            let bytes = header.encode();
            assert_eq!(le_u16(&bytes, 10), 2);
            let parent_flag = if parent.is_some() { FLAG_PARENT } else { 0 };
            assert_eq!(le_u32(&bytes, 28), FLAG_XXH64 | parent_flag);
            let decoded = Header::decode(&bytes).expect("decodes");
            assert_eq!(decoded, header);
            assert_eq!(decoded.checksum, BlockChecksum::Xxh64);
            assert_eq!(decoded.parent_index_crc, parent);
        }
        assert_eq!(Header::new(4096, 1 << 20, two_regions()).expect("valid").checksum, BlockChecksum::Crc32c);
    }

    #[test]
    fn block_checksums_are_crc32c_or_xxh64s_low_half() {
        // Reference values: CRC-32C of "123456789" (RFC 3720) and XXH64
        // of the empty input with seed 0.
        assert_eq!(BlockChecksum::Crc32c.of(b"123456789"), 0xe306_9283);
        assert_eq!(BlockChecksum::Xxh64.of(b""), 0xef46_db37_51d8_e999_u64 as u32);
        assert_ne!(BlockChecksum::Xxh64.of(&[0u8; 4096]), BlockChecksum::Xxh64.of(&[1u8; 4096]));
    }

    #[test]
    fn header_decode_refuses_unknown_flags_and_a_wide_parent_crc() {
        let bytes = Header::new_layered(4096, 1 << 20, two_regions(), Some(1))
            .expect("valid")
            .encode();
        let mut unknown = bytes.clone();
        unknown[28..32].copy_from_slice(&(FLAG_PARENT | 4).to_le_bytes());
        let err = Header::decode(&with_fresh_crc(unknown)).expect_err("unknown flag");
        assert!(
            err.to_string().contains("unknown feature flags 0x4"),
            "{err}"
        );
        let mut wide = bytes;
        wide[40..48].copy_from_slice(&(1u64 << 32 | 1).to_le_bytes());
        let err = Header::decode(&with_fresh_crc(wide)).expect_err("upper bits");
        assert!(
            matches!(err, FormatError::DecodeHeader { offset: 40, .. }),
            "{err}"
        );
    }

    #[test]
    fn plain_header_ignores_the_reserved_field() {
        let mut bytes = Header::new(4096, 1 << 20, two_regions())
            .expect("valid")
            .encode();
        bytes[40..48].copy_from_slice(&u64::MAX.to_le_bytes());
        let decoded = Header::decode(&with_fresh_crc(bytes)).expect("1.0 ignored it");
        assert_eq!(decoded.parent_index_crc, None);
    }

    #[test]
    fn block_entry_kind_bytes_round_trip_including_parent() {
        for kind in [
            BlockKind::Zero,
            BlockKind::Raw,
            BlockKind::Zstd,
            BlockKind::Parent,
        ] {
            assert_eq!(BlockKind::from_byte(kind.to_byte()), Some(kind));
        }
        assert_eq!(BlockKind::Parent.to_byte(), 3);
        assert_eq!(BlockKind::Parent.to_string(), "parent");
    }

    #[test]
    fn block_entry_decode_rejects_unknown_kind() {
        let mut bytes = Vec::new();
        BlockEntry::ZERO.encode_into(&mut bytes);
        bytes[0] = 9;
        assert_eq!(BlockEntry::decode(&bytes), None);
    }
}
