//! `ProcessBackend`: vmmd's [`VmmBackend`], one `vmm` process per VM (docs/architecture.md).
//!
//! - `vm.create` starts `vmm --api-socket <state_dir>/<id>/api.sock --exit-on-shutdown`
//!   in a session of its own (vmmd's death does not take it), then passes the config to
//!   it. Every VM-scoped call is routed to that socket and its answer passed on as it is.
//! - A VM process ends when its VM shuts down (by the API, or its guest powers off):
//!   the VM is then `Shutdown`, its threads and files released; `vm.boot` starts a new
//!   process. A process that ends any other way (killed, crashed) makes the VM `Crashed`
//!   with the signal or exit status and the last lines of its log, learnt at once through
//!   a pidfd, and a `crashed` event.
//! - `<state_dir>/<id>/` holds `config.json`, `pid`, `api.sock`, `vmm.log`, and what
//!   the process left (`last.json`) or how it crashed (`crash.json`). A vmmd started on
//!   the same state directory re-attaches to every VM process still alive (its pid
//!   file's process, whose command line names the VM's API socket) and lists the dead
//!   ones as `Shutdown` or `Crashed`.
//! - Events of every VM process are relayed to vmmd's own stream.
//! - Changes to a VM without a process (shut down, crashed) change its config only;
//!   an added image is opened once here to check it.

mod forward;
mod jobs;
mod process;

pub use process::write_json;

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use block::jobs::JobInfo;
use block::sync::lock;
use devices::config::{DiskConfig, IoThreadUpdate};
use devices::mirror::MirrorConfig;
use tokio::runtime::Handle;
use vmm::config::{VmConfig, same_file};

use crate::backend::{
    ApiError, CrashReport, JobCancel, JobRef, JobSpeed, PingResponse, UpdateDisk, VmCounters,
    VmInfo, VmState, VmSummary, VmmBackend, merged_iothread,
};
use crate::client::Reply;
use crate::events::{Event, EventBus, EventKind};
use crate::vm_process::{LastState, StartFailure};
use forward::Unanswered;
use process::{Exit, VmDir, VmProcess};

/// How long a routed call may take (a drain on a slow disk included).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long listing and `/metrics` wait for one VM process.
const VIEW_TIMEOUT: Duration = Duration::from_millis(250);
/// How long a new VM process has to build (and boot) its VM and open its socket.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a VM process asked to end has before it is killed.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// How vmmd runs VM processes.
#[derive(Clone, Debug)]
pub struct Supervision {
    /// The state directory (created 0700).
    pub state_dir: PathBuf,
    /// The `vmm` binary.
    pub vmm_binary: PathBuf,
    /// Run fake VM processes (`vmm --fake`, a test double that runs no guest).
    pub fake: bool,
    /// Pass `--forbid-symlinks` to every VM process.
    pub forbid_symlinks: bool,
    /// Every VM process's `--seccomp`.
    pub seccomp: crate::sandbox::SeccompMode,
}

/// A live VM process as vmmd tracks it.
#[derive(Clone, Debug)]
struct Live {
    pid: u32,
    pidfd: Arc<OwnedFd>,
    /// Which start of the VM this is (a boot after shutdown starts another).
    generation: u64,
}

struct Status {
    config: VmConfig,
    live: Option<Live>,
    /// The state while no process runs (`Created` only while being created); with a
    /// process, the last state it reported.
    state: VmState,
    crash: Option<CrashReport>,
    counters: VmCounters,
    generation: u64,
    /// `vm.create` has answered (until then, listing leaves the VM out).
    ready: bool,
    removed: bool,
    /// Counts the changes vmmd made to `config`: a report read from the process before
    /// one of them is not adopted.
    changes: u64,
    /// The generation being started: if it ends before its start has answered, its end
    /// is the failed start's (no crash report, nothing adopted).
    starting: Option<u64>,
    /// Mirror targets vmmd let a disk's process use, by disk id: the one path change of
    /// a disk a process may report by itself (its pivot).
    pivots: BTreeMap<String, (PathBuf, block::ImageFormat)>,
}

/// One VM of the service.
struct Managed {
    id: String,
    dir: VmDir,
    /// Kept-alive connections to its process's socket.
    conn: crate::client::Pool,
    /// Held by every call that changes the VM, one at a time.
    op: Mutex<()>,
    status: Mutex<Status>,
    /// Signalled when the process ends.
    ended: Condvar,
}

impl Managed {
    fn status(&self) -> MutexGuard<'_, Status> {
        lock(&self.status)
    }

    fn live(&self) -> Option<Live> {
        self.status().live.clone()
    }

    /// Waits until process `generation` has ended, at most `timeout`; whether it has.
    fn wait_ended(&self, generation: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.status();
        while st.live.as_ref().is_some_and(|l| l.generation == generation) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = match self.ended.wait_timeout(st, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        true
    }

    fn save_config(&self, config: &VmConfig) {
        if let Err(e) = write_json(&self.dir.config(), config) {
            tracing::warn!(id = %self.id, error = %e, "cannot save the VM's config");
        }
    }

    fn not_running(&self, action: &str) -> ApiError {
        let st = self.status();
        let mut msg = format!("cannot {action} VM {}: it is {}", self.id, st.state);
        if let Some(c) = &st.crash {
            msg += &format!(" (its process {c})");
        }
        ApiError::conflict(msg)
    }
}

struct Shared {
    opts: Supervision,
    vms: Mutex<BTreeMap<String, Arc<Managed>>>,
    events: EventBus,
    rt: Handle,
    stopping: AtomicBool,
}

/// vmmd's backend. See the module documentation.
pub struct ProcessBackend {
    shared: Arc<Shared>,
}

