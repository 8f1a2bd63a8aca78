//! Disk image files: opening one for a VM (checked and locked), telling
//! whether a file changed since a snapshot, and copying one sparsely.
//!
//! A disk image is a raw regular file whose size is a whole number of
//! 512-byte sectors. While a VM uses it, the image holds a `flock` lock:
//! exclusive for a writable disk, shared for a read-only one, so two VMs
//! cannot write the same image, and no VM writes an image another reads.
//! Block devices are refused: stasis snapshots copy disk files.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The size of a sector, the unit of a disk's capacity.
pub const SECTOR_SIZE: u64 = 512;

/// The buffer `copy_sparse` copies data through when the file system
/// cannot clone.
const COPY_BUFFER_SIZE: usize = 1 << 20;

/// `FICLONE`: share the source's extents with the destination
/// (`_IOW(0x94, 9, int)`).
const FICLONE: libc::c_ulong = 0x4004_9409;

/// Why a disk image could not be opened. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The path does not exist.
    #[error("{} does not exist", .0.display())]
    NotFound(PathBuf),
    /// The file's permissions do not let stasis open it as asked.
    #[error("no permission to open {} for {}", .path.display(), if *.read_only { "reading" } else { "reading and writing" })]
    Permission {
        /// The image.
        path: PathBuf,
        /// Whether it was opened read-only.
        read_only: bool,
    },
    /// The path is a directory.
    #[error("{} is a directory, not a disk image file", .0.display())]
    Directory(PathBuf),
    /// The path is a block device, which stasis does not support.
    #[error("{} is a block device; only disk image files are supported", .0.display())]
    BlockDevice(PathBuf),
    /// The path is a FIFO, socket or character device.
    #[error("{} is not a regular file", .0.display())]
    NotRegularFile(PathBuf),
    /// Some other error while opening or inspecting the file.
    #[error("cannot open {}", .path.display())]
    Open {
        /// The image.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
    /// The file is empty.
    #[error("{} is empty", .0.display())]
    Empty(PathBuf),
    /// The file's size is not a whole number of sectors.
    #[error("{}: size {size} bytes is not a multiple of 512", .path.display())]
    Size {
        /// The image.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Another process holds a conflicting lock on the file.
    #[error("{} is in use by another VM (locked)", .0.display())]
    Locked(PathBuf),
    /// Locking failed for another reason.
    #[error("cannot lock {}", .path.display())]
    Lock {
        /// The image.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: io::Error,
    },
}

/// An open, locked disk image file. The lock lasts as long as the value.
#[derive(Debug)]
pub struct DiskImage {
    path: PathBuf,
    file: File,
    size: u64,
    read_only: bool,
}

impl DiskImage {
    /// Opens the image at `path` for a VM: read-write, or read-only when
    /// `read_only`; it must be a regular file of a non-zero whole number
    /// of sectors, and not be locked by another VM.
    pub fn open(path: &Path, read_only: bool) -> Result<DiskImage, DiskError> {
        let owned = || path.to_path_buf();
        // Looked at before opening: opening a FIFO would block, and a
        // directory deserves a clearer word than EISDIR.
        let meta = std::fs::metadata(path).map_err(|e| classify_open_error(path, read_only, e))?;
        check_file_type(path, &meta.file_type())?;

        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            // O_NONBLOCK: should the path turn into a FIFO since the check
            // above, opening it must not hang; it is harmless on a regular
            // file, which the fstat below then confirms.
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| classify_open_error(path, read_only, e))?;
        let meta = file.metadata().map_err(|source| DiskError::Open { path: owned(), source })?;
        check_file_type(path, &meta.file_type())?;

        let size = meta.len();
        if size == 0 {
            return Err(DiskError::Empty(owned()));
        }
        if size % SECTOR_SIZE != 0 {
            return Err(DiskError::Size { path: owned(), size });
        }

        let operation = if read_only { libc::LOCK_SH } else { libc::LOCK_EX };
        // SAFETY: flock takes no pointers; the descriptor is open and owned
        // by `file`.
        let rc = unsafe { libc::flock(file.as_raw_fd(), operation | libc::LOCK_NB) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            return Err(if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                DiskError::Locked(owned())
            } else {
                DiskError::Lock { path: owned(), source: err }
            });
        }

        Ok(DiskImage { path: owned(), file, size, read_only })
    }

    /// The path the image was opened at.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The size in bytes, as it was when opened; a whole number of
    /// sectors.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the image is open read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The open file's identity now.
    pub fn identity(&self) -> io::Result<FileIdentity> {
        Ok(FileIdentity::from_metadata(&self.file.metadata()?))
    }
}

