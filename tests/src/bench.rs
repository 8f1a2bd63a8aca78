//! What the benchmark programs (`src/bin/*-bench.rs`) share: the options
//! every one of them takes, the `machine …` line and the host checks, the
//! output table (`emit`, `error="…"`), progress notes with the elapsed
//! time, panics of the [`Guest`] helpers turned into errors, and the
//! guest-console helpers they type and read with.
//!
//! A program calls [`start`] once its options are parsed and [`finish`] at
//! the end; between them every measurement runs under [`guarded`] and
//! prints its line with [`emit`]. Below those: running a tool to its end
//! ([`run_tool`]), reading flat JSON replies ([`json_field`]) and a
//! minimal QMP client ([`Qmp`]) for QEMU's side of the comparisons.
//!
//! The snapshot benchmarks (snapshot-bench, live-bench) also share the
//! guest's command lines ([`CMDLINE`], [`QEMU_CMDLINE`]), booting stasis
//! with an API socket ([`CommonOpts::boot_stasis`]), filling tmpfs
//! ([`fill`]), lazy or eager restores timed to the console's first answer
//! ([`restore`], [`RestoreReport`]) and QEMU with a QMP socket
//! ([`CommonOpts::qemu_qmp`]).

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::{complete_lines, repo_root, Guest, READY};

/// A measurement's fields, or why it failed.
pub type Res<T> = Result<T, String>;

/// The guest's command line under stasis (its default when this was
/// written), given explicitly so the figures do not move with the default.
pub const CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off quiet";

/// The same under QEMU's pc machine, less `pci=off`: that machine has a
/// PCI bus and its ACPI tables use PCI config space (with `pci=off` the
/// guest logs "PCI: Fatal: No config space access function found" and
/// ACPI errors, and sometimes dies before its shell starts).
pub const QEMU_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";

/// Bound for a guest's boot (to its READY line) under nested KVM.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(300);
/// Bound for the console's answer to a short command, an API socket's or
/// QMP socket's appearance, a short tool run.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound for a VM to exit once told to.
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(120);

/// The command typed to see whether the console answers; prints `PONG=2`.
pub const PING: &str = "echo PONG=$((1+1))";

// ---- Options -------------------------------------------------------------------

/// The options every benchmark takes.
pub struct CommonOpts {
    /// `--quick`: smaller figures, for development.
    pub quick: bool,
    /// `--stasis PATH`: the binary under test.
    pub stasis: PathBuf,
    /// `--images DIR`: the guest images (vmlinux, initramfs.cpio.gz).
    pub images: PathBuf,
    /// `--qemu PATH`: qemu-system-x86_64.
    pub qemu_bin: PathBuf,
    /// `--qemu-cpu MODEL`.
    pub qemu_cpu: String,
    /// `--work DIR`: scratch space, removed at the end without `--keep`.
    pub work: PathBuf,
    /// `--keep`: leave the work directory.
    pub keep: bool,
}

impl CommonOpts {
    /// The defaults for `program` (its work directory is named after it).
    pub fn new(program: &str) -> CommonOpts {
        let root = repo_root();
        CommonOpts {
            quick: false,
            stasis: root.join("target/release/stasis"),
            images: root.join("guest-images/out"),
            qemu_bin: PathBuf::from("qemu-system-x86_64"),
            qemu_cpu: "host".to_string(),
            work: std::env::temp_dir().join(format!("{program}.{}", std::process::id())),
            keep: false,
        }
    }

    /// Takes `arg` if it is one of these options (`value` yields its
    /// value); returns whether it was.
    pub fn take(&mut self, arg: &str, value: &mut dyn FnMut() -> String) -> bool {
        match arg {
            "--quick" => self.quick = true,
            "--stasis" => self.stasis = PathBuf::from(value()),
            "--images" => self.images = PathBuf::from(value()),
            "--qemu" => self.qemu_bin = PathBuf::from(value()),
            "--qemu-cpu" => self.qemu_cpu = value(),
            "--work" => self.work = PathBuf::from(value()),
            "--keep" => self.keep = true,
            _ => return false,
        }
        true
    }

