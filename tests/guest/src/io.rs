//! Port I/O, MMIO, the serial console, the TSC and the PIT calibration (all at CPL3).

use core::arch::asm;
use core::fmt;

/// Writes a byte to an I/O port.
pub fn outb(port: u16, val: u8) {
    // SAFETY: port I/O permitted by the TSS I/O bitmap; no memory is touched.
    unsafe { asm!("out dx, al", in("dx") port, in("al") val, options(nostack, preserves_flags)) }
}

/// Writes a word to an I/O port.
pub fn outw(port: u16, val: u16) {
    // SAFETY: as `outb`.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") val, options(nostack, preserves_flags)) }
}

/// Writes a dword to an I/O port.
pub fn outl(port: u16, val: u32) {
    // SAFETY: as `outb`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") val, options(nostack, preserves_flags)) }
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as `outb`.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nostack, preserves_flags)) }
    v
}

/// Reads a dword from an I/O port.
pub fn inl(port: u16) -> u32 {
    let v: u32;
    // SAFETY: as `outb`.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") v, options(nostack, preserves_flags)) }
    v
}

/// Volatile read of a `T` at a physical (identity-mapped) address.
pub fn rd<T: Copy>(addr: u64) -> T {
    // SAFETY: the low 4 GiB are identity-mapped; callers pass device or RAM addresses.
    unsafe { core::ptr::read_volatile(addr as *const T) }
}

/// Volatile write of a `T` at a physical (identity-mapped) address.
pub fn wr<T: Copy>(addr: u64, val: T) {
    // SAFETY: as `rd`.
    unsafe { core::ptr::write_volatile(addr as *mut T, val) }
}

/// The time-stamp counter.
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: rdtsc reads a register; CR4.TSD is clear so CPL3 may use it.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack)) }
    ((hi as u64) << 32) | lo as u64
}

/// TSC ticks per second: the median of five 10 ms measurements against PIT channel 2
/// (robust to a host preempting one of them); `None` when the PIT never counts down.
pub fn calibrate_tsc() -> Option<u64> {
    let mut m = [0u64; 5];
    for v in m.iter_mut() {
        *v = calibrate_once()?;
    }
    m.sort_unstable();
    Some(m[2])
}

fn calibrate_once() -> Option<u64> {
    const COUNT: u16 = 11932; // 10 ms at 1.193182 MHz
    outb(0x61, (inb(0x61) & !0x02) | 0x01);
    outb(0x43, 0xB0);
    outb(0x42, (COUNT & 0xFF) as u8);
    outb(0x42, (COUNT >> 8) as u8);
    let t0 = rdtsc();
    let mut spins = 0u64;
    while inb(0x61) & 0x20 == 0 {
        spins += 1;
        if spins > 50_000_000 {
            return None;
        }
    }
    let t1 = rdtsc();
    Some((t1 - t0) * 100)
}

/// The 8250 UART on 0x3f8.
pub struct Serial;

impl Serial {
    fn put(&mut self, b: u8) {
        let mut spins = 0;
        while inb(0x3FD) & 0x20 == 0 && spins < 100_000 {
            spins += 1;
        }
        outb(0x3F8, b);
    }
}

impl fmt::Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            if b == b'\n' {
                self.put(b'\r');
            }
            self.put(b);
        }
        Ok(())
    }
}

/// Prints a line on the serial console.
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::io::Serial, $($arg)*);
    }};
}
