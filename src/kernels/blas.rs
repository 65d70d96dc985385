//! 2-D f32 matrix products through a BLAS (`cblas_sgemm`) loaded and checked at run time
//! (`blas_load.rs`).
//!
//! candle's own CPU matmul (the `gemm` crate, AVX2 on stable Rust) reaches about a third
//! of what OpenBLAS does on AVX-512 machines, and matmuls are most of the bridge's work.
//! Where no BLAS is installed, or none is faster than candle's matmul (or
//! `DINO_BRIDGE_BLAS=off`), `matmul` is candle's. The op has a backward (two more
//! matmuls), so training uses it too.

use super::blas_load::{description, loaded};
use super::cpu::{SendPtr, enabled, slice};
use crate::error::Result;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;
use std::ffi::c_int;

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;

/// `C = alpha * op(A) op(B) + beta * C` on raw row-major buffers, single-threaded, when a BLAS is
/// loaded (`false` otherwise, and nothing is written).
///
/// # Safety
/// The pointers and leading dimensions must describe valid matrices of the given sizes.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn sgemm_raw(
    trans_a: bool,
    trans_b: bool,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    beta: f32,
    c: *mut f32,
    ldc: usize,
) -> bool {
    let Some(blas) = loaded() else {
        return false;
    };
    let t = |x: bool| if x { TRANS } else { NO_TRANS };
    // SAFETY: forwarded from the caller.
    unsafe {
        (blas.sgemm)(
            ROW_MAJOR,
            t(trans_a),
            t(trans_b),
            m as c_int,
            n as c_int,
            k as c_int,
            alpha,
            a,
            lda as c_int,
            b,
            ldb as c_int,
            beta,
            c,
            ldc as c_int,
        )
    };
    true
}

/// Whether a BLAS is loaded.
pub(crate) fn available() -> bool {
    loaded().is_some()
}

/// The BLAS in use, if any (for benchmarks and logs).
pub fn blas_name() -> Option<&'static str> {
    loaded().map(|b| b.name.as_str())
}

/// What the kernels multiply with and why (`blas_load::description`).
pub fn blas_description() -> &'static str {
    description()
}

/// How one operand lies in memory, as BLAS wants to hear it: (transpose flag, leading
/// dimension, start offset, batch stride) for a 2-D matrix or a 3-D batch of them.
fn operand(layout: &Layout) -> Option<(c_int, usize, usize, usize)> {
    let (dims, strides) = (layout.dims(), layout.stride());
    let (batch_stride, rows, cols, sr, sc) = match (dims, strides) {
        (&[rows, cols], &[sr, sc]) => (0, rows, cols, sr, sc),
        (&[_, rows, cols], &[bs, sr, sc]) => (bs, rows, cols, sr, sc),
        _ => return None,
    };
    if sc == 1 && sr >= cols.max(1) {
        Some((NO_TRANS, sr, layout.start_offset(), batch_stride))
    } else if sr == 1 && sc >= rows.max(1) {
        Some((TRANS, sc, layout.start_offset(), batch_stride))
    } else {
        None
    }
}

/// What the product is added to.
#[derive(Clone, Copy)]
enum Init<'a> {
    Zero,
    /// `[n]`, on every row (added by each thread to its block after its product).
    Bias(&'a [f32]),
    /// `bias[j] + residual[i, j]`, residual `[m, n]` contiguous.
    BiasPlus(&'a [f32], &'a [f32]),
}

