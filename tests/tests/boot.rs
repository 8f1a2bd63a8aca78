//! Boot the default guest on real KVM and talk to its shell.

use std::time::Duration;

use stasis_e2e::{Guest, COMMAND_TIMEOUT};

const EXIT_TIMEOUT: Duration = Duration::from_secs(120);

/// Boots, checks the shell computes, powers off, and checks the exit.
fn boot_compute_poweroff(kernel: &str) {
    let mut guest = Guest::boot(kernel, &[]);
    let secs = guest.wait_ready();
    eprintln!("{kernel}: STASIS-GUEST-READY after {secs:.2}s (process start, incl. any test host)");
    let from = guest.output().len();
    guest.send_line("echo $((6*7))");
    guest.expect_line_after(from, "42", COMMAND_TIMEOUT);
    guest.send_line("poweroff -f");
    let (status, output) = guest.wait_exit(EXIT_TIMEOUT);
    assert!(status.success(), "exit status {status} after poweroff; output:\n{output}");
    assert!(!output.contains("stasis: error"), "error reported; output:\n{output}");
}

#[test]
fn elf_vmlinux_boots_to_shell_and_powers_off() {
    boot_compute_poweroff("vmlinux");
}

#[test]
fn bzimage_boots_to_shell_and_powers_off() {
    boot_compute_poweroff("bzImage");
}

#[test]
fn two_vcpus_are_online_in_the_guest() {
    let mut guest = Guest::boot("vmlinux", &["--vcpus", "2"]);
    guest.wait_ready();
    let cpus = guest.query("CPUS", "echo CPUS=$(grep -c ^processor /proc/cpuinfo)");
    let online = guest.query("ONLINE", "echo ONLINE=$(cat /sys/devices/system/cpu/online)");
    guest.send_line("poweroff -f");
    let (status, output) = guest.wait_exit(EXIT_TIMEOUT);
    assert_eq!(cpus, "2", "guest counts {cpus} processors; output:\n{output}");
    assert_eq!(online, "0-1", "online CPUs {online}; output:\n{output}");
    assert!(status.success(), "exit status {status}; output:\n{output}");
}

#[test]
fn one_gib_guest_sees_about_one_gib() {
    let mut guest = Guest::boot("vmlinux", &["--memory", "1G"]);
    guest.wait_ready();
    let kib: u64 = guest
        .query("MEMKB", "echo MEMKB=$(awk '/MemTotal/ {print $2}' /proc/meminfo)")
        .parse()
        .expect("MemTotal in kB");
    guest.send_line("poweroff -f");
    let (status, output) = guest.wait_exit(EXIT_TIMEOUT);
    let expected = 1024 * 1024;
    let off = (kib as f64 - expected as f64).abs() / expected as f64;
    assert!(off < 0.10, "MemTotal {kib} kB is {:.1}% off 1 GiB; output:\n{output}", off * 100.0);
    assert!(status.success(), "exit status {status}; output:\n{output}");
}

#[test]
fn guest_reboot_ends_the_vmm_with_success() {
    let mut guest = Guest::boot("vmlinux", &[]);
    guest.wait_ready();
    guest.send_line("reboot -f");
    let (status, output) = guest.wait_exit(EXIT_TIMEOUT);
    assert!(status.success(), "exit status {status} after reboot; output:\n{output}");
}
