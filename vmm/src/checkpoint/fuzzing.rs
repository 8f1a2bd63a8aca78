//! The body of the reader fuzz target (`fuzz/fuzz_targets/reader.rs`),
//! kept in the library so ordinary tests compile and run it on stable.
//!
//! It opens arbitrary bytes as a checkpoint and, when they open, reads
//! every block both at random and sequentially. Any panic is a bug; so is a
//! block that the two paths return differently, or an address that does
//! not map back to its block. An input that opens as a layered checkpoint
//! is also read as the top of a chain, on an all-zero parent of the same
//! geometry that its parent checksum is patched to name.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use super::format::{
    le_u32, le_u64, BlockEntry, BlockMap, Footer, Header, BLOCK_ENTRY_LEN, CRC_LEN, FOOTER_LEN,
    HEADER_FIXED_LEN, MAX_HEADER_LEN,
};
use super::reader::{Reader, ReaderOptions};
use super::source::{BlockHint, MemorySource, ReaderSource};
use super::BlockKind;

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
        check_reader(&reader);
        if let Ok(clone) = reader.try_clone() {
            assert_eq!(clone.block_count(), reader.block_count());
            assert_eq!(clone.index_crc(), reader.index_crc());
        }
        if reader.header().is_layered() {
            if let Some(chain) = on_zero_parent(data, &reader, options) {
                check_reader(&chain);
            }
        }
    }
}

/// Reads every block of `reader` (up to [`MAX_BLOCKS_READ`]) at random,
/// sequentially and in parallel, and panics if the paths disagree.
fn check_reader(reader: &Reader) {
    let _ = reader.summary();
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
                match info.kind {
                    BlockKind::Zero => {
                        assert!(data.iter().all(|&b| b == 0), "zero block {i} is not zero")
                    }
                    BlockKind::Parent => panic!("parent block {i} was read"),
                    BlockKind::Raw | BlockKind::Zstd => {
                        assert_eq!(info.checksum.of(data), info.crc, "block {i} passed a bad checksum")
                    }
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
        // A flatten source hints exactly the resolved zero blocks.
        let source = ReaderSource::new(reader);
        for i in 0..reader.block_count() {
            let Some(info) = reader.block_info(i) else {
                continue;
            };
            let region = reader
                .header()
                .regions
                .iter()
                .rposition(|r| r.guest_addr <= info.guest_addr)
                .expect("a block lies in a region");
            let offset = info.guest_addr - reader.header().regions[region].guest_addr;
            let hint = source.hint(region, offset, info.len);
            assert_eq!(hint == BlockHint::Zero, info.kind == BlockKind::Zero);
        }
    }
}

/// The bytes of a plain checkpoint of all-zero memory laid out as `header`
/// says (no storage blocks), or `None` if that would be large.
fn zero_checkpoint(header: &Header) -> Option<(Vec<u8>, u32)> {
    let plain = Header::new(
        header.memory_block_size,
        header.storage_block_size,
        header.regions.clone(),
    )
    .ok()?;
    let blocks = BlockMap::new(&plain.regions, plain.memory_block_size).block_count();
    if blocks > 4 * MAX_BLOCKS_READ {
        return None;
    }
    let mut bytes = plain.encode();
    bytes.resize(plain.data_offset() as usize, 0);
    let mut index = Vec::with_capacity(blocks * BLOCK_ENTRY_LEN);
    for _ in 0..blocks {
        BlockEntry::ZERO.encode_into(&mut index);
    }
    let footer = Footer {
        index_offset: plain.data_offset(),
        index_len: index.len() as u64,
        storage_blocks: 0,
        memory_blocks: blocks as u64,
        header_crc: plain.crc,
        index_crc: crc32c::crc32c(&index),
    };
    bytes.extend_from_slice(&index);
    bytes.extend_from_slice(&footer.encode());
    Some((bytes, footer.index_crc))
}

