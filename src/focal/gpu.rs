//! The CUDA launch plans (feature `cuda`, and `cuda-emu` on the emulated backend).

use super::{FocalOp, NAME};
use crate::check::layout_dims2;
use crate::gpu::params::{FocalBwdParams, FocalFwdParams, RowCountParams};
use crate::gpu::{
    self, BwdIn, DevFloat, ErrorFlag, ForwardPlan, FwdIn, Gpu, Launch, Out, Partials, Scale, FOCAL,
};
use crate::reduction::Reduction;
use crate::targets::TargetKind;
use crate::weight;
use candle_core::{Result, Shape};

/// The forward on backend `g`: per-element losses or the reduced scalar.
pub(super) fn forward<G: Gpu, T: DevFloat>(g: &G, op: &FocalOp, a: FwdIn<'_, G>) -> Out<G> {
    let FwdIn { x, t: tg, w: ew } = a;
    let (n, c) = layout_dims2(NAME, x.l)?;
    let sfx = format!(
        "{}_{}",
        gpu::dtype_suffix(NAME, T::DTYPE)?,
        gpu::target_suffix(op.kind)
    );
    let err = ErrorFlag::new(g)?;
    let p = FocalFwdParams {
        x: g.input::<T>(NAME, x.s, x.l)?,
        tg: gpu::targets_addr::<G, T>(g, NAME, op.kind, tg.s, tg.l)?,
        w: g.tensor::<T::A>(NAME, &op.weights)?,
        err: err.addr(g),
        n: n as u64,
        c: c as u64,
        alpha: op.alpha.unwrap_or(1.0),
        gamma: op.gamma,
        has_alpha: op.alpha.is_some() as i32,
        ew: weight::addr::<G, T>(g, NAME, ew)?,
        ew_mode: weight::mode(ew),
        ..Default::default()
    };
    let plan = ForwardPlan {
        module: &FOCAL,
        prefix: "sigmoid_focal",
        suffix: &sfx,
        items: (n * c) as u64,
        none_shape: Shape::from((n, c)),
        // Mean: sum / (non-ignored rows × C), the rows counted per block at column 0.
        scale: match op.reduction {
            Reduction::None => None,
            Reduction::Mean => Some(Scale::device(c as f64)),
            r => Some(Scale::host(r.scale(0.0))),
        },
    };
    let out = plan.run::<G, T, _>(g, NAME, p)?;
    err.check_labels(g, NAME, c)?;
    Ok(out)
}

/// The scale of a `Mean` over labels, `1 / (non-ignored rows × C)`, into `scale_buf`: the rows of
/// the labels at `tg` counted on the device (`sigmoid_focal_count_*`; the quality losses share
/// the label convention and this kernel).
pub(crate) fn count_rows_scale<G: Gpu, T: DevFloat>(
    g: &G,
    name: &str,
    kind: TargetKind,
    tg: u64,
    err: &ErrorFlag<G>,
    (n, c): (usize, usize),
    scale_buf: &G::Words,
) -> Result<()> {
    let parts = Partials::new(g, n as u64)?;
    let p = RowCountParams {
        tg,
        pden: g.words_addr(&parts.pden),
        err: err.addr(g),
        n: n as u64,
        c: c as u64,
    };
    let kname = format!("sigmoid_focal_count_{}", gpu::target_suffix(kind));
    g.launch(&FOCAL, &kname, parts.cfg, &p)?;
    gpu::finalize::<G, T>(g, name, &parts, Scale::device(c as f64), Some(scale_buf))?;
    Ok(())
}

/// The gradient on backend `g`.
pub(super) fn backward<G: Gpu, T: DevFloat>(g: &G, op: &FocalOp, a: BwdIn<'_, G>) -> Out<G> {
    let BwdIn {
        x,
        t: tg,
        up,
        w: ew,
    } = a;
    let (n, c) = layout_dims2(NAME, x.l)?;
    let scalar_up = op.reduction.is_scalar();
    gpu::check_upstream(NAME, up.l, scalar_up, n * c)?;
    let sfx = format!(
        "{}_{}",
        gpu::dtype_suffix(NAME, T::DTYPE)?,
        gpu::target_suffix(op.kind)
    );
    let total = (n * c) as u64;
    let err = ErrorFlag::new(g)?;
    let out = g.output::<T>(n * c)?;
    let tg_addr = gpu::targets_addr::<G, T>(g, NAME, op.kind, tg.s, tg.l)?;
    // Mean over labels divides by the number of non-ignored rows, counted on the device.
    let count_rows = op.reduction == Reduction::Mean && op.kind != TargetKind::Dense;
    let scale_buf = g.words(1)?;
    if total > 0 {
        if count_rows {
            count_rows_scale::<G, T>(g, NAME, op.kind, tg_addr, &err, (n, c), &scale_buf)?;
        }
        let p = FocalBwdParams {
            x: g.input::<T>(NAME, x.s, x.l)?,
            tg: tg_addr,
            w: g.tensor::<T::A>(NAME, &op.weights)?,
            up: g.input::<T>(NAME, up.s, up.l)?,
            g: g.out_addr(&out),
            scale_p: if count_rows {
                g.words_addr(&scale_buf)
            } else {
                0
            },
            err: err.addr(g),
            n: n as u64,
            c: c as u64,
            alpha: op.alpha.unwrap_or(1.0),
            gamma: op.gamma,
            scale: match op.reduction {
                Reduction::Mean => op.reduction.scale(total as f64), // dense: N·C
                r => r.scale(0.0),
            },
            has_alpha: op.alpha.is_some() as i32,
            up_scalar: scalar_up as i32,
            ew: weight::addr::<G, T>(g, NAME, ew)?,
            ew_mode: weight::mode(ew),
        };
        g.launch(
            &FOCAL,
            &format!("sigmoid_focal_bwd_{sfx}"),
            Launch::elems(total),
            &p,
        )?;
    }
    err.check_labels(g, NAME, c)?;
    Ok((g.storage(out), Shape::from((n, c))))
}

/// `∂loss/∂targets` of dense targets on backend `g` (`sigmoid_focal_tbwd_<dtype>`).
pub(super) fn target_backward<G: Gpu, T: DevFloat>(g: &G, op: &FocalOp, a: BwdIn<'_, G>) -> Out<G> {
    let BwdIn { x, t, up, w: ew } = a;
    let (n, c) = layout_dims2(NAME, x.l)?;
    let scalar_up = op.reduction.is_scalar();
    gpu::check_upstream(NAME, up.l, scalar_up, n * c)?;
    let total = (n * c) as u64;
    let out = g.output::<T>(n * c)?;
    if total > 0 {
        let p = FocalBwdParams {
            x: g.input::<T>(NAME, x.s, x.l)?,
            tg: g.input::<T>(NAME, t.s, t.l)?,
            up: g.input::<T>(NAME, up.s, up.l)?,
            g: g.out_addr(&out),
            n: n as u64,
            c: c as u64,
            alpha: op.alpha.unwrap_or(1.0),
            gamma: op.gamma,
            // Dense targets: Mean divides by N·C.
            scale: op.reduction.scale(total as f64),
            has_alpha: op.alpha.is_some() as i32,
            up_scalar: scalar_up as i32,
            ew: weight::addr::<G, T>(g, NAME, ew)?,
            ew_mode: weight::mode(ew),
            ..Default::default()
        };
        let kernel = format!("sigmoid_focal_tbwd_{}", gpu::dtype_suffix(NAME, T::DTYPE)?);
        g.launch(&FOCAL, &kernel, Launch::elems(total), &p)?;
    }
    Ok((g.storage(out), Shape::from((n, c))))
}
