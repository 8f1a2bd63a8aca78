//! `stasis checkpoint …` subcommands: inspect, verify, pack, unpack.
//!
//! This module is the command line's presentation layer: it writes reports
//! to stdout and a progress line to stderr (only when stderr is a
//! terminal). Errors go back to `main`, which prints the chain once.

use std::fs::OpenOptions;
use std::io::{IsTerminal, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use clap::Subcommand;

use super::format::{BlockKind, MAX_STORAGE_BLOCK};
use super::reader::{ReadError, Reader, Summary};
use super::source::{FileSource, SourceError};
use super::writer::{
    write_checkpoint, WriteError, WriteStats, WriterOptions, DEFAULT_LEVEL,
    DEFAULT_MEMORY_BLOCK_SIZE, DEFAULT_STORAGE_BLOCK_SIZE,
};

/// Work on checkpoint files.
#[derive(Debug, Subcommand)]
pub enum CheckpointCommand {
    /// Show what a checkpoint file holds: version, regions, block sizes,
    /// blocks by kind, stored bytes, compression ratio.
    Inspect {
        /// The checkpoint file.
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check every block's checksum; fail naming the first bad block.
    Verify {
        /// The checkpoint file.
        file: PathBuf,
    },
    /// Turn a raw memory image (one region at guest address 0) into a
    /// checkpoint.
    Pack {
        /// The raw memory image.
        raw: PathBuf,
        /// The checkpoint to write.
        #[arg(long)]
        out: PathBuf,
        /// Memory block size: a power of two from 4K to 2M (suffixes K,
        /// KiB, M, MiB, G, GiB; all binary).
        #[arg(long, value_parser = parse_size_u32, default_value_t = DEFAULT_MEMORY_BLOCK_SIZE)]
        block_size: u32,
        /// Storage (staging) block size: a multiple of 4K up to 64M; raised
        /// to the memory block size when smaller.
        #[arg(long, value_parser = parse_size_u32, default_value_t = DEFAULT_STORAGE_BLOCK_SIZE)]
        storage_block_size: u32,
        /// zstd compression level.
        #[arg(long, default_value_t = DEFAULT_LEVEL, allow_negative_numbers = true)]
        level: i32,
        /// Compression threads (0: one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// Write a checkpoint's memory back out as a raw image: each region at
    /// the file offset equal to its guest address, zero blocks as holes.
    Unpack {
        /// The checkpoint file.
        file: PathBuf,
        /// The raw image to write.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Errors of the checkpoint subcommands.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// `inspect` could not read the checkpoint.
    #[error("cannot inspect checkpoint")]
    Inspect(#[source] ReadError),
    /// `verify` found a problem.
    #[error("checkpoint verification failed")]
    Verify(#[source] ReadError),
    /// `pack` could not open the raw image.
    #[error("cannot pack")]
    OpenImage(#[source] SourceError),
    /// `pack` could not write the checkpoint.
    #[error("cannot pack")]
    Pack(#[source] WriteError),
    /// `unpack` could not read the checkpoint.
    #[error("cannot unpack")]
    Unpack(#[source] ReadError),
    /// `unpack` could not write the raw image.
    #[error("cannot unpack: cannot write {path}")]
    WriteImage {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `unpack` was asked to overwrite the checkpoint it reads.
    #[error("cannot unpack: {path} is the checkpoint being read")]
    CheckOutput { path: PathBuf },
    /// Encoding JSON failed.
    #[error("cannot encode the summary as JSON")]
    EncodeJson(#[source] serde_json::Error),
    /// Writing the report to stdout failed.
    #[error("cannot write to standard output")]
    WriteStdout(#[source] std::io::Error),
}

/// Parses a size such as `65536`, `4K`, `64KiB`, `2M` (binary suffixes).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, suffix) = text.split_at(split);
    if digits.is_empty() {
        return Err(format!("size {text:?} does not start with a number"));
    }
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("size {text:?} is too large"))?;
    let shift = match suffix.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        _ => {
            return Err(format!(
                "size {text:?} has an unknown suffix (use K, KiB, M, MiB, G or GiB)"
            ))
        }
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

/// Parses a size that must fit the format's 32-bit size fields.
fn parse_size_u32(text: &str) -> Result<u32, String> {
    let size = parse_size(text)?;
    u32::try_from(size)
        .ok()
        .filter(|&s| s <= MAX_STORAGE_BLOCK)
        .ok_or_else(|| format!("size {text:?} is larger than 64M"))
}

/// Formats a byte count for people: `512 B`, `64.0 KiB`, `1.00 GiB`.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{bytes} B"),
        _ if value >= 100.0 => format!("{value:.0} {}", UNITS[unit]),
        _ if value >= 10.0 => format!("{value:.1} {}", UNITS[unit]),
        _ => format!("{value:.2} {}", UNITS[unit]),
    }
}

/// Writes the text form of `inspect`.
fn write_summary(out: &mut dyn Write, path: &Path, s: &Summary) -> std::io::Result<()> {
    writeln!(out, "checkpoint   {}", path.display())?;
    writeln!(out, "version      {}", s.version)?;
    writeln!(
        out,
        "memory       {} in {} region{}",
        human(s.memory_bytes),
        s.regions.len(),
        if s.regions.len() == 1 { "" } else { "s" }
    )?;
    for (i, r) in s.regions.iter().enumerate() {
        writeln!(
            out,
            "  region {i}   {:#018x}..{:#018x} ({})",
            r.guest_addr,
            r.guest_addr + r.size,
            human(r.size)
        )?;
    }
    writeln!(
        out,
        "blocks       {} of {}: {} zero, {} raw, {} zstd",
        s.blocks,
        human(u64::from(s.memory_block_size)),
        s.zero_blocks,
        s.raw_blocks,
        s.zstd_blocks
    )?;
    writeln!(
        out,
        "storage      {} block{} of up to {}, {} stored",
        s.storage_blocks,
        if s.storage_blocks == 1 { "" } else { "s" },
        human(u64::from(s.storage_block_size)),
        human(s.stored_bytes)
    )?;
    writeln!(
        out,
        "file         {} ({:.1}% of memory, compression ratio {:.2})",
        human(s.file_bytes),
        100.0 * s.file_bytes as f64 / s.memory_bytes as f64,
        s.compression_ratio
    )
}

/// Shows `packing 45% (460 MiB of 1.00 GiB)` on stderr when it is a
/// terminal, at most once per percent.
struct Progress {
    enabled: bool,
    last_percent: Option<u64>,
}

impl Progress {
    fn new() -> Self {
        Progress {
            enabled: std::io::stderr().is_terminal(),
            last_percent: None,
        }
    }

    fn update(&mut self, done: u64, total: u64) {
        if !self.enabled || total == 0 {
            return;
        }
        let percent = done * 100 / total;
        if self.last_percent == Some(percent) {
            return;
        }
        self.last_percent = Some(percent);
        let mut err = std::io::stderr().lock();
        // A progress line that fails to print is not worth failing for.
        let _ = write!(
            err,
            "\rpacking {percent:3}% ({} of {})",
            human(done),
            human(total)
        );
        if done == total {
            let _ = writeln!(err);
        }
    }
}

fn pack_report(out: &mut dyn Write, path: &Path, stats: &WriteStats) -> std::io::Result<()> {
    writeln!(
        out,
        "packed {} into {} ({}, {:.1}% of memory) in {:.2} s: {} zero, {} raw, {} zstd blocks",
        human(stats.bytes_in),
        path.display(),
        human(stats.file_bytes),
        100.0 * stats.file_bytes as f64 / stats.bytes_in as f64,
        stats.elapsed.as_secs_f64(),
        stats.zero_blocks,
        stats.raw_blocks,
        stats.zstd_blocks
    )
}

/// Writes every region of `reader` into `out_path` at its guest address.
fn unpack(reader: &Reader, out_path: &Path) -> Result<u64, CliError> {
    let write_err = |source| CliError::WriteImage {
        path: out_path.to_path_buf(),
        source,
    };
    // Truncating the checkpoint being read would destroy it.
    if let Ok(out_meta) = std::fs::metadata(out_path) {
        if let Ok(in_meta) = std::fs::metadata(reader.path()) {
            if (out_meta.dev(), out_meta.ino()) == (in_meta.dev(), in_meta.ino()) {
                return Err(CliError::CheckOutput {
                    path: out_path.to_path_buf(),
                });
            }
        }
    }
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(out_path)
        .map_err(write_err)?;
    let end = reader
        .header()
        .regions
        .iter()
        .map(|r| r.guest_addr + r.size)
        .max()
        .unwrap_or(0);
    // Zero blocks are left as holes: they read back as zeros.
    file.set_len(end).map_err(write_err)?;
    let mut seq = reader.sequential();
    while let Some(block) = seq.next_block() {
        let (info, data) = block.map_err(CliError::Unpack)?;
        if info.kind != BlockKind::Zero {
            file.write_all_at(data, info.guest_addr)
                .map_err(write_err)?;
        }
    }
    file.sync_all().map_err(write_err)?;
    Ok(end)
}

/// Runs one checkpoint subcommand, reporting to stdout.
pub fn run(cmd: CheckpointCommand) -> Result<(), CliError> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    run_to(cmd, &mut out)
}

/// Runs one checkpoint subcommand, reporting to `out`.
pub fn run_to(cmd: CheckpointCommand, out: &mut dyn Write) -> Result<(), CliError> {
    match cmd {
        CheckpointCommand::Inspect { file, json } => {
            let reader = Reader::open(&file).map_err(CliError::Inspect)?;
            let summary = reader.summary();
            if json {
                serde_json::to_writer_pretty(&mut *out, &summary).map_err(CliError::EncodeJson)?;
                writeln!(out).map_err(CliError::WriteStdout)
            } else {
                write_summary(out, &file, &summary).map_err(CliError::WriteStdout)
            }
        }
        CheckpointCommand::Verify { file } => {
            let reader = Reader::open(&file).map_err(CliError::Verify)?;
            let blocks = reader.verify().map_err(CliError::Verify)?;
            writeln!(
                out,
                "ok: {}: {blocks} blocks, every checksum matches",
                file.display()
            )
            .map_err(CliError::WriteStdout)
        }
        CheckpointCommand::Pack {
            raw,
            out: out_path,
            block_size,
            storage_block_size,
            level,
            threads,
        } => {
            let source = FileSource::open(&raw).map_err(CliError::OpenImage)?;
            let options = WriterOptions {
                memory_block_size: block_size,
                storage_block_size: storage_block_size.max(block_size),
                level,
                threads,
            };
            let mut progress = Progress::new();
            let stats = write_checkpoint(&out_path, &source, &options, &mut |done, total| {
                progress.update(done, total)
            })
            .map_err(CliError::Pack)?;
            pack_report(out, &out_path, &stats).map_err(CliError::WriteStdout)
        }
        CheckpointCommand::Unpack {
            file,
            out: out_path,
        } => {
            let reader = Reader::open(&file).map_err(CliError::Unpack)?;
            let bytes = unpack(&reader, &out_path)?;
            writeln!(out, "unpacked {} into {}", human(bytes), out_path.display())
                .map_err(CliError::WriteStdout)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_size_accepts_plain_and_binary_suffixes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("2M"), Ok(2 << 20));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
    }

    #[test]
    fn parse_size_rejects_garbage_and_overflow() {
        assert!(parse_size("").is_err());
        assert!(parse_size("K").is_err());
        assert!(parse_size("4X").is_err());
        assert!(parse_size("4KB").is_err());
        assert!(parse_size("-4K").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("17179869184G").is_err());
        assert!(parse_size_u32("128M").is_err());
    }

    #[test]
    fn unpack_refuses_to_overwrite_its_own_input() {
        let dir = tempfile::tempdir().expect("temp dir");
        let raw = dir.path().join("raw");
        std::fs::write(&raw, [5u8; 8192]).expect("write raw");
        let ckpt = dir.path().join("ckpt");
        let pack = CheckpointCommand::Pack {
            raw,
            out: ckpt.clone(),
            block_size: 4096,
            storage_block_size: 4096,
            level: 1,
            threads: 1,
        };
        run_to(pack, &mut Vec::new()).expect("packs");
        let before = std::fs::read(&ckpt).expect("read");
        let unpack = CheckpointCommand::Unpack {
            file: ckpt.clone(),
            out: ckpt.clone(),
        };
        let err = run_to(unpack, &mut Vec::new()).expect_err("same file");
        assert!(matches!(err, CliError::CheckOutput { .. }), "{err:?}");
        assert_eq!(std::fs::read(&ckpt).expect("read"), before);
    }

    #[test]
    fn human_picks_a_readable_unit() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(64 << 10), "64.0 KiB");
        assert_eq!(human(1 << 30), "1.00 GiB");
        assert_eq!(human(300 << 20), "300 MiB");
    }

    #[test]
    fn inspect_text_names_version_regions_and_kinds() {
        let dir = tempfile::tempdir().expect("temp dir");
        let raw = dir.path().join("raw");
        let mut image = vec![0u8; 256 << 10];
        image[..64 << 10].fill(9);
        std::fs::write(&raw, &image).expect("write raw");
        let ckpt = dir.path().join("ckpt");
        let pack = CheckpointCommand::Pack {
            raw,
            out: ckpt.clone(),
            block_size: 64 << 10,
            storage_block_size: 1 << 20,
            level: 1,
            threads: 1,
        };
        run_to(pack, &mut Vec::new()).expect("packs");
        let mut text = Vec::new();
        run_to(
            CheckpointCommand::Inspect {
                file: ckpt,
                json: false,
            },
            &mut text,
        )
        .expect("inspects");
        let text = String::from_utf8(text).expect("utf-8");
        assert!(text.contains("version      1.0"), "{text}");
        assert!(
            text.contains("blocks       4 of 64.0 KiB: 3 zero, 0 raw, 1 zstd"),
            "{text}"
        );
        assert!(
            text.contains("0x0000000000000000..0x0000000000040000"),
            "{text}"
        );
    }
}
