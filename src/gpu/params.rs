//! The parameter struct of every kernel, field for field as in `kernels/params.cuh`. Buffer
//! addresses are `u64`, flags `i32`, hyper-parameters `f64` (the kernels cast them to their
//! accumulator type, as the CPU kernels do). The emulated backend checks the size and every
//! field's name and offset against the C layout at each launch.

/// A `#[repr(C)]` kernel parameter struct whose layout can be checked against its C mirror.
///
/// # Safety
///
/// Implement only through [`kernel_params!`]: the type must be `#[repr(C)]`, made of plain
/// integers and floats, and laid out exactly as the C struct of the same name.
pub(crate) unsafe trait KernelParams: Copy + ParamRepr {
    /// The C struct's name.
    #[cfg_attr(not(feature = "cuda-emu"), allow(dead_code))]
    const NAME: &'static str;
    /// `(name, offset, size)` of every field, in declaration order.
    #[cfg_attr(not(feature = "cuda-emu"), allow(dead_code))]
    fn fields() -> Vec<(&'static str, usize, usize)>;
}

/// What cudarc needs of a kernel argument (feature `cuda`); nothing in other builds.
#[cfg(feature = "cuda")]
pub(crate) trait ParamRepr: candle_core::cuda_backend::cudarc::driver::DeviceRepr {}
#[cfg(feature = "cuda")]
impl<T: candle_core::cuda_backend::cudarc::driver::DeviceRepr> ParamRepr for T {}
/// What cudarc needs of a kernel argument (feature `cuda`); nothing in other builds.
#[cfg(not(feature = "cuda"))]
pub(crate) trait ParamRepr {}
#[cfg(not(feature = "cuda"))]
impl<T> ParamRepr for T {}

/// Declares kernel parameter structs (and, under `cuda`, passes them to cudarc as one
/// argument).
macro_rules! kernel_params {
    ($($(#[$m:meta])* struct $name:ident { $($field:ident: $ty:ty),* $(,)? })*) => {
        $(
            $(#[$m])*
            #[repr(C)]
            #[derive(Clone, Copy, Debug, Default)]
            pub(crate) struct $name {
                $(pub $field: $ty,)*
            }

            // SAFETY: `#[repr(C)]` of plain integer / float fields, mirrored in params.cuh
            // (checked by the emulated backend at every launch).
            unsafe impl $crate::gpu::params::KernelParams for $name {
                const NAME: &'static str = stringify!($name);
                fn fields() -> Vec<(&'static str, usize, usize)> {
                    vec![$((
                        stringify!($field),
                        std::mem::offset_of!($name, $field),
                        std::mem::size_of::<$ty>(),
                    )),*]
                }
            }

            // SAFETY: a `#[repr(C)]` struct of plain values, passed by value as the kernel's
            // only parameter, whose C declaration has the same layout.
            #[cfg(feature = "cuda")]
            unsafe impl candle_core::cuda_backend::cudarc::driver::DeviceRepr for $name {}
        )*
    };
}

#[allow(unused_imports)]
pub(crate) use kernel_params;

kernel_params! {
    /// `finalize_<dtype>` (common.cu).
    struct FinalizeParams {
        psum: u64, pden: u64, out: u64, scale_out: u64, nparts: u64,
        scale: f64, den_mult: f64, use_den: i32,
    }
    /// `sigmoid_focal_fwd_{none,partial}_*` (`ew`, `ew_mode`: the forward_weighted weight).
    struct FocalFwdParams {
        x: u64, tg: u64, w: u64, out: u64, psum: u64, pden: u64, err: u64,
        n: u64, c: u64, ew: u64, alpha: f64, gamma: f64, has_alpha: i32, ew_mode: i32,
    }
    /// `sigmoid_focal_bwd_*`.
    struct FocalBwdParams {
        x: u64, tg: u64, w: u64, up: u64, g: u64, scale_p: u64, err: u64,
        n: u64, c: u64, ew: u64, alpha: f64, gamma: f64, scale: f64,
        has_alpha: i32, up_scalar: i32, ew_mode: i32,
    }
    /// `sigmoid_focal_count_*`: non-ignored rows per block.
    struct RowCountParams { tg: u64, pden: u64, err: u64, n: u64, c: u64 }
    /// `quality_fwd_{none,partial}_*` (tg: dense targets or scores; lab: labels or 0).
    struct QualityFwdParams {
        x: u64, tg: u64, lab: u64, out: u64, psum: u64, pden: u64, err: u64,
        n: u64, c: u64, ew: u64, beta: f64, k: f64, vfl: i32, iou: i32, ew_mode: i32,
    }
    /// `quality_bwd_*` (∂/∂logits) and `quality_tbwd_*` (∂/∂targets or scores).
    struct QualityBwdParams {
        x: u64, tg: u64, lab: u64, up: u64, g: u64, scale_p: u64, err: u64,
        n: u64, c: u64, ew: u64, beta: f64, k: f64, scale: f64, vfl: i32, iou: i32,
        up_scalar: i32, ew_mode: i32,
    }
    /// `softmax_fwd_*`.
    struct SoftmaxFwdParams {
        x: u64, lab: u64, w: u64, wsum: u64, out: u64, psum: u64, pden: u64,
        err: u64, n: u64, k: u64, a: f64, c: f64, gamma: f64,
        has_w: i32, focal: i32, none: i32, ew: u64, ew_mode: i32,
    }
    /// `softmax_bwd_*`.
    struct SoftmaxBwdParams {
        x: u64, lab: u64, w: u64, wsum: u64, up: u64, g: u64, scale_p: u64,
        err: u64, n: u64, k: u64, a: f64, c: f64, gamma: f64,
        scale: f64, has_w: i32, focal: i32, up_scalar: i32, ew: u64, ew_mode: i32,
    }
    /// `softmax_den_*`: Σ w_label per block.
    struct SoftmaxDenParams { lab: u64, w: u64, pden: u64, err: u64, n: u64, k: u64, has_w: i32 }
    /// `softmax_prob_fwd_*`: cross-entropy with class-probability targets.
    struct SoftmaxProbFwdParams {
        x: u64, tg: u64, w: u64, ew: u64, out: u64, psum: u64, n: u64, k: u64,
        a: f64, c: f64, has_w: i32, ew_mode: i32, none: i32,
    }
    /// `softmax_prob_bwd_*`: its gradient to the logits, or (`wrt_t`) to the targets.
    struct SoftmaxProbBwdParams {
        x: u64, tg: u64, w: u64, ew: u64, up: u64, g: u64, n: u64, k: u64,
        a: f64, c: f64, scale: f64, has_w: i32, ew_mode: i32, up_scalar: i32, wrt_t: i32,
    }
    /// `ghmc_hist_*`.
    struct GhmHistParams {
        x: u64, tg: u64, counts: u64, err: u64, n: u64, c: u64, bins: i32, global: i32,
    }
    /// `ghmc_fwd_{none,partial}_*`.
    struct GhmFwdParams {
        x: u64, tg: u64, w: u64, out: u64, psum: u64, err: u64, n: u64, c: u64, bins: i32,
    }
    /// `ghmc_bwd_*`.
    struct GhmBwdParams {
        x: u64, tg: u64, w: u64, up: u64, g: u64, err: u64, n: u64, c: u64,
        scale: f64, bins: i32, up_scalar: i32, wrt_t: i32,
    }
    /// `{smooth,balanced}_l1_fwd_{none,partial}_*` (`ew`: the weight, `ew_mode` 0 none, 1 per
    /// row of `d` elements, 2 per element).
    struct RegFwdParams {
        x: u64, t: u64, out: u64, psum: u64, n: u64, p0: f64, p1: f64,
        p2: f64, p3: f64, p4: f64, p5: f64, p6: f64, p7: f64,
        ew: u64, d: u64, ew_mode: i32,
    }
    /// `{smooth,balanced}_l1_bwd_*`.
    struct RegBwdParams {
        x: u64, t: u64, up: u64, g: u64, n: u64, scale: f64, p0: f64,
        p1: f64, p2: f64, p3: f64, p4: f64, p5: f64, p6: f64,
        p7: f64, ew: u64, d: u64, up_scalar: i32, ew_mode: i32,
    }
    /// `box_<kind>_fwd_{none,partial}_*` (`ew`: the weight, `ew_mode` 0 none, 1 per pair).
    struct BoxFwdParams {
        p: u64, t: u64, out: u64, psum: u64, n: u64, eps: f64, ew: u64, ew_mode: i32,
    }
    /// `box_<kind>_bwd_*`.
    struct BoxBwdParams {
        p: u64, t: u64, up: u64, g: u64, n: u64, eps: f64, scale: f64, ew: u64,
        up_scalar: i32, ew_mode: i32,
    }
    /// `dfl_fwd_{none,partial}_*` (`ew`: the weight, `ew_mode` 0 none, 1 per row).
    struct DflFwdParams {
        x: u64, t: u64, out: u64, psum: u64, err: u64, n: u64, k: u64, ew: u64, ew_mode: i32,
    }
    /// `dfl_bwd_*` (`g` = ∂loss/∂x) and `dfl_bwd_target_*` (`g` = ∂loss/∂y).
    struct DflBwdParams {
        x: u64, t: u64, up: u64, g: u64, err: u64, n: u64, k: u64, scale: f64, ew: u64,
        up_scalar: i32, ew_mode: i32,
    }
    /// `ap_count_*`.
    struct ApCountParams { tg: u64, cnt: u64, err: u64, n: u64, c: u64 }
    /// `ap_compact_*`.
    struct ApCompactParams {
        x: u64, tg: u64, out: u64, next: u64, err: u64, n: u64, c: u64, cap: u64,
    }
    /// `ap_bucket_*`.
    struct ApBucketParams {
        x: u64, tg: u64, edges: u64, cnt: u64, hi: u64, lo: u64, nonfinite: u64,
        err: u64, n: u64, c: u64, ne: u64, center: f64, scale: f64,
        use_smem: i32,
    }
    /// `ap_update_*`.
    struct ApUpdateParams {
        x: u64, tg: u64, up: u64, pos: u64, pos_upd: u64, edges: u64, alpha: u64,
        beta: u64, out: u64, err: u64, n: u64, c: u64, np: u64, ne: u64,
        center: f64, nan: i32,
    }
}

/// Implements [`super::ForwardParams`] for structs with `out` and `psum` (and `pden`) fields.
macro_rules! forward_params {
    ($($name:ident $(, $pden:ident)?;)*) => {
        $(
            impl super::ForwardParams for $name {
                fn set_out(&mut self, out: u64) {
                    self.out = out;
                }
                #[allow(unused_variables)]
                fn set_partials(&mut self, psum: u64, pden: u64) {
                    self.psum = psum;
                    $(self.$pden = pden;)?
                }
            }
        )*
    };
}

forward_params! {
    FocalFwdParams, pden;
    QualityFwdParams, pden;
    GhmFwdParams;
    RegFwdParams;
    BoxFwdParams;
    DflFwdParams;
}
