//! Running one prompt on a worker: open the `Generate` stream, detokenize each choice incrementally
//! (`tokenizers::DecodeStream`, which never emits broken UTF-8), apply stop strings per choice, and turn everything
//! into [`Event`]s for the response writer. Dropping the driver (client gone) drops its [`Lease`], which aborts the
//! request on the worker.
//!
//! Failures of the worker (design doc §7):
//! - **Before the first message** (connect error, `Unavailable`, a stream that ends or resets before anything came,
//!   an overloaded worker): the request goes to the next-best eligible worker, at most [`MAX_RETRIES`] more times,
//!   after a jittered backoff; the failure counts for the worker's circuit breaker. The client sees nothing of it.
//!   A refusal that is the request's fault (`InvalidArgument`, ...) is never retried.
//! - **After it** (a stream error, or an end without `Finished`): the stream *migrates* — the prompt plus the tokens
//!   generated so far go to another worker with the remaining `max_new_tokens` (and `min_tokens`), and its tokens
//!   feed the same detokenizer and stop-string jail, so the client sees one uninterrupted stream; usage counts the
//!   original prompt and every completion token. At most the pool's migration limit times; past it, or with no
//!   worker left, the stream ends with the OpenAI error event. Greedy output is the same as without the failure
//!   (the CPU backend is batch invariant: a prefilled token gives the logits its decode step gave); sampled output
//!   continues with the same seed, so it is a valid sample but not the one the first worker would have drawn, and
//!   presence/frequency penalties then count the migrated tokens as prompt. With `n > 1` a stream migrates only
//!   when one completion is left unfinished (each unfinished one would need its own request); otherwise it ends
//!   with the error event.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrite_common::proto::worker as pb;
use tokio::sync::mpsc;
use tonic::Streaming;

use crate::kv_index::WorkerId;
use crate::openai::error::{ApiError, ErrorKind};
use crate::state::AppState;
use crate::text::stop::{JailOutput, StopJail};
use crate::validate::ValidRequest;
use crate::workers::{Failure, Lease, classify, status_to_api};

/// Retries before the first message, on other workers.
pub const MAX_RETRIES: usize = 2;
/// The first retry's backoff (doubling, ±50 % jitter).
const RETRY_BACKOFF: Duration = Duration::from_millis(20);

/// Logprob of one generated token (ids; the writer turns them into text).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

/// What a driver reports. `index` is the choice's index in the response (prompt × n + completion).
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The first message arrived from the worker (the response can start).
    Started {
        worker: String,
    },
    /// `received`: when the worker message carrying it arrived (router latency is measured from there).
    Delta {
        index: u32,
        text: String,
        logprobs: Vec<TokenLogprob>,
        received: Instant,
    },
    Finish {
        index: u32,
        reason: &'static str,
    },
    Usage {
        prompt: u32,
        completion: u32,
        cached: u32,
    },
    Error(ApiError),
}

/// A choice's end, counted by reason.
fn finish(st: &AppState, index: u32, reason: &'static str) -> Event {
    st.metrics.finished.with_label_values(&[reason]).inc();
    Event::Finish { index, reason }
}

fn reason(r: i32) -> &'static str {
    match pb::FinishReason::try_from(r) {
        Ok(pb::FinishReason::Stop) => "stop",
        Ok(pb::FinishReason::Length) => "length",
        _ => "abort",
    }
}

/// Runs prompt `p` of `valid` and sends its events; returns when the prompt is done or the receiver is gone.
///
/// An error after the worker answered ends a stream mid-way (the client sees an SSE error event, never an HTTP
/// status): it is logged here, once, with the request id and the worker. An error before that becomes the
/// response's status, logged where the response is made.
pub async fn drive_prompt(st: Arc<AppState>, valid: Arc<ValidRequest>, p: usize, request_id: String, tx: mpsc::Sender<Event>) {
    let mut worker = None;
    if let Err(e) = drive(&st, &valid, p, request_id.clone(), &tx, &mut worker).await {
        if let Some(worker) = worker.as_deref() {
            tracing::error!(request_id = %request_id, prompt = p, worker, error = %e, "request failed after the worker answered");
        }
        let _ = tx.send(Event::Error(e)).await;
    }
}

