//! The port I/O bus: maps port ranges to devices.

use std::sync::{Arc, Mutex};

/// A device on the port I/O bus. `offset` is relative to the device's base.
pub trait PioDevice: Send {
    /// Guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// Guest writes `data` at `offset`.
    fn write(&mut self, offset: u16, data: &[u8]);
}

struct Range {
    base: u16,
    len: u16,
    device: Arc<Mutex<dyn PioDevice>>,
}

/// Errors while building the bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// Two devices claim the same ports.
    #[error("port range {base:#x}+{len} overlaps a device already on the bus")]
    Overlap {
        /// Base of the new range.
        base: u16,
        /// Its length.
        len: u16,
    },
}

/// Port I/O bus. Accesses to ports without a device read as all ones and
/// writes to them are dropped, as on real hardware.
#[derive(Default)]
pub struct PioBus {
    ranges: Vec<Range>,
}

impl PioBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` on ports `base..base + len`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn PioDevice>>,
        base: u16,
        len: u16,
    ) -> Result<(), BusError> {
        let end = u32::from(base) + u32::from(len);
        let overlaps = self.ranges.iter().any(|r| {
            let r_end = u32::from(r.base) + u32::from(r.len);
            u32::from(base) < r_end && u32::from(r.base) < end
        });
        if overlaps || len == 0 {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.push(Range { base, len, device });
        Ok(())
    }

    fn find(&self, port: u16) -> Option<(&Range, u16)> {
        self.ranges
            .iter()
            .find(|r| port >= r.base && u32::from(port) < u32::from(r.base) + u32::from(r.len))
            .map(|r| (r, port - r.base))
    }

    /// Dispatches a guest read; returns whether a device took it.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        match self.find(port) {
            Some((range, offset)) => {
                lock(&range.device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a guest write; returns whether a device took it.
    pub fn write(&self, port: u16, data: &[u8]) -> bool {
        match self.find(port) {
            Some((range, offset)) => {
                lock(&range.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering it if a thread panicked while holding it (the
/// device state is still the best we have).
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u16, Vec<u8>)>,
    }

    impl PioDevice for Recorder {
        fn read(&mut self, offset: u16, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u16, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_accesses_by_offset() {
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = PioBus::new();
        bus.insert(dev.clone(), 0x3f8, 8).expect("insert");
        let mut buf = [0u8; 1];
        assert!(bus.read(0x3fb, &mut buf));
        assert_eq!(buf, [3]);
        assert!(bus.write(0x3f8, b"x"));
        assert_eq!(lock(&dev).writes, vec![(0, vec![b'x'])]);
    }

    #[test]
    fn unclaimed_ports_read_all_ones() {
        let bus = PioBus::new();
        let mut buf = [0u8; 4];
        assert!(!bus.read(0xcf8, &mut buf));
        assert_eq!(buf, [0xff; 4]);
        assert!(!bus.write(0x80, &[1]));
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = PioBus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x60, 1).expect("insert");
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x64, 1).expect("insert");
        let err = bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x5f, 2);
        assert_eq!(err, Err(BusError::Overlap { base: 0x5f, len: 2 }));
    }
}
