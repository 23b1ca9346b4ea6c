//! CUDA kernels (feature `cuda`): the sources in `llama.cu`, `attention.cu` and `sample.cu`, compiled with NVRTC at
//! start-up, and typed launchers.
//!
//! cudarc loads the CUDA libraries dynamically, so this module builds without CUDA installed; NVRTC is needed only
//! to compile, a driver and device only to launch. [`compile`] works without a GPU (CI uses it to check that every
//! kernel compiles for sm_80 and sm_90); [`CudaKernels::load`] compiles to a CUBIN for the device's own architecture
//! (so the driver's PTX JIT version never matters) and keeps the module for the life of the process.
//!
//! Launchers take raw device addresses (`u64`, as [`DevicePtr`](cudarc::driver::DevicePtr) gives them) and are
//! `unsafe`: the caller guarantees the buffers are live, on this context, and as large as the sizes say. Every
//! launcher checks the launch itself; [`CudaKernels::check`] surfaces asynchronous faults.

mod attention_launch;
mod cache;
mod gemm;
mod gemm_lt;
mod launch;
pub mod nccl;

pub use cache::{CacheOutcome, KernelCache};
pub use gemm::{Gemm, Operand};
pub use gemm_lt::LtAlgo;
use launch::Launch;

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DriverError, LaunchConfig};
use cudarc::nvrtc::{Ptx, result as nvrtc_result, sys as nvrtc_sys};

/// The kernel source (one translation unit): the forward pass (helpers, element-wise kernels, linear layers), the
/// paged attention kernels, then the sampler.
pub const KERNEL_SOURCE: &str = concat!(include_str!("llama.cu"), "\n", include_str!("attention.cu"), "\n", include_str!("sample.cu"));

/// Every kernel in [`KERNEL_SOURCE`], in launch-order of a forward pass.
pub const KERNEL_NAMES: &[&str] = &[
    "embed_gather",
    "add_rms_norm",
    "rope_kv_write",
    "paged_attention_hd64_g4",
    "paged_attention_hd64_g8",
    "paged_attention_hd128_g4",
    "paged_attention_hd128_g8",
    "paged_attention_tc_hd64",
    "paged_attention_tc_hd128",
    "prefill_attention_tc_hd64",
    "prefill_attention_tc_hd128",
    "attention_reduce",
    "silu_mul",
    "copy_f32_2d",
    "gemv_bf16",
    "gemv_bf16_u8",
    "gemv_bf16_u8s",
    "gather_kv",
    "q_to_bf16",
    "causal_softmax",
    "argmax_rows",
    "apply_adjustments",
    "apply_token_masks",
    "sample_rows",
    "fill_random_bf16",
];

/// Attention limits of the `paged_attention_hd*_g*` instantiations in `attention.cu` (query heads per KV head, head sizes).
pub const ATTENTION_MAX_GROUP: usize = 8;
pub const ATTENTION_HEAD_DIMS: &[usize] = &[64, 128];
const ATTENTION_THREADS: u32 = 128;
/// Threads per row of `sample_rows` (`SAMPLE_THREADS` in sample.cu).
const SAMPLE_THREADS: u32 = 1024;
/// Rows `gemv_bf16` handles (`GEMV_MAX_B`).
pub const GEMV_MAX_ROWS: usize = 8;

/// The instantiations of the small-batch linear kernel (`gemv_impl` in `llama.cu`): weight loads in flight per lane,
/// and whether they bypass L1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemvKernel {
    /// `gemv_bf16`: 4 loads in flight.
    U4,
    /// `gemv_bf16_u8`: 8 loads in flight.
    U8,
    /// `gemv_bf16_u8s`: 8 loads in flight, streaming (no L1 allocation).
    U8Stream,
}

impl GemvKernel {
    pub const ALL: [GemvKernel; 3] = [GemvKernel::U4, GemvKernel::U8, GemvKernel::U8Stream];

    fn name(self) -> &'static str {
        match self {
            GemvKernel::U4 => "gemv_bf16",
            GemvKernel::U8 => "gemv_bf16_u8",
            GemvKernel::U8Stream => "gemv_bf16_u8s",
        }
    }
}

