//! Gradient harmonizing classification loss (GHM-C, Li et al. 2019) with mmdet's semantics: a
//! fused histogram pass over the gradient norms, per-bin weights on the host (with the optional
//! running histogram), then a fused weighted-BCE pass whose backward reuses those weights.

use crate::common::{
    self, check_float_2d, cpu_slice, layout_dims2, ordered_sum, rows_per_chunk, Acc, CpuTargets,
    Elem, RowLabel, RowTarget, TargetKind,
};
use crate::fastmath;
use crate::reduction::Reduction;
use candle_core::backend::BackendStorage;
use candle_core::{
    bail, CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor, WithDType,
};
use rayon::prelude::*;

const NAME: &str = "GhmcLoss";

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
/// reuses the weights of its own forward even when the running histogram has moved on. The
/// histogram is one fused pass over the inputs (per-chunk histograms merged in a fixed order);
/// the loss and its reduction are a second fused pass.
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
///
/// # Errors
///
/// Every message starts with `GhmcLoss:`. `bins = 0`; `momentum` outside `[0, 1)`; logits not
/// of rank 2 or not a float dtype; targets of another shape, dtype or device; a label outside
/// `0..=C` and not `-1`; a dense target outside `[0, 1]`; `AvgFactor` not finite and > 0.
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
    /// Computes the loss of `logits` `[N, C]` against `targets` (labels `[N]` or dense
    /// `[N, C]`), updating the running histogram when `momentum > 0`.
    pub fn forward(&mut self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        self.reduction.validate(NAME)?;
        let bins = self.bins;
        if bins == 0 {
            bail!("{NAME}: bins must be >= 1, got 0")
        }
        let mom = self.momentum;
        if !(0.0..1.0).contains(&mom) {
            bail!("{NAME}: momentum must be in [0, 1), got {mom}")
        }
        let (n, c) = check_float_2d(NAME, "logits", logits)?;
        let kind = common::target_kind(NAME, logits, targets, n, c)?;
        let x = logits.contiguous()?;
        let tg = targets.contiguous()?;
        // Pass 1: the histogram of g over the valid elements, plus their number (last entry).
        let hist = x
            .detach()
            .apply_op2_no_bwd(&tg, &GhmcHist { bins, kind })?
            .to_vec1::<i64>()?;
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
        let acc = common::acc_dtype(logits.dtype());
        let weights = Tensor::new(weights, logits.device())?.to_dtype(acc)?;
        let op = GhmcOp {
            bins,
            kind,
            reduction: self.reduction,
            mean_denom: tot,
            weights,
        };
        // Pass 2: the weighted BCE, reduced in the kernel.
        x.apply_op2(&tg, GhmcFwd(op))
    }
}

/// `σ` and softplus in the accumulator type (f32: the crate's branch-free fast versions).
pub(crate) trait Logistic: Acc {
    fn sigmoid(self) -> Self;
    fn softplus(self) -> Self;
}

impl Logistic for f32 {
    #[inline(always)]
    fn sigmoid(self) -> Self {
        fastmath::sigmoid_f32(self)
    }
    #[inline(always)]
    fn softplus(self) -> Self {
        fastmath::softplus_f32(self)
    }
}

impl Logistic for f64 {
    #[inline(always)]
    fn sigmoid(self) -> Self {
        let e = (-self.abs()).exp();
        if self >= 0.0 {
            1.0 / (1.0 + e)
        } else {
            e / (1.0 + e)
        }
    }
    #[inline(always)]
    fn softplus(self) -> Self {
        // max ignores NaN, the log1p term carries it
        self.max(0.0) + (-self.abs()).exp().ln_1p()
    }
}

/// mmdet's bin edges: `i / bins` in f32, the last raised by 1e-6 (in f32), in the accumulator
/// type.
fn edges<A: Acc>(bins: usize) -> Vec<A> {
    let mut e: Vec<A> = (0..=bins)
        .map(|i| A::from_f64((i as f32 / bins as f32) as f64))
        .collect();
    e[bins] = A::from_f64((1f32 + 1e-6f32) as f64);
    e
}

