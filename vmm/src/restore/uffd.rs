//! Lazy guest memory: the VM runs at once on empty memory registered with
//! userfaultfd, and the loader fills it from a checkpoint, ahead of the
//! guest where it can and on demand where it cannot.
//!
//! Threads and their work:
//!
//! - The **fault thread** serves only faults. On a fault at guest address
//!   `gpa` it finds the memory block holding `gpa`, has the checkpoint
//!   reader read and decompress it straight into the buffer it hands to
//!   `UFFDIO_COPY` (`UFFDIO_ZEROPAGE` for zero blocks), which also wakes
//!   the faulting vCPU. Up to [`FAULT_BATCH`] missing data blocks that
//!   follow it come along in the same copy. A fault never waits behind
//!   background work: a block a loader thread has claimed but not copied
//!   yet is loaded again by the fault thread (`UFFDIO_COPY` never
//!   overwrites a present page, so whichever copy comes second only steps
//!   over the pages the first put in).
//! - **Loader threads** (up to [`MAX_LOADER_THREADS`]) load, in parallel,
//!   first the working set (see [`super::working_set`]) in its recorded
//!   order, then every other data block in file order (background
//!   prefetch), in runs of up to [`RUN_BLOCKS`] neighbouring blocks per
//!   `UFFDIO_COPY`. A loader claims each block of a run before reading
//!   it, so two loaders never read the same block. Once a loader turns to
//!   background prefetch it lowers its priority (nice 10), so that it takes
//!   a smaller share of a busy CPU than the guest.
//!
//! The working set is loaded either before the vCPUs start or while they
//! run, the faults taking priority. Before: [`preload`] decompresses it
//! straight into guest memory while KVM is being set up, before the memory
//! is registered with userfaultfd, so it needs no `UFFDIO_COPY` and the
//! guest never faults on it; the loader starts with those blocks marked
//! loaded ([`WorkingSetPlan::Preloaded`]). While they run: the loader
//! threads load it first, in its order. A restore
//! without one can record it ([`WorkingSetPlan::Record`]): for a window
//! the fault thread notes the blocks the guest faults on, in order, with
//! prefetch held back and no fault batching, then saves the list beside
//! the snapshot.
//!
//! Zero blocks are not prefetched: once every data block is in, the fault
//! thread unregisters guest memory from userfaultfd, and the pages still
//! missing (all in zero blocks) become plain anonymous memory that the
//! kernel fills with zeros on first touch, with no round trip through the
//! handler. Unregistering wakes any vCPU still waiting on such a page.
//!
//! The fault thread times each fault it serves with a load, from reading
//! the event to the copy that wakes the vCPU; `status` and the restore
//! report give the median and 99th percentile.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use userfaultfd::{Event, Uffd, UffdBuilder};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use crate::vstate::memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::working_set::{self, WorkingSet};
use crate::checkpoint::{BlockInfo, BlockKind, Reader};
use crate::error_chain;

/// Most memory blocks one fault loads: the faulted block and the missing
/// data blocks right after it (256 KiB at the default 64 KiB blocks), for
/// guests that read memory in order.
pub const FAULT_BATCH: usize = 4;

/// Most neighbouring blocks a loader thread reads and copies in at once
/// (1 MiB at the default block size).
pub const RUN_BLOCKS: usize = 16;

/// Most loader threads.
pub const MAX_LOADER_THREADS: usize = 4;

/// The nice value of a loader thread doing background prefetch.
const BACKGROUND_NICE: libc::c_int = 10;

/// Fault service times kept for the percentiles (4 MiB at most).
const MAX_TIMED_FAULTS: usize = 1 << 20;

/// Errors while setting up lazy memory.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// The userfaultfd could not be created; the text says what to change.
    #[error("cannot create a userfaultfd for lazy restore: {0}")]
    Create(String, #[source] userfaultfd::Error),
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
    /// A loader thread could not be started.
    #[error("cannot start the memory loader's threads")]
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

/// What a lazy restore does about the working set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkingSetPlan {
    /// Neither loads nor records one.
    Off,
    /// Loads `set` first.
    Load { set: WorkingSet },
    /// Records the blocks the guest faults on during `window` and saves
    /// them as the working set of snapshot directory `dir`.
    Record { window: Duration, dir: PathBuf },
    /// `set` is in guest memory already: [`preload`] put it there, in
    /// `took`, before the memory was registered.
    Preloaded { set: WorkingSet, took: Duration },
}

/// How a lazy restore loads memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LazyOptions {
    /// Load the data blocks nobody asked for in the background.
    pub prefetch: bool,
    /// The working set.
    pub working_set: WorkingSetPlan,
}

/// Where the working set stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkingSetState {
    /// None loaded or recorded.
    None,
    /// Being loaded.
    Loading,
    /// Loaded.
    Loaded,
    /// Being recorded.
    Recording,
    /// Recorded (and saved, unless a warning said otherwise).
    Recorded,
}

impl WorkingSetState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => WorkingSetState::Loading,
            2 => WorkingSetState::Loaded,
            3 => WorkingSetState::Recording,
            4 => WorkingSetState::Recorded,
            _ => WorkingSetState::None,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            WorkingSetState::None => 0,
            WorkingSetState::Loading => 1,
            WorkingSetState::Loaded => 2,
            WorkingSetState::Recording => 3,
            WorkingSetState::Recorded => 4,
        }
    }
}

/// Counters of the lazy loader.
#[derive(Debug, Default)]
pub struct LoaderStats {
    /// Page faults received.
    pub faults: AtomicU64,
    /// Memory blocks loaded because a vCPU touched them.
    pub blocks_on_fault: AtomicU64,
    /// Memory blocks loaded by background prefetch.
    pub blocks_prefetched: AtomicU64,
    /// Memory blocks loaded as the working set.
    pub blocks_working_set: AtomicU64,
    /// Milliseconds from the loader's start until every data block was
    /// in and memory was released from userfaultfd; 0 until then.
    pub resident_after_ms: AtomicU64,
    /// A [`WorkingSetState`].
    working_set_state: AtomicU8,
    /// Blocks in the working set being loaded or recorded.
    working_set_blocks: AtomicU64,
    /// Milliseconds from the loader's start until the working set was in
    /// (or its recording ended); 0 until then.
    working_set_ms: AtomicU64,
    /// Service time of each fault that loaded a block, in microseconds.
    service_us: Mutex<Vec<u32>>,
    /// Microseconds spent reading and decompressing blocks, and copying
    /// them in, by every thread: for the log.
    read_us: AtomicU64,
    copy_us: AtomicU64,
}

/// The working set part of a [`LoaderReport`].
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct WorkingSetReport {
    /// Where it stands.
    pub state: WorkingSetState,
    /// Blocks in it (recorded so far, while recording).
    pub blocks: u64,
    /// Milliseconds from the loader's start until it was loaded or its
    /// recording ended.
    pub loaded_ms: Option<u64>,
}

/// A plain copy of [`LoaderStats`].
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct LoaderReport {
    /// Page faults received.
    pub faults: u64,
    /// Memory blocks loaded on fault.
    pub blocks_on_fault: u64,
    /// Memory blocks loaded by prefetch.
    pub blocks_prefetched: u64,
    /// Memory blocks loaded as the working set.
    pub blocks_working_set: u64,
    /// Milliseconds until fully resident, if it is.
    pub resident_after_ms: Option<u64>,
    /// Median service time of a fault that loaded memory, in microseconds.
    pub fault_p50_us: Option<u64>,
    /// 99th percentile of the same.
    pub fault_p99_us: Option<u64>,
    /// The working set.
    pub working_set: WorkingSetReport,
}

impl LoaderStats {
    /// A snapshot of the counters.
    pub fn report(&self) -> LoaderReport {
        let nonzero = |v: u64| (v > 0).then_some(v);
        let mut times = self.service_us.lock().unwrap_or_else(PoisonError::into_inner).clone();
        times.sort_unstable();
        let percentile = |p: usize| {
            (!times.is_empty()).then(|| u64::from(times[((times.len() * p).div_ceil(100)).max(1) - 1]))
        };
        LoaderReport {
            faults: self.faults.load(Ordering::Relaxed),
            blocks_on_fault: self.blocks_on_fault.load(Ordering::Relaxed),
            blocks_prefetched: self.blocks_prefetched.load(Ordering::Relaxed),
            blocks_working_set: self.blocks_working_set.load(Ordering::Relaxed),
            resident_after_ms: nonzero(self.resident_after_ms.load(Ordering::Relaxed)),
            fault_p50_us: percentile(50),
            fault_p99_us: percentile(99),
            working_set: WorkingSetReport {
                state: WorkingSetState::from_u8(self.working_set_state.load(Ordering::Relaxed)),
                blocks: self.working_set_blocks.load(Ordering::Relaxed),
                loaded_ms: nonzero(self.working_set_ms.load(Ordering::Relaxed)),
            },
        }
    }

