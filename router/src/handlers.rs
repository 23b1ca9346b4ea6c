//! `POST /v1/completions` and `POST /v1/chat/completions`: parse, resolve the model, template and tokenize (off the
//! async executor), validate, fan out one driver per prompt, then answer as one JSON body or as SSE chunks.
//!
//! Streaming waits for the first worker message before sending headers, so errors before any token are proper HTTP
//! errors; an error after that is a final `data: {"error": ...}` event without `[DONE]` (openai-python raises it).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderValue;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::drive::{Event, TokenLogprob, drive_prompt};
use crate::openai::error::{ApiError, ErrorKind};
use crate::openai::tools::{self, ToolSet};
use crate::openai::types::*;
use crate::state::AppState;
use crate::validate::{LogprobsMode, ValidRequest, validate};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Completions,
    Chat,
}

impl Endpoint {
    fn label(self) -> &'static str {
        match self {
            Endpoint::Completions => "completions",
            Endpoint::Chat => "chat_completions",
        }
    }
}

fn parse<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = body.map_err(|e| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(ErrorKind::PayloadTooLarge, "The request body is too large.")
        } else {
            ApiError::new(ErrorKind::InvalidRequest, format!("Could not read the request body: {e}"))
        }
    })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::new(ErrorKind::InvalidRequest, format!("Invalid request body: {e}")).with_code("invalid_json"))
}

/// Prompts up to this many bytes are tokenized on the request's own task (tens of microseconds; the hop to the
/// blocking pool cost more under load: request preparation p50 0.25 ms instead of 1 ms at 16 streams, BENCHMARKS.md);
/// longer ones on the blocking pool, so they never stall the executor.
const INLINE_TOKENIZE_BYTES: usize = 4096;

async fn tokenize(st: &AppState, text: String, add_special: bool) -> Result<Vec<u32>, ApiError> {
    let encode = move |assets: &ferrite_common::text::TextAssets, text: &str| {
        assets.tokenizer.encode(text, add_special).map(|e| e.get_ids().to_vec())
    };
    let ids = if text.len() <= INLINE_TOKENIZE_BYTES {
        encode(&st.text, &text)
    } else {
        let assets = Arc::clone(&st.text);
        tokio::task::spawn_blocking(move || encode(&assets, &text)).await.map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?
    };
    ids.map_err(|e| ApiError::invalid("prompt", format!("could not tokenize the prompt: {e}")))
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn request_id(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{prefix}-{:x}{:08x}", n, nanos ^ std::process::id())
}

pub async fn completions(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let t0 = Instant::now();
    let resp = match completions_inner(&st, body, t0).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    record(&st, Endpoint::Completions, &resp, t0);
    resp
}

pub async fn chat_completions(State(st): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    let t0 = Instant::now();
    let resp = match chat_inner(&st, body, t0).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    record(&st, Endpoint::Chat, &resp, t0);
    resp
}

/// Marks a streaming response: its end-to-end latency is recorded when the stream ends, not here.
#[derive(Clone, Copy)]
struct Streaming;

fn record(st: &AppState, ep: Endpoint, resp: &Response, t0: Instant) {
    st.metrics.requests.with_label_values(&[ep.label(), resp.status().as_str()]).inc();
    if resp.extensions().get::<Streaming>().is_none() {
        st.metrics.e2e.with_label_values(&[ep.label()]).observe(t0.elapsed().as_secs_f64());
    }
}

async fn completions_inner(st: &Arc<AppState>, body: Result<Bytes, BytesRejection>, t0: Instant) -> Result<Response, ApiError> {
    let req: CompletionRequest = parse(body)?;
    let model = st.resolve_model(&req.model)?;
    let prompts = match req.prompt {
        Prompt::Text(s) => vec![tokenize(st, s, true).await?],
        Prompt::Texts(v) => {
            let mut out = Vec::with_capacity(v.len());
            for s in v {
                out.push(tokenize(st, s, true).await?);
            }
            out
        }
        Prompt::Tokens(t) => vec![t],
        Prompt::TokenLists(v) => v,
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid("prompt", "`prompt` must not be empty"));
    }
    let logprobs = req.logprobs.map_or(LogprobsMode::None, LogprobsMode::Completion);
    let valid = validate(req.common, prompts, Some(req.max_tokens.unwrap_or(16)), |_| 16, logprobs, req.echo, st.limits)?;
    run(st, valid, model, Endpoint::Completions, t0).await
}

