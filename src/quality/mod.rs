//! Quality focal loss (Li et al. 2020, GFL) and varifocal loss (Zhang et al. 2021,
//! VarifocalNet): sigmoid BCE against soft targets times a modulating weight that depends on
//! the prediction and the target, one fused custom op family with gradients to the logits and
//! to the targets (or quality scores).

use crate::check::{self, check_float_2d, check_non_negative, check_same_device};
use crate::op::Fwd;
use crate::reduction::Reduction;
use crate::targets::{self, TargetKind};
use crate::weight::{self, Weight};
use candle_core::{bail, DType, Result, Tensor};

mod cpu;
/// The CUDA launch plans (feature `cuda`, and `cuda-emu` on the emulated backend).
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
mod gpu;

const QFL: &str = "QualityFocalLoss";
const VFL: &str = "VarifocalLoss";

/// Quality focal loss of GFL (Li et al., *Generalized Focal Loss*, 2020), mmdet semantics,
/// fused into one custom op with a hand-written backward for the logits **and** the targets.
///
/// # Formula
///
/// For a logit `x`, a soft target `t ∈ [0, 1]` (the IoU-aware quality of the class, 0 for the
/// other classes) and `p = σ(x)`:
///
/// ```text
/// bce = -t·log p - (1-t)·log(1-p)   = t·softplus(-x) + (1-t)·softplus(x)
/// l   = bce · |t - p|^β
/// ∂l/∂x = |t-p|^β·(p - t) + β·bce·sign(p-t)·|t-p|^(β-1)·p(1-p)
/// ∂l/∂t = -x·|t-p|^β       - β·bce·sign(p-t)·|t-p|^(β-1)
/// ```
///
/// exactly mmdet's `quality_focal_loss` (and its dense-target form) with nothing detached, so
/// both gradients equal PyTorch autograd of that formula.
/// [`forward_weighted`](Self::forward_weighted) and
/// [`forward_scores_weighted`](Self::forward_scores_weighted) multiply `l` (and so both
/// gradients) by the element's weight `w` (mmdet's `weight`) inside the kernels. Evaluated with stable forms
/// (softplus through `e^{-|x|}`, `1-p = σ(-x)`, `p - t = p·(1-t) - (1-p)·t`, `|t-p|^β =
/// exp(β·log|t-p|)` with `log|t-p| = -softplus(∓x)` for a target of exactly 0 or 1, and
/// `0^β = 0` for β > 0, `0^0 = 1`), so logits of ±100 (f32) or ±30 (f16/bf16) give a finite loss
/// and gradients for every β ≥ 0. Where `p == t` exactly the `sign·|t-p|^(β-1)` factor is taken
/// as 0 (torch gives the same for β ≥ 1, and `0·∞ = NaN` for β < 1).
///
/// Reductions: `None` gives `[N, C]`; `Sum`; `Mean` = sum / (non-ignored rows × C), the same
/// with a weight, 0 when every row is ignored (mmdet sums the classes first and averages rows: `AvgFactor(N)` gives its
/// number); `AvgFactor(f)` = sum / f. Scalar reductions are computed inside the kernel; on the
/// CPU a scalar loss of tracked logits also writes `∂loss/∂logits` in the same pass.
///
/// [`forward_scores`](Self::forward_scores) takes integer labels and one quality score per row
/// instead of `[N, C]` targets (mmdet's `(labels, scores)` form): the label column's target is
/// the row's score, every other target 0; no `[N, C]` target is built. The score's gradient is
/// `∂l/∂t` of the label column.
///
/// # Shapes
///
/// - `logits`: `[N, C]`, f32 / f64 / f16 / bf16.
/// - `targets` (`forward`): `[N, C]` in the logits' dtype, values in `[0, 1]`.
/// - `labels` (`forward_scores`): `[N]` `u32` or `i64`: `0..C` the class, `C` background (all
///   targets 0), `-1` (i64) ignored (no loss, zero gradients, not counted by `Mean`).
/// - `scores` (`forward_scores`): `[N]` in the logits' dtype, in `[0, 1]` where the label is a
///   class (the scores of background and ignored rows are not read).
/// - `weight` (the `_weighted` forms): `[N]` (one per row) or `[N, C]` (one per element), in
///   the logits' dtype; it gets a gradient when it tracks one. A zero weight is how u32 labels
///   ignore a row.
/// - result: `[N, C]` for `Reduction::None`, else a rank-0 tensor; the logits' dtype.
/// - gradients: the logits' shape; targets `[N, C]` and scores `[N]` when they track one.
/// - Leading dimensions: logits `[..., C]` with targets `[..., C]`, or labels and scores
///   `[...]`, and a weight `[...]` or `[..., C]`, are one `[N, C]` problem; `Reduction::None`
///   then returns `[..., C]`.
///
/// # Errors
///
/// Every message starts with `QualityFocalLoss:`. A tensor on a Metal device; logits not of
/// rank 2 or not a float dtype; targets, labels or scores of another shape, dtype or device;
/// a label outside `0..=C` and not `-1`; a target or a used score outside `[0, 1]` or NaN
/// (checked in the pass that reads it, no extra pass); a weight of another shape, dtype or
/// device (its values are not checked: a negative weight or NaN gives what the product gives);
/// `beta < 0` or not finite; `AvgFactor` not finite and > 0.
///
/// # Example
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_detloss::{QualityFocalLoss, Reduction};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let logits = Var::new(&[[2.0f32, -1.0, 0.5], [-3.0, 0.0, 1.0]], &dev)?;
/// // Row 0 is class 2 with IoU 0.8; row 1 is background (label C = 3).
/// let labels = Tensor::new(&[2i64, 3], &dev)?;
/// let scores = Var::new(&[0.8f32, 0.0], &dev)?;
/// let qfl = QualityFocalLoss { reduction: Reduction::AvgFactor(1.0), ..Default::default() };
/// let loss = qfl.forward_scores(logits.as_tensor(), &labels, scores.as_tensor())?;
/// let grads = loss.backward()?;
/// assert_eq!(grads.get(&logits).unwrap().dims(), &[2, 3]);
/// assert_eq!(grads.get(&scores).unwrap().dims(), &[2]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QualityFocalLoss {
    /// Exponent β ≥ 0 of the modulating factor `|t - σ(x)|^β` (2 in the paper).
    pub beta: f64,
    /// How the `[N, C]` losses are reduced (default `Mean`).
    pub reduction: Reduction,
}

