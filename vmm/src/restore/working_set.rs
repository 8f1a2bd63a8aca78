//! Working sets: the memory blocks a restored guest needs first, in the
//! order it needs them.
//!
//! A lazily restored guest spends its first second or so faulting in the
//! blocks it needs to run again: the kernel's text and data, page tables,
//! the stacks of the threads that wake, the shell and what it runs. Each
//! fault is a round trip through the fault handler. The working set is
//! that list, recorded once and loaded ahead of the guest by every later
//! restore of the same snapshot, in bulk and in parallel, so the guest
//! finds those blocks in place.
//!
//! **How it is recorded.** A lazy restore of a snapshot without a working
//! set records one: for a window after memory is set up (2 s by default)
//! the fault handler notes each block the guest faults on, in the order of
//! the faults, and which pages of it the guest touched. Background
//! prefetch waits for the window to end, so that each page the guest needs
//! in that time is seen as a fault and none is hidden by having been
//! prefetched; for the same reason a fault meanwhile loads only its own
//! page (from the block, decompressed once), not the whole block. The
//! list is then saved beside the snapshot as [`WORKING_SET_FILE`].
//!
//! **Why pages.** The guest touches about a quarter of the pages of the
//! blocks it needs on its way back (1,256 of 4,608 in the 288 blocks of the
//! benchmark guest's set). A restore that loads the set before the vCPUs
//! start allocates and fills only those pages; the rest of each block
//! comes in on a fault if the guest ever touches it. Allocating a page
//! costs about as much as decompressing it in the test host (see
//! docs/snapshots.md), so this saves most of the allocation; decompression
//! is by whole blocks either way. Version 1 files, from before pages were
//! recorded, still load: as whole blocks. Faults are the one
//! exact record of what the guest reads as well as writes: dirty tracking
//! before the snapshot would see only the writes, and the restore path is
//! mostly reads (kernel text, the shell's code).
//!
//! **What it is bound to.** The file names the checkpoint it was recorded
//! for by the checkpoint's index checksum (for a chain, the newest
//! layer's), its block size and block count, and carries a CRC-32C of its
//! block list. A file that does not match the snapshot's checkpoint, or is
//! damaged, is ignored with a warning (and a fresh one recorded in its
//! place); it can never make a restore load wrong data, since blocks
//! always come from the checkpoint itself. It is metadata only: a list of
//! block numbers and page masks, a few KiB, never a second copy of memory.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::checkpoint::Reader;

/// The working set's file in a snapshot directory.
pub const WORKING_SET_FILE: &str = "working-set.json";

/// The `format` field of the file.
const FORMAT: &str = "stasis-working-set";

/// The file's version: 2 has page masks; 1 (whole blocks) is still read.
const VERSION: u32 = 2;

/// Bytes of a page, the unit of a page mask.
const PAGE: usize = 4096;

/// Longest file read: a list of a million block numbers is far more than
/// any checkpoint needs (a 64 GiB guest has a million 64 KiB blocks).
const MAX_FILE_BYTES: u64 = 16 << 20;

/// Errors of loading or saving a working set.
#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    /// The file could not be read.
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is larger than any working set.
    #[error("{path} is {bytes} bytes, larger than a working set can be")]
    TooLarge { path: PathBuf, bytes: u64 },
    /// The file is not a working set's JSON.
    #[error("{path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
    /// The file was recorded for another checkpoint.
    #[error(
        "{path} was recorded for a different checkpoint (index checksum {recorded:#010x}, this snapshot's is {actual:#010x})"
    )]
    OtherCheckpoint { path: PathBuf, recorded: u32, actual: u32 },
    /// The file could not be written.
    #[error("cannot save the working set to {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The file's JSON form.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileForm {
    format: String,
    version: u32,
    /// Index checksum of the checkpoint it was recorded for.
    checkpoint_index_crc: u32,
    memory_block_size: u32,
    block_count: u64,
    /// How long the recording ran, in milliseconds.
    window_ms: u64,
    /// Block numbers, in the order the guest first needed them.
    blocks: Vec<u64>,
    /// Version 2: the page mask of each block, `mask_words` words each
    /// (see [`WorkingSet::pages`]). Absent in version 1.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pages: Vec<u64>,
    /// CRC-32C of `blocks` and then `pages` as little-endian u64s.
    blocks_crc: u32,
}

/// A working set, checked against the checkpoint it is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkingSet {
    /// Block numbers of the checkpoint, each once, in the order to load.
    pub blocks: Vec<usize>,
    /// The pages of each block the guest touched: for `blocks[i]`, words
    /// `i * w..(i + 1) * w` with `w` = [`mask_words`] of the block size,
    /// page 0 of the block in bit 0 of the first word. Empty: every page of
    /// every block (a version 1 file).
    pub pages: Vec<u64>,
    /// How long the recording ran, in milliseconds.
    pub window_ms: u64,
}

