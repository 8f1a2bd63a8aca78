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
use vm_memory::GuestMemoryMmap;

use crate::api::{AfterSnapshot, ApiCall, ApiError, ApiReply, ApiRequest, ApiServer};
use crate::checkpoint::{self, WriteStats, WriterOptions};
use crate::devices::bus::{lock, MmioBus, PioBus};
use crate::devices::virtio::block::image::{copy_sparse, FileIdentity};
use crate::devices::virtio::mmio::MmioTransport;
use crate::devices::virtio::thread::DeviceThread;
use crate::devices::cmos::{Cmos, HostClock};
use crate::devices::legacy::{IrqTrigger, SerialDevice};
use crate::devices::PowerEvent;
use crate::error_chain;
use crate::persist::{
    DevicesState, MachineConfig, PersistError, SavedVirtioDevice, SnapshotState, SnapshotWriter, VirtioBackend,
};
use crate::restore::uffd::{LazyMemory, LoaderReport, MemoryFailure, UffdError};
use crate::terminal::{RawTerminal, TerminalError};
use crate::vstate::vcpu::{self, Vcpu, VcpuError, VcpuEvent, VcpuHandle, VcpuStop};
use crate::vstate::vm::{self, VmStateError};

/// Errors while a VM runs, pauses or is snapshotted.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
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
    },
    /// The vsock device's host socket.
    Vsock {
        /// Its path.
        uds_path: PathBuf,
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
}

/// Moves what is typed on stdin into the guest's console.
fn spawn_stdin_reader(serial: Arc<Mutex<Console>>) -> Result<(), VmmError> {
    let name = "console-in".to_string();
    thread::Builder::new()
        .name(name.clone())
        .spawn(move || {
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
                VmEvent::Api(call) => {
                    let exit = matches!(call.request, ApiRequest::Snapshot { then: AfterSnapshot::Exit, .. });
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

    /// Serves one control request.
    fn handle_api(&mut self, request: ApiRequest) -> ApiReply {
        let mut fields = serde_json::Map::new();
        let text = |e: VmmError| error_chain(&e);
        match request {
            ApiRequest::Pause => self.pause().map_err(text)?,
            ApiRequest::Resume => self.resume().map_err(text)?,
            ApiRequest::Status => {}
            ApiRequest::Snapshot { out, then } => {
                let was_paused = self.paused;
                let mut progress = std::mem::replace(&mut self.snapshot_progress, Box::new(|_, _| {}));
                let report = self.snapshot(&out, &mut *progress);
                self.snapshot_progress = progress;
                if then == AfterSnapshot::Resume || report.is_err() {
                    // A failed snapshot must not leave a running guest stopped.
                    if !was_paused {
                        self.resume().map_err(text)?;
                    }
                }
                let report = report.map_err(text)?;
                log::info!(
                    "snapshot {}: {} MiB of memory in {} bytes, {:.0} ms paused",
                    report.dir.display(),
                    report.memory.bytes_in >> 20,
                    report.memory.file_bytes,
                    report.paused_for.as_secs_f64() * 1000.0
                );
                let m = &report.memory;
                let snapshot = serde_json::json!({
                    "dir": report.dir.display().to_string(),
                    "memory_bytes": m.bytes_in,
                    "memory_file_bytes": m.file_bytes,
                    "state_file_bytes": report.state_bytes,
                    "disks": report.disks,
                    "disk_bytes_copied": report.disk_bytes_copied,
                    "zero_blocks": m.zero_blocks,
                    "raw_blocks": m.raw_blocks,
                    "zstd_blocks": m.zstd_blocks,
                    "write_ms": m.elapsed.as_secs_f64() * 1000.0,
                    "paused_ms": report.paused_for.as_secs_f64() * 1000.0,
                });
                fields.insert("snapshot".into(), snapshot);
            }
        }
        fields.insert("state".into(), if self.paused { "paused" } else { "running" }.into());
        fields.insert("vcpus".into(), self.machine.vcpus.into());
        fields.insert("memory_bytes".into(), self.machine.mem_size.into());
        if let Some(report) = self.restore_report() {
            if let Ok(value) = serde_json::to_value(report) {
                fields.insert("restore".into(), value);
            }
        }
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

    /// Saves the VM into `out`: pauses it, writes state and memory, and
    /// leaves it paused (the caller resumes it or ends it).
    pub fn snapshot(&mut self, out: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<SnapshotReport, VmmError> {
        // Refuse what cannot be saved, and an unusable output, before
        // stopping the guest.
        vcpu::check_xsave_size(&self.kvm)?;
        let writer = SnapshotWriter::create(out)?;
        let paused_at = Instant::now();
        self.pause()?;
        if let Some(lazy) = &self.lazy {
            // The checkpoint reads all of memory: bring in what is missing
            // first instead of faulting it in page by page.
            lazy.load_all()?;
        }
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for vcpu in &self.vcpus {
            vcpus.push(vcpu.save_state()?);
        }
        // Device threads are held still from here until memory is written:
        // what they would write into guest memory (a disk read, a vsock
        // packet) must not land after their queues were saved.
        let mut transports: Vec<_> = self.virtio.iter().map(|slot| lock(&slot.transport)).collect();
        let mut virtio = Vec::with_capacity(transports.len());
        let mut disks = 0;
        let mut disk_bytes_copied = 0;
        for (index, (slot, transport)) in self.virtio.iter().zip(transports.iter_mut()).enumerate() {
            transport.device_mut().prepare_snapshot().map_err(|e| VmmError::FlushDevice(index, e))?;
            let backend = match &slot.backend {
                SlotBackend::Block { file, path, read_only } => {
                    let (name, copy) = writer.disk_path(disks);
                    disks += 1;
                    let copied = copy_sparse(file, &copy).map_err(|e| VmmError::CopyDisk(path.clone(), e))?;
                    disk_bytes_copied += copied.bytes_copied;
                    let original_identity = FileIdentity::of(path).map_err(|e| VmmError::CopyDisk(path.clone(), e))?;
                    VirtioBackend::Block { file: name, original: path.clone(), original_identity, read_only: *read_only }
                }
                SlotBackend::Vsock { uds_path } => VirtioBackend::Vsock { uds_path: uds_path.clone() },
                SlotBackend::Rng => VirtioBackend::Rng,
            };
            virtio.push(SavedVirtioDevice { backend, state: transport.snapshot() });
        }
        let state = SnapshotState {
            machine: self.machine.clone(),
            vcpus,
            vm: vm::save_vm_state(&self.vm)?,
            devices: self.devices.state(),
            virtio,
        };
        let memory = checkpoint::write_checkpoint(&writer.memory_path(), &self.mem, &WriterOptions::default(), progress)
            .map_err(VmmError::WriteCheckpoint)?;
        drop(transports);
        let state_bytes = writer.write_state(&state)?;
        let dir = writer.commit(&self.machine)?;
        Ok(SnapshotReport { dir, memory, state_bytes, disks, disk_bytes_copied, paused_for: paused_at.elapsed() })
    }
}
