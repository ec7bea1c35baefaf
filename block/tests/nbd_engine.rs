//! The NBD engine through `DiskQueue`, against servers from Debian packages started here:
//! `qemu-nbd` (a raw file, over a Unix socket and over TCP) and `nbdkit` (`memory` and
//! `file` plugins, and filters that take features away, cap the payload, inject errors
//! and delay). Every request kind round-trips byte-exact (against a model of the disk and,
//! for files, the file itself); faults fail exactly the requests they hit; a killed and
//! restarted server gets the unanswered requests again; bad input gives clear errors.

#![allow(clippy::cast_possible_truncation)] // Test data.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use block::nbd::{NbdLinkState, NbdStatus};
use block::{CacheMode, Completion, Disk, DiskOptions, DiskQueue, EngineOptions, RequestKind};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tests::nbd_server::{Listen, NbdServer, free_port, have};

const SIZE: u64 = 8 << 20;

fn open(uri: &str, cache: CacheMode, reconnect: u64) -> Arc<Disk> {
    Arc::new(
        Disk::open(&DiskOptions {
            cache,
            reconnect_delay: Duration::from_secs(reconnect),
            ..DiskOptions::new(uri)
        })
        .unwrap_or_else(|e| panic!("{uri}: {e}")),
    )
}

/// A queue with the buffers of its requests in flight.
struct Io {
    q: DiskQueue,
    bufs: HashMap<u64, (Vec<u8>, Vec<libc::iovec>)>,
    next: u64,
}

impl Io {
    fn new(disk: &Arc<Disk>) -> Io {
        let q = DiskQueue::new(disk.clone(), &EngineOptions::default(), Default::default())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(q.engine_name(), "nbd");
        Io {
            q,
            bufs: HashMap::new(),
            next: 0,
        }
    }

    fn token(&mut self) -> u64 {
        self.next = (self.next + 1) % 60000;
        self.next
    }

    /// Queues a write of `data` at `offset` in `segs` uneven segments.
    fn write(&mut self, offset: u64, data: Vec<u8>, segs: usize, fua: bool) -> u64 {
        let t = self.token();
        let iovs = segments(&data, segs);
        // SAFETY: the buffer and iovecs live in `bufs` until the completion is reaped.
        unsafe { self.q.write(t, offset, &iovs, fua) };
        self.bufs.insert(t, (data, iovs));
        t
    }

    fn read(&mut self, offset: u64, len: usize, segs: usize) -> u64 {
        let t = self.token();
        let data = vec![0xEEu8; len];
        let iovs = segments(&data, segs);
        // SAFETY: as in `write`; nobody else touches the buffer meanwhile.
        unsafe { self.q.read(t, offset, &iovs) };
        self.bufs.insert(t, (data, iovs));
        t
    }

    /// Submits and waits for `n` completions; returns them with read data.
    fn wait(&mut self, n: usize) -> Vec<(Completion, Vec<u8>)> {
        self.q.submit().unwrap();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while out.len() < n {
            assert!(
                Instant::now() < deadline,
                "{} of {n} completions ({:?})",
                out.len(),
                self.q.disk().nbd_status()
            );
            let mut pfd = libc::pollfd {
                fd: self.q.completion_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll on one pollfd we own.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            let mut got = Vec::new();
            self.q.reap(|c| got.push(c)).unwrap();
            for c in got {
                let data = self.bufs.remove(&c.token).map(|b| b.0).unwrap_or_default();
                out.push((c, data));
            }
        }
        out
    }

    fn one(&mut self) -> (Completion, Vec<u8>) {
        self.wait(1).pop().unwrap_or_else(|| unreachable!())
    }
}

fn segments(data: &[u8], segs: usize) -> Vec<libc::iovec> {
    let segs = segs.clamp(1, data.len().max(1));
    let base = data.len() / segs;
    let mut out = Vec::new();
    let mut at = 0;
    for i in 0..segs {
        let len = if i + 1 == segs { data.len() - at } else { base };
        out.push(libc::iovec {
            iov_base: data[at..].as_ptr() as *mut _,
            iov_len: len,
        });
        at += len;
    }
    out
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random()).collect()
}

