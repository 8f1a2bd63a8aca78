//! Resume benchmark (issue 12): how soon a restored guest runs again and
//! answers, stasis's lazy restore without and with a recorded working set
//! (loaded during or before the vCPUs' start) beside its eager restore and,
//! when given, Firecracker's restore of the same guest; what the loader's
//! faults cost; and four restores of one snapshot at once. All measured in
//! one run on one machine, so the figures compare. Run it where KVM is
//! real: directly on a hardware-KVM host, or inside the test host
//! (`scripts/bench-resume` does that, carrying Firecracker in when given).
//!
//! Every figure is measured in the run that prints it; a measurement that
//! fails prints `error="…"` in place of its figures, and the program then
//! exits 1. Progress notes go to stderr; stdout holds only the table, one
//! measurement a line of `KEY=VALUE` fields (`-` where a field does not
//! apply or the VMM does not report it), in this order (the lines of one
//! size, then the next size's; `firecracker` lines only with
//! `--firecracker`):
//!
//! ```text
//! machine kernel=… cpu="…" cpus=1 mem_mib=… kvm=kvm_amd testhost=yes quick=no
//! peer vmm=firecracker version="Firecracker v1.16.1"
//! floor mem=256MiB vmm=stasis runs=5 median_ms=… min_ms=… max_ms=… boot_s=…
//! snapshot mem=256MiB vmm=stasis wall_s=… paused_ms=… write_s=… memory_file_bytes=… state_file_bytes=… dir_bytes=… dir_alloc_bytes=…
//! floor mem=256MiB vmm=firecracker runs=5 median_ms=… min_ms=… max_ms=… boot_s=…
//! snapshot mem=256MiB vmm=firecracker wall_s=… pause_ms=… create_s=… mem_file_bytes=… state_file_bytes=… dir_bytes=… dir_alloc_bytes=…
//! working-set mem=256MiB window_ms=4000 state=recorded recorded_s=… first_answer_ms=… status_blocks=… blocks=… bytes=…
//! restore mem=256MiB mode=lazy runs=3 first_tick_ms=… first_answer_ms=… over_floor_ms=… latency_ms=… faults=… fault_p50_us=… fault_p99_us=… ws_state=none ws_blocks=… data=same all_answer_ms=…,…,…
//! restore mem=256MiB mode=lazy-ws-during runs=3 … ws_state=loaded …
//! restore mem=256MiB mode=lazy-ws-before runs=3 …
//! restore mem=256MiB mode=eager runs=3 … faults=- fault_p50_us=- fault_p99_us=- ws_state=- ws_blocks=- …
//! restore mem=256MiB mode=firecracker runs=3 …
//! faults mem=256MiB lazy_faults=… lazy_p50_us=… lazy_p99_us=… ws_during_faults=… ws_during_p50_us=… ws_during_p99_us=… ws_before_faults=… ws_before_p50_us=… ws_before_p99_us=…
//! concurrent mem=256MiB vmm=stasis ws=on n=4 all_answered_ms=… answers_ms=…,…,…,… data=same
//! concurrent mem=256MiB vmm=stasis ws=off n=4 …
//! concurrent mem=256MiB vmm=firecracker ws=- n=4 …
//! (the same for 1024MiB and 2048MiB; concurrent lines up to 1024MiB)
//! ```
//!
//! `--quick` (for development) measures 256 MiB only with two runs per
//! mode (about 3 minutes in the test host on the 2-core development
//! machine, Firecracker included, the test host's start too; a full run
//! should take 10 to 15). `--sizes`, `--runs`, `--floor-runs`,
//! `--window-ms`, `--concurrent` and `--only` choose otherwise. With
//! `BENCH_VMM_LOG` set, each stasis restore's log lines (`RUST_LOG`, e.g.
//! `stasis=debug` for the restore's phases) follow it on stderr;
//! `BENCH_RESTORE_ARGS` adds its words to every stasis restore's arguments.
//!
//! What each figure is:
//!
//! - The guest, the same under both VMMs: the default stasis guest images
//!   (ELF vmlinux and initramfs), [`bench::CMDLINE`], SIZE MiB, two vCPUs,
//!   no devices (stasis with `--rng off`, Firecracker's config has none).
//!   Booted (`boot_s`: spawn to `STASIS-GUEST-READY`), it writes 64 MiB of
//!   random data to /tmp/blob (tmpfs), notes its sha256sum, then starts a
//!   background loop printing `TICK=n` every half second.
//! - `floor`: that guest's console answer to `echo PONG=$((1+1))`, typed
//!   `--floor-runs` (5) times half a second apart after one untimed try,
//!   from typing to the answer: the console path's own cost, never
//!   snapshotted.
//! - `snapshot`: stasis: `stasis snapshot --then exit` (`wall_s`: the
//!   client's spawn to its exit, the directory durable; `paused_ms`,
//!   `write_s` and the sizes are the reply's; `dir_bytes` the directory's
//!   file sizes, `dir_alloc_bytes` the space they take). Firecracker:
//!   `PATCH /vm` Paused (`pause_ms`), then `PUT /snapshot/create`, Full
//!   (`create_s`); `wall_s` from the pause request to the create reply;
//!   `mem_file_bytes`, `state_file_bytes`, `dir_*` as for stasis. Then
//!   the VMM is killed.
//! - `working-set`: one lazy restore with `--working-set record
//!   --working-set-window WINDOW_MS` (4000), PING typed at once, `stasis
//!   status` polled until its `restore.loader.working_set.state` is
//!   `recorded` (`recorded_s`: from the spawn; `status_blocks`: the set's
//!   blocks there), then power-off. `blocks`, `bytes`: the `working_set`
//!   object of `stasis checkpoint inspect DIR --json`. A stasis without
//!   `--working-set` prints an error here and in the rows that need it.
//! - `restore`: each run a fresh process; the modes take turns run by run.
//!   `lazy`: `stasis restore DIR --memory lazy --working-set off`;
//!   `lazy-ws-during`, `lazy-ws-before`: `--working-set auto
//!   --working-set-load during|before` (the recorded set); `eager`:
//!   `--memory eager`; all with `--json --api-sock`, prefetch on (the
//!   default), PING typed at once. `firecracker`: a fresh `firecracker
//!   --api-sock S --no-seccomp`, then `PUT /snapshot/load` with the memory
//!   file as a `File` backend and `resume_vm: true`; PING typed as soon as
//!   the load request returns. Figures are the medians over `--runs` (3;
//!   2 with `--quick`): `first_tick_ms`,
//!   spawn to the first `TICK=` line; `first_answer_ms`, spawn to the
//!   answer (`all_answer_ms` every run's); `over_floor_ms`, that less the
//!   same VMM's floor; `latency_ms`, stasis's restore_latency_ms (process
//!   start to vCPUs running, from the `--json` report at power-off),
//!   Firecracker's spawn to the load reply; `faults`, `fault_p50_us`,
//!   `fault_p99_us`, `ws_state`, `ws_blocks`: `restore.loader` of `stasis
//!   status`, read right after the answer (eager restores have no loader).
//!   `data`: /tmp/blob's sha256sum, read after the status, against the
//!   one before the snapshot in every run (`same`, else `DIFFERENT` and
//!   the program fails).
//! - `faults`: the `restore` rows' fault count and service times side by
//!   side: without the working set (`lazy_`), with it loaded during
//!   (`ws_during_`) and before (`ws_before_`) the vCPUs' start.
//! - `concurrent`: `--concurrent` (4) restores of one snapshot started at
//!   once, each its own process and API socket, PING typed into each as
//!   for `restore` (stasis: `--working-set auto`, the recorded set, for
//!   `ws=on`; `--working-set off` for `ws=off`; Firecracker: each process
//!   loads the same state and memory files). `all_answered_ms`: from the
//!   first spawn until every one answered; `answers_ms`: each one's spawn
//!   to its answer; `data`: every guest's sha256sum against the snapshot's.
//!   At most 1024 MiB (256 with `--quick`).

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Barrier;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use stasis_e2e::bench::{
    self, ask, create_dir, dir_bytes, emit, error_field, guarded, last_chars, marker_value, median, note, opt,
    opt_fixed, poweroff, run_tool, CommonOpts, Res, ANSWER_TIMEOUT, BOOT_TIMEOUT, CMDLINE, EXIT_TIMEOUT,
    PING,
};
use stasis_e2e::{Guest, READY};

