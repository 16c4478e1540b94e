//! Pictures drawn straight into `image::RgbImage`: the loss curves and a grid of validation
//! images with ground-truth and predicted boxes.

use crate::data::Dataset;
use crate::train::Detection;
use image::{Rgb, RgbImage};

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

/// Bresenham line.
fn line(img: &mut RgbImage, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb<u8>) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let (mut x, mut y, mut err) = (x0, y0, dx + dy);
    loop {
        put(img, x, y, c);
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

fn rect(img: &mut RgbImage, b: [f32; 4], scale: f32, off: (i64, i64), c: Rgb<u8>) {
    let p = |v: f32| (v * scale).round() as i64;
    let (x1, y1, x2, y2) = (
        p(b[0]) + off.0,
        p(b[1]) + off.1,
        p(b[2]) + off.0,
        p(b[3]) + off.1,
    );
    line(img, (x1, y1), (x2, y1), c);
    line(img, (x2, y1), (x2, y2), c);
    line(img, (x2, y2), (x1, y2), c);
    line(img, (x1, y2), (x1, y1), c);
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

/// Loss curves (log scale): total black, classification red, box blue; raw values faint,
/// smoothed values bold. Horizontal grid lines at powers of ten.
pub fn loss_png(total: &[f32], cls: &[f32], reg: &[f32]) -> RgbImage {
    let (w, h, m) = (800u32, 400u32, 30i64);
    let mut img = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    let all: Vec<f32> = total
        .iter()
        .chain(cls)
        .chain(reg)
        .copied()
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    if all.is_empty() {
        return img;
    }
    let lo = all
        .iter()
        .fold(f32::INFINITY, |a, &b| a.min(b))
        .log10()
        .floor();
    let hi = all
        .iter()
        .fold(0f32, |a, &b| a.max(b))
        .log10()
        .ceil()
        .max(lo + 1.0);
    let n = total.len().max(2);
    let px = |i: usize| m + ((w as i64 - 2 * m) as f32 * i as f32 / (n - 1) as f32) as i64;
    let py = |v: f32| {
        let t = (v.max(1e-12).log10() - lo) / (hi - lo);
        h as i64 - m - ((h as i64 - 2 * m) as f32 * t) as i64
    };
    let grey = Rgb([215, 215, 215]);
    let mut d = lo;
    while d <= hi {
        let y = py(10f32.powf(d));
        line(&mut img, (m, y), (w as i64 - m, y), grey);
        d += 1.0;
    }
    line(&mut img, (m, m), (m, h as i64 - m), Rgb([0, 0, 0]));
    line(
        &mut img,
        (m, h as i64 - m),
        (w as i64 - m, h as i64 - m),
        Rgb([0, 0, 0]),
    );
    let series = [
        (total, Rgb([150, 150, 150]), Rgb([0, 0, 0])),
        (cls, Rgb([245, 170, 170]), Rgb([210, 0, 0])),
        (reg, Rgb([170, 170, 245]), Rgb([0, 0, 210])),
    ];
    for (vals, faint, _) in &series {
        for i in 1..vals.len() {
            line(
                &mut img,
                (px(i - 1), py(vals[i - 1])),
                (px(i), py(vals[i])),
                *faint,
            );
        }
    }
    for (vals, _, bold) in &series {
        let s = smooth(vals, 0.9);
        for i in 1..s.len() {
            for o in 0..2 {
                line(
                    &mut img,
                    (px(i - 1), py(s[i - 1]) + o),
                    (px(i), py(s[i]) + o),
                    *bold,
                );
            }
        }
    }
    img
}

const CLASS_COLOURS: [[u8; 3]; 8] = [
    [230, 25, 75],
    [0, 130, 200],
    [255, 225, 25],
    [145, 30, 180],
    [245, 130, 48],
    [70, 240, 240],
    [240, 50, 230],
    [128, 128, 0],
];

/// A `cols × rows` grid of the first validation images, upscaled `zoom`×: ground truth in
/// green (2 px), predictions with score ≥ `min_score` in their class colour (1 px).
pub fn detections_png(
    ds: &Dataset,
    dets: &[Vec<Detection>],
    cols: usize,
    rows: usize,
    zoom: u32,
    min_score: f32,
) -> RgbImage {
    let s = ds.size as u32;
    let cell = s * zoom + 4;
    let mut img = RgbImage::from_pixel(cell * cols as u32, cell * rows as u32, Rgb([40, 40, 40]));
    for (k, (sample, d)) in ds.samples.iter().zip(dets).take(cols * rows).enumerate() {
        let (cx, cy) = ((k % cols) as u32 * cell + 2, (k / cols) as u32 * cell + 2);
        let n = (s * s) as usize;
        for y in 0..s * zoom {
            for x in 0..s * zoom {
                let i = ((y / zoom) * s + x / zoom) as usize;
                let c = |ch: usize| (sample.pixels[ch * n + i].clamp(0.0, 1.0) * 255.0) as u8;
                img.put_pixel(cx + x, cy + y, Rgb([c(0), c(1), c(2)]));
            }
        }
        let off = (cx as i64, cy as i64);
        for b in &sample.boxes {
            rect(&mut img, *b, zoom as f32, off, Rgb([0, 255, 0]));
            rect(
                &mut img,
                [
                    b[0] - 1.0 / zoom as f32,
                    b[1] - 1.0 / zoom as f32,
                    b[2] + 1.0 / zoom as f32,
                    b[3] + 1.0 / zoom as f32,
                ],
                zoom as f32,
                off,
                Rgb([0, 255, 0]),
            );
        }
        for det in d.iter().filter(|d| d.score >= min_score) {
            let c = CLASS_COLOURS[det.class as usize % CLASS_COLOURS.len()];
            rect(&mut img, det.bbox, zoom as f32, off, Rgb(c));
        }
    }
    img
}
