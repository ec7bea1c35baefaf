//! One VM per process (`vmm`, docs/architecture.md): the single-VM API
//! on `--api-socket` with the same handlers and JSON as vmmd, over a backend whose control
//! loop handles what the guest does the moment it happens.
//!
//! [`OneVm`] is that backend: it holds at most one VM and sends an event after every
//! change made through the API (the guest's own changes come from the control loop).
//! [`run`] serves it; with `exit_on_shutdown` (how vmmd runs it, and always without a
//! socket) the process ends once its VM is shut down or deleted, writing the VM's last
//! config and counters to `last_state` first.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use block::jobs::JobInfo;
use block::sync::lock;
use devices::config::{DiskConfig, IoThreadUpdate};
use devices::mirror::MirrorConfig;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use vmm::config::VmConfig;

use crate::backend::{
    ApiError, JobCancel, JobRef, JobSpeed, UpdateDisk, VmCounters, VmInfo, VmState, VmSummary,
    VmmBackend,
};
use crate::daemon::{self, StartError, Stopped};
use crate::events::{Event, EventBus, EventKind};
use crate::server::{AppState, router};

/// A backend holding at most one VM, announcing every change made through it.
pub struct OneVm {
    inner: Arc<dyn VmmBackend>,
    events: EventBus,
    /// Held by `create`, so that two racing creates do not make two VMs.
    creating: Mutex<()>,
}

impl OneVm {
    /// One VM over `inner`, announcing on `events`.
    pub fn new(inner: Arc<dyn VmmBackend>, events: EventBus) -> Self {
        OneVm {
            inner,
            events,
            creating: Mutex::new(()),
        }
    }

    /// Runs `op`; on success sends `kind` about VM `id`.
    fn announce(
        &self,
        id: &str,
        kind: EventKind,
        op: impl FnOnce() -> Result<(), ApiError>,
    ) -> Result<(), ApiError> {
        op()?;
        self.events.emit(Event::now(id, kind));
        Ok(())
    }

    /// Creates the VM the process was started with: as [`VmmBackend::create`], without a
    /// `created` event (the process's start is the creation; its supervisor says so).
    pub fn create_at_start(&self, config: VmConfig) -> Result<(), ApiError> {
        let _one = lock(&self.creating);
        self.create_one(config)
    }

    /// Creates the VM, the process holding none (`creating` held by the caller).
    fn create_one(&self, config: VmConfig) -> Result<(), ApiError> {
        if let Some(vm) = self.inner.list().first() {
            return Err(ApiError::conflict(format!(
                "this vmm process serves one VM and has one ({}); delete it first",
                vm.id
            )));
        }
        if let Some(class) = crate::sandbox::test_violation_request(&config.id) {
            crate::sandbox::arm_test_violation(class);
        }
        self.inner.create(config)
    }

    /// The VM's state (`None`: no VM).
    pub fn state(&self) -> Option<VmState> {
        self.inner.list().first().map(|v| v.state)
    }
}

impl VmmBackend for OneVm {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn create(&self, config: VmConfig) -> Result<(), ApiError> {
        let _one = lock(&self.creating);
        let id = config.id.clone();
        self.announce(&id, EventKind::Created, || self.create_one(config))
    }

    fn boot(&self, id: &str) -> Result<(), ApiError> {
        self.announce(id, EventKind::Booted, || self.inner.boot(id))
    }

    fn pause(&self, id: &str) -> Result<(), ApiError> {
        self.announce(id, EventKind::Paused, || self.inner.pause(id))
    }

    fn resume(&self, id: &str) -> Result<(), ApiError> {
        self.announce(id, EventKind::Resumed, || self.inner.resume(id))
    }

    fn shutdown(&self, id: &str) -> Result<(), ApiError> {
        self.announce(id, EventKind::Shutdown, || self.inner.shutdown(id))
    }

    fn reboot(&self, id: &str) -> Result<(), ApiError> {
        self.announce(id, EventKind::Rebooted, || self.inner.reboot(id))
    }

    fn delete(&self, id: &str) -> Result<(), ApiError> {
        self.announce(id, EventKind::Deleted, || self.inner.delete(id))
    }

    fn info(&self, id: &str) -> Result<VmInfo, ApiError> {
        self.inner.info(id)
    }

    fn list(&self) -> Vec<VmSummary> {
        self.inner.list()
    }

    fn counters(&self, id: &str) -> Result<VmCounters, ApiError> {
        self.inner.counters(id)
    }

    fn all_counters(&self) -> Vec<(String, VmState, VmCounters)> {
        self.inner.all_counters()
    }

