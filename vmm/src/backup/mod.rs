//! Incremental backups of a running VM into a backup store, with retired
//! records (`docs/backups.md`).
//!
//! A backup is a live snapshot written straight into the store as
//! `STORE/<sequence>/` (six digits): `manifest.json`, `state.bin`,
//! `memory.ckpt` and one checkpoint per disk (`diskN.ckpt`, see
//! [`disk`]). The first backup is full; each next one is a layer on the one
//! before (the same parent links as incremental snapshots), holding only the
//! memory and disk blocks changed since. So `stasis restore STORE/<n>`
//! follows the chain like any incremental snapshot.
//!
//! Nothing of a backup stays on the VM's machine: the store is the only
//! copy of its data. What the VM keeps, in its state directory, is the
//! **retired record** of its latest backup ([`RetiredRecord`]): the backup's
//! id and sequence, and for memory and every disk the CRC-32C of every
//! block the backup covers. The next backup needs nothing else:
//!
//! - while the VMM that took the previous backup runs, the blocks changed
//!   since are known exactly (dirty tracking for memory,
//!   [`crate::devices::virtio::block::changed`] for disks);
//! - when that tracking is lost (a new VMM: the VM was restored, or the
//!   previous backup failed), every block's CRC is compared with the
//!   record, and only the blocks that differ are written.
//!
//! Crash safety: a backup is written into a partial directory in the store
//! and renamed to its sequence only when complete and synced; the record is
//! replaced (write, fsync, rename) only after that. A kill at any point
//! leaves the store at its previous backup or with the new one complete; a
//! record older than the store's latest backup is noticed and refused with
//! the way out (`--full`).

pub mod disk;
pub mod merge;
mod vm;

pub use vm::{report_json, BackupCapture, BackupFinish, BackupMode, BackupReport};

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::checkpoint::{Reader, ReaderOptions, Region};
use crate::persist::{self, Manifest, PersistError};

/// The file that marks a directory as a backup store.
pub const STORE_FILE: &str = "stasis-backup-store.json";

/// The retired record's name in the VM's state directory.
pub const RETIRED_FILE: &str = "retired.json";

const STORE_FORMAT: &str = "stasis-backup-store";
const RETIRED_FORMAT: &str = "stasis-retired-backup";

/// Errors of backup stores and retired records.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("cannot use backup store {0}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("{0} is not a backup store: it holds other files and no {STORE_FILE}")]
    NotAStore(PathBuf),
    #[error("{0} is not a backup store: it has no {STORE_FILE}")]
    Missing(PathBuf),
    #[error("the store marker {0} is damaged: {1}")]
    BadMarker(PathBuf, String),
    #[error("{0} is the backup store of another VM (VM id {1}; this VM is {2})")]
    OtherVm(PathBuf, String, String),
    #[error("backup {0}")]
    Backup(PathBuf, #[source] PersistError),
    #[error("the retired record {0} is damaged: {1}")]
    BadRecord(PathBuf, String),
    #[error("cannot write the retired record {0}")]
    WriteRecord(PathBuf, #[source] std::io::Error),
    #[error("backup store {0} is busy: another backup or a merge is writing to it; try again when it ends")]
    Busy(PathBuf),
    #[error("the store has an unfinished merge whose journal {0} is damaged; remove the store's .merge directory only after checking that every backup it names is complete")]
    BadJournal(PathBuf),
}

/// `STORE/stasis-backup-store.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreMarker {
    /// Always [`STORE_FORMAT`].
    pub format: String,
    /// Marker version: 1.
    pub version: u32,
    /// The store's own id.
    pub id: String,
    /// The VM whose backups it holds.
    pub vm_id: String,
}

/// The store's lock (`flock` on its marker), released when dropped.
#[derive(Debug)]
pub struct StoreLock {
    _file: fs::File,
}

/// One backup in a store.
#[derive(Clone, Debug)]
pub struct Entry {
    /// Its sequence number.
    pub sequence: u64,
    /// `STORE/<sequence>`.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

/// An opened backup store.
#[derive(Clone, Debug)]
pub struct Store {
    /// Its directory.
    pub dir: PathBuf,
    /// Its marker.
    pub marker: StoreMarker,
}

impl Store {
    /// Opens an existing store, first finishing (or undoing) a merge that
    /// was killed ([`merge`]).
    pub fn open(dir: &Path) -> Result<Store, BackupError> {
        let store = Store::open_marker(dir)?;
        store.recover()?;
        Ok(store)
    }