    fn set_working_set(&self, state: WorkingSetState) {
        self.working_set_state.store(state.to_u8(), Ordering::Relaxed);
    }

    fn time_fault(&self, took: Duration) {
        let mut times = self.service_us.lock().unwrap_or_else(PoisonError::into_inner);
        if times.len() < MAX_TIMED_FAULTS {
            times.push(took.as_micros().min(u128::from(u32::MAX)) as u32);
        }
    }
}

enum Control {
    /// Load every data block still missing, release the memory, then answer.
    LoadAll(Sender<Result<(), String>>),
    /// Say which blocks are in guest memory.
    Resident(Sender<Option<Vec<bool>>>),
}

/// The VMM's handle on the loader.
pub struct LazyMemory {
    shared: Arc<Shared>,
    control: Sender<Control>,
    threads: Vec<JoinHandle<()>>,
}

/// A block's state, in [`Shared::state`].
const MISSING: u8 = 0;
/// A loader thread is reading it.
const CLAIMED: u8 = 1;
/// In guest memory.
const LOADED: u8 = 2;

/// What the fault thread and the loader threads share.
struct Shared {
    uffd: Uffd,
    regions: Vec<HostRegion>,
    reader: Arc<Reader>,
    /// Every block's info, resolved through the chain once.
    infos: Vec<BlockInfo>,
    state: Vec<AtomicU8>,
    /// Blocks with some of their pages in and the rest missing: pages
    /// loaded alone while recording, or the guest's pages of a preloaded
    /// block. Completed before [`LazyMemory::resident`] answers.
    partial: Vec<AtomicBool>,
    /// Data (non-zero) blocks not loaded yet.
    data_missing: AtomicUsize,
    /// Guest memory is (being) unregistered from the userfaultfd.
    released: AtomicBool,
    /// Load data blocks nobody asked for.
    prefetch: AtomicBool,
    /// Faults are being recorded: loader threads wait.
    recording: AtomicBool,
    /// The loader is shutting down.
    stop: AtomicBool,
    stats: LoaderStats,
    started: Instant,
    /// Wakes the fault thread (control requests, release, failures).
    wake: EventFd,
    work: Mutex<Work>,
    /// Signalled when there may be work, or the working set is in.
    work_cv: Condvar,
    /// The first failure of a loader thread.
    failure: Mutex<Option<String>>,
}

/// The loader threads' queue.
struct Work {
    /// The working set, in order.
    set: Vec<usize>,
    /// Which blocks are in it.
    in_set: Vec<bool>,
    /// Next entry of `set` to load.
    set_next: usize,
    /// Working set runs being loaded now.
    set_in_flight: usize,
    /// The working set is in.
    set_done: bool,
    /// Next block for background prefetch.
    next_prefetch: usize,
}

/// A run of neighbouring blocks for one copy.
#[derive(Debug, Clone, Copy)]
struct Run {
    first: usize,
    count: usize,
    /// Loaded as the working set.
    working_set: bool,
}

impl LazyMemory {
    /// Registers every region of `mem` with a new userfaultfd and starts
    /// the loader serving it from `reader`. A failure while serving is
    /// reported once on `failures`.
    pub fn start<T: From<MemoryFailure> + Send + 'static>(
        mem: &GuestMemoryMmap,
        reader: Arc<Reader>,
        options: LazyOptions,
        failures: Sender<T>,
    ) -> Result<Self, UffdError> {
        // Not user-mode-only: most faults come from KVM, in the kernel.
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(|e| UffdError::Create(create_hint(&e), e))?;
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
        let mut infos = Vec::with_capacity(reader.block_count());
        for i in 0..reader.block_count() {
            let info = reader.block_info(i).ok_or(UffdError::Layout { gpa: 0 })?;
            let end = info.guest_addr + info.len as u64;
            let fits = regions.iter().any(|r| info.guest_addr >= r.gpa && end <= r.gpa + r.len as u64);
            if !fits {
                return Err(UffdError::Layout { gpa: info.guest_addr });
            }
            infos.push(info);
        }
        let mut data_missing = infos.iter().filter(|info| info.kind != BlockKind::Zero).count();
        let count = infos.len();
        let (set, record, preloaded) = match options.working_set {
            WorkingSetPlan::Off => (Vec::new(), None, None),
            WorkingSetPlan::Load { set } => (set.blocks, None, None),
            WorkingSetPlan::Record { window, dir } => (Vec::new(), Some((window, dir)), None),
            WorkingSetPlan::Preloaded { set, took } => (Vec::new(), None, Some((set, took))),
        };
        let state: Vec<AtomicU8> = (0..count).map(|_| AtomicU8::new(MISSING)).collect();
        let partial: Vec<AtomicBool> = (0..count).map(|_| AtomicBool::new(false)).collect();
        let mut in_set = vec![false; count];
        for &b in &set {
            if let Some(slot) = in_set.get_mut(b) {
                *slot = true;
            }
        }
        let stats = LoaderStats::default();
        if let Some((set, took)) = &preloaded {
            // A block the preload filled only the guest's pages of stays
            // missing: its other pages fault in (the copy steps over the
            // pages that are in).
            let block_size = reader.header().memory_block_size as usize;
            let mut in_place = 0;
            for (i, &b) in set.blocks.iter().enumerate() {
                if b >= count {
                    continue;
                }
                in_place += 1;
                let whole = set.page_mask(i, block_size).is_none_or(|mask| working_set::covers(mask, infos[b].len));
                if !whole {
                    partial[b].store(true, Ordering::Relaxed);
                } else if state[b].swap(LOADED, Ordering::Relaxed) != LOADED && infos[b].kind != BlockKind::Zero {
                    data_missing -= 1;
                }
            }
            stats.set_working_set(WorkingSetState::Loaded);
            stats.working_set_blocks.store(in_place, Ordering::Relaxed);
            stats.blocks_working_set.store(in_place, Ordering::Relaxed);
            stats.working_set_ms.store((took.as_millis() as u64).max(1), Ordering::Relaxed);
        } else if record.is_some() {
            stats.set_working_set(WorkingSetState::Recording);
        } else if !set.is_empty() {
            stats.set_working_set(WorkingSetState::Loading);
            stats.working_set_blocks.store(set.len() as u64, Ordering::Relaxed);
        }
        let shared = Arc::new(Shared {
            uffd,
            regions,
            reader,
            infos,
            state,
            partial,
            data_missing: AtomicUsize::new(data_missing),
            released: AtomicBool::new(false),
            prefetch: AtomicBool::new(options.prefetch),
            recording: AtomicBool::new(record.is_some()),
            stop: AtomicBool::new(false),
            stats,
            started: Instant::now(),
            wake: EventFd::new(EFD_NONBLOCK).map_err(UffdError::EventFd)?,
            work: Mutex::new(Work {
                set_done: set.is_empty(),
                set,
                in_set,
                set_next: 0,
                set_in_flight: 0,
                next_prefetch: 0,
            }),
            work_cv: Condvar::new(),
            failure: Mutex::new(None),
        });
        let (control, control_rx) = channel();
        let mut lazy = LazyMemory { shared: shared.clone(), control, threads: Vec::new() };
        let loaders = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, MAX_LOADER_THREADS);
        for i in 0..loaders {
            let shared = shared.clone();
            let thread = std::thread::Builder::new()
                .name(format!("mem-loader{i}"))
                .spawn(move || {
                    crate::seccomp::confine_or_exit(crate::seccomp::ThreadKind::PageFault);
                    shared.loader_thread()
                })
                .map_err(UffdError::Spawn)?;
            lazy.threads.push(thread);
        }
        let block_size = shared.reader.header().memory_block_size as usize;
        let handler = FaultThread {
            reader: shared.reader.try_clone().map_err(|e| UffdError::Load(error_chain(&e)))?,
            shared: shared.clone(),
            buf: vec![0u8; FAULT_BATCH * shared.reader.header().memory_block_size as usize],
            page_bits: if record.is_some() { vec![0; count * working_set::mask_words(block_size)] } else { Vec::new() },
            page_source: None,
            page_buf: if record.is_some() { vec![0; block_size] } else { Vec::new() },
            record,
            recorded: Vec::new(),
            seen: vec![false; count],
        };
        let thread = std::thread::Builder::new()
            .name("uffd-handler".into())
            .spawn(move || {
                crate::seccomp::confine_or_exit(crate::seccomp::ThreadKind::PageFault);
                if let Err(msg) = handler.run(&control_rx) {
                    log::error!("{msg}");
                    let _ = failures.send(T::from(MemoryFailure(msg)));
                }
            })
            .map_err(UffdError::Spawn)?;
        lazy.threads.push(thread);
        Ok(lazy)
    }

    /// Waits until the working set the loader threads load is in (at once
    /// when there is none). A restore never waits so: a working set wanted
    /// before the vCPUs start is preloaded instead ([`preload`]).
    #[cfg(test)]
    pub fn wait_working_set(&self) -> Result<(), UffdError> {
        let shared = &self.shared;
        let mut work = shared.work.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(msg) = shared.failure.lock().unwrap_or_else(PoisonError::into_inner).clone() {
                return Err(UffdError::Load(msg));
            }
            if work.set_done {
                return Ok(());
            }
            work = shared
                .work_cv
                .wait_timeout(work, Duration::from_millis(100))
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// The loader's counters.
    pub fn stats(&self) -> LoaderReport {
        self.shared.stats.report()
    }

    /// Loads every data block still missing and releases guest memory from
    /// userfaultfd; returns once that is done.
    pub fn load_all(&self) -> Result<(), UffdError> {
        let (tx, rx) = channel();
        self.control.send(Control::LoadAll(tx)).map_err(|_| UffdError::HandlerGone)?;
        let _ = self.shared.wake.write(1);
        rx.recv().map_err(|_| UffdError::HandlerGone)?.map_err(UffdError::Load)
    }

    /// The checkpoint memory is loaded from.
    pub fn reader(&self) -> &Arc<Reader> {
        &self.shared.reader
    }

    /// Which checkpoint blocks are in guest memory now (by the reader's
    /// block index); `None` once every data block is in and memory is
    /// released, when all of memory is the guest's own. A block not in
    /// holds exactly what the checkpoint holds: the guest cannot have
    /// written it without faulting it in first.
    pub fn resident(&self) -> Result<Option<Vec<bool>>, UffdError> {
        let (tx, rx) = channel();
        self.control.send(Control::Resident(tx)).map_err(|_| UffdError::HandlerGone)?;
        let _ = self.shared.wake.write(1);
        rx.recv().map_err(|_| UffdError::HandlerGone)
    }

    /// Stops or restarts background prefetch.
    pub fn set_prefetch(&self, on: bool) {
        self.shared.prefetch.store(on, Ordering::Relaxed);
        self.shared.work_cv.notify_all();
    }
}

