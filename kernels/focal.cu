// Sigmoid focal loss (RetinaNet): forward (per element or block-reduced partials) and closed-form
// backward. Math mirrors focal_elem in src/focal.rs; see the formula there.
#include "common.cuh"

// Loss and d(loss)/dx of one element with target t in [0,1]; `hard` = t is exactly 0 or 1.
template <typename A>
__device__ __forceinline__ void focal_elem(A x, A t, bool hard, A alpha, int has_alpha, A gamma,
                                           A* loss, A* grad) {
    const A one = (A)1;
    A e = dl_exp(-dl_abs(x));                   // e^{-|x|} in (0, 1]
    A lp = dl_log1p(e);                         // log(1 + e^{-|x|})
    A sp_pos = (x > (A)0 ? x : (A)0) + lp;      // softplus(x)  = -log(1-p)
    A sp_neg = (x < (A)0 ? -x : (A)0) + lp;     // softplus(-x) = -log p
    A inv = one / (one + e);
    bool pos = x >= (A)0;
    A p = pos ? inv : e * inv;                  // sigma(x)
    A pm = pos ? e * inv : inv;                 // 1 - sigma(x), no cancellation
    A ce = t * sp_neg + (one - t) * sp_pos;     // BCE with logits
    A q = p * (one - t) + pm * t;               // 1 - p_t
    A ln_q = hard ? -(t * sp_pos + (one - t) * sp_neg) : dl_log(q); // log sigma(-+x) = -softplus(+-x)
    A m = gamma == (A)0 ? one : dl_exp(gamma * ln_q);              // (1-p_t)^gamma
    A a_t = has_alpha ? alpha * t + (one - alpha) * (one - t) : one;
    A r = q > (A)0 ? p * pm / q : one;          // p(1-p)/(1-p_t) in [0,1], limit 1 at q -> 0
    *loss = a_t * m * ce;
    A p_minus_t = p * (one - t) - pm * t;      // = p - t, without cancellation at p -> t = 1
    // d/dx[(1-p_t)^g ce] = (1-p_t)^g (p - t) + ce g (1-p_t)^{g-1} p(1-p)(1-2t)
    *grad = a_t * m * (p_minus_t + gamma * ce * r * (one - t - t));
}

// Target of element (row, col): dense value, or 0/1 from the row's label.
// Returns false for an ignored row. `w` is the row weight by label (length C+1).
template <typename T, typename A>
__device__ __forceinline__ bool elem_target(const T* tg, u64 row, u64 col, u64 c, const A* w,
                                            u64* err, A* t, A* wrow) {
    *t = to_acc(tg[row * c + col]);
    *wrow = (A)1;
    return true;
}
template <typename T, typename A>
__device__ __forceinline__ bool elem_target(const uint32_t* tg, u64 row, u64 col, u64 c,
                                            const A* w, u64* err, A* t, A* wrow) {
    long long k = decode_label(tg[row], (long long)c, err);
    if (k < 0) return false;
    *t = (u64)k == col ? (A)1 : (A)0;
    *wrow = w[k];
    return true;
}
template <typename T, typename A>
__device__ __forceinline__ bool elem_target(const int64_t* tg, u64 row, u64 col, u64 c,
                                            const A* w, u64* err, A* t, A* wrow) {
    long long k = decode_label(tg[row], (long long)c, err);
    if (k < 0) return false;
    *t = (u64)k == col ? (A)1 : (A)0;
    *wrow = w[k];
    return true;
}

template <typename T, typename A, typename TG, bool HARD>
__device__ void fwd_none(const T* x, const TG* tg, const A* w, T* out, u64 n, u64 c, A alpha,
                         int has_alpha, A gamma, u64* err) {
    GRID_STRIDE(i, n * c) {
        u64 row = i / c, col = i - row * c;
        A t, wr, l = 0, g;
        if (elem_target<T, A>(tg, row, col, c, w, err, &t, &wr)) {
            focal_elem<A>(to_acc(x[i]), t, HARD, alpha, has_alpha, gamma, &l, &g);
            l *= wr;
        }
        out[i] = from_acc<T>(l);
    }
}

// Per-block partial sums (and non-ignored row counts, counted at column 0).
template <typename T, typename A, typename TG, bool HARD>
__device__ void fwd_partial(const T* x, const TG* tg, const A* w, A* psum, u64* pcnt, u64 n,
                            u64 c, A alpha, int has_alpha, A gamma, u64* err) {
    __shared__ A shm[32];
    __shared__ u64 shc[32];
    A s = 0;
    u64 k = 0;
    GRID_STRIDE(i, n * c) {
        u64 row = i / c, col = i - row * c;
        A t, wr, l, g;
        if (elem_target<T, A>(tg, row, col, c, w, err, &t, &wr)) {
            focal_elem<A>(to_acc(x[i]), t, HARD, alpha, has_alpha, gamma, &l, &g);
            s += wr * l;
            k += col == 0;
        }
    }
    s = block_sum<A>(s, shm);
    k = block_sum<u64>(k, shc);
    if (threadIdx.x == 0) {
        psum[blockIdx.x] = s;
        pcnt[blockIdx.x] = k;
    }
}

