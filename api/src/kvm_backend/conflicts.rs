//! Who in the service holds a file that a VM could not take. The locks themselves decide
//! (images and serial files carry OFD locks, a serial socket is refused while someone
//! listens on it): race-free and also against programs outside the service. This only
//! turns such a refusal into a message naming the VM and disk or console that holds the
//! file.

use std::path::Path;

use devices::virtio_blk::device::DeviceError;
use vmm::config::{VmConfig, same_file};
use vmm::serial::SerialError;
use vmm::vm::VmError;

use crate::backend::ApiError;

/// What of `others` uses `path`: "VM a (disk d0, writable)" or "the serial output of VM
/// b".
fn holder(others: &[VmConfig], path: &Path) -> Option<String> {
    others.iter().find_map(|vm| {
        if let Some(d) = vm
            .disks
            .iter()
            .find(|d| d.host_path().is_some_and(|p| same_file(p, path)))
        {
            let how = if d.readonly { "read-only" } else { "writable" };
            return Some(format!("VM {} (disk {}, {how})", vm.id, d.id));
        }
        vm.serial
            .host_path()
            .filter(|p| *p == path || same_file(p, path))
            .map(|_| format!("the serial output of VM {}", vm.id))
    })
}

/// The 409 for `e` on VM `id` when it is a file another user holds, naming that user
/// among `others`; `None` for any other error.
pub(super) fn explain(id: &str, e: &VmError, others: &[VmConfig]) -> Option<ApiError> {
    let (what, path, locked) = match e {
        VmError::Disk {
            id: disk,
            source: DeviceError::Disk(block::Error::Locked { path, .. }),
        } => (
            format!("image {} of disk {disk}", path.display()),
            path,
            true,
        ),
        VmError::Serial(SerialError::InUse { path }) => {
            (format!("serial.path {}", path.display()), path, true)
        }
        VmError::Serial(SerialError::SocketInUse { path }) => {
            (format!("serial.path {}", path.display()), path, false)
        }
        _ => return None,
    };
    match holder(others, path) {
        Some(h) => Some(ApiError::conflict(format!(
            "VM {id}: {what} is in use by {h}"
        ))),
        // A socket's own message already says that a process listens there.
        None if !locked => None,
        None => Some(ApiError::conflict(format!(
            "VM {id}: {what} is held by a program outside this service (no VM here uses \
             it); a writable image or a console file can be open only once"
        ))),
    }
}
