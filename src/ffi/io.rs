//! The caller's buffers for one call: host memory (size arithmetic that cannot overflow,
//! f32/f16/bf16 conversion at the boundary, NaN checks) or, with the `cuda` feature,
//! device memory of the bridge's GPU ordered on the caller's stream (`crate::cuda`). All
//! of ffi's CUDA code is here.

use super::types::*;
use crate::bridge::Bridge;
use crate::error::{Error, ErrorKind, Result};
use candle_core::Tensor;
use std::ffi::c_void;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufDtype {
    F32,
    F16,
    Bf16,
}

impl BufDtype {
    pub fn from_code(code: i32) -> Result<Self> {
        match code {
            BRIDGE_DTYPE_F32 => Ok(BufDtype::F32),
            BRIDGE_DTYPE_F16 => Ok(BufDtype::F16),
            BRIDGE_DTYPE_BF16 => Ok(BufDtype::Bf16),
            other => Err(Error::invalid(format!(
                "dtype = {other}: unknown code (0 = f32, 1 = f16, 2 = bf16)"
            ))),
        }
    }
    /// The candle dtype of the same layout.
    pub fn candle(self) -> candle_core::DType {
        match self {
            BufDtype::F32 => candle_core::DType::F32,
            BufDtype::F16 => candle_core::DType::F16,
            BufDtype::Bf16 => candle_core::DType::BF16,
        }
    }

    pub fn size(self) -> usize {
        match self {
            BufDtype::F32 => 4,
            BufDtype::F16 | BufDtype::Bf16 => 2,
        }
    }
}

/// Elements in a buffer of `batch` samples of `per_sample` elements, checking that the
/// byte count fits in memory.
pub fn element_count(batch: i64, per_sample: usize, dtype: BufDtype) -> Result<usize> {
    if batch <= 0 {
        return Err(Error::invalid(format!("batch = {batch}: must be > 0")));
    }
    let n = usize::try_from(batch)
        .ok()
        .and_then(|b| b.checked_mul(per_sample))
        .filter(|n| {
            n.checked_mul(dtype.size())
                .is_some_and(|bytes| bytes <= isize::MAX as usize)
        });
    n.ok_or_else(|| Error::invalid(format!("batch = {batch}: the buffer size overflows")))
}

fn non_null<T>(ptr: *const T, name: &str) -> Result<()> {
    if ptr.is_null() {
        Err(Error::invalid(format!("{name} is NULL")))
    } else {
        Ok(())
    }
}

/// Copies `count` elements of `dtype` from a caller's host buffer into f32.
///
/// # Safety
/// `ptr` must be NULL or point to `count` readable elements of `dtype`.
unsafe fn read_host(
    ptr: *const c_void,
    count: usize,
    dtype: BufDtype,
    name: &str,
) -> Result<Vec<f32>> {
    non_null(ptr, name)?;
    // SAFETY: the caller guarantees the extent; bytes have no alignment requirement.
    let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, count * dtype.size()) };
    Ok(match dtype {
        BufDtype::F32 => {
            let mut out = vec![0f32; count];
            // SAFETY: `out` has exactly `bytes.len()` bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    bytes.as_ptr(),
                    out.as_mut_ptr() as *mut u8,
                    bytes.len(),
                )
            };
            out
        }
        BufDtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_ne_bytes([c[0], c[1]]).to_f32())
            .collect(),
        BufDtype::Bf16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_ne_bytes([c[0], c[1]]).to_f32())
            .collect(),
    })
}

/// Writes f32 values into a caller's host buffer as `dtype`.
///
/// # Safety
/// `ptr` must be NULL or point to `data.len()` writable elements of `dtype`.
unsafe fn write_host(ptr: *mut c_void, data: &[f32], dtype: BufDtype, name: &str) -> Result<()> {
    non_null(ptr, name)?;
    // SAFETY: the caller guarantees room for `data.len()` elements of `dtype` at `ptr`;
    // bytes have no alignment requirement.
    let out = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, data.len() * dtype.size()) };
    match dtype {
        // SAFETY: `out` is exactly `data`'s size in bytes, and the two do not overlap
        // (one is the caller's buffer, the other ours).
        BufDtype::F32 => unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr() as *const u8, out.as_mut_ptr(), out.len())
        },
        BufDtype::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(data) {
                o.copy_from_slice(&half::f16::from_f32(*v).to_ne_bytes());
            }
        }
        BufDtype::Bf16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(data) {
                o.copy_from_slice(&half::bf16::from_f32(*v).to_ne_bytes());
            }
        }
    }
    Ok(())
}

