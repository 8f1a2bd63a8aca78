//! Live and incremental snapshots end to end: a live snapshot holds memory
//! as it was at the pause instant while the guest runs on; incremental
//! snapshots store only what changed, restore as a chain and flatten into
//! one; a VMM killed in the middle of a snapshot leaves the previous one
//! intact and the new one absent or refused.
//!
//! The point-in-time check is `stasis-stamp` (guest-images/tools), which
//! rewrites a buffer page by page, stamping each page with a generation and
//! recording how far it got in the same memory; on SIGUSR1 it checks that
//! every page agrees with the recorded position.
//!
//! On hosts without hardware KVM each test re-runs itself inside the test
//! host (one L1 CPU, 3 GiB), where the VMs and the clients share KVM.

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use stasis_e2e::{
    assert_restore_refused, boot_with_api as boot, complete_lines, restore_with_api as restore, run_in_kvm_host, scratch,
    snapshot_json, spawn_snapshot_client, stasis_bin, status_json, try_snapshot, Guest, COMMAND_TIMEOUT,
};

/// Writing, changing and hashing tens of MiB under nested KVM.
const WORK_TIMEOUT: Duration = Duration::from_secs(180);
/// A stamp check reads the whole 128 MiB buffer under nested KVM.
const CHECK_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest pause a live snapshot may report: it only captures state.
const MAX_PAUSE_MS: f64 = 1000.0;
/// The largest gap between two ticks of the 0.5 s ticker, on the guest's
/// clock and as the host sees them arrive, across a live snapshot. The
/// issue asks for 1 s, which the test host cannot give even with no
/// snapshot at all: there, with stasis-stamp writing and both vCPUs on the
/// one emulated L1 CPU, consecutive ticks came 0.64 to 1.31 s apart in
/// steady state and once 3.1 s (during the stamp's first generation, while
/// the L1 backs its memory). A stop-the-world snapshot of the same guest
/// left a 43.7 s gap (paused_ms 42498). 5 s sits well clear of both; on
/// hardware KVM the gaps print near 0.5 s and can be read against 1 s.
const MAX_TICK_GAP_S: f64 = 5.0;
/// The ticker: its count and the guest's own clock, with no process
/// started per tick (`read` is a shell builtin), so the gaps measure the
/// guest's scheduling and not fork and exec under TCG.
const TICKER: &str =
    "(i=0; while true; do i=$((i+1)); read up idle < /proc/uptime; echo TICK=$i $up; sleep 0.5; done) &";

fn text(path: &Path) -> String {
    path.to_str().expect("utf-8 path").to_string()
}

/// The `TICK=n uptime` lines in order, from complete lines only. A tick
/// may follow the shell's prompt on the same line; the echo of the typed
/// loop (`TICK=$i $up`) does not parse.
fn ticks(output: &str) -> Vec<(u64, f64)> {
    complete_lines(output)
        .filter_map(|l| {
            let mut words = l.split_once("TICK=")?.1.split_whitespace();
            Some((words.next()?.parse().ok()?, words.next()?.parse().ok()?))
        })
        .collect()
}

fn last_tick(output: &str) -> Option<u64> {
    ticks(output).last().map(|t| t.0)
}

/// Records when each tick first shows on the host, polling the console
/// every 10 ms until `stop`.
fn record_arrivals(guest: &Guest, stop: &AtomicBool) -> Vec<(u64, f64, Instant)> {
    let mut seen: Vec<(u64, f64, Instant)> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        for (n, up) in ticks(&guest.output()) {
            if seen.last().is_none_or(|s| n > s.0) {
                seen.push((n, up, now));
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
    seen
}

/// What `stasis-stamp` answered to one SIGUSR1.
#[derive(Debug)]
#[derive(Clone)]
struct StampCheck {
    line: String,
    ok: bool,
    gen: u64,
    pos: u64,
    pages: u64,
}

impl StampCheck {
    /// Pages written since the program started, as one number.
    fn progress(&self) -> u64 {
        self.gen.saturating_sub(1) * self.pages + self.pos
    }
}

fn field(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)?.trim_end_matches(',').parse().ok())
}

