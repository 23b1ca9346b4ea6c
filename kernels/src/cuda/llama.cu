// Ferrite CUDA kernels for the Llama forward pass. Compiled at run time with NVRTC (see `kernels/src/cuda/mod.rs`).
//
// Conventions:
// - bf16 values are carried as raw `unsigned short` bits (no cuda_bf16.h, so NVRTC needs no include path); the
//   conversions round to nearest even exactly like `half::bf16::from_f32`, so the CPU twins can reproduce them.
// - Activations between kernels are f32 (the residual stream, GEMM outputs) or bf16 (GEMM inputs).
// - The KV cache of one layer is `[num_slots, n_kv_heads, head_dim]` bf16 for K and for V; slot = block·block_size +
//   offset. A slot of -1 means "padding, do not write".
// - Every kernel bounds-checks its indices against the sizes it is given and never reads past them.
// Each kernel's CPU reference twin is named in its comment (ferrite_kernels::cpu::ops unless said otherwise).

typedef unsigned short bf16;

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

// Programmatic dependent launch (PDL, sm_90 and later; the host turns it on per launch, see
// CudaKernels::set_programmatic_launch): a kernel may then start while the previous kernel in the stream is still
// running. Every kernel calls pdl_wait() before it reads anything earlier work wrote or writes anything earlier
// work reads; pdl_trigger() then lets the next kernel's blocks launch early (they wait in their own pdl_wait()).
// The only reads before pdl_wait() are gemv_bf16's weight loads: weights are written only while loading, which
// ends with a stream synchronization. Without PDL (or below sm_90) both are no-ops.
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_trigger() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_begin() {
    pdl_wait();
    pdl_trigger();
}

__device__ __forceinline__ float bf2f(bf16 v) { return __uint_as_float(((unsigned int)v) << 16); }

__device__ __forceinline__ bf16 f2bf(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7f800000u) == 0x7f800000u) {
        // Inf stays Inf; NaN stays a (quiet) NaN.
        return (bf16)((u >> 16) | ((u & 0xffffu) ? 0x40u : 0u));
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// 8 bf16 (one 16-byte load) as floats.
__device__ __forceinline__ void load8(const bf16* p, float* out) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const unsigned int w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        out[2 * i] = __uint_as_float(w[i] << 16);
        out[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024). Every thread gets the result.
__device__ float block_sum(float v) {
    __shared__ float partial[32];
    __shared__ float total;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < nwarps ? partial[lane] : 0.0f;
        s = warp_sum(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    float r = total;
    __syncthreads();
    return r;
}

// Embedding gather: out[r, :] = f32(table[tokens[r], :]). Twin: Matrix::row_f32 on a bf16 table.
// grid (T), block (256).
extern "C" __global__ void embed_gather(const bf16* __restrict__ table, const int* __restrict__ tokens,
                                        float* __restrict__ out, int hidden, int vocab) {
    pdl_begin();
    const int r = blockIdx.x;
    const int tok = tokens[r];
    if (tok < 0 || tok >= vocab) return;  // validated on the host; never read out of bounds
    const bf16* row = table + (size_t)tok * hidden;
    float* o = out + (size_t)r * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = bf2f(row[i]);
}

// Fused residual add + RMSNorm. For output row r, the residual row is xr = rows ? rows[r] : r.
// If `add` is non-null: x[xr, :] += add[xr, :] (written back). Then out[r, :] = bf16(w * (x * rsqrt(mean(x²)+eps))).
// Twin: rms_norm (after add_in_place). grid (R), block (256..1024).
extern "C" __global__ void add_rms_norm(float* __restrict__ x, const float* __restrict__ add,
                                        const float* __restrict__ w, bf16* __restrict__ out,
                                        const int* __restrict__ rows, int hidden, float eps) {
    pdl_begin();
    const int r = blockIdx.x;
    const int xr = rows ? rows[r] : r;
    float* xrow = x + (size_t)xr * hidden;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        float v = xrow[i];
        if (add) {
            v += add[(size_t)xr * hidden + i];
            xrow[i] = v;
        }
        ss += v * v;
    }
    const float scale = rsqrtf(block_sum(ss) / (float)hidden + eps);
    bf16* o = out + (size_t)r * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = f2bf(w[i] * (xrow[i] * scale));
}

// SwiGLU on the fused gate/up GEMM output: out[r, i] = bf16(silu(gu[r, i]) * gu[r, ffn + i]). Twin: silu_mul.
// grid (ceil(ffn/256), T), block (256).
extern "C" __global__ void silu_mul(const float* __restrict__ gate_up, bf16* __restrict__ out, int ffn) {
    pdl_begin();
    const int r = blockIdx.y;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= ffn) return;
    const float g = gate_up[(size_t)r * 2 * ffn + i];
    const float u = gate_up[(size_t)r * 2 * ffn + ffn + i];
    out[(size_t)r * ffn + i] = f2bf(g / (1.0f + expf(-g)) * u);
}

