//! Throttle limits as configured (QEMU's names), and their validation.

use serde::{Deserialize, Serialize};

use super::ThrottleError;

/// The largest rate or burst accepted, as QEMU's `THROTTLE_VALUE_MAX`.
const VALUE_MAX: u64 = 1_000_000_000_000_000;

/// The longest burst accepted, in seconds (one day).
const MAX_LENGTH_MAX: u64 = 86_400;

/// Number of leaky buckets: bps total/read/write, iops total/read/write.
pub(crate) const BUCKETS: usize = 6;

/// Index of the bps_total bucket; read and write follow.
pub(crate) const BPS_TOTAL: usize = 0;
/// Index of the iops_total bucket; read and write follow.
pub(crate) const OPS_TOTAL: usize = 3;

/// Field names of each bucket: average, burst rate, burst length.
const NAMES: [[&str; 3]; BUCKETS] = [
    ["bps_total", "bps_total_max", "bps_total_max_length"],
    ["bps_read", "bps_read_max", "bps_read_max_length"],
    ["bps_write", "bps_write_max", "bps_write_max_length"],
    ["iops_total", "iops_total_max", "iops_total_max_length"],
    ["iops_read", "iops_read_max", "iops_read_max_length"],
    ["iops_write", "iops_write_max", "iops_write_max_length"],
];

/// One bucket's settings, as configured (0 = unset).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct BucketSpec {
    /// Average rate, units per second.
    pub avg: u64,
    /// Burst rate, units per second.
    pub max: u64,
    /// Burst length in seconds as written (0 = default 1).
    pub max_length: u64,
}

impl BucketSpec {
    /// The burst length in seconds with the default applied.
    pub fn effective_length(&self) -> u64 {
        self.max_length.max(1)
    }
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// I/O limits of a disk or a throttle group, with QEMU's names. Every field is optional:
/// 0 (or absent in JSON) means unset. Rates are per second: `bps_*` in bytes, `iops_*`
/// in requests. `*_max` are burst rates allowed for `*_max_length` seconds (default 1)
/// after a period of low activity. With `iops_size` set, a request larger than it counts
/// as `bytes / iops_size` requests.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default, deny_unknown_fields)]
pub struct ThrottleLimits {
    /// Bytes per second, reads and writes together.
    #[serde(skip_serializing_if = "is_zero")]
    pub bps_total: u64,
    /// Bytes per second read.
    #[serde(skip_serializing_if = "is_zero")]
    pub bps_read: u64,
    /// Bytes per second written.
    #[serde(skip_serializing_if = "is_zero")]
    pub bps_write: u64,
    /// Requests per second, reads and writes together.
    #[serde(skip_serializing_if = "is_zero")]
    pub iops_total: u64,
    /// Read requests per second.
    #[serde(skip_serializing_if = "is_zero")]
    pub iops_read: u64,
    /// Write requests per second.
    #[serde(skip_serializing_if = "is_zero")]
    pub iops_write: u64,
    /// Burst rate for `bps_total`.
    #[serde(skip_serializing_if = "is_zero")]
    pub bps_total_max: u64,
    /// Burst rate for `bps_read`.
    #[serde(skip_serializing_if = "is_zero")]
    pub bps_read_max: u64,
    /// Burst rate for `bps_write`.
    #[serde(skip_serializing_if = "is_zero")]
    pub bps_write_max: u64,
    /// Burst rate for `iops_total`.
    #[serde(skip_serializing_if = "is_zero")]
    pub iops_total_max: u64,
    /// Burst rate for `iops_read`.
    #[serde(skip_serializing_if = "is_zero")]
    pub iops_read_max: u64,
    /// Burst rate for `iops_write`.
    #[serde(skip_serializing_if = "is_zero")]
    pub iops_write_max: u64,
    /// Seconds `bps_total_max` may last (0 = 1).
    #[serde(skip_serializing_if = "is_zero")]
    pub bps_total_max_length: u64,
    /// Seconds `bps_read_max` may last (0 = 1).
    #[serde(skip_serializing_if = "is_zero")]
    pub bps_read_max_length: u64,
    /// Seconds `bps_write_max` may last (0 = 1).
    #[serde(skip_serializing_if = "is_zero")]
    pub bps_write_max_length: u64,
    /// Seconds `iops_total_max` may last (0 = 1).
    #[serde(skip_serializing_if = "is_zero")]
    pub iops_total_max_length: u64,
    /// Seconds `iops_read_max` may last (0 = 1).
    #[serde(skip_serializing_if = "is_zero")]
    pub iops_read_max_length: u64,
    /// Seconds `iops_write_max` may last (0 = 1).
    #[serde(skip_serializing_if = "is_zero")]
    pub iops_write_max_length: u64,
    /// Size in bytes of one "request" for the iops limits; larger requests count more.
    #[serde(skip_serializing_if = "is_zero")]
    pub iops_size: u64,
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ThrottleError {
    ThrottleError::InvalidLimit {
        field,
        reason: reason.into(),
    }
}

impl ThrottleLimits {
    /// Whether any limit is set (burst settings need their average, so averages suffice).
    pub fn is_enabled(&self) -> bool {
        (0..BUCKETS).any(|i| self.bucket(i).avg != 0)
    }

