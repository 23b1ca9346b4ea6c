//! The worker's gRPC service (`ferrite.worker.v1.Worker`): validates requests, hands them to the engine and streams
//! token ids back. The router owns text; nothing here sees a string of user content.
//!
//! `KvEvents` streams the engine's prefix-cache index changes from the shared [`KvEventLog`] (replay from the
//! client's sequence number, or a resync with a full dump), with a [`pb::LoadReport`] on every batch and at least
//! once every [`LOAD_REPORT_INTERVAL`]. Each stream is a task of its own that ends when the client goes away; it reads
//! the log under its mutex and never talks to the engine thread.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ferrite_common::hash::HASH_VERSION;
use ferrite_common::proto::worker as pb;
use ferrite_common::proto::{rejection_status, worker::rejection::Kind as RejectKind};
use ferrite_common::sampling::{MAX_N, ParamError, SamplingParams, StoppingParams};
use tokio_stream::Stream;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};
use tonic::{Request, Response, Status};

use crate::engine::constraint::{Grammar, GrammarCompiler};
use crate::engine::core::{EngineError, EngineHandle, EngineOutput, EngineRequest, EngineStats, FinishReason};
use crate::engine::scheduler::AdmissionError;
use crate::kv_events::{self, KvEventLog, KvRead};

/// A `KvEvents` stream sends a batch (with a load report) at least this often, events or not.
pub const LOAD_REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// Block hashes per live `KvEvents` batch (a resync's dump is one batch, whatever its size).
const MAX_BATCH_EVENTS: usize = 4096;

/// Static facts about the served model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub model_id: String,
    pub fingerprint: [u8; 16],
    pub block_size: u32,
    pub kv_blocks_total: u32,
    pub max_model_len: u32,
    pub vocab_size: u32,
    pub eos_ids: Vec<u32>,
    pub backend: String,
    /// Tensor-parallel ranks serving this replica.
    pub tp: u32,
}

/// How long a grammar may take to compile (llguidance's own limits bound its work; this bounds the wait).
pub const GRAMMAR_COMPILE_TIMEOUT: Duration = Duration::from_secs(10);

/// The tonic service.
#[derive(Clone)]
pub struct WorkerService {
    engine: EngineHandle,
    info: ModelInfo,
    /// The model's grammar compiler (constrained decoding); `None` when its tokenizer cannot have one.
    grammar: Option<Arc<GrammarCompiler>>,
    /// Set when the server shuts down: `KvEvents` streams (which never end by themselves) end then, so a graceful
    /// shutdown waits for the requests in flight, not for subscribed routers to hang up.
    closing: tokio::sync::watch::Sender<bool>,
}

impl WorkerService {
    pub fn new(engine: EngineHandle, info: ModelInfo, grammar: Option<Arc<GrammarCompiler>>) -> Self {
        Self { engine, info, grammar, closing: tokio::sync::watch::channel(false).0 }
    }

    /// A handle that ends the `KvEvents` streams when the server shuts down (see [`WorkerService::close_streams`]).
    pub fn closer(&self) -> tokio::sync::watch::Sender<bool> {
        self.closing.clone()
    }

    /// Compiles the request's constraint on the blocking pool (never on the engine thread or the executor), within
    /// [`GRAMMAR_COMPILE_TIMEOUT`]. Every failure is a rejection naming `constraint`.
    async fn compile(&self, c: &pb::Constraint) -> Result<Grammar, Status> {
        let reject = |m: String| rejection_status(RejectKind::InvalidArgument, "constraint", m);
        let compiler =
            self.grammar.clone().ok_or_else(|| reject("constrained decoding is not available for this model's tokenizer".into()))?;
        let c = c.clone();
        let job = tokio::task::spawn_blocking(move || compiler.compile(&c));
        match tokio::time::timeout(GRAMMAR_COMPILE_TIMEOUT, job).await {
            Ok(Ok(Ok(g))) => Ok(g),
            Ok(Ok(Err(e))) => Err(reject(format!("the grammar does not compile: {e}"))),
            Ok(Err(e)) => Err(Status::internal(format!("grammar compilation failed: {e}"))),
            Err(_) => Err(reject(format!("the grammar took more than {} s to compile", GRAMMAR_COMPILE_TIMEOUT.as_secs()))),
        }
    }

