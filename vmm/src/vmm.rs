//! The running VM: the event loop that serves it until it ends, the
//! control API's dispatch, pause and resume, and snapshots. [`crate::builder`]
//! builds a [`Vmm`]; this module runs it.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VmFd};
use crate::vstate::memory::GuestMemoryMmap;

use crate::content::grants::GrantLimits;
use crate::content::service::ContentService;
use crate::api::{AfterSnapshot, ApiCall, ApiError, ApiReply, ApiRequest, ApiServer};
use crate::checkpoint::{self, BlockChecksum, Reader, WriteStats, WriterOptions};
use crate::devices::bus::{lock, MmioBus, PioBus};
use crate::devices::virtio::block::image::{copy_sparse, FileIdentity};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::thread::DeviceThread;
use crate::devices::cmos::{Cmos, HostClock};
use crate::devices::legacy::{IrqTrigger, SerialDevice};
use crate::devices::PowerEvent;
use crate::error_chain;
use crate::persist::{
    self, DevicesState, Identity, MachineConfig, ParentRef, PersistError, SavedVirtioDevice, SnapshotState,
    SnapshotWriter, VirtioBackend,
};
use crate::backup::disk::{CopyHooks, CopyOut, DiskBlocks, DiskJob};
use crate::backup::{BackupCapture, BackupFinish, BackupReport};
use crate::snapshot::{fork_writer, ChildWriter, NotResident, VmMemory, Written};
use crate::devices::virtio::block::changed::ChangedBlocks;
use crate::vstate::dirty::{DirtyError, DirtyLog, DirtyPages};
use crate::restore::uffd::{LazyMemory, LoaderReport, MemoryFailure, UffdError};
use crate::terminal::{RawTerminal, TerminalError};
use crate::vstate::vcpu::{self, Vcpu, VcpuError, VcpuEvent, VcpuHandle, VcpuStop};
use crate::vstate::vm::{self, VmStateError};

