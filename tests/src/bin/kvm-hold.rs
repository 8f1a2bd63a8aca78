//! `kvm-hold`: keeps one KVM VM, with an in-kernel interrupt controller and
//! one vCPU that never runs, open until killed. For the test host
//! (`STASIS_TESTHOST_HOLD_KVM=1`, docs/testhost.md, "the L1 wedges").
//!
//! Creating and destroying a VM flips static keys in the host kernel:
//! `preempt_notifier_key` (a VM's first vCPU thread needs preempt
//! notifiers; it guards code in `__schedule`) and KVM's `apic_sw_disabled`
//! (a vCPU's local APIC starts software-disabled). Each flip from or to
//! zero rewrites kernel text on every CPU (`text_poke_bp`: an `int3` over
//! each site, IPIs, the new bytes, IPIs). In the emulated L1 of the test
//! host, a CPU has been caught looping through `exc_int3` at such a site
//! while the other waited for it, and the L1 never recovers. With this VM
//! open both keys stay above zero: later VMs coming and going rewrite no
//! kernel text at all.
//!
//! Prints `kvm-hold: holding` once the VM is set up; exits 1 with a message
//! when it cannot be.

use std::ffi::CStr;
use std::process::ExitCode;

/// `_IO(KVMIO, n)` requests of `<linux/kvm.h>`.
const KVM_CREATE_VM: libc::c_ulong = 0xae01;
const KVM_CREATE_VCPU: libc::c_ulong = 0xae41;
const KVM_CREATE_IRQCHIP: libc::c_ulong = 0xae60;

/// `ioctl(fd, request, 0)`, or the error as text.
fn ioctl(fd: libc::c_int, request: libc::c_ulong, what: &str) -> Result<libc::c_int, String> {
    // SAFETY: these requests take an integer argument (0 here) and write
    // nothing to this process's memory.
    let rc = unsafe { libc::ioctl(fd, request, 0) };
    if rc < 0 {
        return Err(format!("{what} failed: {}", std::io::Error::last_os_error()));
    }
    Ok(rc)
}

fn hold() -> Result<(), String> {
    let path: &CStr = c"/dev/kvm";
    // SAFETY: a NUL-terminated path and plain flags.
    let kvm = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if kvm < 0 {
        return Err(format!("cannot open /dev/kvm: {}", std::io::Error::last_os_error()));
    }
    let vm = ioctl(kvm, KVM_CREATE_VM, "KVM_CREATE_VM")?;
    ioctl(vm, KVM_CREATE_IRQCHIP, "KVM_CREATE_IRQCHIP")?;
    ioctl(vm, KVM_CREATE_VCPU, "KVM_CREATE_VCPU")?;
    println!("kvm-hold: holding");
    Ok(())
}

fn main() -> ExitCode {
    if let Err(e) = hold() {
        eprintln!("kvm-hold: {e}");
        return ExitCode::FAILURE;
    }
    // The descriptors stay open for the life of the process.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
