// Scheduler of the CUDA emulation (see cuda_emu.h): runs a launch's blocks one after the other
// and the threads of each block as ucontext fibers, switching at barriers and warp
// collectives, and aborts with the kernel's name on a barrier or collective that not every
// thread of the block / warp reaches.
#define DL_CUDA_EMU 1
#include "cuda_emu.h"

#include <sys/mman.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define DL_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define DL_ASAN 1
#endif
#endif
#ifdef DL_ASAN
#include <sanitizer/common_interface_defs.h>
#endif

namespace dl_emu {

uint3 thread_idx;
uint3 block_idx;
dim3 block_dim;
dim3 grid_dim;

namespace {

#ifdef DL_ASAN
const size_t STACK_BYTES = 512 * 1024; // ASan's redzones make frames larger
#else
const size_t STACK_BYTES = 128 * 1024;
#endif
const size_t GUARD_BYTES = 4096;

enum State { READY, AT_BARRIER, AT_WARP_OP, EXITED };

#if defined(__x86_64__)
// A fiber's saved context is its stack pointer: dl_emu_switch pushes the callee-saved
// registers, MXCSR and the x87 control word, stores rsp, loads the other fiber's and pops its
// registers (no system call, unlike swapcontext's signal-mask save).
extern "C" void dl_emu_switch(void** save_sp, void* load_sp);
extern "C" void dl_emu_trampoline();
asm(R"(
    .text
    .p2align 4
    .globl dl_emu_switch
    .hidden dl_emu_switch
    .type dl_emu_switch, @function
dl_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size dl_emu_switch, .-dl_emu_switch

    .p2align 4
    .globl dl_emu_trampoline
    .hidden dl_emu_trampoline
    .type dl_emu_trampoline, @function
dl_emu_trampoline:
    movq %r12, %rdi
    andq $-16, %rsp
    call dl_emu_fiber_entry@PLT
    ud2
    .size dl_emu_trampoline, .-dl_emu_trampoline
)");
struct Context {
    void* sp = nullptr;
};
#else
struct Context {
    ucontext_t uc;
};
#endif

struct Fiber {
    Context ctx;
    char* stack = nullptr; // usable stack (above the guard page)
    State state = READY;
    const char* file = nullptr; // where the thread waits
    int line = 0;
    int op = 0; // warp collective
    unsigned mask = 0;
    uint64_t bits = 0;
    int arg = 0;
    int width = 32;
    uint64_t result = 0;
    void* fake_stack = nullptr;
};

struct Launch {
    const Kernel* kernel = nullptr;
    const void* params = nullptr;
    unsigned nthreads = 0;
    std::vector<Fiber> fibers;
    std::vector<char*> stacks; // mapped with a guard page below each, reused across launches
    Context sched;
    unsigned cur = 0;
    void* dyn = nullptr;
    size_t dyn_bytes = 0;
    const void* sched_bottom = nullptr;
    size_t sched_size = 0;
};

std::mutex launch_mutex; // __shared__ statics are process-wide: one launch at a time
Launch L;

[[noreturn]] void fail(const char* what) {
    fprintf(stderr,
            "candle-detloss cuda-emu: kernel %s, block (%u, %u, %u): %s\n",
            L.kernel ? L.kernel->name : "?", block_idx.x, block_idx.y, block_idx.z, what);
    fflush(stderr);
    abort();
}

void set_builtins(unsigned t) {
    thread_idx.x = t % block_dim.x;
    thread_idx.y = (t / block_dim.x) % block_dim.y;
    thread_idx.z = t / (block_dim.x * block_dim.y);
}

void switch_context(Context& save, Context& load) {
#if defined(__x86_64__)
    dl_emu_switch(&save.sp, load.sp);
#else
    swapcontext(&save.uc, &load.uc);
#endif
}

// Fiber -> scheduler.
void to_scheduler(Fiber& f, bool exiting) {
#ifdef DL_ASAN
    __sanitizer_start_switch_fiber(exiting ? nullptr : &f.fake_stack, L.sched_bottom,
                                   L.sched_size);
#else
    (void)exiting;
#endif
    switch_context(f.ctx, L.sched);
#ifdef DL_ASAN
    __sanitizer_finish_switch_fiber(f.fake_stack, &L.sched_bottom, &L.sched_size);
#endif
}

void fiber_main(unsigned t) {
#ifdef DL_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &L.sched_bottom, &L.sched_size);
#endif
    L.kernel->entry(L.params);
    Fiber& f = L.fibers[t];
    f.state = EXITED;
    to_scheduler(f, true);
    fail("internal error: an exited thread was resumed");
}

// Scheduler -> fiber t, until it reaches a switch point or exits.
void resume(unsigned t) {
    Fiber& f = L.fibers[t];
    L.cur = t;
    set_builtins(t);
    void* fake = nullptr;
#ifdef DL_ASAN
    __sanitizer_start_switch_fiber(&fake, f.stack, STACK_BYTES);
#endif
    switch_context(L.sched, f.ctx);
#ifdef DL_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
    (void)fake;
}

void ensure_stacks(unsigned n) {
    while (L.stacks.size() < n) {
        void* m = mmap(nullptr, STACK_BYTES + GUARD_BYTES, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) fail("cannot map a fiber stack");
        mprotect(m, GUARD_BYTES, PROT_NONE); // stack overflow faults instead of corrupting
        L.stacks.push_back(static_cast<char*>(m) + GUARD_BYTES);
    }
}

#if !defined(__x86_64__)
void fiber_main_uc(unsigned t) { fiber_main(t); }
#endif

void start_fibers() {
#if defined(__x86_64__)
    uint32_t csr[2];
    asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(csr[0]), "=m"(csr[1]));
    uint64_t fpu;
    memcpy(&fpu, csr, 8);
#endif
    for (unsigned t = 0; t < L.nthreads; ++t) {
        Fiber& f = L.fibers[t];
        f = Fiber();
        f.stack = L.stacks[t];
#if defined(__x86_64__)
        // The frame dl_emu_switch pops: FPU control, r15..r12 (r12 = t), rbx, rbp, then the
        // return into the trampoline, which calls dl_emu_fiber_entry(t).
        uint64_t* sp = reinterpret_cast<uint64_t*>(f.stack + STACK_BYTES);
        *--sp = 0;
        *--sp = reinterpret_cast<uint64_t>(&dl_emu_trampoline);
        *--sp = 0;  // rbp
        *--sp = 0;  // rbx
        *--sp = t;  // r12
        *--sp = 0;  // r13
        *--sp = 0;  // r14
        *--sp = 0;  // r15
        *--sp = fpu;
        f.ctx.sp = sp;
#else
        if (getcontext(&f.ctx.uc) != 0) fail("getcontext failed");
        f.ctx.uc.uc_stack.ss_sp = f.stack;
        f.ctx.uc.uc_stack.ss_size = STACK_BYTES;
        f.ctx.uc.uc_link = nullptr;
        makecontext(&f.ctx.uc, reinterpret_cast<void (*)()>(fiber_main_uc), 1, t);
#endif
    }
}

const char* op_name(int op) {
    switch (op) {
    case SHFL_IDX: return "__shfl_sync";
    case SHFL_DOWN: return "__shfl_down_sync";
    case SHFL_UP: return "__shfl_up_sync";
    case SHFL_XOR: return "__shfl_xor_sync";
    case VOTE_ALL: return "__all_sync";
    case VOTE_ANY: return "__any_sync";
    default: return "__ballot_sync";
    }
}

// Completes the collective of warp w if all 32 lanes wait at the same one.
bool resolve_warp(unsigned w) {
    const unsigned lo = w * 32, hi = lo + 32;
    if (hi > L.nthreads) return false; // partial warps never complete a full-mask collective
    const Fiber& f0 = L.fibers[lo];
    for (unsigned t = lo; t < hi; ++t) {
        const Fiber& f = L.fibers[t];
        if (f.state != AT_WARP_OP) return false;
        if (f.op != f0.op || f.file != f0.file || f.line != f0.line) {
            char msg[512];
            snprintf(msg, sizeof msg,
                     "warp %u: lanes wait at different collectives (%s at %s:%d, lane %u: %s at %s:%d)",
                     w, op_name(f0.op), f0.file, f0.line, t - lo, op_name(f.op), f.file, f.line);
            fail(msg);
        }
    }
    uint64_t vote = 0;
    bool all = true, any = false;
    for (unsigned t = lo; t < hi; ++t) {
        const bool p = L.fibers[t].bits != 0;
        all = all && p;
        any = any || p;
        if (p) vote |= 1ull << (t - lo);
    }
    for (unsigned t = lo; t < hi; ++t) {
        Fiber& f = L.fibers[t];
        const int lane = (int)(t - lo);
        const int width = f.width;
        const int seg = lane - lane % width; // first lane of this lane's segment
        int src = lane;
        switch (f.op) {
        case SHFL_IDX: src = seg + ((f.arg % width) + width) % width; break;
        case SHFL_DOWN: src = lane % width + f.arg < width ? lane + f.arg : lane; break;
        case SHFL_UP: src = lane % width >= f.arg ? lane - f.arg : lane; break;
        case SHFL_XOR: {
            const int s = lane ^ f.arg;
            src = (s >= seg && s < seg + width) ? s : lane;
            break;
        }
        default: break;
        }
        switch (f.op) {
        case VOTE_ALL: f.result = all; break;
        case VOTE_ANY: f.result = any; break;
        case VOTE_BALLOT: f.result = vote; break;
        default: f.result = L.fibers[lo + src].bits; break;
        }
        f.state = READY;
    }
    return true;
}

// Releases the block barrier if every thread waits at the same one.
bool resolve_barrier() {
    const Fiber& f0 = L.fibers[0];
    for (unsigned t = 0; t < L.nthreads; ++t) {
        const Fiber& f = L.fibers[t];
        if (f.state != AT_BARRIER) return false;
        if (f.file != f0.file || f.line != f0.line) {
            char msg[512];
            snprintf(msg, sizeof msg,
                     "threads wait at different __syncthreads (thread 0 at %s:%d, thread %u at %s:%d)",
                     f0.file, f0.line, t, f.file, f.line);
            fail(msg);
        }
    }
    for (unsigned t = 0; t < L.nthreads; ++t) L.fibers[t].state = READY;
    return true;
}

[[noreturn]] void deadlock() {
    unsigned exited = 0, bar = 0, warp = 0;
    const Fiber* at_bar = nullptr;
    const Fiber* at_warp = nullptr;
    for (const Fiber& f : L.fibers) {
        if (f.state == EXITED) exited++;
        if (f.state == AT_BARRIER) { bar++; at_bar = &f; }
        if (f.state == AT_WARP_OP) { warp++; at_warp = &f; }
    }
    char msg[512];
    if (at_bar)
        snprintf(msg, sizeof msg,
                 "__syncthreads at %s:%d reached by %u of %u threads (%u exited, %u in a warp "
                 "collective): a hang or undefined behaviour on a GPU",
                 at_bar->file, at_bar->line, bar, L.nthreads, exited, warp);
    else
        snprintf(msg, sizeof msg,
                 "%s at %s:%d not reached by every lane of its warp (%u threads wait in "
                 "collectives, %u exited): undefined behaviour on a GPU",
                 op_name(at_warp->op), at_warp->file, at_warp->line, warp, exited);
    fail(msg);
}

void run_block(bool descending) {
    start_fibers();
    if (L.dyn_bytes) memset(L.dyn, 0xCD, L.dyn_bytes); // garbage, as uninitialised smem
    const unsigned n = L.nthreads;
    for (;;) {
        for (unsigned i = 0; i < n; ++i) {
            const unsigned t = descending ? n - 1 - i : i;
            if (L.fibers[t].state == READY) resume(t);
        }
        for (unsigned w = 0; w * 32 < n; ++w) resolve_warp(w);
        resolve_barrier();
        bool all_exited = true, any_ready = false;
        for (const Fiber& f : L.fibers) {
            all_exited = all_exited && f.state == EXITED;
            any_ready = any_ready || f.state == READY;
        }
        if (all_exited) return;
        if (!any_ready) deadlock(); // every live thread waits for one that never comes
    }
}

} // namespace

