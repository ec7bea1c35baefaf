//! `vmctl`'s block job commands: `mirror` (start a mirror, follow it with a progress
//! line, complete it), `job-complete`, and the table of `jobs`.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use api::tables::{self, mib};
use block::jobs::{CopyMode, JobInfo, JobState, SyncMode};
use clap::{Args, ValueEnum};
use devices::mirror::TargetFormat;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Cli, Failure, call, query, socket};

/// How often a followed job is polled.
const POLL: Duration = Duration::from_millis(200);
/// How often a progress line is printed when standard error is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(1);
/// The widest progress bar drawn.
const MAX_BAR: usize = 30;
/// The narrowest progress bar drawn (a narrower terminal gets none).
const MIN_BAR: usize = 8;

/// `vmctl mirror`'s arguments.
#[derive(Args, Debug)]
pub(crate) struct MirrorArgs {
    /// The disk to mirror.
    disk: String,
    /// Where to: a file or block device (a relative path is taken from the current
    /// directory; a missing file is created with the disk's size), or an NBD URI.
    target: String,
    /// The job's id [default: mirror-DISK].
    #[arg(long)]
    job_id: Option<String>,
    /// The target's image format [default: raw].
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
    /// Copy rate limit in bytes/s [default: 0, unlimited].
    #[arg(long, value_name = "BPS")]
    speed: Option<u64>,
    /// What to copy [default: full].
    #[arg(long, value_enum)]
    sync: Option<SyncArg>,
    /// How guest writes reach the target [default: background].
    #[arg(long, value_enum)]
    copy_mode: Option<CopyModeArg>,
    /// Bytes per dirty bit, a power of two from 4 KiB to 64 MiB [default: 65536].
    #[arg(long, value_name = "BYTES")]
    granularity: Option<u64>,
    /// Once the job is ready, switch the disk to the target.
    #[arg(long, conflicts_with = "no_wait")]
    complete: bool,
    /// Print the job as it starts and return, without following it.
    #[arg(long)]
    no_wait: bool,
}

/// `--format`.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum FormatArg {
    /// The disk's bytes as they are.
    Raw,
    /// qcow2 (a missing target is made as a new qcow2 image of the disk's size).
    Qcow2,
}

impl From<FormatArg> for TargetFormat {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Raw => TargetFormat::Raw,
            FormatArg::Qcow2 => TargetFormat::Qcow2,
        }
    }
}

/// `--sync`.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum SyncArg {
    /// The whole disk, then what the guest writes.
    Full,
    /// Only the top image's allocated clusters.
    Top,
    /// Only what the guest writes from now on.
    None,
}

impl From<SyncArg> for SyncMode {
    fn from(s: SyncArg) -> Self {
        match s {
            SyncArg::Full => SyncMode::Full,
            SyncArg::Top => SyncMode::Top,
            SyncArg::None => SyncMode::None,
        }
    }
}

/// `--copy-mode`.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum CopyModeArg {
    /// Guest writes are marked dirty and copied later.
    Background,
    /// Guest writes reach the target before they complete (the job always converges).
    WriteBlocking,
}

impl From<CopyModeArg> for CopyMode {
    fn from(m: CopyModeArg) -> Self {
        match m {
            CopyModeArg::Background => CopyMode::Background,
            CopyModeArg::WriteBlocking => CopyMode::WriteBlocking,
        }
    }
}

