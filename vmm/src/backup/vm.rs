//! A running VM's backup: deciding what to copy, the pause, and retiring
//! the backup once the store holds it (the sequence around
//! [`Vmm::capture`], which snapshots share).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::disk::{CopyOut, DiskBlocks, DiskJob};
use super::{default_state_dir, disk_file_name, sequence_name, Entry, RetiredRecord, Store, StoreLock};
use crate::checkpoint::{writer::DEFAULT_MEMORY_BLOCK_SIZE, Reader, WriteStats};
use crate::devices::virtio::block::changed::ChangedBlocks;
use crate::error_chain;
use crate::persist::{self, Identity, ParentRef, SnapshotWriter};
use crate::vmm::{Begun, Finishing, SnapshotReport, Vmm, VmmError};
use crate::vstate::dirty::DirtyPages;
use crate::vstate::vcpu;

/// How a backup finds what changed since the previous one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackupMode {
    /// No previous backup to build on (or `--full`): everything.
    Full,
    /// This VMM took the previous backup: its dirty tracking and the disks'
    /// changed blocks say what changed.
    Tracked,
    /// Tracking was lost: every block's CRC is compared with the retired
    /// record.
    Compared,
}

impl BackupMode {
    fn as_str(self) -> &'static str {
        match self {
            BackupMode::Full => "full",
            BackupMode::Tracked => "dirty-tracking",
            BackupMode::Compared => "checksums",
        }
    }
}

/// What a backup's pause needs and hands on.
pub struct BackupCapture {
    mode: BackupMode,
    /// Per disk, for [`BackupMode::Compared`]: the retired CRCs.
    compare: Vec<Vec<u32>>,
    /// Per disk: the previous backup's disk checkpoint index CRC.
    parents: Vec<Option<u32>>,
    /// Memory's retired CRCs, for [`BackupMode::Compared`].
    pub(crate) memory_compare: Option<Vec<u32>>,
    /// Filled in the pause: each disk's job for the writer.
    pub(crate) jobs: Vec<DiskJob>,
    /// Filled in the pause: the blocks taken from each disk's tracker,
    /// given back if the backup fails.
    taken: Vec<(Arc<ChangedBlocks>, Vec<u64>)>,
}

impl BackupCapture {
    /// In the pause: marks what disk `index` needs and queues its
    /// checkpoint; returns the checkpoint's name and the copy, which the
    /// caller hooks into the disk's writes (nothing is copied in the
    /// pause: the writer and the hook copy while the guest runs).
    pub(crate) fn stage_disk(
        &mut self,
        writer: &SnapshotWriter,
        index: usize,
        file: &File,
        changed: &Arc<ChangedBlocks>,
    ) -> std::io::Result<(String, Arc<CopyOut>)> {
        let bits = changed.take();
        self.taken.push((Arc::clone(changed), bits.clone()));
        let size = file.metadata()?.len();
        let blocks = match self.mode {
            BackupMode::Full => DiskBlocks::All,
            BackupMode::Tracked => DiskBlocks::Changed(bits),
            BackupMode::Compared => DiskBlocks::Compare(self.compare.get(index).cloned().unwrap_or_default()),
        };
        let name = disk_file_name(index);
        let staging = writer.file_path(&format!(".disk{index}.staging"));
        let copy = CopyOut::prepare(file, size, &blocks, &staging)?;
        let parent_index_crc = if self.mode == BackupMode::Full { None } else { self.parents.get(index).copied().flatten() };
        let job = DiskJob { staging, out: writer.file_path(&name), size, blocks, parent_index_crc, copy: Arc::clone(&copy), raw: false };
        self.jobs.push(job);
        Ok((name, copy))
    }
}

/// What a backup does once its memory and disks are written.
pub struct BackupFinish {
    store: Store,
    /// Held until the backup is committed or abandoned.
    _lock: StoreLock,
    sequence: u64,
    state_dir: PathBuf,
    generation: u64,
    mode: BackupMode,
    /// Pages changed since the previous backup, given back on failure.
    memory_taken: Option<DirtyPages>,
    disks_taken: Vec<(Arc<ChangedBlocks>, Vec<u64>)>,
}

