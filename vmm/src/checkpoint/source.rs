//! Sources of guest memory for the checkpoint writer.
//!
//! A [`MemorySource`] lists guest memory regions and hands out their bytes
//! one memory block at a time, borrowed in place when it can (a byte image)
//! or copied into the caller's scratch buffer when it must (guest memory
//! that vm-memory only lets us read through volatile copies, or a file).
//! Sources are shared by the writer's compression threads, hence `Sync`.
//!
//! A source may also *hint* that a block need not be read: it is known to
//! be all zero (memory the guest never touched), or unchanged since the
//! parent checkpoint, so a layered checkpoint records it as in the parent.
//! [`ReaderSource`] serves the memory an open checkpoint (or chain) holds,
//! which is how a chain is flattened into one file.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use crate::vstate::memory::GuestMemoryMmap;

use super::format::{BlockKind, Region};
use super::reader::{ReadError, Reader};

/// Errors of memory sources.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// A block lies outside the region it was asked from.
    #[error("bytes {offset}..{end} are outside region {region}")]
    CheckRange {
        region: usize,
        offset: u64,
        end: u64,
    },
    /// Reading guest memory failed.
    #[error("cannot read guest memory at {addr:#x}")]
    ReadGuestMemory {
        addr: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Opening an image file failed.
    #[error("cannot open memory image {path}")]
    OpenImage {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The image file is not a regular, non-empty file.
    #[error("memory image {path} is {what}")]
    CheckImage { path: PathBuf, what: &'static str },
    /// Reading an image file failed.
    #[error("cannot read memory image at offset {offset}")]
    ReadImage {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    /// Reading a block of a checkpoint (or chain) failed.
    #[error("cannot read block {block} of checkpoint {path}")]
    ReadCheckpoint {
        block: usize,
        path: PathBuf,
        #[source]
        source: ReadError,
    },
}

/// What the writer should do with one memory block, as its source says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockHint {
    /// Read it with [`MemorySource::block`] and store what it holds.
    Read,
    /// It is all zero: record a zero block without reading it.
    Zero,
    /// It has not changed since the parent checkpoint: record a parent
    /// block without reading it. Only for a layered write (one with
    /// `WriterOptions::parent_index_crc`); otherwise the write fails.
    Parent,
}

/// Guest memory to checkpoint.
pub trait MemorySource: Sync {
    /// The regions, sorted by guest address and non-overlapping.
    fn regions(&self) -> Vec<Region>;

    /// Bytes `offset .. offset + len` of region `region`: borrowed from the
    /// source when it can, otherwise copied into `scratch` (which it may
    /// grow) and borrowed from there.
    fn block<'a>(
        &'a self,
        region: usize,
        offset: u64,
        len: usize,
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], SourceError>;

    /// Whether the writer must read bytes `offset .. offset + len` of
    /// region `region` (one memory block) or may record them as zero or as
    /// in the parent without reading. Called before [`MemorySource::block`]
    /// for every block; the default reads everything.
    fn hint(&self, region: usize, offset: u64, len: usize) -> BlockHint {
        let _ = (region, offset, len);
        BlockHint::Read
    }
}

/// Checks that `offset .. offset + len` lies in a region of `size` bytes.
fn check_range(region: usize, size: u64, offset: u64, len: usize) -> Result<(), SourceError> {
    let end = offset.saturating_add(len as u64);
    if end > size {
        return Err(SourceError::CheckRange {
            region,
            offset,
            end,
        });
    }
    Ok(())
}

/// Guest memory held in ordinary byte slices: tests, benchmarks, and
/// images already in memory.
#[derive(Debug, Clone)]
pub struct ImageSource<'m> {
    regions: Vec<(u64, &'m [u8])>,
}

impl<'m> ImageSource<'m> {
    /// One region at guest address 0.
    pub fn flat(image: &'m [u8]) -> Self {
        ImageSource {
            regions: vec![(0, image)],
        }
    }

    /// Several regions, each `(guest address, bytes)`; the writer checks
    /// that they are sorted and do not overlap.
    pub fn new(regions: Vec<(u64, &'m [u8])>) -> Self {
        ImageSource { regions }
    }
}

impl MemorySource for ImageSource<'_> {
    fn regions(&self) -> Vec<Region> {
        self.regions
            .iter()
            .map(|(addr, bytes)| Region {
                guest_addr: *addr,
                size: bytes.len() as u64,
            })
            .collect()
    }

    fn block<'a>(
        &'a self,
        region: usize,
        offset: u64,
        len: usize,
        _scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], SourceError> {
        let bytes = self
            .regions
            .get(region)
            .map(|(_, b)| *b)
            .ok_or(SourceError::CheckRange {
                region,
                offset,
                end: offset,
            })?;
        check_range(region, bytes.len() as u64, offset, len)?;
        let start = offset as usize;
        Ok(&bytes[start..start + len])
    }
}