    pub fn into_server(self) -> pb::worker_server::WorkerServer<Self> {
        pb::worker_server::WorkerServer::new(self)
    }

    /// Checks a request against the model with the rules of `ferrite_common::sampling`; a rejection names the
    /// offending field in its details ([`pb::Rejection`]).
    pub fn validate(&self, r: &pb::GenerateRequest) -> Result<EngineRequest, Status> {
        let bad = |e: ParamError| rejection_status(RejectKind::InvalidArgument, e.field, e.to_string());
        let field = |f: &str, m: String| rejection_status(RejectKind::InvalidArgument, f, format!("`{f}` {m}"));
        let context = |f: &str, m: String| rejection_status(RejectKind::ContextLength, f, format!("`{f}` {m}"));
        if r.request_id.is_empty() {
            return Err(field("request_id", "must not be empty".into()));
        }
        if r.prompt_ids.is_empty() {
            return Err(field("prompt_ids", "must not be empty".into()));
        }
        let vocab = self.info.vocab_size;
        if let Some(id) = r.prompt_ids.iter().find(|&&t| t >= vocab) {
            return Err(field("prompt_ids", format!("contains token id {id}, out of range (vocab size {vocab})")));
        }
        let max_len = self.info.max_model_len as usize;
        let prompt = r.prompt_ids.len();
        if prompt >= max_len {
            return Err(context("prompt_ids", format!("has {prompt} tokens; the model's context is {max_len}")));
        }
        if prompt + r.max_new_tokens as usize > max_len {
            return Err(context(
                "max_new_tokens",
                format!("({}) + prompt ({prompt} tokens) exceeds the model's context ({max_len})", r.max_new_tokens),
            ));
        }
        if r.n > MAX_N {
            return Err(field("n", format!("must be <= {MAX_N}, got {}", r.n)));
        }
        let sampling = SamplingParams::from_proto(r.sampling.as_ref(), &r.logit_bias, r.seed);
        sampling.validate(vocab as usize).map_err(bad)?;
        let stopping = StoppingParams {
            max_new_tokens: r.max_new_tokens,
            min_tokens: r.min_tokens,
            stop_token_ids: r.stop_token_ids.clone(),
            ignore_eos: r.ignore_eos,
            logprobs: r.logprobs,
            top_logprobs: r.top_logprobs,
        };
        stopping.validate(vocab as usize).map_err(bad)?;
        Ok(EngineRequest {
            request_id: r.request_id.clone(),
            prompt: r.prompt_ids.clone(),
            sampling,
            stopping,
            n: r.n.max(1),
            cache_salt: r.cache_salt.clone(),
            constraint: None, // compiled by `generate`, off this thread
        })
    }
}

