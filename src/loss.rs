//! The alignment loss of DESIGN.md and the pooling of a caller's token grid onto the
//! bridge's. Written with differentiable ops; gradients come from candle's autograd.

use crate::error::{Error, Result};
use candle_core::{D, Tensor};

/// Weights of the three loss terms.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossWeights {
    pub cos: f32,
    pub norm: f32,
    pub raw: f32,
}

impl Default for LossWeights {
    /// The seed's composite loss.
    fn default() -> Self {
        LossWeights {
            cos: 1.0,
            norm: 0.25,
            raw: 0.05,
        }
    }
}

impl LossWeights {
    /// REPA's own loss: negative cosine only.
    pub const REPA: LossWeights = LossWeights {
        cos: 1.0,
        norm: 0.0,
        raw: 0.0,
    };

    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("w_cos", self.cos),
            ("w_norm", self.norm),
            ("w_raw", self.raw),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(Error::invalid(format!(
                    "{name} = {v}: must be finite and >= 0"
                )));
            }
        }
        Ok(())
    }
}

/// `max(|x|, eps)` over the last dimension, kept. Clamping the squared norm before the
/// square root gives the same value and keeps the gradient finite at zero.
fn clamped_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(x.sqr()?
        .sum_keepdim(D::Minus1)?
        .maximum(eps * eps)?
        .sqrt()?)
}

/// Per-token cosine `[.., T]` between `pred` and `target` (`[.., T, D]`).
pub fn token_cosine(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    let dot = (pred * target)?.sum_keepdim(D::Minus1)?;
    let denom = (clamped_norm(pred, 1e-8)? * clamped_norm(target, 1e-8)?)?;
    Ok((dot / denom)?.squeeze(D::Minus1)?)
}

/// `w_cos * mean(1 - cos) + w_norm * mean((n(p) - n(t))^2) + w_raw * mean((p - t)^2)`,
/// a scalar. `target` is treated as a constant.
pub fn alignment_loss(pred: &Tensor, target: &Tensor, w: &LossWeights) -> Result<Tensor> {
    if pred.dims() != target.dims() {
        return Err(Error::shape(format!(
            "loss: pred {:?} and target {:?} differ in shape",
            pred.dims(),
            target.dims()
        )));
    }
    let target = target.detach();
    let mut loss = Tensor::zeros((), pred.dtype(), pred.device())?;
    if w.cos != 0.0 {
        let one_minus_cos = token_cosine(pred, &target)?.affine(-1.0, 1.0)?;
        loss = (loss + (one_minus_cos.mean_all()? * w.cos as f64)?)?;
    }
    if w.norm != 0.0 {
        let np = pred.broadcast_div(&clamped_norm(pred, 1e-12)?)?;
        let nt = target.broadcast_div(&clamped_norm(&target, 1e-12)?)?;
        loss = (loss + ((np - nt)?.sqr()?.mean_all()? * w.norm as f64)?)?;
    }
    if w.raw != 0.0 {
        loss = (loss + ((pred - &target)?.sqr()?.mean_all()? * w.raw as f64)?)?;
    }
    Ok(loss)
}

/// A caller token grid must be a positive multiple of the bridge's grid.
pub fn check_pred_grid(pred_grid: i64, grid: usize) -> Result<usize> {
    match usize::try_from(pred_grid) {
        Ok(g) if g > 0 && g % grid == 0 && g <= 1 << 12 => Ok(g),
        _ => Err(Error::invalid(format!(
            "pred_grid = {pred_grid}: must be a positive multiple of the bridge grid ({grid})"
        ))),
    }
}

/// Average-pools caller tokens `[B, g*g, D]` (row-major grid `g`) to `[B, grid*grid, D]`.
/// `g` must be a positive multiple of `grid`; the gradient spreads evenly back.
pub fn pool_tokens(x: &Tensor, from_grid: usize, grid: usize) -> Result<Tensor> {
    check_pred_grid(from_grid as i64, grid)?;
    if from_grid == grid {
        return Ok(x.clone());
    }
    let (b, t, d) = x.dims3()?;
    if t != from_grid * from_grid {
        return Err(Error::shape(format!(
            "pool: {t} tokens is not a {from_grid}x{from_grid} grid"
        )));
    }
    let f = from_grid / grid;
    Ok(x.reshape(&[b, grid, f, grid, f, d][..])?
        .mean((2, 4))?
        .reshape((b, grid * grid, d))?)
}
