//! What `/proc` says about a process, for tests.

use std::path::Path;

/// Whether process `pid` has `path` open (one of its descriptors links to it).
pub fn holds(pid: u32, path: &Path) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|d| {
        d.flatten()
            .any(|e| std::fs::read_link(e.path()).is_ok_and(|p| p == path))
    })
}

/// Whether this process has `path` open.
pub fn self_holds(path: &Path) -> bool {
    holds(std::process::id(), path)
}
