//! GGUF (v2/v3) reader: metadata, tensor index, and tensor bytes (zero-copy from a mapping, or read on demand; see
//! [`crate::source`]).
//!
//! Format: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>. All integers are little-endian.
//! Tensor dims are stored `ne0` first (the fastest-varying dimension); [`GgufTensorInfo::shape`] reverses them into the
//! row-major order the rest of Ferrite uses (`[rows, cols]`).

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::dtype::GgmlType;
use crate::error::ModelError;
use crate::source::{FileMapper, FileSource};

const GGUF_MAGIC: u32 = 0x4655_4747; // "GGUF" little-endian
const DEFAULT_ALIGNMENT: u64 = 32;
/// Refuse absurd counts before allocating (a corrupt header must not cause a huge allocation).
const MAX_COUNT: u64 = 1 << 26;
/// The first read of an unmapped file's header; it doubles until the header fits (a Llama-3 vocabulary's metadata
/// is ~8 MB).
const FIRST_HEADER_READ: usize = 16 << 20;

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl GgufValue {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// Any non-negative integer value as u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer value as i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// A float or integer value as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(v) => Some(v),
            _ => None,
        }
    }
}

/// Index entry of one tensor.
#[derive(Debug, Clone)]
pub struct GgufTensorInfo {
    pub name: String,
    /// Dims as stored (`ne0` first).
    pub dims: Vec<u64>,
    pub dtype: GgmlType,
    /// Absolute byte offset in the file.
    pub offset: u64,
    pub n_bytes: u64,
}

impl GgufTensorInfo {
    /// Row-major shape (`[rows, cols]` for a matrix: the reverse of the stored dims).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A parsed GGUF file.
#[derive(Debug, Clone)]
pub struct GgufFile {
    path: PathBuf,
    source: FileSource,
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    by_name: BTreeMap<String, usize>,
}

impl GgufFile {
    /// Parses `path`, reading its header (tensor bytes are read on demand). Checks magic, version, that every tensor
    /// lies inside the file and that its byte size matches its dtype and shape.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        Self::open_with(path, None)
    }

    /// As [`GgufFile::open`], over the bytes `mapper` gives (the worker's memory map) when there is one.
    pub fn open_with(path: &Path, mapper: Option<&FileMapper>) -> Result<Self, ModelError> {
        Self::open_reading(path, mapper, FIRST_HEADER_READ)
    }

