//! The request that starts a mirror (`PUT vm.disk-mirror`, `PUT disk.mirror`).

use std::path::PathBuf;

use block::jobs::dirty::DEFAULT_GRANULARITY;
use block::jobs::state::DEFAULT_BUFFER_SIZE;
use block::jobs::{CopyMode, MirrorOptions, SyncMode};
use serde::{Deserialize, Serialize};

use crate::config::check_id;

/// The image format of a mirror target: the disks' own ([`block::ImageFormat`]).
pub use block::ImageFormat as TargetFormat;

/// Where a mirror copies to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MirrorTarget {
    /// A local file or block device (created with the disk's size when missing), or an
    /// NBD URI (`nbd://host[:port]/export`, `nbd+unix:///export?socket=PATH`).
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub path: PathBuf,
    /// The target's format [raw]; a qcow2 target the job creates gets the disk's size
    /// (and with `sync: top`, the disk's backing file).
    #[serde(default)]
    pub format: TargetFormat,
}

impl MirrorTarget {
    /// Whether the target is an NBD server.
    pub fn is_nbd(&self) -> bool {
        self.path.to_str().is_some_and(block::nbd::is_nbd_uri)
    }
}

/// A mirror job's settings (`PUT vm.disk-mirror`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct MirrorConfig {
    /// The job's id [`mirror-<disk>`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// The disk to copy.
    pub disk: String,
    /// Where to copy it.
    pub target: MirrorTarget,
    /// What to copy [full].
    #[serde(default)]
    pub sync: SyncMode,
    /// How guest writes reach the target [background].
    #[serde(default)]
    pub copy_mode: CopyMode,
    /// Copy rate limit in bytes/s [0: unlimited].
    #[serde(default)]
    pub speed: u64,
    /// Bytes per dirty bit, a power of two from 4 KiB to 64 MiB [65536].
    #[serde(default = "default_granularity")]
    pub granularity: u64,
    /// Bytes being copied at once at most [16 MiB].
    #[serde(default = "default_buffer_size")]
    pub buffer_size: u64,
}

fn default_granularity() -> u64 {
    DEFAULT_GRANULARITY
}

fn default_buffer_size() -> u64 {
    DEFAULT_BUFFER_SIZE
}

impl MirrorConfig {
    /// The job's id (given, or `mirror-<disk>`).
    pub fn job_id(&self) -> String {
        self.job_id
            .clone()
            .unwrap_or_else(|| format!("mirror-{}", self.disk))
    }

    /// What a job per these settings on disk `disk` (of `size` bytes) shows at first, in
    /// `state`.
    pub fn job_info(
        &self,
        disk: &str,
        size: u64,
        state: block::jobs::JobState,
    ) -> block::jobs::JobInfo {
        let done = if state == block::jobs::JobState::Ready {
            size
        } else {
            0
        };
        block::jobs::JobInfo {
            id: self.job_id(),
            kind: "mirror".into(),
            disk: disk.to_string(),
            target: self.target.path.display().to_string(),
            state,
            bytes_done: done,
            bytes_total: size,
            dirty_bytes: 0,
            rate: 0,
            speed: self.speed,
            sync: self.sync,
            copy_mode: self.copy_mode,
            error: None,
        }
    }

    /// The copier's settings.
    pub fn options(&self) -> MirrorOptions {
        MirrorOptions {
            granularity: self.granularity,
            buffer_size: self.buffer_size,
            speed: self.speed,
            sync: self.sync,
            copy_mode: self.copy_mode,
        }
    }

    /// Checks what needs no disk; every message names its field.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut errors = Vec::new();
        if let Err(e) = check_id("job", &self.job_id()) {
            errors.push(format!("job_id: {e}"));
        }
        if self.disk.is_empty() {
            errors.push("disk: must name a disk".into());
        }
        if self.target.path.as_os_str().is_empty() {
            errors.push("target.path: must not be empty".into());
        } else if !self.target.is_nbd() && !self.target.path.is_absolute() {
            errors.push(format!(
                "target.path: {} must be an absolute path or an NBD URI",
                self.target.path.display()
            ));
        }
        if let Some(s) = self.target.path.to_str()
            && block::nbd::is_nbd_uri(s)
            && let Err(e) = s.parse::<block::nbd::NbdUri>()
        {
            errors.push(format!("target.path: {e}"));
        }
        if self.target.format == TargetFormat::Qcow2 && self.target.is_nbd() {
            errors.push(
                "target.format: an NBD target is raw (the server serves the disk's bytes)".into(),
            );
        }
        if self.sync == SyncMode::Top && self.target.format != TargetFormat::Qcow2 {
            errors.push(
                "sync: \"top\" copies only the disk's top layer, so the target must be qcow2 (it gets the disk's backing file): set target.format to \"qcow2\"".into(),
            );
        }
        if let Err(e) = self.options().validate() {
            errors.push(e);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_field_names() {
        let c: MirrorConfig =
            serde_json::from_str(r#"{"disk": "disk0", "target": {"path": "/var/lib/new.raw"}}"#)
                .unwrap();
        assert_eq!(c.job_id(), "mirror-disk0");
        assert_eq!(c.granularity, 65536);
        assert_eq!(c.buffer_size, 16 << 20);
        assert_eq!(c.sync, SyncMode::Full);
        assert_eq!(c.copy_mode, CopyMode::Background);
        c.validate().unwrap();
        let wb: MirrorConfig = serde_json::from_str(
            r#"{"job_id": "m0", "disk": "d", "target": {"path": "nbd://10.0.0.2/d", "format": "raw"},
                "sync": "none", "copy_mode": "write-blocking", "speed": 1048576, "granularity": 4096}"#,
        )
        .unwrap();
        wb.validate().unwrap();
        assert!(wb.target.is_nbd());
        assert!(
            serde_json::from_str::<MirrorConfig>(
                r#"{"disk": "d", "target": {"path": "/a"}, "x": 1}"#
            )
            .is_err()
        );
    }

    #[test]
    fn bad_settings_name_their_field() {
        let bad = |json: &str, needle: &str| {
            let c: MirrorConfig = serde_json::from_str(json).unwrap();
            let e = c.validate().unwrap_err().join("; ");
            assert!(e.contains(needle), "{e}");
        };
        bad(
            r#"{"disk": "d", "target": {"path": "rel.raw"}}"#,
            "absolute",
        );
        bad(r#"{"disk": "d", "target": {"path": ""}}"#, "target.path");
        bad(
            r#"{"disk": "d", "target": {"path": "nbd://h/e", "format": "qcow2"}}"#,
            "NBD target is raw",
        );
        assert!(
            serde_json::from_str::<MirrorConfig>(
                r#"{"disk": "d", "target": {"path": "/a", "format": "vmdk"}}"#
            )
            .is_err()
        );
        bad(
            r#"{"disk": "d", "target": {"path": "/a"}, "granularity": 1000}"#,
            "granularity",
        );
        bad(
            r#"{"disk": "d", "target": {"path": "/a"}, "sync": "top"}"#,
            "target must be qcow2",
        );
        bad(
            r#"{"job_id": "a b", "disk": "d", "target": {"path": "/a"}}"#,
            "job_id",
        );
        bad(
            r#"{"disk": "d", "target": {"path": "nbds://h/e"}}"#,
            "target.path",
        );
    }
}
