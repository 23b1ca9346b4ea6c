#!/usr/bin/env python3
"""Desk check of the tensor-core attention kernels (kernels/src/cuda/attention.cu) without a GPU.

Line-by-line emulations of `paged_attention_tc_impl` (one block: 4 warps x 32 lanes) and
`prefill_attention_tc_impl` (one warp at a time), with `mma.sync.m16n8k16` built from the PTX ISA fragment tables
(element -> row/column per lane), `__byte_perm`, shuffles and bf16 round-to-nearest-even, checked against float64
attention on random problems. It mirrors the CUDA code by hand: when you change a fragment mapping there, change it
here and run this (numpy needed). Expected: every case within ~6e-3 (bf16 Q and P); a wrong mapping gives errors of
order 1. This is a review aid, not a substitute for `kernels/tests/parity.rs` on a GPU.

    python3 scripts/desk/tc_attention.py [seed] [cases]
"""
import sys

import numpy as np

def f2bf(x):  # round-to-nearest-even to bf16 bits
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7fff + ((u >> 16) & 1)) >> 16
    return (u & 0xffff).astype(np.uint32)
def bf2f(b): return (np.asarray(b, np.uint32) << 16).view(np.float32)
def pack(lo, hi): return f2bf(lo) | (f2bf(hi) << 16)
def lo16(w): return bf2f(w & 0xffff)
def hi16(w): return bf2f(w >> 16)

def byte_perm(x, y, sel):
    b = [(int(x) >> (8 * i)) & 255 for i in range(4)] + [(int(y) >> (8 * i)) & 255 for i in range(4)]
    return sum(b[(sel >> (4 * i)) & 7] << (8 * i) for i in range(4))


def v_operand(vr, c, e):
    """tc_v_operand: the B operand of P.V for n-tile 8c + e, per lane."""
    sel = 0x7632 if e & 1 else 0x5410
    b0 = np.array([byte_perm(vr[0][c][e >> 1][ln], vr[1][c][e >> 1][ln], sel) for ln in range(32)])
    b1 = np.array([byte_perm(vr[2][c][e >> 1][ln], vr[3][c][e >> 1][ln], sel) for ln in range(32)])
    return b0, b1