/// Why CUDA work failed.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error("NVRTC is not available (libnvrtc not found): {0}")]
    NvrtcMissing(String),
    #[error("kernel compilation for {arch} failed: {log}")]
    Compile { arch: String, log: String },
    #[error("CUDA driver: {0}")]
    Driver(#[from] DriverError),
    #[error("{0}")]
    Unsupported(String),
}

/// Compiled kernel image.
#[derive(Debug, Clone)]
pub enum Image {
    /// Device code for one architecture (`sm_XY`).
    Cubin(Vec<u8>),
    /// PTX text (any architecture the driver can JIT it for).
    Ptx(String),
}

/// Appends `adjust` (row `row`'s adjustments) in the 5-word layout of the `apply_adjustments` kernel: row, id, bias
/// (f32 bits), sub (f32 bits), flags (1: repetition penalty, 2: mask).
pub fn pack_adjustments(out: &mut Vec<i32>, row: usize, adjust: &[crate::cpu::sample::Adjust]) {
    for a in adjust {
        let flags = i32::from(a.repeat) | (i32::from(a.mask) << 1);
        out.extend([row as i32, a.id as i32, a.bias.to_bits() as i32, a.sub.to_bits() as i32, flags]);
    }
}

/// A row's parameters in the layout of the `sample_rows` kernel: (temperature, top_p, min_p, unused).
pub fn pack_sample_params(p: &crate::cpu::sample::SampleParams) -> [f32; 4] {
    [p.temperature, p.top_p, p.min_p, 0.0]
}

/// Whether the CUDA driver library (libcuda) can be loaded (never panics).
pub fn driver_available() -> bool {
    // SAFETY: probing for a shared library has no preconditions.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// The number of visible CUDA devices, or why there is none to use (no driver library, driver error).
pub fn device_count() -> Result<usize, CudaError> {
    if !driver_available() {
        return Err(CudaError::Unsupported(
            "the NVIDIA driver library (libcuda.so.1) was not found: the CUDA backend needs an NVIDIA GPU and its driver".into(),
        ));
    }
    Ok(CudaContext::device_count()?.max(0) as usize)
}

/// Whether the NVRTC library can be loaded (never panics).
pub fn nvrtc_available() -> bool {
    // SAFETY: probing for a shared library has no preconditions; cudarc documents this as non-panicking.
    unsafe { nvrtc_sys::is_culib_present() }
}

/// NVRTC options besides the architecture (part of the kernel cache's key).
const COMPILE_OPTIONS: &[&str] = &["--std=c++17"];

/// The NVRTC library's version (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    if !nvrtc_available() {
        return Err(CudaError::NvrtcMissing("set LD_LIBRARY_PATH to the nvidia-cuda-nvrtc wheel's lib".into()));
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: two valid out-pointers; the library is loaded (checked above).
    unsafe { nvrtc_sys::nvrtcVersion(&raw mut major, &raw mut minor) }
        .result()
        .map_err(|e| CudaError::NvrtcMissing(format!("nvrtcVersion: {e:?}")))?;
    Ok((major, minor))
}

/// [`compile`] for an `sm_XY` target: the CUBIN.
pub fn compile_cubin(arch: &str) -> Result<Vec<u8>, CudaError> {
    match compile(arch)? {
        Image::Cubin(bin) => Ok(bin),
        Image::Ptx(_) => Err(CudaError::Unsupported(format!("{arch} is not an sm_XY target: no CUBIN"))),
    }
}

