//! Ferrite's shared foundation: model files and what they describe.
//!
//! - [`gguf`]: GGUF v2/v3 reader (memory-mapped, zero-copy tensor bytes).
//! - [`hf`]: Hugging Face safetensors directories (single file or sharded with an index).
//! - [`config`]: [`config::LlamaConfig`], the one model description both formats produce.
//! - [`model`]: [`model::ModelFiles`], one weight-access API by tensor role over both formats.
//! - [`tokenizer`] and [`chat`]: HF `tokenizers` built from GGUF metadata or `tokenizer.json`; chat templates.
//! - [`hash`]: the chained prefix-cache block hash (router and worker share it).
//! - [`proto`]: the gRPC protocol between router and worker; [`sampling`]: validated sampling parameters.
//! - [`dtype`]: GGML block formats (layout facts only; the math is in `ferrite-kernels`).
//!
//! Errors are typed ([`error::ModelError`]) and always name the file they are about.

pub mod chat;
pub mod config;
pub mod dtype;
pub mod error;
pub mod gguf;
pub mod hash;
pub mod hf;
pub mod model;
pub mod proto;
pub mod sampling;
pub mod shard;
pub mod source;
pub mod text;
pub mod tokenizer;
