//! Start-up and configuration errors of the router: typed, for the binary to report. Request errors are
//! [`crate::openai::error::ApiError`]s, rendered as HTTP only at the handler edge; the two never mix.

use std::time::Duration;

/// Why the router could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    /// A `--worker` address that is not a URI tonic can connect to.
    #[error("bad worker address `{addr}`: {reason} (expected e.g. http://10.0.0.5:50051)")]
    BadWorkerAddress { addr: String, reason: String },
    /// A setting out of range.
    #[error("{0}")]
    Config(String),
    /// No worker answered `Info` in time.
    #[error("no worker answered Info within {0:?}")]
    NoWorker(Duration),
    /// The HTTP listener could not be bound.
    #[error("binding {addr}: {source}")]
    Bind { addr: std::net::SocketAddr, source: std::io::Error },
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Serve(std::io::Error),
    /// The TLS certificate or key could not be loaded.
    #[error("TLS certificate/key {0}")]
    Tls(String),
    /// The API key configuration is unusable (never carries a key).
    #[error("API keys: {0}")]
    ApiKeys(String),
    /// The Prometheus registry refused a metric (a duplicate name: a bug).
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
}
