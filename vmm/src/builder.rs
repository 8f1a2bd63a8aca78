//! Building a microVM and running it: one linear recipe per entry point,
//! [`build_microvm_for_boot`] and [`build_microvm_from_snapshot`], both
//! ending in a [`Vmm`] whose [`Vmm::run`] serves the VM until it ends.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::acpi::{self, AcpiError};
use crate::error_chain;
use crate::api::{AfterSnapshot, ApiCall, ApiError, ApiReply, ApiRequest, ApiServer};
use crate::boot::{self, BootError, BootParamsInput, InitrdImage, KernelImage};
use crate::checkpoint::{self, Reader, ReaderOptions, WriteStats, WriterOptions};
use crate::config::VmConfig;
use crate::devices::acpi_pm::AcpiPm;
use crate::devices::bus::{lock, BusError, PioBus};
use crate::devices::cmos::{Cmos, CmosStateError, HostClock};
use crate::devices::legacy::{I8042, IrqTrigger, SerialDevice, SerialStateError};
use crate::devices::PowerEvent;
use crate::layout::{self, ports};
use crate::persist::{self, DevicesState, MachineConfig, PersistError, SnapshotState, SnapshotWriter};
use crate::restore::uffd::{self, LazyMemory, LoaderReport, MemoryFailure, UffdError};
use crate::terminal::{RawTerminal, TerminalError};
use crate::vstate::memory::{create_guest_memory, MemoryError};
use crate::vstate::vcpu::{self, supported_cpuid, Vcpu, VcpuError, VcpuEvent, VcpuHandle, VcpuStop};
use crate::vstate::vm::{self, VmError, VmStateError};

