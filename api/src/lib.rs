//! The REST service (`vmmd`) and its CLI (`vmctl`); the design is in docs/architecture.md.
//!
//! The service is written against [`backend::VmmBackend`]; [`kvm_backend::KvmBackend`]
//! runs real VMs on KVM (the default), [`fake::FakeVmm`] is an in-memory test double of
//! it (`vmmd --fake`). [`client`] is the Unix-socket HTTP
//! client shared by `vmctl` and the tests; [`tables`] are `vmctl`'s human tables.

pub mod backend;
pub mod client;
pub mod daemon;
pub mod disk_api;
pub mod events;
pub mod fake;
pub mod handover;
pub mod import;
pub mod job_routes;
pub mod kvm_backend;
pub mod metrics;
pub mod paths;
pub mod sandbox;
pub mod server;
pub mod supervisor;
pub mod tables;
pub mod vm_process;

pub use vmm;
