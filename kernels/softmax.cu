// Softmax cross-entropy (with class weights and label smoothing) and the softmax focal loss:
// forward (row losses or block partial sums) and closed-form backward, recomputing the row's
// softmax statistics from the logits. Math mirrors src/softmax.rs; see the formulas there.
//
// One group of threads per row: a warp for K <= WARP_MAX_K (8 rows per 256-thread block), a
// whole block for larger K. Each thread runs an online softmax over its strided columns; the
// group merges the partial states with a fixed butterfly / shared-memory order (deterministic).
#include "common.cuh"
#include <float.h>

// Online softmax state of a set of columns, relative to its max m:
// so = sum_{k != t} e^{x_k - m}, sw = sum_k w_k (m - x_k), ws = sum_k w_k.
template <typename A> struct St {
    A m, so, sw, ws;
};

// One column: e = e^{-|x - m|} is either the new term (x <= m) or the factor rescaling the
// old sums to the new max (x > m): one exp per element.
template <typename A, bool SMOOTH>
__device__ __forceinline__ void step(St<A>& s, A x, A keep, A w) {
    A d = x - s.m;
    bool up = d > (A)0; // NaN: false, and the NaN reaches so through e
    A ad = dl_abs(d);
    A e = dl_exp(-ad);
    s.so = up ? s.so * e + keep : s.so + e * keep;
    if (SMOOTH) {
        s.sw += up ? s.ws * ad : w * ad; // moving the reference from m to x adds ws (x - m)
        s.ws += w;
    }
    s.m = up ? x : s.m;
}

// Merge of two states onto the larger max (symmetric in a, b: a butterfly gives every lane the
// same bits).
template <typename A, bool SMOOTH>
__device__ __forceinline__ St<A> merge(const St<A>& a, const St<A>& b) {
    St<A> r;
    r.m = a.m > b.m ? a.m : b.m;
    r.so = a.so * dl_exp(a.m - r.m) + b.so * dl_exp(b.m - r.m);
    if (SMOOTH) {
        A sa = a.sw + (a.ws != (A)0 ? a.ws * (r.m - a.m) : (A)0);
        A sb = b.sw + (b.ws != (A)0 ? b.ws * (r.m - b.m) : (A)0);
        r.sw = sa + sb;
        r.ws = a.ws + b.ws;
    } else {
        r.sw = 0;
        r.ws = 0;
    }
    return r;
}

template <typename A, bool SMOOTH> __device__ __forceinline__ St<A> shfl_xor(const St<A>& s, int o) {
    St<A> r;
    r.m = __shfl_xor_sync(0xffffffffu, s.m, o);
    r.so = __shfl_xor_sync(0xffffffffu, s.so, o);
    if (SMOOTH) {
        r.sw = __shfl_xor_sync(0xffffffffu, s.sw, o);
        r.ws = __shfl_xor_sync(0xffffffffu, s.ws, o);
    } else {
        r.sw = 0;
        r.ws = 0;
    }
    return r;
}

// Merge of the states of one group (a fixed butterfly, then the warps in order): every thread of
// the group returns the same state.
template <typename A, bool SMOOTH, bool WARP>
__device__ __forceinline__ St<A> group_merge(St<A> s, St<A>* shm) {
    for (int o = 16; o > 0; o >>= 1) s = merge<A, SMOOTH>(s, shfl_xor<A, SMOOTH>(s, o));
    if (!WARP) {
        const int lane = threadIdx.x & 31;
        const int wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
        __syncthreads(); // shm may be reused by a previous row
        if (lane == 0) shm[wid] = s;
        __syncthreads();
        s = shm[0];
        for (int i = 1; i < nw; ++i) s = merge<A, SMOOTH>(s, shm[i]);
    }
    return s;
}

// Row statistics of one group. WARP: the 32 lanes of a warp; else the whole block (shm: 32).
// Every thread of the group returns the same merged state.
template <typename T, typename A, bool SMOOTH, bool WARP>
__device__ __forceinline__ St<A> row_stats(const T* x, u64 t, const A* w, int has_w, u64 k,
                                           St<A>* shm) {
    const int lane = threadIdx.x & 31;
    const int tid = WARP ? lane : threadIdx.x;
    const int width = WARP ? 32 : blockDim.x;
    St<A> s;
    s.m = (A)(-FLT_MAX); // a finite lowest: no special first step; -inf logits add e^{-inf} = 0
    s.so = 0;
    s.sw = 0;
    s.ws = 0;
    for (u64 j = tid; j < k; j += width) {
        A wj = SMOOTH ? (has_w ? w[j] : (A)1) : (A)0;
        step<A, SMOOTH>(s, to_acc(x[j]), j != t ? (A)1 : (A)0, wj);
    }
    return group_merge<A, SMOOTH, WARP>(s, shm);
}

