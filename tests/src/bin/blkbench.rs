//! Side-by-side vhost-user-blk benchmark: host io_uring on the file (the limit), our
//! backend and qemu-storage-daemon (the newest QEMU's it finds) on the same O_DIRECT file
//! and on null backends, all driven by one libblkio client with the `batch` and the
//! `resubmit` pattern, contenders interleaved, each cell the median of `--repeat` runs
//! with their spread. Prints a table, writes every figure as JSON and an SVG chart.
//!
//! `cargo build --release --workspace && target/release/blkbench --file /var/tmp/blkbench.raw --size 1G`

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use tests::bench::contenders::{self, Contender, Server, Setup, Storage};
use tests::bench::host::HostInfo;
use tests::bench::pattern::{self, Pattern};
use tests::bench::report::{Report, Settings};
use tests::bench::runner::{self, Plan};
use tests::bench::workload::{self, NamedWorkload};
use tests::bench::{chart, host_uring, table};
use tests::contender::{NEWEST_QEMU_BIN, newest_qsd, our_binary, qsd_binary, qsd_version};
use tests::image::{parse_size, prepare};

const AFTER_HELP: &str = "\
Workloads: randread-4k-qd1, randread-4k-qd32, randwrite-4k-qd1, randwrite-4k-qd32, \
read-128k-qd8, write-128k-qd8, randread-4k-qd32-2q, randread-4k-qd32-4q (or all).
Contenders: limit (host io_uring on the file, O_DIRECT), ours-io_uring, ours-native, \
ours-null, qsd-io_uring, qsd-native, qsd-null, ours-nbd, qsd-nbd, ours-qcow2, qsd-qcow2, \
ours-qcow2-fresh, qsd-qcow2-fresh (or all, ours, qsd, nbd, qcow2). \
The nbd contenders are NBD clients (our engine; qsd's driver=nbd) of one qemu-nbd serving \
the file (--cache=none --aio=native) on a Unix socket, started per run. The qcow2 contenders \
serve a qcow2 image (O_DIRECT, io_uring; qsd: driver=qcow2 over driver=file): the file \
converted once with every cluster allocated (<file>.qcow2), or with -fresh a new empty \
image per run (every write allocates).
In-VM contenders (--in-vm): vm-ours-null, vm-qemu-iothread-null, vm-qemu-null, and \
likewise with -io_uring and -native for -null (or all, ours, qemu, null, io_uring, native).
Patterns (of the libblkio client; every ours-* and qsd-* contender runs with each): \
batch (reap up to QD completions per do_io, send their replacements together), resubmit \
(reap one, send its replacement at the next do_io: fio's default). limit always batches.
qemu-storage-daemon: --qsd PATH, else the one in --qemu-bin DIR, else QEMU 10.0's in \
/var/tmp/qemu10/x/usr/bin when scripts/qemu10.sh has unpacked it, else PATH's; \
its version heads the table and is in the JSON.
--quick: 0.5 s runs after 0.2 s warm-up, 1 run per cell, a 256M file unless --size is \
given, both patterns, and the workloads randread-4k-qd1, randread-4k-qd32, \
randwrite-4k-qd32, read-128k-qd8, randread-4k-qd32-2q; options given explicitly win.
Exit status: 0 when every cell ran, 1 when something failed, 2 on bad arguments.";

#[derive(Parser, Debug, Clone)]
#[command(
    about = "vhost-user-blk: ours vs qemu-storage-daemon vs host io_uring, measured with libblkio",
    after_help = AFTER_HELP
)]
struct Args {
    /// Benchmark image, on a filesystem with O_DIRECT (not tmpfs); created and filled
    /// when missing or short, and overwritten by the write workloads.
    #[arg(long, default_value = "/var/tmp/blkbench.raw")]
    file: PathBuf,
    /// Image size (and null backend size) [default: 1G, 256M with --quick].
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Seconds measured per run [default: 3, 0.5 with --quick].
    #[arg(long)]
    runtime: Option<f64>,
    /// Seconds of warm-up before each measured window [default: 1, 0.2 with --quick].
    #[arg(long)]
    warmup: Option<f64>,
    /// Runs per cell; the table shows medians [default: 3, 1 with --quick].
    #[arg(long)]
    repeat: Option<usize>,
    /// Workloads to run (comma list; see below) [default: all, a subset with --quick].
    #[arg(long, value_delimiter = ',')]
    workloads: Vec<String>,
    /// Contenders to run (comma list; see below) [default: all].
    #[arg(long, value_delimiter = ',')]
    contenders: Vec<String>,
    /// Client patterns of the vhost-user contenders (comma list: batch, resubmit, all)
    /// [default: batch,resubmit].
    #[arg(long, value_delimiter = ',')]
    patterns: Vec<String>,
    /// A short run of every contender on a representative subset, for checks.
    #[arg(long)]
    quick: bool,
    /// Where to write every figure as JSON.
    #[arg(long, default_value = "target/blkbench/results.json")]
    json: PathBuf,
    /// Where to write the SVG chart.
    #[arg(long, default_value = "target/blkbench/iops.svg")]
    svg: PathBuf,
    /// Our vhost-user-blk binary [default: beside blkbench].
    #[arg(long)]
    ours: Option<PathBuf>,
    /// qemu-storage-daemon binary (wins over --qemu-bin).
    #[arg(long)]
    qsd: Option<PathBuf>,
    /// QEMU's bin directory, holding qemu-storage-daemon [default: /var/tmp/qemu10/x/usr/bin
    /// (QEMU 10.0, unpacked by scripts/qemu10.sh) when there, else PATH].
    #[arg(long, value_name = "DIR")]
    qemu_bin: Option<PathBuf>,
    /// The NBD server of the nbd contenders (an NBD URI: `nbd://host[:port]/export`,
    /// `nbd+unix:///export?socket=PATH`) instead of a qemu-nbd on --file started per run.
    /// Write workloads write to it.
    #[arg(long, value_parser = parse_nbd_uri)]
    nbd: Option<block::nbd::NbdUri>,
    /// Settings of our iothread, e.g. `poll_max_ns=0` (key=value,...); with --in-vm, of
    /// the guest disk's iothread under our vmm.
    #[arg(long)]
    iothread: Option<String>,
    /// Run the in-VM contenders instead: the test guest under our `vmm` and under
    /// `qemu-system-x86_64 -accel kvm` with and without an iothread (4k random reads,
    /// polled and with interrupts; `--runtime` is each phase's length). Figures go to
    /// `invm.json` beside `--json`.
    #[arg(long)]
    in_vm: bool,
    /// Our `vmm` binary for `--in-vm` [default: beside blkbench].
    #[arg(long)]
    vmm: Option<PathBuf>,
}

