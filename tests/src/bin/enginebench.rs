//! Engine micro-benchmark: 4k random reads with O_DIRECT at QD1 and QD32 through each
//! block engine (via `DiskQueue`), next to `fio --ioengine=io_uring` on the same file.
//!
//! `cargo run --release -p tests --bin enginebench -- --file /var/tmp/enginebench.raw --size 1G`

// Benchmark figures: durations and I/O counts far below 2^53.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use block::bounce::AlignedBuf;
use block::{AioKind, CacheMode, Disk, DiskOptions, DiskQueue, EngineOptions};
use clap::Parser;
use tests::fio::{self, FioJob};
use tests::image::{parse_size, prepare};
use tests::latency::{Figures, Latencies};

#[derive(Parser, Debug)]
#[command(about = "4k random-read micro-benchmark of each block engine, beside fio")]
struct Args {
    /// Benchmark file (created and filled when missing or short).
    #[arg(long, default_value = "/var/tmp/enginebench.raw")]
    file: PathBuf,
    /// Size of the file.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    runtime: u64,
    /// Engines to measure.
    #[arg(long, value_delimiter = ',', default_value = "io_uring,native,threads")]
    engines: Vec<AioKind>,
    /// Queue depths to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    qd: Vec<u32>,
    /// Cache mode of our engines (fio always uses O_DIRECT).
    #[arg(long, default_value = "none")]
    cache: CacheMode,
    /// Skip the fio reference runs.
    #[arg(long)]
    no_fio: bool,
    /// Runs per cell, interleaved (fio, each engine, fio-batch, again...); the table
    /// shows the median.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Spin this many microseconds checking for completions before sleeping on the
    /// completion eventfd (adaptive polling's window; 0 sleeps at once).
    #[arg(long, default_value_t = 0)]
    poll_us: u64,
    /// Also write every figure as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("enginebench: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), String> {
    if args.size < 1 << 20 {
        return Err("--size must be at least 1M".into());
    }
    prepare(&args.file, args.size).map_err(|e| format!("{}: {e}", args.file.display()))?;
    let with_fio = !args.no_fio && fio::available();
    if !args.no_fio && !with_fio {
        eprintln!("fio not found: install it with `apt-get install fio` for the reference column");
    }
    println!(
        "4k random read, {} of {} MiB, {} s per cell, cache={}",
        args.file.display(),
        args.size >> 20,
        args.runtime,
        args.cache
    );
    println!(
        "{:<9} {:>4} {:>9} {:>8} {:>8} | {:>9} {:>8} {:>6} | {:>9} {:>6}",
        "engine",
        "QD",
        "IOPS",
        "p50 us",
        "p99 us",
        "fio IOPS",
        "fio p50",
        "ratio",
        "fio-batch",
        "ratio"
    );
    let mut rows = Vec::new();
    for &qd in &args.qd {
        let fio_run = |batched: bool| -> Result<Option<fio::FioResult>, String> {
            if !with_fio || (batched && qd == 1) {
                return Ok(None);
            }
            let job = FioJob {
                file: &args.file,
                ioengine: "io_uring",
                rw: "randread",
                block_size: 4096,
                iodepth: qd,
                runtime_s: args.runtime,
                size: args.size,
                batched,
            };
            fio::run(&job).map(Some)
        };
        let (mut streaming_runs, mut batched_runs) = (Vec::new(), Vec::new());
        let mut engine_runs = vec![Vec::new(); args.engines.len()];
        let repeat = args.repeat.max(1);
        let progress = |what: &str, run: usize| {
            eprint!(
                "\r\x1b[K  measuring QD{qd} {what}, run {} of {repeat}...",
                run + 1
            );
        };
        for run in 0..repeat {
            progress("fio", run);
            streaming_runs.extend(fio_run(false)?);
            for (runs, &kind) in engine_runs.iter_mut().zip(&args.engines) {
                progress(kind.as_str(), run);
                runs.push(measure(args, kind, qd)?);
            }
            progress("fio-batch", run);
            batched_runs.extend(fio_run(true)?);
        }
        eprint!("\r\x1b[K");
        let streaming = Figures::median(streaming_runs);
        let batched = Figures::median(batched_runs);
        let cell =
            |r: Option<f64>, prec: usize| r.map_or("-".to_string(), |v| format!("{v:.prec$}"));
        for (runs, &kind) in engine_runs.into_iter().zip(&args.engines) {
            let f = Figures::median(runs).ok_or("no runs")?;
            let ratio = streaming.map(|r| f.iops / r.iops);
            let ratio_batched = batched.map(|r| f.iops / r.iops);
            println!(
                "{:<9} {:>4} {:>9.0} {:>8.1} {:>8.1} | {:>9} {:>8} {:>6} | {:>9} {:>6}",
                kind.as_str(),
                qd,
                f.iops,
                f.p50_us,
                f.p99_us,
                cell(streaming.map(|r| r.iops), 0),
                cell(streaming.map(|r| r.p50_us), 1),
                cell(ratio, 2),
                cell(batched.map(|r| r.iops), 0),
                cell(ratio_batched, 2),
            );
            rows.push(serde_json::json!({
                "engine": kind.as_str(), "qd": qd, "iops": f.iops, "p50_us": f.p50_us,
                "p99_us": f.p99_us,
                "fio": streaming.map(|r| serde_json::json!({"iops": r.iops, "p50_us": r.p50_us, "p99_us": r.p99_us})),
                "fio_batched": batched.map(|r| serde_json::json!({"iops": r.iops, "p50_us": r.p50_us, "p99_us": r.p99_us})),
                "ratio_to_fio": ratio, "ratio_to_fio_batched": ratio_batched,
            }));
        }
    }
    println!(
        "fio: fio --ioengine=io_uring --direct=1 (submits each request as one completes); \
         fio-batch: the same with iodepth_batch_submit=QD (whole batches, as ours)"
    );
    if let Some(path) = &args.json {
        let doc = serde_json::json!({"workload": "4k randread", "cache": args.cache.as_str(),
            "size": args.size, "runtime_s": args.runtime, "results": rows});
        std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap_or_default())
            .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(())
}

