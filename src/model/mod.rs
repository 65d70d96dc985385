//! The bridge network: latents `[B, C, H, W]` -> adapter -> body -> head -> tokens
//! `[B, h*w, D]` on the grid `(H, W) / 2^adapter_depth`.

pub mod adapter;
pub mod backbone;
pub mod head;
pub mod layers;
pub mod position;

use crate::config::BridgeConfig;
use crate::error::Result;
use crate::rng::Rng;
use candle_core::Tensor;
pub use layers::WeightSource;

#[derive(Clone)]
pub struct BridgeModel {
    adapter: adapter::Adapter,
    backbone: backbone::Backbone,
    head: head::Head,
}

impl BridgeModel {
    /// Builds the model over the given weights (shared, not copied: a model built over
    /// variables trains them).
    pub fn load(w: &dyn WeightSource, cfg: &BridgeConfig) -> Result<Self> {
        Ok(BridgeModel {
            adapter: adapter::Adapter::load(w, cfg)?,
            backbone: backbone::Backbone::load(w, cfg)?,
            head: head::Head::load(w)?,
        })
    }

    /// `rng` is `Some` in training (dropout on), `None` in evaluation.
    /// Latents `[B, C, H, W]` to predicted tokens `[B, h*w, target_dim]` on the token
    /// grid `(H, W) / 2^adapter_depth`.
    pub fn forward(&self, latents: &Tensor, rng: Option<&mut Rng>) -> Result<Tensor> {
        let (tokens, grid) = self.adapter.forward(latents)?;
        let (b, t, _) = tokens.dims3()?;
        let rows = self.backbone.forward(&tokens, grid, rng)?;
        Ok(self.head.forward(&rows)?.reshape((b, t, ()))?)
    }
}
