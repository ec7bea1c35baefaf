//! New qcow2 images (a mirror's target): made by imago in an empty file the caller
//! created, through our own storage (plain syscalls: this runs on the control plane).

use std::path::Path;
use std::sync::Arc;

use imago::FormatCreateBuilder;
use imago::qcow2::Qcow2CreateBuilder;

use super::{EngineStorage, ImageFormat};
use crate::disk::{Disk, DiskOptions};
use crate::error::Error;

/// Writes a new qcow2 image of `size` bytes into the empty file at `path` (64 KiB
/// clusters, 16-bit refcounts, as `qemu-img create` makes them), naming `backing` (its
/// path as the header should hold it, and its format) when given.
pub fn create(path: &Path, size: u64, backing: Option<(&Path, ImageFormat)>) -> Result<(), Error> {
    let fail = |msg: String| Error::Image {
        path: path.to_path_buf(),
        msg,
    };
    let file = Arc::new(Disk::open(&DiskOptions {
        cache: crate::cache::CacheMode::Writeback,
        ..DiskOptions::new(path)
    })?);
    if file.capacity() != 0 {
        return Err(fail("a new qcow2 image needs an empty file".into()));
    }
    let storage = EngineStorage::new(file);
    let mut builder =
        <Qcow2CreateBuilder<EngineStorage> as FormatCreateBuilder<EngineStorage>>::new(storage)
            .size(size);
    if let Some((backing, format)) = backing {
        let name = backing
            .to_str()
            .ok_or_else(|| fail(format!("backing file {} is not UTF-8", backing.display())))?;
        builder = builder.backing(name.to_string(), format.as_str().to_string());
    }
    futures::executor::block_on(builder.create()).map_err(|e| fail(e.to_string()))?;
    Ok(())
}
