//! The control loop: one thread, waiting in epoll on the eventfd every VM of the backend
//! writes when its guest ends it (poweroff, reset, failure) or ejects a disk, and
//! handling that at once (docs/architecture.md).

use std::os::fd::AsRawFd;
use std::sync::{Arc, Weak};

use block::sync::lock;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::KvmBackend;
use crate::events::EventBus;

/// How often the loop checks that its backend still exists (it holds only a weak
/// reference, so that dropping the backend ends it).
const ALIVE_CHECK_MS: i32 = 1000;

impl KvmBackend {
    /// A backend whose VMs are watched by a control loop (thread `vm-control`): what a
    /// guest does is handled the moment it happens, without an API call, and sent to
    /// `events`. The thread ends within a second of the backend being dropped.
    pub fn with_control_loop(events: EventBus) -> std::io::Result<Arc<Self>> {
        let notify = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            notify.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )?;
        let backend = Arc::new(KvmBackend {
            events,
            notify: Some(notify.clone()),
            ..Default::default()
        });
        let weak = Arc::downgrade(&backend);
        std::thread::Builder::new()
            .name("vm-control".into())
            .spawn(move || {
                block::thread_class::started(block::thread_class::ThreadClass::Control);
                run(&epoll, &notify, &weak);
            })?;
        Ok(backend)
    }

    /// Looks at every VM: what its guest did since the last look is handled and sent.
    fn look_at_vms(&self) {
        for slot in self.slots() {
            let mut e = lock(&slot.entry);
            if e.removed {
                continue;
            }
            e.refresh();
            slot.settle(&mut e, &self.events);
        }
    }
}

fn run(epoll: &Epoll, notify: &EventFd, backend: &Weak<KvmBackend>) {
    let mut ready = [EpollEvent::default(); 1];
    loop {
        match epoll.wait(ALIVE_CHECK_MS, &mut ready) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!(error = %e, "control loop: epoll failed; VMs are looked at only on API calls from now on");
                return;
            }
        }
        // Reset the counter first: a wake-up during the look is not lost.
        let _ = notify.read();
        let Some(backend) = backend.upgrade() else {
            return;
        };
        backend.look_at_vms();
    }
}
