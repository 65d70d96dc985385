//! 3x3, padding-1 convolution over a channels-last map. `conv3x3` owns its three paths:
//! - f32 on the CPU (with a BLAS): one op, forward and backward, described below;
//! - elsewhere (CUDA, bf16) where no gradient is tracked: candle's `conv2d` (one im2col
//!   kernel and one GEMM) on an NCHW view of the map, in batch chunks that keep its
//!   32-bit launch size;
//! - elsewhere with a gradient: im2col (`im2col.rs`) and one matmul, differentiable.
//!
//! The CPU op: each work item gathers the patches of one block of output pixels into a
//! per-thread buffer and multiplies it with the weights through BLAS. Where Winograd applies (even
//! sizes, 64+ channels) the forward is `winograd::conv3x3` instead; the backward is the
//! same either way. The full `[B*H*W, 9*C]` patch
//! matrix of an im2col is never materialised (75 MB per conv at batch 32 in the adapter:
//! writing it and faulting its pages in cost as much as the product).
//!
//! Weights are tap-major rows, `w[o, k*C + c]` with tap `k = ky*3 + kx`, so a patch row is
//! nine contiguous runs of `C` channels.

use super::blas::{available, sgemm_raw};
use super::cpu::{SendPtr, on_cpu_f32, output_vec, per_item, slice, tracked};
use super::patches::{Dims, gather, scatter};
use crate::error::Result;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Floats in one work item's patch buffer (8 MiB): enough rows that the weights, which
/// BLAS packs once per call, are reused over hundreds of pixels.
const BUFFER: usize = 2 << 20;

/// Pixels per work item of `d`: as many as the buffer holds (64 to 4096), with the number
/// of items a multiple of the thread count so that no thread idles at the end.
fn rows_per_block(d: &Dims) -> usize {
    per_item(d.pixels(), (BUFFER / (9 * d.c)).clamp(64, 4096))
}

/// Work items: consecutive output pixels `lo..hi` (flat over `B*H*W`).
fn blocks(d: Dims) -> Vec<(usize, usize)> {
    let per = rows_per_block(&d);
    (0..d.pixels().div_ceil(per))
        .map(|i| (i * per, ((i + 1) * per).min(d.pixels())))
        .collect()
}

/// `y = conv3x3(x, w) + bias`: x `[B, H, W, C]`, w `[O, 9*C]`, bias `[O]`.
struct Conv3x3Op;

