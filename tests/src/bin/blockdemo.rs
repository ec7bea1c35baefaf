//! The runnable slice of the product until the VMM and its API exist: two disks, each
//! served by its own I/O thread (epoll over the engine's completion eventfd and a
//! throttle timerfd), one of them throttled, under a verified random read/write load.
//! Prints each disk's counters every second and a summary at the end; exits non-zero on
//! any I/O or data error.
//!
//! `cargo run --release -p tests --bin blockdemo -- --seconds 6 --iops-limit 2000`

// Demo load and its figures: block indexes of a small test image, counts far below 2^53.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)]

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use block::bounce::AlignedBuf;
use block::throttle::{
    Direction, Throttle, ThrottleGroup, ThrottleLimits, ThrottleTimer, ThrottledQueue,
};
use block::{
    AioKind, CacheMode, CountersSnapshot, Disk, DiskCounters, DiskOptions, DiskQueue, EngineOptions,
};

use clap::Parser;
use tests::image::parse_size;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

#[derive(Parser, Debug)]
#[command(about = "Two disks on two I/O threads, one throttled, with live counters")]
struct Args {
    /// Directory for the two disk images.
    #[arg(long, default_value = "/var/tmp/vmm-demo")]
    dir: PathBuf,
    /// Size of each image.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    size: u64,
    /// How long to run.
    #[arg(long, default_value_t = 6)]
    seconds: u64,
    /// iops_total limit of the second disk.
    #[arg(long, default_value_t = 2000)]
    iops_limit: u64,
    /// Requests in flight per disk.
    #[arg(long, default_value_t = 16)]
    qd: usize,
}

/// One disk of the demo.
struct DemoDisk {
    id: &'static str,
    aio: AioKind,
    limits: ThrottleLimits,
    counters: Arc<DiskCounters>,
    verify_errors: AtomicU64,
}

fn main() {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => {
            eprintln!("blockdemo: {e}");
            std::process::exit(2);
        }
    }
}