/// Keeps `qd` 4k random reads in flight for the runtime (after a 1 s warm-up).
fn measure(args: &Args, kind: AioKind, qd: u32) -> Result<Figures, String> {
    let disk = Disk::open(&DiskOptions {
        readonly: true,
        cache: args.cache,
        ..DiskOptions::new(args.file.clone())
    })
    .map_err(|e| e.to_string())?;
    let options = EngineOptions {
        kind,
        queue_depth: qd,
        max_batch: 32,
        threads: 4,
        ..Default::default()
    };
    let mut q =
        DiskQueue::new(Arc::new(disk), &options, Default::default()).map_err(|e| e.to_string())?;
    let blocks = args.size / 4096;
    let mut bufs: Vec<AlignedBuf> = (0..qd)
        .map(|_| AlignedBuf::new(4096, 4096).ok_or("out of memory"))
        .collect::<Result<_, _>>()?;
    let mut started = vec![Instant::now(); qd as usize];
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next_offset = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % blocks) * 4096
    };
    for (i, buf) in bufs.iter_mut().enumerate() {
        // SAFETY: every buffer lives until the queue is drained at the end.
        unsafe { q.read(i as u64, next_offset(), &[buf.iovec()]) };
        started[i] = Instant::now();
    }
    q.submit().map_err(|e| e.to_string())?;
    let warmup_end = Instant::now() + Duration::from_secs(1);
    let end = warmup_end + Duration::from_secs(args.runtime);
    let mut lat = Latencies::with_capacity(1 << 20);
    let mut done = 0u64;
    let mut measuring_since = None;
    let mut finished = Vec::with_capacity(qd as usize);
    let (mut passes, mut reaped) = (0u64, 0u64);
    loop {
        let spin_until = Instant::now() + Duration::from_micros(args.poll_us);
        while !q.has_completions() && Instant::now() < spin_until {
            std::hint::spin_loop();
        }
        if !q.has_completions() {
            let mut pfd = libc::pollfd {
                fd: q.completion_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll touches only this pollfd.
            unsafe { libc::poll(&mut pfd, 1, 100) };
        }
        finished.clear();
        q.reap(|c| finished.push(c)).map_err(|e| e.to_string())?;
        passes += 1;
        reaped += finished.len() as u64;
        let now = Instant::now();
        if now >= end {
            break;
        }
        if measuring_since.is_none() && now >= warmup_end {
            measuring_since = Some(now);
        }
        for c in &finished {
            if let Err(e) = &c.result {
                return Err(format!("{kind}: read failed: {e}"));
            }
            let i = c.token as usize;
            if measuring_since.is_some() {
                lat.push(now.duration_since(started[i]).as_nanos() as u64);
                done += 1;
            }
            // SAFETY: as above.
            unsafe { q.read(c.token, next_offset(), &[bufs[i].iovec()]) };
            started[i] = Instant::now();
        }
        q.submit().map_err(|e| e.to_string())?;
    }
    if std::env::var_os("ENGINEBENCH_DEBUG").is_some() {
        eprintln!(
            "{kind} qd{qd}: {passes} passes, {:.2} completions per pass",
            reaped as f64 / passes.max(1) as f64
        );
    }
    let elapsed = measuring_since.map_or(0.0, |t| t.elapsed().as_secs_f64());
    q.drain(Duration::from_secs(10), |_| {})
        .map_err(|e| e.to_string())?;
    Ok(Figures {
        iops: if elapsed > 0.0 {
            done as f64 / elapsed
        } else {
            0.0
        },
        p50_us: lat.percentile_us(50.0),
        p99_us: lat.percentile_us(99.0),
    })
}