impl Drop for LazyMemory {
    /// Stops every loader thread before guest memory can go: a thread that
    /// outlived it could copy into whatever is mapped at those addresses
    /// next (UFFDIO_COPY checks only that the range is registered with
    /// some userfaultfd).
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.work_cv.notify_all();
        let _ = self.shared.wake.write(1);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

struct HostRegion {
    gpa: u64,
    host: usize,
    len: usize,
}

/// How long the fault thread sleeps in poll with nothing to do.
const IDLE_POLL: Duration = Duration::from_millis(500);

impl Shared {
    fn is_data(&self, block: usize) -> bool {
        self.infos[block].kind != BlockKind::Zero
    }

    /// Claims a missing block for a loader thread.
    fn claim(&self, block: usize) -> bool {
        self.state[block].compare_exchange(MISSING, CLAIMED, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }

    fn host_of(&self, gpa: u64) -> Option<usize> {
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa < r.gpa + r.len as u64)
            .map(|r| r.host + (gpa - r.gpa) as usize)
    }

    fn gpa_of(&self, host: usize) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| host >= r.host && host < r.host + r.len)
            .map(|r| r.gpa + (host - r.host) as u64)
    }

    /// Whether `next` follows `block` directly in guest and host memory,
    /// so both fit in one copy.
    fn adjacent(&self, block: usize, next: usize) -> bool {
        let (a, b) = (&self.infos[block], &self.infos[next]);
        a.guest_addr + a.len as u64 == b.guest_addr
            && self.host_of(a.guest_addr).zip(self.host_of(b.guest_addr)).is_some_and(|(ha, hb)| ha + a.len == hb)
    }

    /// Extends a run starting at claimed block `first` with the blocks
    /// after it that `wanted` accepts and this thread can claim, up to
    /// `limit` blocks. Zero blocks make runs of one.
    fn extend_run(&self, first: usize, limit: usize, wanted: impl Fn(usize) -> bool) -> usize {
        let mut count = 1;
        if !self.is_data(first) {
            return count;
        }
        while count < limit {
            let next = first + count;
            if next >= self.infos.len()
                || !self.is_data(next)
                || !wanted(next)
                || !self.adjacent(next - 1, next)
                || !self.claim(next)
            {
                break;
            }
            count += 1;
        }
        count
    }

    /// The next run for a loader thread: working set first, then (with
    /// prefetch on and no recording) the data blocks in file order.
    fn next_run(&self, work: &mut Work) -> Option<Run> {
        while work.set_next < work.set.len() {
            let first = work.set[work.set_next];
            work.set_next += 1;
            if self.claim(first) {
                let count = self.extend_run(first, RUN_BLOCKS, |b| work.in_set[b]);
                work.set_in_flight += 1;
                return Some(Run { first, count, working_set: true });
            }
        }
        if !work.set_done && work.set_in_flight == 0 {
            self.working_set_in(work);
        }
        if !self.prefetch.load(Ordering::Relaxed) || self.recording.load(Ordering::Relaxed) {
            return None;
        }
        while work.next_prefetch < self.infos.len() {
            let first = work.next_prefetch;
            work.next_prefetch += 1;
            if self.is_data(first) && self.claim(first) {
                let count = self.extend_run(first, RUN_BLOCKS, |_| true);
                work.next_prefetch = first + count;
                return Some(Run { first, count, working_set: false });
            }
        }
        None
    }

    fn working_set_in(&self, work: &mut Work) {
        work.set_done = true;
        if !work.set.is_empty() {
            let ms = self.started.elapsed().as_millis().max(1) as u64;
            self.stats.working_set_ms.store(ms, Ordering::Relaxed);
            self.stats.set_working_set(WorkingSetState::Loaded);
            log::info!(
                "working set of {} blocks loaded after {ms} ms ({} ms reading and decompressing, {} ms copying, over all threads)",
                work.set.len(),
                self.stats.read_us.load(Ordering::Relaxed) / 1000,
                self.stats.copy_us.load(Ordering::Relaxed) / 1000
            );
        }
        self.work_cv.notify_all();
    }

    fn loader_thread(&self) {
        let mut buf = vec![0u8; RUN_BLOCKS * self.reader.header().memory_block_size as usize];
        let mut background = false;
        loop {
            let run = {
                let mut work = self.work.lock().unwrap_or_else(PoisonError::into_inner);
                loop {
                    if self.stop.load(Ordering::Relaxed) || self.released.load(Ordering::Relaxed) {
                        return;
                    }
                    if let Some(run) = self.next_run(&mut work) {
                        break run;
                    }
                    work = self
                        .work_cv
                        .wait_timeout(work, IDLE_POLL)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            };
            if !run.working_set && !background {
                background = true;
                run_in_background();
            }
            let result = self.load_run(&self.reader, run, &mut buf);
            let counter = if run.working_set { &self.stats.blocks_working_set } else { &self.stats.blocks_prefetched };
            counter.fetch_add(run.count as u64, Ordering::Relaxed);
            if run.working_set {
                let mut work = self.work.lock().unwrap_or_else(PoisonError::into_inner);
                work.set_in_flight -= 1;
                if work.set_next == work.set.len() && work.set_in_flight == 0 && !work.set_done {
                    self.working_set_in(&mut work);
                }
            }
            if let Err(msg) = result {
                self.failure.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(msg);
                self.work_cv.notify_all();
                let _ = self.wake.write(1);
                return;
            }
        }
    }

    /// Reads the blocks of `run` into `buf`, each decompressed in place,
    /// and copies them into guest memory in one go, waking whoever waits
    /// on them.
    fn load_run(&self, reader: &Reader, run: Run, buf: &mut [u8]) -> Result<(), String> {
        let first = &self.infos[run.first];
        let host = self
            .host_of(first.guest_addr)
            .ok_or_else(|| format!("memory block {} lies outside guest memory", run.first))?;
        if first.kind == BlockKind::Zero {
            self.zero(host, first.len)?;
        } else {
            let mut len = 0;
            let began = Instant::now();
            for block in run.first..run.first + run.count {
                let info = &self.infos[block];
                reader.read_block(block, &mut buf[len..len + info.len]).map_err(|e| load_failed(info, &e))?;
                len += info.len;
            }
            let read = began.elapsed();
            self.copy_in(&buf[..len], host)?;
            self.stats.read_us.fetch_add(read.as_micros() as u64, Ordering::Relaxed);
            self.stats.copy_us.fetch_add((began.elapsed() - read).as_micros() as u64, Ordering::Relaxed);
        }
        for block in run.first..run.first + run.count {
            self.mark_loaded(block);
        }
        Ok(())
    }

    /// Marks `block` loaded, counting it off once; the last data block
    /// wakes the fault thread to release memory.
    fn mark_loaded(&self, block: usize) {
        if self.state[block].swap(LOADED, Ordering::AcqRel) != LOADED
            && self.is_data(block)
            && self.data_missing.fetch_sub(1, Ordering::AcqRel) == 1
        {
            let _ = self.wake.write(1);
        }
    }

    /// Whether a failed copy may be ignored: memory was released meanwhile
    /// (the block was loaded twice, and the other copy was the last).
    fn released_meanwhile(&self, errno: i32) -> bool {
        errno == libc::ENOENT && self.released.load(Ordering::Acquire)
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
                Err(userfaultfd::Error::ZeropageFailed(e)) if self.released_meanwhile(e as i32) => return Ok(()),
                Err(e) => return Err(format!("UFFDIO_ZEROPAGE at {:#x} failed: {e}", host + done)),
            }
        }
        Ok(())
    }

    /// Copies `data` to `host` with UFFDIO_COPY, page by page past pages
    /// that are already present (EEXIST), retrying on EAGAIN.
    fn copy_in(&self, data: &[u8], host: usize) -> Result<(), String> {
        let mut done = 0;
        while done < data.len() {
            let src = data[done..].as_ptr() as *const libc::c_void;
            let dst = (host + done) as *mut libc::c_void;
            // SAFETY: `dst..dst+len` lies in guest memory registered with
            // this userfaultfd, and `src` points at `len` readable bytes of
            // `data`.
            match unsafe { self.uffd.copy(src, dst, data.len() - done, true) } {
                Ok(n) => done += n,
                Err(userfaultfd::Error::PartiallyCopied(n)) => done += n,
                Err(userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => {
                    // A page of this range is present already: step over it.
                    done = (done + 4096) & !0xfff;
                }
                Err(userfaultfd::Error::CopyFailed(e)) if self.released_meanwhile(e as i32) => return Ok(()),
                Err(e) => return Err(format!("UFFDIO_COPY to {:#x} failed: {e}", host + done)),
            }
        }
        Ok(())
    }
}