    pub fn kernel(&self) -> PathBuf {
        self.images.join("vmlinux")
    }

    pub fn initrd(&self) -> PathBuf {
        self.images.join("initramfs.cpio.gz")
    }

    /// `stasis boot` of the guest images with `cmdline` and `mem_mib` MiB;
    /// the caller adds its devices.
    pub fn stasis_boot(&self, cmdline: &str, mem_mib: u64) -> Command {
        let mut cmd = Command::new(&self.stasis);
        cmd.arg("boot")
            .arg("--kernel")
            .arg(self.kernel())
            .arg("--initrd")
            .arg(self.initrd())
            .args(["--cmdline", cmdline])
            .arg("--memory")
            .arg(format!("{mem_mib}M"));
        cmd
    }

    /// QEMU with KVM and one vCPU of `--qemu-cpu`, booting the guest images
    /// with `cmdline` and `mem_mib` MiB, the console on stdio, no default
    /// devices; the caller adds its machine type and devices.
    pub fn qemu(&self, cmdline: &str, mem_mib: u64) -> Command {
        let mut cmd = Command::new(&self.qemu_bin);
        cmd.args(["-nodefaults", "-no-user-config", "-enable-kvm", "-cpu", &self.qemu_cpu, "-smp", "1"])
            .arg("-m")
            .arg(format!("{mem_mib}M"))
            .args(["-display", "none", "-no-reboot", "-serial", "stdio"])
            .arg("-kernel")
            .arg(self.kernel())
            .arg("-initrd")
            .arg(self.initrd())
            .args(["-append", cmdline]);
        cmd
    }

    /// [`CommonOpts::qemu`] with [`QEMU_CMDLINE`], no network, and a QMP
    /// socket at `qmp` (for [`Qmp::connect`]); the caller removes a stale
    /// socket first.
    pub fn qemu_qmp(&self, mem_mib: u64, qmp: &Path) -> Command {
        let mut cmd = self.qemu(QEMU_CMDLINE, mem_mib);
        cmd.args(["-nic", "none"]).arg("-qmp").arg(format!("unix:{},server=on,wait=off", qmp.display()));
        cmd
    }

    /// Why `--qemu` cannot run here, if it cannot; when it can, notes its
    /// version.
    pub fn qemu_unavailable(&self) -> Option<String> {
        match version_of(&self.qemu_bin) {
            Err(e) => Some(e),
            Ok(version) => {
                note(&version);
                None
            }
        }
    }

    /// `stasis boot` of [`CMDLINE`] with `mem_mib` MiB and its API socket
    /// at `sock` (a stale one removed first); waits for the guest's READY
    /// line, then for the socket. Returns the guest and the time from
    /// spawning it to READY.
    pub fn boot_stasis(&self, mem_mib: u64, sock: &Path) -> Res<(Guest, Duration)> {
        self.boot_stasis_with(mem_mib, sock, &[])
    }

    /// [`CommonOpts::boot_stasis`] with `extra` boot options.
    pub fn boot_stasis_with(&self, mem_mib: u64, sock: &Path, extra: &[&str]) -> Res<(Guest, Duration)> {
        let _ = fs::remove_file(sock);
        let mut cmd = self.stasis_boot(CMDLINE, mem_mib);
        cmd.args(extra).arg("--api-sock").arg(sock);
        let t = Instant::now();
        let guest = Guest::spawn_command(cmd);
        guest.expect(READY, BOOT_TIMEOUT);
        let boot = t.elapsed();
        wait_for_path(sock, ANSWER_TIMEOUT)?;
        Ok((guest, boot))
    }

