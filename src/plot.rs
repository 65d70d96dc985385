//! A PNG of the training curves from `metrics.jsonl`: loss on the left, cosine and
//! retrieval@1 on the right. Drawn by hand (lines, an 8x8 bitmap font) so that plotting
//! needs no system fonts or graphics libraries.

use crate::error::{Error, Result};
use font8x8::UnicodeFonts;
use std::path::Path;

const W: usize = 1000;
const H: usize = 470;
type Rgb = [u8; 3];
const BLACK: Rgb = [30, 30, 30];
const GREY: Rgb = [215, 215, 215];
const COLORS: [Rgb; 8] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
];

struct Canvas {
    px: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Canvas {
            px: vec![255; W * H * 3],
        }
    }
    fn dot(&mut self, x: i64, y: i64, c: Rgb) {
        if (0..W as i64).contains(&x) && (0..H as i64).contains(&y) {
            let i = (y as usize * W + x as usize) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }
    fn square(&mut self, x: i64, y: i64, r: i64, c: Rgb) {
        for dy in -r..=r {
            for dx in -r..=r {
                self.dot(x + dx, y + dy, c);
            }
        }
    }
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), r: i64, c: Rgb) {
        let steps = ((x1 - x0).abs().max((y1 - y0).abs()).ceil() as i64).max(1);
        for s in 0..=steps {
            let t = s as f64 / steps as f64;
            self.square(
                (x0 + t * (x1 - x0)).round() as i64,
                (y0 + t * (y1 - y0)).round() as i64,
                r,
                c,
            );
        }
    }
    fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: Rgb) {
        for (k, ch) in s.chars().enumerate() {
            let Some(glyph) = font8x8::BASIC_FONTS.get(ch) else {
                continue;
            };
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits >> col & 1 == 1 {
                        for sy in 0..scale {
                            for sx in 0..scale {
                                let px = x + (k as i64 * 8 + col) * scale + sx;
                                self.dot(px, y + row as i64 * scale + sy, c);
                            }
                        }
                    }
                }
            }
        }
    }
}

struct Series {
    name: String,
    points: Vec<(f64, f64)>,
}

impl Series {
    fn new(name: impl Into<String>) -> Self {
        Series {
            name: name.into(),
            points: Vec::new(),
        }
    }
}

/// One panel at `left` with title, axes, ticks, series and a legend.
fn panel(
    cv: &mut Canvas,
    left: i64,
    title: &str,
    series: &[Series],
    y_floor: Option<f64>,
    first_color: usize,
) {
    let (x0, y0, pw, ph) = (left + 70, 50i64, 400i64, 320i64);
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .collect();
    if all.is_empty() {
        return;
    }
    let xmax = all.iter().map(|p| p.0).fold(1.0, f64::max);
    let mut ymin = all.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let mut ymax = all.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    if let Some(f) = y_floor {
        ymin = ymin.min(f);
    }
    if ymax - ymin < 1e-9 {
        ymax = ymin + 1.0;
    }
    let pad = 0.05 * (ymax - ymin);
    let (ymin, ymax) = (ymin - pad, ymax + pad);
    let sx = |x: f64| x0 as f64 + x / xmax * pw as f64;
    let sy = |y: f64| (y0 + ph) as f64 - (y - ymin) / (ymax - ymin) * ph as f64;
    cv.text(x0, 16, title, 2, BLACK);
    for i in 0..=4 {
        let v = ymin + (ymax - ymin) * i as f64 / 4.0;
        let y = sy(v);
        cv.line((x0 as f64, y), ((x0 + pw) as f64, y), 0, GREY);
        cv.text(left + 4, y as i64 - 4, &format!("{v:7.3}"), 1, BLACK);
    }
    let xstep = (xmax / 10.0).ceil().max(1.0);
    let mut e = 0.0;
    while e <= xmax {
        cv.text(sx(e) as i64 - 4, y0 + ph + 8, &format!("{e}"), 1, BLACK);
        e += xstep;
    }
    cv.text(x0 + pw / 2 - 20, y0 + ph + 24, "epoch", 1, BLACK);
    cv.line(
        (x0 as f64, y0 as f64),
        (x0 as f64, (y0 + ph) as f64),
        0,
        BLACK,
    );
    cv.line(
        (x0 as f64, (y0 + ph) as f64),
        ((x0 + pw) as f64, (y0 + ph) as f64),
        0,
        BLACK,
    );
    for (k, s) in series.iter().enumerate() {
        let c = COLORS[(first_color + k) % COLORS.len()];
        for w in s.points.windows(2) {
            cv.line((sx(w[0].0), sy(w[0].1)), (sx(w[1].0), sy(w[1].1)), 1, c);
        }
        for p in &s.points {
            cv.square(sx(p.0) as i64, sy(p.1) as i64, 3, c);
        }
        // Legend: three entries a row.
        let ly = y0 + ph + 44 + (k / 3) as i64 * 14;
        let lx = x0 + (k % 3) as i64 * 140;
        cv.square(lx + 4, ly + 4, 4, c);
        cv.text(lx + 14, ly, &s.name, 1, BLACK);
    }
}

