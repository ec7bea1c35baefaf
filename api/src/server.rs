//! The HTTP service: axum handlers for every endpoint (`openapi.yaml`), the
//! OpenAPI description generated from them, and serving on a Unix socket (and optionally
//! loopback TCP). Handlers run backend calls on the blocking pool, never on the runtime.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use devices::config::{DiskConfig, IoThreadUpdate};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::sync::watch;
use utoipa::{IntoParams, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use vmm::config::VmConfig;

use crate::backend::{
    ApiError, ErrorBody, ErrorKind, PingResponse, RemoveDevice, UpdateDisk, VmCounters, VmInfo,
    VmState, VmSummary, VmmBackend,
};
use crate::events::{Event, EventBus, EventKind};
use crate::metrics;
use crate::paths::PathRules;

/// Largest request body accepted (larger: 413).
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    backend: Arc<dyn VmmBackend>,
    shutdown: watch::Sender<bool>,
    pub(crate) rules: Arc<PathRules>,
    events: EventBus,
}

impl AppState {
    /// State over `backend`; `vmm.shutdown` sets `shutdown` to true. Any host path is
    /// accepted (see [`AppState::with_rules`]).
    pub fn new(backend: Arc<dyn VmmBackend>, shutdown: watch::Sender<bool>) -> Self {
        AppState {
            backend,
            shutdown,
            rules: Arc::new(PathRules::default()),
            events: EventBus::new(),
        }
    }

    /// The same state, streaming `events` on `GET /api/v1/events`.
    pub fn with_events(mut self, events: EventBus) -> Self {
        self.events = events;
        self
    }

    /// The same state, checking client paths against `rules`.
    pub fn with_rules(mut self, rules: PathRules) -> Self {
        self.rules = Arc::new(rules);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.kind.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status == StatusCode::SERVICE_UNAVAILABLE {
            tracing::warn!(error = %self.message, details = ?self.details, "host limit reached");
        } else if status.is_server_error() {
            tracing::error!(error = %self.message, details = ?self.details, "request failed");
        } else {
            tracing::debug!(status = status.as_u16(), error = %self.message, "request refused");
        }
        (status, Json(self.body())).into_response()
    }
}

/// A JSON request body: size-limited, any content type, serde errors (unknown fields,
/// wrong types, malformed JSON) answered 400 with serde's message.
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    ErrorKind::PayloadTooLarge,
                    format!("request body is larger than {MAX_BODY_BYTES} bytes"),
                )
            } else {
                ApiError::bad_request(format!("cannot read the request body: {e}"))
            }
        })?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            ApiError::bad_request(format!("invalid JSON body: {e}"))
                .with_details(vec![e.to_string()])
        })
    }
}

/// `?id=`: which VM (optional when exactly one exists).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct VmSelector {
    /// The VM id; may be left out when the service has exactly one VM.
    #[param(example = "ex")]
    pub id: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for VmSelector {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<VmSelector>::from_request_parts(parts, state)
            .await
            .map(|Query(s)| s)
            .map_err(|e| ApiError::bad_request(format!("invalid query: {}", e.body_text())))
    }
}

