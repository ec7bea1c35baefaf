//! Starts `vmmd --fake` on a temporary socket and drives it over HTTP and through
//! `vmctl`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use api::client::Reply;

mod support;

use serde_json::{Value, json};
use support::Service;

/// `vmmd --fake` on a temporary socket, with a kernel file in its directory.
fn start() -> Service {
    let s = Service::start(&["--fake"]);
    std::fs::write(s.path("kernel"), b"kernel").unwrap();
    s
}

/// A VM config with two 1 MiB disks (one on the shared iothread, one on its own).
fn vm_json(s: &Service, id: &str) -> Value {
    json!({
        "id": id,
        "payload": {"kernel": s.path("kernel")},
        "iothreads": [{"id": "shared"}],
        "disks": [
            {"id": "d0", "path": s.image(&format!("{id}-0.raw"), 1), "iothread": "shared"},
            {"id": "d1", "path": s.image(&format!("{id}-1.raw"), 1)}
        ]
    })
}

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

/// Asserts `reply` has `status` and, for errors, the error body with `needle` in it.
#[track_caller]
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
    let r = s.raw("GET", &format!("vm.info?id={id}"), None);
    expect(&r, 200, "");
    r.json()["state"].as_str().unwrap().to_string()
}

#[test]
fn socket_is_0600() {
    let s = start();
    let mode = std::fs::metadata(&s.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let r = s.raw("GET", "vmm.ping", None);
    expect(&r, 200, "");
    assert_eq!(r.json()["backend"], "fake");
}

#[test]
fn lifecycle_of_several_vms() {
    let s = start();
    for id in ["a", "b", "c", "d"] {
        expect(&s.put("vm.create", &vm_json(&s, id)), 204, "");
    }
    let list = s.raw("GET", "vms", None).json();
    assert_eq!(list.as_array().unwrap().len(), 4);
    // Several VMs: the id is required.
    expect(&s.raw("PUT", "vm.boot", None), 400, "?id=");
    for id in ["a", "b", "c", "d"] {
        expect(&s.raw("PUT", &format!("vm.boot?id={id}"), None), 204, "");
        assert_eq!(state(&s, id), "Running");
    }
    expect(&s.raw("PUT", "vm.pause?id=a", None), 204, "");
    assert_eq!(state(&s, "a"), "Paused");
    expect(&s.raw("PUT", "vm.pause?id=a", None), 409, "Paused");
    expect(&s.raw("PUT", "vm.resume?id=a", None), 204, "");
    expect(&s.raw("PUT", "vm.reboot?id=a", None), 204, "");
    expect(&s.raw("PUT", "vm.resume?id=a", None), 409, "Running");
    // Counters grow while running.
    let c1 = s.raw("GET", "vm.counters?id=b", None).json();
    let c2 = s.raw("GET", "vm.counters?id=b", None).json();
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
            &s.raw("PUT", &format!("vm.shutdown?id={id}"), None),
            204,
            "",
        );
        assert_eq!(state(&s, id), "Shutdown");
        expect(
            &s.raw("PUT", &format!("vm.shutdown?id={id}"), None),
            409,
            "Shutdown",
        );
        expect(&s.raw("PUT", &format!("vm.delete?id={id}"), None), 204, "");
    }
    assert_eq!(s.raw("GET", "vms", None).json(), json!([]));
    expect(&s.raw("GET", "vm.info", None), 404, "no VM");
}

