//! Snapshot and restore benchmark: stasis next to QEMU, measured in one
//! run on one machine, so the figures compare. Run it where KVM is real:
//! directly on a hardware-KVM host, or inside the test host
//! (`scripts/bench-snapshot` does that, carrying QEMU in).
//!
//! Every figure is measured in the run that prints it; a measurement that
//! fails prints `error="…"` in place of its figures, and the program then
//! exits 1. Progress notes go to stderr; stdout holds only the table, one
//! measurement a line of `KEY=VALUE` fields (`-` where a field does not
//! apply), in this order:
//!
//! ```text
//! machine kernel=… cpu="…" cpus=2 mem_mib=… kvm=kvm_amd testhost=yes quick=no
//! restore mem=1024MiB mode=lazy latency_ms=… first_answer_ms=… resident_ms=… faults=… blocks_on_fault=… blocks_prefetched=… boot_s=… snapshot_s=… snapshot_paused_ms=… snapshot_bytes=…
//! restore mem=1024MiB mode=lazy-noprefetch latency_ms=… first_answer_ms=… resident_ms=- faults=… …
//! restore mem=1024MiB mode=eager latency_ms=… first_answer_ms=… resident_ms=- faults=- blocks_on_fault=- blocks_prefetched=- boot_s=… …
//! qemu mem=1024MiB boot_s=… save_s=… migrate_ms=… file_bytes=… incoming_s=… restore_to_answer_s=…
//! read512 mode=resident seconds=… host_seconds=… guest_clock=… faults=- blocks_on_fault=- blocks_prefetched=-
//! read512 mode=lazy-64k seconds=… host_seconds=… guest_clock=… faults=… blocks_on_fault=… blocks_prefetched=…
//! read512 mode=lazy-prefetch …
//! read512 mode=eager …
//! repack block=4KiB unpack_s=… pack_s=… bytes=… regions=same
//! read512 mode=lazy-4k …
//! ```
//!
//! `--quick` (for development) measures 256 MiB only and reads a 64 MiB
//! file in a 512 MiB guest (lines `read64 …`); `--sizes`, `--read-mib`,
//! `--read-guest-mib` and `--only` choose otherwise.
//!
//! What each figure is:
//!
//! - `restore`: a guest booted with `--memory SIZE` (`boot_s`: spawn to
//!   `STASIS-GUEST-READY`) writes 64 MiB of random data to its tmpfs, then
//!   `stasis snapshot --then exit` (`snapshot_s`: the client's wall time;
//!   `snapshot_paused_ms`: the VMM's own pause; `snapshot_bytes`: the
//!   snapshot directory's files). Each restore runs `stasis restore DIR
//!   --json` with `--memory lazy` (prefetch on, the default), `--memory
//!   lazy --prefetch off` (mode `lazy-noprefetch`: faults alone, never
//!   fully resident) or `--memory eager`: `latency_ms` is the VMM's
//!   restore_latency_ms (process start to vCPUs running);
//!   `first_answer_ms` is measured here, from spawning the process to the
//!   guest's answer to `echo PONG=$((1+1))`, typed at once; `resident_ms`,
//!   `faults`, `blocks_*` are the lazy loader's figures from the report
//!   (`resident_ms` counts from the fault handler's start, just before the
//!   vCPUs run; a lazy restore waits, polling `stasis status`, until memory
//!   is fully resident before it powers off).
//! - `qemu`: Debian's qemu-system-x86_64 with KVM, the same kernel,
//!   initramfs, kernel command line (less `pci=off`, see [`bench::QEMU_CMDLINE`]),
//!   memory size, one vCPU and the same 64 MiB workload. Saved through QMP (the monitor's machine protocol;
//!   the HMP commands are front ends to the same calls):
//!   `migrate-set-parameters max-bandwidth` 100 GiB/s, `stop`,
//!   `migrate exec:cat > FILE`, then `query-migrate`
//!   until completed (`save_s`: from `stop` to completed; `migrate_ms`:
//!   QEMU's own total-time). Restored with `-incoming "exec:cat FILE"` and,
//!   once the incoming migration is done, `cont` (`incoming_s`: process
//!   start to migration done; `restore_to_answer_s`: process start to the
//!   answer to the same typed command, typed after `cont`: bytes reaching
//!   the serial port before the incoming state loads would be overwritten).
//! - `read512`: a guest with 1536 MiB holds a 512 MiB file of random data
//!   in tmpfs and reads it with `dd bs=1M of=/dev/null` (dd copies every
//!   byte to user space; busybox `cat` may use sendfile, which moves page
//!   references and need not touch the data). `seconds` is measured in the
//!   guest around dd (`guest_clock`: `date +%s%N`, or /proc/uptime in
//!   centiseconds where busybox's date lacks %N); `host_seconds` from
//!   typing the command (a shell function defined before the snapshot) to
//!   its answer. Modes: `resident` before the snapshot; `lazy-64k` after
//!   `restore --prefetch off`, the snapshot as written (64 KiB memory
//!   blocks, every block loaded on fault); `lazy-prefetch` the same
//!   snapshot with prefetch on, the read typed as soon as the console
//!   answers; `eager` after an eager restore (all memory loaded before
//!   the vCPUs run: what is left is the cost of a restored VM's first
//!   touch of each page, without userfaultfd); `lazy-4k` with prefetch off from a copy whose memory
//!   checkpoint was re-packed (`stasis checkpoint unpack`, then `pack
//!   --block-size 4K`; `repack` line) into 4 KiB blocks: one page per
//!   fault, the baseline that Firecracker's example handler represents.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use stasis_e2e::bench::{
    self, ask, create_dir, dir_bytes, emit, error_field, fill, guarded, json_field, json_int, json_num, last_chars,
    ms, note, opt, opt_fixed, ping_restored, poweroff, run_tool, secs, CommonOpts, Qmp, Res, RestoreReport,
    ANSWER_TIMEOUT, EXIT_TIMEOUT,
};
use stasis_e2e::Guest;

