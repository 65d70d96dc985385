//! The transformer body: pre-norm ViT blocks over the token grid (DESIGN.md, Model step 3).

use super::layers::{LayerNorm, Linear};
use super::position;
use super::weights::Weights;
use crate::config::BridgeConfig;
use crate::error::Result;
use crate::kernels::{self, Activation, activation_owned};
use crate::rng::Rng;
use candle_core::Tensor;

const LN_EPS: f32 = 1e-6;

#[derive(Clone)]
pub struct Attention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
}

impl Attention {
    /// Token rows `x` `[B*T, W]` of `tokens` per sample; `residual + attn(x)` where a
    /// residual is given, else `attn(x)`, with `attn(x) = proj(attention(qkv(x)))`.
    fn forward(&self, x: &Tensor, tokens: usize, residual: Option<&Tensor>) -> Result<Tensor> {
        let heads = kernels::attention::attention(&self.qkv.forward(x)?, tokens, self.heads)?;
        self.proj.forward_onto(&heads, residual)
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
    fn load(w: Weights, cfg: &BridgeConfig) -> Result<Self> {
        let (width, hidden) = (cfg.width, cfg.mlp_hidden());
        Ok(Block {
            norm1: LayerNorm::load(w.pp("norm1"), width, LN_EPS)?,
            attn: Attention {
                qkv: Linear::load(w.pp("attn.qkv"), width, 3 * width)?,
                proj: Linear::load(w.pp("attn.proj"), width, width)?,
                heads: cfg.heads,
            },
            norm2: LayerNorm::load(w.pp("norm2"), width, LN_EPS)?,
            mlp: Mlp {
                fc1: Linear::load(w.pp("mlp.fc1"), width, hidden)?,
                fc2: Linear::load(w.pp("mlp.fc2"), hidden, width)?,
            },
        })
    }

    /// `x + drop(attn(norm1(x)))`, then `x + drop(mlp(norm2(x)))`, on token rows
    /// `[B*T, W]` of `tokens` per sample.
    fn forward(&self, x: &Tensor, tokens: usize, p: f32, rng: Option<&mut Rng>) -> Result<Tensor> {
        let Some(rng) = rng.filter(|_| p > 0.0) else {
            // No dropout: the residual adds go into the output projections.
            let x = self
                .attn
                .forward(&self.norm1.forward(x)?, tokens, Some(x))?;
            return self.mlp.forward(&self.norm2.forward(&x)?, Some(&x));
        };
        let h = self.attn.forward(&self.norm1.forward(x)?, tokens, None)?;
        let x = kernels::dropout::residual_dropout(x, &h, p, rng)?;
        let h = self.mlp.forward(&self.norm2.forward(&x)?, None)?;
        kernels::dropout::residual_dropout(&x, &h, p, rng)
    }
}

#[derive(Clone)]
pub struct Backbone {
    pos_embed: Tensor,
    /// The grid `pos_embed` is stored for.
    grid: usize,
    blocks: Vec<Block>,
    norm: LayerNorm,
    dropout: f32,
}

impl Backbone {
    /// `w` is the source under `backbone`; `pos_embed` loads first, then the blocks and
    /// the final norm.
    pub fn load(w: Weights, cfg: &BridgeConfig) -> Result<Self> {
        let pos_embed = w.get("pos_embed", &[1, cfg.tokens(), cfg.width])?;
        let blocks = (0..cfg.depth)
            .map(|i| Block::load(w.pp("blocks").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Backbone {
            pos_embed,
            grid: cfg.grid,
            blocks,
            norm: LayerNorm::load(w.pp("norm"), cfg.width, LN_EPS)?,
            dropout: cfg.dropout,
        })
    }

    /// `[B, h*w, width]` tokens on the grid `grid` through the blocks, out as token rows
    /// `[B*h*w, width]`; `rng` is `Some` in training only. The blocks work on rows: each
    /// reshape in the graph costs training a zero-filled gradient buffer and an add
    /// (candle's backward).
    pub fn forward(
        &self,
        tokens: &Tensor,
        grid: (usize, usize),
        mut rng: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let (b, t, w) = tokens.dims3()?;
        let pos = position::on_grid(&self.pos_embed, self.grid, grid)?;
        let mut x = tokens.broadcast_add(&pos)?.reshape((b * t, w))?;
        for block in &self.blocks {
            x = block.forward(&x, t, self.dropout, rng.as_deref_mut())?;
        }
        self.norm.forward(&x)
    }
}
