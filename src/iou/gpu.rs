//! The CUDA launch plans (feature `cuda`, and `cuda-emu` on the emulated backend).

use super::{IouKind, IouOp, NAME};
use crate::gpu::params::{BoxBwdParams, BoxFwdParams};
use crate::gpu::{self, BwdIn, DevFloat, ForwardPlan, FwdIn, Gpu, Launch, Out, Scale, IOU};
use crate::reduction::Reduction;
use crate::weight;
use candle_core::Shape;

fn prefix(k: IouKind) -> &'static str {
    match k {
        IouKind::Iou => "box_iou",
        IouKind::Giou => "box_giou",
        IouKind::Diou => "box_diou",
        IouKind::Ciou => "box_ciou",
    }
}

/// The forward on backend `g`: per-element losses or the reduced scalar.
pub(super) fn forward<G: Gpu, T: DevFloat>(g: &G, op: &IouOp, a: FwdIn<'_, G>) -> Out<G> {
    let FwdIn { x, t, w } = a;
    let n = x.l.shape().elem_count() / 4;
    let p = BoxFwdParams {
        p: g.input::<T>(NAME, x.s, x.l)?,
        t: g.input::<T>(NAME, t.s, t.l)?,
        n: n as u64,
        eps: op.eps,
        ew: weight::addr::<G, T>(g, NAME, w)?,
        ew_mode: weight::mode(w),
        ..Default::default()
    };
    let plan = ForwardPlan {
        module: &IOU,
        prefix: prefix(op.kind),
        suffix: gpu::dtype_suffix(NAME, T::DTYPE)?,
        items: n as u64,
        none_shape: Shape::from(n),
        scale: (op.reduction != Reduction::None).then(|| Scale::host(op.reduction.scale(n as f64))),
    };
    plan.run::<G, T, _>(g, NAME, p)
}

/// The gradient on backend `g`.
pub(super) fn backward<G: Gpu, T: DevFloat>(g: &G, op: &IouOp, a: BwdIn<'_, G>) -> Out<G> {
    let BwdIn { x, t, up, w } = a;
    let n = x.l.shape().elem_count() / 4;
    let scalar_up = op.reduction.is_scalar();
    gpu::check_upstream(NAME, up.l, scalar_up, n)?;
    let out = g.output::<T>(n * 4)?;
    if n > 0 {
        let p = BoxBwdParams {
            p: g.input::<T>(NAME, x.s, x.l)?,
            t: g.input::<T>(NAME, t.s, t.l)?,
            up: g.input::<T>(NAME, up.s, up.l)?,
            g: g.out_addr(&out),
            n: n as u64,
            eps: op.eps,
            scale: op.reduction.scale(n as f64),
            ew: weight::addr::<G, T>(g, NAME, w)?,
            up_scalar: scalar_up as i32,
            ew_mode: weight::mode(w),
        };
        let dt = gpu::dtype_suffix(NAME, T::DTYPE)?;
        let kernel = format!("{}_bwd_{dt}", prefix(op.kind));
        g.launch(&IOU, &kernel, Launch::elems(n as u64), &p)?;
    }
    Ok((g.storage(out), x.l.shape().clone()))
}
