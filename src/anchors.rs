//! Anchor boxes for dense detectors (RetinaNet / SSD style): generation over FPN levels, IoU
//! matching of anchors to ground truth in the crate's label convention, box-delta encoding and
//! decoding, and (per-class) non-maximum suppression for inference.
//!
//! Boxes are `[x1, y1, x2, y2]` in pixels ([`BoxXyxy`]); a box's width is `x2 - x1` (no `+1`).
//!
//! # Example
//!
//! ```
//! use candle_core::Device;
//! use candle_detloss::anchors::{match_anchors, AnchorGenerator, BoxCoder, MatchConfig};
//! # fn main() -> candle_core::Result<()> {
//! // Two FPN levels (strides 8 and 16) over a 32×32 image, 3 aspect ratios, one scale.
//! let gen = AnchorGenerator {
//!     strides: vec![8, 16],
//!     sizes: vec![16.0, 32.0],
//!     ratios: vec![0.5, 1.0, 2.0],
//!     scales: vec![1.0],
//!     offset: 0.5,
//! };
//! let anchors = gen.generate(32, 32)?;
//! assert_eq!(anchors.len(), (4 * 4 + 2 * 2) * 3);
//! // One object of class 1 (of 2 classes).
//! let m = match_anchors(&anchors, &[[4.0, 4.0, 20.0, 20.0]], &[1], 2, &MatchConfig::default())?;
//! assert!(m.num_pos >= 1);
//! // Labels: 1 on positives, 2 (= C, background) on negatives, -1 ignored.
//! let (labels, boxes) = m.to_tensors(&Device::Cpu)?;
//! assert_eq!(labels.dims(), &[anchors.len()]);
//! // Regression targets for the positives.
//! let coder = BoxCoder::default();
//! let anchors_t = candle_detloss::anchors::boxes_to_tensor(&anchors, &Device::Cpu)?;
//! let deltas = coder.encode(&anchors_t, &boxes)?;
//! assert_eq!(deltas.dims(), &[anchors.len(), 4]);
//! # Ok(()) }
//! ```

use candle_core::{bail, DType, Device, Result, Tensor, D};

/// A box `[x1, y1, x2, y2]` in pixels.
pub type BoxXyxy = [f32; 4];

/// Anchors over a feature pyramid.
///
/// Level `l` has stride `strides[l]` and base size `sizes[l]`; at every location of its
/// `ceil(H / stride) × ceil(W / stride)` grid it places `ratios.len() × scales.len()` anchors of
/// area `(sizes[l]·scale)²` and aspect ratio `h / w = ratio`, centred at
/// `((x + offset)·stride, (y + offset)·stride)`.
///
/// **Order** (the order a head's output must be flattened in): level by level; within a level
/// row-major over `(y, x)`; within a location ratio-major, then scale. A head producing
/// `[B, A·K, H, W]` per level matches it after `permute((0, 2, 3, 1))` and a reshape to
/// `[B, H·W·A, K]`, then concatenation of the levels along dim 1.
#[derive(Debug, Clone, PartialEq)]
pub struct AnchorGenerator {
    /// Stride of each level in pixels (e.g. 8, 16, 32, 64, 128 for P3–P7).
    pub strides: Vec<usize>,
    /// Base anchor size (side of the square anchor at scale 1) of each level.
    pub sizes: Vec<f32>,
    /// Aspect ratios `h / w` (RetinaNet: 0.5, 1, 2).
    pub ratios: Vec<f32>,
    /// Scale multipliers of the base size (RetinaNet: 2^0, 2^(1/3), 2^(2/3)).
    pub scales: Vec<f32>,
    /// Centre offset within a cell in units of the stride: 0.5 centres anchors in their cell
    /// (mmdet's `center_offset=0.5`), 0 puts them on the cell's corner (torchvision).
    pub offset: f32,
}

