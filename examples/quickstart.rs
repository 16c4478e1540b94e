//! Quick start: a tiny linear classification head trained one step with the fused sigmoid focal
//! loss, RetinaNet style (integer labels with background and ignored anchors, normalised by the
//! number of positive anchors).
//!
//! `cargo run --release --example quickstart [-- --cuda]`

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_detloss::{Reduction, SigmoidFocalLoss};
use candle_nn::{linear, Module, Optimizer, VarBuilder, VarMap};

fn main() -> Result<()> {
    let device = if std::env::args().any(|a| a == "--cuda") {
        Device::new_cuda(0)?
    } else {
        Device::Cpu
    };
    let (anchors, features, classes) = (512, 32, 20);

    // A linear head on random anchor features.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
    let head = linear(features, classes, vb.pp("cls_head"))?;
    let feats = Tensor::randn(0f32, 1.0, (anchors, features), &device)?;

    // Labels: 0..C a class, C = background, -1 = ignored (between the IoU thresholds).
    let labels: Vec<i64> = (0..anchors as i64)
        .map(|i| match i % 16 {
            0 => i % classes as i64,
            1 => -1,
            _ => classes as i64,
        })
        .collect();
    let num_pos = labels
        .iter()
        .filter(|&&l| (0..classes as i64).contains(&l))
        .count();
    let labels = Tensor::new(labels, &device)?;

    let focal = SigmoidFocalLoss {
        reduction: Reduction::AvgFactor(num_pos.max(1) as f64),
        ..Default::default()
    };
    let mut opt = candle_nn::SGD::new(varmap.all_vars(), 0.1)?;

    let logits = head.forward(&feats)?;
    let loss = focal.forward(&logits, &labels)?;
    println!("focal loss before: {:.5}", loss.to_scalar::<f32>()?);
    opt.backward_step(&loss)?;
    let after = focal.forward(&head.forward(&feats)?, &labels)?;
    println!(
        "focal loss after one SGD step: {:.5}",
        after.to_scalar::<f32>()?
    );
    Ok(())
}