impl CustomOp3 for Conv3x3Op {
    fn name(&self) -> &'static str {
        "conv3x3-nhwc"
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
        let d = Dims::of(l1)?;
        let (x, wt, bias) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let o = bias.len();
        if l2.dims() != [o, 9 * d.c] {
            candle_core::bail!(
                "conv3x3: weight {:?} for {} inputs, {o} outputs",
                l2.dims(),
                d.c
            );
        }
        if super::winograd::applies(d.h, d.w, d.c) {
            let y = super::winograd::conv3x3((d.b, d.h, d.w, d.c), x, wt, bias);
            return Ok((CpuStorage::F32(y), Shape::from((d.b, d.h, d.w, o))));
        }
        let mut y = output_vec(d.pixels() * o);
        let py = SendPtr(y.as_mut_ptr());
        blocks(d).into_par_iter().for_each_init(
            || vec![0f32; rows_per_block(&d) * 9 * d.c],
            |cols, (lo, hi)| {
                let cols = &mut cols[..(hi - lo) * 9 * d.c];
                gather(x, d, lo, hi, cols);
                // Each thread writes the bias into its own rows just before its product
                // is added onto them (one thread writing all of y first was a serial pass).
                // SAFETY: rows lo..hi of y are this item's alone.
                let y_rows =
                    unsafe { std::slice::from_raw_parts_mut(py.get().add(lo * o), (hi - lo) * o) };
                y_rows
                    .chunks_exact_mut(o)
                    .for_each(|r| r.copy_from_slice(bias));
                // SAFETY: rows lo..hi of y are this item's alone; the sizes match the slices.
                unsafe {
                    sgemm_raw(
                        false,
                        true,
                        hi - lo,
                        o,
                        9 * d.c,
                        1.0,
                        cols.as_ptr(),
                        9 * d.c,
                        wt.as_ptr(),
                        9 * d.c,
                        1.0,
                        py.get().add(lo * o),
                        o,
                    )
                };
            },
        );
        Ok((CpuStorage::F32(y), Shape::from((d.b, d.h, d.w, o))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let o = grad.dim(3)?;
        let dx = grad.apply_op2(w, ConvInputGrad)?;
        let dw = x.apply_op2(&grad, ConvWeightGrad)?;
        let db = super::blas::column_sums(&grad.reshape(((), o))?)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `dx = col2im(dy @ w)`: dy `[B, H, W, O]`, w `[O, 9*C]`.
struct ConvInputGrad;

impl CustomOp2 for ConvInputGrad {
    fn name(&self) -> &'static str {
        "conv3x3-nhwc-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (dy, wt) = (slice(s1, l1)?, slice(s2, l2)?);
        let (b, h, w, o) = l1.shape().dims4()?;
        let c = l2.dims()[1] / 9;
        let d = Dims { b, h, w, c };
        let mut dx = vec![0f32; d.pixels() * c];
        let pdx = SendPtr(dx.as_mut_ptr());
        // Items are groups of whole images, each walked in blocks in sequence: patches
        // of neighbouring pixels scatter onto shared rows of dx.
        let per_image = h * w;
        let rows = rows_per_block(&d);
        let images = (rows / per_image).max(1);
        (0..b.div_ceil(images)).into_par_iter().for_each_init(
            || vec![0f32; rows * 9 * c],
            |dcols, g| {
                let end = ((g + 1) * images).min(b) * per_image;
                let mut lo = g * images * per_image;
                while lo < end {
                    let hi = (lo + rows).min(end);
                    let dcols = &mut dcols[..(hi - lo) * 9 * c];
                    // SAFETY: sizes match the slices; dcols is this thread's own buffer.
                    unsafe {
                        sgemm_raw(
                            false,
                            false,
                            hi - lo,
                            9 * c,
                            o,
                            1.0,
                            dy.as_ptr().add(lo * o),
                            o,
                            wt.as_ptr(),
                            9 * c,
                            0.0,
                            dcols.as_mut_ptr(),
                            9 * c,
                        )
                    };
                    scatter(dcols, d, lo, hi, pdx);
                    lo = hi;
                }
            },
        );
        Ok((CpuStorage::F32(dx), Shape::from((b, h, w, c))))
    }
}

/// `dw = dy^T @ patches(x)`: x `[B, H, W, C]`, dy `[B, H, W, O]` -> `[O, 9*C]`, summed over
/// per-thread partial products.
struct ConvWeightGrad;

impl CustomOp2 for ConvWeightGrad {
    fn name(&self) -> &'static str {
        "conv3x3-nhwc-weight-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = Dims::of(l1)?;
        let (x, dy) = (slice(s1, l1)?, slice(s2, l2)?);
        let o = l2.dims()[3];
        let k = 9 * d.c;
        // A fixed split into one run of blocks per thread, summed in order: the result
        // does not depend on scheduling, so training runs repeat bit for bit.
        let all = blocks(d);
        let per = all.len().div_ceil(rayon::current_num_threads()).max(1);
        let partials: Vec<Vec<f32>> = all
            .par_chunks(per)
            .map(|run| {
                let mut acc = vec![0f32; o * k];
                let mut cols = vec![0f32; rows_per_block(&d) * k];
                for &(lo, hi) in run {
                    let rows = hi - lo;
                    gather(x, d, lo, hi, &mut cols[..rows * k]);
                    // SAFETY: sizes match the slices; acc and cols are this task's own.
                    unsafe {
                        sgemm_raw(
                            true,
                            false,
                            o,
                            k,
                            rows,
                            1.0,
                            dy.as_ptr().add(lo * o),
                            o,
                            cols.as_ptr(),
                            k,
                            1.0,
                            acc.as_mut_ptr(),
                            k,
                        )
                    };
                }
                acc
            })
            .collect();
        let mut dw = vec![0f32; o * k];
        for p in &partials {
            dw.iter_mut().zip(p).for_each(|(a, b)| *a += b);
        }
        Ok((CpuStorage::F32(dw), Shape::from((o, k))))
    }
}

/// `conv3x3(x) + bias` (padding 1) for a channels-last map `x` `[B, H, W, C]`, the
/// weight in PyTorch's layout `[O, C, 3, 3]` and `bias` `[O]`; out `[B, H, W, O]`.
pub fn conv3x3(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let cpu_op = on_cpu_f32(x) && available();
    if !cpu_op && !tracked(&[x, weight, bias]) {
        return candle_conv2d(x, weight, bias, i32::MAX as usize);
    }
    // Tap-major rows `[O, 9*C]`, column (ky*3 + kx)*C + c: each tap's channels are
    // contiguous in a channels-last patch. A copy per call (9.4 MB for 512 channels),
    // made inside the graph so that training reaches the parameter.
    let rows = super::layout::tap_major(weight)?;
    if cpu_op {
        return Ok(x
            .contiguous()?
            .apply_op3(&rows, &bias.contiguous()?, Conv3x3Op)?);
    }
    let (b, h, w, _) = x.dims4()?;
    let cols = super::im2col::im2col_3x3(x)?;
    Ok(super::blas::linear(&cols, &rows, bias)?.reshape((b, h, w, ()))?)
}

/// candle's `conv2d` on the NCHW view of `x` (no copy: its im2col reads strides), in
/// batch chunks whose patch matrix stays under `max_patch` elements (the kernel's launch
/// size is 32-bit: 1024 samples of a 256-channel 32x32 map would be 2.4G).
fn candle_conv2d(x: &Tensor, weight: &Tensor, bias: &Tensor, max_patch: usize) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    let weight = weight.to_dtype(x.dtype())?.contiguous()?;
    let per_sample = h * w * c * 9;
    let chunk = (max_patch / per_sample.max(1)).clamp(1, b);
    if chunk < b {
        crate::log::emit(
            crate::log::Level::Debug,
            format!(
                "conv3x3: batch {b} in chunks of {chunk} (candle's im2col launches 32-bit sizes)"
            ),
        );
    }
    let nchw = x.permute((0, 3, 1, 2))?;
    let outs = (0..b)
        .step_by(chunk)
        .map(|s| {
            Ok(nchw
                .narrow(0, s, chunk.min(b - s))?
                .conv2d(&weight, 1, 1, 1, 1)?)
        })
        .collect::<Result<Vec<_>>>()?;
    let y = if outs.len() == 1 {
        outs.into_iter().next().unwrap()
    } else {
        Tensor::cat(&outs, 0)?
    };
    // Back to channels-last, with the bias, in one pass.
    Ok(y.permute((0, 2, 3, 1))?
        .broadcast_add(&bias.to_dtype(x.dtype())?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{blas_or_skip, grad_gaps, max_abs_diff};
    use candle_core::{DType, Device, Var};

    /// The reference: candle's NCHW conv2d, with the weight in PyTorch's layout.
    fn reference(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
        let y = x
            .permute((0, 3, 1, 2))
            .unwrap()
            .conv2d(w, 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, (), 1, 1)).unwrap())
            .unwrap();
        y.permute((0, 2, 3, 1)).unwrap()
    }