fn classify_open_error(path: &Path, read_only: bool, err: io::Error) -> DiskError {
    let path = path.to_path_buf();
    match err.raw_os_error() {
        Some(libc::ENOENT) => DiskError::NotFound(path),
        Some(libc::EACCES) | Some(libc::EPERM) => DiskError::Permission { path, read_only },
        Some(libc::EISDIR) => DiskError::Directory(path),
        _ => DiskError::Open { path, source: err },
    }
}

fn check_file_type(path: &Path, file_type: &std::fs::FileType) -> Result<(), DiskError> {
    let path = path.to_path_buf();
    if file_type.is_file() {
        Ok(())
    } else if file_type.is_dir() {
        Err(DiskError::Directory(path))
    } else if file_type.is_block_device() {
        Err(DiskError::BlockDevice(path))
    } else {
        Err(DiskError::NotRegularFile(path))
    }
}

/// What identifies a file's content without reading it: if any of these
/// changed, the file may have been written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    /// Size in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i128,
    /// Inode number.
    pub inode: u64,
    /// Device the file system is on.
    pub dev: u64,
}

impl FileIdentity {
    /// The identity of the file at `path` (symbolic links followed).
    pub fn of(path: &Path) -> io::Result<FileIdentity> {
        Ok(Self::from_metadata(&std::fs::metadata(path)?))
    }

    fn from_metadata(meta: &std::fs::Metadata) -> FileIdentity {
        FileIdentity {
            size: meta.size(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            inode: meta.ino(),
            dev: meta.dev(),
        }
    }
}

/// What [`copy_sparse`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Bytes read from the source and written to the copy; 0 when cloned.
    pub bytes_copied: u64,
    /// The file system cloned the file (shared extents, nothing copied).
    pub cloned: bool,
}

/// Writes a new file at `dst` (which must not exist) with the size and
/// content of `src`, and syncs it. Clones the file where the file system
/// can (`FICLONE`); else copies only the data ranges `SEEK_DATA` and
/// `SEEK_HOLE` report, so holes stay holes (everything, where the file
/// system cannot tell). On failure the partial copy is removed.
pub fn copy_sparse(src: &File, dst: &Path) -> io::Result<CopyStats> {
    let out = OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_CLOEXEC).open(dst)?;
    match copy_into(src, &out).and_then(|stats| out.sync_all().map(|()| stats)) {
        Ok(stats) => Ok(stats),
        Err(e) => {
            drop(out);
            if let Err(remove) = std::fs::remove_file(dst) {
                log::warn!("cannot remove the partial copy {}: {remove}", dst.display());
            }
            Err(e)
        }
    }
}

fn copy_into(src: &File, out: &File) -> io::Result<CopyStats> {
    // SAFETY: FICLONE reads an int argument (the source descriptor) passed
    // by value; both descriptors are open for the duration of the call.
    let rc = unsafe { libc::ioctl(out.as_raw_fd(), FICLONE as _, src.as_raw_fd()) };
    if rc == 0 {
        return Ok(CopyStats { bytes_copied: 0, cloned: true });
    }

    let size = src.metadata()?.len();
    out.set_len(size)?;
    let mut buffer = vec![0u8; COPY_BUFFER_SIZE];
    let mut copied = 0u64;
    let mut pos = 0u64;
    while pos < size {
        let (start, end) = match next_data_range(src, pos, size)? {
            Some(range) => range,
            None => break,
        };
        copy_range(src, out, start, end, &mut buffer)?;
        copied += end - start;
        pos = end;
    }
    Ok(CopyStats { bytes_copied: copied, cloned: false })
}

/// The next range of `src` at or after `pos` that may hold data, clipped
/// to `size`; `None` when only holes remain.
fn next_data_range(src: &File, pos: u64, size: u64) -> io::Result<Option<(u64, u64)>> {
    let Some(start) = seek(src, pos, libc::SEEK_DATA)? else {
        // The file system cannot tell data from holes: all of it is data.
        return Ok(Some((pos, size)));
    };
    let Ok(start) = u64::try_from(start) else {
        // ENXIO: no data beyond `pos`.
        return Ok(None);
    };
    if start >= size {
        return Ok(None);
    }
    let end = match seek(src, start, libc::SEEK_HOLE)? {
        Some(end) => u64::try_from(end).unwrap_or(size).min(size),
        None => size,
    };
    Ok(Some((start, end.max(start))))
}

