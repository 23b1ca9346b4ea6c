//! Hugging Face model directories: `config.json`, `generation_config.json`, and `model.safetensors` or sharded
//! `model-0000x-of-0000y.safetensors` with `model.safetensors.index.json`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::dtype::GgmlType;
use crate::error::ModelError;
use ferrite_kernels::host::MappedFile;

/// One tensor inside a memory-mapped safetensors shard.
#[derive(Debug, Clone)]
pub struct HfTensorInfo {
    pub dtype: GgmlType,
    pub shape: Vec<usize>,
    shard: usize,
    start: usize,
    end: usize,
}

/// The weights of an HF directory: every shard mapped, one name → tensor index across shards.
#[derive(Debug, Clone)]
pub struct HfWeights {
    shards: Vec<(PathBuf, Arc<MappedFile>)>,
    tensors: BTreeMap<String, HfTensorInfo>,
}

#[derive(Deserialize)]
struct ShardIndex {
    weight_map: HashMap<String, String>,
}

impl HfWeights {
    /// Opens `dir/model.safetensors`, or the shards listed in `dir/model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self, ModelError> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
            let index: ShardIndex =
                serde_json::from_str(&text).map_err(|e| ModelError::malformed(&index_path, e.to_string()))?;
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
            let map = Arc::new(MappedFile::open(&path).map_err(|e| ModelError::io(&path, e))?);
            let (header_len, meta) = SafeTensors::read_metadata(&map).map_err(|e| match e {
                safetensors::SafeTensorError::MetadataIncompleteBuffer
                | safetensors::SafeTensorError::InvalidHeaderLength
                | safetensors::SafeTensorError::HeaderTooSmall => ModelError::Truncated {
                    path: path.clone(),
                    what: format!("safetensors data ({e})"),
                    needed: 0,
                    len: map.len() as u64,
                },
                other => ModelError::malformed(&path, other.to_string()),
            })?;
            let base = 8 + header_len;
            for (name, info) in meta.tensors() {
                let dtype = match info.dtype {
                    Dtype::F32 => GgmlType::F32,
                    Dtype::F16 => GgmlType::F16,
                    Dtype::BF16 => GgmlType::BF16,
                    other => {
                        return Err(ModelError::UnsupportedDtype {
                            path: path.clone(),
                            name,
                            dtype: format!("{other:?}"),
                        });
                    }
                };
                let (s, e) = info.data_offsets;
                let t = HfTensorInfo { dtype, shape: info.shape.clone(), shard: i, start: base + s, end: base + e };
                if tensors.insert(name.clone(), t).is_some() {
                    return Err(ModelError::malformed(&path, format!("tensor `{name}` appears in two shards")));
                }
            }
            shards.push((path, map));
        }
        Ok(Self { shards, tensors })
    }

    pub fn tensor_info(&self, name: &str) -> Option<&HfTensorInfo> {
        self.tensors.get(name)
    }

    pub fn tensor_bytes(&self, t: &HfTensorInfo) -> &[u8] {
        &self.shards[t.shard].1[t.start..t.end]
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
