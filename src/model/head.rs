//! The token head: one linear map from the body's width to DINOv2's feature size.

use super::layers::Linear;
use super::weights::Weights;
use crate::config::BridgeConfig;
use crate::error::Result;
use candle_core::Tensor;

#[derive(Clone)]
pub struct Head {
    proj: Linear,
}

impl Head {
    /// `w` is the source under `head`.
    pub fn load(w: Weights, cfg: &BridgeConfig) -> Result<Self> {
        Ok(Head {
            proj: Linear::load(w, cfg.width, cfg.target_dim)?,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj.forward(x)
    }
}
