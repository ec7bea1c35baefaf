//! One VM on KVM: configuration, guest memory, vCPUs, boot, ACPI, PCI and device wiring.

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod config;
pub mod kvm;
pub mod memory;
pub mod serial;
pub mod vm;

pub use devices;

/// Returns true when `/dev/kvm` can be opened by this process.
pub fn kvm_available() -> bool {
    kvm_ioctls::Kvm::new().is_ok()
}
