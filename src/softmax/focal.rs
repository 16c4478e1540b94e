//! The softmax focal loss: the public config and its forward (the row kernel is the family's).

use super::{apply, Kind, SF_NAME};
use crate::check::check_non_negative;
use crate::reduction::Reduction;
use candle_core::{Result, Tensor};

/// Softmax (multi-class) focal loss, mmcv's `softmax_focal_loss`: the focal modulation of
/// [`CrossEntropyLoss`](crate::CrossEntropyLoss), fused into one custom op with a hand-written backward.
///
/// # Formula
///
/// With `p = softmax(x)` over the `K` classes of a row, `p_t = p[y]` and class weights `w`:
///
/// ```text
/// l = -α·w_y·(1 - p_t)^γ·log p_t
/// ```
///
/// `α` is a constant factor (1 when `None`). `log p_t` and `1 - p_t = Σ_{k≠y} p_k` are computed
/// from the row's max-shifted exponentials without cancellation, so the loss and gradient stay
/// finite and accurate for `p_t → 1` and `p_t → 0` in every dtype and for every `γ ≥ 0`. The
/// gradient is the closed form `∂l/∂x_j = α·w_y·F·(p_j - δ_jy)` with
/// `F = (1-p_t)^γ - γ·p_t·(1-p_t)^{γ-1}·log p_t ≥ 0`. With `γ = 0` and `alpha = None` this is
/// exactly [`CrossEntropyLoss`](crate::CrossEntropyLoss) without label smoothing.
///
/// Reductions: `None` gives `[N]`; `Sum`; `Mean` = `Σ_i l_i / Σ_i w_{y_i}` over the non-ignored
/// rows, as cross-entropy (α is not in the denominator; 0 when every row is ignored);
/// `AvgFactor(f)` = sum / f.
///
/// [`forward_weighted`](Self::forward_weighted) multiplies each row loss by `weight` `[N]`
/// inside the kernels, before the reduction (mmdet's `weight`); `Mean` keeps its denominator
/// `Σ_i w_{y_i}`; a weight of 0 ignores a u32 row; a tracked weight gets its gradient.
///
/// # Shapes
///
/// - `logits`: `[N, K]`, f32 / f64 / f16 / bf16, `K ≥ 1`.
/// - `labels`: `[N]`, `u32` or `i64`, in `0..K` or `-1` (i64, ignored).
/// - `class_weights`: `[K]`, in the logits' dtype or f32 (as for [`CrossEntropyLoss`](crate::CrossEntropyLoss)).
/// - `weight` (`forward_weighted`): `[N]` (the labels' shape), in the logits' dtype.
/// - result: `[N]` for `Reduction::None`, else a rank-0 tensor; the logits' dtype.
/// - Leading dimensions: `[..., C]` logits with targets of the matching leading shape are one
///   `[N, C]` problem (N = the product of the leading dimensions); `Reduction::None` then
///   returns the leading shape.
///
/// # Errors
///
/// Every message starts with `SoftmaxFocalLoss:`. As [`CrossEntropyLoss`](crate::CrossEntropyLoss), plus `gamma` or
/// `alpha` negative or not finite, and float (class-probability) targets: this loss takes
/// labels only.
///
/// # Example
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_detloss::{Reduction, SoftmaxFocalLoss};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let logits = Var::new(&[[2.0f32, -1.0, 0.5], [-3.0, 0.0, 1.0]], &dev)?;
/// let labels = Tensor::new(&[0u32, 1], &dev)?;
/// let focal = SoftmaxFocalLoss { reduction: Reduction::Sum, ..Default::default() };
/// let loss = focal.forward(logits.as_tensor(), &labels)?;
/// let grads = loss.backward()?;
/// assert_eq!(grads.get(&logits).unwrap().dims(), &[2, 3]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct SoftmaxFocalLoss {
    /// Constant factor α (`Some(0.25)`, as mmcv's default); `None` = 1.
    pub alpha: Option<f64>,
    /// Focusing parameter γ ≥ 0 (2 in the paper); 0 gives (α-scaled) cross-entropy.
    pub gamma: f64,
    /// How the `[N]` row losses are reduced (default `Mean`).
    pub reduction: Reduction,
    /// Per-class weights `[K]`; `None` = all 1.
    pub class_weights: Option<Tensor>,
}

impl Default for SoftmaxFocalLoss {
    fn default() -> Self {
        Self {
            alpha: Some(0.25),
            gamma: 2.0,
            reduction: Reduction::Mean,
            class_weights: None,
        }
    }
}

impl SoftmaxFocalLoss {
    /// Computes the loss of `logits` `[N, K]` against `labels` `[N]`.
    pub fn forward(&self, logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
        self.run(logits, labels, None)
    }

    /// [`forward`](Self::forward) with each row loss multiplied by `weight` `[N]` (one value
    /// per row, in the logits' dtype) before the reduction, inside the kernels; `Mean` keeps
    /// its denominator.
    pub fn forward_weighted(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        weight: &Tensor,
    ) -> Result<Tensor> {
        self.run(logits, labels, Some(weight))
    }

    fn run(&self, logits: &Tensor, labels: &Tensor, weight: Option<&Tensor>) -> Result<Tensor> {
        crate::check::check_supported_device(SF_NAME, logits)?;
        check_non_negative(SF_NAME, "gamma", self.gamma)?;
        if let Some(a) = self.alpha {
            check_non_negative(SF_NAME, "alpha", a)?;
        }
        let kind = Kind::Focal {
            alpha: self.alpha.unwrap_or(1.0),
            gamma: self.gamma,
        };
        apply(
            SF_NAME,
            kind,
            self.reduction,
            self.class_weights.as_ref(),
            logits,
            labels,
            weight,
        )
    }
}
