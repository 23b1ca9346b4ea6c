//! Cluster failures end to end with real processes on loopback: `ferrite router` in front of `ferrite worker`s (CPU,
//! one thread each, the default model). A worker SIGKILLed under 16 greedy streams: every stream finishes with the
//! text of an undisturbed run (the ones in flight migrate); a worker that never answers is skipped and none left
//! means 503; distinct prompts spread over all workers; a restarted worker is resynced and routed to again.
//!
//! Needs the `ferrite` binary (`cargo build --release --bin ferrite`; see `ferrite_tests::cluster`). The tests take
//! turns (one lock): each starts two or three model processes on a small machine.

use std::collections::HashMap;
use std::time::Duration;

use ferrite_common::proto::worker as pb;
use ferrite_common::proto::worker::worker_client::WorkerClient;
use ferrite_tests::cluster::{Http, RouterProc, WorkerProc, free_port, start_router, start_worker};
use serde_json::{Value, json};

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";

fn completion(prompt: Value, max_tokens: u32, stream: bool) -> Value {
    let mut body = json!({"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": true});
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    body
}

/// Polls the router's `/metrics` until `series` satisfies `ok` (60 s at most).
async fn wait_metric(http: &Http, router: &RouterProc, series: &str, ok: impl Fn(f64) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let v = http.metric(&router.base, series).await;
        if ok(v) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{series} stayed at {v}:\n{}", router.proc.log_tail());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn workers(n: usize) -> Vec<WorkerProc> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(start_worker(free_port()).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_under_sixteen_streams_loses_no_request_and_migrated_streams_keep_their_text() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut ws = workers(2).await;
    let addrs: Vec<String> = ws.iter().map(|w| w.addr.clone()).collect();
    let router = start_router(&addrs, &["--migration-limit", "1"]).await;
    let http = Http::new();
    wait_metric(&http, &router, "ferrite_router_workers{state=\"active\"}", |v| v == 2.0).await;
    let url = format!("{}/v1/completions", router.base);
    let prompts: Vec<String> = (0..16).map(|i| format!("Story number {i}: once upon a time, in a faraway kingdom,")).collect();
    const TOKENS: u32 = 48;

    // The undisturbed run, through the same cluster.
    let expected: Vec<(String, Value)> = futures_join(prompts.iter().map(|p| {
        let (http, url, body) = (http.clone(), url.clone(), completion(json!(p), TOKENS, false));
        async move {
            let r = http.post(&url, &body).await;
            assert_eq!(r.status, 200, "{}", r.body);
            let v = r.json();
            (v["choices"][0]["text"].as_str().unwrap().to_string(), v["usage"]["prompt_tokens"].clone())
        }
    }))
    .await;

    // 16 streams at once; once every one has its first token, the worker serving the most dies.
    let (started_tx, mut started_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for p in &prompts {
        let (http, url, body, tx) = (http.clone(), url.clone(), completion(json!(p), TOKENS, true), started_tx.clone());
        tasks.push(tokio::spawn(async move { http.stream(&url, &body, move |w| drop(tx.send(w))).await }));
    }
    let mut per_worker: HashMap<String, usize> = HashMap::new();
    for _ in 0..prompts.len() {
        let w = tokio::time::timeout(Duration::from_secs(180), started_rx.recv()).await.expect("16 streams start").expect("a worker");
        *per_worker.entry(w.expect("x-ferrite-worker")).or_default() += 1;
    }
    let (victim_addr, on_victim) = per_worker.iter().max_by_key(|(_, n)| **n).map(|(a, n)| (a.clone(), *n)).unwrap();
    let victim = ws.iter().position(|w| w.addr == victim_addr).unwrap();
    ws[victim].proc.kill();

    for (i, t) in tasks.into_iter().enumerate() {
        let s = t.await.expect("the stream task");
        assert_eq!(s.error, None, "stream {i} ended with an error event");
        assert!(s.done, "stream {i} has no [DONE]");
        assert_eq!(s.text, expected[i].0, "stream {i} (served first by {:?}) differs from the undisturbed run", s.worker);
        assert_eq!(s.finish_reason.as_deref(), Some("length"), "stream {i}");
        let usage = s.usage.unwrap_or_else(|| panic!("stream {i} has no usage"));
        assert_eq!((usage["prompt_tokens"].clone(), usage["completion_tokens"].as_u64()), (expected[i].1.clone(), Some(u64::from(TOKENS))));
    }
    let migrated = http.metric(&router.base, "ferrite_router_migrations_total{outcome=\"migrated\"}").await;
    assert!(migrated >= 1.0 && migrated <= on_victim as f64, "{migrated} migrations for {on_victim} streams on the killed worker");
    // Requests that start after the kill go to the survivor.
    let survivor = &ws[1 - victim].addr;
    for p in prompts.iter().take(3) {
        let r = http.post(&url, &completion(json!(p), 4, false)).await;
        assert_eq!((r.status, r.worker.as_deref()), (200, Some(survivor.as_str())), "{}", r.body);
    }
}

/// Awaits all futures, in order (a tiny `join_all`).
async fn futures_join<T: Send + 'static>(futs: impl Iterator<Item = impl std::future::Future<Output = T> + Send + 'static>) -> Vec<T> {
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("a task"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_never_answers_is_skipped_and_with_none_left_the_answer_is_503() {
    let _turn = ONE_AT_A_TIME.lock().await;
    // Accepts connections and never says a word.
    let hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hole_addr = format!("http://{}", hole.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in hole.incoming() {
            held.push(s);
        }
    });
    let mut ws = workers(1).await;
    let router = start_router(&[hole_addr.clone(), ws[0].addr.clone()], &[]).await;
    let http = Http::new();
    wait_metric(&http, &router, "ferrite_router_workers{state=\"active\"}", |v| v == 1.0).await;
    let url = format!("{}/v1/completions", router.base);
    for i in 0..6 {
        let r = http.post(&url, &completion(json!(format!("Request {i} says")), 2, false)).await;
        assert_eq!((r.status, r.worker.as_deref()), (200, Some(ws[0].addr.as_str())), "{}", r.body);
    }
    assert_eq!(http.metric(&router.base, "ferrite_router_workers{state=\"joining\"}").await, 1.0, "the silent one never joined");

    ws[0].proc.kill();
    for i in 0..3 {
        let r = http.post(&url, &completion(json!(format!("After {i}")), 2, false)).await;
        assert_eq!(r.status, 503, "{}", r.body);
        let e = &r.json()["error"];
        assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("service_unavailable_error"), Some("no_worker_ready")), "{}", r.body);
    }
    let r = http.post(&url, &completion(json!("streamed"), 2, true)).await;
    assert_eq!(r.status, 503, "a stream is refused before its headers: {}", r.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_distinct_prompts_spreads_over_all_workers() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let ws = workers(3).await;
    let addrs: Vec<String> = ws.iter().map(|w| w.addr.clone()).collect();
    let router = start_router(&addrs, &[]).await;
    let http = Http::new();
    wait_metric(&http, &router, "ferrite_router_workers{state=\"active\"}", |v| v == 3.0).await;
    let url = format!("{}/v1/completions", router.base);
    let served = futures_join((0..12).map(|i| {
        let (http, url) = (http.clone(), url.clone());
        let body = completion(json!(format!("Topic {i}: a short note about the number {}", i * 7919)), 4, false);
        async move {
            let r = http.post(&url, &body).await;
            assert_eq!(r.status, 200, "{}", r.body);
            r.worker.expect("x-ferrite-worker")
        }
    }))
    .await;
    let mut count: HashMap<&str, usize> = HashMap::new();
    served.iter().for_each(|w| *count.entry(w.as_str()).or_default() += 1);
    for a in &addrs {
        assert!(count.get(a.as_str()).is_some_and(|n| *n >= 1), "{a} served nothing of the burst: {count:?}");
        // The router counts its decisions per policy and worker.
        let routed = http.metric(&router.base, &format!("ferrite_router_routed_total{{policy=\"cache-aware\",worker=\"{a}\"}}")).await;
        assert_eq!(routed, count[a.as_str()] as f64, "{a}");
    }
}

