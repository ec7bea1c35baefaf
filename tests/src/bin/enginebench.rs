//! Engine micro-benchmark: 4k random reads with O_DIRECT at QD1 and QD32 through each
//! block engine (via `DiskQueue`), next to `fio --ioengine=io_uring` on the same file.
//!
//! `cargo run --release -p tests --bin enginebench -- --file /var/tmp/enginebench.raw --size 1G`

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use block::bounce::AlignedBuf;
use block::{AioKind, CacheMode, Disk, DiskOptions, DiskQueue, EngineOptions};
use clap::Parser;
use tests::fio::{self, FioJob};
use tests::image::{parse_size, prepare};
use tests::latency::Latencies;

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
    /// Also write every figure as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

struct Figures {
    iops: f64,
    p50_us: f64,
    p99_us: f64,
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
        "{:<9} {:>4} {:>10} {:>9} {:>9} {:>12} {:>9} {:>9} {:>7}",
        "engine", "QD", "IOPS", "p50 us", "p99 us", "fio IOPS", "fio p50", "fio p99", "ratio"
    );
    let mut rows = Vec::new();
    for &qd in &args.qd {
        let reference = if with_fio {
            let job = FioJob {
                file: &args.file,
                ioengine: "io_uring",
                rw: "randread",
                block_size: 4096,
                iodepth: qd,
                runtime_s: args.runtime,
                size: args.size,
            };
            Some(fio::run(&job)?)
        } else {
            None
        };
        for &kind in &args.engines {
            let f = measure(args, kind, qd)?;
            let ratio = reference.map(|r| f.iops / r.iops);
            println!(
                "{:<9} {:>4} {:>10.0} {:>9.1} {:>9.1} {:>12} {:>9} {:>9} {:>7}",
                kind.as_str(),
                qd,
                f.iops,
                f.p50_us,
                f.p99_us,
                reference.map_or("-".into(), |r| format!("{:.0}", r.iops)),
                reference.map_or("-".into(), |r| format!("{:.1}", r.p50_us)),
                reference.map_or("-".into(), |r| format!("{:.1}", r.p99_us)),
                ratio.map_or("-".into(), |r| format!("{r:.2}")),
            );
            rows.push(serde_json::json!({
                "engine": kind.as_str(), "qd": qd, "iops": f.iops, "p50_us": f.p50_us,
                "p99_us": f.p99_us, "fio_iops": reference.map(|r| r.iops),
                "fio_p50_us": reference.map(|r| r.p50_us), "fio_p99_us": reference.map(|r| r.p99_us),
                "ratio_to_fio": ratio,
            }));
        }
    }
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
        path: args.file.clone(),
        readonly: true,
        cache: args.cache,
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
    loop {
        let mut pfd = libc::pollfd {
            fd: q.completion_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll touches only this pollfd.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        finished.clear();
        q.reap(|c| finished.push(c)).map_err(|e| e.to_string())?;
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