/// Sizes for the restore-latency table, MiB.
const SIZES_FULL: &[u64] = &[256, 1024, 2048];
const SIZES_QUICK: &[u64] = &[256];

const WORK_TIMEOUT: Duration = Duration::from_secs(300);
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(600);
const RESIDENT_TIMEOUT: Duration = Duration::from_secs(600);
const BIG_TIMEOUT: Duration = Duration::from_secs(900);
/// One read of the big file, one page per fault under nested KVM: long.
const READ_TIMEOUT: Duration = Duration::from_secs(1800);

fn usage() -> ! {
    eprintln!(
        "usage: snapshot-bench [--quick] [--sizes MiB,MiB,...] [--only restore,read512,qemu]\n\
         \x20                     [--read-mib N] [--read-guest-mib N] [--stasis PATH] [--images DIR]\n\
         \x20                     [--qemu PATH] [--qemu-cpu MODEL] [--work DIR] [--keep]\n\
         Runs where KVM is real; scripts/bench-snapshot runs it inside the test host."
    );
    std::process::exit(2);
}

struct Opts {
    common: CommonOpts,
    sizes: Vec<u64>,
    restore: bool,
    read: bool,
    qemu: bool,
    read_mib: Option<u64>,
    read_guest_mib: Option<u64>,
}

impl Opts {
    fn parse() -> Opts {
        let mut o = Opts {
            common: CommonOpts::new("snapshot-bench"),
            sizes: Vec::new(),
            restore: true,
            read: true,
            qemu: true,
            read_mib: None,
            read_guest_mib: None,
        };
        bench::parse_args(usage, |arg, value| {
            match arg {
                "--sizes" => {
                    o.sizes = value().split(',').map(|s| s.trim().parse().unwrap_or_else(|_| usage())).collect()
                }
                "--only" => {
                    [o.restore, o.read, o.qemu] =
                        bench::flags(&value(), ["restore", "read512", "qemu"]).unwrap_or_else(|| usage())
                }
                "--read-mib" => o.read_mib = Some(value().parse().unwrap_or_else(|_| usage())),
                "--read-guest-mib" => o.read_guest_mib = Some(value().parse().unwrap_or_else(|_| usage())),
                _ => return o.common.take(arg, value),
            }
            true
        });
        if o.sizes.is_empty() {
            o.sizes = if o.common.quick { SIZES_QUICK } else { SIZES_FULL }.to_vec();
        }
        o
    }

    /// The big file's size: 512 MiB, 64 MiB with --quick.
    fn read_mib(&self) -> u64 {
        self.read_mib.unwrap_or(if self.common.quick { 64 } else { 512 })
    }

    /// The memory of the guest that holds it: 1536 MiB, 512 MiB with --quick.
    fn read_guest_mib(&self) -> u64 {
        self.read_guest_mib.unwrap_or(if self.common.quick { 512 } else { 1536 })
    }
}

// ---- stasis --------------------------------------------------------------------

