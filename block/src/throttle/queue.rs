//! The per-queue holding pen: requests wait here, in arrival order, until admitted.

use std::collections::VecDeque;
use std::time::Instant;

use super::{Decision, Direction, Throttle};

struct Pending<T> {
    item: T,
    /// Direction and size to charge; None for requests that wait their turn but cost
    /// nothing (a flush must not overtake the writes queued before it).
    charge: Option<(Direction, u64)>,
    /// When the pen first saw the item (see [`ThrottledQueue::pop_admitted`]).
    seen: Option<Instant>,
}

/// Requests of one queue waiting for the throttle, in arrival order. Only the head is
/// ever considered, so requests leave in the order they came; changing limits never
/// drops one.
pub struct ThrottledQueue<T> {
    items: VecDeque<Pending<T>>,
    /// How many items from the front have `seen` set.
    stamped: usize,
    next_wake: Option<Instant>,
    throttled_ns: u64,
}

impl<T> Default for ThrottledQueue<T> {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl<T> std::fmt::Debug for ThrottledQueue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThrottledQueue")
            .field("len", &self.items.len())
            .field("next_wake", &self.next_wake)
            .field("throttled_ns", &self.throttled_ns)
            .finish()
    }
}

impl<T> ThrottledQueue<T> {
    /// An empty pen with room for `capacity` requests before it allocates.
    pub fn with_capacity(capacity: usize) -> Self {
        ThrottledQueue {
            items: VecDeque::with_capacity(capacity),
            stamped: 0,
            next_wake: None,
            throttled_ns: 0,
        }
    }

    /// Appends a request moving `bytes` in `dir`.
    pub fn push(&mut self, item: T, dir: Direction, bytes: u64) {
        self.items.push_back(Pending {
            item,
            charge: Some((dir, bytes)),
            seen: None,
        });
    }

    /// Appends a request that keeps its place in line but is not charged (flushes,
    /// GET_ID): it leaves as soon as everything before it has.
    pub fn push_uncharged(&mut self, item: T) {
        self.items.push_back(Pending {
            item,
            charge: None,
            seen: None,
        });
    }

    /// Returns the oldest request if `throttle` admits it at `now` (it is then charged),
    /// else `None`, recording when to retry ([`next_wake`](Self::next_wake)). Call it
    /// until it returns `None`. A shared-group change posted for `throttle` is applied
    /// first, so the held requests are decided under the new group, in their order.
    ///
    /// Time throttled is measured from the first call that sees a request, so call this
    /// right after pushing.
    pub fn pop_admitted(&mut self, throttle: &mut Throttle, now: Instant) -> Option<T> {
        throttle.refresh();
        if !throttle.is_enabled() {
            // Unthrottled: nothing waits, nothing to time.
            let p = self.items.pop_front()?;
            self.stamped = self.stamped.saturating_sub(1);
            self.next_wake = None;
            return Some(p.item);
        }
        for p in self.items.range_mut(self.stamped..) {
            p.seen = Some(now);
        }
        self.stamped = self.items.len();
        let Some(head) = self.items.front() else {
            self.next_wake = None;
            return None;
        };
        let decision = match head.charge {
            Some((dir, bytes)) => throttle.admit(dir, bytes, now),
            None => Decision::Go,
        };
        match decision {
            Decision::Go => {
                let p = self.items.pop_front()?;
                self.stamped -= 1;
                self.next_wake = None;
                if let Some(seen) = p.seen {
                    let ns = now.saturating_duration_since(seen).as_nanos();
                    self.throttled_ns = self
                        .throttled_ns
                        .saturating_add(u64::try_from(ns).unwrap_or(u64::MAX));
                }
                Some(p.item)
            }
            Decision::Wait(at) => {
                self.next_wake = Some(at);
                None
            }
        }
    }

    /// When to retry, from the last [`pop_admitted`](Self::pop_admitted) that had to wait;
    /// `None` if it did not (or the pen is empty).
    pub fn next_wake(&self) -> Option<Instant> {
        self.next_wake
    }

    /// Number of requests waiting.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether no request waits.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Total nanoseconds requests spent here before admission, summed over requests.
    pub fn throttled_ns(&self) -> u64 {
        self.throttled_ns
    }

    /// Returns [`throttled_ns`](Self::throttled_ns) and resets it, to feed the disk's
    /// counters incrementally.
    pub fn take_throttled_ns(&mut self) -> u64 {
        std::mem::take(&mut self.throttled_ns)
    }

    /// Removes every waiting request, oldest first (for shutdown). Call
    /// [`Throttle::withdraw`] too if the throttle stays in use.
    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.stamped = 0;
        self.next_wake = None;
        self.items.drain(..).map(|p| p.item)
    }
}

#[cfg(test)]
mod uncharged_tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::throttle::{ThrottleGroup, ThrottleLimits};

    #[test]
    fn uncharged_items_keep_their_place_and_cost_nothing() {
        let limits = ThrottleLimits {
            iops_total: 100,
            ..Default::default()
        };
        let group = ThrottleGroup::new("g", limits).unwrap();
        let mut throttle = Throttle::new(Some(group.join(std::sync::Arc::new(|| {}))), None);
        let mut pen = ThrottledQueue::default();
        let t0 = Instant::now();
        // Use up the bucket (1 op of room at 100 IOPS with a 10 ms bucket).
        while throttle.admit(Direction::Write, 4096, t0) == Decision::Go {}
        pen.push("write", Direction::Write, 4096);
        pen.push_uncharged("flush");
        // The flush may not overtake the throttled write.
        assert_eq!(pen.pop_admitted(&mut throttle, t0), None);
        let later = t0 + Duration::from_secs(1);
        assert_eq!(pen.pop_admitted(&mut throttle, later), Some("write"));
        assert_eq!(pen.pop_admitted(&mut throttle, later), Some("flush"));
        // Flushes alone pass even while the bucket is empty.
        while throttle.admit(Direction::Write, 4096, later) == Decision::Go {}
        pen.push_uncharged("flush2");
        assert_eq!(pen.pop_admitted(&mut throttle, later), Some("flush2"));
    }
}
