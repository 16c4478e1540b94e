// AP-Loss (Chen et al. 2019): the device passes of the bucketed algorithm of src/ap_loss.rs.
//   count + compact: the positive scores (the host sorts these P values, never the N others);
//   bucket:          every negative into one of the 2P+1 buckets cut by the window edges
//                    s_i -/+ delta: a count and a fixed-point offset sum, in integers;
//   update:          the error-driven update of each element from the O(P) coefficients the
//                    host computed (finish in src/ap_loss.rs).
// Integer atomics only: the statistics are bitwise reproducible and equal to the CPU's.
#include "common.cuh"

// Target kinds (template parameter): dense {-1,0,1} in the logits' dtype, dense i64, labels.
#define KIND_DENSE 0
#define KIND_DENSE_I64 1
#define KIND_LABELS 2

#define FULL_MASK 0xffffffffu
#define LO_BITS 31

// Raises the "dense target not in {-1, 0, 1}" error: [ERR_TARGET, flat index, value bits].
__device__ __forceinline__ void raise_dense(u64* err, u64 i, double v) {
    raise_err(err, ERR_TARGET, i, (u64)__double_as_longlong(v));
}

// Role of element i (row-major [n, c]): 1 positive, 0 negative, -1 ignored. Invalid targets
// raise err and count as ignored; a label is checked before it is compared with a column.
template <int KIND, typename TG>
__device__ __forceinline__ int elem_role(const TG* tg, u64 i, u64 c, u64* err) {
    if constexpr (KIND == KIND_LABELS) {
        const u64 row = i / c, col = i - row * c;
        const long long k = decode_label(tg[row], (long long)c, err);
        if (k < 0) return -1;
        return (u64)k == col ? 1 : 0;
    } else if constexpr (KIND == KIND_DENSE_I64) {
        const long long v = (long long)tg[i];
        if (v == 0) return 0;
        if (v == 1) return 1;
        if (v == -1) return -1;
        raise_dense(err, i, (double)v);
        return -1;
    } else {
        const double v = (double)to_acc(tg[i]);
        if (v == 0.0) return 0;
        if (v == 1.0) return 1;
        if (v == -1.0) return -1;
        raise_dense(err, i, v);
        return -1;
    }
}

// Number of edges <= v (edges ascending): the bucket of v.
__device__ __forceinline__ u64 upper_bound(const double* e, u64 ne, double v) {
    u64 lo = 0, hi = ne;
    while (lo < hi) {
        const u64 mid = (lo + hi) >> 1;
        if (e[mid] <= v) lo = mid + 1; else hi = mid;
    }
    return lo;
}

// Index of the first value >= v (values ascending).
__device__ __forceinline__ u64 lower_bound(const double* a, u64 n, double v) {
    u64 lo = 0, hi = n;
    while (lo < hi) {
        const u64 mid = (lo + hi) >> 1;
        if (a[mid] < v) lo = mid + 1; else hi = mid;
    }
    return lo;
}

// Pass 1: number of positives (block sums, one integer atomic per block) and target checks.
template <int KIND, typename TG>
__device__ void count_pos(const ApCountParams& p) {
    __shared__ u64 shc[32];
    const TG* tg = dev_ptr<const TG>(p.tg);
    u64* err = dev_ptr<u64>(p.err);
    u64 k = 0;
    GRID_STRIDE(i, p.n * p.c) { k += elem_role<KIND>(tg, i, p.c, err) == 1; }
    k = block_sum<u64>(k, shc);
    if (threadIdx.x == 0 && k) atomicAdd(dev_ptr<u64>(p.cnt), k);
}

// Pass 2: the positive scores, in any order (the host sorts them).
template <typename T, int KIND, typename TG>
__device__ void compact_pos(const ApCompactParams& p) {
    const T* x = dev_ptr<const T>(p.x);
    const TG* tg = dev_ptr<const TG>(p.tg);
    double* out = dev_ptr<double>(p.out);
    u64* err = dev_ptr<u64>(p.err);
    GRID_STRIDE(i, p.n * p.c) {
        if (elem_role<KIND>(tg, i, p.c, err) == 1) {
            const u64 at = atomicAdd(dev_ptr<u64>(p.next), 1ull);
            if (at < p.cap) out[at] = (double)to_acc(x[i]);
        }
    }
}