/// Errors while building, running, snapshotting or restoring a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Kernel, initrd or command line.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// KVM or the VM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The VM's in-kernel state.
    #[error(transparent)]
    VmState(#[from] VmStateError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// A vCPU.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The port I/O bus.
    #[error("cannot place a device on the I/O bus")]
    Bus(#[from] BusError),
    /// The console terminal.
    #[error(transparent)]
    Terminal(#[from] TerminalError),
    /// Snapshot files.
    #[error(transparent)]
    Persist(#[from] PersistError),
    /// The memory checkpoint could not be opened.
    #[error("cannot open the memory checkpoint")]
    OpenCheckpoint(#[source] checkpoint::ReadError),
    /// The memory checkpoint could not be written.
    #[error("cannot write the memory checkpoint")]
    WriteCheckpoint(#[source] checkpoint::WriteError),
    /// The checkpoint's memory does not match the machine.
    #[error("the memory checkpoint holds {found}, but the snapshot's machine has {expected}")]
    CheckpointLayout {
        /// What the machine needs.
        expected: String,
        /// What the checkpoint holds.
        found: String,
    },
    /// Lazy or eager memory loading.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// The serial port's saved state.
    #[error(transparent)]
    SerialState(#[from] SerialStateError),
    /// The RTC's saved state.
    #[error(transparent)]
    CmosState(#[from] CmosStateError),
    /// An eventfd for an interrupt line.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
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
    /// Time the vCPUs were paused for the snapshot.
    pub paused_for: Duration,
}

/// How guest memory comes back on restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryMode {
    /// On demand through userfaultfd; the VM runs at once.
    Lazy {
        /// Load the remaining blocks in the background.
        prefetch: bool,
    },
    /// All of it before the VM runs.
    Eager,
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

type Console = SerialDevice<IrqTrigger, std::io::Stdout>;

/// The emulated devices, kept by type so their state can be saved.
struct Devices {
    bus: Arc<PioBus>,
    serial: Arc<Mutex<Console>>,
    cmos: Arc<Mutex<Cmos<HostClock>>>,
}

impl Devices {
    fn state(&self) -> DevicesState {
        DevicesState { serial: lock(&self.serial).state(), cmos: lock(&self.cmos).state() }
    }
}

/// A built VM, ready to run or running.
pub struct Vmm {
    /// The lazy loader writes into `mem`: declared first, it is dropped
    /// (its handler stopped) before the memory.
    lazy: Option<LazyMemory>,
    kvm: Kvm,
    vm: VmFd,
    mem: GuestMemoryMmap,
    machine: MachineConfig,
    devices: Devices,
    /// vCPUs built but not started yet.
    pending_vcpus: Vec<Vcpu>,
    vcpus: Vec<VcpuHandle>,
    msr_indices: Arc<Vec<u32>>,
    events_tx: Sender<VmEvent>,
    events_rx: Receiver<VmEvent>,
    paused: bool,
    restore_started: Option<(Instant, &'static str)>,
    restore_report: Option<RestoreReport>,
    /// Told (bytes done, bytes total) while a snapshot writes memory.
    snapshot_progress: Box<dyn FnMut(u64, u64) + Send>,
}

/// Builds a microVM from `config` with the kernel loaded and every vCPU at
/// its 64-bit entry point.
pub fn build_microvm_for_boot(config: &VmConfig) -> Result<Vmm, BuildError> {
    // The user's files first, so that bad input is reported before KVM is
    // touched.
    let mut kernel = KernelImage::open(&config.kernel)?;
    kernel.check_cmdline(&config.cmdline)?;
    let mut initrd = match &config.initrd {
        Some(path) => Some(InitrdImage::open(path, config.mem_size)?),
        None => None,
    };

    let kvm = vm::open_kvm(&vm::kvm_path())?;
    vm::check_vcpu_limit(&kvm, config.vcpus)?;
    let vm = vm::create_vm(&kvm)?;

    let mem = create_guest_memory(config.mem_size)?;
    vm::register_memory(&vm, &mem)?;

    let loaded = boot::load_kernel(&mem, &mut kernel)?;
    let initrd_range = match initrd.as_mut() {
        Some(image) => Some((boot::load_initrd(&mem, image, &loaded)?, image.size())),
        None => None,
    };
    boot::write_cmdline(&mem, &config.cmdline)?;
    let rsdp = acpi::write_tables(&mem, config.vcpus)?;
    let params = boot::build_boot_params(&BootParamsInput {
        kernel: &loaded,
        cmdline_len: config.cmdline.len(),
        initrd: initrd_range,
        mem_size: config.mem_size,
        rsdp,
    })?;
    boot::write_boot_params(&mem, &params)?;
    boot::write_gdt_idt(&mem)?;
    boot::write_page_tables(&mem)?;

    let (events_tx, events_rx) = channel::<VmEvent>();
    let serial_irq = serial_irq(&vm)?;
    let serial = SerialDevice::new(IrqTrigger(serial_irq), std::io::stdout());
    let devices = build_devices(serial, Cmos::new(HostClock), &events_tx)?;

    let supported = supported_cpuid(&kvm)?;
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for index in 0..config.vcpus {
        let vcpu = Vcpu::new(&vm, index)?;
        vcpu.configure_for_boot(&kvm, &supported, config.vcpus, loaded.entry)?;
        vcpus.push(vcpu);
    }
    log::info!(
        "booting {:?} kernel at {:#x} with {} vCPUs and {} MiB",
        kernel.format(),
        loaded.entry.0,
        config.vcpus,
        config.mem_size >> 20
    );
    let msr_indices = Arc::new(vcpu::msrs_to_save(&kvm)?);
    Ok(Vmm {
        kvm,
        vm,
        mem,
        machine: MachineConfig { mem_size: config.mem_size, vcpus: config.vcpus },
        devices,
        pending_vcpus: vcpus,
        vcpus: Vec::new(),
        msr_indices,
        events_tx,
        events_rx,
        lazy: None,
        paused: false,
        restore_started: None,
        restore_report: None,
        snapshot_progress: Box::new(|_, _| {}),
    })
}

/// Rebuilds a microVM from the snapshot in `dir`, with its vCPUs, in-kernel
/// devices and emulated devices in their saved state and memory loaded as
/// `memory` says. `process_start` is when this process started, for the
/// restore latency figure.
pub fn build_microvm_from_snapshot(
    dir: &Path,
    memory: MemoryMode,
    process_start: Instant,
) -> Result<Vmm, BuildError> {
    let phase = |what: &str| log::debug!("restore: {what} at {:.1} ms", process_start.elapsed().as_secs_f64() * 1000.0);
    // Everything from the files is read and checked before KVM is touched.
    let snapshot = persist::open_snapshot(dir)?;
    let state: SnapshotState = snapshot.state;
    // Faults touch scattered blocks: each reads only its own block's stored
    // bytes, not the whole storage block around it (the checkpoint
    // benchmark: a warm 64 KiB block read is ~30 us alone, ~170 us when it
    // misses the storage-block cache and reads the 1 MiB around it).
    let options = match memory {
        MemoryMode::Lazy { .. } => ReaderOptions { cached_storage_blocks: 0, ..Default::default() },
        MemoryMode::Eager => ReaderOptions::default(),
    };
    let reader = Reader::open_with(&snapshot.memory_path, options).map_err(BuildError::OpenCheckpoint)?;
    check_checkpoint_layout(&reader, &state.machine)?;
    phase("snapshot files read and checked");

    let kvm = vm::open_kvm(&vm::kvm_path())?;
    vm::check_vcpu_limit(&kvm, state.machine.vcpus)?;
    vcpu::check_xsave_size(&kvm)?;
    let vm = vm::create_vm(&kvm)?;
    let mem = create_guest_memory(state.machine.mem_size)?;
    vm::register_memory(&vm, &mem)?;
    phase("VM and memory created");

    let (events_tx, events_rx) = channel::<VmEvent>();
    // Memory before any vCPU can run. Lazy: registered with userfaultfd and
    // served by the handler thread from here on.
    let (lazy, mode_name) = match memory {
        MemoryMode::Lazy { prefetch } => {
            let lazy = LazyMemory::start(&mem, Arc::new(reader), prefetch, events_tx.clone())?;
            (Some(lazy), "lazy")
        }
        MemoryMode::Eager => {
            uffd::load_eager(&mem, &reader)?;
            (None, "eager")
        }
    };
    phase("memory set up");

    // vCPUs (and so their LAPICs) before the VM-wide interrupt controller
    // state, which routes to them.
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for saved in &state.vcpus {
        let vcpu = Vcpu::new(&vm, saved.index)?;
        vcpu.restore_state(saved)?;
        vcpus.push(vcpu);
    }
    // VM clock, PIT and irqchip after the vCPUs; the clock last among
    // in-kernel state so the guest sees the least time jump.
    vm::restore_vm_state(&vm, &state.vm)?;
    phase("vCPU and VM state restored");

    // Devices last: restoring the UART may raise its interrupt, which
    // must find the interrupt controllers in their saved state.
    let serial_irq = serial_irq(&vm)?;
    let serial = SerialDevice::from_state(IrqTrigger(serial_irq), std::io::stdout(), &state.devices.serial)?;
    let cmos = Cmos::from_state(HostClock, &state.devices.cmos)?;
    let devices = build_devices(serial, cmos, &events_tx)?;

    // The guest was stopped for as long as the snapshot sat on disk; tell
    // KVM so the guest's watchdogs do not take it for a lockup.
    for vcpu in &vcpus {
        vcpu.notify_paused();
    }
    let msr_indices = Arc::new(vcpu::msrs_to_save(&kvm)?);
    Ok(Vmm {
        kvm,
        vm,
        mem,
        machine: state.machine,
        devices,
        pending_vcpus: vcpus,
        vcpus: Vec::new(),
        msr_indices,
        events_tx,
        events_rx,
        lazy,
        paused: false,
        restore_started: Some((process_start, mode_name)),
        restore_report: None,
        snapshot_progress: Box::new(|_, _| {}),
    })
}

/// The checkpoint must hold exactly the machine's RAM ranges.
fn check_checkpoint_layout(reader: &Reader, machine: &MachineConfig) -> Result<(), BuildError> {
    let expected: Vec<(u64, u64)> = layout::ram_ranges(machine.mem_size);
    let found: Vec<(u64, u64)> = reader.header().regions.iter().map(|r| (r.guest_addr, r.size)).collect();
    if expected != found {
        let show = |v: &[(u64, u64)]| {
            v.iter().map(|(a, s)| format!("{} MiB at {a:#x}", s >> 20)).collect::<Vec<_>>().join(", ")
        };
        return Err(BuildError::CheckpointLayout { expected: show(&expected), found: show(&found) });
    }
    Ok(())
}

fn serial_irq(vm: &VmFd) -> Result<EventFd, BuildError> {
    let irq = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm.register_irqfd(&irq, ports::COM1_IRQ)
        .map_err(|e| VmError::RegisterIrqfd(ports::COM1_IRQ, e))?;
    Ok(irq)
}

/// COM1, the i8042, the ACPI power registers and the CMOS RTC on a port
/// I/O bus.
fn build_devices(
    serial: Console,
    cmos: Cmos<HostClock>,
    events: &Sender<VmEvent>,
) -> Result<Devices, BuildError> {
    let serial = Arc::new(Mutex::new(serial));
    let cmos = Arc::new(Mutex::new(cmos));
    let mut bus = PioBus::new();
    bus.insert(serial.clone(), ports::COM1, 8)?;
    bus.insert(Arc::new(Mutex::new(I8042::new(events.clone()))), ports::I8042_DATA, 5)?;
    bus.insert(Arc::new(Mutex::new(AcpiPm::new(events.clone()))), ports::ACPI_SLEEP_CONTROL, 3)?;
    bus.insert(cmos.clone(), ports::CMOS, 2)?;
    Ok(Devices { bus: Arc::new(bus), serial, cmos })
}

/// Moves what is typed on stdin into the guest's console.
fn spawn_stdin_reader(serial: Arc<Mutex<Console>>) -> Result<(), BuildError> {
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
        .map_err(|e| BuildError::SpawnThread(name, e))
}

impl Vmm {
    /// Sets what is told of a snapshot's progress (bytes written, total),
    /// e.g. a progress bar.
    pub fn set_snapshot_progress(&mut self, progress: Box<dyn FnMut(u64, u64) + Send>) {
        self.snapshot_progress = progress;
    }

    /// Starts the vCPUs with the console on this process's stdin and
    /// stdout.
    fn start(&mut self) -> Result<(), BuildError> {
        vcpu::register_kick_signal().map_err(BuildError::KickSignal)?;
        spawn_stdin_reader(self.devices.serial.clone())?;
        for vcpu in std::mem::take(&mut self.pending_vcpus) {
            let index = vcpu.index();
            let handle = vcpu
                .start(self.devices.bus.clone(), self.mem.clone(), self.msr_indices.clone(), self.events_tx.clone())
                .map_err(|e| BuildError::SpawnThread(format!("vcpu{index}"), e))?;
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
    pub fn run(mut self, api_sock: Option<&Path>) -> (Result<GuestExit, BuildError>, Option<RestoreReport>) {
        let result = self.run_inner(api_sock);
        (result, self.restore_report())
    }

    fn run_inner(&mut self, api_sock: Option<&Path>) -> Result<GuestExit, BuildError> {
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
                .map_err(|_| BuildError::GuestFailed("every vCPU and device went away".into()))?;
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
                    return Err(BuildError::GuestFailed(msg))
                }
                VmEvent::Memory(MemoryFailure(msg)) => return Err(BuildError::MemoryFailed(msg)),
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
        let text = |e: BuildError| error_chain(&e);
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
    pub fn pause(&mut self) -> Result<(), BuildError> {
        if !self.paused {
            for vcpu in &self.vcpus {
                vcpu.pause()?;
            }
            self.paused = true;
        }
        Ok(())
    }

    /// Lets every vCPU run again.
    pub fn resume(&mut self) -> Result<(), BuildError> {
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
    pub fn snapshot(&mut self, out: &Path, progress: &mut dyn FnMut(u64, u64)) -> Result<SnapshotReport, BuildError> {
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
        let state = SnapshotState {
            machine: self.machine.clone(),
            vcpus,
            vm: vm::save_vm_state(&self.vm)?,
            devices: self.devices.state(),
        };
        let memory = checkpoint::write_checkpoint(&writer.memory_path(), &self.mem, &WriterOptions::default(), progress)
            .map_err(BuildError::WriteCheckpoint)?;
        let state_bytes = writer.write_state(&state)?;
        let dir = writer.commit(&self.machine)?;
        Ok(SnapshotReport { dir, memory, state_bytes, paused_for: paused_at.elapsed() })
    }
}
