//! `stasis-iobench`: the guest's half of `scripts/bench-devices`. One
//! program, run identically under every VMM compared, so the figures differ
//! only by the VMM. libc only; built static by guest-images/build and
//! installed as /bin/stasis-iobench in the initramfs and the disk image.
//!
//! Disk tests (O_DIRECT, so every block is a virtio-blk request, never the
//! guest's page cache), one result line on stdout:
//!
//! ```text
//! stasis-iobench seq-read DEVICE [--bs SIZE] [--mib N]
//! stasis-iobench seq-write DEVICE [--bs SIZE] [--mib N]
//! stasis-iobench rand-read DEVICE [--bs SIZE] [--seconds S] [--seed N]
//! iobench test=seq-read bs=1048576 ops=256 bytes=268435456 seconds=1.234567 mb_s=217.4 iops=207.4
//! ```
//!
//! `seq-*` move N MiB (default 256, capped at the device's size) from
//! offset 0 in blocks of SIZE (default 1M), one `pread`/`pwrite` at a time;
//! `seq-write` ends with `fdatasync` inside the timed span. `rand-read`
//! reads SIZE (default 4K) blocks at SIZE-aligned offsets drawn from a
//! fixed-seed xorshift generator (the same sequence on every run) for S
//! seconds (default 10), one at a time (queue depth 1). `mb_s` is 10^6
//! bytes a second.
//!
//! vsock peers for the host's measurements (the host times them):
//!
//! ```text
//! stasis-iobench vsock-sink PORT [BYTES]  accept one connection, read BYTES (or to its
//!                                          end), answer `received=N\n`, close
//! stasis-iobench vsock-source PORT MIB    accept one connection, write MIB MiB, close
//! stasis-iobench vsock-accept PORT COUNT  accept COUNT connections, closing each at once
//! ```
//!
//! Exit status 0 on success, 1 on an error (one line on stderr), 2 on a bad
//! command line.

#[allow(dead_code)] // connect() is stasis-vsock's; only listen/accept are used here.
#[path = "../vsock.rs"]
mod vsock;

use std::ffi::CString;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const USAGE: &str = "\
Usage: stasis-iobench seq-read|seq-write DEVICE [--bs SIZE] [--mib N]
       stasis-iobench rand-read DEVICE [--bs SIZE] [--seconds S] [--seed N]
       stasis-iobench vsock-sink PORT [BYTES]
       stasis-iobench vsock-source PORT MIB
       stasis-iobench vsock-accept PORT COUNT
SIZE takes a K or M suffix (1024, 1048576). Disk tests use O_DIRECT.";

/// O_DIRECT wants buffers aligned to the logical block size; 4 KiB
/// covers every device seen here.
const ALIGN: usize = 4096;

#[derive(Debug, PartialEq)]
enum Test {
    SeqRead,
    SeqWrite,
    RandRead,
}

#[derive(Debug, PartialEq)]
enum Command {
    Help,
    Disk { test: Test, device: String, bs: usize, mib: u64, seconds: f64, seed: u64 },
    VsockSink { port: u32, bytes: Option<u64> },
    VsockSource { port: u32, mib: u64 },
    VsockAccept { port: u32, count: u64 },
}

fn size(text: &str) -> Result<usize, String> {
    let (digits, unit) = match text.as_bytes().last() {
        Some(b'K' | b'k') => (&text[..text.len() - 1], 1024),
        Some(b'M' | b'm') => (&text[..text.len() - 1], 1024 * 1024),
        _ => (text, 1),
    };
    let n: usize = digits.parse().map_err(|_| format!("bad size '{text}'"))?;
    match n.checked_mul(unit) {
        Some(v) if v > 0 && v % 512 == 0 => Ok(v),
        _ => Err(format!("size '{text}' must be a non-zero multiple of 512")),
    }
}

