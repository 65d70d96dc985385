//! 3x3, padding-1 convolution over a channels-last map as one op, forward and backward:
//! each work item gathers the patches of one block of output pixels into a per-thread
//! buffer and multiplies it with the weights through BLAS. Where Winograd applies (even
//! sizes, 64+ channels) the forward is `winograd::conv3x3` instead; the backward is the
//! same either way. The full `[B*H*W, 9*C]` patch
//! matrix of an im2col is never materialised (75 MB per conv at batch 32 in the adapter:
//! writing it and faulting its pages in cost as much as the product).
//!
//! Weights are tap-major rows, `w[o, k*C + c]` with tap `k = ky*3 + kx`, so a patch row is
//! nine contiguous runs of `C` channels.

use super::SendPtr;
use super::blas::{available, sgemm_raw};
use super::{on_cpu_f32, slice};
use crate::error::Result;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Floats in one work item's patch buffer (8 MiB): enough rows that the weights, which
/// BLAS packs once per call, are reused over hundreds of pixels.
const BUFFER: usize = 2 << 20;

#[derive(Clone, Copy)]
pub(super) struct Dims {
    pub(super) b: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) c: usize,
}

impl Dims {
    pub(super) fn of(l: &Layout) -> candle_core::Result<Self> {
        let (b, h, w, c) = l.shape().dims4()?;
        Ok(Dims { b, h, w, c })
    }
    pub(super) fn pixels(&self) -> usize {
        self.b * self.h * self.w
    }
    /// Pixels per work item: as many as the buffer holds (64 to 4096), with the number
    /// of items a multiple of the thread count so that no thread idles at the end.
    fn rows_per_block(&self) -> usize {
        super::per_item(self.pixels(), (BUFFER / (9 * self.c)).clamp(64, 4096))
    }
}

/// Work items: consecutive output pixels `lo..hi` (flat over `B*H*W`).
fn blocks(d: Dims) -> Vec<(usize, usize)> {
    let per = d.rows_per_block();
    (0..d.pixels().div_ceil(per))
        .map(|i| (i * per, ((i + 1) * per).min(d.pixels())))
        .collect()
}

/// Patch rows of pixels `lo..hi` (flat over `B*H*W`) into `cols`, `[hi-lo, 9*C]`.
pub(super) fn gather(x: &[f32], d: Dims, lo: usize, hi: usize, cols: &mut [f32]) {
    let Dims { h, w, c, .. } = d;
    for (row, p) in cols.chunks_exact_mut(9 * c).zip(lo..hi) {
        let (n, y, xx) = (p / (h * w), (p / w) % h, p % w);
        for (k, dst) in row.chunks_exact_mut(c).enumerate() {
            let (yy, xs) = (y + k / 3, xx + k % 3); // padded coordinates
            if yy == 0 || yy > h || xs == 0 || xs > w {
                dst.fill(0.0);
            } else {
                let at = ((n * h + yy - 1) * w + xs - 1) * c;
                dst.copy_from_slice(&x[at..at + c]);
            }
        }
    }
}

/// The adjoint of `gather`: adds each patch entry back onto its pixel of `dx`. A patch
/// reaches one row above and below, so concurrent callers must work on different images.
pub(super) fn scatter(dcols: &[f32], d: Dims, lo: usize, hi: usize, dx: SendPtr) {
    let Dims { h, w, c, .. } = d;
    for (row, p) in dcols.chunks_exact(9 * c).zip(lo..hi) {
        let (n, y, xx) = (p / (h * w), (p / w) % h, p % w);
        for (k, src) in row.chunks_exact(c).enumerate() {
            let (yy, xs) = (y + k / 3, xx + k % 3);
            if yy == 0 || yy > h || xs == 0 || xs > w {
                continue;
            }
            let at = ((n * h + yy - 1) * w + xs - 1) * c;
            // SAFETY: `at..at+c` lies in dx (B*H*W*C elements); see the function comment
            // for why no other thread writes it meanwhile.
            let dst = unsafe { std::slice::from_raw_parts_mut(dx.get().add(at), c) };
            for (d, s) in dst.iter_mut().zip(src) {
                *d += s;
            }
        }
    }
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
        let mut y = super::output_vec(d.pixels() * o);
        let py = SendPtr(y.as_mut_ptr());
        blocks(d).into_par_iter().for_each_init(
            || vec![0f32; d.rows_per_block() * 9 * d.c],
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
        let rows = d.rows_per_block();
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
                let mut cols = vec![0f32; d.rows_per_block() * k];
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

/// `conv3x3(x) + bias` for channels-last `x` and tap-major weight rows `[O, 9*C]`, or
/// `None` where the caller should use its im2col path (not CPU f32, or no BLAS).
pub fn conv3x3(x: &Tensor, w_rows: &Tensor, bias: &Tensor) -> Result<Option<Tensor>> {
    if !on_cpu_f32(x) || !available() {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op3(
        &w_rows.contiguous()?,
        &bias.contiguous()?,
        Conv3x3Op,
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{blas_or_skip, grad_gaps, max_abs_diff};
    use candle_core::{Device, Var};

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

    #[test]
    fn matches_candle_conv2d_forward_and_backward() {
        if !blas_or_skip("the fused 3x3 convolution") {
            return;
        }
        // 300 pixels per image: blocks that end mid-image and images split into several.
        // The last case is Winograd's forward (even sizes, 64 channels).
        for (b, h, w, c, o) in [(2, 15, 20, 6, 7), (5, 3, 4, 6, 7), (3, 6, 10, 64, 72)] {
            let dev = &Device::Cpu;
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, h, w, c), dev).unwrap()).unwrap();
            let wt =
                Var::from_tensor(&Tensor::randn(0f32, 0.2, (o, c, 3, 3), dev).unwrap()).unwrap();
            let bias = Var::from_tensor(&Tensor::randn(0f32, 1.0, o, dev).unwrap()).unwrap();
            let rows = wt
                .as_tensor()
                .permute((0, 2, 3, 1))
                .unwrap()
                .reshape((o, 9 * c))
                .unwrap();
            let ours = conv3x3(x.as_tensor(), &rows, bias.as_tensor())
                .unwrap()
                .unwrap();
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
}