/// Lowers the calling thread's priority (nice +[`BACKGROUND_NICE`]):
/// background prefetch takes a smaller share of a busy CPU than the vCPUs
/// and the fault thread. Not `SCHED_IDLE`: a thread that gets no CPU time
/// at all while it holds a lock (the address space's, in `UFFDIO_COPY`)
/// would stall every thread waiting for it, the fault thread included.
/// Any thread may lower its own priority; a failure leaves it as it was.
fn run_in_background() {
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as libc::id_t;
    // SAFETY: plain syscall on this thread's own id.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, BACKGROUND_NICE) } != 0 {
        log::debug!("background prefetch stays at normal priority: {}", std::io::Error::last_os_error());
    }
}

/// The thread serving faults.
struct FaultThread {
    shared: Arc<Shared>,
    /// A reader of its own, sharing no lock with the loader threads'.
    reader: Reader,
    buf: Vec<u8>,
    /// Recording: for how long, and the snapshot directory to save into.
    record: Option<(Duration, PathBuf)>,
    /// Blocks faulted on while recording, in order.
    recorded: Vec<usize>,
    seen: Vec<bool>,
    /// While recording: the pages faulted on, `mask_words` words of bits
    /// per block of the checkpoint.
    page_bits: Vec<u64>,
    /// While recording: the block last decompressed for a page of it, and
    /// its data.
    page_source: Option<usize>,
    page_buf: Vec<u8>,
}

