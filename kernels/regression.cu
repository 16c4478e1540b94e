// Smooth L1 and balanced L1 losses: forward (per element or block-reduced partials) and
// closed-form backward, one thread per element. Math mirrors src/regression.rs (the Smooth /
// Balanced ElemLoss impls); the 8 constants p0..p7 are those of `consts` there.
#include "common.cuh"

// sign(d) with sign(+-0) = 0; NaN propagates.
template <typename A> __device__ __forceinline__ A sign_of(A d) {
    A s = (d > (A)0 ? (A)1 : (A)0) - (d < (A)0 ? (A)1 : (A)0);
    return d != d ? d : s;
}

// Smooth L1: p0 = beta, p1 = 0.5/beta, p2 = 0.5*beta, p3 = 1/beta (inf for beta = 0: only in the
// never-selected |d| < 0 branch).
template <typename A> struct SmoothL1 {
    A beta, half_inv_beta, half_beta, inv_beta;
    __device__ SmoothL1(A p0, A p1, A p2, A p3, A, A, A, A)
        : beta(p0), half_inv_beta(p1), half_beta(p2), inv_beta(p3) {}
    __device__ __forceinline__ A loss(A d) const {
        A ad = dl_abs(d);
        A quad = d * d * half_inv_beta; // 0.5 d^2 / beta
        A lin = ad - half_beta;         // |d| - 0.5 beta (carries a NaN d)
        return ad < beta ? quad : lin;
    }
    __device__ __forceinline__ A grad(A d) const {
        return dl_abs(d) < beta ? d * inv_beta : sign_of(d); // d/beta, else sign(d)
    }
};

// Balanced L1 (mmdet): p0 = beta, p1 = alpha, p2 = b = e^(gamma/alpha) - 1, p3 = alpha/b,
// p4 = b/beta, p5 = gamma, p6 = gamma/b - alpha*beta, p7 = 1 - beta.
template <typename A> struct BalancedL1 {
    A beta, alpha, b, alpha_over_b, b_over_beta, gamma, lin_c, one_minus_beta;
    __device__ BalancedL1(A p0, A p1, A p2, A p3, A p4, A p5, A p6, A p7)
        : beta(p0), alpha(p1), b(p2), alpha_over_b(p3), b_over_beta(p4), gamma(p5), lin_c(p6),
          one_minus_beta(p7) {}
    __device__ __forceinline__ A loss(A d) const {
        A ad = dl_abs(d);
        A ln = dl_log1p(b_over_beta * ad); // ln(b|d|/beta + 1)
        A inner = alpha_over_b * (b * ad + (A)1) * ln - alpha * ad;
        A outer = gamma * ad + lin_c; // gamma|d| + gamma/b - alpha beta
        return ad < beta ? inner : outer;
    }
    __device__ __forceinline__ A grad(A d) const {
        A ad = dl_abs(d);
        A ln = dl_log1p(b_over_beta * ad);
        // d/d|d| inside: alpha [ln(b|d|/beta + 1) + (1 - beta)/(b|d| + beta)]; outside: gamma
        A inner = alpha * (ln + one_minus_beta / (b * ad + beta));
        return sign_of(d) * (ad < beta ? inner : gamma);
    }
};

// The weight of element i: w[i / d] per row, w[i] per element, 1 without a weight.
template <typename T, typename A, typename P>
__device__ __forceinline__ A reg_weight(const P& p, u64 i) {
    return dl_weight<T, A>(p.ew, p.ew_mode, p.ew_mode == 1 ? i / p.d : 0, i);
}

// out[i] = w_i * l(x_i - t_i) (w_i = 1 without a weight: the same bits).
template <typename T, typename A, typename L>
__device__ void reg_fwd_none(const RegFwdParams& p, L l) {
    const T* x = dev_ptr<const T>(p.x);
    const T* t = dev_ptr<const T>(p.t);
    T* out = dev_ptr<T>(p.out);
    GRID_STRIDE(i, p.n) {
        const A w = reg_weight<T, A>(p, i);
        out[i] = from_acc<T>(w * l.loss(to_acc(x[i]) - to_acc(t[i])));
    }
}

// Per-block partial sums in double (fixed grid for a given n, fixed shuffle tree: deterministic).
template <typename T, typename A, typename L>
__device__ void reg_fwd_partial(const RegFwdParams& p, L l) {
    __shared__ double shm[32];
    const T* x = dev_ptr<const T>(p.x);
    const T* t = dev_ptr<const T>(p.t);
    double s = 0;
    GRID_STRIDE(i, p.n) {
        const A w = reg_weight<T, A>(p, i);
        s += (double)(w * l.loss(to_acc(x[i]) - to_acc(t[i])));
    }
    s = block_sum<double>(s, shm);
    write_partials(p.psum, 0, s, 0);
}

// g = (up * scale * w) * dl/dx; a scalar upstream is folded into the coefficient as on the CPU.
template <typename T, typename A, typename L>
__device__ void reg_bwd(const RegBwdParams& p, L l) {
    const T* x = dev_ptr<const T>(p.x);
    const T* t = dev_ptr<const T>(p.t);
    const T* up = dev_ptr<const T>(p.up);
    T* g = dev_ptr<T>(p.g);
    const A coef = p.up_scalar ? (A)((double)to_acc(up[0]) * p.scale) : (A)1;
    GRID_STRIDE(i, p.n) {
        A u = (p.up_scalar ? coef : to_acc(up[i])) * reg_weight<T, A>(p, i);
        g[i] = from_acc<T>(u * l.grad(to_acc(x[i]) - to_acc(t[i])));
    }
}

// The loss's constants, cast to the accumulator type.
#define REG_CONSTS(A, p) (A)p.p0, (A)p.p1, (A)p.p2, (A)p.p3, (A)p.p4, (A)p.p5, (A)p.p6, (A)p.p7

#define REG_KERNELS(NAME, LOSS, DT, T, A)                                                        \
    DL_KERNEL(NAME##_fwd_none_##DT, RegFwdParams, p) {                                           \
        reg_fwd_none<T, A>(p, LOSS<A>(REG_CONSTS(A, p)));                                        \
    }                                                                                            \
    DL_KERNEL(NAME##_fwd_partial_##DT, RegFwdParams, p) {                                        \
        reg_fwd_partial<T, A>(p, LOSS<A>(REG_CONSTS(A, p)));                                     \
    }                                                                                            \
    DL_KERNEL(NAME##_bwd_##DT, RegBwdParams, p) {                                                \
        reg_bwd<T, A>(p, LOSS<A>(REG_CONSTS(A, p)));                                             \
    }

#define REG_DTYPE(DT, T, A)                                                                      \
    REG_KERNELS(smooth_l1, SmoothL1, DT, T, A)                                                   \
    REG_KERNELS(balanced_l1, BalancedL1, DT, T, A)

REG_DTYPE(f32, float, float)
REG_DTYPE(f64, double, double)
REG_DTYPE(f16, __half, float)
REG_DTYPE(bf16, __nv_bfloat16, float)

DL_MODULE(regression)