// Cross-entropy with class-probability targets: the same online state with u_k = w_k ((1-eps)
// t_k + eps/K) in place of the smoothing weights and every column kept: so = s, sw =
// sum_k u_k (m - x_k), ws = sum_k u_k.
template <typename T, typename A, bool WARP>
__device__ __forceinline__ St<A> prob_stats(const T* x, const T* tg, const A* w, int has_w, A a,
                                            A c, u64 k, St<A>* shm) {
    const int tid = WARP ? (threadIdx.x & 31) : threadIdx.x;
    const int width = WARP ? 32 : blockDim.x;
    St<A> s;
    s.m = (A)(-FLT_MAX);
    s.so = 0;
    s.sw = 0;
    s.ws = 0;
    for (u64 j = tid; j < k; j += width) {
        A u = (has_w ? w[j] : (A)1) * (a * to_acc(tg[j]) + c);
        step<A, true>(s, to_acc(x[j]), (A)1, u);
    }
    return group_merge<A, true, WARP>(s, shm);
}

// Derived per-row quantities: s = sum_k e^{x_k - m}, nll = -log p_t, q = 1 - p_t, p_t.
template <typename A> struct Soft {
    A s, nll, q, pt;
};

template <typename A> __device__ __forceinline__ Soft<A> row_softmax(const St<A>& st, A xt) {
    Soft<A> r;
    A et = dl_exp(xt - st.m);
    r.s = st.so + et;
    // -log p_t = log1p(s_oth / e_t) for p_t >= 1/2 (relative accuracy as p_t -> 1), else
    // log s + (m - x_t), a sum of non-negative terms.
    r.nll = st.so <= et ? dl_log1p(st.so / et) : dl_log(r.s) + (st.m - xt);
    r.q = st.so / r.s;
    r.pt = et / r.s;
    return r;
}

// (1 - p_t)^gamma; gamma = 0 gives exactly 1 even where q underflows to 0.
template <typename A> __device__ __forceinline__ A pow_q(A q, A gamma) {
    return gamma == (A)0 ? (A)1 : dl_exp(gamma * dl_log(q));
}

// Hyper-parameters: focal: a = alpha, gamma; CE: a = 1 - eps, c = eps / K.
template <typename A> struct P {
    int focal;
    A a, c, gamma;
};

template <typename A, bool SMOOTH>
__device__ __forceinline__ A row_loss(const P<A>& p, const St<A>& st, const Soft<A>& r, A wt,
                                      A wsum) {
    if (p.focal) return p.a * wt * pow_q(r.q, p.gamma) * r.nll; // -a w_t (1-p_t)^g log p_t
    // (1-eps) w_t (lse - x_t) + (eps/K) sum_k w_k (lse - x_k), lse = m + log s
    A smooth = SMOOTH ? p.c * (st.sw + wsum * dl_log(r.s)) : (A)0;
    return p.a * wt * r.nll + smooth;
}

template <typename L>
__device__ __forceinline__ long long row_label(const L* lab, u64 i, u64 k, u64* err) {
    return decode_label(lab[i], (long long)k - 1, err);
}

