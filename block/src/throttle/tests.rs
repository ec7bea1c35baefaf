//! Simulated-clock tests of buckets, groups and the holding pen, and one real-threads
//! test with timerfds and eventfds.

// Test data and figures, not guest input.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::limits::OPS_TOTAL;
use super::*;

mod switch;

const SEC: Duration = Duration::from_secs(1);

/// A simulated client: one queue with its throttle, retrying exactly at the deadline it
/// was given or as soon as its waker is called.
struct Client {
    throttle: Throttle,
    queue: ThrottledQueue<u64>,
    woken: Arc<AtomicBool>,
    next_try: Option<Instant>,
    dir: Direction,
    bytes: u64,
    /// Keep at least this many requests queued (0: stop submitting).
    depth: usize,
    pushed: u64,
    /// (time since the start, sequence number) of each admitted request.
    admitted: Vec<(Duration, u64)>,
}

struct Sim {
    base: Instant,
    now: Instant,
    clients: Vec<Client>,
}

fn waker_flag() -> (Arc<AtomicBool>, MemberWaker) {
    let flag = Arc::new(AtomicBool::new(false));
    let f = flag.clone();
    (flag, Arc::new(move || f.store(true, Ordering::SeqCst)))
}

fn group(limits: ThrottleLimits) -> ThrottleGroup {
    ThrottleGroup::new("g", limits).unwrap()
}

fn iops(n: u64) -> ThrottleLimits {
    ThrottleLimits {
        iops_total: n,
        ..Default::default()
    }
}

impl Sim {
    fn new() -> Self {
        let base = Instant::now();
        Sim {
            base,
            now: base,
            clients: Vec::new(),
        }
    }

    /// Adds a saturating client in `groups` (disk group first, then a shared one).
    fn client(&mut self, groups: &[&ThrottleGroup], dir: Direction, bytes: u64) -> usize {
        let (woken, waker) = waker_flag();
        let m: Vec<GroupMember> = groups.iter().map(|g| g.join(waker.clone())).collect();
        let mut it = m.into_iter();
        self.clients.push(Client {
            throttle: Throttle::new(it.next(), it.next()),
            queue: ThrottledQueue::with_capacity(16),
            woken,
            next_try: Some(self.now),
            dir,
            bytes,
            depth: 2,
            pushed: 0,
            admitted: Vec::new(),
        });
        self.clients.len() - 1
    }

    fn refill(c: &mut Client) {
        while c.queue.len() < c.depth {
            c.queue.push(c.pushed, c.dir, c.bytes);
            c.pushed += 1;
        }
    }

    fn step(&mut self, i: usize) {
        let now = self.now;
        let since = now - self.base;
        let c = &mut self.clients[i];
        c.woken.store(false, Ordering::SeqCst);
        Self::refill(c);
        while let Some(seq) = c.queue.pop_admitted(&mut c.throttle, now) {
            c.admitted.push((since, seq));
            Self::refill(c);
        }
        c.next_try = c.queue.next_wake();
        if let Some(t) = c.next_try {
            assert!(t > now, "a wait must end in the future");
        }
    }

    /// Runs until `end` after the start.
    fn run_until(&mut self, end: Duration) {
        let end = self.base + end;
        for _ in 0..10_000_000 {
            for c in &mut self.clients {
                if c.woken.load(Ordering::SeqCst) {
                    c.next_try = Some(self.now);
                }
            }
            let next = (0..self.clients.len())
                .filter_map(|i| self.clients[i].next_try.map(|t| (t, i)))
                .min();
            match next {
                Some((t, i)) if t < end => {
                    self.now = self.now.max(t);
                    self.step(i);
                }
                _ => {
                    self.now = end;
                    return;
                }
            }
        }
        panic!("simulation does not advance");
    }

    /// Requests of client `i` admitted in `[from, to)` seconds.
    fn count(&self, i: usize, from: u64, to: u64) -> usize {
        let (from, to) = (SEC * from as u32, SEC * to as u32);
        self.clients[i]
            .admitted
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .count()
    }
}

fn assert_near(what: &str, got: f64, want: f64, tolerance: f64) {
    assert!(
        (got - want).abs() <= want * tolerance,
        "{what}: got {got}, want {want} +- {}%",
        tolerance * 100.0
    );
}

