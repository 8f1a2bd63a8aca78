//! Incremental backups end to end: a guest with a 1 GiB disk is backed up
//! (full), changed, backed up twice more (incrementals from dirty
//! tracking), then snapshotted and restored into a new VMM (tracking lost)
//! and changed and backed up once more (checksum comparison). Each backup
//! holds about what changed (and, for one, the disk as it was at its
//! pause although the guest overwrote it meanwhile), the state directory holds only the retired
//! record, the store verifies, and restoring each of the four points gives
//! that point's memory (sha256 of tmpfs files, checked by the guest) and
//! disk (the whole image, checked on the host after the guest powers off).
//!
//! On hosts without hardware KVM the test re-runs itself inside the test
//! host.

use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use sha2::{Digest, Sha256};
use stasis_e2e::{boot_args, run_in_kvm_host, scratch, snapshot, stasis_bin, status_json, Guest, EXIT_TIMEOUT};

const WORK_TIMEOUT: Duration = Duration::from_secs(600);
const MIB: u64 = 1 << 20;
const BLOCK: u64 = 64 << 10;

fn text(path: &Path) -> String {
    path.to_str().expect("utf-8 path").to_string()
}

/// `stasis ARGS…`: exit status success, stdout, stderr.
fn stasis(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(stasis_bin()).args(args).stdin(Stdio::null()).output().expect("stasis runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `stasis backup --api-sock SOCK --to STORE --state-dir STATE EXTRA…`,
/// whatever its outcome.
fn try_backup(sock: &Path, store: &Path, state: &Path, extra: &[&str]) -> (bool, String, String) {
    let mut args = vec!["backup".to_string(), "--api-sock".into(), text(sock), "--to".into(), text(store)];
    args.extend(["--state-dir".into(), text(state)]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    stasis(&args)
}

/// A backup that must be refused: its one error line, checked to contain
/// `needle`.
fn refused(sock: &Path, store: &Path, state: &Path, extra: &[&str], needle: &str) -> String {
    let (ok, stdout, stderr) = try_backup(sock, store, state, extra);
    assert!(!ok, "backup into {} was not refused: {stdout}", store.display());
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "not one line: {stderr}");
    assert!(lines[0].starts_with("stasis: error: ") && lines[0].contains(needle), "expected {needle:?}: {stderr}");
    eprintln!("refused as expected: {}", lines[0]);
    lines[0].to_string()
}

/// `stasis backup --api-sock SOCK --to STORE --state-dir STATE`; its reply's
/// "backup" object.
fn backup(sock: &Path, store: &Path, state: &Path) -> serde_json::Value {
    backup_with(sock, store, state, &[])
}

fn backup_with(sock: &Path, store: &Path, state: &Path, extra: &[&str]) -> serde_json::Value {
    let (ok, stdout, stderr) = try_backup(sock, store, state, extra);
    assert!(ok, "backup failed: {stderr}{stdout}");
    eprintln!("backup: {}", stdout.trim());
    let reply: serde_json::Value = serde_json::from_str(stdout.trim()).expect("backup reply is JSON");
    reply["backup"].clone()
}

/// A digest of a disk image's content that reads only its data: SHA-256
/// over (offset, bytes) of every 64 KiB block that is not all zero. Two
/// images have the same digest exactly when they hold the same bytes.
fn image_digest(path: &Path) -> String {
    let file = std::fs::File::open(path).expect("open image");
    let size = file.metadata().expect("stat").len();
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; BLOCK as usize];
    let mut pos = 0u64;
    while pos < size {
        let (start, end) = match data_range(&file, pos, size) {
            Some(range) => range,
            None => break,
        };
        let mut at = start / BLOCK * BLOCK;
        while at < end {
            let len = BLOCK.min(size - at) as usize;
            file.read_exact_at(&mut buf[..len], at).expect("read image");
            if buf[..len].iter().any(|&b| b != 0) {
                hash.update(at.to_le_bytes());
                hash.update(&buf[..len]);
            }
            at += BLOCK;
        }
        pos = at;
    }
    format!("{size}:{:x}", hash.finalize())
}

/// The next data range at or after `pos`, by SEEK_DATA / SEEK_HOLE.
fn data_range(file: &std::fs::File, pos: u64, size: u64) -> Option<(u64, u64)> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on an open descriptor.
    let data = unsafe { libc::lseek(file.as_raw_fd(), pos as libc::off_t, libc::SEEK_DATA) };
    if data < 0 {
        return None;
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(file.as_raw_fd(), data, libc::SEEK_HOLE) };
    Some((data as u64, if hole < 0 { size } else { hole as u64 }))
}

