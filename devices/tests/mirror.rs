//! Live disk mirror end to end without KVM: a disk whose two queues are served by two
//! iothreads, driven by test-side drivers that write and verify random data, mirrored
//! to a target file and pivoted (or cancelled) while the load runs. The images are
//! compared byte for byte with what the drivers wrote.

#![allow(clippy::cast_possible_truncation)] // Test data and figures, not guest input.

mod common;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use block::jobs::{CopyMode, JobState};
use common::{Rig, check_image, mixed_load, spawn_loads, two_queue_disk};
use devices::mirror::{JobError, Mirror, MirrorConfig, MirrorTarget, TargetFormat, open_target};
use devices::virtio_blk::device::BlkDevice;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;
const REQUESTS: usize = 6000;

fn rig() -> Rig {
    Rig::new(2, vec![two_queue_disk("d0.raw")], SIZE)
}

fn config(rig: &Rig, mode: CopyMode, speed: u64) -> MirrorConfig {
    MirrorConfig {
        job_id: Some("m0".into()),
        disk: "d0".into(),
        target: MirrorTarget {
            path: rig.dir.path().join("target.raw"),
            format: TargetFormat::Raw,
        },
        sync: Default::default(),
        copy_mode: mode,
        speed,
        granularity: 64 << 10,
        buffer_size: 4 * MIB,
    }
}

/// Starts a mirror of the rig's disk per `mode` and `speed`; returns it with the disk
/// and the target's path.
fn start(rig: &Rig, mode: CopyMode, speed: u64) -> (Arc<BlkDevice>, std::path::PathBuf, Mirror) {
    let blk = rig.disks[0].device.clone();
    let cfg = config(rig, mode, speed);
    let target_path = cfg.target.path.clone();
    let target = open_target(&blk, &cfg).unwrap();
    let mirror = Mirror::start(&blk, rig.iothreads.clone(), cfg, target, None).unwrap();
    (blk, target_path, mirror)
}