/// `data` (which opened as `layer`, a layered checkpoint) opened on top
/// of an all-zero parent of its geometry, its parent checksum patched to
/// name that parent; `None` when the chain does not open.
fn on_zero_parent(data: &[u8], layer: &Reader, options: ReaderOptions) -> Option<Reader> {
    let (base, base_crc) = zero_checkpoint(layer.header())?;
    let base = Reader::from_file(
        memory_file(&base).ok()?,
        PathBuf::from("zero-base"),
        options,
    )
    .expect("a zero checkpoint built here opens");
    let mut patched = data.to_vec();
    patched[40..48].copy_from_slice(&u64::from(base_crc).to_le_bytes());
    repair_checksums(&mut patched);
    let top = Reader::from_file(
        memory_file(&patched).ok()?,
        PathBuf::from("fuzz-layer"),
        options,
    )
    .ok()?;
    let chain = top
        .attach_parent(Arc::new(base))
        .expect("the patched layer names the zero parent and has its geometry");
    assert_eq!(chain.chain_depth(), 2);
    for i in 0..chain.block_count().min(MAX_BLOCKS_READ) {
        let info = chain.block_info(i).expect("block exists");
        assert_ne!(info.kind, BlockKind::Parent, "block {i} unresolved");
    }
    Some(chain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::BlockChecksum;
    use crate::checkpoint::source::{HintedSource, ImageSource};
    use crate::checkpoint::writer::{write_checkpoint, WriterOptions};

    /// The bytes of a checkpoint of `image` with 4 KiB memory blocks and
    /// 8 KiB storage blocks.
    fn small_checkpoint(image: &[u8]) -> Vec<u8> {
        small_layer(image, None)
    }

    /// The same, as a layer on top of `parent` (an index CRC) whose odd
    /// blocks are in the parent.
    fn small_layer(image: &[u8], parent: Option<u32>) -> Vec<u8> {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("c");
        let options = WriterOptions {
            memory_block_size: 4096,
            storage_block_size: 8192,
            level: 1,
            threads: 1,
            parent_index_crc: parent,
            // Seeds of both block checksums.
            checksum: if parent.is_some() { BlockChecksum::Xxh64 } else { BlockChecksum::Crc32c },
        };
        let source = HintedSource::new(ImageSource::flat(image), |_, offset| {
            if parent.is_some() && offset / 4096 % 2 == 1 {
                BlockHint::Parent
            } else {
                BlockHint::Read
            }
        });
        write_checkpoint(&path, &source, &options, &mut |_, _| {}).expect("writes");
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

    #[test]
    fn fuzz_body_reads_layered_inputs_alone_and_on_a_zero_parent() {
        let mut image = vec![0u8; 8 * 4096];
        image[4096..3 * 4096].fill(3);
        image[5 * 4096 + 9] = 1;
        let layer = small_layer(&image, Some(0x1234_5678));
        let opened = Reader::from_file(
            memory_file(&layer).expect("memfd"),
            PathBuf::from("x"),
            ReaderOptions::default(),
        )
        .expect("opens");
        assert_eq!(opened.summary().parent_blocks, 4);
        let chain = on_zero_parent(&layer, &opened, ReaderOptions::default()).expect("chain");
        let mut buf = vec![0u8; 4096];
        // Odd blocks come from the all-zero parent, even ones from the layer.
        assert!(chain
            .read_block(1, &mut buf)
            .expect("reads")
            .iter()
            .all(|&b| b == 0));
        assert_eq!(
            chain.read_block(2, &mut buf).expect("reads"),
            &image[8192..12288]
        );
        read_untrusted(&layer);
        for cut in [layer.len() - 1, layer.len() / 2] {
            read_untrusted(&layer[..cut]);
        }
        // A flag cleared behind a repaired checksum leaves parent entries
        // in a plain file: refused at open, never read.
        let mut unflagged = layer.clone();
        unflagged[28] = 0;
        assert!(repair_checksums(&mut unflagged));
        assert!(Reader::from_file(
            memory_file(&unflagged).expect("memfd"),
            PathBuf::from("x"),
            ReaderOptions::default()
        )
        .is_err());
        read_untrusted(&unflagged);
    }
}
