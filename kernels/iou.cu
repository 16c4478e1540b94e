// IoU-family box losses (IoU, GIoU, DIoU, CIoU) on paired [N, 4] boxes: forward (per pair or
// block-reduced partials) and hand-derived backward, one thread per box pair. Math mirrors
// box_pair in src/iou.rs (torchvision semantics; see the formula and conventions there).
#include "common.cuh"

#define KIND_IOU 0
#define KIND_GIOU 1
#define KIND_DIOU 2
#define KIND_CIOU 3

__device__ __forceinline__ float dl_atan(float x) { return atanf(x); }
__device__ __forceinline__ double dl_atan(double x) { return atan(x); }

template <typename A> __device__ __forceinline__ A mx(A a, A b) { return a > b ? a : b; }
template <typename A> __device__ __forceinline__ A mn(A a, A b) { return a < b ? a : b; }
// d max(a, b) / da as torch autograd takes it: 1 if a > b, 1/2 at a tie, else 0.
template <typename A> __device__ __forceinline__ A d_max(A a, A b) {
    return a > b ? (A)1 : (a == b ? (A)0.5 : (A)0);
}
// 1/d, 0 where d == 0 (NaN stays NaN).
template <typename A> __device__ __forceinline__ A recip(A d) { return d == (A)0 ? (A)0 : (A)1 / d; }
// a/b with a 0/0 (or inf/inf) of non-NaN inputs taken as 0; a NaN input stays NaN.
template <typename A> __device__ __forceinline__ A ratio(A a, A b) {
    A r = a / b;
    return (r != r && a == a && b == b) ? (A)0 : r;
}

// Loss of one pair; when GRAD, writes d(up * loss)/d pred to g[0..4].
template <typename A, int K, bool GRAD>
__device__ __forceinline__ A box_pair(A x1, A y1, A x2, A y2, A gx1, A gy1, A gx2, A gy2, A eps,
                                      A up, A* g) {
    const A one = (A)1, zero = (A)0, half = (A)0.5;
    // Intersection through torchvision's strict mask (iw > 0 && ih > 0), no clamp.
    A iw = mn(x2, gx2) - mx(x1, gx1);
    A ih = mn(y2, gy2) - mx(y1, gy1);
    bool mask = iw > zero && ih > zero;
    A inter = mask ? iw * ih : zero;
    A w = x2 - x1, h = y2 - y1, wg = gx2 - gx1, hg = gy2 - gy1;
    A uni = w * h + wg * hg - inter; // union, no eps (_loss_inter_union)
    A q = recip(uni + eps);          // 1/(U + eps)
    A iou = inter * q;
    A loss = one - iou;
    // dL/dI = -q(1 + IoU), dL/dA1 = IoU q (IoU = I/(A1 + A2 - I + eps), dL/dIoU = -1)
    A g_inter = -(q * (one + iou));
    A g_area = iou * q;
    A cw = mx(x2, gx2) - mn(x1, gx1); // enclosing box
    A ch = mx(y2, gy2) - mn(y1, gy1);
    A g_cw = zero, g_ch = zero, dx = zero, dy = zero, g_rho = zero, g_w = zero, g_h = zero;
    if (K == KIND_GIOU) {
        A c = cw * ch;
        A qc = recip(c + eps);
        A pen = (c - uni) * qc; // (C - U)/(C + eps)
        loss = one - (iou - pen);
        A g_c = qc * (one - pen); // dpen/dC; dpen/dU = -qc
        g_cw = g_c * ch;
        g_ch = g_c * cw;
        g_area = g_area - qc;
        g_inter = g_inter + qc;
    }
    if (K == KIND_DIOU || K == KIND_CIOU) {
        A qd = recip(cw * cw + ch * ch + eps); // 1/(c^2 + eps)
        dx = (x2 + x1) * half - (gx1 + gx2) * half;
        dy = (y2 + y1) * half - (gy1 + gy2) * half;
        A r = (dx * dx + dy * dy) * qd; // rho^2 / (c^2 + eps)
        loss = one - iou + r;
        g_rho = qd;
        A g_diag = -(r * qd);
        g_cw = (g_diag + g_diag) * cw;
        g_ch = (g_diag + g_diag) * ch;
    }
    if (K == KIND_CIOU) {
        const A v_coef = (A)0.405284734569351085775517852838911; // 4/pi^2
        A dt = dl_atan(ratio(wg, hg)) - dl_atan(ratio(w, h));
        A v = v_coef * dt * dt;
        A alpha = v * recip(one - iou + v + eps); // a constant for the gradient
        loss = loss + alpha * v;
        // d(alpha v)/dw = alpha * (-2 (4/pi^2) dt) * h/(w^2+h^2); d/dh: -w/(w^2+h^2)
        A gv = -(alpha * (v_coef + v_coef) * dt) * recip(w * w + h * h);
        g_w = gv * h;
        g_h = -(gv * w);
    }
    if (GRAD) {
        A gi = mask ? g_inter * up : zero;
        A ga = g_area * up, gcw = g_cw * up, gch = g_ch * up, gr = g_rho * up;
        A gw = g_w * up, gh = g_h * up;
        g[0] = -(ga * h) - gi * ih * d_max(x1, gx1) - gcw * d_max(gx1, x1) + gr * dx - gw;
        g[1] = -(ga * w) - gi * iw * d_max(y1, gy1) - gch * d_max(gy1, y1) + gr * dy - gh;
        g[2] = ga * h + gi * ih * d_max(gx2, x2) + gcw * d_max(x2, gx2) + gr * dx + gw;
        g[3] = ga * w + gi * iw * d_max(gy2, y2) + gch * d_max(y2, gy2) + gr * dy + gh;
    }
    return loss;
}

