//! The bridge network: latents `[B, C, H, W]` -> adapter -> body -> head -> tokens
//! `[B, h*w, D]` on the grid `(H, W) / 2^adapter_depth`.

pub mod adapter;
pub mod backbone;
pub mod head;
pub mod layers;
pub mod position;
pub mod weights;

use crate::config::BridgeConfig;
use crate::error::Result;
use crate::rng::Rng;
use candle_core::Tensor;
pub use weights::{ParamSpec, WeightSource, Weights, param_count, param_specs};

#[derive(Clone)]
pub struct BridgeModel {
    adapter: adapter::Adapter,
    backbone: backbone::Backbone,
    head: head::Head,
}

impl BridgeModel {
    /// Builds the model over the given weights (shared, not copied: a model built over
    /// variables trains them). Every tensor name and shape of the model is written in the
    /// layers' `load`s, which this calls in DESIGN.md's order.
    pub fn load(source: &dyn WeightSource, cfg: &BridgeConfig) -> Result<Self> {
        let w = Weights::new(source);
        Ok(BridgeModel {
            adapter: adapter::Adapter::load(w.pp("adapter"), cfg)?,
            backbone: backbone::Backbone::load(w.pp("backbone"), cfg)?,
            head: head::Head::load(w.pp("head"), cfg)?,
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