const SIZES_FULL: &[u64] = &[256, 1024, 2048];
const SIZES_QUICK: &[u64] = &[256];
/// The largest size the `concurrent` section runs at.
const CONCURRENT_MAX_FULL: u64 = 1024;
const CONCURRENT_MAX_QUICK: u64 = 256;
/// The guest's vCPUs.
const VCPUS: u64 = 2;
/// Random data the guest holds in tmpfs, MiB.
const FILL_MIB: u64 = 64;
/// What the guest prints every half second.
const TICKER: &str = "(i=0; while :; do i=$((i+1)); echo TICK=$i; sleep 0.5; done) &";
/// Prints /tmp/blob's sha256sum as `SHA=…`.
const SHA: &str = "echo SHA=$(sha256sum /tmp/blob)";

const WORK_TIMEOUT: Duration = Duration::from_secs(300);
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);
/// Several restores at once share the machine.
const CONCURRENT_TIMEOUT: Duration = Duration::from_secs(600);

fn usage() -> ! {
    eprintln!(
        "usage: resume-bench [--quick] [--sizes MiB,MiB,...] [--runs N] [--floor-runs N] [--window-ms MS]\n\
         \x20                   [--concurrent N] [--only restore,concurrent] [--firecracker PATH]\n\
         \x20                   [--stasis PATH] [--images DIR] [--work DIR] [--keep]\n\
         Runs where KVM is real; scripts/bench-resume runs it inside the test host."
    );
    std::process::exit(2);
}

struct Opts {
    common: CommonOpts,
    sizes: Vec<u64>,
    runs: Option<usize>,
    floor_runs: usize,
    window_ms: u64,
    concurrent: usize,
    restore: bool,
    concurrent_section: bool,
    firecracker: Option<PathBuf>,
}

impl Opts {
    fn parse() -> Opts {
        let mut o = Opts {
            common: CommonOpts::new("resume-bench"),
            sizes: Vec::new(),
            runs: None,
            floor_runs: 5,
            window_ms: 4000,
            concurrent: 4,
            restore: true,
            concurrent_section: true,
            firecracker: None,
        };
        let number = |v: String| v.trim().parse::<u64>().unwrap_or_else(|_| usage());
        bench::parse_args(usage, |arg, value| {
            match arg {
                "--sizes" => o.sizes = value().split(',').map(|s| number(s.to_string())).collect(),
                "--runs" => o.runs = Some(number(value()).max(1) as usize),
                "--floor-runs" => o.floor_runs = number(value()).max(1) as usize,
                "--window-ms" => o.window_ms = number(value()).max(1),
                "--concurrent" => o.concurrent = number(value()).max(1) as usize,
                "--only" => {
                    [o.restore, o.concurrent_section] =
                        bench::flags(&value(), ["restore", "concurrent"]).unwrap_or_else(|| usage())
                }
                "--firecracker" => o.firecracker = Some(PathBuf::from(value())),
                _ => return o.common.take(arg, value),
            }
            true
        });
        if o.sizes.is_empty() {
            o.sizes = if o.common.quick { SIZES_QUICK } else { SIZES_FULL }.to_vec();
        }
        // Firecracker and the VMM's API take absolute paths.
        if let Ok(work) = std::path::absolute(&o.common.work) {
            o.common.work = work;
        }
        o
    }

    /// Restores per mode: 3, 2 with --quick.
    fn runs(&self) -> usize {
        self.runs.unwrap_or(if self.common.quick { 2 } else { 3 })
    }

