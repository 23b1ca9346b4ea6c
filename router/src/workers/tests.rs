use ferrite_common::hash::HASH_VERSION;
use ferrite_common::proto::rejection_status;
use ferrite_common::proto::worker::kv_event::E;
use pb::rejection::Kind;

use super::*;

#[test]
fn a_worker_rejection_maps_to_the_openai_param_from_its_details() {
    let e = status_to_api(&rejection_status(Kind::InvalidArgument, "max_new_tokens", "`max_new_tokens` too big"));
    assert_eq!((e.kind, e.param.as_deref()), (ErrorKind::InvalidRequest, Some("max_tokens")));
    let e = status_to_api(&rejection_status(Kind::ContextLength, "prompt_ids", "too long"));
    assert_eq!((e.kind, e.param.as_deref()), (ErrorKind::ContextLength, Some("prompt")));
    assert_eq!(status_to_api(&rejection_status(Kind::Overloaded, "", "full")).kind, ErrorKind::RateLimited);
    // The message text is never parsed: backticks without details name no field.
    let e = status_to_api(&tonic::Status::invalid_argument("`top_p` must be in (0, 1]"));
    assert_eq!((e.kind, e.param), (ErrorKind::InvalidRequest, None));
}

#[test]
fn client_errors_are_never_worker_failures() {
    assert_eq!(classify(&rejection_status(Kind::InvalidArgument, "top_p", "bad")), Failure::Client);
    assert_eq!(classify(&rejection_status(Kind::ContextLength, "prompt_ids", "long")), Failure::Client);
    assert_eq!(classify(&rejection_status(Kind::Overloaded, "", "full")), Failure::Overloaded);
    assert_eq!(classify(&tonic::Status::unavailable("tcp connect error")), Failure::Worker { hard: true });
    assert_eq!(classify(&tonic::Status::unknown("h2 protocol error")), Failure::Worker { hard: false });
    assert_eq!(classify(&tonic::Status::internal("generation failed")), Failure::Worker { hard: false });
}

fn addrs(ports: &[u16]) -> Vec<String> {
    ports.iter().map(|p| format!("http://127.0.0.1:{p}")).collect()
}

fn slot(pool: &WorkerPool, addr: &str) -> Arc<WorkerSlot> {
    pool.members().iter().find(|s| s.addr == addr).cloned().expect("a member")
}

fn info(block_size: u32, fingerprint: &[u8]) -> pb::WorkerInfo {
    pb::WorkerInfo { block_size, model_fingerprint: fingerprint.to_vec(), hash_version: HASH_VERSION, ..Default::default() }
}

/// Marks every member as checked (what its pump does when `Info` fits).
fn verify_all(pool: &WorkerPool) {
    assert!(events::check(&pool.inner, &info(16, b"model")).is_ok());
    for s in pool.members().iter() {
        s.set_verified(Verified::Ok);
    }
}

