//! Tensor parallelism: one model replica over `tp` ranks (Megatron style; the plan is
//! `ferrite_common::shard::ShardSpec`).
//!
//! - [`comm`]: the `Communicator` trait and the in-process CPU group.
//! - [`group`]: `TpBackend`, the engine's `Backend` over one rank thread per shard (any rank backend), with
//!   group-wide, final failure.
//! - [`cpu`]: CPU ranks (`TpBackend::cpu`).
//! - [`gather`]: assembling the ranks' vocabulary slices (logits rows, greedy ids) on the host.
//! - `nccl` and `cuda` (feature `cuda`): the NCCL group and GPU ranks (`TpBackend::cuda`, one GPU per rank).

pub mod comm;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod gather;
pub mod group;
#[cfg(feature = "cuda")]
pub mod nccl;