/// lseek: `Some(offset)`, `Some(-1)` for ENXIO (nothing found), `None`
/// when the file system does not support the whence.
fn seek(file: &File, pos: u64, whence: libc::c_int) -> io::Result<Option<i64>> {
    let pos = i64::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek takes no pointers; the descriptor is open. Moving the
    // shared file offset is harmless: disk I/O is positioned (pread).
    let rc = unsafe { libc::lseek(file.as_raw_fd(), pos, whence) };
    if rc >= 0 {
        return Ok(Some(rc));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENXIO) => Ok(Some(-1)),
        Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(None),
        _ => Err(err),
    }
}

fn copy_range(src: &File, out: &File, start: u64, end: u64, buffer: &mut [u8]) -> io::Result<()> {
    let mut pos = start;
    while pos < end {
        let want = usize::try_from(end - pos).unwrap_or(usize::MAX).min(buffer.len());
        let chunk = &mut buffer[..want];
        let got = src.read_at(chunk, pos)?;
        if got == 0 {
            // The source shrank while copying; the rest stays a hole.
            break;
        }
        out.write_all_at(&chunk[..got], pos)?;
        pos += got as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn image_file(dir: &tempfile::TempDir, name: &str, size: u64) -> PathBuf {
        let path = dir.path().join(name);
        let file = File::create(&path).expect("create");
        file.set_len(size).expect("set_len");
        path
    }

    #[test]
    fn open_reports_size_and_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = image_file(&dir, "disk.img", 8192);
        let image = DiskImage::open(&path, false).expect("open");
        assert_eq!(image.size(), 8192);
        assert!(!image.read_only());
        assert_eq!(image.path(), path);
    }

    #[test]
    fn open_refuses_missing_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("nope.img");
        let err = DiskImage::open(&path, false).expect_err("missing");
        assert!(matches!(err, DiskError::NotFound(_)), "{err:?}");
        assert!(err.to_string().contains("nope.img"));
    }

    #[test]
    fn open_refuses_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        for read_only in [false, true] {
            let err = DiskImage::open(dir.path(), read_only).expect_err("directory");
            assert!(matches!(err, DiskError::Directory(_)), "{err:?}");
        }
    }

    #[test]
    fn open_refuses_fifo_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("fifo");
        let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("cstring");
        // SAFETY: `cpath` is a valid NUL-terminated string.
        let rc = unsafe { libc::mkfifo(cpath.as_ptr(), 0o600) };
        assert_eq!(rc, 0);
        let err = DiskImage::open(&path, true).expect_err("fifo");
        assert!(matches!(err, DiskError::NotRegularFile(_)), "{err:?}");
    }

    #[test]
    fn open_refuses_empty_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = image_file(&dir, "empty.img", 0);
        let err = DiskImage::open(&path, false).expect_err("empty");
        assert!(matches!(err, DiskError::Empty(_)), "{err:?}");
    }

    #[test]
    fn open_refuses_size_not_multiple_of_512() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = image_file(&dir, "odd.img", 1000);
        let err = DiskImage::open(&path, false).expect_err("odd size");
        assert!(err.to_string().contains("size 1000 bytes is not a multiple of 512"), "{err}");
        assert!(err.to_string().contains("odd.img"), "{err}");
    }

    #[test]
    fn open_refuses_unreadable_file_with_permission_message() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // root bypasses file permissions; the mapping is still checked
            // below through classify_open_error.
            let err = classify_open_error(Path::new("/x.img"), true, io::Error::from_raw_os_error(libc::EACCES));
            assert!(err.to_string().contains("no permission"), "{err}");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let path = image_file(&dir, "secret.img", 512);
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o000)).expect("chmod");
        let err = DiskImage::open(&path, true).expect_err("unreadable");
        assert!(matches!(err, DiskError::Permission { .. }), "{err:?}");
        assert!(err.to_string().contains("no permission"), "{err}");
    }

    #[test]
    fn second_exclusive_lock_is_refused_while_first_is_held() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = image_file(&dir, "disk.img", 4096);
        let first = DiskImage::open(&path, false).expect("first");
        let err = DiskImage::open(&path, false).expect_err("second writer");
        assert!(matches!(err, DiskError::Locked(_)), "{err:?}");
        assert!(err.to_string().contains("is in use by another VM (locked)"), "{err}");
        let err = DiskImage::open(&path, true).expect_err("reader while writer");
        assert!(matches!(err, DiskError::Locked(_)), "{err:?}");
        drop(first);
        DiskImage::open(&path, false).expect("lock released with the first image");
    }

    #[test]
    fn shared_locks_coexist_and_exclude_a_writer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = image_file(&dir, "disk.img", 4096);
        let a = DiskImage::open(&path, true).expect("first reader");
        let b = DiskImage::open(&path, true).expect("second reader");
        assert!(a.read_only() && b.read_only());
        let err = DiskImage::open(&path, false).expect_err("writer while readers");
        assert!(matches!(err, DiskError::Locked(_)), "{err:?}");
    }

    #[test]
    fn read_only_image_cannot_be_written_through_its_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = image_file(&dir, "disk.img", 512);
        let image = DiskImage::open(&path, true).expect("open");
        assert!(image.file().write_at(b"x", 0).is_err());
    }

    #[test]
    fn identity_changes_after_a_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = image_file(&dir, "disk.img", 4096);
        let before = FileIdentity::of(&path).expect("identity");
        // File times tick coarsely (a few ms); make sure a tick passes.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut file = OpenOptions::new().write(true).open(&path).expect("open");
        file.write_all(b"changed").expect("write");
        drop(file);
        let after = FileIdentity::of(&path).expect("identity");
        assert_eq!(before.size, after.size);
        assert_eq!(before.inode, after.inode);
        assert_ne!(before, after);
    }

    #[test]
    fn identity_of_image_matches_identity_of_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = image_file(&dir, "disk.img", 4096);
        let image = DiskImage::open(&path, true).expect("open");
        assert_eq!(image.identity().expect("identity"), FileIdentity::of(&path).expect("identity"));
    }

    #[test]
    fn identity_round_trips_through_serde() {
        let id = FileIdentity { size: 1 << 40, mtime_ns: 1_700_000_000_123_456_789, inode: 42, dev: 7 };
        let json = serde_json::to_string(&id).expect("json");
        assert_eq!(serde_json::from_str::<FileIdentity>(&json).expect("from json"), id);
        let bin = bincode::serialize(&id).expect("bincode");
        assert_eq!(bincode::deserialize::<FileIdentity>(&bin).expect("from bincode"), id);
    }

    fn allocated_bytes(path: &Path) -> u64 {
        std::fs::metadata(path).expect("metadata").blocks() * 512
    }

    #[test]
    fn copy_sparse_keeps_content_and_holes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src_path = image_file(&dir, "src.img", 64 << 20);
        let src = OpenOptions::new().read(true).write(true).open(&src_path).expect("open");
        let a = vec![0xa5u8; 8192];
        let b = vec![0x5au8; 3 << 20];
        src.write_all_at(&a, 1 << 20).expect("write a");
        src.write_all_at(&b, 40 << 20).expect("write b");
        src.write_all_at(b"tail", (64 << 20) - 4).expect("write tail");
        src.sync_all().expect("sync");

        let dst_path = dir.path().join("dst.img");
        let stats = copy_sparse(&src, &dst_path).expect("copy");

        assert_eq!(std::fs::read(&dst_path).expect("dst"), std::fs::read(&src_path).expect("src"));
        if !stats.cloned {
            assert!(stats.bytes_copied >= (a.len() + b.len() + 4) as u64);
            assert!(stats.bytes_copied < 64 << 20, "holes were copied: {stats:?}");
        }
        // Holes stay holes: far less than 64 MiB is allocated.
        assert!(allocated_bytes(&dst_path) < 16 << 20, "allocated {}", allocated_bytes(&dst_path));
        let dst = File::open(&dst_path).expect("open dst");
        assert_eq!(seek(&dst, 0, libc::SEEK_DATA).expect("seek"), Some(1 << 20));
    }

    #[test]
    fn copy_sparse_copies_a_file_without_holes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src_path = dir.path().join("src.img");
        let content: Vec<u8> = (0..(3 << 20) + 512).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src_path, &content).expect("write");
        let src = File::open(&src_path).expect("open");
        let dst_path = dir.path().join("dst.img");
        let stats = copy_sparse(&src, &dst_path).expect("copy");
        assert_eq!(std::fs::read(&dst_path).expect("dst"), content);
        assert!(stats.cloned || stats.bytes_copied == content.len() as u64, "{stats:?}");
    }

    #[test]
    fn copy_sparse_refuses_an_existing_destination() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src_path = image_file(&dir, "src.img", 512);
        let dst_path = image_file(&dir, "dst.img", 1024);
        let src = File::open(&src_path).expect("open");
        let err = copy_sparse(&src, &dst_path).expect_err("exists");
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::metadata(&dst_path).expect("kept").len(), 1024);
    }
}
