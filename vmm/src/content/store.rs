//! The content store: a directory holding each item under its ID.
//!
//! ```text
//! DIR/stasis-content-store.json   {"format":"stasis-content-store","version":1}
//! DIR/sha256/<64 hex digits>      one file per ID, mode 0444
//! DIR/tmp/                        imports in progress
//! ```
//!
//! An import hashes the file while copying it into `tmp/`, `fsync`s it,
//! renames it to its ID and `fsync`s the directory, so a crash leaves the
//! whole item or nothing. Items are opened relative to the `sha256/`
//! directory opened once ([`Store::open_item`]) with `O_NOFOLLOW`: a name
//! is always 64 hex digits, so nothing outside the directory is reachable
//! and a symlink put into it is refused.

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ContentId;
use crate::persist::{sync_directory, write_file_synced};

/// The file that makes a directory a content store.
pub const MARKER: &str = "stasis-content-store.json";
/// The marker's format name.
const FORMAT: &str = "stasis-content-store";
/// The store layout this code reads and writes.
const VERSION: u32 = 1;
/// Where items live.
const ITEMS: &str = "sha256";
/// Where imports are written before they get their name.
const TMP: &str = "tmp";
/// Copy and hash in pieces of this size.
const CHUNK: usize = 1 << 20;

/// What the marker file says.
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    format: String,
    version: u32,
}

/// Why the store cannot be used; each names the path at fault.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Nothing at the store's path.
    #[error("content store {0} does not exist")]
    Missing(PathBuf),
    /// A directory (or file) that is not a store.
    #[error("{0} is not a content store: it has no {MARKER} (`stasis content add --store DIR` creates a store)")]
    NotAStore(PathBuf),
    /// The marker is not ours, or of another version.
    #[error("{0} is not a content store this stasis reads: {MARKER} is damaged or of another version")]
    BadMarker(PathBuf),
    /// The store cannot be read.
    #[error("cannot read the content store {path}")]
    Read {
        /// What could not be read.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The item directory is a symlink.
    #[error("{0} is a symlink or not a directory; a content store's item directory must be a directory")]
    Symlink(PathBuf),
    /// The store could not be created or written.
    #[error("cannot write the content store {path}")]
    Write {
        /// What could not be written.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A file to import cannot be read.
    #[error("cannot read {path}")]
    Source {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A file to import is not a regular file.
    #[error("{0} is not a regular file")]
    NotAFile(PathBuf),
}

/// Why an item cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum ItemError {
    /// No item has this ID.
    #[error("the content store has no item {0}")]
    NotFound(ContentId),
    /// The item's name is a symlink (or something else than a file).
    #[error("the content store's entry for {0} is not a regular file (a symlink?); refused")]
    NotAFile(ContentId),
    /// Opening or examining it failed.
    #[error("cannot open the content store's item {0}")]
    Io(ContentId, #[source] io::Error),
}

/// An open content store.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    /// `root/sha256`, opened once.
    items: OwnedFd,
}

/// One imported file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    /// Its ID.
    pub id: ContentId,
    /// Its size in bytes.
    pub size: u64,
    /// False when the store held it already.
    pub added: bool,
}