/// `C = init + A @ B` for 2-D operands or 3-D batches (`init` zero for batches), split
/// into work items across rayon's threads (each batch entry; within a 2-D product one
/// block per thread of the larger output side). C is only written (it may be
/// uninitialised memory). Each thread handles the init of its own block of C: in
/// parallel, and in memory it is about to use or has just written.
fn gemm_into(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    init: Init,
    c: *mut f32,
) -> candle_core::Result<Shape> {
    if !available() {
        candle_core::bail!("blas-matmul: no BLAS loaded");
    }
    let (d1, d2) = (l1.dims(), l2.dims());
    let rank = d1.len();
    let batch = if rank == 3 { d1[0] } else { 1 };
    let (m, k) = (d1[rank - 2], d1[rank - 1]);
    let (k2, n) = (d2[rank - 2], d2[rank - 1]);
    if k != k2 || d2.len() != rank || (rank == 3 && d2[0] != batch) {
        candle_core::bail!("blas-matmul: shapes {d1:?} and {d2:?} do not multiply");
    }
    let bad = || candle_core::Error::Msg("blas-matmul: bad layout".into());
    let (ta, lda, oa, sa) = operand(l1).ok_or_else(bad)?;
    let (tb, ldb, ob, sb) = operand(l2).ok_or_else(bad)?;
    let (a, b) = (s1.as_slice::<f32>()?, s2.as_slice::<f32>()?);
    let shape = if rank == 3 {
        Shape::from((batch, m, n))
    } else {
        Shape::from((m, n))
    };
    if batch * m * n == 0 {
        return Ok(shape);
    }
    let (pa, pb, pc) = (
        SendPtr(a[oa..].as_ptr() as *mut f32),
        SendPtr(b[ob..].as_ptr() as *mut f32),
        SendPtr(c),
    );
    let split_rows = m >= n;
    let side = if split_rows { m } else { n };
    let parts = if batch > 1 {
        1
    } else {
        rayon::current_num_threads().min(side.div_ceil(64)).max(1)
    };
    let step = side.div_ceil(parts);
    (0..batch * parts).into_par_iter().for_each(|item| {
        let (i, p) = (item / parts, item % parts);
        let (lo, hi) = (p * step, ((p + 1) * step).min(side));
        if lo >= hi {
            return;
        }
        let (a_off, b_off, c_off, mm, nn) = if split_rows {
            (
                if ta == NO_TRANS { lo * lda } else { lo },
                0,
                lo * n,
                hi - lo,
                n,
            )
        } else {
            (
                0,
                if tb == NO_TRANS { lo } else { lo * ldb },
                lo,
                m,
                hi - lo,
            )
        };
        let c_block = pc.get().wrapping_add(i * m * n + c_off);
        let first_col = if split_rows { 0 } else { lo };
        let first_row = if split_rows { lo } else { 0 };
        let beta = match init {
            Init::Zero => 0.0,
            // Added after the product instead: measured 1-3% faster over a forward than
            // a bias-filled C under beta = 1 (the kernel then loads C through its loop).
            Init::Bias(_) => 0.0,
            Init::BiasPlus(bias, res) => {
                for r in 0..mm {
                    // SAFETY: row r of this item's block lies inside C (see below).
                    let row = unsafe { std::slice::from_raw_parts_mut(c_block.add(r * n), nn) };
                    let at = (first_row + r) * n + first_col;
                    let (b, x) = (&bias[first_col..first_col + nn], &res[at..at + nn]);
                    for ((c, b), x) in row.iter_mut().zip(b).zip(x) {
                        *c = b + x;
                    }
                }
                1.0
            }
        };
        // SAFETY: the layouts were checked to address inside the storages, C holds
        // batch * m * n elements (the caller's contract), and items write disjoint blocks.
        unsafe {
            sgemm_raw(
                ta == TRANS,
                tb == TRANS,
                mm,
                nn,
                k,
                1.0,
                pa.get().add(i * sa + a_off),
                lda,
                pb.get().add(i * sb + b_off),
                ldb,
                beta,
                c_block,
                n,
            )
        };
        if let Init::Bias(bias) = init {
            let bias = &bias[first_col..first_col + nn];
            for r in 0..mm {
                // SAFETY: as above; the product is in and the block still this item's.
                let row = unsafe { std::slice::from_raw_parts_mut(c_block.add(r * n), nn) };
                row.iter_mut().zip(bias).for_each(|(c, b)| *c += b);
            }
        }
    });
    Ok(shape)
}

struct BlasMatmul;

impl CustomOp2 for BlasMatmul {
    fn name(&self) -> &'static str {
        "blas-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let rank = l1.dims().len();
        let len = l1.dims()[..rank - 1].iter().product::<usize>() * l2.dims()[rank - 1];
        let mut c: Vec<f32> = Vec::with_capacity(len);
        let shape = gemm_into(s1, l1, s2, l2, Init::Zero, c.as_mut_ptr())?;
        // SAFETY: with beta = 0 every element of C was written.
        unsafe { c.set_len(shape.elem_count()) };
        Ok((CpuStorage::F32(c), shape))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let ga = matmul(grad, &b.t()?).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let gb = matmul(&a.t()?, grad).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok((Some(ga), Some(gb)))
    }
}

/// `init + x @ w^T` for `x` `[rows, in]` and a weight `[out, in]`, as a fresh output.
fn linear_output(
    s1: &CpuStorage,
    l1: &Layout,
    s2: &CpuStorage,
    l2: &Layout,
    init: Init,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let mut c: Vec<f32> = Vec::with_capacity(l1.dims()[0] * l2.dims()[0]);
    let shape = gemm_into(s1, l1, s2, &l2.transpose(0, 1)?, init, c.as_mut_ptr())?;
    // SAFETY: every element of C was written (by the product and the init).
    unsafe { c.set_len(shape.elem_count()) };
    Ok((CpuStorage::F32(c), shape))
}

