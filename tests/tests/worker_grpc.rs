//! The worker over gRPC on loopback with the default model: concurrency, batching-independence, prefix caching,
//! cancellation, abort, sampling options and bad requests. Every test starts its own worker on 127.0.0.1:0.

use std::time::Duration;

use ferrite_common::proto::worker as pb;
use ferrite_common::proto::worker::worker_client::WorkerClient;
use ferrite_tests::{ref_cases, test_worker_config};
use ferrite_worker::config::WorkerConfig;
use ferrite_worker::server::Worker;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic::transport::Channel;

async fn start(max_waiting: usize) -> WorkerClient<Channel> {
    start_with_metrics(max_waiting, 32).await.0
}

/// Starts a worker and its metrics endpoint; returns the client and the metrics address.
async fn start_with_metrics(max_waiting: usize, max_num_seqs: usize) -> (WorkerClient<Channel>, std::net::SocketAddr) {
    start_worker(max_waiting, max_num_seqs, 1).await
}

async fn start_worker(
    max_waiting: usize,
    max_num_seqs: usize,
    tensor_parallel_size: usize,
) -> (WorkerClient<Channel>, std::net::SocketAddr) {
    start_cfg(WorkerConfig { max_num_seqs, max_waiting, tensor_parallel_size, ..test_worker_config() }).await
}

async fn start_cfg(cfg: WorkerConfig) -> (WorkerClient<Channel>, std::net::SocketAddr) {
    let worker = tokio::task::spawn_blocking(move || Worker::load(&cfg)).await.unwrap().unwrap();
    let metrics = ferrite_tests::serve_worker_metrics(&worker.engine).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(worker.serve(listener, std::future::pending()));
    (WorkerClient::connect(format!("http://{addr}")).await.unwrap(), metrics)
}

/// GET /metrics over a plain TCP connection.
async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    body
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing"))
}

/// The worker counters an abort must move: aborted requests, generated tokens, KV blocks in use.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Counters {
    aborts: f64,
    generated: f64,
    kv_used: f64,
}

async fn counters(metrics: std::net::SocketAddr) -> Counters {
    let text = scrape(metrics).await;
    Counters {
        aborts: metric(&text, "ferrite_worker_aborts_total"),
        generated: metric(&text, "ferrite_worker_generated_tokens_total"),
        kv_used: metric(&text, "ferrite_worker_kv_blocks{state=\"used\"}"),
    }
}

fn req(id: &str, prompt: &[u32], max_new: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        request_id: id.into(),
        prompt_ids: prompt.to_vec(),
        sampling: Some(pb::SamplingParams { temperature: Some(0.0), ..Default::default() }),
        max_new_tokens: max_new,
        ..Default::default()
    }
}

/// Completed output of one request: tokens per completion index, and the Finished messages.
#[derive(Debug, Default)]
struct Done {
    tokens: Vec<Vec<u32>>,
    finished: Vec<pb::Finished>,
    logprobs: Vec<pb::TokenLogprobs>,
}

async fn collect(client: &mut WorkerClient<Channel>, r: pb::GenerateRequest) -> Result<Done, tonic::Status> {
    let mut stream = client.generate(r).await?.into_inner();
    let mut done = Done::default();
    while let Some(msg) = stream.next().await {
        match msg?.kind.expect("kind set") {
            pb::generate_response::Kind::Chunk(c) => {
                let i = c.index as usize;
                if done.tokens.len() <= i {
                    done.tokens.resize(i + 1, Vec::new());
                }
                done.tokens[i].extend(c.token_ids);
                done.logprobs.extend(c.logprobs);
            }
            pb::generate_response::Kind::Finished(f) => done.finished.push(f),
        }
    }
    Ok(done)
}

