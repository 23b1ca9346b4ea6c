//! Typed errors for model loading. Every variant names the file it is about.

use std::path::PathBuf;

use crate::dtype::GgmlType;

/// An error while reading model files (GGUF, safetensors, config.json, tokenizer files).
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a GGUF file (bad magic {magic:#010x}, expected 0x46554747 \"GGUF\")")]
    BadMagic { path: PathBuf, magic: u32 },
    #[error("{path}: unsupported GGUF version {version} (supported: 2, 3)")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("{path}: truncated file: {what} needs {needed} bytes but the file has {len}")]
    Truncated { path: PathBuf, what: String, needed: u64, len: u64 },
    #[error("{path}: malformed file: {detail}")]
    Malformed { path: PathBuf, detail: String },
    #[error("{path}: missing tensor `{name}`")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {actual:?}, expected {expected:?}")]
    WrongShape { path: PathBuf, name: String, actual: Vec<usize>, expected: Vec<usize> },
    #[error("{path}: tensor `{name}` has unsupported dtype {dtype}")]
    UnsupportedDtype { path: PathBuf, name: String, dtype: String },
    #[error("{path}: unsupported architecture `{arch}` (supported: llama / LlamaForCausalLM)")]
    UnsupportedArchitecture { path: PathBuf, arch: String },
    #[error("{path}: missing metadata `{key}`")]
    MissingMetadata { path: PathBuf, key: String },
    #[error("{path}: invalid model config: {detail}")]
    InvalidConfig { path: PathBuf, detail: String },
    #[error("{path}: tokenizer: {detail}")]
    Tokenizer { path: PathBuf, detail: String },
    #[error("{path}: chat template: {detail}")]
    ChatTemplate { path: PathBuf, detail: String },
}

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io { path: path.into(), source }
    }

    pub(crate) fn malformed(path: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        ModelError::Malformed { path: path.into(), detail: detail.into() }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, detail: impl Into<String>) -> Self {
        ModelError::InvalidConfig { path: path.into(), detail: detail.into() }
    }

    pub fn dtype(path: impl Into<PathBuf>, name: &str, dtype: GgmlType) -> Self {
        ModelError::UnsupportedDtype { path: path.into(), name: name.to_string(), dtype: dtype.to_string() }
    }
}