impl AnchorGenerator {
    /// The RetinaNet paper's configuration: P3–P7 (strides 8…128), sizes 32…512, ratios
    /// {0.5, 1, 2}, scales {2^0, 2^(1/3), 2^(2/3)}, offset 0.5.
    pub fn retinanet() -> Self {
        Self {
            strides: vec![8, 16, 32, 64, 128],
            sizes: vec![32.0, 64.0, 128.0, 256.0, 512.0],
            ratios: vec![0.5, 1.0, 2.0],
            scales: vec![1.0, 2f32.powf(1.0 / 3.0), 2f32.powf(2.0 / 3.0)],
            offset: 0.5,
        }
    }

    /// Number of anchors at one location (`ratios × scales`).
    pub fn num_anchors_per_location(&self) -> usize {
        self.ratios.len() * self.scales.len()
    }

    /// Feature-map size `(h, w)` of each level for an image of `height × width`
    /// (`ceil(dim / stride)`, the size of a stride-`s` convolution stack with padding).
    pub fn feature_sizes(&self, height: usize, width: usize) -> Vec<(usize, usize)> {
        self.strides
            .iter()
            .map(|&s| (height.div_ceil(s.max(1)), width.div_ceil(s.max(1))))
            .collect()
    }

    fn validate(&self) -> Result<()> {
        if self.strides.is_empty() || self.strides.len() != self.sizes.len() {
            bail!(
                "AnchorGenerator: need one size per stride and at least one level, got {} strides and {} sizes",
                self.strides.len(),
                self.sizes.len()
            )
        }
        if self.strides.contains(&0) {
            bail!(
                "AnchorGenerator: strides must be > 0, got {:?}",
                self.strides
            )
        }
        if self.ratios.is_empty() || self.scales.is_empty() {
            bail!("AnchorGenerator: ratios and scales must not be empty")
        }
        let bad = |v: &[f32]| v.iter().any(|x| !(x.is_finite() && *x > 0.0));
        if bad(&self.sizes) || bad(&self.ratios) || bad(&self.scales) {
            bail!(
                "AnchorGenerator: sizes, ratios and scales must be finite and > 0, got sizes {:?} ratios {:?} scales {:?}",
                self.sizes,
                self.ratios,
                self.scales
            )
        }
        if !self.offset.is_finite() {
            bail!(
                "AnchorGenerator: offset must be finite, got {}",
                self.offset
            )
        }
        Ok(())
    }

    /// All anchors of an image of `height × width` pixels, in the order documented on the type.
    pub fn generate(&self, height: usize, width: usize) -> Result<Vec<BoxXyxy>> {
        self.generate_for_sizes(&self.feature_sizes(height, width))
    }

    /// All anchors for explicitly given feature-map sizes `(h, w)`, one per level.
    pub fn generate_for_sizes(&self, feature_sizes: &[(usize, usize)]) -> Result<Vec<BoxXyxy>> {
        self.validate()?;
        if feature_sizes.len() != self.strides.len() {
            bail!(
                "AnchorGenerator: {} feature sizes for {} levels",
                feature_sizes.len(),
                self.strides.len()
            )
        }
        // Half extents of the cell anchors of each level: w = s·√(1/r), h = s·√r keeps the area s².
        let mut out = Vec::new();
        for (lvl, &(fh, fw)) in feature_sizes.iter().enumerate() {
            let stride = self.strides[lvl] as f32;
            let mut cell = Vec::with_capacity(self.num_anchors_per_location());
            for &r in &self.ratios {
                for &sc in &self.scales {
                    let s = self.sizes[lvl] * sc;
                    let hr = r.sqrt();
                    cell.push((0.5 * s / hr, 0.5 * s * hr));
                }
            }
            out.reserve(fh * fw * cell.len());
            for y in 0..fh {
                let cy = (y as f32 + self.offset) * stride;
                for x in 0..fw {
                    let cx = (x as f32 + self.offset) * stride;
                    for &(hw, hh) in &cell {
                        out.push([cx - hw, cy - hh, cx + hw, cy + hh]);
                    }
                }
            }
        }
        Ok(out)
    }
}

