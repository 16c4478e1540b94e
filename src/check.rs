//! Input validation shared by every loss, with messages that start with the loss's name.

use candle_core::{bail, DType, DeviceLocation, Layout, Result, Tensor};

/// `(rows, cols)` of a kernel input's layout, which must be of rank 2.
pub(crate) fn layout_dims2(loss: &str, l: &Layout) -> Result<(usize, usize)> {
    match l.dims() {
        [n, c] => Ok((*n, *c)),
        d => bail!("{loss}: logits must have shape [N, C], got {d:?}"),
    }
}

/// Checks that `t` is a float tensor of rank 2 and returns `(rows, cols)`.
pub(crate) fn check_float_2d(loss: &str, what: &str, t: &Tensor) -> Result<(usize, usize)> {
    check_float(loss, what, t)?;
    match t.dims() {
        [n, c] => Ok((*n, *c)),
        d => bail!("{loss}: {what} must have shape [N, C], got {d:?}"),
    }
}

/// Checks that `t` has one of the float dtypes the kernels support.
pub(crate) fn check_float(loss: &str, what: &str, t: &Tensor) -> Result<()> {
    match t.dtype() {
        DType::F32 | DType::F64 | DType::F16 | DType::BF16 => Ok(()),
        d => bail!("{loss}: {what} must be f32, f64, f16 or bf16, got {d:?}"),
    }
}

/// Checks that `t` lives on a device the crate has kernels for (the CPU, or CUDA under the
/// `cuda` feature). Called first by every public `forward*`, so a `Device::Metal` tensor gets an
/// error naming the loss instead of candle's generic "no metal implementation" from deep inside
/// the op.
pub(crate) fn check_supported_device(loss: &str, t: &Tensor) -> Result<()> {
    check_supported_location(loss, t.device().location())
}

/// The decision behind [`check_supported_device`], on a [`DeviceLocation`] (which, unlike a
/// `Device::Metal`, can be constructed on any platform, so the Metal branch is unit-tested).
pub(crate) fn check_supported_location(loss: &str, location: DeviceLocation) -> Result<()> {
    match location {
        DeviceLocation::Cpu | DeviceLocation::Cuda { .. } => Ok(()),
        DeviceLocation::Metal { .. } => {
            bail!("{loss}: Metal devices are not supported (use Device::Cpu or Device::Cuda)")
        }
    }
}

/// Checks that the class weights `w` have the logits' dtype or f32 (the dtype
/// [`crate::class_balanced_weights`] returns); either way the kernels read them in the
/// accumulation dtype (f32 for f32/f16/bf16 logits, f64 for f64 logits), so f32 weights keep
/// their f32 value with half-precision logits.
pub(crate) fn check_class_weights_dtype(loss: &str, logits: DType, w: DType) -> Result<()> {
    if w != logits && w != DType::F32 {
        bail!("{loss}: class_weights dtype {w:?} must be the logits dtype {logits:?} or F32")
    }
    Ok(())
}

/// Checks that `b` lives on the same device as `a`.
pub(crate) fn check_same_device(loss: &str, what: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    if !a.device().same_device(b.device()) {
        bail!(
            "{loss}: {what} is on {:?} but the logits are on {:?}",
            b.device().location(),
            a.device().location()
        )
    }
    Ok(())
}

/// Checks that a non-negative hyper-parameter is finite and >= 0.
pub(crate) fn check_non_negative(loss: &str, name: &str, v: f64) -> Result<()> {
    if !(v.is_finite() && v >= 0.0) {
        bail!("{loss}: {name} must be finite and >= 0, got {v}")
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metal_location_is_an_error_naming_the_loss() {
        let loc = DeviceLocation::Metal { gpu_id: 0 };
        let err = check_supported_location("SigmoidFocalLoss", loc).unwrap_err();
        // (candle appends a backtrace to the message when RUST_BACKTRACE is set.)
        let msg = err.to_string();
        assert!(
            msg.starts_with(
                "SigmoidFocalLoss: Metal devices are not supported (use Device::Cpu or Device::Cuda)"
            ),
            "{msg}"
        );
        assert!(check_supported_location("X", DeviceLocation::Cpu).is_ok());
        assert!(check_supported_location("X", DeviceLocation::Cuda { gpu_id: 1 }).is_ok());
    }

    #[test]
    fn cpu_tensor_passes_the_device_check() -> Result<()> {
        let t = Tensor::zeros((2, 3), DType::F32, &candle_core::Device::Cpu)?;
        check_supported_device("X", &t)
    }

    #[test]
    fn class_weights_in_the_logits_dtype_or_f32() {
        for d in [DType::F32, DType::F64, DType::F16, DType::BF16] {
            assert!(check_class_weights_dtype("X", d, d).is_ok());
            assert!(check_class_weights_dtype("X", d, DType::F32).is_ok());
        }
        let err = check_class_weights_dtype("X", DType::F16, DType::F64).unwrap_err();
        assert!(
            err.to_string().starts_with("X: class_weights dtype F64"),
            "{err}"
        );
        assert!(check_class_weights_dtype("X", DType::F32, DType::BF16).is_err());
    }
}
