//! The checks of every `forward_weighted` form, written once: a family passes closures that
//! run its loss with an optional weight, and its own f64 reference for the weighted values.
//!
//! - [`check_weight_of_ones`]: a weight of ones gives `forward`'s loss and gradient bit for bit,
//!   per row and per element, under every reduction;
//! - [`check_weight_gradient`]: the weight's own gradient (it tracks one) against finite
//!   differences in f64;
//! - [`check_zero_weight_ignores`]: a zero weight gives the loss and gradient of a run that
//!   leaves the row out (u32 labels, which cannot say -1).

use super::{bits_of, finite_diff, loss_and_grad, to_f64_vec, Rng, Tol, REDUCTIONS};
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_detloss::Reduction;

/// Upstream gradient of ones for `loss` (its shape), in its dtype.
fn ones_like(loss: &Tensor) -> Tensor {
    loss.ones_like().unwrap()
}

/// Bits of the loss and of the input gradient of `f(x)` with an upstream of ones.
fn bits_and_grad(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> (Vec<u64>, Vec<u64>) {
    let probe = f(x).expect("forward");
    let (l, g) = loss_and_grad(x, &ones_like(&probe), f).expect("forward/backward");
    (bits_of(&l), bits_of(&g))
}

/// A weight of ones of each of `shapes` gives bit for bit the loss and the gradient of `x` that
/// the unweighted form gives, under every reduction. `run(x, reduction, weight)` is the loss:
/// `forward` for `None`, `forward_weighted` for `Some`.
pub fn check_weight_of_ones(
    what: &str,
    x: &Tensor,
    shapes: &[&[usize]],
    run: impl Fn(&Tensor, Reduction, Option<&Tensor>) -> Result<Tensor>,
) {
    for red in REDUCTIONS {
        let plain = bits_and_grad(x, |x| run(x, red, None));
        for shape in shapes {
            let ones = Tensor::ones(*shape, x.dtype(), x.device()).unwrap();
            let weighted = bits_and_grad(x, |x| run(x, red, Some(&ones)));
            assert_eq!(
                plain.0, weighted.0,
                "{what} {red:?}: loss with a weight of ones {shape:?} differs from forward"
            );
            assert_eq!(
                plain.1, weighted.1,
                "{what} {red:?}: gradient with a weight of ones {shape:?} differs from forward"
            );
        }
    }
}

/// The gradient of a tracked f64 weight of `shape` (values in [0.2, 2)) against central finite
/// differences of `sum(loss · up)`, under every reduction; `run(reduction, weight)` is the
/// weighted loss in f64.
pub fn check_weight_gradient(
    what: &str,
    shape: &[usize],
    seed: u64,
    run: impl Fn(Reduction, &Tensor) -> Result<Tensor>,
) {
    let dev = Device::Cpu;
    let mut rng = Rng::new(seed);
    let len: usize = shape.iter().product();
    let w: Vec<f64> = (0..len).map(|_| 0.2 + 1.8 * rng.uniform()).collect();
    for red in REDUCTIONS {
        let wt = Tensor::from_vec(w.clone(), shape, &dev).unwrap();
        let probe = run(red, &wt).expect("forward");
        let up_vals = rng.vec_normal(probe.elem_count().max(1), 1.0);
        let up =
            Tensor::from_vec(up_vals[..probe.elem_count()].to_vec(), probe.shape(), &dev).unwrap();
        let wv = Var::from_tensor(&wt).unwrap();
        let loss = run(red, wv.as_tensor()).expect("forward");
        assert_eq!(
            bits_of(&loss),
            bits_of(&probe),
            "{what} {red:?}: a tracked weight changes the loss"
        );
        let obj = (&loss * &up).unwrap().sum_all().unwrap();
        let grads = obj.backward().expect("backward");
        let g = to_f64_vec(grads.get(&wv).expect("the weight gets a gradient"));
        assert!(
            g.iter().any(|v| *v != 0.0),
            "{what} {red:?}: zero weight gradient"
        );
        let fd = finite_diff(&w, 1e-6, |wv| {
            let t = Tensor::from_vec(wv.to_vec(), shape, &dev).unwrap();
            let l = run(red, &t).unwrap();
            (l * &up)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        });
        Tol::abs(1e-7, 1e-6).check(&format!("{what} {red:?} weight gradient"), &g, &fd);
    }
}

/// A zero weight on row `row` of u32-labelled inputs gives the `Sum` loss of `ignored` (the
/// same inputs with that row ignored, an i64 label -1) and a zero gradient in that row (of
/// `row_len` gradient elements), and the rest of the gradient of `ignored`; in f64.
/// `weighted(x)` and `ignored(x)` run the loss with `Reduction::Sum`.
pub fn check_zero_weight_ignores(
    what: &str,
    x: &Tensor,
    row: usize,
    row_len: usize,
    weighted: impl Fn(&Tensor) -> Result<Tensor>,
    ignored: impl Fn(&Tensor) -> Result<Tensor>,
) {
    assert_eq!(x.dtype(), DType::F64, "{what}: check in f64");
    let one = Tensor::new(1f64, x.device()).unwrap();
    let (lw, gw) = loss_and_grad(x, &one, &weighted).expect("weighted");
    let (li, gi) = loss_and_grad(x, &one, &ignored).expect("ignored");
    let (gw, gi) = (to_f64_vec(&gw), to_f64_vec(&gi));
    Tol::abs(1e-12, 1e-12).check(&format!("{what} loss"), &to_f64_vec(&lw), &to_f64_vec(&li));
    let zeroed = &gw[row * row_len..(row + 1) * row_len];
    assert!(
        zeroed.iter().all(|v| *v == 0.0),
        "{what}: the zero-weight row has gradient {zeroed:?}"
    );
    Tol::abs(1e-12, 1e-12).check(&format!("{what} gradient"), &gw, &gi);
}
