//! The contenders: host io_uring on the file (the limit), our `vhost-user-blk` and
//! qemu-storage-daemon, each on the O_DIRECT file with either engine, on a null backend,
//! or as an NBD client of the same `qemu-nbd` serving the file (O_DIRECT, native AIO).

use std::path::PathBuf;
use std::time::Duration;

use super::engine::LoadResult;
use super::host_uring;
use super::pattern::Pattern;
use super::workload::Workload;
use crate::blkio_load;
use crate::contender::{Backend, Target};

/// Who serves the I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Server {
    /// Nobody: the load runs on the host's io_uring directly.
    Host,
    /// Our vhost-user-blk backend.
    Ours,
    /// qemu-storage-daemon.
    Qsd,
}

/// What backs the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Storage {
    /// The benchmark file with O_DIRECT, through this engine (`io_uring` or `native`).
    File(&'static str),
    /// A null backend (reads return zeroes, writes are dropped).
    Null,
    /// The benchmark file behind `qemu-nbd` (its own process, started per run), reached
    /// by the contender's NBD client over a Unix socket.
    Nbd,
    /// A qcow2 image (O_DIRECT, io_uring): with `fresh`, a new empty one per run (every
    /// write allocates), else one made from the benchmark file with every cluster
    /// allocated (made once, next to the file).
    Qcow2 {
        /// A new, empty image per run.
        fresh: bool,
    },
}

/// One column of the benchmark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Contender {
    /// Name used on the command line, in the table, JSON and chart.
    pub name: &'static str,
    /// Who serves.
    pub server: Server,
    /// What backs the disk.
    pub storage: Storage,
}

impl Contender {
    /// Whether its I/O reaches the benchmark file (directly or through an NBD server).
    pub fn uses_file(&self) -> bool {
        matches!(
            self.storage,
            Storage::File(_) | Storage::Nbd | Storage::Qcow2 { fresh: false }
        )
    }

    /// What backs it, as tables, JSON and ratios group them: `file`, `null` or `nbd`.
    pub fn storage_name(&self) -> &'static str {
        match self.storage {
            Storage::File(_) => "file",
            Storage::Null => "null",
            Storage::Nbd => "nbd",
            Storage::Qcow2 { fresh: false } => "qcow2",
            Storage::Qcow2 { fresh: true } => "qcow2-fresh",
        }
    }
}

const fn c(name: &'static str, server: Server, storage: Storage) -> Contender {
    Contender {
        name,
        server,
        storage,
    }
}

/// Every contender, in run and table order: ours and qsd alternate so that each pair of
/// runs sees the same conditions.
pub const ALL: [Contender; 13] = [
    c("limit", Server::Host, Storage::File("io_uring")),
    c("ours-io_uring", Server::Ours, Storage::File("io_uring")),
    c("qsd-io_uring", Server::Qsd, Storage::File("io_uring")),
    c("ours-native", Server::Ours, Storage::File("native")),
    c("qsd-native", Server::Qsd, Storage::File("native")),
    c("ours-null", Server::Ours, Storage::Null),
    c("qsd-null", Server::Qsd, Storage::Null),
    c("ours-nbd", Server::Ours, Storage::Nbd),
    c("qsd-nbd", Server::Qsd, Storage::Nbd),
    c("ours-qcow2", Server::Ours, Storage::Qcow2 { fresh: false }),
    c("qsd-qcow2", Server::Qsd, Storage::Qcow2 { fresh: false }),
    c(
        "ours-qcow2-fresh",
        Server::Ours,
        Storage::Qcow2 { fresh: true },
    ),
    c(
        "qsd-qcow2-fresh",
        Server::Qsd,
        Storage::Qcow2 { fresh: true },
    ),
];

/// Looks a contender up by name.
pub fn by_name(name: &str) -> Option<Contender> {
    ALL.iter().copied().find(|c| c.name == name)
}

