//! Running fio as the reference load generator and reading its JSON output.

use std::path::Path;
use std::process::Command;

pub use crate::latency::Figures as FioResult;

/// A fio random-read job description.
#[derive(Clone, Debug)]
pub struct FioJob<'a> {
    /// File to read.
    pub file: &'a Path,
    /// fio ioengine (io_uring, libaio, psync...).
    pub ioengine: &'a str,
    /// Workload (randread, randwrite, read, write).
    pub rw: &'a str,
    /// Block size in bytes.
    pub block_size: u64,
    /// Queue depth.
    pub iodepth: u32,
    /// Seconds to run.
    pub runtime_s: u64,
    /// Bytes of the file to use.
    pub size: u64,
    /// Submit the whole queue depth in one call and reap all that completed, as an
    /// iothread serving a guest's batch does (`iodepth_batch_submit=iodepth`), instead of
    /// fio's default of submitting each request as soon as one completes.
    pub batched: bool,
}

/// Whether `fio` can be run.
pub fn available() -> bool {
    Command::new("fio")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `job` with O_DIRECT and returns its figures.
pub fn run(job: &FioJob) -> Result<FioResult, String> {
    let out = Command::new("fio")
        .args([
            "--name=bench",
            &format!("--filename={}", job.file.display()),
            "--direct=1",
            &format!("--rw={}", job.rw),
            &format!("--bs={}", job.block_size),
            &format!("--ioengine={}", job.ioengine),
            &format!("--iodepth={}", job.iodepth),
            &format!("--runtime={}", job.runtime_s),
            "--time_based",
            "--ramp_time=1",
            &format!("--size={}", job.size),
            "--norandommap",
            "--randrepeat=0",
            "--output-format=json",
        ])
        .args(
            job.batched
                .then(|| {
                    [
                        format!("--iodepth_batch_submit={}", job.iodepth),
                        format!("--iodepth_batch_complete_max={}", job.iodepth),
                    ]
                })
                .into_iter()
                .flatten(),
        )
        .output()
        .map_err(|e| format!("cannot run fio: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "fio failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    parse(
        &String::from_utf8_lossy(&out.stdout),
        job.rw.contains("write"),
    )
}

/// Reads fio's `--output-format=json` text.
pub fn parse(json: &str, write: bool) -> Result<FioResult, String> {
    // fio may print warnings before the JSON document.
    let start = json.find('{').ok_or("no JSON in fio output")?;
    let v: serde_json::Value =
        serde_json::from_str(&json[start..]).map_err(|e| format!("bad fio JSON: {e}"))?;
    let side = &v["jobs"][0][if write { "write" } else { "read" }];
    let pct = |p: &str| side["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1000.0;
    Ok(FioResult {
        iops: side["iops"].as_f64().ok_or("fio JSON lacks iops")?,
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fio_json() {
        let text = r#"note: something
{"jobs":[{"read":{"iops":12345.6,"clat_ns":{"percentile":{"50.000000":20480,"99.000000":91136}}},
"write":{"iops":0}}]}"#;
        let r = parse(text, false).unwrap();
        assert_eq!(r.iops, 12345.6);
        assert_eq!(r.p50_us, 20.48);
        assert_eq!(r.p99_us, 91.136);
        assert!(parse("{}", false).is_err());
        assert!(parse("garbage", false).is_err());
    }
}
