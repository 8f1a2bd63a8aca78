//! The KVM VM: opening /dev/kvm, the in-kernel interrupt controllers and
//! PIT, and registering guest memory.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::{FromRawFd, IntoRawFd};
use std::path::Path;

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use crate::vstate::memory::GuestMemoryMmap;

use crate::layout;

/// Where the KVM device lives, unless `STASIS_KVM_DEVICE` names another
/// path (for hosts that put it elsewhere, and for tests).
pub const KVM_PATH: &str = "/dev/kvm";

/// The KVM device path in force.
pub fn kvm_path() -> std::path::PathBuf {
    std::env::var_os("STASIS_KVM_DEVICE")
        .filter(|p| !p.is_empty())
        .map_or_else(|| KVM_PATH.into(), Into::into)
}

/// Errors while opening KVM and setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm is missing.
    #[error("{0} does not exist: this host has no KVM (load kvm_intel or kvm_amd, or run inside scripts/testhost)")]
    NoKvm(String),
    /// /dev/kvm exists but cannot be opened by this user.
    #[error("no permission to open {0} ({1}): add this user to that group (usermod -aG GROUP USER, then log in again) or run as root")]
    KvmPermission(String, String),
    /// Opening /dev/kvm failed otherwise.
    #[error("cannot open {0}")]
    OpenKvm(String, #[source] std::io::Error),
    /// The device does not answer KVM ioctls.
    #[error("{0} is not a KVM device")]
    NotKvm(String),
    /// The KVM API version is not the stable one.
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    /// A capability we depend on is missing.
    #[error("KVM lacks a required capability: {0:?}")]
    MissingCap(Cap),
    /// More vCPUs than this KVM allows.
    #[error("{requested} vCPUs requested, but this host's KVM allows at most {max}")]
    TooManyVcpus {
        /// What was asked.
        requested: u8,
        /// KVM's limit.
        max: usize,
    },
    /// KVM_CREATE_VM failed.
    #[error("cannot create the VM")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// KVM_SET_TSS_ADDR failed.
    #[error("cannot set the TSS address")]
    SetTssAddress(#[source] kvm_ioctls::Error),
    /// KVM_SET_IDENTITY_MAP_ADDR failed.
    #[error("cannot set the identity map address")]
    SetIdentityMapAddress(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_IRQCHIP failed.
    #[error("cannot create the in-kernel interrupt controllers")]
    CreateIrqChip(#[source] kvm_ioctls::Error),
    /// KVM_CREATE_PIT2 failed.
    #[error("cannot create the in-kernel PIT")]
    CreatePit(#[source] kvm_ioctls::Error),
    /// KVM_SET_USER_MEMORY_REGION failed.
    #[error("cannot register guest memory slot {0} with KVM")]
    SetUserMemoryRegion(u32, #[source] kvm_ioctls::Error),
    /// KVM_IRQFD failed.
    #[error("cannot connect interrupt line {0}")]
    RegisterIrqfd(u32, #[source] kvm_ioctls::Error),
}

/// "group kvm, mode 0660": who may open `path`, for the permission error.
fn owner_and_mode(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(path) else { return "its owner and mode unknown".into() };
    let gid = meta.gid();
    let group = std::fs::read_to_string("/etc/group")
        .ok()
        .and_then(|groups| {
            groups.lines().find_map(|l| {
                let mut fields = l.split(':');
                let name = fields.next()?;
                (fields.nth(1)?.parse::<u32>().ok()? == gid).then(|| name.to_string())
            })
        })
        .unwrap_or_else(|| gid.to_string());
    format!("group {group}, mode {:04o}", meta.mode() & 0o7777)
}

/// Opens the KVM device at `path` and checks what we need of it.
pub fn open_kvm(path: &Path) -> Result<Kvm, VmError> {
    let name = path.display().to_string();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => VmError::NoKvm(name.clone()),
            std::io::ErrorKind::PermissionDenied => VmError::KvmPermission(name.clone(), owner_and_mode(path)),
            _ => VmError::OpenKvm(name.clone(), e),
        })?;
    // SAFETY: the fd was just opened by us and is owned by nothing else;
    // Kvm takes ownership of it.
    let kvm = unsafe { Kvm::from_raw_fd(file.into_raw_fd()) };
    let version = kvm.get_api_version();
    if version < 0 {
        return Err(VmError::NotKvm(name));
    }
    if version != kvm_bindings::KVM_API_VERSION as i32 {
        return Err(VmError::ApiVersion(version));
    }
    for cap in [Cap::Irqchip, Cap::Pit2, Cap::UserMemory, Cap::SetTssAddr, Cap::ExtCpuid, Cap::Irqfd] {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap(cap));
        }
    }
    Ok(kvm)
}

/// Checks the vCPU count against KVM's limit.
pub fn check_vcpu_limit(kvm: &Kvm, vcpus: u8) -> Result<(), VmError> {
    let max = kvm.get_max_vcpus();
    if usize::from(vcpus) > max {
        return Err(VmError::TooManyVcpus { requested: vcpus, max });
    }
    Ok(())
}

/// Creates the VM with its in-kernel LAPICs, IOAPIC, PIC and PIT.
pub fn create_vm(kvm: &Kvm) -> Result<VmFd, VmError> {
    let vm = kvm.create_vm().map_err(VmError::CreateVm)?;
    // Both addresses sit in the MMIO gap, where no RAM is; Intel needs them
    // for real-mode emulation.
    vm.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
        .map_err(VmError::SetTssAddress)?;
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
        .map_err(VmError::SetIdentityMapAddress)?;
    // The irqchip before any vCPU: vCPUs get an in-kernel LAPIC only if it
    // exists when they are created.
    vm.create_irq_chip().map_err(VmError::CreateIrqChip)?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(VmError::CreatePit)?;
    Ok(vm)
}

/// Registers every region of `mem` as a KVM memory slot (slot N is region
/// N), with KVM's dirty page log on or off. Called again on registered
/// slots, it only switches the log: KVM keeps the mappings.
pub fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap, log_dirty: bool) -> Result<(), VmError> {
    for (slot, region) in mem.iter().enumerate() {
        let slot = slot as u32;
        let host_addr = mem
            .get_host_address(region.start_addr())
            .map_err(|_| VmError::SetUserMemoryRegion(slot, kvm_ioctls::Error::new(libc::EFAULT)))?;
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host_addr as u64,
            flags: if log_dirty { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
        };
        // SAFETY: the host range belongs to `mem`, which the caller keeps
        // alive for as long as the VM runs.
        unsafe { vm.set_user_memory_region(region) }
            .map_err(|e| VmError::SetUserMemoryRegion(slot, e))?;
    }
    Ok(())
}

/// The in-kernel devices' state, as saved in a snapshot.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct VmState {
    /// The i8254 PIT.
    pub pit: kvm_bindings::kvm_pit_state2,
    /// kvmclock's time base.
    pub clock: kvm_bindings::kvm_clock_data,
    /// PIC master, PIC slave and IOAPIC, in that order.
    pub irqchips: Vec<kvm_bindings::kvm_irqchip>,
}

