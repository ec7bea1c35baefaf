//! What a careless or hostile API client can do to the host and to other VMs, tried
//! against the real backend (`vmmd` on KVM), one test per class of problem: host files
//! destroyed through serial paths, sockets deleted, the API hung by one stuck open(),
//! host limits answered 500, checks that differ by state or do not check, misleading
//! messages, and paths outside `--allowed-dir`.
//! Skips, saying why, when `/dev/kvm` is missing.

#![allow(clippy::cast_possible_wrap)] // Test data and figures, not guest input.

mod support;

use std::io::Read;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

use api::client::Client;
use serde_json::{Value, json};
use support::{Service, expect, guest, guest_vm, wait_exit};
use tests::skip::kvm_or_skip;

fn checksum(path: &Path) -> u64 {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    // FNV-1a: any change of any byte shows.
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap_or_default()).unwrap_or_default();
    // SAFETY: mkfifo reads the NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// Issue item 1: A create that names a running VM's image (directly, through a symlink or a
/// hard link) as its serial output is refused, and the image is untouched; so is any log
/// file named by a create refused for another reason.
#[test]
fn a_rejected_create_destroys_nothing() {
    if !kvm_or_skip("a_rejected_create_destroys_nothing") {
        return;
    }
    let elf = guest();
    let s = Service::start(&[]);
    let img = s.image("a.raw", 16);
    s.ok(
        "PUT",
        "vm.create",
        Some(&guest_vm(&elf, "a", json!([{"id": "d0", "path": img}]))),
    );
    s.ok("PUT", "vm.boot?id=a", None);
    s.ok("PUT", "vm.pause?id=a", None);
    let before = checksum(&img);
    let link = s.path("link.raw");
    std::os::unix::fs::symlink(&img, &link).unwrap_or_else(|e| panic!("{e}"));
    let hard = s.path("hard.raw");
    std::fs::hard_link(&img, &hard).unwrap_or_else(|e| panic!("{e}"));
    for target in [&img, &link, &hard] {
        let mut b = guest_vm(
            &elf,
            "b",
            json!([{"id": "d0", "path": s.path("missing.raw")}]),
        );
        b["serial"] = json!({"mode": "file", "path": target});
        let r = s.req("PUT", "vm.create", Some(&b));
        assert!(r.status == 409 || r.status == 400, "{}", r.text());
        // Even when the other checks pass, an image in use is no serial file.
        b["disks"] = json!([]);
        let r = s.req("PUT", "vm.create", Some(&b));
        expect(&r, 409, &["serial.path", "VM a"]);
        assert_eq!(
            checksum(&img),
            before,
            "{} emptied the image",
            target.display()
        );
    }
    // A log file named by a create refused later (a missing disk) keeps its content.
    let log = s.path("old.log");
    std::fs::write(&log, b"yesterday's console\n").unwrap_or_else(|e| panic!("{e}"));
    let mut c = guest_vm(
        &elf,
        "c",
        json!([{"id": "d0", "path": s.path("missing.raw")}]),
    );
    c["serial"] = json!({"mode": "file", "path": log});
    expect(&s.req("PUT", "vm.create", Some(&c)), 400, &["missing.raw"]);
    assert_eq!(
        std::fs::read(&log).unwrap_or_default(),
        b"yesterday's console\n"
    );
    // Accepted, it starts a new console log.
    c["disks"] = json!([]);
    s.ok("PUT", "vm.create", Some(&c));
    assert_eq!(std::fs::read(&log).unwrap_or_default(), b"");
    s.ok("PUT", "vm.resume?id=a", None);
    assert_eq!(s.state("a"), "Running");
}

