//! Starts `vmmd --fake` on a temporary socket and drives it over HTTP and through
//! `vmctl`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use api::client::{Client, Reply};
use serde_json::{Value, json};

struct Service {
    child: Child,
    dir: tempfile::TempDir,
    socket: PathBuf,
    client: Client,
}

impl Service {
    fn start() -> Service {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vmmd.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_vmmd"))
            .args(["--fake", "--api-socket"])
            .arg(&socket)
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap();
        let client = Client::new(&socket);
        let deadline = Instant::now() + Duration::from_secs(10);
        while client
            .request_blocking("GET", "/api/v1/vmm.ping", None)
            .is_err()
        {
            assert!(Instant::now() < deadline, "vmmd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::write(dir.path().join("kernel"), b"kernel").unwrap();
        Service {
            child,
            dir,
            socket,
            client,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// An image file of 1 MiB.
    fn image(&self, name: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
        p
    }

    fn vm(&self, id: &str) -> Value {
        json!({
            "id": id,
            "payload": {"kernel": self.path("kernel")},
            "iothreads": [{"id": "shared"}],
            "disks": [
                {"id": "d0", "path": self.image(&format!("{id}-0.raw")), "iothread": "shared"},
                {"id": "d1", "path": self.image(&format!("{id}-1.raw"))}
            ]
        })
    }

    fn req(&self, method: &str, path: &str, body: Option<&str>) -> Reply {
        self.client
            .request_blocking(
                method,
                &format!("/api/v1/{path}"),
                body.map(|b| b.as_bytes().to_vec()),
            )
            .unwrap()
    }

    fn put(&self, path: &str, body: &Value) -> Reply {
        self.req("PUT", path, Some(&body.to_string()))
    }

    fn vmctl(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_vmctl"))
            .arg("--api-socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts `reply` has `status` and, for errors, the error body with `needle` in it.
#[track_caller]
/// Sends a request whose body the server refuses before reading it all: the server may
/// answer and close while the body is still being written, so write from one thread
/// (ignoring a broken pipe) and read the answer from another.
fn oversized_request(socket: &std::path::Path, path: &str, body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    let mut reader = stream.try_clone().unwrap();
    let head = format!(
        "PUT {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let body = body.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stream.write_all(head.as_bytes());
        let _ = stream.write_all(&body);
    });
    let mut answer = Vec::new();
    let _ = reader.read_to_end(&mut answer);
    let _ = writer.join();
    let text = String::from_utf8_lossy(&answer).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn expect(reply: &Reply, status: u16, needle: &str) {
    assert_eq!(reply.status, status, "body: {}", reply.text());
    if status >= 400 {
        let v = reply.json();
        let msg = v["error"].as_str().expect("error field");
        assert!(v["details"].is_array(), "details: {}", reply.text());
        assert!(
            reply.text().contains(needle),
            "{needle:?} not in {msg:?}: {}",
            reply.text()
        );
    }
}

fn state(s: &Service, id: &str) -> String {
    let r = s.req("GET", &format!("vm.info?id={id}"), None);
    expect(&r, 200, "");
    r.json()["state"].as_str().unwrap().to_string()
}

#[test]
fn socket_is_0600() {
    let s = Service::start();
    let mode = std::fs::metadata(&s.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let r = s.req("GET", "vmm.ping", None);
    expect(&r, 200, "");
    assert_eq!(r.json()["backend"], "fake");
}

#[test]
fn lifecycle_of_several_vms() {
    let s = Service::start();
    for id in ["a", "b", "c", "d"] {
        expect(&s.put("vm.create", &s.vm(id)), 204, "");
    }
    let list = s.req("GET", "vms", None).json();
    assert_eq!(list.as_array().unwrap().len(), 4);
    // Several VMs: the id is required.
    expect(&s.req("PUT", "vm.boot", None), 400, "?id=");
    for id in ["a", "b", "c", "d"] {
        expect(&s.req("PUT", &format!("vm.boot?id={id}"), None), 204, "");
        assert_eq!(state(&s, id), "Running");
    }
    expect(&s.req("PUT", "vm.pause?id=a", None), 204, "");
    assert_eq!(state(&s, "a"), "Paused");
    expect(&s.req("PUT", "vm.pause?id=a", None), 409, "Paused");
    expect(&s.req("PUT", "vm.resume?id=a", None), 204, "");
    expect(&s.req("PUT", "vm.reboot?id=a", None), 204, "");
    expect(&s.req("PUT", "vm.resume?id=a", None), 409, "Running");
    // Counters grow while running.
    let c1 = s.req("GET", "vm.counters?id=b", None).json();
    let c2 = s.req("GET", "vm.counters?id=b", None).json();
    let reads = |c: &Value| c["disks"]["d0"]["read"]["ops"].as_u64().unwrap();
    assert!(reads(&c2) > reads(&c1), "{c1} {c2}");
    assert!(c2["iothreads"]["shared"]["requests"].is_u64(), "{c2}");
    assert!(
        c2["iothreads"]["dedicated:d1"].is_object(),
        "dedicated iothread: {c2}"
    );
    let metrics = s
        .client
        .request_blocking("GET", "/metrics", None)
        .unwrap()
        .text();
    assert!(
        metrics.contains("vmm_disk_read_ops_total{vm=\"b\",disk=\"d0\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("vmm_iothread_requests_total{vm=\"c\",iothread=\"shared\"}"),
        "{metrics}"
    );
    for id in ["a", "b", "c", "d"] {
        expect(
            &s.req("PUT", &format!("vm.shutdown?id={id}"), None),
            204,
            "",
        );
        assert_eq!(state(&s, id), "Shutdown");
        expect(
            &s.req("PUT", &format!("vm.shutdown?id={id}"), None),
            409,
            "Shutdown",
        );
        expect(&s.req("PUT", &format!("vm.delete?id={id}"), None), 204, "");
    }
    assert_eq!(s.req("GET", "vms", None).json(), json!([]));
    expect(&s.req("GET", "vm.info", None), 404, "no VM");
}

#[test]
fn live_changes() {
    let s = Service::start();
    expect(&s.put("vm.create", &s.vm("a")), 204, "");
    // Exactly one VM: the id may be left out.
    let disk = json!({"id": "d2", "path": s.image("extra.raw"), "iothread": "shared"});
    expect(&s.put("vm.add-disk", &disk), 204, "");
    expect(&s.put("vm.add-disk", &disk), 409, "already has a disk");
    let info = s.req("GET", "vm.info", None).json();
    assert_eq!(info["config"]["disks"].as_array().unwrap().len(), 3);
    expect(&s.put("vm.remove-device", &json!({"id": "d2"})), 204, "");
    expect(&s.put("vm.remove-device", &json!({"id": "d2"})), 404, "d2");
    let upd = json!({"id": "d0", "throttle": {"iops_total": 500}});
    expect(&s.put("vm.update-disk", &upd), 204, "");
    let info = s.req("GET", "vm.info", None).json();
    assert_eq!(info["config"]["disks"][0]["throttle"]["iops_total"], 500);
    expect(
        &s.put("vm.update-disk", &json!({"id": "zz", "throttle": {}})),
        404,
        "zz",
    );
    expect(
        &s.put(
            "vm.update-disk",
            &json!({"id": "d0", "throttle_group": "nope"}),
        ),
        400,
        "throttle_group",
    );
    let t = json!({"id": "shared", "poll_max_ns": 0, "cpu_affinity": [0]});
    expect(&s.put("vm.update-iothread", &t), 204, "");
    let info = s.req("GET", "vm.info", None).json();
    assert_eq!(info["config"]["iothreads"][0]["poll_max_ns"], 0);
    expect(
        &s.put("vm.update-iothread", &json!({"id": "nope"})),
        404,
        "nope",
    );
    expect(
        &s.put(
            "vm.update-iothread",
            &json!({"id": "shared", "aio_max_batch": 0}),
        ),
        400,
        "aio_max_batch",
    );
}

#[test]
fn bad_input_is_refused_and_service_keeps_serving() {
    let s = Service::start();
    let vm = s.vm("a");
    expect(
        &s.req("PUT", "vm.create", Some("{\"id\": ")),
        400,
        "invalid JSON",
    );
    expect(&s.req("PUT", "vm.create", Some("")), 400, "invalid JSON");
    let mut wrong = vm.clone();
    wrong["cpus"] = json!({"boot_vcpus": "two"});
    expect(&s.put("vm.create", &wrong), 400, "invalid type");
    let mut unknown = vm.clone();
    unknown["colour"] = json!("blue");
    expect(&s.put("vm.create", &unknown), 400, "unknown field `colour`");
    let mut missing = vm.clone();
    missing["disks"][0]["path"] = json!(s.path("missing.raw"));
    expect(&s.put("vm.create", &missing), 400, "disks[0].path");
    let mut no_kernel = vm.clone();
    no_kernel["payload"]["kernel"] = json!("/nonexistent/kernel");
    expect(&s.put("vm.create", &no_kernel), 400, "payload.kernel");
    let mut bad_values = vm.clone();
    bad_values["memory"] = json!({"size_mib": 1});
    bad_values["disks"][0]["iothread"] = json!("ghost");
    let r = s.put("vm.create", &bad_values);
    expect(&r, 400, "memory.size_mib");
    assert_eq!(
        r.json()["details"].as_array().unwrap().len(),
        2,
        "{}",
        r.text()
    );
    expect(&s.put("vm.create", &vm), 204, "");
    expect(&s.put("vm.create", &vm), 409, "already exists");
    // Another VM on a's writable image: locked.
    let mut locked = s.vm("b");
    locked["disks"][1]["path"] = vm["disks"][1]["path"].clone();
    expect(&s.put("vm.create", &locked), 409, "locked");
    expect(&s.req("PUT", "vm.boot?id=zz", None), 404, "zz");
    expect(
        &s.req("GET", "vm.info?id=a&x=1", None),
        400,
        "unknown field",
    );
    expect(&s.req("PUT", "vm.resume?id=a", None), 409, "Created");
    expect(
        &s.put("vm.add-disk?id=a", &json!({"id": "d9"})),
        400,
        "missing field `path`",
    );
    expect(&s.req("GET", "nothing", None), 404, "no endpoint");
    expect(&s.req("POST", "vm.boot", None), 405, "not allowed");
    let big = format!("{{\"id\": \"{}\"}}", "x".repeat(2 << 20));
    let (status, text) = oversized_request(&s.socket, "/api/v1/vm.create", big.as_bytes());
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("larger than"), "{text}");
    // Still serving.
    expect(&s.req("PUT", "vm.boot", None), 204, "");
    assert_eq!(state(&s, "a"), "Running");
}

#[test]
fn vmctl_drives_the_service() {
    let mut s = Service::start();
    let cfg = s.path("vm.json");
    std::fs::write(&cfg, s.vm("a").to_string()).unwrap();
    let ok = |args: &[&str]| {
        let o = s.vmctl(args);
        assert!(
            o.status.success(),
            "vmctl {args:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert!(ok(&["ping"]).contains("backend fake"));
    ok(&["create", cfg.to_str().unwrap()]);
    ok(&["boot"]);
    let list = ok(&["list"]);
    assert!(list.contains("ID") && list.contains("Running"), "{list}");
    let info: Value = serde_json::from_str(&ok(&["--json", "info", "--id", "a"])).unwrap();
    assert_eq!(info["state"], "Running");
    let extra = s.image("extra.raw");
    ok(&[
        "add-disk",
        &format!("id=d2,path={},iothread=shared", extra.display()),
    ]);
    ok(&["update-disk", "id=d2,throttle.iops_total=300"]);
    ok(&["update-iothread", "id=shared,poll_max_ns=0,cpu_affinity=0"]);
    let info = ok(&["info"]);
    assert!(info.contains("d2") && info.contains("300"), "{info}");
    assert!(ok(&["counters"]).contains("READS"));
    ok(&["remove-device", "d2"]);
    ok(&["pause"]);
    let o = s.vmctl(&["pause"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("Paused") && err.contains("409"), "{err}");
    let o = s.vmctl(&["add-disk", "id=d3,path=/nonexistent.raw"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("Paused"));
    ok(&["resume"]);
    ok(&["shutdown"]);
    ok(&["delete"]);
    assert!(ok(&["completions", "bash"]).contains("vmctl"));
    ok(&["shutdown-vmm"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = s.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "vmmd still running after shutdown-vmm"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "vmmd exit status {status}");
    assert!(!Path::new(&s.socket).exists(), "socket left behind");
}

#[test]
fn tcp_only_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_vmmd"))
        .args(["--fake", "--tcp", "0.0.0.0:0", "--api-socket"])
        .arg(dir.path().join("s.sock"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("loopback"));
}

#[test]
fn concurrent_info_requests() {
    let s = Service::start();
    expect(&s.put("vm.create", &s.vm("a")), 204, "");
    let clients = 8;
    let per_client = 125;
    let mut latencies: Vec<Duration> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                let client = s.client.clone();
                scope.spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .unwrap();
                    (0..per_client)
                        .map(|_| {
                            let t = Instant::now();
                            let r = rt
                                .block_on(client.request("GET", "/api/v1/vm.info?id=a", None))
                                .unwrap();
                            assert_eq!(r.status, 200);
                            t.elapsed()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(latencies.len(), 1000);
    latencies.sort();
    println!(
        "1000 vm.info from {clients} clients: p50 {:?}, p99 {:?}",
        latencies[500], latencies[990]
    );
}
