//! COCO-style bounding-box evaluation (the 12 numbers of `pycocotools.cocoeval.COCOeval`
//! with `iouType="bbox"`), without crowd annotations, plus the COCO results JSON.
//!
//! The algorithm follows pycocotools step by step, so the numbers agree with it (the test suite
//! compares against a pycocotools run to 1e-4): per image and category, detections sorted by
//! score (stable) and cut at 100; greedy matching at IoU thresholds 0.50:0.05:0.95 where a
//! detection takes the highest-IoU unmatched ground truth (non-ignored ones first); ground truths
//! outside an area range are ignored, as are unmatched detections outside it; per category,
//! detections of all images ranked by score, precision made monotone and sampled at 101 recall
//! points (`searchsorted`, left); the mean over categories with at least one ground truth.
//! Boxes are COCO `[x, y, w, h]`; ground-truth areas are the annotation's `area` (use `w·h` for
//! box-only data), detection areas `w·h`. Area ranges: small < 32², medium 32²–96², large > 96².
//!
//! # Example
//!
//! ```
//! use candle_detloss::metrics::{evaluate_bbox, CocoDet, CocoGt};
//! # fn main() -> candle_core::Result<()> {
//! let gts = vec![CocoGt::from_xywh(1, 1, [10.0, 10.0, 40.0, 40.0])];
//! let dets = vec![CocoDet { image_id: 1, category_id: 1, bbox: [11.0, 10.0, 40.0, 40.0], score: 0.9 }];
//! let stats = evaluate_bbox(&[1], &[1], &gts, &dets)?;
//! assert!((stats.ap50 - 1.0).abs() < 1e-12);
//! println!("{}", stats.summary());
//! # Ok(()) }
//! ```

use candle_core::{bail, Result};
use std::collections::HashMap;
use std::fmt::Write;

/// A ground-truth box (not crowd).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CocoGt {
    /// Image id (must be one of the evaluated image ids).
    pub image_id: u64,
    /// Category id (must be one of the evaluated category ids).
    pub category_id: u64,
    /// `[x, y, w, h]` in pixels.
    pub bbox: [f64; 4],
    /// Area used for the small / medium / large split (COCO: the segmentation area).
    pub area: f64,
}

impl CocoGt {
    /// A ground truth whose area is its box's `w·h`.
    pub fn from_xywh(image_id: u64, category_id: u64, bbox: [f64; 4]) -> Self {
        Self {
            image_id,
            category_id,
            bbox,
            area: bbox[2] * bbox[3],
        }
    }
}

/// A detection (one line of a COCO results file).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CocoDet {
    /// Image id.
    pub image_id: u64,
    /// Category id.
    pub category_id: u64,
    /// `[x, y, w, h]` in pixels.
    pub bbox: [f64; 4],
    /// Confidence.
    pub score: f64,
}

/// `[x1, y1, x2, y2]` to COCO `[x, y, w, h]`.
pub fn xyxy_to_xywh(b: [f32; 4]) -> [f64; 4] {
    let (x1, y1, x2, y2) = (b[0] as f64, b[1] as f64, b[2] as f64, b[3] as f64);
    [x1, y1, x2 - x1, y2 - y1]
}

/// The 12 summary numbers of `COCOeval.summarize()` (bbox), in its order. A value is `-1` where
/// pycocotools prints -1 (no category with ground truth in that area range).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CocoStats {
    /// AP @ IoU 0.50:0.95, all areas, 100 detections.
    pub ap: f64,
    /// AP @ IoU 0.50.
    pub ap50: f64,
    /// AP @ IoU 0.75.
    pub ap75: f64,
    /// AP for small objects (area < 32²).
    pub ap_small: f64,
    /// AP for medium objects (32² ≤ area ≤ 96²).
    pub ap_medium: f64,
    /// AP for large objects (area > 96²).
    pub ap_large: f64,
    /// AR with 1 detection per image.
    pub ar1: f64,
    /// AR with 10 detections per image.
    pub ar10: f64,
    /// AR with 100 detections per image.
    pub ar100: f64,
    /// AR (100) small.
    pub ar_small: f64,
    /// AR (100) medium.
    pub ar_medium: f64,
    /// AR (100) large.
    pub ar_large: f64,
}

