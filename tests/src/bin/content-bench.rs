//! Content benchmark: what the content service's checks cost. One stasis
//! guest receives the same item three ways — `stasis-get` through the
//! content service (ID, grant, store and digest checked, the guest hashing
//! too), a plain vsock stream from a host program (no checks), and a read
//! of a virtio disk holding the same bytes — and then asks for a 4 KiB item
//! over and over. Run it where KVM is real: directly on a hardware-KVM
//! host, or inside the test host (`scripts/bench-content` does that).
//!
//! Every figure is measured in the run that prints it; a measurement that
//! fails (the received bytes' sha256 differs from the item's included)
//! prints `error="…"` in place of its figures, and the program then exits
//! 1. Progress notes go to stderr; stdout holds only the table:
//!
//! ```text
//! machine kernel=… cpu="…" cpus=… mem_mib=… kvm=kvm_amd testhost=yes quick=no
//! item mib=256 create_s=… add_s=…
//! vmm name=stasis mem_mib=1024 boot_s=…
//! fetch test=content mib=256 mb_s=… seconds=…
//! fetch test=plain-vsock mib=256 mb_s=… seconds=…
//! fetch test=disk mib=256 mb_s=… seconds=…
//! ratio content_vs_plain_vsock=… content_vs_disk=…
//! latency test=content-4k requests=1000 p50_us=… p99_us=… max_us=…
//! latency test=content-4k-process n=100 mean_ms=…
//! ```
//!
//! - `fetch`: the time, by the guest's clock (`/proc/uptime`, 10 ms steps),
//!   from starting the receiving program to its end, with the data in a tmpfs file; `mb_s` is 10^6
//!   bytes a second. `content`: `stasis-get ID -o /tmp/f` (the host reads,
//!   hashes and sends; the guest hashes, syncs and renames). `plain-vsock`:
//!   `stasis-vsock connect 2 PORT >/tmp/f`, the host side a Unix socket at
//!   `UDS_PORT` that writes the item's bytes and closes. `disk`: `dd
//!   if=/dev/vda of=/tmp/f bs=1M` of a read-only disk that is the item's
//!   file (the guest's page cache is cold; the host's is warm, as the
//!   store's copy is). After each row the guest's sha256 of the file is
//!   checked against the item's.
//! - `ratio`: content MB/s over the other two (1.0: the checks cost
//!   nothing).
//! - `latency content-4k`: `stasis-get --repeat N` asks for a 4 KiB item N
//!   times over one connection and reports the service time by nearest
//!   rank. `content-4k-process`: N separate `stasis-get` runs, each its own
//!   process and connection, mean time each.
//!
//! The VM runs with `--content-rate 0` (no request limit), so the figures
//! are the service's own. `--quick`: a 64 MiB item, 200 requests, 20 runs.

use std::fs;
use std::io::Write;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use stasis_e2e::bench::{self, ask, emit, guarded, last_chars, note, secs, CommonOpts, Res, EXIT_TIMEOUT};
use stasis_e2e::{pseudo_random, sha256_hex};

const MEM_MIB: u64 = 1024;
/// The host port of the plain vsock stream.
const PLAIN_PORT: u32 = 6000;
/// One transfer under nested KVM.
const WORK_TIMEOUT: Duration = Duration::from_secs(900);

fn usage() -> ! {
    eprintln!(
        "usage: content-bench [--quick] [--mib N] [--requests N] [--runs N] [--stasis PATH] [--images DIR]\n\
         \x20                    [--work DIR] [--keep]\n\
         Runs where KVM is real; scripts/bench-content runs it inside the test host."
    );
    std::process::exit(2);
}

struct Opts {
    common: CommonOpts,
    mib: u64,
    requests: u64,
    runs: u64,
}

impl Opts {
    fn parse() -> Opts {
        let mut o = Opts { common: CommonOpts::new("content-bench"), mib: 0, requests: 0, runs: 0 };
        let num = |v: String| v.parse::<u64>().ok().filter(|&n| n > 0).unwrap_or_else(|| usage());
        bench::parse_args(usage, |arg, value| {
            match arg {
                "--mib" => o.mib = num(value()),
                "--requests" => o.requests = num(value()),
                "--runs" => o.runs = num(value()),
                _ => return o.common.take(arg, value),
            }
            true
        });
        let quick = o.common.quick;
        let pick = |set: u64, full: u64, fast: u64| if set > 0 { set } else if quick { fast } else { full };
        o.mib = pick(o.mib, 256, 64);
        o.requests = pick(o.requests, 1000, 200);
        o.runs = pick(o.runs, 100, 20);
        o
    }
}