// Pass 3: bucket statistics of the negatives. Bucket b = number of edges <= x; bucket 0 (below
// every window) is skipped, bucket ne (above every window) only counted. Inside, the offset
// q = round((x - center)·scale) (|q| <= 2^61) is added split as q = hi·2^31 + lo, 0 <= lo < 2^31,
// so that u64 sums of hi and lo cannot overflow (fewer than 2^32 scores).
// With use_smem the 3·(ne+1) accumulators live in shared memory (integer atomics there), and
// each block adds its non-zero buckets to the global arrays once. A warp whose 32 elements
// fall into the same bucket (typical at initialisation, when all scores are alike) adds its
// warp sums with one atomic per array.
template <typename T, int KIND, typename TG>
__device__ void bucket_pass(const ApBucketParams& p) {
    DL_DYN_SHARED(u64, smem);
    __shared__ u64 shc[32];
    const T* x = dev_ptr<const T>(p.x);
    const TG* tg = dev_ptr<const TG>(p.tg);
    const double* edges = dev_ptr<const double>(p.edges);
    u64* cnt = dev_ptr<u64>(p.cnt);
    u64* hi = dev_ptr<u64>(p.hi);
    u64* lo = dev_ptr<u64>(p.lo);
    u64* err = dev_ptr<u64>(p.err);
    const u64 c = p.c, ne = p.ne;
    const double center = p.center, scale = p.scale;
    const int use_smem = p.use_smem;
    const u64 nb = ne + 1;
    u64* acnt = use_smem ? smem : cnt;
    u64* ahi = use_smem ? smem + nb : hi;
    u64* alo = use_smem ? smem + 2 * nb : lo;
    if (use_smem) {
        for (u64 k = threadIdx.x; k < 3 * nb; k += blockDim.x) smem[k] = 0;
        __syncthreads();
    }
    const double e0 = ne > 0 ? edges[0] : 0.0;
    const u64 total = p.n * c;
    const u64 stride = (u64)blockDim.x * gridDim.x;
    const int lane = threadIdx.x & 31;
    u64 bad = 0;
    // Every lane of a block runs the same iterations, so warp votes see full warps.
    for (u64 base = (u64)blockIdx.x * blockDim.x; base < total; base += stride) {
        const u64 i = base + threadIdx.x;
        long long b = -1; // -1: nothing to add
        u64 h = 0, l = 0;
        if (i < total && elem_role<KIND>(tg, i, c, err) == 0) {
            const double v = (double)to_acc(x[i]);
            if (!isfinite(v)) {
                bad++;
            } else if (ne > 0 && v >= e0) {
                b = (long long)upper_bound(edges, ne, v);
                if ((u64)b < ne) {
                    // Exact power-of-two scaling, round half to even as the CPU's
                    // round_ties_even; no contraction into an FMA.
                    const long long q = __double2ll_rn(__dmul_rn(__dsub_rn(v, center), scale));
                    h = (u64)(q >> LO_BITS);
                    l = (u64)(q & ((1ll << LO_BITS) - 1));
                }
            }
        }
        const long long b0 = __shfl_sync(FULL_MASK, b, 0);
        if (__all_sync(FULL_MASK, b == b0)) {
            if (b0 >= 0) {
                const u64 hs = warp_sum<u64>(h), ls = warp_sum<u64>(l);
                if (lane == 0) {
                    atomicAdd(&acnt[b0], 32ull);
                    if ((u64)b0 < ne) {
                        atomicAdd(&ahi[b0], hs);
                        atomicAdd(&alo[b0], ls);
                    }
                }
            }
        } else if (b >= 0) {
            atomicAdd(&acnt[b], 1ull);
            if ((u64)b < ne) {
                atomicAdd(&ahi[b], h);
                atomicAdd(&alo[b], l);
            }
        }
    }
    bad = block_sum<u64>(bad, shc);
    if (threadIdx.x == 0 && bad) atomicAdd(dev_ptr<u64>(p.nonfinite), bad);
    if (use_smem) {
        __syncthreads();
        for (u64 k = threadIdx.x; k < nb; k += blockDim.x) {
            if (acnt[k]) {
                atomicAdd(&cnt[k], acnt[k]);
                atomicAdd(&hi[k], ahi[k]);
                atomicAdd(&lo[k], alo[k]);
            }
        }
    }
}