/// The `vm.disk-mirror` body of `args`: only the settings given (the service has the
/// defaults), a relative local target made absolute.
fn mirror_body(args: &MirrorArgs) -> Result<Value, Failure> {
    let path = if args.target.contains("://") || args.target.starts_with('/') {
        args.target.clone()
    } else {
        let cwd = std::env::current_dir()
            .map_err(|e| format!("{}: the current directory: {e}", args.target))?;
        cwd.join(&args.target)
            .to_str()
            .ok_or_else(|| format!("{}: the current directory is not UTF-8", args.target))?
            .to_string()
    };
    let mut target = json!({ "path": path });
    if let Some(f) = args.format {
        target["format"] = serde_json::to_value(TargetFormat::from(f))?;
    }
    let mut body = json!({ "disk": args.disk, "target": target });
    if let Some(id) = &args.job_id {
        body["job_id"] = json!(id);
    }
    if let Some(s) = args.sync {
        body["sync"] = serde_json::to_value(SyncMode::from(s))?;
    }
    if let Some(m) = args.copy_mode {
        body["copy_mode"] = serde_json::to_value(CopyMode::from(m))?;
    }
    if let Some(speed) = args.speed {
        body["speed"] = json!(speed);
    }
    if let Some(g) = args.granularity {
        body["granularity"] = json!(g);
    }
    Ok(body)
}

/// `vmctl mirror`: starts the mirror and, unless `--no-wait`, follows it until it is
/// ready (failing when it fails or is cancelled), then completes it with `--complete`.
pub(crate) fn mirror(cli: &Cli, args: &MirrorArgs) -> Result<(), Failure> {
    let socket = socket(cli);
    let q = query(&cli.id);
    let body = serde_json::to_vec(&mirror_body(args)?)?;
    let reply = call(&socket, "PUT", &format!("vm.disk-mirror{q}"), Some(body))?;
    let mut job = JobInfo::deserialize(&reply)
        .map_err(|e| format!("unexpected vm.disk-mirror reply: {e}"))?;
    if args.no_wait {
        if cli.json {
            println!("{}", serde_json::to_string_pretty(&job)?);
        } else {
            println!(
                "job {} started: mirroring {} to {} ({}); follow it with `{} jobs`",
                job.id,
                job.disk,
                job.target,
                job.state.as_str(),
                again(cli)
            );
        }
        return Ok(());
    }
    {
        let mut progress = Progress::new(std::io::stderr().is_terminal());
        loop {
            progress.show(&job);
            match job.state {
                JobState::Created | JobState::Running => {}
                JobState::Ready | JobState::Completed => break,
                JobState::Cancelled | JobState::Failed => return Err(ended(&job)),
            }
            std::thread::sleep(POLL);
            job = find_job(&socket, &q, &job.id)?;
        }
    }
    if job.state == JobState::Ready && args.complete {
        complete(cli, &job.id)
    } else if cli.json {
        println!("{}", serde_json::to_string_pretty(&job)?);
        Ok(())
    } else {
        if job.state == JobState::Completed {
            println!("{}", completed_line(&job));
        } else {
            let cmd = again(cli);
            println!(
                "job {id} is ready: {disk} is mirrored to {target}, guest writes included\n\
                 `{cmd} job-complete {id}` switches {disk} to it; `{cmd} job-cancel {id}` \
                 stops the mirror",
                id = job.id,
                disk = job.disk,
                target = job.target,
            );
        }
        Ok(())
    }
}

/// `vmctl job-complete`: completes the job, then prints what became of the disk (the
/// job as listed with `--json`).
pub(crate) fn complete(cli: &Cli, id: &str) -> Result<(), Failure> {
    let socket = socket(cli);
    let q = query(&cli.id);
    let body = serde_json::to_vec(&json!({ "job_id": id }))?;
    call(&socket, "PUT", &format!("vm.job-complete{q}"), Some(body))?;
    // Completed: only the report depends on the listing.
    match find_job(&socket, &q, id) {
        Ok(job) if cli.json => println!("{}", serde_json::to_string_pretty(&job)?),
        Ok(job) => println!("{}", completed_line(&job)),
        Err(_) => println!("job {id} completed"),
    }
    Ok(())
}

/// `vmctl jobs`: the table of the `vm.jobs` reply `v`.
pub(crate) fn print_table(v: &Value) -> Result<(), Failure> {
    let jobs =
        Vec::<JobInfo>::deserialize(v).map_err(|e| format!("unexpected vm.jobs reply: {e}"))?;
    print!("{}", tables::jobs(&jobs));
    Ok(())
}

