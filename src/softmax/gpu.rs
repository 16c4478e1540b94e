//! The CUDA launch plans (feature `cuda`, and `cuda-emu` on the emulated backend).

use super::{Kind, SoftmaxOp};
use crate::check::layout_dims2;
use crate::gpu::params::{SoftmaxBwdParams, SoftmaxDenParams, SoftmaxFwdParams};
use crate::gpu::params::{SoftmaxProbBwdParams, SoftmaxProbFwdParams};
use crate::gpu::{
    self, BwdIn, DevFloat, ErrorFlag, FwdIn, Gpu, In, Launch, Out, Partials, Scale, SOFTMAX,
};
use crate::reduction::Reduction;
use crate::weight;
use candle_core::{Result, Shape};

/// Rows of at most this many classes get one warp each; longer rows one block each.
const WARP_MAX_K: usize = 1024;

/// Launch shape: `(config, warp-per-row)`, at most `MAX_PARTIAL_BLOCKS` blocks (grid-stride
/// over rows), so the per-block partials fit the finalize kernel.
fn row_grid(n: usize, k: usize) -> (Launch, bool) {
    let warp = k <= WARP_MAX_K;
    let rows_per_block = if warp { (gpu::BLOCK / 32) as u64 } else { 1 };
    let groups = (n as u64).div_ceil(rows_per_block);
    // Launch::partials puts one thread per item: ask for one block per group.
    let cfg = Launch::partials(groups * gpu::BLOCK as u64);
    (cfg, warp)
}

/// `(focal, a, c, gamma)` of the kernels' `P<A>`.
fn hyper(op: &SoftmaxOp, k: usize) -> (i32, f64, f64, f64) {
    match op.kind {
        Kind::Ce { eps } => (0, 1.0 - eps, eps / k as f64, 0.0),
        Kind::Focal { alpha, gamma } => (1, alpha, 0.0, gamma),
    }
}

/// The addresses of what every softmax kernel reads: labels, weights, their sum, has_w.
struct Common {
    lab: u64,
    w: u64,
    wsum: u64,
    has_w: i32,
}

fn common<G: Gpu, A: crate::gpu::DevElem>(
    g: &G,
    op: &SoftmaxOp,
    lab: &In<'_, G>,
) -> Result<Common> {
    let lab = gpu::targets_addr::<G, A>(g, op.name, op.labels, lab.s, lab.l)?;
    Ok(match &op.weights {
        None => Common {
            lab,
            w: 0,
            wsum: 0,
            has_w: 0,
        },
        Some((w, ws)) => Common {
            lab,
            w: g.tensor::<A>(op.name, w)?,
            wsum: g.tensor::<A>(op.name, ws)?,
            has_w: 1,
        },
    })
}

fn suffix<T: candle_core::WithDType>(op: &SoftmaxOp, warp: bool) -> Result<String> {
    Ok(format!(
        "{}_{}_s{}_{}",
        gpu::dtype_suffix(op.name, T::DTYPE)?,
        gpu::target_suffix(op.labels),
        op.smooth() as u8,
        if warp { "warp" } else { "block" }
    ))
}