/// Starts `stasis-stamp --mib MIB` in the background; returns its pid.
fn start_stamp(guest: &mut Guest, mib: u32) -> u32 {
    let from = guest.output().len();
    guest.send_line(&format!("stasis-stamp --mib {mib} &"));
    guest.wait_until("STAMP RUNNING", COMMAND_TIMEOUT, |t| {
        complete_lines(t.get(from..).unwrap_or("")).any(|l| l.contains("STAMP RUNNING pid="))
    });
    let out = guest.output();
    let line = complete_lines(&out[from..]).find(|l| l.contains("STAMP RUNNING pid=")).expect("seen above");
    assert!(line.contains(&format!("mib={mib}")), "{line}");
    field(line, "pid=").map(|p| p as u32).unwrap_or_else(|| panic!("no pid in {line:?}"))
}

/// Sends SIGUSR1 to stasis-stamp and returns its verdict line.
fn stamp_check(guest: &mut Guest, pid: u32) -> StampCheck {
    let from = guest.output().len();
    guest.send_line(&format!("kill -USR1 {pid}"));
    let verdict = |l: &str| l.contains("STAMP OK ") || l.contains("STAMP BAD ");
    guest.wait_until("a STAMP OK or STAMP BAD line", CHECK_TIMEOUT, |t| {
        complete_lines(t.get(from..).unwrap_or("")).any(verdict)
    });
    let out = guest.output();
    let found = complete_lines(&out[from..]).find(|l| verdict(l)).expect("seen above");
    let line = found[found.find("STAMP ").expect("matched above")..].trim().to_string();
    let ok = line.starts_with("STAMP OK ");
    let (gen, pos, pages) = if ok {
        let get = |k| field(&line, k).unwrap_or_else(|| panic!("no {k} in {line:?}"));
        (get("gen="), get("pos="), get("pages="))
    } else {
        (0, 0, 0)
    };
    eprintln!("stamp check: {line}");
    StampCheck { line, ok, gen, pos, pages }
}

/// Bytes of `dir`'s memory.ckpt on disk (allocated blocks: holes, if a
/// writer leaves any, hold no data) and its length.
fn memory_file(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir.join("memory.ckpt"))
        .unwrap_or_else(|e| panic!("{}: no memory.ckpt: {e}", dir.display()));
    (meta.blocks() * 512, meta.len())
}

/// `snapshot.FIELD` of a reply as a number; panics naming it if missing.
fn number(reply: &Value, field: &str) -> f64 {
    reply["snapshot"][field].as_f64().unwrap_or_else(|| panic!("reply has no numeric snapshot.{field}: {reply}"))
}

const SHA: &str = "echo SHA=$(sha256sum /tmp/blob | cut -d' ' -f1)";

fn sha(guest: &mut Guest) -> String {
    let sha = guest.query_within("SHA", SHA, WORK_TIMEOUT);
    assert_eq!(sha.len(), 64, "not a sha256: {sha:?}");
    sha
}

/// Restores `snap` with `extra`, checks the guest's data hashes to `want`,
/// and powers it off.
fn restore_and_hash(dir: &Path, snap: &Path, name: &str, extra: &[&str], want: &str) {
    let (mut guest, _) = restore(dir, snap, name, extra);
    let got = sha(&mut guest);
    let output = guest.poweroff();
    assert_eq!(got, want, "{} {extra:?}: the guest's data changed; output:\n{output}", snap.display());
}

