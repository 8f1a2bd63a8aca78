//! The CMOS RTC on ports 0x70 (index) and 0x71 (data): the wall-clock time
//! in BCD, 24-hour mode, never "update in progress", plus 128 bytes of CMOS
//! RAM. Without it, the guest's RTC driver spins for seconds on an update
//! flag that never clears.

use std::time::{SystemTime, UNIX_EPOCH};

use super::bus::PioDevice;

/// Offsets from the device's base port.
const INDEX_OFFSET: u16 = 0;
const DATA_OFFSET: u16 = 1;

/// Register indices.
const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY_OF_MONTH: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const STATUS_A: u8 = 0x0a;
const STATUS_B: u8 = 0x0b;
const STATUS_C: u8 = 0x0c;
const STATUS_D: u8 = 0x0d;
const CENTURY: u8 = 0x32;

/// Status A: 32.768 kHz time base, 1024 Hz rate; UIP (bit 7) always clear.
const STATUS_A_DEFAULT: u8 = 0x26;
/// Status B: 24-hour mode, BCD.
const STATUS_B_24H: u8 = 0x02;
/// Status D: RAM and time valid.
const STATUS_D_VALID: u8 = 0x80;
/// The index register's bit 7 masks NMI; it is not part of the index.
const INDEX_MASK: u8 = 0x7f;

/// A source of "now", in seconds since the Unix epoch.
pub trait Clock: Send {
    /// Seconds since 1970-01-01T00:00:00Z.
    fn now(&self) -> u64;
}

/// The host's clock.
pub struct HostClock;

impl Clock for HostClock {
    fn now(&self) -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
    }
}

/// The CMOS RTC's state: the index register and the RAM bytes. The clock
/// registers are not state: they always read the host's time.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CmosState {
    /// The selected register.
    pub index: u8,
    /// The 128 bytes of CMOS RAM.
    pub ram: Vec<u8>,
}

/// Errors while restoring the RTC.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmosStateError {
    /// The RAM is not 128 bytes.
    #[error("saved CMOS RAM is {0} bytes, not 128")]
    RamSize(usize),
}

/// The CMOS RTC.
pub struct Cmos<C: Clock> {
    clock: C,
    index: u8,
    ram: [u8; 128],
}

impl<C: Clock> Cmos<C> {
    /// An RTC reading time from `clock`.
    pub fn new(clock: C) -> Self {
        let mut ram = [0u8; 128];
        ram[usize::from(STATUS_A)] = STATUS_A_DEFAULT;
        ram[usize::from(STATUS_B)] = STATUS_B_24H;
        ram[usize::from(STATUS_D)] = STATUS_D_VALID;
        Cmos { clock, index: 0, ram }
    }

    /// An RTC in a saved state.
    pub fn from_state(clock: C, state: &CmosState) -> Result<Self, CmosStateError> {
        let ram: [u8; 128] =
            state.ram.as_slice().try_into().map_err(|_| CmosStateError::RamSize(state.ram.len()))?;
        Ok(Cmos { clock, index: state.index & INDEX_MASK, ram })
    }

    /// The state to save.
    pub fn state(&self) -> CmosState {
        CmosState { index: self.index, ram: self.ram.to_vec() }
    }

    fn read_register(&self, index: u8) -> u8 {
        let time = || civil_from_unix(self.clock.now());
        match index {
            SECONDS => bcd(time().second),
            MINUTES => bcd(time().minute),
            HOURS => bcd(time().hour),
            WEEKDAY => bcd(time().weekday),
            DAY_OF_MONTH => bcd(time().day),
            MONTH => bcd(time().month),
            YEAR => bcd((time().year % 100) as u8),
            CENTURY => bcd((time().year / 100) as u8),
            // Reading C acknowledges interrupts; none are ever raised.
            STATUS_C => 0,
            _ => self.ram[usize::from(index & INDEX_MASK)],
        }
    }
}

impl<C: Clock> PioDevice for Cmos<C> {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        let value = match offset {
            INDEX_OFFSET => 0xff,
            DATA_OFFSET => self.read_register(self.index),
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            INDEX_OFFSET => self.index = value & INDEX_MASK,
            // Writes to the clock registers are ignored: the guest's time
            // follows the host's. Status and RAM bytes are kept.
            DATA_OFFSET
                if self.index > YEAR
                    && self.index != STATUS_A
                    && self.index != STATUS_C
                    && self.index != STATUS_D =>
            {
                self.ram[usize::from(self.index)] = value;
            }
            _ => {}
        }
    }
}

