//! NBD disks under `vmmd`, in a sandboxed VM process (seccomp, Landlock): the test guest
//! writes and verifies its patterns on a disk `qemu-nbd` serves (Unix socket) while its
//! other disk is on `nbdkit` over TCP with every write failing (the guest sees IOERR for
//! exactly those, and no read error); `vm.counters` shows the connections; the server is
//! killed and restarted under the guest's I/O, which goes on after the reconnect; the
//! image holds the guest's patterns. `vm.create` with a server nobody listens on answers
//! 400 naming the address and the reason.
//!
//! Skips, saying why, when `/dev/kvm`, `qemu-nbd` or `nbdkit` is missing.

use std::time::{Duration, Instant};

mod support;

use serde_json::json;
use support::{Events, Service, expect};
use tests::nbd_server::{Listen, NbdServer, free_port, have};

#[test]
fn guest_io_on_nbd_disks_survives_a_server_restart() {
    let test = "guest_io_on_nbd_disks_survives_a_server_restart";
    if !tests::skip::kvm_or_skip(test)
        || !have("qemu-nbd", test, "qemu-utils")
        || !have("nbdkit", test, "nbdkit")
    {
        return;
    }
    let elf = support::guest();
    let tsc = support::tsc_khz();
    let s = Service::start(&[]);
    let events = Events::follow(&s.socket);

    // Nobody listens: 400 with the server's address and the reason.
    let port = free_port();
    let vm = |id: &str, disks: serde_json::Value, cmdline: &str| {
        json!({
            "id": id,
            "memory": {"size_mib": 64},
            "payload": {"kernel": elf, "cmdline": format!("exit=acpi pci=auto tsc_khz={tsc} {cmdline}")},
            "serial": {"mode": "file", "path": s.path(&format!("{id}.serial"))},
            "disks": disks
        })
    };
    let nowhere = vm(
        "nowhere",
        json!([{"id": "d0", "path": format!("nbd://127.0.0.1:{port}/x")}]),
        "ms=50",
    );
    let r = s.put("vm.create", &nowhere);
    expect(&r, 400, &[&format!("127.0.0.1:{port}"), "refused"]);

    let image = s.image("d0.raw", 16);
    let mut qemu_nbd = NbdServer::qemu_nbd(&image, "d0", Listen::Unix(s.path("d0.sock")));
    let failing = NbdServer::nbdkit(
        &[
            "--filter=error",
            "memory",
            "size=16M",
            "error=EIO",
            "error-pwrite-rate=100%",
        ],
        Listen::Tcp(free_port()),
    );
    // Pattern checks on both disks, then about 6 s of random reads on d0.
    let config = vm(
        "net",
        json!([
            {"id": "d0", "path": qemu_nbd.uri(), "cache": "none", "reconnect_delay": 30},
            // A host name: the confined process resolves it (the resolver's syscalls and
            // files pass its filters and Landlock).
            {"id": "d1", "path": failing.uri().replace("127.0.0.1", "localhost")}
        ]),
        "ms=50 windows=60 window_ms=100",
    );
    s.ok("PUT", "vm.create", Some(&config));
    s.ok("PUT", "vm.boot?id=net", None);
    let reads = || {
        s.counters("net")["disks"]["d0"]["read"]["ops"]
            .as_u64()
            .unwrap_or(0)
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(s.path("net.serial"))
        .unwrap_or_default()
        .contains("disk0.window=")
    {
        assert!(
            Instant::now() < deadline,
            "the guest did not reach its windows"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let c = s.counters("net");
    let nbd = &c["disks"]["d0"]["nbd"];
    assert_eq!(nbd["state"], "connected", "{c}");
    assert_eq!(
        nbd["server"],
        format!("unix:{}", s.path("d0.sock").display()),
        "{c}"
    );
    assert!(nbd["connections"].as_u64() >= Some(1), "{c}");
    let d1 = c["disks"]["d1"]["nbd"]["server"].as_str().unwrap_or("");
    assert!(
        failing
            .uri()
            .replace("127.0.0.1", "localhost")
            .starts_with(&format!("nbd://{d1}/")),
        "{c}"
    );

    // Kill the server under the guest's reads and start it again.
    qemu_nbd.kill();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let c = s.counters("net");
        if c["disks"]["d0"]["nbd"]["state"] == "reconnecting" {
            break;
        }
        let log = std::fs::read_to_string(s.state_dir().join("net/vmm.log")).unwrap_or_default();
        assert!(
            Instant::now() < deadline && c["disks"]["d0"].is_object(),
            "{c}\n{}\n{log}",
            s.ok("GET", "vm.info?id=net", None).text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    qemu_nbd.restart();
    let before = reads();
    let deadline = Instant::now() + Duration::from_secs(20);
    while reads() < before + 100 {
        assert!(
            Instant::now() < deadline,
            "I/O did not go on after the restart"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let c = s.counters("net");
    assert_eq!(c["disks"]["d0"]["nbd"]["state"], "connected", "{c}");
    assert_eq!(c["disks"]["d0"]["nbd"]["reconnects"], 1, "{c}");

    // Hot plug of an NBD disk: the VM process connects itself (no descriptor handover).
    let spare = NbdServer::nbdkit(&["memory", "size=8M"], Listen::Unix(s.path("d2.sock")));
    s.ok(
        "PUT",
        "vm.add-disk?id=net",
        Some(&json!({"id": "d2", "path": spare.uri()})),
    );
    let c = s.counters("net");
    assert_eq!(c["disks"]["d2"]["nbd"]["state"], "connected", "{c}");

    events.wait_for("net", "guest-poweroff", Duration::from_secs(120));
    let console = std::fs::read_to_string(s.path("net.serial")).unwrap_or_default();
    let value = |k: &str| {
        console
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(value("disk0.verify"), "ok", "{console}");
    assert_eq!(
        value("disk0.windows"),
        "0",
        "no read failed or stalled:\n{console}"
    );
    // Every write to d1 failed, as the server said; no read did.
    let blocks = value("disk1.verified_blocks");
    assert_eq!(blocks, "0", "{console}");
    assert_eq!(value("disk1.write_errors"), "64", "{console}");
    assert_eq!(value("disk1.read_errors"), "0", "{console}");
    assert_eq!(value("disk1.verify"), "fail", "{console}");
    // The patterns are in the file behind qemu-nbd.
    let data = std::fs::read(&image).unwrap_or_default();
    for (w, chunk) in data[..4096].chunks_exact(8).enumerate() {
        let word = u64::from_le_bytes(chunk.try_into().unwrap_or_default());
        assert_eq!(
            word,
            tests::test_guest::pattern_word(1, 0, w as u64),
            "image word {w}"
        );
    }
    s.ok("PUT", "vm.delete?id=net", None);
}
