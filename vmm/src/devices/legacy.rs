//! Legacy PC devices on port I/O: the 16550 UART (COM1) and the i8042
//! keyboard controller, both from vm-superio, adapted to the bus.

use std::collections::VecDeque;
use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use super::bus::PioDevice;
use super::{PowerEvent, PowerEventSink};

/// Raises a guest interrupt line by signalling an eventfd that KVM watches
/// (an irqfd).
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Turns the i8042's CPU-reset command into a machine reset.
pub struct ResetTrigger<S: PowerEventSink>(pub S);

impl<S: PowerEventSink> Trigger for ResetTrigger<S> {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.power_event(PowerEvent::Reset);
        Ok(())
    }
}

/// Most input bytes held back while the guest's receive FIFO is full.
const MAX_PENDING_INPUT: usize = 1 << 20;

/// COM1: a 16550 UART whose output goes to `W` and whose input comes from
/// [`SerialDevice::queue_input`]. Input beyond what the UART's FIFO holds
/// waits here and moves in as the guest reads.
pub struct SerialDevice<T: Trigger, W: Write> {
    uart: Serial<T, NoEvents, W>,
    pending: VecDeque<u8>,
}

/// The UART's registers and receive FIFO, plus input not yet in the FIFO.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialDeviceState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register: which interrupt is pending.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Bytes in the receive FIFO.
    pub fifo: Vec<u8>,
    /// Input received but not yet in the FIFO.
    pub pending: Vec<u8>,
}

/// Errors while restoring the UART.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SerialStateError {
    /// More held-back input than the device ever keeps.
    #[error("saved serial input of {0} bytes exceeds the limit")]
    PendingTooLong(usize),
    /// vm-superio refused the state (e.g. a receive FIFO over 64 bytes) or
    /// the interrupt could not be raised.
    #[error("cannot restore the serial port: {0}")]
    Restore(String),
}

/// IIR value when no interrupt is pending.
const IIR_NONE: u8 = 0x01;

impl<T: Trigger, W: Write> SerialDevice<T, W> {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: T, out: W) -> Self {
        SerialDevice { uart: Serial::new(irq, out), pending: VecDeque::new() }
    }

    /// A UART in a saved state. If an interrupt was pending, it is raised
    /// again: its edge may have been lost with the old process.
    pub fn from_state(irq: T, out: W, state: &SerialDeviceState) -> Result<Self, SerialStateError> {
        if state.pending.len() > MAX_PENDING_INPUT {
            return Err(SerialStateError::PendingTooLong(state.pending.len()));
        }
        let uart_state = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.fifo.clone(),
        };
        let pending_irq = state.interrupt_identification & IIR_NONE == 0;
        let uart = Serial::from_state(&uart_state, irq, NoEvents, out)
            .map_err(|e| SerialStateError::Restore(format!("{e:?}")))?;
        let mut device = SerialDevice { uart, pending: state.pending.iter().copied().collect() };
        if pending_irq {
            device
                .uart
                .interrupt_evt()
                .trigger()
                .map_err(|e| SerialStateError::Restore(format!("{e:?}")))?;
        }
        device.fill_fifo();
        Ok(device)
    }

    /// The state to save.
    pub fn state(&self) -> SerialDeviceState {
        let s = self.uart.state();
        SerialDeviceState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            fifo: s.in_buffer,
            pending: self.pending.iter().copied().collect(),
        }
    }

    /// Queues bytes typed for the guest; returns how many were accepted
    /// (fewer only when the guest has not read for a long while).
    pub fn queue_input(&mut self, bytes: &[u8]) -> usize {
        let room = MAX_PENDING_INPUT.saturating_sub(self.pending.len());
        let taken = bytes.len().min(room);
        self.pending.extend(&bytes[..taken]);
        self.fill_fifo();
        taken
    }

    /// Bytes queued but not yet in the UART's FIFO.
    pub fn pending_input(&self) -> usize {
        self.pending.len()
    }

    fn fill_fifo(&mut self) {
        let room = self.uart.fifo_capacity();
        if room == 0 || self.pending.is_empty() {
            return;
        }
        let n = room.min(self.pending.len());
        let chunk: Vec<u8> = self.pending.drain(..n).collect();
        if let Err(e) = self.uart.enqueue_raw_bytes(&chunk) {
            log::warn!("serial input dropped: {e:?}");
        }
    }
}

impl<T: Trigger, W: Write + Send> PioDevice for SerialDevice<T, W>
where
    T: Send,
{
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let Ok(offset) = u8::try_from(offset) else { return data.fill(0xff) };
        if let Some(first) = data.first_mut() {
            *first = self.uart.read(offset);
        }
        // A read of the data register may have made room in the FIFO.
        self.fill_fifo();
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let (Ok(offset), Some(&value)) = (u8::try_from(offset), data.first()) else { return };
        if let Err(e) = self.uart.write(offset, value) {
            // The console sink failing (e.g. a closed pipe) must not stop
            // the guest.
            log::debug!("serial output failed: {e:?}");
        }
    }
}