impl WorkingSet {
    /// A set of whole blocks.
    pub fn whole_blocks(blocks: Vec<usize>, window_ms: u64) -> Self {
        WorkingSet { blocks, pages: Vec::new(), window_ms }
    }

    /// The page mask of `blocks[i]` for blocks of `block_size` bytes;
    /// `None` when the set is of whole blocks.
    pub fn page_mask(&self, i: usize, block_size: usize) -> Option<&[u64]> {
        let w = mask_words(block_size);
        self.pages.get(i * w..(i + 1) * w)
    }

    /// How many pages of guest memory the set names.
    pub fn page_count(&self, block_size: usize) -> usize {
        if self.pages.is_empty() {
            self.blocks.len() * block_size.div_ceil(PAGE)
        } else {
            self.pages.iter().map(|w| w.count_ones() as usize).sum()
        }
    }
}

/// Words of a page mask for blocks of `block_size` bytes.
pub fn mask_words(block_size: usize) -> usize {
    block_size.div_ceil(PAGE).div_ceil(64)
}

/// Whether `mask` names every page of a block of `len` bytes.
pub fn covers(mask: &[u64], len: usize) -> bool {
    (0..len.div_ceil(PAGE)).all(|p| has_page(mask, p))
}

/// Whether page `page` is set in `mask`.
pub fn has_page(mask: &[u64], page: usize) -> bool {
    mask.get(page / 64).is_some_and(|w| w & (1 << (page % 64)) != 0)
}

/// What the working set of a snapshot directory is, for `inspect`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct WorkingSetSummary {
    /// The file.
    pub path: PathBuf,
    /// Blocks in it.
    pub blocks: usize,
    /// Their guest memory bytes.
    pub bytes: u64,
    /// The pages of those blocks the guest touched (all of them for a
    /// version 1 file).
    pub pages: usize,
    /// How long the recording ran, in milliseconds.
    pub window_ms: u64,
}

fn blocks_crc(blocks: &[u64], pages: &[u64]) -> u32 {
    let bytes: Vec<u8> = blocks.iter().chain(pages).flat_map(|b| b.to_le_bytes()).collect();
    crc32c::crc32c(&bytes)
}

/// The working set file of snapshot directory `dir`.
pub fn path_in(dir: &Path) -> PathBuf {
    dir.join(WORKING_SET_FILE)
}

/// Loads the working set of snapshot directory `dir` for the checkpoint
/// `reader` reads; `Ok(None)` when there is none.
pub fn load(dir: &Path, reader: &Reader) -> Result<Option<WorkingSet>, WorkingSetError> {
    let path = path_in(dir);
    let mut file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(WorkingSetError::Read { path, source }),
    };
    let mut text = Vec::new();
    (&mut file)
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(|source| WorkingSetError::Read { path: path.clone(), source })?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(WorkingSetError::TooLarge { path, bytes: text.len() as u64 });
    }
    parse(&path, &text, reader.index_crc(), reader.header().memory_block_size, reader.block_count()).map(Some)
}

/// Checks the file's bytes against the checkpoint (`index_crc`,
/// `block_size`, `block_count`).
fn parse(
    path: &Path,
    text: &[u8],
    index_crc: u32,
    block_size: u32,
    block_count: usize,
) -> Result<WorkingSet, WorkingSetError> {
    let damaged = |reason: String| WorkingSetError::Damaged { path: path.to_path_buf(), reason };
    let form: FileForm = serde_json::from_slice(text).map_err(|e| damaged(e.to_string()))?;
    if form.format != FORMAT {
        return Err(damaged(format!("its format is {:?}, not {FORMAT:?}", form.format)));
    }
    if form.version != 1 && form.version != VERSION {
        return Err(damaged(format!("version {} is not supported (this build reads 1 and {VERSION})", form.version)));
    }
    if blocks_crc(&form.blocks, &form.pages) != form.blocks_crc {
        return Err(damaged("its block list does not match its checksum".into()));
    }
    if form.checkpoint_index_crc != index_crc {
        return Err(WorkingSetError::OtherCheckpoint {
            path: path.to_path_buf(),
            recorded: form.checkpoint_index_crc,
            actual: index_crc,
        });
    }
    if form.memory_block_size != block_size || form.block_count != block_count as u64 {
        return Err(damaged(format!(
            "it describes {} blocks of {} bytes, the checkpoint has {block_count} of {block_size}",
            form.block_count, form.memory_block_size
        )));
    }
    let mut seen = vec![false; block_count];
    let mut blocks = Vec::with_capacity(form.blocks.len());
    for &block in &form.blocks {
        let index = usize::try_from(block).ok().filter(|&i| i < block_count);
        let Some(index) = index else {
            return Err(damaged(format!("block {block} is beyond the checkpoint's {block_count}")));
        };
        if std::mem::replace(&mut seen[index], true) {
            return Err(damaged(format!("block {block} is listed twice")));
        }
        blocks.push(index);
    }
    // Version 1 has no masks; version 2 one per block, naming at least one
    // page and none past the block's end.
    let w = mask_words(block_size as usize);
    let pages_per_block = (block_size as usize).div_ceil(PAGE);
    if form.version == 1 && !form.pages.is_empty() {
        return Err(damaged("a version 1 file has no page masks".into()));
    }
    if form.version == VERSION {
        if form.pages.len() != blocks.len() * w {
            return Err(damaged(format!(
                "it has {} page mask words for {} blocks ({w} each expected)",
                form.pages.len(),
                blocks.len()
            )));
        }
        for (i, mask) in form.pages.chunks(w).enumerate() {
            let past_end = (pages_per_block..w * 64).any(|p| has_page(mask, p));
            if mask.iter().all(|&word| word == 0) || past_end {
                return Err(damaged(format!("the page mask of block {} is not one of its pages", blocks[i])));
            }
        }
    }
    Ok(WorkingSet { blocks, pages: form.pages, window_ms: form.window_ms })
}

