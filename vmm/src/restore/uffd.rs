//! Lazy guest memory: the VM runs at once on empty memory registered with
//! userfaultfd, and a handler thread fills it on demand from a checkpoint.
//!
//! On a fault at guest address `gpa`, the handler finds the memory block
//! holding `gpa`, has the checkpoint reader read and decompress the storage
//! block holding it (the reader caches recent storage blocks, so
//! neighbouring faults do not touch the disk again), and copies the whole
//! memory block in with `UFFDIO_COPY` (`UFFDIO_ZEROPAGE` for zero blocks),
//! which also wakes the faulting vCPU. Between faults, background prefetch
//! loads the remaining data blocks in file order, one block at a time, so
//! a fault never waits behind more than one prefetched block.
//!
//! Zero blocks are not prefetched: once every data block is in, the
//! handler unregisters guest memory from userfaultfd, and the pages still
//! missing (all in zero blocks) become plain anonymous memory that the
//! kernel fills with zeros on first touch, with no round trip through the
//! handler. Unregistering wakes any vCPU still waiting on such a page.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use userfaultfd::{Event, Uffd, UffdBuilder};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use crate::vstate::memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::checkpoint::{BlockKind, Reader};
use crate::error_chain;

/// Errors while setting up lazy memory.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// The userfaultfd could not be created.
    #[error("cannot create a userfaultfd (needs root or vm.unprivileged_userfaultfd=1)")]
    Create(#[source] userfaultfd::Error),
    /// Registering guest memory with it failed.
    #[error("cannot register guest memory at {0:#x} with userfaultfd")]
    Register(u64, #[source] userfaultfd::Error),
    /// The checkpoint's regions do not match the guest memory.
    #[error("the checkpoint describes memory at {gpa:#x} that the VM does not have")]
    Layout {
        /// The address.
        gpa: u64,
    },
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The handler thread could not be started.
    #[error("cannot start the page fault handler thread")]
    Spawn(#[source] std::io::Error),
    /// The handler thread is gone.
    #[error("the page fault handler has stopped")]
    HandlerGone,
    /// Loading memory failed.
    #[error("{0}")]
    Load(String),
}

/// A failure while serving faults: the VM cannot go on.
#[derive(Debug)]
pub struct MemoryFailure(pub String);

/// Counters of the lazy loader.
#[derive(Debug, Default)]
pub struct LoaderStats {
    /// Page faults received.
    pub faults: AtomicU64,
    /// Memory blocks loaded because a vCPU touched them.
    pub blocks_on_fault: AtomicU64,
    /// Memory blocks loaded by background prefetch.
    pub blocks_prefetched: AtomicU64,
    /// Milliseconds from the handler's start until every data block was
    /// in and memory was released from userfaultfd; 0 until then.
    pub resident_after_ms: AtomicU64,
}

/// A plain copy of [`LoaderStats`].
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct LoaderReport {
    /// Page faults received.
    pub faults: u64,
    /// Memory blocks loaded on fault.
    pub blocks_on_fault: u64,
    /// Memory blocks loaded by prefetch.
    pub blocks_prefetched: u64,
    /// Milliseconds until fully resident, if it is.
    pub resident_after_ms: Option<u64>,
}

impl LoaderStats {
    /// A snapshot of the counters.
    pub fn report(&self) -> LoaderReport {
        let resident = self.resident_after_ms.load(Ordering::Relaxed);
        LoaderReport {
            faults: self.faults.load(Ordering::Relaxed),
            blocks_on_fault: self.blocks_on_fault.load(Ordering::Relaxed),
            blocks_prefetched: self.blocks_prefetched.load(Ordering::Relaxed),
            resident_after_ms: (resident > 0).then_some(resident),
        }
    }
}

enum Control {
    /// Load every data block still missing, release the memory, then answer.
    LoadAll(Sender<Result<(), String>>),
    /// Pause or restart background prefetch.
    Prefetch(bool),
    /// Say which blocks are in guest memory.
    Resident(Sender<Option<Vec<bool>>>),
    /// End the handler thread.
    Stop,
}

/// The VMM's handle on the fault handler.
pub struct LazyMemory {
    reader: Arc<Reader>,
    control: Sender<Control>,
    wake: EventFd,
    stats: Arc<LoaderStats>,
    thread: Option<JoinHandle<()>>,
}

impl LazyMemory {
    /// Registers every region of `mem` with a new userfaultfd and starts
    /// the handler thread serving it from `reader`. A failure while serving
    /// is reported once on `failures`.
    pub fn start<T: From<MemoryFailure> + Send + 'static>(
        mem: &GuestMemoryMmap,
        reader: Arc<Reader>,
        prefetch: bool,
        failures: Sender<T>,
    ) -> Result<Self, UffdError> {
        // Not user-mode-only: most faults come from KVM, in the kernel.
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(UffdError::Create)?;
        let mut regions = Vec::new();
        for region in mem.iter() {
            let gpa = region.start_addr().0;
            let host = mem
                .get_host_address(region.start_addr())
                .map_err(|_| UffdError::Layout { gpa })? as usize;
            let len = region.len() as usize;
            uffd.register(host as *mut libc::c_void, len)
                .map_err(|e| UffdError::Register(gpa, e))?;
            regions.push(HostRegion { gpa, host, len });
        }
        // Every block of the checkpoint must land inside guest memory.
        for i in 0..reader.block_count() {
            let info = reader.block_info(i).ok_or(UffdError::Layout { gpa: 0 })?;
            let end = info.guest_addr + info.len as u64;
            let fits = regions.iter().any(|r| info.guest_addr >= r.gpa && end <= r.gpa + r.len as u64);
            if !fits {
                return Err(UffdError::Layout { gpa: info.guest_addr });
            }
        }
        let data_missing = (0..reader.block_count())
            .filter_map(|i| reader.block_info(i))
            .filter(|info| info.kind != BlockKind::Zero)
            .count();
        let wake = EventFd::new(EFD_NONBLOCK).map_err(UffdError::EventFd)?;
        let wake_handler = wake.try_clone().map_err(UffdError::EventFd)?;
        let (control, control_rx) = channel();
        let stats = Arc::new(LoaderStats::default());
        let handler = Handler {
            buf: vec![0u8; reader.header().memory_block_size as usize],
            loaded: vec![false; reader.block_count()],
            data_missing,
            released: false,
            next_prefetch: 0,
            prefetch,
            uffd,
            regions,
            reader: reader.clone(),
            stats: stats.clone(),
            started: Instant::now(),
        };
        let thread = std::thread::Builder::new()
            .name("uffd-handler".into())
            .spawn(move || {
                if let Err(msg) = handler.run(&control_rx, &wake_handler) {
                    log::error!("{msg}");
                    let _ = failures.send(T::from(MemoryFailure(msg)));
                }
            })
            .map_err(UffdError::Spawn)?;
        Ok(LazyMemory { reader, control, wake, stats, thread: Some(thread) })
    }

    /// The loader's counters.
    pub fn stats(&self) -> LoaderReport {
        self.stats.report()
    }

    /// Loads every data block still missing and releases guest memory from
    /// userfaultfd (e.g. before a snapshot reads all of memory); returns
    /// once that is done.
    pub fn load_all(&self) -> Result<(), UffdError> {
        let (tx, rx) = channel();
        self.control.send(Control::LoadAll(tx)).map_err(|_| UffdError::HandlerGone)?;
        let _ = self.wake.write(1);
        rx.recv().map_err(|_| UffdError::HandlerGone)?.map_err(UffdError::Load)
    }

    /// The checkpoint memory is loaded from.
    pub fn reader(&self) -> &Arc<Reader> {
        &self.reader
    }

    /// Which checkpoint blocks are in guest memory now (by the reader's
    /// block index); `None` once every data block is in and memory is
    /// released, when all of memory is the guest's own. A block not in
    /// holds exactly what the checkpoint holds: the guest cannot have
    /// written it without faulting it in first.
    pub fn resident(&self) -> Result<Option<Vec<bool>>, UffdError> {
        let (tx, rx) = channel();
        self.control.send(Control::Resident(tx)).map_err(|_| UffdError::HandlerGone)?;
        let _ = self.wake.write(1);
        rx.recv().map_err(|_| UffdError::HandlerGone)
    }

    /// Stops or restarts background prefetch.
    pub fn set_prefetch(&self, on: bool) {
        let _ = self.control.send(Control::Prefetch(on));
        let _ = self.wake.write(1);
    }
}

impl Drop for LazyMemory {
    /// Stops the handler before guest memory can go: a handler that
    /// outlived it could copy into whatever is mapped at those addresses
    /// next (UFFDIO_COPY checks only that the range is registered with
    /// some userfaultfd).
    fn drop(&mut self) {
        let _ = self.control.send(Control::Stop);
        let _ = self.wake.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct HostRegion {
    gpa: u64,
    host: usize,
    len: usize,
}

struct Handler {
    uffd: Uffd,
    regions: Vec<HostRegion>,
    reader: Arc<Reader>,
    buf: Vec<u8>,
    loaded: Vec<bool>,
    /// Data (non-zero) blocks not loaded yet.
    data_missing: usize,
    /// Guest memory is unregistered from the userfaultfd: no more faults.
    released: bool,
    next_prefetch: usize,
    prefetch: bool,
    stats: Arc<LoaderStats>,
    started: Instant,
}

/// How long to sleep in poll when there is nothing to prefetch.
const IDLE_POLL: Duration = Duration::from_millis(500);

impl Handler {
    fn run(mut self, control: &Receiver<Control>, wake: &EventFd) -> Result<(), String> {
        // A checkpoint of zero blocks only has nothing to load.
        self.release_when_done()?;
        let mut fds = [
            libc::pollfd { fd: self.uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        loop {
            if self.released {
                // A negative fd is ignored by poll: no faults come any more.
                fds[0].fd = -1;
            }
            let busy = self.prefetch && self.data_missing > 0;
            let timeout = if busy { 0 } else { IDLE_POLL.as_millis() as libc::c_int };
            // SAFETY: `fds` is a valid array of two pollfds for the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("page fault handler: poll failed: {err}"));
            }
            if fds[1].revents & libc::POLLIN != 0 {
                let _ = wake.read();
            }
            self.serve_faults()?;
            loop {
                match control.try_recv() {
                    Ok(Control::LoadAll(reply)) => {
                        let result = self.load_all();
                        let failed = result.clone().err();
                        let _ = reply.send(result);
                        if let Some(msg) = failed {
                            return Err(msg);
                        }
                    }
                    Ok(Control::Prefetch(on)) => self.prefetch = on,
                    Ok(Control::Resident(reply)) => {
                        let _ = reply.send((!self.released).then(|| self.loaded.clone()));
                    }
                    Ok(Control::Stop) => return Ok(()),
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    // The VMM is gone; so is the guest.
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => return Ok(()),
                }
            }
            if self.prefetch && self.data_missing > 0 {
                self.prefetch_one()?;
            }
        }
    }

    /// Serves every fault queued on the userfaultfd.
    fn serve_faults(&mut self) -> Result<(), String> {
        // After the release, the memory is no longer registered: an event
        // still queued is stale (unregistering woke its vCPU).
        while !self.released {
            let event = match self.uffd.read_event() {
                Ok(Some(event)) => event,
                Ok(None) => return Ok(()),
                Err(e) => return Err(format!("page fault handler: cannot read a fault: {e}")),
            };
            let Event::Pagefault { addr, .. } = event else { continue };
            self.stats.faults.fetch_add(1, Ordering::Relaxed);
            let host = addr as usize;
            let gpa = self
                .gpa_of(host)
                .ok_or_else(|| format!("page fault at host address {host:#x} outside guest memory"))?;
            let block = self
                .reader
                .block_of(gpa)
                .ok_or_else(|| format!("page fault at guest address {gpa:#x}, which the checkpoint does not hold"))?;
            if self.loaded[block] {
                // Another vCPU faulted on the same block before it was in;
                // the copy already woke it, but waking twice is harmless.
                let page = host & !0xfff;
                let _ = self.uffd.wake(page as *mut libc::c_void, 4096);
                continue;
            }
            // Counted before the copy wakes the vCPU, so a report taken
            // after the access includes it.
            self.stats.blocks_on_fault.fetch_add(1, Ordering::Relaxed);
            self.load(block)?;
        }
        Ok(())
    }

    /// Loads the next data block not in yet (zero blocks are left to the
    /// release).
    fn prefetch_one(&mut self) -> Result<(), String> {
        while self.next_prefetch < self.loaded.len() && !self.wants_prefetch(self.next_prefetch) {
            self.next_prefetch += 1;
        }
        if self.next_prefetch < self.loaded.len() {
            self.stats.blocks_prefetched.fetch_add(1, Ordering::Relaxed);
            self.load(self.next_prefetch)?;
        }
        Ok(())
    }

    fn wants_prefetch(&self, block: usize) -> bool {
        !self.loaded[block] && self.reader.block_info(block).is_some_and(|info| info.kind != BlockKind::Zero)
    }

    fn load_all(&mut self) -> Result<(), String> {
        while self.data_missing > 0 {
            self.serve_faults()?;
            self.prefetch_one()?;
        }
        Ok(())
    }

    /// Once every data block is in, unregisters guest memory from the
    /// userfaultfd: what is still missing lies in zero blocks, which the
    /// kernel fills with zeros on first touch. Unregistering wakes any
    /// vCPU waiting on such a page.
    fn release_when_done(&mut self) -> Result<(), String> {
        if self.released || self.data_missing > 0 {
            return Ok(());
        }
        for region in &self.regions {
            self.uffd
                .unregister(region.host as *mut libc::c_void, region.len)
                .map_err(|e| format!("cannot release guest memory at {:#x} from userfaultfd: {e}", region.gpa))?;
        }
        self.released = true;
        let ms = self.started.elapsed().as_millis().max(1) as u64;
        self.stats.resident_after_ms.store(ms, Ordering::Relaxed);
        log::info!("guest memory data fully loaded after {ms} ms; zero pages left to the kernel");
        Ok(())
    }

    fn gpa_of(&self, host: usize) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| host >= r.host && host < r.host + r.len)
            .map(|r| r.gpa + (host - r.host) as u64)
    }

    fn host_of(&self, gpa: u64) -> Option<usize> {
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa < r.gpa + r.len as u64)
            .map(|r| r.host + (gpa - r.gpa) as usize)
    }

    /// Copies memory block `block` into the guest and wakes whoever waits.
    fn load(&mut self, block: usize) -> Result<(), String> {
        let info = self
            .reader
            .block_info(block)
            .ok_or_else(|| format!("memory block {block} does not exist"))?;
        let host = self
            .host_of(info.guest_addr)
            .ok_or_else(|| format!("memory block {block} lies outside guest memory"))?;
        if info.kind == BlockKind::Zero {
            self.zero(host, info.len)?;
        } else {
            let data = self.reader.read_block(block, &mut self.buf).map_err(|e| {
                format!("cannot load memory block {block} (guest address {:#x}) from the checkpoint: {}", info.guest_addr, error_chain(&e))
            })?;
            copy_in(&self.uffd, data, host)?;
        }
        self.loaded[block] = true;
        if info.kind != BlockKind::Zero {
            self.data_missing -= 1;
        }
        self.release_when_done()
    }

    fn zero(&self, host: usize, len: usize) -> Result<(), String> {
        let mut done = 0;
        while done < len {
            // SAFETY: the range lies in guest memory registered with this
            // userfaultfd; UFFDIO_ZEROPAGE only maps zero pages there.
            match unsafe { self.uffd.zeropage((host + done) as *mut libc::c_void, len - done, true) } {
                Ok(n) => done += n.max(4096),
                Err(userfaultfd::Error::ZeropageFailed(e)) if e as i32 == libc::EAGAIN => {}
                // Already present: skip that page.
                Err(userfaultfd::Error::ZeropageFailed(e)) if e as i32 == libc::EEXIST => done += 4096,
                Err(e) => return Err(format!("UFFDIO_ZEROPAGE at {:#x} failed: {e}", host + done)),
            }
        }
        Ok(())
    }
}


/// Copies `data` to `host` with UFFDIO_COPY, page by page past pages that
/// are already present (EEXIST), retrying on EAGAIN.
fn copy_in(uffd: &Uffd, data: &[u8], host: usize) -> Result<(), String> {
    let mut done = 0;
    while done < data.len() {
        let src = data[done..].as_ptr() as *const libc::c_void;
        let dst = (host + done) as *mut libc::c_void;
        // SAFETY: `dst..dst+len` lies in guest memory registered with this
        // userfaultfd, and `src` points at `len` readable bytes of `data`.
        match unsafe { uffd.copy(src, dst, data.len() - done, true) } {
            Ok(n) => done += n,
            Err(userfaultfd::Error::PartiallyCopied(n)) => done += n,
            Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => {
                // A page of this block is present already: step over it.
                done = (done + 4096) & !0xfff;
            }
            Err(e) => return Err(format!("UFFDIO_COPY to {:#x} failed: {e}", host + done)),
        }
    }
    Ok(())
}


/// Loads every block of `reader` into `mem` before the VM runs (eager
/// restore), reading storage blocks in parallel. Zero blocks are skipped:
/// fresh guest memory is zero already.
pub fn load_eager(mem: &GuestMemoryMmap, reader: &Reader) -> Result<(), UffdError> {
    use vm_memory::{Bytes, GuestAddress};
    let sink = |info: &crate::checkpoint::BlockInfo, data: &[u8]| -> Result<(), crate::checkpoint::SinkError> {
        if info.kind != BlockKind::Zero {
            mem.write_slice(data, GuestAddress(info.guest_addr))?;
        }
        Ok(())
    };
    reader.read_all_parallel(0, &sink).map_err(|e| UffdError::Load(error_chain(&e)))
}

#[cfg(test)]
mod tests {
    //! The handler serves faults from this process's own threads the same
    //! way it serves KVM's: a read of a missing page blocks until the
    //! handler copies its memory block in.
    use std::sync::mpsc::Receiver;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::checkpoint::{write_checkpoint, ImageSource, WriterOptions};

    const MEM: usize = 1 << 20;
    const BLOCK: usize = 16 << 10;

    /// 1 MiB: data in blocks 1, 2 and 40..44 (one page of block 2 only),
    /// the rest zero.
    fn image() -> Vec<u8> {
        let mut image = vec![0u8; MEM];
        for (i, b) in image[BLOCK..2 * BLOCK].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        image[2 * BLOCK + 3 * 4096 + 5] = 0x5a;
        for (i, b) in image[40 * BLOCK..44 * BLOCK].iter_mut().enumerate() {
            *b = (i / 7) as u8 ^ 0xc3;
        }
        image
    }

    fn lazy(prefetch: bool) -> (tempfile::TempDir, Vec<u8>, GuestMemoryMmap, LazyMemory, Receiver<MemoryFailure>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("mem.ckpt");
        let image = image();
        let options = WriterOptions { memory_block_size: BLOCK as u32, storage_block_size: 4 * BLOCK as u32, level: 1, threads: 1, parent_index_crc: None };
        write_checkpoint(&path, &ImageSource::new(vec![(0, &image[..])]), &options, &mut |_, _| {}).expect("writes");
        let reader = Arc::new(Reader::open(&path).expect("opens"));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("guest memory");
        let (failures, failed) = channel();
        let lazy = LazyMemory::start(&mem, reader, prefetch, failures).expect("userfaultfd (run as root)");
        (dir, image, mem, lazy, failed)
    }

    fn read(mem: &GuestMemoryMmap, addr: usize, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr as u64)).expect("read");
        buf
    }

    #[test]
    fn a_fault_loads_the_whole_block_that_holds_the_page() {
        let (_dir, image, mem, lazy, failed) = lazy(false);
        // One byte in the middle of block 40 brings in all of block 40.
        assert_eq!(read(&mem, 40 * BLOCK + 5000, 1)[0], image[40 * BLOCK + 5000]);
        let report = lazy.stats();
        assert_eq!(report.faults, 1);
        assert_eq!(report.blocks_on_fault, 1);
        assert_eq!(read(&mem, 40 * BLOCK, BLOCK), image[40 * BLOCK..41 * BLOCK]);
        assert_eq!(lazy.stats().faults, 1, "the rest of the block was in already");
        // A zero block reads as zeros.
        assert!(read(&mem, 10 * BLOCK, BLOCK).iter().all(|&b| b == 0));
        assert_eq!(lazy.stats().resident_after_ms, None, "data blocks are still missing");
        assert!(failed.try_recv().is_err());
    }

    #[test]
    fn once_every_data_block_is_in_zero_blocks_are_left_to_the_kernel() {
        let (_dir, image, mem, lazy, failed) = lazy(false);
        lazy.load_all().expect("loads");
        let report = lazy.stats();
        assert_eq!(report.blocks_prefetched, 6, "blocks 1, 2 and 40..44: {report:?}");
        assert!(report.resident_after_ms.is_some());
        // Memory is released from the userfaultfd: reading all of it,
        // zero blocks included, takes no more faults.
        assert_eq!(read(&mem, 0, MEM), image);
        assert_eq!(lazy.stats().faults, report.faults);
        assert!(failed.try_recv().is_err());
    }

    #[test]
    fn prefetch_loads_the_data_in_the_background() {
        let (_dir, image, mem, lazy, failed) = lazy(true);
        let deadline = Instant::now() + Duration::from_secs(30);
        while lazy.stats().resident_after_ms.is_none() {
            assert!(Instant::now() < deadline, "prefetch did not finish: {:?}", lazy.stats());
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(read(&mem, 0, MEM), image);
        let report = lazy.stats();
        assert_eq!(report.blocks_prefetched + report.blocks_on_fault, 6, "{report:?}");
        assert!(failed.try_recv().is_err());
    }
}