    fn open_reading(path: &Path, mapper: Option<&FileMapper>, first_read: usize) -> Result<Self, ModelError> {
        let source = FileSource::open(path, mapper).map_err(|e| ModelError::io(path, e))?;
        let mut want = first_read.max(1);
        loop {
            let head = source.prefix(want).map_err(|e| ModelError::io(path, e))?;
            match Self::parse(path, &head, source.len()) {
                // The header runs past what was read (not past the file): read more.
                Err(ModelError::Truncated { len, .. }) if len == head.len() as u64 && len < source.len() => want = want.saturating_mul(2),
                Ok((version, metadata, tensors, by_name)) => {
                    return Ok(Self { path: path.into(), source: source.clone(), version, metadata, tensors, by_name });
                }
                Err(e) => return Err(e),
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn parse(
        path: &Path,
        head: &[u8],
        file_len: u64,
    ) -> Result<(u32, BTreeMap<String, GgufValue>, Vec<GgufTensorInfo>, BTreeMap<String, usize>), ModelError> {
        let mut r = Reader { buf: head, pos: 0, path };
        let magic = r.u32("magic")?;
        if magic != GGUF_MAGIC {
            return Err(ModelError::BadMagic { path: path.into(), magic });
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(ModelError::UnsupportedVersion { path: path.into(), version });
        }
        let n_tensors = r.count("tensor count")?;
        let n_kv = r.count("metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string("metadata key")?;
            let ty = r.u32("metadata type")?;
            let value = r.value(ty, &key, 0)?;
            metadata.insert(key, value);
        }
        let mut infos = Vec::with_capacity(n_tensors as usize);
        for _ in 0..n_tensors {
            let name = r.string("tensor name")?;
            let n_dims = r.u32("tensor n_dims")?;
            if n_dims == 0 || n_dims > 4 {
                return Err(ModelError::malformed(path, format!("tensor `{name}` has {n_dims} dims")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(r.u64("tensor dim")?);
            }
            let type_id = r.u32("tensor type")?;
            let offset = r.u64("tensor offset")?;
            infos.push((name, dims, type_id, offset));
        }
        let alignment = match metadata.get("general.alignment") {
            Some(v) => v
                .as_u64()
                .filter(|a| *a > 0 && a.is_power_of_two())
                .ok_or_else(|| ModelError::malformed(path, "general.alignment is not a power of two"))?,
            None => DEFAULT_ALIGNMENT,
        };
        let data_start = (r.pos as u64).div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(infos.len());
        let mut by_name = BTreeMap::new();
        for (name, dims, type_id, rel) in infos {
            let dtype = GgmlType::from_id(type_id).ok_or_else(|| ModelError::UnsupportedDtype {
                path: path.into(),
                name: name.clone(),
                dtype: format!("ggml type id {type_id}"),
            })?;
            let n: u64 = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| ModelError::malformed(path, format!("tensor `{name}` dims {dims:?} overflow")))?;
            let n_bytes = usize::try_from(n)
                .ok()
                .and_then(|n| dtype.bytes_for(n))
                .filter(|_| dims[0] % dtype.block_size() as u64 == 0)
                .ok_or_else(|| ModelError::malformed(path, format!("tensor `{name}` dims {dims:?} are not whole {dtype} blocks")))?
                as u64;
            let offset = data_start.checked_add(rel).ok_or_else(|| ModelError::malformed(path, "offset overflow"))?;
            let end = offset.saturating_add(n_bytes);
            if end > file_len {
                return Err(ModelError::Truncated { path: path.into(), what: format!("tensor `{name}`"), needed: end, len: file_len });
            }
            if by_name.insert(name.clone(), tensors.len()).is_some() {
                return Err(ModelError::malformed(path, format!("duplicate tensor `{name}`")));
            }
            tensors.push(GgufTensorInfo { name, dims, dtype, offset, n_bytes });
        }
        Ok((version, metadata, tensors, by_name))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// A required metadata value, or a `MissingMetadata` error naming the key.
    pub fn require(&self, key: &str) -> Result<&GgufValue, ModelError> {
        self.get(key).ok_or_else(|| ModelError::MissingMetadata { path: self.path.clone(), key: key.into() })
    }

    /// A required string array (tokens, merges).
    pub fn string_array(&self, key: &str) -> Result<Vec<&str>, ModelError> {
        let arr = self.require(key)?.as_array().ok_or_else(|| self.bad_type(key, "array"))?;
        arr.iter().map(|v| v.as_str().ok_or_else(|| self.bad_type(key, "array of strings"))).collect()
    }

    fn bad_type(&self, key: &str, want: &str) -> ModelError {
        ModelError::malformed(&self.path, format!("metadata `{key}` is not {want}"))
    }

    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw bytes of a tensor (validated to lie inside the file at open time): borrowed from the mapping, or read.
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> Result<Cow<'_, [u8]>, ModelError> {
        self.source.range(info.offset, info.n_bytes as usize).map_err(|e| ModelError::io(&self.path, e))
    }

    /// `len` bytes of a tensor from `offset` within it (the fingerprint samples a tensor's ends this way).
    pub fn tensor_range(&self, info: &GgufTensorInfo, offset: u64, len: usize) -> Result<Cow<'_, [u8]>, ModelError> {
        self.source.range(info.offset + offset, len).map_err(|e| ModelError::io(&self.path, e))
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl Reader<'_> {
    fn take(&mut self, n: usize, what: &str) -> Result<&[u8], ModelError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| ModelError::Truncated {
            path: self.path.into(),
            what: what.to_string(),
            needed: self.pos as u64 + n as u64,
            len: self.buf.len() as u64,
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self, what: &str) -> Result<[u8; N], ModelError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, ModelError> {
        Ok(u32::from_le_bytes(self.arr(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, ModelError> {
        Ok(u64::from_le_bytes(self.arr(what)?))
    }

    fn count(&mut self, what: &str) -> Result<u64, ModelError> {
        let n = self.u64(what)?;
        if n > MAX_COUNT {
            return Err(ModelError::malformed(self.path, format!("{what} {n} is implausibly large")));
        }
        Ok(n)
    }

    fn string(&mut self, what: &str) -> Result<String, ModelError> {
        let len = self.u64(what)?;
        let len = usize::try_from(len).map_err(|_| ModelError::malformed(self.path, format!("{what} too long")))?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| ModelError::malformed(self.path, format!("{what} is not valid UTF-8")))
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<GgufValue, ModelError> {
        Ok(match ty {
            0 => GgufValue::U8(self.arr::<1>(key)?[0]),
            1 => GgufValue::I8(self.arr::<1>(key)?[0] as i8),
            2 => GgufValue::U16(u16::from_le_bytes(self.arr(key)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.arr(key)?)),
            4 => GgufValue::U32(self.u32(key)?),
            5 => GgufValue::I32(i32::from_le_bytes(self.arr(key)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.arr(key)?)),
            7 => GgufValue::Bool(self.arr::<1>(key)?[0] != 0),
            8 => GgufValue::String(self.string(key)?),
            9 if depth < 2 => {
                let elem_ty = self.u32(key)?;
                let n = self.count(key)?;
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(elem_ty, key, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(self.u64(key)?),
            11 => GgufValue::I64(i64::from_le_bytes(self.arr(key)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.arr(key)?)),
            _ => {
                return Err(ModelError::malformed(self.path, format!("metadata `{key}` has unknown value type {ty}")));
            }
        })
    }
}

/// Writes GGUF files. Used by tests to build small and deliberately broken files; it writes exactly what the reader
/// expects, so the two are tested against each other and against the real default model.
pub mod writer {
    use super::*;

    /// A metadata value to write.
    pub enum Meta<'a> {
        U32(u32),
        F32(f32),
        Bool(bool),
        Str(&'a str),
        StrArray(&'a [&'a str]),
        I32Array(&'a [i32]),
    }

    /// A tensor to write: name, dims (`ne0` first), dtype and raw bytes.
    pub struct TensorIn<'a> {
        pub name: &'a str,
        pub dims: &'a [u64],
        pub dtype: GgmlType,
        pub data: &'a [u8],
    }

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    /// Serializes a GGUF v3 file into bytes.
    pub fn to_bytes(meta: &[(&str, Meta<'_>)], tensors: &[TensorIn<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(GGUF_MAGIC.to_le_bytes());
        out.extend(3u32.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend((meta.len() as u64).to_le_bytes());
        for (k, v) in meta {
            put_str(&mut out, k);
            match v {
                Meta::U32(x) => {
                    out.extend(4u32.to_le_bytes());
                    out.extend(x.to_le_bytes());
                }
                Meta::F32(x) => {
                    out.extend(6u32.to_le_bytes());
                    out.extend(x.to_le_bytes());
                }
                Meta::Bool(x) => {
                    out.extend(7u32.to_le_bytes());
                    out.push(u8::from(*x));
                }
                Meta::Str(s) => {
                    out.extend(8u32.to_le_bytes());
                    put_str(&mut out, s);
                }
                Meta::StrArray(a) => {
                    out.extend(9u32.to_le_bytes());
                    out.extend(8u32.to_le_bytes());
                    out.extend((a.len() as u64).to_le_bytes());
                    for s in *a {
                        put_str(&mut out, s);
                    }
                }
                Meta::I32Array(a) => {
                    out.extend(9u32.to_le_bytes());
                    out.extend(5u32.to_le_bytes());
                    out.extend((a.len() as u64).to_le_bytes());
                    for x in *a {
                        out.extend(x.to_le_bytes());
                    }
                }
            }
        }
        let mut rel = 0u64;
        let mut offsets = Vec::new();
        for t in tensors {
            put_str(&mut out, t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend((t.dtype as u32).to_le_bytes());
            out.extend(rel.to_le_bytes());
            offsets.push(rel);
            rel = (rel + t.data.len() as u64).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
        }
        let data_start = (out.len() as u64).div_ceil(DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT;
        out.resize(data_start as usize, 0);
        for (t, off) in tensors.iter().zip(offsets) {
            out.resize((data_start + off) as usize, 0);
            out.extend(t.data);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::writer::*;
    use super::*;

    fn write(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    fn sample() -> Vec<u8> {
        let data: Vec<u8> = (0..4 * 6).map(|i| i as u8).collect();
        to_bytes(
            &[
                ("general.architecture", Meta::Str("llama")),
                ("llama.block_count", Meta::U32(2)),
                ("tokenizer.ggml.tokens", Meta::StrArray(&["a", "b"])),
            ],
            &[
                TensorIn { name: "x", dims: &[3, 2], dtype: GgmlType::F32, data: &data },
                TensorIn { name: "y", dims: &[2], dtype: GgmlType::F16, data: &[1, 2, 3, 4] },
            ],
        )
    }

    #[test]
    fn parses_metadata_and_tensors() {
        let dir = tempfile::tempdir().unwrap();
        let g = GgufFile::open(&write(&dir, "ok.gguf", &sample())).unwrap();
        assert_eq!(g.version(), 3);
        assert_eq!(g.get("general.architecture").unwrap().as_str(), Some("llama"));
        assert_eq!(g.get("llama.block_count").unwrap().as_u64(), Some(2));
        assert_eq!(g.string_array("tokenizer.ggml.tokens").unwrap(), vec!["a", "b"]);
        let x = g.tensor_info("x").unwrap();
        assert_eq!(x.shape(), vec![2, 3]);
        assert_eq!(g.tensor_bytes(x).unwrap()[..4], [0, 1, 2, 3]);
        assert_eq!(&g.tensor_bytes(g.tensor_info("y").unwrap()).unwrap()[..], &[1, 2, 3, 4]);
        // A header longer than the first read is read again, larger, until it fits; mapped gives the same file.
        let path = write(&dir, "ok2.gguf", &sample());
        let small = GgufFile::open_reading(&path, None, 7).unwrap();
        assert_eq!((small.metadata(), small.tensors().len()), (g.metadata(), g.tensors().len()));
        let map: &crate::source::FileMapper = &|p| Ok(std::sync::Arc::new(std::fs::read(p)?) as crate::source::FileBytes);
        let mapped = GgufFile::open_with(&path, Some(map)).unwrap();
        assert_eq!(&mapped.tensor_bytes(x).unwrap()[..], &small.tensor_bytes(x).unwrap()[..]);
        assert!(matches!(g.require("nope"), Err(ModelError::MissingMetadata { .. })));
    }

    #[test]
    fn bad_magic_and_version() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = sample();
        b[0] = b'X';
        let e = GgufFile::open(&write(&dir, "m.gguf", &b)).unwrap_err();
        assert!(matches!(e, ModelError::BadMagic { .. }), "{e}");
        assert!(e.to_string().contains("m.gguf"));
        let mut b = sample();
        b[4] = 9;
        let e = GgufFile::open(&write(&dir, "v.gguf", &b)).unwrap_err();
        assert!(matches!(e, ModelError::UnsupportedVersion { version: 9, .. }), "{e}");
    }

    #[test]
    fn every_truncation_is_a_typed_error() {
        let dir = tempfile::tempdir().unwrap();
        let b = sample();
        for cut in 0..b.len() - 1 {
            let p = write(&dir, "t.gguf", &b[..cut]);
            match GgufFile::open(&p) {
                Err(ModelError::Truncated { .. }) => {}
                // Cutting inside padding after the last tensor is still a valid file only if nothing is missing.
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn unknown_dtype_and_bad_shape() {
        let dir = tempfile::tempdir().unwrap();
        let data = [0u8; 18];
        let b = to_bytes(&[], &[TensorIn { name: "q", dims: &[16], dtype: GgmlType::Q4_0, data: &data }]);
        let e = GgufFile::open(&write(&dir, "s.gguf", &b)).unwrap_err();
        assert!(matches!(e, ModelError::Malformed { .. }), "{e}");
        let mut b = to_bytes(&[], &[TensorIn { name: "q", dims: &[32], dtype: GgmlType::Q4_0, data: &data }]);
        // Patch the dtype id (right after the single dim) to an unknown type.
        let pos = 4 + 4 + 8 + 8 + 8 + 1 + 4 + 8;
        b[pos..pos + 4].copy_from_slice(&99u32.to_le_bytes());
        let e = GgufFile::open(&write(&dir, "d.gguf", &b)).unwrap_err();
        assert!(matches!(e, ModelError::UnsupportedDtype { .. }), "{e}");
    }
}
