#!/usr/bin/env python3
"""Issue 5's performance goals against one GPU run: reads `gpu-bench --json-out` (Ferrite) and, when present,
`torch_baseline.py --out` (the PyTorch eager peer of the same run) and prints one line per goal.

Usage: goals.py FERRITE_JSON [TORCH_JSON]. Exit status 0 whatever the verdicts (a summary, not a gate); 2 when the
Ferrite file is missing or unreadable.
"""
import json
import sys

GOALS = [("decode B=1", 1, 0.85), ("decode B=32", 32, 0.80)]
PREFILL_GOAL = 0.60


def verdict(ok):
    return "met" if ok else "NOT MET"


def main(argv):
    if len(argv) < 2:
        print(__doc__.strip())
        return 2
    try:
        with open(argv[1]) as f:
            ours = json.load(f)
    except (OSError, ValueError) as e:
        print(f"goals: no Ferrite results ({e})")
        return 2
    peer = None
    if len(argv) > 2:
        try:
            with open(argv[2]) as f:
                peer = json.load(f)
        except (OSError, ValueError):
            peer = None
    by_batch = {d["batch"]: d for d in ours.get("decode", [])}
    peer_batch = {d["batch"]: d for d in (peer or {}).get("decode", [])}
    print(f"issue-5 goals on {ours.get('device', '?')} (copy {ours.get('copy_gbps', 0):.0f} GB/s, "
          f"GEMM {ours.get('gemm_tflops_8192', 0):.0f} TFLOP/s):")
    for name, b, goal in GOALS:
        d = by_batch.get(b)
        if d is None:
            print(f"  {name}: not measured")
            continue
        frac = d["fraction_of_roofline"]
        line = f"  {name}: {d['ms_per_step']:.3f} ms = {frac:.1%} of roofline (goal {goal:.0%}) {verdict(frac >= goal)}"
        if b in peer_batch:
            line += f"; PyTorch {peer_batch[b]['ms_per_step']:.3f} ms, speed-up {peer_batch[b]['ms_per_step'] / d['ms_per_step']:.2f}x"
        print(line)
    p = ours.get("prefill")
    if p:
        line = (f"  prefill {p['tokens']} tokens: {p['ms']:.2f} ms = {p['fraction_of_gemm']:.1%} of the GEMM rate "
                f"(goal {PREFILL_GOAL:.0%}) {verdict(p['fraction_of_gemm'] >= PREFILL_GOAL)}")
        if peer and peer.get("prefill"):
            line += f"; PyTorch {peer['prefill']['ms']:.2f} ms, speed-up {peer['prefill']['ms'] / p['ms']:.2f}x"
        print(line)
    slower = [f"decode B={b}" for b, d in sorted(by_batch.items()) if b in peer_batch and d["ms_per_step"] > peer_batch[b]["ms_per_step"]]
    if p and peer and peer.get("prefill") and p["ms"] > peer["prefill"]["ms"]:
        slower.append("prefill")
    if peer:
        print(f"  never slower than PyTorch: {verdict(not slower)}" + (f" (slower: {', '.join(slower)})" if slower else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
