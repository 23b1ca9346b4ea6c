//! Generated gRPC types and services (`proto/worker.proto`, package `ferrite.worker.v1`).

#![allow(clippy::all, missing_docs)]

/// Router ↔ worker protocol.
pub mod worker {
    tonic::include_proto!("ferrite.worker.v1");
}
