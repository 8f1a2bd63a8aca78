//! Device threads: each virtio device serves its queues on a thread of its
//! own, so a slow disk never holds up a vCPU or another device.
//!
//! The thread waits (epoll) on the device's queue eventfds, which KVM
//! signals when the guest writes QueueNotify, on the transport's
//! activation eventfd, on the device's backend fd while the device is
//! active, and on a stop eventfd. Each event takes the transport's lock,
//! so a snapshot that holds every transport's lock holds every device
//! still. A device thread that touches guest memory not loaded yet after a
//! lazy restore faults like a vCPU and is served by the same userfaultfd
//! handler.

use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::mmio::MmioTransport;
use crate::devices::bus::lock;

const TOKEN_STOP: u64 = u64::MAX;
const TOKEN_ACTIVATE: u64 = u64::MAX - 1;
const TOKEN_BACKEND: u64 = u64::MAX - 2;

/// A running device thread; dropping it stops and joins the thread.
pub struct DeviceThread {
    stop: EventFd,
    handle: Option<JoinHandle<()>>,
}

impl DeviceThread {
    /// Starts the thread `name` serving `transport`.
    pub fn spawn(name: String, transport: Arc<Mutex<MmioTransport>>) -> std::io::Result<Self> {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let epoll = Epoll::new()?;
        let backend;
        {
            let t = lock(&transport);
            for (index, event) in t.queue_events().iter().enumerate() {
                add(&epoll, event.as_raw_fd(), index as u64)?;
            }
            add(&epoll, t.activate_event().as_raw_fd(), TOKEN_ACTIVATE)?;
            backend = t.device().backend_fd();
        }
        add(&epoll, stop.as_raw_fd(), TOKEN_STOP)?;
        let handle = std::thread::Builder::new().name(name).spawn(move || {
            crate::seccomp::confine_or_exit(crate::seccomp::ThreadKind::Device);
            serve(&epoll, &transport, backend)
        })?;
        Ok(DeviceThread { stop, handle: Some(handle) })
    }
}

impl Drop for DeviceThread {
    fn drop(&mut self) {
        if self.stop.write(1).is_ok() {
            if let Some(handle) = self.handle.take() {
                let _ = handle.join();
            }
        }
    }
}

fn add(epoll: &Epoll, fd: RawFd, token: u64) -> std::io::Result<()> {
    epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, token))
}

/// The thread's loop: until the stop eventfd fires.
fn serve(epoll: &Epoll, transport: &Mutex<MmioTransport>, backend: Option<RawFd>) {
    let mut events = vec![EpollEvent::default(); 16];
    let mut watching_backend = false;
    // The device may already be active (restored from a snapshot).
    sync_backend(epoll, transport, backend, &mut watching_backend);
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("device thread stopped: epoll_wait failed: {e}");
                return;
            }
        };
        for event in &events[..n] {
            match event.data() {
                TOKEN_STOP => return,
                TOKEN_ACTIVATE => {
                    drain(lock(transport).activate_event());
                    sync_backend(epoll, transport, backend, &mut watching_backend);
                }
                TOKEN_BACKEND => lock(transport).process_backend(),
                index => {
                    let mut t = lock(transport);
                    if let Some(event) = t.queue_events().get(index as usize) {
                        drain(event);
                    }
                    t.process_queue(index as usize);
                }
            }
        }
    }
}

/// Waits on the backend fd exactly while the device is active: before the
/// driver starts it there are no queues to serve what the backend has.
fn sync_backend(epoll: &Epoll, transport: &Mutex<MmioTransport>, backend: Option<RawFd>, watching: &mut bool) {
    let Some(fd) = backend else { return };
    let active = lock(transport).is_activated();
    let result = match (active, *watching) {
        (true, false) => add(epoll, fd, TOKEN_BACKEND),
        (false, true) => epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default()),
        _ => return,
    };
    match result {
        Ok(()) => *watching = active,
        Err(e) => log::error!("device thread: cannot change what it waits on: {e}"),
    }
    if active {
        // Anything the backend queued while the device was stopped.
        lock(transport).process_backend();
    }
}

fn drain(event: &EventFd) {
    // Non-blocking: EAGAIN when another wake-up already took the count.
    let _ = event.read();
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use vm_memory::GuestAddress;
    use crate::vstate::memory::GuestMemoryMmap;

    use super::super::test_utils::counting_interrupt;
    use super::super::{device_type, features, DeviceState, QueueContext, VirtioDevice};
    use super::*;

    struct Counting(Arc<AtomicUsize>);

    impl VirtioDevice for Counting {
        fn device_type(&self) -> u32 {
            device_type::RNG
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[8]
        }
        fn features(&self) -> u64 {
            features::VERSION_1
        }
        fn read_config(&self, _offset: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn reset(&mut self) {}
        fn process_queue(&mut self, _index: usize, _ctx: &mut QueueContext<'_>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn state(&self) -> DeviceState {
            DeviceState::Rng
        }
    }

    #[test]
    fn queue_notifications_reach_an_active_device_and_drop_stops_the_thread() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        let served = Arc::new(AtomicUsize::new(0));
        let (irq, _) = counting_interrupt();
        let transport = MmioTransport::new(Box::new(Counting(served.clone())), mem, Arc::new(irq)).expect("transport");
        let transport = Arc::new(Mutex::new(transport));
        let thread = DeviceThread::spawn("test-device".into(), transport.clone()).expect("thread");
        // Not active: the notification is taken and ignored.
        lock(&transport).queue_events()[0].write(1).expect("notify");
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(served.load(Ordering::SeqCst), 0);
        // Set the device up through its registers, then notify.
        {
            use crate::devices::bus::MmioDevice;
            let mut t = lock(&transport);
            let mut w = |off: u64, v: u32| t.write(off, &v.to_le_bytes());
            w(0x070, 3);
            w(0x024, 1);
            w(0x020, 1);
            w(0x070, 11);
            w(0x030, 0);
            w(0x038, 8);
            w(0x080, 0x1000);
            w(0x090, 0x2000);
            w(0x0a0, 0x3000);
            w(0x044, 1);
            w(0x070, 15);
        }
        lock(&transport).queue_events()[0].write(1).expect("notify");
        let deadline = Instant::now() + Duration::from_secs(5);
        while served.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(served.load(Ordering::SeqCst), 1);
        drop(thread);
    }
}