/// `[N, 4]` f32 tensor of boxes.
pub fn boxes_to_tensor(boxes: &[BoxXyxy], device: &Device) -> Result<Tensor> {
    let flat: Vec<f32> = boxes.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (boxes.len(), 4), device)
}

/// The boxes of an `[N, 4]` tensor (any float dtype).
pub fn tensor_to_boxes(t: &Tensor) -> Result<Vec<BoxXyxy>> {
    let (_, four) = t.dims2()?;
    if four != 4 {
        bail!("tensor_to_boxes: expected [N, 4], got {:?}", t.dims())
    }
    let v = t.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    Ok(v.into_iter().map(|r| [r[0], r[1], r[2], r[3]]).collect())
}

/// Area of a box (0 for an empty or inverted box).
pub fn box_area(b: &BoxXyxy) -> f32 {
    (b[2] - b[0]).max(0.0) * (b[3] - b[1]).max(0.0)
}

/// Intersection over union of two boxes (0 when the union is empty).
pub fn box_iou(a: &BoxXyxy, b: &BoxXyxy) -> f32 {
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let union = box_area(a) + box_area(b) - inter;
    if union > 0.0 {
        inter / union
    } else {
        0.0
    }
}

/// Thresholds of [`match_anchors`]; the default is RetinaNet's (0.5 / 0.4, low-quality matches on).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MatchConfig {
    /// IoU ≥ `pos_iou` with its best ground truth makes an anchor positive.
    pub pos_iou: f32,
    /// IoU < `neg_iou` with every ground truth makes an anchor background; in between: ignored.
    pub neg_iou: f32,
    /// Force each ground truth's best anchor(s) positive (all anchors tied at its maximum IoU,
    /// mmdet's `gt_max_assign_all`), so no object is left without a positive anchor.
    pub allow_low_quality: bool,
}

impl Default for MatchConfig {
    fn default() -> Self {
        Self {
            pos_iou: 0.5,
            neg_iou: 0.4,
            allow_low_quality: true,
        }
    }
}

/// Result of [`match_anchors`].
#[derive(Debug, Clone, PartialEq)]
pub struct Matched {
    /// Per anchor: the class id `0..C` of a positive, `C` background, `-1` ignored.
    pub labels: Vec<i64>,
    /// Per anchor: the ground-truth box it is matched to (its highest-IoU one; for a positive
    /// forced by the best-anchor rule, the ground truth that forced it). All zeros when the image
    /// has no ground truth. Only meaningful where `labels` is a class.
    pub boxes: Vec<BoxXyxy>,
    /// Per anchor: index of the matched ground truth (`None` for background / ignored).
    pub gt_index: Vec<Option<usize>>,
    /// Number of positive anchors.
    pub num_pos: usize,
}

impl Matched {
    /// `(labels [A] i64, boxes [A, 4] f32)` on `device`, ready for the losses of this crate.
    pub fn to_tensors(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let labels = Tensor::new(self.labels.as_slice(), device)?;
        Ok((labels, boxes_to_tensor(&self.boxes, device)?))
    }
}

