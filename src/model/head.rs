//! The token head: one linear map from the body's width to DINOv2's feature size.

use super::layers::{Linear, WeightSource};
use crate::error::Result;
use candle_core::Tensor;

#[derive(Clone)]
pub struct Head {
    proj: Linear,
}

impl Head {
    pub fn load(w: &dyn WeightSource) -> Result<Self> {
        Ok(Head {
            proj: Linear::load(w, "head")?,
        })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj.forward(x)
    }
}
