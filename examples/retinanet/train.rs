//! Losses, targets, the training step and inference / COCO evaluation of the RetinaNet example.
//!
//! Every loss choice is one match arm: [`cls_loss`] and [`box_loss`].
#![allow(dead_code)]

use crate::data::Dataset;
use crate::model::{ModelConfig, RetinaNet};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};
use candle_detloss::anchors::{
    batched_nms, boxes_to_tensor, match_anchors, AnchorGenerator, BoxCoder, BoxXyxy, MatchConfig,
};
use candle_detloss::metrics::{evaluate_bbox, CocoDet, CocoGt, CocoStats};
use candle_detloss::{Reduction, SigmoidFocalLoss};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};

/// Classification loss (`--cls-loss`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ClsLossKind {
    Focal,
    CbFocal,
    Ap,
    Ce,
    Ghmc,
}

impl ClsLossKind {
    pub const ALL: [ClsLossKind; 5] = [
        ClsLossKind::Focal,
        ClsLossKind::CbFocal,
        ClsLossKind::Ap,
        ClsLossKind::Ce,
        ClsLossKind::Ghmc,
    ];
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "focal" => Self::Focal,
            "cb-focal" => Self::CbFocal,
            "ap" => Self::Ap,
            "ce" => Self::Ce,
            "ghmc" => Self::Ghmc,
            _ => bail!("unknown --cls-loss {s:?} (focal|cb-focal|ap|ce|ghmc)"),
        })
    }
    pub fn name(&self) -> &'static str {
        match self {
            Self::Focal => "focal",
            Self::CbFocal => "cb-focal",
            Self::Ap => "ap",
            Self::Ce => "ce",
            Self::Ghmc => "ghmc",
        }
    }
    /// Softmax losses have a background column: C + 1 logits per anchor; sigmoid ones C.
    pub fn is_softmax(&self) -> bool {
        matches!(self, Self::Ce)
    }
}

/// Box regression loss (`--box-loss`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum BoxLossKind {
    SmoothL1,
    BalancedL1,
    Giou,
    Diou,
    Ciou,
}

impl BoxLossKind {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "smooth-l1" => Self::SmoothL1,
            "balanced-l1" => Self::BalancedL1,
            "giou" => Self::Giou,
            "diou" => Self::Diou,
            "ciou" => Self::Ciou,
            _ => bail!("unknown --box-loss {s:?} (smooth-l1|balanced-l1|giou|diou|ciou)"),
        })
    }
    pub fn name(&self) -> &'static str {
        match self {
            Self::SmoothL1 => "smooth-l1",
            Self::BalancedL1 => "balanced-l1",
            Self::Giou => "giou",
            Self::Diou => "diou",
            Self::Ciou => "ciou",
        }
    }
}

/// State some losses keep between steps.
pub struct LossState {
    /// Class-balanced weights (`cb-focal`), from the training set's object counts.
    pub class_counts: Vec<u64>,
    /// GHM-C keeps a running gradient-density histogram (`momentum > 0`).
    pub ghmc: candle_detloss::GhmcLoss,
}

impl LossState {
    pub fn new(class_counts: Vec<u64>) -> Self {
        let mut ghmc = candle_detloss::GhmcLoss::default();
        ghmc.momentum = 0.75;
        Self { class_counts, ghmc }
    }
}