/// A backup's figures.
#[derive(Clone, Debug)]
pub struct BackupReport {
    /// Its sequence in the store.
    pub sequence: u64,
    /// How what changed was found.
    pub mode: BackupMode,
    /// Each disk checkpoint's figures.
    pub disks: Vec<WriteStats>,
    /// Bytes of the backup's files in the store.
    pub bytes_written: u64,
    /// Disk data copied for the backup (while the guest ran).
    pub disk_bytes_copied: u64,
    /// Disk blocks copied ahead of the guest's writes.
    pub disk_blocks_copied_before_write: u64,
    /// Where the retired record is.
    pub state_dir: PathBuf,
}

/// A backup's figures as the control socket reports them.
pub fn report_json(report: &SnapshotReport, backup: &BackupReport) -> serde_json::Value {
    // Blocks whose bytes the backup holds (zero blocks cost an index entry).
    let stored = |s: &WriteStats| s.raw_blocks + s.zstd_blocks;
    log::info!(
        "backup {} ({}): {} bytes written, {:.1} ms paused, {:.2} s in all",
        report.dir.display(),
        backup.mode.as_str(),
        backup.bytes_written,
        report.paused_for.as_secs_f64() * 1000.0,
        report.total.as_secs_f64()
    );
    serde_json::json!({
        "dir": report.dir.display().to_string(),
        "sequence": backup.sequence,
        "kind": if backup.mode == BackupMode::Full { "full" } else { "incremental" },
        "changes_from": backup.mode.as_str(),
        "memory_blocks_written": stored(&report.memory),
        "memory_blocks_in_parent": report.memory.parent_blocks,
        "memory_stored_bytes": report.memory.bytes_stored,
        "memory_file_bytes": report.memory.file_bytes,
        "disks": backup.disks.iter().map(|d| serde_json::json!({
            "blocks_written": stored(d),
            "blocks_in_parent": d.parent_blocks,
            "stored_bytes": d.bytes_stored,
            "file_bytes": d.file_bytes,
        })).collect::<Vec<_>>(),
        "disk_bytes_copied": backup.disk_bytes_copied,
        "disk_blocks_copied_before_write": backup.disk_blocks_copied_before_write,
        "bytes_written": backup.bytes_written,
        "state_dir": backup.state_dir.display().to_string(),
        "paused_ms": report.paused_for.as_secs_f64() * 1000.0,
        "write_s": report.total.as_secs_f64(),
    })
}

