//! The CUDA launch plans (feature `cuda`, and `cuda-emu` on the emulated backend).

use super::{consts, Kind, RegOp};
use crate::gpu::params::{RegBwdParams, RegFwdParams};
use crate::gpu::{self, BwdIn, DevFloat, ForwardPlan, FwdIn, Gpu, Launch, Out, Scale, REGRESSION};
use crate::reduction::Reduction;
use crate::weight;

fn prefix(op: &RegOp) -> &'static str {
    match op.kind {
        Kind::Smooth { .. } => "smooth_l1",
        Kind::Balanced { .. } => "balanced_l1",
    }
}

/// The elements per row of a per-row weight: the last dimension (1 for rank 0; never 0).
fn row_len(l: &candle_core::Layout) -> u64 {
    l.dims().last().map_or(1, |d| (*d).max(1) as u64)
}

/// The forward on backend `g`: per-element losses or the reduced scalar.
pub(super) fn forward<G: Gpu, T: DevFloat>(g: &G, op: &RegOp, a: FwdIn<'_, G>) -> Out<G> {
    let FwdIn { x, t, w } = a;
    let name = op.name();
    let n = x.l.shape().elem_count();
    let [p0, p1, p2, p3, p4, p5, p6, p7] = consts(op.kind);
    let p = RegFwdParams {
        x: g.input::<T>(name, x.s, x.l)?,
        t: g.input::<T>(name, t.s, t.l)?,
        n: n as u64,
        p0,
        p1,
        p2,
        p3,
        p4,
        p5,
        p6,
        p7,
        ew: weight::addr::<G, T>(g, name, w)?,
        d: row_len(x.l),
        ew_mode: weight::mode(w),
        ..Default::default()
    };
    let plan = ForwardPlan {
        module: &REGRESSION,
        prefix: prefix(op),
        suffix: gpu::dtype_suffix(name, T::DTYPE)?,
        items: n as u64,
        none_shape: x.l.shape().clone(),
        scale: (op.reduction != Reduction::None).then(|| Scale::host(op.reduction.scale(n as f64))),
    };
    plan.run::<G, T, _>(g, name, p)
}

/// The gradient on backend `g`.
pub(super) fn backward<G: Gpu, T: DevFloat>(g: &G, op: &RegOp, a: BwdIn<'_, G>) -> Out<G> {
    let BwdIn { x, t, up, w } = a;
    let name = op.name();
    let n = x.l.shape().elem_count();
    let scalar_up = op.reduction.is_scalar();
    gpu::check_upstream(name, up.l, scalar_up, n)?;
    let out = g.output::<T>(n)?;
    if n > 0 {
        let [p0, p1, p2, p3, p4, p5, p6, p7] = consts(op.kind);
        let p = RegBwdParams {
            x: g.input::<T>(name, x.s, x.l)?,
            t: g.input::<T>(name, t.s, t.l)?,
            up: g.input::<T>(name, up.s, up.l)?,
            g: g.out_addr(&out),
            n: n as u64,
            scale: op.reduction.scale(n as f64),
            p0,
            p1,
            p2,
            p3,
            p4,
            p5,
            p6,
            p7,
            ew: weight::addr::<G, T>(g, name, w)?,
            d: row_len(x.l),
            up_scalar: scalar_up as i32,
            ew_mode: weight::mode(w),
        };
        let dt = gpu::dtype_suffix(name, T::DTYPE)?;
        let kernel = format!("{}_bwd_{dt}", prefix(op));
        g.launch(&REGRESSION, &kernel, Launch::elems(n as u64), &p)?;
    }
    Ok((g.storage(out), x.l.shape().clone()))
}