/// Offsets of the i8042's two ports from 0x60.
const I8042_DATA_OFFSET: u16 = 0;
const I8042_COMMAND_OFFSET: u16 = 4;

/// The i8042 on ports 0x60 and 0x64; its CPU-reset command resets the VM.
pub struct I8042<S: PowerEventSink> {
    device: I8042Device<ResetTrigger<S>>,
}

impl<S: PowerEventSink> I8042<S> {
    /// An i8042 that reports resets to `sink`.
    pub fn new(sink: S) -> Self {
        I8042 { device: I8042Device::new(ResetTrigger(sink)) }
    }
}

impl<S: PowerEventSink> PioDevice for I8042<S> {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let value = match offset {
            I8042_DATA_OFFSET | I8042_COMMAND_OFFSET => self.device.read(offset as u8),
            _ => 0xff,
        };
        data.fill(0);
        if let Some(first) = data.first_mut() {
            *first = value;
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if let (I8042_DATA_OFFSET | I8042_COMMAND_OFFSET, Some(&value)) = (offset, data.first()) {
            // The trigger cannot fail.
            let _ = self.device.write(offset as u8, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::channel;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Counts interrupts.
    #[derive(Clone, Default)]
    struct CountingIrq(Arc<Mutex<u32>>);

    impl Trigger for CountingIrq {
        type E = std::convert::Infallible;
        fn trigger(&self) -> Result<(), Self::E> {
            *self.0.lock().expect("lock") += 1;
            Ok(())
        }
    }

    const DATA: u16 = 0;
    const IER: u16 = 1;
    const LSR: u16 = 5;
    const LSR_DATA_READY: u8 = 1;

    fn read_byte<T: Trigger + Send, W: Write + Send>(dev: &mut SerialDevice<T, W>, offset: u16) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn serial_output_reaches_the_sink() {
        let mut dev = SerialDevice::new(CountingIrq::default(), Vec::new());
        for b in b"hi\n" {
            dev.write(DATA, &[*b]);
        }
        assert_eq!(dev.uart.writer(), b"hi\n");
    }

    #[test]
    fn serial_input_larger_than_fifo_arrives_whole_and_in_order() {
        let irq = CountingIrq::default();
        let mut dev = SerialDevice::new(irq.clone(), Vec::new());
        // Enable the received-data interrupt.
        dev.write(IER, &[0x01]);
        let input: Vec<u8> = (0..200u8).collect();
        assert_eq!(dev.queue_input(&input), 200);
        assert!(dev.pending_input() > 0, "FIFO should not hold 200 bytes");
        let mut got = Vec::new();
        while read_byte(&mut dev, LSR) & LSR_DATA_READY != 0 {
            got.push(read_byte(&mut dev, DATA));
        }
        assert_eq!(got, input);
        assert!(*irq.0.lock().expect("lock") > 0, "no receive interrupt raised");
    }

    #[test]
    fn serial_state_round_trips_with_fifo_and_pending_input() {
        let irq = CountingIrq::default();
        let mut dev = SerialDevice::new(irq.clone(), Vec::new());
        dev.write(IER, &[0x01]);
        dev.write(3, &[0x03]);
        let input: Vec<u8> = (0..100u8).collect();
        dev.queue_input(&input);
        let state = dev.state();
        assert_eq!(state.fifo.len() + state.pending.len(), 100);
        assert_eq!(state.line_control, 0x03);

        let irq2 = CountingIrq::default();
        let mut restored = SerialDevice::from_state(irq2.clone(), Vec::new(), &state).expect("restore");
        assert_eq!(restored.state(), state);
        assert!(*irq2.0.lock().expect("lock") > 0, "pending receive interrupt not raised again");
        let mut got = Vec::new();
        while read_byte(&mut restored, LSR) & LSR_DATA_READY != 0 {
            got.push(read_byte(&mut restored, DATA));
        }
        assert_eq!(got, input);
    }

    #[test]
    fn serial_state_with_oversized_fifo_is_refused() {
        let state = SerialDeviceState { fifo: vec![0; 65], interrupt_identification: 1, ..Default::default() };
        let err = SerialDevice::from_state(CountingIrq::default(), Vec::new(), &state).err();
        assert!(matches!(err, Some(SerialStateError::Restore(_))));
    }

    #[test]
    fn i8042_reset_command_resets_the_vm() {
        let (tx, rx) = channel::<PowerEvent>();
        let mut dev = I8042::new(tx);
        dev.write(I8042_COMMAND_OFFSET, &[0xfe]);
        assert_eq!(rx.try_recv(), Ok(PowerEvent::Reset));
    }

    #[test]
    fn i8042_ignores_ports_between_data_and_command() {
        let (tx, rx) = channel::<PowerEvent>();
        let mut dev = I8042::new(tx);
        dev.write(1, &[0xfe]);
        let mut b = [0u8];
        dev.read(2, &mut b);
        assert_eq!(b, [0xff]);
        assert!(rx.try_recv().is_err());
    }
}
