//! A qcow2 disk (a fresh image, every cluster allocated by the guest's writes) whose two
//! queues are served by two iothreads sharing the image, under the drivers' verified
//! random reads and writes; then `qemu-img check` finds no error and the image, read by
//! `qemu-img convert`, holds exactly what the drivers wrote.
//!
//! Skips, saying why, without `qemu-img`.

#![allow(clippy::cast_possible_truncation)] // Test data and figures, not guest input.

mod common;
mod support;

use block::ImageFormat;
use common::{Rig, mixed_load};
use devices::config::{DiskConfig, VqMapping};

const SIZE: u64 = 32 << 20;

#[test]
fn two_iothreads_share_a_fresh_qcow2_image_and_qemu_img_agrees() {
    let test = "two_iothreads_share_a_fresh_qcow2_image_and_qemu_img_agrees";
    if !tests::nbd_server::have("qemu-img", test, "qemu-utils") {
        return;
    }
    let mut d = DiskConfig::new("d0", "d0.qcow2");
    d.format = ImageFormat::Qcow2;
    d.cache = block::CacheMode::None;
    d.num_queues = 2;
    d.queue_size = 128;
    d.iothread_vq_mapping = Some(vec![
        VqMapping {
            iothread: "io0".into(),
            vqs: vec![0],
        },
        VqMapping {
            iothread: "io1".into(),
            vqs: vec![1],
        },
    ]);
    let mut rig = Rig::new(2, vec![d], SIZE);
    assert_eq!(rig.disks[0].device.disk().capacity(), SIZE);
    let region = SIZE / 512 / 2;
    let drivers = std::mem::take(&mut rig.disks[0].drivers);
    let loads: Vec<_> = drivers
        .into_iter()
        .enumerate()
        .map(|(q, mut drv)| {
            std::thread::spawn(move || {
                let (shadow, _) = mixed_load(&mut drv, q as u64 * region, region, 3000, q as u64);
                (q as u64 * region * 512, shadow)
            })
        })
        .collect();
    let shadows: Vec<_> = loads.into_iter().map(|t| t.join().unwrap()).collect();
    let image = rig.disks[0].image.clone();
    let dir = rig.dir.path().to_path_buf();
    let raw = dir.join("d0.raw");
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
    let out = std::process::Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(&image)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("No errors were found"), "{text}{out:?}");
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(&image)
        .arg(&raw)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let data = std::fs::read(&raw).unwrap();
    for (off, shadow) in &shadows {
        let off = *off as usize;
        assert!(
            data[off..off + shadow.len()] == shadow[..],
            "the image differs from what the driver at {off} wrote"
        );
    }
    drop(keep);
}
