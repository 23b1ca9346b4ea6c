//! Ferrite worker: runs a Llama model.
//!
//! - [`backend`]: the [`backend::Backend`] trait (one batched forward step over paged KV storage) and its batch types.
//! - [`cpu`]: the CPU backend (GGUF-quantized weights, int16-quantized activations, AVX2/AVX-512 integer dot products, rayon threads).
//! - `cuda` (feature `cuda`): the CUDA backend (bf16 weights and KV cache, cuBLAS GEMMs, our NVRTC kernels).
//! - [`kv`]: KV block allocation behind [`kv::BlockAllocator`].
//! - [`generate`]: single-request generation (prefill + decode loop) with greedy or temperature sampling.
//! - [`engine`]: the serving engine — block pool with prefix caching, continuous-batching scheduler, sampler, and
//!   the engine thread.
//! - [`service`] / [`server`]: the gRPC worker service (token ids in, token ids out) and its startup.
//! - [`tp`]: tensor parallelism — the in-process communicator and the rank-thread CPU backend.
//! - [`metrics`]: Prometheus `/metrics` of a worker.
//! - [`instant`]: a no-compute backend for measuring engine/gRPC/router overhead.
//! - [`export`]: writes a Hugging Face directory from a GGUF model (`ferrite export-hf`).

pub mod backend;
pub mod config;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod engine;
pub mod export;
pub mod generate;
pub mod instant;
pub mod kv;
pub mod metrics;
pub mod model;
pub mod server;
pub mod service;
pub mod tp;
