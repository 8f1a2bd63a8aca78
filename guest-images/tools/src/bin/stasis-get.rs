//! `stasis-get`: fetches content from the host by its ID over vsock, the
//! guest side of stasis's content service (protocol version 1,
//! `docs/content.md`). Built static by guest-images/build and installed as
//! /bin/stasis-get in the initramfs and the disk image.
//!
//! The bytes go to `PATH.stasis-get-<pid>` while their SHA-256 is computed;
//! only when the host's trailer says `END OK` and (for a whole item) the
//! digest is the ID is the file synced and renamed to `PATH`. Anything
//! else — a refusal, a mismatch, a transfer cut short — removes the partial
//! file, prints `stasis-get: <word>: <message>` and exits 1.

#[allow(dead_code)] // listen() and accept() are for the listening tools; only connect() is used here.
#[path = "../vsock.rs"]
mod vsock;

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

const USAGE: &str = "\
Usage: stasis-get ID [-o PATH] [--range A-B] [--port PORT] [--cid CID] [--quiet] [--raw]
       stasis-get --repeat N ID [--port PORT] [--cid CID]

Fetches the content with ID (sha256:<64 hex digits>) from the VMM's content
service over vsock and writes it to PATH (default: the ID's hex digits in
the current directory; `-` for standard output). The file appears only
once its SHA-256 is checked against the ID; a refusal or a failed transfer
leaves nothing behind.

  --range A-B   bytes A up to B (B excluded; `A-` to the end); not checked
                against the ID, the host checks the whole item
  --port PORT   the service's host port (default 5050)
  --cid CID     the host's CID (default 2)
  --quiet       no line on stderr on success
  --raw         send ID and the range as given, unchecked (for testing the
                host's checks)
  --repeat N    ask for ID N times over one connection, discard the bytes,
                print `stasis-get: latency requests=N p50_us=.. p99_us=.. max_us=..`

Exit status: 0 on success, 1 on a refusal or failure (one line on stderr),
2 on a bad command line.";

/// The protocol tag.
const TAG: &str = "STASIS-CONTENT/1";
/// The longest line accepted from the host.
const MAX_LINE: usize = 512;
/// How long a read from the host may wait.
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Data is received in pieces of this size.
const CHUNK: usize = 256 * 1024;

/// What to do.
#[derive(Debug, PartialEq, Eq)]
struct Opts {
    id: String,
    out: Option<String>,
    range: Option<String>,
    port: u32,
    cid: u32,
    quiet: bool,
    raw: bool,
    repeat: Option<u64>,
}

/// Parses the command line; the error is a sentence for stderr.
fn parse_args(args: &[String]) -> Result<Option<Opts>, String> {
    let mut o = Opts { id: String::new(), out: None, range: None, port: 5050, cid: 2, quiet: false, raw: false, repeat: None };
    let mut id = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "-o" => o.out = Some(value("-o")?),
            "--range" => o.range = Some(value("--range")?),
            "--port" => o.port = value("--port")?.parse().map_err(|_| "--port needs a number".to_string())?,
            "--cid" => o.cid = value("--cid")?.parse().map_err(|_| "--cid needs a number".to_string())?,
            "--repeat" => {
                o.repeat = Some(value("--repeat")?.parse().ok().filter(|&n| n > 0).ok_or("--repeat needs a number of at least 1")?)
            }
            "--quiet" => o.quiet = true,
            "--raw" => o.raw = true,
            a if a.starts_with('-') && a.len() > 1 => return Err(format!("unknown option {a}")),
            a if id.is_none() => id = Some(a.to_string()),
            a => return Err(format!("unexpected argument {a:?}")),
        }
    }
    o.id = id.ok_or("an ID is needed")?;
    if !o.raw {
        if !valid_id(&o.id) {
            return Err(format!("{:?} is not a content ID: sha256: followed by 64 lowercase hex digits", o.id));
        }
        if let Some(range) = &o.range {
            if !valid_range(range) {
                return Err(format!("--range {range:?}: expected A-B or A- (byte offsets)"));
            }
        }
    }
    if o.repeat.is_some() && (o.out.is_some() || o.range.is_some()) {
        return Err("--repeat takes neither -o nor --range".into());
    }
    Ok(Some(o))
}

fn valid_id(id: &str) -> bool {
    id.strip_prefix("sha256:")
        .is_some_and(|hex| hex.len() == 64 && hex.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)))
}

