//! The NBD wire protocol, client side (the NBD project's `doc/proto.md`): the
//! fixed-newstyle handshake with `NBD_OPT_GO`, and the transmission phase's requests and
//! simple replies as a codec without I/O (requests encode into a buffer; replies are cut
//! from bytes as they arrive), so that an engine can drive the socket however it likes.

use std::io::{Read, Write};

/// Server greeting: `NBDMAGIC`.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// Newstyle negotiation: `IHAVEOPT`.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Option reply magic.
pub const REPLY_MAGIC_OPT: u64 = 0x0003_e889_0455_65a9;
/// Request magic.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Simple reply magic.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Handshake flag: no 124 bytes of zeroes after the export info.
pub const FLAG_NO_ZEROES: u16 = 2;

/// `NBD_OPT_GO`.
pub const OPT_GO: u32 = 7;
/// `NBD_REP_ACK`.
pub const REP_ACK: u32 = 1;
/// `NBD_REP_INFO`.
pub const REP_INFO: u32 = 3;
/// Replies with this bit are errors.
pub const REP_ERR: u32 = 1 << 31;
/// `NBD_INFO_EXPORT`: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags of an export.
pub mod flags {
    /// The other flags are valid.
    pub const HAS_FLAGS: u16 = 1;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA` is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// Several connections see each other's writes (and flushes).
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
}

/// A request's command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read = 0,
    /// `NBD_CMD_WRITE` (followed by the data).
    Write = 1,
    /// `NBD_CMD_DISC`: the client goes away.
    Disconnect = 2,
    /// `NBD_CMD_FLUSH`.
    Flush = 3,
    /// `NBD_CMD_TRIM` (discard).
    Trim = 4,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes = 6,
}

/// `NBD_CMD_FLAG_FUA`: the write is durable when it is answered.
pub const CMD_FLAG_FUA: u16 = 1;

/// Size of a request header.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// The largest read or write one request carries here (servers commonly take 32 MiB).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// Errors of the NBD protocol (not of the requests, which get an errno each).
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The socket failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The server does not speak the protocol we do.
    #[error("not an NBD server (or a version we do not speak): {0}")]
    Protocol(String),
    /// The server refused the export.
    #[error("the server refused export {export:?}: {reason}")]
    Refused {
        /// The export.
        export: String,
        /// The server's reason (error name and message).
        reason: String,
    },
}

/// What the handshake learnt of the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags ([`flags`]).
    pub flags: u16,
    /// Minimum block size (1 when the server does not say).
    pub min_block: u32,
    /// Preferred block size (4096 when the server does not say).
    pub preferred_block: u32,
    /// Largest request payload (the smaller of the server's and [`MAX_PAYLOAD`]).
    pub max_payload: u32,
}

impl ExportInfo {
    /// Whether the server set `flag`.
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flags::HAS_FLAGS != 0 && self.flags & flag != 0
    }
}

fn read_exact<const N: usize>(r: &mut impl Read) -> Result<[u8; N], NbdError> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

/// The name of an option reply error.
fn rep_error_name(t: u32) -> &'static str {
    match t & !REP_ERR {
        1 => "NBD_REP_ERR_UNSUP",
        2 => "NBD_REP_ERR_POLICY",
        3 => "NBD_REP_ERR_INVALID",
        4 => "NBD_REP_ERR_PLATFORM",
        5 => "NBD_REP_ERR_TLS_REQD",
        6 => "NBD_REP_ERR_UNKNOWN (no such export)",
        7 => "NBD_REP_ERR_SHUTDOWN",
        8 => "NBD_REP_ERR_BLOCK_SIZE_REQD",
        9 => "NBD_REP_ERR_TOO_BIG",
        _ => "an unknown error",
    }
}

/// Longest option reply accepted (a server's message or info).
const MAX_OPTION_REPLY: u32 = 64 << 10;

/// Runs the fixed-newstyle handshake on `stream` for `export` with `NBD_OPT_GO` (asking
/// for the block size constraints); on success the stream is in the transmission phase.
pub fn handshake(stream: &mut (impl Read + Write), export: &str) -> Result<ExportInfo, NbdError> {
    let bad = |s: String| NbdError::Protocol(s);
    let magic = u64::from_be_bytes(read_exact(stream)?);
    if magic != NBD_MAGIC {
        return Err(bad(format!("greeting magic {magic:#x}")));
    }
    let opt = u64::from_be_bytes(read_exact(stream)?);
    if opt != IHAVEOPT {
        return Err(bad(format!(
            "oldstyle or unknown negotiation ({opt:#x}); only fixed newstyle is spoken"
        )));
    }
    let server_flags = u16::from_be_bytes(read_exact(stream)?);
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(bad("the server does not speak fixed newstyle".into()));
    }
    let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (server_flags & FLAG_NO_ZEROES));
    let name = export.as_bytes();
    let name_len = u32::try_from(name.len()).map_err(|_| bad("export name too long".into()))?;
    let mut go = Vec::with_capacity(32 + name.len());
    go.extend_from_slice(&client_flags.to_be_bytes());
    go.extend_from_slice(&IHAVEOPT.to_be_bytes());
    go.extend_from_slice(&OPT_GO.to_be_bytes());
    go.extend_from_slice(&(name_len + 4 + 2 + 2).to_be_bytes());
    go.extend_from_slice(&name_len.to_be_bytes());
    go.extend_from_slice(name);
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    stream.write_all(&go)?;
    stream.flush()?;
    let mut export_info: Option<(u64, u16)> = None;
    let mut blocks = (1u32, 4096u32, MAX_PAYLOAD);
    loop {
        let magic = u64::from_be_bytes(read_exact(stream)?);
        let option = u32::from_be_bytes(read_exact(stream)?);
        let kind = u32::from_be_bytes(read_exact(stream)?);
        let len = u32::from_be_bytes(read_exact(stream)?);
        if magic != REPLY_MAGIC_OPT || option != OPT_GO {
            return Err(bad(format!(
                "option reply magic {magic:#x} for option {option}"
            )));
        }
        if len > MAX_OPTION_REPLY {
            return Err(bad(format!("option reply of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        stream.read_exact(&mut data)?;
        match kind {
            REP_ACK => break,
            REP_INFO => {
                let info = data.get(..2).map(|b| u16::from_be_bytes([b[0], b[1]]));
                match (info, data.len()) {
                    (Some(INFO_EXPORT), 12) => {
                        let size = u64::from_be_bytes(data[2..10].try_into().unwrap_or_default());
                        let fl = u16::from_be_bytes([data[10], data[11]]);
                        export_info = Some((size, fl));
                    }
                    (Some(INFO_BLOCK_SIZE), 14) => {
                        let word = |i: usize| {
                            u32::from_be_bytes(data[i..i + 4].try_into().unwrap_or_default())
                        };
                        blocks = (word(2), word(6), word(10).min(MAX_PAYLOAD));
                    }
                    (Some(INFO_EXPORT | INFO_BLOCK_SIZE), n) => {
                        return Err(bad(format!("info reply of {n} bytes")));
                    }
                    _ => {} // Other infos are not asked for; ignore them.
                }
            }
            k if k & REP_ERR != 0 => {
                let message = String::from_utf8_lossy(&data).into_owned();
                return Err(NbdError::Refused {
                    export: export.to_string(),
                    reason: if message.is_empty() {
                        rep_error_name(k).to_string()
                    } else {
                        format!("{}: {message}", rep_error_name(k))
                    },
                });
            }
            other => return Err(bad(format!("unexpected option reply type {other}"))),
        }
    }
    let (size, flags) = export_info
        .ok_or_else(|| bad("NBD_OPT_GO acknowledged without the export's size".into()))?;
    let (min_block, preferred_block, max_payload) = blocks;
    if min_block == 0 || !min_block.is_power_of_two() || min_block > 65536 {
        return Err(bad(format!("minimum block size {min_block}")));
    }
    Ok(ExportInfo {
        size,
        flags,
        min_block,
        preferred_block: preferred_block.max(min_block),
        max_payload: max_payload.max(min_block),
    })
}

/// One request (the header; a write's data follows it on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// What to do.
    pub command: Command,
    /// [`CMD_FLAG_FUA`] or 0.
    pub flags: u16,
    /// Matches the reply to the request.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

impl Request {
    /// Appends the 28-byte header to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&(self.command as u16).to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        out.extend_from_slice(&self.length.to_be_bytes());
    }
}

/// A simple reply's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplyHeader {
    /// 0, or the server's errno for the request (NBD's values are Linux's).
    pub error: u32,
    /// The request it answers.
    pub cookie: u64,
}

impl ReplyHeader {
    /// Parses the 16-byte header of a simple reply.
    pub fn parse(b: &[u8; SIMPLE_REPLY_LEN]) -> Result<ReplyHeader, NbdError> {
        let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(NbdError::Protocol(format!(
                "reply magic {magic:#x} (structured replies were not asked for)"
            )));
        }
        Ok(ReplyHeader {
            error: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            cookie: u64::from_be_bytes(b[8..16].try_into().unwrap_or_default()),
        })
    }
}

#[cfg(test)]
mod tests;
