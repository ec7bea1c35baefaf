//! The disk-level API of `vhost-user-blk --api-socket` (docs/architecture.md): a
//! frontend's guest (QEMU, Cloud Hypervisor) on our backend gets live throttling,
//! counters and storage migration the way qemu-storage-daemon offers them over QMP.
//! `GET disk.info`, `GET disk.counters`, `PUT disk.update`, `PUT disk.resume`,
//! `PUT iothread.update`, `PUT disk.mirror`, `GET jobs`, `PUT job-complete`,
//! `PUT job-cancel`, `PUT job-set-speed`, `GET events`; errors and status codes as the
//! VM API's.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, put};
use block::jobs::JobInfo;
use block::throttle::ThrottleLimits;
use devices::config::{
    DiskConfig, IoThreadConfig, IoThreadUpdate, ReadErrorPolicy, WriteErrorPolicy,
};
use devices::mirror::MirrorConfig;
use devices::vhost_user_blk::{Backend, BackendCounters};
use devices::virtio_blk::io_error::IoStatus;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::backend::{ApiError, JobCancel, JobRef, JobSpeed, job_error};
use crate::events::{Event, EventBus, EventKind, JobsSeen, job_events};
use crate::server::{JsonBody, MAX_BODY_BYTES, event_stream, method_not_allowed, not_found};

/// How often job progress is looked at for events.
const JOB_LOOK: Duration = Duration::from_millis(250);

/// `GET disk.info`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DiskInfo {
    /// The disk as configured, its `path` the image it uses now (a pivot changes it).
    pub disk: DiskConfig,
    /// The iothreads and their current settings.
    pub iothreads: Vec<IoThreadConfig>,
    /// Frontend sessions so far.
    pub sessions: u64,
    /// What stopped the disk, while an I/O error keeps it stopped (`PUT disk.resume`
    /// serves it again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_status: Option<IoStatus>,
}

/// `PUT disk.update`: the disk's throttle limits (`{}` removes them) and error policy;
/// what is left out stays.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskUpdate {
    /// The disk's id (optional: the backend serves one).
    #[serde(default)]
    pub id: Option<String>,
    /// New limits.
    #[serde(default)]
    pub throttle: Option<ThrottleLimits>,
    /// New write error policy.
    #[serde(default)]
    pub on_write_error: Option<WriteErrorPolicy>,
    /// New read error policy.
    #[serde(default)]
    pub on_read_error: Option<ReadErrorPolicy>,
}

#[derive(Clone)]
struct DiskState {
    backend: Arc<Backend>,
    events: EventBus,
    stop: watch::Sender<bool>,
}

fn check_disk(backend: &Backend, id: Option<&str>) -> Result<(), ApiError> {
    match id {
        Some(id) if id != backend.device().id() => Err(ApiError::not_found(format!(
            "no disk {id} (this backend serves {})",
            backend.device().id()
        ))),
        _ => Ok(()),
    }
}

/// Runs `f` off the async runtime (job operations block on iothreads).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
}

async fn disk_info(State(s): State<DiskState>) -> Json<DiskInfo> {
    let b = &s.backend;
    Json(DiskInfo {
        disk: b.device().config(),
        iothreads: b.iothread_configs(),
        sessions: b.counters().sessions,
        io_status: b.io_status(),
    })
}

async fn disk_counters(State(s): State<DiskState>) -> Json<BackendCounters> {
    Json(s.backend.counters())
}

async fn disk_update(
    State(s): State<DiskState>,
    JsonBody(update): JsonBody<DiskUpdate>,
) -> Result<StatusCode, ApiError> {
    check_disk(&s.backend, update.id.as_deref())?;
    if let Some(limits) = update.throttle {
        s.backend
            .set_throttle(limits)
            .map_err(|e| ApiError::bad_request("invalid disk update").with_details(vec![e]))?;
    }
    let io_error = s.backend.device().io_error();
    let (write, read) = io_error.policies();
    io_error.set_policies(
        update.on_write_error.unwrap_or(write),
        update.on_read_error.unwrap_or(read),
    );
    Ok(StatusCode::NO_CONTENT)
}