fn valid_range(range: &str) -> bool {
    let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|c| c.is_ascii_digit());
    range.split_once('-').is_some_and(|(a, b)| digits(a) && (b.is_empty() || digits(b)))
}

/// Why a fetch failed: the word and message printed as `stasis-get: WORD: MESSAGE`.
#[derive(Debug, PartialEq, Eq)]
struct Failure {
    word: String,
    message: String,
}

fn fail(word: &str, message: impl Into<String>) -> Failure {
    Failure { word: word.to_string(), message: message.into() }
}

fn io_fail(what: &str, e: io::Error) -> Failure {
    if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
        return fail("timeout", format!("the host sent nothing for {}s while {what}", READ_TIMEOUT.as_secs()));
    }
    fail("io-error", format!("{what}: {e}"))
}

/// A reply's first line.
#[derive(Debug, PartialEq, Eq)]
enum Head {
    /// `OK <length> <size> <id>`.
    Ok { length: u64 },
    /// `ERR <code> <word>: <message>`.
    Refused(Failure),
}

/// Parses a host line (without its newline) after the tag: `OK …`, `ERR …`
/// or, when `trailer`, `END OK` / `END ERR …`.
fn parse_line(line: &str, trailer: bool) -> Result<Head, Failure> {
    let bad = || fail("protocol", format!("the host sent {:?}", line.chars().take(120).collect::<String>()));
    let rest = line.strip_prefix(TAG).and_then(|r| r.strip_prefix(' ')).ok_or_else(bad)?;
    let rest = if trailer { rest.strip_prefix("END ").ok_or_else(bad)? } else { rest };
    if let Some(err) = rest.strip_prefix("ERR ") {
        let (_code, text) = err.split_once(' ').ok_or_else(bad)?;
        let (word, message) = text.split_once(": ").ok_or_else(bad)?;
        return Ok(Head::Refused(fail(word, message)));
    }
    if trailer {
        return if rest == "OK" { Ok(Head::Ok { length: 0 }) } else { Err(bad()) };
    }
    let fields: Vec<&str> = rest.split(' ').collect();
    match fields.as_slice() {
        ["OK", length, _size, _id] => Ok(Head::Ok { length: length.parse().map_err(|_| bad())? }),
        _ => Err(bad()),
    }
}

/// Reads one line of at most [`MAX_LINE`] bytes, newline stripped.
fn read_line(reader: &mut impl BufRead, what: &str) -> Result<String, Failure> {
    let mut line = Vec::new();
    let n = reader.by_ref().take(MAX_LINE as u64).read_until(b'\n', &mut line).map_err(|e| io_fail(what, e))?;
    if n == 0 {
        return Err(fail("cut-short", format!("the host closed the connection while {what}")));
    }
    if line.pop() != Some(b'\n') {
        return Err(fail("protocol", format!("the host sent an unterminated or overlong line while {what}")));
    }
    String::from_utf8(line).map_err(|_| fail("protocol", "the host sent a line that is not text"))
}

/// Sends one request and receives its reply into `out`; returns the
/// SHA-256 of what was received.
fn transfer(conn: &mut (impl BufRead + Write), request: &str, out: &mut impl Write) -> Result<[u8; 32], Failure> {
    conn.write_all(request.as_bytes()).map_err(|e| io_fail("sending the request", e))?;
    let length = match parse_line(&read_line(conn, "waiting for the reply")?, false)? {
        Head::Ok { length } => length,
        Head::Refused(f) => return Err(f),
    };
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    while got < length {
        let want = (length - got).min(CHUNK as u64) as usize;
        let n = match conn.read(&mut buf[..want]) {
            Ok(0) => return Err(fail("cut-short", format!("connection closed after {got} of {length} bytes"))),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_fail("receiving the content", e)),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(|e| fail("io-error", format!("cannot write the content: {e}")))?;
        got += n as u64;
    }
    match parse_line(&read_line(conn, "waiting for the end of the reply")?, true)? {
        Head::Ok { .. } => Ok(hasher.finalize().into()),
        Head::Refused(f) => Err(f),
    }
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn request_line(o: &Opts) -> String {
    match &o.range {
        Some(range) => format!("{TAG} GET {} {range}\n", o.id),
        None => format!("{TAG} GET {}\n", o.id),
    }
}

/// Fetches into a partial file and renames it to `path` when all is well.
fn fetch_to_file(conn: &mut (impl BufRead + Write), o: &Opts, path: &Path) -> Result<u64, Failure> {
    let partial = PathBuf::from(format!("{}.stasis-get-{}", path.display(), std::process::id()));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&partial)
        .map_err(|e| fail("io-error", format!("cannot create {}: {e}", partial.display())))?;
    let result = transfer(conn, &request_line(o), &mut file).and_then(|digest| {
        if o.range.is_none() && format!("sha256:{}", hex(&digest)) != o.id {
            return Err(fail("mismatch", format!("received bytes do not match {}", o.id)));
        }
        file.sync_all().map_err(|e| fail("io-error", format!("cannot sync {}: {e}", partial.display())))?;
        fs::rename(&partial, path).map_err(|e| fail("io-error", format!("cannot rename to {}: {e}", path.display())))?;
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    });
    if let Err(f) = result {
        drop(file);
        let _ = fs::remove_file(&partial);
        return Err(f);
    }
    Ok(fs::metadata(path).map(|m| m.len()).unwrap_or(0))
}

