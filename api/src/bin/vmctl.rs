//! `vmctl`: the command-line client of `vmmd`. Human tables by default, `--json` for the
//! service's JSON; a non-zero exit with the service's message on error.

// A crate root finds its modules beside it: the job commands live in vmctl/.
#[path = "vmctl/jobs.rs"]
mod jobs;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use api::backend::VmCounters;
use api::client::Client;
use api::tables;
use clap::{CommandFactory, Parser, Subcommand};
use devices::config::kv::{DISK_HINTS, Hints, IOTHREAD_HINTS, parse_kv_with};
use serde::Deserialize;
use serde_json::Value;

/// Manage the VMs of a vmmd service.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// The service's socket [default: $XDG_RUNTIME_DIR/vmmd.sock or /run/vmmd.sock].
    #[arg(long, global = true)]
    api_socket: Option<PathBuf>,
    /// The VM (optional when the service has exactly one).
    #[arg(long, global = true)]
    id: Option<String>,
    /// Print the service's JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create a VM from a JSON config file (`-` reads standard input).
    Create {
        /// The config file, or `-`.
        file: String,
    },
    /// Boot the VM.
    Boot,
    /// Show the VM's config and state.
    Info,
    /// List the VMs.
    List,
    /// Show the VM's disk and iothread counters.
    Counters,
    /// Add a disk: `key=value,...` (e.g. `id=d1,path=a.raw,iothread=io0`) or JSON.
    AddDisk {
        /// The disk.
        spec: String,
    },
    /// Remove a device (disk) by id.
    RemoveDevice {
        /// The device id.
        device: String,
    },
    /// Change a disk live: `id=d0,throttle.iops_total=500`, `id=d0,on_write_error=stop`
    /// or JSON.
    UpdateDisk {
        /// The update.
        spec: String,
    },
    /// Change an iothread live: `id=io0,poll_max_ns=0,cpu_affinity=1:2` or JSON; only the
    /// fields given change (`cpu_affinity=` unpins).
    UpdateIothread {
        /// The iothread settings.
        spec: String,
    },
    /// Pause the VM.
    Pause,
    /// Resume the VM.
    Resume,
    /// Shut the VM down.
    Shutdown,
    /// Reboot the VM.
    Reboot,
    /// Delete the VM.
    Delete,
    /// Check the service is up.
    Ping,
    /// Shut down every VM and the service.
    ShutdownVmm,
    /// Follow the service's events and print one line per event (of the VM named with
    /// --id, if given); --json prints the raw JSON lines.
    Events {
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Mirror DISK to TARGET while the VM runs and follow the job until it is ready.
    ///
    /// The progress is a line on standard error; once ready, the target is a copy of
    /// the disk kept up to date, and `--complete` switches the disk to it. Stopping
    /// vmctl leaves the job running (`vmctl jobs`, `vmctl job-cancel`).
    Mirror(jobs::MirrorArgs),
    /// List the VM's block jobs, running and finished, with their progress.
    Jobs,
    /// Complete a ready mirror: the disk switches to its target.
    JobComplete {
        /// The job id.
        job: String,
    },
    /// Cancel a job; the disk stays on its image.
    ///
    /// A ready mirror's target is first made a consistent copy of the disk (unless
    /// --force); an earlier one is left partial.
    JobCancel {
        /// The job id.
        job: String,
        /// Stop at once, also in ready.
        #[arg(long)]
        force: bool,
    },
    /// Change a running job's copy rate limit.
    JobSetSpeed {
        /// The job id.
        job: String,
        /// The new limit in bytes/s (0: unlimited).
        speed: u64,
    },
    /// Turn a libvirt domain XML into our VM config: prints the JSON (or, with
    /// `--create`, creates the VM); what it leaves out is listed on standard error.
    ImportLibvirt {
        /// The domain XML (`virsh dumpxml NAME > FILE`), or `-` for standard input.
        file: String,
        /// Anything left out is an error.
        #[arg(long)]
        strict: bool,
        /// Create the VM on the service instead of printing the JSON.
        #[arg(long)]
        create: bool,
    },
    /// Turn a QEMU command line into our VM config: prints the JSON (or, with
    /// `--create`, creates the VM); what it leaves out is listed on standard error.
    ///
    /// Give the command line after `--` (`vmctl import-qemu -- qemu-system-x86_64 -m 2G
    /// ...`), or with `--file`: NUL-separated as in `/proc/PID/cmdline` of a running
    /// QEMU, or shell words (quotes and `\` line continuations as a shell reads them).
    ImportQemu {
        /// Read the command line from this file (`-`: standard input).
        #[arg(long, conflicts_with = "args")]
        file: Option<String>,
        /// Anything left out is an error.
        #[arg(long)]
        strict: bool,
        /// Create the VM on the service instead of printing the JSON.
        #[arg(long)]
        create: bool,
        /// The QEMU command line, after `--`.
        #[arg(last = true, required_unless_present = "file")]
        args: Vec<String>,
    },
    /// Print shell completions.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// A failure to report: the message and its details.
struct Failure(String, Vec<String>);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(e.to_string(), Vec::new())
    }
}

