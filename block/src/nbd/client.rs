//! An NBD disk's client: the parsed URI, the export as the handshake described it, and
//! its connections (one per queue when the server allows multi-conn, else one shared by
//! every queue), with the status `vm.counters` shows.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::conn::{ConnOptions, Connection, Link};
use super::proto::{ExportInfo, NbdError, flags};
use super::stream::Target;
use super::uri::NbdUri;

/// How to open an NBD disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NbdOptions {
    /// How long requests wait for a lost connection to come back (zero: never reconnect).
    pub reconnect_delay: Duration,
    /// Connections wanted (the disk's queue count); more than one only with multi-conn.
    pub connections: usize,
    /// Whether the disk writes.
    pub writable: bool,
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            reconnect_delay: Duration::from_secs(DEFAULT_RECONNECT_DELAY),
            connections: 1,
            writable: true,
        }
    }
}

/// The default `reconnect_delay` in seconds.
pub const DEFAULT_RECONNECT_DELAY: u64 = 5;

/// Why an NBD disk could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum NbdOpenError {
    /// The URI is malformed.
    #[error("{0}")]
    Uri(String),
    /// The server could not be reached, or the handshake failed.
    #[error("NBD server {server}: {source}")]
    Connect {
        /// The server's address.
        server: String,
        /// What went wrong.
        #[source]
        source: NbdError,
    },
    /// The export is unusable as asked.
    #[error("NBD server {server}, export {export:?}: {reason}")]
    Export {
        /// The server's address.
        server: String,
        /// The export.
        export: String,
        /// Why.
        reason: String,
    },
    /// A connection's threads could not start.
    #[error("NBD server {server}: cannot start the connection's threads: {source}")]
    Threads {
        /// The server's address.
        server: String,
        /// What the kernel said.
        #[source]
        source: std::io::Error,
    },
}

/// The state of an NBD disk's connections, as `vm.counters` reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum NbdLinkState {
    /// Every connection is up.
    #[default]
    Connected,
    /// A connection is down and being re-established.
    Reconnecting,
    /// A connection is down for good (reconnect_delay 0, or the export changed).
    Failed,
}

/// An NBD disk's connection status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NbdStatus {
    /// The server (`host:port` or `unix:PATH`).
    pub server: String,
    /// The export name.
    pub export: String,
    /// The worst state of its connections.
    pub state: NbdLinkState,
    /// Connections open to the server.
    pub connections: u32,
    /// Successful reconnects, all connections together.
    pub reconnects: u64,
    /// Why a connection last broke or a reconnect failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// An open NBD disk.
pub struct NbdClient {
    uri: NbdUri,
    info: ExportInfo,
    connections: Vec<Arc<Connection>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("uri", &self.uri)
            .field("info", &self.info)
            .field("connections", &self.connections.len())
            .finish()
    }
}

impl NbdClient {
    /// Parses `uri`, connects (one connection, or `options.connections` when the server
    /// allows multi-conn), runs the handshakes and starts the connections' threads.
    pub fn open(uri: &str, options: &NbdOptions) -> Result<NbdClient, NbdOpenError> {
        let uri: NbdUri = uri.parse().map_err(NbdOpenError::Uri)?;
        let server = uri.address.to_string();
        let connect_err = |source: NbdError| NbdOpenError::Connect {
            server: server.clone(),
            source,
        };
        let target = Target::resolve(&uri.address).map_err(|e| connect_err(NbdError::Io(e)))?;
        let (fd, info) = target.connect(&uri.export).map_err(connect_err)?;
        let export_err = |reason: String| NbdOpenError::Export {
            server: server.clone(),
            export: uri.export.clone(),
            reason,
        };
        if options.writable && info.has(flags::READ_ONLY) {
            return Err(export_err(
                "the export is read-only; open the disk with readonly: true".into(),
            ));
        }
        if info.size < 512 {
            return Err(export_err(format!(
                "the export has {} bytes, less than one sector",
                info.size
            )));
        }
        let wanted = if info.has(flags::CAN_MULTI_CONN) {
            options.connections.clamp(1, 64)
        } else {
            1
        };
        let conn_options = ConnOptions {
            reconnect_delay: options.reconnect_delay,
            writable: options.writable,
            name: format!("{server}/{}", uri.export),
        };
        let start = |fd, info| {
            Connection::start(
                fd,
                info,
                target.clone(),
                uri.export.clone(),
                conn_options.clone(),
            )
            .map(Arc::new)
            .map_err(|source| NbdOpenError::Threads {
                server: server.clone(),
                source,
            })
        };
        let mut connections = vec![start(fd, info)?];
        while connections.len() < wanted {
            let (fd, more) = target.connect(&uri.export).map_err(connect_err)?;
            super::conn::compatible(&info, &more, options.writable)
                .map_err(|why| export_err(format!("another connection to it differs: {why}")))?;
            connections.push(start(fd, info)?);
        }
        tracing::debug!(%server, export = %uri.export, size = info.size, flags = info.flags,
            connections = connections.len(), "NBD export opened");
        Ok(NbdClient {
            uri,
            info,
            connections,
            next: AtomicUsize::new(0),
        })
    }

    /// The export as the handshake described it.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// The URI it was opened from.
    pub fn uri(&self) -> &NbdUri {
        &self.uri
    }

    /// The connection for the next engine (round robin: one each while they last).
    pub fn connection(&self) -> Arc<Connection> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.connections.len();
        self.connections[i].clone()
    }

    /// The connections' state.
    pub fn status(&self) -> NbdStatus {
        let mut status = NbdStatus {
            server: self.uri.address.to_string(),
            export: self.uri.export.clone(),
            state: NbdLinkState::Connected,
            connections: 0,
            reconnects: 0,
            last_error: None,
        };
        for c in &self.connections {
            let s = c.status();
            status.reconnects += s.reconnects;
            if s.last_error.is_some() {
                status.last_error = s.last_error;
            }
            match s.link {
                Link::Connected => status.connections += 1,
                Link::Down if status.state == NbdLinkState::Connected => {
                    status.state = NbdLinkState::Reconnecting;
                }
                Link::Down => {}
                Link::Failed => status.state = NbdLinkState::Failed,
            }
        }
        status
    }
}