/// `--repeat N`: the service time of N requests on one connection.
fn repeat(conn: &mut (impl BufRead + Write), o: &Opts, n: u64) -> Result<String, Failure> {
    let mut times = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let start = Instant::now();
        let digest = transfer(conn, &request_line(o), &mut io::sink())?;
        times.push(start.elapsed().as_micros() as u64);
        if format!("sha256:{}", hex(&digest)) != o.id {
            return Err(fail("mismatch", format!("received bytes do not match {}", o.id)));
        }
    }
    times.sort_unstable();
    let pct = |p: usize| times[((times.len() * p).div_ceil(100)).saturating_sub(1).min(times.len() - 1)];
    Ok(format!(
        "stasis-get: latency requests={n} p50_us={} p99_us={} max_us={}",
        pct(50),
        pct(99),
        times[times.len() - 1]
    ))
}

/// A connected stream to the service, with a read timeout.
fn connect(o: &Opts) -> Result<BufReader<File>, Failure> {
    let fd = vsock::connect(o.cid, o.port).map_err(|e| {
        fail(
            "connect",
            format!("cannot connect to CID {} port {}: {e} (is the VM started with --content-store?)", o.cid, o.port),
        )
    })?;
    let tv = libc::timeval { tv_sec: READ_TIMEOUT.as_secs() as libc::time_t, tv_usec: 0 };
    // SAFETY: tv is a valid timeval that outlives the call; the size is its own.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(fail("io-error", format!("cannot set a receive timeout: {}", io::Error::last_os_error())));
    }
    Ok(BufReader::with_capacity(CHUNK, File::from(fd)))
}

/// A BufReader over the connection that writes straight to it.
struct Conn<R: Read + Write>(BufReader<R>);

impl<R: Read + Write> Read for Conn<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl<R: Read + Write> BufRead for Conn<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.0.fill_buf()
    }
    fn consume(&mut self, n: usize) {
        self.0.consume(n)
    }
}

impl<R: Read + Write> Write for Conn<R> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.get_mut().write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.get_mut().flush()
    }
}

