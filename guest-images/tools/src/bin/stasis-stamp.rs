//! `stasis-stamp`: a point-in-time checker for snapshots of a running guest.
//! libc only; built static by guest-images/build and installed as
//! /bin/stasis-stamp in the initramfs and the disk image.
//!
//! ```text
//! stasis-stamp [--mib N]
//! ```
//!
//! Allocates N MiB (default 128) plus one header page, and forever, for
//! generation g = 1, 2, …, rewrites the buffer page by page: every u64 of
//! page p becomes `g << 32 | p`, and after each page the header records the
//! position `g << 32 | (p + 1)` (one aligned u64 store, so the position is
//! never torn). Stores are volatile and fenced, so memory holds them in
//! program order: at any instant, every page before the recorded position
//! holds generation g, every page at or after it generation g - 1 (zero,
//! untouched, when g is 1).
//!
//! A snapshot that holds memory as it was at one instant keeps that true; one
//! that copies pages at different instants while the guest runs does not.
//! On SIGUSR1 the program checks the whole buffer against the recorded
//! position (every word of every page, so a page saved half old and half new
//! is caught), and the position against where the writer itself is (its
//! registers and stack come from the snapshot's vCPU state), then prints
//! exactly one line and goes on:
//!
//! ```text
//! STAMP OK gen=G pos=P pages=N
//! STAMP BAD page=X holds gen=Y page_no=Z, expected gen=W (position gen=G pos=P)
//! STAMP BAD position gen=G pos=P, but the writer is at gen=G2 pos=P2
//! STAMP BAD header: …
//! ```
//!
//! The SIGUSR1 check looks at memory when the signal comes, which after a
//! restore may be after the restored program rewrote part of the buffer.
//! So the writer also checks each page just before it overwrites it: the
//! page must still hold the previous generation's stamp. After a restore,
//! the first generation written therefore checks every page as the
//! snapshot held it. The first mismatch is printed once, as
//! `STAMP BAD before overwrite: page=X holds gen=Y page_no=Z, expected
//! gen=W`, and the SIGUSR1 line then reports `STAMP BAD overwritten=N
//! (first: …)` instead of OK; an OK line carries `verified=V`, the pages
//! checked before overwriting since the start.
//!
//! At start it prints `STAMP RUNNING pid=PID mib=N`; on SIGUSR2
//! `STAMP RATE mib_per_s=R`, the MiB written per second since the previous
//! SIGUSR2 (or the start). Signals are acted on between pages.

use std::io::Write;
use std::process::ExitCode;
use std::ptr;
use std::sync::atomic::{compiler_fence, AtomicBool, Ordering};
use std::time::Instant;

const USAGE: &str = "\
Usage: stasis-stamp [--mib N]
Rewrites N MiB (default 128) page by page, each page stamped with a generation,
recording after each page how far it got. SIGUSR1: check the buffer against the
recorded position (one line, STAMP OK or STAMP BAD). SIGUSR2: print the write rate.";

const PAGE: usize = 4096;
const WORDS: usize = PAGE / 8;
/// Header words (the header is page 0 of the allocation; data page p is
/// allocation page p + 1).
const MAGIC_WORD: usize = 0;
const PAGES_WORD: usize = 1;
const POSITION_WORD: usize = 2;
const MAGIC: u64 = u64::from_be_bytes(*b"STAMPv1\0");
/// Bound on --mib: the page number must fit the stamp's 32 low bits, and
/// no test guest has this much memory anyway.
const MAX_MIB: usize = 1 << 20;

static CHECK: AtomicBool = AtomicBool::new(false);
static RATE: AtomicBool = AtomicBool::new(false);

/// What every word of data page `page` holds in generation `gen` (zero for
/// generation 0: the page was never written).
fn stamp(gen: u32, page: usize) -> u64 {
    if gen == 0 {
        0
    } else {
        (u64::from(gen) << 32) | page as u64
    }
}

/// The header's position word: generation and the number of its pages done.
fn position(gen: u32, pos: usize) -> u64 {
    (u64::from(gen) << 32) | pos as u64
}

