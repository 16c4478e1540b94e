//! The element types of the CPU kernels: [`Elem`] (the dtype of an input tensor: f32, f64,
//! f16, bf16) and [`Acc`] (the type it is computed in: f32 for the f32 and half inputs, f64 for
//! f64), the dispatch from a runtime [`DType`] to the Rust type ([`with_float_type`]), the
//! integer label types ([`Label`]) and [`ZeroIsValid`] for buffers allocated zeroed.

use crate::fastmath;
use candle_core::{bail, DType, Result, Storage, Tensor, WithDType};
use half::{bf16, f16};
use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub};

/// Runs `$body` with `$t` bound to the Rust type of the float dtype `$dtype`; other dtypes are
/// an error naming `$loss`.
macro_rules! with_float_type {
    ($loss:expr, $dtype:expr, $t:ident, $body:block) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::F64 => {
                type $t = f64;
                $body
            }
            candle_core::DType::F16 => {
                type $t = half::f16;
                $body
            }
            candle_core::DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            d => candle_core::bail!("{}: unsupported dtype {d:?}", $loss),
        }
    };
}

pub(crate) use with_float_type;

/// The accumulator type of the CPU kernels: `f32` (for f32, f16, bf16 inputs) or `f64`.
/// (Each loss uses the subset of the math it needs.)
#[allow(dead_code)]
pub(crate) trait Acc:
    Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + 'static
{
    const ZERO: Self;
    const ONE: Self;
    fn from_f64(v: f64) -> Self;
    fn to_f64(self) -> f64;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn log1p(self) -> Self;
    /// `e^{-|x|}` (in `[0, 1]`).
    fn exp_neg_abs(self) -> Self;
    /// `ln(1 + e)` for `e ∈ [0, 1]` (cheaper than `log1p` on that range).
    fn log1p_unit(self) -> Self;
    fn abs(self) -> Self;
    /// `max(self, 0)`, NaN-propagating is not required (callers add a NaN-carrying term).
    fn relu(self) -> Self;
    /// The arc tangent (CIoU's aspect term; branch-free in f32).
    fn atan(self) -> Self;
    /// `self as i32` (truncation, saturating; NaN gives 0).
    fn trunc_i32(self) -> i32;
    /// `self` truncated toward zero and clamped to `[0, hi]` (NaN gives 0; `hi` is taken in
    /// `0..=2^24`, where it converts exactly): the same as `(self.trunc_i32()).clamp(0, hi)`,
    /// but a plain vector conversion (the saturating `as` compiles to one conversion per
    /// lane).
    fn trunc_clamped(self, hi: i32) -> i32;
    /// An f32 value converted exactly.
    fn from_f32(v: f32) -> Self;
    /// The values of a small parameter tensor held by an op (class or bin weights, stored in
    /// this type on the CPU); `what` names it in the error.
    fn host_vec(loss: &str, what: &str, t: &Tensor) -> Result<Vec<Self>>;
}

/// [`Acc::host_vec`] for any element type.
fn host_vec_of<A: WithDType>(loss: &str, what: &str, t: &Tensor) -> Result<Vec<A>> {
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(s) => Ok(crate::op::cpu_slice::<A>(loss, s, l)?.to_vec()),
        _ => bail!("{loss}: {what} are not on the CPU"),
    }
}