    /// The settings of bucket `i` (see [`BPS_TOTAL`], [`OPS_TOTAL`]).
    pub(crate) fn bucket(&self, i: usize) -> BucketSpec {
        let (avg, max, max_length) = match i {
            0 => (
                self.bps_total,
                self.bps_total_max,
                self.bps_total_max_length,
            ),
            1 => (self.bps_read, self.bps_read_max, self.bps_read_max_length),
            2 => (
                self.bps_write,
                self.bps_write_max,
                self.bps_write_max_length,
            ),
            3 => (
                self.iops_total,
                self.iops_total_max,
                self.iops_total_max_length,
            ),
            4 => (
                self.iops_read,
                self.iops_read_max,
                self.iops_read_max_length,
            ),
            _ => (
                self.iops_write,
                self.iops_write_max,
                self.iops_write_max_length,
            ),
        };
        BucketSpec {
            avg,
            max,
            max_length,
        }
    }

    /// Checks the limits as QEMU's `throttle_is_valid` does (plus a cap on burst
    /// lengths). The error names the offending field.
    pub fn validate(&self) -> Result<(), ThrottleError> {
        // A total limit excludes the per-direction limits of the same kind.
        for total in [BPS_TOTAL, OPS_TOTAL] {
            let t = self.bucket(total);
            for rw in [total + 1, total + 2] {
                let b = self.bucket(rw);
                if t.avg != 0 && b.avg != 0 {
                    return Err(invalid(
                        NAMES[rw][0],
                        format!(
                            "{} and {} cannot be used at the same time",
                            NAMES[total][0], NAMES[rw][0]
                        ),
                    ));
                }
                if t.max != 0 && b.max != 0 {
                    return Err(invalid(
                        NAMES[rw][1],
                        format!(
                            "{} and {} cannot be used at the same time",
                            NAMES[total][1], NAMES[rw][1]
                        ),
                    ));
                }
            }
        }
        if self.iops_size != 0 {
            if self.iops_total == 0 && self.iops_read == 0 && self.iops_write == 0 {
                return Err(invalid(
                    "iops_size",
                    "iops_size requires iops_total, iops_read or iops_write",
                ));
            }
            if self.iops_size > VALUE_MAX {
                return Err(invalid("iops_size", format!("must be at most {VALUE_MAX}")));
            }
        }
        for (i, names) in NAMES.iter().enumerate() {
            let b = self.bucket(i);
            let [avg_name, max_name, len_name] = *names;
            if b.avg > VALUE_MAX {
                return Err(invalid(avg_name, format!("must be at most {VALUE_MAX}")));
            }
            if b.max > VALUE_MAX {
                return Err(invalid(max_name, format!("must be at most {VALUE_MAX}")));
            }
            if b.max_length > MAX_LENGTH_MAX {
                return Err(invalid(
                    len_name,
                    format!("must be at most {MAX_LENGTH_MAX} seconds"),
                ));
            }
            if b.max_length != 0 && b.max == 0 {
                return Err(invalid(
                    len_name,
                    format!("{len_name} is set without {max_name}"),
                ));
            }
            if b.max != 0 && b.effective_length() > VALUE_MAX / b.max {
                return Err(invalid(
                    len_name,
                    format!("{len_name} is too high for this {max_name}"),
                ));
            }
            if b.max != 0 && b.avg == 0 {
                return Err(invalid(max_name, format!("{max_name} requires {avg_name}")));
            }
            if b.max != 0 && b.max < b.avg {
                return Err(invalid(
                    max_name,
                    format!("{max_name} cannot be lower than {avg_name}"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err_of(limits: ThrottleLimits) -> String {
        match limits.validate() {
            Ok(()) => panic!("{limits:?} should be invalid"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn valid_configs_pass() {
        let ok = [
            ThrottleLimits::default(),
            ThrottleLimits {
                iops_total: 1000,
                iops_total_max: 2000,
                iops_total_max_length: 1,
                bps_total: 104_857_600,
                ..Default::default()
            },
            ThrottleLimits {
                bps_read: 1,
                bps_write: 2,
                iops_read: 3,
                iops_write_max: 10,
                iops_write: 10,
                iops_write_max_length: 86_400,
                iops_size: 4096,
                ..Default::default()
            },
            ThrottleLimits {
                bps_total: VALUE_MAX,
                ..Default::default()
            },
            // A total burst with per-direction averages of the other kind is fine.
            ThrottleLimits {
                bps_total: 10,
                bps_total_max: 20,
                iops_read: 5,
                ..Default::default()
            },
        ];
        for l in ok {
            assert!(l.validate().is_ok(), "{l:?}: {:?}", l.validate());
        }
        assert!(!ThrottleLimits::default().is_enabled());
        assert!(
            ThrottleLimits {
                iops_write: 1,
                ..Default::default()
            }
            .is_enabled()
        );
    }

    #[test]
    fn invalid_configs_name_the_field() {
        let d = ThrottleLimits::default;
        let cases: Vec<(ThrottleLimits, &str)> = vec![
            (
                ThrottleLimits {
                    bps_total: 1,
                    bps_read: 1,
                    ..d()
                },
                "bps_read",
            ),
            (
                ThrottleLimits {
                    iops_total: 1,
                    iops_write: 1,
                    ..d()
                },
                "iops_write",
            ),
            (
                ThrottleLimits {
                    iops_total: 1,
                    iops_read: 1,
                    iops_total_max: 2,
                    iops_read_max: 2,
                    ..d()
                },
                "iops_read",
            ),
            (
                ThrottleLimits {
                    bps_total: 1,
                    bps_total_max: 2,
                    bps_write: 1,
                    bps_write_max: 2,
                    ..d()
                },
                "bps_write",
            ),
            (
                ThrottleLimits {
                    bps_total_max: 5,
                    ..d()
                },
                "bps_total_max requires bps_total",
            ),
            (
                ThrottleLimits {
                    iops_read: 10,
                    iops_read_max: 5,
                    ..d()
                },
                "iops_read_max cannot be lower than iops_read",
            ),
            (
                ThrottleLimits {
                    iops_write: 10,
                    iops_write_max_length: 3,
                    ..d()
                },
                "iops_write_max_length is set without iops_write_max",
            ),
            (
                ThrottleLimits {
                    bps_read: VALUE_MAX + 1,
                    ..d()
                },
                "bps_read",
            ),
            (
                ThrottleLimits {
                    bps_total: 1,
                    bps_total_max: VALUE_MAX + 1,
                    ..d()
                },
                "bps_total_max",
            ),
            (
                ThrottleLimits {
                    iops_total: 1,
                    iops_total_max: 2,
                    iops_total_max_length: 86_401,
                    ..d()
                },
                "iops_total_max_length",
            ),
            (
                ThrottleLimits {
                    bps_total: 1,
                    bps_total_max: VALUE_MAX,
                    bps_total_max_length: 2,
                    ..d()
                },
                "bps_total_max_length is too high",
            ),
            (
                ThrottleLimits {
                    iops_size: 4096,
                    bps_total: 1000,
                    ..d()
                },
                "iops_size",
            ),
        ];
        for (limits, needle) in cases {
            let msg = err_of(limits.clone());
            assert!(msg.contains(needle), "{limits:?}: {msg:?} lacks {needle:?}");
        }
    }

    #[test]
    fn json_round_trip_omits_zeroes_and_rejects_unknown_or_negative() {
        let l: ThrottleLimits =
            serde_json::from_str(r#"{"iops_total": 1000, "iops_total_max": 2000}"#).unwrap();
        assert_eq!(l.iops_total, 1000);
        assert_eq!(l.iops_total_max, 2000);
        assert_eq!(l.bucket(OPS_TOTAL).effective_length(), 1);
        let s = serde_json::to_string(&l).unwrap();
        assert_eq!(s, r#"{"iops_total":1000,"iops_total_max":2000}"#);
        assert_eq!(
            serde_json::to_string(&ThrottleLimits::default()).unwrap(),
            "{}"
        );

        let e = serde_json::from_str::<ThrottleLimits>(r#"{"iops_total": -5}"#).unwrap_err();
        assert!(e.to_string().contains("-5"), "{e}");
        let e = serde_json::from_str::<ThrottleLimits>(r#"{"iops": 5}"#).unwrap_err();
        assert!(e.to_string().contains("iops"), "{e}");
    }
}
