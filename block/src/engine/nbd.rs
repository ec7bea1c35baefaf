//! The `nbd` engine: a disk's queue on an NBD connection ([`crate::nbd::conn`]). Pushing
//! stages ops; submitting queues the batch on the connection under one lock and, when
//! the socket is free, sends it with nonblocking `sendmsg`s (what the socket cannot take
//! at once goes to the connection's sender thread); completions come back through a
//! [`Sink`] whose eventfd is the notifier. The iothread makes no blocking call.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::engine::{EngineOp, IoEngine};
use crate::error::Error;
use crate::nbd::conn::{Connection, Sink};

/// An [`IoEngine`] over an NBD connection.
pub struct NbdEngine {
    conn: Arc<Connection>,
    sink: Arc<Sink>,
    /// Ops pushed and not yet submitted.
    staged: Vec<(u64, EngineOp)>,
    /// Ops submitted and not yet reaped.
    outstanding: usize,
    reaped: Vec<(u64, i64)>,
}

impl NbdEngine {
    /// An engine sending its ops on `conn`.
    // Boxed as `create_engine` wants it, like the other engines' constructors.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(conn: Arc<Connection>) -> Result<Box<dyn IoEngine>, Error> {
        Self::with_notifier(conn, None)
    }

    /// As [`NbdEngine::new`], signalling `notifier` (a duplicate) when given.
    pub fn with_notifier(
        conn: Arc<Connection>,
        notifier: Option<&EventFd>,
    ) -> Result<Box<dyn IoEngine>, Error> {
        let notifier =
            crate::engine::notifier_or_new(notifier).map_err(|source| Error::EngineSetup {
                engine: "nbd",
                source,
            })?;
        Ok(Box::new(NbdEngine {
            conn,
            sink: Arc::new(Sink::new(notifier)),
            staged: Vec::with_capacity(64),
            outstanding: 0,
            reaped: Vec::with_capacity(64),
        }))
    }

    fn take_completions(&mut self, done: &mut dyn FnMut(u64, i64)) {
        if self.outstanding == 0 || !self.sink.has_completions() {
            return;
        }
        self.sink.take(&mut self.reaped);
        self.outstanding = self.outstanding.saturating_sub(self.reaped.len());
        for (tag, result) in self.reaped.drain(..) {
            done(tag, result);
        }
    }
}

impl IoEngine for NbdEngine {
    fn name(&self) -> &'static str {
        "nbd"
    }

    unsafe fn push(&mut self, tag: u64, op: EngineOp) {
        self.staged.push((tag, op));
    }

    fn submit(&mut self) -> Result<(), Error> {
        if self.staged.is_empty() {
            return Ok(());
        }
        self.outstanding += self.staged.len();
        self.conn.submit(&self.sink, self.staged.drain(..));
        Ok(())
    }

    fn reap(&mut self, done: &mut dyn FnMut(u64, i64)) {
        // Clear first: a completion stored after this read signals again.
        let _ = self.sink.notifier().read();
        self.take_completions(done);
    }

    fn reap_ready(&mut self, done: &mut dyn FnMut(u64, i64)) {
        // The connection signals when it finds the sink empty, which it is after this.
        self.take_completions(done);
    }

    fn has_completions(&mut self) -> bool {
        self.sink.has_completions()
    }

    fn notifier(&self) -> &EventFd {
        self.sink.notifier()
    }

    fn in_flight(&self) -> usize {
        self.staged.len() + self.outstanding
    }
}

impl Drop for NbdEngine {
    /// Makes sure the connection no longer touches the buffers of unreaped ops.
    fn drop(&mut self) {
        if self.outstanding > 0 {
            self.conn.abandon(&self.sink);
        }
    }
}
