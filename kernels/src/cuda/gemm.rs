//! Linear layers through cuBLAS: `Y[T, out] (f32) = X[T, in] (bf16) · W[out, in]ᵀ (bf16)`, f32 accumulation.
//!
//! Row-major `W[out, in]` is column-major `[in, out]` with leading dimension `in`, so the product is the
//! column-major `Yᵀ[out, T] = op(W)ᵀ · Xᵀ` with `transa = T`, `transb = N`.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::{CudaBlas, result as blas, sys};
use cudarc::driver::CudaStream;
use super::CudaError;

/// A cuBLAS handle bound to the backend's stream.
pub struct Gemm {
    blas: CudaBlas,
}

impl Gemm {
    pub fn new(stream: Arc<CudaStream>) -> Result<Self, CudaError> {
        let blas = CudaBlas::new(stream).map_err(|e| CudaError::Unsupported(format!("cuBLAS: {e:?}")))?;
        Ok(Self { blas })
    }

    /// `y[t, o] = Σ_i x[t, i] · w[o, i]` for `t < rows`, `o < out`, `i < inp`.
    ///
    /// # Safety
    /// `x` holds `rows · inp` bf16, `w` `out · inp` bf16, `y` `rows · out` f32, all on the handle's device.
    pub unsafe fn linear(&self, x: u64, w: u64, y: u64, rows: usize, inp: usize, out: usize) -> Result<(), CudaError> {
        if rows == 0 {
            return Ok(());
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: pointers and sizes per this function's contract; alpha/beta live on the host for the call
        // (pointer mode host), and cuBLAS reads them before returning.
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                sys::cublasOperation_t::CUBLAS_OP_T,
                sys::cublasOperation_t::CUBLAS_OP_N,
                out as i32,
                rows as i32,
                inp as i32,
                (&alpha as *const f32).cast::<c_void>(),
                w as *const c_void,
                sys::cudaDataType::CUDA_R_16BF,
                inp as i32,
                x as *const c_void,
                sys::cudaDataType::CUDA_R_16BF,
                inp as i32,
                (&beta as *const f32).cast::<c_void>(),
                y as *mut c_void,
                sys::cudaDataType::CUDA_R_32F,
                out as i32,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| CudaError::Unsupported(format!("cublasGemmEx {out}x{rows}x{inp}: {e:?}")))
    }
}
