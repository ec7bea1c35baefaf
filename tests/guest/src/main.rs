//! The test guest: a freestanding x86-64 ELF booted through its PVH note. A few lines of
//! kernel-mode assembly (`boot.s`) enter long mode and drop to CPL3; everything here runs in
//! user mode: PCI enumeration, a virtio-blk driver, pattern checks, IOPS polled and with
//! MSI-X interrupts, results as `key=value` lines on the serial port, then power-off.
//!
//! Command line (PVH start info), space-separated `key=value`:
//! `exit=isa|acpi|reset|port:0xNNNN` (how to power off; `isa` = QEMU isa-debug-exit at
//! 0xf4; `reset` resets instead, through the FADT's reset register),
//! `s5=N` (ACPI S5 sleep type, 5), `pci=auto|port|ecam`, `ecam=0xADDR` (else ACPI MCFG),
//! `ms=N` (length of each IOPS phase, 300), `blocks=N` (pattern blocks per disk, 64),
//! `span_mib=N` (random-read span, 64), `tsc_khz=N` (else PIT calibration), `seed=N`,
//! `more=1` (after the read IOPS: disk0's random-write IOPS and QD1 read latency in ns,
//! each polled and with interrupts, as `disk0.iops_write_poll`, `disk0.lat_qd1_ns_irq`...),
//! `windows=N window_ms=M` (rate windows on disk0 after the pattern checks, see
//! [`windows`]), `gens=N gen_writes=K gen_span_mib=S` (passes of random writes on disk0,
//! each with its own generation's pattern, then all checked, see [`gens`]), `hotplug=N hp_base=0xADDR hp_gsi=N hp_wait_s=N` (handle N hot plug
//! events at the end, see [`hotplug`]).

#![no_std]
#![no_main]

mod gens;
mod hotplug;
mod io;
mod pci;
mod virtio;
mod windows;

use core::arch::{asm, global_asm};

use pci::{Access, Bdf, Config};
use virtio::{BLOCK, Disk, MAX_DISKS, S_IOERR};

global_asm!(include_str!("boot.s"), options(att_syntax));

unsafe extern "C" {
    static boot_start_info: u64;
    static unexpected_irqs: u64;
}

/// `memcpy` for the compiler (no libc here).
///
/// # Safety
/// Standard `memcpy` contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees valid, non-overlapping ranges of `n` bytes.
    unsafe {
        asm!("rep movsb", inout("rdi") dst => _, inout("rsi") src => _, inout("rcx") n => _,
             options(nostack, preserves_flags));
    }
    dst
}

/// `memmove` for the compiler.
///
/// # Safety
/// Standard `memmove` contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize) <= (src as usize) || (dst as usize) >= (src as usize) + n {
        // SAFETY: forward copy is safe when dst precedes src or the ranges are disjoint.
        return unsafe { memcpy(dst, src, n) };
    }
    // SAFETY: backward copy (direction flag set, then cleared) for overlapping ranges.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rdi") dst.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
             inout("rcx") n => _, options(nostack));
    }
    dst
}

/// `memset` for the compiler.
///
/// # Safety
/// Standard `memset` contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees `n` writable bytes at `dst`.
    unsafe {
        asm!("rep stosb", inout("rdi") dst => _, inout("rcx") n => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    dst
}

/// `memcmp` for the compiler.
///
/// # Safety
/// Standard `memcmp` contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    let mut i = 0;
    while i < n {
        // SAFETY: the caller guarantees `n` readable bytes at both.
        let (x, y) = unsafe {
            (
                core::ptr::read_volatile(a.add(i)),
                core::ptr::read_volatile(b.add(i)),
            )
        };
        if x != y {
            return x as i32 - y as i32;
        }
        i += 1;
    }
    0
}

/// `bcmp` for the compiler.
///
/// # Safety
/// Standard `bcmp` contract.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract as memcmp.
    unsafe { memcmp(a, b, n) }
}

/// Referenced by the unwind tables of the prebuilt `core` (built with `panic = "unwind"`);
/// never called, since this crate aborts on panic.
#[unsafe(no_mangle)]
pub extern "C" fn rust_eh_personality() {}

/// How the guest ends.
#[derive(Clone, Copy)]
enum Exit {
    /// QEMU isa-debug-exit at 0xf4: status `(code << 1) | 1`.
    Isa,
    /// ACPI sleep to S5 with this SLP_TYP.
    Acpi(u8),
    /// One byte (the code) written to this port.
    Port(u16),
    /// The FADT's reset register (the VM reboots).
    Reset,
}