/// `x @ w^T + bias` for a weight in PyTorch's `[out, in]` layout (read transposed by
/// BLAS, so no transpose node enters the graph: each one costs a zero-filled gradient
/// buffer and an add in candle's backward). Each thread adds the bias to its block of
/// C after its product.
struct BlasLinear;

impl CustomOp3 for BlasLinear {
    fn name(&self) -> &'static str {
        "blas-linear"
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
        let bias = slice(s3, l3)?;
        if l2.dims()[0] != bias.len() {
            candle_core::bail!(
                "blas-linear: bias of {} for {} outputs",
                bias.len(),
                l2.dims()[0]
            );
        }
        linear_output(s1, l1, s2, l2, Init::Bias(bias))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let msg = |e: crate::error::Error| candle_core::Error::Msg(e.to_string());
        let gx = matmul(grad, w).map_err(msg)?;
        let gw = matmul(&grad.t()?, x).map_err(msg)?;
        Ok((Some(gx), Some(gw), Some(column_sums(grad)?)))
    }
}

/// `residual + x @ w^T + bias` in inference: C starts as `residual + bias` (written by
/// each thread into its own block) and the product is added onto it, so the residual add
/// costs no pass of its own. The bias rides in the op (`CustomOp3` takes three tensors),
/// so there is no backward: `linear_residual` uses it only where nothing tracks a gradient.
struct BlasLinearResidual(Tensor);

impl CustomOp3 for BlasLinearResidual {
    fn name(&self) -> &'static str {
        "blas-linear-residual"
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
        let (bias_storage, bias_layout) = self.0.storage_and_layout();
        let candle_core::Storage::Cpu(bias_cpu) = &*bias_storage else {
            candle_core::bail!("blas-linear-residual: bias not on the CPU");
        };
        let bias = slice(bias_cpu, bias_layout)?;
        let residual = slice(s3, l3)?;
        let (rows, out) = (l1.dims()[0], l2.dims()[0]);
        if bias.len() != out || l3.dims() != [rows, out] {
            candle_core::bail!(
                "blas-linear-residual: bias {:?}, residual {:?} for a [{rows}, {out}] output",
                bias_layout.dims(),
                l3.dims()
            );
        }
        linear_output(s1, l1, s2, l2, Init::BiasPlus(bias, residual))
    }
}

/// `residual + x @ w^T + bias` for 2-D `x` `[rows, in]`, `w` `[out, in]` and `residual`
/// `[rows, out]`: one fused op in inference, else `linear` and an add.
pub fn linear_residual(x: &Tensor, w: &Tensor, bias: &Tensor, residual: &Tensor) -> Result<Tensor> {
    let tracked = [x, w, bias, residual].iter().any(|t| t.track_op());
    let fits = usable(x, w)
        && x.rank() == 2
        && w.rank() == 2
        && residual.dims() == [x.dim(0)?, w.dim(0)?]
        && residual.dtype() == candle_core::DType::F32
        && bias.dtype() == candle_core::DType::F32;
    if tracked || !fits {
        return Ok((linear(x, w, bias)? + residual)?);
    }
    let op = BlasLinearResidual(bias.contiguous()?);
    Ok(fit(x)?.apply_op3(&fit(w)?, &residual.contiguous()?, op)?)
}

/// Column sums of a 2-D `[rows, cols]` gradient (a bias gradient), as one BLAS product
/// with a row of ones: candle's `sum(0)` took 20 ms for 2048 x 3072, this 2 ms.
pub(crate) fn column_sums(grad: &Tensor) -> candle_core::Result<Tensor> {
    let ones = Tensor::ones((1, grad.dim(0)?), grad.dtype(), grad.device())?;
    if !usable(&ones, grad) {
        return grad.sum(0);
    }
    matmul(&ones, grad)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?
        .squeeze(0)
}

/// `x @ w^T + bias` for 2-D `x` `[rows, in]`, `w` `[out, in]` (PyTorch's layout), `bias`
/// `[out]`.
pub fn linear(x: &Tensor, w: &Tensor, bias: &Tensor) -> Result<Tensor> {
    if !(usable(x, w) && x.rank() == 2 && bias.dtype() == candle_core::DType::F32) {
        return Ok(x.matmul(&w.t()?)?.broadcast_add(bias)?);
    }
    Ok(fit(x)?.apply_op3(&fit(w)?, &bias.contiguous()?, BlasLinear)?)
}

/// `a @ b` for 2-D f32 tensors or 3-D batches of them: BLAS on the CPU when one is
/// loaded, else candle.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !usable(a, b) {
        return Ok(a.matmul(b)?);
    }
    Ok(fit(a)?.apply_op2(&fit(b)?, BlasMatmul)?)
}