fn bcd(value: u8) -> u8 {
    ((value / 10) << 4) | (value % 10)
}

/// A UTC calendar time.
#[derive(Debug, PartialEq, Eq)]
struct Civil {
    year: u32,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
    /// 1 = Sunday … 7 = Saturday, as the RTC counts.
    weekday: u8,
}

/// Converts Unix seconds to a UTC calendar date (days-to-civil algorithm on
/// the proleptic Gregorian calendar).
fn civil_from_unix(secs: u64) -> Civil {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // 1970-01-01 was a Thursday (weekday 5 when Sunday is 1).
    let weekday = ((days + 4) % 7) as u8 + 1;
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (yoe + era * 400 + i64::from(month <= 2)) as u32;
    Civil {
        year,
        month,
        day,
        hour: (rem / 3600) as u8,
        minute: (rem % 3600 / 60) as u8,
        second: (rem % 60) as u8,
        weekday,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct FixedClock(u64);

    impl Clock for FixedClock {
        fn now(&self) -> u64 {
            self.0
        }
    }

    fn read(cmos: &mut Cmos<FixedClock>, index: u8) -> u8 {
        cmos.write(INDEX_OFFSET, &[index]);
        let mut b = [0u8];
        cmos.read(DATA_OFFSET, &mut b);
        b[0]
    }

    #[test]
    fn civil_dates_are_right() {
        assert_eq!(
            civil_from_unix(0),
            Civil { year: 1970, month: 1, day: 1, hour: 0, minute: 0, second: 0, weekday: 5 }
        );
        // 2024-02-29T13:45:30Z, a Thursday.
        assert_eq!(
            civil_from_unix(1_709_214_330),
            Civil { year: 2024, month: 2, day: 29, hour: 13, minute: 45, second: 30, weekday: 5 }
        );
    }

    #[test]
    fn time_registers_read_in_bcd() {
        // 2026-11-25T19:53:07Z, a Wednesday.
        let mut cmos = Cmos::new(FixedClock(1_795_636_387));
        assert_eq!(read(&mut cmos, SECONDS), 0x07);
        assert_eq!(read(&mut cmos, MINUTES), 0x53);
        assert_eq!(read(&mut cmos, HOURS), 0x19);
        assert_eq!(read(&mut cmos, DAY_OF_MONTH), 0x25);
        assert_eq!(read(&mut cmos, MONTH), 0x11);
        assert_eq!(read(&mut cmos, YEAR), 0x26);
        assert_eq!(read(&mut cmos, CENTURY), 0x20);
        assert_eq!(read(&mut cmos, WEEKDAY), 0x04);
    }

    #[test]
    fn update_in_progress_is_never_set() {
        let mut cmos = Cmos::new(FixedClock(0));
        assert_eq!(read(&mut cmos, STATUS_A) & 0x80, 0);
        assert_eq!(read(&mut cmos, STATUS_D), STATUS_D_VALID);
    }

    #[test]
    fn nmi_mask_bit_is_not_part_of_the_index() {
        let mut cmos = Cmos::new(FixedClock(59));
        assert_eq!(read(&mut cmos, 0x80 | SECONDS), 0x59);
    }

    #[test]
    fn state_round_trips() {
        let mut cmos = Cmos::new(FixedClock(0));
        cmos.write(INDEX_OFFSET, &[0x41]);
        cmos.write(DATA_OFFSET, &[0x5a]);
        let state = cmos.state();
        let mut restored = Cmos::from_state(FixedClock(0), &state).expect("restore");
        assert_eq!(restored.state(), state);
        assert_eq!(read(&mut restored, 0x41), 0x5a);
        let bad = CmosState { index: 0, ram: vec![0; 12] };
        assert_eq!(Cmos::from_state(FixedClock(0), &bad).err(), Some(CmosStateError::RamSize(12)));
    }

    #[test]
    fn ram_bytes_are_kept_and_clock_writes_ignored() {
        let mut cmos = Cmos::new(FixedClock(0));
        cmos.write(INDEX_OFFSET, &[0x40]);
        cmos.write(DATA_OFFSET, &[0xab]);
        assert_eq!(read(&mut cmos, 0x40), 0xab);
        cmos.write(INDEX_OFFSET, &[SECONDS]);
        cmos.write(DATA_OFFSET, &[0x33]);
        assert_eq!(read(&mut cmos, SECONDS), 0x00);
    }
}
