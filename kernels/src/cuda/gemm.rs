//! Linear layers through cuBLAS: `Y[T, out] (f32) = X[T, in] (bf16) · W[out, in]ᵀ (bf16)`, f32 accumulation.
//!
//! Row-major `W[out, in]` is column-major `[in, out]` with leading dimension `in`, so the product is the
//! column-major `Yᵀ[out, T] = op(W)ᵀ · Xᵀ` with `transa = T`, `transb = N`.

use std::ffi::c_void;
use std::sync::Arc;

use super::CudaError;
use super::gemm_lt::{LtAlgo, LtHandle, WORKSPACE_BYTES};
use cudarc::cublas::{CudaBlas, result as blas, sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

/// A cuBLAS handle and a cuBLASLt handle bound to the backend's stream, sharing one workspace (so neither ever
/// allocates inside a captured CUDA graph; launches on one stream never overlap).
pub struct Gemm {
    blas: CudaBlas,
    /// cuBLASLt (algorithms chosen at start-up, `gemm_lt.rs`), or why it cannot be used.
    pub(super) lt: Result<LtHandle, String>,
    pub(super) stream: Arc<CudaStream>,
    pub(super) workspace_ptr: u64,
    _workspace: CudaSlice<u8>,
}

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
    /// Why cuBLASLt cannot be used here (its candidates are then always empty), if it cannot.
    pub fn lt_unavailable(&self) -> Option<&str> {
        self.lt.as_ref().err().map(String::as_str)
    }

    /// Up to `max` cuBLASLt algorithms for the linear layer of `rows × inp → out`, in the heuristic's order (its
    /// estimate of fastest first), each fitting the workspace. Empty when cuBLASLt is unavailable or has none.
    pub fn lt_candidates(&self, rows: usize, inp: usize, out: usize, max: usize) -> Result<Vec<LtAlgo>, CudaError> {
        match &self.lt {
            Ok(handle) => handle.candidates(rows, inp, out, max),
            Err(_) => Ok(Vec::new()),
        }
    }

    /// `y = x · wᵀ` as [`Gemm::linear`], through cuBLASLt with `algo` (for its own shape only; operands aligned as
    /// [`LtAlgo::accepts`] says, else an error).
    ///
    /// # Safety
    /// `x` holds `algo.rows · algo.inp` bf16, `w` `algo.out · algo.inp` bf16, `y` `algo.rows · algo.out` f32, all
    /// on the handle's device; `algo` came from this `Gemm`'s [`Gemm::lt_candidates`].
    pub unsafe fn lt_linear(&self, algo: &LtAlgo, x: u64, w: u64, y: u64) -> Result<(), CudaError> {
        let Ok(handle) = &self.lt else {
            return Err(CudaError::Unsupported("cuBLASLt is not available".into()));
        };
        // SAFETY: operands per this function's contract; the workspace is this `Gemm`'s, on its stream.
        unsafe { handle.linear(algo, x, w, y, self.workspace_ptr, &self.stream) }
    }

    pub fn new(stream: Arc<CudaStream>) -> Result<Self, CudaError> {
        let blas = CudaBlas::new(Arc::clone(&stream)).map_err(|e| err("cuBLAS", e))?;
        let workspace = stream.alloc_zeros::<u8>(WORKSPACE_BYTES)?;
        let ptr = workspace.device_ptr(&stream).0;
        // SAFETY: the workspace lives as long as the handle (both owned by `self`) and is used only on its stream.
        unsafe { sys::cublasSetWorkspace_v2(*blas.handle(), ptr as *mut c_void, WORKSPACE_BYTES) }
            .result()
            .map_err(|e| err("cublasSetWorkspace", e))?;
        Ok(Self { blas, lt: LtHandle::open(), stream, workspace_ptr: ptr, _workspace: workspace })
    }

    /// Column-major strided-batched `C_i = op(A_i) · op(B_i)` (`m × n`, inner `k`) with bf16 A and B, f32
    /// accumulation, and C in f32 (`c_bf16 = false`) or bf16.
    ///
    /// # Safety
    /// Every batch item's operands lie inside live device buffers of this handle's device.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn batched(
        &self,
        trans_a: bool,
        trans_b: bool,
        m: usize,
        n: usize,
        k: usize,
        a: Operand,
        b: Operand,
        c: Operand,
        c_bf16: bool,
        batch: usize,
    ) -> Result<(), CudaError> {
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

    /// ‖a − b‖ / ‖b‖ over `n` f32 on the device (‖a − b‖ when ‖b‖ = 0; NaN or infinite when either holds a
    /// non-finite value): `a` is copied to `tmp` (unless `tmp` is `a`), then `tmp −= b`. `b` is left unchanged, and
    /// `a` too unless it is `tmp`. Blocks until done.
    ///
    /// # Safety
    /// `a`, `b` and `tmp` each hold `n` f32 on the handle's device; `tmp` is `a` or overlaps neither, and `b`
    /// overlaps neither.
    pub unsafe fn relative_difference(&self, a: u64, b: u64, tmp: u64, n: usize) -> Result<f64, CudaError> {
        let h = *self.blas.handle();
        let n = i64::try_from(n).map_err(|_| CudaError::Unsupported(format!("{n} values")))?;
        let (minus_one, mut diff, mut norm) = (-1.0f32, 0f32, 0f32);
        // SAFETY: per this function's contract; the scalars live on the host for each call (host pointer mode), and
        // the nrm2 calls return only when their results are written.
        unsafe {
            if a != tmp {
                sys::cublasScopy_v2_64(h, n, a as *const f32, 1, tmp as *mut f32, 1).result().map_err(|e| err("cublasScopy", e))?;
            }
            sys::cublasSaxpy_v2_64(h, n, &minus_one, b as *const f32, 1, tmp as *mut f32, 1).result().map_err(|e| err("cublasSaxpy", e))?;
            sys::cublasSnrm2_v2_64(h, n, tmp as *const f32, 1, &mut diff).result().map_err(|e| err("cublasSnrm2", e))?;
            sys::cublasSnrm2_v2_64(h, n, b as *const f32, 1, &mut norm).result().map_err(|e| err("cublasSnrm2", e))?;
        }
        let (diff, norm) = (f64::from(diff), f64::from(norm));
        Ok(if norm == 0.0 { diff } else { diff / norm })
    }
}
