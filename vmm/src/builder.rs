//! Building a microVM: one linear recipe per entry point,
//! [`build_microvm_for_boot`] and [`build_microvm_from_snapshot`], both
//! ending in a [`Vmm`] (see [`crate::vmm`]) whose [`Vmm::run`] serves the
//! VM until it ends.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::{IoEventAddress, VmFd};
use crate::vstate::memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::acpi::{self, AcpiError};
use crate::boot::{self, BootError, BootParamsInput, InitrdImage, KernelImage};
use crate::checkpoint::{self, Reader, ReaderOptions};
use crate::config::VmConfig;
use crate::content::service::{ContentConfig, ContentError, ContentService};
use crate::devices::acpi_pm::AcpiPm;
use crate::devices::bus::{BusError, MmioBus, PioBus};
use crate::devices::virtio::block::image::{copy_sparse, DiskError, DiskImage, FileIdentity};
use crate::devices::virtio::block::{Block, BlockError};
use crate::devices::virtio::mmio::{MmioError, MmioState, MmioTransport, NOTIFY_OFFSET};
use crate::devices::virtio::rng::Rng;
use crate::devices::virtio::thread::DeviceThread;
use crate::devices::virtio::vsock::{HostService, HostServices, Vsock, VsockError};
use crate::devices::virtio::{DeviceState, Interrupt, VirtioDevice};
use crate::devices::cmos::{Cmos, CmosStateError, HostClock};
use crate::devices::legacy::{I8042, IrqTrigger, SerialDevice, SerialStateError};
use crate::layout::{self, ports};
use crate::persist::{self, MachineConfig, PersistError, SnapshotState, VirtioBackend};
use crate::restore::uffd::{self, LazyMemory, LazyOptions, UffdError, WorkingSetPlan};
use crate::restore::working_set;
use crate::vstate::memory::{create_guest_memory, MemoryError};
use crate::vstate::vcpu::{self, supported_cpuid, Vcpu, VcpuError};
use crate::vstate::vm::{self, VmError, VmStateError};
use crate::error_chain;
use crate::vmm::{Console, Devices, LatestSnapshot, SlotBackend, VirtioSlot, VmEvent, Vmm, WorkingDisks};
use crate::vstate::dirty::{DirtyError, DirtyLog};