/// Random writes (FUA or not), write-zeroes, discards (followed by zeroes so the model
/// stays exact), flushes and reads at queue depth up to 32; then the whole disk is read
/// back and compared with the model, which is returned.
fn exercise(disk: &Arc<Disk>, seed: u64) -> Vec<u8> {
    let mut io = Io::new(disk);
    let mut model = vec![0u8; SIZE as usize];
    // Start from a known state: zero the export (the server may hold anything).
    io.q.write_zeroes(1, 0, SIZE);
    let (c, _) = io.one();
    assert_eq!(c.result, Ok(SIZE), "{c:?}");
    let mut rng = StdRng::seed_from_u64(seed);
    for round in 0..12u64 {
        let mut pending = 0;
        let mut spans: Vec<(u64, u64)> = Vec::new();
        let overlaps = |spans: &[(u64, u64)], o: u64, l: u64| {
            spans.iter().any(|&(so, sl)| o < so + sl && so < o + l)
        };
        for _ in 0..rng.random_range(1..32) {
            let len = rng.random_range(1..=512u64) * 512;
            let offset = rng.random_range(0..(SIZE - len) / 512) * 512;
            // Requests in flight together never overlap: their order is not defined.
            if overlaps(&spans, offset, len) {
                continue;
            }
            spans.push((offset, len));
            let (o, l) = (offset as usize, len as usize);
            match rng.random_range(0..10) {
                0 => {
                    let t = io.token();
                    io.q.write_zeroes(t, offset, len);
                    model[o..o + l].fill(0);
                }
                1 => {
                    let t = io.token();
                    io.q.flush(t);
                }
                2 | 3 => {
                    io.read(offset, l, rng.random_range(1..8));
                }
                _ => {
                    let data = pattern(round * 1000 + pending, l);
                    model[o..o + l].copy_from_slice(&data);
                    io.write(offset, data, rng.random_range(1..8), rng.random_bool(0.3));
                }
            }
            pending += 1;
        }
        for (c, data) in io.wait(pending as usize) {
            assert!(c.result.is_ok(), "{c:?}");
            if c.kind == RequestKind::Read {
                // Reads raced nothing: their span was not written in this round.
                assert_eq!(c.result, Ok(data.len() as u64));
            }
        }
        // A discard, then zeroes over it: the model stays exact either way.
        let len = rng.random_range(1..64u64) * 4096;
        let offset = rng.random_range(0..(SIZE - len) / 4096) * 4096;
        io.q.discard(7, offset, len);
        assert!(io.one().0.result.is_ok());
        io.q.write_zeroes(8, offset, len);
        assert!(io.one().0.result.is_ok());
        model[offset as usize..(offset + len) as usize].fill(0);
    }
    io.q.flush(9);
    assert_eq!(io.one().0.result, Ok(0));
    // Read everything back in 1 MiB pieces (several requests each when the payload is
    // capped) and compare.
    for i in 0..SIZE / (1 << 20) {
        io.read(i << 20, 1 << 20, 3);
        let (c, data) = io.one();
        assert_eq!(c.result, Ok(1 << 20));
        let at = (i << 20) as usize;
        assert!(
            data == model[at..at + (1 << 20)],
            "MiB {i} differs from what was written"
        );
    }
    model
}

fn image(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("disk.raw");
    std::fs::write(&p, vec![0x5Au8; SIZE as usize]).unwrap();
    p
}

