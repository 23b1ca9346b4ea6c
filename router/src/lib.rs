//! Ferrite router: the OpenAI-compatible front end.
//!
//! The router owns text: chat templates, tokenization, detokenization and stop strings; workers see token ids only
//! (gRPC, `ferrite_common::proto`). A request goes: [`handlers`] (parse, template, tokenize) → [`validate`] (the
//! shared rules of `ferrite_common::sampling`, OpenAI field names) → [`workers`] (pick a worker by the [`Routing`]
//! policy, over the [`kv_index`] and [`policy`]'s cost function for cache-aware routing; lease it; the lease aborts
//! the request on the worker when dropped) → [`drive`] (stream token ids, detokenize, stop strings) → back to
//! [`handlers`] (JSON or SSE in the OpenAI shapes of [`openai`]; the serving worker in `x-ferrite-worker`).
//!
//! The face of the crate is what the `ferrite` binary composes: build an [`AppState`] (text assets, a
//! [`WorkerPool`], [`RouterConfig`], [`Limits`]) and serve it with [`serve_http`], or get the axum [`app`] for tests.
//! Set-up errors are [`RouterError`]s; request errors become OpenAI error envelopes only at the handler edge.
//!
//! This crate depends on `ferrite-common` only: it never links the engine, the kernels or CUDA.

mod auth;
pub mod cluster;
#[cfg(test)]
mod decision_bench;
mod drive;
mod error;
mod handlers;
mod kv_index;
mod openai;
mod policy;
mod server;
mod state;
mod text;
mod validate;
mod workers;

pub use auth::{ApiKeys, AuthConfig};
pub use error::RouterError;
pub use openai::tools::{ToolCallParser, UnknownToolCallParser};
pub use policy::{CostWeights, Routing, UnknownRouting};
pub use server::{TlsFiles, app, serve_http, serve_http_with};
pub use state::{AppState, ExtraMetrics, RouterConfig};
pub use validate::Limits;
pub use workers::{BreakerConfig, KvEventsMode, MAX_MIGRATION_LIMIT, Member, PoolConfig, PoolConfigError, UnknownKvEventsMode, WorkerPool};
