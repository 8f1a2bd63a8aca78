//! virtio-rng (virtio 1.2, section 5.4): one queue of device-writable
//! buffers the device fills with bytes from the host's `getrandom`.

use std::io::Write as _;

use virtio_queue::{QueueT, Writer};

use super::{device_type, features, DeviceState, QueueContext, VirtioDevice, WarnLimiter};

/// Largest size of the request queue.
const QUEUE_SIZE: u16 = 256;
/// Most bytes handed out per request: the guest's buffers can be large,
/// and entropy is cheap but not free.
const MAX_BYTES_PER_REQUEST: usize = 64 << 10;

/// The entropy device.
pub struct Rng {
    warn: WarnLimiter,
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl Rng {
    /// A new entropy device.
    pub fn new() -> Self {
        Rng { warn: WarnLimiter::new() }
    }
}

/// Fills `buf` from the host's entropy pool.
fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: `rest` is a valid, writable buffer of `rest.len()` bytes
        // for the duration of the call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        done += n as usize;
    }
    Ok(())
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        features::VERSION_1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // No configuration space.
        data.fill(0);
    }

    fn reset(&mut self) {}

    fn process_queue(&mut self, index: usize, ctx: &mut QueueContext<'_>) {
        let Some(queue) = ctx.queues.get_mut(index) else { return };
        let mut used_any = false;
        let mut buf = Vec::new();
        while let Some(chain) = queue.pop_descriptor_chain(ctx.mem) {
            let head = chain.head_index();
            let written = match Writer::new(ctx.mem, chain) {
                Ok(mut writer) => {
                    let len = writer.available_bytes().min(MAX_BYTES_PER_REQUEST);
                    buf.resize(len, 0);
                    match fill_random(&mut buf).and_then(|()| writer.write_all(&buf)) {
                        Ok(()) => len as u32,
                        Err(e) => {
                            self.warn.warn(format_args!("virtio-rng: cannot serve a request: {e}"));
                            0
                        }
                    }
                }
                Err(e) => {
                    self.warn.warn(format_args!("virtio-rng: bad descriptor chain: {e}"));
                    0
                }
            };
            if let Err(e) = queue.add_used(ctx.mem, head, written) {
                self.warn.warn(format_args!("virtio-rng: cannot return a buffer: {e}"));
            }
            used_any = true;
        }
        if used_any {
            ctx.notify_used(index);
        }
    }

    fn state(&self) -> DeviceState {
        DeviceState::Rng
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress};
    use crate::vstate::memory::GuestMemoryMmap;

    use super::super::test_utils::counting_interrupt;
    use super::*;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory")
    }

    fn serve(mem: &GuestMemoryMmap, descs: &[RawDescriptor]) -> (Queue, u64) {
        let vq = MockSplitQueue::new(mem, 16);
        vq.build_desc_chain(descs).expect("chain");
        let mut queue: Queue = vq.create_queue().expect("queue");
        let (irq, count) = counting_interrupt();
        let mut rng = Rng::new();
        let mut queues = [queue];
        rng.process_queue(0, &mut QueueContext { mem, queues: &mut queues, acked_features: 0, interrupt: &irq });
        [queue] = queues;
        (queue, count.load(Ordering::SeqCst))
    }

    fn used_len(mem: &GuestMemoryMmap, queue: &Queue) -> u32 {
        // used ring: flags u16, idx u16, then {id u32, len u32} entries.
        mem.read_obj::<u32>(GuestAddress(queue.used_ring() + 8)).expect("used len")
    }

    #[test]
    fn fills_a_writable_buffer_with_random_bytes() {
        let mem = memory();
        let desc = RawDescriptor::from(SplitDescriptor::new(0x10000, 4096, VRING_DESC_F_WRITE as u16, 0));
        let (queue, irqs) = serve(&mem, &[desc]);
        assert_eq!(used_len(&mem, &queue), 4096);
        assert_eq!(irqs, 1);
        let mut out = vec![0u8; 4096];
        mem.read_slice(&mut out, GuestAddress(0x10000)).expect("read");
        assert!(out.iter().filter(|&&b| b == 0).count() < 100, "buffer not filled with random bytes");
    }

    #[test]
    fn device_readable_buffer_gets_nothing() {
        let mem = memory();
        let desc = RawDescriptor::from(SplitDescriptor::new(0x10000, 64, 0, 0));
        let (queue, irqs) = serve(&mem, &[desc]);
        assert_eq!(used_len(&mem, &queue), 0);
        assert_eq!(irqs, 1);
    }

    #[test]
    fn buffer_outside_guest_memory_is_returned_empty() {
        let mem = memory();
        let desc = RawDescriptor::from(SplitDescriptor::new(0xfff0_0000, 64, VRING_DESC_F_WRITE as u16, 0));
        let (queue, _) = serve(&mem, &[desc]);
        assert_eq!(used_len(&mem, &queue), 0);
    }

    #[test]
    fn huge_request_is_capped() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).expect("memory");
        let flags = (VRING_DESC_F_WRITE | VRING_DESC_F_NEXT) as u16;
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(0x10_0000, 1 << 20, flags, 1)),
            RawDescriptor::from(SplitDescriptor::new(0x20_0000, 1 << 20, VRING_DESC_F_WRITE as u16, 0)),
        ];
        let (queue, _) = serve(&mem, &descs);
        assert_eq!(used_len(&mem, &queue), MAX_BYTES_PER_REQUEST as u32);
    }
}
