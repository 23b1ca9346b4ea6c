//! Host memory primitives that need `unsafe`: read-only file mappings (model weights are memory-mapped so a
//! multi-gigabyte checkpoint is not copied into anonymous memory before use).

use std::fs::File;
use std::ops::Deref;
use std::path::Path;

/// A read-only view of a whole file, memory-mapped.
#[derive(Debug)]
pub struct MappedFile {
    map: memmap2::Mmap,
}

impl MappedFile {
    /// Maps `path` read-only.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = File::open(path)?;
        // SAFETY: the mapping is read-only and private to this process. Model files are treated as immutable while
        // loaded (the contract llama.cpp and safetensors rely on too); another process truncating or rewriting a
        // mapped model file is outside what we defend against.
        let map = unsafe { memmap2::Mmap::map(&file) }?;
        Ok(Self { map })
    }
}

impl Deref for MappedFile {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map
    }
}
