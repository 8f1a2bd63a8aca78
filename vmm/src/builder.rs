//! Building a microVM and running it: one linear recipe per entry point.

use std::io::Read;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::acpi::{self, AcpiError};
use crate::boot::{self, BootError, BootParamsInput, InitrdImage, KernelImage};
use crate::config::VmConfig;
use crate::devices::acpi_pm::AcpiPm;
use crate::devices::bus::{lock, BusError, PioBus};
use crate::devices::cmos::{Cmos, HostClock};
use crate::devices::legacy::{I8042, IrqTrigger, SerialDevice};
use crate::devices::PowerEvent;
use crate::layout::ports;
use crate::terminal::{RawTerminal, TerminalError};
use crate::vstate::memory::{create_guest_memory, MemoryError};
use crate::vstate::vcpu::{supported_cpuid, Vcpu, VcpuError, VcpuEvent, VcpuStop};
use crate::vstate::vm::{self, VmError};

/// Errors while building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Kernel, initrd or command line.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// KVM or the VM.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// A vCPU's setup.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The port I/O bus.
    #[error("cannot place a device on the I/O bus")]
    Bus(#[from] BusError),
    /// The console terminal.
    #[error(transparent)]
    Terminal(#[from] TerminalError),
    /// An eventfd for an interrupt line.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// A thread could not be started.
    #[error("cannot start thread {0}")]
    SpawnThread(String, #[source] std::io::Error),
    /// A vCPU stopped with an error while the guest ran.
    #[error("{0}")]
    GuestFailed(String),
}

/// How a guest ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest powered off.
    PowerOff,
    /// The guest rebooted; a microVM ends on reboot.
    Reset,
}

/// Everything that can end the VM, gathered on one channel.
#[derive(Debug)]
pub enum VmEvent {
    /// A device saw a power-off or reset.
    Power(PowerEvent),
    /// A vCPU stopped.
    Vcpu(VcpuEvent),
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

/// Builds a microVM from `config`, boots the kernel and runs it with its
/// serial console on this process's stdin and stdout, until the guest powers
/// off, resets or fails.
pub fn boot_and_run(config: &VmConfig) -> Result<GuestExit, BuildError> {
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
        Some(image) => {
            let addr = boot::load_initrd(&mem, image, &loaded)?;
            Some((addr, image.size()))
        }
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
    let (bus, serial) = build_devices(&vm, &events_tx)?;

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

    // Raw mode from here on; the guard restores the terminal when this
    // function returns, however it returns.
    let _terminal = RawTerminal::enter()?;
    spawn_stdin_reader(serial)?;

    for (index, vcpu) in vcpus.into_iter().enumerate() {
        let (bus, mem, tx) = (bus.clone(), mem.clone(), events_tx.clone());
        let name = format!("vcpu{index}");
        thread::Builder::new()
            .name(name.clone())
            .spawn(move || vcpu.run(bus, mem, tx))
            .map_err(|e| BuildError::SpawnThread(name, e))?;
    }
    wait_for_end(&events_rx)
}

type Console = SerialDevice<IrqTrigger, std::io::Stdout>;

/// COM1, the i8042, the ACPI power registers and the CMOS RTC on a port
/// I/O bus.
fn build_devices(
    vm: &kvm_ioctls::VmFd,
    events: &Sender<VmEvent>,
) -> Result<(Arc<PioBus>, Arc<Mutex<Console>>), BuildError> {
    let serial_irq = EventFd::new(EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm.register_irqfd(&serial_irq, ports::COM1_IRQ)
        .map_err(|e| VmError::RegisterIrqfd(ports::COM1_IRQ, e))?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(IrqTrigger(serial_irq), std::io::stdout())));

    let mut bus = PioBus::new();
    bus.insert(serial.clone(), ports::COM1, 8)?;
    bus.insert(Arc::new(Mutex::new(I8042::new(events.clone()))), ports::I8042_DATA, 5)?;
    bus.insert(Arc::new(Mutex::new(AcpiPm::new(events.clone()))), ports::ACPI_SLEEP_CONTROL, 3)?;
    bus.insert(Arc::new(Mutex::new(Cmos::new(HostClock))), ports::CMOS, 2)?;
    Ok((Arc::new(bus), serial))
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
                        thread::sleep(std::time::Duration::from_millis(10));
                    }
                }
            }
        })
        .map(|_| ())
        .map_err(|e| BuildError::SpawnThread(name, e))
}

/// Blocks until the first event that ends the VM.
fn wait_for_end(events: &Receiver<VmEvent>) -> Result<GuestExit, BuildError> {
    let event = events
        .recv()
        .map_err(|_| BuildError::GuestFailed("every vCPU and device went away".into()))?;
    match event {
        VmEvent::Power(PowerEvent::PowerOff)
        | VmEvent::Vcpu(VcpuEvent { stop: VcpuStop::Power(PowerEvent::PowerOff), .. }) => {
            Ok(GuestExit::PowerOff)
        }
        VmEvent::Power(PowerEvent::Reset)
        | VmEvent::Vcpu(VcpuEvent { stop: VcpuStop::Power(PowerEvent::Reset), .. }) => {
            Ok(GuestExit::Reset)
        }
        VmEvent::Vcpu(VcpuEvent { stop: VcpuStop::Failed(msg), .. }) => {
            Err(BuildError::GuestFailed(msg))
        }
    }
}