// Pass 4: the update of every element times the upstream gradient up[0]. Positive: -(1-prec)/P
// of its score among the sorted positives (ERR_POSITIVE when it is missing); negative in
// bucket b > 0: alpha[b] + beta[b]·(x - center), rounded as on the CPU; ignored: 0. With
// `nan` (a non-finite score somewhere) every valid element gets NaN.
template <typename T, typename A, int KIND, typename TG>
__device__ void update_pass(const ApUpdateParams& p) {
    const T* x = dev_ptr<const T>(p.x);
    const TG* tg = dev_ptr<const TG>(p.tg);
    const double* pos = dev_ptr<const double>(p.pos);
    const double* pos_upd = dev_ptr<const double>(p.pos_upd);
    const double* edges = dev_ptr<const double>(p.edges);
    const double* alpha = dev_ptr<const double>(p.alpha);
    const double* beta = dev_ptr<const double>(p.beta);
    T* out = dev_ptr<T>(p.out);
    u64* err = dev_ptr<u64>(p.err);
    const u64 np = p.np, ne = p.ne;
    const double g = (double)to_acc(dev_ptr<const T>(p.up)[0]);
    const A ga = (A)g;
    GRID_STRIDE(i, p.n * p.c) {
        const int r = elem_role<KIND>(tg, i, p.c, err);
        double d = 0.0;
        if (r >= 0) {
            const double v = (double)to_acc(x[i]);
            if (p.nan) {
                d = __longlong_as_double(0x7ff8000000000000ll); // quiet NaN
            } else if (r == 1) {
                const u64 k = lower_bound(pos, np, v);
                if (k < np && pos[k] == v) {
                    d = pos_upd[k];
                } else {
                    raise_err(err, ERR_POSITIVE, i, (u64)__double_as_longlong(v));
                }
            } else if (ne > 0 && v >= edges[0]) {
                const u64 b = upper_bound(edges, ne, v);
                d = __dadd_rn(alpha[b], __dmul_rn(beta[b], __dsub_rn(v, p.center)));
            }
        }
        // Rounded to T, then scaled by the upstream gradient in the accumulator type: the
        // CPU's order (its update is computed for an upstream of 1 and scaled after).
        const T rounded = from_acc<T>((A)d);
        out[i] = g == 1.0 ? rounded : from_acc<T>(to_acc(rounded) * ga);
    }
}

// ---- one extern "C" kernel per (dtype, target kind), stamped by macros ----
#define AP_KERNELS(SFX, T, A, TG, KIND)                                                          \
    DL_KERNEL(ap_count_##SFX, ApCountParams, p) { count_pos<KIND, TG>(p); }                      \
    DL_KERNEL(ap_compact_##SFX, ApCompactParams, p) { compact_pos<T, KIND, TG>(p); }             \
    DL_KERNEL(ap_bucket_##SFX, ApBucketParams, p) { bucket_pass<T, KIND, TG>(p); }               \
    DL_KERNEL(ap_update_##SFX, ApUpdateParams, p) { update_pass<T, A, KIND, TG>(p); }

#define AP_DTYPE(DT, T, A)                                                                       \
    AP_KERNELS(DT##_dense, T, A, T, KIND_DENSE)                                                  \
    AP_KERNELS(DT##_densei64, T, A, int64_t, KIND_DENSE_I64)                                     \
    AP_KERNELS(DT##_u32, T, A, uint32_t, KIND_LABELS)                                            \
    AP_KERNELS(DT##_i64, T, A, int64_t, KIND_LABELS)

AP_DTYPE(f32, float, float)
AP_DTYPE(f64, double, double)
AP_DTYPE(f16, __half, float)
AP_DTYPE(bf16, __nv_bfloat16, float)

DL_MODULE(ap_loss)
