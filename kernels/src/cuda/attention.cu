// Ferrite CUDA kernels: paged attention for decode rows (and short prefill chunks), on CUDA cores and on tensor
// cores, the reduce over attention partitions, and flash-style causal prefill attention on tensor cores. Compiled with NVRTC as one translation unit after `llama.cu`, whose
// conventions and helpers (bf16 conversions, warp reductions, load8, pdl_begin) it uses (see `kernels/src/cuda/mod.rs`).

#define ATT_WARPS 4
#define ATT_V_CHUNK 16

// The end of a paged attention block: combines its warps' online-softmax states (acc_s, m_s, l_s, filled and
// synchronized by the caller) and writes the normalized bf16 output (num_parts == 1) or the partition's
// unnormalized partials for attention_reduce. Thread i handles (g, d) pairs.
template <int HD, int MAXG>
__device__ __forceinline__ void attention_combine(const float (*acc_s)[MAXG][HD], const float (*m_s)[MAXG],
                                                  const float (*l_s)[MAXG], int group, int r, int kvh, int part,
                                                  int n_heads, int num_parts, bf16* __restrict__ out,
                                                  float* __restrict__ part_out, float* __restrict__ part_ml) {
    for (int i = threadIdx.x; i < group * HD; i += blockDim.x) {
        const int g = i / HD, d = i % HD;
        float mx = -INFINITY;
        for (int w = 0; w < ATT_WARPS; w++) mx = fmaxf(mx, m_s[w][g]);
        float sum = 0.0f, o = 0.0f;
        if (mx != -INFINITY) {
            for (int w = 0; w < ATT_WARPS; w++) {
                const float f = __expf(m_s[w][g] - mx);  // 0 for warps that saw no position
                sum += l_s[w][g] * f;
                o += acc_s[w][g][d] * f;
            }
        }
        const int head = kvh * group + g;
        if (num_parts == 1) {
            out[(size_t)r * n_heads * HD + head * HD + d] = f2bf(sum > 0.0f ? o / sum : 0.0f);
        } else {
            const size_t pi = ((size_t)r * n_heads + head) * num_parts + part;
            part_out[pi * HD + d] = o;
            if (d == 0) {
                part_ml[pi * 2] = mx;
                part_ml[pi * 2 + 1] = sum;
            }
        }
    }
}