    fn add_disk(&self, id: &str, disk: DiskConfig) -> Result<(), ApiError> {
        let disk_id = disk.id.clone();
        let path = disk.path.clone();
        if let Err(e) = self.inner.add_disk(id, disk) {
            // A file handed over for it is not kept for a disk that is not there.
            let used = self
                .inner
                .info(id)
                .is_ok_and(|i| i.config.disks.iter().any(|d| d.path == path));
            if !used {
                block::host_file::forget_handed(&path);
            }
            return Err(e);
        }
        self.events
            .emit(Event::now(id, EventKind::DiskAdded).with("disk", disk_id));
        Ok(())
    }

    fn remove_device(&self, id: &str, device_id: &str) -> Result<(), ApiError> {
        self.inner.remove_device(id, device_id)?;
        // Gone at once from a VM without a running guest; else when the guest ejects it.
        let gone = self
            .inner
            .info(id)
            .is_ok_and(|i| !i.config.disks.iter().any(|d| d.id == device_id));
        let kind = if gone {
            EventKind::DiskEjected
        } else {
            EventKind::DiskRemovalRequested
        };
        self.events
            .emit(Event::now(id, kind).with("disk", device_id));
        Ok(())
    }

    fn update_disk(&self, id: &str, update: UpdateDisk) -> Result<(), ApiError> {
        self.inner.update_disk(id, update)
    }

    fn update_iothread(&self, id: &str, update: IoThreadUpdate) -> Result<(), ApiError> {
        self.inner.update_iothread(id, update)
    }

    fn disk_mirror(&self, id: &str, config: MirrorConfig) -> Result<JobInfo, ApiError> {
        let target = config.target.path.clone();
        let result = self.inner.disk_mirror(id, config);
        if result.is_err() {
            // A target handed over for it is not kept (nor its lock), unless a disk or
            // another job of the VM uses that path.
            let disk = self
                .inner
                .info(id)
                .is_ok_and(|i| i.config.disks.iter().any(|d| d.path == target));
            let job = self.inner.jobs(id).is_ok_and(|jobs| {
                jobs.iter()
                    .any(|j| !j.state.is_final() && std::path::Path::new(&j.target) == target)
            });
            if !disk && !job {
                block::host_file::forget_handed(&target);
            }
        }
        result
    }

    fn jobs(&self, id: &str) -> Result<Vec<JobInfo>, ApiError> {
        self.inner.jobs(id)
    }

    fn job_complete(&self, id: &str, job: JobRef) -> Result<(), ApiError> {
        self.inner.job_complete(id, job)
    }

    fn job_cancel(&self, id: &str, job: JobCancel) -> Result<(), ApiError> {
        self.inner.job_cancel(id, job)
    }

    fn job_set_speed(&self, id: &str, job: JobSpeed) -> Result<(), ApiError> {
        self.inner.job_set_speed(id, job)
    }

    fn shutdown_vmm(&self) -> Result<(), ApiError> {
        let running = self
            .inner
            .list()
            .into_iter()
            .filter(|v| matches!(v.state, VmState::Running | VmState::Paused))
            .map(|v| v.id)
            .collect::<Vec<_>>();
        self.inner.shutdown_vmm()?;
        for id in running {
            self.events.emit(Event::now(&id, EventKind::Shutdown));
        }
        Ok(())
    }
}

/// What a VM process leaves behind when it ends in order: its VM's last config (disks
/// added and ejected included) and counters. vmmd reads it to tell a shutdown from a
/// crash.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LastState {
    /// The VM's config at the end (`None`: no VM).
    pub config: Option<VmConfig>,
    /// Its counters at the end.
    pub counters: VmCounters,
    /// The last event about the VM (why it ended).
    pub last_event: Option<Event>,
}

/// How to run a VM process.
#[derive(Debug, Default)]
pub struct Options {
    /// Serve the single-VM API here.
    pub api_socket: Option<PathBuf>,
    /// Receive hot plugged images' descriptors here ([`crate::handover`]).
    pub fd_socket: Option<PathBuf>,
    /// Also serve it on this loopback TCP address.
    pub tcp: Option<std::net::SocketAddr>,
    /// Directories whose files clients may name (empty: any).
    pub allowed_dirs: Vec<PathBuf>,
    /// Create this VM at start (and boot it, with `boot`).
    pub config: Option<VmConfig>,
    /// Boot the VM of `config` at start (always so without a socket).
    pub boot: bool,
    /// When the VM of `config` is refused at start: write the API error here
    /// ([`StartFailure`]) before ending.
    pub start_error: Option<PathBuf>,
    /// Run the fake VM (a test double that runs no guest) instead of KVM.
    pub fake: bool,
    /// End the process once the VM is shut down or deleted (always so without a socket).
    pub exit_on_shutdown: bool,
    /// Write a [`LastState`] here when ending in order.
    pub last_state: Option<PathBuf>,
    /// Seccomp filters per thread class.
    pub seccomp: crate::sandbox::SeccompMode,
    /// Leave file access unconfined (no Landlock).
    pub no_landlock: bool,
}

