#![allow(clippy::cast_possible_truncation)] // Test data on a 64-bit host.

use std::collections::VecDeque;

use rand::{Rng, SeedableRng, rngs::StdRng};

use super::*;
use crate::jobs::state::CopyMode;

const G: u64 = 4096;

fn options(sync: SyncMode, buffer: u64, speed: u64) -> MirrorOptions {
    MirrorOptions {
        granularity: G,
        buffer_size: buffer,
        speed,
        sync,
        copy_mode: CopyMode::Background,
    }
}

/// A source the "guest" keeps writing while chunks are copied in flight: a copy reads
/// the source when it starts and lands on the target when it ends, some steps later, as
/// real reads and writes do. Guest writes mark the bitmap when they finish.
#[test]
fn copies_converge_while_the_guest_writes() {
    let size = 256 * G + 100;
    let mut rng = StdRng::seed_from_u64(7);
    let mut source: Vec<u8> = (0..size).map(|_| rng.random()).collect();
    let mut target = vec![0u8; source.len()];
    let bitmap = Arc::new(DirtyBitmap::new(size, G).unwrap());
    let mut c = Copier::new(bitmap.clone(), options(SyncMode::Full, 8 * G, 0)).unwrap();
    c.start().unwrap();
    assert_eq!(c.state(), JobState::Running);
    let now = Instant::now();
    let mut flying: VecDeque<(u64, u64, Vec<u8>)> = VecDeque::new();
    let mut guest_writes = 0;
    let mut steps = 0;
    while !(c.state() == JobState::Ready && guest_writes >= 300) {
        steps += 1;
        assert!(steps < 100_000, "no convergence: {:?}", c.progress());
        // The guest writes a few bytes somewhere, now and then.
        if guest_writes < 300 && rng.random_bool(0.3) {
            let at = rng.random_range(0..size - 10);
            let len = rng.random_range(1..10u64);
            for b in &mut source[at as usize..(at + len) as usize] {
                *b = rng.random();
            }
            bitmap.mark(at, len);
            guest_writes += 1;
        }
        // Start copies up to the budget (never more than 8 chunks in flight).
        while let Step::Copy { chunk, offset, len } = c.next(now) {
            let data = source[offset as usize..(offset + len) as usize].to_vec();
            flying.push_back((chunk, offset, data));
            assert!(flying.len() <= 8);
        }
        // One copy lands.
        if let Some((chunk, offset, data)) = flying.pop_front() {
            target[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
            c.copied(chunk, Ok(()));
        }
    }
    // Ready but the last writes may still be dirty: drain like a pivot does.
    while !c.in_sync() {
        while let Step::Copy { chunk, offset, len } = c.next(now) {
            target[offset as usize..(offset + len) as usize]
                .copy_from_slice(&source[offset as usize..(offset + len) as usize]);
            c.copied(chunk, Ok(()));
        }
    }
    assert!(target == source, "the target differs from the source");
    let p = c.progress();
    assert!(p.bytes_done >= size, "{p:?}");
    assert_eq!((p.dirty_bytes, p.bytes_total), (0, p.bytes_done));
    c.finish(JobState::Completed).unwrap();
    assert_eq!(c.next(now), Step::Idle);
}

#[test]
fn sync_none_is_ready_at_once_and_copies_only_new_writes() {
    let bitmap = Arc::new(DirtyBitmap::new(64 * G, G).unwrap());
    let mut c = Copier::new(bitmap.clone(), options(SyncMode::None, 16 * G, 0)).unwrap();
    assert_eq!(c.next(Instant::now()), Step::Idle, "created: nothing to do");
    c.start().unwrap();
    assert_eq!(c.state(), JobState::Ready);
    bitmap.mark(5 * G + 1, 1);
    assert_eq!(
        c.next(Instant::now()),
        Step::Copy {
            chunk: 5,
            offset: 5 * G,
            len: G
        }
    );
    assert!(!c.in_sync());
    c.copied(5, Ok(()));
    assert!(c.in_sync());
    assert_eq!(c.progress().bytes_done, G);
}

#[test]
fn the_speed_limit_makes_the_copier_wait() {
    let bitmap = Arc::new(DirtyBitmap::new(1024 * G, G).unwrap());
    // 40 KiB/s: a 100 ms slice lets one 4 KiB chunk go.
    let mut c = Copier::new(bitmap, options(SyncMode::Full, 64 * G, 40 * 1024)).unwrap();
    c.start().unwrap();
    let t = Instant::now();
    assert!(matches!(c.next(t), Step::Copy { .. }));
    let Step::Wait(d) = c.next(t) else {
        panic!("no wait under the speed limit")
    };
    assert!(
        d > Duration::ZERO && d <= Duration::from_millis(100),
        "{d:?}"
    );
    c.set_speed(0);
    assert!(matches!(c.next(t), Step::Copy { .. }));
}

#[test]
fn a_target_error_fails_the_job_and_completion_needs_ready() {
    let bitmap = Arc::new(DirtyBitmap::new(8 * G, G).unwrap());
    let mut c = Copier::new(bitmap, options(SyncMode::Full, 8 * G, 0)).unwrap();
    let e = c.finish(JobState::Completed).unwrap_err();
    assert!(
        e.contains("not in sync") || e.contains("cannot become"),
        "{e}"
    );
    c.start().unwrap();
    let Step::Copy { chunk, .. } = c.next(Instant::now()) else {
        panic!("nothing to copy")
    };
    assert!(
        c.finish(JobState::Completed).is_err(),
        "complete before ready"
    );
    c.copied(chunk, Err("target: No space left on device".into()));
    let p = c.progress();
    assert_eq!(p.state, JobState::Failed);
    assert!(
        p.error.as_deref().is_some_and(|e| e.contains("No space")),
        "{p:?}"
    );
    assert_eq!(c.next(Instant::now()), Step::Idle);
    assert!(
        c.finish(JobState::Cancelled).is_err(),
        "a failed job is over"
    );
}

#[test]
fn cancel_in_ready_and_bad_settings() {
    let bitmap = Arc::new(DirtyBitmap::new(2 * G, G).unwrap());
    let mut c = Copier::new(bitmap.clone(), options(SyncMode::Full, 2 * G, 0)).unwrap();
    c.start().unwrap();
    while let Step::Copy { chunk, .. } = c.next(Instant::now()) {
        c.copied(chunk, Ok(()));
    }
    assert_eq!(c.state(), JobState::Ready);
    c.finish(JobState::Cancelled).unwrap();
    assert_eq!(c.state(), JobState::Cancelled);
    let other = Arc::new(DirtyBitmap::new(2 * G, 2 * G).unwrap());
    assert!(Copier::new(other, options(SyncMode::Full, 2 * G, 0)).is_err());
    // `sync: top` starts with nothing dirty: its caller marks the top layer's clusters.
    let fresh = Arc::new(DirtyBitmap::new(2 * G, G).unwrap());
    let _top = Copier::new(fresh.clone(), options(SyncMode::Top, 2 * G, 0)).unwrap();
    assert_eq!(fresh.dirty_chunks(), 0);
    drop(bitmap);
}
