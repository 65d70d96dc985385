//! LayerNorm over the last dimension and GroupNorm over channels-last maps. Each public
//! function owns every path of its op and picks one:
//! - f32 on the CPU: fused CPU ops with their backward (candle's fused versions have none,
//!   and composing them from mean/sub/div ops costs five passes over memory);
//! - elsewhere (CUDA, bf16) where no gradient is tracked: candle-nn's fused layer norm
//!   (one kernel; statistics in f32, variance in one pass: `tests/it/gpu_path.rs` checks it
//!   against the fixtures' tolerance);
//! - elsewhere with a gradient: the composed, differentiable ops (`normalize`).

use super::cpu::{on_cpu_f32, output_vec, slice, tracked};
use super::simd::{LANES, simd_fn, sum};
use crate::error::Result;
use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

#[inline(always)]
fn sum_sq_dev(x: &[f32], mean: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks
        .remainder()
        .iter()
        .map(|v| (v - mean) * (v - mean))
        .sum();
    for c in chunks {
        for i in 0..LANES {
            let d = c[i] - mean;
            acc[i] += d * d;
        }
    }
    acc.iter().sum::<f32>() + tail
}

// ---- LayerNorm --------------------------------------------------------------------

simd_fn!(
    fn ln_rows(x: &[f32], w: &[f32], b: &[f32], y: &mut [f32], eps: f32) {
        let d = w.len();
        for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
            let mean = sum(xr) / d as f32;
            let rstd = 1.0 / (sum_sq_dev(xr, mean) / d as f32 + eps).sqrt();
            for i in 0..d {
                yr[i] = (xr[i] - mean) * rstd * w[i] + b[i];
            }
        }
    }
);

// Rows of dx, and this chunk's sums of dy * xhat and dy (for dw, db).
simd_fn!(
    fn ln_rows_bwd(
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        dw: &mut [f32],
        db: &mut [f32],
        eps: f32,
    ) {
        let d = w.len();
        let mut xhat = vec![0f32; d];
        let mut gw = vec![0f32; d];
        for ((xr, gr), dr) in x
            .chunks_exact(d)
            .zip(dy.chunks_exact(d))
            .zip(dx.chunks_exact_mut(d))
        {
            let mean = sum(xr) / d as f32;
            let rstd = 1.0 / (sum_sq_dev(xr, mean) / d as f32 + eps).sqrt();
            for i in 0..d {
                xhat[i] = (xr[i] - mean) * rstd;
                gw[i] = gr[i] * w[i];
                dw[i] += gr[i] * xhat[i];
                db[i] += gr[i];
            }
            let m1 = sum(&gw) / d as f32;
            let mut acc = [0f32; LANES];
            for (c, h) in gw.chunks_exact(LANES).zip(xhat.chunks_exact(LANES)) {
                for i in 0..LANES {
                    acc[i] += c[i] * h[i];
                }
            }
            let tail: f32 = (d - d % LANES..d).map(|i| gw[i] * xhat[i]).sum();
            let m2 = (acc.iter().sum::<f32>() + tail) / d as f32;
            for i in 0..d {
                dr[i] = rstd * (gw[i] - m1 - xhat[i] * m2);
            }
        }
    }
);

struct LayerNormOp {
    eps: f32,
}
struct LayerNormBwd {
    eps: f32,
}

fn rows_per_task(rows: usize) -> usize {
    rows.div_ceil(4 * rayon::current_num_threads()).max(1)
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm-fused"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, b) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let d = w.len();
        let mut y = output_vec(x.len());
        let per = rows_per_task(x.len() / d) * d;
        y.par_chunks_mut(per)
            .zip(x.par_chunks(per))
            .for_each(|(y, x)| ln_rows(x, w, b, y, self.eps));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        unpack(
            &x.apply_op3(w, &grad.contiguous()?, LayerNormBwd { eps: self.eps })?,
            x,
            w,
        )
    }
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "layer-norm-fused-backward"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, dy) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let d = w.len();
        let per = rows_per_task(x.len() / d) * d;
        Ok(packed_backward(x, dy, d, per, |x, dy, dx, dw, db| {
            ln_rows_bwd(x, w, dy, dx, dw, db, self.eps)
        }))
    }
}

/// Splits a backward op's packed output `[dx..., dw..., db...]` into the three gradients.
fn unpack(
    packed: &Tensor,
    x: &Tensor,
    w: &Tensor,
) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (n, d) = (x.elem_count(), w.elem_count());
    Ok((
        Some(packed.narrow(0, 0, n)?.reshape(x.shape())?),
        Some(packed.narrow(0, n, d)?),
        Some(packed.narrow(0, n + d, d)?),
    ))
}

