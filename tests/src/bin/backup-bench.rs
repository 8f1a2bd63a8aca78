//! Backup benchmark (issue 10): a stasis backup of a running VM — full,
//! incremental from dirty tracking, incremental from checksums after the
//! VM was restored into a new VMM — next to QEMU's incremental disk backup
//! with a dirty bitmap plus its memory save, on the same guest, disk and
//! changes, in one run. `scripts/bench-backup` runs it (inside the test
//! host where KVM is not hardware-backed).
//!
//! Output, one line each (stable keys; `-` where there is no figure):
//!
//! ```text
//! machine …
//! setup mem_mib=1024 disk_mib=2048 base_mib=64 changed_mib=16
//! backup vmm=stasis step=full changes_from=full paused_ms=… total_s=… bytes_written=… disk_bytes_copied=… disk_blocks_copied_before_write=…
//! backup vmm=stasis step=incremental changes_from=dirty-tracking …
//! backup vmm=stasis step=after-restore changes_from=checksums …
//! backup vmm=qemu step=full changes_from=full paused_ms=… total_s=… bytes_written=… disk_s=… disk_bytes=… memory_s=… memory_bytes=…
//! backup vmm=qemu step=incremental changes_from=dirty-bitmap …
//! backup vmm=qemu step=after-restore changes_from=full note="…"
//! ```
//!
//! Each step first writes the same changes into the guest: `changed_mib`
//! MiB of random data to `/dev/vda` (at a new offset each time) and as a
//! new tmpfs file; before the full backup, `base_mib` MiB of each.
//!
//! - stasis: `stasis backup --to STORE` over the control socket; figures
//!   from its reply: `paused_ms` (vCPUs stopped), `total_s` (request to
//!   durable backup), `bytes_written` (the backup's files). After the
//!   incremental one the VM is snapshotted, ended and restored into a new
//!   VMM (dirty tracking lost), changed again and backed up: the checksum
//!   path.
//! - QEMU (`-M microvm`, the disk as virtio-blk on a raw image): the full
//!   step is one QMP transaction of `block-dirty-bitmap-add` and
//!   `drive-backup sync=full` to a qcow2 file; the incremental step
//!   `drive-backup sync=incremental` with that bitmap; each followed by a
//!   memory save (`migrate` with the `background-snapshot` capability, to a
//!   file). `paused_ms` is the migration's downtime (the disk job does not
//!   stop the guest), `total_s` the disk job plus the memory save,
//!   `bytes_written` the qcow2 file plus the memory file. QEMU's memory
//!   save is always the whole of memory. Its dirty bitmap lives in the
//!   QEMU process (persistent bitmaps need a qcow2 image): after a restart
//!   the next backup is full, which the last row says rather than measures.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use stasis_e2e::bench::{
    self, ask, create_dir, emit, error_field, guarded, json_field, json_int, json_num, note, opt, CommonOpts, Qmp, Res,
    BOOT_TIMEOUT, CMDLINE,
};
use stasis_e2e::{Guest, EXIT_TIMEOUT, READY};

const WORK_TIMEOUT: Duration = Duration::from_secs(600);
const JOB_TIMEOUT: Duration = Duration::from_secs(1200);

fn usage() -> ! {
    eprintln!(
        "usage: backup-bench [--quick] [--only stasis,qemu] [--mem-mib N] [--disk-mib N] [--base-mib N] [--changed-mib N]\n\
         \x20                   [--stasis PATH] [--images DIR] [--qemu PATH] [--qemu-cpu MODEL] [--work DIR] [--keep]\n\
         Runs where KVM is real; scripts/bench-backup runs it inside the test host."
    );
    std::process::exit(2);
}

struct Opts {
    common: CommonOpts,
    stasis: bool,
    qemu: bool,
    mem_mib: Option<u64>,
    disk_mib: Option<u64>,
    base_mib: u64,
    changed_mib: u64,
}

