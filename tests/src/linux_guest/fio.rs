//! fio with `--verify=crc32c` inside the guest against `/dev/vda`, and its verdict.

use std::time::Duration;

use serde_json::Value;

use super::Tools;
use super::backend::VhostUserBackend;
use super::initramfs::Initramfs;
use super::qemu::{BootOptions, BootResult, GuestDisk, boot};

const JSON_BEGIN: &str = "@@FIO_JSON_BEGIN@@";
const JSON_END: &str = "@@FIO_JSON_END@@";

/// A write-then-verify fio job.
#[derive(Clone, Debug)]
pub struct FioVerifyJob {
    /// The guest file fio uses; `/dev/vda` (the vhost-user disk) by default.
    pub filename: String,
    /// O_DIRECT (not possible on the guest's tmpfs).
    pub direct: bool,
    /// Write pattern: `randwrite` or `write`.
    pub rw: String,
    /// Block size in bytes.
    pub block_size: u64,
    /// Bytes of the disk written and verified, from offset 0.
    pub size: u64,
    /// Queue depth of each job.
    pub iodepth: u32,
    /// fio jobs, each on its own vCPU (so on its own virtqueue when the disk has enough)
    /// and its own `size / numjobs` slice of the disk.
    pub numjobs: u32,
    /// Guest vCPUs.
    pub cpus: u32,
    /// fio ioengine inside the guest.
    pub ioengine: String,
    /// Self-test of the verdict: write, overwrite this block with random bytes, then run a
    /// verify-only pass, which must fail.
    pub corrupt_block: Option<u64>,
    /// After the write-and-verify pass, drop the guest's caches and read everything back
    /// once more (`--verify_only`); its JSON comes between [`AGAIN_BEGIN`] and
    /// [`AGAIN_END`] (see [`parse_again`]) and its status joins the script's.
    pub verify_again: bool,
    /// Kill the guest after this long.
    pub timeout: Duration,
}

/// Marks the start of the second verify pass's JSON.
pub const AGAIN_BEGIN: &str = "@@FIO_AGAIN_BEGIN@@";
/// Marks its end.
pub const AGAIN_END: &str = "@@FIO_AGAIN_END@@";

impl Default for FioVerifyJob {
    /// 32 MiB of `/dev/vda` in 4 KiB random O_DIRECT writes at QD8 through libaio by one
    /// job on one vCPU, then verified.
    fn default() -> Self {
        FioVerifyJob {
            filename: "/dev/vda".into(),
            direct: true,
            rw: "randwrite".into(),
            block_size: 4096,
            size: 32 << 20,
            iodepth: 8,
            numjobs: 1,
            cpus: 1,
            ioengine: "libaio".into(),
            corrupt_block: None,
            verify_again: false,
            timeout: Duration::from_secs(240),
        }
    }
}

impl FioVerifyJob {
    /// The guest script: wait for the disk and print its size, read-only flag and queue
    /// count (when the target is `/dev/vda`), run fio, print its JSON between markers, and
    /// exit with fio's status.
    pub fn script(&self) -> String {
        let jobs = self.numjobs.max(1);
        let slice = self.size / u64::from(jobs);
        let fio = format!(
            "fio --name=verify --filename={file} --direct={direct} --rw={rw} --bs={bs} \\\n\
             \x20   --size={slice} --numjobs={jobs} --offset_increment={slice} \\\n\
             \x20   --cpus_allowed=0-{last_cpu} --cpus_allowed_policy=split --group_reporting \\\n\
             \x20   --ioengine={engine} --iodepth={qd} --verify=crc32c --verify_fatal=1 \\\n\
             \x20   --verify_state_save=0 --output-format=json",
            file = self.filename,
            direct = u8::from(self.direct),
            rw = self.rw,
            bs = self.block_size,
            last_cpu = self.cpus.max(1) - 1,
            engine = self.ioengine,
            qd = self.iodepth,
        );
        let mut script = String::new();
        if self.filename == "/dev/vda" {
            script.push_str(
                "i=0\n\
                 while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do usleep 50000; i=$((i+1)); done\n\
                 if [ ! -b /dev/vda ]; then echo \"no /dev/vda\"; ls /sys/block; exit 90; fi\n\
                 echo \"vda_sectors=$(cat /sys/block/vda/size) vda_ro=$(cat /sys/block/vda/ro)\"\n\
                 echo \"vda_queues=$(ls /sys/block/vda/mq | wc -l)\"\n",
            );
        }
        match self.corrupt_block {
            None => script.push_str(&format!("{fio} --do_verify=1 --output=/tmp/fio.json\n")),
            Some(block) => script.push_str(&format!(
                "{fio} --do_verify=0 --output=/tmp/fio-write.json || exit 91\n\
                 dd if=/dev/urandom of={file} bs={bs} count=1 seek={block} conv=notrunc\n\
                 sync; echo 3 > /proc/sys/vm/drop_caches\n\
                 {fio} --verify_only --output=/tmp/fio.json\n",
                file = self.filename,
                bs = self.block_size,
            )),
        }
        script.push_str("rc=$?\n");
        if self.verify_again {
            script.push_str(&format!(
                "sync; echo 3 > /proc/sys/vm/drop_caches\n\
                 {fio} --verify_only --output=/tmp/fio-again.json\n\
                 rc2=$?\n\
                 echo \"{AGAIN_BEGIN}\"\n\
                 cat /tmp/fio-again.json\n\
                 echo \"{AGAIN_END}\"\n\
                 echo \"fio again exit status $rc2\"\n\
                 if [ $rc -eq 0 ]; then rc=$rc2; fi\n"
            ));
        }
        script.push_str(&format!(
            "echo \"{JSON_BEGIN}\"\n\
             cat /tmp/fio.json\n\
             echo \"{JSON_END}\"\n\
             echo \"fio exit status $rc\"\n\
             dmesg | grep -iE 'error|fail|virtio|vda' | tail -n 20\n\
             exit $rc\n"
        ));
        script
    }
}

