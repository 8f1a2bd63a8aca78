//! Building a microVM: one linear recipe per entry point,
//! [`build_microvm_for_boot`] and [`build_microvm_from_snapshot`], both
//! ending in a [`Vmm`] (see [`crate::vmm`]) whose [`Vmm::run`] serves the
//! VM until it ends.

use std::path::Path;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::acpi::{self, AcpiError};
use crate::boot::{self, BootError, BootParamsInput, InitrdImage, KernelImage};
use crate::checkpoint::{self, Reader, ReaderOptions};
use crate::config::VmConfig;
use crate::devices::acpi_pm::AcpiPm;
use crate::devices::bus::{BusError, PioBus};
use crate::devices::cmos::{Cmos, CmosStateError, HostClock};
use crate::devices::legacy::{I8042, IrqTrigger, SerialDevice, SerialStateError};
use crate::layout::{self, ports};
use crate::persist::{self, MachineConfig, PersistError, SnapshotState};
use crate::restore::uffd::{self, LazyMemory, UffdError};
use crate::vstate::memory::{create_guest_memory, MemoryError};
use crate::vstate::vcpu::{self, supported_cpuid, Vcpu, VcpuError};
use crate::vstate::vm::{self, VmError, VmStateError};
use crate::vmm::{Console, Devices, VmEvent, Vmm};

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
    /// The serial port's saved state.
    #[error(transparent)]
    SerialState(#[from] SerialStateError),
    /// The RTC's saved state.
    #[error(transparent)]
    CmosState(#[from] CmosStateError),
    /// An eventfd for an interrupt line.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
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
    bus.insert(serial.clone(), ports::COM1.into(), 8)?;
    bus.insert(Arc::new(Mutex::new(I8042::new(events.clone()))), ports::I8042_DATA.into(), 5)?;
    bus.insert(Arc::new(Mutex::new(AcpiPm::new(events.clone()))), ports::ACPI_SLEEP_CONTROL.into(), 3)?;
    bus.insert(cmos.clone(), ports::CMOS.into(), 2)?;
    Ok(Devices { bus: Arc::new(bus), serial, cmos })
}
