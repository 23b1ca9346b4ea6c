//! Real `ferrite worker` and `ferrite router` processes on loopback, for cluster tests that kill and restart them,
//! and a small HTTP client for the router (JSON and SSE). Every wait is bounded; a process is killed when its handle
//! is dropped, and its log (a temporary file) is shown when it fails to start.
//!
//! The binary is `$FERRITE_BIN`, else `ferrite` next to the test executable's `deps/` folder (the same target
//! directory): build it first with `cargo build --release --bin ferrite`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::default_model;

/// The `ferrite` binary the cluster tests start.
pub fn ferrite_bin() -> PathBuf {
    if let Ok(p) = std::env::var("FERRITE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("the test executable's path");
    let p = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps/<test>").join("ferrite");
    assert!(p.is_file(), "{} not found: build it first (`cargo build --release --bin ferrite`) or set FERRITE_BIN", p.display());
    p
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("an ephemeral port").port()
}

/// A child process, killed (SIGKILL) and reaped when dropped.
pub struct Proc {
    child: Child,
    log: tempfile::NamedTempFile,
}

impl Proc {
    fn spawn(args: &[String]) -> Self {
        let log = tempfile::Builder::new().prefix("ferrite-cluster-").suffix(".log").tempfile().expect("a log file");
        let out = log.reopen().expect("log file");
        let err = log.reopen().expect("log file");
        let child = Command::new(ferrite_bin())
            .args(args)
            .env_remove("FERRITE_WORKERS")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", ferrite_bin().display()));
        Self { child, log }
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log.path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `ferrite worker` process (CPU, one thread, the default model).
pub struct WorkerProc {
    pub proc: Proc,
    pub port: u16,
    /// `http://127.0.0.1:PORT`, as the router names it.
    pub addr: String,
}

/// Starts a worker on `port` and waits (up to 120 s) until it answers `Info`.
pub async fn start_worker(port: u16) -> WorkerProc {
    let args: Vec<String> = [
        "worker",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--model",
        &default_model().to_string_lossy(),
        "--threads",
        "1",
        "--kv-cache-mib",
        "64",
        "--max-model-len",
        "1024",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut proc = Proc::spawn(&args);
    let addr = format!("http://127.0.0.1:{port}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        assert!(!proc.exited(), "the worker on port {port} exited:\n{}", proc.log_tail());
        assert!(tokio::time::Instant::now() < deadline, "the worker on port {port} did not answer within 120 s:\n{}", proc.log_tail());
        if let Ok(Ok(mut c)) =
            tokio::time::timeout(Duration::from_secs(2), ferrite_common::proto::worker::worker_client::WorkerClient::connect(addr.clone()))
                .await
            && c.info(ferrite_common::proto::worker::InfoRequest {}).await.is_ok()
        {
            return WorkerProc { proc, port, addr };
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A `ferrite router` process.
pub struct RouterProc {
    pub proc: Proc,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
}

/// Starts a router for `workers` with `extra` flags and waits (up to 120 s) until `/v1/health/ready` is 200.
pub async fn start_router(workers: &[String], extra: &[&str]) -> RouterProc {
    let port = free_port();
    let mut args: Vec<String> = vec!["router".into(), "--host".into(), "127.0.0.1".into(), "--port".into(), port.to_string()];
    args.extend(["--model".to_string(), default_model().to_string_lossy().into_owned()]);
    for w in workers {
        args.extend(["--worker".to_string(), w.clone()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let mut proc = Proc::spawn(&args);
    let base = format!("http://127.0.0.1:{port}");
    let http = Http::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        assert!(!proc.exited(), "the router exited:\n{}", proc.log_tail());
        assert!(tokio::time::Instant::now() < deadline, "the router was not ready within 120 s:\n{}", proc.log_tail());
        if let Ok((200, _)) = http.get(&format!("{base}/v1/health/ready")).await {
            return RouterProc { proc, base };
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A response of the router.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    /// `x-ferrite-worker`.
    pub worker: Option<String>,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// A streamed completion, put together.
#[derive(Debug, Clone, Default)]
pub struct Streamed {
    pub worker: Option<String>,
    /// Choice 0's text.
    pub text: String,
    pub finish_reason: Option<String>,
    /// The usage chunk (`stream_options.include_usage`).
    pub usage: Option<Value>,
    /// A final error event.
    pub error: Option<Value>,
    pub done: bool,
}

/// An HTTP/1 client for the router.
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Http {
    fn default() -> Self {
        Self::new()
    }
}

/// How long one request may take before the test fails (no hang).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(180);

impl Http {
    pub fn new() -> Self {
        Self { client: Client::builder(TokioExecutor::new()).build_http() }
    }

    /// GET `url`: status and body.
    pub async fn get(&self, url: &str) -> Result<(u16, String), String> {
        let req = hyper::Request::get(url).body(Full::new(Bytes::new())).map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.client.request(req))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// POST `body` as JSON to `url`; the whole response (bounded by [`REQUEST_TIMEOUT`]).
    pub async fn post(&self, url: &str, body: &Value) -> Reply {
        let run = async {
            let req = hyper::Request::post(url)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
                .expect("a request");
            let resp = self.client.request(req).await.expect("the router answers");
            let status = resp.status().as_u16();
            let worker = resp.headers().get("x-ferrite-worker").and_then(|v| v.to_str().ok()).map(str::to_string);
            let bytes = resp.into_body().collect().await.expect("a body").to_bytes();
            Reply { status, worker, body: String::from_utf8_lossy(&bytes).into_owned() }
        };
        tokio::time::timeout(REQUEST_TIMEOUT, run).await.unwrap_or_else(|_| panic!("no answer from {url} within {REQUEST_TIMEOUT:?}"))
    }

    /// POST a streaming completion request; calls `on_start` with the serving worker once the headers are in (the
    /// first token exists), then reads the SSE stream to its end (bounded by [`REQUEST_TIMEOUT`]).
    pub async fn stream(&self, url: &str, body: &Value, on_start: impl FnOnce(Option<String>)) -> Streamed {
        let run = async {
            let req = hyper::Request::post(url)
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body.to_string())))
                .expect("a request");
            let resp = self.client.request(req).await.expect("the router answers");
            let status = resp.status().as_u16();
            let worker = resp.headers().get("x-ferrite-worker").and_then(|v| v.to_str().ok()).map(str::to_string);
            if status != 200 {
                let bytes = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                panic!("stream refused with {status}: {}", String::from_utf8_lossy(&bytes));
            }
            on_start(worker.clone());
            let bytes = resp.into_body().collect().await.expect("the SSE body").to_bytes();
            let mut out = Streamed { worker, ..Streamed::default() };
            for line in String::from_utf8_lossy(&bytes).lines() {
                let Some(data) = line.strip_prefix("data: ") else { continue };
                if data == "[DONE]" {
                    out.done = true;
                    continue;
                }
                let v: Value = serde_json::from_str(data).unwrap_or_else(|e| panic!("bad SSE data ({e}): {data}"));
                if v.get("error").is_some() {
                    out.error = Some(v);
                    continue;
                }
                if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
                    out.usage = Some(u.clone());
                }
                for c in v["choices"].as_array().into_iter().flatten().filter(|c| c["index"] == 0) {
                    out.text.push_str(c["text"].as_str().unwrap_or_default());
                    if let Some(r) = c["finish_reason"].as_str() {
                        out.finish_reason = Some(r.to_string());
                    }
                }
            }
            out
        };
        tokio::time::timeout(REQUEST_TIMEOUT, run)
            .await
            .unwrap_or_else(|_| panic!("the stream from {url} did not end within {REQUEST_TIMEOUT:?}"))
    }

    /// The value of the Prometheus sample `series` (e.g. `name{label="x"}`) on `base`/metrics, 0 when absent.
    pub async fn metric(&self, base: &str, series: &str) -> f64 {
        let (_, text) = self.get(&format!("{base}/metrics")).await.expect("/metrics");
        text.lines()
            .filter_map(|l| l.strip_prefix(series))
            .filter_map(|rest| rest.strip_prefix(' '))
            .find_map(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    }
}
