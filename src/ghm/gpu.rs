//! The CUDA launch plans (feature `cuda`, and `cuda-emu` on the emulated backend).

use super::{GhmcOp, NAME};
use crate::check::layout_dims2;
use crate::dtype::with_float_type;
use crate::gpu::params::{GhmBwdParams, GhmFwdParams, GhmHistParams};
use crate::gpu::{
    self, BwdIn, DevFloat, ErrorFlag, ForwardPlan, FwdIn, Gpu, In, KernelError, Launch, Out,
};
use crate::gpu::{Scale, GHM};
use crate::reduction::Reduction;
use crate::targets::TargetKind;
use candle_core::{Result, Shape};

/// Histograms of at most this many bins live in shared memory (u32 per bin).
const SHARED_MAX_BINS: usize = 8192;

/// The message of a kernel error: an invalid label or dense target.
fn message(e: KernelError, c: usize) -> String {
    match e.code {
        gpu::ERR_TARGET => {
            format!("{NAME}: dense targets must be in [0, 1], got {}", e.value())
        }
        _ => e.label(NAME, c),
    }
}

fn suffix<T: candle_core::WithDType>(kind: TargetKind) -> Result<String> {
    Ok(format!(
        "{}_{}",
        gpu::dtype_suffix(NAME, T::DTYPE)?,
        gpu::target_suffix(kind)
    ))
}

fn hist_t<G: Gpu, T: DevFloat>(
    g: &G,
    bins: usize,
    kind: TargetKind,
    x: In<'_, G>,
    tg: In<'_, G>,
) -> Out<G> {
    let (n, c) = layout_dims2(NAME, x.l)?;
    let total = (n * c) as u64;
    let err = ErrorFlag::new(g)?;
    // u64 counts in the kernel; an i64 tensor (same bits, counts < 2^63) for candle.
    let counts = g.zeros::<i64>(bins + 1)?;
    if total > 0 {
        let global = bins > SHARED_MAX_BINS;
        let mut cfg = Launch::partials(total);
        if !global {
            cfg = cfg.with_shmem(bins * 4);
        }
        let p = GhmHistParams {
            x: g.input::<T>(NAME, x.s, x.l)?,
            tg: gpu::targets_addr::<G, T>(g, NAME, kind, tg.s, tg.l)?,
            counts: g.out_addr(&counts),
            err: err.addr(g),
            n: n as u64,
            c: c as u64,
            bins: bins as i32,
            global: global as i32,
        };
        g.launch(&GHM, &format!("ghmc_hist_{}", suffix::<T>(kind)?), cfg, &p)?;
    }
    err.check(g, |e| message(e, c))?;
    Ok((g.storage(counts), Shape::from(bins + 1)))
}

/// The forward on backend `g`: per-element losses or the reduced scalar.
pub(super) fn forward<G: Gpu, T: DevFloat>(g: &G, op: &GhmcOp, a: FwdIn<'_, G>) -> Out<G> {
    let FwdIn { x, t: tg, .. } = a;
    let (n, c) = layout_dims2(NAME, x.l)?;
    let err = ErrorFlag::new(g)?;
    let p = GhmFwdParams {
        x: g.input::<T>(NAME, x.s, x.l)?,
        tg: gpu::targets_addr::<G, T>(g, NAME, op.kind, tg.s, tg.l)?,
        w: g.tensor::<T::A>(NAME, &op.weights)?,
        err: err.addr(g),
        n: n as u64,
        c: c as u64,
        bins: op.bins as i32,
        ..Default::default()
    };
    let sfx = suffix::<T>(op.kind)?;
    let plan = ForwardPlan {
        module: &GHM,
        prefix: "ghmc",
        suffix: &sfx,
        items: (n * c) as u64,
        none_shape: Shape::from((n, c)),
        scale: (op.reduction != Reduction::None)
            .then(|| Scale::host(op.reduction.scale(op.mean_denom))),
    };
    let out = plan.run::<G, T, _>(g, NAME, p)?;
    err.check(g, |e| message(e, c))?;
    Ok(out)
}

/// The gradient on backend `g`.
pub(super) fn backward<G: Gpu, T: DevFloat>(g: &G, op: &GhmcOp, a: BwdIn<'_, G>) -> Out<G> {
    grad::<G, T>(g, op, a, false)
}

/// The gradient w.r.t. the logits, or (`wrt_t`) w.r.t. dense targets, on backend `g`.
pub(super) fn grad<G: Gpu, T: DevFloat>(
    g: &G,
    op: &GhmcOp,
    a: BwdIn<'_, G>,
    wrt_t: bool,
) -> Out<G> {
    let BwdIn { x, t: tg, up, .. } = a;
    let (n, c) = layout_dims2(NAME, x.l)?;
    let scalar_up = op.reduction.is_scalar();
    gpu::check_upstream(NAME, up.l, scalar_up, n * c)?;
    let total = (n * c) as u64;
    let err = ErrorFlag::new(g)?;
    let out = g.output::<T>(n * c)?;
    if total > 0 {
        let p = GhmBwdParams {
            x: g.input::<T>(NAME, x.s, x.l)?,
            tg: gpu::targets_addr::<G, T>(g, NAME, op.kind, tg.s, tg.l)?,
            w: g.tensor::<T::A>(NAME, &op.weights)?,
            up: g.input::<T>(NAME, up.s, up.l)?,
            g: g.out_addr(&out),
            err: err.addr(g),
            n: n as u64,
            c: c as u64,
            scale: op.reduction.scale(op.mean_denom),
            bins: op.bins as i32,
            up_scalar: scalar_up as i32,
            wrt_t: wrt_t as i32,
        };
        let kernel = format!("ghmc_bwd_{}", suffix::<T>(op.kind)?);
        g.launch(&GHM, &kernel, Launch::elems(total), &p)?;
    }
    err.check(g, |e| message(e, c))?;
    Ok((g.storage(out), Shape::from((n, c))))
}

/// The gradient-norm histogram on backend `g`: `[bins + 1]` i64 (per-bin counts, then the
/// number of valid elements).
pub(super) fn hist<G: Gpu>(
    g: &G,
    bins: usize,
    kind: TargetKind,
    x: In<'_, G>,
    tg: In<'_, G>,
) -> Out<G> {
    with_float_type!(NAME, g.dtype(x.s), T, {
        hist_t::<G, T>(g, bins, kind, x, tg)
    })
}