    /// QEMU ([`CommonOpts::qemu_qmp`]) booted with `mem_mib` MiB, its QMP
    /// socket at `qmp` (a stale one removed first) and connected. Returns
    /// the guest, the QMP client and the time from spawning it to READY.
    pub fn boot_qemu(&self, mem_mib: u64, qmp: &Path) -> Res<(Guest, Qmp, Duration)> {
        let _ = fs::remove_file(qmp);
        let t = Instant::now();
        let guest = Guest::spawn_command(self.qemu_qmp(mem_mib, qmp));
        guest.expect(READY, BOOT_TIMEOUT);
        let boot = t.elapsed();
        let client = Qmp::connect(qmp, &guest, ANSWER_TIMEOUT)?;
        Ok((guest, client, boot))
    }

    /// Removes a measurement's own work directory `dir`, unless `--keep`.
    pub fn clean(&self, dir: &Path) {
        if !self.keep {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// Walks the command line: `each(arg, value)` takes one argument, `value`
/// yielding the next one as its value. An argument `each` does not take
/// (it returns false), or a missing value, ends in `usage`.
pub fn parse_args(usage: fn() -> !, mut each: impl FnMut(&str, &mut dyn FnMut() -> String) -> bool) {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        if !each(&arg, &mut value) {
            usage();
        }
    }
}

/// Which of `names` the comma-separated `list` holds, in their order; None
/// when it holds any other name.
pub fn flags<const N: usize>(list: &str, names: [&str; N]) -> Option<[bool; N]> {
    let parts: Vec<&str> = list.split(',').map(str::trim).collect();
    if parts.iter().any(|p| !names.contains(p)) {
        return None;
    }
    Some(names.map(|name| parts.contains(&name)))
}

// ---- Start and end ---------------------------------------------------------------

struct Run {
    program: &'static str,
    started: Instant,
}

static RUN: OnceLock<Run> = OnceLock::new();

fn program() -> &'static str {
    RUN.get().map_or("bench", |r| r.program)
}

/// Starts the clock of the progress notes and the panic hook, prints the
/// `machine` line, and exits 2 unless KVM is hardware-backed and the
/// binary and images are there (`script` runs `program` inside the test
/// host, for the message).
pub fn start(program: &'static str, script: &str, o: &CommonOpts) {
    let _ = RUN.set(Run { program, started: Instant::now() });
    install_panic_hook();
    println!("{}", machine_line(o.quick));

    let hw_kvm = ["kvm_amd", "kvm_intel"].iter().any(|m| Path::new("/sys/module").join(m).exists());
    if !hw_kvm || !Path::new("/dev/kvm").exists() {
        eprintln!(
            "{program}: error: this host's KVM is not hardware-backed (no kvm_amd or kvm_intel); \
             run {script}, which runs this inside scripts/testhost"
        );
        std::process::exit(2);
    }
    for (what, path) in [("stasis", o.stasis.clone()), ("kernel", o.kernel()), ("initramfs", o.initrd())] {
        if !path.is_file() {
            eprintln!("{program}: error: {what} {} is missing (cargo build --release -p stasis; guest-images/build)", path.display());
            std::process::exit(2);
        }
    }
    if let Err(e) = fs::create_dir_all(&o.work) {
        eprintln!("{program}: error: cannot create {}: {e}", o.work.display());
        std::process::exit(2);
    }
}

/// Removes the work directory (without `--keep`), says so, and exits 1 if
/// any measurement `failed`.
pub fn finish(o: &CommonOpts, failed: bool) {
    o.clean(&o.work);
    note(if failed { "done, with failures" } else { "done" });
    if failed {
        std::process::exit(1);
    }
}

/// `machine kernel=… cpu="…" cpus=… mem_mib=… kvm=… testhost=… quick=…`.
fn machine_line(quick: bool) -> String {
    let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_string();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':').map(|(_, v)| v.trim().replace('"', "'")))
        .unwrap_or_else(|| "unknown".into());
    let cpus = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let mem_mib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .map_or("-".to_string(), |kb| (kb / 1024).to_string());
    let kvm = ["kvm_amd", "kvm_intel"]
        .into_iter()
        .find(|m| Path::new("/sys/module").join(m).exists())
        .unwrap_or("none");
    // scripts/testhost's L1 init reads its settings from this file.
    let testhost = if Path::new("/testhost/run.conf").exists() { "yes" } else { "no" };
    format!(
        "machine kernel={kernel} cpu=\"{cpu}\" cpus={cpus} mem_mib={mem_mib} kvm={kvm} testhost={testhost} quick={}",
        if quick { "yes" } else { "no" }
    )
}

