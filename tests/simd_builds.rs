//! The AVX-512, AVX2 and baseline (SSE2) builds of the CPU kernels give the same bits: this
//! test runs itself again in child processes with `CANDLE_DETLOSS_SIMD` = `baseline`, `avx2`
//! and `avx512` (the cap is read once per process), each child prints a digest of the bits of
//! every loss and gradient of a battery of training steps and unreduced forwards (f32 and f64,
//! sizes spanning several rayon chunks and vector tails), and the digests must agree. On a CPU
//! without AVX-512 the capped builds coincide and the check is weaker, not wrong.

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_detloss::{
    ApLoss, BalancedL1Loss, BoxIouLoss, CrossEntropyLoss, DistributionFocalLoss, GhmcLoss, IouKind,
    QualityFocalLoss, Reduction, SigmoidFocalLoss, SmoothL1Loss, SoftmaxFocalLoss, VarifocalLoss,
};
use common::Rng;

const CHILD: &str = "CANDLE_DETLOSS_SIMD_CHILD";

/// FNV-1a over the bit patterns of every value of `t` (as f64: exact for every float dtype).
fn digest(h: &mut u64, t: &Tensor) {
    for b in common::bits_of(t) {
        for byte in b.to_le_bytes() {
            *h ^= byte as u64;
            *h = h.wrapping_mul(0x100_0000_01b3);
        }
    }
}

/// Loss and gradient (training step: forward of a `Var`, then backward) of `f`, into `h`.
fn step(h: &mut u64, x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) {
    let v = Var::from_tensor(x).unwrap();
    let loss = f(v.as_tensor()).unwrap();
    let g = loss.sum_all().unwrap().backward().unwrap();
    digest(h, &loss);
    digest(h, g.get(&v).unwrap());
}

/// The digest of the battery in one dtype.
fn battery(dtype: DType) -> u64 {
    let dev = Device::Cpu;
    let mut rng = Rng::new(7);
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let (n, c) = (1037, 37); // several chunks, odd tails
    let tensor = |v: Vec<f64>, shape: &[usize]| {
        Tensor::from_vec(v, shape, &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let x = tensor(rng.vec_normal(n * c, 4.0), &[n, c]);
    let soft = tensor((0..n * c).map(|_| rng.uniform()).collect(), &[n, c]);
    let labels: Vec<i64> = (0..n)
        .map(|i| match i % 7 {
            0 => -1,
            1 | 2 => (i % c) as i64,
            _ => c as i64,
        })
        .collect();
    let lab = Tensor::new(labels.clone(), &dev).unwrap();
    let soft_lab = Tensor::new(
        labels
            .iter()
            .map(|&l| l.min(c as i64 - 1))
            .collect::<Vec<_>>(),
        &dev,
    )
    .unwrap();
    let scores = tensor((0..n).map(|_| rng.uniform()).collect(), &[n]);
    for red in [Reduction::None, Reduction::Mean] {
        let f = SigmoidFocalLoss {
            reduction: red,
            ..Default::default()
        };
        step(&mut h, &x, |x| f.forward(x, &lab));
        step(&mut h, &x, |x| f.forward(x, &soft));
        let ce = CrossEntropyLoss {
            reduction: red,
            label_smoothing: 0.1,
            ..Default::default()
        };
        step(&mut h, &x, |x| ce.forward(x, &soft_lab));
        let sf = SoftmaxFocalLoss {
            reduction: red,
            ..Default::default()
        };
        step(&mut h, &x, |x| sf.forward(x, &soft_lab));
        let q = QualityFocalLoss {
            reduction: red,
            ..Default::default()
        };
        step(&mut h, &x, |x| q.forward(x, &soft));
        step(&mut h, &x, |x| q.forward_scores(x, &lab, &scores));
        let v = VarifocalLoss {
            reduction: red,
            ..Default::default()
        };
        step(&mut h, &x, |x| v.forward(x, &soft));
        let mut g = GhmcLoss::new(10, 0.0);
        g.reduction = red;
        step(&mut h, &x, |x| g.clone().forward(x, &lab));
        let y = tensor(
            (0..n).map(|_| rng.uniform() * (c - 1) as f64).collect(),
            &[n],
        );
        let d = DistributionFocalLoss { reduction: red };
        step(&mut h, &x, |x| d.forward(x, &y));
    }
    // Boxes and deltas.
    let m = 4099;
    let box_of = |rng: &mut Rng| -> Vec<f64> {
        (0..m)
            .flat_map(|_| {
                let (x1, y1) = (rng.uniform() * 500.0, rng.uniform() * 500.0);
                [
                    x1,
                    y1,
                    x1 + 5.0 + rng.uniform() * 90.0,
                    y1 + 5.0 + rng.uniform() * 90.0,
                ]
            })
            .collect()
    };
    let (p, t) = (box_of(&mut rng), box_of(&mut rng));
    let (p, t) = (tensor(p, &[m, 4]), tensor(t, &[m, 4]));
    for red in [Reduction::None, Reduction::Mean] {
        let sl = SmoothL1Loss {
            beta: 1.0 / 9.0,
            reduction: red,
        };
        let bl = BalancedL1Loss {
            reduction: red,
            ..Default::default()
        };
        let dp = p.affine(0.01, 0.0).unwrap();
        let dt = t.affine(0.01, 0.0).unwrap();
        step(&mut h, &dp, |x| sl.forward(x, &dt));
        step(&mut h, &dp, |x| bl.forward(x, &dt));
        for kind in [IouKind::Iou, IouKind::Giou, IouKind::Diou, IouKind::Ciou] {
            let b = BoxIouLoss {
                kind,
                reduction: red,
                ..Default::default()
            };
            step(&mut h, &p, |x| b.forward(x, &t));
        }
    }
    let ap = ApLoss::default();
    step(&mut h, &x, |x| ap.forward(x, &lab));
    h
}

#[test]
fn avx512_avx2_and_baseline_builds_give_the_same_bits() {
    if std::env::var(CHILD).is_ok() {
        // The child: print the digests.
        println!(
            "DIGEST {:016x} {:016x}",
            battery(DType::F32),
            battery(DType::F64)
        );
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let run = |level: &str| {
        let out = std::process::Command::new(&exe)
            .args([
                "--exact",
                "avx512_avx2_and_baseline_builds_give_the_same_bits",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .env("CANDLE_DETLOSS_SIMD", level)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{level} child failed: {text}");
        // libtest prints the test's name on the same line first.
        let at = text
            .find("DIGEST")
            .unwrap_or_else(|| panic!("{level}: no digest in {text}"));
        text[at..].lines().next().unwrap_or_default().to_string()
    };
    let base = run("baseline");
    for level in ["avx2", "avx512"] {
        assert_eq!(
            run(level),
            base,
            "{level} build differs from the baseline build"
        );
    }
}