/// Saves `set`, recorded for the checkpoint `reader` reads, as the
/// working set of snapshot directory `dir`, crash-safely: a temporary file
/// written and synced, renamed over any old one, the directory synced.
pub fn save(dir: &Path, reader: &Reader, set: &WorkingSet) -> Result<PathBuf, WorkingSetError> {
    let path = path_in(dir);
    let blocks: Vec<u64> = set.blocks.iter().map(|&b| b as u64).collect();
    let form = FileForm {
        format: FORMAT.into(),
        version: if set.pages.is_empty() { 1 } else { VERSION },
        checkpoint_index_crc: reader.index_crc(),
        memory_block_size: reader.header().memory_block_size,
        block_count: reader.block_count() as u64,
        window_ms: set.window_ms,
        blocks_crc: blocks_crc(&blocks, &set.pages),
        blocks,
        pages: set.pages.clone(),
    };
    let write_err = |source| WorkingSetError::Write { path: path.clone(), source };
    let text = serde_json::to_vec(&form).map_err(|e| write_err(e.into()))?;
    // Unique per process: concurrent restores of one snapshot each record
    // a set; the last rename wins, and every one of them is whole.
    let temp = dir.join(format!(".{WORKING_SET_FILE}.{}", std::process::id()));
    let result = (|| {
        let mut file = OpenOptions::new().write(true).create(true).truncate(true).open(&temp)?;
        file.write_all(&text)?;
        file.write_all(b"\n")?;
        file.sync_all()?;
        std::fs::rename(&temp, &path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result.map_err(write_err)?;
    Ok(path)
}

/// What `inspect` says about the working set of snapshot directory `dir`
/// for the checkpoint `reader` reads: `Ok(None)` when there is none.
pub fn summary(dir: &Path, reader: &Reader) -> Result<Option<WorkingSetSummary>, WorkingSetError> {
    let Some(set) = load(dir, reader)? else { return Ok(None) };
    let bytes = set.blocks.iter().filter_map(|&b| reader.block_info(b)).map(|info| info.len as u64).sum();
    let pages = set.page_count(reader.header().memory_block_size as usize);
    Ok(Some(WorkingSetSummary { path: path_in(dir), blocks: set.blocks.len(), bytes, pages, window_ms: set.window_ms }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{write_checkpoint, ImageSource, WriterOptions};

    const BLOCK: usize = 16 << 10;

    fn checkpoint(dir: &Path, fill: u8) -> Reader {
        let path = dir.join("memory.ckpt");
        let mut image = vec![0u8; 32 * BLOCK];
        image[3 * BLOCK..5 * BLOCK].fill(fill);
        let options = WriterOptions { memory_block_size: BLOCK as u32, storage_block_size: 4 * BLOCK as u32, level: 1, threads: 1, ..WriterOptions::default() };
        write_checkpoint(&path, &ImageSource::new(vec![(0, &image[..])]), &options, &mut |_, _| {}).expect("writes");
        Reader::open(&path).expect("opens")
    }

    fn set() -> WorkingSet {
        // 16 KiB blocks: 4 pages, one mask word each.
        WorkingSet { blocks: vec![4, 0, 31, 3], pages: vec![0b1, 0b1111, 0b0110, 0b1000], window_ms: 2000 }
    }

    #[test]
    fn a_saved_set_loads_back_in_its_order() {
        let dir = tempfile::tempdir().expect("temp dir");
        let reader = checkpoint(dir.path(), 7);
        assert_eq!(load(dir.path(), &reader).expect("no file is fine"), None);
        let path = save(dir.path(), &reader, &set()).expect("saves");
        assert_eq!(path, dir.path().join(WORKING_SET_FILE));
        assert_eq!(load(dir.path(), &reader).expect("loads"), Some(set()));
        let summary = summary(dir.path(), &reader).expect("summary").expect("a set");
        assert_eq!((summary.blocks, summary.bytes, summary.pages, summary.window_ms), (4, 4 * BLOCK as u64, 8, 2000));
        let set = set();
        assert_eq!(set.page_mask(2, BLOCK), Some(&[0b0110u64][..]));
        assert!(has_page(set.page_mask(2, BLOCK).expect("a mask"), 1) && !has_page(&[0b0110], 0));
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path()).expect("lists").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn a_version_1_file_loads_as_whole_blocks() {
        let dir = tempfile::tempdir().expect("temp dir");
        let reader = checkpoint(dir.path(), 7);
        let whole = WorkingSet::whole_blocks(vec![4, 0, 31, 3], 2000);
        save(dir.path(), &reader, &whole).expect("saves");
        let text = std::fs::read_to_string(path_in(dir.path())).expect("reads");
        assert!(text.contains("\"version\":1") && !text.contains("pages"), "{text}");
        let loaded = load(dir.path(), &reader).expect("loads").expect("a set");
        assert_eq!(loaded, whole);
        assert_eq!(loaded.page_mask(0, BLOCK), None);
        assert_eq!(loaded.page_count(BLOCK), 16);
    }

    #[test]
    fn a_set_of_another_checkpoint_is_refused_naming_both_checksums() {
        let dir = tempfile::tempdir().expect("temp dir");
        let reader = checkpoint(dir.path(), 7);
        save(dir.path(), &reader, &set()).expect("saves");
        let other_dir = tempfile::tempdir().expect("temp dir");
        let other = checkpoint(other_dir.path(), 9);
        std::fs::copy(path_in(dir.path()), path_in(other_dir.path())).expect("copies");
        let err = load(other_dir.path(), &other).expect_err("another checkpoint's set");
        assert!(matches!(err, WorkingSetError::OtherCheckpoint { .. }), "{err}");
        assert!(err.to_string().contains(&format!("{:#010x}", other.index_crc())), "{err}");
    }

    #[test]
    fn damaged_files_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().expect("temp dir");
        let reader = checkpoint(dir.path(), 7);
        save(dir.path(), &reader, &set()).expect("saves");
        let good = std::fs::read_to_string(path_in(dir.path())).expect("reads");
        let cases = [
            (good.replace("[4,0,31,3]", "[4,0,31,2]"), "does not match its checksum"),
            (good.replace("[1,15,6,8]", "[1,15,6,9]"), "does not match its checksum"),
            (good[..good.len() / 2].to_string(), "EOF"),
            (good.replace("\"version\":2", "\"version\":9"), "version 9"),
            ("garbage".to_string(), "expected value"),
        ];
        for (text, needle) in cases {
            std::fs::write(path_in(dir.path()), &text).expect("writes");
            let err = load(dir.path(), &reader).expect_err("damaged");
            assert!(err.to_string().contains(needle), "{needle}: {err}");
        }
        // Checksummed but out of range, repeated, or with masks that name
        // no page, a page past the block, or too few: still refused.
        for (version, blocks, pages, needle) in [
            (VERSION, vec![1u64, 32], vec![1, 1], "beyond"),
            (VERSION, vec![2, 2], vec![1, 1], "twice"),
            (VERSION, vec![1, 2], vec![1, 0], "not one of its pages"),
            (VERSION, vec![1, 2], vec![1, 0b10000], "not one of its pages"),
            (VERSION, vec![1, 2], vec![1], "1 page mask words for 2 blocks"),
            (1, vec![1, 2], vec![1, 1], "no page masks"),
        ] {
            let form = FileForm {
                format: FORMAT.into(),
                version,
                checkpoint_index_crc: reader.index_crc(),
                memory_block_size: BLOCK as u32,
                block_count: 32,
                window_ms: 1,
                blocks_crc: blocks_crc(&blocks, &pages),
                blocks,
                pages,
            };
            std::fs::write(path_in(dir.path()), serde_json::to_vec(&form).expect("json")).expect("writes");
            let err = load(dir.path(), &reader).expect_err("bad blocks");
            assert!(err.to_string().contains(needle), "{needle}: {err}");
        }
    }
}
