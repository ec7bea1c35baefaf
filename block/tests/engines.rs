//! Every engine x every request kind on real files, through `DiskQueue`: data written at
//! random offsets and lengths (aligned and misaligned buffers, one and many segments)
//! reads back byte-exact, under O_DIRECT and buffered; discard and write-zeroes read back
//! zeroes; flush completes; requests past the end fail; a full filesystem gives ENOSPC
//! completions and the engine keeps working.

#![allow(clippy::cast_possible_truncation)] // Test data and figures, not guest input.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use block::{AioKind, CacheMode, Completion, Disk, DiskOptions, DiskQueue, EngineOptions};
use rand::{Rng, SeedableRng, rngs::StdRng};

const ENGINES: [AioKind; 3] = [AioKind::IoUring, AioKind::Native, AioKind::Threads];

/// Cache modes each engine runs under (Linux AIO needs O_DIRECT).
fn modes(kind: AioKind) -> &'static [CacheMode] {
    match kind {
        AioKind::Native => &[CacheMode::None, CacheMode::Directsync],
        _ => &CacheMode::ALL,
    }
}

fn open_queue(path: &Path, cache: CacheMode, kind: AioKind, depth: u32) -> DiskQueue {
    let disk = Disk::open(&DiskOptions {
        readonly: false,
        cache,
        ..DiskOptions::new(path)
    })
    .unwrap_or_else(|e| panic!("open {cache}: {e}"));
    let options = EngineOptions {
        kind,
        queue_depth: depth,
        max_batch: 16,
        ..Default::default()
    };
    DiskQueue::new(Arc::new(disk), &options, Default::default())
        .unwrap_or_else(|e| panic!("{kind} engine on {cache}: {e}"))
}