struct Snap {
    wall: Duration,
    paused_ms: Option<f64>,
    bytes: u64,
}

/// `stasis snapshot --then exit`, and the VM's clean exit.
fn snapshot_exit(o: &Opts, guest: Guest, sock: &Path, out: &Path) -> Res<Snap> {
    let (wall, reply) = run_tool(
        Command::new(&o.common.stasis).arg("snapshot").arg("--api-sock").arg(sock).arg("--out").arg(out).args(["--then", "exit"]),
        SNAPSHOT_TIMEOUT,
    )?;
    let (status, output) = guest.wait_exit(EXIT_TIMEOUT);
    if !status.success() {
        return Err(format!("the VM exited with {status} after the snapshot; last output: {}", last_chars(&output, 300)));
    }
    Ok(Snap { wall, paused_ms: json_num(&reply, "paused_ms"), bytes: dir_bytes(out)? })
}

/// Polls `stasis status` until the loader reports full residency.
fn wait_resident(o: &Opts, sock: &Path) -> Res<()> {
    let deadline = Instant::now() + RESIDENT_TIMEOUT;
    loop {
        let (_, reply) = run_tool(Command::new(&o.common.stasis).arg("status").arg("--api-sock").arg(sock), ANSWER_TIMEOUT)?;
        match json_field(&reply, "resident_after_ms") {
            Some(v) if v != "null" => return Ok(()),
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(format!("memory not fully resident after {RESIDENT_TIMEOUT:?}: {}", reply.trim()));
        }
        thread::sleep(Duration::from_millis(250));
    }
}

fn loader_fields(r: &RestoreReport) -> String {
    format!(
        "faults={} blocks_on_fault={} blocks_prefetched={}",
        opt(r.faults),
        opt(r.blocks_on_fault),
        opt(r.blocks_prefetched)
    )
}

// ---- Part 1: restore latency vs memory size --------------------------------------

fn bench_restore(o: &Opts, mem_mib: u64) -> bool {
    let work = o.common.work.join(format!("restore-{mem_mib}"));
    let snap_dir = work.join("snap");
    let prep = guarded(|| {
        create_dir(&work)?;
        let sock = work.join("boot.sock");
        note(&format!("restore {mem_mib} MiB: booting"));
        // boot_s runs on to the API socket's appearance (it is there by
        // READY, in practice).
        let t = Instant::now();
        let (mut guest, _) = o.common.boot_stasis(mem_mib, &sock)?;
        let boot = t.elapsed();
        note("writing 64 MiB of random data to /tmp");
        fill(&mut guest, "blob", 64, WORK_TIMEOUT)?;
        note("snapshot --then exit");
        Ok((boot, snapshot_exit(o, guest, &sock, &snap_dir)?))
    });
    let mut failed = false;
    let modes: [(&str, &[&str]); 3] = [
        ("lazy", &["--memory", "lazy"]),
        // Faults alone, without prefetch loads between them.
        ("lazy-noprefetch", &["--memory", "lazy", "--prefetch", "off"]),
        ("eager", &["--memory", "eager"]),
    ];
    for (mode, args) in modes {
        let prefix = format!("restore mem={mem_mib}MiB mode={mode}");
        let result = match &prep {
            Err(e) => Err(format!("preparing the snapshot: {e}")),
            Ok((boot, snap)) => guarded(|| {
                note(&format!("restore {mem_mib} MiB {mode}"));
                let sock = work.join(format!("{mode}.sock"));
                let r = bench::restore(&o.common, &snap_dir, args, &sock)?;
                if mode == "lazy" {
                    wait_resident(o, &sock)?;
                }
                let output = poweroff(r.guest, EXIT_TIMEOUT)?;
                let rep = RestoreReport::parse(&output)?;
                Ok(format!(
                    "latency_ms={:.1} first_answer_ms={} resident_ms={} {} boot_s={} snapshot_s={} snapshot_paused_ms={} snapshot_bytes={}",
                    rep.latency_ms,
                    ms(r.first_answer),
                    opt(rep.resident_ms),
                    loader_fields(&rep),
                    secs(*boot),
                    secs(snap.wall),
                    opt_fixed(snap.paused_ms, 1),
                    snap.bytes
                ))
            }),
        };
        failed |= emit(&prefix, &result);
    }
    o.common.clean(&work);
    failed
}

// ---- Part 2: reading a big tmpfs file ---------------------------------------------

/// How the guest times a command.
#[derive(Clone, Copy)]
enum GuestClock {
    /// `date +%s%N`, when the guest's date prints nanoseconds.
    Nanos,
    /// /proc/uptime, in centiseconds (busybox `date` may lack %N).
    Uptime,
}