/// Every contender name, comma separated (for help and errors).
pub fn names_of_all() -> String {
    ALL.iter().map(|c| c.name).collect::<Vec<_>>().join(", ")
}

/// Parses a `--contenders` list: names, `all`, `ours` or `qsd` (each of theirs), into
/// run order without repeats.
pub fn parse_list(names: &[String]) -> Result<Vec<Contender>, String> {
    let mut wanted: Vec<&str> = Vec::new();
    for name in names.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let group: Vec<&str> = match name {
            "all" => ALL.iter().map(|c| c.name).collect(),
            "ours" => pick(Server::Ours),
            "qsd" => pick(Server::Qsd),
            "nbd" => ALL
                .iter()
                .filter(|c| c.storage == Storage::Nbd)
                .map(|c| c.name)
                .collect(),
            "qcow2" => ALL
                .iter()
                .filter(|c| matches!(c.storage, Storage::Qcow2 { .. }))
                .map(|c| c.name)
                .collect(),
            _ => match by_name(name) {
                Some(c) => vec![c.name],
                None => {
                    return Err(format!(
                        "unknown contender {name:?}; known: all, ours, qsd, nbd, qcow2, {}",
                        names_of_all()
                    ));
                }
            },
        };
        wanted.extend(group);
    }
    super::pick_in_order(&ALL, |c| c.name, &wanted)
}

fn pick(server: Server) -> Vec<&'static str> {
    ALL.iter()
        .filter(|c| c.server == server)
        .map(|c| c.name)
        .collect()
}

/// Everything a run needs to start a contender.
#[derive(Clone, Debug)]
pub struct Setup {
    /// The benchmark file.
    pub file: PathBuf,
    /// Size of the null backends in bytes.
    pub null_size: u64,
    /// Our `vhost-user-blk` binary.
    pub ours: PathBuf,
    /// qemu-storage-daemon, when installed.
    pub qsd: Option<PathBuf>,
    /// qemu-nbd (the NBD contenders' server), when installed.
    pub qemu_nbd: Option<PathBuf>,
    /// An NBD server to use instead of starting qemu-nbd on the file (`--nbd URI`).
    pub nbd: Option<block::nbd::NbdUri>,
    /// Settings of our iothread (`key=value,...`), if any.
    pub iothread: Option<String>,
    /// Directory for the sockets.
    pub sockets: PathBuf,
}

/// Starts `contender` (when it has a server), runs `workload` against it with the client
/// `pattern` (the host io_uring limit always batches) and stops it.
pub fn measure(
    contender: &Contender,
    workload: &Workload,
    pattern: Pattern,
    setup: &Setup,
    warmup: Duration,
    runtime: Duration,
) -> Result<LoadResult, String> {
    // The NBD server lives as long as this run (dropped after the backend, it is killed).
    let (target, _nbd_server) = match contender.storage {
        Storage::File(aio) => (
            Target::File {
                path: setup.file.clone(),
                aio,
            },
            None,
        ),
        Storage::Null => (
            Target::Null {
                size: setup.null_size,
            },
            None,
        ),
        Storage::Nbd => match &setup.nbd {
            Some(uri) => (Target::Nbd(uri.clone()), None),
            None => nbd_on_the_file(setup)?,
        },
        Storage::Qcow2 { fresh } => (qcow2_image(setup, fresh)?, None),
    };
    let socket = setup.sockets.join(format!("{}.sock", contender.name));
    let backend = match contender.server {
        Server::Host => return host_uring::run(&setup.file, *workload, warmup, runtime),
        Server::Ours => Backend::ours(
            &setup.ours,
            &socket,
            &target,
            workload.queues,
            setup.iothread.as_deref(),
        )?,
        Server::Qsd => {
            let qsd = setup
                .qsd
                .as_deref()
                .ok_or("qemu-storage-daemon is not installed")?;
            Backend::qsd(qsd, &socket, &target, workload.queues)?
        }
    };
    let pid = backend.pid();
    blkio_load::run(
        &backend.socket,
        *workload,
        pattern,
        warmup,
        runtime,
        &mut || crate::contender::cpu_time_of(pid),
    )
    .map_err(|e| format!("{}: {e}", backend.name))
}

