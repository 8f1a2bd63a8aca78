//! Virtio devices: what every device has in common, and the seam between a
//! device and its transport.
//!
//! The transport ([`mmio`]) owns the registers the guest programs, the
//! feature negotiation, the queues and the interrupt. A device only says
//! what it is (type, features, configuration space, queue sizes) and how
//! it serves its queues; it never sees KVM. Each device runs on its own
//! thread ([`thread`]), woken by the guest's queue notifications
//! (ioeventfds) and by its backend (a socket, say), and is handed a
//! [`QueueContext`] each time it may touch its queues.
//!
//! Everything a guest puts into a queue is untrusted: devices read and
//! write guest memory only through `virtio-queue`'s descriptor chains and
//! vm-memory's checked accessors, and a bad chain ends in an error status
//! or is dropped with a rate-limited warning ([`WarnLimiter`]).

pub mod block;
pub mod mmio;
pub mod rng;
pub mod thread;
pub mod vsock;

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use crate::vstate::memory::GuestMemoryMmap;

/// Device type IDs (virtio 1.2, section 5).
pub mod device_type {
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Entropy source.
    pub const RNG: u32 = 4;
    /// Socket device.
    pub const VSOCK: u32 = 19;
}

/// Feature bits every device may offer, beyond its own.
pub mod features {
    /// The modern interface (virtio 1.x); every stasis device offers it.
    pub const VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    /// `used_event`/`avail_event` notification suppression.
    pub const RING_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
    /// Indirect descriptor tables.
    pub const RING_INDIRECT_DESC: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
}

/// Interrupt status bits (virtio-mmio `InterruptStatus`).
pub mod interrupt_status {
    /// The device used buffers in at least one queue.
    pub const USED_RING: u32 = 1;
    /// The configuration space changed.
    pub const CONFIG_CHANGE: u32 = 2;
}

/// What raises the device's interrupt line: an irqfd under KVM, a counter
/// in tests.
pub trait InterruptLine: Send + Sync {
    /// Raises the line once.
    fn trigger(&self) -> io::Result<()>;
}

impl InterruptLine for vmm_sys_util::eventfd::EventFd {
    fn trigger(&self) -> io::Result<()> {
        self.write(1)
    }
}

/// A device's interrupt: the `InterruptStatus` bits the guest reads and
/// acknowledges, and the line that tells it to look.
pub struct Interrupt {
    status: AtomicU32,
    line: Box<dyn InterruptLine>,
}

impl Interrupt {
    /// An interrupt with no status bits set.
    pub fn new(line: Box<dyn InterruptLine>) -> Self {
        Interrupt { status: AtomicU32::new(0), line }
    }

    /// Tells the guest that the device used buffers.
    pub fn signal_used_queue(&self) {
        self.raise(interrupt_status::USED_RING);
    }

    /// Tells the guest that the configuration space changed.
    pub fn signal_config_change(&self) {
        self.raise(interrupt_status::CONFIG_CHANGE);
    }

    fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.line.trigger() {
            log::warn!("cannot raise a virtio interrupt: {e}");
        }
    }

    /// The bits the guest has not acknowledged yet.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The guest acknowledged `bits`.
    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets the bits outright (restore, reset).
    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    /// Raises the line again if bits are pending (after restore: the guest
    /// may not have seen them).
    pub fn resend_pending(&self) {
        if self.status() != 0 {
            if let Err(e) = self.line.trigger() {
                log::warn!("cannot raise a virtio interrupt: {e}");
            }
        }
    }
}

/// What a device may touch while it serves its queues: guest memory, the
/// queues the driver set up (in index order), the negotiated features and
/// the interrupt.
pub struct QueueContext<'a> {
    /// Guest memory.
    pub mem: &'a GuestMemoryMmap,
    /// The device's queues, index order, as the driver configured them.
    pub queues: &'a mut [Queue],
    /// Features the driver accepted.
    pub acked_features: u64,
    /// The device's interrupt.
    pub interrupt: &'a Interrupt,
}

impl QueueContext<'_> {
    /// Raises the used-ring interrupt for queue `index` unless the driver
    /// suppressed it (`VIRTQ_AVAIL_F_NO_INTERRUPT` or `used_event`).
    pub fn notify_used(&mut self, index: usize) {
        let Some(queue) = self.queues.get_mut(index) else { return };
        match queue.needs_notification(self.mem) {
            Ok(false) => {}
            Ok(true) => self.interrupt.signal_used_queue(),
            // The ring is unreadable: the guest broke it; tell it anyway.
            Err(_) => self.interrupt.signal_used_queue(),
        }
    }
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up fewer queues than the device needs, or a queue is
    /// not valid in guest memory.
    #[error("queue {0} is not set up or not valid")]
    BadQueue(usize),
    /// The device's backend failed.
    #[error("the device's backend failed to start")]
    Backend(#[source] io::Error),
}

