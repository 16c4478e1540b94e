//! The two pictures of a run, drawn with `plotters` into an RGB buffer and saved as PNG by
//! `image`: the training-loss figure (axes, ticks, labels, legend, epoch boundaries) and a grid
//! of validation images with ground-truth and predicted boxes (class name and score beside each
//! prediction, a legend, the score threshold in the title).
//!
//! Text needs a font: the bitmap backend rasterises it with `ab_glyph` from DejaVu Sans, embedded
//! in the binary by the `dejavu` crate (free licence, see the README), so the pictures look the
//! same on every machine and need no system font or fontconfig.

use crate::data::Dataset;
use crate::train::Detection;
use anyhow::{anyhow, Context, Result};
use plotters::backend::RGBPixel;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::FontStyle;
use std::path::Path;
use std::sync::Once;

/// The font family every text element uses.
const FONT: &str = "sans-serif";

/// Registers DejaVu Sans (regular and bold) under [`FONT`] once per process.
fn register_fonts() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut res = Ok(());
    ONCE.call_once(|| {
        res = plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
            .and_then(|_| {
                plotters::style::register_font(FONT, FontStyle::Bold, dejavu::sans::bold())
            })
            .map_err(|_| anyhow!("plotters: DejaVu Sans is not a valid font"));
    });
    res
}

/// Turns a plotters error (not `Send + Sync`) into an `anyhow` error.
fn pe<E: std::fmt::Debug>(what: &'static str) -> impl FnOnce(E) -> anyhow::Error {
    move |e| anyhow!("{what}: {e:?}")
}

/// Draws with `draw` on a white `w × h` canvas and saves it as PNG at `path`.
fn render(
    path: &Path,
    (w, h): (u32, u32),
    background: Option<Vec<u8>>,
    draw: impl FnOnce(&DrawingArea<BitMapBackend<RGBPixel>, Shift>) -> Result<()>,
) -> Result<()> {
    let mut buf = background.unwrap_or_else(|| vec![255u8; (w * h * 3) as usize]);
    {
        let backend = BitMapBackend::<RGBPixel>::with_buffer_and_format(&mut buf, (w, h))
            .map_err(pe("plotters buffer"))?;
        let area = backend.into_drawing_area();
        draw(&area)?;
        area.present().map_err(pe("plotters present"))?;
    }
    image::RgbImage::from_raw(w, h, buf)
        .context("picture buffer has the wrong size")?
        .save(path)
        .with_context(|| format!("writing {}", path.display()))
}

/// Exponential moving average, for a readable curve.
fn smooth(v: &[f32], a: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(v.len());
    let mut m = v.first().copied().unwrap_or(0.0);
    for &x in v {
        m = a * m + (1.0 - a) * x;
        out.push(m);
    }
    out
}

/// What the loss figure shows.
pub struct LossCurves<'a> {
    /// Title line (run name, losses).
    pub title: String,
    /// Per-iteration losses: total, classification, box regression.
    pub total: &'a [f32],
    pub cls: &'a [f32],
    pub reg: &'a [f32],
    /// Legend names of the two loss terms (e.g. "focal", "smooth-l1").
    pub cls_name: &'a str,
    pub box_name: &'a str,
    /// Iterations per epoch (a vertical line at each boundary) and the first epoch's number.
    pub steps_per_epoch: usize,
    pub first_epoch: usize,
    /// Images per iteration (x-axis label).
    pub batch_size: usize,
}