/// Blocks a backup stored for memory and for its one disk.
fn written(b: &serde_json::Value) -> (u64, u64) {
    let memory = b["memory_blocks_written"].as_u64().expect("memory blocks");
    let disk = b["disks"][0]["blocks_written"].as_u64().expect("disk blocks");
    (memory, disk)
}

/// One point in time: the sha256 of each tmpfs file the guest holds, and
/// the disk image's digest.
struct Point {
    files: String,
    disk: String,
}

/// Writes `mib` MiB of random data to the disk at `at_mib` and to a new
/// tmpfs file `name`; returns the point after it.
fn change(guest: &mut Guest, disk: &Path, name: &str, at_mib: u64, mib: u64) -> Point {
    let done = guest.query_within(
        "CHANGED",
        &format!(
            "dd if=/dev/urandom of=/dev/vda bs=1M count={mib} seek={at_mib} conv=fsync 2>/dev/null && \
             dd if=/dev/urandom of=/tmp/{name} bs=1M count={mib} 2>/dev/null; echo CHANGED=$?"
        ),
        WORK_TIMEOUT,
    );
    assert_eq!(done, "0", "the guest could not write its changes; output:\n{}", guest.output());
    point(guest, disk)
}

fn point(guest: &mut Guest, disk: &Path) -> Point {
    let files = guest.query("FILES", "echo FILES=$(cd /tmp && sha256sum m* | cut -c1-16 | tr '\\n' ,)");
    Point { files, disk: image_digest(disk) }
}

