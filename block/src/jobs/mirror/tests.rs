//! A mirror job against real files while a guest queue writes to the source.

use std::io::Write;
use std::sync::Arc;

use rand::{Rng, SeedableRng, rngs::StdRng};

use super::*;
use crate::cache::CacheMode;
use crate::disk::{Disk, DiskOptions};
use crate::engine::AioKind;
use crate::jobs::dirty::DirtyBitmap;
use crate::jobs::state::{CopyMode, SyncMode};
use crate::jobs::status::JobInfo;

const SIZE: usize = 4 << 20;
const BLOCK: usize = 4096;

struct Setup {
    _dir: tempfile::TempDir,
    source_path: std::path::PathBuf,
    target_path: std::path::PathBuf,
    /// What the source holds (every completed guest write applied).
    model: Vec<u8>,
    guest: DiskQueue,
    job: MirrorJob,
    rng: StdRng,
}

fn engine(kind: AioKind) -> EngineOptions {
    EngineOptions {
        kind,
        queue_depth: 64,
        max_batch: 16,
        ..EngineOptions::default()
    }
}

fn setup(mode: CopyMode, speed: u64, kind: AioKind) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let source_path = dir.path().join("source.raw");
    let target_path = dir.path().join("target.raw");
    let mut rng = StdRng::seed_from_u64(7);
    let mut model = vec![0u8; SIZE];
    rng.fill(&mut model[..]);
    std::fs::File::create(&source_path)
        .unwrap()
        .write_all(&model)
        .unwrap();
    let t = std::fs::File::create(&target_path).unwrap();
    t.set_len(SIZE as u64).unwrap();
    let open = |p: &std::path::Path| {
        Arc::new(
            Disk::open(&DiskOptions {
                cache: CacheMode::Writeback,
                ..DiskOptions::new(p)
            })
            .unwrap(),
        )
    };
    let source = open(&source_path);
    let target = open(&target_path);
    let options = MirrorOptions {
        granularity: 64 << 10,
        buffer_size: 256 << 10,
        speed,
        sync: SyncMode::Full,
        copy_mode: mode,
    };
    let bitmap = Arc::new(DirtyBitmap::new(SIZE as u64, options.granularity).unwrap());
    let link = Arc::new(MirrorLink::new(
        bitmap,
        target,
        mode == CopyMode::WriteBlocking,
    ));
    let mut guest = DiskQueue::new(source.clone(), &engine(kind), Arc::default()).unwrap();
    guest.attach_mirror(Some(link.clone()), None).unwrap();
    let status = JobStatus::new(JobInfo {
        id: "m0".into(),
        kind: "mirror".into(),
        disk: "d0".into(),
        target: target_path.display().to_string(),
        state: JobState::Created,
        bytes_done: 0,
        bytes_total: 0,
        dirty_bytes: 0,
        rate: 0,
        speed,
        sync: options.sync,
        copy_mode: mode,
        error: None,
    });
    let mut job = MirrorJob::new(source, link, options, &engine(kind), status).unwrap();
    job.start().unwrap();
    Setup {
        _dir: dir,
        source_path,
        target_path,
        model,
        guest,
        job,
        rng,
    }
}