fn no_vm(id: &str) -> ApiError {
    ApiError::not_found(format!("no VM with id {id:?}"))
}

impl ProcessBackend {
    /// A backend running VM processes as `opts` says, sending events to `events`; `rt`
    /// runs the event relays. VM processes left by an earlier vmmd on the same state
    /// directory are re-attached (or listed as ended).
    pub fn new(opts: Supervision, events: EventBus, rt: Handle) -> Result<Self, String> {
        create_state_dir(&opts.state_dir)?;
        let backend = ProcessBackend {
            shared: Arc::new(Shared {
                opts,
                vms: Mutex::new(BTreeMap::new()),
                events,
                rt,
                stopping: AtomicBool::new(false),
            }),
        };
        backend.reattach();
        Ok(backend)
    }

    fn get(&self, id: &str) -> Result<Arc<Managed>, ApiError> {
        lock(&self.shared.vms)
            .get(id)
            .cloned()
            .ok_or_else(|| no_vm(id))
    }

    /// Runs `f` on VM `id` with its operation lock held (404 once deleted).
    fn with_op<T>(
        &self,
        id: &str,
        f: impl FnOnce(&Arc<Managed>) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let m = self.get(id)?;
        let _op = lock(&m.op);
        if m.status().removed {
            return Err(no_vm(id));
        }
        f(&m)
    }

