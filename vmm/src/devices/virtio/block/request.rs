//! One virtio-blk request: a descriptor chain split into header, data and
//! status byte, checked against the disk, and served.
//!
//! A request is a 16-byte header (type, reserved, sector), then data, then
//! one status byte, the chain's last writable byte. The spec lets a driver
//! frame these over descriptors as it likes, so the chain is read as two
//! byte streams: the device-readable one (header, then data going to the
//! disk) and the device-writable one (data coming from the disk, then the
//! status). Every guest range is checked by vm-memory before use; data
//! moves with `preadv`/`pwritev` between the file and guest memory.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::Bitmap;
use vm_memory::bitmap::{AtomicBitmap, BS};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions, VolatileSlice};
use crate::vstate::memory::GuestMemoryMmap;

use super::image::SECTOR_SIZE;
use super::{Block, MAX_DISCARD_SECTORS, MAX_DISCARD_SEGMENTS, SERIAL_MAX_LEN};

/// The most descriptors a request may have. A chain in a 256-entry queue
/// has at most 256; only an indirect table can hold more, and such a chain
/// is dropped.
const MAX_DESCRIPTORS: usize = 256;

/// The request header's size.
const HEADER_SIZE: usize = 16;

/// The size of one discard / write-zeroes segment.
const SEGMENT_SIZE: usize = 16;

/// The most iovecs one `preadv`/`pwritev` call takes (`IOV_MAX`).
const IOV_MAX: usize = 1024;

/// Zeroes written where the file system cannot punch or zero a range.
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

/// Why a request failed or its chain was dropped.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    /// Chains of this length only come from a broken indirect table.
    #[error("chain has more than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    /// No device-writable byte to put the status in.
    #[error("chain has no writable status byte")]
    NoStatus,
    /// The status byte is not in guest memory.
    #[error("status byte at {0:#x} is outside guest memory")]
    StatusOutsideMemory(u64),
    /// A buffer is not in guest memory.
    #[error("buffer at {addr:#x} ({len} bytes) is outside guest memory")]
    OutsideMemory { addr: u64, len: usize },
    /// A device-readable descriptor follows a device-writable one.
    #[error("readable descriptor after a writable one")]
    Misordered,
    /// The header is shorter than 16 bytes.
    #[error("request header is {0} bytes, not 16")]
    ShortHeader(usize),
    /// The request type is not one stasis serves.
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    /// Data in a direction the request type has none.
    #[error("request type {0} has data in the wrong direction")]
    WrongDirection(u32),
    /// A read or write length that is not whole sectors.
    #[error("data length {0} is not a multiple of 512")]
    UnalignedLength(usize),
    /// A sector range past the disk's end, or that overflows.
    #[error("sectors {sector}+{bytes} bytes are beyond the disk's end")]
    OutOfRange { sector: u64, bytes: u64 },
    /// A write to a read-only disk.
    #[error("write request on a read-only disk")]
    ReadOnly,
    /// GET_ID with a buffer too small for the ID.
    #[error("GET_ID buffer is {0} bytes, less than 20")]
    ShortIdBuffer(usize),
    /// A discard or write-zeroes payload that is not 1 to 32 segments.
    #[error("discard/write-zeroes payload of {0} bytes is not 1 to 32 segments")]
    BadSegments(usize),
    /// A segment longer than the device allows.
    #[error("discard/write-zeroes segment of {0} sectors is longer than allowed")]
    SegmentTooLong(u32),
    /// Segment flags the request type does not support.
    #[error("discard/write-zeroes segment flags {0:#x} are not supported")]
    UnsupportedFlags(u32),
    /// The host failed the I/O.
    #[error("disk I/O failed")]
    Io(#[source] io::Error),
}

impl RequestError {
    fn status(&self) -> u8 {
        let status = match self {
            RequestError::Unsupported(_) | RequestError::UnsupportedFlags(_) => VIRTIO_BLK_S_UNSUPP,
            _ => VIRTIO_BLK_S_IOERR,
        };
        status as u8
    }
}

