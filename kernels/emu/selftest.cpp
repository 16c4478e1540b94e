// Kernels that break the CUDA execution model on purpose, for the emulation's own tests
// (src/gpu/emu.rs): a __syncthreads that one thread never reaches and a warp collective that
// one lane skips must abort naming the kernel; the well-formed mode must run. Host build only.
#define DL_CUDA_EMU 1
#include "common.cuh"

#define SELFTEST_FIELDS(X) X(u64, out) X(int, mode)
DL_PARAMS(SelftestParams, SELFTEST_FIELDS)

// mode 0: out[t] = the sum of the thread indices of t's warp (lane 0 holds it).
// mode 1: thread 0 exits before the barrier the others wait at.
// mode 2: lane 5 of warp 0 skips the warp reduction the other 31 lanes enter.
DL_KERNEL(emu_selftest, SelftestParams, p) {
    u64* out = dev_ptr<u64>(p.out);
    if (p.mode == 1 && threadIdx.x == 0) return;
    __syncthreads();
    u64 v = threadIdx.x;
    if (!(p.mode == 2 && threadIdx.x == 5)) v = warp_sum<u64>(v);
    out[threadIdx.x] = v;
}

DL_MODULE(emu_selftest)
