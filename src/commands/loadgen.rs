//! `ferrite loadgen`: a closed-loop load generator for any OpenAI-compatible server (Ferrite, llama.cpp, vLLM...).
//! `--concurrency` clients each send streaming requests back to back over keep-alive HTTP/1.1 connections until
//! `--requests` have been sent, then it reports TTFT, inter-token and end-to-end latency percentiles and throughput.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// OpenAI base URL (plain http).
    #[arg(long, default_value = "http://127.0.0.1:8000/v1")]
    base_url: String,
    /// Model name. Default: the first id from GET <base-url>/models.
    #[arg(long)]
    model: Option<String>,
    /// Bearer token sent as `Authorization`.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Use /chat/completions (one user message) instead of /completions.
    #[arg(long)]
    chat: bool,
    /// Requests in flight at once (each client sends its next request when the previous one ends).
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Measured requests in total.
    #[arg(long, default_value_t = 32)]
    requests: usize,
    /// Approximate prompt length in tokens (words from a fixed list, about one token each).
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// max_tokens of every request (sent with `ignore_eos: true` and temperature 0).
    #[arg(long, default_value_t = 128)]
    output_tokens: usize,
    /// Leading prompt words identical across requests (exercises prefix caching).
    #[arg(long, default_value_t = 0)]
    shared_prefix: usize,
    /// How many different shared prefixes (request i uses prefix i mod N): groups of requests that share a long
    /// system prompt, the workload of prefix-cache-aware routing.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    prefix_groups: u64,
    /// Varies every prompt, shared prefixes included (0: the fixed prompts). Runs that must not find each other's
    /// prompts in a server's cache (rounds of an interleaved benchmark) pass different seeds.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Unmeasured requests sent first, at the same concurrency.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// Per-request timeout in seconds.
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// Constrain every request to this JSON Schema (a file): `response_format` `json_schema` (structured-outputs
    /// overhead against free requests).
    #[arg(long)]
    json_schema: Option<std::path::PathBuf>,
    /// The schema read from `--json-schema`.
    #[arg(skip)]
    schema: Option<Value>,
}

const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "was", "for", "on", "with", "as", "by", "at", "from", "that", "this", "it", "he", "she", "they",
    "we", "you", "his", "her", "their", "our", "time", "year", "people", "way", "day", "man", "world", "life", "hand", "part", "child",
    "eye", "woman", "place", "work", "week", "case", "point", "number", "group", "problem", "fact", "house", "water", "city", "river",
    "tree", "stone", "light", "night", "road", "book", "table", "door", "music", "color", "green", "small",
];

/// splitmix64: a fixed, well-mixed hash so prompts are deterministic across runs and machines.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// `words` words; the first `shared` are the same for every `id` of a group, the rest depend on `id`; all depend on
/// `seed` (seed 0 gives the prompts of earlier versions).
fn make_prompt(id: u64, words: usize, shared: usize, groups: u64, seed: u64) -> String {
    let salt = mix(id ^ 0x5eed_0000_0000_0000);
    let group = id % groups;
    let prefix_salt = if seed == 0 { 0 } else { mix(seed) };
    let salt = salt ^ prefix_salt;
    let pick = |j: usize| {
        let h = if j < shared { mix(j as u64 ^ (group << 32) ^ prefix_salt) } else { mix(salt ^ mix(j as u64)) };
        WORDS[(h % WORDS.len() as u64) as usize]
    };
    (0..words).map(pick).collect::<Vec<_>>().join(" ")
}

/// Splits a byte stream into lines (LF or CRLF), keeping a partial line (and partial UTF-8) across pushes.
#[derive(Default)]
struct LineSplitter {
    buf: Vec<u8>,
}

impl LineSplitter {
    fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(chunk);
        let Some(end) = self.buf.iter().rposition(|&b| b == b'\n') else { return Vec::new() };
        let rest = self.buf.split_off(end + 1);
        let done = std::mem::replace(&mut self.buf, rest);
        done[..end].split(|&b| b == b'\n').map(|l| String::from_utf8_lossy(l.strip_suffix(b"\r").unwrap_or(l)).into_owned()).collect()
    }
}

/// Linear-interpolated percentile (`p` in 0..=100) of sorted values; None when empty.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let rank = (p / 100.0).clamp(0.0, 1.0) * (n - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64))
}

/// One finished request; times in milliseconds.
struct Sample {
    ttft: f64,
    itl: Vec<f64>,
    e2e: f64,
    output_tokens: usize,
    prompt_tokens: usize,
}