/// The forward on backend `g`: per-row losses or the reduced scalar.
pub(super) fn forward<G: Gpu, T: DevFloat>(g: &G, op: &SoftmaxOp, a: FwdIn<'_, G>) -> Out<G> {
    if op.probs() {
        return prob_forward::<G, T>(g, op, a);
    }
    let FwdIn { x, t: lab, w: ew } = a;
    let name = op.name;
    let (n, k) = layout_dims2(name, x.l)?;
    let (cfg, warp) = row_grid(n, k);
    let (focal, a, c, gamma) = hyper(op, k);
    let none = op.reduction == Reduction::None;
    let cm = common::<G, T::A>(g, op, &lab)?;
    let err = ErrorFlag::new(g)?;
    // The partials are sized for the launch: one per block.
    let parts = Partials::new(g, cfg.grid as u64 * gpu::BLOCK as u64)?;
    let out = g.output::<T>(if none { n } else { 1 })?;
    let p = SoftmaxFwdParams {
        x: g.input::<T>(name, x.s, x.l)?,
        lab: cm.lab,
        w: cm.w,
        wsum: cm.wsum,
        out: if none { g.out_addr(&out) } else { 0 },
        psum: g.words_addr(&parts.psum),
        pden: g.words_addr(&parts.pden),
        err: err.addr(g),
        n: n as u64,
        k: k as u64,
        a,
        c,
        gamma,
        has_w: cm.has_w,
        focal,
        none: none as i32,
        ew: weight::addr::<G, T>(g, name, ew)?,
        ew_mode: weight::mode(ew),
    };
    if n > 0 {
        let kernel = format!("softmax_fwd_{}", suffix::<T>(op, warp)?);
        g.launch(&SOFTMAX, &kernel, cfg, &p)?;
    }
    let (out, shape) = if none {
        (out, Shape::from(n))
    } else {
        // Mean: Σ w·l / Σ w over the non-ignored rows, both summed per block.
        let scale = match op.reduction {
            Reduction::Mean => Scale::device(1.0),
            r => Scale::host(r.scale(0.0)),
        };
        (
            gpu::finalize::<G, T>(g, name, &parts, scale, None)?,
            Shape::from(()),
        )
    };
    err.check_labels(g, name, k - 1)?;
    Ok((g.storage(out), shape))
}

/// The gradient on backend `g`.
pub(super) fn backward<G: Gpu, T: DevFloat>(g: &G, op: &SoftmaxOp, a: BwdIn<'_, G>) -> Out<G> {
    if op.probs() {
        return prob_backward::<G, T>(g, op, a, false);
    }
    let BwdIn {
        x,
        t: lab,
        up,
        w: ew,
    } = a;
    let name = op.name;
    let (n, k) = layout_dims2(name, x.l)?;
    let scalar_up = op.reduction.is_scalar();
    gpu::check_upstream(name, up.l, scalar_up, n)?;
    let (cfg, warp) = row_grid(n, k);
    let (focal, a, c, gamma) = hyper(op, k);
    let cm = common::<G, T::A>(g, op, &lab)?;
    let err = ErrorFlag::new(g)?;
    let out = g.output::<T>(n * k)?;
    if n > 0 {
        // Mean: the scale 1 / Σ w_label is computed on the device (no host round trip).
        let mean = op.reduction == Reduction::Mean;
        let scale_buf = g.words(1)?;
        if mean {
            let parts = Partials::new(g, n as u64)?;
            let p = SoftmaxDenParams {
                lab: cm.lab,
                w: cm.w,
                pden: g.words_addr(&parts.pden),
                err: err.addr(g),
                n: n as u64,
                k: k as u64,
                has_w: cm.has_w,
            };
            let dt = gpu::dtype_suffix(name, T::DTYPE)?;
            let kernel = format!("softmax_den_{dt}_{}", gpu::target_suffix(op.labels));
            g.launch(&SOFTMAX, &kernel, parts.cfg, &p)?;
            gpu::finalize::<G, T>(g, name, &parts, Scale::device(1.0), Some(&scale_buf))?;
        }
        let p = SoftmaxBwdParams {
            x: g.input::<T>(name, x.s, x.l)?,
            lab: cm.lab,
            w: cm.w,
            wsum: cm.wsum,
            up: g.input::<T>(name, up.s, up.l)?,
            g: g.out_addr(&out),
            scale_p: if mean { g.words_addr(&scale_buf) } else { 0 },
            err: err.addr(g),
            n: n as u64,
            k: k as u64,
            a,
            c,
            gamma,
            scale: op.reduction.scale(0.0),
            has_w: cm.has_w,
            focal,
            up_scalar: scalar_up as i32,
            ew: weight::addr::<G, T>(g, name, ew)?,
            ew_mode: weight::mode(ew),
        };
        let kernel = format!("softmax_bwd_{}", suffix::<T>(op, warp)?);
        g.launch(&SOFTMAX, &kernel, cfg, &p)?;
    }
    err.check_labels(g, name, k - 1)?;
    Ok((g.storage(out), Shape::from((n, k))))
}

/// The class weights' address and flag (`0, 0` without them).
fn class_weights<G: Gpu, A: crate::gpu::DevElem>(g: &G, op: &SoftmaxOp) -> Result<(u64, i32)> {
    Ok(match &op.weights {
        None => (0, 0),
        Some((w, _)) => (g.tensor::<A>(op.name, w)?, 1),
    })
}

