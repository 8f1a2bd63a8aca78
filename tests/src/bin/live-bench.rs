//! Live and incremental snapshot benchmark (issue 8): how long a snapshot
//! pauses the guest, stasis stop-the-world beside stasis live beside
//! QEMU's `background-snapshot`; what an incremental snapshot costs; how
//! much a live snapshot slows a guest that keeps writing memory; and how
//! soon a lazily restored live snapshot answers, beside the answer time of
//! a guest that was never snapshotted. All measured in one run on one
//! machine, so the figures compare. Run it where KVM is real: directly on
//! a hardware-KVM host, or inside the test host (`scripts/bench-live` does
//! that, carrying QEMU in).
//!
//! Every figure is measured in the run that prints it; a measurement that
//! fails prints `error="…"` in place of its figures, and the program then
//! exits 1. Progress notes go to stderr; stdout holds only the table, one
//! measurement a line of `KEY=VALUE` fields (`-` where a field does not
//! apply), in this order (sections `pause`, `qemu`, `incremental`,
//! `slowdown`, `answer`; `--only` picks some):
//!
//! ```text
//! machine kernel=… cpu="…" cpus=2 mem_mib=… kvm=kvm_amd testhost=yes quick=no
//! pause mem=256MiB vmm=stasis mode=stop-the-world runs=2 paused_ms=… paused_max_ms=… within_50ms=yes|no wall_s=… write_s=… memory_bytes=… memory_file_bytes=… state_file_bytes=… dir_bytes=… boot_s=…
//! pause mem=256MiB vmm=stasis mode=live runs=2 paused_ms=… paused_max_ms=… within_50ms=… wall_s=… write_s=… …
//! (the same two lines for 1024MiB, then for 2048MiB)
//! pause mem=256MiB vmm=qemu mode=background-snapshot paused_ms=… within_50ms=… wall_s=… total_ms=… setup_ms=… file_bytes=… boot_s=…
//! (the same for 1024MiB and 2048MiB)
//! incremental mem=1024MiB snapshot=full paused_ms=… wall_s=… write_s=… memory_file_bytes=… dir_bytes=… parent_blocks=… zero_blocks=… raw_blocks=… zstd_blocks=…
//! incremental mem=1024MiB snapshot=incremental changed_mib=16 paused_ms=… wall_s=… write_s=… memory_file_bytes=… dir_bytes=… parent_blocks=… …
//! incremental mem=1024MiB restore=chain first_answer_ms=… latency_ms=… data=same
//! slowdown mem=1024MiB stamp_mib=64 phase=before mib_per_s=… window_s=…
//! slowdown mem=1024MiB stamp_mib=64 phase=live mib_per_s=… window_s=… vs_before=… paused_ms=… wall_s=… write_s=…
//! slowdown mem=1024MiB stamp_mib=64 phase=stop-the-world mib_per_s=… window_s=… vs_before=… paused_ms=… wall_s=… write_s=…
//! slowdown mem=1024MiB stamp_mib=64 phase=after mib_per_s=… window_s=… vs_before=…
//! answer mem=1024MiB mode=booted runs=5 median_ms=… min_ms=… max_ms=… all_ms=…,…
//! answer mem=1024MiB mode=lazy-restore runs=3 median_ms=… min_ms=… max_ms=… all_ms=… latency_ms=… after_vcpus_ms=… over_floor_ms=… faults=… snapshot_mode=live
//! ```
//!
//! `--quick` (for development) measures the pauses at 256 MiB only, one
//! snapshot per mode, the other sections in a 512 MiB guest, the slowdown
//! over 3 s windows, and two restores (5 to 8 minutes in the test host on
//! the 2-core development machine, by its load; a full run 15 to 25, more
//! than a third of it QEMU's background snapshots, which took 29 s at
//! 256 MiB and 230 s at 2 GiB there, idle). `--sizes`,
//! `--pause-runs`, `--guest-mib`, `--stamp-mib`, `--window-s`, `--runs`
//! and `--only` choose otherwise.
//!
//! What each figure is:
//!
//! - `pause` (section `pause`; section `qemu` prints QEMU's lines): a
//!   guest booted with `--memory SIZE` (`boot_s`: spawn to
//!   `STASIS-GUEST-READY`) writes 64 MiB of random data to its tmpfs, then
//!   takes `--pause-runs` (2) snapshots in each mode, the modes taking
//!   turns, each into a directory of its own (removed after): `stasis
//!   snapshot --stop-the-world --then resume` and `stasis snapshot --then
//!   resume` (live). `paused_ms` is the median of the VMM's own figure (the
//!   vCPUs' pause), `paused_max_ms` the longest; `within_50ms` says whether
//!   the longest is within the issue's target; `wall_s` is the median of
//!   the client's wall time (spawn to exit: the directory is durable then),
//!   `write_s` the median of the reply's; `memory_bytes`,
//!   `memory_file_bytes`, `state_file_bytes` are the last reply's,
//!   `dir_bytes` the sum of its directory's files. The mode the reply
//!   names must be the one asked for (else the line is an error), and the
//!   guest must answer on its console after each snapshot. QEMU (Debian's
//!   qemu-system-x86_64 with KVM, the same kernel, initramfs, command line
//!   less `pci=off`, memory, one vCPU and workload) takes one snapshot of
//!   the running guest through QMP with the migration capability
//!   `background-snapshot` on: `migrate-set-capabilities`,
//!   `migrate-set-parameters max-bandwidth` 100 GiB/s, `migrate` to
//!   `exec:cat > FILE`, then `query-migrate` until completed; the VM must
//!   be running and answer after it. `paused_ms` is QEMU's `downtime`
//!   (vCPUs stopped while the device state is saved and RAM
//!   write-protected), `total_ms` its `total-time`, `setup_ms` its
//!   `setup-time`, `wall_s` from `migrate` to completed, `file_bytes` the
//!   file's size (QEMU does not fsync it; on the test host's tmpfs that
//!   costs nothing either way). QEMU tracks the guest's writes with
//!   userfaultfd write-protection (Linux 5.7 or later, anonymous memory);
//!   where it refuses, the line's error is QEMU's, with this kernel's
//!   release.
//! - `incremental`: a guest with `--guest-mib` (1024; 512 with `--quick`) holding 64 MiB of
//!   random data in /tmp/blob takes a live snapshot (`snapshot=full`), then
//!   overwrites 16 MiB of /tmp/blob from /dev/urandom (`dd conv=notrunc`),
//!   then `stasis snapshot --parent FULL` (`snapshot=incremental`; whatever
//!   else the guest wrote meanwhile is in it too). Fields as for `pause`
//!   (one snapshot each), plus the reply's block counts (`parent_blocks`:
//!   blocks left to the parent). Then the guest powers off and the
//!   incremental snapshot is restored lazily (`restore=chain`:
//!   `first_answer_ms` from spawn to the console's answer, `latency_ms`
//!   the VMM's restore_latency_ms); `data=same` when /tmp/blob's md5sum
//!   there is the one the guest printed just before the incremental
//!   snapshot (else the line is an error).
//! - `slowdown`: a guest with `--guest-mib` runs `stasis-stamp --mib
//!   STAMP_MIB` (64; it rewrites its buffer page by page and, on SIGUSR2,
//!   prints `STAMP RATE mib_per_s=R`, the MiB it wrote per second of its
//!   own clock since the previous SIGUSR2), given 10 s to fault its buffer
//!   in. `before`: the rate over `--window-s` (5) seconds. `live`: SIGUSR2
//!   right before `stasis snapshot --then resume` starts (once the guest
//!   printed the rate that resets the count) and right when it returns;
//!   the rate is the guest's over that window. `stop-the-world`: the same
//!   with `--stop-the-world`. `after`: another `--window-s` window once
//!   both snapshots are done (whatever a snapshot leaves behind, such as
//!   write tracking, shows here). `window_s` is the host's time between
//!   the two rate lines arriving; `vs_before` the rate over `before`'s;
//!   `paused_ms`, `wall_s`, `write_s` the snapshot's. A guest whose clock
//!   stood still while it was paused would hide the pause from its rate:
//!   compare `window_s`.
//! - `answer`: a guest with `--guest-mib` holding 64 MiB in tmpfs; the
//!   console's answer to `echo PONG=$((1+1))`, typed `--runs`+2 times (5)
//!   into the running guest, half a second apart, timed from typing to the
//!   answer (`booted`: the floor the console path imposes here). Then a
//!   live snapshot, power off, and `--runs` (3) lazy restores of it
//!   (`stasis restore DIR --memory lazy --json`, prefetch on), each timed
//!   from spawning the process to the answer to the same command typed at
//!   once (`lazy-restore`; as snapshot-bench's `first_answer_ms`);
//!   `latency_ms` (median) is the VMM's restore_latency_ms (process start
//!   to vCPUs running), `after_vcpus_ms` the median of each run's answer
//!   less its latency, `over_floor_ms` the median answer less the booted
//!   median, `faults` the median of the loader's fault count at power-off,
//!   `snapshot_mode` the mode the snapshot's reply named.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use stasis_e2e::bench::{
    self, ask, create_dir, dir_bytes, emit, error_field, guarded, json_field, json_int, json_num, json_object,
    marker_value, median, ms, note, opt, opt_fixed, poweroff, run_tool, secs, CommonOpts, Res, RestoreReport,
    ANSWER_TIMEOUT, EXIT_TIMEOUT, PING,
};
use stasis_e2e::Guest;