    /// Routes `method path` to VM `m`'s process.
    fn forward(
        &self,
        m: &Managed,
        live: &Live,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Reply, ApiError> {
        match forward::call(&self.shared.rt, &m.conn, method, path, body, CALL_TIMEOUT) {
            Ok(r) if r.ok() => Ok(r),
            Ok(r) => Err(forward::answered_error(&r)),
            Err(Unanswered::Timeout) => Err(ApiError::unavailable(format!(
                "VM {}: its process (pid {}) did not answer within {} s",
                m.id,
                live.pid,
                CALL_TIMEOUT.as_secs()
            ))),
            Err(Unanswered::Unreachable(e)) => {
                // It may be ending: give its watcher a moment to say how.
                if m.wait_ended(live.generation, Duration::from_secs(1)) {
                    Err(m.not_running("reach"))
                } else {
                    Err(ApiError::unavailable(format!(
                        "VM {}: its process (pid {}) does not answer: {e}",
                        m.id, live.pid
                    )))
                }
            }
        }
    }

    /// The VM's info from its process (`None`: it did not answer within `timeout`).
    fn live_info(&self, m: &Managed, live: &Live, timeout: Duration) -> Option<VmInfo> {
        let changes = m.status().changes;
        let r = forward::call(
            &self.shared.rt,
            &m.conn,
            "GET",
            "/api/v1/vm.info",
            None,
            timeout,
        )
        .ok()
        .filter(Reply::ok)?;
        let mut info: VmInfo = serde_json::from_slice(&r.body).ok()?;
        info.pid = Some(live.pid);
        let mut st = m.status();
        if st
            .live
            .as_ref()
            .is_some_and(|l| l.generation == live.generation)
        {
            st.state = info.state;
            // A report older than a change vmmd made since is not taken.
            let pivots = st.pivots.clone();
            if st.changes == changes && adopt_ejects(&mut st.config, &info.config, &pivots) {
                m.save_config(&st.config);
            }
            // What vmmd answers is its own config: a process cannot widen it.
            info.config = st.config.clone();
        }
        Some(info)
    }

    /// What is known of VM `m` without asking its process.
    fn cached_info(m: &Managed) -> VmInfo {
        let st = m.status();
        VmInfo {
            config: st.config.clone(),
            state: st.state,
            pending_removals: Vec::new(),
            pid: st.live.as_ref().map(|l| l.pid),
            crash: st.crash.clone(),
            pause_reason: None,
            io_status: Default::default(),
        }
    }

    /// Info for listing: from the process if it answers quickly, else as last known.
    fn view(&self, m: &Managed) -> Option<VmInfo> {
        if !m.status().ready {
            return None;
        }
        let live = m.live();
        Some(
            live.and_then(|l| self.live_info(m, &l, VIEW_TIMEOUT))
                .unwrap_or_else(|| Self::cached_info(m)),
        )
    }

    /// Starts a process for VM `m` from `config`, creates the VM in it, and boots it
    /// when `boot`. On failure the process is ended and the error returned.
    fn start(&self, m: &Arc<Managed>, config: &VmConfig, boot: bool) -> Result<(), ApiError> {
        let sh = &self.shared;
        // A process of this VM that vmmd did not attach (an earlier vmmd's, alive) keeps
        // its socket and its images: a second one is not started beside it.
        if m.live().is_none()
            && let Some(other) = self.find_alive(m, false)
        {
            return Err(ApiError::conflict(format!(
                "VM {}: its process {} from an earlier vmmd still runs; stop it first",
                m.id, other.pid
            )));
        }
        // What the VM was, for a start that fails: it stays that.
        let before = {
            let st = m.status();
            (st.state, st.crash.clone())
        };
        m.dir
            .create()
            .map_err(|e| ApiError::internal(format!("{}: {e}", m.dir.path.display())))?;
        for stale in [m.dir.last_state(), m.dir.socket(), m.dir.start_error()] {
            let _ = std::fs::remove_file(stale);
        }
        m.save_config(config);
        m.conn.clear();
        // The VM is created (and booted) at the process's start, from its config file:
        // the process knows every file it will need before it confines itself.
        let mut args = vec![
            "--api-socket".to_string(),
            m.dir.socket().display().to_string(),
            "--fd-socket".to_string(),
            m.dir.fd_socket().display().to_string(),
            "--config".to_string(),
            m.dir.config().display().to_string(),
            "--start-error".to_string(),
            m.dir.start_error().display().to_string(),
            "--exit-on-shutdown".to_string(),
            "--last-state".to_string(),
            m.dir.last_state().display().to_string(),
        ];
        if !boot {
            args.push("--no-boot".into());
        }
        if sh.opts.fake {
            args.push("--fake".into());
        }
        if sh.opts.forbid_symlinks {
            args.push("--forbid-symlinks".into());
        }
        args.push(format!("--seccomp={}", sh.opts.seccomp.as_str()));
        let p = VmProcess::spawn(&sh.opts.vmm_binary, &args, &m.dir.log())?;
        let live = {
            let mut st = m.status();
            st.generation += 1;
            let live = Live {
                pid: p.pid,
                pidfd: p.pidfd.clone(),
                generation: st.generation,
            };
            st.live = Some(live.clone());
            st.starting = Some(st.generation);
            st.crash = None;
            st.state = VmState::Created;
            live
        };
        if let Err(e) = std::fs::write(m.dir.pid(), format!("{}\n", p.pid)) {
            tracing::warn!(id = %m.id, error = %e, "cannot write the pid file");
        }
        self.watch(m.clone(), &live, true);
        let started = self.wait_answering(m, &live).and_then(|()| {
            forward::relay_events(&sh.rt, m.dir.socket(), sh.events.clone())
                .map_err(|e| ApiError::internal(format!("VM {}: {e}", m.id)))
        });
        if let Err(e) = started {
            self.end_process(m, &live);
            let mut st = m.status();
            st.state = before.0;
            st.crash = before.1;
            st.starting = None;
            drop(st);
            let _ = std::fs::remove_file(m.dir.last_state());
            // What it left is not a shutdown of the VM: the VM stays as it was.
            return Err(e);
        }
        // An earlier crash's report is history now.
        let _ = std::fs::remove_file(m.dir.crash());
        m.status().starting = None;
        tracing::info!(id = %m.id, pid = live.pid, "VM process started");
        Ok(())
    }

    /// Waits until the new process answers on its socket as itself.
    fn wait_answering(&self, m: &Managed, live: &Live) -> Result<(), ApiError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(r) = forward::call(
                &self.shared.rt,
                &m.conn,
                "GET",
                "/api/v1/vmm.ping",
                None,
                Duration::from_secs(1),
            ) && serde_json::from_slice::<PingResponse>(&r.body).is_ok_and(|p| p.pid == live.pid)
            {
                return Ok(());
            }
            if m.wait_ended(live.generation, Duration::from_millis(20)) {
                // The VM was refused: the process said why.
                if let Some(f) = VmDir::read_json::<StartFailure>(&m.dir.start_error()) {
                    return Err(forward::answered_error(&Reply {
                        status: f.status,
                        body: serde_json::to_vec(&f.body).unwrap_or_default(),
                    }));
                }
                let st = m.status();
                let how = st
                    .crash
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default();
                return Err(ApiError::internal(format!(
                    "VM {}: its process ended at start ({how})",
                    m.id
                ))
                .with_details(m.dir.log_tail()));
            }
            if Instant::now() >= deadline {
                return Err(ApiError::internal(format!(
                    "VM {}: its process did not answer within {} s",
                    m.id,
                    START_TIMEOUT.as_secs()
                ))
                .with_details(m.dir.log_tail()));
            }
        }
    }

    /// Asks process `live` to shut its VM down and end (`vmm.shutdown`), kills it if it
    /// has not ended in time, and waits for it.
    fn end_process(&self, m: &Managed, live: &Live) {
        let _ = forward::call(
            &self.shared.rt,
            &m.conn,
            "PUT",
            "/api/v1/vmm.shutdown",
            None,
            EXIT_TIMEOUT,
        );
        if !m.wait_ended(live.generation, EXIT_TIMEOUT) {
            tracing::warn!(id = %m.id, pid = live.pid, "VM process did not end: killing it");
            process::signal(&live.pidfd, libc::SIGKILL);
            m.wait_ended(live.generation, EXIT_TIMEOUT);
        }
    }

    /// Starts a thread that learns of the end of process `live` of VM `m` at once.
    fn watch(&self, m: Arc<Managed>, live: &Live, child: bool) {
        let events = self.shared.events.clone();
        let live = live.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("watch-{}", m.id))
            .spawn(move || {
                let exit = VmProcess::wait(&live.pidfd, child);
                on_exit(&m, &live, exit, &events);
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start a VM process watcher");
        }
    }

    /// Finds the VMs of an earlier vmmd in the state directory.
    fn reattach(&self) {
        let dir = &self.shared.opts.state_dir;
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let Some(id) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let vm_dir = VmDir::new(dir, &id);
            let Some(config) = VmDir::read_json::<VmConfig>(&vm_dir.config()) else {
                continue;
            };
            if config.id != id {
                tracing::warn!(dir = %vm_dir.path.display(), "config of another VM: skipped");
                continue;
            }
            let m = Arc::new(Managed {
                id: id.clone(),
                conn: crate::client::Pool::new(vm_dir.socket()),
                dir: vm_dir,
                op: Mutex::new(()),
                status: Mutex::new(Status {
                    config,
                    live: None,
                    state: VmState::Shutdown,
                    crash: None,
                    counters: VmCounters::default(),
                    generation: 0,
                    ready: true,
                    removed: false,
                    changes: 0,
                    pivots: BTreeMap::new(),
                    starting: None,
                }),
                ended: Condvar::new(),
            });
            match self.find_alive(&m, true) {
                Some(live) => {
                    {
                        let mut st = m.status();
                        st.live = Some(live.clone());
                        st.generation = live.generation;
                        // Until it answers (listing asks it again).
                        st.state = VmState::Running;
                    }
                    self.watch(m.clone(), &live, false);
                    if let Err(e) = forward::relay_events(
                        &self.shared.rt,
                        m.dir.socket(),
                        self.shared.events.clone(),
                    ) {
                        tracing::warn!(%id, error = %e, "no events from this VM");
                    }
                    let state = self.live_info(&m, &live, VIEW_TIMEOUT).map(|i| i.state);
                    tracing::info!(%id, pid = live.pid, ?state, "re-attached to a VM process");
                }
                None => {
                    settle_ended(&m, Exit::Unknown, None);
                    let st = m.status();
                    tracing::info!(%id, state = %st.state, "VM process gone");
                }
            }
            lock(&self.shared.vms).insert(id, m);
        }
    }

    /// The live process of VM `m` named by its pid file (written by vmmd), if that
    /// process is the VM's `vmm`: its command line says `--api-socket` with the VM's
    /// socket (a path only this VM's process is given). With `to_attach`, it must also
    /// run as vmmd's user and not be one of the clients that take the same option
    /// (`vmctl`, `vmmd`); a check that cannot be made counts against it. Without, any
    /// such process counts, as the guards that keep a second process from starting
    /// want. Where the binary lives does not matter, so a `vmm` installed elsewhere by
    /// an upgrade keeps its VMs. A process that is busy and does not answer now is still
    /// its VM's.
    fn find_alive(&self, m: &Managed, to_attach: bool) -> Option<Live> {
        let pid: u32 = std::fs::read_to_string(m.dir.pid())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let pidfd = process::pidfd_open(pid)?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let socket = m.dir.socket();
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let names_socket = args.windows(2).any(|pair| {
            pair[0] == b"--api-socket" && pair[1] == socket.as_os_str().as_encoded_bytes()
        });
        let trusted = || {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
            let exe_name = exe.file_name()?.to_string_lossy().into_owned();
            let client = ["vmctl", "vmmd"]
                .iter()
                .any(|c| exe_name == *c || exe_name == format!("{c} (deleted)"));
            let owner = std::fs::metadata(format!("/proc/{pid}")).ok()?;
            // SAFETY: geteuid has no preconditions.
            let same_user =
                std::os::unix::fs::MetadataExt::uid(&owner) == unsafe { libc::geteuid() };
            Some(!client && same_user)
        };
        let ours = names_socket && (!to_attach || trusted() == Some(true));
        // Checked after the pidfd was opened: the pidfd names this very process.
        (ours && process::alive(&pidfd)).then(|| Live {
            pid,
            pidfd: Arc::new(pidfd),
            generation: 1,
        })
    }

    /// `PUT /api/v1/<endpoint>` on VM `id`'s process; a VM without a process cannot
    /// `what` (409).
    fn action(&self, id: &str, endpoint: &str, what: &str) -> Result<(), ApiError> {
        let path = format!("/api/v1/{endpoint}");
        self.route(
            id,
            |m, l| self.forward(m, l, "PUT", &path, None).map(|_| ()),
            |m| Err(m.not_running(what)),
        )
    }

    /// VM `id` routed: `f` with its live process, or `offline` without one.
    fn route<T>(
        &self,
        id: &str,
        online: impl FnOnce(&Arc<Managed>, &Live) -> Result<T, ApiError>,
        offline: impl FnOnce(&Arc<Managed>) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        self.with_op(id, |m| dispatch(m, online, offline))
    }

    /// Routes a call that changes the VM; once the process has taken it, `apply` makes
    /// the same change to vmmd's config (the one it keeps and trusts), then what the
    /// process did by itself (ejects) is read back.
    fn change(
        &self,
        m: &Managed,
        live: &Live,
        path: &str,
        body: Vec<u8>,
        apply: impl FnOnce(&mut VmConfig) -> Result<(), ApiError>,
    ) -> Result<(), ApiError> {
        self.forward(m, live, "PUT", path, Some(body))?;
        {
            let mut st = m.status();
            let mut config = st.config.clone();
            match apply(&mut config) {
                Ok(()) => {
                    st.config = config;
                    st.changes += 1;
                    m.save_config(&st.config);
                }
                Err(e) => {
                    tracing::warn!(id = %m.id, error = %e, "the VM process took a change vmmd cannot apply to its config")
                }
            }
        }
        self.live_info(m, live, CALL_TIMEOUT);
        Ok(())
    }

    /// Opens the image of `disk` (a VM process may open only the files named at its
    /// start) and hands the descriptor to VM `m`'s process. A null disk has none.
    fn hand_over_image(&self, m: &Managed, disk: &DiskConfig) -> Result<(), ApiError> {
        // A null disk has no file; an NBD disk's process connects to its server itself.
        if disk.host_path().is_none() || self.shared.opts.fake {
            return Ok(());
        }
        let flags = if disk.readonly {
            libc::O_RDONLY
        } else {
            libc::O_RDWR
        };
        let how = block::host_file::OpenFlags { flags, mode: 0 };
        // Only what the VM process would open itself: a regular file or a block device
        // (opening anything else may have side effects: a watchdog, a tty).
        let invalid = |msg: String| ApiError::bad_request("invalid disk").with_details(vec![msg]);
        match std::fs::metadata(&disk.path) {
            Ok(md)
                if md.is_file()
                    || std::os::unix::fs::FileTypeExt::is_block_device(&md.file_type()) => {}
            Ok(md) => {
                return Err(invalid(format!(
                    "VM {}: disk {}: {} is a {}, not a regular file or a block device",
                    m.id,
                    disk.id,
                    disk.path.display(),
                    block::host_file::kind(&md.file_type())
                )));
            }
            Err(_) => {}
        }
        let file = block::host_file::open(&disk.path, how).map_err(|e| {
            if let Some(limit) = e
                .raw_os_error()
                .and_then(|n| crate::kvm_backend::host_limit("cannot open the image", n))
            {
                return limit;
            }
            let msg = format!(
                "VM {}: disk {}: cannot open disk {}: {e}",
                m.id,
                disk.id,
                disk.path.display()
            );
            if block::host_file::is_symlink_refusal(&e) {
                ApiError::forbidden(msg)
            } else {
                ApiError::bad_request("invalid disk").with_details(vec![msg])
            }
        })?;
        let send = |path: &Path, file: &std::fs::File| {
            crate::handover::send(&m.dir.fd_socket(), path, file).map_err(|e| {
                ApiError::internal(format!(
                    "VM {}: cannot hand the image of disk {} over: {e}",
                    m.id, disk.id
                ))
            })
        };
        send(&disk.path, &file)?;
        // A qcow2 image's backing chain, read-only. (A chain that cannot be read fails
        // the disk's open in the process, with its reason.)
        if disk.format == block::ImageFormat::Qcow2 {
            let read = block::host_file::OpenFlags {
                flags: libc::O_RDONLY,
                mode: 0,
            };
            for path in block::qcow2::header::backing_files(&disk.path).unwrap_or_default() {
                if let Ok(file) = block::host_file::open(&path, read) {
                    send(&path, &file)?;
                }
            }
        }
        Ok(())
    }

    /// Shuts VM `m`'s process down (if any) and forgets the VM.
    fn remove(&self, m: &Managed) {
        if let Some(live) = m.live() {
            self.end_process(m, &live);
        }
        m.status().removed = true;
        // The directory first: a create of the same id may follow at once.
        m.dir.remove();
        let mut vms = lock(&self.shared.vms);
        if vms.get(&m.id).is_some_and(|x| std::ptr::eq(x.as_ref(), m)) {
            vms.remove(&m.id);
        }
    }
}

