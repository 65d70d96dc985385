//! The transformer body: pre-norm ViT blocks over the token grid (DESIGN.md, Model step 3).

use super::layers::{LayerNorm, Linear, WeightSource, residual_dropout, softmax_last_dim};
use crate::config::BridgeConfig;
use crate::error::Result;
use crate::kernels::{self, Activation, activation_owned, matmul};
use crate::rng::Rng;
use candle_core::Tensor;

const LN_EPS: f64 = 1e-6;

#[derive(Clone)]
pub struct Attention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
}

impl Attention {
    /// Token rows `x` `[B*T, W]` of `tokens` per sample; `residual + attn(x)` where a
    /// residual is given, else `attn(x)`.
    fn forward(&self, x: &Tensor, tokens: usize, residual: Option<&Tensor>) -> Result<Tensor> {
        let (rows, w) = x.dims2()?;
        let (b, t, d) = (rows / tokens, tokens, w / self.heads);
        // qkv rows read as [B, T, 3, heads, d]; q, k, v in that order.
        let qkv = self.qkv.forward(x)?;
        if let Some(out) = kernels::attention::attention(&qkv, t, self.heads)? {
            return self.proj.forward_onto(&out, residual);
        }
        let qkv = qkv
            .reshape((b, t, 3, self.heads, d))?
            .permute((2, 0, 3, 1, 4))?;
        let q = qkv.get(0)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let bh = b * self.heads;
        let (q, k, v) = (
            q.reshape((bh, t, d))?,
            k.reshape((bh, t, d))?,
            v.reshape((bh, t, d))?,
        );
        let scores = (matmul(&q, &k.t()?)? * (1.0 / (d as f64).sqrt()))?;
        let out = matmul(&softmax_last_dim(&scores)?, &v)?.reshape((b, self.heads, t, d))?;
        self.proj
            .forward_onto(&out.transpose(1, 2)?.reshape((rows, w))?, residual)
    }
}

#[derive(Clone)]
pub struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    /// `residual + mlp(x)` where a residual is given, else `mlp(x)`.
    fn forward(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        // The hidden layer is this call's own: GELU may overwrite it in inference.
        let hidden = activation_owned(self.fc1.forward(x)?, Activation::Gelu)?;
        self.fc2.forward_onto(&hidden, residual)
    }
}

#[derive(Clone)]
pub struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn load(w: &dyn WeightSource, p: &str, cfg: &BridgeConfig) -> Result<Self> {
        Ok(Block {
            norm1: LayerNorm::load(w, &format!("{p}.norm1"), LN_EPS)?,
            attn: Attention {
                qkv: Linear::load(w, &format!("{p}.attn.qkv"))?,
                proj: Linear::load(w, &format!("{p}.attn.proj"))?,
                heads: cfg.heads,
            },
            norm2: LayerNorm::load(w, &format!("{p}.norm2"), LN_EPS)?,
            mlp: Mlp {
                fc1: Linear::load(w, &format!("{p}.mlp.fc1"))?,
                fc2: Linear::load(w, &format!("{p}.mlp.fc2"))?,
            },
        })
    }

    /// `x + drop(attn(norm1(x)))`, then `x + drop(mlp(norm2(x)))`, on token rows
    /// `[B*T, W]` of `tokens` per sample.
    fn forward(
        &self,
        x: &Tensor,
        tokens: usize,
        p: f32,
        mut rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        if rng.is_none() || p <= 0.0 {
            // No dropout: the residual adds go into the output projections.
            let x = self
                .attn
                .forward(&self.norm1.forward(x)?, tokens, Some(x))?;
            return self.mlp.forward(&self.norm2.forward(&x)?, Some(&x));
        }
        let h = self.attn.forward(&self.norm1.forward(x)?, tokens, None)?;
        let x = residual_dropout(x, &h, p, rng.as_deref_mut())?;
        let h = self.mlp.forward(&self.norm2.forward(&x)?, None)?;
        residual_dropout(&x, &h, p, rng)
    }
}

#[derive(Clone)]
pub struct Backbone {
    pos_embed: Tensor,
    blocks: Vec<Block>,
    norm: LayerNorm,
    dropout: f32,
}

impl Backbone {
    pub fn load(w: &dyn WeightSource, cfg: &BridgeConfig) -> Result<Self> {
        let blocks = (0..cfg.depth)
            .map(|i| Block::load(w, &format!("backbone.blocks.{i}"), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Backbone {
            pos_embed: w.get("backbone.pos_embed")?,
            blocks,
            norm: LayerNorm::load(w, "backbone.norm", LN_EPS)?,
            dropout: cfg.dropout,
        })
    }

    /// `[B, T, width]` tokens through the blocks, out as token rows `[B*T, width]`;
    /// `rng` is `Some` in training only. The blocks work on rows: each reshape in the
    /// graph costs training a zero-filled gradient buffer and an add (candle's backward).
    pub fn forward(&self, tokens: &Tensor, mut rng: Option<&mut Rng>) -> Result<Tensor> {
        let (b, t, w) = tokens.dims3()?;
        let mut x = tokens.broadcast_add(&self.pos_embed)?.reshape((b * t, w))?;
        for block in &self.blocks {
            x = block.forward(&x, t, self.dropout, rng.as_deref_mut())?;
        }
        self.norm.forward(&x)
    }
}