/// A guest buffer, already checked to lie in guest memory.
#[derive(Clone, Copy, Debug)]
struct Segment {
    addr: GuestAddress,
    len: usize,
}

/// A chain split into its two byte streams and its status byte.
struct Layout {
    readable: Vec<Segment>,
    /// The writable stream without the status byte.
    writable: Vec<Segment>,
    status: GuestAddress,
    /// A readable descriptor came after a writable one.
    misordered: bool,
}

impl Layout {
    fn parse(mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> Result<Layout, RequestError> {
        let mut readable = Vec::new();
        let mut writable: Vec<Segment> = Vec::new();
        let mut misordered = false;
        for (count, desc) in chain.enumerate() {
            if count >= MAX_DESCRIPTORS {
                return Err(RequestError::TooManyDescriptors);
            }
            if desc.len() == 0 {
                continue;
            }
            // A u32 always fits a usize on the hosts stasis runs on (64-bit).
            let segment = Segment { addr: desc.addr(), len: desc.len() as usize };
            if desc.is_write_only() {
                writable.push(segment);
            } else {
                misordered |= !writable.is_empty();
                readable.push(segment);
            }
        }

        let last = writable.last_mut().ok_or(RequestError::NoStatus)?;
        last.len -= 1;
        let status =
            last.addr.checked_add(last.len as u64).ok_or(RequestError::StatusOutsideMemory(last.addr.raw_value()))?;
        if last.len == 0 {
            writable.pop();
        }
        if !mem.check_range(status, 1, Permissions::Write) {
            return Err(RequestError::StatusOutsideMemory(status.raw_value()));
        }
        Ok(Layout { readable, writable, status, misordered })
    }

    /// Every buffer lies in guest memory.
    fn check_memory(&self, mem: &GuestMemoryMmap) -> Result<(), RequestError> {
        let ranges = self
            .readable
            .iter()
            .map(|s| (s, Permissions::Read))
            .chain(self.writable.iter().map(|s| (s, Permissions::Write)));
        for (segment, access) in ranges {
            if !mem.check_range(segment.addr, segment.len, access) {
                return Err(RequestError::OutsideMemory { addr: segment.addr.raw_value(), len: segment.len });
            }
        }
        Ok(())
    }
}

fn total_len(segments: &[Segment]) -> usize {
    // At most MAX_DESCRIPTORS lengths of u32 each: no overflow on 64-bit.
    segments.iter().map(|s| s.len).sum()
}

/// The segments after the first `skip` bytes.
fn skip_bytes(segments: &[Segment], mut skip: usize) -> Vec<Segment> {
    let mut rest = Vec::with_capacity(segments.len());
    for segment in segments {
        if skip >= segment.len {
            skip -= segment.len;
            continue;
        }
        rest.push(Segment {
            // In guest memory (checked), so the sum cannot wrap.
            addr: segment.addr.unchecked_add(skip as u64),
            len: segment.len - skip,
        });
        skip = 0;
    }
    rest
}

/// Fills `buf` from the start of `segments`; returns how many bytes it
/// read (less than `buf.len()` when the segments are shorter).
fn read_prefix(mem: &GuestMemoryMmap, segments: &[Segment], buf: &mut [u8]) -> Result<usize, RequestError> {
    let mut done = 0;
    for segment in segments {
        if done == buf.len() {
            break;
        }
        let n = segment.len.min(buf.len() - done);
        mem.read_slice(&mut buf[done..done + n], segment.addr)
            .map_err(|_| RequestError::OutsideMemory { addr: segment.addr.raw_value(), len: n })?;
        done += n;
    }
    Ok(done)
}

/// Writes `data` to the start of `segments`, which hold at least as much.
fn write_prefix(mem: &GuestMemoryMmap, segments: &[Segment], data: &[u8]) -> Result<(), RequestError> {
    let mut done = 0;
    for segment in segments {
        if done == data.len() {
            break;
        }
        let n = segment.len.min(data.len() - done);
        mem.write_slice(&data[done..done + n], segment.addr)
            .map_err(|_| RequestError::OutsideMemory { addr: segment.addr.raw_value(), len: n })?;
        done += n;
    }
    Ok(())
}

/// The guest memory of `segments` as volatile slices.
fn guest_slices<'m>(
    mem: &'m GuestMemoryMmap,
    segments: &[Segment],
    access: Permissions,
) -> Result<Vec<VolatileSlice<'m, BS<'m, AtomicBitmap>>>, RequestError> {
    let mut slices = Vec::with_capacity(segments.len());
    for segment in segments {
        let outside = || RequestError::OutsideMemory { addr: segment.addr.raw_value(), len: segment.len };
        for slice in mem.get_slices(segment.addr, segment.len, access).map_err(|_| outside())? {
            slices.push(slice.map_err(|_| outside())?);
        }
    }
    Ok(slices)
}

