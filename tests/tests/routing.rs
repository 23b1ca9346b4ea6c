//! Cache-aware routing end to end on loopback: two in-process CPU workers behind one router. A prompt whose prefix one
//! worker holds (learned from its `KvEvents` stream) goes to that worker, which the `x-ferrite-worker` header and
//! the cached-token count show; round-robin alternates regardless.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use ferrite_common::model::ModelFiles;
use ferrite_common::proto::worker as pb;
use ferrite_common::proto::worker::worker_client::WorkerClient;
use ferrite_common::text::TextAssets;
use ferrite_router::{AppState, Limits, RouterConfig, Routing, WorkerPool, app};
use ferrite_tests::{default_model, test_worker_config};
use ferrite_worker::server::Worker;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio_stream::StreamExt;
use tower::ServiceExt;

/// 96 tokens: six full 16-token blocks.
fn prefix() -> Vec<u32> {
    (0..96).map(|i| 300 + 11 * i).collect()
}

fn with_suffix(i: u32) -> Vec<u32> {
    let mut p = prefix();
    p.extend((0..8).map(|k| 5000 + 97 * i + k));
    p
}

async fn start_worker() -> String {
    let cfg = ferrite_worker::config::WorkerConfig { threads: 1, kv_cache_mib: 32, ..test_worker_config() };
    let worker = tokio::task::spawn_blocking(move || Worker::load(&cfg)).await.unwrap().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(worker.serve(listener, std::future::pending()));
    format!("http://{addr}")
}

async fn stack(routing: Routing) -> (axum::Router, WorkerPool) {
    let addrs = vec![start_worker().await, start_worker().await];
    let pool = WorkerPool::with_routing(&addrs, routing).unwrap();
    let info = pool.info(Duration::from_secs(10)).await.unwrap();
    pool.start_kv_subscriptions();
    let text = Arc::new(TextAssets::load(&ModelFiles::open(&default_model()).unwrap()).unwrap());
    let config = RouterConfig {
        model_names: vec![info.model_id],
        max_concurrent_requests: 8,
        max_body_bytes: 1 << 20,
        auth: None,
        ..RouterConfig::default()
    };
    let limits = Limits { max_model_len: info.max_model_len as usize, vocab_size: info.vocab_size as usize };
    (app(Arc::new(AppState::new(text, pool.clone(), config, limits, None).unwrap())), pool)
}

/// Sends `prompt` (token ids) through the router; returns the serving worker and the cached prompt tokens.
async fn complete(app: &axum::Router, prompt: Vec<u32>) -> (String, u64) {
    let body = json!({"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": prompt, "max_tokens": 1, "temperature": 0});
    let req = Request::post("/v1/completions").header("content-type", "application/json").body(Body::from(body.to_string())).unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let worker = resp.headers().get("x-ferrite-worker").expect("x-ferrite-worker header").to_str().unwrap().to_string();
    let v: Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    (worker, v["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap())
}

/// Runs `prompt` on the worker at `addr` directly over gRPC (not through the router).
async fn generate_on(addr: &str, prompt: Vec<u32>) {
    let mut client = WorkerClient::connect(addr.to_string()).await.unwrap();
    let r = pb::GenerateRequest { request_id: "warm".into(), prompt_ids: prompt, max_new_tokens: 1, ..Default::default() };
    let mut s = client.generate(r).await.unwrap().into_inner();
    while let Some(m) = s.next().await {
        m.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_aware_routing_follows_the_prefix_to_the_worker_that_holds_it() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let (app, pool) = stack(Routing::CacheAware).await;
        let addrs = pool.addrs();
        // The second worker computes the prefix (behind the router's back: least-load would pick the first).
        generate_on(&addrs[1], with_suffix(0)).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while pool.indexed_blocks()[1] < 6 {
            assert!(tokio::time::Instant::now() < deadline, "the router's index never showed the prefix: {:?}", pool.indexed_blocks());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(pool.indexed_blocks()[0], 0);
        for i in 1..=4 {
            let (worker, cached) = complete(&app, with_suffix(i)).await;
            assert_eq!(worker, addrs[1], "request {i} went to the worker without the prefix");
            assert!(cached >= 96, "request {i}: {cached} cached prompt tokens, want the 96-token prefix");
        }
        // Streamed: the header goes out with the SSE response's headers.
        let body = json!({"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": with_suffix(5), "max_tokens": 2, "stream": true});
        let req = Request::post("/v1/completions").header("content-type", "application/json").body(Body::from(body.to_string())).unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers().get("x-ferrite-worker").map(|v| v.to_str().unwrap()), Some(addrs[1].as_str()));
        let text = String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
    })
    .await
    .expect("within 120 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_alternates_whatever_the_cache_holds() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let (app, pool) = stack(Routing::RoundRobin).await;
        let addrs = pool.addrs();
        generate_on(&addrs[1], with_suffix(0)).await;
        let mut served = Vec::new();
        for i in 1..=4 {
            served.push(complete(&app, with_suffix(i)).await.0);
        }
        assert_eq!(served, [0, 1, 0, 1].map(|i| addrs[i].clone()));
        assert_eq!(pool.indexed_blocks(), vec![0, 0], "round-robin subscribes to nothing");
    })
    .await
    .expect("within 120 s");
}