#[test]
fn live_snapshot_holds_memory_as_it_was_at_the_pause() {
    if run_in_kvm_host("live_snapshot_holds_memory_as_it_was_at_the_pause") {
        return;
    }
    let dir = scratch();
    let snap = dir.path().join("snap");
    // Two vCPUs: the ticker does not wait behind the stamp writer. They
    // share the test host's one CPU (tests/src/lib.rs, TESTHOST_CPUS).
    let (mut guest, sock) = boot(dir.path(), "vm", &["--memory", "2G", "--vcpus", "2"]);
    guest.send_line(TICKER);
    let pid = start_stamp(&mut guest, 128);
    // Into the second generation, so the position splits pages of two
    // written generations (not written pages from untouched ones).
    let deadline = Instant::now() + WORK_TIMEOUT;
    let before = loop {
        let check = stamp_check(&mut guest, pid);
        assert!(check.ok, "the stamp check failed before any snapshot: {}", check.line);
        assert_eq!(check.pages, 128 * 256, "{}", check.line);
        if check.gen >= 2 {
            break check;
        }
        assert!(Instant::now() < deadline, "stasis-stamp did not reach its second generation: {}", check.line);
        thread::sleep(Duration::from_secs(2));
    };
    // For the log: how fast the guest rewrites memory here.
    let rate = guest.query("STAMP RATE mib_per_s", &format!("kill -USR2 {pid}"));
    eprintln!("stasis-stamp writes {rate} MiB/s before the snapshot");

    // The live snapshot, while the host records when each tick arrives.
    let stop = AtomicBool::new(false);
    let (reply, arrivals, started, replied) = thread::scope(|s| {
        let recorder = s.spawn(|| record_arrivals(&guest, &stop));
        let seen = last_tick(&guest.output()).unwrap_or(0);
        guest.wait_until("3 ticks before the snapshot", COMMAND_TIMEOUT, |t| {
            last_tick(t).is_some_and(|n| n >= seen + 3)
        });
        let started = Instant::now();
        let reply = snapshot_json(&sock, &snap, &["--then", "resume"]);
        let replied = Instant::now();
        let seen = last_tick(&guest.output()).unwrap_or(0);
        guest.wait_until("3 ticks after the snapshot", COMMAND_TIMEOUT, |t| {
            last_tick(t).is_some_and(|n| n >= seen + 3)
        });
        stop.store(true, Ordering::Relaxed);
        (reply, recorder.join().expect("tick recorder"), started, replied)
    });

    // The ticks around the snapshot: from the last that arrived before the
    // client started to the second that arrived after its reply.
    let first = arrivals.iter().rposition(|a| a.2 < started).expect("ticks before the snapshot");
    let after = arrivals.iter().position(|a| a.2 > replied).expect("ticks after the snapshot");
    let window = &arrivals[first..=(after + 1).min(arrivals.len() - 1)];
    let gaps: Vec<(u64, f64, f64)> = window
        .windows(2)
        .map(|w| (w[1].0, w[1].1 - w[0].1, w[1].2.duration_since(w[0].2).as_secs_f64()))
        .collect();
    eprintln!(
        "snapshot took {:.2} s (client); tick gaps around it (tick, guest clock s, host arrival s): {:?}",
        replied.duration_since(started).as_secs_f64(),
        gaps.iter().map(|g| format!("{} {:.2} {:.2}", g.0, g.1, g.2)).collect::<Vec<_>>()
    );
    eprintln!(
        "all ticks recorded (tick, guest clock gap s, host arrival gap s): {:?}",
        arrivals
            .windows(2)
            .map(|w| format!("{} {:.2} {:.2}", w[1].0, w[1].1 - w[0].1, w[1].2.duration_since(w[0].2).as_secs_f64()))
            .collect::<Vec<_>>()
    );
    let all: Vec<u64> = arrivals.iter().map(|a| a.0).collect();
    assert!(all.windows(2).all(|w| w[1] == w[0] + 1), "the ticker skipped or repeated: {all:?}");

    assert_eq!(reply["snapshot"]["mode"], "live", "reply: {reply}");
    let paused_ms = number(&reply, "paused_ms");
    assert!(
        (0.0..MAX_PAUSE_MS).contains(&paused_ms),
        "a live snapshot paused the guest for {paused_ms} ms"
    );
    for (tick, guest_gap, host_gap) in &gaps {
        assert!(
            *guest_gap <= MAX_TICK_GAP_S && *host_gap <= MAX_TICK_GAP_S,
            "tick {tick} came {guest_gap:.2} s (guest clock) / {host_gap:.2} s (host) after the previous one, \
             across a live snapshot: all gaps {gaps:?}"
        );
    }

    // The guest that went on running is sound, and so is what was saved.
    let check = stamp_check(&mut guest, pid);
    assert!(check.ok, "the original guest's stamp check failed after the live snapshot: {}", check.line);
    let tick_before = window[0].0;
    let tick_after = window[window.len() - 1].0;
    guest.poweroff();

    let (mut guest, _) = restore(dir.path(), &snap, "r1", &[]);
    guest.wait_until("3 ticks after restore", COMMAND_TIMEOUT, |t| ticks(t).len() >= 3);
    let resumed: Vec<u64> = ticks(&guest.output()).iter().map(|t| t.0).collect();
    // The snapshot instant lies between the last tick seen before the
    // client started and the second seen after its reply (a tick on its
    // way out at the instant may print again).
    assert!(
        resumed[0] >= tick_before && resumed[0] <= tick_after + 1,
        "the restored ticker starts at {} but the snapshot was taken between ticks {tick_before} and {tick_after}",
        resumed[0]
    );
    assert!(resumed.windows(2).all(|w| w[1] == w[0] + 1), "restored ticker not consecutive: {resumed:?}");
    // stasis-stamp checks each page just before it overwrites it; once it
    // has written one whole generation since the restore, every page was
    // checked as the snapshot held it.
    let first = stamp_check(&mut guest, pid);
    let deadline = std::time::Instant::now() + CHECK_TIMEOUT;
    let mut check = first.clone();
    while check.ok && check.progress() < first.progress() + first.pages && std::time::Instant::now() < deadline {
        thread::sleep(Duration::from_secs(2));
        check = stamp_check(&mut guest, pid);
    }
    let output = guest.poweroff();
    assert!(check.ok, "the restored memory is not one instant's: {}; output:\n{output}", check.line);
    assert!(
        check.progress() >= first.progress() + first.pages,
        "stasis-stamp did not rewrite its whole buffer after the restore within {CHECK_TIMEOUT:?}: {} then {}",
        first.line,
        check.line
    );
    assert!(check.gen >= 1, "{}", check.line);
    assert!(
        check.progress() >= before.progress(),
        "the restored stasis-stamp is behind the check taken before the snapshot: {} < {}",
        check.line,
        before.line
    );
}