impl Store {
    /// Opens the store at `root`, which must exist and be a store.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        match fs::metadata(root) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => return Err(StoreError::NotAStore(root.to_path_buf())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::Missing(root.to_path_buf())),
            Err(source) => return Err(StoreError::Read { path: root.to_path_buf(), source }),
        }
        let marker_path = root.join(MARKER);
        let text = match fs::read(&marker_path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::NotAStore(root.to_path_buf())),
            Err(source) => return Err(StoreError::Read { path: marker_path, source }),
        };
        match serde_json::from_slice::<Marker>(&text) {
            Ok(m) if m.format == FORMAT && m.version == VERSION => {}
            _ => return Err(StoreError::BadMarker(root.to_path_buf())),
        }
        let items_path = root.join(ITEMS);
        let items = open_dir_nofollow(&items_path).map_err(|source| match source.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::ENOTDIR) => StoreError::Symlink(items_path.clone()),
            _ => StoreError::Read { path: items_path.clone(), source },
        })?;
        Ok(Store { root: root.to_path_buf(), items })
    }

    /// Opens the store at `root`, creating it when `root` does not exist
    /// or is an empty directory.
    pub fn create_or_open(root: &Path) -> Result<Store, StoreError> {
        let write_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Write { path, source }
        };
        let empty = match fs::read_dir(root) {
            Ok(mut entries) => entries.next().is_none(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir(root).map_err(write_err(root))?;
                true
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => return Err(StoreError::NotAStore(root.to_path_buf())),
            Err(source) => return Err(StoreError::Read { path: root.to_path_buf(), source }),
        };
        if empty {
            for dir in [ITEMS, TMP] {
                fs::create_dir(root.join(dir)).map_err(write_err(&root.join(dir)))?;
            }
            let marker = serde_json::to_vec(&Marker { format: FORMAT.to_owned(), version: VERSION })
                .map_err(|e| StoreError::Write { path: root.join(MARKER), source: io::Error::other(e) })?;
            let tmp = root.join(TMP).join(MARKER);
            write_file_synced(&tmp, &marker)
                .and_then(|()| fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644)))
                .map_err(write_err(&tmp))?;
            fs::rename(&tmp, root.join(MARKER)).map_err(write_err(&root.join(MARKER)))?;
            sync_directory(root).map_err(write_err(root))?;
            if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_directory(parent).map_err(write_err(parent))?;
            }
        }
        Store::open(root)
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Imports `file`: copies it into the store under its ID, unless an
    /// item with that ID is there already.
    pub fn add(&self, file: &Path) -> Result<Imported, StoreError> {
        let source_err = |source| StoreError::Source { path: file.to_path_buf(), source };
        let mut input = File::open(file).map_err(source_err)?;
        if !input.metadata().map_err(source_err)?.is_file() {
            return Err(StoreError::NotAFile(file.to_path_buf()));
        }
        self.remove_stale_imports();
        let tmp_dir = self.root.join(TMP);
        let tmp = tmp_dir.join(import_name());
        let write_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Write { path, source }
        };
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o444)
            .open(&tmp)
            .map_err(write_err(&tmp))?;
        let copied = copy_hashing(&mut input, &mut out, file, &tmp).and_then(|(digest, size)| {
            out.sync_all().map_err(write_err(&tmp))?;
            Ok((digest, size))
        });
        let (digest, size) = match copied {
            Ok(v) => v,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        };
        drop(out);
        let id = ContentId::from_digest(digest);
        let target = self.root.join(ITEMS).join(id.hex());
        if fs::symlink_metadata(&target).is_ok() {
            let _ = fs::remove_file(&tmp);
            return Ok(Imported { id, size, added: false });
        }
        let placed = fs::rename(&tmp, &target)
            .and_then(|()| sync_directory(&self.root.join(ITEMS)))
            .map_err(write_err(&target));
        if placed.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        placed?;
        Ok(Imported { id, size, added: true })
    }

    /// Every item and its size, by ID.
    pub fn list(&self) -> Result<Vec<(ContentId, u64)>, StoreError> {
        let dir = self.root.join(ITEMS);
        let read_err = |source| StoreError::Read { path: dir.clone(), source };
        let mut items = Vec::new();
        for entry in fs::read_dir(&dir).map_err(read_err)? {
            let entry = entry.map_err(read_err)?;
            let Some(id) = entry.file_name().to_str().and_then(|n| format!("sha256:{n}").parse::<ContentId>().ok())
            else {
                continue;
            };
            let md = entry.metadata().map_err(read_err)?;
            if md.is_file() {
                items.push((id, md.len()));
            }
        }
        items.sort();
        Ok(items)
    }

    /// Opens item `id` for reading, and its size.
    pub fn open_item(&self, id: &ContentId) -> Result<(File, u64), ItemError> {
        let name = CString::new(id.hex()).map_err(|e| ItemError::Io(*id, io::Error::other(e)))?;
        // O_NONBLOCK: opening a FIFO someone put there must not block; it
        // is refused below like any other non-file.
        let flags = libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_NOCTTY;
        // SAFETY: `items` is an open directory descriptor and `name` a
        // NUL-terminated string, both outliving the call.
        let fd = unsafe { libc::openat(self.items.as_raw_fd(), name.as_ptr(), flags) };
        if fd < 0 {
            let err = io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::ENOENT) => ItemError::NotFound(*id),
                Some(libc::ELOOP) => ItemError::NotAFile(*id),
                _ => ItemError::Io(*id, err),
            });
        }
        // SAFETY: fd was just opened (checked above) and nothing else owns it.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let md = file.metadata().map_err(|e| ItemError::Io(*id, e))?;
        if !md.is_file() {
            return Err(ItemError::NotAFile(*id));
        }
        Ok((file, md.len()))
    }

    /// Whether the store holds item `id` (a readable regular file).
    pub fn contains(&self, id: &ContentId) -> Result<bool, ItemError> {
        match self.open_item(id) {
            Ok(_) => Ok(true),
            Err(ItemError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Removes the leftovers of imports whose process is gone.
    fn remove_stale_imports(&self) {
        let Ok(entries) = fs::read_dir(self.root.join(TMP)) else { return };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name.to_str().and_then(|n| n.strip_prefix("import-")).and_then(|n| n.split('-').next())
            else {
                continue;
            };
            if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// A name for an import no other import of this or another process uses.
fn import_name() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("import-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Copies `input` to `out`, returning the SHA-256 of what was copied and
/// its length.
fn copy_hashing(input: &mut File, out: &mut File, from: &Path, to: &Path) -> Result<([u8; 32], u64), StoreError> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => return Err(StoreError::Source { path: from.to_path_buf(), source }),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|source| StoreError::Write { path: to.to_path_buf(), source })?;
        size += n as u64;
    }
    Ok((hasher.finalize().into(), size))
}

/// Opens directory `path`, refusing a symlink.
fn open_dir_nofollow(path: &Path) -> io::Result<OwnedFd> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)?;
    Ok(OwnedFd::from(file))
}


