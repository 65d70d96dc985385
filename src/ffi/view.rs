//! A caller's tensor at the boundary: where its first element is, its dtype, shape and name,
//! and whether it is host memory. The DLPack calls read views from `DLTensor` descriptors
//! (`dlpack.rs`); the pointer calls build the same views from their scalar arguments and
//! the checked call shape. Below this, one function per operation (`ops.rs`) takes views.

use super::types::*;
use crate::error::{Error, Result};
use std::ffi::c_void;

/// A buffer's element type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufDtype {
    F32,
    F16,
    Bf16,
}

impl BufDtype {
    /// The type of a `BRIDGE_DTYPE_*` code.
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

    pub fn name(self) -> &'static str {
        match self {
            BufDtype::F32 => "float32",
            BufDtype::F16 => "float16",
            BufDtype::Bf16 => "bfloat16",
        }
    }

    pub fn size(self) -> usize {
        match self {
            BufDtype::F32 => 4,
            BufDtype::F16 | BufDtype::Bf16 => 2,
        }
    }
}

/// A caller's tensor: `shape` elements of `dtype`, compact row-major from `ptr` (which a
/// pointer call may have passed as NULL: `Io` refuses it on first use, naming it).
#[derive(Clone, Debug)]
pub struct View {
    pub name: &'static str,
    pub ptr: *mut c_void,
    pub dtype: BufDtype,
    pub shape: Vec<usize>,
    /// Host memory; otherwise device memory of the bridge's GPU.
    pub host: bool,
}

impl View {
    /// A pointer call's buffer of `shape` (from the checked call shape, whose products fit).
    pub fn raw(
        name: &'static str,
        ptr: *const c_void,
        dtype: BufDtype,
        shape: &[usize],
        host: bool,
    ) -> View {
        View {
            name,
            ptr: ptr as *mut c_void,
            dtype,
            shape: shape.to_vec(),
            host,
        }
    }

    /// Elements, when their bytes fit in the address space (`checked_numel`).
    pub fn numel(&self) -> Option<usize> {
        checked_numel(&self.shape, self.dtype)
    }

    /// A shape error unless the view has the shape `want`, naming both.
    pub fn expect_shape(&self, want: &[usize]) -> Result<()> {
        if self.shape != want {
            return Err(Error::shape(format!(
                "{} has shape {:?}; expected {want:?}",
                self.name, self.shape
            )));
        }
        Ok(())
    }
}

/// The element count of `shape` with elements of `dtype`, if its bytes fit in the address
/// space: every size product at the boundary goes through this (a product that wraps
/// would pass a huge tensor as a small one).
pub fn checked_numel(shape: &[usize], dtype: BufDtype) -> Option<usize> {
    let n = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))?;
    n.checked_mul(dtype.size())
        .filter(|bytes| *bytes <= isize::MAX as usize)
        .map(|_| n)
}

/// A pointer call's batch: positive (an invalid argument otherwise).
pub fn positive_batch(batch: i64) -> Result<usize> {
    match usize::try_from(batch) {
        Ok(b) if b > 0 => Ok(b),
        _ => Err(Error::invalid(format!("batch = {batch}: must be > 0"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_that_wrap_are_refused() {
        assert_eq!(checked_numel(&[3, 4, 5], BufDtype::F32), Some(60));
        assert_eq!(checked_numel(&[], BufDtype::F32), Some(1));
        assert_eq!(
            checked_numel(&[7, 7905747460161236407], BufDtype::F32),
            None
        );
        assert_eq!(checked_numel(&[1 << 62, 2], BufDtype::F16), None);
        assert!(positive_batch(0).unwrap_err().message.contains("batch = 0"));
        assert!(positive_batch(i64::MIN).is_err());
        assert!(
            BufDtype::from_code(7)
                .unwrap_err()
                .message
                .contains("unknown")
        );
    }
}
