//! The raft control plane end to end: real `ferrite router` and `ferrite worker` processes on loopback, every wait
//! bounded. Three routers form a group (one bootstraps, two join), a worker registers through a follower, and
//! `/v1/cluster` agrees on all three; killing the leader elects another that still lists the worker, and a worker
//! killed after that goes dead within its lease; a whole-cluster restart recovers members and workers from the data
//! directories; a worker stopped with SIGTERM deregisters and exits 0; a bad data directory is refused untouched.
//! Completions sent to the survivors all through a leader kill succeed; a dead worker leaves the replicated state
//! after `--dead-worker-grace` (no traffic reaches it; restarted at its address it registers again and serves); a
//! fourth router joins (learner, then voter) and the leader is removed with `ferrite cluster remove-router`, after
//! which it exits and the other three route on.
//!
//! The binary is `$FERRITE_BIN`, else `<target>/release/ferrite` (build it first: `cargo build --release --bin
//! ferrite`; scripts/test.sh does).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferrite_tests::{default_model, workspace_root};
use serde_json::Value;

fn binary() -> PathBuf {
    if let Ok(b) = std::env::var("FERRITE_BIN") {
        return PathBuf::from(b);
    }
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| workspace_root().join("target"));
    let b = target.join("release/ferrite");
    assert!(b.is_file(), "{} not found: run `cargo build --release --bin ferrite` first (or set FERRITE_BIN)", b.display());
    b
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A child process, killed (SIGKILL) when dropped.
struct Proc {
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(args: &[String], log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(binary()).args(args).stdin(Stdio::null()).stdout(out.try_clone().unwrap()).stderr(out).spawn().unwrap();
        Self { child, log }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status().unwrap();
        assert!(ok.success());
    }

    /// Waits (bounded) for the exit; panics with the log if it does not come.
    fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let end = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < end, "no exit within {limit:?}; log:\n{}", self.log_text());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One router's addresses and data directory.
#[derive(Clone)]
struct RouterSpec {
    id: u64,
    raft: String,
    http: u16,
    dir: PathBuf,
}

struct Cluster {
    tmp: tempfile::TempDir,
    routers: Vec<RouterSpec>,
}

impl Cluster {
    fn new(n: u64) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let routers = (1..=n)
            .map(|id| RouterSpec {
                id,
                raft: format!("127.0.0.1:{}", free_port()),
                http: free_port(),
                dir: tmp.path().join(format!("data{id}")),
            })
            .collect();
        Self { tmp, routers }
    }

    fn router_args(&self, id: u64, extra: &[&str]) -> Vec<String> {
        let r = &self.routers[id as usize - 1];
        let mut a: Vec<String> = ["router", "--model"].iter().map(|s| s.to_string()).collect();
        a.push(default_model().display().to_string());
        a.extend(["--host".into(), "127.0.0.1".into(), "--port".into(), r.http.to_string()]);
        a.extend(["--raft-id".into(), id.to_string(), "--raft-listen".into(), r.raft.clone()]);
        a.extend(["--data-dir".into(), r.dir.display().to_string()]);
        for p in &self.routers {
            a.extend(["--raft-peer".into(), format!("{}={}", p.id, p.raft)]);
        }
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    }

    fn start_router(&self, id: u64, extra: &[&str]) -> Proc {
        let log = self.tmp.path().join(format!("router{id}-{}.log", free_port()));
        Proc::spawn(&self.router_args(id, extra), log)
    }

    /// A CPU worker (one thread) registering with the given routers' raft addresses.
    fn start_worker(&self, register_with: &[u64]) -> (Proc, String) {
        self.start_worker_on(free_port(), register_with)
    }

    /// A worker listening on `port` (a restart at a known address).
    fn start_worker_on(&self, port: u16, register_with: &[u64]) -> (Proc, String) {
        let addr = format!("http://127.0.0.1:{port}");
        let routers: Vec<String> = register_with.iter().map(|id| self.routers[*id as usize - 1].raft.clone()).collect();
        let mut a: Vec<String> =
            ["worker", "--backend", "cpu", "--threads", "1", "--kv-cache-mib", "32", "--model"].iter().map(|s| s.to_string()).collect();
        a.push(default_model().display().to_string());
        a.extend(["--listen".into(), format!("127.0.0.1:{port}"), "--advertise".into(), addr.clone()]);
        a.extend(["--register-with".into(), routers.join(",")]);
        (Proc::spawn(&a, self.tmp.path().join(format!("worker{port}.log"))), addr)
    }

    fn view(&self, id: u64) -> Option<Value> {
        get_json(self.routers[id as usize - 1].http, "/v1/cluster")
    }
}

