//! The CUDA launch plans (feature `cuda`, and `cuda-emu` on the emulated backend).

use super::{BucketResult, Global, Kind, Plan, LO_BITS, NAME};
use crate::check::layout_dims2;
use crate::dtype::with_float_type;
use crate::gpu::params::{ApBucketParams, ApCompactParams, ApCountParams, ApUpdateParams};
use crate::gpu::{self, DevFloat, ErrorFlag, Gpu, In, KernelError, Launch, Out, AP_LOSS};
use candle_core::{Result, Shape};

/// Dynamic shared memory a bucket block may use: the default 48 KiB per block without an
/// opt-in, less room for the kernel's static shared memory (256 bytes).
const SMEM_LIMIT: usize = 47 * 1024;

/// The targets' address, of the type the kernel expects.
fn targets<G: Gpu, T: crate::gpu::DevElem>(g: &G, kind: Kind, tg: &In<'_, G>) -> Result<u64> {
    gpu::targets_addr::<G, T>(g, NAME, kind, tg.s, tg.l)
}

/// The message of a kernel error (`[code, payload, value bits]`).
fn message(e: KernelError, c: usize) -> String {
    let (i, j) = (e.a / c.max(1) as u64, e.a % c.max(1) as u64);
    let v = e.value();
    match e.code {
        gpu::ERR_LABEL => e.label(NAME, c),
        gpu::ERR_TARGET => format!("{NAME}: target {v} at [{i}, {j}] is not -1, 0 or 1"),
        gpu::ERR_POSITIVE => format!("{NAME}: positive score {v} at [{i}, {j}] is not among the global positives (ApGlobal from other inputs?)"),
        code => format!("{NAME}: internal error: kernel error code {code}"),
    }
}

fn sfx<T: candle_core::WithDType>(kind: Kind) -> Result<String> {
    Ok(format!(
        "{}_{}",
        gpu::dtype_suffix(NAME, T::DTYPE)?,
        gpu::target_suffix(kind)
    ))
}

fn gather_t<G: Gpu, T: DevFloat>(
    g: &G,
    x: In<'_, G>,
    tg: In<'_, G>,
    kind: Kind,
) -> Result<Vec<f64>> {
    let (n, c) = layout_dims2(NAME, x.l)?;
    let total = (n * c) as u64;
    if total == 0 {
        return Ok(Vec::new());
    }
    let sfx = sfx::<T>(kind)?;
    let tg = targets::<G, T>(g, kind, &tg)?;
    let err = ErrorFlag::new(g)?;
    let cnt = g.words(1)?;
    let p = ApCountParams {
        tg,
        cnt: g.words_addr(&cnt),
        err: err.addr(g),
        n: n as u64,
        c: c as u64,
    };
    g.launch(
        &AP_LOSS,
        &format!("ap_count_{sfx}"),
        Launch::partials(total),
        &p,
    )?;
    err.check(g, |e| message(e, c))?;
    let np = g.download(&cnt)?.first().copied().unwrap_or(0);
    if np == 0 {
        return Ok(Vec::new());
    }
    let out = g.words(np as usize)?;
    let next = g.words(1)?;
    let p = ApCompactParams {
        x: g.input::<T>(NAME, x.s, x.l)?,
        tg,
        out: g.words_addr(&out),
        next: g.words_addr(&next),
        err: err.addr(g),
        n: n as u64,
        c: c as u64,
        cap: np,
    };
    g.launch(
        &AP_LOSS,
        &format!("ap_compact_{sfx}"),
        Launch::elems(total),
        &p,
    )?;
    // Only the P positive scores come back to the host, in the order the threads wrote
    // them: sorted here.
    let mut pos: Vec<f64> = g.download(&out)?.into_iter().map(f64::from_bits).collect();
    pos.sort_unstable_by(f64::total_cmp);
    Ok(pos)
}