/// Assigns anchors to ground-truth boxes by IoU (RetinaNet's rule, mmdet `MaxIoUAssigner`
/// semantics).
///
/// For each anchor with best IoU `m` (over all ground truths) with box `g`:
/// `m ≥ pos_iou` → positive, label `classes[g]`; `m < neg_iou` → background, label
/// `num_classes`; otherwise ignored, label `-1`. Then, with `allow_low_quality`, every ground
/// truth `g` (in order, so a later one wins a tie) makes each anchor whose IoU with it equals its
/// maximum over anchors (if > 0) positive for `g`: a small object that no anchor overlaps by 0.5
/// still gets a positive.
///
/// # Errors
///
/// `gt_boxes` and `gt_classes` of different lengths, a class `≥ num_classes`, a non-finite box
/// or threshold, or `neg_iou > pos_iou`.
pub fn match_anchors(
    anchors: &[BoxXyxy],
    gt_boxes: &[BoxXyxy],
    gt_classes: &[u32],
    num_classes: usize,
    cfg: &MatchConfig,
) -> Result<Matched> {
    if gt_boxes.len() != gt_classes.len() {
        bail!(
            "match_anchors: {} boxes but {} classes",
            gt_boxes.len(),
            gt_classes.len()
        )
    }
    if let Some(c) = gt_classes.iter().find(|&&c| c as usize >= num_classes) {
        bail!("match_anchors: class {c} out of range 0..{num_classes}")
    }
    if !(cfg.pos_iou.is_finite() && cfg.neg_iou.is_finite() && cfg.neg_iou <= cfg.pos_iou) {
        bail!(
            "match_anchors: need finite thresholds with neg_iou <= pos_iou, got {} / {}",
            cfg.neg_iou,
            cfg.pos_iou
        )
    }
    if gt_boxes.iter().flatten().any(|v| !v.is_finite()) {
        bail!("match_anchors: ground-truth boxes must be finite")
    }
    let na = anchors.len();
    let bg = num_classes as i64;
    let mut labels = vec![bg; na];
    let mut boxes = vec![[0f32; 4]; na];
    let mut gt_index = vec![None; na];
    if gt_boxes.is_empty() {
        return Ok(Matched {
            labels,
            boxes,
            gt_index,
            num_pos: 0,
        });
    }
    // ious[a * G + g]; the per-gt maximum over anchors for the low-quality rule.
    let ng = gt_boxes.len();
    let mut ious = vec![0f32; na * ng];
    let mut gt_max = vec![0f32; ng];
    for (a, anc) in anchors.iter().enumerate() {
        let mut best = -1f32;
        let mut best_g = 0;
        for (g, gt) in gt_boxes.iter().enumerate() {
            let iou = box_iou(anc, gt);
            ious[a * ng + g] = iou;
            if iou > best {
                // first maximum wins a tie between ground truths (argmax)
                best = iou;
                best_g = g;
            }
            if iou > gt_max[g] {
                gt_max[g] = iou;
            }
        }
        boxes[a] = gt_boxes[best_g];
        if best >= cfg.pos_iou {
            labels[a] = gt_classes[best_g] as i64;
            gt_index[a] = Some(best_g);
        } else if best >= cfg.neg_iou {
            labels[a] = -1;
        }
    }
    if cfg.allow_low_quality {
        for g in 0..ng {
            if gt_max[g] <= 0.0 {
                continue;
            }
            for a in 0..na {
                if ious[a * ng + g] == gt_max[g] {
                    labels[a] = gt_classes[g] as i64;
                    boxes[a] = gt_boxes[g];
                    gt_index[a] = Some(g);
                }
            }
        }
    }
    let num_pos = labels.iter().filter(|&&l| l >= 0 && l < bg).count();
    Ok(Matched {
        labels,
        boxes,
        gt_index,
        num_pos,
    })
}

/// Encodes boxes relative to anchors as normalised deltas and back (Faster R-CNN / RetinaNet
/// parameterisation):
///
/// ```text
/// dx = (gx - ax) / aw / std[0]      dw = ln(gw / aw) / std[2]
/// dy = (gy - ay) / ah / std[1]      dh = ln(gh / ah) / std[3]
/// ```
///
/// with centres `(x, y)` and sizes `(w, h)`. The default `std` is `(0.1, 0.1, 0.2, 0.2)`
/// (torchvision's `BoxCoder` weights `(10, 10, 5, 5)`). [`BoxCoder::decode`] clamps `dw, dh` (after
/// scaling) at `ln(1000 / 16)` so a wild prediction cannot overflow `exp`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BoxCoder {
    /// Standard deviations the deltas are divided by.
    pub std: [f32; 4],
    /// Upper clamp of the scaled log-size deltas in `decode`.
    pub wh_clamp: f32,
}

