//! Ferrite compute kernels.
//!
//! Today this crate holds the CPU kernels ([`cpu`]): GGML block (de)quantization, quantized
//! matrix-vector products and the other per-token building blocks of a forward pass. CUDA
//! kernels (compiled at run time with NVRTC) will join them later; the CPU functions are their
//! reference twins, so every CUDA kernel is tested against the CPU function of the same name.
//!
//! Numerics are deterministic: a function gives the same bits for the same inputs on a given
//! CPU, whatever the batch it is called with. SIMD paths are chosen at run time
//! (`is_x86_feature_detected!`) and fall back to portable scalar code.

pub mod cpu;
