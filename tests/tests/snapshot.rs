//! Snapshot a running guest and restore it in a new process: the guest's
//! memory, its running programs and its console must come back exactly.
//!
//! On hosts without hardware KVM each test re-runs itself inside the test
//! host, where the VM, the snapshot client and the restored VM share KVM.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use stasis_e2e::{
    boot_args, complete_lines, run_in_kvm_host, scratch, snapshot, stasis_bin, Guest, COMMAND_TIMEOUT, EXIT_TIMEOUT,
};

/// Writing 64 MiB of random data and hashing it, under nested KVM.
const WORK_TIMEOUT: Duration = Duration::from_secs(180);

fn api_sock(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.sock"))
}

/// Waits until the socket file exists (the VMM serves it before the vCPUs
/// run).
fn wait_for_socket(sock: &Path, guest: &Guest) {
    guest.wait_until("the API socket", COMMAND_TIMEOUT, |_| sock.exists());
}

/// The last `TICK=n` the guest printed.
fn last_tick(output: &str) -> Option<u64> {
    ticks(output).last().copied()
}

/// All `TICK=n` values in order, from complete lines only (a line still
/// being printed may read `TICK=2` on its way to `TICK=25`). A tick may
/// follow the shell's prompt on the same line (`~ # TICK=2`).
fn ticks(output: &str) -> Vec<u64> {
    // The echo of the typed loop (`TICK=$i; …`) does not parse.
    complete_lines(output).filter_map(|l| l.split_once("TICK=")?.1.trim_end().parse().ok()).collect()
}

/// Boots a guest, fills 64 MiB of tmpfs with random data, starts a
/// counter, and snapshots it with --then exit. Returns the file's sha256
/// and the last tick seen before the snapshot.
fn prepare_snapshot(dir: &Path, out: &Path, extra: &[&str]) -> (String, u64) {
    let sock = api_sock(dir, "boot");
    let sock_arg = sock.to_str().expect("utf-8").to_string();
    let mut args = boot_args("vmlinux", extra);
    args.extend(["--api-sock".to_string(), sock_arg]);
    let mut guest = Guest::spawn(&args);
    guest.wait_ready();
    wait_for_socket(&sock, &guest);
    let from = guest.output().len();
    guest.send_line("dd if=/dev/urandom of=/tmp/blob bs=1M count=64 2>/dev/null; echo SHA=$(sha256sum /tmp/blob | cut -d' ' -f1)");
    guest.wait_until("the sha256", WORK_TIMEOUT, |t| {
        t.get(from..).unwrap_or("").lines().any(|l| l.trim().starts_with("SHA=") && l.trim().len() == 68)
    });
    let sha = guest.query("SHA", "echo SHA=$(sha256sum /tmp/blob | cut -d' ' -f1)");
    guest.send_line("(i=0; while true; do i=$((i+1)); echo TICK=$i; sleep 0.5; done) &");
    guest.wait_until("TICK=4", COMMAND_TIMEOUT, |t| last_tick(t).is_some_and(|n| n >= 4));
    snapshot(&sock, out, "exit");
    let (status, output) = guest.wait_exit(EXIT_TIMEOUT);
    assert!(status.success(), "VM did not exit cleanly after snapshot --then exit: {status}\n{output}");
    let tick = last_tick(&output).expect("ticks before the snapshot");
    assert!(!sock.exists(), "API socket left behind");
    (sha, tick)
}

