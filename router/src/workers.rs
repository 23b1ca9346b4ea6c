//! The router's view of its workers: gRPC clients with in-flight counts, least-loaded selection, readiness, and an
//! abort-on-drop guard so a request whose client went away is aborted on the worker.
//!
//! (Prefix-cache-aware routing over KV events and raft-managed membership replace the static list later.)

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use ferrite_common::proto::rejection_of;

use crate::error::RouterError;
use ferrite_common::proto::worker as pb;
use ferrite_common::proto::worker::worker_client::WorkerClient;
use tonic::transport::Channel;

use crate::openai::error::{ApiError, ErrorKind};

/// One worker endpoint.
#[derive(Debug)]
pub struct WorkerSlot {
    pub addr: String,
    pub client: WorkerClient<Channel>,
    inflight: AtomicUsize,
}

/// The workers this router sends requests to.
#[derive(Debug, Clone)]
pub struct WorkerPool {
    workers: Arc<Vec<WorkerSlot>>,
}

/// Holds a worker's in-flight count up while a request runs, and aborts the request on the worker if dropped before
/// [`Lease::finish`] (client disconnect, stop string, error).
#[derive(Debug)]
pub struct Lease {
    pool: WorkerPool,
    index: usize,
    request_id: Option<String>,
}

impl Lease {
    pub fn client(&self) -> WorkerClient<Channel> {
        self.pool.workers[self.index].client.clone()
    }

    /// The leased worker's address.
    pub fn addr(&self) -> &str {
        &self.pool.workers[self.index].addr
    }

    pub fn set_request(&mut self, id: String) {
        self.request_id = Some(id);
    }

    /// The request ended normally on the worker: nothing to abort.
    pub fn finish(&mut self) {
        self.request_id = None;
    }

    /// Stops completion `index` of the request on the worker (it ended on a stop string; the others go on). Fire
    /// and forget: the worker answers with that completion's `Finished`.
    pub fn abort_choice(&self, index: u32) {
        let Some(id) = self.request_id.clone() else { return };
        let mut client = self.client();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                let _ = client.abort(pb::AbortRequest { request_id: id, index: Some(index) }).await;
            });
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let slot = &self.pool.workers[self.index];
        slot.inflight.fetch_sub(1, Ordering::Relaxed);
        if let Some(id) = self.request_id.take() {
            let mut client = slot.client.clone();
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _ = client.abort(pb::AbortRequest { request_id: id, index: None }).await;
                });
            }
        }
    }
}

impl WorkerPool {
    /// Connects lazily to every address (`http://host:port`).
    pub fn new(addrs: &[String]) -> Result<Self, RouterError> {
        let mut workers = Vec::with_capacity(addrs.len());
        for a in addrs {
            let endpoint = Channel::from_shared(a.clone())
                .map_err(|e| RouterError::BadWorkerAddress { addr: a.clone(), reason: e.to_string() })?
                .connect_timeout(Duration::from_secs(2));
            workers.push(WorkerSlot { addr: a.clone(), client: WorkerClient::new(endpoint.connect_lazy()), inflight: AtomicUsize::new(0) });
        }
        Ok(Self { workers: Arc::new(workers) })
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// The worker with the fewest requests in flight (ties: the first).
    pub fn pick(&self) -> Result<Lease, ApiError> {
        let (index, slot) = self
            .workers
            .iter()
            .enumerate()
            .min_by_key(|(_, w)| w.inflight.load(Ordering::Relaxed))
            .ok_or_else(|| ApiError::new(ErrorKind::Unavailable, "no workers configured"))?;
        slot.inflight.fetch_add(1, Ordering::Relaxed);
        Ok(Lease { pool: self.clone(), index, request_id: None })
    }

    /// True when at least one worker answers `Health` as healthy within a second.
    pub async fn any_ready(&self) -> bool {
        for w in self.workers.iter() {
            let mut c = w.client.clone();
            let health = tokio::time::timeout(Duration::from_secs(1), c.health(pb::HealthRequest {})).await;
            if let Ok(Ok(h)) = health
                && h.into_inner().healthy
            {
                return true;
            }
        }
        false
    }

    /// `Info` of the first worker that answers, retrying for up to `wait`.
    pub async fn info(&self, wait: Duration) -> Result<pb::WorkerInfo, RouterError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            for w in self.workers.iter() {
                let mut c = w.client.clone();
                if let Ok(Ok(i)) = tokio::time::timeout(Duration::from_secs(1), c.info(pb::InfoRequest {})).await {
                    return Ok(i.into_inner());
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(RouterError::NoWorker(wait));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Maps a worker's gRPC status to the client-facing error: a refusal's kind and field come from its structured
/// [`pb::Rejection`] details, never from the message text.
pub fn status_to_api(s: &tonic::Status) -> ApiError {
    use pb::rejection::Kind;
    let rejection = rejection_of(s);
    let param = rejection.as_ref().and_then(|r| crate::validate::openai_param(&r.field)).map(str::to_string);
    match (s.code(), rejection.map(|r| r.kind())) {
        (tonic::Code::InvalidArgument, Some(Kind::ContextLength)) => {
            ApiError { param, ..ApiError::new(ErrorKind::ContextLength, s.message()) }
        }
        (tonic::Code::InvalidArgument, _) => ApiError { param, ..ApiError::new(ErrorKind::InvalidRequest, s.message()) },
        (tonic::Code::ResourceExhausted, _) => ApiError::new(ErrorKind::RateLimited, "The server is overloaded; retry later."),
        (tonic::Code::Unavailable, _) => ApiError::new(ErrorKind::Unavailable, s.message()),
        _ => ApiError::new(ErrorKind::Internal, format!("worker: {s}")),
    }
}

#[cfg(test)]
mod tests {
    use ferrite_common::proto::rejection_status;
    use pb::rejection::Kind;

    use super::*;

    #[test]
    fn a_worker_rejection_maps_to_the_openai_param_from_its_details() {
        let e = status_to_api(&rejection_status(Kind::InvalidArgument, "max_new_tokens", "`max_new_tokens` too big"));
        assert_eq!((e.kind, e.param.as_deref()), (ErrorKind::InvalidRequest, Some("max_tokens")));
        let e = status_to_api(&rejection_status(Kind::ContextLength, "prompt_ids", "too long"));
        assert_eq!((e.kind, e.param.as_deref()), (ErrorKind::ContextLength, Some("prompt")));
        assert_eq!(status_to_api(&rejection_status(Kind::Overloaded, "", "full")).kind, ErrorKind::RateLimited);
        // The message text is never parsed: backticks without details name no field.
        let e = status_to_api(&tonic::Status::invalid_argument("`top_p` must be in (0, 1]"));
        assert_eq!((e.kind, e.param), (ErrorKind::InvalidRequest, None));
    }
}
