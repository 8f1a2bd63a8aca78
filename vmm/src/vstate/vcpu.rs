//! A vCPU: its boot-time configuration (CPUID, MSRs, registers, LAPIC) and
//! the loop that runs it and serves its port I/O exits.

use std::os::unix::thread::JoinHandleExt;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_segment, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
    KVM_MAX_CPUID_ENTRIES, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use serde::{Deserialize, Serialize};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};
use crate::vstate::memory::GuestMemoryMmap;

use super::cpuid::filter_cpuid;
use crate::devices::bus::{MmioBus, PioBus};
use crate::devices::PowerEvent;
use crate::layout;

/// Model-specific registers set at boot.
mod msr {
    pub const IA32_TSC: u32 = 0x10;
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    pub const IA32_MTRR_DEF_TYPE: u32 = 0x2ff;
    pub const STAR: u32 = 0xc000_0081;
    pub const LSTAR: u32 = 0xc000_0082;
    pub const CSTAR: u32 = 0xc000_0083;
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    /// MISC_ENABLE: fast string operations.
    pub const MISC_ENABLE_FAST_STRING: u64 = 1;
    /// MTRRdefType: MTRRs enabled, default type write-back.
    pub const MTRR_ENABLE_WRITE_BACK: u64 = (1 << 11) | 6;
}

