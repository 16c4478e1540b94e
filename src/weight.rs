//! Per-row and per-element weights of the `forward_weighted` forms (mmdet's `weight`): the
//! validation, the weight as the op layer carries it ([`Weight`], read inside every kernel,
//! never a separate `[N, C]` multiply), and the weight's own gradient ([`weighted`]).

use crate::dtype::{Acc, Elem};
use crate::reduction::Reduction;
use candle_core::{bail, Result, Tensor};

/// The weight of a `forward_weighted` call, held by the loss's ops next to their inputs: a
/// contiguous, detached tensor in the input's dtype with one value per row (`per_elem: false`)
/// or one per element of the `Reduction::None` output (`per_elem: true`).
#[derive(Clone, Debug)]
pub(crate) struct Weight {
    pub(crate) t: Tensor,
    pub(crate) per_elem: bool,
}

impl Weight {
    /// Validates `w` next to the input `x` of a problem of `rows` rows whose `Reduction::None`
    /// output has `elems` elements (`elems == rows` for one loss per row: then `per_elem` is
    /// false and both readings agree). `row_shape` and `elem_shape` are the accepted shapes.
    pub(crate) fn new(
        loss: &str,
        x: &Tensor,
        w: &Tensor,
        row_shape: &[usize],
        elem_shape: &[usize],
    ) -> Result<Self> {
        crate::check::check_same_device(loss, "weight", x, w)?;
        if w.dtype() != x.dtype() {
            bail!(
                "{loss}: weight must have the input's dtype {:?}, got {:?}",
                x.dtype(),
                w.dtype()
            )
        }
        let per_elem = if w.dims() == row_shape {
            false
        } else if w.dims() == elem_shape {
            true
        } else {
            bail!(
                "{loss}: weight must have shape {row_shape:?} (one per row) or {elem_shape:?} (one per element), got {:?}",
                w.dims()
            )
        };
        // One value per row and per element coincide: read it per row.
        let per_elem = per_elem && row_shape != elem_shape;
        Ok(Self {
            t: w.detach().contiguous()?,
            per_elem,
        })
    }

    /// The weight's mode in the kernels' parameter structs: 1 per row, 2 per element.
    pub(crate) fn kernel_mode(&self) -> i32 {
        if self.per_elem {
            2
        } else {
            1
        }
    }
}

/// The kernel mode of an optional weight: 0 none, 1 per row, 2 per element
/// (`dl_weight` in `kernels/common.cuh`).
#[cfg_attr(not(any(feature = "cuda", feature = "cuda-emu")), allow(dead_code))]
pub(crate) fn mode(w: Option<&Weight>) -> i32 {
    w.map_or(0, Weight::kernel_mode)
}

/// The address of an optional weight on backend `g` (0 for none).
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
pub(crate) fn addr<G: crate::gpu::Gpu, T: crate::gpu::DevElem>(
    g: &G,
    loss: &str,
    w: Option<&Weight>,
) -> Result<u64> {
    match w {
        Some(w) => g.tensor::<T>(loss, &w.t),
        None => Ok(0),
    }
}

/// A weight as the CPU kernels read it: the contiguous values in the input's dtype.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CpuWeight<'a, T> {
    pub(crate) v: &'a [T],
    pub(crate) per_elem: bool,
}

impl<T: Copy> CpuWeight<'_, T> {
    /// The weight of element `j` of row `i` in rows of `c` elements, or `None` when the index
    /// is outside the weight (an internal error the caller reports).
    #[inline(always)]
    pub(crate) fn at(&self, i: usize, j: usize, c: usize) -> Option<T> {
        let k = if self.per_elem { i * c + j } else { i };
        self.v.get(k).copied()
    }

    /// The weights of row `i` (`c` elements): one value for the row or its `c` values.
    #[inline(always)]
    pub(crate) fn row(&self, i: usize, c: usize) -> Option<RowWeight<'_, T>> {
        if self.per_elem {
            self.v.get(i * c..(i + 1) * c).map(RowWeight::Elems)
        } else {
            self.v.get(i).copied().map(RowWeight::One)
        }
    }
}

/// The weights of one row: a single value, or one per element.
#[derive(Clone, Copy, Debug)]
pub(crate) enum RowWeight<'a, T> {
    One(T),
    Elems(&'a [T]),
}

/// Per-chunk scratch rows of the sigmoid-family CPU kernels (focal, quality focal,
/// varifocal) in the accumulator type: the logits `x`, the targets `t`, the per-element results
/// `v` and the element weights `w` of a `forward_weighted` call (read only by the weighted
/// passes). Each loss adds its own row loading and evaluation.
pub(crate) struct RowScratch<A> {
    pub(crate) x: Vec<A>,
    pub(crate) t: Vec<A>,
    pub(crate) v: Vec<A>,
    pub(crate) w: Vec<A>,
}

