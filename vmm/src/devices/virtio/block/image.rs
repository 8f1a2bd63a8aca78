//! Disk image files: opening, locking, copying. (Stand-in until the real
//! implementation lands.)

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Errors opening a disk image.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// Not available yet.
    #[error("cannot open disk {0}: disks are not supported yet")]
    Unsupported(PathBuf),
}

/// An open, locked disk image.
pub struct DiskImage {
    path: PathBuf,
    file: File,
    size: u64,
    read_only: bool,
}

impl DiskImage {
    /// Opens and locks `path`.
    pub fn open(path: &Path, _read_only: bool) -> Result<DiskImage, DiskError> {
        Err(DiskError::Unsupported(path.to_path_buf()))
    }
    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// Whether the guest may not write it.
    pub fn read_only(&self) -> bool {
        self.read_only
    }
}

/// What identifies a file's content without reading it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i128,
    /// Inode number.
    pub inode: u64,
    /// Device number.
    pub dev: u64,
}

impl FileIdentity {
    /// The identity of the file at `path`.
    pub fn of(path: &Path) -> io::Result<FileIdentity> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(FileIdentity {
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            inode: m.ino(),
            dev: m.dev(),
        })
    }
}

/// What a copy did.
pub struct CopyStats {
    /// Bytes of data copied.
    pub bytes_copied: u64,
    /// Whether the file system cloned it.
    pub cloned: bool,
}

/// Copies `src` to a new file at `dst`.
pub fn copy_sparse(_src: &File, _dst: &Path) -> io::Result<CopyStats> {
    Err(io::Error::other("not supported yet"))
}
