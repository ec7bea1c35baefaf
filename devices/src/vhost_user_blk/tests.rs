//! Unit tests of the backend: configuration, thread plan, config space, features.

#![allow(clippy::cast_possible_truncation)] // Test data and figures, not guest input.

use super::*;
use crate::config::VqMapping;

fn cfg(disk: DiskConfig, threads: &[&str]) -> BackendConfig {
    BackendConfig {
        disk,
        iothreads: threads.iter().map(|t| IoThreadConfig::new(*t)).collect(),
    }
}

#[test]
fn plans_threads_per_iothread_settings() {
    let mut d = DiskConfig::new("d0", "/x");
    d.num_queues = 3;
    let plan = cfg(d.clone(), &[]).thread_plan();
    assert_eq!(plan.len(), 1);
    assert_eq!(plan[0].config.id, "d0-iothread");
    assert_eq!(plan[0].queues, [0, 1, 2]);

    let plan = cfg(d.clone(), &["io0"]).thread_plan();
    assert_eq!(
        (plan.len(), plan[0].config.id.as_str()),
        (1, "io0"),
        "a sole iothread is used"
    );

    d.iothread_vq_mapping = Some(vec![
        VqMapping {
            iothread: "b".into(),
            vqs: vec![1],
        },
        VqMapping {
            iothread: "a".into(),
            vqs: vec![0, 2],
        },
    ]);
    let c = cfg(d, &["a", "b"]);
    c.validate().unwrap();
    let plan = c.thread_plan();
    let got: Vec<_> = plan
        .iter()
        .map(|p| (p.config.id.as_str(), p.queues.clone()))
        .collect();
    assert_eq!(got, [("a", vec![0, 2]), ("b", vec![1])]);
}

#[test]
fn validation_names_the_problem() {
    let mut d = DiskConfig::new("d0", "/x");
    d.iothread = Some("io9".into());
    assert!(
        cfg(d.clone(), &["io0"])
            .validate()
            .unwrap_err()
            .contains("io9 is not declared")
    );
    d.iothread = None;
    assert!(
        cfg(d.clone(), &["a", "b"])
            .validate()
            .unwrap_err()
            .contains("several iothreads")
    );
    assert!(
        cfg(d.clone(), &["a", "a"])
            .validate()
            .unwrap_err()
            .contains("twice")
    );
    d.throttle_group = Some("g".into());
    assert!(
        cfg(d, &[])
            .validate()
            .unwrap_err()
            .contains("throttle_group")
    );
}

mod backend {
    use std::os::fd::AsRawFd;

    use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
    use vhost_user_backend::VhostUserBackend;
    use virtio_bindings::bindings::virtio_blk::{
        VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_WRITE_ZEROES,
    };
    use virtio_bindings::bindings::virtio_config::{
        VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_RING_PACKED, VIRTIO_F_VERSION_1,
    };
    use virtio_bindings::bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
    use vmm_sys_util::epoll::EventSet;

    use super::*;
    use crate::config::VqMapping;
    use crate::virtio_blk::config_space::WCE_OFFSET;

    fn null_disk(size: u64) -> DiskConfig {
        let mut d = DiskConfig::new("d0", "null");
        d.null_size = Some(size);
        d
    }

    fn backend(disk: DiskConfig, threads: &[&str]) -> std::sync::Arc<Backend> {
        Backend::new(cfg(disk, threads)).unwrap()
    }

    fn le_u64(b: &[u8]) -> u64 {
        u64::from_le_bytes(b[..8].try_into().unwrap())
    }

    #[test]
    fn config_space_has_exactly_the_asked_size() {
        let mut d = null_disk(1 << 30);
        d.num_queues = 4;
        let b = backend(d, &[]);
        for size in [1u32, 8, 60, 96, 200, 4096] {
            let c = b.get_config(0, size);
            assert_eq!(c.len(), size as usize);
        }
        let c = b.get_config(0, 96);
        assert_eq!(le_u64(&c), (1u64 << 30) / 512, "capacity in sectors");
        // num_queues (le16 at offset 34), blk_size (le32 at 20), seg_max (le32 at 12).
        assert_eq!(u16::from_le_bytes([c[34], c[35]]), 4);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(u32::from_le_bytes(c[12..16].try_into().unwrap()), 254);
        assert!(c[96..].is_empty());
        let tail = b.get_config(90, 16);
        assert_eq!(&tail[..6], &c[90..96]);
        assert!(
            tail[6..].iter().all(|&x| x == 0),
            "bytes past the end read as zero"
        );
        assert_eq!(b.get_config(5000, 4), vec![0; 4]);
    }

