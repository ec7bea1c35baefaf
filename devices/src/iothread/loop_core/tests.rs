//! The core's sleep preparation with a scripted source.

use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::iothread::source::{FDS, IoSource};

/// A queue-like source: a pass turns its kicks off (as a virtio worker's does), `arm`
/// turns them on and reports what it sees; `spurious` times it says work waits when a
/// pass finds none (an engine's `has_completions` may say so).
#[derive(Default)]
struct Scripted {
    kicks_on: bool,
    spurious: u32,
    passes: u32,
    wakes: u32,
}

impl IoSource for Scripted {
    fn device(&self) -> &str {
        "d0"
    }
    fn queue(&self) -> u16 {
        0
    }
    fn fds(&self) -> [Option<RawFd>; FDS] {
        [None; FDS]
    }
    fn handle(&mut self, _which: usize) -> PassWork {
        self.run_ready()
    }
    fn poll_ready(&mut self) -> bool {
        false
    }
    fn run_ready(&mut self) -> PassWork {
        self.passes += 1;
        self.kicks_on = false;
        PassWork::default()
    }
    fn arm(&mut self) -> bool {
        self.kicks_on = true;
        if self.spurious > 0 {
            self.spurious -= 1;
            return true;
        }
        false
    }
    fn wake(&mut self) {
        self.wakes += 1;
    }
    fn spin_worthy(&self, _cap_ns: u64) -> bool {
        false
    }
    fn finish_pass(&mut self) -> bool {
        false
    }
    fn set_max_batch(&mut self, _max_batch: u32) {}
    fn drain(&mut self, _timeout: Duration) -> std::io::Result<()> {
        Ok(())
    }
    fn in_flight(&self) -> usize {
        0
    }
}

fn core_with(source: Scripted, poll_max_ns: u64) -> Core<Scripted> {
    let mut config = IoThreadConfig::new("io0");
    config.poll_max_ns = poll_max_ns;
    let mut core = Core::new(&config, Arc::new(LoopCounters::default()));
    let idx = core.free_slot();
    core.insert(idx, Box::new(source));
    core
}

#[test]
fn a_source_that_saw_work_that_was_not_there_sleeps_with_its_kicks_on() {
    // Polling on (the core runs what `arm` reports instead of deferring it), and the
    // source says once that work waits, which its pass does not find.
    let mut core = core_with(
        Scripted {
            spurious: 1,
            ..Scripted::default()
        },
        32_000,
    );
    let _ = core.idle();
    let s = core.get(0).unwrap();
    assert!(s.passes >= 2, "the spurious work was looked at");
    assert!(s.kicks_on, "kicks are on when the thread sleeps");
}

#[test]
fn work_still_showing_after_a_pass_brings_the_thread_back() {
    // The source keeps saying work waits: after its pass it is armed again, and as it
    // still shows work, its fd is woken instead of the thread sleeping on it unseen.
    let mut core = core_with(
        Scripted {
            spurious: 2,
            ..Scripted::default()
        },
        32_000,
    );
    let _ = core.idle();
    let s = core.get(0).unwrap();
    assert!(s.kicks_on);
    assert!(s.wakes >= 1, "woken to come back: {} wakes", s.wakes);
}
