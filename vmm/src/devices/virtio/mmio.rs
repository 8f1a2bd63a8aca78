//! The virtio-mmio transport, modern interface (virtio 1.2, section 4.2.2):
//! the registers a driver programs to negotiate features and set up queues,
//! the interrupt status, and the configuration window at 0x100.
//!
//! ```text
//! offset  register              offset  register
//! 0x000   MagicValue "virt"     0x044   QueueReady
//! 0x004   Version (2)           0x050   QueueNotify
//! 0x008   DeviceID              0x060   InterruptStatus
//! 0x00c   VendorID              0x064   InterruptACK
//! 0x010   DeviceFeatures        0x070   Status
//! 0x014   DeviceFeaturesSel     0x080   QueueDesc low/high
//! 0x020   DriverFeatures        0x090   QueueDriver (avail) low/high
//! 0x024   DriverFeaturesSel     0x0a0   QueueDevice (used) low/high
//! 0x030   QueueSel              0x0b0   SHMLen low/high (no regions)
//! 0x034   QueueNumMax           0x0fc   ConfigGeneration
//! 0x038   QueueNum              0x100…  device configuration space
//! ```
//!
//! A guest notification normally never reaches this code: QueueNotify is an
//! ioeventfd that KVM signals itself, waking the device thread. Register
//! accesses come from vCPU threads; queue work runs on the device thread;
//! both hold the transport's lock, so they never interleave.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use crate::vstate::memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{features, ActivateError, DeviceState, Interrupt, QueueContext, VirtioDevice};
use crate::devices::bus::MmioDevice;

/// Bytes of MMIO space each transport takes.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Offset of the notify register, where the queue ioeventfds sit.
pub const NOTIFY_OFFSET: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// "STAS", little-endian.
const VENDOR_ID: u32 = 0x5341_5453;
const CONFIG_OFFSET: u64 = 0x100;

/// Device status bits (virtio 1.2, section 2.1).
mod status {
    #[cfg_attr(not(test), allow(dead_code))]
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
}

/// Errors while rebuilding a transport from a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// The saved queue count is not the device's.
    #[error("the snapshot has {saved} queues for a device with {device}")]
    QueueCount {
        /// Queues in the snapshot.
        saved: usize,
        /// Queues of the device.
        device: usize,
    },
    /// A saved queue does not describe a valid queue.
    #[error("saved queue {0} is invalid: {1:?}")]
    BadQueue(usize, virtio_queue::Error),
    /// The saved features are not a subset of what the device offers.
    #[error("the snapshot's negotiated features {saved:#x} are not offered by this device ({offered:#x})")]
    Features {
        /// Features in the snapshot.
        saved: u64,
        /// Features the device offers.
        offered: u64,
    },
    /// The restored device could not start.
    #[error("cannot start the restored device")]
    Activate(#[source] ActivateError),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
}

/// A queue's saved state: the plain fields of `virtio_queue::QueueState`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedQueue {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// Next available-ring entry the device will take.
    pub next_avail: u16,
    /// Next used-ring entry the device will fill.
    pub next_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX in force.
    pub event_idx: bool,
}

impl From<QueueState> for SavedQueue {
    fn from(q: QueueState) -> Self {
        SavedQueue {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
        }
    }
}

impl From<SavedQueue> for QueueState {
    fn from(q: SavedQueue) -> Self {
        QueueState {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
        }
    }
}

/// The transport's saved state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    /// Device status register.
    pub status: u32,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// DeviceFeaturesSel.
    pub device_features_select: u32,
    /// DriverFeaturesSel.
    pub driver_features_select: u32,
    /// QueueSel.
    pub queue_select: u32,
    /// InterruptStatus bits not yet acknowledged.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// Whether the device was started (DRIVER_OK seen and accepted).
    pub activated: bool,
    /// Every queue, index order.
    pub queues: Vec<SavedQueue>,
}

/// A saved virtio device: transport and device-specific state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioDeviceSnapshot {
    /// The transport.
    pub transport: MmioState,
    /// The device.
    pub device: DeviceState,
}