    fn concurrent_at(&self, mem: u64) -> bool {
        self.concurrent_section && mem <= if self.common.quick { CONCURRENT_MAX_QUICK } else { CONCURRENT_MAX_FULL }
    }
}

// ---- Output ------------------------------------------------------------------

/// Milliseconds.
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `median_ms=… min_ms=… max_ms=…` of `v` (ms).
fn spread_fields(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("median_ms={} min_ms={min:.1} max_ms={max:.1}", opt_fixed(median(v), 1))
}

/// `a,b,…` to a tenth.
fn list(v: &[f64]) -> String {
    v.iter().map(|x| format!("{x:.1}")).collect::<Vec<_>>().join(",")
}

/// [`emit`]; a line whose data differed fails too.
fn emit_checked(prefix: &str, r: &Res<String>) -> bool {
    emit(prefix, r) | r.as_ref().is_ok_and(|f| f.contains("data=DIFFERENT"))
}

/// The median of the values present, when every run has one.
fn median_of(v: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Option<Vec<f64>> = v.collect();
    v.and_then(|v| median(&v))
}

// ---- The guest console ----------------------------------------------------------

/// Whether `text` holds a whole `TICK=n` after byte `from` (the digits
/// followed by something else, so a line still arriving does not count).
/// The ticker's own command line has `TICK=$i`, which is no tick.
fn tick_after(text: &str, from: usize) -> bool {
    let text = text.get(from..).unwrap_or("");
    text.match_indices("TICK=").any(|(at, m)| {
        let rest = &text[at + m.len()..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        digits > 0 && rest.len() > digits
    })
}

/// Waits for a tick after byte `from`; returns the time since `t0`.
fn wait_tick(guest: &Guest, from: usize, t0: Instant) -> Res<Duration> {
    guest.wait_until("a TICK line", ANSWER_TIMEOUT, |t| tick_after(t, from));
    Ok(t0.elapsed())
}

/// Waits for the answer to a PING typed at byte `from`; returns the time
/// since `t0`. The answer must be `PONG=2`.
fn wait_answer(guest: &Guest, from: usize, t0: Instant, timeout: Duration) -> Res<Duration> {
    guest.wait_until("the console's answer", timeout, |t| marker_value(t, from, "PONG").is_some());
    let at = t0.elapsed();
    match marker_value(&guest.output(), from, "PONG") {
        Some(p) if p == "2" => Ok(at),
        other => Err(format!("the console answered {other:?}, expected PONG=2")),
    }
}

/// Types PING and waits for the answer: the time from typing to it.
fn ping(guest: &mut Guest) -> Res<f64> {
    let t = Instant::now();
    let pong = ask(guest, PING, "PONG", ANSWER_TIMEOUT)?;
    let elapsed = ms(t.elapsed());
    if pong != "2" {
        return Err(format!("the console answered PONG={pong}, expected PONG=2"));
    }
    Ok(elapsed)
}

/// /tmp/blob's sha256sum in the guest.
fn sha256(guest: &mut Guest) -> Res<String> {
    let sum = ask(guest, SHA, "SHA", WORK_TIMEOUT)?;
    if sum.len() != 64 {
        return Err(format!("unexpected sha256sum answer SHA={sum}"));
    }
    Ok(sum)
}

/// What a booted guest does before its snapshot: fills /tmp/blob, notes
/// its sum, starts the ticker, then measures the floor. Returns the sum
/// and the floor's answers (ms).
fn workload(o: &Opts, guest: &mut Guest) -> Res<(String, Vec<f64>)> {
    note(&format!("writing {FILL_MIB} MiB of random data to /tmp/blob"));
    bench::fill(guest, "blob", FILL_MIB, WORK_TIMEOUT)?;
    let sum = sha256(guest)?;
    let from = guest.output().len();
    guest.send_line(TICKER);
    wait_tick(guest, from, Instant::now())?;
    note("floor: answers of the booted guest");
    // One untimed first: the shell's first command after starting a job.
    ping(guest)?;
    let mut floor = Vec::new();
    for _ in 0..o.floor_runs {
        thread::sleep(Duration::from_millis(500));
        floor.push(ping(guest)?);
    }
    Ok((sum, floor))
}

// ---- Files ----------------------------------------------------------------------

/// The space the regular files in `dir` take on disk.
fn dir_alloc_bytes(dir: &Path) -> Res<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))? {
        let meta = entry.and_then(|e| e.metadata()).map_err(|e| format!("cannot stat in {}: {e}", dir.display()))?;
        if meta.is_file() {
            total += meta.blocks() * 512;
        }
    }
    Ok(total)
}

fn file_size(path: &Path) -> Res<u64> {
    Ok(fs::metadata(path).map_err(|e| format!("cannot stat {}: {e}", path.display()))?.len())
}

// ---- stasis -------------------------------------------------------------------------

/// What this stasis offers.
struct Caps {
    /// `restore --working-set` (issue 12).
    working_set: bool,
}

impl Caps {
    fn probe(o: &Opts) -> Caps {
        let help = run_tool(Command::new(&o.common.stasis).args(["restore", "--help"]), ANSWER_TIMEOUT);
        let working_set = help.is_ok_and(|(_, text)| text.contains("--working-set"));
        if !working_set {
            note("this stasis has no `restore --working-set`: the rows that need it fail, the others run without it");
        }
        Caps { working_set }
    }

    /// The arguments that keep a lazy restore from loading or recording a
    /// working set (none where there is no such thing).
    fn ws_off(&self) -> &'static [&'static str] {
        if self.working_set {
            &["--working-set", "off"]
        } else {
            &[]
        }
    }

    fn need_ws(&self) -> Res<()> {
        if self.working_set {
            Ok(())
        } else {
            Err("this stasis has no `restore --working-set`".into())
        }
    }
}