/// The VM a call is about: the named one, or the only one.
fn resolve(backend: &dyn VmmBackend, selector: Option<String>) -> Result<String, ApiError> {
    if let Some(id) = selector {
        return Ok(id);
    }
    let vms = backend.list();
    match vms.as_slice() {
        [only] => Ok(only.id.clone()),
        [] => Err(ApiError::not_found("no VM exists")),
        many => Err(ApiError::bad_request(format!(
            "{} VMs exist ({}): name one with ?id=",
            many.len(),
            many.iter()
                .map(|v| v.id.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Runs `f` on the blocking pool.
async fn blocking<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&dyn VmmBackend) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let backend = state.backend.clone();
    tokio::task::spawn_blocking(move || f(&*backend))
        .await
        .map_err(|e| ApiError::internal(format!("VMM operation failed: {e}")))?
}

/// Runs a VM-scoped call on the blocking pool.
pub(crate) async fn on_vm<T: Send + 'static>(
    state: &AppState,
    selector: VmSelector,
    f: impl FnOnce(&dyn VmmBackend, &str) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    blocking(state, move |b| {
        let id = resolve(b, selector.id)?;
        f(b, &id)
    })
    .await
}

/// Service liveness and version.
#[utoipa::path(get, path = "/api/v1/vmm.ping", tag = "vmm",
    responses((status = 200, description = "The service is up", body = PingResponse)))]
async fn ping(State(state): State<AppState>) -> Json<PingResponse> {
    Json(PingResponse {
        version: env!("CARGO_PKG_VERSION").to_string(),
        backend: state.backend.name().to_string(),
        pid: std::process::id(),
    })
}

/// Shuts down every VM, then the service.
#[utoipa::path(put, path = "/api/v1/vmm.shutdown", tag = "vmm",
    responses((status = 204, description = "Every VM shut down; the service exits"),
              (status = 500, description = "A VM failed to shut down", body = ErrorBody)))]
async fn vmm_shutdown(State(state): State<AppState>) -> Result<StatusCode, ApiError> {
    blocking(&state, |b| b.shutdown_vmm()).await?;
    state.shutdown.send_replace(true);
    Ok(StatusCode::NO_CONTENT)
}

/// Creates a VM from its config.
#[utoipa::path(put, path = "/api/v1/vm.create", tag = "vm",
    request_body(content = VmConfig, description = "A VM config. The examples boot the test guest \
        (`tests/guest`); their paths (kernel `/tmp/vmm-example/guest.elf`, images \
        `/tmp/vmm-example/disk*.raw`) are example paths, which `scripts/schemathesis.sh` creates.",
        content_type = "application/json",
        examples(
            ("test_guest" = (summary = "The test guest with one disk on a named iothread",
                value = json!({"id": "ex", "memory": {"size_mib": 64},
                    "payload": {"kernel": "/tmp/vmm-example/guest.elf",
                                "cmdline": "exit=acpi pci=auto ms=300"},
                    "iothreads": [{"id": "io0"}],
                    "disks": [{"id": "d0", "path": "/tmp/vmm-example/disk0.raw", "iothread": "io0"}]}))),
            ("throttled" = (summary = "Two vCPUs, serial output to a file, a throttle group, a null disk with two queues on one iothread",
                value = json!({"id": "ex-full", "cpus": {"boot_vcpus": 2}, "memory": {"size_mib": 64},
                    "payload": {"kernel": "/tmp/vmm-example/guest.elf",
                                "cmdline": "exit=acpi pci=auto ms=100"},
                    "serial": {"mode": "file", "path": "/tmp/vmm-example/ex-full.serial"},
                    "iothreads": [{"id": "io0", "poll_max_ns": 0}],
                    "throttle_groups": [{"id": "g0", "limits": {"iops_total": 2000}}],
                    "disks": [{"id": "d0", "path": "/tmp/vmm-example/disk1.raw", "iothread": "io0",
                               "throttle": {"bps_total": 10485760}, "throttle_group": "g0"},
                              {"id": "n0", "path": "null", "null_size": 1048576, "num_queues": 2,
                               "iothread_vq_mapping": [{"iothread": "io0", "vqs": [0, 1]}]}]}))),
            ("null_disk" = (summary = "The test guest with a null disk only",
                value = json!({"id": "ex-null", "memory": {"size_mib": 64},
                    "payload": {"kernel": "/tmp/vmm-example/guest.elf", "cmdline": "exit=acpi ms=50"},
                    "disks": [{"id": "n0", "path": "null", "null_size": 1048576}]})))
        )),
    responses((status = 204, description = "Created"),
              (status = 400, description = "Invalid config: a field, a missing file, more disks than PCI slots (31)", body = ErrorBody),
              (status = 403, description = "A path outside the directories the service may use (vmmd --allowed-dir)", body = ErrorBody),
              (status = 409, description = "Duplicate id; an image, serial output or socket in use by another VM or program", body = ErrorBody),
              (status = 413, description = "Body too large", body = ErrorBody),
              (status = 503, description = "The host lacks a resource for now (file descriptors, memory, hugepages) or the service is shutting down", body = ErrorBody)))]