    #[test]
    fn wce_write_switches_the_write_cache() {
        let b = backend(null_disk(1 << 20), &[]);
        assert!(b.device().writeback(), "a null disk shows a write cache");
        let wce = usize::try_from(WCE_OFFSET).unwrap();
        b.set_config(WCE_OFFSET as u32, &[0]).unwrap();
        assert!(!b.device().writeback());
        assert_eq!(b.get_config(0, 96)[wce], 0);
        b.set_config(WCE_OFFSET as u32, &[1]).unwrap();
        assert!(b.device().writeback());
        // Other writes are ignored, never an error (an Err would end the session).
        b.set_config(0, &[9, 9, 9, 9]).unwrap();
        assert_eq!(le_u64(&b.get_config(0, 8)), 2048);
    }

    #[test]
    fn features_follow_the_disk() {
        let b = backend(null_disk(1 << 20), &[]);
        let f = b.features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_BLK_F_MQ,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ] {
            assert_ne!(f & (1 << bit), 0, "bit {bit}");
        }
        assert_ne!(f & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
        for bit in [
            VIRTIO_F_RING_PACKED,
            VIRTIO_F_ACCESS_PLATFORM,
            VIRTIO_BLK_F_RO,
        ] {
            assert_eq!(f & (1 << bit), 0, "bit {bit}");
        }
        let p = b.protocol_features();
        assert!(p.contains(VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG));
        assert!(p.contains(VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS));
        for never in [
            VhostUserProtocolFeatures::INFLIGHT_SHMFD,
            VhostUserProtocolFeatures::LOG_SHMFD,
            VhostUserProtocolFeatures::STATUS,
        ] {
            assert!(!p.contains(never), "{never:?}");
        }

        let mut d = null_disk(1 << 20);
        d.discard = crate::config::DiscardMode::Ignore;
        let f = backend(d, &[]).features();
        assert_eq!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_ne!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
    }

    #[test]
    fn read_only_disk_offers_ro_and_no_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let mut d = DiskConfig::new("d0", &path);
        d.readonly = true;
        d.cache = block::CacheMode::Writeback;
        let b = backend(d, &[]);
        let f = b.features();
        assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(
            f & (1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES),
            0
        );
        assert!(b.device().shared().limits.readonly);
        assert_eq!(b.device().disk().capacity(), 1 << 20);
    }

    #[test]
    fn queues_per_thread_and_fresh_exit_events() {
        let mut d = null_disk(1 << 20);
        d.num_queues = 3;
        d.iothread_vq_mapping = Some(vec![
            VqMapping {
                iothread: "a".into(),
                vqs: vec![0, 2],
            },
            VqMapping {
                iothread: "b".into(),
                vqs: vec![1],
            },
        ]);
        let b = backend(d, &["a", "b"]);
        assert_eq!(b.queues_per_thread(), vec![0b101, 0b010]);
        assert_eq!(b.placement, vec![(0, 0), (1, 0), (0, 1)]);
        assert_eq!(b.num_queues(), 3);
        assert_eq!(b.max_queue_size(), 256);
        let (c1, n1) = b.exit_event(0).unwrap();
        let (c2, _n2) = b.exit_event(0).unwrap();
        assert_ne!(c1.as_raw_fd(), c2.as_raw_fd());
        n1.notify().unwrap();
        assert!(c2.consume().is_err(), "a fresh exit event is not signalled");
        // Without a session, events and stops are harmless no-ops.
        b.handle_event(0, EventSet::IN, &[], 0).unwrap();
        b.handle_event(40, EventSet::IN, &[], 7).unwrap();
        b.stop_vring(2).unwrap();
        b.stop_vring(99).unwrap();
        b.reset_device();
    }

    #[test]
    fn runtime_updates_check_their_input() {
        let b = backend(null_disk(1 << 20), &["io0"]);
        let mut t = IoThreadConfig::new("io0");
        t.poll_max_ns = 1000;
        b.update_iothread(t).unwrap();
        assert!(
            b.update_iothread(IoThreadConfig::new("nope"))
                .unwrap_err()
                .contains("no iothread")
        );
        let bad = IoThreadConfig {
            aio_max_batch: 0,
            ..IoThreadConfig::new("io0")
        };
        assert!(b.update_iothread(bad).is_err());
        let limits = block::throttle::ThrottleLimits {
            iops_total: 100,
            ..Default::default()
        };
        b.set_throttle(limits).unwrap();
        let bad = block::throttle::ThrottleLimits {
            iops_total: 100,
            iops_read: 5,
            ..Default::default()
        };
        assert!(b.set_throttle(bad).is_err());
        let c = b.counters();
        assert_eq!(c.iothreads.keys().collect::<Vec<_>>(), ["io0"]);
        assert_eq!(c.iothread_queues["io0"], [0]);
        assert_eq!(c.disks.keys().collect::<Vec<_>>(), ["d0"]);
        assert_eq!(c.sessions, 0);
    }
}