/// The classification loss of `logits` `[M, K]` against anchor labels `[M]` (i64: class,
/// C = background, -1 ignored), normalised by the number of positive anchors.
pub fn cls_loss(
    kind: ClsLossKind,
    st: &mut LossState,
    logits: &Tensor,
    labels: &Tensor,
    num_pos: f64,
) -> Result<Tensor> {
    Ok(match kind {
        ClsLossKind::Focal => SigmoidFocalLoss {
            reduction: Reduction::AvgFactor(num_pos),
            ..Default::default()
        }
        .forward(logits, labels)?,
        // Cui et al.: class-balanced weights from the training set's counts, β = 0.999.
        ClsLossKind::CbFocal => SigmoidFocalLoss {
            reduction: Reduction::AvgFactor(num_pos),
            class_weights: Some(candle_detloss::class_balanced_weights(
                &st.class_counts,
                0.999,
                logits.device(),
            )?),
            ..Default::default()
        }
        .forward(logits, labels)?,
        // AP-Loss is already normalised (1 - AP); no avg factor.
        ClsLossKind::Ap => candle_detloss::ApLoss {
            delta: 1.0,
            interpolate: true,
        }
        .forward(logits, labels)?,
        // Softmax over C + 1 columns (the last is background).
        ClsLossKind::Ce => candle_detloss::CrossEntropyLoss {
            reduction: Reduction::AvgFactor(num_pos),
            class_weights: None,
            label_smoothing: 0.0,
        }
        .forward(logits, labels)?,
        // mmdet GHM-C, mean over valid elements.
        ClsLossKind::Ghmc => st.ghmc.forward(logits, labels)?,
    })
}

/// Box-regression loss over the `P` positive anchors: `pred` / `target` deltas `[P, 4]`,
/// `anchors` and ground-truth boxes `[P, 4]` (xyxy) for the IoU losses, normalised by the
/// number of positives.
pub fn box_loss(
    kind: BoxLossKind,
    coder: &BoxCoder,
    pred: &Tensor,
    target: &Tensor,
    anchors: &Tensor,
    gt_boxes: &Tensor,
    num_pos: f64,
) -> Result<Tensor> {
    Ok(match kind {
        // β = 1/9 as RetinaNet's configs.
        BoxLossKind::SmoothL1 => candle_detloss::SmoothL1Loss {
            beta: 1.0 / 9.0,
            reduction: Reduction::AvgFactor(num_pos),
        }
        .forward(pred, target)?,
        BoxLossKind::BalancedL1 => candle_detloss::BalancedL1Loss {
            reduction: Reduction::AvgFactor(num_pos),
            ..Default::default()
        }
        .forward(pred, target)?,
        // On decoded boxes, weight 2 (mmdet's RetinaNet-GIoU config).
        BoxLossKind::Giou | BoxLossKind::Diou | BoxLossKind::Ciou => {
            let iou_kind = match kind {
                BoxLossKind::Giou => candle_detloss::IouKind::Giou,
                BoxLossKind::Diou => candle_detloss::IouKind::Diou,
                _ => candle_detloss::IouKind::Ciou,
            };
            let boxes = coder.decode(anchors, pred)?;
            let l = candle_detloss::BoxIouLoss {
                kind: iou_kind,
                eps: 1e-7,
                reduction: Reduction::AvgFactor(num_pos),
            }
            .forward(&boxes, gt_boxes)?;
            (l * 2.0)?
        }
    })
}

/// Matched training targets of one image, computed once (anchors are fixed).
#[derive(Clone)]
pub struct ImageTargets {
    pub labels: Vec<i64>,
    /// Encoded deltas (zeros except on positives).
    pub deltas: Vec<[f32; 4]>,
    /// Matched ground-truth boxes.
    pub boxes: Vec<BoxXyxy>,
    pub num_pos: usize,
}

/// Targets of every image of `ds`.
pub fn build_targets(
    ds: &Dataset,
    anchors: &[BoxXyxy],
    coder: &BoxCoder,
    num_classes: usize,
) -> Result<Vec<ImageTargets>> {
    ds.samples
        .iter()
        .map(|s| {
            let m = match_anchors(
                anchors,
                &s.boxes,
                &s.classes,
                num_classes,
                &MatchConfig::default(),
            )?;
            let nc = num_classes as i64;
            let deltas = m
                .labels
                .iter()
                .enumerate()
                .map(|(a, &l)| {
                    if l >= 0 && l < nc {
                        coder.encode_box(&anchors[a], &m.boxes[a])
                    } else {
                        [0.0; 4]
                    }
                })
                .collect();
            Ok(ImageTargets {
                num_pos: m.num_pos,
                labels: m.labels,
                deltas,
                boxes: m.boxes,
            })
        })
        .collect()
}

/// Hyper-parameters of a run.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    pub cls: ClsLossKind,
    pub reg: BoxLossKind,
    pub model: ModelConfig,
    pub anchors: AnchorGenerator,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub warmup_steps: usize,
    pub total_steps: usize,
    pub seed: u64,
}

