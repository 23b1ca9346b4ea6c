//! The NCCL group of a tensor-parallel GPU worker (feature `cuda`): one [`NcclGroup`] per worker process (the unique
//! id, shared in process, the collective timeout and the group-wide abort flag) and one [`NcclRank`] per rank thread
//! (its communicator, on its device and stream).
//!
//! Collectives are enqueued on the rank's stream (inside CUDA graphs too) and never waited on with a blocking
//! synchronize: [`NcclRank::wait`] polls an event, so a collective whose peers never come turns into an error after
//! the timeout, or at once when another rank has failed the group. A rank that gives up aborts its own
//! communicator (from its own thread, so no collective is being enqueued on it meanwhile), which releases its
//! kernels spinning on the missing peers.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr};
use ferrite_kernels::cuda::CudaError;
use ferrite_kernels::cuda::nccl::{NcclComm, nccl_available, unique_id};

use crate::tp::comm::{CommError, Communicator, run_bounded};

/// A worker's NCCL group: create it once (it makes the unique id), then [`NcclRank::init`] on each rank's thread.
pub struct NcclGroup {
    world: usize,
    timeout: Duration,
    id: [std::ffi::c_char; 128],
    aborted: AtomicBool,
    why: Mutex<Option<String>>,
}

impl NcclGroup {
    pub fn new(world: usize, timeout: Duration) -> Result<Arc<Self>, CudaError> {
        if !nccl_available() {
            return Err(CudaError::Unsupported("NCCL library not found (libnccl.so on LD_LIBRARY_PATH)".into()));
        }
        Ok(Arc::new(Self { world, timeout, id: unique_id()?, aborted: AtomicBool::new(false), why: Mutex::new(None) }))
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Fails the group: every rank's pending wait returns [`CommError::Aborted`] and aborts its communicator.
    pub fn abort(&self, why: &str) {
        let mut w = self.why.lock().unwrap_or_else(|e| e.into_inner());
        if w.is_none() {
            *w = Some(why.to_string());
        }
        self.aborted.store(true, Ordering::Release);
    }

    fn abort_reason(&self) -> Option<String> {
        if !self.aborted.load(Ordering::Acquire) {
            return None;
        }
        Some(self.why.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default())
    }
}

/// One rank's NCCL communicator with its stream.
pub struct NcclRank {
    group: Arc<NcclGroup>,
    rank: usize,
    comm: Mutex<NcclComm>,
    stream: Arc<CudaStream>,
    done: CudaEvent,
    /// Device staging for the host-buffer collectives of [`Communicator`].
    staging: Mutex<Option<CudaSlice<f32>>>,
}

fn comm_err(e: CudaError) -> CommError {
    CommError::Aborted(e.to_string())
}

impl NcclRank {
    /// Joins `group` as `rank`, on `stream`'s device (waits until every rank has joined), then meets the others
    /// in a barrier (which also opens the connections). The join is bounded: it fails when the group is aborted
    /// (another rank failed to start) or the group's timeout passes first, instead of blocking for ever in NCCL.
    pub fn init(group: Arc<NcclGroup>, rank: usize, stream: Arc<CudaStream>) -> Result<Self, CudaError> {
        stream.context().bind_to_thread()?;
        let (ctx, world, id) = (Arc::clone(stream.context()), group.world, group.id);
        // ncclCommInitRank blocks until every rank has called it; it runs on a thread of its own (bound to this
        // rank's device) so this one can give up.
        let join = move || {
            ctx.bind_to_thread()?;
            NcclComm::init(rank, world, id)
        };
        let comm = run_bounded(&format!("ferrite-nccl-init-{rank}"), group.timeout, &|| group.abort_reason(), join)
            .map_err(|e| CudaError::Unsupported(format!("rank {rank} joining the NCCL group of {world}: {e}")))??;
        let done = stream.context().new_event(None)?;
        let r = Self { group, rank, comm: Mutex::new(comm), stream, done, staging: Mutex::new(None) };
        r.barrier().map_err(|e| CudaError::Unsupported(format!("NCCL barrier after init: {e}")))?;
        Ok(r)
    }

    fn comm(&self) -> MutexGuard<'_, NcclComm> {
        self.comm.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// In-place sum of `count` f32 at `buf` over the group, enqueued on the rank's stream.
    ///
    /// # Safety
    /// `buf` holds `count` f32 on this rank's device, live until the stream has run the collective.
    pub unsafe fn all_reduce_sum_device(&self, buf: u64, count: usize) -> Result<(), CudaError> {
        // SAFETY: per this function's contract.
        unsafe { self.comm().all_reduce_sum_f32(buf, count, &self.stream) }
    }