// Rotary embedding in place on the Q and K heads of fused QKV row r (f32), then the rotated K and the V of the row
// into the layer's paged cache at slots[r] (-1 writes nothing; position 0 rotates by the identity). pos[r] is the
// row's position; inv_freq has head_dim/2 entries (llama3 scaling already folded in on the host). interleaved != 0
// rotates pairs (2i, 2i+1) (GGUF layout), else (i, i + d/2) (Hugging Face rotate_half). Twin: rope, then the CPU
// backend's KV write (copy at KvStore::offset). grid (T), block (128..1024).
extern "C" __global__ void rope_kv_write(float* __restrict__ qkv, const int* __restrict__ pos,
                                         const float* __restrict__ inv_freq, bf16* __restrict__ k_cache,
                                         bf16* __restrict__ v_cache, const int* __restrict__ slots, int n_heads,
                                         int n_kv, int head_dim, int row_stride, int interleaved,
                                         long long num_slots) {
    pdl_begin();
    const int r = blockIdx.x;
    const int half = head_dim / 2;
    const int pairs = (n_heads + n_kv) * half;
    const int q_width = n_heads * head_dim, kv_width = n_kv * head_dim;
    float* row = qkv + (size_t)r * row_stride;
    const float p = (float)pos[r];
    const long long slot = slots[r];
    const bool write = slot >= 0 && slot < num_slots;
    for (int j = threadIdx.x; j < pairs; j += blockDim.x) {
        const int head = j / half, i = j % half;
        float s, c;
        sincosf(p * inv_freq[i], &s, &c);
        float* h = row + head * head_dim;
        const int a = interleaved ? 2 * i : i;
        const int b = interleaved ? 2 * i + 1 : i + half;
        const float x0 = h[a], x1 = h[b];
        const float y0 = x0 * c - x1 * s;
        const float y1 = x1 * c + x0 * s;
        h[a] = y0;
        h[b] = y1;
        if (write && head >= n_heads) {
            bf16* kc = k_cache + slot * kv_width + (size_t)(head - n_heads) * head_dim;
            kc[a] = f2bf(y0);
            kc[b] = f2bf(y1);
        }
    }
    if (write) {
        const float* v = row + q_width + kv_width;
        for (int i = threadIdx.x; i < kv_width; i += blockDim.x) v_cache[slot * kv_width + i] = f2bf(v[i]);
    }
}

// dst[r, c] = src[r, c] for r < rows, c < width, with row strides (floats) src_stride / dst_stride: assembles a
// tensor-parallel group's gathered vocabulary slices into whole logit rows on the device. Twin: a row-by-row copy.
// grid (ceil(width / 256), rows), block (256).
extern "C" __global__ void copy_f32_2d(const float* __restrict__ src, long long src_stride, float* __restrict__ dst,
                                       long long dst_stride, int width) {
    pdl_begin();
    const int r = blockIdx.y;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c < width) dst[r * dst_stride + c] = src[r * src_stride + c];
}

// ---- Small-batch linear layer (decode) ----

#define GEMV_MAX_B 8

// One 16-byte weight load; STREAM marks it read-once (no L1 allocation), leaving L1 to the x rows.
template <bool STREAM>
__device__ __forceinline__ uint4 load_weights16(const bf16* p) {
    if (STREAM) {
        uint4 v;
        asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                     : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                     : "l"(p));
        return v;
    }
    return *reinterpret_cast<const uint4*>(p);
}

