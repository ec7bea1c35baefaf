//! The REST service and its CLI. Lands with issue 5.

pub use vmm;
