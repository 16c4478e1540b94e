// Distribution focal loss (GFL, YOLOv8's DFL): forward (row losses or block partial sums),
// backward to the logits and backward to the targets. Math mirrors src/dfl/mod.rs; see the
// formulas there.
//
// Loss and d/dx: one warp per row (DFL rows are short: 16-17 bins in YOLOv8; longer rows are
// strided over the lanes). The lanes find the row max m and its first bin a, then
// r = sum_{k != a} e^{x_k - m}, both merged by a fixed butterfly that gives every lane the same
// bits (deterministic). d/dy: one thread per row (two logits and a scan for NaN / +inf).
#include "common.cuh"
#include <float.h>

// Row statistics relative to the max m: r = sum over every bin but the max a (whose term is 1),
// so sum_k e^{x_k - m} = 1 + r and lse - m = log1p(r). a = k when no logit reaches -FLT_MAX.
template <typename A> struct Row {
    A m, r;
    u64 a;
};

template <typename T, typename A>
__device__ __forceinline__ Row<A> row_stats(const T* x, u64 k, int lane) {
    A m = (A)(-FLT_MAX); // a finite lowest: a NaN is never selected and reaches r through its e
    u64 a = k;
    for (u64 j = lane; j < k; j += 32) {
        A v = to_acc(x[j]);
        if (v > m || (v == m && j < a)) {
            m = v;
            a = j;
        }
    }
    // (max, first bin) of the warp: symmetric in the two lanes, so all lanes agree.
    for (int o = 16; o > 0; o >>= 1) {
        A mo = __shfl_xor_sync(0xffffffffu, m, o);
        u64 ao = __shfl_xor_sync(0xffffffffu, a, o);
        if (mo > m || (mo == m && ao < a)) {
            m = mo;
            a = ao;
        }
    }
    A r = 0;
    for (u64 j = lane; j < k; j += 32)
        if (j != a) r += dl_exp(to_acc(x[j]) - m); // e_a left out, not subtracted
    for (int o = 16; o > 0; o >>= 1) r += __shfl_xor_sync(0xffffffffu, r, o); // commutative
    Row<A> s;
    s.m = m;
    s.r = r;
    s.a = a;
    return s;
}

// Whether y is a valid target in [0, K-1] (NaN is not).
template <typename A> __device__ __forceinline__ bool valid_target(A y, u64 k) {
    return y >= (A)0 && y <= (A)(k - 1);
}

// The two bins of a valid target: i = min(floor(y), K - 2), j = i + 1, w_i = i + 1 - y,
// w_j = y - i; K = 1: bin 0 alone (j = i = 0, w_i = 1, w_j = 0).
template <typename A> struct Bins {
    u64 i, j;
    A wi, wj;
};

template <typename A> __device__ __forceinline__ Bins<A> bins_of(A y, u64 k) {
    Bins<A> b;
    if (k == 1) {
        b.i = 0;
        b.j = 0;
        b.wi = (A)1;
        b.wj = (A)0;
        return b;
    }
    u64 i = (u64)(long long)y; // y >= 0: truncation is the floor
    if (i > k - 2) i = k - 2;
    const A fi = (A)i;
    b.i = i;
    b.j = i + 1;
    b.wi = fi + (A)1 - y;
    b.wj = y - fi;
    return b;
}

// Raises the "target outside [0, K-1]" error: [ERR_TARGET, row, value bits].
template <typename A> __device__ __forceinline__ void bad_target(u64* err, u64 i, A y) {
    raise_err(err, ERR_TARGET, i, (u64)__double_as_longlong((double)y));
}

// Forward. NONE: out[i] = row loss; else per-block partial sums of the row losses into psum.
template <typename T, typename A, bool NONE>
__device__ void fwd(const DflFwdParams& p) {
    __shared__ double sh[32];
    const T* x = dev_ptr<const T>(p.x);
    const T* t = dev_ptr<const T>(p.t);
    T* out = dev_ptr<T>(p.out);
    u64* err = dev_ptr<u64>(p.err);
    const u64 n = p.n, k = p.k;
    const int lane = threadIdx.x & 31;
    const u64 w0 = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const u64 nw = ((u64)gridDim.x * blockDim.x) >> 5;
    double acc = 0;
    for (u64 i = w0; i < n; i += nw) { // the same trip count for the 32 lanes of a warp
        const A y = to_acc(t[i]);
        if (!valid_target(y, k)) {
            if (lane == 0) {
                bad_target(err, i, y);
                if (NONE) out[i] = from_acc<T>((A)0);
            }
            continue;
        }
        const T* xr = x + i * k;
        const Row<A> st = row_stats<T, A>(xr, k, lane);
        if (lane == 0) {
            const Bins<A> b = bins_of(y, k);
            const A lse_m = dl_log1p(st.r); // log sum_k e^{x_k - m} = lse - m
            // CE(x, b) = lse - x_b = log1p(r) + (m - x_b): two non-negative terms.
            const A ce_i = lse_m + (st.m - to_acc(xr[b.i]));
            const A ce_j = lse_m + (st.m - to_acc(xr[b.j]));
            const A l = b.wi * ce_i + b.wj * ce_j; // (i + 1 - y) CE_i + (y - i) CE_{i+1}
            const A wl = dl_weight<T, A>(p.ew, p.ew_mode, i, i) * l; // the row's weight (or 1)
            if (NONE) out[i] = from_acc<T>(wl);
            else acc += (double)wl;
        }
    }
    if (!NONE) {
        acc = block_sum<double>(acc, sh);
        write_partials(p.psum, 0, acc, 0);
    }
}