/// `impl Acc` for `$t` with the given transcendental functions (the crate's vectorisable f32
/// versions, or std's f64 ones); the rest is the same for both.
macro_rules! impl_acc {
    ($t:ty, exp: $exp:expr, ln: $ln:expr, log1p: $log1p:expr, exp_neg_abs: $ena:expr,
     log1p_unit: $lpu:expr, atan: $atan:expr) => {
        impl Acc for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                v as $t
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn exp(self) -> Self {
                $exp(self)
            }
            #[inline(always)]
            fn ln(self) -> Self {
                $ln(self)
            }
            #[inline(always)]
            fn log1p(self) -> Self {
                $log1p(self)
            }
            #[inline(always)]
            fn exp_neg_abs(self) -> Self {
                $ena(self)
            }
            #[inline(always)]
            fn log1p_unit(self) -> Self {
                $lpu(self)
            }
            #[inline(always)]
            fn abs(self) -> Self {
                <$t>::abs(self)
            }
            #[inline(always)]
            fn relu(self) -> Self {
                if self > 0.0 {
                    self
                } else {
                    0.0
                }
            }
            #[inline(always)]
            fn atan(self) -> Self {
                $atan(self)
            }
            #[inline(always)]
            fn trunc_i32(self) -> i32 {
                self as i32
            }
            #[inline(always)]
            fn trunc_clamped(self, hi: i32) -> i32 {
                let hi = hi.clamp(0, 1 << 24);
                let hf = hi as $t; // exact: |hi| ≤ 2^24
                let v = if self > 0.0 { self } else { 0.0 }; // NaN → 0
                let v = if v < hf { v } else { hf };
                // SAFETY: `v` is finite and in `[0, 2^24]`, so its truncation is an i32.
                unsafe { v.to_int_unchecked::<i32>() }
            }
            #[inline(always)]
            fn from_f32(v: f32) -> Self {
                v as $t
            }
            fn host_vec(loss: &str, what: &str, t: &Tensor) -> Result<Vec<Self>> {
                host_vec_of(loss, what, t)
            }
        }
    };
}

impl_acc!(f32, exp: fastmath::exp_f32, ln: fastmath::ln_f32, log1p: fastmath::log1p_f32,
    exp_neg_abs: fastmath::exp_neg_abs, log1p_unit: fastmath::log1p_unit,
    atan: fastmath::atan_f32);
impl_acc!(f64, exp: f64::exp, ln: f64::ln, log1p: f64::ln_1p,
    exp_neg_abs: |x: f64| f64::exp(-f64::abs(x)), log1p_unit: f64::ln_1p, atan: f64::atan);

/// A floating-point element type of an input tensor, with the type it is computed in.
pub(crate) trait Elem: WithDType + Copy + Send + Sync + ZeroIsValid {
    type A: Acc;
    fn to_acc(self) -> Self::A;
    fn from_acc(a: Self::A) -> Self;
}

macro_rules! impl_elem {
    ($t:ty, $acc:ty, $to:expr, $from:expr) => {
        impl Elem for $t {
            type A = $acc;
            #[inline(always)]
            fn to_acc(self) -> $acc {
                $to(self)
            }
            #[inline(always)]
            fn from_acc(a: $acc) -> Self {
                $from(a)
            }
        }
    };
}
impl_elem!(f32, f32, |x| x, |a| a);
impl_elem!(f64, f64, |x| x, |a| a);
impl_elem!(f16, f32, f16::to_f32, f16::from_f32);
impl_elem!(bf16, f32, bf16::to_f32, bf16::from_f32);

/// The dtype the kernels accumulate in for inputs of `dtype` (f64 stays f64, the rest use f32).
pub(crate) fn acc_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// An integer label type: `u32` (no ignore value) or `i64` (`-1` = ignore).
pub(crate) trait Label: Copy + Send + Sync {
    fn get(self) -> i64;
}
impl Label for u32 {
    #[inline(always)]
    fn get(self) -> i64 {
        self as i64
    }
}
impl Label for i64 {
    #[inline(always)]
    fn get(self) -> i64 {
        self
    }
}

/// Types whose all-zero bit pattern is a valid value (+0.0 for the floats), as
/// [`zeroed_vec`] requires.
///
/// # Safety
///
/// Implement only for types where every all-zero byte pattern is a valid value.
pub(crate) unsafe trait ZeroIsValid: Copy {}
// SAFETY: all-zero bits are +0.0 (floats) or 0 (integers).
unsafe impl ZeroIsValid for f32 {}
// SAFETY: as above.
unsafe impl ZeroIsValid for f64 {}
// SAFETY: as above.
unsafe impl ZeroIsValid for f16 {}
// SAFETY: as above.
unsafe impl ZeroIsValid for bf16 {}
// SAFETY: as above.
unsafe impl ZeroIsValid for u32 {}
