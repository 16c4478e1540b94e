//! The battery of checks every loss family runs, written once. Each check takes what is
//! particular to a family — a closure that runs the loss for given inputs and reduction, the
//! family's independent f64 reference, its cases and tolerances — so that a family's test file
//! holds its reference, its fixtures and its special cases only.
//!
//! - [`REDUCTIONS`], [`upstream`], [`up_tensor`] and [`reduce_reference`]: the reductions every
//!   loss is checked under, the upstream gradients fed to them and the reference's reduction;
//! - [`check_against_reference`], [`check_label_types_agree`]: f64 and f32 against the
//!   reference, u32 labels against i64 labels;
//! - [`check_fixture`], [`check_finite_differences`]: PyTorch fixtures and finite differences;
//! - [`check_extreme`], [`HalfErrors`], [`check_accumulated`], [`half_logits`]: extreme inputs
//!   and half rounding;
//! - [`check_views_equal_copies`]: strided, broadcast and offset views against plain copies;
//! - [`check_thread_count_determinism`]: bit-for-bit results for any rayon thread count;
//! - [`check_error`], [`check_label_errors`], [`check_empty_batch`]: the error table, edge batches;
//! - [`check_fused_equals_recomputed`]: the fused training pass against the plain one;
//! - [`cuda_and_cpu`], [`CudaResults::assert_close`]: a CUDA result against the CPU kernels'.

use super::{
    assert_close, bits_of, err_of, finite_diff, loss_and_grad, on_cpu_kernels, to_f64_vec,
};
use candle_core::{DType, Device, IndexOp, Result, Tensor, Var};
use candle_detloss::Reduction;
use serde_json::Value;
use std::fmt::Debug;

/// A loss value and the gradient of `sum(loss · upstream)`, flattened to f64.
pub type LossGrad = (Vec<f64>, Vec<f64>);

// ---------------------------------------------------------------------------------------------
// Reductions, upstream gradients and the reference's reduction.
// ---------------------------------------------------------------------------------------------

/// Every reduction, `AvgFactor` with a factor that is not a count: the list each family's
/// reference comparison and layout checks run through.
pub const REDUCTIONS: [Reduction; 4] = [
    Reduction::None,
    Reduction::Sum,
    Reduction::Mean,
    Reduction::AvgFactor(7.5),
];

/// The scalar upstream gradient of a reduced loss in [`upstream`]: not 1, so that a backward
/// that ignores its upstream gradient fails.
pub const UPSTREAM: f64 = 0.7;

/// An upstream gradient for a loss reduced as `red`: `len` normal values for `None` (one per
/// loss item), else the scalar [`UPSTREAM`].
pub fn upstream(rng: &mut super::Rng, red: Reduction, len: usize) -> Vec<f64> {
    upstream_or(rng, red, len, UPSTREAM)
}

/// [`upstream`] with another scalar for the reduced losses.
pub fn upstream_or(rng: &mut super::Rng, red: Reduction, len: usize, scalar: f64) -> Vec<f64> {
    if red == Reduction::None {
        rng.vec_normal(len, 1.0)
    } else {
        vec![scalar]
    }
}

/// The upstream gradient of [`upstream`] as a tensor: of `shape` (the loss's) for `None`, else
/// a scalar.
pub fn up_tensor(up: &[f64], red: Reduction, shape: &[usize], dev: &Device) -> Tensor {
    if red == Reduction::None {
        Tensor::from_vec(up.to_vec(), shape, dev).unwrap()
    } else {
        Tensor::new(up[0], dev).unwrap()
    }
}

/// An upstream gradient of ones: of `shape` for `None`, else the scalar 1 (in `dtype`).
pub fn unit_upstream(red: Reduction, shape: &[usize], dtype: DType, dev: &Device) -> Tensor {
    if red == Reduction::None {
        Tensor::ones(shape, dtype, dev).unwrap()
    } else {
        Tensor::ones((), dtype, dev).unwrap()
    }
}