/// Submits, then waits for `n` completions.
fn wait(q: &mut DiskQueue, n: usize) -> Vec<Completion> {
    q.submit().unwrap();
    let mut out = Vec::with_capacity(n);
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.len() < n {
        assert!(
            Instant::now() < deadline,
            "timed out: {} of {n} completions",
            out.len()
        );
        let mut pfd = libc::pollfd {
            fd: q.completion_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll touches only the pollfd we pass.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        q.reap(|c| out.push(c)).unwrap();
    }
    out
}

/// Guest-like memory: one big buffer requests point into.
struct Memory(Vec<u8>);

impl Memory {
    /// `len` bytes at `at`, split into `segs` iovecs of uneven (but, when `sector_sized`,
    /// 512-multiple) lengths.
    fn iovecs(
        &mut self,
        at: usize,
        len: usize,
        segs: usize,
        sector_sized: bool,
    ) -> Vec<libc::iovec> {
        let base = self.0[at..].as_mut_ptr();
        let mut out = Vec::new();
        let unit = if sector_sized { 512 } else { 1 };
        let units = len / unit;
        let mut done = 0;
        for i in 0..segs {
            let left = units - done;
            let take = if i + 1 == segs {
                left
            } else {
                (left / 2).max(1).min(left)
            };
            if take == 0 {
                break;
            }
            // SAFETY: at + len stays inside the buffer (callers size it so).
            let p = unsafe { base.add(done * unit) };
            out.push(libc::iovec {
                iov_base: p.cast(),
                iov_len: take * unit,
            });
            done += take;
        }
        out
    }
}

fn image(dir: &Path, size: u64) -> std::path::PathBuf {
    let path = dir.join("disk.raw");
    let f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    path
}

#[test]
fn random_writes_read_back_byte_exact_on_every_engine_and_cache_mode() {
    const SIZE: u64 = 8 << 20;
    for kind in ENGINES {
        for &cache in modes(kind) {
            let dir = tempfile::tempdir().unwrap();
            let path = image(dir.path(), SIZE);
            let mut q = open_queue(&path, cache, kind, 32);
            let mut rng = StdRng::seed_from_u64(kind as u64 * 10 + cache as u64);
            let mut shadow = vec![0u8; SIZE as usize];
            // 32 requests in flight per round, each in its own region of "guest memory".
            let slot = 64 * 1024 + 4096;
            let mut mem = Memory(vec![0u8; 32 * slot]);
            for _round in 0..8 {
                let mut reqs = Vec::new();
                let mut used = Vec::<(u64, u64)>::new();
                for i in 0..32 {
                    let sectors = rng.random_range(1..=128u64);
                    let len = sectors * 512;
                    let offset = rng.random_range(0..(SIZE - len) / 512) * 512;
                    // Concurrent writes must not overlap, or the result is undefined.
                    if used
                        .iter()
                        .any(|&(o, l)| offset < o + l && o < offset + len)
                    {
                        continue;
                    }
                    used.push((offset, len));
                    let misalign = if rng.random_bool(0.3) {
                        rng.random_range(1..64)
                    } else {
                        0
                    };
                    let at = i * slot + misalign;
                    rng.fill(&mut mem.0[at..at + len as usize]);
                    shadow[offset as usize..(offset + len) as usize]
                        .copy_from_slice(&mem.0[at..at + len as usize]);
                    let segs = rng.random_range(1..=4);
                    let iovs = mem.iovecs(at, len as usize, segs, misalign == 0);
                    let fua = rng.random_bool(0.1);
                    // SAFETY: `mem` outlives the requests (waited for below).
                    unsafe { q.write(i as u64, offset, &iovs, fua) };
                    reqs.push(i);
                }
                for c in wait(&mut q, reqs.len()) {
                    assert!(c.result.is_ok(), "{kind}/{cache} write: {c:?}");
                }
            }
            q.flush(999);
            assert_eq!(wait(&mut q, 1)[0].result, Ok(0), "{kind}/{cache} flush");

            // Read the whole disk back through the engine in 64 KiB pieces, half of them
            // into misaligned buffers, and compare with what was written.
            let mut back = Memory(vec![0u8; 64 * 1024 + 64]);
            for (n, off) in (0..SIZE).step_by(64 * 1024).enumerate() {
                let at = if n % 2 == 0 { 0 } else { 7 };
                let iovs = back.iovecs(at, 64 * 1024, 1 + n % 3, at == 0);
                // SAFETY: `back` outlives the request.
                unsafe { q.read(n as u64, off, &iovs) };
                let c = wait(&mut q, 1);
                assert_eq!(c[0].result, Ok(64 * 1024), "{kind}/{cache} read at {off}");
                assert!(
                    back.0[at..at + 64 * 1024] == shadow[off as usize..off as usize + 64 * 1024],
                    "{kind}/{cache}: data differs in [{off}, +64K)"
                );
            }
            drop(q);
            assert!(
                std::fs::read(&path).unwrap() == shadow,
                "{kind}/{cache}: file differs"
            );
        }
    }
}

#[test]
fn discard_and_write_zeroes_read_back_zeroes_on_every_engine() {
    for kind in ENGINES {
        for &cache in modes(kind) {
            let dir = tempfile::tempdir().unwrap();
            let path = image(dir.path(), 1 << 20);
            std::fs::write(&path, vec![0xa5u8; 1 << 20]).unwrap();
            let mut q = open_queue(&path, cache, kind, 8);
            q.discard(1, 64 * 1024, 128 * 1024);
            q.write_zeroes(2, 512 * 1024, 4096 + 512);
            for c in wait(&mut q, 2) {
                assert!(c.result.is_ok(), "{kind}/{cache}: {c:?}");
            }
            drop(q);
            let data = std::fs::read(&path).unwrap();
            let zero = |r: std::ops::Range<usize>| data[r].iter().all(|&b| b == 0);
            let kept = |r: std::ops::Range<usize>| data[r].iter().all(|&b| b == 0xa5);
            assert!(zero(64 * 1024..192 * 1024), "{kind}/{cache}: discard");
            assert!(
                zero(512 * 1024..512 * 1024 + 4608),
                "{kind}/{cache}: write-zeroes"
            );
            assert!(
                kept(0..64 * 1024) && kept(192 * 1024..512 * 1024),
                "{kind}/{cache}"
            );
            assert!(
                kept(512 * 1024 + 4608..1 << 20),
                "{kind}/{cache}: beyond zeroed range"
            );
        }
    }
}

#[test]
fn requests_past_the_end_fail_and_leave_the_file_alone() {
    for kind in ENGINES {
        let dir = tempfile::tempdir().unwrap();
        let path = image(dir.path(), 1 << 20);
        let mut q = open_queue(&path, CacheMode::None, kind, 8);
        let mut mem = Memory(vec![1u8; 8192]);
        let iovs = mem.iovecs(0, 8192, 1, true);
        // SAFETY: `mem` outlives the requests.
        unsafe {
            q.write(1, (1 << 20) - 4096, &iovs, false);
            q.read(2, 1 << 20, &iovs);
            q.write(3, u64::MAX - 4095, &iovs, false);
        }
        q.discard(4, (1 << 20) - 512, 1024);
        q.write_zeroes(5, 1 << 21, 512);
        for c in wait(&mut q, 5) {
            assert_eq!(
                c.result.unwrap_err().errno(),
                libc::EINVAL,
                "{kind}: token {}",
                c.token
            );
        }
        drop(q);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            1 << 20,
            "{kind}: file grew"
        );
        assert!(
            std::fs::read(&path).unwrap().iter().all(|&b| b == 0),
            "{kind}: data written"
        );
    }
}

#[test]
fn null_disk_reads_zeroes_and_drops_writes() {
    let disk = Arc::new(Disk::null(1 << 30));
    let mut q = DiskQueue::new(disk, &EngineOptions::default(), Default::default()).unwrap();
    assert_eq!(q.engine_name(), "null");
    let mut mem = Memory(vec![0xffu8; 4096]);
    let iovs = mem.iovecs(0, 4096, 2, true);
    // SAFETY: `mem` outlives the requests.
    unsafe {
        q.write(1, 0, &iovs, false);
        q.read(2, 4096, &iovs);
    }
    q.flush(3);
    let done = wait(&mut q, 3);
    assert!(done.iter().all(|c| c.result.is_ok()));
    assert!(mem.0.iter().all(|&b| b == 0));
}