#[test]
fn backups_hold_what_changed_and_every_point_restores_exactly() {
    if run_in_kvm_host("backups_hold_what_changed_and_every_point_restores_exactly") {
        return;
    }
    let dir = scratch();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk).and_then(|f| f.set_len(1 << 30)).expect("1 GiB disk");
    let store = dir.path().join("store");
    let state = dir.path().join("state");
    let sock = dir.path().join("api.sock");
    let args = boot_args(
        "vmlinux",
        &["--memory", "512M", "--disk", &text(&disk), "--api-sock", &text(&sock)],
    );
    let mut guest = Guest::spawn(&args);
    guest.wait_ready();

    // Point 1: 32 MiB on disk and in memory; a full backup.
    let p1 = change(&mut guest, &disk, "m1", 0, 32);
    let b1 = backup(&sock, &store, &state);
    assert_eq!(b1["kind"], "full", "{b1}");
    assert_eq!(b1["sequence"], 1, "{b1}");
    let (m1, d1) = written(&b1);
    assert!(d1 * BLOCK >= 32 * MIB, "the full backup holds {d1} disk blocks; {b1}");

    // Points 2 and 3: 16 and 8 MiB more, from dirty tracking.
    let p2 = change(&mut guest, &disk, "m2", 100, 16);
    // While backup 2 is written (after its pause: the VMM reports it in
    // progress), the guest overwrites the blocks it holds, with direct
    // writes: they are copied out before the writes, so point 2 still
    // restores exactly.
    guest.send_line(
        "read go; [ \"$go\" = go ] && dd if=/dev/urandom of=/dev/vda bs=64k count=256 seek=1600 oflag=direct 2>/dev/null; echo OVERWROTE=$?x",
    );
    let b2 = {
        let (sock, store, state) = (sock.clone(), store.clone(), state.clone());
        std::thread::spawn(move || backup(&sock, &store, &state))
    };
    let deadline = std::time::Instant::now() + WORK_TIMEOUT;
    while status_json(&sock).get("snapshot_in_progress").is_none() {
        assert!(std::time::Instant::now() < deadline && !b2.is_finished(), "backup 2 was never seen in progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    guest.send_line("go");
    let b2 = b2.join().expect("backup 2");
    guest.expect("OVERWROTE=0x", WORK_TIMEOUT);
    eprintln!("blocks copied ahead of the guest's writes during backup 2: {}", b2["disk_blocks_copied_before_write"]);
    let p3 = change(&mut guest, &disk, "m3", 300, 8);
    let b3 = backup(&sock, &store, &state);
    // Backup 3 also holds the 16 MiB the guest overwrote during backup 2.
    for (b, mib) in [(&b2, 16), (&b3, 8 + 16)] {
        assert_eq!(b["kind"], "incremental", "{b}");
        assert_eq!(b["changes_from"], "dirty-tracking", "{b}");
        let (m, d) = written(b);
        // The disk: exactly the blocks written (plus a few the guest's
        // block layer may touch). Memory: the new tmpfs file, the page
        // cache the disk writes went through, and what the guest does
        // meanwhile — far less than the full backup.
        assert!(d * BLOCK >= mib * MIB && d * BLOCK <= mib * MIB + 4 * BLOCK, "disk blocks {d} for {mib} MiB: {b}");
        assert!(m * BLOCK >= mib * MIB && m * BLOCK <= 3 * mib * MIB + 24 * MIB, "memory blocks {m} for {mib} MiB: {b}");
        assert!(m < m1, "an incremental backup holds as much memory as the full one: {b}");
    }

    // The state directory holds the retired record only: no block data.
    let state_files: Vec<String> = std::fs::read_dir(&state)
        .expect("state dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(state_files, ["retired.json"], "the state directory holds more than the retired record");
    let record_len = std::fs::metadata(state.join("retired.json")).expect("record").len();
    assert!(record_len < 2 * MIB, "the retired record is {record_len} bytes");

    // Tracking lost: snapshot, end the VMM, restore into a new one, change
    // 8 MiB, back up: only the changed blocks, found by checksums.
    let snap = dir.path().join("snap");
    snapshot(&sock, &snap, "exit");
    let (status, output) = guest.wait_exit(EXIT_TIMEOUT);
    assert!(status.success(), "the VM did not end after its snapshot: {status}\n{output}");
    let sock2 = dir.path().join("api2.sock");
    let work = dir.path().join("work");
    let mut guest = Guest::spawn(&[
        "restore".to_string(),
        text(&snap),
        "--disk-dir".into(),
        text(&work),
        "--api-sock".into(),
        text(&sock2),
    ]);
    let work_disk = work.join("disk0.img");
    let p4 = change(&mut guest, &work_disk, "m4", 500, 8);
    let b4 = backup(&sock2, &store, &state);
    assert_eq!(b4["changes_from"], "checksums", "{b4}");
    let (m4, d4) = written(&b4);
    assert!(d4 * BLOCK >= 8 * MIB && d4 * BLOCK <= 8 * MIB + 4 * BLOCK, "disk blocks {d4} after tracking was lost: {b4}");
    assert!(m4 * BLOCK >= 8 * MIB && m4 < m1, "memory blocks {m4} after tracking was lost: {b4}");

    let (ok, listing, err) = stasis(&["backup", "list", &text(&store)]);
    assert!(ok, "backup list: {err}");
    assert_eq!(listing.lines().filter(|l| l.contains("incremental")).count(), 3, "{listing}");
    let (ok, verified, err) = stasis(&["backup", "verify", &text(&store)]);
    assert!(ok && verified.contains("4 backup(s) verified"), "backup verify: {err}{verified}");

    // Every point restores exactly.
    let restores_exactly = |sequence: u64, want: &Point| {
        let disks = dir.path().join(format!("restored-{sequence}"));
        let mut guest = Guest::spawn(&[
            "restore".to_string(),
            text(&store.join(format!("{sequence:06}"))),
            "--disk-dir".into(),
            text(&disks),
        ]);
        // Point 2 was taken while the shell waited in `read go`: an empty
        // line lets it go on without writing.
        guest.send_line("");
        let files = guest.query("FILES", "echo FILES=$(cd /tmp && sha256sum m* | cut -c1-16 | tr '\\n' ,)");
        let output = guest.poweroff();
        assert_eq!(files, want.files, "point {sequence}: the guest's memory differs; output:\n{output}");
        assert_eq!(image_digest(&disks.join("disk0.img")), want.disk, "point {sequence}: the disk differs");
        std::fs::remove_dir_all(&disks).expect("remove the restored disk");
    };
    restores_exactly(1, &p1);
    restores_exactly(2, &p2);

    // Merge, keeping the newest two: backup 3 becomes full, 4 is rebased
    // on it; the VM's retired record still matches, so the next backup is
    // incremental from tracking; every point left restores exactly.
    let (ok, merged, err) = stasis(&["backup", "merge", &text(&store), "--keep", "2"]);
    assert!(ok, "backup merge: {err}");
    let report: serde_json::Value = serde_json::from_str(merged.trim()).expect("merge JSON");
    assert_eq!(report["merge"]["removed"], serde_json::json!(["000001", "000002"]), "{merged}");
    assert_eq!(report["merge"]["full"], "000003", "{merged}");
    assert_eq!(report["merge"]["rebased"], "000004", "{merged}");
    assert_eq!(names(&store), ["000003", "000004", "stasis-backup-store.json"]);
    let (ok, verified, err) = stasis(&["backup", "verify", &text(&store)]);
    assert!(ok && verified.contains("2 backup(s) verified"), "verify after merge: {err}{verified}");
    let (_, listing, _) = stasis(&["backup", "list", &text(&store)]);
    assert!(listing.lines().any(|l| l.starts_with("000003  full")), "{listing}");
    let p5 = change(&mut guest, &work_disk, "m5", 600, 4);
    let b5 = backup(&sock2, &store, &state);
    assert_eq!((&b5["changes_from"], &b5["sequence"]), (&"dirty-tracking".into(), &5.into()), "{b5}");
    guest.poweroff();
    restores_exactly(3, &p3);
    restores_exactly(4, &p4);
    restores_exactly(5, &p5);
}

/// The names in a directory, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Copies a directory tree; with `link`, files are hard links (enough for
/// a merge, which never writes into an existing file).
fn copy_tree_with(from: &Path, to: &Path, link: bool) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("type").is_dir() {
            copy_tree_with(&entry.path(), &target, link);
        } else if link {
            std::fs::hard_link(entry.path(), &target).expect("link");
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

fn copy_tree(from: &Path, to: &Path) {
    copy_tree_with(from, to, false);
}

/// The backup directories of a store.
fn backups(store: &Path) -> Vec<String> {
    names(store).into_iter().filter(|n| n.len() == 6).collect()
}

/// `stasis backup verify STORE`: success, and what it printed.
fn verify(store: &Path) -> (bool, String) {
    let (ok, stdout, stderr) = stasis(&["backup", "verify", &text(store)]);
    (ok, format!("{stdout}{stderr}"))
}

/// Mounts a tmpfs of `size` at `dir` (the test host runs tests as root).
fn small_tmpfs(dir: &Path, size: &str) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let target = std::ffi::CString::new(text(dir)).expect("path");
    let options = std::ffi::CString::new(format!("size={size}")).expect("options");
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(c"tmpfs".as_ptr(), target.as_ptr(), c"tmpfs".as_ptr(), 0, options.as_ptr().cast())
    };
    assert_eq!(rc, 0, "cannot mount a tmpfs at {}: {}", dir.display(), std::io::Error::last_os_error());
}

fn unmount(dir: &Path) {
    let target = std::ffi::CString::new(text(dir)).expect("path");
    // SAFETY: a NUL-terminated path.
    unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
}

/// Starts a backup, kills the VMM `after` into it, and checks the store
/// still verifies with either its earlier backups or the new one complete.
fn kill_during_backup(guest: Guest, sock: &Path, store: &Path, state: &Path, after: Duration) -> usize {
    let before = names(store).iter().filter(|n| n.len() == 6).count();
    let mut args = vec!["backup".to_string(), "--api-sock".into(), text(sock), "--to".into(), text(store)];
    args.extend(["--state-dir".into(), text(state)]);
    let mut client = Command::new(stasis_bin())
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("backup client starts");
    std::thread::sleep(after);
    let (status, _) = guest.kill_vmm();
    assert!(!status.success(), "the VMM was not killed");
    let _ = client.wait();
    let after_kill = names(store).iter().filter(|n| n.len() == 6).count();
    assert!(after_kill == before || after_kill == before + 1, "backups {before} -> {after_kill}");
    let (ok, report) = verify(store);
    assert!(ok, "the store does not verify after a kill {after:?} into a backup:\n{report}");
    eprintln!("killed {after:?} into a backup: {before} -> {after_kill} backups, store verifies");
    after_kill
}

/// The newest backup directory of a store.
fn latest(store: &Path) -> std::path::PathBuf {
    store.join(names(store).into_iter().rfind(|n| n.len() == 6).expect("a backup"))
}

#[test]
fn bad_stores_and_records_are_refused_and_a_killed_backup_leaves_the_store_valid() {
    if run_in_kvm_host("bad_stores_and_records_are_refused_and_a_killed_backup_leaves_the_store_valid") {
        return;
    }
    let dir = scratch();
    let disk = dir.path().join("disk.img");
    std::fs::File::create(&disk).and_then(|f| f.set_len(64 * MIB)).expect("disk");
    let sock = dir.path().join("api.sock");
    let mut guest =
        Guest::spawn(&boot_args("vmlinux", &["--memory", "256M", "--disk", &text(&disk), "--api-sock", &text(&sock)]));
    guest.wait_ready();
    let p1 = change(&mut guest, &disk, "m1", 0, 16);
    let (a, b, c) = (dir.path().join("state-a"), dir.path().join("state-b"), dir.path().join("state-c"));

    // A full store: one line, the VM runs on, nothing is left in the store.
    let small = dir.path().join("small");
    small_tmpfs(&small, "6m");
    refused(&sock, &small, &a, &[], "No space left on device");
    assert_eq!(names(&small), ["stasis-backup-store.json"], "a failed backup left files in the store");
    unmount(&small);
    assert_eq!(status_json(&sock)["state"], "running");

    let store = dir.path().join("store");
    let b1 = backup(&sock, &store, &a);
    assert_eq!(b1["kind"], "full");

    // Another VM's store.
    let other = dir.path().join("other");
    std::fs::create_dir(&other).expect("mkdir");
    let marker = std::fs::read_to_string(store.join("stasis-backup-store.json")).expect("marker");
    let vm_id = serde_json::from_str::<serde_json::Value>(&marker).expect("marker JSON")["vm_id"].as_str().expect("vm id").to_string();
    std::fs::write(other.join("stasis-backup-store.json"), marker.replace(&vm_id, "another-vm")).expect("forge");
    refused(&sock, &other, &a, &[], "another VM");
    // A directory with other files.
    refused(&sock, dir.path(), &a, &[], "not a backup store");
    // Retired records that do not match the store.
    refused(&sock, &store, &b, &[], "holds no retired record");
    backup_with(&sock, &store, &b, &["--full"]);
    refused(&sock, &store, &a, &[], "not of the store's latest backup");
    backup(&sock, &dir.path().join("store-c"), &c);
    refused(&sock, &store, &c, &[], "is of another store");
    assert_eq!(status_json(&sock)["state"], "running", "a refused backup stopped the VM");

    // SIGKILL during backups: the store stays valid and its newest backup
    // restores one of the points backed up; the next backup, by a new VMM,
    // compares checksums.
    let p2 = change(&mut guest, &disk, "m2", 20, 8);
    let mut known = vec![p1.files, p2.files];
    kill_during_backup(guest, &sock, &store, &b, Duration::from_millis(400));
    for (round, after) in [(1, 50), (2, 1500)] {
        let sock = dir.path().join(format!("api-{round}.sock"));
        let work = dir.path().join(format!("work-{round}"));
        let newest = latest(&store);
        let mut guest = Guest::spawn(&[
            "restore".to_string(),
            text(&newest),
            "--disk-dir".into(),
            text(&work),
            "--api-sock".into(),
            text(&sock),
        ]);
        let files = guest.query("FILES", "echo FILES=$(cd /tmp && sha256sum m* k* 2>/dev/null | cut -c1-16 | tr '\\n' ,)");
        assert!(known.contains(&files), "backup {} restores memory of no point backed up: {files}", newest.display());
        change(&mut guest, &work.join("disk0.img"), &format!("k{round}"), 40, 1);
        known.push(guest.query("FILES", "echo FILES=$(cd /tmp && sha256sum m* k* 2>/dev/null | cut -c1-16 | tr '\\n' ,)"));
        let (ok, stdout, stderr) = try_backup(&sock, &store, &b, &[]);
        if ok {
            assert!(stdout.contains("\"changes_from\":\"checksums\""), "{stdout}");
            assert!(!names(&store).iter().any(|n| n.contains(".partial-")), "a dead backup's partial directory stayed");
        } else {
            // Killed after the store had the backup but before its
            // retired record: the way out is named.
            assert!(stderr.contains("--full"), "{stderr}");
            backup_with(&sock, &store, &b, &["--full"]);
        }
        kill_during_backup(guest, &sock, &store, &b, Duration::from_millis(after));
    }

    // A merge killed before each of its steps, on a copy of the store each
    // time: every copy verifies (finishing or undoing the merge first) and
    // holds the backups from before the merge or those after it; the
    // first copy killed after the merge committed restores its newest
    // backup before anything else opened it.
    let before = backups(&store);
    assert!(before.len() >= 4, "{before:?}");
    let after = before[before.len() - 2..].to_vec();
    let mut restored_mid_merge = false;
    for step in 1.. {
        assert!(step < 100, "the merge never finished");
        let copy = dir.path().join(format!("merge-{step}"));
        copy_tree_with(&store, &copy, true);
        let out = Command::new(stasis_bin())
            .args(["backup", "merge", &text(&copy), "--keep", "2"])
            .env("STASIS_TEST_MERGE_KILL_AT", step.to_string())
            .output()
            .expect("merge runs");
        let killed = out.status.signal() == Some(libc::SIGKILL);
        assert!(killed || out.status.success(), "merge failed: {}", String::from_utf8_lossy(&out.stderr));
        if killed && !restored_mid_merge && copy.join(".merge/journal.json").exists() {
            restored_mid_merge = true;
            let newest = copy.join(after.last().expect("a backup"));
            let mut guest = Guest::spawn(&["restore".to_string(), text(&newest), "--disk-dir".into(), text(&copy.join("work"))]);
            let files = guest.query("FILES", "echo FILES=$(cd /tmp && sha256sum m* k* 2>/dev/null | cut -c1-16 | tr '\\n' ,)");
            guest.poweroff();
            assert!(known.contains(&files), "a restore during a killed merge gives memory of no point: {files}");
            std::fs::remove_dir_all(copy.join("work")).expect("remove work");
        }
        let (ok, report) = verify(&copy);
        assert!(ok, "the store does not verify after a merge killed at step {step}:\n{report}");
        let now = backups(&copy);
        assert!(now == before || now == after, "step {step}: backups {now:?}, neither {before:?} nor {after:?}");
        assert!(!copy.join(".merge").exists(), "step {step}: the merge's staging stayed");
        std::fs::remove_dir_all(&copy).expect("remove copy");
        if !killed {
            assert_eq!(now, after);
            eprintln!("merge killed before each of its {} steps: the store verified every time", step - 1);
            break;
        }
    }
    assert!(restored_mid_merge, "no kill landed between the merge's commit and its end");

    // A damaged layer and a missing one: verify names them, restore refuses.
    let damaged = dir.path().join("damaged");
    copy_tree(&store, &damaged);
    let newest = latest(&damaged);
    let memory = newest.join("memory.ckpt");
    let file = std::fs::OpenOptions::new().write(true).open(&memory).expect("open");
    file.write_all_at(b"damage!!", 4096 + 100).expect("damage");
    let (ok, report) = verify(&damaged);
    assert!(!ok && report.contains("memory.ckpt"), "verify missed a damaged layer: {report}");
    let missing = dir.path().join("missing");
    copy_tree(&store, &missing);
    let layered = names(&missing)
        .into_iter()
        .filter(|n| n.len() == 6)
        .map(|n| missing.join(n))
        .filter_map(|d| {
            let manifest: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(d.join("manifest.json")).expect("manifest")).expect("JSON");
            manifest["parent"]["dir"].as_str().map(|p| (d.clone(), d.join(p)))
        })
        .next_back();
    let (child, parent) = layered.expect("the store holds an incremental backup");
    std::fs::remove_dir_all(&parent).expect("remove parent");
    let (ok, report) = verify(&missing);
    assert!(!ok && report.contains("missing"), "verify missed a missing layer: {report}");
    let (ok, _, stderr) = stasis(&["restore", &text(&child)]);
    assert!(!ok && stderr.contains("missing"), "restore of a broken chain: {stderr}");
}