/// `PUT disk.resume`: the disk an I/O error stopped is served again, its held requests
/// first.
async fn disk_resume(
    State(s): State<DiskState>,
    body: axum::body::Bytes,
) -> Result<StatusCode, ApiError> {
    // The body is optional: `{"id": ...}` names the disk.
    if !body.iter().all(u8::is_ascii_whitespace) {
        let r: DiskRef = serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request("invalid disk reference").with_details(vec![e.to_string()])
        })?;
        check_disk(&s.backend, r.id.as_deref())?;
    }
    let backend = s.backend.clone();
    blocking(move || {
        backend.resume_io_error().map(|_| ()).ok_or_else(|| {
            ApiError::conflict(format!(
                "disk {} is not stopped on an I/O error",
                backend.device().id()
            ))
        })
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A disk named in a request body (optional: the backend serves one).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskRef {
    /// The disk's id.
    #[serde(default)]
    pub id: Option<String>,
}

async fn iothread_update(
    State(s): State<DiskState>,
    JsonBody(update): JsonBody<IoThreadUpdate>,
) -> Result<StatusCode, ApiError> {
    let Some(mut config) = s
        .backend
        .iothread_configs()
        .into_iter()
        .find(|t| t.id == update.id)
    else {
        return Err(ApiError::not_found(format!("no iothread {:?}", update.id)));
    };
    config.merge(&update);
    s.backend
        .update_iothread(config)
        .map_err(|e| ApiError::bad_request("invalid iothread").with_details(vec![e]))?;
    Ok(StatusCode::NO_CONTENT)
}

async fn disk_mirror(
    State(s): State<DiskState>,
    JsonBody(mut body): JsonBody<serde_json::Map<String, serde_json::Value>>,
) -> Result<Json<JobInfo>, ApiError> {
    // `disk` may be left out: the backend serves one.
    body.entry("disk")
        .or_insert_with(|| s.backend.device().id().into());
    let config: MirrorConfig = serde_json::from_value(serde_json::Value::Object(body))
        .map_err(|e| ApiError::bad_request("invalid mirror").with_details(vec![e.to_string()]))?;
    let backend = s.backend.clone();
    blocking(move || backend.start_mirror(config, None).map_err(job_error))
        .await
        .map(Json)
}

async fn jobs(State(s): State<DiskState>) -> Result<Json<Vec<JobInfo>>, ApiError> {
    let backend = s.backend.clone();
    blocking(move || Ok(backend.jobs())).await.map(Json)
}

async fn job_complete(
    State(s): State<DiskState>,
    JsonBody(job): JsonBody<JobRef>,
) -> Result<StatusCode, ApiError> {
    let backend = s.backend.clone();
    blocking(move || backend.complete_job(&job.job_id).map_err(job_error)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn job_cancel(
    State(s): State<DiskState>,
    JsonBody(job): JsonBody<JobCancel>,
) -> Result<StatusCode, ApiError> {
    let backend = s.backend.clone();
    blocking(move || {
        backend
            .cancel_job(&job.job_id, job.force)
            .map_err(job_error)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn job_set_speed(
    State(s): State<DiskState>,
    JsonBody(job): JsonBody<JobSpeed>,
) -> Result<StatusCode, ApiError> {
    let backend = s.backend.clone();
    blocking(move || {
        backend
            .set_job_speed(&job.job_id, job.speed)
            .map_err(job_error)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn events(State(s): State<DiskState>) -> Response {
    event_stream(&s.events, s.stop.subscribe())
}

fn router(state: DiskState) -> axum::Router {
    axum::Router::new()
        .route("/api/v1/disk.info", get(disk_info))
        .route("/api/v1/disk.counters", get(disk_counters))
        .route("/api/v1/disk.update", put(disk_update))
        .route("/api/v1/disk.resume", put(disk_resume))
        .route("/api/v1/iothread.update", put(iothread_update))
        .route("/api/v1/disk.mirror", put(disk_mirror))
        .route("/api/v1/jobs", get(jobs))
        .route("/api/v1/job-complete", put(job_complete))
        .route("/api/v1/job-cancel", put(job_cancel))
        .route("/api/v1/job-set-speed", put(job_set_speed))
        .route("/api/v1/events", get(events))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// The disk API serving on its own thread; dropping it stops serving.
pub struct DiskApi {
    stop: watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DiskApi {
    /// Binds the API socket at `socket` (mode 0600; a stale one is replaced, a live one
    /// refused). Call it before other threads start (the umask is process-wide).
    pub fn bind(socket: &Path) -> Result<std::os::unix::net::UnixListener, String> {
        crate::daemon::bind_socket(socket).map_err(|e| e.to_string())
    }

    /// Serves `backend`'s disk API on `listener` (from [`DiskApi::bind`]).
    pub fn start(
        listener: std::os::unix::net::UnixListener,
        backend: Arc<Backend>,
    ) -> Result<DiskApi, String> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("disk-api")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the API runtime: {e}"))?;
        // This API resumes the disk: its error policy may stop it.
        backend.enable_io_error_stops();
        let (stop, stopped) = watch::channel(false);
        let state = DiskState {
            backend,
            events: EventBus::new(),
            stop: stop.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("disk-api".into())
            .spawn(move || {
                rt.block_on(async move {
                    tokio::spawn(send_job_events(state.clone(), stopped.clone()));
                    let unix = match tokio::net::UnixListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!(error = %e, "the disk API cannot serve");
                            return;
                        }
                    };
                    if let Err(e) = crate::server::serve(router(state), unix, None, stopped).await {
                        tracing::error!(error = %e, "the disk API stopped");
                    }
                });
            })
            .map_err(|e| format!("cannot start the API thread: {e}"))?;
        Ok(DiskApi {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for DiskApi {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends the jobs' events (state changes within [`JOB_LOOK`], progress as it comes)
/// and an `io-error` event each time an I/O error stops the disk.
async fn send_job_events(state: DiskState, mut stop: watch::Receiver<bool>) {
    let mut seen = JobsSeen::new();
    let mut stops_told = 0;
    let mut tick = tokio::time::interval(JOB_LOOK);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let backend = state.backend.clone();
        let Ok(jobs) = tokio::task::spawn_blocking(move || backend.jobs()).await else {
            return;
        };
        for event in job_events("", &jobs, &mut seen) {
            state.events.emit(event);
        }
        // One event per look that found new stops (`stops`: how many since the last).
        let (stops, last) = state.backend.device().io_error().stops();
        if stops > stops_told
            && let Some(status) = last
        {
            state.events.emit(
                Event::now("", EventKind::IoError)
                    .with("disk", state.backend.device().id())
                    .with("op", status.op)
                    .with("errno", status.errno)
                    .with("error", status.error)
                    .with("stops", stops - stops_told),
            );
        }
        stops_told = stops;
    }
}
