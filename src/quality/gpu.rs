//! The CUDA launch plans (feature `cuda`, and `cuda-emu` on the emulated backend).

use super::{Form, QualityOp};
use crate::check::layout_dims2;
use crate::focal::gpu::count_rows_scale;
use crate::gpu::params::{QualityBwdParams, QualityFwdParams};
use crate::gpu::{self, BwdIn, DevFloat, ErrorFlag, ForwardPlan, FwdIn, Gpu, KernelError, Launch};
use crate::gpu::{Out, Scale, QUALITY};
use crate::reduction::Reduction;
use crate::targets::TargetKind;
use crate::weight;
use candle_core::{Result, Shape};

/// The kernel-name suffix (`{dtype}_{dense|u32|i64}`), the address of the labels (0 for
/// dense targets) and the hyper-parameters `(beta, k, vfl, iou)`.
struct Common {
    sfx: String,
    lab: u64,
    kind: TargetKind,
    beta: f64,
    k: f64,
    vfl: i32,
    iou: i32,
}

fn common<G: Gpu, T: DevFloat>(g: &G, op: &QualityOp) -> Result<Common> {
    let name = op.name();
    let (lab, kind) = match &op.labels {
        None => (0, TargetKind::Dense),
        Some((l, TargetKind::LabelsU32)) => (g.tensor::<u32>(name, l)?, TargetKind::LabelsU32),
        Some((l, k)) => (g.tensor::<i64>(name, l)?, *k),
    };
    let (beta, k, vfl, iou) = match op.form {
        Form::Qfl { beta } => (beta, 1.0, 0, 0),
        Form::Vfl {
            alpha,
            gamma,
            iou_weighted,
        } => (gamma, alpha, 1, iou_weighted as i32),
    };
    Ok(Common {
        sfx: format!(
            "{}_{}",
            gpu::dtype_suffix(name, T::DTYPE)?,
            gpu::target_suffix(kind)
        ),
        lab,
        kind,
        beta,
        k,
        vfl,
        iou,
    })
}

/// The message of an error a kernel raised: a bad label, or a target / score outside [0, 1].
fn message(op: &QualityOp, c: usize, e: KernelError) -> String {
    let name = op.name();
    match (e.code, &op.labels) {
        (gpu::ERR_TARGET, None) => {
            let (i, j) = (e.a as usize / c.max(1), e.a as usize % c.max(1));
            format!(
                "{name}: target {} at [{i}, {j}] is outside [0, 1]",
                e.value()
            )
        }
        (gpu::ERR_TARGET, Some(_)) => {
            format!("{name}: score {} at [{}] is outside [0, 1]", e.value(), e.a)
        }
        _ => e.label(name, c),
    }
}

/// The forward on backend `g`: per-element losses or the reduced scalar.
pub(super) fn forward<G: Gpu, T: DevFloat>(g: &G, op: &QualityOp, a: FwdIn<'_, G>) -> Out<G> {
    let FwdIn { x, t: tg, w: ew } = a;
    let name = op.name();
    let (n, c) = layout_dims2(name, x.l)?;
    let cm = common::<G, T>(g, op)?;
    let err = ErrorFlag::new(g)?;
    let p = QualityFwdParams {
        x: g.input::<T>(name, x.s, x.l)?,
        tg: g.input::<T>(name, tg.s, tg.l)?,
        lab: cm.lab,
        err: err.addr(g),
        n: n as u64,
        c: c as u64,
        beta: cm.beta,
        k: cm.k,
        vfl: cm.vfl,
        iou: cm.iou,
        ew: weight::addr::<G, T>(g, name, ew)?,
        ew_mode: weight::mode(ew),
        ..Default::default()
    };
    let plan = ForwardPlan {
        module: &QUALITY,
        prefix: "quality",
        suffix: &cm.sfx,
        items: (n * c) as u64,
        none_shape: Shape::from((n, c)),
        // Mean: sum / (non-ignored rows × C), the rows counted per block at column 0.
        scale: match op.reduction {
            Reduction::None => None,
            Reduction::Mean => Some(Scale::device(c as f64)),
            r => Some(Scale::host(r.scale(0.0))),
        },
    };
    let out = plan.run::<G, T, _>(g, name, p)?;
    err.check(g, |e| message(op, c, e))?;
    Ok(out)
}

/// `∂loss/∂logits` on backend `g`.
pub(super) fn backward<G: Gpu, T: DevFloat>(g: &G, op: &QualityOp, a: BwdIn<'_, G>) -> Out<G> {
    launch_backward::<G, T>(g, op, a, false)
}

/// `∂loss/∂targets` (`[N, C]`) or `∂loss/∂scores` (`[N]`) on backend `g`.
pub(super) fn target_backward<G: Gpu, T: DevFloat>(
    g: &G,
    op: &QualityOp,
    a: BwdIn<'_, G>,
) -> Out<G> {
    launch_backward::<G, T>(g, op, a, true)
}

/// `quality_bwd_*` (`wrt_targets` false) or `quality_tbwd_*`.
fn launch_backward<G: Gpu, T: DevFloat>(
    g: &G,
    op: &QualityOp,
    a: BwdIn<'_, G>,
    wrt_targets: bool,
) -> Out<G> {
    let BwdIn {
        x,
        t: tg,
        up,
        w: ew,
    } = a;
    let name = op.name();
    let (n, c) = layout_dims2(name, x.l)?;
    let scalar_up = op.reduction.is_scalar();
    gpu::check_upstream(name, up.l, scalar_up, n * c)?;
    let cm = common::<G, T>(g, op)?;
    let scores = wrt_targets && cm.kind != TargetKind::Dense;
    let (len, shape) = if scores {
        (n, Shape::from(n))
    } else {
        (n * c, Shape::from((n, c)))
    };
    let err = ErrorFlag::new(g)?;
    let out = g.output::<T>(len)?;
    // Mean over labels divides by the number of non-ignored rows, counted on the device.
    let count_rows = op.reduction == Reduction::Mean && cm.kind != TargetKind::Dense;
    let scale_buf = g.words(1)?;
    if n * c > 0 {
        if count_rows {
            count_rows_scale::<G, T>(g, name, cm.kind, cm.lab, &err, (n, c), &scale_buf)?;
        }
        let p = QualityBwdParams {
            x: g.input::<T>(name, x.s, x.l)?,
            tg: g.input::<T>(name, tg.s, tg.l)?,
            lab: cm.lab,
            up: g.input::<T>(name, up.s, up.l)?,
            g: g.out_addr(&out),
            scale_p: if count_rows {
                g.words_addr(&scale_buf)
            } else {
                0
            },
            err: err.addr(g),
            n: n as u64,
            c: c as u64,
            beta: cm.beta,
            k: cm.k,
            scale: match op.reduction {
                Reduction::Mean => op.reduction.scale((n * c) as f64), // dense: N·C
                r => r.scale(0.0),
            },
            vfl: cm.vfl,
            iou: cm.iou,
            up_scalar: scalar_up as i32,
            ew: weight::addr::<G, T>(g, name, ew)?,
            ew_mode: weight::mode(ew),
        };
        let kname = format!(
            "quality_{}_{}",
            if wrt_targets { "tbwd" } else { "bwd" },
            cm.sfx
        );
        g.launch(&QUALITY, &kname, Launch::elems(len as u64), &p)?;
    }
    err.check(g, |e| message(op, c, e))?;
    Ok((g.storage(out), shape))
}