impl Vmm {
    /// Starts a backup of the running VM into the store `to` (live: the
    /// guest runs on while the writer works), building on the store's
    /// latest backup unless `full`.
    pub(crate) fn begin_backup(&mut self, to: &Path, full: bool, state_dir: Option<&Path>) -> Result<Begun, VmmError> {
        vcpu::check_xsave_size(&self.kvm)?;
        if self.pending.is_some() {
            return Err(VmmError::Busy);
        }
        let refuse = VmmError::Backup;
        let store = Store::open_or_create(to, &self.vm_id).map_err(|e| refuse(error_chain(&e)))?;
        let lock = store.lock().map_err(|e| refuse(error_chain(&e)))?;
        let state_dir = state_dir.map_or_else(|| default_state_dir(&self.vm_id), Path::to_path_buf);
        let entries = store.backups().map_err(|e| refuse(error_chain(&e)))?;
        let record = RetiredRecord::load(&state_dir).map_err(|e| refuse(error_chain(&e)))?;
        let generation = record.as_ref().map_or(0, |r| r.generation) + 1;
        let sequence = entries.last().map_or(0, |e| e.sequence) + 1;
        let disk_count = self.virtio.iter().filter(|s| matches!(s.backend, crate::vmm::SlotBackend::Block { .. })).count();

        let mut capture = BackupCapture {
            mode: BackupMode::Full,
            compare: Vec::new(),
            parents: Vec::new(),
            memory_compare: None,
            jobs: Vec::new(),
            taken: Vec::new(),
        };
        let mut parent = None;
        if let (Some(previous), false) = (entries.last(), full) {
            let record = self.check_record(&store, previous, record.as_ref(), &state_dir, disk_count)?;
            parent = Some(parent_ref(previous)?);
            for index in 0..disk_count {
                let path = previous.dir.join(disk_file_name(index));
                let reader = Reader::open(&path).map_err(|e| refuse(format!("backup {}: {}", previous.dir.display(), error_chain(&e))))?;
                capture.parents.push(Some(reader.index_crc()));
            }
            if self.backup_tracking.as_deref() == Some(previous.manifest.id.as_str()) {
                capture.mode = BackupMode::Tracked;
            } else {
                log::info!(
                    "backup: this VMM did not take backup {} ({}); comparing every block with its retired record",
                    sequence_name(previous.sequence),
                    previous.manifest.id
                );
                capture.mode = BackupMode::Compared;
                capture.memory_compare = Some(record.memory.crcs.clone());
                capture.compare = record.disks.iter().map(|d| d.crcs.clone()).collect();
            }
        }
        let writer = SnapshotWriter::create(&store.path_of(sequence))?;
        let identity = Identity { id: persist::new_id(), vm_id: self.vm_id.clone(), parent };
        let started = Instant::now();
        let (was_paused, paused_at) = self.track_and_pause()?;
        let memory_taken = match self.dirty.take_for_backup(&self.vm, &self.mem) {
            Ok(pages) => pages,
            Err(e) => {
                self.resume_unless(was_paused);
                return Err(e.into());
            }
        };
        if capture.mode == BackupMode::Tracked && memory_taken.is_none() {
            // Tracking restarted since (it cannot, while this VMM runs, but
            // the record still says everything needed).
            capture.mode = BackupMode::Compared;
        }
        let changed = if capture.mode == BackupMode::Tracked { memory_taken.clone() } else { None };
        let captured =
            self.capture(&writer, identity.parent.as_ref(), changed, true, was_paused, paused_at, Some(&mut capture));
        let finish = BackupFinish {
            store,
            _lock: lock,
            sequence,
            state_dir,
            generation,
            mode: capture.mode,
            memory_taken,
            disks_taken: std::mem::take(&mut capture.taken),
        };
        match captured {
            Ok((state, disks, disk_hooks, child, memory)) => Ok(Begun {
                writer,
                finishing: Finishing {
                    identity,
                    parent_dir: None,
                    state,
                    taken: None,
                    disks,
                    paused_for: Some(paused_at.elapsed()),
                    paused_at,
                    started,
                    memory,
                    disk_hooks,
                    backup: Some(finish),
                },
                child,
            }),
            Err(e) => {
                self.give_back_backup(finish);
                self.resume_unless(was_paused);
                Err(e)
            }
        }
    }

