//! The virtqueue of a vhost-user frontend as a [`QueueHost`] for the shared queue worker.

use std::io;

use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{Queue, QueueT};

use crate::virtio_blk::GuestMem;
use crate::virtio_blk::worker::QueueHost;

/// One vring of a vhost-user session. The frontend's control messages change it at any
/// time (addresses, call fd, ready flag), so every access goes through its lock and the
/// call fd is looked up at signalling time, never cached.
#[derive(Clone)]
pub struct VringHost(VringRwLock<GuestMem>);

impl VringHost {
    /// Wraps the library's vring.
    pub fn new(vring: VringRwLock<GuestMem>) -> Self {
        VringHost(vring)
    }
}

impl QueueHost for VringHost {
    fn with_queue<R>(&mut self, f: impl FnOnce(&mut Queue) -> R) -> R {
        let mut state = self.0.get_mut();
        f(state.get_queue_mut())
    }

    fn signal(&mut self) -> io::Result<()> {
        // Without a call fd (between GET_VRING_BASE and the next SET_VRING_CALL) this is
        // a silent Ok.
        self.0.signal_used_queue()
    }

    /// Whether the frontend has enabled the ring (SET_VRING_ENABLE) and it is ready.
    fn is_live(&self) -> bool {
        let state = self.0.get_ref();
        state.is_enabled() && state.get_queue().ready()
    }
}
