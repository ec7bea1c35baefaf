//! The pieces of `blkbench`, the side-by-side vhost-user-blk benchmark: the workload
//! catalogue, the per-queue load loop shared by every client, the client patterns, the
//! contenders, the host io_uring reference, the runner, and the table, JSON and SVG
//! reports; and the in-VM contenders (the test guest under our `vmm` and under QEMU).

pub mod chart;
pub mod contenders;
pub mod engine;
pub mod host;
pub mod host_uring;
pub mod invm;
pub mod pattern;
pub mod report;
pub mod runner;
pub mod table;
pub mod workload;

/// The entries of `all` whose name is in `wanted`, in `all`'s order and once each: a
/// `--contenders` list after its names and groups were expanded.
pub fn pick_in_order<T: Copy>(
    all: &[T],
    name: impl Fn(&T) -> &str,
    wanted: &[&str],
) -> Result<Vec<T>, String> {
    if wanted.is_empty() {
        return Err("--contenders names none".into());
    }
    Ok(all
        .iter()
        .copied()
        .filter(|c| wanted.contains(&name(c)))
        .collect())
}
