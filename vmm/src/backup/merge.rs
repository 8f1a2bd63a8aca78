//! `stasis backup merge STORE --keep N`: folds a store's oldest backups
//! into the oldest one kept, which becomes full.
//!
//! With backups `1..=K` and `--keep N`, backup `s = K-N+1` is rewritten as
//! a full backup (its chain flattened: memory and every disk), backups
//! before it are removed, and the backup after it, a layer on it, is
//! copied with its header naming the flattened parent
//! ([`checkpoint::rebase_layer`]; its index, and so every later layer,
//! stays valid). Ids, sequence numbers and content stay the same, so a
//! VM's retired record still matches the store's latest backup.
//!
//! Crash safety, with a journal in `STORE/.merge/`:
//!
//! 1. The new files are written and synced in `.merge/` (the store is not
//!    touched). A kill here leaves `.merge/` without a journal: the next
//!    process to open the store removes it.
//! 2. `.merge/journal.json` is written (temporary file, fsync, rename,
//!    directory fsync): the commit point. It lists the files to move into
//!    place and the backups to remove.
//! 3. The journal is applied: each file renamed into place, each removed
//!    backup renamed into `.merge/`, then `.merge/` removed. Every step
//!    can be repeated, so a process that opens the store and finds a
//!    journal (a merge killed while applying it) applies it again first.
//!
//! The store's lock ([`super::StoreLock`]) keeps a backup from being
//! written while a merge runs, and the other way round.

use std::fs;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{disk_files, sequence_name, BackupError, Store, StoreLock};
use crate::checkpoint::{self, Reader, ReaderOptions, WriterOptions};
use crate::persist;

/// Where a merge stages its files, inside the store.
pub const MERGE_DIR: &str = ".merge";
const JOURNAL_FILE: &str = "journal.json";
const JOURNAL_FORMAT: &str = "stasis-backup-merge";

/// A committed merge: what is left to do to finish it.
#[derive(Debug, Serialize, Deserialize)]
struct Journal {
    format: String,
    /// Files to rename into place, in order: from (in the staging
    /// directory) and to (in the store).
    moves: Vec<(String, String)>,
    /// The backups to remove, by directory name.
    remove: Vec<String>,
}

/// Test hook: `STASIS_TEST_MERGE_KILL_AT=N` kills the merging process with
/// SIGKILL just before its step N (1-based), so tests can stop a merge at
/// every point; unset, nothing happens.
struct KillPoints {
    at: Option<u64>,
    step: u64,
}

impl KillPoints {
    fn from_env() -> Self {
        let at = std::env::var("STASIS_TEST_MERGE_KILL_AT").ok().and_then(|v| v.parse().ok());
        KillPoints { at, step: 0 }
    }

    fn step(&mut self) {
        self.step += 1;
        if self.at == Some(self.step) {
            // SAFETY: raising a signal on this process.
            unsafe { libc::raise(libc::SIGKILL) };
        }
    }
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> BackupError + '_ {
    move |e| BackupError::Io(path.to_path_buf(), e)
}

/// A journal path must be a plain relative path without `..`.
fn plain(path: &str) -> Option<&Path> {
    let p = Path::new(path);
    let ok = !path.is_empty() && p.components().all(|c| matches!(c, Component::Normal(_)));
    ok.then_some(p)
}

/// Finishes a merge that was committed (its journal written) but not
/// applied, or removes the staging of one that was not committed. The
/// caller holds the store's lock.
pub(super) fn recover(store: &Store, _lock: &StoreLock) -> Result<(), BackupError> {
    let staging = store.dir.join(MERGE_DIR);
    let journal_path = staging.join(JOURNAL_FILE);
    match fs::read(&journal_path) {
        Ok(text) => {
            let journal: Journal = serde_json::from_slice(&text)
                .ok()
                .filter(|j: &Journal| j.format == JOURNAL_FORMAT)
                .ok_or_else(|| BackupError::BadJournal(journal_path.clone()))?;
            log::info!("finishing the merge of {} that was interrupted", store.dir.display());
            apply(store, &journal, &mut KillPoints { at: None, step: 0 })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if staging.exists() {
                log::info!("removing {}, left by a merge that did not commit", staging.display());
                fs::remove_dir_all(&staging).map_err(io_error(&staging))?;
            }
            Ok(())
        }
        Err(e) => Err(BackupError::Io(journal_path, e)),
    }
}