/// Runs `kernel(x, dy, dx, dw, db)` over chunks of `per` elements in parallel and packs
/// `[dx..., sum dw..., sum db...]`, the output `unpack` reads.
fn packed_backward(
    x: &[f32],
    dy: &[f32],
    d: usize,
    per: usize,
    kernel: impl Fn(&[f32], &[f32], &mut [f32], &mut [f32], &mut [f32]) + Sync,
) -> (CpuStorage, Shape) {
    let mut dx = output_vec(x.len());
    // Per-chunk sums collected and added in chunk order: the result does not depend on
    // how rayon splits the work, so training repeats bit for bit.
    let partial = dx
        .par_chunks_mut(per)
        .zip(x.par_chunks(per).zip(dy.par_chunks(per)))
        .map(|(dx, (x, dy))| {
            let (mut dw, mut db) = (vec![0f32; d], vec![0f32; d]);
            kernel(x, dy, dx, &mut dw, &mut db);
            (dw, db)
        })
        .collect::<Vec<_>>()
        .into_iter()
        .fold((vec![0f32; d], vec![0f32; d]), add_pairs);
    dx.extend(partial.0);
    dx.extend(partial.1);
    let n = dx.len();
    (CpuStorage::F32(dx), Shape::from(n))
}

fn add_pairs(mut a: (Vec<f32>, Vec<f32>), b: (Vec<f32>, Vec<f32>)) -> (Vec<f32>, Vec<f32>) {
    a.0.iter_mut().zip(&b.0).for_each(|(x, y)| *x += y);
    a.1.iter_mut().zip(&b.1).for_each(|(x, y)| *x += y);
    a
}

/// LayerNorm of `x` over its last dimension with scale `w` and shift `b`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
    if on_cpu_f32(x) {
        return fused_layer_norm(x, w, b, eps);
    }
    if !tracked(&[x, w, b]) {
        return Ok(candle_nn::ops::layer_norm(
            &x.contiguous()?,
            &w.to_dtype(x.dtype())?,
            &b.to_dtype(x.dtype())?,
            eps,
        )?);
    }
    composed_layer_norm(x, w, b, eps)
}

/// The differentiable LayerNorm from candle ops.
fn composed_layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
    let xn = normalize(x, candle_core::D::Minus1, eps as f64)?;
    Ok(xn.broadcast_mul(w)?.broadcast_add(b)?)
}

/// Normalises `x` over the dimensions `dims` (kept), `(x - mean) / sqrt(var + eps)`,
/// with the biased variance as PyTorch uses. Statistics are taken in f32 also when the
/// network runs in bf16 (as autocast does): a bf16 mean over thousands of values loses
/// the digits the normalisation needs.
fn normalize<Ds: candle_core::shape::Dims + Copy>(
    x: &Tensor,
    dims: Ds,
    eps: f64,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(candle_core::DType::F32)?;
    let mean = x.mean_keepdim(dims)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(dims)?;
    Ok(centered
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .to_dtype(dtype)?)
}

fn fused_layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f32) -> Result<Tensor> {
    Ok(x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNormOp { eps })?)
}

// ---- GroupNorm (channels last) ----------------------------------------------------

/// Per-channel mean and 1/std of each channel's group, for one sample `[S, C]`.
fn group_stats(x: &[f32], c: usize, groups: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let s = x.len() / c;
    let cg = c / groups;
    let n = (s * cg) as f32;
    let mut csum = vec![0f32; c];
    for row in x.chunks_exact(c) {
        csum.iter_mut().zip(row).for_each(|(a, v)| *a += v);
    }
    let mut mean_c = vec![0f32; c];
    for g in 0..groups {
        let m = csum[g * cg..(g + 1) * cg].iter().sum::<f32>() / n;
        mean_c[g * cg..(g + 1) * cg].fill(m);
    }
    let mut csq = vec![0f32; c];
    for row in x.chunks_exact(c) {
        for i in 0..c {
            let d = row[i] - mean_c[i];
            csq[i] += d * d;
        }
    }
    let mut rstd_c = vec![0f32; c];
    for g in 0..groups {
        let var = csq[g * cg..(g + 1) * cg].iter().sum::<f32>() / n;
        rstd_c[g * cg..(g + 1) * cg].fill(1.0 / (var + eps).sqrt());
    }
    (mean_c, rstd_c)
}

