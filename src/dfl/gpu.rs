//! The CUDA launch plans (feature `cuda`, and `cuda-emu` on the emulated backend): one warp per
//! row for the loss and `∂loss/∂x` (`ForwardPlan` over `32·N` threads), one thread per row for
//! `∂loss/∂y`.

use super::{DflOp, NAME};
use crate::check::layout_dims2;
use crate::gpu::params::{DflBwdParams, DflFwdParams};
use crate::gpu::{self, BwdIn, DevFloat, ErrorFlag, ForwardPlan, FwdIn, Gpu, In, KernelError};
use crate::gpu::{Launch, Out, Scale, DFL};
use crate::weight::{self, Weight};
use candle_core::{Result, Shape};

/// Threads per row of the warp-per-row kernels.
const WARP: u64 = 32;

/// The message of a kernel error: a target outside `[0, K-1]` (or NaN).
fn message(e: KernelError, k: usize) -> String {
    format!(
        "{NAME}: target {} at [{}] is outside [0, {}] (K = {k} bins)",
        e.value(),
        e.a,
        k - 1
    )
}

/// The forward on backend `g`: per-row losses or the reduced scalar.
pub(super) fn forward<G: Gpu, T: DevFloat>(g: &G, op: &DflOp, a: FwdIn<'_, G>) -> Out<G> {
    let FwdIn { x, t, w } = a;
    let (n, k) = layout_dims2(NAME, x.l)?;
    let err = ErrorFlag::new(g)?;
    let p = DflFwdParams {
        x: g.input::<T>(NAME, x.s, x.l)?,
        t: g.input::<T>(NAME, t.s, t.l)?,
        err: err.addr(g),
        n: n as u64,
        k: k as u64,
        ew: weight::addr::<G, T>(g, NAME, w)?,
        ew_mode: weight::mode(w),
        ..Default::default()
    };
    let plan = ForwardPlan {
        module: &DFL,
        prefix: "dfl",
        suffix: gpu::dtype_suffix(NAME, T::DTYPE)?,
        items: n as u64 * WARP,
        none_shape: Shape::from(n),
        // Mean = sum / N: known on the host.
        scale: op
            .reduction
            .is_scalar()
            .then(|| Scale::host(op.reduction.scale(n as f64))),
    };
    let res = plan.run::<G, T, _>(g, NAME, p)?;
    err.check(g, |e| message(e, k))?;
    Ok(res)
}

/// The parameters of both backward kernels, writing into `out`.
fn bwd_params<G: Gpu, T: DevFloat>(
    g: &G,
    op: &DflOp,
    [x, t, up]: [&In<'_, G>; 3],
    w: Option<&Weight>,
    out: u64,
    err: &ErrorFlag<G>,
) -> Result<DflBwdParams> {
    let (n, k) = layout_dims2(NAME, x.l)?;
    let scalar_up = op.reduction.is_scalar();
    gpu::check_upstream(NAME, up.l, scalar_up, n)?;
    Ok(DflBwdParams {
        x: g.input::<T>(NAME, x.s, x.l)?,
        t: g.input::<T>(NAME, t.s, t.l)?,
        up: g.input::<T>(NAME, up.s, up.l)?,
        g: out,
        err: err.addr(g),
        n: n as u64,
        k: k as u64,
        scale: op.reduction.scale(n as f64),
        ew: weight::addr::<G, T>(g, NAME, w)?,
        up_scalar: scalar_up as i32,
        ew_mode: weight::mode(w),
    })
}

/// `∂loss/∂x` `[N, K]` on backend `g`.
pub(super) fn backward<G: Gpu, T: DevFloat>(g: &G, op: &DflOp, a: BwdIn<'_, G>) -> Out<G> {
    let BwdIn { x, t, up, w } = a;
    let (n, k) = layout_dims2(NAME, x.l)?;
    let err = ErrorFlag::new(g)?;
    let out = g.output::<T>(n * k)?;
    let p = bwd_params::<G, T>(g, op, [&x, &t, &up], w, g.out_addr(&out), &err)?;
    if n > 0 {
        let kernel = format!("dfl_bwd_{}", gpu::dtype_suffix(NAME, T::DTYPE)?);
        g.launch(&DFL, &kernel, Launch::elems(n as u64 * WARP), &p)?;
    }
    err.check(g, |e| message(e, k))?;
    Ok((g.storage(out), Shape::from((n, k))))
}

/// `∂loss/∂y` `[N]` on backend `g`.
pub(super) fn target_backward<G: Gpu, T: DevFloat>(g: &G, op: &DflOp, a: BwdIn<'_, G>) -> Out<G> {
    let BwdIn { x, t, up, w } = a;
    let (n, k) = layout_dims2(NAME, x.l)?;
    let err = ErrorFlag::new(g)?;
    let out = g.output::<T>(n)?;
    let p = bwd_params::<G, T>(g, op, [&x, &t, &up], w, g.out_addr(&out), &err)?;
    if n > 0 {
        let kernel = format!("dfl_bwd_target_{}", gpu::dtype_suffix(NAME, T::DTYPE)?);
        g.launch(&DFL, &kernel, Launch::elems(n as u64), &p)?;
    }
    err.check(g, |e| message(e, k))?;
    Ok((g.storage(out), Shape::from(n)))
}
