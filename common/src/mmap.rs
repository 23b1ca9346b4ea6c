//! Read-only memory mappings of model files.

use std::fs::File;
use std::ops::Deref;
use std::path::Path;

use crate::error::ModelError;

/// A read-only view of a whole file, memory-mapped.
#[derive(Debug)]
pub struct MappedFile {
    map: memmap2::Mmap,
}

impl MappedFile {
    /// Maps `path` read-only.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the mapping is read-only and private to this process. Model files are treated as immutable while
        // loaded (the same contract llama.cpp and safetensors rely on); truncating a mapped file under a running
        // process is outside what we defend against.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        Ok(Self { map })
    }
}

impl Deref for MappedFile {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map
    }
}
