//! Ferrite compute kernels.
//!
//! It holds the CPU kernels ([`cpu`]): GGML block (de)quantization, quantized matrix-vector products and the other
//! per-token building blocks of a forward pass; and, with the `cuda` feature, the CUDA kernels (`cuda`, compiled at
//! run time with NVRTC). The CPU functions are the CUDA kernels' reference twins: `tests/parity.rs` runs one test body
//! per kernel on the CPU always and on CUDA when a device exists.
//!
//! It also holds the two other low-level pieces everything else builds on: [`dtype`] (GGML block layouts) and
//! [`host`] (read-only memory maps of model files). Together with the worker's CUDA code, this crate is the only
//! place `unsafe` is allowed.
//!
//! Numerics are deterministic: a function gives the same bits for the same inputs on a given
//! CPU, whatever the batch it is called with. SIMD paths are chosen at run time
//! (`is_x86_feature_detected!`) and fall back to portable scalar code.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dtype;
pub mod host;
