//! Configs of other VMMs turned into ours: a libvirt domain XML (`vmctl import-libvirt`)
//! or a QEMU command line (`vmctl import-qemu`). Each import gives JSON that `vm.create`
//! takes unchanged, and lists what it left out, so the caller can show it or (with
//! `--strict`) refuse.

pub mod libvirt;
pub mod qemu;

use devices::config::VqMapping;
use vmm::config::VmConfig;

/// What an import made: the config, and what the source had that it left out.
#[derive(Debug)]
pub struct Imported {
    /// The VM config.
    pub config: VmConfig,
    /// What was ignored or changed, one line each (`devices/interface`, `-netdev ...`).
    pub ignored: Vec<String>,
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
