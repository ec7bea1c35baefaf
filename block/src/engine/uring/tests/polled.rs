//! Callers that poll instead of sleeping: completions must show up through
//! `has_completions` alone (the ring is set up with COOP_TASKRUN, so no interrupt pushes
//! them into a thread that stays in user space), and `reap_ready` leaves the notifier to
//! an edge-triggered watcher.

use super::*;
use crate::engine::test_util::temp_image;

/// Rounds of reads, so that completions arriving as task work are seen many times.
const ROUNDS: usize = 1000;

#[test]
fn a_caller_spinning_in_user_space_finds_its_completions() {
    let img = temp_image(&vec![5u8; 64 * 4096]);
    // O_DIRECT: the reads complete from the device's interrupt, as task work.
    let disk = open_disk(img.path(), CacheMode::None);
    let mut eng = engine(&disk, 16, 16);
    let bufs: Vec<AlignedBuf> = (0..8).map(|_| aligned(4096)).collect();
    let iovs: Vec<[libc::iovec; 1]> = bufs.iter().map(|b| [iovec(b, 0..4096)]).collect();
    let mut held_back = 0;
    let mut brought_in = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    for round in 0..ROUNDS {
        for (i, iov) in iovs.iter().enumerate() {
            let offset = (((round * 8 + i) * 7) % 64 * 4096) as u64;
            // SAFETY: `bufs`/`iovs` outlive the loop below, which reaps every op.
            unsafe {
                eng.push(
                    i as u64,
                    EngineOp::Read {
                        offset,
                        iovecs: vecs(iov),
                    },
                )
            };
        }
        eng.submit().unwrap();
        let mut got = HashMap::new();
        // No syscall here (the clock is the vDSO's) but those reap_ready makes.
        while got.len() < 8 {
            assert!(
                Instant::now() < deadline,
                "round {round}: {} of 8 seen",
                got.len()
            );
            // Completions waiting as task work, not yet in the CQ: they must count, and
            // reap_ready must bring them in.
            let waiting = eng.ring.submission().taskrun() && eng.ring.completion().is_empty();
            if waiting {
                held_back += 1;
                // A timer tick may run the task work (or clear a flag raised by task work
                // that held nothing) between the look above and this call, so a `false`
                // proves a miss only when the flag is still up after it.
                let seen = eng.has_completions();
                assert!(
                    seen || !eng.ring.submission().taskrun(),
                    "task work holds completions"
                );
            }
            if eng.has_completions() {
                let before = got.len();
                eng.reap_ready(&mut |tag, result| {
                    assert!(got.insert(tag, result).is_none(), "tag {tag} twice");
                });
                // The enter that runs the task work may be refused for now (EAGAIN,
                // EINTR: the engine then wakes its notifier and the next call retries),
                // and the flag may be up for other task work, so not every look pays.
                if waiting && got.len() > before {
                    brought_in += 1;
                }
            }
            std::hint::spin_loop();
        }
        assert!((0..8).all(|i| got[&i] == 4096), "{got:?}");
        assert!(bufs.iter().all(|b| b.as_slice().iter().all(|&x| x == 5)));
        assert_eq!(eng.in_flight(), 0);
    }
    eprintln!(
        "completions seen held back as task work: {held_back}, brought in by reap_ready: {brought_in}"
    );
    assert!(
        held_back == 0 || brought_in > 0,
        "reap_ready never ran the task work ({held_back} times held back)"
    );
    // reap_ready left the eventfd as the kernel signalled it; reap clears it.
    if poll_in(eng.notifier(), 0) == 1 {
        eng.reap(&mut |_, _| panic!("nothing left"));
        assert_eq!(poll_in(eng.notifier(), 0), 0, "reap clears the notifier");
    }
}
