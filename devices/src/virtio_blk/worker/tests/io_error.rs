//! The error policy in one queue: writes that run out of space on a small tmpfs are
//! held (`enospc`), the disk stops and takes no new request, and once the tmpfs has
//! grown a retry sends the held writes again, oldest first, before the ones that waited
//! behind them: the data ends as the guest wrote it, a later write to the same block
//! winning. `report` gives exactly the failed writes an error; a queue going away
//! fails what it holds.
//!
//! Needs root (it mounts a tmpfs); skips, saying so, otherwise.

use super::*;
use crate::config::WriteErrorPolicy;

/// A tmpfs mounted on a new temporary directory.
struct SmallFs {
    fs: ::tests::tmpfs::Tmpfs,
    _dir: tempfile::TempDir,
}

impl SmallFs {
    /// A tmpfs of `size`, or `None` (skipped) if not root.
    fn mount(test: &str, size: &str) -> Option<SmallFs> {
        let dir = tempfile::tempdir().unwrap();
        let fs = ::tests::tmpfs::Tmpfs::mount(test, &dir.path().join("fs"), size)?;
        Some(SmallFs { fs, _dir: dir })
    }

    fn resize(&self, size: &str) {
        self.fs.resize(size);
    }

    fn path(&self, name: &str) -> std::path::PathBuf {
        self.fs.path().join(name)
    }
}

const LEN: u32 = 32 * 1024;
/// Sectors per write.
const STRIDE: u64 = LEN as u64 / 512;
/// Writes published before the stop (the rig's ring has room for five chains).
const WRITES: u16 = 4;

/// Data of write `n` in guest memory: each chain's data at 0x8_0000 + n * LEN.
fn data_addr(n: u16) -> u64 {
    0x8_0000 + u64::from(n) * u64::from(LEN)
}

fn fill(r: &Rig, n: u16, byte: u8) {
    r.mem
        .memory()
        .write_slice(&vec![byte; LEN as usize], GuestAddress(data_addr(n)))
        .unwrap();
}

/// Status byte of chain `n` (0 OK, 1 IOERR; 0xff: not written yet).
fn status_of(r: &Rig, n: u16) -> u8 {
    r.mem
        .memory()
        .read_obj(GuestAddress(BUFS + u64::from(n) * 0x1000 + 0x400))
        .unwrap()
}

/// A rig on a 1 MiB sparse image in `fs`, with `policy` for writes.
fn rig(fs: &SmallFs, policy: WriteErrorPolicy) -> Rig {
    let path = fs.path("img");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let mut c = DiskConfig::new("d", &path);
    c.cache = block::CacheMode::Writeback;
    c.aio = block::AioKind::Threads;
    c.on_write_error = policy;
    let r = Rig::new(true, c);
    r.worker.shared().io_error.set_resumable(true);
    // Status bytes start as "not written".
    for n in 0..QSIZE {
        r.mem
            .memory()
            .write_obj(0xffu8, GuestAddress(BUFS + u64::from(n) * 0x1000 + 0x400))
            .unwrap();
    }
    r
}

/// Runs passes until `want` used entries or 5 s.
fn settle(r: &mut Rig, want: u16) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while r.used_idx() < want && Instant::now() < deadline {
        r.wait_completion_fd(50);
        r.worker.process_completions();
        r.worker.run_pass();
    }
}

/// Publishes [`WRITES`] writes, write `n` of byte `first + n` to block `n`, and runs a
/// pass.
fn publish_writes(r: &mut Rig, first: u8) {
    for n in 0..WRITES {
        fill(r, n, first + n as u8);
        r.publish(true, u64::from(n) * STRIDE, data_addr(n), LEN);
    }
    r.worker.run_pass();
}

/// Completes what finishes until the disk stopped with nothing left in the engine.
fn wait_stopped(r: &mut Rig) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !r.worker.shared().io_error.is_stopped() || r.worker.disk.in_flight() > 0 {
        assert!(Instant::now() < deadline, "the disk did not stop");
        r.wait_completion_fd(50);
        r.worker.process_completions();
    }
}

