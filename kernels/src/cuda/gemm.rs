//! Linear layers through cuBLAS: `Y[T, out] (f32) = X[T, in] (bf16) · W[out, in]ᵀ (bf16)`, f32 accumulation.
//!
//! Row-major `W[out, in]` is column-major `[in, out]` with leading dimension `in`, so the product is the
//! column-major `Yᵀ[out, T] = op(W)ᵀ · Xᵀ` with `transa = T`, `transb = N`.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublas::{CudaBlas, result as blas, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};
use super::CudaError;

/// A cuBLAS handle bound to the backend's stream, with its own workspace (so cuBLAS never allocates inside a
/// captured CUDA graph).
pub struct Gemm {
    blas: CudaBlas,
    _workspace: CudaSlice<u8>,
}

/// cuBLAS workspace (NVIDIA recommends 32 MiB on Hopper).
const WORKSPACE_BYTES: usize = 32 << 20;

/// One operand of a strided-batched GEMM: device address, leading dimension, stride between batch items (elements).
#[derive(Debug, Clone, Copy)]
pub struct Operand {
    pub ptr: u64,
    pub ld: usize,
    pub stride: usize,
}

fn err(what: &str, e: impl std::fmt::Debug) -> CudaError {
    CudaError::Unsupported(format!("{what}: {e:?}"))
}

impl Gemm {
    pub fn new(stream: Arc<CudaStream>) -> Result<Self, CudaError> {
        let blas = CudaBlas::new(Arc::clone(&stream)).map_err(|e| err("cuBLAS", e))?;
        let workspace = stream.alloc_zeros::<u8>(WORKSPACE_BYTES)?;
        let ptr = workspace.device_ptr(&stream).0;
        // SAFETY: the workspace lives as long as the handle (both owned by `self`) and is used only on its stream.
        unsafe { sys::cublasSetWorkspace_v2(*blas.handle(), ptr as *mut c_void, WORKSPACE_BYTES) }
            .result()
            .map_err(|e| err("cublasSetWorkspace", e))?;
        Ok(Self { blas, _workspace: workspace })
    }

    /// Column-major strided-batched `C_i = op(A_i) · op(B_i)` (`m × n`, inner `k`) with bf16 A and B, f32
    /// accumulation, and C in f32 (`c_bf16 = false`) or bf16.
    ///
    /// # Safety
    /// Every batch item's operands lie inside live device buffers of this handle's device.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn batched(&self, trans_a: bool, trans_b: bool, m: usize, n: usize, k: usize, a: Operand, b: Operand, c: Operand, c_bf16: bool, batch: usize) -> Result<(), CudaError> {
        if batch == 0 || m == 0 || n == 0 {
            return Ok(());
        }
        let op = |t: bool| if t { sys::cublasOperation_t::CUBLAS_OP_T } else { sys::cublasOperation_t::CUBLAS_OP_N };
        let c_type = if c_bf16 { sys::cudaDataType::CUDA_R_16BF } else { sys::cudaDataType::CUDA_R_32F };
        let (alpha, beta) = (1.0f32, 0.0f32);
        // SAFETY: per this function's contract; alpha/beta are read on the host during the call.
        unsafe {
            blas::gemm_strided_batched_ex(
                *self.blas.handle(),
                op(trans_a),
                op(trans_b),
                m as i32,
                n as i32,
                k as i32,
                (&alpha as *const f32).cast::<c_void>(),
                a.ptr as *const c_void,
                sys::cudaDataType::CUDA_R_16BF,
                a.ld as i32,
                a.stride as i64,
                b.ptr as *const c_void,
                sys::cudaDataType::CUDA_R_16BF,
                b.ld as i32,
                b.stride as i64,
                (&beta as *const f32).cast::<c_void>(),
                c.ptr as *mut c_void,
                c_type,
                c.ld as i32,
                c.stride as i64,
                batch as i32,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| err(&format!("cublasGemmStridedBatchedEx {m}x{n}x{k} x{batch}"), e))
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
        .map_err(|e| err(&format!("cublasGemmEx {out}x{rows}x{inp}"), e))
    }
}
