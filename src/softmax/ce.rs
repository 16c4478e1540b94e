//! Softmax cross-entropy: the public config and its forward (the row kernel is the family's).

use super::{apply, Kind, CE_NAME};
use crate::reduction::Reduction;
use candle_core::{bail, Result, Tensor};

/// Softmax cross-entropy with class weights, ignored rows and label smoothing, fused into one
/// custom op with a hand-written backward; the Faster R-CNN classification loss.
///
/// # Formula
///
/// For a row of logits `x` (`K` classes), label `y`, `lse = log Σ_k e^{x_k}`, class weights `w`
/// (all 1 when `class_weights` is `None`), `W = Σ_k w_k` and smoothing `ε`:
///
/// ```text
/// l = (1-ε)·w_y·(lse - x_y) + (ε/K)·Σ_k w_k·(lse - x_k)
/// ```
///
/// exactly as `torch.nn.functional.cross_entropy(x, y, weight=w, ignore_index=-1,
/// label_smoothing=ε)`. The log-sum-exp subtracts the row max, and `-log p_y` is evaluated as
/// `log1p(Σ_{k≠y} e^{x_k - x_y})` when `p_y ≥ ½`, so it keeps its relative accuracy as
/// `p_y → 1`; logits of ±1e4 give a finite loss and gradient. The gradient is the closed form
/// `∂l/∂x_j = (1-ε)·w_y·(p_j - δ_jy) + (ε/K)·(W·p_j - w_j)`, recomputed from the logits.
///
/// Reductions: `None` gives `[N]` (ignored rows 0); `Sum`; `Mean` = `Σ_i l_i / Σ_i w_{y_i}` over
/// the non-ignored rows, as torch (0 when every row is ignored, where torch returns NaN);
/// `AvgFactor(f)` = sum / f.
///
/// **Class-probability targets** (torch's `cross_entropy` with float targets): `targets`
/// `[N, K]` in the logits' dtype give, with `t' = (1-ε)·t + ε/K`,
///
/// ```text
/// l = -Σ_k w_k·t'_k·log softmax(x)_k = Σ_k w_k·t'_k·(m - x_k) + (Σ_k w_k·t'_k)·log Σ_k e^{x_k - m}
/// ```
///
/// (`m` the row max; non-negative terms for targets ≥ 0), and `Mean` = sum / N, as torch (not
/// divided by the class weights; 0 for N = 0). No row is ignored. The gradients are
/// `∂l/∂x_j = p_j·Σ_k w_k·t'_k - w_j·t'_j` and, when the targets track one (a teacher's soft
/// labels), `∂l/∂t_k = -(1-ε)·w_k·log p_k`. The targets are not range-checked (as torch): any
/// finite values give the formula's value (negative ones included); a NaN target gives a NaN
/// loss, and a `-inf` logit gives NaN (`0·∞`, as torch) — mask with a large negative finite
/// value instead. One-hot targets give the label form's row losses (to rounding).
///
/// **Row weights** ([`forward_weighted`](Self::forward_weighted), mmdet's `weight`): `weight`
/// `[N]` multiplies each row loss `l_i` inside the kernels, before the reduction; `Mean` keeps
/// its denominator (`Σ_i w_{y_i}` for labels, N for probabilities), so
/// `Mean = Σ_i weight_i·l_i / Σ_i w_{y_i}`. A weight of 0 is how u32 labels ignore a row; a
/// weight of ones gives `forward`'s bits. A weight that tracks a gradient gets `∂/∂weight_i`
/// (the unweighted row loss times the reduction's factor).
///
/// # Shapes
///
/// - `logits`: `[N, K]`, f32 / f64 / f16 / bf16, `K ≥ 1`.
/// - `labels`: `[N]`, `u32` or `i64`, in `0..K` or `-1` (i64, ignored row: no loss, zero
///   gradient, not counted by `Mean`). There is no background value: background is an ordinary
///   column. Or class-probability targets `[N, K]` in the logits' dtype.
/// - `weight` (`forward_weighted`): `[N]` (the labels' shape, one per row), in the logits'
///   dtype.
/// - `class_weights`: `[K]`, in the logits' dtype or f32 (as [`crate::class_balanced_weights`]
///   returns them; used at f32 precision with f16/bf16 logits, converted exactly to f64 with f64
///   logits); expected ≥ 0.
/// - result: `[N]` for `Reduction::None`, else a rank-0 tensor; the logits' dtype.
/// - Leading dimensions: `[..., C]` logits with targets of the matching leading shape (labels
///   and weights `[...]`, probability targets `[..., C]`) are one `[N, C]` problem (N = the
///   product of the leading dimensions); `Reduction::None` then returns the leading shape.
///
/// # Errors
///
/// Every message starts with `CrossEntropyLoss:`. A tensor on a Metal device (only the CPU and CUDA
/// have kernels); logits not of rank 2, of a non-float dtype or with `K = 0`; labels of another
/// shape, dtype or device; a label outside `0..K` and not `-1`; probability targets of another
/// shape than the logits' or another float dtype; class weights of a length other than `K`,
/// another dtype or device; a `weight` of another shape than `[N]` (or the leading shape), dtype
/// or device; `label_smoothing` outside `[0, 1]`; `AvgFactor` not finite and > 0.
///
/// # Example
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_detloss::{CrossEntropyLoss, Reduction};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let logits = Var::new(&[[2.0f32, -1.0, 0.5], [-3.0, 0.0, 1.0], [0.1, 0.2, 0.3]], &dev)?;
/// let labels = Tensor::new(&[0i64, 2, -1], &dev)?; // the last row is ignored
/// let ce = CrossEntropyLoss { label_smoothing: 0.1, ..Default::default() };
/// let loss = ce.forward(logits.as_tensor(), &labels)?;
/// let grads = loss.backward()?;
/// let g = grads.get(&logits).expect("logits receive a gradient");
/// assert_eq!(g.get(2)?.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct CrossEntropyLoss {
    /// How the `[N]` row losses are reduced (default `Mean`, torch's weighted mean).
    pub reduction: Reduction,
    /// Per-class weights `[K]` (e.g. from [`crate::class_balanced_weights`]); `None` = all 1.
    pub class_weights: Option<Tensor>,
    /// Label smoothing `ε ∈ [0, 1]` (default 0).
    pub label_smoothing: f64,
}

