//! Where a model file's bytes come from.
//!
//! `common` parses model files but never maps them: a memory map needs `unsafe`, which lives in `ferrite-kernels`
//! only. The worker opens models with its mapping ([`FileSource::Mapped`], zero-copy tensor bytes); everyone else
//! (the router, tools, tests) opens them [`FileSource::Unmapped`]: headers and metadata are read with ordinary reads,
//! and a tensor's bytes are read on demand with positioned reads (so a router reading a tokenizer out of a 40 GB GGUF
//! reads megabytes, not the file).

use std::borrow::Cow;
use std::fmt;
use std::fs::File;
use std::io;
use std::ops::Deref;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// The bytes of a whole file, held in memory by whoever opened it (for example a read-only memory map).
pub type FileBytes = Arc<dyn Deref<Target = [u8]> + Send + Sync + std::panic::RefUnwindSafe>;

/// Opens a file as [`FileBytes`] (the worker passes its memory map).
pub type FileMapper = dyn Fn(&Path) -> io::Result<FileBytes> + Send + Sync;

/// A model file: either all of its bytes in memory, or an open file read on demand.
#[derive(Clone)]
pub enum FileSource {
    /// Every byte addressable (a memory map, or a file read whole).
    Mapped(FileBytes),
    /// An open file: headers read once, tensor bytes read when asked for.
    Unmapped { file: Arc<File>, len: u64 },
}

impl fmt::Debug for FileSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FileSource::Mapped(b) => write!(f, "Mapped({} bytes)", b.len()),
            FileSource::Unmapped { len, .. } => write!(f, "Unmapped({len} bytes)"),
        }
    }
}

impl FileSource {
    /// Opens `path` with `mapper`, or unmapped without one.
    pub fn open(path: &Path, mapper: Option<&FileMapper>) -> io::Result<Self> {
        match mapper {
            Some(map) => Ok(FileSource::Mapped(map(path)?)),
            None => {
                let file = File::open(path)?;
                let len = file.metadata()?.len();
                Ok(FileSource::Unmapped { file: Arc::new(file), len })
            }
        }
    }

    /// The file's length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            FileSource::Mapped(b) => b.len() as u64,
            FileSource::Unmapped { len, .. } => *len,
        }
    }

    /// True for an empty file.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether tensor bytes are addressable without a read.
    pub fn is_mapped(&self) -> bool {
        matches!(self, FileSource::Mapped(_))
    }

    /// `len` bytes at `offset` (borrowed when mapped, read otherwise). The range must lie inside the file.
    pub fn range(&self, offset: u64, len: usize) -> io::Result<Cow<'_, [u8]>> {
        let end = offset
            .checked_add(len as u64)
            .filter(|&e| e <= self.len())
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, format!("range {offset}+{len} lies past the end of the file")))?;
        match self {
            FileSource::Mapped(b) => Ok(Cow::Borrowed(&b[offset as usize..end as usize])),
            FileSource::Unmapped { file, .. } => {
                let mut buf = vec![0u8; len];
                file.read_exact_at(&mut buf, offset)?;
                Ok(Cow::Owned(buf))
            }
        }
    }

    /// Up to `len` bytes from the start of the file (fewer when the file is shorter).
    pub fn prefix(&self, len: usize) -> io::Result<Cow<'_, [u8]>> {
        let n = (self.len().min(len as u64)) as usize;
        self.range(0, n)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn mapped_and_unmapped_read_the_same_bytes() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        f.write_all(&data).unwrap();
        let unmapped = FileSource::open(f.path(), None).unwrap();
        let bytes: FileBytes = Arc::new(std::fs::read(f.path()).unwrap());
        let mapped = FileSource::Mapped(bytes);
        for (off, len) in [(0u64, 0usize), (0, 10), (9_990, 10), (1234, 4321)] {
            assert_eq!(unmapped.range(off, len).unwrap(), mapped.range(off, len).unwrap());
            assert_eq!(&unmapped.range(off, len).unwrap()[..], &data[off as usize..off as usize + len]);
        }
        assert!(unmapped.range(9_995, 10).is_err() && mapped.range(9_995, 10).is_err());
        assert!(unmapped.range(u64::MAX, 1).is_err());
        assert_eq!(unmapped.prefix(1 << 20).unwrap().len(), 10_000);
        assert!(!unmapped.is_mapped() && mapped.is_mapped());
    }
}