/// Compiles [`KERNEL_SOURCE`] with NVRTC for `arch` (`"sm_90"`, `"compute_90"`, ...): `sm_*` gives a CUBIN, `compute_*`
/// PTX. Needs libnvrtc but no GPU.
pub fn compile(arch: &str) -> Result<Image, CudaError> {
    if !nvrtc_available() {
        return Err(CudaError::NvrtcMissing("set LD_LIBRARY_PATH to the nvidia-cuda-nvrtc wheel's lib".into()));
    }
    let src = CString::new(KERNEL_SOURCE).expect("kernel source has no NUL bytes");
    let name = CString::new("llama.cu").expect("static name");
    let prog = nvrtc_result::create_program(&src, Some(&name))
        .map_err(|e| CudaError::Compile { arch: arch.into(), log: format!("create program: {e:?}") })?;
    // No --use_fast_math: it turns sincosf into approximations that are wrong for RoPE angles of thousands of
    // radians. The kernels call the fast intrinsics (__expf) where they are accurate enough.
    let opts: Vec<String> =
        std::iter::once(format!("--gpu-architecture={arch}")).chain(COMPILE_OPTIONS.iter().map(|o| o.to_string())).collect();
    let opts_ref: Vec<&str> = opts.iter().map(String::as_str).collect();
    // SAFETY: `prog` is a live program created above and destroyed exactly once at the end of this function; every
    // buffer handed to NVRTC is sized from the matching NVRTC size query.
    let result = unsafe {
        let compiled = nvrtc_result::compile_program(prog, &opts_ref);
        let log =
            nvrtc_result::get_program_log(prog).map(|raw| CStr::from_ptr(raw.as_ptr()).to_string_lossy().into_owned()).unwrap_or_default();
        match compiled {
            Err(e) => Err(CudaError::Compile { arch: arch.into(), log: format!("{e:?}\n{log}") }),
            Ok(()) if arch.starts_with("sm_") => {
                let mut size = 0usize;
                nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size)
                    .result()
                    .map_err(|e| CudaError::Compile { arch: arch.into(), log: format!("cubin size: {e:?}") })?;
                let mut buf = vec![0u8; size];
                nvrtc_sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast())
                    .result()
                    .map_err(|e| CudaError::Compile { arch: arch.into(), log: format!("get cubin: {e:?}") })?;
                Ok(Image::Cubin(buf))
            }
            Ok(()) => {
                let ptx =
                    nvrtc_result::get_ptx(prog).map_err(|e| CudaError::Compile { arch: arch.into(), log: format!("get ptx: {e:?}") })?;
                Ok(Image::Ptx(CStr::from_ptr(ptx.as_ptr()).to_string_lossy().into_owned()))
            }
        }
    };
    // SAFETY: `prog` was created above and is not used after this call.
    let _ = unsafe { nvrtc_result::destroy_program(prog) };
    result
}

fn grid(x: usize, y: usize, z: usize) -> (u32, u32, u32) {
    (x as u32, y as u32, z as u32)
}

fn cfg(grid_dim: (u32, u32, u32), threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim, block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// Threads for a row-wise kernel over `n` elements.
fn row_threads(n: usize) -> u32 {
    (n.div_ceil(32) * 32).clamp(32, 1024) as u32
}

/// Shapes of one attention launch.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub rows: usize,
    pub n_heads: usize,
    pub n_kv: usize,
    pub head_dim: usize,
    /// Floats between consecutive QKV rows.
    pub row_stride: usize,
    pub block_size: usize,
    pub scale: f32,
    /// Positions per partition; `num_parts · part_size` must cover the longest context of the launch.
    pub part_size: usize,
    pub num_parts: usize,
    /// Run the tensor-core kernel (`paged_attention_tc_*`, sm_80 and later) instead of the CUDA-core one.
    pub tensor_cores: bool,
}

/// Buffers for [`CudaKernels::prefill_attention`]: contiguous K/V of one sequence (up to `max_ctx` positions), its
/// new rows' Q in bf16 (up to `max_rows`), and the score/probability tiles.
pub struct PrefillWorkspace {
    pub max_ctx: usize,
    pub max_rows: usize,
    k: CudaSlice<u16>,
    v: CudaSlice<u16>,
    q: CudaSlice<u16>,
    s: CudaSlice<f32>,
    p: CudaSlice<u16>,
}

impl PrefillWorkspace {
    /// `score_bytes` bounds the score (f32) + probability (bf16) tiles together.
    pub fn new(
        stream: &Arc<CudaStream>,
        n_heads: usize,
        kv_width: usize,
        head_dim: usize,
        max_rows: usize,
        max_ctx: usize,
        score_bytes: usize,
    ) -> Result<Self, CudaError> {
        let score_elems = (score_bytes / 6).max(n_heads * max_ctx);
        // SAFETY: (all) each buffer is written by a kernel or GEMM before it is read.
        unsafe {
            Ok(Self {
                max_ctx,
                max_rows,
                k: stream.alloc(max_ctx * kv_width)?,
                v: stream.alloc(max_ctx * kv_width)?,
                q: stream.alloc(max_rows * n_heads * head_dim)?,
                s: stream.alloc(score_elems)?,
                p: stream.alloc(score_elems)?,
            })
        }
    }
}

