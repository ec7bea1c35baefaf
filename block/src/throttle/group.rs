//! Throttle groups: one budget shared by members on different threads, handed out in
//! round-robin turns while it is exhausted.
//!
//! Fairness, after QEMU's throttle groups: while nobody waits, any member whose request
//! fits the buckets goes at once. A member told to wait joins the group's turn order
//! (one per direction when per-direction limits are set, else one for both). While the
//! turn order is not empty, only its head may be admitted: it waits for the buckets
//! (its own timer), is admitted once, leaves the turn order, and the next member
//! becomes head and is woken through its waker. The member just admitted keeps the turn
//! for further requests only while the buckets still have room (so a handover that takes
//! longer than a request's worth of budget wastes nothing); the moment it would have to
//! wait it goes to the back. Members behind the head are told to retry after a safety
//! deadline but normally hear from their waker first. A head that stays away for
//! [`STALL`] past its due time loses its turn, so a stuck or vanished member cannot
//! block the group.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::bucket::Buckets;
use super::limits::ThrottleLimits;
use super::{Direction, ThrottleError};
use crate::sync::lock;

/// How a group wakes a member whose turn has come: called without the group's lock
/// held, it should make the member's thread retry (e.g. write an eventfd it polls).
pub type MemberWaker = Arc<dyn Fn() + Send + Sync>;

/// How long past its due time a head may stay away before the next member gets the turn;
/// also how much later than the head members behind it retry on their own.
pub(crate) const STALL: Duration = Duration::from_millis(50);

/// Source of group sequence numbers, which fix the order in which groups are locked.
static NEXT_SEQ: AtomicU64 = AtomicU64::new(0);

struct Shared {
    id: String,
    seq: u64,
    /// Mirrors `state.buckets.enabled()` so unthrottled groups cost no lock.
    active: AtomicBool,
    state: Mutex<GroupState>,
}

/// A set of limits shared by its members (queues of one or more disks, possibly on
/// different threads). Cloning gives another handle to the same group.
#[derive(Clone)]
pub struct ThrottleGroup(Arc<Shared>);

/// Membership of one queue in a group; dropping it leaves the group.
pub struct GroupMember {
    group: ThrottleGroup,
    slot: usize,
}

struct Slot {
    waker: MemberWaker,
    /// The turn order this member waits in, if any.
    queued: Option<usize>,
}

/// What the group thinks of one request before anything is charged.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Verdict {
    /// The buckets have room and it is this member's turn.
    Go,
    /// Wait for the buckets until this instant (`Some`) or for this member's turn.
    Wait(Option<Instant>),
}

/// The lock-protected part of a group.
pub(crate) struct GroupState {
    limits: ThrottleLimits,
    buckets: Buckets,
    slots: Vec<Option<Slot>>,
    /// Turn orders: index 0 for both directions, or reads (0) and writes (1) when `split`.
    queues: [VecDeque<usize>; 2],
    /// When the current head's turn is due.
    head_due: [Option<Instant>; 2],
    /// The member admitted last from the turn order; it may go on while room remains.
    owner: [Option<usize>; 2],
    split: bool,
}

/// Whether per-direction limits are set, so reads and writes take turns separately.
fn is_split(limits: &ThrottleLimits) -> bool {
    limits.bps_read != 0 || limits.bps_write != 0 || limits.iops_read != 0 || limits.iops_write != 0
}

impl ThrottleGroup {
    /// Creates a group named `id` with `limits` (validated).
    pub fn new(id: impl Into<String>, limits: ThrottleLimits) -> Result<Self, ThrottleError> {
        limits.validate()?;
        let state = GroupState {
            buckets: Buckets::new(&limits),
            split: is_split(&limits),
            slots: Vec::new(),
            queues: Default::default(),
            head_due: [None; 2],
            owner: [None; 2],
            limits,
        };
        Ok(ThrottleGroup(Arc::new(Shared {
            id: id.into(),
            seq: NEXT_SEQ.fetch_add(1, Ordering::Relaxed),
            active: AtomicBool::new(state.buckets.enabled()),
            state: Mutex::new(state),
        })))
    }

    /// The group's name.
    pub fn id(&self) -> &str {
        &self.0.id
    }

    /// The current limits.
    pub fn limits(&self) -> ThrottleLimits {
        lock(&self.0.state).limits.clone()
    }

    /// Whether any limit is set.
    pub fn is_enabled(&self) -> bool {
        self.0.active.load(Ordering::Acquire)
    }