// d/dx: g_k = coef (p_k - w_k), w = w_i at bin i, w_j at bin j; at the max bin a,
// p_a - w_a = (1 - w_a) - r / s (no cancellation as p_a -> 1). coef = up * scale * (the row's
// weight of forward_weighted, 1 without one).
template <typename T, typename A>
__device__ void bwd(const DflBwdParams& p) {
    const T* x = dev_ptr<const T>(p.x);
    const T* t = dev_ptr<const T>(p.t);
    const T* up = dev_ptr<const T>(p.up);
    T* g = dev_ptr<T>(p.g);
    u64* err = dev_ptr<u64>(p.err);
    const u64 n = p.n, k = p.k;
    const int lane = threadIdx.x & 31;
    const u64 w0 = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const u64 nw = ((u64)gridDim.x * blockDim.x) >> 5;
    for (u64 i = w0; i < n; i += nw) {
        const A y = to_acc(t[i]);
        if (!valid_target(y, k)) {
            if (lane == 0) bad_target(err, i, y);
            for (u64 j = lane; j < k; j += 32) g[i * k + j] = from_acc<T>((A)0);
            continue;
        }
        const T* xr = x + i * k;
        const Row<A> st = row_stats<T, A>(xr, k, lane);
        const Bins<A> b = bins_of(y, k);
        const A coef = (A)(p.scale * (double)to_acc(up[p.up_scalar ? 0 : i])) *
                       dl_weight<T, A>(p.ew, p.ew_mode, i, i);
        const A inv_s = (A)1 / ((A)1 + st.r); // 1 / sum_k e^{x_k - m}
        for (u64 j = lane; j < k; j += 32) {
            const A w = (j == b.i ? b.wi : (A)0) + (j == b.j ? b.wj : (A)0);
            A v;
            if (j == st.a) v = ((A)1 - w) - st.r * inv_s;
            else v = dl_exp(to_acc(xr[j]) - st.m) * inv_s - w;
            g[i * k + j] = from_acc<T>(coef * v);
        }
    }
}

// d/dy = CE(x, i+1) - CE(x, i) = x_i - x_{i+1} (the log-sum-exp cancels); 0 for K = 1; NaN when
// the row holds a NaN or +inf logit (the loss is NaN there, and so is torch's gradient).
template <typename T, typename A>
__device__ void bwd_target(const DflBwdParams& p) {
    const T* x = dev_ptr<const T>(p.x);
    const T* t = dev_ptr<const T>(p.t);
    const T* up = dev_ptr<const T>(p.up);
    T* g = dev_ptr<T>(p.g);
    u64* err = dev_ptr<u64>(p.err);
    const u64 k = p.k;
    const A inf = (A)1 / (A)0;
    GRID_STRIDE(i, p.n) {
        const A y = to_acc(t[i]);
        if (!valid_target(y, k)) {
            bad_target(err, i, y);
            g[i] = from_acc<T>((A)0);
            continue;
        }
        const T* xr = x + i * k;
        bool poisoned = false;
        for (u64 j = 0; j < k; ++j) poisoned |= !(to_acc(xr[j]) < inf);
        const Bins<A> b = bins_of(y, k);
        const A coef = (A)(p.scale * (double)to_acc(up[p.up_scalar ? 0 : i])) *
                       dl_weight<T, A>(p.ew, p.ew_mode, i, i);
        const A d = to_acc(xr[b.i]) - to_acc(xr[b.j]);
        g[i] = from_acc<T>(poisoned ? inf - inf : coef * d);
    }
}

// ---- one extern "C" kernel per dtype, stamped by a macro ----
#define DFL_DTYPE(DT, T, A)                                                                      \
    DL_KERNEL(dfl_fwd_none_##DT, DflFwdParams, p) { fwd<T, A, true>(p); }                        \
    DL_KERNEL(dfl_fwd_partial_##DT, DflFwdParams, p) { fwd<T, A, false>(p); }                    \
    DL_KERNEL(dfl_bwd_##DT, DflBwdParams, p) { bwd<T, A>(p); }                                   \
    DL_KERNEL(dfl_bwd_target_##DT, DflBwdParams, p) { bwd_target<T, A>(p); }

DFL_DTYPE(f32, float, float)
DFL_DTYPE(f64, double, double)
DFL_DTYPE(f16, __half, float)
DFL_DTYPE(bf16, __nv_bfloat16, float)

DL_MODULE(dfl)
