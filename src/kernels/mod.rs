//! CPU kernels that candle lacks or does slowly, each with a backward and a plain candle
//! fallback for other devices: BLAS matmul, fused activations, norms, im2col.

pub mod activation;
pub mod adamw;
pub mod attention;
pub mod blas;
pub mod conv;
pub mod dropout;
pub mod im2col;
pub mod layout;
pub(crate) mod simd;
mod winograd;

pub use activation::{Activation, activation, activation_owned};
pub use blas::{linear, matmul};
pub mod norm;

use candle_core::{CpuStorage, Layout, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the kernels of this module on or off for the whole process (off: candle's own
/// ops everywhere). For side-by-side benchmarks and checks; on by default.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Whether the CPU kernels apply to `x`: enabled, f32, on the CPU.
pub(crate) fn on_cpu_f32(x: &Tensor) -> bool {
    enabled() && x.device().is_cpu() && x.dtype() == candle_core::DType::F32
}

/// Whether any of `ts` tracks a gradient: the fused ops without a backward are for
/// untracked tensors only.
pub(crate) fn tracked(ts: &[&Tensor]) -> bool {
    ts.iter().any(|t| t.track_op())
}

/// A vector of `n` floats for a kernel that writes every element before any is read.
/// Zeroing it first would cost a pass over memory (a `memset` of a reused buffer, or
/// fresh pages from the kernel); candle's CPU backend allocates its outputs this way too.
#[allow(clippy::uninit_vec)] // the point of it: see the SAFETY line
pub(crate) fn output_vec(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: f32 has no invalid bit patterns, and callers write all `n` values before
    // the vector is read or handed on.
    unsafe { v.set_len(n) };
    v
}

/// A raw pointer into one buffer that rayon's threads may share: each thread writes only
/// its own disjoint block of it.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: used only to hand disjoint blocks of one buffer to rayon's threads, which are
// joined before the buffer is read or dropped.
unsafe impl Send for SendPtr {}
// SAFETY: as for `Send`: shared references only ever reach disjoint blocks.
unsafe impl Sync for SendPtr {}
impl SendPtr {
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// Elements per work item of the element-wise kernels (64 KiB of f32).
pub(crate) const CHUNK: usize = 1 << 14;

/// Units per work item when `total` units are split into items of at most `most`
/// (at least one): the item count is a multiple of rayon's thread count, so that no
/// thread idles at the end.
pub(crate) fn per_item(total: usize, most: usize) -> usize {
    let threads = rayon::current_num_threads();
    let items = total
        .div_ceil(most.max(1))
        .max(threads)
        .next_multiple_of(threads);
    total.div_ceil(items).max(1)
}

/// The contiguous f32 slice behind a layout (callers make inputs contiguous first).
pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("kernel input must be contiguous".into()))?;
    Ok(&s.as_slice::<f32>()?[start..end])
}

#[cfg(test)]
pub(crate) mod testing {
    //! Comparing a kernel with candle's ops, forward and backward.
    use candle_core::{Tensor, Var};

    /// Largest `|a - b|`, compared in f64 (any float dtypes).
    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        let f64s = |t: &Tensor| t.to_dtype(candle_core::DType::F64).unwrap();
        (f64s(a) - f64s(b))
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap() as f32
    }

    /// Backpropagates `sum(ours * probe)` and `sum(theirs * probe)` for one random probe
    /// and returns, per variable, the largest gradient difference and the reference
    /// gradient's largest magnitude.
    pub fn grad_gaps(ours: &Tensor, theirs: &Tensor, vars: &[&Var]) -> Vec<(f32, f32)> {
        let probe = Tensor::randn(0f32, 1.0, ours.shape(), ours.device()).unwrap();
        let g1 = (ours * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (theirs * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        vars.iter()
            .map(|v| {
                let (a, b) = (
                    g1.get(v.as_tensor()).unwrap(),
                    g2.get(v.as_tensor()).unwrap(),
                );
                (
                    max_abs_diff(a, b),
                    b.abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap(),
                )
            })
            .collect()
    }

    /// Whether the BLAS-backed kernels can be compared here. CI installs OpenBLAS, so
    /// there (CI set) a missing BLAS fails the test instead of skipping the comparison.
    pub fn blas_or_skip(what: &str) -> bool {
        if super::blas::blas_name().is_some() {
            return true;
        }
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs without a system BLAS: {what} goes untested"
        );
        eprintln!("no system BLAS here: {what} is candle's own, nothing to compare");
        false
    }
}
