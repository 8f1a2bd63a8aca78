//! Snapshot directories and the state file.
//!
//! A snapshot directory holds:
//!
//! ```text
//! DIR/manifest.json   what the snapshot is: format, version, file names,
//!                     machine shape; written last, so a directory without
//!                     it is no snapshot
//! DIR/state.bin       vCPU, VM and device state (the state file)
//! DIR/memory.ckpt     guest memory in the staged checkpoint format
//! DIR/diskN.img       a copy of disk N (vda is disk0), holes kept, when
//!                     the VM has disks
//! ```
//!
//! The state file:
//!
//! ```text
//! offset  size  field
//! 0       8     magic "STASISST"
//! 8       4     format version, little-endian (major << 16 | minor)
//! 12      8     payload length, little-endian, at most 64 MiB
//! 20      4     CRC32C of the payload
//! 24      …     payload: `SnapshotState`, bincode (fixed-width integers)
//! ```
//!
//! Version 1.1 added the virtio devices (`SnapshotState::virtio`); a 1.0
//! file, from before there were any, still restores. Version 1.2 added
//! `VirtioBackend::VsockWithoutSocket` (a vsock device serving only the
//! VMM's content service); 1.1 files read as they are.
//!
//! A reader refuses another major version, a payload length beyond the
//! bound or different from what the file holds, and a checksum mismatch,
//! before decoding anything; decoding is bounded by the payload length.
//!
//! A snapshot is written into a fresh `DIR.partial-PID` next to `DIR` and
//! renamed into place only when complete, so a crash leaves either the old
//! snapshot or the new one, never a mix.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use bincode::Options;
use serde::{Deserialize, Serialize};

use crate::devices::cmos::CmosState;
use crate::devices::legacy::SerialDeviceState;
use crate::devices::virtio::block::image::FileIdentity;
use crate::devices::virtio::mmio::VirtioDeviceSnapshot;
use crate::vstate::vcpu::VcpuState;
use crate::vstate::vm::VmState;

/// File names inside a snapshot directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The state file.
pub const STATE_FILE: &str = "state.bin";
/// The memory checkpoint.
pub const MEMORY_FILE: &str = "memory.ckpt";

const STATE_MAGIC: [u8; 8] = *b"STASISST";
/// State file version: major 1, minor 2.
pub const STATE_VERSION: u32 = (1 << 16) | 2;
const STATE_HEADER_LEN: usize = 24;
/// Largest state payload accepted.
pub const MAX_STATE_LEN: u64 = 64 << 20;
/// Manifest format name and version.
const MANIFEST_FORMAT: &str = "stasis-snapshot";
const MANIFEST_VERSION: u32 = 1;
/// Largest manifest accepted.
const MAX_MANIFEST_LEN: u64 = 64 << 10;

/// Errors while writing or reading snapshots.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The snapshot directory is missing.
    #[error("{} does not exist", .0.display())]
    MissingDir(PathBuf),
    /// The directory has no manifest: not a (complete) snapshot.
    #[error("{} is not a stasis snapshot (no {MANIFEST_FILE})", .0.display())]
    NotASnapshot(PathBuf),
    /// Reading a file failed.
    #[error("cannot read {}", .0.display())]
    Read(PathBuf, #[source] std::io::Error),
    /// Writing a file failed.
    #[error("cannot write {}", .0.display())]
    Write(PathBuf, #[source] std::io::Error),
    /// The output directory holds something that is not a snapshot.
    #[error("{} exists and is not an empty directory or a stasis snapshot; not overwriting it", .0.display())]
    OutputInUse(PathBuf),
    /// The manifest cannot be parsed or is of another format.
    #[error("{} is not a valid snapshot manifest: {}", .0.display(), .1)]
    BadManifest(PathBuf, String),
    /// The state file is damaged or of another kind.
    #[error("state file {} is invalid: {}", .0.display(), .1)]
    BadState(PathBuf, String),
    /// The state file is of an unsupported version.
    #[error("state file {} has format version {}.{}; this stasis reads version {}.x", .0.display(), .1, .2, STATE_VERSION >> 16)]
    StateVersion(PathBuf, u32, u32),
    /// Encoding the state failed.
    #[error("cannot encode the VM state")]
    Encode(#[source] bincode::Error),
    /// An incremental snapshot's chain of parents is broken.
    #[error("snapshot {} cannot be restored: {}", .0.display(), .1)]
    BadChain(PathBuf, String),
}

/// The machine's shape, needed to rebuild it before any state goes in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// Guest memory in bytes.
    pub mem_size: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
}

/// Emulated devices' state. The i8042 (vm-superio's) holds no state: it
/// only turns the reset command into a reset.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesState {
    /// COM1.
    pub serial: SerialDeviceState,
    /// The CMOS RTC.
    pub cmos: CmosState,
}