// Forward. None: out[i] = row loss. Scalar: per-block partials psum (sum of row losses) and
// pden (sum of w_label over the non-ignored rows), deterministic for a fixed grid.
template <typename T, typename A, typename L, bool SMOOTH, bool WARP>
__device__ void fwd(const SoftmaxFwdParams& q) {
    __shared__ St<A> shm[32];
    __shared__ double sh1[32];
    __shared__ double sh2[32];
    const T* x = dev_ptr<const T>(q.x);
    const L* lab = dev_ptr<const L>(q.lab);
    const A* w = dev_ptr<const A>(q.w);
    T* out = dev_ptr<T>(q.out);
    u64* err = dev_ptr<u64>(q.err);
    const u64 n = q.n, k = q.k;
    const int has_w = q.has_w, none = q.none;
    const P<A> p = {q.focal, (A)q.a, (A)q.c, (A)q.gamma};
    const int lane = threadIdx.x & 31;
    const u64 groups_per_block = WARP ? (blockDim.x >> 5) : 1;
    const u64 g0 = (u64)blockIdx.x * groups_per_block + (WARP ? (threadIdx.x >> 5) : 0);
    const u64 gstride = (u64)gridDim.x * groups_per_block;
    const A wsum = has_w ? dev_ptr<const A>(q.wsum)[0] : (A)k;
    const bool leader = WARP ? lane == 0 : threadIdx.x == 0;
    double acc = 0, den = 0;
    // Block-uniform trip count (every group of the block runs the same number of iterations,
    // so the block-wide syncs in row_stats are reached by all threads).
    const u64 iters = (n + gstride - 1) / gstride;
    for (u64 it = 0; it < iters; ++it) {
        u64 i = g0 + it * gstride;
        long long t = i < n ? row_label(lab, i, k, err) : -1;
        if (WARP && t < 0) {
            if (i < n && none && leader) out[i] = from_acc<T>((A)0);
            continue;
        }
        const T* xr = x + (t >= 0 ? i * k : 0);
        St<A> st = row_stats<T, A, SMOOTH, WARP>(xr, t >= 0 ? (u64)t : k, w, has_w, t >= 0 ? k : 0, shm);
        if (t < 0) {
            if (i < n && none && leader) out[i] = from_acc<T>((A)0);
            continue;
        }
        if (leader) {
            A wt = has_w ? w[t] : (A)1;
            A l = row_loss<A, SMOOTH>(p, st, row_softmax<A>(st, to_acc(xr[t])), wt, wsum);
            if (q.ew_mode) l = l * dl_weight<T, A>(q.ew, q.ew_mode, i, i); // forward_weighted
            if (none) {
                out[i] = from_acc<T>(l);
            } else {
                acc += (double)l;
                den += (double)wt;
            }
        }
    }
    if (!none) {
        acc = block_sum<double>(acc, sh1);
        den = block_sum<double>(den, sh2);
        write_partials(q.psum, q.pden, acc, den);
    }
}

// Per-block partial sums of w_label over the non-ignored rows (the Mean denominator).
template <typename A, typename L>
__device__ void den_partial(const SoftmaxDenParams& q) {
    __shared__ double sh[32];
    const L* lab = dev_ptr<const L>(q.lab);
    const A* w = dev_ptr<const A>(q.w);
    u64* err = dev_ptr<u64>(q.err);
    double d = 0;
    GRID_STRIDE(i, q.n) {
        long long t = row_label(lab, i, q.k, err);
        if (t >= 0) d += q.has_w ? (double)w[t] : 1.0;
    }
    d = block_sum<double>(d, sh);
    write_partials(0, q.pden, 0, d);
}

