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

// d(loss)/dt of one element with a soft target t (dense targets that track a gradient), as
// focal_elem_dt in src/focal/mod.rs: (a_pos - a_neg) m ce + a_t (dm/dt ce - m x),
// dm/dt = gamma (1-p_t)^(gamma-1) (1 - 2p), 0 for gamma = 0 (torch's pow backward).
template <typename A>
__device__ __forceinline__ A focal_elem_dt(A x, A t, A alpha, int has_alpha, A gamma) {
    const A one = (A)1;
    A e = dl_exp(-dl_abs(x));
    A lp = dl_log1p(e);
    A sp_pos = (x > (A)0 ? x : (A)0) + lp;      // softplus(x)
    A sp_neg = (x < (A)0 ? -x : (A)0) + lp;     // softplus(-x)
    A inv = one / (one + e);
    bool pos = x >= (A)0;
    A p = pos ? inv : e * inv;
    A pm = pos ? e * inv : inv;
    A u = one - t;
    A ce = t * sp_neg + u * sp_pos;
    A q = p * u + pm * t;                       // 1 - p_t
    A ln_q = dl_log(q);
    const A floor = (A)-1e30;                   // keeps 0 * log 0 at 0 (NaN stays NaN)
    ln_q = ln_q < floor ? floor : ln_q;
    A m = dl_exp(gamma * ln_q);
    A dm = gamma > (A)0 ? gamma * dl_exp((gamma - one) * ln_q) * (pm - p) : (A)0;
    A a_pos = has_alpha ? alpha : one;
    A a_neg = has_alpha ? one - alpha : one;
    A a_t = a_pos * t + a_neg * u;
    return (a_pos - a_neg) * m * ce + a_t * (dm * ce - m * x);
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
template <typename T, typename A, typename L>
__device__ __forceinline__ bool label_target(const L* tg, u64 row, u64 col, u64 c, const A* w,
                                             u64* err, A* t, A* wrow) {
    long long k = decode_label(tg[row], (long long)c, err);
    if (k < 0) return false;
    *t = (u64)k == col ? (A)1 : (A)0;
    *wrow = w[k]; // k <= c: w has C+1 entries
    return true;
}
template <typename T, typename A>
__device__ __forceinline__ bool elem_target(const uint32_t* tg, u64 row, u64 col, u64 c,
                                            const A* w, u64* err, A* t, A* wrow) {
    return label_target<T, A>(tg, row, col, c, w, err, t, wrow);
}
template <typename T, typename A>
__device__ __forceinline__ bool elem_target(const int64_t* tg, u64 row, u64 col, u64 c,
                                            const A* w, u64* err, A* t, A* wrow) {
    return label_target<T, A>(tg, row, col, c, w, err, t, wrow);
}

// The weight of a forward_weighted call (ew, ew_mode) multiplies every element loss and its
// gradients: 1 (mode 0) when there is none.

// Reduction::None: out[i] = w_row * l * ew.
template <typename T, typename A, typename TG, bool HARD>
__device__ void fwd_none(const FocalFwdParams& p) {
    const T* x = dev_ptr<const T>(p.x);
    const TG* tg = dev_ptr<const TG>(p.tg);
    const A* w = dev_ptr<const A>(p.w);
    T* out = dev_ptr<T>(p.out);
    u64* err = dev_ptr<u64>(p.err);
    GRID_STRIDE(i, p.n * p.c) {
        u64 row = i / p.c, col = i - row * p.c;
        A t, wr, l = 0, g;
        if (elem_target<T, A>(tg, row, col, p.c, w, err, &t, &wr)) {
            focal_elem<A>(to_acc(x[i]), t, HARD, (A)p.alpha, p.has_alpha, (A)p.gamma, &l, &g);
            l *= wr;
            l *= dl_weight<T, A>(p.ew, p.ew_mode, row, i);
        }
        out[i] = from_acc<T>(l);
    }
}

// Per-block partial sums (psum) and non-ignored row counts (pden, counted at column 0).
template <typename T, typename A, typename TG, bool HARD>
__device__ void fwd_partial(const FocalFwdParams& p) {
    __shared__ double shs[32];
    __shared__ double shc[32];
    const T* x = dev_ptr<const T>(p.x);
    const TG* tg = dev_ptr<const TG>(p.tg);
    const A* w = dev_ptr<const A>(p.w);
    u64* err = dev_ptr<u64>(p.err);
    double s = 0, k = 0;
    GRID_STRIDE(i, p.n * p.c) {
        u64 row = i / p.c, col = i - row * p.c;
        A t, wr, l, g;
        if (elem_target<T, A>(tg, row, col, p.c, w, err, &t, &wr)) {
            focal_elem<A>(to_acc(x[i]), t, HARD, (A)p.alpha, p.has_alpha, (A)p.gamma, &l, &g);
            s += (double)(wr * l * dl_weight<T, A>(p.ew, p.ew_mode, row, i));
            k += col == 0;
        }
    }
    s = block_sum<double>(s, shs);
    k = block_sum<double>(k, shc);
    write_partials(p.psum, p.pden, s, k);
}

// Gradient: g = up * scale * w_row * dl/dx * ew, scale = scale_p[0] when given (Mean over labels:
// from the finalize of the row counts), else p.scale.
template <typename T, typename A, typename TG, bool HARD>
__device__ void bwd(const FocalBwdParams& p) {
    const T* x = dev_ptr<const T>(p.x);
    const TG* tg = dev_ptr<const TG>(p.tg);
    const A* w = dev_ptr<const A>(p.w);
    const T* up = dev_ptr<const T>(p.up);
    T* gout = dev_ptr<T>(p.g);
    u64* err = dev_ptr<u64>(p.err);
    const A scale = (A)(p.scale_p ? dev_ptr<const double>(p.scale_p)[0] : p.scale);
    GRID_STRIDE(i, p.n * p.c) {
        u64 row = i / p.c, col = i - row * p.c;
        A t, wr, l, g = 0;
        if (elem_target<T, A>(tg, row, col, p.c, w, err, &t, &wr)) {
            focal_elem<A>(to_acc(x[i]), t, HARD, (A)p.alpha, p.has_alpha, (A)p.gamma, &l, &g);
            A u = to_acc(up[p.up_scalar ? 0 : i]);
            g = u * scale * wr * g * dl_weight<T, A>(p.ew, p.ew_mode, row, i);
        }
        gout[i] = from_acc<T>(g);
    }
}

// Gradient w.r.t. dense targets: g = up * scale * dl/dt * ew.
template <typename T, typename A>
__device__ void tbwd(const FocalBwdParams& p) {
    const T* x = dev_ptr<const T>(p.x);
    const T* tg = dev_ptr<const T>(p.tg);
    const T* up = dev_ptr<const T>(p.up);
    T* gout = dev_ptr<T>(p.g);
    const A scale = (A)p.scale;
    GRID_STRIDE(i, p.n * p.c) {
        A d = focal_elem_dt<A>(to_acc(x[i]), to_acc(tg[i]), (A)p.alpha, p.has_alpha, (A)p.gamma);
        A u = to_acc(up[p.up_scalar ? 0 : i]);
        gout[i] = from_acc<T>(u * scale * d * dl_weight<T, A>(p.ew, p.ew_mode, i / p.c, i));
    }
}

// Number of non-ignored rows (labels only) per block, into pden (finalized in a fixed order).
template <typename TG>
__device__ void count_rows(const RowCountParams& p) {
    __shared__ double shc[32];
    const TG* tg = dev_ptr<const TG>(p.tg);
    u64* err = dev_ptr<u64>(p.err);
    double k = 0;
    GRID_STRIDE(i, p.n) { k += decode_label(tg[i], (long long)p.c, err) >= 0; }
    k = block_sum<double>(k, shc);
    write_partials(0, p.pden, 0, k);
}

// ---- one extern "C" kernel per (dtype, target kind), stamped by macros ----
#define FOCAL_KERNELS(SFX, T, A, TG, HARD)                                                       \
    DL_KERNEL(sigmoid_focal_fwd_none_##SFX, FocalFwdParams, p) { fwd_none<T, A, TG, HARD>(p); }  \
    DL_KERNEL(sigmoid_focal_fwd_partial_##SFX, FocalFwdParams, p) {                              \
        fwd_partial<T, A, TG, HARD>(p);                                                          \
    }                                                                                            \
    DL_KERNEL(sigmoid_focal_bwd_##SFX, FocalBwdParams, p) { bwd<T, A, TG, HARD>(p); }

#define FOCAL_DTYPE(DT, T, A)                                                                    \
    DL_KERNEL(sigmoid_focal_tbwd_##DT, FocalBwdParams, p) { tbwd<T, A>(p); }                     \
    FOCAL_KERNELS(DT##_dense, T, A, T, false)                                                    \
    FOCAL_KERNELS(DT##_u32, T, A, uint32_t, true)                                                \
    FOCAL_KERNELS(DT##_i64, T, A, int64_t, true)

FOCAL_DTYPE(f32, float, float)
FOCAL_DTYPE(f64, double, double)
FOCAL_DTYPE(f16, __half, float)
FOCAL_DTYPE(bf16, __nv_bfloat16, float)

DL_KERNEL(sigmoid_focal_count_u32, RowCountParams, p) { count_rows<uint32_t>(p); }
DL_KERNEL(sigmoid_focal_count_i64, RowCountParams, p) { count_rows<int64_t>(p); }

DL_MODULE(focal)
