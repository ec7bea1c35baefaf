//! The repository explains itself, and what it says holds: no link or path in README.md
//! or docs/ leads outside the repository, every relative link there names a file that
//! exists, and the README's service walk-through runs as written (against `vmmd --fake`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

mod support;

/// The repository's root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("api/ is in the repository")
        .to_path_buf()
}

/// README.md and every markdown file under docs/.
fn documents() -> Vec<PathBuf> {
    let mut docs = vec![root().join("README.md")];
    let mut dirs = vec![root().join("docs")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                docs.push(path);
            }
        }
    }
    docs
}

/// The targets of the markdown links `[text](target)` in `text`.
fn link_targets(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("](") {
        rest = &rest[i + 2..];
        if let Some(end) = rest.find(')') {
            out.push(rest[..end].trim().to_string());
        }
    }
    out
}

#[test]
fn no_link_or_path_in_the_docs_leads_outside_the_repository() {
    let docs = documents();
    assert!(
        docs.iter().any(|d| d.ends_with("docs/architecture.md")),
        "docs/architecture.md is missing"
    );
    let mut problems = Vec::new();
    for doc in &docs {
        let text = std::fs::read_to_string(doc).unwrap();
        let name = doc.strip_prefix(root()).unwrap().display().to_string();
        for (n, line) in text.lines().enumerate() {
            if line.contains("../") {
                problems.push(format!("{name}:{}: `../`: {line}", n + 1));
            }
        }
        for target in link_targets(&text) {
            if target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            let path = target.split('#').next().unwrap_or_default();
            if path.is_empty() {
                continue;
            }
            // `/x` is the repository's root (as GitHub reads it); else beside the file.
            let file = match path.strip_prefix('/') {
                Some(p) => root().join(p),
                None => doc.parent().unwrap().join(path),
            };
            if !file.exists() {
                problems.push(format!("{name}: link to {target}: no such file"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The fenced block of `lang` that comes first after `marker` in `text`.
fn block_after(text: &str, marker: &str, lang: &str) -> String {
    let at = text
        .find(marker)
        .unwrap_or_else(|| panic!("README lacks {marker:?}"));
    let fence = format!("```{lang}\n");
    let start = text[at..].find(&fence).expect("a fenced block") + at + fence.len();
    let end = text[start..].find("```").expect("the block's end") + start;
    text[start..end].to_string()
}

#[test]
fn the_readme_walk_through_runs_as_written() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let script = block_after(&readme, "runs these lines as written", "sh");
    let json = block_after(&readme, "## Running one VM from a JSON file", "json");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();

    // The files vm.json names, here.
    std::fs::write(d.join("vmlinuz"), b"a kernel").unwrap();
    std::fs::File::create(d.join("root.raw"))
        .and_then(|f| f.set_len(16 << 20))
        .unwrap();
    let json = json
        .replace("/path/to/kernel", &d.join("vmlinuz").display().to_string())
        .replace(
            "/var/lib/vm1/root.raw",
            &d.join("root.raw").display().to_string(),
        )
        .replace(
            "/tmp/vm1.serial",
            &d.join("vm1.serial").display().to_string(),
        );
    std::fs::write(d.join("vm.json"), json).unwrap();

    // `vmmd` on PATH runs fake VM processes; `vmctl` is ours.
    let bin = d.join("bin");
    std::fs::create_dir(&bin).unwrap();
    let pid_file = d.join("vmmd.pid");
    let vmmd = bin.join("vmmd");
    std::fs::write(
        &vmmd,
        format!(
            // Its output to a file: a vmmd left running must not hold the script's pipes.
            "#!/bin/sh\necho $$ > {pid}\nexec {real} --fake --state-dir {state} \"$@\" >> {log} 2>&1\n",
            pid = pid_file.display(),
            log = d.join("vmmd.log").display(),
            real = env!("CARGO_BIN_EXE_vmmd"),
            state = d.join("state").display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&vmmd, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_vmctl"), bin.join("vmctl")).unwrap();

    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut child = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &script])
        .current_dir(d)
        .env("PATH", path)
        .env("TMPDIR", d)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    if child.try_wait().unwrap().is_none() {
        child.kill().ok();
    }
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    // vmmd is gone once `vmctl shutdown-vmm` has run (else it is stopped here, with any
    // VM process it left).
    let pid: Option<u32> = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|p| p.trim().parse().ok());
    let mut vmmd_left = false;
    if let Some(pid) = pid {
        let gone = Instant::now() + Duration::from_secs(10);
        while support::process_alive(pid) && Instant::now() < gone {
            std::thread::sleep(Duration::from_millis(50));
        }
        vmmd_left = support::process_alive(pid);
        if vmmd_left {
            // SAFETY: plain kill(2) of a process this test started and saw alive.
            unsafe { libc::kill(pid.cast_signed(), libc::SIGKILL) };
        }
    }
    for vm in std::fs::read_dir(d.join("state"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let vm_pid = std::fs::read_to_string(vm.path().join("pid")).ok();
        let state = d.join("state").display().to_string();
        if let Some(p) = vm_pid.and_then(|p| p.trim().parse::<u32>().ok())
            && support::process_alive(p)
            && std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&state))
        {
            // SAFETY: as above, for a fake VM process of this test's vmmd.
            unsafe { libc::kill(p.cast_signed(), libc::SIGKILL) };
        }
    }
    let log = std::fs::read_to_string(d.join("vmmd.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "the walk-through failed:\n{stdout}\n{stderr}\nvmmd's log:\n{log}"
    );
    assert!(!vmmd_left, "vmmd still ran after `vmctl shutdown-vmm`");
    // What the lines printed: the counters as JSON and as a table, the metrics.
    assert!(stdout.contains("\"disk0\""), "{stdout}");
    assert!(
        stdout.contains("vmm_disk_"),
        "no Prometheus metrics: {stdout}"
    );
}

/// The unit file with its host paths moved under `dir`: binaries from this build,
/// the socket, state and image directories in `dir`.
fn unit_here(dir: &Path) -> String {
    let unit = std::fs::read_to_string(root().join("contrib/vmmd.service")).unwrap();
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for (name, real) in [
        ("vmmd", env!("CARGO_BIN_EXE_vmmd")),
        ("vmm", env!("CARGO_BIN_EXE_vmm")),
        ("vmctl", env!("CARGO_BIN_EXE_vmctl")),
    ] {
        std::os::unix::fs::symlink(real, bin.join(name)).unwrap();
    }
    std::fs::create_dir_all(dir.join("images")).unwrap();
    unit.replace("/usr/local/bin/", &format!("{}/", bin.display()))
        .replace(
            "/run/vmmd.sock",
            &dir.join("vmmd.sock").display().to_string(),
        )
        .replace("/run/vmmd", &dir.join("state").display().to_string())
        .replace("/var/lib/vmmd", &dir.join("images").display().to_string())
}

/// The value of `key=` in the unit's `[Service]` section, continuation lines joined.
fn unit_value(unit: &str, key: &str) -> String {
    let joined = unit.replace("\\\n", " ");
    let prefix = format!("{key}=");
    joined
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("the unit has no {key}="))
        .to_string()
}

#[test]
fn the_systemd_unit_verifies_and_its_command_starts_vmmd() {
    let test = "the_systemd_unit_verifies_and_its_command_starts_vmmd";
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let unit = unit_here(d);
    let file = d.join("vmmd.service");
    std::fs::write(&file, &unit).unwrap();

    match Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&file)
        .output()
    {
        Ok(o) => {
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            // A failure that names no unit is systemd's own (no manager in a container).
            if o.status.success() || said.contains("vmmd.service") {
                assert!(o.status.success(), "systemd-analyze verify:\n{said}");
            } else {
                println!("PARTIAL {test}: systemd-analyze verify could not run here: {said}");
            }
        }
        Err(e) => println!("PARTIAL {test}: systemd-analyze verify not run: {e}"),
    }

    // What systemd would run: ExecStart= with the unit's environment, then
    // ExecStartPost= (which returns once vmmd answers).
    let start = unit_value(&unit, "ExecStart");
    let words: Vec<&str> = start.split_whitespace().collect();
    std::fs::create_dir_all(d.join("state")).unwrap();
    let mut vmmd = Command::new(words[0]);
    vmmd.args(&words[1..]);
    for pair in unit_value(&unit, "Environment").split_whitespace() {
        if let Some((k, v)) = pair.split_once('=') {
            vmmd.env(k, v);
        }
    }
    let mut vmmd = vmmd.stderr(std::process::Stdio::null()).spawn().unwrap();
    let post = unit_value(&unit, "ExecStartPost");
    let (sh, script) = post
        .split_once(" -c ")
        .expect("ExecStartPost=/bin/sh -c '...'");
    let mut started = Command::new(sh)
        .arg("-c")
        .arg(script.trim().trim_matches('\''))
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while started.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let in_time = started.try_wait().unwrap().is_some();
    if !in_time {
        started.kill().ok();
    }
    let ready = started.wait().unwrap().success() && in_time;
    let sock = d.join("vmmd.sock");
    let vmctl = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_vmctl"))
            .arg("--api-socket")
            .arg(&sock)
            .args(args)
            .output()
            .unwrap()
    };
    let ping = vmctl(&["ping"]);
    let down = vmctl(&["shutdown-vmm"]);
    let gone = Instant::now() + Duration::from_secs(10);
    while vmmd.try_wait().unwrap().is_none() && Instant::now() < gone {
        std::thread::sleep(Duration::from_millis(50));
    }
    let exited = vmmd.try_wait().unwrap();
    if exited.is_none() {
        vmmd.kill().ok();
    }
    assert!(ready, "ExecStartPost did not see vmmd answer");
    assert!(ping.status.success(), "{ping:?}");
    assert!(down.status.success(), "{down:?}");
    assert!(exited.is_some(), "vmmd did not exit after shutdown-vmm");
}