// ---- Output ------------------------------------------------------------------

/// A progress note on stderr, with the seconds since the start.
pub fn note(text: &str) {
    let t = RUN.get().map_or(0.0, |r| r.started.elapsed().as_secs_f64());
    eprintln!("{}: [{t:7.1}s] {text}", program());
}

/// `error="…"`: one line, no double quotes inside, bounded.
pub fn error_field(reason: &str) -> String {
    let mut text: String = reason.replace(['\n', '\r'], " ").replace('"', "'");
    if text.len() > 300 {
        let mut cut = 300;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    format!("error=\"{text}\"")
}

/// Prints `prefix` and the fields, or the error; returns whether it failed.
pub fn emit(prefix: &str, result: &Res<String>) -> bool {
    match result {
        Ok(fields) => {
            println!("{prefix} {fields}");
            false
        }
        Err(e) => {
            println!("{prefix} {}", error_field(e));
            true
        }
    }
}

/// Seconds, to the millisecond.
pub fn secs(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64())
}

/// Milliseconds, to a tenth.
pub fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// A field's value, or `-` where there is none.
pub fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("-".to_string(), |v| v.to_string())
}

/// A number with `digits` decimals, or `-` where there is none.
pub fn opt_fixed(v: Option<f64>, digits: usize) -> String {
    opt(v.map(|v| format!("{v:.digits$}")))
}

/// The median of `v` (the mean of the middle two for an even count); None
/// when `v` is empty.
pub fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

// ---- Panics from the test helpers become errors ------------------------------

static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

fn install_panic_hook() {
    panic::set_hook(Box::new(|info| {
        let msg = if let Some(s) = info.payload().downcast_ref::<&str>() {
            (*s).to_string()
        } else if let Some(s) = info.payload().downcast_ref::<String>() {
            s.clone()
        } else {
            "panic".to_string()
        };
        // The whole message (it holds the console output so far) for
        // whoever debugs; its first line becomes the error field.
        let mut shown: String = msg.chars().take(4000).collect();
        if shown.len() < msg.len() {
            shown.push_str(" […]");
        }
        eprintln!("{}: failed: {shown}", program());
        *LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()) = Some(msg);
    }));
}

/// Runs `f`; a panic (the Guest helpers panic on timeouts) becomes an
/// error naming its first line.
pub fn guarded<T>(f: impl FnOnce() -> Res<T>) -> Res<T> {
    match panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(_) => {
            let msg = LAST_PANIC.lock().unwrap_or_else(|e| e.into_inner()).take();
            // The whole message (a timed-out wait adds where each of the
            // VMM's threads was) on stderr; its first line in the row.
            if let Some((head, threads)) = msg.as_deref().and_then(|m| m.split_once(crate::THREAD_DUMP)) {
                note(&format!("the end of its output: {}{}{threads}", last_chars(head, 2000), crate::THREAD_DUMP));
            }
            Err(msg.and_then(|m| m.lines().next().map(str::to_string)).unwrap_or_else(|| "panic".into()))
        }
    }
}

// ---- The guest console ----------------------------------------------------------