/// Applies a committed journal; every step may have been done already.
fn apply(store: &Store, journal: &Journal, kill: &mut KillPoints) -> Result<(), BackupError> {
    let staging = store.dir.join(MERGE_DIR);
    let bad = || BackupError::BadJournal(staging.join(JOURNAL_FILE));
    let mut touched = Vec::new();
    for (from, to) in &journal.moves {
        let (from, to) = (staging.join(plain(from).ok_or_else(bad)?), store.dir.join(plain(to).ok_or_else(bad)?));
        if from.exists() {
            kill.step();
            fs::rename(&from, &to).map_err(io_error(&to))?;
        }
        if let Some(dir) = to.parent() {
            if !touched.contains(&dir.to_path_buf()) {
                touched.push(dir.to_path_buf());
            }
        }
    }
    for dir in &touched {
        persist::sync_directory(dir).map_err(io_error(dir))?;
    }
    for name in &journal.remove {
        let dir = store.dir.join(plain(name).ok_or_else(bad)?);
        if dir.exists() {
            kill.step();
            fs::rename(&dir, staging.join(format!("removed-{name}"))).map_err(io_error(&dir))?;
        }
    }
    persist::sync_directory(&store.dir).map_err(io_error(&store.dir))?;
    kill.step();
    fs::remove_dir_all(&staging).map_err(io_error(&staging))?;
    persist::sync_directory(&store.dir).map_err(io_error(&store.dir))
}

/// What a merge did.
#[derive(Debug, Serialize)]
pub struct MergeReport {
    /// Backups removed (folded into `full`).
    pub removed: Vec<String>,
    /// The backup that is full now, when a merge happened.
    pub full: Option<String>,
    /// The backup rewritten to name the flattened one as its parent.
    pub rebased: Option<String>,
    /// The store's backups afterwards.
    pub kept: Vec<String>,
    /// Bytes of the new full backup's memory and disk checkpoints.
    pub full_bytes: u64,
}