#[test]
fn iops_limit_holds_over_ten_seconds_and_each_second() {
    let g = group(iops(1000));
    let mut sim = Sim::new();
    let c = sim.client(&[&g], Direction::Read, 4096);
    sim.run_until(10 * SEC);
    assert_near("10 s", sim.count(c, 0, 10) as f64, 10_000.0, 0.01);
    for s in 1..10 {
        assert_near(
            &format!("second {s}"),
            sim.count(c, s, s + 1) as f64,
            1000.0,
            0.01,
        );
    }
}

#[test]
fn bps_limit_holds_for_small_and_large_requests() {
    for bytes in [4096u64, 128 * 1024] {
        let bps = 10 << 20;
        let g = group(ThrottleLimits {
            bps_total: bps,
            ..Default::default()
        });
        let mut sim = Sim::new();
        let c = sim.client(&[&g], Direction::Write, bytes);
        sim.run_until(10 * SEC);
        let moved = sim.count(c, 0, 10) as f64 * bytes as f64;
        assert_near(
            &format!("{bytes} B requests"),
            moved,
            10.0 * bps as f64,
            0.01,
        );
    }
}

#[test]
fn burst_runs_at_max_for_its_length_then_at_average_and_recovers() {
    let g = group(ThrottleLimits {
        iops_total: 1000,
        iops_total_max: 2000,
        iops_total_max_length: 3,
        ..Default::default()
    });
    let mut sim = Sim::new();
    let c = sim.client(&[&g], Direction::Read, 512);
    sim.run_until(10 * SEC);
    for s in 0..3 {
        assert_near(
            &format!("burst second {s}"),
            sim.count(c, s, s + 1) as f64,
            2000.0,
            0.02,
        );
    }
    for s in 5..10 {
        assert_near(
            &format!("second {s}"),
            sim.count(c, s, s + 1) as f64,
            1000.0,
            0.01,
        );
    }
    // Stop for 10 s: the burst is back.
    sim.clients[c].depth = 0;
    sim.clients[c].queue.drain().for_each(drop);
    sim.clients[c].throttle.withdraw();
    sim.clients[c].next_try = None;
    sim.run_until(20 * SEC);
    assert_eq!(sim.count(c, 10, 20), 0);
    sim.clients[c].depth = 2;
    sim.clients[c].next_try = Some(sim.now);
    sim.run_until(22 * SEC);
    assert_near("burst again", sim.count(c, 20, 21) as f64, 2000.0, 0.02);
    assert_near("still burst", sim.count(c, 21, 22) as f64, 2000.0, 0.02);
}

#[test]
fn direction_limits_apply_to_their_direction_only() {
    let g = group(ThrottleLimits {
        iops_read: 100,
        bps_write: 1 << 20,
        ..Default::default()
    });
    let mut sim = Sim::new();
    let r = sim.client(&[&g], Direction::Read, 1 << 20);
    let w = sim.client(&[&g], Direction::Write, 4096);
    sim.run_until(10 * SEC);
    // Reads are limited by count only (1 MiB each is not a bps_write matter).
    assert_near("reads", sim.count(r, 0, 10) as f64, 1000.0, 0.01);
    // Writes by bytes only: 256 per second, unaffected by the reads.
    assert_near("writes", sim.count(w, 0, 10) as f64, 2560.0, 0.01);

    // A write-only limit lets reads through untouched.
    let g = group(ThrottleLimits {
        iops_write: 10,
        ..Default::default()
    });
    let mut t = Throttle::new(Some(g.join(Arc::new(|| {}))), None);
    let now = Instant::now();
    for _ in 0..10_000 {
        assert_eq!(t.admit(Direction::Read, 4096, now), Decision::Go);
    }
    assert_eq!(t.admit(Direction::Write, 4096, now), Decision::Go);
    assert!(matches!(
        t.admit(Direction::Write, 4096, now),
        Decision::Wait(_)
    ));
}