/// Memory sizes of the `pause` section, MiB.
const SIZES_FULL: &[u64] = &[256, 1024, 2048];
const SIZES_QUICK: &[u64] = &[256];
/// The issue's target for the pause, ms.
const PAUSE_TARGET_MS: f64 = 50.0;
/// Random data the guests hold in tmpfs, MiB.
const FILL_MIB: u64 = 64;
/// What the guest overwrites between the full and the incremental snapshot.
const CHANGED_MIB: u64 = 16;
/// How long stasis-stamp runs before its rate counts: its first pass over
/// its buffer faults the pages in (about 20 MiB/s in the test host).
const STAMP_WARMUP: Duration = Duration::from_secs(10);

const WORK_TIMEOUT: Duration = Duration::from_secs(300);
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);

fn usage() -> ! {
    eprintln!(
        "usage: live-bench [--quick] [--only pause,qemu,incremental,slowdown,answer] [--sizes MiB,MiB,...]\n\
         \x20                 [--pause-runs N] [--guest-mib N] [--stamp-mib N] [--window-s N] [--runs N]\n\
         \x20                 [--stasis PATH] [--images DIR] [--qemu PATH] [--qemu-cpu MODEL] [--work DIR] [--keep]\n\
         Runs where KVM is real; scripts/bench-live runs it inside the test host."
    );
    std::process::exit(2);
}

