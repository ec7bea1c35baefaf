//! The main job as far as the project has got: a real Linux guest (the Debian cloud
//! kernel under QEMU/TCG with a busybox + fio initramfs) with two virtio-blk disks served
//! by our `vhost-user-blk` backend, each disk on its own iothread, the second one
//! throttled. fio runs in the guest while this program prints both disks' counters every
//! second, then the guest's fio summary and the final counters.
//!
//! `scripts/demo` installs what it needs, builds, and runs this.

#![allow(clippy::cast_precision_loss)] // Figures for the printout.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use clap::Parser;
use tests::contender::our_binary;
use tests::linux_guest::{
    self, BackendProcess, BootOptions, GuestDisk, Initramfs, Tools, VhostUserBackend,
};

#[derive(Parser, Debug)]
#[command(about = "Boot a Linux guest on two of our vhost-user-blk disks and watch the counters")]
struct Args {
    /// Directory for the disk images, sockets and counters.
    #[arg(long, default_value = "/var/tmp/vmm-demo")]
    dir: PathBuf,
    /// Seconds fio runs in the guest.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
    /// iops_total limit of the second disk.
    #[arg(long, default_value_t = 500)]
    iops_limit: u64,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("guestdemo: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), String> {
    let tools = Tools::find().map_err(|s| format!("{s}; scripts/demo installs it"))?;
    let ours = our_binary()
        .ok_or("vhost-user-blk not found beside guestdemo: cargo build --release --workspace")?;
    std::fs::create_dir_all(&args.dir).map_err(|e| format!("{}: {e}", args.dir.display()))?;
    let disks = [
        ("disk0", "io_uring", 2u16, "io0", String::new()),
        (
            "disk1",
            "native",
            1,
            "io1",
            format!(",throttle.iops_total={}", args.iops_limit),
        ),
    ];
    let mut backends = Vec::new();
    for (id, aio, queues, iothread, extra) in &disks {
        let image = args.dir.join(format!("{id}.raw"));
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(256 << 20))
            .map_err(|e| format!("{}: {e}", image.display()))?;
        let socket = args.dir.join(format!("{id}.sock"));
        let mut cmd = Command::new(&ours);
        cmd.arg("--socket").arg(&socket).arg("--disk").arg(format!(
            "id={id},path={},cache=none,aio={aio},num_queues={queues},queue_size=256{extra}",
            image.display()
        ));
        cmd.args(["--iothread", &format!("id={iothread}"), "--counters"])
            .arg(counters_path(&args.dir, id));
        println!(
            "{id}: {} MiB raw image, cache=none, aio={aio}, {queues} queue(s) on iothread {iothread}{}",
            256,
            if extra.is_empty() {
                String::new()
            } else {
                format!(", throttle iops_total={}", args.iops_limit)
            }
        );
        backends.push(BackendProcess::spawn(
            cmd,
            socket,
            *queues,
            Duration::from_secs(10),
        )?);
    }
    let initramfs = Initramfs::build(&tools, &args.dir)?;
    let fio = format!(
        "fio --name=disk0 --filename=/dev/vda --direct=1 --rw=randrw --bs=4k --iodepth=16 \
         --ioengine=libaio --numjobs=2 --group_reporting --time_based --runtime={s} \
         --name=disk1 --filename=/dev/vdb --direct=1 --rw=randread --bs=4k --iodepth=16 \
         --ioengine=libaio --numjobs=1 --time_based --runtime={s} --minimal",
        s = args.seconds
    );
    let script = format!(
        "echo guest kernel $(uname -r), disks: $(cat /sys/block/vda/size) and $(cat /sys/block/vdb/size) sectors\n\
         {fio} | awk -F';' '$3 != \"\" {{printf \"guest fio %s: read %s IOPS, write %s IOPS\\n\", $3, $8, $49}}'\n"
    );
    let mut opts = BootOptions::new(script);
    opts.cpus = 2;
    opts.disk = Some(GuestDisk {
        socket: backends[0].socket().to_path_buf(),
        num_queues: 2,
    });
    opts.extra_disks = vec![GuestDisk {
        socket: backends[1].socket().to_path_buf(),
        num_queues: 1,
    }];
    opts.timeout = Duration::from_secs(args.seconds + 120);
    println!("booting the guest (QEMU TCG; the kernel is emulated, so give it a few seconds)...");
    let guest = std::thread::spawn(move || linux_guest::boot(&tools, &initramfs, &opts));
    println!(
        "{:>4} {:<6} {:>8} {:>8} {:>10} {:>9}",
        "t(s)", "disk", "reads/s", "writes/s", "thrott ms", "errors"
    );
    let mut last = [Counters::default(), Counters::default()];
    let mut t = 0;
    while !guest.is_finished() {
        std::thread::sleep(Duration::from_secs(1));
        t += 1;
        for (i, (id, ..)) in disks.iter().enumerate() {
            let now = Counters::read(&counters_path(&args.dir, id));
            if now.reads + now.writes > last[i].reads + last[i].writes {
                println!(
                    "{t:>4} {id:<6} {:>8} {:>8} {:>10} {:>9}",
                    now.reads - last[i].reads,
                    now.writes - last[i].writes,
                    (now.throttled_ns - last[i].throttled_ns) / 1_000_000,
                    now.errors
                );
            }
            last[i] = now;
        }
    }
    let result = guest.join().map_err(|_| "the boot thread panicked")??;
    println!("\n{}", result.script_output.trim_end());
    for mut b in backends {
        b.stop(Duration::from_secs(10));
    }
    println!("\nfinal counters:");
    for (id, ..) in &disks {
        let text = std::fs::read_to_string(counters_path(&args.dir, id)).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        println!("{}", summary(id, &v));
    }
    if result.succeeded() {
        Ok(())
    } else {
        Err(format!("the guest script failed:\n{}", result.report()))
    }
}

