//! How one engine op becomes NBD requests ("parts"): reads and writes cut at the export's
//! largest payload, discard and write-zeroes likewise, a FUA write turned into a write and
//! a flush where the server has no FUA, write-zeroes sent as writes of zeroes where the
//! server lacks the command, and what the server cannot do at all answered at once.

use std::collections::VecDeque;

use super::proto::{CMD_FLAG_FUA, Command, ExportInfo, flags};
use crate::engine::{EngineOp, IoVecs};

/// One NBD request of an op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Part {
    /// The op's slot in the connection.
    pub slot: usize,
    /// The command sent.
    pub command: Command,
    /// Command flags ([`CMD_FLAG_FUA`]).
    pub flags: u16,
    /// Byte offset on the export.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
    /// Where the part's data starts within the op's buffers.
    pub data_start: u64,
    /// A write whose data is zeroes (write-zeroes on a server without the command).
    pub zeroes: bool,
}

/// What an op needs: how many parts it sent to the queue, whether a flush follows them,
/// and what it answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    /// `parts` requests were appended (then a flush when `flush_after`); success answers
    /// `bytes`.
    Send {
        /// How many requests were appended.
        parts: usize,
        /// A FLUSH follows once every part succeeded (FUA without server FUA).
        flush_after: bool,
        /// The byte count a success reports.
        bytes: u64,
    },
    /// Nothing to send: answer `result` at once.
    Done(i64),
}

/// The largest zero-filled write sent for an emulated write-zeroes.
pub const ZERO_CHUNK: u32 = 1 << 20;

/// Plans `op` for the export `info`, appending its requests (each tagged with `slot`) to
/// `out`, the connection's queue: no allocation per request.
pub fn plan(op: &EngineOp, info: &ExportInfo, slot: usize, out: &mut VecDeque<Part>) -> Plan {
    let align_down = |n: u32| (n / info.min_block).max(1) * info.min_block;
    let max_data = align_down(info.max_payload);
    let mut cut = |command: Command, fl: u16, offset: u64, len: u64, chunk: u32, zeroes: bool| {
        let before = out.len();
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(u64::from(chunk));
            out.push_back(Part {
                slot,
                command,
                flags: fl,
                offset: offset + done,
                // `n` is at most `chunk`, a u32.
                length: u32::try_from(n).unwrap_or(chunk),
                data_start: done,
                zeroes,
            });
            done += n;
        }
        out.len() - before
    };
    let send = |parts: usize, flush_after: bool, bytes: u64| match parts {
        0 => Plan::Done(0),
        _ => Plan::Send {
            parts,
            flush_after,
            bytes,
        },
    };
    match *op {
        EngineOp::Read { offset, iovecs } => {
            let len = iovecs.total_len();
            send(
                cut(Command::Read, 0, offset, len, max_data, false),
                false,
                len,
            )
        }
        EngineOp::Write {
            offset,
            iovecs,
            fua,
        } => {
            let server_fua = fua && info.has(flags::SEND_FUA);
            let fl = if server_fua { CMD_FLAG_FUA } else { 0 };
            let flush_after = fua && !server_fua && info.has(flags::SEND_FLUSH);
            let len = iovecs.total_len();
            send(
                cut(Command::Write, fl, offset, len, max_data, false),
                flush_after,
                len,
            )
        }
        EngineOp::Flush if info.has(flags::SEND_FLUSH) => {
            out.push_back(flush_part(slot));
            send(1, false, 0)
        }
        // A server that takes no flush has no cache to flush.
        EngineOp::Flush => Plan::Done(0),
        EngineOp::Discard { offset, len } if info.has(flags::SEND_TRIM) => send(
            cut(Command::Trim, 0, offset, len, max_data, false),
            false,
            0,
        ),
        // Discard is advisory: without server support it does nothing.
        EngineOp::Discard { .. } => Plan::Done(0),
        EngineOp::WriteZeroes { offset, len } if info.has(flags::SEND_WRITE_ZEROES) => send(
            cut(Command::WriteZeroes, 0, offset, len, max_data, false),
            false,
            0,
        ),
        EngineOp::WriteZeroes { offset, len } => {
            let chunk = align_down(ZERO_CHUNK.min(max_data));
            send(cut(Command::Write, 0, offset, len, chunk, true), false, 0)
        }
    }
}