async fn vm_create(
    State(state): State<AppState>,
    JsonBody(mut config): JsonBody<VmConfig>,
) -> Result<StatusCode, ApiError> {
    let rules = state.rules.clone();
    blocking(&state, move |b| {
        rules.check_vm(&mut config)?;
        b.create(config)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

macro_rules! vm_action {
    ($name:ident, $path:literal, $method:ident, $doc:literal) => {
        #[doc = $doc]
        #[utoipa::path(put, path = $path, tag = "vm", params(VmSelector),
                    responses((status = 204, description = "Done"),
                              (status = 400, description = "Invalid query", body = ErrorBody),
                              (status = 404, description = "Unknown VM", body = ErrorBody),
                              (status = 409, description = "Wrong state", body = ErrorBody),
                              (status = 503, description = "The host lacks a resource to rebuild the VM", body = ErrorBody)))]
        async fn $name(
            State(state): State<AppState>,
            selector: VmSelector,
        ) -> Result<StatusCode, ApiError> {
            on_vm(&state, selector, |b, id| b.$method(id)).await?;
            Ok(StatusCode::NO_CONTENT)
        }
    };
}

vm_action!(
    vm_boot,
    "/api/v1/vm.boot",
    boot,
    "Boots a created or shut-down VM."
);
vm_action!(vm_pause, "/api/v1/vm.pause", pause, "Pauses a running VM.");
vm_action!(
    vm_resume,
    "/api/v1/vm.resume",
    resume,
    "Resumes a paused VM."
);
vm_action!(
    vm_shutdown,
    "/api/v1/vm.shutdown",
    shutdown,
    "Shuts down a VM, draining disk I/O."
);
vm_action!(
    vm_reboot,
    "/api/v1/vm.reboot",
    reboot,
    "Reboots a running VM."
);
vm_action!(
    vm_delete,
    "/api/v1/vm.delete",
    delete,
    "Shuts down and forgets a VM."
);

/// A VM's config and state.
#[utoipa::path(get, path = "/api/v1/vm.info", tag = "vm", params(VmSelector),
    responses((status = 200, description = "Config and state", body = VmInfo),
              (status = 400, description = "Invalid query", body = ErrorBody),
              (status = 404, description = "Unknown VM", body = ErrorBody)))]
async fn vm_info(
    State(state): State<AppState>,
    selector: VmSelector,
) -> Result<Json<VmInfo>, ApiError> {
    on_vm(&state, selector, |b, id| b.info(id)).await.map(Json)
}

/// A VM's disk and iothread counters.
#[utoipa::path(get, path = "/api/v1/vm.counters", tag = "vm", params(VmSelector),
    responses((status = 200, description = "Counters", body = VmCounters),
              (status = 400, description = "Invalid query", body = ErrorBody),
              (status = 404, description = "Unknown VM", body = ErrorBody)))]
async fn vm_counters(
    State(state): State<AppState>,
    selector: VmSelector,
) -> Result<Json<VmCounters>, ApiError> {
    on_vm(&state, selector, |b, id| b.counters(id))
        .await
        .map(Json)
}

