//! Linear layers through cuBLASLt with an explicit algorithm: the heuristic's candidates for one shape (the
//! worker's start-up tuner times them on the real weights and keeps the fastest that agrees with cuBLAS), and a
//! launch with the one chosen.
//!
//! Why: for the skinny products of decode (4–256 rows against 4096–128256 weight rows), `cublasGemmEx` takes the
//! heuristic's first choice, which reaches 77–84 % of the weight-streaming roofline on an H200; the other
//! candidates (more split-K, other tiles and stage counts) are often faster for one shape, and only timing tells
//! which. TensorRT-LLM profiles its cuBLASLt GEMMs the same way.
//!
//! Same product as `Gemm::linear` (`gemm.rs`, which owns the handle and calls in here): column-major `Yᵀ[out, rows] = Wᵀ · Xᵀ` with A = W (`transa = T`, stored
//! `[inp, out]`, ld `inp`), B = X (stored `[inp, rows]`, ld `inp`), D = Y in f32 (stored `[out, rows]`, ld `out`), f32
//! compute and scale, beta = 0 (C = D). Every algorithm runs in the handle's workspace, so a launch never allocates
//! and can be captured in a CUDA graph.

use std::ffi::c_void;
use std::fmt;
use std::sync::Arc;

use cudarc::cublaslt::{result as lt, sys};

use super::CudaError;
use cudarc::driver::CudaStream;

/// cuBLAS / cuBLASLt workspace (NVIDIA recommends 32 MiB on Hopper); `Gemm` allocates it, both libraries share it.
pub(super) const WORKSPACE_BYTES: usize = 32 << 20;

/// Alignment (bytes) of every operand's address that the heuristic may assume (cuBLASLt's default, set explicitly):
/// its fastest kernels need it. A launch with a less aligned operand is refused ([`LtAlgo::accepts`]).
pub const LT_ALIGN: u64 = 256;

fn err(what: &str, e: impl fmt::Debug) -> CudaError {
    CudaError::Unsupported(format!("cuBLASLt {what}: {e:?}"))
}

/// A cuBLASLt handle.
pub(super) struct LtHandle(sys::cublasLtHandle_t);

// SAFETY: a cuBLASLt handle is not bound to the thread that created it, and cuBLASLt functions may be called with
// the same handle from several threads (the cuBLAS documentation's thread-safety rule); the workspace each launch
// uses belongs to the one stream of the owning `Gemm`, so launches through it are ordered.
unsafe impl Send for LtHandle {}
// SAFETY: as above; `&LtHandle` only reaches cuBLASLt calls.
unsafe impl Sync for LtHandle {}

impl LtHandle {
    /// Opens cuBLASLt, or says why it cannot be used (its library missing, or the handle refused).
    pub(super) fn open() -> Result<Self, String> {
        // SAFETY: only probes for the library; loading it runs no code of ours.
        if !unsafe { sys::is_culib_present() } {
            return Err("libcublasLt not found on the library path".into());
        }
        lt::create_handle().map(Self).map_err(|e| format!("cublasLtCreate: {e:?}"))
    }
}

impl Drop for LtHandle {
    fn drop(&mut self) {
        // SAFETY: created by `open`, destroyed once here; no launch outlives the `Gemm` that owns it (the stream is
        // synchronized before buffers and handles are dropped).
        let _ = unsafe { lt::destroy_handle(self.0) };
    }
}

/// The operation and matrix descriptors of one linear-layer shape, shared by every algorithm for it.
struct Descriptors {
    desc: sys::cublasLtMatmulDesc_t,
    a: sys::cublasLtMatrixLayout_t,
    b: sys::cublasLtMatrixLayout_t,
    d: sys::cublasLtMatrixLayout_t,
}

// SAFETY: descriptors are host-side objects that are never modified after `Descriptors::new`; cuBLASLt only reads
// them during a call, from whichever thread makes it.
unsafe impl Send for Descriptors {}
// SAFETY: as above.
unsafe impl Sync for Descriptors {}

impl Descriptors {
    fn new(rows: usize, inp: usize, out: usize) -> Result<Self, CudaError> {
        let desc = lt::create_matmul_desc(sys::cublasComputeType_t::CUBLAS_COMPUTE_32F, sys::cudaDataType::CUDA_R_32F)
            .map_err(|e| err("matmul descriptor", e))?;
        let mut this = Self { desc, a: std::ptr::null_mut(), b: std::ptr::null_mut(), d: std::ptr::null_mut() };
        let layout = |t, r: usize, c: usize, ld: usize| {
            lt::create_matrix_layout(t, r as u64, c as u64, ld as i64).map_err(|e| err("matrix layout", e))
        };
        this.a = layout(sys::cudaDataType::CUDA_R_16BF, inp, out, inp)?;
        this.b = layout(sys::cudaDataType::CUDA_R_16BF, inp, rows, inp)?;
        this.d = layout(sys::cudaDataType::CUDA_R_32F, out, rows, out)?;
        // cublasOperation_t, 4 bytes: 1 = T, 0 = N.
        for (attr, op) in [
            (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, 1i32),
            (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, 0),
        ] {
            // SAFETY: `desc` is live; the value is an int32 on the stack, read during the call.
            unsafe { lt::set_matmul_desc_attribute(this.desc, attr, (&op as *const i32).cast(), size_of::<i32>()) }
                .map_err(|e| err("transpose attribute", e))?;
        }
        Ok(this)
    }
}

