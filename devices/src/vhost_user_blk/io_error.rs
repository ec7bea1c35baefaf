//! The error policy of a vhost-user backend's disk: where a stop means the backend
//! stops serving the disk's queues (failed requests held, new ones left in the rings)
//! until `disk.resume` ([`Backend::resume_io_error`]); the frontend's guest sees no
//! error. Only a backend with a control plane that can resume it stops
//! ([`Backend::enable_io_error_stops`]); otherwise `stop` acts as `report`.

use crate::iothread::SourceOp;
use crate::virtio_blk::io_error::IoStatus;

use super::backend::Backend;

impl Backend {
    /// Lets the disk's error policy stop it: the caller (the disk API) will resume it.
    pub fn enable_io_error_stops(&self) {
        self.device().io_error().set_resumable(true);
    }

    /// What stopped the disk, while an I/O error keeps it stopped.
    pub fn io_status(&self) -> Option<IoStatus> {
        self.device().io_error().status()
    }

    /// Serves the disk again after an I/O error stopped it: each queue retries the
    /// requests it held, oldest first, then takes what waited in its ring. `None` when
    /// the disk was not stopped.
    pub fn resume_io_error(&self) -> Option<IoStatus> {
        let status = self.device().io_error().resume()?;
        tracing::info!(disk = %self.device().id(), op = %status.op, error = %status.error,
            held = status.count, "resuming a disk stopped on an I/O error");
        for t in &self.threads {
            match t.visit_queues(self.device().id(), &SourceOp::RetryHeld) {
                Ok(_) => t.wake(),
                Err(e) => {
                    tracing::warn!(disk = %self.device().id(), error = %e, "retry after an I/O error")
                }
            }
        }
        Some(status)
    }
}
