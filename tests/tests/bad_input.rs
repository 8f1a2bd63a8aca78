//! Bad input: each case gets one clear error line and a non-zero exit,
//! before any guest runs. These need no KVM and run directly on this host.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use stasis_e2e::{assert_refused, guest_image, repo_root, run_direct, stasis_bin};

fn vmlinux() -> String {
    guest_image("vmlinux")
}

#[test]
fn missing_kernel_is_refused() {
    assert_refused(&["boot", "--kernel", "/nonexistent/vmlinux"], &[], "No such file");
}

#[test]
fn kernel_that_is_a_directory_is_refused() {
    assert_refused(&["boot", "--kernel", "guest-images"], &[], "is a directory");
}

#[test]
fn unreadable_kernel_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vmlinux");
    std::fs::copy(repo_root().join(vmlinux()), &path).expect("copy kernel");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o000)).expect("chmod");
    // Root reads anything: drop to nobody to see the permission check.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(stasis_bin())
        .args(["boot", "--kernel"])
        .arg(&path)
        .output()
        .expect("setpriv runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "unreadable kernel accepted: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("cannot open kernel") && stderr.contains("Permission denied"), "{stderr}");
}

#[test]
fn file_that_is_no_kernel_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notes.txt");
    std::fs::write(&path, "just some text, not a kernel\n".repeat(100)).expect("write");
    let path = path.to_str().expect("utf-8 path");
    assert_refused(&["boot", "--kernel", path], &[], "is not a kernel");
}

#[test]
fn truncated_elf_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vmlinux");
    let image = std::fs::read(repo_root().join(vmlinux())).expect("read kernel");
    std::fs::write(&path, &image[..4096]).expect("write");
    let path = path.to_str().expect("utf-8 path");
    assert_refused(&["boot", "--kernel", path], &[], "is damaged");
}

#[test]
fn initrd_larger_than_guest_memory_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("big.cpio");
    let file = std::fs::File::create(&path).expect("create");
    file.set_len(64 << 20).expect("sparse 64 MiB");
    let path = path.to_str().expect("utf-8 path");
    let kernel = vmlinux();
    assert_refused(
        &["boot", "--kernel", &kernel, "--initrd", path, "--memory", "32M"],
        &[],
        "does not fit in guest memory",
    );
}

#[test]
fn missing_initrd_is_refused() {
    let kernel = vmlinux();
    assert_refused(&["boot", "--kernel", &kernel, "--initrd", "/nonexistent.cpio"], &[], "cannot open initrd");
}

#[test]
fn memory_out_of_range_is_refused() {
    let kernel = vmlinux();
    assert_refused(&["boot", "--kernel", &kernel, "--memory", "16M"], &[], "out of range");
    assert_refused(&["boot", "--kernel", &kernel, "--memory", "2T"], &[], "out of range");
}

#[test]
fn memory_not_page_aligned_is_refused() {
    let kernel = vmlinux();
    assert_refused(&["boot", "--kernel", &kernel, "--memory", "536870913"], &[], "not a multiple of the 4 KiB page");
}

#[test]
fn memory_that_does_not_parse_is_refused() {
    let kernel = vmlinux();
    assert_refused(&["boot", "--kernel", &kernel, "--memory", "lots"], &[], "invalid size");
}

#[test]
fn zero_vcpus_is_refused() {
    let kernel = vmlinux();
    assert_refused(&["boot", "--kernel", &kernel, "--vcpus", "0"], &[], "between 1 and 32");
}

#[test]
fn too_many_vcpus_is_refused() {
    let kernel = vmlinux();
    assert_refused(&["boot", "--kernel", &kernel, "--vcpus", "33"], &[], "between 1 and 32");
    assert_refused(&["boot", "--kernel", &kernel, "--vcpus", "two"], &[], "invalid --vcpus");
}

#[test]
fn cmdline_longer_than_the_boot_protocol_allows_is_refused() {
    let long = "x".repeat(4096);
    for kernel in [vmlinux(), guest_image("bzImage")] {
        assert_refused(&["boot", "--kernel", &kernel, "--cmdline", &long], &[], "this kernel accepts at most");
    }
}

