//! The guest's initramfs: busybox, fio with its libraries, the virtio-blk modules and an
//! `/init` that runs one script and powers off.
//!
//! The large part (about 90 MB, mostly fio's libraries) is built once per kernel version and
//! set of host binaries and cached; each run copies it and appends a small second archive
//! holding `/run.sh` (the kernel unpacks concatenated archives in order).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, UNIX_EPOCH};

use super::cpio::CpioWriter;
use super::{Tools, output_of};

/// Bump when the layout of the archive changes, to invalidate cached copies.
const FORMAT_VERSION: u32 = 1;

/// The modules a virtio-blk PCI disk needs; their dependencies come from `modules.dep`.
pub const VIRTIO_BLK_MODULES: &[&str] = &["virtio_pci", "virtio_blk"];

/// Printed by `/init` before the script runs.
pub const START_MARKER: &str = "@@LINUX_GUEST_START@@";
/// Printed by `/init` after the script, as `@@LINUX_GUEST_END rc=<status>@@`.
pub const END_MARKER_PREFIX: &str = "@@LINUX_GUEST_END rc=";

/// A built (or cached) base initramfs.
#[derive(Clone, Debug)]
pub struct Initramfs {
    /// The cached base archive; never modified once written.
    pub path: PathBuf,
    /// Module file names in load order (dependencies first).
    pub modules: Vec<String>,
    /// Whether it came from the cache.
    pub cached: bool,
    /// Time spent resolving inputs and (when not cached) writing the archive.
    pub build_time: Duration,
}

/// One host file placed in the guest.
struct HostFile {
    guest: String,
    host: PathBuf,
}

/// What goes into the base archive, resolved from the host.
struct Inputs {
    busybox_applets: Vec<String>,
    /// Module name, host path, in load order.
    modules: Vec<(String, PathBuf)>,
    /// fio, its libraries and the dynamic loader.
    files: Vec<HostFile>,
    lib_dirs: Vec<String>,
}

impl Initramfs {
    /// Builds the base archive for `tools` under `cache_dir`, or reuses a cached one built
    /// from the same kernel version and host files.
    pub fn build(tools: &Tools, cache_dir: &Path) -> Result<Initramfs, String> {
        let start = Instant::now();
        let inputs = resolve(tools)?;
        let key = cache_key(tools, &inputs);
        fs::create_dir_all(cache_dir)
            .map_err(|e| format!("cannot create {}: {e}", cache_dir.display()))?;
        let path = cache_dir.join(format!(
            "linux-guest-initramfs-{}-{key:016x}.cpio",
            tools.kernel_version
        ));
        let modules = inputs
            .modules
            .iter()
            .map(|(name, _)| format!("{name}.ko"))
            .collect();
        // One build at a time in this process (tests run in parallel); other processes
        // write their own temporary file and the last rename wins, with equal content.
        static BUILD: Mutex<()> = Mutex::new(());
        static TMP_SEQ: AtomicU64 = AtomicU64::new(0);
        let _guard = block::sync::lock(&BUILD);
        let cached = path.is_file();
        if !cached {
            let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
            let tmp = path.with_extension(format!("tmp{}-{seq}", std::process::id()));
            let result = write_base(tools, &inputs, &tmp)
                .and_then(|()| fs::rename(&tmp, &path).map_err(|e| e.to_string()));
            if let Err(e) = result {
                let _ = fs::remove_file(&tmp);
                return Err(format!("building {}: {e}", path.display()));
            }
            remove_stale(cache_dir, &path);
        }
        Ok(Initramfs {
            path,
            modules,
            cached,
            build_time: start.elapsed(),
        })
    }

    /// Writes `dir/initrd.cpio`: the base archive followed by one holding `/run.sh` (the
    /// script `/init` runs) and `extra` files (guest path, content). Returns its path.
    pub fn with_script(
        &self,
        dir: &Path,
        script: &str,
        extra: &[(&str, &[u8])],
    ) -> Result<PathBuf, String> {
        let out = dir.join("initrd.cpio");
        fs::copy(&self.path, &out).map_err(|e| format!("copy initramfs: {e}"))?;
        let file = fs::OpenOptions::new()
            .append(true)
            .open(&out)
            .map_err(|e| format!("open {}: {e}", out.display()))?;
        let mut w = CpioWriter::new(BufWriter::new(file));
        let add = |w: &mut CpioWriter<_>| -> std::io::Result<()> {
            w.file_bytes("run.sh", 0o755, script.as_bytes())?;
            for (path, data) in extra {
                w.file_bytes(path, 0o644, data)?;
            }
            Ok(())
        };
        add(&mut w)
            .and_then(|()| w.finish().map(drop))
            .map_err(|e| format!("append to {}: {e}", out.display()))?;
        Ok(out)
    }
}

