//! The one reading of the second input of the classification losses: integer labels `[N]`
//! (`u32`, or `i64` with `-1` = ignored; `0..C` a class, `C` background) or dense targets
//! `[N, C]` (or one float per row, read as dense: the DFL targets `[N]`), validated against the logits ([`target_kind`]) and decoded on the CPU
//! ([`CpuTargets`]: per row for the sigmoid losses, as a class for the softmax losses, per
//! element for AP-Loss); the per-label row weights ([`row_weights`]) go with them. The CUDA
//! kernels decode the same convention in `kernels/common.cuh` (`decode_label`).

use crate::check::{check_class_weights_dtype, check_same_device};
use crate::dtype::{acc_dtype, Elem, Label};
use crate::op::cpu_slice;
use candle_core::{bail, CpuStorage, DType, Layout, Result, Tensor};

/// Decoded integer label of one row, for losses whose label `c == num_classes` is background.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum RowLabel {
    /// `-1`: the row contributes nothing and gets a zero gradient.
    Ignored,
    /// `0..C` a class, `C` background (every column negative).
    Class(usize),
}

/// Decodes `label` against `max_label` (inclusive): `-1` is ignored, anything else outside
/// `0..=max_label` is an error naming the loss.
#[inline(always)]
pub(crate) fn decode_label(loss: &str, label: i64, max_label: usize) -> Result<RowLabel> {
    if label == -1 {
        Ok(RowLabel::Ignored)
    } else if label >= 0 && (label as u64) <= max_label as u64 {
        Ok(RowLabel::Class(label as usize))
    } else {
        bail!("{loss}: label {label} out of range 0..={max_label} (or -1 to ignore)")
    }
}

/// The targets of one row, as the CPU kernels see them.
pub(crate) enum RowTarget<'a, T> {
    Dense(&'a [T]),
    Label(RowLabel),
}

/// What an element is to AP-Loss: ignored, negative or positive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    Ignored,
    Neg,
    Pos,
}

