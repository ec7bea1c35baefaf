//! Events as things happen (docs/architecture.md): one [`EventBus`] per process,
//! fed by the backend, read by `GET /api/v1/events` as newline-delimited JSON.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use block::sync::lock;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use utoipa::ToSchema;

/// How many events a slow reader may fall behind before it misses some (it is told how
/// many with a `lagged` event).
const BACKLOG: usize = 1024;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum EventKind {
    /// A VM was created.
    Created,
    /// A VM was booted.
    Booted,
    /// A VM was paused.
    Paused,
    /// A VM was resumed.
    Resumed,
    /// A VM was shut down by the API, or after its guest reset too often or its reboot
    /// failed (`reason`). A guest that powers off sends `guest-poweroff` instead.
    Shutdown,
    /// A VM was rebooted through the API.
    Rebooted,
    /// A VM was deleted.
    Deleted,
    /// The guest reset; the VM reboots (`rebooting: false` when it resets too often and
    /// is left shut down).
    GuestReset,
    /// The guest powered off.
    GuestPoweroff,
    /// The guest ended the VM by a failure (`reason` says which).
    GuestFailed,
    /// A VM process ended without being asked (`signal` or `status`, `log`).
    Crashed,
    /// A disk was added (`disk`).
    DiskAdded,
    /// A disk's removal was asked for (`disk`); `disk-ejected` follows when the guest
    /// lets it go.
    DiskRemovalRequested,
    /// The guest ejected a disk (`disk`), or a disk left a VM that was not running.
    DiskEjected,
    /// A block job started (`job`, `disk`, `state`, `bytes_done`, `bytes_total`,
    /// `dirty_bytes`, `rate`; the job events below carry the same fields).
    JobStarted,
    /// A job copied more (at most once a second per job).
    JobProgress,
    /// A mirror job copied the whole disk and mirrors guest writes: it may complete.
    JobReady,
    /// A mirror job pivoted: the disk uses its target.
    JobCompleted,
    /// A job was cancelled (or its disk went away).
    JobCancelled,
    /// A job failed (`error`); the disk stays on its image.
    JobFailed,
    /// A disk stopped on an I/O error its error policy holds (`disk`, `op`, `errno`,
    /// `error`); the VM pauses (`paused` with `reason: io-error`) until resumed.
    IoError,
    /// This reader fell behind and missed `missed` events.
    Lagged,
}

/// One event: `{"time", "vm", "event", ...}` with fields of its own.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// UTC, RFC 3339 with milliseconds.
    pub time: String,
    /// The VM (empty for events about the service).
    pub vm: String,
    /// What happened.
    pub event: EventKind,
    /// Fields of this event (`disk`, `signal`, `status`, `reason`, `log`, `missed`).
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub fields: serde_json::Map<String, serde_json::Value>,
}

impl Event {
    /// An event of `kind` on VM `vm`, now.
    pub fn now(vm: &str, kind: EventKind) -> Self {
        Event {
            time: rfc3339(SystemTime::now()),
            vm: vm.to_string(),
            event: kind,
            fields: serde_json::Map::new(),
        }
    }

    /// The same event with field `key` set to `value`.
    pub fn with(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.fields.insert(key.to_string(), value.into());
        self
    }

    /// One line of the stream (JSON and `\n`).
    pub fn line(&self) -> String {
        let mut s = serde_json::to_string(self).unwrap_or_default();
        s.push('\n');
        s
    }
}

/// What was last told of one block job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobSeen {
    /// Its state.
    pub state: block::jobs::JobState,
    /// Its bytes done and dirty.
    pub bytes: (u64, u64),
    /// When its last progress event went out.
    pub told: std::time::Instant,
}

/// What was last told of each block job, by id.
pub type JobsSeen = std::collections::BTreeMap<String, JobSeen>;

