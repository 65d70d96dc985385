//! What every entry point shares: the thread-local error message, the panic barrier,
//! the registry of live handles, and the reading/writing of size-versioned structs.

use super::types::*;
use crate::bridge::Bridge;
use crate::error::{Error, ErrorKind, Result};
use once_cell::sync::Lazy;
use parking_lot::Mutex;
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CString;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

pub fn status_of(kind: ErrorKind) -> i32 {
    match kind {
        ErrorKind::InvalidArgument => BRIDGE_ERR_INVALID_ARGUMENT,
        ErrorKind::Shape => BRIDGE_ERR_SHAPE,
        ErrorKind::Io => BRIDGE_ERR_IO,
        ErrorKind::Checkpoint => BRIDGE_ERR_CHECKPOINT,
        ErrorKind::Unsupported => BRIDGE_ERR_UNSUPPORTED,
        ErrorKind::Device => BRIDGE_ERR_DEVICE,
        ErrorKind::NonFinite => BRIDGE_ERR_NON_FINITE,
        ErrorKind::Internal => BRIDGE_ERR_INTERNAL,
        ErrorKind::AbiMismatch => BRIDGE_ERR_ABI_MISMATCH,
    }
}

pub fn set_last_error(message: &str) {
    let c = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

pub fn last_error_ptr() -> *const std::os::raw::c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// Runs an entry point's body: errors become a status plus the thread's message, and a
/// panic becomes `BRIDGE_ERR_INTERNAL` instead of unwinding into C. With CUDA, the
/// caller's current context is put back afterwards, whatever the body bound.
pub fn ffi_call(name: &str, body: impl FnOnce() -> Result<()>) -> i32 {
    #[cfg(feature = "cuda")]
    let _context = crate::cuda::RestoreContext::save();
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => BRIDGE_OK,
        Ok(Err(e)) => {
            set_last_error(&format!("{name}: {}", e.message));
            status_of(e.kind)
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_string());
            set_last_error(&format!("{name}: internal error (panic): {what}"));
            BRIDGE_ERR_INTERNAL
        }
    }
}

// Handles are opaque tokens, never addresses of Rust objects: a destroyed or made-up
// handle is found missing in the registry instead of being dereferenced, and a call in
// flight keeps its bridge alive through the `Arc` even if another thread destroys it.
static HANDLES: Lazy<Mutex<HashMap<usize, Arc<Bridge>>>> = Lazy::new(|| Mutex::new(HashMap::new()));
static NEXT_HANDLE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);

pub fn register(bridge: Bridge) -> *mut BridgeHandle {
    // Token values are multiples of 16 starting well above the zero page.
    let id = NEXT_HANDLE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let token = 0x10_0000 + id * 16;
    HANDLES.lock().insert(token, Arc::new(bridge));
    token as *mut BridgeHandle
}

pub fn lookup(handle: *const BridgeHandle) -> Result<Arc<Bridge>> {
    if handle.is_null() {
        return Err(Error::invalid("handle is NULL"));
    }
    HANDLES
        .lock()
        .get(&(handle as usize))
        .cloned()
        .ok_or_else(|| {
            Error::invalid(format!(
                "handle {handle:p} is not a live bridge (destroyed or never created)"
            ))
        })
}

pub fn unregister(handle: *mut BridgeHandle) -> Option<Arc<Bridge>> {
    HANDLES.lock().remove(&(handle as usize))
}

/// The `struct_size` the caller set in the struct `arg` points to, checked: the struct is
/// there, and its size is at least `min` and at most ours (`size_of::<T>()`).
///
/// # Safety
/// `ptr` must be NULL or point to a struct whose first field, a `u32`, is readable.
pub unsafe fn struct_size<T>(ptr: *const T, arg: &str, name: &str, min: usize) -> Result<usize> {
    if ptr.is_null() {
        return Err(Error::invalid(format!("{arg} is NULL")));
    }
    // SAFETY: non-NULL, and the first field is always present; unaligned-safe read.
    let size = unsafe { std::ptr::read_unaligned(ptr as *const u32) } as usize;
    let ours = std::mem::size_of::<T>();
    if size < min {
        return Err(Error::new(
            ErrorKind::AbiMismatch,
            format!(
                "{name}.struct_size = {size} is smaller than the minimum {min}; set it to sizeof({name})"
            ),
        ));
    }
    if size > ours {
        return Err(Error::new(
            ErrorKind::AbiMismatch,
            format!(
                "{name}.struct_size = {size} is larger than this library's {ours}: the header is newer than the library"
            ),
        ));
    }
    Ok(size)
}

/// Reads the caller's (possibly older, smaller) struct over `defaults`.
///
/// # Safety
/// `ptr` must point to at least `size` readable bytes, and `size <= size_of::<T>()`
/// (`struct_size` checks it).
pub unsafe fn read_versioned<T: Copy>(ptr: *const T, size: usize, mut defaults: T) -> T {
    // SAFETY: `size` bytes are readable at `ptr` and fit in `defaults` (the contract);
    // a byte copy, so alignment does not matter.
    unsafe {
        std::ptr::copy_nonoverlapping(ptr as *const u8, &mut defaults as *mut T as *mut u8, size)
    };
    defaults
}

/// Writes `value` into the caller's struct, at most `size` bytes, keeping its `struct_size`.
///
/// # Safety
/// `ptr` must point to at least `size` writable bytes, and `size <= size_of::<T>()`
/// (`struct_size` checks it).
pub unsafe fn write_versioned<T: Copy>(ptr: *mut T, size: usize, value: &T) {
    // SAFETY: `size` bytes of `value` are readable and writable at `ptr` (the contract).
    unsafe { std::ptr::copy_nonoverlapping(value as *const T as *const u8, ptr as *mut u8, size) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_the_internal_status_with_its_message() {
        let status = ffi_call("bridge_test", || panic!("boom {}", 42));
        assert_eq!(status, BRIDGE_ERR_INTERNAL);
        // SAFETY: the thread's message is a live NUL-terminated CString.
        let msg = unsafe { std::ffi::CStr::from_ptr(last_error_ptr()) }
            .to_str()
            .unwrap()
            .to_string();
        assert!(msg.contains("panic") && msg.contains("boom 42"), "{msg}");
        let status = ffi_call("bridge_test", || Err(Error::shape("bad shape")));
        assert_eq!(status, BRIDGE_ERR_SHAPE);
    }

    #[test]
    fn unknown_handles_are_rejected() {
        assert!(
            lookup(std::ptr::null())
                .unwrap_err()
                .message
                .contains("NULL")
        );
        assert!(
            lookup(0xdead0 as *const BridgeHandle)
                .unwrap_err()
                .message
                .contains("not a live bridge")
        );
    }
}