fn run(o: &Opts) -> Result<(), Failure> {
    let mut conn = Conn(connect(o)?);
    if let Some(n) = o.repeat {
        println!("{}", repeat(&mut conn, o, n)?);
        return Ok(());
    }
    match o.out.as_deref() {
        Some("-") => {
            let stdout = io::stdout();
            let mut lock = stdout.lock();
            let digest = transfer(&mut conn, &request_line(o), &mut lock)?;
            lock.flush().map_err(|e| fail("io-error", format!("cannot write standard output: {e}")))?;
            if o.range.is_none() && format!("sha256:{}", hex(&digest)) != o.id {
                return Err(fail("mismatch", format!("received bytes do not match {}", o.id)));
            }
        }
        out => {
            let path = PathBuf::from(out.map_or_else(|| o.id.trim_start_matches("sha256:").to_string(), str::to_string));
            let bytes = fetch_to_file(&mut conn, o, &path)?;
            if !o.quiet {
                eprintln!("stasis-get: {} {bytes} bytes -> {}", o.id, path.display());
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match parse_args(&args) {
        Ok(Some(o)) => o,
        Ok(None) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("stasis-get: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("stasis-get: {}: {}", f.word, f.message);
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::thread;

    const ABC: &str = "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

    fn opts(args: &[&str]) -> Opts {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        parse_args(&args).expect("valid").expect("not help")
    }

    #[test]
    fn command_line_parses_and_checks() {
        let o = opts(&[ABC, "-o", "/tmp/x", "--range", "1-5", "--port", "7", "--quiet"]);
        assert_eq!((o.out.as_deref(), o.range.as_deref(), o.port, o.quiet), (Some("/tmp/x"), Some("1-5"), 7, true));
        for bad in [&["sha256:12"][..], &[ABC, "--range", "x"], &[ABC, "--bogus"], &[], &[ABC, "--repeat", "0"], &[ABC, "--repeat", "2", "-o", "x"]] {
            let args: Vec<String> = bad.iter().map(|s| s.to_string()).collect();
            assert!(parse_args(&args).is_err(), "{bad:?}");
        }
        assert_eq!(opts(&["--raw", "../x", "--range", "zz"]).id, "../x");
    }

    #[test]
    fn reply_lines_parse() {
        assert_eq!(parse_line(&format!("{TAG} OK 3 10 {ABC}"), false), Ok(Head::Ok { length: 3 }));
        assert_eq!(
            parse_line(&format!("{TAG} ERR 3 not-granted: x is not granted"), false),
            Ok(Head::Refused(fail("not-granted", "x is not granted")))
        );
        assert_eq!(parse_line(&format!("{TAG} END OK"), true), Ok(Head::Ok { length: 0 }));
        assert!(matches!(parse_line(&format!("{TAG} END ERR 6 mismatch: m"), true), Ok(Head::Refused(f)) if f.word == "mismatch"));
        for bad in ["", "HTTP/1.1 200 OK", &format!("{TAG} OK x 1 {ABC}"), &format!("{TAG} OK 1")] {
            assert!(parse_line(bad, false).is_err(), "{bad:?}");
        }
        assert!(parse_line(&format!("{TAG} OK 1 1 {ABC}"), true).is_err(), "not a trailer");
    }

    /// Runs the client's file fetch against a fake host that answers with
    /// `reply`; returns the outcome and the files left in the directory.
    fn against(reply: Vec<u8>, o: &Opts) -> (Result<u64, Failure>, Vec<String>) {
        let (client, mut host) = UnixStream::pair().expect("pair");
        let tag = reply.len();
        let server = thread::spawn(move || {
            let mut line = Vec::new();
            BufReader::new(host.try_clone().expect("clone")).read_until(b'\n', &mut line).expect("request");
            let _ = host.write_all(&reply);
            line
        });
        let dir = std::env::temp_dir().join(format!("stasis-get-test-{}-{}", std::process::id(), tag));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).expect("dir");
        let mut conn = Conn(BufReader::new(client));
        let result = fetch_to_file(&mut conn, o, &dir.join("out"));
        drop(conn);
        let request = server.join().expect("server");
        assert!(request.starts_with(format!("{TAG} GET ").as_bytes()));
        let mut left: Vec<String> =
            fs::read_dir(&dir).expect("list").map(|e| e.expect("entry").file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        let _ = fs::remove_dir_all(&dir);
        (result, left)
    }

    #[test]
    fn whole_transfer_lands_and_failures_leave_nothing() {
        let o = opts(&[ABC]);
        let ok = format!("{TAG} OK 3 3 {ABC}\nabc{TAG} END OK\n").into_bytes();
        assert_eq!(against(ok, &o), (Ok(3), vec!["out".to_string()]));

        let refused = format!("{TAG} ERR 3 not-granted: no\n").into_bytes();
        assert_eq!(against(refused, &o), (Err(fail("not-granted", "no")), vec![]));

        let end_err = format!("{TAG} OK 3 3 {ABC}\nabc{TAG} END ERR 6 mismatch: content does not match its ID\n").into_bytes();
        let (result, left) = against(end_err, &o);
        assert_eq!((result.map_err(|f| f.word), left), (Err("mismatch".into()), vec![]));

        let short = format!("{TAG} OK 3 3 {ABC}\nab").into_bytes();
        let (result, left) = against(short, &o);
        assert_eq!((result.map_err(|f| f.word), left), (Err("cut-short".into()), vec![]));

        let wrong = format!("{TAG} OK 3 3 {ABC}\nabd{TAG} END OK\n").into_bytes();
        let (result, left) = against(wrong, &o);
        assert_eq!((result.map_err(|f| f.word), left), (Err("mismatch".into()), vec![]));

        let overlong = vec![b'A'; 4000];
        let (result, left) = against(overlong, &o);
        assert_eq!((result.map_err(|f| f.word), left), (Err("protocol".into()), vec![]));
    }
}
