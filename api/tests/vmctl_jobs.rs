//! `vmctl`'s block job commands (`mirror`, `jobs`, `job-complete`, `job-cancel`,
//! `job-set-speed`) against `vmmd --fake`, where a mirror is ready as soon as it starts.

use std::process::Output;

use serde_json::{Value, json};

mod support;

use support::Service;

/// `vmmd --fake` with VM `a` (one 1 MiB disk, `disk0`) created and booted.
fn start() -> Service {
    let s = Service::start(&["--fake"]);
    std::fs::write(s.path("kernel"), b"kernel").unwrap_or_else(|e| panic!("{e}"));
    let config = json!({
        "id": "a",
        "payload": {"kernel": s.path("kernel")},
        "disks": [{"id": "disk0", "path": s.image("old.raw", 1)}]
    });
    s.ok("PUT", "vm.create", Some(&config));
    s.ok("PUT", "vm.boot?id=a", None);
    s
}

/// Standard output and standard error of `o`.
fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Runs `vmctl args`, which must succeed; returns its standard output and error.
#[track_caller]
fn ok(s: &Service, args: &[&str]) -> (String, String) {
    let o = s.vmctl(args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "vmctl {args:?}: {out}{err}");
    (out, err)
}

/// Runs `vmctl args`, which must fail with exit status `code` and say every needle on
/// standard error; returns standard error.
#[track_caller]
fn fails(s: &Service, args: &[&str], code: i32, needles: &[&str]) -> String {
    let o = s.vmctl(args);
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(code), "vmctl {args:?}: {out}{err}");
    assert!(out.is_empty(), "vmctl {args:?} printed {out:?}");
    for n in needles {
        assert!(err.contains(n), "vmctl {args:?}: {err:?} lacks {n:?}");
    }
    err
}

/// The `vmctl jobs` row of job `id`, split at blanks.
#[track_caller]
fn row(s: &Service, id: &str) -> Vec<String> {
    let (table, _) = ok(s, &["jobs"]);
    let mut lines = table.lines();
    let head: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        head,
        [
            "ID",
            "TYPE",
            "DISK",
            "STATE",
            "DONE/TOTAL",
            "DIRTY",
            "RATE",
            "SPEED",
            "TARGET",
            "ERROR"
        ],
        "{table}"
    );
    lines
        .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .find(|r| r.first().is_some_and(|c| c == id))
        .unwrap_or_else(|| panic!("no job {id}:\n{table}"))
}

/// The VM's disk `disk0` path, from `vmctl --json info`.
fn disk_path(s: &Service) -> Value {
    let (info, _) = ok(s, &["--json", "info"]);
    let info: Value = serde_json::from_str(&info).unwrap_or_else(|e| panic!("{e}: {info}"));
    info["config"]["disks"][0]["path"].clone()
}

#[test]
fn mirror_complete_switches_the_disk_and_jobs_lists_it() {
    let s = start();
    let new = s.path("new.raw");
    let new_s = new.to_str().unwrap_or_else(|| panic!("{}", new.display()));
    let (out, err) = ok(
        &s,
        &[
            "--id",
            "a",
            "mirror",
            "disk0",
            new_s,
            "--job-id",
            "m0",
            "--copy-mode",
            "write-blocking",
            "--speed",
            "0",
            "--granularity",
            "65536",
            "--format",
            "raw",
            "--complete",
        ],
    );
    assert_eq!(
        out,
        format!("disk0: now on {new_s} (job m0 completed, 1.0 MiB copied)\n")
    );
    // Standard error is a pipe here: plain lines, no redrawing.
    assert!(!err.contains('\r'), "{err:?}");
    assert!(
        err.contains("mirror m0: ready, 100.0%, 1.0/1.0 MiB"),
        "{err:?}"
    );
    assert_eq!(disk_path(&s), json!(new_s));
    assert_eq!(
        row(&s, "m0"),
        [
            "m0",
            "mirror",
            "disk0",
            "completed",
            "1.0/1.0",
            "MiB",
            "0.0",
            "MiB",
            "-",
            "unlimited",
            new_s,
            "-"
        ]
    );
    let (json_out, _) = ok(&s, &["--json", "jobs"]);
    let jobs: Value = serde_json::from_str(&json_out).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(jobs[0]["id"], "m0");
    assert_eq!(jobs[0]["state"], "completed");
    assert_eq!(jobs[0]["copy_mode"], "write-blocking");
    // A finished job cannot be cancelled: the service's message and status.
    fails(
        &s,
        &["job-cancel", "m0"],
        1,
        &["vmctl: job m0 is completed: it cannot become cancelled (HTTP 409)"],
    );
    fails(
        &s,
        &["job-set-speed", "nope", "1048576"],
        1,
        &["vmctl: no job nope (HTTP 404)"],
    );
    fails(
        &s,
        &["job-complete", "nope"],
        1,
        &["no job nope (HTTP 404)"],
    );
}

