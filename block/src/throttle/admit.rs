//! A queue's throttle: its memberships (its disk's group, an optional shared group) and
//! the all-or-nothing admission across them.

use std::sync::Arc;
use std::time::Instant;

use super::group::{GroupMember, MemberWaker, Verdict};
use super::switch::GroupSwitch;
use super::{Decision, Direction};

/// The throttle of one disk queue: up to two group memberships. A request is admitted
/// only when every group with limits allows it, and then charged to all of them.
/// With no memberships (or none with limits) it says [`Decision::Go`] without locking.
#[derive(Debug, Default)]
pub struct Throttle {
    disk: Option<GroupMember>,
    shared: Option<GroupMember>,
    /// Where the control plane posts shared-group changes for this queue.
    switch: Option<Arc<GroupSwitch>>,
    /// Wakers to call once the group locks are released (reused, no allocation).
    wakes: WakeList,
}

/// Wakers collected under a group lock, called after it is released.
#[derive(Default)]
struct WakeList(Vec<MemberWaker>);

impl std::fmt::Debug for WakeList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WakeList")
    }
}

impl WakeList {
    fn fire(&mut self) {
        for w in self.0.drain(..) {
            w();
        }
    }
}

impl Throttle {
    /// A throttle with the given memberships: `disk` for the disk's own limits, `shared`
    /// for a throttle group it belongs to.
    pub fn new(disk: Option<GroupMember>, shared: Option<GroupMember>) -> Self {
        Throttle {
            disk,
            shared,
            switch: None,
            wakes: WakeList(Vec::with_capacity(8)),
        }
    }

    /// This throttle, taking shared-group changes posted in `switch` (applied by
    /// [`refresh`](Self::refresh), which admission calls).
    pub fn with_switch(mut self, switch: Arc<GroupSwitch>) -> Self {
        self.switch = Some(switch);
        self
    }

    /// Replaces the shared-group membership. The old one, if any, leaves its group: if it
    /// held or waited for the group's turn, the turn passes on. The disk membership keeps
    /// its place.
    pub fn set_shared(&mut self, member: Option<GroupMember>) {
        drop(std::mem::replace(&mut self.shared, member));
    }

    /// Applies a shared-group change posted in this throttle's [`GroupSwitch`], if any.
    /// Costs one atomic load when none is posted; [`admit`](Self::admit) and
    /// [`ThrottledQueue::pop_admitted`](super::ThrottledQueue::pop_admitted) call it, so a
    /// change takes effect on the queue's own thread before its next request is decided.
    pub fn refresh(&mut self) {
        if let Some(member) = self.switch.as_ref().and_then(|s| s.take()) {
            self.set_shared(member);
        }
    }

    /// The shared group's id, if the queue is in one.
    pub fn shared_group_id(&self) -> Option<&str> {
        self.shared.as_ref().map(|m| m.group().id())
    }

    /// Whether any membership has limits, i.e. whether requests may have to wait.
    pub fn is_enabled(&self) -> bool {
        active(&self.disk).is_some() || active(&self.shared).is_some()
    }

    /// Asks to start a request of `bytes` in `dir` at `now`. On [`Decision::Go`] the
    /// request has been charged to every group; on [`Decision::Wait`] to none, and the
    /// caller retries at the given instant or when its waker is called, whichever comes
    /// first.
    pub fn admit(&mut self, dir: Direction, bytes: u64, now: Instant) -> Decision {
        self.refresh();
        let a = active(&self.disk);
        let b = active(&self.shared);
        let decision = match (a, b) {
            (None, None) => return Decision::Go,
            (Some(x), None) | (None, Some(x)) => admit_one(x, dir, bytes, now, &mut self.wakes.0),
            (Some(x), Some(y)) if x.group().same(y.group()) => {
                admit_one(x, dir, bytes, now, &mut self.wakes.0)
            }
            (Some(x), Some(y)) => {
                let (first, second) = if x.group().seq() < y.group().seq() {
                    (x, y)
                } else {
                    (y, x)
                };
                admit_two(first, second, dir, bytes, now, &mut self.wakes.0)
            }
        };
        self.wakes.fire();
        decision
    }

    /// Gives up any place this queue holds in its groups' turn orders, e.g. when its
    /// pending requests were dropped. Waiting again later is fine.
    pub fn withdraw(&mut self) {
        let now = Instant::now();
        for m in [&self.disk, &self.shared].into_iter().flatten() {
            m.group()
                .state()
                .remove_from_turns(m.slot(), now, &mut self.wakes.0);
        }
        self.wakes.fire();
    }
}

/// The membership, if its group has limits (read without locking).
fn active(m: &Option<GroupMember>) -> Option<&GroupMember> {
    m.as_ref().filter(|m| m.group().is_enabled())
}

fn admit_one(
    m: &GroupMember,
    dir: Direction,
    bytes: u64,
    now: Instant,
    wakes: &mut Vec<MemberWaker>,
) -> Decision {
    let mut st = m.group().state();
    match st.evaluate(m.slot(), dir, now, wakes) {
        Verdict::Go => {
            st.commit_go(m.slot(), dir, bytes, now, wakes);
            Decision::Go
        }
        Verdict::Wait(deadline) => Decision::Wait(st.commit_wait(m.slot(), dir, deadline, now)),
    }
}

/// Admission through two different groups; `first` is locked first (lower sequence).
fn admit_two(
    first: &GroupMember,
    second: &GroupMember,
    dir: Direction,
    bytes: u64,
    now: Instant,
    wakes: &mut Vec<MemberWaker>,
) -> Decision {
    let mut s1 = first.group().state();
    let mut s2 = second.group().state();
    let v1 = s1.evaluate(first.slot(), dir, now, wakes);
    let v2 = s2.evaluate(second.slot(), dir, now, wakes);
    if v1 == Verdict::Go && v2 == Verdict::Go {
        s1.commit_go(first.slot(), dir, bytes, now, wakes);
        s2.commit_go(second.slot(), dir, bytes, now, wakes);
        return Decision::Go;
    }
    let mut retry = now;
    for (st, m, v) in [(&mut s1, first, v1), (&mut s2, second, v2)] {
        match v {
            Verdict::Wait(deadline) => {
                retry = retry.max(st.commit_wait(m.slot(), dir, deadline, now));
            }
            // Nothing is charged here; do not hold up this group's turn order while
            // waiting for the other group.
            Verdict::Go => st.defer(m.slot(), now, wakes),
        }
    }
    Decision::Wait(retry)
}