#[test]
fn iops_size_charges_large_requests_proportionally() {
    let limits = ThrottleLimits {
        iops_total: 100,
        iops_size: 4096,
        ..Default::default()
    };
    for (bytes, per_sec) in [
        (16384u64, 25.0),
        (4096, 100.0),
        (512, 100.0),
        (6144, 100.0 / 1.5),
    ] {
        let g = group(limits.clone());
        let mut sim = Sim::new();
        let c = sim.client(&[&g], Direction::Write, bytes);
        sim.run_until(10 * SEC);
        // One extra request fits in the bucket at the start.
        let got = sim.count(c, 0, 10) as f64;
        assert_near(&format!("{bytes} B"), got, 10.0 * per_sec, 0.01);
    }
}

#[test]
fn group_members_share_the_budget_evenly() {
    for n in [2usize, 3] {
        let g = group(iops(1000));
        let mut sim = Sim::new();
        let clients: Vec<usize> = (0..n)
            .map(|_| sim.client(&[&g], Direction::Read, 4096))
            .collect();
        sim.run_until(10 * SEC);
        let total: usize = clients.iter().map(|&c| sim.count(c, 0, 10)).sum();
        assert_near(&format!("{n} members, total"), total as f64, 10_000.0, 0.01);
        for &c in &clients {
            let share = sim.count(c, 0, 10) as f64 / total as f64;
            assert_near(
                &format!("{n} members, share of {c}"),
                share,
                1.0 / n as f64,
                0.05,
            );
        }
    }
}

#[test]
fn a_member_that_stops_leaves_the_whole_budget_to_the_other() {
    for leave in [false, true] {
        let g = group(iops(1000));
        let mut sim = Sim::new();
        let a = sim.client(&[&g], Direction::Read, 4096);
        let b = sim.client(&[&g], Direction::Write, 4096);
        sim.run_until(5 * SEC);
        assert_near("a before", sim.count(a, 1, 5) as f64, 2000.0, 0.05);
        sim.clients[b].depth = 0;
        if leave {
            // Drop b's membership with requests pending: a must not wait on b's turn.
            sim.clients[b].throttle = Throttle::default();
        }
        sim.run_until(10 * SEC);
        for s in 6..10 {
            assert_near(
                &format!("a second {s}"),
                sim.count(a, s, s + 1) as f64,
                1000.0,
                0.01,
            );
        }
        assert!(sim.clients[b].queue.is_empty());
    }
}

#[test]
fn changing_limits_mid_run_keeps_every_request_in_order() {
    let g = group(iops(1000));
    let mut sim = Sim::new();
    let c = sim.client(&[&g], Direction::Read, 4096);
    sim.clients[c].depth = 600;
    sim.run_until(5 * SEC);
    assert!(sim.clients[c].queue.len() >= 500);
    g.set_limits(iops(200)).unwrap();
    assert_eq!(g.limits(), iops(200));
    sim.run_until(10 * SEC);
    assert_near("second 4", sim.count(c, 4, 5) as f64, 1000.0, 0.01);
    for s in 6..10 {
        assert_near(
            &format!("second {s}"),
            sim.count(c, s, s + 1) as f64,
            200.0,
            0.01,
        );
    }
    // Lift the limits: everything queued comes out at once.
    sim.clients[c].depth = 0;
    g.set_limits(ThrottleLimits::default()).unwrap();
    assert!(
        sim.clients[c].woken.load(Ordering::SeqCst),
        "waiters are woken"
    );
    sim.run_until(11 * SEC);
    let client = &sim.clients[c];
    assert!(client.queue.is_empty());
    let seqs: Vec<u64> = client.admitted.iter().map(|&(_, s)| s).collect();
    assert_eq!(seqs, (0..client.pushed).collect::<Vec<_>>());
    assert!(client.queue.throttled_ns() > 0);
    // Invalid limits are refused and change nothing.
    assert!(
        g.set_limits(ThrottleLimits {
            iops_size: 1,
            ..Default::default()
        })
        .is_err()
    );
    assert_eq!(g.limits(), ThrottleLimits::default());
}