/// Pages written since the start: where the writer is, as one number
/// (`(g, N)` and `(g + 1, 0)` are the same instant).
fn linear(gen: u32, pos: usize, pages: usize) -> u64 {
    u64::from(gen.saturating_sub(1)) * pages as u64 + pos as u64
}

/// The buffer: header page then `pages` data pages, as u64 words.
struct Stamps {
    base: *mut u64,
    pages: usize,
}

impl Stamps {
    /// Over `words`, which must be `(pages + 1) * WORDS` long and outlive
    /// the value; writes the header with position (1, 0).
    ///
    /// # Safety
    /// `base` must be valid for reads and writes of `(pages + 1) * WORDS`
    /// u64s for as long as the value is used, and not accessed otherwise.
    unsafe fn new(base: *mut u64, pages: usize) -> Stamps {
        let s = Stamps { base, pages };
        s.store(MAGIC_WORD, MAGIC);
        s.store(PAGES_WORD, pages as u64);
        s.store(POSITION_WORD, position(1, 0));
        compiler_fence(Ordering::SeqCst);
        s
    }

    fn store(&self, word: usize, value: u64) {
        assert!(word < (self.pages + 1) * WORDS, "word {word} out of the buffer");
        // SAFETY: in bounds (checked above) of the region `new` was given,
        // valid for writes and aligned (u64 pointer from mmap or a Vec<u64>).
        unsafe { ptr::write_volatile(self.base.add(word), value) };
    }

    fn load(&self, word: usize) -> u64 {
        assert!(word < (self.pages + 1) * WORDS, "word {word} out of the buffer");
        // SAFETY: as in `store`, for reads.
        unsafe { ptr::read_volatile(self.base.add(word)) }
    }

    /// The first word of data page `page` that is not `gen`'s stamp.
    fn mismatch(&self, gen: u32, page: usize) -> Option<u64> {
        let want = stamp(gen, page);
        let first = (page + 1) * WORDS;
        (first..first + WORDS).map(|w| self.load(w)).find(|&v| v != want)
    }

    /// Stamps data page `page` with `gen`, then records the position after
    /// it. The fences keep the compiler from moving the position store
    /// before the page's stores (x86 keeps stores in order itself).
    fn write_page(&self, gen: u32, page: usize) {
        let value = stamp(gen, page);
        let first = (page + 1) * WORDS;
        for word in first..first + WORDS {
            self.store(word, value);
        }
        compiler_fence(Ordering::SeqCst);
        self.store(POSITION_WORD, position(gen, page + 1));
        compiler_fence(Ordering::SeqCst);
    }

    /// Checks the buffer against the recorded position and the recorded
    /// position against `writer` (the writer's own (gen, pos)).
    fn check(&self, writer: (u32, usize)) -> Verdict {
        compiler_fence(Ordering::SeqCst);
        if self.load(MAGIC_WORD) != MAGIC {
            return Verdict::BadHeader(format!("magic {:#018x}, expected {MAGIC:#018x}", self.load(MAGIC_WORD)));
        }
        if self.load(PAGES_WORD) != self.pages as u64 {
            return Verdict::BadHeader(format!("{} pages, expected {}", self.load(PAGES_WORD), self.pages));
        }
        let word = self.load(POSITION_WORD);
        let (gen, pos) = ((word >> 32) as u32, (word & 0xffff_ffff) as usize);
        if gen == 0 || pos > self.pages {
            return Verdict::BadHeader(format!("position gen={gen} pos={pos} is impossible"));
        }
        if linear(gen, pos, self.pages) != linear(writer.0, writer.1, self.pages) {
            return Verdict::BadPosition { gen, pos, writer_gen: writer.0, writer_pos: writer.1 };
        }
        for page in 0..self.pages {
            let expected = if page < pos { gen } else { gen - 1 };
            let want = stamp(expected, page);
            let first = (page + 1) * WORDS;
            if let Some(held) = (first..first + WORDS).map(|w| self.load(w)).find(|&v| v != want) {
                return Verdict::BadPage {
                    page,
                    holds_gen: (held >> 32) as u32,
                    holds_page_no: held & 0xffff_ffff,
                    expected_gen: expected,
                    gen,
                    pos,
                };
            }
        }
        Verdict::Ok { gen, pos, pages: self.pages }
    }
}

