//! Branch-free `f32` transcendentals for the CPU loss kernels.
//!
//! Every function is `#[inline(always)]`, uses only `f32` arithmetic, wrapping `i32` arithmetic
//! on the bit patterns (`to_bits` / `from_bits`) and value selects: no branches, no table
//! lookups and no `f32 -> int` conversions. Called element-wise in a loop over slices, the loop
//! vectorises with packed SSE2 instructions (baseline x86-64; no AVX or FMA needed, and results
//! do not depend on whether the loop was vectorised).
//!
//! Methods:
//! * `exp`: `x = n ln2 + r` with a two-constant Cody-Waite split (`n` rounded by the
//!   `1.5 * 2^23` trick), a degree-6 minimax polynomial for `e^r` on `|r| <= ln2/2` whose leading
//!   `1 + r_hi` is summed exactly, and the scale `2^n` built in the exponent field in two halves,
//!   so that subnormal results are rounded only once.
//! * `ln`: `x = 2^k m` with `m` in `[sqrt(1/2), sqrt(2))` (subnormals pre-scaled by `2^23`),
//!   `f = m - 1` exact and `ln(1 + f) = 2 atanh(s) = f - f²/2 + s (f²/2 + R(s²))` with
//!   `s = f / (2 + f)`, `R` a 3-term minimax polynomial; the exact `f` and `k ln2_hi` are added last.
//! * `log1p`: the same on `u = 1 + x`, plus the rounding error of `1 + x` as the first-order
//!   correction `(x - (u - 1)) / u`, which keeps the relative accuracy for tiny `|x|`
//!   (`log1p(1e-30) == 1e-30`).
//! * `softplus`: `max(x, 0) + log1p(e^-|x|)`, where `log1p` of `e` in `[0, 1]` reduces without
//!   bit tricks or corrections: `f = e` for `e < 1/2`, else `1 + e = 2 (1 + (e - 1) / 2)`.
//! * `sigmoid`: `1 / (1 + e)` or `e / (1 + e)` with `e = e^-|x|`, with the rounding error of
//!   `1 + e` corrected to first order.
//!
//! Measured error, in ulps against the f64 std result rounded to f32, exhaustively over all
//! 2^32 f32 inputs (so including every range the losses use). "vs f64" is the error against the
//! unrounded f64 value, in units of the f32 ulp there; the last columns count the inputs (out of
//! 2^32) whose result is 1 or 2 ulps off.
//!
//! | function       | max error | max vs f64 | 1 ulp off   | 2 ulps off |
//! |----------------|-----------|------------|-------------|------------|
//! | `exp_f32`      | 1 ulp     | 0.79       |   4 605 509 | 0          |
//! | `ln_f32`       | 1 ulp     | 0.84       |  13 701 432 | 0          |
//! | `log1p_f32`    | 1 ulp     | 0.84       |  17 262 999 | 0          |
//! | `softplus_f32` | 2 ulp     | 1.60       | 104 463 952 | 91         |
//! | `sigmoid_f32`  | 2 ulp     | 1.98       | 114 886 826 | 11 307     |
//!
//! The 2-ulp cases of `softplus` / `sigmoid` sit where the result is in a lower binade than
//! `e = e^-|x|` (e.g. `x ≈ -1.27`, `-1.95`): the rounding error of `e` counts double there.
//!
//! Special values (no flush to zero anywhere; NaN results are quiet NaNs, not necessarily with
//! the input's payload):
//! * `exp_f32`: `+inf` from `x = 88.72284` up (the first f32 above `ln(f32::MAX)`); gradual
//!   underflow, i.e. subnormal results for `x` in about `[-103.97, -87.34)`, and `+0` below
//!   `ln(2^-150) ≈ -103.972` (where `e^x` rounds to 0); `exp(-inf) = 0`, `exp(NaN) = NaN`.
//! * `ln_f32`: `ln(±0) = -inf`, `ln(x < 0) = NaN` (`-inf` included), `ln(+inf) = +inf`,
//!   subnormal inputs to full accuracy, `ln(NaN) = NaN`.
//! * `log1p_f32`: `log1p(-1) = -inf`, `log1p(x < -1) = NaN`, `log1p(+inf) = +inf`,
//!   `log1p(±0) = ±0`, subnormal inputs returned unchanged, `log1p(NaN) = NaN`.
//! * `softplus_f32`: `softplus(100) = 100`, `softplus(-100) ≈ 3.7e-44` (subnormal, not 0),
//!   `0` below about `-103.97`, `softplus(+inf) = +inf`, `softplus(-inf) = 0`, NaN -> NaN.
//! * `sigmoid_f32`: `sigmoid(-100) ≈ 3.7e-44` (subnormal), `0` below about `-103.97`,
//!   `sigmoid(±inf) = 1 / 0`, NaN -> NaN.
//!
//! Subnormal results are correct but may be slow on CPUs that handle them in microcode.