/// Removes archives of other kernels or host files, so the cache holds one.
fn remove_stale(cache_dir: &Path, keep: &Path) {
    let Ok(entries) = fs::read_dir(cache_dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("linux-guest-initramfs-") && name.ends_with(".cpio") && e.path() != keep
        {
            let _ = fs::remove_file(e.path());
        }
    }
}

fn resolve(tools: &Tools) -> Result<Inputs, String> {
    let list = output_of(Command::new(&tools.busybox).arg("--list"))?;
    let busybox_applets = list
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
        .map(String::from)
        .collect();
    let modules = resolve_modules(&tools.modules_dir, VIRTIO_BLK_MODULES)?;

    let mut files = vec![HostFile {
        guest: "usr/bin/fio".into(),
        host: tools.fio.clone(),
    }];
    let ldd = output_of(Command::new("ldd").arg(&tools.fio))?;
    let mut lib_dirs = BTreeSet::new();
    for lib in parse_ldd(&ldd)? {
        let host = fs::canonicalize(&lib).map_err(|e| format!("{lib}: {e}"))?;
        if let Some((dir, _)) = lib.rsplit_once('/') {
            lib_dirs.insert(dir.to_string());
        }
        files.push(HostFile {
            guest: lib.trim_start_matches('/').to_string(),
            host,
        });
    }
    Ok(Inputs {
        busybox_applets,
        modules,
        files,
        lib_dirs: lib_dirs.into_iter().collect(),
    })
}

/// The absolute library paths `ldd` printed, the dynamic loader included.
fn parse_ldd(out: &str) -> Result<Vec<String>, String> {
    let mut libs = Vec::new();
    for line in out.lines().map(str::trim) {
        if line.contains("not found") {
            return Err(format!("ldd: {line}"));
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(p.to_string());
        }
    }
    if libs.is_empty() {
        return Err(format!("ldd listed no libraries:\n{out}"));
    }
    Ok(libs)
}

/// `roots` and everything they depend on, dependencies first, from `modules.dep`.
fn resolve_modules(modules_dir: &Path, roots: &[&str]) -> Result<Vec<(String, PathBuf)>, String> {
    let dep_file = modules_dir.join("modules.dep");
    let text =
        fs::read_to_string(&dep_file).map_err(|e| format!("read {}: {e}", dep_file.display()))?;
    let deps = parse_modules_dep(&text);
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for root in roots {
        visit(&deps, &module_name(root), &mut seen, &mut order, 0)?;
    }
    Ok(order
        .into_iter()
        .map(|(name, rel)| (name, modules_dir.join(rel)))
        .collect())
}

/// Module name -> (path relative to the modules dir, names of its dependencies).
type ModDeps = BTreeMap<String, (String, Vec<String>)>;

fn parse_modules_dep(text: &str) -> ModDeps {
    let mut deps = BTreeMap::new();
    for line in text.lines() {
        let Some((path, rest)) = line.split_once(':') else {
            continue;
        };
        let needs = rest.split_whitespace().map(module_name).collect();
        deps.insert(module_name(path), (path.trim().to_string(), needs));
    }
    deps
}

/// "kernel/drivers/virtio/virtio-pci.ko.xz" -> "virtio_pci".
fn module_name(path: &str) -> String {
    let base = path.trim().rsplit('/').next().unwrap_or(path);
    let base = base.split(".ko").next().unwrap_or(base);
    base.replace('-', "_")
}

fn visit(
    deps: &ModDeps,
    name: &str,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<(String, String)>,
    depth: usize,
) -> Result<(), String> {
    if seen.contains(name) {
        return Ok(());
    }
    if depth > 64 {
        return Err(format!("modules.dep: dependency cycle through {name}"));
    }
    let (path, needs) = deps
        .get(name)
        .ok_or_else(|| format!("module {name} not in modules.dep (built in, or wrong kernel?)"))?;
    for dep in needs {
        visit(deps, dep, seen, order, depth + 1)?;
    }
    seen.insert(name.to_string());
    order.push((name.to_string(), path.clone()));
    Ok(())
}

/// The module's content, decompressed when the kernel ships it compressed (busybox insmod
/// does not reliably handle compressed modules).
fn module_bytes(path: &Path) -> Result<Vec<u8>, String> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".ko.xz") {
        Some(("xz", "xz-utils"))
    } else if name.ends_with(".ko.zst") {
        Some(("zstd", "zstd"))
    } else if name.ends_with(".ko.gz") {
        Some(("gzip", "gzip"))
    } else {
        None
    };
    match tool {
        None => fs::read(path).map_err(|e| format!("read {name}: {e}")),
        Some((tool, package)) => {
            let out = Command::new(tool)
                .arg("-dc")
                .arg(path)
                .output()
                .map_err(|e| format!("{tool} (apt-get install {package}): {e}"))?;
            if !out.status.success() {
                return Err(format!("{tool} -dc {name}: {}", out.status));
            }
            Ok(out.stdout)
        }
    }
}