// Backward: g_j = coef * (a p_j - c w_j) for j != t, coef * (c (W p_t - w_t) - b q) at j = t;
// coef = up * scale (scale = scale_p[0] when given, else q.scale).
template <typename T, typename A, typename L, bool SMOOTH, bool WARP>
__device__ void bwd(const SoftmaxBwdParams& q) {
    __shared__ St<A> shm[32];
    const T* x = dev_ptr<const T>(q.x);
    const L* lab = dev_ptr<const L>(q.lab);
    const A* w = dev_ptr<const A>(q.w);
    const T* up = dev_ptr<const T>(q.up);
    T* g = dev_ptr<T>(q.g);
    u64* err = dev_ptr<u64>(q.err);
    const u64 n = q.n, k = q.k;
    const int has_w = q.has_w;
    const P<A> p = {q.focal, (A)q.a, (A)q.c, (A)q.gamma};
    const int lane = threadIdx.x & 31;
    const int tid = WARP ? lane : threadIdx.x;
    const int width = WARP ? 32 : blockDim.x;
    const u64 groups_per_block = WARP ? (blockDim.x >> 5) : 1;
    const u64 g0 = (u64)blockIdx.x * groups_per_block + (WARP ? (threadIdx.x >> 5) : 0);
    const u64 gstride = (u64)gridDim.x * groups_per_block;
    const A wsum = has_w ? dev_ptr<const A>(q.wsum)[0] : (A)k;
    const double scale = q.scale_p ? dev_ptr<const double>(q.scale_p)[0] : q.scale;
    const u64 iters = (n + gstride - 1) / gstride;
    for (u64 it = 0; it < iters; ++it) {
        u64 i = g0 + it * gstride;
        long long t = i < n ? row_label(lab, i, k, err) : -1;
        if (WARP && t < 0) {
            if (i < n)
                for (u64 j = tid; j < k; j += width) g[i * k + j] = from_acc<T>((A)0);
            continue;
        }
        const T* xr = x + (t >= 0 ? i * k : 0);
        St<A> st = row_stats<T, A, SMOOTH, WARP>(xr, t >= 0 ? (u64)t : k, w, has_w, t >= 0 ? k : 0, shm);
        if (t < 0) {
            if (i < n)
                for (u64 j = tid; j < k; j += width) g[i * k + j] = from_acc<T>((A)0);
            continue;
        }
        Soft<A> r = row_softmax<A>(st, to_acc(xr[t]));
        A wt = has_w ? w[t] : (A)1;
        A a, b;
        if (p.focal) {
            // d/dx_j [-a w_t (1-p_t)^g log p_t] = a w_t (p_j - d_jt) F,
            // F = (1-p_t)^g (1 + g p_t nll / q), nll / q -> 1 as q -> 0.
            A ratio = r.q > (A)0 ? r.nll / r.q : (A)1;
            a = p.a * wt * pow_q(r.q, p.gamma) * ((A)1 + p.gamma * r.pt * ratio);
            b = a;
        } else {
            // (1-eps) w_t (p_j - d_jt) + (eps/K)(W p_j - w_j)
            b = p.a * wt;
            a = SMOOTH ? b + p.c * wsum : b;
        }
        A coef = (A)(scale * (double)to_acc(up[q.up_scalar ? 0 : i]));
        if (q.ew_mode) coef = coef * dl_weight<T, A>(q.ew, q.ew_mode, i, i); // forward_weighted
        const A inv_s = (A)1 / r.s;
        for (u64 j = tid; j < k; j += width) {
            A pj = dl_exp(to_acc(xr[j]) - st.m) * inv_s;
            A v;
            if (j == (u64)t) {
                v = (SMOOTH ? p.c * (wsum * r.pt - wt) : (A)0) - b * r.q; // p_t - 1 = -q
            } else {
                v = a * pj - (SMOOTH ? p.c * (has_w ? w[j] : (A)1) : (A)0);
            }
            g[i * k + j] = from_acc<T>(coef * v);
        }
    }
}

// Probability targets, forward: out[i] = ew_i (sum_k u_k (m - x_k) + sum_k u_k log s), or per-block
// partial sums of it (Mean = sum / N, scaled on the host).
template <typename T, typename A, bool WARP>
__device__ void prob_fwd(const SoftmaxProbFwdParams& q) {
    __shared__ St<A> shm[32];
    __shared__ double sh1[32];
    const T* x = dev_ptr<const T>(q.x);
    const T* tg = dev_ptr<const T>(q.tg);
    const A* w = dev_ptr<const A>(q.w);
    T* out = dev_ptr<T>(q.out);
    const u64 n = q.n, k = q.k;
    const A a = (A)q.a, c = (A)q.c;
    const int lane = threadIdx.x & 31;
    const u64 groups_per_block = WARP ? (blockDim.x >> 5) : 1;
    const u64 g0 = (u64)blockIdx.x * groups_per_block + (WARP ? (threadIdx.x >> 5) : 0);
    const u64 gstride = (u64)gridDim.x * groups_per_block;
    const bool leader = WARP ? lane == 0 : threadIdx.x == 0;
    double acc = 0;
    const u64 iters = (n + gstride - 1) / gstride; // block-uniform (see fwd)
    for (u64 it = 0; it < iters; ++it) {
        u64 i = g0 + it * gstride;
        const bool ok = i < n;
        if (WARP && !ok) continue; // warp-uniform
        const u64 off = ok ? i * k : 0;
        St<A> st = prob_stats<T, A, WARP>(x + off, tg + off, w, q.has_w, a, c, ok ? k : 0, shm);
        if (!ok || !leader) continue;
        A l = st.sw + st.ws * dl_log(st.so);
        if (q.ew_mode) l = l * dl_weight<T, A>(q.ew, q.ew_mode, i, i);
        if (q.none) {
            out[i] = from_acc<T>(l);
        } else {
            acc += (double)l;
        }
    }
    if (!q.none) {
        acc = block_sum<double>(acc, sh1);
        write_partials(q.psum, 0, acc, 0);
    }
}

