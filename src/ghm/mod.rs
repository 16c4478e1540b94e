//! Gradient harmonizing classification loss (GHM-C, Li et al. 2019) with mmdet's semantics. On
//! the CPU one fused pass gives the histogram of the gradient norms and the BCE sum of each bin,
//! so that the per-bin weights (computed on the host, with the optional running histogram) give
//! any scalar loss without a second pass; the backward is one pass that recomputes `σ(x) - t`
//! and its bin. On CUDA the histogram and the weighted BCE are two kernels.

use crate::check::{check_float_2d, layout_dims2};
use crate::cpu::{map_chunks, map_indices, rows_per_chunk, zeroed_vec};
use crate::dtype::{self, with_float_type, Acc, Elem};
use crate::op::{
    cpu_slice, emulate, CpuInputs, CpuOut, Fwd, LossKernel, Names, SavedGrad, TargetGrad,
};
use crate::reduction::Reduction;
use crate::targets::{self, CpuTargets, RowLabel, RowTarget, TargetKind};
use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

const NAME: &str = "GhmcLoss";
/// Upper bound on `bins` (bin indices are `i32` in the kernels; mmdet uses 10 or 30).
const MAX_BINS: usize = 1 << 20;

/// Gradient harmonizing classification loss (Li et al., *Gradient Harmonized Single-stage
/// Detector*, AAAI 2019), with the semantics of mmdet's `GHMC`.
///
/// # Formula
///
/// For each valid element (logit `x`, binary target `t`), the gradient norm `g = |σ(x) - t|` is
/// put into one of `bins` equal bins of `[0, 1]` (edges `i / bins` in f32, the last one
/// `1 + 1e-6`, as mmdet). With `tot = max(valid elements, 1)`, `num_b` the elements of bin `b`
/// and `n` the number of non-empty bins:
///
/// ```text
/// β_b = tot / num_b / n                      (momentum = 0)
/// acc_b ← m·acc_b + (1-m)·num_b,  β_b = tot / acc_b / n   (momentum m > 0, non-empty bins only)
/// l   = β_{bin(g)} · BCE(x, t) = β · [t·softplus(-x) + (1-t)·softplus(x)]
/// ```
///
/// The weights `β` are constants for the gradient, `∂l/∂x = β·(σ(x) - t)`, and the backward
/// reuses the weights of its own forward even when the running histogram has moved on. On the
/// CPU the histogram and the per-bin BCE sums are one fused pass (per-chunk partials merged in
/// a fixed order), and a scalar loss is `Σ_b β_b·(Σ_{e∈b} bce_e)` scaled by the reduction; on
/// CUDA the weighted BCE is a second kernel.
///
/// Reductions: `None` gives `[N, C]` (ignored rows 0); `Sum`; `Mean` = sum / `tot` (mmdet's loss;
/// 0 when every row is ignored); `AvgFactor(f)` = sum / f.
///
/// # Shapes
///
/// - `logits`: `[N, C]`, f32 / f64 / f16 / bf16.
/// - `targets`: integer labels `[N]` (`u32` / `i64`: `0..C` the class, `C` background, `-1`
///   ignored row) or dense targets `[N, C]` in the logits' dtype, in `[0, 1]` (binary in mmdet).
/// - result: `[N, C]` for `Reduction::None`, else a rank-0 tensor; the logits' dtype.
/// - Leading dimensions: `[..., C]` logits with targets of the matching leading shape are one
///   `[N, C]` problem (N = the product of the leading dimensions); `Reduction::None` then
///   returns the leading shape plus `C`.
///
/// # Errors
///
/// Every message starts with `GhmcLoss:`. A tensor on a Metal device (only the CPU and CUDA have
/// kernels); `bins` not in `1..=2^20`; `momentum` outside `[0, 1)`; logits not of rank 2 or not a
/// float dtype; targets of another shape, dtype or device; a label outside `0..=C` and not `-1`; a
/// dense target outside `[0, 1]`; `AvgFactor` not finite and > 0.
///
/// # Example
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_detloss::GhmcLoss;
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let logits = Var::new(&[[2.0f32, -1.0, 0.5], [-3.0, 0.0, 1.0]], &dev)?;
/// let labels = Tensor::new(&[2i64, 3], &dev)?; // class 2; background
/// // The running histogram is private state: start from `default()`, set the public fields.
/// let mut ghmc = GhmcLoss::default();
/// ghmc.bins = 30;
/// ghmc.momentum = 0.75;
/// let loss = ghmc.forward(logits.as_tensor(), &labels)?;
/// let grads = loss.backward()?;
/// assert_eq!(grads.get(&logits).unwrap().dims(), &[2, 3]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct GhmcLoss {
    /// Number of gradient-norm bins (10; mmdet's RetinaNet config uses 30). Must be ≥ 1.
    pub bins: usize,
    /// Momentum of the running histogram in `[0, 1)` (0: per-batch histogram; mmdet configs
    /// use 0.75).
    pub momentum: f64,
    /// How the `[N, C]` losses are reduced (default `Mean` = sum / number of valid elements).
    pub reduction: Reduction,
    /// Running per-bin counts `acc_sum` (used when `momentum > 0`), resized to `bins` (zeros) on
    /// the first forward after `bins` changes.
    acc_sum: Vec<f64>,
}