fn cache_key(tools: &Tools, inputs: &Inputs) -> u64 {
    let mut h = DefaultHasher::new();
    FORMAT_VERSION.hash(&mut h);
    tools.kernel_version.hash(&mut h);
    let hosts = inputs
        .modules
        .iter()
        .map(|(_, p)| p)
        .chain(inputs.files.iter().map(|f| &f.host))
        .chain(std::iter::once(&tools.busybox));
    for p in hosts {
        p.hash(&mut h);
        if let Ok(m) = fs::metadata(p) {
            m.len().hash(&mut h);
            if let Ok(t) = m.modified() {
                t.duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .hash(&mut h);
            }
        }
    }
    for f in &inputs.files {
        f.guest.hash(&mut h);
    }
    h.finish()
}

fn write_base(tools: &Tools, inputs: &Inputs, out: &Path) -> Result<(), String> {
    let file = File::create(out).map_err(|e| format!("create {}: {e}", out.display()))?;
    let mut w = CpioWriter::new(BufWriter::with_capacity(1 << 20, file));
    let io = |e: std::io::Error| e.to_string();
    for d in [
        "dev", "proc", "sys", "tmp", "mnt", "root", "etc", "bin", "sbin",
    ] {
        w.dir(d).map_err(io)?;
    }
    w.char_dev("dev/console", 5, 1).map_err(io)?;
    w.char_dev("dev/null", 1, 3).map_err(io)?;
    w.file_from_host("bin/busybox", 0o755, &tools.busybox)
        .map_err(io)?;
    for applet in &inputs.busybox_applets {
        w.symlink(&format!("bin/{applet}"), "busybox").map_err(io)?;
    }
    for f in &inputs.files {
        w.file_from_host(&f.guest, 0o755, &f.host).map_err(io)?;
    }
    let mut order = String::new();
    for (name, host) in &inputs.modules {
        let data = module_bytes(host)?;
        w.file_bytes(&format!("lib/modules/{name}.ko"), 0o644, &data)
            .map_err(io)?;
        order.push_str(&format!("{name}.ko\n"));
    }
    w.file_bytes("etc/modules.order", 0o644, order.as_bytes())
        .map_err(io)?;
    w.file_bytes("init", 0o755, init_script(&inputs.lib_dirs).as_bytes())
        .map_err(io)?;
    let out = w.finish().map_err(io)?;
    out.into_inner()
        .map_err(|e| e.to_string())?
        .sync_all()
        .map_err(io)
}

fn init_script(lib_dirs: &[String]) -> String {
    format!(
        r#"#!/bin/busybox sh
export PATH=/bin:/sbin:/usr/bin
export LD_LIBRARY_PATH={libs}
export HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
for m in $(cat /etc/modules.order); do
    insmod /lib/modules/$m || echo "@@LINUX_GUEST insmod $m failed@@"
done
cd /root
echo "{START_MARKER}"
if [ -f /run.sh ]; then
    sh /run.sh
    rc=$?
else
    echo "no /run.sh in the initramfs"
    rc=127
fi
echo "{END_MARKER_PREFIX}$rc@@"
sync
poweroff -f
"#,
        libs = lib_dirs.join(":"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_parsed() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                   \tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f5a)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f5a)\n";
        assert_eq!(
            parse_ldd(out).unwrap(),
            [
                "/lib/x86_64-linux-gnu/libz.so.1",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
        assert!(parse_ldd("\tlibfoo.so => not found\n").is_err());
    }

    #[test]
    fn modules_resolved_dependencies_first() {
        let text = "kernel/drivers/virtio/virtio.ko.xz: kernel/drivers/virtio/virtio_ring.ko.xz\n\
                    kernel/drivers/virtio/virtio_ring.ko.xz:\n\
                    kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz:\n\
                    kernel/drivers/virtio/virtio_pci.ko.xz: kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz\n\
                    kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio.ko.xz kernel/drivers/virtio/virtio_ring.ko.xz\n";
        let deps = parse_modules_dep(text);
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        for root in VIRTIO_BLK_MODULES {
            visit(&deps, root, &mut seen, &mut order, 0).unwrap();
        }
        let names: Vec<&str> = order.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                "virtio_pci_modern_dev",
                "virtio_ring",
                "virtio",
                "virtio_pci",
                "virtio_blk"
            ]
        );
        assert_eq!(
            order[0].1,
            "kernel/drivers/virtio/virtio_pci_modern_dev.ko.xz"
        );
        assert!(visit(&deps, "nope", &mut seen, &mut order, 0).is_err());
    }

    #[test]
    fn cyclic_modules_dep_is_an_error() {
        let deps = parse_modules_dep("a.ko: b.ko\nb.ko: a.ko\n");
        let err = visit(&deps, "a", &mut BTreeSet::new(), &mut Vec::new(), 0).unwrap_err();
        assert!(err.contains("cycle"), "{err}");
    }
}
