//! # candle-detloss
//!
//! Fused object-detection training losses for [Candle](https://github.com/huggingface/candle).
//! Every loss is a Candle custom op with a hand-written forward **and** backward, a CPU kernel
//! (rayon, bitwise deterministic for any thread count) and, under the `cuda` feature, a CUDA
//! kernel. Call `forward`, then `backward()` on the result as with any Candle op.
//!
//! Conventions shared by every loss:
//!
//! - [`Reduction`]: `None`, `Sum`, `Mean`, `AvgFactor(f)`; scalar reductions happen inside the
//!   kernel and return a rank-0 tensor.
//! - Integer labels `[N]` (`u32` or `i64`) next to logits `[N, C]`: `0..C` the class, `C`
//!   background, `-1` (i64) ignored (no loss, zero gradient, not counted by `Mean`). Any other
//!   value is an error.
//! - Logits in f32, f64, f16 or bf16 (half types are computed in f32); the result has the
//!   logits' dtype. Strided inputs give the result of their contiguous copy.
//! - Errors start with the loss's name, e.g. `SigmoidFocalLoss: label 83 out of range 0..=80`.
//! - `class_weights` come in the logits' dtype or in f32 (what [`class_balanced_weights`]
//!   returns), for logits of any float dtype.
//! - Devices: the CPU, and CUDA with the `cuda` feature. A `Device::Metal` input is an error
//!   (`<Loss>: Metal devices are not supported (use Device::Cpu or Device::Cuda)`).
//! - [`Reduction::AvgFactor`] must be finite and > 0: divide by `num_pos.max(1)` as mmdet and
//!   torchvision do.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use candle_detloss::{Reduction, SigmoidFocalLoss};
//! # fn main() -> candle_core::Result<()> {
//! let dev = Device::Cpu;
//! // 4 anchors, 3 classes: labels 0..3 are classes, 3 is background, -1 ignored.
//! let logits = Var::randn(0f32, 1.0, (4, 3), &dev)?;
//! let labels = Tensor::new(&[0i64, 3, 2, -1], &dev)?;
//! let num_pos = 2.0;
//! let focal = SigmoidFocalLoss { reduction: Reduction::AvgFactor(num_pos), ..Default::default() };
//! let loss = focal.forward(logits.as_tensor(), &labels)?;
//! let grads = loss.backward()?;
//! let g = grads.get(&logits).expect("logits receive a gradient");
//! // The ignored anchor gets a zero gradient.
//! assert_eq!(g.get(3)?.abs()?.sum_all()?.to_scalar::<f32>()?, 0.0);
//! # Ok(()) }
//! ```

#![deny(missing_docs)]

pub mod anchors;
mod ap_loss;
mod check;
mod class_balanced;
mod cpu;
mod dfl;
mod dtype;
mod fastmath;
mod focal;
mod ghm;
#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
mod gpu;
mod iou;
pub mod metrics;
mod op;
mod quality;
mod reduction;
mod regression;
mod softmax;
mod targets;
mod weight;

/// Test support of the `cuda-emu` feature, under which CPU tensors run through the CUDA
/// kernels (compiled for the host with an emulation of the CUDA execution model).
#[cfg(feature = "cuda-emu")]
pub mod cuda_emu {
    /// Runs `f` with the CPU kernels on this thread (the emulated CUDA kernels otherwise), e.g.
    /// to compare the two paths on the same inputs.
    pub fn with_cpu_kernels<R>(f: impl FnOnce() -> R) -> R {
        crate::gpu::emu::with_cpu_kernels(f)
    }

    /// The names of every CUDA kernel of the crate (`kernels/*.cu`), sorted. With
    /// `CANDLE_DETLOSS_EMU_COVERAGE=FILE` each process appends the kernels it launches to FILE,
    /// so a test run can be checked against this list.
    pub fn kernel_names() -> Vec<String> {
        crate::gpu::emu::kernel_names()
    }
}

/// Benchmark support (not part of the API): the arithmetic floors `bench_table` measures the
/// kernels against.
#[doc(hidden)]
pub mod bench_support {
    use candle_core::{bail, DType, Result, Tensor};

    /// The sigmoid focal loss's arithmetic floor on f32 `logits` (and dense `targets`): the
    /// same bytes and transcendental count as its fused training step and nothing else
    /// (`cpu::focal_arithmetic_floor`); returns the gradient-sized output and a sum.
    pub fn focal_arithmetic_floor(
        logits: &Tensor,
        targets: Option<&Tensor>,
    ) -> Result<(Tensor, f64)> {
        const NAME: &str = "focal_arithmetic_floor";
        if logits.dtype() != DType::F32 || !logits.device().is_cpu() {
            bail!("{NAME}: f32 CPU logits only")
        }
        let logits = logits.contiguous()?;
        let targets = targets.map(|t| t.contiguous()).transpose()?;
        let (xs, xl) = logits.storage_and_layout();
        let candle_core::Storage::Cpu(xs) = &*xs else {
            bail!("{NAME}: f32 CPU logits only")
        };
        let x = crate::op::cpu_slice::<f32>(NAME, xs, xl)?;
        let mut out = crate::cpu::zeroed_vec::<f32>(x.len())?;
        let s = match &targets {
            None => crate::cpu::focal_arithmetic_floor(x, None, &mut out)?,
            Some(t) => {
                let (ts, tl) = t.storage_and_layout();
                let candle_core::Storage::Cpu(ts) = &*ts else {
                    bail!("{NAME}: f32 CPU targets only")
                };
                let t = crate::op::cpu_slice::<f32>(NAME, ts, tl)?;
                crate::cpu::focal_arithmetic_floor(x, Some(t), &mut out)?
            }
        };
        Ok((Tensor::from_vec(out, logits.shape(), logits.device())?, s))
    }
}

pub use ap_loss::{ApGlobal, ApLoss, ApStats};
pub use class_balanced::class_balanced_weights;
pub use dfl::DistributionFocalLoss;
pub use focal::SigmoidFocalLoss;
pub use ghm::GhmcLoss;
pub use iou::{BoxIouLoss, IouKind};
pub use quality::{QualityFocalLoss, VarifocalLoss};
pub use reduction::Reduction;
pub use regression::{BalancedL1Loss, SmoothL1Loss};
pub use softmax::{CrossEntropyLoss, SoftmaxFocalLoss};

/// The README's Rust snippets, compiled and run by `cargo test --doc` (and `cargo test`).
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