#[test]
fn incremental_snapshots_chain_restore_and_flatten() {
    if run_in_kvm_host("incremental_snapshots_chain_restore_and_flatten") {
        return;
    }
    let dir = scratch();
    let [a, b, c, f] = ["a", "b", "c", "f"].map(|n| dir.path().join(n));
    // The default 512 MiB: a smaller guest is quicker to snapshot and
    // restore three times under nested KVM, and tmpfs (half of it) holds
    // the 64 MiB.
    let (mut guest, sock) = boot(dir.path(), "vm", &[]);
    let filled = guest.query_within(
        "FILLED",
        "dd if=/dev/urandom of=/tmp/blob bs=1M count=64 2>/dev/null; echo FILLED=$?",
        WORK_TIMEOUT,
    );
    assert_eq!(filled, "0");

    let reply_a = snapshot_json(&sock, &a, &[]);
    assert_eq!(reply_a["snapshot"]["mode"], "live", "default --then resume is live: {reply_a}");
    assert!(reply_a["snapshot"]["parent"].is_null(), "a full snapshot has no parent: {reply_a}");

    // 16 MiB changed, in place (the file's pages stay where they are).
    let changed = guest.query_within(
        "CHANGED",
        "dd if=/dev/urandom of=/tmp/blob bs=1M seek=8 count=16 conv=notrunc 2>/dev/null; echo CHANGED=$?",
        WORK_TIMEOUT,
    );
    assert_eq!(changed, "0");
    let reply_b = snapshot_json(&sock, &b, &["--parent", &text(&a)]);
    assert_eq!(reply_b["snapshot"]["parent"].as_str(), Some(text(&a).as_str()), "reply: {reply_b}");
    assert!(number(&reply_b, "parent_blocks") > 0.0, "B leaves nothing in A: {reply_b}");
    let (a_disk, a_len) = memory_file(&a);
    let (b_disk, b_len) = memory_file(&b);
    eprintln!(
        "memory.ckpt: A {a_disk} bytes on disk ({a_len} long, reply {}), B {b_disk} ({b_len} long, reply {})",
        reply_a["snapshot"]["memory_file_bytes"], reply_b["snapshot"]["memory_file_bytes"]
    );
    // Random bytes do not compress: B holds at least the 16 MiB changed,
    // and far less than A, which holds the 64 MiB and the rest of the
    // guest's memory in use.
    assert!(b_disk >= 16 << 20, "B holds {b_disk} bytes, less than the 16 MiB that changed");
    assert!(b_disk * 10 < a_disk * 4, "B ({b_disk} bytes) is not much smaller than A ({a_disk} bytes)");

    // Refused, and the VM keeps running: a parent that does not exist, a
    // directory that is no snapshot, a snapshot of another VM (A's copy
    // with another VM id), and one that is not the VM's latest (B is).
    let missing = dir.path().join("missing");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).expect("mkdir");
    for entry in std::fs::read_dir(&a).expect("ls A") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), foreign.join(entry.file_name())).expect("copy");
    }
    let manifest_path = foreign.join("manifest.json");
    let mut manifest: Value = serde_json::from_str(&std::fs::read_to_string(&manifest_path).expect("read")).expect("json");
    manifest["vm_id"] = "00000000000000000000000000000000".into();
    std::fs::write(&manifest_path, manifest.to_string()).expect("write");
    for (parent, name, needle) in [
        (&missing, "bad1", "does not exist"),
        (&empty, "bad2", "is not a stasis snapshot"),
        (&foreign, "bad3", "another VM"),
        (&a, "bad4", "not this VM's latest snapshot"),
    ] {
        let out = dir.path().join(name);
        let (status, stdout, stderr) = try_snapshot(&sock, &out, &["--parent", &text(parent)]);
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(status.code(), Some(1), "--parent {}: want exit 1, got {status}; {stderr}{stdout}", parent.display());
        assert_eq!(lines.len(), 1, "--parent {}: want one error line, got:\n{stderr}", parent.display());
        assert!(lines[0].starts_with("stasis: error: ") && lines[0].contains("parent"), "{stderr}");
        assert!(lines[0].contains(needle), "--parent {}: {needle:?} not in {stderr}", parent.display());
        assert!(stdout.is_empty(), "refused, yet printed on stdout: {stdout}");
        assert!(!out.join("manifest.json").exists(), "a refused snapshot left {}", out.display());
        let status = status_json(&sock);
        assert_eq!(status["state"], "running", "after a refused --parent: {status}");
    }
    let alive = guest.query("ALIVE", "echo ALIVE=yes");
    assert_eq!(alive, "yes");

    let changed = guest.query_within(
        "CHANGED",
        "dd if=/dev/urandom of=/tmp/blob bs=1M seek=40 count=8 conv=notrunc 2>/dev/null; echo CHANGED=$?",
        WORK_TIMEOUT,
    );
    assert_eq!(changed, "0");
    let reply_c = snapshot_json(&sock, &c, &["--parent", &text(&b)]);
    assert_eq!(reply_c["snapshot"]["parent"].as_str(), Some(text(&b).as_str()), "reply: {reply_c}");
    let (c_disk, _) = memory_file(&c);
    eprintln!("memory.ckpt: C {c_disk} bytes on disk");
    assert!(c_disk >= 8 << 20 && c_disk * 10 < a_disk * 4, "C holds {c_disk} bytes (A {a_disk})");
    let want = sha(&mut guest);
    guest.poweroff();

    restore_and_hash(dir.path(), &c, "lazy", &[], &want);
    restore_and_hash(dir.path(), &c, "eager", &["--memory", "eager"], &want);

    let out = Command::new(stasis_bin())
        .args(["snapshot", "flatten"])
        .arg(&c)
        .arg("--out")
        .arg(&f)
        .output()
        .expect("stasis snapshot flatten runs");
    assert!(out.status.success(), "flatten failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    // F stands alone: the chain is gone when it is restored.
    for snap in [&a, &b, &c] {
        std::fs::remove_dir_all(snap).expect("remove the chain");
    }
    restore_and_hash(dir.path(), &f, "flat", &[], &want);
}

