//! CPU kernels. Each SIMD kernel (AVX2 + FMA, some AVX-512) runs at the [`isa::CpuIsa`] its caller passes (the
//! host's best, or a configured cap); every kernel also has a portable scalar path.

pub mod attention;
pub mod isa;
pub mod ops;
pub mod quant;
pub mod sample;
#[cfg(target_arch = "x86_64")]
mod vmath;
