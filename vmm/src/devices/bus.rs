//! The buses that route guest accesses to devices: port I/O (the legacy
//! devices) and MMIO (the virtio-mmio transports). Both map address ranges
//! to devices; they differ only in the width of an address.

use std::sync::{Arc, Mutex};

/// A device on the port I/O bus. `offset` is relative to the device's base.
pub trait PioDevice: Send {
    /// Guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u16, data: &mut [u8]);
    /// Guest writes `data` at `offset`.
    fn write(&mut self, offset: u16, data: &[u8]);
}

/// A device on the MMIO bus. `offset` is relative to the device's base.
pub trait MmioDevice: Send {
    /// Guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

struct Range<D: ?Sized> {
    base: u64,
    len: u64,
    device: Arc<Mutex<D>>,
}

/// Errors while building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// Two devices claim the same addresses.
    #[error("address range {base:#x}+{len} overlaps a device already on the bus")]
    Overlap {
        /// Base of the new range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

/// A bus of devices of kind `D`. Accesses where no device is read as all
/// ones and writes there are dropped, as on real hardware.
pub struct Bus<D: ?Sized> {
    ranges: Vec<Range<D>>,
}

/// The port I/O bus.
pub type PioBus = Bus<dyn PioDevice>;
/// The MMIO bus.
pub type MmioBus = Bus<dyn MmioDevice>;

impl<D: ?Sized> Default for Bus<D> {
    fn default() -> Self {
        Bus { ranges: Vec::new() }
    }
}

impl<D: ?Sized> Bus<D> {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `base..base + len`.
    pub fn insert(&mut self, device: Arc<Mutex<D>>, base: u64, len: u64) -> Result<(), BusError> {
        let end = base.checked_add(len).ok_or(BusError::Overlap { base, len })?;
        let overlaps = self.ranges.iter().any(|r| base < r.base + r.len && r.base < end);
        if overlaps || len == 0 {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.push(Range { base, len, device });
        Ok(())
    }

    /// The device at `addr` and the offset into it.
    fn find(&self, addr: u64) -> Option<(&Mutex<D>, u64)> {
        self.ranges
            .iter()
            .find(|r| addr >= r.base && addr - r.base < r.len)
            .map(|r| (&*r.device, addr - r.base))
    }
}

impl PioBus {
    /// Dispatches a guest read; returns whether a device took it.
    pub fn read(&self, port: u16, data: &mut [u8]) -> bool {
        let Some((device, offset)) = self.find(port.into()) else {
            data.fill(0xff);
            return false;
        };
        // The offset is below the range length, itself a port count.
        lock(device).read(offset as u16, data);
        true
    }

    /// Dispatches a guest write; returns whether a device took it.
    pub fn write(&self, port: u16, data: &[u8]) -> bool {
        let Some((device, offset)) = self.find(port.into()) else { return false };
        lock(device).write(offset as u16, data);
        true
    }
}

impl MmioBus {
    /// Dispatches a guest read; returns whether a device took it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        let Some((device, offset)) = self.find(addr) else {
            data.fill(0xff);
            return false;
        };
        lock(device).read(offset, data);
        true
    }

    /// Dispatches a guest write; returns whether a device took it.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        let Some((device, offset)) = self.find(addr) else { return false };
        lock(device).write(offset, data);
        true
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
    fn mmio_bus_routes_by_64_bit_address() {
        #[derive(Default)]
        struct Cell(u64);
        impl MmioDevice for Cell {
            fn read(&mut self, offset: u64, data: &mut [u8]) {
                data.fill((offset + self.0) as u8);
            }
            fn write(&mut self, _offset: u64, data: &[u8]) {
                self.0 = u64::from(data[0]);
            }
        }
        let mut bus = MmioBus::new();
        bus.insert(Arc::new(Mutex::new(Cell::default())), 0xd000_0000, 0x1000).expect("insert");
        assert!(bus.write(0xd000_0000, &[7]));
        let mut buf = [0u8; 4];
        assert!(bus.read(0xd000_0010, &mut buf));
        assert_eq!(buf, [0x17; 4]);
        assert!(!bus.read(0xd000_1000, &mut buf));
        assert_eq!(buf, [0xff; 4]);
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