impl Default for GhmcLoss {
    fn default() -> Self {
        Self {
            bins: 10,
            momentum: 0.0,
            reduction: Reduction::Mean,
            acc_sum: Vec::new(),
        }
    }
}

impl GhmcLoss {
    /// A GHM-C loss with `bins` bins and running-histogram `momentum` (mmdet's `GHMC(bins,
    /// momentum)`), `Reduction::Mean`; set `reduction` afterwards for another. The values are
    /// checked by the first `forward` (bins ≥ 1, momentum in `[0, 1)`).
    ///
    /// ```
    /// use candle_detloss::{GhmcLoss, Reduction};
    /// let mut ghm = GhmcLoss::new(30, 0.75);
    /// ghm.reduction = Reduction::Sum;
    /// assert_eq!((ghm.bins, ghm.momentum), (30, 0.75));
    /// ```
    pub fn new(bins: usize, momentum: f64) -> Self {
        Self {
            bins,
            momentum,
            ..Self::default()
        }
    }

    /// Computes the loss of `logits` `[N, C]` against `targets` (labels `[N]` or dense
    /// `[N, C]`), updating the running histogram when `momentum > 0`.
    pub fn forward(&mut self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        targets::with_leading_dims(NAME, logits, targets, |x, t| self.forward_2d(x, t))
    }

    fn forward_2d(&mut self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        self.reduction.validate(NAME)?;
        let bins = self.bins;
        if bins == 0 || bins > MAX_BINS {
            bail!("{NAME}: bins must be in 1..={MAX_BINS}, got {bins}")
        }
        let mom = self.momentum;
        if !(0.0..1.0).contains(&mom) {
            bail!("{NAME}: momentum must be in [0, 1), got {mom}")
        }
        let (n, c) = check_float_2d(NAME, "logits", logits)?;
        let kind = targets::target_kind(NAME, logits, targets, n, c)?;
        let x = logits.contiguous()?;
        let tg = targets.contiguous()?;
        // Pass 1: the histogram of g over the valid elements, plus their number (last entry).
        let hist_op = GhmcHist {
            bins,
            kind,
            sums: Default::default(),
        };
        let hist = x
            .detach()
            .apply_op2_no_bwd(&tg, &hist_op)?
            .to_vec1::<i64>()?;
        // CPU: the per-bin BCE sums of the same pass.
        let sums = hist_op.sums.lock().ok().and_then(|mut s| s.take());
        let (counts, valid) = hist.split_at(bins);
        let tot = (valid.first().copied().unwrap_or(0) as f64).max(1.0);
        if self.acc_sum.len() != bins {
            self.acc_sum = vec![0.0; bins];
        }
        let mut weights = vec![0f64; bins];
        let mut nonempty = 0usize;
        for (b, &num) in counts.iter().enumerate() {
            if num > 0 {
                let num = num as f64;
                weights[b] = if mom > 0.0 {
                    self.acc_sum[b] = mom * self.acc_sum[b] + (1.0 - mom) * num;
                    tot / self.acc_sum[b]
                } else {
                    tot / num
                };
                nonempty += 1;
            }
        }
        if nonempty > 0 {
            for w in &mut weights {
                *w /= nonempty as f64;
            }
        }
        // CPU, scalar reduction: l = Σ_b β_b · (Σ_{e in b} bce_e), no second pass.
        let cpu_loss = match (&sums, self.reduction.is_scalar()) {
            (Some(sums), true) => {
                let s = weights.iter().zip(sums).fold(0.0, |a, (w, s)| a + w * s);
                // The NaN elements' sum (0, or NaN): a NaN input makes the loss NaN.
                let nan = sums.get(bins).copied().unwrap_or(0.0) * 0.0;
                Some((s + nan) * self.reduction.scale(tot))
            }
            _ => None,
        };
        let acc = dtype::acc_dtype(logits.dtype());
        let weights = Tensor::new(weights, logits.device())?.to_dtype(acc)?;
        let op = GhmcOp {
            bins,
            kind,
            reduction: self.reduction,
            mean_denom: tot,
            weights,
            cpu_loss,
        };
        // Carries the loss into the graph (CUDA and `Reduction::None`: pass 2, the weighted
        // BCE reduced in the kernel).
        x.apply_op2(&tg, Fwd::new(op, false))
    }
}