// Paged attention for any mix of prefill and decode rows. Query row r (a token at position ctx_len[r]-1) attends
// causally over positions [0, ctx_len[r]) of its sequence, whose block table starts at tables[table_off[r]]; rows
// with ctx_len 0 are skipped (they take the dense path). One block handles one row, one KV head (all `group` query
// heads sharing it, so K/V are read once for the group) and one partition of `part_size` positions.
//
// Each warp takes 32 positions per iteration, one per lane: a lane computes its key's scores for the group with
// 16-byte loads of the whole K row (all in flight at once), the warp folds the 32 scores into its online softmax,
// then lanes switch to owning head dimensions and accumulate P·V over the 32 rows (coalesced V loads, p broadcast
// by shuffle). With num_parts == 1 it writes the normalized bf16 output out[r, head·HD + d]; otherwise unnormalized
// partials (part_out[r, head, p, d], part_ml[r, head, p, {max, sum}]) for attention_reduce. Twin: attend_one.
// grid (T, n_kv, num_parts), block (32·ATT_WARPS).
template <int HD, int MAXG>
__device__ void paged_attention_impl(const float* __restrict__ qkv, const bf16* __restrict__ k_cache,
                                     const bf16* __restrict__ v_cache, const int* __restrict__ tables,
                                     const int* __restrict__ table_off, const int* __restrict__ ctx_len,
                                     bf16* __restrict__ out, float* __restrict__ part_out,
                                     float* __restrict__ part_ml, int n_heads, int n_kv, int row_stride,
                                     int block_size, float scale, int part_size, int num_parts) {
    constexpr int EPL = HD / 32;  // output dimensions per lane
    const int r = blockIdx.x, kvh = blockIdx.y, part = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int group = n_heads / n_kv;
    const int ctx = ctx_len[r];
    const int start = part * part_size;
    const int end = min(ctx, start + part_size);
    const int kv_width = n_kv * HD;

    __shared__ __align__(16) float q_s[MAXG][HD];
    __shared__ float acc_s[ATT_WARPS][MAXG][HD];
    __shared__ float m_s[ATT_WARPS][MAXG];
    __shared__ float l_s[ATT_WARPS][MAXG];

    if (ctx == 0) return;  // a dense-path row: nothing to write
    const float* qrow = qkv + (size_t)r * row_stride + (size_t)kvh * group * HD;
    for (int i = threadIdx.x; i < group * HD; i += blockDim.x) q_s[i / HD][i % HD] = qrow[i] * scale;
    __syncthreads();

    float m[MAXG], l[MAXG], acc[MAXG][EPL];
#pragma unroll
    for (int g = 0; g < MAXG; g++) {
        m[g] = -INFINITY;
        l[g] = 0.0f;
#pragma unroll
        for (int e = 0; e < EPL; e++) acc[g][e] = 0.0f;
    }
    const int* table = tables + table_off[r];
    for (int t0 = start + warp * 32; t0 < end; t0 += ATT_WARPS * 32) {
        const int t = t0 + lane;
        const bool valid = t < end;
        const long long slot = valid ? (long long)table[t / block_size] * block_size + t % block_size : 0;
        // Scores of this lane's key for every query head of the group: the whole K row is loaded (raw bf16 pairs,
        // all 16-byte loads in flight), then converted as it is consumed.
        float s[MAXG];
#pragma unroll
        for (int g = 0; g < MAXG; g++) s[g] = 0.0f;
        if (valid) {
            const uint4* kp = reinterpret_cast<const uint4*>(k_cache + slot * kv_width + kvh * HD);
            uint4 kr[HD / 8];
#pragma unroll
            for (int c = 0; c < HD / 8; c++) kr[c] = kp[c];
#pragma unroll
            for (int g = 0; g < MAXG; g++) {
                if (g < group) {
                    float dot = 0.0f;
#pragma unroll
                    for (int c = 0; c < HD / 8; c++) {
                        // Every lane reads the same q: two broadcast 16-byte shared loads per 8 dimensions.
                        const float4 qa = *reinterpret_cast<const float4*>(&q_s[g][c * 8]);
                        const float4 qb = *reinterpret_cast<const float4*>(&q_s[g][c * 8 + 4]);
                        dot += qa.x * __uint_as_float(kr[c].x << 16) + qa.y * __uint_as_float(kr[c].x & 0xffff0000u);
                        dot += qa.z * __uint_as_float(kr[c].y << 16) + qa.w * __uint_as_float(kr[c].y & 0xffff0000u);
                        dot += qb.x * __uint_as_float(kr[c].z << 16) + qb.y * __uint_as_float(kr[c].z & 0xffff0000u);
                        dot += qb.z * __uint_as_float(kr[c].w << 16) + qb.w * __uint_as_float(kr[c].w & 0xffff0000u);
                    }
                    s[g] = dot;
                }
            }
        }
        const int nvalid = min(32, end - t0);
        float p[MAXG];
#pragma unroll
        for (int g = 0; g < MAXG; g++) {
            if (g < group) {
                const float sg = valid ? s[g] : -INFINITY;
                const float m_new = fmaxf(m[g], warp_max(sg));  // lane 0's key is valid, so m_new is finite
                const float corr = __expf(m[g] - m_new);
                p[g] = valid ? __expf(sg - m_new) : 0.0f;
                l[g] = l[g] * corr + warp_sum(p[g]);
#pragma unroll
                for (int e = 0; e < EPL; e++) acc[g][e] *= corr;
                m[g] = m_new;
            }
        }
        // P·V: lanes own dimensions lane·EPL .. +EPL. V rows come ATT_V_CHUNK at a time, all loaded before use
        // (raw bf16 pairs), then accumulated with p broadcast by shuffle.
#pragma unroll
        for (int j0 = 0; j0 < 32; j0 += ATT_V_CHUNK) {
            if (j0 < nvalid) {
                unsigned int vr[ATT_V_CHUNK][EPL / 2];
#pragma unroll
                for (int u = 0; u < ATT_V_CHUNK; u++) {
                    const int j = j0 + u;
                    const long long sj = __shfl_sync(0xffffffffu, slot, j);
                    if (j < nvalid) {
                        const unsigned int* vp =
                            reinterpret_cast<const unsigned int*>(v_cache + sj * kv_width + kvh * HD + lane * EPL);
#pragma unroll
                        for (int e = 0; e < EPL / 2; e++) vr[u][e] = vp[e];
                    }
                }
#pragma unroll
                for (int u = 0; u < ATT_V_CHUNK; u++) {
                    const int j = j0 + u;
                    if (j < nvalid) {
#pragma unroll
                        for (int g = 0; g < MAXG; g++) {
                            if (g < group) {
                                const float pj = __shfl_sync(0xffffffffu, p[g], j);
#pragma unroll
                                for (int e = 0; e < EPL / 2; e++) {
                                    acc[g][2 * e] += pj * __uint_as_float(vr[u][e] << 16);
                                    acc[g][2 * e + 1] += pj * __uint_as_float(vr[u][e] & 0xffff0000u);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
#pragma unroll
    for (int g = 0; g < MAXG; g++) {
        if (g < group) {
#pragma unroll
            for (int e = 0; e < EPL; e++) acc_s[warp][g][lane * EPL + e] = acc[g][e];
            if (lane == 0) {
                m_s[warp][g] = m[g];
                l_s[warp][g] = l[g];
            }
        }
    }
    __syncthreads();
    attention_combine<HD, MAXG>(acc_s, m_s, l_s, group, r, kvh, part, n_heads, num_parts, out, part_out, part_ml);
}

#define PAGED_ATTENTION(HD, MAXG)                                                                                   \
    extern "C" __global__ void __launch_bounds__(32 * ATT_WARPS) paged_attention_hd##HD##_g##MAXG(                   \
        const float* __restrict__ qkv, const bf16* __restrict__ k_cache, const bf16* __restrict__ v_cache,          \
        const int* __restrict__ tables, const int* __restrict__ table_off, const int* __restrict__ ctx_len,         \
        bf16* __restrict__ out, float* __restrict__ part_out, float* __restrict__ part_ml, int n_heads, int n_kv,   \
        int head_dim, int row_stride, int block_size, float scale, int part_size, int num_parts) {                  \
        pdl_begin();                                                                                                \
        paged_attention_impl<HD, MAXG>(qkv, k_cache, v_cache, tables, table_off, ctx_len, out, part_out, part_ml,   \
                                       n_heads, n_kv, row_stride, block_size, scale, part_size, num_parts);         \
    }
// Instantiations: head_dim 64 / 128, at most 4 or 8 query heads per KV head (fewer registers when the group is small).
PAGED_ATTENTION(64, 4)
PAGED_ATTENTION(64, 8)
PAGED_ATTENTION(128, 4)
PAGED_ATTENTION(128, 8)

// ---- Paged attention on tensor cores ----

// Two bf16 (round to nearest even) in one register: `lo` in the low half, as mma fragments and memory order want.
__device__ __forceinline__ unsigned int pack_bf16x2(float lo, float hi) {
    return (unsigned int)f2bf(lo) | ((unsigned int)f2bf(hi) << 16);
}

// d += a·b on one m16n8k16 tile (bf16 in, f32 accumulate), for A tiles whose rows 8..15 are zero: `a0` holds
// A[gid][2·tig + {0,1}] and `a2` A[gid][8 + 2·tig + {0,1}] (gid = lane / 4, tig = lane % 4); `b0` holds
// B[2·tig + {0,1}][gid] and `b1` B[8 + 2·tig + {0,1}][gid]; `d0, d1` are D[gid][2·tig + {0,1}] (rows 8..15 of D stay
// zero and are dropped). Needs sm_80.
__device__ __forceinline__ void mma_rows8(float& d0, float& d1, unsigned int a0, unsigned int a2, unsigned int b0,
                                          unsigned int b1) {
#if __CUDA_ARCH__ >= 800
    float z2, z3;
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};\n"
        : "=f"(d0), "=f"(d1), "=f"(z2), "=f"(z3)
        : "r"(a0), "r"(0u), "r"(a2), "r"(0u), "r"(b0), "r"(b1), "f"(d0), "f"(d1), "f"(0.0f), "f"(0.0f));
#else
    __trap();  // the host never launches the tensor-core kernels below sm_80
#endif
}

// d += a·b on one full m16n8k16 tile (bf16 in, f32 accumulate): a[0] holds A[gid][2·tig + {0,1}], a[1]
// A[gid + 8][2·tig + {0,1}], a[2] A[gid][8 + 2·tig + {0,1}], a[3] A[gid + 8][8 + 2·tig + {0,1}]; b0/b1 as in
// mma_rows8; d[0..1] are D[gid][2·tig + {0,1}], d[2..3] D[gid + 8][2·tig + {0,1}]. Needs sm_80.
__device__ __forceinline__ void mma16816(float (&d)[4], const unsigned int (&a)[4], unsigned int b0, unsigned int b1) {
#if __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();  // the host never launches the tensor-core kernels below sm_80
#endif
}

// Loads one 16-position tile of K and V (positions t0 .. t0 + 15 of a sequence; those at or past `end` read as
// zeros) in the register layouts the tensor-core kernels use:
// - kr[j][c]: K of position t0 + 8j + gid, dims c·32 + 8·tig .. +8 (the B operand of Q·Kᵀ, see mma_rows8's caller);
// - vr[i][c]: V of position t0 + {2·tig, 2·tig + 1, 8 + 2·tig, 9 + 2·tig}[i], dims c·64 + 8·gid .. +8.
// Lane i < 16 looks up position t0 + i in the block table; the others get it by shuffle.
template <int HD>
__device__ __forceinline__ void tc_load_kv(const int* __restrict__ table, int block_size, int t0, int end,
                                           const bf16* __restrict__ k_cache, const bf16* __restrict__ v_cache,
                                           int kv_width, int kvh, uint4 (&kr)[2][HD / 32], uint4 (&vr)[4][HD / 64]) {
    const unsigned int full = 0xffffffffu;
    const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    int my_slot = -1;
    if (lane < 16 && t0 + lane < end) {
        const int t = t0 + lane;
        my_slot = table[t / block_size] * block_size + t % block_size;
    }
#pragma unroll
    for (int j = 0; j < 2; j++) {
        const int s = __shfl_sync(full, my_slot, 8 * j + gid);
        const uint4* kp = reinterpret_cast<const uint4*>(k_cache + (size_t)max(s, 0) * kv_width + kvh * HD + tig * 8);
#pragma unroll
        for (int c = 0; c < HD / 32; c++) kr[j][c] = s >= 0 ? kp[c * 4] : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int s = __shfl_sync(full, my_slot, (i >> 1) * 8 + 2 * tig + (i & 1));
        const uint4* vp = reinterpret_cast<const uint4*>(v_cache + (size_t)max(s, 0) * kv_width + kvh * HD + gid * 8);
#pragma unroll
        for (int c = 0; c < HD / 64; c++) vr[i][c] = s >= 0 ? vp[c * 8] : make_uint4(0u, 0u, 0u, 0u);
    }
}

// The B operand of P·V for n-tile 8c + e (dim c·64 + 8·gid + e, half e % 2 of word e / 2 in each V row's chunk):
// b0 pairs the values of positions 2·tig and 2·tig + 1 of the tile, b1 those of 8 + 2·tig and 9 + 2·tig.
template <int VCH>
__device__ __forceinline__ void tc_v_operand(const uint4 (&vr)[4][VCH], int c, int e, unsigned int& b0,
                                             unsigned int& b1) {
    const unsigned int sel = (e & 1) ? 0x7632u : 0x5410u;
    const int w = e >> 1;
    const auto word = [&](int i) {
        const uint4 v = vr[i][c];
        return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w;
    };
    b0 = __byte_perm(word(0), word(1), sel);
    b1 = __byte_perm(word(2), word(3), sel);
}

// Tensor-core variant of paged_attention: same arguments, grid, block and outputs (the host picks one per step size
// at start-up, see worker/src/cuda/tune.rs). Per block: one row, one KV head, one partition; its `group` (≤ 8)
// query heads are the M rows of m16n8k16 tiles (rows ≥ group are zero).
//
// A warp takes 16 positions per iteration and issues all their K and V loads at once (16-byte loads; each
// instruction reads whole 32-byte sectors of 8 K rows or 4 V rows). The head dimension of Q·Kᵀ is permuted so that
// a lane's fragments come from one contiguous 16-byte chunk: k-step 2c+h pairs dims c·32 + 8·tig + 4h + {0,1}
// (register a0/b0) and + {2,3} (a2/b1), the same permutation for Q and K, so the dot products are unchanged. The
// scores come out as the P operand of P·V (keys 2·tig + {0,1} and 8 + 2·tig + {0,1} of the tile) and stay in
// registers (as bf16, like the dense prefill path's P). For P·V the lanes of group gid own dims c·64 + 8·gid + e
// (n-tile 8c + e); the V operand pairs two keys' values of one dim, built from two 16-byte row loads with byte
// permutes. Online softmax per head row (shared by its 4 lanes) in f32; the block's warps combine as in
// paged_attention. Twin: attend_one.
template <int HD>
__device__ void paged_attention_tc_impl(const float* __restrict__ qkv, const bf16* __restrict__ k_cache,
                                        const bf16* __restrict__ v_cache, const int* __restrict__ tables,
                                        const int* __restrict__ table_off, const int* __restrict__ ctx_len,
                                        bf16* __restrict__ out, float* __restrict__ part_out,
                                        float* __restrict__ part_ml, int n_heads, int n_kv, int row_stride,
                                        int block_size, float scale, int part_size, int num_parts) {
    constexpr int KCH = HD / 32;  // 16-byte K chunks per lane and key row; Q·Kᵀ takes 2·KCH k-steps
    constexpr int VCH = HD / 64;  // 16-byte V chunks per lane and value row; P·V takes 8·VCH n-tiles
    const unsigned int full = 0xffffffffu;
    const int r = blockIdx.x, kvh = blockIdx.y, part = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int group = n_heads / n_kv;
    const int ctx = ctx_len[r];
    const int start = part * part_size;
    const int end = min(ctx, start + part_size);
    const int kv_width = n_kv * HD;

    __shared__ float acc_s[ATT_WARPS][8][HD];
    __shared__ float m_s[ATT_WARPS][8];
    __shared__ float l_s[ATT_WARPS][8];

    if (ctx == 0) return;  // a dense-path row: nothing to write

    // Q fragments of head gid (zero rows past the group), pre-scaled, in the permuted k order.
    unsigned int qa[2 * KCH][2];
    {
        const float* q = qkv + (size_t)r * row_stride + (size_t)(kvh * group + min(gid, group - 1)) * HD;
#pragma unroll
        for (int c = 0; c < KCH; c++) {
            float v[8];
            if (gid < group) {
                const float4 x0 = *reinterpret_cast<const float4*>(q + c * 32 + tig * 8);
                const float4 x1 = *reinterpret_cast<const float4*>(q + c * 32 + tig * 8 + 4);
                v[0] = x0.x; v[1] = x0.y; v[2] = x0.z; v[3] = x0.w;
                v[4] = x1.x; v[5] = x1.y; v[6] = x1.z; v[7] = x1.w;
            } else {
#pragma unroll
                for (int e = 0; e < 8; e++) v[e] = 0.0f;
            }
#pragma unroll
            for (int h = 0; h < 2; h++) {
                qa[2 * c + h][0] = pack_bf16x2(v[4 * h] * scale, v[4 * h + 1] * scale);
                qa[2 * c + h][1] = pack_bf16x2(v[4 * h + 2] * scale, v[4 * h + 3] * scale);
            }
        }
    }

    float m = -INFINITY;  // running max of head gid's scores (equal in the group's 4 lanes)
    float l = 0.0f;       // this lane's share of the running sum
    float acc[8 * VCH][2];  // O[gid][dim(t, 2·tig + e)], dim(t, n) = (t / 8)·64 + 8n + t % 8
#pragma unroll
    for (int t = 0; t < 8 * VCH; t++) acc[t][0] = acc[t][1] = 0.0f;

    const int* table = tables + table_off[r];
    for (int t0 = start + warp * 16; t0 < end; t0 += ATT_WARPS * 16) {
        uint4 kr[2][KCH], vr[4][VCH];
        tc_load_kv<HD>(table, block_size, t0, end, k_cache, v_cache, kv_width, kvh, kr, vr);

        // S = Q·Kᵀ: sc[j][e] = S[gid][8j + 2·tig + e].
        float sc[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
#pragma unroll
        for (int j = 0; j < 2; j++) {
#pragma unroll
            for (int c = 0; c < KCH; c++) {
                mma_rows8(sc[j][0], sc[j][1], qa[2 * c][0], qa[2 * c][1], kr[j][c].x, kr[j][c].y);
                mma_rows8(sc[j][0], sc[j][1], qa[2 * c + 1][0], qa[2 * c + 1][1], kr[j][c].z, kr[j][c].w);
            }
        }
        // Online softmax over the tile (position t0 is valid, so the new max is finite).
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < 2; j++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                if (t0 + 8 * j + 2 * tig + e >= end) sc[j][e] = -INFINITY;
                mx = fmaxf(mx, sc[j][e]);
            }
        }
        mx = fmaxf(mx, __shfl_xor_sync(full, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(full, mx, 2));
        const float m_new = fmaxf(m, mx);
        const float corr = __expf(m - m_new);
        float p[2][2];
        float psum = 0.0f;
#pragma unroll
        for (int j = 0; j < 2; j++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                p[j][e] = sc[j][e] == -INFINITY ? 0.0f : __expf(sc[j][e] - m_new);
                psum += p[j][e];
            }
        }
        l = l * corr + psum;
        m = m_new;
        // P·V over the tile's 16 positions: A = P (a0: keys 2·tig + {0,1}, a2: keys 8 + 2·tig + {0,1}).
        const unsigned int pa0 = pack_bf16x2(p[0][0], p[0][1]);
        const unsigned int pa2 = pack_bf16x2(p[1][0], p[1][1]);
#pragma unroll
        for (int c = 0; c < VCH; c++) {
#pragma unroll
            for (int e = 0; e < 8; e++) {
                unsigned int b0, b1;
                tc_v_operand<VCH>(vr, c, e, b0, b1);
                float* a = acc[8 * c + e];
                a[0] *= corr;
                a[1] *= corr;
                mma_rows8(a[0], a[1], pa0, pa2, b0, b1);
            }
        }
    }

    // The group's 4 lanes hold parts of l; each lane holds 2·8·VCH output dims of head gid.
    l += __shfl_xor_sync(full, l, 1);
    l += __shfl_xor_sync(full, l, 2);
    if (gid < group) {
#pragma unroll
        for (int t = 0; t < 8 * VCH; t++) {
#pragma unroll
            for (int e = 0; e < 2; e++) acc_s[warp][gid][(t >> 3) * 64 + (2 * tig + e) * 8 + (t & 7)] = acc[t][e];
        }
        if (tig == 0) {
            m_s[warp][gid] = m;
            l_s[warp][gid] = l;
        }
    }
    __syncthreads();
    attention_combine<HD, 8>(acc_s, m_s, l_s, group, r, kvh, part, n_heads, num_parts, out, part_out, part_ml);
}

#define PAGED_ATTENTION_TC(HD)                                                                                      \
    extern "C" __global__ void __launch_bounds__(32 * ATT_WARPS) paged_attention_tc_hd##HD(                         \
        const float* __restrict__ qkv, const bf16* __restrict__ k_cache, const bf16* __restrict__ v_cache,          \
        const int* __restrict__ tables, const int* __restrict__ table_off, const int* __restrict__ ctx_len,         \
        bf16* __restrict__ out, float* __restrict__ part_out, float* __restrict__ part_ml, int n_heads, int n_kv,   \
        int head_dim, int row_stride, int block_size, float scale, int part_size, int num_parts) {                  \
        pdl_begin();                                                                                                \
        paged_attention_tc_impl<HD>(qkv, k_cache, v_cache, tables, table_off, ctx_len, out, part_out, part_ml,      \
                                    n_heads, n_kv, row_stride, block_size, scale, part_size, num_parts);            \
    }
PAGED_ATTENTION_TC(64)
PAGED_ATTENTION_TC(128)

// Causal attention for `n` consecutive new rows of one sequence (positions start .. start + n - 1, their K/V already
// in the cache) over the sequence's paged context, on tensor cores and flash-style: scores and probabilities never
// leave registers. grid (ceil(n / 64), n_heads), block (128): a warp takes 16 query rows of one head (the M rows of
// m16n8k16 tiles; rows past n repeat the last row and are not written) and walks the keys 16 at a time up to its
// last row's position, with an online softmax per row (two rows per lane: gid and gid + 8). Operand layouts as in
// paged_attention_tc. Twin: attend_one.
template <int HD>
__device__ void prefill_attention_tc_impl(const float* __restrict__ qkv, int n, int start,
                                          const bf16* __restrict__ k_cache, const bf16* __restrict__ v_cache,
                                          const int* __restrict__ table, int block_size, bf16* __restrict__ out,
                                          int n_heads, int n_kv, int row_stride, float scale) {
    constexpr int KCH = HD / 32, VCH = HD / 64;
    const unsigned int full = 0xffffffffu;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int head = blockIdx.y, kvh = head / (n_heads / n_kv);
    const int row0 = blockIdx.x * 64 + warp * 16;
    if (row0 >= n) return;  // warp-uniform; the block never synchronizes
    const int kv_width = n_kv * HD;
    const int last = start + min(row0 + 15, n - 1);  // the warp's last position: keys 0 ..= last
    int pos[2];  // positions of this lane's rows gid and gid + 8
    unsigned int qa[2 * KCH][4];
#pragma unroll
    for (int half = 0; half < 2; half++) {
        const int row = min(row0 + gid + 8 * half, n - 1);
        pos[half] = start + row;
        const float* q = qkv + (size_t)row * row_stride + (size_t)head * HD;
#pragma unroll
        for (int c = 0; c < KCH; c++) {
            const float4 x0 = *reinterpret_cast<const float4*>(q + c * 32 + tig * 8);
            const float4 x1 = *reinterpret_cast<const float4*>(q + c * 32 + tig * 8 + 4);
            qa[2 * c][half] = pack_bf16x2(x0.x * scale, x0.y * scale);
            qa[2 * c][2 + half] = pack_bf16x2(x0.z * scale, x0.w * scale);
            qa[2 * c + 1][half] = pack_bf16x2(x1.x * scale, x1.y * scale);
            qa[2 * c + 1][2 + half] = pack_bf16x2(x1.z * scale, x1.w * scale);
        }
    }

    float m[2] = {-INFINITY, -INFINITY};  // running max per row (equal in the group's 4 lanes)
    float l[2] = {0.0f, 0.0f};            // this lane's share of each row's running sum
    float acc[8 * VCH][4];                // [t][2·half + e]: O[gid + 8·half][dim(t, 2·tig + e)], as in paged_attention_tc
#pragma unroll
    for (int t = 0; t < 8 * VCH; t++) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;

    for (int t0 = 0; t0 <= last; t0 += 16) {
        uint4 kr[2][KCH], vr[4][VCH];
        tc_load_kv<HD>(table, block_size, t0, last + 1, k_cache, v_cache, kv_width, kvh, kr, vr);
        // S = Q·Kᵀ: sc[j][2·half + e] = S[gid + 8·half][8j + 2·tig + e].
        float sc[2][4];
#pragma unroll
        for (int j = 0; j < 2; j++) {
            sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
#pragma unroll
            for (int c = 0; c < KCH; c++) {
                mma16816(sc[j], qa[2 * c], kr[j][c].x, kr[j][c].y);
                mma16816(sc[j], qa[2 * c + 1], kr[j][c].z, kr[j][c].w);
            }
        }
        // Causal mask, then the online softmax per row. Key 0 is visible to every row, so after the first tile
        // each row's max is finite (a later tile may be fully masked for a row: it then adds nothing).
        float corr[2], p[2][4];
#pragma unroll
        for (int half = 0; half < 2; half++) {
            float mx = -INFINITY;
#pragma unroll
            for (int j = 0; j < 2; j++) {
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    if (t0 + 8 * j + 2 * tig + e > pos[half]) sc[j][2 * half + e] = -INFINITY;
                    mx = fmaxf(mx, sc[j][2 * half + e]);
                }
            }
            mx = fmaxf(mx, __shfl_xor_sync(full, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(full, mx, 2));
            const float m_new = fmaxf(m[half], mx);
            corr[half] = __expf(m[half] - m_new);
            float psum = 0.0f;
#pragma unroll
            for (int j = 0; j < 2; j++) {
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const float s = sc[j][2 * half + e];
                    p[j][2 * half + e] = s == -INFINITY ? 0.0f : __expf(s - m_new);
                    psum += p[j][2 * half + e];
                }
            }
            l[half] = l[half] * corr[half] + psum;
            m[half] = m_new;
        }
        // P·V: A = P (rows gid / gid + 8; keys 2·tig + {0,1} in a[0]/a[1], 8 + 2·tig + {0,1} in a[2]/a[3]).
        const unsigned int pa[4] = {pack_bf16x2(p[0][0], p[0][1]), pack_bf16x2(p[0][2], p[0][3]),
                                    pack_bf16x2(p[1][0], p[1][1]), pack_bf16x2(p[1][2], p[1][3])};
#pragma unroll
        for (int c = 0; c < VCH; c++) {
#pragma unroll
            for (int e = 0; e < 8; e++) {
                unsigned int b0, b1;
                tc_v_operand<VCH>(vr, c, e, b0, b1);
                float(&a)[4] = acc[8 * c + e];
                a[0] *= corr[0];
                a[1] *= corr[0];
                a[2] *= corr[1];
                a[3] *= corr[1];
                mma16816(a, pa, b0, b1);
            }
        }
    }

#pragma unroll
    for (int half = 0; half < 2; half++) {
        float sum = l[half];
        sum += __shfl_xor_sync(full, sum, 1);
        sum += __shfl_xor_sync(full, sum, 2);
        const int row = row0 + gid + 8 * half;
        if (row < n) {
            bf16* o = out + (size_t)row * n_heads * HD + (size_t)head * HD;
            const float inv = 1.0f / sum;
#pragma unroll
            for (int t = 0; t < 8 * VCH; t++) {
#pragma unroll
                for (int e = 0; e < 2; e++) o[(t >> 3) * 64 + (2 * tig + e) * 8 + (t & 7)] = f2bf(acc[t][2 * half + e] * inv);
            }
        }
    }
}

#define PREFILL_ATTENTION_TC(HD)                                                                                    \
    extern "C" __global__ void __launch_bounds__(128) prefill_attention_tc_hd##HD(                                 \
        const float* __restrict__ qkv, int n, int start, const bf16* __restrict__ k_cache,                          \
        const bf16* __restrict__ v_cache, const int* __restrict__ table, int block_size, bf16* __restrict__ out,    \
        int n_heads, int n_kv, int row_stride, float scale) {                                                       \
        pdl_begin();                                                                                                \
        prefill_attention_tc_impl<HD>(qkv, n, start, k_cache, v_cache, table, block_size, out, n_heads, n_kv,       \
                                      row_stride, scale);                                                           \
    }
PREFILL_ATTENTION_TC(64)
PREFILL_ATTENTION_TC(128)

// Combines paged_attention's partitions: out = Σ_p o_p·e^{m_p−M} / Σ_p l_p·e^{m_p−M}. Empty partitions (sum 0) add
// nothing. grid (T, n_heads), block (head_dim).
extern "C" __global__ void attention_reduce(const float* __restrict__ part_out, const float* __restrict__ part_ml,
                                            bf16* __restrict__ out, int n_heads, int head_dim, int num_parts) {
    pdl_begin();
    const int r = blockIdx.x, head = blockIdx.y, d = threadIdx.x;
    if (d >= head_dim) return;
    const size_t base = ((size_t)r * n_heads + head) * num_parts;
    float mx = -INFINITY;
    for (int p = 0; p < num_parts; p++)
        if (part_ml[(base + p) * 2 + 1] > 0.0f) mx = fmaxf(mx, part_ml[(base + p) * 2]);
    float sum = 0.0f, o = 0.0f;
    for (int p = 0; p < num_parts; p++) {
        const float l = part_ml[(base + p) * 2 + 1];
        if (l > 0.0f) {
            const float f = __expf(part_ml[(base + p) * 2] - mx);
            sum += l * f;
            o += part_out[(base + p) * head_dim + d] * f;
        }
    }
    out[(size_t)r * n_heads * head_dim + head * head_dim + d] = f2bf(sum > 0.0f ? o / sum : 0.0f);
}