/// Everything but memory (and disks).
#[derive(Debug, Serialize, Deserialize)]
pub struct SnapshotState {
    /// Machine shape.
    pub machine: MachineConfig,
    /// One per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// In-kernel PIT, clock and interrupt controllers.
    pub vm: VmState,
    /// Emulated devices.
    pub devices: DevicesState,
    /// Virtio devices in slot order (state version 1.1).
    pub virtio: Vec<SavedVirtioDevice>,
}

/// The state file's payload as version 1.0 wrote it: no virtio devices.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct SnapshotStateV1_0 {
    machine: MachineConfig,
    vcpus: Vec<VcpuState>,
    vm: VmState,
    devices: DevicesState,
}

/// A virtio device in a snapshot: what it was attached to, and its state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedVirtioDevice {
    /// The host side it was built on.
    pub backend: VirtioBackend,
    /// Transport and device state.
    pub state: VirtioDeviceSnapshot,
}

/// The host side of a saved virtio device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VirtioBackend {
    /// A disk: its copy in the snapshot directory, and the image it was
    /// copied from.
    Block {
        /// File name of the copy inside the snapshot directory.
        file: String,
        /// The image the VM had open.
        original: PathBuf,
        /// The original's identity at the snapshot, to tell whether it
        /// changed since.
        original_identity: FileIdentity,
        /// Whether the guest could not write it.
        read_only: bool,
    },
    /// The vsock device's host socket.
    Vsock {
        /// Where host programs connected.
        uds_path: PathBuf,
    },
    /// The entropy device.
    Rng,
    /// A vsock device with no host socket: only the VMM's content service
    /// answers the guest (state version 1.2).
    VsockWithoutSocket,
}

/// The manifest: what a snapshot directory holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always "stasis-snapshot".
    pub format: String,
    /// Manifest version.
    pub version: u32,
    /// The state file's name.
    pub state_file: String,
    /// The memory checkpoint's name.
    pub memory_file: String,
    /// Machine shape, for humans and tools.
    pub machine: MachineConfig,
    /// When it was taken, seconds since the Unix epoch.
    pub created_unix: u64,
    /// This snapshot's unique id (128 random bits in hex); empty in
    /// snapshots from before incremental snapshots, which cannot be
    /// parents.
    #[serde(default)]
    pub id: String,
    /// The VM's id: made at boot, carried through its snapshots and the
    /// VMs restored from them.
    #[serde(default)]
    pub vm_id: String,
    /// For an incremental snapshot: the snapshot its memory builds on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<ParentRef>,
}

/// How an incremental snapshot names its parent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// The parent's id.
    pub id: String,
    /// Where it is: relative to this snapshot's directory when they share
    /// a directory (`../NAME`), absolute otherwise.
    pub dir: PathBuf,
    /// The CRC of the parent memory checkpoint's index (the file's
    /// identity: any rewrite changes it).
    pub index_crc: u32,
}

/// What a new snapshot's manifest says about it beyond its files.
#[derive(Clone, Debug, Default)]
pub struct Identity {
    /// The snapshot's id.
    pub id: String,
    /// The VM's id.
    pub vm_id: String,
    /// The parent, for an incremental snapshot.
    pub parent: Option<ParentRef>,
}

/// A new random id: 128 bits as 32 hex digits.
pub fn new_id() -> String {
    let mut bytes = [0u8; 16];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into `bytes`.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        // No entropy source: time and pid still make ids unique here.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        bytes = (t ^ (u128::from(std::process::id()) << 96)).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn bincode_options() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_little_endian()
        .with_limit(MAX_STATE_LEN)
}