// Probability targets, backward: to the logits g_j = coef (p_j sum_k u_k - u_j), or (wrt_t) to
// the targets coef (1-eps) w_j ((m - x_j) + log s); coef = up * scale * ew_i.
template <typename T, typename A, bool WARP>
__device__ void prob_bwd(const SoftmaxProbBwdParams& q) {
    __shared__ St<A> shm[32];
    const T* x = dev_ptr<const T>(q.x);
    const T* tg = dev_ptr<const T>(q.tg);
    const A* w = dev_ptr<const A>(q.w);
    const T* up = dev_ptr<const T>(q.up);
    T* g = dev_ptr<T>(q.g);
    const u64 n = q.n, k = q.k;
    const A a = (A)q.a, c = (A)q.c;
    const int tid = WARP ? (threadIdx.x & 31) : threadIdx.x;
    const int width = WARP ? 32 : blockDim.x;
    const u64 groups_per_block = WARP ? (blockDim.x >> 5) : 1;
    const u64 g0 = (u64)blockIdx.x * groups_per_block + (WARP ? (threadIdx.x >> 5) : 0);
    const u64 gstride = (u64)gridDim.x * groups_per_block;
    const u64 iters = (n + gstride - 1) / gstride;
    for (u64 it = 0; it < iters; ++it) {
        u64 i = g0 + it * gstride;
        const bool ok = i < n;
        if (WARP && !ok) continue;
        const u64 off = ok ? i * k : 0;
        const T* xr = x + off;
        const T* tr = tg + off;
        St<A> st = prob_stats<T, A, WARP>(xr, tr, w, q.has_w, a, c, ok ? k : 0, shm);
        if (!ok) continue;
        A coef = (A)(q.scale * (double)to_acc(up[q.up_scalar ? 0 : i]));
        if (q.ew_mode) coef = coef * dl_weight<T, A>(q.ew, q.ew_mode, i, i);
        const A inv_s = (A)1 / st.so;
        const A ls = dl_log(st.so);
        const A ca = coef * a;
        for (u64 j = tid; j < k; j += width) {
            const A xj = to_acc(xr[j]);
            const A wj = q.has_w ? w[j] : (A)1;
            A v;
            if (q.wrt_t) {
                v = ca * (wj * ((st.m - xj) + ls));
            } else {
                const A u = wj * (a * to_acc(tr[j]) + c);
                v = coef * (dl_exp(xj - st.m) * inv_s * st.ws - u);
            }
            g[i * k + j] = from_acc<T>(v);
        }
    }
}

// ---- one extern "C" kernel per (dtype, label type, smoothing, group), stamped by macros ----
#define SOFTMAX_KERNELS(SFX, T, A, L, SMOOTH, WARP)                                              \
    DL_KERNEL(softmax_fwd_##SFX, SoftmaxFwdParams, p) { fwd<T, A, L, SMOOTH, WARP>(p); }         \
    DL_KERNEL(softmax_bwd_##SFX, SoftmaxBwdParams, p) { bwd<T, A, L, SMOOTH, WARP>(p); }

#define SOFTMAX_LABELS(DT, T, A, LT, L)                                                          \
    SOFTMAX_KERNELS(DT##_##LT##_s0_warp, T, A, L, false, true)                                   \
    SOFTMAX_KERNELS(DT##_##LT##_s1_warp, T, A, L, true, true)                                    \
    SOFTMAX_KERNELS(DT##_##LT##_s0_block, T, A, L, false, false)                                 \
    SOFTMAX_KERNELS(DT##_##LT##_s1_block, T, A, L, true, false)                                  \
    DL_KERNEL(softmax_den_##DT##_##LT, SoftmaxDenParams, p) { den_partial<A, L>(p); }

#define SOFTMAX_PROB_KERNELS(SFX, T, A, WARP)                                                    \
    DL_KERNEL(softmax_prob_fwd_##SFX, SoftmaxProbFwdParams, p) { prob_fwd<T, A, WARP>(p); }      \
    DL_KERNEL(softmax_prob_bwd_##SFX, SoftmaxProbBwdParams, p) { prob_bwd<T, A, WARP>(p); }

#define SOFTMAX_DTYPE(DT, T, A)                                                                  \
    SOFTMAX_LABELS(DT, T, A, u32, uint32_t)                                                      \
    SOFTMAX_LABELS(DT, T, A, i64, int64_t)                                                       \
    SOFTMAX_PROB_KERNELS(DT##_warp, T, A, true)                                                  \
    SOFTMAX_PROB_KERNELS(DT##_block, T, A, false)

SOFTMAX_DTYPE(f32, float, float)
SOFTMAX_DTYPE(f64, double, double)
SOFTMAX_DTYPE(f16, __half, float)
SOFTMAX_DTYPE(bf16, __nv_bfloat16, float)

DL_MODULE(softmax)