impl Setup {
    /// Queues `n` random 4 KiB writes (distinct blocks) and runs the job while they are
    /// in flight; returns once they completed.
    fn guest_writes(&mut self, n: usize) {
        let mut bufs: Vec<Vec<u8>> = Vec::new();
        let mut blocks = Vec::new();
        while blocks.len() < n {
            let b = self.rng.random_range(0..SIZE / BLOCK);
            if !blocks.contains(&b) {
                blocks.push(b);
            }
        }
        for &b in &blocks {
            let mut data = vec![0u8; BLOCK];
            self.rng.fill(&mut data[..]);
            self.model[b * BLOCK..(b + 1) * BLOCK].copy_from_slice(&data);
            bufs.push(data);
        }
        for (token, (&b, data)) in blocks.iter().zip(&bufs).enumerate() {
            let iov = [libc::iovec {
                iov_base: data.as_ptr() as *mut libc::c_void,
                iov_len: BLOCK,
            }];
            // SAFETY: `bufs` outlives the drain below.
            unsafe {
                self.guest
                    .write(token as u64, (b * BLOCK) as u64, &iov, false)
            };
        }
        self.guest.submit().unwrap();
        let mut left = n;
        while left > 0 {
            self.job.run();
            self.guest
                .reap(|c| {
                    assert!(c.result.is_ok(), "{c:?}");
                    left -= 1;
                })
                .unwrap();
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Runs the job (and more guest writes) until it is ready.
    fn until_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.job.state() != JobState::Ready {
            assert!(Instant::now() < deadline, "{:?}", self.job.status().info());
            self.guest_writes(4);
            // The guest pauses a little: the copier catches up.
            for _ in 0..20 {
                if self.job.run() == 0 && self.job.in_flight() == 0 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    fn file(&self, p: &std::path::Path) -> Vec<u8> {
        std::fs::read(p).unwrap()
    }
}

fn converges_and_syncs(mode: CopyMode, kind: AioKind) {
    let mut s = setup(mode, 0, kind);
    s.until_ready();
    s.guest_writes(32);
    s.job.sync_target().unwrap();
    assert_eq!(
        s.file(&s.source_path),
        s.model,
        "the source holds every write"
    );
    assert!(
        s.file(&s.target_path) == s.model,
        "the target equals the source after the sync"
    );
    s.job.stop(JobState::Completed).unwrap();
    let info = s.job.status().info();
    assert_eq!(info.state, JobState::Completed);
    assert!(info.bytes_done >= SIZE as u64, "{info:?}");
    assert_eq!(info.dirty_bytes, 0);
}

#[test]
fn background_mirror_converges_with_threads() {
    converges_and_syncs(CopyMode::Background, AioKind::Threads);
}

#[test]
fn write_blocking_mirror_converges_with_threads() {
    converges_and_syncs(CopyMode::WriteBlocking, AioKind::Threads);
}

#[test]
fn write_blocking_mirror_converges_with_io_uring() {
    converges_and_syncs(CopyMode::WriteBlocking, AioKind::IoUring);
}

#[test]
fn write_blocking_writes_reach_the_target_before_they_complete() {
    let mut s = setup(CopyMode::WriteBlocking, 0, AioKind::Threads);
    s.until_ready();
    // Let the copier settle, then write: nothing becomes dirty, and the target has the
    // writes without another copy.
    while s.job.in_flight() > 0 || s.job.status().info().dirty_bytes > 0 {
        s.job.run();
        std::thread::sleep(Duration::from_millis(1));
    }
    let done = s.job.status().info().bytes_done;
    s.guest_writes(16);
    assert_eq!(s.job.status().info().dirty_bytes, 0);
    assert_eq!(
        s.job.status().info().bytes_done,
        done,
        "no chunk was copied again"
    );
    assert!(s.file(&s.target_path) == s.model);
}

#[test]
fn background_mode_leaves_guest_writes_dirty_for_the_copier() {
    // A speed limit so low that the copier cannot keep up: dirty bytes stay.
    let mut s = setup(CopyMode::Background, 64 << 10, AioKind::Threads);
    s.guest_writes(16);
    assert!(s.job.status().info().dirty_bytes > 0);
    assert_eq!(s.job.state(), JobState::Running);
}

#[test]
fn a_failing_target_fails_the_job_and_not_the_guest() {
    let mut s = setup(CopyMode::WriteBlocking, 0, AioKind::Threads);
    s.job
        .link()
        .fail("mirror target: write: Input/output error".into());
    s.guest_writes(8);
    s.job.run();
    let info = s.job.status().info();
    assert_eq!(info.state, JobState::Failed);
    assert!(info.error.unwrap().contains("Input/output error"));
    assert_eq!(
        s.file(&s.source_path),
        s.model,
        "the guest's writes went on"
    );
}

#[test]
fn cancel_before_ready_stops_copying() {
    let mut s = setup(CopyMode::Background, 0, AioKind::Threads);
    s.job.run();
    s.job.stop(JobState::Cancelled).unwrap();
    assert_eq!(s.job.in_flight(), 0);
    let done = s.job.status().info().bytes_done;
    s.job.run();
    assert_eq!(s.job.status().info().bytes_done, done);
    assert_eq!(s.job.state(), JobState::Cancelled);
}

/// Runs the job until nothing is in flight or dirty.
fn settle(s: &mut Setup) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.job.in_flight() > 0 || s.job.status().info().dirty_bytes > 0 {
        assert!(Instant::now() < deadline, "{:?}", s.job.status().info());
        s.job.run();
        std::thread::sleep(Duration::from_micros(300));
    }
}

#[test]
fn a_job_yielding_to_a_busy_guest_catches_up_with_its_writes() {
    let mut s = setup(CopyMode::Background, 0, AioKind::Threads);
    s.until_ready();
    let guest = Arc::new(crate::counters::DiskCounters::default());
    s.job.yield_to(guest.clone());
    settle(&mut s);
    let bitmap = s.job.link().bitmap().clone();
    let dirty = |chunks: std::ops::Range<u64>| {
        for c in chunks {
            bitmap.mark(c * (64 << 10), 1);
        }
    };
    // Chunks dirtied before the guest got busy earn nothing: a busy guest gets the job
    // at a trickle, one chunk per run.
    dirty(0..6);
    guest.record_start();
    s.job.run();
    assert_eq!(s.job.in_flight(), 1, "one chunk while the guest is busy");
    settle(&mut s);
    // Chunks the busy guest's writes turn dirty earn starts past the gap: the job
    // copies them at once.
    guest.record_start();
    s.job.run();
    std::thread::sleep(Duration::from_millis(5));
    dirty(10..13);
    guest.record_start();
    s.job.run();
    // (The setup's buffer holds 4 chunks.)
    assert_eq!(s.job.in_flight(), 3, "the job catches up with the guest");
    settle(&mut s);
    assert!(s.file(&s.target_path) == s.model);
}
