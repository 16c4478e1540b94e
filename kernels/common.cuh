// Shared device helpers of candle-detloss: dtype conversion to the accumulator type, overloaded
// math (float / double), deterministic block reductions, label decoding and error reporting,
// and the macros that declare kernels and their parameter structs (compiled by nvcc, or by the
// host C++ compiler with the CUDA emulation of kernels/emu/ under the `cuda-emu` feature).
#pragma once
#ifdef DL_CUDA_EMU
#include "emu/cuda_emu.h"
#else
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>
#include <float.h>

// `DL_KERNEL(name, Params, p) { body }`: an extern "C" kernel taking one parameter struct.
#define DL_KERNEL(NAME, PARAMS, P) extern "C" __global__ void NAME(const PARAMS P)
// A kernel parameter struct (fields from an X-macro, mirrored in src/gpu/params.rs).
#define DL_FIELD_DECL(T, N) T N;
#define DL_PARAMS(NAME, FIELDS) struct NAME { FIELDS(DL_FIELD_DECL) };
// Dynamic shared memory of the launch (the only construct the host emulation spells otherwise).
#define DL_DYN_SHARED(T, NAME) extern __shared__ T NAME[]
// The emulation's per-module kernel lookup; nothing on a GPU.
#define DL_MODULE(MOD)
#endif

typedef unsigned long long u64;

// A buffer address of a parameter struct (a device pointer, or a host address under emulation).
template <typename T> __device__ __forceinline__ T* dev_ptr(u64 a) {
    return reinterpret_cast<T*>(a);
}

#include "params.cuh"

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

// ---- the weight of a forward_weighted call (src/weight.rs), in the accumulator type A ----
// mode 0: no weight (1); 1: one value per row (w[row]); 2: one per element (w[idx]).
template <typename T, typename A>
__device__ __forceinline__ A dl_weight(u64 w, int mode, u64 row, u64 idx) {
    if (mode == 0) return (A)1;
    return (A)to_acc(dev_ptr<const T>(w)[mode == 1 ? row : idx]);
}

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

// ---- errors: one [code, a, b] u64 buffer per launch sequence, read back by src/gpu ----
#define ERR_LABEL 1     // a = the label value
#define ERR_TARGET 2    // a = flat index, b = the value's f64 bits
#define ERR_POSITIVE 3  // AP-Loss: a = flat index, b = the score's f64 bits

// Raises error `code`; the first offender claims the buffer, so a and b belong together.
__device__ __forceinline__ void raise_err(u64* err, u64 code, u64 a, u64 b) {
    if (atomicCAS(&err[0], 0ull, code) == 0ull) {
        err[1] = a;
        err[2] = b;
    }
}

// Decodes a label against max_label (inclusive). Returns -1 for ignored rows and for invalid
// labels; an invalid label also raises ERR_LABEL with its value, so the host turns it into an
// Err. Never used as an index before this check.
template <typename L>
__device__ __forceinline__ long long decode_label(L raw, long long max_label, u64* err) {
    long long v = label_value(raw);
    if (v == -1) return -1;
    if (v < 0 || v > max_label) {
        raise_err(err, ERR_LABEL, (u64)v, 0);
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

// Sums a scalar reduction's per-block partials (psum, and pden when use_den) in a fixed order:
// out[0] = scale * sum(psum), divided by den = sum(pden) * den_mult when use_den (0 when den is
// 0); the factor applied goes to scale_out[0] when given (the backward of Mean reads it). One
// block; the body of every family's finalize kernel (kernels/common.cu).
template <typename T>
__device__ void finalize(const FinalizeParams& p) {
    __shared__ double shs[32];
    __shared__ double shd[32];
    const double* psum = dev_ptr<const double>(p.psum);
    const double* pden = dev_ptr<const double>(p.pden);
    double s = 0, d = 0;
    for (u64 i = threadIdx.x; i < p.nparts; i += blockDim.x) {
        s += psum[i];
        if (p.use_den) d += pden[i];
    }
    s = block_sum<double>(s, shs);
    d = block_sum<double>(d, shd);
    if (threadIdx.x == 0) {
        double sc = p.scale;
        if (p.use_den) {
            const double den = d * p.den_mult;
            sc = den > 0.0 ? sc / den : 0.0;
        }
        using A = decltype(to_acc(T()));
        dev_ptr<T>(p.out)[0] = from_acc<T>((A)(s * sc));
        if (p.scale_out) dev_ptr<double>(p.scale_out)[0] = sc;
    }
}

// The launch's per-block partial sums: thread 0 of each block writes its block's sums.
__device__ __forceinline__ void write_partials(const u64 psum, const u64 pden, double s,
                                               double d) {
    if (threadIdx.x == 0) {
        if (psum) dev_ptr<double>(psum)[blockIdx.x] = s;
        if (pden) dev_ptr<double>(pden)[blockIdx.x] = d;
    }
}

// Grid-stride loop over [0, n).
#define GRID_STRIDE(i, n) \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (u64)blockDim.x * gridDim.x)
