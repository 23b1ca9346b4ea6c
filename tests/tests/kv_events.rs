//! The worker's `KvEvents` stream over gRPC on loopback with the default model: a prompt's full blocks arrive as
//! `Stored` hashes equal to `BlockHasher`'s chain (the router's index keys), load reports come with batches and on
//! their own, and a reconnect with an old sequence number replays (one the worker never reached resyncs).

use std::collections::HashSet;
use std::time::Duration;

use ferrite_common::hash::BlockHasher;
use ferrite_common::proto::worker as pb;
use ferrite_common::proto::worker::kv_event::E;
use ferrite_common::proto::worker::worker_client::WorkerClient;
use ferrite_tests::test_worker_config;
use ferrite_worker::server::Worker;
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tonic::Streaming;
use tonic::transport::Channel;

async fn start() -> WorkerClient<Channel> {
    let cfg = test_worker_config();
    let worker = tokio::task::spawn_blocking(move || Worker::load(&cfg)).await.unwrap().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(worker.serve(listener, std::future::pending()));
    WorkerClient::connect(format!("http://{addr}")).await.unwrap()
}

async fn next(stream: &mut Streaming<pb::KvEventBatch>) -> pb::KvEventBatch {
    tokio::time::timeout(Duration::from_secs(10), stream.next()).await.expect("a batch within 10 s").expect("stream open").unwrap()
}

/// A subscriber's view: the hashes it holds, the sequence number it is at, and the hashes stored since it started.
#[derive(Debug, Default)]
struct View {
    held: HashSet<u64>,
    at: u64,
    stored: Vec<u64>,
}

impl View {
    fn apply(&mut self, b: &pb::KvEventBatch) {
        assert!(b.load.is_some(), "every batch carries a load report");
        if !b.resync {
            assert_eq!(b.first_seq, self.at + 1, "batches are contiguous");
        }
        let mut n = 0;
        for e in &b.events {
            match e.e.as_ref().expect("event set") {
                E::Cleared(_) => self.held.clear(),
                E::Stored(s) => {
                    n += s.block_hashes.len() as u64;
                    self.held.extend(&s.block_hashes);
                    if !b.resync {
                        self.stored.extend(&s.block_hashes);
                    }
                }
                E::Removed(r) => {
                    n += r.block_hashes.len() as u64;
                    r.block_hashes.iter().for_each(|h| assert!(self.held.remove(h), "removed {h}, not held"));
                }
            }
        }
        self.at = if b.resync { b.first_seq - 1 } else { b.first_seq + n - 1 };
    }

    /// Applies batches until every hash of `want` is held (load reports keep coming, so the wait has a deadline).
    async fn until_held(&mut self, stream: &mut Streaming<pb::KvEventBatch>, want: &[u64]) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !want.iter().all(|h| self.held.contains(h)) {
            assert!(tokio::time::Instant::now() < deadline, "{want:x?} not all stored within 10 s; holding {:x?}", self.held);
            self.apply(&next(stream).await);
        }
    }
}

async fn generate(client: &mut WorkerClient<Channel>, id: &str, prompt: Vec<u32>) {
    let r = pb::GenerateRequest {
        request_id: id.into(),
        prompt_ids: prompt,
        sampling: Some(pb::SamplingParams { temperature: Some(0.0), ..Default::default() }),
        max_new_tokens: 1,
        ..Default::default()
    };
    let mut s = client.generate(r).await.unwrap().into_inner();
    while let Some(m) = s.next().await {
        m.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_events_publish_prompt_blocks_load_and_replay() {
    let mut client = start().await;
    let info = client.info(pb::InfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.block_size, 16);
    let hasher = BlockHasher::new(&info.model_fingerprint, info.block_size as usize);

    let mut stream = client.kv_events(pb::KvEventsRequest { since_seq: 0, instance_id: 0 }).await.unwrap().into_inner();
    let first = next(&mut stream).await;
    assert!(first.resync, "since_seq 0 starts with a dump");
    assert!(matches!(first.events[0].e, Some(E::Cleared(_))));
    let load = first.load.expect("a load report");
    assert_eq!(load.kv_blocks_total, info.kv_blocks_total);
    let mut view = View::default();
    view.apply(&first);

    // A 64-token prompt (4 full blocks; the one generated token is never computed): exactly its chain is stored.
    let a: Vec<u32> = (0..64).map(|i| 100 + 7 * i).collect();
    let want_a = hasher.prefix_hashes(b"", &a);
    assert_eq!(want_a.len(), 4);
    generate(&mut client, "a", a).await;
    view.until_held(&mut stream, &want_a).await;
    assert_eq!(view.stored, want_a, "the prompt's chained hashes (no salt), in order, nothing else");
    let after_a = view.at;

    // With nothing happening, a load report still comes within the interval (bounded wait: 3 s).
    let idle = tokio::time::timeout(Duration::from_secs(3), stream.next()).await.expect("a load report within 3 s").unwrap().unwrap();
    assert!(idle.events.is_empty() && !idle.resync);
    assert_eq!(idle.first_seq, after_a + 1);
    assert_eq!(idle.load.expect("load").running, 0);

    let b: Vec<u32> = (0..32).map(|i| 900 + 3 * i).collect();
    let want_b = hasher.prefix_hashes(b"", &b);
    generate(&mut client, "b", b).await;
    view.until_held(&mut stream, &want_b).await;
    drop(stream);

    // Reconnecting with the sequence number after the first prompt (counted in this instance) replays the second
    // one's blocks.
    assert_ne!(info.instance_id, 0);
    let mut replay =
        client.kv_events(pb::KvEventsRequest { since_seq: after_a, instance_id: info.instance_id }).await.unwrap().into_inner();
    let mut v2 = View { at: after_a, ..View::default() };
    v2.until_held(&mut replay, &want_b).await;
    assert_eq!(v2.stored, want_b, "a replay from after_a");

    // A sequence number this worker never reached (another process's): a resync with everything it holds.
    let mut ahead = client.kv_events(pb::KvEventsRequest { since_seq: view.at + 1000, instance_id: 0 }).await.unwrap().into_inner();
    let dump = next(&mut ahead).await;
    assert!(dump.resync);
    let mut v3 = View::default();
    v3.apply(&dump);
    assert_eq!(v3.held, view.held, "the dump is what the events add up to");
    assert!(want_a.iter().chain(&want_b).all(|h| v3.held.contains(h)));
    assert_eq!(v3.at, view.at);

    // A number this worker did reach, but counted by another instance (the previous process at this address): a
    // resync too, never a resume.
    let other = info.instance_id ^ 0x5a5a;
    let mut stale = client.kv_events(pb::KvEventsRequest { since_seq: after_a, instance_id: other }).await.unwrap().into_inner();
    let dump = next(&mut stale).await;
    assert!(dump.resync, "another instance's numbers are not resumed");
    assert_eq!(dump.first_seq, view.at + 1);
}
