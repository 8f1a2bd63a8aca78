//! The hardware-reduced ACPI power-management registers: sleep control,
//! sleep status and reset, on three consecutive I/O ports.

use super::bus::PioDevice;
use super::{PowerEvent, PowerEventSink};
use crate::acpi::{RESET_VALUE, S5_SLEEP_TYPE};

/// SLP_EN in the sleep control register.
const SLP_EN: u8 = 1 << 5;
/// SLP_TYPx field position and mask in the sleep control register.
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111;

/// Register offsets from the device's base port.
const SLEEP_CONTROL: u16 = 0;
const SLEEP_STATUS: u16 = 1;
const RESET: u16 = 2;

/// The ACPI power-management device.
pub struct AcpiPm<S: PowerEventSink> {
    sink: S,
}

impl<S: PowerEventSink> AcpiPm<S> {
    /// Reports power-off and reset to `sink`.
    pub fn new(sink: S) -> Self {
        AcpiPm { sink }
    }
}

impl<S: PowerEventSink> PioDevice for AcpiPm<S> {
    fn read(&mut self, _offset: u16, data: &mut [u8]) {
        // No wake events are ever pending.
        data.fill(0);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            SLEEP_CONTROL => {
                let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if value & SLP_EN != 0 && sleep_type == S5_SLEEP_TYPE {
                    log::info!("guest powered off through ACPI");
                    self.sink.power_event(PowerEvent::PowerOff);
                } else if value & SLP_EN != 0 {
                    log::warn!("guest asked for unsupported sleep state SLP_TYP={sleep_type}");
                }
            }
            RESET if value == RESET_VALUE => {
                log::info!("guest reset through the ACPI reset register");
                self.sink.power_event(PowerEvent::Reset);
            }
            SLEEP_STATUS | RESET => {}
            _ => log::debug!("write to unknown ACPI PM register {offset}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::channel;

    use super::*;

    #[test]
    fn s5_with_slp_en_powers_off() {
        let (tx, rx) = channel::<PowerEvent>();
        let mut pm = AcpiPm::new(tx);
        pm.write(SLEEP_CONTROL, &[(S5_SLEEP_TYPE << SLP_TYP_SHIFT) | SLP_EN]);
        assert_eq!(rx.try_recv(), Ok(PowerEvent::PowerOff));
    }

    #[test]
    fn sleep_type_without_slp_en_does_nothing() {
        let (tx, rx) = channel::<PowerEvent>();
        let mut pm = AcpiPm::new(tx);
        pm.write(SLEEP_CONTROL, &[S5_SLEEP_TYPE << SLP_TYP_SHIFT]);
        pm.write(SLEEP_CONTROL, &[(3 << SLP_TYP_SHIFT) | SLP_EN]);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn reset_value_resets() {
        let (tx, rx) = channel::<PowerEvent>();
        let mut pm = AcpiPm::new(tx);
        pm.write(RESET, &[0x42]);
        assert!(rx.try_recv().is_err());
        pm.write(RESET, &[RESET_VALUE]);
        assert_eq!(rx.try_recv(), Ok(PowerEvent::Reset));
    }
}
