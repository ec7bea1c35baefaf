//! A `vmmd` started for one test on a temporary socket, and helpers to drive it.

#![allow(clippy::cast_possible_truncation)] // Test data and figures, not guest input.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use api::client::{Client, Reply};
use serde_json::{Value, json};

/// A running `vmmd` (killed when dropped) and its temporary directory.
pub struct Service {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub client: Client,
}

impl Service {
    /// `vmmd` on the real backend with extra `args`.
    pub fn start(args: &[&str]) -> Service {
        Self::start_with(args, |_| {})
    }

    /// Like [`Service::start`], letting `setup` change the command (limits, stderr).
    pub fn start_with(args: &[&str], setup: impl FnOnce(&mut Command)) -> Service {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let socket = dir.path().join("vmmd.sock");
        let client = Client::new(&socket);
        let mut s = Service {
            child: None,
            dir,
            socket,
            client,
        };
        s.spawn(args, setup);
        s
    }

    /// Starts a vmmd on this service's socket and state directory (after the last one
    /// ended or was killed) and waits until it answers.
    pub fn spawn(&mut self, args: &[&str], setup: impl FnOnce(&mut Command)) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmmd"));
        cmd.arg("--api-socket").arg(&self.socket);
        if !args.contains(&"--state-dir") {
            cmd.arg("--state-dir").arg(self.state_dir());
        }
        cmd.args(args).env("RUST_LOG", "warn").stdin(Stdio::null());
        setup(&mut cmd);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("vmmd: {e}"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while self
            .client
            .request_blocking("GET", "/api/v1/vmm.ping", None)
            .is_err()
        {
            assert!(Instant::now() < deadline, "vmmd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    /// The state directory the service runs its VMs under.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The pid of VM `id`'s process, from its pid file.
    pub fn vm_pid(&self, id: &str) -> Option<u32> {
        std::fs::read_to_string(self.state_dir().join(id).join("pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The service's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// `path` in the test's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A request to `/api/v1/<path>`.
    pub fn req(&self, method: &str, path: &str, body: Option<&Value>) -> Reply {
        self.raw(method, path, body.map(Value::to_string).as_deref())
    }

    /// A request that must succeed.
    pub fn ok(&self, method: &str, path: &str, body: Option<&Value>) -> Reply {
        let r = self.req(method, path, body);
        assert!(r.ok(), "{method} {path}: {} {}", r.status, r.text());
        r
    }

    /// VM `id`'s state.
    pub fn state(&self, id: &str) -> String {
        let r = self.ok("GET", &format!("vm.info?id={id}"), None);
        r.json()["state"].as_str().unwrap_or_default().to_string()
    }

    /// VM `id`'s counters.
    pub fn counters(&self, id: &str) -> Value {
        self.ok("GET", &format!("vm.counters?id={id}"), None).json()
    }

    /// A sparse image of `mib` MiB.
    pub fn sparse_image(&self, name: &str, mib: u64) -> PathBuf {
        let p = self.path(name);
        let f = std::fs::File::create(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        f.set_len(mib << 20).unwrap_or_else(|e| panic!("{e}"));
        p
    }

    /// A request with a raw body (possibly invalid JSON).
    pub fn raw(&self, method: &str, path: &str, body: Option<&str>) -> Reply {
        self.client
            .request_blocking(
                method,
                &format!("/api/v1/{path}"),
                body.map(|b| b.as_bytes().to_vec()),
            )
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    /// `PUT <path>` with `body`.
    pub fn put(&self, path: &str, body: &Value) -> Reply {
        self.req("PUT", path, Some(body))
    }

    /// Runs `vmctl` against the service.
    pub fn vmctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(env!("CARGO_BIN_EXE_vmctl"))
            .arg("--api-socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("vmctl: {e}"))
    }

    /// An image of `mib` MiB filled with a pattern (so that zeroing it shows).
    pub fn image(&self, name: &str, mib: usize) -> PathBuf {
        let p = self.path(name);
        let data: Vec<u8> = (0..mib << 20).map(|i| (i % 251) as u8).collect();
        let mut f = std::fs::File::create(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        f.write_all(&data).unwrap_or_else(|e| panic!("{e}"));
        p
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // VM processes outlive vmmd (their own session): end those of this test.
        if let Ok(dirs) = std::fs::read_dir(self.state_dir()) {
            for d in dirs.flatten() {
                let id = d.file_name().to_string_lossy().into_owned();
                if let Some(pid) = self.vm_pid(&id)
                    && process_alive(pid)
                    && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                        String::from_utf8_lossy(&c).contains(&*self.state_dir().to_string_lossy())
                    })
                {
                    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                }
            }
        }
    }
}

/// Whether process `pid` exists (and is not a zombie).
pub fn process_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// Every event of a service, as it arrives, with when it arrived.
pub struct Events {
    rx: std::sync::mpsc::Receiver<(Instant, Value)>,
}

impl Events {
    /// Follows the event stream at `socket` (open when this returns).
    pub fn follow(socket: &Path) -> Events {
        let (tx, rx) = std::sync::mpsc::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let client = Client::new(socket);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| panic!("{e}"));
            rt.block_on(async {
                let (status, mut lines) = client
                    .stream("/api/v1/events")
                    .await
                    .unwrap_or_else(|e| panic!("events: {e}"));
                assert_eq!(status, 200);
                let _ = ready_tx.send(());
                while let Ok(Some(line)) = lines.next_line().await {
                    let v: Value = serde_json::from_str(&line)
                        .unwrap_or_else(|e| panic!("event {line:?}: {e}"));
                    if tx.send((Instant::now(), v)).is_err() {
                        return;
                    }
                }
            });
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("event stream: {e}"));
        Events { rx }
    }

    /// Waits up to `limit` for an event of VM `vm` named `event`; returns when it arrived
    /// and the event (earlier events are passed over).
    pub fn wait_for(&self, vm: &str, event: &str, limit: Duration) -> (Instant, Value) {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((at, v)) if v["vm"] == vm && v["event"] == event => return (at, v),
                Ok(_) => {}
                Err(e) => panic!("no {event} event for {vm} within {limit:?}: {e}"),
            }
        }
    }

    /// Every event received so far.
    pub fn drain(&self) -> Vec<Value> {
        self.rx.try_iter().map(|(_, v)| v).collect()
    }
}

/// Asserts `reply` has `status` and its error text contains every needle.
#[track_caller]
pub fn expect(reply: &Reply, status: u16, needles: &[&str]) {
    let text = reply.text();
    assert_eq!(reply.status, status, "{text}");
    for n in needles {
        assert!(text.contains(n), "{text:?} lacks {n:?}");
    }
}

/// The test guest's ELF (built once per process).
pub fn guest() -> PathBuf {
    tests::test_guest::build().unwrap_or_else(|e| panic!("{e}"))
}

/// The host's TSC frequency as KVM reports it (the test guest needs it).
pub fn tsc_khz() -> u32 {
    let vm = vmm::kvm::Vm::new().unwrap_or_else(|e| panic!("{e}"));
    let vcpu = vmm::kvm::Vcpu::new(&vm, 0, 1).unwrap_or_else(|e| panic!("{e}"));
    vcpu.fd()
        .get_tsc_khz()
        .unwrap_or_else(|e| panic!("KVM_GET_TSC_KHZ: {e}"))
}

/// A test-guest VM `id` (64 MiB, one vCPU) with `disks`, powering off through ACPI after
/// two IOPS phases of 2 s per disk.
pub fn guest_vm(elf: &Path, id: &str, disks: Value) -> Value {
    let cmdline = format!("exit=acpi pci=auto tsc_khz={} ms=2000", tsc_khz());
    json!({
        "id": id,
        "memory": {"size_mib": 64},
        "payload": {"kernel": elf, "cmdline": cmdline},
        "disks": disks
    })
}

/// Boots the created test-guest VM `vm` (its serial output in `serial`) and checks
/// what an imported config must give: the guest verified its disk, disk `disk` took
/// writes, iothread `iothread` served.
pub fn boot_and_verify(
    s: &Service,
    events: &Events,
    vm: &str,
    serial: &Path,
    disk: &str,
    iothread: &str,
) {
    s.ok("PUT", &format!("vm.boot?id={vm}"), None);
    events.wait_for(vm, "guest-poweroff", Duration::from_secs(60));
    let console = std::fs::read_to_string(serial).unwrap_or_default();
    assert!(
        console.contains("disk0.verify=ok"),
        "the guest did not verify its disk:\n{console}"
    );
    let c = s.counters(vm);
    assert!(
        c["disks"][disk]["write"]["ops"].as_u64().unwrap_or(0) > 0,
        "{c}"
    );
    assert!(c["iothreads"].get(iothread).is_some(), "{c}");
}

/// Waits until `pid` has exited, up to `limit`; returns whether it did.
pub fn wait_exit(child: &mut Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// The last value the test guest printed for `key` (`key=value` lines) on `console`.
pub fn console_value(console: &str, key: &str) -> String {
    console
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .next_back()
        .unwrap_or("")
        .to_string()
}