#[tokio::test]
async fn an_unreachable_worker_is_purged_from_the_index() {
    // Two workers that stopped answering: one that had joined (its breaker opens), one never reached (still
    // starting, say: not routable anyway, so its breaker stays closed for the moment it comes up).
    let pool = WorkerPool::new(&addrs(&[9, 10])).unwrap();
    let (s, fresh) = (slot(&pool, "http://127.0.0.1:9"), slot(&pool, "http://127.0.0.1:10"));
    s.set_verified(Verified::Ok);
    pool.inner.index.store(s.id, &[1, 2, 3]);
    s.set_load(Some(pb::LoadReport::default()));
    pool.start_kv_subscriptions();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while pool.indexed_blocks() != [0, 0] || s.load().is_some() || s.breaker_state() == BreakerState::Closed {
        assert!(tokio::time::Instant::now() < deadline, "still indexed: {:?}", pool.indexed_blocks());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(fresh.verified(), Verified::Unknown, "never checked, never routable");
    assert_eq!(fresh.breaker_state(), BreakerState::Closed, "a worker never reached does not open its breaker");
}

fn batch(first_seq: u64, resync: bool, events: Vec<E>) -> pb::KvEventBatch {
    let events = events.into_iter().map(|e| pb::KvEvent { e: Some(e) }).collect();
    pb::KvEventBatch { first_seq, events, load: Some(pb::LoadReport { running: 3, ..Default::default() }), resync }
}

#[tokio::test]
async fn batches_apply_in_sequence_and_a_resync_replaces_the_worker() {
    let pool = WorkerPool::new(&addrs(&[9, 10])).unwrap();
    let inner = &pool.inner;
    let (a, b) = (slot(&pool, "http://127.0.0.1:9"), slot(&pool, "http://127.0.0.1:10"));
    let stored = |h: &[u64]| E::Stored(pb::Stored { block_hashes: h.to_vec() });
    inner.index.store(b.id, &[7]);
    // Resync: the state after seq 4 (Cleared + a dump), next batch at 5.
    let dump = batch(5, true, vec![E::Cleared(pb::Cleared {}), stored(&[1, 2])]);
    assert_eq!(events::apply(inner, &a, 0, &dump), Some(4));
    assert_eq!(a.load().map(|l| l.running), Some(3));
    // Seqs 5..=7: stores 3, 4 and removes 2.
    let b5 = batch(5, false, vec![stored(&[3, 4]), E::Removed(pb::Removed { block_hashes: vec![2] })]);
    assert_eq!(events::apply(inner, &a, 4, &b5), Some(7));
    assert_eq!(inner.index.overlap(&[1, 3]).get(&a.id), Some(&2));
    assert_eq!(inner.index.overlap(&[1, 2]).get(&a.id), Some(&1));
    // An empty batch (a load report) keeps the sequence number; a batch that skips one is a gap.
    assert_eq!(events::apply(inner, &a, 7, &batch(8, false, vec![])), Some(7));
    assert_eq!(events::apply(inner, &a, 7, &batch(9, false, vec![stored(&[5])])), None);
    // A second resync purges what the first one left, even without its leading `Cleared`; the other worker is
    // untouched.
    assert_eq!(events::apply(inner, &a, 7, &batch(3, true, vec![stored(&[9])])), Some(2));
    assert_eq!(pool.indexed_blocks(), vec![1, 1]);
}

#[tokio::test]
async fn sync_members_reconciles_to_exactly_the_list_and_keeps_ids() {
    let pool = WorkerPool::new(&addrs(&[1, 2])).unwrap();
    verify_all(&pool);
    let (a, b) = (slot(&pool, "http://127.0.0.1:1"), slot(&pool, "http://127.0.0.1:2"));
    pool.inner.index.store(a.id, &[1, 2]);
    // A request running on `a` while `a` leaves.
    let lease = pool.pick(&[1, 2, 3], b"", &[b.id]).unwrap();
    assert_eq!(lease.addr(), a.addr);
    let list = [
        Member { addr: "http://127.0.0.1:2".into(), draining: true },
        Member { addr: "http://127.0.0.1:3".into(), draining: false },
        Member { addr: "not a uri".into(), draining: false },
        Member { addr: "http://127.0.0.1:3".into(), draining: true }, // a duplicate: the first one counts
    ];
    pool.sync_members(&list);
    assert_eq!(pool.addrs(), addrs(&[2, 3]));
    assert!(a.is_removed());
    assert_eq!(pool.inner.index.total_blocks(), 0, "the removed worker's index entries are gone");
    assert_eq!((a.inflight(), lease.worker_id()), (1, a.id), "the running request still holds its worker");
    drop(lease);
    assert_eq!(a.inflight(), 0);
    let c = slot(&pool, "http://127.0.0.1:3");
    assert_eq!(slot(&pool, "http://127.0.0.1:2").id, b.id, "a kept member keeps its id (and its index entries)");
    assert!(b.is_draining() && !c.is_draining());
    assert!(c.id != a.id && c.id != b.id);
    // Draining and unchecked workers get nothing: nothing is eligible.
    let e = pool.pick(&[1], b"", &[]).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Unavailable);
    // Undrained by the list; `a` comes back as a new worker.
    pool.sync_members(&[
        Member { addr: "http://127.0.0.1:2".into(), draining: false },
        Member { addr: "http://127.0.0.1:1".into(), draining: false },
    ]);
    assert_eq!(pool.addrs(), addrs(&[2, 1]));
    assert!(!b.is_draining() && c.is_removed());
    assert!(slot(&pool, "http://127.0.0.1:1").id > c.id, "ids are never reused");
    assert_eq!(pool.pick(&[1], b"", &[]).unwrap().addr(), b.addr);
    // The single-address API.
    assert!(pool.drain(&b.addr) && !pool.drain("http://127.0.0.1:77"));
    assert!(pool.remove(&b.addr) && !pool.remove(&b.addr));
    pool.add("http://127.0.0.1:4").unwrap();
    assert!(pool.add("::").is_err());
    assert_eq!(pool.addrs(), addrs(&[1, 4]));
}