/// The loaded kernels of one device, launching on one stream.
pub struct CudaKernels {
    stream: Arc<CudaStream>,
    funcs: HashMap<&'static str, CudaFunction>,
    arch: String,
    /// Compute capability as `10 · major + minor` (90 for sm_90).
    sm: u32,
    /// Launch with programmatic dependent launch (see `launch.rs`).
    programmatic: bool,
}

impl CudaKernels {
    /// Compiles the kernels for the stream's device (`sm_XY` CUBIN) and loads them. Programmatic dependent launch is
    /// on from sm_90 if the driver accepts it.
    pub fn load(stream: Arc<CudaStream>) -> Result<Self, CudaError> {
        Self::load_cached(stream, None).map(|(k, _)| k)
    }

    /// [`Self::load`], with the image read from (or stored into) `cache` when given.
    pub fn load_cached(stream: Arc<CudaStream>, cache: Option<&KernelCache>) -> Result<(Self, Option<CacheOutcome>), CudaError> {
        let ctx: &Arc<CudaContext> = stream.context();
        let (major, minor) = ctx.compute_capability()?;
        let arch = format!("sm_{major}{minor}");
        let (image, outcome) = match cache {
            Some(c) => c.cubin(&arch).map(|(bin, o)| (bin, Some(o)))?,
            None => (compile_cubin(&arch)?, None),
        };
        let module = ctx.load_module(Ptx::from_binary(image))?;
        let mut funcs = HashMap::new();
        for &name in KERNEL_NAMES {
            funcs.insert(name, module.load_function(name)?);
        }
        let sm = (10 * major + minor) as u32;
        let mut kernels = Self { stream, funcs, arch, sm, programmatic: sm >= 90 };
        if kernels.programmatic && kernels.probe_programmatic_launch().is_err() {
            // A driver that refuses the launch attribute: plain launches (the kernels' waits are then no-ops).
            kernels.programmatic = false;
        }
        Ok((kernels, outcome))
    }

    /// One tiny programmatic launch, to learn whether the driver accepts the attribute.
    fn probe_programmatic_launch(&self) -> Result<(), CudaError> {
        let probe = self.stream.alloc_zeros::<u16>(1)?;
        // SAFETY: `probe` holds the one bf16 written.
        unsafe { self.fill_random_bf16(probe.device_ptr(&self.stream).0, 1, 0, 1.0, 0.0) }?;
        self.check()
    }

    /// Whether launches carry programmatic dependent launch (on by default on sm_90 and later, where the kernels'
    /// `griddepcontrol` instructions exist; it cannot be turned on below). Graphs capture whatever is set when they
    /// are captured.
    pub fn set_programmatic_launch(&mut self, on: bool) {
        self.programmatic = on && self.sm >= 90;
    }

    pub fn programmatic_launch(&self) -> bool {
        self.programmatic
    }