fn flatten(c: Option<Content>) -> String {
    match c {
        None => String::new(),
        Some(Content::Text(s)) => s,
        Some(Content::Parts(parts)) => parts.into_iter().filter(|p| p.kind == "text").filter_map(|p| p.text).collect::<Vec<_>>().join(""),
    }
}

async fn chat_inner(st: &Arc<AppState>, body: Result<Bytes, BytesRejection>, t0: Instant) -> Result<Response, ApiError> {
    let req: ChatCompletionRequest = parse(body)?;
    let model = st.resolve_model(&req.model)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages", "`messages` must not be empty"));
    }
    let template = st.text.chat_template.as_ref().ok_or_else(|| ApiError::invalid("messages", "this model has no chat template"))?;
    req.extras.check()?;
    let format = st.config.tool_call_parser.format(template.source());
    let tools = ToolSet::from_request(&req.extras, format)?.map(Arc::new);
    let native = template.uses_tools();
    let mut messages = Vec::with_capacity(req.messages.len() + 1);
    for m in &req.messages {
        let role = crate::openai::fields::template_role(&m.role)?;
        messages.push(tools::template_message(role, flatten(m.content.clone()), m, format, native)?);
    }
    if let Some(t) = tools.as_deref().filter(|_| !native) {
        tools::add_system_prompt(&mut messages, t.system_prompt());
    }
    let template_tools = tools.as_deref().filter(|_| native).map(|t| &t.tools_json);
    let prompt = template.render_with_tools(&messages, template_tools, true).map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    // The template already wrote any BOS/special tokens.
    let ids = tokenize(st, prompt, false).await?;
    let logprobs = if req.logprobs { LogprobsMode::Chat(req.top_logprobs.unwrap_or(0)) } else { LogprobsMode::None };
    if req.top_logprobs.is_some_and(|k| k > 0) && !req.logprobs {
        return Err(ApiError::invalid("top_logprobs", "`top_logprobs` requires `logprobs: true`"));
    }
    let max_model_len = st.limits.max_model_len;
    let max_tokens = req.max_completion_tokens.or(req.max_tokens);
    let mut valid = validate(req.common, vec![ids], max_tokens, |p| max_model_len.saturating_sub(p) as u32, logprobs, false, st.limits)?;
    if let Some(grammar) = tools.as_ref().and_then(|t| t.grammar()) {
        if valid.proto.constraint.is_some() {
            return Err(ApiError::invalid("tool_choice", "a forced tool call cannot be combined with `response_format`"));
        }
        valid.proto.constraint = Some(grammar);
        valid.constraint_field = Some("tool_choice");
    }
    valid.tools = tools;
    run(st, valid, model, Endpoint::Chat, t0).await
}

/// Starts one driver per prompt; all send into one channel.
fn spawn_drivers(st: &Arc<AppState>, valid: &Arc<ValidRequest>, id: &str) -> mpsc::Receiver<Event> {
    let (tx, rx) = mpsc::channel(256);
    for p in 0..valid.prompts.len() {
        tokio::spawn(drive_prompt(Arc::clone(st), Arc::clone(valid), p, format!("{id}-{p}"), tx.clone()));
    }
    rx
}

async fn run(st: &Arc<AppState>, valid: ValidRequest, model: String, ep: Endpoint, arrived: Instant) -> Result<Response, ApiError> {
    let permit = Arc::clone(&st.permits)
        .try_acquire_owned()
        .map_err(|_| ApiError::new(ErrorKind::RateLimited, "Too many requests in flight; retry later."))?;
    let valid = Arc::new(valid);
    let id = request_id(if ep == Endpoint::Chat { "chatcmpl" } else { "cmpl" });
    st.metrics.prepare.with_label_values(&[ep.label()]).observe(arrived.elapsed().as_secs_f64());
    let t0 = Instant::now();
    let mut rx = spawn_drivers(st, &valid, &id);
    let writer = Writer { st: Arc::clone(st), valid: Arc::clone(&valid), id, model, created: now(), ep };
    if !valid.stream {
        let resp = writer.collect(&mut rx).await;
        drop(permit);
        return resp;
    }
    let mut workers = Vec::new();
    // Wait for every prompt to start (or the first error) before sending headers. Prompts that started already send
    // their tokens meanwhile: keep them for the stream.
    let mut started = 0;
    let mut early = Vec::new();
    while started < valid.prompts.len() {
        match rx.recv().await {
            Some(Event::Started { worker }) => {
                started += 1;
                workers.push(worker);
            }
            Some(Event::Error(e)) => return Err(valid.name_constraint(e)),
            Some(ev) => early.push(ev),
            None => return Err(ApiError::new(ErrorKind::Internal, "the request ended before it started")),
        }
    }
    st.metrics.ttft.with_label_values(&[ep.label()]).observe(t0.elapsed().as_secs_f64());
    let (out_tx, out_rx) = mpsc::channel::<Result<SseEvent, Infallible>>(64);
    let st2 = Arc::clone(st);
    tokio::spawn(async move {
        writer.stream(early, rx, out_tx).await;
        st2.metrics.e2e.with_label_values(&[ep.label()]).observe(t0.elapsed().as_secs_f64());
        drop(permit);
    });
    let mut resp = Sse::new(ReceiverStream::new(out_rx)).keep_alive(KeepAlive::default()).into_response();
    resp.extensions_mut().insert(Streaming);
    set_worker_header(&mut resp, &workers);
    Ok(resp)
}

