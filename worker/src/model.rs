//! Opening a model for serving: `ferrite-common` parses the files, over this crate's memory map, so tensor bytes are
//! borrowed from the page cache instead of read into anonymous memory first.

use std::path::Path;
use std::sync::Arc;

use ferrite_common::error::ModelError;
use ferrite_common::model::ModelFiles;
use ferrite_common::source::FileBytes;
use ferrite_kernels::host::MappedFile;

/// Opens a `.gguf` file or Hugging Face directory with every file memory-mapped.
pub fn open_model(path: &Path) -> Result<ModelFiles, ModelError> {
    ModelFiles::open_with(path, Some(&|p: &Path| Ok(Arc::new(MappedFile::open(p)?) as FileBytes)))
}