/// Loss components of one step.
#[derive(Clone, Copy, Debug)]
pub struct StepLoss {
    pub cls: f32,
    pub reg: f32,
    pub total: f32,
    pub num_pos: usize,
    pub lr: f64,
}

/// Model + optimiser + targets.
pub struct Trainer {
    pub cfg: TrainConfig,
    pub varmap: VarMap,
    pub model: RetinaNet,
    pub opt: AdamW,
    pub anchors: Vec<BoxXyxy>,
    pub anchors_t: Tensor,
    pub coder: BoxCoder,
    pub targets: Vec<ImageTargets>,
    pub loss_state: LossState,
    pub step: usize,
    pub device: Device,
    /// Side of the training images the anchors were generated for.
    pub image_size: usize,
}

impl Trainer {
    pub fn new(cfg: TrainConfig, train: &Dataset, device: &Device) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let mut mcfg = cfg.model;
        mcfg.num_anchors = cfg.anchors.num_anchors_per_location();
        let c = train.class_names.len();
        mcfg.num_classes = if cfg.cls.is_softmax() { c + 1 } else { c };
        let model = RetinaNet::new(mcfg, vb)?;
        crate::model::init_weights(&varmap, cfg.seed)?;
        let opt = AdamW::new(
            varmap.all_vars(),
            ParamsAdamW {
                lr: cfg.lr,
                weight_decay: cfg.weight_decay,
                ..Default::default()
            },
        )?;
        let anchors = cfg.anchors.generate(train.size, train.size)?;
        let anchors_t = boxes_to_tensor(&anchors, device)?;
        let coder = BoxCoder::default();
        let targets = build_targets(train, &anchors, &coder, c)?;
        let mut counts = vec![0u64; c];
        for s in &train.samples {
            for &k in &s.classes {
                counts[k as usize] += 1;
            }
        }
        // a class without objects would make class-balanced weights undefined
        for v in counts.iter_mut() {
            *v = (*v).max(1);
        }
        Ok(Self {
            cfg,
            varmap,
            model,
            opt,
            anchors,
            anchors_t,
            coder,
            targets,
            loss_state: LossState::new(counts),
            step: 0,
            device: device.clone(),
            image_size: train.size,
        })
    }

    /// Replaces the matched targets by those of `ds` (new random crops each epoch). `ds` must
    /// have the image size the trainer was built for.
    pub fn set_targets(&mut self, ds: &Dataset) -> Result<()> {
        if ds.size != self.image_size {
            bail!(
                "training images are {0}x{0}, the anchors were made for {1}x{1}",
                ds.size,
                self.image_size
            )
        }
        self.targets = build_targets(ds, &self.anchors, &self.coder, ds.class_names.len())?;
        Ok(())
    }

    /// Learning rate at `step`: linear warm-up from lr/10, then cosine decay to lr/50.
    pub fn lr_at(&self, step: usize) -> f64 {
        let c = &self.cfg;
        if step < c.warmup_steps {
            return c.lr * (0.1 + 0.9 * step as f64 / c.warmup_steps as f64);
        }
        let span = c.total_steps.saturating_sub(c.warmup_steps).max(1) as f64;
        let t = ((step - c.warmup_steps) as f64 / span).min(1.0);
        let lo = c.lr / 50.0;
        lo + (c.lr - lo) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }

    /// Loss of a batch (no optimiser step).
    pub fn loss(&mut self, ds: &Dataset, idx: &[usize]) -> Result<(Tensor, Tensor, usize)> {
        let images = ds.batch_images(idx, &self.device)?;
        let (cls, reg) = self.model.forward(&images)?;
        let (b, n, k) = cls.dims3()?;
        let mut labels = Vec::with_capacity(b * n);
        let mut deltas = Vec::new();
        let mut gt = Vec::new();
        let mut pos = Vec::new();
        let nc = self.targets[0].labels.len();
        let c = ds.class_names.len() as i64;
        for (bi, &i) in idx.iter().enumerate() {
            let t = &self.targets[i];
            if t.labels.len() != nc || nc != n {
                bail!(
                    "anchor count mismatch: targets {} vs model {n}",
                    t.labels.len()
                )
            }
            labels.extend_from_slice(&t.labels);
            for (a, &l) in t.labels.iter().enumerate() {
                if l >= 0 && l < c {
                    pos.push((bi * n + a) as u32);
                    deltas.extend_from_slice(&t.deltas[a]);
                    gt.extend_from_slice(&t.boxes[a]);
                }
            }
        }
        let num_pos = pos.len();
        let avg = num_pos.max(1) as f64;
        let labels = Tensor::from_vec(labels, b * n, &self.device)?;
        let logits = cls.reshape((b * n, k))?;
        let l_cls = cls_loss(self.cfg.cls, &mut self.loss_state, &logits, &labels, avg)?;
        let l_box = if num_pos == 0 {
            Tensor::zeros((), DType::F32, &self.device)?
        } else {
            let pos_t = Tensor::from_vec(pos.clone(), num_pos, &self.device)?;
            let pred = reg.reshape((b * n, 4))?.index_select(&pos_t, 0)?;
            let target = Tensor::from_vec(deltas, (num_pos, 4), &self.device)?;
            let gt_t = Tensor::from_vec(gt, (num_pos, 4), &self.device)?;
            let anchor_idx: Vec<u32> = pos.iter().map(|&p| p % n as u32).collect();
            let anc = self
                .anchors_t
                .index_select(&Tensor::from_vec(anchor_idx, num_pos, &self.device)?, 0)?;
            box_loss(self.cfg.reg, &self.coder, &pred, &target, &anc, &gt_t, avg)?
        };
        Ok((l_cls, l_box, num_pos))
    }

    /// One optimisation step on the images `idx` of `ds`. A non-finite loss is an error naming
    /// the step.
    pub fn train_step(&mut self, ds: &Dataset, idx: &[usize]) -> Result<StepLoss> {
        let lr = self.lr_at(self.step);
        self.opt.set_learning_rate(lr);
        let (l_cls, l_box, num_pos) = self.loss(ds, idx)?;
        let total = (&l_cls + &l_box)?;
        let cls_v = l_cls.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let box_v = l_box.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let tot_v = cls_v + box_v;
        if !tot_v.is_finite() {
            bail!(
                "non-finite loss at step {} (cls {cls_v}, box {box_v}); stopping training",
                self.step
            )
        }
        self.opt.backward_step(&total)?;
        self.step += 1;
        Ok(StepLoss {
            cls: cls_v,
            reg: box_v,
            total: tot_v,
            num_pos,
            lr,
        })
    }
}

