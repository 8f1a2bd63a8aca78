//! Checkpoint benchmark: prints write throughput and file size, random
//! block read latency (cold and warm page cache) and sequential read
//! throughput, on memory images it generates itself, all on one disk.
//!
//! ```text
//! cargo bench -p stasis --bench checkpoint                 # 1 GiB images
//! cargo bench -p stasis --bench checkpoint -- --quick      # 256 MiB images
//! cargo bench -p stasis --bench checkpoint -- --dir /data  # files go there
//! cargo bench -p stasis --bench checkpoint -- --images a --levels -1,1,3
//! ```
//!
//! Images: (a) realistic: about 300/1024 of the size in real files from
//! /usr (binaries, libraries, text) and 64/1024 in random bytes, each piece
//! page-aligned at a scattered offset, the rest zero; (b) all zero;
//! (c) incompressible random.
//!
//! Cold reads drop the file's pages from the page cache with
//! `posix_fadvise(POSIX_FADV_DONTNEED)` before every read (no root needed;
//! the file was fsynced so every page is clean and can be dropped).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use stasis::checkpoint::writer::{
    DEFAULT_LEVEL, DEFAULT_MEMORY_BLOCK_SIZE, DEFAULT_STORAGE_BLOCK_SIZE,
};
use stasis::checkpoint::{
    write_checkpoint, BlockChecksum, BlockKind, ImageSource, Reader, ReaderOptions, WriterOptions,
};

const MIB: usize = 1 << 20;
const BLOCK_SIZES: [u32; 5] = [4 << 10, 64 << 10, 256 << 10, 1 << 20, 2 << 20];
const EXTRA_STORAGE_SIZES: [u32; 3] = [256 << 10, 4 << 20, 8 << 20];

struct Args {
    size: usize,
    images: String,
    levels: Vec<i32>,
    dir: PathBuf,
    cold_reads: usize,
    warm_reads: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut size = 1024 * MIB;
    let mut dir = std::env::temp_dir();
    let mut cold_reads = 100;
    let mut warm_reads = 2000;
    let mut images = "abc".to_string();
    let mut levels = vec![DEFAULT_LEVEL, 3];
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            // `cargo bench` passes --bench to harness = false targets.
            "--bench" => {}
            "--quick" => {
                size = 256 * MIB;
                cold_reads = 50;
                warm_reads = 1000;
            }
            "--size-mib" => {
                let v = args.next().ok_or("--size-mib needs a value")?;
                size = v
                    .parse::<usize>()
                    .map_err(|e| format!("--size-mib {v}: {e}"))?
                    * MIB;
                if size < 64 * MIB {
                    return Err("--size-mib must be at least 64".into());
                }
            }
            "--images" => {
                images = args.next().ok_or("--images needs a value, e.g. ac")?;
                if images.is_empty() || !images.chars().all(|c| "abc".contains(c)) {
                    return Err(format!("--images {images:?}: use letters from abc"));
                }
            }
            "--levels" => {
                let v = args.next().ok_or("--levels needs a value, e.g. 1,3")?;
                levels = v
                    .split(',')
                    .map(|l| l.parse::<i32>().map_err(|e| format!("--levels {v}: {e}")))
                    .collect::<Result<_, _>>()?;
            }
            "--dir" => dir = PathBuf::from(args.next().ok_or("--dir needs a value")?),
            other => {
                return Err(format!(
                    "unknown argument {other:?} (use --quick, --size-mib N, --images abc, --levels 1,3, --dir DIR)"
                ))
            }
        }
    }
    Ok(Args {
        size,
        images,
        levels,
        dir,
        cold_reads,
        warm_reads,
    })
}

/// SplitMix64: a small seeded generator, so images are the same each run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next().to_le_bytes());
        }
        let last = self.next().to_le_bytes();
        let rem = chunks.into_remainder();
        let n = rem.len();
        rem.copy_from_slice(&last[..n]);
    }
}

fn shuffle<T>(rng: &mut Rng, v: &mut [T]) {
    for i in (1..v.len()).rev() {
        v.swap(i, rng.below(i + 1));
    }
}

