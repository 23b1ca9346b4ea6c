// Token sampling on the device (appended to llama.cu: one translation unit). The algorithm is
// `ferrite_kernels::cpu::sample` (the CPU twin, which the engine's host sampler also runs): adjustments, then per row
// temperature, top-k (exactly k, lowest ids win ties), weights exp(s - max), top-p (smallest (weight desc, id asc)
// prefix reaching top_p of the mass), min-p, and the first id (ascending) whose running mass exceeds u · total.
//
// One block of SAMPLE_THREADS threads per row. Thread t owns the contiguous ids [t·C, (t+1)·C), C = ceil(vocab /
// SAMPLE_THREADS): every pass runs over the thread's own chunk in id order and every reduction has a fixed shape,
// so results are deterministic, and "in id order" searches are one exclusive scan over the chunk totals plus a walk
// of one chunk. Exact selections (top-k, top-p) use order-preserving integer keys of the floats: a radix select
// for top-k, a bisection on the key for top-p (the mass above a key is monotone in it).

#define SAMPLE_THREADS 1024
#define SAMPLE_WARPS (SAMPLE_THREADS / 32)
#define SAMPLE_FLT_MAX 3.402823466e+38f

// Larger float, larger key (for floats that are not NaN).
__device__ __forceinline__ unsigned int order_key(float f) {
    const unsigned int b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_float(unsigned int k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

struct SampleShared {
    double d[SAMPLE_WARPS];
    float f[SAMPLE_WARPS];
    int i[SAMPLE_WARPS];
    unsigned int hist[256];
    unsigned int sel;
    unsigned int rem;
};

struct SumOp {
    template <typename T>
    __device__ T operator()(T a, T b) const { return a + b; }
};
struct MinOp {
    template <typename T>
    __device__ T operator()(T a, T b) const { return a < b ? a : b; }
};
struct MaxOp {
    __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

// Block-wide reduction over the warps' slots `sh` (every thread gets the result; the fixed-order value of lane 0 of
// warp 0 is the one kept, so it is deterministic).
template <typename T, typename Op>
__device__ T block_reduce(T v, T* sh, Op op) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = sh[lane];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
        if (lane == 0) sh[0] = v;
    }
    __syncthreads();
    const T r = sh[0];
    __syncthreads();
    return r;
}

__device__ double block_sum_d(double v, SampleShared& sh) { return block_reduce(v, sh.d, SumOp()); }
__device__ int block_sum_i(int v, SampleShared& sh) { return block_reduce(v, sh.i, SumOp()); }
__device__ int block_min_i(int v, SampleShared& sh) { return block_reduce(v, sh.i, MinOp()); }
__device__ float block_max_f(float v, SampleShared& sh) { return block_reduce(v, sh.f, MaxOp()); }

// Exclusive prefix sum over threads (thread order = id order of the chunks). The warp-local part comes from the
// neighbour's inclusive sum, not `incl - v`, so float sums lose nothing extra.
template <typename T>
__device__ T block_excl_scan(T v, T* sh) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    T x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const T y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    const T before = __shfl_up_sync(0xffffffffu, x, 1);
    if (lane == 31) sh[warp] = x;
    __syncthreads();
    if (warp == 0) {
        T w = sh[lane];
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const T y = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += y;
        }
        sh[lane] = w;
    }
    __syncthreads();
    const T r = (warp > 0 ? sh[warp - 1] : T(0)) + (lane > 0 ? before : T(0));
    __syncthreads();
    return r;
}

__device__ int block_excl_scan_i(int v, SampleShared& sh) { return block_excl_scan(v, sh.i); }
__device__ double block_excl_scan_d(double v, SampleShared& sh) { return block_excl_scan(v, sh.d); }

// Argmax of the row (lowest id on ties, NaN never wins; 0 when nothing beats -inf), like `cpu::ops::argmax`.
__device__ int block_argmax(const float* row, int c0, int c1, SampleShared& sh) {
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int i = c0; i < c1; i++) {
        const float v = row[i];
        if (v > bv) {
            bv = v;
            bi = i;
        }
    }
    const float m = block_max_f(bv, sh);
    const int id = block_min_i(bv == m && m > -INFINITY ? bi : 0x7fffffff, sh);
    return id == 0x7fffffff ? 0 : id;
}

// The id of the `r`-th (1-based) element of the row, in id order, for which `pred` holds; every thread passes its
// own count of such elements. -1 when there are fewer than r.
template <typename Pred>
__device__ int block_nth(int r, int count, int c0, int c1, Pred pred, SampleShared& sh) {
    const int before = block_excl_scan_i(count, sh);
    int found = 0x7fffffff;
    if (before < r && r <= before + count) {
        int seen = before;
        for (int i = c0; i < c1; i++) {
            if (pred(i) && ++seen == r) {
                found = i;
                break;
            }
        }
    }
    const int id = block_min_i(found, sh);
    return id == 0x7fffffff ? -1 : id;
}