const NAMES: [&str; 12] = [
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
];

impl CocoStats {
    /// The 12 numbers in pycocotools' `stats` order.
    pub fn to_array(&self) -> [f64; 12] {
        [
            self.ap,
            self.ap50,
            self.ap75,
            self.ap_small,
            self.ap_medium,
            self.ap_large,
            self.ar1,
            self.ar10,
            self.ar100,
            self.ar_small,
            self.ar_medium,
            self.ar_large,
        ]
    }

    fn from_array(s: [f64; 12]) -> Self {
        Self {
            ap: s[0],
            ap50: s[1],
            ap75: s[2],
            ap_small: s[3],
            ap_medium: s[4],
            ap_large: s[5],
            ar1: s[6],
            ar10: s[7],
            ar100: s[8],
            ar_small: s[9],
            ar_medium: s[10],
            ar_large: s[11],
        }
    }

    /// A JSON object `{"AP": …, "AP50": …, …, "stats": [12 numbers]}`.
    pub fn to_json(&self) -> String {
        let a = self.to_array();
        let mut s = String::from("{");
        for (n, v) in NAMES.iter().zip(a) {
            let _ = write!(s, "\"{n}\": {}, ", json_num(v));
        }
        s.push_str("\"stats\": [");
        let nums: Vec<String> = a.iter().map(|&v| json_num(v)).collect();
        s.push_str(&nums.join(", "));
        s.push_str("]}");
        s
    }

    /// The 12 lines `COCOeval.summarize()` prints.
    pub fn summary(&self) -> String {
        let a = self.to_array();
        let rows = [
            ("Precision", "0.50:0.95", "all", 100),
            ("Precision", "0.50", "all", 100),
            ("Precision", "0.75", "all", 100),
            ("Precision", "0.50:0.95", "small", 100),
            ("Precision", "0.50:0.95", "medium", 100),
            ("Precision", "0.50:0.95", "large", 100),
            ("Recall", "0.50:0.95", "all", 1),
            ("Recall", "0.50:0.95", "all", 10),
            ("Recall", "0.50:0.95", "all", 100),
            ("Recall", "0.50:0.95", "small", 100),
            ("Recall", "0.50:0.95", "medium", 100),
            ("Recall", "0.50:0.95", "large", 100),
        ];
        let mut s = String::new();
        for ((kind, iou, area, md), v) in rows.iter().zip(a) {
            let short = if *kind == "Precision" { "(AP)" } else { "(AR)" };
            let _ = writeln!(
                s,
                " Average {kind:<9} {short} @[ IoU={iou:<9} | area={area:>6} | maxDets={md:>3} ] = {v:.3}"
            );
        }
        s
    }
}

/// A finite number as JSON (non-finite values, which JSON cannot hold, as `null`).
fn json_num(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".to_string()
    }
}

/// COCO results JSON: `[{"image_id": …, "category_id": …, "bbox": [x, y, w, h], "score": …}, …]`,
/// the file `COCO.loadRes` reads.
pub fn results_json(dets: &[CocoDet]) -> String {
    let mut s = String::from("[");
    for (i, d) in dets.iter().enumerate() {
        if i > 0 {
            s.push_str(",\n ");
        }
        let _ = write!(
            s,
            "{{\"image_id\": {}, \"category_id\": {}, \"bbox\": [{}, {}, {}, {}], \"score\": {}}}",
            d.image_id,
            d.category_id,
            json_num(d.bbox[0]),
            json_num(d.bbox[1]),
            json_num(d.bbox[2]),
            json_num(d.bbox[3]),
            json_num(d.score)
        );
    }
    s.push(']');
    s
}

/// IoU of two `[x, y, w, h]` boxes exactly as pycocotools' `bbIou` (doubles, no `+1`).
fn iou_xywh(d: &[f64; 4], g: &[f64; 4]) -> f64 {
    let w = (d[0] + d[2]).min(g[0] + g[2]) - d[0].max(g[0]);
    if w <= 0.0 {
        return 0.0;
    }
    let h = (d[1] + d[3]).min(g[1] + g[3]) - d[1].max(g[1]);
    if h <= 0.0 {
        return 0.0;
    }
    let i = w * h;
    let u = d[2] * d[3] + g[2] * g[3] - i;
    i / u
}

