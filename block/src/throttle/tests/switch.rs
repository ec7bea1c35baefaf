//! Moving queues between shared groups while they run (simulated clock): the budget
//! follows the move, the old group's turn passes on, no request is lost or reordered.

#![allow(clippy::cast_precision_loss)] // Test data and figures, not guest input.

use super::*;

fn named(id: &str, n: u64) -> ThrottleGroup {
    ThrottleGroup::new(id, iops(n)).unwrap()
}

/// Gives client `i` a [`GroupSwitch`] waking it like its memberships do.
fn attach_switch(sim: &mut Sim, i: usize) -> Arc<GroupSwitch> {
    let c = &mut sim.clients[i];
    let f = c.woken.clone();
    let switch = GroupSwitch::new(Arc::new(move || f.store(true, Ordering::SeqCst)));
    c.throttle = std::mem::take(&mut c.throttle).with_switch(switch.clone());
    switch
}

/// Every request of every client was admitted exactly once, in order, and none waits.
fn assert_all_in_order(sim: &Sim) {
    for (i, c) in sim.clients.iter().enumerate() {
        let seqs: Vec<u64> = c.admitted.iter().map(|&(_, s)| s).collect();
        assert_eq!(
            seqs,
            (0..seqs.len() as u64).collect::<Vec<_>>(),
            "client {i}"
        );
        assert_eq!(
            seqs.len() as u64 + c.queue.len() as u64,
            c.pushed,
            "client {i}"
        );
    }
}

#[test]
fn a_member_moves_to_another_group_mid_run_and_the_budgets_follow() {
    let g1 = named("g1", 1000);
    let g2 = named("g2", 300);
    let mut sim = Sim::new();
    let a = sim.client(&[&g1], Direction::Read, 4096);
    // b's own (unlimited) group first, as a disk's queue has; the shared group second.
    let own = group(ThrottleLimits::default());
    let b = sim.client(&[&own, &g1], Direction::Write, 4096);
    let sw = attach_switch(&mut sim, b);
    // b keeps many requests held in its pen: they must all move with it.
    sim.clients[b].depth = 200;
    sim.run_until(5 * SEC);
    for c in [a, b] {
        assert_near(
            &format!("{c} shares g1"),
            sim.count(c, 1, 5) as f64,
            2000.0,
            0.05,
        );
    }
    assert!(sim.clients[b].queue.len() >= 150, "b holds requests");

    sw.post(Some(&g2));
    assert!(
        sim.clients[b].woken.load(Ordering::SeqCst),
        "posting wakes the queue"
    );
    // Nothing changes until b's own thread looks.
    assert_eq!(sim.clients[b].throttle.shared_group_id(), Some("g1"));
    sim.run_until(10 * SEC);
    for s in 6..10 {
        assert_near(
            &format!("a second {s}"),
            sim.count(a, s, s + 1) as f64,
            1000.0,
            0.01,
        );
        assert_near(
            &format!("b second {s}"),
            sim.count(b, s, s + 1) as f64,
            300.0,
            0.01,
        );
    }
    assert!(!g1.state().turns(0).contains(&1), "b left g1's turn order");

    // Out of every shared group: b's held requests all go at once (its own group has no
    // limits), still in order.
    sim.clients[b].depth = 0;
    sw.post(None);
    sim.run_until(11 * SEC);
    assert_eq!(sim.clients[b].throttle.shared_group_id(), None);
    assert!(sim.clients[b].queue.is_empty());
    assert_near("a alone", sim.count(a, 10, 11) as f64, 1000.0, 0.01);

    // And back into a group: b is limited again.
    sim.clients[b].depth = 50;
    sim.clients[b].next_try = Some(sim.now);
    sw.post(Some(&g2));
    sim.run_until(15 * SEC);
    for s in 12..15 {
        assert_near(
            &format!("b back, {s}"),
            sim.count(b, s, s + 1) as f64,
            300.0,
            0.01,
        );
    }
    assert_all_in_order(&sim);
}