impl Default for CrossEntropyLoss {
    fn default() -> Self {
        Self {
            reduction: Reduction::Mean,
            class_weights: None,
            label_smoothing: 0.0,
        }
    }
}

impl CrossEntropyLoss {
    /// Computes the loss of `logits` `[N, K]` against `labels` `[N]` (u32 / i64) or
    /// class-probability targets `[N, K]` (the logits' dtype).
    pub fn forward(&self, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        self.run(logits, labels, None)
    }

    /// [`forward`](Self::forward) with each row loss multiplied by `weight` `[N]` (one value
    /// per row, in the logits' dtype) before the reduction, inside the kernels; `Mean` keeps
    /// its denominator.
    ///
    /// # Example
    ///
    /// ```
    /// use candle_core::{Device, Tensor};
    /// use candle_detloss::{CrossEntropyLoss, Reduction};
    /// # fn main() -> candle_core::Result<()> {
    /// let dev = Device::Cpu;
    /// let logits = Tensor::new(&[[2.0f32, -1.0, 0.5], [-3.0, 0.0, 1.0]], &dev)?;
    /// let labels = Tensor::new(&[0u32, 2], &dev)?;
    /// let ce = CrossEntropyLoss { reduction: Reduction::Sum, ..Default::default() };
    /// // The second row is ignored by its zero weight.
    /// let weight = Tensor::new(&[0.5f32, 0.0], &dev)?;
    /// let loss = ce.forward_weighted(&logits, &labels, &weight)?.to_scalar::<f32>()?;
    /// let first = ce.forward(&logits.narrow(0, 0, 1)?, &labels.narrow(0, 0, 1)?)?;
    /// assert!((loss - 0.5 * first.to_scalar::<f32>()?).abs() < 1e-6);
    /// # Ok(()) }
    /// ```
    pub fn forward_weighted(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        weight: &Tensor,
    ) -> Result<Tensor> {
        self.run(logits, labels, Some(weight))
    }

    fn run(&self, logits: &Tensor, labels: &Tensor, weight: Option<&Tensor>) -> Result<Tensor> {
        crate::check::check_supported_device(CE_NAME, logits)?;
        let eps = self.label_smoothing;
        if !(0.0..=1.0).contains(&eps) {
            bail!("{CE_NAME}: label_smoothing must be in [0, 1], got {eps}")
        }
        let kind = Kind::Ce { eps };
        apply(
            CE_NAME,
            kind,
            self.reduction,
            self.class_weights.as_ref(),
            logits,
            labels,
            weight,
        )
    }
}
