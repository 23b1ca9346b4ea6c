//! Ferrite worker: runs a Llama model.
//!
//! - [`backend`]: the [`backend::Backend`] trait (one batched forward step over paged KV storage) and its batch types.
//! - [`cpu`]: the CPU backend (GGUF-quantized weights, Q8 activations, AVX2 dot products, rayon threads).
//! - [`kv`]: KV block allocation behind [`kv::BlockAllocator`].
//! - [`generate`]: single-request generation (prefill + decode loop) with greedy or temperature sampling.
//! - [`export`]: writes a Hugging Face directory from a GGUF model (`ferrite export-hf`).

pub mod backend;
pub mod cpu;
pub mod engine;
pub mod export;
pub mod generate;
pub mod kv;