impl FaultThread {
    fn run(mut self, control: &Receiver<Control>) -> Result<(), String> {
        let shared = self.shared.clone();
        // A checkpoint of zero blocks only has nothing to load.
        self.release_when_done()?;
        let mut fds = [
            libc::pollfd { fd: shared.uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: shared.wake.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        loop {
            if shared.released.load(Ordering::Acquire) {
                // A negative fd is ignored by poll: no faults come any more.
                fds[0].fd = -1;
            }
            let timeout = match &self.record {
                Some((window, _)) => window.saturating_sub(shared.started.elapsed()).min(IDLE_POLL),
                None => IDLE_POLL,
            };
            // SAFETY: `fds` is a valid array of two pollfds for the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout.as_millis() as libc::c_int) };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(format!("page fault handler: poll failed: {err}"));
            }
            if fds[1].revents & libc::POLLIN != 0 {
                let _ = shared.wake.read();
            }
            if shared.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            if let Some(msg) = shared.failure.lock().unwrap_or_else(PoisonError::into_inner).clone() {
                return Err(msg);
            }
            self.serve_faults()?;
            if self.record.as_ref().is_some_and(|(window, _)| shared.started.elapsed() >= *window) {
                self.finish_recording();
            }
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
                    Ok(Control::Resident(reply)) => {
                        // A block "not resident" must hold exactly what the
                        // checkpoint holds; one with some pages in may hold
                        // the guest's writes, so it is made whole first.
                        self.complete_partial_blocks()?;
                        let resident = (!shared.released.load(Ordering::Acquire))
                            .then(|| shared.state.iter().map(|s| s.load(Ordering::Acquire) == LOADED).collect());
                        let _ = reply.send(resident);
                    }
                    Err(std::sync::mpsc::TryRecvError::Empty) => break,
                    // The VMM is gone; so is the guest.
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => return Ok(()),
                }
            }
            self.release_when_done()?;
        }
    }

    /// Serves every fault queued on the userfaultfd.
    fn serve_faults(&mut self) -> Result<(), String> {
        let shared = self.shared.clone();
        // After the release, the memory is no longer registered: an event
        // still queued is stale (unregistering woke its vCPU).
        while !shared.released.load(Ordering::Acquire) {
            let event = match shared.uffd.read_event() {
                Ok(Some(event)) => event,
                Ok(None) => return Ok(()),
                Err(e) => return Err(format!("page fault handler: cannot read a fault: {e}")),
            };
            let Event::Pagefault { addr, .. } = event else { continue };
            let began = Instant::now();
            shared.stats.faults.fetch_add(1, Ordering::Relaxed);
            let host = addr as usize;
            let gpa = shared
                .gpa_of(host)
                .ok_or_else(|| format!("page fault at host address {host:#x} outside guest memory"))?;
            let block = shared
                .reader
                .block_of(gpa)
                .ok_or_else(|| format!("page fault at guest address {gpa:#x}, which the checkpoint does not hold"))?;
            if self.record.is_some() && !std::mem::replace(&mut self.seen[block], true) {
                self.recorded.push(block);
                shared.stats.working_set_blocks.store(self.recorded.len() as u64, Ordering::Relaxed);
            }
            if shared.state[block].load(Ordering::Acquire) == LOADED {
                // Another vCPU faulted on the same block before it was in;
                // the copy already woke it, but waking twice is harmless.
                let page = host & !0xfff;
                let _ = shared.uffd.wake(page as *mut libc::c_void, 4096);
                continue;
            }
            if self.record.is_some() {
                // Recording: this page alone, so each page the guest needs
                // shows as a fault of its own.
                self.load_page(block, host)?;
                shared.stats.time_fault(began.elapsed());
                continue;
            }
            // A block a loader thread claimed is loaded here as well rather
            // than waited for. Neighbours come along only when unclaimed,
            // and not while recording, which must see each block the guest
            // needs as a fault of its own.
            let _ = shared.claim(block);
            let limit = if self.record.is_some() { 1 } else { FAULT_BATCH };
            let count = shared.extend_run(block, limit, |_| true);
            // Counted before the copy wakes the vCPU, so a report taken
            // after the access includes it.
            shared.stats.blocks_on_fault.fetch_add(count as u64, Ordering::Relaxed);
            shared.load_run(&self.reader, Run { first: block, count, working_set: false }, &mut self.buf)?;
            shared.stats.time_fault(began.elapsed());
            // The copy woke the vCPU, unless every page was in already (a
            // loader's copy of the same block came first, and woke it then):
            // waking again is harmless and leaves no path without a wake.
            let page = host & !0xfff;
            let _ = shared.uffd.wake(page as *mut libc::c_void, 4096);
        }
        Ok(())
    }

    /// Loads the rest of every block that has only some of its pages in.
    fn complete_partial_blocks(&mut self) -> Result<(), String> {
        let shared = self.shared.clone();
        if shared.released.load(Ordering::Acquire) {
            return Ok(());
        }
        for block in 0..shared.infos.len() {
            if shared.partial[block].load(Ordering::Acquire) && shared.state[block].load(Ordering::Acquire) != LOADED {
                let _ = shared.claim(block);
                shared.load_run(&self.reader, Run { first: block, count: 1, working_set: false }, &mut self.buf)?;
            }
        }
        Ok(())
    }

    /// Loads the page at `host` of `block` alone, while recording, and
    /// notes it. The rest of the block stays missing, for its own faults
    /// (and for prefetch once the recording ends: a copy steps over pages
    /// that are in).
    fn load_page(&mut self, block: usize, host: usize) -> Result<(), String> {
        let shared = self.shared.clone();
        let info = &shared.infos[block];
        let page = host & !0xfff;
        let start = shared
            .host_of(info.guest_addr)
            .ok_or_else(|| format!("memory block {block} lies outside guest memory"))?;
        let index = (page - start) / 4096;
        shared.partial[block].store(true, Ordering::Release);
        let words = working_set::mask_words(shared.reader.header().memory_block_size as usize);
        self.page_bits[block * words + index / 64] |= 1 << (index % 64);
        if shared.is_data(block) {
            if self.page_source != Some(block) {
                self.page_source = None;
                self.reader.read_block(block, &mut self.page_buf[..info.len]).map_err(|e| load_failed(info, &e))?;
                self.page_source = Some(block);
            }
            let offset = page - start;
            shared.copy_in(&self.page_buf[offset..offset + 4096], page)?;
        } else {
            shared.zero(page, 4096)?;
        }
        // The copy woke the vCPU unless the page was in already.
        let _ = shared.uffd.wake(page as *mut libc::c_void, 4096);
        Ok(())
    }

    /// Ends the recording: loader threads may start, and the list is
    /// saved by a thread of its own.
    fn finish_recording(&mut self) {
        let Some((window, dir)) = self.record.take() else { return };
        let shared = &self.shared;
        let blocks = std::mem::take(&mut self.recorded);
        let words = working_set::mask_words(shared.reader.header().memory_block_size as usize);
        let pages = blocks.iter().flat_map(|&b| self.page_bits[b * words..(b + 1) * words].iter().copied()).collect();
        self.page_bits = Vec::new();
        self.page_buf = Vec::new();
        let set = WorkingSet { blocks, pages, window_ms: window.as_millis() as u64 };
        shared.stats.working_set_ms.store(shared.started.elapsed().as_millis().max(1) as u64, Ordering::Relaxed);
        shared.stats.set_working_set(WorkingSetState::Recorded);
        shared.recording.store(false, Ordering::Relaxed);
        shared.work_cv.notify_all();
        let reader = shared.reader.clone();
        let spawned = std::thread::Builder::new().name("working-set".into()).spawn(move || {
            match working_set::save(&dir, &reader, &set) {
                Ok(path) => log::info!(
                    "working set of {} blocks ({} pages) saved to {}",
                    set.blocks.len(),
                    set.page_count(reader.header().memory_block_size as usize),
                    path.display()
                ),
                Err(e) => log::warn!("{}", error_chain(&e)),
            }
        });
        if let Err(e) = spawned {
            log::warn!("cannot save the working set: cannot start a thread: {e}");
        }
    }

    /// Loads every data block still missing, serving faults in between.
    fn load_all(&mut self) -> Result<(), String> {
        let shared = self.shared.clone();
        for block in 0..shared.infos.len() {
            self.serve_faults()?;
            if shared.is_data(block) && shared.state[block].load(Ordering::Acquire) != LOADED {
                let _ = shared.claim(block);
                shared.stats.blocks_prefetched.fetch_add(1, Ordering::Relaxed);
                shared.load_run(&self.reader, Run { first: block, count: 1, working_set: false }, &mut self.buf)?;
            }
        }
        self.release_when_done()
    }

    /// Once every data block is in, unregisters guest memory from the
    /// userfaultfd: what is still missing lies in zero blocks, which the
    /// kernel fills with zeros on first touch. Unregistering wakes any
    /// vCPU waiting on such a page.
    fn release_when_done(&mut self) -> Result<(), String> {
        let shared = self.shared.clone();
        if shared.released.load(Ordering::Acquire) || shared.data_missing.load(Ordering::Acquire) > 0 {
            return Ok(());
        }
        // The recording ends here too: no fault can come any more.
        self.finish_recording();
        // Set first: a loader thread's copy of a block loaded twice may
        // then meet unregistered memory, which it must take for done.
        shared.released.store(true, Ordering::Release);
        shared.work_cv.notify_all();
        for region in &shared.regions {
            shared
                .uffd
                .unregister(region.host as *mut libc::c_void, region.len)
                .map_err(|e| format!("cannot release guest memory at {:#x} from userfaultfd: {e}", region.gpa))?;
        }
        let ms = shared.started.elapsed().as_millis().max(1) as u64;
        shared.stats.resident_after_ms.store(ms, Ordering::Relaxed);
        log::info!("guest memory data fully loaded after {ms} ms; zero pages left to the kernel");
        Ok(())
    }
}

/// A run of neighbouring working set blocks for [`preload`].
struct PreloadRun {
    host: usize,
    len: usize,
    /// Zero blocks only, else data blocks only.
    zero: bool,
    blocks: std::ops::Range<usize>,
}