/// A small tmpfs, unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Result<Tmpfs, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let target = std::ffi::CString::new(dir.path().as_os_str().as_encoded_bytes()).unwrap();
        let data = std::ffi::CString::new(format!("size={size}")).unwrap();
        // SAFETY: all pointers are valid NUL-terminated strings for the call's duration.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                data.as_ptr().cast(),
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        Ok(Tmpfs(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = std::ffi::CString::new(self.0.path().as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: valid NUL-terminated path.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

#[test]
fn full_filesystem_gives_enospc_and_the_engine_keeps_working() {
    let fs = match Tmpfs::mount("1m") {
        Ok(fs) => fs,
        Err(e) => {
            tests::skip::skip(
                "full_filesystem_gives_enospc_and_the_engine_keeps_working",
                &format!("cannot mount a tmpfs here ({e})"),
            );
            return;
        }
    };
    for kind in ENGINES {
        for cache in [CacheMode::Writeback, CacheMode::None] {
            if kind == AioKind::Native && !cache.direct() {
                continue;
            }
            let path = image(fs.0.path(), 8 << 20); // sparse: 8 MiB on a 1 MiB filesystem
            let disk = match Disk::open(&DiskOptions {
                readonly: false,
                cache,
                ..DiskOptions::new(path.clone())
            }) {
                Ok(d) => Arc::new(d),
                Err(block::Error::DirectNotSupported { .. }) => {
                    tests::skip::partial(
                        "full_filesystem_gives_enospc_and_the_engine_keeps_working",
                        &format!("{kind}/{cache} not checked: no O_DIRECT on tmpfs"),
                    );
                    std::fs::remove_file(&path).unwrap();
                    continue;
                }
                Err(e) => panic!("{e}"),
            };
            let options = EngineOptions {
                kind,
                queue_depth: 16,
                ..Default::default()
            };
            let mut q = DiskQueue::new(disk, &options, Default::default()).unwrap();
            let mut mem = Memory(vec![0x3cu8; 256 * 1024 + 4096]);
            let at = 4096 - (mem.0.as_ptr() as usize % 4096);
            let iovs = mem.iovecs(at, 256 * 1024, 1, true);
            let mut enospc = 0;
            for i in 0..32u64 {
                // SAFETY: `mem` outlives the request.
                unsafe { q.write(i, i * 256 * 1024, &iovs, false) };
                let c = wait(&mut q, 1).remove(0);
                match c.result {
                    Ok(_) => {}
                    Err(e) => {
                        assert_eq!(e.errno(), libc::ENOSPC, "{kind}/{cache}: {e}");
                        enospc += 1;
                    }
                }
            }
            assert!(enospc > 0, "{kind}/{cache}: 8 MiB fit in a 1 MiB tmpfs?");
            // Still serving: reads and a flush work, and freeing space makes writes work again.
            // SAFETY: as above.
            unsafe { q.read(100, 0, &iovs) };
            q.flush(101);
            q.discard(102, 0, 8 << 20);
            for c in wait(&mut q, 3) {
                assert!(c.result.is_ok(), "{kind}/{cache} after ENOSPC: {c:?}");
            }
            // SAFETY: as above.
            unsafe { q.write(103, 0, &iovs, false) };
            assert!(
                wait(&mut q, 1)[0].result.is_ok(),
                "{kind}/{cache}: write after discard"
            );
            assert_eq!(q.counters().snapshot().write.errors, enospc);
            drop(q);
            std::fs::remove_file(&path).unwrap();
        }
    }
}

#[test]
fn native_engine_refuses_buffered_cache_modes_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), 1 << 20);
    for cache in [
        CacheMode::Writeback,
        CacheMode::Writethrough,
        CacheMode::Unsafe,
    ] {
        let disk = Arc::new(
            Disk::open(&DiskOptions {
                readonly: false,
                cache,
                ..DiskOptions::new(path.clone())
            })
            .unwrap(),
        );
        let options = EngineOptions {
            kind: AioKind::Native,
            ..Default::default()
        };
        let err = DiskQueue::new(disk, &options, Default::default())
            .err()
            .expect("must fail");
        assert!(err.to_string().contains("O_DIRECT"), "{err}");
    }
}

#[test]
fn o_direct_flag_follows_the_cache_mode() {
    let dir = tempfile::tempdir().unwrap();
    let path = image(dir.path(), 1 << 20);
    for cache in CacheMode::ALL {
        let disk = Disk::open(&DiskOptions {
            readonly: false,
            cache,
            ..DiskOptions::new(path.clone())
        })
        .unwrap();
        let file = std::fs::File::open("/proc/self/fdinfo/".to_owned() + &disk.fd().to_string());
        let info = std::io::read_to_string(file.unwrap()).unwrap();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .unwrap()
            .trim();
        let flags = u32::from_str_radix(flags, 8).unwrap();
        assert_eq!(
            flags & libc::O_DIRECT as u32 != 0,
            cache.direct(),
            "{cache}: {info}"
        );
    }
}
