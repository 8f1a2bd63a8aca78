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

/// Feeds `data` to the reader as a checkpoint file; panics on a bug.
pub fn read_untrusted(data: &[u8]) {
    let Ok(file) = memory_file(data) else {
        return;
    };
    for cached in [ReaderOptions::default().cached_storage_blocks, 0] {
        let Ok(copy) = file.try_clone() else {
            return;
        };
        let options = ReaderOptions {
            cached_storage_blocks: cached,
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

    #[test]
    fn fuzz_body_accepts_garbage_empty_and_valid_inputs() {
        read_untrusted(&[]);
        read_untrusted(b"STASISCK");
        read_untrusted(&[0xff; 5000]);
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("c");
        let mut image = vec![0u8; 8 * 4096];
        image[4096..8192].fill(3);
        image[9000] = 1;
        let options = WriterOptions {
            memory_block_size: 4096,
            storage_block_size: 8192,
            level: 1,
            threads: 1,
        };
        write_checkpoint(&path, &ImageSource::flat(&image), &options, &mut |_, _| {})
            .expect("writes");
        let valid = std::fs::read(&path).expect("reads");
        read_untrusted(&valid);
        for cut in [valid.len() - 1, valid.len() / 2, 4096, 60] {
            read_untrusted(&valid[..cut]);
        }
    }
}