/// Why the benchmark stopped.
enum Failure {
    /// The arguments cannot work (exit 2).
    Usage(String),
    /// Something went wrong while running (exit 1).
    Run(String),
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(e)) => {
            eprintln!("blkbench: {e}");
            ExitCode::from(2)
        }
        Err(Failure::Run(e)) => {
            eprintln!("blkbench: {e}");
            ExitCode::from(1)
        }
    }
}

/// A number of seconds from the command line, checked.
fn seconds(name: &str, v: f64, min: f64) -> Result<Duration, Failure> {
    if !v.is_finite() || v < min || v > 3600.0 {
        return Err(Failure::Usage(format!(
            "--{name} {v}: give seconds between {min} and 3600"
        )));
    }
    Ok(Duration::from_secs_f64(v))
}

/// The run's shape, from the arguments and the `--quick` defaults.
struct Choice {
    size: u64,
    runtime: Duration,
    warmup: Duration,
    repeat: usize,
    workloads: Vec<NamedWorkload>,
    contenders: Vec<Contender>,
    patterns: Vec<Pattern>,
}

fn choose(args: &Args) -> Result<Choice, Failure> {
    let quick = args.quick;
    let size = args.size.unwrap_or(if quick { 256 << 20 } else { 1 << 30 });
    if size < 1 << 20 || !size.is_multiple_of(4096) {
        return Err(Failure::Usage(format!(
            "--size {size}: give at least 1M, a multiple of 4K"
        )));
    }
    let runtime = seconds(
        "runtime",
        args.runtime.unwrap_or(if quick { 0.5 } else { 3.0 }),
        0.1,
    )?;
    let warmup = seconds(
        "warmup",
        args.warmup.unwrap_or(if quick { 0.2 } else { 1.0 }),
        0.0,
    )?;
    let repeat = args.repeat.unwrap_or(if quick { 1 } else { 3 });
    if !(1..=100).contains(&repeat) {
        return Err(Failure::Usage(format!("--repeat {repeat}: give 1 to 100")));
    }
    let workloads = if !args.workloads.is_empty() {
        workload::parse_list(&args.workloads)
    } else if quick {
        workload::parse_list(&workload::QUICK.map(String::from))
    } else {
        Ok(workload::ALL.to_vec())
    }
    .map_err(Failure::Usage)?;
    let contenders = if args.contenders.is_empty() {
        contenders::ALL.to_vec()
    } else {
        contenders::parse_list(&args.contenders).map_err(Failure::Usage)?
    };
    let patterns = if args.patterns.is_empty() {
        pattern::ALL.to_vec()
    } else {
        pattern::parse_list(&args.patterns).map_err(Failure::Usage)?
    };
    Ok(Choice {
        size,
        runtime,
        warmup,
        repeat,
        workloads,
        contenders,
        patterns,
    })
}

