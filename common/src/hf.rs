//! Hugging Face model directories: `config.json`, `generation_config.json`, and `model.safetensors` or sharded
//! `model-0000x-of-0000y.safetensors` with `model.safetensors.index.json`.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::dtype::GgmlType;
use crate::error::ModelError;
use crate::source::{FileMapper, FileSource};

/// The largest safetensors JSON header we read (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100 << 20;

/// One tensor inside a safetensors shard.
#[derive(Debug, Clone)]
pub struct HfTensorInfo {
    pub dtype: GgmlType,
    pub shape: Vec<usize>,
    shard: usize,
    start: usize,
    end: usize,
}

/// The weights of an HF directory: every shard opened (see [`crate::source`]), one name → tensor index across shards.
#[derive(Debug, Clone)]
pub struct HfWeights {
    shards: Vec<(PathBuf, FileSource)>,
    tensors: BTreeMap<String, HfTensorInfo>,
}

/// One entry of a safetensors header.
#[derive(Deserialize)]
struct TensorEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: (usize, usize),
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

impl HfWeights {
    /// Opens `dir/model.safetensors`, or the shards listed in `dir/model.safetensors.index.json`, reading their
    /// headers; tensor bytes come from `mapper`'s bytes, or are read on demand without one.
    pub fn open(dir: &Path, mapper: Option<&FileMapper>) -> Result<Self, ModelError> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let index: ShardIndex = serde_json::from_str(&text).map_err(|e| ModelError::malformed(&index_path, e.to_string()))?;
            let mut names: Vec<&String> = index.weight_map.values().collect();
            names.sort();
            names.dedup();
            for n in &names {
                if n.contains('/') || n.contains("..") {
                    return Err(ModelError::malformed(&index_path, format!("shard name `{n}` is not a plain file name")));
                }
            }
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            vec![dir.join("model.safetensors")]
        };
        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = BTreeMap::new();
        for (i, path) in files.into_iter().enumerate() {
            let source = FileSource::open(&path, mapper).map_err(|e| ModelError::io(&path, e))?;
            let truncated = |what: String| ModelError::Truncated { path: path.clone(), what, needed: 0, len: source.len() };
            // The header: an 8-byte little-endian length, then that much JSON.
            let n = source.prefix(8).map_err(|e| ModelError::io(&path, e))?;
            let n = u64::from_le_bytes(n[..].try_into().map_err(|_| truncated("safetensors header length".into()))?);
            if n > MAX_HEADER || 8 + n > source.len() {
                return Err(truncated(format!("safetensors header of {n} bytes")));
            }
            let head = source.range(8, n as usize).map_err(|e| ModelError::io(&path, e))?;
            let header: BTreeMap<String, serde_json::Value> =
                serde_json::from_slice(&head).map_err(|e| ModelError::malformed(&path, format!("safetensors header: {e}")))?;
            let base = 8 + n as usize;
            for (name, entry) in header {
                if name == "__metadata__" {
                    continue;
                }
                let info: TensorEntry =
                    serde_json::from_value(entry).map_err(|e| ModelError::malformed(&path, format!("safetensors entry `{name}`: {e}")))?;
                let dtype = match info.dtype.as_str() {
                    "F32" => GgmlType::F32,
                    "F16" => GgmlType::F16,
                    "BF16" => GgmlType::BF16,
                    other => {
                        return Err(ModelError::UnsupportedDtype { path: path.clone(), name, dtype: other.to_string() });
                    }
                };
                let (s, e) = info.data_offsets;
                let elems = info.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
                if s > e || elems.and_then(|n| dtype.bytes_for(n)) != Some(e - s) {
                    return Err(ModelError::malformed(&path, format!("tensor `{name}`: offsets {s}..{e} do not fit its shape and dtype")));
                }
                if (base + e) as u64 > source.len() {
                    return Err(truncated(format!("tensor `{name}`")));
                }
                let t = HfTensorInfo { dtype, shape: info.shape, shard: i, start: base + s, end: base + e };
                if tensors.insert(name.clone(), t).is_some() {
                    return Err(ModelError::malformed(&path, format!("tensor `{name}` appears in two shards")));
                }
            }
            shards.push((path, source));
        }
        Ok(Self { shards, tensors })
    }

    pub fn tensor_info(&self, name: &str) -> Option<&HfTensorInfo> {
        self.tensors.get(name)
    }

    /// A tensor's bytes: borrowed from the mapping, or read.
    pub fn tensor_bytes(&self, t: &HfTensorInfo) -> Result<Cow<'_, [u8]>, ModelError> {
        self.tensor_range(t, 0, t.end - t.start)
    }

    /// `len` bytes of a tensor from `offset` within it.
    pub fn tensor_range(&self, t: &HfTensorInfo, offset: usize, len: usize) -> Result<Cow<'_, [u8]>, ModelError> {
        let (path, source) = &self.shards[t.shard];
        source.range((t.start + offset) as u64, len).map_err(|e| ModelError::io(path, e))
    }

    /// A tensor's size in bytes.
    pub fn tensor_len(&self, t: &HfTensorInfo) -> usize {
        t.end - t.start
    }

    /// The file a tensor lives in (for error messages).
    pub fn tensor_path(&self, t: &HfTensorInfo) -> &Path {
        &self.shards[t.shard].0
    }

    /// The first shard's path, or the directory's expected single file.
    pub fn primary_path(&self) -> &Path {
        &self.shards[0].0
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }
}