    /// Replaces the limits at run time (validated first; on error nothing changes).
    /// Bucket levels are kept within the new sizes, and every waiting member is woken to
    /// retry under the new limits.
    pub fn set_limits(&self, limits: ThrottleLimits) -> Result<(), ThrottleError> {
        limits.validate()?;
        let now = Instant::now();
        let mut wakes = Vec::new();
        {
            let mut st = lock(&self.0.state);
            st.buckets.configure(&limits, Some(now));
            let split = is_split(&limits);
            let enabled = st.buckets.enabled();
            let st = &mut *st;
            for q in 0..2 {
                for &m in &st.queues[q] {
                    if let Some(slot) = &st.slots[m] {
                        wakes.push(slot.waker.clone());
                    }
                }
                st.head_due[q] = st.queues[q].front().map(|_| now);
            }
            if split != st.split || !enabled {
                // The turn orders no longer match the limits: start afresh; everybody
                // woken re-queues on retry.
                for q in &mut st.queues {
                    q.clear();
                }
                for slot in st.slots.iter_mut().flatten() {
                    slot.queued = None;
                }
                st.head_due = [None; 2];
                st.owner = [None; 2];
            }
            st.split = split;
            st.limits = limits;
            self.0.active.store(enabled, Ordering::Release);
        }
        for w in wakes {
            w();
        }
        Ok(())
    }

    /// Adds a member; `waker` is called when the member should retry.
    pub fn join(&self, waker: MemberWaker) -> GroupMember {
        let mut st = lock(&self.0.state);
        let slot = Slot {
            waker,
            queued: None,
        };
        let idx = match st.slots.iter().position(Option::is_none) {
            Some(i) => {
                st.slots[i] = Some(slot);
                i
            }
            None => {
                st.slots.push(Some(slot));
                st.slots.len() - 1
            }
        };
        // Turn orders never hold more than every member: no allocation when they grow.
        let n = st.slots.len();
        for q in &mut st.queues {
            q.reserve(n.saturating_sub(q.len()));
        }
        drop(st);
        GroupMember {
            group: self.clone(),
            slot: idx,
        }
    }

    /// The group's sequence number: groups are locked in increasing order.
    pub(crate) fn seq(&self) -> u64 {
        self.0.seq
    }

    /// Locks the group's state.
    pub(crate) fn state(&self) -> MutexGuard<'_, GroupState> {
        lock(&self.0.state)
    }

    /// Whether both handles name the same group.
    pub(crate) fn same(&self, other: &ThrottleGroup) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl fmt::Debug for ThrottleGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThrottleGroup")
            .field("id", &self.0.id)
            .finish_non_exhaustive()
    }
}

impl GroupMember {
    /// The group this membership belongs to.
    pub fn group(&self) -> &ThrottleGroup {
        &self.group
    }

    /// This member's index inside the group.
    pub(crate) fn slot(&self) -> usize {
        self.slot
    }
}

impl fmt::Debug for GroupMember {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupMember")
            .field("group", &self.group.0.id)
            .field("slot", &self.slot)
            .finish()
    }
}

impl Drop for GroupMember {
    fn drop(&mut self) {
        let mut wakes = Vec::new();
        {
            let mut st = lock(&self.group.0.state);
            st.remove_from_turns(self.slot, Instant::now(), &mut wakes);
            for o in &mut st.owner {
                if *o == Some(self.slot) {
                    *o = None;
                }
            }
            st.slots[self.slot] = None;
        }
        for w in wakes {
            w();
        }
    }
}

impl GroupState {
    fn queue_of(&self, dir: Direction) -> usize {
        if self.split && dir == Direction::Write {
            1
        } else {
            0
        }
    }

    fn wake(&self, m: usize, wakes: &mut Vec<MemberWaker>) {
        if let Some(slot) = &self.slots[m] {
            wakes.push(slot.waker.clone());
        }
    }

    fn set_queued(&mut self, m: usize, q: Option<usize>) {
        if let Some(slot) = &mut self.slots[m] {
            slot.queued = q;
        }
    }

    fn queued(&self, m: usize) -> Option<usize> {
        self.slots[m].as_ref().and_then(|s| s.queued)
    }

    /// Takes `m` out of the turn order it waits in; if it was the head, the next member
    /// becomes head and is woken.
    pub(crate) fn remove_from_turns(
        &mut self,
        m: usize,
        now: Instant,
        wakes: &mut Vec<MemberWaker>,
    ) {
        let Some(q) = self.queued(m) else {
            return;
        };
        self.set_queued(m, None);
        let Some(pos) = self.queues[q].iter().position(|&x| x == m) else {
            return;
        };
        self.queues[q].remove(pos);
        if pos == 0 {
            self.promote_head(q, now, wakes);
        }
    }

