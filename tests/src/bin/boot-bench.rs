//! Boot-time benchmark: time from starting `stasis boot` to the guest's
//! `STASIS-GUEST-READY`, for the ELF vmlinux and the bzImage, N runs each.
//! Run it where KVM is real: directly on a hardware-KVM host, or inside the
//! test host (the command is in README.md, "Benchmarks"). Prints one line per
//! configuration in a stable format:
//!
//! `boot kernel=vmlinux cmdline=default runs=5 median_s=3.210 min_s=3.100 max_s=3.400`

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

const READY: &[u8] = b"STASIS-GUEST-READY";
const TIMEOUT: Duration = Duration::from_secs(300);

fn usage() -> ! {
    eprintln!("usage: boot-bench [--runs N] [--stasis PATH] [--images DIR] [--cmdline STR]");
    std::process::exit(2);
}

/// One boot: seconds from spawn to READY.
fn boot_once(stasis: &str, kernel: &str, initrd: &str, cmdline: Option<&str>) -> Result<f64, String> {
    let mut cmd = Command::new(stasis);
    cmd.args(["boot", "--kernel", kernel, "--initrd", initrd]);
    if let Some(c) = cmdline {
        cmd.args(["--cmdline", c]);
    }
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    let start = Instant::now();
    let mut child = cmd.spawn().map_err(|e| format!("cannot start {stasis}: {e}"))?;
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
    let result = rx.recv_timeout(TIMEOUT).map_err(|_| "no STASIS-GUEST-READY in time".to_string());
    if let Some(stdin) = child.stdin.as_mut() {
        let _ = stdin.write_all(b"poweroff -f\n");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break,
            Ok(Some(status)) => return Err(format!("stasis exited with {status}")),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                return Err("stasis did not exit after poweroff".into());
            }
        }
    }
    let _ = reader.join();
    result
}

fn main() {
    let mut runs = 5usize;
    let mut stasis = "target/release/stasis".to_string();
    let mut images = "guest-images/out".to_string();
    let mut cmdlines: Vec<Option<String>> = vec![None];
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--runs" => runs = value().parse().unwrap_or_else(|_| usage()),
            "--stasis" => stasis = value(),
            "--images" => images = value(),
            "--cmdline" => cmdlines.push(Some(value())),
            _ => usage(),
        }
    }
    let initrd = format!("{images}/initramfs.cpio.gz");
    let mut failed = false;
    for cmdline in &cmdlines {
        for kernel in ["vmlinux", "bzImage"] {
            let path = format!("{images}/{kernel}");
            let mut times = Vec::new();
            for _ in 0..runs {
                match boot_once(&stasis, &path, &initrd, cmdline.as_deref()) {
                    Ok(t) => times.push(t),
                    Err(e) => {
                        eprintln!("boot-bench: {kernel}: {e}");
                        failed = true;
                    }
                }
            }
            if times.is_empty() {
                continue;
            }
            times.sort_by(f64::total_cmp);
            let label = cmdline.as_deref().map_or("default".to_string(), |c| format!("{c:?}"));
            println!(
                "boot kernel={kernel} cmdline={label} runs={} median_s={:.3} min_s={:.3} max_s={:.3}",
                times.len(),
                times[times.len() / 2],
                times[0],
                times[times.len() - 1]
            );
        }
    }
    if failed {
        std::process::exit(1);
    }
}