/// Regular files under `dir`, recursively, without following links.
fn walk(dir: &Path, out: &mut Vec<(PathBuf, u64)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let Ok(ft) = entry.file_type() else { continue };
        if ft.is_dir() {
            walk(&entry.path(), out);
        } else if ft.is_file() {
            if let Ok(meta) = entry.metadata() {
                if meta.len() > 0 && meta.len() <= 32 * MIB as u64 {
                    out.push((entry.path(), meta.len()));
                }
            }
        }
    }
}

const PAGE: usize = 4096;

fn page_up(n: usize) -> usize {
    n.div_ceil(PAGE) * PAGE
}

/// Image (a): real files and random bytes at scattered page-aligned
/// offsets, the rest zero. Returns the image and a description.
fn realistic_image(size: usize) -> (Vec<u8>, String) {
    let mut rng = Rng(0x5157_4515);
    let files_target = size / 1024 * 300;
    let random_total = size / 1024 * 64;
    let mut files = Vec::new();
    for dir in [
        "/usr/bin",
        "/usr/sbin",
        "/usr/lib",
        "/usr/libexec",
        "/usr/share",
        "/usr/include",
    ] {
        walk(Path::new(dir), &mut files);
    }
    files.sort();
    shuffle(&mut rng, &mut files);
    let mut chosen = Vec::new();
    let mut total = 0usize;
    for (path, len) in files {
        if total >= files_target {
            break;
        }
        let len = (len as usize).min(files_target - total);
        chosen.push((Some(path), len));
        total += len;
    }
    let file_count = chosen.len();
    // The random bytes come in 256 KiB pieces, scattered like the files.
    let piece = 256 << 10;
    for _ in 0..random_total / piece {
        chosen.push((None, piece));
    }
    shuffle(&mut rng, &mut chosen);
    let used: usize = chosen.iter().map(|(_, len)| page_up(*len)).sum();
    let mut zero_left = size - used;
    let mut image = vec![0u8; size];
    let mut at = 0usize;
    let mut file_bytes = 0usize;
    let mut pieces_left = chosen.len();
    for (path, len) in chosen {
        // Gaps average the remaining zero space over the remaining pieces.
        let max_gap_pages = 2 * zero_left / PAGE / pieces_left;
        let gap = rng.below(max_gap_pages + 1) * PAGE;
        let gap = gap.min(zero_left);
        zero_left -= gap;
        at += gap;
        pieces_left -= 1;
        let dst = &mut image[at..at + len];
        match path {
            Some(path) => {
                let read = File::open(&path).and_then(|mut f| f.read(dst).map(|n| (f, n)));
                // An unreadable file leaves its place zero.
                if let Ok((mut f, mut n)) = read {
                    while n < len {
                        match f.read(&mut dst[n..]) {
                            Ok(0) | Err(_) => break,
                            Ok(m) => n += m,
                        }
                    }
                    file_bytes += n;
                }
            }
            None => rng.fill(dst),
        }
        at += page_up(len);
    }
    let desc = format!(
        "{} MiB: {:.1} MiB from {} files under /usr, {} MiB random, rest zero",
        size / MIB,
        file_bytes as f64 / MIB as f64,
        file_count,
        random_total / MIB
    );
    (image, desc)
}

fn random_image(size: usize) -> Vec<u8> {
    let mut image = vec![0u8; size];
    Rng(0x00c0_ffee).fill(&mut image);
    image
}

/// Drops `path`'s pages from the page cache.
fn drop_cache(path: &Path) {
    let Ok(file) = File::open(path) else { return };
    // SAFETY: posix_fadvise only reads its integer arguments; the
    // descriptor is open for the duration of the call.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        eprintln!("warning: posix_fadvise failed ({rc}); cold reads may be warm");
    }
}

/// Reads `path` once so its pages are in the page cache.
fn warm_cache(path: &Path) {
    if let Ok(mut f) = File::open(path) {
        let mut buf = vec![0u8; 8 * MIB];
        while matches!(f.read(&mut buf), Ok(n) if n > 0) {}
    }
}

fn gib_per_s(bytes: usize, time: Duration) -> f64 {
    bytes as f64 / (1u64 << 30) as f64 / time.as_secs_f64()
}

fn human_size(n: u32) -> String {
    if n >= 1 << 20 {
        format!("{}M", n >> 20)
    } else {
        format!("{}K", n >> 10)
    }
}