/// What fio reported.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FioVerify {
    /// The guest script's exit status (fio's).
    pub exit_status: Option<i32>,
    /// fio's `error` for the job (0 when clean; EILSEQ for a verify mismatch).
    pub error: i64,
    /// Write requests completed.
    pub write_ios: u64,
    /// Bytes written.
    pub write_bytes: u64,
    /// Read requests completed (the verify pass).
    pub read_ios: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// `/sys/block/vda/size` (512-byte sectors) as the guest saw it.
    pub disk_sectors: Option<u64>,
    /// `/sys/block/vda/ro`.
    pub read_only: Option<bool>,
    /// Hardware queues the guest's blk-mq created for vda.
    pub guest_queues: Option<u32>,
}

impl FioVerify {
    /// Whether fio exited 0 with no job error, wrote `expected_bytes` and read all of it
    /// back in its verify pass.
    pub fn verified_cleanly(&self, expected_bytes: u64) -> bool {
        self.exit_status == Some(0)
            && self.error == 0
            && self.write_ios > 0
            && self.write_bytes == expected_bytes
            && self.read_bytes == expected_bytes
    }
}

/// The second verify pass of a job with [`FioVerifyJob::verify_again`]: fio's job
/// error and the bytes it read.
pub fn parse_again(script_output: &str) -> Result<(i64, u64), String> {
    let v = json_between(script_output, AGAIN_BEGIN, AGAIN_END)?;
    let job = v
        .get("jobs")
        .and_then(|j| j.get(0))
        .ok_or("fio JSON has no job")?;
    let error = job.get("error").and_then(Value::as_i64).unwrap_or(-1);
    let read = job
        .get("read")
        .and_then(|d| d.get("io_bytes"))
        .and_then(Value::as_u64)
        .unwrap_or(0);
    Ok((error, read))
}

/// The JSON object fio printed between `begin` and `end`.
fn json_between(script_output: &str, begin: &str, end: &str) -> Result<Value, String> {
    let at = script_output
        .find(begin)
        .ok_or("no fio JSON in the output")?;
    let json = &script_output[at + begin.len()..];
    let json = &json[..json.find(end).ok_or("fio JSON not terminated")?];
    // fio may print warnings before the JSON object.
    let json = &json[json.find('{').ok_or("fio printed no JSON object")?..];
    serde_json::from_str(json).map_err(|e| format!("fio JSON: {e}"))
}