/// Job `id` as `vm.jobs` lists it now.
fn find_job(socket: &std::path::Path, q: &str, id: &str) -> Result<JobInfo, Failure> {
    let v = call(socket, "GET", &format!("vm.jobs{q}"), None)?;
    let jobs =
        Vec::<JobInfo>::deserialize(&v).map_err(|e| format!("unexpected vm.jobs reply: {e}"))?;
    jobs.into_iter()
        .find(|j| j.id == id)
        .ok_or_else(|| Failure(format!("job {id} is no longer listed"), Vec::new()))
}

/// The failure of a job that ended without becoming ready.
fn ended(job: &JobInfo) -> Failure {
    let mut message = format!("job {} {}", job.id, job.state.as_str());
    if let Some(e) = &job.error {
        message += &format!(": {e}");
    }
    message += &format!("; {} stays on its image", job.disk);
    Failure(message, Vec::new())
}

/// `disk0: now on /new.raw (job m0 completed, 1.0 MiB copied)`.
fn completed_line(job: &JobInfo) -> String {
    format!(
        "{}: now on {} (job {} completed, {} MiB copied)",
        job.disk,
        job.target,
        job.id,
        mib(job.bytes_done)
    )
}

/// The vmctl command line reaching the same VM (`vmctl --id vm1`), for hints.
fn again(cli: &Cli) -> String {
    let mut cmd = "vmctl".to_string();
    if let Some(s) = &cli.api_socket {
        cmd += &format!(" --api-socket {}", s.display());
    }
    if let Some(id) = &cli.id {
        cmd += &format!(" --id {id}");
    }
    cmd
}

/// A job's progress in figures, as the progress line shows it.
#[derive(Debug, PartialEq, Eq)]
struct Figures {
    /// Per mille done (`bytes_done / bytes_total`).
    permille: u64,
    /// `45.2%`.
    percent: String,
    /// `463.0/1024.0 MiB`.
    done: String,
    /// `98.1 MiB/s`.
    rate: String,
    /// `1:05`, `1:02:03`, `--` while nothing is being copied.
    eta: String,
    /// `1.2 MiB`.
    dirty: String,
}

impl Figures {
    /// The figures of `job`.
    fn of(job: &JobInfo) -> Figures {
        let permille = if job.bytes_total == 0 {
            if matches!(job.state, JobState::Ready | JobState::Completed) {
                1000
            } else {
                0
            }
        } else {
            let p = u128::from(job.bytes_done.min(job.bytes_total)) * 1000
                / u128::from(job.bytes_total);
            u64::try_from(p).unwrap_or(1000)
        };
        let left = job.bytes_total.saturating_sub(job.bytes_done);
        Figures {
            permille,
            percent: format!("{}.{}%", permille / 10, permille % 10),
            done: format!("{}/{} MiB", mib(job.bytes_done), mib(job.bytes_total)),
            rate: format!("{} MiB/s", mib(job.rate)),
            eta: eta(left, job.rate),
            dirty: format!("{} MiB", mib(job.dirty_bytes)),
        }
    }
}

/// The time `left` bytes take at `rate` bytes/s: `m:ss` or `h:mm:ss`; `0:00` with
/// nothing left, `--` at rate 0.
fn eta(left: u64, rate: u64) -> String {
    if left == 0 {
        return "0:00".into();
    }
    if rate == 0 {
        return "--".into();
    }
    let secs = left.div_ceil(rate);
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if h > 0 {
        format!("{h}:{m:02}:{s:02}")
    } else {
        format!("{m}:{s:02}")
    }
}