#[test]
fn every_request_kind_round_trips_on_qemu_nbd() {
    if !have(
        "qemu-nbd",
        "every_request_kind_round_trips_on_qemu_nbd",
        "qemu-utils",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    for (listen, cache) in [
        (Listen::Unix(dir.path().join("s")), CacheMode::None),
        (Listen::Tcp(free_port()), CacheMode::Writethrough),
    ] {
        let server = NbdServer::qemu_nbd(&img, "exp", listen);
        let disk = open(&server.uri(), cache, 5);
        assert_eq!(disk.capacity(), SIZE);
        let model = exercise(&disk, 1);
        drop(disk);
        // Byte-exact against the backing file.
        assert!(std::fs::read(&img).unwrap() == model, "the file differs");
    }
}

#[test]
fn every_request_kind_round_trips_on_nbdkit() {
    if !have(
        "nbdkit",
        "every_request_kind_round_trips_on_nbdkit",
        "nbdkit",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let file = format!("file={}", img.display());
    let size = format!("size={SIZE}");
    let setups: Vec<Vec<&str>> = vec![
        vec!["memory", &size],
        vec!["file", &file],
        // Payloads capped at 64 KiB (a larger request is an error) and no WRITE_ZEROES:
        // the engine cuts requests and writes zeroes itself. (This nbdkit cannot take
        // FUA away; the write-then-flush plan is checked in `block::nbd::parts`.)
        vec![
            "--filter=blocksize-policy",
            "--filter=nozero",
            "memory",
            &size,
            "blocksize-maximum=65536",
            "blocksize-error-policy=error",
        ],
    ];
    for (i, args) in setups.iter().enumerate() {
        let server = NbdServer::nbdkit(args, Listen::Unix(dir.path().join(format!("s{i}"))));
        let disk = open(&server.uri(), CacheMode::Writeback, 5);
        let model = exercise(&disk, 10 + i as u64);
        drop(disk);
        if args[0] == "file" {
            assert!(std::fs::read(&img).unwrap() == model, "the file differs");
        }
    }
}

#[test]
fn errors_fail_exactly_the_requests_they_hit() {
    if !have(
        "nbdkit",
        "errors_fail_exactly_the_requests_they_hit",
        "nbdkit",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let trigger = dir.path().join("fail-now");
    let trigger_arg = format!("error-file={}", trigger.display());
    let server = NbdServer::nbdkit(
        &[
            "--filter=error",
            "memory",
            "size=8M",
            "error=EIO",
            "error-pwrite-rate=100%",
            &trigger_arg,
        ],
        Listen::Unix(dir.path().join("s")),
    );
    let disk = open(&server.uri(), CacheMode::Writeback, 5);
    let mut io = Io::new(&disk);
    let a = pattern(1, 65536);
    let b = pattern(2, 65536);
    io.write(0, a.clone(), 2, false);
    assert_eq!(io.one().0.result, Ok(65536));
    std::fs::write(&trigger, b"").unwrap();
    // Writes fail with EIO while the file exists; reads in the same batch do not.
    let bad = io.write(0, b.clone(), 3, false);
    let bad2 = io.write(1 << 20, b.clone(), 1, false);
    let read = io.read(0, 65536, 2);
    let done = io.wait(3);
    for (c, data) in &done {
        if c.token == bad || c.token == bad2 {
            assert_eq!(c.result.map_err(|e| e.errno()), Err(libc::EIO), "{c:?}");
        } else {
            assert_eq!(c.token, read);
            assert_eq!(c.result, Ok(65536));
            assert!(
                *data == a,
                "a read in the failing window returned other data"
            );
        }
    }
    std::fs::remove_file(&trigger).unwrap();
    io.read(1 << 20, 65536, 1);
    let (c, data) = io.one();
    assert_eq!(c.result, Ok(65536));
    assert!(data.iter().all(|b| *b == 0), "a failed write left data");
    io.write(1 << 20, b.clone(), 1, true);
    assert_eq!(io.one().0.result, Ok(65536));
    io.read(1 << 20, 65536, 1);
    assert!(io.one().1 == b);
    // A request error is not a broken link.
    let status = disk.nbd_status().unwrap();
    assert_eq!(
        (status.state, status.reconnects),
        (NbdLinkState::Connected, 0)
    );
}

#[test]
fn delayed_requests_complete_late_but_in_full() {
    if !have(
        "nbdkit",
        "delayed_requests_complete_late_but_in_full",
        "nbdkit",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = NbdServer::nbdkit(
        &[
            "--filter=delay",
            "memory",
            "size=8M",
            "wdelay=300ms",
            "rdelay=200ms",
        ],
        Listen::Unix(dir.path().join("s")),
    );
    let disk = open(&server.uri(), CacheMode::Writeback, 5);
    let mut io = Io::new(&disk);
    let start = Instant::now();
    for i in 0..8u64 {
        io.write(i * 65536, pattern(i, 65536), 2, false);
    }
    for (c, _) in io.wait(8) {
        assert_eq!(c.result, Ok(65536));
    }
    assert!(start.elapsed() >= Duration::from_millis(300));
    for i in 0..8u64 {
        io.read(i * 65536, 65536, 1);
        let (c, data) = io.one();
        assert_eq!(c.result, Ok(65536));
        assert!(data == pattern(i, 65536));
    }
}

/// Kills the server while writes wait in it (delayed), starts it again: the writes are
/// sent again after the reconnect and the file holds them.
#[test]
fn a_restarted_server_gets_the_unanswered_requests_again() {
    if !have(
        "nbdkit",
        "a_restarted_server_gets_the_unanswered_requests_again",
        "nbdkit",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = image(dir.path());
    let file = format!("file={}", img.display());
    let mut server = NbdServer::nbdkit(
        &["--filter=delay", "file", &file, "wdelay=500ms"],
        Listen::Unix(dir.path().join("s")),
    );
    let disk = open(&server.uri(), CacheMode::Writeback, 30);
    let mut io = Io::new(&disk);
    for i in 0..16u64 {
        io.write(i * 131072, pattern(100 + i, 131072), 4, false);
    }
    io.q.submit().unwrap();
    std::thread::sleep(Duration::from_millis(150));
    server.kill();
    let deadline = Instant::now() + Duration::from_secs(5);
    while disk.nbd_status().unwrap().state != NbdLinkState::Reconnecting {
        assert!(Instant::now() < deadline, "{:?}", disk.nbd_status());
        std::thread::sleep(Duration::from_millis(10));
    }
    server.restart();
    for (c, _) in io.wait(16) {
        assert_eq!(c.result, Ok(131072), "{c:?}");
    }
    let status: NbdStatus = disk.nbd_status().unwrap();
    assert_eq!(status.state, NbdLinkState::Connected);
    assert!(status.reconnects >= 1, "{status:?}");
    io.q.flush(1);
    assert_eq!(io.one().0.result, Ok(0));
    let file = std::fs::read(&img).unwrap();
    for i in 0..16usize {
        let at = i * 131072;
        assert!(
            file[at..at + 131072] == pattern(100 + i as u64, 131072),
            "write {i} is not in the file"
        );
    }
}

#[test]
fn without_reconnect_or_past_the_delay_requests_fail_then_recover() {
    if !have(
        "nbdkit",
        "without_reconnect_or_past_the_delay_requests_fail_then_recover",
        "nbdkit",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // reconnect_delay 0: a lost connection fails everything, for good.
    let mut server = NbdServer::nbdkit(&["memory", "size=8M"], Listen::Unix(dir.path().join("a")));
    let disk = open(&server.uri(), CacheMode::Writeback, 0);
    let mut io = Io::new(&disk);
    server.kill();
    io.read(0, 4096, 1);
    assert_eq!(io.one().0.result.map_err(|e| e.errno()), Err(libc::EIO));
    server.restart();
    std::thread::sleep(Duration::from_millis(200));
    io.read(0, 4096, 1);
    assert_eq!(io.one().0.result.map_err(|e| e.errno()), Err(libc::EIO));
    assert_eq!(disk.nbd_status().unwrap().state, NbdLinkState::Failed);
    drop((io, disk));

    // reconnect_delay 1: a request waits about a second, fails, and once the server is
    // back requests succeed again.
    let disk = open(&server.uri(), CacheMode::Writeback, 1);
    let mut io = Io::new(&disk);
    server.kill();
    let start = Instant::now();
    io.read(0, 4096, 1);
    assert_eq!(io.one().0.result.map_err(|e| e.errno()), Err(libc::EIO));
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "failed after {waited:?}"
    );
    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        io.read(0, 4096, 1);
        if io.one().0.result.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the disk did not recover");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(disk.nbd_status().unwrap().reconnects, 1);
}

#[test]
fn multi_conn_servers_get_a_connection_per_queue() {
    if !have(
        "nbdkit",
        "multi_conn_servers_get_a_connection_per_queue",
        "nbdkit",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (args, want) in [
        (
            vec![
                "--filter=multi-conn",
                "memory",
                "size=8M",
                "multi-conn-mode=plugin",
            ],
            3,
        ),
        (
            vec![
                "--filter=multi-conn",
                "memory",
                "size=8M",
                "multi-conn-mode=disable",
            ],
            1,
        ),
    ] {
        let server = NbdServer::nbdkit(&args, Listen::Unix(dir.path().join(format!("s{want}"))));
        let disk = Arc::new(
            Disk::open(&DiskOptions {
                connections: 3,
                cache: CacheMode::Writeback,
                ..DiskOptions::new(server.uri())
            })
            .unwrap(),
        );
        assert_eq!(disk.nbd_status().unwrap().connections, want);
        // Three queues write their own regions; each reads back the others' data.
        let mut queues: Vec<Io> = (0..3).map(|_| Io::new(&disk)).collect();
        for (i, io) in queues.iter_mut().enumerate() {
            io.write(i as u64 * 65536, pattern(i as u64, 65536), 2, true);
            assert_eq!(io.one().0.result, Ok(65536));
        }
        for (i, io) in queues.iter_mut().enumerate() {
            let j = (i + 1) % 3;
            io.read(j as u64 * 65536, 65536, 1);
            assert!(io.one().1 == pattern(j as u64, 65536));
        }
    }
}

/// A queue dropped while its reads wait in a slow server: the drop returns, and the
/// late replies do not land in its (freed) buffers; another queue goes on working.
#[test]
fn a_queue_dropped_with_requests_in_flight_lets_go_of_its_buffers() {
    if !have(
        "nbdkit",
        "a_queue_dropped_with_requests_in_flight_lets_go_of_its_buffers",
        "nbdkit",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = NbdServer::nbdkit(
        &["--filter=delay", "memory", "size=8M", "rdelay=300ms"],
        Listen::Unix(dir.path().join("s")),
    );
    let disk = open(&server.uri(), CacheMode::Writeback, 5);
    let mut io = Io::new(&disk);
    for i in 0..8 {
        io.read(i * 4096, 65536, 2);
    }
    io.q.submit().unwrap();
    let start = Instant::now();
    drop(io.q);
    assert!(start.elapsed() < Duration::from_secs(3));
    // The buffers go now; replies that come later must not touch them.
    drop(io.bufs);
    let mut other = Io::new(&disk);
    other.write(0, pattern(5, 4096), 1, false);
    assert_eq!(other.one().0.result, Ok(4096));
    other.read(0, 4096, 1);
    assert!(other.one().1 == pattern(5, 4096));
}

/// How the fake server misbehaves after the handshake.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fake {
    /// Garbage for the first connection's first request; proper zeroes afterwards.
    GarbageFirst,
    /// Garbage for every connection's first request.
    GarbageAlways,
    /// A write gets EIO at once, before its data is read, and the connection closes.
    EarlyWriteError,
}

/// A server that answers the handshake (a 1 MiB export) and then misbehaves as `mode`
/// says; reads it answers with zeroes.
fn fake_server(socket: &Path, mode: Fake) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(socket).unwrap();
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(mut s) = conn else { return };
            let mut greet = Vec::new();
            greet.extend_from_slice(&0x4e42_444d_4147_4943u64.to_be_bytes());
            greet.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
            greet.extend_from_slice(&3u16.to_be_bytes());
            if s.write_all(&greet).is_err() {
                continue;
            }
            let mut head = [0u8; 20];
            if s.read_exact(&mut head).is_err() {
                continue;
            }
            let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
            let mut rest = vec![0u8; len as usize];
            let _ = s.read_exact(&mut rest);
            let reply = |kind: u32, data: &[u8]| {
                let mut r = Vec::new();
                r.extend_from_slice(&0x0003_e889_0455_65a9u64.to_be_bytes());
                r.extend_from_slice(&7u32.to_be_bytes());
                r.extend_from_slice(&kind.to_be_bytes());
                r.extend_from_slice(&(data.len() as u32).to_be_bytes());
                r.extend_from_slice(data);
                r
            };
            let mut info = vec![0u8, 0];
            info.extend_from_slice(&(1u64 << 20).to_be_bytes());
            info.extend_from_slice(&1u16.to_be_bytes());
            let _ = s.write_all(&reply(3, &info));
            let _ = s.write_all(&reply(1, &[]));
            loop {
                let mut req = [0u8; 28];
                if s.read_exact(&mut req).is_err() {
                    break;
                }
                let garbage = match mode {
                    Fake::GarbageFirst => n == 0,
                    Fake::GarbageAlways => true,
                    Fake::EarlyWriteError => false,
                };
                if garbage {
                    let _ = s.write_all(b"this is not an NBD reply, not at all");
                    break;
                }
                let cookie = &req[8..16];
                if mode == Fake::EarlyWriteError && req[7] == 1 {
                    let mut r = Vec::new();
                    r.extend_from_slice(&0x6744_6698u32.to_be_bytes());
                    r.extend_from_slice(&5u32.to_be_bytes());
                    r.extend_from_slice(cookie);
                    let _ = s.write_all(&r);
                    break;
                }
                let length = u32::from_be_bytes(req[24..28].try_into().unwrap());
                let mut r = Vec::new();
                r.extend_from_slice(&0x6744_6698u32.to_be_bytes());
                r.extend_from_slice(&0u32.to_be_bytes());
                r.extend_from_slice(cookie);
                r.extend(std::iter::repeat_n(0u8, length as usize));
                if s.write_all(&r).is_err() {
                    break;
                }
            }
        }
    })
}

#[test]
fn garbage_from_the_server_breaks_the_link_and_the_request_is_resent() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fake");
    let _server = fake_server(&socket, Fake::GarbageFirst);
    let disk = open(
        &format!("nbd+unix:///?socket={}", socket.display()),
        CacheMode::Writeback,
        5,
    );
    let mut io = Io::new(&disk);
    io.read(4096, 8192, 2);
    let (c, data) = io.one();
    assert_eq!(c.result, Ok(8192));
    assert!(data.iter().all(|b| *b == 0));
    let status = disk.nbd_status().unwrap();
    assert_eq!(status.reconnects, 1);
    assert!(
        status
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("bad reply")),
        "{status:?}"
    );
}

