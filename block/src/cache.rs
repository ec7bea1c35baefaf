//! QEMU's cache modes and what each one means for the file, the guest and flushes.

use std::fmt;

use serde::{Deserialize, Serialize};

/// How a disk uses the host page cache, as QEMU's `cache=` option.
///
/// | mode | O_DIRECT | write cache shown to guest | every write FUA | flush honoured |
/// |---|---|---|---|---|
/// | none | yes | yes | no | yes |
/// | writeback | no | yes | no | yes |
/// | writethrough | no | no | yes | yes |
/// | directsync | yes | no | yes | yes |
/// | unsafe | no | yes | no | no |
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum CacheMode {
    /// O_DIRECT, volatile write cache reported, flushes honoured. The default.
    #[default]
    None,
    /// Page cache, volatile write cache reported, flushes honoured.
    Writeback,
    /// Page cache, every write durable before it completes.
    Writethrough,
    /// O_DIRECT, every write durable before it completes.
    Directsync,
    /// Page cache, flushes ignored: fast and unsafe on host crash.
    Unsafe,
}

impl CacheMode {
    /// Every mode, in table order.
    pub const ALL: [CacheMode; 5] = [
        CacheMode::None,
        CacheMode::Writeback,
        CacheMode::Writethrough,
        CacheMode::Directsync,
        CacheMode::Unsafe,
    ];

    /// Whether the image is opened with O_DIRECT (bypassing the host page cache).
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::Directsync)
    }

    /// Whether the guest is told its disk has a volatile write cache (virtio-blk WCE).
    pub fn write_cache(self) -> bool {
        !self.every_write_fua()
    }

    /// Whether every write is made durable before completing (RWF_DSYNC).
    pub fn every_write_fua(self) -> bool {
        matches!(self, CacheMode::Writethrough | CacheMode::Directsync)
    }

    /// Whether a guest flush reaches the host (fdatasync); `unsafe` completes it at once.
    pub fn flush_honoured(self) -> bool {
        self != CacheMode::Unsafe
    }

    /// The name used in configs and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheMode::None => "none",
            CacheMode::Writeback => "writeback",
            CacheMode::Writethrough => "writethrough",
            CacheMode::Directsync => "directsync",
            CacheMode::Unsafe => "unsafe",
        }
    }
}

impl fmt::Display for CacheMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for CacheMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CacheMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| {
                format!("unknown cache mode {s:?}; expected none, writeback, writethrough, directsync or unsafe")
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_matches_qemu() {
        // (mode, O_DIRECT, WCE, FUA on every write, flush honoured)
        let table = [
            (CacheMode::None, true, true, false, true),
            (CacheMode::Writeback, false, true, false, true),
            (CacheMode::Writethrough, false, false, true, true),
            (CacheMode::Directsync, true, false, true, true),
            (CacheMode::Unsafe, false, true, false, false),
        ];
        for (mode, direct, wce, fua, flush) in table {
            assert_eq!(mode.direct(), direct, "{mode} O_DIRECT");
            assert_eq!(mode.write_cache(), wce, "{mode} WCE");
            assert_eq!(mode.every_write_fua(), fua, "{mode} FUA");
            assert_eq!(mode.flush_honoured(), flush, "{mode} flush");
        }
    }

    #[test]
    fn parses_names_and_rejects_others() {
        for mode in CacheMode::ALL {
            assert_eq!(mode.as_str().parse::<CacheMode>(), Ok(mode));
            let json = serde_json::to_string(&mode).unwrap();
            assert_eq!(serde_json::from_str::<CacheMode>(&json).unwrap(), mode);
        }
        assert!(
            "direct"
                .parse::<CacheMode>()
                .unwrap_err()
                .contains("unknown cache mode")
        );
        assert_eq!(CacheMode::default(), CacheMode::None);
    }
}
