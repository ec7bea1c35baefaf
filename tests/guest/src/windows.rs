//! Rate windows: random 4 KiB reads on one disk at full queue depth, without a pause, with
//! the rate of each consecutive window printed as soon as it ends, so a host can change
//! the disk's throttle while this runs and read back the rate the guest saw.
//!
//! Command line: `windows=N` (how many windows; 0 or absent: none), `window_ms=M`
//! (each window's length, 500). Output per window: `disk<i>.window=<k> iops=<x>`, then
//! `disk<i>.windows=<errors>` once done (`fail` on a stall).

use crate::io::rdtsc;
use crate::say;
use crate::virtio::Disk;

/// What to run.
#[derive(Clone, Copy)]
pub struct Windows {
    /// How many windows.
    pub count: u64,
    /// Length of each, in TSC ticks.
    pub ticks: u64,
    /// TSC ticks per second.
    pub tsc_hz: u64,
    /// Give up after this many ticks without a completion.
    pub timeout: u64,
    /// Sectors the random reads fall in.
    pub span: u64,
}

/// Runs the windows on `d` (disk number `i`); returns whether every request succeeded
/// and none stalled.
pub fn run(d: &mut Disk, i: usize, w: &Windows, rng: &mut u64) -> bool {
    let Windows {
        count: n,
        ticks,
        tsc_hz,
        timeout,
        span,
    } = *w;
    let span_blocks = (span / 8).max(1);
    let mut rand = move || {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        (*rng % span_blocks) * 8
    };
    d.set_interrupts(false);
    let nq = d.nq;
    let (mut done, mut errors) = (0u64, 0u64);
    let fill = |d: &mut Disk, rand: &mut dyn FnMut() -> u64| {
        for q in d.queues[..nq].iter_mut() {
            let mut any = false;
            while let Some(s) = q.take() {
                q.submit(s, false, rand());
                any = true;
            }
            if any {
                q.kick();
            }
        }
    };
    fill(d, &mut rand);
    let mut start = rdtsc();
    let mut last_progress = start;
    let mut done_at_start = 0;
    let mut k = 0;
    while k < n {
        let mut reaped = 0;
        for q in d.queues[..nq].iter_mut() {
            reaped += q.reap(&mut |_, _, _, st| errors += (st != 0) as u64);
        }
        let now = rdtsc();
        if reaped > 0 {
            done += reaped as u64;
            last_progress = now;
            fill(d, &mut rand);
        } else if now - last_progress > timeout {
            say!("disk{i}.windows=fail");
            return false;
        }
        if now - start >= ticks {
            // The next window starts now: printing takes time, I/O goes on meanwhile.
            let iops = (done - done_at_start) * tsc_hz / (now - start);
            say!("disk{i}.window={k} iops={iops}");
            k += 1;
            start = now;
            done_at_start = done;
        }
    }
    // Let the requests still in flight finish (they are not counted).
    let t0 = rdtsc();
    while d.queues[..nq].iter().any(|q| q.in_flight() > 0) {
        for q in d.queues[..nq].iter_mut() {
            q.reap(&mut |_, _, _, st| errors += (st != 0) as u64);
        }
        if rdtsc() - t0 > timeout {
            say!("disk{i}.windows=fail");
            return false;
        }
    }
    say!("disk{i}.windows={errors}");
    errors == 0
}
