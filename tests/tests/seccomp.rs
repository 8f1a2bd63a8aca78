//! Seccomp end to end (docs/seccomp.md): every thread of a running VMM,
//! devices and control socket included, runs under a seccomp filter, and
//! `--no-seccomp` leaves them all unconfined. (That a call off a thread's
//! list kills the process, or is named in `trap` and `log` mode, is tested
//! by the unit tests of `vmm/src/seccomp`; that the lists are complete, by
//! every other end-to-end test, which runs with the filters enforced.)

use std::path::Path;

use stasis_e2e::{boot_with_api, run_in_kvm_host, scratch, status_json, Guest};

/// (thread name, seccomp mode, filters) of every thread of `pid`. A thread
/// that ends while it is being looked at (the control socket's connection
/// thread of the status request just answered) is left out.
fn threads(pid: u32) -> Vec<(String, u32, u32)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).expect("the VMM's threads") {
        let task = entry.expect("task").path();
        let (Ok(comm), Ok(status)) =
            (std::fs::read_to_string(task.join("comm")), std::fs::read_to_string(task.join("status")))
        else {
            continue;
        };
        let comm = comm.trim().to_string();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u32>().ok())
                .unwrap_or_else(|| panic!("no {name} in {}", task.display()))
        };
        out.push((comm, field("Seccomp:"), field("Seccomp_filters:")));
    }
    out.sort();
    out
}

/// A VMM with a disk, vsock and an API socket, its devices set up by the
/// guest's drivers and a status request through the control socket done.
fn boot(dir: &Path, extra: &[&str]) -> Guest {
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).and_then(|f| f.set_len(8 << 20)).expect("disk");
    let vsock = format!("3,{}", dir.join("v.sock").display());
    let mut args = vec!["--disk", disk.to_str().expect("a UTF-8 path"), "--vsock", &vsock];
    args.extend_from_slice(extra);
    let (mut guest, sock) = boot_with_api(dir, "vm", &args);
    assert_eq!(guest.query("UP", "echo UP=yes"), "yes");
    assert_eq!(status_json(&sock)["state"], "running");
    guest
}

#[test]
fn every_vmm_thread_runs_under_a_filter() {
    if run_in_kvm_host("every_vmm_thread_runs_under_a_filter") {
        return;
    }
    let dir = scratch();
    let guest = boot(dir.path(), &["--vcpus", "2"]);
    let threads = threads(guest.pid());
    eprintln!("threads (name, Seccomp, Seccomp_filters): {threads:?}");
    for kind in ["vcpu0", "vcpu1", "api-server", "virtio-blk0", "console-in", "stasis"] {
        assert!(threads.iter().any(|(name, _, _)| name.starts_with(kind)), "no thread {kind}: {threads:?}");
    }
    for (name, mode, filters) in &threads {
        assert_eq!(*mode, 2, "thread {name} is not under a seccomp filter: {threads:?}");
        assert!(*filters >= 1, "thread {name}: {threads:?}");
    }
    guest.poweroff();
}

#[test]
fn no_seccomp_leaves_every_thread_unconfined() {
    if run_in_kvm_host("no_seccomp_leaves_every_thread_unconfined") {
        return;
    }
    let dir = scratch();
    let guest = boot(dir.path(), &["--no-seccomp"]);
    let threads = threads(guest.pid());
    for (name, mode, _) in &threads {
        assert_eq!(*mode, 0, "thread {name} is confined under --no-seccomp: {threads:?}");
    }
    let output = guest.poweroff();
    assert!(output.contains("seccomp filters are off"), "no warning that filters are off:\n{output}");
}
