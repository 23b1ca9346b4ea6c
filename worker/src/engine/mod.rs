//! The serving engine: paged KV with prefix caching ([`block_pool`]), continuous batching ([`scheduler`]),
//! sampling ([`sampler`]), and the engine thread that drives a [`crate::backend::Backend`].

pub mod block_pool;
pub mod core;
pub mod sampler;
pub mod scheduler;