/// The response header naming the worker(s) that served a request (comma-separated, one per prompt).
pub const WORKER_HEADER: &str = "x-ferrite-worker";

fn set_worker_header(resp: &mut Response, workers: &[String]) {
    if let Ok(v) = HeaderValue::from_str(&workers.join(",")) {
        resp.headers_mut().insert(WORKER_HEADER, v);
    }
}

struct Writer {
    st: Arc<AppState>,
    valid: Arc<ValidRequest>,
    id: String,
    model: String,
    created: u64,
    ep: Endpoint,
}

/// Per-choice accumulation for non-streaming answers.
#[derive(Default, Clone)]
struct Acc {
    text: String,
    lps: Vec<TokenLogprob>,
    finish: Option<&'static str>,
    /// Bytes of `text` already streamed (chat with tools).
    sent: usize,
}

impl Writer {
    fn total_choices(&self) -> usize {
        self.valid.prompts.len() * self.valid.n as usize
    }

    fn token_text(&self, id: u32) -> String {
        self.st.text.tokenizer.decode(&[id], false).unwrap_or_default()
    }

    fn completion_logprobs(&self, lps: &[TokenLogprob], offset: &mut u32) -> CompletionLogprobs {
        let mut out = CompletionLogprobs::default();
        for l in lps {
            let tok = self.token_text(l.token);
            out.text_offset.push(*offset);
            *offset += tok.len() as u32;
            out.tokens.push(tok);
            out.token_logprobs.push(l.logprob);
            out.top_logprobs.push(l.top.iter().map(|&(id, lp)| (self.token_text(id), lp)).collect::<HashMap<_, _>>());
        }
        out
    }

    fn chat_logprobs(&self, lps: &[TokenLogprob]) -> ChatLogprobs {
        ChatLogprobs {
            content: lps
                .iter()
                .map(|l| {
                    let tok = self.token_text(l.token);
                    ChatTokenLogprob {
                        bytes: tok.as_bytes().to_vec(),
                        token: tok,
                        logprob: l.logprob,
                        top_logprobs: l
                            .top
                            .iter()
                            .map(|&(id, lp)| {
                                let t = self.token_text(id);
                                ChatTopLogprob { bytes: t.as_bytes().to_vec(), token: t, logprob: lp }
                            })
                            .collect(),
                    }
                })
                .collect(),
        }
    }

    /// A finished chat choice: its text, or the tool calls parsed from it (finish reason `tool_calls`).
    fn chat_message(&self, text: String, finish: Option<&'static str>) -> (Option<String>, Option<Vec<ToolCallOut>>, Option<&'static str>) {
        let Some((content, calls)) = self.valid.tools.as_ref().and_then(|t| t.parse(&text)) else {
            return (Some(text), None, finish);
        };
        let calls = calls
            .into_iter()
            .map(|c| ToolCallOut {
                id: request_id("call"),
                kind: "function",
                function: FunctionOut { name: c.name, arguments: c.arguments },
            })
            .collect();
        (content, Some(calls), Some("tool_calls"))
    }

    fn wants_logprobs(&self) -> bool {
        self.valid.logprobs != LogprobsMode::None
    }