impl GuestClock {
    fn name(self) -> &'static str {
        match self {
            GuestClock::Nanos => "date-ns",
            GuestClock::Uptime => "uptime-cs",
        }
    }
}

/// Picks the guest's clock and defines the shell function `rd`, which
/// reads /tmp/f to /dev/null and prints `READ=<ns>ns,<bytes>`. Defined
/// before the snapshot, it lives on in the restored shell, so each read
/// is two typed characters (typing a long line costs seconds here).
fn define_reader(guest: &mut Guest) -> Res<GuestClock> {
    let ns = ask(guest, "echo NS=$(date +%s%N)", "NS", ANSWER_TIMEOUT)?;
    let clock =
        if ns.len() >= 16 && ns.bytes().all(|b| b.is_ascii_digit()) { GuestClock::Nanos } else { GuestClock::Uptime };
    let (now, scale) = match clock {
        GuestClock::Nanos => ("$(date +%s%N)", 1),
        GuestClock::Uptime => ("$(sed 's/ .*//; s/[.]//' /proc/uptime)", 10_000_000),
    };
    // dd, not cat: dd copies every byte to user space. dd reports its byte
    // count on stderr; keep just that figure.
    let define = format!(
        "rd() {{ T0={now}; B=$(dd if=/tmp/f of=/dev/null bs=1M 2>&1 | sed -n 's/^\\([0-9]*\\) bytes.*/\\1/p'); \
         T1={now}; echo READ=$(((T1-T0)*{scale}))ns,$B; }}; echo DEFINED=$((1))"
    );
    ask(guest, &define, "DEFINED", ANSWER_TIMEOUT)?;
    Ok(clock)
}

/// Runs `rd` in the guest: (guest-timed, host-timed from typing to answer).
fn timed_read(guest: &mut Guest, expect_bytes: u64) -> Res<(Duration, Duration)> {
    let t = Instant::now();
    let answer = ask(guest, "rd", "READ", READ_TIMEOUT)?;
    let host = t.elapsed();
    let bad = || format!("unexpected answer READ={answer}");
    let (ns, bytes) = answer.split_once("ns,").ok_or_else(bad)?;
    let ns: u64 = ns.parse().map_err(|_| bad())?;
    // Empty when this busybox's dd prints no byte count.
    if !bytes.is_empty() && bytes != expect_bytes.to_string() {
        return Err(format!("dd read {bytes} bytes, expected {expect_bytes}"));
    }
    Ok((Duration::from_nanos(ns), host))
}

fn read_fields(guest_t: Duration, host_t: Duration, clock: GuestClock, report: Option<&RestoreReport>) -> String {
    let loader = report.map_or("faults=- blocks_on_fault=- blocks_prefetched=-".to_string(), loader_fields);
    format!("seconds={} host_seconds={} guest_clock={} {loader}", secs(guest_t), secs(host_t), clock.name())
}

/// Restores `dir` with `args`, reads the file, powers off.
fn restored_read(o: &Opts, dir: &Path, args: &[&str], sock: &Path, clock: GuestClock) -> Res<String> {
    let mut r = bench::restore(&o.common, dir, args, sock)?;
    let (g, h) = timed_read(&mut r.guest, o.read_mib() << 20)?;
    let output = poweroff(r.guest, EXIT_TIMEOUT)?;
    let report = RestoreReport::parse(&output)?;
    Ok(read_fields(g, h, clock, Some(&report)))
}

/// `stasis checkpoint inspect --json FILE`, for its regions.
fn regions(o: &Opts, file: &Path) -> Res<String> {
    let (_, json) = run_tool(Command::new(&o.common.stasis).args(["checkpoint", "inspect", "--json"]).arg(file), ANSWER_TIMEOUT)?;
    let at = json.find("\"regions\"").ok_or_else(|| format!("no regions in: {json}"))?;
    let end = json[at..].find(']').ok_or("unterminated regions")?;
    Ok(json[at..at + end + 1].to_string())
}

