//! Runs the plan: for each workload, `repeat` rounds in which every column (a contender
//! with a client pattern) runs once (A B A B ..., one pattern after the other), with a
//! progress line on stderr.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use super::contenders::{self, Contender, Server, Setup};
use super::pattern::Pattern;
use super::report::{Cell, RunRecord};
use super::workload::NamedWorkload;

/// What to run.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Workloads, in order.
    pub workloads: Vec<NamedWorkload>,
    /// Contenders that can run, in order.
    pub contenders: Vec<Contender>,
    /// Client patterns of the vhost-user contenders, in order.
    pub patterns: Vec<Pattern>,
    /// Runs per cell.
    pub repeat: usize,
    /// Warm-up before each measured window.
    pub warmup: Duration,
    /// Measured window of each run.
    pub runtime: Duration,
}

impl Plan {
    /// The columns of each workload, in run and table order: every contender with the
    /// first pattern, then every vhost-user contender with the next one, and so on (so
    /// ours and qsd still alternate). The host io_uring limit runs once, batching.
    pub fn columns(&self) -> Vec<(Contender, Pattern)> {
        let mut out = Vec::new();
        for &p in &self.patterns {
            for &c in &self.contenders {
                if c.server != Server::Host {
                    out.push((c, p));
                } else if !out.iter().any(|(o, _)| *o == c) {
                    out.push((c, Pattern::Batch));
                }
            }
        }
        out
    }

    /// Number of runs.
    pub fn total(&self) -> usize {
        self.workloads.len() * self.columns().len() * self.repeat
    }
}

/// The progress line: rewritten in place on a terminal, one line per run otherwise.
struct Progress {
    total: usize,
    done: usize,
    tty: bool,
}

impl Progress {
    fn start(&mut self, what: &str) {
        self.done += 1;
        if self.tty {
            eprint!("\r\x1b[K[{}/{}] {what} ...", self.done, self.total);
            let _ = std::io::stderr().flush();
        }
    }

    fn finish(&mut self, what: &str, outcome: &str) {
        if self.tty {
            eprint!(
                "\r\x1b[K[{}/{}] {what} ... {outcome}",
                self.done, self.total
            );
            let _ = std::io::stderr().flush();
        } else {
            eprintln!("[{}/{}] {what} ... {outcome}", self.done, self.total);
        }
    }

    fn end(&self) {
        if self.tty {
            eprintln!();
        }
    }
}

/// `71.2k`-style IOPS for the progress line.
fn short(iops: f64) -> String {
    if iops >= 1e6 {
        format!("{:.2}M", iops / 1e6)
    } else if iops >= 1e3 {
        format!("{:.1}k", iops / 1e3)
    } else {
        format!("{iops:.0}")
    }
}

/// Runs every cell of `plan`; a failed run is recorded in its cell and the rest go on.
pub fn run(plan: &Plan, setup: &Setup) -> Vec<Cell> {
    let mut progress = Progress {
        total: plan.total(),
        done: 0,
        tty: std::io::stderr().is_terminal(),
    };
    let mut cells = Vec::new();
    for w in &plan.workloads {
        let first = cells.len();
        cells.extend(plan.columns().into_iter().map(|(contender, pattern)| Cell {
            workload: *w,
            contender,
            pattern,
            runs: Vec::new(),
            errors: Vec::new(),
        }));
        for round in 0..plan.repeat {
            for cell in &mut cells[first..] {
                let what = format!(
                    "{} {} [{}] run {}/{}",
                    w.workload.label(),
                    cell.contender.name,
                    cell.pattern.as_str(),
                    round + 1,
                    plan.repeat
                );
                progress.start(&what);
                match contenders::measure(
                    &cell.contender,
                    &w.workload,
                    cell.pattern,
                    setup,
                    plan.warmup,
                    plan.runtime,
                ) {
                    Ok(r) => {
                        progress.finish(&what, &format!("{} IOPS", short(r.figures.iops)));
                        cell.runs.push(RunRecord::new(&r, w.workload.block_size));
                    }
                    Err(e) => {
                        progress.finish(&what, &format!("failed: {e}"));
                        if progress.tty {
                            eprintln!();
                        }
                        cell.errors.push(e);
                    }
                }
            }
        }
    }
    progress.end();
    cells
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_pattern_major_with_one_batching_limit() {
        let plan = |patterns: Vec<Pattern>| Plan {
            workloads: Vec::new(),
            contenders: contenders::parse_list(&[
                "limit".into(),
                "ours-null".into(),
                "qsd-null".into(),
            ])
            .unwrap(),
            patterns,
            repeat: 3,
            warmup: Duration::ZERO,
            runtime: Duration::ZERO,
        };
        let names = |p: &Plan| {
            p.columns()
                .iter()
                .map(|(c, p)| format!("{} {}", c.name, p.as_str()))
                .collect::<Vec<_>>()
        };
        let both = plan(vec![Pattern::Batch, Pattern::Resubmit]);
        assert_eq!(
            names(&both),
            [
                "limit batch",
                "ours-null batch",
                "qsd-null batch",
                "ours-null resubmit",
                "qsd-null resubmit"
            ]
        );
        assert_eq!(
            names(&plan(vec![Pattern::Resubmit])),
            ["limit batch", "ours-null resubmit", "qsd-null resubmit"]
        );
        assert_eq!(both.total(), 0);
    }

    #[test]
    fn short_iops() {
        assert_eq!(short(950.0), "950");
        assert_eq!(short(71_230.0), "71.2k");
        assert_eq!(short(1_250_000.0), "1.25M");
    }
}
