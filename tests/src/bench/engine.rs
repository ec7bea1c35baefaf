//! The load loop every client shares (libblkio and host io_uring alike): one thread per
//! queue, `iodepth` requests always in flight, offsets from one generator, and
//! completions counted and timed only inside a window that opens after a warm-up.

// Benchmark figures: durations and I/O counts far below 2^53.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]

use std::time::{Duration, Instant};

use super::workload::Workload;
use crate::latency::{Figures, Latencies};

/// One queue of some I/O interface, as the load loop drives it.
pub trait QueueIo: Send {
    /// Queues request `slot` (which also picks its buffer) at byte `offset`; it may be
    /// sent only at the next [`QueueIo::complete`].
    fn queue(&mut self, slot: usize, offset: u64) -> Result<(), String>;
    /// Sends what was queued and waits for at least one completion, appending the slot
    /// of each completed request to `done`. A failed request is an error.
    fn complete(&mut self, done: &mut Vec<usize>) -> Result<(), String>;
}

/// The offsets one queue visits: xorshift-random blocks, or a sequential stream that
/// starts at this queue's share of the disk.
#[derive(Clone, Debug)]
pub struct Offsets {
    random: bool,
    rng: u64,
    seq: u64,
    blocks: u64,
    block_size: u64,
}

impl Offsets {
    /// The generator of queue `queue` over a disk of `blocks` blocks of the workload's size.
    pub fn new(workload: &Workload, blocks: u64, queue: usize) -> Offsets {
        let blocks = blocks.max(1);
        Offsets {
            random: workload.random,
            rng: 0x9E37_79B9_7F4A_7C15u64 ^ ((queue as u64 + 1) << 32),
            seq: (queue as u64 * blocks / workload.queues.max(1) as u64) % blocks,
            blocks,
            block_size: workload.block_size as u64,
        }
    }

    /// The next byte offset (a multiple of the block size, inside the disk).
    pub fn next_offset(&mut self) -> u64 {
        let block = if self.random {
            self.rng ^= self.rng << 13;
            self.rng ^= self.rng >> 7;
            self.rng ^= self.rng << 17;
            self.rng % self.blocks
        } else {
            let b = self.seq;
            self.seq = (self.seq + 1) % self.blocks;
            b
        };
        block * self.block_size
    }
}

/// The measured part of a run.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    /// When counting starts (after the warm-up).
    pub start: Instant,
    /// When counting stops and no more requests are issued.
    pub end: Instant,
}

/// What one run measured.
#[derive(Clone, Copy, Debug)]
pub struct LoadResult {
    /// IOPS and completion latency percentiles.
    pub figures: Figures,
    /// Requests completed inside the window.
    pub ios: u64,
    /// Length of the window in seconds.
    pub seconds: f64,
    /// CPU time the probed process used inside the window (None when not probed).
    pub cpu: Option<Duration>,
}

/// Drives one queue: keeps `iodepth` requests in flight until the window ends, then
/// drains. Returns the completions inside the window and their latencies (ns).
pub fn drive_queue(
    io: &mut dyn QueueIo,
    workload: &Workload,
    blocks: u64,
    queue: usize,
    window: Window,
) -> Result<(u64, Latencies), String> {
    if blocks < workload.iodepth as u64 {
        return Err("disk too small for the workload".into());
    }
    let mut offsets = Offsets::new(workload, blocks, queue);
    let mut issued = vec![Instant::now(); workload.iodepth];
    let mut lat = Latencies::with_capacity(1 << 18);
    let mut completed = Vec::with_capacity(workload.iodepth);
    let mut ios = 0u64;
    for (slot, at) in issued.iter_mut().enumerate() {
        *at = Instant::now();
        io.queue(slot, offsets.next_offset())?;
    }
    let mut inflight = workload.iodepth;
    while inflight > 0 {
        completed.clear();
        io.complete(&mut completed)?;
        let now = Instant::now();
        for &slot in &completed {
            let Some(at) = issued.get_mut(slot) else {
                return Err(format!("completion for unknown request {slot}"));
            };
            inflight -= 1;
            if now >= window.start && now < window.end {
                ios += 1;
                lat.push(now.duration_since(*at).as_nanos() as u64);
            }
            if now < window.end {
                *at = Instant::now();
                io.queue(slot, offsets.next_offset())?;
                inflight += 1;
            }
        }
    }
    Ok((ios, lat))
}