/// The bin `b` with `edges[b] ≤ g < edges[b+1]` of a finite `g ∈ [0, 1]`: the guess
/// `⌊g·bins⌋` corrected by one step against the f32 edges.
#[inline(always)]
fn bin_of<A: Acc>(g: A, edges: &[A], bins: usize) -> usize {
    let guess = (g * A::from_f64(bins as f64)).to_f64();
    let mut b = if guess > 0.0 {
        (guess as usize).min(bins - 1)
    } else {
        0
    };
    if b > 0 && g < edges[b] {
        b -= 1;
    } else if b + 1 < bins && g >= edges[b + 1] {
        b += 1;
    }
    b
}

/// `(g, bce, σ(x) - t)` of one element, `g = |σ(x) - t|` (mmdet's gradient norm).
#[inline(always)]
fn elem<A: Logistic>(x: A, t: A) -> (A, A, A) {
    // σ(x) - t = σ(x)(1-t) - σ(-x)t: no cancellation at σ(x) → t = 1 (e^{-|x|} is shared by the
    // two sigmoids and the two softplus terms after inlining).
    let d = x.sigmoid() * (A::ONE - t) - (-x).sigmoid() * t;
    let ce = t * (-x).softplus() + (A::ONE - t) * x.softplus(); // BCE with logits, both ≥ 0
    (d.abs(), ce, d)
}

/// The targets of one row.
enum RowT<'a, T> {
    Dense(&'a [T]),
    /// Class `0..C` or background `C`.
    Label(usize),
    Ignored,
}

/// Row `i` of the targets in GHM-C's form.
#[inline(always)]
fn ghm_row<'a, T: Elem>(tg: &CpuTargets<'a, T>, i: usize, c: usize) -> Result<RowT<'a, T>> {
    Ok(match tg.row(NAME, i, c)? {
        RowTarget::Dense(d) => RowT::Dense(d),
        RowTarget::Label(RowLabel::Ignored) => RowT::Ignored,
        RowTarget::Label(RowLabel::Class(k)) => RowT::Label(k),
    })
}

/// Histogram op: `(logits, targets) -> [bins + 1]` i64 (per-bin counts, then valid elements).
struct GhmcHist {
    bins: usize,
    kind: TargetKind,
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
}

/// Forward op: `(logits, targets) -> loss`.
struct GhmcFwd(GhmcOp);
/// Backward op: `(logits, targets, upstream) -> ∂loss/∂logits`.
struct GhmcBwd(GhmcOp);

fn check_dense_target<A: Acc>(t: A) -> Result<()> {
    if t < A::ZERO || t > A::ONE {
        bail!(
            "{NAME}: dense targets must be in [0, 1], got {}",
            t.to_f64()
        )
    }
    Ok(())
}

impl GhmcHist {
    fn cpu_t<T: Elem>(
        &self,
        x: &[T],
        tg: &CpuTargets<'_, T>,
        n: usize,
        c: usize,
    ) -> Result<Vec<i64>>
    where
        T::A: Logistic,
    {
        let bins = self.bins;
        let e = edges::<T::A>(bins);
        let rpc = rows_per_chunk(c);
        // Per-chunk histograms (integer counts, merged below in chunk order).
        let parts: Vec<Result<Vec<u64>>> = (0..n.div_ceil(rpc))
            .into_par_iter()
            .map(|ci| {
                let mut h = vec![0u64; bins + 1];
                for i in ci * rpc..((ci + 1) * rpc).min(n) {
                    let xr = &x[i * c..(i + 1) * c];
                    let mut add = |xv: T::A, t: T::A| {
                        let g = elem(xv, t).0;
                        // g ∈ [0, 1]; a NaN g (NaN input) is valid but in no bin, as in mmdet.
                        if g <= T::A::ONE {
                            h[bin_of(g, &e, bins)] += 1;
                        }
                    };
                    match ghm_row(tg, i, c)? {
                        RowT::Ignored => continue,
                        RowT::Label(k) => {
                            for (j, xv) in xr.iter().enumerate() {
                                let t = if j == k { T::A::ONE } else { T::A::ZERO };
                                add(xv.to_acc(), t);
                            }
                        }
                        RowT::Dense(tr) => {
                            for (xv, tv) in xr.iter().zip(tr) {
                                let t = tv.to_acc();
                                check_dense_target(t)?;
                                add(xv.to_acc(), t);
                            }
                        }
                    }
                    h[bins] += c as u64;
                }
                Ok(h)
            })
            .collect();
        let mut hist = vec![0u64; bins + 1];
        for p in parts {
            for (a, b) in hist.iter_mut().zip(p?) {
                *a += b;
            }
        }
        Ok(hist.into_iter().map(|v| v as i64).collect())
    }
}

