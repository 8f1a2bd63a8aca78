//! Device benchmark: stasis's virtio-blk and virtio-vsock next to QEMU's
//! `-M microvm` virtio-blk (and, when given, Firecracker's), measured in one
//! run on one machine, so the figures compare. Run it where KVM is real:
//! directly on a hardware-KVM host, or inside the test host
//! (`scripts/bench-devices` does that, carrying QEMU in).
//!
//! Every figure is measured in the run that prints it; a measurement that
//! fails prints `error="…"` in place of its figures, and the program then
//! exits 1. Progress notes go to stderr; stdout holds only the table, one
//! measurement a line of `KEY=VALUE` fields, in this order:
//!
//! ```text
//! machine kernel=… cpu="…" cpus=2 mem_mib=… kvm=kvm_amd testhost=yes quick=no
//! data-disk mib=256 fill=pattern create_s=…
//! vmm name=stasis disk="preadv/pwritev, host page cache" boot_s=…
//! disk vmm=stasis test=seq-read bs=1M direct=1 mib=256 runs=3 mb_s=… iops=… min_mb_s=… max_mb_s=…
//! disk vmm=stasis test=seq-write bs=1M direct=1 mib=256 runs=3 mb_s=… iops=… min_mb_s=… max_mb_s=…
//! disk vmm=stasis test=rand-read bs=4K direct=1 seconds=20 runs=3 iops=… mb_s=… min_iops=… max_iops=…
//! vsock vmm=stasis dir=host-to-guest mib=64 mb_s=… seconds=…
//! vsock vmm=stasis dir=guest-to-host mib=64 mb_s=… seconds=…
//! vsock vmm=stasis test=connect n=50 p50_ms=… p99_ms=… min_ms=… max_ms=…
//! vmm name=qemu version="…" disk="cache=writeback,aio=threads" boot_s=…
//! disk vmm=qemu test=seq-read … (the same three disk rows)
//! vmm name=firecracker … (and its disk and vsock rows, with --firecracker)
//! ```
//!
//! What each figure is:
//!
//! - `data-disk`: a raw image (256 MiB; `--disk-mib`) written here before
//!   any VM starts, every byte non-zero, so reads hit real blocks (no
//!   holes). Every VMM gets it as its only disk, `/dev/vda`, in turn; the
//!   guest's root stays the initramfs.
//! - `disk`: the guest runs `stasis-iobench` (guest-images/tools), the same
//!   program under every VMM, on `/dev/vda` with O_DIRECT, so each block is
//!   one virtio-blk request. `seq-read`, `seq-write`: MIB MiB from offset 0
//!   in 1 MiB blocks, one request at a time (the write's `fdatasync` is in
//!   its time). `rand-read`: 4 KiB reads at 4 KiB-aligned offsets from a
//!   fixed-seed generator, queue depth 1, for SECONDS. Each test runs RUNS
//!   times in a row; the row gives the median and the extremes. `mb_s` is
//!   10^6 bytes a second, measured by the guest's clock around the I/O.
//! - Host caching: stasis does plain `preadv`/`pwritev` on the image file
//!   (host page cache, no O_DIRECT), so QEMU runs with
//!   `cache=writeback,aio=threads` (the host page cache, writes complete
//!   once in it, preadv/pwritev from a thread pool), and Firecracker with
//!   its default `Sync` engine (pread/pwrite on a cached file).
//! - `vsock`: through the VMM's Unix socket with the `CONNECT <port>`
//!   convention. `host-to-guest`: the guest's `stasis-iobench vsock-sink`
//!   reads MIB MiB and answers `received=N`; timed here from the
//!   `OK` line to that answer (every byte reached the guest's program).
//!   `guest-to-host`: `vsock-source` writes MIB MiB; timed from `OK` to
//!   its last byte. `connect`: N connections one after the other (after one
//!   untimed warm-up) to a guest accepting and closing each, timed from the
//!   Unix `connect` to the `OK` line (percentiles by nearest rank). QEMU has
//!   no rows here: its vsock is vhost-vsock, reached through AF_VSOCK on
//!   the host, not a Unix socket.
//!
//! `--quick` (for development): 128 MiB sequential passes, 5 s of random
//! reads, one run each, 16 MiB of vsock each way, 20 connects.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