/// Control register and EFER bits for 64-bit mode.
const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// LAPIC register offsets and the delivery modes put in LINT0/LINT1.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Errors while creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM_CREATE_VCPU failed.
    #[error("cannot create vCPU {0}")]
    CreateVcpu(u8, #[source] kvm_ioctls::Error),
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("cannot read the CPUID KVM supports")]
    GetSupportedCpuid(#[source] kvm_ioctls::Error),
    /// Building the CPUID table failed.
    #[error("cannot build the CPUID table")]
    BuildCpuid,
    /// KVM_SET_CPUID2 failed.
    #[error("cannot set CPUID of vCPU {0}")]
    SetCpuid(u8, #[source] kvm_ioctls::Error),
    /// KVM_SET_MSRS failed or set fewer than asked.
    #[error("cannot set boot MSRs of vCPU {0}")]
    SetMsrs(u8, #[source] kvm_ioctls::Error),
    /// KVM_SET_MSRS stopped early at an MSR KVM refused.
    #[error("KVM set only {set} of {wanted} boot MSRs of vCPU {index}")]
    SetMsrsPartial {
        /// vCPU.
        index: u8,
        /// How many went in.
        set: usize,
        /// How many were asked.
        wanted: usize,
    },
    /// Building the MSR list failed.
    #[error("cannot build the MSR list")]
    BuildMsrs,
    /// KVM_SET_REGS failed.
    #[error("cannot set general registers of vCPU {0}")]
    SetRegs(u8, #[source] kvm_ioctls::Error),
    /// KVM_GET_SREGS failed.
    #[error("cannot read special registers of vCPU {0}")]
    GetSregs(u8, #[source] kvm_ioctls::Error),
    /// KVM_SET_SREGS failed.
    #[error("cannot set special registers of vCPU {0}")]
    SetSregs(u8, #[source] kvm_ioctls::Error),
    /// KVM_SET_FPU failed.
    #[error("cannot set FPU state of vCPU {0}")]
    SetFpu(u8, #[source] kvm_ioctls::Error),
    /// KVM_GET_LAPIC failed.
    #[error("cannot read the local APIC of vCPU {0}")]
    GetLapic(u8, #[source] kvm_ioctls::Error),
    /// KVM_SET_LAPIC failed.
    #[error("cannot set the local APIC of vCPU {0}")]
    SetLapic(u8, #[source] kvm_ioctls::Error),
    /// Reading one part of the vCPU state failed.
    #[error("cannot read the {what} of vCPU {index}")]
    GetState {
        /// vCPU.
        index: u8,
        /// Which part.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Writing one part of the vCPU state failed.
    #[error("cannot restore the {what} of vCPU {index}")]
    SetState {
        /// vCPU.
        index: u8,
        /// Which part.
        what: &'static str,
        /// Why.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM refused an MSR while restoring.
    #[error("KVM refused MSR {msr:#x} ({set} of {wanted} MSRs restored) on vCPU {index}")]
    RestoreMsr {
        /// vCPU.
        index: u8,
        /// The MSR KVM stopped at.
        msr: u32,
        /// How many went in.
        set: usize,
        /// How many were asked.
        wanted: usize,
    },
    /// The vCPU thread is gone (its guest failed or the VM is ending).
    #[error("vCPU {0} is no longer running")]
    ThreadGone(u8),
    /// The vCPU thread did not answer in time.
    #[error("vCPU {0} did not pause within {1:?}")]
    PauseTimeout(u8, Duration),
    /// The guest's XSAVE area is larger than KVM_GET_XSAVE carries.
    #[error("this host's XSAVE area is {0} bytes; only 4096-byte areas can be saved")]
    XsaveTooLarge(usize),
}

/// Everything KVM holds for one vCPU, as saved in a snapshot.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (also its APIC ID).
    pub index: u8,
    /// Multiprocessing state (running, halted, waiting for SIPI).
    pub mp_state: kvm_mp_state,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// TSC frequency in kHz.
    pub tsc_khz: u32,
    /// CPUID as KVM holds it now.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every MSR KVM lets us read, in ascending index order.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts and NMIs.
    pub events: kvm_vcpu_events,
}

/// Requests the VMM sends to a vCPU thread.
#[derive(Debug)]
enum VcpuRequest {
    /// Leave KVM_RUN and wait.
    Pause,
    /// Run again.
    Resume,
    /// Read the state (only while paused).
    SaveState,
}

/// A vCPU thread's answers.
#[derive(Debug)]
enum VcpuResponse {
    Paused,
    Resumed,
    State(Box<Result<VcpuState, VcpuError>>),
}

/// Signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn noop_signal_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the no-op handler for the kick signal; its only effect is to
/// make KVM_RUN return EINTR.
pub fn register_kick_signal() -> Result<(), std::io::Error> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), noop_signal_handler)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// How long to wait for a vCPU to pause or answer.
const VCPU_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a running vCPU is kicked until it says it paused (a kick that
/// lands just before KVM_RUN is entered is lost).
const KICK_INTERVAL: Duration = Duration::from_millis(5);

/// The VMM's side of a running vCPU thread.
pub struct VcpuHandle {
    index: u8,
    thread: JoinHandle<()>,
    requests: Sender<VcpuRequest>,
    responses: Receiver<VcpuResponse>,
}

impl VcpuHandle {
    /// The vCPU's index.
    pub fn index(&self) -> u8 {
        self.index
    }

    fn kick(&self) {
        // SAFETY: the pthread_t belongs to a thread we spawned and have not
        // joined, so it is valid; the signal has a no-op handler.
        unsafe { libc::pthread_kill(self.thread.as_pthread_t(), kick_signal()) };
    }

    /// Takes the vCPU out of KVM_RUN and waits until it is parked.
    pub fn pause(&self) -> Result<(), VcpuError> {
        let gone = || VcpuError::ThreadGone(self.index);
        self.requests.send(VcpuRequest::Pause).map_err(|_| gone())?;
        let deadline = std::time::Instant::now() + VCPU_ANSWER_TIMEOUT;
        loop {
            self.kick();
            match self.responses.recv_timeout(KICK_INTERVAL) {
                Ok(VcpuResponse::Paused) => return Ok(()),
                Ok(other) => log::warn!("vCPU {} answered {other:?} to pause", self.index),
                Err(RecvTimeoutError::Timeout) if std::time::Instant::now() < deadline => {}
                Err(RecvTimeoutError::Timeout) => {
                    return Err(VcpuError::PauseTimeout(self.index, VCPU_ANSWER_TIMEOUT))
                }
                Err(RecvTimeoutError::Disconnected) => return Err(gone()),
            }
        }
    }

    /// Reads the paused vCPU's state.
    pub fn save_state(&self) -> Result<VcpuState, VcpuError> {
        let gone = || VcpuError::ThreadGone(self.index);
        self.requests.send(VcpuRequest::SaveState).map_err(|_| gone())?;
        match self.responses.recv_timeout(VCPU_ANSWER_TIMEOUT) {
            Ok(VcpuResponse::State(state)) => *state,
            _ => Err(gone()),
        }
    }

    /// Lets the paused vCPU run again.
    pub fn resume(&self) -> Result<(), VcpuError> {
        let gone = || VcpuError::ThreadGone(self.index);
        self.requests.send(VcpuRequest::Resume).map_err(|_| gone())?;
        match self.responses.recv_timeout(VCPU_ANSWER_TIMEOUT) {
            Ok(VcpuResponse::Resumed) => Ok(()),
            _ => Err(gone()),
        }
    }
}

/// Why a vCPU stopped running.
#[derive(Debug)]
pub enum VcpuStop {
    /// The guest asked for power-off or reset through KVM.
    Power(PowerEvent),
    /// The vCPU cannot go on; the text says why, for the user.
    Failed(String),
}

/// A vCPU's report to the VMM.
#[derive(Debug)]
pub struct VcpuEvent {
    /// Which vCPU.
    pub index: u8,
    /// What happened.
    pub stop: VcpuStop,
}

/// Builds the CPUID table KVM supports, once for all vCPUs.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, VcpuError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(VcpuError::GetSupportedCpuid)
}

/// One vCPU.
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
}

/// Size of `kvm_xsave`, what KVM_GET_XSAVE and KVM_SET_XSAVE carry.
const XSAVE_LEGACY_SIZE: usize = std::mem::size_of::<kvm_xsave>();

/// Checks that this host's XSAVE area fits `kvm_xsave`: KVM_SET_XSAVE
/// reads as many bytes as the area needs, so a larger area (e.g. with AMX
/// state) would make it read past the struct. Such hosts need
/// KVM_GET_XSAVE2, which stasis does not use yet.
pub fn check_xsave_size(kvm: &Kvm) -> Result<(), VcpuError> {
    // 0 when the capability is missing: then the legacy size is all there is.
    let size = usize::try_from(kvm.check_extension_int(Cap::Xsave2)).unwrap_or(0);
    if size > XSAVE_LEGACY_SIZE {
        return Err(VcpuError::XsaveTooLarge(size));
    }
    Ok(())
}

/// The MSRs to save: KVM's list, in ascending order. Ascending order also
/// puts IA32_TSC (0x10) before IA32_TSC_DEADLINE (0x6e0) on restore, as it
/// must be: the deadline is meaningful only against the restored TSC.
pub fn msrs_to_save(kvm: &Kvm) -> Result<Vec<u32>, VcpuError> {
    let list = kvm.get_msr_index_list().map_err(|source| VcpuError::GetState {
        index: 0,
        what: "MSR index list",
        source,
    })?;
    let mut msrs = list.as_slice().to_vec();
    msrs.sort_unstable();
    msrs.dedup();
    Ok(msrs)
}

impl Vcpu {
    /// Creates vCPU `index` (also its APIC ID).
    pub fn new(vm: &VmFd, index: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|e| VcpuError::CreateVcpu(index, e))?;
        Ok(Vcpu { index, fd })
    }

    /// Its index (also its APIC ID).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Sets everything the vCPU needs before its first KVM_RUN to enter
    /// the kernel's 64-bit entry point.
    pub fn configure_for_boot(
        &self,
        kvm: &Kvm,
        supported: &CpuId,
        count: u8,
        entry: GuestAddress,
    ) -> Result<(), VcpuError> {
        let index = self.index;
        // CPUID before the first KVM_RUN: KVM derives the guest's feature
        // set (and what MSRs it accepts) from it.
        let mut entries = supported.as_slice().to_vec();
        let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
        filter_cpuid(&mut entries, index, count, tsc_deadline);
        let cpuid = CpuId::from_entries(&entries).map_err(|_| VcpuError::BuildCpuid)?;
        self.fd.set_cpuid2(&cpuid).map_err(|e| VcpuError::SetCpuid(index, e))?;

        self.set_boot_msrs()?;

        let regs = kvm_regs {
            rflags: 0x2,
            rip: entry.0,
            rsp: layout::BOOT_STACK_POINTER,
            rbp: layout::BOOT_STACK_POINTER,
            rsi: layout::ZERO_PAGE_START,
            ..Default::default()
        };
        self.fd.set_regs(&regs).map_err(|e| VcpuError::SetRegs(index, e))?;

        self.set_boot_sregs()?;

        let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
        self.fd.set_fpu(&fpu).map_err(|e| VcpuError::SetFpu(index, e))?;

        // LAPIC after SREGS: SREGS carries the APIC base, which must be in
        // place before the LAPIC's registers are written.
        self.set_lint()
    }

    fn set_boot_msrs(&self) -> Result<(), VcpuError> {
        let entry = |index, data| kvm_msr_entry { index, data, ..Default::default() };
        let entries = [
            entry(msr::IA32_SYSENTER_CS, 0),
            entry(msr::IA32_SYSENTER_ESP, 0),
            entry(msr::IA32_SYSENTER_EIP, 0),
            entry(msr::STAR, 0),
            entry(msr::CSTAR, 0),
            entry(msr::KERNEL_GS_BASE, 0),
            entry(msr::SYSCALL_MASK, 0),
            entry(msr::LSTAR, 0),
            entry(msr::IA32_TSC, 0),
            entry(msr::IA32_MISC_ENABLE, msr::MISC_ENABLE_FAST_STRING),
            entry(msr::IA32_MTRR_DEF_TYPE, msr::MTRR_ENABLE_WRITE_BACK),
        ];
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::BuildMsrs)?;
        let set = self
            .fd
            .set_msrs(&msrs)
            .map_err(|e| VcpuError::SetMsrs(self.index, e))?;
        if set != entries.len() {
            return Err(VcpuError::SetMsrsPartial { index: self.index, set, wanted: entries.len() });
        }
        Ok(())
    }

    fn set_boot_sregs(&self) -> Result<(), VcpuError> {
        let index = self.index;
        let mut sregs = self.fd.get_sregs().map_err(|e| VcpuError::GetSregs(index, e))?;
        let code = kvm_segment {
            base: 0,
            limit: 0xfffff,
            selector: 0x8,
            type_: 0xb,
            present: 1,
            dpl: 0,
            db: 0,
            s: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        let data = kvm_segment { selector: 0x10, type_: 0x3, db: 1, l: 0, ..code };
        let tss = kvm_segment { selector: 0x18, type_: 0xb, s: 0, db: 0, l: 0, ..code };
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = tss;
        sregs.gdt.base = layout::BOOT_GDT_START;
        sregs.gdt.limit = (crate::boot::BOOT_GDT.len() * 8 - 1) as u16;
        sregs.idt.base = layout::BOOT_IDT_START;
        sregs.idt.limit = 7;
        sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
        sregs.cr3 = layout::PML4_START;
        sregs.cr4 = X86_CR4_PAE;
        sregs.efer = EFER_LME | EFER_LMA;
        self.fd.set_sregs(&sregs).map_err(|e| VcpuError::SetSregs(index, e))
    }

    /// LINT0 takes the PIC's ExtINT, LINT1 takes NMI, as on a PC.
    fn set_lint(&self) -> Result<(), VcpuError> {
        let index = self.index;
        let mut lapic = self.fd.get_lapic().map_err(|e| VcpuError::GetLapic(index, e))?;
        let set_mode = |regs: &mut [std::os::raw::c_char], offset: usize, mode: u32| {
            let mut bytes = [0u8; 4];
            for (b, r) in bytes.iter_mut().zip(&regs[offset..offset + 4]) {
                *b = *r as u8;
            }
            let value = (u32::from_le_bytes(bytes) & !0x700) | (mode << 8);
            for (r, b) in regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
                *r = b as std::os::raw::c_char;
            }
        };
        set_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
        set_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
        self.fd.set_lapic(&lapic).map_err(|e| VcpuError::SetLapic(index, e))
    }

    /// Reads the vCPU's whole state. MP state first: reading it may make
    /// KVM process pending APIC events, which changes what follows.
    pub fn save_state(&self, msr_indices: &[u32]) -> Result<VcpuState, VcpuError> {
        let index = self.index;
        let get = |what: &'static str| move |source| VcpuError::GetState { index, what, source };
        let mp_state = self.fd.get_mp_state().map_err(get("MP state"))?;
        let regs = self.fd.get_regs().map_err(get("registers"))?;
        let sregs = self.fd.get_sregs().map_err(get("special registers"))?;
        let xsave = self.fd.get_xsave().map_err(get("XSAVE state"))?;
        let xcrs = self.fd.get_xcrs().map_err(get("XCRs"))?;
        let debug_regs = self.fd.get_debug_regs().map_err(get("debug registers"))?;
        let lapic = self.fd.get_lapic().map_err(get("local APIC"))?;
        let tsc_khz = self.fd.get_tsc_khz().map_err(get("TSC frequency"))?;
        let cpuid = self
            .fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(get("CPUID"))?
            .as_slice()
            .to_vec();
        let msrs = self.read_msrs(msr_indices)?;
        let events = self.fd.get_vcpu_events().map_err(get("pending events"))?;
        Ok(VcpuState { index, mp_state, regs, sregs, xsave, xcrs, debug_regs, lapic, tsc_khz, cpuid, msrs, events })
    }

    /// Reads every MSR in `indices` that KVM lets us read. KVM_GET_MSRS
    /// stops at the first MSR it refuses and returns how many it read: that
    /// MSR is dropped and the rest read again.
    fn read_msrs(&self, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuError> {
        let mut wanted: Vec<u32> = indices.to_vec();
        let mut done: Vec<kvm_msr_entry> = Vec::with_capacity(wanted.len());
        let build = |list: &[u32]| {
            let entries: Vec<kvm_msr_entry> =
                list.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
            Msrs::from_entries(&entries).map_err(|_| VcpuError::BuildMsrs)
        };
        while !wanted.is_empty() {
            // The FAM wrapper holds at most a few hundred entries per call.
            let chunk = wanted.len().min(256);
            let mut msrs = build(&wanted[..chunk])?;
            let read = self.fd.get_msrs(&mut msrs).map_err(|source| VcpuError::GetState {
                index: self.index,
                what: "MSRs",
                source,
            })?;
            done.extend_from_slice(&msrs.as_slice()[..read]);
            let skip = if read < chunk {
                log::debug!("vCPU {}: MSR {:#x} cannot be read; not saved", self.index, wanted[read]);
                1
            } else {
                0
            };
            wanted.drain(..read + skip);
        }
        Ok(done)
    }

    /// Puts a saved state back, in the order KVM needs it.
    pub fn restore_state(&self, state: &VcpuState) -> Result<(), VcpuError> {
        let index = self.index;
        let set = |what: &'static str| move |source| VcpuError::SetState { index, what, source };
        // CPUID before anything else, and before the first KVM_RUN: KVM
        // decides from it which MSRs and XSAVE features the vCPU has.
        let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| VcpuError::BuildCpuid)?;
        self.fd.set_cpuid2(&cpuid).map_err(set("CPUID"))?;
        // The TSC frequency before the TSC MSRs that count in it; only when
        // it differs (not every host can scale it).
        if self.fd.get_tsc_khz().ok() != Some(state.tsc_khz) {
            self.fd.set_tsc_khz(state.tsc_khz).map_err(set("TSC frequency"))?;
        }
        self.fd.set_mp_state(state.mp_state).map_err(set("MP state"))?;
        // SREGS before REGS: setting SREGS changes mode, which REGS (RIP,
        // RFLAGS) are interpreted in.
        self.fd.set_sregs(&state.sregs).map_err(set("special registers"))?;
        self.fd.set_regs(&state.regs).map_err(set("registers"))?;
        // SAFETY: `state.xsave` is a whole kvm_xsave, which is what KVM
        // reads for KVM_SET_XSAVE when the XSAVE area fits in it; the VMM
        // checks that with `check_xsave_size` before restoring any vCPU.
        unsafe { self.fd.set_xsave(&state.xsave) }.map_err(set("XSAVE state"))?;
        self.fd.set_xcrs(&state.xcrs).map_err(set("XCRs"))?;
        self.fd.set_debug_regs(&state.debug_regs).map_err(set("debug registers"))?;
        // LAPIC after SREGS (which carries the APIC base) and before the
        // MSRs (the TSC-deadline MSR is armed in the LAPIC's timer).
        self.fd.set_lapic(&state.lapic).map_err(set("local APIC"))?;
        let msrs = Msrs::from_entries(&state.msrs).map_err(|_| VcpuError::BuildMsrs)?;
        let written = self.fd.set_msrs(&msrs).map_err(set("MSRs"))?;
        if written != state.msrs.len() {
            return Err(VcpuError::RestoreMsr {
                index,
                msr: state.msrs[written].index,
                set: written,
                wanted: state.msrs.len(),
            });
        }
        // Events last: setting REGS clears a pending exception, and the
        // events restore it.
        self.fd.set_vcpu_events(&state.events).map_err(set("pending events"))?;
        Ok(())
    }

    /// Tells KVM the guest was paused, so its soft-lockup watchdog does not
    /// count the pause. Fails harmlessly when the guest has no kvmclock.
    pub fn notify_paused(&self) {
        if let Err(e) = self.fd.kvmclock_ctrl() {
            log::debug!("vCPU {}: KVM_KVMCLOCK_CTRL: {e}", self.index);
        }
    }

    /// Starts the vCPU on its own thread; it runs until it stops, serving
    /// port I/O on `bus` and MMIO on `mmio`, and reports the stop on
    /// `events`.
    pub fn start<T: From<VcpuEvent> + Send + 'static>(
        self,
        bus: Arc<PioBus>,
        mmio: Arc<MmioBus>,
        mem: GuestMemoryMmap,
        msr_indices: Arc<Vec<u32>>,
        events: Sender<T>,
    ) -> Result<VcpuHandle, std::io::Error> {
        let index = self.index;
        let (req_tx, req_rx) = channel();
        let (resp_tx, resp_rx) = channel();
        let thread = std::thread::Builder::new().name(format!("vcpu{index}")).spawn(move || {
            crate::seccomp::confine_or_exit(crate::seccomp::ThreadKind::Vcpu);
            let mut vcpu = self;
            let stop = vcpu.run_loop(&bus, &mmio, &mem, &msr_indices, &req_rx, &resp_tx);
            if let Some(stop) = stop {
                // The receiver only goes away while the VMM is exiting.
                let _ = events.send(T::from(VcpuEvent { index: vcpu.index, stop }));
            }
        })?;
        Ok(VcpuHandle { index, thread, requests: req_tx, responses: resp_rx })
    }

    /// Serves requests while paused; returns false when the VMM is gone.
    fn paused(&self, msrs: &[u32], requests: &Receiver<VcpuRequest>, responses: &Sender<VcpuResponse>) -> bool {
        self.notify_paused();
        if responses.send(VcpuResponse::Paused).is_err() {
            return false;
        }
        loop {
            let reply = match requests.recv() {
                Ok(VcpuRequest::SaveState) => VcpuResponse::State(Box::new(self.save_state(msrs))),
                Ok(VcpuRequest::Resume) => {
                    return responses.send(VcpuResponse::Resumed).is_ok();
                }
                Ok(VcpuRequest::Pause) => VcpuResponse::Paused,
                Err(_) => return false,
            };
            if responses.send(reply).is_err() {
                return false;
            }
        }
    }

    fn run_loop(
        &mut self,
        bus: &PioBus,
        mmio: &MmioBus,
        mem: &GuestMemoryMmap,
        msrs: &[u32],
        requests: &Receiver<VcpuRequest>,
        responses: &Sender<VcpuResponse>,
    ) -> Option<VcpuStop> {
        loop {
            match requests.try_recv() {
                Ok(VcpuRequest::Pause) => {
                    if !self.paused(msrs, requests, responses) {
                        return None;
                    }
                    continue;
                }
                Ok(other) => log::warn!("vCPU {} got {other:?} while running", self.index),
                Err(std::sync::mpsc::TryRecvError::Empty) => {}
                Err(std::sync::mpsc::TryRecvError::Disconnected) => return None,
            }
            let exit = match self.fd.run() {
                Ok(VcpuExit::IoIn(port, data)) => {
                    if !bus.read(port, data) {
                        log::trace!("read from unclaimed port {port:#x}");
                    }
                    continue;
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    if !bus.write(port, data) {
                        log::trace!("write to unclaimed port {port:#x}");
                    }
                    continue;
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if !mmio.read(addr, data) {
                        log::trace!("read from unclaimed MMIO {addr:#x}");
                    }
                    continue;
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if !mmio.write(addr, data) {
                        log::trace!("write to unclaimed MMIO {addr:#x}");
                    }
                    continue;
                }
                Ok(VcpuExit::Hlt) => {
                    // With the in-kernel LAPIC, KVM handles HLT itself.
                    log::debug!("vCPU {} exited on HLT", self.index);
                    continue;
                }
                Ok(VcpuExit::Shutdown) => Exit::TripleFault,
                Ok(VcpuExit::InternalError) => Exit::InternalError,
                Ok(VcpuExit::FailEntry(reason, cpu)) => Exit::FailEntry(reason, cpu),
                Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => return Some(VcpuStop::Power(PowerEvent::PowerOff)),
                    KVM_SYSTEM_EVENT_RESET => return Some(VcpuStop::Power(PowerEvent::Reset)),
                    KVM_SYSTEM_EVENT_CRASH => Exit::Other("guest crash system event".into()),
                    other => Exit::Other(format!("system event {other}")),
                },
                Ok(other) => Exit::Other(format!("{other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => {
                    return Some(VcpuStop::Failed(format!("vCPU {}: KVM_RUN failed: {e}", self.index)))
                }
            };
            return Some(VcpuStop::Failed(self.describe_failure(exit, mem)));
        }
    }

    /// One message naming the exit, RIP, the instruction bytes there, and
    /// what a kvm_pvm host means for it.
    fn describe_failure(&mut self, exit: Exit, mem: &GuestMemoryMmap) -> String {
        let triple_fault = matches!(exit, Exit::TripleFault);
        let what = match exit {
            Exit::TripleFault => "triple fault (KVM_EXIT_SHUTDOWN)".to_string(),
            Exit::InternalError => {
                let run = self.fd.get_kvm_run();
                // SAFETY: KVM filled the `internal` member of the union: the
                // exit reason was KVM_EXIT_INTERNAL_ERROR.
                let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                let name = match suberror {
                    1 => "emulation failure",
                    2 => "simultaneous exceptions",
                    3 => "delivery event failure",
                    4 => "unexpected exit reason",
                    _ => "unknown",
                };
                format!("KVM internal error, suberror {suberror} ({name})")
            }
            Exit::FailEntry(reason, cpu) => {
                format!("VM entry failed (hardware reason {reason:#x} on host CPU {cpu})")
            }
            Exit::Other(text) => format!("unexpected exit {text}"),
        };
        let mut msg = format!("vCPU {} stopped: {what}", self.index);
        match self.fd.get_regs() {
            Ok(regs) if triple_fault && self.in_reset_state(&regs) => {
                // KVM on AMD re-initialises the vCPU after a shutdown
                // intercept: what is left is the reset vector, not the
                // faulting RIP.
                msg.push_str(" (KVM reset the vCPU on this exit, so the faulting RIP is lost)");
            }
            Ok(regs) => {
                msg.push_str(&format!(" at RIP {:#x}", regs.rip));
                if let Some(bytes) = self.instruction_bytes(regs.rip, mem) {
                    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
                    msg.push_str(&format!(", instruction bytes: {}", hex.join(" ")));
                }
            }
            Err(e) => msg.push_str(&format!(" (registers unreadable: {e})")),
        }
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            msg.push_str(
                "; this host's KVM is kvm_pvm, a software hypervisor that cannot run unmodified \
                 guests: run on a host with kvm_intel/kvm_amd or inside scripts/testhost",
            );
        }
        msg
    }

    /// Whether the vCPU holds the x86 reset state (CS:IP F000:FFF0).
    fn in_reset_state(&self, regs: &kvm_regs) -> bool {
        regs.rip == 0xfff0
            && self.fd.get_sregs().is_ok_and(|sregs| sregs.cs.selector == 0xf000 && sregs.cs.base == 0xffff_0000)
    }

    fn instruction_bytes(&self, rip: u64, mem: &GuestMemoryMmap) -> Option<[u8; 15]> {
        let translation = self.fd.translate_gva(rip).ok()?;
        if translation.valid == 0 {
            return None;
        }
        let mut bytes = [0u8; 15];
        mem.read_slice(&mut bytes, GuestAddress(translation.physical_address)).ok()?;
        Some(bytes)
    }
}

/// Exits that end the vCPU with an error.
enum Exit {
    TripleFault,
    InternalError,
    FailEntry(u64, u32),
    Other(String),
}