/// One detection in model pixel coordinates.
#[derive(Clone, Copy, Debug)]
pub struct Detection {
    pub bbox: BoxXyxy,
    pub score: f32,
    pub class: u32,
}

/// Inference settings.
#[derive(Clone, Copy, Debug)]
pub struct PostProcess {
    pub score_thresh: f32,
    pub pre_nms_top_k: usize,
    pub nms_iou: f32,
    pub max_dets: usize,
}

impl Default for PostProcess {
    fn default() -> Self {
        Self {
            score_thresh: 0.05,
            pre_nms_top_k: 1000,
            nms_iou: 0.5,
            max_dets: 100,
        }
    }
}

/// Detections for a batch of images `[B, 3, S, S]`.
pub fn predict(
    model: &RetinaNet,
    images: &Tensor,
    anchors: &[BoxXyxy],
    coder: &BoxCoder,
    num_classes: usize,
    softmax: bool,
    pp: &PostProcess,
) -> Result<Vec<Vec<Detection>>> {
    let (cls, reg) = model.forward(images)?;
    let probs = if softmax {
        candle_nn::ops::softmax_last_dim(&cls)?.narrow(D::Minus1, 0, num_classes)?
    } else {
        candle_nn::ops::sigmoid(&cls)?
    };
    let probs = probs.to_dtype(DType::F32)?.to_vec3::<f32>()?;
    let reg = reg.to_dtype(DType::F32)?.to_vec3::<f32>()?;
    let size = images.dim(3)? as f32;
    let mut out = Vec::new();
    for (p, r) in probs.iter().zip(&reg) {
        let mut cand: Vec<(f32, usize, u32)> = Vec::new();
        for (a, row) in p.iter().enumerate() {
            for (c, &s) in row.iter().enumerate() {
                if s > pp.score_thresh {
                    cand.push((s, a, c as u32));
                }
            }
        }
        cand.sort_by(|x, y| y.0.total_cmp(&x.0));
        cand.truncate(pp.pre_nms_top_k);
        let boxes: Vec<BoxXyxy> = cand
            .iter()
            .map(|&(_, a, _)| {
                let d = [r[a][0], r[a][1], r[a][2], r[a][3]];
                let b = coder.decode_box(&anchors[a], &d);
                [
                    b[0].clamp(0.0, size),
                    b[1].clamp(0.0, size),
                    b[2].clamp(0.0, size),
                    b[3].clamp(0.0, size),
                ]
            })
            .collect();
        let scores: Vec<f32> = cand.iter().map(|c| c.0).collect();
        let classes: Vec<u32> = cand.iter().map(|c| c.2).collect();
        let keep = batched_nms(&boxes, &scores, &classes, pp.nms_iou, pp.max_dets)?;
        out.push(
            keep.into_iter()
                .map(|i| Detection {
                    bbox: boxes[i],
                    score: scores[i],
                    class: classes[i],
                })
                .collect(),
        );
    }
    Ok(out)
}