// CMDLINE: the guest's command line, the same under every VMM (QEMU's
// microvm has no PCI either, so `pci=off` stays).
use stasis_e2e::bench::{
    self, emit, guarded, last_chars, median, note, secs, wait_marker, CommonOpts, Res, ANSWER_TIMEOUT, BOOT_TIMEOUT,
    CMDLINE, EXIT_TIMEOUT,
};
use stasis_e2e::{complete_lines, Guest, READY};

const MEM_MIB: u64 = 512;
const CID: u32 = 3;

/// One disk pass or vsock transfer under nested KVM.
const WORK_TIMEOUT: Duration = Duration::from_secs(600);

fn usage() -> ! {
    eprintln!(
        "usage: device-bench [--quick] [--only disk,vsock] [--vmms stasis,qemu] [--firecracker PATH]\n\
         \x20                   [--disk-mib N] [--seq-mib N] [--rand-seconds S] [--runs N] [--vsock-mib N]\n\
         \x20                   [--connects N] [--stasis PATH] [--images DIR] [--qemu PATH]\n\
         \x20                   [--qemu-cpu MODEL] [--work DIR] [--keep]\n\
         Runs where KVM is real; scripts/bench-devices runs it inside the test host."
    );
    std::process::exit(2);
}

struct Opts {
    common: CommonOpts,
    disk: bool,
    vsock: bool,
    stasis_vm: bool,
    qemu_vm: bool,
    firecracker: Option<PathBuf>,
    disk_mib: u64,
    seq_mib: u64,
    rand_seconds: u64,
    runs: usize,
    vsock_mib: u64,
    connects: usize,
}

impl Opts {
    fn parse() -> Opts {
        let mut o = Opts {
            common: CommonOpts::new("device-bench"),
            disk: true,
            vsock: true,
            stasis_vm: true,
            qemu_vm: true,
            firecracker: None,
            disk_mib: 256,
            seq_mib: 0,
            rand_seconds: 0,
            runs: 0,
            vsock_mib: 0,
            connects: 0,
        };
        let num = |v: String| v.parse::<u64>().ok().filter(|&n| n > 0).unwrap_or_else(|| usage());
        bench::parse_args(usage, |arg, value| {
            match arg {
                "--only" => [o.disk, o.vsock] = bench::flags(&value(), ["disk", "vsock"]).unwrap_or_else(|| usage()),
                "--vmms" => {
                    [o.stasis_vm, o.qemu_vm] = bench::flags(&value(), ["stasis", "qemu"]).unwrap_or_else(|| usage())
                }
                "--firecracker" => o.firecracker = Some(PathBuf::from(value())),
                "--disk-mib" => o.disk_mib = num(value()),
                "--seq-mib" => o.seq_mib = num(value()),
                "--rand-seconds" => o.rand_seconds = num(value()),
                "--runs" => o.runs = num(value()) as usize,
                "--vsock-mib" => o.vsock_mib = num(value()),
                "--connects" => o.connects = num(value()) as usize,
                _ => return o.common.take(arg, value),
            }
            true
        });
        let quick = o.common.quick;
        let pick = |set: u64, full: u64, fast: u64| if set > 0 { set } else if quick { fast } else { full };
        o.seq_mib = pick(o.seq_mib, 256, 128).min(o.disk_mib);
        o.rand_seconds = pick(o.rand_seconds, 20, 5);
        o.runs = pick(o.runs as u64, 3, 1) as usize;
        o.vsock_mib = pick(o.vsock_mib, 64, 16);
        o.connects = pick(o.connects as u64, 50, 20) as usize;
        o
    }

    fn data_disk(&self) -> PathBuf {
        self.common.work.join("data.img")
    }
}

// ---- The guest console ----------------------------------------------------------

