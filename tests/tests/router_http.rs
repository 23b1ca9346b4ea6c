//! The router's HTTP API end to end against an embedded worker on loopback (the `ferrite serve` wiring), driven
//! through `axum`'s `oneshot`: reference greedy outputs, SSE framing, stop strings, usage, and every error class.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use ferrite_common::model::ModelFiles;
use ferrite_common::text::TextAssets;
use ferrite_router::{AppState, Limits, RouterConfig, WorkerPool, app};
use ferrite_tests::{default_model, reference, test_worker_config};
use ferrite_worker::config::WorkerConfig;
use ferrite_worker::engine::core::EngineHandle;
use ferrite_worker::server::Worker;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

async fn stack(max_body_bytes: usize) -> (axum::Router, EngineHandle) {
    stack_with(max_body_bytes, 64).await
}

async fn stack_with(max_body_bytes: usize, max_concurrent_requests: usize) -> (axum::Router, EngineHandle) {
    stack_cfg(max_body_bytes, max_concurrent_requests, test_worker_config()).await
}

async fn stack_cfg(max_body_bytes: usize, max_concurrent_requests: usize, cfg: WorkerConfig) -> (axum::Router, EngineHandle) {
    let worker = tokio::task::spawn_blocking(move || Worker::load(&cfg)).await.unwrap().unwrap();
    let engine = worker.engine.clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(worker.serve(listener, std::future::pending()));
    let pool = WorkerPool::new(&[format!("http://{addr}")]).unwrap();
    let info = pool.info(Duration::from_secs(10)).await.unwrap();
    let text = Arc::new(TextAssets::load(&ModelFiles::open(&default_model()).unwrap()).unwrap());
    let config = RouterConfig {
        model_names: vec![info.model_id, "alias/llama".into()],
        max_concurrent_requests,
        max_body_bytes,
        auth: None,
        ..RouterConfig::default()
    };
    let limits = Limits { max_model_len: info.max_model_len as usize, vocab_size: info.vocab_size as usize };
    (app(Arc::new(AppState::new(text, pool, config, limits, None).unwrap())), engine)
}

