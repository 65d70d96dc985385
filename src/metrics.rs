//! Validation metrics of DESIGN.md: loss, cosine, nmse, retrieval@k, self_sim.

use crate::error::{Error, Result};
use crate::loss::{LossWeights, alignment_loss, token_cosine};
use candle_core::{D, Tensor};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    pub loss: f64,
    pub cosine: f64,
    pub nmse: f64,
    /// retrieval@k within one data set's pool; none for metrics pooled over several data
    /// sets, where it has no meaning (each has its own pool).
    #[serde(
        rename = "retrieval@1",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub retrieval_1: Option<f64>,
    #[serde(
        rename = "retrieval@5",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub retrieval_5: Option<f64>,
    #[serde(
        rename = "retrieval@10",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub retrieval_10: Option<f64>,
    pub self_sim: f64,
}

impl Metrics {
    /// The metrics of several data sets (rows, metrics) taken together, weighted by rows:
    /// loss, cosine, nmse and self_sim (each a mean over samples); no retrieval.
    pub fn pooled(parts: &[(usize, &Metrics)]) -> Metrics {
        let rows: usize = parts.iter().map(|(n, _)| n).sum();
        let mean = |f: fn(&Metrics) -> f64| {
            parts.iter().map(|(n, m)| *n as f64 * f(m)).sum::<f64>() / rows.max(1) as f64
        };
        Metrics {
            loss: mean(|m| m.loss),
            cosine: mean(|m| m.cosine),
            nmse: mean(|m| m.nmse),
            retrieval_1: None,
            retrieval_5: None,
            retrieval_10: None,
            self_sim: mean(|m| m.self_sim),
        }
    }
}

/// Default size of the retrieval pool.
pub const DEFAULT_POOL: usize = 2200;

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}

/// Tokens scaled to unit length (`x / max(|x|, 1e-8)`), as the cosine uses them.
fn unit_tokens(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(D::Minus1)?.maximum(1e-16)?.sqrt()?;
    Ok(x.broadcast_div(&norm)?)
}

/// All metrics for predictions and targets `[N, T, D]` (f32, any device), retrieval over
/// the first `min(pool, N)` samples.
pub fn evaluate(
    pred: &Tensor,
    target: &Tensor,
    weights: &LossWeights,
    pool: usize,
) -> Result<Metrics> {
    if pred.dims() != target.dims() || pred.rank() != 3 || pred.dim(0)? == 0 {
        return Err(Error::shape(format!(
            "metrics: pred {:?} and target {:?} must both be [N > 0, T, D]",
            pred.dims(),
            target.dims()
        )));
    }
    let (n, t, d) = pred.dims3()?;
    let loss = scalar(&alignment_loss(pred, target, weights)?)?;
    let cosine = scalar(&token_cosine(pred, target)?.mean_all()?)?;
    let err = (pred - target)?.sqr()?.reshape((n, t * d))?.sum(1)?;
    let energy = target.sqr()?.reshape((n, t * d))?.sum(1)?;
    let nmse = scalar(&(err / energy)?.mean_all()?)?;
    let [r1, r5, r10] = retrieval(pred, target, pool.min(n), [1, 5, 10])?;
    Ok(Metrics {
        loss,
        cosine,
        nmse,
        retrieval_1: Some(r1),
        retrieval_5: Some(r5),
        retrieval_10: Some(r10),
        self_sim: self_similarity(pred, target)?,
    })
}

/// Fraction of the first `p` samples whose own target scores higher than all but fewer
/// than `k` other candidates, with `s_ij = mean_t cos(pred_i[t], target_j[t])`.
pub fn retrieval<const K: usize>(
    pred: &Tensor,
    target: &Tensor,
    p: usize,
    ks: [usize; K],
) -> Result<[f64; K]> {
    let (_, t, d) = pred.dims3()?;
    let pu = unit_tokens(&pred.narrow(0, 0, p)?)?.reshape((p, t * d))?;
    let tu = unit_tokens(&target.narrow(0, 0, p)?)?.reshape((p, t * d))?;
    let scores = (pu.matmul(&tu.t()?)? / t as f64)?.to_vec2::<f32>()?;
    let mut hits = [0usize; K];
    for (i, row) in scores.iter().enumerate() {
        let own = row[i];
        let better = row
            .iter()
            .enumerate()
            .filter(|&(j, &s)| j != i && s >= own)
            .count();
        for (h, &k) in hits.iter_mut().zip(&ks) {
            if better < k {
                *h += 1;
            }
        }
    }
    Ok(hits.map(|h| h as f64 / p as f64))
}

/// Mean over samples of the Pearson correlation between the off-diagonal entries of the
/// token cosine matrices `[T, T]` of pred and target.
pub fn self_similarity(pred: &Tensor, target: &Tensor) -> Result<f64> {
    let gram = |x: &Tensor| -> Result<Vec<Vec<Vec<f32>>>> {
        let u = unit_tokens(x)?;
        Ok(u.matmul(&u.transpose(1, 2)?.contiguous()?)?
            .to_vec3::<f32>()?)
    };
    let (gp, gt) = (gram(pred)?, gram(target)?);
    let mut total = 0f64;
    for (a, b) in gp.iter().zip(&gt) {
        let mut pairs = Vec::new();
        for (i, (ra, rb)) in a.iter().zip(b).enumerate() {
            for (j, (&x, &y)) in ra.iter().zip(rb).enumerate() {
                if i != j {
                    pairs.push((x as f64, y as f64));
                }
            }
        }
        total += pearson(&pairs);
    }
    Ok(total / gp.len() as f64)
}

fn pearson(pairs: &[(f64, f64)]) -> f64 {
    let n = pairs.len() as f64;
    let (mx, my) = pairs
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x / n, b + y / n));
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (x, y) in pairs {
        sxy += (x - mx) * (y - my);
        sxx += (x - mx) * (x - mx);
        syy += (y - my) * (y - my);
    }
    let denom = (sxx * syy).sqrt();
    if denom > 0.0 { sxy / denom } else { 0.0 }
}