simd_fn!(
    fn gn_sample(x: &[f32], w: &[f32], b: &[f32], y: &mut [f32], groups: usize, eps: f32) {
        let c = w.len();
        let (mean_c, rstd_c) = group_stats(x, c, groups, eps);
        let scale: Vec<f32> = (0..c).map(|i| rstd_c[i] * w[i]).collect();
        for (xr, yr) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
            for i in 0..c {
                yr[i] = (xr[i] - mean_c[i]) * scale[i] + b[i];
            }
        }
    }
);

simd_fn!(
    fn gn_sample_bwd(
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        dx: &mut [f32],
        dw: &mut [f32],
        db: &mut [f32],
        groups: usize,
        eps: f32,
    ) {
        let c = w.len();
        let cg = c / groups;
        let n = (x.len() / c * cg) as f32;
        let (mean_c, rstd_c) = group_stats(x, c, groups, eps);
        // Per channel: sum of dy*w and of dy*w*xhat; then per group.
        let (mut s1, mut s2) = (vec![0f32; c], vec![0f32; c]);
        for (xr, gr) in x.chunks_exact(c).zip(dy.chunks_exact(c)) {
            for i in 0..c {
                let xhat = (xr[i] - mean_c[i]) * rstd_c[i];
                s1[i] += gr[i] * w[i];
                s2[i] += gr[i] * w[i] * xhat;
                dw[i] += gr[i] * xhat;
                db[i] += gr[i];
            }
        }
        let (mut m1, mut m2) = (vec![0f32; c], vec![0f32; c]);
        for g in 0..groups {
            let r = g * cg..(g + 1) * cg;
            m1[r.clone()].fill(s1[r.clone()].iter().sum::<f32>() / n);
            m2[r.clone()].fill(s2[r].iter().sum::<f32>() / n);
        }
        for ((xr, gr), dr) in x
            .chunks_exact(c)
            .zip(dy.chunks_exact(c))
            .zip(dx.chunks_exact_mut(c))
        {
            for i in 0..c {
                let xhat = (xr[i] - mean_c[i]) * rstd_c[i];
                dr[i] = rstd_c[i] * (gr[i] * w[i] - m1[i] - xhat * m2[i]);
            }
        }
    }
);

struct GroupNormOp {
    groups: usize,
    eps: f32,
    /// SiLU applied to the output in the same pass (inference only: no backward then).
    silu: bool,
}
struct GroupNormBwd {
    groups: usize,
    eps: f32,
}

fn sample_len(l: &Layout) -> usize {
    let dims = l.dims();
    dims[1..].iter().product()
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "group-norm-nhwc-fused"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, b) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let per = sample_len(l1);
        let mut y = output_vec(x.len());
        y.par_chunks_mut(per)
            .zip(x.par_chunks(per))
            .for_each(|(y, x)| {
                gn_sample(x, w, b, y, self.groups, self.eps);
                if self.silu {
                    // While the sample's output is still in cache.
                    super::activation::in_place(super::activation::Activation::Silu)(y);
                }
            });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.silu {
            candle_core::bail!("group norm: the fused SiLU has no backward");
        }
        unpack(
            &x.apply_op3(
                w,
                &grad.contiguous()?,
                GroupNormBwd {
                    groups: self.groups,
                    eps: self.eps,
                },
            )?,
            x,
            w,
        )
    }
}

impl CustomOp3 for GroupNormBwd {
    fn name(&self) -> &'static str {
        "group-norm-nhwc-fused-backward"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w, dy) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let c = w.len();
        let per = sample_len(l1);
        Ok(packed_backward(x, dy, c, per, |x, dy, dx, dw, db| {
            gn_sample_bwd(x, w, dy, dx, dw, db, self.groups, self.eps)
        }))
    }
}

/// GroupNorm of a channels-last map `[B, H, W, C]` (statistics per sample and group):
/// the fused CPU op (with its backward) for f32 on the CPU, else composed.
pub fn group_norm(x: &Tensor, w: &Tensor, b: &Tensor, groups: usize, eps: f32) -> Result<Tensor> {
    if on_cpu_f32(x) {
        return fused_group_norm(x, w, b, groups, eps);
    }
    let (n, h, wd, c) = x.dims4()?;
    let grouped = x.reshape((n, h * wd, groups, c / groups))?;
    let xn = normalize(&grouped, (1, 3), eps as f64)?.reshape((n, h, wd, c))?;
    Ok(xn.broadcast_mul(w)?.broadcast_add(b)?)
}

/// `silu(group_norm(x))`: in one pass over memory for f32 on the CPU where nothing tracks
/// a gradient (that fused op has no backward), else the two ops.
pub fn group_norm_silu(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    groups: usize,
    eps: f32,
) -> Result<Tensor> {
    if on_cpu_f32(x) && !tracked(&[x, w, b]) {
        return Ok(x.contiguous()?.apply_op3(
            &w.contiguous()?,
            &b.contiguous()?,
            GroupNormOp {
                groups,
                eps,
                silu: true,
            },
        )?);
    }
    super::activation::activation_owned(
        group_norm(x, w, b, groups, eps)?,
        super::activation::Activation::Silu,
    )
}

