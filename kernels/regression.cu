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

template <typename T, typename A, typename L>
__device__ void reg_fwd_none(const T* x, const T* t, T* out, u64 n, L l) {
    GRID_STRIDE(i, n) { out[i] = from_acc<T>(l.loss(to_acc(x[i]) - to_acc(t[i]))); }
}

// Per-block partial sums in double (fixed grid for a given n, fixed shuffle tree: deterministic).
template <typename T, typename A, typename L>
__device__ void reg_fwd_partial(const T* x, const T* t, double* psum, u64 n, L l) {
    __shared__ double shm[32];
    double s = 0;
    GRID_STRIDE(i, n) { s += (double)l.loss(to_acc(x[i]) - to_acc(t[i])); }
    s = block_sum<double>(s, shm);
    if (threadIdx.x == 0) psum[blockIdx.x] = s;
}

// g = up * scale * dl/dx; a scalar upstream is folded into the coefficient as on the CPU.
template <typename T, typename A, typename L>
__device__ void reg_bwd(const T* x, const T* t, const T* up, int up_scalar, double scale, T* g,
                        u64 n, L l) {
    const A coef = up_scalar ? (A)((double)to_acc(up[0]) * scale) : (A)1;
    GRID_STRIDE(i, n) {
        A u = up_scalar ? coef : to_acc(up[i]);
        g[i] = from_acc<T>(u * l.grad(to_acc(x[i]) - to_acc(t[i])));
    }
}

// Sums the partials in a fixed order and scales (Mean: 1/numel, 0 for an empty input). One block.
template <typename T, typename A>
__device__ void reg_finalize(const double* psum, int nparts, double scale, T* out) {
    __shared__ double shm[32];
    double s = 0;
    for (int i = threadIdx.x; i < nparts; i += blockDim.x) s += psum[i];
    s = block_sum<double>(s, shm);
    if (threadIdx.x == 0) out[0] = from_acc<T>((A)(s * scale));
}

#define REG_PARAMS(A) A p0, A p1, A p2, A p3, A p4, A p5, A p6, A p7
#define REG_ARGS p0, p1, p2, p3, p4, p5, p6, p7

#define REG_KERNELS(NAME, LOSS, DT, T, A)                                                        \
    extern "C" __global__ void NAME##_fwd_none_##DT(const T* x, const T* t, T* out, u64 n,       \
                                                    REG_PARAMS(A)) {                                \
        reg_fwd_none<T, A>(x, t, out, n, LOSS<A>(REG_ARGS));                                     \
    }                                                                                            \
    extern "C" __global__ void NAME##_fwd_partial_##DT(const T* x, const T* t, double* psum,     \
                                                       u64 n, REG_PARAMS(A)) {                      \
        reg_fwd_partial<T, A>(x, t, psum, n, LOSS<A>(REG_ARGS));                                 \
    }                                                                                            \
    extern "C" __global__ void NAME##_bwd_##DT(const T* x, const T* t, const T* up,             \
                                               int up_scalar, double scale, T* g, u64 n,         \
                                               REG_PARAMS(A)) {                                     \
        reg_bwd<T, A>(x, t, up, up_scalar, scale, g, n, LOSS<A>(REG_ARGS));                      \
    }

#define REG_DTYPE(DT, T, A)                                                                      \
    REG_KERNELS(smooth_l1, SmoothL1, DT, T, A)                                                   \
    REG_KERNELS(balanced_l1, BalancedL1, DT, T, A)                                               \
    extern "C" __global__ void regression_finalize_##DT(const double* psum, int nparts,          \
                                                        double scale, T* out) {                  \
        reg_finalize<T, A>(psum, nparts, scale, out);                                            \
    }

REG_DTYPE(f32, float, float)
REG_DTYPE(f64, double, double)
REG_DTYPE(f16, __half, float)
REG_DTYPE(bf16, __nv_bfloat16, float)