/// p50 and p99 of `samples`, in microseconds.
fn percentiles(mut samples: Vec<Duration>) -> (f64, f64) {
    if samples.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 - 1.0) * q).round() as usize;
        samples[i].as_secs_f64() * 1e6
    };
    (at(0.50), at(0.99))
}

/// CPU time (user + system) this process has used so far.
fn cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes one rusage into the pointer, which points at
    // enough zeroed memory for it.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        return Duration::ZERO;
    }
    // SAFETY: getrusage succeeded, so it filled the struct (and zeroed
    // memory is a valid rusage anyway).
    let usage = unsafe { usage.assume_init() };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// A latency for the table; "-" when there were no samples.
fn us(v: f64) -> String {
    if v.is_nan() {
        "-".to_string()
    } else {
        format!("{v:.1}")
    }
}

/// The raw dump: the whole memory written and fsynced.
fn raw_dump(path: &Path, image: &[u8]) -> Duration {
    let start = Instant::now();
    let mut f = File::create(path).expect("create raw dump");
    for chunk in image.chunks(8 * MIB) {
        f.write_all(chunk).expect("write raw dump");
    }
    f.sync_all().expect("sync raw dump");
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .expect("sync dir");
    }
    start.elapsed()
}

struct ReadFigures {
    cold_storage: (f64, f64),
    cold_block: (f64, f64),
    cold_direct: (f64, f64),
    warm_storage: (f64, f64),
    warm_block: (f64, f64),
    hit: (f64, f64),
    seq_warm: f64,
    seq_cold: f64,
    par_warm: f64,
}

fn time_read(reader: &Reader, block: usize, buf: &mut [u8]) -> Duration {
    let start = Instant::now();
    let data = reader.read_block(block, buf).expect("read block");
    let t = start.elapsed();
    std::hint::black_box(data);
    t
}

fn time_sequential(reader: &Reader) -> f64 {
    let start = Instant::now();
    let mut seq = reader.sequential();
    let mut bytes = 0usize;
    while let Some(block) = seq.next_block() {
        let (info, data) = block.expect("sequential read");
        std::hint::black_box(data);
        bytes += info.len;
    }
    gib_per_s(bytes, start.elapsed())
}

fn measure_reads(path: &Path, cold_n: usize, warm_n: usize) -> ReadFigures {
    let cached = Reader::open(path).expect("open");
    let direct = Reader::open_with(
        path,
        ReaderOptions {
            cached_storage_blocks: 0,
            ..ReaderOptions::default()
        },
    )
    .expect("open");
    let odirect = Reader::open_with(
        path,
        ReaderOptions {
            cached_storage_blocks: 0,
            direct_io: true,
        },
    )
    .expect("open with O_DIRECT");
    let mut rng = Rng(0x7ead);
    let stored: Vec<usize> = (0..cached.block_count())
        .filter(|&i| {
            cached
                .block_info(i)
                .is_some_and(|b| b.kind != BlockKind::Zero)
        })
        .collect();
    let candidates: Vec<usize> = if stored.is_empty() {
        (0..cached.block_count()).collect()
    } else {
        stored
    };
    let pick = |rng: &mut Rng| candidates[rng.below(candidates.len())];
    let mut buf = vec![0u8; cached.header().memory_block_size as usize];

    let (mut cold_storage, mut cold_block, mut cold_direct) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..cold_n {
        let b = pick(&mut rng);
        drop_cache(path);
        cached.clear_cache();
        cold_storage.push(time_read(&cached, b, &mut buf));
        drop_cache(path);
        cold_block.push(time_read(&direct, b, &mut buf));
        cold_direct.push(time_read(&odirect, b, &mut buf));
    }

    warm_cache(path);
    cached.clear_cache();
    let (mut warm_storage, mut warm_block, mut hit) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..warm_n {
        let b = pick(&mut rng);
        warm_block.push(time_read(&direct, b, &mut buf));
        cached.clear_cache();
        warm_storage.push(time_read(&cached, b, &mut buf));
        // A neighbour in the same storage block is now a cache hit.
        let info = cached.block_info(b).expect("exists");
        let next = b + 1;
        if let Some(n) = cached.block_info(next) {
            if n.kind == BlockKind::Zero || n.storage_block == info.storage_block {
                hit.push(time_read(&cached, next, &mut buf));
            }
        }
    }
    let seq_warm = time_sequential(&direct);
    let start = Instant::now();
    let total = cached.header().memory_bytes as usize;
    direct
        .read_all_parallel(0, &|_, data| {
            std::hint::black_box(data);
            Ok(())
        })
        .expect("parallel read");
    let par_warm = gib_per_s(total, start.elapsed());
    drop_cache(path);
    let seq_cold = time_sequential(&direct);
    ReadFigures {
        cold_storage: percentiles(cold_storage),
        cold_block: percentiles(cold_block),
        cold_direct: percentiles(cold_direct),
        warm_storage: percentiles(warm_storage),
        warm_block: percentiles(warm_block),
        hit: percentiles(hit),
        seq_warm,
        seq_cold,
        par_warm,
    }
}