    fn vars(b: usize, h: usize, w: usize, c: usize, o: usize) -> (Var, Var, Var) {
        let dev = &Device::Cpu;
        let v = |t: Tensor| Var::from_tensor(&t).unwrap();
        (
            v(Tensor::randn(0f32, 1.0, (b, h, w, c), dev).unwrap()),
            v(Tensor::randn(0f32, 0.2, (o, c, 3, 3), dev).unwrap()),
            v(Tensor::randn(0f32, 1.0, o, dev).unwrap()),
        )
    }

    #[test]
    fn the_cpu_op_matches_candle_conv2d_forward_and_backward() {
        if !blas_or_skip("the fused 3x3 convolution") {
            return;
        }
        // 300 pixels per image: blocks that end mid-image and images split into several.
        // The last case is Winograd's forward (even sizes, 64 channels).
        for (b, h, w, c, o) in [(2, 15, 20, 6, 7), (5, 3, 4, 6, 7), (3, 6, 10, 64, 72)] {
            let (x, wt, bias) = vars(b, h, w, c, o);
            let ours = conv3x3(x.as_tensor(), wt.as_tensor(), bias.as_tensor()).unwrap();
            let theirs = reference(x.as_tensor(), wt.as_tensor(), bias.as_tensor());
            assert!(max_abs_diff(&ours, &theirs) < 1e-4, "forward {b}x{h}x{w}");
            for (i, (d, _)) in grad_gaps(&ours, &theirs, &[&x, &wt, &bias])
                .into_iter()
                .enumerate()
            {
                assert!(d < 1e-3, "gradient {i} off by {d} at {b}x{h}x{w}");
            }
        }
    }

    /// The paths off the CPU op, taken here for f64 as a GPU takes them: candle's conv2d
    /// when nothing is tracked (in several batch chunks when the patch matrix is large),
    /// im2col + matmul with a gradient.
    #[test]
    fn the_device_paths_match_the_reference() {
        let (x, wt, bias) = vars(5, 6, 7, 8, 9);
        let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let (x64, w64, b64) = (
            f64s(x.as_tensor()),
            f64s(wt.as_tensor()),
            f64s(bias.as_tensor()),
        );
        let theirs = reference(&x64, &w64, &b64);
        let untracked = conv3x3(&x64.detach(), &w64.detach(), &b64.detach()).unwrap();
        assert!(max_abs_diff(&untracked, &theirs) < 1e-10);
        // Chunks of two samples (and one of one): the same values.
        let chunked = candle_conv2d(&x64, &w64, &b64, 2 * 6 * 7 * 8 * 9).unwrap();
        assert_eq!(max_abs_diff(&chunked, &untracked), 0.0);
        // With a gradient: im2col + matmul, every input reached as by the reference.
        let vs: Vec<Var> = [&x64, &w64, &b64]
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let (xt, wt, bt) = (vs[0].as_tensor(), vs[1].as_tensor(), vs[2].as_tensor());
        let tracked = conv3x3(xt, wt, bt).unwrap();
        assert!(max_abs_diff(&tracked, &theirs) < 1e-10);
        let probe = Tensor::randn(0f64, 1.0, tracked.shape(), &Device::Cpu).unwrap();
        let grads = |y: &Tensor| (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let (ours, refs) = (grads(&tracked), grads(&reference(xt, wt, bt)));
        for (i, v) in vs.iter().enumerate() {
            let grad = |g: &candle_core::backprop::GradStore| g.get(v.as_tensor()).unwrap().clone();
            let d = max_abs_diff(&grad(&ours), &grad(&refs));
            assert!(d < 1e-4, "gradient {i} off by {d}");
        }
    }
}