/// `stasis boot` of the guest: [`CMDLINE`], `mem` MiB, two vCPUs, no
/// devices, its API socket at `sock`. Returns it at READY, with the time
/// from the spawn.
fn boot_stasis(o: &Opts, mem: u64, sock: &Path) -> Res<(Guest, Duration)> {
    o.common.boot_stasis_with(mem, sock, &["--vcpus", &VCPUS.to_string(), "--rng", "off"])
}

/// `stasis status --api-sock SOCK`, parsed.
fn stasis_status(o: &Opts, sock: &Path) -> Res<Value> {
    let (_, out) = run_tool(Command::new(&o.common.stasis).arg("status").arg("--api-sock").arg(sock), ANSWER_TIMEOUT)?;
    serde_json::from_str(out.trim()).map_err(|e| format!("status reply is not JSON ({e}): {}", out.trim()))
}

/// `stasis snapshot --then exit` of the booted guest into `out`: the
/// `snapshot` line's fields.
fn snapshot_stasis(o: &Opts, guest: Guest, sock: &Path, out: &Path) -> Res<String> {
    let (wall, reply) = run_tool(
        Command::new(&o.common.stasis)
            .arg("snapshot")
            .arg("--api-sock")
            .arg(sock)
            .arg("--out")
            .arg(out)
            .args(["--then", "exit"]),
        SNAPSHOT_TIMEOUT,
    )?;
    let (status, output) = guest.wait_exit(EXIT_TIMEOUT);
    if !status.success() {
        return Err(format!("the VM exited with {status} after the snapshot: {}", last_chars(&output, 300)));
    }
    let reply: Value =
        serde_json::from_str(reply.trim()).map_err(|e| format!("snapshot reply is not JSON ({e}): {reply}"))?;
    let s = &reply["snapshot"];
    Ok(format!(
        "wall_s={:.3} paused_ms={} write_s={} memory_file_bytes={} state_file_bytes={} dir_bytes={} dir_alloc_bytes={}",
        wall.as_secs_f64(),
        opt_fixed(s["paused_ms"].as_f64(), 1),
        opt_fixed(s["write_s"].as_f64(), 3),
        opt(s["memory_file_bytes"].as_u64()),
        opt(s["state_file_bytes"].as_u64()),
        dir_bytes(out)?,
        dir_alloc_bytes(out)?
    ))
}

/// The restore report (`--json`, on stderr at exit) in `output`.
fn report_latency(output: &str) -> Option<f64> {
    let line = output.lines().find(|l| l.trim_start().starts_with('{') && l.contains("\"restore_latency_ms\""))?;
    let v: Value = serde_json::from_str(line.trim()).ok()?;
    v["restore_latency_ms"].as_f64()
}

/// One run of one mode.
#[derive(Default)]
struct RunFigures {
    first_tick: f64,
    first_answer: f64,
    latency: Option<f64>,
    faults: Option<f64>,
    p50: Option<f64>,
    p99: Option<f64>,
    ws_state: Option<String>,
    ws_blocks: Option<f64>,
    same: bool,
}

impl RunFigures {
    /// Takes the loader's figures from a `status` reply.
    fn loader(&mut self, status: &Value) {
        let loader = &status["restore"]["loader"];
        let num = |v: &Value| v.as_f64();
        self.faults = num(&loader["faults"]);
        self.p50 = num(&loader["fault_p50_us"]);
        self.p99 = num(&loader["fault_p99_us"]);
        self.ws_state = loader["working_set"]["state"].as_str().map(str::to_string);
        self.ws_blocks = num(&loader["working_set"]["blocks"]);
    }
}

/// One stasis restore of `dir` with `args`, timed from the spawn: first
/// tick, first answer, the loader's status right after it, the data.
fn run_stasis(o: &Opts, dir: &Path, args: &[&str], sock: &Path, sum: &str) -> Res<RunFigures> {
    let _ = fs::remove_file(sock);
    let mut cmd = Command::new(&o.common.stasis);
    cmd.arg("restore").arg(dir).args(args).arg("--json").arg("--api-sock").arg(sock);
    // For trying options out: more restore arguments for every stasis row.
    if let Ok(extra) = std::env::var("BENCH_RESTORE_ARGS") {
        cmd.args(extra.split_whitespace());
    }
    let t0 = Instant::now();
    let mut guest = Guest::spawn_command(cmd);
    // The VMM holds console input until the guest reads it.
    guest.send_line(PING);
    let mut f = RunFigures::default();
    let g = &guest;
    let (tick, answer) = thread::scope(|s| {
        let tick = s.spawn(|| guarded(|| wait_tick(g, 0, t0)));
        let answer = guarded(|| {
            let at = wait_answer(g, 0, t0, ANSWER_TIMEOUT)?;
            Ok((at, stasis_status(o, sock)?))
        });
        (tick.join().unwrap_or_else(|_| Err("the tick watcher panicked".into())), answer)
    });
    let (answered, status) = answer?;
    f.first_answer = ms(answered);
    f.first_tick = ms(tick?);
    f.loader(&status);
    f.same = sha256(&mut guest)? == sum;
    let output = poweroff(guest, EXIT_TIMEOUT)?;
    note_vmm_log(args, &output);
    f.latency = report_latency(&output);
    if f.latency.is_none() {
        note("no restore report (--json) in the VM's output");
    }
    Ok(f)
}

/// With `BENCH_VMM_LOG` set, for finding where a restore's time goes (with
/// `RUST_LOG` set too): the VMM's log lines in `output`, on stderr beside
/// the progress.
fn note_vmm_log(args: &[&str], output: &str) {
    if std::env::var_os("BENCH_VMM_LOG").is_some() {
        for line in output.lines().filter(|l| l.starts_with('[')) {
            note(&format!("vmm {}: {line}", args.join(" ")));
        }
    }
}