impl Opts {
    fn parse() -> Opts {
        let mut o = Opts {
            common: CommonOpts::new("backup-bench"),
            stasis: true,
            qemu: true,
            mem_mib: None,
            disk_mib: None,
            base_mib: 64,
            changed_mib: 16,
        };
        let number = |v: String| v.trim().parse::<u64>().unwrap_or_else(|_| usage());
        bench::parse_args(usage, |arg, value| {
            match arg {
                "--only" => [o.stasis, o.qemu] = bench::flags(&value(), ["stasis", "qemu"]).unwrap_or_else(|| usage()),
                "--mem-mib" => o.mem_mib = Some(number(value())),
                "--disk-mib" => o.disk_mib = Some(number(value())),
                "--base-mib" => o.base_mib = number(value()),
                "--changed-mib" => o.changed_mib = number(value()),
                _ => return o.common.take(arg, value),
            }
            true
        });
        o
    }

    /// 1024 MiB, 512 with --quick.
    fn mem(&self) -> u64 {
        self.mem_mib.unwrap_or(if self.common.quick { 512 } else { 1024 })
    }

    /// 2048 MiB, 1024 with --quick.
    fn disk(&self) -> u64 {
        self.disk_mib.unwrap_or(if self.common.quick { 1024 } else { 2048 })
    }
}

/// Writes `mib` MiB of random data to /dev/vda at `at_mib` and to
/// /tmp/`name`.
fn change(guest: &mut Guest, name: &str, at_mib: u64, mib: u64) -> Res<()> {
    let cmd = format!(
        "dd if=/dev/urandom of=/dev/vda bs=1M count={mib} seek={at_mib} conv=fsync 2>/dev/null && \
         dd if=/dev/urandom of=/tmp/{name} bs=1M count={mib} 2>/dev/null; echo CHANGED=$?"
    );
    match ask(guest, &cmd, "CHANGED", WORK_TIMEOUT)?.as_str() {
        "0" => Ok(()),
        other => Err(format!("the guest could not write its changes (status {other})")),
    }
}

fn sparse_disk(path: &Path, mib: u64) -> Res<()> {
    fs::File::create(path).and_then(|f| f.set_len(mib << 20)).map_err(|e| format!("cannot create {}: {e}", path.display()))
}

// ---- stasis ------------------------------------------------------------------

fn stasis_backup(o: &Opts, sock: &Path, store: &Path, state: &Path, full: bool) -> Res<String> {
    let mut cmd = Command::new(&o.common.stasis);
    cmd.args(["backup", "--api-sock"]).arg(sock).arg("--to").arg(store).arg("--state-dir").arg(state);
    if full {
        cmd.arg("--full");
    }
    let (_, out) = bench::run_tool(&mut cmd, JOB_TIMEOUT)?;
    let backup = bench::json_object(&out, "backup").ok_or_else(|| format!("no backup in the reply: {out}"))?;
    Ok(format!(
        "changes_from={} paused_ms={} total_s={} bytes_written={} disk_bytes_copied={} disk_blocks_copied_before_write={} memory_blocks_written={}",
        json_field(backup, "changes_from").unwrap_or("-"),
        bench::opt_fixed(json_num(backup, "paused_ms"), 1),
        bench::opt_fixed(json_num(backup, "write_s"), 3),
        opt(json_int(backup, "bytes_written")),
        opt(json_int(backup, "disk_bytes_copied")),
        opt(json_int(backup, "disk_blocks_copied_before_write")),
        opt(json_int(backup, "memory_blocks_written")),
    ))
}

