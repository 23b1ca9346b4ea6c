//! The routers' raft control plane: a replicated, durable view of the cluster's workers and routers.
//!
//! - [`storage`]: the raft log, hard state and snapshots in a data directory (redb, fsynced).
//! - [`state`]: the replicated state machine ([`ClusterState`]) and its epoch-fenced [`Command`]s.

pub mod state;
pub mod storage;

pub use state::{ClusterState, Command, WorkerRecord, WorkerState};
pub use storage::{ClusterStorage, DataDirError};