/// 96 tokens (six 16-token blocks) after a distinct head, plus a suffix.
fn long_prompt(head: u32, suffix: u32) -> Vec<u32> {
    let mut p: Vec<u32> = (0..96).map(|i| 300 + 11 * i + head).collect();
    p.extend((0..8).map(|k| 5000 + 97 * suffix + k));
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_worker_is_resynced_and_routed_to_again() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut ws = workers(2).await;
    let addrs: Vec<String> = ws.iter().map(|w| w.addr.clone()).collect();
    let router = start_router(&addrs, &[]).await;
    let http = Http::new();
    wait_metric(&http, &router, "ferrite_router_workers{state=\"active\"}", |v| v == 2.0).await;
    let url = format!("{}/v1/completions", router.base);
    let first = http.post(&url, &completion(json!(long_prompt(0, 0)), 1, false)).await;
    assert_eq!(first.status, 200, "{}", first.body);
    let holder = first.worker.clone().unwrap();
    wait_metric(&http, &router, "ferrite_router_kv_index_blocks", |v| v >= 6.0).await;
    let again = http.post(&url, &completion(json!(long_prompt(0, 1)), 1, false)).await;
    assert_eq!(again.worker.as_deref(), Some(holder.as_str()), "the prefix's holder");
    assert!(again.json()["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() >= 96);

    // Kill the holder and start a fresh process on its port: an empty cache, sequence numbers from 1.
    let h = ws.iter().position(|w| w.addr == holder).unwrap();
    let port = ws[h].port;
    ws[h].proc.kill();
    ws[h] = start_worker(port).await;
    wait_metric(&http, &router, "ferrite_router_kv_index_blocks", |v| v == 0.0).await;

    // Routing resumes to it (its breaker, opened by the kill, closes when its `Info` answers again): a prefix it
    // computes (behind the router's back) draws the next request to it.
    wait_metric(&http, &router, &format!("ferrite_router_worker_breaker_state{{worker=\"{holder}\"}}"), |v| v == 0.0).await;
    let mut client = WorkerClient::connect(holder.clone()).await.unwrap();
    let warm = pb::GenerateRequest { request_id: "warm".into(), prompt_ids: long_prompt(1, 0), max_new_tokens: 1, ..Default::default() };
    let mut s = client.generate(warm).await.unwrap().into_inner();
    while s.message().await.unwrap().is_some() {}
    wait_metric(&http, &router, "ferrite_router_kv_index_blocks", |v| v >= 6.0).await;
    let r = http.post(&url, &completion(json!(long_prompt(1, 1)), 1, false)).await;
    assert_eq!((r.status, r.worker.as_deref()), (200, Some(holder.as_str())), "{}", r.body);
    assert!(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap() >= 96);
    // That guess was exact: the worker reported the 96 cached tokens the index predicted.
    let exact = http.metric(&router.base, "ferrite_router_overlap_error_tokens_bucket{le=\"0\"}").await
        - http.metric(&router.base, "ferrite_router_overlap_error_tokens_bucket{le=\"-1\"}").await;
    assert!(exact >= 1.0, "no exact overlap prediction recorded");
}