/// The loss figure (1000 × 520 px): iterations on x, loss on y (from 0), per-iteration
/// values thin and their moving average bold, a legend, dashed epoch boundaries.
pub fn loss_png(path: &Path, c: &LossCurves) -> Result<()> {
    register_fonts()?; // before any font is made: plotters looks the family up on creation
    let n = c.total.len();
    let finite: Vec<f32> = [c.total, c.cls, c.reg]
        .iter()
        .flat_map(|v| v.iter().copied())
        .filter(|v| v.is_finite() && *v >= 0.0)
        .collect();
    let hi = finite.iter().fold(0f32, |a, &b| a.max(b));
    // headroom above the curves for the epoch labels and the legend
    let (lo, hi) = (0f32, if hi > 0.0 { hi * 1.3 } else { 1.0 });
    let xmax = n.max(2) as f32;
    render(path, (1000, 520), None, |root| {
        root.fill(&WHITE).map_err(pe("fill"))?;
        let mut chart = ChartBuilder::on(root)
            .caption(&c.title, (FONT, 20).into_font().style(FontStyle::Bold))
            .margin(12)
            .x_label_area_size(48)
            .y_label_area_size(70)
            .build_cartesian_2d(0f32..xmax, lo as f64..hi as f64)
            .map_err(pe("chart"))?;
        chart
            .configure_mesh()
            .x_desc(format!(
                "iteration (batch of {} images)   ·   dashed: epoch boundaries   ·   thin: per iteration, bold: moving average (EMA 0.9)",
                c.batch_size
            ))
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_labels(10)
            .y_desc("loss")
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 15))
            .light_line_style(RGBColor(238, 238, 238))
            .bold_line_style(RGBColor(215, 215, 215))
            .y_label_formatter(&|v| format!("{v:.1}"))
            .draw()
            .map_err(pe("mesh"))?;
        // epoch boundaries, labelled at the top
        let grey = RGBColor(150, 150, 150);
        if c.steps_per_epoch > 0 {
            let mut e = 1;
            while e * c.steps_per_epoch < n {
                let x = (e * c.steps_per_epoch) as f32;
                chart
                    .draw_series(DashedLineSeries::new(
                        [(x, lo as f64), (x, hi as f64)],
                        6,
                        4,
                        grey.stroke_width(1),
                    ))
                    .map_err(pe("epoch line"))?;
                e += 1;
            }
            let every = ((n / c.steps_per_epoch.max(1)) / 12).max(1);
            for e in (0..n.div_ceil(c.steps_per_epoch)).step_by(every) {
                let x = (e * c.steps_per_epoch) as f32 + 0.01 * xmax;
                chart
                    .draw_series(std::iter::once(Text::new(
                        format!("ep {}", c.first_epoch + e + 1),
                        (x, hi as f64 * 0.985),
                        (FONT, 13).into_font().color(&grey),
                    )))
                    .map_err(pe("epoch label"))?;
            }
        }
        let series = [
            ("total", c.total, RGBColor(0, 0, 0)),
            (c.cls_name, c.cls, RGBColor(200, 30, 30)),
            (c.box_name, c.reg, RGBColor(30, 70, 200)),
        ];
        for (_, vals, col) in &series {
            let faint = col.mix(0.25);
            chart
                .draw_series(LineSeries::new(
                    vals.iter()
                        .enumerate()
                        .filter(|(_, v)| v.is_finite() && **v >= 0.0)
                        .map(|(i, &v)| (i as f32, v as f64)),
                    faint.stroke_width(1),
                ))
                .map_err(pe("raw series"))?;
        }
        for (k, (name, vals, col)) in series.iter().enumerate() {
            let label = match k {
                0 => "total loss".to_string(),
                1 => format!("classification ({name})"),
                _ => format!("box regression ({name})"),
            };
            let col = *col;
            chart
                .draw_series(LineSeries::new(
                    smooth(vals, 0.9)
                        .into_iter()
                        .enumerate()
                        .filter(|(_, v)| v.is_finite() && *v >= 0.0)
                        .map(|(i, v)| (i as f32, v as f64)),
                    col.stroke_width(2),
                ))
                .map_err(pe("smoothed series"))?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], col.stroke_width(3))
                });
        }
        // upper right, below the row of epoch labels
        let (pw, _) = chart.plotting_area().dim_in_pixel();
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::Coordinate(pw as i32 - 250, 26))
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .label_font((FONT, 14))
            .draw()
            .map_err(pe("legend"))?;
        Ok(())
    })
}

