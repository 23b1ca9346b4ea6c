//! Ferrite compute kernels.
//!
//! It holds the CPU kernels ([`cpu`]): GGML block (de)quantization, quantized matrix-vector products and the other
//! per-token building blocks of a forward pass; and, with the `cuda` feature, the CUDA kernels (`cuda`, compiled at
//! run time with NVRTC). The CPU functions are the CUDA kernels' reference twins: `tests/parity.rs` runs one test body
//! per kernel on the CPU always and on CUDA when a device exists.
//!
//! It also holds [`host`] (read-only memory maps of model files, which the worker hands to `ferrite-common`'s
//! readers). Together with the worker's CUDA code, this crate is the only place `unsafe` is allowed. The GGML block
//! layouts it computes on are `ferrite_common::dtype`.
//!
//! Numerics are deterministic: a function gives the same bits for the same inputs and the same
//! [`cpu::isa::CpuIsa`], whatever the batch it is called with. Every dispatching CPU kernel takes
//! that `CpuIsa` as an argument (the host's best, or the `FERRITE_CPU_ISA` cap, checked against
//! the CPU when it is made) and falls back to portable scalar code at `scalar`.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod host;
