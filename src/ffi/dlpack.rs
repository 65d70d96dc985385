//! DLPack 1.x tensor descriptors at the boundary, and their checks.
//!
//! The header declares `DLDevice`, `DLDataType` and `DLTensor` itself, from the DLPack
//! specification (https://dmlc.github.io/dlpack/latest/c_api.html), under the guard of
//! the real `dlpack.h` (`DLPACK_DLPACK_H_`), so a caller may include either first. The
//! Rust mirrors below are kept out of cbindgen's output (`cbindgen:ignore`): the functions
//! name the types bare (`const DLTensor *`), as `dlpack.h`'s anonymous typedefs need.
//! `tests/c/test_dlpack_layout.c` checks the offsets against the `dlpack.h` the torch
//! wheel ships.

use super::view::{BufDtype, View};
use crate::bridge::Bridge;
use crate::error::{Error, Result};
use std::ffi::c_void;

/// `DLDevice`: where a tensor's memory is (`device_type` is DLPack's `DLDeviceType`).
/// cbindgen:ignore
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DLDevice {
    pub device_type: i32,
    pub device_id: i32,
}

/// `DLDataType`: `code` (0 int, 1 uint, 2 float, 4 bfloat), `bits`, `lanes`.
/// cbindgen:ignore
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DLDataType {
    pub code: u8,
    pub bits: u8,
    pub lanes: u16,
}

/// `DLTensor`: the elements start at `data + byte_offset`; `strides` in elements, NULL
/// for compact row-major.
/// cbindgen:ignore
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DLTensor {
    pub data: *mut c_void,
    pub device: DLDevice,
    pub ndim: i32,
    pub dtype: DLDataType,
    pub shape: *mut i64,
    pub strides: *mut i64,
    pub byte_offset: u64,
}

/// DLPack device types this library reads.
pub const DL_CPU: i32 = 1;
pub const DL_CUDA: i32 = 2;
pub const DL_CUDA_HOST: i32 = 3;
pub const DL_CUDA_MANAGED: i32 = 13;
/// DLPack type codes.
const DL_FLOAT: u8 = 2;
const DL_BFLOAT: u8 = 4;

