//! Class-balanced weights from the effective number of samples (Cui et al. 2019).

use candle_core::{bail, Device, Result, Tensor};

const NAME: &str = "class_balanced_weights";

/// Class-balanced class weights of Cui et al., *Class-Balanced Loss Based on Effective Number of
/// Samples* (CVPR 2019), for the `class_weights` of [`crate::SigmoidFocalLoss`],
/// [`crate::SoftmaxFocalLoss`] and [`crate::CrossEntropyLoss`].
///
/// # Formula
///
/// For `counts[c] = n_c` samples of class `c` and `β ∈ [0, 1)`:
///
/// ```text
/// w_c = (1 - β) / (1 - β^{n_c})        (the inverse effective number of samples)
/// ```
///
/// normalised so that the `C` weights sum to `C`. `β = 0` gives all ones; `β → 1` tends to
/// inverse class frequency. Computed in f64 with `1 - β^n = -expm1(n·ln β)`, accurate also for
/// `β` within a few ulp of 1, and returned as f32.
///
/// # Shapes
///
/// - `counts`: `C ≥ 1` class counts.
/// - result: `[C]`, f32, on `device`. The losses accept f32 class weights with logits of any
///   float dtype (f32, f64, f16, bf16), so no cast is needed.
///
/// # Errors
///
/// Every message starts with `class_balanced_weights:`. A Metal `device` (only the CPU
/// and CUDA have kernels); empty `counts`; a zero count; `β` negative, ≥ 1 or NaN.
///
/// # Example
///
/// ```
/// use candle_core::Device;
/// use candle_detloss::class_balanced_weights;
/// # fn main() -> candle_core::Result<()> {
/// let w = class_balanced_weights(&[1, 2, 4], 0.5, &Device::Cpu)?;
/// // (1-β)/(1-β^n) = 1, 2/3, 8/15, scaled to sum to 3: 15/11, 10/11, 8/11.
/// let v = w.to_vec1::<f32>()?;
/// assert!((v[0] - 15.0 / 11.0).abs() < 1e-6 && (v[2] - 8.0 / 11.0).abs() < 1e-6);
/// # Ok(()) }
/// ```
pub fn class_balanced_weights(counts: &[u64], beta: f64, device: &Device) -> Result<Tensor> {
    crate::check::check_supported_location(NAME, device.location())?;
    if counts.is_empty() {
        bail!("{NAME}: counts is empty (need one count per class)")
    }
    if !(0.0..1.0).contains(&beta) {
        bail!("{NAME}: beta must be in [0, 1), got {beta}")
    }
    if let Some(c) = counts.iter().position(|&n| n == 0) {
        bail!("{NAME}: class {c} has a zero count (its effective number is 0)")
    }
    let ln_beta = beta.ln(); // -inf for β = 0: then 1 - β^n = 1
    let raw: Vec<f64> = counts
        .iter()
        .map(|&n| {
            // 1 - β^n = -expm1(n ln β): no cancellation as β^n → 1.
            let one_minus_pow = -(n as f64 * ln_beta).exp_m1();
            (1.0 - beta) / one_minus_pow
        })
        .collect();
    let total: f64 = raw.iter().sum();
    let scale = counts.len() as f64 / total;
    let w: Vec<f32> = raw.iter().map(|v| (v * scale) as f32).collect();
    Tensor::from_vec(w, counts.len(), device)
}