/// A `KEY=value` field of a line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

// ---- The data disk ----------------------------------------------------------------

/// `mib` MiB of non-zero bytes (a cheap generator: content does not matter,
/// only that every block is allocated and not zero).
fn create_data_disk(path: &Path, mib: u64) -> Res<Duration> {
    let t = Instant::now();
    let mut file = fs::File::create(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..mib {
        for word in chunk.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&(state | 1).to_le_bytes());
        }
        file.write_all(&chunk).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    file.sync_all().map_err(|e| format!("cannot sync {}: {e}", path.display()))?;
    Ok(t.elapsed())
}

// ---- The VMMs ---------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Vmm {
    Stasis,
    Qemu,
    Firecracker,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Stasis => "stasis",
            Vmm::Qemu => "qemu",
            Vmm::Firecracker => "firecracker",
        }
    }

    fn has_vsock(self) -> bool {
        self != Vmm::Qemu
    }
}

fn vsock_uds(o: &Opts, vmm: Vmm) -> PathBuf {
    o.common.work.join(format!("{}-vsock.sock", vmm.name()))
}

fn boot_command(o: &Opts, vmm: Vmm) -> Res<Command> {
    let disk = o.data_disk();
    let uds = vsock_uds(o, vmm);
    let _ = fs::remove_file(&uds);
    Ok(match vmm {
        Vmm::Stasis => {
            let mut cmd = o.common.stasis_boot(CMDLINE, MEM_MIB);
            cmd.args(["--vcpus", "1"])
                .arg("--disk")
                .arg(&disk)
                .arg("--vsock")
                .arg(format!("{CID},{}", uds.display()))
                .args(["--rng", "off"]);
            cmd
        }
        Vmm::Qemu => {
            let mut cmd = o.common.qemu(CMDLINE, MEM_MIB);
            cmd.args(["-M", "microvm,acpi=on"])
                .arg("-drive")
                .arg(format!("id=d0,file={},format=raw,if=none,{QEMU_DISK_CACHE}", disk.display()))
                .args(["-device", "virtio-blk-device,drive=d0"]);
            cmd
        }
        Vmm::Firecracker => {
            let fc = o.firecracker.as_ref().ok_or("no --firecracker")?;
            let api = o.common.work.join("firecracker-api.sock");
            let _ = fs::remove_file(&api);
            let config = o.common.work.join("firecracker.json");
            let json = format!(
                r#"{{"boot-source":{{"kernel_image_path":"{}","initrd_path":"{}","boot_args":"{CMDLINE}"}},
"drives":[{{"drive_id":"data","path_on_host":"{}","is_root_device":false,"is_read_only":false}}],
"machine-config":{{"vcpu_count":1,"mem_size_mib":{MEM_MIB}}},
"vsock":{{"guest_cid":{CID},"uds_path":"{}"}}}}"#,
                o.common.kernel().display(),
                o.common.initrd().display(),
                disk.display(),
                uds.display()
            );
            fs::write(&config, json).map_err(|e| format!("cannot write {}: {e}", config.display()))?;
            let mut cmd = Command::new(fc);
            cmd.arg("--api-sock").arg(&api).arg("--config-file").arg(&config).arg("--no-seccomp");
            cmd
        }
    })
}

/// QEMU's disk caching, chosen to match stasis (see the header).
const QEMU_DISK_CACHE: &str = "cache=writeback,aio=threads";

/// The first line of `bin --version`, fit for a quoted field.
fn version_field(bin: &Path) -> Res<String> {
    Ok(bench::version_of(bin)?.replace('"', "'"))
}

fn vmm_line(o: &Opts, vmm: Vmm) -> Res<String> {
    Ok(match vmm {
        Vmm::Stasis => "disk=\"preadv/pwritev, host page cache\"".to_string(),
        Vmm::Qemu => format!("version=\"{}\" disk=\"{QEMU_DISK_CACHE}\"", version_field(&o.common.qemu_bin)?),
        Vmm::Firecracker => {
            let fc = o.firecracker.as_deref().ok_or("no --firecracker")?;
            format!("version=\"{}\" disk=\"io_engine=Sync (pread/pwrite, host page cache)\"", version_field(fc)?)
        }
    })
}

