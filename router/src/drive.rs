//! Running one prompt on a worker: open the `Generate` stream, detokenize each choice incrementally
//! (`tokenizers::DecodeStream`, which never emits broken UTF-8), apply stop strings per choice, and turn everything
//! into [`Event`]s for the response writer. Dropping the driver (client gone) drops its [`Lease`], which aborts the
//! request on the worker.

use std::sync::Arc;
use std::time::Instant;

use ferrite_common::proto::worker as pb;
use tokio::sync::mpsc;

use crate::openai::error::{ApiError, ErrorKind};
use crate::state::AppState;
use crate::text::stop::{JailOutput, StopJail};
use crate::validate::ValidRequest;
use crate::workers::status_to_api;

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
    let mut lease = st.workers.pick(prompt, &valid.proto.cache_salt)?;
    let mut client = lease.client();
    let mut req = valid.proto.clone();
    req.request_id = request_id.clone();
    req.prompt_ids = prompt.clone();
    req.max_new_tokens = valid.max_new_tokens[p];
    lease.set_request(request_id);
    let mut stream = client.generate(req).await.map_err(|s| status_to_api(&s))?.into_inner();
    *worker = Some(lease.addr().to_string());
    if tx.send(Event::Started { worker: lease.addr().to_string() }).await.is_err() {
        return Ok(());
    }
    let text = Arc::clone(&st.text);
    if valid.echo {
        let echo = text.tokenizer.decode(prompt, false).map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
        for i in 0..n {
            if tx.send(Event::Delta { index: base + i, text: echo.clone(), logprobs: Vec::new(), received: Instant::now() }).await.is_err()
            {
                return Ok(());
            }
        }
    }
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
        tokens: u32,
        done: bool,
    }
    let mut choices: Vec<Choice<'_>> = (0..n)
        .map(|_| Choice { decode: text.tokenizer.decode_stream(true), jail: StopJail::new(&valid.stops), tokens: 0, done: false })
        .collect();
    let (mut remaining, mut completion, mut cached, mut worker_finished) = (n, 0u32, 0u32, 0u32);
    while remaining > 0 {
        let msg = match stream.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return Err(ApiError::new(ErrorKind::Internal, "the worker stream ended before the request finished")),
            Err(s) => return Err(status_to_api(&s)),
        };
        let received = Instant::now();
        match msg.kind {
            Some(pb::generate_response::Kind::Chunk(c)) => {
                if c.index == 0 {
                    cached = c.cached_prompt_tokens;
                }
                let Some(ch) = choices.get_mut(c.index as usize) else { continue };
                for (k, &tok) in c.token_ids.iter().enumerate() {
                    if ch.done {
                        break;
                    }
                    ch.tokens += 1;
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
                    let index = base + c.index;
                    let ev = match ch.jail.push(&piece) {
                        JailOutput::Emit(t) if t.is_empty() && logprobs.is_empty() => None,
                        JailOutput::Emit(t) => Some(Event::Delta { index, text: t, logprobs, received }),
                        JailOutput::Stopped { text: t, .. } => {
                            ch.done = true;
                            remaining -= 1;
                            completion += ch.tokens;
                            if remaining > 0 {
                                // The other choices go on: stop generating this one on the worker now.
                                lease.abort_choice(c.index);
                            }
                            if tx.send(Event::Delta { index, text: t, logprobs, received }).await.is_err() {
                                return Ok(());
                            }
                            Some(Event::Finish { index, reason: "stop" })
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
                if f.index == 0 {
                    cached = f.cached_tokens;
                }
                let Some(ch) = choices.get_mut(f.index as usize) else { continue };
                if ch.done {
                    continue;
                }
                ch.done = true;
                remaining -= 1;
                completion += ch.tokens;
                let index = base + f.index;
                let rest = ch.jail.flush();
                if !rest.is_empty() && tx.send(Event::Delta { index, text: rest, logprobs: Vec::new(), received }).await.is_err() {
                    return Ok(());
                }
                if tx.send(Event::Finish { index, reason: reason(f.reason) }).await.is_err() {
                    return Ok(());
                }
            }
            None => {}
        }
    }
    // Every choice is done. If some ended on a stop string the worker may still be generating: unless it reported all
    // of them finished, dropping the lease aborts the request there.
    if worker_finished == n {
        lease.finish();
    }
    let _ = tx.send(Event::Usage { prompt: prompt.len() as u32, completion, cached }).await;
    Ok(())
}