/// The progress line redrawn on a terminal `columns` wide:
/// `m0 [#####.....] 45.2%  463.0/1024.0 MiB  98.1 MiB/s  ETA 0:06  dirty 1.2 MiB`; the
/// bar shrinks (or goes) to fit, and what still does not fit is cut.
fn bar_line(job: &JobInfo, columns: usize) -> String {
    let f = Figures::of(job);
    let text = format!(
        "{}  {}  {}  ETA {}  dirty {}",
        f.percent, f.done, f.rate, f.eta, f.dirty
    );
    // The last column stays free: a line that fills it wraps on some terminals.
    let room = columns
        .saturating_sub(1)
        .saturating_sub(job.id.len() + text.len() + 4);
    let width = room.min(MAX_BAR);
    let line = if width >= MIN_BAR {
        let filled = u128::from(f.permille) * u128::try_from(width).unwrap_or(0) / 1000;
        let filled = usize::try_from(filled).unwrap_or(width).min(width);
        format!(
            "{} [{}{}] {text}",
            job.id,
            "#".repeat(filled),
            ".".repeat(width - filled)
        )
    } else {
        format!("{} {text}", job.id)
    };
    line.chars()
        .take(columns.saturating_sub(1).max(1))
        .collect()
}

/// The progress line printed (not redrawn) when standard error is not a terminal:
/// `mirror m0: running, 45.2%, 463.0/1024.0 MiB, 98.1 MiB/s, ETA 0:06, dirty 1.2 MiB`.
fn plain_line(job: &JobInfo) -> String {
    let f = Figures::of(job);
    format!(
        "{} {}: {}, {}, {}, {}, ETA {}, dirty {}",
        job.kind,
        job.id,
        job.state.as_str(),
        f.percent,
        f.done,
        f.rate,
        f.eta,
        f.dirty
    )
}

/// The width of the terminal on standard error, if it says.
fn columns() -> Option<usize> {
    let mut size = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into `size`, which outlives the call; the
    // descriptor is only queried.
    let rc = unsafe { libc::ioctl(libc::STDERR_FILENO, libc::TIOCGWINSZ, &mut size) };
    (rc == 0 && size.ws_col > 0).then_some(usize::from(size.ws_col))
}

/// The progress shown on standard error while a job is followed: one line redrawn in
/// place on a terminal, else a line at most once a second (and the last one). Dropping
/// it ends a redrawn line.
struct Progress {
    /// Whether standard error is a terminal.
    tty: bool,
    /// Whether a redrawn line is on the screen.
    drawn: bool,
    /// When the last plain line was printed.
    printed_at: Option<Instant>,
    /// The last plain line printed.
    last: String,
}

impl Progress {
    /// Progress drawn in place when `tty`.
    fn new(tty: bool) -> Progress {
        Progress {
            tty,
            drawn: false,
            printed_at: None,
            last: String::new(),
        }
    }