/// Whether the BLAS ops take these operands (f32 on the CPU, 2-D or equal 3-D batches,
/// sizes BLAS's 32-bit integers can hold).
fn usable(a: &Tensor, b: &Tensor) -> bool {
    // The BLAS is asked for last: finding it times it once, on the CPU path only.
    enabled()
        && a.device().is_cpu()
        && a.dtype() == candle_core::DType::F32
        && b.dtype() == candle_core::DType::F32
        && a.rank() == b.rank()
        && (a.rank() == 2 || (a.rank() == 3 && a.dim(0).ok() == b.dim(0).ok()))
        && i32::try_from(a.elem_count().max(b.elem_count())).is_ok()
        && available()
}

/// The operand as is when BLAS can read its layout, else a contiguous copy.
fn fit(t: &Tensor) -> Result<Tensor> {
    let (storage, layout) = t.storage_and_layout();
    let ok = operand(layout).is_some()
        && matches!(&*storage, candle_core::Storage::Cpu(CpuStorage::F32(_)));
    drop(storage);
    Ok(if ok { t.clone() } else { t.contiguous()? })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::testing::{blas_or_skip, grad_gaps, max_abs_diff};
    use candle_core::{Device, Var};

    #[test]
    fn agrees_with_candle_forward_and_backward_for_every_layout() {
        if !blas_or_skip("matmul") {
            return;
        }
        let dev = Device::Cpu;
        let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (37, 19), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, (23, 19), &dev).unwrap()).unwrap();
        let bt = b.as_tensor().t().unwrap(); // transposed view: [19, 23]
        let ours = matmul(a.as_tensor(), &bt).unwrap();
        let theirs = a.as_tensor().matmul(&bt).unwrap();
        let diff = max_abs_diff(&ours, &theirs);
        assert!(diff < 1e-4, "{diff}");
        for (d, _) in grad_gaps(&ours, &theirs, &[&a, &b]) {
            assert!(d < 1e-3, "{d}");
        }
        // A narrowed (offset) operand and a batched product with a transposed operand.
        let wide = Tensor::randn(0f32, 1.0, (19, 40), &dev).unwrap();
        let view = wide.narrow(1, 5, 23).unwrap();
        let d = max_abs_diff(
            &matmul(a.as_tensor(), &view).unwrap(),
            &a.as_tensor().matmul(&view).unwrap(),
        );
        assert!(d < 1e-4, "{d}");
        let q = Tensor::randn(0f32, 1.0, (4, 9, 5), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (4, 7, 5), &dev).unwrap();
        let kt = k.t().unwrap();
        let d = max_abs_diff(&matmul(&q, &kt).unwrap(), &q.matmul(&kt).unwrap());
        assert!(d < 1e-4, "{d}");
    }

    #[test]
    fn linear_residual_matches_linear_plus_residual() {
        if !blas_or_skip("linear_residual") {
            return;
        }
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (70, 33), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (21, 33), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 21, &dev).unwrap();
        let r = Tensor::randn(0f32, 1.0, (70, 21), &dev).unwrap();
        let want = (linear(&x, &w, &b).unwrap() + &r).unwrap();
        let fused = linear_residual(&x, &w, &b, &r).unwrap();
        assert!(!fused.track_op());
        assert!(max_abs_diff(&fused, &want) < 1e-4);
        // With a gradient to track it takes the composed path, and the gradient flows.
        let xv = Var::from_tensor(&x).unwrap();
        let tracked = linear_residual(xv.as_tensor(), &w, &b, &r).unwrap();
        assert!(max_abs_diff(&tracked, &want) < 1e-4);
        let grads = tracked.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(xv.as_tensor()).is_some());
    }

    #[test]
    fn linear_with_bias_matches_matmul_plus_bias_forward_and_backward() {
        if !blas_or_skip("linear") {
            return;
        }
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (70, 33), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 1.0, (21, 33), &dev).unwrap()).unwrap();
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, 21, &dev).unwrap()).unwrap();
        let wt = w.as_tensor().t().unwrap();
        let ours = linear(x.as_tensor(), w.as_tensor(), b.as_tensor()).unwrap();
        let theirs = x
            .as_tensor()
            .matmul(&wt)
            .unwrap()
            .broadcast_add(b.as_tensor())
            .unwrap();
        assert!(max_abs_diff(&ours, &theirs) < 1e-4);
        for (d, _) in grad_gaps(&ours, &theirs, &[&x, &w, &b]) {
            assert!(d < 1e-3, "{d}");
        }
    }
}
