//! stasis-hammer: a misbehaving guest, for the fault campaign
//! (`tests/tests/fault_campaign.rs`).
//!
//! Until the time is up it repeats three rounds, with pseudo-random values
//! from a seed:
//! - **ports**: reads and writes of 1, 2 and 4 bytes on every I/O port,
//!   except those whose writes end or cripple the guest by design (the
//!   console UART, the ACPI sleep and reset registers, the i8042's reset
//!   command port) and those KVM serves in the kernel (PIC, PIT, ELCR);
//! - **mmio**: reads and writes of every register of every virtio-mmio
//!   slot (devices and empty slots) and of random addresses in the MMIO
//!   gap, through `/dev/mem`;
//! - **queues**: each virtio device driven through its registers into
//!   DRIVER_OK with queues in pages of this program, then fed garbage:
//!   descriptor tables of random addresses, lengths, flags (chains, loops,
//!   indirect tables) and next indices, avail rings of random heads and
//!   indices, notifications of real and made-up queues, random rings and
//!   addresses (unaligned, outside RAM, in MMIO) and resets in between.
//!
//! Needs root, and the virtio drivers unloaded (`rmmod`) so that `/dev/mem`
//! may map the devices' registers. Prints one line per round and a summary
//! `HAMMER-DONE ports=N mmio=N chains=N notifies=N`.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const USAGE: &str = "usage: stasis-hammer [--seconds N] [--seed N]";

/// The virtio-mmio slots (the VMM's layout: 4 KiB each from 0xd000_0000).
const MMIO_BASE: u64 = 0xd000_0000;
const MMIO_SLOT: u64 = 0x1000;
const MMIO_SLOTS: u64 = 19;
/// The MMIO gap below 4 GiB, up to the IOAPIC.
const GAP: (u64, u64) = (0xc000_0000, 0xfec0_0000);

/// Ports left alone: [start, end) with the reason.
const SKIP: &[(u16, u16, &str)] = &[
    (0x20, 0x22, "PIC (in KVM)"),
    (0x40, 0x44, "PIT (in KVM)"),
    (0x61, 0x62, "PIT gate (in KVM)"),
    (0x64, 0x65, "i8042 command: 0xfe resets the machine"),
    (0xa0, 0xa2, "PIC (in KVM)"),
    (0x3f8, 0x400, "the console UART"),
    (0x4d0, 0x4d2, "ELCR (in KVM)"),
    (0x600, 0x603, "ACPI sleep control, status and reset"),
];

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn skipped(port: u16, width: u16) -> bool {
    let end = u32::from(port) + u32::from(width);
    SKIP.iter().any(|&(s, e, _)| u32::from(port) < u32::from(e) && end > u32::from(s))
}

/// # Safety
/// Needs I/O privilege (iopl 3); the port must be one this guest may poke.
unsafe fn port_write(port: u16, width: u16, value: u32) {
    match width {
        1 => std::arch::asm!("out dx, al", in("dx") port, in("al") value as u8),
        2 => std::arch::asm!("out dx, ax", in("dx") port, in("ax") value as u16),
        _ => std::arch::asm!("out dx, eax", in("dx") port, in("eax") value),
    }
}

/// # Safety
/// As [`port_write`].
unsafe fn port_read(port: u16, width: u16) -> u32 {
    let v: u32;
    match width {
        1 => {
            let b: u8;
            std::arch::asm!("in al, dx", in("dx") port, out("al") b);
            v = u32::from(b);
        }
        2 => {
            let w: u16;
            std::arch::asm!("in ax, dx", in("dx") port, out("ax") w);
            v = u32::from(w);
        }
        _ => std::arch::asm!("in eax, dx", in("dx") port, out("eax") v),
    }
    v
}

fn ports_round(rng: &mut Rng, end: Instant) -> u64 {
    let mut n = 0;
    for port in 0..=u16::MAX {
        // Every port is an exit to the VMM: under nested emulation a round
        // takes long, so it stops when the time is up.
        if port % 256 == 0 && Instant::now() >= end {
            break;
        }
        for width in [1u16, 2, 4] {
            if skipped(port, width) {
                continue;
            }
            // SAFETY: iopl(3) was granted; the skip list keeps the
            // console, power and KVM's own devices out.
            unsafe {
                port_write(port, width, rng.next() as u32);
                let _ = port_read(port, width);
            }
            n += 2;
        }
    }
    n
}