#[test]
fn writes_out_of_space_are_held_and_retried_in_order_once_the_storage_grew() {
    let test = "writes_out_of_space_are_held_and_retried_in_order_once_the_storage_grew";
    let Some(fs) = SmallFs::mount(test, "64k") else {
        return;
    };
    let mut r = rig(&fs, WriteErrorPolicy::Enospc);
    // Four 32 KiB writes (128 KiB) to blocks 0..4 of a 64 KiB filesystem.
    publish_writes(&mut r, 0x10);
    wait_stopped(&mut r);
    let done = r.used_idx();
    assert!(done < WRITES, "some writes must have run out of space");
    let held = r.worker.in_flight();
    assert_eq!(
        usize::from(done) + held,
        usize::from(WRITES),
        "each write completed or held"
    );
    let status = r.worker.shared().io_error.status().unwrap();
    assert_eq!(
        (status.op.as_str(), status.errno, status.count),
        ("write", libc::ENOSPC, held as u64)
    );
    // A later write to block 0, published while stopped: it waits in the ring.
    fill(&r, WRITES, 0xee);
    r.publish(true, 0, data_addr(WRITES), LEN);
    assert_eq!(
        r.worker.run_pass(),
        PassWork::default(),
        "stopped: nothing taken"
    );
    assert!(!r.worker.poll_ready(), "stopped: no work to poll for");
    assert_eq!(
        r.worker.retry_held(),
        PassWork::default(),
        "not resumed yet"
    );

    fs.resize("4m");
    assert!(r.worker.shared().io_error.resume().is_some());
    r.worker.retry_held();
    settle(&mut r, WRITES + 1);
    assert_eq!(
        r.used_idx(),
        WRITES + 1,
        "every write completed after the retry"
    );
    for n in 0..=WRITES {
        assert_eq!(status_of(&r, n), 0, "write {n}: the guest sees no error");
    }
    let image = std::fs::read(fs.path("img")).unwrap();
    for n in 1..usize::from(WRITES) {
        let at = n * LEN as usize;
        assert!(
            image[at..at + LEN as usize]
                .iter()
                .all(|&b| b == 0x10 + n as u8),
            "block {n} lost its write"
        );
    }
    assert!(
        image[..LEN as usize].iter().all(|&b| b == 0xee),
        "the later write to block 0 must win over the retried earlier one"
    );
    let counts = r.worker.shared().io_error.counts();
    assert_eq!((counts.stopped, counts.reported), (held as u64, 0));
}

#[test]
fn report_fails_exactly_the_writes_that_failed_and_a_dropped_queue_fails_what_it_holds() {
    let test =
        "report_fails_exactly_the_writes_that_failed_and_a_dropped_queue_fails_what_it_holds";
    let Some(fs) = SmallFs::mount(test, "64k") else {
        return;
    };
    let mut r = rig(&fs, WriteErrorPolicy::Report);
    publish_writes(&mut r, 0x20);
    settle(&mut r, WRITES);
    assert_eq!(r.used_idx(), WRITES, "report completes everything");
    assert!(!r.worker.shared().io_error.is_stopped());
    let image = std::fs::read(fs.path("img")).unwrap();
    let mut failed = 0;
    for n in 0..usize::from(WRITES) {
        let at = n * LEN as usize;
        let written = image[at..at + LEN as usize]
            .iter()
            .all(|&b| b == 0x20 + n as u8);
        match status_of(&r, n as u16) {
            0 => assert!(written, "write {n} said OK but is not on the disk"),
            1 => failed += 1,
            s => panic!("write {n}: status {s}"),
        }
    }
    assert!(failed > 0, "some writes must have run out of space");
    assert_eq!(r.worker.shared().io_error.counts().reported, failed);

    // `stop`, then the queue goes away while stopped: the held writes get IOERR.
    let fs2 = SmallFs::mount(test, "64k").unwrap();
    let mut r = rig(&fs2, WriteErrorPolicy::Stop);
    publish_writes(&mut r, 0x30);
    wait_stopped(&mut r);
    let held = r.worker.in_flight();
    assert!(held > 0);
    r.worker.drain(Duration::from_secs(5)).unwrap();
    assert_eq!(
        r.used_idx(),
        WRITES,
        "drained: every chain returned to the driver"
    );
    let errors = (0..WRITES).filter(|&n| status_of(&r, n) == 1).count();
    assert_eq!(errors, held, "exactly the held writes failed");
}

/// The I/O error's resume comes while a block job holds the disk: the retry waits for
/// the job and happens when it lets go, not never.
#[test]
fn a_retry_held_off_by_a_block_job_happens_when_the_job_lets_go() {
    let test = "a_retry_held_off_by_a_block_job_happens_when_the_job_lets_go";
    let Some(fs) = SmallFs::mount(test, "64k") else {
        return;
    };
    let mut r = rig(&fs, WriteErrorPolicy::Stop);
    publish_writes(&mut r, 0x40);
    wait_stopped(&mut r);
    let done = r.used_idx();
    assert!(done < WRITES);
    fs.resize("4m");
    let shared = r.worker.shared().clone();
    shared
        .held
        .store(true, std::sync::atomic::Ordering::Release);
    assert!(shared.io_error.resume().is_some());
    assert_eq!(
        r.worker.retry_held(),
        PassWork::default(),
        "held by the job"
    );
    shared
        .held
        .store(false, std::sync::atomic::Ordering::Release);
    r.worker.resume();
    settle(&mut r, WRITES);
    assert_eq!(r.used_idx(), WRITES, "retried once the job let go");
    assert!((0..WRITES).all(|n| status_of(&r, n) == 0));
}