impl<A: Acc> RowScratch<A> {
    pub(crate) fn new(c: usize) -> Self {
        Self {
            x: vec![A::ZERO; c],
            t: vec![A::ZERO; c],
            v: vec![A::ZERO; c],
            w: vec![A::ONE; c],
        }
    }

    /// Loads the element weights of row `i`: the row's value repeated, or its `C` values.
    #[inline(always)]
    pub(crate) fn load_w<T: Elem<A = A>>(
        &mut self,
        name: &str,
        w: Option<&CpuWeight<'_, T>>,
        i: usize,
    ) -> Result<()> {
        match w.and_then(|w| w.row(i, self.w.len())) {
            Some(RowWeight::One(v)) => self.w.fill(v.to_acc()),
            Some(RowWeight::Elems(e)) => {
                for (d, s) in self.w.iter_mut().zip(e) {
                    *d = s.to_acc();
                }
            }
            None => bail!("{name}: internal error, no weight for row {i}"),
        }
        Ok(())
    }

    /// `v[j] *= w[j]`: the element weights on the per-element results.
    #[inline(always)]
    pub(crate) fn apply_w(&mut self) {
        for (v, w) in self.v.iter_mut().zip(&self.w) {
            *v = *v * *w;
        }
    }
}

/// A weight next to an input `x` of leading dimensions (`[..., C]`, rank > 2): of the leading
/// shape (one per row) as `[N]`, of `x`'s shape (one per element) as `[N, C]`; for rank ≤ 2
/// as it is. Any other shape is left for [`Weight::new`] to reject.
pub(crate) fn flatten_leading(x_dims: &[usize], w: &Tensor) -> Result<Tensor> {
    if x_dims.len() <= 2 {
        return Ok(w.clone());
    }
    let (lead, c) = (&x_dims[..x_dims.len() - 1], x_dims[x_dims.len() - 1]);
    let n: usize = lead.iter().product();
    if w.dims() == lead {
        w.reshape(n)
    } else if w.dims() == x_dims {
        w.reshape((n, c))
    } else {
        Ok(w.clone())
    }
}

/// The weighted loss with the weight's gradient when `w` tracks one.
///
/// `fused(weight, reduction, detach)` is the loss's fused op: with `Some(weight)` it reads the
/// weight in its kernels; with `detach` it runs on detached inputs. The loss
/// `L(w) = R(w ⊙ l)` is linear in `w` (`l` the unweighted per-element losses, `R` the
/// reduction, whose `Mean` count does not depend on `w`), so `∂L/∂w` is `R`'s adjoint applied
/// to `l`: the op adds `R((w − w̄) ⊙ l̄)` (bars: detached), which is 0 in value and has exactly
/// that gradient. `mean_den` is the loss's `Mean` denominator (a rank-0 tensor in the
/// input's dtype), read only for `Mean`. Without a tracked weight this is one fused call.
pub(crate) fn weighted(
    loss: &str,
    reduction: Reduction,
    w: &Tensor,
    fused: impl Fn(Option<&Tensor>, Reduction, bool) -> Result<Tensor>,
    mean_den: impl FnOnce() -> Result<Tensor>,
) -> Result<Tensor> {
    let value = fused(Some(w), reduction, false)?;
    if !w.track_op() {
        return Ok(value);
    }
    let l = fused(None, Reduction::None, true)?;
    // 0 in value, ∂/∂w = 1: carries w's gradient through candle.
    let dw = w.sub(&w.detach())?;
    let dw = if dw.rank() < l.rank() {
        // One weight per row of per-element losses.
        dw.unsqueeze(dw.rank())?.broadcast_as(l.shape())?
    } else {
        dw
    };
    if dw.dims() != l.dims() {
        bail!(
            "{loss}: internal error, weight {:?} against losses {:?}",
            w.dims(),
            l.dims()
        )
    }
    let wl = dw.mul(&l)?;
    let extra = match reduction {
        Reduction::None => wl,
        Reduction::Sum => wl.sum_all()?,
        Reduction::AvgFactor(f) => wl.sum_all()?.affine(1.0 / f, 0.0)?,
        Reduction::Mean => {
            let den = mean_den()?;
            // Every row ignored: the Mean and its gradient are 0 (the losses are 0 there).
            let den = den.eq(0.0)?.where_cond(&den.ones_like()?, &den)?;
            wl.sum_all()?.broadcast_div(&den)?
        }
    };
    value.add(&extra)
}
