//! The engine thread: owns the backend, the scheduler and the samplers, and runs the step loop.
//!
//! Requests arrive over a channel with a per-request output channel. Each step: drain commands, drop requests whose
//! client went away (`tx.is_closed()`, TGI's disconnect check), schedule, run one batched forward pass, sample,
//! stream tokens, finish sequences (their blocks return to the pool at once). The loop blocks when idle.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use ferrite_common::hash::BlockHasher;
use ferrite_common::sampling::{SamplingParams, StoppingParams};
use tokio::sync::{mpsc as tmpsc, oneshot, watch};

use super::block_pool::BlockPool;
use super::sampler::{Sampler, TokenLogprob};
use super::scheduler::{AdmissionError, Scheduler, SchedulerConfig, SeqId};
use crate::backend::{Backend, BackendError, ForwardBatch, LogitsWanted, RowSampling, SeqInput};

/// A validated generation request (token ids in).
#[derive(Debug, Clone)]
pub struct EngineRequest {
    pub request_id: String,
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub stopping: StoppingParams,
    /// Completions; they share the prompt's cached blocks.
    pub n: u32,
    pub cache_salt: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    Abort,
}

/// What the engine streams back for a request.
#[derive(Debug, Clone, PartialEq)]
pub enum EngineOutput {
    Tokens { index: u32, tokens: Vec<u32>, logprobs: Vec<TokenLogprob>, cached_prompt_tokens: u32 },
    Finished { index: u32, reason: FinishReason, matched_stop: Option<u32>, prompt_tokens: u32, completion_tokens: u32, cached_tokens: u32 },
    /// The request was not run (nothing was generated).
    Rejected(EngineError),
    /// The step failed after the request started; the request is over.
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    #[error("request id `{0}` is already running")]
    DuplicateId(String),
    #[error("the engine has shut down")]
    ShutDown,
}

/// Live counters, read by health checks and metrics.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub running: AtomicU64,
    pub waiting: AtomicU64,
    pub kv_blocks_total: AtomicU64,
    pub kv_blocks_used: AtomicU64,
    pub kv_blocks_cached_free: AtomicU64,
    pub prefix_queries: AtomicU64,
    pub prefix_hits: AtomicU64,
    pub prefix_hit_tokens: AtomicU64,
    pub preemptions: AtomicU64,
    pub aborts: AtomicU64,
    pub steps: AtomicU64,
    pub batch_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Milliseconds since `started` at the end of the last step.
    pub last_step_end_ms: AtomicU64,
}

enum Command {
    Add(Box<EngineRequest>, tmpsc::UnboundedSender<EngineOutput>),
    Abort(String, Option<u32>, oneshot::Sender<bool>),
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    pub model_fingerprint: [u8; 16],
    pub eos_token_ids: Vec<u32>,
}

/// A cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    cmd: mpsc::Sender<Command>,
    pub stats: Arc<EngineStats>,
    pub started: Instant,
    /// Set once, when the engine stopped on a fatal backend error.
    fatal: watch::Receiver<Option<String>>,
}

impl EngineHandle {
    /// Submits a request; outputs arrive on the returned channel. Dropping the receiver aborts the request.
    pub fn submit(&self, req: EngineRequest) -> tmpsc::UnboundedReceiver<EngineOutput> {
        let (tx, rx) = tmpsc::unbounded_channel();
        if let Err(mpsc::SendError(Command::Add(_, tx))) = self.cmd.send(Command::Add(Box::new(req), tx)) {
            let _ = tx.send(EngineOutput::Rejected(EngineError::ShutDown));
        }
        rx
    }

    /// Aborts a request by id, or with `index` only that completion of its `n` (the router stops a choice that hit
    /// a stop string while the others go on); true if it was running or waiting.
    pub async fn abort(&self, request_id: &str, index: Option<u32>) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Command::Abort(request_id.to_string(), index, tx)).is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Resolves with the error when the engine stops on a fatal backend error (a failed device or tensor-parallel
    /// group); never resolves otherwise. The worker exits non-zero on it.
    pub async fn failed(&self) -> String {
        let mut rx = self.fatal.clone();
        let why = rx.wait_for(Option::is_some).await.ok().and_then(|why| why.clone());
        match why {
            Some(why) => why,
            // The engine ended without a fatal error (every handle dropped): nothing to report.
            None => std::future::pending().await,
        }
    }

    /// The fatal error the engine stopped on, if it did.
    pub fn fatal_error(&self) -> Option<String> {
        self.fatal.borrow().clone()
    }

    /// Milliseconds since the engine last finished a step.
    pub fn last_step_age_ms(&self) -> u64 {
        let now = self.started.elapsed().as_millis() as u64;
        now.saturating_sub(self.stats.last_step_end_ms.load(Ordering::Relaxed))
    }
}