fn counters_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.counters.json"))
}

/// The few counters the live table shows.
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    reads: u64,
    writes: u64,
    throttled_ns: u64,
    errors: u64,
}

impl Counters {
    fn read(path: &Path) -> Counters {
        let Ok(text) = std::fs::read_to_string(path) else {
            return Counters::default();
        };
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
            return Counters::default();
        };
        let d = the_disk(&v);
        let n = |p: &str, f: &str| d[p][f].as_u64().unwrap_or(0);
        Counters {
            reads: n("read", "ops"),
            writes: n("write", "ops"),
            throttled_ns: d["throttled_ns"].as_u64().unwrap_or(0),
            errors: ["read", "write", "flush"]
                .iter()
                .map(|k| n(k, "errors"))
                .sum(),
        }
    }
}

/// The one disk of a vhost-user-blk `--counters` file (`{"disks": {"<id>": {...}}, ...}`).
fn the_disk(v: &serde_json::Value) -> &serde_json::Value {
    v["disks"]
        .as_object()
        .and_then(|m| m.values().next())
        .unwrap_or(&serde_json::Value::Null)
}

/// One disk's final counters in two lines.
fn summary(id: &str, v: &serde_json::Value) -> String {
    let d = the_disk(v);
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let hist: Vec<u64> = d["latency_log2_ns"]
        .as_array()
        .map(|a| a.iter().map(n).collect())
        .unwrap_or_default();
    let total: u64 = hist.iter().sum();
    let mut seen = 0;
    let p50 = hist
        .iter()
        .position(|&c| {
            seen += c;
            total > 0 && seen * 2 >= total
        })
        .map_or(0, |b| (1u64 << (b + 1)) / 1000);
    let mut out = format!(
        "{id}: {} reads ({} MiB), {} writes ({} MiB), {} errors, {} invalid requests, \
         p50 latency <= {p50} us, {} ms throttled, {} interrupts",
        n(&d["read"]["ops"]),
        n(&d["read"]["bytes"]) >> 20,
        n(&d["write"]["ops"]),
        n(&d["write"]["bytes"]) >> 20,
        ["read", "write", "flush", "discard", "write_zeroes"]
            .iter()
            .map(|k| n(&d[k]["errors"]))
            .sum::<u64>(),
        n(&d["invalid_requests"]),
        n(&d["throttled_ns"]) / 1_000_000,
        n(&d["signals"]),
    );
    for (tid, t) in v["iothreads"].as_object().into_iter().flatten() {
        out += &format!(
            "\n  iothread {tid}: queues {}, {} requests, {} loop passes, {} wake-ups, {} poll hits, {:.2} s CPU",
            v["iothread_queues"][tid],
            n(&t["requests"]),
            n(&t["passes"]),
            n(&t["wakeups"]),
            n(&t["poll_hits"]),
            n(&t["cpu_ns"]) as f64 / 1e9
        );
    }
    out
}
