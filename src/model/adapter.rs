//! The latent adapter: a convolutional stem that turns `[B, C, L, L]` latents into
//! `[B, grid*grid, width]` tokens (DESIGN.md, Model step 2).

use super::layers::{Conv3x3, GroupNorm, Linear, Patchify};
use super::weights::Weights;
use crate::config::{BridgeConfig, GROUPS};
use crate::error::Result;
use candle_core::Tensor;

const GN_EPS: f32 = 1e-5;

/// `x + conv2(silu(norm2(conv1(silu(norm1(x))))))`
#[derive(Clone)]
pub struct ResBlock {
    norm1: GroupNorm,
    conv1: Conv3x3,
    norm2: GroupNorm,
    conv2: Conv3x3,
}

impl ResBlock {
    fn load(w: Weights, c: usize) -> Result<Self> {
        Ok(ResBlock {
            norm1: GroupNorm::load(w.pp("norm1"), c, GROUPS, GN_EPS)?,
            conv1: Conv3x3::load(w.pp("conv1"), c, c)?,
            norm2: GroupNorm::load(w.pp("norm2"), c, GROUPS, GN_EPS)?,
            conv2: Conv3x3::load(w.pp("conv2"), c, c)?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        Ok((x + h)?)
    }
}

#[derive(Clone)]
pub struct Stage {
    down: Patchify,
    res: ResBlock,
}

#[derive(Clone)]
pub struct Adapter {
    stem: Conv3x3,
    stages: Vec<Stage>,
    norm_out: GroupNorm,
    proj: Linear,
    latent_shift: f64,
    latent_scale: f64,
}

impl Adapter {
    /// `w` is the source under `adapter`. The fields load in DESIGN.md's order: stem,
    /// stages, norm_out, proj.
    pub fn load(w: Weights, cfg: &BridgeConfig) -> Result<Self> {
        let (mid, out) = (cfg.adapter_mid_channels, cfg.adapter_out_channels);
        let stem = Conv3x3::load(w.pp("stem"), cfg.in_ch, mid)?;
        let stages = cfg
            .stage_channels()
            .into_iter()
            .enumerate()
            .map(|(s, (c_in, c_out))| {
                let w = w.pp("stages").pp(s);
                Ok(Stage {
                    down: Patchify::load(w.pp("down"), c_in, c_out)?,
                    res: ResBlock::load(w.pp("res"), c_out)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Adapter {
            stem,
            stages,
            norm_out: GroupNorm::load(w.pp("norm_out"), out, GROUPS, GN_EPS)?,
            proj: Linear::load(w.pp("proj"), out, cfg.width)?,
            latent_shift: cfg.latent_shift as f64,
            latent_scale: cfg.latent_scale as f64,
        })
    }

    /// Latents `[B, C, H, W]` (NCHW, as trainers hold them) to tokens `[B, h*w, width]` on the token grid `(h, w)`
    /// (row-major), which it also returns.
    pub fn forward(&self, latents: &Tensor) -> Result<(Tensor, (usize, usize))> {
        let x = latents.affine(self.latent_scale, -self.latent_shift * self.latent_scale)?;
        let mut x = self.stem.forward(&x.permute((0, 2, 3, 1))?)?;
        for stage in &self.stages {
            x = stage.res.forward(&stage.down.forward(&x)?)?;
        }
        let x = self.norm_out.forward_silu(&x)?;
        let (b, h, w, c) = x.dims4()?;
        Ok((self.proj.forward(&x.reshape((b, h * w, c))?)?, (h, w)))
    }
}