/// A window of physical memory through /dev/mem.
struct Phys {
    ptr: *mut u8,
    len: usize,
}

impl Phys {
    fn map(mem: &std::fs::File, addr: u64, len: usize) -> std::io::Result<Phys> {
        // SAFETY: a new shared mapping of /dev/mem; nothing aliases it.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, mem.as_raw_fd(), addr as libc::off_t)
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Phys { ptr: ptr.cast(), len })
    }
    fn write32(&self, off: usize, v: u32) {
        if off + 4 <= self.len {
            // SAFETY: inside the mapping; volatile, as device registers need.
            unsafe { std::ptr::write_volatile(self.ptr.add(off).cast::<u32>(), v) }
        }
    }
    fn read32(&self, off: usize) -> u32 {
        if off + 4 > self.len {
            return 0;
        }
        // SAFETY: as write32.
        unsafe { std::ptr::read_volatile(self.ptr.add(off).cast::<u32>()) }
    }
    fn write8(&self, off: usize, v: u8) {
        if off < self.len {
            // SAFETY: as write32.
            unsafe { std::ptr::write_volatile(self.ptr.add(off), v) }
        }
    }
}

impl Drop for Phys {
    fn drop(&mut self) {
        // SAFETY: unmaps what map mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn mmio_round(mem: &std::fs::File, rng: &mut Rng) -> std::io::Result<u64> {
    let mut n = 0;
    for slot in 0..MMIO_SLOTS {
        let regs = Phys::map(mem, MMIO_BASE + slot * MMIO_SLOT, MMIO_SLOT as usize)?;
        for off in (0..0x200).step_by(4) {
            // Never DRIVER_OK here: a device started on the random ring
            // addresses written meanwhile would write into random guest
            // RAM, and the guest, not the VMM, would die of it. (The
            // queues round starts devices on rings it owns.)
            let value = if off == STATUS { rng.next() as u32 & !4 } else { rng.next() as u32 };
            regs.write32(off, value);
            let _ = regs.read32(off);
            if off != STATUS {
                regs.write8(off + 1 + (rng.below(3) as usize), rng.next() as u8);
            }
            n += 3;
        }
        regs.write32(STATUS, 0);
    }
    for _ in 0..256 {
        let page = (GAP.0 + rng.below(GAP.1 - GAP.0)) & !0xfff;
        if (MMIO_BASE..MMIO_BASE + MMIO_SLOTS * MMIO_SLOT).contains(&page) {
            continue;
        }
        if let Ok(w) = Phys::map(mem, page, 4096) {
            let off = (rng.below(4096 / 4) * 4) as usize;
            w.write32(off, rng.next() as u32);
            let _ = w.read32(off);
            n += 2;
        }
    }
    Ok(n)
}

/// Pages of this process locked in RAM, with their physical addresses.
struct Pages {
    ptr: *mut u8,
    phys: Vec<u64>,
}

impl Pages {
    fn new(count: usize) -> std::io::Result<Pages> {
        let len = count * 4096;
        // SAFETY: a new private anonymous mapping, locked and touched.
        let ptr = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_LOCKED, -1, 0)
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = ptr.cast::<u8>();
        // SAFETY: inside the new mapping.
        unsafe { std::ptr::write_bytes(ptr, 0, len) };
        let pagemap = std::fs::File::open("/proc/self/pagemap")?;
        let mut phys = Vec::with_capacity(count);
        for i in 0..count {
            let virt = ptr as u64 + (i as u64) * 4096;
            let mut entry = [0u8; 8];
            std::os::unix::fs::FileExt::read_exact_at(&pagemap, &mut entry, virt / 4096 * 8)?;
            let entry = u64::from_le_bytes(entry);
            let pfn = entry & ((1 << 55) - 1);
            if entry >> 63 == 0 || pfn == 0 {
                return Err(std::io::Error::other("/proc/self/pagemap gives no frame (not root?)"));
            }
            phys.push(pfn * 4096);
        }
        Ok(Pages { ptr, phys })
    }
    fn fill(&self, page: usize, rng: &mut Rng) {
        for i in 0..512 {
            // SAFETY: inside page `page` of the mapping.
            unsafe { std::ptr::write_volatile(self.ptr.add(page * 4096 + i * 8).cast::<u64>(), rng.next()) }
        }
    }
    fn put16(&self, page: usize, off: usize, v: u16) {
        // SAFETY: inside the mapping (off < 4096 - 1).
        unsafe { std::ptr::write_volatile(self.ptr.add(page * 4096 + off % 4094).cast::<u16>(), v) }
    }
}