const MAX_DETS: [usize; 3] = [1, 10, 100];
const AREA_RNG: [(f64, f64); 4] = [
    (0.0, 1e10),
    (0.0, 32.0 * 32.0),
    (32.0 * 32.0, 96.0 * 96.0),
    (96.0 * 96.0, 1e10),
];
const NUM_IOU: usize = 10;
const NUM_REC: usize = 101;

/// IoU thresholds as `np.linspace(.5, .95, 10)` computes them (bit for bit).
fn iou_thresholds() -> [f64; NUM_IOU] {
    let step = (0.95 - 0.5) / 9.0;
    let mut t = [0.0; NUM_IOU];
    for (i, v) in t.iter_mut().enumerate() {
        *v = i as f64 * step + 0.5;
    }
    t[NUM_IOU - 1] = 0.95;
    t
}

/// Recall thresholds as `np.linspace(0, 1, 101)` computes them.
fn rec_thresholds() -> [f64; NUM_REC] {
    let step = 1.0 / 100.0;
    let mut t = [0.0; NUM_REC];
    for (i, v) in t.iter_mut().enumerate() {
        *v = i as f64 * step;
    }
    t[NUM_REC - 1] = 1.0;
    t
}

/// Per (image, category, area range) matching result (pycocotools' `evaluateImg` output).
struct EvalImg {
    /// Scores of the (sorted, cut at 100) detections.
    scores: Vec<f64>,
    /// `[t][d]`: detection matched at threshold t.
    matched: Vec<Vec<bool>>,
    /// `[t][d]`: detection ignored at threshold t.
    ignored: Vec<Vec<bool>>,
    /// Number of non-ignored ground truths.
    num_gt: usize,
}