// ---- Disk ----------------------------------------------------------------------------

struct DiskTest {
    name: &'static str,
    /// The row's `bs=` and the tool's `--bs`.
    bs: &'static str,
    /// The tool's size argument.
    args: String,
    /// The row's size field.
    size_field: String,
    /// The figure the median is taken of: `mb_s` or `iops`.
    figure: &'static str,
}

fn disk_tests(o: &Opts) -> Vec<DiskTest> {
    let seq = |name| DiskTest {
        name,
        bs: "1M",
        args: format!("--mib {}", o.seq_mib),
        size_field: format!("mib={}", o.seq_mib),
        figure: "mb_s",
    };
    vec![
        seq("seq-read"),
        seq("seq-write"),
        DiskTest {
            name: "rand-read",
            bs: "4K",
            args: format!("--seconds {}", o.rand_seconds),
            size_field: format!("seconds={}", o.rand_seconds),
            figure: "iops",
        },
    ]
}

/// One run of the guest tool; its result line.
fn iobench(guest: &mut Guest, t: &DiskTest) -> Res<String> {
    let from = guest.output().len();
    guest.send_line(&format!("stasis-iobench {} /dev/vda --bs {} {}; echo IOB_RC=$?", t.name, t.bs, t.args));
    let rc = wait_marker(guest, from, "IOB_RC", WORK_TIMEOUT)?;
    let out = guest.output();
    let result = complete_lines(out.get(from..).unwrap_or(""))
        .map(str::trim)
        .find(|l| l.starts_with("iobench "))
        .map(str::to_string);
    match (rc.as_str(), result) {
        ("0", Some(line)) => Ok(line),
        _ => Err(format!("stasis-iobench {} exited {rc}: {}", t.name, last_chars(&out[from..], 300))),
    }
}

/// RUNS runs of one test: the median and extremes of its figure.
fn disk_row(o: &Opts, guest: &mut Guest, t: &DiskTest) -> Res<String> {
    let mut figures = Vec::new();
    let mut others = Vec::new();
    let other = if t.figure == "mb_s" { "iops" } else { "mb_s" };
    for _ in 0..o.runs {
        let line = iobench(guest, t)?;
        let get = |k| field(&line, k).and_then(|v| v.parse::<f64>().ok()).ok_or(format!("no {k} in {line:?}"));
        figures.push(get(t.figure)?);
        others.push(get(other)?);
    }
    let (min, max) = (figures.iter().copied().fold(f64::MAX, f64::min), figures.iter().copied().fold(0.0, f64::max));
    let mid = |v: &[f64]| median(v).ok_or_else(|| "no runs".to_string());
    Ok(format!(
        "{} runs={} {}={:.1} {other}={:.1} min_{}={min:.1} max_{}={max:.1}",
        t.size_field,
        o.runs,
        t.figure,
        mid(&figures)?,
        mid(&others)?,
        t.figure,
        t.figure
    ))
}

// ---- vsock -----------------------------------------------------------------------------