/// The reference's reduction, shared by the families' independent references: per-item losses
/// `per` and the derivatives `dper` of each item w.r.t. the inputs (`grads_per_item` inputs an
/// item, in order), reduced as `red` (`Mean` divides by `mean_count`, 0 when it is 0), with the
/// gradient of `sum(loss · up)`.
pub fn reduce_reference(
    per: Vec<f64>,
    dper: Vec<f64>,
    red: Reduction,
    mean_count: f64,
    up: &[f64],
    grads_per_item: usize,
) -> LossGrad {
    let scale = match red {
        Reduction::None | Reduction::Sum => 1.0,
        Reduction::Mean => {
            if mean_count > 0.0 {
                1.0 / mean_count
            } else {
                0.0
            }
        }
        Reduction::AvgFactor(f) => 1.0 / f,
    };
    match red {
        Reduction::None => {
            let g = (0..dper.len())
                .map(|e| dper[e] * up[e / grads_per_item])
                .collect();
            (per, g)
        }
        _ => (
            vec![per.iter().sum::<f64>() * scale],
            dper.iter().map(|d| d * scale * up[0]).collect(),
        ),
    }
}

/// Loss and gradient of `sum(f(x) · up)` through candle's autograd, as f64 vectors.
pub fn run_loss(x: &Tensor, up: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> LossGrad {
    let (l, g) = loss_and_grad(x, up, f).expect("forward/backward");
    (to_f64_vec(&l), to_f64_vec(&g))
}

/// The largest magnitude of `v` (0 for an empty `v`).
pub fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0f64, |m, x| m.max(x.abs()))
}

/// log(1 + e^z) without overflow (for the references).
pub fn softplus(z: f64) -> f64 {
    if z > 0.0 {
        z + (-z).exp().ln_1p()
    } else {
        z.exp().ln_1p()
    }
}

// ---------------------------------------------------------------------------------------------
// Tolerances and the comparison against the f64 reference.
// ---------------------------------------------------------------------------------------------

/// A tolerance `|got - want| <= atol + rtol·|want|`, where `atol` is either absolute or a
/// multiple of the reference's largest magnitude (a loss's scale), never below `min_atol`.
#[derive(Clone, Copy, Debug)]
pub struct Tol {
    /// The absolute tolerance, or its multiple of the scale when `scale_floor` is set.
    pub atol: f64,
    /// The relative tolerance.
    pub rtol: f64,
    /// `Some(floor)`: `atol` is relative to `max(max |want|, floor)`.
    pub scale_floor: Option<f64>,
    /// The absolute tolerance is at least this (one step of a dtype's grid).
    pub min_atol: f64,
}

impl Tol {
    /// An absolute `atol` and a relative `rtol`.
    pub const fn abs(atol: f64, rtol: f64) -> Tol {
        Tol {
            atol,
            rtol,
            scale_floor: None,
            min_atol: 0.0,
        }
    }

    /// `atol` times the largest reference magnitude (at least `floor`), and `rtol`.
    pub const fn scaled(atol: f64, floor: f64, rtol: f64) -> Tol {
        Tol {
            atol,
            rtol,
            scale_floor: Some(floor),
            min_atol: 0.0,
        }
    }

    /// This tolerance with an absolute tolerance of at least `min_atol`.
    pub const fn at_least(self, min_atol: f64) -> Tol {
        Tol { min_atol, ..self }
    }

    /// The absolute tolerance for the reference values `want`.
    pub fn atol_for(&self, want: &[f64]) -> f64 {
        let atol = match self.scale_floor {
            Some(floor) => self.atol * max_abs(want).max(floor),
            None => self.atol,
        };
        atol.max(self.min_atol)
    }

    /// Asserts `got` within this tolerance of `want`, element-wise ([`assert_close`]).
    pub fn check(&self, what: &str, got: &[f64], want: &[f64]) {
        assert_close(what, got, want, self.atol_for(want), self.rtol);
    }
}

