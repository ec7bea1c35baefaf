//! A mirror job's states and settings (docs/architecture.md), as `vm.jobs` shows
//! them and `vm.disk-mirror` takes them.

use serde::{Deserialize, Serialize};

use super::dirty::{DEFAULT_GRANULARITY, MAX_GRANULARITY, MIN_GRANULARITY};

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Set up, not copying yet.
    Created,
    /// Copying the disk; not every chunk has been copied once.
    Running,
    /// Everything was copied and guest writes are being mirrored: it may complete.
    Ready,
    /// Pivoted: the disk now uses the target.
    Completed,
    /// Stopped by request (or by the disk going away); the disk stays on its source.
    Cancelled,
    /// Stopped by an error on the target; the disk stays on its source.
    Failed,
}

impl JobState {
    /// Whether the job is over.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Completed | JobState::Cancelled | JobState::Failed
        )
    }

    /// Whether `to` may follow this state: created -> running -> ready -> completed, and
    /// from any state not final, cancelled or failed.
    pub fn can_become(self, to: JobState) -> bool {
        match (self, to) {
            (JobState::Created, JobState::Running)
            | (JobState::Running, JobState::Ready)
            | (JobState::Ready, JobState::Completed) => true,
            (from, JobState::Cancelled | JobState::Failed) => !from.is_final(),
            _ => false,
        }
    }

    /// Its name in JSON and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Created => "created",
            JobState::Running => "running",
            JobState::Ready => "ready",
            JobState::Completed => "completed",
            JobState::Cancelled => "cancelled",
            JobState::Failed => "failed",
        }
    }
}

/// What a mirror copies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// The whole disk, then what the guest writes. The default.
    #[default]
    Full,
    /// Only the top image's allocated clusters (qcow2 with a backing file).
    Top,
    /// Only what the guest writes from now on.
    None,
}

/// How guest writes reach the target once the job is ready.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum CopyMode {
    /// Marked dirty and copied later by the copier. The default.
    #[default]
    Background,
    /// Written to both before the guest's request completes: the job always converges.
    WriteBlocking,
}

/// The copier's settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MirrorOptions {
    /// Bytes per dirty bit (a power of two, 4 KiB..=64 MiB).
    pub granularity: u64,
    /// Bytes in flight at most (at least one chunk).
    pub buffer_size: u64,
    /// Bytes/s (0: unlimited).
    pub speed: u64,
    /// What to copy.
    pub sync: SyncMode,
    /// How guest writes reach the target.
    pub copy_mode: CopyMode,
}

/// The default copy buffer (16 MiB).
pub const DEFAULT_BUFFER_SIZE: u64 = 16 << 20;
/// The largest copy buffer accepted (1 GiB).
pub const MAX_BUFFER_SIZE: u64 = 1 << 30;
/// The most chunks in flight whatever the buffer (each copy is a request token).
pub const MAX_COPIES: u64 = 4096;

// Copy tokens stay below the queue's limit, and below the flush's token (the last one).
const _: () = assert!(MAX_COPIES < crate::queue::MAX_TOKENS - 1);

impl Default for MirrorOptions {
    fn default() -> Self {
        MirrorOptions {
            granularity: DEFAULT_GRANULARITY,
            buffer_size: DEFAULT_BUFFER_SIZE,
            speed: 0,
            sync: SyncMode::Full,
            copy_mode: CopyMode::Background,
        }
    }
}

impl MirrorOptions {
    /// Checks the settings; the message names the field.
    pub fn validate(&self) -> Result<(), String> {
        let g = self.granularity;
        if !g.is_power_of_two() || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&g) {
            return Err(format!(
                "granularity {g} must be a power of two from {MIN_GRANULARITY} to {MAX_GRANULARITY}"
            ));
        }
        if !(g..=MAX_BUFFER_SIZE).contains(&self.buffer_size) {
            return Err(format!(
                "buffer_size {} must be from the granularity ({g}) to {MAX_BUFFER_SIZE}",
                self.buffer_size
            ));
        }
        Ok(())
    }

    /// Chunks the copier keeps in flight at most (the buffer's worth, up to
    /// [`MAX_COPIES`]).
    pub fn max_chunks(&self) -> u64 {
        (self.buffer_size / self.granularity).clamp(1, MAX_COPIES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_follow_the_lifecycle_only() {
        use JobState::*;
        let all = [Created, Running, Ready, Completed, Cancelled, Failed];
        let allowed: Vec<(JobState, JobState)> = all
            .iter()
            .flat_map(|&a| all.iter().map(move |&b| (a, b)))
            .filter(|(a, b)| a.can_become(*b))
            .collect();
        assert_eq!(
            allowed,
            [
                (Created, Running),
                (Created, Cancelled),
                (Created, Failed),
                (Running, Ready),
                (Running, Cancelled),
                (Running, Failed),
                (Ready, Completed),
                (Ready, Cancelled),
                (Ready, Failed),
            ]
        );
        for s in all {
            let json = serde_json::to_value(s).unwrap();
            assert_eq!(json, s.as_str());
        }
    }

    #[test]
    fn options_are_checked_with_clear_messages() {
        let ok = MirrorOptions::default();
        ok.validate().unwrap();
        assert_eq!(ok.max_chunks(), 256);
        // Each chunk in flight is a request token: the budget has a ceiling.
        let big = MirrorOptions {
            granularity: 4096,
            buffer_size: MAX_BUFFER_SIZE,
            ..MirrorOptions::default()
        };
        big.validate().unwrap();
        assert_eq!(big.max_chunks(), MAX_COPIES);
        let bad = |f: fn(&mut MirrorOptions), needle: &str| {
            let mut o = MirrorOptions::default();
            f(&mut o);
            let e = o.validate().unwrap_err();
            assert!(e.contains(needle), "{e}");
        };
        bad(|o| o.granularity = 3000, "granularity");
        bad(|o| o.granularity = 128 << 20, "granularity");
        bad(|o| o.buffer_size = 4096, "buffer_size");
        bad(|o| o.buffer_size = 2 << 30, "buffer_size");
        assert_eq!(
            serde_json::to_value(CopyMode::WriteBlocking).unwrap(),
            "write-blocking"
        );
    }
}
