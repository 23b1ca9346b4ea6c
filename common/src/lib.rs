//! Ferrite's shared foundation: what router and worker must agree on, and the model files both read.
//!
//! - [`proto`]: the gRPC protocol between router and worker, and structured rejections ([`proto::rejection_status`]).
//! - [`sampling`]: the one set of request rules (defaults, ranges, limits) both sides validate with.
//! - [`hash`]: the chained prefix-cache block hash (router and worker share it).
//! - [`source`]: how a model file's bytes are reached (read on demand, or borrowed from a mapping the caller owns:
//!   this crate never maps files and has no `unsafe`).
//! - [`gguf`]: GGUF v2/v3 reader (metadata, tensor index, tensor bytes).
//! - [`hf`]: Hugging Face safetensors directories (single file or sharded with an index).
//! - [`config`]: [`config::LlamaConfig`], the one model description both formats produce.
//! - [`model`]: [`model::ModelFiles`], one weight-access API by tensor role over both formats.
//! - [`tokenizer`] and [`chat`]: HF `tokenizers` built from GGUF metadata or `tokenizer.json`; chat templates.
//! - [`text`]: tokenizer + chat template + stop ids of a model; [`shard`]: the tensor-parallel plan.
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
