//! The shape of one call, checked once: a `CallShape` (batch, latent size, token grid, and
//! room for it in the device's memory) or an `AlignShape` (the same, plus the caller's
//! token grid and how it meets the bridge's). Only `Bridge`'s checks make them, so a method
//! that takes one checks nothing again; the C boundary makes one per call from its
//! arguments and hands it down.

use super::Bridge;
use crate::error::{Error, Result};
use crate::loss::GridMatch;
use candle_core::Tensor;

/// A call's shape on one bridge: `batch` samples of `[in_ch, height, width]` latents, whose
/// tokens are `[grid.0 * grid.1, target_dim]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallShape {
    batch: usize,
    in_ch: usize,
    height: usize,
    width: usize,
    grid: (usize, usize),
    target_dim: usize,
}

impl CallShape {
    pub fn batch(&self) -> usize {
        self.batch
    }
    /// The token grid `(h, w) = (height, width) / 2^adapter_depth`.
    pub fn grid(&self) -> (usize, usize) {
        self.grid
    }
    /// Tokens per sample.
    pub fn tokens(&self) -> usize {
        self.grid.0 * self.grid.1
    }
    /// The latents' shape, `[batch, in_ch, height, width]`.
    pub fn latents(&self) -> [usize; 4] {
        [self.batch, self.in_ch, self.height, self.width]
    }
    /// The shape of tokens on the bridge's grid (outputs, targets), `[batch, h*w, target_dim]`.
    pub fn token_shape(&self) -> [usize; 3] {
        [self.batch, self.tokens(), self.target_dim]
    }
}

/// An alignment call's shape: the call's, and the caller's token grid `pred_grid` with how
/// it meets the bridge's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AlignShape {
    pub call: CallShape,
    pub pred_grid: (usize, usize),
    pub matched: GridMatch,
}

impl AlignShape {
    /// The shape of `pred` (and its gradient), `[batch, pred_h*pred_w, target_dim]`.
    pub fn pred_shape(&self) -> [usize; 3] {
        let c = &self.call;
        [c.batch, self.pred_grid.0 * self.pred_grid.1, c.target_dim]
    }
}

impl Bridge {
    /// The shape of a call on `batch` (> 0) samples of `height x width` latents: sides that
    /// are positive multiples of `2^adapter_depth` (at most `MAX_SIDE`), and a call that can
    /// fit this device's memory. Anything else is a shape error naming it.
    pub fn call_shape(&self, batch: usize, height: i64, width: i64) -> Result<CallShape> {
        let c = self.config();
        let grid = c.token_grid(height, width)?;
        self.check_fits(batch, grid)?;
        Ok(CallShape {
            batch,
            in_ch: c.in_ch,
            height: height as usize,
            width: width as usize,
            grid,
            target_dim: c.target_dim,
        })
    }

    /// The shape of a call on `latents`, which must be `[B, in_ch, H, W]` with `B > 0`.
    pub fn latent_shape(&self, dims: &[usize]) -> Result<CallShape> {
        let c = self.config();
        match *dims {
            [b, ch, h, w] if b > 0 && ch == c.in_ch => self.call_shape(b, h as i64, w as i64),
            _ => Err(Error::shape(format!(
                "latents has shape {dims:?}; expected [B, {}, H, W] with B > 0 and H, W \
                 multiples of {}",
                c.in_ch,
                c.side_multiple()
            ))),
        }
    }

    /// An alignment call's shape: the caller's grid `pred_grid` must equal the bridge's
    /// token grid or be an integer multiple or divisor of it by one factor on both sides.
    pub fn align_shape(&self, call: CallShape, pred_grid: (i64, i64)) -> Result<AlignShape> {
        let matched = GridMatch::of(pred_grid, call.grid)?;
        Ok(AlignShape {
            call,
            pred_grid: (pred_grid.0 as usize, pred_grid.1 as usize),
            matched,
        })
    }

    /// An alignment call's shape for a `pred` of `tokens` tokens per sample, its grid
    /// inferred (`GridMatch::infer`: at most one fits).
    pub fn align_shape_of_tokens(&self, call: CallShape, tokens: usize) -> Result<AlignShape> {
        let (pred_grid, matched) = GridMatch::infer(tokens, call.grid)?;
        Ok(AlignShape {
            call,
            pred_grid,
            matched,
        })
    }

    /// Checks that a call on `batch` samples with the token grid `grid` can fit this
    /// device's memory: an impossible size is a shape error here, not an allocation failure
    /// (which aborts the process) half-way through the call.
    pub fn check_fits(&self, batch: usize, grid: (usize, usize)) -> Result<()> {
        let need = self.config().min_working_bytes(batch as u64, grid);
        let have = self.memory;
        if need > have as f64 {
            let gib = |b: f64| b / (1u64 << 30) as f64;
            return Err(Error::shape(format!(
                "batch {batch} on a {}x{} token grid needs at least {:.1} GiB; this device \
                 has {:.1} GiB",
                grid.0,
                grid.1,
                gib(need),
                gib(have as f64)
            )));
        }
        Ok(())
    }
}

/// Checks that the tensor `name` has the shape `want` (the Rust API's inputs; the C
/// boundary builds its tensors from the checked shape).
pub fn expect_dims(name: &str, t: &Tensor, want: &[usize]) -> Result<()> {
    if t.dims() != want {
        return Err(Error::shape(format!(
            "{name} has shape {:?}; expected {want:?}",
            t.dims()
        )));
    }
    Ok(())
}
