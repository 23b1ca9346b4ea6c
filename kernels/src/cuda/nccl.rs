//! NCCL collectives for tensor-parallel GPU ranks (raw communicator handle so the backend can reduce its own device
//! buffers in place, on its stream, inside CUDA graphs). One [`NcclComm`] per rank, created by that rank's thread
//! (NCCL wants each rank initialised from its own thread or inside a group), from the unique id of rank 0.
//!
//! The `nvidia-nccl-cu13` wheel ships `libnccl.so.2`, a name cudarc does not try: put a `libnccl.so` link to it on
//! `LD_LIBRARY_PATH` (scripts/gpu-check.sh does).

use std::ffi::c_void;
use std::mem::MaybeUninit;

use cudarc::driver::CudaStream;
use cudarc::nccl::{result as nccl, sys};

use super::CudaError;

fn err(what: &str, e: impl std::fmt::Debug) -> CudaError {
    CudaError::Unsupported(format!("NCCL {what}: {e:?}"))
}

/// Whether the NCCL library can be loaded (never panics).
pub fn nccl_available() -> bool {
    // SAFETY: probing for a shared library has no preconditions.
    unsafe { sys::is_culib_present() }
}

/// A new unique id (rank 0 makes it; every rank of the group initialises from the same id).
pub fn unique_id() -> Result<[std::ffi::c_char; 128], CudaError> {
    Ok(nccl::get_uniqueid().map_err(|e| err("unique id", e))?.internal)
}

/// One rank's NCCL communicator.
pub struct NcclComm {
    comm: sys::ncclComm_t,
    rank: usize,
    world: usize,
}

// SAFETY: an NCCL communicator may be used from any thread, one call at a time; the owner (a rank's backend) only
// uses it through `&self` on its own stream from the thread that drives it.
unsafe impl Send for NcclComm {}

impl NcclComm {
    /// Joins the group `id` as `rank` of `world`, on the current device (bind the rank's context first).
    pub fn init(rank: usize, world: usize, id: [std::ffi::c_char; 128]) -> Result<Self, CudaError> {
        if !nccl_available() {
            return Err(CudaError::Unsupported("NCCL library not found (libnccl.so on LD_LIBRARY_PATH)".into()));
        }
        let mut comm = MaybeUninit::uninit();
        // SAFETY: `comm` is written by ncclCommInitRank before it is read; id/rank/world are plain values.
        let comm = unsafe {
            nccl::comm_init_rank(comm.as_mut_ptr(), world as i32, sys::ncclUniqueId { internal: id }, rank as i32)
                .map_err(|e| err("init", e))?;
            comm.assume_init()
        };
        Ok(Self { comm, rank, world })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    fn handle(&self) -> Result<sys::ncclComm_t, CudaError> {
        if self.comm.is_null() {
            return Err(CudaError::Unsupported("NCCL communicator was aborted".into()));
        }
        Ok(self.comm)
    }

    /// In-place sum of `count` f32 at `buf` over the group, enqueued on `stream`.
    ///
    /// # Safety
    /// `buf` holds `count` f32 on this rank's device, live until the stream has run the collective.
    pub unsafe fn all_reduce_sum_f32(&self, buf: u64, count: usize, stream: &CudaStream) -> Result<(), CudaError> {
        // SAFETY: per this function's contract; in place is allowed by NCCL.
        unsafe {
            nccl::all_reduce(
                buf as *const c_void,
                buf as *mut c_void,
                count,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                self.handle()?,
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map(drop)
        .map_err(|e| err("all-reduce", e))
    }

    /// Gathers `bytes` bytes at `send` from every rank into `recv` (rank `k`'s at `recv + k · bytes`), enqueued on
    /// `stream`.
    ///
    /// # Safety
    /// `send` holds `bytes` bytes and `recv` `world · bytes` bytes on this rank's device, live until the stream has
    /// run the collective; they do not overlap (unless `send` is this rank's own part of `recv`).
    pub unsafe fn all_gather_bytes(&self, send: u64, recv: u64, bytes: usize, stream: &CudaStream) -> Result<(), CudaError> {
        // SAFETY: per this function's contract.
        unsafe {
            nccl::all_gather(
                send as *const c_void,
                recv as *mut c_void,
                bytes,
                sys::ncclDataType_t::ncclUint8,
                self.handle()?,
                stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map(drop)
        .map_err(|e| err("all-gather", e))
    }

    /// Aborts the communicator: its pending collectives (kernels spinning on peers that will never come) return, and
    /// every later call fails. Call it from the thread that drives this rank, so no collective is being enqueued
    /// on the handle meanwhile.
    pub fn abort(&mut self) {
        if self.comm.is_null() {
            return;
        }
        // SAFETY: the handle came from ncclCommInitRank and is not used again (nulled below; Drop skips it).
        let _ = unsafe { nccl::comm_abort(self.comm) };
        self.comm = std::ptr::null_mut();
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if !self.comm.is_null() {
            // SAFETY: the handle came from ncclCommInitRank, was not aborted, and is destroyed once.
            let _ = unsafe { nccl::comm_destroy(self.comm) };
        }
    }
}
