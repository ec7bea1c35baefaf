//! The values of QEMU options as one flat list of dotted keys: `key=value,...` strings
//! (QemuOpts and keyval: `,,` is a literal comma, a first bare word may name an implied
//! key) and JSON objects (`-blockdev '{"driver":"file",...}'`, flattened to the same
//! dotted keys: `file.filename`, `iothread-vq-mapping.0.vqs.1`). Each key taken is
//! marked, so what nothing took can be listed as ignored.

use std::collections::BTreeSet;

use serde_json::Value;

use super::super::ImportError;

/// One option's values, in order, with the keys taken so far.
#[derive(Clone, Debug, Default)]
pub struct Opts {
    items: Vec<(String, String)>,
    taken: BTreeSet<String>,
    json: bool,
}

impl Opts {
    /// Parses `text`: a JSON object when it starts with `{`, else `key=value,...` where a
    /// first word without `=` is the value of `implied` (e.g. `-m 2G`: `size=2G`).
    pub fn parse(text: &str, implied: Option<&str>) -> Result<Opts, ImportError> {
        let mut opts = Opts::default();
        if text.trim_start().starts_with('{') {
            let v: Value = serde_json::from_str(text)
                .map_err(|e| ImportError::Invalid(format!("bad JSON in {text:?}: {e}")))?;
            if !v.is_object() {
                return Err(ImportError::Invalid(format!(
                    "{text:?} is not a JSON object"
                )));
            }
            flatten("", &v, &mut opts.items);
            opts.json = true;
            return Ok(opts);
        }
        for (i, part) in split_commas(text).into_iter().enumerate() {
            if part.is_empty() {
                continue;
            }
            match part.split_once('=') {
                Some((k, v)) => opts.items.push((k.to_string(), v.to_string())),
                None => match implied {
                    Some(key) if i == 0 => opts.items.push((key.to_string(), part)),
                    // QemuOpts' short form of a flag: `readonly` is `readonly=on`.
                    _ => opts.items.push((part, "on".to_string())),
                },
            }
        }
        Ok(opts)
    }

    /// Whether the option was given as JSON.
    pub fn is_json(&self) -> bool {
        self.json
    }

    /// The last value of `key` (QEMU keeps the last), marked taken.
    pub fn take(&mut self, key: &str) -> Option<String> {
        let v = self.peek(key).map(str::to_string)?;
        self.taken.insert(key.to_string());
        Some(v)
    }

    /// The last value of `key`, not marked.
    pub fn peek(&self, key: &str) -> Option<&str> {
        self.items
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Sets `key` (as `-set` and `-global` do), unless `only_if_absent` and it is there.
    pub fn set(&mut self, key: &str, value: &str, only_if_absent: bool) {
        if only_if_absent && self.peek(key).is_some() {
            return;
        }
        self.items.push((key.to_string(), value.to_string()));
    }

    /// Whether any key starts with `prefix` (e.g. `file.` for an inline child node).
    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.items.iter().any(|(k, _)| k.starts_with(prefix))
    }

    /// The keys under `prefix` (without it) and their values, each marked taken.
    pub fn take_prefix(&mut self, prefix: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (k, v) in &self.items {
            if let Some(rest) = k.strip_prefix(prefix) {
                self.taken.insert(k.clone());
                if let Some(i) = out.iter().position(|(o, _): &(String, String)| o == rest) {
                    out.remove(i);
                }
                out.push((rest.to_string(), v.clone()));
            }
        }
        out
    }

    /// `key` as a flag (`on|off|yes|no|true|false`), marked taken.
    pub fn take_bool(&mut self, key: &str) -> Result<Option<bool>, ImportError> {
        self.take(key)
            .map(|v| match v.as_str() {
                "on" | "yes" | "true" => Ok(true),
                "off" | "no" | "false" => Ok(false),
                _ => Err(ImportError::Invalid(format!(
                    "{key}={v}: expected on or off"
                ))),
            })
            .transpose()
    }

    /// `key` as a number, marked taken.
    pub fn take_number<T: std::str::FromStr>(
        &mut self,
        key: &str,
    ) -> Result<Option<T>, ImportError> {
        self.take(key)
            .map(|v| {
                v.parse()
                    .map_err(|_| ImportError::Invalid(format!("{key}={v}: not a number")))
            })
            .transpose()
    }

    /// Marks `keys` taken without reading them (keys with no meaning here, such as
    /// `node-name`, that should not be listed as ignored).
    pub fn accept(&mut self, keys: &[&str]) {
        for k in keys {
            if self.peek(k).is_some() {
                self.taken.insert((*k).to_string());
            }
        }
    }

    /// The `key=value` pairs nothing took, for the ignored list.
    pub fn untaken(&self) -> Vec<String> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for (k, v) in self.items.iter().rev() {
            if !self.taken.contains(k) && seen.insert(k) {
                out.push(format!("{k}={v}"));
            }
        }
        out.reverse();
        out
    }
}

/// Splits on commas; `,,` is a comma inside a value.
fn split_commas(text: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut part = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' && chars.peek() == Some(&',') {
            chars.next();
            part.push(',');
        } else if c == ',' {
            parts.push(std::mem::take(&mut part));
        } else {
            part.push(c);
        }
    }
    parts.push(part);
    parts
}

/// A JSON value as dotted keys: objects by member name, arrays by index, `true`/`false`
/// as `on`/`off`, `null` as `null`.
fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
    let key = |k: &str| {
        if prefix.is_empty() {
            k.to_string()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                flatten(&key(k), v, out);
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                flatten(&key(&i.to_string()), v, out);
            }
        }
        Value::Bool(b) => out.push((prefix.to_string(), if *b { "on" } else { "off" }.into())),
        Value::Null => out.push((prefix.to_string(), "null".into())),
        Value::Number(n) => out.push((prefix.to_string(), n.to_string())),
        Value::String(s) => out.push((prefix.to_string(), s.clone())),
    }
}

/// A QEMU size (`512`, `2G`, `1.5G`, `64k`) in bytes; a bare number is `default_unit`
/// bytes (`-m`'s is MiB).
pub fn size_bytes(text: &str, default_unit: u64) -> Result<u64, ImportError> {
    let bad = || ImportError::Invalid(format!("size {text:?}"));
    let t = text.trim();
    let (number, unit) = match t.char_indices().find(|(_, c)| c.is_ascii_alphabetic()) {
        Some((i, _)) => (&t[..i], &t[i..]),
        None => (t, ""),
    };
    let per: u64 = match unit.to_ascii_lowercase().trim_end_matches(['b', 'i']) {
        "" if unit.is_empty() => default_unit,
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        "p" => 1 << 50,
        "e" => 1 << 60,
        _ => return Err(bad()),
    };
    match number.split_once('.') {
        None => number
            .parse::<u64>()
            .map_err(|_| bad())?
            .checked_mul(per)
            .ok_or_else(bad),
        Some((whole, frac)) => {
            // A fraction of the unit, exact to the byte: `1.5G`.
            let whole: u64 = if whole.is_empty() {
                0
            } else {
                whole.parse().map_err(|_| bad())?
            };
            if frac.is_empty() || frac.len() > 18 || !frac.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            let digits = u32::try_from(frac.len()).map_err(|_| bad())?;
            let scale = 10u128.pow(digits);
            let frac: u128 = frac.parse().map_err(|_| bad())?;
            let bytes = u128::from(whole) * u128::from(per) + frac * u128::from(per) / scale;
            u64::try_from(bytes).map_err(|_| bad())
        }
    }
}
