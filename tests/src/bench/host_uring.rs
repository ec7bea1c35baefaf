//! The "limit" column: the same load loop as the vhost-user clients, but straight on the
//! file with the host's io_uring and O_DIRECT, one ring per queue thread. No server sits
//! in between, so this is what the storage itself gives.

// Benchmark setup: queue depths, block sizes and offsets inside the test image.
#![allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap)]

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use block::bounce::AlignedBuf;
use io_uring::{IoUring, opcode, types};

use super::engine::{LoadResult, QueueIo, run_queues};
use super::workload::Workload;

/// Byte written into every write buffer (as the libblkio client does).
const FILL: u8 = 0xa5;

/// One ring with `iodepth` aligned buffers.
struct UringQueue {
    ring: IoUring,
    fd: i32,
    bufs: AlignedBuf,
    workload: Workload,
    /// Requests queued or sent and not yet completed.
    inflight: usize,
}

impl QueueIo for UringQueue {
    fn queue(&mut self, slot: usize, offset: u64) -> Result<(), String> {
        let bs = self.workload.block_size;
        if (slot + 1) * bs > self.bufs.len() {
            return Err(format!("no buffer for request {slot}"));
        }
        // SAFETY: the slot's buffer lies inside `bufs` (checked above).
        let buf = unsafe { self.bufs.as_mut_ptr().add(slot * bs) };
        let fd = types::Fd(self.fd);
        let sqe = if self.workload.write {
            opcode::Write::new(fd, buf, bs as u32)
                .offset(offset)
                .build()
        } else {
            opcode::Read::new(fd, buf, bs as u32).offset(offset).build()
        }
        .user_data(slot as u64);
        // SAFETY: the buffer and the file outlive the request: both belong to this queue,
        // which drains every request before it is dropped.
        unsafe { self.ring.submission().push(&sqe) }
            .map_err(|_| "submission queue full".to_string())?;
        self.inflight += 1;
        Ok(())
    }

    fn complete(&mut self, done: &mut Vec<usize>) -> Result<(), String> {
        self.ring
            .submit_and_wait(1)
            .map_err(|e| format!("io_uring_enter: {e}"))?;
        for cqe in self.ring.completion() {
            self.inflight -= 1;
            let want = self.workload.block_size as i32;
            if cqe.result() != want {
                return Err(match cqe.result() {
                    r if r < 0 => format!("I/O error: {}", std::io::Error::from_raw_os_error(-r)),
                    r => format!("short I/O: {r} of {want} bytes"),
                });
            }
            done.push(cqe.user_data() as usize);
        }
        Ok(())
    }
}

impl Drop for UringQueue {
    /// Waits for what is still in flight (after an error), so that the kernel never
    /// writes into buffers that are gone.
    fn drop(&mut self) {
        while self.inflight > 0 && self.ring.submit_and_wait(1).is_ok() {
            let n = self.ring.completion().count();
            self.inflight = self.inflight.saturating_sub(n);
        }
    }
}

/// Opens `path` for reading and writing with O_DIRECT.
pub fn open_direct(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// Runs `workload` on `path` for `runtime` after `warmup`.
pub fn run(
    path: &Path,
    workload: Workload,
    warmup: Duration,
    runtime: Duration,
) -> Result<LoadResult, String> {
    let file = open_direct(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let len = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    let entries = (workload.iodepth as u32).next_power_of_two().max(8);
    let mut queues = Vec::with_capacity(workload.queues);
    for _ in 0..workload.queues {
        let ring = IoUring::new(entries).map_err(|e| format!("io_uring_setup: {e}"))?;
        let mut bufs = AlignedBuf::new(workload.iodepth * workload.block_size, 4096)
            .ok_or("out of memory for buffers")?;
        bufs.as_mut_slice().fill(FILL);
        queues.push(UringQueue {
            ring,
            fd: file.as_raw_fd(),
            bufs,
            workload,
            inflight: 0,
        });
    }
    let blocks = len / workload.block_size as u64;
    run_queues(queues, &workload, blocks, warmup, runtime, &mut || None)
}