    fn recover(&self) -> Result<(), BackupError> {
        let staging = self.dir.join(merge::MERGE_DIR);
        if !staging.exists() {
            return Ok(());
        }
        let lock = match self.lock() {
            Ok(lock) => lock,
            // A merge is applying its journal: wait for it.
            Err(BackupError::Busy(_)) if staging.join("journal.json").exists() => self.lock_with(libc::LOCK_EX)?,
            // A merge is staging its files; the store is as it was.
            Err(BackupError::Busy(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        merge::recover(self, &lock)
    }

    /// Takes the store's lock, held by a backup while it writes and by a
    /// merge: one at a time.
    pub fn lock(&self) -> Result<StoreLock, BackupError> {
        self.lock_with(libc::LOCK_EX | libc::LOCK_NB)
    }

    fn lock_with(&self, how: libc::c_int) -> Result<StoreLock, BackupError> {
        let file = fs::File::open(self.dir.join(STORE_FILE)).map_err(|e| BackupError::Io(self.dir.clone(), e))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&file), how) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(BackupError::Busy(self.dir.clone()));
            }
            return Err(BackupError::Io(self.dir.clone(), e));
        }
        Ok(StoreLock { _file: file })
    }

    fn open_marker(dir: &Path) -> Result<Store, BackupError> {
        let path = dir.join(STORE_FILE);
        if !path.is_file() {
            return Err(BackupError::Missing(dir.to_path_buf()));
        }
        let text = fs::read(&path).map_err(|e| BackupError::Io(dir.to_path_buf(), e))?;
        let marker: StoreMarker =
            serde_json::from_slice(&text).map_err(|e| BackupError::BadMarker(path.clone(), e.to_string()))?;
        if marker.format != STORE_FORMAT || marker.version != 1 {
            return Err(BackupError::BadMarker(path, format!("format {:?} version {}", marker.format, marker.version)));
        }
        Ok(Store { dir: dir.to_path_buf(), marker })
    }

    /// Opens the store of VM `vm_id` in `dir`, creating it if `dir` is
    /// missing or empty.
    pub fn open_or_create(dir: &Path, vm_id: &str) -> Result<Store, BackupError> {
        let io = |e| BackupError::Io(dir.to_path_buf(), e);
        if !dir.join(STORE_FILE).exists() {
            fs::create_dir_all(dir).map_err(io)?;
            if fs::read_dir(dir).map_err(io)?.next().is_some() {
                return Err(BackupError::NotAStore(dir.to_path_buf()));
            }
            let marker = StoreMarker { format: STORE_FORMAT.into(), version: 1, id: persist::new_id(), vm_id: vm_id.into() };
            let text = serde_json::to_vec_pretty(&marker).map_err(|e| io(std::io::Error::other(e)))?;
            let temp = dir.join(format!(".{STORE_FILE}.partial"));
            persist::write_file_synced(&temp, &text).map_err(io)?;
            fs::rename(&temp, dir.join(STORE_FILE)).map_err(io)?;
            persist::sync_directory(dir).map_err(io)?;
        }
        let store = Store::open(dir)?;
        if store.marker.vm_id != vm_id {
            return Err(BackupError::OtherVm(dir.to_path_buf(), store.marker.vm_id, vm_id.into()));
        }
        store.remove_abandoned();
        Ok(store)
    }

    /// Removes the partial directories of backups whose VMM died (killed
    /// while writing): `.NNNNNN.partial-PID` with no process PID.
    fn remove_abandoned(&self) {
        let Ok(items) = fs::read_dir(&self.dir) else { return };
        for item in items.flatten() {
            let name = item.file_name().to_string_lossy().into_owned();
            let Some((seq, pid)) = name.strip_prefix('.').and_then(|n| n.split_once(".partial-")) else { continue };
            let Ok(pid) = pid.parse::<i32>() else { continue };
            if parse_sequence(seq).is_none() || pid <= 0 {
                continue;
            }
            if crate::persist::process_gone(pid) {
                log::info!("removing {}, left by a backup that did not finish", item.path().display());
                let _ = fs::remove_dir_all(item.path());
            }
        }
    }

