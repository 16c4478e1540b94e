// The one finalize kernel of every scalar reduction (the partial sums of a family's forward, or
// of a denominator, into the rank-0 result and its scale), one per output dtype.
#include "common.cuh"

#define FINALIZE(DT, T) \
    DL_KERNEL(finalize_##DT, FinalizeParams, p) { finalize<T>(p); }

FINALIZE(f32, float)
FINALIZE(f64, double)
FINALIZE(f16, __half)
FINALIZE(bf16, __nv_bfloat16)

DL_MODULE(common)