/// Restores `snap` with `extra` arguments and checks the guest is the one
/// saved: console answers, the counter continues, the file is intact.
/// Returns the running guest (for a further snapshot) and its socket.
fn restore_and_check(dir: &Path, snap: &Path, extra: &[&str], sha: &str, tick_before: u64, name: &str) -> (Guest, PathBuf) {
    let sock = api_sock(dir, name);
    let mut args = vec!["restore".to_string(), snap.to_str().expect("utf-8").to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(["--api-sock".to_string(), sock.to_str().expect("utf-8").to_string()]);
    let mut guest = Guest::spawn(&args);
    // The counter continues from where it stopped: the next ticks follow
    // the last one seen, with no restart from 1 and no jump back.
    guest.wait_until("ticks after restore", COMMAND_TIMEOUT, |t| ticks(t).len() >= 3);
    let after = ticks(&guest.output());
    assert!(after[0] > tick_before.saturating_sub(1) && after[0] <= tick_before + 2,
        "counter restarted or jumped: last before {tick_before}, first after {}", after[0]);
    assert!(after.windows(2).all(|w| w[1] == w[0] + 1), "counter not consecutive: {after:?}");
    let now = guest.query("SHA", "echo SHA=$(sha256sum /tmp/blob | cut -d' ' -f1)");
    assert_eq!(now, sha, "file content changed across snapshot/restore");
    wait_for_socket(&sock, &guest);
    (guest, sock)
}

/// The `key=value` fields of the restore report line a restored VM prints
/// on stderr when it ends.
fn restore_report(output: &str) -> std::collections::HashMap<String, String> {
    let line = output
        .lines()
        .find(|l| l.starts_with("stasis: restore: "))
        .unwrap_or_else(|| panic!("no restore report:\n{output}"));
    line["stasis: restore: ".len()..]
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn lazy_restore_resumes_the_same_guest() {
    if run_in_kvm_host("lazy_restore_resumes_the_same_guest") {
        return;
    }
    let dir = scratch();
    let snap = dir.path().join("snap");
    let (sha, tick) = prepare_snapshot(dir.path(), &snap, &[]);
    let (guest, _) = restore_and_check(dir.path(), &snap, &[], &sha, tick, "r1");
    let output = guest.poweroff();
    // With RUST_LOG=stasis=debug the restore's phases show here too.
    for line in output.lines().filter(|l| l.contains("restore: ")) {
        eprintln!("{line}");
    }
    let report = restore_report(&output);
    assert_eq!(report["memory"], "lazy");
    let latency: f64 = report["latency_ms"].parse().expect("latency");
    assert!(latency > 0.0);
    let faults: u64 = report["faults"].parse().expect("faults");
    let on_fault: u64 = report["blocks_on_fault"].parse().expect("blocks_on_fault");
    assert!(faults > 0, "the guest ran without faulting memory in: {report:?}");
    // A fault loads a block, or, while the snapshot's first restore (this
    // one) records its working set, a page.
    assert!(on_fault > 0 || report["working_set"] == "recorded", "faults loaded nothing: {report:?}");
}

#[test]
fn restored_guest_can_be_snapshotted_and_restored_again() {
    if run_in_kvm_host("restored_guest_can_be_snapshotted_and_restored_again") {
        return;
    }
    let dir = scratch();
    let snap1 = dir.path().join("snap1");
    let snap2 = dir.path().join("snap2");
    let (sha, tick) = prepare_snapshot(dir.path(), &snap1, &[]);
    let (guest, sock) = restore_and_check(dir.path(), &snap1, &[], &sha, tick, "r1");
    snapshot(&sock, &snap2, "exit");
    let (status, output) = guest.wait_exit(EXIT_TIMEOUT);
    assert!(status.success(), "{status}\n{output}");
    let tick2 = last_tick(&output).expect("ticks");
    let (guest, _) = restore_and_check(dir.path(), &snap2, &[], &sha, tick2, "r2");
    guest.poweroff();
}

#[test]
fn eager_restore_resumes_the_same_guest() {
    if run_in_kvm_host("eager_restore_resumes_the_same_guest") {
        return;
    }
    let dir = scratch();
    let snap = dir.path().join("snap");
    let (sha, tick) = prepare_snapshot(dir.path(), &snap, &[]);
    let (guest, _) = restore_and_check(dir.path(), &snap, &["--memory", "eager"], &sha, tick, "r1");
    let report = restore_report(&guest.poweroff());
    assert_eq!(report["memory"], "eager");
    assert!(!report.contains_key("faults"), "an eager restore reported faults: {report:?}");
}

#[test]
fn two_vcpu_guest_restores() {
    if run_in_kvm_host("two_vcpu_guest_restores") {
        return;
    }
    let dir = scratch();
    let snap = dir.path().join("snap");
    let (sha, tick) = prepare_snapshot(dir.path(), &snap, &["--vcpus", "2"]);
    let (mut guest, _) = restore_and_check(dir.path(), &snap, &[], &sha, tick, "r1");
    let cpus = guest.query("CPUS", "echo CPUS=$(grep -c ^processor /proc/cpuinfo)");
    assert_eq!(cpus, "2");
    guest.poweroff();
}

/// `stasis CMD --api-sock SOCK`; returns its stdout (the JSON reply).
fn control(cmd: &str, sock: &Path) -> String {
    let output = Command::new(stasis_bin()).arg(cmd).arg("--api-sock").arg(sock).output().expect("stasis runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "stasis {cmd}: {}", String::from_utf8_lossy(&output.stderr));
    stdout
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    if run_in_kvm_host("pause_stops_the_guest_and_resume_continues_it") {
        return;
    }
    let dir = scratch();
    let sock = api_sock(dir.path(), "vm");
    let mut args = boot_args("vmlinux", &[]);
    args.extend(["--api-sock".to_string(), sock.to_str().expect("utf-8").to_string()]);
    let mut guest = Guest::spawn(&args);
    guest.wait_ready();
    wait_for_socket(&sock, &guest);
    guest.send_line("(i=0; while true; do i=$((i+1)); echo TICK=$i; sleep 0.5; done) &");
    guest.wait_until("TICK=3", COMMAND_TIMEOUT, |t| last_tick(t).is_some_and(|n| n >= 3));

    let reply = control("pause", &sock);
    assert!(reply.contains("\"state\":\"paused\""), "{reply}");
    assert!(control("status", &sock).contains("\"state\":\"paused\""));
    // Let whatever was in flight arrive, then check nothing more comes.
    std::thread::sleep(Duration::from_secs(2));
    let frozen = last_tick(&guest.output()).expect("ticks");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(last_tick(&guest.output()), Some(frozen), "the guest ran while paused");

    let reply = control("resume", &sock);
    assert!(reply.contains("\"state\":\"running\""), "{reply}");
    guest.wait_until("ticks after resume", COMMAND_TIMEOUT, |t| last_tick(t).is_some_and(|n| n >= frozen + 3));
    let all = ticks(&guest.output());
    assert!(all.windows(2).all(|w| w[1] == w[0] + 1), "counter not consecutive across pause: {all:?}");

    // A snapshot with --then resume leaves the guest running.
    let snap = dir.path().join("snap");
    let reply = snapshot(&sock, &snap, "resume");
    assert!(reply.contains("\"state\":\"running\""), "{reply}");
    assert!(snap.join("manifest.json").is_file() && snap.join("memory.ckpt").is_file());
    let before = last_tick(&guest.output()).expect("ticks");
    guest.wait_until("ticks after the snapshot", COMMAND_TIMEOUT, |t| last_tick(t).is_some_and(|n| n >= before + 2));
    guest.poweroff();
}

/// Runs here, without KVM: how the tests read the guest's counter.
#[test]
fn ticks_are_read_from_complete_lines_even_after_a_prompt() {
    let output = "~ # (i=0; while true; do i=$((i+1)); echo TICK=$i; sleep 0.5; done) &\n\
                  TICK=1\n~ # TICK=2\nTICK=3\nTICK=2";
    assert_eq!(ticks(output), [1, 2, 3], "the last line, still arriving, may be TICK=25");
}