#[test]
fn mirror_stops_at_ready_then_job_commands_drive_it() {
    let s = start();
    let t1 = s.path("t1.raw");
    let t1_s = t1.to_str().unwrap_or_else(|| panic!("{}", t1.display()));
    // Without --complete: ready, with the commands that finish it.
    let (out, _) = ok(&s, &["mirror", "disk0", t1_s]);
    assert!(
        out.starts_with(&format!(
            "job mirror-disk0 is ready: disk0 is mirrored to {t1_s}"
        )),
        "{out}"
    );
    let hint = format!(
        "`vmctl --api-socket {} job-complete mirror-disk0`",
        s.socket.display()
    );
    assert!(out.contains(&hint), "{out}");
    assert_eq!(row(&s, "mirror-disk0")[3], "ready");
    // One job per disk at a time: the service's 409.
    fails(
        &s,
        &["mirror", "disk0", "/elsewhere.raw", "--job-id", "m9"],
        1,
        &["has a running job already (mirror-disk0)", "(HTTP 409)"],
    );
    ok(&s, &["job-set-speed", "mirror-disk0", "5242880"]);
    assert_eq!(row(&s, "mirror-disk0")[10..12], ["5.0", "MiB/s"]);
    let (out, _) = ok(&s, &["--id", "a", "job-complete", "mirror-disk0"]);
    assert_eq!(
        out,
        format!("disk0: now on {t1_s} (job mirror-disk0 completed, 1.0 MiB copied)\n")
    );
    assert_eq!(disk_path(&s), json!(t1_s));
    // --no-wait returns as the job starts; cancel it.
    let (out, err) = ok(
        &s,
        &[
            "mirror",
            "disk0",
            &s.path("t2.raw").display().to_string(),
            "--job-id",
            "m2",
            "--no-wait",
        ],
    );
    assert!(
        out.starts_with("job m2 started: mirroring disk0 to "),
        "{out}"
    );
    assert!(err.is_empty(), "{err}");
    ok(&s, &["job-cancel", "m2", "--force"]);
    assert_eq!(row(&s, "m2")[3], "cancelled");
    assert_eq!(disk_path(&s), json!(t1_s));
    // --json --no-wait prints the job the service answered.
    let (out, _) = ok(
        &s,
        &[
            "--json",
            "mirror",
            "disk0",
            &s.path("t3.raw").display().to_string(),
            "--job-id",
            "m3",
            "--no-wait",
            "--sync",
            "full",
        ],
    );
    let job: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(job["id"], "m3");
    assert_eq!(job["state"], "ready");
    ok(&s, &["job-cancel", "m3"]);
}

#[test]
fn bad_mirrors_are_refused() {
    let s = start();
    // clap refuses what no mode is, before any request (exit status 2).
    let err = fails(
        &s,
        &["mirror", "disk0", "/t.raw", "--copy-mode", "sideways"],
        2,
        &["invalid value 'sideways'", "background", "write-blocking"],
    );
    assert!(!err.contains("vmctl: "), "{err}");
    fails(
        &s,
        &["mirror", "disk0", "/t.raw", "--complete", "--no-wait"],
        2,
        &["cannot be used with"],
    );
    fails(&s, &["job-set-speed", "m0", "fast"], 2, &["invalid value"]);
    // The service's message and details.
    let old = s.path("old.raw");
    fails(
        &s,
        &["mirror", "disk0", &old.display().to_string()],
        1,
        &["(HTTP 409)", "is the image of disk disk0"],
    );
    fails(
        &s,
        &["mirror", "disk0", "nbd://h/e", "--format", "qcow2"],
        1,
        &[
            "invalid mirror (HTTP 400)",
            "  - target.format: an NBD target is raw",
        ],
    );
    fails(
        &s,
        &["mirror", "nodisk", "/t.raw"],
        1,
        &["VM a has no disk", "nodisk", "(HTTP 404)"],
    );
    fails(&s, &["--id", "nope", "jobs"], 1, &["(HTTP 404)"]);
    let (table, _) = ok(&s, &["jobs"]);
    assert_eq!(table.lines().count(), 1, "{table}");
}