impl CustomOp2 for GhmcHist {
    fn name(&self) -> &'static str {
        "ghmc-hist"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c) = layout_dims2(NAME, l1)?;
        let h = crate::common::with_float_type!(NAME, s1.dtype(), T, {
            let x = cpu_slice::<T>(NAME, s1, l1)?;
            let tg = CpuTargets::<T>::new(NAME, self.kind, s2, l2)?;
            self.cpu_t(x, &tg, n, c)?
        });
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
        let (n, c) = layout_dims2(NAME, l1)?;
        cuda::hist(self.bins, self.kind, s1, l1, s2, l2, n, c)
    }
}

impl GhmcOp {
    /// The per-bin weights as a host vector (CPU storage only).
    fn cpu_weights<A: Acc + WithDType>(&self) -> Result<Vec<A>> {
        let (st, l) = self.weights.storage_and_layout();
        match &*st {
            Storage::Cpu(s) => Ok(cpu_slice::<A>(NAME, s, l)?.to_vec()),
            _ => bail!("{NAME}: bin weights are not on the CPU"),
        }
    }

    fn cpu_fwd_t<T: Elem>(
        &self,
        x: &[T],
        tg: &CpuTargets<'_, T>,
        n: usize,
        c: usize,
    ) -> Result<(CpuStorage, Shape)>
    where
        T::A: Logistic + WithDType,
    {
        let bins = self.bins;
        let e = edges::<T::A>(bins);
        let w = self.cpu_weights::<T::A>()?;
        let zero = T::from_acc(T::A::ZERO);
        // β·bce of one element.
        let el = |xv: T::A, t: T::A| -> T::A {
            let (g, ce, _) = elem(xv, t);
            w[bin_of(g, &e, bins)] * ce
        };
        let rpc = rows_per_chunk(c);
        if self.reduction == Reduction::None {
            let mut out = vec![zero; n * c];
            let res: Vec<Result<()>> = out
                .par_chunks_mut((rpc * c).max(1))
                .enumerate()
                .map(|(ci, o)| {
                    for (r, orow) in o.chunks_mut(c).enumerate() {
                        let i = ci * rpc + r;
                        let xr = &x[i * c..(i + 1) * c];
                        match ghm_row(tg, i, c)? {
                            RowT::Ignored => {}
                            RowT::Label(k) => {
                                for (j, (oj, xv)) in orow.iter_mut().zip(xr).enumerate() {
                                    let t = if j == k { T::A::ONE } else { T::A::ZERO };
                                    *oj = T::from_acc(el(xv.to_acc(), t));
                                }
                            }
                            RowT::Dense(tr) => {
                                for ((oj, xv), tv) in orow.iter_mut().zip(xr).zip(tr) {
                                    *oj = T::from_acc(el(xv.to_acc(), tv.to_acc()));
                                }
                            }
                        }
                    }
                    Ok(())
                })
                .collect();
            res.into_iter().collect::<Result<Vec<()>>>()?;
            return Ok((T::to_cpu_storage_owned(out), Shape::from((n, c))));
        }
        let parts: Vec<Result<f64>> = (0..n.div_ceil(rpc))
            .into_par_iter()
            .map(|ci| {
                let mut s = 0f64;
                for i in ci * rpc..((ci + 1) * rpc).min(n) {
                    let xr = &x[i * c..(i + 1) * c];
                    let mut rs = T::A::ZERO;
                    match ghm_row(tg, i, c)? {
                        RowT::Ignored => {}
                        RowT::Label(k) => {
                            for (j, xv) in xr.iter().enumerate() {
                                let t = if j == k { T::A::ONE } else { T::A::ZERO };
                                rs += el(xv.to_acc(), t);
                            }
                        }
                        RowT::Dense(tr) => {
                            for (xv, tv) in xr.iter().zip(tr) {
                                rs += el(xv.to_acc(), tv.to_acc());
                            }
                        }
                    }
                    s += Acc::to_f64(rs);
                }
                Ok(s)
            })
            .collect();
        let parts = parts.into_iter().collect::<Result<Vec<f64>>>()?;
        let total = ordered_sum(&parts) * self.reduction.scale(self.mean_denom);
        let out = vec![T::from_acc(<T::A as Acc>::from_f64(total))];
        Ok((T::to_cpu_storage_owned(out), Shape::from(())))
    }

