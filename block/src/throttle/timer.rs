//! A one-shot timerfd (CLOCK_MONOTONIC, nanosecond resolution) to wake an iothread when
//! a throttled queue may retry.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

use super::ThrottleError;

/// A non-blocking one-shot timer whose fd becomes readable at the armed deadline.
#[derive(Debug)]
pub struct ThrottleTimer {
    fd: TimerFd,
}

fn timer_err(e: vmm_sys_util::errno::Error) -> ThrottleError {
    ThrottleError::Timer(e.into())
}

impl ThrottleTimer {
    /// Creates a disarmed timer.
    pub fn new() -> Result<Self, ThrottleError> {
        let fd = TimerFd::new().map_err(timer_err)?;
        let raw = fd.as_raw_fd();
        // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no memory is passed.
        let ok = unsafe {
            let flags = libc::fcntl(raw, libc::F_GETFL);
            flags >= 0 && libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) >= 0
        };
        if !ok {
            return Err(ThrottleError::Timer(io::Error::last_os_error()));
        }
        Ok(ThrottleTimer { fd })
    }

    /// Arms the timer to fire at `deadline` (replacing any earlier setting). A deadline
    /// now or in the past fires as soon as possible.
    pub fn arm_at(&mut self, deadline: Instant) -> Result<(), ThrottleError> {
        // Instant is CLOCK_MONOTONIC, as the timerfd. A zero duration would disarm it.
        let dur = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_nanos(1));
        self.fd.reset(dur, None).map_err(timer_err)
    }

    /// Stops the timer; a pending expiration that was not read stays readable.
    pub fn disarm(&mut self) -> Result<(), ThrottleError> {
        self.fd.clear().map_err(timer_err)
    }

    /// Reads (and so resets) the number of expirations since the last call, 0 if none.
    pub fn clear(&mut self) -> Result<u64, ThrottleError> {
        match self.fd.wait() {
            Ok(n) => Ok(n),
            Err(e) if e.errno() == libc::EAGAIN => Ok(0),
            Err(e) => Err(timer_err(e)),
        }
    }

    /// The fd to poll for readability.
    pub fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsRawFd for ThrottleTimer {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Polls the timer's fd for up to `ms` milliseconds; true if it became readable.
    fn poll_readable(t: &ThrottleTimer, ms: i32) -> bool {
        let mut pfd = libc::pollfd {
            fd: t.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        assert!(n >= 0, "poll: {}", io::Error::last_os_error());
        n == 1 && pfd.revents & libc::POLLIN != 0
    }

    #[test]
    fn fires_after_the_deadline() {
        let mut t = ThrottleTimer::new().unwrap();
        assert_eq!(t.clear().unwrap(), 0, "a fresh timer has not fired");
        let start = Instant::now();
        t.arm_at(start + Duration::from_micros(500)).unwrap();
        assert!(poll_readable(&t, 1000), "timer did not fire");
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_micros(500), "{elapsed:?}");
        assert!(elapsed < Duration::from_millis(100), "{elapsed:?}");
        assert_eq!(t.clear().unwrap(), 1);
        assert_eq!(t.clear().unwrap(), 0);
        assert!(!poll_readable(&t, 0));
    }

    #[test]
    fn past_deadline_fires_at_once() {
        let mut t = ThrottleTimer::new().unwrap();
        let past = Instant::now();
        std::thread::sleep(Duration::from_millis(2));
        let start = Instant::now();
        t.arm_at(past).unwrap();
        assert!(poll_readable(&t, 1000), "timer did not fire");
        assert!(start.elapsed() < Duration::from_millis(100));
        assert_eq!(t.clear().unwrap(), 1);
    }

    #[test]
    fn disarm_prevents_firing() {
        let mut t = ThrottleTimer::new().unwrap();
        t.arm_at(Instant::now() + Duration::from_millis(5)).unwrap();
        t.disarm().unwrap();
        assert!(!poll_readable(&t, 30));
        assert_eq!(t.clear().unwrap(), 0);
        // Re-arming after a disarm works.
        t.arm_at(Instant::now()).unwrap();
        assert!(poll_readable(&t, 1000));
    }
}