fn fused_group_norm(x: &Tensor, w: &Tensor, b: &Tensor, groups: usize, eps: f32) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        GroupNormOp {
            groups,
            eps,
            silu: false,
        },
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{grad_gaps, max_abs_diff};
    use candle_core::{DType, Device, Var};

    /// Forward within 1e-4 and every gradient within 1e-4 of its scale.
    fn check(x: &Var, w: &Var, b: &Var, ours: &Tensor, theirs: &Tensor) {
        assert!(max_abs_diff(ours, theirs) < 1e-4, "forward");
        for (name, (gap, scale)) in ["x", "w", "b"]
            .iter()
            .zip(grad_gaps(ours, theirs, &[x, w, b]))
        {
            assert!(
                gap <= 1e-4 * scale.max(1.0),
                "d{name}: {gap} vs scale {scale}"
            );
        }
    }

    fn vars(shape: &[usize], c: usize, mean: f32) -> (Var, Var, Var) {
        let dev = Device::Cpu;
        let v = |t: Tensor| Var::from_tensor(&t).unwrap();
        (
            v(Tensor::randn(mean, 2.0, shape, &dev).unwrap()),
            v(Tensor::randn(1f32, 0.3, c, &dev).unwrap()),
            v(Tensor::randn(0f32, 0.3, c, &dev).unwrap()),
        )
    }

    #[test]
    fn layer_norm_paths_agree() {
        let (x, w, b) = vars(&[2, 7, 37], 37, 0.5);
        let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
        // f32 on the CPU: the fused op, for tracked tensors too (training uses it).
        let ours = layer_norm(xt, wt, bt, 1e-6).unwrap();
        let composed = composed_layer_norm(xt, wt, bt, 1e-6).unwrap();
        check(&x, &w, &b, &ours, &composed);
        // Off that path (bf16 here, as on a GPU) without a gradient, the function picks
        // candle-nn's fused kernel ...
        let bf16s = |t: &Tensor| t.detach().to_dtype(DType::BF16).unwrap();
        let untracked = layer_norm(&bf16s(xt), &bf16s(wt), &bf16s(bt), 1e-6).unwrap();
        let direct = candle_nn::ops::layer_norm(&bf16s(xt), &bf16s(wt), &bf16s(bt), 1e-6).unwrap();
        let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        assert_eq!(max_abs_diff(&f32s(&untracked), &f32s(&direct)), 0.0);
        // ... whose one-pass variance meets the fixtures' tolerance here (f32).
        let fused = candle_nn::ops::layer_norm(&xt.detach(), wt, bt, 1e-6).unwrap();
        assert!(max_abs_diff(&fused, &composed) < 1e-4);
        let f64s = |t: &Tensor| t.detach().to_dtype(DType::F64).unwrap();
        // ... and with a gradient: the composed ops, which reach every variable.
        let xv = Var::from_tensor(&f64s(xt)).unwrap();
        let tracked = layer_norm(xv.as_tensor(), &f64s(wt), &f64s(bt), 1e-6).unwrap();
        let grads = tracked.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(xv.as_tensor()).is_some());
    }

    #[test]
    fn group_norm_paths_agree() {
        let (x, w, b) = vars(&[3, 5, 6, 64], 64, 0.3);
        let (xt, wt, bt) = (x.as_tensor(), w.as_tensor(), b.as_tensor());
        let ours = group_norm(xt, wt, bt, 32, 1e-5).unwrap();
        let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        // The composed path (f64) with its gradient, as CUDA and bf16 take it.
        let composed = group_norm(&f64s(xt), &f64s(wt), &f64s(bt), 32, 1e-5)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        check(&x, &w, &b, &ours, &composed);
        let detached = |t: &Tensor| t.detach();
        let fused = group_norm_silu(&detached(xt), &detached(wt), &detached(bt), 32, 1e-5).unwrap();
        let d = max_abs_diff(&fused, &composed.silu().unwrap());
        assert!(d < 1e-5, "group norm + silu off by {d}");
        // Tracked: the two ops, with a gradient.
        let tracked = group_norm_silu(xt, wt, bt, 32, 1e-5).unwrap();
        let (gap, scale) = grad_gaps(&tracked, &composed.silu().unwrap(), &[&x])[0];
        assert!(gap <= 1e-4 * scale.max(1.0), "{gap}");
    }
}
