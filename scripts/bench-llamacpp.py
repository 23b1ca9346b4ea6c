#!/usr/bin/env python3
"""Measure llama.cpp on the same GGUF and machine as `ferrite bench`, for BENCHMARKS.md (not run in CI).

Setup (builds llama.cpp from source through pip, ~15 minutes on 2 cores):
    python3 -m venv /tmp/llamacpp && /tmp/llamacpp/bin/pip install llama-cpp-python
Run:
    /tmp/llamacpp/bin/python scripts/bench-llamacpp.py [--model PATH] [--threads 2]

Reports prefill tok/s (512-token prompt), batch-1 decode tok/s (median of runs), and, with --accuracy, the max
abs logit error against tests/data/reference at the last prompt position of each case (llama.cpp quantizes
activations to Q8_1 for Q4_1 weights, like Ferrite's default path).
"""
import argparse, json, os, statistics, struct, sys, time
from pathlib import Path

from llama_cpp import Llama

root = Path(__file__).resolve().parent.parent
ap = argparse.ArgumentParser()
ap.add_argument("--model", default=str(root / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--prompt-tokens", type=int, default=512)
ap.add_argument("--decode-steps", type=int, default=64)
ap.add_argument("--repeat", type=int, default=3)
ap.add_argument("--accuracy", action="store_true")
a = ap.parse_args()

llm = Llama(model_path=a.model, n_ctx=2048, n_threads=a.threads, n_threads_batch=a.threads, n_batch=512,
            logits_all=False, verbose=False)
vocab = llm.n_vocab()
tok = lambda i: (i * 2654435761) % min(vocab, 40000) + 100

prompt = [tok(i) for i in range(a.prompt_tokens)]
pre = []
for _ in range(a.repeat):
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    pre.append(len(prompt) / (time.perf_counter() - t))
print(f"llama.cpp prefill ({a.prompt_tokens} tokens): {statistics.median(pre):.0f} tok/s")

dec = []
for _ in range(a.repeat):
    llm.reset()
    llm.eval([tok(i) for i in range(16)])
    t = time.perf_counter()
    for s in range(a.decode_steps):
        llm.eval([tok(1000 + s)])
    dec.append(a.decode_steps / (time.perf_counter() - t))
print(f"llama.cpp decode batch 1: {statistics.median(dec):.1f} tok/s")

if a.accuracy:
    ref_dir = Path(os.environ.get("FERRITE_REFERENCE_DIR", root / "tests" / "data" / "reference"))
    ref = json.loads((ref_dir / "reference.json").read_text())
    llm = Llama(model_path=a.model, n_ctx=2048, n_threads=a.threads, n_batch=512, logits_all=True, verbose=False)
    for name, case in sorted(ref["cases"].items()):
        llm.reset()
        llm.eval(case["prompt_ids"])
        got = llm.scores[llm.n_tokens - 1]
        raw = (ref_dir / f"logits_{name}.f32").read_bytes()
        want = struct.unpack(f"<{len(raw) // 4}f", raw)
        scale = max(abs(x) for x in want)
        err = max(abs(float(g) - w) for g, w in zip(got, want))
        top = max(range(len(want)), key=lambda i: got[i])
        print(f"llama.cpp {name}: max abs error {err / scale:.2e} x max|logit|; argmax {'==' if top == case['greedy_ids'][0] else '!='} reference")
