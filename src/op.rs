//! The op layer: a loss is a [`LossKernel`] (its name, its CPU kernels and its CUDA launch
//! plans), and the generic custom ops [`Fwd`] and [`Bwd`] do everything else once for every
//! loss: the dtype dispatch, contiguous CPU slices and the typed targets, the switch between
//! the CPU kernels, the emulated CUDA kernels (`cuda-emu`) and a CUDA device, and the backward
//! through a gradient saved by the forward ([`SavedGrad`]) or the loss's backward kernels.

use crate::dtype::{with_float_type, Elem};
use crate::targets::{CpuTargets, TargetKind};
use candle_core::{bail, CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};

#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
use crate::gpu::{arg, Arg, DevElem, Gpu};

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
/// launch plans `gpu::forward::<G, T>(g, self, x, t)` and `gpu::backward::<G, T>(g, self, x, t,
/// up)`.
macro_rules! gpu_kernel_methods {
    () => {
        #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
        fn gpu_forward<G: $crate::gpu::Gpu, T: $crate::dtype::Elem + $crate::gpu::DevElem>(
            &self,
            g: &G,
            x: $crate::gpu::Arg<'_, G::Storage>,
            t: $crate::gpu::Arg<'_, G::Storage>,
        ) -> candle_core::Result<(G::Storage, candle_core::Shape)>
        where
            T::A: $crate::gpu::DevElem,
        {
            gpu::forward::<G, T>(g, self, x, t)
        }

        #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
        fn gpu_backward<G: $crate::gpu::Gpu, T: $crate::dtype::Elem + $crate::gpu::DevElem>(
            &self,
            g: &G,
            x: $crate::gpu::Arg<'_, G::Storage>,
            t: $crate::gpu::Arg<'_, G::Storage>,
            up: $crate::gpu::Arg<'_, G::Storage>,
        ) -> candle_core::Result<(G::Storage, candle_core::Shape)>
        where
            T::A: $crate::gpu::DevElem,
        {
            gpu::backward::<G, T>(g, self, x, t, up)
        }
    };
}
pub(crate) use gpu_kernel_methods;

/// The inputs of a CPU kernel: the contiguous float input `x` (logits, predicted boxes), its
/// shape, and the second input as typed targets (labels, dense targets, target boxes).
pub(crate) struct CpuInputs<'a, T> {
    pub(crate) x: &'a [T],
    pub(crate) shape: &'a Shape,
    pub(crate) t: CpuTargets<'a, T>,
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