fn run(args: &Args) -> Result<bool, String> {
    if args.size < 1 << 20 || args.qd == 0 || args.qd > 256 {
        return Err("--size must be at least 1M and --qd 1..=256".into());
    }
    std::fs::create_dir_all(&args.dir).map_err(|e| format!("{}: {e}", args.dir.display()))?;
    let disks = [
        Arc::new(DemoDisk {
            id: "disk0",
            aio: AioKind::IoUring,
            limits: ThrottleLimits::default(),
            counters: Arc::default(),
            verify_errors: AtomicU64::new(0),
        }),
        Arc::new(DemoDisk {
            id: "disk1",
            aio: AioKind::Native,
            limits: ThrottleLimits {
                iops_total: args.iops_limit,
                ..Default::default()
            },
            counters: Arc::default(),
            verify_errors: AtomicU64::new(0),
        }),
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for d in &disks {
        let path = args.dir.join(format!("{}.raw", d.id));
        let file = std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        file.set_len(args.size).map_err(|e| e.to_string())?;
        let disk = Disk::open(&DiskOptions {
            cache: CacheMode::None,
            ..DiskOptions::new(path)
        })
        .map_err(|e| e.to_string())?;
        println!(
            "{}: {} MiB, cache=none, aio={}, iothread iothread-{}, throttle {}",
            d.id,
            args.size >> 20,
            d.aio,
            d.id,
            serde_json::to_string(&d.limits).unwrap_or_default()
        );
        let (d, stop, qd) = (d.clone(), stop.clone(), args.qd);
        let handle = std::thread::Builder::new()
            .name(format!("iothread-{}", d.id))
            .spawn(move || iothread(disk, &d, qd, &stop))
            .map_err(|e| e.to_string())?;
        threads.push(handle);
    }

    println!(
        "{:>4} {:<6} {:>9} {:>8} {:>9} {:>10} {:>9}",
        "t(s)", "disk", "IOPS", "MiB/s", "p50<=us", "thrott ms", "errors"
    );
    let mut last: Vec<CountersSnapshot> = disks.iter().map(|d| d.counters.snapshot()).collect();
    for t in 1..=args.seconds {
        std::thread::sleep(Duration::from_secs(1));
        for (d, prev) in disks.iter().zip(last.iter_mut()) {
            let now = d.counters.snapshot();
            let ops = now.read.ops + now.write.ops - prev.read.ops - prev.write.ops;
            let bytes = now.read.bytes + now.write.bytes - prev.read.bytes - prev.write.bytes;
            let mut window = now.clone();
            for (w, p) in window.latency_log2_ns.iter_mut().zip(&prev.latency_log2_ns) {
                *w -= p;
            }
            println!(
                "{t:>4} {:<6} {:>9} {:>8.1} {:>9} {:>10} {:>9}",
                d.id,
                ops,
                bytes as f64 / f64::from(1 << 20),
                window.latency_percentile_ns(50.0).map_or(0, |ns| ns / 1000),
                (now.throttled_ns - prev.throttled_ns) / 1_000_000,
                now.errors() + d.verify_errors.load(Ordering::Relaxed),
            );
            *prev = now;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().map_err(|_| "an iothread panicked".to_string())??;
    }
    let mut ok = true;
    println!("\nfinal counters:");
    for d in &disks {
        let s = d.counters.snapshot();
        let verify = d.verify_errors.load(Ordering::Relaxed);
        println!(
            "{}: {}",
            d.id,
            serde_json::json!({"read": s.read, "write": s.write, "in_flight": s.in_flight,
                "throttled_ms": s.throttled_ns / 1_000_000, "verify_errors": verify,
                "iops": (s.read.ops + s.write.ops) as f64 / args.seconds as f64})
        );
        ok &= s.errors() == 0 && verify == 0 && s.in_flight == 0;
    }
    println!(
        "{}",
        if ok {
            "all data verified"
        } else {
            "ERRORS: see above"
        }
    );
    Ok(ok)
}

/// A 4 KiB block's expected content at a version (version 0: never written, zeroes).
fn pattern(block: u64, version: u32, out: &mut [u8]) {
    for (i, word) in out.chunks_exact_mut(8).enumerate() {
        let v = if version == 0 {
            0
        } else {
            block.rotate_left(17) ^ (u64::from(version) << 40) ^ i as u64
        };
        word.copy_from_slice(&v.to_le_bytes());
    }
}

/// One request slot: its buffer and what it is doing.
struct Slot {
    buf: AlignedBuf,
    block: u64,
    write: bool,
}

/// The I/O thread of one disk: keeps `qd` verified random 4 KiB requests going.
fn iothread(disk: Disk, d: &DemoDisk, qd: usize, stop: &AtomicBool) -> Result<(), String> {
    let blocks = disk.capacity() / 4096;
    let options = EngineOptions {
        kind: d.aio,
        queue_depth: qd as u32,
        ..Default::default()
    };
    let mut queue =
        DiskQueue::new(Arc::new(disk), &options, d.counters.clone()).map_err(|e| e.to_string())?;
    let wake = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| e.to_string())?);
    let mut throttle = if d.limits.is_enabled() {
        let group = ThrottleGroup::new(d.id, d.limits.clone()).map_err(|e| e.to_string())?;
        let waker_fd = wake.clone();
        Throttle::new(
            Some(group.join(Arc::new(move || drop(waker_fd.write(1))))),
            None,
        )
    } else {
        Throttle::default()
    };
    let mut pen: ThrottledQueue<usize> = ThrottledQueue::with_capacity(qd);
    let mut timer = ThrottleTimer::new().map_err(|e| e.to_string())?;
    let epoll = Epoll::new().map_err(|e| e.to_string())?;
    for fd in [queue.completion_fd(), timer.as_raw_fd(), wake.as_raw_fd()] {
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, fd as u64),
            )
            .map_err(|e| e.to_string())?;
    }
    let mut versions = vec![0u32; blocks as usize];
    let mut busy = vec![false; blocks as usize];
    let mut slots: Vec<Slot> = (0..qd)
        .map(|_| {
            AlignedBuf::new(4096, 4096).map(|buf| Slot {
                buf,
                block: 0,
                write: false,
            })
        })
        .collect::<Option<_>>()
        .ok_or("out of memory")?;
    let mut rng = 0x2545_f491_4f6c_dd1du64 ^ d.id.len() as u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut prepare = |i: usize,
                       slots: &mut [Slot],
                       pen: &mut ThrottledQueue<usize>,
                       busy: &mut [bool],
                       versions: &[u32]| {
        let mut block = next() % blocks;
        while busy[block as usize] {
            block = next() % blocks;
        }
        busy[block as usize] = true;
        let write = next() % 10 < 3;
        let slot = &mut slots[i];
        slot.block = block;
        slot.write = write;
        if write {
            // SAFETY: the buffer is ours and not in flight.
            let bytes =
                unsafe { std::slice::from_raw_parts_mut(slot.buf.iovec().iov_base.cast(), 4096) };
            pattern(block, versions[block as usize] + 1, bytes);
        }
        pen.push(
            i,
            if write {
                Direction::Write
            } else {
                Direction::Read
            },
            4096,
        );
    };
    for i in 0..qd {
        prepare(i, &mut slots, &mut pen, &mut busy, &versions);
    }
    let mut events = vec![EpollEvent::default(); 4];
    let mut expected = vec![0u8; 4096];
    let mut finished = Vec::with_capacity(qd);
    loop {
        // Start whatever the throttle lets through, then sleep until something happens.
        while let Some(i) = pen.pop_admitted(&mut throttle, Instant::now()) {
            let slot = &mut slots[i];
            let iov = [slot.buf.iovec()];
            // SAFETY: the slot's buffer stays allocated and untouched until reaped.
            unsafe {
                if slot.write {
                    queue.write(i as u64, slot.block * 4096, &iov, false);
                } else {
                    queue.read(i as u64, slot.block * 4096, &iov);
                }
            }
        }
        d.counters.add_throttled_ns(pen.take_throttled_ns());
        queue.submit().map_err(|e| e.to_string())?;
        match pen.next_wake() {
            Some(at) if !pen.is_empty() => timer.arm_at(at).map_err(|e| e.to_string())?,
            _ => timer.disarm().map_err(|e| e.to_string())?,
        }
        if stop.load(Ordering::Relaxed) {
            break;
        }
        // io_uring task work interrupts waits with EINTR; that is not an error.
        if let Err(e) = epoll.wait(100, &mut events)
            && e.kind() != std::io::ErrorKind::Interrupted
        {
            return Err(format!("epoll: {e}"));
        }
        let _ = timer.clear();
        let _ = wake.read();
        finished.clear();
        queue
            .reap(|c| finished.push(c))
            .map_err(|e| e.to_string())?;
        for c in &finished {
            let i = c.token as usize;
            let slot = &mut slots[i];
            let block = slot.block as usize;
            if c.result.is_ok() {
                if slot.write {
                    versions[block] += 1;
                } else {
                    pattern(slot.block, versions[block], &mut expected);
                    // SAFETY: the read completed into this buffer.
                    let got = unsafe {
                        std::slice::from_raw_parts(slot.buf.iovec().iov_base as *const u8, 4096)
                    };
                    if got != expected.as_slice() {
                        d.verify_errors.fetch_add(1, Ordering::Relaxed);
                        eprintln!(
                            "{}: block {block} does not hold version {}",
                            d.id, versions[block]
                        );
                    }
                }
            }
            busy[block] = false;
            prepare(i, &mut slots, &mut pen, &mut busy, &versions);
        }
    }
    // Shutdown: requests not yet started are dropped; everything in flight completes.
    pen.drain().for_each(drop);
    throttle.withdraw();
    queue
        .drain(Duration::from_secs(10), |_| {})
        .map_err(|e| e.to_string())
}