/// A raw memory image file (a plain memory-file snapshot): one region at
/// guest address 0 as long as the file. Read with positioned reads, so the
/// image need not fit in memory.
#[derive(Debug)]
pub struct FileSource {
    file: File,
    len: u64,
}

impl FileSource {
    /// Opens a raw image; it must be a non-empty regular file.
    pub fn open(path: &Path) -> Result<Self, SourceError> {
        let open_err = |source| SourceError::OpenImage {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if meta.is_dir() {
            return Err(SourceError::CheckImage {
                path: path.to_path_buf(),
                what: "a directory",
            });
        }
        if !meta.is_file() {
            return Err(SourceError::CheckImage {
                path: path.to_path_buf(),
                what: "not a regular file",
            });
        }
        if meta.len() == 0 {
            return Err(SourceError::CheckImage {
                path: path.to_path_buf(),
                what: "empty",
            });
        }
        Ok(FileSource {
            file,
            len: meta.len(),
        })
    }
}

impl MemorySource for FileSource {
    fn regions(&self) -> Vec<Region> {
        vec![Region {
            guest_addr: 0,
            size: self.len,
        }]
    }

    fn block<'a>(
        &'a self,
        region: usize,
        offset: u64,
        len: usize,
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], SourceError> {
        if region != 0 {
            return Err(SourceError::CheckRange {
                region,
                offset,
                end: offset,
            });
        }
        check_range(region, self.len, offset, len)?;
        scratch.resize(len, 0);
        self.file
            .read_exact_at(&mut scratch[..len], offset)
            .map_err(|source| SourceError::ReadImage { offset, source })?;
        Ok(&scratch[..len])
    }
}

/// The memory an open checkpoint holds, resolved through its chain when
/// it has parents: the source [`flatten`](super::writer::flatten) writes
/// from. Its regions are the checkpoint's; any range inside them can be
/// read, though ranges that are exactly one of the checkpoint's memory
/// blocks are the fast path. Blocks the chain resolves to zero are hinted
/// [`BlockHint::Zero`]; blocks in a parent that was not opened are hinted
/// [`BlockHint::Parent`] (and fail to read).
#[derive(Debug)]
pub struct ReaderSource<'r> {
    reader: &'r Reader,
}

impl<'r> ReaderSource<'r> {
    /// A source over `reader` (a single file or the newest layer of a chain).
    pub fn new(reader: &'r Reader) -> Self {
        ReaderSource { reader }
    }

    /// The checkpoint's blocks covering `offset .. offset + len` of region
    /// `region`, or why the range is not inside it.
    fn blocks(
        &self,
        region: usize,
        offset: u64,
        len: usize,
    ) -> Result<std::ops::RangeInclusive<usize>, SourceError> {
        let out_of_range = || SourceError::CheckRange {
            region,
            offset,
            end: offset.saturating_add(len as u64),
        };
        let r = self
            .reader
            .header()
            .regions
            .get(region)
            .ok_or_else(out_of_range)?;
        check_range(region, r.size, offset, len)?;
        if len == 0 {
            return Err(out_of_range());
        }
        let first = self.reader.block_of(r.guest_addr + offset);
        let last = self.reader.block_of(r.guest_addr + offset + len as u64 - 1);
        match (first, last) {
            (Some(first), Some(last)) => Ok(first..=last),
            _ => Err(out_of_range()),
        }
    }

    fn read_error(&self, block: usize, source: ReadError) -> SourceError {
        SourceError::ReadCheckpoint {
            block,
            path: self.reader.path().to_path_buf(),
            source,
        }
    }
}