impl Drop for Descriptors {
    fn drop(&mut self) {
        // SAFETY: each was created once by `new` (null when its creation did not happen) and is destroyed once here.
        unsafe {
            for l in [self.a, self.b, self.d] {
                if !l.is_null() {
                    let _ = lt::destroy_matrix_layout(l);
                }
            }
            let _ = lt::destroy_matmul_desc(self.desc);
        }
    }
}

/// A matmul preference (the heuristic's constraints), destroyed on drop.
struct Preference(sys::cublasLtMatmulPreference_t);

impl Preference {
    /// Algorithms that need at most `workspace` bytes.
    fn new(workspace: usize) -> Result<Self, CudaError> {
        let pref = Self(lt::create_matmul_pref().map_err(|e| err("preference", e))?);
        let limit = workspace as u64;
        // SAFETY: `pref` is live; the value is a uint64 on the stack, read during the call.
        unsafe {
            lt::set_matmul_pref_attribute(
                pref.0,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&limit as *const u64).cast(),
                size_of::<u64>(),
            )
        }
        .map_err(|e| err("workspace preference", e))?;
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        let align = LT_ALIGN as u32;
        for attr in [
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
            P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
        ] {
            // SAFETY: `pref` is live; the value is a uint32 on the stack, read during the call.
            unsafe { lt::set_matmul_pref_attribute(pref.0, attr, (&align as *const u32).cast(), size_of::<u32>()) }
                .map_err(|e| err("alignment preference", e))?;
        }
        Ok(pref)
    }
}

impl Drop for Preference {
    fn drop(&mut self) {
        // SAFETY: created once by `create_matmul_pref`, destroyed once here.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

/// One cuBLASLt algorithm for the linear layer `y[rows, out] = x[rows, inp] · w[out, inp]ᵀ` (f32 out).
#[derive(Clone)]
pub struct LtAlgo {
    descriptors: Arc<Descriptors>,
    algo: sys::cublasLtMatmulAlgo_t,
    pub rows: usize,
    pub inp: usize,
    pub out: usize,
    /// The algorithm's configuration (for logs): algorithm id, tile id, split-K count, stages id.
    pub config: [u32; 4],
}

impl fmt::Debug for LtAlgo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [id, tile, split_k, stages] = self.config;
        write!(f, "lt(algo {id}, tile {tile}, split-k {split_k}, stages {stages})")
    }
}

impl LtAlgo {
    /// Whether operands at these addresses may be launched with this algorithm (each aligned to [`LT_ALIGN`]).
    pub fn accepts(x: u64, w: u64, y: u64) -> bool {
        [x, w, y].iter().all(|p| p % LT_ALIGN == 0)
    }

    /// Reads one `u32`-sized configuration attribute of `algo` (0 when cuBLASLt does not report it).
    fn attribute(algo: &sys::cublasLtMatmulAlgo_t, attr: sys::cublasLtMatmulAlgoConfigAttributes_t) -> u32 {
        let (mut value, mut written) = (0u32, 0usize);
        // SAFETY: `algo` is an initialized algorithm from the heuristic; the buffer is 4 writable bytes and cuBLASLt
        // writes at most that many (it fails instead when the attribute is wider).
        let status = unsafe {
            sys::cublasLtMatmulAlgoConfigGetAttribute(algo, attr, (&mut value as *mut u32).cast(), size_of::<u32>(), &mut written)
        };
        if status == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS && written == size_of::<u32>() { value } else { 0 }
    }
}