/// The value of `MARKER=value` in a complete line after byte `from`,
/// skipping the echo of the typed command (which holds `$`). Unlike
/// [`Guest::query`], the value is the first word after the `=`.
pub fn marker_value(text: &str, from: usize, marker: &str) -> Option<String> {
    let prefix = format!("{marker}=");
    complete_lines(text.get(from..).unwrap_or("")).find_map(|line| {
        let start = line.find(&prefix)?;
        // The console's echo of the typed command, even when other output
        // (a ticker's line) splits it before its `$`.
        if line[..start].contains("echo ") {
            return None;
        }
        let value = line[start + prefix.len()..].trim();
        let value = value.split_whitespace().next()?;
        (!line.contains('$')).then(|| value.to_string())
    })
}

/// Waits for `MARKER=value` after byte `from` (`what` names the wait in
/// the timeout's message); returns the value.
fn wait_value(guest: &Guest, from: usize, marker: &str, what: &str, timeout: Duration) -> Res<String> {
    guest.wait_until(what, timeout, |t| marker_value(t, from, marker).is_some());
    marker_value(&guest.output(), from, marker).ok_or_else(|| format!("no {marker}= line"))
}

/// Waits for `MARKER=value` after byte `from`; returns the value.
pub fn wait_marker(guest: &Guest, from: usize, marker: &str, timeout: Duration) -> Res<String> {
    wait_value(guest, from, marker, &format!("{marker}=…"), timeout)
}

/// Types `command` (which must print `MARKER=value` and hold a `$`) and
/// waits for the value.
pub fn ask(guest: &mut Guest, command: &str, marker: &str, timeout: Duration) -> Res<String> {
    let from = guest.output().len();
    guest.send_line(command);
    wait_value(guest, from, marker, &format!("{marker}=… after {command:?}"), timeout)
}

/// The last `n` characters of `text`.
pub fn last_chars(text: &str, n: usize) -> String {
    let chars: Vec<char> = text.chars().collect();
    chars[chars.len().saturating_sub(n)..].iter().collect()
}

/// Types `poweroff -f` and waits, at most `timeout`, for a clean exit;
/// returns everything the VM printed.
pub fn poweroff(mut guest: Guest, timeout: Duration) -> Res<String> {
    guest.send_line("poweroff -f");
    let (status, output) = guest.wait_exit(timeout);
    if !status.success() {
        return Err(format!("exit status {status} after poweroff: {}", last_chars(&output, 400)));
    }
    Ok(output)
}

/// Fills `mib` MiB of /tmp/NAME in the guest with random data, waiting at
/// most `timeout`; checks the file's size.
pub fn fill(guest: &mut Guest, name: &str, mib: u64, timeout: Duration) -> Res<()> {
    let cmd = format!("dd if=/dev/urandom of=/tmp/{name} bs=1M count={mib} 2>/dev/null; echo FILLED=$(stat -c %s /tmp/{name})");
    let size = ask(guest, &cmd, "FILLED", timeout)?;
    if size != (mib << 20).to_string() {
        return Err(format!("/tmp/{name} has {size} bytes, expected {}", mib << 20));
    }
    Ok(())
}

/// Types [`PING`] into a guest that has just been restored and waits, at
/// most `timeout`, for its answer; returns the byte offset the answer
/// follows (for [`marker_value`]: read it after taking the time).
pub fn ping_restored(guest: &mut Guest, timeout: Duration) -> usize {
    let from = guest.output().len();
    guest.send_line(PING);
    guest.wait_until("the console's answer after restore", timeout, |t| marker_value(t, from, "PONG").is_some());
    from
}

/// A restored stasis guest and the time from spawning it to its
/// console's answer.
pub struct Restored {
    pub guest: Guest,
    pub first_answer: Duration,
}

/// `stasis restore DIR ARGS --json --api-sock SOCK` (a stale socket
/// removed first), [`PING`] typed at once (the VMM queues console input
/// until the guest reads it); the answer must be `PONG=2`.
pub fn restore(o: &CommonOpts, dir: &Path, args: &[&str], sock: &Path) -> Res<Restored> {
    let _ = fs::remove_file(sock);
    let mut cmd = Command::new(&o.stasis);
    cmd.arg("restore").arg(dir).args(args).arg("--json").arg("--api-sock").arg(sock);
    let t0 = Instant::now();
    let mut guest = Guest::spawn_command(cmd);
    let from = ping_restored(&mut guest, ANSWER_TIMEOUT);
    let first_answer = t0.elapsed();
    let pong = marker_value(&guest.output(), from, "PONG");
    if pong.as_deref() != Some("2") {
        return Err(format!("the restored console answered {pong:?}, expected PONG=2"));
    }
    Ok(Restored { guest, first_answer })
}