/// Errors of a VM process.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The socket or the runtime could not be set up.
    #[error(transparent)]
    Start(#[from] StartError),
    /// An option is wrong.
    #[error("{0}")]
    Usage(String),
    /// The sandbox could not be set up.
    #[error("sandbox: {0}")]
    Sandbox(String),
    /// The VM given at start was refused.
    #[error("{0}")]
    Vm(ApiError),
}

/// The API error of a VM refused at start, as a VM process leaves it for its supervisor.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StartFailure {
    /// The HTTP status it would have answered.
    pub status: u16,
    /// The error.
    #[serde(flatten)]
    pub body: crate::backend::ErrorBody,
}

/// How a VM process ended in order.
#[derive(Clone, Debug, PartialEq)]
pub struct Ended {
    /// The last event about the VM.
    pub last_event: Option<Event>,
}

impl Ended {
    /// Whether the guest ended it by failing or by resetting too often (the `vmm
    /// --config` exit status 1).
    pub fn guest_failed(&self) -> bool {
        self.last_event.as_ref().is_some_and(|e| {
            e.event == EventKind::GuestFailed
                || (e.event == EventKind::Shutdown && e.fields.contains_key("reason"))
        })
    }
}

/// Runs the VM process of `opts` until it is told to stop (`vmm.shutdown`, a signal) or,
/// with `exit_on_shutdown`, its VM is shut down or deleted. Its VM, if still running,
/// is shut down (disk I/O drained) before this returns.
pub fn run(opts: Options) -> Result<Ended, RunError> {
    let socket = opts.api_socket.clone();
    if let Some(addr) = opts.tcp
        && !addr.ip().is_loopback()
    {
        return Err(RunError::Usage(format!(
            "--tcp {addr}: only loopback addresses are allowed"
        )));
    }
    // Bound before any thread starts (the umask is process-wide) and before the process
    // confines itself.
    let unix = socket.as_deref().map(daemon::bind_socket).transpose()?;
    let fd_listener = opts
        .fd_socket
        .as_deref()
        .map(daemon::bind_socket)
        .transpose()?;
    let here = socket.clone().unwrap_or_else(|| PathBuf::from("vmm"));
    let rules = crate::paths::PathRules::new(&opts.allowed_dirs, socket.as_slice())
        .map_err(RunError::Usage)?;
    if rules.restricted() {
        block::host_file::forbid_symlinks();
    }
    let tcp = opts
        .tcp
        .map(std::net::TcpListener::bind)
        .transpose()
        .map_err(daemon::io_err(&here))?;
    // Before any other thread starts: every thread is confined to the VM's files, and
    // gets its class's syscall filter as it starts.
    confine_files(&opts)?;
    crate::sandbox::install_seccomp(opts.seccomp).map_err(RunError::Sandbox)?;
    let rt = daemon::runtime(2).map_err(daemon::io_err(&here))?;
    let events = EventBus::keeping_early();
    let inner: Arc<dyn VmmBackend> = if opts.fake {
        Arc::new(crate::fake::FakeVmm::new())
    } else {
        crate::kvm_backend::KvmBackend::with_control_loop(events.clone())
            .map_err(daemon::io_err(&here))?
    };
    let backend = Arc::new(OneVm::new(inner, events.clone()));
    let (stop, _) = watch::channel(false);
    let last: Arc<Mutex<Option<Event>>> = Arc::default();
    let exit_on_shutdown = opts.exit_on_shutdown || unix.is_none();
    let result = rt.block_on(async {
        watch_ending(&events, &backend, &stop, &last, exit_on_shutdown);
        if let Some(config) = opts.config.clone() {
            let id = config.id.clone();
            let b = backend.clone();
            let boot = opts.boot || unix.is_none();
            let started = tokio::task::spawn_blocking(move || {
                b.create_at_start(config)?;
                if boot {
                    b.boot(&id)?;
                }
                Ok(())
            })
            .await
            .unwrap_or_else(|e| Err(ApiError::internal(e.to_string())));
            if let Err(e) = started {
                if let Some(path) = &opts.start_error {
                    let failure = StartFailure {
                        status: e.kind.status(),
                        body: e.body(),
                    };
                    if let Err(w) = crate::supervisor::write_json(path, &failure) {
                        tracing::warn!(path = %path.display(), error = %w, "cannot write the start error");
                    }
                }
                return Err(RunError::Vm(e));
            }
        }
        if let Some(l) = fd_listener {
            let l = tokio::net::UnixListener::from_std(l).map_err(daemon::io_err(&here))?;
            tokio::spawn(crate::handover::serve(l));
        }
        let how = match unix {
            Some(unix) => {
                tracing::info!(socket = %here.display(), backend = backend.name(), "serving one VM");
                let state = AppState::new(backend.clone(), stop.clone())
                    .with_events(events.clone())
                    .with_rules(rules);
                daemon::serve_until_stopped(router(state), unix, tcp, stop.clone())
                    .await
                    .map_err(daemon::io_err(&here))?
            }
            None => wait_until_stopped(&stop).await,
        };
        // Whatever stopped the process, its VM stops with it, drained.
        let b = backend.clone();
        let _ = tokio::task::spawn_blocking(move || b.shutdown_vmm()).await;
        tracing::info!(?how, "VM process stopping");
        Ok::<(), RunError>(())
    });
    let ended = Ended {
        last_event: lock(&last).clone(),
    };
    if let Some(path) = &opts.last_state {
        write_last_state(path, &backend, &ended);
    }
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    for path in socket.iter().chain(opts.fd_socket.iter()) {
        let _ = std::fs::remove_file(path);
    }
    result.map(|()| ended)
}

