//! Our iothread's adapter to the [`Core`]: an epoll over the sources' eventfds (tokens
//! `slot * FDS + which`, see [`super::source::event_set`] for how each is watched) and the
//! control eventfd, through which commands arrive.

use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::loop_core::{Core, drain};
use super::source::{FDS, IoSource, event_set};
use super::{Command, Shared, lock};
use crate::config::IoThreadConfig;
use crate::virtio_blk::worker::DRAIN_TIMEOUT;

/// Token of the control eventfd.
const CONTROL: u64 = u64::MAX;

/// The loop's epoll, watching the control eventfd: made by the spawning thread, so that
/// a host that cannot give one (no file descriptors left) fails the spawn, not the loop.
pub(super) fn epoll_for(shared: &Shared) -> std::io::Result<Epoll> {
    let epoll = Epoll::new()?;
    epoll.ctl(
        ControlOperation::Add,
        shared.control.as_raw_fd(),
        EpollEvent::new(EventSet::IN, CONTROL),
    )?;
    Ok(epoll)
}

struct Loop<'a> {
    shared: &'a Shared,
    epoll: Epoll,
    core: Core<dyn IoSource>,
}

/// Runs on `epoll` (from [`epoll_for`]) until told to stop, then drains every queue.
pub(super) fn run(shared: &Shared, config: IoThreadConfig, epoll: Epoll) {
    let _span = tracing::info_span!("iothread", id = %shared.id).entered();
    let core = Core::new(&config, shared.counters.clone());
    core.enter();
    let mut l = Loop {
        shared,
        epoll,
        core,
    };
    let mut events = vec![EpollEvent::default(); 64];
    loop {
        let since = l.core.idle();
        let n = match l.epoll.wait(-1, &mut events) {
            Ok(n) => n,
            // io_uring task work interrupts waits; that is not an error.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(error = %e, "epoll_wait failed");
                continue;
            }
        };
        l.core.woke(since);
        let mut stop = false;
        for ev in &events[..n] {
            match ev.data() {
                CONTROL => stop |= l.control(),
                token => l.core.handle(token),
            }
        }
        l.core.finish_pass();
        if stop {
            break;
        }
    }
    l.core.drain_all(DRAIN_TIMEOUT);
}

impl Loop<'_> {
    /// Runs queued commands; returns true on Stop.
    fn control(&mut self) -> bool {
        let _ = self.shared.control.read();
        let commands: Vec<Command> = lock(&self.shared.commands).drain(..).collect();
        let mut stop = false;
        for command in commands {
            match command {
                Command::Add(source, reply) => {
                    let _ = reply.send(self.add(source));
                }
                Command::RemoveDevice(device, timeout, reply) => {
                    let _ = reply.send(self.remove_device(&device, timeout));
                }
                Command::Visit(device, op, reply) => {
                    let _ = reply.send(self.core.visit(&device, &op));
                }
                Command::Update(config) => self.core.configure(&config),
                Command::Stop => stop = true,
            }
        }
        stop
    }

    fn add(&mut self, source: Box<dyn IoSource>) -> std::io::Result<()> {
        let idx = self.core.free_slot();
        let fds = source.fds();
        let mut watched = Vec::with_capacity(FDS);
        for (which, fd) in fds.iter().enumerate() {
            let Some(fd) = *fd else { continue };
            let token = (idx * FDS + which) as u64;
            let event = EpollEvent::new(event_set(which), token);
            if let Err(e) = self.epoll.ctl(ControlOperation::Add, fd, event) {
                self.unwatch(&watched);
                return Err(e);
            }
            watched.push(fd);
        }
        self.core.insert(idx, source);
        Ok(())
    }

    fn unwatch(&self, fds: &[RawFd]) {
        for fd in fds {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, *fd, EpollEvent::default());
        }
    }

    fn remove_device(&mut self, device: &str, timeout: Duration) -> std::io::Result<usize> {
        let mut removed = 0;
        let mut result = Ok(());
        for idx in self.core.slots_of(device) {
            if let Some(mut source) = self.core.take(idx) {
                let fds: Vec<RawFd> = source.fds().into_iter().flatten().collect();
                self.unwatch(&fds);
                if let Err(e) = drain(&mut *source, timeout) {
                    result = Err(e);
                }
                removed += 1;
            }
        }
        result.map(|()| removed)
    }
}