    async fn collect(&self, rx: &mut mpsc::Receiver<Event>) -> Result<Response, ApiError> {
        let mut acc = vec![Acc::default(); self.total_choices()];
        let mut workers = Vec::new();
        let mut usage = Usage::default();
        while let Some(ev) = rx.recv().await {
            match ev {
                Event::Started { worker } => workers.push(worker),
                Event::Delta { index, text, logprobs, .. } => {
                    let a = &mut acc[index as usize];
                    a.text.push_str(&text);
                    a.lps.extend(logprobs);
                }
                Event::Finish { index, reason } => acc[index as usize].finish = Some(reason),
                Event::Usage { prompt, completion, cached } => {
                    usage.prompt_tokens += prompt;
                    usage.completion_tokens += completion;
                    usage.prompt_tokens_details.cached_tokens += cached;
                }
                Event::Error(e) => return Err(self.valid.name_constraint(e)),
            }
        }
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
        let mut resp = match self.ep {
            Endpoint::Completions => Json(CompletionResponse {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                choices: acc
                    .into_iter()
                    .enumerate()
                    .map(|(i, a)| CompletionChoice {
                        index: i as u32,
                        logprobs: self.wants_logprobs().then(|| self.completion_logprobs(&a.lps, &mut 0)),
                        text: a.text,
                        finish_reason: a.finish,
                    })
                    .collect(),
                usage: Some(usage),
            })
            .into_response(),
            Endpoint::Chat => Json(ChatCompletionResponse {
                id: self.id.clone(),
                object: "chat.completion",
                created: self.created,
                model: self.model.clone(),
                choices: acc
                    .into_iter()
                    .enumerate()
                    .map(|(i, a)| {
                        let (content, tool_calls, finish_reason) = self.chat_message(a.text, a.finish);
                        ChatChoice {
                            index: i as u32,
                            logprobs: self.wants_logprobs().then(|| self.chat_logprobs(&a.lps)),
                            message: ChatMessageOut { role: "assistant", content, tool_calls },
                            finish_reason,
                        }
                    })
                    .collect(),
                usage,
            })
            .into_response(),
        };
        set_worker_header(&mut resp, &workers);
        Ok(resp)
    }

    fn chunk<T: Serialize>(value: &T) -> Result<SseEvent, Infallible> {
        Ok(SseEvent::default().data(serde_json::to_string(value).unwrap_or_default()))
    }

