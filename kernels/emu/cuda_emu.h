// Host emulation of the CUDA execution model, for the `cuda-emu` feature: the kernels of
// kernels/*.cu compiled by the system C++ compiler and launched from Rust on CPU memory.
//
// - The blocks of a grid run one after the other; the threads of a block are fibers
//   (ucontext), switched only at __syncthreads and at warp collectives (__shfl_*_sync,
//   __ballot_sync, __all_sync, __any_sync). Between two switch points a thread runs alone, so
//   the order in which the scheduler runs the threads (ascending or descending, chosen per
//   launch) is the only freedom; results that depend on it reveal a race.
// - __shared__ variables are `static` (one copy, reused by consecutive blocks: launches are
//   serialised by the runtime) and dynamic shared memory is a heap block of exactly the
//   launch's size, filled with 0xCD at the start of every block; AddressSanitizer sees both.
// - A barrier or full-mask collective that some thread of the block / warp does not reach
//   (it exited, or waits elsewhere) aborts with a message naming the kernel: on hardware that
//   is a hang or undefined behaviour.
// - Atomics are plain read-modify-writes (fibers never interleave inside one).
// - __half / __nv_bfloat16 come from the CUDA headers (host-compilable), math from libm.
#pragma once

#ifndef DL_CUDA_EMU
#error "cuda_emu.h is only for the host build of the kernels (DL_CUDA_EMU)"
#endif

// Execution-space qualifiers mean nothing on the host; crt/host_defines.h keeps macros that
// are already defined.
#define __host__
#define __device__
#define __global__
#define __forceinline__ inline __attribute__((always_inline))
#define __shared__ static

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <vector_types.h>

#include <cfloat>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>

using std::isfinite;

namespace dl_emu {

// One field of a kernel parameter struct, as the Rust side lays it out too.
struct Field {
    const char* name;
    size_t offset;
    size_t size;
};
struct Layout {
    const char* name;
    size_t size;
    size_t nfields;
    const Field* fields;
};

typedef void (*Entry)(const void* params);
struct Kernel {
    const char* name;
    const Layout* (*layout)();
    Entry entry;
    Kernel* next;
};
struct Registrar {
    Registrar(Kernel* k, Kernel** head) {
        k->next = *head;
        *head = k;
    }
};

// Built-in variables of the running thread (set by the scheduler before each switch).
extern uint3 thread_idx;
extern uint3 block_idx;
extern dim3 block_dim;
extern dim3 grid_dim;

enum WarpOp { SHFL_IDX, SHFL_DOWN, SHFL_UP, SHFL_XOR, VOTE_ALL, VOTE_ANY, VOTE_BALLOT };

void syncthreads(const char* file, int line);
uint64_t warp_op(int op, unsigned mask, uint64_t bits, int arg, int width, const char* file,
                 int line);
void* dyn_shared();

template <typename T> inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8, "warp exchange of at most 8 bytes");
    uint64_t b = 0;
    memcpy(&b, &v, sizeof(T));
    return b;
}
template <typename T> inline T from_bits(uint64_t b) {
    T v;
    memcpy(&v, &b, sizeof(T));
    return v;
}

} // namespace dl_emu

#define threadIdx (dl_emu::thread_idx)
#define blockIdx (dl_emu::block_idx)
#define blockDim (dl_emu::block_dim)
#define gridDim (dl_emu::grid_dim)

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    dl_emu::syncthreads(file, line);
}

template <typename T>
inline T __shfl_sync(unsigned mask, T v, int src, int width = 32,
                     const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return dl_emu::from_bits<T>(
        dl_emu::warp_op(dl_emu::SHFL_IDX, mask, dl_emu::to_bits(v), src, width, file, line));
}
template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32,
                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return dl_emu::from_bits<T>(dl_emu::warp_op(dl_emu::SHFL_DOWN, mask, dl_emu::to_bits(v),
                                                (int)d, width, file, line));
}
template <typename T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32,
                        const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return dl_emu::from_bits<T>(
        dl_emu::warp_op(dl_emu::SHFL_UP, mask, dl_emu::to_bits(v), (int)d, width, file, line));
}
template <typename T>
inline T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32,
                         const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    return dl_emu::from_bits<T>(
        dl_emu::warp_op(dl_emu::SHFL_XOR, mask, dl_emu::to_bits(v), m, width, file, line));
}
inline int __all_sync(unsigned mask, int p, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
    return (int)dl_emu::warp_op(dl_emu::VOTE_ALL, mask, p != 0, 0, 32, file, line);
}
inline int __any_sync(unsigned mask, int p, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
    return (int)dl_emu::warp_op(dl_emu::VOTE_ANY, mask, p != 0, 0, 32, file, line);
}
inline unsigned __ballot_sync(unsigned mask, int p, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
    return (unsigned)dl_emu::warp_op(dl_emu::VOTE_BALLOT, mask, p != 0, 0, 32, file, line);
}

