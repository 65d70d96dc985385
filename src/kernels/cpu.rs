//! What the CPU kernels share: the switch that turns them off, the test of whether one
//! applies to a tensor, uninitialised output buffers, a pointer rayon's threads may share,
//! and the split of work into items.

use candle_core::{CpuStorage, Layout, Tensor};
use std::cell::Cell;

thread_local! {
    static ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Turns the CPU kernels on or off for the calling thread (off: candle's own ops and the
/// composed paths, as on a GPU). An op picks its path on the thread that calls it, so a
/// test or benchmark that switches them off changes nothing for other threads. On by
/// default.
pub fn set_enabled(on: bool) {
    ENABLED.with(|e| e.set(on));
}

/// Whether the CPU kernels are on for the calling thread.
pub fn enabled() -> bool {
    ENABLED.with(|e| e.get())
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