fn bench_stasis(o: &Opts) -> bool {
    let work = o.common.work.join("stasis");
    let (mem, changed) = (o.mem(), o.changed_mib);
    let prefix = |step: &str| format!("backup vmm=stasis step={step}");
    let result = guarded(|| {
        create_dir(&work)?;
        let disk = work.join("disk.img");
        sparse_disk(&disk, o.disk())?;
        let (store, state) = (work.join("store"), work.join("state"));
        let sock = work.join("api.sock");
        note(&format!("stasis: booting {mem} MiB with a {} MiB disk", o.disk()));
        let (mut guest, _) = o.common.boot_stasis_with(mem, &sock, &["--disk", &disk.display().to_string()])?;
        change(&mut guest, "base", 0, o.base_mib)?;
        note("stasis: full backup");
        let full = stasis_backup(o, &sock, &store, &state, true);
        let failed_full = emit(&prefix("full"), &full);
        change(&mut guest, "c1", 512, changed)?;
        note("stasis: incremental backup");
        let failed_inc = emit(&prefix("incremental"), &stasis_backup(o, &sock, &store, &state, false));

        note("stasis: snapshot, end, restore into a new VMM");
        let snap = work.join("snap");
        let mut cmd = Command::new(&o.common.stasis);
        cmd.args(["snapshot", "--api-sock"]).arg(&sock).arg("--out").arg(&snap).args(["--then", "exit"]);
        bench::run_tool(&mut cmd, JOB_TIMEOUT)?;
        let (status, output) = guest.wait_exit(EXIT_TIMEOUT);
        if !status.success() {
            return Err(format!("the VM did not end after its snapshot: {}", bench::last_chars(&output, 300)));
        }
        let sock2 = work.join("api2.sock");
        let _ = fs::remove_file(&sock2);
        let mut cmd = Command::new(&o.common.stasis);
        cmd.arg("restore").arg(&snap).arg("--disk-dir").arg(work.join("disks")).arg("--api-sock").arg(&sock2);
        let mut guest = Guest::spawn_command(cmd);
        bench::wait_for_path(&sock2, BOOT_TIMEOUT)?;
        change(&mut guest, "c2", 768, changed)?;
        note("stasis: backup after the restore (checksums)");
        let failed_after = emit(&prefix("after-restore"), &stasis_backup(o, &sock2, &store, &state, false));
        bench::poweroff(guest, EXIT_TIMEOUT)?;
        Ok(failed_full || failed_inc || failed_after)
    });
    o.common.clean(&work);
    failed_or_error(&prefix("-"), result)
}

// ---- QEMU --------------------------------------------------------------------

