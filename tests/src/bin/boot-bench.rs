//! Boot-time benchmark: time from starting the VMM to the guest's
//! `STASIS-GUEST-READY`, N runs per configuration (kernel, memory size,
//! command line). With `--firecracker PATH` it also boots the same ELF
//! vmlinux, initramfs and command line with Firecracker, alternating with
//! stasis run by run, so both see the same machine at the same time.
//! Run it where KVM is real: directly on a hardware-KVM host, or inside the
//! test host (the command is in README.md, "Benchmarks"). Prints one line
//! per configuration in a stable format:
//!
//! `boot vmm=stasis kernel=vmlinux mem=1024 cmdline=default runs=5 median_s=3.210 min_s=3.100 max_s=3.400`
//!
//! Firecracker boots only the ELF vmlinux here (its x86 loader takes no
//! bzImage), so bzImage rows are stasis's alone.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const READY: &[u8] = b"STASIS-GUEST-READY";
const TIMEOUT: Duration = Duration::from_secs(300);
/// The stasis default; Firecracker is given it explicitly.
const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off quiet";

fn usage() -> ! {
    eprintln!(
        "usage: boot-bench [--runs N] [--stasis PATH] [--firecracker PATH] [--images DIR]\n\
         \x20                 [--memory MiB]... [--kernel vmlinux|bzImage]... [--cmdline STR]...\n\
         defaults: --memory 1024 --memory 2048, both kernels, the default command line"
    );
    std::process::exit(2);
}

/// Which VMM a run uses.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Vmm {
    Stasis,
    Firecracker,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Stasis => "stasis",
            Vmm::Firecracker => "firecracker",
        }
    }
}

/// One configuration to boot.
struct Boot<'a> {
    kernel: &'a str,
    initrd: &'a str,
    mem_mib: u64,
    cmdline: Option<&'a str>,
}

/// Where Firecracker's per-run files go.
struct FcFiles {
    dir: PathBuf,
}

impl FcFiles {
    fn new() -> Result<Self, String> {
        let dir = std::env::temp_dir().join(format!("boot-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(FcFiles { dir })
    }
}

impl Drop for FcFiles {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A JSON string literal.
fn json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn absolute(path: &str) -> String {
    std::path::absolute(path).map_or_else(|_| path.to_string(), |p| p.display().to_string())
}

/// The command that boots `boot` with `vmm`.
fn command(vmm: Vmm, path: &str, boot: &Boot, fc: Option<&FcFiles>) -> Result<Command, String> {
    match vmm {
        Vmm::Stasis => {
            let mut cmd = Command::new(path);
            cmd.args(["boot", "--kernel", boot.kernel, "--initrd", boot.initrd]);
            cmd.args(["--memory", &format!("{}M", boot.mem_mib)]);
            if let Some(c) = boot.cmdline {
                cmd.args(["--cmdline", c]);
            }
            cmd.stderr(Stdio::inherit());
            Ok(cmd)
        }
        Vmm::Firecracker => {
            let fc = fc.ok_or("no directory for Firecracker's files")?;
            let config = fc.dir.join("config.json");
            let sock = fc.dir.join("api.sock");
            let json = format!(
                "{{\"boot-source\":{{\"kernel_image_path\":{},\"initrd_path\":{},\"boot_args\":{}}},\
                 \"drives\":[],\"machine-config\":{{\"vcpu_count\":1,\"mem_size_mib\":{}}}}}\n",
                json_str(&absolute(boot.kernel)),
                json_str(&absolute(boot.initrd)),
                json_str(boot.cmdline.unwrap_or(DEFAULT_CMDLINE)),
                boot.mem_mib
            );
            std::fs::write(&config, json).map_err(|e| format!("cannot write {}: {e}", config.display()))?;
            // Firecracker refuses to start when its socket path exists.
            let _ = std::fs::remove_file(&sock);
            let mut cmd = Command::new(path);
            cmd.arg("--no-seccomp").arg("--api-sock").arg(&sock).arg("--config-file").arg(&config);
            // Its log lines would only clutter the figures.
            cmd.stderr(Stdio::null());
            Ok(cmd)
        }
    }
}

/// Waits up to `limit` for `child` to exit; kills it after that.
fn wait_exit(child: &mut Child, limit: Duration) -> Result<std::process::ExitStatus, String> {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Ok(status),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err("did not exit after the guest was told to stop".into());
            }
        }
    }
}

