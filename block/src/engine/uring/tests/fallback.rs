//! Tests of what io_uring hands elsewhere or handles at the edges: fallocate ops and the
//! fallback pool (tmpfs, block devices), per-op errors, drop, setup refusals.

use super::*;

#[test]
fn discard_and_write_zeroes_read_back_zeroes() {
    const SIZE: usize = 1 << 20;
    for cache in [CacheMode::Writeback, CacheMode::None] {
        let img = image_in(&std::env::temp_dir(), &vec![0xabu8; SIZE]);
        let blocks_before = std::fs::metadata(img.path()).unwrap().blocks();
        let disk = open_disk(img.path(), cache);
        let mut eng = engine(&disk, 8, 8);
        let (d_off, d_len) = (65536u64, 131072u64);
        let (z_off, z_len) = (524288u64 + 512, 65536u64 + 1024);
        // SAFETY: no buffers involved.
        unsafe {
            eng.push(
                1,
                EngineOp::Discard {
                    offset: d_off,
                    len: d_len,
                },
            );
            eng.push(
                2,
                EngineOp::WriteZeroes {
                    offset: z_off,
                    len: z_len,
                },
            );
        }
        let results = drain(&mut eng);
        assert_eq!(results, HashMap::from([(1, 0), (2, 0)]), "{cache}");
        assert_eq!(
            eng.stats().fallback_ops,
            0,
            "{cache}: ext4 needs no fallback"
        );
        let buf = filled(SIZE, 0x11);
        let iov = [iovec(&buf, 0..SIZE)];
        assert_eq!(
            run_one(
                &mut eng,
                EngineOp::Read {
                    offset: 0,
                    iovecs: vecs(&iov)
                }
            ),
            SIZE as i64
        );
        let zero = |i: usize| {
            let i = i as u64;
            (d_off..d_off + d_len).contains(&i) || (z_off..z_off + z_len).contains(&i)
        };
        for (i, &b) in buf.as_slice().iter().enumerate() {
            assert_eq!(b, if zero(i) { 0 } else { 0xab }, "{cache}: byte {i}");
        }
        let meta = std::fs::metadata(img.path()).unwrap();
        assert_eq!(meta.len(), SIZE as u64, "{cache}: KEEP_SIZE");
        assert!(
            meta.blocks() < blocks_before,
            "{cache}: discard freed no blocks"
        );
    }
}

#[test]
fn write_zeroes_falls_back_to_the_pool_on_tmpfs() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("skipped: no /dev/shm");
        return;
    }
    const SIZE: usize = 262144;
    let img = image_in(shm, &vec![0xabu8; SIZE]);
    // Does this filesystem refuse ZERO_RANGE? (tmpfs does, up to at least Linux 6.18.)
    let probe = image_in(shm, &[0xab; 8192]);
    // SAFETY: fallocate on an fd we own.
    let rc = unsafe {
        libc::fallocate(
            probe.as_file().as_raw_fd(),
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            4096,
        )
    };
    let refused =
        rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP);
    let disk = open_disk(img.path(), CacheMode::Writeback);
    let mut eng = engine(&disk, 8, 8);
    let (z_off, z_len) = (4096 + 512, 65536 + 512);
    let (d_off, d_len) = (131072, 8192);
    // SAFETY: no buffers involved.
    unsafe {
        eng.push(
            7,
            EngineOp::WriteZeroes {
                offset: z_off,
                len: z_len,
            },
        );
        eng.push(
            8,
            EngineOp::Discard {
                offset: d_off,
                len: d_len,
            },
        );
    }
    assert_eq!(drain(&mut eng), HashMap::from([(7, 0), (8, 0)]));
    assert_eq!(
        eng.stats().fallback_ops,
        u64::from(refused),
        "only the refused op retries"
    );
    assert_eq!(eng.stats().sqes, 2);
    let data = std::fs::read(img.path()).unwrap();
    assert_eq!(data.len(), SIZE);
    for (i, &b) in data.iter().enumerate() {
        let i = i as u64;
        let zero = (z_off..z_off + z_len).contains(&i) || (d_off..d_off + d_len).contains(&i);
        assert_eq!(b, if zero { 0 } else { 0xab }, "byte {i}");
    }
    assert_eq!(eng.in_flight(), 0);
}

#[test]
fn per_op_errors_are_negative_errnos() {
    let img = image_in(&std::env::temp_dir(), &[0u8; 8192]);
    let disk = open_readonly(img.path(), CacheMode::Writeback);
    let mut eng = engine(&disk, 4, 4);
    let buf = filled(4096, 1);
    let iov = [iovec(&buf, 0..4096)];
    let write = EngineOp::Write {
        offset: 0,
        iovecs: vecs(&iov),
        fua: false,
    };
    assert_eq!(run_one(&mut eng, write), -i64::from(libc::EBADF));
    let read = EngineOp::Read {
        offset: 0,
        iovecs: vecs(&iov),
    };
    assert_eq!(run_one(&mut eng, read), 4096);
    assert!(buf.as_slice().iter().all(|&b| b == 0));
}