    /// Checks that the retired record in `state_dir` is the one of the
    /// store's latest backup, which the next backup builds on.
    fn check_record<'r>(
        &self,
        store: &Store,
        previous: &Entry,
        record: Option<&'r RetiredRecord>,
        state_dir: &Path,
        disks: usize,
    ) -> Result<&'r RetiredRecord, VmmError> {
        let latest = format!("{} ({})", previous.dir.display(), previous.manifest.id);
        let full = "take a full backup with --full";
        let Some(record) = record else {
            return Err(VmmError::Backup(format!(
                "{} holds no retired record, so what changed since the store's latest backup {latest} is unknown; {full}",
                state_dir.display()
            )));
        };
        let why = if record.vm_id != self.vm_id {
            Some(format!("is of another VM ({})", record.vm_id))
        } else if record.store_id != store.marker.id {
            Some(format!("is of another store ({})", record.store.display()))
        } else if record.backup_id != previous.manifest.id {
            Some(format!("is of backup {} ({}), not of the store's latest backup {latest}", sequence_name(record.sequence), record.backup_id))
        } else if !record.memory.fits(&crate::checkpoint::MemorySource::regions(&self.mem), DEFAULT_MEMORY_BLOCK_SIZE) {
            Some("describes memory of another size".into())
        } else if record.disks.len() != disks {
            Some(format!("lists {} disk(s), this VM has {disks}", record.disks.len()))
        } else {
            None
        };
        match why {
            Some(why) => Err(VmmError::Backup(format!(
                "the retired record {} {why}; {full}",
                state_dir.join(super::RETIRED_FILE).display()
            ))),
            None => Ok(record),
        }
    }

    /// Gives back what a failed backup took, so the next one still copies it.
    fn give_back_backup(&mut self, finish: BackupFinish) {
        self.dirty.give_back_backup(finish.memory_taken);
        for (changed, bits) in &finish.disks_taken {
            changed.give_back(bits);
        }
    }

    /// Commits a backup whose writer is done, then retires it: writes its
    /// retired record. On failure before the commit, gives back what it
    /// took; the store keeps only its earlier backups.
    pub(crate) fn finish_backup(&mut self, writer: SnapshotWriter, mut finishing: Finishing) -> Result<SnapshotReport, VmmError> {
        let Some(finish) = finishing.backup.take() else {
            return Err(VmmError::Backup("not a backup".into()));
        };
        let committed = (|| {
            let written = finishing.memory.take().unwrap_or_else(|| Err("memory was not written".into()));
            let written = written.map_err(VmmError::WriteMemory)?;
            let state_bytes = writer.write_state(&finishing.state)?;
            let dir = writer.commit(&self.machine, &finishing.identity)?;
            Ok::<_, VmmError>((dir, written, state_bytes))
        })();
        let (dir, written, state_bytes) = match committed {
            Ok(done) => done,
            Err(e) => {
                self.give_back_backup(finish);
                return Err(e);
            }
        };
        // The store holds the backup: from here it is the one to build on.
        let entry = Entry { sequence: finish.sequence, dir: dir.clone(), manifest: persist::read_manifest(&dir)? };
        let retired = RetiredRecord::build(&finish.store, &entry, finish.generation)
            .and_then(|record| record.save(&finish.state_dir).map_err(|e| error_chain(&e)));
        if let Err(msg) = retired {
            self.backup_tracking = None;
            return Err(VmmError::Backup(format!(
                "backup {} is complete in the store, but its retired record could not be written into {}: {msg}; \
                 the next backup must be taken with --full",
                dir.display(),
                finish.state_dir.display()
            )));
        }
        self.backup_tracking = Some(finishing.identity.id.clone());
        let bytes_written = std::fs::read_dir(&dir)
            .map(|items| items.filter_map(Result::ok).filter_map(|f| f.metadata().ok()).map(|m| m.len()).sum())
            .unwrap_or(0);
        Ok(SnapshotReport {
            dir,
            memory: written.memory,
            state_bytes,
            disks: finishing.disks.0,
            disk_bytes_copied: finishing.disks.1,
            paused_for: finishing.paused_for.unwrap_or_default(),
            total: finishing.started.elapsed(),
            parent: None,
            backup: Some(BackupReport {
                sequence: finish.sequence,
                mode: finish.mode,
                disks: written.disks,
                bytes_written,
                state_dir: finish.state_dir.clone(),
                disk_bytes_copied: finishing.disk_hooks.needed_bytes(),
                disk_blocks_copied_before_write: finishing.disk_hooks.copied_before_write(),
            }),
        })
    }
}

/// How a backup names the one it builds on.
fn parent_ref(previous: &Entry) -> Result<ParentRef, VmmError> {
    let memory = previous.dir.join(&previous.manifest.memory_file);
    let index_crc = Reader::open(&memory)
        .map_err(|e| VmmError::Backup(format!("backup {}: {}", previous.dir.display(), error_chain(&e))))?
        .index_crc();
    Ok(ParentRef { id: previous.manifest.id.clone(), dir: Path::new("..").join(sequence_name(previous.sequence)), index_crc })
}