void syncthreads(const char* file, int line) {
    Fiber& f = L.fibers[L.cur];
    f.state = AT_BARRIER;
    f.file = file;
    f.line = line;
    to_scheduler(f, false);
}

uint64_t warp_op(int op, unsigned mask, uint64_t bits, int arg, int width, const char* file,
                 int line) {
    if (mask != 0xffffffffu) fail("only full-mask (0xffffffff) warp collectives are emulated");
    if (width <= 0 || width > 32 || (width & (width - 1)) != 0) fail("invalid shuffle width");
    Fiber& f = L.fibers[L.cur];
    f.state = AT_WARP_OP;
    f.op = op;
    f.mask = mask;
    f.bits = bits;
    f.arg = arg;
    f.width = width;
    f.file = file;
    f.line = line;
    to_scheduler(f, false);
    return f.result;
}

void* dyn_shared() { return L.dyn; }

void fiber_entry(unsigned t) { fiber_main(t); }

} // namespace dl_emu

using namespace dl_emu;

extern "C" __attribute__((visibility("hidden"), used)) void dl_emu_fiber_entry(uint64_t t) {
    dl_emu::fiber_entry((unsigned)t);
}

extern "C" const Layout* dl_emu_kernel_layout(const Kernel* k) { return k->layout(); }