#[test]
fn the_turn_holder_leaving_passes_the_turn_on() {
    let g = group(iops(100));
    let other = group(ThrottleLimits::default());
    let (a_woken, a_waker) = waker_flag();
    let (b_woken, b_waker) = waker_flag();
    let a_switch = GroupSwitch::new(a_waker.clone());
    let mut a = Throttle::new(None, Some(a_switch.join(&g))).with_switch(a_switch.clone());
    let mut b = Throttle::new(None, Some(g.join(b_waker)));
    let t0 = Instant::now();
    // a uses up the bucket and waits as the head; b queues behind it.
    while a.admit(Direction::Read, 1, t0) == Decision::Go {}
    assert!(matches!(b.admit(Direction::Read, 1, t0), Decision::Wait(_)));
    assert_eq!(g.state().turns(0), vec![0, 1]);
    b_woken.store(false, Ordering::SeqCst);

    // a (the head) is moved to a group without limits: on its next admission it leaves
    // g, b is woken and becomes head at once, and a goes freely.
    a_switch.post(Some(&other));
    assert!(a_woken.swap(false, Ordering::SeqCst));
    assert_eq!(
        g.state().turns(0),
        vec![0, 1],
        "applied on a's thread, not before"
    );
    assert_eq!(a.admit(Direction::Read, 1, t0), Decision::Go);
    assert!(b_woken.load(Ordering::SeqCst), "the next member is woken");
    assert_eq!(g.state().turns(0), vec![1]);
    let Decision::Wait(due) = b.admit(Direction::Read, 1, t0) else {
        panic!("the bucket is still full");
    };
    assert!(
        due <= t0 + Duration::from_millis(20),
        "b waits for the bucket only"
    );
    assert_eq!(b.admit(Direction::Read, 1, due), Decision::Go);

    // The member admitted last from the turn order (it keeps the turn while room
    // remains) leaving does not keep the others out either.
    // (c takes the slot a left: 0.)
    let mut c = Throttle::new(None, Some(g.join(Arc::new(|| {}))));
    let late = due + SEC;
    while b.admit(Direction::Read, 1, late) == Decision::Go {}
    assert!(matches!(
        c.admit(Direction::Read, 1, late),
        Decision::Wait(_)
    ));
    assert_eq!(g.state().turns(0), vec![1, 0]);
    let Decision::Wait(b_due) = b.admit(Direction::Read, 1, late) else {
        panic!("the bucket is full");
    };
    assert_eq!(b.admit(Direction::Read, 1, b_due), Decision::Go);
    assert_eq!(g.state().turns(0), vec![0], "c is head, b owns the turn");
    b.set_shared(None);
    assert_eq!(g.state().turns(0), vec![0]);
    let Decision::Wait(c_due) = c.admit(Direction::Read, 1, b_due) else {
        panic!("the bucket is still full");
    };
    assert!(
        c_due <= b_due + Duration::from_millis(20),
        "c waits for the bucket only"
    );
    assert_eq!(c.admit(Direction::Read, 1, c_due), Decision::Go);
    assert!(g.state().turns(0).is_empty());
}

#[test]
fn posting_twice_before_the_queue_looks_keeps_the_last() {
    let g1 = named("g1", 100);
    let g2 = named("g2", 200);
    let g3 = named("g3", 300);
    let (_woken, waker) = waker_flag();
    let sw = GroupSwitch::new(waker);
    let mut t = Throttle::new(None, Some(sw.join(&g1))).with_switch(sw.clone());
    sw.post(Some(&g2));
    sw.post(Some(&g3));
    t.refresh();
    assert_eq!(t.shared_group_id(), Some("g3"));
    // Nothing more is pending.
    t.refresh();
    assert_eq!(t.shared_group_id(), Some("g3"));
    // The membership posted first and never applied left g2: a member of g2 that waits
    // is never held up by it.
    let mut other = Throttle::new(None, Some(g2.join(Arc::new(|| {}))));
    let now = Instant::now();
    while other.admit(Direction::Read, 1, now) == Decision::Go {}
    assert_eq!(g2.state().turns(0).len(), 1);
    sw.post(None);
    t.refresh();
    assert_eq!(t.shared_group_id(), None);
    assert!(!t.is_enabled());
}