/// A virtio device behind its virtio-mmio registers.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    /// One per queue: written by KVM (ioeventfd) or by [`Self::write`] when
    /// the guest notifies; the device thread waits on them.
    queue_events: Vec<EventFd>,
    /// Written when the device starts or stops, so the device thread
    /// re-reads [`Self::is_activated`].
    activate_event: EventFd,
    status: u32,
    acked_features: u64,
    device_features_select: u32,
    driver_features_select: u32,
    queue_select: u32,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    /// A transport for `device` in its reset state.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap, interrupt: Arc<Interrupt>) -> Result<Self, MmioError> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).map_err(|e| MmioError::BadQueue(0, e)))
            .collect::<Result<Vec<_>, _>>()?;
        let queue_events = (0..queues.len())
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            queue_events,
            activate_event: EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd)?,
            status: 0,
            acked_features: 0,
            device_features_select: 0,
            driver_features_select: 0,
            queue_select: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// Rebuilds the transport of a saved device: registers, queues and
    /// interrupt status as saved; a device that was running is started
    /// again and told it was restored.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        state: &MmioState,
    ) -> Result<Self, MmioError> {
        let mut transport = Self::new(device, mem, interrupt)?;
        if state.queues.len() != transport.queues.len() {
            return Err(MmioError::QueueCount { saved: state.queues.len(), device: transport.queues.len() });
        }
        let offered = transport.device.features() | features::VERSION_1;
        if state.acked_features & !offered != 0 {
            return Err(MmioError::Features { saved: state.acked_features, offered });
        }
        for (index, saved) in state.queues.iter().enumerate() {
            let mut saved = *saved;
            // The device's limit, not the file's, bounds the queue.
            saved.max_size = transport.queues[index].max_size();
            transport.queues[index] =
                Queue::try_from(QueueState::from(saved)).map_err(|e| MmioError::BadQueue(index, e))?;
        }
        transport.status = state.status;
        transport.acked_features = state.acked_features;
        transport.device_features_select = state.device_features_select;
        transport.driver_features_select = state.driver_features_select;
        transport.queue_select = state.queue_select;
        transport.config_generation = state.config_generation;
        transport.interrupt.set_status(state.interrupt_status);
        if state.activated {
            transport.start().map_err(MmioError::Activate)?;
            transport.with_device(|device, ctx| device.restored(ctx));
        }
        // An interrupt in flight at the snapshot may not have reached the
        // guest: raise the line again for bits it has not acknowledged.
        transport.interrupt.resend_pending();
        Ok(transport)
    }

    /// The transport's state for a snapshot. The device thread must not be
    /// serving queues meanwhile (the caller holds this transport's lock).
    pub fn state(&self) -> MmioState {
        MmioState {
            status: self.status,
            acked_features: self.acked_features,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            queue_select: self.queue_select,
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            activated: self.activated,
            queues: self.queues.iter().map(|q| SavedQueue::from(q.state())).collect(),
        }
    }

    /// Transport and device state.
    pub fn snapshot(&self) -> VirtioDeviceSnapshot {
        VirtioDeviceSnapshot { transport: self.state(), device: self.device.state() }
    }

    /// The device.
    pub fn device(&self) -> &dyn VirtioDevice {
        &*self.device
    }

    /// The device, mutably (e.g. to flush it before a snapshot).
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        &mut *self.device
    }

    /// One eventfd per queue, signalled on each guest notification.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// Signalled when the device starts or stops.
    pub fn activate_event(&self) -> &EventFd {
        &self.activate_event
    }

    /// Whether the driver started the device and it accepted.
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Serves queue `index` (the device thread calls this when its eventfd
    /// fires).
    pub fn process_queue(&mut self, index: usize) {
        if !self.activated || index >= self.queues.len() {
            return;
        }
        self.with_device(|device, ctx| device.process_queue(index, ctx));
    }

    /// Serves the device's backend (the device thread calls this when the
    /// backend fd is ready).
    pub fn process_backend(&mut self) {
        if !self.activated {
            return;
        }
        self.with_device(|device, ctx| device.process_backend(ctx));
    }

    /// Calls `f` with the device and the context it serves its queues in.
    fn with_device<R>(&mut self, f: impl FnOnce(&mut dyn VirtioDevice, &mut QueueContext<'_>) -> R) -> R {
        let Self { device, mem, queues, acked_features, interrupt, .. } = self;
        f(&mut **device, &mut QueueContext { mem, queues, acked_features: *acked_features, interrupt })
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue registers may change only while the driver sets the device up
    /// and the selected queue is not live yet.
    fn queue_config_allowed(&mut self) -> bool {
        let setting_up = self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0;
        setting_up && self.selected_queue().is_some_and(|q| !q.ready())
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            0x000 => MAGIC,
            0x004 => VERSION,
            0x008 => self.device.device_type(),
            0x00c => VENDOR_ID,
            0x010 => {
                let features = self.device.features() | features::VERSION_1;
                match self.device_features_select {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            0x034 => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x044 => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            0x060 => self.interrupt.status(),
            0x070 => self.status,
            // No shared memory regions: a length of all ones says so.
            0x0b0 | 0x0b4 => u32::MAX,
            0x0fc => self.config_generation,
            _ => {
                log::debug!("virtio-mmio: read of write-only or unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            0x014 => self.device_features_select = value,
            0x020 => self.write_driver_features(value),
            0x024 => self.driver_features_select = value,
            0x030 => self.queue_select = value,
            0x038 | 0x044 | 0x080 | 0x084 | 0x090 | 0x094 | 0x0a0 | 0x0a4 => self.write_queue_register(offset, value),
            0x050 => self.notify(value),
            0x064 => self.interrupt.acknowledge(value),
            0x070 => self.write_status(value),
            _ => log::debug!("virtio-mmio: write of read-only or unknown register {offset:#x}"),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & status::DRIVER == 0 || self.status & status::FEATURES_OK != 0 {
            log::debug!("virtio-mmio: driver features written outside feature negotiation; ignored");
            return;
        }
        match self.driver_features_select {
            0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(value),
            1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32),
            _ => {}
        }
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        // A driver tearing a queue down writes QueueReady = 0 and checks
        // that it reads back 0 (Linux warns otherwise).
        if offset == 0x044 && value == 0 {
            if let Some(queue) = self.selected_queue() {
                queue.set_ready(false);
            }
            return;
        }
        if !self.queue_config_allowed() {
            log::debug!("virtio-mmio: queue register {offset:#x} written outside queue setup; ignored");
            return;
        }
        let Some(queue) = self.selected_queue() else { return };
        match offset {
            0x038 => queue.set_size(value as u16),
            0x044 => queue.set_ready(value == 1),
            0x080 => queue.set_desc_table_address(Some(value), None),
            0x084 => queue.set_desc_table_address(None, Some(value)),
            0x090 => queue.set_avail_ring_address(Some(value), None),
            0x094 => queue.set_avail_ring_address(None, Some(value)),
            0x0a0 => queue.set_used_ring_address(Some(value), None),
            0x0a4 => queue.set_used_ring_address(None, Some(value)),
            _ => {}
        }
    }

    /// A notification that did not go through the ioeventfd (KVM without
    /// ioeventfd support): wake the device thread the same way.
    fn notify(&mut self, queue: u32) {
        match self.queue_events.get(queue as usize) {
            Some(event) => {
                if let Err(e) = event.write(1) {
                    log::warn!("virtio-mmio: cannot signal queue {queue}: {e}");
                }
            }
            None => log::debug!("virtio-mmio: notify of queue {queue}, which does not exist"),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // Bits are only ever added, and FAILED or NEEDS_RESET only by us.
        let added = value & !self.status;
        if value & self.status != self.status {
            log::debug!("virtio-mmio: driver cleared status bits ({:#x} -> {value:#x}); ignored", self.status);
            return;
        }
        if added & status::FEATURES_OK != 0 {
            let offered = self.device.features() | features::VERSION_1;
            let acceptable = self.acked_features & !offered == 0 && self.acked_features & features::VERSION_1 != 0;
            if !acceptable {
                log::warn!(
                    "virtio-mmio: driver accepted features {:#x} beyond the offered {offered:#x} or without VERSION_1",
                    self.acked_features
                );
                // FEATURES_OK stays clear: the driver sees that and gives up.
                self.status |= added & !status::FEATURES_OK;
                return;
            }
        }
        if added & status::DRIVER_OK != 0 && self.status & status::FEATURES_OK == 0 {
            log::debug!("virtio-mmio: DRIVER_OK before FEATURES_OK; ignored");
            return;
        }
        self.status |= added;
        if added & status::DRIVER_OK != 0 {
            if let Err(e) = self.start() {
                log::warn!("virtio-mmio: {} device did not start: {e}", self.device.device_type());
                self.status |= status::DEVICE_NEEDS_RESET;
                self.interrupt.signal_config_change();
            }
        }
    }

    /// Starts the device with the queues the driver set up.
    fn start(&mut self) -> Result<(), ActivateError> {
        let event_idx = self.acked_features & features::RING_EVENT_IDX != 0;
        for (index, queue) in self.queues.iter_mut().enumerate() {
            queue.set_event_idx(event_idx);
            if !queue.is_valid(&self.mem) {
                return Err(ActivateError::BadQueue(index));
            }
        }
        self.with_device(|device, ctx| device.activate(ctx))?;
        self.activated = true;
        self.wake_thread();
        Ok(())
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
            self.wake_thread();
        }
        for queue in &mut self.queues {
            queue.reset();
        }
        self.status = 0;
        self.acked_features = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.queue_select = 0;
        self.interrupt.set_status(0);
    }

    fn wake_thread(&self) {
        if let Err(e) = self.activate_event.write(1) {
            log::warn!("virtio-mmio: cannot wake the device thread: {e}");
        }
    }
}

impl MmioDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            log::debug!("virtio-mmio: {}-byte read at {offset:#x}; registers are 32-bit", data.len());
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.write_config(offset - CONFIG_OFFSET, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::debug!("virtio-mmio: {}-byte write at {offset:#x}; registers are 32-bit", data.len());
            return;
        };
        if offset % 4 != 0 {
            log::debug!("virtio-mmio: unaligned write at {offset:#x}");
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::Mutex;

    use vm_memory::GuestAddress;

    use super::super::test_utils::counting_interrupt;
    use super::*;

    /// A device that records what the transport asks of it.
    #[derive(Default)]
    struct Probe {
        activated: usize,
        resets: usize,
        processed: Vec<usize>,
        restored: usize,
    }

    struct ProbeDevice(Arc<Mutex<Probe>>);

    impl VirtioDevice for ProbeDevice {
        fn device_type(&self) -> u32 {
            super::super::device_type::RNG
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn features(&self) -> u64 {
            features::VERSION_1 | (1 << 3)
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
        }
        fn activate(&mut self, _ctx: &mut QueueContext<'_>) -> Result<(), ActivateError> {
            self.0.lock().expect("probe").activated += 1;
            Ok(())
        }
        fn reset(&mut self) {
            self.0.lock().expect("probe").resets += 1;
        }
        fn process_queue(&mut self, index: usize, _ctx: &mut QueueContext<'_>) {
            self.0.lock().expect("probe").processed.push(index);
        }
        fn restored(&mut self, _ctx: &mut QueueContext<'_>) {
            self.0.lock().expect("probe").restored += 1;
        }
        fn state(&self) -> DeviceState {
            DeviceState::Rng
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Probe>>, Arc<std::sync::atomic::AtomicU64>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        let probe = Arc::new(Mutex::new(Probe::default()));
        let (irq, count) = counting_interrupt();
        let t = MmioTransport::new(Box::new(ProbeDevice(probe.clone())), mem, Arc::new(irq)).expect("transport");
        (t, probe, count)
    }

    fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        t.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write32(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    /// Drives the driver's side of setup (virtio 1.2, 3.1.1) with queues at
    /// valid addresses.
    fn set_up(t: &mut MmioTransport) {
        write32(t, 0x070, status::ACKNOWLEDGE);
        write32(t, 0x070, status::ACKNOWLEDGE | status::DRIVER);
        write32(t, 0x024, 1);
        write32(t, 0x020, 1); // VERSION_1 is bit 32
        write32(t, 0x024, 0);
        write32(t, 0x020, 1 << 3);
        write32(t, 0x070, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        for (q, base) in [(0u32, 0x1000u32), (1, 0x4000)] {
            write32(t, 0x030, q);
            write32(t, 0x038, 8);
            write32(t, 0x080, base);
            write32(t, 0x090, base + 0x1000);
            write32(t, 0x0a0, base + 0x2000);
            write32(t, 0x044, 1);
        }
        write32(t, 0x070, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
    }

    #[test]
    fn identification_registers_say_virtio_mmio_version_2() {
        let (mut t, _, _) = transport();
        assert_eq!(read32(&mut t, 0x000), MAGIC);
        assert_eq!(read32(&mut t, 0x004), 2);
        assert_eq!(read32(&mut t, 0x008), super::super::device_type::RNG);
        write32(&mut t, 0x014, 1);
        assert_eq!(read32(&mut t, 0x010), 1, "VERSION_1 in the high word");
        write32(&mut t, 0x030, 1);
        assert_eq!(read32(&mut t, 0x034), 8);
        write32(&mut t, 0x030, 7);
        assert_eq!(read32(&mut t, 0x034), 0, "a queue that does not exist has size 0");
    }

    #[test]
    fn full_setup_activates_the_device() {
        let (mut t, probe, _) = transport();
        set_up(&mut t);
        assert!(t.is_activated());
        assert_eq!(probe.lock().expect("probe").activated, 1);
        assert_eq!(read32(&mut t, 0x070) & status::DRIVER_OK, status::DRIVER_OK);
        assert_eq!(t.activate_event().read().expect("woken"), 1);
    }

    #[test]
    fn features_beyond_the_offer_leave_features_ok_clear() {
        let (mut t, probe, _) = transport();
        write32(&mut t, 0x070, status::ACKNOWLEDGE | status::DRIVER);
        write32(&mut t, 0x024, 1);
        write32(&mut t, 0x020, 1);
        write32(&mut t, 0x024, 0);
        write32(&mut t, 0x020, 1 << 5); // not offered
        write32(&mut t, 0x070, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        assert_eq!(read32(&mut t, 0x070) & status::FEATURES_OK, 0);
        write32(&mut t, 0x070, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
        assert!(!t.is_activated());
        assert_eq!(probe.lock().expect("probe").activated, 0);
    }

    #[test]
    fn queue_outside_guest_memory_does_not_start_the_device() {
        let (mut t, probe, irqs) = transport();
        write32(&mut t, 0x070, status::ACKNOWLEDGE | status::DRIVER);
        write32(&mut t, 0x024, 1);
        write32(&mut t, 0x020, 1);
        write32(&mut t, 0x070, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK);
        write32(&mut t, 0x030, 0);
        write32(&mut t, 0x038, 8);
        write32(&mut t, 0x080, 0xfff0_0000);
        write32(&mut t, 0x044, 1);
        write32(&mut t, 0x070, status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK);
        assert!(!t.is_activated());
        assert_eq!(probe.lock().expect("probe").activated, 0);
        assert_ne!(read32(&mut t, 0x070) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(irqs.load(Ordering::SeqCst), 1, "config-change interrupt for NEEDS_RESET");
    }

    #[test]
    fn queue_registers_are_frozen_once_the_queue_is_ready() {
        let (mut t, _, _) = transport();
        set_up(&mut t);
        write32(&mut t, 0x030, 0);
        write32(&mut t, 0x080, 0x8000);
        assert_eq!(t.state().queues[0].desc_table, 0x1000);
    }

    #[test]
    fn queue_ready_can_always_be_cleared() {
        let (mut t, _, _) = transport();
        set_up(&mut t);
        write32(&mut t, 0x030, 1);
        write32(&mut t, 0x044, 0);
        assert_eq!(read32(&mut t, 0x044), 0);
        write32(&mut t, 0x044, 1);
        assert_eq!(read32(&mut t, 0x044), 0, "set ready again after DRIVER_OK");
    }

    #[test]
    fn notify_and_backend_reach_the_device_only_when_active() {
        let (mut t, probe, _) = transport();
        t.process_queue(0);
        assert!(probe.lock().expect("probe").processed.is_empty());
        set_up(&mut t);
        write32(&mut t, 0x050, 1);
        assert_eq!(t.queue_events()[1].read().expect("signalled"), 1);
        t.process_queue(1);
        t.process_queue(9);
        assert_eq!(probe.lock().expect("probe").processed, vec![1]);
        write32(&mut t, 0x050, 9); // no such queue: ignored
    }

    #[test]
    fn interrupt_ack_clears_status_bits() {
        let (mut t, _, _) = transport();
        set_up(&mut t);
        t.interrupt.signal_used_queue();
        assert_eq!(read32(&mut t, 0x060), 1);
        write32(&mut t, 0x064, 1);
        assert_eq!(read32(&mut t, 0x060), 0);
    }

    #[test]
    fn status_zero_resets_device_and_queues() {
        let (mut t, probe, _) = transport();
        set_up(&mut t);
        write32(&mut t, 0x070, 0);
        assert!(!t.is_activated());
        assert_eq!(probe.lock().expect("probe").resets, 1);
        assert_eq!(read32(&mut t, 0x070), 0);
        write32(&mut t, 0x030, 0);
        assert_eq!(read32(&mut t, 0x044), 0);
    }

    #[test]
    fn odd_sized_and_unaligned_register_accesses_are_harmless() {
        let (mut t, _, _) = transport();
        let mut two = [0xaau8; 2];
        t.read(0x000, &mut two);
        assert_eq!(two, [0, 0]);
        t.write(0x070, &[1, 0]);
        t.write(0x071, &[1, 0, 0, 0]);
        assert_eq!(read32(&mut t, 0x070), 0);
        let mut big = [0u8; 8];
        t.read(0x0fe, &mut big);
        t.read(u64::MAX - 3, &mut [0u8; 4]);
    }

    #[test]
    fn config_space_is_the_device_s_from_0x100() {
        let (mut t, _, _) = transport();
        let mut data = [0u8; 3];
        t.read(0x104, &mut data);
        assert_eq!(data, [4, 5, 6]);
        let before = read32(&mut t, 0x0fc);
        t.write(0x100, &[1]);
        assert_eq!(read32(&mut t, 0x0fc), before + 1);
    }

    #[test]
    fn saved_state_restores_to_the_same_state_and_restarts_the_device() {
        let (mut t, _, _) = transport();
        set_up(&mut t);
        t.interrupt.signal_used_queue();
        let saved = t.state();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        let probe = Arc::new(Mutex::new(Probe::default()));
        let (irq, _) = counting_interrupt();
        let restored =
            MmioTransport::restore(Box::new(ProbeDevice(probe.clone())), mem, Arc::new(irq), &saved).expect("restore");
        assert_eq!(restored.state(), saved);
        assert!(restored.is_activated());
        let p = probe.lock().expect("probe");
        assert_eq!((p.activated, p.restored), (1, 1));
    }

    #[test]
    fn restore_refuses_wrong_queue_count_and_foreign_features() {
        let (mut t, _, _) = transport();
        set_up(&mut t);
        let mem = || GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        let device = || Box::new(ProbeDevice(Arc::new(Mutex::new(Probe::default()))));
        let irq = || Arc::new(counting_interrupt().0);
        let mut saved = t.state();
        saved.queues.pop();
        assert!(matches!(MmioTransport::restore(device(), mem(), irq(), &saved), Err(MmioError::QueueCount { .. })));
        let mut saved = t.state();
        saved.acked_features |= 1 << 40;
        assert!(matches!(MmioTransport::restore(device(), mem(), irq(), &saved), Err(MmioError::Features { .. })));
        let mut saved = t.state();
        saved.queues[0].size = 3; // not a power of two
        assert!(matches!(MmioTransport::restore(device(), mem(), irq(), &saved), Err(MmioError::BadQueue(0, _))));
    }
}