// Runs kernel `k` on a grid of grid[0..3] blocks of block[0..3] threads with `shmem` bytes of
// dynamic shared memory; `descending` runs the threads of each block (and the blocks) in
// descending order between switch points. Returns 0, or a negative code for an invalid
// launch configuration (nothing ran).
extern "C" int dl_emu_launch(const Kernel* k, const uint32_t* grid, const uint32_t* block,
                             size_t shmem, const void* params, int descending) {
    const uint64_t nthreads = (uint64_t)block[0] * block[1] * block[2];
    if (nthreads == 0 || nthreads > 1024) return -1;
    if ((uint64_t)grid[0] * grid[1] * grid[2] == 0) return -2;
    if (shmem > 227 * 1024) return -3;
    std::lock_guard<std::mutex> lock(launch_mutex);
    L.kernel = k;
    L.params = params;
    L.nthreads = (unsigned)nthreads;
    L.fibers.assign(L.nthreads, Fiber());
    ensure_stacks(L.nthreads);
    L.dyn_bytes = shmem;
    L.dyn = nullptr; // without dynamic shared memory any use of it faults
    if (shmem) {
        L.dyn = malloc(shmem); // exactly the launch's size: ASan sees an overflow
        if (!L.dyn) fail("out of memory for dynamic shared memory");
    }
    block_dim = dim3(block[0], block[1], block[2]);
    grid_dim = dim3(grid[0], grid[1], grid[2]);
    const uint64_t nblocks = (uint64_t)grid[0] * grid[1] * grid[2];
    for (uint64_t i = 0; i < nblocks; ++i) {
        const uint64_t b = descending ? nblocks - 1 - i : i;
        block_idx.x = (unsigned)(b % grid[0]);
        block_idx.y = (unsigned)((b / grid[0]) % grid[1]);
        block_idx.z = (unsigned)(b / ((uint64_t)grid[0] * grid[1]));
        run_block(descending != 0);
    }
    if (shmem) free(L.dyn);
    L.dyn = nullptr;
    L.kernel = nullptr;
    return 0;
}