    fn cpu_bwd_t<T: Elem>(
        &self,
        x: &[T],
        tg: &CpuTargets<'_, T>,
        up: &[T],
        n: usize,
        c: usize,
    ) -> Result<(CpuStorage, Shape)>
    where
        T::A: Logistic + WithDType,
    {
        let bins = self.bins;
        let e = edges::<T::A>(bins);
        let w = self.cpu_weights::<T::A>()?;
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
        // β·(σ(x) - t), the weights held constant.
        let el = |xv: T::A, t: T::A| -> T::A {
            let (g, _, d) = elem(xv, t);
            w[bin_of(g, &e, bins)] * d
        };
        let rpc = rows_per_chunk(c);
        let mut g = vec![T::from_acc(T::A::ZERO); n * c];
        let res: Vec<Result<()>> = g
            .par_chunks_mut((rpc * c).max(1))
            .enumerate()
            .map(|(ci, gc)| {
                for (r, grow) in gc.chunks_mut(c).enumerate() {
                    let i = ci * rpc + r;
                    let xr = &x[i * c..(i + 1) * c];
                    let upv = |j: usize| {
                        if scalar_up {
                            T::A::ONE
                        } else {
                            up[i * c + j].to_acc()
                        }
                    };
                    match ghm_row(tg, i, c)? {
                        RowT::Ignored => {}
                        RowT::Label(k) => {
                            for (j, (gj, xv)) in grow.iter_mut().zip(xr).enumerate() {
                                let t = if j == k { T::A::ONE } else { T::A::ZERO };
                                *gj = T::from_acc(base * upv(j) * el(xv.to_acc(), t));
                            }
                        }
                        RowT::Dense(tr) => {
                            for (j, ((gj, xv), tv)) in grow.iter_mut().zip(xr).zip(tr).enumerate() {
                                *gj = T::from_acc(base * upv(j) * el(xv.to_acc(), tv.to_acc()));
                            }
                        }
                    }
                }
                Ok(())
            })
            .collect();
        res.into_iter().collect::<Result<Vec<()>>>()?;
        Ok((T::to_cpu_storage_owned(g), Shape::from((n, c))))
    }
}

impl CustomOp2 for GhmcFwd {
    fn name(&self) -> &'static str {
        "ghmc-fwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c) = layout_dims2(NAME, l1)?;
        crate::common::with_float_type!(NAME, s1.dtype(), T, {
            let x = cpu_slice::<T>(NAME, s1, l1)?;
            let tg = CpuTargets::<T>::new(NAME, self.0.kind, s2, l2)?;
            self.0.cpu_fwd_t(x, &tg, n, c)
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, c) = layout_dims2(NAME, l1)?;
        cuda::forward(&self.0, s1, l1, s2, l2, n, c)
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let up = grad_res.contiguous()?;
        let g = logits.apply_op3_no_bwd(targets, &up, &GhmcBwd(self.0.clone()))?;
        Ok((Some(g), None))
    }
}

impl CustomOp3 for GhmcBwd {
    fn name(&self) -> &'static str {
        "ghmc-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c) = layout_dims2(NAME, l1)?;
        crate::common::with_float_type!(NAME, s1.dtype(), T, {
            let x = cpu_slice::<T>(NAME, s1, l1)?;
            let tg = CpuTargets::<T>::new(NAME, self.0.kind, s2, l2)?;
            let up = cpu_slice::<T>(NAME, s3, l3)?;
            self.0.cpu_bwd_t(x, &tg, up, n, c)
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, c) = layout_dims2(NAME, l1)?;
        cuda::backward(&self.0, s1, l1, s2, l2, s3, l3, n, c)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use super::{GhmcOp, NAME};
    use crate::common::{Elem, TargetKind};
    use crate::cuda::{self as kc, ptx};
    use crate::reduction::Reduction;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, DeviceRepr, PushKernelArg, ValidAsZeroBits,
    };
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{bail, CudaDevice, CudaStorage, Layout, Result, Shape};