async fn wait_idle(client: &mut WorkerClient<Channel>) -> pb::HealthResponse {
    for _ in 0..200 {
        let h = client.health(pb::HealthRequest {}).await.unwrap().into_inner();
        if h.running == 0 && h.waiting == 0 && h.kv_blocks_used == 0 {
            return h;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("worker did not become idle: {:?}", client.health(pb::HealthRequest {}).await.unwrap().into_inner());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_complete_and_kv_returns_to_zero() {
    let mut client = start(256).await;
    let cases = ref_cases();
    let alone = collect(&mut client, req("alone", &cases[0].prompt_ids, 8)).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..32 {
        let mut c = client.clone();
        let prompt = cases[i % cases.len()].prompt_ids.clone();
        tasks.push(tokio::spawn(async move { collect(&mut c, req(&format!("r{i}"), &prompt, 8)).await }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let done = t.await.unwrap().unwrap();
        assert_eq!(done.finished.len(), 1, "stream {i} ends with one Finished");
        let f = &done.finished[0];
        assert!(f.reason == pb::FinishReason::Length as i32 || f.reason == pb::FinishReason::Stop as i32);
        assert_eq!(f.completion_tokens as usize, done.tokens[0].len());
        if i % cases.len() == 0 {
            assert_eq!(done.tokens[0], alone.tokens[0], "greedy output is the same alone and among 32 streams");
        }
    }
    let h = wait_idle(&mut client).await;
    assert!(h.healthy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_cached_run_gives_the_same_tokens() {
    let (mut client, metrics) = start_with_metrics(16, 32).await;
    let case = ref_cases().into_iter().find(|c| c.name == "long_context").unwrap();
    let cold = collect(&mut client, req("cold", &case.prompt_ids, 12)).await.unwrap();
    let warm = collect(&mut client, req("warm", &case.prompt_ids, 12)).await.unwrap();
    assert_eq!(cold.finished[0].cached_tokens, 0);
    assert!(warm.finished[0].cached_tokens >= 192, "cached {}", warm.finished[0].cached_tokens);
    assert_eq!(warm.tokens, cold.tokens);
    wait_idle(&mut client).await;
    let text = scrape(metrics).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(metric(&text, "ferrite_worker_prefix_cache_hits_total") >= 12.0, "{text}");
    assert!(metric(&text, "ferrite_worker_prefix_hit_tokens_total") >= 192.0);
    assert!(metric(&text, "ferrite_worker_generated_tokens_total") >= 24.0);
    assert_eq!(metric(&text, "ferrite_worker_kv_blocks{state=\"used\"}"), 0.0);
    assert!(metric(&text, "ferrite_worker_kv_blocks{state=\"cached_free\"}") >= 12.0);
    // Both requests were admitted once each: two queue-time samples.
    assert_eq!(metric(&text, "ferrite_worker_queue_seconds_count"), 2.0, "{text}");
}

/// A worker whose backend fails for good answers the request in flight with an error, then `serve` returns
/// `EngineFailed` (the binary exits non-zero), promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_backend_error_ends_serve_with_an_error() {
    use ferrite_worker::config::WorkerError;
    use ferrite_worker::instant::InstantBackend;
    let cfg = test_worker_config();
    let files = ferrite_common::model::ModelFiles::open(&cfg.model).unwrap();
    let backend = ferrite_tests::FailAfter::new(InstantBackend::new(files.config.clone(), 64, 16), 2);
    let worker = Worker::start(&cfg, &files, Box::new(backend)).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = tokio::spawn(worker.serve(listener, std::future::pending()));
    let mut client = WorkerClient::connect(format!("http://{addr}")).await.unwrap();
    let err = collect(&mut client, req("doomed", &[1, 2, 3], 20)).await.expect_err("the request must fail");
    assert!(err.message().contains("injected device failure"), "{err:?}");
    let ended = tokio::time::timeout(Duration::from_secs(10), served).await.expect("serve returns").unwrap();
    assert!(matches!(&ended, Err(WorkerError::EngineFailed(m)) if m.contains("injected device failure")), "{ended:?}");
}

/// Context of the cancellation tests' worker: a budget of [`UNFINISHABLE`] tokens takes over 8 s even at 500
/// tokens/s (this 2-core machine makes 50–100), far past the 5 s [`wait_idle`] allows, so an abort is the only way
/// such a request can end within the test.
const CANCEL_CONTEXT: usize = 4096;
const UNFINISHABLE: u32 = 4000;
/// What "far below the budget" means: a request aborted after its first few tokens may run a few more steps while
/// the abort travels, never this many.
const AFTER_ABORT: f64 = 64.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_stream_frees_its_blocks_and_abort_ends_a_request_or_one_completion() {
    // KV for the whole context (46 KiB per token on CPU): 256 MiB holds 5.8k tokens.
    let cfg = WorkerConfig { max_model_len: CANCEL_CONTEXT, kv_cache_mib: 256, max_waiting: 16, ..test_worker_config() };
    let (mut client, metrics) = start_cfg(cfg).await;
    // capital_raw's greedy output ends with eos after ~30 tokens: only ignore_eos keeps it going.
    let case = &ref_cases()[0];
    let long = |id: &str| pb::GenerateRequest { ignore_eos: true, ..req(id, &case.prompt_ids, UNFINISHABLE) };

    // 1. The client hangs up after three messages: the worker aborts the request within a step.
    let before = counters(metrics).await;
    let mut stream = client.generate(long("cancel-me")).await.unwrap().into_inner();
    for _ in 0..3 {
        stream.next().await.unwrap().unwrap();
    }
    drop(stream);
    wait_idle(&mut client).await;
    let after = counters(metrics).await;
    assert_eq!(after.aborts - before.aborts, 1.0, "the hang-up counts as an abort: {before:?} -> {after:?}");
    let generated = after.generated - before.generated;
    assert!((3.0..AFTER_ABORT).contains(&generated), "{generated} tokens generated of a {UNFINISHABLE}-token budget");
    assert_eq!(after.kv_used, before.kv_used, "KV blocks in use return to what they were");

    // 2. The Abort RPC: the stream ends with Finished(ABORT) after a few tokens.
    let before = counters(metrics).await;
    let mut stream = client.generate(long("abort-me")).await.unwrap().into_inner();
    let first = stream.next().await.unwrap().unwrap();
    let found = client.abort(pb::AbortRequest { request_id: "abort-me".into(), index: None }).await.unwrap().into_inner().found;
    assert!(found);
    let mut streamed = 0;
    let mut last = Some(first);
    let rest = async {
        while let Some(m) = stream.next().await {
            if let Some(pb::generate_response::Kind::Chunk(c)) = &last.as_ref().unwrap().kind {
                streamed += c.token_ids.len();
            }
            last = Some(m.unwrap());
        }
    };
    tokio::time::timeout(Duration::from_secs(10), rest).await.expect("the aborted stream ends");
    match last.and_then(|m| m.kind) {
        Some(pb::generate_response::Kind::Finished(f)) => {
            assert_eq!(f.reason, pb::FinishReason::Abort as i32);
            assert!(
                f.completion_tokens >= 1 && f64::from(f.completion_tokens) < AFTER_ABORT,
                "{} of {UNFINISHABLE} tokens",
                f.completion_tokens
            );
            assert_eq!(f.completion_tokens as usize, streamed, "every generated token was streamed");
        }
        other => panic!("expected Finished(ABORT), got {other:?}"),
    }
    let again = client.abort(pb::AbortRequest { request_id: "abort-me".into(), index: None }).await.unwrap().into_inner().found;
    assert!(!again, "abort is idempotent");
    wait_idle(&mut client).await;
    let after = counters(metrics).await;
    assert_eq!(after.aborts - before.aborts, 1.0, "{before:?} -> {after:?}");
    assert!(after.generated - before.generated < AFTER_ABORT, "{before:?} -> {after:?}");
    assert_eq!(after.kv_used, before.kv_used, "KV blocks in use return to what they were");

    // 3. One completion of n = 2 (a choice that hit a stop string in the router): it ends with ABORT, the other runs
    // on to its length.
    let before = counters(metrics).await;
    let mut two = req("abort-one", &case.prompt_ids, 24);
    two.n = 2;
    two.ignore_eos = true;
    let mut stream = client.generate(two).await.unwrap().into_inner();
    stream.next().await.unwrap().unwrap();
    let one = pb::AbortRequest { request_id: "abort-one".into(), index: Some(1) };
    assert!(client.abort(one).await.unwrap().into_inner().found);
    let mut finished = Vec::new();
    while let Some(m) = stream.next().await {
        if let Some(pb::generate_response::Kind::Finished(f)) = m.unwrap().kind {
            finished.push((f.index, f.reason, f.completion_tokens));
        }
    }
    finished.sort();
    assert_eq!(finished.len(), 2, "{finished:?}");
    assert_eq!((finished[0].0, finished[0].1, finished[0].2), (0, pb::FinishReason::Length as i32, 24), "{finished:?}");
    assert_eq!((finished[1].0, finished[1].1), (1, pb::FinishReason::Abort as i32), "{finished:?}");
    assert!(finished[1].2 < 24, "{finished:?}");
    wait_idle(&mut client).await;
    let after = counters(metrics).await;
    assert_eq!(after.aborts - before.aborts, 1.0, "{before:?} -> {after:?}");
    assert_eq!(after.generated - before.generated, f64::from(24 + finished[1].2), "{before:?} -> {after:?}");
    assert_eq!(after.kv_used, before.kv_used);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_options_seeds_n_and_logprobs() {
    let mut client = start(64).await;
    let prompt = ref_cases()[1].prompt_ids.clone();
    let sampled = |id: &str, n: u32| pb::GenerateRequest {
        sampling: Some(pb::SamplingParams { temperature: Some(0.9), top_p: Some(0.95), top_k: Some(50), ..Default::default() }),
        seed: Some(42),
        n,
        ..req(id, &prompt, 10)
    };
    let a = collect(&mut client, sampled("s1", 1)).await.unwrap();
    // The same seed among other traffic gives the same tokens.
    let mut noise = Vec::new();
    for i in 0..4 {
        let mut c = client.clone();
        let p = prompt.clone();
        noise.push(tokio::spawn(async move { collect(&mut c, req(&format!("noise{i}"), &p, 10)).await }));
    }
    let b = collect(&mut client, sampled("s2", 1)).await.unwrap();
    for t in noise {
        t.await.unwrap().unwrap();
    }
    assert_eq!(a.tokens, b.tokens);
    // n = 3: three completions; the copies reuse the prompt's cached blocks.
    let n3 = collect(&mut client, sampled("n3", 3)).await.unwrap();
    assert_eq!(n3.finished.len(), 3);
    assert_eq!(n3.tokens.len(), 3);
    assert_eq!(n3.tokens[0], a.tokens[0], "completion 0 uses the request seed like n = 1");
    // Logprobs with alternatives.
    let lp = pb::GenerateRequest { logprobs: true, top_logprobs: 5, ..req("lp", &prompt, 4) };
    let done = collect(&mut client, lp).await.unwrap();
    assert_eq!(done.logprobs.len(), 4);
    for (l, &tok) in done.logprobs.iter().zip(&done.tokens[0]) {
        assert_eq!(l.top.len(), 5);
        assert!(l.logprob <= 0.0);
        assert_eq!(l.top[0].token_id, tok, "greedy picks the top alternative");
    }
    wait_idle(&mut client).await;
}

/// Each stopping option changes the outcome of a prompt whose plain greedy output ends with eos after k tokens:
/// `ignore_eos` runs it to `max_new_tokens`, `min_tokens` suppresses eos until that many tokens, and a stop id taken
/// from inside the plain output ends it right there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignore_eos_min_tokens_and_stop_ids_each_change_the_outcome() {
    const BUDGET: u32 = 24;
    let mut client = start(16).await;
    let eos = client.info(pb::InfoRequest {}).await.unwrap().into_inner().eos_ids;
    // chat_capital: "The capital of France is Paris." then <|im_end|> (eos), 8 tokens.
    let case = ref_cases().into_iter().find(|c| c.name == "chat_capital").unwrap();
    let run = |r: pb::GenerateRequest| {
        let mut c = client.clone();
        async move {
            let done = tokio::time::timeout(Duration::from_secs(60), collect(&mut c, r)).await.expect("bounded").unwrap();
            assert_eq!(done.finished.len(), 1);
            let f = done.finished[0];
            assert_eq!(f.completion_tokens as usize, done.tokens[0].len());
            (done.tokens[0].clone(), f)
        }
    };
    let (plain, f) = run(req("plain", &case.prompt_ids, BUDGET)).await;
    let k = plain.len();
    assert_eq!((f.reason, f.matched_stop_token), (pb::FinishReason::Stop as i32, plain.last().copied()), "{plain:?}");
    assert!(eos.contains(&plain[k - 1]) && k >= 6 && k < BUDGET as usize / 2, "the plain run ends with eos early: {plain:?}");
    assert!(!plain[..k - 1].iter().any(|t| eos.contains(t)));

    // ignore_eos: eos is generated (the sampler never masks it for this flag) but does not stop the request.
    let (out, f) = run(pb::GenerateRequest { ignore_eos: true, ..req("ignore-eos", &case.prompt_ids, BUDGET) }).await;
    assert_eq!((f.reason, f.matched_stop_token, out.len()), (pb::FinishReason::Length as i32, None, BUDGET as usize), "{out:?}");
    assert_eq!(out[..k], plain[..], "the plain run, eos included, then more");

    // min_tokens beyond k: eos is masked until then, so the k-th token is another one; the request ends no earlier.
    let min = k as u32 + 4;
    let (out, f) = run(pb::GenerateRequest { min_tokens: min, ..req("min-tokens", &case.prompt_ids, BUDGET) }).await;
    assert_eq!(out[..k - 1], plain[..k - 1], "min_tokens changes nothing before eos");
    assert!(out.len() >= min as usize, "{} tokens, min_tokens {min}: {out:?}", out.len());
    assert!(!out[..min as usize].iter().any(|t| eos.contains(t)), "eos before min_tokens: {out:?}");
    if f.reason == pb::FinishReason::Stop as i32 {
        assert!(eos.contains(out.last().unwrap()) && f.matched_stop_token == out.last().copied(), "{f:?} {out:?}");
    } else {
        assert_eq!((f.reason, out.len()), (pb::FinishReason::Length as i32, BUDGET as usize));
    }

    // A stop id: the first token of the plain output (from position 2 on) that does not occur before it.
    let j = (2..k - 1).find(|&j| !plain[..j].contains(&plain[j])).expect("a fresh token inside the plain output");
    let stop = plain[j];
    let (out, f) = run(pb::GenerateRequest { stop_token_ids: vec![stop], ..req("stop-id", &case.prompt_ids, BUDGET) }).await;
    assert_eq!(out, plain[..=j], "ends right at the stop id (position {j})");
    assert_eq!((f.reason, f.matched_stop_token), (pb::FinishReason::Stop as i32, Some(stop)));
    wait_idle(&mut client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_invalid_argument_naming_the_field() {
    let mut client = start(16).await;
    let ok = req("x", &[1, 2, 3], 4);
    let cases: Vec<(pb::GenerateRequest, &str)> = vec![
        (pb::GenerateRequest { prompt_ids: vec![], ..ok.clone() }, "prompt_ids"),
        (pb::GenerateRequest { prompt_ids: vec![1, 999_999], ..ok.clone() }, "prompt_ids"),
        (pb::GenerateRequest { prompt_ids: vec![1; 1024], ..ok.clone() }, "prompt_ids"),
        (pb::GenerateRequest { request_id: String::new(), ..ok.clone() }, "request_id"),
        (pb::GenerateRequest { max_new_tokens: 5000, ..ok.clone() }, "max_new_tokens"),
        (
            pb::GenerateRequest { sampling: Some(pb::SamplingParams { temperature: Some(-1.0), ..Default::default() }), ..ok.clone() },
            "temperature",
        ),
        (pb::GenerateRequest { sampling: Some(pb::SamplingParams { top_p: Some(0.0), ..Default::default() }), ..ok.clone() }, "top_p"),
        (pb::GenerateRequest { sampling: Some(pb::SamplingParams { min_p: Some(2.0), ..Default::default() }), ..ok.clone() }, "min_p"),
        (pb::GenerateRequest { top_logprobs: 3, ..ok.clone() }, "top_logprobs"),
        (pb::GenerateRequest { stop_token_ids: vec![49_152], ..ok.clone() }, "stop_token_ids"),
        (pb::GenerateRequest { logit_bias: vec![pb::LogitBias { token_id: 1, bias: 500.0 }], ..ok.clone() }, "logit_bias"),
        (pb::GenerateRequest { n: 100, ..ok.clone() }, "`n`"),
        (pb::GenerateRequest { min_tokens: 9, ..ok.clone() }, "min_tokens"),
    ];
    for (r, field) in cases {
        let e = collect(&mut client, r).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().contains(field), "`{}` should name {field}", e.message());
    }
    let info = client.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.hash_version, ferrite_common::hash::HASH_VERSION);
    assert_eq!((info.block_size, info.max_model_len, info.vocab_size), (16, 1024, 49_152));
    assert_eq!(info.model_fingerprint.len(), 16);
    wait_idle(&mut client).await;

    // Admission control: on a worker whose KV cache is smaller than the context, a request that fits the context
    // but not the cache is refused up front (INVALID_ARGUMENT naming `max_new_tokens`, the field to shrink); one
    // that fills the cache exactly runs.
    let (mut small, _) = start_cfg(WorkerConfig { kv_cache_mib: 4, ..test_worker_config() }).await;
    let info = small.info(pb::InfoRequest {}).await.unwrap().into_inner();
    let cache_tokens = info.kv_blocks_total * info.block_size;
    assert!(cache_tokens < info.max_model_len, "{info:?}");
    let prompt = [1, 2, 3];
    for max_new in [cache_tokens - 2, 0] {
        let refused = tokio::time::timeout(Duration::from_secs(10), collect(&mut small, req("too-large", &prompt, max_new)));
        let e = refused.await.expect("refused up front, not queued").unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "max_new_tokens {max_new}: {e:?}");
        assert!(e.message().contains("`max_new_tokens`") && e.message().contains("KV blocks"), "{}", e.message());
    }
    let fits = pb::GenerateRequest { ignore_eos: true, ..req("fits", &prompt, cache_tokens - 3) };
    let done = tokio::time::timeout(Duration::from_secs(60), collect(&mut small, fits)).await.expect("bounded").unwrap();
    assert_eq!(done.tokens[0].len() as u32, cache_tokens - 3);
    wait_idle(&mut small).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_resource_exhausted_and_loses_nothing() {
    // One running sequence and room for two waiting ones: with A running and B, C queued, D is refused with
    // RESOURCE_EXHAUSTED; the others complete and nothing stays allocated.
    let (mut client, _) = start_with_metrics(2, 1).await;
    let prompt = ref_cases()[0].prompt_ids.clone();
    let mut a = client.generate(pb::GenerateRequest { ignore_eos: true, ..req("A", &prompt, 300) }).await.unwrap().into_inner();
    a.next().await.unwrap().unwrap();
    let mut queued = Vec::new();
    for id in ["B", "C"] {
        let mut c = client.clone();
        let p = prompt.clone();
        queued.push(tokio::spawn(async move { collect(&mut c, req(id, &p, 4)).await }));
    }
    for _ in 0..200 {
        if client.health(pb::HealthRequest {}).await.unwrap().into_inner().waiting == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let e = collect(&mut client, req("D", &prompt, 4)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("overloaded"), "{}", e.message());
    assert!(client.abort(pb::AbortRequest { request_id: "A".into(), index: None }).await.unwrap().into_inner().found);
    drop(a);
    for t in queued {
        assert_eq!(t.await.unwrap().unwrap().tokens[0].len(), 4);
    }
    wait_idle(&mut client).await;
}

/// A worker serving the default model over 3 tensor-parallel CPU ranks gives the TP=1 greedy tokens through the
/// engine (continuous batching of several requests), reports tp = 3, and frees every KV block.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensor_parallel_worker_matches_tp1() {
    let (one, _) = start_worker(64, 8, 1).await;
    let (mut three, _) = start_worker(64, 8, 3).await;
    assert_eq!(three.info(pb::InfoRequest {}).await.unwrap().into_inner().tp, 3);
    let cases = ref_cases();
    let mut handles = Vec::new();
    for (i, c) in cases.iter().take(4).enumerate() {
        let (mut a, mut b) = (one.clone(), three.clone());
        let prompt = c.prompt_ids.clone();
        handles.push(tokio::spawn(async move {
            let want = collect(&mut a, req(&format!("one-{i}"), &prompt, 12)).await.unwrap().tokens;
            let got = collect(&mut b, req(&format!("three-{i}"), &prompt, 12)).await.unwrap().tokens;
            (want, got)
        }));
    }
    for h in handles {
        let (want, got) = tokio::time::timeout(Duration::from_secs(120), h).await.expect("bounded").unwrap();
        assert_eq!(got, want);
    }
    assert_eq!(wait_idle(&mut three).await.kv_blocks_used, 0);
}
