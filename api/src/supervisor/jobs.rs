//! Block jobs of VMs in their own processes: vmmd prepares a local mirror target (it
//! creates a missing one with the disk's size, as the sandboxed process may not) and
//! hands its descriptor over, then routes the call; a pivot changes vmmd's config once
//! the process took it. A VM without a running process has no jobs.

use std::io::{Seek, SeekFrom};
use std::path::Path;

use block::jobs::JobInfo;
use block::jobs::target::{Prepared, prepare_local_target};
use devices::config::DiskConfig;
use devices::mirror::MirrorConfig;

use super::{Managed, ProcessBackend, clash};
use crate::backend::{ApiError, ErrorKind, JobCancel, JobRef, JobSpeed};

/// The size of the image at `path` (a regular file or a block device).
fn image_size(path: &Path) -> std::io::Result<u64> {
    std::fs::File::open(path)?.seek(SeekFrom::End(0))
}

fn body<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(value).map_err(|e| ApiError::internal(e.to_string()))
}

impl ProcessBackend {
    /// Creates (when missing) and hands over the local target of `config` for `disk`;
    /// returns whether it created the file.
    fn prepare_target(
        &self,
        m: &Managed,
        disk: &DiskConfig,
        config: &MirrorConfig,
    ) -> Result<bool, ApiError> {
        let Some(target) = devices::mirror::local_target(config) else {
            return Ok(false);
        };
        let invalid = |msg: String| ApiError::bad_request("invalid mirror").with_details(vec![msg]);
        let mut created = false;
        if !target.exists() {
            let Some(source) = disk.host_path() else {
                return Err(invalid(format!(
                    "target {} does not exist, and the size of disk {} (not a local image) is unknown to the service: create the target first",
                    target.display(),
                    disk.id
                )));
            };
            let about = |e: String| invalid(format!("disk {}: {}: {e}", disk.id, source.display()));
            // A qcow2 disk's size is its header's; a `sync: top` target gets its backing
            // file.
            let (size, backing) = match disk.format {
                block::ImageFormat::Raw => {
                    (image_size(source).map_err(|e| about(e.to_string()))?, None)
                }
                block::ImageFormat::Qcow2 => {
                    let (info, chain) = block::qcow2::header::inspect(source).map_err(about)?;
                    let format = info.backing.as_ref().and_then(|(_, f)| f.parse().ok());
                    (info.size, chain.into_iter().next().zip(format))
                }
            };
            let backing = backing.filter(|_| config.sync == block::jobs::SyncMode::Top);
            if config.sync == block::jobs::SyncMode::Top && backing.is_none() {
                return Err(invalid(format!(
                    "sync \"top\" copies the top layer of a qcow2 disk with a backing file; disk {} has none: use \"full\"",
                    disk.id
                )));
            }
            created = prepare_local_target(
                target,
                Some(source),
                size,
                config.target.format,
                backing.as_ref().map(|(p, f)| (p.as_path(), *f)),
            )
            .map_err(|e| invalid(e.to_string()))?
                == Prepared::Created;
        }
        let mut as_disk = disk.clone();
        as_disk.path = target.to_path_buf();
        as_disk.format = config.target.format;
        as_disk.readonly = false;
        if let Err(e) = self.hand_over_image(m, &as_disk) {
            if created {
                let _ = std::fs::remove_file(target);
            }
            return Err(e);
        }
        Ok(created)
    }