// virtio-mmio registers (version 2).
const MAGIC: usize = 0x00;
const DEVICE_FEATURES_SEL: usize = 0x14;
const DRIVER_FEATURES: usize = 0x20;
const DRIVER_FEATURES_SEL: usize = 0x24;
const QUEUE_SEL: usize = 0x30;
const QUEUE_NUM_MAX: usize = 0x34;
const QUEUE_NUM: usize = 0x38;
const QUEUE_READY: usize = 0x44;
const QUEUE_NOTIFY: usize = 0x50;
const INTERRUPT_ACK: usize = 0x64;
const STATUS: usize = 0x70;
const QUEUE_DESC: usize = 0x80;
const QUEUE_DRIVER: usize = 0x90;
const QUEUE_DEVICE: usize = 0xa0;

fn queues_round(mem: &std::fs::File, pages: &Pages, rng: &mut Rng) -> std::io::Result<(u64, u64)> {
    let (mut chains, mut notifies) = (0, 0);
    for slot in 0..MMIO_SLOTS {
        let regs = Phys::map(mem, MMIO_BASE + slot * MMIO_SLOT, MMIO_SLOT as usize)?;
        if regs.read32(MAGIC) != 0x7472_6976 {
            continue;
        }
        for _ in 0..8 {
            regs.write32(STATUS, 0);
            regs.write32(STATUS, 1 | 2);
            regs.write32(DEVICE_FEATURES_SEL, 1);
            regs.write32(DRIVER_FEATURES_SEL, 1);
            // VERSION_1 and whatever else the dice say.
            regs.write32(DRIVER_FEATURES, 1 | (rng.next() as u32 & 0x36));
            regs.write32(DRIVER_FEATURES_SEL, 0);
            regs.write32(DRIVER_FEATURES, rng.next() as u32);
            regs.write32(STATUS, 1 | 2 | 8);
            for queue in 0..3u32 {
                regs.write32(QUEUE_SEL, queue);
                let max = regs.read32(QUEUE_NUM_MAX).clamp(1, 256);
                regs.write32(QUEUE_NUM, if rng.below(8) == 0 { rng.next() as u32 } else { 1 + rng.below(u64::from(max)) as u32 });
                // Rings in three of our pages, or anywhere at all.
                let base = (queue as usize) * 3;
                for (k, reg) in [QUEUE_DESC, QUEUE_DRIVER, QUEUE_DEVICE].into_iter().enumerate() {
                    // Never in RAM outside our pages. Only the used ring
                    // (which the device writes) goes off its page's start,
                    // by at most 16 bytes, and still ends inside the page;
                    // a descriptor table or avail ring read off its start
                    // would give the device descriptors we did not write.
                    let addr = match rng.below(10) {
                        0 => rng.next() | 1 << 40,
                        1 => GAP.0 + rng.below(GAP.1 - GAP.0),
                        2 if reg == QUEUE_DEVICE => pages.phys[base + k] + 1 + rng.below(16),
                        _ => pages.phys[base + k],
                    };
                    regs.write32(reg, addr as u32);
                    regs.write32(reg + 4, (addr >> 32) as u32);
                }
                regs.write32(QUEUE_READY, 1);
            }
            regs.write32(STATUS, 1 | 2 | 4 | 8);
            for _ in 0..16 {
                for queue in 0..3usize {
                    let base = queue * 3;
                    // Descriptors: random addresses (often into our pages),
                    // lengths, flags and next indices.
                    pages.fill(base, rng);
                    for d in 0..256usize {
                        // SAFETY: descriptor `d` lies inside page `base`.
                        let desc = unsafe { pages.ptr.add(base * 4096 + d * 16) };
                        let (addr, len) = if rng.below(2) == 0 {
                            // Into one of our pages, never past its end: a
                            // device writing there must not hit the kernel.
                            let off = rng.below(4096);
                            (pages.phys[9 + rng.below(3) as usize] + off, rng.below(4096 - off + 1) as u32)
                        } else {
                            // Anywhere but RAM: above 1 TiB or in the MMIO gap.
                            let addr = if rng.below(2) == 0 { rng.next() | 1 << 40 } else { GAP.0 + rng.below(GAP.1 - GAP.0) };
                            (addr, rng.next() as u32)
                        };
                        // SAFETY: inside page `base` (16-byte descriptors).
                        unsafe {
                            std::ptr::write_volatile(desc.cast::<[u8; 8]>(), addr.to_le_bytes());
                            std::ptr::write_volatile(desc.add(8).cast::<[u8; 4]>(), len.to_le_bytes());
                        }
                    }
                    // Avail ring: flags, idx, heads.
                    pages.fill(base + 1, rng);
                    pages.put16(base + 1, 2, rng.next() as u16);
                    chains += 1;
                    regs.write32(QUEUE_NOTIFY, if rng.below(6) == 0 { rng.next() as u32 } else { queue as u32 });
                    regs.write32(INTERRUPT_ACK, rng.next() as u32);
                    notifies += 1;
                }
            }
            if rng.below(4) == 0 {
                regs.write32(STATUS, rng.next() as u32);
            }
        }
        // Leave the device reset.
        regs.write32(STATUS, 0);
    }
    Ok((chains, notifies))
}