/// A virtio device, as the transport sees it.
pub trait VirtioDevice: Send {
    /// The device type ID ([`device_type`]).
    fn device_type(&self) -> u32;

    /// The largest size of each queue, in index order; their number is the
    /// device's queue count.
    fn queue_max_sizes(&self) -> &[u16];

    /// Feature bits offered, [`features::VERSION_1`] included.
    fn features(&self) -> u64;

    /// Reads the device-specific configuration space at `offset`. Bytes
    /// beyond its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the configuration space; most devices ignore it.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!("ignored write of {} bytes to config offset {offset:#x}", data.len());
    }

    /// The driver finished setting up (DRIVER_OK). Queues in `ctx` are
    /// ready and valid.
    fn activate(&mut self, ctx: &mut QueueContext<'_>) -> Result<(), ActivateError> {
        let _ = ctx;
        Ok(())
    }

    /// The driver reset the device: drop whatever queue-related state the
    /// device holds.
    fn reset(&mut self);

    /// The driver notified queue `index`.
    fn process_queue(&mut self, index: usize, ctx: &mut QueueContext<'_>);

    /// A file descriptor the device thread also waits on (level-triggered,
    /// readable) while the device is active; its readiness is handed to
    /// [`VirtioDevice::process_backend`]. Asked once, when the thread starts.
    fn backend_fd(&self) -> Option<std::os::unix::io::RawFd> {
        None
    }

    /// The backend fd is ready.
    fn process_backend(&mut self, ctx: &mut QueueContext<'_>) {
        let _ = ctx;
    }

    /// Before a snapshot, with the vCPUs paused: make everything the guest
    /// was told is done durable (a disk flushes).
    fn prepare_snapshot(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// The device rebuilt from a snapshot runs again, its queues in `ctx`
    /// as the driver left them (e.g. vsock tells the guest its
    /// connections are gone).
    fn restored(&mut self, ctx: &mut QueueContext<'_>) {
        let _ = ctx;
    }

    /// Device-specific state for a snapshot.
    fn state(&self) -> DeviceState;
}

/// Device-specific saved state; the transport's is in
/// [`mmio::MmioState`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    /// virtio-blk.
    Block(block::BlockState),
    /// virtio-rng: stateless.
    Rng,
    /// virtio-vsock.
    Vsock(vsock::VsockState),
}

/// A warning that is logged at most once a second, with a count of what it
/// held back: a guest can put bad chains into a queue as fast as it likes,
/// and must not fill the host's log.
pub struct WarnLimiter {
    last: Option<Instant>,
    suppressed: u64,
}

impl Default for WarnLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl WarnLimiter {
    /// A limiter that lets the first warning through.
    pub const fn new() -> Self {
        WarnLimiter { last: None, suppressed: 0 }
    }

    /// Logs `what` at warn level unless one was logged less than a second
    /// ago.
    pub fn warn(&mut self, what: std::fmt::Arguments<'_>) {
        let now = Instant::now();
        match self.last {
            Some(last) if now.duration_since(last) < Duration::from_secs(1) => self.suppressed += 1,
            _ => {
                if self.suppressed > 0 {
                    log::warn!("{what} ({} similar warnings suppressed)", self.suppressed);
                } else {
                    log::warn!("{what}");
                }
                self.last = Some(now);
                self.suppressed = 0;
            }
        }
    }

    /// Warnings held back since the last one logged.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
}

#[cfg(test)]
pub(crate) mod test_utils {
    //! Helpers for device unit tests: an interrupt line that counts.

    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use super::{Interrupt, InterruptLine};

    /// Counts how often it was raised.
    #[derive(Clone, Default)]
    pub struct CountingLine(pub Arc<AtomicU64>);

    impl InterruptLine for CountingLine {
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    /// An interrupt over a counting line, and the counter.
    pub fn counting_interrupt() -> (Interrupt, Arc<AtomicU64>) {
        let line = CountingLine::default();
        let count = line.0.clone();
        (Interrupt::new(Box::new(line)), count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupt_status_is_set_by_signals_and_cleared_by_acknowledge() {
        let (irq, count) = test_utils::counting_interrupt();
        irq.signal_used_queue();
        irq.signal_config_change();
        assert_eq!(irq.status(), interrupt_status::USED_RING | interrupt_status::CONFIG_CHANGE);
        assert_eq!(count.load(Ordering::SeqCst), 2);
        irq.acknowledge(interrupt_status::USED_RING);
        assert_eq!(irq.status(), interrupt_status::CONFIG_CHANGE);
    }

    #[test]
    fn warn_limiter_holds_back_bursts() {
        let mut limiter = WarnLimiter::new();
        for i in 0..100 {
            limiter.warn(format_args!("bad chain {i}"));
        }
        assert_eq!(limiter.suppressed(), 99);
    }
}