fn jitter(base: Duration, attempt: usize) -> Duration {
    base.mul_f64((1u64 << attempt.min(10)) as f64 * rand::random_range(0.5..1.5))
}

/// Picks a worker; with none eligible but one that has just joined and is still being checked (a worker the raft
/// control plane has just made active, say), waits for it a little (polling, at most
/// [`crate::workers::JOIN_GRACE`] after it joined) instead of answering 503 at once.
async fn pick_or_wait(st: &AppState, req: &pb::GenerateRequest, tried: &[WorkerId]) -> Result<Lease, ApiError> {
    loop {
        match st.workers.pick(&req.prompt_ids, &req.cache_salt, tried) {
            Err(ref e) if e.kind == ErrorKind::Unavailable && st.workers.joining(tried) => {
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            other => return other,
        }
    }
}

/// Sends `req` to the best eligible worker not in `tried` and waits for its first message; on a worker failure
/// tries the next-best one (at most [`MAX_RETRIES`] more). Failed workers are added to `tried`.
async fn open(
    st: &AppState,
    req: &pb::GenerateRequest,
    tried: &mut Vec<WorkerId>,
) -> Result<(Lease, Streaming<pb::GenerateResponse>, pb::GenerateResponse), ApiError> {
    let mut last: Option<ApiError> = None;
    for attempt in 0..=MAX_RETRIES {
        if attempt > 0 {
            tokio::time::sleep(jitter(RETRY_BACKOFF, attempt - 1)).await;
        }
        let mut lease = match pick_or_wait(st, req, tried).await {
            Ok(l) => l,
            Err(e) => return Err(last.unwrap_or(e)),
        };
        if attempt > 0 {
            st.workers.metrics().retry();
        }
        lease.set_request(req.request_id.clone());
        let mut client = lease.client();
        let opened = async {
            let mut stream = client.generate(req.clone()).await?.into_inner();
            let first = stream.message().await?;
            Ok::<_, tonic::Status>((stream, first))
        }
        .await;
        let status = match opened {
            Ok((stream, Some(first))) => {
                lease.succeeded();
                lease.first_token();
                if let (Some(predicted), Some(pb::generate_response::Kind::Chunk(c))) = (lease.predicted_cached(), &first.kind) {
                    st.workers.metrics().overlap_error(predicted, c.cached_prompt_tokens);
                }
                return Ok((lease, stream, first));
            }
            Ok((_, None)) => tonic::Status::unknown("the worker stream ended before its first message"),
            Err(s) => s,
        };
        match classify(&status) {
            Failure::Client => {
                lease.succeeded();
                lease.finish();
                return Err(status_to_api(&status));
            }
            Failure::Overloaded => lease.finish(),
            Failure::Worker { hard } => {
                tracing::warn!(request_id = %req.request_id, worker = lease.addr(), error = %status, attempt, "worker failed before the first token");
                lease.failed(hard);
            }
        }
        tried.push(lease.worker_id());
        last = Some(status_to_api(&status));
    }
    Err(last.unwrap_or_else(|| ApiError::new(ErrorKind::Unavailable, "no worker is available")))
}

/// How a worker stream ended early.
struct Lost {
    hard: bool,
    reason: String,
}

async fn drive(
    st: &AppState,
    valid: &ValidRequest,
    p: usize,
    request_id: String,
    tx: &mpsc::Sender<Event>,
    worker: &mut Option<String>,
) -> Result<(), ApiError> {
    let prompt = &valid.prompts[p];
    let n = valid.n;
    let base = p as u32 * n;
    let text = Arc::clone(&st.text);
    struct Choice<'t> {
        decode: tokenizers::DecodeStream<
            't,
            tokenizers::ModelWrapper,
            tokenizers::NormalizerWrapper,
            tokenizers::PreTokenizerWrapper,
            tokenizers::PostProcessorWrapper,
            tokenizers::DecoderWrapper,
        >,
        jail: StopJail,
        /// Generated token ids (what a migration re-sends).
        tokens: Vec<u32>,
        done: bool,
        /// When its last chunk arrived (inter-token latency).
        last: Option<Instant>,
    }
    let mut choices: Vec<Choice<'_>> = (0..n)
        .map(|_| Choice {
            decode: text.tokenizer.decode_stream(true),
            jail: StopJail::new(&valid.stops),
            tokens: Vec::new(),
            done: false,
            last: None,
        })
        .collect();
    let mut req = valid.proto.clone();
    req.request_id = request_id.clone();
    req.prompt_ids = prompt.clone();
    req.max_new_tokens = valid.max_new_tokens[p];
    let (mut remaining, mut cached) = (n, 0u32);
    // The worker's completion index → the choice's (identity, or the one choice a migration carries on).
    let mut map: Vec<usize> = (0..n as usize).collect();
    let (mut tried, mut migrations) = (Vec::new(), 0u32);
    loop {
        let (mut lease, mut stream, first) = open(st, &req, &mut tried).await?;
        if worker.is_none() {
            *worker = Some(lease.addr().to_string());
            if tx.send(Event::Started { worker: lease.addr().to_string() }).await.is_err() {
                return Ok(());
            }
            if valid.echo {
                let echo = text.tokenizer.decode(prompt, false).map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
                for i in 0..n {
                    let ev = Event::Delta { index: base + i, text: echo.clone(), logprobs: Vec::new(), received: Instant::now() };
                    if tx.send(ev).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
        let mut next = Some(first);
        let mut worker_finished = 0usize;
        let lost = loop {
            if remaining == 0 {
                break None;
            }
            let msg = match next.take() {
                Some(m) => m,
                None => match stream.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break Some(Lost { hard: false, reason: "the worker stream ended before the request finished".into() }),
                    Err(s) => match classify(&s) {
                        Failure::Worker { hard } => break Some(Lost { hard, reason: s.to_string() }),
                        _ => return Err(status_to_api(&s)),
                    },
                },
            };
            let received = Instant::now();
            match msg.kind {
                Some(pb::generate_response::Kind::Chunk(c)) => {
                    if c.index == 0 && migrations == 0 {
                        cached = c.cached_prompt_tokens;
                    }
                    let Some(&ci) = map.get(c.index as usize) else { continue };
                    let ch = &mut choices[ci];
                    if let Some(prev) = ch.last.replace(received)
                        && !ch.done
                    {
                        st.metrics.itl.observe(received.duration_since(prev).as_secs_f64());
                    }
                    for (k, &tok) in c.token_ids.iter().enumerate() {
                        if ch.done {
                            break;
                        }
                        ch.tokens.push(tok);
                        let logprobs: Vec<TokenLogprob> = c
                            .logprobs
                            .get(k)
                            .map(|l| TokenLogprob {
                                token: tok,
                                logprob: l.logprob,
                                top: l.top.iter().map(|t| (t.token_id, t.logprob)).collect(),
                            })
                            .into_iter()
                            .collect();
                        let piece = ch.decode.step(tok).ok().flatten().unwrap_or_default();
                        let index = base + ci as u32;
                        let ev = match ch.jail.push(&piece) {
                            JailOutput::Emit(t) if t.is_empty() && logprobs.is_empty() => None,
                            JailOutput::Emit(t) => Some(Event::Delta { index, text: t, logprobs, received }),
                            JailOutput::Stopped { text: t, .. } => {
                                ch.done = true;
                                remaining -= 1;
                                if remaining > 0 {
                                    // The other choices go on: stop generating this one on the worker now.
                                    lease.abort_choice(c.index);
                                }
                                if tx.send(Event::Delta { index, text: t, logprobs, received }).await.is_err() {
                                    return Ok(());
                                }
                                Some(finish(st, index, "stop"))
                            }
                        };
                        if let Some(ev) = ev
                            && tx.send(ev).await.is_err()
                        {
                            return Ok(());
                        }
                    }
                }
                Some(pb::generate_response::Kind::Finished(f)) => {
                    worker_finished += 1;
                    if f.index == 0 && migrations == 0 {
                        cached = f.cached_tokens;
                    }
                    let Some(&ci) = map.get(f.index as usize) else { continue };
                    let ch = &mut choices[ci];
                    if ch.done {
                        continue;
                    }
                    ch.done = true;
                    remaining -= 1;
                    let index = base + ci as u32;
                    let rest = ch.jail.flush();
                    if !rest.is_empty() && tx.send(Event::Delta { index, text: rest, logprobs: Vec::new(), received }).await.is_err() {
                        return Ok(());
                    }
                    if tx.send(finish(st, index, reason(f.reason))).await.is_err() {
                        return Ok(());
                    }
                }
                None => {}
            }
        };
        let Some(lost) = lost else {
            // Every choice is done. If some ended on a stop string the worker may still be generating: unless it
            // reported all of them finished, dropping the lease aborts the request there.
            if worker_finished == map.len() {
                lease.finish();
            }
            break;
        };
        // The worker failed mid-stream: migrate the one unfinished choice, or end with the error event.
        lease.failed(lost.hard);
        tried.push(lease.worker_id());
        let addr = lease.addr().to_string();
        drop(lease);
        let unfinished: Vec<usize> = (0..choices.len()).filter(|&i| !choices[i].done).collect();
        let fail = |why: &str| {
            st.workers.metrics().migration("failed");
            tracing::warn!(request_id = %request_id, worker = %addr, error = %lost.reason, why, "stream lost");
            ApiError::new(ErrorKind::Unavailable, format!("the worker serving this stream failed ({})", lost.reason))
        };
        let [ci] = unfinished[..] else { return Err(fail("several completions unfinished: not migrated")) };
        if migrations >= st.workers.migration_limit() {
            return Err(fail("past the migration limit"));
        }
        migrations += 1;
        let done = choices[ci].tokens.len() as u32;
        let budget = valid.max_new_tokens[p];
        if budget > 0 && done >= budget {
            // Every token was generated; only the worker's `Finished` was lost.
            let rest = choices[ci].jail.flush();
            let index = base + ci as u32;
            if !rest.is_empty()
                && tx.send(Event::Delta { index, text: rest, logprobs: Vec::new(), received: Instant::now() }).await.is_err()
            {
                return Ok(());
            }
            if tx.send(finish(st, index, "length")).await.is_err() {
                return Ok(());
            }
            break;
        }
        tracing::info!(request_id = %request_id, worker = %addr, error = %lost.reason, generated = done, migration = migrations, "worker lost mid-stream: migrating");
        st.workers.metrics().migration("migrated");
        req = valid.proto.clone();
        req.request_id = format!("{request_id}-m{migrations}");
        req.prompt_ids = prompt.iter().chain(&choices[ci].tokens).copied().collect();
        req.max_new_tokens = if budget == 0 { 0 } else { budget - done };
        req.min_tokens = req.min_tokens.saturating_sub(done);
        req.n = 1;
        map = vec![ci];
    }
    let completion = choices.iter().map(|c| c.tokens.len() as u32).sum();
    let m = &st.metrics;
    m.prompt_tokens.inc_by(prompt.len() as u64);
    m.cached_prompt_tokens.inc_by(u64::from(cached));
    m.generated_tokens.inc_by(u64::from(completion));
    let _ = tx.send(Event::Usage { prompt: prompt.len() as u32, completion, cached }).await;
    Ok(())
}