/// Records the working set of `dir`: the `working-set` line's fields.
fn record_working_set(o: &Opts, caps: &Caps, dir: &Path, sock: &Path) -> Res<String> {
    caps.need_ws()?;
    note(&format!("recording the working set ({} ms window)", o.window_ms));
    let window = o.window_ms.to_string();
    let args = ["--memory", "lazy", "--working-set", "record", "--working-set-window", &window];
    let t0 = Instant::now();
    let r = bench::restore(&o.common, dir, &args, sock)?;
    let deadline = Instant::now() + WORK_TIMEOUT;
    let (recorded, status) = loop {
        let status = stasis_status(o, sock)?;
        let state = status["restore"]["loader"]["working_set"]["state"].as_str().map(str::to_string);
        if state.as_deref() == Some("recorded") {
            break (t0.elapsed(), status);
        }
        if Instant::now() >= deadline {
            return Err(format!("the working set is not recorded after {WORK_TIMEOUT:?} (state {state:?})"));
        }
        thread::sleep(Duration::from_millis(100));
    };
    note_vmm_log(&args, &poweroff(r.guest, EXIT_TIMEOUT)?);
    let (_, inspect) = run_tool(
        Command::new(&o.common.stasis).args(["checkpoint", "inspect"]).arg(dir).arg("--json"),
        ANSWER_TIMEOUT,
    )?;
    let inspect: Value =
        serde_json::from_str(inspect.trim()).map_err(|e| format!("inspect --json is not JSON ({e}): {inspect}"))?;
    let ws = &inspect["working_set"];
    if let Some(why) = ws["unusable"].as_str() {
        return Err(format!("checkpoint inspect: the working set is unusable: {why}"));
    }
    Ok(format!(
        "window_ms={} state=recorded recorded_s={:.3} first_answer_ms={:.1} status_blocks={} blocks={} bytes={}",
        o.window_ms,
        recorded.as_secs_f64(),
        ms(r.first_answer),
        opt(status["restore"]["loader"]["working_set"]["blocks"].as_u64()),
        opt(ws["blocks"].as_u64()),
        opt(ws["bytes"].as_u64())
    ))
}

// ---- Firecracker --------------------------------------------------------------------

/// One HTTP/1.1 request on Firecracker's API socket, a connection of its
/// own (retried until `timeout` while the socket is not there yet); the
/// reply's body on a 2xx status, an error with the status line and body
/// otherwise.
fn fc_api(sock: &Path, method: &str, path: &str, body: &Value, timeout: Duration) -> Res<String> {
    let deadline = Instant::now() + timeout;
    let mut stream = loop {
        match UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("cannot connect to Firecracker's API at {}: {e}", sock.display()))
            }
            Err(_) => thread::sleep(Duration::from_millis(1)),
        }
    };
    let what = format!("{method} {path}");
    let io = |e: std::io::Error| format!("{what}: {e}");
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    let body = body.to_string();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).map_err(io)?;
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status).map_err(io)?;
    let code: u16 = status
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{what}: not an HTTP reply: {status:?}"))?;
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).map_err(io)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.trim().eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().map_err(|_| format!("{what}: bad Content-Length {value:?}"))?;
            }
        }
    }
    let mut reply = vec![0; length];
    reader.read_exact(&mut reply).map_err(io)?;
    let reply = String::from_utf8_lossy(&reply).into_owned();
    if (200..300).contains(&code) {
        Ok(reply)
    } else {
        Err(format!("{what}: {}: {}", status.trim(), reply.trim()))
    }
}

/// Where a Firecracker snapshot's files go.
struct FcSnapshot {
    state: PathBuf,
    memory: PathBuf,
}

impl FcSnapshot {
    fn in_dir(dir: &Path) -> FcSnapshot {
        FcSnapshot { state: dir.join("vmstate"), memory: dir.join("memory") }
    }
}

/// Firecracker booting the guest (config in `dir`, API socket `sock`).
/// Returns it at READY, with the time from the spawn.
fn boot_firecracker(o: &Opts, fc: &Path, mem: u64, dir: &Path, sock: &Path) -> Res<(Guest, Duration)> {
    let config = dir.join("config.json");
    let body = json!({
        "boot-source": {
            "kernel_image_path": o.common.kernel(),
            "initrd_path": o.common.initrd(),
            "boot_args": CMDLINE,
        },
        "drives": [],
        "machine-config": { "vcpu_count": VCPUS, "mem_size_mib": mem },
    });
    fs::write(&config, body.to_string()).map_err(|e| format!("cannot write {}: {e}", config.display()))?;
    // Firecracker refuses to start when its socket path exists.
    let _ = fs::remove_file(sock);
    let mut cmd = Command::new(fc);
    cmd.arg("--api-sock").arg(sock).arg("--config-file").arg(&config).arg("--no-seccomp");
    let t = Instant::now();
    let guest = Guest::spawn_command(cmd);
    guest.expect(READY, BOOT_TIMEOUT);
    Ok((guest, t.elapsed()))
}

/// Pauses Firecracker and writes a full snapshot to `snap`, then kills
/// it: the `snapshot` line's fields.
fn snapshot_firecracker(guest: Guest, sock: &Path, dir: &Path, snap: &FcSnapshot) -> Res<String> {
    let t = Instant::now();
    fc_api(sock, "PATCH", "/vm", &json!({ "state": "Paused" }), ANSWER_TIMEOUT)?;
    let paused = t.elapsed();
    let body = json!({ "snapshot_type": "Full", "snapshot_path": snap.state, "mem_file_path": snap.memory });
    fc_api(sock, "PUT", "/snapshot/create", &body, SNAPSHOT_TIMEOUT)?;
    let wall = t.elapsed();
    drop(guest);
    Ok(format!(
        "wall_s={:.3} pause_ms={:.1} create_s={:.3} mem_file_bytes={} state_file_bytes={} dir_bytes={} dir_alloc_bytes={}",
        wall.as_secs_f64(),
        ms(paused),
        (wall - paused).as_secs_f64(),
        file_size(&snap.memory)?,
        file_size(&snap.state)?,
        dir_bytes(dir)?,
        dir_alloc_bytes(dir)?
    ))
}