#[test]
fn drop_waits_for_ops_in_the_ring() {
    const OPS: usize = 32;
    let img = image_in(&std::env::temp_dir(), &vec![0u8; OPS * 65536]);
    let bufs: Vec<AlignedBuf> = (0..OPS).map(|i| filled(65536, 0x80 | i as u8)).collect();
    let iovs: Vec<[libc::iovec; 1]> = bufs.iter().map(|b| [iovec(b, 0..65536)]).collect();
    {
        let disk = open_disk(img.path(), CacheMode::None);
        let mut eng = engine(&disk, OPS as u32, 32);
        for (i, iov) in iovs.iter().enumerate() {
            let op = EngineOp::Write {
                offset: (i * 65536) as u64,
                iovecs: vecs(iov),
                fua: false,
            };
            // SAFETY: `bufs`/`iovs` outlive the engine, whose drop waits for the writes.
            unsafe { eng.push(i as u64, op) };
        }
        eng.submit().unwrap();
        assert_eq!(eng.stats().sqes, OPS as u64);
    }
    let data = std::fs::read(img.path()).unwrap();
    for (i, chunk) in data.chunks(65536).enumerate() {
        assert!(
            chunk.iter().all(|&b| b == 0x80 | i as u8),
            "write {i} not done by drop"
        );
    }
}

#[test]
fn refuses_a_null_disk_and_bad_options() {
    let null = Arc::new(Disk::null(1 << 20));
    assert!(matches!(
        UringEngine::create(null, &EngineOptions::default()),
        Err(Error::InvalidOption(_))
    ));
    let img = image_in(&std::env::temp_dir(), &[0u8; 4096]);
    let disk = open_disk(img.path(), CacheMode::Writeback);
    let bad = EngineOptions {
        queue_depth: 0,
        ..EngineOptions::default()
    };
    assert!(matches!(
        UringEngine::create(disk.clone(), &bad),
        Err(Error::InvalidOption(_))
    ));
    let eng = UringEngine::new(disk, &EngineOptions::default()).unwrap();
    assert_eq!(eng.name(), "io_uring");
    assert_eq!(eng.in_flight(), 0);
}

/// A loop device over a temp file, detached on drop.
struct LoopDev(std::path::PathBuf);

impl LoopDev {
    fn attach(file: &Path) -> Result<LoopDev, String> {
        let out = std::process::Command::new("losetup")
            .args(["--find", "--show"])
            .arg(file)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        Ok(LoopDev(String::from_utf8_lossy(&out.stdout).trim().into()))
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup")
            .arg("-d")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn block_device_discard_and_write_zeroes_go_to_the_pool() {
    const SIZE: usize = 1 << 20;
    let backing = image_in(&std::env::temp_dir(), &vec![0x77u8; SIZE]);
    let dev = match LoopDev::attach(backing.path()) {
        Ok(dev) => dev,
        Err(e) => {
            eprintln!("skipped: cannot attach a loop device ({e})");
            return;
        }
    };
    let disk = open_disk(&dev.0, CacheMode::None);
    assert_eq!(disk.backend(), BackendKind::BlockDevice);
    let mut eng = engine(&disk, 8, 8);
    let buf = filled(4096, 0x3c);
    let iov = [iovec(&buf, 0..4096)];
    // SAFETY: `buf`/`iov` outlive `drain`.
    unsafe {
        eng.push(
            1,
            EngineOp::Write {
                offset: 0,
                iovecs: vecs(&iov),
                fua: true,
            },
        );
        eng.push(
            2,
            EngineOp::WriteZeroes {
                offset: 65536,
                len: 65536,
            },
        );
        eng.push(
            3,
            EngineOp::Discard {
                offset: 262144,
                len: 65536,
            },
        );
    }
    let results = drain(&mut eng);
    assert_eq!(results[&1], 4096);
    assert_eq!(results[&2], 0);
    // A loop device may refuse discard; the result must still be a completion.
    assert!(
        results[&3] == 0 || results[&3] == -i64::from(libc::EOPNOTSUPP),
        "{results:?}"
    );
    let stats = eng.stats();
    assert_eq!((stats.sqes, stats.fallback_ops), (1, 2));
    let rbuf = filled(SIZE, 0xff);
    let riov = [iovec(&rbuf, 0..SIZE)];
    assert_eq!(
        run_one(
            &mut eng,
            EngineOp::Read {
                offset: 0,
                iovecs: vecs(&riov)
            }
        ),
        SIZE as i64
    );
    let data = rbuf.as_slice();
    assert!(data[..4096].iter().all(|&b| b == 0x3c));
    assert!(data[65536..131072].iter().all(|&b| b == 0));
    assert!(data[131072..262144].iter().all(|&b| b == 0x77));
    if results[&3] == 0 {
        assert!(
            data[262144..327680].iter().all(|&b| b == 0),
            "discarded range reads zeroes"
        );
    }
}
