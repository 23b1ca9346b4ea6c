use super::*;

fn sampler(params: SamplingParams, stop: StoppingParams) -> Sampler {
    Sampler::new(params, &stop, &[2], &[5, 6], 1234, 0)
}

fn greedy() -> SamplingParams {
    SamplingParams { temperature: 0.0, ..SamplingParams::default() }
}

fn logits() -> Vec<f32> {
    vec![0.5, 1.0, 3.0, 2.5, -1.0, 2.9, 0.0, 1.5]
}

#[test]
fn greedy_and_top_k_one_pick_the_argmax() {
    let mut s = sampler(greedy(), StoppingParams::default());
    assert_eq!(s.sample(&mut logits(), 0).0, 2);
    let mut s = sampler(SamplingParams { top_k: 1, ..SamplingParams::default() }, StoppingParams::default());
    for _ in 0..20 {
        assert_eq!(s.sample(&mut logits(), 0).0, 2);
    }
    let mut nan = logits();
    nan[0] = f32::NAN;
    assert_eq!(sampler(greedy(), StoppingParams::default()).sample(&mut nan, 0).0, 2);
}

#[test]
fn temperature_sampling_follows_softmax_and_is_seeded() {
    let mut s = sampler(SamplingParams::default(), StoppingParams::default());
    let l = logits();
    let z: f64 = l.iter().map(|&x| f64::from(x).exp()).sum();
    let mut counts = vec![0usize; l.len()];
    let n = 20_000;
    for _ in 0..n {
        counts[s.sample(&mut l.clone(), 0).0 as usize] += 1;
    }
    for (i, &c) in counts.iter().enumerate() {
        let p = f64::from(l[i]).exp() / z;
        let sd = (p * (1.0 - p) / n as f64).sqrt();
        assert!((c as f64 / n as f64 - p).abs() < 5.0 * sd + 1e-3, "token {i}: {c} draws vs p {p}");
    }
    let draws = |seed: u64, index: u32| {
        let mut s = Sampler::new(SamplingParams::default(), &StoppingParams::default(), &[], &[], seed, index);
        (0..30).map(|_| s.sample(&mut logits(), 0).0).collect::<Vec<_>>()
    };
    assert_eq!(draws(1, 0), draws(1, 0));
    assert_ne!(draws(1, 0), draws(1, 1), "completions of one request differ");
    assert_ne!(draws(1, 0), draws(2, 0));
}

#[test]
fn top_p_and_min_p_filter() {
    // p(2) ≈ 0.30 is the top token; top_p 0.1 keeps only it.
    let mut s = sampler(SamplingParams { top_p: 0.1, ..SamplingParams::default() }, StoppingParams::default());
    assert!((0..50).all(|_| s.sample(&mut logits(), 0).0 == 2));
    // min_p 0.9 keeps tokens with p >= 0.9 p_max: 2 and 5 (2.9 is within ln(1/0.9) of 3.0).
    let mut s = sampler(SamplingParams { min_p: 0.9, ..SamplingParams::default() }, StoppingParams::default());
    let seen: std::collections::HashSet<u32> = (0..200).map(|_| s.sample(&mut logits(), 0).0).collect();
    assert_eq!(seen, [2, 5].into_iter().collect());
}

#[test]
fn bias_and_penalties() {
    let force = SamplingParams { logit_bias: vec![(4, 100.0)], ..greedy() };
    assert_eq!(sampler(force, StoppingParams::default()).sample(&mut logits(), 0).0, 4);
    let ban = SamplingParams { logit_bias: vec![(2, -100.0)], ..greedy() };
    assert_eq!(sampler(ban, StoppingParams::default()).sample(&mut logits(), 0).0, 5);
    // Presence penalty on a generated token flips the greedy choice.
    let mut s = sampler(SamplingParams { presence_penalty: 1.0, ..greedy() }, StoppingParams::default());
    s.record(2);
    assert_eq!(s.sample(&mut logits(), 1).0, 5);
    // Frequency scales with the count: the gap to the runner-up is 0.1; 1 × 0.06 keeps 2, 2 × 0.06 flips it.
    let mut s = sampler(SamplingParams { frequency_penalty: 0.06, ..greedy() }, StoppingParams::default());
    s.record(2);
    assert_eq!(s.sample(&mut logits(), 1).0, 2);
    s.record(2);
    assert_eq!(s.sample(&mut logits(), 2).0, 5);
    // Repetition penalty covers prompt tokens (5 is in the prompt): 2.9 / 2 < 3.0, and negative logits grow.
    let mut s = sampler(SamplingParams { repetition_penalty: 2.0, ..greedy() }, StoppingParams::default());
    let mut l = logits();
    l[2] = 2.0;
    assert_eq!(s.sample(&mut l, 0).0, 3);
}

#[test]
fn min_tokens_masks_eos_and_stop_ids() {
    let stop = StoppingParams { min_tokens: 2, stop_token_ids: vec![5], ..StoppingParams::default() };
    let mut s = sampler(greedy(), stop);
    let mut l = logits();
    l[2] = 10.0; // eos id 2 is the best token
    assert_eq!(s.sample(&mut l.clone(), 0).0, 3, "eos and stop id 5 masked → 3");
    assert_eq!(s.sample(&mut l, 2).0, 2, "allowed once min_tokens are out");
}

#[test]
fn logprobs_are_raw_log_softmax_with_sorted_alternatives() {
    let stop = StoppingParams { logprobs: true, top_logprobs: 3, ..StoppingParams::default() };
    let mut s = sampler(SamplingParams { presence_penalty: 2.0, ..greedy() }, stop);
    s.record(2);
    let l = logits();
    let (tok, lp) = s.sample(&mut l.clone(), 1);
    let lp = lp.expect("logprobs requested");
    let lse = l.iter().map(|&x| f64::from(x).exp()).sum::<f64>().ln();
    assert_eq!(tok, 5);
    assert!((f64::from(lp.logprob) - (f64::from(l[5]) - lse)).abs() < 1e-6, "raw, before the penalty");
    let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
    assert_eq!(ids, vec![2, 5, 3]);
    assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
    assert!(sampler(greedy(), StoppingParams::default()).sample(&mut logits(), 0).1.is_none());
}