// A small tested library: not every function is called by every kernel.
#![cfg_attr(not(test), allow(dead_code))]

use std::f32::consts::LOG2_E;

/// `ln 2` split for Cody-Waite reduction: `LN2_HI = 355/512` has 9 significant bits, so
/// `n * LN2_HI` is exact for every `|n| < 2^15`; `LN2_LO = ln 2 - LN2_HI` (rounded).
const LN2_HI: f32 = 355.0 / 512.0;
const LN2_LO: f32 = -0.000_212_194_44;

/// `1.5 * 2^23`: adding it to `|v| < 2^22` rounds `v` to the nearest integer (ties to even) and
/// leaves that integer in the low mantissa bits of the sum.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// `exp` input clamp: below `-104`, `e^x < 2^-150` rounds to 0; above `89`, `e^x` overflows.
/// Clamping keeps `n` in `[-150, 129]` so both halves of `2^n` are normal numbers.
const EXP_LO: f32 = -104.0;
const EXP_HI: f32 = 89.0;

/// Minimax coefficients of `e^r ≈ 1 + r + r²(C2 + C3 r + C4 r² + C5 r³ + C6 r⁴)` on
/// `|r| <= ln2/2` (max relative error 3.2e-9 ≈ 0.05 ulp with these f32 coefficients).
const EXP_C2: f32 = 0.499_999_94;
const EXP_C3: f32 = 0.166_665_17;
const EXP_C4: f32 = 0.041_668_102;
const EXP_C5: f32 = 0.008_369_192_5;
const EXP_C6: f32 = 0.001_383_889_7;

/// Bit pattern of `sqrt(1/2)` (rounded down): subtracting it before taking the exponent puts
/// the reduced mantissa in `[sqrt(1/2), sqrt(2))`.
const SQRT_HALF_BITS: i32 = 0x3f35_04f3;

/// Minimax coefficients of `R(z) ≈ z (LG1 + LG2 z + LG3 z²)` approximating
/// `(2 atanh(s) - 2 s) / s` with `z = s²`, `|s| <= 0.2` (max abs error 5.7e-9, i.e. relative
/// error of `ln(1 + f)` below 3e-9; Taylor would be 2/3, 2/5, 2/7).
const LG1: f32 = 0.666_669_5;
const LG2: f32 = 0.399_576_78;
const LG3: f32 = 0.303_637_5;

/// `1/d ≈ INV_C0 - INV_C1 d` on `[1, 2]` (24/17 and 8/17), for the sigmoid correction term.
const INV_C0: f32 = 24.0 / 17.0;
const INV_C1: f32 = 8.0 / 17.0;

/// `2^23`, to lift subnormal `ln` inputs into the normal range.
const TWO_POW_23: f32 = 8_388_608.0;

/// `e^x` for any `f32` (see the module docs for special values; no flush to zero).
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    // Clamp with comparisons, which keep NaN (`NaN < c` is false); `f32::max/min` would not.
    let x = if x < EXP_LO { EXP_LO } else { x };
    exp_clamped(if x > EXP_HI { EXP_HI } else { x })
}

