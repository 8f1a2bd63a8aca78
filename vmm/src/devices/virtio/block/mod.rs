//! virtio-blk (virtio 1.2, section 5.2): a raw disk image file as the
//! guest's block device, one request queue, modern interface only.
//!
//! The device serves each request synchronously on its thread, moving data
//! with `preadv`/`pwritev` straight between the file and guest memory
//! (`request.rs`). It keeps no queue state: the transport owns the queue,
//! so a reset forgets nothing and a snapshot needs only what must match
//! the disk at restore ([`BlockState`]).
//!
//! Configuration space (`struct virtio_blk_config`, little-endian):
//!
//! ```text
//! offset  field                       value
//!      0  capacity                    image size / 512
//!     12  seg_max                     queue size - 2
//!     20  blk_size                    512
//!     36  max_discard_sectors         MAX_DISCARD_SECTORS
//!     40  max_discard_seg             MAX_DISCARD_SEGMENTS
//!     44  discard_sector_alignment    8 (4 KiB)
//!     48  max_write_zeroes_sectors    MAX_DISCARD_SECTORS
//!     52  max_write_zeroes_seg        MAX_DISCARD_SEGMENTS
//!     56  write_zeroes_may_unmap      1
//! ```
//!
//! Everything else reads as zero, including anything past byte 60.

use std::io;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES,
};
use virtio_queue::{QueueOwnedT, QueueT};

use std::sync::Arc;

use self::changed::ChangedBlocks;
use self::image::{DiskImage, SECTOR_SIZE};
use super::{device_type, features, QueueContext, VirtioDevice, WarnLimiter};

pub mod changed;
pub mod image;
mod request;

/// The request queue's largest size.
pub const QUEUE_SIZE: u16 = 256;

/// The most sectors one discard or write-zeroes segment may cover (2 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 22;

/// The most segments one discard or write-zeroes request may carry.
pub const MAX_DISCARD_SEGMENTS: u32 = 32;

/// Discard alignment the guest is told, in sectors (4 KiB).
const DISCARD_SECTOR_ALIGNMENT: u32 = 8;

/// The serial number's largest length (`VIRTIO_BLK_ID_BYTES`).
pub const SERIAL_MAX_LEN: usize = VIRTIO_BLK_ID_BYTES as usize;

/// The length of the configuration space stasis fills in.
const CONFIG_SIZE: usize = 60;

/// How many times in a row the serving loop may find the ring claiming
/// more chains than it can pop before it gives up (a broken avail index).
const MAX_EMPTY_PASSES: u32 = 2;

/// Why a block device could not be rebuilt from a snapshot.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlockError {
    /// The image's size differs from the snapshot's disk.
    #[error("disk image {path} has {image_sectors} sectors but the snapshot's disk had {saved_sectors}")]
    CapacityMismatch {
        /// The image.
        path: String,
        /// Its capacity now.
        image_sectors: u64,
        /// The capacity saved in the snapshot.
        saved_sectors: u64,
    },
    /// The image is read-only and the snapshot's disk was not, or the
    /// other way round.
    #[error("disk image {path} is {} but the snapshot's disk was {}", mode(*.image_read_only), mode(!*.image_read_only))]
    ReadOnlyMismatch {
        /// The image.
        path: String,
        /// Whether the image is open read-only.
        image_read_only: bool,
    },
    /// The saved serial number is longer than a virtio-blk ID.
    #[error("saved disk serial is {0} bytes, more than 20")]
    SerialTooLong(usize),
}

fn mode(read_only: bool) -> &'static str {
    if read_only {
        "read-only"
    } else {
        "writable"
    }
}

/// virtio-blk state saved in a snapshot: what the disk at restore must
/// match. The queue is saved by the transport.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Whether the guest saw a read-only disk.
    pub read_only: bool,
    /// The serial number GET_ID answers.
    pub serial: String,
}

/// A virtio-blk device over a disk image.
pub struct Block {
    image: DiskImage,
    serial: String,
    /// The GET_ID answer: the serial, NUL-padded to 20 bytes.
    id: [u8; SERIAL_MAX_LEN],
    config: [u8; CONFIG_SIZE],
    queue_max_sizes: [u16; 1],
    warn: WarnLimiter,
    /// Blocks the guest changed, for incremental backups.
    changed: Arc<ChangedBlocks>,
}

impl Block {
    /// A device serving `image`, answering GET_ID with `serial`, cut to
    /// its first 20 bytes (at a character boundary) if longer.
    pub fn new(image: DiskImage, serial: String) -> Block {
        let serial = if serial.len() > SERIAL_MAX_LEN {
            let mut end = SERIAL_MAX_LEN;
            while !serial.is_char_boundary(end) {
                end -= 1;
            }
            log::warn!("disk serial {serial:?} is longer than 20 bytes; using {:?}", &serial[..end]);
            serial[..end].to_string()
        } else {
            serial
        };
        let mut id = [0u8; SERIAL_MAX_LEN];
        id[..serial.len()].copy_from_slice(serial.as_bytes());
        let config = config_space(image.size() / SECTOR_SIZE);
        let changed = Arc::new(ChangedBlocks::new(image.size()));
        Block { image, serial, id, config, queue_max_sizes: [QUEUE_SIZE], warn: WarnLimiter::new(), changed }
    }

    /// The device a snapshot saved, over `image`, which must have the saved
    /// capacity and read-only flag.
    pub fn from_state(image: DiskImage, state: &BlockState) -> Result<Block, BlockError> {
        let path = image.path().display().to_string();
        let image_sectors = image.size() / SECTOR_SIZE;
        if image_sectors != state.capacity_sectors {
            return Err(BlockError::CapacityMismatch { path, image_sectors, saved_sectors: state.capacity_sectors });
        }
        if image.read_only() != state.read_only {
            return Err(BlockError::ReadOnlyMismatch { path, image_read_only: image.read_only() });
        }
        if state.serial.len() > SERIAL_MAX_LEN {
            return Err(BlockError::SerialTooLong(state.serial.len()));
        }
        Ok(Block::new(image, state.serial.clone()))
    }