/// Issue item 2: A serial socket never deletes the service's API socket or another VM's
/// console; a stale socket is replaced; a VM's socket goes with the VM.
#[test]
fn sockets_of_the_service_and_of_other_vms_survive() {
    if !kvm_or_skip("sockets_of_the_service_and_of_other_vms_survive") {
        return;
    }
    let elf = guest();
    let s = Service::start(&[]);
    let with_socket = |id: &str, path: &Path| {
        let mut v = guest_vm(&elf, id, json!([]));
        v["serial"] = json!({"mode": "socket", "path": path});
        v
    };
    let r = s.req("PUT", "vm.create", Some(&with_socket("a", &s.socket)));
    expect(&r, 409, &["API socket"]);
    s.ok("GET", "vmm.ping", None);

    let console = s.path("b.sock");
    s.ok("PUT", "vm.create", Some(&with_socket("b", &console)));
    let r = s.req("PUT", "vm.create", Some(&with_socket("c", &console)));
    expect(&r, 409, &["serial output of VM b"]);
    assert!(
        UnixStream::connect(&console).is_ok(),
        "b's console is still there"
    );

    // A socket some other program listens on is left alone; a stale one is replaced.
    let foreign = s.path("foreign.sock");
    let listener = UnixListener::bind(&foreign).unwrap_or_else(|e| panic!("{e}"));
    let r = s.req("PUT", "vm.create", Some(&with_socket("d", &foreign)));
    expect(&r, 409, &["listening"]);
    assert!(UnixStream::connect(&foreign).is_ok());
    drop(listener);
    s.ok("PUT", "vm.create", Some(&with_socket("d", &foreign)));
    assert!(UnixStream::connect(&foreign).is_ok(), "d listens there now");

    s.ok("PUT", "vm.delete?id=b", None);
    assert!(!console.exists(), "b's own socket goes with b");
    s.ok("GET", "vmm.ping", None);
    assert!(s.socket.exists());
}