struct Ctx {
    client: HttpClient,
    uri: Uri,
    auth: Option<String>,
    model: String,
    a: Args,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn get_u(v: &Value, k: &str) -> Option<usize> {
    v.get(k).and_then(Value::as_u64).map(|x| x as usize)
}

impl Ctx {
    fn body(&self, id: u64) -> Vec<u8> {
        let a = &self.a;
        let prompt = make_prompt(id, a.prompt_tokens, a.shared_prefix, a.prefix_groups, a.seed);
        let mut b = json!({
            "model": self.model, "max_tokens": a.output_tokens, "temperature": 0.0, "ignore_eos": true,
            "stream": true, "stream_options": {"include_usage": true},
        });
        if a.chat {
            b["messages"] = json!([{"role": "user", "content": prompt}]);
        } else {
            b["prompt"] = json!(prompt);
        }
        if let Some(schema) = &a.schema {
            b["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "bench", "schema": schema}});
        }
        serde_json::to_vec(&b).expect("json")
    }

    fn request(&self, method: &str, uri: Uri, body: Vec<u8>) -> anyhow::Result<Request<Full<Bytes>>> {
        let mut r = Request::builder().method(method).uri(uri).header("content-type", "application/json");
        if let Some(k) = &self.auth {
            r = r.header("authorization", format!("Bearer {k}"));
        }
        Ok(r.body(Full::new(Bytes::from(body)))?)
    }

    /// Sends request `id` and reads its whole SSE stream (to the end, so the connection is reused).
    async fn one(&self, id: u64) -> anyhow::Result<Sample> {
        let req = self.request("POST", self.uri.clone(), self.body(id))?;
        let start = Instant::now();
        let resp = self.client.request(req).await?;
        let status = resp.status();
        if status != StatusCode::OK {
            let b = resp.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            bail!("HTTP {status}: {}", String::from_utf8_lossy(&b[..b.len().min(400)]).trim());
        }
        let mut body = resp.into_body();
        let mut lines = LineSplitter::default();
        let (mut first, mut last, mut itl) = (None::<Instant>, None::<Instant>, Vec::new());
        let (mut chunks, mut usage, mut done) = (0usize, Value::Null, false);
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else { continue };
            let now = Instant::now();
            for line in lines.push(&data) {
                let Some(payload) = line.strip_prefix("data:").map(str::trim) else { continue };
                if done || payload.is_empty() {
                    continue;
                }
                if payload == "[DONE]" {
                    done = true;
                    continue;
                }
                let v: Value = serde_json::from_str(payload).with_context(|| format!("bad SSE data: {payload}"))?;
                if let Some(e) = v.get("error") {
                    let msg = e.get("message").and_then(Value::as_str).map_or_else(|| e.to_string(), str::to_string);
                    bail!("SSE error: {msg}");
                }
                if v.get("usage").is_some_and(|u| !u.is_null()) {
                    usage = v["usage"].clone();
                }
                let c = &v["choices"][0];
                let text = c["text"].as_str().or_else(|| c["delta"]["content"].as_str()).unwrap_or("");
                if !text.is_empty() {
                    chunks += 1;
                    match last {
                        Some(l) => itl.push(ms(now - l)),
                        None => first = Some(now),
                    }
                    last = Some(now);
                }
            }
        }
        let end = Instant::now();
        let Some(first) = first else { bail!("stream ended without any content") };
        Ok(Sample {
            ttft: ms(first - start),
            itl,
            e2e: ms(end - start),
            output_tokens: get_u(&usage, "completion_tokens").unwrap_or(chunks),
            prompt_tokens: get_u(&usage, "prompt_tokens").unwrap_or(0),
        })
    }
}

type Results = Arc<Mutex<Vec<Result<Sample, String>>>>;

/// Sends requests `first_id..first_id + n` from `concurrency` clients, pushing each outcome to `out`.
async fn phase(ctx: Arc<Ctx>, first_id: u64, n: usize, out: Results) {
    let next = Arc::new(AtomicUsize::new(0));
    let timeout = Duration::from_secs(ctx.a.timeout_s);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..ctx.a.concurrency.clamp(1, n.max(1)) {
        let (ctx, next, out) = (ctx.clone(), next.clone(), out.clone());
        set.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let r = match tokio::time::timeout(timeout, ctx.one(first_id + i as u64)).await {
                    Ok(r) => r.map_err(|e| format!("{e:#}")),
                    Err(_) => Err(format!("timed out after {} s", timeout.as_secs())),
                };
                out.lock().unwrap().push(r);
            }
        });
    }
    while set.join_next().await.is_some() {}
}