/// Prediction colours by class (no white, no green: the ground truth and foliage).
const CLASS_COLOURS: [(u8, u8, u8); 8] = [
    (230, 25, 75),
    (0, 130, 200),
    (255, 225, 25),
    (145, 30, 180),
    (245, 130, 48),
    (70, 240, 240),
    (240, 50, 230),
    (128, 128, 0),
];

fn class_colour(c: u32) -> RGBColor {
    let (r, g, b) = CLASS_COLOURS[c as usize % CLASS_COLOURS.len()];
    RGBColor(r, g, b)
}

/// Width of a text label's background: plotters' estimate of the rendered width (ab_glyph) is
/// about 10% short, so pad it.
fn label_width(estimate: u32) -> i32 {
    (estimate as f32 * 1.12).ceil() as i32 + 5
}

/// Ground-truth colour.
const GT: RGBColor = RGBColor(255, 255, 255);

/// What the detection grid shows.
pub struct DetectionGrid<'a> {
    pub ds: &'a Dataset,
    /// Detections of each image of `ds`, in model coordinates.
    pub dets: &'a [Vec<Detection>],
    pub cols: usize,
    pub rows: usize,
    pub zoom: u32,
    /// Only predictions with at least this score are drawn.
    pub min_score: f32,
    /// Title prefix (e.g. the run name).
    pub title: String,
}