    const MODULE: &str = "candle_detloss_ghm";
    /// Histograms of at most this many bins live in shared memory (u32 per bin).
    const SHARED_MAX_BINS: usize = 8192;

    /// Turns the kernels' `[flag, value]` error buffer into an `Err` (1: label, 2: dense target).
    fn check_flag(dev: &CudaDevice, err: &CudaSlice<u64>, c: usize) -> Result<()> {
        let v = dev.clone_dtoh(err)?;
        match v.first().copied().unwrap_or(0) {
            0 => Ok(()),
            2 => bail!("{NAME}: dense targets must be in [0, 1]"),
            _ => kc::check_label_flag(NAME, dev, err, c),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn hist_t<T>(
        bins: usize,
        kind: TargetKind,
        dev: &CudaDevice,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        n: usize,
        c: usize,
    ) -> Result<(CudaStorage, Shape)>
    where
        T: Elem + DeviceRepr + CudaDType,
    {
        let sfx = format!(
            "{}_{}",
            kc::dtype_suffix(T::DTYPE)?,
            kc::target_suffix(kind)
        );
        let x: CudaView<'_, T> = kc::view(NAME, s1, l1)?;
        let total = (n * c) as u64;
        let (nn, cc) = (n as u64, c as u64);
        let err = dev.alloc_zeros::<u64>(2)?;
        // u64 counts in the kernel; an i64 tensor (same bits, counts < 2^63) for candle.
        let counts = dev.alloc_zeros::<i64>(bins + 1)?;
        if total > 0 {
            let global = (bins > SHARED_MAX_BINS) as i32;
            let mut cfg = kc::grid(total, kc::MAX_PARTIAL_BLOCKS);
            if global == 0 {
                cfg.shared_mem_bytes = (bins * 4) as u32;
            }
            let nbins = bins as i32;
            let f = dev.get_or_load_custom_func(&format!("ghmc_hist_{sfx}"), MODULE, ptx::GHM)?;
            kc::with_targets!(NAME, kind, T, s2, l2, tg, {
                let mut b = f.builder();
                b.arg(&x)
                    .arg(&tg)
                    .arg(&nn)
                    .arg(&cc)
                    .arg(&nbins)
                    .arg(&global);
                b.arg(&counts).arg(&err);
                kc::launched(unsafe { b.launch(cfg) })?;
            });
        }
        check_flag(dev, &err, c)?;
        Ok((
            CudaStorage::wrap_cuda_slice(counts, dev.clone()),
            Shape::from(bins + 1),
        ))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn hist(
        bins: usize,
        kind: TargetKind,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        n: usize,
        c: usize,
    ) -> Result<(CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let dev = s1.device().clone();
        crate::common::dispatch_float!(
            NAME,
            s1.dtype(),
            hist_t,
            bins,
            kind,
            &dev,
            s1,
            l1,
            s2,
            l2,
            n,
            c
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn fwd_t<T>(
        op: &GhmcOp,
        dev: &CudaDevice,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        n: usize,
        c: usize,
    ) -> Result<(CudaStorage, Shape)>
    where
        T: Elem + DeviceRepr + CudaDType,
        T::A: DeviceRepr + CudaDType + ValidAsZeroBits,
    {
        let sfx = format!(
            "{}_{}",
            kc::dtype_suffix(T::DTYPE)?,
            kc::target_suffix(op.kind)
        );
        let x: CudaView<'_, T> = kc::view(NAME, s1, l1)?;
        let total = (n * c) as u64;
        let (nn, cc) = (n as u64, c as u64);
        let nbins = op.bins as i32;
        let err = dev.alloc_zeros::<u64>(2)?;
        let out = kc::param_slice::<T::A, _>(NAME, &op.weights, |w| {
            if op.reduction == Reduction::None {
                let out = unsafe { dev.alloc::<T>(n * c)? };
                if total > 0 {
                    let f = dev.get_or_load_custom_func(
                        &format!("ghmc_fwd_none_{sfx}"),
                        MODULE,
                        ptx::GHM,
                    )?;
                    kc::with_targets!(NAME, op.kind, T, s2, l2, tg, {
                        let mut b = f.builder();
                        b.arg(&x).arg(&tg).arg(w).arg(&out).arg(&nn).arg(&cc);
                        b.arg(&nbins).arg(&err);
                        kc::launched(unsafe { b.launch(kc::grid_elems(total)) })?;
                    });
                }
                return Ok(out);
            }
            let cfg = kc::grid(total, kc::MAX_PARTIAL_BLOCKS);
            let nparts = cfg.grid_dim.0 as i32;
            let psum = dev.alloc_zeros::<T::A>(nparts as usize)?;
            if total > 0 {
                let f = dev.get_or_load_custom_func(
                    &format!("ghmc_fwd_partial_{sfx}"),
                    MODULE,
                    ptx::GHM,
                )?;
                kc::with_targets!(NAME, op.kind, T, s2, l2, tg, {
                    let mut b = f.builder();
                    b.arg(&x).arg(&tg).arg(w).arg(&psum).arg(&nn).arg(&cc);
                    b.arg(&nbins).arg(&err);
                    kc::launched(unsafe { b.launch(cfg) })?;
                });
            }
            let out = unsafe { dev.alloc::<T>(1)? };
            let f = dev.get_or_load_custom_func(
                &format!("ghmc_finalize_{}", kc::dtype_suffix(T::DTYPE)?),
                MODULE,
                ptx::GHM,
            )?;
            let scale = op.reduction.scale(op.mean_denom);
            let mut b = f.builder();
            b.arg(&psum).arg(&nparts).arg(&scale).arg(&out);
            kc::launched(unsafe { b.launch(kc::grid(1, 1)) })?;
            Ok(out)
        })?;
        let shape = if op.reduction == Reduction::None {
            Shape::from((n, c))
        } else {
            Shape::from(())
        };
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), shape))
    }

    #[allow(clippy::too_many_arguments)]
    fn bwd_t<T>(
        op: &GhmcOp,
        dev: &CudaDevice,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
        n: usize,
        c: usize,
    ) -> Result<(CudaStorage, Shape)>
    where
        T: Elem + DeviceRepr + CudaDType,
        T::A: DeviceRepr + CudaDType + ValidAsZeroBits,
    {
        let sfx = format!(
            "{}_{}",
            kc::dtype_suffix(T::DTYPE)?,
            kc::target_suffix(op.kind)
        );
        let x: CudaView<'_, T> = kc::view(NAME, s1, l1)?;
        let up: CudaView<'_, T> = kc::view(NAME, s3, l3)?;
        let total = (n * c) as u64;
        let (nn, cc) = (n as u64, c as u64);
        let nbins = op.bins as i32;
        let up_scalar = op.reduction.is_scalar() as i32;
        let scale = op.reduction.scale(op.mean_denom);
        let err = dev.alloc_zeros::<u64>(2)?;
        let g = kc::param_slice::<T::A, _>(NAME, &op.weights, |w| {
            let g = unsafe { dev.alloc::<T>(n * c)? };
            if total > 0 {
                let f =
                    dev.get_or_load_custom_func(&format!("ghmc_bwd_{sfx}"), MODULE, ptx::GHM)?;
                kc::with_targets!(NAME, op.kind, T, s2, l2, tg, {
                    let mut b = f.builder();
                    b.arg(&x).arg(&tg).arg(w).arg(&up).arg(&up_scalar).arg(&g);
                    b.arg(&nn).arg(&cc).arg(&nbins).arg(&scale).arg(&err);
                    kc::launched(unsafe { b.launch(kc::grid_elems(total)) })?;
                });
            }
            Ok(g)
        })?;
        Ok((
            CudaStorage::wrap_cuda_slice(g, dev.clone()),
            Shape::from((n, c)),
        ))
    }

    pub(super) fn forward(
        op: &GhmcOp,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        n: usize,
        c: usize,
    ) -> Result<(CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let dev = s1.device().clone();
        crate::common::dispatch_float!(NAME, s1.dtype(), fwd_t, op, &dev, s1, l1, s2, l2, n, c)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(
        op: &GhmcOp,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
        n: usize,
        c: usize,
    ) -> Result<(CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let dev = s1.device().clone();
        crate::common::dispatch_float!(
            NAME,
            s1.dtype(),
            bwd_t,
            op,
            &dev,
            s1,
            l1,
            s2,
            l2,
            s3,
            l3,
            n,
            c
        )
    }
}