/// The bin `b` with `edge(b) ≤ g < edge(b+1)` of `g ∈ [0, 1]` (mmdet's edges `i / bins` in
/// f32; the last one `1 + 1e-6` is above every `g`), and `bins` for a NaN `g` (valid but in no
/// bin, as in mmdet). The guess `⌊g·bins⌋` corrected by one step against the edges, with
/// selects only so that the row loops vectorise.
#[inline(always)]
fn bin_of<A: Acc>(g: A, bins: i32, bins_f: A, bins_f32: f32) -> i32 {
    let b = (g * bins_f).trunc_clamped(bins - 1); // in 0..bins
    let down = b > 0 && g < A::from_f32(b as f32 / bins_f32);
    let up = b + 1 < bins && g >= A::from_f32((b + 1) as f32 / bins_f32);
    let b = b - down as i32 + up as i32;
    if g <= A::ONE {
        b
    } else {
        bins
    }
}

/// Per-row scratch: the targets, `d = σ(x) - t`, the BCE and the bin of each element.
struct Scratch<A> {
    t: Vec<A>,
    d: Vec<A>,
    ce: Vec<A>,
    bin: Vec<i32>,
}

impl<A: Acc> Scratch<A> {
    fn new(c: usize) -> Self {
        Self {
            t: vec![A::ZERO; c],
            d: vec![A::ZERO; c],
            ce: vec![A::ZERO; c],
            bin: vec![0; c],
        }
    }

    /// Loads the targets of row `i`; false for an ignored row; an error for a dense target
    /// outside `[0, 1]`.
    #[inline(always)]
    fn load<T: Elem<A = A>>(&mut self, tg: &CpuTargets<'_, T>, i: usize, c: usize) -> Result<bool> {
        match tg.row(NAME, i, c)? {
            RowTarget::Label(RowLabel::Ignored) => return Ok(false),
            RowTarget::Label(RowLabel::Class(k)) => {
                self.t.fill(A::ZERO);
                if let Some(t) = self.t.get_mut(k) {
                    *t = A::ONE; // k == C (background): all negative
                }
            }
            RowTarget::Dense(tr) => {
                let mut bad = false;
                for (t, v) in self.t.iter_mut().zip(tr) {
                    *t = v.to_acc();
                    bad |= *t < A::ZERO || *t > A::ONE;
                }
                if bad {
                    if let Some(t) = self.t.iter().find(|t| **t < A::ZERO || **t > A::ONE) {
                        check_dense_target(*t)?;
                    }
                }
            }
        }
        Ok(true)
    }