struct Opts {
    common: CommonOpts,
    sizes: Vec<u64>,
    pause: bool,
    qemu: bool,
    incremental: bool,
    slowdown: bool,
    answer: bool,
    guest_mib: Option<u64>,
    stamp_mib: u64,
    window: Option<u64>,
    runs: Option<usize>,
    pause_runs: Option<usize>,
}

impl Opts {
    fn parse() -> Opts {
        let mut o = Opts {
            common: CommonOpts::new("live-bench"),
            sizes: Vec::new(),
            pause: true,
            qemu: true,
            incremental: true,
            slowdown: true,
            answer: true,
            guest_mib: None,
            stamp_mib: 64,
            window: None,
            runs: None,
            pause_runs: None,
        };
        let number = |v: String| v.trim().parse::<u64>().unwrap_or_else(|_| usage());
        bench::parse_args(usage, |arg, value| {
            match arg {
                "--sizes" => o.sizes = value().split(',').map(|s| number(s.to_string())).collect(),
                "--only" => {
                    [o.pause, o.qemu, o.incremental, o.slowdown, o.answer] =
                        bench::flags(&value(), ["pause", "qemu", "incremental", "slowdown", "answer"])
                            .unwrap_or_else(|| usage())
                }
                "--guest-mib" => o.guest_mib = Some(number(value())),
                "--stamp-mib" => o.stamp_mib = number(value()),
                "--window-s" => o.window = Some(number(value())),
                "--runs" => o.runs = Some(number(value()).max(1) as usize),
                "--pause-runs" => o.pause_runs = Some(number(value()).max(1) as usize),
                _ => return o.common.take(arg, value),
            }
            true
        });
        if o.sizes.is_empty() {
            o.sizes = if o.common.quick { SIZES_QUICK } else { SIZES_FULL }.to_vec();
        }
        o
    }

    /// The slowdown's baseline window: 5 s, 3 s with --quick.
    fn window(&self) -> Duration {
        Duration::from_secs(self.window.unwrap_or(if self.common.quick { 3 } else { 5 }))
    }

    /// Snapshots per mode and size in `pause`: 2, 1 with --quick.
    fn pause_runs(&self) -> usize {
        self.pause_runs.unwrap_or(if self.common.quick { 1 } else { 2 })
    }

    /// The guest of `incremental`, `slowdown` and `answer`: 1024 MiB, 512
    /// with --quick.
    fn guest_mib(&self) -> u64 {
        self.guest_mib.unwrap_or(if self.common.quick { 512 } else { 1024 })
    }

    /// Lazy restores in `answer`: 3, 2 with --quick.
    fn runs(&self) -> usize {
        self.runs.unwrap_or(if self.common.quick { 2 } else { 3 })
    }
}

// ---- Output ------------------------------------------------------------------

fn within_target(paused_ms: Option<f64>) -> &'static str {
    match paused_ms {
        Some(v) if v <= PAUSE_TARGET_MS => "yes",
        Some(_) => "no",
        None => "-",
    }
}