struct Config {
    block: u32,
    level: i32,
    storage: u32,
}

fn configs(levels: &[i32]) -> Vec<Config> {
    let mut v = Vec::new();
    for &block in &BLOCK_SIZES {
        for &level in levels {
            v.push(Config {
                block,
                level,
                storage: DEFAULT_STORAGE_BLOCK_SIZE.max(block),
            });
        }
    }
    v
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("stasis-bench: {e}");
            std::process::exit(2);
        }
    };
    let work = args
        .dir
        .join(format!("stasis-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work).expect("create work dir");
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let run_start = Instant::now();

    println!("stasis checkpoint benchmark");
    println!(
        "cores {cores}, work dir {} (one disk for every file)",
        work.display()
    );
    println!("write: GiB of guest memory per second, fsync of file and directory included;");
    println!(
        "       cpu_s = CPU time of all threads (steadier than wall time on a shared machine)"
    );
    println!("read: one memory block; sb = reader with storage-block cache (reads the whole storage block on a miss),");
    println!("      blk = reader without cache (reads only the block); hit = neighbour in a cached storage block");
    println!("      dio = reader without cache using O_DIRECT (no page cache at all)");
    println!("      cold = page cache dropped before each read; \"-\" = no sample (no neighbour in the same storage block)");
    println!();

    let mut write_rows = Vec::new();
    let mut read_rows = Vec::new();
    let mut targets = Vec::new();

    for image_name in ["a", "b", "c"] {
        if !args.images.contains(image_name) {
            continue;
        }
        let gen_start = Instant::now();
        let (image, desc) = match image_name {
            "a" => realistic_image(args.size),
            "b" => (
                vec![0u8; args.size],
                format!("{} MiB, all zero", args.size / MIB),
            ),
            _ => (
                random_image(args.size),
                format!("{} MiB, random", args.size / MIB),
            ),
        };
        println!(
            "image {image_name}: {desc} (generated in {:.1} s)",
            gen_start.elapsed().as_secs_f64()
        );

        let raw_path = work.join("raw.img");
        let cpu_before = cpu_time();
        let raw_time = raw_dump(&raw_path, &image);
        let raw_cpu = cpu_time().saturating_sub(cpu_before);
        std::fs::remove_file(&raw_path).expect("remove raw dump");
        let raw_speed = gib_per_s(image.len(), raw_time);
        write_rows.push(format!(
            "{image_name:<5} {:<9} {:>5} {:>5} {:>7} {:>7.3} {:>7.3} {:>6.2} {:>9.1} {:>8.3} {:>7} {:>7} {:>7}",
            "raw-dump", "-", "-", "-", raw_speed, raw_time.as_secs_f64(), raw_cpu.as_secs_f64(),
            image.len() as f64 / MIB as f64, 1.0, "-", "-", "-"
        ));

        let mut all = configs(&args.levels);
        if image_name == "a" {
            for &storage in &EXTRA_STORAGE_SIZES {
                all.push(Config {
                    block: 64 << 10,
                    level: 1,
                    storage,
                });
            }
        }
        for cfg in all {
            let path = work.join("ckpt");
            let options = WriterOptions {
                memory_block_size: cfg.block,
                storage_block_size: cfg.storage,
                level: cfg.level,
                threads: 0,
                parent_index_crc: None,
                // What snapshots write (vmm.rs); backups keep CRC-32C.
                checksum: BlockChecksum::Xxh64,
            };
            let cpu_before = cpu_time();
            let stats =
                write_checkpoint(&path, &ImageSource::flat(&image), &options, &mut |_, _| {})
                    .expect("write checkpoint");
            let cpu = cpu_time().saturating_sub(cpu_before);
            let speed = gib_per_s(image.len(), stats.elapsed);
            let ratio = stats.file_bytes as f64 / image.len() as f64;
            write_rows.push(format!(
                "{image_name:<5} {:<9} {:>5} {:>5} {:>7} {:>7.3} {:>7.3} {:>6.2} {:>9.1} {:>8.3} {:>7} {:>7} {:>7}",
                "stasis", human_size(cfg.block), cfg.level, human_size(cfg.storage), speed,
                stats.elapsed.as_secs_f64(), cpu.as_secs_f64(), stats.file_bytes as f64 / MIB as f64, ratio,
                stats.zero_blocks, stats.raw_blocks, stats.zstd_blocks
            ));
            let r = measure_reads(&path, args.cold_reads, args.warm_reads);
            read_rows.push(format!(
                "{image_name:<5} {:>5} {:>5} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8.2} {:>8.2} {:>8.2}",
                human_size(cfg.block), cfg.level, human_size(cfg.storage),
                us(r.cold_storage.0), us(r.cold_storage.1), us(r.cold_block.0), us(r.cold_block.1),
                us(r.cold_direct.0), us(r.cold_direct.1),
                us(r.warm_storage.0), us(r.warm_storage.1), us(r.warm_block.0), us(r.warm_block.1),
                us(r.hit.0), us(r.hit.1), r.seq_warm, r.seq_cold, r.par_warm
            ));
            let is_default = cfg.block == DEFAULT_MEMORY_BLOCK_SIZE
                && cfg.level == DEFAULT_LEVEL
                && cfg.storage == DEFAULT_STORAGE_BLOCK_SIZE;
            if image_name == "a" && is_default {
                targets.push(format!(
                    "write speed vs raw dump      {:>6.2}x   (target >= 3x)",
                    speed / raw_speed
                ));
                targets.push(format!(
                    "file size / raw size         {:>6.1}%   (target <= 35%)",
                    100.0 * ratio
                ));
                targets.push(format!(
                    "64K block read p50, warm     {:>6.1} us (blk) / {:.1} us (sb) / {:.1} us (hit)   (target < 50 us)",
                    r.warm_block.0, r.warm_storage.0, r.hit.0
                ));
            }
            std::fs::remove_file(&path).expect("remove checkpoint");
        }
        drop(image);
    }
    std::fs::remove_dir(&work).expect("remove work dir");

    println!();
    println!("== write ==");
    println!(
        "{:<5} {:<9} {:>5} {:>5} {:>7} {:>7} {:>7} {:>6} {:>9} {:>8} {:>7} {:>7} {:>7}",
        "image",
        "method",
        "block",
        "level",
        "storage",
        "GiB/s",
        "time_s",
        "cpu_s",
        "file_MiB",
        "file/raw",
        "zero",
        "raw",
        "zstd"
    );
    for row in &write_rows {
        println!("{row}");
    }
    println!();
    println!("== read (latency in us; seq and par in GiB/s of guest memory; par = read_all_parallel on all cores) ==");
    println!(
        "{:<5} {:>5} {:>5} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "image", "block", "level", "storage",
        "cold_sb", "p99", "cold_blk", "p99", "cold_dio", "p99", "warm_sb", "p99", "warm_blk", "p99", "hit", "p99",
        "seq_warm", "seq_cold", "par_warm"
    );
    for row in &read_rows {
        println!("{row}");
    }
    println!();
    println!(
        "== targets (image a, defaults: {} blocks, level {}, {} storage blocks) ==",
        human_size(DEFAULT_MEMORY_BLOCK_SIZE),
        DEFAULT_LEVEL,
        human_size(DEFAULT_STORAGE_BLOCK_SIZE)
    );
    for row in &targets {
        println!("{row}");
    }
    println!();
    println!(
        "total benchmark time {:.0} s",
        run_start.elapsed().as_secs_f64()
    );
}