/// Evaluates `dets` against `gts` over `image_ids` and `category_ids` (COCO bbox protocol,
/// maxDets 1/10/100, no crowd). Images or categories listed but absent from both inputs are
/// allowed (they contribute nothing, as in pycocotools).
///
/// # Errors
///
/// A ground truth or detection whose image or category id is not listed, a non-finite box,
/// area or score, or a negative box size.
pub fn evaluate_bbox(
    image_ids: &[u64],
    category_ids: &[u64],
    gts: &[CocoGt],
    dets: &[CocoDet],
) -> Result<CocoStats> {
    let mut imgs: Vec<u64> = image_ids.to_vec();
    imgs.sort_unstable();
    imgs.dedup();
    let mut cats: Vec<u64> = category_ids.to_vec();
    cats.sort_unstable();
    cats.dedup();
    let img_pos: HashMap<u64, usize> = imgs.iter().enumerate().map(|(i, &v)| (v, i)).collect();
    let cat_pos: HashMap<u64, usize> = cats.iter().enumerate().map(|(i, &v)| (v, i)).collect();
    let (ni, nc) = (imgs.len(), cats.len());

    // Group by (image, category), keeping input order.
    let mut g_by: Vec<Vec<&CocoGt>> = vec![Vec::new(); ni * nc];
    for g in gts {
        let (Some(&i), Some(&c)) = (img_pos.get(&g.image_id), cat_pos.get(&g.category_id)) else {
            bail!(
                "evaluate_bbox: ground truth with image {} / category {} not among the evaluated ids",
                g.image_id,
                g.category_id
            )
        };
        if g.bbox.iter().any(|v| !v.is_finite())
            || !g.area.is_finite()
            || g.bbox[2] < 0.0
            || g.bbox[3] < 0.0
        {
            bail!(
                "evaluate_bbox: invalid ground-truth box {:?} (area {})",
                g.bbox,
                g.area
            )
        }
        g_by[i * nc + c].push(g);
    }
    let mut d_by: Vec<Vec<&CocoDet>> = vec![Vec::new(); ni * nc];
    for d in dets {
        let (Some(&i), Some(&c)) = (img_pos.get(&d.image_id), cat_pos.get(&d.category_id)) else {
            bail!(
                "evaluate_bbox: detection with image {} / category {} not among the evaluated ids",
                d.image_id,
                d.category_id
            )
        };
        if d.bbox.iter().any(|v| !v.is_finite())
            || !d.score.is_finite()
            || d.bbox[2] < 0.0
            || d.bbox[3] < 0.0
        {
            bail!(
                "evaluate_bbox: invalid detection box {:?} / score {}",
                d.bbox,
                d.score
            )
        }
        d_by[i * nc + c].push(d);
    }

    let iou_thr = iou_thresholds();
    let rec_thr = rec_thresholds();
    let max_det = MAX_DETS[MAX_DETS.len() - 1];
    // eval[(c * 4 + a) * ni + i]
    let mut evals: Vec<Option<EvalImg>> = Vec::with_capacity(nc * 4 * ni);
    for c in 0..nc {
        for &(lo, hi) in AREA_RNG.iter() {
            for i in 0..ni {
                evals.push(evaluate_img(
                    &g_by[i * nc + c],
                    &d_by[i * nc + c],
                    (lo, hi),
                    max_det,
                    &iou_thr,
                ));
            }
        }
    }

    // precision[t][r][c][a][m], recall[t][c][a][m]; -1 = no ground truth.
    let nm = MAX_DETS.len();
    let pidx = |t: usize, r: usize, c: usize, a: usize, m: usize| {
        (((t * NUM_REC + r) * nc + c) * 4 + a) * nm + m
    };
    let ridx = |t: usize, c: usize, a: usize, m: usize| ((t * nc + c) * 4 + a) * nm + m;
    let mut precision = vec![-1.0f64; NUM_IOU * NUM_REC * nc * 4 * nm];
    let mut recall = vec![-1.0f64; NUM_IOU * nc * 4 * nm];
    for c in 0..nc {
        for a in 0..4 {
            let es: Vec<&EvalImg> = evals[(c * 4 + a) * ni..(c * 4 + a + 1) * ni]
                .iter()
                .flatten()
                .collect();
            if es.is_empty() {
                continue;
            }
            for (m, &md) in MAX_DETS.iter().enumerate() {
                // (score, image order, index within image) of the first md detections of each image
                let mut all: Vec<(f64, usize, usize)> = Vec::new();
                for (e_i, e) in es.iter().enumerate() {
                    for d in 0..e.scores.len().min(md) {
                        all.push((e.scores[d], e_i, d));
                    }
                }
                // np.argsort(-scores, kind='mergesort'): stable, concatenation order on ties
                all.sort_by(|x, y| y.0.total_cmp(&x.0));
                let npig: usize = es.iter().map(|e| e.num_gt).sum();
                if npig == 0 {
                    continue;
                }
                for t in 0..NUM_IOU {
                    let mut tp_sum = 0f64;
                    let mut fp_sum = 0f64;
                    let mut rc = Vec::with_capacity(all.len());
                    let mut pr = Vec::with_capacity(all.len());
                    for &(_, e_i, d) in &all {
                        let e = es[e_i];
                        if e.ignored[t][d] {
                            // ignored detections count neither way (cumsum stays)
                        } else if e.matched[t][d] {
                            tp_sum += 1.0;
                        } else {
                            fp_sum += 1.0;
                        }
                        rc.push(tp_sum / npig as f64);
                        pr.push(tp_sum / (fp_sum + tp_sum + f64::EPSILON));
                    }
                    let nd = rc.len();
                    recall[ridx(t, c, a, m)] = if nd > 0 { rc[nd - 1] } else { 0.0 };
                    // precision envelope from the right
                    for i in (1..nd).rev() {
                        if pr[i] > pr[i - 1] {
                            pr[i - 1] = pr[i];
                        }
                    }
                    for (r, &thr) in rec_thr.iter().enumerate() {
                        // searchsorted(rc, thr, side='left'): first index with rc >= thr
                        let pi = rc.partition_point(|&v| v < thr);
                        precision[pidx(t, r, c, a, m)] = if pi < nd { pr[pi] } else { 0.0 };
                        if pi >= nd {
                            // pycocotools stops at the first out-of-range index; the rest stay 0
                            for r2 in r + 1..NUM_REC {
                                precision[pidx(t, r2, c, a, m)] = 0.0;
                            }
                            break;
                        }
                    }
                }
            }
        }
    }

    let mean_valid = |vals: &mut dyn Iterator<Item = f64>| {
        let (mut s, mut n) = (0.0f64, 0usize);
        for v in vals {
            if v > -1.0 {
                s += v;
                n += 1;
            }
        }
        if n == 0 {
            -1.0
        } else {
            s / n as f64
        }
    };
    let ap = |t: Option<usize>, a: usize, m: usize| {
        let ts: Vec<usize> = match t {
            Some(t) => vec![t],
            None => (0..NUM_IOU).collect(),
        };
        let mut it = ts
            .into_iter()
            .flat_map(move |t| (0..NUM_REC).flat_map(move |r| (0..nc).map(move |c| (t, r, c))));
        mean_valid(&mut std::iter::from_fn(|| {
            it.next().map(|(t, r, c)| precision[pidx(t, r, c, a, m)])
        }))
    };
    let ar = |a: usize, m: usize| {
        let mut it = (0..NUM_IOU).flat_map(move |t| (0..nc).map(move |c| (t, c)));
        mean_valid(&mut std::iter::from_fn(|| {
            it.next().map(|(t, c)| recall[ridx(t, c, a, m)])
        }))
    };
    let iou_index = |v: f64| iou_thr.iter().position(|&t| t == v);
    Ok(CocoStats::from_array([
        ap(None, 0, 2),
        ap(iou_index(0.5), 0, 2),
        ap(iou_index(0.75), 0, 2),
        ap(None, 1, 2),
        ap(None, 2, 2),
        ap(None, 3, 2),
        ar(0, 0),
        ar(0, 1),
        ar(0, 2),
        ar(1, 2),
        ar(2, 2),
        ar(3, 2),
    ]))
}