/// `preadv` (`write` false: file to memory) or `pwritev` (memory to file)
/// over all of `iovs` at `offset`, retrying short transfers.
///
/// # Safety
///
/// Every iovec must describe memory valid for the transfer's direction for
/// the duration of the call.
unsafe fn transfer(file: &File, iovs: &mut [libc::iovec], offset: u64, write: bool) -> io::Result<()> {
    let mut offset = offset;
    let mut first = 0;
    loop {
        while first < iovs.len() && iovs[first].iov_len == 0 {
            first += 1;
        }
        if first == iovs.len() {
            return Ok(());
        }
        let batch = &iovs[first..iovs.len().min(first + IOV_MAX)];
        let at = libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // The batch is at most IOV_MAX long: the cast cannot truncate.
        let count = batch.len() as libc::c_int;
        // SAFETY: `batch` is a live slice of `count` iovecs, each valid for
        // this direction per the caller's contract.
        let rc = unsafe {
            if write {
                libc::pwritev(file.as_raw_fd(), batch.as_ptr(), count, at)
            } else {
                libc::preadv(file.as_raw_fd(), batch.as_ptr(), count, at)
            }
        };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if rc == 0 {
            // The file ended early (truncated behind the VM's back) or
            // takes no more data.
            let kind = if write { io::ErrorKind::WriteZero } else { io::ErrorKind::UnexpectedEof };
            return Err(io::Error::from(kind));
        }
        // rc > 0 was checked above.
        let mut moved = rc as usize;
        offset += moved as u64;
        while moved > 0 && first < iovs.len() {
            let iov = &mut iovs[first];
            if moved >= iov.iov_len {
                moved -= iov.iov_len;
                iov.iov_len = 0;
                first += 1;
            } else {
                iov.iov_base = iov.iov_base.cast::<u8>().wrapping_add(moved).cast();
                iov.iov_len -= moved;
                moved = 0;
            }
        }
    }
}

/// Reads the file at `offset` into the guest's `segments`.
fn read_to_guest(mem: &GuestMemoryMmap, file: &File, segments: &[Segment], offset: u64) -> Result<(), RequestError> {
    let slices = guest_slices(mem, segments, Permissions::Write)?;
    // The guards keep each mapping alive while the kernel writes it.
    let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard_mut()).collect();
    let mut iovs: Vec<libc::iovec> =
        guards.iter().map(|g| libc::iovec { iov_base: g.as_ptr().cast(), iov_len: g.len() }).collect();
    // SAFETY: each iovec is a slice of guest memory vm-memory checked and
    // mapped writable, held by `guards` until the call returns.
    let result = unsafe { transfer(file, &mut iovs, offset, false) };
    for slice in &slices {
        slice.bitmap().mark_dirty(0, slice.len());
    }
    result.map_err(RequestError::Io)
}