fn wait_for(mirror: &Mirror, state: JobState, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while mirror.info().state != state {
        assert!(Instant::now() < deadline, "{:?}", mirror.info());
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Runs the drivers' verified load in threads; returns their shadows.
fn load(rig: &mut Rig) -> Vec<std::thread::JoinHandle<(u64, Vec<u8>)>> {
    spawn_loads(rig, SIZE, REQUESTS)
}

fn pivot_under_load(mode: CopyMode) {
    let mut rig = rig();
    let blk = rig.disks[0].device.clone();
    let source = rig.disks[0].image.clone();
    let cfg = config(&rig, mode, 0);
    let target_path = cfg.target.path.clone();
    let loads = load(&mut rig);
    let target = open_target(&blk, &cfg).unwrap();
    let mut mirror = Mirror::start(&blk, rig.iothreads.clone(), cfg, target, None).unwrap();
    wait_for(&mirror, JobState::Ready, 60);
    mirror.complete(&blk).unwrap();
    assert_eq!(mirror.info().state, JobState::Completed);
    assert_eq!(
        blk.config().path,
        target_path,
        "the disk reports its new image"
    );
    let shadows: Vec<_> = loads.into_iter().map(|t| t.join().unwrap()).collect();
    // Everything the drivers wrote, before and after the pivot, is on the target; their
    // reads after the pivot (verified in the load) came from it.
    check_image(&std::fs::read(&target_path).unwrap(), &shadows);
    assert!(
        !tests::procfs::self_holds(&source),
        "the old image is closed"
    );
    assert!(tests::procfs::self_holds(&target_path));
    let info = mirror.info();
    assert!(info.bytes_done >= SIZE, "{info:?}");
    assert_eq!(blk.counters().io.in_flight, 0);
}

#[test]
fn background_mirror_pivots_under_load_and_loses_nothing() {
    pivot_under_load(CopyMode::Background);
}

#[test]
fn write_blocking_mirror_pivots_under_load_and_loses_nothing() {
    pivot_under_load(CopyMode::WriteBlocking);
}

#[test]
fn cancel_in_ready_leaves_a_consistent_copy_and_the_disk_on_its_image() {
    let mut rig = rig();
    let source = rig.disks[0].image.clone();
    let (blk, target_path, mut mirror) = start(&rig, CopyMode::Background, 0);
    let loads = load(&mut rig);
    wait_for(&mirror, JobState::Ready, 60);
    let shadows: Vec<_> = loads.into_iter().map(|t| t.join().unwrap()).collect();
    mirror.cancel(&blk, false).unwrap();
    assert_eq!(mirror.info().state, JobState::Cancelled);
    assert_eq!(blk.config().path, source);
    let (s, t) = (
        std::fs::read(&source).unwrap(),
        std::fs::read(&target_path).unwrap(),
    );
    check_image(&s, &shadows);
    assert!(s == t, "the target is the disk at cancel time");
    assert!(
        !tests::procfs::self_holds(&target_path),
        "the target is closed"
    );
    assert!(matches!(mirror.complete(&blk), Err(JobError::Conflict(_))));
}

#[test]
fn complete_before_ready_is_refused_and_cancel_leaves_the_disk_working() {
    let rig = rig();
    // 64 KiB/s: far from ready for a while.
    let (blk, _, mut mirror) = start(&rig, CopyMode::Background, 64 << 10);
    wait_for(&mirror, JobState::Running, 5);
    let e = mirror.complete(&blk).unwrap_err();
    assert!(matches!(e, JobError::Conflict(_)), "{e}");
    assert!(e.to_string().contains("ready"), "{e}");
    mirror.set_speed(0).unwrap();
    mirror.cancel(&blk, false).unwrap();
    assert_eq!(mirror.info().state, JobState::Cancelled);
    assert!(
        blk.mirror().is_none(),
        "the disk's queues let go of the job"
    );
    let again = mirror.cancel(&blk, false).unwrap_err();
    assert!(matches!(again, JobError::Conflict(_)));
}

#[test]
fn a_target_smaller_than_the_disk_or_the_disk_itself_is_refused() {
    let rig = rig();
    let blk = rig.disks[0].device.clone();
    let mut cfg = config(&rig, CopyMode::Background, 0);
    std::fs::File::create(&cfg.target.path)
        .unwrap()
        .set_len(MIB)
        .unwrap();
    let e = open_target(&blk, &cfg).err().unwrap();
    assert!(e.to_string().contains("less than"), "{e}");
    cfg.target.path = rig.disks[0].image.clone();
    let e = open_target(&blk, &cfg).err().unwrap();
    assert!(e.to_string().contains("own image"), "{e}");
}

/// The disk going away (hot unplug, shutdown) cancels its job at once: the job leaves
/// its iothread, the disk's queues let go of it and the target is closed.
#[test]
fn a_disk_going_away_cancels_its_job_and_closes_the_target() {
    let rig = rig();
    let (blk, target_path, mut mirror) = start(&rig, CopyMode::WriteBlocking, 64 << 10);
    wait_for(&mirror, JobState::Running, 5);
    assert!(tests::procfs::self_holds(&target_path));
    mirror.abandon(&blk);
    assert_eq!(mirror.info().state, JobState::Cancelled);
    assert!(blk.mirror().is_none());
    assert!(
        !tests::procfs::self_holds(&target_path),
        "the target is closed"
    );
    for t in &rig.iothreads {
        assert_eq!(
            t.visit("job:m0", devices::iothread::SourceOp::Resume)
                .unwrap(),
            0,
            "the job left its iothread"
        );
    }
}

/// A job in ready copies what the guest dirties by itself (nothing else wakes it):
/// once the guest stops, the target catches up without a sync, so a forced cancel
/// (which syncs nothing) leaves it equal to the disk.
#[test]
fn a_ready_job_copies_later_writes_by_itself() {
    let mut rig = rig();
    let source = rig.disks[0].image.clone();
    let (blk, target_path, mut mirror) = start(&rig, CopyMode::Background, 0);
    wait_for(&mirror, JobState::Ready, 60);
    let at_ready = mirror.info().bytes_done;
    // Writes after ready, then quiet.
    let mut drv = rig.disks[0].drivers.remove(0);
    let (shadow, _) = mixed_load(&mut drv, 0, SIZE / 512 / 2, 300, 9);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let info = mirror.info();
        if info.dirty_bytes == 0 && info.bytes_done > at_ready {
            break;
        }
        assert!(Instant::now() < deadline, "the job did not copy: {info:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Copies in flight end within the job's next looks.
    std::thread::sleep(Duration::from_millis(100));
    mirror.cancel(&blk, true).unwrap();
    let (s, t) = (
        std::fs::read(&source).unwrap(),
        std::fs::read(&target_path).unwrap(),
    );
    check_image(&s, &[(0, shadow)]);
    assert!(
        s == t,
        "the target did not catch up with the disk by itself"
    );
}
