//! The serving engine (vLLM v1 design), token ids in and out.
//!
//! - `block_pool`: KV blocks with reference counts, the prefix-cache hash index and the LRU free list.
//! - [`scheduler`]: the continuous-batching planner (token budget, chunked prefill, prefix hits, preemption by
//!   recompute, admission control); it owns every sequence, with the engine's per-sequence state as payload.
//! - [`sampler`]: per-sequence sampling state (seed, draw counter, penalties, logprobs).
//! - [`constraint`]: constrained decoding (llguidance): the token table, grammar compilation, the per-sequence mask.
//! - [`step`]: [`step::EngineCore`], the sans-IO engine: add / abort / step over a lent backend, outputs as data.
//! - [`core`]: the engine thread around the core ([`core::Engine::spawn`], [`core::EngineHandle`]): channels,
//!   disconnect reaping, stats, the fatal-error watch, and step pacing (`pacer`: while streams decode, steps are
//!   sized from measured step times so a long prompt does not stall them).
//!
//! Dependencies run one way: `block_pool` ← `scheduler` ← `step` (with `sampler`) ← `core`.

pub(crate) mod block_pool;
pub mod constraint;
pub mod core;
mod pacer;
pub mod sampler;
pub mod scheduler;
pub mod step;
