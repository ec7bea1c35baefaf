//! KVM core: capability checks, the VM (memory slots, irqchip, ioeventfd, irqfd, MSI
//! routing), vCPUs in 64-bit long mode (CPUID, MSRs, FPU, LAPIC, GDT, page tables) and the
//! per-vCPU run loop with pause/resume.
//!
//! This module knows nothing about buses or devices: the run loop hands every PIO/MMIO
//! exit to a caller-provided [`ExitHandler`].

pub mod cpuid;
pub mod long_mode;
pub mod runner;
pub mod vcpu;
pub mod vm;

pub use kvm_ioctls::{IoEventAddress, Kvm};
pub use long_mode::EntryMode;
pub use runner::{ExitAction, ExitHandler, VcpuEvent, VcpuExitReason, VcpuHandle, VcpuState};
pub use vcpu::{Vcpu, VcpuInitRegs};
pub use vm::{Datamatch, Vm};

use kvm_ioctls::Cap;

/// Errors of the KVM core.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// The KVM device node could not be opened.
    #[error("cannot open {path} ({source}); is KVM enabled and is this user in the kvm group?")]
    Open {
        /// The device path.
        path: String,
        /// Why it failed.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The running kernel's KVM API version is not the stable one (12).
    #[error("unsupported KVM API version {0} (expected 12)")]
    ApiVersion(i32),
    /// A capability the VMM needs is missing.
    #[error("KVM lacks the required capability {0}")]
    MissingCap(&'static str),
    /// A KVM ioctl failed.
    #[error("KVM ioctl {op} failed: {source}")]
    Ioctl {
        /// Which operation failed.
        op: &'static str,
        /// The errno it failed with.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Writing boot structures into guest memory failed.
    #[error("guest memory write at {addr:#x} failed: {msg}")]
    GuestMemory {
        /// Guest physical address of the failed write.
        addr: u64,
        /// What went wrong.
        msg: String,
    },
    /// An argument was out of range (GSI, vCPU id, MSR count, ...).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The vCPU failed to enter the guest (`KVM_EXIT_FAIL_ENTRY`).
    #[error("vCPU {cpu} failed to enter guest: hardware reason {reason:#x}")]
    FailEntry {
        /// Hardware entry failure reason.
        reason: u64,
        /// The CPU that failed.
        cpu: u32,
    },
    /// KVM reported an internal error (`KVM_EXIT_INTERNAL_ERROR`), e.g. an instruction its
    /// emulator cannot handle.
    #[error("KVM internal error in vCPU {vcpu}: suberror {suberror} at rip {rip:#x}")]
    InternalError {
        /// vCPU index.
        vcpu: u32,
        /// KVM's suberror code (1: emulation failure).
        suberror: u32,
        /// Guest RIP when it happened (0 when unknown).
        rip: u64,
    },
    /// An exit this VMM does not handle.
    #[error("vCPU {vcpu}: unexpected exit {what}")]
    UnexpectedExit {
        /// vCPU index.
        vcpu: u32,
        /// Debug text of the exit.
        what: String,
    },
    /// Spawning or signalling a vCPU thread failed.
    #[error("vCPU thread: {0}")]
    Thread(String),
}

/// Shorthand for results of this module.
pub type Result<T> = std::result::Result<T, KvmError>;

/// Builds a `map_err` closure that names the failed ioctl.
pub(crate) fn ioctl_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmError {
    move |source| KvmError::Ioctl { op, source }
}

/// Capabilities the VMM cannot run without, with their names for error messages.
pub const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::SetIdentityMapAddr, "KVM_CAP_SET_IDENTITY_MAP_ADDR"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::IrqRouting, "KVM_CAP_IRQ_ROUTING"),
    (Cap::SignalMsi, "KVM_CAP_SIGNAL_MSI"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

/// Opens `/dev/kvm` and checks the API version and every capability in [`REQUIRED_CAPS`].
pub fn open_kvm() -> Result<Kvm> {
    open_kvm_at(c"/dev/kvm")
}

/// Opens a KVM device node at `path` (tests, containers with another path) and checks it.
pub fn open_kvm_at(path: &std::ffi::CStr) -> Result<Kvm> {
    let kvm = Kvm::new_with_path(path).map_err(|source| KvmError::Open {
        path: path.to_string_lossy().into_owned(),
        source,
    })?;
    check_kvm(&kvm)?;
    Ok(kvm)
}

/// Checks the API version and every capability in [`REQUIRED_CAPS`] on an open `Kvm`.
pub fn check_kvm(kvm: &Kvm) -> Result<()> {
    let version = kvm.get_api_version();
    if i64::from(version) != i64::from(kvm_bindings::KVM_API_VERSION) {
        return Err(KvmError::ApiVersion(version));
    }
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(*cap) {
            return Err(KvmError::MissingCap(name));
        }
    }
    Ok(())
}