fn run(seconds: u64, seed: u64) -> Result<(), String> {
    // SAFETY: iopl only changes this process's I/O privilege.
    if unsafe { libc::iopl(3) } != 0 {
        return Err(format!("iopl(3): {} (needs root)", std::io::Error::last_os_error()));
    }
    let mem = OpenOptions::new().read(true).write(true).open("/dev/mem").map_err(|e| format!("/dev/mem: {e}"))?;
    let pages = Pages::new(12).map_err(|e| format!("locked pages: {e}"))?;
    let mut rng = Rng(seed | 1);
    let end = Instant::now() + Duration::from_secs(seconds);
    let (mut ports, mut mmio, mut chains, mut notifies, mut rounds) = (0u64, 0u64, 0u64, 0u64, 0u64);
    while Instant::now() < end {
        ports += ports_round(&mut rng, end);
        mmio += mmio_round(&mem, &mut rng).map_err(|e| format!("mapping virtio-mmio registers: {e} (are the virtio drivers unloaded?)"))?;
        let (c, n) = queues_round(&mem, &pages, &mut rng).map_err(|e| format!("queues: {e}"))?;
        chains += c;
        notifies += n;
        rounds += 1;
        println!("hammer round {rounds}: ports={ports} mmio={mmio} chains={chains} notifies={notifies}");
    }
    println!("HAMMER-DONE rounds={rounds} ports={ports} mmio={mmio} chains={chains} notifies={notifies}");
    Ok(())
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (mut seconds, mut seed) = (60u64, 0x5eed_u64);
    while let Some(arg) = args.next() {
        let value = |v: Option<String>| v.and_then(|v| v.parse::<u64>().ok());
        match arg.as_str() {
            "--seconds" => match value(args.next()) {
                Some(v) => seconds = v,
                None => return usage(),
            },
            "--seed" => match value(args.next()) {
                Some(v) => seed = v,
                None => return usage(),
            },
            _ => return usage(),
        }
    }
    match run(seconds, seed) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stasis-hammer: {e}");
            ExitCode::from(1)
        }
    }
}

fn usage() -> ExitCode {
    eprintln!("{USAGE}");
    ExitCode::from(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_skip_list_keeps_the_console_and_power_ports_out() {
        assert!(skipped(0x3f8, 1) && skipped(0x3f6, 4) && skipped(0x600, 2) && skipped(0x64, 1));
        assert!(!skipped(0x3f7, 1) && !skipped(0x70, 1) && !skipped(0x603, 4) && !skipped(0x65, 1));
    }
}