/// Issue item 3: A create stuck on a path that would block in open() (a FIFO) holds up
/// neither listing, `/metrics`, calls on other VMs nor SIGTERM; and a FIFO is refused at
/// once.
#[test]
fn a_create_on_a_fifo_hangs_nothing() {
    if !kvm_or_skip("a_create_on_a_fifo_hangs_nothing") {
        return;
    }
    let elf = guest();
    let mut s = Service::start(&[]);
    let img = s.image("a.raw", 4);
    s.ok(
        "PUT",
        "vm.create",
        Some(&guest_vm(&elf, "a", json!([{"id": "d0", "path": img}]))),
    );
    s.ok("PUT", "vm.boot?id=a", None);
    let fifo = |n: u32| {
        let p = s.path(&format!("fifo{n}"));
        mkfifo(&p);
        p
    };
    let bodies: Vec<Value> = vec![
        guest_vm(
            &elf,
            "f1",
            json!([{"id": "d0", "path": fifo(1), "readonly": true}]),
        ),
        guest_vm(&elf, "f2", json!([{"id": "d0", "path": fifo(2)}])),
        {
            let mut v = guest_vm(&elf, "f3", json!([]));
            v["serial"] = json!({"mode": "file", "path": fifo(3)});
            v
        },
        {
            let mut v = guest_vm(&elf, "f4", json!([]));
            v["payload"]["initramfs"] = json!(fifo(4));
            v
        },
    ];
    let creates: Vec<_> = bodies
        .into_iter()
        .map(|body| {
            let socket = s.socket.clone();
            std::thread::spawn(move || {
                Client::new(&socket)
                    .request_blocking(
                        "PUT",
                        "/api/v1/vm.create",
                        Some(body.to_string().into_bytes()),
                    )
                    .map(|r| (r.status, r.text()))
            })
        })
        .collect();
    let t = Instant::now();
    let vms = s.ok("GET", "vms", None).json();
    assert!(
        vms.as_array()
            .is_some_and(|a| a.iter().any(|v| v["id"] == "a")),
        "{vms}"
    );
    s.ok("GET", "vm.info?id=a", None);
    let metrics = s
        .client
        .request_blocking("GET", "/metrics", None)
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(metrics.status, 200);
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "listing took {:?}",
        t.elapsed()
    );
    for c in creates {
        let (status, text) = c
            .join()
            .unwrap_or_else(|_| panic!("create thread"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(status, 400, "{text}");
        assert!(text.contains("a FIFO"), "{text}");
    }
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    // SIGTERM with a running VM: the service stops it and exits within 2 s.
    let t = Instant::now();
    // SAFETY: kill sends a signal to our own child.
    unsafe { libc::kill(s.pid() as libc::pid_t, libc::SIGTERM) };
    let mut child = s.child.take().unwrap_or_else(|| panic!("no child"));
    assert!(
        wait_exit(&mut child, Duration::from_secs(2)),
        "vmmd still running 2 s after SIGTERM"
    );
    assert!(t.elapsed() < Duration::from_secs(2));
}

/// Issue item 4: The client's and the host's limits: more disks than PCI slots (400 naming
/// the limit, at create and at hot plug), hugepages the host lacks (503), running out of
/// file descriptors (503); the service keeps serving.
#[test]
fn limits_are_4xx_or_503_not_500() {
    if !kvm_or_skip("limits_are_4xx_or_503_not_500") {
        return;
    }
    let elf = guest();
    let s = Service::start(&[]);
    let null = |i: usize| json!({"id": format!("n{i}"), "path": "null", "null_size": 1 << 20, "iothread": "io0"});
    let mut vm = guest_vm(&elf, "many", json!((0..32).map(null).collect::<Vec<_>>()));
    vm["iothreads"] = json!([{"id": "io0"}]);
    let r = s.req("PUT", "vm.create", Some(&vm));
    expect(&r, 400, &["disks: at most 31 per VM", "PCI", "got 32"]);
    vm["disks"] = json!((0..31).map(null).collect::<Vec<_>>());
    s.ok("PUT", "vm.create", Some(&vm));
    let r = s.req("PUT", "vm.add-disk?id=many", Some(&null(31)));
    expect(&r, 400, &["at most 31"]);

    // Hugepages: more than the host reserves in all is invalid (400); reserved but taken
    // by another VM is the host's limit of the moment (503).
    let mut h = guest_vm(&elf, "huge", json!([]));
    h["memory"]["hugepages"] = json!(true);
    if vmm::memory::reserved_hugepages() < 32 {
        let r = s.req("PUT", "vm.create", Some(&h));
        expect(&r, 400, &["memory.hugepages", "reserves", "32 needed"]);
    }
    match Hugepages::reserve(32) {
        Some(_reserved) => {
            s.ok("PUT", "vm.create", Some(&h));
            h["id"] = json!("huge2");
            let r = s.req("PUT", "vm.create", Some(&h));
            expect(&r, 503, &["hugepages are in use", "0 free 2 MiB hugepages"]);
            s.ok("PUT", "vm.delete?id=huge", None);
        }
        None => tests::skip::partial(
            "limits_are_4xx_or_503_not_500",
            "hugepages in use (503) not checked: cannot reserve hugepages here",
        ),
    }
    s.ok("GET", "vmm.ping", None);

    // A service with few file descriptors: a VM with many disks runs out of them.
    let tight = Service::start_with(&[], |cmd| {
        // SAFETY: setrlimit in the child before exec only changes the child's limit.
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: 64,
                    rlim_max: 64,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    let disks: Vec<Value> = (0..24)
        .map(|i| json!({"id": format!("d{i}"), "path": tight.image(&format!("{i}.raw"), 1)}))
        .collect();
    let r = tight.req(
        "PUT",
        "vm.create",
        Some(&guest_vm(&elf, "fds", json!(disks))),
    );
    expect(&r, 503, &["file descriptors"]);
    tight.ok("GET", "vmm.ping", None);
    // Once the failed VM's descriptors are released, a small VM fits.
    let small = json!([{"id": "d0", "path": tight.path("0.raw")}]);
    tight.ok("PUT", "vm.create", Some(&guest_vm(&elf, "ok", small)));
}

/// 2 MiB hugepages reserved for a test (as root), given back when dropped.
struct Hugepages {
    before: String,
}

impl Hugepages {
    const KNOB: &str = "/proc/sys/vm/nr_hugepages";

    /// Reserves `n` more hugepages, or `None` when this host does not let us.
    fn reserve(n: u64) -> Option<Hugepages> {
        let before = std::fs::read_to_string(Self::KNOB).ok()?;
        let want = before.trim().parse::<u64>().ok()? + n;
        std::fs::write(Self::KNOB, want.to_string()).ok()?;
        let guard = Hugepages { before };
        (vmm::memory::reserved_hugepages() >= want).then_some(guard)
    }
}

impl Drop for Hugepages {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::KNOB, self.before.trim());
    }
}

/// Issue item 5: `vm.add-disk` checks the image the same way in every state: a missing
/// image or a device that is no disk is refused on a created, a running and a shut-down VM.
#[test]
fn add_disk_checks_alike_in_every_state() {
    if !kvm_or_skip("add_disk_checks_alike_in_every_state") {
        return;
    }
    let elf = guest();
    let s = Service::start(&[]);
    let img = s.image("a.raw", 4);
    s.ok(
        "PUT",
        "vm.create",
        Some(&guest_vm(&elf, "a", json!([{"id": "d0", "path": img}]))),
    );
    let missing = json!({"id": "d1", "path": s.path("missing.raw")});
    let zero = json!({"id": "d1", "path": "/dev/zero"});
    let try_all = |state: &str| {
        assert_eq!(s.state("a"), state);
        expect(
            &s.req("PUT", "vm.add-disk?id=a", Some(&missing)),
            400,
            &["missing.raw"],
        );
        expect(
            &s.req("PUT", "vm.add-disk?id=a", Some(&zero)),
            400,
            &["a character device"],
        );
    };
    try_all("Created");
    s.ok("PUT", "vm.boot?id=a", None);
    try_all("Running");
    s.ok("PUT", "vm.shutdown?id=a", None);
    try_all("Shutdown");
    // A good image is still accepted on the shut-down VM and there at the next boot.
    let good = s.image("b.raw", 4);
    s.ok(
        "PUT",
        "vm.add-disk?id=a",
        Some(&json!({"id": "d1", "path": good})),
    );
    s.ok("PUT", "vm.boot?id=a", None);
    let c = s.ok("GET", "vm.counters?id=a", None).json();
    assert!(c["disks"]["d1"].is_object(), "{c}");
}

/// Issue 11 item 3: a disk change checks the disk, not the whole VM again: once the VM
/// runs, its kernel file may go away and throttle changes and hot-plugged disks still
/// work, on the real backend (the API's check and the VM's own).
#[test]
fn disk_changes_work_after_the_kernel_file_is_gone() {
    if !kvm_or_skip("disk_changes_work_after_the_kernel_file_is_gone") {
        return;
    }
    let s = Service::start(&[]);
    // A copy of the guest, which this test may delete.
    let kernel = s.path("guest.elf");
    std::fs::copy(guest(), &kernel).unwrap_or_else(|e| panic!("{e}"));
    let img = s.image("a.raw", 4);
    let mut vm = guest_vm(&kernel, "a", json!([{"id": "d0", "path": img}]));
    // Long phases: the guest is still running when the disks change.
    let cmdline = vm["payload"]["cmdline"].as_str().unwrap_or_default();
    vm["payload"]["cmdline"] = json!(cmdline.replace("ms=2000", "ms=60000"));
    s.ok("PUT", "vm.create", Some(&vm));
    s.ok("PUT", "vm.boot?id=a", None);
    std::fs::remove_file(&kernel).unwrap_or_else(|e| panic!("{e}"));
    s.ok(
        "PUT",
        "vm.update-disk?id=a",
        Some(&json!({"id": "d0", "throttle": {"iops_total": 500}})),
    );
    let extra = s.image("b.raw", 4);
    s.ok(
        "PUT",
        "vm.add-disk?id=a",
        Some(&json!({"id": "d1", "path": extra})),
    );
    assert_eq!(s.state("a"), "Running");
    let info = s.ok("GET", "vm.info?id=a", None).json();
    assert_eq!(
        info["config"]["disks"][0]["throttle"]["iops_total"], 500,
        "{info}"
    );
    let c = s.ok("GET", "vm.counters?id=a", None).json();
    assert!(c["disks"]["d1"].is_object(), "{c}");
    // The disk's own checks still hold.
    expect(
        &s.req(
            "PUT",
            "vm.add-disk?id=a",
            Some(&json!({"id": "d2", "path": img})),
        ),
        400,
        &["same image as disks[0] (d0)"],
    );
    let native = json!({"id": "d2", "path": s.image("c.raw", 4), "aio": "native",
                        "cache": "writeback"});
    expect(
        &s.req("PUT", "vm.add-disk?id=a", Some(&native)),
        400,
        &["aio=native needs O_DIRECT", "cache=writeback"],
    );
    s.ok("PUT", "vm.shutdown?id=a", None);
}

/// Issue items 6 and 7: `vm.update-iothread` changes only the fields sent; a CPU the host
/// does not have is refused at create and at update.
#[test]
fn iothread_updates_merge_and_cpus_are_checked() {
    if !kvm_or_skip("iothread_updates_merge_and_cpus_are_checked") {
        return;
    }
    let elf = guest();
    let s = Service::start(&[]);
    let mut vm = guest_vm(&elf, "a", json!([]));
    vm["iothreads"] =
        json!([{"id": "io0", "poll_max_ns": 0, "aio_max_batch": 8, "cpu_affinity": [0]}]);
    let mut bad = vm.clone();
    bad["iothreads"][0]["cpu_affinity"] = json!([100]);
    expect(
        &s.req("PUT", "vm.create", Some(&bad)),
        400,
        &["CPU 100", "usable CPUs"],
    );
    s.ok("PUT", "vm.create", Some(&vm));
    s.ok(
        "PUT",
        "vm.update-iothread?id=a",
        Some(&json!({"id": "io0", "poll_grow": 4})),
    );
    let t = &s.ok("GET", "vm.info?id=a", None).json()["config"]["iothreads"][0];
    assert_eq!(
        (
            &t["poll_max_ns"],
            &t["aio_max_batch"],
            &t["cpu_affinity"],
            &t["poll_grow"]
        ),
        (&json!(0), &json!(8), &json!([0]), &json!(4)),
        "{t}"
    );
    expect(
        &s.req(
            "PUT",
            "vm.update-iothread?id=a",
            Some(&json!({"id": "io0", "cpu_affinity": [100]})),
        ),
        400,
        &["CPU 100"],
    );
    s.ok(
        "PUT",
        "vm.update-iothread?id=a",
        Some(&json!({"id": "io0", "cpu_affinity": []})),
    );
    let t = &s.ok("GET", "vm.info?id=a", None).json()["config"]["iothreads"][0];
    assert!(t.get("cpu_affinity").is_none(), "unpinned: {t}");
    assert_eq!(t["poll_grow"], 4);
}

/// Issue item 8: Messages say what happened: one image twice through a symlink is this VM's
/// own doing; /dev/zero is a character device, not an O_DIRECT problem; a dedicated
/// iothread has a name of its own and says why it cannot be changed.
#[test]
fn messages_say_what_happened() {
    if !kvm_or_skip("messages_say_what_happened") {
        return;
    }
    let elf = guest();
    let s = Service::start(&[]);
    let img = s.image("a.raw", 4);
    let link = s.path("link.raw");
    std::os::unix::fs::symlink(&img, &link).unwrap_or_else(|e| panic!("{e}"));
    let twice = guest_vm(
        &elf,
        "a",
        json!([{"id": "d0", "path": img}, {"id": "d1", "path": link}]),
    );
    let r = s.req("PUT", "vm.create", Some(&twice));
    expect(&r, 400, &["same image as disks[0] (d0)", "of this VM"]);
    assert!(!r.text().contains("another user"), "{}", r.text());
    let zero = guest_vm(
        &elf,
        "a",
        json!([{"id": "d0", "path": "/dev/zero", "cache": "none"}]),
    );
    let r = s.req("PUT", "vm.create", Some(&zero));
    expect(&r, 400, &["/dev/zero is a character device"]);
    assert!(!r.text().contains("O_DIRECT"), "{}", r.text());

    s.ok(
        "PUT",
        "vm.create",
        Some(&guest_vm(&elf, "a", json!([{"id": "d0", "path": img}]))),
    );
    let c = s.ok("GET", "vm.counters?id=a", None).json();
    assert!(c["iothreads"]["dedicated:d0"].is_object(), "{c}");
    for name in ["dedicated:d0", "d0"] {
        let r = s.req(
            "PUT",
            "vm.update-iothread?id=a",
            Some(&json!({"id": name, "poll_max_ns": 0})),
        );
        expect(
            &r,
            404,
            &["dedicated iothread of disk d0", "declare a named iothread"],
        );
    }
    // An image held by a program outside the service is said to be so.
    let other = s.image("b.raw", 4);
    let _held =
        block::Disk::open(&block::DiskOptions::new(&other)).unwrap_or_else(|e| panic!("{e}"));
    let r = s.req(
        "PUT",
        "vm.add-disk?id=a",
        Some(&json!({"id": "d1", "path": other})),
    );
    expect(&r, 409, &["outside this service"]);
}

/// Issue item 9: `--allowed-dir`: paths outside, symlinks that escape and `..` are refused
/// with 403 naming the path and the rule; paths inside are stored resolved.
#[test]
fn allowed_dirs_confine_client_paths() {
    if !kvm_or_skip("allowed_dirs_confine_client_paths") {
        return;
    }
    let elf = guest();
    let root = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let allowed = root.path().join("vms");
    let outside = root.path().join("outside");
    for d in [&allowed, &outside] {
        std::fs::create_dir_all(d).unwrap_or_else(|e| panic!("{e}"));
    }
    let kernel = allowed.join("guest.elf");
    std::fs::copy(&elf, &kernel).unwrap_or_else(|e| panic!("{e}"));
    let img = allowed.join("a.raw");
    let secret = outside.join("secret.raw");
    for f in [&img, &secret] {
        std::fs::write(f, vec![0u8; 1 << 20]).unwrap_or_else(|e| panic!("{e}"));
    }
    let escape = allowed.join("escape.raw");
    std::os::unix::fs::symlink(&secret, &escape).unwrap_or_else(|e| panic!("{e}"));
    let inner = allowed.join("inner.raw");
    std::os::unix::fs::symlink(&img, &inner).unwrap_or_else(|e| panic!("{e}"));

    let mut stderr_path = None;
    let s = Service::start_with(
        &["--allowed-dir", allowed.to_str().unwrap_or_default()],
        |c| {
            let f = root.path().join("vmmd.err");
            stderr_path = Some(f.clone());
            c.stderr(std::fs::File::create(f).unwrap_or_else(|e| panic!("{e}")));
        },
    );
    for (path, needle) in [
        (secret.clone(), "is outside the allowed directories"),
        (escape.clone(), "resolves to"),
        (allowed.join("../outside/secret.raw"), "'..'"),
    ] {
        let vm = guest_vm(&kernel, "a", json!([{"id": "d0", "path": path}]));
        let r = s.req("PUT", "vm.create", Some(&vm));
        expect(&r, 403, &["disks[0].path", needle, "--allowed-dir"]);
    }
    let vm = guest_vm(&elf, "a", json!([]));
    if !elf.starts_with(&allowed) {
        expect(
            &s.req("PUT", "vm.create", Some(&vm)),
            403,
            &["payload.kernel"],
        );
    }
    let vm = guest_vm(&kernel, "a", json!([{"id": "d0", "path": inner}]));
    s.ok("PUT", "vm.create", Some(&vm));
    let info = s.ok("GET", "vm.info?id=a", None).json();
    let real = std::fs::canonicalize(&img).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(info["config"]["disks"][0]["path"], json!(real), "{info}");
    let r = s.req(
        "PUT",
        "vm.add-disk?id=a",
        Some(&json!({"id": "d1", "path": escape})),
    );
    expect(&r, 403, &["resolves to"]);
    s.ok("PUT", "vm.boot?id=a", None);
    // A mirror target follows the same rules.
    for (path, needle) in [
        (
            outside.join("copy.raw"),
            "is outside the allowed directories",
        ),
        (escape.clone(), "resolves to"),
    ] {
        let r = s.req(
            "PUT",
            "vm.disk-mirror?id=a",
            Some(&json!({"disk": "d0", "target": {"path": path}})),
        );
        expect(&r, 403, &["target.path", needle]);
    }
    assert!(
        !outside.join("copy.raw").exists(),
        "nothing was created outside"
    );
    drop(s);
    let mut log = String::new();
    if let Some(p) = stderr_path {
        let _ = std::fs::File::open(p).and_then(|mut f| f.read_to_string(&mut log));
    }
    assert!(
        !log.contains("running as root without --allowed-dir"),
        "{log}"
    );
}

/// Without `--allowed-dir`, a root service warns once at start.
#[test]
fn a_root_service_without_allowed_dirs_warns() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        tests::skip::skip(
            "a_root_service_without_allowed_dirs_warns",
            "not running as root",
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let err = dir.path().join("vmmd.err");
    let s = Service::start_with(&[], |c| {
        c.stderr(std::fs::File::create(&err).unwrap_or_else(|e| panic!("{e}")));
    });
    drop(s);
    let log = std::fs::read_to_string(&err).unwrap_or_default();
    assert_eq!(
        log.matches("running as root without --allowed-dir").count(),
        1,
        "{log}"
    );
}