/// `median_ms=… min_ms=… max_ms=… all_ms=a,b,…` of `v` (ms).
fn spread_fields(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let all: Vec<String> = v.iter().map(|x| format!("{x:.1}")).collect();
    format!(
        "median_ms={} min_ms={min:.1} max_ms={max:.1} all_ms={}",
        opt_fixed(median(v), 1),
        all.join(",")
    )
}

// ---- Guests ------------------------------------------------------------------

/// Fills `mib` MiB of /tmp/NAME with random data.
fn fill(guest: &mut Guest, name: &str, mib: u64) -> Res<()> {
    bench::fill(guest, name, mib, WORK_TIMEOUT)
}

/// Types PING and waits for its answer: the time from typing to it.
fn ping(guest: &mut Guest) -> Res<Duration> {
    let t = Instant::now();
    let pong = ask(guest, PING, "PONG", ANSWER_TIMEOUT)?;
    let elapsed = t.elapsed();
    if pong != "2" {
        return Err(format!("the console answered PONG={pong}, expected PONG=2"));
    }
    Ok(elapsed)
}

/// The md5sum of a file in the guest.
fn md5(guest: &mut Guest, path: &str) -> Res<String> {
    let sum = ask(guest, &format!("echo MD5=$(md5sum {path})"), "MD5", WORK_TIMEOUT)?;
    if sum.len() != 32 {
        return Err(format!("unexpected md5sum answer MD5={sum}"));
    }
    Ok(sum)
}

// ---- stasis snapshots --------------------------------------------------------------

/// How a snapshot is taken.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `--then resume`: the guest pauses only to capture state.
    Live,
    /// `--stop-the-world --then resume`.
    StopTheWorld,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Live => "live",
            Mode::StopTheWorld => "stop-the-world",
        }
    }
}

/// A snapshot's figures: the client's wall time and the reply's
/// `snapshot` object.
struct Snap {
    wall: Duration,
    reply: String,
    dir_bytes: u64,
}

impl Snap {
    fn num(&self, key: &str) -> Option<f64> {
        json_num(&self.reply, key)
    }

    fn int(&self, key: &str) -> String {
        opt(json_int(&self.reply, key))
    }

    fn paused_ms(&self) -> Option<f64> {
        self.num("paused_ms")
    }

    /// `write_s`; a VMM that predates live snapshots says `write_ms`.
    fn write_s(&self) -> Option<f64> {
        self.num("write_s").or_else(|| self.num("write_ms").map(|v| v / 1000.0))
    }

    /// `paused_ms=… wall_s=… write_s=…`.
    fn time_fields(&self) -> String {
        format!(
            "paused_ms={} wall_s={} write_s={}",
            opt_fixed(self.paused_ms(), 1),
            secs(self.wall),
            opt_fixed(self.write_s(), 3)
        )
    }

    /// `parent_blocks=… zero_blocks=… raw_blocks=… zstd_blocks=…`.
    fn block_fields(&self) -> String {
        format!(
            "parent_blocks={} zero_blocks={} raw_blocks={} zstd_blocks={}",
            self.int("parent_blocks"),
            self.int("zero_blocks"),
            self.int("raw_blocks"),
            self.int("zstd_blocks")
        )
    }
}

/// `stasis snapshot --api-sock SOCK --out OUT --then resume` in `mode`,
/// incremental over `parent` when given. The reply's mode must be `mode`'s.
fn snapshot(o: &Opts, sock: &Path, out: &Path, mode: Mode, parent: Option<&Path>) -> Res<Snap> {
    let mut cmd = Command::new(&o.common.stasis);
    cmd.arg("snapshot").arg("--api-sock").arg(sock).arg("--out").arg(out).args(["--then", "resume"]);
    if mode == Mode::StopTheWorld {
        cmd.arg("--stop-the-world");
    }
    if let Some(parent) = parent {
        cmd.arg("--parent").arg(parent);
    }
    let (wall, stdout) = run_tool(&mut cmd, SNAPSHOT_TIMEOUT)?;
    let reply = json_object(&stdout, "snapshot")
        .ok_or_else(|| format!("no snapshot object in the reply: {}", stdout.trim()))?
        .to_string();
    match json_field(&reply, "mode") {
        Some(m) if m != mode.name() => return Err(format!("asked for a {} snapshot, the reply says {m}", mode.name())),
        None => note(&format!("the reply names no mode (a VMM before live snapshots?): {reply}")),
        Some(_) => {}
    }
    Ok(Snap { wall, reply, dir_bytes: dir_bytes(out)? })
}

/// `stasis restore DIR --memory lazy --json` (prefetch on, the default),
/// timed to the console's first answer.
fn restore(o: &Opts, dir: &Path, sock: &Path) -> Res<bench::Restored> {
    bench::restore(&o.common, dir, &["--memory", "lazy"], sock)
}