/// Runs the model over `ds` and evaluates with the COCO protocol. Returns the stats, the
/// detections (COCO format, original coordinates, clipped to the original image) and the
/// per-image detections in model coordinates. `ds` may have another image size than the
/// training images (anchors are generated for it). A progress bar shows on a terminal.
pub fn evaluate(
    trainer: &Trainer,
    ds: &Dataset,
    batch: usize,
) -> Result<(CocoStats, Vec<CocoDet>, Vec<Vec<Detection>>)> {
    let c = ds.class_names.len();
    let anchors_own;
    let anchors = if ds.size == trainer.image_size {
        &trainer.anchors
    } else {
        anchors_own = trainer.cfg.anchors.generate(ds.size, ds.size)?;
        &anchors_own
    };
    let mut per_image = Vec::new();
    let idx: Vec<usize> = (0..ds.samples.len()).collect();
    let pb = crate::data::progress(ds.samples.len(), "evaluating");
    for chunk in idx.chunks(batch.max(1)) {
        let images = ds.batch_images(chunk, &trainer.device)?;
        per_image.extend(predict(
            &trainer.model,
            &images,
            anchors,
            &trainer.coder,
            c,
            trainer.cfg.cls.is_softmax(),
            &PostProcess::default(),
        )?);
        pb.inc(chunk.len() as u64);
    }
    pb.finish_and_clear();
    let mut dets = Vec::new();
    for (s, ds_) in ds.samples.iter().zip(&per_image) {
        let (w0, h0) = (s.orig_size[0] as f64, s.orig_size[1] as f64);
        for d in ds_ {
            let [sx, sy] = s.scale;
            let b = d.bbox;
            let x1 = (b[0] as f64 / sx as f64).clamp(0.0, w0);
            let y1 = (b[1] as f64 / sy as f64).clamp(0.0, h0);
            let x2 = (b[2] as f64 / sx as f64).clamp(0.0, w0);
            let y2 = (b[3] as f64 / sy as f64).clamp(0.0, h0);
            dets.push(CocoDet {
                image_id: s.image_id,
                category_id: ds.category_ids[d.class as usize],
                bbox: [x1, y1, x2 - x1, y2 - y1],
                score: d.score as f64,
            });
        }
    }
    let gts: Vec<CocoGt> = ds
        .samples
        .iter()
        .flat_map(|s| s.gt.iter().copied())
        .collect();
    let ids: Vec<u64> = ds.samples.iter().map(|s| s.image_id).collect();
    let stats = evaluate_bbox(&ids, &ds.category_ids, &gts, &dets)?;
    Ok((stats, dets, per_image))
}