/// The default socket: `$XDG_RUNTIME_DIR/vmmd.sock`, else `/run/vmmd.sock`.
fn default_socket() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join("vmmd.sock"),
        _ => PathBuf::from("/run/vmmd.sock"),
    }
}

/// A `key=value,...` or JSON argument as JSON bytes.
fn spec_json(spec: &str, hints: &Hints<'_>) -> Result<Vec<u8>, Failure> {
    let value = if spec.trim_start().starts_with('{') {
        serde_json::from_str::<Value>(spec).map_err(|e| format!("invalid JSON: {e}"))?
    } else {
        Value::Object(parse_kv_with(spec, hints)?)
    };
    Ok(serde_json::to_vec(&value)?)
}

/// The service's socket: `--api-socket`, else the default.
fn socket(cli: &Cli) -> PathBuf {
    cli.api_socket.clone().unwrap_or_else(default_socket)
}

/// Sends `method /api/v1/<path>` and returns the reply's JSON (`Null` when it has no
/// body); an error reply becomes a [`Failure`] with the service's message (and HTTP
/// status) and details.
fn call(socket: &Path, method: &str, path: &str, body: Option<Vec<u8>>) -> Result<Value, Failure> {
    let reply = Client::new(socket).request_blocking(method, &format!("/api/v1/{path}"), body)?;
    let v = reply.json();
    if !reply.ok() {
        let message = v["error"].as_str().map_or_else(
            || format!("HTTP {}: {}", reply.status, reply.text()),
            |m| format!("{m} (HTTP {})", reply.status),
        );
        let details = v["details"]
            .as_array()
            .into_iter()
            .flatten()
            .map(s)
            .collect();
        return Err(Failure(message, details));
    }
    Ok(v)
}

/// The `?id=` query selecting the VM of `--id` (empty without one).
fn query(id: &Option<String>) -> String {
    match id {
        // Ids are [A-Za-z0-9._-]; anything else is sent as is and refused by the service.
        Some(id) => format!(
            "?id={}",
            id.replace('%', "%25")
                .replace('&', "%26")
                .replace('#', "%23")
        ),
        None => String::new(),
    }
}

/// Prints `headers` and `rows` as aligned columns.
fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    print!("{}", tables::table(headers, &rows));
}

/// A JSON value as a table cell: strings without quotes, `null` as `-`.
fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}

/// Prints the reply `v` of `cmd` for people.
fn human(cmd: &Cmd, v: &Value) -> Result<(), Failure> {
    match cmd {
        Cmd::List => table(
            &["ID", "STATE", "VCPUS", "MEMORY_MIB", "DISKS", "PID"],
            v.as_array()
                .into_iter()
                .flatten()
                .map(|vm| {
                    let mut row: Vec<String> =
                        ["id", "state", "vcpus", "memory_mib", "disks", "pid"]
                            .iter()
                            .map(|k| s(&vm[k]))
                            .collect();
                    if let Some(c) = vm.get("crash") {
                        row[1] = format!("{} ({})", row[1], crash_text(c));
                    }
                    row
                })
                .collect(),
        ),
        Cmd::Info => {
            let c = &v["config"];
            println!(
                "VM {}: {}, {} vCPU(s), {} MiB, kernel {}",
                s(&c["id"]),
                s(&v["state"]),
                s(&c["cpus"]["boot_vcpus"]),
                s(&c["memory"]["size_mib"]),
                s(&c["payload"]["kernel"])
            );
            table(
                &[
                    "DISK", "PATH", "READONLY", "IOTHREAD", "QUEUES", "THROTTLE", "GROUP",
                ],
                c["disks"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|d| {
                        vec![
                            s(&d["id"]),
                            s(&d["path"]),
                            s(&d["readonly"]),
                            s(&d["iothread"]),
                            s(&d["num_queues"]),
                            s(&d["throttle"]),
                            s(&d["throttle_group"]),
                        ]
                    })
                    .collect(),
            );
            if let Some(pid) = v.get("pid") {
                println!("process: pid {pid}");
            }
            if let Some(c) = v.get("crash") {
                println!("crashed: {}", crash_text(c));
                for line in c["log"].as_array().into_iter().flatten() {
                    println!("  | {}", s(line));
                }
            }
            let pending: Vec<String> = v["pending_removals"]
                .as_array()
                .into_iter()
                .flatten()
                .map(s)
                .collect();
            if !pending.is_empty() {
                println!("waiting for the guest to eject: {}", pending.join(", "));
            }
        }
        Cmd::Counters => {
            let counters = VmCounters::deserialize(v)
                .map_err(|e| format!("unexpected vm.counters reply: {e}"))?;
            print!("{}", tables::counters(&counters));
        }
        Cmd::Jobs => jobs::print_table(v)?,
        Cmd::Ping => println!(
            "vmmd {} (backend {}, pid {})",
            s(&v["version"]),
            s(&v["backend"]),
            s(&v["pid"])
        ),
        _ => {
            if !v.is_null() {
                println!("{v}");
            }
        }
    }
    Ok(())
}

