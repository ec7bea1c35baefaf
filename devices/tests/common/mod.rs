//! A virtio-blk device served by real iothreads, driven by the test-side driver.

#![allow(clippy::cast_possible_truncation)] // Test data and figures, not guest input.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use devices::config::{DiskConfig, IoThreadConfig};
use devices::iothread::IoThread;
use devices::virtio_blk::device::BlkDevice;

use crate::support::{BlkDriver, BlkDriverConfig, Completion, TestMemory};

/// One disk with a driver per queue.
pub struct Disk {
    pub device: Arc<BlkDevice>,
    pub drivers: Vec<BlkDriver>,
    pub image: PathBuf,
}

/// Guest memory, iothreads and disks.
pub struct Rig {
    pub mem: TestMemory,
    pub iothreads: Vec<Arc<IoThread>>,
    pub disks: Vec<Disk>,
    pub dir: tempfile::TempDir,
}

pub const QD: usize = 32;

pub fn driver_config() -> BlkDriverConfig {
    BlkDriverConfig {
        queue_size: 128,
        max_in_flight: QD,
        max_data_bytes: 64 * 1024,
        max_segments: 4,
        ..BlkDriverConfig::default()
    }
}

impl Rig {
    /// Iothreads named `io0..ioN`; disks from `configs` (paths relative to the temp dir
    /// are created with `size` bytes of zeroes, an empty qcow2 image of that size for
    /// `format: qcow2`; an existing absolute path is used as it is); each queue handed
    /// to the iothread its config names (`io0` when none).
    pub fn new(iothreads: usize, configs: Vec<DiskConfig>, size: u64) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let queues: usize = configs.iter().map(|c| usize::from(c.num_queues)).sum();
        let mem =
            TestMemory::new(driver_config().footprint() * (queues as u64 + 1) + (1 << 20)).unwrap();
        let iothreads: Vec<Arc<IoThread>> = (0..iothreads)
            .map(|i| Arc::new(IoThread::spawn(IoThreadConfig::new(format!("io{i}"))).unwrap()))
            .collect();
        let mut disks = Vec::new();
        for mut config in configs {
            let image = dir.path().join(&config.path);
            if image.exists() {
                // An image the test made itself (an absolute path).
                config.path = image.clone();
            } else if config.format == block::ImageFormat::Qcow2 {
                let out = std::process::Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2"])
                    .arg(&image)
                    .arg(size.to_string())
                    .output()
                    .unwrap();
                assert!(out.status.success(), "{out:?}");
                config.path = image.clone();
            } else if !config.is_null() {
                std::fs::File::create(&image)
                    .unwrap()
                    .set_len(size)
                    .unwrap();
                config.path = image.clone();
            }
            let device = Arc::new(BlkDevice::open(config.clone(), None).unwrap());
            let mut drivers = Vec::new();
            for (q, thread) in config.queue_iothreads().into_iter().enumerate() {
                let drv = BlkDriver::new(&mem, driver_config()).unwrap();
                let name = thread.unwrap_or_else(|| "io0".into());
                let io = iothreads
                    .iter()
                    .find(|t| t.id() == name)
                    .expect("iothread exists");
                let worker = device
                    .new_worker(q as u16, drv.local_queue().unwrap(), mem.guest_mem(), 32)
                    .unwrap();
                io.add(Box::new(worker)).unwrap();
                drivers.push(drv);
            }
            disks.push(Disk {
                device,
                drivers,
                image,
            });
        }
        Rig {
            mem,
            iothreads,
            disks,
            dir,
        }
    }
}

