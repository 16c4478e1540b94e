// Quality focal loss (GFL) and varifocal loss (VarifocalNet): forward (per element or
// block-reduced partials), backward for the logits and for the targets / scores. The math
// mirrors `elem` in src/quality/cpu.rs; see the formula there.
#include "common.cuh"

// (loss, dl/dx, dl/dt) of one element with target t in [0, 1]. vfl: varifocal (positives
// t > 0 weighted by t, or 1 unless iou; negatives k * |t - p|^beta * bce), else quality focal
// (k = 1).
template <typename A>
__device__ __forceinline__ void quality_elem(A x, A t, A beta, A k, int vfl, int iou, A* loss,
                                             A* gx, A* gt) {
    const A one = (A)1, zero = (A)0;
    A e = dl_exp(-dl_abs(x));                   // e^{-|x|} in (0, 1]
    A lp = dl_log1p(e);                         // log(1 + e^{-|x|})
    A sp_pos = (x > zero ? x : zero) + lp;      // softplus(x)  = -log(1-p)
    A sp_neg = (x < zero ? -x : zero) + lp;     // softplus(-x) = -log p
    A ope = one + e;
    A inv = one / ope;
    bool pos = x >= zero;
    A p = pos ? inv : e * inv;                  // sigma(x)
    A pm = pos ? e * inv : inv;                 // 1 - sigma(x), no cancellation
    A u = one - t;
    A bce = t * sp_neg + u * sp_pos;            // BCE with logits; d bce / dt = -x
    A d = p * u - pm * t;                       // p - t, exact at a hard target
    if (vfl && t > zero) {                      // varifocal positive: w = t (or 1)
        A w = iou ? t : one;
        *loss = bce * w;
        *gx = w * d;
        // dl/dq = -x w + bce dw/dq; with w = q: bce - x q = softplus(-x) + x (1-2q) (x >= 0)
        // or softplus(x) - 2q x (x < 0), without cancelling bce against x q.
        A g_iou = pos ? sp_neg + x * (one - t - t) : sp_pos - (t + t) * x;
        *gt = iou ? g_iou : -x;
        return;
    }
    A a = dl_abs(d);                            // |t - p|
    bool t0 = t == zero, t1 = t == one;
    A rho = e < (A)1e-8 ? one - (A)0.5 * e : lp / e;   // log(1+e)/e without subnormal ratios
    bool near = t0 ? !pos : pos;                // the side where p -> a hard target
    A bq_hard = ope * (near ? rho : bce);       // bce / |t-p| at t = 0 or 1
    A ln_a, r, bq;                              // log|t-p|, p(1-p)/|t-p|, bce/|t-p|
    if (t0) {
        ln_a = -sp_neg; r = pm; bq = bq_hard;
    } else if (t1) {
        ln_a = -sp_pos; r = p; bq = bq_hard;
    } else if (a > zero) {
        ln_a = dl_log(a); r = p * pm / a; bq = bce / a;
    } else {
        ln_a = dl_log(a); r = zero; bq = zero;  // p == t: the sign factor is 0
    }
    const A floor = (A)-1e30;
    ln_a = ln_a < floor ? floor : ln_a;         // 0^beta = 0 (beta > 0), 1 (beta = 0); NaN stays
    // |t-p|^beta = e^z; far below 1 as e^{z+64} * e^{-64}, the second factor applied last (a
    // product with a factor up to |x| is rounded once, not after e^z lost bits as a subnormal).
    A z = beta * ln_a;
    bool small = z < (A)-60;
    A m = dl_exp(small ? z + (A)64 : z);
    A post = small ? (A)1.603810890548638e-28 : one;
    A sgn = d > zero ? one : (d < zero ? -one : zero);
    A km = k * m;
    *loss = bce * km * post;
    // d/dx: |t-p|^b (p-t) + bce b sign(p-t) |t-p|^(b-1) p(1-p)
    *gx = km * (d + beta * sgn * bce * r) * post;
    // d/dt: -x |t-p|^b - bce b sign(p-t) |t-p|^(b-1)
    *gt = -km * (x + beta * sgn * bq) * post;
}

// Raises ERR_TARGET (a = flat index of a target, or the row of a score) for v outside [0, 1].
template <typename A>
__device__ __forceinline__ void check_unit(A v, u64 at, u64* err) {
    if (!(v >= (A)0 && v <= (A)1)) raise_err(err, ERR_TARGET, at, (u64)__double_as_longlong((double)v));
}