/// "killed by signal 9" / "exited with status 1" of a crash report.
fn crash_text(c: &Value) -> String {
    match (c.get("signal"), c.get("status")) {
        (Some(sig), _) => format!("killed by signal {sig}"),
        (None, Some(st)) => format!("exited with status {st}"),
        (None, None) => s(&c["reason"]),
    }
}

/// One event as a human line: time, VM, event, then its other fields as `key=value`
/// (a `log` as indented lines below).
fn event_line(v: &Value) -> String {
    let mut line = format!("{}  {}  {}", s(&v["time"]), s(&v["vm"]), s(&v["event"]));
    let mut log = String::new();
    for (k, val) in v.as_object().into_iter().flatten() {
        match k.as_str() {
            "time" | "vm" | "event" => {}
            "log" => {
                for l in val.as_array().into_iter().flatten() {
                    log += &format!("\n    | {}", s(l));
                }
            }
            _ => line += &format!("  {k}={}", s(val)),
        }
    }
    line + &log
}

/// `vmctl events`: follows the stream until it ends, `count` events were printed, or the
/// user stops it.
fn follow_events(socket: &std::path::Path, cli: &Cli, count: Option<u64>) -> Result<(), Failure> {
    use std::io::Write;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (status, mut lines) = Client::new(socket).stream("/api/v1/events").await?;
        if status != 200 {
            return Err(Failure(
                format!("GET events answered HTTP {status}"),
                Vec::new(),
            ));
        }
        let mut printed = 0;
        while count.is_none_or(|c| printed < c) {
            let Some(line) = lines.next_line().await? else {
                break;
            };
            let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            if cli.id.as_deref().is_some_and(|id| v["vm"] != id) {
                continue;
            }
            let mut out = std::io::stdout().lock();
            if cli.json {
                writeln!(out, "{line}")?;
            } else {
                writeln!(out, "{}", event_line(&v))?;
            }
            out.flush()?;
            printed += 1;
        }
        Ok(())
    })
}

/// The text of `file`, or of standard input for `-`.
fn read_input(file: &str) -> Result<String, Failure> {
    let mut text = String::new();
    if file == "-" {
        std::io::stdin().read_to_string(&mut text)?;
    } else {
        text = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
    }
    Ok(text)
}