/// Loads the blocks of `set` straight into guest memory that is not
/// registered with userfaultfd yet, in parallel, and returns how long it
/// took. Nothing else may touch `mem` meanwhile: no vCPU runs and no
/// device is attached yet.
///
/// This is the working set loaded "before" the vCPUs start, at a lower
/// cost than through the loader: each whole block is decompressed straight
/// into guest memory, so there is no buffer and no `UFFDIO_COPY` (whose
/// copy, page by page in the kernel, costs as much as the decompression);
/// the pages are first allocated in one `MADV_POPULATE_WRITE` per run of
/// blocks rather than one page fault each. Of a block whose page mask
/// names only some of its pages, only those are allocated and filled, from
/// the block decompressed into a buffer: the guest touched about a quarter
/// of the pages of its set's blocks, and allocating a page costs about as
/// much as decompressing it. Zero blocks get the kernel's shared zero page
/// (`MADV_POPULATE_READ`), so they fault neither into the handler nor into
/// a fresh page until the guest writes them. Once the memory is
/// registered, these pages are present: the guest never faults on them.
/// Blocks outside the checkpoint are skipped; a block that cannot be read
/// fails the restore, naming it.
pub fn preload(mem: &GuestMemoryMmap, reader: &Reader, set: &WorkingSet) -> Result<Duration, UffdError> {
    let began = Instant::now();
    let block_size = reader.header().memory_block_size as usize;
    let mut blocks: Vec<(usize, Option<&[u64]>)> = set
        .blocks
        .iter()
        .enumerate()
        .filter(|&(_, &b)| b < reader.block_count())
        .map(|(i, &b)| (b, set.page_mask(i, block_size)))
        .collect();
    blocks.sort_unstable_by_key(|&(b, _)| b);
    blocks.dedup_by_key(|&mut (b, _)| b);
    let mut infos = Vec::with_capacity(blocks.len());
    for &(b, mask) in &blocks {
        let info = reader.block_info(b).ok_or(UffdError::Layout { gpa: 0 })?;
        // The whole block must lie in one region of guest memory.
        let slice = mem
            .get_slice(vm_memory::GuestAddress(info.guest_addr), info.len)
            .map_err(|_| UffdError::Layout { gpa: info.guest_addr })?;
        let mask = mask.filter(|m| !working_set::covers(m, info.len));
        infos.push((info, slice.ptr_guard_mut().as_ptr() as usize, mask));
    }
    let mut runs: Vec<PreloadRun> = Vec::new();
    for (i, (info, host, mask)) in infos.iter().enumerate() {
        let zero = info.kind == BlockKind::Zero;
        // A block loaded in part is a run of its own.
        if let Some(run) = runs.last_mut().filter(|_| mask.is_none()) {
            let (last, _, last_mask) = &infos[run.blocks.end - 1];
            if run.zero == zero
                && last_mask.is_none()
                && run.blocks.len() < RUN_BLOCKS
                && last.index + 1 == info.index
                && last.guest_addr + last.len as u64 == info.guest_addr
                && run.host + run.len == *host
            {
                run.len += info.len;
                run.blocks.end = i + 1;
                continue;
            }
        }
        runs.push(PreloadRun { host: *host, len: info.len, zero, blocks: i..i + 1 });
    }
    // No transparent huge pages while populating: a write (or populate)
    // of one page could otherwise bring in a whole zeroed 2 MiB page,
    // whose other pages, present once memory is registered, would never
    // fault and so never get their data. `allow_huge_pages` undoes this
    // once memory is registered.
    for region in mem.iter() {
        let host = mem
            .get_host_address(region.start_addr())
            .map_err(|_| UffdError::Layout { gpa: region.start_addr().0 })?;
        // SAFETY: the range is one region of guest memory; the advice
        // changes no content.
        if unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_NOHUGEPAGE) } != 0 {
            return Err(UffdError::Load(format!(
                "cannot turn transparent huge pages off for guest memory at {:#x}: {}",
                region.start_addr().0,
                std::io::Error::last_os_error()
            )));
        }
    }
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let failure: Mutex<Option<String>> = Mutex::new(None);
    // CPU time populating and reading (decompressing), for the log: a
    // thread's wall time would count the CPU it shares with the KVM set-up.
    let (populate_us, read_us) = (AtomicU64::new(0), AtomicU64::new(0));
    let pages = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, MAX_LOADER_THREADS);
    let work = || {
        // A partly loaded block is decompressed here first.
        let mut buf = Vec::new();
        while !failed.load(Ordering::Relaxed) {
            let Some(run) = runs.get(next.fetch_add(1, Ordering::Relaxed)) else { return };
            // Only a run of one block has a mask: that block's.
            let mask = infos[run.blocks.start].2;
            let populating = thread_cpu_time();
            let advice = if run.zero { MADV_POPULATE_READ } else { MADV_POPULATE_WRITE };
            // The ranges to allocate: the run, or each stretch of
            // neighbouring pages of the mask.
            let ranges: Vec<(usize, usize)> = match mask {
                None => vec![(0, run.len)],
                Some(mask) => page_stretches(mask, run.len),
            };
            for &(offset, len) in &ranges {
                pages.fetch_add(len.div_ceil(4096), Ordering::Relaxed);
                // SAFETY: the range is guest memory, mapped for the life of
                // the process; populating it changes no content. A kernel
                // without the advice (before 5.14) refuses it, and the
                // pages then come in on first touch below.
                unsafe { libc::madvise((run.host + offset) as *mut libc::c_void, len, advice) };
            }
            let reading = thread_cpu_time();
            populate_us.fetch_add((reading - populating).as_micros() as u64, Ordering::Relaxed);
            if run.zero {
                continue;
            }
            for (info, host, _) in &infos[run.blocks.clone()] {
                let result = if mask.is_none() {
                    // SAFETY: `host..host + info.len` is this block's part
                    // of guest memory (checked above), which no other
                    // thread touches until the preload is done: each block
                    // is in one run, each run taken by one thread, no vCPU
                    // runs yet.
                    let dst = unsafe { std::slice::from_raw_parts_mut(*host as *mut u8, info.len) };
                    reader.read_block(info.index, dst).map(|_| ())
                } else {
                    buf.resize(info.len, 0);
                    reader.read_block(info.index, &mut buf).map(|data| {
                        for &(offset, len) in &ranges {
                            let src = &data[offset..offset + len];
                            // SAFETY: as above; `offset..offset + len` lies
                            // in the block (page_stretches keeps to it).
                            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), (host + offset) as *mut u8, len) };
                        }
                    })
                };
                if let Err(e) = result {
                    failed.store(true, Ordering::Relaxed);
                    failure.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(load_failed(info, &e));
                    return;
                }
            }
            read_us.fetch_add((thread_cpu_time() - reading).as_micros() as u64, Ordering::Relaxed);
        }
    };
    std::thread::scope(|s| {
        for _ in 1..threads {
            s.spawn(work);
        }
        work();
    });
    if let Some(msg) = failure.into_inner().unwrap_or_else(PoisonError::into_inner) {
        return Err(UffdError::Load(msg));
    }
    let took = began.elapsed();
    log::info!(
        "working set of {} blocks ({} pages, {} runs) loaded into guest memory in {} ms, before registering it \
         (CPU time: {} ms allocating pages, {} ms reading and decompressing, over {threads} threads)",
        blocks.len(),
        pages.into_inner(),
        runs.len(),
        took.as_millis(),
        populate_us.into_inner() / 1000,
        read_us.into_inner() / 1000,
    );
    Ok(took)
}

/// The stretches of neighbouring pages `mask` names in a block of `len`
/// bytes, as (offset, length) in bytes.
fn page_stretches(mask: &[u64], len: usize) -> Vec<(usize, usize)> {
    let pages = len.div_ceil(4096);
    let mut out: Vec<(usize, usize)> = Vec::new();
    for page in (0..pages).filter(|&p| working_set::has_page(mask, p)) {
        let offset = page * 4096;
        let page_len = (len - offset).min(4096);
        match out.last_mut() {
            Some((start, stretch)) if *start + *stretch == offset => *stretch += page_len,
            _ => out.push((offset, page_len)),
        }
    }
    out
}

/// The message of a block that could not be read from the checkpoint.
fn load_failed(info: &BlockInfo, e: &crate::checkpoint::ReadError) -> String {
    format!(
        "cannot load memory block {} (guest address {:#x}) from the checkpoint: {}",
        info.index,
        info.guest_addr,
        error_chain(e)
    )
}