fn parse_nbd_uri(s: &str) -> Result<block::nbd::NbdUri, String> {
    s.parse()
}

/// Our binary (an empty path when no contender of ours runs) and qemu-storage-daemon's,
/// with the reason each qsd contender is skipped when it is missing.
type Binaries = (PathBuf, Option<PathBuf>, Vec<(&'static str, String)>);

fn binaries(args: &Args, asked: &[Contender]) -> Result<Binaries, Failure> {
    let ours = match &args.ours {
        Some(p) if p.is_file() => p.clone(),
        Some(p) => {
            return Err(Failure::Usage(format!(
                "--ours {}: no such file",
                p.display()
            )));
        }
        None if asked.iter().all(|c| c.server != Server::Ours) => PathBuf::new(),
        None => our_binary().ok_or_else(|| {
            Failure::Run(
                "vhost-user-blk not found beside blkbench: build it with \
                 `cargo build --release --workspace` (or pass --ours PATH)"
                    .into(),
            )
        })?,
    };
    let wants_qsd = asked.iter().any(|c| c.server == Server::Qsd);
    let (qsd, missing) = find_qsd(args, wants_qsd)?;
    let mut skipped = Vec::new();
    let qemu_nbd = tests::nbd_server::which("qemu-nbd");
    if qemu_nbd.is_none() && args.nbd.is_none() && asked.iter().any(|c| c.storage == Storage::Nbd) {
        let why = "qemu-nbd is not installed (apt-get install qemu-utils)".to_string();
        eprintln!("blkbench: {why}; the nbd columns are skipped.");
        for c in asked.iter().filter(|c| c.storage == Storage::Nbd) {
            skipped.push((c.name, why.clone()));
        }
    }
    let is_qcow2 = |c: &Contender| matches!(c.storage, Storage::Qcow2 { .. });
    if tests::nbd_server::which("qemu-img").is_none() && asked.iter().any(is_qcow2) {
        let why = "qemu-img is not installed (apt-get install qemu-utils)".to_string();
        eprintln!("blkbench: {why}; the qcow2 columns are skipped.");
        for c in asked.iter().filter(|c| is_qcow2(c)) {
            skipped.push((c.name, why.clone()));
        }
    }
    if qsd.is_none() && wants_qsd {
        eprintln!(
            "blkbench: {}; the qsd columns are skipped.{}",
            missing.0, missing.1
        );
        for c in asked.iter().filter(|c| c.server == Server::Qsd) {
            if !skipped.iter().any(|(n, _)| *n == c.name) {
                skipped.push((c.name, missing.0.clone()));
            }
        }
    }
    Ok((ours, qsd, skipped))
}

/// The qemu-storage-daemon to run: `--qsd`, else the one in `--qemu-bin`, else the
/// newest QEMU's (10.0, when unpacked), else PATH's, saying (when `wants` it) that it
/// fell back. With none, why (for the skip lines) and a hint.
fn find_qsd(args: &Args, wants: bool) -> Result<(Option<PathBuf>, (String, String)), Failure> {
    if let Some(p) = &args.qsd {
        if !p.is_file() {
            return Err(Failure::Usage(format!(
                "--qsd {}: no such file",
                p.display()
            )));
        }
        return Ok((Some(p.clone()), Default::default()));
    }
    if let Some(dir) = &args.qemu_bin {
        if !dir.is_dir() {
            return Err(Failure::Usage(format!(
                "--qemu-bin {}: no such directory",
                dir.display()
            )));
        }
        let qsd = dir.join("qemu-storage-daemon");
        let why = format!("no qemu-storage-daemon in {}", dir.display());
        return Ok((qsd.is_file().then_some(qsd), (why, String::new())));
    }
    if let Some(qsd) = newest_qsd() {
        return Ok((Some(qsd), Default::default()));
    }
    let qsd = qsd_binary();
    if wants && qsd.is_some() {
        eprintln!(
            "blkbench: QEMU 10.0 is not unpacked in {NEWEST_QEMU_BIN} \
             (scripts/qemu10.sh does that); using qemu-storage-daemon from PATH."
        );
    }
    let hint = format!(
        " Unpack QEMU 10.0 into {NEWEST_QEMU_BIN} with scripts/qemu10.sh, or \
         install the system's with `apt-get install qemu-system-x86` (Debian; the binary \
         itself is in qemu-system-common, not qemu-utils), or pass --qsd PATH."
    );
    let why = "qemu-storage-daemon not installed".to_string();
    Ok((qsd, (why, hint)))
}

fn run(args: &Args) -> Result<(), Failure> {
    if args.in_vm {
        let which = if args.contenders.is_empty() {
            tests::bench::invm::ALL.to_vec()
        } else {
            tests::bench::invm::parse_list(&args.contenders).map_err(Failure::Usage)?
        };
        let no_filter = Args {
            contenders: Vec::new(),
            ..args.clone()
        };
        return run_in_vm(args, &choose(&no_filter)?, &which);
    }
    let Choice {
        size,
        runtime,
        warmup,
        repeat,
        workloads,
        contenders: asked,
        patterns,
    } = choose(args)?;
    let (ours, qsd, skipped) = binaries(args, &asked)?;
    let runnable: Vec<_> = asked
        .iter()
        .copied()
        .filter(|c| c.server != Server::Qsd || qsd.is_some())
        .filter(|c| !skipped.iter().any(|(n, _)| *n == c.name))
        .collect();

    let file_size = prepare_file(&args.file, size, &runnable)?.unwrap_or(size);
    let sockets = tempfile::Builder::new()
        .prefix("blkbench-")
        .tempdir()
        .map_err(|e| Failure::Run(format!("socket directory: {e}")))?;
    let setup = Setup {
        file: args.file.clone(),
        null_size: size,
        ours: ours.clone(),
        qsd: qsd.clone(),
        qemu_nbd: tests::nbd_server::which("qemu-nbd"),
        nbd: args.nbd.clone(),
        iothread: args.iothread.clone(),
        sockets: sockets.path().to_path_buf(),
    };
    let plan = Plan {
        workloads: workloads.clone(),
        contenders: runnable,
        patterns: patterns.clone(),
        repeat,
        warmup,
        runtime,
    };
    let host = HostInfo::probe();
    let cells = runner::run(&plan, &setup);
    let report = Report {
        host,
        settings: Settings {
            file: args.file.clone(),
            size: file_size,
            null_size: size,
            runtime_s: runtime.as_secs_f64(),
            warmup_s: warmup.as_secs_f64(),
            repeat,
            quick: args.quick,
            patterns,
            ours,
            qsd_version: qsd.as_deref().and_then(qsd_version),
            qsd,
            iothread: args.iothread.clone(),
        },
        workloads,
        contenders: asked,
        skipped,
        cells,
    };
    print!("{}", table::render(&report));
    write_outputs(&report, &args.json, &args.svg)?;
    let failed: Vec<String> = report
        .failed()
        .map(|c| {
            format!(
                "{} {} [{}]",
                c.workload.name,
                c.contender.name,
                c.pattern.as_str()
            )
        })
        .collect();
    if !failed.is_empty() {
        return Err(Failure::Run(format!(
            "{} cell(s) failed: {}",
            failed.len(),
            failed.join(", ")
        )));
    }
    Ok(())
}

/// `--in-vm`: every in-VM contender, interleaved, `--repeat` rounds; a table of medians
/// with ours against QEMU with and without an iothread.
fn run_in_vm(
    args: &Args,
    choice: &Choice,
    which: &[tests::bench::invm::VmContender],
) -> Result<(), Failure> {
    use tests::bench::invm::{self, VmSetup};

    let vmm = match &args.vmm {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .ok()
            .and_then(|e| Some(e.parent()?.join("vmm")))
            .filter(|p| p.is_file())
            .ok_or_else(|| {
                Failure::Run("vmm not found beside blkbench: cargo build --release --workspace (or pass --vmm PATH)".into())
            })?,
    };
    if !Path::new("/dev/kvm").exists() {
        return Err(Failure::Run("--in-vm needs /dev/kvm".into()));
    }
    let elf = tests::test_guest::build().map_err(|e| Failure::Run(e.to_string()))?;
    prepare(&args.file, choice.size)
        .map_err(|e| Failure::Usage(format!("{}: {e}", args.file.display())))?;
    let dir = tempfile::Builder::new()
        .prefix("blkbench-vm-")
        .tempdir()
        .map_err(|e| Failure::Run(format!("work directory: {e}")))?;
    let qemu_bin = args
        .qemu_bin
        .clone()
        .unwrap_or_else(|| PathBuf::from(NEWEST_QEMU_BIN));
    let qemu = invm::find_qemu(&qemu_bin);
    let version = qemu.as_ref().map(|(q, _)| invm::qemu_version(q));
    let setup = VmSetup {
        elf,
        vmm,
        qemu,
        file: args.file.clone(),
        null_size: choice.size,
        phase_ms: u64::try_from(choice.runtime.as_millis()).unwrap_or(u64::MAX),
        tsc_khz: invm::tsc_khz(),
        dir: dir.path().to_path_buf(),
        iothread: args.iothread.clone(),
    };
    let results = invm::run_all(which, &setup, choice.repeat);
    println!(
        "\nIn a VM: the test guest, 1 vCPU, one virtio-blk disk; 4k random reads at full depth, \
         polled and with MSI-X interrupts; {} ms per phase; medians of {} interleaved rounds; \
         file {} with cache=none; QEMU: {}",
        setup.phase_ms,
        choice.repeat,
        args.file.display(),
        version.as_deref().unwrap_or("missing")
    );
    print!("{}", invm::table(&results));
    let json = serde_json::json!({
        "qemu": version,
        "phase_ms": setup.phase_ms,
        "repeat": choice.repeat,
        "host_limit_iops": results.limit,
        "runs": results.runs.iter().map(|(c, runs)| serde_json::json!({
            "contender": c.name,
            "iops_poll": runs.iter().map(|f| f.iops_poll).collect::<Vec<_>>(),
            "iops_irq": runs.iter().map(|f| f.iops_irq).collect::<Vec<_>>(),
            "write_iops_poll": runs.iter().map(|f| f.write_poll).collect::<Vec<_>>(),
            "write_iops_irq": runs.iter().map(|f| f.write_irq).collect::<Vec<_>>(),
            "qd1_latency_us_poll": runs.iter().map(|f| f.lat_poll_us).collect::<Vec<_>>(),
            "qd1_latency_us_irq": runs.iter().map(|f| f.lat_irq_us).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    let path = args.json.with_file_name("invm.json");
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| Failure::Run(format!("{}: {e}", parent.display())))?;
    }
    std::fs::write(&path, format!("{json:#}\n"))
        .map_err(|e| Failure::Run(format!("{}: {e}", path.display())))?;
    println!("blkbench: wrote {}", path.display());
    if results.runs.len() < which.len() && setup.qemu.is_some() {
        return Err(Failure::Run(
            "some in-VM contenders failed (see above)".into(),
        ));
    }
    Ok(())
}

/// Creates or extends the image and checks that it opens with O_DIRECT; returns its
/// length (None when no contender uses the file).
fn prepare_file(file: &Path, size: u64, runnable: &[Contender]) -> Result<Option<u64>, Failure> {
    if !runnable.iter().any(|c| c.uses_file()) {
        return Ok(None);
    }
    prepare(file, size).map_err(|e| Failure::Usage(format!("{}: {e}", file.display())))?;
    let f = host_uring::open_direct(file).map_err(|e| {
        Failure::Usage(format!(
            "{}: cannot open with O_DIRECT ({e}); put the file on a disk filesystem, not tmpfs",
            file.display()
        ))
    })?;
    let len = f
        .metadata()
        .map_err(|e| Failure::Run(format!("{}: {e}", file.display())))?
        .len();
    Ok(Some(len))
}

/// Writes the JSON and the SVG, creating their directories.
fn write_outputs(report: &Report, json: &Path, svg: &Path) -> Result<(), Failure> {
    for p in [json, svg] {
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| Failure::Run(format!("{}: {e}", dir.display())))?;
        }
    }
    let text = serde_json::to_string_pretty(&report.to_json())
        .map_err(|e| Failure::Run(format!("JSON: {e}")))?;
    std::fs::write(json, text + "\n")
        .map_err(|e| Failure::Run(format!("{}: {e}", json.display())))?;
    chart::write_svg(report, svg).map_err(Failure::Run)?;
    eprintln!("blkbench: wrote {} and {}", json.display(), svg.display());
    Ok(())
}
