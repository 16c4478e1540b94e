//! The op layer: a loss is a [`LossKernel`] (its name, its CPU kernels and its CUDA launch
//! plans), and the generic custom ops [`Fwd`] and [`Bwd`] do everything else once for every
//! loss: the dtype dispatch, contiguous CPU slices and the typed targets, the switch between
//! the CPU kernels, the emulated CUDA kernels (`cuda-emu`) and a CUDA device, and the backward
//! through a gradient saved by the forward ([`SavedGrad`]) or the loss's backward kernels.

use crate::dtype::{with_float_type, Elem};
use crate::targets::{CpuTargets, TargetKind};
use crate::weight::{CpuWeight, Weight};
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
use crate::gpu::{arg, BwdIn, DevFloat, FwdIn, Gpu, Out};

/// In a `cpu_fwd`: under the `cuda-emu` feature (while the emulation is active) returns the
/// result of the op's CUDA launch plan `$plan` run on the emulated backend `$g`, in both thread
/// orders (see `gpu::emu::run`); nothing in other builds.
macro_rules! emulate {
    ($op:expr, |$g:ident| $plan:expr) => {
        #[cfg(feature = "cuda-emu")]
        if $crate::gpu::emu::active() {
            return $crate::gpu::emu::run($op, |$g| $plan);
        }
    };
}
pub(crate) use emulate;

/// The `gpu_forward` and `gpu_backward` methods of a [`LossKernel`] impl: the calling module's
/// launch plans `gpu::forward::<G, T>(g, self, a)` and `gpu::backward::<G, T>(g, self, a)`;
/// `gpu_kernel_methods!(target_grad)` adds `gpu_target_backward` (`gpu::target_backward`).
macro_rules! gpu_kernel_methods {
    () => {
        #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
        fn gpu_forward<G: $crate::gpu::Gpu, T: $crate::gpu::DevFloat>(
            &self,
            g: &G,
            a: $crate::gpu::FwdIn<'_, G>,
        ) -> $crate::gpu::Out<G> {
            gpu::forward::<G, T>(g, self, a)
        }

        #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
        fn gpu_backward<G: $crate::gpu::Gpu, T: $crate::gpu::DevFloat>(
            &self,
            g: &G,
            a: $crate::gpu::BwdIn<'_, G>,
        ) -> $crate::gpu::Out<G> {
            gpu::backward::<G, T>(g, self, a)
        }
    };
    // Also `gpu_target_backward`: the launch plan `gpu::target_backward::<G, T>(g, self, a)`,
    // for a loss whose `target_grad` is `TargetGrad::Kernel`.
    (target_grad) => {
        $crate::op::gpu_kernel_methods!();

        #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
        fn gpu_target_backward<G: $crate::gpu::Gpu, T: $crate::gpu::DevFloat>(
            &self,
            g: &G,
            a: $crate::gpu::BwdIn<'_, G>,
        ) -> $crate::gpu::Out<G> {
            gpu::target_backward::<G, T>(g, self, a)
        }
    };
}
pub(crate) use gpu_kernel_methods;

/// The inputs of a CPU kernel: the contiguous float input `x` (logits, predicted boxes), its
/// shape, the second input as typed targets (labels, dense targets, target boxes), and the
/// weight of a `forward_weighted` call.
pub(crate) struct CpuInputs<'a, T> {
    pub(crate) x: &'a [T],
    pub(crate) shape: &'a Shape,
    pub(crate) t: CpuTargets<'a, T>,
    pub(crate) w: Option<CpuWeight<'a, T>>,
}

impl<T> CpuInputs<'_, T> {
    /// `(rows, cols)` of `x`, which must be of rank 2.
    pub(crate) fn dims2(&self, loss: &str) -> Result<(usize, usize)> {
        match self.shape.dims() {
            [n, c] => Ok((*n, *c)),
            d => bail!("{loss}: logits must have shape [N, C], got {d:?}"),
        }
    }
}

/// What a CPU kernel returns: the output storage and its shape.
pub(crate) type CpuOut = Result<(CpuStorage, Shape)>;

/// A loss's name (which starts every error message) and candle's names of its forward and
/// backward ops.
#[derive(Clone, Copy)]
pub(crate) struct Names {
    pub(crate) loss: &'static str,
    pub(crate) fwd: &'static str,
    pub(crate) bwd: &'static str,
}

/// How a loss differentiates its second input (targets, target boxes) when that input tracks a
/// gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TargetGrad {
    /// `∂loss/∂t = −∂loss/∂x`: the loss is a function of `x − t` (smooth L1, balanced L1).
    NegatedInput,
    /// The loss is symmetric in `x` and `t`: `∂loss/∂t` is the backward op applied to `(t, x)`
    /// (the IoU family).
    Swapped,
    /// The targets only select roles (AP-Loss's `{-1, 0, 1}`): a zero gradient.
    Zero,
    /// The loss's own target kernels: `cpu_target_backward` / `gpu_target_backward`.
    Kernel,
    /// Not implemented yet: a tracked target is an error naming the loss, not a panic.
    Unsupported,
}