#[derive(Debug, PartialEq)]
enum Verdict {
    Ok { gen: u32, pos: usize, pages: usize },
    BadPage { page: usize, holds_gen: u32, holds_page_no: u64, expected_gen: u32, gen: u32, pos: usize },
    BadPosition { gen: u32, pos: usize, writer_gen: u32, writer_pos: usize },
    BadHeader(String),
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Ok { gen, pos, pages } => write!(f, "STAMP OK gen={gen} pos={pos} pages={pages}"),
            Verdict::BadPage { page, holds_gen, holds_page_no, expected_gen, gen, pos } => write!(
                f,
                "STAMP BAD page={page} holds gen={holds_gen} page_no={holds_page_no}, \
                 expected gen={expected_gen} (position gen={gen} pos={pos})"
            ),
            Verdict::BadPosition { gen, pos, writer_gen, writer_pos } => write!(
                f,
                "STAMP BAD position gen={gen} pos={pos}, but the writer is at gen={writer_gen} pos={writer_pos}"
            ),
            Verdict::BadHeader(why) => write!(f, "STAMP BAD header: {why}"),
        }
    }
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Option<usize>, String> {
    let mut mib = 128;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--mib" => {
                let text = args.next().ok_or("--mib needs a number")?;
                mib = text.parse().map_err(|_| format!("bad --mib '{text}'"))?;
                if mib == 0 || mib > MAX_MIB {
                    return Err(format!("--mib must be 1 to {MAX_MIB}"));
                }
            }
            other => return Err(format!("unknown argument '{other}'")),
        }
    }
    Ok(Some(mib))
}

extern "C" fn on_usr1(_: libc::c_int) {
    CHECK.store(true, Ordering::Relaxed);
}

extern "C" fn on_usr2(_: libc::c_int) {
    RATE.store(true, Ordering::Relaxed);
}