/// A stream to guest `port` through the VMM's socket, after its `OK`
/// line, and how long that took. Retries (the guest program may not be
/// listening yet) until `deadline`.
fn vsock_open(uds: &Path, port: u32, deadline: Instant) -> Res<(BufReader<UnixStream>, Duration)> {
    loop {
        let t = Instant::now();
        let attempt = (|| -> Res<BufReader<UnixStream>> {
            let mut stream = UnixStream::connect(uds).map_err(|e| format!("connect {}: {e}", uds.display()))?;
            stream.set_read_timeout(Some(WORK_TIMEOUT)).map_err(|e| e.to_string())?;
            stream.write_all(format!("CONNECT {port}\n").as_bytes()).map_err(|e| format!("CONNECT: {e}"))?;
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            reader.read_line(&mut line).map_err(|e| format!("reading OK: {e}"))?;
            if line.starts_with("OK ") {
                Ok(reader)
            } else {
                Err(format!("answer to CONNECT {port}: {:?}", line.trim()))
            }
        })();
        match attempt {
            Ok(reader) => return Ok((reader, t.elapsed())),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn mb_s(bytes: u64, d: Duration) -> String {
    format!("{:.1}", bytes as f64 / d.as_secs_f64() / 1e6)
}

fn vsock_host_to_guest(o: &Opts, guest: &mut Guest, uds: &Path) -> Res<String> {
    let bytes = o.vsock_mib << 20;
    let from = guest.output().len();
    // The sink stops at the byte count: Firecracker ends the whole stream
    // when the host half-closes, so the end of file cannot mark the end.
    guest.send_line(&format!("stasis-iobench vsock-sink 5000 {bytes}; echo SINK_RC=$?"));
    let (mut reader, _) = vsock_open(uds, 5000, Instant::now() + ANSWER_TIMEOUT)?;
    let chunk = vec![0x3cu8; 1 << 20];
    let t = Instant::now();
    for _ in 0..o.vsock_mib {
        reader.get_mut().write_all(&chunk).map_err(|e| format!("writing to the guest: {e}"))?;
    }
    let mut answer = String::new();
    reader.read_line(&mut answer).map_err(|e| format!("reading the guest's answer: {e}"))?;
    let took = t.elapsed();
    let rc = wait_marker(guest, from, "SINK_RC", WORK_TIMEOUT)?;
    if answer.trim() != format!("received={bytes}") || rc != "0" {
        return Err(format!("the guest answered {:?} (exit {rc}), expected received={bytes}", answer.trim()));
    }
    Ok(format!("mib={} mb_s={} seconds={:.3}", o.vsock_mib, mb_s(bytes, took), took.as_secs_f64()))
}

fn vsock_guest_to_host(o: &Opts, guest: &mut Guest, uds: &Path) -> Res<String> {
    let bytes = o.vsock_mib << 20;
    let from = guest.output().len();
    guest.send_line(&format!("stasis-iobench vsock-source 5001 {}; echo SRC_RC=$?", o.vsock_mib));
    let (mut reader, _) = vsock_open(uds, 5001, Instant::now() + ANSWER_TIMEOUT)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    let t = Instant::now();
    // Up to the byte count, not the end of file: Firecracker does not pass
    // the guest's half-close on to the Unix socket.
    while got < bytes {
        match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading from the guest: {e}")),
        }
    }
    let took = t.elapsed();
    drop(reader);
    let rc = wait_marker(guest, from, "SRC_RC", WORK_TIMEOUT)?;
    if got != bytes || rc != "0" {
        return Err(format!("received {got} bytes (guest exit {rc}), expected {bytes}"));
    }
    Ok(format!("mib={} mb_s={} seconds={:.3}", o.vsock_mib, mb_s(bytes, took), took.as_secs_f64()))
}

fn vsock_connects(o: &Opts, guest: &mut Guest, uds: &Path) -> Res<String> {
    let from = guest.output().len();
    guest.send_line(&format!("stasis-iobench vsock-accept 5002 {}; echo ACC_RC=$?", o.connects + 1));
    // Warm-up, untimed: it also waits for the guest program to listen.
    drop(vsock_open(uds, 5002, Instant::now() + ANSWER_TIMEOUT)?);
    let mut samples = Vec::with_capacity(o.connects);
    for _ in 0..o.connects {
        // No retry: the guest listens already (the warm-up got through).
        let (reader, took) = vsock_open(uds, 5002, Instant::now())?;
        samples.push(took.as_secs_f64() * 1000.0);
        drop(reader);
    }
    let rc = wait_marker(guest, from, "ACC_RC", WORK_TIMEOUT)?;
    if rc != "0" {
        return Err(format!("stasis-iobench vsock-accept exited {rc}"));
    }
    samples.sort_by(f64::total_cmp);
    let rank = |p: f64| samples[((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1];
    Ok(format!(
        "n={} p50_ms={:.2} p99_ms={:.2} min_ms={:.2} max_ms={:.2}",
        samples.len(),
        rank(0.50),
        rank(0.99),
        samples[0],
        samples[samples.len() - 1]
    ))
}

// ---- One VMM ---------------------------------------------------------------------------

/// Boots `vmm` on the data disk, runs every test; returns whether any failed.
fn bench_vmm(o: &Opts, vmm: Vmm) -> bool {
    let name = vmm.name();
    let mut failed = false;
    let booted = guarded(|| {
        let info = vmm_line(o, vmm)?;
        note(&format!("{name}: booting"));
        let t = Instant::now();
        let mut guest = Guest::spawn_command(boot_command(o, vmm)?);
        guest.expect(READY, BOOT_TIMEOUT);
        let boot = t.elapsed();
        let from = guest.output().len();
        guest.send_line("test -b /dev/vda; echo HAVE_VDA=$?");
        let vda = wait_marker(&guest, from, "HAVE_VDA", ANSWER_TIMEOUT)?;
        if vda != "0" {
            return Err(format!("the guest has no /dev/vda: {}", last_chars(&guest.output(), 400)));
        }
        Ok((guest, format!("{info} boot_s={}", secs(boot))))
    });
    let mut guest = match booted {
        Ok((guest, info)) => {
            println!("vmm name={name} {info}");
            guest
        }
        Err(e) => {
            emit(&format!("vmm name={name}"), &Err(e));
            return true;
        }
    };
    if o.disk {
        for t in disk_tests(o) {
            note(&format!("{name}: disk {} ×{}", t.name, o.runs));
            let r = guarded(|| disk_row(o, &mut guest, &t));
            failed |= emit(&format!("disk vmm={name} test={} bs={} direct=1", t.name, t.bs), &r);
        }
    }
    if o.vsock && vmm.has_vsock() {
        let uds = vsock_uds(o, vmm);
        note(&format!("{name}: vsock host-to-guest {} MiB", o.vsock_mib));
        let r = guarded(|| vsock_host_to_guest(o, &mut guest, &uds));
        failed |= emit(&format!("vsock vmm={name} dir=host-to-guest"), &r);
        note(&format!("{name}: vsock guest-to-host {} MiB", o.vsock_mib));
        let r = guarded(|| vsock_guest_to_host(o, &mut guest, &uds));
        failed |= emit(&format!("vsock vmm={name} dir=guest-to-host"), &r);
        note(&format!("{name}: vsock {} connects", o.connects));
        let r = guarded(|| vsock_connects(o, &mut guest, &uds));
        failed |= emit(&format!("vsock vmm={name} test=connect"), &r);
    }
    if let Err(e) = guarded(|| bench::poweroff(guest, EXIT_TIMEOUT)) {
        // Firecracker exits non-zero on some guest reboots; the figures stand.
        eprintln!("device-bench: {name}: {e}");
        failed |= vmm != Vmm::Firecracker;
    }
    failed
}

fn main() {
    let o = Opts::parse();
    bench::start("device-bench", "scripts/bench-devices", &o.common);

    note(&format!("writing the {} MiB data disk", o.disk_mib));
    let created = create_data_disk(&o.data_disk(), o.disk_mib);
    let mut failed = emit(
        &format!("data-disk mib={} fill=pattern", o.disk_mib),
        &created.as_ref().map(|d| format!("create_s={:.3}", d.as_secs_f64())).map_err(String::clone),
    );
    if created.is_ok() {
        let mut vmms = Vec::new();
        if o.stasis_vm {
            vmms.push(Vmm::Stasis);
        }
        if o.qemu_vm {
            vmms.push(Vmm::Qemu);
        }
        if o.firecracker.is_some() {
            vmms.push(Vmm::Firecracker);
        }
        for vmm in vmms {
            failed |= bench_vmm(&o, vmm);
        }
    }
    bench::finish(&o.common, failed);
}