// Target of element (row, col): the dense value, or the row's score in its label column and 0
// elsewhere. False for an ignored row.
template <typename T, typename A, typename L, bool DENSE>
__device__ __forceinline__ bool elem_target(const T* tg, const L* lab, u64 row, u64 col, u64 c,
                                            u64* err, A* t) {
    if (DENSE) {
        *t = to_acc(tg[row * c + col]);
        check_unit<A>(*t, row * c + col, err);
        return true;
    }
    long long k = decode_label(lab[row], (long long)c, err);
    if (k < 0) return false;
    *t = (A)0;
    if ((u64)k == col) {
        *t = to_acc(tg[row]);
        check_unit<A>(*t, row, err);
    }
    return true;
}

// The weight of a forward_weighted call (ew, ew_mode) multiplies every element loss and its
// gradients: 1 (mode 0) when there is none.

// Reduction::None: out[i] = l * ew.
template <typename T, typename A, typename L, bool DENSE>
__device__ void fwd_none(const QualityFwdParams& p) {
    const T* x = dev_ptr<const T>(p.x);
    const T* tg = dev_ptr<const T>(p.tg);
    const L* lab = dev_ptr<const L>(p.lab);
    T* out = dev_ptr<T>(p.out);
    u64* err = dev_ptr<u64>(p.err);
    GRID_STRIDE(i, p.n * p.c) {
        u64 row = i / p.c, col = i - row * p.c;
        A t, l = 0, gx, gt;
        if (elem_target<T, A, L, DENSE>(tg, lab, row, col, p.c, err, &t)) {
            quality_elem<A>(to_acc(x[i]), t, (A)p.beta, (A)p.k, p.vfl, p.iou, &l, &gx, &gt);
            l *= dl_weight<T, A>(p.ew, p.ew_mode, row, i);
        }
        out[i] = from_acc<T>(l);
    }
}

// Per-block partial sums (psum) and non-ignored row counts (pden, counted at column 0).
template <typename T, typename A, typename L, bool DENSE>
__device__ void fwd_partial(const QualityFwdParams& p) {
    __shared__ double shs[32];
    __shared__ double shc[32];
    const T* x = dev_ptr<const T>(p.x);
    const T* tg = dev_ptr<const T>(p.tg);
    const L* lab = dev_ptr<const L>(p.lab);
    u64* err = dev_ptr<u64>(p.err);
    double s = 0, k = 0;
    GRID_STRIDE(i, p.n * p.c) {
        u64 row = i / p.c, col = i - row * p.c;
        A t, l, gx, gt;
        if (elem_target<T, A, L, DENSE>(tg, lab, row, col, p.c, err, &t)) {
            quality_elem<A>(to_acc(x[i]), t, (A)p.beta, (A)p.k, p.vfl, p.iou, &l, &gx, &gt);
            s += (double)(l * dl_weight<T, A>(p.ew, p.ew_mode, row, i));
            k += col == 0;
        }
    }
    s = block_sum<double>(s, shs);
    k = block_sum<double>(k, shc);
    write_partials(p.psum, p.pden, s, k);
}

// The reduction's scale: scale_p[0] when given (Mean over labels, from the finalize of the
// row counts), else p.scale.
template <typename A>
__device__ __forceinline__ A bwd_scale(const QualityBwdParams& p) {
    return (A)(p.scale_p ? dev_ptr<const double>(p.scale_p)[0] : p.scale);
}

// dl/dx: g = up * scale * (dl/dx * ew), [N, C].
template <typename T, typename A, typename L, bool DENSE>
__device__ void bwd(const QualityBwdParams& p) {
    const T* x = dev_ptr<const T>(p.x);
    const T* tg = dev_ptr<const T>(p.tg);
    const L* lab = dev_ptr<const L>(p.lab);
    const T* up = dev_ptr<const T>(p.up);
    T* gout = dev_ptr<T>(p.g);
    u64* err = dev_ptr<u64>(p.err);
    const A scale = bwd_scale<A>(p);
    GRID_STRIDE(i, p.n * p.c) {
        u64 row = i / p.c, col = i - row * p.c;
        A t, l, gx = 0, gt;
        if (elem_target<T, A, L, DENSE>(tg, lab, row, col, p.c, err, &t)) {
            quality_elem<A>(to_acc(x[i]), t, (A)p.beta, (A)p.k, p.vfl, p.iou, &l, &gx, &gt);
            gx = to_acc(up[p.up_scalar ? 0 : i]) * scale * (gx * dl_weight<T, A>(p.ew, p.ew_mode, row, i));
        }
        gout[i] = from_acc<T>(gx);
    }
}

