// GHM-C (mmdet semantics): the gradient-norm histogram in one fused pass (shared-memory
// histogram per block, merged into global u64 counts with integer atomics: deterministic), then
// the weighted BCE forward (elements or block partials) and its backward with the per-bin weights
// fixed by the host. Math mirrors src/ghm.rs; see the formula there.
#include "common.cuh"

__device__ __forceinline__ float dl_sigmoid(float x) {
    float e = expf(-fabsf(x));
    return x >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
}
__device__ __forceinline__ double dl_sigmoid(double x) {
    double e = exp(-fabs(x));
    return x >= 0.0 ? 1.0 / (1.0 + e) : e / (1.0 + e);
}
// softplus(x) = max(x, 0) + log1p(e^{-|x|}); the log1p term carries a NaN.
template <typename A> __device__ __forceinline__ A dl_softplus(A x) {
    return (x > (A)0 ? x : (A)0) + dl_log1p(dl_exp(-dl_abs(x)));
}

// mmdet's edges: i / bins in f32, the last one 1 + 1e-6 (in f32).
template <typename A> __device__ __forceinline__ A edge(int i, int bins) {
    return i == bins ? (A)(1.0f + 1e-6f) : (A)((float)i / (float)bins);
}

// The bin b with edge(b) <= g < edge(b+1) of a finite g in [0, 1]: guess floor(g bins),
// corrected by one step against the f32 edges.
template <typename A> __device__ __forceinline__ int bin_of(A g, int bins) {
    A guess = g * (A)bins;
    int b = guess > (A)0 ? (int)guess : 0;
    b = b < bins - 1 ? b : bins - 1;
    if (b > 0 && g < edge<A>(b, bins)) b -= 1;
    else if (b + 1 < bins && g >= edge<A>(b + 1, bins)) b += 1;
    return b;
}

// g = |sigma(x) - t|, the BCE with logits, and sigma(x) - t (no cancellation at sigma -> t = 1).
template <typename A> __device__ __forceinline__ void elem(A x, A t, A* g, A* ce, A* d) {
    *d = dl_sigmoid(x) * ((A)1 - t) - dl_sigmoid(-x) * t;
    *g = dl_abs(*d);
    *ce = t * dl_softplus(-x) + ((A)1 - t) * dl_softplus(x);
}

// Target of element (row, col): dense value, or 0/1 from the row's label (C = background).
// Returns false for an ignored row.
template <typename T, typename A>
__device__ __forceinline__ bool elem_target(const T* tg, u64 row, u64 col, u64 c, u64* err, A* t) {
    *t = to_acc(tg[row * c + col]);
    return true;
}
template <typename T, typename A>
__device__ __forceinline__ bool elem_target(const uint32_t* tg, u64 row, u64 col, u64 c, u64* err,
                                            A* t) {
    long long k = decode_label(tg[row], (long long)c, err);
    if (k < 0) return false;
    *t = (u64)k == col ? (A)1 : (A)0;
    return true;
}
template <typename T, typename A>
__device__ __forceinline__ bool elem_target(const int64_t* tg, u64 row, u64 col, u64 c, u64* err,
                                            A* t) {
    long long k = decode_label(tg[row], (long long)c, err);
    if (k < 0) return false;
    *t = (u64)k == col ? (A)1 : (A)0;
    return true;
}

// Histogram: counts[0..bins) per bin, counts[bins] = valid elements. Shared-memory histogram
// per block (dynamic shared memory: bins u32), merged with integer atomics; with `global` (too
// many bins for shared memory) straight into the global counts. A dense target outside [0, 1]
// raises ERR_TARGET.
template <typename T, typename A, typename TG, bool DENSE>
__device__ void hist(const GhmHistParams& p) {
    DL_DYN_SHARED(unsigned int, sh_hist);
    __shared__ u64 shc[32];
    const T* x = dev_ptr<const T>(p.x);
    const TG* tg = dev_ptr<const TG>(p.tg);
    u64* counts = dev_ptr<u64>(p.counts);
    u64* err = dev_ptr<u64>(p.err);
    const u64 c = p.c;
    const int bins = p.bins, global = p.global;
    if (!global)
        for (int b = threadIdx.x; b < bins; b += blockDim.x) sh_hist[b] = 0;
    __syncthreads();
    u64 valid = 0;
    GRID_STRIDE(i, p.n * c) {
        u64 row = i / c, col = i - row * c;
        A t;
        if (!elem_target<T, A>(tg, row, col, c, err, &t)) continue;
        if (DENSE && (t < (A)0 || t > (A)1)) {
            raise_err(err, ERR_TARGET, i, (u64)__double_as_longlong((double)t));
            continue;
        }
        A g, ce, d;
        elem<A>(to_acc(x[i]), t, &g, &ce, &d);
        valid += 1;
        if (g <= (A)1) { // NaN g: valid, but in no bin (as mmdet)
            int b = bin_of<A>(g, bins);
            if (global) atomicAdd(&counts[b], 1ull);
            else atomicAdd(&sh_hist[b], 1u);
        }
    }
    valid = block_sum<u64>(valid, shc);
    __syncthreads();
    if (!global)
        for (int b = threadIdx.x; b < bins; b += blockDim.x)
            if (sh_hist[b]) atomicAdd(&counts[b], (u64)sh_hist[b]);
    if (threadIdx.x == 0 && valid) atomicAdd(&counts[bins], valid);
}

