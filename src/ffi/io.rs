//! Reading and writing the caller's tensors (`View`s) for one call: host memory (size
//! arithmetic that cannot overflow, f32/f16/bf16 conversion at the boundary, NaN checks)
//! or, with the `cuda` feature, device memory of the bridge's GPU ordered on the caller's
//! stream (`crate::cuda`). All of ffi's CUDA code is here.

use super::view::{BufDtype, View};
use crate::bridge::Bridge;
use crate::error::{Error, ErrorKind, Result};
use candle_core::Tensor;
use std::ffi::c_void;

/// Where the call's device buffers are ordered: nowhere (host buffers only), or after the
/// caller's CUDA stream.
enum Place {
    Host,
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CallerStream),
}

/// The caller's buffers of one call, read and written through their views: host memory,
/// or on a CUDA bridge device memory of its GPU, with the work ordered after the caller's
/// stream. Dropping it (on an error path too) makes the caller's stream wait for what the
/// call enqueued.
pub struct Io<'a> {
    bridge: &'a Bridge,
    place: Place,
}

impl<'a> Io<'a> {
    /// Host buffers only, whatever the bridge's device (`bridge_forward`).
    pub fn host(bridge: &'a Bridge) -> Self {
        Io {
            bridge,
            place: Place::Host,
        }
    }

    /// Buffers where the bridge lives: host memory for a CPU bridge; for a CUDA bridge,
    /// device memory of its GPU, ordered after the work queued on `stream` so far.
    pub fn for_bridge(bridge: &'a Bridge, stream: *mut c_void) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if bridge.device().is_cuda() {
            let s =
                crate::cuda::CallerStream::begin(bridge.device(), bridge.device_ordinal(), stream)?;
            return Ok(Io {
                bridge,
                place: Place::Cuda(s),
            });
        }
        let _ = stream;
        Ok(Self::host(bridge))
    }

    /// Checks an output before any work: not NULL, a size that fits in memory and, for
    /// device memory, an allocation of the bridge's GPU at least that large.
    pub fn check_output(&self, v: &View) -> Result<()> {
        non_null(v.ptr, v.name)?;
        let bytes = byte_count(v)?;
        #[cfg(feature = "cuda")]
        if let (Place::Cuda(s), false) = (&self.place, v.host) {
            return s.check_device_ptr(v.ptr, bytes, v.name);
        }
        let _ = bytes;
        Ok(())
    }

    /// The caller's tensor `v` as f32 on the bridge's device, in `v`'s shape. Host input
    /// is checked for NaN/Inf when `finite` is set; device input is not (that would need
    /// a host sync).
    ///
    /// # Safety
    /// `v.ptr` must be NULL or hold the elements `v` describes (host memory for a host
    /// view; device memory is checked with the driver).
    pub unsafe fn read(&self, v: &View, finite: bool) -> Result<Tensor> {
        let n = byte_count(v)? / v.dtype.size();
        let device = self.bridge.device();
        if v.host {
            // SAFETY: `n` elements at `v.ptr`, per this function's contract.
            let values = unsafe { read_host(v.ptr, n, v.dtype, v.name)? };
            if finite {
                check_finite(&values, v.name)?;
            }
            return Ok(Tensor::from_vec(values, v.shape.as_slice(), device)?);
        }
        match &self.place {
            #[cfg(feature = "cuda")]
            Place::Cuda(s) => {
                let shape = v.shape.as_slice().into();
                let t = s.read(device, v.ptr, shape, v.dtype.candle(), v.name)?;
                Ok(t.to_dtype(candle_core::DType::F32)?)
            }
            _ => Err(device_view_without_stream(v)),
        }
    }

    /// Writes `t` (any shape with `v`'s element count) into the caller's tensor `v`.
    ///
    /// # Safety
    /// As `read`, for writable memory.
    pub unsafe fn write(&self, v: &View, t: &Tensor) -> Result<()> {
        if v.host {
            // SAFETY: `t`'s elements fit at `v.ptr`, per this function's contract.
            return unsafe { write_host(v.ptr, &tensor_values(t)?, v.dtype, v.name) };
        }
        match &self.place {
            #[cfg(feature = "cuda")]
            Place::Cuda(s) => s.write(t, v.ptr, v.dtype.candle(), v.name),
            _ => Err(device_view_without_stream(v)),
        }
    }

    /// Makes the caller's stream wait for the results (device buffers only); dropping
    /// the `Io` does the same on error paths.
    pub fn finish(self) -> Result<()> {
        match &self.place {
            Place::Host => Ok(()),
            #[cfg(feature = "cuda")]
            Place::Cuda(s) => s.finish(),
        }
    }
}

/// The bytes of `v`'s elements, checked to fit in memory.
fn byte_count(v: &View) -> Result<usize> {
    v.numel().map(|n| n * v.dtype.size()).ok_or_else(|| {
        Error::shape(format!(
            "{} has shape {:?}: more elements than memory holds",
            v.name, v.shape
        ))
    })
}

/// Device views exist only on a CUDA bridge, whose `Io` has the caller's stream.
fn device_view_without_stream(v: &View) -> Error {
    Error::internal(format!("{}: device memory without a CUDA stream", v.name))
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

/// A tensor's values as one f32 vector (host outputs).
fn tensor_values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_conversions_round_trip() {
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