struct SeqMeta {
    request: String,
    index: u32,
    sampler: Sampler,
    max_new_tokens: usize,
}

struct RequestState {
    tx: tmpsc::UnboundedSender<EngineOutput>,
    seqs: Vec<SeqId>,
    stopping: StoppingParams,
}

/// The engine (runs on its own thread; see [`Engine::spawn`]).
pub struct Engine {
    backend: Box<dyn Backend>,
    sched: Scheduler,
    cfg: EngineConfig,
    rx: mpsc::Receiver<Command>,
    requests: HashMap<String, RequestState>,
    seqs: HashMap<SeqId, SeqMeta>,
    next_seq: SeqId,
    stats: Arc<EngineStats>,
    started: Instant,
    scratch: Vec<f32>,
    fatal: watch::Sender<Option<String>>,
}

impl Engine {
    /// Starts the engine thread over `backend`; the KV pool is sized from the backend's blocks.
    pub fn spawn(backend: Box<dyn Backend>, cfg: EngineConfig) -> std::io::Result<EngineHandle> {
        let (tx, rx) = mpsc::channel();
        let (fatal, fatal_rx) = watch::channel(None);
        let stats = Arc::new(EngineStats::default());
        let started = Instant::now();
        let thread_stats = Arc::clone(&stats);
        // The scheduler's block pool is single-threaded (`Rc`), so the engine is built on its own thread.
        std::thread::Builder::new().name("ferrite-engine".into()).spawn(move || {
            let info = backend.info();
            let pool = BlockPool::new(info.num_kv_blocks, info.block_size);
            let hasher = BlockHasher::new(&cfg.model_fingerprint, info.block_size);
            let engine = Engine {
                sched: Scheduler::new(cfg.scheduler.clone(), pool, hasher),
                backend,
                cfg,
                rx,
                requests: HashMap::new(),
                seqs: HashMap::new(),
                next_seq: 1,
                stats: thread_stats,
                started,
                scratch: Vec::new(),
                fatal,
            };
            engine.publish();
            engine.run();
        })?;
        Ok(EngineHandle { cmd: tx, stats, started, fatal: fatal_rx })
    }