/// A request to the service: method, path, body.
type Request = (&'static str, String, Option<Vec<u8>>);

/// What an import does next: with `create`, the `vm.create` request; else the JSON is
/// printed (and `None` returned). Its notes go to standard error; what it left out goes
/// there too, or fails the command with `strict`.
fn import_request(
    source: &str,
    imported: api::import::Imported,
    strict: bool,
    create: bool,
) -> Result<Option<Request>, Failure> {
    if strict && !imported.ignored.is_empty() {
        return Err(Failure(
            format!(
                "{source}: {} item(s) not supported (--strict)",
                imported.ignored.len()
            ),
            imported.ignored,
        ));
    }
    for n in &imported.notes {
        eprintln!("vmctl: note: {n}");
    }
    for i in &imported.ignored {
        eprintln!("vmctl: ignored: {i}");
    }
    let json = serde_json::to_vec_pretty(&imported.config)?;
    if !create {
        println!("{}", String::from_utf8_lossy(&json));
        return Ok(None);
    }
    Ok(Some(("PUT", "vm.create".into(), Some(json))))
}

/// A command line read from a file: NUL-separated words (`/proc/PID/cmdline`), or
/// shell words.
fn command_words(text: &str) -> Result<Vec<String>, String> {
    if text.contains('\0') {
        // Every word ends in a NUL; an empty word (`-append ''`) is kept.
        let text = text.strip_suffix('\0').unwrap_or(text);
        return Ok(text.split('\0').map(str::to_string).collect());
    }
    let text = text.replace("\r\n", "\n").replace("\\\n", "");
    shlex::split(&text).ok_or_else(|| "unbalanced quotes or a trailing backslash".to_string())
}

/// Runs the command of `cli`.
fn run(cli: Cli) -> Result<(), Failure> {
    let q = query(&cli.id);
    let (method, path, body): (&str, String, Option<Vec<u8>>) = match &cli.command {
        Cmd::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "vmctl", &mut std::io::stdout());
            return Ok(());
        }
        Cmd::ImportLibvirt {
            file,
            strict,
            create,
        } => {
            let xml = read_input(file)?;
            let imported =
                api::import::libvirt::import(&xml).map_err(|e| format!("{file}: {e}"))?;
            match import_request(file, imported, *strict, *create)? {
                Some(request) => request,
                None => return Ok(()),
            }
        }
        Cmd::ImportQemu {
            file,
            strict,
            create,
            args,
        } => {
            let (source, words) = match file {
                Some(file) => (
                    file.as_str(),
                    command_words(&read_input(file)?).map_err(|e| format!("{file}: {e}"))?,
                ),
                None => ("the command line", args.clone()),
            };
            let imported =
                api::import::qemu::import(&words).map_err(|e| format!("{source}: {e}"))?;
            match import_request(source, imported, *strict, *create)? {
                Some(request) => request,
                None => return Ok(()),
            }
        }
        Cmd::Create { file } => (
            "PUT",
            "vm.create".into(),
            Some(read_input(file)?.into_bytes()),
        ),
        Cmd::Boot => ("PUT", format!("vm.boot{q}"), None),
        Cmd::Info => ("GET", format!("vm.info{q}"), None),
        Cmd::List => ("GET", "vms".into(), None),
        Cmd::Counters => ("GET", format!("vm.counters{q}"), None),
        Cmd::AddDisk { spec } => (
            "PUT",
            format!("vm.add-disk{q}"),
            Some(spec_json(spec, &DISK_HINTS)?),
        ),
        Cmd::RemoveDevice { device } => (
            "PUT",
            format!("vm.remove-device{q}"),
            Some(serde_json::to_vec(&serde_json::json!({ "id": device }))?),
        ),
        Cmd::UpdateDisk { spec } => (
            "PUT",
            format!("vm.update-disk{q}"),
            Some(spec_json(spec, &DISK_HINTS)?),
        ),
        Cmd::UpdateIothread { spec } => (
            "PUT",
            format!("vm.update-iothread{q}"),
            Some(spec_json(spec, &IOTHREAD_HINTS)?),
        ),
        Cmd::Pause => ("PUT", format!("vm.pause{q}"), None),
        Cmd::Resume => ("PUT", format!("vm.resume{q}"), None),
        Cmd::Shutdown => ("PUT", format!("vm.shutdown{q}"), None),
        Cmd::Reboot => ("PUT", format!("vm.reboot{q}"), None),
        Cmd::Delete => ("PUT", format!("vm.delete{q}"), None),
        Cmd::Ping => ("GET", "vmm.ping".into(), None),
        Cmd::ShutdownVmm => ("PUT", "vmm.shutdown".into(), None),
        Cmd::Events { count } => return follow_events(&socket(&cli), &cli, *count),
        Cmd::Mirror(args) => return jobs::mirror(&cli, args),
        Cmd::Jobs => ("GET", format!("vm.jobs{q}"), None),
        Cmd::JobComplete { job } => return jobs::complete(&cli, job),
        Cmd::JobCancel { job, force } => (
            "PUT",
            format!("vm.job-cancel{q}"),
            Some(serde_json::to_vec(
                &serde_json::json!({ "job_id": job, "force": force }),
            )?),
        ),
        Cmd::JobSetSpeed { job, speed } => (
            "PUT",
            format!("vm.job-set-speed{q}"),
            Some(serde_json::to_vec(
                &serde_json::json!({ "job_id": job, "speed": speed }),
            )?),
        ),
    };
    let v = call(&socket(&cli), method, &path, body)?;
    if cli.json {
        if !v.is_null() {
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
    } else {
        human(&cli.command, &v)?;
    }
    Ok(())
}

/// Runs vmctl; on failure prints `vmctl: <message>` and each detail on standard error.
fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(message, details)) => {
            eprintln!("vmctl: {message}");
            for d in details {
                eprintln!("  - {d}");
            }
            ExitCode::FAILURE
        }
    }
}