/// Reads and checks the descriptor `t` named `name`: not NULL, data not NULL, a shape of
/// non-negative sizes, a float dtype (f32, f16, bf16; one lane), compact row-major
/// strides (a stride of a size-1 dimension is free) and memory where `bridge` can use
/// it. `host_ok`: host memory is accepted on a CUDA bridge too (a loss read back).
///
/// # Safety
/// `t` must be NULL or point to a `DLTensor` whose `shape` (and `strides`, when not NULL)
/// hold `ndim` elements.
pub unsafe fn view(
    t: *const DLTensor,
    name: &'static str,
    bridge: &Bridge,
    host_ok: bool,
) -> Result<View> {
    if t.is_null() {
        return Err(Error::invalid(format!("{name} is NULL")));
    }
    // SAFETY: non-NULL, and a DLTensor by the contract; a plain copy of its fields.
    let t = unsafe { *t };
    if t.data.is_null() {
        return Err(Error::invalid(format!("{name}.data is NULL")));
    }
    let ndim = usize::try_from(t.ndim)
        .ok()
        .filter(|n| *n <= 8)
        .ok_or_else(|| Error::invalid(format!("{name}.ndim = {}: must be in 0..=8", t.ndim)))?;
    if ndim > 0 && t.shape.is_null() {
        return Err(Error::invalid(format!("{name}.shape is NULL")));
    }
    // SAFETY: `ndim` elements by the contract (checked non-NULL when ndim > 0).
    let dims: &[i64] = if ndim == 0 {
        &[]
    } else {
        unsafe { std::slice::from_raw_parts(t.shape, ndim) }
    };
    let shape = dims
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<std::result::Result<Vec<usize>, _>>()
        .map_err(|_| Error::invalid(format!("{name}.shape = {dims:?}: sizes must be >= 0")))?;
    let dtype = match (t.dtype.code, t.dtype.bits, t.dtype.lanes) {
        (DL_FLOAT, 32, 1) => BufDtype::F32,
        (DL_FLOAT, 16, 1) => BufDtype::F16,
        (DL_BFLOAT, 16, 1) => BufDtype::Bf16,
        (code, bits, lanes) => {
            return Err(Error::invalid(format!(
                "{name} has dtype code {code}, {bits} bits, {lanes} lanes; use float32, \
                 float16 or bfloat16"
            )));
        }
    };
    // An empty tensor has no layout to check (torch gives it ordinary strides); its
    // shape is refused where it matters.
    if !t.strides.is_null() && !shape.contains(&0) {
        // SAFETY: `ndim` elements by the contract.
        let strides = unsafe { std::slice::from_raw_parts(t.strides, ndim) };
        let mut expected: i64 = 1;
        for (&size, &stride) in shape.iter().zip(strides).rev() {
            if size != 1 && stride != expected {
                return Err(Error::invalid(format!(
                    "{name} has strides {strides:?} for shape {dims:?}: pass a compact \
                     row-major tensor (e.g. .contiguous())"
                )));
            }
            expected = expected.saturating_mul(size as i64);
        }
    }
    let ptr = (t.data as usize)
        .checked_add(usize::try_from(t.byte_offset).unwrap_or(usize::MAX))
        .ok_or_else(|| {
            Error::invalid(format!(
                "{name}.byte_offset = {}: past the address space",
                t.byte_offset
            ))
        })? as *mut c_void;
    let (kind, id) = (t.device.device_type, t.device.device_id);
    let host = matches!(kind, DL_CPU | DL_CUDA_HOST);
    let ordinal = bridge.device_ordinal();
    let fits = if ordinal < 0 {
        host
    } else {
        (host && host_ok) || (matches!(kind, DL_CUDA | DL_CUDA_MANAGED) && id == ordinal)
    };
    if !fits {
        let there = if ordinal < 0 {
            "the CPU: pass host (kDLCPU) tensors".to_string()
        } else {
            format!("CUDA device {ordinal}: pass tensors of that device")
        };
        return Err(Error::invalid(format!(
            "{name} is on DLPack device type {kind}, id {id}; this bridge runs on {there}"
        )));
    }
    Ok(View {
        name,
        ptr,
        dtype,
        shape,
        host,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bridge::{Bridge, BridgeOptions};
    use crate::config::BridgeConfig;

    fn tiny() -> Bridge {
        Bridge::new(&BridgeOptions {
            config: BridgeConfig::preset("tiny").unwrap(),
            ..Default::default()
        })
        .unwrap()
    }

    fn tensor(data: &mut [f32], shape: &mut [i64], strides: Option<&mut [i64]>) -> DLTensor {
        DLTensor {
            data: data.as_mut_ptr().cast(),
            device: DLDevice {
                device_type: DL_CPU,
                device_id: 0,
            },
            ndim: shape.len() as i32,
            dtype: DLDataType {
                code: DL_FLOAT,
                bits: 32,
                lanes: 1,
            },
            shape: shape.as_mut_ptr(),
            strides: strides.map_or(std::ptr::null_mut(), |s| s.as_mut_ptr()),
            byte_offset: 0,
        }
    }

    #[test]
    fn descriptors_are_read_and_checked() {
        let b = tiny();
        let mut data = vec![0f32; 24];
        let mut shape = [2i64, 1, 3, 4];
        // Compact strides, with a free stride on the size-1 dimension.
        let mut strides = [12i64, 99, 4, 1];
        let mut t = tensor(&mut data, &mut shape, Some(&mut strides));
        t.byte_offset = 8;
        // SAFETY (all views): descriptors of live arrays of the stated lengths.
        let v = unsafe { view(&t, "x", &b, false) }.unwrap();
        assert_eq!(
            (v.shape.as_slice(), v.dtype, v.host),
            (&[2, 1, 3, 4][..], BufDtype::F32, true)
        );
        assert_eq!(v.ptr as usize, data.as_ptr() as usize + 8);
        let err = |t: &DLTensor| unsafe { view(t, "x", &b, false) }.unwrap_err().message;
        let mut bad = [12i64, 1, 1, 3]; // transposed inner dims
        assert!(err(&tensor(&mut data, &mut shape, Some(&mut bad))).contains("strides"));
        let mut t2 = tensor(&mut data, &mut shape, None);
        t2.dtype = DLDataType {
            code: 0,
            bits: 32,
            lanes: 1,
        };
        assert!(err(&t2).contains("dtype code 0"));
        t2 = tensor(&mut data, &mut shape, None);
        t2.device = DLDevice {
            device_type: DL_CUDA,
            device_id: 0,
        };
        assert!(err(&t2).contains("device type 2"));
        t2 = tensor(&mut data, &mut shape, None);
        t2.data = std::ptr::null_mut();
        assert!(err(&t2).contains("x.data is NULL"));
        let mut neg = [2i64, -1, 3, 4];
        assert!(err(&tensor(&mut data, &mut neg, None)).contains(">= 0"));
        // A product that wraps in 64 bits (to 1, in release builds) has no element count.
        let mut wraps = [7i64, 7905747460161236407];
        let v = unsafe { view(&tensor(&mut data, &mut wraps, None), "x", &b, false) }.unwrap();
        assert_eq!(v.numel(), None);
        assert!(unsafe { view(std::ptr::null(), "x", &b, false) }.is_err());
        // An empty tensor with torch's strides for it is a view like any other (its zero
        // size is refused by the call's shape checks, as a shape error).
        let mut empty = [3i64, 4, 0, 16];
        let mut torch_strides = [64i64, 16, 16, 1];
        let t = tensor(&mut data, &mut empty, Some(&mut torch_strides));
        assert_eq!(
            unsafe { view(&t, "x", &b, false) }.unwrap().numel(),
            Some(0)
        );
    }
}
