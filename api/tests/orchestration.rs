//! Orchestration on the real backend: `vmmd` (KVM) runs four test-guest VMs at once,
//! booted over HTTP and through `vmctl`; counters grow; disks are added and removed on a
//! created VM; a disk's throttle changes live and its request rate (measured from our
//! counters over a window) follows; guests power off; every VM is deleted and no vCPU or
//! iothread thread or file descriptor is left behind; `vmmd` exits 0.
//! Skips, saying why, when `/dev/kvm` is missing.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use api::client::{Client, Reply};
use serde_json::{Value, json};

/// How long the guests may take to power off.
const RUN_TIMEOUT: Duration = Duration::from_secs(180);

struct Service {
    child: Option<Child>,
    dir: tempfile::TempDir,
    socket: PathBuf,
    client: Client,
}

impl Service {
    fn start() -> Service {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let socket = dir.path().join("vmmd.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_vmmd"))
            .arg("--api-socket")
            .arg(&socket)
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap_or_else(|e| panic!("vmmd: {e}"));
        let client = Client::new(&socket);
        let deadline = Instant::now() + Duration::from_secs(10);
        while client
            .request_blocking("GET", "/api/v1/vmm.ping", None)
            .is_err()
        {
            assert!(Instant::now() < deadline, "vmmd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Service {
            child: Some(child),
            dir,
            socket,
            client,
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn req(&self, method: &str, path: &str, body: Option<&Value>) -> Reply {
        self.client
            .request_blocking(
                method,
                &format!("/api/v1/{path}"),
                body.map(|b| b.to_string().into_bytes()),
            )
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    fn ok(&self, method: &str, path: &str, body: Option<&Value>) -> Reply {
        let r = self.req(method, path, body);
        assert!(r.ok(), "{method} {path}: {} {}", r.status, r.text());
        r
    }

    fn state(&self, id: &str) -> String {
        let r = self.ok("GET", &format!("vm.info?id={id}"), None);
        r.json()["state"].as_str().unwrap_or_default().to_string()
    }

    fn counters(&self, id: &str) -> Value {
        self.ok("GET", &format!("vm.counters?id={id}"), None).json()
    }

    fn image(&self, name: &str, mib: u64) -> PathBuf {
        let p = self.dir.path().join(name);
        let f = std::fs::File::create(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        f.set_len(mib << 20).unwrap_or_else(|e| panic!("{e}"));
        p
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn host_tsc_khz() -> u32 {
    let vm = vmm::kvm::Vm::new().unwrap_or_else(|e| panic!("{e}"));
    let vcpu = vmm::kvm::Vcpu::new(&vm, 0, 1).unwrap_or_else(|e| panic!("{e}"));
    vcpu.fd()
        .get_tsc_khz()
        .unwrap_or_else(|e| panic!("KVM_GET_TSC_KHZ: {e}"))
}

/// A test-guest VM with two disks: `d0` on the VM's shared iothread `sh`, `d1` on a
/// dedicated one (or also on `sh` when `both_shared`).
fn vm_json(s: &Service, elf: &Path, id: &str, ms: u32, tsc: u32, both_shared: bool) -> Value {
    let d0 = s.image(&format!("{id}-0.raw"), 16);
    let d1 = s.image(&format!("{id}-1.raw"), 16);
    let mut d1_json = json!({"id": "d1", "path": d1, "cache": "writeback"});
    if both_shared {
        d1_json["iothread"] = json!("sh");
    }
    json!({
        "id": id,
        "cpus": {"boot_vcpus": 1},
        "memory": {"size_mib": 64},
        "payload": {"kernel": elf, "cmdline": format!("exit=acpi pci=auto tsc_khz={tsc} ms={ms}")},
        "serial": {"mode": "file", "path": s.dir.path().join(format!("{id}.serial"))},
        "iothreads": [{"id": "sh"}],
        "disks": [
            {"id": "d0", "path": d0, "cache": "writeback", "iothread": "sh"},
            d1_json
        ]
    })
}

fn ops(counters: &Value, disk: &str) -> u64 {
    let io = &counters["disks"][disk];
    ["read", "write", "flush", "discard"]
        .iter()
        .map(|k| io[k]["ops"].as_u64().unwrap_or(0))
        .sum()
}

fn total_ops(counters: &Value) -> u64 {
    ops(counters, "d0") + ops(counters, "d1")
}

/// Threads of `pid` named like our vCPU and iothread threads.
fn vmm_threads(pid: u32) -> Vec<String> {
    let mut names = Vec::new();
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in dir.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            let comm = comm.trim();
            if comm.starts_with("vcpu") || comm.starts_with("iothread") {
                names.push(comm.to_string());
            }
        }
    }
    names
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// d0's request rate over `window`, from our counters.
fn rate(s: &Service, id: &str, window: Duration) -> f64 {
    let a = ops(&s.counters(id), "d0");
    let t = Instant::now();
    std::thread::sleep(window);
    let b = ops(&s.counters(id), "d0");
    (b - a) as f64 / t.elapsed().as_secs_f64()
}

#[test]
fn four_test_guests_through_the_service() {
    if !vmm::kvm_available() {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(
            out,
            "SKIP four_test_guests_through_the_service: /dev/kvm is missing or not accessible"
        );
        return;
    }
    let elf = tests::test_guest::build().unwrap_or_else(|e| panic!("{e}"));
    let tsc = host_tsc_khz();
    let s = Service::start();
    let pid = s.pid();
    let base_fds = fd_count(pid);
    assert!(vmm_threads(pid).is_empty());
    let ping = s.ok("GET", "vmm.ping", None).json();
    assert_eq!(ping["backend"], "kvm");

    // Four VMs; "t" runs long IOPS phases for the live throttle change.
    let ids = ["a", "b", "c", "t"];
    for (i, id) in ids.iter().enumerate() {
        let ms = if *id == "t" { 4000 } else { 300 };
        let body = vm_json(&s, &elf, id, ms, tsc, i == 2);
        s.ok("PUT", "vm.create", Some(&body));
        assert_eq!(s.state(id), "Created");
    }
    // An image in use by another VM is refused with 409.
    let mut clash = vm_json(&s, &elf, "x", 300, tsc, false);
    clash["disks"][0]["path"] = json!(s.dir.path().join("a-0.raw"));
    let r = s.req("PUT", "vm.create", Some(&clash));
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("lock"), "{}", r.text());

    // Add and remove a disk on a created VM ("e", never booted).
    let e = vm_json(&s, &elf, "e", 300, tsc, false);
    s.ok("PUT", "vm.create", Some(&e));
    let extra = s.image("e-2.raw", 4);
    s.ok(
        "PUT",
        "vm.add-disk?id=e",
        Some(&json!({"id": "d2", "path": extra, "iothread": "sh"})),
    );
    let info = s.ok("GET", "vm.info?id=e", None).json();
    assert_eq!(info["config"]["disks"].as_array().map(Vec::len), Some(3));
    s.ok("PUT", "vm.remove-device?id=e", Some(&json!({"id": "d1"})));
    let info = s.ok("GET", "vm.info?id=e", None).json();
    let disks: Vec<&str> = info["config"]["disks"]
        .as_array()
        .map(|d| d.iter().filter_map(|d| d["id"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(disks, ["d0", "d2"]);
    let c = s.counters("e");
    assert!(
        c["disks"].get("d2").is_some() && c["disks"].get("d1").is_none(),
        "{c}"
    );
    s.ok("PUT", "vm.delete?id=e", None);

    // Boot concurrently: three over HTTP, one through vmctl.
    std::thread::scope(|scope| {
        for id in ["a", "b", "t"] {
            let s = &s;
            scope.spawn(move || s.ok("PUT", &format!("vm.boot?id={id}"), None));
        }
        let out = Command::new(env!("CARGO_BIN_EXE_vmctl"))
            .arg("--api-socket")
            .arg(&s.socket)
            .args(["--id", "c", "boot"])
            .output()
            .unwrap_or_else(|e| panic!("vmctl: {e}"));
        assert!(out.status.success(), "vmctl boot: {out:?}");
    });

    // Hot plug on a running VM is refused, saying so.
    let hot = s.image("t-2.raw", 4);
    let r = s.req(
        "PUT",
        "vm.add-disk?id=t",
        Some(&json!({"id": "d2", "path": hot})),
    );
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("hot plug"), "{}", r.text());

    // Live throttle change on t/d0: wait for its I/O, then limit it twice and measure.
    let deadline = Instant::now() + RUN_TIMEOUT;
    while ops(&s.counters("t"), "d0") < 1000 {
        let st = s.state("t");
        assert!(
            Instant::now() < deadline && st == "Running",
            "t/d0 never did I/O; state {st}; console:\n{}",
            std::fs::read_to_string(s.dir.path().join("t.serial")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut rates = Vec::new();
    for limit in [400u64, 1200] {
        s.ok(
            "PUT",
            "vm.update-disk?id=t",
            Some(&json!({"id": "d0", "throttle": {"iops_total": limit}})),
        );
        std::thread::sleep(Duration::from_millis(300));
        let r = rate(&s, "t", Duration::from_secs(1));
        rates.push((limit, r));
    }
    s.ok(
        "PUT",
        "vm.update-disk?id=t",
        Some(&json!({"id": "d0", "throttle": {}})),
    );
    {
        let mut out = std::io::stdout().lock();
        for (limit, r) in &rates {
            let _ = writeln!(out, "t/d0 limit {limit} iops: measured {r:.0} iops");
        }
    }
    for (limit, r) in &rates {
        let err = (r - *limit as f64).abs() / *limit as f64;
        assert!(err <= 0.15, "limit {limit}: measured {r:.0}");
    }
    // Group changes on a running VM are refused, saying so.
    let r = s.req(
        "PUT",
        "vm.update-disk?id=t",
        Some(&json!({"id": "d0", "throttle_group": "nope"})),
    );
    assert_eq!(r.status / 100, 4, "{}", r.text());
    // Live iothread settings.
    s.ok(
        "PUT",
        "vm.update-iothread?id=a",
        Some(&json!({"id": "sh", "poll_max_ns": 0})),
    );

    // Counters grow; guests power off by themselves.
    let mut last: Vec<u64> = ids.iter().map(|id| total_ops(&s.counters(id))).collect();
    let mut grew = [false; 4];
    loop {
        let states: Vec<String> = ids.iter().map(|id| s.state(id)).collect();
        for (i, id) in ids.iter().enumerate() {
            let c = s.counters(id);
            let now = total_ops(&c);
            grew[i] |= now > last[i];
            last[i] = now;
            assert!(
                c["iothreads"].get("sh").is_some(),
                "{id}: no iothread counters: {c}"
            );
        }
        if states.iter().all(|st| st == "Shutdown") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "guests still running: {states:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for (i, id) in ids.iter().enumerate() {
        let serial =
            std::fs::read_to_string(s.dir.path().join(format!("{id}.serial"))).unwrap_or_default();
        let report = tests::test_guest::parse_report(&serial);
        assert_eq!(
            report.get("result").map(String::as_str),
            Some("ok"),
            "{id}:\n{serial}"
        );
        assert!(last[i] > 0, "{id}: no I/O counted");
        if *id == "t" {
            assert!(grew[i], "{id}: counters did not grow while it ran");
        }
    }

    // Delete everything; no thread or fd is left.
    for id in ids {
        s.ok("PUT", &format!("vm.delete?id={id}"), None);
    }
    assert_eq!(s.ok("GET", "vms", None).json(), json!([]));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let threads = vmm_threads(pid);
        let fds = fd_count(pid);
        if threads.is_empty() && fds <= base_fds {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: threads {threads:?}, fds {fds} (baseline {base_fds})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // vmmd exits 0 on vmm.shutdown.
    let _ = s.req("PUT", "vmm.shutdown", None);
    let mut s = s;
    let mut child = s.child.take().unwrap_or_else(|| panic!("no child"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap_or_else(|e| panic!("{e}")) {
            break st;
        }
        assert!(Instant::now() < deadline, "vmmd did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "vmmd exited {status:?}");
}
