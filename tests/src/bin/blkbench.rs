//! Side-by-side vhost-user-blk benchmark: our backend and qemu-storage-daemon on the same
//! file (O_DIRECT) and on a null backend, driven by one libblkio client, runs
//! interleaved, each cell the median of `--repeat` runs.
//!
//! `cargo build --release --workspace && target/release/blkbench --file /var/tmp/bench.raw --size 1G`

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tests::blkio_load::{self, Workload};
use tests::contender::{Backend, Target, our_binary, qsd_binary};
use tests::image::{parse_size, prepare};
use tests::latency::Figures;

#[derive(Parser, Debug)]
#[command(about = "vhost-user-blk: ours vs qemu-storage-daemon, measured with libblkio")]
struct Args {
    /// Benchmark image (created and filled when missing or short).
    #[arg(long, default_value = "/var/tmp/blkbench.raw")]
    file: PathBuf,
    /// Image size.
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    size: u64,
    /// Seconds measured per run (after a 1 s warm-up).
    #[arg(long, default_value_t = 4)]
    runtime: u64,
    /// Runs per cell (median shown).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Queue depths.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    qd: Vec<usize>,
    /// Settings of our iothread, e.g. `poll_max_ns=0` (key=value,...).
    #[arg(long)]
    iothread: Option<String>,
    /// Skip the null backends.
    #[arg(long)]
    no_null: bool,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("blkbench: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), String> {
    let ours = our_binary().ok_or(
        "vhost-user-blk binary not found beside blkbench: cargo build --release --workspace",
    )?;
    let qsd = qsd_binary();
    if qsd.is_none() {
        eprintln!(
            "qemu-storage-daemon not found: apt-get install qemu-utils (Debian) for the peer column"
        );
    }
    prepare(&args.file, args.size).map_err(|e| format!("{}: {e}", args.file.display()))?;
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut targets = vec![
        Target::File {
            path: args.file.clone(),
            aio: "io_uring",
        },
        Target::File {
            path: args.file.clone(),
            aio: "native",
        },
    ];
    if !args.no_null {
        targets.push(Target::Null { size: args.size });
    }
    println!(
        "4k random read, libblkio virtio-blk-vhost-user client, {} s per run, median of {}",
        args.runtime, args.repeat
    );
    println!(
        "{:<26} {:>9} {:>8} {:>8} {:>9} | {:>9} {:>8} {:>8} {:>9} | {:>6}",
        "workload / backend",
        "ours IOPS",
        "p50 us",
        "p99 us",
        "us CPU/IO",
        "qsd IOPS",
        "p50 us",
        "p99 us",
        "us CPU/IO",
        "ratio"
    );
    for &qd in &args.qd {
        let workload = Workload {
            random: true,
            write: false,
            block_size: 4096,
            iodepth: qd,
            queues: 1,
        };
        for target in &targets {
            let mut mine = Vec::new();
            let mut peer = Vec::new();
            for run in 0..args.repeat.max(1) {
                eprint!(
                    "\r\x1b[K  {} {:?} run {}...",
                    workload.label(),
                    target,
                    run + 1
                );
                let sock = dir.path().join("ours.sock");
                mine.push(measure(
                    Backend::ours(&ours, &sock, target, 1, args.iothread.as_deref())?,
                    workload,
                    args,
                )?);
                if let Some(q) = &qsd {
                    let sock = dir.path().join("qsd.sock");
                    peer.push(measure(Backend::qsd(q, &sock, target, 1)?, workload, args)?);
                }
            }
            eprint!("\r\x1b[K");
            let m = median(mine);
            let p = median(peer);
            let label = match target {
                Target::File { aio, .. } => format!("QD{qd} file aio={aio}"),
                Target::Null { .. } => format!("QD{qd} null"),
            };
            let cell = |f: Option<(Figures, f64)>| match f {
                Some((f, cpu)) => format!(
                    "{:>9.0} {:>8.1} {:>8.1} {:>9.2}",
                    f.iops, f.p50_us, f.p99_us, cpu
                ),
                None => format!("{:>9} {:>8} {:>8} {:>9}", "-", "-", "-", "-"),
            };
            let ratio = match (m, p) {
                (Some((a, _)), Some((b, _))) => format!("{:.2}", a.iops / b.iops),
                _ => "-".into(),
            };
            println!("{label:<26} {} | {} | {ratio:>6}", cell(m), cell(p));
        }
    }
    Ok(())
}

/// One run: IOPS, latency and the backend's CPU microseconds per I/O.
fn measure(backend: Backend, workload: Workload, args: &Args) -> Result<(Figures, f64), String> {
    let cpu0 = backend.cpu_time();
    let f = blkio_load::run(
        &backend.socket,
        workload,
        Duration::from_secs(1),
        Duration::from_secs(args.runtime),
    )
    .map_err(|e| format!("{}: {e}", backend.name))?;
    let cpu = backend.cpu_time().saturating_sub(cpu0);
    let ios = f.iops * (args.runtime as f64 + 1.0);
    Ok((f, cpu.as_secs_f64() * 1e6 / ios.max(1.0)))
}

fn median(mut runs: Vec<(Figures, f64)>) -> Option<(Figures, f64)> {
    runs.sort_by(|a, b| a.0.iops.total_cmp(&b.0.iops));
    runs.get(runs.len() / 2).copied()
}