/// Typed CPU view of the second input next to `[N, C]` logits (or predicted boxes).
pub(crate) enum CpuTargets<'a, T> {
    /// Dense targets (or target boxes, or one float per row) in the input's dtype.
    Dense(&'a [T]),
    /// Dense `i64` targets in `{-1, 0, 1}` (AP-Loss).
    DenseI64(&'a [i64]),
    U32(&'a [u32]),
    I64(&'a [i64]),
}

fn internal(loss: &str, what: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("{loss}: internal error, {what}"))
}

impl<'a, T: Elem> CpuTargets<'a, T> {
    pub(crate) fn new(loss: &str, kind: TargetKind, s: &'a CpuStorage, l: &Layout) -> Result<Self> {
        Ok(match kind {
            TargetKind::Dense => Self::Dense(cpu_slice(loss, s, l)?),
            TargetKind::DenseI64 => Self::DenseI64(cpu_slice(loss, s, l)?),
            TargetKind::LabelsU32 => Self::U32(cpu_slice(loss, s, l)?),
            TargetKind::LabelsI64 => Self::I64(cpu_slice(loss, s, l)?),
        })
    }

    /// The dense values (target boxes, dense targets); an internal error for labels.
    pub(crate) fn dense(&self, loss: &str) -> Result<&'a [T]> {
        match self {
            Self::Dense(d) => Ok(d),
            _ => Err(internal(loss, "expected dense targets")),
        }
    }

    /// The raw label of row `i` (labels only).
    #[inline(always)]
    fn label(&self, loss: &str, i: usize) -> Result<i64> {
        match self {
            Self::U32(v) => Ok(v[i].get()),
            Self::I64(v) => Ok(v[i].get()),
            _ => Err(internal(loss, "expected integer labels")),
        }
    }

    /// Row `i` of a sigmoid-type loss: dense values, or its label decoded with `c` =
    /// background.
    #[inline(always)]
    pub(crate) fn row(&self, loss: &str, i: usize, c: usize) -> Result<RowTarget<'a, T>> {
        Ok(match self {
            Self::Dense(d) => RowTarget::Dense(&d[i * c..(i + 1) * c]),
            _ => RowTarget::Label(decode_label(loss, self.label(loss, i)?, c)?),
        })
    }

    /// The class of row `i` of a softmax loss over `k` classes (labels `0..k`, no background):
    /// `None` when ignored.
    #[inline(always)]
    pub(crate) fn class(&self, loss: &str, i: usize, k: usize) -> Result<Option<usize>> {
        Ok(match decode_label(loss, self.label(loss, i)?, k - 1)? {
            RowLabel::Ignored => None,
            RowLabel::Class(c) => Some(c),
        })
    }

    /// Calls `f(j, role)` for every column `j` of row `i` (AP-Loss: a label makes its column
    /// positive and the others negative; dense targets are `{-1, 0, 1}` per element).
    #[inline(always)]
    pub(crate) fn roles(
        &self,
        loss: &str,
        i: usize,
        c: usize,
        mut f: impl FnMut(usize, Role),
    ) -> Result<()> {
        let bad = |v: &dyn std::fmt::Display, j: usize| {
            candle_core::Error::Msg(format!(
                "{loss}: target {v} at [{i}, {j}] is not -1, 0 or 1"
            ))
        };
        match self {
            Self::Dense(d) => {
                for (j, t) in d[i * c..(i + 1) * c].iter().enumerate() {
                    let v = t.to_f64();
                    f(
                        j,
                        if v == 0.0 {
                            Role::Neg
                        } else if v == 1.0 {
                            Role::Pos
                        } else if v == -1.0 {
                            Role::Ignored
                        } else {
                            return Err(bad(&v, j));
                        },
                    );
                }
            }
            Self::DenseI64(d) => {
                for (j, &v) in d[i * c..(i + 1) * c].iter().enumerate() {
                    f(
                        j,
                        match v {
                            0 => Role::Neg,
                            1 => Role::Pos,
                            -1 => Role::Ignored,
                            v => return Err(bad(&v, j)),
                        },
                    );
                }
            }
            _ => match decode_label(loss, self.label(loss, i)?, c)? {
                RowLabel::Ignored => (0..c).for_each(|j| f(j, Role::Ignored)),
                RowLabel::Class(k) => {
                    (0..c).for_each(|j| f(j, if j == k { Role::Pos } else { Role::Neg }));
                }
            },
        }
        Ok(())
    }

    /// Calls `f(j, role)` for the columns `j` of row `i` that are not negative, as
    /// [`CpuTargets::roles`] would (for a pass that first takes the whole row as negatives):
    /// for labels only the label's column, or every column of an ignored row.
    #[inline(always)]
    pub(crate) fn non_negatives(
        &self,
        loss: &str,
        i: usize,
        c: usize,
        mut f: impl FnMut(usize, Role),
    ) -> Result<()> {
        match self {
            Self::U32(_) | Self::I64(_) => match decode_label(loss, self.label(loss, i)?, c)? {
                RowLabel::Ignored => (0..c).for_each(|j| f(j, Role::Ignored)),
                RowLabel::Class(k) if k < c => f(k, Role::Pos),
                RowLabel::Class(_) => {}
            },
            _ => self.roles(loss, i, c, |j, r| {
                if r != Role::Neg {
                    f(j, r)
                }
            })?,
        }
        Ok(())
    }

    /// Number of non-ignored rows.
    pub(crate) fn valid_rows(&self, loss: &str, n: usize, c: usize) -> Result<usize> {
        match self {
            Self::Dense(_) | Self::DenseI64(_) => Ok(n),
            Self::U32(_) | Self::I64(_) => {
                let mut k = 0;
                for i in 0..n {
                    if let RowTarget::Label(RowLabel::Class(_)) = self.row(loss, i, c)? {
                        k += 1;
                    }
                }
                Ok(k)
            }
        }
    }
}

/// Builds the per-label row-weight vector of length `c + 1` in the accumulator dtype of
/// `logits`: `w[0..c]` the class weights (1 when absent), `w[c]` the background row weight
/// (the `c+1`-th given weight, else 1). The weights come in the logits' dtype or f32.
pub(crate) fn row_weights(
    loss: &str,
    logits: &Tensor,
    c: usize,
    class_weights: Option<&Tensor>,
) -> Result<Tensor> {
    let acc = acc_dtype(logits.dtype());
    let dev = logits.device();
    let Some(w) = class_weights else {
        return Tensor::ones(c + 1, acc, dev);
    };
    check_same_device(loss, "class_weights", logits, w)?;
    check_class_weights_dtype(loss, logits.dtype(), w.dtype())?;
    let len = match w.dims() {
        [len] => *len,
        d => bail!("{loss}: class_weights must have shape [C] or [C+1] (C = {c}), got {d:?}"),
    };
    let w = w.to_dtype(acc)?;
    if len == c {
        Tensor::cat(&[&w, &Tensor::ones(1, acc, dev)?], 0)
    } else if len == c + 1 {
        w.contiguous()
    } else {
        bail!(
            "{loss}: class_weights has length {len}, expected C = {c} or C+1 = {}",
            c + 1
        )
    }
}

