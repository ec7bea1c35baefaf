//! The main job: starts `vmmd` and follows its events (`vmctl events`), creates and boots
//! a VM through `vmctl` with two virtio-blk disks on iothreads (disk0 with two queues on
//! the shared iothread `io0`, disk1 on a dedicated one), shows the VM's own process (a
//! `ps` line), the disks' and iothreads' counters every second, throttles disk1 live
//! halfway, then prints what the guest measured, checks that the VM process ended with
//! the guest, and shuts down.
//!
//! The guest is the freestanding test guest (`tests/guest`): a stock Linux kernel cannot
//! boot under KVM on the development machines (their guest kernel mode is emulated), while
//! the test guest's I/O loop runs in user mode at native speed. `scripts/demo` builds and
//! runs this.

// Demo figures and a pattern byte.
#![allow(clippy::cast_possible_truncation, clippy::cast_precision_loss)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(about = "vmmd + vmctl: a VM with two disks on iothreads, counters live")]
struct Args {
    /// Directory for the images, the API socket and the serial log.
    #[arg(long, default_value = "/var/tmp/vmm-demo")]
    dir: PathBuf,
    /// Milliseconds of each of the guest's four IOPS phases (disk0 and disk1, polled and
    /// with interrupts).
    #[arg(long, default_value_t = 3000)]
    phase_ms: u64,
    /// iops_total set live on disk1 halfway through.
    #[arg(long, default_value_t = 2000)]
    iops_limit: u64,
}

fn main() {
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("vmmdemo: {e}");
        std::process::exit(1);
    }
}

/// A binary built beside this one.
fn sibling(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let p = exe.with_file_name(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!(
            "{} not found: cargo build --release --workspace",
            p.display()
        ))
    }
}

/// The TSC rate, measured against the monotonic clock (the guest's TSC runs at it).
fn tsc_khz() -> u64 {
    // SAFETY: RDTSC has no memory effects; x86-64 always has it.
    let tsc = || unsafe { core::arch::x86_64::_rdtsc() };
    let (t0, c0) = (Instant::now(), tsc());
    std::thread::sleep(Duration::from_millis(100));
    let (t1, c1) = (Instant::now(), tsc());
    (c1 - c0) / (t1 - t0).as_micros().max(1) as u64 * 1000
}

struct Vmmd {
    child: Child,
    socket: PathBuf,
    vmctl: PathBuf,
}