/// Runs `online` with VM `m`'s live process, or `offline` without one. A process that
/// ended during `online` (its VM shut down, or it crashed) leaves the VM offline: its
/// failure is not the answer, `offline` is (counters and info as last known, a boot
/// starting a new process, changes made to the config, a refusal saying the VM's state).
fn dispatch<T>(
    m: &Arc<Managed>,
    online: impl FnOnce(&Arc<Managed>, &Live) -> Result<T, ApiError>,
    offline: impl FnOnce(&Arc<Managed>) -> Result<T, ApiError>,
) -> Result<T, ApiError> {
    match m.live() {
        Some(live) => match online(m, &live) {
            Err(_) if m.live().is_none() => offline(m),
            answer => answer,
        },
        None => offline(m),
    }
}

/// Creates the state directory with mode 0700.
fn create_state_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("state directory {}: {e}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| format!("state directory {}: {e}", dir.display()))
}

/// Process `live` of VM `m` has ended (`exit`): the VM is `Shutdown` if the process left
/// its last state, else `Crashed` (and a `crashed` event goes out).
fn on_exit(m: &Managed, live: &Live, exit: Exit, events: &EventBus) {
    {
        let st = m.status();
        if st
            .live
            .as_ref()
            .is_none_or(|l| l.generation != live.generation)
        {
            return;
        }
    }
    let failed_start = {
        let mut st = m.status();
        if st.starting == Some(live.generation) {
            // Its start failed: `start` answers that and restores the VM.
            st.live = None;
            true
        } else {
            false
        }
    };
    if !failed_start && let Some(event) = settle_ended(m, exit, Some(live.pid)) {
        events.emit(event);
    }
    // Its sockets (it cannot remove them itself: it may write only under out/).
    for s in [m.dir.socket(), m.dir.fd_socket()] {
        let _ = std::fs::remove_file(s);
    }
    m.ended.notify_all();
}