/// POSTs a short greedy completion to the router on `port` over HTTP/1.0: its status, `None` when the router did not
/// answer (connection refused or reset, or nothing within 30 s).
fn complete(port: u16, prompt: &str) -> Option<u16> {
    let body =
        serde_json::json!({"model": "SmolLM2-135M-Instruct.Q4_1", "prompt": prompt, "max_tokens": 2, "temperature": 0, "ignore_eos": true})
            .to_string();
    let mut s = TcpStream::connect_timeout(&format!("127.0.0.1:{port}").parse().unwrap(), Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    write!(
        s,
        "POST /v1/completions HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    buf.split_whitespace().nth(1)?.parse().ok()
}

/// `GET path` over plain HTTP/1.0 (no client library needed); `None` while the router is not answering.
fn get_json(port: u16, path: &str) -> Option<Value> {
    let mut s = TcpStream::connect_timeout(&format!("127.0.0.1:{port}").parse().unwrap(), Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    serde_json::from_str(body).ok()
}

/// Polls `f` every 100 ms until it returns `Some`, for at most `limit`; panics with `what` otherwise.
fn wait_for<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `(leader id, voters)` as router `id` sees them.
fn leader_and_voters(v: &Value) -> (u64, Vec<u64>) {
    let leader = v["leader_id"].as_u64().unwrap_or(0);
    let voters =
        v["routers"].as_array().unwrap().iter().filter(|r| r["membership"] == "voter").map(|r| r["id"].as_u64().unwrap()).collect();
    (leader, voters)
}

/// The workers a view lists: `(address, state, epoch)`.
fn workers(v: &Value) -> Vec<(String, String, u64)> {
    v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| (w["addr"].as_str().unwrap().to_string(), w["state"].as_str().unwrap().to_string(), w["epoch"].as_u64().unwrap()))
        .collect()
}

/// Starts routers 1 (bootstrap), 2 and 3 and waits until all agree on one leader and three voters.
fn three_routers(c: &Cluster) -> Vec<Proc> {
    three_routers_with(c, &[])
}

/// [`three_routers`] with more router flags.
fn three_routers_with(c: &Cluster, extra: &[&str]) -> Vec<Proc> {
    let bootstrap: Vec<&str> = extra.iter().copied().chain(["--bootstrap"]).collect();
    let procs = vec![c.start_router(1, &bootstrap), c.start_router(2, extra), c.start_router(3, extra)];
    wait_agreement(c, &[1, 2, 3], Duration::from_secs(30));
    procs
}

/// Waits until routers `ids` all see one leader and exactly `ids` as voters; returns the leader.
fn wait_agreement(c: &Cluster, ids: &[u64], limit: Duration) -> u64 {
    wait_for(limit, &format!("routers {ids:?} agreeing on a leader and on themselves as the voters"), || {
        let seen: Vec<_> = ids.iter().map(|&i| c.view(i).map(|v| leader_and_voters(&v))).collect::<Option<Vec<_>>>()?;
        (seen[0].0 != 0 && seen.iter().all(|s| *s == (seen[0].0, ids.to_vec()))).then_some(seen[0].0)
    })
}

/// Waits until every router in `ids` lists exactly `expect` (address, state) with one common epoch; returns it.
fn wait_workers(c: &Cluster, ids: &[u64], addr: &str, state: &str, limit: Duration) -> u64 {
    wait_for(limit, &format!("{addr} {state} on routers {ids:?}"), || {
        let mut epoch = None;
        for &i in ids {
            let w = workers(&c.view(i)?);
            if w.len() != 1 || w[0].0 != addr || w[0].1 != state || epoch.is_some_and(|e| e != w[0].2) {
                return None;
            }
            epoch = Some(w[0].2);
        }
        epoch
    })
}

#[test]
fn three_routers_agree_and_a_leader_kill_loses_no_worker() {
    let c = Cluster::new(3);
    // A short grace: the dead worker at the end must leave the replicated state within the test.
    let mut routers = three_routers_with(&c, &["--dead-worker-grace", "3"]);
    // Registered through a follower or the leader alike: followers redirect to the leader.
    let (mut worker, addr) = c.start_worker(&[2, 3]);
    let epoch = wait_workers(&c, &[1, 2, 3], &addr, "active", Duration::from_secs(60));

    let (old, _) = leader_and_voters(&c.view(1).unwrap());
    let survivors: Vec<u64> = (1..=3).filter(|&i| i != old).collect();
    for &i in &survivors {
        // Each survivor routes to the worker (its pool has checked the worker's `Info`) before the load starts.
        wait_for(Duration::from_secs(30), "a completion through a survivor", || {
            (complete(c.routers[i as usize - 1].http, "Hi") == Some(200)).then_some(())
        });
    }
    // A steady load on the survivors' HTTP ports (two loops of short greedy completions) through the leader's death.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = survivors
        .iter()
        .map(|&i| {
            let (port, stop) = (c.routers[i as usize - 1].http, stop.clone());
            std::thread::spawn(move || {
                let started = Instant::now();
                let (mut ok, mut failed) = (0u32, Vec::new());
                for n in 0.. {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    match complete(port, &format!("Request {n} to router {i}:")) {
                        Some(200) => ok += 1,
                        other => failed.push((other, started.elapsed().as_millis())),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    routers[old as usize - 1].kill();
    let new = wait_for(Duration::from_secs(10), "a new leader among the survivors", || {
        let seen: Vec<u64> = survivors.iter().map(|&i| c.view(i).map(|v| leader_and_voters(&v).0)).collect::<Option<_>>()?;
        (seen[0] != 0 && seen[0] != old && seen.iter().all(|l| *l == seen[0])).then_some(seen[0])
    });
    assert!(survivors.contains(&new));
    // The new leader holds the worker's lease with a recent heartbeat (lease ages are known on the leader only)...
    let fresh = wait_for(Duration::from_secs(10), "the new leader holding a fresh lease for the worker", || {
        let v = c.view(new)?;
        let w = v["workers"].as_array()?.iter().find(|w| w["addr"] == addr.as_str())?.clone();
        (w["state"] == "active" && w["lease_age_ms"].as_u64()? < 2000).then_some(w)
    });
    // ...of the same registration: the leader took the lease over (no expiry, no re-registration), no worker lost.
    assert_eq!(fresh["epoch"].as_u64(), Some(epoch), "{fresh}");
    assert_eq!(wait_workers(&c, &survivors, &addr, "active", Duration::from_secs(5)), epoch);
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for t in load {
        let (o, f) = t.join().unwrap();
        ok += o;
        failed.extend(f);
    }
    let total = ok + failed.len() as u32;
    assert!(total >= 10, "too few requests to judge: {ok} ok, failures {failed:?}");
    assert!(f64::from(ok) >= 0.99 * f64::from(total), "{ok} of {total} requests to the survivors succeeded; failures {failed:?}");

    // A worker that dies after the failover is still found dead, within its 5 s lease (plus an election's slack)...
    worker.kill();
    let died = Instant::now();
    assert_eq!(wait_workers(&c, &survivors, &addr, "dead", Duration::from_secs(15)), epoch);
    assert!(died.elapsed() < Duration::from_secs(8), "dead only after {:?}", died.elapsed());
    // ...and, its 3 s grace over, the leader removes it from the replicated state.
    wait_for(Duration::from_secs(15), "the dead worker removed on the survivors", || {
        survivors.iter().all(|&i| c.view(i).is_some_and(|v| workers(&v).is_empty())).then_some(())
    });
    // It gets no more traffic: with no worker left, a survivor answers 503.
    assert_eq!(complete(c.routers[survivors[0] as usize - 1].http, "Anyone there?"), Some(503));
    // Restarted at the same address, it registers again (a new epoch) and serves through every survivor.
    let port: u16 = addr.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a port");
    let (_again, again) = c.start_worker_on(port, &survivors);
    assert_eq!(again, addr);
    let rejoined = wait_workers(&c, &survivors, &addr, "active", Duration::from_secs(60));
    assert!(rejoined > epoch, "a new registration: epoch {rejoined} after {epoch}");
    for &i in &survivors {
        wait_for(Duration::from_secs(30), "a completion through a survivor after the worker rejoined", || {
            (complete(c.routers[i as usize - 1].http, "Back again") == Some(200)).then_some(())
        });
    }
}

#[test]
fn a_paused_follower_catches_up() {
    let c = Cluster::new(3);
    let routers = three_routers(&c);
    let (leader, _) = leader_and_voters(&c.view(1).unwrap());
    let follower = (1..=3).find(|&i| i != leader).unwrap();
    routers[follower as usize - 1].signal("STOP");
    // The other two still commit: the worker registers while the follower sleeps.
    let others: Vec<u64> = (1..=3).filter(|&i| i != follower).collect();
    let (_worker, addr) = c.start_worker(&[leader]);
    let epoch = wait_workers(&c, &others, &addr, "active", Duration::from_secs(60));
    routers[follower as usize - 1].signal("CONT");
    assert_eq!(wait_workers(&c, &[follower], &addr, "active", Duration::from_secs(15)), epoch);
}

#[test]
fn a_whole_cluster_restart_recovers_routers_and_workers() {
    let c = Cluster::new(3);
    let mut routers = three_routers(&c);
    let (_worker, addr) = c.start_worker(&[1]);
    let epoch = wait_workers(&c, &[1, 2, 3], &addr, "active", Duration::from_secs(60));
    let before: Vec<Value> = (1..=3).map(|i| c.view(i).unwrap()["routers"].clone()).collect();
    for r in &mut routers {
        r.kill();
    }
    // No --bootstrap this time: the group comes back from the data directories.
    let _routers: Vec<Proc> = (1..=3).map(|i| c.start_router(i, &[])).collect();
    wait_for(Duration::from_secs(30), "a leader after the restart", || {
        let seen: Vec<_> = (1..=3).map(|i| c.view(i).map(|v| leader_and_voters(&v))).collect::<Option<Vec<_>>>()?;
        (seen[0].0 != 0 && seen.iter().all(|s| *s == (seen[0].0, vec![1, 2, 3]))).then_some(())
    });
    let after: Vec<Value> = (1..=3).map(|i| c.view(i).unwrap()["routers"].clone()).collect();
    let addrs = |v: &Vec<Value>| -> Vec<Vec<(u64, String)>> {
        v.iter().map(|rs| rs.as_array().unwrap().iter().map(|r| (r["id"].as_u64().unwrap(), r["addr"].to_string())).collect()).collect()
    };
    assert_eq!(addrs(&after), addrs(&before));
    // The still-running worker kept its registration (same epoch): nothing had to be re-registered.
    assert_eq!(wait_workers(&c, &[1, 2, 3], &addr, "active", Duration::from_secs(10)), epoch);
}

#[test]
fn sigterm_deregisters_the_worker_and_exits_0() {
    let c = Cluster::new(1);
    let _router = c.start_router(1, &["--bootstrap"]);
    let (mut worker, addr) = c.start_worker(&[1]);
    let epoch = wait_workers(&c, &[1], &addr, "active", Duration::from_secs(60));
    worker.signal("TERM");
    let status = worker.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "exit {status:?}; log:\n{}", worker.log_text());
    // Deregistered (draining) before it stopped; its lease then lapses.
    let w = workers(&c.view(1).unwrap());
    assert!(w == [(addr.clone(), "draining".into(), epoch)] || w == [(addr.clone(), "dead".into(), epoch)], "{w:?}");
    assert!(worker.log_text().contains("deregistered"), "{}", worker.log_text());
    // The last voter is not removed: the reason says why.
    let (ok, out) = cluster_cli(&["remove-router".into(), "--id".into(), "1".into(), "--via".into(), c.routers[0].raft.clone()]);
    assert!(!ok && out.contains("last voter"), "{out}");
}

fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<_> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).map(|p| (p.clone(), std::fs::read(&p).unwrap())).collect();
    v.sort();
    v
}

#[test]
fn a_bad_data_directory_is_refused_untouched() {
    let c = Cluster::new(1);
    let mut r = c.start_router(1, &["--bootstrap"]);
    wait_for(Duration::from_secs(30), "the router to lead", || (leader_and_voters(&c.view(1)?).0 == 1).then_some(()));
    r.kill();
    let dir = &c.routers[0].dir;

    // Another cluster's directory.
    let before = files(dir);
    let mut r = c.start_router(1, &["--cluster-id", "another"]);
    assert!(!r.wait_exit(Duration::from_secs(30)).success());
    assert!(r.log_text().contains("belongs to cluster `ferrite`"), "{}", r.log_text());
    assert_eq!(files(dir), before);

    // A corrupted marker.
    std::fs::write(dir.join("CLUSTER"), b"\0garbage").unwrap();
    let before = files(dir);
    let mut r = c.start_router(1, &[]);
    assert!(!r.wait_exit(Duration::from_secs(30)).success());
    assert!(r.log_text().contains("refusing to start"), "{}", r.log_text());
    assert_eq!(files(dir), before);
}

/// The cluster service's answers to bad or misdirected calls, over gRPC as a worker or a stranger would make them.
#[test]
fn the_cluster_service_refuses_redirects_and_drops_strangers() {
    use ferrite_common::proto::cluster as pb;
    let c = Cluster::new(2);
    let _r1 = c.start_router(1, &["--bootstrap"]);
    let _r2 = c.start_router(2, &[]);
    wait_for(Duration::from_secs(30), "two voters agreeing on router 1", || {
        let seen: Vec<_> = (1..=2).map(|i| c.view(i).map(|v| leader_and_voters(&v))).collect::<Option<Vec<_>>>()?;
        seen.iter().all(|s| *s == (1, vec![1, 2])).then_some(())
    });
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let client = |i: usize| {
            let uri = format!("http://{}", c.routers[i].raft);
            async move { pb::cluster_client::ClusterClient::connect(uri).await.unwrap() }
        };
        let register = |fingerprint: Vec<u8>| pb::RegisterRequest {
            worker_id: "http://127.0.0.1:1".into(),
            addr: "http://127.0.0.1:1".into(),
            model_id: "some-other-model".into(),
            model_fingerprint: fingerprint,
            tensor_parallel_size: 1,
            capacity: 1,
        };
        // Another model than the routers': refused, with the reason, and nothing registered.
        let r = client(0).await.register(register(vec![0; 16])).await.unwrap().into_inner();
        assert_eq!(r.status, pb::ReplyStatus::Refused as i32, "{r:?}");
        assert!(r.reason.contains("some-other-model"), "{}", r.reason);
        assert!(c.view(1).unwrap()["workers"].as_array().unwrap().is_empty());

        // A follower sends heartbeats to the leader's raft address.
        let r = client(1).await.heartbeat(pb::HeartbeatRequest { lease_id: 42 }).await.unwrap().into_inner();
        assert_eq!((r.status, r.leader_hint.as_str()), (pb::ReplyStatus::NotLeader as i32, c.routers[0].raft.as_str()));
        // The leader does not know this lease: the worker must register again.
        let r = client(0).await.heartbeat(pb::HeartbeatRequest { lease_id: 42 }).await.unwrap().into_inner();
        assert_eq!(r.status, pb::ReplyStatus::UnknownLease as i32, "{r:?}");

        // Removing a router: a follower points at the leader, the leader refuses an id outside the group.
        let remove = |raft_id| pb::RemoveRouterRequest { cluster_id: "ferrite".into(), raft_id };
        let r = client(1).await.remove_router(remove(7)).await.unwrap().into_inner();
        assert_eq!((r.status, r.leader_hint.as_str()), (pb::ReplyStatus::NotLeader as i32, c.routers[0].raft.as_str()));
        let r = client(0).await.remove_router(remove(7)).await.unwrap().into_inner();
        assert_eq!(r.status, pb::ReplyStatus::Refused as i32, "{r:?}");
        assert!(r.reason.contains("router 7 is not in the raft group"), "{}", r.reason);

        // Raft messages from a router that is no peer are dropped, and counted.
        let uri = format!("http://{}", c.routers[0].raft);
        let mut raft = pb::raft_client::RaftClient::connect(uri).await.unwrap();
        let batch = pb::RaftBatch { cluster_id: "ferrite".into(), from: 99, messages: vec![vec![1, 2, 3]] };
        let e = raft.send(batch).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e}");
    });
    let metrics = {
        let mut s = TcpStream::connect(format!("127.0.0.1:{}", c.routers[0].http)).unwrap();
        write!(s, "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
        let mut buf = String::new();
        s.read_to_string(&mut buf).unwrap();
        buf
    };
    assert!(metrics.contains("ferrite_cluster_raft_dropped_total{reason=\"unknown_peer\"} 1"), "{metrics}");
    assert!(metrics.contains("ferrite_cluster_raft_is_leader 1"), "{metrics}");
}

/// Runs `ferrite cluster ARGS...`: exit success and stdout+stderr.
fn cluster_cli(args: &[String]) -> (bool, String) {
    let out = Command::new(binary()).arg("cluster").args(args).stdin(Stdio::null()).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn a_fourth_router_joins_and_the_leader_is_removed() {
    let c = Cluster::new(4);
    let mut routers = three_routers(&c);
    let (_worker, addr) = c.start_worker(&[1, 2, 3]);
    let epoch = wait_workers(&c, &[1, 2, 3], &addr, "active", Duration::from_secs(60));
    // No --bootstrap: it joins as a learner and is promoted once caught up.
    routers.push(c.start_router(4, &[]));
    let leader = wait_agreement(&c, &[1, 2, 3, 4], Duration::from_secs(30));
    assert_eq!(wait_workers(&c, &[1, 2, 3, 4], &addr, "active", Duration::from_secs(10)), epoch);

    // Remove the leader, asked through a follower: the hint is followed, leadership moves, then the old leader goes.
    let via = (1..=4).find(|&i| i != leader).unwrap();
    let raft = |i: u64| c.routers[i as usize - 1].raft.clone();
    let (ok, out) = cluster_cli(&["remove-router".into(), "--id".into(), leader.to_string(), "--via".into(), raft(via)]);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("router {leader} removed")), "{out}");
    // The removed router stops taking part: it exits, cleanly.
    let status = routers[leader as usize - 1].wait_exit(Duration::from_secs(20));
    assert!(status.success(), "exit {status:?}; log:\n{}", routers[leader as usize - 1].log_text());
    let rest: Vec<u64> = (1..=4).filter(|&i| i != leader).collect();
    wait_agreement(&c, &rest, Duration::from_secs(15));
    assert_eq!(wait_workers(&c, &rest, &addr, "active", Duration::from_secs(10)), epoch);
    for &i in &rest {
        assert_eq!(complete(c.routers[i as usize - 1].http, "Routing still works:"), Some(200), "router {i}");
    }
    // Refusals are final, with the reason: an id not in the group.
    let (ok, out) = cluster_cli(&["remove-router".into(), "--id".into(), leader.to_string(), "--via".into(), raft(rest[0])]);
    assert!(!ok && out.contains("is not in the raft group"), "{out}");
}
