// The parameter struct of every kernel: one argument per launch instead of positional lists.
// Buffer addresses are u64 (a device pointer on a GPU, a host address under the emulation).
// Mirrored field by field in src/gpu/params.rs; the emulated build checks the size and every
// field's offset at each launch. Flags are ints, hyper-parameters doubles (cast to the
// accumulator type inside the kernel).
#pragma once

// ---- common.cu: the one finalize kernel of every scalar reduction ----
#define FINALIZE_FIELDS(X) \
    X(u64, psum) X(u64, pden) X(u64, out) X(u64, scale_out) X(u64, nparts) \
    X(double, scale) X(double, den_mult) X(int, use_den)
DL_PARAMS(FinalizeParams, FINALIZE_FIELDS)

// ---- focal.cu (ew, ew_mode: the forward_weighted weight, dl_weight in common.cuh) ----
#define FOCAL_FWD_FIELDS(X) \
    X(u64, x) X(u64, tg) X(u64, w) X(u64, out) X(u64, psum) X(u64, pden) X(u64, err) \
    X(u64, n) X(u64, c) X(u64, ew) X(double, alpha) X(double, gamma) X(int, has_alpha) \
    X(int, ew_mode)
DL_PARAMS(FocalFwdParams, FOCAL_FWD_FIELDS)
#define FOCAL_BWD_FIELDS(X) \
    X(u64, x) X(u64, tg) X(u64, w) X(u64, up) X(u64, g) X(u64, scale_p) X(u64, err) \
    X(u64, n) X(u64, c) X(u64, ew) X(double, alpha) X(double, gamma) X(double, scale) \
    X(int, has_alpha) X(int, up_scalar) X(int, ew_mode)
DL_PARAMS(FocalBwdParams, FOCAL_BWD_FIELDS)
// Non-ignored rows per block (the Mean denominator of label targets), into pden.
#define ROW_COUNT_FIELDS(X) X(u64, tg) X(u64, pden) X(u64, err) X(u64, n) X(u64, c)
DL_PARAMS(RowCountParams, ROW_COUNT_FIELDS)

// ---- quality.cu: tg = dense targets [N, C] or scores [N]; lab = labels [N] (0 for dense);
// ew, ew_mode: the forward_weighted weight ----
#define QUALITY_FWD_FIELDS(X) \
    X(u64, x) X(u64, tg) X(u64, lab) X(u64, out) X(u64, psum) X(u64, pden) X(u64, err) \
    X(u64, n) X(u64, c) X(u64, ew) X(double, beta) X(double, k) X(int, vfl) X(int, iou) \
    X(int, ew_mode)
DL_PARAMS(QualityFwdParams, QUALITY_FWD_FIELDS)
#define QUALITY_BWD_FIELDS(X) \
    X(u64, x) X(u64, tg) X(u64, lab) X(u64, up) X(u64, g) X(u64, scale_p) X(u64, err) \
    X(u64, n) X(u64, c) X(u64, ew) X(double, beta) X(double, k) X(double, scale) X(int, vfl) \
    X(int, iou) X(int, up_scalar) X(int, ew_mode)
DL_PARAMS(QualityBwdParams, QUALITY_BWD_FIELDS)

// ---- softmax.cu ----
#define SOFTMAX_FWD_FIELDS(X) \
    X(u64, x) X(u64, lab) X(u64, w) X(u64, wsum) X(u64, out) X(u64, psum) X(u64, pden) \
    X(u64, err) X(u64, n) X(u64, k) X(double, a) X(double, c) X(double, gamma) \
    X(int, has_w) X(int, focal) X(int, none) X(u64, ew) X(int, ew_mode)
DL_PARAMS(SoftmaxFwdParams, SOFTMAX_FWD_FIELDS)
#define SOFTMAX_BWD_FIELDS(X) \
    X(u64, x) X(u64, lab) X(u64, w) X(u64, wsum) X(u64, up) X(u64, g) X(u64, scale_p) \
    X(u64, err) X(u64, n) X(u64, k) X(double, a) X(double, c) X(double, gamma) \
    X(double, scale) X(int, has_w) X(int, focal) X(int, up_scalar) X(u64, ew) X(int, ew_mode)
DL_PARAMS(SoftmaxBwdParams, SOFTMAX_BWD_FIELDS)
#define SOFTMAX_DEN_FIELDS(X) \
    X(u64, lab) X(u64, w) X(u64, pden) X(u64, err) X(u64, n) X(u64, k) X(int, has_w)
DL_PARAMS(SoftmaxDenParams, SOFTMAX_DEN_FIELDS)
#define SOFTMAX_PROB_FWD_FIELDS(X) \
    X(u64, x) X(u64, tg) X(u64, w) X(u64, ew) X(u64, out) X(u64, psum) X(u64, n) X(u64, k) \
    X(double, a) X(double, c) X(int, has_w) X(int, ew_mode) X(int, none)
DL_PARAMS(SoftmaxProbFwdParams, SOFTMAX_PROB_FWD_FIELDS)
#define SOFTMAX_PROB_BWD_FIELDS(X) \
    X(u64, x) X(u64, tg) X(u64, w) X(u64, ew) X(u64, up) X(u64, g) X(u64, n) X(u64, k) \
    X(double, a) X(double, c) X(double, scale) X(int, has_w) X(int, ew_mode) X(int, up_scalar) \
    X(int, wrt_t)