/// The restore report (`restore --json`) in a restored VM's output.
pub struct RestoreReport {
    /// The VMM's restore_latency_ms: process start to vCPUs running.
    pub latency_ms: f64,
    /// The lazy loader's figures; None after an eager restore.
    pub faults: Option<u64>,
    pub blocks_on_fault: Option<u64>,
    pub blocks_prefetched: Option<u64>,
    /// From the fault handler's start to full residency; None until then.
    pub resident_ms: Option<u64>,
}

impl RestoreReport {
    /// Finds the report's line in `output` (everything the VM printed).
    pub fn parse(output: &str) -> Res<RestoreReport> {
        let start = output.find("{\"restore_latency_ms\"").ok_or("no restore report (--json) in the output")?;
        let json = output[start..].lines().next().unwrap_or("");
        let latency_ms = json_num(json, "restore_latency_ms").ok_or_else(|| format!("bad restore report: {json}"))?;
        Ok(RestoreReport {
            latency_ms,
            faults: json_int(json, "faults"),
            blocks_on_fault: json_int(json, "blocks_on_fault"),
            blocks_prefetched: json_int(json, "blocks_prefetched"),
            resident_ms: json_int(json, "resident_after_ms"),
        })
    }
}

/// The first line of `bin --version`.
pub fn version_of(bin: &Path) -> Res<String> {
    let out = Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    if !out.status.success() {
        return Err(format!("{} --version failed: {}", bin.display(), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or("").trim().to_string())
}

// ---- Tools, files and replies -----------------------------------------------------

/// A JSON field's raw value after `"key":` (a number, `null`, or a string
/// without its quotes). Enough for the flat replies the benchmarks read.
pub fn json_field<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let needle = format!("\"{key}\"");
    let at = text.find(&needle)? + needle.len();
    let rest = text[at..].trim_start().strip_prefix(':')?.trim_start();
    if let Some(s) = rest.strip_prefix('"') {
        return s.find('"').map(|end| &s[..end]);
    }
    let end = rest.find([',', '}', ']']).unwrap_or(rest.len());
    Some(rest[..end].trim())
}

pub fn json_num(text: &str, key: &str) -> Option<f64> {
    json_field(text, key)?.parse().ok()
}

pub fn json_int(text: &str, key: &str) -> Option<u64> {
    json_field(text, key)?.parse().ok()
}

/// The text of the object after `"key":`, braces included, so that
/// [`json_field`] reads its fields and not same-named ones around it.
/// Braces inside strings are not expected in the replies read here.
pub fn json_object<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let needle = format!("\"{key}\"");
    let at = text.find(&needle)? + needle.len();
    let rest = text[at..].trim_start().strip_prefix(':')?.trim_start();
    if !rest.starts_with('{') {
        return None;
    }
    let mut depth = 0usize;
    for (i, c) in rest.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&rest[..=i]);
                }
            }
            _ => {}
        }
    }
    None
}

/// Creates `dir` and its parents.
pub fn create_dir(dir: &Path) -> Res<()> {
    fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

/// Total size of the regular files in `dir`.
pub fn dir_bytes(dir: &Path) -> Res<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))? {
        let meta = entry.and_then(|e| e.metadata()).map_err(|e| format!("cannot stat in {}: {e}", dir.display()))?;
        if meta.is_file() {
            total += meta.len();
        }
    }
    Ok(total)
}

