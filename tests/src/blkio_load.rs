//! A load generator over the `blkio` crate (libblkio's virtio-blk-vhost-user driver): the
//! one client every vhost-user-blk contender is measured with.

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::{Duration, Instant};

use blkio::{Blkio, Completion, ReqFlags};

use crate::latency::{Figures, Latencies};

/// One workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Random (true) or sequential offsets.
    pub random: bool,
    /// Writes (true) or reads.
    pub write: bool,
    /// Request size in bytes (a multiple of 512).
    pub block_size: usize,
    /// Requests in flight per queue.
    pub iodepth: usize,
    /// Queues, each driven by its own thread.
    pub queues: usize,
}

impl Workload {
    /// A short label like `4k randread QD32 x1`.
    pub fn label(&self) -> String {
        let kind = match (self.random, self.write) {
            (true, false) => "randread",
            (true, true) => "randwrite",
            (false, false) => "read",
            (false, true) => "write",
        };
        format!(
            "{}k {kind} QD{} x{}",
            self.block_size / 1024,
            self.iodepth,
            self.queues
        )
    }
}

/// Connects to the vhost-user-blk socket at `socket` and runs `workload` for `runtime`
/// after `warmup`, returning IOPS and completion latency.
pub fn run(
    socket: &Path,
    workload: Workload,
    warmup: Duration,
    runtime: Duration,
) -> Result<Figures, String> {
    fn err(what: &'static str) -> impl Fn(blkio::Error) -> String {
        move |e| format!("blkio {what}: {e}")
    }
    let mut b = Blkio::new("virtio-blk-vhost-user").map_err(err("new"))?;
    b.set_str("path", &socket.to_string_lossy())
        .map_err(err("path"))?;
    b.connect().map_err(err("connect"))?;
    let max_queues = b.get_i32("max-queues").map_err(err("max-queues"))? as usize;
    if workload.queues > max_queues {
        return Err(format!(
            "the backend offers {max_queues} queues, {} asked",
            workload.queues
        ));
    }
    b.set_i32("num-queues", workload.queues as i32)
        .map_err(err("num-queues"))?;
    // Each request takes 3 descriptors (no indirect descriptors in libblkio).
    let queue_size = (workload.iodepth * 3).next_power_of_two().clamp(64, 1024);
    b.set_i32("queue-size", queue_size as i32)
        .map_err(err("queue-size"))?;
    let capacity = b.get_u64("capacity").map_err(err("capacity"))?;
    let started = b.start().map_err(err("start"))?;
    let per_queue = workload.iodepth * workload.block_size;
    let region = b
        .alloc_mem_region(per_queue * workload.queues)
        .map_err(err("alloc_mem_region"))?;
    b.map_mem_region(&region).map_err(err("map_mem_region"))?;
    let base = region.addr;
    let blocks = capacity / workload.block_size as u64;
    if blocks < workload.iodepth as u64 {
        return Err("disk too small for the workload".into());
    }
    let t_start = Instant::now() + warmup;
    let t_end = t_start + runtime;
    let handles: Vec<_> = started
        .queues
        .into_iter()
        .enumerate()
        .map(|(t, mut q)| {
            std::thread::spawn(move || -> Result<(u64, Latencies), String> {
                let bs = workload.block_size;
                let bufs = base + t * per_queue;
                let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ ((t as u64 + 1) << 32);
                let mut seq = (t as u64 * blocks / workload.queues.max(1) as u64) % blocks;
                let mut next_offset = || {
                    let block = if workload.random {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        rng % blocks
                    } else {
                        seq = (seq + 1) % blocks;
                        seq
                    };
                    block * bs as u64
                };
                let mut issued = vec![Instant::now(); workload.iodepth];
                let mut comps: Vec<MaybeUninit<Completion>> = (0..workload.iodepth)
                    .map(|_| MaybeUninit::uninit())
                    .collect();
                let mut lat = Latencies::with_capacity(1 << 20);
                let mut done = 0u64;
                let issue = |q: &mut blkio::Blkioq, slot: usize, offset: u64| {
                    let buf = bufs + slot * bs;
                    if workload.write {
                        q.write(offset, buf as *const u8, bs, slot, ReqFlags::empty());
                    } else {
                        q.read(offset, buf as *mut u8, bs, slot, ReqFlags::empty());
                    }
                };
                for (slot, at) in issued.iter_mut().enumerate() {
                    issue(&mut q, slot, next_offset());
                    *at = Instant::now();
                }
                let mut inflight = workload.iodepth;
                while inflight > 0 {
                    let mut timeout = Duration::from_secs(10);
                    let n = q
                        .do_io(&mut comps, 1, Some(&mut timeout), None)
                        .map_err(|e| format!("do_io: {e}"))?;
                    let now = Instant::now();
                    inflight -= n;
                    for c in &comps[..n] {
                        // SAFETY: do_io initialised the first n completions.
                        let c = unsafe { c.assume_init_read() };
                        if c.ret != 0 {
                            return Err(format!("I/O error {}", c.ret));
                        }
                        let slot = c.user_data;
                        if now >= t_start && now < t_end {
                            done += 1;
                            lat.push(now.duration_since(issued[slot]).as_nanos() as u64);
                        }
                        if now < t_end {
                            issue(&mut q, slot, next_offset());
                            issued[slot] = Instant::now();
                            inflight += 1;
                        }
                    }
                }
                Ok((done, lat))
            })
        })
        .collect();
    let mut total = 0;
    let mut all = Latencies::default();
    for h in handles {
        let (done, lat) = h
            .join()
            .map_err(|_| "a load thread panicked".to_string())??;
        total += done;
        all.extend(lat);
    }
    b.unmap_mem_region(&region);
    b.free_mem_region(&region);
    Ok(Figures {
        iops: total as f64 / runtime.as_secs_f64(),
        p50_us: all.percentile_us(50.0),
        p99_us: all.percentile_us(99.0),
    })
}
