//! The one reduction enum shared by every loss of the crate.

use candle_core::{bail, Result};

/// How a loss turns its per-element (or per-row) values into the returned tensor.
///
/// Scalar reductions (`Sum`, `Mean`, `AvgFactor`) are computed **inside** the fused kernels: no
/// full-size intermediate is materialised, and the result is a rank-0 tensor. What `Mean` divides
/// by is documented on each loss (e.g. the sigmoid focal loss divides by the number of
/// non-ignored elements, cross-entropy by the summed row weights, as PyTorch does).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Reduction {
    /// No reduction: the loss's natural per-element / per-row shape.
    None,
    /// Sum of all values.
    Sum,
    /// Mean over the valid (non-ignored) values; see each loss for its exact denominator.
    /// A batch with nothing to average gives 0.
    #[default]
    Mean,
    /// `sum / factor`; RetinaNet divides by the number of positive anchors. `factor` must be
    /// finite and > 0.
    AvgFactor(f64),
}

impl Reduction {
    /// Checks the reduction's parameter; `loss` names the caller in the error message.
    pub(crate) fn validate(&self, loss: &str) -> Result<()> {
        if let Reduction::AvgFactor(f) = *self {
            if !(f.is_finite() && f > 0.0) {
                bail!("{loss}: Reduction::AvgFactor({f}) must be finite and > 0")
            }
        }
        Ok(())
    }

    /// True for the reductions that return a rank-0 tensor.
    pub(crate) fn is_scalar(&self) -> bool {
        !matches!(self, Reduction::None)
    }

    /// The factor a sum is multiplied by, given the `Mean` denominator `mean_denom`
    /// (a zero denominator gives a factor of 0, so an empty `Mean` is 0, not NaN).
    pub(crate) fn scale(&self, mean_denom: f64) -> f64 {
        match *self {
            Reduction::None | Reduction::Sum => 1.0,
            Reduction::Mean => {
                if mean_denom > 0.0 {
                    1.0 / mean_denom
                } else {
                    0.0
                }
            }
            Reduction::AvgFactor(f) => 1.0 / f,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn avg_factor_must_be_positive_and_finite() {
        assert!(Reduction::AvgFactor(0.0).validate("X").is_err());
        assert!(Reduction::AvgFactor(-1.0).validate("X").is_err());
        assert!(Reduction::AvgFactor(f64::NAN).validate("X").is_err());
        assert!(Reduction::AvgFactor(2.0).validate("X").is_ok());
    }

    #[test]
    fn scale_of_each_reduction() {
        assert_eq!(Reduction::Sum.scale(4.0), 1.0);
        assert_eq!(Reduction::Mean.scale(4.0), 0.25);
        assert_eq!(Reduction::Mean.scale(0.0), 0.0);
        assert_eq!(Reduction::AvgFactor(8.0).scale(4.0), 0.125);
    }
}
