//! The `key=value,...` shorthand for disk and iothread settings (as `vmctl` and the
//! `vhost-user-blk` binary accept it), turned into the JSON object the config types
//! deserialize from, so serde does the field validation.
//!
//! - `a=1,b=x` gives `{"a": 1, "b": "x"}`; dotted keys nest: `throttle.iops_total=100`
//!   gives `{"throttle": {"iops_total": 100}}`.
//! - Values are typed: unsigned and negative integers become numbers, `true`/`false`/
//!   `on`/`off` become booleans, `1:3:5` (numbers joined by `:`) becomes a list.
//!   Keys named in [`Hints::strings`] always stay strings (a serial `1234`, a path
//!   `on`); keys named in [`Hints::lists`] always become lists (`cpu_affinity=2`).
//! - `,,` stands for a literal comma inside a value (as in QEMU).

use serde_json::{Map, Number, Value};

/// Keys whose values must not be guessed.
#[derive(Clone, Copy, Debug, Default)]
pub struct Hints<'a> {
    /// Keys (dotted, full path) whose values are always strings.
    pub strings: &'a [&'a str],
    /// Keys whose values are always lists (items split on `:`, each typed).
    pub lists: &'a [&'a str],
}

/// Hints for a disk (`DiskConfig`).
pub const DISK_HINTS: Hints<'static> = Hints {
    strings: &[
        "id",
        "path",
        "serial",
        "iothread",
        "throttle_group",
        "cache",
        "aio",
        "format",
        "discard",
        "on_write_error",
        "on_read_error",
    ],
    lists: &[],
};

/// Hints for an iothread (`IoThreadConfig`).
pub const IOTHREAD_HINTS: Hints<'static> = Hints {
    strings: &["id"],
    lists: &["cpu_affinity"],
};

/// Parses `key=value,...`, typing the keys named in `hints` as they say.
pub fn parse_kv_with(s: &str, hints: &Hints<'_>) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    for part in split_unescaped(s) {
        if part.is_empty() {
            continue;
        }
        let Some((key, value)) = part.split_once('=') else {
            return Err(format!("expected key=value, got {part:?}"));
        };
        let key = key.trim();
        if key.is_empty() || key.split('.').any(str::is_empty) {
            return Err(format!("bad key {key:?} in {part:?}"));
        }
        let typed = if hints.strings.contains(&key) {
            Value::String(value.to_string())
        } else if hints.lists.contains(&key) {
            Value::Array(
                value
                    .split(':')
                    .filter(|v| !v.is_empty())
                    .map(scalar)
                    .collect(),
            )
        } else {
            guess(value)
        };
        insert(&mut out, key, typed)?;
    }
    Ok(out)
}

/// Splits on `,` except where doubled (`,,` is a literal comma).
fn split_unescaped(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    parts
}

/// A number or boolean when the text is one, else a string.
fn scalar(v: &str) -> Value {
    if let Ok(n) = v.parse::<u64>() {
        return Value::Number(Number::from(n));
    }
    if let Ok(n) = v.parse::<i64>() {
        return Value::Number(Number::from(n));
    }
    match v {
        "true" | "on" => Value::Bool(true),
        "false" | "off" => Value::Bool(false),
        _ => Value::String(v.to_string()),
    }
}

/// [`scalar`], or a list when the value is numbers joined by `:`.
fn guess(v: &str) -> Value {
    if v.contains(':') {
        let items: Vec<&str> = v.split(':').collect();
        if items.iter().all(|i| i.parse::<u64>().is_ok()) {
            return Value::Array(items.into_iter().map(scalar).collect());
        }
        return Value::String(v.to_string());
    }
    scalar(v)
}