impl Default for QualityFocalLoss {
    fn default() -> Self {
        Self {
            beta: 2.0,
            reduction: Reduction::Mean,
        }
    }
}

impl QualityFocalLoss {
    /// The loss of `logits` `[N, C]` against dense soft `targets` `[N, C]` in `[0, 1]`.
    pub fn forward(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        check_non_negative(QFL, "beta", self.beta)?;
        dense(self.form(), self.reduction, logits, targets, None)
    }

    /// [`forward`](Self::forward) with every element loss multiplied by `weight` (one value per
    /// row `[N]`, or per element `[N, C]`, in the logits' dtype; leading dimensions as the
    /// logits') inside the kernels, before the reduction; `Mean` divides by the same count as
    /// without a weight. The targets' and the weight's gradients (when they track one) are
    /// those of the weighted loss.
    ///
    /// # Example
    ///
    /// ```
    /// use candle_core::{Device, Tensor, Var};
    /// use candle_detloss::{QualityFocalLoss, Reduction};
    /// # fn main() -> candle_core::Result<()> {
    /// let dev = Device::Cpu;
    /// let logits = Var::new(&[[2.0f32, -1.0], [-3.0, 0.5]], &dev)?;
    /// let targets = Tensor::new(&[[0.8f32, 0.0], [0.0, 0.3]], &dev)?;
    /// // One weight per anchor (mmdet's `weight`): row 1 counts twice.
    /// let weight = Tensor::new(&[1.0f32, 2.0], &dev)?;
    /// let qfl = QualityFocalLoss { reduction: Reduction::Sum, ..Default::default() };
    /// let loss = qfl.forward_weighted(logits.as_tensor(), &targets, &weight)?;
    /// let rows = qfl.forward_weighted(logits.as_tensor(), &targets, &weight.ones_like()?)?;
    /// assert!(loss.to_scalar::<f32>()? > rows.to_scalar::<f32>()?);
    /// # Ok(()) }
    /// ```
    pub fn forward_weighted(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        weight: &Tensor,
    ) -> Result<Tensor> {
        check_non_negative(QFL, "beta", self.beta)?;
        dense(self.form(), self.reduction, logits, targets, Some(weight))
    }

    /// The loss of `logits` `[N, C]` against integer `labels` `[N]` and quality `scores` `[N]`
    /// (the label column's target is the score, the others 0).
    pub fn forward_scores(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        scores: &Tensor,
    ) -> Result<Tensor> {
        check_non_negative(QFL, "beta", self.beta)?;
        with_scores(self.form(), self.reduction, logits, labels, scores, None)
    }