impl Vmmd {
    fn start(dir: &Path) -> Result<Vmmd, String> {
        let socket = dir.join("vmmd.sock");
        let _ = std::fs::remove_file(&socket);
        let log = std::fs::File::create(dir.join("vmmd.log"))
            .map_err(|e| format!("{}: {e}", dir.join("vmmd.log").display()))?;
        let child = Command::new(sibling("vmmd")?)
            .arg("--api-socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("vmmd: {e}"))?;
        let v = Vmmd {
            child,
            socket,
            vmctl: sibling("vmctl")?,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while v.vmctl(&["ping"], false).is_err() {
            if Instant::now() > deadline {
                return Err("vmmd did not answer within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(v)
    }

    /// Runs `vmctl ARGS`; with `show`, echoes the command and its output.
    fn vmctl(&self, args: &[&str], show: bool) -> Result<String, String> {
        if show {
            println!("$ vmctl {}", args.join(" "));
        }
        let out = Command::new(&self.vmctl)
            .arg("--api-socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .map_err(|e| format!("vmctl: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(format!(
                "vmctl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        if show && !text.trim().is_empty() {
            print!("{text}");
        }
        Ok(text)
    }

    /// Starts `vmctl events`, printing each event line as it comes (until vmmd exits).
    fn follow_events(&self) -> Result<Child, String> {
        use std::io::BufRead;
        let mut child = Command::new(&self.vmctl)
            .arg("--api-socket")
            .arg(&self.socket)
            .arg("events")
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| format!("vmctl events: {e}"))?;
        let out = child.stdout.take().ok_or("vmctl events: no stdout")?;
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                println!("  [vmctl events] {line}");
            }
        });
        Ok(child)
    }

    fn json(&self, args: &[&str]) -> Result<Value, String> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let text = self.vmctl(&all, false)?;
        serde_json::from_str(&text).map_err(|e| format!("vmctl {}: {e}", args.join(" ")))
    }
}

impl Drop for Vmmd {
    fn drop(&mut self) {
        let _ = self.vmctl(&["shutdown-vmm"], false);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// MiB at the start of each image the guest's random reads cover.
const SPAN_MIB: u64 = 64;

/// Makes an image of `size` bytes whose first `written` bytes hold data: reads of a
/// sparse file's holes cost no device I/O and would flatter every figure.
fn fill_image(path: &Path, size: u64, written: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i * 31 + 7) as u8).collect();
    for _ in 0..written.min(size) >> 20 {
        f.write_all(&chunk)?;
    }
    f.set_len(size)?;
    f.sync_all()
}

fn ops(c: &Value, disk: &str) -> u64 {
    let d = &c["disks"][disk];
    ["read", "write"]
        .iter()
        .map(|k| d[k]["ops"].as_u64().unwrap_or(0))
        .sum()
}

fn run(args: &Args) -> Result<(), String> {
    std::fs::create_dir_all(&args.dir).map_err(|e| format!("{}: {e}", args.dir.display()))?;
    println!("== building the test guest");
    let guest = tests::test_guest::build().map_err(|e| e.to_string())?;
    let mut disks = Vec::new();
    for (id, mib) in [("disk0", 256u64), ("disk1", 128)] {
        let p = args.dir.join(format!("{id}.raw"));
        fill_image(&p, mib << 20, SPAN_MIB << 20).map_err(|e| format!("{}: {e}", p.display()))?;
        disks.push(p);
    }
    let serial = args.dir.join("serial.log");
    let cmdline = format!(
        "exit=acpi ms={} blocks=64 span_mib={SPAN_MIB} tsc_khz={}",
        args.phase_ms,
        tsc_khz()
    );
    let vm = json!({
        "id": "demo",
        "cpus": {"boot_vcpus": 1},
        "memory": {"size_mib": 256},
        "payload": {"kernel": guest, "cmdline": cmdline},
        "serial": {"mode": "file", "path": serial},
        "iothreads": [{"id": "io0", "poll_max_ns": 32768}],
        "disks": [
            {"id": "disk0", "path": disks[0], "cache": "none", "aio": "io_uring",
             "iothread": "io0", "num_queues": 2},
            {"id": "disk1", "path": disks[1], "cache": "none", "aio": "native"}
        ]
    });
    let vm_json = args.dir.join("vm.json");
    let text = serde_json::to_string_pretty(&vm).map_err(|e| e.to_string())?;
    std::fs::write(&vm_json, text).map_err(|e| format!("{}: {e}", vm_json.display()))?;

    let vmmd = Vmmd::start(&args.dir)?;
    println!(
        "== vmmd is serving {} (its log: {})",
        vmmd.socket.display(),
        args.dir.join("vmmd.log").display()
    );
    println!("$ vmctl events &   (one line per lifecycle step, as it happens)");
    let mut events = vmmd.follow_events()?;
    // The stream is open once vmmd has answered it; give it a moment.
    std::thread::sleep(Duration::from_millis(200));
    let vm_path = vm_json.display().to_string();
    vmmd.vmctl(&["create", &vm_path], true)?;
    vmmd.vmctl(&["info"], true)?;
    vmmd.vmctl(&["boot"], true)?;
    let pid = vmmd.json(&["info"])?["pid"].as_u64().unwrap_or(0);
    println!(
        "== the VM runs in a process of its own (vmmd is pid {}):",
        vmmd.child.id()
    );
    let ps = Command::new("ps")
        .args(["-o", "pid,ppid,sid,nlwp,rss,args", "-p", &pid.to_string()])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_else(|e| format!("ps: {e}\n"));
    print!("$ ps -o pid,ppid,sid,nlwp,rss,args -p {pid}\n{ps}");

    println!("== counters every second (ops/s per disk; wake-ups and poll hits per iothread)");
    let start = Instant::now();
    let limit_at = Duration::from_millis(args.phase_ms * 5 / 2 + 500);
    let mut limited = false;
    let mut prev = vmmd.json(&["counters"])?;
    let mut prev_t = Instant::now();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let state = vmmd.json(&["info"])?["state"]
            .as_str()
            .unwrap_or("?")
            .to_string();
        let now = vmmd.json(&["counters"])?;
        let dt = prev_t.elapsed().as_secs_f64();
        prev_t = Instant::now();
        let rate = |d: &str| (ops(&now, d).saturating_sub(ops(&prev, d))) as f64 / dt;
        let mut line = format!(
            "t={:>4.1}s {state:<8} disk0 {:>8.0} ops/s  disk1 {:>8.0} ops/s",
            start.elapsed().as_secs_f64(),
            rate("disk0"),
            rate("disk1")
        );
        if let Some(ts) = now["iothreads"].as_object() {
            for (name, t) in ts {
                let d = |k: &str| {
                    t[k].as_u64()
                        .unwrap_or(0)
                        .saturating_sub(prev["iothreads"][name][k].as_u64().unwrap_or(0))
                };
                line += &format!(
                    " | {name}: {} wake-ups {} poll hits",
                    d("wakeups"),
                    d("poll_hits")
                );
            }
        }
        println!("{line}");
        prev = now;
        if state != "Running" {
            break;
        }
        if !limited && start.elapsed() >= limit_at {
            limited = true;
            let arg = format!("id=disk1,throttle.iops_total={}", args.iops_limit);
            vmmd.vmctl(&["update-disk", &arg], true)?;
        }
        if start.elapsed() > Duration::from_secs(120) {
            vmmd.vmctl(&["shutdown"], true)?;
        }
    }
    println!("== what the guest measured (its serial console)");
    let console = std::fs::read_to_string(&serial).unwrap_or_default();
    for l in console.lines().filter(|l| {
        ["verify", "iops_", "num_queues", "result"]
            .iter()
            .any(|k| l.contains(k))
    }) {
        println!("  {}", l.trim_end());
    }
    vmmd.vmctl(&["counters"], true)?;
    let gone = !Path::new(&format!("/proc/{pid}")).exists();
    println!(
        "== the guest powered off: its VM process {pid} is {}",
        if gone { "gone" } else { "still there" }
    );
    vmmd.vmctl(&["delete"], true)?;
    let ok = console.lines().any(|l| l.trim_end() == "result=ok");
    drop(vmmd);
    let _ = events.kill();
    let _ = events.wait();
    if ok {
        println!("== done: guest result ok, vmmd shut down");
        Ok(())
    } else {
        Err(format!(
            "the guest did not report result=ok; console in {}",
            serial.display()
        ))
    }
}