/// Adds a disk (and its iothread); a running guest is told through ACPI. The image is
/// opened (and so checked) in every state, also on a shut-down VM.
#[utoipa::path(put, path = "/api/v1/vm.add-disk", tag = "vm", params(VmSelector),
    request_body(content = DiskConfig, description = "A disk config. The image paths of the \
        examples are example paths under `/tmp/vmm-example`, which `scripts/schemathesis.sh` creates.",
        content_type = "application/json",
        examples(
            ("image" = (summary = "A raw image on its own iothread",
                value = json!({"id": "d1", "path": "/tmp/vmm-example/disk2.raw"}))),
            ("throttled" = (summary = "A read-only image on the named iothread io0, throttled",
                value = json!({"id": "d2", "path": "/tmp/vmm-example/disk3.raw", "readonly": true,
                    "iothread": "io0", "throttle": {"iops_total": 500}}))),
            ("null" = (summary = "A 4 MiB null disk with two queues",
                value = json!({"id": "n1", "path": "null", "null_size": 4194304, "num_queues": 2})))
        )),
    responses((status = 204, description = "Added"),
              (status = 400, description = "Invalid disk: a field, a missing or unusable image, no free PCI slot (31 disks)", body = ErrorBody),
              (status = 403, description = "A path outside the directories the service may use (vmmd --allowed-dir)", body = ErrorBody),
              (status = 404, description = "Unknown VM", body = ErrorBody),
              (status = 409, description = "Duplicate disk id, image in use or wrong state", body = ErrorBody),
              (status = 413, description = "Body too large", body = ErrorBody),
              (status = 503, description = "The host lacks a resource for now (file descriptors, memory)", body = ErrorBody)))]
async fn vm_add_disk(
    State(state): State<AppState>,
    selector: VmSelector,
    JsonBody(mut disk): JsonBody<DiskConfig>,
) -> Result<StatusCode, ApiError> {
    let rules = state.rules.clone();
    on_vm(&state, selector, move |b, id| {
        rules.check_disk(&mut disk)?;
        b.add_disk(id, disk)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Removes a disk: at once on a created or shut-down VM; on a running or paused VM the
/// guest is asked to eject it (ACPI) and the disk is drained and removed when it does
/// (`vm.info` lists it under `pending_removals` until then).
#[utoipa::path(put, path = "/api/v1/vm.remove-device", tag = "vm", params(VmSelector),
    request_body(content = RemoveDevice, description = "The disk to remove", content_type = "application/json",
        examples(
            ("image" = (summary = "The disk added by the add-disk example", value = json!({"id": "d1"}))),
            ("null" = (summary = "The null disk added by the add-disk example", value = json!({"id": "n1"})))
        )),
    responses((status = 204, description = "Removed, or removal asked of the running guest"),
              (status = 400, description = "Invalid body", body = ErrorBody),
              (status = 404, description = "Unknown VM or device", body = ErrorBody),
              (status = 409, description = "Wrong state", body = ErrorBody),
              (status = 413, description = "Body too large", body = ErrorBody)))]
async fn vm_remove_device(
    State(state): State<AppState>,
    selector: VmSelector,
    JsonBody(body): JsonBody<RemoveDevice>,
) -> Result<StatusCode, ApiError> {
    on_vm(&state, selector, move |b, id| b.remove_device(id, &body.id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Changes a disk's throttle limits or group, live.
#[utoipa::path(put, path = "/api/v1/vm.update-disk", tag = "vm", params(VmSelector),
    request_body(content = UpdateDisk, description = "The disk and its new settings", content_type = "application/json",
        examples(
            ("limits" = (summary = "New limits: 500 requests/s, bursts of 1000 for 2 s",
                value = json!({"id": "d0", "throttle": {"iops_total": 500, "iops_total_max": 1000,
                    "iops_total_max_length": 2}}))),
            ("unthrottle" = (summary = "No limits of its own any more", value = json!({"id": "d0", "throttle": {}}))),
            ("leave_group" = (summary = "Out of its throttle group", value = json!({"id": "d0", "throttle_group": ""})))
        )),
    responses((status = 204, description = "Changed"),
              (status = 400, description = "Invalid settings", body = ErrorBody),
              (status = 404, description = "Unknown VM or disk", body = ErrorBody),
              (status = 413, description = "Body too large", body = ErrorBody)))]
async fn vm_update_disk(
    State(state): State<AppState>,
    selector: VmSelector,
    JsonBody(update): JsonBody<UpdateDisk>,
) -> Result<StatusCode, ApiError> {
    on_vm(&state, selector, move |b, id| b.update_disk(id, update)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Changes a named iothread's polling, batching and CPU affinity, live. Only the fields
/// sent change; the others keep their values (`cpu_affinity: []` unpins).
#[utoipa::path(put, path = "/api/v1/vm.update-iothread", tag = "vm", params(VmSelector),
    request_body(content = IoThreadUpdate, description = "The iothread's id and the settings to change", content_type = "application/json",
        examples(
            ("polling" = (summary = "No polling, smaller batches",
                value = json!({"id": "io0", "poll_max_ns": 0, "aio_max_batch": 16}))),
            ("adaptive" = (summary = "Adaptive polling up to 64 us, not pinned",
                value = json!({"id": "io0", "poll_max_ns": 65536, "poll_grow": 2, "poll_shrink": 2,
                    "cpu_affinity": []})))
        )),
    responses((status = 204, description = "Changed"),
              (status = 400, description = "Invalid settings (e.g. a CPU the host does not offer)", body = ErrorBody),
              (status = 404, description = "Unknown VM or iothread (a disk's dedicated iothread cannot be changed)", body = ErrorBody),
              (status = 413, description = "Body too large", body = ErrorBody)))]
async fn vm_update_iothread(
    State(state): State<AppState>,
    selector: VmSelector,
    JsonBody(update): JsonBody<IoThreadUpdate>,
) -> Result<StatusCode, ApiError> {
    on_vm(&state, selector, move |b, id| b.update_iothread(id, update)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Every VM with its state.
#[utoipa::path(get, path = "/api/v1/vms", tag = "vm",
    responses((status = 200, description = "The VMs, sorted by id", body = Vec<VmSummary>)))]
async fn vms(State(state): State<AppState>) -> Result<Json<Vec<VmSummary>>, ApiError> {
    blocking(&state, |b| Ok(b.list())).await.map(Json)
}

/// Per-disk and per-iothread counters of every VM in Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "vmm",
    responses((status = 200, description = "Prometheus text exposition format", body = String,
               content_type = "text/plain; version=0.0.4")))]
