//! Configs of other VMMs turned into ours: a libvirt domain XML (`vmctl import-libvirt`)
//! or a QEMU command line (`vmctl import-qemu`). Each import gives JSON that `vm.create`
//! takes unchanged, and lists what it left out, so the caller can show it or (with
//! `--strict`) refuse.

pub mod libvirt;
pub mod qemu;

use std::collections::BTreeMap;

use block::throttle::ThrottleLimits;
use devices::config::VqMapping;
use vmm::config::{ThrottleGroupConfig, VmConfig};

/// What an import made: the config, what the source had that it left out, and where
/// it read the source in a way worth saying.
#[derive(Debug)]
pub struct Imported {
    /// The VM config.
    pub config: VmConfig,
    /// What was left out, one line each (`devices/interface`, `-netdev ...`): `--strict`
    /// refuses an import with any.
    pub ignored: Vec<String>,
    /// Defaults and readings said, not lost (`no aio= (QEMU's default: threads): ours,
    /// io_uring`).
    pub notes: Vec<String>,
}

/// What an import has to say, as it goes: what it left out, and notes.
#[derive(Debug, Default)]
pub struct Said {
    /// Left out.
    pub ignored: Vec<String>,
    /// Said, not lost.
    pub notes: Vec<String>,
}

impl Said {
    /// Something left out.
    pub fn push(&mut self, line: String) {
        self.ignored.push(line);
    }

    /// A default or a reading worth saying.
    pub fn note(&mut self, line: String) {
        self.notes.push(line);
    }
}

impl Extend<String> for Said {
    /// Lines left out.
    fn extend<I: IntoIterator<Item = String>>(&mut self, lines: I) {
        self.ignored.extend(lines);
    }
}

/// Why an import failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// Not well-formed XML.
    #[error("bad XML at line {line}, column {column}: {message}")]
    Xml {
        /// 1-based line.
        line: u32,
        /// 1-based column.
        column: u32,
        /// What the parser said.
        message: String,
    },
    /// Well-formed, but not something we can import (the message says what and where).
    #[error("{0}")]
    Invalid(String),
}

impl Imported {
    /// The import of `config` with the throttle `groups` it named and what was `said`.
    fn new(mut config: VmConfig, groups: BTreeMap<String, ThrottleLimits>, said: Said) -> Self {
        config.throttle_groups = groups
            .into_iter()
            .map(|(id, limits)| ThrottleGroupConfig { id, limits })
            .collect();
        Imported {
            config,
            ignored: said.ignored,
            notes: said.notes,
        }
    }
}

/// The most iothreads an import makes.
const MAX_IOTHREADS: u32 = 64;

/// An iothread-to-queue mapping whose entries name no queues gets the disk's
/// `num_queues` queues in turn (as libvirt and QEMU spread them); one that names any is
/// kept as given. Entries left with no queue are dropped.
fn spread_queues(mut mapping: Vec<VqMapping>, num_queues: u16) -> Vec<VqMapping> {
    if !mapping.is_empty() && mapping.iter().all(|m| m.vqs.is_empty()) {
        let n = mapping.len();
        for q in 0..num_queues {
            mapping[usize::from(q) % n].vqs.push(q);
        }
        mapping.retain(|m| !m.vqs.is_empty());
    }
    mapping
}