    /// Makes the front of turn order `q` the head, due now, and wakes it.
    fn promote_head(&mut self, q: usize, now: Instant, wakes: &mut Vec<MemberWaker>) {
        match self.queues[q].front() {
            Some(&h) => {
                self.head_due[q] = Some(now);
                self.wake(h, wakes);
            }
            None => self.head_due[q] = None,
        }
    }

    /// Decides whether member `m` may start a request in `dir` now, without charging.
    /// A member whose turn it is not is put in the turn order.
    pub(crate) fn evaluate(
        &mut self,
        m: usize,
        dir: Direction,
        now: Instant,
        wakes: &mut Vec<MemberWaker>,
    ) -> Verdict {
        let q = self.queue_of(dir);
        if let Some(other) = self.queued(m)
            && other != q
        {
            self.remove_from_turns(m, now, wakes);
        }
        let head = self.queues[q].front().copied();
        if head.is_some() && head != Some(m) && self.owner[q] != Some(m) {
            if self.queued(m).is_none() {
                self.queues[q].push_back(m);
                self.set_queued(m, Some(q));
            }
            self.rotate_if_stale(q, now, wakes);
            if self.queues[q].front() != Some(&m) {
                self.buckets.leak(now);
                return Verdict::Wait(None);
            }
        }
        match self.buckets.check(dir, now) {
            None => Verdict::Go,
            Some(deadline) => Verdict::Wait(Some(deadline)),
        }
    }

    /// Gives the turn to the next member if the head is overdue by more than [`STALL`].
    /// The stale head loses its place (it may have nothing left to submit) and is woken;
    /// if it still wants to go it queues again at the back.
    fn rotate_if_stale(&mut self, q: usize, now: Instant, wakes: &mut Vec<MemberWaker>) {
        if self.queues[q].len() < 2 {
            return;
        }
        let Some(due) = self.head_due[q] else {
            return;
        };
        if now <= due.checked_add(STALL).unwrap_or(due) {
            return;
        }
        if let Some(h) = self.queues[q].pop_front() {
            self.set_queued(h, None);
            self.wake(h, wakes);
            self.promote_head(q, now, wakes);
        }
    }

    /// Charges an admitted request and passes the turn on.
    pub(crate) fn commit_go(
        &mut self,
        m: usize,
        dir: Direction,
        bytes: u64,
        now: Instant,
        wakes: &mut Vec<MemberWaker>,
    ) {
        self.buckets.charge(dir, bytes);
        let q = self.queue_of(dir);
        if self.queues[q].front() == Some(&m) {
            self.queues[q].pop_front();
            self.set_queued(m, None);
            self.owner[q] = Some(m);
            self.promote_head(q, now, wakes);
        }
    }

    /// Records that `m` waits (verdict `Wait(deadline)`) and returns when it should retry
    /// at the latest.
    pub(crate) fn commit_wait(
        &mut self,
        m: usize,
        dir: Direction,
        deadline: Option<Instant>,
        now: Instant,
    ) -> Instant {
        let q = self.queue_of(dir);
        if self.queued(m).is_none() {
            if self.queues[q].is_empty() {
                self.owner[q] = None;
            }
            self.queues[q].push_back(m);
            self.set_queued(m, Some(q));
        }
        if self.owner[q] == Some(m) {
            self.owner[q] = None;
        }
        if self.queues[q].front() == Some(&m) {
            let due = deadline.unwrap_or(now + STALL);
            self.head_due[q] = Some(due);
            due
        } else {
            self.head_due[q].unwrap_or(now).max(now) + STALL
        }
    }

    /// `m` could go here but waits for another group: it gives up its place here.
    pub(crate) fn defer(&mut self, m: usize, now: Instant, wakes: &mut Vec<MemberWaker>) {
        self.remove_from_turns(m, now, wakes);
    }

    /// Levels of bucket `i`, for tests.
    #[cfg(test)]
    pub(crate) fn level(&self, i: usize) -> (f64, f64) {
        self.buckets.level(i)
    }

    /// Members waiting in turn order `q`, for tests.
    #[cfg(test)]
    pub(crate) fn turns(&self, q: usize) -> Vec<usize> {
        self.queues[q].iter().copied().collect()
    }
}
