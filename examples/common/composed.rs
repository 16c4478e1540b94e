//! The losses composed from candle tensor ops, the way a Candle user writes them without this
//! crate: the baselines of the benchmarks (criterion and `bench_table`). Each returns the reduced
//! loss; `backward()` on it runs candle's autograd through every intermediate.
#![allow(dead_code)]

use candle_core::{DType, Result, Tensor, D};

/// One-hot `[N, C]` of integer labels (C = background and -1 = ignored give a zero row) and the
/// `[N, 1]` mask of non-ignored rows, both in `dtype`.
pub fn one_hot_and_mask(labels: &Tensor, c: usize, dtype: DType) -> Result<(Tensor, Tensor)> {
    let classes = Tensor::arange(0i64, c as i64, labels.device())?.unsqueeze(0)?;
    let l = labels.to_dtype(DType::I64)?.unsqueeze(1)?;
    let one_hot = l.broadcast_eq(&classes)?.to_dtype(dtype)?;
    let mask = l.ge(0i64)?.to_dtype(dtype)?;
    Ok((one_hot, mask))
}

/// torchvision's `sigmoid_focal_loss` with a row mask, summed and divided by `avg`.
pub fn sigmoid_focal(
    x: &Tensor,
    t: &Tensor,
    mask: Option<&Tensor>,
    alpha: f64,
    gamma: f64,
    avg: f64,
) -> Result<Tensor> {
    let p = candle_nn::ops::sigmoid(x)?;
    // BCE with logits: relu(x) - x t + log(1 + e^{-|x|})
    let ce = ((x.relu()? - (x * t)?)? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    let one_minus_t = t.affine(-1.0, 1.0)?;
    let p_t = ((&p * t)? + (p.affine(-1.0, 1.0)? * &one_minus_t)?)?;
    let modulating = p_t.affine(-1.0, 1.0)?.powf(gamma)?;
    let alpha_t = (t.affine(alpha, 0.0)? + one_minus_t.affine(1.0 - alpha, 0.0)?)?;
    let mut loss = ((ce * modulating)? * alpha_t)?;
    if let Some(m) = mask {
        loss = loss.broadcast_mul(m)?;
    }
    loss.sum_all()?.affine(1.0 / avg, 0.0)
}

/// Softmax cross-entropy with a row mask, summed and divided by `avg`.
pub fn cross_entropy(x: &Tensor, one_hot: &Tensor, mask: &Tensor, avg: f64) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(x, D::Minus1)?;
    let nll = (logp * one_hot)?.sum_keepdim(1)?.neg()?;
    (nll * mask)?.sum_all()?.affine(1.0 / avg, 0.0)
}

/// Softmax focal loss with a row mask: `-α (1 - p_t)^γ log p_t`, summed and divided by `avg`.
pub fn softmax_focal(
    x: &Tensor,
    one_hot: &Tensor,
    mask: &Tensor,
    alpha: f64,
    gamma: f64,
    avg: f64,
) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(x, D::Minus1)?;
    let logpt = (logp * one_hot)?.sum_keepdim(1)?;
    // relu guards `1 - p_t` against a rounding just below 0 before the power.
    let modulating = logpt.exp()?.affine(-1.0, 1.0)?.relu()?.powf(gamma)?;
    let l = (modulating * logpt)?.affine(-alpha, 0.0)?;
    (l * mask)?.sum_all()?.affine(1.0 / avg, 0.0)
}