/// Takes from a config a VM process `reported` only what a process may change by
/// itself: disks its guest ejected (gone from the report), and a disk's move to the
/// mirror target vmmd let it use (`pivots`, by disk id). Everything else of vmmd's
/// `config` stays: a process cannot add a file or a setting. Returns whether it changed.
fn adopt_ejects(
    config: &mut VmConfig,
    reported: &VmConfig,
    pivots: &BTreeMap<String, (PathBuf, block::ImageFormat)>,
) -> bool {
    let before = config.clone();
    config
        .disks
        .retain(|d| reported.disks.iter().any(|r| r.id == d.id));
    for d in &mut config.disks {
        let Some(r) = reported.disks.iter().find(|r| r.id == d.id) else {
            continue;
        };
        // The format is vmmd's (the target's, as the mirror named it), never the
        // process's word.
        if let Some((path, format)) = pivots.get(&d.id)
            && r.path != d.path
            && *path == r.path
        {
            d.path.clone_from(&r.path);
            d.format = *format;
        }
    }
    *config != before
}

/// Records how VM `m`'s process ended, from what it left in its directory; returns the
/// `crashed` event when it crashed (and was seen to, `pid` given).
fn settle_ended(m: &Managed, exit: Exit, pid: Option<u32>) -> Option<Event> {
    let last = VmDir::read_json::<LastState>(&m.dir.last_state());
    let mut st = m.status();
    st.live = None;
    if let Some(last) = last {
        st.state = VmState::Shutdown;
        st.crash = None;
        if let Some(c) = &last.config {
            let pivots = std::mem::take(&mut st.pivots);
            adopt_ejects(&mut st.config, c, &pivots);
        }
        st.counters = last.counters;
        m.save_config(&st.config);
        tracing::info!(id = %m.id, ?pid, "VM process ended after its VM shut down");
        return None;
    }
    if pid.is_none()
        && let Some(c) = VmDir::read_json::<CrashReport>(&m.dir.crash())
    {
        st.state = VmState::Crashed;
        st.crash = Some(c);
        return None;
    }
    let reason = match (exit, pid) {
        (Exit::Unknown, None) => "the VM process ended while no vmmd watched it".to_string(),
        (Exit::Unknown, Some(_)) => {
            "the VM process was started by an earlier vmmd: its exit status is unknown".into()
        }
        (Exit::Signal(libc::SIGSYS), _) => "a syscall outside its seccomp filter (the kernel's \
            audit log, dmesg, names it; docs/sandbox.md lists what each thread may call)"
            .into(),
        (Exit::Signal(libc::SIGABRT), _) => {
            "aborted: a panic or a failed check (see its log)".into()
        }
        _ => String::new(),
    };
    let report = exit.report(reason, m.dir.log_tail());
    if let Err(e) = write_json(&m.dir.crash(), &report) {
        tracing::warn!(id = %m.id, error = %e, "cannot save the crash report");
    }
    tracing::warn!(id = %m.id, ?pid, crash = %report, "VM process crashed");
    st.state = VmState::Crashed;
    st.crash = Some(report.clone());
    let mut event = Event::now(&m.id, EventKind::Crashed);
    if let Some(s) = report.signal {
        event = event.with("signal", s);
    }
    if let Some(s) = report.status {
        event = event.with("status", s);
    }
    if !report.reason.is_empty() {
        event = event.with("reason", report.reason.clone());
    }
    pid.map(|p| event.with("pid", p).with("log", report.log))
}

