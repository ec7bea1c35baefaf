//! A small HTTP/1.1 client over the service's Unix socket (hyper), used by `vmctl` and
//! the tests. One connection per request.

use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;

/// Errors of talking to the service (not errors the service answered with).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be connected.
    #[error("cannot connect to {path}: {source} (is vmmd running?)")]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("HTTP error: {0}")]
    Http(#[from] hyper::Error),
    /// The request could not be built.
    #[error("bad request: {0}")]
    Request(#[from] hyper::http::Error),
    /// The reply, or one line of a stream, is larger than a client takes.
    #[error("the reply is larger than {0} bytes")]
    TooLarge(usize),
}

/// Largest reply body read (a VM's info or counters are a few KiB).
pub const MAX_REPLY_BYTES: usize = 16 << 20;
/// Longest line of a stream read.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// A response: status and body.
#[derive(Clone, Debug)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// The body.
    pub body: Vec<u8>,
}

impl Reply {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON (`Null` when empty or not JSON).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// Whether the status is 2xx.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// A client for the service at one socket.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// A client for the socket at `socket`.
    pub fn new(socket: impl AsRef<Path>) -> Self {
        Client {
            socket: socket.as_ref().to_path_buf(),
        }
    }

    /// Sends `method path` (path with query) with an optional JSON body.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Reply, ClientError> {
        let (mut sender, conn) = connect(&self.socket).await?;
        let res = sender
            .send_request(build_request(method, path, body)?)
            .await?;
        let reply = read_reply(res).await?;
        drop(sender);
        // The connection ends with the request; its result adds nothing.
        let _ = conn.await;
        Ok(reply)
    }

    /// Sends `GET path` and returns the status and the body as it arrives, for endpoints
    /// that stream (`events`). Read it with [`Lines`].
    pub async fn stream(&self, path: &str) -> Result<(u16, Lines), ClientError> {
        // The connection lives as long as its body is read.
        let (mut sender, _conn) = connect(&self.socket).await?;
        let res = sender
            .send_request(build_request("GET", path, None)?)
            .await?;
        let status = res.status().as_u16();
        Ok((
            status,
            Lines {
                body: res.into_body(),
                buf: Vec::new(),
            },
        ))
    }

    /// The same as [`Client::request`] on a private single-threaded runtime.
    pub fn request_blocking(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Reply, ClientError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| ClientError::Connect {
                path: self.socket.clone(),
                source,
            })?;
        rt.block_on(self.request(method, path, body))
    }
}

/// The lines of a streamed body (see [`Client::stream`]).
pub struct Lines {
    body: hyper::body::Incoming,
    buf: Vec<u8>,
}

impl Lines {
    /// The next whole line (without its `\n`; lossy UTF-8), or `None` once the body has
    /// ended (a last line without `\n` is returned first).
    pub async fn next_line(&mut self) -> Result<Option<String>, ClientError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Ok(Some(
                    String::from_utf8_lossy(&line[..line.len() - 1]).into_owned(),
                ));
            }
            if self.buf.len() > MAX_LINE_BYTES {
                return Err(ClientError::TooLarge(MAX_LINE_BYTES));
            }
            match self.body.frame().await {
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                None if self.buf.is_empty() => return Ok(None),
                None => {
                    let rest = std::mem::take(&mut self.buf);
                    return Ok(Some(String::from_utf8_lossy(&rest).into_owned()));
                }
            }
        }
    }
}

/// How many idle connections a [`Pool`] keeps.
const POOL_IDLE: usize = 8;

/// Requests to one socket over kept-alive connections: an idle one is reused, else a
/// new one made (vmmd routes every VM-scoped call to a VM process this way).
pub struct Pool {
    socket: PathBuf,
    idle: std::sync::Mutex<Vec<hyper::client::conn::http1::SendRequest<Full<Bytes>>>>,
}

impl Pool {
    /// A pool for the socket at `socket` (no connection yet).
    pub fn new(socket: impl AsRef<Path>) -> Self {
        Pool {
            socket: socket.as_ref().to_path_buf(),
            idle: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Drops every idle connection (the process behind the socket changed).
    pub fn clear(&self) {
        block::sync::lock(&self.idle).clear();
    }

    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ClientError> {
        Ok(connect(&self.socket).await?.0)
    }

    /// An idle connection that is still open, if any.
    async fn reuse(&self) -> Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
        loop {
            let mut s = block::sync::lock(&self.idle).pop()?;
            if s.ready().await.is_ok() {
                return Some(s);
            }
        }
    }

    /// Sends `method path` with an optional JSON body. A request that an idle connection
    /// could not carry (it was closed meanwhile) goes again on a new one when it had not
    /// been sent, or is a GET.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Reply, ClientError> {
        let (mut sender, reused) = match self.reuse().await {
            Some(s) => (s, true),
            None => (self.connect().await?, false),
        };
        let res = match sender
            .send_request(build_request(method, path, body.clone())?)
            .await
        {
            Ok(res) => res,
            Err(e) if reused && (e.is_canceled() || method == "GET") => {
                sender = self.connect().await?;
                sender
                    .send_request(build_request(method, path, body)?)
                    .await?
            }
            Err(e) => return Err(e.into()),
        };
        let reply = read_reply(res).await?;
        let mut idle = block::sync::lock(&self.idle);
        if !sender.is_closed() && idle.len() < POOL_IDLE {
            idle.push(sender);
        }
        Ok(reply)
    }
}

/// The connection task a [`connect`] runs (it ends when the connection does).
type ConnTask = tokio::task::JoinHandle<Result<(), hyper::Error>>;

/// A new HTTP/1.1 connection to `socket`, its task running on the runtime.
async fn connect(
    socket: &Path,
) -> Result<
    (
        hyper::client::conn::http1::SendRequest<Full<Bytes>>,
        ConnTask,
    ),
    ClientError,
> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::Connect {
            path: socket.to_path_buf(),
            source,
        })?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    Ok((sender, tokio::spawn(conn)))
}

/// `method path` with an optional JSON body.
fn build_request(
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<hyper::Request<Full<Bytes>>, ClientError> {
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "localhost");
    if body.is_some() {
        req = req.header(hyper::header::CONTENT_TYPE, "application/json");
    }
    Ok(req.body(Full::new(Bytes::from(body.unwrap_or_default())))?)
}

/// The status and the whole body of `res` (at most [`MAX_REPLY_BYTES`]).
async fn read_reply(res: hyper::Response<hyper::body::Incoming>) -> Result<Reply, ClientError> {
    let status = res.status().as_u16();
    let body = http_body_util::Limited::new(res.into_body(), MAX_REPLY_BYTES)
        .collect()
        .await
        .map_err(|e| match e.downcast::<hyper::Error>() {
            Ok(e) => ClientError::Http(*e),
            Err(_) => ClientError::TooLarge(MAX_REPLY_BYTES),
        })?
        .to_bytes()
        .to_vec();
    Ok(Reply { status, body })
}