/// Runs one thread per element of `queues` for `warmup + runtime`; the calling thread
/// calls `probe` (the server's CPU time so far) as the window opens and closes.
pub fn run_queues<Q: QueueIo>(
    queues: Vec<Q>,
    workload: &Workload,
    blocks: u64,
    warmup: Duration,
    runtime: Duration,
    probe: &mut dyn FnMut() -> Option<Duration>,
) -> Result<LoadResult, String> {
    let start = Instant::now() + warmup;
    let window = Window {
        start,
        end: start + runtime,
    };
    let (results, cpu) = std::thread::scope(|s| {
        let handles: Vec<_> = queues
            .into_iter()
            .enumerate()
            .map(|(i, mut q)| s.spawn(move || drive_queue(&mut q, workload, blocks, i, window)))
            .collect();
        let wait_until = |t: Instant| {
            while Instant::now() < t && !handles.iter().any(|h| h.is_finished()) {
                std::thread::sleep(
                    t.saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(20)),
                );
            }
        };
        wait_until(window.start);
        let cpu0 = probe();
        wait_until(window.end);
        let cpu1 = probe();
        let results: Vec<_> = handles.into_iter().map(|h| h.join()).collect();
        let cpu = match (cpu0, cpu1) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        (results, cpu)
    });
    let mut ios = 0;
    let mut all = Latencies::default();
    for r in results {
        let (n, lat) = r.map_err(|_| "a load thread panicked".to_string())??;
        ios += n;
        all.extend(lat);
    }
    let seconds = runtime.as_secs_f64();
    Ok(LoadResult {
        figures: Figures {
            iops: ios as f64 / seconds,
            p50_us: all.percentile_us(50.0),
            p99_us: all.percentile_us(99.0),
        },
        ios,
        seconds,
        cpu,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Workload = Workload {
        random: false,
        write: false,
        block_size: 4096,
        iodepth: 2,
        queues: 2,
    };

    #[test]
    fn sequential_offsets_wrap_and_split_by_queue() {
        let mut q0 = Offsets::new(&W, 4, 0);
        let got: Vec<_> = (0..5).map(|_| q0.next_offset()).collect();
        assert_eq!(got, [0, 4096, 8192, 12288, 0]);
        let mut q1 = Offsets::new(&W, 4, 1);
        assert_eq!(q1.next_offset(), 8192);
    }

    #[test]
    fn random_offsets_stay_inside_and_aligned() {
        let w = Workload { random: true, ..W };
        let mut o = Offsets::new(&w, 1000, 0);
        for _ in 0..10_000 {
            let off = o.next_offset();
            assert!(off < 1000 * 4096 && off.is_multiple_of(4096));
        }
    }

    /// A queue that completes every request at the next `complete`.
    struct Instant0(Vec<usize>);

    impl QueueIo for Instant0 {
        fn queue(&mut self, slot: usize, _offset: u64) -> Result<(), String> {
            self.0.push(slot);
            Ok(())
        }
        fn complete(&mut self, done: &mut Vec<usize>) -> Result<(), String> {
            std::thread::sleep(Duration::from_micros(100));
            done.append(&mut self.0);
            Ok(())
        }
    }

    #[test]
    fn counts_only_the_window_and_probes_twice() {
        let mut probes = 0;
        let r = run_queues(
            vec![Instant0(Vec::new()), Instant0(Vec::new())],
            &W,
            16,
            Duration::from_millis(20),
            Duration::from_millis(50),
            &mut || {
                probes += 1;
                Some(Duration::from_millis(probes * 10))
            },
        )
        .unwrap();
        assert_eq!(probes, 2);
        assert_eq!(r.cpu, Some(Duration::from_millis(10)));
        assert!(r.ios > 0);
        assert!(r.figures.p50_us <= r.figures.p99_us);
    }

    struct Failing;

    impl QueueIo for Failing {
        fn queue(&mut self, _slot: usize, _offset: u64) -> Result<(), String> {
            Ok(())
        }
        fn complete(&mut self, _done: &mut Vec<usize>) -> Result<(), String> {
            Err("I/O error -5".into())
        }
    }

    #[test]
    fn a_failing_queue_fails_the_run() {
        let e = run_queues(
            vec![Failing],
            &W,
            16,
            Duration::from_secs(5),
            Duration::from_secs(5),
            &mut || None,
        );
        assert_eq!(e.unwrap_err(), "I/O error -5");
    }
}