template <typename T, typename A, typename L>
__device__ void tbwd_scores(const QualityBwdParams& p, const T* x, const T* tg, const L* lab,
                            const T* up, T* gout, u64* err, A scale);

// dl/dt of dense targets ([N, C], one thread per element) or of the scores ([N], one thread
// per row: the label column's dl/dt, 0 for background and ignored rows), times ew.
template <typename T, typename A, typename L, bool DENSE>
__device__ void tbwd(const QualityBwdParams& p) {
    const T* x = dev_ptr<const T>(p.x);
    const T* tg = dev_ptr<const T>(p.tg);
    const L* lab = dev_ptr<const L>(p.lab);
    const T* up = dev_ptr<const T>(p.up);
    T* gout = dev_ptr<T>(p.g);
    u64* err = dev_ptr<u64>(p.err);
    const A scale = bwd_scale<A>(p);
    if (DENSE) {
        GRID_STRIDE(i, p.n * p.c) {
            u64 row = i / p.c, col = i - row * p.c;
            A t, l, gx, gt = 0;
            elem_target<T, A, L, DENSE>(tg, lab, row, col, p.c, err, &t);
            quality_elem<A>(to_acc(x[i]), t, (A)p.beta, (A)p.k, p.vfl, p.iou, &l, &gx, &gt);
            gt *= dl_weight<T, A>(p.ew, p.ew_mode, row, i);
            gout[i] = from_acc<T>(to_acc(up[p.up_scalar ? 0 : i]) * scale * gt);
        }
    } else {
        tbwd_scores<T, A, L>(p, x, tg, lab, up, gout, err, scale);
    }
}

// The scores' part of tbwd: one thread per row.
template <typename T, typename A, typename L>
__device__ void tbwd_scores(const QualityBwdParams& p, const T* x, const T* tg, const L* lab,
                            const T* up, T* gout, u64* err, A scale) {
    GRID_STRIDE(row, p.n) {
        A l, gx, gt = 0;
        long long k = decode_label(lab[row], (long long)p.c, err);
        if (k >= 0 && (u64)k < p.c) {
            u64 i = row * p.c + (u64)k;
            A s = to_acc(tg[row]);
            check_unit<A>(s, row, err);
            quality_elem<A>(to_acc(x[i]), s, (A)p.beta, (A)p.k, p.vfl, p.iou, &l, &gx, &gt);
            gt *= dl_weight<T, A>(p.ew, p.ew_mode, row, i);
            gt = to_acc(up[p.up_scalar ? 0 : i]) * scale * gt;
        }
        gout[row] = from_acc<T>(gt);
    }
}

// ---- one extern "C" kernel per (dtype, target kind), stamped by macros ----
#define QUALITY_KERNELS(SFX, T, A, L, DENSE)                                                     \
    DL_KERNEL(quality_fwd_none_##SFX, QualityFwdParams, p) { fwd_none<T, A, L, DENSE>(p); }     \
    DL_KERNEL(quality_fwd_partial_##SFX, QualityFwdParams, p) {                                  \
        fwd_partial<T, A, L, DENSE>(p);                                                          \
    }                                                                                            \
    DL_KERNEL(quality_bwd_##SFX, QualityBwdParams, p) { bwd<T, A, L, DENSE>(p); }                \
    DL_KERNEL(quality_tbwd_##SFX, QualityBwdParams, p) { tbwd<T, A, L, DENSE>(p); }

#define QUALITY_DTYPE(DT, T, A)                                                                  \
    QUALITY_KERNELS(DT##_dense, T, A, uint32_t, true)                                            \
    QUALITY_KERNELS(DT##_u32, T, A, uint32_t, false)                                             \
    QUALITY_KERNELS(DT##_i64, T, A, int64_t, false)

QUALITY_DTYPE(f32, float, float)
QUALITY_DTYPE(f64, double, double)
QUALITY_DTYPE(f16, __half, float)
QUALITY_DTYPE(bf16, __nv_bfloat16, float)

DL_MODULE(quality)