#[tokio::test]
async fn pick_skips_open_breakers_and_busy_workers_and_refuses_at_once_when_none_is_left() {
    let pool = WorkerPool::with_routing(&addrs(&[1, 2, 3]), Routing::LeastLoad).unwrap();
    verify_all(&pool);
    let s: Vec<Arc<WorkerSlot>> = pool.members().iter().cloned().collect();
    let report = |used| Some(pb::LoadReport { kv_blocks_total: 100, kv_blocks_used: used, ..Default::default() });
    s[0].set_load(report(95));
    s[1].breaker_failure(true, std::time::Instant::now());
    assert_eq!(pool.pick(&[1], b"", &[]).unwrap().addr(), s[2].addr, "0 is busy, 1's breaker is open");
    // The third worker failing three times in a row opens its breaker too; the busy one is then better than none.
    for _ in 0..3 {
        let mut l = pool.pick(&[1], b"", &[]).unwrap();
        assert_eq!(l.addr(), s[2].addr);
        l.failed(false);
    }
    assert_eq!(pool.pick(&[1], b"", &[]).unwrap().addr(), s[0].addr);
    assert_eq!(pool.pick(&[1], b"", &[s[0].id]).unwrap_err().kind, ErrorKind::Unavailable, "excluded");
    // A refused worker is never picked.
    s[0].set_verified(Verified::Refused);
    assert_eq!(pool.pick(&[1], b"", &[]).unwrap_err().kind, ErrorKind::Unavailable);
}

#[tokio::test]
async fn a_worker_with_another_model_block_size_or_hash_version_is_refused() {
    let cfg = PoolConfig { model_fingerprint: Some(b"ours".to_vec()), ..PoolConfig::default() };
    let pool = WorkerPool::with_config(&addrs(&[1]), cfg).unwrap();
    assert!(events::check(&pool.inner, &info(16, b"theirs")).unwrap_err().contains("another model"));
    assert!(events::check(&pool.inner, &info(16, b"ours")).is_ok());
    assert!(events::check(&pool.inner, &info(32, b"ours")).unwrap_err().contains("block size"));
    let old = pb::WorkerInfo { hash_version: HASH_VERSION + 1, ..info(16, b"ours") };
    assert!(events::check(&pool.inner, &old).unwrap_err().contains("version"));
    // Without a configured model, the first worker that fits sets the pool's.
    let pool = WorkerPool::new(&addrs(&[1])).unwrap();
    assert!(events::check(&pool.inner, &info(16, b"first")).is_ok());
    assert!(events::check(&pool.inner, &info(16, b"second")).is_err());
    assert!(PoolConfig { migration_limit: MAX_MIGRATION_LIMIT + 1, ..PoolConfig::default() }.validate().is_err());
}