    fn launcher(&self, name: &'static str) -> Launch<'_> {
        Launch::new(&self.stream, &self.funcs[name], self.programmatic)
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The architecture the kernels were compiled for (`sm_90`, ...).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    /// Whether the device has the `mma.sync` bf16 tensor-core instructions (sm_80 and later).
    pub fn has_tensor_cores(&self) -> bool {
        self.sm >= 80
    }

    /// Waits for the stream and reports any asynchronous fault.
    pub fn check(&self) -> Result<(), CudaError> {
        self.stream.synchronize()?;
        Ok(())
    }

    /// `out[r, :] = f32(table[tokens[r], :])` for `rows` rows.
    ///
    /// # Safety
    /// `table` holds `vocab · hidden` bf16, `tokens` `rows` i32, `out` `rows · hidden` f32, all live on this device.
    pub unsafe fn embed_gather(
        &self,
        table: u64,
        tokens: u64,
        out: u64,
        rows: usize,
        hidden: usize,
        vocab: usize,
    ) -> Result<(), CudaError> {
        if rows == 0 {
            return Ok(());
        }
        let (h, v) = (hidden as i32, vocab as i32);
        let mut b = self.launcher("embed_gather");
        b.arg(&table).arg(&tokens).arg(&out).arg(&h).arg(&v);
        // SAFETY: sizes per this function's contract; the kernel bounds-checks token ids.
        unsafe { b.launch(cfg(grid(rows, 1, 1), 256)) }?;
        Ok(())
    }

    /// Fused residual add + RMSNorm over `rows` output rows (see `add_rms_norm` in `llama.cu`). `add` and `row_ids`
    /// may be 0 (null).
    ///
    /// # Safety
    /// `x` (and `add` if non-null) hold every residual row addressed, `w` `hidden` f32, `out` `rows · hidden` bf16,
    /// `row_ids` (if non-null) `rows` valid residual row indices.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn add_rms_norm(
        &self,
        x: u64,
        add: u64,
        w: u64,
        out: u64,
        row_ids: u64,
        rows: usize,
        hidden: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        if rows == 0 {
            return Ok(());
        }
        let h = hidden as i32;
        let mut b = self.launcher("add_rms_norm");
        b.arg(&x).arg(&add).arg(&w).arg(&out).arg(&row_ids).arg(&h).arg(&eps);
        // SAFETY: per this function's contract.
        unsafe { b.launch(cfg(grid(rows, 1, 1), row_threads(hidden).min(1024))) }?;
        Ok(())
    }

    /// `out[r, i] = bf16(silu(gu[r, i]) · gu[r, ffn + i])`.
    ///
    /// # Safety
    /// `gate_up` holds `rows · 2·ffn` f32, `out` `rows · ffn` bf16.
    pub unsafe fn silu_mul(&self, gate_up: u64, out: u64, rows: usize, ffn: usize) -> Result<(), CudaError> {
        if rows == 0 {
            return Ok(());
        }
        let f = ffn as i32;
        let mut b = self.launcher("silu_mul");
        b.arg(&gate_up).arg(&out).arg(&f);
        // SAFETY: per this function's contract.
        unsafe { b.launch(cfg(grid(ffn.div_ceil(256), rows, 1), 256)) }?;
        Ok(())
    }

    /// RoPE in place on the Q and K heads of `rows` fused QKV rows, then each row's rotated K and its V into the
    /// layer's paged cache at `slots[r]` (-1 skips the row; position 0 rotates by the identity).
    ///
    /// # Safety
    /// `qkv` holds `rows · row_stride` f32 with `(n_heads + 2·n_kv) · head_dim ≤ row_stride`, `pos` and `slots`
    /// `rows` i32, `inv_freq` `head_dim / 2` f32, each cache `num_slots · n_kv · head_dim` bf16 (may be 0 when every
    /// slot is -1).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn rope_kv_write(
        &self,
        qkv: u64,
        pos: u64,
        inv_freq: u64,
        k_cache: u64,
        v_cache: u64,
        slots: u64,
        rows: usize,
        n_heads: usize,
        n_kv: usize,
        head_dim: usize,
        row_stride: usize,
        interleaved: bool,
        num_slots: usize,
    ) -> Result<(), CudaError> {
        if rows == 0 {
            return Ok(());
        }
        let (nh, nkv, hd, rs, il, ns) =
            (n_heads as i32, n_kv as i32, head_dim as i32, row_stride as i32, i32::from(interleaved), num_slots as i64);
        let mut b = self.launcher("rope_kv_write");
        b.arg(&qkv).arg(&pos).arg(&inv_freq).arg(&k_cache).arg(&v_cache).arg(&slots);
        b.arg(&nh).arg(&nkv).arg(&hd).arg(&rs).arg(&il).arg(&ns);
        let threads = row_threads(((n_heads + n_kv) * head_dim / 2).max(n_kv * head_dim)).min(512);
        // SAFETY: per this function's contract; the kernel skips out-of-range slots.
        unsafe { b.launch(cfg(grid(rows, 1, 1), threads)) }?;
        Ok(())
    }

