//! A vCPU: its boot-time configuration (CPUID, MSRs, registers, LAPIC) and
//! the loop that runs it and serves its port I/O exits.

use std::sync::mpsc::Sender;
use std::sync::Arc;

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::cpuid::filter_cpuid;
use crate::devices::bus::PioBus;
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

impl Vcpu {
    /// Creates vCPU `index` (also its APIC ID).
    pub fn new(vm: &VmFd, index: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|e| VcpuError::CreateVcpu(index, e))?;
        Ok(Vcpu { index, fd })
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

    /// Runs the vCPU until it stops, serving port I/O on `bus`; reports the
    /// stop on `events`.
    pub fn run<T: From<VcpuEvent>>(mut self, bus: Arc<PioBus>, mem: GuestMemoryMmap, events: Sender<T>) {
        let stop = self.run_loop(&bus, &mem);
        // The receiver only goes away while the VMM is exiting anyway.
        let _ = events.send(T::from(VcpuEvent { index: self.index, stop }));
    }

    fn run_loop(&mut self, bus: &PioBus, mem: &GuestMemoryMmap) -> VcpuStop {
        loop {
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
                    log::trace!("read from unclaimed MMIO {addr:#x}");
                    data.fill(0xff);
                    continue;
                }
                Ok(VcpuExit::MmioWrite(addr, _)) => {
                    log::trace!("write to unclaimed MMIO {addr:#x}");
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
                    KVM_SYSTEM_EVENT_SHUTDOWN => return VcpuStop::Power(PowerEvent::PowerOff),
                    KVM_SYSTEM_EVENT_RESET => return VcpuStop::Power(PowerEvent::Reset),
                    KVM_SYSTEM_EVENT_CRASH => Exit::Other("guest crash system event".into()),
                    other => Exit::Other(format!("system event {other}")),
                },
                Ok(other) => Exit::Other(format!("{other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
                Err(e) => {
                    return VcpuStop::Failed(format!("vCPU {}: KVM_RUN failed: {e}", self.index))
                }
            };
            return VcpuStop::Failed(self.describe_failure(exit, mem));
        }
    }

    /// One message naming the exit, RIP, the instruction bytes there, and
    /// what a kvm_pvm host means for it.
    fn describe_failure(&mut self, exit: Exit, mem: &GuestMemoryMmap) -> String {
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
