//! Snapshots that are missing, damaged or from another format version are
//! refused with one clear error line and a non-zero exit; a damaged memory
//! block stops the restored VM with an error naming the block, never a
//! hung guest.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use stasis_e2e::{boot_args, run_direct, run_in_kvm_host, snapshot_json, stasis_bin, Guest, COMMAND_TIMEOUT};

const EXIT_TIMEOUT: Duration = Duration::from_secs(120);

/// Copies a snapshot directory.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("ls") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

/// Flips one bit of `path` at `offset` (negative: from the end).
fn flip(path: &Path, offset: i64) {
    let mut bytes = std::fs::read(path).expect("read");
    let at = if offset < 0 { bytes.len() - offset.unsigned_abs() as usize } else { offset as usize };
    bytes[at] ^= 0x10;
    std::fs::write(path, bytes).expect("write");
}

/// `stasis restore DIR` must fail before running anything, with one error
/// line containing `needle`.
fn assert_restore_refused(dir: &Path, needle: &str) {
    let path = dir.to_str().expect("utf-8");
    let (status, stdout, stderr) = run_direct(&["restore", path], &[]);
    assert_eq!(status.code(), Some(1), "restore of {path}: {status}; stderr: {stderr}; stdout: {stdout}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "want one error line, got:\n{stderr}");
    assert!(lines[0].starts_with("stasis: error: ") && lines[0].contains(needle), "{needle:?} not in {stderr}");
    eprintln!("refused as expected: {}", lines[0]);
}

#[test]
fn restore_of_a_missing_directory_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert_restore_refused(&dir.path().join("nope"), "does not exist");
    assert_restore_refused(dir.path(), "is not a stasis snapshot");
}

