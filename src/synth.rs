//! A synthetic data set with learnable structure, for demos and tests: spatially smooth
//! random latents, and targets from a frozen random teacher (a per-token MLP over each
//! grid cell's latent patch plus a global context term plus a position code). The teacher
//! depends on the seed only, not on the latent size, and its position code is a smooth
//! function of where a token sits in the image, so data of several sizes (aspect
//! buckets) teaches one mapping.

use crate::config::BridgeConfig;
use crate::error::{Error, Result};
use crate::npy;
use crate::rng::Rng;
use candle_core::{Device, Tensor};
use std::io::Write;
use std::path::Path;

const HIDDEN: usize = 128;

fn gaussian(shape: &[usize], std: f32, rng: &mut Rng) -> Result<Tensor> {
    let n = shape.iter().product();
    Ok(Tensor::from_vec(
        (0..n).map(|_| rng.normal() * std).collect::<Vec<f32>>(),
        shape,
        &Device::Cpu,
    )?)
}

/// One smooth `[height, width]` field: a coarse random grid, bilinearly upsampled, plus a
/// little noise.
fn smooth_field((height, width): (usize, usize), rng: &mut Rng, out: &mut Vec<f32>) {
    let coarse = 5;
    let knots: Vec<f32> = (0..coarse * coarse).map(|_| rng.normal()).collect();
    for y in 0..height {
        for x in 0..width {
            let fy = y as f32 / (height - 1).max(1) as f32 * (coarse - 1) as f32;
            let fx = x as f32 / (width - 1).max(1) as f32 * (coarse - 1) as f32;
            let (y0, x0) = ((fy as usize).min(coarse - 2), (fx as usize).min(coarse - 2));
            let (ty, tx) = (fy - y0 as f32, fx - x0 as f32);
            let k = |yy: usize, xx: usize| knots[yy * coarse + xx];
            let v = (1.0 - ty) * ((1.0 - tx) * k(y0, x0) + tx * k(y0, x0 + 1))
                + ty * ((1.0 - tx) * k(y0 + 1, x0) + tx * k(y0 + 1, x0 + 1));
            out.push(v + 0.1 * rng.normal());
        }
    }
}

struct Teacher {
    w1: Tensor,
    w2: Tensor,
    w3: Tensor,
    /// Frequencies `[2, D]` and phases `[D]` of the position code.
    freq: Vec<f32>,
    phase: Vec<f32>,
}

impl Teacher {
    /// The position code `[1, h*w, D]` of the token grid `(h, w)`: `0.5 sin(f_y y + f_x x +
    /// phase)` at each cell's centre, `(y, x)` in `[0, 1]`.
    fn position(&self, (h, w): (usize, usize)) -> Result<Tensor> {
        let d = self.phase.len();
        let mut code = Vec::with_capacity(h * w * d);
        for r in 0..h {
            for c in 0..w {
                let (y, x) = ((r as f32 + 0.5) / h as f32, (c as f32 + 0.5) / w as f32);
                for k in 0..d {
                    code.push(
                        0.5 * (self.freq[k] * y + self.freq[d + k] * x + self.phase[k]).sin(),
                    );
                }
            }
        }
        Ok(Tensor::from_vec(code, (1, h * w, d), &Device::Cpu)?)
    }
}

/// Writes an `.npy` of float16 rows produced chunk by chunk (atomically: temp + rename).
struct NpyF16Writer {
    tmp: std::path::PathBuf,
    path: std::path::PathBuf,
    out: std::io::BufWriter<std::fs::File>,
}