#[test]
fn missing_kvm_device_is_refused() {
    let kernel = vmlinux();
    assert_refused(
        &["boot", "--kernel", &kernel],
        &[("STASIS_KVM_DEVICE", "/nonexistent/kvm")],
        "does not exist: this host has no KVM",
    );
}

#[test]
fn kvm_device_without_permission_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = dir.path().join("kvm");
    std::fs::write(&fake, b"").expect("write");
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // The unprivileged user may not reach into the checkout (a clone under
    // a 0700 directory): give it its own copies of the binary and kernel.
    let kernel = dir.path().join("vmlinux");
    std::fs::copy(repo_root().join(vmlinux()), &kernel).expect("copy the kernel");
    let bin = dir.path().join("stasis");
    std::fs::copy(stasis_bin(), &bin).expect("copy stasis");
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&bin)
        .args(["boot", "--kernel"])
        .arg(&kernel)
        .env("STASIS_KVM_DEVICE", &fake)
        .output()
        .expect("setpriv runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("no permission to open"), "{stderr}");
    // It says who may open it: the file's group and mode.
    assert!(stderr.contains("(group root, mode 0600)"), "{stderr}");
}

#[test]
fn device_that_is_not_kvm_is_refused() {
    let kernel = vmlinux();
    assert_refused(&["boot", "--kernel", &kernel], &[("STASIS_KVM_DEVICE", "/dev/null")], "/dev/null is not a KVM device");
}

/// A minimal ELF64 x86-64 "kernel": one loadable segment at 16 MiB holding
/// `ud2`, entered there. With the boot IDT empty, the #UD cannot be
/// delivered and the vCPU triple-faults.
fn ud2_kernel() -> Vec<u8> {
    const LOAD: u64 = 0x100_0000;
    let code = [0x0f, 0x0b, 0x90, 0x90];
    let mut elf = vec![0u8; 64 + 56];
    elf[..4].copy_from_slice(b"\x7fELF");
    elf[4] = 2; // 64-bit
    elf[5] = 1; // little-endian
    elf[6] = 1; // ELF version
    elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // executable
    elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    elf[20..24].copy_from_slice(&1u32.to_le_bytes());
    elf[24..32].copy_from_slice(&LOAD.to_le_bytes()); // entry
    elf[32..40].copy_from_slice(&64u64.to_le_bytes()); // program headers
    elf[52..54].copy_from_slice(&64u16.to_le_bytes());
    elf[54..56].copy_from_slice(&56u16.to_le_bytes());
    elf[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = &mut elf[64..120];
    ph[..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
    ph[8..16].copy_from_slice(&120u64.to_le_bytes()); // offset
    ph[16..24].copy_from_slice(&LOAD.to_le_bytes()); // vaddr
    ph[24..32].copy_from_slice(&LOAD.to_le_bytes()); // paddr
    ph[32..40].copy_from_slice(&(code.len() as u64).to_le_bytes()); // filesz
    ph[40..48].copy_from_slice(&(code.len() as u64).to_le_bytes()); // memsz
    ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes()); // align
    elf.extend_from_slice(&code);
    elf
}

/// Runs on this host's own KVM: the guest is two instructions, which even
/// an emulating KVM runs.
#[test]
fn triple_fault_is_reported_with_rip_and_instruction_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ud2.elf");
    std::fs::write(&path, ud2_kernel()).expect("write");
    let path = path.to_str().expect("utf-8 path");
    let (status, stdout, stderr) = run_direct(&["boot", "--kernel", path, "--memory", "64M"], &[]);
    assert_eq!(status.code(), Some(1), "{status}; stderr: {stderr}; stdout: {stdout}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "want one error line, got:\n{stderr}");
    let line = lines[0];
    assert!(line.starts_with("stasis: error: vCPU 0 stopped: triple fault"), "{line}");
    assert!(line.contains("at RIP 0x1000000"), "{line}");
    assert!(line.contains("instruction bytes: 0f 0b 90 90"), "{line}");
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    assert_eq!(line.contains("kvm_pvm"), pvm, "kvm_pvm note wrong for this host: {line}");
}