DL_PARAMS(SoftmaxProbBwdParams, SOFTMAX_PROB_BWD_FIELDS)

// ---- ghm.cu ----
#define GHM_HIST_FIELDS(X) \
    X(u64, x) X(u64, tg) X(u64, counts) X(u64, err) X(u64, n) X(u64, c) X(int, bins) \
    X(int, global)
DL_PARAMS(GhmHistParams, GHM_HIST_FIELDS)
#define GHM_FWD_FIELDS(X) \
    X(u64, x) X(u64, tg) X(u64, w) X(u64, out) X(u64, psum) X(u64, err) X(u64, n) X(u64, c) \
    X(int, bins)
DL_PARAMS(GhmFwdParams, GHM_FWD_FIELDS)
#define GHM_BWD_FIELDS(X) \
    X(u64, x) X(u64, tg) X(u64, w) X(u64, up) X(u64, g) X(u64, err) X(u64, n) X(u64, c) \
    X(double, scale) X(int, bins) X(int, up_scalar) X(int, wrt_t)
DL_PARAMS(GhmBwdParams, GHM_BWD_FIELDS)

// ---- regression.cu: p0..p7 are the loss's constants (`consts` in src/regression.rs); ew the
// weight of forward_weighted (ew_mode 0 none, 1 one per row of d elements, 2 one per element) ----
#define REG_FWD_FIELDS(X) \
    X(u64, x) X(u64, t) X(u64, out) X(u64, psum) X(u64, n) X(double, p0) X(double, p1) \
    X(double, p2) X(double, p3) X(double, p4) X(double, p5) X(double, p6) X(double, p7) \
    X(u64, ew) X(u64, d) X(int, ew_mode)
DL_PARAMS(RegFwdParams, REG_FWD_FIELDS)
#define REG_BWD_FIELDS(X) \
    X(u64, x) X(u64, t) X(u64, up) X(u64, g) X(u64, n) X(double, scale) X(double, p0) \
    X(double, p1) X(double, p2) X(double, p3) X(double, p4) X(double, p5) X(double, p6) \
    X(double, p7) X(u64, ew) X(u64, d) X(int, up_scalar) X(int, ew_mode)
DL_PARAMS(RegBwdParams, REG_BWD_FIELDS)

// ---- iou.cu: ew the weight of forward_weighted (ew_mode 0 none, 1 one per box pair) ----
#define BOX_FWD_FIELDS(X) \
    X(u64, p) X(u64, t) X(u64, out) X(u64, psum) X(u64, n) X(double, eps) X(u64, ew) \
    X(int, ew_mode)
DL_PARAMS(BoxFwdParams, BOX_FWD_FIELDS)
#define BOX_BWD_FIELDS(X) \
    X(u64, p) X(u64, t) X(u64, up) X(u64, g) X(u64, n) X(double, eps) X(double, scale) \
    X(u64, ew) X(int, up_scalar) X(int, ew_mode)
DL_PARAMS(BoxBwdParams, BOX_BWD_FIELDS)

// ---- dfl.cu: ew the weight of forward_weighted (ew_mode 0 none, 1 one per row) ----
#define DFL_FWD_FIELDS(X) \
    X(u64, x) X(u64, t) X(u64, out) X(u64, psum) X(u64, err) X(u64, n) X(u64, k) X(u64, ew) \
    X(int, ew_mode)
DL_PARAMS(DflFwdParams, DFL_FWD_FIELDS)
#define DFL_BWD_FIELDS(X) \
    X(u64, x) X(u64, t) X(u64, up) X(u64, g) X(u64, err) X(u64, n) X(u64, k) X(double, scale) \
    X(u64, ew) X(int, up_scalar) X(int, ew_mode)
DL_PARAMS(DflBwdParams, DFL_BWD_FIELDS)

// ---- ap_loss.cu ----
#define AP_COUNT_FIELDS(X) X(u64, tg) X(u64, cnt) X(u64, err) X(u64, n) X(u64, c)
DL_PARAMS(ApCountParams, AP_COUNT_FIELDS)
#define AP_COMPACT_FIELDS(X) \
    X(u64, x) X(u64, tg) X(u64, out) X(u64, next) X(u64, err) X(u64, n) X(u64, c) X(u64, cap)
DL_PARAMS(ApCompactParams, AP_COMPACT_FIELDS)
#define AP_BUCKET_FIELDS(X) \
    X(u64, x) X(u64, tg) X(u64, edges) X(u64, cnt) X(u64, hi) X(u64, lo) X(u64, nonfinite) \
    X(u64, err) X(u64, n) X(u64, c) X(u64, ne) X(double, center) X(double, scale) \
    X(int, use_smem)
DL_PARAMS(ApBucketParams, AP_BUCKET_FIELDS)
#define AP_UPDATE_FIELDS(X) \
    X(u64, x) X(u64, tg) X(u64, up) X(u64, pos) X(u64, pos_upd) X(u64, edges) X(u64, alpha) \
    X(u64, beta) X(u64, out) X(u64, err) X(u64, n) X(u64, c) X(u64, np) X(u64, ne) \
    X(double, center) X(int, nan)
DL_PARAMS(ApUpdateParams, AP_UPDATE_FIELDS)