template <typename T, typename A, int K, bool GRAD>
__device__ __forceinline__ A pair_at(const T* p, const T* t, u64 i, A eps, A up, A* g) {
    const T* a = p + 4 * i;
    const T* b = t + 4 * i;
    return box_pair<A, K, GRAD>(to_acc(a[0]), to_acc(a[1]), to_acc(a[2]), to_acc(a[3]),
                                to_acc(b[0]), to_acc(b[1]), to_acc(b[2]), to_acc(b[3]), eps, up,
                                g);
}

template <typename T, typename A, int K>
__device__ void iou_fwd_none(const BoxFwdParams& q) {
    const T* p = dev_ptr<const T>(q.p);
    const T* t = dev_ptr<const T>(q.t);
    T* out = dev_ptr<T>(q.out);
    const A eps = (A)q.eps;
    GRID_STRIDE(i, q.n) {
        const A w = dl_weight<T, A>(q.ew, q.ew_mode, i, i); // 1 without a weight
        out[i] = from_acc<T>(w * pair_at<T, A, K, false>(p, t, i, eps, (A)1, nullptr));
    }
}

// Per-block partial sums in double (fixed grid for a given n, fixed shuffle tree: deterministic).
template <typename T, typename A, int K>
__device__ void iou_fwd_partial(const BoxFwdParams& q) {
    __shared__ double shm[32];
    const T* p = dev_ptr<const T>(q.p);
    const T* t = dev_ptr<const T>(q.t);
    const A eps = (A)q.eps;
    double s = 0;
    GRID_STRIDE(i, q.n) {
        const A w = dl_weight<T, A>(q.ew, q.ew_mode, i, i);
        s += (double)(w * pair_at<T, A, K, false>(p, t, i, eps, (A)1, nullptr));
    }
    s = block_sum<double>(s, shm);
    write_partials(q.psum, 0, s, 0);
}

// g[i, :] = (up_i * scale * w_i) * dL_i/dpred_i; a scalar upstream is folded as on the CPU.
template <typename T, typename A, int K>
__device__ void iou_bwd(const BoxBwdParams& q) {
    const T* p = dev_ptr<const T>(q.p);
    const T* t = dev_ptr<const T>(q.t);
    const T* up = dev_ptr<const T>(q.up);
    T* g = dev_ptr<T>(q.g);
    const A eps = (A)q.eps;
    const A coef = q.up_scalar ? (A)((double)to_acc(up[0]) * q.scale) : (A)1;
    GRID_STRIDE(i, q.n) {
        A u = (q.up_scalar ? coef : to_acc(up[i])) * dl_weight<T, A>(q.ew, q.ew_mode, i, i);
        A d[4];
        pair_at<T, A, K, true>(p, t, i, eps, u, d);
        T* gi = g + 4 * i;
        gi[0] = from_acc<T>(d[0]);
        gi[1] = from_acc<T>(d[1]);
        gi[2] = from_acc<T>(d[2]);
        gi[3] = from_acc<T>(d[3]);
    }
}

#define IOU_KERNELS(KNAME, K, DT, T, A)                                                          \
    DL_KERNEL(box_##KNAME##_fwd_none_##DT, BoxFwdParams, p) { iou_fwd_none<T, A, K>(p); }        \
    DL_KERNEL(box_##KNAME##_fwd_partial_##DT, BoxFwdParams, p) { iou_fwd_partial<T, A, K>(p); }  \
    DL_KERNEL(box_##KNAME##_bwd_##DT, BoxBwdParams, p) { iou_bwd<T, A, K>(p); }

#define IOU_DTYPE(DT, T, A)                                                                      \
    IOU_KERNELS(iou, KIND_IOU, DT, T, A)                                                         \
    IOU_KERNELS(giou, KIND_GIOU, DT, T, A)                                                       \
    IOU_KERNELS(diou, KIND_DIOU, DT, T, A)                                                       \
    IOU_KERNELS(ciou, KIND_CIOU, DT, T, A)

IOU_DTYPE(f32, float, float)
IOU_DTYPE(f64, double, double)
IOU_DTYPE(f16, __half, float)
IOU_DTYPE(bf16, __nv_bfloat16, float)

DL_MODULE(iou)
