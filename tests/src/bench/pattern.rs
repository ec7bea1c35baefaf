//! How the client keeps its queue full: `batch` (reap every completion there is, then
//! send all their replacements together) or `resubmit` (fio's default: each request goes
//! back out as soon as its completion is seen).

/// One client pattern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Each `do_io` reaps up to `iodepth` completions; the next one sends all their
    /// replacements together.
    Batch,
    /// Each `do_io` reaps at most one completion; the next one sends its replacement
    /// right away (fio's default).
    Resubmit,
}

impl Pattern {
    /// The name the command line, the table and the JSON use.
    pub fn as_str(self) -> &'static str {
        match self {
            Pattern::Batch => "batch",
            Pattern::Resubmit => "resubmit",
        }
    }
}

/// Every pattern, in run and table order.
pub const ALL: [Pattern; 2] = [Pattern::Batch, Pattern::Resubmit];

/// Parses a `--patterns` list (names, or `all`) into run order without repeats.
pub fn parse_list(names: &[String]) -> Result<Vec<Pattern>, String> {
    let mut wanted = Vec::new();
    for name in names.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        match name {
            "all" => wanted.extend(ALL),
            _ => match ALL.iter().find(|p| p.as_str() == name) {
                Some(&p) => wanted.push(p),
                None => {
                    return Err(format!(
                        "unknown pattern {name:?}; known: all, batch, resubmit"
                    ));
                }
            },
        }
    }
    if wanted.is_empty() {
        return Err("--patterns names none".into());
    }
    Ok(ALL.into_iter().filter(|p| wanted.contains(p)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_keeps_run_order_without_repeats() {
        let p = |s: &[&str]| parse_list(&s.iter().map(|x| x.to_string()).collect::<Vec<_>>());
        assert_eq!(p(&["resubmit", "batch"]).unwrap(), ALL);
        assert_eq!(p(&["all", "batch"]).unwrap(), ALL);
        assert_eq!(p(&[" resubmit "]).unwrap(), [Pattern::Resubmit]);
        assert!(p(&["fio"]).unwrap_err().contains("unknown pattern"));
        assert!(p(&[]).is_err());
    }

    #[test]
    fn names() {
        assert_eq!(Pattern::Batch.as_str(), "batch");
        assert_eq!(Pattern::Resubmit.as_str(), "resubmit");
    }
}