async fn prometheus(State(state): State<AppState>) -> Result<Response, ApiError> {
    let text = blocking(&state, |b| Ok(metrics::render(&b.all_counters()))).await?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// Events as they happen, one JSON object per line, until the client goes away or the
/// service stops.
#[utoipa::path(get, path = "/api/v1/events", tag = "vmm",
    responses((status = 200, description = "A never-ending stream of events, one JSON object per \
        line (`{\"time\", \"vm\", \"event\", ...}`)", body = Event,
        content_type = "application/x-ndjson")))]
async fn events(State(state): State<AppState>) -> Response {
    event_stream(&state.events, state.shutdown.subscribe())
}

/// `bus`'s events as an ndjson response that ends when `stop` turns true.
pub(crate) fn event_stream(bus: &EventBus, stop: watch::Receiver<bool>) -> Response {
    use futures_util::StreamExt;
    let (early, rx) = bus.subscribe();
    let early = futures_util::stream::iter(
        early
            .iter()
            .map(|e| Ok::<_, std::convert::Infallible>(e.line()))
            .collect::<Vec<_>>(),
    );
    let stream = early.chain(futures_util::stream::unfold(
        (rx, stop, false),
        |(mut rx, mut stop, done)| async move {
            use tokio::sync::broadcast::error::{RecvError, TryRecvError};
            if done {
                return None;
            }
            let next = tokio::select! {
                biased;
                r = rx.recv() => Some(r),
                _ = stop.wait_for(|s| *s) => None,
            };
            let event = match next {
                Some(Ok(e)) => e,
                Some(Err(RecvError::Lagged(n))) => {
                    Event::now("", EventKind::Lagged).with("missed", n)
                }
                Some(Err(RecvError::Closed)) => return None,
                None => {
                    // Stopping: what was sent before still goes out, then the stream ends.
                    let mut rest = String::new();
                    loop {
                        match rx.try_recv() {
                            Ok(e) => rest.push_str(&e.line()),
                            Err(TryRecvError::Lagged(_)) => {}
                            Err(_) => break,
                        }
                    }
                    return Some((Ok::<_, std::convert::Infallible>(rest), (rx, stop, true)));
                }
            };
            Some((Ok(event.line()), (rx, stop, false)))
        },
    ));
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

pub(crate) async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!("no endpoint {} {}", req.method(), req.uri().path()))
}