/// The chip IDs of KVM_GET_IRQCHIP: PIC master, PIC slave, IOAPIC.
const IRQCHIP_IDS: [u32; 3] = [
    kvm_bindings::KVM_IRQCHIP_PIC_MASTER,
    kvm_bindings::KVM_IRQCHIP_PIC_SLAVE,
    kvm_bindings::KVM_IRQCHIP_IOAPIC,
];

/// Errors while saving or restoring the VM's in-kernel state.
#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    /// A KVM_GET_* failed.
    #[error("cannot read the VM's {0}")]
    Get(&'static str, #[source] kvm_ioctls::Error),
    /// A KVM_SET_* failed.
    #[error("cannot restore the VM's {0}")]
    Set(&'static str, #[source] kvm_ioctls::Error),
    /// The saved state lacks an interrupt controller.
    #[error("the saved VM state holds {0} interrupt controllers, not 3")]
    IrqchipCount(usize),
}

/// Reads PIT, clock and interrupt controllers; the vCPUs must be paused.
pub fn save_vm_state(vm: &VmFd) -> Result<VmState, VmStateError> {
    let pit = vm.get_pit2().map_err(|e| VmStateError::Get("PIT", e))?;
    let clock = vm.get_clock().map_err(|e| VmStateError::Get("clock", e))?;
    let mut irqchips = Vec::with_capacity(IRQCHIP_IDS.len());
    for chip_id in IRQCHIP_IDS {
        let mut chip = kvm_bindings::kvm_irqchip { chip_id, ..Default::default() };
        vm.get_irqchip(&mut chip).map_err(|e| VmStateError::Get("interrupt controller", e))?;
        irqchips.push(chip);
    }
    Ok(VmState { pit, clock, irqchips })
}

/// Puts PIT, clock and interrupt controllers back.
pub fn restore_vm_state(vm: &VmFd, state: &VmState) -> Result<(), VmStateError> {
    if state.irqchips.len() != IRQCHIP_IDS.len() {
        return Err(VmStateError::IrqchipCount(state.irqchips.len()));
    }
    vm.set_pit2(&state.pit).map_err(|e| VmStateError::Set("PIT", e))?;
    // KVM_SET_CLOCK takes no flags but KVM_CLOCK_REALTIME; the saved ones
    // describe the old host's clock.
    let clock = kvm_bindings::kvm_clock_data { flags: 0, ..state.clock };
    vm.set_clock(&clock).map_err(|e| VmStateError::Set("clock", e))?;
    for chip in &state.irqchips {
        vm.set_irqchip(chip).map_err(|e| VmStateError::Set("interrupt controller", e))?;
    }
    Ok(())
}