    fn run(mut self) {
        loop {
            if self.sched.is_idle() {
                match self.rx.recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(_) => return, // every handle dropped
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) if self.sched.is_idle() => return,
                    Err(TryRecvError::Disconnected) => break,
                }
            }
            self.reap_disconnected();
            let plan = self.sched.schedule();
            if plan.is_empty() {
                self.publish();
                // Nothing can run right now (copies waiting on a parent being aborted, say): wait for news.
                match self.rx.recv_timeout(Duration::from_millis(5)) {
                    Ok(cmd) => self.handle(cmd),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) if self.sched.is_idle() => return,
                    Err(RecvTimeoutError::Disconnected) => {}
                }
                continue;
            }
            if let Err(e) = self.step(&plan) {
                return self.stop_fatal(&e);
            }
            self.publish();
        }
    }

    /// A fatal backend error: every request still here fails, the stats show an empty engine, the handle's
    /// `failed()` resolves, and the thread ends (later submissions are rejected as shut down).
    fn stop_fatal(mut self, e: &BackendError) {
        tracing::error!(error = %e, "the backend failed for good; the engine stops");
        for (_, state) in self.requests.drain() {
            let _ = state.tx.send(EngineOutput::Failed(e.to_string()));
            for id in state.seqs {
                self.sched.remove(id);
                self.seqs.remove(&id);
            }
        }
        self.publish();
        self.fatal.send_replace(Some(e.to_string()));
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Add(req, tx) => self.add(*req, tx),
            Command::Abort(id, index, reply) => {
                let found = match index {
                    None => self.abort(&id),
                    Some(index) => self.abort_one(&id, index),
                };
                let _ = reply.send(found);
            }
        }
    }

    fn add(&mut self, req: EngineRequest, tx: tmpsc::UnboundedSender<EngineOutput>) {
        if self.requests.contains_key(&req.request_id) {
            let _ = tx.send(EngineOutput::Rejected(EngineError::DuplicateId(req.request_id)));
            return;
        }
        let max_len = self.cfg.scheduler.max_model_len;
        let max_new = match req.stopping.max_new_tokens {
            0 => max_len.saturating_sub(req.prompt.len()),
            m => m as usize,
        };
        let seed = req.sampling.seed.unwrap_or_else(rand::random);
        let n = req.n.max(1);
        let mut ids = Vec::with_capacity(n as usize);
        for index in 0..n {
            let id = self.next_seq;
            self.next_seq += 1;
            let wait_for = ids.first().copied();
            if let Err(e) = self.sched.add(id, req.prompt.clone(), req.prompt.len() + max_new, &req.cache_salt, wait_for) {
                for id in ids {
                    self.sched.remove(id);
                    self.seqs.remove(&id);
                }
                let _ = tx.send(EngineOutput::Rejected(e.into()));
                return;
            }
            let sampler = Sampler::new(req.sampling.clone(), &req.stopping, &self.cfg.eos_token_ids, &req.prompt, seed, index);
            self.seqs.insert(id, SeqMeta { request: req.request_id.clone(), index, sampler, max_new_tokens: max_new });
            ids.push(id);
        }
        self.requests.insert(req.request_id, RequestState { tx, seqs: ids, stopping: req.stopping });
    }

    /// Ends every sequence of a request with `Abort`. Returns whether it existed.
    fn abort(&mut self, request_id: &str) -> bool {
        let Some(state) = self.requests.remove(request_id) else { return false };
        for id in state.seqs {
            if let (Some(seq), Some(meta)) = (self.sched.remove(id), self.seqs.remove(&id)) {
                let _ = state.tx.send(EngineOutput::Finished {
                    index: meta.index,
                    reason: FinishReason::Abort,
                    matched_stop: None,
                    prompt_tokens: seq.prompt_len as u32,
                    completion_tokens: seq.num_generated() as u32,
                    cached_tokens: seq.cached_prompt_tokens as u32,
                });
            }
        }
        self.stats.aborts.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Ends completion `index` of a request with `Abort` (the request ends with its last completion).
    fn abort_one(&mut self, request_id: &str, index: u32) -> bool {
        let Some(state) = self.requests.get(request_id) else { return false };
        let Some(id) = state.seqs.iter().copied().find(|id| self.seqs.get(id).is_some_and(|m| m.index == index)) else { return false };
        self.finish(id, FinishReason::Abort, None);
        self.stats.aborts.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn reap_disconnected(&mut self) {
        let gone: Vec<String> = self.requests.iter().filter(|(_, r)| r.tx.is_closed()).map(|(id, _)| id.clone()).collect();
        for id in gone {
            tracing::debug!(request_id = %id, "client went away; aborting");
            self.abort(&id);
        }
    }

    /// Runs one step; a fatal backend error is returned (after failing the step's requests).
    fn step(&mut self, plan: &[super::scheduler::Scheduled]) -> Result<(), BackendError> {
        let batch = ForwardBatch {
            seqs: plan
                .iter()
                .map(|p| {
                    let s = self.sched.get(p.id).expect("planned sequence exists");
                    SeqInput {
                        tokens: &s.tokens[p.start..p.start + p.num_tokens],
                        start_pos: p.start,
                        block_table: s.blocks.ids(),
                        logits: if p.sample { LogitsWanted::Last } else { LogitsWanted::None },
                    }
                })
                .collect(),
        };
        // When every sampled sequence is plain greedy, the backend takes the argmax itself (on a GPU only the ids
        // cross PCIe); otherwise the logits come back for the sampler.
        let greedy = plan.iter().filter(|p| p.sample).all(|p| {
            let generated = self.sched.get(p.id).map_or(0, |s| s.num_generated());
            self.seqs.get(&p.id).is_some_and(|m| m.sampler.is_plain_greedy(generated))
        });
        // Without logprobs, the backend draws the tokens itself (same algorithm and uniforms as the host sampler).
        let on_backend = !greedy && plan.iter().filter(|p| p.sample).all(|p| self.seqs.get(&p.id).is_some_and(|m| !m.sampler.needs_logits()));
        let result = if greedy {
            self.backend.forward_greedy(&batch).map(StepOut::Ids)
        } else if on_backend {
            let rows: Vec<RowSampling> = plan
                .iter()
                .filter(|p| p.sample)
                .map(|p| {
                    let generated = self.sched.get(p.id).map_or(0, |s| s.num_generated());
                    self.seqs.get_mut(&p.id).expect("sequence metadata exists").sampler.prepare(generated)
                })
                .collect();
            self.backend.forward_sample(&batch, &rows).map(StepOut::Ids)
        } else {
            self.backend.forward(&batch).map(StepOut::Logits)
        };
        drop(batch);
        self.stats.steps.fetch_add(1, Ordering::Relaxed);
        self.stats.batch_tokens.store(plan.iter().map(|p| p.num_tokens as u64).sum(), Ordering::Relaxed);
        let out = match result {
            Ok(o) => o,
            Err(e) => {
                self.fail_step(plan, &e);
                return if e.is_fatal() { Err(e) } else { Ok(()) };
            }
        };
        self.sched.complete(plan);
        let mut greedy_ids = match &out {
            StepOut::Ids(ids) => ids.iter().copied(),
            StepOut::Logits(_) => [].iter().copied(),
        };
        for (i, p) in plan.iter().enumerate() {
            if !p.sample {
                continue;
            }
            let meta = self.seqs.get_mut(&p.id).expect("sequence metadata exists");
            let generated = self.sched.get(p.id).map_or(0, |s| s.num_generated());
            let (tok, lp) = match &out {
                StepOut::Ids(_) => {
                    let Some(tok) = greedy_ids.next() else { continue };
                    (tok, None)
                }
                StepOut::Logits(logits) => {
                    let Some(row) = logits.last(i) else { continue };
                    self.scratch.clear();
                    self.scratch.extend_from_slice(row);
                    meta.sampler.sample(&mut self.scratch, generated)
                }
            };
            meta.sampler.record(tok);
            self.sched.append_token(p.id, tok);
            self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
            let (index, request) = (meta.index, meta.request.clone());
            let max_new = meta.max_new_tokens;
            let Some(state) = self.requests.get(&request) else { continue };
            let seq = self.sched.get(p.id).expect("exists");
            let cached_prompt_tokens = seq.cached_prompt_tokens as u32;
            let _ = state.tx.send(EngineOutput::Tokens { index, tokens: vec![tok], logprobs: lp.into_iter().collect(), cached_prompt_tokens });
            let generated = seq.num_generated();
            let stop = &state.stopping;
            let reason = if generated >= stop.min_tokens as usize
                && ((!stop.ignore_eos && self.cfg.eos_token_ids.contains(&tok)) || stop.stop_token_ids.contains(&tok))
            {
                Some((FinishReason::Stop, Some(tok)))
            } else if generated >= max_new || seq.tokens.len() >= self.cfg.scheduler.max_model_len {
                Some((FinishReason::Length, None))
            } else {
                None
            };
            if let Some((reason, matched_stop)) = reason {
                self.finish(p.id, reason, matched_stop);
            }
        }
        Ok(())
    }

    fn finish(&mut self, id: SeqId, reason: FinishReason, matched_stop: Option<u32>) {
        let (Some(seq), Some(meta)) = (self.sched.remove(id), self.seqs.remove(&id)) else { return };
        let Some(state) = self.requests.get_mut(&meta.request) else { return };
        let _ = state.tx.send(EngineOutput::Finished {
            index: meta.index,
            reason,
            matched_stop,
            prompt_tokens: seq.prompt_len as u32,
            completion_tokens: seq.num_generated() as u32,
            cached_tokens: seq.cached_prompt_tokens as u32,
        });
        self.stats.prefix_hit_tokens.fetch_add(seq.cached_prompt_tokens as u64, Ordering::Relaxed);
        state.seqs.retain(|&s| s != id);
        if state.seqs.is_empty() {
            self.requests.remove(&meta.request);
        }
    }

    /// A failed forward pass ends every request in the step (nothing was written to the KV cache).
    fn fail_step(&mut self, plan: &[super::scheduler::Scheduled], e: &BackendError) {
        tracing::error!(error = %e, "forward pass failed");
        let requests: Vec<String> = plan.iter().filter_map(|p| self.seqs.get(&p.id)).map(|m| m.request.clone()).collect();
        for r in requests {
            if let Some(state) = self.requests.remove(&r) {
                let _ = state.tx.send(EngineOutput::Failed(e.to_string()));
                for id in state.seqs {
                    self.sched.remove(id);
                    self.seqs.remove(&id);
                }
            }
        }
    }

    fn publish(&self) {
        let s = &self.stats;
        let u = self.sched.usage();
        let (q, h) = self.sched.prefix_stats();
        s.running.store(self.sched.num_running() as u64, Ordering::Relaxed);
        s.waiting.store(self.sched.num_waiting() as u64, Ordering::Relaxed);
        s.kv_blocks_total.store(u.total as u64, Ordering::Relaxed);
        s.kv_blocks_used.store(u.in_use as u64, Ordering::Relaxed);
        s.kv_blocks_cached_free.store(u.cached_free as u64, Ordering::Relaxed);
        s.prefix_queries.store(q, Ordering::Relaxed);
        s.prefix_hits.store(h, Ordering::Relaxed);
        s.preemptions.store(self.sched.preemptions, Ordering::Relaxed);
        s.last_step_end_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// What a step's forward pass returned: greedy ids (taken by the backend) or logits for the sampler.
enum StepOut {
    Ids(Vec<u32>),
    Logits(crate::backend::Logits),
}