pub(crate) async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        ErrorKind::MethodNotAllowed,
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "vmmd",
        description = "Manage VMs with virtio-blk disks on iothreads. \
        VM-scoped calls name the VM with ?id= (optional when exactly one VM exists). \
        Errors are {\"error\", \"details\"}."
    ),
    components(schemas(ErrorBody, VmState))
)]
struct ApiDoc;

fn openapi_router() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(ping))
        .routes(routes!(vmm_shutdown))
        .routes(routes!(vm_create))
        .routes(routes!(vm_boot))
        .routes(routes!(vm_pause))
        .routes(routes!(vm_resume))
        .routes(routes!(vm_shutdown))
        .routes(routes!(vm_reboot))
        .routes(routes!(vm_delete))
        .routes(routes!(vm_info))
        .routes(routes!(vm_counters))
        .routes(routes!(vm_add_disk))
        .routes(routes!(vm_remove_device))
        .routes(routes!(vm_update_disk))
        .routes(routes!(vm_update_iothread))
        .routes(routes!(crate::job_routes::vm_disk_mirror))
        .routes(routes!(crate::job_routes::vm_jobs))
        .routes(routes!(crate::job_routes::vm_job_complete))
        .routes(routes!(crate::job_routes::vm_job_cancel))
        .routes(routes!(crate::job_routes::vm_job_set_speed))
        .routes(routes!(vms))
        .routes(routes!(prometheus))
        .routes(routes!(events))
}

