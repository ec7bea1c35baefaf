//! qcow2 at the device layer, judged by `qemu-img check` and `qemu-img convert`:
//! - a fresh image (every cluster allocated by the guest's writes) whose two queues are
//!   served by two iothreads sharing the image, under the drivers' verified random reads
//!   and writes: the image holds exactly what the drivers wrote;
//! - a raw disk mirrored to a new qcow2 image and pivoted under that load;
//! - a qcow2 overlay mirrored with `sync: top`: the target gets the overlay's backing
//!   file and only the overlay's own clusters, and reads back as the disk did.
//!
//! Skips, saying why, without `qemu-img`.

#![allow(clippy::cast_possible_truncation)] // Test data and figures, not guest input.

mod common;
mod support;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use block::ImageFormat;
use block::jobs::{JobState, SyncMode};
use common::{Rig, check_image, run1, spawn_loads, two_queue_disk};
use devices::config::DiskConfig;
use devices::mirror::{Mirror, MirrorConfig, open_target};
use support::BlkOp;

const SIZE: u64 = 32 << 20;

#[test]
fn two_iothreads_share_a_fresh_qcow2_image_and_qemu_img_agrees() {
    let test = "two_iothreads_share_a_fresh_qcow2_image_and_qemu_img_agrees";
    if !tests::nbd_server::have("qemu-img", test, "qemu-utils") {
        return;
    }
    let mut d = two_queue_disk("d0.qcow2");
    d.format = ImageFormat::Qcow2;
    d.cache = block::CacheMode::None;
    let mut rig = Rig::new(2, vec![d], SIZE);
    assert_eq!(rig.disks[0].device.disk().capacity(), SIZE);
    let loads = spawn_loads(&mut rig, SIZE, 3000);
    let joined: Vec<_> = loads.into_iter().map(|t| t.join()).collect();
    if joined.iter().any(Result::is_err) {
        // What the device side saw when the load gave up: a hang is in the engine when
        // its requests are in flight there, else in the rings.
        let threads: Vec<_> = rig.iothreads.iter().map(|t| t.counters()).collect();
        // Where each thread is: its state, and the syscall it sleeps in, if any.
        let mut tasks = String::new();
        for t in std::fs::read_dir("/proc/self/task")
            .into_iter()
            .flatten()
            .flatten()
        {
            let p = t.path();
            let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
            let stat = read("stat");
            let state = stat
                .rsplit(") ")
                .next()
                .unwrap_or("")
                .split(' ')
                .next()
                .unwrap_or("");
            tasks += &format!(
                "{} {}: state {state}, syscall {}, wchan {}\n",
                t.file_name().to_string_lossy(),
                read("comm").trim(),
                read("syscall").split(' ').next().unwrap_or("").trim(),
                read("wchan")
            );
        }
        panic!(
            "the load failed (above); the disk: {:?}\nthe iothreads: {threads:?}\n{tasks}",
            rig.disks[0].device.counters()
        );
    }
    let shadows: Vec<_> = joined.into_iter().flatten().collect();
    let image = rig.disks[0].image.clone();
    // The disk closes with the rig (its metadata written back).
    let Rig {
        disks,
        iothreads,
        dir: keep,
        ..
    } = rig;
    drop(disks);
    for t in iothreads {
        drop(t);
    }
    let data = tests::image::qcow2_bytes(&image);
    check_image(&data, &shadows);
    drop(keep);
}

fn qemu_img(args: &[&std::ffi::OsStr]) -> String {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "qemu-img {args:?}: {text}{out:?}");
    text
}

fn mirror_config(target: PathBuf, sync: SyncMode) -> MirrorConfig {
    let mut c: MirrorConfig = serde_json::from_value(serde_json::json!({
        "job_id": "m0", "disk": "d0", "target": {"path": target, "format": "qcow2"}
    }))
    .unwrap();
    c.sync = sync;
    c
}

