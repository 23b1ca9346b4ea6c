//! Tensor parallelism: one model replica over `tp` ranks (Megatron style; the plan is
//! `ferrite_common::shard::ShardSpec`).
//!
//! - [`comm`]: the `Communicator` trait and the in-process CPU group.
//! - [`group`]: `TpBackend`, the engine's `Backend` over one rank thread per shard (any rank backend), with
//!   group-wide, final failure.
//! - [`cpu`]: CPU ranks (`TpBackend::cpu`).
//! - [`gather`]: assembling the ranks' vocabulary slices (logits rows, greedy ids) on the host.
//! - `cuda` (feature `cuda`): GPU ranks (`TpBackend::cuda`, one GPU per rank); their NCCL group is `crate::cuda::nccl`
//!   (with the CUDA code, where `unsafe` is allowed).
//!
//! ## Failure is group-wide, final and bounded
//! A rank whose step fails aborts the group; a collective waits at most 120 s; a step not finished within the step
//! timeout (GPU 240 s, CPU 30 min: a big CPU prefill chunk takes minutes) aborts it from the engine side. GPU ranks
//! never block in a synchronize but poll an event against the collective timeout and the group's abort flag, then
//! abort their own NCCL communicator (from their own thread, so nothing is being enqueued on it), which releases
//! kernels spinning on gone peers. Joining is bounded the same way: `ncclCommInitRank` (which blocks until every rank
//! has called it) runs on a helper thread ([`comm::run_bounded`]) while the rank thread watches the abort flag and
//! the timeout. After a failure every step fails at once; `BackendError::is_fatal` makes the engine fail every
//! request it holds and stop, and the worker exits non-zero so Kubernetes restarts it. Rank threads stuck in a
//! device call are not joined (the process exit ends them).
//!
//! ## How ranks run
//! [`group::TpBackend`] builds each rank's backend *on its thread* (a GPU rank binds its device there), copies a step
//! once and sends it to every rank, and returns rank 0's output. CPU ranks are `CpuBackend`s loaded from their shard
//! only (rows and columns sliced on quantization-block boundaries; a KV store for their KV heads only). GPU rank `r`
//! runs on device `cuda_device + r`, joins an `NcclGroup` (unique id shared in process) as an `NcclRank`, all-reduces
//! after o_proj and down on its stream (inside decode graphs too); greedy steps gather each rank's (max, argmax) per
//! row, logits steps gather the vocabulary slices (padded to the widest rank so NCCL's counts are equal).
//!
//! Verified on hardware: the NCCL path at world size 1 on one H100/H200 (NCCL cannot put two ranks on one GPU).
//! Multi-GPU TP (world ≥ 2) is the same code, its sharding and collectives proven on CPU ranks (TP=2/3/4).

pub mod comm;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod gather;
pub mod group;