#[test]
fn disk_and_shared_group_the_tighter_limit_wins_all_or_nothing() {
    let disk = group(iops(500));
    let shared = group(iops(1000));
    let mut sim = Sim::new();
    let a = sim.client(&[&disk, &shared], Direction::Read, 4096);
    let b = sim.client(&[&shared], Direction::Write, 4096);
    sim.run_until(10 * SEC);
    // a is held to its disk's 500/s; b gets the rest of the shared budget, so the shared
    // group was charged only for what a really did.
    assert_near("a", sim.count(a, 1, 10) as f64, 4500.0, 0.05);
    assert_near("b", sim.count(b, 1, 10) as f64, 4500.0, 0.05);
    assert_near(
        "shared",
        (sim.count(a, 1, 10) + sim.count(b, 1, 10)) as f64,
        9000.0,
        0.01,
    );

    // The shared limit can be the tighter one too.
    let disk = group(iops(2000));
    let shared = group(iops(300));
    let mut sim = Sim::new();
    let a = sim.client(&[&disk, &shared], Direction::Read, 4096);
    sim.run_until(10 * SEC);
    assert_near("shared-limited", sim.count(a, 1, 10) as f64, 2700.0, 0.01);

    // Directly: when one group refuses, the other is not charged.
    let tight = group(iops(100));
    let loose = group(iops(100_000));
    let mut t = Throttle::new(
        Some(tight.join(Arc::new(|| {}))),
        Some(loose.join(Arc::new(|| {}))),
    );
    let now = Instant::now();
    let mut admitted = 0;
    while t.admit(Direction::Read, 1, now) == Decision::Go {
        admitted += 1;
    }
    assert_eq!(
        admitted, 2,
        "the 100 IOPS bucket holds one op, plus the one that overfills it"
    );
    for _ in 0..5 {
        assert!(matches!(
            t.admit(Direction::Read, 1, now),
            Decision::Wait(_)
        ));
    }
    assert_eq!(tight.state().level(OPS_TOTAL).0, 2.0);
    assert_eq!(loose.state().level(OPS_TOTAL).0, 2.0);
}

#[test]
fn unthrottled_paths_always_go() {
    let mut none = Throttle::default();
    assert!(!none.is_enabled());
    let now = Instant::now();
    assert_eq!(none.admit(Direction::Write, u64::MAX, now), Decision::Go);
    let g = group(ThrottleLimits::default());
    let mut t = Throttle::new(Some(g.join(Arc::new(|| {}))), None);
    assert!(!t.is_enabled());
    for _ in 0..1000 {
        assert_eq!(t.admit(Direction::Read, 1 << 20, now), Decision::Go);
    }
    // Enabling limits at run time takes effect on the existing membership.
    g.set_limits(iops(10)).unwrap();
    assert!(t.is_enabled());
    assert_eq!(t.admit(Direction::Read, 1, now), Decision::Go);
    assert!(matches!(
        t.admit(Direction::Read, 1, now),
        Decision::Wait(_)
    ));
}

#[test]
fn turns_pass_on_leave_and_past_a_stalled_head() {
    let g = group(iops(100));
    let (a_woken, a_waker) = waker_flag();
    let (b_woken, b_waker) = waker_flag();
    let mut a = Throttle::new(Some(g.join(a_waker)), None);
    let mut b = Throttle::new(Some(g.join(b_waker)), None);
    let t0 = Instant::now();
    assert_eq!(a.admit(Direction::Read, 1, t0), Decision::Go);
    assert_eq!(a.admit(Direction::Read, 1, t0), Decision::Go);
    let Decision::Wait(a_at) = a.admit(Direction::Read, 1, t0) else {
        panic!("a should wait");
    };
    assert_eq!(a_at, t0 + Duration::from_millis(10));
    // b queues behind a: it is told to come back later than a's turn.
    let Decision::Wait(b_at) = b.admit(Direction::Read, 1, t0) else {
        panic!("b should wait");
    };
    assert!(b_at > a_at);
    assert_eq!(g.state().turns(0), vec![0, 1]);
    // At a's deadline b still may not jump the queue.
    assert!(matches!(
        b.admit(Direction::Read, 1, a_at),
        Decision::Wait(_)
    ));
    // a never comes back: once it is STALL overdue, b takes the turn, and a loses its
    // place and is woken.
    let late = a_at + group::STALL + Duration::from_millis(1);
    assert_eq!(b.admit(Direction::Read, 1, late), Decision::Go);
    assert!(a_woken.swap(false, Ordering::SeqCst));
    assert!(g.state().turns(0).is_empty());
    // a comes back and goes while the bucket has room, then waits as the head; b, having
    // had its turn, queues behind it.
    assert_eq!(a.admit(Direction::Read, 1, late), Decision::Go);
    assert!(matches!(
        a.admit(Direction::Read, 1, late),
        Decision::Wait(_)
    ));
    assert!(matches!(
        b.admit(Direction::Read, 1, late),
        Decision::Wait(_)
    ));
    assert_eq!(g.state().turns(0), vec![0, 1]);
    b_woken.store(false, Ordering::SeqCst);
    // When a (the head) leaves, b is woken and becomes head.
    drop(a);
    assert!(
        b_woken.load(Ordering::SeqCst),
        "leaving must wake the next member"
    );
    assert_eq!(g.state().turns(0), vec![1]);
    let Decision::Wait(b_at) = b.admit(Direction::Read, 1, late) else {
        panic!("the bucket is still full");
    };
    assert_eq!(b.admit(Direction::Read, 1, b_at), Decision::Go);
    assert!(g.state().turns(0).is_empty());
}

