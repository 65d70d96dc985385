//! The latent adapter: a convolutional stem that turns `[B, C, L, L]` latents into
//! `[B, grid*grid, width]` tokens (DESIGN.md, Model step 2).

use super::layers::{Conv3x3, GroupNorm, Linear, Patchify, WeightSource};
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
    fn load(w: &dyn WeightSource, p: &str) -> Result<Self> {
        Ok(ResBlock {
            norm1: GroupNorm::load(w, &format!("{p}.norm1"), GROUPS, GN_EPS)?,
            conv1: Conv3x3::load(w, &format!("{p}.conv1"))?,
            norm2: GroupNorm::load(w, &format!("{p}.norm2"), GROUPS, GN_EPS)?,
            conv2: Conv3x3::load(w, &format!("{p}.conv2"))?,
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
    pub fn load(w: &dyn WeightSource, cfg: &BridgeConfig) -> Result<Self> {
        let stages = (0..cfg.adapter_depth)
            .map(|s| {
                let p = format!("adapter.stages.{s}");
                Ok(Stage {
                    down: Patchify::load(w, &format!("{p}.down"))?,
                    res: ResBlock::load(w, &format!("{p}.res"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Adapter {
            stem: Conv3x3::load(w, "adapter.stem")?,
            stages,
            norm_out: GroupNorm::load(w, "adapter.norm_out", GROUPS, GN_EPS)?,
            proj: Linear::load(w, "adapter.proj")?,
            latent_shift: cfg.latent_shift as f64,
            latent_scale: cfg.latent_scale as f64,
        })
    }

    /// `[B, C, L, L]` latents (NCHW, as trainers hold them) to `[B, grid*grid, width]`.
    /// Latents `[B, C, H, W]` to tokens `[B, h*w, width]` on the token grid `(h, w)`
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
