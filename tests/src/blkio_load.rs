//! A load generator over the `blkio` crate (libblkio's virtio-blk-vhost-user driver): the
//! one client every vhost-user-blk contender is measured with. The loop itself is
//! [`crate::bench::engine`], shared with the host io_uring reference.

// Benchmark setup: queue depths and libblkio's int-sized counts.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, ReqFlags};

pub use crate::bench::engine::LoadResult;
use crate::bench::engine::{QueueIo, run_queues};
pub use crate::bench::pattern::Pattern;
pub use crate::bench::workload::Workload;

/// Byte written into every write buffer, so writes carry data and not zeroes.
const FILL: u8 = 0xa5;

/// One libblkio queue with `iodepth` buffers of the block size.
struct BlkioQueue {
    q: Blkioq,
    bufs: usize,
    workload: Workload,
    /// Room for `iodepth` completions (batch) or for one (resubmit).
    comps: Vec<MaybeUninit<Completion>>,
}

// SAFETY: `bufs` is the address of this queue's own share of a memory region that lives
// until every queue thread has been joined; Blkioq itself is Send.
unsafe impl Send for BlkioQueue {}

impl QueueIo for BlkioQueue {
    fn queue(&mut self, slot: usize, offset: u64) -> Result<(), String> {
        let bs = self.workload.block_size;
        let buf = self.bufs + slot * bs;
        if self.workload.write {
            self.q
                .write(offset, buf as *const u8, bs, slot, ReqFlags::empty());
        } else {
            self.q
                .read(offset, buf as *mut u8, bs, slot, ReqFlags::empty());
        }
        Ok(())
    }

    fn complete(&mut self, done: &mut Vec<usize>) -> Result<(), String> {
        let mut timeout = Duration::from_secs(10);
        let n = self
            .q
            .do_io(&mut self.comps, 1, Some(&mut timeout), None)
            .map_err(|e| format!("do_io: {e}"))?;
        for c in &self.comps[..n] {
            // SAFETY: do_io initialised the first n completions.
            let c = unsafe { c.assume_init_read() };
            if c.ret != 0 {
                return Err(format!("I/O error {}", c.ret));
            }
            done.push(c.user_data);
        }
        Ok(())
    }
}

/// Connects to the vhost-user-blk socket at `socket` and runs `workload` for `runtime`
/// after `warmup`, reaping completions as `pattern` says. `probe` (the server's CPU time) is called as the measured window
/// opens and closes.
pub fn run(
    socket: &Path,
    workload: Workload,
    pattern: Pattern,
    warmup: Duration,
    runtime: Duration,
    probe: &mut dyn FnMut() -> Option<Duration>,
) -> Result<LoadResult, String> {
    fn err(what: &'static str) -> impl Fn(blkio::Error) -> String {
        move |e| format!("blkio {what}: {e}")
    }
    // A server's socket file appears at bind(), a moment before listen(): a refused
    // connection right after it appeared is tried again.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    let mut b = loop {
        let mut b = Blkio::new("virtio-blk-vhost-user").map_err(err("new"))?;
        b.set_str("path", &socket.to_string_lossy())
            .map_err(err("path"))?;
        match b.connect() {
            Ok(()) => break b,
            Err(e)
                if e.errno().raw_os_error() == libc::ECONNREFUSED
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(format!("blkio connect: {e}")),
        }
    };
    let max_queues = b.get_i32("max-queues").map_err(err("max-queues"))?.max(0) as usize;
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
    // SAFETY: libblkio mapped `region.len` bytes at `region.addr` for us; nothing else
    // uses them until the queues start.
    unsafe { std::ptr::write_bytes(region.addr as *mut u8, FILL, region.len) };
    b.map_mem_region(&region).map_err(err("map_mem_region"))?;
    // Each do_io reaps at most as many completions as the slice holds: one for resubmit,
    // so that each replacement goes out at the very next do_io.
    let reap = match pattern {
        Pattern::Batch => workload.iodepth,
        Pattern::Resubmit => 1,
    };
    let queues = started
        .queues
        .into_iter()
        .enumerate()
        .map(|(i, q)| BlkioQueue {
            q,
            bufs: region.addr + i * per_queue,
            workload,
            comps: (0..reap).map(|_| MaybeUninit::uninit()).collect(),
        })
        .collect();
    let blocks = capacity / workload.block_size as u64;
    let result = run_queues(queues, &workload, blocks, warmup, runtime, probe);
    b.unmap_mem_region(&region);
    b.free_mem_region(&region);
    result
}