fn wait_ready(mirror: &Mirror) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while mirror.info().state != JobState::Ready {
        assert!(Instant::now() < deadline, "{:?}", mirror.info());
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn a_raw_disk_mirrors_to_a_new_qcow2_image_and_pivots_under_load() {
    let test = "a_raw_disk_mirrors_to_a_new_qcow2_image_and_pivots_under_load";
    if !tests::nbd_server::have("qemu-img", test, "qemu-utils") {
        return;
    }
    let mut rig = Rig::new(2, vec![two_queue_disk("d0.raw")], SIZE);
    let blk = rig.disks[0].device.clone();
    let loads = spawn_loads(&mut rig, SIZE, 3000);
    let target = rig.dir.path().join("t.qcow2");
    let config = mirror_config(target.clone(), SyncMode::Full);
    let disk = open_target(&blk, &config).unwrap();
    assert_eq!(disk.format(), ImageFormat::Qcow2);
    let mut mirror = Mirror::start(&blk, rig.iothreads.clone(), config, disk, None).unwrap();
    wait_ready(&mirror);
    mirror.complete(&blk).unwrap();
    let now = blk.config();
    assert_eq!(
        (now.path.as_path(), now.format),
        (target.as_path(), ImageFormat::Qcow2)
    );
    let shadows: Vec<_> = loads.into_iter().map(|t| t.join().unwrap()).collect();
    let Rig {
        disks,
        iothreads,
        dir: keep,
        ..
    } = rig;
    drop((mirror, blk, disks, iothreads));
    let data = tests::image::qcow2_bytes(&target);
    check_image(&data, &shadows);
    drop(keep);
}

#[test]
fn sync_top_copies_only_the_overlays_clusters_and_keeps_the_backing_file() {
    let test = "sync_top_copies_only_the_overlays_clusters_and_keeps_the_backing_file";
    if !tests::nbd_server::have("qemu-img", test, "qemu-utils") {
        return;
    }
    let images = tempfile::tempdir().unwrap();
    let base = images.path().join("base.raw");
    let mut model: Vec<u8> = (0..SIZE as usize).map(|i| (i % 249) as u8).collect();
    std::fs::write(&base, &model).unwrap();
    let overlay = images.path().join("overlay.qcow2");
    qemu_img(&[
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-b".as_ref(),
        base.as_os_str(),
        "-F".as_ref(),
        "raw".as_ref(),
        overlay.as_os_str(),
    ]);
    let mut d = DiskConfig::new("d0", &overlay);
    d.format = ImageFormat::Qcow2;
    let mut rig = Rig::new(1, vec![d], SIZE);
    let blk = rig.disks[0].device.clone();
    let mut drv = rig.disks[0].drivers.remove(0);
    // Some clusters of the overlay's own before the mirror, some while it runs.
    let mut write = |drv: &mut support::BlkDriver, sector: u64, fill: u8| {
        let data = vec![fill; 8192];
        let c = run1(
            drv,
            BlkOp::Write {
                sector,
                data: data.clone(),
            },
        );
        assert_eq!(c.status, 0);
        let at = (sector * 512) as usize;
        model[at..at + data.len()].copy_from_slice(&data);
    };
    for (i, sector) in [0u64, 2048, 40_000, 65_000].into_iter().enumerate() {
        write(&mut drv, sector, 0x10 + i as u8);
    }
    let target = images.path().join("top.qcow2");
    let config = mirror_config(target.clone(), SyncMode::Top);
    let disk = open_target(&blk, &config).unwrap();
    assert_eq!(
        disk.qcow2().and_then(|i| i.backing()),
        Some((base.as_path(), ImageFormat::Raw)),
        "the target has the disk's backing file"
    );
    let mut mirror = Mirror::start(&blk, rig.iothreads.clone(), config, disk, None).unwrap();
    write(&mut drv, 30_000, 0x55);
    wait_ready(&mirror);
    write(&mut drv, 10_000, 0x66);
    mirror.complete(&blk).unwrap();
    write(&mut drv, 50_000, 0x77);
    let info = mirror.info();
    assert!(
        info.bytes_done < 1 << 20,
        "only the overlay's clusters were copied: {info:?}"
    );
    let Rig {
        disks,
        iothreads,
        dir: keep,
        ..
    } = rig;
    drop((mirror, blk, drv, disks, iothreads, keep));
    let data = tests::image::qcow2_bytes(&target);
    let first_bad = data.iter().zip(&model).position(|(a, b)| a != b);
    assert_eq!(first_bad, None, "the pivoted disk reads as the model");
    assert!(
        std::fs::metadata(&target).unwrap().len() < 4 << 20,
        "the target holds the top layer only"
    );
}
