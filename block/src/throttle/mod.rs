//! I/O throttling: QEMU's leaky buckets and names, throttle groups shared by queues on
//! different threads, a per-queue holding pen and a timerfd to wake up on.
//!
//! How the pieces meet on an iothread:
//!
//! - Every disk has a [`ThrottleGroup`] of its own (its `throttle` limits; its queues are
//!   the members) and may in addition belong to a shared group (`throttle_group`).
//! - Each queue holds a [`Throttle`] (its memberships), a [`ThrottledQueue`] of requests
//!   not yet admitted, and a [`ThrottleTimer`] registered in the iothread's epoll. The
//!   member's waker (given to [`ThrottleGroup::join`]) makes the iothread look at the
//!   queue again, e.g. by writing an eventfd it polls.
//! - For each new request the iothread calls [`ThrottledQueue::push`], then takes
//!   requests with [`ThrottledQueue::pop_admitted`] until it returns `None`, and arms
//!   the timer at [`ThrottledQueue::next_wake`]. It repeats this when the timer fires or
//!   the waker is called.
//!
//! - To move a running queue to another shared group, the control plane posts the change
//!   in the queue's [`GroupSwitch`] (given to [`Throttle::with_switch`]); the queue's
//!   thread applies it at its next admission and keeps every held request in order.
//!
//! Time is always passed in as `now` so the maths can be tested with a simulated clock.

mod admit;
mod bucket;
mod group;
mod limits;
mod queue;
mod switch;
mod timer;

#[cfg(test)]
mod tests;

use std::io;
use std::time::Instant;

pub use admit::Throttle;
pub use group::{GroupMember, MemberWaker, ThrottleGroup};
pub use limits::ThrottleLimits;
pub use queue::ThrottledQueue;
pub use switch::GroupSwitch;
pub use timer::ThrottleTimer;

/// Direction of a throttled request. Flushes and other requests that move no data are
/// not throttled by callers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Guest reads from the disk.
    Read,
    /// Guest writes to the disk (write-zeroes and discard count as writes if throttled).
    Write,
}

/// The answer to a request for admission.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The request may start now; it has been charged.
    Go,
    /// Not now: retry at this instant at the latest. A member waiting for its turn may be
    /// woken earlier through its waker.
    Wait(Instant),
}

/// Errors of the throttling module.
#[derive(Debug, thiserror::Error)]
pub enum ThrottleError {
    /// A limit is out of range or contradicts another.
    #[error("invalid throttle limit {field}: {reason}")]
    InvalidLimit {
        /// The offending field, e.g. `iops_total_max`.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The timerfd could not be created or set.
    #[error("throttle timer: {0}")]
    Timer(#[source] io::Error),
}