static mut EXIT: Exit = Exit::Isa;
static mut RSDP: u64 = 0;

fn finish(ok: bool) -> ! {
    say!("result={}", if ok { "ok" } else { "fail" });
    say!("poweroff");
    // SAFETY: single-threaded guest; written once during start-up.
    let (exit, rsdp) = unsafe { (EXIT, RSDP) };
    match exit {
        Exit::Isa => io::outl(0xF4, if ok { 0 } else { 1 }),
        Exit::Port(p) => io::outb(p, if ok { 0 } else { 1 }),
        Exit::Acpi(typ) => pci::acpi_poweroff(rsdp, typ),
        Exit::Reset => pci::acpi_reset(rsdp),
    }
    say!("poweroff failed");
    loop {
        core::hint::spin_loop();
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    say!("panic={}", info.message());
    finish(false)
}

/// Called (at CPL0) by the exception stubs of `boot.s`.
#[unsafe(no_mangle)]
pub extern "C" fn guest_fault(vector: u64, error: u64, rip: u64, cr2: u64) -> ! {
    say!("fault=vector:{vector} error:{error:#x} rip:{rip:#x} cr2:{cr2:#x}");
    finish(false)
}

/// The command line, at most 1 KiB.
struct Args {
    buf: [u8; 1024],
    len: usize,
}

impl Args {
    fn load(start_info: u64) -> Args {
        let mut a = Args {
            buf: [0; 1024],
            len: 0,
        };
        if start_info == 0 || io::rd::<u32>(start_info) != 0x336e_c578 {
            return a;
        }
        let p = io::rd::<u64>(start_info + 24);
        if p == 0 || p >= 1 << 32 {
            return a;
        }
        while a.len < a.buf.len() {
            let c = io::rd::<u8>(p + a.len as u64);
            if c == 0 {
                break;
            }
            a.buf[a.len] = c;
            a.len += 1;
        }
        a
    }

    fn get(&self, key: &str) -> Option<&str> {
        let s = core::str::from_utf8(&self.buf[..self.len]).ok()?;
        s.split_ascii_whitespace().find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == key).then_some(v)
        })
    }

    fn num(&self, key: &str, default: u64) -> u64 {
        self.get(key).and_then(parse_num).unwrap_or(default)
    }
}

