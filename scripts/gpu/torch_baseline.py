#!/usr/bin/env python3
"""PyTorch eager baseline and roofline for a Llama-3.1-8B-shaped model on one GPU.

What it measures (all under torch.inference_mode, no torch.compile, no CUDA graphs):
  * Roofline probes: device-to-device copy bandwidth (2 GiB bf16 tensor, dst.copy_(src),
    bytes read + bytes written) and bf16 GEMM rate (8192^3 and the prefill shape
    1024x4096 @ 4096x14336) via torch.matmul.
  * Decode: one token per sequence at position --ctx for each batch size, against a KV
    cache randn-filled up to --ctx (no real prefill), compared with a roofline of
    (weight bytes + KV bytes read) / measured copy bandwidth.
  * Prefill: batch 1, --ctx tokens from an empty cache with causal attention, compared
    with the measured 8192^3 GEMM rate.

How: weights, caches and inputs are random (torch.randn, never zeros) and generated on
the device. Every timing is warm-up reps followed by timed reps; each rep is bracketed
by torch.cuda.Event records after a torch.cuda.synchronize() (so only device work
between the events is timed), and the median is reported. On CPU the same median logic
uses time.perf_counter. Timings are printed with flush=True as they are produced.

Usage: python3 scripts/gpu/torch_baseline.py --out torch.json
       python3 scripts/gpu/torch_baseline.py --tiny --device cpu --skip-roofline --out t.json
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

BF16 = torch.bfloat16
FULL = dict(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, ffn=14336,
            vocab=128256, eps=1e-5, theta=500000.0)
TINY = dict(hidden=256, layers=2, heads=4, kv_heads=2, head_dim=64, ffn=512,
            vocab=1000, eps=1e-5, theta=500000.0)


def log(*a):
    print(*a, flush=True)


def timed(fn, dev, warmup, reps):
    """Median milliseconds of fn() over `reps` runs after `warmup` runs."""
    cuda = dev.type == "cuda"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def roofline(dev):
    n = 1 << 30  # 1 Gi bf16 elements = 2 GiB
    src = torch.randn(n, device=dev, dtype=BF16)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), dev, 3, 10)
    copy_gbps = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
    log(f"copy: 2 GiB in {ms:.3f} ms -> {copy_gbps:.1f} GB/s (read+write)")
    del src, dst
    rates = []
    for m, k, nn in ((8192, 8192, 8192), (1024, 4096, 14336)):
        a = torch.randn(m, k, device=dev, dtype=BF16)
        b = torch.randn(k, nn, device=dev, dtype=BF16)
        ms = timed(lambda: torch.matmul(a, b), dev, 3, 10)
        rates.append(2 * m * nn * k / (ms * 1e-3) / 1e12)
        log(f"gemm {m}x{k} @ {k}x{nn}: {ms:.3f} ms -> {rates[-1]:.1f} TFLOP/s")
        del a, b
    torch.cuda.empty_cache()
    return copy_gbps, rates[0], rates[1]


def make_weights(c, dev, ctx_max):
    def mat(o, i):
        return torch.randn(o, i, device=dev, dtype=BF16).mul_(0.02)

    def norm():
        return torch.randn(c["hidden"], device=dev, dtype=BF16).mul_(0.02).add_(1.0)

    h, hd, kvd = c["hidden"], c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]
    layers = []
    for _ in range(c["layers"]):
        layers.append(dict(attn_norm=norm(), q=mat(hd, h), k=mat(kvd, h), v=mat(kvd, h),
                           o=mat(h, hd), mlp_norm=norm(), gate=mat(c["ffn"], h),
                           up=mat(c["ffn"], h), down=mat(h, c["ffn"])))
    inv = 1.0 / (c["theta"] ** (torch.arange(0, c["head_dim"], 2, device=dev).float() / c["head_dim"]))
    ang = torch.outer(torch.arange(ctx_max, device=dev).float(), inv)
    emb = torch.cat((ang, ang), dim=-1)
    return dict(embed=mat(c["vocab"], h), layers=layers, norm=norm(), lm_head=mat(c["vocab"], h),
                cos=emb.cos().to(BF16), sin=emb.sin().to(BF16))


def rms_norm(x, w, eps):
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def gqa_supported(dev):
    try:
        q = torch.randn(1, 4, 2, 8, device=dev, dtype=BF16)
        kv = torch.randn(1, 2, 2, 8, device=dev, dtype=BF16)
        F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
        return True
    except (TypeError, RuntimeError):
        return False


def forward(W, c, tokens, pos, caches, gqa):
    """Eager Llama forward for tokens [B, T] at positions pos..pos+T-1; returns last-token logits."""
    B, T = tokens.shape
    nh, nkv, D = c["heads"], c["kv_heads"], c["head_dim"]
    assert T == 1 or pos == 0, "multi-token steps only from an empty cache"
    cos, sin = W["cos"][pos:pos + T], W["sin"][pos:pos + T]
    x = F.embedding(tokens, W["embed"])
    for L, (kc, vc) in zip(W["layers"], caches):
        h = rms_norm(x, L["attn_norm"], c["eps"])
        q = F.linear(h, L["q"]).view(B, T, nh, D).transpose(1, 2)
        k = F.linear(h, L["k"]).view(B, T, nkv, D).transpose(1, 2)
        v = F.linear(h, L["v"]).view(B, T, nkv, D).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        kc[:, :, pos:pos + T] = k
        vc[:, :, pos:pos + T] = v
        keys, vals = kc[:, :, :pos + T], vc[:, :, :pos + T]
        if gqa:
            a = F.scaled_dot_product_attention(q, keys, vals, is_causal=T > 1, enable_gqa=True)
        else:
            rep = nh // nkv
            a = F.scaled_dot_product_attention(q, keys.repeat_interleave(rep, dim=1),
                                               vals.repeat_interleave(rep, dim=1), is_causal=T > 1)
        x = x + F.linear(a.transpose(1, 2).reshape(B, T, nh * D), L["o"])
        h = rms_norm(x, L["mlp_norm"], c["eps"])
        x = x + F.linear(F.silu(F.linear(h, L["gate"])) * F.linear(h, L["up"]), L["down"])
    x = rms_norm(x[:, -1:], W["norm"], c["eps"])
    return F.linear(x, W["lm_head"]).float()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny shape for a CPU smoke test")
    ap.add_argument("--ctx", type=int, default=None, help="context length (default 1024; tiny 64)")
    ap.add_argument("--batches", default=None, help='decode batches (default "1,8,32,64"; tiny "1,2")')
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--skip-roofline", action="store_true")
    args = ap.parse_args()
    c = TINY if args.tiny else FULL
    ctx = args.ctx or (64 if args.tiny else 1024)
    batches = [int(b) for b in (args.batches or ("1,2" if args.tiny else "1,8,32,64")).split(",")]
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    name = torch.cuda.get_device_name(dev) if cuda else "cpu"
    log(f"device {name}, torch {torch.__version__}, ctx {ctx}, batches {batches}")
    t_start = time.perf_counter()

    copy_gbps = gemm8192 = gemm_prefill = None
    with torch.inference_mode():
        if cuda and not args.skip_roofline:
            copy_gbps, gemm8192, gemm_prefill = roofline(dev)

        ctx_max = ctx + 16
        W = make_weights(c, dev, ctx_max)
        layer_mat = sum(t.numel() for L in W["layers"] for n, t in L.items() if "norm" not in n)
        norms = sum(L[n].numel() for L in W["layers"] for n in ("attn_norm", "mlp_norm")) + W["norm"].numel()
        params = layer_mat + norms + W["embed"].numel() + W["lm_head"].numel()
        # Decode reads every matrix once; the embedding table contributes only B rows (ignored).
        decode_weight_bytes = 2 * (layer_mat + norms + W["lm_head"].numel())
        gqa = gqa_supported(dev)
        log(f"weights ready: {params / 1e9:.3f} B params, enable_gqa={gqa}, "
            f"{time.perf_counter() - t_start:.1f} s elapsed")

        bmax = max(batches)
        kv_shape = (bmax, c["kv_heads"], ctx_max, c["head_dim"])
        caches = [(torch.randn(kv_shape, device=dev, dtype=BF16),
                   torch.randn(kv_shape, device=dev, dtype=BF16)) for _ in range(c["layers"])]

        decode = []
        for B in batches:
            tok = torch.randint(0, c["vocab"], (B, 1), device=dev)
            cb = [(k[:B], v[:B]) for k, v in caches]
            ms = timed(lambda: forward(W, c, tok, ctx, cb, gqa), dev, 3, args.iters)
            kv_bytes = B * c["layers"] * 2 * c["kv_heads"] * c["head_dim"] * ctx * 2
            roof = (decode_weight_bytes + kv_bytes) / (copy_gbps * 1e9) * 1e3 if copy_gbps else None
            decode.append(dict(batch=B, ctx=ctx, ms_per_step=ms, tokens_per_s=B / (ms * 1e-3),
                               roofline_ms=roof, fraction_of_roofline=roof / ms if roof else None,
                               bytes=decode_weight_bytes + kv_bytes))
            log(f"decode B={B:<3} ctx={ctx}: {ms:.3f} ms/step, {B / (ms * 1e-3):.1f} tok/s"
                + (f", roofline {roof:.3f} ms ({roof / ms:.1%})" if roof else ""))
            del cb

        tok = torch.randint(0, c["vocab"], (1, ctx), device=dev)
        cb = [(k[:1], v[:1]) for k, v in caches]
        ms = timed(lambda: forward(W, c, tok, 0, cb, gqa), dev, 2, max(5, args.iters // 2))
        flops = (2 * layer_mat * ctx + 2 * W["lm_head"].numel()
                 + 4 * c["layers"] * c["heads"] * c["head_dim"] * ctx * ctx / 2)
        tflops = flops / (ms * 1e-3) / 1e12
        prefill = dict(tokens=ctx, ms=ms, tflops=tflops,
                       fraction_of_gemm=tflops / gemm8192 if gemm8192 else None)
        log(f"prefill T={ctx}: {ms:.3f} ms, {tflops:.1f} TFLOP/s"
            + (f" ({tflops / gemm8192:.1%} of 8192^3 GEMM)" if gemm8192 else ""))
        del W, caches, cb

    res = dict(device_name=name, torch_version=torch.__version__, copy_gbps=copy_gbps,
               gemm_tflops_8192=gemm8192, gemm_tflops_prefill_shape=gemm_prefill,
               decode=decode, prefill=prefill, params=params,
               decode_weight_bytes=decode_weight_bytes, enable_gqa=gqa)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)

    def fmt(v, spec):
        return format(v, spec) if v is not None else "-"

    log("\n== PyTorch eager baseline: " + name)
    log(f"copy {fmt(copy_gbps, '.1f')} GB/s | GEMM 8192^3 {fmt(gemm8192, '.1f')} TFLOP/s"
        f" | GEMM prefill shape {fmt(gemm_prefill, '.1f')} TFLOP/s | params {params:,}")
    log(f"{'batch':>5} {'ctx':>5} {'ms/step':>9} {'tok/s':>10} {'roof ms':>8} {'frac':>6}")
    for d in decode:
        log(f"{d['batch']:>5} {d['ctx']:>5} {d['ms_per_step']:>9.3f} {d['tokens_per_s']:>10.1f}"
            f" {fmt(d['roofline_ms'], '8.3f'):>8} {fmt(d['fraction_of_roofline'], '6.1%'):>6}")
    log(f"prefill {ctx} tokens: {ms:.3f} ms, {tflops:.1f} TFLOP/s, "
        f"fraction of GEMM {fmt(prefill['fraction_of_gemm'], '.1%')}")
    log(f"total {time.perf_counter() - t_start:.1f} s; JSON -> {args.out}")


if __name__ == "__main__":
    main()
