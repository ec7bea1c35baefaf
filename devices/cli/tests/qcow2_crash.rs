//! Crash consistency of qcow2 in the `vhost-user-blk` backend: libblkio writes to a
//! fresh qcow2 image (every write allocates; on every other run 4 KiB clusters written
//! from the start of the disk on, so that new L2 tables come often) with flushes in
//! between, and the backend
//! is killed with SIGKILL at a random moment, ten times. Every time `qemu-img check`
//! finds no corruption (leaked clusters are allowed), and every write that completed
//! before a flush that completed reads back.
//!
//! Skips, saying why, without `qemu-img`.

#![allow(clippy::cast_possible_truncation)] // Test data and figures, not guest input.

#[path = "vhost_user_blkio/support.rs"]
#[allow(dead_code)] // Shared with vhost_user_blkio.rs, which uses the rest.
mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use blkio::ReqFlags;
use support::{Client, MIB, Server, comps, fill_random, xorshift};

const SIZE: usize = 256 * MIB;
const EXTENT: usize = 64 * 1024;
const QD: usize = 16;

/// One write: where, what, and whether a completed flush covers it.
struct Write {
    offset: usize,
    data: Vec<u8>,
    durable: bool,
}

/// Writes until `run_for` passes, flushing every 16 completions (256 when
/// `ascending`); then kills the
/// backend. Returns the writes (each to an extent of its own, never rewritten).
fn write_then_crash(
    server: &mut Server,
    seed: u64,
    ascending: bool,
    run_for: Duration,
) -> Vec<Write> {
    let mut c = Client::connect(server.path(), 1, false, QD * EXTENT).unwrap();
    let base = c.region.addr;
    let mut q = c.queues.remove(0);
    let mut rng = seed | 1;
    // Extents used once each: in a random order, or (`ascending`) from the start of the
    // disk on, so that the writes keep reaching parts no L2 table covers yet.
    let mut extents: Vec<usize> = (0..SIZE / EXTENT).rev().collect();
    if !ascending {
        for i in (1..extents.len()).rev() {
            extents.swap(i, xorshift(&mut rng) as usize % (i + 1));
        }
    }
    let mut writes: Vec<Write> = Vec::new();
    let mut slot_write: Vec<Option<usize>> = vec![None; QD];
    let mut completed: Vec<usize> = Vec::new();
    let mut flushing: Option<Vec<usize>> = None;
    let mut cs = comps(QD + 1);
    let start = Instant::now();
    // Past `run_for`, it goes on until a flush completed (a slow host may not get to
    // one in time): the check needs writes a completed flush covers.
    let mut flushed_once = false;
    while start.elapsed() < run_for || !flushed_once {
        let late = start.elapsed() >= run_for;
        for (slot, in_flight) in slot_write.iter_mut().enumerate() {
            if in_flight.is_some() || extents.is_empty() {
                continue;
            }
            let extent = extents.pop().unwrap_or(0);
            let blocks = 1 + xorshift(&mut rng) as usize % 16;
            let first = xorshift(&mut rng) as usize % (16 - blocks + 1);
            let offset = extent * EXTENT + first * 4096;
            let mut data = vec![0u8; blocks * 4096];
            fill_random(&mut data, xorshift(&mut rng));
            let buf = (base + slot * EXTENT) as *mut u8;
            // SAFETY: the slot has no request in flight and lies in the mapped region.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf, data.len()) };
            q.write(offset as u64, buf, data.len(), slot, ReqFlags::empty());
            *in_flight = Some(writes.len());
            writes.push(Write {
                offset,
                data,
                durable: false,
            });
        }
        let writing = slot_write.iter().flatten().count();
        // Flushes seldom on the ascending runs: new tables wait long for the next one.
        let every = if ascending { 16 * QD } else { QD };
        if flushing.is_none()
            && !completed.is_empty()
            && (completed.len() >= every || writing == 0 || late)
        {
            flushing = Some(std::mem::take(&mut completed));
            q.flush(QD, ReqFlags::empty());
        }
        if flushing.is_none() && completed.is_empty() && writing == 0 {
            break; // Every extent written and flushed.
        }
        let n = q
            .do_io(&mut cs, 1, Some(&mut Duration::from_secs(10)), None)
            .expect("do_io");
        for c in &cs[..n] {
            // SAFETY: do_io initialized the first n completions.
            let c = unsafe { c.assume_init_read() };
            if c.ret != 0 {
                let log = server.log();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                panic!(
                    "request {} failed ({}); backend log ends:\n{}",
                    c.user_data,
                    c.ret,
                    tail.join("\n")
                );
            }
            if c.user_data == QD {
                flushed_once = true;
                for w in flushing.take().unwrap_or_default() {
                    writes[w].durable = true;
                }
            } else if let Some(w) = slot_write[c.user_data].take() {
                completed.push(w);
            }
        }
    }
    server.kill();
    drop(q);
    drop(c);
    writes
}

#[test]
fn killed_while_allocating_the_image_stays_consistent_and_keeps_flushed_writes() {
    let test = "killed_while_allocating_the_image_stays_consistent_and_keeps_flushed_writes";
    if !tests::nbd_server::have("qemu-img", test, "qemu-utils") {
        return;
    }
    let mut rng = 0x5eed_u64;
    for run in 0..10 {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("fresh.qcow2");
        // Small clusters and ascending writes on even runs: a new L2 table per 2 MiB
        // written, so that new tables (and their crash ordering) come often.
        let cluster = if run % 2 == 0 { "4096" } else { "65536" };
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-o"])
            .arg(format!("cluster_size={cluster}"))
            .arg(&image)
            .arg(SIZE.to_string())
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let disk = format!(
            "path={},format=qcow2,cache=writeback,aio=io_uring",
            image.display()
        );
        let mut server = Server::start(dir.path(), &["--disk", &disk]);
        let run_for = Duration::from_millis(100 + xorshift(&mut rng) % 500);
        let writes = write_then_crash(&mut server, xorshift(&mut rng), run % 2 == 0, run_for);
        let durable = writes.iter().filter(|w| w.durable).count();
        assert!(durable > 0, "run {run}: no flush completed in {run_for:?}");

        // The kernel lets go of the file (and its lock) once the dead process's
        // io_uring requests are done, a moment after the exit.
        let deadline = Instant::now() + Duration::from_secs(10);
        let (out, text) = loop {
            let out = Command::new("qemu-img")
                .args(["check", "-f", "qcow2"])
                .arg(&image)
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            if !text.contains("Failed to lock") || Instant::now() > deadline {
                break (out, text);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // 0: clean; 3: leaked clusters only. 2 is corruption, 1 a failed check.
        assert!(
            matches!(out.status.code(), Some(0 | 3)),
            "run {run}: qemu-img check: {:?}\n{text}",
            out.status
        );
        let raw = dir.path().join("converted.raw");
        let out = Command::new("qemu-img")
            .args(["convert", "-f", "qcow2", "-O", "raw"])
            .arg(&image)
            .arg(&raw)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let data = std::fs::read(&raw).unwrap();
        for (i, w) in writes.iter().enumerate().filter(|(_, w)| w.durable) {
            assert!(
                data[w.offset..w.offset + w.data.len()] == w.data[..],
                "run {run}: write {i} at {} ({} bytes) completed before a completed flush \
                 but did not survive ({durable} of {} writes were flushed)",
                w.offset,
                w.data.len(),
                writes.len()
            );
        }
        eprintln!(
            "run {run}: {} writes, {durable} flushed, killed after {run_for:?}; {}",
            writes.len(),
            text.lines().last().unwrap_or("")
        );
    }
}
