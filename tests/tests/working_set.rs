//! The working set end to end: the first lazy restore of a snapshot
//! records the blocks the guest faults on and saves them beside the
//! snapshot; later restores load them first, so the guest takes next to no
//! faults on its way to answering, with the same data; an unusable working
//! set is ignored with a warning; four restores of one snapshot at once
//! all answer with the same data.
//!
//! On hosts without hardware KVM the test re-runs itself inside the test
//! host (one L1 CPU), where the VMs and the clients share KVM.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use stasis_e2e::{
    boot_args, complete_lines, run_in_kvm_host, scratch, snapshot_json, stasis_bin, status_json, Guest, COMMAND_TIMEOUT,
};

/// Writing and hashing 32 MiB under nested KVM.
const WORK_TIMEOUT: Duration = Duration::from_secs(180);
/// The recording window: long enough for the answer under nested KVM.
const WINDOW_MS: &str = "6000";
/// The ticker, as in the other snapshot tests.
const TICKER: &str = "(i=0; while true; do i=$((i+1)); echo TICK=$i; sleep 0.5; done) &";
const SHA: &str = "echo SHA=$(sha256sum /tmp/blob | cut -d' ' -f1)";

fn text(path: &Path) -> String {
    path.to_str().expect("utf-8 path").to_string()
}

fn last_tick(output: &str) -> Option<u64> {
    complete_lines(output).filter_map(|l| l.split_once("TICK=")?.1.trim().parse().ok()).next_back()
}

/// Restores `snap` with `extra` and an API socket named `name`; types a
/// command at once and waits for its answer; returns the guest, its socket
/// and the loader's figures right after the answer.
fn restore_and_ask(dir: &Path, snap: &Path, name: &str, extra: &[&str]) -> (Guest, PathBuf, Value) {
    let sock = dir.join(format!("{name}.sock"));
    let mut args = vec!["restore".to_string(), text(snap)];
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(["--api-sock".to_string(), text(&sock)]);
    let mut guest = Guest::spawn(&args);
    let answer = guest.query("ANSWER", "echo ANSWER=$((40+2))");
    assert_eq!(answer, "42");
    let loader = status_json(&sock)["restore"]["loader"].clone();
    assert!(loader.is_object(), "{loader}");
    (guest, sock, loader)
}

fn working_set_state(sock: &Path) -> String {
    status_json(sock)["restore"]["loader"]["working_set"]["state"].as_str().unwrap_or("").to_string()
}

/// The data and the ticker survived: same sha256, ticks go on past `tick`.
fn check_guest(guest: &mut Guest, sha: &str, tick: u64) {
    let now = guest.query_within("SHA", SHA, WORK_TIMEOUT);
    assert_eq!(now, sha, "the data changed across the restore");
    guest.wait_until("the ticker going on", COMMAND_TIMEOUT, |t| last_tick(t).is_some_and(|n| n > tick + 1));
}

fn faults(loader: &Value) -> u64 {
    loader["faults"].as_u64().unwrap_or_else(|| panic!("no fault count: {loader}"))
}