fn number<T: std::str::FromStr>(what: &str, text: Option<String>) -> Result<T, String> {
    let text = text.ok_or_else(|| format!("{what} is missing"))?;
    text.parse().map_err(|_| format!("bad {what} '{text}'"))
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Command, String> {
    let verb = args.next().ok_or("no command")?;
    let test = match verb.as_str() {
        "-h" | "--help" => return Ok(Command::Help),
        "vsock-sink" => {
            let port = number("PORT", args.next())?;
            let bytes = args.next().map(|b| number("BYTES", Some(b))).transpose()?;
            return Ok(Command::VsockSink { port, bytes });
        }
        "vsock-source" => {
            let port = number("PORT", args.next())?;
            return Ok(Command::VsockSource { port, mib: number("MIB", args.next())? });
        }
        "vsock-accept" => {
            let port = number("PORT", args.next())?;
            return Ok(Command::VsockAccept { port, count: number("COUNT", args.next())? });
        }
        "seq-read" => Test::SeqRead,
        "seq-write" => Test::SeqWrite,
        "rand-read" => Test::RandRead,
        other => return Err(format!("unknown command '{other}'")),
    };
    let device = args.next().ok_or("DEVICE is missing")?;
    let bs_default = if test == Test::RandRead { 4096 } else { 1024 * 1024 };
    let mut cmd = Command::Disk { test, device, bs: bs_default, mib: 256, seconds: 10.0, seed: 1 };
    let Command::Disk { bs, mib, seconds, seed, .. } = &mut cmd else { unreachable!("built above") };
    while let Some(opt) = args.next() {
        match opt.as_str() {
            "--bs" => *bs = size(&args.next().ok_or("--bs needs a SIZE")?)?,
            "--mib" => *mib = number("--mib", args.next())?,
            "--seconds" => *seconds = number("--seconds", args.next())?,
            "--seed" => *seed = number("--seed", args.next())?,
            other => return Err(format!("unknown option '{other}'")),
        }
    }
    if !seconds.is_finite() || *seconds <= 0.0 {
        return Err("--seconds must be positive".into());
    }
    Ok(cmd)
}

/// An `ALIGN`-aligned buffer for O_DIRECT.
struct Buffer {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Buffer {
    fn new(len: usize, fill: u8) -> Buffer {
        let layout = std::alloc::Layout::from_size_align(len, ALIGN).expect("len is a small multiple of 512");
        // SAFETY: layout has a non-zero size (sizes are checked non-zero).
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        // SAFETY: ptr is valid for writes of layout.size() bytes.
        unsafe { std::ptr::write_bytes(ptr, fill, layout.size()) };
        Buffer { ptr, layout }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: ptr came from alloc with this very layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

fn open_direct(device: &str, write: bool) -> io::Result<OwnedFd> {
    let path = CString::new(device).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mode = if write { libc::O_RDWR } else { libc::O_RDONLY };
    // SAFETY: path is a valid NUL-terminated string that outlives the call.
    let fd = unsafe { libc::open(path.as_ptr(), mode | libc::O_DIRECT | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor, owned from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn device_size(fd: &OwnedFd) -> io::Result<u64> {
    // SAFETY: lseek takes no pointers; SEEK_END on a block device gives its size.
    let end = unsafe { libc::lseek(fd.as_raw_fd(), 0, libc::SEEK_END) };
    if end < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(end as u64)
}

/// One whole-block transfer at `offset`; a short one is an error.
fn transfer(fd: &OwnedFd, buf: &Buffer, offset: u64, write: bool) -> io::Result<()> {
    let len = buf.layout.size();
    let rc = if write {
        // SAFETY: buf is valid for reads of len bytes for the call.
        unsafe { libc::pwrite(fd.as_raw_fd(), buf.ptr.cast(), len, offset as libc::off_t) }
    } else {
        // SAFETY: buf is valid for writes of len bytes for the call.
        unsafe { libc::pread(fd.as_raw_fd(), buf.ptr.cast(), len, offset as libc::off_t) }
    };
    match rc {
        n if n < 0 => Err(io::Error::last_os_error()),
        n if n as usize != len => Err(io::Error::other(format!("short transfer: {n} of {len} bytes at {offset}"))),
        _ => Ok(()),
    }
}

/// xorshift64: cheap, and the same sequence for the same seed everywhere.
fn next(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    x
}

fn disk(test: Test, device: &str, bs: usize, mib: u64, seconds: f64, seed: u64) -> Result<(), String> {
    let write = test == Test::SeqWrite;
    let fd = open_direct(device, write).map_err(|e| format!("open {device} (O_DIRECT): {e}"))?;
    let dev_size = device_size(&fd).map_err(|e| format!("size of {device}: {e}"))?;
    let blocks = dev_size / bs as u64;
    if blocks == 0 {
        return Err(format!("{device} ({dev_size} bytes) is smaller than one {bs}-byte block"));
    }
    // Written data is non-zero, so a VMM cannot shortcut it.
    let buf = Buffer::new(bs, 0xa5);
    let (name, ops, elapsed) = match test {
        Test::SeqRead | Test::SeqWrite => {
            let ops = (mib * 1024 * 1024 / bs as u64).min(blocks);
            let t = Instant::now();
            for i in 0..ops {
                transfer(&fd, &buf, i * bs as u64, write).map_err(|e| format!("{device} block {i}: {e}"))?;
            }
            if write {
                // SAFETY: fdatasync takes no pointers.
                if unsafe { libc::fdatasync(fd.as_raw_fd()) } != 0 {
                    return Err(format!("fdatasync {device}: {}", io::Error::last_os_error()));
                }
            }
            (if write { "seq-write" } else { "seq-read" }, ops, t.elapsed())
        }
        Test::RandRead => {
            let mut state = seed.max(1);
            let limit = Duration::from_secs_f64(seconds);
            let mut ops = 0u64;
            let t = Instant::now();
            loop {
                let offset = (next(&mut state) % blocks) * bs as u64;
                transfer(&fd, &buf, offset, false).map_err(|e| format!("{device} at {offset}: {e}"))?;
                ops += 1;
                // Checked every 16 ops: the clock is cheap, but not free.
                if ops % 16 == 0 && t.elapsed() >= limit {
                    break;
                }
            }
            ("rand-read", ops, t.elapsed())
        }
    };
    let secs = elapsed.as_secs_f64();
    let bytes = ops * bs as u64;
    println!(
        "iobench test={name} bs={bs} ops={ops} bytes={bytes} seconds={secs:.6} mb_s={:.1} iops={:.1}",
        bytes as f64 / secs / 1e6,
        ops as f64 / secs
    );
    Ok(())
}

/// One accepted connection, as a File: read(2) and write(2) work on any
/// stream socket.
fn accept_one(port: u32) -> Result<std::fs::File, String> {
    let listener = vsock::listen(port).map_err(|e| format!("listen on port {port}: {e}"))?;
    let (sock, _, _) = vsock::accept(&listener).map_err(|e| format!("accept on port {port}: {e}"))?;
    Ok(std::fs::File::from(sock))
}

/// Reads `bytes` (a peer that cannot half-close, such as Firecracker's
/// host side, which ends the whole stream on its end of file) or to the end.
fn vsock_sink(port: u32, bytes: Option<u64>) -> Result<(), String> {
    let mut sock = accept_one(port)?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut received = 0u64;
    while bytes.is_none_or(|b| received < b) {
        match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => received += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("reading port {port}: {e}")),
        }
    }
    sock.write_all(format!("received={received}\n").as_bytes()).map_err(|e| format!("answering on port {port}: {e}"))
}

fn vsock_source(port: u32, mib: u64) -> Result<(), String> {
    let mut sock = accept_one(port)?;
    let buf = vec![0x5au8; 1024 * 1024];
    for _ in 0..mib {
        sock.write_all(&buf).map_err(|e| format!("writing port {port}: {e}"))?;
    }
    // SAFETY: shutdown takes no pointers; sock is an open socket.
    if unsafe { libc::shutdown(sock.as_raw_fd(), libc::SHUT_WR) } != 0 {
        return Err(format!("shutdown on port {port}: {}", io::Error::last_os_error()));
    }
    // Wait for the host's end, so nothing is cut short by our close.
    let mut rest = Vec::new();
    let _ = sock.read_to_end(&mut rest);
    Ok(())
}

fn vsock_accept(port: u32, count: u64) -> Result<(), String> {
    let listener = vsock::listen(port).map_err(|e| format!("listen on port {port}: {e}"))?;
    for _ in 0..count {
        vsock::accept(&listener).map_err(|e| format!("accept on port {port}: {e}"))?;
    }
    Ok(())
}

fn main() -> ExitCode {
    let command = match parse(std::env::args().skip(1)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("stasis-iobench: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let result = match command {
        Command::Help => {
            println!("{USAGE}");
            Ok(())
        }
        Command::Disk { test, device, bs, mib, seconds, seed } => disk(test, &device, bs, mib, seconds, seed),
        Command::VsockSink { port, bytes } => vsock_sink(port, bytes),
        Command::VsockSource { port, mib } => vsock_source(port, mib),
        Command::VsockAccept { port, count } => vsock_accept(port, count),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stasis-iobench: {e}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(line: &str) -> impl Iterator<Item = String> + '_ {
        line.split_whitespace().map(str::to_string)
    }

    #[test]
    fn sizes_take_k_and_m_suffixes_and_refuse_odd_ones() {
        assert_eq!(size("4K"), Ok(4096));
        assert_eq!(size("1M"), Ok(1 << 20));
        assert_eq!(size("512"), Ok(512));
        assert!(size("100").is_err());
        assert!(size("0").is_err());
    }

    #[test]
    fn rand_read_defaults_to_4k_for_10_seconds() {
        let cmd = parse(args("rand-read /dev/vda")).expect("valid");
        assert_eq!(
            cmd,
            Command::Disk { test: Test::RandRead, device: "/dev/vda".into(), bs: 4096, mib: 256, seconds: 10.0, seed: 1 }
        );
    }

    #[test]
    fn seq_write_takes_options() {
        let cmd = parse(args("seq-write /dev/vdb --bs 64K --mib 32")).expect("valid");
        assert!(matches!(cmd, Command::Disk { test: Test::SeqWrite, bs: 65536, mib: 32, .. }));
    }

    #[test]
    fn vsock_commands_need_their_numbers() {
        assert_eq!(parse(args("vsock-source 5001 64")), Ok(Command::VsockSource { port: 5001, mib: 64 }));
        assert!(parse(args("vsock-accept 5002")).is_err());
        assert!(parse(args("vsock-sink x")).is_err());
        assert!(parse(args("bogus")).is_err());
    }

    #[test]
    fn xorshift_is_deterministic() {
        let (mut a, mut b) = (1u64, 1u64);
        let xs: Vec<u64> = (0..4).map(|_| next(&mut a)).collect();
        let ys: Vec<u64> = (0..4).map(|_| next(&mut b)).collect();
        assert_eq!(xs, ys);
        assert!(xs.iter().all(|&x| x != 0));
    }
}
