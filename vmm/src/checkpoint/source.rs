//! Sources of guest memory for the checkpoint writer.
//!
//! A [`MemorySource`] lists guest memory regions and hands out their bytes
//! one memory block at a time, borrowed in place when it can (a byte image)
//! or copied into the caller's scratch buffer when it must (guest memory
//! that vm-memory only lets us read through volatile copies, or a file).
//! Sources are shared by the writer's compression threads, hence `Sync`.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use super::format::Region;

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
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
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
}
