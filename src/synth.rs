//! A synthetic data set with learnable structure, for demos and tests: spatially smooth
//! random latents, and targets from a frozen random teacher (a per-token MLP over each
//! grid cell's latent patch plus a global context term plus a position code).

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

/// One smooth `[side, side]` field: a coarse random grid, bilinearly upsampled, plus a
/// little noise.
fn smooth_field(side: usize, rng: &mut Rng, out: &mut Vec<f32>) {
    let coarse = 5;
    let knots: Vec<f32> = (0..coarse * coarse).map(|_| rng.normal()).collect();
    for y in 0..side {
        for x in 0..side {
            let fy = y as f32 / (side - 1).max(1) as f32 * (coarse - 1) as f32;
            let fx = x as f32 / (side - 1).max(1) as f32 * (coarse - 1) as f32;
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
    pos: Tensor,
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

/// Writes `out/latents.npy` `[n, in_ch, L, L]` and `out/targets.npy` `[n, T, D]`, both
/// float16, in the shapes `config` asks for.
pub fn make(out: &Path, n: usize, config: &BridgeConfig, seed: u64) -> Result<()> {
    config.validate()?;
    if n == 0 {
        return Err(Error::invalid("synth: --n must be > 0"));
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let (c, side, g, d, t) = (
        config.in_ch,
        config.latent_size,
        config.grid,
        config.target_dim,
        config.tokens(),
    );
    let f = side / g;
    let feat = c * 4; // each grid cell's patch, average-pooled to 2x2 per channel
    let mut trng = Rng::new(0x07ea_c4e5 ^ seed.rotate_left(17));
    let teacher = Teacher {
        w1: gaussian(&[feat, HIDDEN], 1.0 / (feat as f32).sqrt(), &mut trng)?,
        w2: gaussian(&[HIDDEN, d], 1.0 / (HIDDEN as f32).sqrt(), &mut trng)?,
        w3: gaussian(&[HIDDEN, d], 1.0 / (HIDDEN as f32).sqrt(), &mut trng)?,
        pos: gaussian(&[1, t, d], 0.5, &mut trng)?,
    };
    let mut lat_out = NpyF16Writer::create(&out.join("latents.npy"), &[n, c, side, side])?;
    let mut tgt_out = NpyF16Writer::create(&out.join("targets.npy"), &[n, t, d])?;
    let mut rng = Rng::new(seed);
    let chunk = 256;
    for start in (0..n).step_by(chunk) {
        let b = chunk.min(n - start);
        let mut lat = Vec::with_capacity(b * c * side * side);
        for _ in 0..b * c {
            smooth_field(side, &mut rng, &mut lat);
        }
        // Patch features [b, g, g, c, 2, 2] from the latents [b, c, g, f, g, f].
        let x = Tensor::from_vec(lat.clone(), (b, c, side, side), &Device::Cpu)?;
        let h2 = f / 2;
        let pooled = x
            .reshape(&[b, c, g, 2, h2.max(1), g, 2, h2.max(1)][..])?
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
            .broadcast_add(&teacher.pos)?;
        lat_out.write(&lat)?;
        tgt_out.write(&y.flatten_all()?.to_vec1::<f32>()?)?;
    }
    lat_out.finish()?;
    tgt_out.finish()
}
