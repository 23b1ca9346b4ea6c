//! Ferrite worker: runs a Llama model.
//!
//! - [`backend`]: the [`backend::Backend`] trait (one batched forward step over paged KV storage) and its batch types.
//! - [`cpu`]: the CPU backend (GGUF-quantized weights, int16-quantized activations, AVX2/AVX-512 integer dot products, rayon threads).
//! - `cuda` (feature `cuda`): the CUDA backend (bf16 weights and KV cache, cuBLAS GEMMs, our NVRTC kernels).
//! - [`engine`]: the engine — block pool with prefix caching, continuous-batching scheduler, sampler, the sans-IO
//!   [`engine::step::EngineCore`] (serving, `ferrite generate`, benchmarks and tests all run it) and the engine thread
//!   around it.
//! - [`service`] / [`server`]: the gRPC worker service (token ids in, token ids out) and its startup.
//! - [`kv_events`]: the numbered ring of prefix-cache index changes behind the `KvEvents` stream.
//! - [`tp`]: tensor parallelism — the communicators (in-process CPU group, NCCL) and the rank-thread backend.
//! - [`config`]: [`config::WorkerConfig`] (validated settings), the backend choice, start-up errors.
//! - [`metrics`]: the worker's Prometheus metrics as text (the `ferrite` binary serves them over HTTP; this crate
//!   never sees HTTP).
//! - [`instant`]: a no-compute backend for measuring engine/gRPC/router overhead.
//! - [`model`]: opens a model (GGUF file or Hugging Face directory) over memory-mapped files.
//! - [`export`]: writes a Hugging Face directory from a GGUF model (`ferrite export-hf`).

pub mod backend;
pub mod config;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod engine;
pub mod export;
pub mod instant;
pub mod kv_events;
pub mod metrics;
pub mod model;
pub mod registration;
pub mod server;
pub mod service;
pub mod tp;