/// Errors while a VM runs, pauses or is snapshotted.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// Confining the main thread.
    #[error(transparent)]
    Seccomp(crate::seccomp::SeccompError),
    /// A vCPU.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The VM's in-kernel state.
    #[error(transparent)]
    VmState(#[from] VmStateError),
    /// Snapshot files.
    #[error(transparent)]
    Persist(#[from] PersistError),
    /// The memory checkpoint could not be written.
    #[error("cannot write the memory checkpoint")]
    WriteCheckpoint(#[source] checkpoint::WriteError),
    /// Lazy memory.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// The console terminal.
    #[error(transparent)]
    Terminal(#[from] TerminalError),
    /// A thread could not be started.
    #[error("cannot start thread {0}")]
    SpawnThread(String, #[source] std::io::Error),
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    KickSignal(#[source] std::io::Error),
    /// A vCPU stopped with an error while the guest ran.
    #[error("{0}")]
    GuestFailed(String),
    /// Guest memory could not be loaded while the guest ran.
    #[error("guest memory failed: {0}")]
    MemoryFailed(String),
    /// The control socket could not be served.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// A device could not make what the guest wrote durable.
    #[error("cannot flush virtio device {0}")]
    FlushDevice(usize, #[source] std::io::Error),
    /// A disk could not be copied into the snapshot.
    #[error("cannot copy disk {} into the snapshot", .0.display())]
    CopyDisk(PathBuf, #[source] std::io::Error),
    /// An incremental snapshot's parent is not one it can build on.
    #[error("cannot build on parent snapshot {}: {}", .0.display(), .1)]
    Parent(PathBuf, String),
    /// Another snapshot is still being written.
    #[error("a snapshot is already in progress")]
    Busy,
    /// A backup could not be taken.
    #[error("{0}")]
    Backup(String),
    /// Dirty page tracking.
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    /// The checkpoint a lazy VM is restored from could not be opened again.
    #[error("cannot reopen the checkpoint this VM is restored from")]
    ReadRestoreCheckpoint(#[source] checkpoint::ReadError),
    /// The live snapshot's writer process could not be started.
    #[error("cannot start the memory writer process")]
    ForkWriter(#[source] std::io::Error),
    /// Guest memory could not be written.
    #[error("cannot write the memory checkpoint: {0}")]
    WriteMemory(String),
    /// The written checkpoint could not be read back.
    #[error("cannot read back the memory checkpoint just written")]
    ReadBack(#[source] checkpoint::ReadError),
}

/// The host side of a virtio device, as a snapshot records it.
pub(crate) enum SlotBackend {
    /// A disk image, and a second handle on it for copying it.
    Block {
        /// The same open file the device uses.
        file: File,
        /// Where it is.
        path: PathBuf,
        /// Whether the guest cannot write it.
        read_only: bool,
        /// The blocks the guest changed, shared with the device.
        changed: Arc<ChangedBlocks>,
    },
    /// The vsock device's host socket.
    Vsock {
        /// Its path; `None` when only the VMM's own services (content)
        /// are on the host side.
        uds_path: Option<PathBuf>,
    },
    /// The entropy device.
    Rng,
}

/// A virtio device of the running VM. The thread is declared first: it is
/// stopped before the transport it serves goes.
pub(crate) struct VirtioSlot {
    /// Held for its `Drop`, which stops the thread.
    pub(crate) _thread: DeviceThread,
    pub(crate) transport: Arc<Mutex<MmioTransport>>,
    pub(crate) backend: SlotBackend,
}

/// The directory holding a restored VM's working copies of its disks;
/// removed when the VM ends unless the user named it.
pub struct WorkingDisks {
    dir: PathBuf,
    keep: bool,
}

impl WorkingDisks {
    /// `keep`, created if missing and refused unless empty; or a new
    /// temporary directory beside nothing the user owns.
    pub fn create(keep: Option<&Path>, snapshot: &Path) -> Result<Self, (PathBuf, std::io::Error)> {
        match keep {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| (dir.to_path_buf(), e))?;
                let used = std::fs::read_dir(dir).map_err(|e| (dir.to_path_buf(), e))?.next().is_some();
                if used {
                    let e = std::io::Error::new(std::io::ErrorKind::AlreadyExists, "it is not empty; not overwriting what is there");
                    return Err((dir.to_path_buf(), e));
                }
                Ok(WorkingDisks { dir: dir.to_path_buf(), keep: true })
            }
            None => {
                let name = snapshot.file_name().map_or("snapshot".into(), |n| n.to_string_lossy().into_owned());
                let dir = std::env::temp_dir().join(format!("stasis-{name}-disks-{}", std::process::id()));
                if dir.exists() {
                    std::fs::remove_dir_all(&dir).map_err(|e| (dir.clone(), e))?;
                }
                std::fs::create_dir(&dir).map_err(|e| (dir.clone(), e))?;
                Ok(WorkingDisks { dir, keep: false })
            }
        }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Tells the user where the disks are and whether they stay.
    pub fn announce(&self) {
        if self.keep {
            log::info!("the restored VM's disks are in {}", self.dir.display());
        } else {
            log::warn!(
                "the restored VM's disks are working copies in {}, removed when the VM ends (--disk-dir DIR keeps them)",
                self.dir.display()
            );
        }
    }
}

impl Drop for WorkingDisks {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
/// How a guest ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest powered off.
    PowerOff,
    /// The guest rebooted; a microVM ends on reboot.
    Reset,
    /// A snapshot was taken with "then exit".
    Snapshotted,
}

/// Everything that can happen to a running VM, gathered on one channel.
#[derive(Debug)]
pub enum VmEvent {
    /// A device saw a power-off or reset.
    Power(PowerEvent),
    /// A vCPU stopped.
    Vcpu(VcpuEvent),
    /// Lazy memory could not be loaded.
    Memory(MemoryFailure),
    /// A request on the control socket.
    Api(ApiCall),
    /// A live snapshot's memory writer ended: its figures or why it failed.
    SnapshotWritten(Result<Written, String>),
}

impl From<ApiCall> for VmEvent {
    fn from(call: ApiCall) -> Self {
        VmEvent::Api(call)
    }
}

impl From<PowerEvent> for VmEvent {
    fn from(event: PowerEvent) -> Self {
        VmEvent::Power(event)
    }
}

impl From<VcpuEvent> for VmEvent {
    fn from(event: VcpuEvent) -> Self {
        VmEvent::Vcpu(event)
    }
}

impl From<MemoryFailure> for VmEvent {
    fn from(event: MemoryFailure) -> Self {
        VmEvent::Memory(event)
    }
}

/// What a snapshot did.
#[derive(Clone, Debug)]
pub struct SnapshotReport {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// Memory checkpoint statistics.
    pub memory: WriteStats,
    /// Bytes of the state file.
    pub state_bytes: u64,
    /// Disks copied into the snapshot, and the data bytes copied (holes
    /// and cloned extents are not counted).
    pub disks: usize,
    /// See `disks`.
    pub disk_bytes_copied: u64,
    /// Time the vCPUs were paused for the snapshot.
    pub paused_for: Duration,
    /// From the request until the directory was durable.
    pub total: Duration,
    /// The parent directory as requested, for an incremental snapshot.
    pub parent: Option<PathBuf>,
    /// A backup's own figures.
    pub backup: Option<BackupReport>,
}

/// The VM's latest snapshot: what an incremental snapshot builds on.
#[derive(Clone, Debug)]
pub(crate) struct LatestSnapshot {
    /// Its id.
    pub(crate) id: String,
    /// Where it was written (or restored from).
    pub(crate) dir: PathBuf,
    /// Its memory checkpoint's index CRC.
    pub(crate) index_crc: u32,
}

/// A snapshot whose vCPUs ran again, still to be finished.
pub(crate) struct Finishing {
    pub(crate) identity: Identity,
    /// The parent directory as requested.
    pub(crate) parent_dir: Option<PathBuf>,
    pub(crate) state: SnapshotState,
    /// The changed pages taken at the pause, given back if it fails.
    pub(crate) taken: Option<DirtyPages>,
    /// Disks copied, and data bytes copied.
    pub(crate) disks: (usize, u64),
    /// How long the vCPUs were paused, once they run again.
    pub(crate) paused_for: Option<Duration>,
    /// When they were paused.
    pub(crate) paused_at: Instant,
    /// When the request came.
    pub(crate) started: Instant,
    /// The memory write's outcome, once known.
    pub(crate) memory: Option<Result<Written, String>>,
    /// The disks' copy before write, until the snapshot is over.
    pub(crate) disk_hooks: CopyHooks,
    /// What a backup does once its directory is in the store.
    pub(crate) backup: Option<BackupFinish>,
}

/// A snapshot begun: its directory, what is left to write, and the child
/// writing memory for a live one.
pub(crate) struct Begun {
    pub(crate) writer: SnapshotWriter,
    pub(crate) finishing: Finishing,
    pub(crate) child: Option<ChildWriter>,
}

/// What the pause captured: the state, the disks (count, bytes copied),
/// and memory: being written by a child, or written.
type Captured = (SnapshotState, (usize, u64), CopyHooks, Option<ChildWriter>, Option<Result<Written, String>>);

/// A live snapshot whose memory a child process is writing.
pub(crate) struct PendingSnapshot {
    writer: SnapshotWriter,
    finishing: Finishing,
    /// Where the answer goes; `None` once the client was answered.
    reply: Option<std::sync::mpsc::Sender<ApiReply>>,
}

/// A snapshot's figures as the control socket reports them.
fn snapshot_json(report: &SnapshotReport, mode: &str) -> serde_json::Value {
    log::info!(
        "snapshot {} ({mode}): {} MiB of memory in {} bytes, {:.1} ms paused, {:.2} s in all",
        report.dir.display(),
        report.memory.bytes_in >> 20,
        report.memory.file_bytes,
        report.paused_for.as_secs_f64() * 1000.0,
        report.total.as_secs_f64()
    );
    let m = &report.memory;
    serde_json::json!({
        "dir": report.dir.display().to_string(),
        "mode": mode,
        "parent": report.parent.as_ref().map(|p| p.display().to_string()),
        "memory_bytes": m.bytes_in,
        "memory_file_bytes": m.file_bytes,
        "memory_stored_bytes": m.bytes_stored,
        "state_file_bytes": report.state_bytes,
        "disks": report.disks,
        "disk_bytes_copied": report.disk_bytes_copied,
        "zero_blocks": m.zero_blocks,
        "raw_blocks": m.raw_blocks,
        "zstd_blocks": m.zstd_blocks,
        "parent_blocks": m.parent_blocks,
        "write_ms": m.elapsed.as_secs_f64() * 1000.0,
        "paused_ms": report.paused_for.as_secs_f64() * 1000.0,
        "write_s": report.total.as_secs_f64(),
    })
}

/// Restore figures.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct RestoreReport {
    /// Milliseconds from process start until the vCPUs ran.
    pub restore_latency_ms: f64,
    /// "lazy" or "eager".
    pub memory: &'static str,
    /// Lazy loading counters; none for eager restores.
    pub loader: Option<LoaderReport>,
}

pub(crate) type Console = SerialDevice<IrqTrigger, std::io::Stdout>;

/// The emulated devices, kept by type so their state can be saved.
pub(crate) struct Devices {
    pub(crate) bus: Arc<PioBus>,
    pub(crate) serial: Arc<Mutex<Console>>,
    pub(crate) cmos: Arc<Mutex<Cmos<HostClock>>>,
}

impl Devices {
    pub(crate) fn state(&self) -> DevicesState {
        DevicesState { serial: lock(&self.serial).state(), cmos: lock(&self.cmos).state() }
    }
}

/// A built VM, ready to run or running.
pub struct Vmm {
    /// Virtio devices, declared first: their threads stop before the lazy
    /// loader, which may still be serving one of their faults.
    pub(crate) virtio: Vec<VirtioSlot>,
    /// The lazy loader writes into `mem`: declared early, it is dropped
    /// (its handler stopped) before the memory.
    pub(crate) lazy: Option<LazyMemory>,
    /// Working copies of a restored VM's disks, removed after the devices
    /// closed them.
    pub(crate) _working_disks: Option<WorkingDisks>,
    pub(crate) mmio: Arc<MmioBus>,
    /// The content service, shared with the vsock device.
    pub(crate) content: Option<Arc<ContentService>>,
    pub(crate) kvm: Kvm,
    pub(crate) vm: VmFd,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) machine: MachineConfig,
    pub(crate) devices: Devices,
    /// vCPUs built but not started yet.
    pub(crate) pending_vcpus: Vec<Vcpu>,
    pub(crate) vcpus: Vec<VcpuHandle>,
    pub(crate) msr_indices: Arc<Vec<u32>>,
    pub(crate) events_tx: Sender<VmEvent>,
    pub(crate) events_rx: Receiver<VmEvent>,
    pub(crate) paused: bool,
    pub(crate) restore_started: Option<(Instant, &'static str)>,
    pub(crate) restore_report: Option<RestoreReport>,
    /// Told (bytes done, bytes total) while a snapshot writes memory.
    pub(crate) snapshot_progress: Box<dyn FnMut(u64, u64) + Send>,
    /// Pages changed since the latest snapshot.
    pub(crate) dirty: DirtyLog,
    /// The VM's id, kept in its snapshots and by VMs restored from them.
    pub(crate) vm_id: String,
    /// The latest snapshot taken of (or restored into) this VM.
    pub(crate) latest: Option<LatestSnapshot>,
    /// A live snapshot being written.
    pub(crate) pending: Option<PendingSnapshot>,
    /// The id of the latest backup this VMM took: what its dirty tracking
    /// and the disks' changed blocks count from.
    pub(crate) backup_tracking: Option<String>,
}

/// Moves what is typed on stdin into the guest's console.
fn spawn_stdin_reader(serial: Arc<Mutex<Console>>) -> Result<(), VmmError> {
    let name = "console-in".to_string();
    thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
            crate::seccomp::confine_or_exit(crate::seccomp::ThreadKind::Device);
            let mut stdin = std::io::stdin().lock();
            let mut buf = [0u8; 256];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::warn!("console input stopped: {e}");
                        return;
                    }
                };
                let mut rest = &buf[..n];
                while !rest.is_empty() {
                    let taken = lock(&serial).queue_input(rest);
                    rest = &rest[taken..];
                    if !rest.is_empty() {
                        // The guest is not reading; wait for it.
                        thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        })
        .map(|_| ())
        .map_err(|e| VmmError::SpawnThread(name, e))
}

impl Vmm {
    /// Sets what is told of a snapshot's progress (bytes written, total),
    /// e.g. a progress bar.
    pub fn set_snapshot_progress(&mut self, progress: Box<dyn FnMut(u64, u64) + Send>) {
        self.snapshot_progress = progress;
    }

    /// Starts the vCPUs with the console on this process's stdin and
    /// stdout.
    fn start(&mut self) -> Result<(), VmmError> {
        vcpu::register_kick_signal().map_err(VmmError::KickSignal)?;
        spawn_stdin_reader(self.devices.serial.clone())?;
        for vcpu in std::mem::take(&mut self.pending_vcpus) {
            let index = vcpu.index();
            let handle = vcpu
                .start(
                    self.devices.bus.clone(),
                    self.mmio.clone(),
                    self.mem.clone(),
                    self.msr_indices.clone(),
                    self.events_tx.clone(),
                )
                .map_err(|e| VmmError::SpawnThread(format!("vcpu{index}"), e))?;
            self.vcpus.push(handle);
        }
        if let Some((start, memory)) = self.restore_started {
            let report = RestoreReport {
                restore_latency_ms: start.elapsed().as_secs_f64() * 1000.0,
                memory,
                loader: None,
            };
            log::info!("restored ({memory} memory): vCPUs running {:.1} ms after start", report.restore_latency_ms);
            self.restore_report = Some(report);
        }
        Ok(())
    }

    /// Restore figures so far (for a restored VM).
    pub fn restore_report(&self) -> Option<RestoreReport> {
        self.restore_report.map(|r| RestoreReport { loader: self.lazy.as_ref().map(LazyMemory::stats), ..r })
    }

    /// Runs the VM until the guest powers off, resets or fails, or a
    /// snapshot ends it, serving the control socket at `api_sock` if given.
    /// The terminal is in raw mode meanwhile.
    pub fn run(mut self, api_sock: Option<&Path>) -> (Result<GuestExit, VmmError>, Option<RestoreReport>) {
        let result = self.run_inner(api_sock);
        (result, self.restore_report())
    }

    fn run_inner(&mut self, api_sock: Option<&Path>) -> Result<GuestExit, VmmError> {
        // The socket before the vCPUs run, so a client can act at once; it
        // is removed when `_api` drops, however this returns.
        let _api = match api_sock {
            Some(path) => Some(ApiServer::start(path, self.events_tx.clone())?),
            None => None,
        };
        // Raw mode from here on; the guard restores the terminal when this
        // function returns, however it returns.
        let _terminal = RawTerminal::enter()?;
        self.start()?;
        // Every other thread runs confined by now; this one from here on.
        crate::seccomp::confine(crate::seccomp::ThreadKind::Main).map_err(VmmError::Seccomp)?;
        let ended = self.serve();
        // A live snapshot's memory is that of its pause instant: it is
        // finished even when the guest ended meanwhile.
        self.settle_pending();
        ended
    }

    /// Handles the VM's events until it ends.
    fn serve(&mut self) -> Result<GuestExit, VmmError> {
        loop {
            let event = self
                .events_rx
                .recv()
                .map_err(|_| VmmError::GuestFailed("every vCPU and device went away".into()))?;
            match event {
                VmEvent::Power(PowerEvent::PowerOff)
                | VmEvent::Vcpu(VcpuEvent { stop: VcpuStop::Power(PowerEvent::PowerOff), .. }) => {
                    return Ok(GuestExit::PowerOff)
                }
                VmEvent::Power(PowerEvent::Reset)
                | VmEvent::Vcpu(VcpuEvent { stop: VcpuStop::Power(PowerEvent::Reset), .. }) => {
                    return Ok(GuestExit::Reset)
                }
                VmEvent::Vcpu(VcpuEvent { stop: VcpuStop::Failed(msg), .. }) => {
                    return Err(VmmError::GuestFailed(msg))
                }
                VmEvent::Memory(MemoryFailure(msg)) => return Err(VmmError::MemoryFailed(msg)),
                VmEvent::SnapshotWritten(result) => self.finish_live(result),
                VmEvent::Api(call) => {
                    let exit = matches!(call.request, ApiRequest::Snapshot { then: AfterSnapshot::Exit, .. });
                    let live = matches!(
                        call.request,
                        ApiRequest::Snapshot { then: AfterSnapshot::Resume, stop_the_world: false, .. } | ApiRequest::Backup { .. }
                    );
                    if live {
                        self.begin_live(call);
                        continue;
                    }
                    let reply = self.handle_api(call.request);
                    let ok = reply.is_ok();
                    // The client may have gone; the VM carries on regardless.
                    let _ = call.reply.send(reply);
                    if exit && ok {
                        return Ok(GuestExit::Snapshotted);
                    }
                }
            }
        }
    }

    /// Starts a live snapshot: answers the client at once if it cannot
    /// start, otherwise when its memory is written.
    fn begin_live(&mut self, call: ApiCall) {
        let begun = match &call.request {
            ApiRequest::Snapshot { out, parent, .. } => self.begin_snapshot(out, parent.as_deref(), true),
            ApiRequest::Backup { to, full, state_dir } => self.begin_backup(to, *full, state_dir.as_deref()),
            _ => return,
        };
        match begun {
            Ok(Begun { writer, finishing, child: Some(child) }) => {
                log::info!(
                    "snapshot {}: guest running again after {:.1} ms; memory being written by process {}",
                    writer.target().display(),
                    finishing.paused_for.unwrap_or_default().as_secs_f64() * 1000.0,
                    child.pid()
                );
                let events = self.events_tx.clone();
                let waiter = thread::Builder::new().name("snapshot-wait".into()).spawn(move || {
                    let _ = events.send(VmEvent::SnapshotWritten(child.wait()));
                });
                if let Err(e) = waiter {
                    // The child still writes, but nobody would collect it.
                    let _ = call.reply.send(Err(format!("cannot start a thread to wait for the memory writer: {e}")));
                    return;
                }
                self.pending = Some(PendingSnapshot { writer, finishing, reply: Some(call.reply) });
            }
            Ok(_) => {
                let _ = call.reply.send(Err("the live snapshot did not start its memory writer".into()));
            }
            Err(e) => {
                let _ = call.reply.send(Err(error_chain(&e)));
            }
        }
    }

    /// Finishes the live snapshot whose memory writer ended with `result`
    /// and answers its client.
    fn finish_live(&mut self, result: Result<Written, String>) {
        let Some(mut pending) = self.pending.take() else { return };
        pending.finishing.memory = Some(result);
        let reply = self.finish_snapshot(pending.writer, pending.finishing).map_err(|e| error_chain(&e)).map(|report| {
            let mut fields = self.status_fields();
            match &report.backup {
                Some(backup) => fields.insert("backup".into(), crate::backup::report_json(&report, backup)),
                None => fields.insert("snapshot".into(), snapshot_json(&report, "live")),
            };
            fields
        });
        if let Err(msg) = &reply {
            log::error!("live snapshot failed: {msg}");
        }
        if let Some(tx) = pending.reply.take() {
            let _ = tx.send(reply);
        }
    }

    /// Waits for a live snapshot still being written and finishes it.
    fn settle_pending(&mut self) {
        if self.pending.is_none() {
            return;
        }
        log::info!("the VM ended while a live snapshot was written; finishing the snapshot");
        while self.pending.is_some() {
            match self.events_rx.recv() {
                Ok(VmEvent::SnapshotWritten(result)) => self.finish_live(result),
                Ok(VmEvent::Api(call)) => {
                    let _ = call.reply.send(Err("the VM has ended".into()));
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }

    /// The fields every reply carries: state, shape, restore figures.
    fn status_fields(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut fields = serde_json::Map::new();
        fields.insert("state".into(), if self.paused { "paused" } else { "running" }.into());
        fields.insert("vcpus".into(), self.machine.vcpus.into());
        fields.insert("memory_bytes".into(), self.machine.mem_size.into());
        if let Some(pending) = &self.pending {
            fields.insert("snapshot_in_progress".into(), pending.writer.target().display().to_string().into());
        }
        if let Some(report) = self.restore_report() {
            if let Ok(value) = serde_json::to_value(report) {
                fields.insert("restore".into(), value);
            }
        }
        fields
    }

    /// Serves one control request (a live snapshot excepted).
    fn handle_api(&mut self, request: ApiRequest) -> ApiReply {
        let text = |e: VmmError| error_chain(&e);
        let mut snapshot = None;
        match request {
            ApiRequest::Pause => self.pause().map_err(text)?,
            ApiRequest::Resume => self.resume().map_err(text)?,
            ApiRequest::Status => {}
            ApiRequest::Snapshot { out, then, parent, .. } => {
                let was_paused = self.paused;
                let report = self.snapshot(&out, parent.as_deref());
                if then == AfterSnapshot::Resume || report.is_err() {
                    // A failed snapshot must not leave a running guest stopped.
                    if !was_paused {
                        self.resume().map_err(text)?;
                    }
                }
                let report = report.map_err(text)?;
                snapshot = Some(snapshot_json(&report, "stop-the-world"));
            }
            ApiRequest::Backup { .. } => return Err("a backup is taken live; the VMM did not start it".into()),
            ApiRequest::Grant { .. } | ApiRequest::Revoke { .. } | ApiRequest::Grants => {
                return self.handle_content(request);
            }
        }
        let mut fields = self.status_fields();
        if let Some(value) = snapshot {
            fields.insert("snapshot".into(), value);
        }
        Ok(fields)
    }

    /// Serves a grant, revoke or grants request.
    fn handle_content(&self, request: ApiRequest) -> ApiReply {
        let Some(content) = &self.content else {
            return Err("this VM serves no content: start it with --content-store DIR".into());
        };
        match request {
            ApiRequest::Grant { ids, uses, expires_s } => {
                let limits = GrantLimits { uses, expires_after: expires_s.map(Duration::from_secs) };
                content.grant(&ids, limits).map_err(|e| error_chain(&e))?;
                log::info!("content: granted {} ID(s) over the control socket", ids.len());
            }
            ApiRequest::Revoke { ids } => {
                let missing = content.revoke(&ids);
                if !missing.is_empty() {
                    let list: Vec<String> = missing.iter().map(ToString::to_string).collect();
                    return Err(format!("not granted to this VM (the rest are revoked): {}", list.join(", ")));
                }
            }
            _ => {}
        }
        let mut fields = serde_json::Map::new();
        let grants = serde_json::to_value(content.grants()).map_err(|e| e.to_string())?;
        fields.insert("grants".into(), grants);
        Ok(fields)
    }

    /// Pauses every vCPU.
    pub fn pause(&mut self) -> Result<(), VmmError> {
        if !self.paused {
            for vcpu in &self.vcpus {
                vcpu.pause()?;
            }
            self.paused = true;
        }
        Ok(())
    }

    /// Lets every vCPU run again.
    pub fn resume(&mut self) -> Result<(), VmmError> {
        if self.paused {
            for vcpu in &self.vcpus {
                vcpu.resume()?;
            }
            self.paused = false;
        }
        Ok(())
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Checks that `parent` is this VM's latest snapshot, which an
    /// incremental snapshot into `out` may build on; says how `out` will
    /// name it.
    fn check_parent(&self, parent: &Path, out: &Path) -> Result<ParentRef, VmmError> {
        let refuse = |why: String| VmmError::Parent(parent.to_path_buf(), why);
        let Some(latest) = self.latest.as_ref().filter(|_| self.dirty.is_on()) else {
            return Err(refuse("this VM has no snapshot to build on yet: take a full snapshot first".into()));
        };
        let manifest = persist::read_manifest(parent).map_err(|e| refuse(error_chain(&e)))?;
        if manifest.vm_id != self.vm_id {
            return Err(refuse("it is a snapshot of another VM".into()));
        }
        if manifest.id.is_empty() || manifest.id != latest.id {
            return Err(refuse(format!(
                "it is not this VM's latest snapshot ({}): an incremental snapshot holds the memory changed since the \
                 latest one, so it can only build on that",
                latest.dir.display()
            )));
        }
        let memory = parent.join(&manifest.memory_file);
        let index_crc = Reader::open(&memory).map_err(|e| refuse(error_chain(&e)))?.index_crc();
        if index_crc != latest.index_crc {
            return Err(refuse(format!("its memory file {} changed since it was written", memory.display())));
        }
        // Writing over a snapshot the parent's chain needs would break it.
        let canonical = |p: &Path| p.canonicalize().ok();
        if let Some(target) = canonical(out) {
            let chain = persist::snapshot_chain(parent, &manifest, &memory).map_err(|e| refuse(error_chain(&e)))?;
            if chain.iter().any(|layer| canonical(&layer.dir).as_ref() == Some(&target)) {
                return Err(refuse(format!("{} is part of its chain; writing the new snapshot there would break it", out.display())));
            }
        }
        let dir = persist::parent_link(out, parent)?;
        Ok(ParentRef { id: manifest.id, dir, index_crc })
    }

    /// Takes a snapshot into `out`: `parent` for an incremental one; `live`
    /// to let the guest run while memory is written (by a child process,
    /// see [`crate::snapshot`]). A stop-the-world snapshot has its memory
    /// written when this returns and leaves the vCPUs paused (the caller
    /// resumes them or ends the VM); a live one returns with the guest
    /// running again and the child writing. Either is then finished by
    /// [`Self::finish_snapshot`].
    fn begin_snapshot(&mut self, out: &Path, parent: Option<&Path>, live: bool) -> Result<Begun, VmmError> {
        // Refuse what cannot be saved, and unusable outputs or parents,
        // before stopping the guest.
        vcpu::check_xsave_size(&self.kvm)?;
        if self.pending.is_some() {
            return Err(VmmError::Busy);
        }
        let parent_dir = parent;
        let parent = parent.map(|p| self.check_parent(p, out)).transpose()?;
        let writer = SnapshotWriter::create(out)?;
        let identity = Identity { id: persist::new_id(), vm_id: self.vm_id.clone(), parent };
        let started = Instant::now();
        let (was_paused, paused_at) = self.track_and_pause()?;
        log::debug!("snapshot: vCPUs paused after {:.1} ms", paused_at.elapsed().as_secs_f64() * 1000.0);
        // Every snapshot takes the pages changed since the one before.
        let taken = match self.dirty.take(&self.vm, &self.mem) {
            Ok(pages) => Some(pages),
            Err(e) => {
                self.resume_unless(was_paused);
                return Err(e.into());
            }
        };
        let changed = if identity.parent.is_some() { taken.clone() } else { None };
        match self.capture(&writer, identity.parent.as_ref(), changed, live, was_paused, paused_at, None) {
            Ok((state, disks, disk_hooks, child, memory)) => Ok(Begun {
                writer,
                finishing: Finishing {
                    identity,
                    parent_dir: parent_dir.map(Path::to_path_buf),
                    state,
                    taken,
                    disks,
                    // Live: the vCPUs run again already; stop-the-world:
                    // they do once the snapshot is finished.
                    paused_for: child.as_ref().map(|_| paused_at.elapsed()),
                    paused_at,
                    started,
                    memory,
                    disk_hooks,
                    backup: None,
                },
                child,
            }),
            Err(e) => {
                if let Some(pages) = taken {
                    self.dirty.give_back(pages);
                }
                // A failed snapshot must not leave a running guest stopped.
                self.resume_unless(was_paused);
                Err(e)
            }
        }
    }

    /// Starts dirty tracking if it is off, then pauses the vCPUs; returns
    /// whether the VM was paused already and when the pause began.
    /// Tracking starts with a booted VM's first snapshot or backup, before
    /// its pause: switching KVM's log on write-protects (and splits) the
    /// guest's mappings, work the guest need not be stopped for. What the
    /// guest writes until the pause is logged too.
    pub(crate) fn track_and_pause(&mut self) -> Result<(bool, Instant), VmmError> {
        if !self.dirty.is_on() {
            self.dirty.start(&self.vm, &self.mem)?;
        }
        let was_paused = self.paused;
        let paused_at = Instant::now();
        self.pause()?;
        Ok((was_paused, paused_at))
    }

    /// Resumes the vCPUs unless they were paused before (by the user);
    /// a failure is logged, since the caller is reporting another error.
    pub(crate) fn resume_unless(&mut self, was_paused: bool) {
        if !was_paused {
            if let Err(e) = self.resume() {
                log::error!("cannot resume the guest: {}", error_chain(&e));
            }
        }
    }

    /// The part of [`Self::begin_snapshot`] with the vCPUs paused: state,
    /// disks, and memory (written, or handed to a forked writer, after
    /// which the vCPUs run again unless they were paused before).
    ///
    /// Disks of a live snapshot or a backup are not copied here: their
    /// blocks are marked and hooked (`CopyHooks`), and the writer copies
    /// them while the guest runs, each before the guest overwrites it; a
    /// backup (`backup`) marks only the blocks its disk checkpoints need
    /// and compares memory with its retired record when tracking was lost.
    /// A stop-the-world snapshot copies whole disks in the pause.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn capture(
        &mut self,
        writer: &SnapshotWriter,
        parent: Option<&ParentRef>,
        changed: Option<DirtyPages>,
        live: bool,
        was_paused: bool,
        paused_at: Instant,
        mut backup: Option<&mut BackupCapture>,
    ) -> Result<Captured, VmmError> {
        let phase = |what: &str| log::debug!("snapshot: {what} at {:.1} ms", paused_at.elapsed().as_secs_f64() * 1000.0);
        phase("dirty pages taken");
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for vcpu in &self.vcpus {
            vcpus.push(vcpu.save_state()?);
        }
        phase("vCPU state saved");
        // A lazily restored VM not fully resident: what is not loaded yet
        // is read from the checkpoint it came from.
        let not_resident = match &self.lazy {
            Some(lazy) => match lazy.resident()? {
                Some(resident) => {
                    let reader = lazy.reader().try_clone().map_err(VmmError::ReadRestoreCheckpoint)?;
                    Some(NotResident { reader, resident })
                }
                None => None,
            },
            None => None,
        };
        // Device threads are held still until memory is captured: what
        // they would write into guest memory (a disk read, a vsock packet)
        // must not land after their queues were saved.
        let mut transports: Vec<_> = self.virtio.iter().map(|slot| lock(&slot.transport)).collect();
        let mut virtio = Vec::with_capacity(transports.len());
        let mut disks = 0;
        let mut disk_bytes_copied = 0;
        let mut hooks = CopyHooks::default();
        let mut raw_jobs = Vec::new();
        for (index, (slot, transport)) in self.virtio.iter().zip(transports.iter_mut()).enumerate() {
            transport.device_mut().prepare_snapshot().map_err(|e| VmmError::FlushDevice(index, e))?;
            let backend = match &slot.backend {
                SlotBackend::Block { file, path, read_only, changed } => {
                    let copy_error = |e| VmmError::CopyDisk(path.clone(), e);
                    let (name, copied) = match backup.as_deref_mut() {
                        Some(backup) => {
                            let (name, copy) = backup.stage_disk(writer, disks, file, changed).map_err(copy_error)?;
                            hooks.add(changed, &copy);
                            (name, copy.needed_bytes())
                        }
                        // A live snapshot: the writer copies the disk while
                        // the guest runs, each block before the guest
                        // overwrites it.
                        None if live => {
                            let (name, target) = writer.disk_path(disks);
                            let size = file.metadata().map_err(copy_error)?.len();
                            let copy = CopyOut::prepare(file, size, &DiskBlocks::All, &target).map_err(copy_error)?;
                            hooks.add(changed, &copy);
                            let bytes = copy.needed_bytes();
                            let blocks = DiskBlocks::All;
                            raw_jobs.push(DiskJob { staging: target.clone(), out: target, size, blocks, parent_index_crc: None, copy, raw: true });
                            (name, bytes)
                        }
                        None => {
                            let (name, copy) = writer.disk_path(disks);
                            (name, copy_sparse(file, &copy).map_err(copy_error)?.bytes_copied)
                        }
                    };
                    disks += 1;
                    disk_bytes_copied += copied;
                    let original_identity = FileIdentity::of(path).map_err(|e| VmmError::CopyDisk(path.clone(), e))?;
                    VirtioBackend::Block { file: name, original: path.clone(), original_identity, read_only: *read_only }
                }
                SlotBackend::Vsock { uds_path: Some(uds_path) } => VirtioBackend::Vsock { uds_path: uds_path.clone() },
                SlotBackend::Vsock { uds_path: None } => VirtioBackend::VsockWithoutSocket,
                SlotBackend::Rng => VirtioBackend::Rng,
            };
            virtio.push(SavedVirtioDevice { backend, state: transport.snapshot() });
        }
        phase("devices saved, disks copied");
        let vm = vm::save_vm_state(&self.vm)?;
        let state = SnapshotState { machine: self.machine.clone(), vcpus, vm, devices: self.devices.state(), virtio };
        let mut source = VmMemory::new(self.mem.clone(), not_resident, changed);
        let mut disk_jobs = raw_jobs;
        // Snapshots check their blocks with XXH64, cheap to verify on every
        // restore (docs/checkpoint-format.md); backups keep CRC-32C, which
        // their retired records list and compare against.
        let mut checksum = BlockChecksum::Xxh64;
        if let Some(backup) = backup {
            if let Some(crcs) = backup.memory_compare.take() {
                source.compare_with(crcs, u64::from(checkpoint::writer::DEFAULT_MEMORY_BLOCK_SIZE));
            }
            disk_jobs = std::mem::take(&mut backup.jobs);
            checksum = BlockChecksum::Crc32c;
        }
        let options = WriterOptions { parent_index_crc: parent.map(|p| p.index_crc), checksum, ..Default::default() };
        if live {
            phase("VM state saved");
            let child = fork_writer(writer.memory_path(), source, options, disk_jobs).map_err(VmmError::ForkWriter)?;
            hooks.set_writer(child.pid());
            phase("memory writer forked");
            drop(transports);
            if !was_paused {
                self.resume()?;
            }
            phase("vCPUs resumed");
            return Ok((state, (disks, disk_bytes_copied), hooks, Some(child), None));
        }
        if let Err(e) = source.scan_touched() {
            log::warn!("cannot read /proc/self/pagemap ({e}): every memory block is read");
        }
        let mut progress = std::mem::replace(&mut self.snapshot_progress, Box::new(|_, _| {}));
        let written = checkpoint::write_checkpoint(&writer.memory_path(), &source, &options, &mut *progress);
        self.snapshot_progress = progress;
        drop(transports);
        let written = written.map(|memory| Written { memory, disks: Vec::new() }).map_err(|e| error_chain(&e));
        Ok((state, (disks, disk_bytes_copied), hooks, None, Some(written)))
    }

    /// Writes the state and the manifest once memory is written, and makes
    /// the snapshot the VM's latest; on any failure gives the changed pages
    /// back, so the next snapshot still writes them.
    fn finish_snapshot(&mut self, writer: SnapshotWriter, mut finishing: Finishing) -> Result<SnapshotReport, VmmError> {
        if finishing.backup.is_some() {
            return self.finish_backup(writer, finishing);
        }
        let result = (|| {
            let memory = finishing.memory.take().unwrap_or_else(|| Err("memory was not written".into()));
            let memory = memory.map_err(VmmError::WriteMemory)?.memory;
            let state_bytes = writer.write_state(&finishing.state)?;
            let memory_path = writer.memory_path();
            let index_crc = Reader::open(&memory_path).map_err(VmmError::ReadBack)?.index_crc();
            let dir = writer.commit(&self.machine, &finishing.identity)?;
            Ok((dir, memory, state_bytes, index_crc))
        })();
        match result {
            Ok((dir, memory, state_bytes, index_crc)) => {
                let canonical = dir.canonicalize().unwrap_or_else(|_| dir.clone());
                self.latest = Some(LatestSnapshot { id: finishing.identity.id.clone(), dir: canonical, index_crc });
                Ok(SnapshotReport {
                    dir,
                    memory,
                    state_bytes,
                    disks: finishing.disks.0,
                    disk_bytes_copied: finishing.disks.1,
                    paused_for: finishing.paused_for.unwrap_or_else(|| finishing.paused_at.elapsed()),
                    total: finishing.started.elapsed(),
                    parent: finishing.parent_dir.clone(),
                    backup: None,
                })
            }
            Err(e) => {
                if let Some(pages) = finishing.taken.take() {
                    self.dirty.give_back(pages);
                }
                Err(e)
            }
        }
    }

    /// Saves the VM into `out` (building on `parent` if given) with the
    /// vCPUs stopped for the whole write, and leaves them paused (the
    /// caller resumes them or ends the VM).
    pub fn snapshot(&mut self, out: &Path, parent: Option<&Path>) -> Result<SnapshotReport, VmmError> {
        let begun = self.begin_snapshot(out, parent, false)?;
        self.finish_snapshot(begun.writer, begun.finishing)
    }
}