/// The events `jobs` (of VM `vm`, empty for a vhost-user backend) call for since
/// `seen`, which they update: a job's start and every state change at once, progress at
/// most once a second while its bytes move. A job id seen over (final) and now running
/// again is a new job; ids no longer listed are forgotten.
pub fn job_events(vm: &str, jobs: &[block::jobs::JobInfo], seen: &mut JobsSeen) -> Vec<Event> {
    use block::jobs::JobState;
    let now = std::time::Instant::now();
    seen.retain(|id, _| jobs.iter().any(|j| &j.id == id));
    let mut out = Vec::new();
    for job in jobs {
        let before = seen
            .get(&job.id)
            .copied()
            .filter(|b| !b.state.is_final() || job.state.is_final());
        let bytes = (job.bytes_done, job.dirty_bytes);
        let event = |kind| {
            let mut e = Event::now(vm, kind)
                .with("job", job.id.clone())
                .with("disk", job.disk.clone())
                .with("state", job.state.as_str())
                .with("bytes_done", job.bytes_done)
                .with("bytes_total", job.bytes_total)
                .with("dirty_bytes", job.dirty_bytes)
                .with("rate", job.rate);
            if let Some(err) = &job.error {
                e = e.with("error", err.clone());
            }
            e
        };
        let kind = match (before, job.state) {
            // A job seen for the first time started, whatever state it reached since.
            (None, _) => {
                out.push(event(EventKind::JobStarted));
                match job.state {
                    JobState::Created | JobState::Running => None,
                    s => Some(state_event(s)),
                }
            }
            (Some(b), s) if b.state != s => Some(state_event(s)),
            (Some(b), _)
                if b.bytes != bytes && now.saturating_duration_since(b.told) >= PROGRESS_EVERY =>
            {
                Some(EventKind::JobProgress)
            }
            (Some(_), _) => {
                // Nothing to tell yet: keep the last told state and time.
                continue;
            }
        };
        if let Some(kind) = kind {
            out.push(event(kind));
        }
        seen.insert(
            job.id.clone(),
            JobSeen {
                state: job.state,
                bytes,
                told: now,
            },
        );
    }
    out
}

/// The least time between two progress events of one job.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The event a job's new state `state` sends.
fn state_event(state: block::jobs::JobState) -> EventKind {
    use block::jobs::JobState;
    match state {
        JobState::Created | JobState::Running => EventKind::JobProgress,
        JobState::Ready => EventKind::JobReady,
        JobState::Completed => EventKind::JobCompleted,
        JobState::Cancelled => EventKind::JobCancelled,
        JobState::Failed => EventKind::JobFailed,
    }
}

/// Where a process's events go; every subscriber gets each event sent after it
/// subscribed. A bus made by [`EventBus::keeping_early`] keeps the events sent before
/// anyone subscribed (up to [`EARLY_MAX`]) for the first subscriber: a VM process's
/// supervisor subscribes once the process answers, and must not miss what the VM did
/// before that.
#[derive(Clone, Debug)]
pub struct EventBus {
    tx: broadcast::Sender<Event>,
    early: Arc<Mutex<Option<Vec<Event>>>>,
}

/// How many events before the first subscriber are kept for it.
pub const EARLY_MAX: usize = 64;

impl Default for EventBus {
    fn default() -> Self {
        EventBus {
            tx: broadcast::channel(BACKLOG).0,
            early: Arc::new(Mutex::new(None)),
        }
    }
}

impl EventBus {
    /// A bus without subscribers; events sent before the first subscriber are dropped.
    pub fn new() -> Self {
        Self::default()
    }

    /// A bus that keeps the events sent before its first subscriber for it.
    pub fn keeping_early() -> Self {
        EventBus {
            tx: broadcast::channel(BACKLOG).0,
            early: Arc::new(Mutex::new(Some(Vec::new()))),
        }
    }

    /// Sends `event` to every subscriber (none yet: kept for the first) and logs it.
    pub fn emit(&self, event: Event) {
        tracing::info!(vm = %event.vm, event = ?event.event,
            fields = %serde_json::Value::Object(event.fields.clone()), "event");
        let mut early = lock(&self.early);
        if let Some(kept) = early.as_mut()
            && kept.len() < EARLY_MAX
        {
            kept.push(event.clone());
        }
        let _ = self.tx.send(event);
    }

