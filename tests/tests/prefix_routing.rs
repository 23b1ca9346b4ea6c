//! Cache-aware routing against round-robin on a shared-prefix workload, with real `ferrite router` and `ferrite
//! worker` processes (two workers, one thread each): groups of prompts that share a long system prompt, sent one
//! after another. The prefix-hit rate is the workers' own count of prompt tokens served from their prefix caches
//! (`usage.prompt_tokens_details.cached_tokens`, which each worker reports), over all prompt tokens.
//!
//! Round-robin scatters a group over both workers, so each worker prefills the group's prefix once; cache-aware
//! sends the group after its prefix. With 4 groups of 3 requests, cache-aware hits on 2 requests per group and
//! round-robin on about 1: the test asserts a clearly higher rate, not an exact one. Approximate tracking
//! (`--kv-events off`: the router's own record of what it routed where, no events) must do as well on this workload.

use std::time::Duration;

use ferrite_tests::cluster::{Http, free_port, start_router, start_worker};
use serde_json::json;

const MODEL: &str = "SmolLM2-135M-Instruct.Q4_1";
const GROUPS: usize = 4;
const PER_GROUP: usize = 3;

/// A ~200-token system prompt, different for each group from its first words on.
fn system_prompt(group: usize) -> String {
    let topics = ["harbour logistics", "alpine botany", "medieval coinage", "deep-sea acoustics"];
    let mut s = format!("You are an expert in {}. ", topics[group % topics.len()]);
    for i in 0..24 {
        s.push_str(&format!("Rule {i} for {}: answer briefly and cite no sources. ", topics[group % topics.len()]));
    }
    s
}

/// Runs the workload through a fresh router and two fresh workers (cold caches) and returns (cached prompt tokens,
/// prompt tokens) summed over every request.
async fn hit_tokens(routing: &str, extra: &[&str]) -> (u64, u64) {
    let (w1, w2) = (start_worker(free_port()).await, start_worker(free_port()).await);
    let addrs = vec![w1.addr.clone(), w2.addr.clone()];
    let args: Vec<&str> = ["--routing", routing].iter().chain(extra).copied().collect();
    let router = start_router(&addrs, &args).await;
    let http = Http::new();
    let url = format!("{}/v1/completions", router.base);
    let (mut cached, mut prompt) = (0u64, 0u64);
    for g in 0..GROUPS {
        for q in 0..PER_GROUP {
            let body = json!({
                "model": MODEL,
                "prompt": format!("{}\nQuestion {q}: what matters most?", system_prompt(g)),
                "max_tokens": 2,
                "temperature": 0,
            });
            let r = http.post(&url, &body).await;
            assert_eq!(r.status, 200, "{routing}: {}", r.body);
            let usage = &r.json()["usage"];
            prompt += usage["prompt_tokens"].as_u64().expect("prompt_tokens");
            cached += usage["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0);
            // Let the worker's KV events reach the router's index before the next request (bounded and short: the
            // events are published at the end of the step that stored the blocks).
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    drop((router, w1, w2));
    (cached, prompt)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_aware_routing_exact_or_approximate_hits_the_prefix_cache_clearly_more_than_round_robin() {
    let (ca_hits, ca_prompt) = hit_tokens("cache-aware", &[]).await;
    // Approximate tracking: the router ignores the workers' KV events and guesses from the prompts it routed.
    let (ap_hits, ap_prompt) = hit_tokens("cache-aware", &["--kv-events", "off"]).await;
    let (rr_hits, rr_prompt) = hit_tokens("round-robin", &[]).await;
    assert!(ca_prompt == rr_prompt && ap_prompt == rr_prompt, "the same workload");
    let rate = |hits: u64| hits as f64 / rr_prompt as f64;
    let (ca, ap, rr) = (rate(ca_hits), rate(ap_hits), rate(rr_hits));
    eprintln!("prefix-hit rate: cache-aware {ca:.3}, approximate {ap:.3}, round-robin {rr:.3} ({rr_prompt} prompt tokens)");
    // Expected about 2/3 against 1/3 of the shared prefix; any routing that ignores the cache lands near round-robin.
    for (name, r) in [("cache-aware", ca), ("approximate", ap)] {
        assert!(r > 0.4, "{name} hit rate {r:.3}");
        assert!(r > 1.5 * rr, "{name} {r:.3} is not clearly above round-robin {rr:.3}");
    }
}