/// Runs a block job started by `command` (with `"auto-dismiss":false` and
/// job id `id`) to its end; returns its time.
fn block_job(qmp: &mut Qmp, command: &str, id: &str) -> Res<Duration> {
    let t = Instant::now();
    qmp.execute(command)?;
    loop {
        let reply = qmp.execute(r#"{"execute":"query-block-jobs"}"#)?;
        if !reply.contains(&format!("\"{id}\"")) {
            return Err(format!("block job {id} vanished: {}", reply.trim()));
        }
        if json_field(&reply, "status") == Some("concluded") {
            let elapsed = t.elapsed();
            if let Some(error) = json_field(&reply, "error") {
                return Err(format!("block job {id} failed: {error}"));
            }
            qmp.execute(&format!(r#"{{"execute":"job-dismiss","arguments":{{"id":"{id}"}}}}"#))?;
            return Ok(elapsed);
        }
        if t.elapsed() > JOB_TIMEOUT {
            return Err(format!("block job {id} not done after {JOB_TIMEOUT:?}"));
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// A background-snapshot of memory to `file`: (downtime ms, time).
fn memory_save(qmp: &mut Qmp, file: &Path) -> Res<(Option<f64>, Duration)> {
    let t = Instant::now();
    qmp.execute(&format!(r#"{{"execute":"migrate","arguments":{{"uri":"exec:cat > {}"}}}}"#, file.display()))?;
    loop {
        let reply = qmp.execute(r#"{"execute":"query-migrate"}"#)?;
        match json_field(&reply, "status") {
            Some("completed") => return Ok((json_num(&reply, "downtime"), t.elapsed())),
            Some("failed") | Some("cancelled") => return Err(format!("memory save failed: {}", reply.trim())),
            _ if t.elapsed() > JOB_TIMEOUT => return Err(format!("memory save not done after {JOB_TIMEOUT:?}")),
            _ => thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn file_len(path: &Path) -> Res<u64> {
    fs::metadata(path).map(|m| m.len()).map_err(|e| format!("{}: {e}", path.display()))
}

fn qemu_step(qmp: &mut Qmp, work: &Path, step: &str, disk_command: &str, id: &str) -> Res<String> {
    let target = work.join(format!("{step}.qcow2"));
    let disk_time = block_job(qmp, &disk_command.replace("TARGET", &target.display().to_string()), id)?;
    let memory_file = work.join(format!("{step}.memory"));
    let (downtime, memory_time) = memory_save(qmp, &memory_file)?;
    let (disk_bytes, memory_bytes) = (file_len(&target)?, file_len(&memory_file)?);
    Ok(format!(
        "paused_ms={} total_s={:.3} bytes_written={} disk_s={:.3} disk_bytes={disk_bytes} memory_s={:.3} memory_bytes={memory_bytes}",
        bench::opt_fixed(downtime, 1),
        (disk_time + memory_time).as_secs_f64(),
        disk_bytes + memory_bytes,
        disk_time.as_secs_f64(),
        memory_time.as_secs_f64(),
    ))
}

fn bench_qemu(o: &Opts) -> bool {
    let work = o.common.work.join("qemu");
    let prefix = |step: &str| format!("backup vmm=qemu step={step}");
    let result = guarded(|| {
        create_dir(&work)?;
        let disk = work.join("disk.img");
        sparse_disk(&disk, o.disk())?;
        let qmp_path = work.join("qmp.sock");
        let _ = fs::remove_file(&qmp_path);
        let mut cmd = o.common.qemu(CMDLINE, o.mem());
        cmd.args(["-M", "microvm,acpi=on"])
            .arg("-drive")
            .arg(format!("id=d0,file={},format=raw,if=none,cache=writeback,aio=threads", disk.display()))
            .args(["-device", "virtio-blk-device,drive=d0"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
        note(&format!("qemu: booting {} MiB with a {} MiB disk", o.mem(), o.disk()));
        let mut guest = Guest::spawn_command(cmd);
        guest.expect(READY, BOOT_TIMEOUT);
        let mut qmp = Qmp::connect(&qmp_path, &guest, bench::ANSWER_TIMEOUT)?;
        qmp.execute(
            r#"{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"background-snapshot","state":true}]}}"#,
        )?;
        qmp.execute(r#"{"execute":"migrate-set-parameters","arguments":{"max-bandwidth":107374182400}}"#)?;
        change(&mut guest, "base", 0, o.base_mib)?;
        note("qemu: full backup (bitmap added in the same transaction)");
        let full = qemu_step(
            &mut qmp,
            &work,
            "full",
            r#"{"execute":"transaction","arguments":{"actions":[
                {"type":"block-dirty-bitmap-add","data":{"node":"d0","name":"bm0"}},
                {"type":"drive-backup","data":{"device":"d0","job-id":"full","target":"TARGET","format":"qcow2","sync":"full","auto-dismiss":false}}]}}"#
                .replace('\n', " ")
                .as_str(),
            "full",
        )
        .map(|f| format!("changes_from=full {f}"));
        let mut failed = emit(&prefix("full"), &full);
        change(&mut guest, "c1", 512, o.changed_mib)?;
        note("qemu: incremental backup");
        let inc = qemu_step(
            &mut qmp,
            &work,
            "incremental",
            r#"{"execute":"drive-backup","arguments":{"device":"d0","job-id":"inc","target":"TARGET","format":"qcow2","sync":"incremental","bitmap":"bm0","auto-dismiss":false}}"#,
            "inc",
        )
        .map(|f| format!("changes_from=dirty-bitmap {f}"));
        failed |= emit(&prefix("incremental"), &inc);
        println!(
            "{} changes_from=full note=\"the dirty bitmap of a raw image lives in the QEMU process: after a restart the next backup is full (the full row)\"",
            prefix("after-restore")
        );
        qmp.quit(guest, EXIT_TIMEOUT)?;
        Ok(failed)
    });
    o.common.clean(&work);
    failed_or_error(&prefix("-"), result)
}

/// Whether a VMM's rows failed; an error that stopped them is its own row.
fn failed_or_error(prefix: &str, result: Res<bool>) -> bool {
    result.unwrap_or_else(|e| {
        println!("{prefix} {}", error_field(&e));
        true
    })
}

fn main() {
    let o = Opts::parse();
    bench::start("backup-bench", "scripts/bench-backup", &o.common);
    println!("setup mem_mib={} disk_mib={} base_mib={} changed_mib={}", o.mem(), o.disk(), o.base_mib, o.changed_mib);
    let mut failed = false;
    if o.stasis {
        failed |= bench_stasis(&o);
    }
    if o.qemu {
        match o.common.qemu_unavailable() {
            Some(reason) => {
                println!("backup vmm=qemu step=- {}", error_field(&format!("QEMU unavailable: {reason}")));
                failed = true;
            }
            None => failed |= bench_qemu(&o),
        }
    }
    bench::finish(&o.common, failed);
}
