//! Caller buffers: size arithmetic that cannot overflow, and conversion of f32/f16/bf16
//! elements at the boundary (the CPU computes in f32).

use super::types::*;
use crate::error::{Error, ErrorKind, Result};
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
pub unsafe fn read_host(
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
pub unsafe fn write_host(
    ptr: *mut c_void,
    data: &[f32],
    dtype: BufDtype,
    name: &str,
) -> Result<()> {
    non_null(ptr, name)?;
    let out = ptr as *mut u8;
    // SAFETY (all arms): the caller guarantees `data.len()` elements of room at `ptr`.
    match dtype {
        BufDtype::F32 => unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr() as *const u8, out, data.len() * 4)
        },
        BufDtype::F16 => {
            for (i, v) in data.iter().enumerate() {
                let b = half::f16::from_f32(*v).to_ne_bytes();
                unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), out.add(2 * i), 2) };
            }
        }
        BufDtype::Bf16 => {
            for (i, v) in data.iter().enumerate() {
                let b = half::bf16::from_f32(*v).to_ne_bytes();
                unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), out.add(2 * i), 2) };
            }
        }
    }
    Ok(())
}

/// Rejects NaN and infinities in an input, naming the first bad element.
pub fn check_finite(values: &[f32], name: &str) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::new(
            ErrorKind::NonFinite,
            format!("{name}[{i}] = {}: inputs must be finite", values[i]),
        )),
    }
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
            unsafe { write_host(buf.as_mut_ptr() as *mut c_void, &src, dt, "x").unwrap() };
            let back = unsafe { read_host(buf.as_ptr() as *const c_void, 3, dt, "x").unwrap() };
            assert_eq!(&back[..2], &src[..2], "{dt:?}");
        }
    }
}