// y[b, o] = Σ_i x[b, i] · w[o, i] for b < B ≤ GEMV_MAX_B (decode-sized batches; bf16 in, f32 accumulate and out):
// one warp per output row, 16-byte weight loads coalesced across the warp with U in flight per lane, x rows from
// L1/L2 (every warp reads them). The first U weight loads go out before waiting for the previous kernel (weights are
// never written by a forward pass), so with PDL the weight stream starts while that kernel finishes. Needs
// in % 8 == 0. Instantiations (the start-up tuner times each against cuBLAS per shape and row count): gemv_bf16
// (U = 4), gemv_bf16_u8 (U = 8), gemv_bf16_u8s (U = 8, streaming weight loads). Twin: the same product as the
// cuBLAS linear. grid (ceil(out / 8)), block (256).
template <int U, bool STREAM>
__device__ __forceinline__ void gemv_impl(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                          float* __restrict__ y, int B, int in, int out) {
    const int lane = threadIdx.x & 31;
    const int o = blockIdx.x * 8 + (threadIdx.x >> 5);
    const bf16* wr = w + (size_t)min(o, out - 1) * in;
    int i = lane * 8;
    uint4 wv[U];
#pragma unroll
    for (int u = 0; u < U; u++)
        if (o < out && i + u * 256 < in) wv[u] = load_weights16<STREAM>(wr + i + u * 256);
    pdl_begin();
    if (o >= out) return;
    float acc[GEMV_MAX_B];
#pragma unroll
    for (int b = 0; b < GEMV_MAX_B; b++) acc[b] = 0.0f;
    for (;;) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (i + u * 256 < in) {
                const unsigned int ww[4] = {wv[u].x, wv[u].y, wv[u].z, wv[u].w};
                float wf[8];
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    wf[2 * e] = __uint_as_float(ww[e] << 16);
                    wf[2 * e + 1] = __uint_as_float(ww[e] & 0xffff0000u);
                }
#pragma unroll
                for (int b = 0; b < GEMV_MAX_B; b++) {
                    if (b < B) {
                        float xv[8];
                        load8(x + (size_t)b * in + i + u * 256, xv);
#pragma unroll
                        for (int e = 0; e < 8; e++) acc[b] += wf[e] * xv[e];
                    }
                }
            }
        }
        i += U * 256;
        if (i >= in) break;
#pragma unroll
        for (int u = 0; u < U; u++)
            if (i + u * 256 < in) wv[u] = load_weights16<STREAM>(wr + i + u * 256);
    }
#pragma unroll
    for (int b = 0; b < GEMV_MAX_B; b++) {
        if (b < B) {
            const float v = warp_sum(acc[b]);
            if (lane == 0) y[(size_t)b * out + o] = v;
        }
    }
}

#define GEMV(NAME, U, STREAM)                                                                                       \
    extern "C" __global__ void __launch_bounds__(256) NAME(const bf16* __restrict__ x, const bf16* __restrict__ w,   \
                                                           float* __restrict__ y, int B, int in, int out) {         \
        gemv_impl<U, STREAM>(x, w, y, B, in, out);                                                                  \
    }
GEMV(gemv_bf16, 4, false)
GEMV(gemv_bf16_u8, 8, false)
GEMV(gemv_bf16_u8s, 8, true)

// ---- Dense prefill attention (one sequence's chunk of new rows; the GEMMs run in cuBLAS) ----

// Gathers positions [0, ctx) of one sequence's K and V from the layer's paged cache into contiguous
// [ctx, kv_width] bf16. grid (ctx), block (128..1024).
extern "C" __global__ void gather_kv(const bf16* __restrict__ k_cache, const bf16* __restrict__ v_cache,
                                     const int* __restrict__ table, int block_size, int kv_width,
                                     bf16* __restrict__ k_out, bf16* __restrict__ v_out) {
    pdl_begin();
    const int t = blockIdx.x;
    const long long slot = (long long)table[t / block_size] * block_size + t % block_size;
    for (int i = threadIdx.x; i < kv_width; i += blockDim.x) {
        k_out[(size_t)t * kv_width + i] = k_cache[slot * kv_width + i];
        v_out[(size_t)t * kv_width + i] = v_cache[slot * kv_width + i];
    }
}