/// A copy of `snap` whose memory checkpoint is re-packed with 4 KiB
/// blocks; returns the repack line's fields.
fn repack_4k(o: &Opts, snap: &Path, out: &Path, raw: &Path) -> Res<String> {
    create_dir(out)?;
    for entry in fs::read_dir(snap).map_err(|e| format!("cannot list {}: {e}", snap.display()))? {
        let entry = entry.map_err(|e| e.to_string())?;
        if entry.file_name() != "memory.ckpt" {
            fs::copy(entry.path(), out.join(entry.file_name())).map_err(|e| format!("cannot copy {:?}: {e}", entry.path()))?;
        }
    }
    let ckpt = snap.join("memory.ckpt");
    let new = out.join("memory.ckpt");
    let (unpack, _) = run_tool(
        Command::new(&o.common.stasis).args(["checkpoint", "unpack"]).arg(&ckpt).arg("--out").arg(raw),
        BIG_TIMEOUT,
    )?;
    let (pack, _) = run_tool(
        Command::new(&o.common.stasis).args(["checkpoint", "pack"]).arg(raw).arg("--out").arg(&new).args(["--block-size", "4K"]),
        BIG_TIMEOUT,
    )?;
    let _ = fs::remove_file(raw);
    // restore refuses a checkpoint whose regions are not the machine's.
    let (before, after) = (regions(o, &ckpt)?, regions(o, &new)?);
    if before != after {
        return Err(format!("re-packed regions differ: {before} vs {after}"));
    }
    let bytes = fs::metadata(&new).map_err(|e| e.to_string())?.len();
    Ok(format!("unpack_s={} pack_s={} bytes={bytes} regions=same", secs(unpack), secs(pack)))
}

fn bench_read(o: &Opts) -> bool {
    let work = o.common.work.join("read");
    let snap = work.join("snap");
    let snap4k = work.join("snap-4k");
    let (mib, guest_mib) = (o.read_mib(), o.read_guest_mib());
    let name = format!("read{mib}");
    let mut failed = false;
    let prep = guarded(|| {
        create_dir(&work)?;
        let sock = work.join("boot.sock");
        note(&format!("{name}: booting a {guest_mib} MiB guest"));
        let (mut guest, _) = o.common.boot_stasis(guest_mib, &sock)?;
        note(&format!("writing {mib} MiB of random data to /tmp/f"));
        let t = Instant::now();
        fill(&mut guest, "f", mib, BIG_TIMEOUT)?;
        note(&format!("written in {:.1} s; reading it, fully resident", t.elapsed().as_secs_f64()));
        let clock = define_reader(&mut guest)?;
        let (g, h) = timed_read(&mut guest, mib << 20)?;
        let resident = read_fields(g, h, clock, None);
        note("snapshot --then exit");
        let s = snapshot_exit(o, guest, &sock, &snap)?;
        note(&format!("snapshot: {:.1} s, {} bytes", s.wall.as_secs_f64(), s.bytes));
        Ok((resident, clock))
    });
    let clock = match &prep {
        Ok((resident, clock)) => {
            println!("{name} mode=resident {resident}");
            Some(*clock)
        }
        Err(e) => {
            println!("{name} mode=resident {}", error_field(e));
            failed = true;
            None
        }
    };
    let skipped = || Err::<String, _>("the snapshot could not be prepared".to_string());

    let r = match clock {
        Some(clock) => guarded(|| {
            note("lazy restore, 64 KiB blocks, prefetch off");
            restored_read(o, &snap, &["--prefetch", "off"], &work.join("lazy64.sock"), clock)
        }),
        None => skipped(),
    };
    failed |= emit(&format!("{name} mode=lazy-64k"), &r);

    let r = match clock {
        Some(clock) => guarded(|| {
            note("lazy restore, 64 KiB blocks, prefetch on");
            restored_read(o, &snap, &["--prefetch", "on"], &work.join("lazyp.sock"), clock)
        }),
        None => skipped(),
    };
    failed |= emit(&format!("{name} mode=lazy-prefetch"), &r);

    let r = match clock {
        Some(clock) => guarded(|| {
            note("eager restore");
            restored_read(o, &snap, &["--memory", "eager"], &work.join("eager.sock"), clock)
        }),
        None => skipped(),
    };
    failed |= emit(&format!("{name} mode=eager"), &r);

    // Last: one page per fault is by far the slowest.
    let repack = match clock {
        Some(_) => guarded(|| {
            note("re-packing the memory checkpoint with 4 KiB blocks");
            repack_4k(o, &snap, &snap4k, &work.join("memory.raw"))
        }),
        None => skipped(),
    };
    failed |= emit("repack block=4KiB", &repack);
    let r = match (clock, &repack) {
        (Some(clock), Ok(_)) => guarded(|| {
            note("lazy restore, 4 KiB blocks, prefetch off");
            restored_read(o, &snap4k, &["--prefetch", "off"], &work.join("lazy4k.sock"), clock)
        }),
        _ => Err("no 4 KiB checkpoint".to_string()),
    };
    failed |= emit(&format!("{name} mode=lazy-4k"), &r);
    o.common.clean(&work);
    failed
}