fn bucket_t<G: Gpu, T: DevFloat>(
    g: &G,
    plan: &Plan,
    x: In<'_, G>,
    tg: In<'_, G>,
    kind: Kind,
) -> Result<BucketResult> {
    let (n, c) = layout_dims2(NAME, x.l)?;
    let nb = plan.buckets();
    let total = (n * c) as u64;
    if total == 0 {
        return Ok((0, vec![0; nb], vec![0; nb]));
    }
    let edges = gpu::upload_f64(g, &plan.edges)?;
    let (cnt, hi, lo) = (g.words(nb)?, g.words(nb)?, g.words(nb)?);
    let nonfinite = g.words(1)?;
    let err = ErrorFlag::new(g)?;
    let smem = 3 * nb * std::mem::size_of::<u64>();
    let use_smem = smem <= SMEM_LIMIT;
    let mut cfg = Launch::partials(total);
    if use_smem {
        cfg = cfg.with_shmem(smem);
    }
    let p = ApBucketParams {
        x: g.input::<T>(NAME, x.s, x.l)?,
        tg: targets::<G, T>(g, kind, &tg)?,
        edges: g.words_addr(&edges),
        cnt: g.words_addr(&cnt),
        hi: g.words_addr(&hi),
        lo: g.words_addr(&lo),
        nonfinite: g.words_addr(&nonfinite),
        err: err.addr(g),
        n: n as u64,
        c: c as u64,
        ne: plan.edges.len() as u64,
        center: plan.center,
        scale: plan.scale,
        use_smem: use_smem as i32,
    };
    g.launch(&AP_LOSS, &format!("ap_bucket_{}", sfx::<T>(kind)?), cfg, &p)?;
    err.check(g, |e| message(e, c))?;
    let cnt = g.download(&cnt)?;
    let hi = g.download(&hi)?;
    let lo = g.download(&lo)?;
    let nonfinite = g.download(&nonfinite)?.first().copied().unwrap_or(0);
    // Σq = Σhi·2^31 + Σlo, exactly.
    let sum = hi
        .iter()
        .zip(&lo)
        .map(|(h, l)| ((*h as i64) as i128).wrapping_shl(LO_BITS) + *l as i128)
        .collect();
    Ok((nonfinite, cnt, sum))
}

/// The update times the upstream gradient on backend `g`.
pub(super) fn update<G: Gpu, T: DevFloat>(
    g: &G,
    gl: &Global,
    kind: Kind,
    x: In<'_, G>,
    tg: In<'_, G>,
    up: In<'_, G>,
) -> Out<G> {
    let (n, c) = layout_dims2(NAME, x.l)?;
    gpu::check_upstream(NAME, up.l, true, 1)?;
    let total = (n * c) as u64;
    let out = g.output::<T>(n * c)?;
    if total > 0 {
        let plan = &gl.plan;
        let pos = gpu::upload_f64(g, &plan.pos)?;
        let pos_upd = gpu::upload_f64(g, &gl.pos_upd)?;
        let edges = gpu::upload_f64(g, &plan.edges)?;
        let alpha = gpu::upload_f64(g, &gl.alpha)?;
        let beta = gpu::upload_f64(g, &gl.beta)?;
        let err = ErrorFlag::new(g)?;
        let p = ApUpdateParams {
            x: g.input::<T>(NAME, x.s, x.l)?,
            tg: targets::<G, T>(g, kind, &tg)?,
            up: g.input::<T>(NAME, up.s, up.l)?,
            pos: g.words_addr(&pos),
            pos_upd: g.words_addr(&pos_upd),
            edges: g.words_addr(&edges),
            alpha: g.words_addr(&alpha),
            beta: g.words_addr(&beta),
            out: g.out_addr(&out),
            err: err.addr(g),
            n: n as u64,
            c: c as u64,
            np: plan.pos.len() as u64,
            ne: plan.edges.len() as u64,
            center: plan.center,
            nan: gl.nan as i32,
        };
        let kernel = format!("ap_update_{}", sfx::<T>(kind)?);
        g.launch(&AP_LOSS, &kernel, Launch::elems(total), &p)?;
        err.check(g, |e| message(e, c))?;
    }
    Ok((g.storage(out), Shape::from((n, c))))
}

/// Phase 1 on backend `g`: the positive scores, sorted ascending.
pub(super) fn gather<G: Gpu>(g: &G, x: In<'_, G>, tg: In<'_, G>, kind: Kind) -> Result<Vec<f64>> {
    with_float_type!(NAME, g.dtype(x.s), T, { gather_t::<G, T>(g, x, tg, kind) })
}

/// Phase 2 on backend `g`: the bucket statistics of the negatives.
pub(super) fn bucket<G: Gpu>(
    g: &G,
    plan: &Plan,
    x: In<'_, G>,
    tg: In<'_, G>,
    kind: Kind,
) -> Result<BucketResult> {
    with_float_type!(NAME, g.dtype(x.s), T, {
        bucket_t::<G, T>(g, plan, x, tg, kind)
    })
}