/// The FLUSH request of `slot`.
pub fn flush_part(slot: usize) -> Part {
    Part {
        slot,
        command: Command::Flush,
        flags: 0,
        offset: 0,
        length: 0,
        data_start: 0,
        zeroes: false,
    }
}

/// Whether the part carries data from the client (a write).
pub fn sends_data(part: &Part) -> bool {
    part.command == Command::Write
}

/// Appends to `out` the iovecs covering `len` bytes of `iovecs` from byte `start`
/// (fewer bytes if the buffers end first).
pub fn sub_iovecs(iovecs: &[libc::iovec], start: u64, len: u64, out: &mut Vec<libc::iovec>) {
    let mut skip = start;
    let mut want = len;
    for v in iovecs {
        if want == 0 {
            break;
        }
        let vlen = v.iov_len as u64;
        if skip >= vlen {
            skip -= vlen;
            continue;
        }
        let n = (vlen - skip).min(want);
        // `skip` and `n` are within this buffer's length, a usize.
        let (skip_b, n_b) = (
            usize::try_from(skip).unwrap_or(0),
            usize::try_from(n).unwrap_or(0),
        );
        out.push(libc::iovec {
            // SAFETY: `skip < iov_len`: the pointer stays inside the same buffer.
            iov_base: unsafe { v.iov_base.cast::<u8>().add(skip_b) }.cast(),
            iov_len: n_b,
        });
        skip = 0;
        want -= n;
    }
}

/// 64 KiB of zeroes, the source of emulated write-zeroes.
pub static ZEROES: [u8; 65536] = [0; 65536];

/// Appends iovecs describing `len` bytes of zeroes.
pub fn zero_iovecs(len: u64, out: &mut Vec<libc::iovec>) {
    let mut left = len;
    while left > 0 {
        let n = left.min(ZEROES.len() as u64);
        out.push(libc::iovec {
            iov_base: ZEROES.as_ptr() as *mut libc::c_void,
            iov_len: usize::try_from(n).unwrap_or(0),
        });
        left -= n;
    }
}

