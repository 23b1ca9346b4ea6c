//! CPU kernels. SIMD (AVX2 + FMA) paths are picked at run time; every kernel also has a
//! portable scalar path.

pub mod ops;
pub mod quant;
pub mod sample;