/// Tolerances of [`check_against_reference`]: loss and gradient, in f64 (the kernel's own
/// rounding) and in f32 (the crate's fast exp/log against the reference at f32 inputs).
#[derive(Clone, Copy, Debug)]
pub struct RefTols {
    /// The f64 loss.
    pub f64_loss: Tol,
    /// The f64 gradient.
    pub f64_grad: Tol,
    /// The f32 loss.
    pub f32_loss: Tol,
    /// The f32 gradient.
    pub f32_grad: Tol,
}

/// The tolerances of the classification losses (sigmoid focal, softmax, GHM-C): f64 to 1e-10,
/// f32 to 1e-5 relative plus 2e-6 of the loss's (gradient's) scale.
pub const CLASSIFICATION_TOLS: RefTols = RefTols {
    f64_loss: Tol::abs(1e-12, 1e-10),
    f64_grad: Tol::abs(1e-13, 1e-10),
    f32_loss: Tol::scaled(2e-6, 1e-3, 1e-5),
    f32_grad: Tol::scaled(2e-6, 1e-6, 1e-5),
};

/// The loss against the family's independent f64 reference in f64 and in f32: `ours(dtype)` runs
/// the loss on inputs of `dtype`, `reference(dtype)` evaluates the reference at those inputs as
/// `dtype` holds them. Catches a wrong formula, reduction or upstream scaling in either dtype.
pub fn check_against_reference(
    what: &str,
    tols: &RefTols,
    mut ours: impl FnMut(DType) -> LossGrad,
    mut reference: impl FnMut(DType) -> LossGrad,
) {
    for (dtype, name, loss_tol, grad_tol) in [
        (DType::F64, "f64", tols.f64_loss, tols.f64_grad),
        (DType::F32, "f32", tols.f32_loss, tols.f32_grad),
    ] {
        let (rl, rg) = reference(dtype);
        let (l, g) = ours(dtype);
        loss_tol.check(&format!("loss {name} {what}"), &l, &rl);
        grad_tol.check(&format!("grad {name} {what}"), &g, &rg);
    }
}

/// Labels of `u32` and `i64` give the same result: `run` takes the labels tensor (built from
/// `labels` on the CPU in both types). The kernels read either type; a mix-up of the two shows.
pub fn check_label_types_agree<R: PartialEq + Debug>(
    what: &str,
    labels: &[u32],
    run: impl Fn(&Tensor) -> R,
) {
    let dev = Device::Cpu;
    let l32 = Tensor::from_vec(labels.to_vec(), labels.len(), &dev).unwrap();
    let l64 = Tensor::from_vec(
        labels.iter().map(|v| *v as i64).collect::<Vec<_>>(),
        labels.len(),
        &dev,
    )
    .unwrap();
    assert_eq!(run(&l32), run(&l64), "{what}");
}

// ---------------------------------------------------------------------------------------------
// Fixtures and finite differences.
// ---------------------------------------------------------------------------------------------

/// A fixture's reduction: `reduction` ("none", "sum", "mean", "avg_factor" with `avg_factor`).
pub fn fx_reduction(reduction: &Value, avg_factor: &Value) -> Reduction {
    match reduction.as_str().unwrap() {
        "none" => Reduction::None,
        "sum" => Reduction::Sum,
        "mean" => Reduction::Mean,
        "avg_factor" => Reduction::AvgFactor(avg_factor.as_f64().unwrap()),
        r => panic!("unknown reduction {r}"),
    }
}

/// Our loss and gradient against a fixture's (`case["loss"]`, `case["grad"]`, computed by
/// PyTorch from the same inputs). Returns the fixture's loss and gradient shapes, for the
/// family's shape checks.
pub fn check_fixture(
    what: &str,
    got: &LossGrad,
    case: &Value,
    loss_tol: Tol,
    grad_tol: Tol,
) -> (Vec<usize>, Vec<usize>) {
    let (lshape, lexp) = super::fx_tensor(&case["loss"]);
    let (gshape, gexp) = super::fx_tensor(&case["grad"]);
    loss_tol.check(&format!("{what} loss"), &got.0, &lexp);
    grad_tol.check(&format!("{what} grad"), &got.1, &gexp);
    (lshape, gshape)
}

