//! What one VM's config may not take from another VM of the service: a writable image
//! (or any image, for a writable disk), an image as serial output, another VM's serial
//! output. Checked before a VM is built, and used to say who holds an image when the
//! image lock refuses it.

use std::path::Path;

use devices::config::DiskConfig;
use vmm::config::{SerialMode, VmConfig, same_file};

use crate::backend::ApiError;

/// Who uses an image: the VM, the disk and whether it is writable.
pub(super) struct ImageUser {
    pub(super) vm: String,
    pub(super) disk: String,
    pub(super) writable: bool,
}

/// The first disk of `others` whose image is `path` and that cannot share it with a disk
/// opened `readonly` (writable on either side).
pub(super) fn image_user<'a>(
    others: impl IntoIterator<Item = &'a VmConfig>,
    path: &Path,
    readonly: bool,
) -> Option<ImageUser> {
    others.into_iter().find_map(|vm| {
        vm.disks
            .iter()
            .find(|d| {
                let shareable = d.readonly && readonly;
                !d.is_null() && !shareable && same_file(&d.path, path)
            })
            .map(|d| ImageUser {
                vm: vm.id.clone(),
                disk: d.id.clone(),
                writable: !d.readonly,
            })
    })
}

/// 409 for `disk` of VM `id` when another VM of the service holds its image or writes
/// its serial output there.
pub(super) fn disk_conflict<'a>(
    id: &str,
    disk: &DiskConfig,
    others: impl IntoIterator<Item = &'a VmConfig> + Clone,
) -> Result<(), ApiError> {
    if disk.is_null() {
        return Ok(());
    }
    if let Some(other) = others.clone().into_iter().find(|o| {
        o.serial.mode == SerialMode::File
            && o.serial
                .path
                .as_deref()
                .is_some_and(|p| same_file(p, &disk.path))
    }) {
        return Err(ApiError::conflict(format!(
            "VM {id}: image {} of disk {} is the serial output of VM {}",
            disk.path.display(),
            disk.id,
            other.id
        )));
    }
    match image_user(others, &disk.path, disk.readonly) {
        Some(u) => Err(ApiError::conflict(format!(
            "VM {id}: image {} of disk {} is in use by VM {} (disk {}{}); a writable image can be open only once",
            disk.path.display(),
            disk.id,
            u.vm,
            u.disk,
            if u.writable {
                ", writable"
            } else {
                ", read-only"
            }
        ))),
        None => Ok(()),
    }
}

/// 409 when `config`'s serial output is another VM's image or serial output, or one of
/// its disks is another VM's image.
pub(super) fn vm_conflicts<'a>(
    config: &VmConfig,
    others: impl IntoIterator<Item = &'a VmConfig> + Clone,
) -> Result<(), ApiError> {
    let id = &config.id;
    if let (SerialMode::File | SerialMode::Socket, Some(path)) =
        (config.serial.mode, &config.serial.path)
    {
        for other in others.clone() {
            if let Some(d) = other
                .disks
                .iter()
                .find(|d| !d.is_null() && same_file(&d.path, path))
            {
                return Err(ApiError::conflict(format!(
                    "VM {id}: serial.path {} is the image of disk {} of VM {}; serial output must go to a file of its own",
                    path.display(),
                    d.id,
                    other.id
                )));
            }
            if let Some(p) = &other.serial.path
                && (p == path || same_file(p, path))
            {
                return Err(ApiError::conflict(format!(
                    "VM {id}: serial.path {} is the serial output of VM {}",
                    path.display(),
                    other.id
                )));
            }
        }
    }
    for d in &config.disks {
        disk_conflict(id, d, others.clone())?;
    }
    Ok(())
}