// ---- Section pause: stasis ---------------------------------------------------------

/// The line of `runs` snapshots in one mode: the median pause and wall and
/// write times, the longest pause (the target holds when it is within),
/// the sizes of the last.
fn pause_fields(snaps: &[Snap], boot: Duration) -> Res<String> {
    let last = snaps.last().ok_or("no snapshot")?;
    let paused: Vec<f64> = snaps.iter().filter_map(Snap::paused_ms).collect();
    if paused.len() != snaps.len() {
        return Err(format!("a reply without paused_ms: {}", last.reply));
    }
    let max = paused.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let walls: Vec<f64> = snaps.iter().map(|s| s.wall.as_secs_f64()).collect();
    let writes: Vec<f64> = snaps.iter().filter_map(Snap::write_s).collect();
    Ok(format!(
        "runs={} paused_ms={} paused_max_ms={max:.1} within_50ms={} wall_s={} write_s={} memory_bytes={} memory_file_bytes={} \
         state_file_bytes={} dir_bytes={} boot_s={}",
        snaps.len(),
        opt_fixed(median(&paused), 1),
        within_target(Some(max)),
        opt_fixed(median(&walls), 3),
        opt_fixed(median(&writes), 3),
        last.int("memory_bytes"),
        last.int("memory_file_bytes"),
        last.int("state_file_bytes"),
        last.dir_bytes,
        secs(boot)
    ))
}

fn bench_pause(o: &Opts, mem_mib: u64) -> bool {
    let work = o.common.work.join(format!("pause-{mem_mib}"));
    let sock = work.join("vm.sock");
    let modes = [Mode::StopTheWorld, Mode::Live];
    let prefix = |mode: Mode| format!("pause mem={mem_mib}MiB vmm=stasis mode={}", mode.name());
    let prep = guarded(|| {
        create_dir(&work)?;
        note(&format!("pause {mem_mib} MiB: booting"));
        let (mut guest, boot) = o.common.boot_stasis(mem_mib, &sock)?;
        note(&format!("writing {FILL_MIB} MiB of random data to /tmp"));
        fill(&mut guest, "blob", FILL_MIB)?;
        Ok((guest, boot))
    });
    let (mut guest, boot) = match prep {
        Ok(v) => v,
        Err(e) => {
            for mode in modes {
                println!("{} {}", prefix(mode), error_field(&format!("booting: {e}")));
            }
            o.common.clean(&work);
            return true;
        }
    };
    // The modes take turns, so that whatever drifts over the runs weighs
    // on both alike.
    let mut snaps: [Res<Vec<Snap>>; 2] = [Ok(Vec::new()), Ok(Vec::new())];
    for run in 1..=o.pause_runs() {
        for (mode, done) in modes.iter().zip(snaps.iter_mut()) {
            let Ok(list) = done else { continue };
            let r = guarded(|| {
                note(&format!("pause {mem_mib} MiB: {} snapshot, run {run}", mode.name()));
                let dir = work.join(format!("{}-{run}", mode.name()));
                let s = snapshot(o, &sock, &dir, *mode, None)?;
                let _ = fs::remove_dir_all(&dir);
                // The guest runs on after it: its console answers.
                ping(&mut guest)?;
                Ok(s)
            });
            match r {
                Ok(s) => list.push(s),
                Err(e) => *done = Err(format!("run {run}: {e}")),
            }
        }
    }
    let mut failed = false;
    for (mode, done) in modes.iter().zip(&snaps) {
        let r = done.as_ref().map_err(|e| e.clone()).and_then(|list| pause_fields(list, boot));
        failed |= emit(&prefix(*mode), &r);
    }
    if let Err(e) = guarded(|| poweroff(guest, EXIT_TIMEOUT)) {
        note(&format!("pause {mem_mib} MiB: power-off failed: {e}"));
    }
    o.common.clean(&work);
    failed
}

// ---- Section qemu: background-snapshot ------------------------------------------------

/// This kernel's release, for errors that depend on it.
fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease").map_or_else(|_| "unknown".into(), |s| s.trim().to_string())
}