#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, data).expect("write");
        path
    }

    #[test]
    fn add_names_items_by_digest_and_dedups() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::create_or_open(&dir.path().join("store")).expect("create");
        let abc = file_with(dir.path(), "abc", b"abc");
        let first = store.add(&abc).expect("add");
        assert_eq!(
            first.id.to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!((first.size, first.added), (3, true));
        let again = store.add(&file_with(dir.path(), "copy", b"abc")).expect("add again");
        assert_eq!((again.id, again.added), (first.id, false));
        assert_eq!(store.list().expect("list"), vec![(first.id, 3)]);
        let (mut file, size) = store.open_item(&first.id).expect("open");
        let mut data = Vec::new();
        file.read_to_end(&mut data).expect("read");
        assert_eq!((data.as_slice(), size), (&b"abc"[..], 3));
        assert_eq!(fs::read_dir(dir.path().join("store/tmp")).expect("tmp").count(), 0, "no leftovers");
        // Reopened as an existing store.
        let reopened = Store::open(&dir.path().join("store")).expect("open");
        assert!(reopened.contains(&first.id).expect("contains"));
    }

    #[test]
    fn opening_refuses_what_is_not_a_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(Store::open(&dir.path().join("none")), Err(StoreError::Missing(_))));
        assert!(matches!(Store::open(dir.path()), Err(StoreError::NotAStore(_))));
        let file = file_with(dir.path(), "f", b"x");
        assert!(matches!(Store::open(&file), Err(StoreError::NotAStore(_))));
        assert!(matches!(Store::create_or_open(&file), Err(StoreError::NotAStore(_))));
        fs::write(dir.path().join(MARKER), b"{\"format\":\"other\",\"version\":1}").expect("marker");
        assert!(matches!(Store::open(dir.path()), Err(StoreError::BadMarker(_))));
        // A non-empty directory is not made into a store.
        assert!(matches!(Store::create_or_open(dir.path()), Err(StoreError::BadMarker(_))));
    }

    #[test]
    fn symlinks_and_odd_entries_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("store");
        let store = Store::create_or_open(&root).expect("create");
        let secret = file_with(dir.path(), "secret", b"not for guests");
        let id: ContentId =
            "sha256:0000000000000000000000000000000000000000000000000000000000000001".parse().expect("id");
        std::os::unix::fs::symlink(&secret, root.join(ITEMS).join(id.hex())).expect("symlink");
        assert!(matches!(store.open_item(&id), Err(ItemError::NotAFile(_))), "a symlink is refused, not followed");
        let dir_id: ContentId =
            "sha256:0000000000000000000000000000000000000000000000000000000000000002".parse().expect("id");
        fs::create_dir(root.join(ITEMS).join(dir_id.hex())).expect("mkdir");
        assert!(matches!(store.open_item(&dir_id), Err(ItemError::NotAFile(_))));
        let missing: ContentId =
            "sha256:0000000000000000000000000000000000000000000000000000000000000003".parse().expect("id");
        assert!(matches!(store.open_item(&missing), Err(ItemError::NotFound(_))));
        assert!(!store.contains(&missing).expect("contains"));
        // The item directory itself a symlink: refused at open.
        let other = dir.path().join("other");
        fs::create_dir(&other).expect("mkdir");
        fs::rename(root.join(ITEMS), dir.path().join("moved")).expect("move");
        std::os::unix::fs::symlink(&other, root.join(ITEMS)).expect("symlink");
        assert!(matches!(Store::open(&root), Err(StoreError::Symlink(_))));
    }

    #[test]
    fn stale_imports_are_removed_and_directories_are_not_imported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("store");
        let store = Store::create_or_open(&root).expect("create");
        // pid 0 is never a process.
        fs::write(root.join(TMP).join("import-0-7"), b"half").expect("stale");
        store.add(&file_with(dir.path(), "a", b"a")).expect("add");
        assert_eq!(fs::read_dir(root.join(TMP)).expect("tmp").count(), 0);
        assert!(matches!(store.add(dir.path()), Err(StoreError::NotAFile(_))));
        assert!(matches!(store.add(&dir.path().join("nope")), Err(StoreError::Source { .. })));
    }
}