/// One file a VM uses: the path, what it is ("image X of disk d"), who holds it
/// ("VM a (disk d, writable)"), and whether others may use it too (a read-only image).
struct FileUse<'a> {
    path: &'a Path,
    what: String,
    holder: String,
    shared: bool,
}

/// The files `disks` and `serial` of VM `vm` use.
fn file_uses<'a>(
    vm: &str,
    disks: impl IntoIterator<Item = &'a DiskConfig>,
    serial: Option<&'a Path>,
) -> Vec<FileUse<'a>> {
    let mut uses: Vec<FileUse<'a>> = disks
        .into_iter()
        .filter(|d| d.host_path().is_some())
        .map(|d| FileUse {
            path: &d.path,
            what: format!("image {} of disk {}", d.path.display(), d.id),
            holder: format!(
                "VM {vm} (disk {}, {})",
                d.id,
                if d.readonly { "read-only" } else { "writable" }
            ),
            shared: d.readonly,
        })
        .collect();
    uses.extend(serial.map(|p| FileUse {
        path: p,
        what: format!("serial.path {}", p.display()),
        holder: format!("the serial output of VM {vm}"),
        shared: false,
    }));
    uses
}

/// A 409 if a file of `disks` or `serial` (of VM `id`) is one another VM of `others`
/// uses, unless both only read it. The VM processes' locks are what guard the files;
/// this names the VM that holds one, as one service can.
fn clash<'a>(
    id: &str,
    disks: impl IntoIterator<Item = &'a DiskConfig>,
    serial: Option<&'a Path>,
    others: &[VmConfig],
) -> Option<ApiError> {
    let mine = file_uses(id, disks, serial);
    others.iter().find_map(|o| {
        let theirs = file_uses(&o.id, &o.disks, o.serial.host_path());
        mine.iter().find_map(|m| {
            theirs
                .iter()
                .find(|t| {
                    !(m.shared && t.shared) && (m.path == t.path || same_file(m.path, t.path))
                })
                .map(|t| {
                    ApiError::conflict(format!("VM {id}: {} is in use by {}", m.what, t.holder))
                })
        })
    })
}

impl ProcessBackend {
    /// The configs of every VM but `except`.
    fn other_configs(&self, except: &str) -> Vec<VmConfig> {
        let vms: Vec<Arc<Managed>> = lock(&self.shared.vms).values().cloned().collect();
        vms.iter()
            .filter(|m| m.id != except)
            .map(|m| m.status().config.clone())
            .collect()
    }
}