impl LtHandle {
    /// Up to `max` algorithms for the linear layer of `rows × inp → out`, in the heuristic's order (its estimate of
    /// fastest first), each fitting [`WORKSPACE_BYTES`].
    pub(super) fn candidates(&self, rows: usize, inp: usize, out: usize, max: usize) -> Result<Vec<LtAlgo>, CudaError> {
        let handle = self;
        if rows == 0 || inp == 0 || out == 0 || max == 0 {
            return Ok(Vec::new());
        }
        let descriptors = Arc::new(Descriptors::new(rows, inp, out)?);
        let pref = Preference::new(WORKSPACE_BYTES)?;
        // SAFETY: the result struct is plain data (an opaque array of u64, sizes, a status enum whose zero is
        // SUCCESS, floats and ints): all zeroes is a valid value, and cuBLASLt overwrites the entries it returns.
        let mut results: Vec<sys::cublasLtMatmulHeuristicResult_t> = vec![unsafe { std::mem::zeroed() }; max];
        let mut found = 0i32;
        let d = &descriptors;
        // SAFETY: every descriptor is live; `results` has room for `max` entries and cuBLASLt writes at most that many,
        // reporting how many in `found`. C and D share one layout (beta = 0, D written in place of C).
        unsafe {
            sys::cublasLtMatmulAlgoGetHeuristic(handle.0, d.desc, d.a, d.b, d.d, d.d, pref.0, max as i32, results.as_mut_ptr(), &mut found)
        }
        .result()
        .map_err(|e| err(&format!("heuristic for {rows}x{inp}->{out}"), e))?;
        use sys::cublasLtMatmulAlgoConfigAttributes_t as A;
        Ok(results[..(found.max(0) as usize).min(max)]
            .iter()
            .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS && r.workspaceSize <= WORKSPACE_BYTES)
            .map(|r| LtAlgo {
                descriptors: Arc::clone(&descriptors),
                algo: r.algo,
                rows,
                inp,
                out,
                config: [
                    A::CUBLASLT_ALGO_CONFIG_ID,
                    A::CUBLASLT_ALGO_CONFIG_TILE_ID,
                    A::CUBLASLT_ALGO_CONFIG_SPLITK_NUM,
                    A::CUBLASLT_ALGO_CONFIG_STAGES_ID,
                ]
                .map(|a| LtAlgo::attribute(&r.algo, a)),
            })
            .collect())
    }

    /// `y = x · wᵀ` through cuBLASLt with `algo` (for its own shape only; operands aligned as [`LtAlgo::accepts`]
    /// says, else an error), on `stream` with the workspace at `workspace` ([`WORKSPACE_BYTES`]).
    ///
    /// # Safety
    /// `x` holds `algo.rows · algo.inp` bf16, `w` `algo.out · algo.inp` bf16, `y` `algo.rows · algo.out` f32, all
    /// on the handle's device; `algo` came from this handle's [`LtHandle::candidates`]; `workspace` is a live device
    /// buffer of [`WORKSPACE_BYTES`] used by nothing else on another stream.
    pub(super) unsafe fn linear(
        &self,
        algo: &LtAlgo,
        x: u64,
        w: u64,
        y: u64,
        workspace: u64,
        stream: &CudaStream,
    ) -> Result<(), CudaError> {
        let handle = self;
        if !LtAlgo::accepts(x, w, y) {
            return Err(CudaError::Unsupported(format!("cuBLASLt operands must be {LT_ALIGN}-byte aligned: x {x:#x}, w {w:#x}, y {y:#x}")));
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        let d = &algo.descriptors;
        // SAFETY: operands per this function's contract and the descriptors' shapes; alpha/beta are read on the host
        // during the call (host pointer mode, the default); the workspace is this handle's, at least as large as the
        // heuristic required for `algo` (checked in `lt_candidates`), and used only on this stream.
        unsafe {
            sys::cublasLtMatmul(
                handle.0,
                d.desc,
                (&alpha as *const f32).cast::<c_void>(),
                w as *const c_void,
                d.a,
                x as *const c_void,
                d.b,
                (&beta as *const f32).cast::<c_void>(),
                y as *const c_void,
                d.d,
                y as *mut c_void,
                d.d,
                &algo.algo,
                workspace as *mut c_void,
                WORKSPACE_BYTES,
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .result()
        .map_err(|e| err(&format!("matmul {}x{}->{} with {algo:?}", algo.rows, algo.inp, algo.out), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs where libcublasLt is on the library path (locally with the pip wheel's `nvidia/cu13/lib`), with or without a
    /// GPU: cuBLASLt validates each attribute's size and value as it is set. `FERRITE_REQUIRE_CUDA=1` (the GPU check,
    /// `scripts/gpu-check.sh`) turns a missing library or a refused handle into a failure; elsewhere the test says
    /// why it skipped or what the handle said.
    #[test]
    fn linear_layer_descriptors_are_accepted() {
        let require = std::env::var_os("FERRITE_REQUIRE_CUDA").is_some_and(|v| v == "1");
        // SAFETY: only probes for the library.
        if !unsafe { sys::is_culib_present() } {
            assert!(!require, "FERRITE_REQUIRE_CUDA=1 but libcublasLt is not on the library path (LD_LIBRARY_PATH)");
            eprintln!("skipped: libcublasLt is not on the library path (FERRITE_REQUIRE_CUDA=1 makes this a failure)");
            return;
        }
        for (rows, inp, out) in [(1, 4096, 6144), (32, 14336, 4096), (256, 4096, 128256)] {
            Descriptors::new(rows, inp, out).unwrap_or_else(|e| panic!("{rows}x{inp}->{out}: {e}"));
        }
        Preference::new(WORKSPACE_BYTES).expect("workspace and alignment preferences");
        // Without a device the handle is refused with a reason, never a panic; with one it must open.
        match LtHandle::open() {
            Ok(_) => eprintln!("cublasLtCreate: handle opened"),
            Err(why) => {
                assert!(!require, "FERRITE_REQUIRE_CUDA=1 but cuBLASLt cannot be used: {why}");
                eprintln!("cublasLtCreate refused (no device here?): {why}");
            }
        }
    }
}