/// Runs `cmd` to its end, at most `timeout` (then kills it); returns its
/// wall time and stdout, or an error with its stderr when it failed.
pub fn run_tool(cmd: &mut Command, timeout: Duration) -> Res<(Duration, String)> {
    let what = format!("{cmd:?}");
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let t = Instant::now();
    let child = cmd.spawn().map_err(|e| format!("cannot start {what}: {e}"))?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(timeout) {
        Ok(out) => out.map_err(|e| format!("{what}: {e}"))?,
        Err(_) => {
            // It is our own child: end it by its id.
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            return Err(format!("{what} took longer than {timeout:?}"));
        }
    };
    let elapsed = t.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(format!("{what} failed ({}): {}", out.status, stderr.trim()));
    }
    Ok((elapsed, stdout))
}

/// Waits, at most `timeout`, until `path` exists.
pub fn wait_for_path(path: &Path, timeout: Duration) -> Res<()> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if Instant::now() >= deadline {
            return Err(format!("{} did not appear within {timeout:?}", path.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

// ---- QMP --------------------------------------------------------------------------

/// A minimal QMP (QEMU's machine protocol) client: one command a line,
/// replies read past the events.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects to the QMP socket of `guest` (a QEMU started with `-qmp
    /// unix:PATH,server=on,wait=off`), retrying for `timeout`, and leaves
    /// capabilities negotiation.
    pub fn connect(path: &Path, guest: &Guest, timeout: Duration) -> Res<Qmp> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(format!(
                        "cannot connect to QMP at {}: {e}; QEMU's output: {}",
                        path.display(),
                        last_chars(&guest.output(), 300)
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(120))).map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Qmp { reader: BufReader::new(stream), writer };
        let greeting = qmp.line()?;
        if !greeting.contains("\"QMP\"") {
            return Err(format!("unexpected QMP greeting: {greeting}"));
        }
        qmp.execute(r#"{"execute":"qmp_capabilities"}"#)?;
        Ok(qmp)
    }

    fn line(&mut self) -> Res<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("QMP connection closed".into()),
            Ok(_) => Ok(line),
            Err(e) => Err(format!("reading QMP: {e}")),
        }
    }

    /// Sends one command; returns its `return` line or its error.
    pub fn execute(&mut self, command: &str) -> Res<String> {
        self.writer
            .write_all(format!("{command}\n").as_bytes())
            .map_err(|e| format!("writing QMP: {e}"))?;
        loop {
            let line = self.line()?;
            if line.contains("\"event\"") {
                continue;
            }
            if line.contains("\"error\"") {
                return Err(format!("QMP {command} failed: {}", line.trim()));
            }
            if line.contains("\"return\"") {
                return Ok(line);
            }
        }
    }

    /// Sends `quit` and waits, at most `timeout`, for `guest` (the QEMU
    /// this client talks to) to exit cleanly.
    pub fn quit(mut self, guest: Guest, timeout: Duration) -> Res<()> {
        // The reply may not arrive before QEMU closes the socket.
        let _ = self.execute(r#"{"execute":"quit"}"#);
        drop(self);
        let (status, output) = guest.wait_exit(timeout);
        if !status.success() {
            return Err(format!("QEMU exited with {status} after quit: {}", last_chars(&output, 300)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::marker_value;

    #[test]
    fn marker_values_skip_the_typed_command_even_when_a_ticker_splits_its_echo() {
        let sum = "a".repeat(64);
        // The echo of `echo SHA=$(sha256sum /tmp/blob)` cut by a ticker's
        // line before its `$`, then the answer.
        let text = format!("echo SHA=TICK=7\n$(sha256sum /tmp/blob)\nSHA={sum}  /tmp/blob\n");
        assert_eq!(marker_value(&text, 0, "SHA"), Some(sum));
        let text = "echo PONG=$((1+1))\nPONG=2\n";
        assert_eq!(marker_value(text, 0, "PONG").as_deref(), Some("2"));
        // Only complete lines count.
        assert_eq!(marker_value("PONG=2", 0, "PONG"), None);
    }
}