/// The qcow2 image of a qcow2 contender: a new empty one (`fresh`), or the benchmark
/// file converted once, every cluster allocated (`<file>.qcow2`, kept for later runs).
fn qcow2_image(setup: &Setup, fresh: bool) -> Result<Target, String> {
    let run = |args: &[&std::ffi::OsStr]| -> Result<(), String> {
        let out = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .map_err(|e| format!("qemu-img: {e} (apt-get install qemu-utils)"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "qemu-img {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    };
    let size = std::fs::metadata(&setup.file)
        .map_err(|e| format!("{}: {e}", setup.file.display()))?
        .len();
    let path = if fresh {
        let path = setup.sockets.join("fresh.qcow2");
        let _ = std::fs::remove_file(&path);
        run(&[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            path.as_os_str(),
            size.to_string().as_ref(),
        ])?;
        path
    } else {
        let path = setup.file.with_extension("qcow2");
        if !path.exists() {
            eprintln!(
                "converting {} to qcow2 (every cluster allocated)...",
                setup.file.display()
            );
            run(&[
                "convert".as_ref(),
                "-q".as_ref(),
                "-t".as_ref(),
                "none".as_ref(),
                "-S".as_ref(),
                "0".as_ref(),
                "-f".as_ref(),
                "raw".as_ref(),
                "-O".as_ref(),
                "qcow2".as_ref(),
                setup.file.as_os_str(),
                path.as_os_str(),
            ])?;
        }
        path
    };
    Ok(Target::Qcow2 { path })
}

/// Starts qemu-nbd serving the benchmark file (O_DIRECT, native AIO) on a Unix socket:
/// the NBD contenders' server when `--nbd` names none.
fn nbd_on_the_file(
    setup: &Setup,
) -> Result<(Target, Option<crate::nbd_server::NbdServer>), String> {
    if setup.qemu_nbd.is_none() {
        return Err("qemu-nbd is not installed (apt-get install qemu-utils)".into());
    }
    let socket = setup.sockets.join("qemu-nbd.sock");
    let server = crate::nbd_server::NbdServer::qemu_nbd_with(
        &setup.file,
        "bench",
        crate::nbd_server::Listen::Unix(socket),
        &["--cache=none", "--aio=native"],
    );
    let uri = server
        .uri()
        .parse()
        .map_err(|e: String| format!("qemu-nbd's URI: {e}"))?;
    Ok((Target::Nbd(uri), Some(server)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_expand_in_run_order() {
        let got = parse_list(&["qsd".into(), "limit".into()]).unwrap();
        let names: Vec<_> = got.iter().map(|c| c.name).collect();
        assert_eq!(
            names,
            [
                "limit",
                "qsd-io_uring",
                "qsd-native",
                "qsd-null",
                "qsd-nbd",
                "qsd-qcow2",
                "qsd-qcow2-fresh"
            ]
        );
        let nbd: Vec<_> = parse_list(&["nbd".into()])
            .unwrap()
            .iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(nbd, ["ours-nbd", "qsd-nbd"]);
        let qcow2: Vec<_> = parse_list(&["qcow2".into()])
            .unwrap()
            .iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(
            qcow2,
            [
                "ours-qcow2",
                "qsd-qcow2",
                "ours-qcow2-fresh",
                "qsd-qcow2-fresh"
            ]
        );
        assert_eq!(parse_list(&["all".into()]).unwrap().len(), ALL.len());
        assert!(parse_list(&["theirs".into()]).is_err());
    }

    #[test]
    fn ours_and_qsd_alternate() {
        for pair in ALL[1..].chunks(2) {
            assert_eq!(pair[0].server, Server::Ours);
            assert_eq!(pair[1].server, Server::Qsd);
            assert_eq!(pair[0].storage, pair[1].storage);
        }
    }
}