    /// The complete backups, oldest first (partial directories of backups
    /// under way or interrupted are not listed).
    pub fn backups(&self) -> Result<Vec<Entry>, BackupError> {
        let mut entries = Vec::new();
        for item in fs::read_dir(&self.dir).map_err(|e| BackupError::Io(self.dir.clone(), e))? {
            let item = item.map_err(|e| BackupError::Io(self.dir.clone(), e))?;
            let name = item.file_name().to_string_lossy().into_owned();
            let Some(sequence) = parse_sequence(&name) else { continue };
            let dir = item.path();
            let manifest = persist::read_manifest(&dir).map_err(|e| BackupError::Backup(dir.clone(), e))?;
            entries.push(Entry { sequence, dir, manifest });
        }
        entries.sort_by_key(|e| e.sequence);
        Ok(entries)
    }

    /// Where backup `sequence` goes.
    pub fn path_of(&self, sequence: u64) -> PathBuf {
        self.dir.join(sequence_name(sequence))
    }
}

/// A backup directory's name.
pub fn sequence_name(sequence: u64) -> String {
    format!("{sequence:06}")
}

fn parse_sequence(name: &str) -> Option<u64> {
    if name.len() == 6 && name.bytes().all(|b| b.is_ascii_digit()) {
        name.parse().ok().filter(|&n| n > 0)
    } else {
        None
    }
}

/// The CRCs of every block one checkpoint (memory, or one disk) of a
/// backup covers: block `i` starts `i` blocks of `block_size` into the
/// regions, region by region.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockList {
    /// Block size in bytes.
    pub block_size: u32,
    /// The regions: guest addresses for memory, one region at 0 for a disk.
    pub regions: Vec<(u64, u64)>,
    /// CRC-32C of each block's content.
    pub crcs: Vec<u32>,
}

impl BlockList {
    /// The list a checkpoint (or chain) resolves to, from its index only.
    pub fn of(reader: &Reader) -> Result<BlockList, String> {
        Ok(BlockList {
            block_size: reader.header().memory_block_size,
            regions: reader.header().regions.iter().map(|r| (r.guest_addr, r.size)).collect(),
            crcs: disk::block_crcs(reader)?,
        })
    }

    /// Whether it describes blocks of `regions` cut at `block_size`.
    pub fn fits(&self, regions: &[Region], block_size: u32) -> bool {
        self.block_size == block_size
            && self.regions.len() == regions.len()
            && self.regions.iter().zip(regions).all(|(a, b)| a.0 == b.guest_addr && a.1 == b.size)
    }
}

/// What the VM keeps of its latest backup once the store holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetiredRecord {
    /// Always [`RETIRED_FORMAT`].
    pub format: String,
    /// Record version: 1.
    pub version: u32,
    /// The VM's id.
    pub vm_id: String,
    /// The store's id and where it was.
    pub store_id: String,
    pub store: PathBuf,
    /// The backup's sequence and id.
    pub sequence: u64,
    pub backup_id: String,
    /// Backups this VM took (of any VMM process) up to this one.
    pub generation: u64,
    /// Memory.
    pub memory: BlockList,
    /// Every disk, in device order.
    pub disks: Vec<BlockList>,
}

impl RetiredRecord {
    /// Reads the record in `state_dir`, if there is one.
    pub fn load(state_dir: &Path) -> Result<Option<RetiredRecord>, BackupError> {
        let path = state_dir.join(RETIRED_FILE);
        let text = match fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(BackupError::BadRecord(path, e.to_string())),
        };
        let record: RetiredRecord =
            serde_json::from_slice(&text).map_err(|e| BackupError::BadRecord(path.clone(), e.to_string()))?;
        if record.format != RETIRED_FORMAT || record.version != 1 {
            return Err(BackupError::BadRecord(path, format!("format {:?} version {}", record.format, record.version)));
        }
        Ok(Some(record))
    }

    /// Replaces the record in `state_dir` (created if missing) at once.
    pub fn save(&self, state_dir: &Path) -> Result<(), BackupError> {
        let path = state_dir.join(RETIRED_FILE);
        let err = |e| BackupError::WriteRecord(path.clone(), e);
        fs::create_dir_all(state_dir).map_err(err)?;
        let text = serde_json::to_vec(self).map_err(|e| err(std::io::Error::other(e)))?;
        let temp = state_dir.join(format!(".{RETIRED_FILE}.partial"));
        persist::write_file_synced(&temp, &text).map_err(err)?;
        fs::rename(&temp, &path).map_err(err)?;
        persist::sync_directory(state_dir).map_err(err)
    }

    /// The record of backup `entry` of `store`, built from its index (no
    /// data is read).
    pub fn build(store: &Store, entry: &Entry, generation: u64) -> Result<RetiredRecord, String> {
        let chain = persist::snapshot_chain(&entry.dir, &entry.manifest, &entry.dir.join(&entry.manifest.memory_file))
            .map_err(|e| crate::error_chain(&e))?;
        let memory: Vec<PathBuf> = chain.iter().map(|l| l.memory_path.clone()).collect();
        let reader = Reader::open_chain(&memory, ReaderOptions::default()).map_err(|e| crate::error_chain(&e))?;
        let mut disks = Vec::new();
        for name in disk_files(&entry.dir)? {
            let paths: Vec<PathBuf> = chain.iter().map(|l| l.dir.join(&name)).collect();
            let disk = Reader::open_chain(&paths, ReaderOptions::default()).map_err(|e| crate::error_chain(&e))?;
            disks.push(BlockList::of(&disk)?);
        }
        Ok(RetiredRecord {
            format: RETIRED_FORMAT.into(),
            version: 1,
            vm_id: store.marker.vm_id.clone(),
            store_id: store.marker.id.clone(),
            store: store.dir.clone(),
            sequence: entry.sequence,
            backup_id: entry.manifest.id.clone(),
            generation,
            memory: BlockList::of(&reader)?,
            disks,
        })
    }
}

