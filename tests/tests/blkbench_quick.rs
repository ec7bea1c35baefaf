//! `blkbench --quick` as a user runs it: every contender on the quick workloads, on a
//! small image, checked from the results JSON it writes (not for speed): every contender
//! ran every workload without error and moved I/O (non-zero figures), every vhost-user
//! contender with both client patterns (batch and resubmit), the qsd version is recorded
//! when qsd ran, the spreads and ratios are there, the table and the chart name every
//! contender.
//! Needs the `vhost-user-blk` binary beside `blkbench` (both are built by
//! `cargo test --workspace --all-targets`).

#![allow(clippy::cast_possible_truncation)] // Test data and figures, not guest input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use tests::bench::{contenders, pattern, workload};
use tests::contender::{default_qsd, newest_qsd, version_number};

const BIN: &str = env!("CARGO_BIN_EXE_blkbench");

/// The backend binary blkbench will look for; a clear failure when it is not built.
fn require_backend() {
    let ours = Path::new(BIN).with_file_name("vhost-user-blk");
    assert!(
        ours.is_file(),
        "{} is missing: build it with `cargo build -p devices-cli --bin vhost-user-blk` \
         (cargo test --workspace --all-targets does)",
        ours.display()
    );
}

/// A scratch directory on a disk filesystem (O_DIRECT does not work on tmpfs).
fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("blkbench-quick-")
        .tempdir_in("/var/tmp")
        .expect("tempdir in /var/tmp")
}

fn run(args: &[&str], path_env: Option<&Path>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    if let Some(p) = path_env {
        cmd.env("PATH", p);
    }
    let out = cmd.output().expect("start blkbench");
    println!("{}", String::from_utf8_lossy(&out.stdout));
    out
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

fn outputs(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("out/results.json"), dir.join("out/iops.svg"))
}