/// mmdet's `GHMC` (momentum 0): `g = |σ(x) - t|` (detached), one masked pass per bin as mmdet's
/// Python loop (with its host round trip for the bin count), constant weights
/// `tot / num_bin / n`, then BCE with logits times the weights, summed and divided by `tot`.
/// `valid` is the `[N, 1]` row mask (ignored rows 0) or `None`.
pub fn ghmc(x: &Tensor, t: &Tensor, valid: Option<&Tensor>, bins: usize) -> Result<Tensor> {
    let g = (candle_nn::ops::sigmoid(&x.detach())? - t)?.abs()?;
    let valid = match valid {
        Some(v) => v.broadcast_as(x.shape())?.contiguous()?,
        None => x.ones_like()?.detach(),
    };
    let tot = valid.sum_all()?.to_scalar::<f32>()?.max(1.0) as f64;
    let mut weights = x.zeros_like()?.detach();
    let mut n = 0usize;
    for i in 0..bins {
        // Edges i / bins in f32, the last one 1 + 1e-6, as mmdet.
        let lo = i as f32 / bins as f32;
        let hi = if i + 1 == bins {
            1.0 + 1e-6
        } else {
            (i + 1) as f32 / bins as f32
        };
        let inds = ((g.ge(lo as f64)?.to_dtype(x.dtype())?
            * g.lt(hi as f64)?.to_dtype(x.dtype())?)?
            * &valid)?;
        let num = inds.sum_all()?.to_scalar::<f32>()? as f64;
        if num > 0.0 {
            weights = (weights + inds.affine(tot / num, 0.0)?)?;
            n += 1;
        }
    }
    if n > 0 {
        weights = weights.affine(1.0 / n as f64, 0.0)?;
    }
    // BCE with logits: relu(x) - x t + log(1 + e^{-|x|})
    let bce = ((x.relu()? - (x * t)?)? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    (bce * weights)?.sum_all()?.affine(1.0 / tot, 0.0)
}

/// BCE with logits, elementwise: `relu(x) - x t + log(1 + e^{-|x|})`.
fn bce_with_logits(x: &Tensor, t: &Tensor) -> Result<Tensor> {
    (x.relu()? - (x * t)?)? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?
}

/// mmdet's `quality_focal_loss_tensor_target` (dense soft targets): `BCE(x, t)·|t − σ(x)|^β`
/// (nothing detached), summed and divided by `avg`.
pub fn quality_focal(x: &Tensor, t: &Tensor, beta: f64, avg: f64) -> Result<Tensor> {
    let p = candle_nn::ops::sigmoid(x)?;
    let modulating = (t - p)?.abs()?.powf(beta)?;
    (bce_with_logits(x, t)? * modulating)?
        .sum_all()?
        .affine(1.0 / avg, 0.0)
}

/// mmdet's `varifocal_loss` (iou_weighted): `BCE(x, q)·w`, `w = q` where `q > 0`, else
/// `α·σ(x)^γ` (not detached), summed and divided by `avg`.
pub fn varifocal(x: &Tensor, q: &Tensor, alpha: f64, gamma: f64, avg: f64) -> Result<Tensor> {
    let p = candle_nn::ops::sigmoid(x)?;
    let pos = q.gt(0.0)?.to_dtype(x.dtype())?;
    let neg = pos.affine(-1.0, 1.0)?;
    // |p − q|^γ·α on the negatives (q = 0 there), q on the positives.
    let w = ((q * &pos)? + ((p - q)?.abs()?.powf(gamma)?.affine(alpha, 0.0)? * neg)?)?;
    (bce_with_logits(x, q)? * w)?
        .sum_all()?
        .affine(1.0 / avg, 0.0)
}

/// GFL's distribution focal loss on `[N, K]` logits and `[N]` targets in `[0, K − 1]`:
/// `(i + 1 − y)·CE(x, i) + (y − i)·CE(x, i + 1)`, `i = ⌊y⌋` (the upper bin clamped to K − 1),
/// through one-hot gathers, summed and divided by `avg`.
pub fn distribution_focal(x: &Tensor, y: &Tensor, avg: f64) -> Result<Tensor> {
    let k = x.dim(1)?;
    let logp = candle_nn::ops::log_softmax(x, D::Minus1)?;
    let left = y.floor()?.clamp(0.0, (k - 1) as f64)?;
    let right = left.affine(1.0, 1.0)?.clamp(0.0, (k - 1) as f64)?;
    let wl = (left.affine(1.0, 1.0)? - y)?;
    let wr = (y - &left)?;
    let bins = Tensor::arange(0f32, k as f32, x.device())?
        .to_dtype(x.dtype())?
        .unsqueeze(0)?;
    let hot = |b: &Tensor| b.unsqueeze(1)?.broadcast_eq(&bins)?.to_dtype(x.dtype());
    let ce = |b: &Tensor| (&logp * hot(b)?)?.sum(1)?.neg();
    ((ce(&left)? * wl)? + (ce(&right)? * wr)?)?
        .sum_all()?
        .affine(1.0 / avg, 0.0)
}

/// Smooth L1 (torch's `smooth_l1_loss`), summed and divided by `avg`.
pub fn smooth_l1(pred: &Tensor, target: &Tensor, beta: f64, avg: f64) -> Result<Tensor> {
    let d = (pred - target)?;
    let ad = d.abs()?;
    let quad = d.sqr()?.affine(0.5 / beta, 0.0)?;
    let lin = ad.affine(1.0, -0.5 * beta)?;
    ad.lt(beta)?
        .where_cond(&quad, &lin)?
        .sum_all()?
        .affine(1.0 / avg, 0.0)
}

/// mmdet's `balanced_l1_loss`, summed and divided by `avg`.
pub fn balanced_l1(
    pred: &Tensor,
    target: &Tensor,
    alpha: f64,
    gamma: f64,
    beta: f64,
    avg: f64,
) -> Result<Tensor> {
    let diff = (pred - target)?.abs()?;
    let b = (gamma / alpha).exp() - 1.0;
    let bd = diff.affine(b, 0.0)?;
    // α/b (b|d| + 1) ln(b|d|/β + 1) - α|d|
    let inlier = ((bd.affine(1.0, 1.0)? * bd.affine(1.0 / beta, 1.0)?.log()?)?
        .affine(alpha / b, 0.0)?
        - diff.affine(alpha, 0.0)?)?;
    let outlier = diff.affine(gamma, gamma / b - alpha * beta)?;
    diff.lt(beta)?
        .where_cond(&inlier, &outlier)?
        .sum_all()?
        .affine(1.0 / avg, 0.0)
}

/// The four columns of `[N, 4]` boxes.
fn cols(b: &Tensor) -> Result<[Tensor; 4]> {
    Ok([
        b.narrow(1, 0, 1)?,
        b.narrow(1, 1, 1)?,
        b.narrow(1, 2, 1)?,
        b.narrow(1, 3, 1)?,
    ])
}

/// torchvision's `_loss_inter_union`: (intersection, union) `[N, 1]`, strict overlap mask.
fn inter_union(p: &[Tensor; 4], g: &[Tensor; 4]) -> Result<(Tensor, Tensor)> {
    let iw = (p[2].minimum(&g[2])? - p[0].maximum(&g[0])?)?;
    let ih = (p[3].minimum(&g[3])? - p[1].maximum(&g[1])?)?;
    let overlap = (iw.gt(0.0)?.to_dtype(iw.dtype())? * ih.gt(0.0)?.to_dtype(iw.dtype())?)?;
    let inter = overlap.ne(0.0)?.where_cond(&(iw * ih)?, &overlap)?;
    let area_p = ((&p[2] - &p[0])? * (&p[3] - &p[1])?)?;
    let area_g = ((&g[2] - &g[0])? * (&g[3] - &g[1])?)?;
    let union = ((area_p + area_g)? - &inter)?;
    Ok((inter, union))
}

/// torchvision's `generalized_box_iou_loss` on `[N, 4]` box pairs, summed and divided by `avg`.
pub fn giou(pred: &Tensor, target: &Tensor, eps: f64, avg: f64) -> Result<Tensor> {
    let (p, g) = (cols(pred)?, cols(target)?);
    let (inter, union) = inter_union(&p, &g)?;
    let iou = (&inter / union.affine(1.0, eps)?)?;
    let cw = (p[2].maximum(&g[2])? - p[0].minimum(&g[0])?)?;
    let ch = (p[3].maximum(&g[3])? - p[1].minimum(&g[1])?)?;
    let area_c = (cw * ch)?;
    let penalty = ((&area_c - &union)? / area_c.affine(1.0, eps)?)?;
    (iou - penalty)?
        .affine(-1.0, 1.0)?
        .sum_all()?
        .affine(1.0 / avg, 0.0)
}

/// `atan` from candle ops (candle has none): two half-angle reductions
/// `atan z = 2 atan(z / (1 + √(1 + z²)))` bring `|u| ≤ tan(π/8)`, then the odd series to u¹⁹
/// (error < 1e-9).
fn atan(z: &Tensor) -> Result<Tensor> {
    let half =
        |z: &Tensor| -> Result<Tensor> { z / z.sqr()?.affine(1.0, 1.0)?.sqrt()?.affine(1.0, 1.0)? };
    let u = half(&half(z)?)?;
    let u2 = u.sqr()?;
    // Horner on Σ_k (-1)^k u^{2k+1} / (2k+1), k = 0..=9.
    let mut s = u2.affine(0.0, -1.0 / 19.0)?;
    for k in (0..9).rev() {
        let c = if k % 2 == 0 { 1.0 } else { -1.0 } / (2 * k + 1) as f64;
        s = (s * &u2)?.affine(1.0, c)?;
    }
    (s * u)?.affine(4.0, 0.0)
}

/// torchvision's `complete_box_iou_loss` on `[N, 4]` box pairs (α under `no_grad`), summed and
/// divided by `avg`.
pub fn ciou(pred: &Tensor, target: &Tensor, eps: f64, avg: f64) -> Result<Tensor> {
    let (p, g) = (cols(pred)?, cols(target)?);
    let (inter, union) = inter_union(&p, &g)?;
    let iou = (&inter / union.affine(1.0, eps)?)?;
    let cw = (p[2].maximum(&g[2])? - p[0].minimum(&g[0])?)?;
    let ch = (p[3].maximum(&g[3])? - p[1].minimum(&g[1])?)?;
    let diag = (cw.sqr()? + ch.sqr()?)?.affine(1.0, eps)?;
    let dx = ((&p[0] + &p[2])? - (&g[0] + &g[2])?)?.affine(0.5, 0.0)?;
    let dy = ((&p[1] + &p[3])? - (&g[1] + &g[3])?)?.affine(0.5, 0.0)?;
    let rho2 = (dx.sqr()? + dy.sqr()?)?;
    let diou = ((rho2 / diag)? - &iou)?.affine(1.0, 1.0)?;
    let (wp, hp) = ((&p[2] - &p[0])?, (&p[3] - &p[1])?);
    let (wg, hg) = ((&g[2] - &g[0])?, (&g[3] - &g[1])?);
    let v = (atan(&(wg / hg)?)? - atan(&(wp / hp)?)?)?
        .sqr()?
        .affine(4.0 / (std::f64::consts::PI * std::f64::consts::PI), 0.0)?;
    let vd = v.detach();
    let alpha = (&vd / ((&vd - iou.detach())?.affine(1.0, 1.0 + eps))?)?;
    (diou + (alpha * v)?)?.sum_all()?.affine(1.0 / avg, 0.0)
}

/// `Σ_k c_k·H(x_k - s)` (`c` = 1 when `None`) with `H(z) = clamp(z/(2δ) + ½, 0, 1)`, in eight
/// independent f64 lanes so that the loop vectorises.
fn sum_h(xs: &[f64], c: Option<&[f64]>, s: f64, delta: f64) -> f64 {
    let (k, off) = (0.5 / delta, 0.5 - s * 0.5 / delta);
    let h = |x: f64| (x * k + off).clamp(0.0, 1.0);
    let mut lanes = [0f64; 8];
    let mut tail = 0.0;
    match c {
        None => {
            let mut it = xs.chunks_exact(8);
            for ch in &mut it {
                for (l, &x) in lanes.iter_mut().zip(ch) {
                    *l += h(x);
                }
            }
            tail += it.remainder().iter().map(|&x| h(x)).sum::<f64>();
        }
        Some(c) => {
            let (mut it, mut ic) = (xs.chunks_exact(8), c.chunks_exact(8));
            for (ch, cc) in (&mut it).zip(&mut ic) {
                for ((l, &x), &w) in lanes.iter_mut().zip(ch).zip(cc) {
                    *l += w * h(x);
                }
            }
            tail += it
                .remainder()
                .iter()
                .zip(ic.remainder())
                .map(|(&x, &w)| w * h(x))
                .sum::<f64>();
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// The literal AP-Loss of `ApLoss`'s doc on host f64 scores (`targets`: 1 positive, 0 negative,
/// -1 ignored), in O(P·(P+N)): the loss and, with `update`, the error-driven update Δx of every
/// element (0 for ignored ones). Parallel over the positives and over the negatives.
pub fn naive_ap(s: &[f64], targets: &[i8], delta: f64, update: bool) -> (f64, Vec<f64>) {
    use rayon::prelude::*;
    let mut pos: Vec<usize> = (0..s.len()).filter(|&i| targets[i] == 1).collect();
    if pos.is_empty() {
        return (0.0, vec![0.0; if update { s.len() } else { 0 }]);
    }
    pos.sort_by(|&a, &b| s[a].total_cmp(&s[b]));
    let ps: Vec<f64> = pos.iter().map(|&i| s[i]).collect();
    let neg: Vec<usize> = (0..s.len()).filter(|&j| targets[j] == 0).collect();
    let ns: Vec<f64> = neg.iter().map(|&j| s[j]).collect();
    let np = pos.len() as f64;
    // a_i = 1 + Σ_{k≠i} H(s_k - s_i), b_i = Σ_j H(s_j - s_i), positives in ascending order.
    let ab: Vec<(f64, f64)> = (0..ps.len())
        .into_par_iter()
        .map(|i| {
            let a =
                1.0 + sum_h(&ps[..i], None, ps[i], delta) + sum_h(&ps[i + 1..], None, ps[i], delta);
            (a, sum_h(&ns, None, ps[i], delta))
        })
        .collect();
    // Interpolated precisions and the factors f_i (running max over lower-scored positives).
    let (mut m, mut loss) = (0.0f64, 0.0);
    let mut f = vec![1.0; pos.len()];
    let mut prec = vec![0.0; pos.len()];
    for (k, &(a, b)) in ab.iter().enumerate() {
        let cur = a / (a + b);
        if m <= cur {
            m = cur;
        } else {
            f[k] = (1.0 - m) / (1.0 - cur);
        }
        prec[k] = m;
        loss += m;
    }
    let loss = 1.0 - loss / np;
    if !update {
        return (loss, Vec::new());
    }
    // Δx_j = (1/P) Σ_i f_i H(s_j - s_i) / (a_i + b_i); H(s_j - s_i) = H(-s_i - (-s_j)).
    let c: Vec<f64> = ab
        .iter()
        .zip(&f)
        .map(|(&(a, b), &fi)| fi / (a + b))
        .collect();
    let minus_ps: Vec<f64> = ps.iter().map(|v| -v).collect();
    let upd: Vec<f64> = ns
        .par_iter()
        .map(|&sj| sum_h(&minus_ps, Some(&c), -sj, delta) / np)
        .collect();
    let mut dx = vec![0.0; s.len()];
    for (&j, u) in neg.iter().zip(upd) {
        dx[j] = u;
    }
    for (k, &i) in pos.iter().enumerate() {
        dx[i] = -(1.0 - prec[k]) / np;
    }
    (loss, dx)
}