    /// [`forward_scores`](Self::forward_scores) with the element losses multiplied by `weight`
    /// (`[N]` or `[N, C]`, as for [`forward_weighted`](Self::forward_weighted)).
    pub fn forward_scores_weighted(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        scores: &Tensor,
        weight: &Tensor,
    ) -> Result<Tensor> {
        check_non_negative(QFL, "beta", self.beta)?;
        with_scores(
            self.form(),
            self.reduction,
            logits,
            labels,
            scores,
            Some(weight),
        )
    }

    fn form(&self) -> Form {
        Form::Qfl { beta: self.beta }
    }
}

/// Varifocal loss of VarifocalNet (Zhang et al., *VarifocalNet: An IoU-aware Dense Object
/// Detector*, 2021), mmdet semantics, fused into one custom op with a hand-written backward for
/// the logits **and** the targets.
///
/// # Formula
///
/// For a logit `x`, a target `q ∈ [0, 1]` (the IoU-aware score of the gt class, 0 elsewhere)
/// and `p = σ(x)`, with `bce` as for [`QualityFocalLoss`]:
///
/// ```text
/// w = q (1 if !iou_weighted)     if q > 0      (positives)
///     α·|p - q|^γ = α·p^γ        if q = 0      (negatives)
/// l = bce · w
/// q > 0:  ∂l/∂x = w·(p - q),   ∂l/∂q = -x·w + bce·[iou_weighted]
/// q = 0:  ∂l/∂x = α·p^γ·(p + γ·bce·(1-p)),   ∂l/∂q = α·(-x·p^γ - γ·bce·p^(γ-1))
/// ```
///
/// exactly mmdet's `varifocal_loss` with the weight `w` not detached (the masks `q > 0`,
/// `q <= 0` are constants), so both gradients equal PyTorch autograd of that formula. The
/// negatives' term is the quality focal term at `t = 0` (β = γ) times α and is evaluated the
/// same stable way (`p^γ = exp(-γ·softplus(-x))`): logits of ±100 (f32) or ±30 (f16/bf16) give
/// finite values for every γ ≥ 0.
///
/// Reductions, [`forward_scores`](Self::forward_scores), the weighted forms
/// ([`forward_weighted`](Self::forward_weighted),
/// [`forward_scores_weighted`](Self::forward_scores_weighted): `l` times the element's weight)
/// and the score gradient as for [`QualityFocalLoss`].
///
/// # Shapes
///
/// As for [`QualityFocalLoss`]: logits `[N, C]`; targets `[N, C]`, or labels `[N]` and scores
/// `[N]`; weight `[N]` or `[N, C]`; result `[N, C]` for `Reduction::None`, else rank 0, in the
/// logits' dtype; leading dimensions `[..., C]` as there.
///
/// # Errors
///
/// Every message starts with `VarifocalLoss:`. As for [`QualityFocalLoss`], and `alpha` or
/// `gamma` negative or not finite.
///
/// # Example
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_detloss::{Reduction, VarifocalLoss};
/// # fn main() -> candle_core::Result<()> {
/// let dev = Device::Cpu;
/// let logits = Var::new(&[[2.0f32, -1.0], [-3.0, 0.5]], &dev)?;
/// // IoU-aware targets: row 0 is class 0 with IoU 0.7, row 1 is background.
/// let targets = Tensor::new(&[[0.7f32, 0.0], [0.0, 0.0]], &dev)?;
/// let vfl = VarifocalLoss { reduction: Reduction::Sum, ..Default::default() };
/// let loss = vfl.forward(logits.as_tensor(), &targets)?;
/// assert!(loss.to_scalar::<f32>()? > 0.0);
/// let grads = loss.backward()?;
/// assert_eq!(grads.get(&logits).unwrap().dims(), &[2, 2]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VarifocalLoss {
    /// Weight α ≥ 0 of the negatives (0.75 in the paper).
    pub alpha: f64,
    /// Exponent γ ≥ 0 of the negatives' `σ(x)^γ` (2 in the paper).
    pub gamma: f64,
    /// Positives weighted by their target `q` (true, the paper) or by 1.
    pub iou_weighted: bool,
    /// How the `[N, C]` losses are reduced (default `Mean`).
    pub reduction: Reduction,
}

impl Default for VarifocalLoss {
    fn default() -> Self {
        Self {
            alpha: 0.75,
            gamma: 2.0,
            iou_weighted: true,
            reduction: Reduction::Mean,
        }
    }
}

