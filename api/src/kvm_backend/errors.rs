//! How a failure of the VMM becomes an API error: the client's mistakes are 4xx, the
//! host's momentary limits (file descriptors, memory, hugepages, threads) are 503 with
//! what ran out, and only what is left is a 500.

use devices::virtio_blk::device::DeviceError;
use vmm::serial::SerialError;
use vmm::vm::VmError;

use crate::backend::ApiError;

/// The errno of the first OS error in `e`'s chain of causes, if any.
pub(crate) fn host_errno(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(n) = io.raw_os_error()
        {
            return Some(n);
        }
        if let Some(errno) = err.downcast_ref::<vmm_sys_util::errno::Error>() {
            return Some(errno.errno());
        }
        cur = err.source();
    }
    None
}

/// The 503 for a host resource that ran out (`errno`), or `None` when `errno` is not one.
pub(crate) fn host_limit(context: &str, errno: i32) -> Option<ApiError> {
    let what = match errno {
        libc::EMFILE => {
            "the service has run out of file descriptors (EMFILE); raise its limit \
             (LimitNOFILE=, ulimit -n) or run fewer disks"
        }
        libc::ENFILE => "the host has run out of file descriptors (ENFILE)",
        libc::ENOMEM => "the host is out of memory (ENOMEM)",
        libc::EAGAIN => "the host refused another thread or process (EAGAIN)",
        libc::ENOSPC => "the host ran out of a kernel resource (ENOSPC)",
        _ => return None,
    };
    Some(ApiError::unavailable(format!(
        "{context}: {what}; try again later"
    )))
}

/// The API error of a failed VM build or VM operation on VM `id`.
pub(crate) fn vm_error(id: &str, e: VmError) -> ApiError {
    let msg = format!("VM {id}: {e}");
    let errno = host_errno(&e);
    if errno == Some(libc::ELOOP) && block::host_file::symlinks_forbidden() {
        return ApiError::forbidden(format!(
            "{msg} (a path has a symbolic link; this service follows none: vmmd --allowed-dir)"
        ));
    }
    // Invalid input and conflicts first: their OS errors (ENOENT, EACCES) are the client's.
    let client = match &e {
        VmError::Config(_) | VmError::Boot(_) => {
            Some(ApiError::bad_request("invalid VM config").with_details(vec![msg.clone()]))
        }
        VmError::Serial(SerialError::InUse { .. } | SerialError::SocketInUse { .. }) => {
            Some(ApiError::conflict(msg.clone()))
        }
        VmError::Serial(SerialError::EventFd(_)) => None,
        VmError::Serial(_) => {
            Some(ApiError::bad_request("invalid serial output").with_details(vec![msg.clone()]))
        }
        VmError::Disk {
            source: DeviceError::Disk(block::Error::Locked { .. }),
            ..
        } => Some(ApiError::conflict(msg.clone())),
        VmError::Disk {
            source: DeviceError::Disk(block::Error::SymlinkRefused { .. }),
            ..
        } => Some(ApiError::forbidden(msg.clone())),
        VmError::Disk {
            source:
                DeviceError::Config(_)
                | DeviceError::Throttle { .. }
                | DeviceError::Disk(
                    block::Error::Open { .. }
                    | block::Error::NotADisk { .. }
                    | block::Error::Image { .. }
                    | block::Error::DirectNotSupported { .. }
                    | block::Error::NativeNeedsDirect { .. }
                    | block::Error::InvalidOption(_)
                    | block::Error::Nbd(
                        block::nbd::NbdOpenError::Uri(_)
                        | block::nbd::NbdOpenError::Connect { .. }
                        | block::nbd::NbdOpenError::Export { .. },
                    ),
                ),
            ..
        } => Some(ApiError::bad_request("invalid disk").with_details(vec![msg.clone()])),
        VmError::State { .. } => Some(ApiError::conflict(msg.clone())),
        _ => None,
    };
    // An image that cannot be opened for lack of descriptors is the host's limit.
    let host = errno.and_then(|n| host_limit(&format!("VM {id}"), n));
    match (client, host) {
        (Some(c), None) => c,
        (_, Some(h)) => h.with_details(vec![msg]),
        (None, None) => match &e {
            VmError::Memory(vmm::memory::MemoryError::NoHugepages { .. }) => ApiError::unavailable(
                format!("VM {id}: the host's reserved hugepages are in use; try again later"),
            )
            .with_details(vec![msg]),
            VmError::Kvm(
                vmm::kvm::KvmError::Open { .. }
                | vmm::kvm::KvmError::ApiVersion(_)
                | vmm::kvm::KvmError::MissingCap(_),
            ) => ApiError::conflict(format!("KVM is not usable on this host: {e}")),
            _ => ApiError::internal(msg),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_limits_are_503_and_client_errors_stay_4xx() {
        let emfile = VmError::IoThread {
            id: "io0".into(),
            source: std::io::Error::from_raw_os_error(libc::EMFILE),
        };
        let e = vm_error("a", emfile);
        assert_eq!(e.kind.status(), 503, "{e:?}");
        assert!(e.message.contains("file descriptors"), "{e:?}");

        let kvm = VmError::Kvm(vmm::kvm::KvmError::Ioctl {
            op: "KVM_CREATE_VM",
            source: vmm_sys_util::errno::Error::new(libc::ENOMEM),
        });
        assert_eq!(vm_error("a", kvm).kind.status(), 503);

        let huge = VmError::Memory(vmm::memory::MemoryError::NoHugepages {
            needed: 32,
            free: 0,
        });
        let e = vm_error("a", huge);
        assert_eq!(e.kind.status(), 503);
        assert!(e.message.contains("hugepages"), "{e:?}");

        let missing = VmError::Disk {
            id: "d0".into(),
            source: DeviceError::Disk(block::Error::Open {
                path: "/nope".into(),
                source: std::io::Error::from_raw_os_error(libc::ENOENT),
            }),
        };
        assert_eq!(vm_error("a", missing).kind.status(), 400);
        // Opening an image that fails for lack of descriptors is the host's limit.
        let fds = VmError::Disk {
            id: "d0".into(),
            source: DeviceError::Disk(block::Error::Open {
                path: "/img".into(),
                source: std::io::Error::from_raw_os_error(libc::EMFILE),
            }),
        };
        assert_eq!(vm_error("a", fds).kind.status(), 503);
        let other = VmError::Device("something odd".into());
        assert_eq!(vm_error("a", other).kind.status(), 500);
    }
}