impl NpyF16Writer {
    fn create(path: &Path, shape: &[usize]) -> Result<Self> {
        let tmp = path.with_extension("npy.partial");
        let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let mut out = std::io::BufWriter::new(file);
        out.write_all(&npy::header_bytes("<f2", shape))
            .map_err(|e| Error::io(&tmp, e))?;
        Ok(NpyF16Writer {
            tmp,
            path: path.to_path_buf(),
            out,
        })
    }
    fn write(&mut self, values: &[f32]) -> Result<()> {
        let bytes: Vec<u8> = values
            .iter()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect();
        self.out
            .write_all(&bytes)
            .map_err(|e| Error::io(&self.tmp, e))
    }
    fn finish(self) -> Result<()> {
        let file = self
            .out
            .into_inner()
            .map_err(|e| Error::io(&self.tmp, e.into_error()))?;
        file.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        std::fs::rename(&self.tmp, &self.path).map_err(|e| Error::io(&self.path, e))
    }
}

/// Writes `out/latents.npy` `[n, in_ch, H, W]` for the latent size `(H, W)` and
/// `out/targets.npy` `[n, h*w, D]` on its token grid, both float16.
pub fn make(
    out: &Path,
    n: usize,
    config: &BridgeConfig,
    (height, width): (usize, usize),
    seed: u64,
) -> Result<()> {
    config.validate()?;
    if n == 0 {
        return Err(Error::invalid("synth: --n must be > 0"));
    }
    let (gh, gw) = config.token_grid(height as i64, width as i64)?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let (c, d, t) = (config.in_ch, config.target_dim, gh * gw);
    let f = config.side_multiple();
    let feat = c * 4; // each grid cell's patch, average-pooled to 2x2 per channel
    let mut trng = Rng::new(0x07ea_c4e5 ^ seed.rotate_left(17));
    let teacher = Teacher {
        w1: gaussian(&[feat, HIDDEN], 1.0 / (feat as f32).sqrt(), &mut trng)?,
        w2: gaussian(&[HIDDEN, d], 1.0 / (HIDDEN as f32).sqrt(), &mut trng)?,
        w3: gaussian(&[HIDDEN, d], 1.0 / (HIDDEN as f32).sqrt(), &mut trng)?,
        freq: (0..2 * d).map(|_| 6.0 * trng.normal()).collect(),
        phase: (0..d).map(|_| 6.3 * trng.uniform()).collect(),
    };
    let pos = teacher.position((gh, gw))?;
    let mut lat_out = NpyF16Writer::create(&out.join("latents.npy"), &[n, c, height, width])?;
    let mut tgt_out = NpyF16Writer::create(&out.join("targets.npy"), &[n, t, d])?;
    // The latents' stream depends on the size too: two buckets of one seed differ.
    let mut rng = Rng::new(seed ^ ((height as u64) << 32 | width as u64).wrapping_mul(0x9e37_79b9));
    let chunk = 256;
    for start in (0..n).step_by(chunk) {
        let b = chunk.min(n - start);
        let mut lat = Vec::with_capacity(b * c * height * width);
        for _ in 0..b * c {
            smooth_field((height, width), &mut rng, &mut lat);
        }
        // Patch features [b, gh, gw, c, 2, 2] from the latents [b, c, gh, f, gw, f].
        let x = Tensor::from_vec(lat.clone(), (b, c, height, width), &Device::Cpu)?;
        let h2 = (f / 2).max(1);
        let pooled = x
            .reshape(&[b, c, gh, 2, h2, gw, 2, h2][..])?
            .mean((4, 7))?
            .permute([0usize, 2, 4, 1, 3, 5].as_slice())?
            .contiguous()?
            .reshape((b * t, feat))?;
        let h = pooled.matmul(&teacher.w1)?.gelu_erf()?; // [b*t, H]
        let local = h.matmul(&teacher.w2)?.reshape((b, t, d))?;
        let context = h
            .reshape((b, t, HIDDEN))?
            .mean_keepdim(1)?
            .squeeze(1)?
            .matmul(&teacher.w3)?;
        let y = local
            .broadcast_add(&context.unsqueeze(1)?)?
            .broadcast_add(&pos)?;
        lat_out.write(&lat)?;
        tgt_out.write(&y.flatten_all()?.to_vec1::<f32>()?)?;
    }
    lat_out.finish()?;
    tgt_out.finish()
}