    /// A receiver of every later event, leaving the earlier ones for the first
    /// [`EventBus::subscribe`] (for the process's own watchers).
    pub fn watch(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    /// The events sent before the first subscriber (for the first caller only; empty for
    /// the others) and a receiver of every later event.
    pub fn subscribe(&self) -> (Vec<Event>, broadcast::Receiver<Event>) {
        let mut early = lock(&self.early);
        let rx = self.tx.subscribe();
        (early.take().unwrap_or_default(), rx)
    }
}

/// `t` as `YYYY-MM-DDTHH:MM:SS.mmmZ` (UTC).
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let utc = block::utc::UtcTime::from_epoch_secs(d.as_secs());
    format!("{}.{:03}Z", utc.iso8601(), d.subsec_millis())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn times_are_utc_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 (a leap day of a century divisible by 400), 12:34:56.789.
        let t = UNIX_EPOCH + Duration::from_millis(951_827_696_789);
        assert_eq!(rfc3339(t), "2000-02-29T12:34:56.789Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_796_428_800); // 2026-12-05T00:00:00Z
        assert_eq!(rfc3339(t), "2026-12-05T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_secs(4_107_542_399); // 2100-02-28T23:59:59Z
        assert_eq!(rfc3339(t), "2100-02-28T23:59:59.000Z");
    }

    #[test]
    fn an_event_is_one_flat_json_line() {
        let e = Event::now("vm1", EventKind::DiskEjected).with("disk", "d1");
        let line = e.line();
        assert!(line.ends_with('\n') && !line.trim_end().contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["vm"], "vm1");
        assert_eq!(v["event"], "disk-ejected");
        assert_eq!(v["disk"], "d1");
        let back: Event = serde_json::from_str(&line).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn every_subscriber_gets_later_events_and_the_first_the_earlier_ones() {
        let bus = EventBus::keeping_early();
        bus.emit(Event::now("a", EventKind::Created)); // before anyone listens
        let (early1, mut r1) = bus.subscribe();
        let (early2, mut r2) = bus.subscribe();
        assert_eq!(early1.len(), 1);
        assert_eq!(early1[0].event, EventKind::Created);
        assert!(early2.is_empty());
        bus.emit(Event::now("a", EventKind::Booted));
        assert_eq!(r1.try_recv().unwrap().event, EventKind::Booted);
        assert_eq!(r2.try_recv().unwrap().event, EventKind::Booted);
        assert!(r1.try_recv().is_err());
        // Only so many are kept for the first subscriber; a plain bus keeps none.
        let plain = EventBus::new();
        plain.emit(Event::now("a", EventKind::Created));
        assert!(plain.subscribe().0.is_empty());
        let bus = EventBus::keeping_early();
        for _ in 0..EARLY_MAX + 5 {
            bus.emit(Event::now("a", EventKind::Paused));
        }
        assert_eq!(bus.subscribe().0.len(), EARLY_MAX);
    }

    #[test]
    fn job_events_tell_starts_and_changes_at_once_and_progress_once_a_second() {
        use block::jobs::{CopyMode, JobInfo, JobState, SyncMode};
        let job = |state, done| JobInfo {
            id: "m".into(),
            kind: "mirror".into(),
            disk: "d".into(),
            target: "/t".into(),
            state,
            bytes_done: done,
            bytes_total: 100,
            dirty_bytes: 0,
            rate: 0,
            speed: 0,
            sync: SyncMode::Full,
            copy_mode: CopyMode::Background,
            error: None,
        };
        let kinds = |jobs: &[JobInfo], seen: &mut JobsSeen| -> Vec<EventKind> {
            job_events("vm", jobs, seen)
                .into_iter()
                .map(|e| e.event)
                .collect()
        };
        let mut seen = JobsSeen::new();
        assert_eq!(
            kinds(&[job(JobState::Running, 0)], &mut seen),
            [EventKind::JobStarted]
        );
        // Progress within the second: held back; a state change: at once.
        assert!(kinds(&[job(JobState::Running, 10)], &mut seen).is_empty());
        assert_eq!(
            kinds(&[job(JobState::Ready, 100)], &mut seen),
            [EventKind::JobReady]
        );
        if let Some(s) = seen.get_mut("m") {
            s.told -= Duration::from_secs(2);
        }
        assert_eq!(
            kinds(&[job(JobState::Ready, 120)], &mut seen),
            [EventKind::JobProgress]
        );
        assert_eq!(
            kinds(&[job(JobState::Cancelled, 120)], &mut seen),
            [EventKind::JobCancelled]
        );
        // The same id running again is a new job; a job ready at its first look started.
        assert_eq!(
            kinds(&[job(JobState::Running, 0)], &mut seen),
            [EventKind::JobStarted]
        );
        let mut fresh = JobsSeen::new();
        assert_eq!(
            kinds(&[job(JobState::Ready, 100)], &mut fresh),
            [EventKind::JobStarted, EventKind::JobReady]
        );
        // Ids no longer listed are forgotten.
        assert!(kinds(&[], &mut fresh).is_empty());
        assert!(fresh.is_empty());
    }
}