    /// `d`, `ce` and `bin` of row `x` against the loaded targets.
    #[inline(always)]
    fn eval<T: Elem<A = A>>(&mut self, x: &[T], bins: usize) {
        let (bins_i, bins_f32) = (bins as i32, bins as f32);
        let bins_f = A::from_f64(bins as f64);
        let it = self.d.iter_mut().zip(&mut self.ce).zip(&mut self.bin);
        for (((d, ce), b), (xv, t)) in it.zip(x.iter().zip(&self.t)) {
            let (g, c, dv) = elem(xv.to_acc(), *t);
            *d = dv;
            *ce = c;
            *b = bin_of(g, bins_i, bins_f, bins_f32);
        }
    }

    /// `d` and `bin` of row `x` (the backward's: no BCE; not `eval` with a flag, as that loop
    /// with the store switched off did not vectorise).
    #[inline(always)]
    fn eval_d<T: Elem<A = A>>(&mut self, x: &[T], bins: usize) {
        let (bins_i, bins_f32) = (bins as i32, bins as f32);
        let bins_f = A::from_f64(bins as f64);
        for ((d, b), (xv, t)) in self
            .d
            .iter_mut()
            .zip(&mut self.bin)
            .zip(x.iter().zip(&self.t))
        {
            let (g, _, dv) = elem(xv.to_acc(), *t);
            *d = dv;
            *b = bin_of(g, bins_i, bins_f, bins_f32);
        }
    }
}

/// `(g, bce, σ(x) - t)` of one element, `g = |σ(x) - t|` (mmdet's gradient norm).
#[inline(always)]
fn elem<A: Acc>(x: A, t: A) -> (A, A, A) {
    // One exp, one log1p and one division give both sigmoids and both softplus terms.
    let one = A::ONE;
    let e = x.exp_neg_abs(); // e^{-|x|} ∈ (0, 1]
    let lp = e.log1p_unit(); // log(1 + e^{-|x|})
    let sp_pos = x.relu() + lp; // softplus(x) = -log σ(-x)
    let sp_neg = (-x).relu() + lp; // softplus(-x) = -log σ(x)
    let inv = one / (one + e);
    let pos = x >= A::ZERO;
    let s_pos = if pos { inv } else { e * inv }; // σ(x)
    let s_neg = if pos { e * inv } else { inv }; // σ(-x) = 1 - σ(x), no cancellation
    let u = one - t;
    // σ(x) - t = σ(x)(1-t) - σ(-x)t: no cancellation at σ(x) → t = 1.
    let d = s_pos * u - s_neg * t;
    let ce = t * sp_neg + u * sp_pos; // BCE with logits, both terms ≥ 0
    (d.abs(), ce, d)
}

/// Histogram op: `(logits, targets) -> [bins + 1]` i64 (per-bin counts, then valid elements).
/// On the CPU the same pass leaves the per-bin BCE sums in `sums`.
struct GhmcHist {
    bins: usize,
    kind: TargetKind,
    sums: std::sync::Mutex<Option<Vec<f64>>>,
}

/// Parameters of the loss ops.
#[derive(Clone)]
struct GhmcOp {
    bins: usize,
    kind: TargetKind,
    reduction: Reduction,
    /// `tot = max(valid elements, 1)`.
    mean_denom: f64,
    /// Per-bin weights `β_b` `[bins]` in the accumulator dtype, fixed by the forward.
    weights: Tensor,
    /// The reduced loss when the CPU histogram pass already gave it.
    cpu_loss: Option<f64>,
}

fn check_dense_target<A: Acc>(t: A) -> Result<()> {
    if t < A::ZERO || t > A::ONE {
        bail!(
            "{NAME}: dense targets must be in [0, 1], got {}",
            t.to_f64()
        )
    }
    Ok(())
}

/// Per-chunk histogram: `COPIES` interleaved copies of the counts and BCE sums (element `j`
/// of a row goes to copy `j % COPIES`), so that runs of elements in the same bin do not wait on
/// each other's store; folded in copy order at the end of the chunk (a fixed order).
const COPIES: usize = 4;

/// One chunk's counts per bin, BCE sums per slot (bins + NaN) and number of valid elements.
type ChunkHist = (Vec<u64>, Vec<f64>, u64);

