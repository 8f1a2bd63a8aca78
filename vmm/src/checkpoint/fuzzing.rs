//! The body of the reader fuzz target (`fuzz/fuzz_targets/reader.rs`),
//! kept in the library so ordinary tests compile and run it on stable.
//!
//! It opens arbitrary bytes as a checkpoint and, when they open, reads
//! every block both at random and sequentially. Any panic is a bug; so is a
//! block that the two paths return differently, or an address that does
//! not map back to its block.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use super::format::{le_u32, le_u64, CRC_LEN, FOOTER_LEN, HEADER_FIXED_LEN, MAX_HEADER_LEN};
use super::reader::{Reader, ReaderOptions};

/// Most blocks one input gets read: keeps each run short.
const MAX_BLOCKS_READ: usize = 1024;

/// An anonymous in-memory file holding `data`.
fn memory_file(data: &[u8]) -> std::io::Result<File> {
    // SAFETY: the name is a valid NUL-terminated string and memfd_create
    // does not keep the pointer past the call.
    let fd = unsafe { libc::memfd_create(c"stasis-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: memfd_create just returned this descriptor and nothing else
    // owns it, so the File may take ownership and close it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.write_all_at(data, 0)?;
    Ok(file)
}

/// Feeds `data` to the reader as a checkpoint file, then again with its
/// header, index and footer checksums recomputed, so that mutations reach
/// the field checks behind the checksums. Panics on a bug.
pub fn read_untrusted(data: &[u8]) {
    read_once(data);
    let mut repaired = data.to_vec();
    if repair_checksums(&mut repaired) {
        read_once(&repaired);
    }
}

/// Recomputes whatever header, index and footer checksums `data` has room
/// for, trusting its length fields only as far as they fit. Returns whether
/// it changed anything.
fn repair_checksums(data: &mut [u8]) -> bool {
    let before = crc32c::crc32c(data);
    let len = data.len();
    if len < HEADER_FIXED_LEN {
        return false;
    }
    let header_len = le_u32(data, 12) as usize;
    let mut header_crc = None;
    if (HEADER_FIXED_LEN + CRC_LEN..=len.min(MAX_HEADER_LEN)).contains(&header_len) {
        let crc = crc32c::crc32c(&data[..header_len - CRC_LEN]);
        data[header_len - CRC_LEN..header_len].copy_from_slice(&crc.to_le_bytes());
        header_crc = Some(crc);
    }
    if len >= FOOTER_LEN {
        let foot = len - FOOTER_LEN;
        if let Some(crc) = header_crc {
            data[foot + 40..foot + 44].copy_from_slice(&crc.to_le_bytes());
        }
        let index_offset = le_u64(data, foot + 8);
        if index_offset <= foot as u64 {
            let crc = crc32c::crc32c(&data[index_offset as usize..foot]);
            data[foot + 44..foot + 48].copy_from_slice(&crc.to_le_bytes());
        }
        let crc = crc32c::crc32c(&data[foot..len - CRC_LEN]);
        data[len - CRC_LEN..].copy_from_slice(&crc.to_le_bytes());
    }
    crc32c::crc32c(data) != before
}

/// One pass of [`read_untrusted`].
fn read_once(data: &[u8]) {
    let Ok(file) = memory_file(data) else {
        return;
    };
    for cached in [ReaderOptions::default().cached_storage_blocks, 0] {
        let Ok(copy) = file.try_clone() else {
            return;
        };
        let options = ReaderOptions {
            cached_storage_blocks: cached,
            ..ReaderOptions::default()
        };
        let Ok(reader) = Reader::from_file(copy, PathBuf::from("fuzz-input"), options) else {
            continue;
        };
        let mut buf = vec![0u8; reader.header().memory_block_size as usize];
        let mut seq = reader.sequential();
        let mut i = 0;
        while let Some(next) = seq.next_block() {
            if i >= MAX_BLOCKS_READ {
                break;
            }
            let random = reader.read_block(i, &mut buf);
            match (next, random) {
                (Ok((info, data)), Ok(again)) => {
                    assert_eq!(info.index, i);
                    assert_eq!(data, again, "block {i} differs between paths");
                    if info.kind == super::BlockKind::Zero {
                        assert!(data.iter().all(|&b| b == 0), "zero block {i} is not zero");
                    } else {
                        assert_eq!(crc32c::crc32c(data), info.crc, "block {i} passed a bad CRC");
                    }
                    assert_eq!(reader.block_of(info.guest_addr), Some(i));
                }
                (Err(_), Err(_)) => {}
                (a, b) => panic!(
                    "block {i}: sequential {:?} but random {:?}",
                    a.map(|_| ()),
                    b.map(|_| ())
                ),
            }
            i += 1;
        }
        drop(seq);
        if reader.block_count() <= MAX_BLOCKS_READ {
            // The parallel path must agree with the checked random reads.
            let _ = reader.read_all_parallel(2, &|info, data| {
                let mut again = vec![0u8; info.len];
                match reader.read_block(info.index, &mut again) {
                    Ok(again) => assert_eq!(data, again, "block {} differs", info.index),
                    Err(err) => panic!(
                        "block {}: parallel read it, random read failed: {err}",
                        info.index
                    ),
                }
                Ok(())
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::source::ImageSource;
    use crate::checkpoint::writer::{write_checkpoint, WriterOptions};

    /// The bytes of a checkpoint of `image` with 4 KiB memory blocks and
    /// 8 KiB storage blocks.
    fn small_checkpoint(image: &[u8]) -> Vec<u8> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("c");
        let options = WriterOptions {
            memory_block_size: 4096,
            storage_block_size: 8192,
            level: 1,
            threads: 1,
        };
        write_checkpoint(&path, &ImageSource::flat(image), &options, &mut |_, _| {})
            .expect("writes");
        std::fs::read(&path).expect("reads")
    }

    #[test]
    fn repair_checksums_makes_a_patched_header_pass_its_checksum() {
        let mut bytes = small_checkpoint(&vec![1u8; 3 * 4096]);
        // Raise the storage block size: still valid once checksums agree.
        bytes[20..24].copy_from_slice(&16384u32.to_le_bytes());
        let open = |b: &[u8]| {
            let file = memory_file(b).expect("memfd");
            Reader::from_file(file, PathBuf::from("x"), ReaderOptions::default()).map(|_| ())
        };
        assert!(open(&bytes).is_err());
        assert!(repair_checksums(&mut bytes));
        open(&bytes).expect("opens after repair");
    }

    #[test]
    fn fuzz_body_accepts_garbage_empty_and_valid_inputs() {
        read_untrusted(&[]);
        read_untrusted(b"STASISCK");
        read_untrusted(&[0xff; 5000]);
        let mut image = vec![0u8; 8 * 4096];
        image[4096..8192].fill(3);
        image[9000] = 1;
        let valid = small_checkpoint(&image);
        read_untrusted(&valid);
        // A damaged length field behind a repaired checksum must still be
        // refused cleanly.
        let mut bad_count = valid.clone();
        bad_count[24] = 0xff;
        read_untrusted(&bad_count);
        for cut in [valid.len() - 1, valid.len() / 2, 4096, 60] {
            read_untrusted(&valid[..cut]);
        }
    }
}