impl VarifocalLoss {
    /// The loss of `logits` `[N, C]` against dense targets `[N, C]` in `[0, 1]`.
    pub fn forward(&self, logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
        self.validate()?;
        dense(self.form(), self.reduction, logits, targets, None)
    }

    /// [`forward`](Self::forward) with every element loss multiplied by `weight` (`[N]` or
    /// `[N, C]`, as for [`QualityFocalLoss::forward_weighted`]).
    pub fn forward_weighted(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        weight: &Tensor,
    ) -> Result<Tensor> {
        self.validate()?;
        dense(self.form(), self.reduction, logits, targets, Some(weight))
    }

    /// The loss of `logits` `[N, C]` against integer `labels` `[N]` and scores `[N]` (the label
    /// column's target is the score, the others 0).
    pub fn forward_scores(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        scores: &Tensor,
    ) -> Result<Tensor> {
        self.validate()?;
        with_scores(self.form(), self.reduction, logits, labels, scores, None)
    }

    /// [`forward_scores`](Self::forward_scores) with the element losses multiplied by `weight`
    /// (`[N]` or `[N, C]`, as for [`QualityFocalLoss::forward_weighted`]).
    pub fn forward_scores_weighted(
        &self,
        logits: &Tensor,
        labels: &Tensor,
        scores: &Tensor,
        weight: &Tensor,
    ) -> Result<Tensor> {
        self.validate()?;
        with_scores(
            self.form(),
            self.reduction,
            logits,
            labels,
            scores,
            Some(weight),
        )
    }

    fn validate(&self) -> Result<()> {
        check_non_negative(VFL, "alpha", self.alpha)?;
        check_non_negative(VFL, "gamma", self.gamma)
    }

    fn form(&self) -> Form {
        Form::Vfl {
            alpha: self.alpha,
            gamma: self.gamma,
            iou_weighted: self.iou_weighted,
        }
    }
}

/// Which loss of the family.
#[derive(Clone, Copy, Debug)]
enum Form {
    Qfl {
        beta: f64,
    },
    Vfl {
        alpha: f64,
        gamma: f64,
        iou_weighted: bool,
    },
}

impl Form {
    fn name(&self) -> &'static str {
        match self {
            Form::Qfl { .. } => QFL,
            Form::Vfl { .. } => VFL,
        }
    }
}

/// Where the targets come from: the op's second input is `[N, C]` targets (`labels: None`) or
/// the `[N]` scores, with the labels held by the op.
#[derive(Clone)]
struct QualityOp {
    form: Form,
    reduction: Reduction,
    /// The integer labels `[N]` (contiguous) and their kind, for `forward_scores`.
    labels: Option<(Tensor, TargetKind)>,
}

fn common_checks(name: &str, red: Reduction, logits: &Tensor) -> Result<(usize, usize)> {
    check::check_supported_device(name, logits)?;
    red.validate(name)?;
    check_float_2d(name, "logits", logits)
}

/// The loss of logits and a second input of `[N, C]` (already flattened) with an optional
/// weight: one fused call, or [`weight::weighted`] (the weight's gradient) with the `Mean`
/// denominator non-ignored rows × C of `labels` (`None`: every row counts).
fn weighted_2d(
    form: Form,
    reduction: Reduction,
    (x, second, labels): (&Tensor, &Tensor, Option<&Tensor>),
    w: Option<&Tensor>,
    run: impl Fn(Reduction, &Tensor, &Tensor, Option<&Tensor>) -> Result<Tensor>,
) -> Result<Tensor> {
    let Some(w) = w else {
        return run(reduction, x, second, None);
    };
    let fused = |w: Option<&Tensor>, red: Reduction, detach: bool| {
        if detach {
            run(red, &x.detach(), &second.detach(), w)
        } else {
            run(red, x, second, w)
        }
    };
    weight::weighted(form.name(), reduction, w, fused, || mean_den(x, labels))
}

/// The `Mean` denominator of logits `[N, C]` as a rank-0 tensor in their dtype: non-ignored
/// rows × C (only i64 labels can ignore a row).
fn mean_den(x: &Tensor, labels: Option<&Tensor>) -> Result<Tensor> {
    let (n, c) = x.dims2()?;
    let den = match labels {
        Some(l) if l.dtype() == DType::I64 => {
            let rows = l.ne(-1.0)?.to_dtype(DType::F32)?.sum_all()?;
            rows.affine(c as f64, 0.0)?
        }
        _ => Tensor::new((n * c) as f32, x.device())?,
    };
    den.to_dtype(x.dtype())
}