/// Rejects NaN and infinities in an input, naming the first bad element.
fn check_finite(values: &[f32], name: &str) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::new(
            ErrorKind::NonFinite,
            format!("{name}[{i}] = {}: inputs must be finite", values[i]),
        )),
    }
}

/// Where the caller's buffers live.
enum Place {
    Host,
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CallerStream),
}

/// The caller's buffers for one compute call: `batch` samples each (each buffer of its
/// own dtype), in host memory, or on a CUDA bridge in device memory of its GPU with the
/// work ordered after the caller's stream. Dropping it (on an error path too) makes the
/// caller's stream wait for what the call enqueued.
pub struct Io<'a> {
    bridge: &'a Bridge,
    batch: i64,
    shape: CallShape,
    place: Place,
}

/// The latent size of a call and the token grid it gives.
#[derive(Clone, Copy, Debug)]
pub struct CallShape {
    pub height: usize,
    pub width: usize,
    pub grid: (usize, usize),
}

impl CallShape {
    /// `height x width` latents on `bridge`: sides that are positive multiples of
    /// `2^adapter_depth` (a shape error otherwise).
    pub fn of(bridge: &Bridge, height: i64, width: i64) -> Result<Self> {
        let grid = bridge.config().token_grid(height, width)?;
        Ok(CallShape {
            height: height as usize,
            width: width as usize,
            grid,
        })
    }

    /// Tokens per sample.
    pub fn tokens(&self) -> usize {
        self.grid.0 * self.grid.1
    }
}

impl<'a> Io<'a> {
    /// Host buffers, whatever the bridge's device.
    pub fn host(bridge: &'a Bridge, batch: i64, shape: CallShape) -> Self {
        Io {
            bridge,
            batch,
            shape,
            place: Place::Host,
        }
    }