// ---- atomics: plain read-modify-write (no fiber switch can happen inside) ----
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) {
    unsigned long long o = *a;
    *a = o + v;
    return o;
}
inline unsigned atomicAdd(unsigned* a, unsigned v) {
    unsigned o = *a;
    *a = o + v;
    return o;
}
inline int atomicAdd(int* a, int v) {
    int o = *a;
    *a = o + v;
    return o;
}
inline unsigned long long atomicExch(unsigned long long* a, unsigned long long v) {
    unsigned long long o = *a;
    *a = v;
    return o;
}
inline unsigned long long atomicCAS(unsigned long long* a, unsigned long long cmp,
                                    unsigned long long v) {
    unsigned long long o = *a;
    if (o == cmp) *a = v;
    return o;
}
inline unsigned long long atomicMax(unsigned long long* a, unsigned long long v) {
    unsigned long long o = *a;
    if (v > o) *a = v;
    return o;
}

// ---- intrinsics: IEEE round-to-nearest on the host (SSE2, -ffp-contract=off) ----
inline long long __double_as_longlong(double x) { return dl_emu::from_bits<long long>(dl_emu::to_bits(x)); }
inline double __longlong_as_double(long long x) { return dl_emu::from_bits<double>(dl_emu::to_bits(x)); }
inline long long __double2ll_rn(double x) { return llrint(x); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }

// ---- kernels, parameter structs and modules ----

// Each translation unit (one kernels/*.cu) keeps its own list of kernels.
static dl_emu::Kernel* dl_emu_head = nullptr;

// `DL_KERNEL(name, Params, p) { body }`: the kernel `name` taking one parameter struct.
#define DL_KERNEL(NAME, PARAMS, P)                                                             \
    static void NAME(const PARAMS P);                                                          \
    static void NAME##_entry(const void* a) { NAME(*static_cast<const PARAMS*>(a)); }          \
    static dl_emu::Kernel NAME##_kernel = {#NAME, &PARAMS::dl_layout, NAME##_entry, nullptr};  \
    static dl_emu::Registrar NAME##_registrar(&NAME##_kernel, &dl_emu_head);                   \
    static void NAME(const PARAMS P)

#define DL_FIELD_DECL(T, N) T N;
#define DL_FIELD_DESC(T, N) {#N, offsetof(Self, N), sizeof(T)},
// A kernel parameter struct whose layout the Rust side checks at every launch.
#define DL_PARAMS(NAME, FIELDS)                                                                \
    struct NAME {                                                                              \
        FIELDS(DL_FIELD_DECL)                                                                  \
        static const dl_emu::Layout* dl_layout() {                                             \
            typedef NAME Self;                                                                 \
            static const dl_emu::Field fields[] = {FIELDS(DL_FIELD_DESC)};                     \
            static const dl_emu::Layout layout = {#NAME, sizeof(Self),                        \
                                                  sizeof(fields) / sizeof(fields[0]), fields}; \
            return &layout;                                                                    \
        }                                                                                      \
    };

// Dynamic shared memory of the launch.
#define DL_DYN_SHARED(T, NAME) T* NAME = static_cast<T*>(dl_emu::dyn_shared())

// The module's lookup function, `dl_emu_find_<module>(name)`, called by the Rust backend,
// and `dl_emu_kernel_<module>(i)`, the name of its i-th kernel (null past the last), with
// which the tests check that every kernel ran.
#define DL_MODULE(MOD)                                                                         \
    extern "C" const dl_emu::Kernel* dl_emu_find_##MOD(const char* name) {                     \
        for (const dl_emu::Kernel* k = dl_emu_head; k; k = k->next)                            \
            if (strcmp(k->name, name) == 0) return k;                                          \
        return nullptr;                                                                        \
    }                                                                                          \
    extern "C" const char* dl_emu_kernel_##MOD(size_t i) {                                     \
        const dl_emu::Kernel* k = dl_emu_head;                                                 \
        for (; k && i; --i) k = k->next;                                                       \
        return k ? k->name : nullptr;                                                          \
    }
