//! Live mirror benchmark (issue 15): what a running mirror costs a guest, and how fast it
//! copies.
//!
//! - Guest impact: libblkio (a real vhost-user frontend) runs 4k random reads and writes
//!   at QD32 against our `vhost-user-blk`, first alone, then while the backend mirrors
//!   the disk at unlimited speed to a local file; the ratio is the IOPS with the job over
//!   the IOPS without (the target is 0.7 or more). The job must still be copying when
//!   the window closes, else the figure says so.
//! - Copy rate: the time our mirror of the idle disk takes to reach `ready`, beside
//!   `qemu-img convert -t none -T none` of the same image on this machine.
//!
//! `cargo run --release -p tests --bin mirrorbench -- --dir /var/tmp --size 2G`

// Benchmark figures: durations and I/O counts far below 2^53.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};
use tests::blkio_load::{self, Pattern, Workload};
use tests::contender::{Backend, our_binary};
use tests::image::{parse_size, prepare};

#[derive(Parser, Debug)]
#[command(
    about = "What a live mirror costs a guest's I/O, and its copy rate beside qemu-img convert"
)]
struct Args {
    /// Directory for the images (not tmpfs: O_DIRECT).
    #[arg(long, default_value = "/var/tmp")]
    dir: PathBuf,
    /// Size of the disk.
    #[arg(long, default_value = "2G", value_parser = parse_size)]
    size: u64,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 3)]
    runtime: u64,
}

/// One HTTP/1.1 request on the backend's API socket; (status, JSON body).
fn call(
    api: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut s = UnixStream::connect(api).map_err(|e| format!("{}: {e}", api.display()))?;
    write!(
        s,
        "{method} /api/v1/{path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).map_err(|e| e.to_string())?;
    let status = reply
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad reply: {reply}"))?;
    let json = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim())
        .filter(|b| !b.is_empty())
        .map_or(Ok(Value::Null), serde_json::from_str)
        .map_err(|e| format!("reply body: {e}"))?;
    if status >= 300 {
        return Err(format!("{method} {path}: {status} {json}"));
    }
    Ok((status, json))
}

fn job(api: &Path) -> Result<Value, String> {
    let (_, jobs) = call(api, "GET", "jobs", None)?;
    Ok(jobs
        .as_array()
        .and_then(|a| a.last().cloned())
        .unwrap_or(Value::Null))
}

fn start_mirror(api: &Path, target: &Path) -> Result<(), String> {
    let _ = std::fs::remove_file(target);
    call(
        api,
        "PUT",
        "disk.mirror",
        Some(&json!({"job_id": "bench", "target": {"path": target}})),
    )
    .map(drop)
}

fn cancel(api: &Path) {
    let _ = call(
        api,
        "PUT",
        "job-cancel",
        Some(&json!({"job_id": "bench", "force": true})),
    );
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1_048_576.0 / d.as_secs_f64().max(1e-9)
}

fn main() -> Result<(), String> {
    let args = Args::parse();
    let binary = our_binary().ok_or("build vhost-user-blk first (cargo build --release)")?;
    let source = args.dir.join("mirrorbench-src.raw");
    let target = args.dir.join("mirrorbench-dst.raw");
    let converted = args.dir.join("mirrorbench-convert.raw");
    eprintln!(
        "preparing {} ({} MiB)...",
        source.display(),
        args.size >> 20
    );
    prepare(&source, args.size).map_err(|e| format!("{}: {e}", source.display()))?;

    // qemu-img first: our backend locks the image.
    let qemu = if let Some(qemu_img) = tests::nbd_server::which("qemu-img") {
        let _ = std::fs::remove_file(&converted);
        let t0 = Instant::now();
        let out = Command::new(qemu_img)
            .args([
                "convert", "-f", "raw", "-O", "raw", "-t", "none", "-T", "none",
            ])
            .arg(&source)
            .arg(&converted)
            .output()
            .map_err(|e| format!("qemu-img: {e}"))?;
        let took = t0.elapsed();
        if !out.status.success() {
            return Err(format!(
                "qemu-img convert: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let _ = std::fs::remove_file(&converted);
        println!(
            "copy rate: qemu-img convert -t none -T none {:.0} MiB/s ({took:.2?})",
            mib_s(args.size, took)
        );
        Some(took)
    } else {
        println!("copy rate: qemu-img not installed (qemu-utils): no comparison");
        None
    };

    let socket = args.dir.join("mirrorbench.sock");
    let api = args.dir.join("mirrorbench.api");
    let mut cmd = Command::new(&binary);
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--disk")
        .arg(format!(
            "path={},cache=none,aio=io_uring,queue_size=1024",
            source.display()
        ))
        .arg("--api-socket")
        .arg(&api)
        .env("RUST_LOG", "warn");
    let backend = Backend::spawn("ours".into(), &socket, cmd)?;

    // Copy rate: ours to ready on an idle disk.
    start_mirror(&api, &target)?;
    let t0 = Instant::now();
    loop {
        let j = job(&api)?;
        match j["state"].as_str() {
            Some("ready") => break,
            Some("failed" | "cancelled") => return Err(format!("mirror: {j}")),
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    let ours = t0.elapsed();
    cancel(&api);
    println!(
        "copy rate: ours {:.0} MiB/s ({} MiB to ready in {:.2?})",
        mib_s(args.size, ours),
        args.size >> 20,
        ours
    );
    if let Some(took) = qemu {
        println!(
            "copy rate: ours / qemu-img = {:.2}",
            took.as_secs_f64() / ours.as_secs_f64()
        );
    }

    // Guest impact: the same load alone and during the job's copy.
    let runtime = Duration::from_secs(args.runtime);
    let warmup = Duration::from_millis(500);
    for write in [false, true] {
        let w = Workload {
            random: true,
            write,
            block_size: 4096,
            iodepth: 32,
            queues: 1,
        };
        let alone = blkio_load::run(&socket, w, Pattern::Batch, warmup, runtime, &mut || None)?;
        start_mirror(&api, &target)?;
        let during = blkio_load::run(&socket, w, Pattern::Batch, warmup, runtime, &mut || None)?;
        let j = job(&api)?;
        cancel(&api);
        let copying = j["state"] == "running";
        println!(
            "{}: alone {:.0} IOPS, during a mirror {:.0} IOPS, ratio {:.2}{} (job {} at the window's end, {} MiB copied)",
            w.label(),
            alone.figures.iops,
            during.figures.iops,
            during.figures.iops / alone.figures.iops.max(1.0),
            if copying {
                ""
            } else {
                " [the copy ended inside the window: use a larger --size]"
            },
            j["state"].as_str().unwrap_or("?"),
            j["bytes_done"].as_u64().unwrap_or(0) >> 20,
        );
    }
    drop(backend);
    let _ = std::fs::remove_file(&target);
    Ok(())
}
