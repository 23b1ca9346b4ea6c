//! Tensor parallelism: one model replica over `tp` ranks (Megatron style; the plan is
//! `ferrite_common::shard::ShardSpec`). [`comm`]: the `Communicator` trait and the in-process CPU group.
//! [`cpu`]: `TpCpuBackend`, a `Backend` that drives one rank thread per shard.

pub mod comm;
pub mod cpu;