/// A fresh Firecracker that loads `snap` and resumes it. Returns it, when
/// it was spawned, and the time from then to the load's reply.
fn load_firecracker(fc: &Path, snap: &FcSnapshot, sock: &Path) -> Res<(Guest, Instant, Duration)> {
    let _ = fs::remove_file(sock);
    let mut cmd = Command::new(fc);
    cmd.arg("--api-sock").arg(sock).arg("--no-seccomp");
    let t0 = Instant::now();
    let guest = Guest::spawn_command(cmd);
    let body = json!({
        "snapshot_path": snap.state,
        "mem_backend": { "backend_type": "File", "backend_path": snap.memory },
        "resume_vm": true,
    });
    fc_api(sock, "PUT", "/snapshot/load", &body, ANSWER_TIMEOUT)?;
    Ok((guest, t0, t0.elapsed()))
}

/// One Firecracker restore: first tick and answer, timed from the spawn,
/// then the data.
fn run_firecracker(fc: &Path, snap: &FcSnapshot, sock: &Path, sum: &str) -> Res<RunFigures> {
    let (mut guest, t0, loaded) = load_firecracker(fc, snap, sock)?;
    let from = guest.output().len();
    guest.send_line(PING);
    let g = &guest;
    let (tick, answer) = thread::scope(|s| {
        // A tick between the vCPUs' resume and the load's reply is timed
        // here, a moment late.
        let tick = s.spawn(|| guarded(|| wait_tick(g, 0, t0)));
        let answer = guarded(|| wait_answer(g, from, t0, ANSWER_TIMEOUT));
        (tick.join().unwrap_or_else(|_| Err("the tick watcher panicked".into())), answer)
    });
    let mut f = RunFigures {
        first_answer: ms(answer?),
        first_tick: ms(tick?),
        latency: Some(ms(loaded)),
        ..Default::default()
    };
    f.same = sha256(&mut guest)? == sum;
    // Killed: it has no power-off device.
    drop(guest);
    Ok(f)
}

// ---- Restore rows -------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Lazy,
    WsDuring,
    WsBefore,
    Eager,
    Firecracker,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Lazy => "lazy",
            Mode::WsDuring => "lazy-ws-during",
            Mode::WsBefore => "lazy-ws-before",
            Mode::Eager => "eager",
            Mode::Firecracker => "firecracker",
        }
    }
}

/// A `restore` row from its runs; `floor` is the same VMM's floor median.
fn restore_fields(runs: &[RunFigures], floor: Option<f64>) -> Res<String> {
    let last = runs.last().ok_or("no run")?;
    let med = |get: fn(&RunFigures) -> Option<f64>| median_of(runs.iter().map(get));
    let answers: Vec<f64> = runs.iter().map(|r| r.first_answer).collect();
    let answer = median(&answers);
    let same = runs.iter().all(|r| r.same);
    Ok(format!(
        "runs={} first_tick_ms={} first_answer_ms={} over_floor_ms={} latency_ms={} faults={} fault_p50_us={} \
         fault_p99_us={} ws_state={} ws_blocks={} data={} all_answer_ms={}",
        runs.len(),
        opt_fixed(med(|r| Some(r.first_tick)), 1),
        opt_fixed(answer, 1),
        opt_fixed(answer.zip(floor).map(|(a, f)| a - f), 1),
        opt_fixed(med(|r| r.latency), 1),
        opt_fixed(med(|r| r.faults), 0),
        opt_fixed(med(|r| r.p50), 0),
        opt_fixed(med(|r| r.p99), 0),
        opt(last.ws_state.as_deref()),
        opt_fixed(last.ws_blocks, 0),
        if same { "same" } else { "DIFFERENT" },
        list(&answers)
    ))
}

/// `PREFIX_faults=… PREFIX_p50_us=… PREFIX_p99_us=…` of one mode's runs.
fn fault_fields(prefix: &str, runs: &Res<Vec<RunFigures>>) -> String {
    let runs = runs.as_ref().map(Vec::as_slice).unwrap_or(&[]);
    let med = |get: fn(&RunFigures) -> Option<f64>| {
        if runs.is_empty() {
            None
        } else {
            median_of(runs.iter().map(get))
        }
    };
    format!(
        "{prefix}_faults={} {prefix}_p50_us={} {prefix}_p99_us={}",
        opt_fixed(med(|r| r.faults), 0),
        opt_fixed(med(|r| r.p50), 0),
        opt_fixed(med(|r| r.p99), 0)
    )
}

// ---- Concurrent restores ------------------------------------------------------------

/// `n` restores started at once by `start` (given its index; returns the
/// guest and its own spawn-to-answer time); then every guest's data, then
/// `stop` for each. The `concurrent` line's fields.
fn concurrent(
    n: usize,
    sum: &str,
    start: impl Fn(usize) -> Res<(Guest, Duration)> + Sync,
    stop: impl Fn(Guest) -> Res<()>,
) -> Res<String> {
    let barrier = Barrier::new(n);
    let t0 = Instant::now();
    let results: Vec<Res<(Guest, Duration, Duration)>> = thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let (barrier, start) = (&barrier, &start);
                s.spawn(move || {
                    barrier.wait();
                    guarded(|| start(i)).map(|(g, answer)| (g, answer, t0.elapsed()))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("a restore thread panicked".into()))).collect()
    });
    let mut guests = Vec::new();
    let (mut answers, mut all) = (Vec::new(), Duration::ZERO);
    for r in results {
        let (guest, answer, at) = r?;
        answers.push(ms(answer));
        all = all.max(at);
        guests.push(guest);
    }
    let mut same = true;
    for guest in &mut guests {
        same &= sha256(guest)? == sum;
    }
    for guest in guests {
        stop(guest)?;
    }
    Ok(format!(
        "n={n} all_answered_ms={:.1} answers_ms={} data={}",
        ms(all),
        list(&answers),
        if same { "same" } else { "DIFFERENT" }
    ))
}

// ---- One size ----------------------------------------------------------------------