/// The service's routes over `state`.
pub fn router(state: AppState) -> axum::Router {
    let (router, _) = openapi_router().split_for_parts();
    router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// OpenAPI links (for clients, and for schemathesis' stateful phase, which follows them):
/// after a VM call answers `status`, the calls that may follow on the same VM, by operation
/// id. The VM is the `id` of the created config for `vm_create`, else the call's `?id=`. A
/// target ending in `*` also gets `{"id": <the added disk's id>}` as its body.
const VM_LINKS: &[(&str, &str, &[&str])] = &[
    (
        "vm_create",
        "204",
        &[
            "vm_info",
            "vm_counters",
            "vm_boot",
            "vm_add_disk",
            "vm_update_disk",
            "vm_update_iothread",
            "vm_remove_device",
            "vm_delete",
        ],
    ),
    // The id may be taken: that VM can be looked at or deleted.
    ("vm_create", "409", &["vm_info", "vm_delete"]),
    (
        "vm_boot",
        "204",
        &[
            "vm_info",
            "vm_counters",
            "vm_pause",
            "vm_reboot",
            "vm_shutdown",
            "vm_add_disk",
            "vm_update_disk",
            "vm_update_iothread",
            "vm_remove_device",
        ],
    ),
    (
        "vm_pause",
        "204",
        &[
            "vm_info",
            "vm_resume",
            "vm_shutdown",
            "vm_add_disk",
            "vm_update_disk",
            "vm_remove_device",
        ],
    ),
    (
        "vm_resume",
        "204",
        &["vm_info", "vm_pause", "vm_reboot", "vm_shutdown"],
    ),
    (
        "vm_reboot",
        "204",
        &["vm_info", "vm_counters", "vm_shutdown"],
    ),
    (
        "vm_shutdown",
        "204",
        &[
            "vm_info",
            "vm_boot",
            "vm_delete",
            "vm_add_disk",
            "vm_update_disk",
            "vm_remove_device",
        ],
    ),
    (
        "vm_add_disk",
        "204",
        &[
            "vm_info",
            "vm_counters",
            "vm_update_disk*",
            "vm_remove_device*",
        ],
    ),
];

/// Adds [`VM_LINKS`] to the responses of `api`'s PUT operations.
fn add_links(api: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::RefOr;
    use utoipa::openapi::link::Link;

    for item in api.paths.paths.values_mut() {
        let Some(op) = item.put.as_mut() else {
            continue;
        };
        let Some(source) = op.operation_id.clone() else {
            continue;
        };
        let vm = if source == "vm_create" {
            "$request.body#/id"
        } else {
            "$request.query.id"
        };
        for (_, status, targets) in VM_LINKS.iter().filter(|(s, _, _)| *s == source) {
            let Some(RefOr::T(response)) = op.responses.responses.get_mut(*status) else {
                continue;
            };
            for target in *targets {
                let (target, with_disk) = match target.strip_suffix('*') {
                    Some(t) => (t, true),
                    None => (*target, false),
                };
                let mut link = Link::builder()
                    .operation_id(target)
                    .parameter("id", vm)
                    .description(if with_disk {
                        "The same VM and disk"
                    } else {
                        "The same VM"
                    });
                if with_disk {
                    link = link.request_body(Some(serde_json::json!({"id": "$request.body#/id"})));
                }
                let name = target.strip_prefix("vm_").unwrap_or(target);
                response
                    .links
                    .insert(name.to_string(), RefOr::T(link.build()));
            }
        }
    }
}

/// The OpenAPI description of the service, as YAML (what `openapi.yaml` holds).
pub fn openapi_yaml() -> Result<String, String> {
    let (_, mut api) = openapi_router().split_for_parts();
    api.info.version = env!("CARGO_PKG_VERSION").to_string();
    add_links(&mut api);
    api.to_yaml()
        .map(|yaml| camel_case_links(&yaml))
        .map_err(|e| e.to_string())
}

/// utoipa 5.5 writes a Link's `operationId` and `requestBody` in snake case (its `Link`
/// lacks serde's `rename_all = "camelCase"`); renames those keys inside `links:` maps.
fn camel_case_links(yaml: &str) -> String {
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut out = String::with_capacity(yaml.len());
    let mut links_at: Option<usize> = None;
    for line in yaml.lines() {
        if links_at.is_some_and(|at| !line.trim().is_empty() && indent(line) <= at) {
            links_at = None;
        }
        let mut line = line.to_string();
        if links_at.is_some() {
            for (snake, camel) in [
                ("operation_id:", "operationId:"),
                ("request_body:", "requestBody:"),
            ] {
                if line.trim_start().starts_with(snake) {
                    line = line.replacen(snake, camel, 1);
                }
            }
        } else if line.trim() == "links:" {
            links_at = Some(indent(&line));
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// Serves `router` on `unix` (and `tcp` if given) until `shutdown` turns true.
pub async fn serve(
    router: axum::Router,
    unix: tokio::net::UnixListener,
    tcp: Option<tokio::net::TcpListener>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let stop = |mut rx: watch::Receiver<bool>| async move {
        // An error means the sender is gone: stop too.
        let _ = rx.wait_for(|s| *s).await;
    };
    let tcp_task = tcp.map(|listener| {
        let router = router.clone();
        let rx = shutdown.clone();
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(stop(rx))
                .await
        })
    });
    axum::serve(unix, router)
        .with_graceful_shutdown(stop(shutdown))
        .await?;
    if let Some(task) = tcp_task {
        task.await.map_err(std::io::Error::other)??;
    }
    Ok(())
}