/// One boot: seconds from spawn to READY.
fn boot_once(vmm: Vmm, path: &str, boot: &Boot, fc: Option<&FcFiles>) -> Result<f64, String> {
    let mut cmd = command(vmm, path, boot, fc)?;
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("cannot start {path}: {e}"))?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = mpsc::channel::<f64>();
    let reader = thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let mut sent = false;
        loop {
            let n = match stdout.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            seen.extend_from_slice(&buf[..n]);
            if !sent && seen.windows(READY.len()).any(|w| w == READY) {
                let _ = tx.send(start.elapsed().as_secs_f64());
                sent = true;
                seen.clear();
            }
        }
    });
    let result = rx.recv_timeout(TIMEOUT).map_err(|e| match e {
        mpsc::RecvTimeoutError::Timeout => "no STASIS-GUEST-READY in time".to_string(),
        mpsc::RecvTimeoutError::Disconnected => "the console closed before STASIS-GUEST-READY".to_string(),
    });
    // stasis ends on the guest's power-off; Firecracker has no power-off
    // device and ends on the keyboard controller's reset (`reboot=k`).
    let stop: &[u8] = match vmm {
        Vmm::Stasis => b"poweroff -f\n",
        Vmm::Firecracker => b"reboot -f\n",
    };
    if let Some(stdin) = child.stdin.as_mut() {
        let _ = stdin.write_all(stop);
    }
    let exited = wait_exit(&mut child, Duration::from_secs(60));
    let _ = reader.join();
    let status = exited?;
    if vmm == Vmm::Stasis && !status.success() {
        return Err(format!("exited with {status}"));
    }
    result
}

/// Median, min and max of the times, or nothing when there are none.
fn summary(times: &mut [f64]) -> Option<(f64, f64, f64)> {
    if times.is_empty() {
        return None;
    }
    times.sort_by(f64::total_cmp);
    Some((times[times.len() / 2], times[0], times[times.len() - 1]))
}

fn main() {
    let mut runs = 5usize;
    let mut stasis = "target/release/stasis".to_string();
    let mut firecracker: Option<String> = None;
    let mut images = "guest-images/out".to_string();
    let mut cmdlines: Vec<Option<String>> = vec![None];
    let mut memories: Vec<u64> = Vec::new();
    let mut kernels: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--runs" => runs = value().parse().unwrap_or_else(|_| usage()),
            "--stasis" => stasis = value(),
            "--firecracker" => firecracker = Some(value()),
            "--images" => images = value(),
            "--cmdline" => cmdlines.push(Some(value())),
            "--memory" => memories.push(value().parse().unwrap_or_else(|_| usage())),
            "--kernel" => match value().as_str() {
                k @ ("vmlinux" | "bzImage") => kernels.push(k.to_string()),
                _ => usage(),
            },
            _ => usage(),
        }
    }
    if memories.is_empty() {
        memories = vec![1024, 2048];
    }
    if kernels.is_empty() {
        kernels = vec!["vmlinux".into(), "bzImage".into()];
    }
    let fc_files = match firecracker.as_ref().map(|_| FcFiles::new()).transpose() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("boot-bench: {e}");
            std::process::exit(1);
        }
    };
    let initrd = format!("{images}/initramfs.cpio.gz");
    let mut failed = false;
    for cmdline in &cmdlines {
        for &mem_mib in &memories {
            for kernel in &kernels {
                let path = format!("{images}/{kernel}");
                let boot = Boot { kernel: &path, initrd: &initrd, mem_mib, cmdline: cmdline.as_deref() };
                let mut vmms = vec![(Vmm::Stasis, stasis.as_str())];
                if let Some(fc) = firecracker.as_deref().filter(|_| kernel == "vmlinux") {
                    vmms.push((Vmm::Firecracker, fc));
                }
                let mut times: Vec<Vec<f64>> = vec![Vec::new(); vmms.len()];
                // Alternate VMMs run by run, so a slow spell of the host
                // falls on both.
                for _ in 0..runs {
                    for (i, &(vmm, bin)) in vmms.iter().enumerate() {
                        match boot_once(vmm, bin, &boot, fc_files.as_ref()) {
                            Ok(t) => times[i].push(t),
                            Err(e) => {
                                eprintln!("boot-bench: {} {kernel} mem={mem_mib}: {e}", vmm.name());
                                failed = true;
                            }
                        }
                    }
                }
                let label = cmdline.as_deref().map_or("default".to_string(), |c| format!("{c:?}"));
                for (i, &(vmm, _)) in vmms.iter().enumerate() {
                    if let Some((median, min, max)) = summary(&mut times[i]) {
                        println!(
                            "boot vmm={} kernel={kernel} mem={mem_mib} cmdline={label} runs={} median_s={median:.3} min_s={min:.3} max_s={max:.3}",
                            vmm.name(),
                            times[i].len(),
                        );
                    }
                }
            }
        }
    }
    if failed {
        std::process::exit(1);
    }
}