/// What a loss provides; [`Fwd`] and [`Bwd`] turn it into candle custom ops.
///
/// The forward op is `(x, targets) -> loss`, the backward op
/// `(x, targets, upstream gradient) -> ∂loss/∂x` (for AP-Loss: its error-driven update). The
/// CPU kernels get contiguous slices in the input's dtype `T`; the CUDA launch plans run on any
/// [`Gpu`] backend (a CUDA device, or the host emulation of `cuda-emu`).
pub(crate) trait LossKernel: Clone + Send + Sync + 'static {
    /// The loss's name, which starts every error message.
    fn loss_name(&self) -> &'static str;
    /// Candle's names of the forward and the backward op.
    fn op_names(&self) -> (&'static str, &'static str);
    /// How the CPU kernels read the second input.
    fn target_kind(&self) -> TargetKind;
    /// Checks of the first input's layout run before either backend (default: none).
    fn check_layout(&self, _x: &Layout) -> Result<()> {
        Ok(())
    }

    /// The loss on the CPU; with `saved`, a scalar loss also stores `∂loss/∂x` there.
    fn cpu_forward<T: Elem>(
        &self,
        inp: &CpuInputs<'_, T>,
        saved: Option<&SavedGrad>,
    ) -> Result<(CpuStorage, Shape)>;

    /// The gradient on the CPU for the upstream gradient `up` (one value for a scalar loss).
    fn cpu_backward<T: Elem>(
        &self,
        inp: &CpuInputs<'_, T>,
        up: &[T],
    ) -> Result<(CpuStorage, Shape)>;

    /// The loss on a CUDA backend.
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    fn gpu_forward<G: Gpu, T: Elem + DevElem>(
        &self,
        g: &G,
        x: Arg<'_, G::Storage>,
        t: Arg<'_, G::Storage>,
    ) -> Result<(G::Storage, Shape)>
    where
        T::A: DevElem;

    /// The gradient on a CUDA backend.
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    fn gpu_backward<G: Gpu, T: Elem + DevElem>(
        &self,
        g: &G,
        x: Arg<'_, G::Storage>,
        t: Arg<'_, G::Storage>,
        up: Arg<'_, G::Storage>,
    ) -> Result<(G::Storage, Shape)>
    where
        T::A: DevElem;

    /// Whether the loss has a gradient for its second input (float targets, scores): when
    /// that input tracks one, [`Fwd`]'s backward computes it with [`TargetBwd`] (default:
    /// none, the second input is a constant of the loss).
    fn has_target_grad(&self) -> bool {
        false
    }

    /// `∂loss/∂(second input)` on the CPU for the upstream gradient `up`, in the second
    /// input's shape (called only when [`Self::has_target_grad`]).
    fn cpu_target_backward<T: Elem>(
        &self,
        _inp: &CpuInputs<'_, T>,
        _up: &[T],
    ) -> Result<(CpuStorage, Shape)> {
        bail!("{}: internal error, no target gradient", self.loss_name())
    }

    /// `∂loss/∂(second input)` on a CUDA backend (called only when [`Self::has_target_grad`]).
    #[cfg(any(feature = "cuda", feature = "cuda-emu"))]
    fn gpu_target_backward<G: Gpu, T: Elem + DevElem>(
        &self,
        _g: &G,
        _x: Arg<'_, G::Storage>,
        _t: Arg<'_, G::Storage>,
        _up: Arg<'_, G::Storage>,
    ) -> Result<(G::Storage, Shape)>
    where
        T::A: DevElem,
    {
        bail!("{}: internal error, no target gradient", self.loss_name())
    }
}

/// The forward op of loss `K`; with `saved`, the CPU pass also stores the gradient.
pub(crate) struct Fwd<K> {
    pub(crate) k: K,
    pub(crate) saved: Option<SavedGrad>,
}

impl<K: LossKernel> Fwd<K> {
    /// The forward op of `k`. `fuse`: a scalar loss of an input that tracks gradients (a
    /// training step), for which the CPU forward also computes the gradient and the backward
    /// only scales it.
    pub(crate) fn new(k: K, fuse: bool) -> Self {
        Self {
            k,
            saved: fuse.then(SavedGrad::default),
        }
    }
}

/// The backward op of loss `K`.
pub(crate) struct Bwd<K>(pub(crate) K);

/// The CPU inputs of an op, in dtype `T`.
fn cpu_inputs<'a, T: Elem>(
    k: &impl LossKernel,
    (s1, l1): (&'a CpuStorage, &'a Layout),
    (s2, l2): (&'a CpuStorage, &'a Layout),
) -> Result<CpuInputs<'a, T>> {
    let name = k.loss_name();
    Ok(CpuInputs {
        x: cpu_slice(name, s1, l1)?,
        shape: l1.shape(),
        t: CpuTargets::new(name, k.target_kind(), s2, l2)?,
    })
}

#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
fn gpu_forward<G: Gpu, K: LossKernel>(
    g: &G,
    k: &K,
    x: Arg<'_, G::Storage>,
    t: Arg<'_, G::Storage>,
) -> Result<(G::Storage, Shape)> {
    with_float_type!(k.loss_name(), g.dtype(x.s), T, {
        k.gpu_forward::<G, T>(g, x, t)
    })
}

#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
fn gpu_backward<G: Gpu, K: LossKernel>(
    g: &G,
    k: &K,
    x: Arg<'_, G::Storage>,
    t: Arg<'_, G::Storage>,
    up: Arg<'_, G::Storage>,
) -> Result<(G::Storage, Shape)> {
    with_float_type!(k.loss_name(), g.dtype(x.s), T, {
        k.gpu_backward::<G, T>(g, x, t, up)
    })
}