#[test]
fn time_throttled_is_summed_per_request() {
    let g = group(iops(1000));
    let mut t = Throttle::new(Some(g.join(Arc::new(|| {}))), None);
    let mut q = ThrottledQueue::default();
    for i in 0..20 {
        q.push(i, Direction::Read, 4096);
    }
    let t0 = Instant::now();
    let mut now = t0;
    let mut out = Vec::new();
    while !q.is_empty() {
        while let Some(i) = q.pop_admitted(&mut t, now) {
            out.push(i);
        }
        if let Some(at) = q.next_wake() {
            now = at;
        }
    }
    assert_eq!(out, (0..20).collect::<Vec<_>>());
    // 11 go at once; request k >= 11 waits (k - 10) ms: 1 + 2 + ... + 9 = 45 ms.
    let ns = q.take_throttled_ns();
    assert!(ns.abs_diff(45_000_000) < 1_000, "{ns}");
    assert_eq!(q.throttled_ns(), 0);
    assert_eq!(q.next_wake(), None);
    q.push(7, Direction::Write, 1);
    q.push(8, Direction::Write, 1);
    assert_eq!(q.drain().collect::<Vec<_>>(), vec![7, 8]);
    assert_eq!(q.len(), 0);
}

#[test]
fn real_threads_share_a_group_through_timers_and_wakers() {
    use std::sync::mpsc;
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    let g = group(iops(2000));
    let start = Instant::now();
    let end = start + SEC;
    let (tx, rx) = mpsc::channel();
    for _ in 0..2 {
        let g = g.clone();
        let tx = tx.clone();
        std::thread::spawn(move || {
            let efd = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
            let e = efd.clone();
            let member = g.join(Arc::new(move || {
                let _ = e.write(1);
            }));
            let mut throttle = Throttle::new(Some(member), None);
            let mut timer = ThrottleTimer::new().unwrap();
            let mut q = ThrottledQueue::with_capacity(8);
            let mut count = 0u64;
            loop {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                loop {
                    while q.len() < 4 {
                        q.push((), Direction::Read, 4096);
                    }
                    if q.pop_admitted(&mut throttle, now).is_none() {
                        break;
                    }
                    count += 1;
                }
                if let Some(at) = q.next_wake() {
                    timer.arm_at(at).unwrap();
                }
                let mut fds = [
                    libc::pollfd {
                        fd: timer.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                    libc::pollfd {
                        fd: efd.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    },
                ];
                // SAFETY: two valid pollfds for the duration of the call.
                unsafe { libc::poll(fds.as_mut_ptr(), 2, 20) };
                timer.clear().unwrap();
                let _ = efd.read();
            }
            tx.send(count).unwrap();
        });
    }
    drop(tx);
    let mut counts = Vec::new();
    for _ in 0..2 {
        counts.push(
            rx.recv_timeout(Duration::from_secs(10))
                .expect("a member thread hung"),
        );
    }
    let total: u64 = counts.iter().sum();
    assert_near(&format!("total of {counts:?}"), total as f64, 2000.0, 0.10);
    for c in &counts {
        let share = *c as f64 / total as f64;
        assert!((0.35..=0.65).contains(&share), "shares {counts:?}");
    }
}