async fn first_model(ctx: &Ctx) -> anyhow::Result<String> {
    let uri: Uri = format!("{}/models", ctx.a.base_url.trim_end_matches('/')).parse()?;
    let resp = ctx.client.request(ctx.request("GET", uri.clone(), Vec::new())?).await.with_context(|| format!("GET {uri}"))?;
    let status = resp.status();
    let b = resp.into_body().collect().await?.to_bytes();
    if status != StatusCode::OK {
        bail!("GET {uri}: HTTP {status}: {}", String::from_utf8_lossy(&b));
    }
    let v: Value = serde_json::from_slice(&b).with_context(|| format!("GET {uri}: not JSON"))?;
    v["data"][0]["id"].as_str().map(str::to_string).with_context(|| format!("GET {uri}: no model listed"))
}

fn dist(mut v: Vec<f64>) -> Value {
    v.sort_by(f64::total_cmp);
    let mean = (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
    json!({"p50": percentile(&v, 50.0), "p90": percentile(&v, 90.0), "p99": percentile(&v, 99.0), "mean": mean})
}

fn summarize(results: &[Result<Sample, String>], wall: Duration, concurrency: usize, interrupted: bool) -> Value {
    let ok: Vec<&Sample> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    let errors = results.len() - ok.len();
    let first_error = results.iter().find_map(|r| r.as_ref().err());
    let out: usize = ok.iter().map(|s| s.output_tokens).sum();
    let secs = wall.as_secs_f64().max(1e-9);
    // TPOT: per request, (e2e - ttft) / (output tokens - 1), as vLLM's benchmark reports it.
    let tpot = ok.iter().filter(|s| s.output_tokens > 1).map(|s| (s.e2e - s.ttft) / (s.output_tokens - 1) as f64);
    json!({
        "requests": results.len(), "completed": ok.len(), "errors": errors, "first_error": first_error,
        "interrupted": interrupted, "concurrency": concurrency, "duration_s": secs,
        "requests_per_s": ok.len() as f64 / secs, "output_tokens": out, "output_tokens_per_s": out as f64 / secs,
        "prompt_tokens": ok.iter().map(|s| s.prompt_tokens).sum::<usize>(),
        "ttft_ms": dist(ok.iter().map(|s| s.ttft).collect()),
        "itl_ms": dist(ok.iter().flat_map(|s| s.itl.iter().copied()).collect()),
        "tpot_ms": dist(tpot.collect()),
        "e2e_ms": dist(ok.iter().map(|s| s.e2e).collect()),
    })
}

fn print_text(s: &Value) {
    let f = |v: &Value| v.as_f64().map_or("-".to_string(), |x| format!("{x:.1}"));
    println!(
        "{} requests ({} ok, {} errors{}) in {:.2} s at concurrency {}",
        s["requests"],
        s["completed"],
        s["errors"],
        if s["interrupted"] == true { ", interrupted" } else { "" },
        s["duration_s"].as_f64().unwrap_or(0.0),
        s["concurrency"],
    );
    println!(
        "throughput: {:.2} req/s, {} output tok/s ({} output tokens, {} prompt tokens)",
        s["requests_per_s"].as_f64().unwrap_or(0.0),
        f(&s["output_tokens_per_s"]),
        s["output_tokens"],
        s["prompt_tokens"],
    );
    println!("{:<10}{:>10}{:>10}{:>10}{:>10}", "ms", "p50", "p90", "p99", "mean");
    for (name, key) in [("TTFT", "ttft_ms"), ("ITL", "itl_ms"), ("TPOT", "tpot_ms"), ("E2E", "e2e_ms")] {
        let d = &s[key];
        println!("{name:<10}{:>10}{:>10}{:>10}{:>10}", f(&d["p50"]), f(&d["p90"]), f(&d["p99"]), f(&d["mean"]));
    }
    if let Some(e) = s["first_error"].as_str() {
        println!("first error: {e}");
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(run_async(a))
}

async fn run_async(mut a: Args) -> anyhow::Result<()> {
    if let Some(path) = &a.json_schema {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading --json-schema {}", path.display()))?;
        a.schema = Some(serde_json::from_str(&text).with_context(|| format!("--json-schema {}: not JSON", path.display()))?);
    }
    let path = if a.chat { "chat/completions" } else { "completions" };
    let uri: Uri = format!("{}/{path}", a.base_url.trim_end_matches('/')).parse().context("--base-url")?;
    if uri.scheme_str() != Some("http") {
        bail!("--base-url must be an http:// URL (no TLS support), got {}", a.base_url);
    }
    let mut conn = HttpConnector::new();
    conn.set_nodelay(true);
    // A fresh connection per request (loopback: ~0.1 ms, against requests of 100+ ms): reusing idle keep-alive
    // connections races with servers that close them (llama-server does), which fails a request now and then with
    // "connection closed before message completed" and would count against that server.
    let client = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build(conn);
    let mut ctx = Ctx { client, uri, auth: a.api_key.clone(), model: String::new(), a };
    ctx.model = match ctx.a.model.clone() {
        Some(m) => m,
        None => first_model(&ctx).await?,
    };
    let ctx = Arc::new(ctx);
    let a = &ctx.a;
    eprintln!(
        "loadgen: {} (model {}): {} requests, concurrency {}, ~{} prompt tokens ({} shared), {} output tokens",
        ctx.uri, ctx.model, a.requests, a.concurrency, a.prompt_tokens, a.shared_prefix, a.output_tokens
    );
    if a.warmup > 0 {
        let out: Results = Default::default();
        tokio::select! {
            _ = phase(ctx.clone(), 1 << 40, a.warmup, out.clone()) => {}
            _ = tokio::signal::ctrl_c() => bail!("interrupted during warmup"),
        }
        let out = out.lock().unwrap();
        if let Some(Err(e)) = out.iter().find(|r| r.is_err()) {
            eprintln!("loadgen: {} of {} warmup requests failed: {e}", out.iter().filter(|r| r.is_err()).count(), out.len());
        }
    }
    let out: Results = Default::default();
    let start = Instant::now();
    let interrupted = tokio::select! {
        _ = phase(ctx.clone(), 0, a.requests, out.clone()) => false,
        _ = tokio::signal::ctrl_c() => true,
    };
    let wall = start.elapsed();
    let results = std::mem::take(&mut *out.lock().unwrap());
    let summary = summarize(&results, wall, a.concurrency, interrupted);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_text(&summary);
    }
    if !results.is_empty() && summary["completed"] == 0 {
        bail!("all {} requests failed", results.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitter_joins_lines_across_frames() {
        let mut s = LineSplitter::default();
        assert!(s.push(b"data: {\"a\"").is_empty());
        assert_eq!(s.push(b":1}\r\n\r\ndata: [DO"), vec!["data: {\"a\":1}", ""]);
        assert_eq!(s.push(b"NE]\n\n"), vec!["data: [DONE]", ""]);
        assert!(s.push(b"").is_empty());
        // A multi-byte character split across frames survives.
        let bytes = "data: é\n".as_bytes();
        assert!(s.push(&bytes[..7]).is_empty());
        assert_eq!(s.push(&bytes[7..]), vec!["data: é"]);
    }

    #[test]
    fn percentiles_interpolate() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        let v: Vec<f64> = (1..=5).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 50.0), Some(3.0));
        assert_eq!(percentile(&v, 100.0), Some(5.0));
        assert!((percentile(&v, 90.0).unwrap() - 4.6).abs() < 1e-12);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert!((percentile(&v, 99.0).unwrap() - 99.01).abs() < 1e-9);
    }

    #[test]
    fn prompts_share_prefix_and_differ_after() {
        let (a, b) = (make_prompt(0, 64, 16, 1, 0), make_prompt(1, 64, 16, 1, 0));
        let (wa, wb): (Vec<_>, Vec<_>) = (a.split(' ').collect(), b.split(' ').collect());
        assert_eq!(wa.len(), 64);
        assert_eq!(wa[..16], wb[..16]);
        assert_ne!(wa[16..], wb[16..]);
        assert_eq!(a, make_prompt(0, 64, 16, 1, 0));
        assert_eq!(make_prompt(3, 0, 0, 1, 0), "");
    }

    #[test]
    fn prefix_groups_share_within_and_differ_across() {
        let words = |id: u64| make_prompt(id, 32, 16, 3, 0).split(' ').map(str::to_string).collect::<Vec<_>>();
        let (g0, g1, g0_again) = (words(0), words(1), words(3));
        assert_eq!(g0[..16], g0_again[..16], "requests 0 and 3 are both group 0");
        assert_ne!(g0[..16], g1[..16], "groups 0 and 1 have different prefixes");
        assert_ne!(g0[16..], g0_again[16..]);
    }

    #[test]
    fn a_seed_changes_every_word_group_prefixes_included() {
        let words = |id: u64, seed: u64| make_prompt(id, 32, 16, 2, seed).split(' ').map(str::to_string).collect::<Vec<_>>();
        let (a, b) = (words(0, 7), words(2, 7));
        assert_eq!(a[..16], b[..16], "same group, same seed: the prefix is shared");
        let other = words(0, 8);
        assert_ne!(a[..16], other[..16], "another seed: another prefix");
        assert_ne!(a[16..], other[16..]);
        assert_eq!(words(0, 7), a);
    }
}
