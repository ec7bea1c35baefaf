//! The NBD protocol code against real servers from Debian packages: `qemu-nbd`
//! (`qemu-utils`, a raw file) and `nbdkit` (`memory` plugin). Handshake, then WRITE with
//! FUA, READ, FLUSH, WRITE_ZEROES and TRIM round trips, byte-exact against the backing
//! file; an unknown export is refused with the server's reason. Each server's test says
//! `SKIP` with the apt line when it is missing.

#![allow(clippy::cast_possible_truncation)] // Test patterns.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use block::nbd::proto::{
    CMD_FLAG_FUA, Command as Cmd, ExportInfo, ReplyHeader, Request, SIMPLE_REPLY_LEN, flags,
};
use block::nbd::{NbdError, handshake};
use tests::nbd_server::{Listen, NbdServer, have};

/// Sends one request (with `data` for a write) and reads its reply (and `length` bytes
/// for a read); returns the error and the data.
fn roundtrip(s: &mut UnixStream, req: Request, data: &[u8]) -> (u32, Vec<u8>) {
    let mut out = Vec::new();
    req.encode(&mut out);
    out.extend_from_slice(data);
    s.write_all(&out).unwrap();
    let mut head = [0u8; SIMPLE_REPLY_LEN];
    s.read_exact(&mut head).unwrap();
    let reply = ReplyHeader::parse(&head).unwrap();
    assert_eq!(reply.cookie, req.cookie);
    let mut payload = Vec::new();
    if req.command == Cmd::Read && reply.error == 0 {
        payload = vec![0u8; req.length as usize];
        s.read_exact(&mut payload).unwrap();
    }
    (reply.error, payload)
}

/// WRITE (FUA), READ, FLUSH, WRITE_ZEROES, TRIM on an export of `info`; returns what a
/// read of the first 16 KiB gives at the end.
fn exercise(s: &mut UnixStream, info: &ExportInfo) -> Vec<u8> {
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    let req = |command, cookie, offset, length, flags| Request {
        command,
        flags,
        cookie,
        offset,
        length,
    };
    let fua = if info.has(flags::SEND_FUA) {
        CMD_FLAG_FUA
    } else {
        0
    };
    assert_eq!(
        roundtrip(s, req(Cmd::Write, 1, 4096, 8192, fua), &pattern).0,
        0
    );
    let (err, data) = roundtrip(s, req(Cmd::Read, 2, 4096, 8192, 0), &[]);
    assert_eq!(err, 0);
    assert_eq!(data, pattern, "read back");
    if info.has(flags::SEND_FLUSH) {
        assert_eq!(roundtrip(s, req(Cmd::Flush, 3, 0, 0, 0), &[]).0, 0);
    }
    if info.has(flags::SEND_WRITE_ZEROES) {
        assert_eq!(
            roundtrip(s, req(Cmd::WriteZeroes, 4, 8192, 4096, 0), &[]).0,
            0
        );
    }
    if info.has(flags::SEND_TRIM) {
        // Trimmed data may read back as anything; only the answer is checked.
        assert_eq!(roundtrip(s, req(Cmd::Trim, 5, 12288, 4096, 0), &[]).0, 0);
    }
    // A read past the end is an error for that request only.
    let (err, _) = roundtrip(s, req(Cmd::Read, 6, info.size, 4096, 0), &[]);
    assert_ne!(err, 0, "a read past the end succeeded");
    let (err, data) = roundtrip(s, req(Cmd::Read, 7, 0, 16384, 0), &[]);
    assert_eq!(err, 0);
    data
}

#[test]
fn qemu_nbd_serves_what_we_ask() {
    if !have("qemu-nbd", "qemu_nbd_serves_what_we_ask", "qemu-utils") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    std::fs::write(&image, vec![0xAAu8; 1 << 20]).unwrap();
    let socket = dir.path().join("nbd.sock");
    let _server = NbdServer::qemu_nbd(&image, "exp", Listen::Unix(socket.clone()));
    let mut s = UnixStream::connect(&socket).unwrap();
    let info = handshake(&mut s, "exp").unwrap();
    assert_eq!(info.size, 1 << 20);
    assert!(
        info.has(flags::SEND_FLUSH) && info.has(flags::SEND_FUA),
        "{info:?}"
    );
    assert!(!info.has(flags::READ_ONLY));
    let head = exercise(&mut s, &info);
    // Byte-exact against the backing file.
    let file = std::fs::read(&image).unwrap();
    assert_eq!(head, file[..16384]);
    assert!(
        file[4096..8192]
            .iter()
            .zip(0u32..)
            .all(|(b, i)| *b == (i * 7 + 3) as u8)
    );
    if info.has(flags::SEND_WRITE_ZEROES) {
        assert!(file[8192..12288].iter().all(|b| *b == 0));
    }
    // An unknown export is refused, saying so.
    let mut s2 = UnixStream::connect(&socket).unwrap();
    match handshake(&mut s2, "nope") {
        Err(NbdError::Refused { export, reason }) => {
            assert_eq!(export, "nope");
            assert!(reason.contains("NBD_REP_ERR_UNKNOWN"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn nbdkit_memory_serves_what_we_ask() {
    if !have("nbdkit", "nbdkit_memory_serves_what_we_ask", "nbdkit") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("nbd.sock");
    let _server = NbdServer::nbdkit(&["memory", "size=1M"], Listen::Unix(socket.clone()));
    let mut s = UnixStream::connect(&socket).unwrap();
    let info = handshake(&mut s, "").unwrap();
    assert_eq!(info.size, 1 << 20);
    let head = exercise(&mut s, &info);
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    assert!(head[..4096].iter().all(|b| *b == 0));
    assert_eq!(head[4096..8192], pattern[..4096]);
    if info.has(flags::SEND_WRITE_ZEROES) {
        assert!(head[8192..12288].iter().all(|b| *b == 0));
    }
}