fn parse_num(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

fn pattern_word(seed: u64, sector: u64, i: u64) -> u64 {
    let mut z =
        seed ^ sector.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Entered at CPL3 from `boot.s`.
#[unsafe(no_mangle)]
pub extern "C" fn guest_main() -> ! {
    say!("guest=virtio-blk-test");
    // SAFETY: written by the entry code before user mode; read-only afterwards.
    let start_info = unsafe { core::ptr::read_volatile(&raw const boot_start_info) } & 0xFFFF_FFFF;
    let args = Args::load(start_info);
    let rsdp_si = if start_info != 0 {
        io::rd::<u64>(start_info + 32)
    } else {
        0
    };
    let rsdp = pci::find_rsdp(rsdp_si).unwrap_or(0);
    let exit = match args.get("exit") {
        Some("acpi") => Exit::Acpi(args.num("s5", 5) as u8),
        Some("reset") => Exit::Reset,
        Some(p) if p.starts_with("port:") => Exit::Port(parse_num(&p[5..]).unwrap_or(0xF4) as u16),
        _ => Exit::Isa,
    };
    // SAFETY: single-threaded; the only writes to these statics.
    unsafe {
        EXIT = exit;
        RSDP = rsdp;
    }
    say!("rsdp={rsdp:#x}");

    let tsc_hz = match args.num("tsc_khz", 0) {
        0 => io::calibrate_tsc().unwrap_or(1_000_000_000),
        k => k * 1000,
    };
    say!("tsc_khz={}", tsc_hz / 1000);

    let ecam = args.get("ecam").and_then(parse_num).or_else(|| {
        if rsdp != 0 {
            pci::mcfg_base(rsdp)
        } else {
            None
        }
    });
    let access = match (args.get("pci"), ecam) {
        (Some("port"), _) | (_, None) => Access::Port,
        (_, Some(base)) => Access::Ecam(base),
    };
    if let Some(base) = ecam {
        say!("ecam_base={base:#x}");
    }
    say!(
        "pci.access={}",
        if access == Access::Port {
            "port"
        } else {
            "ecam"
        }
    );
    let cfg = Config { access };

    let mut found: [Option<Bdf>; MAX_DISKS] = [None; MAX_DISKS];
    let mut n = 0;
    let mut functions = 0;
    for dev in 0..32u8 {
        for func in 0..8u8 {
            let b = Bdf { bus: 0, dev, func };
            let id = cfg.read32(b, 0);
            if id & 0xFFFF == 0xFFFF {
                if func == 0 {
                    break;
                }
                continue;
            }
            functions += 1;
            if id == 0x1042_1AF4 && n < MAX_DISKS {
                found[n] = Some(b);
                n += 1;
            }
            if func == 0 && cfg.read8(b, 0x0E) & 0x80 == 0 {
                break;
            }
        }
    }
    say!("pci.functions={functions}");
    say!("disks={n}");
    let mut ok = n > 0;
    let timeout = tsc_hz * 10;
    let seed = args.num("seed", 1);
    let blocks = args.num("blocks", 64);
    let ms = args.num("ms", 300);
    let span = args.num("span_mib", 64) * 2048;
    let mut disks: [Option<Disk>; MAX_DISKS] = [const { None }; MAX_DISKS];
    for (i, b) in found.iter().enumerate() {
        let Some(b) = *b else { continue };
        say!("disk{i}.bdf={:02x}:{:02x}.{}", b.bus, b.dev, b.func);
        match Disk::init(&cfg, b, i) {
            Ok(d) => {
                say!("disk{i}.capacity_sectors={}", d.capacity);
                say!("disk{i}.num_queues={}", d.nq);
                say!("disk{i}.queue_size={}", d.qsize);
                say!("disk{i}.ro={}", d.ro as u8);
                disks[i] = Some(d);
            }
            Err(e) => {
                say!("disk{i}.error={e}");
                ok = false;
            }
        }
    }

    // Patterns: write spread-out 4 KiB blocks, read them back, compare.
    for (i, d) in disks.iter_mut().enumerate() {
        let Some(d) = d else { continue };
        let per = (BLOCK / 512) as u64;
        let count = blocks.min(d.capacity / per);
        let stride = ((d.capacity / count.max(1)) / per).max(1) * per;
        let words = (BLOCK / 8) as u64;
        if d.ro {
            let mut st = 0xFFu8;
            let r = d.transfer(
                true,
                &mut core::iter::once(0),
                &mut |_, _| {},
                &mut |_, _, s| st = s,
                timeout,
            );
            let what = match (r, st) {
                (Err(e), _) => e,
                (Ok(()), S_IOERR) => "ioerr",
                (Ok(()), 0) => "ok",
                (Ok(()), 2) => "unsupp",
                _ => "other",
            };
            say!("disk{i}.ro_write={what}");
            ok &= what == "ioerr";
        } else {
            let mut errors = 0u64;
            let r = d.transfer(
                true,
                &mut (0..count).map(|k| k * stride),
                &mut |buf, sector| {
                    for w in 0..words {
                        io::wr::<u64>(buf + 8 * w, pattern_word(seed, sector, w));
                    }
                },
                &mut |_, _, st| errors += (st != 0) as u64,
                timeout,
            );
            if let Err(e) = r {
                say!("disk{i}.write_error={e}");
            }
            say!("disk{i}.write_errors={errors}");
            ok &= r.is_ok() && errors == 0;
        }
        let (mut errors, mut bad) = (0u64, 0u64);
        let ro = d.ro;
        let r = d.transfer(
            false,
            &mut (0..count).map(|k| k * stride),
            &mut |_, _| {},
            &mut |buf, sector, st| {
                if st != 0 {
                    errors += 1;
                } else if !ro
                    && (0..words)
                        .any(|w| io::rd::<u64>(buf + 8 * w) != pattern_word(seed, sector, w))
                {
                    bad += 1;
                }
            },
            timeout,
        );
        let good = r.is_ok() && errors == 0 && bad == 0;
        say!("disk{i}.read_errors={errors}");
        say!(
            "disk{i}.verify={}",
            if ro {
                "read-only"
            } else if good {
                "ok"
            } else {
                "fail"
            }
        );
        say!(
            "disk{i}.verified_blocks={}",
            if good && !ro { count } else { 0 }
        );
        ok &= good;
    }

    let mut rng = seed | 1;
    if let (gens @ 1.., Some(d)) = (args.num("gens", 0), disks[0].as_mut()) {
        let shape = (
            gens,
            args.num("gen_writes", 32),
            args.num("gen_span_mib", 16) * 256,
        );
        ok &= gens::run(d, 0, shape, seed, &mut rng, timeout);
    }
    if let (count @ 1.., Some(d)) = (args.num("windows", 0), disks[0].as_mut()) {
        let w = windows::Windows {
            count,
            ticks: tsc_hz / 1000 * args.num("window_ms", 500),
            tsc_hz,
            timeout,
            span: span.min(d.capacity),
        };
        ok &= windows::run(d, 0, &w, &mut rng);
    }

    // IOPS: random 4 KiB reads at full depth, first polled, then with MSI-X interrupts.
    let ticks = tsc_hz / 1000 * ms;
    for irq in [false, true] {
        let mode = if irq { "irq" } else { "poll" };
        for (i, d) in disks.iter_mut().enumerate() {
            let Some(d) = d else { continue };
            d.set_interrupts(irq);
            let before: u64 = d.queues[..d.nq]
                .iter()
                .map(|q| virtio::irq_count(q.vec))
                .sum();
            let r = d.iops(
                ticks,
                irq,
                span.min(d.capacity),
                &mut rng,
                false,
                usize::MAX,
            );
            d.set_interrupts(false);
            let after: u64 = d.queues[..d.nq]
                .iter()
                .map(|q| virtio::irq_count(q.vec))
                .sum();
            match r {
                Ok((done, errors, elapsed)) => {
                    let iops = done * tsc_hz / elapsed.max(1);
                    say!("disk{i}.iops_{mode}={iops}");
                    say!("disk{i}.ops_{mode}={done}");
                    if errors != 0 {
                        say!("disk{i}.errors_{mode}={errors}");
                        ok = false;
                    }
                    if irq {
                        say!("disk{i}.irqs={}", after - before);
                        ok &= after > before;
                    }
                }
                Err(e) => {
                    say!("disk{i}.error_{mode}={e}");
                    ok = false;
                }
            }
        }
    }
    // `more=1`: on disk0, random 4 KiB writes at full depth, then reads at QD1 (latency),
    // each polled and with interrupts (for the benchmark).
    if let (1.., Some(d)) = (args.num("more", 0), disks[0].as_mut()) {
        for (write, depth, name) in [(true, usize::MAX, "iops_write"), (false, 1, "lat_qd1_ns")] {
            if write && d.ro {
                continue;
            }
            if write {
                // Data that is not zeroes, so the writes show on the image.
                for q in 0..d.nq {
                    for slot in 0..virtio::SLOTS {
                        let buf = d.queues[q].buf(slot);
                        for w in 0..virtio::BLOCK / 8 {
                            io::wr::<u64>(buf + 8 * w as u64, 0xA5A5_A5A5_A5A5_A5A5);
                        }
                    }
                }
            }
            for irq in [false, true] {
                let mode = if irq { "irq" } else { "poll" };
                d.set_interrupts(irq);
                let r = d.iops(ticks, irq, span.min(d.capacity), &mut rng, write, depth);
                d.set_interrupts(false);
                match r {
                    Ok((done, 0, elapsed)) if done > 0 => {
                        let value = if write {
                            done * tsc_hz / elapsed.max(1)
                        } else {
                            elapsed * 1_000_000 / (tsc_hz / 1000).max(1) / done
                        };
                        say!("disk0.{name}_{mode}={value}");
                    }
                    Ok((done, errors, _)) => {
                        say!("disk0.error_{name}_{mode}=done {done} errors {errors}");
                        ok = false;
                    }
                    Err(e) => {
                        say!("disk0.error_{name}_{mode}={e}");
                        ok = false;
                    }
                }
            }
        }
    }
    if let n @ 1.. = args.num("hotplug", 0) {
        let mut slots = [None; MAX_DISKS];
        for (s, b) in slots.iter_mut().zip(found.iter()) {
            *s = b.map(|b| b.dev);
        }
        let plan = hotplug::Plan {
            events: n,
            base: args.num("hp_base", 0xF000_0000),
            gsi: args.num("hp_gsi", 23) as u32,
            wait: tsc_hz * args.num("hp_wait_s", 60),
            timeout,
            seed,
            ms: tsc_hz / 1000,
        };
        ok &= hotplug::run(&cfg, &mut slots, &mut disks, &plan);
    }

    // SAFETY: a counter bumped only by the CPL0 stub; read volatile.
    let unexpected = unsafe { core::ptr::read_volatile(&raw const unexpected_irqs) };
    say!("unexpected_irqs={unexpected}");
    finish(ok)
}
