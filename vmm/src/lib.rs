//! One VM on KVM: memory, vCPUs, boot and device wiring. Lands with issue 4.

pub use devices;

/// Returns true when `/dev/kvm` can be opened by this process.
pub fn kvm_available() -> bool {
    kvm_ioctls::Kvm::new().is_ok()
}
