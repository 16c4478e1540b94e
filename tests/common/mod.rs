//! Helpers shared by the integration tests: fixture loading, tensor comparison, gradients of a
//! loss through candle's autograd, and a tiny deterministic RNG.
#![allow(dead_code)]

mod battery;
pub mod weighted;
// Not every test binary runs the battery (anchors, metrics): the re-export may go unused.
#[allow(unused_imports)]
pub use battery::*;

use candle_core::{DType, Device, Result, Tensor, Var};
use serde_json::Value;

/// Loads `tests/fixtures/<name>` and returns its `cases` array.
pub fn fixture_cases(name: &str) -> Vec<Value> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {path}: {e}"));
    v["cases"].as_array().expect("fixture has cases").clone()
}

/// A fixture tensor `{"shape": [...], "data": [...]}` as (shape, f64 data).
pub fn fx_tensor(v: &Value) -> (Vec<usize>, Vec<f64>) {
    let shape = v["shape"]
        .as_array()
        .expect("shape")
        .iter()
        .map(|d| d.as_u64().expect("dim") as usize)
        .collect();
    let data = v["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|d| d.as_f64().expect("number"))
        .collect();
    (shape, data)
}

/// A fixture tensor as a candle tensor of `dtype`.
pub fn fx_to_tensor(v: &Value, dtype: DType, dev: &Device) -> Tensor {
    let (shape, data) = fx_tensor(v);
    Tensor::from_vec(data, shape, dev)
        .and_then(|t| t.to_dtype(dtype))
        .expect("fixture tensor")
}

/// An integer list as i64 values.
pub fn fx_ints(v: &Value) -> Vec<i64> {
    v.as_array()
        .expect("int list")
        .iter()
        .map(|d| d.as_i64().expect("int"))
        .collect()
}

/// Flattened f64 values of any tensor.
pub fn to_f64_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .expect("to f64")
}

/// Asserts `|a - b| <= atol + rtol·|b|` element-wise (NaN equal to NaN), with a helpful message.
pub fn assert_close(what: &str, a: &[f64], b: &[f64], atol: f64, rtol: f64) {
    assert_eq!(
        a.len(),
        b.len(),
        "{what}: length {} vs {}",
        a.len(),
        b.len()
    );
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if x == y || x.is_nan() && y.is_nan() {
            continue; // equal, including the same infinity
        }
        let tol = atol + rtol * y.abs();
        assert!(
            (x - y).abs() <= tol,
            "{what}: element {i}: got {x}, expected {y} (tol {tol})"
        );
    }
}

/// Loss value and gradient of `sum(loss · upstream)` w.r.t. `x`, through candle's autograd.
pub fn loss_and_grad(
    x: &Tensor,
    upstream: &Tensor,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<(Tensor, Tensor)> {
    let var = Var::from_tensor(x)?;
    let loss = f(var.as_tensor())?;
    let obj = (&loss * upstream.to_dtype(loss.dtype())?)?.sum_all()?;
    let grads = obj.backward()?;
    let g = grads.get(&var).cloned().unwrap_or(var.zeros_like()?);
    Ok((loss, g))
}

/// Gradients of `sum(loss · upstream)` w.r.t. both inputs of `f(x, t)`, both tracking a
/// gradient (`x` first), through candle's autograd.
pub fn grads_of_both(
    x: &Tensor,
    t: &Tensor,
    upstream: &Tensor,
    f: impl Fn(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<(Tensor, Tensor)> {
    let (xv, tv) = (Var::from_tensor(x)?, Var::from_tensor(t)?);
    let loss = f(xv.as_tensor(), tv.as_tensor())?;
    let obj = (&loss * upstream.to_dtype(loss.dtype())?)?.sum_all()?;
    let grads = obj.backward()?;
    let get = |v: &Var| {
        grads
            .get(v)
            .cloned()
            .ok_or_else(|| candle_core::Error::Msg("no grad".into()))
    };
    Ok((get(&xv)?, get(&tv)?))
}

/// The message of an expected error (panics, failing the test, if `r` is `Ok`).
pub fn err_of<T>(r: Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

/// Central finite differences of `f` (scalar f64 valued) at `x` (f64).
pub fn finite_diff(x: &[f64], h: f64, f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut xs = x.to_vec();
    (0..x.len())
        .map(|i| {
            let x0 = xs[i];
            xs[i] = x0 + h;
            let fp = f(&xs);
            xs[i] = x0 - h;
            let fm = f(&xs);
            xs[i] = x0;
            (fp - fm) / (2.0 * h)
        })
        .collect()
}

/// xorshift64*: a small deterministic generator for test inputs.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Approximately normal (sum of uniforms), mean 0, std `s`.
    pub fn normal(&mut self, s: f64) -> f64 {
        let u: f64 = (0..12).map(|_| self.uniform()).sum();
        (u - 6.0) * s
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn vec_normal(&mut self, n: usize, s: f64) -> Vec<f64> {
        (0..n).map(|_| self.normal(s)).collect()
    }
}

/// The device the CUDA kernels run on: a CUDA device; else, under the `cuda-emu` feature, the
/// CPU, whose tensors then run through the emulated CUDA kernels; else `None` (with a printed
/// notice): such a test is skipped, never counted as a pass of the CUDA path.
pub fn cuda_device(test: &str) -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            if cfg!(feature = "cuda-emu") {
                return Some(Device::Cpu);
            }
            eprintln!("SKIP {test}: no CUDA device ({e})");
            None
        }
    }
}

/// Whether `dev` (from [`cuda_device`]) is the CPU running the emulated CUDA kernels.
pub fn emulated(dev: &Device) -> bool {
    dev.is_cpu()
}

/// The reference side of a CUDA-vs-CPU comparison: `f` with the CPU kernels (under
/// `cuda-emu`, CPU tensors otherwise take the emulated CUDA kernels).
pub fn on_cpu_kernels<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(feature = "cuda-emu")]
    {
        candle_detloss::cuda_emu::with_cpu_kernels(f)
    }
    #[cfg(not(feature = "cuda-emu"))]
    {
        f()
    }
}

/// Bit patterns of a tensor's values (as f64: exact for every float dtype).
pub fn bits_of(t: &Tensor) -> Vec<u64> {
    to_f64_vec(t).iter().map(|v| v.to_bits()).collect()
}

/// The losses that take `class_weights`, by name.
pub const CLASS_WEIGHTED: [&str; 3] = ["SigmoidFocalLoss", "CrossEntropyLoss", "SoftmaxFocalLoss"];

/// The loss `name` (one of [`CLASS_WEIGHTED`], with its defaults; label smoothing 0.1 for
/// cross-entropy) with `reduction` and `class_weights`, on logits `x` and labels `l`.
pub fn class_weighted_forward(
    name: &str,
    reduction: candle_detloss::Reduction,
    class_weights: Option<Tensor>,
    x: &Tensor,
    l: &Tensor,
) -> Result<Tensor> {
    use candle_detloss::{CrossEntropyLoss, SigmoidFocalLoss, SoftmaxFocalLoss};
    match name {
        "SigmoidFocalLoss" => SigmoidFocalLoss {
            reduction,
            class_weights,
            ..Default::default()
        }
        .forward(x, l),
        "CrossEntropyLoss" => CrossEntropyLoss {
            reduction,
            class_weights,
            label_smoothing: 0.1,
        }
        .forward(x, l),
        "SoftmaxFocalLoss" => SoftmaxFocalLoss {
            reduction,
            class_weights,
            ..Default::default()
        }
        .forward(x, l),
        _ => panic!("no class-weighted loss {name}"),
    }
}