impl GhmcHist {
    /// Counts per bin, then the number of valid elements (`[bins + 1]`), and the BCE sum per
    /// bin plus one for the NaN elements (`[bins + 1]`, f64): one pass, from which the loss of
    /// any scalar reduction follows.
    fn cpu_t<T: Elem>(
        &self,
        x: &[T],
        tg: &CpuTargets<'_, T>,
        n: usize,
        c: usize,
    ) -> Result<(Vec<i64>, Vec<f64>)> {
        let bins = self.bins;
        // Slot `bins` collects the NaN elements (valid, in no bin).
        let slots = bins + 1;
        let rpc = rows_per_chunk(c);
        let parts: Vec<ChunkHist> = map_indices(
            n.div_ceil(rpc),
            #[inline(always)]
            |ci| {
                let mut cnt: [Vec<u64>; COPIES] = std::array::from_fn(|_| vec![0; slots]);
                let mut sum: [Vec<f64>; COPIES] = std::array::from_fn(|_| vec![0.0; slots]);
                let mut valid = 0u64;
                let mut sc = Scratch::<T::A>::new(c);
                for i in ci * rpc..((ci + 1) * rpc).min(n) {
                    if !sc.load(tg, i, c)? {
                        continue;
                    }
                    sc.eval::<T>(&x[i * c..(i + 1) * c], bins);
                    // `[..=bins]`: a slot index `min(b, bins)` needs no bounds check.
                    let mut cq = cnt.each_mut().map(|v| &mut v[..=bins]);
                    let mut sq = sum.each_mut().map(|v| &mut v[..=bins]);
                    let mut add = |q: usize, b: i32, ce: T::A| {
                        let k = (b as usize).min(bins);
                        cq[q][k] += 1;
                        sq[q][k] += Acc::to_f64(ce);
                    };
                    // Element `j` into copy `j % COPIES`, in order.
                    let (bs, es) = (sc.bin.chunks_exact(COPIES), sc.ce.chunks_exact(COPIES));
                    let (br, er) = (bs.remainder(), es.remainder());
                    for (bq, eq) in bs.zip(es) {
                        for q in 0..COPIES {
                            add(q, bq[q], eq[q]);
                        }
                    }
                    for (q, (&b, &ce)) in br.iter().zip(er).enumerate() {
                        add(q, b, ce);
                    }
                    valid += c as u64;
                }
                // The copies folded into the first, in copy order.
                let [mut cnt, cnt_rest @ ..] = cnt;
                let [mut sum, sum_rest @ ..] = sum;
                for (cw, sw) in cnt_rest.iter().zip(&sum_rest) {
                    cnt.iter_mut().zip(cw).for_each(|(a, b)| *a += *b);
                    sum.iter_mut().zip(sw).for_each(|(a, b)| *a += *b);
                }
                cnt.truncate(bins);
                Ok((cnt, sum, valid))
            },
        )?;
        let mut hist = vec![0i64; bins + 1];
        let mut sums = vec![0f64; slots];
        for p in parts {
            let (cnt, sum, valid) = p;
            for (a, b) in hist.iter_mut().zip(&cnt) {
                *a += *b as i64;
            }
            for (a, b) in sums.iter_mut().zip(&sum) {
                *a += *b;
            }
            hist[bins] += valid as i64;
        }
        Ok((hist, sums))
    }
}