// ---- Part 3: QEMU -------------------------------------------------------------------

fn bench_qemu(o: &Opts, mem_mib: u64) -> Res<String> {
    let work = o.common.work.join(format!("qemu-{mem_mib}"));
    create_dir(&work)?;
    let file = work.join("vm.migration");
    let result = guarded(|| {
        // Boot and dirty 64 MiB, as for stasis.
        note(&format!("qemu {mem_mib} MiB: booting"));
        let (mut guest, mut qmp, boot) = o.common.boot_qemu(mem_mib, &work.join("qmp.sock"))?;
        note("writing 64 MiB of random data to /tmp");
        fill(&mut guest, "blob", 64, WORK_TIMEOUT)?;

        note("stop + migrate to a file");
        qmp.execute(r#"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":107374182400}}"#)?;
        let t = Instant::now();
        qmp.execute(r#"{"execute":"stop"}"#)?;
        let uri = format!("exec:cat > {}", file.display());
        qmp.execute(&format!(r#"{{"execute":"migrate","arguments":{{"uri":"{uri}"}}}}"#))?;
        let deadline = t + SNAPSHOT_TIMEOUT;
        let done = loop {
            let reply = qmp.execute(r#"{"execute":"query-migrate"}"#)?;
            match json_field(&reply, "status") {
                Some("completed") => break reply,
                Some("failed") | Some("cancelled") => return Err(format!("migration failed: {}", reply.trim())),
                _ if Instant::now() >= deadline => return Err(format!("migration not done after {SNAPSHOT_TIMEOUT:?}")),
                _ => thread::sleep(Duration::from_millis(20)),
            }
        };
        let save = t.elapsed();
        let migrate_ms = json_int(&done, "total-time");
        qmp.quit(guest, EXIT_TIMEOUT)?;
        let file_bytes = fs::metadata(&file).map_err(|e| format!("no migration file: {e}"))?.len();

        note("restore: -incoming exec:cat, then cont");
        let qmp_path = work.join("qmp-in.sock");
        let _ = fs::remove_file(&qmp_path);
        let mut cmd = o.common.qemu_qmp(mem_mib, &qmp_path);
        cmd.arg("-incoming").arg(format!("exec:cat {}", file.display()));
        let t0 = Instant::now();
        let mut guest = Guest::spawn_command(cmd);
        let mut qmp = Qmp::connect(&qmp_path, &guest, ANSWER_TIMEOUT)?;
        let deadline = t0 + SNAPSHOT_TIMEOUT;
        loop {
            let reply = qmp.execute(r#"{"execute":"query-status"}"#)?;
            match json_field(&reply, "status") {
                Some("inmigrate") if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Some("paused") | Some("running") | Some("postmigrate") => break,
                _ => return Err(format!("incoming migration: {}", reply.trim())),
            }
        }
        let incoming = t0.elapsed();
        qmp.execute(r#"{"execute":"cont"}"#)?;
        ping_restored(&mut guest, ANSWER_TIMEOUT);
        let answer = t0.elapsed();
        drop(qmp);
        poweroff(guest, EXIT_TIMEOUT)?;
        Ok(format!(
            "boot_s={} save_s={} migrate_ms={} file_bytes={file_bytes} incoming_s={} restore_to_answer_s={}",
            secs(boot),
            secs(save),
            opt(migrate_ms),
            secs(incoming),
            secs(answer)
        ))
    });
    o.common.clean(&work);
    result
}

fn main() {
    let o = Opts::parse();
    bench::start("snapshot-bench", "scripts/bench-snapshot", &o.common);

    let mut failed = false;
    if o.restore {
        for &mem in &o.sizes {
            failed |= bench_restore(&o, mem);
        }
    }
    if o.qemu {
        match o.common.qemu_unavailable() {
            Some(reason) => {
                println!("qemu: unavailable: {}", reason.replace('\n', " "));
                failed = true;
            }
            None => {
                for &mem in &o.sizes {
                    failed |= emit(&format!("qemu mem={mem}MiB"), &bench_qemu(&o, mem));
                }
            }
        }
    }
    // Last: its one-page-per-fault read takes longest.
    if o.read {
        failed |= bench_read(&o);
    }
    bench::finish(&o.common, failed);
}
