//! Emulated devices and the port I/O bus that routes guest accesses to them.
//!
//! Devices know nothing of KVM or the VMM: they take small traits (an
//! interrupt trigger, a `Write` sink, a power-event sink) so they can be
//! tested on their own.

pub mod acpi_pm;
pub mod bus;
pub mod cmos;
pub mod legacy;
pub mod virtio;

use std::sync::mpsc::Sender;

/// What a device can ask of the machine as a whole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerEvent {
    /// The guest turned itself off.
    PowerOff,
    /// The guest asked for a reset (reboot).
    Reset,
}

/// A sink for power events, given to devices that can end the VM.
pub trait PowerEventSink: Send {
    /// Reports one event.
    fn power_event(&self, event: PowerEvent);
}

impl<T: From<PowerEvent> + Send> PowerEventSink for Sender<T> {
    fn power_event(&self, event: PowerEvent) {
        // The receiver only goes away while the VMM is exiting anyway.
        let _ = self.send(T::from(event));
    }
}