impl MemorySource for ReaderSource<'_> {
    fn regions(&self) -> Vec<Region> {
        self.reader.header().regions.clone()
    }

    fn block<'a>(
        &'a self,
        region: usize,
        offset: u64,
        len: usize,
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], SourceError> {
        let blocks = self.blocks(region, offset, len)?;
        let base = self.reader.header().regions[region].guest_addr + offset;
        scratch.resize(len, 0);
        if blocks.start() == blocks.end() {
            let i = *blocks.start();
            let info = self.reader.block_info(i).expect("block_of gave a block");
            if info.guest_addr == base && info.len == len {
                self.reader
                    .read_block(i, &mut scratch[..len])
                    .map_err(|e| self.read_error(i, e))?;
                return Ok(&scratch[..len]);
            }
        }
        // A range that is not one whole block: copy the overlapping part
        // of every block it touches.
        let mut buf = vec![0u8; self.reader.header().memory_block_size as usize];
        for i in blocks {
            let data = self
                .reader
                .read_block(i, &mut buf)
                .map_err(|e| self.read_error(i, e))?;
            let start = self
                .reader
                .block_info(i)
                .expect("block_of gave a block")
                .guest_addr;
            let from = base.max(start);
            let to = (base + len as u64).min(start + data.len() as u64);
            scratch[(from - base) as usize..(to - base) as usize]
                .copy_from_slice(&data[(from - start) as usize..(to - start) as usize]);
        }
        Ok(&scratch[..len])
    }

    fn hint(&self, region: usize, offset: u64, len: usize) -> BlockHint {
        let Ok(blocks) = self.blocks(region, offset, len) else {
            // `block` will report the bad range.
            return BlockHint::Read;
        };
        let kinds = || {
            blocks
                .clone()
                .filter_map(|i| self.reader.block_info(i).map(|b| b.kind))
        };
        if kinds().all(|k| k == BlockKind::Zero) {
            BlockHint::Zero
        } else if kinds().all(|k| k == BlockKind::Parent) {
            BlockHint::Parent
        } else {
            BlockHint::Read
        }
    }
}

/// Guest memory of a VM. vm-memory only reads it through volatile copies
/// (a vCPU may be writing it), so every block is copied into the scratch
/// buffer. Pause the VM first for a consistent checkpoint.
impl MemorySource for GuestMemoryMmap {
    fn regions(&self) -> Vec<Region> {
        self.iter()
            .map(|r| Region {
                guest_addr: r.start_addr().0,
                size: r.len(),
            })
            .collect()
    }

    fn block<'a>(
        &'a self,
        region: usize,
        offset: u64,
        len: usize,
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], SourceError> {
        let reg = self.iter().nth(region).ok_or(SourceError::CheckRange {
            region,
            offset,
            end: offset,
        })?;
        check_range(region, reg.len(), offset, len)?;
        let addr = reg.start_addr().0 + offset;
        scratch.resize(len, 0);
        self.read_slice(&mut scratch[..len], GuestAddress(addr))
            .map_err(|source| SourceError::ReadGuestMemory { addr, source })?;
        Ok(&scratch[..len])
    }
}

/// A byte image whose blocks carry hints, recording which blocks the
/// writer read: for tests of layered writes.
#[cfg(test)]
pub(crate) struct HintedSource<'m> {
    pub image: ImageSource<'m>,
    /// The hint for (region, offset).
    pub hint: Box<dyn Fn(usize, u64) -> BlockHint + Sync + 'm>,
    /// (region, offset) of every block read.
    pub reads: std::sync::Mutex<Vec<(usize, u64)>>,
}

#[cfg(test)]
impl<'m> HintedSource<'m> {
    pub fn new(image: ImageSource<'m>, hint: impl Fn(usize, u64) -> BlockHint + Sync + 'm) -> Self {
        HintedSource {
            image,
            hint: Box::new(hint),
            reads: std::sync::Mutex::new(Vec::new()),
        }
    }
}