/// A server that accepts, then breaks every connection: the reconnects slow down and the
/// request fails after `reconnect_delay` instead of being resent forever.
#[test]
fn a_server_that_always_breaks_the_link_fails_the_request_after_the_delay() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fake");
    let _server = fake_server(&socket, Fake::GarbageAlways);
    let disk = open(
        &format!("nbd+unix:///?socket={}", socket.display()),
        CacheMode::Writeback,
        1,
    );
    let mut io = Io::new(&disk);
    let start = Instant::now();
    io.read(0, 4096, 1);
    assert_eq!(io.one().0.result.map_err(|e| e.errno()), Err(libc::EIO));
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let status = disk.nbd_status().unwrap();
    // 50 ms doubling: a handful of attempts in a second or two, not thousands.
    assert!(status.reconnects <= 8, "{status:?}");
}

/// A server that answers a large write with an error before taking its data, and hangs
/// up: the write fails with the server's errno once the sender let go of its buffers.
#[test]
fn an_early_answer_to_a_write_waits_for_its_data_to_be_out() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("fake");
    let _server = fake_server(&socket, Fake::EarlyWriteError);
    let disk = open(
        &format!("nbd+unix:///?socket={}", socket.display()),
        CacheMode::Writeback,
        0,
    );
    let mut io = Io::new(&disk);
    io.write(0, pattern(9, 1 << 20), 8, false);
    assert_eq!(io.one().0.result.map_err(|e| e.errno()), Err(libc::EIO));
    // The hang-up is handled right after (reconnect_delay 0: failed for good).
    let deadline = Instant::now() + Duration::from_secs(5);
    while disk.nbd_status().unwrap().state != NbdLinkState::Failed {
        assert!(Instant::now() < deadline, "{:?}", disk.nbd_status());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn bad_uris_servers_and_exports_give_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = |uri: &str, readonly: bool| {
        Disk::open(&DiskOptions {
            readonly,
            ..DiskOptions::new(uri)
        })
        .map(|_| ())
        .unwrap_err()
        .to_string()
    };
    let e = err("nbd://", false);
    assert!(e.contains("NBD URI"), "{e}");
    let e = err("nbds://h/e", false);
    assert!(e.contains("TLS") || e.contains("nbds"), "{e}");
    let gone = dir.path().join("nobody");
    let e = err(&format!("nbd+unix:///x?socket={}", gone.display()), false);
    assert!(
        e.contains(&gone.display().to_string()) && e.contains("No such file"),
        "{e}"
    );
    let port = free_port();
    let e = err(&format!("nbd://127.0.0.1:{port}/x"), false);
    assert!(
        e.contains(&format!("127.0.0.1:{port}")) && e.contains("refused"),
        "{e}"
    );
    // A server that speaks something else.
    let junk = dir.path().join("junk");
    let listener = UnixListener::bind(&junk).unwrap();
    let t = std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n0123456789");
        }
    });
    let e = err(&format!("nbd+unix:///?socket={}", junk.display()), false);
    assert!(e.contains("not an NBD server"), "{e}");
    t.join().unwrap();
    if have(
        "qemu-nbd",
        "bad_uris_servers_and_exports_give_clear_errors",
        "qemu-utils",
    ) {
        let img = image(dir.path());
        let server = NbdServer::qemu_nbd(&img, "exp", Listen::Unix(dir.path().join("s")));
        let e = err(&server.uri().replace("/exp?", "/nope?"), false);
        assert!(
            e.contains("nope") && e.contains("NBD_REP_ERR_UNKNOWN"),
            "{e}"
        );
    }
    if have(
        "nbdkit",
        "bad_uris_servers_and_exports_give_clear_errors",
        "nbdkit",
    ) {
        let server = NbdServer::nbdkit(
            &["--readonly", "memory", "size=1M"],
            Listen::Unix(dir.path().join("ro")),
        );
        let e = err(&server.uri(), false);
        assert!(
            e.contains("read-only") && e.contains("readonly: true"),
            "{e}"
        );
        assert!(
            Disk::open(&DiskOptions {
                readonly: true,
                ..DiskOptions::new(server.uri())
            })
            .is_ok()
        );
    }
}