template <typename T, typename A, typename TG>
__device__ void fwd_none(const GhmFwdParams& p) {
    const T* x = dev_ptr<const T>(p.x);
    const TG* tg = dev_ptr<const TG>(p.tg);
    const A* w = dev_ptr<const A>(p.w);
    T* out = dev_ptr<T>(p.out);
    u64* err = dev_ptr<u64>(p.err);
    GRID_STRIDE(i, p.n * p.c) {
        u64 row = i / p.c, col = i - row * p.c;
        A t, l = 0, g, ce, d;
        if (elem_target<T, A>(tg, row, col, p.c, err, &t)) {
            elem<A>(to_acc(x[i]), t, &g, &ce, &d);
            l = w[bin_of<A>(g, p.bins)] * ce;
        }
        out[i] = from_acc<T>(l);
    }
}

template <typename T, typename A, typename TG>
__device__ void fwd_partial(const GhmFwdParams& p) {
    __shared__ double shm[32];
    const T* x = dev_ptr<const T>(p.x);
    const TG* tg = dev_ptr<const TG>(p.tg);
    const A* w = dev_ptr<const A>(p.w);
    u64* err = dev_ptr<u64>(p.err);
    double s = 0;
    GRID_STRIDE(i, p.n * p.c) {
        u64 row = i / p.c, col = i - row * p.c;
        A t, g, ce, d;
        if (elem_target<T, A>(tg, row, col, p.c, err, &t)) {
            elem<A>(to_acc(x[i]), t, &g, &ce, &d);
            s += (double)(w[bin_of<A>(g, p.bins)] * ce);
        }
    }
    s = block_sum<double>(s, shm);
    write_partials(p.psum, 0, s, 0);
}

// g = up * scale * w[bin] * (sigma(x) - t), the weights constant; with wrt_t the gradient
// w.r.t. dense targets, BCE's d/dt = -x in place of sigma(x) - t.
template <typename T, typename A, typename TG>
__device__ void bwd(const GhmBwdParams& p) {
    const T* x = dev_ptr<const T>(p.x);
    const TG* tg = dev_ptr<const TG>(p.tg);
    const A* w = dev_ptr<const A>(p.w);
    const T* up = dev_ptr<const T>(p.up);
    T* gout = dev_ptr<T>(p.g);
    u64* err = dev_ptr<u64>(p.err);
    GRID_STRIDE(i, p.n * p.c) {
        u64 row = i / p.c, col = i - row * p.c;
        A t, gr = 0, g, ce, d;
        if (elem_target<T, A>(tg, row, col, p.c, err, &t)) {
            elem<A>(to_acc(x[i]), t, &g, &ce, &d);
            if (p.wrt_t) d = -to_acc(x[i]);
            gr = (A)((double)to_acc(up[p.up_scalar ? 0 : i]) * p.scale) * w[bin_of<A>(g, p.bins)] * d;
        }
        gout[i] = from_acc<T>(gr);
    }
}

#define GHM_KERNELS(SFX, T, A, TG, DENSE)                                                        \
    DL_KERNEL(ghmc_hist_##SFX, GhmHistParams, p) { hist<T, A, TG, DENSE>(p); }                   \
    DL_KERNEL(ghmc_fwd_none_##SFX, GhmFwdParams, p) { fwd_none<T, A, TG>(p); }                   \
    DL_KERNEL(ghmc_fwd_partial_##SFX, GhmFwdParams, p) { fwd_partial<T, A, TG>(p); }             \
    DL_KERNEL(ghmc_bwd_##SFX, GhmBwdParams, p) { bwd<T, A, TG>(p); }

#define GHM_DTYPE(DT, T, A)                                                                      \
    GHM_KERNELS(DT##_dense, T, A, T, true)                                                       \
    GHM_KERNELS(DT##_u32, T, A, uint32_t, false)                                                 \
    GHM_KERNELS(DT##_i64, T, A, int64_t, false)

GHM_DTYPE(f32, float, float)
GHM_DTYPE(f64, double, double)
GHM_DTYPE(f16, __half, float)
GHM_DTYPE(bf16, __nv_bfloat16, float)

DL_MODULE(ghm)