#[cfg(test)]
impl MemorySource for HintedSource<'_> {
    fn regions(&self) -> Vec<Region> {
        self.image.regions()
    }

    fn block<'a>(
        &'a self,
        region: usize,
        offset: u64,
        len: usize,
        scratch: &'a mut Vec<u8>,
    ) -> Result<&'a [u8], SourceError> {
        self.reads
            .lock()
            .expect("not poisoned")
            .push((region, offset));
        self.image.block(region, offset, len, scratch)
    }

    fn hint(&self, region: usize, offset: u64, _len: usize) -> BlockHint {
        (self.hint)(region, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn image_source_borrows_the_requested_bytes() {
        let data: Vec<u8> = (0..=255).collect();
        let src = ImageSource::new(vec![(0x1000, &data[..128]), (0x9000, &data[128..])]);
        let mut scratch = Vec::new();
        let got = src.block(1, 4, 3, &mut scratch).expect("in range");
        assert_eq!(got, &[132, 133, 134]);
        assert_eq!(
            src.regions()[1],
            Region {
                guest_addr: 0x9000,
                size: 128
            }
        );
    }

    #[test]
    fn image_source_rejects_a_range_past_the_region() {
        let data = [0u8; 100];
        let src = ImageSource::flat(&data);
        let mut scratch = Vec::new();
        assert!(matches!(
            src.block(0, 90, 20, &mut scratch),
            Err(SourceError::CheckRange { .. })
        ));
        assert!(src.block(1, 0, 1, &mut scratch).is_err());
    }

    #[test]
    fn file_source_reads_blocks_at_their_offsets() {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        file.write_all(&data).expect("write");
        let src = FileSource::open(file.path()).expect("opens");
        assert_eq!(
            src.regions(),
            vec![Region {
                guest_addr: 0,
                size: 10_000
            }]
        );
        let mut scratch = Vec::new();
        let got = src.block(0, 4096, 100, &mut scratch).expect("in range");
        assert_eq!(got, &data[4096..4196]);
    }

    #[test]
    fn file_source_refuses_directories_and_empty_files() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(matches!(
            FileSource::open(dir.path()),
            Err(SourceError::CheckImage { .. })
        ));
        let empty = tempfile::NamedTempFile::new().expect("temp file");
        assert!(matches!(
            FileSource::open(empty.path()),
            Err(SourceError::CheckImage { .. })
        ));
    }

    #[test]
    fn guest_memory_source_copies_out_guest_bytes() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x2000),
            (GuestAddress(0x10_0000), 0x1000),
        ])
        .expect("guest memory");
        mem.write_slice(&[1, 2, 3], GuestAddress(0x10_0010))
            .expect("write");
        let regions = MemorySource::regions(&mem);
        assert_eq!(
            regions[1],
            Region {
                guest_addr: 0x10_0000,
                size: 0x1000
            }
        );
        let mut scratch = Vec::new();
        let got = mem.block(1, 0x10, 4, &mut scratch).expect("in range");
        assert_eq!(got, &[1, 2, 3, 0]);
    }
    #[test]
    fn reader_source_serves_whole_blocks_unaligned_ranges_and_zero_hints() {
        use crate::checkpoint::writer::{write_checkpoint, WriterOptions};
        let mut image = vec![0u8; 6 * 4096 + 50];
        for (i, b) in image[4096..3 * 4096].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        image[6 * 4096 + 10] = 7;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("c");
        let options = WriterOptions {
            memory_block_size: 4096,
            storage_block_size: 8192,
            ..WriterOptions::default()
        };
        write_checkpoint(&path, &ImageSource::flat(&image), &options, &mut |_, _| {})
            .expect("writes");
        let reader = Reader::open(&path).expect("opens");
        let src = ReaderSource::new(&reader);
        assert_eq!(src.regions(), ImageSource::flat(&image).regions());
        let mut scratch = Vec::new();
        let got = src.block(0, 4096, 4096, &mut scratch).expect("whole block");
        assert_eq!(got, &image[4096..8192]);
        let got = src.block(0, 100, 9000, &mut scratch).expect("three blocks");
        assert_eq!(got, &image[100..9100]);
        let got = src
            .block(0, 6 * 4096, 50, &mut scratch)
            .expect("short tail");
        assert_eq!(got, &image[6 * 4096..]);
        assert!(src.block(0, 6 * 4096, 51, &mut scratch).is_err());
        assert!(src.block(1, 0, 1, &mut scratch).is_err());
        assert_eq!(src.hint(0, 0, 4096), BlockHint::Zero);
        assert_eq!(src.hint(0, 3 * 4096, 3 * 4096), BlockHint::Zero);
        assert_eq!(src.hint(0, 2 * 4096, 2 * 4096), BlockHint::Read);
    }
}