/// `stasis content add --store STORE FILE`: the file's ID.
fn add(o: &Opts, store: &Path, file: &Path) -> Res<String> {
    let out = Command::new(&o.common.stasis)
        .args(["content", "add", "--store"])
        .arg(store)
        .arg(file)
        .output()
        .map_err(|e| format!("cannot run stasis content add: {e}"))?;
    if !out.status.success() {
        return Err(format!("stasis content add: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout.split_whitespace().next().map(str::to_string).ok_or_else(|| format!("no ID in {stdout:?}"))
}

/// Runs `command` in the guest between two readings of its clock; the
/// elapsed time, after checking the command succeeded.
fn timed(guest: &mut stasis_e2e::Guest, command: &str) -> Res<Duration> {
    // /proc/uptime, in hundredths of a second (busybox date has no %N).
    let line = format!(
        "t0=$(cut -d' ' -f1 /proc/uptime); {command}; rc=$?; t1=$(cut -d' ' -f1 /proc/uptime); \
         echo TIMED=$rc/$(( (${{t1%.*}}${{t1#*.}} - ${{t0%.*}}${{t0#*.}}) * 10000 ))"
    );
    let value = ask(guest, &line, "TIMED", WORK_TIMEOUT)?;
    let (rc, us) = value.split_once('/').ok_or_else(|| format!("odd answer {value:?}"))?;
    if rc != "0" {
        return Err(format!("{command:?} exited {rc}: {}", last_chars(&guest.output(), 300)));
    }
    let us: u64 = us.parse().map_err(|_| format!("odd time {us:?}"))?;
    Ok(Duration::from_micros(us))
}

/// Checks the guest's /tmp/f against `sha`, then removes it.
fn check_and_remove(guest: &mut stasis_e2e::Guest, sha: &str) -> Res<()> {
    let got = ask(guest, "echo GSHA=$(sha256sum /tmp/f | cut -d' ' -f1); rm -f /tmp/f", "GSHA", WORK_TIMEOUT)?;
    if got != sha {
        return Err(format!("the guest received bytes with sha256 {got}, the item's is {sha}"));
    }
    Ok(())
}

fn row(o: &Opts, took: Duration) -> String {
    let bytes = (o.mib << 20) as f64;
    format!("mib={} mb_s={:.1} seconds={}", o.mib, bytes / took.as_secs_f64() / 1e6, secs(took))
}

/// Serves one connection at `path`: writes `item`, then closes.
fn plain_server(path: PathBuf, item: PathBuf) -> Res<thread::JoinHandle<Res<()>>> {
    let _ = fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
    Ok(thread::spawn(move || {
        let (mut stream, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
        let data = fs::read(&item).map_err(|e| format!("cannot read {}: {e}", item.display()))?;
        stream.write_all(&data).map_err(|e| format!("writing to the guest: {e}"))?;
        Ok(())
    }))
}

fn main() {
    let o = Opts::parse();
    bench::start("content-bench", "scripts/bench-content", &o.common);
    let work = o.common.work.clone();
    let store = work.join("store");
    let item = work.join("item");
    let small = work.join("small");
    let uds = work.join("vsock.sock");
    let sock = work.join("api.sock");

    note(&format!("writing the {} MiB item and adding it to the store", o.mib));
    let prepared = guarded(|| {
        let t = Instant::now();
        let data = pseudo_random((o.mib << 20) as usize, 0x5eed);
        let sha = sha256_hex(&data);
        fs::write(&item, &data).map_err(|e| format!("cannot write {}: {e}", item.display()))?;
        fs::write(&small, pseudo_random(4096, 7)).map_err(|e| format!("cannot write {}: {e}", small.display()))?;
        let created = t.elapsed();
        let t = Instant::now();
        let id = add(&o, &store, &item)?;
        let added = t.elapsed();
        let small_id = add(&o, &store, &small)?;
        if id != format!("sha256:{sha}") {
            return Err(format!("stasis content add said {id}, the item's sha256 is {sha}"));
        }
        Ok((sha, id, small_id, format!("create_s={} add_s={}", secs(created), secs(added))))
    });
    let mut failed = emit(&format!("item mib={}", o.mib), &prepared.as_ref().map(|p| p.3.clone()).map_err(String::clone));
    let Ok((sha, id, small_id, _)) = prepared else {
        bench::finish(&o.common, true);
        return;
    };

    note("stasis: booting");
    let grants = [id.clone(), small_id.clone()];
    let extra = [
        "--vsock".to_string(),
        format!("3,{}", uds.display()),
        "--disk".into(),
        format!("{},ro", item.display()),
        "--content-store".into(),
        store.display().to_string(),
        "--grant".into(),
        grants[0].clone(),
        "--grant".into(),
        grants[1].clone(),
        "--content-rate".into(),
        "0".into(),
    ];
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut guest = match o.common.boot_stasis_with(MEM_MIB, &sock, &extra) {
        Ok((guest, boot)) => {
            println!("vmm name=stasis mem_mib={MEM_MIB} boot_s={}", secs(boot));
            guest
        }
        Err(e) => {
            emit("vmm name=stasis", &Err(e));
            bench::finish(&o.common, true);
            return;
        }
    };

    note(&format!("content fetch of {} MiB", o.mib));
    let content = guarded(|| {
        let took = timed(&mut guest, &format!("stasis-get --quiet {id} -o /tmp/f"))?;
        check_and_remove(&mut guest, &sha)?;
        Ok(took)
    });
    failed |= emit("fetch test=content", &content.as_ref().map(|d| row(&o, *d)).map_err(String::clone));

    note(&format!("plain vsock stream of {} MiB", o.mib));
    let plain = guarded(|| {
        let server = plain_server(PathBuf::from(format!("{}_{PLAIN_PORT}", uds.display())), item.clone())?;
        let took = timed(&mut guest, &format!("stasis-vsock connect 2 {PLAIN_PORT} </dev/null >/tmp/f"))?;
        server.join().map_err(|_| "the host side panicked".to_string())??;
        check_and_remove(&mut guest, &sha)?;
        Ok(took)
    });
    failed |= emit("fetch test=plain-vsock", &plain.as_ref().map(|d| row(&o, *d)).map_err(String::clone));

    note(&format!("disk read of {} MiB", o.mib));
    let disk = guarded(|| {
        let took = timed(&mut guest, &format!("dd if=/dev/vda of=/tmp/f bs=1M count={} 2>/dev/null", o.mib))?;
        check_and_remove(&mut guest, &sha)?;
        Ok(took)
    });
    failed |= emit("fetch test=disk", &disk.as_ref().map(|d| row(&o, *d)).map_err(String::clone));

    let ratio = |other: &Res<Duration>| match (&content, other) {
        (Ok(c), Ok(x)) => format!("{:.2}", x.as_secs_f64() / c.as_secs_f64()),
        _ => "-".to_string(),
    };
    println!("ratio content_vs_plain_vsock={} content_vs_disk={}", ratio(&plain), ratio(&disk));

    note(&format!("{} requests for a 4 KiB item over one connection", o.requests));
    let latency = guarded(|| {
        let line = ask(
            &mut guest,
            &format!("echo LAT=$(stasis-get --repeat {} {small_id} | tr ' ' ,)", o.requests),
            "LAT",
            WORK_TIMEOUT,
        )?;
        // "stasis-get:,latency,requests=N,p50_us=…": the figures.
        let fields: Vec<&str> = line.split(',').filter(|f| f.contains('=')).collect();
        if fields.len() != 4 {
            return Err(format!("stasis-get --repeat said {line:?}"));
        }
        Ok(fields.join(" "))
    });
    failed |= emit("latency test=content-4k", &latency);

    note(&format!("{} separate stasis-get runs of a 4 KiB item", o.runs));
    let process = guarded(|| {
        let took = timed(
            &mut guest,
            &format!("i=0; while [ $i -lt {} ] && stasis-get --quiet {small_id} -o /tmp/s; do rm -f /tmp/s; i=$((i+1)); done; [ $i -eq {} ]", o.runs, o.runs),
        )?;
        Ok(format!("n={} mean_ms={:.2}", o.runs, took.as_secs_f64() * 1000.0 / o.runs as f64))
    });
    failed |= emit("latency test=content-4k-process", &process);

    if let Err(e) = guarded(|| bench::poweroff(guest, EXIT_TIMEOUT).map(|_| ())) {
        eprintln!("content-bench: {e}");
        failed = true;
    }
    bench::finish(&o.common, failed);
}