/// Waits for a client process, at most `timeout`.
fn client_result(child: std::process::Child, timeout: Duration) -> std::process::Output {
    let (tx, rx) = mpsc::channel();
    let pid = child.id();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    rx.recv_timeout(timeout)
        .unwrap_or_else(|_| panic!("the snapshot client (pid {pid}) still runs {timeout:?} after its VMM died"))
        .expect("wait for the snapshot client")
}

#[test]
fn sigkill_during_live_snapshot_keeps_the_previous_snapshot() {
    use std::os::unix::process::ExitStatusExt;
    if run_in_kvm_host("sigkill_during_live_snapshot_keeps_the_previous_snapshot") {
        return;
    }
    let dir = scratch();
    let a = dir.path().join("a");
    // 64 MiB of random data that cannot compress: writing a snapshot of
    // this 512 MiB guest takes about 10 s here, so the later kills land
    // while memory is being written.
    let (mut guest, sock) = boot(dir.path(), "vm", &[]);
    let want = guest.query_within(
        "SHA",
        "dd if=/dev/urandom of=/tmp/blob bs=1M count=64 2>/dev/null; echo SHA=$(sha256sum /tmp/blob | cut -d' ' -f1)",
        WORK_TIMEOUT,
    );
    snapshot_json(&sock, &a, &[]);

    // The VMM (not the client) dies at several points of the next
    // snapshot. In the test host the client needs 50 to 200 ms to start
    // and send its request (a kill at 0 or 50 ms found nothing listening,
    // one at 200 ms reset the connection), so: before the request reaches
    // the VMM, about when it does (the pause), and during the write.
    let mut booted = Some((guest, sock));
    for delay_ms in [0u64, 300, 1500] {
        let (guest, sock) = booted.take().unwrap_or_else(|| {
            // The previous VM is dead: carry on from A, which must still
            // restore after every kill.
            let (mut guest, sock) = restore(dir.path(), &a, &format!("r{delay_ms}"), &[]);
            assert_eq!(guest.query("ALIVE", "echo ALIVE=yes"), "yes");
            (guest, sock)
        });
        let n = dir.path().join(format!("n{delay_ms}"));
        let client = spawn_snapshot_client(&sock, &n);
        thread::sleep(Duration::from_millis(delay_ms));
        let (status, output) = guest.kill_vmm();
        assert_eq!(status.signal(), Some(9), "the VMM ended before it was killed ({status}); output:\n{output}");
        let client = client_result(client, COMMAND_TIMEOUT);
        let client_says = format!(
            "{}{}",
            String::from_utf8_lossy(&client.stdout).trim(),
            String::from_utf8_lossy(&client.stderr).trim()
        );
        eprintln!("killed after {delay_ms} ms; the client ended {}: {client_says}", client.status);

        if client.status.success() {
            // The reply came before the kill: the snapshot was complete and
            // durable, so it restores.
            let (mut restored, _) = restore(dir.path(), &n, &format!("n{delay_ms}"), &[]);
            assert_eq!(sha(&mut restored), want, "{} restored other data", n.display());
            restored.poweroff();
        } else if n.exists() {
            // Whatever was left must be refused, in one line, up front.
            let error = assert_restore_refused(&n);
            eprintln!("restore of the interrupted {}: {error}", n.display());
        } else {
            eprintln!("{} is absent", n.display());
        }
    }

    let (mut guest, _) = restore(dir.path(), &a, "last", &[]);
    let got = sha(&mut guest);
    guest.poweroff();
    assert_eq!(got, want, "A restored other data after the kills");
}