/// Keeps the newest `keep` backups of the store in `dir`, folding the
/// older ones into the oldest kept one.
pub fn merge(dir: &Path, keep: usize) -> Result<MergeReport, String> {
    let chain = |e: BackupError| crate::error_chain(&e);
    if keep == 0 {
        return Err("--keep must be at least 1: the store keeps its newest backups".into());
    }
    let store = Store::open(dir).map_err(chain)?;
    let lock = store.lock().map_err(chain)?;
    recover(&store, &lock).map_err(chain)?;
    let entries = store.backups().map_err(chain)?;
    let names = |list: &[super::Entry]| list.iter().map(|e| sequence_name(e.sequence)).collect::<Vec<_>>();
    if entries.len() <= keep {
        return Ok(MergeReport { removed: Vec::new(), full: None, rebased: None, kept: names(&entries), full_bytes: 0 });
    }
    let cut = entries.len() - keep;
    let first = &entries[cut];
    let first_name = sequence_name(first.sequence);
    let staging = store.dir.join(MERGE_DIR);
    fs::create_dir(&staging).map_err(|e| chain(BackupError::Io(staging.clone(), e)))?;
    let mut kill = KillPoints::from_env();
    let mut moves = Vec::new();
    let mut rebased = None;
    let mut full_bytes = 0;
    if first.manifest.parent.is_some() {
        let child = entries
            .get(cut + 1)
            .filter(|c| c.manifest.parent.as_ref().is_some_and(|p| p.id == first.manifest.id));
        let fail = |what: &Path, why: String| format!("cannot merge into backup {}: {}: {why}", first.dir.display(), what.display());
        let layers = persist::snapshot_chain(&first.dir, &first.manifest, &first.dir.join(&first.manifest.memory_file))
            .map_err(|e| fail(&first.dir, crate::error_chain(&e)))?;
        let base = staging.join("base");
        let next = staging.join("next");
        for d in [&base, &next] {
            fs::create_dir(d).map_err(|e| fail(d, e.to_string()))?;
        }
        // (name in the backup, name in the next one, the chain's files)
        let child_memory = child.map_or(first.manifest.memory_file.clone(), |c| c.manifest.memory_file.clone());
        let mut files: Vec<(String, String, Vec<PathBuf>)> = vec![(
            first.manifest.memory_file.clone(),
            child_memory,
            layers.iter().map(|l| l.memory_path.clone()).collect(),
        )];
        for name in disk_files(&first.dir)? {
            let paths = layers.iter().map(|l| l.dir.join(&name)).collect();
            files.push((name.clone(), name, paths));
        }
        let mut memory_crc = None;
        for (name, child_file, paths) in &files {
            let reader = Reader::open_chain(paths, ReaderOptions::default()).map_err(|e| fail(&paths[0], crate::error_chain(&e)))?;
            let out = base.join(name);
            let options = WriterOptions {
                memory_block_size: reader.header().memory_block_size,
                storage_block_size: reader.header().storage_block_size,
                ..WriterOptions::default()
            };
            kill.step();
            let stats =
                checkpoint::flatten(&reader, &out, &options, &mut |_, _| {}).map_err(|e| fail(&out, crate::error_chain(&e)))?;
            full_bytes += stats.file_bytes;
            let crc = Reader::open(&out).map_err(|e| fail(&out, crate::error_chain(&e)))?.index_crc();
            memory_crc.get_or_insert(crc);
            moves.push((format!("base/{name}"), format!("{first_name}/{name}")));
            if let Some(child) = child {
                let from = child.dir.join(child_file);
                kill.step();
                checkpoint::rebase_layer(&from, &next.join(child_file), crc).map_err(|e| fail(&from, e.to_string()))?;
                moves.push((format!("next/{child_file}"), format!("{}/{child_file}", sequence_name(child.sequence))));
            }
        }
        // Manifests last: a backup's files are all in place before its
        // manifest says what they are.
        let mut manifest = first.manifest.clone();
        manifest.parent = None;
        write_json(&base.join("manifest.json"), &manifest)?;
        moves.push(("base/manifest.json".into(), format!("{first_name}/manifest.json")));
        if let Some(child) = child {
            let mut manifest = child.manifest.clone();
            if let (Some(parent), Some(crc)) = (manifest.parent.as_mut(), memory_crc) {
                parent.index_crc = crc;
            }
            write_json(&next.join("manifest.json"), &manifest)?;
            let child_name = sequence_name(child.sequence);
            moves.push(("next/manifest.json".into(), format!("{child_name}/manifest.json")));
            rebased = Some(child_name);
        }
        for d in [&base, &next, &staging] {
            persist::sync_directory(d).map_err(|e| fail(d, e.to_string()))?;
        }
    }
    let journal = Journal { format: JOURNAL_FORMAT.into(), moves, remove: names(&entries[..cut]) };
    kill.step();
    write_json(&staging.join(format!("{JOURNAL_FILE}.partial")), &journal)?;
    kill.step();
    fs::rename(staging.join(format!("{JOURNAL_FILE}.partial")), staging.join(JOURNAL_FILE))
        .map_err(|e| chain(BackupError::Io(staging.clone(), e)))?;
    persist::sync_directory(&staging).map_err(|e| chain(BackupError::Io(staging.clone(), e)))?;
    apply(&store, &journal, &mut kill).map_err(chain)?;
    Ok(MergeReport {
        removed: journal.remove,
        full: Some(first_name),
        rebased,
        kept: names(&entries[cut..]),
        full_bytes,
    })
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), String> {
    let text = serde_json::to_vec_pretty(value).map_err(|e| e.to_string())?;
    persist::write_file_synced(path, &text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_paths_stay_inside_the_store() {
        assert!(plain("000003/memory.ckpt").is_some());
        assert!(plain("base/disk0.ckpt").is_some());
        for bad in ["", "/etc/passwd", "../x", "a/../../b", "./a"] {
            assert!(plain(bad).is_none(), "{bad:?}");
        }
    }
}