/// Keeps QD verified random 4K..64K reads and writes in flight on one driver for `n`
/// requests, within sectors [first, first + sectors); returns the shadow of what it
/// wrote (to compare with the image) and the number of completions.
pub fn mixed_load(
    drv: &mut BlkDriver,
    first: u64,
    sectors: u64,
    n: usize,
    seed: u64,
) -> (Vec<u8>, usize) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut shadow = vec![0u8; (sectors * 512) as usize];
    // Sectors with a request in flight, so that no two overlap.
    let mut busy = vec![false; sectors as usize];
    let mut pending: std::collections::HashMap<u64, (bool, u64, Vec<u8>)> = Default::default();
    let (mut issued, mut done) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(60);
    // The longest wait for a completion: tells a slow host from a lost notification.
    let mut longest = Duration::ZERO;
    while done < n {
        assert!(
            Instant::now() < deadline,
            "load timed out: {done} of {n} (the longest wait for a completion took {longest:?})"
        );
        while issued < n && drv.in_flight() < QD {
            let len_sectors = rng.random_range(8..=128u64);
            let start = rng.random_range(0..sectors - len_sectors);
            let range = start as usize..(start + len_sectors) as usize;
            if busy[range.clone()].iter().any(|&b| b) {
                continue;
            }
            let segments = rng.random_range(1..=4);
            if !drv.has_room(crate::support::ReqOptions {
                segments,
                indirect: false,
            }) {
                break;
            }
            let write = rng.random_bool(0.5);
            let id = if write {
                let mut data = vec![0u8; (len_sectors * 512) as usize];
                rng.fill(&mut data[..]);
                let id = drv.submit_write(first + start, &data, segments).unwrap();
                pending.insert(id.0, (true, start, data));
                id
            } else {
                let id = drv
                    .submit_read(first + start, (len_sectors * 512) as u32, segments)
                    .unwrap();
                pending.insert(id.0, (false, start, Vec::new()));
                id
            };
            let _ = id;
            busy[range].iter_mut().for_each(|b| *b = true);
            issued += 1;
        }
        drv.kick().unwrap();
        let waited = Instant::now();
        let completions = drv.wait(Duration::from_secs(10)).unwrap();
        longest = longest.max(waited.elapsed());
        // Ten seconds without a completion while requests are in flight is a hang (a
        // lost kick or interrupt), not a slow host: say so at once.
        assert!(
            !completions.is_empty() || drv.in_flight() == 0,
            "no completion in 10 s: {done} of {n} done, {} in flight, avail {} used {}, \
             (avail_event, last kick at) {:?}, {:?}",
            drv.in_flight(),
            drv.vq().avail_idx(),
            drv.vq().last_used(),
            drv.vq().kick_state(),
            drv.vq().stats()
        );
        for c in completions {
            let (write, start, data) = pending.remove(&c.id.0).expect("known request");
            assert_eq!(c.status, 0, "request failed: {c:?}");
            let off = (start * 512) as usize;
            if write {
                shadow[off..off + data.len()].copy_from_slice(&data);
                busy[start as usize..start as usize + data.len() / 512]
                    .iter_mut()
                    .for_each(|b| *b = false);
            } else {
                assert_eq!(
                    c.used_len as usize,
                    c.data.len() + 1,
                    "used length of a read"
                );
                assert!(
                    c.data == shadow[off..off + c.data.len()],
                    "read at sector {start} returned other data"
                );
                busy[start as usize..start as usize + c.data.len() / 512]
                    .iter_mut()
                    .for_each(|b| *b = false);
            }
            done += 1;
        }
    }
    assert!(drv.vq().stats().missed_interrupts == 0, "lost interrupts");
    (shadow, done)
}

/// Runs one request to completion.
pub fn run1(drv: &mut BlkDriver, op: crate::support::BlkOp) -> Completion {
    let opts = crate::support::ReqOptions {
        segments: 1,
        indirect: false,
    };
    drv.run(op, opts, Duration::from_secs(10)).unwrap()
}

/// Disk d0 at `path` with two queues, one on each of iothreads `io0` and `io1`.
pub fn two_queue_disk(path: &str) -> devices::config::DiskConfig {
    let mut d = devices::config::DiskConfig::new("d0", path);
    d.num_queues = 2;
    d.queue_size = 128;
    d.iothread_vq_mapping = Some(vec![
        devices::config::VqMapping {
            iothread: "io0".into(),
            vqs: vec![0],
        },
        devices::config::VqMapping {
            iothread: "io1".into(),
            vqs: vec![1],
        },
    ]);
    d
}

/// Runs [`mixed_load`] of `requests` on each driver of the rig's first disk (of `size`
/// bytes), each in its own half, in threads; each returns its region's byte offset and
/// shadow.
pub fn spawn_loads(
    rig: &mut Rig,
    size: u64,
    requests: usize,
) -> Vec<std::thread::JoinHandle<(u64, Vec<u8>)>> {
    let region = size / 512 / 2;
    std::mem::take(&mut rig.disks[0].drivers)
        .into_iter()
        .enumerate()
        .map(|(q, mut drv)| {
            std::thread::spawn(move || {
                let (shadow, _) =
                    mixed_load(&mut drv, q as u64 * region, region, requests, q as u64);
                (q as u64 * region * 512, shadow)
            })
        })
        .collect()
}

/// Asserts that `image` holds what each load's shadow says at its offset.
pub fn check_image(image: &[u8], shadows: &[(u64, Vec<u8>)]) {
    for (off, shadow) in shadows {
        let off = *off as usize;
        assert!(
            image[off..off + shadow.len()] == shadow[..],
            "the image differs from what the driver at {off} wrote"
        );
    }
}