/// How many iovecs a part's data takes (an estimate from above, for batching).
pub fn data_iovec_count(part: &Part, iovecs: Option<&IoVecs>) -> usize {
    if !sends_data(part) {
        return 0;
    }
    if part.zeroes {
        return usize::try_from(u64::from(part.length).div_ceil(ZEROES.len() as u64)).unwrap_or(1);
    }
    iovecs.map_or(0, IoVecs::count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(fl: u16, max: u32) -> ExportInfo {
        ExportInfo {
            size: 1 << 30,
            flags: flags::HAS_FLAGS | fl,
            min_block: 1,
            preferred_block: 4096,
            max_payload: max,
        }
    }

    /// The plan of `op` and the requests it appended (as many as it says).
    fn planned(op: &EngineOp, info: &ExportInfo, slot: usize) -> (Plan, Vec<Part>) {
        let mut q = VecDeque::new();
        let p = plan(op, info, slot, &mut q);
        match p {
            Plan::Send { parts, .. } => assert_eq!(parts, q.len()),
            Plan::Done(_) => assert!(q.is_empty()),
        }
        (p, q.into())
    }

    fn iov(buf: &[u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_ptr() as *mut _,
            iov_len: buf.len(),
        }
    }

    #[test]
    fn large_reads_are_cut_at_the_payload_limit() {
        let buf = vec![0u8; 10_000];
        let v = [iov(&buf)];
        // SAFETY: one iovec over `buf`.
        let iovecs = unsafe { IoVecs::new(v.as_ptr(), 1) };
        let (p, parts) = planned(
            &EngineOp::Read {
                offset: 512,
                iovecs,
            },
            &info(0, 4096),
            3,
        );
        let Plan::Send {
            flush_after, bytes, ..
        } = p
        else {
            panic!("{p:?}")
        };
        assert!(!flush_after);
        assert_eq!(bytes, 10_000);
        let got: Vec<(u64, u32, u64)> = parts
            .iter()
            .map(|p| (p.offset, p.length, p.data_start))
            .collect();
        assert_eq!(
            got,
            [(512, 4096, 0), (4608, 4096, 4096), (8704, 1808, 8192)]
        );
        assert!(
            parts
                .iter()
                .all(|p| p.slot == 3 && p.command == Command::Read)
        );
    }

    #[test]
    fn fua_goes_as_a_flag_or_as_a_flush_after() {
        let buf = [0u8; 512];
        let v = [iov(&buf)];
        // SAFETY: one iovec over `buf`.
        let iovecs = unsafe { IoVecs::new(v.as_ptr(), 1) };
        let w = EngineOp::Write {
            offset: 0,
            iovecs,
            fua: true,
        };
        let (with, parts) = planned(&w, &info(flags::SEND_FUA | flags::SEND_FLUSH, 1 << 20), 0);
        assert!(
            matches!(
                with,
                Plan::Send {
                    flush_after: false,
                    ..
                }
            ) && parts[0].flags == CMD_FLAG_FUA
        );
        let (without, parts) = planned(&w, &info(flags::SEND_FLUSH, 1 << 20), 0);
        assert!(
            matches!(
                without,
                Plan::Send {
                    flush_after: true,
                    ..
                }
            ) && parts[0].flags == 0
        );
    }

    #[test]
    fn what_the_server_lacks_is_answered_or_emulated() {
        let none = info(0, 1 << 20);
        assert_eq!(planned(&EngineOp::Flush, &none, 0).0, Plan::Done(0));
        assert_eq!(
            planned(
                &EngineOp::Discard {
                    offset: 0,
                    len: 4096
                },
                &none,
                0
            )
            .0,
            Plan::Done(0)
        );
        let (z, parts) = planned(
            &EngineOp::WriteZeroes {
                offset: 4096,
                len: (3 << 20) + 512,
            },
            &none,
            0,
        );
        let Plan::Send { .. } = z else {
            panic!("{z:?}")
        };
        assert_eq!(parts.len(), 4);
        assert!(
            parts
                .iter()
                .all(|p| p.zeroes && p.command == Command::Write)
        );
        assert_eq!(parts[3].length, 512);
        let with = info(flags::SEND_WRITE_ZEROES | flags::SEND_TRIM, 1 << 20);
        let (z, parts) = planned(
            &EngineOp::WriteZeroes {
                offset: 0,
                len: 8192,
            },
            &with,
            0,
        );
        assert!(
            matches!(z, Plan::Send { .. })
                && parts.len() == 1
                && parts[0].command == Command::WriteZeroes
        );
    }

    #[test]
    fn sub_iovecs_cover_the_asked_range() {
        let a = [0u8; 100];
        let b = [0u8; 50];
        let v = [iov(&a), iov(&b)];
        let mut out = Vec::new();
        sub_iovecs(&v, 90, 30, &mut out);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].iov_base as usize, a.as_ptr() as usize + 90);
        assert_eq!(out[0].iov_len, 10);
        assert_eq!(out[1].iov_base as usize, b.as_ptr() as usize);
        assert_eq!(out[1].iov_len, 20);
        out.clear();
        sub_iovecs(&v, 120, 1000, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].iov_len, 30);
        out.clear();
        zero_iovecs(65536 * 2 + 1, &mut out);
        assert_eq!(out.iter().map(|v| v.iov_len).sum::<usize>(), 65536 * 2 + 1);
    }
}