impl Default for BoxCoder {
    fn default() -> Self {
        Self {
            std: [0.1, 0.1, 0.2, 0.2],
            wh_clamp: (1000.0f32 / 16.0).ln(),
        }
    }
}

/// Splits `[..., 4]` into its four `[..., 1]` columns.
fn columns(t: &Tensor) -> Result<[Tensor; 4]> {
    if t.dims().last() != Some(&4) {
        bail!(
            "BoxCoder: expected boxes of shape [..., 4], got {:?}",
            t.dims()
        )
    }
    Ok([
        t.narrow(D::Minus1, 0, 1)?,
        t.narrow(D::Minus1, 1, 1)?,
        t.narrow(D::Minus1, 2, 1)?,
        t.narrow(D::Minus1, 3, 1)?,
    ])
}

impl BoxCoder {
    /// Deltas `[..., 4]` that turn `anchors` into `boxes` (both `[..., 4]` xyxy, broadcastable).
    /// Degenerate (zero-size) boxes give `-inf` log-size deltas: encode only matched boxes.
    pub fn encode(&self, anchors: &Tensor, boxes: &Tensor) -> Result<Tensor> {
        let [ax1, ay1, ax2, ay2] = columns(anchors)?;
        let [gx1, gy1, gx2, gy2] = columns(boxes)?;
        let aw = (&ax2 - &ax1)?;
        let ah = (&ay2 - &ay1)?;
        let acx = ((&ax1 + &ax2)? * 0.5)?;
        let acy = ((&ay1 + &ay2)? * 0.5)?;
        let gw = (&gx2 - &gx1)?;
        let gh = (&gy2 - &gy1)?;
        let gcx = ((&gx1 + &gx2)? * 0.5)?;
        let gcy = ((&gy1 + &gy2)? * 0.5)?;
        let s = self.std;
        let dx = (gcx.broadcast_sub(&acx)?.broadcast_div(&aw)? / s[0] as f64)?;
        let dy = (gcy.broadcast_sub(&acy)?.broadcast_div(&ah)? / s[1] as f64)?;
        let dw = (gw.broadcast_div(&aw)?.log()? / s[2] as f64)?;
        let dh = (gh.broadcast_div(&ah)?.log()? / s[3] as f64)?;
        Tensor::cat(&[dx, dy, dw, dh], D::Minus1)
    }

    /// Boxes `[..., 4]` xyxy from `anchors` and `deltas` (broadcastable `[..., 4]`); differentiable
    /// in `deltas`, so an IoU loss can be applied to decoded predictions.
    pub fn decode(&self, anchors: &Tensor, deltas: &Tensor) -> Result<Tensor> {
        let [ax1, ay1, ax2, ay2] = columns(anchors)?;
        let [dx, dy, dw, dh] = columns(deltas)?;
        let aw = (&ax2 - &ax1)?;
        let ah = (&ay2 - &ay1)?;
        let acx = ((&ax1 + &ax2)? * 0.5)?;
        let acy = ((&ay1 + &ay2)? * 0.5)?;
        let s = self.std;
        let c = self.wh_clamp as f64;
        let cx = (dx * s[0] as f64)?
            .broadcast_mul(&aw)?
            .broadcast_add(&acx)?;
        let cy = (dy * s[1] as f64)?
            .broadcast_mul(&ah)?
            .broadcast_add(&acy)?;
        let hw = ((dw * s[2] as f64)?
            .clamp(-c, c)?
            .exp()?
            .broadcast_mul(&aw)?
            * 0.5)?;
        let hh = ((dh * s[3] as f64)?
            .clamp(-c, c)?
            .exp()?
            .broadcast_mul(&ah)?
            * 0.5)?;
        Tensor::cat(
            &[(&cx - &hw)?, (&cy - &hh)?, (&cx + &hw)?, (&cy + &hh)?],
            D::Minus1,
        )
    }

