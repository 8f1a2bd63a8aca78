//! Damaged, foreign and absurd checkpoint files: each must give one clear
//! error that says what is wrong and where, never a panic and never a
//! wrong block.
//!
//! Classes: truncation, bit flips (fixed places, one flip per byte, and a
//! property test), magic, version, absurd lengths and counts, and paths
//! that are not readable checkpoint files.

use std::error::Error;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use stasis::checkpoint::format::{
    Header, BLOCK_ENTRY_LEN, FOOTER_LEN, HEADER_FIXED_LEN, STORAGE_ENTRY_LEN,
};
use stasis::checkpoint::{
    write_checkpoint, BlockChecksum, BlockKind, ImageSource, ReadError, Reader, ReaderOptions, WriterOptions,
};

const HIGH: u64 = 1 << 32;

/// Guest memory of the sample: a low region with zero, text-like and
/// random blocks and a short tail, and a high region with one set byte.
struct Sample {
    low: Vec<u8>,
    high: Vec<u8>,
    bytes: Vec<u8>,
}

impl Sample {
    fn new() -> Self {
        let mut low = vec![0u8; 12 * 4096 + 300];
        for (i, b) in low[4096..6 * 4096].iter_mut().enumerate() {
            *b = b"fn main() { println!(); }\n"[i % 26];
        }
        let mut x = 0x0123_4567_89ab_cdefu64;
        for b in &mut low[8 * 4096..] {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        let mut high = vec![0u8; 4 * 4096];
        high[2 * 4096 + 9] = 0x5a;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("sample");
        let source = ImageSource::new(vec![(0, &low[..]), (HIGH, &high[..])]);
        let options = WriterOptions {
            memory_block_size: 4096,
            storage_block_size: 8192,
            level: 3,
            threads: 2,
            parent_index_crc: None,
            // As snapshots write them.
            checksum: BlockChecksum::Xxh64,
        };
        write_checkpoint(&path, &source, &options, &mut |_, _| {}).expect("writes sample");
        let bytes = std::fs::read(&path).expect("reads sample");
        Sample { low, high, bytes }
    }

    /// The content block `info` must have.
    fn expected(&self, guest_addr: u64, len: usize) -> &[u8] {
        if guest_addr >= HIGH {
            let off = (guest_addr - HIGH) as usize;
            &self.high[off..off + len]
        } else {
            &self.low[guest_addr as usize..guest_addr as usize + len]
        }
    }

    fn header_len(&self) -> usize {
        Header::decode_len(&self.bytes[..HEADER_FIXED_LEN]).expect("valid header")
    }

    fn footer_offset(&self) -> usize {
        self.bytes.len() - FOOTER_LEN
    }

    fn index_offset(&self) -> usize {
        u64_at(&self.bytes, self.footer_offset() + 8) as usize
    }

    fn storage_count(&self) -> usize {
        u64_at(&self.bytes, self.footer_offset() + 24) as usize
    }

    /// Offset of block `i`'s entry in the block table.
    fn block_entry(&self, i: usize) -> usize {
        self.index_offset() + self.storage_count() * STORAGE_ENTRY_LEN + i * BLOCK_ENTRY_LEN
    }
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}

/// Writes `bytes` to a fresh file and opens it.
fn open_bytes(
    bytes: &[u8],
    options: ReaderOptions,
) -> (tempfile::TempDir, Result<Reader, ReadError>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("ckpt");
    std::fs::write(&path, bytes).expect("write");
    let result = Reader::open_with(&path, options);
    (dir, result)
}

/// The error and its sources on one line, as `stasis` prints them.
fn chain(err: &dyn Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

fn open_err(bytes: &[u8]) -> String {
    match open_bytes(bytes, ReaderOptions::default()).1 {
        Ok(_) => panic!("damaged file opened"),
        Err(err) => chain(&err),
    }
}

/// Opens `bytes` and reads every block both ways. Returns the first error
/// (open or read) or `None`; panics if any block comes back different.
fn read_everything(sample: &Sample, bytes: &[u8]) -> Option<String> {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("ckpt");
    std::fs::write(&path, bytes).expect("write");
    read_everything_at(sample, &path)
}

/// [`read_everything`] on a file already written.
fn read_everything_at(sample: &Sample, path: &Path) -> Option<String> {
    read_with(sample, path, &[8, 0])
}

/// [`read_everything_at`] with readers caching each of `caches` storage
/// blocks.
fn read_with(sample: &Sample, path: &Path, caches: &[usize]) -> Option<String> {
    let mut first_err = None;
    for &cached in caches {
        let reader = match Reader::open_with(
            path,
            ReaderOptions {
                cached_storage_blocks: cached,
                ..ReaderOptions::default()
            },
        ) {
            Ok(r) => r,
            Err(err) => return Some(chain(&err)),
        };
        let mut buf = vec![0u8; 4096];
        for i in 0..reader.block_count() {
            let info = reader.block_info(i).expect("block exists");
            match reader.read_block(i, &mut buf) {
                Ok(data) => assert_eq!(
                    data,
                    sample.expected(info.guest_addr, info.len),
                    "block {i}"
                ),
                Err(err) => {
                    first_err.get_or_insert(chain(&err));
                }
            }
        }
        let mut seq = reader.sequential();
        while let Some(block) = seq.next_block() {
            match block {
                Ok((info, data)) => {
                    assert_eq!(
                        data,
                        sample.expected(info.guest_addr, info.len),
                        "block {}",
                        info.index
                    )
                }
                Err(err) => {
                    first_err.get_or_insert(chain(&err));
                }
            }
        }
    }
    first_err
}

/// Recomputes the header CRC after `patch` edits the header bytes.
fn patch_header(sample: &Sample, patch: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let mut bytes = sample.bytes.clone();
    let len = sample.header_len();
    patch(&mut bytes[..len]);
    let crc = crc32c::crc32c(&bytes[..len - 4]);
    bytes[len - 4..len].copy_from_slice(&crc.to_le_bytes());
    bytes
}

/// Recomputes the footer CRC after `patch` edits the footer bytes.
fn patch_footer(sample: &Sample, patch: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let mut bytes = sample.bytes.clone();
    let at = sample.footer_offset();
    patch(&mut bytes[at..]);
    let crc = crc32c::crc32c(&bytes[at..at + FOOTER_LEN - 4]);
    bytes[at + FOOTER_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
    bytes
}

/// Recomputes the index and footer CRCs after `patch` edits the file.
fn patch_index(sample: &Sample, patch: impl FnOnce(&mut [u8])) -> Vec<u8> {
    let mut bytes = sample.bytes.clone();
    patch(&mut bytes);
    let (start, end) = (sample.index_offset(), sample.footer_offset());
    let crc = crc32c::crc32c(&bytes[start..end]);
    bytes[end + 44..end + 48].copy_from_slice(&crc.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[end..end + FOOTER_LEN - 4]);
    bytes[end + FOOTER_LEN - 4..].copy_from_slice(&crc.to_le_bytes());
    bytes
}

#[test]
fn sample_is_sound_and_has_every_block_kind() {
    let sample = Sample::new();
    assert_eq!(read_everything(&sample, &sample.bytes), None);
    let (_dir, reader) = open_bytes(&sample.bytes, ReaderOptions::default());
    let summary = reader.expect("opens").summary();
    assert!(summary.zero_blocks > 0 && summary.raw_blocks > 0 && summary.zstd_blocks > 0);
    assert!(summary.storage_blocks > 2);
}

// ---- truncation -----------------------------------------------------------

#[test]
fn empty_file_is_reported_as_truncated_header() {
    let err = open_err(&[]);
    assert!(
        err.contains("is truncated: it is 0 bytes but its header needs 48"),
        "{err}"
    );
}

#[test]
fn truncation_inside_the_region_table_is_reported_as_truncated_header() {
    let sample = Sample::new();
    let err = open_err(&sample.bytes[..HEADER_FIXED_LEN + 10]);
    assert!(
        err.contains("is truncated: it is 58 bytes but its header needs"),
        "{err}"
    );
}

#[test]
fn truncation_in_header_padding_is_reported_as_truncated() {
    let sample = Sample::new();
    let err = open_err(&sample.bytes[..2000]);
    assert!(
        err.contains("is truncated: it is 2000 bytes but its header page and footer need"),
        "{err}"
    );
}

#[test]
fn truncation_in_data_reports_the_missing_footer() {
    let sample = Sample::new();
    let cut = 4096 + 5000;
    assert!(cut < sample.index_offset());
    let err = open_err(&sample.bytes[..cut]);
    let expected = format!(
        "no footer at offset {}: the file is truncated",
        cut - FOOTER_LEN
    );
    assert!(err.contains(&expected), "{err}");
}

#[test]
fn truncation_in_index_reports_the_missing_footer() {
    let sample = Sample::new();
    let cut = sample.index_offset() + 30;
    let err = open_err(&sample.bytes[..cut]);
    assert!(
        err.contains("no footer at offset") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn truncation_in_footer_reports_the_missing_footer() {
    let sample = Sample::new();
    let err = open_err(&sample.bytes[..sample.bytes.len() - 1]);
    assert!(
        err.contains("no footer at offset") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn truncation_at_every_length_is_rejected() {
    let sample = Sample::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("ckpt");
    let file = std::fs::File::create(&path).expect("create");
    std::io::Write::write_all(&mut &file, &sample.bytes).expect("write");
    for len in (0..sample.bytes.len()).rev() {
        file.set_len(len as u64).expect("truncate");
        let result = Reader::open(&path);
        let err = result.expect_err("truncated file opened");
        let line = chain(&err);
        assert!(line.contains("truncated"), "length {len}: {line}");
    }
}

// ---- bit flips -------------------------------------------------------------

#[test]
fn flipped_bit_in_region_table_fails_the_header_checksum() {
    let sample = Sample::new();
    let mut bytes = sample.bytes.clone();
    bytes[HEADER_FIXED_LEN + 3] ^= 0x04;
    let err = open_err(&bytes);
    let crc_at = sample.header_len() - 4;
    assert!(
        err.contains(&format!("header checksum mismatch at offset {crc_at}")),
        "{err}"
    );
}

#[test]
fn flipped_bit_in_a_raw_block_names_the_block_and_its_offset() {
    let sample = Sample::new();
    let (_dir, reader) = open_bytes(&sample.bytes, ReaderOptions::default());
    let reader = reader.expect("opens");
    let info = (0..reader.block_count())
        .filter_map(|i| reader.block_info(i))
        .find(|b| b.kind == BlockKind::Raw)
        .expect("a raw block");
    let mut bytes = sample.bytes.clone();
    bytes[info.file_offset as usize + 100] ^= 0x80;
    let err = read_everything(&sample, &bytes).expect("flip detected");
    let expected = format!(
        "checksum mismatch in block {} at offset {}",
        info.index, info.file_offset
    );
    assert!(err.contains(&expected), "{err}");
}

#[test]
fn flipped_bit_in_a_zstd_block_names_the_block_and_its_offset() {
    let sample = Sample::new();
    let (_dir, reader) = open_bytes(&sample.bytes, ReaderOptions::default());
    let reader = reader.expect("opens");
    let info = (0..reader.block_count())
        .filter_map(|i| reader.block_info(i))
        .find(|b| b.kind == BlockKind::Zstd && b.stored_len > 40)
        .expect("a zstd block");
    let mut bytes = sample.bytes.clone();
    bytes[info.file_offset as usize + info.stored_len as usize / 2] ^= 0x01;
    let err = read_everything(&sample, &bytes).expect("flip detected");
    let named = format!("block {} at offset {}", info.index, info.file_offset);
    assert!(err.contains(&named), "{err}");
}

#[test]
fn flipped_bit_in_the_index_fails_the_index_checksum() {
    let sample = Sample::new();
    let mut bytes = sample.bytes.clone();
    bytes[sample.block_entry(3) + 16] ^= 0x02;
    let err = open_err(&bytes);
    let expected = format!(
        "index checksum mismatch at offset {}",
        sample.index_offset()
    );
    assert!(err.contains(&expected), "{err}");
}

#[test]
fn flipped_bit_in_the_footer_fails_the_footer_checksum() {
    let sample = Sample::new();
    let mut bytes = sample.bytes.clone();
    bytes[sample.footer_offset() + 20] ^= 0x40;
    let err = open_err(&bytes);
    assert!(err.contains("footer checksum mismatch at offset"), "{err}");
}

#[test]
fn one_flipped_bit_in_every_byte_is_caught_or_harmless() {
    use std::os::unix::fs::FileExt;
    let sample = Sample::new();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("ckpt");
    std::fs::write(&path, &sample.bytes).expect("write");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("reopen");
    let mut uncaught = Vec::new();
    for (pos, &byte) in sample.bytes.iter().enumerate() {
        file.write_all_at(&[byte ^ (1 << (pos % 8))], pos as u64)
            .expect("flip");
        // Panics inside if any block comes back different.
        if read_with(&sample, &path, &[8]).is_none() {
            uncaught.push(pos);
        }
        file.write_all_at(&[byte], pos as u64).expect("restore");
    }
    // Harmless flips may only hit bytes no reader looks at: the padding
    // after the header and after each storage block, and bit 4 of a zstd
    // frame header descriptor (byte 4 of the frame), which the zstd format
    // defines as unused.
    let reader = Reader::open(&path).expect("opens");
    let mut harmless: Vec<std::ops::Range<usize>> = Vec::new();
    harmless.push(sample.header_len()..4096);
    for sb in 0..reader.storage_block_count() {
        let start = reader.storage_block_offset(sb).expect("exists") as usize;
        let end = reader
            .storage_block_offset(sb + 1)
            .unwrap_or(sample.index_offset() as u64) as usize;
        let stored: u32 = (0..reader.block_count())
            .filter_map(|i| reader.block_info(i))
            .filter(|b| b.kind != BlockKind::Zero && b.storage_block as usize == sb)
            .map(|b| b.stored_len)
            .sum();
        harmless.push(start + stored as usize..end);
    }
    for b in (0..reader.block_count()).filter_map(|i| reader.block_info(i)) {
        let descriptor = b.file_offset as usize + 4;
        if b.kind == BlockKind::Zstd && descriptor % 8 == 4 {
            harmless.push(descriptor..descriptor + 1);
        }
    }
    let unexplained: Vec<usize> = uncaught
        .iter()
        .copied()
        .filter(|p| !harmless.iter().any(|r| r.contains(p)))
        .collect();
    assert_eq!(
        unexplained,
        Vec::<usize>::new(),
        "flips that went unnoticed"
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn random_bit_flips_give_a_clean_error_or_identical_data(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..6)
    ) {
        let sample = SAMPLE.with(|s| s.bytes.clone());
        let mut bytes = sample;
        for (index, bit) in &flips {
            let pos = index.index(bytes.len());
            bytes[pos] ^= 1 << bit;
        }
        SAMPLE.with(|s| {
            let _ = read_everything(s, &bytes);
        });
    }
}

thread_local! {
    static SAMPLE: Sample = Sample::new();
}

// ---- magic -----------------------------------------------------------------

#[test]
fn wrong_magic_is_reported_at_offset_zero() {
    let sample = Sample::new();
    let mut bytes = sample.bytes.clone();
    bytes[..8].copy_from_slice(b"QFI\xfbXXXX");
    let err = open_err(&bytes);
    assert!(err.contains("bad magic at offset 0"), "{err}");
}

#[test]
fn a_text_file_is_not_a_checkpoint() {
    let err = open_err(&b"just some text, certainly not a checkpoint\n".repeat(100));
    assert!(
        err.contains("is not a valid checkpoint: bad magic at offset 0"),
        "{err}"
    );
}

#[test]
fn wrong_footer_magic_reports_a_missing_footer() {
    let sample = Sample::new();
    let bytes = patch_footer(&sample, |f| f[..8].copy_from_slice(b"STASISXX"));
    let err = open_err(&bytes);
    let expected = format!("no footer at offset {}", sample.footer_offset());
    assert!(err.contains(&expected), "{err}");
}

// ---- version ---------------------------------------------------------------

#[test]
fn unknown_major_version_is_refused_by_number() {
    let sample = Sample::new();
    let bytes = patch_header(&sample, |h| h[8..10].copy_from_slice(&2u16.to_le_bytes()));
    let err = open_err(&bytes);
    assert!(
        err.contains("unsupported format version 2.2 at offset 8"),
        "{err}"
    );
}

#[test]
fn major_version_zero_is_refused() {
    let sample = Sample::new();
    let bytes = patch_header(&sample, |h| h[8..10].copy_from_slice(&0u16.to_le_bytes()));
    let err = open_err(&bytes);
    assert!(err.contains("unsupported format version 0.2"), "{err}");
}

#[test]
fn newer_minor_version_is_read() {
    // Minor versions only add fields the reader may ignore; the footer
    // still names the old header CRC, so patch it too.
    let sample = Sample::new();
    let bytes = patch_header(&sample, |h| h[10..12].copy_from_slice(&7u16.to_le_bytes()));
    let len = sample.header_len();
    let new_crc = u32::from_le_bytes(bytes[len - 4..len].try_into().expect("4 bytes"));
    let sample2 = Sample {
        bytes,
        ..Sample::new()
    };
    let bytes = patch_footer(&sample2, |f| {
        f[40..44].copy_from_slice(&new_crc.to_le_bytes())
    });
    assert_eq!(read_everything(&sample2, &bytes), None);
}

// ---- absurd lengths and counts --------------------------------------------

#[test]
fn absurd_region_count_is_refused_before_reading_regions() {
    let sample = Sample::new();
    let bytes = patch_header(&sample, |h| {
        h[24..28].copy_from_slice(&u32::MAX.to_le_bytes())
    });
    let err = open_err(&bytes);
    assert!(
        err.contains("bad header field at offset 24: region count 4294967295"),
        "{err}"
    );
}

#[test]
fn absurd_header_length_is_refused() {
    let sample = Sample::new();
    let bytes = patch_header(&sample, |h| {
        h[12..16].copy_from_slice(&u32::MAX.to_le_bytes())
    });
    let err = open_err(&bytes);
    assert!(
        err.contains("bad header field at offset 12: header length 4294967295"),
        "{err}"
    );
}

#[test]
fn absurd_memory_block_sizes_are_refused() {
    let sample = Sample::new();
    for size in [0u32, 1, 4095, 3 << 20, 1 << 31, u32::MAX] {
        let bytes = patch_header(&sample, |h| h[16..20].copy_from_slice(&size.to_le_bytes()));
        let err = open_err(&bytes);
        let expected = format!("bad header field at offset 16: memory block size {size}");
        assert!(err.contains(&expected), "{err}");
    }
}

#[test]
fn absurd_storage_block_size_is_refused() {
    let sample = Sample::new();
    let bytes = patch_header(&sample, |h| {
        h[20..24].copy_from_slice(&u32::MAX.to_le_bytes())
    });
    let err = open_err(&bytes);
    assert!(
        err.contains("bad header field at offset 20: storage block size 4294967295"),
        "{err}"
    );
}

#[test]
fn absurd_region_size_is_refused() {
    let sample = Sample::new();
    let bytes = patch_header(&sample, |h| {
        h[HEADER_FIXED_LEN + 8..HEADER_FIXED_LEN + 16].copy_from_slice(&(1u64 << 62).to_le_bytes())
    });
    let err = open_err(&bytes);
    assert!(
        err.contains("bad header field at offset 48: regions hold more than the limit"),
        "{err}"
    );
}

#[test]
fn absurd_storage_block_count_in_footer_is_refused() {
    let sample = Sample::new();
    let bytes = patch_footer(&sample, |f| {
        f[24..32].copy_from_slice(&u64::MAX.to_le_bytes())
    });
    let err = open_err(&bytes);
    let expected = format!(
        "bad footer field at offset {}: storage block count 18446744073709551615",
        sample.footer_offset() + 24
    );
    assert!(err.contains(&expected), "{err}");
}

#[test]
fn absurd_index_length_in_footer_is_refused() {
    let sample = Sample::new();
    let bytes = patch_footer(&sample, |f| {
        f[16..24].copy_from_slice(&u64::MAX.to_le_bytes())
    });
    let err = open_err(&bytes);
    assert!(
        err.contains("bad footer field") && err.contains("length 18446744073709551615"),
        "{err}"
    );
}

#[test]
fn absurd_memory_block_count_in_footer_is_refused() {
    let sample = Sample::new();
    let bytes = patch_footer(&sample, |f| {
        f[32..40].copy_from_slice(&(1u64 << 40).to_le_bytes())
    });
    let err = open_err(&bytes);
    assert!(
        err.contains("memory block count 1099511627776 differs"),
        "{err}"
    );
}

#[test]
fn absurd_stored_length_in_a_block_entry_is_refused() {
    let sample = Sample::new();
    let at = sample.block_entry(1) + 12;
    let bytes = patch_index(&sample, |b| {
        b[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes())
    });
    let err = open_err(&bytes);
    let expected = format!(
        "bad index entry for block 1 at offset {}",
        sample.block_entry(1)
    );
    assert!(
        err.contains(&expected) && err.contains("stored length 4294967295"),
        "{err}"
    );
}

#[test]
fn absurd_offset_in_a_block_entry_is_refused() {
    let sample = Sample::new();
    let at = sample.block_entry(2) + 8;
    let bytes = patch_index(&sample, |b| {
        b[at..at + 4].copy_from_slice(&0x7fff_0000u32.to_le_bytes())
    });
    let err = open_err(&bytes);
    assert!(
        err.contains("bad index entry for block 2") && err.contains("offset 2147418112"),
        "{err}"
    );
}

#[test]
fn absurd_storage_block_number_in_a_block_entry_is_refused() {
    let sample = Sample::new();
    let at = sample.block_entry(2) + 4;
    let bytes = patch_index(&sample, |b| {
        b[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes())
    });
    let err = open_err(&bytes);
    assert!(err.contains("bad index entry for block 2"), "{err}");
}

#[test]
fn absurd_length_in_a_storage_entry_is_refused() {
    let sample = Sample::new();
    let at = sample.index_offset() + 8;
    let bytes = patch_index(&sample, |b| {
        b[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes())
    });
    let err = open_err(&bytes);
    assert!(
        err.contains("bad storage table entry for storage block 0")
            && err.contains("stored length 4294967295"),
        "{err}"
    );
}

#[test]
fn absurd_offset_in_a_storage_entry_is_refused() {
    let sample = Sample::new();
    let at = sample.index_offset() + STORAGE_ENTRY_LEN;
    let bytes = patch_index(&sample, |b| {
        b[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes())
    });
    let err = open_err(&bytes);
    assert!(
        err.contains("bad storage table entry for storage block 1"),
        "{err}"
    );
}

#[test]
fn two_entries_sharing_stored_bytes_are_refused() {
    // Point block 2 at block 1's bytes: both claims would read "valid"
    // data, so the index order check must catch it.
    let sample = Sample::new();
    let (b1, b2) = (sample.block_entry(1), sample.block_entry(2));
    let bytes = patch_index(&sample, |b| {
        let entry: Vec<u8> = b[b1..b1 + BLOCK_ENTRY_LEN].to_vec();
        b[b2..b2 + BLOCK_ENTRY_LEN].copy_from_slice(&entry);
    });
    let err = open_err(&bytes);
    assert!(err.contains("bad index entry for block 2"), "{err}");
}

// ---- paths that are not checkpoint files -----------------------------------

fn open_path_err(path: &Path) -> String {
    chain(&Reader::open(path).expect_err("not a checkpoint"))
}

#[test]
fn a_directory_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("temp dir");
    let err = open_path_err(dir.path());
    assert_eq!(
        err,
        format!(
            "{} is a directory, not a checkpoint file",
            dir.path().display()
        )
    );
}

#[test]
fn a_missing_file_is_reported_with_the_os_reason() {
    let path = PathBuf::from("/nonexistent/stasis/ckpt");
    let err = open_path_err(&path);
    assert!(
        err.starts_with("cannot open /nonexistent/stasis/ckpt: No such file"),
        "{err}"
    );
}

#[test]
fn a_path_through_a_regular_file_is_reported_with_the_os_reason() {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    let path = file.path().join("child");
    let err = open_path_err(&path);
    assert!(
        err.contains("cannot open") && err.contains("Not a directory"),
        "{err}"
    );
}

#[test]
fn a_device_file_is_refused() {
    let err = open_path_err(Path::new("/dev/null"));
    assert_eq!(
        err,
        "/dev/null is not a regular file, not a checkpoint file"
    );
}
