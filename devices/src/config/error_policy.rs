//! A disk's I/O error policy (docs/architecture.md), QEMU's
//! `werror`/`rerror` and libvirt's `error_policy`/`rerror_policy`: what a failed
//! request becomes.

use serde::{Deserialize, Serialize};

/// What a disk does when a write, flush, discard or write-zeroes fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum WriteErrorPolicy {
    /// The guest gets an I/O error.
    Report,
    /// The request is held (not completed), the disk stops taking requests and the VM
    /// pauses (`io-error`); resume retries the held requests in order.
    Stop,
    /// `stop` when the storage is out of space (ENOSPC), `report` otherwise. The
    /// default.
    #[default]
    Enospc,
    /// The guest is told the request succeeded. Dangerous: data the guest believes
    /// written is not.
    Ignore,
}

/// What a disk does when a read fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ReadErrorPolicy {
    /// The guest gets an I/O error. The default.
    #[default]
    Report,
    /// As [`WriteErrorPolicy::Stop`].
    Stop,
    /// The guest is told the read succeeded; its buffer holds whatever it held.
    Ignore,
}

/// What becomes of one failed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorAction {
    /// Completed with an I/O error.
    Report,
    /// Held for a retry; the disk stops.
    Stop,
    /// Completed as successful.
    Ignore,
}

impl ErrorAction {
    /// The name in counters and events.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorAction::Report => "report",
            ErrorAction::Stop => "stop",
            ErrorAction::Ignore => "ignore",
        }
    }
}

impl WriteErrorPolicy {
    /// What a write that failed with `errno` becomes.
    pub fn action(self, errno: i32) -> ErrorAction {
        match self {
            WriteErrorPolicy::Report => ErrorAction::Report,
            WriteErrorPolicy::Stop => ErrorAction::Stop,
            WriteErrorPolicy::Enospc if errno == libc::ENOSPC => ErrorAction::Stop,
            WriteErrorPolicy::Enospc => ErrorAction::Report,
            WriteErrorPolicy::Ignore => ErrorAction::Ignore,
        }
    }

    /// The policy as a small number (for an atomic), see [`WriteErrorPolicy::from_u8`].
    pub fn to_u8(self) -> u8 {
        self as u8
    }

    /// The policy [`WriteErrorPolicy::to_u8`] gave `n` for (the default otherwise).
    pub fn from_u8(n: u8) -> Self {
        [Self::Report, Self::Stop, Self::Enospc, Self::Ignore]
            .into_iter()
            .find(|p| p.to_u8() == n)
            .unwrap_or_default()
    }

    /// Whether it is the default (for configs that leave it out).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

impl ReadErrorPolicy {
    /// What a read that failed becomes.
    pub fn action(self) -> ErrorAction {
        match self {
            ReadErrorPolicy::Report => ErrorAction::Report,
            ReadErrorPolicy::Stop => ErrorAction::Stop,
            ReadErrorPolicy::Ignore => ErrorAction::Ignore,
        }
    }

    /// The policy as a small number (for an atomic), see [`ReadErrorPolicy::from_u8`].
    pub fn to_u8(self) -> u8 {
        self as u8
    }

    /// The policy [`ReadErrorPolicy::to_u8`] gave `n` for (the default otherwise).
    pub fn from_u8(n: u8) -> Self {
        [Self::Report, Self::Stop, Self::Ignore]
            .into_iter()
            .find(|p| p.to_u8() == n)
            .unwrap_or_default()
    }

    /// Whether it is the default (for configs that leave it out).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enospc_stops_only_for_a_full_disk() {
        let p = WriteErrorPolicy::default();
        assert_eq!(p, WriteErrorPolicy::Enospc);
        assert_eq!(p.action(libc::ENOSPC), ErrorAction::Stop);
        assert_eq!(p.action(libc::EIO), ErrorAction::Report);
        assert_eq!(WriteErrorPolicy::Stop.action(libc::EIO), ErrorAction::Stop);
        assert_eq!(
            WriteErrorPolicy::Ignore.action(libc::ENOSPC),
            ErrorAction::Ignore
        );
        assert_eq!(ReadErrorPolicy::default().action(), ErrorAction::Report);
    }

    #[test]
    fn policies_survive_their_number_and_names_are_qemus() {
        for p in [
            WriteErrorPolicy::Report,
            WriteErrorPolicy::Stop,
            WriteErrorPolicy::Enospc,
            WriteErrorPolicy::Ignore,
        ] {
            assert_eq!(WriteErrorPolicy::from_u8(p.to_u8()), p);
        }
        for p in [
            ReadErrorPolicy::Report,
            ReadErrorPolicy::Stop,
            ReadErrorPolicy::Ignore,
        ] {
            assert_eq!(ReadErrorPolicy::from_u8(p.to_u8()), p);
        }
        let w: WriteErrorPolicy = serde_json::from_str("\"enospc\"").unwrap();
        assert_eq!(w, WriteErrorPolicy::Enospc);
        // A read cannot run out of space.
        assert!(serde_json::from_str::<ReadErrorPolicy>("\"enospc\"").is_err());
    }
}
