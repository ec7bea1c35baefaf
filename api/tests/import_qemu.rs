//! `vmctl import-qemu` as a user runs it: the command line after `--`, or in a file
//! (NUL-separated as in `/proc/PID/cmdline`, or shell words with `\` continuations);
//! the JSON on standard output, what is left out on standard error, `--strict`
//! refusing it, and `--create` on `vmmd --fake`. Then the test guest boots under the real
//! `vmmd` from an imported command line.

use std::process::Output;

use serde_json::Value;

mod support;

use support::Service;

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A data-plane command line for `vmctl` (a kernel and an image that exist).
fn command_line(s: &Service) -> Vec<String> {
    std::fs::write(s.path("vmlinuz"), b"kernel").unwrap();
    let img = s.image("db1.raw", 1);
    [
        "qemu-system-x86_64",
        "-name",
        "db1",
        "-m",
        "256M",
        "-smp",
        "2",
        "-kernel",
        s.path("vmlinuz").to_str().unwrap(),
        "-append",
        "console=ttyS0 quiet",
        "-object",
        "iothread,id=io0,poll-max-ns=0",
        "-drive",
        &format!(
            "if=none,id=d0,file={},format=raw,cache=none,aio=io_uring,throttling.iops-total=3000",
            img.display()
        ),
        "-device",
        "virtio-blk-pci,drive=d0,id=vda,iothread=io0,num-queues=1",
        "-netdev",
        "user,id=n0",
    ]
    .map(str::to_string)
    .to_vec()
}

fn check(config: &Value) {
    assert_eq!(config["id"], "db1");
    assert_eq!(config["memory"]["size_mib"], 256);
    assert_eq!(config["cpus"]["boot_vcpus"], 2);
    assert_eq!(config["payload"]["cmdline"], "console=ttyS0 quiet");
    assert_eq!(config["iothreads"][0]["id"], "io0");
    assert_eq!(config["iothreads"][0]["poll_max_ns"], 0);
    let d = &config["disks"][0];
    assert_eq!(d["id"], "vda");
    assert_eq!(d["iothread"], "io0");
    assert_eq!(d["cache"], "none");
    assert_eq!(d["throttle"]["iops_total"], 3000);
}

#[test]
fn a_command_line_imports_from_args_and_files_and_creates_the_vm() {
    let s = Service::start(&["--fake"]);
    let args = command_line(&s);

    let mut vmctl: Vec<&str> = vec!["import-qemu", "--"];
    vmctl.extend(args.iter().map(String::as_str));
    let o = s.vmctl(&vmctl);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    let config: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    check(&config);
    assert!(err.contains("ignored: -netdev user,id=n0"), "{err}");

    // As /proc/PID/cmdline holds it.
    let nul = s.path("cmdline");
    std::fs::write(&nul, args.join("\0") + "\0").unwrap();
    // As a user pastes it into a file: quoted, over several lines.
    let quoted: Vec<String> = args
        .iter()
        .map(|a| shlex::try_quote(a).unwrap().into_owned())
        .collect();
    let sh = s.path("cmdline.sh");
    std::fs::write(&sh, quoted.join(" \\\n  ") + "\n").unwrap();
    for file in [&nul, &sh] {
        let o = s.vmctl(&["import-qemu", "--file", file.to_str().unwrap()]);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{}: {out}{err}", file.display());
        check(&serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}")));
    }

    let mut strict = vec!["import-qemu", "--strict", "--"];
    strict.extend(args.iter().map(String::as_str));
    let o = s.vmctl(&strict);
    let (out, err) = text(&o);
    assert!(!o.status.success() && out.is_empty(), "{out}{err}");
    assert!(
        err.contains("not supported (--strict)") && err.contains("-netdev user,id=n0"),
        "{err}"
    );

    // Notes (QEMU's defaults said) do not fail --strict; a left-out key does.
    let kernel = s.path("vmlinuz").display().to_string();
    let notes_only = [
        "import-qemu",
        "--strict",
        "--",
        "-name",
        "n",
        "-m",
        "64",
        "-kernel",
        &kernel,
        "-drive",
    ];
    let drive = format!("if=virtio,file={},format=raw", s.path("db1.raw").display());
    let o = s.vmctl(&[&notes_only[..], &[drive.as_str()]].concat());
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(err.contains("vmctl: note: disk virtio0: no aio="), "{err}");
    let cor = format!("{drive},copy-on-read=on");
    let o = s.vmctl(&[&notes_only[..], &[cor.as_str()]].concat());
    let (_, err) = text(&o);
    assert!(
        !o.status.success() && err.contains("copy-on-read=on"),
        "{err}"
    );

    let o = s.vmctl(&[
        "import-qemu",
        "--",
        "-drive",
        "if=virtio,format=vmdk,file=/x",
    ]);
    let (_, err) = text(&o);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("format=vmdk is not supported"), "{err}");

    let mut create = vec!["import-qemu", "--create", "--"];
    create.extend(args.iter().map(String::as_str));
    let o = s.vmctl(&create);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    let info = s.ok("GET", "vm.info?id=db1", None).json();
    check(&info["config"]);
}

/// The test guest booted under the real `vmmd` from an imported command line: direct
/// kernel boot, an iothread, a throttled virtio disk on a `-blockdev` graph, the serial
/// port to a file; the guest reads and writes its disk and powers off.
#[test]
fn the_test_guest_boots_from_an_imported_command_line() {
    let test = "the_test_guest_boots_from_an_imported_command_line";
    if !tests::skip::kvm_or_skip(test) {
        return;
    }
    let s = Service::start(&[]);
    let events = support::Events::follow(&s.socket);
    let img = s.sparse_image("g.raw", 16);
    let kernel = support::guest();
    let append = format!("exit=acpi pci=auto tsc_khz={} ms=50", support::tsc_khz());
    let serial = format!("file:{}", s.path("g.serial").display());
    let file = format!(
        r#"{{"driver":"file","node-name":"g-file","filename":"{}","aio":"io_uring","discard":"unmap"}}"#,
        img.display()
    );
    let o = s.vmctl(&[
        "import-qemu",
        "--strict",
        "--create",
        "--",
        "qemu-system-x86_64",
        "-enable-kvm",
        "-name",
        "g",
        "-m",
        "64",
        "-kernel",
        kernel.to_str().unwrap(),
        "-append",
        &append,
        "-serial",
        &serial,
        "-object",
        "iothread,id=io0",
        "-object",
        "throttle-group,id=tg,x-iops-total=50000",
        "-blockdev",
        &file,
        "-blockdev",
        "driver=raw,node-name=g-raw,file=g-file",
        "-blockdev",
        "driver=throttle,node-name=g-throttle,throttle-group=tg,file=g-raw",
        "-device",
        "virtio-blk-pci,drive=g-throttle,id=vda,iothread=io0",
    ]);
    let (out, err) = text(&o);
    // --strict: nothing is left out (what is said about QEMU's defaults are notes).
    assert!(o.status.success(), "{out}{err}");
    support::boot_and_verify(&s, &events, "g", &s.path("g.serial"), "vda", "io0");
}
