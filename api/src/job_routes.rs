//! The block job endpoints: `PUT vm.disk-mirror`,
//! `GET vm.jobs`, `PUT vm.job-complete`, `PUT vm.job-cancel`, `PUT vm.job-set-speed`.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use block::jobs::JobInfo;
use devices::mirror::MirrorConfig;

use crate::backend::{ApiError, ErrorBody, JobCancel, JobRef, JobSpeed};
use crate::server::{AppState, JsonBody, VmSelector, on_vm};

/// Starts a live mirror of a disk (storage migration): the disk is copied to the target
/// while the guest runs, on the disk's own iothread; guest writes are tracked and copied
/// again (`background`) or written to both (`write-blocking`). The job is `ready` once
/// everything was copied; `vm.job-complete` then switches the disk to the target. A
/// missing local target is created with the disk's size; an existing one must be at
/// least that big. At most one running job per disk.
#[utoipa::path(put, path = "/api/v1/vm.disk-mirror", tag = "jobs", params(VmSelector),
    request_body(content = MirrorConfig, description = "What to mirror where", content_type = "application/json",
        examples(
            ("local" = (summary = "To a new local raw image",
                value = json!({"job_id": "m0", "disk": "disk0", "target": {"path": "/var/lib/vm1/new.raw"}}))),
            ("nbd" = (summary = "To an NBD server on another host, at most 100 MiB/s, converging whatever the guest writes",
                value = json!({"job_id": "m1", "disk": "disk0", "target": {"path": "nbd://10.0.0.2/disk0"},
                    "speed": 104857600, "copy_mode": "write-blocking"})))
        )),
    responses((status = 200, description = "Started: the job as it starts", body = JobInfo),
              (status = 400, description = "Invalid settings or an unusable target (too small, the disk's own image, read-only)", body = ErrorBody),
              (status = 403, description = "A target outside the directories the service may use (vmmd --allowed-dir)", body = ErrorBody),
              (status = 404, description = "Unknown VM or disk", body = ErrorBody),
              (status = 409, description = "The disk has a running job, the job id runs, the VM is not running, or the target is in use", body = ErrorBody),
              (status = 413, description = "Body too large", body = ErrorBody)))]
pub(crate) async fn vm_disk_mirror(
    State(state): State<AppState>,
    selector: VmSelector,
    JsonBody(mut config): JsonBody<MirrorConfig>,
) -> Result<Json<JobInfo>, ApiError> {
    let rules = state.rules.clone();
    on_vm(&state, selector, move |b, id| {
        rules.check_mirror_target(&mut config.target)?;
        b.disk_mirror(id, config)
    })
    .await
    .map(Json)
}

/// A VM's block jobs, running and finished (the last 16 finished ones), with their
/// progress: `bytes_done`, `bytes_total` (grows while the guest dirties more),
/// `dirty_bytes` (waiting to be copied) and `rate` (bytes/s).
#[utoipa::path(get, path = "/api/v1/vm.jobs", tag = "jobs", params(VmSelector),
    responses((status = 200, description = "The jobs, oldest first", body = Vec<JobInfo>),
              (status = 400, description = "Invalid query", body = ErrorBody),
              (status = 404, description = "Unknown VM", body = ErrorBody)))]
pub(crate) async fn vm_jobs(
    State(state): State<AppState>,
    selector: VmSelector,
) -> Result<Json<Vec<JobInfo>>, ApiError> {
    on_vm(&state, selector, |b, id| b.jobs(id)).await.map(Json)
}

/// Completes a ready mirror: the guest's requests pause for a moment while the last
/// dirty chunks are copied and the target flushed, then the disk uses the target (its
/// cache mode and aio unchanged) and the old image is closed. Returns once done.
#[utoipa::path(put, path = "/api/v1/vm.job-complete", tag = "jobs", params(VmSelector),
    request_body(content = JobRef, description = "The job", content_type = "application/json",
        example = json!({"job_id": "m0"})),
    responses((status = 204, description = "Pivoted: the disk uses the target"),
              (status = 400, description = "Invalid body", body = ErrorBody),
              (status = 404, description = "Unknown VM or job", body = ErrorBody),
              (status = 409, description = "The job is not ready", body = ErrorBody),
              (status = 500, description = "The last copy or the pivot failed (the job says why)", body = ErrorBody)))]
pub(crate) async fn vm_job_complete(
    State(state): State<AppState>,
    selector: VmSelector,
    JsonBody(job): JsonBody<JobRef>,
) -> Result<StatusCode, ApiError> {
    on_vm(&state, selector, move |b, id| b.job_complete(id, job)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Cancels a job; the disk stays on its image. In ready (without `force`) the target
/// is first made a consistent copy of the disk at this moment; before ready it is left
/// partial.
#[utoipa::path(put, path = "/api/v1/vm.job-cancel", tag = "jobs", params(VmSelector),
    request_body(content = JobCancel, description = "The job", content_type = "application/json",
        example = json!({"job_id": "m0", "force": false})),
    responses((status = 204, description = "Cancelled"),
              (status = 400, description = "Invalid body", body = ErrorBody),
              (status = 404, description = "Unknown VM or job", body = ErrorBody),
              (status = 409, description = "The job is over already", body = ErrorBody)))]
pub(crate) async fn vm_job_cancel(
    State(state): State<AppState>,
    selector: VmSelector,
    JsonBody(job): JsonBody<JobCancel>,
) -> Result<StatusCode, ApiError> {
    on_vm(&state, selector, move |b, id| b.job_cancel(id, job)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Changes a running job's speed limit at once (bytes/s, 0: unlimited).
#[utoipa::path(put, path = "/api/v1/vm.job-set-speed", tag = "jobs", params(VmSelector),
    request_body(content = JobSpeed, description = "The job and its new limit", content_type = "application/json",
        example = json!({"job_id": "m0", "speed": 52428800})),
    responses((status = 204, description = "Changed"),
              (status = 400, description = "Invalid body", body = ErrorBody),
              (status = 404, description = "Unknown VM or job", body = ErrorBody),
              (status = 409, description = "The job is over", body = ErrorBody)))]
pub(crate) async fn vm_job_set_speed(
    State(state): State<AppState>,
    selector: VmSelector,
    JsonBody(job): JsonBody<JobSpeed>,
) -> Result<StatusCode, ApiError> {
    on_vm(&state, selector, move |b, id| b.job_set_speed(id, job)).await?;
    Ok(StatusCode::NO_CONTENT)
}