fn prob_suffix<T: candle_core::WithDType>(op: &SoftmaxOp, warp: bool) -> Result<String> {
    Ok(format!(
        "{}_{}",
        gpu::dtype_suffix(op.name, T::DTYPE)?,
        if warp { "warp" } else { "block" }
    ))
}

/// The forward with class-probability targets: row losses, or the scalar (`Mean` = sum / N).
fn prob_forward<G: Gpu, T: DevFloat>(g: &G, op: &SoftmaxOp, a: FwdIn<'_, G>) -> Out<G> {
    let FwdIn { x, t: tg, w: ew } = a;
    let name = op.name;
    let (n, k) = layout_dims2(name, x.l)?;
    let (cfg, warp) = row_grid(n, k);
    let (_, a, c, _) = hyper(op, k);
    let none = op.reduction == Reduction::None;
    let (w, has_w) = class_weights::<G, T::A>(g, op)?;
    let parts = Partials::new(g, cfg.grid as u64 * gpu::BLOCK as u64)?;
    let out = g.output::<T>(if none { n } else { 1 })?;
    let p = SoftmaxProbFwdParams {
        x: g.input::<T>(name, x.s, x.l)?,
        tg: g.input::<T>(name, tg.s, tg.l)?,
        w,
        ew: weight::addr::<G, T>(g, name, ew)?,
        out: if none { g.out_addr(&out) } else { 0 },
        psum: g.words_addr(&parts.psum),
        n: n as u64,
        k: k as u64,
        a,
        c,
        has_w,
        ew_mode: weight::mode(ew),
        none: none as i32,
    };
    if n > 0 {
        let kernel = format!("softmax_prob_fwd_{}", prob_suffix::<T>(op, warp)?);
        g.launch(&SOFTMAX, &kernel, cfg, &p)?;
    }
    if none {
        return Ok((g.storage(out), Shape::from(n)));
    }
    let scale = Scale::host(op.reduction.scale(n as f64));
    let out = gpu::finalize::<G, T>(g, name, &parts, scale, None)?;
    Ok((g.storage(out), Shape::from(())))
}

/// The gradient with class-probability targets: to the logits, or (`wrt_t`) to the targets.
fn prob_backward<G: Gpu, T: DevFloat>(
    g: &G,
    op: &SoftmaxOp,
    a: BwdIn<'_, G>,
    wrt_t: bool,
) -> Out<G> {
    let BwdIn {
        x,
        t: tg,
        up,
        w: ew,
    } = a;
    let name = op.name;
    let (n, k) = layout_dims2(name, x.l)?;
    let scalar_up = op.reduction.is_scalar();
    gpu::check_upstream(name, up.l, scalar_up, n)?;
    let (cfg, warp) = row_grid(n, k);
    let (_, a, c, _) = hyper(op, k);
    let (w, has_w) = class_weights::<G, T::A>(g, op)?;
    let out = g.output::<T>(n * k)?;
    if n > 0 {
        let p = SoftmaxProbBwdParams {
            x: g.input::<T>(name, x.s, x.l)?,
            tg: g.input::<T>(name, tg.s, tg.l)?,
            w,
            ew: weight::addr::<G, T>(g, name, ew)?,
            up: g.input::<T>(name, up.s, up.l)?,
            g: g.out_addr(&out),
            n: n as u64,
            k: k as u64,
            a,
            c,
            scale: op.reduction.scale(n as f64),
            has_w,
            ew_mode: weight::mode(ew),
            up_scalar: scalar_up as i32,
            wrt_t: wrt_t as i32,
        };
        let kernel = format!("softmax_prob_bwd_{}", prob_suffix::<T>(op, warp)?);
        g.launch(&SOFTMAX, &kernel, cfg, &p)?;
    }
    Ok((g.storage(out), Shape::from((n, k))))
}

/// The gradient to class-probability targets on backend `g`.
pub(super) fn target_backward<G: Gpu, T: DevFloat>(
    g: &G,
    op: &SoftmaxOp,
    a: BwdIn<'_, G>,
) -> Out<G> {
    prob_backward::<G, T>(g, op, a, true)
}
