//! The alignment loss of DESIGN.md, and what REPA alignment does to the two token grids
//! before it: pooling the finer one onto the coarser, and iREPA's spatial normalisation
//! of the target. Written with differentiable ops; gradients come from candle's autograd.

use crate::error::{Error, Result};
use candle_core::{D, Tensor};

/// Weights of the loss terms.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossWeights {
    pub cos: f32,
    pub norm: f32,
    pub raw: f32,
    /// The spatial-structure term: token self-similarity matrices compared.
    pub gram: f32,
}

impl Default for LossWeights {
    /// The seed's composite loss.
    fn default() -> Self {
        LossWeights {
            cos: 1.0,
            norm: 0.25,
            raw: 0.05,
            gram: 0.0,
        }
    }
}

impl LossWeights {
    /// REPA's own loss, `mean(1 - cos)`: the cosine alone (REPA logs `-cos`, one less).
    /// What alignment and the latent loss use unless told otherwise.
    pub const REPA: LossWeights = LossWeights {
        cos: 1.0,
        norm: 0.0,
        raw: 0.0,
        gram: 0.0,
    };

    /// Every weight finite and >= 0; `prefix` names the set in messages (`""` for the
    /// training loss's `w_*`, `"align_"` for alignment's `align_w_*`).
    pub fn validate(&self, prefix: &str) -> Result<()> {
        for (name, v) in [
            ("w_cos", self.cos),
            ("w_norm", self.norm),
            ("w_raw", self.raw),
            ("w_gram", self.gram),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(Error::invalid(format!(
                    "{prefix}{name} = {v}: must be finite and >= 0"
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

/// The token cosine matrices `[B, T, T]` of `x` `[B, T, D]`: `c_tu = cos(x_t, x_u)`.
fn self_similarity(x: &Tensor) -> Result<Tensor> {
    let n = x.broadcast_div(&clamped_norm(x, 1e-8)?)?;
    Ok(n.matmul(&n.t()?.contiguous()?)?)
}

/// The loss of DESIGN.md for `[B, T, D]` tensors, a scalar: the mean over samples of
/// `alignment_loss_per_sample`.
pub fn alignment_loss(pred: &Tensor, target: &Tensor, w: &LossWeights) -> Result<Tensor> {
    Ok(alignment_loss_per_sample(pred, target, w)?.mean_all()?)
}

/// The loss of DESIGN.md per sample, `[B]` for `[B, T, D]` tensors: the sum of
/// `w_cos * mean(1 - cos)`, `w_norm * mean((n(p) - n(t))^2)`, `w_raw * mean((p - t)^2)`
/// and `w_gram * mean((c(p) - c(t))^2)`, each mean over one sample's tokens (and
/// channels, or token pairs). Every sample has the same count, so their mean is the mean
/// over the batch. `target` is treated as a constant.
///
/// The first three terms need only three sums per token, `p.p`, `t.t` and `p.t`:
/// `cos = p.t / (max(|p|, 1e-8) max(|t|, 1e-8))`, `mean_d (n(p) - n(t))^2 =
/// (p.p / mp^2 + t.t / mt^2 - 2 p.t / (mp mt)) / D` with `m = max(|.|, 1e-12)`, and
/// `mean_d (p - t)^2 = (p.p + t.t - 2 p.t) / D`. So the loss keeps three `[B, T, D]`
/// tensors for its backward instead of a dozen (the loss dominated a small body's
/// training memory).
pub fn alignment_loss_per_sample(
    pred: &Tensor,
    target: &Tensor,
    w: &LossWeights,
) -> Result<Tensor> {
    if pred.dims() != target.dims() || pred.rank() != 3 {
        return Err(Error::shape(format!(
            "loss: pred {:?} and target {:?} must have one shape [B, T, D]",
            pred.dims(),
            target.dims()
        )));
    }
    let target = target.detach();
    let d = pred.dim(2)? as f64;
    let mut loss = Tensor::zeros(pred.dim(0)?, pred.dtype(), pred.device())?;
    if w.cos != 0.0 || w.norm != 0.0 || w.raw != 0.0 {
        // Per token, [B, T]: p.p, t.t (a constant), p.t.
        let pp = pred.sqr()?.sum(D::Minus1)?;
        let tt = target.sqr()?.sum(D::Minus1)?;
        let pt = (pred * &target)?.sum(D::Minus1)?;
        let norm = |s: &Tensor, eps: f64| -> Result<Tensor> { Ok(s.maximum(eps * eps)?.sqrt()?) };
        if w.cos != 0.0 {
            let cos = (&pt / (norm(&pp, 1e-8)? * norm(&tt, 1e-8)?)?)?;
            loss = (loss + (cos.affine(-1.0, 1.0)?.mean(1)? * w.cos as f64)?)?;
        }
        if w.norm != 0.0 {
            let (mp, mt) = (norm(&pp, 1e-12)?, norm(&tt, 1e-12)?);
            let per_token =
                ((&pp / mp.sqr()?)? + (&tt / mt.sqr()?)? - ((&pt / (mp * mt)?)? * 2.0)?)?;
            loss = (loss + (per_token.mean(1)? * (w.norm as f64 / d))?)?;
        }
        if w.raw != 0.0 {
            let per_token = ((&pp + &tt)? - (&pt * 2.0)?)?;
            loss = (loss + (per_token.mean(1)? * (w.raw as f64 / d))?)?;
        }
    }
    if w.gram != 0.0 {
        let gap = (self_similarity(pred)? - self_similarity(&target)?)?;
        loss = (loss + (gap.sqr()?.mean((1, 2))? * w.gram as f64)?)?;
    }
    Ok(loss)
}

/// How REPA alignment meets a caller's token grid with the bridge's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GridMatch {
    /// The same grid: both as they are.
    Same,
    /// The caller's grid is `k` times the bridge's: `pred` is pooled `k x k`.
    PoolPred(usize),
    /// The bridge's grid is `k` times the caller's: the target is pooled `k x k`.
    PoolTarget(usize),
}

impl GridMatch {
    /// The match of a caller grid `(ph, pw)` with the bridge's token grid `(h, w)`: the
    /// same integer factor on both sides, one way or the other. Anything else is an
    /// invalid argument naming both grids.
    pub fn of(caller: (i64, i64), bridge: (usize, usize)) -> Result<GridMatch> {
        let (ph, pw) = caller;
        let (h, w) = (bridge.0 as i64, bridge.1 as i64);
        let bad = || {
            Error::invalid(format!(
                "pred grid {ph}x{pw}: must equal the bridge's token grid {h}x{w}, or be an \
                 integer multiple or divisor of it by the same factor on both sides"
            ))
        };
        let most = crate::config::MAX_SIDE as i64;
        if ph <= 0 || pw <= 0 || ph > most || pw > most {
            return Err(bad());
        }
        if (ph, pw) == (h, w) {
            Ok(GridMatch::Same)
        } else if ph % h == 0 && pw % w == 0 && ph / h == pw / w {
            Ok(GridMatch::PoolPred((ph / h) as usize))
        } else if h % ph == 0 && w % pw == 0 && h / ph == w / pw {
            Ok(GridMatch::PoolTarget((h / ph) as usize))
        } else {
            Err(bad())
        }
    }

    /// The caller grid of `tokens` tokens that meets the bridge's grid `(h, w)`, and how:
    /// with one factor on both sides there is at most one (`tokens = h*w*k^2` or
    /// `h*w/k^2`).
    pub fn infer(tokens: usize, (h, w): (usize, usize)) -> Result<((usize, usize), GridMatch)> {
        let square_root = |n: usize| {
            let r = (n as f64).sqrt().round() as usize;
            (r * r == n).then_some(r)
        };
        let here = h * w;
        let grid = if tokens == here {
            Some((h, w))
        } else if tokens > here && tokens.is_multiple_of(here) {
            square_root(tokens / here).map(|k| (k * h, k * w))
        } else if tokens > 0 && here.is_multiple_of(tokens) {
            square_root(here / tokens)
                .filter(|k| h.is_multiple_of(*k) && w.is_multiple_of(*k))
                .map(|k| (h / k, w / k))
        } else {
            None
        };
        let grid = grid.ok_or_else(|| {
            Error::invalid(format!(
                "pred has {tokens} tokens: no caller grid of {h}x{w} times or divided by one \
                 factor has that many"
            ))
        })?;
        // The same limits as a grid given outright.
        let matched = GridMatch::of((grid.0 as i64, grid.1 as i64), (h, w))?;
        Ok((grid, matched))
    }
}

/// Average-pools tokens `[B, h*w, D]` on the row-major grid `(h, w)` by `k x k` to
/// `[B, (h/k)*(w/k), D]`; the gradient spreads evenly back.
pub fn pool_tokens(x: &Tensor, grid: (usize, usize), k: usize) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    let (h, w) = grid;
    if t != h * w || k == 0 || !h.is_multiple_of(k) || !w.is_multiple_of(k) {
        return Err(Error::shape(format!(
            "pool: {t} tokens on a {h}x{w} grid cannot be pooled {k}x{k}"
        )));
    }
    if k == 1 {
        return Ok(x.clone());
    }
    let (oh, ow) = (h / k, w / k);
    Ok(x.reshape(&[b, oh, k, ow, k, d][..])?
        .mean((2, 4))?
        .reshape((b, oh * ow, d))?)
}

/// iREPA's spatial normalisation of a target `[B, T, D]`, over tokens per sample and
/// channel: `y = x - gamma * mean_t(x)`, then `y / (std_t(y) + 1e-6)` with the population
/// standard deviation. Over one token it is undefined (`std = 0`): an invalid argument.
pub fn spatial_norm(x: &Tensor, gamma: f32) -> Result<Tensor> {
    let t = x.dim(1)?;
    if t < 2 {
        return Err(Error::invalid(format!(
            "spatial_norm_gamma = {gamma}: the loss grid has {t} token; spatial \
             normalisation needs at least 2"
        )));
    }
    let y = x.broadcast_sub(&(x.mean_keepdim(1)? * gamma as f64)?)?;
    let centered = y.broadcast_sub(&y.mean_keepdim(1)?)?;
    let std = centered.sqr()?.mean_keepdim(1)?.sqrt()?;
    Ok(y.broadcast_div(&(std + 1e-6)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_grids_are_matched_and_inferred_from_token_counts() {
        let bridge = (6, 10);
        assert_eq!(
            GridMatch::of((12, 20), bridge).unwrap(),
            GridMatch::PoolPred(2)
        );
        assert_eq!(
            GridMatch::of((3, 5), bridge).unwrap(),
            GridMatch::PoolTarget(2)
        );
        assert_eq!(GridMatch::of((6, 10), bridge).unwrap(), GridMatch::Same);
        assert!(GridMatch::of((12, 10), bridge).is_err());
        assert_eq!(
            GridMatch::infer(240, bridge).unwrap(),
            ((12, 20), GridMatch::PoolPred(2))
        );
        assert_eq!(
            GridMatch::infer(15, bridge).unwrap(),
            ((3, 5), GridMatch::PoolTarget(2))
        );
        assert_eq!(
            GridMatch::infer(60, bridge).unwrap(),
            ((6, 10), GridMatch::Same)
        );
        // A grid beyond the side limit is refused as when given outright.
        assert!(GridMatch::infer(60 * 5000 * 5000, bridge).is_err());
        for bad in [0, 1, 120, 30, 7] {
            assert!(GridMatch::infer(bad, bridge).is_err(), "{bad}");
        }
    }
}