    /// Shows `job` as it is now.
    fn show(&mut self, job: &JobInfo) {
        let mut err = std::io::stderr().lock();
        // Progress is a courtesy: a standard error that cannot be written stops nothing.
        if self.tty {
            let line = bar_line(job, columns().unwrap_or(80));
            let _ = write!(err, "\r{line}\x1b[K");
            self.drawn = true;
        } else {
            let line = plain_line(job);
            let settled = !matches!(job.state, JobState::Created | JobState::Running);
            let due = self.printed_at.is_none_or(|at| at.elapsed() >= PLAIN_EVERY);
            if line != self.last && (due || settled) {
                let _ = writeln!(err, "{line}");
                self.printed_at = Some(Instant::now());
                self.last = line;
            }
        }
        let _ = err.flush();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if self.drawn {
            eprintln!();
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn job(state: JobState, done: u64, total: u64, rate: u64) -> JobInfo {
        JobInfo {
            id: "m0".into(),
            kind: "mirror".into(),
            disk: "disk0".into(),
            target: "/new.raw".into(),
            state,
            bytes_done: done,
            bytes_total: total,
            dirty_bytes: 3 << 19,
            rate,
            speed: 0,
            sync: SyncMode::Full,
            copy_mode: CopyMode::Background,
            error: None,
        }
    }

    #[test]
    fn figures_of_a_running_job() {
        let f = Figures::of(&job(JobState::Running, 463 << 20, 1024 << 20, 100 << 20));
        assert_eq!(
            f,
            Figures {
                permille: 452,
                percent: "45.2%".into(),
                done: "463.0/1024.0 MiB".into(),
                rate: "100.0 MiB/s".into(),
                eta: "0:06".into(),
                dirty: "1.5 MiB".into(),
            }
        );
        // Nothing copied lately: no estimate.
        assert_eq!(
            Figures::of(&job(JobState::Running, 0, 1 << 20, 0)).eta,
            "--"
        );
        // An empty disk is done once ready.
        assert_eq!(
            Figures::of(&job(JobState::Ready, 0, 0, 0)).percent,
            "100.0%"
        );
        assert_eq!(
            Figures::of(&job(JobState::Created, 0, 0, 0)).percent,
            "0.0%"
        );
    }

    #[test]
    fn eta_reads_as_a_clock() {
        assert_eq!(eta(0, 0), "0:00");
        assert_eq!(eta(1, 0), "--");
        assert_eq!(eta(1, 10), "0:01");
        assert_eq!(eta(650, 10), "1:05");
        assert_eq!(eta(3723, 1), "1:02:03");
    }

    #[test]
    fn the_bar_fits_the_terminal() {
        let j = job(JobState::Running, 1 << 29, 1 << 30, 1 << 20);
        let wide = bar_line(&j, 200);
        assert_eq!(
            wide,
            format!(
                "m0 [{}{}] 50.0%  512.0/1024.0 MiB  1.0 MiB/s  ETA 8:32  dirty 1.5 MiB",
                "#".repeat(15),
                ".".repeat(15)
            )
        );
        for columns in [100, 80, 60, 40, 1, 0] {
            let line = bar_line(&j, columns);
            assert!(line.len() < columns.max(2), "{columns}: {line:?}");
        }
        assert!(!bar_line(&j, 60).contains('['));
        assert!(bar_line(&j, 90).contains("[####"));
        let done = bar_line(&job(JobState::Ready, 1 << 30, 1 << 30, 0), 120);
        assert!(
            done.contains(&format!("[{}]", "#".repeat(MAX_BAR))),
            "{done}"
        );
    }

    #[test]
    fn plain_lines_name_the_state() {
        assert_eq!(
            plain_line(&job(JobState::Ready, 1 << 20, 1 << 20, 0)),
            "mirror m0: ready, 100.0%, 1.0/1.0 MiB, 0.0 MiB/s, ETA 0:00, dirty 1.5 MiB"
        );
    }

    #[test]
    fn the_body_holds_only_what_was_given() {
        let cli = Cli::try_parse_from([
            "vmctl",
            "mirror",
            "disk0",
            "/new.raw",
            "--copy-mode",
            "write-blocking",
            "--speed",
            "1048576",
            "--format",
            "raw",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let super::super::Cmd::Mirror(args) = &cli.command else {
            panic!("{cli:?}");
        };
        let body = mirror_body(args).unwrap_or_else(|e| panic!("{}", e.0));
        assert_eq!(
            body,
            json!({"disk": "disk0", "target": {"path": "/new.raw", "format": "raw"},
                   "copy_mode": "write-blocking", "speed": 1048576})
        );
        let cli = Cli::try_parse_from(["vmctl", "mirror", "d", "rel.raw", "--sync", "none"])
            .unwrap_or_else(|e| panic!("{e}"));
        let super::super::Cmd::Mirror(args) = &cli.command else {
            panic!("{cli:?}");
        };
        let body = mirror_body(args).unwrap_or_else(|e| panic!("{}", e.0));
        let cwd = std::env::current_dir().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(body["target"]["path"], json!(cwd.join("rel.raw")));
        assert_eq!(body["sync"], "none");
        let nbd = Cli::try_parse_from(["vmctl", "mirror", "d", "nbd://h/e", "--no-wait"])
            .unwrap_or_else(|e| panic!("{e}"));
        let super::super::Cmd::Mirror(args) = &nbd.command else {
            panic!("{nbd:?}");
        };
        let body = mirror_body(args).unwrap_or_else(|e| panic!("{}", e.0));
        assert_eq!(body["target"], json!({"path": "nbd://h/e"}));
        assert!(
            Cli::try_parse_from(["vmctl", "mirror", "d", "/t", "--complete", "--no-wait"]).is_err()
        );
    }
}
