//! On-disk cache of compiled kernel images. NVRTC takes about a second to compile [`super::KERNEL_SOURCE`], at every
//! start and on every tensor-parallel rank; the CUBIN depends only on the source, the target architecture, the
//! compile options and the NVRTC version, so it is kept in a file named by a hash of all four and reused.
//!
//! A cache file is `MAGIC`, the payload length and the payload's xxh3 hash (little-endian u64s), then the payload.
//! A file that is missing, truncated or fails the hash is compiled again and rewritten (written to a temporary file
//! first, then renamed, so concurrent ranks never read a half-written image). A cache directory that cannot be
//! written costs only the compile: the image is still returned.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::xxh3_64;

use super::{COMPILE_OPTIONS, CudaError, KERNEL_SOURCE, compile_cubin, nvrtc_version};

const MAGIC: &[u8; 8] = b"FRTKCUB1";
const HEADER: usize = 24;

/// A directory of cached kernel images.
#[derive(Debug, Clone)]
pub struct KernelCache {
    dir: PathBuf,
}

/// Where an image came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Read from the cache.
    Hit,
    /// Compiled, and written to the cache.
    Stored,
    /// Compiled; the cache could not be written (the reason is dropped: the image is fine).
    Unwritable,
}

impl KernelCache {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CUBIN of [`KERNEL_SOURCE`] for `arch` (`sm_XY`), from the cache or compiled (and then stored).
    pub fn cubin(&self, arch: &str) -> Result<(Vec<u8>, CacheOutcome), CudaError> {
        if !arch.starts_with("sm_") {
            return Err(CudaError::Unsupported(format!("the kernel cache holds CUBINs (sm_XY), not {arch}")));
        }
        let path = self.path(arch)?;
        if let Some(image) = fs::read(&path).ok().and_then(|bytes| decode(&bytes).map(<[u8]>::to_vec)) {
            return Ok((image, CacheOutcome::Hit));
        }
        let image = compile_cubin(arch)?;
        let outcome = match self.store(&path, &image) {
            Ok(()) => CacheOutcome::Stored,
            Err(_) => CacheOutcome::Unwritable,
        };
        Ok((image, outcome))
    }

    /// The cache file for `arch` under this NVRTC.
    pub fn path(&self, arch: &str) -> Result<PathBuf, CudaError> {
        let (major, minor) = nvrtc_version()?;
        let key = format!("{KERNEL_SOURCE}\n{arch}\n{}\nnvrtc {major}.{minor}", COMPILE_OPTIONS.join(" "));
        Ok(self.dir.join(format!("{:016x}-{arch}.cubin", xxh3_64(key.as_bytes()))))
    }

    fn store(&self, path: &Path, image: &[u8]) -> std::io::Result<()> {
        fs::create_dir_all(&self.dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        tmp.write_all(&encode(image))?;
        tmp.as_file().sync_all()?;
        tmp.persist(path).map(drop).map_err(|e| e.error)
    }
}

fn encode(image: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + image.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(image.len() as u64).to_le_bytes());
    out.extend_from_slice(&xxh3_64(image).to_le_bytes());
    out.extend_from_slice(image);
    out
}

/// The payload of a well-formed cache file.
fn decode(bytes: &[u8]) -> Option<&[u8]> {
    let (header, payload) = bytes.split_at_checked(HEADER)?;
    let word = |i: usize| u64::from_le_bytes(header[i..i + 8].try_into().expect("8 bytes"));
    (&header[..8] == MAGIC && word(8) == payload.len() as u64 && word(16) == xxh3_64(payload)).then_some(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_round_trip_and_damage_is_detected() {
        let image = b"not really a cubin".to_vec();
        let file = encode(&image);
        assert_eq!(decode(&file), Some(&image[..]));
        assert_eq!(decode(&file[..file.len() - 1]), None, "truncated");
        assert_eq!(decode(&file[..10]), None, "shorter than the header");
        let mut flipped = file.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(decode(&flipped), None, "payload changed");
        let mut magic = file;
        magic[0] = b'X';
        assert_eq!(decode(&magic), None, "not a cache file");
    }

    /// Compiles through the cache (NVRTC needed; CI sets `FERRITE_REQUIRE_NVRTC=1`): the first call stores, the
    /// second reads the same image back, a damaged file is compiled again and replaced.
    #[test]
    fn compiles_once_then_reads_back() {
        if !super::super::nvrtc_available() {
            assert!(std::env::var_os("FERRITE_REQUIRE_NVRTC").is_none(), "FERRITE_REQUIRE_NVRTC is set but libnvrtc was not found");
            eprintln!("skipped: libnvrtc not found");
            return;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let cache = KernelCache::new(dir.path().join("nested"));
        let (first, outcome) = cache.cubin("sm_80").expect("compile");
        assert_eq!(outcome, CacheOutcome::Stored);
        let (again, outcome) = cache.cubin("sm_80").expect("read");
        assert_eq!((outcome, &again), (CacheOutcome::Hit, &first));
        let path = cache.path("sm_80").expect("path");
        assert_ne!(path, cache.path("sm_90").expect("path"), "one file per architecture");
        let bytes = fs::read(&path).expect("cache file");
        fs::write(&path, &bytes[..bytes.len() / 2]).expect("truncate");
        let (repaired, outcome) = cache.cubin("sm_80").expect("recompile");
        assert_eq!((outcome, &repaired), (CacheOutcome::Stored, &first));
        assert_eq!(fs::read(&path).expect("rewritten"), bytes);
        assert!(cache.cubin("compute_90").is_err(), "PTX is not cached");
        // A cache directory that cannot exist (a file is in the way) still yields the image.
        let blocked = dir.path().join("a-file");
        fs::write(&blocked, b"x").expect("file");
        let (image, outcome) = KernelCache::new(blocked.join("kernels")).cubin("sm_80").expect("compile");
        assert_eq!((outcome, &image), (CacheOutcome::Unwritable, &first));
    }
}