impl VmmBackend for ProcessBackend {
    fn name(&self) -> &'static str {
        if self.shared.opts.fake { "fake" } else { "kvm" }
    }

    fn create(&self, config: VmConfig) -> Result<(), ApiError> {
        if self.shared.stopping.load(Ordering::SeqCst) {
            return Err(ApiError::unavailable("the service is shutting down"));
        }
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(ApiError::bad_request("invalid VM config").with_details(problems));
        }
        let id = config.id.clone();
        let m = Arc::new(Managed {
            id: id.clone(),
            conn: crate::client::Pool::new(VmDir::new(&self.shared.opts.state_dir, &id).socket()),
            dir: VmDir::new(&self.shared.opts.state_dir, &id),
            op: Mutex::new(()),
            status: Mutex::new(Status {
                config: config.clone(),
                live: None,
                state: VmState::Created,
                crash: None,
                counters: VmCounters::default(),
                generation: 0,
                ready: false,
                removed: false,
                changes: 0,
                pivots: BTreeMap::new(),
                starting: None,
            }),
            ended: Condvar::new(),
        });
        // The files of the other VMs are looked at outside the map's lock (a hung mount
        // must not stop the service); the id is taken under it.
        if let Some(e) = clash(
            &id,
            &config.disks,
            config.serial.host_path(),
            &self.other_configs(&id),
        ) {
            return Err(e);
        }
        let _op = lock(&m.op);
        {
            let mut vms = lock(&self.shared.vms);
            if self.shared.stopping.load(Ordering::SeqCst) {
                return Err(ApiError::unavailable("the service is shutting down"));
            }
            if vms.contains_key(&id) {
                return Err(ApiError::conflict(format!(
                    "a VM with id {id:?} already exists"
                )));
            }
            vms.insert(id.clone(), m.clone());
        }
        // A directory left by a VM this vmmd does not know (it could not read its config):
        // removed, unless a process of it still runs there.
        if let Some(other) = self.find_alive(&m, false) {
            m.status().removed = true;
            lock(&self.shared.vms).remove(&id);
            return Err(ApiError::conflict(format!(
                "VM {id}: a process of an earlier VM of that id (pid {}) still runs; stop it first",
                other.pid
            )));
        }
        m.dir.remove();
        match self.start(&m, &config, false) {
            Ok(()) => {
                m.status().ready = true;
                self.shared.events.emit(Event::now(&id, EventKind::Created));
                Ok(())
            }
            Err(e) => {
                m.status().removed = true;
                // The directory first: a create of the same id may follow at once.
                m.dir.remove();
                lock(&self.shared.vms).remove(&id);
                Err(e)
            }
        }
    }

    fn boot(&self, id: &str) -> Result<(), ApiError> {
        let others = self.other_configs(id);
        self.route(
            id,
            |m, live| {
                // A VM that just shut down (its guest powered off): its process is ending;
                // once it has, the boot starts a new one (the offline path).
                if self.live_info(m, live, VIEW_TIMEOUT).map(|i| i.state) == Some(VmState::Shutdown)
                {
                    m.wait_ended(live.generation, EXIT_TIMEOUT);
                    return Err(ApiError::unavailable(format!(
                        "VM {id}: its process (pid {}) neither answers nor ends",
                        live.pid
                    )));
                }
                self.forward(m, live, "PUT", "/api/v1/vm.boot", None)
                    .map(|_| ())
            },
            |m| {
                let config = m.status().config.clone();
                if let Some(e) = clash(id, &config.disks, config.serial.host_path(), &others) {
                    return Err(e);
                }
                self.start(m, &config, true)
            },
        )
    }

    fn pause(&self, id: &str) -> Result<(), ApiError> {
        self.action(id, "vm.pause", "pause")
    }

    fn resume(&self, id: &str) -> Result<(), ApiError> {
        self.action(id, "vm.resume", "resume")
    }

    fn shutdown(&self, id: &str) -> Result<(), ApiError> {
        self.route(
            id,
            |m, l| {
                self.forward(m, l, "PUT", "/api/v1/vm.shutdown", None)?;
                // The process ends with its VM; answer once it has.
                if !m.wait_ended(l.generation, EXIT_TIMEOUT) {
                    tracing::warn!(id = %m.id, pid = l.pid, "VM shut down but its process goes on");
                }
                Ok(())
            },
            |m| Err(m.not_running("shut down")),
        )
    }

    fn reboot(&self, id: &str) -> Result<(), ApiError> {
        self.action(id, "vm.reboot", "reboot")
    }

    fn delete(&self, id: &str) -> Result<(), ApiError> {
        self.with_op(id, |m| {
            self.remove(m);
            self.shared.events.emit(Event::now(id, EventKind::Deleted));
            Ok(())
        })
    }

    fn info(&self, id: &str) -> Result<VmInfo, ApiError> {
        let m = self.get(id)?;
        if !m.status().ready {
            // Being created: wait for the answer.
            drop(lock(&m.op));
        }
        if m.status().removed {
            return Err(no_vm(id));
        }
        dispatch(
            &m,
            |m, live| {
                self.live_info(m, live, CALL_TIMEOUT).ok_or_else(|| {
                    // It may be ending (its VM shut down): give its watcher a moment.
                    m.wait_ended(live.generation, Duration::from_secs(1));
                    ApiError::unavailable(format!(
                        "VM {id}: its process (pid {}) does not answer",
                        live.pid
                    ))
                })
            },
            |m| Ok(Self::cached_info(m)),
        )
    }

    fn list(&self) -> Vec<VmSummary> {
        let vms: Vec<Arc<Managed>> = lock(&self.shared.vms).values().cloned().collect();
        vms.iter()
            .filter_map(|m| self.view(m))
            .map(|i| VmSummary {
                id: i.config.id.clone(),
                state: i.state,
                vcpus: i.config.cpus.boot_vcpus,
                memory_mib: i.config.memory.size_mib,
                disks: i.config.disks.len(),
                pid: i.pid,
                crash: i.crash,
            })
            .collect()
    }

    fn counters(&self, id: &str) -> Result<VmCounters, ApiError> {
        let m = self.get(id)?;
        dispatch(
            &m,
            |m, live| {
                let r = self.forward(m, live, "GET", "/api/v1/vm.counters", None)?;
                serde_json::from_slice(&r.body)
                    .map_err(|e| ApiError::internal(format!("VM {id}: unreadable counters: {e}")))
            },
            |m| Ok(m.status().counters.clone()),
        )
    }

    fn all_counters(&self) -> Vec<(String, VmState, VmCounters)> {
        let vms: Vec<Arc<Managed>> = lock(&self.shared.vms).values().cloned().collect();
        vms.iter()
            .filter_map(|m| {
                let info = self.view(m)?;
                let counters = match m.live() {
                    Some(_) => forward::call(
                        &self.shared.rt,
                        &m.conn,
                        "GET",
                        "/api/v1/vm.counters",
                        None,
                        VIEW_TIMEOUT,
                    )
                    .ok()
                    .filter(Reply::ok)
                    .and_then(|r| serde_json::from_slice(&r.body).ok())?,
                    None => m.status().counters.clone(),
                };
                Some((m.id.clone(), info.state, counters))
            })
            .collect()
    }

    fn add_disk(&self, id: &str, disk: DiskConfig) -> Result<(), ApiError> {
        let others = self.other_configs(id);
        self.route(
            id,
            |m, l| {
                if let Some(e) = clash(id, [&disk], None, &others) {
                    return Err(e);
                }
                if m.status().config.disks.iter().any(|d| d.id == disk.id) {
                    return Err(ApiError::conflict(format!(
                        "VM {id} already has a disk with id {:?}",
                        disk.id
                    )));
                }
                self.hand_over_image(m, &disk)?;
                let body =
                    serde_json::to_vec(&disk).map_err(|e| ApiError::internal(e.to_string()))?;
                self.change(m, l, "/api/v1/vm.add-disk", body, |c| {
                    // The process took it: a disk of that id it had let go is gone.
                    c.disks.retain(|d| d.id != disk.id);
                    c.disks.push(disk.clone());
                    Ok(())
                })
            },
            |m| {
                let config = m.status().config.clone();
                if config.disks.iter().any(|d| d.id == disk.id) {
                    return Err(ApiError::conflict(format!(
                        "VM {id} already has a disk with id {:?}",
                        disk.id
                    )));
                }
                if let Some(e) = clash(id, [&disk], None, &others) {
                    return Err(e);
                }
                let config = config
                    .with_disk(disk.clone())
                    .map_err(|e| ApiError::bad_request("invalid disk").with_details(e.details()))?;
                if !self.shared.opts.fake {
                    vmm::vm::device_manager::probe_disk(&disk)
                        .map_err(|e| crate::kvm_backend::vm_error(id, e))?;
                } else if let Some(path) = disk.host_path()
                    && let Err(e) = std::fs::metadata(path)
                {
                    return Err(ApiError::bad_request("invalid disk")
                        .with_details(vec![format!("{}: {e}", disk.path.display())]));
                }
                m.save_config(&config);
                m.status().config = config;
                self.shared
                    .events
                    .emit(Event::now(id, EventKind::DiskAdded).with("disk", disk.id.clone()));
                Ok(())
            },
        )
    }

    fn remove_device(&self, id: &str, device_id: &str) -> Result<(), ApiError> {
        self.route(
            id,
            |m, l| {
                let body = serde_json::to_vec(&crate::backend::RemoveDevice {
                    id: device_id.to_string(),
                })
                .map_err(|e| ApiError::internal(e.to_string()))?;
                // The disk leaves the config when the guest ejects it (read back then).
                self.change(m, l, "/api/v1/vm.remove-device", body, |_| Ok(()))
            },
            |m| {
                let mut st = m.status();
                if !st.config.disks.iter().any(|d| d.id == device_id) {
                    return Err(ApiError::not_found(format!(
                        "VM {id} has no device with id {device_id:?}"
                    )));
                }
                st.config.disks.retain(|d| d.id != device_id);
                m.save_config(&st.config);
                self.shared
                    .events
                    .emit(Event::now(id, EventKind::DiskEjected).with("disk", device_id));
                Ok(())
            },
        )
    }

    fn update_disk(&self, id: &str, update: UpdateDisk) -> Result<(), ApiError> {
        self.route(
            id,
            |m, l| {
                let body =
                    serde_json::to_vec(&update).map_err(|e| ApiError::internal(e.to_string()))?;
                self.change(m, l, "/api/v1/vm.update-disk", body, |c| {
                    *c = update.apply(id, c)?.0;
                    Ok(())
                })
            },
            |m| {
                let mut st = m.status();
                st.config = update.apply(id, &st.config)?.0;
                m.save_config(&st.config);
                Ok(())
            },
        )
    }

    fn update_iothread(&self, id: &str, update: IoThreadUpdate) -> Result<(), ApiError> {
        self.route(
            id,
            |m, l| {
                let body =
                    serde_json::to_vec(&update).map_err(|e| ApiError::internal(e.to_string()))?;
                self.change(m, l, "/api/v1/vm.update-iothread", body, |c| {
                    let (index, merged) = merged_iothread(id, c, &update)?;
                    c.iothreads[index] = merged;
                    Ok(())
                })
            },
            |m| {
                let mut st = m.status();
                let (index, merged) = merged_iothread(id, &st.config, &update)?;
                st.config.iothreads[index] = merged;
                m.save_config(&st.config);
                Ok(())
            },
        )
    }

    fn disk_mirror(&self, id: &str, config: MirrorConfig) -> Result<JobInfo, ApiError> {
        self.mirror_disk(id, config)
    }

    fn jobs(&self, id: &str) -> Result<Vec<JobInfo>, ApiError> {
        self.list_jobs(id)
    }

    fn job_complete(&self, id: &str, job: JobRef) -> Result<(), ApiError> {
        self.complete_job(id, &job)
    }

    fn job_cancel(&self, id: &str, job: JobCancel) -> Result<(), ApiError> {
        self.cancel_job(id, &job)
    }

    fn job_set_speed(&self, id: &str, job: JobSpeed) -> Result<(), ApiError> {
        self.set_job_speed(id, &job)
    }

    fn shutdown_vmm(&self) -> Result<(), ApiError> {
        let vms: Vec<Arc<Managed>> = {
            // Under the map's lock: a create either is in it now or sees `stopping`.
            let vms = lock(&self.shared.vms);
            self.shared.stopping.store(true, Ordering::SeqCst);
            vms.values().cloned().collect()
        };
        // Every VM at once: each drains its own disks.
        std::thread::scope(|s| {
            for m in &vms {
                s.spawn(move || {
                    let _op = lock(&m.op);
                    self.remove(m);
                });
            }
        });
        Ok(())
    }
}