#[test]
fn damaged_snapshots_are_refused() {
    if run_in_kvm_host("damaged_snapshots_are_refused") {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("vm.sock");
    let good = dir.path().join("good");
    let mut args = boot_args("vmlinux", &[]);
    args.extend(["--api-sock".to_string(), sock.to_str().expect("utf-8").to_string()]);
    let mut guest = Guest::spawn(&args);
    guest.wait_ready();
    guest.wait_until("the API socket", COMMAND_TIMEOUT, |_| sock.exists());
    // Something for the guest to do after restore, touching its memory.
    guest.send_line("(while true; do cat /proc/meminfo >/dev/null; sleep 0.2; done) &");

    // A snapshot into a directory holding other files is refused, and the
    // VM keeps running.
    let busy = dir.path().join("busy");
    std::fs::create_dir(&busy).expect("mkdir");
    std::fs::write(busy.join("notes.txt"), "mine").expect("write");
    let out = Command::new(stasis_bin())
        .args(["snapshot", "--api-sock"])
        .arg(&sock)
        .arg("--out")
        .arg(&busy)
        .output()
        .expect("stasis snapshot runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not overwriting"), "{stderr}");
    assert_eq!(std::fs::read_to_string(busy.join("notes.txt")).expect("kept"), "mine");
    let alive = guest.query("ALIVE", "echo ALIVE=$((1+1))");
    assert_eq!(alive, "2");

    // `good`, a live full snapshot, then `child`, an incremental one on
    // top of it, and the VM ends.
    snapshot_json(&sock, &good, &[]);
    let child = dir.path().join("child");
    snapshot_json(&sock, &child, &["--then", "exit", "--parent", good.to_str().expect("utf-8")]);
    let (status, output) = guest.wait_exit(EXIT_TIMEOUT);
    assert!(status.success(), "{status}\n{output}");

    refuse_broken_chains(dir.path(), &good, &child);

    // A state file with a flipped bit.
    let bad_state = dir.path().join("bad-state");
    copy_dir(&good, &bad_state);
    flip(&bad_state.join("state.bin"), 100);
    assert_restore_refused(&bad_state, "checksum mismatch");

    // A state file from a future major version.
    let new_state = dir.path().join("new-state");
    copy_dir(&good, &new_state);
    let mut bytes = std::fs::read(new_state.join("state.bin")).expect("read");
    bytes[8..12].copy_from_slice(&(2u32 << 16).to_le_bytes());
    std::fs::write(new_state.join("state.bin"), bytes).expect("write");
    assert_restore_refused(&new_state, "format version 2.0");

    // A checkpoint whose index has a flipped bit: refused at open.
    let bad_index = dir.path().join("bad-index");
    copy_dir(&good, &bad_index);
    flip(&bad_index.join("memory.ckpt"), -100);
    assert_restore_refused(&bad_index, "memory.ckpt");

    // A checkpoint of an incompatible format version.
    let new_ckpt = dir.path().join("new-ckpt");
    copy_dir(&good, &new_ckpt);
    let mut bytes = std::fs::read(new_ckpt.join("memory.ckpt")).expect("read");
    bytes[8..10].copy_from_slice(&2u16.to_le_bytes());
    std::fs::write(new_ckpt.join("memory.ckpt"), bytes).expect("write");
    assert_restore_refused(&new_ckpt, "version");

    // A flipped bit inside the first stored memory block (storage block 0
    // starts at 4 KiB): the restore starts, and the VM stops with an error
    // naming the block as soon as the block is loaded, on fault or by
    // prefetch.
    let bad_data = dir.path().join("bad-data");
    copy_dir(&good, &bad_data);
    flip(&bad_data.join("memory.ckpt"), 4096 + 100);
    let args = vec!["restore".to_string(), bad_data.to_str().expect("utf-8").to_string()];
    let guest = Guest::spawn(&args);
    let (status, output) = guest.wait_exit(EXIT_TIMEOUT);
    assert_eq!(status.code(), Some(1), "restore of a damaged block: {status}\n{output}");
    let line = output
        .lines()
        .find(|l| l.starts_with("stasis: error: "))
        .unwrap_or_else(|| panic!("no error line:\n{output}"));
    // Storage block 0 starts with the first memory block that is not all
    // zero; the message names it and where it failed.
    assert!(line.contains("cannot load memory block "), "error does not name the block: {line}");
    eprintln!("stopped as expected: {line}");
}

/// An incremental snapshot whose chain is broken is refused before
/// anything runs: its parent missing, replaced by another snapshot,
/// damaged, or parent links that loop.
fn refuse_broken_chains(root: &Path, good: &Path, child: &Path) {
    // Copies of the pair in `name/`: the child names its parent `../good`.
    let pair = |name: &str| {
        let base = root.join(name);
        copy_dir(good, &base.join("good"));
        copy_dir(child, &base.join("child"));
        base
    };
    let manifest = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).expect("read")).expect("json")
    };
    let write_manifest = |dir: &Path, value: &serde_json::Value| {
        std::fs::write(dir.join("manifest.json"), value.to_string()).expect("write");
    };

    let lonely = root.join("lonely");
    copy_dir(child, &lonely.join("child"));
    assert_restore_refused(&lonely.join("child"), "is missing");

    let swapped = pair("swapped");
    let mut m = manifest(&swapped.join("good"));
    m["id"] = "0123456789abcdef0123456789abcdef".into();
    write_manifest(&swapped.join("good"), &m);
    assert_restore_refused(&swapped.join("child"), "is not its parent");

    let damaged = pair("damaged");
    flip(&damaged.join("good").join("memory.ckpt"), -100);
    assert_restore_refused(&damaged.join("child"), "memory.ckpt");

    let looped = pair("looped");
    let child_id = manifest(&looped.join("child"))["id"].clone();
    let mut m = manifest(&looped.join("good"));
    m["parent"] = serde_json::json!({ "id": child_id, "dir": "../child", "index_crc": 0 });
    write_manifest(&looped.join("good"), &m);
    assert_restore_refused(&looped.join("child"), "cycle");
}