    /// [`BoxCoder::encode`] of one box.
    pub fn encode_box(&self, anchor: &BoxXyxy, gt: &BoxXyxy) -> [f32; 4] {
        let (aw, ah) = (anchor[2] - anchor[0], anchor[3] - anchor[1]);
        let (acx, acy) = (anchor[0] + 0.5 * aw, anchor[1] + 0.5 * ah);
        let (gw, gh) = (gt[2] - gt[0], gt[3] - gt[1]);
        let (gcx, gcy) = (gt[0] + 0.5 * gw, gt[1] + 0.5 * gh);
        let s = self.std;
        [
            (gcx - acx) / aw / s[0],
            (gcy - acy) / ah / s[1],
            (gw / aw).ln() / s[2],
            (gh / ah).ln() / s[3],
        ]
    }

    /// [`BoxCoder::decode`] of one box.
    pub fn decode_box(&self, anchor: &BoxXyxy, d: &[f32; 4]) -> BoxXyxy {
        let (aw, ah) = (anchor[2] - anchor[0], anchor[3] - anchor[1]);
        let (acx, acy) = (anchor[0] + 0.5 * aw, anchor[1] + 0.5 * ah);
        let s = self.std;
        let c = self.wh_clamp;
        let cx = d[0] * s[0] * aw + acx;
        let cy = d[1] * s[1] * ah + acy;
        let hw = 0.5 * (d[2] * s[2]).clamp(-c, c).exp() * aw;
        let hh = 0.5 * (d[3] * s[3]).clamp(-c, c).exp() * ah;
        [cx - hw, cy - hh, cx + hw, cy + hh]
    }
}

/// Greedy non-maximum suppression: indices of the kept boxes, highest score first. A box is
/// suppressed when its IoU with an already kept box is **greater** than `iou_threshold`
/// (torchvision semantics). Equal scores keep the input order. At most `max_keep` indices.
///
/// # Errors
///
/// `boxes` and `scores` of different lengths, or a NaN score.
pub fn nms(
    boxes: &[BoxXyxy],
    scores: &[f32],
    iou_threshold: f32,
    max_keep: usize,
) -> Result<Vec<usize>> {
    batched_nms(
        boxes,
        scores,
        &vec![0; boxes.len()],
        iou_threshold,
        max_keep,
    )
}

/// Per-class NMS: boxes only suppress boxes of the same class. Returns indices of the kept
/// boxes over all classes, highest score first (ties in input order), at most `max_keep`.
///
/// # Errors
///
/// Inputs of different lengths, or a NaN score.
pub fn batched_nms(
    boxes: &[BoxXyxy],
    scores: &[f32],
    classes: &[u32],
    iou_threshold: f32,
    max_keep: usize,
) -> Result<Vec<usize>> {
    if boxes.len() != scores.len() || boxes.len() != classes.len() {
        bail!(
            "batched_nms: {} boxes, {} scores, {} classes",
            boxes.len(),
            scores.len(),
            classes.len()
        )
    }
    if scores.iter().any(|s| s.is_nan()) {
        bail!("batched_nms: NaN score")
    }
    let mut order: Vec<usize> = (0..boxes.len()).collect();
    // stable sort by descending score: ties keep input order
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
    let mut keep: Vec<usize> = Vec::new();
    for &i in &order {
        if keep.len() >= max_keep {
            break;
        }
        let suppressed = keep
            .iter()
            .any(|&k| classes[k] == classes[i] && box_iou(&boxes[k], &boxes[i]) > iou_threshold);
        if !suppressed {
            keep.push(i);
        }
    }
    Ok(keep)
}