/// Encodes the state file: header and payload.
pub fn encode_state(state: &SnapshotState) -> Result<Vec<u8>, PersistError> {
    let payload = bincode_options().serialize(state).map_err(PersistError::Encode)?;
    let mut out = Vec::with_capacity(STATE_HEADER_LEN + payload.len());
    out.extend_from_slice(&STATE_MAGIC);
    out.extend_from_slice(&STATE_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Decodes and checks a state file read from `path`.
pub fn decode_state(path: &Path, bytes: &[u8]) -> Result<SnapshotState, PersistError> {
    let bad = |why: String| PersistError::BadState(path.to_path_buf(), why);
    if bytes.len() < STATE_HEADER_LEN {
        return Err(bad(format!("{} bytes is shorter than its {STATE_HEADER_LEN}-byte header", bytes.len())));
    }
    if bytes[..8] != STATE_MAGIC {
        return Err(bad("wrong magic: not a stasis state file".into()));
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    let minor = version & 0xffff;
    if version >> 16 != STATE_VERSION >> 16 {
        return Err(PersistError::StateVersion(path.to_path_buf(), version >> 16, version & 0xffff));
    }
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&bytes[12..20]);
    let len = u64::from_le_bytes(len_bytes);
    if len > MAX_STATE_LEN {
        return Err(bad(format!("payload length {len} exceeds the {MAX_STATE_LEN}-byte bound")));
    }
    let payload = &bytes[STATE_HEADER_LEN..];
    if payload.len() as u64 != len {
        return Err(bad(format!("header says {len} payload bytes, the file holds {}", payload.len())));
    }
    let crc = u32::from_le_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
    if crc32c::crc32c(payload) != crc {
        return Err(bad("checksum mismatch: the file is damaged".into()));
    }
    let decode_err = |e: bincode::Error| bad(format!("cannot decode: {e}"));
    if minor == 0 {
        let old: SnapshotStateV1_0 = bincode_options().deserialize(payload).map_err(decode_err)?;
        return Ok(SnapshotState {
            machine: old.machine,
            vcpus: old.vcpus,
            vm: old.vm,
            devices: old.devices,
            virtio: Vec::new(),
        });
    }
    bincode_options().deserialize(payload).map_err(decode_err)
}

/// Reads a whole file of at most `max` bytes.
fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, PersistError> {
    let meta = fs::metadata(path).map_err(|e| PersistError::Read(path.to_path_buf(), e))?;
    if !meta.is_file() {
        return Err(PersistError::Read(
            path.to_path_buf(),
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
        ));
    }
    if meta.len() > max {
        return Err(PersistError::BadState(path.to_path_buf(), format!("{} bytes is over the {max}-byte bound", meta.len())));
    }
    fs::read(path).map_err(|e| PersistError::Read(path.to_path_buf(), e))
}

/// Writes `bytes` to a new (or truncated) file at `path` and fsyncs it.
pub(crate) fn write_file_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Makes the names in directory `dir` durable (after a create or rename).
pub(crate) fn sync_directory(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), PersistError> {
    write_file_synced(path, bytes).map_err(|e| PersistError::Write(path.to_path_buf(), e))
}

fn sync_dir(dir: &Path) -> Result<(), PersistError> {
    sync_directory(dir).map_err(|e| PersistError::Write(dir.to_path_buf(), e))
}

/// A snapshot being written: files go into a partial directory that
/// [`SnapshotWriter::commit`] moves to its final place.
pub struct SnapshotWriter {
    target: PathBuf,
    partial: PathBuf,
}

/// Whether no process `pid` exists (a staging directory's writer died).
pub(crate) fn process_gone(pid: i32) -> bool {
    // SAFETY: signal 0 only asks whether the process exists.
    pid > 0 && unsafe { libc::kill(pid, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// Removes the staging directories `.NAME.partial-PID` in `parent` whose
/// process is gone: a VMM killed in the middle of a snapshot into NAME
/// leaves one. A live process of that id (even another's) keeps its own.
fn remove_dead_partials(parent: &Path, name: &str) {
    let prefix = format!(".{name}.partial-");
    let Ok(entries) = fs::read_dir(parent) else { return };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(pid) = file.to_str().and_then(|f| f.strip_prefix(&prefix)).and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        if process_gone(pid) {
            match fs::remove_dir_all(entry.path()) {
                Ok(()) => log::info!("removed {}, left by a snapshot whose VMM died", entry.path().display()),
                Err(e) => log::warn!("cannot remove {}, left by a snapshot whose VMM died: {e}", entry.path().display()),
            }
        }
    }
}

impl SnapshotWriter {
    /// Checks `target` can take a snapshot and creates the partial
    /// directory beside it.
    pub fn create(target: &Path) -> Result<Self, PersistError> {
        check_output(target)?;
        let name = target
            .file_name()
            .ok_or_else(|| PersistError::OutputInUse(target.to_path_buf()))?
            .to_string_lossy()
            .into_owned();
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        remove_dead_partials(&parent, &name);
        let partial = parent.join(format!(".{name}.partial-{}", std::process::id()));
        if partial.exists() {
            fs::remove_dir_all(&partial).map_err(|e| PersistError::Write(partial.clone(), e))?;
        }
        fs::create_dir(&partial).map_err(|e| PersistError::Write(partial.clone(), e))?;
        Ok(SnapshotWriter { target: target.to_path_buf(), partial })
    }

    /// The directory the snapshot will be in.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Where the memory checkpoint goes.
    pub fn memory_path(&self) -> PathBuf {
        self.partial.join(MEMORY_FILE)
    }

    /// Where a file named `name` of the snapshot goes.
    pub fn file_path(&self, name: &str) -> PathBuf {
        self.partial.join(name)
    }

    /// The name and path of disk `index`'s copy.
    pub fn disk_path(&self, index: usize) -> (String, PathBuf) {
        let name = format!("disk{index}.img");
        let path = self.partial.join(&name);
        (name, path)
    }

    /// Writes the state file; returns its size in bytes.
    pub fn write_state(&self, state: &SnapshotState) -> Result<u64, PersistError> {
        let bytes = encode_state(state)?;
        write_synced(&self.partial.join(STATE_FILE), &bytes)?;
        Ok(bytes.len() as u64)
    }

    /// Writes the manifest and moves the snapshot into place, replacing an
    /// older snapshot there.
    pub fn commit(self, machine: &MachineConfig, identity: &Identity) -> Result<PathBuf, PersistError> {
        let manifest = Manifest {
            id: identity.id.clone(),
            vm_id: identity.vm_id.clone(),
            parent: identity.parent.clone(),
            format: MANIFEST_FORMAT.into(),
            version: MANIFEST_VERSION,
            state_file: STATE_FILE.into(),
            memory_file: MEMORY_FILE.into(),
            machine: machine.clone(),
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let text = serde_json::to_string_pretty(&manifest).map_err(|e| {
            PersistError::Write(self.partial.join(MANIFEST_FILE), std::io::Error::other(e))
        })?;
        write_synced(&self.partial.join(MANIFEST_FILE), text.as_bytes())?;
        sync_dir(&self.partial)?;
        let werr = |p: &Path| {
            let p = p.to_path_buf();
            move |e| PersistError::Write(p, e)
        };
        if self.target.exists() {
            // Checked in `create`: an empty directory or an old snapshot.
            let old = self.partial.with_extension("old");
            fs::rename(&self.target, &old).map_err(werr(&self.target))?;
            fs::rename(&self.partial, &self.target).map_err(werr(&self.target))?;
            fs::remove_dir_all(&old).map_err(werr(&old))?;
        } else {
            fs::rename(&self.partial, &self.target).map_err(werr(&self.target))?;
        }
        if let Some(parent) = self.target.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        Ok(self.target.clone())
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        // Left behind only when the snapshot failed before commit.
        if self.partial.exists() {
            let _ = fs::remove_dir_all(&self.partial);
        }
    }
}

/// `target` may take a snapshot if it does not exist, is an empty
/// directory, or holds a snapshot; its parent must be a writable directory.
fn check_output(target: &Path) -> Result<(), PersistError> {
    match fs::metadata(target) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(PersistError::Write(target.to_path_buf(), e)),
        Ok(meta) if meta.is_dir() => {
            let mut entries = fs::read_dir(target).map_err(|e| PersistError::Write(target.to_path_buf(), e))?;
            if entries.next().is_none() || target.join(MANIFEST_FILE).is_file() {
                Ok(())
            } else {
                Err(PersistError::OutputInUse(target.to_path_buf()))
            }
        }
        Ok(_) => Err(PersistError::OutputInUse(target.to_path_buf())),
    }
}

/// A snapshot directory opened for restore: manifest read and state file
/// decoded and checked.
pub struct SnapshotDir {
    /// The manifest.
    pub manifest: Manifest,
    /// The decoded state.
    pub state: SnapshotState,
    /// Path of the memory checkpoint.
    pub memory_path: PathBuf,
}

/// A file name from a manifest must name a file inside the directory.
fn plain_name(dir: &Path, name: &str) -> Result<PathBuf, PersistError> {
    let path = Path::new(name);
    let plain = path.components().count() == 1
        && matches!(path.components().next(), Some(std::path::Component::Normal(_)));
    if !plain {
        return Err(PersistError::BadManifest(dir.join(MANIFEST_FILE), format!("file name {name:?} is not a plain name")));
    }
    Ok(dir.join(path))
}

impl SnapshotDir {
    /// The path of a file the state names inside the snapshot directory
    /// (a disk copy), refused unless it is a plain name.
    pub fn file(&self, dir: &Path, name: &str) -> Result<PathBuf, PersistError> {
        plain_name(dir, name)
    }
}

/// Opens a snapshot directory.
pub fn open_snapshot(dir: &Path) -> Result<SnapshotDir, PersistError> {
    let manifest = read_manifest(dir)?;
    let state_path = plain_name(dir, &manifest.state_file)?;
    let memory_path = plain_name(dir, &manifest.memory_file)?;
    let bytes = read_bounded(&state_path, MAX_STATE_LEN + STATE_HEADER_LEN as u64)?;
    let state = decode_state(&state_path, &bytes)?;
    if state.machine != manifest.machine || state.vcpus.len() != usize::from(state.machine.vcpus) {
        return Err(PersistError::BadState(state_path, "machine shape disagrees with the manifest".into()));
    }
    Ok(SnapshotDir { manifest, state, memory_path })
}

/// Most layers a snapshot chain may have.
pub const MAX_CHAIN: usize = 1000;

/// One snapshot of a chain.
#[derive(Clone, Debug)]
pub struct Layer {
    /// Its directory.
    pub dir: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    /// Its memory checkpoint.
    pub memory_path: PathBuf,
}

/// Reads only a snapshot directory's manifest.
pub fn read_manifest(dir: &Path) -> Result<Manifest, PersistError> {
    if !dir.exists() {
        return Err(PersistError::MissingDir(dir.to_path_buf()));
    }
    let manifest_path = dir.join(MANIFEST_FILE);
    if !manifest_path.is_file() {
        return Err(PersistError::NotASnapshot(dir.to_path_buf()));
    }
    let text = read_bounded(&manifest_path, MAX_MANIFEST_LEN)?;
    let manifest: Manifest = serde_json::from_slice(&text)
        .map_err(|e| PersistError::BadManifest(manifest_path.clone(), e.to_string()))?;
    if manifest.format != MANIFEST_FORMAT || manifest.version != MANIFEST_VERSION {
        return Err(PersistError::BadManifest(
            manifest_path,
            format!("format {:?} version {}, expected {MANIFEST_FORMAT:?} version {MANIFEST_VERSION}", manifest.format, manifest.version),
        ));
    }
    Ok(manifest)
}

/// Where `parent` lies as seen from `child`'s directory.
pub fn resolve_parent(child: &Path, parent: &ParentRef) -> PathBuf {
    if parent.dir.is_absolute() {
        parent.dir.clone()
    } else {
        child.join(&parent.dir)
    }
}

/// How `child` (a directory about to exist) names `parent`: `../NAME`
/// when both lie in the same directory, the absolute path otherwise.
pub fn parent_link(child: &Path, parent: &Path) -> Result<PathBuf, PersistError> {
    let abs = |p: &Path| -> Result<PathBuf, PersistError> {
        let p = if p.is_absolute() { p.to_path_buf() } else {
            std::env::current_dir().map_err(|e| PersistError::Read(p.to_path_buf(), e))?.join(p)
        };
        Ok(p)
    };
    let parent = abs(parent)?.canonicalize().map_err(|e| PersistError::Read(parent.to_path_buf(), e))?;
    let child = abs(child)?;
    let child_dir = child.parent().map(|d| d.canonicalize().unwrap_or_else(|_| d.to_path_buf()));
    match (child_dir, parent.parent(), parent.file_name()) {
        (Some(a), Some(b), Some(name)) if a == b => Ok(Path::new("..").join(name)),
        _ => Ok(parent),
    }
}

/// The chain of snapshots `dir` builds on, newest (`dir` itself) first,
/// each parent found and checked to be the one its child was written on.
pub fn snapshot_chain(dir: &Path, top: &Manifest, top_memory: &Path) -> Result<Vec<Layer>, PersistError> {
    let mut layers = vec![Layer { dir: dir.to_path_buf(), manifest: top.clone(), memory_path: top_memory.to_path_buf() }];
    let mut seen = std::collections::HashSet::new();
    seen.insert(top.id.clone());
    loop {
        let child = &layers[layers.len() - 1];
        let Some(link) = child.manifest.parent.clone() else { break };
        let child_dir = child.dir.clone();
        let bad = |why: String| PersistError::BadChain(child_dir.clone(), why);
        if layers.len() >= MAX_CHAIN {
            return Err(bad(format!("the chain is longer than {MAX_CHAIN} snapshots")));
        }
        let parent_dir = resolve_parent(&child_dir, &link);
        let manifest = match read_manifest(&parent_dir) {
            Ok(m) => m,
            Err(PersistError::MissingDir(_)) => {
                return Err(bad(format!("its parent snapshot {} is missing", parent_dir.display())))
            }
            Err(e) => return Err(bad(format!("its parent snapshot {} cannot be read: {}", parent_dir.display(), crate::error_chain(&e)))),
        };
        if manifest.id != link.id {
            return Err(bad(format!(
                "{} is not its parent: that has id {}, this one {}",
                parent_dir.display(),
                link.id,
                if manifest.id.is_empty() { "none" } else { &manifest.id }
            )));
        }
        if !seen.insert(manifest.id.clone()) {
            return Err(bad(format!("the parent links form a cycle at {}", parent_dir.display())));
        }
        let memory_path = plain_name(&parent_dir, &manifest.memory_file)?;
        layers.push(Layer { dir: parent_dir, manifest, memory_path });
    }
    Ok(layers)
}

#[cfg(test)]
mod tests {
    use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry};

    use super::*;

    #[test]
    fn staging_left_by_a_dead_vmm_goes_and_a_live_ones_stays() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A child that has exited and been reaped: its pid is gone.
        let mut child = std::process::Command::new("true").spawn().expect("spawn true");
        let dead = child.id();
        child.wait().expect("wait");
        let dead_partial = dir.path().join(format!(".snap.partial-{dead}"));
        let live_partial = dir.path().join(format!(".snap.partial-{}", std::os::unix::process::parent_id()));
        let other = dir.path().join(format!(".other.partial-{dead}"));
        for d in [&dead_partial, &live_partial, &other] {
            fs::create_dir(d).expect("mkdir");
            fs::write(d.join("memory.ckpt"), b"half").expect("write");
        }
        let writer = SnapshotWriter::create(&dir.path().join("snap")).expect("create");
        assert!(!dead_partial.exists(), "the dead writer's staging is still there");
        assert!(live_partial.exists(), "a live process's staging was removed");
        assert!(other.exists(), "another target's staging was removed");
        drop(writer);
    }

    fn sample_state() -> SnapshotState {
        let vcpu = VcpuState {
            index: 0,
            mp_state: Default::default(),
            regs: kvm_bindings::kvm_regs { rip: 0xffff_ffff_8100_0000, rax: 42, ..Default::default() },
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            debug_regs: Default::default(),
            lapic: Default::default(),
            tsc_khz: 2_400_000,
            cpuid: vec![kvm_cpuid_entry2 { function: 1, eax: 0x800f12, ..Default::default() }],
            msrs: vec![kvm_msr_entry { index: 0x10, data: 12345, ..Default::default() }],
            events: Default::default(),
        };
        SnapshotState {
            machine: MachineConfig { mem_size: 512 << 20, vcpus: 1 },
            vcpus: vec![vcpu],
            vm: VmState { pit: Default::default(), clock: Default::default(), irqchips: vec![Default::default(); 3] },
            devices: DevicesState {
                serial: SerialDeviceState { fifo: vec![b'a'], pending: vec![b'b'], ..Default::default() },
                cmos: CmosState { index: 3, ram: vec![7; 128] },
            },
            virtio: vec![SavedVirtioDevice {
                backend: VirtioBackend::Rng,
                state: VirtioDeviceSnapshot {
                    transport: crate::devices::virtio::mmio::MmioState {
                        status: 15,
                        acked_features: 1 << 32,
                        device_features_select: 0,
                        driver_features_select: 0,
                        queue_select: 0,
                        interrupt_status: 1,
                        config_generation: 0,
                        activated: true,
                        queues: Vec::new(),
                    },
                    device: crate::devices::virtio::DeviceState::Rng,
                },
            }],
        }
    }

    #[test]
    fn state_round_trips() {
        let bytes = encode_state(&sample_state()).expect("encode");
        let back = decode_state(Path::new("s"), &bytes).expect("decode");
        assert_eq!(back.vcpus[0].regs.rax, 42);
        assert_eq!(back.vcpus[0].msrs[0].data, 12345);
        assert_eq!(back.vcpus[0].cpuid[0].eax, 0x800f12);
        assert_eq!(back.devices, sample_state().devices);
        assert_eq!(back.machine, sample_state().machine);
        assert_eq!(back.virtio, sample_state().virtio);
    }

    #[test]
    fn version_1_0_state_without_virtio_devices_still_decodes() {
        let s = sample_state();
        let old = SnapshotStateV1_0 { machine: s.machine, vcpus: s.vcpus, vm: s.vm, devices: s.devices };
        let payload = bincode_options().serialize(&old).expect("encode");
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&STATE_MAGIC);
        bytes.extend_from_slice(&(1u32 << 16).to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
        bytes.extend_from_slice(&payload);
        let back = decode_state(Path::new("s"), &bytes).expect("decode");
        assert!(back.virtio.is_empty());
        assert_eq!(back.devices, sample_state().devices);
    }

    #[test]
    fn state_with_a_flipped_byte_is_refused() {
        let bytes = encode_state(&sample_state()).expect("encode");
        for at in [STATE_HEADER_LEN, STATE_HEADER_LEN + 100, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[at] ^= 0x40;
            let err = decode_state(Path::new("s"), &bad).expect_err("corrupt state accepted");
            assert!(err.to_string().contains("checksum mismatch"), "{err}");
        }
    }

    #[test]
    fn truncated_state_is_refused() {
        let bytes = encode_state(&sample_state()).expect("encode");
        for len in [0, 10, STATE_HEADER_LEN, bytes.len() - 1] {
            assert!(decode_state(Path::new("s"), &bytes[..len]).is_err(), "accepted {len} bytes");
        }
    }

    #[test]
    fn wrong_magic_and_version_are_refused() {
        let bytes = encode_state(&sample_state()).expect("encode");
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(decode_state(Path::new("s"), &bad).expect_err("magic").to_string().contains("wrong magic"));
        let mut newer = bytes.clone();
        newer[8..12].copy_from_slice(&(2u32 << 16).to_le_bytes());
        let err = decode_state(Path::new("s"), &newer).expect_err("version");
        assert!(matches!(err, PersistError::StateVersion(_, 2, 0)), "{err}");
    }

    #[test]
    fn absurd_payload_length_is_refused_before_decoding() {
        let mut bytes = encode_state(&sample_state()).expect("encode");
        bytes[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = decode_state(Path::new("s"), &bytes).expect_err("length");
        assert!(err.to_string().contains("exceeds"), "{err}");
    }

    #[test]
    fn snapshot_dir_round_trips_and_replaces_an_old_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("snap");
        for rax in [1u64, 2] {
            let writer = SnapshotWriter::create(&target).expect("create");
            let mut state = sample_state();
            state.vcpus[0].regs.rax = rax;
            writer.write_state(&state).expect("state");
            fs::write(writer.memory_path(), b"memory").expect("memory");
            writer.commit(&state.machine, &Identity::default()).expect("commit");
            let opened = open_snapshot(&target).expect("open");
            assert_eq!(opened.state.vcpus[0].regs.rax, rax);
            assert_eq!(fs::read(opened.memory_path).expect("read"), b"memory");
        }
        let leftovers: Vec<_> = fs::read_dir(dir.path()).expect("ls").collect();
        assert_eq!(leftovers.len(), 1, "partial or old directories left behind");
    }

    #[test]
    fn output_that_is_not_a_snapshot_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("precious.txt"), "keep me").expect("write");
        assert!(matches!(SnapshotWriter::create(dir.path()), Err(PersistError::OutputInUse(_))));
        let file = dir.path().join("precious.txt");
        assert!(matches!(SnapshotWriter::create(&file), Err(PersistError::OutputInUse(_))));
    }

    #[test]
    fn failed_snapshot_leaves_nothing_behind() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("snap");
        let writer = SnapshotWriter::create(&target).expect("create");
        writer.write_state(&sample_state()).expect("state");
        drop(writer);
        assert_eq!(fs::read_dir(dir.path()).expect("ls").count(), 0);
    }

    #[test]
    fn open_refuses_missing_dir_and_dir_without_manifest() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(matches!(open_snapshot(&dir.path().join("nope")), Err(PersistError::MissingDir(_))));
        assert!(matches!(open_snapshot(dir.path()), Err(PersistError::NotASnapshot(_))));
    }

    #[test]
    fn manifest_naming_a_file_outside_the_dir_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = dir.path().join("snap");
        let writer = SnapshotWriter::create(&target).expect("create");
        writer.write_state(&sample_state()).expect("state");
        writer.commit(&sample_state().machine, &Identity::default()).expect("commit");
        let path = target.join(MANIFEST_FILE);
        let text = fs::read_to_string(&path).expect("read").replace("\"state.bin\"", "\"../state.bin\"");
        fs::write(&path, text).expect("write");
        let err = open_snapshot(&target).err().expect("accepted");
        assert!(err.to_string().contains("not a plain name"), "{err}");
    }

    /// Commits a snapshot named `name` in `root` with `parent` (by name).
    fn layer(root: &Path, name: &str, id: &str, parent: Option<(&str, &str)>) -> Manifest {
        let target = root.join(name);
        let writer = SnapshotWriter::create(&target).expect("create");
        writer.write_state(&sample_state()).expect("state");
        let parent = parent.map(|(dir, id)| ParentRef { id: id.into(), dir: parent_link(&target, &root.join(dir)).expect("link"), index_crc: 1 });
        let identity = Identity { id: id.into(), vm_id: "vm".into(), parent };
        writer.commit(&sample_state().machine, &identity).expect("commit");
        read_manifest(&target).expect("manifest")
    }

    #[test]
    fn a_chain_is_followed_to_its_full_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        layer(dir.path(), "a", "ida", None);
        let b = layer(dir.path(), "b", "idb", Some(("a", "ida")));
        assert_eq!(b.parent.as_ref().map(|p| p.dir.clone()), Some(PathBuf::from("../a")), "siblings link relatively");
        let c = layer(dir.path(), "c", "idc", Some(("b", "idb")));
        let chain = snapshot_chain(&dir.path().join("c"), &c, &dir.path().join("c/memory.ckpt")).expect("chain");
        let ids: Vec<_> = chain.iter().map(|l| l.manifest.id.as_str()).collect();
        assert_eq!(ids, ["idc", "idb", "ida"]);
        assert_eq!(chain[2].memory_path, dir.path().join("c/../b/../a").join(MEMORY_FILE));
    }

    #[test]
    fn broken_chains_are_refused_with_one_line_each() {
        let dir = tempfile::tempdir().expect("tempdir");
        let chain_of = |name: &str, m: &Manifest| {
            let d = dir.path().join(name);
            snapshot_chain(&d, m, &d.join(MEMORY_FILE)).expect_err("accepted").to_string()
        };
        layer(dir.path(), "a", "ida", None);
        let b = layer(dir.path(), "b", "idb", Some(("a", "ida")));
        fs::remove_dir_all(dir.path().join("a")).expect("rm");
        assert!(chain_of("b", &b).contains("parent snapshot") && chain_of("b", &b).contains("is missing"), "{}", chain_of("b", &b));
        layer(dir.path(), "a", "other", None);
        assert!(chain_of("b", &b).contains("is not its parent"), "{}", chain_of("b", &b));
        // x -> y -> x: a cycle.
        let x = layer(dir.path(), "x", "idx", Some(("a", "other")));
        let y = layer(dir.path(), "y", "idy", Some(("x", "idx")));
        let mut x2 = x.clone();
        x2.parent = y.parent.clone().map(|mut p| {
            p.id = "idy".into();
            p.dir = PathBuf::from("../y");
            p
        });
        fs::write(dir.path().join("x").join(MANIFEST_FILE), serde_json::to_string(&x2).expect("json")).expect("write");
        assert!(chain_of("y", &y).contains("cycle"), "{}", chain_of("y", &y));
    }
}