    /// Gathers `bytes` bytes at `send` from every rank into `recv` (rank order), enqueued on the rank's stream.
    ///
    /// # Safety
    /// As [`NcclComm::all_gather_bytes`].
    pub unsafe fn all_gather_device(&self, send: u64, recv: u64, bytes: usize) -> Result<(), CudaError> {
        // SAFETY: per this function's contract.
        unsafe { self.comm().all_gather_bytes(send, recv, bytes, &self.stream) }
    }

    /// Waits until everything enqueued on the stream so far has run. Fails (and aborts this rank's communicator)
    /// when the group is aborted or the work does not finish within the group's timeout.
    pub fn wait(&self) -> Result<(), CommError> {
        self.done.record(&self.stream).map_err(|e| comm_err(e.into()))?;
        let deadline = Instant::now() + self.group.timeout;
        let mut spins = 0u32;
        loop {
            // A failed group fails the step even when this rank's part is done: its results may be garbage.
            if let Some(why) = self.group.abort_reason() {
                self.fail(&why);
                return Err(CommError::Aborted(why));
            }
            match self.done.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    let why = format!("rank {}: CUDA error while waiting: {e}", self.rank);
                    self.fail(&why);
                    return Err(CommError::Aborted(why));
                }
            }
            if Instant::now() >= deadline {
                self.fail(&format!("rank {} timed out", self.rank));
                return Err(CommError::Timeout(self.group.timeout));
            }
            // Spin briefly (decode steps take milliseconds), then yield the core.
            spins += 1;
            if spins < 1000 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// Fails the group and aborts this rank's communicator, releasing its collectives stuck on missing peers. Call
    /// it from the rank's own thread.
    pub fn fail(&self, why: &str) {
        self.group.abort(why);
        self.comm().abort();
    }

    /// Copies `host` to the staging buffer (grown as needed) and returns its device address.
    fn stage(&self, staging: &mut Option<CudaSlice<f32>>, host: &[f32], len: usize) -> Result<u64, CudaError> {
        if staging.as_ref().is_none_or(|s| s.len() < len) {
            *staging = Some(self.stream.alloc_zeros::<f32>(len.next_power_of_two())?);
        }
        let s = staging.as_mut().expect("allocated above");
        if !host.is_empty() {
            self.stream.memcpy_htod(host, &mut s.slice_mut(..host.len()))?;
        }
        Ok(s.device_ptr(&self.stream).0)
    }
}

impl Communicator for NcclRank {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.group.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        let mut staging = self.staging.lock().unwrap_or_else(|e| e.into_inner());
        let ptr = self.stage(&mut staging, buf, buf.len()).map_err(comm_err)?;
        // SAFETY: the staging buffer holds buf.len() f32 and lives in `self` (locked) until the wait below.
        unsafe { self.all_reduce_sum_device(ptr, buf.len()) }.map_err(comm_err)?;
        self.wait()?;
        let s = staging.as_ref().expect("staged");
        self.stream.memcpy_dtoh(&s.slice(..buf.len()), buf).map_err(|e| comm_err(e.into()))
    }

    fn all_gather(&self, local: &[f32], out: &mut Vec<f32>) -> Result<(), CommError> {
        // Lengths may differ: gather them first, then every rank's part padded to the longest.
        let world = self.group.world;
        let mut lens = vec![0f32; world];
        lens[self.rank] = local.len() as f32;
        self.all_reduce_sum(&mut lens)?;
        let lens: Vec<usize> = lens.iter().map(|&l| l as usize).collect();
        let max = lens.iter().copied().max().unwrap_or(0);
        let mut padded = local.to_vec();
        padded.resize(max, 0.0);
        let mut staging = self.staging.lock().unwrap_or_else(|e| e.into_inner());
        let base = self.stage(&mut staging, &padded, max * (world + 1)).map_err(comm_err)?;
        let recv = base + (max * 4) as u64;
        // SAFETY: staging holds max·(world+1) f32: the send part first, then the receive part.
        unsafe { self.all_gather_device(base, recv, max * 4) }.map_err(comm_err)?;
        self.wait()?;
        let mut all = vec![0f32; max * world];
        let s = staging.as_ref().expect("staged");
        self.stream.memcpy_dtoh(&s.slice(max..max * (world + 1)), &mut all).map_err(|e| comm_err(e.into()))?;
        out.clear();
        for (k, &len) in lens.iter().enumerate() {
            out.extend_from_slice(&all[k * max..k * max + len]);
        }
        Ok(())
    }

    fn barrier(&self) -> Result<(), CommError> {
        let mut one = [1.0f32];
        self.all_reduce_sum(&mut one)?;
        if one[0] as usize != self.group.world {
            return Err(CommError::Aborted(format!("barrier counted {} ranks, expected {}", one[0], self.group.world)));
        }
        Ok(())
    }

    fn abort(&self, why: &str) {
        // Other threads only raise the flag; each rank aborts its own communicator when its wait sees it.
        self.group.abort(why);
    }
}