#[test]
fn quick_run_has_every_cell_consistent_figures_and_a_chart() {
    require_backend();
    let dir = scratch();
    let file = dir.path().join("bench.raw");
    let (json, svg) = outputs(dir.path());
    let out = run(
        &[
            "--quick",
            "--size",
            "64M",
            "--file",
            file.to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
            "--svg",
            svg.to_str().unwrap(),
        ],
        None,
    );
    let err = stderr(&out);
    assert!(out.status.success(), "blkbench failed: {err}");
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();

    // Host and settings.
    for key in ["kernel", "cpu_model", "date"] {
        assert!(
            !r["host"][key].as_str().unwrap_or("").is_empty(),
            "host.{key}"
        );
    }
    assert!(r["host"]["nproc"].as_u64().unwrap_or(0) >= 1);
    assert_eq!(r["settings"]["quick"], true);
    let repeat = r["settings"]["repeat"].as_u64().unwrap() as usize;

    // Which contenders must be there (qsd: the newest QEMU's when unpacked, else PATH's).
    let qsd = default_qsd();
    let have_qsd = qsd.is_some();
    let have_qemu_nbd = tests::nbd_server::which("qemu-nbd").is_some();
    let have_qemu_img = tests::nbd_server::which("qemu-img").is_some();
    let expected: Vec<&str> = contenders::ALL
        .iter()
        .filter(|c| have_qsd || c.server != contenders::Server::Qsd)
        .filter(|c| have_qemu_nbd || c.storage != contenders::Storage::Nbd)
        .filter(|c| have_qemu_img || !matches!(c.storage, contenders::Storage::Qcow2 { .. }))
        .map(|c| c.name)
        .collect();
    let skipped: Vec<&str> = r["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["contender"].as_str().unwrap())
        .collect();
    let want_skipped: Vec<&str> = contenders::ALL
        .iter()
        .map(|c| c.name)
        .filter(|n| !expected.contains(n))
        .collect();
    assert_eq!(skipped, want_skipped, "skipped");
    if !have_qemu_nbd {
        println!("qemu-nbd not installed: the nbd cells are absent");
        assert!(
            err.contains("apt-get install qemu-utils"),
            "no install hint: {err}"
        );
    }
    if !have_qsd {
        println!("qemu-storage-daemon not installed: the qsd cells are absent");
        assert!(err.contains("apt-get install"), "no install hint: {err}");
        assert!(
            err.contains("qemu10.sh"),
            "no hint at the QEMU 10.0 script: {err}"
        );
    }

    // The qsd that ran is the newest there is, and its version is recorded and shown.
    let settings = &r["settings"];
    if let Some(qsd) = &qsd {
        assert_eq!(settings["qsd"], qsd.to_str().unwrap());
        if newest_qsd().is_none() {
            assert!(err.contains("qemu10.sh"), "no word of the fallback: {err}");
        }
        let version = settings["qsd_version"].as_str().unwrap_or_default();
        assert!(
            version.starts_with("qemu-storage-daemon version "),
            "qsd_version: {settings}"
        );
        assert_eq!(
            settings["qsd_version_number"].as_str(),
            version_number(version),
            "{settings}"
        );
        assert!(
            table.contains(&format!("qsd-* rows: {version}")),
            "no qsd version in the table"
        );
    } else {
        assert!(settings["qsd_version"].is_null(), "{settings}");
    }
    assert_eq!(
        settings["patterns"],
        serde_json::json!(["batch", "resubmit"]),
        "--quick runs both patterns"
    );

    // Every contender ran every workload, each vhost-user one with both patterns (the
    // limit batching only): a cell with no error, the runs asked for, each of which moved
    // I/O (requests completed in a measured window) and so has non-zero figures; a server
    // contender's CPU time was measured; qsd's cells name its version.
    let columns: Vec<(&str, &str)> = expected
        .iter()
        .flat_map(|&c| {
            let patterns: Vec<&str> = match c {
                "limit" => vec!["batch"],
                _ => pattern::ALL.iter().map(|p| p.as_str()).collect(),
            };
            patterns.into_iter().map(move |p| (c, p))
        })
        .collect();
    let cells = r["cells"].as_array().unwrap();
    assert_eq!(cells.len(), workload::QUICK.len() * columns.len());
    for w in workload::QUICK {
        let label = workload::by_name(w).unwrap().workload.label();
        assert!(table.contains(&label));
        for &(c, p) in &columns {
            let cell = cells
                .iter()
                .find(|x| x["workload"] == w && x["contender"] == c && x["pattern"] == p)
                .unwrap_or_else(|| panic!("cell {w} {c} {p} missing"));
            assert!(
                table.lines().any(|l| l.contains(c) && l.contains(p)),
                "no {c} {p} row in the table"
            );
            assert_eq!(cell["errors"].as_array().unwrap().len(), 0, "{cell}");
            assert!(f(cell, "spread") >= 1.0, "{w} {c} {p}: spread in {cell}");
            if c.starts_with("qsd-") {
                assert_eq!(cell["server_version"], settings["qsd_version"]);
            } else {
                assert!(cell["server_version"].is_null(), "{cell}");
            }
            let runs = cell["runs"].as_array().unwrap();
            assert_eq!(runs.len(), repeat, "{w} {c} {p}");
            for run in runs.iter().chain([&cell["median"]]) {
                for key in ["iops", "mib_s", "p50_us", "p99_us"] {
                    assert!(f(run, key) > 0.0, "{w} {c}: {key} in {run}");
                }
                assert!(f(run, "p50_us") <= f(run, "p99_us"), "{w} {c}: {run}");
                match c {
                    "limit" => assert!(run["cpu_us_per_io"].is_null(), "{run}"),
                    _ => assert!(f(run, "cpu_us_per_io") >= 0.0, "{w} {c}: {run}"),
                }
            }
            for run in runs {
                assert!(run["ios"].as_u64().unwrap_or(0) > 0, "{w} {c}: {run}");
                assert!(f(run, "seconds") > 0.0, "{w} {c}: {run}");
                assert_eq!(run["pattern"], p, "{w} {c}: {run}");
            }
        }
    }

    // Each of our contenders has, with each pattern, its ratios against the peers that ran
    // (their arithmetic is report.rs's unit tests' business), all positive.
    let ratios = r["ratios"].as_array().unwrap();
    for (w, p) in workload::QUICK
        .iter()
        .flat_map(|w| pattern::ALL.iter().map(move |p| (w, p.as_str())))
    {
        for (ours, kinds) in [
            ("ours-io_uring", &["qsd", "limit"][..]),
            ("ours-native", &["qsd", "limit"][..]),
            ("ours-null", &["qsd"][..]),
            ("ours-nbd", &["qsd"][..]),
            ("ours-qcow2", &["qsd"][..]),
            ("ours-qcow2-fresh", &["qsd"][..]),
        ] {
            if (ours == "ours-nbd" && !have_qemu_nbd)
                || (ours.starts_with("ours-qcow2") && !have_qemu_img)
            {
                continue;
            }
            for &kind in kinds {
                let found = ratios.iter().find(|x| {
                    x["workload"] == *w
                        && x["pattern"] == p
                        && x["ours"] == ours
                        && x["kind"] == kind
                });
                if kind == "qsd" && !have_qsd {
                    assert!(found.is_none(), "{found:?}");
                    continue;
                }
                let found = found.unwrap_or_else(|| panic!("no {kind} ratio for {w} {ours} {p}"));
                assert!(f(found, "iops") > 0.0 && f(found, "p50") > 0.0, "{found}");
            }
        }
    }

    // The chart names every contender.
    let chart = std::fs::read_to_string(&svg).unwrap();
    assert!(chart.starts_with("<svg") || chart.starts_with("<?xml"));
    assert!(chart.trim_end().ends_with("</svg>"));
    for (c, p) in &columns {
        let name = if *c == "limit" {
            c.to_string()
        } else {
            format!("{c} {p}")
        };
        assert!(chart.contains(&name), "{name} not in the chart");
    }
}

#[test]
fn without_qsd_its_cells_are_skipped_saying_so() {
    require_backend();
    let dir = scratch();
    let empty = dir.path().join("empty-path");
    std::fs::create_dir(&empty).unwrap();
    let (json, svg) = outputs(dir.path());
    let out = run(
        &[
            "--qemu-bin",
            empty.to_str().unwrap(),
            "--patterns",
            "resubmit",
            "--contenders",
            "ours-null,qsd-null",
            "--workloads",
            "randread-4k-qd1",
            "--runtime",
            "0.2",
            "--warmup",
            "0",
            "--repeat",
            "1",
            "--size",
            "16M",
            "--file",
            dir.path().join("unused.raw").to_str().unwrap(),
            "--json",
            json.to_str().unwrap(),
            "--svg",
            svg.to_str().unwrap(),
        ],
        Some(&empty),
    );
    let err = stderr(&out);
    assert!(out.status.success(), "blkbench failed: {err}");
    let says = format!("no qemu-storage-daemon in {}", empty.display());
    assert!(err.contains(&says), "{err}");
    assert!(err.contains("qsd columns are skipped"), "{err}");
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(r["skipped"][0]["contender"], "qsd-null");
    assert_eq!(r["skipped"][0]["reason"], says.as_str());
    assert!(r["settings"]["qsd_version"].is_null());
    let cells = r["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 1);
    assert_eq!(cells[0]["contender"], "ours-null");
    assert_eq!(cells[0]["pattern"], "resubmit");
    assert!(f(&cells[0]["median"], "iops") > 0.0);
    assert_eq!(r["ratios"].as_array().unwrap().len(), 0);
    assert!(
        !dir.path().join("unused.raw").exists(),
        "no file contender, no image"
    );
}

#[test]
fn bad_arguments_exit_2_with_a_message() {
    for (args, says) in [
        (&["--workloads", "randread-3k"][..], "unknown workload"),
        (&["--contenders", "spdk"][..], "unknown contender"),
        (&["--runtime", "0"][..], "--runtime"),
        (&["--repeat", "0"][..], "--repeat"),
        (&["--size", "12Q"][..], "size"),
        (&["--qsd", "/nonexistent/qsd"][..], "no such file"),
        (&["--qemu-bin", "/nonexistent/bin"][..], "no such directory"),
        (&["--patterns", "fio"][..], "unknown pattern"),
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(says), "{args:?}: {}", stderr(&out));
    }
}