    /// Buffers where the bridge lives: host memory for a CPU bridge; device memory of its
    /// GPU for a CUDA bridge, ordered after the work queued on `stream` so far.
    pub fn for_bridge(
        bridge: &'a Bridge,
        batch: i64,
        shape: CallShape,
        stream: *mut c_void,
    ) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if bridge.device().is_cuda() {
            let s =
                crate::cuda::CallerStream::begin(bridge.device(), bridge.device_ordinal(), stream)?;
            return Ok(Io {
                place: Place::Cuda(s),
                ..Self::host(bridge, batch, shape)
            });
        }
        let _ = stream;
        Ok(Self::host(bridge, batch, shape))
    }

    /// The call's latent size and token grid.
    pub fn shape(&self) -> CallShape {
        self.shape
    }

    /// Elements of one latent sample `[in_ch, height, width]`.
    pub fn latent_numel(&self) -> usize {
        let s = self.shape;
        self.bridge.config().latent_numel(s.height, s.width)
    }

    /// Checks an output buffer of `per_sample` elements per sample before any work: not
    /// NULL, a size that fits in memory and, on CUDA, device memory of the bridge's GPU at
    /// least that large.
    pub fn check_output(
        &self,
        ptr: *const c_void,
        per_sample: usize,
        dtype: BufDtype,
        name: &str,
    ) -> Result<()> {
        non_null(ptr, name)?;
        let bytes = element_count(self.batch, per_sample, dtype)? * dtype.size();
        #[cfg(feature = "cuda")]
        if let Place::Cuda(s) = &self.place {
            return s.check_device_ptr(ptr, bytes, name);
        }
        let _ = bytes;
        Ok(())
    }

    /// `batch` samples of `shape` from the caller's buffer, as f32 on the bridge's
    /// device. Host input is checked for NaN/Inf when `finite` is set; device input is
    /// not (that would need a host sync).
    ///
    /// # Safety
    /// `ptr` must be NULL or hold `batch * prod(shape)` elements of the call's dtype, in
    /// host memory for host buffers (device memory is checked with the driver).
    pub unsafe fn read(
        &self,
        ptr: *const c_void,
        dtype: BufDtype,
        shape: &[usize],
        name: &str,
        finite: bool,
    ) -> Result<Tensor> {
        let n = element_count(self.batch, shape.iter().product(), dtype)?;
        let mut dims = vec![self.batch as usize];
        dims.extend_from_slice(shape);
        let device = self.bridge.device();
        match &self.place {
            Place::Host => {
                // SAFETY: `n` elements at `ptr`, per this function's contract.
                let values = unsafe { read_host(ptr, n, dtype, name)? };
                if finite {
                    check_finite(&values, name)?;
                }
                Ok(Tensor::from_vec(values, dims, device)?)
            }
            #[cfg(feature = "cuda")]
            Place::Cuda(s) => {
                let t = s.read(device, ptr, dims.into(), dtype.candle(), name)?;
                Ok(t.to_dtype(candle_core::DType::F32)?)
            }
        }
    }

    /// The caller's `latents` `[batch, in_ch, height, width]`.
    ///
    /// # Safety
    /// As `read`.
    pub unsafe fn latents(
        &self,
        ptr: *const c_void,
        dtype: BufDtype,
        finite: bool,
    ) -> Result<Tensor> {
        let shape = [
            self.bridge.config().in_ch,
            self.shape.height,
            self.shape.width,
        ];
        // SAFETY: forwarded contract.
        unsafe { self.read(ptr, dtype, &shape, "latents", finite) }
    }

    /// Writes `t` into the caller's output buffer in the call's dtype.
    ///
    /// # Safety
    /// `ptr` must be NULL or hold `t`'s elements in the call's dtype (host memory for host
    /// buffers; device memory is checked with the driver).
    pub unsafe fn write(
        &self,
        ptr: *mut c_void,
        t: &Tensor,
        dtype: BufDtype,
        name: &str,
    ) -> Result<()> {
        match &self.place {
            // SAFETY: `t`'s elements fit at `ptr`, per this function's contract.
            Place::Host => unsafe { write_host(ptr, &tensor_values(t)?, dtype, name) },
            #[cfg(feature = "cuda")]
            Place::Cuda(s) => s.write(t, ptr, dtype.candle(), name),
        }
    }

    /// Writes one value into a caller's host buffer (a loss read back from the device).
    ///
    /// # Safety
    /// `ptr` must be NULL or hold one element of `dtype` in host memory.
    pub unsafe fn write_host_value(
        ptr: *mut c_void,
        value: f32,
        dtype: BufDtype,
        name: &str,
    ) -> Result<()> {
        // SAFETY: one element at `ptr`, per this function's contract.
        unsafe { write_host(ptr, &[value], dtype, name) }
    }

    /// Makes the caller's stream wait for the results (device buffers only); dropping
    /// the `Io` does the same on error paths.
    pub fn finish(&self) -> Result<()> {
        match &self.place {
            Place::Host => Ok(()),
            #[cfg(feature = "cuda")]
            Place::Cuda(s) => s.finish(),
        }
    }
}

/// A tensor's values as one f32 vector (host outputs).
fn tensor_values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_conversions() {
        assert!(element_count(0, 10, BufDtype::F32).is_err());
        assert!(element_count(-3, 10, BufDtype::F32).is_err());
        assert!(
            element_count(i64::MAX, 4096, BufDtype::F32)
                .unwrap_err()
                .message
                .contains("overflows")
        );
        assert_eq!(element_count(3, 10, BufDtype::F16).unwrap(), 30);
        assert!(
            BufDtype::from_code(7)
                .unwrap_err()
                .message
                .contains("unknown")
        );
        let src = [1.5f32, -2.25, 65504.0];
        for dt in [BufDtype::F32, BufDtype::F16, BufDtype::Bf16] {
            let mut buf = vec![0u8; 3 * dt.size()];
            // SAFETY: `buf` holds exactly three elements of `dt`.
            unsafe { write_host(buf.as_mut_ptr() as *mut c_void, &src, dt, "x").unwrap() };
            let back = unsafe { read_host(buf.as_ptr() as *const c_void, 3, dt, "x").unwrap() };
            assert_eq!(&back[..2], &src[..2], "{dt:?}");
        }
    }
}