/// The disk checkpoints of a backup directory, `disk0.ckpt` first.
pub fn disk_files(dir: &Path) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    for index in 0.. {
        let name = disk_file_name(index);
        if !dir.join(&name).is_file() {
            break;
        }
        names.push(name);
    }
    let _ = fs::metadata(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    Ok(names)
}

/// Disk `index`'s checkpoint in a backup directory.
pub fn disk_file_name(index: usize) -> String {
    format!("disk{index}.ckpt")
}

/// The default state directory of VM `vm_id`: `$STASIS_STATE_DIR/<vm_id>`,
/// else `$XDG_STATE_HOME/stasis/vms/<vm_id>`, else
/// `$HOME/.local/state/stasis/vms/<vm_id>`.
pub fn default_state_dir(vm_id: &str) -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = var("STASIS_STATE_DIR") {
        return dir.join(vm_id);
    }
    let base = var("XDG_STATE_HOME").unwrap_or_else(|| var("HOME").unwrap_or_else(|| PathBuf::from("/")).join(".local/state"));
    base.join("stasis/vms").join(vm_id)
}

/// One line per backup of `store`: sequence, kind, time, bytes.
pub fn list(store: &Path, out: &mut dyn std::io::Write) -> Result<(), String> {
    let store = Store::open(store).map_err(|e| crate::error_chain(&e))?;
    let entries = store.backups().map_err(|e| crate::error_chain(&e))?;
    let w = |e: std::io::Error| e.to_string();
    writeln!(out, "store {} (VM {}): {} backup(s)", store.dir.display(), store.marker.vm_id, entries.len()).map_err(w)?;
    for entry in &entries {
        let kind = if entry.manifest.parent.is_some() { "incremental" } else { "full" };
        let bytes: u64 = fs::read_dir(&entry.dir)
            .map_err(|e| e.to_string())?
            .filter_map(Result::ok)
            .filter_map(|f| f.metadata().ok())
            .map(|m| m.len())
            .sum();
        writeln!(
            out,
            "{}  {:<11}  created {}  {} bytes  id {}",
            sequence_name(entry.sequence),
            kind,
            entry.manifest.created_unix,
            bytes,
            entry.manifest.id
        )
        .map_err(w)?;
    }
    Ok(())
}