/// What a loss provides; [`Fwd`] and [`Bwd`] turn it into candle custom ops.
///
/// The forward op is `(x, targets) -> loss`, the backward op
/// `(x, targets, upstream gradient) -> ∂loss/∂x` (for AP-Loss: its error-driven update). The
/// CPU kernels get contiguous slices in the input's dtype `T`; the CUDA launch plans run on any
/// [`Gpu`] backend (a CUDA device, or the host emulation of `cuda-emu`).
pub(crate) trait LossKernel: Clone + Send + Sync + 'static {
    /// The loss's name and its ops' names.
    fn names(&self) -> Names;
    /// The loss's name, which starts every error message.
    fn loss_name(&self) -> &'static str {
        self.names().loss
    }
    /// How the CPU kernels read the second input.
    fn target_kind(&self) -> TargetKind;
    /// How the loss differentiates its second input when that input tracks a gradient.
    fn target_grad(&self) -> TargetGrad;
    /// Checks of the first input's layout run before either backend (default: none).
    fn check_layout(&self, _x: &Layout) -> Result<()> {
        Ok(())
    }

    /// The loss on the CPU; with `saved`, a scalar loss also stores `∂loss/∂x` there.
    fn cpu_forward<T: Elem>(&self, inp: &CpuInputs<'_, T>, saved: Option<&SavedGrad>) -> CpuOut;

    /// The gradient on the CPU for the upstream gradient `up` (one value for a scalar loss).
    fn cpu_backward<T: Elem>(&self, inp: &CpuInputs<'_, T>, up: &[T]) -> CpuOut;

    /// `∂loss/∂targets` on the CPU, for [`TargetGrad::Kernel`] (in the targets' shape).
    fn cpu_target_backward<T: Elem>(&self, _inp: &CpuInputs<'_, T>, _up: &[T]) -> CpuOut {
        bail!(
            "{}: internal error, no target gradient kernel",
            self.loss_name()
        )
    }

    /// `∂loss/∂targets` on a CUDA backend, for [`TargetGrad::Kernel`].
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    fn gpu_target_backward<G: Gpu, T: DevFloat>(&self, _g: &G, _a: BwdIn<'_, G>) -> Out<G> {
        bail!(
            "{}: internal error, no target gradient kernel",
            self.loss_name()
        )
    }

    /// The loss on a CUDA backend.
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    fn gpu_forward<G: Gpu, T: DevFloat>(&self, g: &G, a: FwdIn<'_, G>) -> Out<G>;

    /// The gradient on a CUDA backend.
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    fn gpu_backward<G: Gpu, T: DevFloat>(&self, g: &G, a: BwdIn<'_, G>) -> Out<G>;
}

/// The forward op of loss `K`; with `saved`, the CPU pass also stores the gradient; with `w`,
/// every kernel (forward and backward) reads the weight.
pub(crate) struct Fwd<K> {
    pub(crate) k: K,
    pub(crate) saved: Option<SavedGrad>,
    pub(crate) w: Option<Weight>,
}

impl<K: LossKernel> Fwd<K> {
    /// The forward op of `k`. `fuse`: a scalar loss of an input that tracks gradients (a
    /// training step), for which the CPU forward also computes the gradient and the backward
    /// only scales it.
    pub(crate) fn new(k: K, fuse: bool) -> Self {
        Self {
            k,
            saved: fuse.then(SavedGrad::default),
            w: None,
        }
    }

    /// The op with the weight `w` (of a `forward_weighted` call) read by its kernels.
    pub(crate) fn weighted(self, w: Option<Weight>) -> Self {
        Self { w, ..self }
    }
}

/// Which input a backward op differentiates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wrt {
    /// The first input (logits, predicted boxes): the loss's backward kernels.
    Input,
    /// The second input (float targets), with the loss's target kernels ([`TargetGrad::Kernel`]).
    Targets,
}

/// The backward op of loss `K` with respect to one of its inputs: `(x, targets, upstream)` →
/// the gradient, in that input's shape; the weight of the forward, if any, is read inside.
pub(crate) struct Bwd<K>(pub(crate) K, pub(crate) Wrt, pub(crate) Option<Weight>);

/// The CPU inputs of an op, in dtype `T`, with the weight's values `w`.
fn cpu_inputs<'a, T: Elem>(
    k: &impl LossKernel,
    (s1, l1): (&'a CpuStorage, &'a Layout),
    (s2, l2): (&'a CpuStorage, &'a Layout),
    w: Option<CpuWeight<'a, T>>,
) -> Result<CpuInputs<'a, T>> {
    let name = k.loss_name();
    Ok(CpuInputs {
        x: cpu_slice(name, s1, l1)?,
        shape: l1.shape(),
        t: CpuTargets::new(name, k.target_kind(), s2, l2)?,
        w,
    })
}