    fn chat_chunk(&self, choices: Vec<ChatChunkChoice>, usage: Option<Usage>) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        }
    }

    fn completion_chunk(&self, choices: Vec<CompletionChoice>, usage: Option<Usage>) -> CompletionResponse {
        CompletionResponse {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        }
    }

    /// Turns events (first `early`, received before the headers went out, then `rx`'s) into SSE chunks until every
    /// prompt is done; a send failure means the client left.
    async fn stream(self, early: Vec<Event>, mut rx: mpsc::Receiver<Event>, out: mpsc::Sender<Result<SseEvent, Infallible>>) {
        let mut usage = Usage::default();
        let mut offsets = vec![0u32; self.total_choices()];
        if self.ep == Endpoint::Chat {
            for i in 0..self.total_choices() as u32 {
                let delta = ChatDelta { role: Some("assistant"), content: Some(String::new()), tool_calls: None };
                let c = self.chat_chunk(vec![ChatChunkChoice { index: i, delta, logprobs: None, finish_reason: None }], None);
                if out.send(Self::chunk(&c)).await.is_err() {
                    return;
                }
            }
        }
        let token_hist = self.st.metrics.token.with_label_values(&[self.ep.label()]);
        let mut held = self.valid.tools.is_some().then(|| vec![Acc::default(); self.total_choices()]);
        let mut early = early.into_iter();
        loop {
            // Early events waited for the other prompts to start: not the router's per-token latency.
            let (ev, timed) = match early.next() {
                Some(ev) => (ev, false),
                None => match rx.recv().await {
                    Some(ev) => (ev, true),
                    None => break,
                },
            };
            let mut received = None;
            let item = match ev {
                Event::Started { .. } => continue,
                Event::Delta { index, text, logprobs, received: r } if held.is_some() => {
                    // With tools, text is sent once it cannot be the start of a call; the rest when the choice ends.
                    let a = &mut held.as_mut().expect("tools hold their choices")[index as usize];
                    a.text.push_str(&text);
                    a.lps.extend(logprobs);
                    let ready = self.valid.tools.as_deref().map_or(0, |t| t.streamable_len(&a.text));
                    if ready <= a.sent {
                        continue;
                    }
                    received = Some(r);
                    let piece = a.text[a.sent..ready].to_string();
                    a.sent = ready;
                    let lps = std::mem::take(&mut a.lps);
                    let lp = self.wants_logprobs().then(|| self.chat_logprobs(&lps));
                    let delta = ChatDelta { role: None, content: Some(piece), tool_calls: None };
                    Self::chunk(&self.chat_chunk(vec![ChatChunkChoice { index, delta, logprobs: lp, finish_reason: None }], None))
                }
                Event::Finish { index, reason } if held.is_some() => {
                    let a = std::mem::take(&mut held.as_mut().expect("tools hold their choices")[index as usize]);
                    let (content, calls, finish) = self.chat_message(a.text, Some(reason));
                    // What was streamed already is a prefix of the content.
                    let content = content.and_then(|c| c.get(a.sent..).filter(|rest| !rest.is_empty()).map(str::to_string));
                    let tool_calls = calls.map(|calls| {
                        calls
                            .into_iter()
                            .enumerate()
                            .map(|(i, c)| ToolCallDelta { index: i as u32, id: c.id, kind: c.kind, function: c.function })
                            .collect()
                    });
                    if content.is_some() || tool_calls.is_some() || !a.lps.is_empty() {
                        let lp = self.wants_logprobs().then(|| self.chat_logprobs(&a.lps));
                        let delta = ChatDelta { role: None, content, tool_calls };
                        let body = self.chat_chunk(vec![ChatChunkChoice { index, delta, logprobs: lp, finish_reason: None }], None);
                        if out.send(Self::chunk(&body)).await.is_err() {
                            return;
                        }
                    }
                    Self::chunk(&self.chat_chunk(
                        vec![ChatChunkChoice { index, delta: ChatDelta::default(), logprobs: None, finish_reason: finish }],
                        None,
                    ))
                }
                Event::Delta { index, text, logprobs, received: r } => match self.ep {
                    Endpoint::Chat => {
                        received = Some(r);
                        let lp = self.wants_logprobs().then(|| self.chat_logprobs(&logprobs));
                        let delta = ChatDelta { role: None, content: Some(text), tool_calls: None };
                        Self::chunk(&self.chat_chunk(vec![ChatChunkChoice { index, delta, logprobs: lp, finish_reason: None }], None))
                    }
                    Endpoint::Completions => {
                        received = Some(r);
                        let lp = self.wants_logprobs().then(|| self.completion_logprobs(&logprobs, &mut offsets[index as usize]));
                        Self::chunk(&self.completion_chunk(vec![CompletionChoice { index, text, logprobs: lp, finish_reason: None }], None))
                    }
                },
                Event::Finish { index, reason } => match self.ep {
                    Endpoint::Chat => Self::chunk(&self.chat_chunk(
                        vec![ChatChunkChoice { index, delta: ChatDelta::default(), logprobs: None, finish_reason: Some(reason) }],
                        None,
                    )),
                    Endpoint::Completions => Self::chunk(&self.completion_chunk(
                        vec![CompletionChoice { index, text: String::new(), logprobs: None, finish_reason: Some(reason) }],
                        None,
                    )),
                },
                Event::Usage { prompt, completion, cached } => {
                    usage.prompt_tokens += prompt;
                    usage.completion_tokens += completion;
                    usage.prompt_tokens_details.cached_tokens += cached;
                    continue;
                }
                Event::Error(e) => {
                    // After headers: a final error event (no `event:` field, no [DONE]).
                    let _ = out.send(Self::chunk(&e.body())).await;
                    return;
                }
            };
            if out.send(item).await.is_err() {
                return; // client gone: dropping `rx` stops the drivers, whose leases abort the worker requests
            }
            if let Some(r) = received.filter(|_| timed) {
                token_hist.observe(r.elapsed().as_secs_f64());
            }
        }
        if self.valid.include_usage {
            usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
            let item = match self.ep {
                Endpoint::Chat => Self::chunk(&self.chat_chunk(Vec::new(), Some(usage))),
                Endpoint::Completions => Self::chunk(&self.completion_chunk(Vec::new(), Some(usage))),
            };
            if out.send(item).await.is_err() {
                return;
            }
        }
        let _ = out.send(Ok(SseEvent::default().data("[DONE]"))).await;
    }
}