    pub(super) fn mirror_disk(&self, id: &str, config: MirrorConfig) -> Result<JobInfo, ApiError> {
        let others = self.other_configs(id);
        self.route(
            id,
            |m, live| {
                let disk = m
                    .status()
                    .config
                    .disks
                    .iter()
                    .find(|d| d.id == config.disk)
                    .cloned()
                    .ok_or_else(|| {
                        ApiError::not_found(format!("VM {id} has no disk {:?}", config.disk))
                    })?;
                config
                    .validate()
                    .map_err(|e| ApiError::bad_request("invalid mirror").with_details(e))?;
                // Another VM's image (running or not) is not a target.
                let mut as_disk = disk.clone();
                as_disk.path.clone_from(&config.target.path);
                as_disk.readonly = false;
                if let Some(e) = clash(id, [&as_disk], None, &others) {
                    return Err(e);
                }
                let created = if self.shared.opts.fake {
                    false
                } else {
                    self.prepare_target(m, &disk, &config)?
                };
                // The one path change of this disk its process may report by itself.
                m.status().pivots.insert(
                    disk.id.clone(),
                    (config.target.path.clone(), config.target.format),
                );
                let sent = self.forward(
                    m,
                    live,
                    "PUT",
                    "/api/v1/vm.disk-mirror",
                    Some(body(&config)?),
                );
                match sent {
                    Ok(reply) => serde_json::from_slice(&reply.body)
                        .map_err(|e| ApiError::internal(format!("VM {id}: unreadable job: {e}"))),
                    Err(e) => {
                        // Refused by the process: no job uses the target. (After a
                        // timeout one may: the file and the pivot stay known.)
                        let refused = matches!(
                            e.kind,
                            ErrorKind::BadRequest | ErrorKind::NotFound | ErrorKind::Conflict
                        );
                        if refused {
                            m.status().pivots.remove(&disk.id);
                            if created {
                                let _ = std::fs::remove_file(&config.target.path);
                            }
                        }
                        Err(e)
                    }
                }
            },
            |m| Err(m.not_running("mirror a disk of")),
        )
    }

    pub(super) fn list_jobs(&self, id: &str) -> Result<Vec<JobInfo>, ApiError> {
        self.route(
            id,
            |m, live| {
                let reply = self.forward(m, live, "GET", "/api/v1/vm.jobs", None)?;
                serde_json::from_slice(&reply.body)
                    .map_err(|e| ApiError::internal(format!("VM {id}: unreadable jobs: {e}")))
            },
            |_| Ok(Vec::new()),
        )
    }

    pub(super) fn complete_job(&self, id: &str, job: &JobRef) -> Result<(), ApiError> {
        self.route(
            id,
            |m, live| {
                let reply = self.forward(m, live, "GET", "/api/v1/vm.jobs", None)?;
                let jobs: Vec<JobInfo> = serde_json::from_slice(&reply.body)
                    .map_err(|e| ApiError::internal(format!("VM {id}: unreadable jobs: {e}")))?;
                let info = jobs
                    .into_iter()
                    .find(|j| j.id == job.job_id)
                    .ok_or_else(|| {
                        ApiError::not_found(format!("VM {id} has no job {}", job.job_id))
                    })?;
                // The target's format, as vmmd let the job make or open it.
                let pivot = m.status().pivots.get(&info.disk).cloned();
                let result = self.change(m, live, "/api/v1/vm.job-complete", body(job)?, |c| {
                    // The disk uses the target from now on (a reboot keeps it).
                    if let Some(d) = c.disks.iter_mut().find(|d| d.id == info.disk) {
                        d.path = info.target.clone().into();
                        if let Some((path, format)) = &pivot
                            && *path == d.path
                        {
                            d.format = *format;
                        }
                    }
                    Ok(())
                });
                if result.is_err() {
                    // A pivot that happened all the same (a late answer, a failure after
                    // the switch) is read back: the process reports the disk on its
                    // target, which vmmd let it use.
                    self.live_info(m, live, super::CALL_TIMEOUT);
                }
                result
            },
            |m| Err(m.not_running("complete a job of")),
        )
    }

    pub(super) fn cancel_job(&self, id: &str, job: &JobCancel) -> Result<(), ApiError> {
        self.route(
            id,
            |m, live| {
                self.forward(m, live, "PUT", "/api/v1/vm.job-cancel", Some(body(job)?))
                    .map(drop)
            },
            |m| Err(m.not_running("cancel a job of")),
        )
    }

    pub(super) fn set_job_speed(&self, id: &str, job: &JobSpeed) -> Result<(), ApiError> {
        self.route(
            id,
            |m, live| {
                self.forward(m, live, "PUT", "/api/v1/vm.job-set-speed", Some(body(job)?))
                    .map(drop)
            },
            |m| Err(m.not_running("change a job of")),
        )
    }
}