fn bench_qemu(o: &Opts, mem_mib: u64) -> Res<String> {
    let work = o.common.work.join(format!("qemu-{mem_mib}"));
    create_dir(&work)?;
    let file = work.join("vm.migration");
    let result = guarded(|| {
        note(&format!("qemu {mem_mib} MiB: booting"));
        let (mut guest, mut qmp, boot) = o.common.boot_qemu(mem_mib, &work.join("qmp.sock"))?;
        note(&format!("writing {FILL_MIB} MiB of random data to /tmp"));
        fill(&mut guest, "blob", FILL_MIB)?;

        note("background-snapshot to a file");
        let why = |e: String| {
            format!(
                "{e} (background-snapshot tracks writes with userfaultfd write-protection: Linux 5.7 or later, \
                 anonymous memory; kernel here {})",
                kernel_release()
            )
        };
        qmp.execute(
            r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"background-snapshot","state":true}]}}"#,
        )
        .map_err(why)?;
        qmp.execute(r#"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":107374182400}}"#)?;
        let uri = format!("exec:cat > {}", file.display());
        let t = Instant::now();
        qmp.execute(&format!(r#"{{"execute":"migrate","arguments":{{"uri":"{uri}"}}}}"#)).map_err(why)?;
        let deadline = t + SNAPSHOT_TIMEOUT;
        let done = loop {
            let reply = qmp.execute(r#"{"execute":"query-migrate"}"#)?;
            match json_field(&reply, "status") {
                Some("completed") => break reply,
                Some("failed") | Some("cancelled") => return Err(why(format!("migration failed: {}", reply.trim()))),
                _ if Instant::now() >= deadline => return Err(format!("migration not done after {SNAPSHOT_TIMEOUT:?}")),
                _ => thread::sleep(Duration::from_millis(5)),
            }
        };
        let wall = t.elapsed();
        let status = qmp.execute(r#"{"execute":"query-status"}"#)?;
        if json_field(&status, "status") != Some("running") {
            return Err(format!("the VM is not running after the background snapshot: {}", status.trim()));
        }
        ping(&mut guest)?;
        qmp.quit(guest, EXIT_TIMEOUT)?;
        let file_bytes = fs::metadata(&file).map_err(|e| format!("no migration file: {e}"))?.len();
        let downtime = json_num(&done, "downtime");
        Ok(format!(
            "paused_ms={} within_50ms={} wall_s={} total_ms={} setup_ms={} file_bytes={file_bytes} boot_s={}",
            opt(downtime),
            within_target(downtime),
            secs(wall),
            opt(json_int(&done, "total-time")),
            opt(json_int(&done, "setup-time")),
            secs(boot)
        ))
    });
    o.common.clean(&work);
    result
}

// ---- Section incremental ---------------------------------------------------------------

fn incremental_fields(s: &Snap) -> String {
    format!(
        "{} memory_file_bytes={} dir_bytes={} {}",
        s.time_fields(),
        s.int("memory_file_bytes"),
        s.dir_bytes,
        s.block_fields()
    )
}

fn bench_incremental(o: &Opts) -> bool {
    let mem = o.guest_mib();
    let work = o.common.work.join("incremental");
    let (full, inc) = (work.join("full"), work.join("incremental"));
    let prefix = format!("incremental mem={mem}MiB");
    let skipped = |e: &String| Err::<String, _>(format!("no snapshot to compare: {e}"));

    let taken = guarded(|| {
        create_dir(&work)?;
        let sock = work.join("vm.sock");
        note(&format!("incremental {mem} MiB: booting"));
        let (mut guest, _) = o.common.boot_stasis(mem, &sock)?;
        fill(&mut guest, "blob", FILL_MIB)?;
        note("full live snapshot");
        let first = snapshot(o, &sock, &full, Mode::Live, None)?;
        note(&format!("the guest overwrites {CHANGED_MIB} MiB of /tmp/blob"));
        let cmd = format!(
            "dd if=/dev/urandom of=/tmp/blob bs=1M count={CHANGED_MIB} seek=8 conv=notrunc 2>/dev/null; echo CHANGED=$((1))"
        );
        ask(&mut guest, &cmd, "CHANGED", WORK_TIMEOUT)?;
        let sum = md5(&mut guest, "/tmp/blob")?;
        note("incremental live snapshot");
        let second = snapshot(o, &sock, &inc, Mode::Live, Some(&full))?;
        poweroff(guest, EXIT_TIMEOUT)?;
        Ok((first, second, sum))
    });
    let mut failed = false;
    match &taken {
        Ok((first, second, _)) => {
            println!("{prefix} snapshot=full {}", incremental_fields(first));
            println!("{prefix} snapshot=incremental changed_mib={CHANGED_MIB} {}", incremental_fields(second));
        }
        Err(e) => {
            println!("{prefix} snapshot=full {}", error_field(e));
            println!("{prefix} snapshot=incremental changed_mib={CHANGED_MIB} {}", error_field(e));
            failed = true;
        }
    }
    let r = match &taken {
        Err(e) => skipped(e),
        Ok((_, _, sum)) => guarded(|| {
            note("lazy restore of the incremental snapshot");
            let mut r = restore(o, &inc, &work.join("restored.sock"))?;
            let restored = md5(&mut r.guest, "/tmp/blob")?;
            let output = poweroff(r.guest, EXIT_TIMEOUT)?;
            let latency = RestoreReport::parse(&output)?.latency_ms;
            if &restored != sum {
                return Err(format!("/tmp/blob's md5sum after the restore is {restored}, before the snapshot {sum}"));
            }
            Ok(format!("first_answer_ms={} latency_ms={latency:.1} data=same", ms(r.first_answer)))
        }),
    };
    failed |= emit(&format!("{prefix} restore=chain"), &r);
    o.common.clean(&work);
    failed
}

// ---- Section slowdown ---------------------------------------------------------------------

/// Sends SIGUSR2 to the stamp (its pid in the guest's `$P`) and waits for
/// its rate line; returns the rate and when the line arrived.
fn stamp_rate(guest: &mut Guest) -> Res<(f64, Instant)> {
    let from = guest.output().len();
    guest.send_line("kill -USR2 $P");
    let what = "STAMP RATE after kill -USR2";
    guest.wait_until(what, ANSWER_TIMEOUT, |t| marker_value(t, from, "mib_per_s").is_some());
    let at = Instant::now();
    let rate = marker_value(&guest.output(), from, "mib_per_s").ok_or("no mib_per_s= line")?;
    let rate: f64 = rate.parse().map_err(|_| format!("unexpected STAMP RATE mib_per_s={rate}"))?;
    Ok((rate, at))
}

/// Starts `stasis-stamp --mib N` in the background, its pid in `$P`.
fn start_stamp(guest: &mut Guest, mib: u64) -> Res<String> {
    let from = guest.output().len();
    guest.send_line(&format!("stasis-stamp --mib {mib} & P=$!"));
    let missing = |t: &str| t.get(from..).unwrap_or("").contains("stasis-stamp: not found");
    guest.wait_until("STAMP RUNNING", ANSWER_TIMEOUT, |t| marker_value(t, from, "pid").is_some() || missing(t));
    let out = guest.output();
    if missing(&out) {
        return Err("stasis-stamp is not in this guest image (guest-images/build adds it to the initramfs)".into());
    }
    marker_value(&out, from, "pid").ok_or_else(|| "no STAMP RUNNING pid= line".into())
}

fn bench_slowdown(o: &Opts) -> bool {
    let mem = o.guest_mib();
    let work = o.common.work.join("slowdown");
    let prefix = format!("slowdown mem={mem}MiB stamp_mib={}", o.stamp_mib);
    let phases = ["before", "live", "stop-the-world", "after"];
    let mut failed = false;
    let prep = guarded(|| {
        create_dir(&work)?;
        let sock = work.join("vm.sock");
        note(&format!("slowdown {mem} MiB: booting"));
        let (mut guest, _) = o.common.boot_stasis(mem, &sock)?;
        let pid = start_stamp(&mut guest, o.stamp_mib)?;
        note(&format!("stasis-stamp runs (pid {pid}); warming up"));
        // Its first pass over the buffer faults every page in: not the
        // steady rate.
        thread::sleep(STAMP_WARMUP);
        Ok((guest, sock))
    });
    let (mut guest, sock) = match prep {
        Ok(v) => v,
        Err(e) => {
            for phase in phases {
                println!("{prefix} phase={phase} {}", error_field(&e));
            }
            o.common.clean(&work);
            return true;
        }
    };

    // A window of `window` with no snapshot: the steady rate.
    let steady = |guest: &mut Guest| -> Res<(f64, Duration)> {
        let (_, t0) = stamp_rate(guest)?;
        thread::sleep(o.window());
        let (rate, t1) = stamp_rate(guest)?;
        Ok((rate, t1 - t0))
    };
    let before = guarded(|| {
        note("slowdown: rate before");
        steady(&mut guest)
    });
    let base = before.as_ref().ok().map(|(r, _)| *r);
    let vs = |rate: f64| opt(base.filter(|b| *b > 0.0).map(|b| format!("{:.3}", rate / b)));
    failed |= emit(
        &format!("{prefix} phase=before"),
        &before.as_ref().map(|(r, w)| format!("mib_per_s={r:.1} window_s={}", secs(*w))).map_err(|e| e.clone()),
    );
    for mode in [Mode::Live, Mode::StopTheWorld] {
        let r = guarded(|| {
            note(&format!("slowdown: rate during a {} snapshot", mode.name()));
            let dir = work.join(mode.name());
            let (_, t0) = stamp_rate(&mut guest)?;
            let s = snapshot(o, &sock, &dir, mode, None)?;
            let (rate, t1) = stamp_rate(&mut guest)?;
            let _ = fs::remove_dir_all(&dir);
            Ok(format!("mib_per_s={rate:.1} window_s={} vs_before={} {}", secs(t1 - t0), vs(rate), s.time_fields()))
        });
        failed |= emit(&format!("{prefix} phase={}", mode.name()), &r);
    }
    let after = guarded(|| {
        note("slowdown: rate after");
        steady(&mut guest).map(|(r, w)| format!("mib_per_s={r:.1} window_s={} vs_before={}", secs(w), vs(r)))
    });
    failed |= emit(&format!("{prefix} phase=after"), &after);
    if let Err(e) = guarded(|| poweroff(guest, EXIT_TIMEOUT)) {
        note(&format!("slowdown: power-off failed: {e}"));
    }
    o.common.clean(&work);
    failed
}

// ---- Section answer ---------------------------------------------------------------------

fn bench_answer(o: &Opts) -> bool {
    let mem = o.guest_mib();
    let work = o.common.work.join("answer");
    let snap = work.join("snap");
    let prefix = format!("answer mem={mem}MiB");
    let runs = o.runs();
    let floor_runs = runs + 2;

    let booted = guarded(|| {
        create_dir(&work)?;
        let sock = work.join("vm.sock");
        note(&format!("answer {mem} MiB: booting"));
        let (mut guest, _) = o.common.boot_stasis(mem, &sock)?;
        fill(&mut guest, "blob", FILL_MIB)?;
        // One untimed first: the shell's first command after a fill.
        ping(&mut guest)?;
        let mut floor = Vec::new();
        for _ in 0..floor_runs {
            thread::sleep(Duration::from_millis(500));
            floor.push(ping(&mut guest)?.as_secs_f64() * 1000.0);
        }
        note("live snapshot");
        let s = snapshot(o, &sock, &snap, Mode::Live, None)?;
        let mode = json_field(&s.reply, "mode").unwrap_or("-").to_string();
        poweroff(guest, EXIT_TIMEOUT)?;
        Ok((floor, mode))
    });
    let mut failed = emit(
        &format!("{prefix} mode=booted runs={floor_runs}"),
        &booted.as_ref().map(|(floor, _)| spread_fields(floor)).map_err(|e| e.clone()),
    );

    let restored = match &booted {
        Err(e) => Err(format!("no snapshot: {e}")),
        Ok((floor, mode)) => guarded(|| {
            let (mut answers, mut latencies, mut after, mut faults) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for run in 1..=runs {
                note(&format!("lazy restore {run} of {runs}"));
                let r = restore(o, &snap, &work.join(format!("restored-{run}.sock")))?;
                let output = poweroff(r.guest, EXIT_TIMEOUT)?;
                let report = RestoreReport::parse(&output)?;
                let (latency, f) = (report.latency_ms, report.faults);
                let answer = r.first_answer.as_secs_f64() * 1000.0;
                answers.push(answer);
                latencies.push(latency);
                after.push(answer - latency);
                faults.extend(f.map(|f| f as f64));
            }
            let over = median(&answers).zip(median(floor)).map(|(a, f)| a - f);
            Ok(format!(
                "{} latency_ms={} after_vcpus_ms={} over_floor_ms={} faults={} snapshot_mode={mode}",
                spread_fields(&answers),
                opt_fixed(median(&latencies), 1),
                opt_fixed(median(&after), 1),
                opt_fixed(over, 1),
                opt(median(&faults).map(|f| f as u64))
            ))
        }),
    };
    failed |= emit(&format!("{prefix} mode=lazy-restore runs={runs}"), &restored);
    o.common.clean(&work);
    failed
}

fn main() {
    let o = Opts::parse();
    bench::start("live-bench", "scripts/bench-live", &o.common);

    let mut failed = false;
    if o.pause {
        for &mem in &o.sizes {
            failed |= bench_pause(&o, mem);
        }
    }
    if o.qemu {
        match o.common.qemu_unavailable() {
            Some(reason) => {
                for &mem in &o.sizes {
                    println!("pause mem={mem}MiB vmm=qemu mode=background-snapshot {}", error_field(&format!("QEMU unavailable: {reason}")));
                }
                failed = true;
            }
            None => {
                for &mem in &o.sizes {
                    failed |= emit(&format!("pause mem={mem}MiB vmm=qemu mode=background-snapshot"), &bench_qemu(&o, mem));
                }
            }
        }
    }
    if o.incremental {
        failed |= bench_incremental(&o);
    }
    if o.slowdown {
        failed |= bench_slowdown(&o);
    }
    if o.answer {
        failed |= bench_answer(&o);
    }
    bench::finish(&o.common, failed);
}
