//! The patches of a 3x3, padding-1 convolution over a channels-last map `[B, H, W, C]`:
//! `gather` copies a block of pixels' patches into rows (tap-major, `(ky*3 + kx)*C + c`),
//! `scatter` adds rows back onto the map (its adjoint). The CPU convolution (`conv.rs`)
//! and the im2col op (`im2col.rs`) both build on them.

use super::cpu::SendPtr;
use candle_core::Layout;

#[derive(Clone, Copy)]
pub struct Dims {
    pub b: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

impl Dims {
    pub fn of(l: &Layout) -> candle_core::Result<Self> {
        let (b, h, w, c) = l.shape().dims4()?;
        Ok(Dims { b, h, w, c })
    }
    pub fn pixels(&self) -> usize {
        self.b * self.h * self.w
    }
}

/// Patch rows of pixels `lo..hi` (flat over `B*H*W`) into `cols`, `[hi-lo, 9*C]`.
pub fn gather(x: &[f32], d: Dims, lo: usize, hi: usize, cols: &mut [f32]) {
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
pub fn scatter(dcols: &[f32], d: Dims, lo: usize, hi: usize, dx: SendPtr) {
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