#[test]
fn live_changes() {
    let s = start();
    expect(&s.put("vm.create", &vm_json(&s, "a")), 204, "");
    // Exactly one VM: the id may be left out.
    let disk = json!({"id": "d2", "path": s.image("extra.raw", 1), "iothread": "shared"});
    expect(&s.put("vm.add-disk", &disk), 204, "");
    expect(&s.put("vm.add-disk", &disk), 409, "already has a disk");
    let info = s.raw("GET", "vm.info", None).json();
    assert_eq!(info["config"]["disks"].as_array().unwrap().len(), 3);
    expect(&s.put("vm.remove-device", &json!({"id": "d2"})), 204, "");
    expect(&s.put("vm.remove-device", &json!({"id": "d2"})), 404, "d2");
    let upd = json!({"id": "d0", "throttle": {"iops_total": 500}});
    expect(&s.put("vm.update-disk", &upd), 204, "");
    let info = s.raw("GET", "vm.info", None).json();
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
    let info = s.raw("GET", "vm.info", None).json();
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
    let s = start();
    let vm = vm_json(&s, "a");
    expect(
        &s.raw("PUT", "vm.create", Some("{\"id\": ")),
        400,
        "invalid JSON",
    );
    expect(&s.raw("PUT", "vm.create", Some("")), 400, "invalid JSON");
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
    // Another VM on a's writable image: refused, naming the holder.
    let mut locked = vm_json(&s, "b");
    locked["disks"][1]["path"] = vm["disks"][1]["path"].clone();
    expect(
        &s.put("vm.create", &locked),
        409,
        "is in use by VM a (disk d1, writable)",
    );
    expect(&s.raw("PUT", "vm.boot?id=zz", None), 404, "zz");
    expect(
        &s.raw("GET", "vm.info?id=a&x=1", None),
        400,
        "unknown field",
    );
    expect(&s.raw("PUT", "vm.resume?id=a", None), 409, "Created");
    expect(
        &s.put("vm.add-disk?id=a", &json!({"id": "d9"})),
        400,
        "missing field `path`",
    );
    expect(&s.raw("GET", "nothing", None), 404, "no endpoint");
    expect(&s.raw("POST", "vm.boot", None), 405, "not allowed");
    let big = format!("{{\"id\": \"{}\"}}", "x".repeat(2 << 20));
    let (status, text) = oversized_request(&s.socket, "/api/v1/vm.create", big.as_bytes());
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("larger than"), "{text}");
    // Still serving.
    expect(&s.raw("PUT", "vm.boot", None), 204, "");
    assert_eq!(state(&s, "a"), "Running");
}

/// Issue 11 item 3: what the config check refuses, it refuses at `vm.create` and at
/// `vm.add-disk` alike, with a 400 naming the field: `aio=native` without O_DIRECT, an
/// iothread named like a disk (a disk's id names its dedicated iothread), a CPU the host
/// lacks.
#[test]
fn config_checks_hold_at_create_and_add_disk() {
    let s = start();
    let vm = vm_json(&s, "a");
    for cache in ["writeback", "writethrough", "unsafe"] {
        let mut bad = vm.clone();
        bad["disks"][1]["aio"] = json!("native");
        bad["disks"][1]["cache"] = json!(cache);
        let r = s.put("vm.create", &bad);
        expect(&r, 400, "disks[1]");
        expect(
            &r,
            400,
            &format!(
                "aio=native needs O_DIRECT: use cache=none or cache=directsync (cache={cache} was given)"
            ),
        );
    }
    let mut clash = vm.clone();
    clash["iothreads"] = json!([{"id": "shared"}, {"id": "d1"}]);
    let r = s.put("vm.create", &clash);
    expect(&r, 400, "iothreads[1].id");
    expect(&r, 400, "is also the id of disk d1 (disks[1])");
    let mut cpu = vm.clone();
    cpu["iothreads"][0]["cpu_affinity"] = json!([4095]);
    expect(&s.put("vm.create", &cpu), 400, "CPU 4095");

    expect(&s.put("vm.create", &vm), 204, "");
    for cache in ["writeback", "writethrough", "unsafe"] {
        let disk =
            json!({"id": "d2", "path": s.image("d2.raw", 1), "aio": "native", "cache": cache});
        let r = s.put("vm.add-disk?id=a", &disk);
        expect(&r, 400, "aio=native needs O_DIRECT");
        expect(&r, 400, &format!("cache={cache}"));
    }
    let disk = json!({"id": "shared", "path": s.image("d3.raw", 1)});
    let r = s.put("vm.add-disk?id=a", &disk);
    expect(&r, 400, "disks[2].id");
    expect(&r, 400, "is also the id of iothread shared (iothreads[0])");
    expect(
        &s.put(
            "vm.update-iothread?id=a",
            &json!({"id": "shared", "cpu_affinity": [4095]}),
        ),
        400,
        "CPU 4095",
    );
    let info = s.raw("GET", "vm.info?id=a", None).json();
    assert_eq!(
        info["config"]["disks"].as_array().unwrap().len(),
        2,
        "{info}"
    );
    // Accepted with O_DIRECT.
    let disk = json!({"id": "d2", "path": s.image("d2.raw", 1), "aio": "native", "cache": "none"});
    expect(&s.put("vm.add-disk?id=a", &disk), 204, "");
}