/// Errors while building a VM, for boot or from a snapshot.
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
    /// Snapshot files.
    #[error(transparent)]
    Persist(#[from] PersistError),
    /// The memory checkpoint could not be opened.
    #[error("cannot open the memory checkpoint")]
    OpenCheckpoint(#[source] checkpoint::ReadError),
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
    /// Dirty page tracking.
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    /// The serial port's saved state.
    #[error(transparent)]
    SerialState(#[from] SerialStateError),
    /// The RTC's saved state.
    #[error(transparent)]
    CmosState(#[from] CmosStateError),
    /// An eventfd for an interrupt line.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// A disk image.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// A saved disk does not fit its image.
    #[error("disk {0}")]
    Block(String, #[source] BlockError),
    /// The vsock device.
    #[error(transparent)]
    Vsock(#[from] VsockError),
    /// The content store or a grant.
    #[error(transparent)]
    Content(#[from] ContentError),
    /// `--content-store` on restore, and the snapshot has no vsock device.
    #[error("--content-store needs a vsock device, and the snapshot has none (a VM serves content when booted with --content-store or --vsock)")]
    ContentWithoutVsock,
    /// A virtio transport.
    #[error("virtio device {0}")]
    Mmio(usize, #[source] MmioError),
    /// A queue notification could not be routed to its device thread.
    #[error("cannot connect the notifications of virtio device {0}")]
    RegisterIoevent(usize, #[source] kvm_ioctls::Error),
    /// A device thread could not be started.
    #[error("cannot start thread {0}")]
    SpawnThread(String, #[source] std::io::Error),
    /// A saved device's state is not the kind its backend says.
    #[error("saved virtio device {0} is inconsistent: {1}")]
    BadDevice(usize, String),
    /// The working copy of a saved disk could not be made.
    #[error("cannot copy disk {0} to {1}")]
    CopyDisk(PathBuf, PathBuf, #[source] std::io::Error),
    /// The directory for working copies of disks could not be used.
    #[error("cannot use {0} for the restored VM's disks")]
    DiskDir(PathBuf, #[source] std::io::Error),
    /// `--disk-source original`, and the original changed since.
    #[error("disk {0} changed since the snapshot (size, modification time or inode differ); restore from the snapshot's copy instead")]
    DiskChanged(PathBuf),
}

/// How guest memory comes back on restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryMode {
    /// On demand through userfaultfd; the VM runs at once.
    Lazy {
        /// Load the remaining blocks in the background.
        prefetch: bool,
        /// What to do about the snapshot's working set.
        working_set: WorkingSetMode,
        /// Load the working set before the vCPUs start (else while they
        /// run).
        working_set_before: bool,
        /// How long a recording of the working set lasts.
        working_set_window: Duration,
    },
    /// All of it before the VM runs.
    Eager,
}

/// What a lazy restore does about the snapshot's working set (see
/// [`crate::restore::working_set`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkingSetMode {
    /// Loads the saved one first; records one when there is none, or the
    /// saved one cannot be used (after a warning saying why).
    Auto,
    /// Records a new one, whatever is saved.
    Record,
    /// Neither loads nor records one.
    Off,
}

/// Where a restored VM's disks come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskSource {
    /// A working copy of each disk the snapshot holds, in `dir` (kept) or,
    /// without one, in a temporary directory removed when the VM ends.
    Copy {
        /// Where the copies go.
        dir: Option<PathBuf>,
    },
    /// The images the snapshotted VM had open, if they did not change
    /// since (size, modification time, inode).
    Original,
}

/// How to restore a snapshot.
#[derive(Clone, Debug)]
pub struct RestoreOptions {
    /// How memory comes back.
    pub memory: MemoryMode,
    /// Where the disks come from.
    pub disks: DiskSource,
    /// The vsock device's host socket, if not the saved one.
    pub vsock_uds: Option<PathBuf>,
    /// Serve content, with these grants (none are saved in snapshots).
    pub content: Option<ContentConfig>,
}

/// A virtio device before the VM exists: opened, locked, bound, so bad
/// input is reported before KVM is touched.
struct PendingDevice {
    device: Box<dyn VirtioDevice>,
    backend: SlotBackend,
    name: String,
    saved: Option<MmioState>,
}

/// The guest CID of the vsock device `--content-store` adds without
/// `--vsock`.
pub const CONTENT_GUEST_CID: u64 = 3;

/// The content service `config` asks for, and the vsock host ports it
/// takes.
fn start_content(config: Option<&ContentConfig>) -> Result<(Option<Arc<ContentService>>, HostServices), BuildError> {
    let Some(config) = config else { return Ok((None, Vec::new())) };
    let service = Arc::new(ContentService::start(config)?);
    let services: HostServices = vec![(config.port, Arc::clone(&service) as Arc<dyn HostService>)];
    log::info!("serving content from {} on vsock port {}", config.store.display(), config.port);
    Ok((Some(service), services))
}

/// The devices `config` asks for, in slot order: disks (vda first), vsock,
/// entropy; and the content service.
fn open_devices(config: &VmConfig) -> Result<(Vec<PendingDevice>, Option<Arc<ContentService>>), BuildError> {
    let mut pending = Vec::new();
    for (index, disk) in config.disks.iter().enumerate() {
        let image = DiskImage::open(&disk.path, disk.read_only)?;
        let file = second_handle(&image)?;
        let block = Block::new(image, format!("stasis-disk{index}"));
        let backend = block_backend(&block, file);
        pending.push(PendingDevice { device: Box::new(block), backend, name: format!("virtio-blk{index}"), saved: None });
    }
    let (content, services) = start_content(config.content.as_ref())?;
    let vsock = match &config.vsock {
        Some(vsock) => {
            let device = Vsock::with_host(vsock.guest_cid, Some(&vsock.uds_path), services)?;
            // Absolute, so a restore from another directory finds the same place.
            Some((device, Some(absolute(&vsock.uds_path))))
        }
        // Content alone: a vsock device whose host side is the service.
        None if content.is_some() => Some((Vsock::with_host(CONTENT_GUEST_CID, None, services)?, None)),
        None => None,
    };
    if let Some((device, uds_path)) = vsock {
        let backend = SlotBackend::Vsock { uds_path };
        pending.push(PendingDevice { device: Box::new(device), backend, name: "virtio-vsock".into(), saved: None });
    }
    if config.rng {
        pending.push(PendingDevice { device: Box::new(Rng::new()), backend: SlotBackend::Rng, name: "virtio-rng".into(), saved: None });
    }
    Ok((pending, content))
}

/// A second handle on a disk image, for copying it into snapshots.
fn second_handle(image: &DiskImage) -> Result<File, BuildError> {
    image.file().try_clone().map_err(|e| BuildError::CopyDisk(image.path().into(), image.path().into(), e))
}

/// What snapshots and backups need of a disk device: a second handle on its
/// image and its changed blocks.
fn block_backend(block: &Block, file: File) -> SlotBackend {
    let image = block.image();
    SlotBackend::Block {
        file,
        path: absolute(image.path()),
        read_only: image.read_only(),
        changed: Arc::clone(block.changed()),
    }
}

/// `path` made absolute against the current directory (as given if that
/// fails), for what a snapshot records.
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// Where each pending device sits, for the ACPI tables.
fn acpi_slots(count: usize) -> Vec<acpi::VirtioMmioSlot> {
    (0..count)
        .map(|index| {
            let (base, gsi) = layout::virtio_slot(index);
            acpi::VirtioMmioSlot { base, size: layout::VIRTIO_MMIO_SIZE, gsi }
        })
        .collect()
}

/// Puts each device behind a virtio-mmio transport at its slot: interrupt
/// line through an irqfd, queue notifications through ioeventfds, and a
/// device thread. Restored devices take their saved transport state, so
/// this runs after the interrupt controllers are restored.
fn attach_devices(vm: &VmFd, mem: &GuestMemoryMmap, pending: Vec<PendingDevice>) -> Result<(MmioBus, Vec<VirtioSlot>), BuildError> {
    let mut bus = MmioBus::new();
    let mut slots = Vec::with_capacity(pending.len());
    for (index, p) in pending.into_iter().enumerate() {
        let (base, gsi) = layout::virtio_slot(index);
        let irq = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
        vm.register_irqfd(&irq, gsi).map_err(|e| VmError::RegisterIrqfd(gsi, e))?;
        let interrupt = Arc::new(Interrupt::new(Box::new(irq)));
        let transport = match &p.saved {
            None => MmioTransport::new(p.device, mem.clone(), interrupt),
            Some(state) => MmioTransport::restore(p.device, mem.clone(), interrupt, state),
        }
        .map_err(|e| BuildError::Mmio(index, e))?;
        for (queue, event) in transport.queue_events().iter().enumerate() {
            vm.register_ioevent(event, &IoEventAddress::Mmio(base + NOTIFY_OFFSET), queue as u32)
                .map_err(|e| BuildError::RegisterIoevent(index, e))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        bus.insert(transport.clone(), base, layout::VIRTIO_MMIO_SIZE)?;
        let thread = DeviceThread::spawn(p.name.clone(), transport.clone()).map_err(|e| BuildError::SpawnThread(p.name, e))?;
        slots.push(VirtioSlot { _thread: thread, transport, backend: p.backend });
    }
    Ok((bus, slots))
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
    let (pending, content) = open_devices(config)?;
    log::debug!("boot: files and devices opened");

    let kvm = vm::open_kvm(&vm::kvm_path())?;
    vm::check_vcpu_limit(&kvm, config.vcpus)?;
    let vm = vm::create_vm(&kvm)?;

    let mem = create_guest_memory(config.mem_size)?;
    vm::register_memory(&vm, &mem, false)?;

    log::debug!("boot: VM and memory created");
    let loaded = boot::load_kernel(&mem, &mut kernel)?;
    log::debug!("boot: kernel loaded");
    let initrd_range = match initrd.as_mut() {
        Some(image) => Some((boot::load_initrd(&mem, image, &loaded)?, image.size())),
        None => None,
    };
    boot::write_cmdline(&mem, &config.cmdline)?;
    let rsdp = acpi::write_tables(&mem, config.vcpus, &acpi_slots(pending.len()))?;
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
    let (mmio, virtio) = attach_devices(&vm, &mem, pending)?;
    log::debug!("boot: devices attached");

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
        mmio: Arc::new(mmio),
        content,
        virtio,
        _working_disks: None,
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
        dirty: DirtyLog::default(),
        vm_id: persist::new_id(),
        latest: None,
        pending: None,
        backup_tracking: None,
    })
}

/// The restored VM's devices in slot order, the working copies' directory
/// and the content service.
type ReopenedDevices = (Vec<PendingDevice>, Option<WorkingDisks>, Option<Arc<ContentService>>);

/// The saved virtio devices, opened again: disks from `options.disks`,
/// vsock on its saved (or the given) socket with the content service of
/// `options.content` (grants are never restored: they come from `options`).
fn reopen_devices(
    dir: &Path,
    snapshot: &persist::SnapshotDir,
    options: &RestoreOptions,
) -> Result<ReopenedDevices, BuildError> {
    let mut pending = Vec::new();
    let mut working: Option<WorkingDisks> = None;
    let has_vsock = snapshot
        .state
        .virtio
        .iter()
        .any(|d| matches!(d.backend, VirtioBackend::Vsock { .. } | VirtioBackend::VsockWithoutSocket));
    if options.content.is_some() && !has_vsock {
        return Err(BuildError::ContentWithoutVsock);
    }
    let (content, services) = start_content(options.content.as_ref())?;
    // Moved into the vsock device (there is at most one).
    let mut services = Some(services);
    for (index, saved) in snapshot.state.virtio.iter().enumerate() {
        let mismatch = |what: &str| BuildError::BadDevice(index, what.to_string());
        let (device, backend, name): (Box<dyn VirtioDevice>, SlotBackend, String) = match (&saved.backend, &saved.state.device) {
            (VirtioBackend::Block { file, original, original_identity, read_only }, DeviceState::Block(state)) => {
                let disk = pending.iter().filter(|p: &&PendingDevice| matches!(p.backend, SlotBackend::Block { .. })).count();
                let path = match &options.disks {
                    DiskSource::Original => {
                        let now = FileIdentity::of(original).map_err(|e| BuildError::CopyDisk(original.clone(), original.clone(), e))?;
                        if &now != original_identity {
                            return Err(BuildError::DiskChanged(original.clone()));
                        }
                        original.clone()
                    }
                    DiskSource::Copy { dir: keep } => {
                        let source = snapshot.file(dir, file)?;
                        let work = match &mut working {
                            Some(w) => w,
                            None => working.insert(WorkingDisks::create(keep.as_deref(), dir).map_err(|(p, e)| BuildError::DiskDir(p, e))?),
                        };
                        let target = work.dir().join(format!("disk{disk}.img"));
                        if file.ends_with(".ckpt") {
                            // A backup's disk: a checkpoint layered on the
                            // backups before it.
                            rebuild_disk(dir, snapshot, file, &target)?;
                        } else {
                            let src = File::open(&source).map_err(|e| BuildError::CopyDisk(source.clone(), target.clone(), e))?;
                            copy_sparse(&src, &target).map_err(|e| BuildError::CopyDisk(source.clone(), target.clone(), e))?;
                        }
                        target
                    }
                };
                let image = DiskImage::open(&path, *read_only)?;
                let file = second_handle(&image)?;
                let block = Block::from_state(image, state).map_err(|e| BuildError::Block(path.display().to_string(), e))?;
                let backend = block_backend(&block, file);
                (Box::new(block), backend, format!("virtio-blk{disk}"))
            }
            (VirtioBackend::Vsock { .. } | VirtioBackend::VsockWithoutSocket, DeviceState::Vsock(state)) => {
                let saved_path = match &saved.backend {
                    VirtioBackend::Vsock { uds_path } => Some(uds_path.clone()),
                    _ => None,
                };
                let uds_path = options.vsock_uds.clone().or(saved_path);
                let services = services.take().ok_or_else(|| mismatch("a second vsock device"))?;
                let device = Vsock::from_state_with_host(state, uds_path.as_deref(), services)?;
                (Box::new(device), SlotBackend::Vsock { uds_path }, "virtio-vsock".into())
            }
            (VirtioBackend::Rng, DeviceState::Rng) => (Box::new(Rng::new()), SlotBackend::Rng, "virtio-rng".into()),
            _ => return Err(mismatch("its backend and its state are of different kinds")),
        };
        pending.push(PendingDevice { device, backend, name, saved: Some(saved.state.transport.clone()) });
    }
    if let Some(w) = &working {
        w.announce();
    }
    Ok((pending, working, content))
}

/// Writes a backup's disk `file` (a disk checkpoint, layered on the same
/// file of the backups the chain of `dir` builds on) into a new image at
/// `target`.
fn rebuild_disk(dir: &Path, snapshot: &persist::SnapshotDir, file: &str, target: &Path) -> Result<(), BuildError> {
    let chain = persist::snapshot_chain(dir, &snapshot.manifest, &snapshot.memory_path)?;
    let mut paths = Vec::with_capacity(chain.len());
    for layer in &chain {
        paths.push(snapshot.file(&layer.dir, file)?);
    }
    let fail = |msg: String| BuildError::CopyDisk(paths[0].clone(), target.to_path_buf(), std::io::Error::other(msg));
    let reader = Reader::open_chain(&paths, ReaderOptions::default()).map_err(|e| fail(error_chain(&e)))?;
    let written = crate::backup::disk::rebuild(&reader, target).map_err(fail)?;
    log::info!("rebuilt disk {} from {} backup layer(s): {written} bytes of data", target.display(), paths.len());
    Ok(())
}

/// Logs (at debug level) that a restore reached `what`, with the time
/// since its process started.
pub fn restore_phase(process_start: Instant, what: &str) {
    log::debug!("restore: {what} at {:.1} ms", process_start.elapsed().as_secs_f64() * 1000.0);
}

/// Rebuilds a microVM from the snapshot in `dir`, with its vCPUs, in-kernel
/// devices and emulated devices in their saved state, memory loaded and
/// disks opened as `options` say. `process_start` is when this process
/// started, for the restore latency figure.
pub fn build_microvm_from_snapshot(
    dir: &Path,
    options: &RestoreOptions,
    process_start: Instant,
) -> Result<Vmm, BuildError> {
    let memory = options.memory;
    let phase = |what: &str| restore_phase(process_start, what);
    // Everything from the files is read and checked before KVM is touched.
    phase("restore started");
    // A backup in a store: a merge killed half way is finished first.
    if let Some(store) = dir.parent().filter(|s| s.join(crate::backup::STORE_FILE).is_file()) {
        if let Err(e) = crate::backup::Store::open(store) {
            log::warn!("{}", crate::error_chain(&e));
        }
    }
    let snapshot = persist::open_snapshot(dir)?;
    phase("snapshot state read");
    // Faults touch scattered blocks: each reads only its own block's stored
    // bytes, not the whole storage block around it (the checkpoint
    // benchmark: a warm 64 KiB block read is ~30 us alone, ~170 us when it
    // misses the storage-block cache and reads the 1 MiB around it).
    let reader_options = match memory {
        MemoryMode::Lazy { .. } => ReaderOptions { cached_storage_blocks: 0, ..Default::default() },
        MemoryMode::Eager => ReaderOptions::default(),
    };
    // An incremental snapshot: its memory is the chain of it and its
    // parents, newest first.
    let chain = persist::snapshot_chain(dir, &snapshot.manifest, &snapshot.memory_path)?;
    let layers: Vec<PathBuf> = chain.iter().map(|layer| layer.memory_path.clone()).collect();
    let reader = Reader::open_chain(&layers, reader_options).map_err(BuildError::OpenCheckpoint)?;
    let index_crc = reader.index_crc();
    phase("checkpoint opened");
    // Snapshots from before VM ids get one now.
    let vm_id = match snapshot.manifest.vm_id.as_str() {
        "" => persist::new_id(),
        id => id.to_owned(),
    };
    let latest = LatestSnapshot {
        id: snapshot.manifest.id.clone(),
        dir: dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf()),
        index_crc,
    };
    check_checkpoint_layout(&reader, &snapshot.state.machine)?;
    let (pending, working_disks, content) = reopen_devices(dir, &snapshot, options)?;
    let state: SnapshotState = snapshot.state;
    phase("snapshot files read and checked, devices opened");

    let mem = create_guest_memory(state.machine.mem_size)?;
    let plan = match memory {
        MemoryMode::Lazy { working_set, working_set_window, .. } => {
            let record = WorkingSetPlan::Record { window: working_set_window, dir: dir.to_path_buf() };
            match working_set {
                WorkingSetMode::Off => WorkingSetPlan::Off,
                WorkingSetMode::Record => record,
                WorkingSetMode::Auto => match working_set::load(dir, &reader) {
                    Ok(Some(set)) => WorkingSetPlan::Load { set },
                    Ok(None) => record,
                    Err(e) => {
                        log::warn!("ignoring the working set: {}; recording a new one", error_chain(&e));
                        record
                    }
                },
            }
        }
        MemoryMode::Eager => WorkingSetPlan::Off,
    };
    // A working set loaded before the vCPUs start goes straight into guest
    // memory while KVM is set up beside it, before the memory is
    // registered with userfaultfd (uffd::preload).
    let (preload_set, plan) = match (memory, plan) {
        (MemoryMode::Lazy { working_set_before: true, .. }, WorkingSetPlan::Load { set }) => (Some(set), None),
        (_, plan) => (None, Some(plan)),
    };
    let (kvm, vm, plan) = std::thread::scope(|s| -> Result<_, BuildError> {
        let (mem, reader) = (&mem, &reader);
        let preload = preload_set
            .map(|set| {
                std::thread::Builder::new()
                    .name("ws-preload".into())
                    .spawn_scoped(s, move || uffd::preload(mem, reader, &set).map(|took| (set, took)))
            })
            .transpose()
            .map_err(UffdError::Spawn)?;
        let kvm_setup = (|| -> Result<_, BuildError> {
            let kvm = vm::open_kvm(&vm::kvm_path())?;
            vm::check_vcpu_limit(&kvm, state.machine.vcpus)?;
            vcpu::check_xsave_size(&kvm)?;
            let vm = vm::create_vm(&kvm)?;
            vm::register_memory(&vm, mem, false)?;
            Ok((kvm, vm))
        })();
        // Joined before any error returns: the preload writes guest memory.
        let plan = match (preload, plan) {
            (Some(thread), _) => {
                let (set, took) = thread
                    .join()
                    .map_err(|_| UffdError::Load("the working set's preload thread panicked".into()))??;
                WorkingSetPlan::Preloaded { set, took }
            }
            (None, plan) => plan.unwrap_or(WorkingSetPlan::Off),
        };
        let (kvm, vm) = kvm_setup?;
        Ok((kvm, vm, plan))
    })?;
    phase("VM and memory created");
    // Changes are tracked from the restored state on: the snapshot is
    // this VM's latest, which an incremental snapshot may build on.
    let mut dirty = DirtyLog::default();

    let (events_tx, events_rx) = channel::<VmEvent>();
    // Memory before any vCPU can run. Lazy: registered with userfaultfd and
    // served by the handler thread from here on.
    let (lazy, mode_name) = match memory {
        MemoryMode::Lazy { prefetch, .. } => {
            let preloaded = matches!(plan, WorkingSetPlan::Preloaded { .. });
            let options = LazyOptions { prefetch, working_set: plan };
            let lazy = LazyMemory::start(&mem, Arc::new(reader), options, events_tx.clone())?;
            if preloaded {
                uffd::allow_huge_pages(&mem);
            }
            (Some(lazy), "lazy")
        }
        MemoryMode::Eager => {
            uffd::load_eager(&mem, &reader)?;
            (None, "eager")
        }
    };
    dirty.start(&vm, &mem)?;
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
    let (mmio, virtio) = attach_devices(&vm, &mem, pending)?;
    phase("devices restored");

    // The guest was stopped for as long as the snapshot sat on disk; tell
    // KVM so the guest's watchdogs do not take it for a lockup.
    for vcpu in &vcpus {
        vcpu.notify_paused();
    }
    // A working set loaded "before" is in guest memory already
    // (uffd::preload, above); one loaded "during" comes in beside the vCPUs.
    let msr_indices = Arc::new(vcpu::msrs_to_save(&kvm)?);
    Ok(Vmm {
        kvm,
        vm,
        mem,
        machine: state.machine,
        devices,
        mmio: Arc::new(mmio),
        content,
        virtio,
        _working_disks: working_disks,
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
        dirty,
        vm_id,
        latest: Some(latest),
        pending: None,
        backup_tracking: None,
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
    bus.insert(serial.clone(), ports::COM1.into(), 8)?;
    bus.insert(Arc::new(Mutex::new(I8042::new(events.clone()))), ports::I8042_DATA.into(), 5)?;
    bus.insert(Arc::new(Mutex::new(AcpiPm::new(events.clone()))), ports::ACPI_SLEEP_CONTROL.into(), 3)?;
    bus.insert(cmos.clone(), ports::CMOS.into(), 2)?;
    Ok(Devices { bus: Arc::new(bus), serial, cmos })
}