/// How [`check_finite_differences`] compares.
#[derive(Clone, Copy, Debug)]
pub struct FdCheck {
    /// The step of the central differences.
    pub h: f64,
    /// Gradient against the differences.
    pub tol: Tol,
    /// Also assert the gradient is not all zero (a vacuous comparison).
    pub nonzero: bool,
}

/// The finite-difference check of the f64 losses: step 1e-6, to 1e-7 + 1e-6 relative.
pub const FD: FdCheck = FdCheck {
    h: 1e-6,
    tol: Tol::abs(1e-7, 1e-6),
    nonzero: false,
};

/// The analytic gradient `grad` at `x` against central finite differences of `objective`
/// (`sum(loss · up)` at the given inputs): the gradient is that of the loss computed.
pub fn check_finite_differences(
    what: &str,
    grad: &[f64],
    x: &[f64],
    check: FdCheck,
    objective: impl Fn(&[f64]) -> f64,
) {
    if check.nonzero {
        assert!(grad.iter().any(|v| *v != 0.0), "{what}: zero gradient");
    }
    let fd = finite_diff(x, check.h, objective);
    check.tol.check(what, grad, &fd);
}

/// `sum(loss · up)` as an f64: the objective of [`check_finite_differences`].
pub fn weighted_sum(loss: Tensor, up: &Tensor) -> f64 {
    (loss * up)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// Extreme inputs and half precision.
// ---------------------------------------------------------------------------------------------

/// `v` rounded to the half type of `dtype` (f16, else bf16).
pub fn round_half(v: f64, dtype: DType) -> f64 {
    match dtype {
        DType::F16 => half::f16::from_f64(v).to_f64(),
        _ => half::bf16::from_f64(v).to_f64(),
    }
}

/// `len` moderate logits for a half-precision comparison, where the naive half formula is still
/// finite: normal with standard deviation 2.5, clamped to ±8 and rounded to the half `dtype`.
pub fn half_logits(rng: &mut super::Rng, len: usize, dtype: DType) -> Vec<f64> {
    rng.vec_normal(len, 2.5)
        .iter()
        .map(|v| round_half(v.clamp(-8.0, 8.0), dtype))
        .collect()
}

/// The values `v` as `dtype` holds them.
pub fn round_to_dtype(v: &[f64], dtype: DType) -> Vec<f64> {
    to_f64_vec(
        &Tensor::new(v, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
    )
}

/// How [`check_extreme`] compares a result of some dtype.
#[derive(Clone, Copy, Debug)]
pub struct Extreme {
    /// The dtype of the result.
    pub dtype: DType,
    /// The relative tolerance in f32 (a few ulp; the other dtypes' are fixed).
    pub f32_rtol: f64,
    /// The loss's absolute tolerance relative to the largest reference loss (a sum dominated by
    /// a huge term), rather than four subnormal steps of the dtype.
    pub loss_relative: bool,
}

impl Extreme {
    /// (relative tolerance, spacing of the dtype's subnormals).
    fn ulps(&self) -> (f64, f64) {
        match self.dtype {
            DType::F64 => (1e-12, 5e-324),
            DType::F32 => (self.f32_rtol, 1.5e-45),
            DType::F16 => (2e-3, 6e-8),
            _ => (1.6e-2, 1e-40),
        }
    }
}

/// A result for extreme inputs (saturated, huge, ties) is finite and equals the reference
/// rounded to the output dtype (a half result cannot be closer than that) to a few ulp of
/// that dtype, or a few of its subnormal steps: catches overflow and cancellation.
pub fn check_extreme(what: &str, case: Extreme, got: &LossGrad, want: &LossGrad) {
    let (l, g) = got;
    assert!(
        l.iter().chain(g).all(|v| v.is_finite()),
        "{what}: {l:?} {g:?}"
    );
    let (tol, sub) = case.ulps();
    let latol = if case.loss_relative {
        tol * max_abs(&want.0)
    } else {
        4.0 * sub
    };
    let dtype = case.dtype;
    assert_close(
        &format!("{what} loss"),
        l,
        &round_to_dtype(&want.0, dtype),
        latol,
        tol,
    );
    assert_close(
        &format!("{what} grad"),
        g,
        &round_to_dtype(&want.1, dtype),
        4.0 * sub,
        tol,
    );
}

/// The largest errors of ours and of the naive half evaluation (every intermediate rounded, as
/// a user composing half-precision tensor ops gets it) against the f64 reference, for
/// [`HalfErrors::check`]: ours must be within twice the naive error.
#[derive(Clone, Copy, Debug, Default)]
pub struct HalfErrors {
    ours_loss: f64,
    naive_loss: f64,
    ours_grad: f64,
    naive_grad: f64,
}

impl HalfErrors {
    /// Records one loss item: ours, the naive one and the reference's.
    pub fn loss(&mut self, ours: f64, naive: f64, reference: f64) {
        self.ours_loss = self.ours_loss.max((ours - reference).abs());
        self.naive_loss = self.naive_loss.max((naive - reference).abs());
    }

    /// Records one gradient element: ours, the naive one and the reference's.
    pub fn grad(&mut self, ours: f64, naive: f64, reference: f64) {
        self.ours_grad = self.ours_grad.max((ours - reference).abs());
        self.naive_grad = self.naive_grad.max((naive - reference).abs());
    }

    /// Asserts the naive errors are not 0 (the inputs do exercise the rounding) and ours are at
    /// most twice them, for the loss and for the gradient.
    pub fn check(&self, what: &str) {
        let (eol, enl, eog, eng) = (
            self.ours_loss,
            self.naive_loss,
            self.ours_grad,
            self.naive_grad,
        );
        assert!(enl > 0.0 && eng > 0.0, "{what}");
        assert!(eol <= 2.0 * enl, "{what} loss: ours {eol} naive {enl}");
        assert!(eog <= 2.0 * eng, "{what} grad: ours {eog} naive {eng}");
    }
}

/// A scalar reduction (`how`: "sum", "mean") of half-precision items accumulates in f32 or f64:
/// within 4e-3 relative of the reference's, far better than half would allow.
pub fn check_accumulated(what: &str, how: &str, got: f64, want: f64) {
    assert!(
        (got - want).abs() <= 4e-3 * want.abs(),
        "{what} {how} {got} vs {want}"
    );
}

// ---------------------------------------------------------------------------------------------
// Layouts.
// ---------------------------------------------------------------------------------------------

/// Inputs as views (strided, broadcast, offset) and the same values as plain tensors, for
/// [`check_views_equal_copies`].
pub struct Views {
    views: Vec<Tensor>,
    copies: Vec<Tensor>,
}

impl Views {
    /// `views` against their contiguous copies.
    pub fn contiguous(views: &[&Tensor]) -> Views {
        Views {
            views: views.iter().map(|t| (*t).clone()).collect(),
            copies: views.iter().map(|t| t.contiguous().unwrap()).collect(),
        }
    }

    /// Rows `start..start + len` of each of `inputs` (a view at an offset) against a copy of
    /// those rows.
    pub fn offset_rows(inputs: &[&Tensor], start: usize, len: usize) -> Views {
        let views: Vec<Tensor> = inputs
            .iter()
            .map(|t| t.narrow(0, start, len).unwrap())
            .collect();
        let copies = views.iter().map(|t| t.copy().unwrap()).collect();
        Views { views, copies }
    }

    /// These views with `shared` appended, the same on both sides (an upstream gradient).
    pub fn and(mut self, shared: &Tensor) -> Views {
        self.views.push(shared.clone());
        self.copies.push(shared.clone());
        self
    }
}

/// `run` on each case's views gives exactly (bit for bit) what it gives on their plain copies:
/// the kernels read strides and offsets, they do not assume a contiguous buffer.
pub fn check_views_equal_copies<R: PartialEq + Debug>(
    what: &str,
    cases: &[Views],
    run: impl Fn(&[Tensor]) -> R,
) {
    for (i, case) in cases.iter().enumerate() {
        assert_eq!(
            run(&case.views),
            run(&case.copies),
            "{what}: layout case {i}"
        );
    }
}

/// A `[rows, cols]` tensor of `data` (row-major) that is the transpose of a `[cols, rows]`
/// buffer: not contiguous.
pub fn transposed(data: Vec<f64>, rows: usize, cols: usize, dtype: DType, dev: &Device) -> Tensor {
    let t = Tensor::from_vec(data, (cols, rows), dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
        .t()
        .unwrap();
    assert!(!t.is_contiguous());
    t
}

/// Labels as the strided column 1 of an `[n, 2]` tensor of `lab2`.
pub fn label_column(lab2: Vec<i64>, n: usize, dev: &Device) -> Tensor {
    let t = Tensor::from_vec(lab2, (n, 2), dev)
        .unwrap()
        .i((.., 1))
        .unwrap();
    assert!(!t.is_contiguous());
    t
}

/// The strided inputs of a classification loss: `[n, c]` f32 logits (normal, standard deviation
/// 2) as the transpose of a `[c, n]` buffer, then labels in `-1..labels_end - 1` as the strided
/// column of an `[n, 2]` tensor (drawn from `rng` in that order).
pub fn strided_logits_and_labels(
    rng: &mut super::Rng,
    n: usize,
    c: usize,
    labels_end: u64,
) -> (Tensor, Tensor) {
    let dev = Device::Cpu;
    let x = transposed(rng.vec_normal(n * c, 2.0), n, c, DType::F32, &dev);
    let lab2: Vec<i64> = (0..2 * n)
        .map(|_| rng.below(labels_end) as i64 - 1)
        .collect();
    (x, label_column(lab2, n, &dev))
}

/// `up` narrowed to rows `start..start + len` where it is per item (`Reduction::None`).
pub fn up_rows(up: &Tensor, red: Reduction, start: usize, len: usize) -> Tensor {
    if red == Reduction::None {
        up.narrow(0, start, len).unwrap()
    } else {
        up.clone()
    }
}

// ---------------------------------------------------------------------------------------------
// Determinism, errors, empty batches, the fused training pass.
// ---------------------------------------------------------------------------------------------

/// Appends the bit patterns of `loss`, then of `grad`, to `bits`.
pub fn push_bits(bits: &mut Vec<u64>, loss: &Tensor, grad: &Tensor) {
    for v in to_f64_vec(loss).into_iter().chain(to_f64_vec(grad)) {
        bits.push(v.to_bits());
    }
}

/// `bits` (the results of a run, as bit patterns) are the same in rayon pools of 1, 2 and 3
/// threads: the chunking and the summation order do not depend on the thread count. Returns
/// the bits of the 1-thread run.
pub fn check_thread_count_determinism(bits: impl Fn() -> Vec<u64> + Sync) -> Vec<u64> {
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(&bits)
    };
    let one = run(1);
    assert_eq!(one, run(2));
    assert_eq!(one, run(3));
    one
}

/// Where an error message must name the loss (or function).
#[derive(Clone, Copy, Debug)]
pub enum Named<'a> {
    /// Anywhere in the message.
    Anywhere(&'a str),
    /// At its start.
    First(&'a str),
}

/// `r` is an error whose message names the loss (as `named` says) and contains every one of
/// `needles`: bad input is reported, and reported so that a user can act on it.
pub fn check_error<T>(named: Named, r: Result<T>, needles: &[&str]) {
    let e = err_of(r);
    match named {
        Named::Anywhere(name) => assert!(e.contains(name), "{e}"),
        Named::First(name) => assert!(e.starts_with(name), "{e}"),
    }
    for nd in needles {
        assert!(e.contains(nd), "`{e}` lacks `{nd}`");
    }
}

/// A row of [`check_label_errors`]: bad labels of some integer type and what the error says.
pub enum BadLabels<'a> {
    /// i64 labels and the text their error contains.
    I64(&'a [i64], &'a str),
    /// u32 labels and the text their error contains.
    U32(&'a [u32], &'a str),
}

/// Each of `rows` (labels out of range, or negative but not the ignore value -1) is an error
/// ([`check_error`]); `forward` takes the labels tensor.
pub fn check_label_errors(
    named: Named,
    rows: &[BadLabels],
    forward: impl Fn(&Tensor) -> Result<Tensor>,
) {
    let dev = Device::Cpu;
    for row in rows {
        let (t, needle) = match row {
            BadLabels::I64(l, nd) => (Tensor::new(*l, &dev).unwrap(), nd),
            BadLabels::U32(l, nd) => (Tensor::new(*l, &dev).unwrap(), nd),
        };
        check_error(named, forward(&t), &[needle]);
    }
}

/// An empty batch (of the labels/targets `forward` is given) under every reduction: `None`
/// gives a loss of `none_dims`, the scalar reductions 0 (a Mean over nothing is 0, not NaN).
pub fn check_empty_batch(none_dims: &[usize], mut forward: impl FnMut(Reduction) -> Tensor) {
    for red in REDUCTIONS {
        let l = forward(red);
        if red == Reduction::None {
            assert_eq!(l.dims(), none_dims);
        } else {
            assert_eq!(l.to_scalar::<f32>().unwrap(), 0.0);
        }
    }
}

/// [`check_empty_batch`] through the backward: `x` (f32, no rows) and targets of zeros, under
/// every reduction; the loss (summed for `None`, whose shape is `none_dims`) is 0 and the
/// gradient has the shape of `x`.
pub fn check_empty_batch_gradient(
    what: &str,
    x: &Tensor,
    none_dims: &[usize],
    forward: impl Fn(&Tensor, &Tensor, Reduction) -> Result<Tensor>,
) {
    let dev = x.device();
    for red in REDUCTIONS {
        let (l, g) = loss_and_grad(x, &Tensor::new(1f32, dev).unwrap(), |x| {
            let l = forward(x, &x.zeros_like()?, red)?;
            if red == Reduction::None {
                assert_eq!(l.dims(), none_dims);
                l.sum_all()
            } else {
                Ok(l)
            }
        })
        .unwrap();
        assert_eq!(l.to_scalar::<f32>().unwrap(), 0.0, "{what} {red:?}");
        assert_eq!(g.dims(), x.dims());
    }
}

/// Every item ignored: the loss is 0 and so is the gradient.
pub fn check_all_ignored(got: &LossGrad) {
    let (l, g) = got;
    assert_eq!(l, &vec![0.0]);
    assert!(g.iter().all(|v| *v == 0.0));
}

/// The fused training path against the plain one, for a loss with a scalar reduction:
/// - the loss of `x` (which tracks gradients, so the forward also computes the gradient) equals
///   the loss of `x` detached (loss only) bit for bit;
/// - for upstream gradients 1 and 3, the gradient the forward saved (first `backward`) equals
///   the one the backward op recomputes (a second `backward` through the same graph finds the
///   saved gradient taken) bit for bit, and is not all zero.
pub fn check_fused_equals_recomputed(what: &str, x: &Var, f: impl Fn(&Tensor) -> Result<Tensor>) {
    let tracked = f(x.as_tensor()).expect("loss");
    let detached = f(&x.as_tensor().detach()).expect("detached loss");
    assert_eq!(bits_of(&tracked), bits_of(&detached), "{what}: loss bits");
    for up in [1.0, 3.0] {
        let loss = f(x.as_tensor()).expect("loss");
        let obj = if up == 1.0 {
            loss
        } else {
            loss.affine(up, 0.0).expect("affine")
        };
        let g_saved = obj.backward().expect("backward");
        let g_saved = g_saved.get(x).expect("grad");
        let g_again = obj.backward().expect("second backward");
        let g_again = g_again.get(x).expect("grad");
        assert_eq!(
            bits_of(g_saved),
            bits_of(g_again),
            "{what}: upstream {up}: grad bits"
        );
        assert!(
            to_f64_vec(g_saved).iter().any(|v| *v != 0.0),
            "{what}: upstream {up}: zero gradient"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// CUDA against the CPU kernels.
// ---------------------------------------------------------------------------------------------

/// The side of a CUDA-vs-CPU comparison a loss runs on: the device of its inputs (for weights
/// it holds) and whether that is the reference side (the CPU kernels). Under `cuda-emu` both
/// sides' device is the CPU: `cpu_kernels` tells them apart (a stateful loss keeps one state a
/// side).
#[derive(Clone, Copy, Debug)]
pub struct Side<'a> {
    /// The device of this side's inputs.
    pub dev: &'a Device,
    /// Whether this is the CPU-kernel (reference) side.
    pub cpu_kernels: bool,
}

/// The results of [`cuda_and_cpu`].
#[derive(Clone, Debug)]
pub struct CudaResults {
    /// On the CPU kernels: the reference.
    pub cpu: LossGrad,
    /// On the CUDA device (or the emulated CUDA kernels).
    pub cuda: LossGrad,
}

/// Loss and gradient of `sum(forward(x, t) · up)` on the CPU kernels and on `gpu` (CPU first),
/// from the inputs `inputs(dev)` gives for each side's device: `[x, targets, upstream]`. Asserts
/// that each result lives on its side's device and that the two losses have the same shape.
pub fn cuda_and_cpu(
    gpu: &Device,
    inputs: impl Fn(&Device) -> [Tensor; 3],
    forward: impl Fn(Side, &Tensor, &Tensor) -> Result<Tensor>,
) -> CudaResults {
    let cpu = Device::Cpu;
    let run = |dev: &Device, cpu_kernels: bool| {
        let [x, t, up] = inputs(dev);
        let side = Side { dev, cpu_kernels };
        let (l, g) = loss_and_grad(&x, &up, |x| forward(side, x, &t)).unwrap();
        assert!(l.device().same_device(dev) && g.device().same_device(dev));
        (l.dims().to_vec(), (to_f64_vec(&l), to_f64_vec(&g)))
    };
    let (cpu_dims, cpu_result) = on_cpu_kernels(|| run(&cpu, true));
    let (cuda_dims, cuda_result) = run(gpu, false);
    assert_eq!(cpu_dims, cuda_dims, "loss shape");
    CudaResults {
        cpu: cpu_result,
        cuda: cuda_result,
    }
}

impl CudaResults {
    /// The CUDA loss and gradient within `loss_tol` and `grad_tol` of the CPU kernels': the two
    /// differ only in their exp/log (atan, log1p) implementations, FMA contraction and the
    /// summation order.
    pub fn assert_close(&self, what: &str, loss_tol: Tol, grad_tol: Tol) {
        loss_tol.check(&format!("{what} loss"), &self.cuda.0, &self.cpu.0);
        grad_tol.check(&format!("{what} grad"), &self.cuda.1, &self.cpu.1);
    }
}

/// One step of f16's grid where it is finest: no f16 result is nearer than that (f16 gradients
/// of a Mean over a million elements are subnormal, where a step is 2^-24); 0 for other dtypes.
pub fn grid_step(dtype: DType) -> f64 {
    if dtype == DType::F16 {
        2f64.powi(-24)
    } else {
        0.0
    }
}