/// Issue 11 item 3: a change of one disk checks that disk, not the whole VM again: with
/// the kernel file gone after the VM was created, throttle changes and new disks still
/// work (their own checks still hold).
#[test]
fn disk_changes_do_not_recheck_the_kernel() {
    let s = start();
    expect(&s.put("vm.create", &vm_json(&s, "a")), 204, "");
    expect(&s.raw("PUT", "vm.boot?id=a", None), 204, "");
    std::fs::remove_file(s.path("kernel")).unwrap();
    let upd = json!({"id": "d0", "throttle": {"iops_total": 500}});
    expect(&s.put("vm.update-disk?id=a", &upd), 204, "");
    let disk = json!({"id": "d2", "path": s.image("extra.raw", 1)});
    expect(&s.put("vm.add-disk?id=a", &disk), 204, "");
    // The disk's own checks still hold.
    let bad = json!({"id": "d0", "throttle": {"iops_total": 10, "iops_read": 5}});
    let r = s.put("vm.update-disk?id=a", &bad);
    expect(&r, 400, "iops");
    assert!(!r.text().contains("payload.kernel"), "{}", r.text());
    let dup = json!({"id": "d3", "path": s.image("a-0.raw", 1)});
    let r = s.put("vm.add-disk?id=a", &dup);
    expect(&r, 400, "same image as disks[0] (d0)");
    assert!(!r.text().contains("payload.kernel"), "{}", r.text());
    let info = s.raw("GET", "vm.info?id=a", None).json();
    assert_eq!(info["config"]["disks"][0]["throttle"]["iops_total"], 500);
    assert_eq!(
        info["config"]["disks"].as_array().unwrap().len(),
        3,
        "{info}"
    );
}

#[test]
fn vmctl_drives_the_service() {
    let mut s = start();
    let cfg = s.path("vm.json");
    std::fs::write(&cfg, vm_json(&s, "a").to_string()).unwrap();
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
    // `vmctl events` follows the stream: one line per step, in order.
    let events = std::process::Command::new(env!("CARGO_BIN_EXE_vmctl"))
        .arg("--api-socket")
        .arg(&s.socket)
        .args(["events", "--count", "3"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Subscribed once vmmd has a second client on its socket; a short wait does.
    std::thread::sleep(Duration::from_millis(300));
    ok(&["create", cfg.to_str().unwrap()]);
    ok(&["boot"]);
    ok(&["pause"]);
    ok(&["resume"]);
    let out = events.wait_with_output().unwrap();
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let kinds: Vec<&str> = lines
        .iter()
        .map(|l| l.split_whitespace().nth(2).unwrap_or(""))
        .collect();
    assert_eq!(kinds, ["created", "booted", "paused"], "{lines:?}");
    assert!(
        lines
            .iter()
            .all(|l| l.split_whitespace().nth(1) == Some("a")),
        "{lines:?}"
    );
    let list = ok(&["list"]);
    assert!(list.contains("ID") && list.contains("Running"), "{list}");
    let info: Value = serde_json::from_str(&ok(&["--json", "info", "--id", "a"])).unwrap();
    assert_eq!(info["state"], "Running");
    let extra = s.image("extra.raw", 1);
    ok(&[
        "add-disk",
        &format!("id=d2,path={},iothread=shared", extra.display()),
    ]);
    ok(&["update-disk", "id=d2,throttle.iops_total=300"]);
    ok(&["update-iothread", "id=shared,poll_max_ns=0,cpu_affinity=0"]);
    let info = ok(&["info"]);
    assert!(info.contains("d2") && info.contains("300"), "{info}");
    // One row per disk and per iothread, read from the typed vm.counters reply.
    let table = ok(&["counters"]);
    let first: Vec<&str> = table
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for want in [
        "DISK",
        "d0",
        "d1",
        "d2",
        "IOTHREAD",
        "shared",
        "dedicated:d1",
    ] {
        assert!(first.contains(&want), "no {want} row:\n{table}");
    }
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
        if let Some(status) = s.child.as_mut().unwrap().try_wait().unwrap() {
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
    let s = start();
    expect(&s.put("vm.create", &vm_json(&s, "a")), 204, "");
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