/// Parses the script output of [`FioVerifyJob::script`].
pub fn parse(script_output: &str, exit_status: Option<i32>) -> Result<FioVerify, String> {
    let field = |key: &str| -> Option<&str> {
        script_output
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
    };
    let begin = script_output
        .find(JSON_BEGIN)
        .ok_or("no fio JSON in the output")?;
    let json = &script_output[begin + JSON_BEGIN.len()..];
    let json = &json[..json.find(JSON_END).ok_or("fio JSON not terminated")?];
    // fio may print warnings before the JSON object.
    let json = &json[json.find('{').ok_or("fio printed no JSON object")?..];
    let v: Value = serde_json::from_str(json).map_err(|e| format!("fio JSON: {e}"))?;
    let job = v
        .get("jobs")
        .and_then(|j| j.get(0))
        .ok_or("fio JSON has no job")?;
    let num = |dir: &str, key: &str| {
        job.get(dir)
            .and_then(|d| d.get(key))
            .and_then(Value::as_u64)
    };
    Ok(FioVerify {
        exit_status,
        error: job.get("error").and_then(Value::as_i64).unwrap_or(-1),
        write_ios: num("write", "total_ios").unwrap_or(0),
        write_bytes: num("write", "io_bytes").unwrap_or(0),
        read_ios: num("read", "total_ios").unwrap_or(0),
        read_bytes: num("read", "io_bytes").unwrap_or(0),
        disk_sectors: field("vda_sectors").and_then(|s| s.parse().ok()),
        read_only: field("vda_ro").map(|s| s == "1"),
        guest_queues: field("vda_queues").and_then(|s| s.parse().ok()),
    })
}

/// Boots the guest with `backend`'s disk, runs `job`, and returns fio's verdict with the
/// boot's record. Errors (with the console) when no fio result came back.
pub fn run_verify(
    tools: &Tools,
    initramfs: &Initramfs,
    backend: &dyn VhostUserBackend,
    job: &FioVerifyJob,
) -> Result<(FioVerify, BootResult), String> {
    run(tools, initramfs, Some(backend), job)
}

/// [`run_verify`] with the disk optional (a job on a guest tmpfs file needs none).
pub fn run(
    tools: &Tools,
    initramfs: &Initramfs,
    backend: Option<&dyn VhostUserBackend>,
    job: &FioVerifyJob,
) -> Result<(FioVerify, BootResult), String> {
    let mut opts = BootOptions::new(job.script());
    opts.timeout = job.timeout;
    opts.cpus = job.cpus;
    opts.disk = backend.map(|b| GuestDisk {
        socket: b.socket().to_path_buf(),
        num_queues: b.num_queues(),
    });
    let run = boot(tools, initramfs, &opts)?;
    match parse(&run.script_output, run.exit_status) {
        Ok(v) => Ok((v, run)),
        Err(e) => Err(format!("{e}\n{}", run.report())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_shaped() {
        let job = FioVerifyJob {
            numjobs: 2,
            cpus: 2,
            ..FioVerifyJob::default()
        };
        let s = job.script();
        println!("{s}");
        assert!(s.contains("--size=16777216 --numjobs=2 --offset_increment=16777216"));
        assert!(s.contains("--cpus_allowed=0-1"));
        assert!(s.contains("--do_verify=1 --output=/tmp/fio.json"));
        assert!(s.contains("vda_sectors="));
        let c = FioVerifyJob {
            filename: "/tmp/f".into(),
            direct: false,
            corrupt_block: Some(5),
            ..FioVerifyJob::default()
        }
        .script();
        println!("{c}");
        assert!(!c.contains("/dev/vda"));
        assert!(c.contains("of=/tmp/f bs=4096 count=1 seek=5"));
        assert!(c.contains("--verify_only"));
    }

    #[test]
    fn fio_output_parsed() {
        let out = format!(
            "vda_sectors=131072 vda_ro=0\nvda_queues=1\n{JSON_BEGIN}\nnote: both iodepth >= 1\n\
             {{\"jobs\":[{{\"error\":0,\"read\":{{\"total_ios\":8192,\"io_bytes\":33554432}},\
             \"write\":{{\"total_ios\":8192,\"io_bytes\":33554432}}}}]}}\n{JSON_END}\n"
        );
        let v = parse(&out, Some(0)).unwrap();
        assert_eq!(v.disk_sectors, Some(131072));
        assert_eq!(v.read_only, Some(false));
        assert_eq!(v.guest_queues, Some(1));
        assert_eq!((v.write_ios, v.read_ios), (8192, 8192));
        assert!(v.verified_cleanly(32 << 20));
        assert!(!v.verified_cleanly(64 << 20));
        let bad = parse(&out.replace("\"error\":0", "\"error\":84"), Some(1)).unwrap();
        assert!(!bad.verified_cleanly(32 << 20));
        assert!(parse("fio: verify failed", Some(1)).is_err());
    }
}