/// Restricts the process's file access to what the VM of `opts.config` needs
/// ([`crate::sandbox::landlock`]). Without a config at start the files are not known:
/// nothing is restricted (logged).
fn confine_files(opts: &Options) -> Result<(), RunError> {
    use crate::sandbox::landlock::{self, Confined, FileSet};
    if opts.no_landlock {
        tracing::warn!("Landlock is off (--no-landlock): the process may open any file");
        return Ok(());
    }
    let Some(config) = &opts.config else {
        tracing::warn!(
            "Landlock not applied: the VM's files are not known at start (give the VM with --config)"
        );
        return Ok(());
    };
    // A serial output file is created now: creating files is not among the rights.
    if let (vmm::config::SerialMode::File, Some(p)) = (config.serial.mode, &config.serial.path)
        && std::fs::symlink_metadata(p).is_err()
    {
        let _ = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(p);
    }
    let state_files: Vec<&std::path::Path> =
        [opts.last_state.as_deref(), opts.start_error.as_deref()]
            .into_iter()
            .flatten()
            .collect();
    let set = FileSet::for_vm(config, &state_files);
    match landlock::restrict(&set).map_err(RunError::Sandbox)? {
        Confined::Fully => tracing::info!(
            files = set.read.len() + set.write.len(),
            "Landlock: file access confined to the VM's files"
        ),
        Confined::Partly => tracing::warn!(
            "Landlock: the kernel's Landlock is older; file access is only partly confined"
        ),
        Confined::Not => {
            tracing::warn!("Landlock: this kernel has no Landlock; file access is not confined")
        }
    }
    landlock::test_probe();
    Ok(())
}

/// Follows `events`, remembering the last one; with `exit`, sets `stop` once the VM is
/// shut down or deleted.
fn watch_ending(
    events: &EventBus,
    backend: &Arc<OneVm>,
    stop: &watch::Sender<bool>,
    last: &Arc<Mutex<Option<Event>>>,
    exit: bool,
) {
    let mut rx = events.watch();
    let (backend, stop, last) = (backend.clone(), stop.clone(), last.clone());
    tokio::spawn(async move {
        while let Ok(event) = rx.recv().await {
            let kind = event.event;
            *lock(&last) = Some(event);
            if !exit {
                continue;
            }
            let b = backend.clone();
            let state = tokio::task::spawn_blocking(move || b.state())
                .await
                .ok()
                .flatten();
            if kind == EventKind::Deleted || state == Some(VmState::Shutdown) {
                stop.send_replace(true);
                return;
            }
        }
    });
}

/// Without a socket: waits for the VM to end, or for SIGTERM/SIGINT.
async fn wait_until_stopped(stop: &watch::Sender<bool>) -> Stopped {
    let mut rx = stop.subscribe();
    tokio::select! {
        _ = rx.wait_for(|s| *s) => Stopped::Asked,
        () = daemon::termination() => Stopped::Signal,
    }
}

/// Writes the [`LastState`] of `backend` to `path` (a new file renamed over the old, so
/// a reader never sees half of it).
fn write_last_state(path: &std::path::Path, backend: &OneVm, ended: &Ended) {
    let vm = backend.list().into_iter().next();
    let state = LastState {
        config: vm
            .as_ref()
            .and_then(|v| backend.info(&v.id).ok())
            .map(|i| i.config),
        counters: vm
            .as_ref()
            .and_then(|v| backend.counters(&v.id).ok())
            .unwrap_or_default(),
        last_event: ended.last_event.clone(),
    };
    if let Err(e) = crate::supervisor::write_json(path, &state) {
        tracing::warn!(path = %path.display(), error = %e, "cannot write the VM's last state");
    }
}