/// The kind of targets passed next to `[N, C]` logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TargetKind {
    /// Float targets in the logits' dtype: of the logits' shape (dense targets, target boxes),
    /// or one value per row (`DistributionFocalLoss`'s `[N]` targets, validated by the loss).
    Dense,
    /// `i64` targets with the logits' shape (AP-Loss: `{-1, 0, 1}`).
    DenseI64,
    /// `u32` labels `[N]`.
    LabelsU32,
    /// `i64` labels `[N]` (`-1` = ignored).
    LabelsI64,
}

/// Classifies and validates `targets` against logits of shape `[n, c]`.
pub(crate) fn target_kind(
    loss: &str,
    logits: &Tensor,
    targets: &Tensor,
    n: usize,
    c: usize,
) -> Result<TargetKind> {
    check_same_device(loss, "targets", logits, targets)?;
    match targets.dtype() {
        DType::U32 | DType::I64 => {
            if targets.dims() != [n] {
                bail!(
                    "{loss}: integer labels must have shape [N] = [{n}] next to logits [{n}, {c}], got {:?}",
                    targets.dims()
                )
            }
            Ok(if targets.dtype() == DType::U32 {
                TargetKind::LabelsU32
            } else {
                TargetKind::LabelsI64
            })
        }
        d if d == logits.dtype() => {
            if targets.dims() != [n, c] {
                bail!(
                    "{loss}: dense targets must have the logits' shape [{n}, {c}], got {:?}",
                    targets.dims()
                )
            }
            Ok(TargetKind::Dense)
        }
        d => bail!(
            "{loss}: targets must be u32/i64 labels [N] or {:?} dense targets [N, C], got dtype {d:?}",
            logits.dtype()
        ),
    }
}

/// Validates the integer labels `[N]` of a softmax loss next to logits `[n, k]` and returns
/// their kind (`LabelsU32` or `LabelsI64`).
pub(crate) fn label_kind(
    loss: &str,
    logits: &Tensor,
    labels: &Tensor,
    n: usize,
    k: usize,
) -> Result<TargetKind> {
    check_same_device(loss, "labels", logits, labels)?;
    let kind = match labels.dtype() {
        DType::U32 => TargetKind::LabelsU32,
        DType::I64 => TargetKind::LabelsI64,
        d => bail!("{loss}: labels must be u32 or i64 [N], got dtype {d:?}"),
    };
    if labels.dims() != [n] {
        bail!(
            "{loss}: labels must have shape [N] = [{n}] next to logits [{n}, {k}], got {:?}",
            labels.dims()
        )
    }
    Ok(kind)
}

/// Leading dimensions: `x` `[..., C]` (logits, or boxes with C = 4; rank > 2) and `t` of the
/// matching leading shape `[...]` (labels) or of `x`'s shape (dense targets, target boxes) as
/// the one `[N, C]` problem, both reshaped (a view when contiguous); rank ≤ 2 as they are.
pub(crate) fn flatten_leading(loss: &str, x: &Tensor, t: &Tensor) -> Result<(Tensor, Tensor)> {
    let dims = x.dims();
    if dims.len() <= 2 {
        return Ok((x.clone(), t.clone()));
    }
    let (lead, c) = (&dims[..dims.len() - 1], dims[dims.len() - 1]);
    let n: usize = lead.iter().product();
    let t2 = if t.dims() == lead {
        t.reshape(n)?
    } else if t.dims() == dims {
        t.reshape((n, c))?
    } else {
        bail!(
            "{loss}: targets must have the leading shape {lead:?} (labels) or the shape {dims:?} (dense) next to {dims:?}, got {:?}",
            t.dims()
        )
    };
    Ok((x.reshape((n, c))?, t2))
}

/// Runs `f` on [`flatten_leading`]'s `[N, C]` problem; a `Reduction::None` result `[N]` or
/// `[N, C]` gets `x`'s leading shape back (scalars stay).
pub(crate) fn with_leading_dims(
    loss: &str,
    x: &Tensor,
    t: &Tensor,
    f: impl FnOnce(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    crate::check::check_supported_device(loss, x)?;
    let dims = x.dims();
    if dims.len() <= 2 {
        return f(x, t);
    }
    let (x2, t2) = flatten_leading(loss, x, t)?;
    let out = f(&x2, &t2)?;
    let (lead, n, c) = (&dims[..dims.len() - 1], x2.dims()[0], x2.dims()[1]);
    match out.dims() {
        [] => Ok(out),
        [m] if *m == n => out.reshape(lead),
        [m, k] if *m == n && *k == c => out.reshape(dims),
        d => bail!("{loss}: internal error, result of shape {d:?} for {n} rows"),
    }
}