/// The calling thread's CPU time so far.
fn thread_cpu_time() -> Duration {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `t` is a valid timespec for the call to fill in.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// Gives guest memory that [`preload`] loaded into back to the system's
/// transparent huge page policy, once it is registered with userfaultfd
/// (missing pages then fault into the handler, huge or not). Only where
/// the policy is `always`: `madvise` and `never` are what memory without
/// advice gets anyway. A failure only costs huge pages, so it is logged.
pub fn allow_huge_pages(mem: &GuestMemoryMmap) {
    let policy = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if !policy.contains("[always]") {
        return;
    }
    for region in mem.iter() {
        let Ok(host) = mem.get_host_address(region.start_addr()) else { continue };
        // SAFETY: as in `preload`.
        if unsafe { libc::madvise(host.cast(), region.len() as usize, libc::MADV_HUGEPAGE) } != 0 {
            log::debug!("guest memory keeps small pages: {}", std::io::Error::last_os_error());
        }
    }
}

/// `madvise` advice of Linux 5.14: fault the range in, writable.
const MADV_POPULATE_WRITE: libc::c_int = 23;
/// `madvise` advice of Linux 5.14: fault the range in, readable.
const MADV_POPULATE_READ: libc::c_int = 22;

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

/// What to change when creating a userfaultfd fails for lack of rights.
fn create_hint(error: &userfaultfd::Error) -> String {
    const EAGER: &str = "or restore with --memory eager";
    match error {
        userfaultfd::Error::OpenDevUserfaultfd(e) if e.kind() == std::io::ErrorKind::PermissionDenied => format!(
            "this user may not open /dev/userfaultfd; give it read and write access (a group or a udev rule), run as root, {EAGER}"
        ),
        userfaultfd::Error::SystemError(nix::errno::Errno::EPERM) => format!(
            "the kernel refuses userfaultfd to this user; set the sysctl vm.unprivileged_userfaultfd=1, give it access \
             to /dev/userfaultfd (Linux 6.1 or later), run as root, {EAGER}"
        ),
        other => format!("{other}; {EAGER}"),
    }
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
        lazy_with(LazyOptions { prefetch, working_set: WorkingSetPlan::Off })
    }

    fn lazy_with(options: LazyOptions) -> (tempfile::TempDir, Vec<u8>, GuestMemoryMmap, LazyMemory, Receiver<MemoryFailure>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("mem.ckpt");
        let image = image();
        let options_w = WriterOptions { memory_block_size: BLOCK as u32, storage_block_size: 4 * BLOCK as u32, level: 1, threads: 1, ..WriterOptions::default() };
        write_checkpoint(&path, &ImageSource::new(vec![(0, &image[..])]), &options_w, &mut |_, _| {}).expect("writes");
        let reader = Arc::new(Reader::open(&path).expect("opens"));
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("guest memory");
        let (failures, failed) = channel();
        let lazy = LazyMemory::start(&mem, reader, options, failures).expect("userfaultfd (run as root)");
        (dir, image, mem, lazy, failed)
    }

    fn wait_for(what: &str, lazy: &LazyMemory, done: impl Fn(&LoaderReport) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done(&lazy.stats()) {
            assert!(Instant::now() < deadline, "{what}: {:?}", lazy.stats());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn read(mem: &GuestMemoryMmap, addr: usize, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr as u64)).expect("read");
        buf
    }

    #[test]
    fn a_fault_loads_the_whole_block_that_holds_the_page_and_the_missing_data_after_it() {
        let (_dir, image, mem, lazy, failed) = lazy(false);
        // One byte in the middle of block 40 brings in all of block 40,
        // and the data blocks 41..44 after it in the same copy.
        assert_eq!(read(&mem, 40 * BLOCK + 5000, 1)[0], image[40 * BLOCK + 5000]);
        let report = lazy.stats();
        assert_eq!(report.faults, 1);
        assert_eq!(report.blocks_on_fault, FAULT_BATCH as u64);
        assert_eq!(read(&mem, 40 * BLOCK, 4 * BLOCK), image[40 * BLOCK..44 * BLOCK]);
        assert_eq!(lazy.stats().faults, 1, "the rest of the run was in already");
        // A batch stops at a zero block: block 1 brings block 2 only.
        assert_eq!(read(&mem, BLOCK, 2 * BLOCK), image[BLOCK..3 * BLOCK]);
        assert_eq!(lazy.stats().blocks_on_fault, FAULT_BATCH as u64 + 2);
        // A zero block reads as zeros.
        assert!(read(&mem, 10 * BLOCK, BLOCK).iter().all(|&b| b == 0));
        let report = lazy.stats();
        assert!(report.fault_p50_us.is_some() && report.fault_p99_us >= report.fault_p50_us, "{report:?}");
        // Every data block came in on those faults: memory is released.
        wait_for("the release", &lazy, |r| r.resident_after_ms.is_some());
        assert_eq!(lazy.stats().blocks_prefetched, 0);
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

    #[test]
    fn a_working_set_waited_for_is_in_place_without_faults() {
        let set = WorkingSet::whole_blocks(vec![41, 2, 40, 10], 1);
        let (_dir, image, mem, lazy, failed) =
            lazy_with(LazyOptions { prefetch: false, working_set: WorkingSetPlan::Load { set } });
        lazy.wait_working_set().expect("loads the working set");
        let report = lazy.stats();
        assert_eq!(report.working_set.state, WorkingSetState::Loaded, "{report:?}");
        assert_eq!((report.working_set.blocks, report.blocks_working_set), (4, 4), "{report:?}");
        assert!(report.working_set.loaded_ms.is_some());
        // In place: reading them takes no fault.
        assert_eq!(read(&mem, 40 * BLOCK, 2 * BLOCK), image[40 * BLOCK..42 * BLOCK]);
        assert_eq!(read(&mem, 2 * BLOCK, BLOCK), image[2 * BLOCK..3 * BLOCK]);
        assert!(read(&mem, 10 * BLOCK, BLOCK).iter().all(|&b| b == 0));
        assert_eq!(lazy.stats().faults, 0, "{:?}", lazy.stats());
        // What is outside it still faults in.
        assert_eq!(read(&mem, BLOCK, BLOCK), image[BLOCK..2 * BLOCK]);
        assert_eq!(lazy.stats().faults, 1);
        assert!(failed.try_recv().is_err());
    }

    #[test]
    fn a_preloaded_working_set_is_in_place_and_the_rest_still_faults_in_even_with_huge_pages() {
        // 4 MiB of data in every page, in 2 MiB-aligned memory that asks
        // for transparent huge pages: a preload that let the kernel map a
        // whole huge page for one block would leave the rest of it zero
        // and present, never faulting.
        const SIZE: usize = 4 << 20;
        let image: Vec<u8> = (0..SIZE).map(|i| (i / 4096 * 31 + i % 4096 / 7) as u8 | 1).collect();
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("mem.ckpt");
        let options_w = WriterOptions { memory_block_size: BLOCK as u32, storage_block_size: 4 * BLOCK as u32, level: 1, threads: 1, ..WriterOptions::default() };
        write_checkpoint(&path, &ImageSource::new(vec![(0, &image[..])]), &options_w, &mut |_, _| {}).expect("writes");
        let reader = Reader::open(&path).expect("opens");
        let mem = crate::vstate::memory::create_guest_memory(SIZE as u64).expect("guest memory");
        let host = mem.get_host_address(GuestAddress(0)).expect("host address");
        // SAFETY: the whole of the test's guest memory; advice only.
        unsafe { libc::madvise(host.cast(), SIZE, libc::MADV_HUGEPAGE) };
        let set = WorkingSet::whole_blocks(vec![130, 3, 4, 5, 200, 9999], 1);
        let took = preload(&mem, &reader, &set).expect("preloads");
        let options = LazyOptions { prefetch: false, working_set: WorkingSetPlan::Preloaded { set, took } };
        let (failures, failed) = channel::<MemoryFailure>();
        let lazy = LazyMemory::start(&mem, Arc::new(reader), options, failures).expect("userfaultfd (run as root)");
        allow_huge_pages(&mem);
        let report = lazy.stats();
        assert_eq!(report.working_set.state, WorkingSetState::Loaded, "{report:?}");
        // Block 9999 is not in the checkpoint: skipped.
        assert_eq!((report.working_set.blocks, report.blocks_working_set), (5, 5), "{report:?}");
        // In place without a fault.
        assert_eq!(read(&mem, 3 * BLOCK, 3 * BLOCK), image[3 * BLOCK..6 * BLOCK]);
        assert_eq!(read(&mem, 130 * BLOCK, BLOCK), image[130 * BLOCK..131 * BLOCK]);
        assert_eq!(lazy.stats().faults, 0, "{:?}", lazy.stats());
        // Every other page, neighbours of the preloaded blocks first, holds
        // the checkpoint's data, brought in by faults.
        assert_eq!(read(&mem, 6 * BLOCK, BLOCK), image[6 * BLOCK..7 * BLOCK]);
        let all = read(&mem, 0, SIZE);
        let wrong = all.iter().zip(&image).position(|(a, b)| a != b);
        assert_eq!(wrong, None, "guest memory differs from the checkpoint from this offset on");
        assert!(lazy.stats().faults > 0);
        assert!(failed.try_recv().is_err());
    }

    #[test]
    fn a_preload_fills_only_the_pages_of_a_blocks_mask_and_the_rest_faults_in() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("mem.ckpt");
        let image = image();
        let options_w = WriterOptions { memory_block_size: BLOCK as u32, storage_block_size: 4 * BLOCK as u32, level: 1, threads: 1, ..WriterOptions::default() };
        write_checkpoint(&path, &ImageSource::new(vec![(0, &image[..])]), &options_w, &mut |_, _| {}).expect("writes");
        let reader = Reader::open(&path).expect("opens");
        let mem = crate::vstate::memory::create_guest_memory(MEM as u64).expect("guest memory");
        let host = mem.get_host_address(GuestAddress(0)).expect("host address") as usize;
        // Block 40: pages 0 and 2; block 41: every page (a whole block);
        // block 1: page 3.
        let set = WorkingSet { blocks: vec![40, 41, 1], pages: vec![0b0101, 0b1111, 0b1000], window_ms: 1 };
        let took = preload(&mem, &reader, &set).expect("preloads");
        let resident = |offset: usize| {
            let mut v = 0u8;
            // SAFETY: one page of the test's guest memory; mincore only
            // reports whether it is in memory.
            let rc = unsafe { libc::mincore((host + offset) as *mut libc::c_void, 4096, &mut v) };
            assert_eq!(rc, 0);
            v & 1 == 1
        };
        let page = |block: usize, p: usize| block * BLOCK + p * 4096;
        let present: Vec<bool> = [(40, 0), (40, 1), (40, 2), (40, 3), (41, 0), (41, 3), (1, 2), (1, 3)]
            .iter()
            .map(|&(b, p)| resident(page(b, p)))
            .collect();
        assert_eq!(present, [true, false, true, false, true, true, false, true]);
        let options = LazyOptions { prefetch: false, working_set: WorkingSetPlan::Preloaded { set, took } };
        let (failures, failed) = channel::<MemoryFailure>();
        let lazy = LazyMemory::start(&mem, Arc::new(reader), options, failures).expect("userfaultfd (run as root)");
        // The preloaded pages hold their data, without a fault.
        assert_eq!(read(&mem, page(40, 0), 4096), image[page(40, 0)..page(40, 1)]);
        assert_eq!(read(&mem, page(40, 2), 4096), image[page(40, 2)..page(40, 3)]);
        assert_eq!(read(&mem, page(41, 0), BLOCK), image[page(41, 0)..page(42, 0)]);
        assert_eq!(read(&mem, page(1, 3), 4096), image[page(1, 3)..page(2, 0)]);
        assert_eq!(lazy.stats().faults, 0, "{:?}", lazy.stats());
        // The other pages of a partly loaded block fault in, with the
        // checkpoint's data; so does all the rest.
        assert_eq!(read(&mem, page(40, 1), 4096), image[page(40, 1)..page(40, 2)]);
        assert_eq!(lazy.stats().faults, 1, "{:?}", lazy.stats());
        // Block 1, partly in, counts as resident once asked (made whole);
        // block 42, not in the set, does not.
        let resident = lazy.resident().expect("resident").expect("not released");
        assert!(resident[1] && resident[40] && resident[41] && !resident[42], "{resident:?}");
        assert_eq!(read(&mem, page(1, 0), BLOCK), image[page(1, 0)..page(2, 0)]);
        assert_eq!(lazy.stats().faults, 1, "block 1 was whole already: {:?}", lazy.stats());
        assert_eq!(read(&mem, 0, MEM), image);
        assert!(failed.try_recv().is_err());
    }

    #[test]
    fn a_preload_of_a_damaged_block_fails_naming_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("mem.ckpt");
        let options_w = WriterOptions { memory_block_size: BLOCK as u32, storage_block_size: 4 * BLOCK as u32, level: 1, threads: 1, ..WriterOptions::default() };
        write_checkpoint(&path, &ImageSource::new(vec![(0, &image()[..])]), &options_w, &mut |_, _| {}).expect("writes");
        // Flip a byte of block 41's stored data.
        let info = Reader::open(&path).expect("opens").block_info(41).expect("block 41");
        assert_ne!(info.kind, BlockKind::Zero);
        let mut bytes = std::fs::read(&path).expect("reads");
        bytes[info.file_offset as usize + 2] ^= 0xff;
        std::fs::write(&path, &bytes).expect("writes");
        let reader = Reader::open(&path).expect("still opens: the index is intact");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("guest memory");
        let set = WorkingSet::whole_blocks(vec![1, 41], 1);
        let err = preload(&mem, &reader, &set).expect_err("a damaged block fails the preload");
        assert!(err.to_string().contains("memory block 41"), "{err}");
    }

    #[test]
    fn a_working_set_loaded_while_the_guest_runs_comes_first_then_the_rest() {
        let set = WorkingSet::whole_blocks(vec![42, 43], 1);
        let (_dir, image, mem, lazy, failed) =
            lazy_with(LazyOptions { prefetch: true, working_set: WorkingSetPlan::Load { set } });
        wait_for("the working set and then the rest", &lazy, |r| r.resident_after_ms.is_some());
        let report = lazy.stats();
        assert_eq!(report.working_set.state, WorkingSetState::Loaded);
        assert_eq!(report.blocks_working_set, 2, "{report:?}");
        assert_eq!(report.blocks_working_set + report.blocks_prefetched, 6, "{report:?}");
        assert_eq!(read(&mem, 0, MEM), image);
        assert!(failed.try_recv().is_err());
    }

    #[test]
    fn recording_notes_the_faulted_blocks_in_order_and_holds_prefetch_back() {
        let snapshot = tempfile::tempdir().expect("temp dir");
        let window = Duration::from_millis(1500);
        let (_dir, image, mem, lazy, failed) = lazy_with(LazyOptions {
            prefetch: true,
            working_set: WorkingSetPlan::Record { window, dir: snapshot.path().to_path_buf() },
        });
        assert_eq!(read(&mem, 41 * BLOCK + 7, 1)[0], image[41 * BLOCK + 7]);
        assert!(read(&mem, 30 * BLOCK, 1)[0] == 0);
        assert_eq!(read(&mem, 2 * BLOCK, BLOCK), image[2 * BLOCK..3 * BLOCK]);
        assert_eq!(read(&mem, 41 * BLOCK + 3 * 4096, 1)[0], image[41 * BLOCK + 3 * 4096]);
        let report = lazy.stats();
        // One page per fault while recording (block 2's four, block 41's
        // two, block 30's one); nothing prefetched yet.
        assert_eq!((report.faults, report.blocks_on_fault, report.blocks_prefetched), (7, 0, 0), "{report:?}");
        assert_eq!(report.working_set.state, WorkingSetState::Recording);
        // Block 41 has two of its pages in, which the guest may have
        // written: asked what is resident (a snapshot does), it is made
        // whole and counts as resident; block 40, untouched, does not.
        let resident = lazy.resident().expect("resident").expect("not released");
        assert!(resident[41] && resident[2] && !resident[40], "{resident:?}");
        assert_eq!(read(&mem, 41 * BLOCK, BLOCK), image[41 * BLOCK..42 * BLOCK]);
        assert_eq!(lazy.stats().faults, 7, "block 41 was whole already: {:?}", lazy.stats());
        wait_for("the end of the recording", &lazy, |r| r.working_set.state == WorkingSetState::Recorded);
        wait_for("prefetch after the recording", &lazy, |r| r.resident_after_ms.is_some());
        let deadline = Instant::now() + Duration::from_secs(30);
        let saved = loop {
            if let Some(set) = working_set::load(snapshot.path(), lazy.reader()).expect("a valid set") {
                break set;
            }
            assert!(Instant::now() < deadline, "no working set saved");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(saved, WorkingSet { blocks: vec![41, 30, 2], pages: vec![0b1001, 0b0001, 0b1111], window_ms: 1500 });
        assert_eq!(read(&mem, 0, MEM), image);
        assert!(failed.try_recv().is_err());
    }

    #[test]
    fn a_missing_right_to_userfaultfd_names_what_to_change() {
        let dev = userfaultfd::Error::OpenDevUserfaultfd(std::io::Error::from_raw_os_error(libc::EACCES));
        assert!(create_hint(&dev).contains("/dev/userfaultfd") && create_hint(&dev).contains("--memory eager"));
        let sysctl = userfaultfd::Error::SystemError(nix::errno::Errno::EPERM);
        assert!(create_hint(&sysctl).contains("vm.unprivileged_userfaultfd=1"), "{}", create_hint(&sysctl));
    }
}