// Applies per-token adjustments in place. `adj` holds n entries of 5 words: row, id, bias (f32 bits), sub (f32
// bits), flags (1: repetition penalty, 2: mask); `rep[row]` is the row's repetition penalty; (row, id) pairs are
// distinct. Twin: `cpu::sample::apply_adjustments`. grid (ceil(n / 256)), block (256).
extern "C" __global__ void apply_adjustments(float* __restrict__ logits, long long stride, int vocab,
                                             const int* __restrict__ adj, int n, const float* __restrict__ rep) {
    pdl_begin();
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= n) return;
    const int* a = adj + (size_t)e * 5;
    const int row = a[0], id = a[1], flags = a[4];
    if (id < 0 || id >= vocab) return;
    float* l = logits + (size_t)row * stride + id;
    // Explicitly rounded operations: NVRTC would otherwise contract `v * r - sub` into one FMA, which the twin
    // (and the host sampler) does not do.
    float v = __fadd_rn(*l, __int_as_float(a[2]));
    if (flags & 1) {
        const float r = rep[row];
        v = v > 0.0f ? __fdiv_rn(v, r) : __fmul_rn(v, r);
    }
    v = __fsub_rn(v, __int_as_float(a[3]));
    if (flags & 2) v = -INFINITY;
    *l = v;
}

// Applies grammar masks in place: row r's mask is words [mask_rows[r] · words, (mask_rows[r] + 1) · words) of
// `masks` (bit i % 32 of word i / 32 set = id i allowed; ids past the words are not), or none when mask_rows[r] < 0
// (the row pays one load). Disallowed logits become -inf. Runs after apply_adjustments, before sample_rows.
// Twin: `cpu::sample::apply_mask`. grid (rows), block (256).
extern "C" __global__ void apply_token_masks(float* __restrict__ logits, long long stride, int vocab,
                                             const unsigned int* __restrict__ masks, int words,
                                             const int* __restrict__ mask_rows) {
    pdl_begin();
    const int slot = mask_rows[blockIdx.x];
    if (slot < 0) return;
    float* row = logits + (size_t)blockIdx.x * stride;
    const unsigned int* m = masks + (size_t)slot * words;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const int w = i >> 5;
        if (w >= words || !((m[w] >> (i & 31)) & 1u)) row[i] = -INFINITY;
    }
}