impl<K: LossKernel> CustomOp2 for Fwd<K> {
    fn name(&self) -> &'static str {
        self.k.op_names().0
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let k = &self.k;
        k.check_layout(l1)?;
        emulate!(self.name(), |g| gpu_forward(g, k, arg(s1, l1), arg(s2, l2)));
        use candle_core::backend::BackendStorage;
        with_float_type!(k.loss_name(), s1.dtype(), T, {
            let inp = cpu_inputs::<T>(k, (s1, l1), (s2, l2))?;
            k.cpu_forward(&inp, self.saved.as_ref())
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
        gpu_forward(&g, &self.k, arg(s1, l1), arg(s2, l2))
    }

    fn bwd(
        &self,
        x: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let name = self.k.loss_name();
        // Targets get a gradient only from losses that have one (see `target_grad`).
        let gt = target_grad(&self.k, x, targets, grad_res)?;
        if let Some(g) = match &self.saved {
            Some(saved) => saved.take(name, grad_res)?,
            None => None,
        } {
            return Ok((Some(g), gt));
        }
        let up = grad_res.contiguous()?;
        let g = x.apply_op3_no_bwd(targets, &up, &Bwd(self.k.clone()))?;
        Ok((Some(g), gt))
    }
}

impl<K: LossKernel> CustomOp3 for Bwd<K> {
    fn name(&self) -> &'static str {
        self.0.op_names().1
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let k = &self.0;
        k.check_layout(l1)?;
        emulate!(self.name(), |g| gpu_backward(
            g,
            k,
            arg(s1, l1),
            arg(s2, l2),
            arg(s3, l3)
        ));
        use candle_core::backend::BackendStorage;
        with_float_type!(k.loss_name(), s1.dtype(), T, {
            let inp = cpu_inputs::<T>(k, (s1, l1), (s2, l2))?;
            let up = cpu_slice::<T>(k.loss_name(), s3, l3)?;
            k.cpu_backward(&inp, up)
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
        gpu_backward(&g, &self.0, arg(s1, l1), arg(s2, l2), arg(s3, l3))
    }
}

// ---- The gradient of the second input (targets, scores) of losses that have one ----

/// `∂loss/∂targets` when `k` has a target gradient and `targets` tracks one; `None` otherwise
/// (the targets are then constants of the loss, or nothing upstream needs their gradient).
fn target_grad<K: LossKernel>(
    k: &K,
    x: &Tensor,
    targets: &Tensor,
    grad_res: &Tensor,
) -> Result<Option<Tensor>> {
    if !(k.has_target_grad() && targets.track_op()) {
        return Ok(None);
    }
    let up = grad_res.contiguous()?;
    Ok(Some(x.apply_op3_no_bwd(
        targets,
        &up,
        &TargetBwd(k.clone()),
    )?))
}

/// The backward op of loss `K` for its second input: `(x, targets, upstream gradient) ->
/// ∂loss/∂targets`, through [`LossKernel::cpu_target_backward`] /
/// [`LossKernel::gpu_target_backward`].
pub(crate) struct TargetBwd<K>(pub(crate) K);

#[cfg(any(feature = "cuda", feature = "cuda-emu"))]
fn gpu_target_backward<G: Gpu, K: LossKernel>(
    g: &G,
    k: &K,
    x: Arg<'_, G::Storage>,
    t: Arg<'_, G::Storage>,
    up: Arg<'_, G::Storage>,
) -> Result<(G::Storage, Shape)> {
    with_float_type!(k.loss_name(), g.dtype(x.s), T, {
        k.gpu_target_backward::<G, T>(g, x, t, up)
    })
}

impl<K: LossKernel> CustomOp3 for TargetBwd<K> {
    fn name(&self) -> &'static str {
        self.0.op_names().1
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let k = &self.0;
        k.check_layout(l1)?;
        emulate!(self.name(), |g| gpu_target_backward(
            g,
            k,
            arg(s1, l1),
            arg(s2, l2),
            arg(s3, l3)
        ));
        use candle_core::backend::BackendStorage;
        with_float_type!(k.loss_name(), s1.dtype(), T, {
            let inp = cpu_inputs::<T>(k, (s1, l1), (s2, l2))?;
            let up = cpu_slice::<T>(k.loss_name(), s3, l3)?;
            k.cpu_target_backward(&inp, up)
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
        gpu_target_backward(&g, &self.0, arg(s1, l1), arg(s2, l2), arg(s3, l3))
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