fn install(signal: libc::c_int, handler: extern "C" fn(libc::c_int)) -> Result<(), String> {
    // SAFETY: a zeroed sigaction is valid (empty mask, no flags); the
    // handler only stores to an atomic, which is async-signal-safe.
    let rc = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as libc::sighandler_t;
        action.sa_flags = libc::SA_RESTART;
        libc::sigaction(signal, &action, ptr::null_mut())
    };
    if rc != 0 {
        return Err(format!("sigaction: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// One line on stdout; a console that went away is no reason to stop.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn run(mib: usize) -> Result<(), String> {
    let pages = mib * 256;
    let len = (pages + 1) * PAGE;
    // SAFETY: a fresh private anonymous mapping; no pointer is passed in.
    let base = unsafe {
        libc::mmap(
            ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(format!("mmap {len} bytes: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: the mapping is len bytes, page-aligned, zero-filled, never
    // unmapped, and used only through `stamps`.
    let stamps = unsafe { Stamps::new(base.cast(), pages) };
    // Handlers before the RUNNING line: a signal sent on seeing it must
    // not kill the program.
    install(libc::SIGUSR1, on_usr1)?;
    install(libc::SIGUSR2, on_usr2)?;
    say(&format!("STAMP RUNNING pid={} mib={mib}", std::process::id()));

    let mut since = Instant::now();
    let mut written = 0u64;
    let mut verified = 0u64;
    let mut bad = 0u64;
    let mut first_bad = String::new();
    let mut gen = 1u32;
    loop {
        for page in 0..pages {
            if CHECK.swap(false, Ordering::Relaxed) {
                let line = match stamps.check((gen, page)) {
                    _ if bad > 0 => format!("STAMP BAD overwritten={bad} (first: {first_bad})"),
                    Verdict::Ok { gen, pos, pages } => format!("STAMP OK gen={gen} pos={pos} pages={pages} verified={verified}"),
                    verdict => verdict.to_string(),
                };
                say(&line);
            }
            // What is about to be overwritten must be the previous
            // generation's stamp.
            if let Some(held) = stamps.mismatch(gen - 1, page) {
                bad += 1;
                if bad == 1 {
                    first_bad = format!(
                        "page={page} holds gen={} page_no={}, expected gen={}",
                        held >> 32,
                        held & 0xffff_ffff,
                        gen - 1
                    );
                    say(&format!("STAMP BAD before overwrite: {first_bad}"));
                }
            } else {
                verified += 1;
            }
            if RATE.swap(false, Ordering::Relaxed) {
                let secs = since.elapsed().as_secs_f64();
                let mib_written = (written * PAGE as u64) as f64 / (1 << 20) as f64;
                say(&format!("STAMP RATE mib_per_s={:.1}", mib_written / secs.max(1e-9)));
                since = Instant::now();
                written = 0;
            }
            stamps.write_page(gen, page);
            written += 1;
        }
        gen = gen.checked_add(1).ok_or("ran out of generations")?;
    }
}

fn main() -> ExitCode {
    match parse(std::env::args().skip(1)) {
        Ok(Some(mib)) => match run(mib) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("stasis-stamp: {e}");
                ExitCode::from(1)
            }
        },
        Ok(None) => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("stasis-stamp: {e}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGES: usize = 8;

    /// A buffer of PAGES data pages, with the writer having written
    /// `done` pages in total from the start; returns the buffer (keep it
    /// alive), the stamps over it and where the writer is.
    fn written(done: usize) -> (Vec<u64>, Stamps, (u32, usize)) {
        let mut mem = vec![0u64; (PAGES + 1) * WORDS];
        // SAFETY: mem is (PAGES + 1) * WORDS long and outlives the stamps
        // in every test (returned together, dropped together).
        let stamps = unsafe { Stamps::new(mem.as_mut_ptr(), PAGES) };
        let (mut gen, mut page) = (1u32, 0usize);
        for _ in 0..done {
            stamps.write_page(gen, page);
            page += 1;
            if page == PAGES {
                gen += 1;
                page = 0;
            }
        }
        (mem, stamps, (gen, page))
    }

    fn set_page(stamps: &Stamps, page: usize, words: std::ops::Range<usize>, value: u64) {
        for w in words {
            stamps.store((page + 1) * WORDS + w, value);
        }
    }

    #[test]
    fn a_fresh_buffer_checks_ok_with_untouched_pages_as_generation_zero() {
        let (_mem, stamps, writer) = written(0);
        assert_eq!(stamps.check(writer), Verdict::Ok { gen: 1, pos: 0, pages: PAGES });
        let (_mem, stamps, writer) = written(3);
        assert_eq!(stamps.check(writer), Verdict::Ok { gen: 1, pos: 3, pages: PAGES });
    }

    #[test]
    fn a_buffer_written_in_order_checks_ok_in_any_generation() {
        for done in [PAGES, PAGES + 1, 2 * PAGES + 5, 3 * PAGES] {
            let (_mem, stamps, writer) = written(done);
            let verdict = stamps.check(writer);
            assert!(matches!(verdict, Verdict::Ok { .. }), "after {done} pages: {verdict}");
        }
        let (_mem, stamps, writer) = written(2 * PAGES + 5);
        assert_eq!(stamps.check(writer).to_string(), "STAMP OK gen=3 pos=5 pages=8");
    }

    #[test]
    fn a_page_from_a_newer_generation_is_caught() {
        // Position (3, 5): page 6 must hold generation 2; it holds 3, as if
        // saved after the writer passed it.
        let (_mem, stamps, writer) = written(2 * PAGES + 5);
        set_page(&stamps, 6, 0..WORDS, stamp(3, 6));
        assert_eq!(
            stamps.check(writer).to_string(),
            "STAMP BAD page=6 holds gen=3 page_no=6, expected gen=2 (position gen=3 pos=5)"
        );
    }

    #[test]
    fn a_page_from_an_older_generation_is_caught() {
        let (_mem, stamps, writer) = written(2 * PAGES + 5);
        set_page(&stamps, 1, 0..WORDS, stamp(2, 1));
        assert_eq!(
            stamps.check(writer),
            Verdict::BadPage { page: 1, holds_gen: 2, holds_page_no: 1, expected_gen: 3, gen: 3, pos: 5 }
        );
    }

    #[test]
    fn a_torn_page_is_caught_on_either_side_of_the_position() {
        // Before the position: first half new, second half still old.
        let (_mem, stamps, writer) = written(2 * PAGES + 5);
        set_page(&stamps, 2, WORDS / 2..WORDS, stamp(2, 2));
        assert!(matches!(
            stamps.check(writer),
            Verdict::BadPage { page: 2, holds_gen: 2, holds_page_no: 2, expected_gen: 3, .. }
        ));
        // After the position: one new word in an old page.
        let (_mem, stamps, writer) = written(2 * PAGES + 5);
        set_page(&stamps, 7, 0..1, stamp(3, 7));
        assert!(matches!(stamps.check(writer), Verdict::BadPage { page: 7, holds_gen: 3, expected_gen: 2, .. }));
    }

    #[test]
    fn a_page_written_in_the_first_generation_past_the_position_is_caught() {
        let (_mem, stamps, writer) = written(3);
        set_page(&stamps, 4, 0..WORDS, stamp(1, 4));
        assert!(matches!(stamps.check(writer), Verdict::BadPage { page: 4, holds_gen: 1, expected_gen: 0, .. }));
    }

    #[test]
    fn a_page_holding_another_page_s_stamp_is_caught() {
        let (_mem, stamps, writer) = written(PAGES + 2);
        set_page(&stamps, 5, 0..WORDS, stamp(1, 4));
        assert_eq!(
            stamps.check(writer),
            Verdict::BadPage { page: 5, holds_gen: 1, holds_page_no: 4, expected_gen: 1, gen: 2, pos: 2 }
        );
    }

    #[test]
    fn a_position_other_than_the_writer_s_is_caught() {
        // Memory saved at another instant than the registers: the header
        // says (1, 3) but the writer's loop is at (1, 4).
        let (_mem, stamps, _) = written(3);
        assert_eq!(
            stamps.check((1, 4)).to_string(),
            "STAMP BAD position gen=1 pos=3, but the writer is at gen=1 pos=4"
        );
        // The end of one generation is the start of the next.
        let (_mem, stamps, _) = written(PAGES);
        assert_eq!(stamps.check((2, 0)), Verdict::Ok { gen: 1, pos: PAGES, pages: PAGES });
    }

    #[test]
    fn the_page_about_to_be_overwritten_must_hold_the_previous_generation() {
        let (_words, stamps, _) = written(8 + 3);
        // Generation 2 is at page 3: pages 3.. still hold generation 1.
        assert_eq!(stamps.mismatch(1, 3), None);
        assert_eq!(stamps.mismatch(2, 2), None);
        set_page(&stamps, 5, 100..101, stamp(2, 5));
        assert_eq!(stamps.mismatch(1, 5), Some(stamp(2, 5)), "a page saved later than the rest");
        assert_eq!(stamps.mismatch(0, 0).map(|v| v >> 32), Some(2), "untouched pages must be zero");
    }

    #[test]
    fn a_damaged_header_is_caught() {
        let (_mem, stamps, writer) = written(3);
        stamps.store(POSITION_WORD, position(0, 0));
        assert!(matches!(stamps.check(writer), Verdict::BadHeader(_)));
        let (_mem, stamps, writer) = written(3);
        stamps.store(MAGIC_WORD, 0);
        assert!(stamps.check(writer).to_string().starts_with("STAMP BAD header: magic"));
    }

    #[test]
    fn mib_defaults_to_128_and_is_bounded() {
        let args = |line: &str| line.split_whitespace().map(str::to_string).collect::<Vec<_>>().into_iter();
        assert_eq!(parse(args("")), Ok(Some(128)));
        assert_eq!(parse(args("--mib 4")), Ok(Some(4)));
        assert_eq!(parse(args("--help")), Ok(None));
        assert!(parse(args("--mib 0")).is_err());
        assert!(parse(args("--mib")).is_err());
        assert!(parse(args("--bogus")).is_err());
    }
}