/// Checks every backup of `store`: its chain links, every stored block's
/// checksum in its memory and disk checkpoints, its state file. Prints
/// one line per backup; the error names the first problem.
pub fn verify(store: &Path, out: &mut dyn std::io::Write) -> Result<(), String> {
    let store = Store::open(store).map_err(|e| crate::error_chain(&e))?;
    let entries = store.backups().map_err(|e| crate::error_chain(&e))?;
    let w = |e: std::io::Error| e.to_string();
    let mut disk_count = None;
    for entry in &entries {
        let name = entry.dir.display().to_string();
        let fail = |why: String| format!("backup {name}: {why}");
        if entry.manifest.vm_id != store.marker.vm_id {
            return Err(fail(format!("it is a backup of another VM ({})", entry.manifest.vm_id)));
        }
        persist::open_snapshot(&entry.dir).map_err(|e| fail(crate::error_chain(&e)))?;
        let chain = persist::snapshot_chain(&entry.dir, &entry.manifest, &entry.dir.join(&entry.manifest.memory_file))
            .map_err(|e| fail(crate::error_chain(&e)))?;
        let mut files = vec![(entry.manifest.memory_file.clone(), chain.iter().map(|l| l.memory_path.clone()).collect::<Vec<_>>())];
        let disks = disk_files(&entry.dir).map_err(fail)?;
        if *disk_count.get_or_insert(disks.len()) != disks.len() {
            return Err(fail(format!("it has {} disk checkpoints, the backups before it {}", disks.len(), disk_count.unwrap_or(0))));
        }
        for disk in &disks {
            files.push((disk.clone(), chain.iter().map(|l| l.dir.join(disk)).collect()));
        }
        let mut blocks = 0;
        for (file, paths) in &files {
            let reader =
                Reader::open_chain(paths, ReaderOptions::default()).map_err(|e| fail(format!("{file}: {}", crate::error_chain(&e))))?;
            blocks += reader.verify_layer().map_err(|e| fail(format!("{file}: {}", crate::error_chain(&e))))?;
        }
        writeln!(
            out,
            "{}  ok  {} file(s), {} stored block(s) checked, chain of {}",
            sequence_name(entry.sequence),
            files.len(),
            blocks,
            chain.len()
        )
        .map_err(w)?;
    }
    writeln!(out, "store {}: {} backup(s) verified", store.dir.display(), entries.len()).map_err(w)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_is_made_in_an_empty_directory_and_refused_to_another_vm_or_over_other_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("store");
        let made = Store::open_or_create(&store, "vm-a").expect("create");
        assert_eq!(made.marker.vm_id, "vm-a");
        assert!(made.backups().expect("list").is_empty());
        let again = Store::open_or_create(&store, "vm-a").expect("reopen");
        assert_eq!(again.marker.id, made.marker.id, "reopening keeps the store's id");
        let other = Store::open_or_create(&store, "vm-b").expect_err("another VM").to_string();
        assert!(other.contains("another VM") && other.contains("vm-a"), "{other}");
        let busy = dir.path().join("busy");
        fs::create_dir(&busy).expect("mkdir");
        fs::write(busy.join("x"), b"x").expect("write");
        let refused = Store::open_or_create(&busy, "vm-a").expect_err("not empty").to_string();
        assert!(refused.contains("not a backup store"), "{refused}");
        let missing = Store::open(&dir.path().join("none")).expect_err("missing").to_string();
        assert!(missing.contains("no stasis-backup-store.json"), "{missing}");
    }

    #[test]
    fn partial_directories_of_dead_writers_are_removed_and_live_ones_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = dir.path().join("store");
        Store::open_or_create(&store, "vm").expect("create");
        let mine = store.join(format!(".000002.partial-{}", std::process::id()));
        // Far above any pid_max: no such process.
        let dead = store.join(".000002.partial-2000000000");
        let other = store.join(".notes.partial-1");
        for d in [&mine, &dead, &other] {
            fs::create_dir(d).expect("mkdir");
        }
        Store::open_or_create(&store, "vm").expect("reopen");
        assert!(mine.exists(), "a running writer's directory is kept");
        assert!(!dead.exists(), "a dead writer's directory is removed");
        assert!(other.exists(), "names that are not backups are left alone");
    }

    #[test]
    fn only_six_digit_sequences_are_backups() {
        assert_eq!(parse_sequence("000012"), Some(12));
        assert_eq!(parse_sequence("000000"), None);
        assert_eq!(parse_sequence(".000003.partial-77"), None);
        assert_eq!(parse_sequence("12"), None);
        assert_eq!(sequence_name(7), "000007");
    }

    #[test]
    fn a_record_round_trips_and_a_damaged_one_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(RetiredRecord::load(dir.path()).expect("none").is_none());
        let list = BlockList { block_size: 65536, regions: vec![(0, 1 << 20)], crcs: vec![1; 16] };
        let record = RetiredRecord {
            format: RETIRED_FORMAT.into(),
            version: 1,
            vm_id: "v".into(),
            store_id: "s".into(),
            store: "/store".into(),
            sequence: 3,
            backup_id: "b".into(),
            generation: 3,
            memory: list.clone(),
            disks: vec![list],
        };
        let state = dir.path().join("state");
        record.save(&state).expect("save");
        assert_eq!(RetiredRecord::load(&state).expect("load"), Some(record));
        fs::write(state.join(RETIRED_FILE), b"{").expect("damage");
        let e = RetiredRecord::load(&state).expect_err("damaged").to_string();
        assert!(e.contains("retired record") && e.contains("damaged"), "{e}");
    }
}
