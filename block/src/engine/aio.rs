//! Placeholder: being written.

use std::sync::Arc;

use crate::disk::Disk;
use crate::engine::EngineOptions;
use crate::error::Error;

/// The native engine.
pub struct AioEngine;

impl AioEngine {
    /// Creates the engine.
    pub fn new(_disk: Arc<Disk>, _options: &EngineOptions) -> Result<Box<dyn crate::engine::IoEngine>, Error> {
        Err(Error::InvalidOption("native engine not built yet".into()))
    }
}