fn to_proto(out: EngineOutput) -> Result<pb::GenerateResponse, Status> {
    use pb::generate_response::Kind;
    Ok(pb::GenerateResponse {
        kind: Some(match out {
            EngineOutput::Tokens { index, tokens, logprobs, cached_prompt_tokens } => Kind::Chunk(pb::TokenChunk {
                index,
                cached_prompt_tokens,
                token_ids: tokens,
                logprobs: logprobs
                    .into_iter()
                    .map(|l| pb::TokenLogprobs {
                        logprob: l.logprob,
                        top: l.top.into_iter().map(|(token_id, logprob)| pb::TopLogprob { token_id, logprob }).collect(),
                    })
                    .collect(),
            }),
            EngineOutput::Finished { index, reason, matched_stop, prompt_tokens, completion_tokens, cached_tokens } => {
                Kind::Finished(pb::Finished {
                    index,
                    reason: match reason {
                        FinishReason::Stop => pb::FinishReason::Stop,
                        FinishReason::Length => pb::FinishReason::Length,
                        FinishReason::Abort => pb::FinishReason::Abort,
                    } as i32,
                    matched_stop_token: matched_stop,
                    prompt_tokens,
                    completion_tokens,
                    cached_tokens,
                })
            }
            EngineOutput::Rejected(EngineError::Admission(e @ AdmissionError::Overloaded { .. })) => {
                return Err(rejection_status(RejectKind::Overloaded, "", e.to_string()));
            }
            EngineOutput::Rejected(EngineError::Admission(e @ AdmissionError::TooLarge { .. })) => {
                // Name the field: a smaller `max_new_tokens` is what makes it fit.
                let msg = format!("`max_new_tokens` (with the prompt) is too large for this worker: {e}");
                return Err(rejection_status(RejectKind::ContextLength, "max_new_tokens", msg));
            }
            EngineOutput::Rejected(EngineError::Admission(e @ AdmissionError::PromptTooLong { .. })) => {
                return Err(rejection_status(RejectKind::ContextLength, "prompt_ids", e.to_string()));
            }
            EngineOutput::Rejected(EngineError::Admission(e @ AdmissionError::EmptyPrompt)) => {
                return Err(rejection_status(RejectKind::InvalidArgument, "prompt_ids", e.to_string()));
            }
            EngineOutput::Rejected(e @ EngineError::DuplicateId(_)) => return Err(Status::already_exists(e.to_string())),
            EngineOutput::Rejected(e @ EngineError::ShutDown) => return Err(Status::unavailable(e.to_string())),
            EngineOutput::Failed(msg) => return Err(Status::internal(format!("generation failed: {msg}"))),
        }),
    })
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;
type KvEventsStream = ReceiverStream<Result<pb::KvEventBatch, Status>>;

/// The engine's load now, from its published stats.
fn load_report(s: &EngineStats) -> pb::LoadReport {
    let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    pb::LoadReport {
        running: get(&s.running) as u32,
        waiting: get(&s.waiting) as u32,
        waiting_prefill_tokens: get(&s.waiting_prefill_tokens),
        kv_blocks_total: get(&s.kv_blocks_total) as u32,
        kv_blocks_used: get(&s.kv_blocks_used) as u32,
        kv_blocks_cached_free: get(&s.kv_blocks_cached_free) as u32,
    }
}

/// One `KvEvents` subscriber: a dump when `since_seq` is 0, else what the log holds after it (a resync when it
/// cannot); then whatever comes, batch by batch, or a bare load report on the tick. Ends when the client goes away.
async fn pump_kv_events(
    log: Arc<KvEventLog>,
    stats: Arc<EngineStats>,
    since_seq: u64,
    tx: tokio::sync::mpsc::Sender<Result<pb::KvEventBatch, Status>>,
    mut closing: tokio::sync::watch::Receiver<bool>,
) {
    let mut at = since_seq;
    let mut news = log.subscribe();
    let mut tick = tokio::time::interval(LOAD_REPORT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate; the first batch below stands for it
    let mut first = true;
    loop {
        news.borrow_and_update();
        // Send everything there is (the first batch even if empty: it carries the first load report).
        loop {
            let read = if first && since_seq == 0 { log.dump() } else { log.read(at, MAX_BATCH_EVENTS) };
            if !first && matches!(&read, KvRead::Events { events, .. } if events.is_empty()) {
                break;
            }
            first = false;
            let (batch, next) = kv_events::batch(read, Some(load_report(&stats)));
            at = next;
            if tx.send(Ok(batch)).await.is_err() {
                return;
            }
            tick.reset();
        }
        tokio::select! {
            changed = news.changed() => {
                if changed.is_err() {
                    return;
                }
                if log.last_seq() == at {
                    // Woken without events (`KvEventLog::touch`): the load changed; report it now.
                    let (batch, _) = kv_events::batch(KvRead::Events { first_seq: at + 1, events: Vec::new() }, Some(load_report(&stats)));
                    if tx.send(Ok(batch)).await.is_err() {
                        return;
                    }
                    tick.reset();
                }
            }
            _ = tick.tick() => {
                let (batch, _) = kv_events::batch(KvRead::Events { first_seq: at + 1, events: Vec::new() }, Some(load_report(&stats)));
                if tx.send(Ok(batch)).await.is_err() {
                    return;
                }
            }
            () = tx.closed() => return,
            // Only ever set to true (or the service is gone): either way the stream ends.
            _ = closing.changed() => return,
        }
    }
}

#[tonic::async_trait]
impl pb::worker_server::Worker for WorkerService {
    type GenerateStream = GenerateStream;
    type KvEventsStream = KvEventsStream;

    async fn kv_events(&self, request: Request<pb::KvEventsRequest>) -> Result<Response<Self::KvEventsStream>, Status> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let log = Arc::clone(&self.engine.kv_events);
        let stats = Arc::clone(&self.engine.stats);
        let closing = self.closing.subscribe();
        if *closing.borrow() {
            return Err(Status::unavailable("the worker is shutting down"));
        }
        let r = request.get_ref();
        // Numbers from another instance (this address's previous process) mean nothing here: resync.
        let since = if r.instance_id != 0 && r.instance_id != log.instance() { 0 } else { r.since_seq };
        tokio::spawn(pump_kv_events(log, stats, since, tx, closing));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn generate(&self, request: Request<pb::GenerateRequest>) -> Result<Response<Self::GenerateStream>, Status> {
        let mut req = self.validate(request.get_ref())?;
        if let Some(c) = &request.get_ref().constraint {
            req.constraint = Some(self.compile(c).await?);
        }
        let mut rx = self.engine.submit(req);
        // Admission errors become the call's status (not a stream item), so clients can retry elsewhere.
        let first = match rx.recv().await {
            Some(EngineOutput::Rejected(e)) => return Err(to_proto(EngineOutput::Rejected(e)).unwrap_err()),
            Some(first) => first,
            None => return Err(Status::unavailable("the engine has shut down")),
        };
        // Dropping this stream (client gone) drops `rx`; the engine sees the closed channel and aborts the request.
        let stream = tokio_stream::once(first).chain(UnboundedReceiverStream::new(rx)).map(to_proto);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn abort(&self, request: Request<pb::AbortRequest>) -> Result<Response<pb::AbortResponse>, Status> {
        let r = request.get_ref();
        let found = self.engine.abort(&r.request_id, r.index).await;
        Ok(Response::new(pb::AbortResponse { found }))
    }

    async fn health(&self, _: Request<pb::HealthRequest>) -> Result<Response<pb::HealthResponse>, Status> {
        let s = &self.engine.stats;
        let running = s.running.load(Ordering::Relaxed) as u32;
        let waiting = s.waiting.load(Ordering::Relaxed) as u32;
        let (healthy, age) = self.engine.liveness();
        Ok(Response::new(pb::HealthResponse {
            healthy,
            running,
            waiting,
            kv_blocks_total: s.kv_blocks_total.load(Ordering::Relaxed) as u32,
            kv_blocks_used: s.kv_blocks_used.load(Ordering::Relaxed) as u32,
            last_step_age_ms: age,
        }))
    }

    async fn info(&self, _: Request<pb::InfoRequest>) -> Result<Response<pb::WorkerInfo>, Status> {
        let i = &self.info;
        Ok(Response::new(pb::WorkerInfo {
            model_id: i.model_id.clone(),
            model_fingerprint: i.fingerprint.to_vec(),
            block_size: i.block_size,
            kv_blocks_total: i.kv_blocks_total,
            tp: i.tp,
            max_model_len: i.max_model_len,
            hash_version: HASH_VERSION,
            eos_ids: i.eos_ids.clone(),
            backend: i.backend.clone(),
            vocab_size: i.vocab_size,
            instance_id: self.engine.kv_events.instance(),
        }))
    }
}
