//! Talking to a VM process over its socket: VM-scoped calls routed to it (its answer,
//! status and JSON, passed on as it is) and its event stream relayed to vmmd's.

use std::path::PathBuf;
use std::time::Duration;

use tokio::runtime::Handle;

use crate::backend::{ApiError, ErrorBody, ErrorKind};
use crate::client::{Client, Pool, Reply};
use crate::events::{Event, EventBus};

/// Why a VM process did not answer.
#[derive(Debug)]
pub enum Unanswered {
    /// The socket could not be reached, or the exchange broke off.
    Unreachable(String),
    /// No answer in time.
    Timeout,
}

/// Sends `method path` (JSON `body`) to the VM process at `socket`, waiting at most
/// `timeout`. Blocks: call it off the async runtime.
pub fn call(
    rt: &Handle,
    pool: &Pool,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Reply, Unanswered> {
    rt.block_on(async {
        match tokio::time::timeout(timeout, pool.request(method, path, body)).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(e)) => Err(Unanswered::Unreachable(e.to_string())),
            Err(_) => Err(Unanswered::Timeout),
        }
    })
}

/// The API error a VM process answered with (its status and body, as they are).
pub fn answered_error(reply: &Reply) -> ApiError {
    let kind = match reply.status {
        400 => ErrorKind::BadRequest,
        403 => ErrorKind::Forbidden,
        404 => ErrorKind::NotFound,
        405 => ErrorKind::MethodNotAllowed,
        409 => ErrorKind::Conflict,
        413 => ErrorKind::PayloadTooLarge,
        503 => ErrorKind::Unavailable,
        _ => ErrorKind::Internal,
    };
    match serde_json::from_slice::<ErrorBody>(&reply.body) {
        Ok(b) => ApiError::new(kind, b.error).with_details(b.details),
        Err(_) => ApiError::new(
            kind,
            format!("the VM process answered {}: {}", reply.status, reply.text()),
        ),
    }
}

/// Relays the event stream of the VM process at `socket` to `bus` until it ends (the
/// process exits). Returns once the stream is open, so that no event sent after this
/// returns is missed.
pub fn relay_events(rt: &Handle, socket: PathBuf, bus: EventBus) -> Result<(), String> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    rt.spawn(async move {
        let client = Client::new(&socket);
        let mut lines = match client.stream("/api/v1/events").await {
            Ok((200, lines)) => {
                let _ = ready_tx.send(Ok(()));
                lines
            }
            Ok((status, _)) => {
                let _ = ready_tx.send(Err(format!("GET events answered {status}")));
                return;
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e.to_string()));
                return;
            }
        };
        while let Ok(Some(line)) = lines.next_line().await {
            match serde_json::from_str::<Event>(&line) {
                Ok(event) => bus.emit(event),
                Err(e) => tracing::warn!(%line, error = %e, "unreadable event from a VM process"),
            }
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| "the VM process's event stream did not open within 5 s".to_string())?
}