    /// `y[b, o] = Σ_i x[b, i] · w[o, i]` for `rows ≤ GEMV_MAX_ROWS` (the decode-batch alternative to cuBLAS), with
    /// one of the kernel's instantiations.
    ///
    /// # Safety
    /// `x` holds `rows · inp` bf16, `w` `out · inp` bf16 (16-byte aligned rows: `inp % 8 == 0`), `y` `rows · out` f32.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn gemv_bf16(
        &self,
        kernel: GemvKernel,
        x: u64,
        w: u64,
        y: u64,
        rows: usize,
        inp: usize,
        out: usize,
    ) -> Result<(), CudaError> {
        if rows == 0 {
            return Ok(());
        }
        if rows > GEMV_MAX_ROWS || !inp.is_multiple_of(8) || !x.is_multiple_of(16) || !w.is_multiple_of(16) {
            return Err(CudaError::Unsupported(format!(
                "gemv_bf16: {rows} rows (max {GEMV_MAX_ROWS}), in {inp} (must be a multiple of 8)"
            )));
        }
        let (b_, i_, o_) = (rows as i32, inp as i32, out as i32);
        let mut b = self.launcher(kernel.name());
        b.arg(&x).arg(&w).arg(&y).arg(&b_).arg(&i_).arg(&o_);
        // SAFETY: per this function's contract.
        unsafe { b.launch(cfg(grid(out.div_ceil(8), 1, 1), 256)) }?;
        Ok(())
    }

    /// `dst[r, c] = src[r, c]` for `rows × width` f32, rows `src_stride` / `dst_stride` floats apart.
    ///
    /// # Safety
    /// `src` holds `(rows − 1) · src_stride + width` f32, `dst` `(rows − 1) · dst_stride + width`; they do not overlap.
    pub unsafe fn copy_f32_2d(
        &self,
        src: u64,
        src_stride: usize,
        dst: u64,
        dst_stride: usize,
        rows: usize,
        width: usize,
    ) -> Result<(), CudaError> {
        if rows == 0 || width == 0 {
            return Ok(());
        }
        let (ss, ds, w) = (src_stride as i64, dst_stride as i64, width as i32);
        let mut b = self.launcher("copy_f32_2d");
        b.arg(&src).arg(&ss).arg(&dst).arg(&ds).arg(&w);
        // SAFETY: per this function's contract.
        unsafe { b.launch(cfg(grid(width.div_ceil(256), rows, 1), 256)) }?;
        Ok(())
    }

    /// `ids[r] = argmax(logits[r, :])` (lowest index on ties) and, unless `vals` is 0, `vals[r]` = the maximum.
    ///
    /// # Safety
    /// `logits` holds `rows · vocab` f32, `ids` `rows` i32, `vals` (when not 0) `rows` f32.
    pub unsafe fn argmax_rows(&self, logits: u64, ids: u64, vals: u64, rows: usize, vocab: usize) -> Result<(), CudaError> {
        if rows == 0 {
            return Ok(());
        }
        let v = vocab as i32;
        let mut b = self.launcher("argmax_rows");
        b.arg(&logits).arg(&ids).arg(&vals).arg(&v);
        // SAFETY: per this function's contract.
        unsafe { b.launch(cfg(grid(rows, 1, 1), 1024)) }?;
        Ok(())
    }

    /// Applies `n` logit adjustments in place (`adj` as [`pack_adjustments`] writes it): 5 words per entry (row, id, bias f32 bits, sub f32 bits,
    /// flags: 1 repetition penalty, 2 mask), `rep` one repetition penalty per row. Twin:
    /// `cpu::sample::apply_adjustments`.
    ///
    /// # Safety
    /// `logits` holds every row named in `adj` (`stride` f32 apart, `vocab` valid), `adj` `5 n` i32, `rep` one f32
    /// per row named; no (row, id) pair repeats.
    pub unsafe fn apply_adjustments(
        &self,
        logits: u64,
        stride: usize,
        vocab: usize,
        adj: u64,
        n: usize,
        rep: u64,
    ) -> Result<(), CudaError> {
        if n == 0 {
            return Ok(());
        }
        let (stride, vocab, count) = (stride as i64, vocab as i32, n as i32);
        let mut b = self.launcher("apply_adjustments");
        b.arg(&logits).arg(&stride).arg(&vocab).arg(&adj).arg(&count).arg(&rep);
        // SAFETY: per this function's contract.
        unsafe { b.launch(cfg(grid(n.div_ceil(256), 1, 1), 256)) }?;
        Ok(())
    }

    /// Sets to -inf the logits of `rows` rows that their grammar mask does not allow: row `r`'s mask is the `words`
    /// u32 at `masks + mask_rows[r] · words` (bit `i % 32` of word `i / 32` = id `i` allowed), none when
    /// `mask_rows[r] < 0`. Twin: `cpu::sample::apply_mask`.
    ///
    /// # Safety
    /// `logits` holds `rows` rows `stride` f32 apart (`vocab` valid); `mask_rows` `rows` i32, each negative or
    /// below the number of masks `masks` holds (`words` u32 each).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn apply_token_masks(
        &self,
        logits: u64,
        stride: usize,
        vocab: usize,
        masks: u64,
        words: usize,
        mask_rows: u64,
        rows: usize,
    ) -> Result<(), CudaError> {
        if rows == 0 {
            return Ok(());
        }
        let (stride, vocab, words) = (stride as i64, vocab as i32, words as i32);
        let mut b = self.launcher("apply_token_masks");
        b.arg(&logits).arg(&stride).arg(&vocab).arg(&masks).arg(&words).arg(&mask_rows);
        // SAFETY: per this function's contract.
        unsafe { b.launch(cfg(grid(rows, 1, 1), 256)) }?;
        Ok(())
    }

    /// Draws one token per row into `ids` from adjusted `logits` (overwritten with the kept weights): `params` holds
    /// (temperature, top_p, min_p, unused) per row, `top_k` one i32 and `u` one f64 uniform per row. Twin:
    /// `cpu::sample::sample_row`.
    ///
    /// # Safety
    /// `logits` holds `rows` rows `stride` f32 apart (`vocab` valid); `params` `4 rows` f32, `top_k` and `ids` `rows`
    /// i32, `u` `rows` f64.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn sample_rows(
        &self,
        logits: u64,
        stride: usize,
        vocab: usize,
        params: u64,
        top_k: u64,
        u: u64,
        ids: u64,
        rows: usize,
    ) -> Result<(), CudaError> {
        if rows == 0 {
            return Ok(());
        }
        let (stride, vocab) = (stride as i64, vocab as i32);
        let mut b = self.launcher("sample_rows");
        b.arg(&logits).arg(&stride).arg(&vocab).arg(&params).arg(&top_k).arg(&u).arg(&ids);
        // SAFETY: per this function's contract.
        unsafe { b.launch(cfg(grid(rows, 1, 1), SAMPLE_THREADS)) }?;
        Ok(())
    }

    /// Fills `n` bf16 values with `offset + scale · u`, `u` uniform in [-1, 1), a fixed function of `(seed, i)`.
    ///
    /// # Safety
    /// `out` holds `n` bf16.
    pub unsafe fn fill_random_bf16(&self, out: u64, n: usize, seed: u64, scale: f32, offset: f32) -> Result<(), CudaError> {
        if n == 0 {
            return Ok(());
        }
        let n64 = n as u64;
        let mut b = self.launcher("fill_random_bf16");
        b.arg(&out).arg(&n64).arg(&seed).arg(&scale).arg(&offset);
        // SAFETY: per this function's contract (grid-stride loop bounded by n).
        unsafe { b.launch(cfg(grid(n.div_ceil(256).min(65536), 1, 1), 256)) }?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CI sets `FERRITE_REQUIRE_NVRTC=1` (and installs the NVRTC wheel), so a kernel that does not compile fails CI.
    #[test]
    fn every_kernel_compiles_for_sm80_and_sm90() {
        if !nvrtc_available() {
            assert!(std::env::var_os("FERRITE_REQUIRE_NVRTC").is_none(), "FERRITE_REQUIRE_NVRTC is set but libnvrtc was not found");
            eprintln!("skipped: libnvrtc not found (set FERRITE_REQUIRE_NVRTC=1 to make this an error)");
            return;
        }
        for arch in ["sm_80", "sm_90", "compute_90"] {
            match compile(arch) {
                Ok(Image::Cubin(bin)) => assert!(bin.len() > 1000, "{arch}: cubin of {} bytes", bin.len()),
                Ok(Image::Ptx(ptx)) => {
                    for name in KERNEL_NAMES {
                        assert!(ptx.contains(&format!(".entry {name}")), "{arch}: {name} missing from the PTX");
                    }
                }
                Err(e) => panic!("{e}"),
            }
        }
    }
}
