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