/// A snapshot ready to restore: the data's sum and the floor.
struct Prepared {
    sum: String,
    floor: Option<f64>,
}

fn bench_size(o: &Opts, caps: &Caps, mem: u64) -> bool {
    let work = o.common.work.join(format!("size-{mem}"));
    let snap = work.join("stasis-snap");
    let fc_dir = work.join("firecracker-snap");
    let fc_snap = FcSnapshot::in_dir(&fc_dir);
    let size = format!("mem={mem}MiB");
    let mut failed = false;

    // stasis: boot, workload, floor, snapshot.
    let taken = guarded(|| {
        create_dir(&work)?;
        note(&format!("{mem} MiB: booting stasis"));
        let sock = work.join("boot.sock");
        let (mut guest, boot) = boot_stasis(o, mem, &sock)?;
        let (sum, floor) = workload(o, &mut guest)?;
        note("stasis snapshot --then exit");
        let fields = snapshot_stasis(o, guest, &sock, &snap)?;
        Ok((sum, floor, boot, fields))
    });
    let stasis = match taken {
        Ok((sum, floor, boot, fields)) => {
            println!(
                "floor {size} vmm=stasis runs={} {} boot_s={:.3}",
                floor.len(),
                spread_fields(&floor),
                boot.as_secs_f64()
            );
            println!("snapshot {size} vmm=stasis {fields}");
            Ok(Prepared { sum, floor: median(&floor) })
        }
        Err(e) => {
            println!("floor {size} vmm=stasis {}", error_field(&e));
            println!("snapshot {size} vmm=stasis {}", error_field(&e));
            failed = true;
            Err(format!("no stasis snapshot: {e}"))
        }
    };

    // Firecracker: the same.
    let firecracker = o.firecracker.as_deref().map(|fc| {
        let taken = guarded(|| {
            create_dir(&fc_dir)?;
            note(&format!("{mem} MiB: booting Firecracker"));
            let sock = work.join("fc-boot.sock");
            let (mut guest, boot) = boot_firecracker(o, fc, mem, &fc_dir, &sock)?;
            let (sum, floor) = workload(o, &mut guest)?;
            note("Firecracker: pause, snapshot/create");
            let fields = snapshot_firecracker(guest, &sock, &fc_dir, &fc_snap)?;
            Ok((sum, floor, boot, fields))
        });
        match taken {
            Ok((sum, floor, boot, fields)) => {
                println!(
                    "floor {size} vmm=firecracker runs={} {} boot_s={:.3}",
                    floor.len(),
                    spread_fields(&floor),
                    boot.as_secs_f64()
                );
                println!("snapshot {size} vmm=firecracker {fields}");
                Ok((fc, Prepared { sum, floor: median(&floor) }))
            }
            Err(e) => {
                println!("floor {size} vmm=firecracker {}", error_field(&e));
                println!("snapshot {size} vmm=firecracker {}", error_field(&e));
                failed = true;
                Err(format!("no Firecracker snapshot: {e}"))
            }
        }
    });

    // The working set, recorded once.
    let recorded: Res<()> = if o.restore || o.concurrent_at(mem) {
        let r = match &stasis {
            Err(e) => Err(e.clone()),
            Ok(_) => guarded(|| record_working_set(o, caps, &snap, &work.join("record.sock"))),
        };
        failed |= emit(&format!("working-set {size}"), &r);
        r.map(|_| ()).map_err(|e| format!("no working set: {e}"))
    } else {
        Ok(())
    };

    if o.restore {
        let mut modes = vec![Mode::Lazy, Mode::WsDuring, Mode::WsBefore, Mode::Eager];
        if firecracker.is_some() {
            modes.push(Mode::Firecracker);
        }
        let mut results: Vec<Res<Vec<RunFigures>>> = modes.iter().map(|_| Ok(Vec::new())).collect();
        // The modes take turns, so that whatever drifts over the runs
        // weighs on all alike.
        for run in 1..=o.runs() {
            for (mode, done) in modes.iter().zip(results.iter_mut()) {
                let Ok(list) = done else { continue };
                let sock = work.join(format!("{}-{run}.sock", mode.name()));
                let r = guarded(|| {
                    note(&format!("{mem} MiB: {} restore, run {run}", mode.name()));
                    let ws = |load: &'static str| -> Res<Vec<&'static str>> {
                        caps.need_ws()?;
                        recorded.clone()?;
                        Ok(vec!["--memory", "lazy", "--working-set", "auto", "--working-set-load", load])
                    };
                    match mode {
                        Mode::Firecracker => match &firecracker {
                            Some(Ok((fc, p))) => run_firecracker(fc, &fc_snap, &sock, &p.sum),
                            Some(Err(e)) => Err(e.clone()),
                            None => Err("no --firecracker".into()),
                        },
                        _ => {
                            let p = stasis.as_ref().map_err(String::clone)?;
                            let args = match mode {
                                Mode::Lazy => [&["--memory", "lazy"][..], caps.ws_off()].concat(),
                                Mode::WsDuring => ws("during")?,
                                Mode::WsBefore => ws("before")?,
                                _ => vec!["--memory", "eager"],
                            };
                            run_stasis(o, &snap, &args, &sock, &p.sum)
                        }
                    }
                });
                match r {
                    Ok(f) => list.push(f),
                    Err(e) => *done = Err(format!("run {run}: {e}")),
                }
            }
        }
        for (mode, done) in modes.iter().zip(&results) {
            let floor = match mode {
                Mode::Firecracker => firecracker.as_ref().and_then(|f| f.as_ref().ok()).and_then(|(_, p)| p.floor),
                _ => stasis.as_ref().ok().and_then(|p| p.floor),
            };
            let r = done.as_ref().map_err(String::clone).and_then(|runs| restore_fields(runs, floor));
            failed |= emit_checked(&format!("restore {size} mode={}", mode.name()), &r);
        }
        println!(
            "faults {size} {} {} {}",
            fault_fields("lazy", &results[0]),
            fault_fields("ws_during", &results[1]),
            fault_fields("ws_before", &results[2])
        );
    }

    if o.concurrent_at(mem) {
        let n = o.concurrent;
        for ws in [true, false] {
            let r = match &stasis {
                Err(e) => Err(e.clone()),
                Ok(p) => guarded(|| {
                    if ws {
                        caps.need_ws()?;
                        recorded.clone()?;
                    }
                    note(&format!(
                        "{mem} MiB: {n} stasis restores at once, working set {}",
                        if ws { "on" } else { "off" }
                    ));
                    let args: Vec<&str> = if ws {
                        vec!["--memory", "lazy", "--working-set", "auto"]
                    } else {
                        [&["--memory", "lazy"][..], caps.ws_off()].concat()
                    };
                    let start = |i: usize| {
                        let sock = work.join(format!("concurrent-{i}.sock"));
                        let r = bench::restore(&o.common, &snap, &args, &sock)?;
                        Ok((r.guest, r.first_answer))
                    };
                    concurrent(n, &p.sum, start, |g| poweroff(g, EXIT_TIMEOUT).map(|_| ()))
                }),
            };
            failed |= emit_checked(&format!("concurrent {size} vmm=stasis ws={}", if ws { "on" } else { "off" }), &r);
        }
        if let Some(fc) = &firecracker {
            let r = match fc {
                Err(e) => Err(e.clone()),
                Ok((fc, p)) => guarded(|| {
                    note(&format!("{mem} MiB: {n} Firecracker restores at once"));
                    let start = |i: usize| {
                        let sock = work.join(format!("fc-concurrent-{i}.sock"));
                        let (mut guest, t0, _) = load_firecracker(fc, &fc_snap, &sock)?;
                        let from = guest.output().len();
                        guest.send_line(PING);
                        let answer = wait_answer(&guest, from, t0, CONCURRENT_TIMEOUT)?;
                        Ok((guest, answer))
                    };
                    concurrent(n, &p.sum, start, |g| {
                        drop(g);
                        Ok(())
                    })
                }),
            };
            failed |= emit_checked(&format!("concurrent {size} vmm=firecracker ws=-"), &r);
        }
    }
    o.common.clean(&work);
    failed
}