impl CustomOp2 for GhmcHist {
    fn name(&self) -> &'static str {
        "ghmc-hist"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CpuOut {
        emulate!("ghmc-hist", |g| gpu::hist(
            g,
            self.bins,
            self.kind,
            crate::gpu::arg(s1, l1),
            crate::gpu::arg(s2, l2)
        ));
        let (n, c) = layout_dims2(NAME, l1)?;
        let (h, sums) = with_float_type!(NAME, s1.dtype(), T, {
            let x = cpu_slice::<T>(NAME, s1, l1)?;
            let tg = CpuTargets::<T>::new(NAME, self.kind, s2, l2)?;
            self.cpu_t(x, &tg, n, c)?
        });
        if let Ok(mut s) = self.sums.lock() {
            *s = Some(sums);
        }
        Ok((CpuStorage::I64(h), Shape::from(self.bins + 1)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = crate::gpu::cuda::Cuda::of(s1);
        let (x, tg) = (crate::gpu::arg(s1, l1), crate::gpu::arg(s2, l2));
        gpu::hist(&g, self.bins, self.kind, x, tg)
    }
}

impl GhmcOp {
    /// The weights with a last entry for the NaN slot (any value: NaN · w stays NaN).
    fn cpu_weights_ext<A: Acc>(&self) -> Result<Vec<A>> {
        let mut w = A::host_vec(NAME, "bin weights", &self.weights)?;
        w.resize(self.bins + 1, A::ZERO);
        Ok(w)
    }

    fn cpu_fwd_t<T: Elem>(&self, inp: &CpuInputs<'_, T>) -> CpuOut {
        let ((n, c), x, tg) = (inp.dims2(NAME)?, inp.x, &inp.t);
        if self.reduction.is_scalar() {
            let Some(loss) = self.cpu_loss else {
                bail!("{NAME}: internal error: the histogram pass gave no loss")
            };
            let out = vec![T::from_acc(<T::A as Acc>::from_f64(loss))];
            return Ok((T::to_cpu_storage_owned(out), Shape::from(())));
        }
        let bins = self.bins;
        let w = self.cpu_weights_ext::<T::A>()?;
        let rpc = rows_per_chunk(c);
        let mut out = zeroed_vec::<T>(n * c)?;
        map_chunks(
            &mut out,
            rpc * c,
            #[inline(always)]
            |ci, o| {
                let mut sc = Scratch::<T::A>::new(c);
                for (r, orow) in o.chunks_mut(c).enumerate() {
                    let i = ci * rpc + r;
                    if !sc.load(tg, i, c)? {
                        continue;
                    }
                    sc.eval::<T>(&x[i * c..(i + 1) * c], bins);
                    for ((oj, &b), &ce) in orow.iter_mut().zip(&sc.bin).zip(&sc.ce) {
                        *oj = T::from_acc(w[(b as usize).min(bins)] * ce);
                    }
                }
                Ok(())
            },
        )?;
        Ok((T::to_cpu_storage_owned(out), Shape::from((n, c))))
    }

    /// `∂loss/∂logits` (`WRT_T` false: `β·(σ(x) − t)`) or `∂loss/∂targets` of dense targets
    /// (`WRT_T`: `−β·x`, BCE's derivative in `t`), the weights `β` held constant (mmdet).
    fn cpu_bwd_t<T: Elem, const WRT_T: bool>(&self, inp: &CpuInputs<'_, T>, up: &[T]) -> CpuOut {
        let ((n, c), x, tg) = (inp.dims2(NAME)?, inp.x, &inp.t);
        let bins = self.bins;
        let w_ext = self.cpu_weights_ext::<T::A>()?;
        // `w[..=bins]`: the lookup's index is at most `bins`, with no bounds check left.
        let w = &w_ext[..=bins];
        let scalar_up = self.reduction.is_scalar();
        if scalar_up && up.len() != 1 || !scalar_up && up.len() != n * c {
            bail!("{NAME}: upstream gradient has {} elements", up.len())
        }
        let scale = self.reduction.scale(self.mean_denom);
        let base = <T::A as Acc>::from_f64(if scalar_up {
            Acc::to_f64(up[0].to_acc()) * scale
        } else {
            scale
        });
        let rpc = rows_per_chunk(c);
        let mut g = zeroed_vec::<T>(n * c)?;
        map_chunks(
            &mut g,
            rpc * c,
            #[inline(always)]
            |ci, gc| {
                let mut sc = Scratch::<T::A>::new(c);
                for (r, grow) in gc.chunks_mut(c).enumerate() {
                    let i = ci * rpc + r;
                    if !sc.load(tg, i, c)? {
                        continue;
                    }
                    let xr = &x[i * c..(i + 1) * c];
                    sc.eval_d::<T>(xr, bins);
                    if WRT_T {
                        // ∂BCE/∂t = −x.
                        for (d, xv) in sc.d.iter_mut().zip(xr) {
                            *d = -xv.to_acc();
                        }
                    }
                    // β·(σ(x) - t) (or β·(−x)), the weights held constant.
                    let it = grow.iter_mut().zip(&sc.bin).zip(&sc.d);
                    if scalar_up {
                        for ((gj, &b), &d) in it {
                            *gj = T::from_acc(base * (w[(b as usize).min(bins)] * d));
                        }
                    } else {
                        let ur = &up[i * c..(i + 1) * c];
                        for (((gj, &b), &d), u) in it.zip(ur) {
                            let wd = w[(b as usize).min(bins)] * d;
                            *gj = T::from_acc(base * u.to_acc() * wd);
                        }
                    }
                }
                Ok(())
            },
        )?;
        Ok((T::to_cpu_storage_owned(g), Shape::from((n, c))))
    }
}

impl LossKernel for GhmcOp {
    fn names(&self) -> Names {
        Names {
            loss: NAME,
            fwd: "ghmc-fwd",
            bwd: "ghmc-bwd",
        }
    }

    fn target_kind(&self) -> TargetKind {
        self.kind
    }

    /// Dense float targets: BCE's `−x` times the bin weights (held constant, as mmdet).
    fn target_grad(&self) -> TargetGrad {
        TargetGrad::Kernel
    }

    /// The loss (the weights are those of the histogram pass: no gradient is saved).
    fn cpu_forward<T: Elem>(&self, inp: &CpuInputs<'_, T>, _saved: Option<&SavedGrad>) -> CpuOut {
        self.cpu_fwd_t(inp)
    }

    fn cpu_backward<T: Elem>(&self, inp: &CpuInputs<'_, T>, up: &[T]) -> CpuOut {
        self.cpu_bwd_t::<T, false>(inp, up)
    }

    fn cpu_target_backward<T: Elem>(&self, inp: &CpuInputs<'_, T>, up: &[T]) -> CpuOut {
        self.cpu_bwd_t::<T, true>(inp, up)
    }

    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    fn gpu_target_backward<G: crate::gpu::Gpu, T: crate::gpu::DevFloat>(
        &self,
        g: &G,
        a: crate::gpu::BwdIn<'_, G>,
    ) -> crate::gpu::Out<G> {
        gpu::grad::<G, T>(g, self, a, true)
    }

    crate::op::gpu_kernel_methods!();
}

/// The CUDA launch plans (feature `cuda`, and `cuda-emu` on the emulated backend).
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
mod gpu;

#[cfg(test)]
mod tests {
    use super::bin_of;

    /// mmdet's bin by a linear search of its edges (`i / bins` in f32, the last `1 + 1e-6`):
    /// the `b` with `edge(b) ≤ g < edge(b + 1)`, `bins` when there is none (NaN).
    fn searched(g: f32, bins: usize) -> i32 {
        let edge = |i: usize| {
            if i == bins {
                1.0 + 1e-6
            } else {
                i as f32 / bins as f32
            }
        };
        (0..bins)
            .find(|&b| g >= edge(b) && g < edge(b + 1))
            .map_or(bins as i32, |b| b as i32)
    }

    #[test]
    fn bin_of_matches_the_edge_search_at_and_around_every_edge() {
        for bins in [1usize, 2, 3, 7, 10, 29, 30, 31, 64, 1000] {
            let mut gs = vec![
                0.0f32,
                1.0,
                f32::NAN,
                f32::MIN_POSITIVE,
                1.0 - f32::EPSILON / 2.0,
            ];
            for i in 0..=bins {
                let e = i as f32 / bins as f32;
                let below = f32::from_bits(e.to_bits().saturating_sub(1));
                gs.extend([e, below, f32::from_bits(e.to_bits() + 1)]);
            }
            for g in gs
                .into_iter()
                .filter(|g| g.is_nan() || (0.0..=1.0).contains(g))
            {
                let b = bin_of(g, bins as i32, bins as f32, bins as f32);
                assert_eq!(b, searched(g, bins), "bins {bins}, g {g:e}");
                let b64 = bin_of(g as f64, bins as i32, bins as f64, bins as f32);
                assert_eq!(b64, searched(g, bins), "f64, bins {bins}, g {g:e}");
            }
        }
    }
}