#[tokio::test]
async fn approximate_workers_are_routed_by_the_prompts_sent_to_them_until_the_ttl_passes() {
    let cfg = PoolConfig { kv_events: KvEventsMode::Off, approx_ttl: Duration::from_secs(1), ..PoolConfig::default() };
    let pool = WorkerPool::with_config(&addrs(&[1, 2]), cfg).unwrap();
    verify_all(&pool);
    let s: Vec<Arc<WorkerSlot>> = pool.members().iter().cloned().collect();
    s.iter().for_each(|w| assert!(!w.set_approximate(true)));
    // A 64-token prompt is 4 blocks of 16; a second prompt shares its first 3 blocks.
    let a: Vec<u32> = (0..64).collect();
    let b: Vec<u32> = (0..48).chain(1000..1016).collect();
    let first = pool.pick(&a, b"", &[]).unwrap();
    let w = first.worker_id();
    drop(first);
    assert_eq!(pool.inner.index.blocks_of(w), 4, "the routed prompt's blocks are guessed held");
    // Held by one worker, the shared prefix draws the second prompt there (the other worker is idle and cold).
    let second = pool.pick(&b, b"", &[]).unwrap();
    assert_eq!(second.worker_id(), w);
    assert_eq!(second.predicted_cached(), Some(48));
    drop(second);
    assert_eq!(pool.inner.index.blocks_of(w), 5, "b's last block is new; its first three are shared");
    // A stream's block events do not touch the guesses (its load still counts).
    let stored = E::Stored(pb::Stored { block_hashes: vec![42] });
    let slot_w = s.iter().find(|x| x.id == w).unwrap();
    assert_eq!(events::apply(&pool.inner, slot_w, 0, &batch(1, false, vec![stored, E::Cleared(pb::Cleared {})])), Some(1));
    assert_eq!((pool.inner.index.blocks_of(w), slot_w.load().map(|l| l.running)), (5, Some(3)));
    // After the TTL, the next pick drops the guesses before it looks.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let other: Vec<u32> = (5000..5016).collect();
    drop(pool.pick(&other, b"", &[]).unwrap());
    assert_eq!(pool.inner.index.blocks_of(w) + pool.inner.index.blocks_of(s.iter().find(|x| x.id != w).unwrap().id), 1);
    // Back to exact tracking: the guesses go.
    assert!(slot_w.set_approximate(false));
    assert!(PoolConfig { approx_ttl: Duration::ZERO, ..PoolConfig::default() }.validate().is_err());
}

#[tokio::test]
async fn a_routed_prompt_counts_as_held_until_events_confirm_it_or_its_guess_expires() {
    let pool = WorkerPool::new(&addrs(&[1, 2])).unwrap();
    verify_all(&pool);
    let a: Vec<u32> = (0..64).collect();
    // The first request has its first token, but the worker's `Stored` events for its blocks are not in yet: the
    // second request of the prefix follows it (cost 0 prefill + 5 decode blocks, against 8 for a cold prefill).
    let mut first = pool.pick(&a, b"", &[]).unwrap();
    let w = first.worker_id();
    assert_eq!(pool.inner.index.blocks_of(w), 4, "the routed prompt's 4 blocks are pending on its worker");
    first.first_token();
    let second = pool.pick(&a, b"", &[]).unwrap();
    assert_eq!(second.worker_id(), w, "the pending prefix counts as held");
    drop((first, second));
    let slot_w = pool.members().iter().find(|s| s.id == w).cloned().unwrap();
    // The worker's events confirm 3 of the 4 blocks (the last one was, say, evicted at once): those stay.
    let hashes = pool.inner.identity.get().unwrap().hasher.prefix_hashes(b"", &a);
    let stored = E::Stored(pb::Stored { block_hashes: hashes[..3].to_vec() });
    assert_eq!(events::apply(&pool.inner, &slot_w, 0, &batch(1, false, vec![stored])), Some(3));
    // After the pending TTL the unconfirmed guess goes; the confirmed blocks stay.
    let later = Instant::now() + PENDING_TTL + Duration::from_millis(1);
    let gone = slot_w.approx_expire(later);
    assert_eq!(gone, vec![hashes[3]]);
    pool.inner.index.remove(w, &gone);
    assert_eq!(pool.inner.index.blocks_of(w), 3);
    assert!(pool.inner.index.holds(w, hashes[0]) && !pool.inner.index.holds(w, hashes[3]));
}

#[tokio::test]
async fn a_worker_still_being_checked_soon_after_joining_counts_as_joining() {
    let pool = WorkerPool::new(&addrs(&[1, 2])).unwrap();
    let s: Vec<Arc<WorkerSlot>> = pool.members().iter().cloned().collect();
    assert!(pool.joining(&[]), "both just joined and are unchecked");
    assert!(pool.joining(&[s[0].id]), "the other one is");
    assert!(!pool.joining(&[s[0].id, s[1].id]), "excluded ones do not count");
    s[0].set_verified(Verified::Ok);
    s[1].set_verified(Verified::Refused);
    assert!(!pool.joining(&[]), "checked (either way): nothing to wait for");
    // An unchecked member past the grace (an address that never answers) is not waited for.
    pool.add("http://127.0.0.1:3").unwrap();
    assert!(pool.joining(&[]));
    tokio::time::sleep(JOIN_GRACE + Duration::from_millis(50)).await;
    assert!(!pool.joining(&[]));
}
