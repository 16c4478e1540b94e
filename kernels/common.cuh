// Shared device helpers of candle-detloss: dtype conversion to the accumulator type, overloaded
// math (float / double), deterministic block reductions, label decoding and error reporting.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

typedef unsigned long long u64;

// ---- element <-> accumulator (f32 for f32/f16/bf16, f64 for f64) ----
__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(float x);
template <typename T> __device__ __forceinline__ T from_acc(double x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// ---- accurate math, overloaded on the accumulator type (no fast-math intrinsics) ----
__device__ __forceinline__ float dl_exp(float x) { return expf(x); }
__device__ __forceinline__ double dl_exp(double x) { return exp(x); }
__device__ __forceinline__ float dl_log(float x) { return logf(x); }
__device__ __forceinline__ double dl_log(double x) { return log(x); }
__device__ __forceinline__ float dl_log1p(float x) { return log1pf(x); }
__device__ __forceinline__ double dl_log1p(double x) { return log1p(x); }
__device__ __forceinline__ float dl_abs(float x) { return fabsf(x); }
__device__ __forceinline__ double dl_abs(double x) { return fabs(x); }

// ---- labels: 0..C class, C background, -1 ignored (i64 only); anything else is an error ----
__device__ __forceinline__ long long label_value(uint32_t v) { return (long long)v; }
__device__ __forceinline__ long long label_value(int64_t v) { return (long long)v; }

// Decodes a label against max_label (inclusive). Returns -1 for ignored rows and for invalid
// labels; an invalid label also raises err[0] and records its value in err[1], so the host turns
// it into an Err. Never used as an index before this check.
template <typename L>
__device__ __forceinline__ long long decode_label(L raw, long long max_label, u64* err) {
    long long v = label_value(raw);
    if (v == -1) return -1;
    if (v < 0 || v > max_label) {
        err[0] = 1ull;
        atomicExch(&err[1], (u64)v);
        return -1;
    }
    return v;
}

// ---- deterministic block reduction (fixed shuffle tree; blockDim.x a multiple of 32, <= 1024) ----
template <typename A> __device__ __forceinline__ A warp_sum(A v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

// Sum of `v` over the block, valid in thread 0. `shm` needs 32 elements.
template <typename A> __device__ __forceinline__ A block_sum(A v, A* shm) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads(); // shm may be reused by consecutive calls
    if (lane == 0) shm[wid] = v;
    __syncthreads();
    const int nw = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < nw) ? shm[threadIdx.x] : (A)0;
    if (wid == 0) v = warp_sum(v);
    return v;
}

// Reduction codes shared with src/reduction.rs.
#define RED_NONE 0
#define RED_SUM 1
#define RED_MEAN 2
#define RED_AVG 3

// Final step of a scalar reduction: sums the per-block partials in a fixed order and scales.
// Mean divides by (sum of counts) * count_mult, 0 when that is 0. One block.
template <typename T, typename A>
__device__ void finalize_impl(const A* psum, const u64* pcnt, int nparts, double count_mult,
                              int red, double avg_factor, T* out) {
    __shared__ A shm[32];
    __shared__ u64 shc[32];
    A s = 0;
    u64 k = 0;
    for (int i = threadIdx.x; i < nparts; i += blockDim.x) {
        s += psum[i];
        k += pcnt[i];
    }
    s = block_sum<A>(s, shm);
    k = block_sum<u64>(k, shc);
    if (threadIdx.x == 0) {
        double total = (double)s;
        if (red == RED_MEAN) {
            double d = (double)k * count_mult;
            total = d > 0.0 ? total / d : 0.0;
        } else if (red == RED_AVG) {
            total = total / avg_factor;
        }
        out[0] = from_acc<T>((A)total);
    }
}

// Grid-stride loop over [0, n).
#define GRID_STRIDE(i, n) \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (u64)blockDim.x * gridDim.x)