/// pycocotools' `evaluateImg` for one image, category and area range.
fn evaluate_img(
    gts: &[&CocoGt],
    dets: &[&CocoDet],
    (lo, hi): (f64, f64),
    max_det: usize,
    iou_thr: &[f64; NUM_IOU],
) -> Option<EvalImg> {
    if gts.is_empty() && dets.is_empty() {
        return None;
    }
    // ground truths: non-ignored first (stable)
    let g_ignore = |g: &CocoGt| g.area < lo || g.area > hi;
    let mut g_sorted: Vec<&CocoGt> = gts.iter().copied().filter(|g| !g_ignore(g)).collect();
    g_sorted.extend(gts.iter().copied().filter(|g| g_ignore(g)));
    let g_ig: Vec<bool> = g_sorted.iter().map(|g| g_ignore(g)).collect();
    // detections: by score, stable, cut at max_det
    let mut d_sorted: Vec<&CocoDet> = dets.to_vec();
    d_sorted.sort_by(|a, b| b.score.total_cmp(&a.score));
    d_sorted.truncate(max_det);
    let (ng, nd) = (g_sorted.len(), d_sorted.len());
    let ious: Vec<f64> = d_sorted
        .iter()
        .flat_map(|d| g_sorted.iter().map(move |g| iou_xywh(&d.bbox, &g.bbox)))
        .collect();
    let mut matched = vec![vec![false; nd]; NUM_IOU];
    let mut ignored = vec![vec![false; nd]; NUM_IOU];
    for (t, &thr) in iou_thr.iter().enumerate() {
        let mut gt_taken = vec![false; ng];
        for d in 0..nd {
            let mut best = thr.min(1.0 - 1e-10);
            let mut m: Option<usize> = None;
            for g in 0..ng {
                if gt_taken[g] {
                    continue;
                }
                // once matched to a real gt, stop before the ignored ones
                if let Some(mm) = m {
                    if !g_ig[mm] && g_ig[g] {
                        break;
                    }
                }
                let v = ious[d * ng + g];
                if v < best {
                    continue;
                }
                best = v;
                m = Some(g);
            }
            if let Some(g) = m {
                ignored[t][d] = g_ig[g];
                matched[t][d] = true;
                gt_taken[g] = true;
            }
        }
        // unmatched detections outside the area range are ignored
        for d in 0..nd {
            let area = d_sorted[d].bbox[2] * d_sorted[d].bbox[3];
            if !matched[t][d] && (area < lo || area > hi) {
                ignored[t][d] = true;
            }
        }
    }
    Some(EvalImg {
        scores: d_sorted.iter().map(|d| d.score).collect(),
        matched,
        ignored,
        num_gt: g_ig.iter().filter(|&&x| !x).count(),
    })
}