// Gradient: g = up * scale * w_row * dl/dx; scale = base_scale, divided by cnt[0]*c when
// use_cnt (Mean over labels: cnt from count_rows).
template <typename T, typename A, typename TG, bool HARD>
__device__ void bwd(const T* x, const TG* tg, const A* w, const T* up, int up_scalar, T* gout,
                    u64 n, u64 c, A alpha, int has_alpha, A gamma, double base_scale,
                    const u64* cnt, int use_cnt, u64* err) {
    double sc = base_scale;
    if (use_cnt) {
        double d = (double)cnt[0] * (double)c;
        sc = d > 0.0 ? sc / d : 0.0;
    }
    const A scale = (A)sc;
    GRID_STRIDE(i, n * c) {
        u64 row = i / c, col = i - row * c;
        A t, wr, l, g = 0;
        if (elem_target<T, A>(tg, row, col, c, w, err, &t, &wr)) {
            focal_elem<A>(to_acc(x[i]), t, HARD, alpha, has_alpha, gamma, &l, &g);
            A u = to_acc(up[up_scalar ? 0 : i]);
            g = u * scale * wr * g;
        }
        gout[i] = from_acc<T>(g);
    }
}

// Number of non-ignored rows (labels only), accumulated with an integer atomic (deterministic).
template <typename TG>
__device__ void count_rows(const TG* tg, u64 n, u64 c, u64* cnt, u64* err) {
    __shared__ u64 shc[32];
    u64 k = 0;
    GRID_STRIDE(i, n) { k += decode_label(tg[i], (long long)c, err) >= 0; }
    k = block_sum<u64>(k, shc);
    if (threadIdx.x == 0 && k) atomicAdd(cnt, k);
}

// ---- one extern "C" kernel per (dtype, target kind), stamped by macros ----
#define FOCAL_KERNELS(SFX, T, A, TG, HARD)                                                       \
    extern "C" __global__ void sigmoid_focal_fwd_none_##SFX(                                     \
        const T* x, const TG* tg, const A* w, T* out, u64 n, u64 c, A alpha, int has_alpha,      \
        A gamma, u64* err) {                                                                     \
        fwd_none<T, A, TG, HARD>(x, tg, w, out, n, c, alpha, has_alpha, gamma, err);            \
    }                                                                                            \
    extern "C" __global__ void sigmoid_focal_fwd_partial_##SFX(                                  \
        const T* x, const TG* tg, const A* w, A* psum, u64* pcnt, u64 n, u64 c, A alpha,         \
        int has_alpha, A gamma, u64* err) {                                                      \
        fwd_partial<T, A, TG, HARD>(x, tg, w, psum, pcnt, n, c, alpha, has_alpha, gamma, err);  \
    }                                                                                            \
    extern "C" __global__ void sigmoid_focal_bwd_##SFX(                                          \
        const T* x, const TG* tg, const A* w, const T* up, int up_scalar, T* g, u64 n, u64 c,    \
        A alpha, int has_alpha, A gamma, double base_scale, const u64* cnt, int use_cnt,         \
        u64* err) {                                                                              \
        bwd<T, A, TG, HARD>(x, tg, w, up, up_scalar, g, n, c, alpha, has_alpha, gamma,          \
                            base_scale, cnt, use_cnt, err);                                      \
    }

#define FOCAL_DTYPE(DT, T, A)                                                                    \
    FOCAL_KERNELS(DT##_dense, T, A, T, false)                                                    \
    FOCAL_KERNELS(DT##_u32, T, A, uint32_t, true)                                                \
    FOCAL_KERNELS(DT##_i64, T, A, int64_t, true)                                                 \
    extern "C" __global__ void sigmoid_focal_finalize_##DT(const A* psum, const u64* pcnt,       \
                                                           int nparts, double count_mult,        \
                                                           int red, double avg, T* out) {        \
        finalize_impl<T, A>(psum, pcnt, nparts, count_mult, red, avg, out);                     \
    }

FOCAL_DTYPE(f32, float, float)
FOCAL_DTYPE(f64, double, double)
FOCAL_DTYPE(f16, __half, float)
FOCAL_DTYPE(bf16, __nv_bfloat16, float)

extern "C" __global__ void sigmoid_focal_count_u32(const uint32_t* tg, u64 n, u64 c, u64* cnt,
                                                   u64* err) {
    count_rows(tg, n, c, cnt, err);
}
extern "C" __global__ void sigmoid_focal_count_i64(const int64_t* tg, u64 n, u64 c, u64* cnt,
                                                   u64* err) {
    count_rows(tg, n, c, cnt, err);
}
