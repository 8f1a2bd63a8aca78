//! `stasis checkpoint …` subcommands: inspect, verify, pack, unpack,
//! flatten. `inspect`, `verify`, `unpack` and `flatten` take a layered
//! checkpoint's parents with `--parent`, newest first.
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
use crate::restore::working_set::{self, WorkingSetError, WorkingSetSummary};
use super::reader::{ReadError, Reader, ReaderOptions, Summary};
use super::source::{FileSource, SourceError};
use super::writer::{
    flatten, write_checkpoint, WriteError, WriteStats, WriterOptions, DEFAULT_LEVEL,
    DEFAULT_MEMORY_BLOCK_SIZE, DEFAULT_STORAGE_BLOCK_SIZE,
};

/// Work on checkpoint files.
#[derive(Debug, Subcommand)]
pub enum CheckpointCommand {
    /// Show what a checkpoint file holds: version, regions, block sizes,
    /// blocks by kind, stored bytes, compression ratio; for a layered file
    /// its parent's index checksum, and with --parent the chain.
    Inspect {
        /// The checkpoint file, or a snapshot directory: then its memory
        /// checkpoint and the chain of parents its manifest names.
        file: PathBuf,
        /// Its parent checkpoint, then that one's parent, and so on.
        #[arg(long = "parent", value_name = "PARENT")]
        parents: Vec<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check every block's checksum; fail naming the first bad block. A
    /// layered file given without --parent has only its own blocks checked.
    Verify {
        /// The checkpoint file, or a snapshot directory (as for inspect).
        file: PathBuf,
        /// Its parent checkpoint, then that one's parent, and so on.
        #[arg(long = "parent", value_name = "PARENT")]
        parents: Vec<PathBuf>,
    },
    /// Merge a layered checkpoint and its parents into one self-contained
    /// checkpoint.
    Flatten {
        /// The newest checkpoint of the chain.
        file: PathBuf,
        /// Its parent checkpoint, then that one's parent, and so on.
        #[arg(long = "parent", value_name = "PARENT")]
        parents: Vec<PathBuf>,
        /// The checkpoint to write.
        #[arg(long)]
        out: PathBuf,
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
        /// Its parent checkpoint, then that one's parent, and so on.
        #[arg(long = "parent", value_name = "PARENT")]
        parents: Vec<PathBuf>,
        /// The raw image to write.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Errors of the checkpoint subcommands.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A snapshot directory's chain could not be followed.
    #[error("cannot follow the snapshot's chain")]
    Snapshot(#[source] crate::persist::PersistError),
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
    /// `flatten` could not open the chain.
    #[error("cannot flatten")]
    OpenChain(#[source] ReadError),
    /// `flatten` could not write the checkpoint.
    #[error("cannot flatten")]
    Flatten(#[source] WriteError),
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
    writeln!(out, "version      {} (block checksums {})", s.version, s.checksum.name())?;
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
    write!(
        out,
        "blocks       {} of {}: {} zero, {} raw, {} zstd",
        s.blocks,
        human(u64::from(s.memory_block_size)),
        s.zero_blocks,
        s.raw_blocks,
        s.zstd_blocks
    )?;
    // Plain files keep the 1.0 report, line for line.
    if let Some(parent_crc) = s.parent_index_crc {
        writeln!(out, ", {} parent", s.parent_blocks)?;
        writeln!(out, "index        checksum {:#010x}", s.index_crc)?;
        writeln!(
            out,
            "parent       index checksum {parent_crc:#010x}{}",
            if s.chain_depth == 1 {
                " (not opened: give it with --parent)"
            } else {
                ""
            }
        )?;
    } else {
        writeln!(out)?;
    }
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
    )?;
    if s.chain_depth > 1 {
        writeln!(
            out,
            "chain        {} files, newest first; blocks each supplies:",
            s.chain_depth
        )?;
        for (i, layer) in s.chain.iter().enumerate() {
            writeln!(
                out,
                "  layer {i}    {}: {} block{} (index checksum {:#010x})",
                layer.path.display(),
                layer.blocks,
                if layer.blocks == 1 { "" } else { "s" },
                layer.index_crc
            )?;
        }
    }
    Ok(())
}

/// Shows `packing 45% (460 MiB of 1.00 GiB)` on stderr when it is a
/// terminal, at most once per percent.
struct Progress {
    enabled: bool,
    last_percent: Option<u64>,
    /// What is being done: "packing", "flattening".
    verb: &'static str,
}

impl Progress {
    fn new(verb: &'static str) -> Self {
        Progress {
            enabled: std::io::stderr().is_terminal(),
            last_percent: None,
            verb,
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
            "\r{} {percent:3}% ({} of {})",
            self.verb,
            human(done),
            human(total)
        );
        if done == total {
            let _ = writeln!(err);
        }
    }
}

fn pack_report(out: &mut dyn Write, path: &Path, stats: &WriteStats) -> std::io::Result<()> {
    write_report(out, "packed", path, stats)
}

/// One line on a finished write: `verb` (packed, flattened) and the stats.
fn write_report(
    out: &mut dyn Write,
    verb: &str,
    path: &Path,
    stats: &WriteStats,
) -> std::io::Result<()> {
    writeln!(
        out,
        "{verb} {} into {} ({}, {:.1}% of memory) in {:.2} s: {} zero, {} raw, {} zstd blocks",
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
    // Truncating a checkpoint being read would destroy it.
    if let Ok(out_meta) = std::fs::metadata(out_path) {
        for layer in reader.layers() {
            if let Ok(in_meta) = std::fs::metadata(layer.path()) {
                if (out_meta.dev(), out_meta.ino()) == (in_meta.dev(), in_meta.ino()) {
                    return Err(CliError::CheckOutput {
                        path: out_path.to_path_buf(),
                    });
                }
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

/// Opens `file` alone, or on top of `parents` (newest first).
fn open_chain(file: &Path, parents: &[PathBuf]) -> Result<Reader, ReadError> {
    if parents.is_empty() {
        return Reader::open(file);
    }
    let mut paths = Vec::with_capacity(parents.len() + 1);
    paths.push(file.to_path_buf());
    paths.extend_from_slice(parents);
    Reader::open_chain(&paths, ReaderOptions::default())
}

/// Runs `verify` and reports what was checked.
fn verify(out: &mut dyn Write, file: &Path, parents: &[PathBuf]) -> Result<(), CliError> {
    let reader = open_chain(file, parents).map_err(CliError::Verify)?;
    let summary = reader.summary();
    let write =
        |out: &mut dyn Write, text: String| writeln!(out, "{text}").map_err(CliError::WriteStdout);
    match (summary.parent_index_crc, reader.parent()) {
        (Some(parent_crc), None) => {
            let blocks = reader.verify_layer().map_err(CliError::Verify)?;
            write(
                out,
                format!(
                    "ok: {}: {blocks} blocks it holds, every checksum matches; {} blocks are in its parent checkpoint (index checksum {parent_crc:#010x}), not checked: give it with --parent",
                    file.display(),
                    summary.parent_blocks
                ),
            )
        }
        (_, Some(_)) => {
            let blocks = reader.verify().map_err(CliError::Verify)?;
            write(
                out,
                format!(
                    "ok: {} on top of {} parent{}: {blocks} blocks, every checksum matches",
                    file.display(),
                    summary.chain_depth - 1,
                    if summary.chain_depth == 2 { "" } else { "s" }
                ),
            )
        }
        (None, None) => {
            let blocks = reader.verify().map_err(CliError::Verify)?;
            write(
                out,
                format!(
                    "ok: {}: {blocks} blocks, every checksum matches",
                    file.display()
                ),
            )
        }
    }
}

/// Whether `file` (given with `parents`) names a snapshot directory.
fn is_snapshot_dir(file: &Path, parents: &[PathBuf]) -> bool {
    parents.is_empty() && file.join(crate::persist::MANIFEST_FILE).is_file()
}

/// The working set line of `inspect` on a snapshot directory.
fn write_working_set(
    out: &mut dyn Write,
    ws: &Result<Option<WorkingSetSummary>, WorkingSetError>,
) -> std::io::Result<()> {
    match ws {
        Ok(Some(ws)) => writeln!(
            out,
            "working set  {} block{} ({}; the guest touched {} page{} of them) recorded over {} ms, loaded first on restore",
            ws.blocks,
            if ws.blocks == 1 { "" } else { "s" },
            human(ws.bytes),
            ws.pages,
            if ws.pages == 1 { "" } else { "s" },
            ws.window_ms
        ),
        Ok(None) => writeln!(out, "working set  none (the next lazy restore records one)"),
        Err(e) => writeln!(out, "working set  unusable, ignored on restore: {}", crate::error_chain(e)),
    }
}

/// A snapshot directory (one with a manifest, given without `--parent`)
/// stands for its memory checkpoint and those of the parents its
/// manifest chain names; anything else is passed through.
fn snapshot_layers(file: PathBuf, parents: Vec<PathBuf>) -> Result<(PathBuf, Vec<PathBuf>), CliError> {
    if !is_snapshot_dir(&file, &parents) {
        return Ok((file, parents));
    }
    let snapshot = crate::persist::open_snapshot(&file).map_err(CliError::Snapshot)?;
    let chain = crate::persist::snapshot_chain(&file, &snapshot.manifest, &snapshot.memory_path)
        .map_err(CliError::Snapshot)?;
    let mut paths = chain.into_iter().map(|layer| layer.memory_path);
    let top = paths.next().unwrap_or(snapshot.memory_path);
    Ok((top, paths.collect()))
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
        CheckpointCommand::Inspect {
            file,
            parents,
            json,
        } => {
            let snapshot_dir = is_snapshot_dir(&file, &parents).then(|| file.clone());
            let (file, parents) = snapshot_layers(file, parents)?;
            let reader = open_chain(&file, &parents).map_err(CliError::Inspect)?;
            let summary = reader.summary();
            // A snapshot directory may hold a working set for its memory.
            let working_set = snapshot_dir.map(|dir| working_set::summary(&dir, &reader));
            if json {
                let mut value = serde_json::to_value(&summary).map_err(CliError::EncodeJson)?;
                if let (Some(ws), Some(map)) = (&working_set, value.as_object_mut()) {
                    let ws = match ws {
                        Ok(ws) => serde_json::to_value(ws).map_err(CliError::EncodeJson)?,
                        Err(e) => serde_json::json!({ "unusable": crate::error_chain(e) }),
                    };
                    map.insert("working_set".into(), ws);
                }
                serde_json::to_writer_pretty(&mut *out, &value).map_err(CliError::EncodeJson)?;
                writeln!(out).map_err(CliError::WriteStdout)
            } else {
                write_summary(out, &file, &summary).map_err(CliError::WriteStdout)?;
                match working_set {
                    Some(ws) => write_working_set(out, &ws).map_err(CliError::WriteStdout),
                    None => Ok(()),
                }
            }
        }
        CheckpointCommand::Verify { file, parents } => {
            let (file, parents) = snapshot_layers(file, parents)?;
            verify(out, &file, &parents)
        }
        CheckpointCommand::Flatten {
            file,
            parents,
            out: out_path,
            storage_block_size,
            level,
            threads,
        } => {
            let reader = open_chain(&file, &parents).map_err(CliError::OpenChain)?;
            let options = WriterOptions {
                storage_block_size,
                level,
                threads,
                // The newest layer's block checksum: a snapshot's stays XXH64.
                checksum: reader.header().checksum,
                ..WriterOptions::default()
            };
            let mut progress = Progress::new("flattening");
            let stats = flatten(&reader, &out_path, &options, &mut |done, total| {
                progress.update(done, total)
            })
            .map_err(CliError::Flatten)?;
            write_report(out, "flattened", &out_path, &stats).map_err(CliError::WriteStdout)
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
                ..WriterOptions::default()
            };
            let mut progress = Progress::new("packing");
            let stats = write_checkpoint(&out_path, &source, &options, &mut |done, total| {
                progress.update(done, total)
            })
            .map_err(CliError::Pack)?;
            pack_report(out, &out_path, &stats).map_err(CliError::WriteStdout)
        }
        CheckpointCommand::Unpack {
            file,
            parents,
            out: out_path,
        } => {
            let reader = open_chain(&file, &parents).map_err(CliError::Unpack)?;
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
            parents: Vec::new(),
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
                parents: Vec::new(),
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

    /// A base checkpoint of 8 blocks of 4 KiB and a layer on top of it that
    /// changes blocks 2 (new data) and 5 (now zero); returns their paths
    /// and the layer's memory.
    fn two_layers(dir: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
        use crate::checkpoint::source::{BlockHint, HintedSource, ImageSource};
        let mut base_image = vec![0u8; 8 * 4096];
        for (i, b) in base_image.iter_mut().enumerate() {
            *b = (i / 4096 + 1) as u8;
        }
        let base = dir.join("base");
        let options = WriterOptions {
            memory_block_size: 4096,
            storage_block_size: 8192,
            level: 1,
            threads: 1,
            parent_index_crc: None,
            ..WriterOptions::default()
        };
        write_checkpoint(
            &base,
            &ImageSource::flat(&base_image),
            &options,
            &mut |_, _| {},
        )
        .expect("writes base");
        let base_crc = Reader::open(&base).expect("opens").index_crc();
        let mut image = base_image.clone();
        image[2 * 4096..3 * 4096].fill(0x77);
        image[5 * 4096..6 * 4096].fill(0);
        let layer = dir.join("layer");
        let source =
            HintedSource::new(ImageSource::flat(&image), |_, offset| match offset / 4096 {
                2 | 5 => BlockHint::Read,
                _ => BlockHint::Parent,
            });
        let options = WriterOptions {
            parent_index_crc: Some(base_crc),
            ..options
        };
        write_checkpoint(&layer, &source, &options, &mut |_, _| {}).expect("writes layer");
        drop(source);
        (base, layer, image)
    }

    fn run_text(cmd: CheckpointCommand) -> Result<String, CliError> {
        let mut out = Vec::new();
        run_to(cmd, &mut out)?;
        Ok(String::from_utf8(out).expect("utf-8"))
    }

    #[test]
    fn inspect_shows_parent_blocks_the_parent_crc_and_the_chain() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (base, layer, _) = two_layers(dir.path());
        let base_crc = Reader::open(&base).expect("opens").index_crc();
        let alone = run_text(CheckpointCommand::Inspect {
            file: layer.clone(),
            parents: Vec::new(),
            json: false,
        })
        .expect("inspects");
        assert!(alone.contains("version      1.1"), "{alone}");
        assert!(
            alone.contains("blocks       8 of 4.00 KiB: 1 zero, 0 raw, 1 zstd, 6 parent"),
            "{alone}"
        );
        assert!(
            alone.contains(&format!(
                "parent       index checksum {base_crc:#010x} (not opened"
            )),
            "{alone}"
        );
        assert!(!alone.contains("chain"), "{alone}");
        let chained = run_text(CheckpointCommand::Inspect {
            file: layer.clone(),
            parents: vec![base.clone()],
            json: false,
        })
        .expect("inspects");
        assert!(chained.contains("chain        2 files"), "{chained}");
        assert!(
            chained.contains(&format!("  layer 0    {}: 2 blocks", layer.display())),
            "{chained}"
        );
        assert!(
            chained.contains(&format!("  layer 1    {}: 6 blocks", base.display())),
            "{chained}"
        );
        let plain = run_text(CheckpointCommand::Inspect {
            file: base,
            parents: Vec::new(),
            json: false,
        })
        .expect("inspects");
        assert!(!plain.contains("parent"), "{plain}");
        assert!(plain.contains("version      1.0"), "{plain}");
    }

    #[test]
    fn verify_checks_a_layer_alone_or_with_its_parent() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (base, layer, _) = two_layers(dir.path());
        let alone = run_text(CheckpointCommand::Verify {
            file: layer.clone(),
            parents: Vec::new(),
        })
        .expect("verifies");
        assert!(
            alone.contains(
                "2 blocks it holds, every checksum matches; 6 blocks are in its parent checkpoint"
            ),
            "{alone}"
        );
        let chained = run_text(CheckpointCommand::Verify {
            file: layer.clone(),
            parents: vec![base],
        })
        .expect("verifies");
        assert_eq!(
            chained,
            format!(
                "ok: {} on top of 1 parent: 8 blocks, every checksum matches\n",
                layer.display()
            )
        );
        let wrong = run_text(CheckpointCommand::Verify {
            file: layer.clone(),
            parents: vec![layer.clone()],
        })
        .expect_err("a layer is not its own parent");
        assert!(matches!(wrong, CliError::Verify(_)), "{wrong:?}");
    }

    #[test]
    fn flatten_and_unpack_give_the_layer_memory() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (base, layer, image) = two_layers(dir.path());
        let flat = dir.path().join("flat");
        let report = run_text(CheckpointCommand::Flatten {
            file: layer.clone(),
            parents: vec![base.clone()],
            out: flat.clone(),
            storage_block_size: 8192,
            level: 1,
            threads: 1,
        })
        .expect("flattens");
        assert!(report.starts_with("flattened 32.0 KiB into"), "{report}");
        let summary = Reader::open(&flat).expect("opens").summary();
        assert_eq!(
            (summary.version.as_str(), summary.parent_blocks),
            ("1.0", 0)
        );
        let raw_flat = dir.path().join("raw-flat");
        run_text(CheckpointCommand::Unpack {
            file: flat,
            parents: Vec::new(),
            out: raw_flat.clone(),
        })
        .expect("unpacks");
        assert!(std::fs::read(&raw_flat).expect("read") == image);
        let raw_chain = dir.path().join("raw-chain");
        run_text(CheckpointCommand::Unpack {
            file: layer.clone(),
            parents: vec![base.clone()],
            out: raw_chain.clone(),
        })
        .expect("unpacks");
        assert!(std::fs::read(&raw_chain).expect("read") == image);
        let err = run_text(CheckpointCommand::Unpack {
            file: layer,
            parents: vec![base.clone()],
            out: base,
        })
        .expect_err("would overwrite the parent");
        assert!(matches!(err, CliError::CheckOutput { .. }), "{err:?}");
    }

    #[test]
    fn flatten_refuses_a_layer_without_its_parent() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (_, layer, _) = two_layers(dir.path());
        let err = run_text(CheckpointCommand::Flatten {
            file: layer,
            parents: Vec::new(),
            out: dir.path().join("flat"),
            storage_block_size: 8192,
            level: 1,
            threads: 1,
        })
        .expect_err("no parent");
        assert!(matches!(err, CliError::Flatten(_)), "{err:?}");
        assert!(!dir.path().join("flat").exists());
    }
}
