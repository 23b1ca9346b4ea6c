//! What this GPU can do at best, measured: device-to-device copy bandwidth, the bf16 GEMM rate and NCCL all-reduce
//! latency. `ferrite gpu-bench` reports its steps as fractions of these (the safe face of the device work it needs).

use std::sync::Arc;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, DevicePtr};
use ferrite_kernels::cuda::{CudaError, Gemm};

use super::CudaBackend;

impl CudaBackend {
    /// Milliseconds per call of `f` on this backend's stream: median of `reps` after `warm` warm-ups, device events.
    fn median_ms(&self, warm: usize, reps: usize, mut f: impl FnMut() -> Result<(), CudaError>) -> Result<f64, CudaError> {
        let ctx = self.stream.context();
        for _ in 0..warm {
            f()?;
        }
        let mut times = Vec::with_capacity(reps);
        for _ in 0..reps.max(1) {
            let (start, end) =
                (ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?, ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?);
            start.record(&self.stream)?;
            f()?;
            end.record(&self.stream)?;
            end.synchronize()?;
            times.push(f64::from(start.elapsed_ms(&end)?));
        }
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    }

    /// `n` random bf16 values on the device.
    fn random_bf16(&self, n: usize, seed: u64) -> Result<CudaSlice<u16>, CudaError> {
        // SAFETY: every element is written by the fill kernel below before anything reads it.
        let buf = unsafe { self.stream.alloc::<u16>(n) }?;
        // SAFETY: `buf` holds `n` bf16 values on this backend's device and stream.
        unsafe { self.kernels.fill_random_bf16(buf.device_ptr(&self.stream).0, n, seed, 1.0, 0.0) }?;
        Ok(buf)
    }

    /// Device-to-device copy bandwidth in GB/s (bytes read + written), over 1 GiB buffers.
    pub fn measure_copy_bandwidth(&self) -> Result<f64, CudaError> {
        let n = 512 << 20; // bf16 elements: 1 GiB
        let src = self.random_bf16(n, 7)?;
        let mut dst = self.random_bf16(n, 8)?;
        let ms = self.median_ms(3, 10, || Ok(self.stream.memcpy_dtod(&src, &mut dst)?))?;
        Ok(2.0 * (n * 2) as f64 / (ms * 1e-3) / 1e9)
    }

    /// The bf16 GEMM rate (bf16 in, f32 accumulate and out, as the linear layers run) in TFLOP/s for
    /// `[m, k] · [n, k]ᵀ`.
    pub fn measure_gemm_rate(&self, m: usize, k: usize, n: usize) -> Result<f64, CudaError> {
        let gemm = Gemm::new(Arc::clone(&self.stream))?;
        let x = self.random_bf16(m * k, 11)?;
        let w = self.random_bf16(n * k, 12)?;
        // SAFETY: written by the GEMM before any read.
        let y = unsafe { self.stream.alloc::<f32>(m * n) }?;
        let (xp, wp, yp) = (x.device_ptr(&self.stream).0, w.device_ptr(&self.stream).0, y.device_ptr(&self.stream).0);
        // SAFETY: the buffers hold m·k and n·k bf16 and m·n f32 on this stream's device, as `linear` requires.
        let ms = self.median_ms(3, 10, || unsafe { gemm.linear(xp, wp, yp, m, k, n) })?;
        Ok(2.0 * (m * k * n) as f64 / (ms * 1e-3) / 1e12)
    }

    /// Microseconds per NCCL all-reduce of `bytes` bytes of f32 (at most 2 MiB), or `None` when this backend is not a
    /// tensor-parallel rank on NCCL.
    pub fn time_all_reduce_us(&self, bytes: usize) -> Result<Option<f64>, CudaError> {
        const MAX: usize = 1 << 19; // f32 elements: 2 MiB
        let Some(comm) = self.nccl() else { return Ok(None) };
        let n = (bytes / 4).clamp(1, MAX);
        let buf = self.stream.alloc_zeros::<f32>(n)?;
        let ptr = buf.device_ptr(&self.stream).0;
        // SAFETY: `buf` holds `n` f32 on this rank's device, and the all-reduce runs on the rank's stream.
        let ms = self.median_ms(5, 50, || unsafe { comm.all_reduce_sum_device(ptr, n) })?;
        Ok(Some(ms * 1e3))
    }
}