/// Runs `f` with the CPU values of the weight `w` (the storage guard lives for the call).
fn with_cpu_weight<T: Elem, R>(
    loss: &str,
    w: Option<&Weight>,
    f: impl FnOnce(Option<CpuWeight<'_, T>>) -> Result<R>,
) -> Result<R> {
    let Some(w) = w else {
        return f(None);
    };
    let (st, l) = w.t.storage_and_layout();
    let candle_core::Storage::Cpu(s) = &*st else {
        bail!("{loss}: weight is not on the CPU")
    };
    let v = cpu_slice::<T>(loss, s, l)?;
    f(Some(CpuWeight {
        v,
        per_elem: w.per_elem,
    }))
}

#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
fn gpu_forward<G: Gpu, K: LossKernel>(g: &G, k: &K, a: FwdIn<'_, G>) -> Out<G> {
    with_float_type!(k.loss_name(), g.dtype(a.x.s), T, {
        k.gpu_forward::<G, T>(g, a)
    })
}

#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
fn gpu_backward<G: Gpu, K: LossKernel>(g: &G, k: &K, wrt: Wrt, a: BwdIn<'_, G>) -> Out<G> {
    with_float_type!(k.loss_name(), g.dtype(a.x.s), T, {
        match wrt {
            Wrt::Input => k.gpu_backward::<G, T>(g, a),
            Wrt::Targets => k.gpu_target_backward::<G, T>(g, a),
        }
    })
}

impl<K: LossKernel> CustomOp2 for Fwd<K> {
    fn name(&self) -> &'static str {
        self.k.names().fwd
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> CpuOut {
        let k = &self.k;
        k.check_layout(l1)?;
        emulate!(self.name(), |g| {
            let (x, t, w) = (arg(s1, l1), arg(s2, l2), self.w.as_ref());
            gpu_forward(g, k, FwdIn { x, t, w })
        });
        use candle_core::backend::BackendStorage;
        with_float_type!(k.loss_name(), s1.dtype(), T, {
            with_cpu_weight::<T, _>(k.loss_name(), self.w.as_ref(), |w| {
                let inp = cpu_inputs::<T>(k, (s1, l1), (s2, l2), w)?;
                k.cpu_forward(&inp, self.saved.as_ref())
            })
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.k.check_layout(l1)?;
        let g = crate::gpu::cuda::Cuda::of(s1);
        let (x, t, w) = (arg(s1, l1), arg(s2, l2), self.w.as_ref());
        gpu_forward(&g, &self.k, FwdIn { x, t, w })
    }

    fn bwd(
        &self,
        x: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let name = self.k.loss_name();
        let up = grad_res.contiguous()?;
        let tg = if targets.track_op() {
            self.k.target_grad()
        } else {
            TargetGrad::Zero // unused: the targets get no gradient
        };
        // Only the targets track a gradient: the input's is computed only where the targets'
        // follows from it.
        if !x.track_op() && tg != TargetGrad::NegatedInput {
            let gt = self.target_grad(x, targets, &up, tg, None)?;
            return Ok((None, gt));
        }
        let gx = match &self.saved {
            Some(saved) => saved.take(name, grad_res)?,
            None => None,
        };
        let gx = match gx {
            Some(g) => g,
            None => x.apply_op3_no_bwd(targets, &up, &self.bwd_op(Wrt::Input))?,
        };
        let gt = self.target_grad(x, targets, &up, tg, Some(&gx))?;
        Ok((Some(gx), gt))
    }
}

impl<K: LossKernel> Fwd<K> {
    /// The backward op with respect to `wrt`, reading this op's weight.
    fn bwd_op(&self, wrt: Wrt) -> Bwd<K> {
        Bwd(self.k.clone(), wrt, self.w.clone())
    }

    /// The gradient of tracked targets (`None` when they do not track one); `gx` is the
    /// input's gradient where it was computed.
    fn target_grad(
        &self,
        x: &Tensor,
        targets: &Tensor,
        up: &Tensor,
        tg: TargetGrad,
        gx: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        let name = self.k.loss_name();
        // Integer labels never track a gradient; float targets that do (a teacher's soft
        // labels, a second prediction) get theirs, as torch's autograd gives it.
        if !targets.track_op() {
            return Ok(None);
        }
        Ok(Some(match (tg, gx) {
            (TargetGrad::NegatedInput, Some(gx)) => gx.neg()?,
            (TargetGrad::NegatedInput, None) => {
                bail!("{name}: internal error, no input gradient to negate")
            }
            (TargetGrad::Swapped, _) => {
                targets.apply_op3_no_bwd(x, up, &self.bwd_op(Wrt::Input))?
            }
            (TargetGrad::Kernel, _) => {
                x.apply_op3_no_bwd(targets, up, &self.bwd_op(Wrt::Targets))?
            }
            (TargetGrad::Zero, _) => targets.zeros_like()?,
            (TargetGrad::Unsupported, _) => bail!(
                "{name}: targets that track a gradient are not supported by this loss yet; pass targets.detach()"
            ),
        }))
    }
}

impl<K: LossKernel> CustomOp3 for Bwd<K> {
    fn name(&self) -> &'static str {
        match self.1 {
            Wrt::Input => self.0.names().bwd,
            Wrt::Targets => "target-grad",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CpuOut {
        let k = &self.0;
        k.check_layout(l1)?;
        emulate!(self.name(), |g| {
            let (x, t, up) = (arg(s1, l1), arg(s2, l2), arg(s3, l3));
            gpu_backward(
                g,
                k,
                self.1,
                BwdIn {
                    x,
                    t,
                    up,
                    w: self.2.as_ref(),
                },
            )
        });
        use candle_core::backend::BackendStorage;
        with_float_type!(k.loss_name(), s1.dtype(), T, {
            with_cpu_weight::<T, _>(k.loss_name(), self.2.as_ref(), |w| {
                let inp = cpu_inputs::<T>(k, (s1, l1), (s2, l2), w)?;
                let up = cpu_slice::<T>(k.loss_name(), s3, l3)?;
                match self.1 {
                    Wrt::Input => k.cpu_backward(&inp, up),
                    Wrt::Targets => k.cpu_target_backward(&inp, up),
                }
            })
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.0.check_layout(l1)?;
        let g = crate::gpu::cuda::Cuda::of(s1);
        let (x, t, up) = (arg(s1, l1), arg(s2, l2), arg(s3, l3));
        let w = self.2.as_ref();
        gpu_backward(&g, &self.0, self.1, BwdIn { x, t, up, w })
    }
}

/// The contiguous slice of `T` behind a CPU storage and its layout.
pub(crate) fn cpu_slice<'a, T: candle_core::WithDType>(
    loss: &str,
    s: &'a CpuStorage,
    l: &Layout,
) -> Result<&'a [T]> {
    let data = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{loss}: internal error, kernel input is not contiguous"),
    }
}

/// A gradient computed by a forward pass, kept for the backward: when a loss with a scalar
/// reduction is evaluated on a tensor that tracks gradients, one pass over the logits gives
/// the loss and `∂loss/∂logits` (already divided by the reduction's normaliser); the backward
/// then only multiplies by the upstream scalar (no pass at all when it is 1, as for
/// `loss.backward()`).
#[derive(Default)]
pub(crate) struct SavedGrad(std::sync::Mutex<Option<(CpuStorage, Shape)>>);

impl SavedGrad {
    pub(crate) fn put(&self, storage: CpuStorage, shape: Shape) {
        if let Ok(mut g) = self.0.lock() {
            *g = Some((storage, shape));
        }
    }

    /// The saved gradient times the scalar upstream gradient `up`, or `None` when nothing was
    /// saved (CUDA, or a second backward through the same graph, which then recomputes).
    pub(crate) fn take(&self, loss: &str, up: &Tensor) -> Result<Option<Tensor>> {
        let Some((mut storage, shape)) = self.0.lock().ok().and_then(|mut g| g.take()) else {
            return Ok(None);
        };
        if !up.device().is_cpu() || up.elem_count() != 1 {
            return Ok(None);
        }
        let u = up.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0];
        if u != 1.0 {
            scale_storage(loss, &mut storage, u)?;
        }
        Ok(Some(Tensor::from_storage(
            candle_core::Storage::Cpu(storage),
            shape,
            candle_core::op::BackpropOp::none(),
            false,
        )))
    }
}

/// `s *= u` for a float storage.
fn scale_storage(loss: &str, s: &mut CpuStorage, u: f64) -> Result<()> {
    use crate::cpu::scale_in_place as scale;
    match s {
        CpuStorage::F32(v) => scale(v, u),
        CpuStorage::F64(v) => scale(v, u),
        CpuStorage::F16(v) => scale(v, u),
        CpuStorage::BF16(v) => scale(v, u),
        s => bail!(
            "{loss}: unsupported gradient dtype {:?}",
            candle_core::backend::BackendStorage::dtype(&*s)
        ),
    }
    Ok(())
}