/// Puts `value` at the dotted `key`, creating objects on the way.
fn insert(map: &mut Map<String, Value>, key: &str, value: Value) -> Result<(), String> {
    let mut cur = map;
    let mut parts = key.split('.').peekable();
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            if cur.contains_key(part) {
                return Err(format!("{key} is given twice"));
            }
            cur.insert(part.to_string(), value);
            return Ok(());
        }
        let next = cur
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        cur = match next {
            Value::Object(m) => m,
            _ => return Err(format!("{key}: {part} is a value, not a group of settings")),
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::{DiskConfig, IoThreadConfig};

    /// Parses with typing guessed from the values alone.
    fn parse_kv(s: &str) -> Result<Map<String, Value>, String> {
        parse_kv_with(s, &Hints::default())
    }

    #[test]
    fn types_nesting_and_lists() {
        let m = parse_kv("a=1,b=x,c=on,d=false,e=-3,t.iops_total=100,t.bps_total=7,l=1:3:5,p=/a:b")
            .unwrap();
        assert_eq!(
            Value::Object(m),
            json!({"a": 1, "b": "x", "c": true, "d": false, "e": -3,
                   "t": {"iops_total": 100, "bps_total": 7}, "l": [1, 3, 5], "p": "/a:b"})
        );
    }

    #[test]
    fn escaped_commas_and_hints() {
        let m = parse_kv_with("path=/x,,y,serial=1234,readonly=on", &DISK_HINTS).unwrap();
        assert_eq!(
            Value::Object(m),
            json!({"path": "/x,y", "serial": "1234", "readonly": true})
        );
        let m = parse_kv_with("id=io0,cpu_affinity=2", &IOTHREAD_HINTS).unwrap();
        assert_eq!(Value::Object(m), json!({"id": "io0", "cpu_affinity": [2]}));
    }

    #[test]
    fn errors_are_clear() {
        assert!(parse_kv("path").unwrap_err().contains("expected key=value"));
        assert!(parse_kv("a=1,a=2").unwrap_err().contains("twice"));
        assert!(parse_kv("t=1,t.x=2").unwrap_err().contains("not a group"));
        assert!(parse_kv("t..x=1").unwrap_err().contains("bad key"));
        assert!(parse_kv("=1").unwrap_err().contains("bad key"));
    }

    #[test]
    fn feeds_the_config_types() {
        let mut m = parse_kv_with(
            "id=d0,path=/img.raw,readonly=on,cache=writeback,aio=threads,num_queues=2,throttle.iops_total=500",
            &DISK_HINTS,
        )
        .unwrap();
        m.entry("id").or_insert(json!("x"));
        let d: DiskConfig = serde_json::from_value(Value::Object(m)).unwrap();
        assert!(d.readonly);
        assert_eq!(d.num_queues, 2);
        assert_eq!(d.throttle.as_ref().map(|t| t.iops_total), Some(500));
        d.validate().unwrap_or_else(|e| panic!("{e}"));

        let m = parse_kv_with(
            "id=io0,poll_max_ns=0,aio_max_batch=8,cpu_affinity=0:1",
            &IOTHREAD_HINTS,
        )
        .unwrap();
        let t: IoThreadConfig = serde_json::from_value(Value::Object(m)).unwrap();
        assert_eq!(
            (t.poll_max_ns, t.aio_max_batch, t.cpu_affinity),
            (0, 8, vec![0, 1])
        );

        let m = parse_kv_with("id=d0,path=/x,bogus=1", &DISK_HINTS).unwrap();
        let e = serde_json::from_value::<DiskConfig>(Value::Object(m)).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let m = parse_kv_with("id=d0,path=/x,num_queues=lots", &DISK_HINTS).unwrap();
        let e = serde_json::from_value::<DiskConfig>(Value::Object(m)).unwrap_err();
        assert!(e.to_string().contains("invalid type"), "{e}");
    }

    #[test]
    fn nbd_uris_pass_whole_and_reconnect_delay_is_for_nbd_only() {
        let m = parse_kv_with(
            "id=d0,path=nbd+unix:///vol?socket=/run/nbd.sock,reconnect_delay=0,num_queues=2",
            &DISK_HINTS,
        )
        .unwrap();
        let d: DiskConfig = serde_json::from_value(Value::Object(m)).unwrap();
        assert_eq!(
            d.path.to_str(),
            Some("nbd+unix:///vol?socket=/run/nbd.sock")
        );
        assert!(d.is_nbd() && d.host_path().is_none());
        assert_eq!(d.reconnect_delay(), std::time::Duration::ZERO);
        d.validate().unwrap_or_else(|e| panic!("{e}"));
        // aio=native needs O_DIRECT on a file; an NBD disk has no file.
        let mut n = DiskConfig::new("d", "nbd://h/e");
        n.aio = crate::config::AioKind::Native;
        n.validate().unwrap_or_else(|e| panic!("{e}"));
        let mut f = DiskConfig::new("d", "/img.raw");
        f.reconnect_delay = Some(3);
        assert!(f.validate().unwrap_err().contains("only for NBD disks"));
        let mut n = DiskConfig::new("d", "nbd://h/e");
        n.reconnect_delay = Some(99_999);
        assert!(
            n.validate()
                .unwrap_err()
                .contains("reconnect_delay must be")
        );
        let bad = DiskConfig::new("d", "nbd+unix:///e");
        assert!(bad.validate().unwrap_err().contains("socket"));
    }
}