    /// The disk image the device serves.
    pub fn image(&self) -> &DiskImage {
        &self.image
    }

    /// The blocks the guest changed (shared with the VMM's backups).
    pub fn changed(&self) -> &Arc<ChangedBlocks> {
        &self.changed
    }

    /// The serial number GET_ID answers.
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// Capacity in sectors.
    fn capacity(&self) -> u64 {
        self.image.size() / SECTOR_SIZE
    }
}

fn config_space(capacity_sectors: u64) -> [u8; CONFIG_SIZE] {
    let mut config = [0u8; CONFIG_SIZE];
    let mut put = |offset: usize, bytes: &[u8]| {
        config[offset..offset + bytes.len()].copy_from_slice(bytes);
    };
    put(0, &capacity_sectors.to_le_bytes());
    put(12, &u32::from(QUEUE_SIZE - 2).to_le_bytes());
    put(20, &(SECTOR_SIZE as u32).to_le_bytes());
    put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(40, &MAX_DISCARD_SEGMENTS.to_le_bytes());
    put(44, &DISCARD_SECTOR_ALIGNMENT.to_le_bytes());
    put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
    put(52, &MAX_DISCARD_SEGMENTS.to_le_bytes());
    put(56, &[1]);
    config
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn features(&self) -> u64 {
        let mut offered = features::VERSION_1
            | features::RING_EVENT_IDX
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE);
        if self.image.read_only() {
            offered |= 1 << VIRTIO_BLK_F_RO;
        } else {
            offered |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        offered
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = offset
                .checked_add(i as u64)
                .and_then(|at| usize::try_from(at).ok())
                .and_then(|at| self.config.get(at))
                .copied()
                .unwrap_or(0);
        }
    }

    fn reset(&mut self) {
        // Nothing to forget: the queue lives in the transport and requests
        // complete before process_queue returns.
    }

    fn process_queue(&mut self, index: usize, ctx: &mut QueueContext<'_>) {
        if index != 0 {
            self.warn.warn(format_args!("virtio-blk: notification for queue {index}, which does not exist"));
            return;
        }
        let mem = ctx.mem;
        let Some(queue) = ctx.queues.get_mut(0) else { return };
        let mut used_any = false;
        let mut empty_passes = 0;
        // With EVENT_IDX the driver does not notify again for chains it adds
        // while the device has notifications off: drain, turn them back on,
        // and look once more for chains added in between.
        loop {
            if let Err(e) = queue.disable_notification(mem) {
                self.warn.warn(format_args!("virtio-blk: cannot disable queue notifications: {e}"));
                break;
            }
            let mut served = 0u32;
            let mut broken = false;
            loop {
                // Through `iter` rather than `pop_descriptor_chain`, which
                // logs a broken avail index at error level on every call.
                let chain = match queue.iter(mem) {
                    Ok(mut avail) => avail.next(),
                    Err(e) => {
                        self.warn.warn(format_args!("virtio-blk: cannot read the avail ring: {e}"));
                        broken = true;
                        None
                    }
                };
                let Some(chain) = chain else { break };
                let head = chain.head_index();
                let len = self.serve_chain(mem, chain);
                if let Err(e) = queue.add_used(mem, head, len) {
                    self.warn.warn(format_args!("virtio-blk: cannot return chain {head}: {e}"));
                }
                served += 1;
                used_any = true;
            }
            let more = queue.enable_notification(mem);
            if broken {
                // The driver must fix its ring (or reset); serving resumes
                // at its next notification.
                break;
            }
            match more {
                Ok(false) => break,
                Ok(true) if served > 0 => empty_passes = 0,
                Ok(true) => {
                    empty_passes += 1;
                    if empty_passes >= MAX_EMPTY_PASSES {
                        self.warn
                            .warn(format_args!("virtio-blk: the avail ring's index is invalid; queue left as it is"));
                        break;
                    }
                }
                Err(e) => {
                    self.warn.warn(format_args!("virtio-blk: cannot enable queue notifications: {e}"));
                    break;
                }
            }
        }
        if used_any {
            ctx.notify_used(0);
        }
    }

    fn prepare_snapshot(&mut self) -> io::Result<()> {
        self.image.file().sync_data()
    }

    fn state(&self) -> super::DeviceState {
        super::DeviceState::Block(BlockState {
            capacity_sectors: self.capacity(),
            read_only: self.image.read_only(),
            serial: self.serial.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::Ordering;

    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
        VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    };
    use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress};
    use crate::vstate::memory::GuestMemoryMmap;

    use super::*;
    use crate::devices::virtio::test_utils::counting_interrupt;
    use crate::devices::virtio::DeviceState;

    const MEM_SIZE: usize = 4 << 20;
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x11_0000;
    const STATUS: u64 = 0x30_0000;
    const SECTORS: u64 = 64;

    /// One descriptor of a test chain.
    #[derive(Clone, Copy)]
    struct D {
        addr: u64,
        len: u32,
        write: bool,
    }

    fn r(addr: u64, len: u32) -> D {
        D { addr, len, write: false }
    }

    fn w(addr: u64, len: u32) -> D {
        D { addr, len, write: true }
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory")
    }

    /// A disk whose byte i is `pattern(i)`.
    fn pattern(i: u64) -> u8 {
        (i % 251) as u8 ^ (i / 512) as u8
    }

    fn disk_file(dir: &tempfile::TempDir) -> PathBuf {
        let path = dir.path().join("disk.img");
        let content: Vec<u8> = (0..SECTORS * 512).map(pattern).collect();
        std::fs::write(&path, content).expect("write disk");
        path
    }

    fn block_at(path: &Path, read_only: bool) -> Block {
        Block::new(DiskImage::open(path, read_only).expect("open disk"), "stasis-disk-0".into())
    }

    fn header(mem: &GuestMemoryMmap, request_type: u32, sector: u64) {
        let mut bytes = [0u8; 16];
        bytes[0..4].copy_from_slice(&request_type.to_le_bytes());
        bytes[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&bytes, GuestAddress(HDR)).expect("header");
        mem.write_obj(0xeeu8, GuestAddress(STATUS)).expect("status");
    }

    fn raw_chain(descs: &[D]) -> Vec<RawDescriptor> {
        descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let mut flags = 0;
                if d.write {
                    flags |= VRING_DESC_F_WRITE;
                }
                if i + 1 < descs.len() {
                    flags |= VRING_DESC_F_NEXT;
                }
                RawDescriptor::from(SplitDescriptor::new(d.addr, d.len, flags as u16, (i + 1) as u16))
            })
            .collect()
    }

    /// What the device did with the chains of one notification.
    struct Outcome {
        used: Vec<(u32, u32)>,
        interrupts: u64,
    }

    /// Puts raw descriptors into a fresh queue (chains split where NEXT is
    /// clear), lets the device serve it once, and reads the used ring.
    fn serve_raw(block: &mut Block, mem: &GuestMemoryMmap, raw: &[RawDescriptor], event_idx: bool) -> Outcome {
        let vq = MockSplitQueue::new(mem, 16);
        vq.add_desc_chains(raw, 0).expect("chains");
        let mut queue: Queue = vq.create_queue().expect("queue");
        queue.set_event_idx(event_idx);
        let (irq, count) = counting_interrupt();
        let mut ctx = QueueContext {
            mem,
            queues: std::slice::from_mut(&mut queue),
            acked_features: block.features(),
            interrupt: &irq,
        };
        block.process_queue(0, &mut ctx);
        let used_idx = vq.used().idx().load();
        let used = (0..used_idx)
            .map(|i| {
                let elem = vq.used().ring().ref_at(usize::from(i)).expect("used elem").load();
                (elem.id(), elem.len())
            })
            .collect();
        Outcome { used, interrupts: count.load(Ordering::SeqCst) }
    }

    /// Serves one chain; the used length, or None when nothing was used.
    fn serve(block: &mut Block, mem: &GuestMemoryMmap, descs: &[D]) -> Option<u32> {
        let outcome = serve_raw(block, mem, &raw_chain(descs), false);
        assert!(outcome.used.len() <= 1);
        outcome.used.first().map(|&(_, len)| len)
    }

    fn status(mem: &GuestMemoryMmap) -> u32 {
        u32::from(mem.read_obj::<u8>(GuestAddress(STATUS)).expect("status"))
    }

    fn guest_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).expect("guest bytes");
        buf
    }

    fn file_bytes(path: &Path, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        std::fs::File::open(path).expect("open").read_exact_at(&mut buf, offset).expect("read");
        buf
    }

    fn expected(offset: u64, len: usize) -> Vec<u8> {
        (offset..offset + len as u64).map(pattern).collect()
    }

    struct Setup {
        _dir: tempfile::TempDir,
        path: PathBuf,
        mem: GuestMemoryMmap,
        block: Block,
    }

    fn setup(read_only: bool) -> Setup {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = disk_file(&dir);
        let block = block_at(&path, read_only);
        Setup { _dir: dir, path, mem: memory(), block }
    }

    // ---- device surface ----

    #[test]
    fn device_type_and_queue_size() {
        let s = setup(false);
        assert_eq!(s.block.device_type(), device_type::BLOCK);
        assert_eq!(s.block.queue_max_sizes(), &[256]);
    }

    #[test]
    fn writable_disk_offers_discard_and_write_zeroes_not_ro() {
        let s = setup(false);
        let f = s.block.features();
        assert_ne!(f & features::VERSION_1, 0);
        assert_ne!(f & features::RING_EVENT_IDX, 0);
        for bit in [
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ] {
            assert_ne!(f & (1 << bit), 0, "bit {bit}");
        }
        assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
    }

    #[test]
    fn read_only_disk_offers_ro_and_no_discard() {
        let s = setup(true);
        let f = s.block.features();
        assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(f & ((1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES)), 0);
    }

    fn expected_config() -> Vec<u8> {
        let mut c = vec![0u8; 80];
        c[0..8].copy_from_slice(&SECTORS.to_le_bytes());
        c[12..16].copy_from_slice(&254u32.to_le_bytes());
        c[20..24].copy_from_slice(&512u32.to_le_bytes());
        c[36..40].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[40..44].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
        c[44..48].copy_from_slice(&8u32.to_le_bytes());
        c[48..52].copy_from_slice(&MAX_DISCARD_SECTORS.to_le_bytes());
        c[52..56].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
        c[56] = 1;
        c
    }

    #[test]
    fn config_reads_match_the_layout_at_every_offset_and_width() {
        let s = setup(false);
        let want = expected_config();
        for width in [1usize, 2, 4, 8] {
            for offset in 0..=(want.len() - width) {
                let mut data = vec![0xffu8; width];
                s.block.read_config(offset as u64, &mut data);
                assert_eq!(data, want[offset..offset + width], "offset {offset} width {width}");
            }
        }
    }

    #[test]
    fn config_reads_far_outside_are_zero_and_do_not_panic() {
        let s = setup(false);
        for offset in [60u64, 1000, 4096, u64::MAX - 3, u64::MAX] {
            let mut data = [0xffu8; 8];
            s.block.read_config(offset, &mut data);
            assert_eq!(data, [0; 8], "offset {offset}");
        }
        let mut big = vec![0xffu8; 300];
        s.block.read_config(0, &mut big);
        assert_eq!(&big[..80], &expected_config()[..]);
        assert!(big[80..].iter().all(|&b| b == 0));
    }

    #[test]
    fn state_holds_capacity_read_only_and_serial() {
        let s = setup(true);
        let DeviceState::Block(state) = s.block.state() else { panic!("not a block state") };
        assert_eq!(state, BlockState { capacity_sectors: SECTORS, read_only: true, serial: "stasis-disk-0".into() });
    }

    #[test]
    fn from_state_round_trips_through_serde() {
        let s = setup(false);
        let DeviceState::Block(state) = s.block.state() else { panic!("not a block state") };
        let json = serde_json::to_string(&state).expect("json");
        let state: BlockState = serde_json::from_str(&json).expect("from json");
        let path = s.path.clone();
        drop(s.block);
        let image = DiskImage::open(&path, false).expect("reopen");
        let restored = Block::from_state(image, &state).expect("from_state");
        assert_eq!(restored.serial(), "stasis-disk-0");
        assert_eq!(restored.state(), DeviceState::Block(state));
    }

    #[test]
    fn from_state_refuses_a_different_size() {
        let s = setup(false);
        let state = BlockState { capacity_sectors: SECTORS + 1, read_only: false, serial: String::new() };
        drop(s.block);
        let err = Block::from_state(DiskImage::open(&s.path, false).expect("open"), &state).err().expect("refused");
        assert!(matches!(err, BlockError::CapacityMismatch { image_sectors: SECTORS, .. }), "{err}");
        assert!(err.to_string().contains("disk.img"), "{err}");
    }

    #[test]
    fn from_state_refuses_a_different_read_only_flag() {
        let s = setup(true);
        let state = BlockState { capacity_sectors: SECTORS, read_only: false, serial: String::new() };
        drop(s.block);
        let err = Block::from_state(DiskImage::open(&s.path, true).expect("open"), &state).err().expect("refused");
        assert_eq!(
            err.to_string(),
            format!("disk image {} is read-only but the snapshot's disk was writable", s.path.display())
        );
    }

    #[test]
    fn from_state_refuses_a_serial_longer_than_20_bytes() {
        let s = setup(false);
        let state = BlockState { capacity_sectors: SECTORS, read_only: false, serial: "x".repeat(21) };
        drop(s.block);
        let err = Block::from_state(DiskImage::open(&s.path, false).expect("open"), &state).err().expect("refused");
        assert_eq!(err, BlockError::SerialTooLong(21));
    }

    #[test]
    fn long_serial_is_cut_to_20_bytes_at_a_char_boundary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = disk_file(&dir);
        let block = Block::new(DiskImage::open(&path, false).expect("open"), format!("{}é", "a".repeat(19)));
        assert_eq!(block.serial(), "a".repeat(19));
    }

    #[test]
    fn prepare_snapshot_syncs_the_file() {
        let mut s = setup(false);
        s.block.prepare_snapshot().expect("fdatasync");
    }

    // ---- requests ----

    #[test]
    fn read_returns_disk_content_and_reports_data_plus_status() {
        let mut s = setup(false);
        header(&s.mem, VIRTIO_BLK_T_IN, 3);
        let used = serve(&mut s.block, &s.mem, &[r(HDR, 16), w(DATA, 1024), w(STATUS, 1)]);
        assert_eq!(used, Some(1025));
        assert_eq!(status(&s.mem), VIRTIO_BLK_S_OK);
        assert_eq!(guest_bytes(&s.mem, DATA, 1024), expected(3 * 512, 1024));
    }

    #[test]
    fn read_scatters_over_many_descriptors_with_a_split_header() {
        let mut s = setup(false);
        header(&s.mem, VIRTIO_BLK_T_IN, 1);
        // Header in two pieces; data in odd-sized pieces; status shares the
        // last data descriptor.
        let chain = [
            r(HDR, 5),
            r(HDR + 5, 11),
            w(DATA, 100),
            w(DATA + 0x1000, 412),
            w(DATA + 0x2000, 1),
            w(DATA + 0x3000, 511),
            w(STATUS - 512, 513),
        ];
        let used = serve(&mut s.block, &s.mem, &chain);
        assert_eq!(used, Some(1537));
        assert_eq!(status(&s.mem), VIRTIO_BLK_S_OK);
        let mut got = guest_bytes(&s.mem, DATA, 100);
        got.extend(guest_bytes(&s.mem, DATA + 0x1000, 412));
        got.extend(guest_bytes(&s.mem, DATA + 0x2000, 1));
        got.extend(guest_bytes(&s.mem, DATA + 0x3000, 511));
        got.extend(guest_bytes(&s.mem, STATUS - 512, 512));
        assert_eq!(got, expected(512, 1536));
    }

    #[test]
    fn write_lands_in_the_file_and_reads_back() {
        let mut s = setup(false);
        let data: Vec<u8> = (0..1536u32).map(|i| (i * 7) as u8).collect();
        s.mem.write_slice(&data, GuestAddress(DATA)).expect("data");
        header(&s.mem, VIRTIO_BLK_T_OUT, 10);
        let used = serve(&mut s.block, &s.mem, &[r(HDR, 16), r(DATA, 1000), r(DATA + 1000, 536), w(STATUS, 1)]);
        assert_eq!(used, Some(1));
        assert_eq!(status(&s.mem), VIRTIO_BLK_S_OK);
        assert_eq!(file_bytes(&s.path, 10 * 512, 1536), data);
        assert_eq!(file_bytes(&s.path, 9 * 512, 512), expected(9 * 512, 512));

        header(&s.mem, VIRTIO_BLK_T_IN, 10);
        let back = DATA + 0x10_0000;
        assert_eq!(serve(&mut s.block, &s.mem, &[r(HDR, 16), w(back, 1536), w(STATUS, 1)]), Some(1537));
        assert_eq!(guest_bytes(&s.mem, back, 1536), data);
    }

    #[test]
    fn read_of_the_last_sector_succeeds() {
        let mut s = setup(false);
        header(&s.mem, VIRTIO_BLK_T_IN, SECTORS - 1);
        assert_eq!(serve(&mut s.block, &s.mem, &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]), Some(513));
        assert_eq!(status(&s.mem), VIRTIO_BLK_S_OK);
        assert_eq!(guest_bytes(&s.mem, DATA, 512), expected((SECTORS - 1) * 512, 512));
    }

    #[test]
    fn flush_succeeds() {
        let mut s = setup(false);
        header(&s.mem, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(serve(&mut s.block, &s.mem, &[r(HDR, 16), w(STATUS, 1)]), Some(1));
        assert_eq!(status(&s.mem), VIRTIO_BLK_S_OK);
    }

    #[test]
    fn flush_on_a_read_only_disk_succeeds() {
        let mut s = setup(true);
        header(&s.mem, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(serve(&mut s.block, &s.mem, &[r(HDR, 16), w(STATUS, 1)]), Some(1));
        assert_eq!(status(&s.mem), VIRTIO_BLK_S_OK);
    }

    #[test]
    fn get_id_answers_the_serial_nul_padded() {
        let mut s = setup(false);
        s.mem.write_slice(&[0xffu8; 32], GuestAddress(DATA)).expect("fill");
        header(&s.mem, VIRTIO_BLK_T_GET_ID, 0);
        assert_eq!(serve(&mut s.block, &s.mem, &[r(HDR, 16), w(DATA, 32), w(STATUS, 1)]), Some(21));
        assert_eq!(status(&s.mem), VIRTIO_BLK_S_OK);
        let mut want = b"stasis-disk-0".to_vec();
        want.resize(20, 0);
        want.extend([0xff; 12]);
        assert_eq!(guest_bytes(&s.mem, DATA, 32), want);
    }

    #[test]
    fn get_id_of_exactly_20_bytes_has_no_nul() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = disk_file(&dir);
        let mem = memory();
        let mut block = Block::new(DiskImage::open(&path, false).expect("open"), "0123456789abcdefghij".into());
        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        assert_eq!(serve(&mut block, &mem, &[r(HDR, 16), w(DATA, 20), w(STATUS, 1)]), Some(21));
        assert_eq!(guest_bytes(&mem, DATA, 20), b"0123456789abcdefghij");
    }

    #[test]
    fn get_id_with_a_buffer_shorter_than_20_is_ioerr() {
        let mut s = setup(false);
        header(&s.mem, VIRTIO_BLK_T_GET_ID, 0);
        assert_eq!(serve(&mut s.block, &s.mem, &[r(HDR, 16), w(DATA, 19), w(STATUS, 1)]), Some(1));
        assert_eq!(status(&s.mem), VIRTIO_BLK_S_IOERR);
    }

    fn segment(mem: &GuestMemoryMmap, index: u64, sector: u64, num_sectors: u32, flags: u32) {
        let mut bytes = [0u8; 16];
        bytes[0..8].copy_from_slice(&sector.to_le_bytes());
        bytes[8..12].copy_from_slice(&num_sectors.to_le_bytes());
        bytes[12..16].copy_from_slice(&flags.to_le_bytes());
        mem.write_slice(&bytes, GuestAddress(DATA + 16 * index)).expect("segment");
    }

    fn discard_like_zeroes_ranges(request_type: u32, flags: u32) {
        let mut s = setup(false);
        segment(&s.mem, 0, 2, 3, flags);
        segment(&s.mem, 1, 20, 1, flags);
        header(&s.mem, request_type, 0);
        assert_eq!(serve(&mut s.block, &s.mem, &[r(HDR, 16), r(DATA, 32), w(STATUS, 1)]), Some(1));
        assert_eq!(status(&s.mem), VIRTIO_BLK_S_OK);
        assert_eq!(file_bytes(&s.path, 512, 512), expected(512, 512));
        assert_eq!(file_bytes(&s.path, 2 * 512, 3 * 512), vec![0u8; 3 * 512]);
        assert_eq!(file_bytes(&s.path, 5 * 512, 512), expected(5 * 512, 512));
        assert_eq!(file_bytes(&s.path, 20 * 512, 512), vec![0u8; 512]);
        assert_eq!(file_bytes(&s.path, 21 * 512, 512), expected(21 * 512, 512));
        assert_eq!(std::fs::metadata(&s.path).expect("metadata").len(), SECTORS * 512);
    }

    #[test]
    fn discard_leaves_the_ranges_reading_zero() {
        discard_like_zeroes_ranges(VIRTIO_BLK_T_DISCARD, 0);
    }

    #[test]
    fn write_zeroes_leaves_the_ranges_reading_zero() {
        discard_like_zeroes_ranges(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    }

    #[test]
    fn write_zeroes_with_unmap_leaves_the_ranges_reading_zero() {
        discard_like_zeroes_ranges(VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    }

    #[test]
    fn discard_with_the_unmap_flag_is_unsupported() {
        let mut s = setup(false);
        segment(&s.mem, 0, 2, 3, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        header(&s.mem, VIRTIO_BLK_T_DISCARD, 0);
        assert_eq!(serve(&mut s.block, &s.mem, &[r(HDR, 16), r(DATA, 16), w(STATUS, 1)]), Some(1));
        assert_eq!(status(&s.mem), VIRTIO_BLK_S_UNSUPP);
        assert_eq!(file_bytes(&s.path, 2 * 512, 512), expected(2 * 512, 512));
    }

    #[test]
    fn discard_with_reserved_flags_is_unsupported_and_changes_nothing() {
        let mut s = setup(false);
        segment(&s.mem, 0, 2, 3, 0);
        segment(&s.mem, 1, 8, 3, 0x4);
        header(&s.mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        assert_eq!(serve(&mut s.block, &s.mem, &[r(HDR, 16), r(DATA, 32), w(STATUS, 1)]), Some(1));
        assert_eq!(status(&s.mem), VIRTIO_BLK_S_UNSUPP);
        assert_eq!(file_bytes(&s.path, 2 * 512, 512), expected(2 * 512, 512));
    }

    #[test]
    fn malformed_discard_segments_are_ioerr_and_change_nothing() {
        type WriteSegments = fn(&GuestMemoryMmap);
        let cases: [(&str, u32, WriteSegments); 6] = [
            ("not a multiple of 16", 24, |m| segment(m, 0, 2, 1, 0)),
            ("no segment", 0, |_| {}),
            ("too many segments", 16 * (MAX_DISCARD_SEGMENTS + 1), |m| {
                for i in 0..u64::from(MAX_DISCARD_SEGMENTS) + 1 {
                    segment(m, i, 2, 1, 0);
                }
            }),
            ("beyond capacity", 16, |m| segment(m, 0, SECTORS - 1, 2, 0)),
            ("sector overflows", 16, |m| segment(m, 0, u64::MAX - 1, 4, 0)),
            ("too many sectors", 16, |m| segment(m, 0, 0, MAX_DISCARD_SECTORS + 1, 0)),
        ];
        for (what, len, write_segments) in cases {
            let mut s = setup(false);
            segment(&s.mem, 0, 1, 1, 0); // would be valid if the request were
            write_segments(&s.mem);
            for request_type in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
                header(&s.mem, request_type, 0);
                let mut chain = vec![r(HDR, 16)];
                if len > 0 {
                    chain.push(r(DATA, len));
                }
                chain.push(w(STATUS, 1));
                assert_eq!(serve(&mut s.block, &s.mem, &chain), Some(1), "{what}");
                assert_eq!(status(&s.mem), VIRTIO_BLK_S_IOERR, "{what}");
            }
            assert_eq!(file_bytes(&s.path, 0, 4 * 512), expected(0, 4 * 512), "{what}");
        }
    }

    #[test]
    fn writes_to_a_read_only_disk_are_ioerr_and_leave_the_file_unchanged() {
        let mut s = setup(true);
        s.mem.write_slice(&[0x11u8; 512], GuestAddress(DATA + 0x1000)).expect("data");
        segment(&s.mem, 0, 0, 4, 0);
        for (request_type, data) in [
            (VIRTIO_BLK_T_OUT, r(DATA + 0x1000, 512)),
            (VIRTIO_BLK_T_DISCARD, r(DATA, 16)),
            (VIRTIO_BLK_T_WRITE_ZEROES, r(DATA, 16)),
        ] {
            header(&s.mem, request_type, 0);
            assert_eq!(serve(&mut s.block, &s.mem, &[r(HDR, 16), data, w(STATUS, 1)]), Some(1));
            assert_eq!(status(&s.mem), VIRTIO_BLK_S_IOERR, "type {request_type}");
        }
        assert_eq!(file_bytes(&s.path, 0, 4 * 512), expected(0, 4 * 512));
    }

    #[test]
    fn unknown_request_type_is_unsupported() {
        let mut s = setup(false);
        for request_type in [2u32, 5, 14, 0x8000_0000, u32::MAX] {
            header(&s.mem, request_type, 0);
            assert_eq!(serve(&mut s.block, &s.mem, &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]), Some(1));
            assert_eq!(status(&s.mem), VIRTIO_BLK_S_UNSUPP, "type {request_type}");
        }
    }

    // ---- hostile chains ----

    #[test]
    fn header_shorter_than_16_bytes_is_ioerr() {
        let mut s = setup(false);
        header(&s.mem, VIRTIO_BLK_T_IN, 0);
        assert_eq!(serve(&mut s.block, &s.mem, &[r(HDR, 15), w(DATA, 512), w(STATUS, 1)]), Some(1));
        assert_eq!(status(&s.mem), VIRTIO_BLK_S_IOERR);
        header(&s.mem, VIRTIO_BLK_T_IN, 0);
        assert_eq!(serve(&mut s.block, &s.mem, &[w(DATA, 512), w(STATUS, 1)]), Some(1));
        assert_eq!(status(&s.mem), VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn chain_without_a_writable_byte_is_dropped() {
        let mut s = setup(false);
        header(&s.mem, VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(serve(&mut s.block, &s.mem, &[r(HDR, 16)]), Some(0));
        assert_eq!(serve(&mut s.block, &s.mem, &[r(HDR, 16), r(STATUS, 1)]), Some(0));
        assert_eq!(serve(&mut s.block, &s.mem, &[r(HDR, 16), w(STATUS, 0)]), Some(0));
        assert_eq!(status(&s.mem), 0xee, "nothing written");
    }

    #[test]
    fn readable_status_after_writable_data_fails_in_the_last_writable_byte() {
        let mut s = setup(false);
        header(&s.mem, VIRTIO_BLK_T_IN, 0);
        s.mem.write_slice(&[0xeeu8; 512], GuestAddress(DATA)).expect("fill");
        assert_eq!(serve(&mut s.block, &s.mem, &[r(HDR, 16), w(DATA, 512), r(STATUS, 1)]), Some(1));
        assert_eq!(s.mem.read_obj::<u8>(GuestAddress(DATA + 511)).expect("byte"), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(status(&s.mem), 0xee);
    }

    #[test]
    fn data_in_the_wrong_direction_is_ioerr() {
        let mut s = setup(false);
        let cases = [
            (VIRTIO_BLK_T_IN, vec![r(HDR, 16), r(DATA, 512), w(STATUS, 1)]),
            (VIRTIO_BLK_T_IN, vec![r(HDR, 16), r(DATA, 512), w(DATA + 0x1000, 512), w(STATUS, 1)]),
            (VIRTIO_BLK_T_OUT, vec![r(HDR, 16), w(DATA, 512), w(STATUS, 1)]),
            (VIRTIO_BLK_T_OUT, vec![r(HDR, 16), r(DATA, 512), w(DATA + 0x1000, 512), w(STATUS, 1)]),
            (VIRTIO_BLK_T_FLUSH, vec![r(HDR, 16), w(DATA, 512), w(STATUS, 1)]),
            (VIRTIO_BLK_T_GET_ID, vec![r(HDR, 16), r(DATA, 32), w(STATUS, 1)]),
            (VIRTIO_BLK_T_DISCARD, vec![r(HDR, 16), w(DATA, 16), w(STATUS, 1)]),
        ];
        for (request_type, chain) in cases {
            header(&s.mem, request_type, 0);
            assert_eq!(serve(&mut s.block, &s.mem, &chain), Some(1), "type {request_type}");
            assert_eq!(status(&s.mem), VIRTIO_BLK_S_IOERR, "type {request_type}");
        }
        assert_eq!(file_bytes(&s.path, 0, 512), expected(0, 512));
    }

    #[test]
    fn readable_descriptor_after_a_writable_one_is_ioerr() {
        let mut s = setup(false);
        header(&s.mem, VIRTIO_BLK_T_IN, 0);
        assert_eq!(serve(&mut s.block, &s.mem, &[w(DATA, 512), r(HDR, 16), w(STATUS, 1)]), Some(1));
        assert_eq!(status(&s.mem), VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn sector_beyond_capacity_is_ioerr() {
        let mut s = setup(false);
        for (request_type, sector, data) in [
            (VIRTIO_BLK_T_IN, SECTORS, w(DATA, 512)),
            (VIRTIO_BLK_T_IN, SECTORS - 1, w(DATA, 1024)),
            (VIRTIO_BLK_T_OUT, SECTORS, r(DATA, 512)),
            (VIRTIO_BLK_T_OUT, SECTORS - 1, r(DATA, 1024)),
        ] {
            header(&s.mem, request_type, sector);
            assert_eq!(serve(&mut s.block, &s.mem, &[r(HDR, 16), data, w(STATUS, 1)]), Some(1));
            assert_eq!(status(&s.mem), VIRTIO_BLK_S_IOERR, "sector {sector}");
        }
        assert_eq!(std::fs::metadata(&s.path).expect("metadata").len(), SECTORS * 512);
    }

    #[test]
    fn sector_plus_length_overflowing_u64_is_ioerr() {
        let mut s = setup(false);
        for sector in [u64::MAX, u64::MAX / 512, u64::MAX / 512 - 1, 1 << 55] {
            for (request_type, data) in [(VIRTIO_BLK_T_IN, w(DATA, 1024)), (VIRTIO_BLK_T_OUT, r(DATA, 1024))] {
                header(&s.mem, request_type, sector);
                assert_eq!(serve(&mut s.block, &s.mem, &[r(HDR, 16), data, w(STATUS, 1)]), Some(1));
                assert_eq!(status(&s.mem), VIRTIO_BLK_S_IOERR, "sector {sector}");
            }
        }
    }

    #[test]
    fn length_not_a_multiple_of_512_is_ioerr() {
        let mut s = setup(false);
        for (request_type, data) in [(VIRTIO_BLK_T_IN, w(DATA, 511)), (VIRTIO_BLK_T_OUT, r(DATA, 513))] {
            header(&s.mem, request_type, 0);
            assert_eq!(serve(&mut s.block, &s.mem, &[r(HDR, 16), data, w(STATUS, 1)]), Some(1));
            assert_eq!(status(&s.mem), VIRTIO_BLK_S_IOERR);
        }
        assert_eq!(file_bytes(&s.path, 0, 1024), expected(0, 1024));
    }

    #[test]
    fn data_outside_guest_memory_is_ioerr() {
        let mut s = setup(false);
        let outside = MEM_SIZE as u64;
        for (request_type, data) in [
            (VIRTIO_BLK_T_IN, w(outside, 512)),
            (VIRTIO_BLK_T_IN, w(outside - 256, 512)),
            (VIRTIO_BLK_T_IN, w(u64::MAX - 100, 512)),
            (VIRTIO_BLK_T_OUT, r(outside - 256, 512)),
            (VIRTIO_BLK_T_OUT, r(u64::MAX, 512)),
            (VIRTIO_BLK_T_GET_ID, w(u64::MAX - 5, 20)),
        ] {
            header(&s.mem, request_type, 0);
            assert_eq!(serve(&mut s.block, &s.mem, &[r(HDR, 16), data, w(STATUS, 1)]), Some(1));
            assert_eq!(status(&s.mem), VIRTIO_BLK_S_IOERR, "type {request_type}");
        }
        header(&s.mem, VIRTIO_BLK_T_IN, 0);
        assert_eq!(serve(&mut s.block, &s.mem, &[r(u64::MAX - 3, 16), w(DATA, 512), w(STATUS, 1)]), Some(1));
        assert_eq!(status(&s.mem), VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn status_outside_guest_memory_drops_the_chain() {
        let mut s = setup(false);
        header(&s.mem, VIRTIO_BLK_T_IN, 0);
        for status_desc in [w(MEM_SIZE as u64, 1), w(u64::MAX, 1), w(u64::MAX - 1, 8)] {
            assert_eq!(serve(&mut s.block, &s.mem, &[r(HDR, 16), w(DATA, 512), status_desc]), Some(0));
        }
    }

    #[test]
    fn huge_lengths_fail_without_allocating() {
        let mut s = setup(false);
        for (request_type, data) in [
            (VIRTIO_BLK_T_IN, w(DATA, u32::MAX - 1023)),
            (VIRTIO_BLK_T_OUT, r(DATA, u32::MAX - 1023)),
            (VIRTIO_BLK_T_DISCARD, r(DATA, u32::MAX - 1023)),
            (VIRTIO_BLK_T_GET_ID, w(DATA, u32::MAX - 1023)),
        ] {
            header(&s.mem, request_type, 0);
            // The status byte lives in the huge descriptor's last byte, far
            // outside guest memory: dropped; with a separate status: IOERR.
            assert_eq!(serve(&mut s.block, &s.mem, &[r(HDR, 16), data]), Some(0));
            assert_eq!(serve(&mut s.block, &s.mem, &[r(HDR, 16), data, w(STATUS, 1)]), Some(1));
            assert_eq!(status(&s.mem), VIRTIO_BLK_S_IOERR, "type {request_type}");
        }
    }

    #[test]
    fn descriptor_loop_ends_without_hanging() {
        let mut s = setup(false);
        header(&s.mem, VIRTIO_BLK_T_IN, 0);
        // 0 -> 1 -> 0 -> ...: readable header, then a writable buffer that
        // loops back; virtio-queue stops after the queue size.
        let raw = [
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 1)),
            RawDescriptor::from(SplitDescriptor::new(STATUS, 1, (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE) as u16, 0)),
        ];
        let outcome = serve_raw(&mut s.block, &s.mem, &raw, false);
        assert_eq!(outcome.used.len(), 1);
        // Readable after writable: an error status in the last writable byte.
        assert_eq!(status(&s.mem), VIRTIO_BLK_S_IOERR);

        let self_loop = [RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, 0))];
        let outcome = serve_raw(&mut s.block, &s.mem, &self_loop, false);
        assert_eq!(outcome.used, vec![(0, 0)]);
    }

    #[test]
    fn chain_longer_than_a_queue_through_an_indirect_table_is_dropped() {
        let mut s = setup(false);
        header(&s.mem, VIRTIO_BLK_T_FLUSH, 0);
        let table = 0x20_0000u64;
        let count = 300u16;
        for i in 0..count {
            let desc = if i + 1 < count {
                SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, i + 1)
            } else {
                SplitDescriptor::new(STATUS, 1, VRING_DESC_F_WRITE as u16, 0)
            };
            s.mem.write_obj(RawDescriptor::from(desc), GuestAddress(table + 16 * u64::from(i))).expect("indirect desc");
        }
        let head = SplitDescriptor::new(table, 16 * u32::from(count), VRING_DESC_F_INDIRECT as u16, 0);
        let outcome = serve_raw(&mut s.block, &s.mem, &[RawDescriptor::from(head)], false);
        assert_eq!(outcome.used, vec![(0, 0)]);
        assert_eq!(status(&s.mem), 0xee, "nothing written");
    }

    #[test]
    fn head_index_beyond_the_queue_is_dropped_without_panic() {
        let mut s = setup(false);
        let vq = MockSplitQueue::new(&s.mem, 16);
        // avail ring entry 0 names descriptor 200 in a queue of 16.
        vq.avail().ring().ref_at(0).expect("avail").store(200);
        vq.avail().idx().store(1);
        let mut queue: Queue = vq.create_queue().expect("queue");
        let (irq, _count) = counting_interrupt();
        let mut ctx =
            QueueContext { mem: &s.mem, queues: std::slice::from_mut(&mut queue), acked_features: 0, interrupt: &irq };
        s.block.process_queue(0, &mut ctx);
        assert_eq!(queue.next_avail(), 1);
    }

    #[test]
    fn invalid_avail_index_does_not_hang() {
        let mut s = setup(false);
        let vq = MockSplitQueue::new(&s.mem, 16);
        vq.avail().idx().store(100);
        let mut queue: Queue = vq.create_queue().expect("queue");
        for event_idx in [false, true] {
            queue.set_event_idx(event_idx);
            let (irq, count) = counting_interrupt();
            let mut ctx = QueueContext {
                mem: &s.mem,
                queues: std::slice::from_mut(&mut queue),
                acked_features: 0,
                interrupt: &irq,
            };
            s.block.process_queue(0, &mut ctx);
            assert_eq!(count.load(Ordering::SeqCst), 0);
        }
    }

    #[test]
    fn notification_for_another_queue_is_ignored() {
        let mut s = setup(false);
        header(&s.mem, VIRTIO_BLK_T_FLUSH, 0);
        let vq = MockSplitQueue::new(&s.mem, 16);
        vq.add_desc_chains(&raw_chain(&[r(HDR, 16), w(STATUS, 1)]), 0).expect("chain");
        let mut queue: Queue = vq.create_queue().expect("queue");
        let (irq, count) = counting_interrupt();
        let mut ctx =
            QueueContext { mem: &s.mem, queues: std::slice::from_mut(&mut queue), acked_features: 0, interrupt: &irq };
        s.block.process_queue(1, &mut ctx);
        assert_eq!(vq.used().idx().load(), 0);
        assert_eq!(count.load(Ordering::SeqCst), 0);
    }

    // ---- batches and notifications ----

    fn three_flushes(mem: &GuestMemoryMmap) -> Vec<RawDescriptor> {
        header(mem, VIRTIO_BLK_T_FLUSH, 0);
        let mut raw = Vec::new();
        for i in 0..3u16 {
            let at = 2 * i;
            raw.push(RawDescriptor::from(SplitDescriptor::new(HDR, 16, VRING_DESC_F_NEXT as u16, at + 1)));
            raw.push(RawDescriptor::from(SplitDescriptor::new(STATUS + u64::from(i), 1, VRING_DESC_F_WRITE as u16, 0)));
        }
        raw
    }

    #[test]
    fn a_batch_of_chains_is_served_with_one_interrupt() {
        let mut s = setup(false);
        let raw = three_flushes(&s.mem);
        let outcome = serve_raw(&mut s.block, &s.mem, &raw, false);
        assert_eq!(outcome.used, vec![(0, 1), (2, 1), (4, 1)]);
        assert_eq!(outcome.interrupts, 1);
    }

    #[test]
    fn event_idx_serving_drains_the_queue_and_publishes_avail_event() {
        let mut s = setup(false);
        let raw = three_flushes(&s.mem);
        let vq = MockSplitQueue::new(&s.mem, 16);
        vq.add_desc_chains(&raw, 0).expect("chains");
        let mut queue: Queue = vq.create_queue().expect("queue");
        queue.set_event_idx(true);
        let (irq, count) = counting_interrupt();
        let mut ctx = QueueContext {
            mem: &s.mem,
            queues: std::slice::from_mut(&mut queue),
            acked_features: s.block.features(),
            interrupt: &irq,
        };
        s.block.process_queue(0, &mut ctx);
        assert_eq!(vq.used().idx().load(), 3);
        // avail_event (after the used ring) asks to be told of chain 3.
        let avail_event_addr = vq.used_addr().0 + 4 + 8 * 16;
        assert_eq!(s.mem.read_obj::<u16>(GuestAddress(avail_event_addr)).expect("avail_event"), 3);
        // used_event is 0 (never written): the driver asked for a
        // notification once used passes 0, which it did.
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn empty_queue_raises_no_interrupt() {
        let mut s = setup(false);
        let outcome = serve_raw(&mut s.block, &s.mem, &[], false);
        assert!(outcome.used.is_empty());
        assert_eq!(outcome.interrupts, 0);
    }

    #[test]
    fn file_written_behind_the_device_reads_back_through_it() {
        let mut s = setup(false);
        s.block.image().file().write_all_at(&[0x42; 512], 512 * 7).expect("write");
        header(&s.mem, VIRTIO_BLK_T_IN, 7);
        assert_eq!(serve(&mut s.block, &s.mem, &[r(HDR, 16), w(DATA, 512), w(STATUS, 1)]), Some(513));
        assert_eq!(guest_bytes(&s.mem, DATA, 512), vec![0x42; 512]);
    }
}