fn main() {
    let o = Opts::parse();
    bench::start("resume-bench", "scripts/bench-resume", &o.common);
    let mut failed = false;
    let mut o = o;
    if let Some(fc) = o.firecracker.clone() {
        match bench::version_of(&fc) {
            Ok(v) => println!("peer vmm=firecracker version=\"{}\"", v.replace('"', "'")),
            Err(e) => {
                println!("peer vmm=firecracker {}", error_field(&e));
                failed = true;
                o.firecracker = None;
            }
        }
    }
    let caps = Caps::probe(&o);
    for &mem in &o.sizes {
        failed |= bench_size(&o, &caps, mem);
    }
    bench::finish(&o.common, failed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn tick_after_needs_whole_digits_after_the_offset() {
        let echo = "~ # (i=0; while :; do i=$((i+1)); echo TICK=$i; sleep 0.5; done) &\r\n";
        assert!(!tick_after(echo, 0), "the ticker's own command line is no tick");
        assert!(!tick_after("TICK=12", 0), "digits still arriving");
        assert!(tick_after("TICK=12\r\n", 0));
        assert!(tick_after("~ # echo PONG=$((1TICK=7\r\n+1))", 0), "a tick inside an echoed command");
        assert!(!tick_after("TICK=12\r\nrest", 9), "before the offset");
    }

    #[test]
    fn report_latency_reads_the_json_line_among_console_output() {
        let output = "PONG=2\r\n~ # poweroff -f\r\n{\"restore_latency_ms\":12.5,\"memory\":\"lazy\",\"loader\":null}\n";
        assert_eq!(report_latency(output), Some(12.5));
        assert_eq!(report_latency("no report\n"), None);
    }

    /// Serves one connection on `path` with `reply`; returns the request.
    fn serve_once(path: &Path, reply: &'static str) -> thread::JoinHandle<String> {
        let listener = UnixListener::bind(path).expect("bind");
        thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            let mut reader = BufReader::new(stream);
            let mut request = String::new();
            let mut length = 0;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).expect("read");
                if let Some(v) = line.strip_prefix("Content-Length:") {
                    length = v.trim().parse().expect("length");
                }
                request.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).expect("body");
            request.push_str(&String::from_utf8_lossy(&body));
            reader.get_mut().write_all(reply.as_bytes()).expect("reply");
            request
        })
    }

    #[test]
    fn fc_api_sends_one_request_and_takes_a_2xx_reply() {
        let dir = stasis_e2e::scratch();
        let sock = dir.path().join("api.sock");
        let server = serve_once(&sock, "HTTP/1.1 204 No Content\r\nServer: x\r\n\r\n");
        let body = json!({ "state": "Paused" });
        let reply = fc_api(&sock, "PATCH", "/vm", &body, Duration::from_secs(10));
        assert_eq!(reply, Ok(String::new()));
        let request = server.join().expect("server");
        assert!(request.starts_with("PATCH /vm HTTP/1.1\r\n"), "{request}");
        assert!(request.ends_with("\r\n\r\n{\"state\":\"Paused\"}"), "{request}");
    }

    #[test]
    fn fc_api_turns_an_error_status_into_its_body() {
        let dir = stasis_e2e::scratch();
        let sock = dir.path().join("api.sock");
        let server =
            serve_once(&sock, "HTTP/1.1 400 Bad Request\r\nContent-Length: 22\r\n\r\n{\"fault_message\":\"no\"}");
        let reply = fc_api(&sock, "PUT", "/snapshot/load", &json!({}), Duration::from_secs(10));
        server.join().expect("server");
        let e = reply.expect_err("a 400 is an error");
        assert!(e.contains("400 Bad Request") && e.contains("fault_message"), "{e}");
    }
}