/// A `cols × rows` grid of the first validation images, upscaled `zoom`×: ground truth in white,
/// predictions with score ≥ `min_score` in their class colour with `class score` beside them.
/// A header holds the title (with the threshold and the counts drawn) and the colour legend.
pub fn detections_png(path: &Path, g: &DetectionGrid) -> Result<()> {
    register_fonts()?; // before any font is made: plotters looks the family up on creation
    let ds = g.ds;
    let s = ds.size as u32;
    let shown = (g.cols * g.rows).min(ds.samples.len()).max(1);
    let cols = g.cols.min(shown).max(1);
    let rows = shown.div_ceil(cols);
    let gap = 6u32;
    let cell = s * g.zoom + gap;
    let header = 74u32;
    let w = (cell * cols as u32 + gap).max(620);
    let h = header + cell * rows as u32 + gap;
    // the images, nearest-neighbour upscaled, on a dark background
    let mut buf = vec![40u8; (w * h * 3) as usize];
    let n = (s * s) as usize;
    let origin = |k: usize| {
        (
            gap + (k % cols) as u32 * cell,
            header + gap + (k / cols) as u32 * cell,
        )
    };
    for (k, sample) in ds.samples.iter().take(shown).enumerate() {
        let (cx, cy) = origin(k);
        for y in 0..s * g.zoom {
            for x in 0..s * g.zoom {
                let i = ((y / g.zoom) * s + x / g.zoom) as usize;
                let o = (((cy + y) * w + cx + x) * 3) as usize;
                for ch in 0..3 {
                    buf[o + ch] = (sample.pixels[ch * n + i].clamp(0.0, 1.0) * 255.0) as u8;
                }
            }
        }
    }
    for row in buf.chunks_mut((w * 3) as usize).take(header as usize) {
        row.fill(255);
    }
    let (mut n_gt, mut n_pred) = (0usize, 0usize);
    for (sample, d) in ds.samples.iter().zip(g.dets).take(shown) {
        n_gt += sample.boxes.len();
        n_pred += d.iter().filter(|d| d.score >= g.min_score).count();
    }
    let font: TextStyle = (FONT, 13).into_font().into();
    render(path, (w, h), Some(buf), |root| {
        root.draw(&Text::new(
            format!(
                "{}: predictions with score ≥ {:.2} ({} drawn; {} ground-truth boxes; {} of {} validation images)",
                g.title,
                g.min_score,
                n_pred,
                n_gt,
                shown,
                ds.samples.len()
            ),
            (gap as i32, 10),
            (FONT, 16).into_font().style(FontStyle::Bold),
        ))
        .map_err(pe("title"))?;
        // legend: ground truth, then one swatch per class
        let mut x = gap as i32;
        let y = 44;
        let swatch = |root: &DrawingArea<BitMapBackend<RGBPixel>, Shift>,
                      x: i32,
                      col: RGBColor,
                      text: &str|
         -> Result<i32> {
            let fill = if col == GT {
                RGBColor(40, 40, 40)
            } else {
                WHITE
            };
            root.draw(&Rectangle::new([(x, y), (x + 22, y + 14)], fill.filled()))
                .map_err(pe("swatch"))?;
            root.draw(&Rectangle::new(
                [(x + 1, y + 1), (x + 21, y + 13)],
                col.stroke_width(2),
            ))
            .map_err(pe("swatch"))?;
            root.draw(&Text::new(text.to_string(), (x + 28, y), font.clone()))
                .map_err(pe("legend"))?;
            let (tw, _) = root
                .estimate_text_size(text, &font)
                .map_err(pe("text size"))?;
            Ok(x + 28 + label_width(tw) + 14)
        };
        x = swatch(root, x, GT, "ground truth")?;
        let note = "predictions (label: class, score):";
        root.draw(&Text::new(note, (x, y), font.clone()))
            .map_err(pe("legend"))?;
        let (tw, _) = root
            .estimate_text_size(note, &font)
            .map_err(pe("text size"))?;
        x += label_width(tw) + 10;
        for (c, name) in ds.class_names.iter().enumerate() {
            x = swatch(root, x, class_colour(c as u32), name)?;
        }
        for (k, (sample, d)) in ds.samples.iter().zip(g.dets).take(shown).enumerate() {
            let (cx, cy) = origin(k);
            let z = g.zoom as f32;
            let p = |b: &[f32; 4]| {
                (
                    (
                        cx as i32 + (b[0] * z).round() as i32,
                        cy as i32 + (b[1] * z).round() as i32,
                    ),
                    (
                        cx as i32 + (b[2] * z).round() as i32,
                        cy as i32 + (b[3] * z).round() as i32,
                    ),
                )
            };
            for b in &sample.boxes {
                let (a, c) = p(b);
                root.draw(&Rectangle::new([a, c], GT.stroke_width(2)))
                    .map_err(pe("gt box"))?;
            }
            let mut preds: Vec<&Detection> = d.iter().filter(|d| d.score >= g.min_score).collect();
            preds.sort_by(|a, b| a.score.total_cmp(&b.score)); // best drawn last, on top
            for det in preds {
                let col = class_colour(det.class);
                let (a, c) = p(&det.bbox);
                root.draw(&Rectangle::new([a, c], col.stroke_width(2)))
                    .map_err(pe("pred box"))?;
                let name = ds
                    .class_names
                    .get(det.class as usize)
                    .map(String::as_str)
                    .unwrap_or("?");
                let label = format!("{name} {:.2}", det.score);
                let (tw, th) = root
                    .estimate_text_size(&label, &font)
                    .map_err(pe("text size"))?;
                // above the box, inside the cell
                let lx =
                    a.0.clamp(cx as i32, (cx + s * g.zoom) as i32 - tw as i32 - 2);
                let ly = (a.1 - th as i32 - 2).max(cy as i32);
                root.draw(&Rectangle::new(
                    [(lx, ly), (lx + label_width(tw), ly + th as i32 + 1)],
                    col.filled(),
                ))
                .map_err(pe("label box"))?;
                let text_col = if (col.0 as u32 + col.1 as u32 + col.2 as u32) > 450 {
                    BLACK
                } else {
                    WHITE
                };
                root.draw(&Text::new(
                    label,
                    (lx + 2, ly),
                    font.clone().color(&text_col),
                ))
                .map_err(pe("label"))?;
            }
        }
        Ok(())
    })
}