/// The weight of logits `[N, C]` validated: `[N]` per row or `[N, C]` per element.
fn element_weight(name: &str, logits: &Tensor, w: Option<&Tensor>) -> Result<Option<Weight>> {
    let (n, c) = logits.dims2()?;
    w.map(|w| Weight::new(name, logits, w, &[n], &[n, c]))
        .transpose()
}

fn dense(
    form: Form,
    reduction: Reduction,
    logits: &Tensor,
    targets: &Tensor,
    weight: Option<&Tensor>,
) -> Result<Tensor> {
    let w = weight
        .map(|w| weight::flatten_leading(logits.dims(), w))
        .transpose()?;
    targets::with_leading_dims(form.name(), logits, targets, |x, t| {
        weighted_2d(form, reduction, (x, t, None), w.as_ref(), |red, x, t, w| {
            dense_2d(form, red, x, t, w)
        })
    })
}

/// [`dense`] on logits `[N, C]`.
fn dense_2d(
    form: Form,
    reduction: Reduction,
    logits: &Tensor,
    targets: &Tensor,
    weight: Option<&Tensor>,
) -> Result<Tensor> {
    let name = form.name();
    let (n, c) = common_checks(name, reduction, logits)?;
    if targets::target_kind(name, logits, targets, n, c)? != TargetKind::Dense {
        bail!("{name}: forward takes dense targets [N, C]; pass integer labels with their scores to forward_scores")
    }
    let w = element_weight(name, logits, weight)?;
    let op = QualityOp {
        form,
        reduction,
        labels: None,
    };
    apply(op, logits, targets, w)
}

/// [`with_scores_2d`] with leading dimensions: logits `[..., C]`, labels and scores `[...]`
/// (a weight `[...]` or `[..., C]`) as the flattened `[N, C]` problem; `Reduction::None` then
/// returns `[..., C]`.
fn with_scores(
    form: Form,
    reduction: Reduction,
    logits: &Tensor,
    labels: &Tensor,
    scores: &Tensor,
    weight: Option<&Tensor>,
) -> Result<Tensor> {
    let dims = logits.dims();
    let w = weight
        .map(|w| weight::flatten_leading(dims, w))
        .transpose()?;
    // Scores of the leading shape become [N]; any other shape is left for the 2-D checks
    // (and the labels' shape for targets::with_leading_dims) to reject.
    let scores = if dims.len() > 2 && scores.dims() == &dims[..dims.len() - 1] {
        scores.flatten_all()?
    } else {
        scores.clone()
    };
    targets::with_leading_dims(form.name(), logits, labels, |x, l| {
        weighted_2d(
            form,
            reduction,
            (x, &scores, Some(l)),
            w.as_ref(),
            |red, x, s, w| with_scores_2d(form, red, x, l, s, w),
        )
    })
}

/// [`with_scores`] on logits `[N, C]`.
fn with_scores_2d(
    form: Form,
    reduction: Reduction,
    logits: &Tensor,
    labels: &Tensor,
    scores: &Tensor,
    weight: Option<&Tensor>,
) -> Result<Tensor> {
    let name = form.name();
    let (n, c) = common_checks(name, reduction, logits)?;
    let kind = targets::label_kind(name, logits, labels, n, c)?;
    check_same_device(name, "scores", logits, scores)?;
    if scores.dtype() != logits.dtype() {
        bail!(
            "{name}: scores must have the logits' dtype {:?}, got {:?}",
            logits.dtype(),
            scores.dtype()
        )
    }
    if scores.dims() != [n] {
        bail!(
            "{name}: scores must have shape [N] = [{n}] next to logits [{n}, {c}], got {:?}",
            scores.dims()
        )
    }
    let w = element_weight(name, logits, weight)?;
    let op = QualityOp {
        form,
        reduction,
        labels: Some((labels.contiguous()?, kind)),
    };
    apply(op, logits, scores, w)
}

fn apply(op: QualityOp, logits: &Tensor, second: &Tensor, w: Option<Weight>) -> Result<Tensor> {
    // Training (a scalar loss of logits that track gradients): the forward pass also computes
    // ∂loss/∂logits, and the backward only scales it. The targets' gradient (when they track
    // one) comes from the op layer's target backward.
    let fuse = op.reduction.is_scalar() && logits.track_op();
    logits
        .contiguous()?
        .apply_op2(&second.contiguous()?, Fwd::new(op, fuse).weighted(w))
}
