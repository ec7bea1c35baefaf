//! Helpers of the vhost-user-blk tests: the backend process and a libblkio client.

use std::io::Read;
use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use devices::vhost_user_blk::BackendCounters;

pub const BIN: &str = env!("CARGO_BIN_EXE_vhost-user-blk");
pub const MIB: usize = 1 << 20;

/// A backend process; killed when dropped.
pub struct Server {
    child: Child,
    pub socket: PathBuf,
    log: PathBuf,
}

impl Server {
    /// Starts the binary on `dir/s.sock` with `args` and waits until it listens.
    pub fn start(dir: &Path, args: &[&str]) -> Server {
        let socket = dir.join("s.sock");
        let log = dir.join("backend.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(BIN)
            .arg("--socket")
            .arg(&socket)
            .args(args)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        let mut server = Server { child, socket, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        // The socket file appears at bind(), a moment before listen(): wait for the line
        // the backend logs once it listens, or a connect may be refused.
        while !(server.socket.exists() && server.log().contains("listening")) {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!(
                    "backend exited ({status}) before listening:\n{}",
                    server.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "backend not listening:\n{}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        server
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn path(&self) -> &str {
        self.socket.to_str().unwrap()
    }

    /// SIGKILL (no chance to write anything back), then waits for the exit.
    #[allow(dead_code)] // For the crash tests (qcow2_crash.rs), which share this file.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit.
    pub fn stop(&mut self) -> ExitStatus {
        let pid = libc::pid_t::try_from(self.child.id()).unwrap();
        // SAFETY: our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        self.wait_exit(Duration::from_secs(30))
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "backend did not exit:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A connected libblkio instance with its queues and one mapped memory region.
pub struct Client {
    pub queues: Vec<Blkioq>,
    pub region: MemoryRegion,
    pub b: Blkio,
}

impl Client {
    pub fn connect(
        socket: &str,
        num_queues: i32,
        readonly: bool,
        region_len: usize,
    ) -> Result<Client, blkio::Error> {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", socket)?;
        b.set_bool("read-only", readonly)?;
        b.connect()?;
        b.set_i32("num-queues", num_queues)?;
        let queues = b.start()?.queues;
        let region = b.alloc_mem_region(region_len)?;
        b.map_mem_region(&region)?;
        Ok(Client { queues, region, b })
    }

    /// The region as bytes.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is mapped read-write for `len` bytes while `self` lives; the
        // backend writes into it only while a request we wait for is in flight.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    pub fn ptr(&self, off: usize) -> *mut u8 {
        assert!(off < self.region.len);
        (self.region.addr + off) as *mut u8
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        // Queues first, then the region, then the instance.
        self.queues.clear();
        self.b.unmap_mem_region(&self.region);
        self.b.free_mem_region(&self.region);
    }
}

pub fn comps(n: usize) -> Vec<MaybeUninit<Completion>> {
    (0..n).map(|_| MaybeUninit::uninit()).collect()
}

/// Submits what is queued and waits for one completion; returns its `ret`.
/// Queues a 4 KiB read of block `slot` into the `slot`th 4 KiB of the region at `base`,
/// tagged `slot`.
pub fn read_slot(q: &mut Blkioq, base: usize, slot: usize) {
    q.read(
        (slot * 4096) as u64,
        (base + slot * 4096) as *mut u8,
        4096,
        slot,
        ReqFlags::empty(),
    );
}

pub fn wait_one(q: &mut Blkioq) -> i32 {
    let mut c = comps(1);
    let mut timeout = Duration::from_secs(20);
    let n = q.do_io(&mut c, 1, Some(&mut timeout), None).expect("do_io");
    assert_eq!(n, 1);
    // SAFETY: do_io initialized the first n completions.
    unsafe { c[0].assume_init_read() }.ret
}

pub fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

pub fn fill_random(buf: &mut [u8], seed: u64) {
    let mut s = seed | 1;
    for chunk in buf.chunks_mut(8) {
        let v = xorshift(&mut s).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// A temp dir on a disk filesystem (O_DIRECT works there) with an image of `size` bytes
/// holding a known pattern.
pub fn image(size: usize) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let path = dir.path().join("disk.raw");
    let mut data = vec![0u8; size];
    fill_random(&mut data, 0x5eed);
    std::fs::write(&path, &data).unwrap();
    (dir, path, data)
}

/// The `--counters` file at `path`, parsed into its typed form (a test fails on any other
/// shape).
pub fn read_counters(path: &Path) -> BackendCounters {
    let mut s = String::new();
    std::fs::File::open(path)
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("{}: {e}\n{s}", path.display()))
}

/// `METHOD /api/v1/PATH` with a JSON `body` on a `--api-socket` (panics if it cannot be
/// sent; the reply may be an error).
#[allow(dead_code)] // For the API tests (disk_api.rs, io_error.rs), which share this file.
pub fn api_call(
    api: &Path,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> api::client::Reply {
    api::client::Client::new(api)
        .request_blocking(
            method,
            &format!("/api/v1/{path}"),
            body.map(|b| b.to_string().into_bytes()),
        )
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

/// The lines of `GET /api/v1/events` on a `--api-socket`, as they come (a thread reads
/// the stream until the receiver goes).
#[allow(dead_code)] // For the API tests (disk_api.rs, io_error.rs), which share this file.
pub fn follow_events(api: &Path) -> std::sync::mpsc::Receiver<String> {
    let client = api::client::Client::new(api);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (_, mut lines) = client.stream("/api/v1/events").await.unwrap();
            while let Ok(Some(l)) = lines.next_line().await {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
    });
    rx
}
