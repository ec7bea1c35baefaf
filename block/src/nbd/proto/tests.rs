use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use super::*;

/// A test-side server: sends `greeting`, then (if `answer` is given) reads the client's
/// flags and its NBD_OPT_GO and writes `answer`. Returns what the client sent.
fn serve(
    greeting: Vec<u8>,
    answer: Option<Vec<u8>>,
) -> (UnixStream, std::thread::JoinHandle<Vec<u8>>) {
    let (client, mut server) = UnixStream::pair().unwrap();
    let t = std::thread::spawn(move || {
        server.write_all(&greeting).unwrap();
        let Some(answer) = answer else {
            return Vec::new();
        };
        let mut got = vec![0u8; 4 + 8 + 4 + 4];
        server.read_exact(&mut got).unwrap();
        let len = u32::from_be_bytes(got[16..20].try_into().unwrap()) as usize;
        let mut data = vec![0u8; len];
        server.read_exact(&mut data).unwrap();
        got.extend_from_slice(&data);
        server.write_all(&answer).unwrap();
        got
    });
    (client, t)
}

fn greeting(flags: u16) -> Vec<u8> {
    let mut g = NBD_MAGIC.to_be_bytes().to_vec();
    g.extend_from_slice(&IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&flags.to_be_bytes());
    g
}

fn option_reply(kind: u32, data: &[u8]) -> Vec<u8> {
    let mut r = REPLY_MAGIC_OPT.to_be_bytes().to_vec();
    r.extend_from_slice(&OPT_GO.to_be_bytes());
    r.extend_from_slice(&kind.to_be_bytes());
    r.extend_from_slice(&u32::try_from(data.len()).unwrap().to_be_bytes());
    r.extend_from_slice(data);
    r
}

fn info_export(size: u64, fl: u16) -> Vec<u8> {
    let mut d = INFO_EXPORT.to_be_bytes().to_vec();
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&fl.to_be_bytes());
    option_reply(REP_INFO, &d)
}

fn info_blocks(min: u32, pref: u32, max: u32) -> Vec<u8> {
    let mut d = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [min, pref, max] {
        d.extend_from_slice(&v.to_be_bytes());
    }
    option_reply(REP_INFO, &d)
}

#[test]
fn a_go_handshake_learns_the_export() {
    let fl = flags::HAS_FLAGS | flags::SEND_FLUSH | flags::SEND_FUA | flags::CAN_MULTI_CONN;
    let mut answer = info_export(1 << 20, fl);
    answer.extend(info_blocks(512, 4096, 64 << 20));
    answer.extend(option_reply(REP_ACK, &[]));
    let (mut client, server) = serve(greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES), Some(answer));
    let info = handshake(&mut client, "disk0").unwrap();
    assert_eq!(
        info,
        ExportInfo {
            size: 1 << 20,
            flags: fl,
            min_block: 512,
            preferred_block: 4096,
            max_payload: MAX_PAYLOAD,
        }
    );
    assert!(info.has(flags::SEND_FUA) && info.has(flags::CAN_MULTI_CONN));
    assert!(!info.has(flags::READ_ONLY) && !info.has(flags::SEND_TRIM));
    // What the client sent: its flags, then NBD_OPT_GO naming the export and asking for
    // the block sizes.
    let sent = server.join().unwrap();
    let mut want = u32::from(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    want.extend_from_slice(&IHAVEOPT.to_be_bytes());
    want.extend_from_slice(&OPT_GO.to_be_bytes());
    want.extend_from_slice(&(4u32 + 5 + 2 + 2).to_be_bytes());
    want.extend_from_slice(&5u32.to_be_bytes());
    want.extend_from_slice(b"disk0");
    want.extend_from_slice(&1u16.to_be_bytes());
    want.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    assert_eq!(sent, want);
}

#[test]
fn a_refusal_carries_the_servers_reason() {
    let answer = option_reply(REP_ERR | 6, b"export 'nope' not found");
    let (mut client, server) = serve(greeting(FLAG_FIXED_NEWSTYLE), Some(answer));
    let err = handshake(&mut client, "nope").unwrap_err().to_string();
    assert!(
        err.contains("nope") && err.contains("NBD_REP_ERR_UNKNOWN") && err.contains("not found"),
        "{err}"
    );
    server.join().unwrap();
}

#[test]
fn servers_that_do_not_speak_the_protocol_are_refused() {
    // Not NBD at all.
    let (mut client, server) = serve(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec(), None);
    let err = handshake(&mut client, "x").unwrap_err().to_string();
    assert!(err.contains("greeting magic"), "{err}");
    server.join().unwrap();
    // Oldstyle negotiation.
    let mut g = NBD_MAGIC.to_be_bytes().to_vec();
    g.extend_from_slice(&0x0000_4202_8186_1253_u64.to_be_bytes());
    g.extend_from_slice(&[0u8; 2]);
    let (mut client, server) = serve(g, None);
    let err = handshake(&mut client, "x").unwrap_err().to_string();
    assert!(err.contains("oldstyle"), "{err}");
    server.join().unwrap();
    // Not fixed newstyle.
    let (mut client, server) = serve(greeting(0), None);
    let err = handshake(&mut client, "x").unwrap_err().to_string();
    assert!(err.contains("fixed newstyle"), "{err}");
    server.join().unwrap();
    // Acknowledged without the size; a bad block size; a truncated info; a closed socket.
    for (answer, why) in [
        (option_reply(REP_ACK, &[]), "without the export's size"),
        (
            [
                info_export(4096, 1),
                info_blocks(3, 4096, 4096),
                option_reply(REP_ACK, &[]),
            ]
            .concat(),
            "minimum block size 3",
        ),
        (option_reply(REP_INFO, &[0, 0, 1]), "info reply of 3 bytes"),
        (info_export(4096, 1), "failed to fill whole buffer"),
    ] {
        let (mut client, server) = serve(greeting(FLAG_FIXED_NEWSTYLE), Some(answer));
        let err = handshake(&mut client, "x").unwrap_err().to_string();
        assert!(err.contains(why), "{why}: {err}");
        server.join().unwrap();
    }
}

#[test]
fn requests_and_replies_on_the_wire() {
    let mut out = Vec::new();
    Request {
        command: Command::Write,
        flags: CMD_FLAG_FUA,
        cookie: 0x0102_0304_0506_0708,
        offset: 1 << 33,
        length: 4096,
    }
    .encode(&mut out);
    assert_eq!(out.len(), REQUEST_LEN);
    assert_eq!(
        out,
        [
            &[0x25, 0x60, 0x95, 0x13][..],
            &[0, 1],
            &[0, 1],
            &[1, 2, 3, 4, 5, 6, 7, 8],
            &[0, 0, 0, 2, 0, 0, 0, 0],
            &[0, 0, 0x10, 0],
        ]
        .concat()
    );
    let mut reply = [0u8; SIMPLE_REPLY_LEN];
    reply[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    reply[4..8].copy_from_slice(&5u32.to_be_bytes());
    reply[8..].copy_from_slice(&7u64.to_be_bytes());
    assert_eq!(
        ReplyHeader::parse(&reply).unwrap(),
        ReplyHeader {
            error: 5,
            cookie: 7
        }
    );
    reply[0] = 0;
    assert!(ReplyHeader::parse(&reply).is_err());
}