// The Q part of n fused QKV rows (f32) as bf16 [n, q_width]. grid (n), block (256).
extern "C" __global__ void q_to_bf16(const float* __restrict__ qkv, int row_stride, int q_width,
                                     bf16* __restrict__ out) {
    pdl_begin();
    const int r = blockIdx.x;
    for (int i = threadIdx.x; i < q_width; i += blockDim.x)
        out[(size_t)r * q_width + i] = f2bf(qkv[(size_t)r * row_stride + i]);
}

// Causal softmax of score rows S[h, i, t] (f32, [heads, n, ctx]) into P (bf16, same shape): row i is the query at
// position start + i and keeps t <= start + i; masked entries become 0. grid (n, heads), block (256).
extern "C" __global__ void causal_softmax(const float* __restrict__ s, bf16* __restrict__ p, int n, int ctx,
                                          int start, float scale) {
    pdl_begin();
    const int i = blockIdx.x, h = blockIdx.y;
    const size_t base = ((size_t)h * n + i) * ctx;
    const int last = min(ctx - 1, start + i);
    __shared__ float red[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    float mx = -INFINITY;
    for (int t = threadIdx.x; t <= last; t += blockDim.x) mx = fmaxf(mx, s[base + t] * scale);
    mx = warp_max(mx);
    if (lane == 0) red[warp] = mx;
    __syncthreads();
    mx = lane < nwarps ? red[lane] : -INFINITY;
    mx = warp_max(mx);
    __syncthreads();
    float sum = 0.0f;
    for (int t = threadIdx.x; t <= last; t += blockDim.x) sum += __expf(s[base + t] * scale - mx);
    sum = block_sum(sum);
    const float inv = 1.0f / sum;
    for (int t = threadIdx.x; t < ctx; t += blockDim.x)
        p[base + t] = t <= last ? f2bf(__expf(s[base + t] * scale - mx) * inv) : (bf16)0;
}

// Greedy sampling on the device: ids[r] = argmax_i logits[r, i] (lowest index on ties, NaN never wins), and, when
// `vals` is not null, vals[r] = that maximum (-inf when the row has no non-NaN value): tensor-parallel ranks combine
// their vocabulary slices' (value, id) pairs. Twin: the engine sampler's argmax. grid (R), block (1024).
extern "C" __global__ void argmax_rows(const float* __restrict__ logits, int* __restrict__ ids, float* __restrict__ vals,
                                       int vocab) {
    pdl_begin();
    __shared__ float best_v[32];
    __shared__ int best_i[32];
    const int r = blockIdx.x;
    const float* row = logits + (size_t)r * vocab;
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = row[i];
        if (v > bv) {  // strictly greater: keeps the lowest index of this thread's stride; NaN compares false
            bv = v;
            bi = i;
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) {
            bv = ov;
            bi = oi;
        }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        best_v[warp] = bv;
        best_i[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); w++) {
            if (best_v[w] > bv || (best_v[w] == bv && best_i[w] < bi)) {
                bv = best_v[w];
                bi = best_i[w];
            }
        }
        ids[r] = bi == 0x7fffffff ? 0 : bi;
        if (vals != nullptr) vals[r] = bv;
    }
}

// Deterministic pseudo-random bf16 fill (benchmarks with random weights generated on the device): out[i] =
// bf16(offset + scale · u), u uniform in [-1, 1) from a 64-bit mix of (seed, i). grid-stride loop.
extern "C" __global__ void fill_random_bf16(bf16* __restrict__ out, unsigned long long n, unsigned long long seed,
                                            float scale, float offset) {
    pdl_wait();
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        unsigned long long z = seed + i * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        const float u = (float)(z >> 40) * (1.0f / 8388608.0f) - 1.0f;  // 24 bits → [-1, 1)
        out[i] = f2bf(offset + scale * u);
    }
}