async fn post(app: &axum::Router, path: &str, body: impl Into<Body>) -> (StatusCode, String) {
    let req = Request::post(path).header("content-type", "application/json").body(body.into()).unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

async fn post_json(app: &axum::Router, path: &str, v: Value) -> (StatusCode, Value, String) {
    let (s, text) = post(app, path, v.to_string()).await;
    (s, serde_json::from_str(&text).unwrap_or(Value::Null), text)
}

/// `data:` payloads of an SSE body.
fn sse_data(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_outputs_match_the_reference() {
    let (app, _) = stack(1 << 20).await;
    for (name, case) in reference()["cases"].as_object().unwrap() {
        let max_tokens = case["greedy_ids"].as_array().unwrap().len();
        let want = case["greedy_text"].as_str().unwrap().trim_end_matches("<|im_end|>");
        let (status, v, raw) = if case["kind"] == "chat" {
            post_json(
                &app,
                "/v1/chat/completions",
                json!({"model": MODEL, "messages": case["messages"], "max_tokens": max_tokens, "temperature": 0}),
            )
            .await
        } else {
            post_json(
                &app,
                "/v1/completions",
                json!({"model": MODEL, "prompt": case["prompt_text"], "max_tokens": max_tokens, "temperature": 0}),
            )
            .await
        };
        assert_eq!(status, StatusCode::OK, "{name}: {raw}");
        let choice = &v["choices"][0];
        let got = choice["text"].as_str().or(choice["message"]["content"].as_str()).unwrap();
        assert_eq!(got, want, "{name}");
        assert_eq!(v["usage"]["prompt_tokens"], case["prompt_ids"].as_array().unwrap().len(), "{name}");
        let ended_on_eos = case["greedy_ids"].as_array().unwrap().last() == Some(&json!(2));
        assert_eq!(choice["finish_reason"], if ended_on_eos { "stop" } else { "length" }, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_matches_non_streaming_with_role_usage_and_done() {
    let (app, _) = stack(1 << 20).await;
    let body = json!({"model": "alias/llama", "messages": [{"role": "user", "content": [{"type": "text", "text": "Say hi"}]}],
                      "max_tokens": 12, "temperature": 0});
    let (_, whole, _) = post_json(&app, "/v1/chat/completions", body.clone()).await;
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    sbody["stream_options"] = json!({"include_usage": true});
    let (status, text) = post(&app, "/v1/chat/completions", sbody.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    let data = sse_data(&text);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1].iter().map(|d| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(content, whole["choices"][0]["message"]["content"].as_str().unwrap());
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    // Same counts as the non-streamed call (which warmed the prefix cache, so only cached_tokens may differ).
    for k in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(usage["usage"][k], whole["usage"][k], "{k}");
    }
    assert!(usage["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() > 0);
    assert!(chunks[chunks.len() - 2]["choices"][0]["finish_reason"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_n_and_logprobs() {
    let (app, _) = stack(1 << 20).await;
    let base = json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0});
    let (_, free, _) = post_json(&app, "/v1/completions", base.clone()).await;
    let full = free["choices"][0]["text"].as_str().unwrap().to_string();
    // Stop at the first "city": the text before it, no stop string, finish_reason stop.
    let mut req = base.clone();
    req["stop"] = json!(["city", "nothing-like-this"]);
    let (_, v, _) = post_json(&app, "/v1/completions", req.clone()).await;
    let cut = &full[..full.find("city").expect("reference continuation mentions a city")];
    assert_eq!(v["choices"][0]["text"], cut);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    req["stream"] = json!(true);
    let (_, text) = post(&app, "/v1/completions", req.to_string()).await;
    let streamed: String = sse_data(&text)
        .iter()
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(streamed, cut);
    // n = 2 and logprobs.
    let mut req = base.clone();
    req["n"] = json!(2);
    req["logprobs"] = json!(3);
    req["max_tokens"] = json!(4);
    let (status, v, raw) = post_json(&app, "/v1/completions", req).await;
    assert_eq!(status, StatusCode::OK, "{raw}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);
    let lp = &v["choices"][1]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 4);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 3);
    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0,
                      "logprobs": true, "top_logprobs": 2});
    let (_, v, _) = post_json(&app, "/v1/chat/completions", chat).await;
    let content = &v["choices"][0]["logprobs"]["content"];
    assert_eq!(content.as_array().unwrap().len(), 3);
    assert_eq!(content[0]["top_logprobs"].as_array().unwrap().len(), 2);
}

/// With n > 1, a choice that ends on a stop string stops generating on the worker at once (the router aborts that
/// completion only), while the other choices run to their end unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_choice_ended_by_a_stop_string_stops_generating_on_the_worker() {
    let (app, engine) = stack(1 << 20).await;
    let max_tokens = 48;
    // Find a seed whose two sampled choices both run to the length limit, and a word early in choice 0 that choice 1
    // never contains.
    let mut found = None;
    for seed in 1..40 {
        let req = json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 1.0, "seed": seed, "n": 2});
        let (_, v, _) = post_json(&app, "/v1/completions", req.clone()).await;
        if (0..2).any(|i| v["choices"][i]["finish_reason"] != "length") {
            continue;
        }
        let texts: Vec<String> = (0..2).map(|i| v["choices"][i]["text"].as_str().unwrap().to_string()).collect();
        let early = &texts[0][..texts[0].len() / 4];
        if let Some(word) = early.split_whitespace().find(|w| w.len() >= 3 && w.is_ascii() && !texts[1].contains(*w)) {
            found = Some((req, texts.clone(), word.to_string()));
            break;
        }
    }
    let (mut req, texts, word) = found.expect("some seed gives two full-length choices with a distinguishing word");
    req["stop"] = json!([word]);
    let wait_idle = || async {
        for _ in 0..200 {
            if engine.stats.running.load(std::sync::atomic::Ordering::Relaxed) == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the engine did not go idle");
    };
    wait_idle().await;
    let before = engine.stats.generated_tokens.load(std::sync::atomic::Ordering::Relaxed);
    let (status, v, raw) = post_json(&app, "/v1/completions", req).await;
    assert_eq!(status, StatusCode::OK, "{raw}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{raw}");
    assert_eq!(v["choices"][0]["text"].as_str().unwrap(), &texts[0][..texts[0].find(&word).unwrap()]);
    assert_eq!(v["choices"][1]["finish_reason"], "length", "{raw}");
    assert_eq!(v["choices"][1]["text"].as_str().unwrap(), texts[1]);
    wait_idle().await;
    let used = engine.stats.generated_tokens.load(std::sync::atomic::Ordering::Relaxed) - before;
    let stopped_after = v["usage"]["completion_tokens"].as_u64().unwrap() - max_tokens;
    // Choice 0 may run a few steps past its stop while the abort travels; never to its length limit.
    assert!(used < 2 * max_tokens - 8, "the worker generated {used} tokens (choice 0 stopped after {stopped_after})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_class_is_an_openai_envelope() {
    let (app, _) = stack(4096).await;
    let cases: Vec<(Value, StatusCode, &str, Option<&str>)> = vec![
        (json!({"model": "nope", "prompt": "x"}), StatusCode::NOT_FOUND, "model_not_found", Some("model")),
        (json!({"model": MODEL, "prompt": "x", "temperature": 3}), StatusCode::BAD_REQUEST, "invalid_value", Some("temperature")),
        (json!({"model": MODEL, "prompt": "x", "max_tokens": 0}), StatusCode::BAD_REQUEST, "invalid_value", Some("max_tokens")),
        (json!({"model": MODEL, "prompt": "x", "n": 0}), StatusCode::BAD_REQUEST, "invalid_value", Some("n")),
        (
            json!({"model": MODEL, "prompt": "x", "max_tokens": 5000}),
            StatusCode::BAD_REQUEST,
            "context_length_exceeded",
            Some("max_tokens"),
        ),
        (json!({"model": MODEL, "prompt": [1, 2, 999999]}), StatusCode::BAD_REQUEST, "invalid_value", Some("prompt")),
        (json!({"model": MODEL}), StatusCode::BAD_REQUEST, "invalid_json", None),
    ];
    for (body, status, code, param) in cases {
        let (s, v, raw) = post_json(&app, "/v1/completions", body.clone()).await;
        assert_eq!(s, status, "{body}: {raw}");
        assert_eq!(v["error"]["code"], code, "{raw}");
        assert_eq!(v["error"]["param"].as_str(), param, "{raw}");
        assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let (s, text) = post(&app, "/v1/chat/completions", "{not json").await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(text.contains("\"code\":\"invalid_json\""));
    let (s, text) = post(&app, "/v1/completions", json!({"model": MODEL, "prompt": "x".repeat(10_000)}).to_string()).await;
    assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "{text}");
    assert!(text.contains("\"error\""));
    let (s, _) = post(&app, "/v1/nope", "{}").await;
    assert_eq!(s, StatusCode::NOT_FOUND);
}

/// A streaming client that hangs up: the router drops its worker stream and the worker aborts the request within a
/// step. The request (ignore_eos, 4000 tokens: over 8 s even at 500 tokens/s, past the 5 s wait) cannot end by
/// itself, so only the abort frees the worker: the abort counter moves by one, the tokens generated stay far below
/// the budget, and the KV blocks in use return to what they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_stream_frees_the_worker() {
    use std::sync::atomic::Ordering;
    const BUDGET: usize = 4000;
    // KV for the whole context (46 KiB per token on CPU): 256 MiB holds 5.8k tokens.
    let cfg = WorkerConfig { max_model_len: 4096, kv_cache_mib: 256, ..test_worker_config() };
    let (app, engine) = stack_cfg(1 << 20, 64, cfg).await;
    let s = &engine.stats;
    let counters =
        || (s.aborts.load(Ordering::Relaxed), s.generated_tokens.load(Ordering::Relaxed), s.kv_blocks_used.load(Ordering::Relaxed));
    let before = counters();
    let body =
        json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": BUDGET, "temperature": 0, "ignore_eos": true, "stream": true});
    let req = Request::post("/v1/completions").header("content-type", "application/json").body(Body::from(body.to_string())).unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    for _ in 0..3 {
        tokio::time::timeout(Duration::from_secs(30), body.frame()).await.expect("a frame").unwrap().unwrap();
    }
    drop(body);
    let mut idle = false;
    for _ in 0..200 {
        if s.running.load(Ordering::Relaxed) == 0
            && s.waiting.load(Ordering::Relaxed) == 0
            && s.kv_blocks_used.load(Ordering::Relaxed) == before.2
        {
            idle = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let after = counters();
    assert!(idle, "the worker kept the request after the client left: (aborts, generated, KV used) {before:?} -> {after:?}");
    assert_eq!(after.0 - before.0, 1, "one abort: (aborts, generated, KV used) {before:?} -> {after:?}");
    let generated = after.1 - before.1;
    assert!((1..64).contains(&generated), "{generated} tokens generated of a {BUDGET}-token budget");
    assert_eq!(after.2, before.2, "KV blocks in use return to what they were");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_is_429_and_no_worker_is_503() {
    let (app, _) = stack_with(1 << 20, 1).await;
    // A streaming request holds the only permit until its stream ends.
    let body = json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": true, "stream": true});
    let req = Request::post("/v1/completions").header("content-type", "application/json").body(Body::from(body.to_string())).unwrap();
    let held = app.clone().oneshot(req).await.unwrap();
    assert_eq!(held.status(), StatusCode::OK);
    let (s, v, raw) = post_json(&app, "/v1/completions", json!({"model": MODEL, "prompt": "x", "max_tokens": 1})).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "{raw}");
    assert_eq!(v["error"]["type"], "rate_limit_error");
    drop(held);

    // A router whose only worker is not running: not ready, and requests get 503 with a generic message.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let pool = WorkerPool::new(&[format!("http://{closed}")]).unwrap();
    let text = Arc::new(TextAssets::load(&ModelFiles::open(&default_model()).unwrap()).unwrap());
    let config = RouterConfig {
        model_names: vec![MODEL.into()],
        max_concurrent_requests: 4,
        max_body_bytes: 1 << 20,
        auth: None,
        ..RouterConfig::default()
    };
    let limits = Limits { max_model_len: 1024, vocab_size: 49_152 };
    let dead = app_with(text, pool, config, limits);
    let ready = dead.clone().oneshot(Request::get("/v1/health/ready").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let live = dead.clone().oneshot(Request::get("/v1/health/live").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(live.status(), StatusCode::OK);
    let (s, v, raw) = post_json(&dead, "/v1/completions", json!({"model": MODEL, "prompt": "x", "max_tokens": 2})).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{raw}");
    assert!(!raw.contains(&closed.to_string()), "no internal addresses in the body: {raw}");
    assert_eq!(v["error"]["code"], "no_worker_ready");
}

fn app_with(text: Arc<TextAssets>, pool: WorkerPool, config: RouterConfig, limits: Limits) -> axum::Router {
    app(Arc::new(AppState::new(text, pool, config, limits, None).unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prompt_lists_token_prompts_and_echo() {
    let (app, _) = stack(1 << 20).await;
    let one = |p: &str| json!({"model": MODEL, "prompt": p, "max_tokens": 5, "temperature": 0});
    let (_, a, _) = post_json(&app, "/v1/completions", one("Once upon a time")).await;
    let (_, b, _) = post_json(&app, "/v1/completions", one("The capital of France is")).await;
    let both = json!({"model": MODEL, "prompt": ["Once upon a time", "The capital of France is"], "max_tokens": 5, "temperature": 0});
    let (s, v, raw) = post_json(&app, "/v1/completions", both).await;
    assert_eq!(s, StatusCode::OK, "{raw}");
    assert_eq!(v["choices"][0]["text"], a["choices"][0]["text"]);
    assert_eq!(v["choices"][1]["text"], b["choices"][0]["text"]);
    assert_eq!(v["choices"][1]["index"], 1);
    assert_eq!(v["usage"]["prompt_tokens"], 9);
    // Token-id prompts and echo.
    let ids = reference()["cases"]["once_upon"]["prompt_ids"].clone();
    let (_, t, _) =
        post_json(&app, "/v1/completions", json!({"model": MODEL, "prompt": ids, "max_tokens": 5, "temperature": 0, "echo": true})).await;
    assert_eq!(t["choices"][0]["text"].as_str().unwrap(), format!("Once upon a time{}", a["choices"][0]["text"].as_str().unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_tokens_are_reported_when_a_stop_string_ends_the_request() {
    let (app, _) = stack(1 << 20).await;
    let prompt = reference()["cases"]["long_context"]["prompt_text"].clone();
    let free = json!({"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0});
    let (_, v, _) = post_json(&app, "/v1/completions", free).await;
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    let stop: String = text.chars().take(3).collect();
    let req = json!({"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "stop": stop});
    let (_, v, raw) = post_json(&app, "/v1/completions", req).await;
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{raw}");
    assert!(v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() >= 192, "{raw}");
}