/// Writes the guest's `segments` to the file at `offset`.
fn write_from_guest(mem: &GuestMemoryMmap, file: &File, segments: &[Segment], offset: u64) -> Result<(), RequestError> {
    let slices = guest_slices(mem, segments, Permissions::Read)?;
    let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard()).collect();
    let mut iovs: Vec<libc::iovec> =
        guards.iter().map(|g| libc::iovec { iov_base: g.as_ptr().cast_mut().cast(), iov_len: g.len() }).collect();
    // SAFETY: each iovec is a slice of guest memory vm-memory checked and
    // mapped readable, held by `guards` until the call returns; pwritev
    // only reads through them.
    unsafe { transfer(file, &mut iovs, offset, true) }.map_err(RequestError::Io)
}

fn fallocate(file: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let invalid = || io::Error::from(io::ErrorKind::InvalidInput);
    let offset = libc::off_t::try_from(offset).map_err(|_| invalid())?;
    let len = libc::off_t::try_from(len).map_err(|_| invalid())?;
    loop {
        // SAFETY: fallocate takes no pointers; the descriptor is open.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(file, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
}

fn zero_range(file: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(file, libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
}

fn write_zeroes(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from(len - done).unwrap_or(usize::MAX).min(ZEROES.len());
        file.write_all_at(&ZEROES[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// One discard / write-zeroes segment.
struct DiscardSegment {
    offset: u64,
    len: u64,
    unmap: bool,
}

impl Block {
    /// Serves one chain; returns the used length (bytes written into guest
    /// memory, status included), 0 for a dropped chain.
    pub(super) fn serve_chain(&mut self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
        let head = chain.head_index();
        let layout = match Layout::parse(mem, chain) {
            Ok(layout) => layout,
            Err(e) => {
                self.warn.warn(format_args!("virtio-blk: dropped chain {head}: {e}"));
                return 0;
            }
        };
        let (status, data_len) = match self.execute(mem, &layout) {
            Ok(data_len) => (VIRTIO_BLK_S_OK as u8, data_len),
            Err(e) => {
                match &e {
                    RequestError::Io(source) => {
                        log::warn!("virtio-blk: {}: {e}: {source}", self.image.path().display());
                    }
                    RequestError::Unsupported(_) => log::debug!("virtio-blk: {e}"),
                    _ => self.warn.warn(format_args!("virtio-blk: bad request in chain {head}: {e}")),
                }
                (e.status(), 0)
            }
        };
        if let Err(e) = mem.write_obj(status, layout.status) {
            self.warn.warn(format_args!("virtio-blk: cannot write the status of chain {head}: {e}"));
            return 0;
        }
        // data_len is at most a chain's length, which is below 2^32.
        u32::try_from(data_len + 1).unwrap_or(u32::MAX)
    }

    /// Checks and serves the request; returns how many data bytes it wrote
    /// into guest memory.
    fn execute(&mut self, mem: &GuestMemoryMmap, layout: &Layout) -> Result<usize, RequestError> {
        layout.check_memory(mem)?;
        let mut header = [0u8; HEADER_SIZE];
        let got = read_prefix(mem, &layout.readable, &mut header)?;
        if got < HEADER_SIZE {
            return Err(RequestError::ShortHeader(got));
        }
        let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let sector = u64::from_le_bytes([
            header[8], header[9], header[10], header[11], header[12], header[13], header[14], header[15],
        ]);
        let data_out = skip_bytes(&layout.readable, HEADER_SIZE);
        let data_in = &layout.writable;
        let out_len = total_len(&data_out);
        let in_len = total_len(data_in);

        let known = matches!(
            request_type,
            VIRTIO_BLK_T_IN
                | VIRTIO_BLK_T_OUT
                | VIRTIO_BLK_T_FLUSH
                | VIRTIO_BLK_T_GET_ID
                | VIRTIO_BLK_T_DISCARD
                | VIRTIO_BLK_T_WRITE_ZEROES
        );
        if !known {
            return Err(RequestError::Unsupported(request_type));
        }
        if layout.misordered {
            return Err(RequestError::Misordered);
        }
        let wrong_direction = match request_type {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID => out_len != 0,
            VIRTIO_BLK_T_FLUSH => out_len != 0 || in_len != 0,
            _ => in_len != 0,
        };
        if wrong_direction {
            return Err(RequestError::WrongDirection(request_type));
        }
        let writes = matches!(request_type, VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES);
        if writes && self.image.read_only() {
            return Err(RequestError::ReadOnly);
        }

        let file = self.image.file();
        match request_type {
            VIRTIO_BLK_T_IN => {
                let offset = self.byte_range(sector, in_len)?;
                read_to_guest(mem, file, data_in, offset)?;
                Ok(in_len)
            }
            VIRTIO_BLK_T_OUT => {
                let offset = self.byte_range(sector, out_len)?;
                self.changed.mark(offset, out_len as u64);
                write_from_guest(mem, file, &data_out, offset)?;
                Ok(0)
            }
            VIRTIO_BLK_T_FLUSH => {
                file.sync_data().map_err(RequestError::Io)?;
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                if in_len < SERIAL_MAX_LEN {
                    return Err(RequestError::ShortIdBuffer(in_len));
                }
                write_prefix(mem, data_in, &self.id)?;
                Ok(SERIAL_MAX_LEN)
            }
            _ => {
                let discard = request_type == VIRTIO_BLK_T_DISCARD;
                let segments = self.discard_segments(mem, &data_out, discard)?;
                for segment in &segments {
                    self.changed.mark(segment.offset, segment.len);
                    discard_or_zero(file, segment, discard).map_err(RequestError::Io)?;
                }
                Ok(0)
            }
        }
    }

    /// The file offset of `len` bytes at `sector`, if whole sectors within
    /// the disk.
    fn byte_range(&self, sector: u64, len: usize) -> Result<u64, RequestError> {
        let len = len as u64;
        if len % SECTOR_SIZE != 0 {
            return Err(RequestError::UnalignedLength(len as usize));
        }
        let out_of_range = RequestError::OutOfRange { sector, bytes: len };
        let Some(offset) = sector.checked_mul(SECTOR_SIZE) else { return Err(out_of_range) };
        match offset.checked_add(len) {
            Some(end) if end <= self.image.size() => Ok(offset),
            _ => Err(out_of_range),
        }
    }

    /// Reads and checks every segment of a discard / write-zeroes payload
    /// before any is acted on.
    fn discard_segments(
        &self,
        mem: &GuestMemoryMmap,
        payload: &[Segment],
        discard: bool,
    ) -> Result<Vec<DiscardSegment>, RequestError> {
        const MAX_PAYLOAD: usize = SEGMENT_SIZE * MAX_DISCARD_SEGMENTS as usize;
        let len = total_len(payload);
        if len == 0 || len % SEGMENT_SIZE != 0 || len > MAX_PAYLOAD {
            return Err(RequestError::BadSegments(len));
        }
        let mut bytes = [0u8; MAX_PAYLOAD];
        let got = read_prefix(mem, payload, &mut bytes[..len])?;
        if got != len {
            return Err(RequestError::BadSegments(got));
        }
        let mut segments = Vec::with_capacity(len / SEGMENT_SIZE);
        for raw in bytes[..len].chunks_exact(SEGMENT_SIZE) {
            let field = |at: usize| u32::from_le_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]]);
            let sector = u64::from(field(0)) | (u64::from(field(4)) << 32);
            let num_sectors = field(8);
            let flags = field(12);
            let allowed = if discard { 0 } else { VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP };
            if flags & !allowed != 0 {
                return Err(RequestError::UnsupportedFlags(flags));
            }
            if num_sectors > MAX_DISCARD_SECTORS {
                return Err(RequestError::SegmentTooLong(num_sectors));
            }
            let bytes = u64::from(num_sectors) * SECTOR_SIZE;
            let offset = self.byte_range(sector, bytes as usize)?;
            segments.push(DiscardSegment {
                offset,
                len: bytes,
                unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
            });
        }
        // Unsupported flags anywhere make the whole request UNSUPP, so they
        // are all checked above before anything is changed.
        Ok(segments)
    }
}

/// Discards (punches) or zeroes a range so it reads as zeroes, trying
/// what the file system does best first and writing zeroes last.
fn discard_or_zero(file: &File, segment: &DiscardSegment, discard: bool) -> io::Result<()> {
    let DiscardSegment { offset, len, unmap } = *segment;
    if len == 0 {
        return Ok(());
    }
    let first = if discard || unmap { punch_hole(file, offset, len) } else { zero_range(file, offset, len) };
    if first.is_ok() {
        return Ok(());
    }
    // The file system refused; write_zeroes_may_unmap lets either
    // fallocate mode serve a write-zeroes.
    let second = if discard || unmap { zero_range(file, offset, len) } else { punch_hole(file, offset, len) };
    if second.is_ok() {
        return Ok(());
    }
    write_zeroes(file, offset, len)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use super::*;

    fn seg(addr: u64, len: usize) -> Segment {
        Segment { addr: GuestAddress(addr), len }
    }

    #[test]
    fn skip_bytes_splits_inside_and_across_segments() {
        let segments = [seg(0x1000, 10), seg(0x2000, 10), seg(0x3000, 4)];
        let rest = skip_bytes(&segments, 16);
        assert_eq!(rest.len(), 2);
        assert_eq!((rest[0].addr, rest[0].len), (GuestAddress(0x2006), 4));
        assert_eq!((rest[1].addr, rest[1].len), (GuestAddress(0x3000), 4));
        assert!(skip_bytes(&segments, 24).is_empty());
        assert!(skip_bytes(&segments, 100).is_empty());
    }

    #[test]
    fn transfer_moves_data_across_many_iovecs_and_more_than_iov_max() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let content: Vec<u8> = (0..(IOV_MAX + 10) * 3).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &content).expect("write");
        let file = File::open(&path).expect("open");
        let mut buf = vec![0u8; content.len()];
        let mut iovs: Vec<libc::iovec> =
            buf.chunks_mut(3).map(|c| libc::iovec { iov_base: c.as_mut_ptr().cast(), iov_len: c.len() }).collect();
        // SAFETY: the iovecs cover `buf`, alive and unaliased for the call.
        unsafe { transfer(&file, &mut iovs, 0, false) }.expect("transfer");
        assert_eq!(buf, content);
    }

    #[test]
    fn transfer_past_the_end_of_the_file_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, [1u8; 512]).expect("write");
        let file = File::open(&path).expect("open");
        let mut buf = [0u8; 1024];
        let mut iovs = [libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() }];
        // SAFETY: the iovec covers `buf`, alive and unaliased for the call.
        let err = unsafe { transfer(&file, &mut iovs, 0, false) }.expect_err("short file");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(buf[..512], [1u8; 512]);
    }

    #[test]
    fn write_zeroes_fallback_zeroes_a_range_larger_than_its_buffer() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, vec![0xffu8; 256 * 1024]).expect("write");
        let file = std::fs::OpenOptions::new().read(true).write(true).open(&path).expect("open");
        write_zeroes(&file, 512, 200 * 1024).expect("zeroes");
        let mut buf = vec![0u8; 256 * 1024];
        file.read_exact_at(&mut buf, 0).expect("read");
        assert!(buf[..512].iter().all(|&b| b == 0xff));
        assert!(buf[512..512 + 200 * 1024].iter().all(|&b| b == 0));
        assert!(buf[512 + 200 * 1024..].iter().all(|&b| b == 0xff));
    }
}