#[test]
fn a_recorded_working_set_makes_the_next_restores_fault_next_to_nothing() {
    if run_in_kvm_host("a_recorded_working_set_makes_the_next_restores_fault_next_to_nothing") {
        return;
    }
    let dir = scratch();
    let snap = dir.path().join("snap");
    let ws_file = snap.join("working-set.json");

    // A guest with 32 MiB of random data in its tmpfs and a ticker.
    let sock = dir.path().join("boot.sock");
    let mut args = boot_args("vmlinux", &["--memory", "512M", "--vcpus", "2"]);
    args.extend(["--api-sock".to_string(), text(&sock)]);
    let mut guest = Guest::spawn(&args);
    guest.wait_ready();
    guest.send_line("dd if=/dev/urandom of=/tmp/blob bs=1M count=32 2>/dev/null");
    let sha = guest.query_within("SHA", SHA, WORK_TIMEOUT);
    guest.send_line(TICKER);
    guest.wait_until("ticks", COMMAND_TIMEOUT, |t| last_tick(t).is_some_and(|n| n >= 2));
    let reply = snapshot_json(&sock, &snap, &["--then", "exit"]);
    assert!(reply["snapshot"]["dir"].is_string(), "{reply}");
    let (status, output) = guest.wait_exit(COMMAND_TIMEOUT);
    assert!(status.success(), "{output}");
    let tick = last_tick(&output).expect("ticks before the snapshot");
    assert!(!ws_file.exists(), "a snapshot holds no working set until a restore records one");

    // First restore: no working set yet, so it records one.
    let window = ["--working-set-window", WINDOW_MS];
    let (mut first, sock, loader) = restore_and_ask(dir.path(), &snap, "first", &window);
    assert_eq!(loader["working_set"]["state"], "recording", "{loader}");
    // Recording loads one page per fault; the blocks faulted on so far are
    // the faults a restore without a working set takes (a block each).
    let before = loader["working_set"]["blocks"].as_u64().unwrap_or_else(|| panic!("no block count: {loader}"));
    assert!(faults(&loader) >= before, "a fault per page, so at least one per block: {loader}");
    // Asked every 200 ms, outside the console's lock: a status request is
    // a process and a round trip, not something to run under it.
    let deadline = std::time::Instant::now() + WORK_TIMEOUT;
    while working_set_state(&sock) != "recorded" {
        assert!(std::time::Instant::now() < deadline, "the recording did not end; output:\n{}", first.output());
        std::thread::sleep(Duration::from_millis(200));
    }
    first.wait_until("the saved working set", COMMAND_TIMEOUT, |_| ws_file.exists());
    check_guest(&mut first, &sha, tick);
    first.poweroff();
    let saved = std::fs::read_to_string(&ws_file).expect("working set file");

    let inspect = Command::new(stasis_bin()).args(["checkpoint", "inspect"]).arg(&snap).output().expect("runs inspect");
    let report = String::from_utf8_lossy(&inspect.stdout);
    assert!(inspect.status.success() && report.contains("working set  ") && report.contains("loaded first on restore") && report.contains("the guest touched"), "{report}");
    // Snapshots check their blocks with XXH64 (docs/checkpoint-format.md).
    assert!(report.contains("version      1.2 (block checksums xxh64)"), "{report}");

    // With the working set, loaded while the vCPUs start and before they
    // do: the guest answers with next to no faults, and the data is the
    // same.
    for load in ["during", "before"] {
        let (mut guest, _sock, loader) = restore_and_ask(dir.path(), &snap, load, &["--working-set-load", load]);
        let after = faults(&loader);
        eprintln!("faults on the way to the first answer: {before} without the working set, {after} with it ({load}); {loader}");
        assert_eq!(loader["working_set"]["state"], "loaded", "{loader}");
        assert!(loader["blocks_working_set"].as_u64().unwrap_or(0) > 0, "{loader}");
        // Loaded before the vCPUs start, the working set's pages are in
        // when the guest runs: next to no faults (a page the recording did
        // not see, of a block it did or not, still faults: 0 to 7 of 270
        // seen). Loaded while they run, the guest races the loader (on the
        // test host's one L1 CPU they share it), and faults on what the
        // loader has not reached yet.
        let (factor, max_after) = if load == "before" { (10, before / 10) } else { (2, before / 2) };
        assert!(after <= max_after, "{after} faults with the working set ({load}), {before} without (at most 1/{factor} expected): {loader}");
        check_guest(&mut guest, &sha, tick);
        guest.poweroff();
    }

    // Unusable working sets are ignored with a warning, and a new one is
    // recorded in their place.
    let damaged = saved.replacen("\"blocks\":[", "\"blocks\":[1,", 1);
    let other = {
        let mut v: Value = serde_json::from_str(&saved).expect("json");
        v["checkpoint_index_crc"] = (v["checkpoint_index_crc"].as_u64().expect("crc") ^ 1).into();
        v.to_string()
    };
    for (name, content, warning) in [
        ("damaged", damaged, "does not match its checksum"),
        ("other", other, "was recorded for a different checkpoint"),
    ] {
        std::fs::write(&ws_file, content).expect("writes the working set");
        let (mut guest, sock, loader) = restore_and_ask(dir.path(), &snap, name, &window);
        assert_eq!(loader["working_set"]["state"], "recording", "{loader}");
        guest.wait_until("the warning", COMMAND_TIMEOUT, |t| t.contains("ignoring the working set") && t.contains(warning));
        assert_eq!(working_set_state(&sock), "recording");
        check_guest(&mut guest, &sha, tick);
        guest.poweroff();
    }

    // Four restores of the one snapshot at once (the saved working set
    // back in place): all answer, with the same data.
    std::fs::write(&ws_file, &saved).expect("writes the working set");
    let mut guests: Vec<(Guest, PathBuf)> = (0..4)
        .map(|i| {
            let sock = dir.path().join(format!("golden{i}.sock"));
            let mut args = vec!["restore".to_string(), text(&snap), "--api-sock".to_string(), text(&sock)];
            args.extend(window.iter().map(|s| s.to_string()));
            (Guest::spawn(&args), sock)
        })
        .collect();
    for (guest, sock) in &mut guests {
        assert_eq!(guest.query_within("ANSWER", "echo ANSWER=$((40+2))", WORK_TIMEOUT), "42");
        assert_eq!(working_set_state(sock), "loaded");
    }
    for (mut guest, _) in guests {
        check_guest(&mut guest, &sha, tick);
        guest.poweroff();
    }
    assert_eq!(std::fs::read_to_string(&ws_file).expect("reads"), saved, "loading a working set leaves it as it is");
}