// Draws one token per row from (adjusted) logits, which it overwrites with the kept weights (-1 = dropped).
// `params[r]` = (temperature, top_p, min_p, unused), `top_k[r]` (0 = off), `u[r]` uniform in [0, 1).
// Twin: `cpu::sample::sample_row`. grid (rows), block (SAMPLE_THREADS).
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample_rows(float* __restrict__ logits, long long stride,
                                                                         int vocab, const float* __restrict__ params,
                                                                         const int* __restrict__ top_ks,
                                                                         const double* __restrict__ us,
                                                                         int* __restrict__ ids) {
    pdl_begin();
    __shared__ SampleShared sh;
    const int r = blockIdx.x, t = threadIdx.x;
    float* row = logits + (size_t)r * stride;
    const int chunk = (vocab + SAMPLE_THREADS - 1) / SAMPLE_THREADS;
    const int c0 = min(t * chunk, vocab), c1 = min(c0 + chunk, vocab);
    const float temperature = params[4 * r], top_p = params[4 * r + 1], min_p = params[4 * r + 2];
    const int top_k = top_ks[r];

    if (temperature < 1e-5f) {
        const int id = block_argmax(row, c0, c1, sh);
        if (t == 0) ids[r] = id;
        return;
    }
    const float inv_t = 1.0f / temperature;
    // Scaled logits: valid when > -inf (NaN and -inf drop out), +inf clamped.
    float mx = -INFINITY;
    int valid = 0;
    for (int i = c0; i < c1; i++) {
        const float s = row[i] * inv_t;
        if (s > -INFINITY) {
            mx = fmaxf(mx, fminf(s, SAMPLE_FLT_MAX));
            valid++;
        }
    }
    mx = block_max_f(mx, sh);
    const int n_valid = block_sum_i(valid, sh);
    if (n_valid == 0) {
        const int id = block_argmax(row, c0, c1, sh);
        if (t == 0) ids[r] = id;
        return;
    }

    // Top-k: the k-th largest key by radix select, then the id cut among keys equal to it.
    unsigned int kkey = 0;
    int kcut = 0x7fffffff;
    const bool use_k = top_k > 0 && top_k < n_valid;
    if (use_k) {
        unsigned int prefix = 0, mask = 0, remaining = (unsigned int)top_k;
        for (int shift = 24; shift >= 0; shift -= 8) {
            for (int b = t; b < 256; b += SAMPLE_THREADS) sh.hist[b] = 0;
            __syncthreads();
            for (int i = c0; i < c1; i++) {
                const float s = row[i] * inv_t;
                if (!(s > -INFINITY)) continue;
                const unsigned int key = order_key(fminf(s, SAMPLE_FLT_MAX));
                if ((key & mask) == prefix) atomicAdd(&sh.hist[(key >> shift) & 255u], 1u);
            }
            __syncthreads();
            if (t == 0) {
                unsigned int cum = 0;
                for (int b = 255; b >= 0; b--) {
                    if (cum + sh.hist[b] >= remaining) {
                        sh.sel = (unsigned int)b;
                        sh.rem = remaining - cum;
                        break;
                    }
                    cum += sh.hist[b];
                }
            }
            __syncthreads();
            prefix |= sh.sel << shift;
            mask |= 255u << shift;
            remaining = sh.rem;
            __syncthreads();
        }
        kkey = prefix;
        int eq = 0;
        for (int i = c0; i < c1; i++) {
            const float s = row[i] * inv_t;
            eq += (s > -INFINITY && order_key(fminf(s, SAMPLE_FLT_MAX)) == kkey);
        }
        const int n_eq = block_sum_i(eq, sh);
        if ((int)remaining < n_eq) {
            kcut = block_nth((int)remaining, eq, c0, c1, [&](int i) {
                const float s = row[i] * inv_t;
                return s > -INFINITY && order_key(fminf(s, SAMPLE_FLT_MAX)) == kkey;
            }, sh);
        }
    }

    // Weights of the top-k survivors, in place (-1 marks a dropped token); their total.
    double z = 0.0;
    for (int i = c0; i < c1; i++) {
        const float s = row[i] * inv_t;
        float w = -1.0f;
        if (s > -INFINITY) {
            const float sc = fminf(s, SAMPLE_FLT_MAX);
            const unsigned int key = order_key(sc);
            if (!use_k || key > kkey || (key == kkey && i <= kcut)) w = expf(sc - mx);
        }
        row[i] = w;
        if (w > 0.0f) z += (double)w;
    }
    z = block_sum_d(z, sh);

    // Top-p: the boundary key B is the largest with mass(key >= B) >= target; keys above it stay, and of the keys
    // equal to it (all the same weight) the first ones in id order until the mass reaches the target.
    if (top_p < 1.0f) {
        const double target = __dmul_rn((double)top_p, z);
        unsigned int lo = 0u, hi = order_key(1.0f) + 1u;  // mass(>= lo) = z >= target; mass(>= hi) = 0
        double mass_hi = 0.0;
        while (hi - lo > 1u) {
            const unsigned int mid = lo + (hi - lo) / 2u;
            double m = 0.0;
            for (int i = c0; i < c1; i++) {
                const float w = row[i];
                if (w >= 0.0f && order_key(w) >= mid) m += (double)w;
            }
            m = block_sum_d(m, sh);
            if (m >= target) {
                lo = mid;
            } else {
                hi = mid;
                mass_hi = m;
            }
        }
        const unsigned int bkey = lo;
        const float wb = key_float(bkey);
        int eq = 0;
        for (int i = c0; i < c1; i++) eq += (row[i] >= 0.0f && order_key(row[i]) == bkey);
        const int n_eq = block_sum_i(eq, sh);
        // Smallest r >= 1 with mass_hi + r · wb >= target.
        double need = wb > 0.0f ? ceil((target - mass_hi) / (double)wb) : (double)n_eq;
        int r_keep = need < 1.0 ? 1 : (need > (double)n_eq ? n_eq : (int)need);
        int pcut = 0x7fffffff;
        if (r_keep < n_eq) {
            pcut = block_nth(r_keep, eq, c0, c1, [&](int i) { return row[i] >= 0.0f && order_key(row[i]) == bkey; }, sh);
        }
        for (int i = c0; i < c1; i++) {
            const float w = row[i];
            if (w < 0.0f) continue;
            const unsigned int key = order_key(w);
            if (!(key > bkey || (key == bkey && i <= pcut))) row[i] = -1.0f;
        }
    }
    if (min_p > 0.0f) {
        for (int i = c0; i < c1; i++) {
            if (row[i] >= 0.0f && row[i] < min_p) row[i] = -1.0f;
        }
    }

    // The draw: the first kept id (ascending) whose running mass exceeds u · total.
    double mine = 0.0;
    int last = -1;
    for (int i = c0; i < c1; i++) {
        if (row[i] > 0.0f) {
            mine += (double)row[i];
            last = i;
        }
    }
    const double total = block_sum_d(mine, sh);
    const double x = __dmul_rn(us[r], total);
    const double before = block_excl_scan_d(mine, sh);
    int found = 0x7fffffff;
    double rest = x - before;
    if (rest >= 0.0 && rest < mine) {
        for (int i = c0; i < c1; i++) {
            const float w = row[i];
            if (w > 0.0f) {
                if (rest < (double)w) {
                    found = i;
                    break;
                }
                rest -= (double)w;
            }
        }
    }
    int id = block_min_i(found, sh);
    if (id == 0x7fffffff) {
        // Rounding left x at or past the total: the last possible token, as the twin does.
        id = -block_min_i(last >= 0 ? -last : 0x7fffffff, sh);
        if (id == -0x7fffffff) id = 0;
    }
    if (t == 0) ids[r] = id;
}