def mma(d0, d1, a0, a2, b0, b1):
    # per-lane arrays of 32; builds A 16x16, B 16x8 from the PTX fragment layouts, D = A B + C.
    A = np.zeros((16, 16)); B = np.zeros((16, 8)); C = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        regs = [a0[lane], 0, a2[lane], 0]
        for i in range(8):  # element ai of reg i//2
            w = regs[i // 2]
            val = lo16(np.uint32(w)) if i % 2 == 0 else hi16(np.uint32(w))
            row = g if (i < 2 or 4 <= i < 6) else g + 8
            col = t * 2 + (i & 1) + (8 if i >= 4 else 0)
            A[row, col] = val
        for i in range(4):
            w = [b0[lane], b1[lane]][i // 2]
            val = lo16(np.uint32(w)) if i % 2 == 0 else hi16(np.uint32(w))
            B[t * 2 + (i & 1) + (8 if i >= 2 else 0), g] = val
        C[g, t * 2] = d0[lane]; C[g, t * 2 + 1] = d1[lane]
    D = (A @ B + C).astype(np.float32)
    assert np.all(D[8:] == 0)
    n0 = np.array([D[l >> 2, (l & 3) * 2] for l in range(32)], np.float32)
    n1 = np.array([D[l >> 2, (l & 3) * 2 + 1] for l in range(32)], np.float32)
    return n0, n1


def block(HD, qkv, kc, vc, table, ctx, r, kvh, part, part_size, n_heads, n_kv, row_stride, block_size, scale):
    KCH, VCH = HD // 32, HD // 64
    W = 4
    lanes = np.arange(32); gid = lanes >> 2; tig = lanes & 3
    group = n_heads // n_kv
    start = part * part_size; end = min(ctx, start + part_size)
    kvw = n_kv * HD
    acc_s = np.zeros((W, 8, HD), np.float32); m_s = np.full((W, 8), -np.inf, np.float32); l_s = np.zeros((W, 8), np.float32)
    for warp in range(W):
        qa = np.zeros((2 * KCH, 2, 32), np.uint64)
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            base = r * row_stride + (kvh * group + min(g, group - 1)) * HD
            for c in range(KCH):
                v = qkv[base + c * 32 + t * 8: base + c * 32 + t * 8 + 8] if g < group else np.zeros(8, np.float32)
                for h in range(2):
                    qa[2 * c + h][0][lane] = pack(np.float32(v[4 * h] * scale), np.float32(v[4 * h + 1] * scale))
                    qa[2 * c + h][1][lane] = pack(np.float32(v[4 * h + 2] * scale), np.float32(v[4 * h + 3] * scale))
        m = np.full(32, -np.inf, np.float32); l = np.zeros(32, np.float32)
        acc = np.zeros((8 * VCH, 2, 32), np.float32)
        t0 = start + warp * 16
        while t0 < end:
            kr, vr = load_kv(HD, table, block_size, t0, end, kc, vc, kvw, kvh)  # tc_load_kv
            sc = np.zeros((2, 2, 32), np.float32)
            for j in range(2):
                for c in range(KCH):
                    sc[j][0], sc[j][1] = mma(sc[j][0], sc[j][1], qa[2 * c][0], qa[2 * c][1], kr[j][c][0], kr[j][c][1])
                    sc[j][0], sc[j][1] = mma(sc[j][0], sc[j][1], qa[2 * c + 1][0], qa[2 * c + 1][1], kr[j][c][2], kr[j][c][3])
            mx = np.full(32, -np.inf, np.float32)
            for j in range(2):
                for e in range(2):
                    mask = t0 + 8 * j + 2 * tig + e >= end
                    sc[j][e][mask] = -np.inf
                    mx = np.maximum(mx, sc[j][e])
            mx = np.maximum(mx, mx[lanes ^ 1]); mx = np.maximum(mx, mx[lanes ^ 2])
            m_new = np.maximum(m, mx)
            corr = np.exp(m - m_new)
            p = np.zeros((2, 2, 32), np.float32); psum = np.zeros(32, np.float32)
            for j in range(2):
                for e in range(2):
                    p[j][e] = np.where(sc[j][e] == -np.inf, 0, np.exp(sc[j][e] - m_new))
                    psum += p[j][e]
            l = l * corr + psum; m = m_new
            pa0 = pack(p[0][0], p[0][1]); pa2 = pack(p[1][0], p[1][1])
            for c in range(VCH):
                for e in range(8):
                    b0, b1 = v_operand(vr, c, e)
                    a = acc[8 * c + e]
                    a[0] *= corr; a[1] *= corr
                    a[0], a[1] = mma(a[0], a[1], pa0, pa2, b0, b1)
            t0 += W * 16
        l = l + l[lanes ^ 1]; l = l + l[lanes ^ 2]
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            if g < group:
                for tt in range(8 * VCH):
                    for e in range(2):
                        acc_s[warp][g][(tt >> 3) * 64 + (2 * t + e) * 8 + (tt & 7)] = acc[tt][e][lane]
                if t == 0: m_s[warp][g] = m[lane]; l_s[warp][g] = l[lane]
    out = np.zeros((group, HD)); ml = np.zeros((group, 2))
    for g in range(group):
        mx = m_s[:, g].max()
        f = np.exp(m_s[:, g] - mx)
        s = (l_s[:, g] * f).sum(); o = (acc_s[:, g, :] * f[:, None]).sum(0)
        out[g] = o; ml[g] = (mx, s)
    return out, ml


def decode_cases(rng, count):
    worst = 0
    for case in range(count):
        HD = [64, 128][case % 2]
        n_kv = [1, 2, 3][case % 3]; group = [1, 3, 4, 8, 2, 5][case % 6]; n_heads = n_kv * group
        block_size = [16, 8, 32][case % 3]
        ctx = int(rng.integers(1, 200)); nblk = ctx // block_size + 3
        perm = rng.permutation(nblk + 4)[:nblk]
        num_slots = (nblk + 4) * block_size
        kvw = n_kv * HD
        kf = (rng.standard_normal((num_slots, kvw)) * 1.5).astype(np.float32); vf = rng.standard_normal((num_slots, kvw)).astype(np.float32)
        kc = f2bf(kf).astype(np.uint16); vc = f2bf(vf).astype(np.uint16)
        kc = kc.reshape(-1); vc = vc.reshape(-1)
        row_stride = (n_heads + 2 * n_kv) * HD
        qkv = (rng.standard_normal(2 * row_stride) * 1.5).astype(np.float32)
        scale = np.float32(1 / np.sqrt(HD))
        part_size = int(rng.integers(ctx // 3 + 1, ctx + 1)); num_parts = -(-ctx // part_size)
        kvh = int(rng.integers(0, n_kv)); r = 1
        # float64 reference for head group of kvh
        K = bf2f(kc.reshape(num_slots, kvw)).astype(np.float64); V = bf2f(vc.reshape(num_slots, kvw)).astype(np.float64)
        slots = [perm[t // block_size] * block_size + t % block_size for t in range(ctx)]
        ref = np.zeros((group, HD))
        outs = []; mls = []
        for part in range(num_parts):
            o, ml = block(HD, qkv, kc, vc, perm, ctx, r, kvh, part, part_size, n_heads, n_kv, row_stride, block_size, scale)
            outs.append(o); mls.append(ml)
        mx = np.max([ml[:, 0] for ml in mls], axis=0)
        tot = sum(ml[:, 1] * np.exp(ml[:, 0] - mx) for ml in mls)
        got = sum(o * np.exp(ml[:, 0] - mx)[:, None] for o, ml in zip(outs, mls)) / tot[:, None]
        for g in range(group):
            q = qkv[r * row_stride + (kvh * group + g) * HD:][:HD].astype(np.float64) * float(scale)
            kk = K[slots, kvh * HD:(kvh + 1) * HD]; vv = V[slots, kvh * HD:(kvh + 1) * HD]
            s = kk @ q; w = np.exp(s - s.max()); w /= w.sum()
            ref[g] = w @ vv
        err = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        worst = max(worst, err)
        print(f"case {case}: HD {HD} n_kv {n_kv} group {group} bs {block_size} ctx {ctx} parts {num_parts}: rel err {err:.2e}")
    print("worst", worst)
    return worst


def mma_full(d, a, b0, b1):
    # d: list of 4 arrays (32,), a: list of 4 arrays (32,) (uint), b0/b1 arrays
    A = np.zeros((16, 16)); B = np.zeros((16, 8)); C = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane >> 2, lane & 3
        regs = [a[0][lane], a[1][lane], a[2][lane], a[3][lane]]
        for i in range(8):
            w = np.uint32(regs[i // 2])
            val = lo16(w) if i % 2 == 0 else hi16(w)
            row = g if (i < 2 or 4 <= i < 6) else g + 8
            col = t * 2 + (i & 1) + (8 if i >= 4 else 0)
            A[row, col] = val
        for i in range(4):
            w = np.uint32([b0[lane], b1[lane]][i // 2])
            val = lo16(w) if i % 2 == 0 else hi16(w)
            B[t * 2 + (i & 1) + (8 if i >= 2 else 0), g] = val
        C[g, t * 2] = d[0][lane]; C[g, t * 2 + 1] = d[1][lane]; C[g + 8, t * 2] = d[2][lane]; C[g + 8, t * 2 + 1] = d[3][lane]
    D = (A @ B + C).astype(np.float32)
    return [np.array([D[(l >> 2) + 8 * (k // 2), (l & 3) * 2 + (k % 2)] for l in range(32)], np.float32) for k in range(4)]

def load_kv(HD, table, block_size, t0, end, kc, vc, kvw, kvh):
    KCH, VCH = HD // 32, HD // 64
    lanes = np.arange(32); gid = lanes >> 2; tig = lanes & 3
    my_slot = np.full(32, -1)
    for lane in range(16):
        t = t0 + lane
        if t < end: my_slot[lane] = table[t // block_size] * block_size + t % block_size
    kr = np.zeros((2, KCH, 4, 32), np.uint64)
    for j in range(2):
        for lane in range(32):
            s = my_slot[8 * j + gid[lane]]
            for c in range(KCH):
                if s >= 0:
                    off = s * kvw + kvh * HD + tig[lane] * 8 + c * 32
                    w = kc[off:off + 8]
                    for q in range(4): kr[j][c][q][lane] = int(w[2 * q]) | (int(w[2 * q + 1]) << 16)
    vr = np.zeros((4, VCH, 4, 32), np.uint64)
    for i in range(4):
        for lane in range(32):
            s = my_slot[(i >> 1) * 8 + 2 * tig[lane] + (i & 1)]
            for c in range(VCH):
                if s >= 0:
                    off = s * kvw + kvh * HD + gid[lane] * 8 + c * 64
                    w = vc[off:off + 8]
                    for q in range(4): vr[i][c][q][lane] = int(w[2 * q]) | (int(w[2 * q + 1]) << 16)
    return kr, vr

def warp(HD, qkv, n, start, kc, vc, table, block_size, out, n_heads, n_kv, row_stride, scale, bx, head, w):
    KCH, VCH = HD // 32, HD // 64
    lanes = np.arange(32); gid = lanes >> 2; tig = lanes & 3
    kvh = head // (n_heads // n_kv)
    row0 = bx * 64 + w * 16
    if row0 >= n: return
    kvw = n_kv * HD
    last = start + min(row0 + 15, n - 1)
    pos = np.zeros((2, 32), int)
    qa = np.zeros((2 * KCH, 4, 32), np.uint64)
    for half in range(2):
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            row = min(row0 + g + 8 * half, n - 1)
            pos[half][lane] = start + row
            q = qkv[row * row_stride + head * HD:]
            for c in range(KCH):
                x = q[c * 32 + t * 8: c * 32 + t * 8 + 8]
                sc_ = np.float32(scale)
                qa[2 * c][half][lane] = pack(x[0] * sc_, x[1] * sc_)
                qa[2 * c][2 + half][lane] = pack(x[2] * sc_, x[3] * sc_)
                qa[2 * c + 1][half][lane] = pack(x[4] * sc_, x[5] * sc_)
                qa[2 * c + 1][2 + half][lane] = pack(x[6] * sc_, x[7] * sc_)
    m = [np.full(32, -np.inf, np.float32) for _ in range(2)]; l = [np.zeros(32, np.float32) for _ in range(2)]
    acc = [[np.zeros(32, np.float32) for _ in range(4)] for _ in range(8 * VCH)]
    t0 = 0
    while t0 <= last:
        kr, vr = load_kv(HD, table, block_size, t0, last + 1, kc, vc, kvw, kvh)
        sc = []
        for j in range(2):
            d = [np.zeros(32, np.float32) for _ in range(4)]
            for c in range(KCH):
                d = mma_full(d, qa[2 * c], kr[j][c][0], kr[j][c][1])
                d = mma_full(d, qa[2 * c + 1], kr[j][c][2], kr[j][c][3])
            sc.append(d)
        corr = [None, None]; p = [[None] * 4 for _ in range(2)]
        for half in range(2):
            mx = np.full(32, -np.inf, np.float32)
            for j in range(2):
                for e in range(2):
                    mask = t0 + 8 * j + 2 * tig + e > pos[half]
                    sc[j][2 * half + e] = np.where(mask, -np.inf, sc[j][2 * half + e]).astype(np.float32)
                    mx = np.maximum(mx, sc[j][2 * half + e])
            mx = np.maximum(mx, mx[lanes ^ 1]); mx = np.maximum(mx, mx[lanes ^ 2])
            m_new = np.maximum(m[half], mx)
            corr[half] = np.exp(m[half] - m_new).astype(np.float32)
            psum = np.zeros(32, np.float32)
            for j in range(2):
                for e in range(2):
                    s = sc[j][2 * half + e]
                    p[j][2 * half + e] = np.where(s == -np.inf, 0, np.exp(s - m_new)).astype(np.float32)
                    psum += p[j][2 * half + e]
            l[half] = l[half] * corr[half] + psum; m[half] = m_new
        pa = [pack(p[0][0], p[0][1]), pack(p[0][2], p[0][3]), pack(p[1][0], p[1][1]), pack(p[1][2], p[1][3])]
        for c in range(VCH):
            for e in range(8):
                b0, b1 = v_operand(vr, c, e)
                a = acc[8 * c + e]
                a[0] = a[0] * corr[0]; a[1] = a[1] * corr[0]; a[2] = a[2] * corr[1]; a[3] = a[3] * corr[1]
                acc[8 * c + e] = mma_full(a, pa, b0, b1)
        t0 += 16
    for half in range(2):
        s = l[half] + l[half][lanes ^ 1]; s = s + s[lanes ^ 2]
        for lane in range(32):
            g, t = lane >> 2, lane & 3
            row = row0 + g + 8 * half
            if row < n:
                for tt in range(8 * VCH):
                    for e in range(2):
                        out[row, head, (tt >> 3) * 64 + (2 * t + e) * 8 + (tt & 7)] = acc[tt][2 * half + e][lane] / s[lane]


def prefill_cases(rng, count):
    worst = 0
    for case in range(count):
        HD = [64, 128][case % 2]
        n_kv = [1, 2][case % 2]; group = [1, 3, 4, 2][case % 4]; n_heads = n_kv * group
        block_size = [16, 8, 32][case % 3]
        start = int(rng.integers(0, 40)); n = int(rng.integers(1, 90))
        ctx = start + n
        nblk = ctx // block_size + 2
        table = rng.permutation(nblk + 3)[:nblk]
        num_slots = (nblk + 3) * block_size; kvw = n_kv * HD
        kc = f2bf((rng.standard_normal((num_slots, kvw)) * 1.5).astype(np.float32)).astype(np.uint16).reshape(-1)
        vc = f2bf(rng.standard_normal((num_slots, kvw)).astype(np.float32)).astype(np.uint16).reshape(-1)
        row_stride = (n_heads + 2 * n_kv) * HD
        qkv = (rng.standard_normal(n * row_stride) * 1.5).astype(np.float32)
        scale = np.float32(1 / np.sqrt(HD))
        out = np.full((n, n_heads, HD), np.nan)
        for bx in range(-(-n // 64)):
            for head in range(n_heads):
                for w in range(4):
                    warp(HD, qkv, n, start, kc, vc, table, block_size, out, n_heads, n_kv, row_stride, scale, bx, head, w)
        K = bf2f(kc.reshape(num_slots, kvw)).astype(np.float64); V = bf2f(vc.reshape(num_slots, kvw)).astype(np.float64)
        ref = np.zeros_like(out)
        for i in range(n):
            p_ = start + i
            slots = [table[t // block_size] * block_size + t % block_size for t in range(p_ + 1)]
            for h in range(n_heads):
                kvh = h // group
                q = qkv[i * row_stride + h * HD:][:HD].astype(np.float64) * float(scale)
                s = K[slots, kvh * HD:(kvh + 1) * HD] @ q; wgt = np.exp(s - s.max()); wgt /= wgt.sum()
                ref[i, h] = wgt @ V[slots, kvh * HD:(kvh + 1) * HD]
        err = np.linalg.norm(out - ref) / np.linalg.norm(ref)
        worst = max(worst, err)
        print(f"case {case}: HD {HD} heads {n_heads}/{n_kv} bs {block_size} start {start} n {n}: rel err {err:.2e}")
    print("worst", worst)
    return worst


if __name__ == "__main__":
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 0
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 6
    rng = np.random.default_rng(seed)
    worst = max(decode_cases(rng, count), prefill_cases(rng, count))
    print("worst relative error", worst)
    sys.exit(0 if worst < 1e-2 else 1)