/// Reads `metrics.jsonl` and writes the plot to `png` (atomically). With several data
/// folders (aspect buckets) the validation curves are drawn per folder, labelled by
/// latent size, beside the pooled loss and cosine.
pub fn plot_metrics(jsonl: &Path, png: &Path) -> Result<()> {
    let text = std::fs::read_to_string(jsonl).map_err(|e| Error::io(jsonl, e))?;
    let mut train = Series::new("train loss");
    let mut loss = vec![Series::new("val loss")];
    let mut quality = vec![Series::new("val cosine"), Series::new("val R@1")];
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::invalid(format!("{}: {e}", jsonl.display())))?;
        let epoch = v["epoch"].as_f64().unwrap_or(0.0);
        let ema = v["val_ema"].is_object();
        let (val, folders) = if ema {
            (&v["val_ema"], &v["val_ema_folders"])
        } else {
            (&v["val"], &v["val_folders"])
        };
        if let Some(l) = v["train_loss"].as_f64() {
            train.points.push((epoch, l));
        }
        let push = |s: &mut Series, m: &serde_json::Value, key: &str| {
            if let Some(x) = m[key].as_f64() {
                s.points.push((epoch, x));
            }
        };
        push(&mut loss[0], val, "loss");
        push(&mut quality[0], val, "cosine");
        push(&mut quality[1], val, "retrieval@1");
        for (i, f) in folders.as_array().into_iter().flatten().enumerate() {
            let size = &f["latent_size"];
            let label = format!("{}x{}", size[0], size[1]);
            if loss.len() <= i + 1 {
                loss.push(Series::new(format!("val loss {label}")));
                quality.push(Series::new(format!("cos {label}")));
                quality.push(Series::new(format!("R@1 {label}")));
            }
            push(&mut loss[i + 1], f, "loss");
            push(&mut quality[2 + 2 * i], f, "cosine");
            push(&mut quality[3 + 2 * i], f, "retrieval@1");
        }
    }
    // The pooled record has no retrieval: drop empty series.
    quality.retain(|s| !s.points.is_empty());
    let mut left = vec![train];
    left.extend(loss);
    let mut cv = Canvas::new();
    let first_right = left.len();
    panel(&mut cv, 0, "loss", &left, None, 0);
    panel(
        &mut cv,
        500,
        "validation cosine / R@1",
        &quality,
        Some(0.0),
        first_right,
    );
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, W as u32, H as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc
            .write_header()
            .map_err(|e| Error::internal(format!("png: {e}")))?;
        writer
            .write_image_data(&cv.px)
            .map_err(|e| Error::internal(format!("png: {e}")))?;
    }
    crate::checkpoint::write_atomic(png, &bytes)
}