/// `e^-|x|` (in `[0, 1]`, or NaN) for any `x`: only the lower clamp is needed.
#[inline(always)]
pub(crate) fn exp_neg_abs(x: f32) -> f32 {
    let t = -x.abs();
    exp_clamped(if t < EXP_LO { EXP_LO } else { t })
}

/// `e^x` for `x` in `[EXP_LO, EXP_HI]` or NaN.
#[inline(always)]
fn exp_clamped(x: f32) -> f32 {
    // n = round(x / ln 2), as an integer read straight from the bits (no float->int cast,
    // which would turn NaN into 0) and as an exact float.
    let t = x * LOG2_E + ROUND_MAGIC;
    let n = (t.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let nf = t - ROUND_MAGIC;
    // r = x - n ln2 = r_hi + r_lo: `x - nf * LN2_HI` is exact (exact product, Sterbenz
    // subtraction), `r_lo` is small (|r_lo| <= 0.032).
    let r_hi = x - nf * LN2_HI;
    let r_lo = -(nf * LN2_LO);
    let r = r_hi + r_lo;
    // Estrin's scheme: shorter dependency chain than Horner, same accuracy here.
    let r2 = r * r;
    let q = (EXP_C2 + r * EXP_C3) + r2 * ((EXP_C4 + r * EXP_C5) + r2 * EXP_C6);
    // e^r = (1 + r_hi) + (r_lo + r² q), with 1 + r_hi as an exact sum s + s_err (Fast2Sum,
    // |r_hi| < 1), so only the last addition rounds at the result's scale.
    let s = 1.0 + r_hi;
    let s_err = (1.0 - s) + r_hi;
    let p = s + ((s_err + r_lo) + r2 * q);
    // 2^n = 2^n1 * 2^n2 with both halves normal (n1, n2 in [-75, 65]); the first product is
    // exact, the second rounds once, also into the subnormal range or to 0 / +inf.
    let n1 = n >> 1;
    let n2 = n.wrapping_sub(n1);
    let s1 = f32::from_bits((n1.wrapping_add(127) << 23) as u32);
    let s2 = f32::from_bits((n2.wrapping_add(127) << 23) as u32);
    // A NaN input makes `p` NaN, so the garbage scale from its bits cannot hide it.
    (p * s1) * s2
}

/// `kf ln2 + ln(1 + f) + corr` for an exact `f` in about `[-0.3, 0.5]`, an integer-valued `kf`
/// and a small absolute correction `corr`. NaN in any argument gives NaN.
#[inline(always)]
fn ln1p_reduced(f: f32, kf: f32, corr: f32) -> f32 {
    let s = f / (2.0 + f); // ln(1 + f) = 2 atanh(s), |s| <= 0.2
    let z = s * s;
    // s R(z), Estrin-style for a short dependency chain.
    let sr = (s * z) * ((LG1 + z * LG2) + (z * z) * LG3);
    let hfsq = 0.5 * f * f;
    // 2 atanh(s) = f - hfsq + s (hfsq + R): sum the small terms first, the exact f and the
    // exact k * LN2_HI last.
    let tail = sr + (s * hfsq + (kf * LN2_LO + corr));
    kf * LN2_HI - ((hfsq - tail) - f)
}

/// `ln(u) + k_bias ln2 + corr` for a positive normal finite `u`. Other `u` give garbage
/// (callers select the special values), except that NaN in `u` or `corr` gives NaN.
#[inline(always)]
fn ln_core(u: f32, k_bias: i32, corr: f32) -> f32 {
    let bits = u.to_bits() as i32;
    // k such that m = u / 2^k lies in [sqrt(1/2), sqrt(2)): offsetting the bits by those of
    // sqrt(1/2) carries into the exponent field exactly where the mantissa passes sqrt(2).
    let k = bits.wrapping_sub(SQRT_HALF_BITS) >> 23;
    let m = f32::from_bits(bits.wrapping_sub(k << 23) as u32);
    let kf = k.wrapping_add(k_bias) as f32;
    ln1p_reduced(m - 1.0, kf, corr) // m - 1 is exact (Sterbenz), in [-0.293, 0.415)
}

/// `v` where `bad` is false, a NaN (all bits set) where it is true: one OR instead of a select.
#[inline(always)]
fn nan_if(bad: bool, v: f32) -> f32 {
    f32::from_bits(v.to_bits() | (bad as u32).wrapping_neg())
}

/// Natural logarithm `ln(x)` (see the module docs for special values).
#[inline(always)]
pub(crate) fn ln_f32(x: f32) -> f32 {
    // Subnormals: scale by 2^23 (exact) and take 23 off the exponent.
    let sub = x < f32::MIN_POSITIVE;
    let u = x * if sub { TWO_POW_23 } else { 1.0 };
    let k_bias = if sub { -23 } else { 0 };
    // `-0.0` as correction lets LLVM drop the add (`v + -0.0 == v` for every v).
    let r = ln_core(u, k_bias, -0.0);
    let r = if x == 0.0 { f32::NEG_INFINITY } else { r };
    let r = if x == f32::INFINITY { f32::INFINITY } else { r };
    nan_if((x < 0.0) | x.is_nan(), r)
}

/// `ln(1 + x)` for finite `x > -1` (and NaN -> NaN); `-0` comes out as `+0`.
#[inline(always)]
fn log1p_core(x: f32) -> f32 {
    let u = 1.0 + x;
    // u - 1 is exact and so is x - (u - 1) (for u < 2^24; beyond, the term is negligible):
    // c is the rounding error of 1 + x, and ln(u + c) ≈ ln(u) + c / u.
    let c = (x - (u - 1.0)) / u;
    ln_core(u, 0, c)
}

/// `ln(1 + x)`, accurate in relative terms also for tiny `|x|` (see the module docs for
/// special values).
#[inline(always)]
pub(crate) fn log1p_f32(x: f32) -> f32 {
    let r = log1p_core(x);
    let r = if x == 0.0 { x } else { r }; // keep the sign of zero
    let r = if x == -1.0 { f32::NEG_INFINITY } else { r };
    let r = if x == f32::INFINITY { f32::INFINITY } else { r };
    nan_if((x < -1.0) | x.is_nan(), r)
}

/// `ln(1 + e)` for `e` in `[0, 1]` (NaN -> NaN), without going through the bits: `1 + e` is
/// either `1 + f` with `f = e`, or `2 (1 + f)` with `f = (e - 1) / 2` (exact for `e >= 1/2`,
/// Sterbenz), so `f` stays in `[-0.25, 0.5)` and no rounding error of `1 + e` needs correcting.
#[inline(always)]
pub(crate) fn log1p_unit(e: f32) -> f32 {
    let big = e >= 0.5;
    let f = if big { (e - 1.0) * 0.5 } else { e };
    let kf = if big { 1.0 } else { 0.0 };
    ln1p_reduced(f, kf, -0.0)
}

/// `ln(1 + e^x)`, computed as `max(x, 0) + log1p(e^-|x|)`; NaN -> NaN, no flush to zero.
#[inline(always)]
pub(crate) fn softplus_f32(x: f32) -> f32 {
    let pos = if x > 0.0 { x } else { 0.0 };
    // e in [0, 1] (or NaN, which reaches the sum through e).
    let e = exp_neg_abs(x);
    pos + log1p_unit(e)
}

/// Logistic sigmoid `1 / (1 + e^-x)`, stable for both signs; NaN -> NaN.
#[inline(always)]
pub(crate) fn sigmoid_f32(x: f32) -> f32 {
    // e = e^-|x| <= 1 never overflows: sigmoid = 1 / (1 + e) for x >= 0, e / (1 + e) otherwise.
    let e = exp_neg_abs(x);
    // NaN takes the `e` (NaN) branch.
    let num = if x >= 0.0 { 1.0 } else { e };
    // 1 + e = d + d_lo exactly (Fast2Sum, e <= 1); rounding to d alone would cost up to 1 ulp.
    let d = 1.0 + e;
    let d_lo = (1.0 - d) + e;
    let q = num / d;
    // num / (d + d_lo) ≈ q (1 - d_lo / d); |d_lo / d| <= 2^-24, so 1/d only needs a few
    // percent: (24 - 8 d) / 17 is the minimax linear fit on [1, 2] (relative error 1/17).
    q - q * (d_lo * (INV_C0 - INV_C1 * d))
}

/// Branch-free `atan` for f32 (Cephes `atanf`: reduction to `|x| <= tan(π/8)` by selects, degree-4
/// polynomial in `x²`; max error 3 ulp, relative 2e-7, see the test below). Vectorises like
/// `crate::fastmath`; ±inf gives ±π/2 and NaN gives NaN.
#[inline(always)]
pub(crate) fn atan_f32(x: f32) -> f32 {
    use std::f32::consts::{FRAC_PI_2, FRAC_PI_4};
    let ax = x.abs();
    let big = ax > 2.414_213_6; // tan(3π/8)
    let mid = ax > 0.414_213_57; // tan(π/8)
                                 // atan(a) = π/2 + atan(-1/a) = π/4 + atan((a-1)/(a+1))
    let r_big = -1.0 / ax;
    let r_mid = (ax - 1.0) / (ax + 1.0);
    let r = if big {
        r_big
    } else if mid {
        r_mid
    } else {
        ax
    };
    let y0 = if big {
        FRAC_PI_2
    } else if mid {
        FRAC_PI_4
    } else {
        0.0
    };
    let z = r * r;
    let p = (((8.053_744_5e-2 * z - 1.387_768_6e-1) * z + 1.997_771_1e-1) * z - 3.333_295e-1) * z;
    (y0 + (r + r * p)).copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Points per sampler (each test runs several samplers: 2.75M to 4.5M points per function
    /// in debug builds, 8x as many with optimisations).
    const N: usize = if cfg!(debug_assertions) {
        1 << 20
    } else {
        1 << 23
    };

    /// Distance in ulps between two f32 (0 when both are NaN, `u32::MAX` when one is).
    fn ulp_diff(a: f32, b: f32) -> u32 {
        if a.is_nan() || b.is_nan() {
            return if a.is_nan() && b.is_nan() {
                0
            } else {
                u32::MAX
            };
        }
        // Map the sign-magnitude bit patterns onto a monotonic integer line (±0 coincide).
        let key = |v: f32| {
            let b = v.to_bits() as i64;
            if b & 0x8000_0000 != 0 {
                -(b & 0x7fff_ffff)
            } else {
                b
            }
        };
        (key(a) - key(b)).unsigned_abs().min(u32::MAX as u64) as u32
    }

    /// xorshift32: deterministic, dependency-free pseudo-random bits.
    struct XorShift(u32);
    impl XorShift {
        fn next(&mut self) -> u32 {
            let mut v = self.0;
            v ^= v << 13;
            v ^= v >> 17;
            v ^= v << 5;
            self.0 = v;
            v
        }
        /// Uniform in [lo, hi).
        fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
            let u = (self.next() >> 8) as f32 / (1u32 << 24) as f32;
            lo + (hi - lo) * u
        }
    }

    /// Max ulp error of `f` against `reference` (f64 rounded to f32) over `xs`; fails above
    /// `max_ulp` and names the worst input.
    fn check(
        name: &str,
        f: impl Fn(f32) -> f32,
        reference: impl Fn(f64) -> f64,
        xs: impl Iterator<Item = f32>,
        max_ulp: u32,
    ) {
        let mut worst = (0u32, 0.0f32);
        for x in xs {
            let d = ulp_diff(f(x), reference(x as f64) as f32);
            if d > worst.0 {
                worst = (d, x);
            }
        }
        assert!(
            worst.0 <= max_ulp,
            "{name}: {} ulp at x = {:e} (got {:e}, want {:e})",
            worst.0,
            worst.1,
            f(worst.1),
            reference(worst.1 as f64) as f32
        );
    }

    /// `n` evenly spaced points covering [lo, hi].
    fn sweep(lo: f32, hi: f32, n: usize) -> impl Iterator<Item = f32> {
        (0..n).map(move |i| lo + (hi - lo) * (i as f32 / (n - 1) as f32))
    }

    /// `n` uniformly random points in [lo, hi).
    fn random(lo: f32, hi: f32, n: usize, seed: u32) -> impl Iterator<Item = f32> {
        let mut rng = XorShift(seed);
        (0..n).map(move |_| rng.uniform(lo, hi))
    }

    /// `n` random f32 with uniformly random bit patterns whose magnitude lies in [lo, hi]
    /// (log-uniform-ish: every binade equally likely), with the given sign.
    fn random_bits(lo: f32, hi: f32, negative: bool, n: usize, seed: u32) -> Vec<f32> {
        let mut rng = XorShift(seed);
        let (a, b) = (lo.to_bits(), hi.to_bits());
        (0..n)
            .map(|_| {
                let v = f32::from_bits(a + rng.next() % (b - a + 1));
                if negative {
                    -v
                } else {
                    v
                }
            })
            .collect()
    }

    fn sigmoid_ref(x: f64) -> f64 {
        if x >= 0.0 {
            1.0 / (1.0 + (-x).exp())
        } else {
            let e = x.exp();
            e / (1.0 + e)
        }
    }

    fn softplus_ref(x: f64) -> f64 {
        x.max(0.0) + (-x.abs()).exp().ln_1p()
    }

    #[test]
    fn exp_accuracy() {
        check("exp", exp_f32, f64::exp, sweep(-104.0, 88.8, N), 1);
        check(
            "exp",
            exp_f32,
            f64::exp,
            random(-110.0, 90.0, N, 0x1234_5678),
            1,
        );
        // Near zero, where r = x and the polynomial does all the work.
        check(
            "exp",
            exp_f32,
            f64::exp,
            random(-1.0, 1.0, N / 4, 0x0bad_cafe),
            1,
        );
        let tiny = random_bits(1e-30, 1.0, false, N / 4, 7);
        check(
            "exp",
            exp_f32,
            f64::exp,
            tiny.iter().flat_map(|&v| [v, -v]),
            1,
        );
    }

    #[test]
    fn exp_special_values() {
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-0.0), 1.0);
        assert_eq!(exp_f32(1.0), std::f32::consts::E);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert!(exp_f32(f32::NAN).is_nan());
        assert!(exp_f32(-f32::NAN).is_nan());
        // Overflow edge: ln(f32::MAX) = 88.7228391...
        assert!(exp_f32(88.72283).is_finite());
        assert_eq!(exp_f32(88.722_84), f32::INFINITY);
        assert_eq!(exp_f32(88.73), f32::INFINITY);
        assert_eq!(exp_f32(1000.0), f32::INFINITY);
        assert_eq!(exp_f32(f32::MAX), f32::INFINITY);
        // Gradual underflow: subnormal results, then 0 below ln(2^-150) = -103.972...
        let sub = exp_f32(-100.0);
        assert!(sub > 0.0 && sub < f32::MIN_POSITIVE);
        assert!(ulp_diff(sub, (-100.0f64).exp() as f32) <= 1);
        assert_eq!(exp_f32(-103.2), f32::from_bits(1)); // e^-103.2 ≈ 1.08 * 2^-149
        assert_eq!(exp_f32(-104.0), 0.0);
        assert_eq!(exp_f32(-1000.0), 0.0);
        assert_eq!(exp_f32(-f32::MAX), 0.0);
        // Subnormal inputs behave like 0.
        assert_eq!(exp_f32(f32::from_bits(1)), 1.0);
        assert_eq!(exp_f32(-f32::from_bits(1)), 1.0);
    }

    #[test]
    fn ln_accuracy() {
        check("ln", ln_f32, f64::ln, sweep(0.5, 2.0, N), 1);
        check("ln", ln_f32, f64::ln, random(0.0, 1e6, N, 99), 1);
        // Every binade, subnormals included.
        let all = random_bits(f32::from_bits(1), f32::MAX, false, N, 0xdead_beef);
        check("ln", ln_f32, f64::ln, all.into_iter(), 1);
        // Next to 1, where ln(x) is small and cancellation would show.
        let near1 = random_bits(1e-7, 0.25, false, N / 4, 3);
        check(
            "ln",
            ln_f32,
            f64::ln,
            near1.iter().flat_map(|&d| [1.0 + d, 1.0 - d]),
            1,
        );
    }

    #[test]
    fn ln_special_values() {
        assert_eq!(ln_f32(1.0).to_bits(), 0.0f32.to_bits());
        assert_eq!(ln_f32(std::f32::consts::E), 1.0);
        assert_eq!(ln_f32(0.0), f32::NEG_INFINITY);
        assert_eq!(ln_f32(-0.0), f32::NEG_INFINITY);
        assert!(ln_f32(-1.0).is_nan());
        assert!(ln_f32(-f32::from_bits(1)).is_nan());
        assert!(ln_f32(f32::NEG_INFINITY).is_nan());
        assert_eq!(ln_f32(f32::INFINITY), f32::INFINITY);
        assert!(ln_f32(f32::NAN).is_nan());
        assert_eq!(ln_f32(f32::MAX), (f32::MAX as f64).ln() as f32);
        // Subnormals and the smallest normal.
        for bits in [1u32, 2, 3, 0x1234, 0x7f_ffff, 0x80_0000] {
            let x = f32::from_bits(bits);
            assert!(ulp_diff(ln_f32(x), (x as f64).ln() as f32) <= 1, "{x:e}");
        }
        assert!(ulp_diff(ln_f32(f32::from_bits(1)), -103.278_93) <= 1);
        for k in -149..128 {
            let x = 2f32.powi(k);
            assert!(ulp_diff(ln_f32(x), (x as f64).ln() as f32) <= 1, "2^{k}");
        }
    }

    #[test]
    fn log1p_accuracy() {
        check("log1p", log1p_f32, f64::ln_1p, sweep(0.0, 1.0, N), 1);
        check("log1p", log1p_f32, f64::ln_1p, sweep(-0.5, 0.0, N / 2), 1);
        check("log1p", log1p_f32, f64::ln_1p, random(-1.0, 2.0, N, 5), 1);
        check(
            "log1p",
            log1p_f32,
            f64::ln_1p,
            random(-0.5, 1e6, N / 2, 6),
            1,
        );
        // Tiny to huge magnitudes, both signs, every binade.
        let pos = random_bits(f32::from_bits(1), f32::MAX, false, N, 11);
        check("log1p", log1p_f32, f64::ln_1p, pos.into_iter(), 1);
        let neg = random_bits(f32::from_bits(1), 1.0, true, N / 2, 12);
        check("log1p", log1p_f32, f64::ln_1p, neg.into_iter(), 1);
    }

    #[test]
    fn log1p_special_values() {
        assert_eq!(log1p_f32(0.0).to_bits(), 0.0f32.to_bits());
        assert_eq!(log1p_f32(-0.0).to_bits(), (-0.0f32).to_bits());
        assert_eq!(log1p_f32(1e-30), 1e-30);
        assert_eq!(log1p_f32(-1e-30), -1e-30);
        assert_eq!(log1p_f32(1e-7), (1e-7f64).ln_1p() as f32);
        assert_eq!(log1p_f32(f32::from_bits(1)), f32::from_bits(1));
        assert_eq!(log1p_f32(-1.0), f32::NEG_INFINITY);
        assert!(log1p_f32(-1.000_000_1).is_nan());
        assert!(log1p_f32(-2.0).is_nan());
        assert!(log1p_f32(f32::NEG_INFINITY).is_nan());
        assert_eq!(log1p_f32(f32::INFINITY), f32::INFINITY);
        assert!(log1p_f32(f32::NAN).is_nan());
        assert_eq!(log1p_f32(1.0), std::f32::consts::LN_2);
        assert_eq!(log1p_f32(f32::MAX), (f32::MAX as f64).ln() as f32);
        let just_above = -1.0 + f32::EPSILON / 2.0; // -0.99999994, 1 + x = 2^-24
        assert!(ulp_diff(log1p_f32(just_above), (just_above as f64).ln_1p() as f32) <= 1);
    }

    #[test]
    fn softplus_accuracy() {
        check(
            "softplus",
            softplus_f32,
            softplus_ref,
            sweep(-100.0, 100.0, N),
            2,
        );
        check(
            "softplus",
            softplus_f32,
            softplus_ref,
            random(-120.0, 120.0, N, 21),
            2,
        );
        check(
            "softplus",
            softplus_f32,
            softplus_ref,
            random(-4.0, 4.0, N, 22),
            2,
        );
    }

    #[test]
    fn softplus_special_values() {
        assert_eq!(softplus_f32(0.0), std::f32::consts::LN_2);
        assert_eq!(softplus_f32(-0.0), std::f32::consts::LN_2);
        assert_eq!(softplus_f32(f32::from_bits(1)), std::f32::consts::LN_2);
        assert_eq!(softplus_f32(-f32::from_bits(1)), std::f32::consts::LN_2);
        assert_eq!(softplus_f32(100.0), 100.0);
        assert_eq!(softplus_f32(20.0), 20.0);
        assert!(ulp_diff(softplus_f32(-100.0), (-100.0f64).exp() as f32) <= 1);
        assert!(softplus_f32(-100.0) > 0.0);
        assert_eq!(softplus_f32(-104.0), 0.0);
        assert_eq!(softplus_f32(f32::INFINITY), f32::INFINITY);
        assert_eq!(softplus_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(softplus_f32(f32::MAX), f32::MAX);
        assert!(softplus_f32(f32::NAN).is_nan());
        assert!(softplus_f32(-f32::NAN).is_nan());
    }

    #[test]
    fn sigmoid_accuracy() {
        check(
            "sigmoid",
            sigmoid_f32,
            sigmoid_ref,
            sweep(-100.0, 100.0, N),
            2,
        );
        check(
            "sigmoid",
            sigmoid_f32,
            sigmoid_ref,
            random(-120.0, 120.0, N, 31),
            2,
        );
        check(
            "sigmoid",
            sigmoid_f32,
            sigmoid_ref,
            random(-4.0, 4.0, N, 32),
            2,
        );
    }

    #[test]
    fn sigmoid_special_values() {
        assert_eq!(sigmoid_f32(0.0), 0.5);
        assert_eq!(sigmoid_f32(-0.0), 0.5);
        assert_eq!(sigmoid_f32(100.0), 1.0);
        assert_eq!(sigmoid_f32(f32::INFINITY), 1.0);
        assert_eq!(sigmoid_f32(f32::NEG_INFINITY), 0.0);
        assert!(ulp_diff(sigmoid_f32(-100.0), (-100.0f64).exp() as f32) <= 1);
        assert_eq!(sigmoid_f32(-104.0), 0.0);
        assert!(sigmoid_f32(f32::NAN).is_nan());
        assert!(sigmoid_f32(-f32::NAN).is_nan());
        // Tiny |x|: 1/2 ± x/4.
        assert_eq!(sigmoid_f32(1e-30), 0.5);
        assert_eq!(sigmoid_f32(-1e-30), 0.5);
    }
}
