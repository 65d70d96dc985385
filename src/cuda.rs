//! Caller-owned CUDA memory and streams (only with the `cuda` feature).
//!
//! Each bridge computes on a non-blocking stream of its own (`new_device`) in the device's
//! primary context (the one PyTorch uses too); bridges derived from it share that stream.
//! One stream per bridge is what makes concurrent calls safe on the GPU: work from every
//! host thread runs in the order it was enqueued, and the handle's lock orders the
//! enqueues, so a train step's weight writes land after the kernels of every call that
//! enqueued before it. A call on caller pointers goes:
//!   1. an event recorded on the caller's stream, which the bridge's stream waits for;
//!   2. device-to-device copies from the caller's buffers into tensors candle owns;
//!   3. the work, then device-to-device copies into the caller's output buffers;
//!   4. an event recorded on the bridge's stream, which the caller's stream waits for:
//!      in `Drop`, so a call that fails half-way still orders the copies it enqueued.
//!
//! No host synchronisation, and no tensor ever wraps foreign memory (candle would free it).
//! Every entry point restores the caller's current context (`RestoreContext`).

use crate::error::{Error, ErrorKind, Result};
use candle_core::{DType, Device, Shape, Storage, Tensor};
use cudarc::driver::{DevicePtr, sys};
use std::ffi::c_void;

fn driver(r: sys::CUresult, what: &str) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(Error::new(
            ErrorKind::Internal,
            format!("CUDA driver call {what} failed: {r:?}"),
        ))
    }
}

fn cuda_device(device: &Device) -> Result<&candle_core::CudaDevice> {
    device
        .as_cuda_device()
        .map_err(|_| Error::invalid("this bridge runs on the CPU: pass host buffers"))
}

/// The calling thread's current CUDA context, put back when dropped. candle and cudarc
/// bind the bridge's context on every call; a caller (PyTorch) whose current device is
/// another GPU would otherwise come back on the bridge's.
pub struct RestoreContext {
    saved: sys::CUcontext,
}

impl RestoreContext {
    pub fn save() -> Self {
        let mut saved: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: writes one handle into `saved`. Before the driver is initialised it
        // fails and `saved` stays NULL: no context was current.
        unsafe { sys::cuCtxGetCurrent(&mut saved) };
        RestoreContext { saved }
    }
}

impl Drop for RestoreContext {
    fn drop(&mut self) {
        let mut now: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: as in `save`; `saved` was current on this thread at the start of the
        // call (or NULL), and the primary contexts it can be are never destroyed by us.
        unsafe {
            if sys::cuCtxGetCurrent(&mut now) == sys::CUresult::CUDA_SUCCESS && now != self.saved {
                sys::cuCtxSetCurrent(self.saved);
            }
        }
    }
}

/// The caller's stream for one call, with the bridge's stream and context bound. Dropping
/// it makes the caller's stream wait for everything the call enqueued.
pub struct CallerStream {
    caller: sys::CUstream,
    ours: sys::CUstream,
    ordinal: i32,
    joined: std::cell::Cell<bool>,
}

impl CallerStream {
    /// Binds the bridge's context to this thread and orders the bridge's stream after
    /// everything already queued on `stream` (NULL: the legacy default stream).
    pub fn begin(device: &Device, ordinal: i32, stream: *mut c_void) -> Result<Self> {
        let dev = cuda_device(device)?;
        let ours = dev.cuda_stream();
        ours.context().bind_to_thread().map_err(|e| {
            Error::new(
                ErrorKind::Internal,
                format!("binding the CUDA context: {e}"),
            )
        })?;
        let s = CallerStream {
            caller: stream as sys::CUstream,
            ours: ours.cu_stream(),
            ordinal,
            joined: std::cell::Cell::new(true),
        };
        s.order(s.caller, s.ours)?;
        s.joined.set(false);
        Ok(s)
    }

    /// `waiter` waits for the work queued on `first` so far.
    fn order(&self, first: sys::CUstream, waiter: sys::CUstream) -> Result<()> {
        if first == waiter {
            return Ok(());
        }
        let mut event: sys::CUevent = std::ptr::null_mut();
        // SAFETY: plain driver calls on live streams; the event is released once recorded
        // and waited on (the driver keeps it until the wait resolves).
        unsafe {
            driver(
                sys::cuEventCreate(
                    &mut event,
                    sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32,
                ),
                "cuEventCreate",
            )?;
            let r = sys::cuEventRecord(event, first);
            let r = if r == sys::CUresult::CUDA_SUCCESS {
                sys::cuStreamWaitEvent(waiter, event, 0)
            } else {
                r
            };
            sys::cuEventDestroy_v2(event);
            driver(r, "cuEventRecord/cuStreamWaitEvent")
        }
    }

    /// The caller's stream waits for everything queued on the bridge's stream (the output
    /// copies included). `Drop` does the same for calls that end early.
    pub fn finish(&self) -> Result<()> {
        self.joined.set(true);
        self.order(self.ours, self.caller)
    }

    /// Checks that `[ptr, ptr + bytes)` is device memory of the bridge's GPU.
    pub fn check_device_ptr(&self, ptr: *const c_void, bytes: usize, name: &str) -> Result<()> {
        if ptr.is_null() {
            return Err(Error::invalid(format!("{name} is NULL")));
        }
        let p = ptr as sys::CUdeviceptr;
        let attr = |a: sys::CUpointer_attribute, out: *mut c_void| {
            // SAFETY: `out` points at storage of the attribute's type (u32, i32 or u64).
            unsafe { sys::cuPointerGetAttribute(out, a, p) }
        };
        let mut mem_type: u32 = 0;
        let r = attr(
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
            &mut mem_type as *mut u32 as *mut c_void,
        );
        let device_memory = r == sys::CUresult::CUDA_SUCCESS
            && (mem_type == sys::CUmemorytype::CU_MEMORYTYPE_DEVICE as u32
                || mem_type == sys::CUmemorytype::CU_MEMORYTYPE_UNIFIED as u32);
        if !device_memory {
            return Err(Error::invalid(format!(
                "{name} is not CUDA device memory (a host pointer?)"
            )));
        }
        let mut ordinal: i32 = -1;
        attr(
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            &mut ordinal as *mut i32 as *mut c_void,
        );
        if ordinal != self.ordinal {
            return Err(Error::invalid(format!(
                "{name} is memory of CUDA device {ordinal}; this bridge runs on device {}",
                self.ordinal
            )));
        }
        let (mut start, mut size): (u64, u64) = (0, 0);
        let r1 = attr(
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
            &mut start as *mut u64 as *mut c_void,
        );
        let r2 = attr(
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_RANGE_SIZE,
            &mut size as *mut u64 as *mut c_void,
        );
        if r1 == sys::CUresult::CUDA_SUCCESS
            && r2 == sys::CUresult::CUDA_SUCCESS
            && (p as u64).saturating_add(bytes as u64) > start.saturating_add(size)
        {
            return Err(Error::invalid(format!(
                "{name} needs {bytes} bytes but its allocation ends {} bytes after it",
                start.saturating_add(size).saturating_sub(p as u64)
            )));
        }
        Ok(())
    }

    /// A tensor candle owns, filled from the caller's device buffer by a copy on
    /// candle's stream.
    pub fn read(
        &self,
        device: &Device,
        ptr: *const c_void,
        shape: Shape,
        dtype: DType,
        name: &str,
    ) -> Result<Tensor> {
        let bytes = shape.elem_count() * dtype.size_in_bytes();
        self.check_device_ptr(ptr, bytes, name)?;
        // SAFETY: every element is written by the copy below before any use.
        let t = unsafe { Tensor::empty(shape, dtype, device)? };
        with_device_ptr(&t, |dst| {
            // SAFETY: both ranges are `bytes` long device memory (checked / just allocated).
            driver(
                unsafe {
                    sys::cuMemcpyDtoDAsync_v2(dst, ptr as sys::CUdeviceptr, bytes, self.ours)
                },
                "cuMemcpyDtoDAsync (input)",
            )
        })?;
        Ok(t)
    }

    /// Copies `t` (cast to `dtype`) into the caller's device buffer on candle's stream.
    pub fn write(&self, t: &Tensor, ptr: *mut c_void, dtype: DType, name: &str) -> Result<()> {
        let t = t.to_dtype(dtype)?.contiguous()?;
        let bytes = t.elem_count() * dtype.size_in_bytes();
        self.check_device_ptr(ptr, bytes, name)?;
        with_device_ptr(&t, |src| {
            // SAFETY: as in `read`. `t` may be dropped right after: candle frees its
            // memory in stream order, after this copy.
            driver(
                unsafe {
                    sys::cuMemcpyDtoDAsync_v2(ptr as sys::CUdeviceptr, src, bytes, self.ours)
                },
                "cuMemcpyDtoDAsync (output)",
            )
        })
    }
}

impl Drop for CallerStream {
    fn drop(&mut self) {
        if !self.joined.get() {
            // An early return: the input copies may still be reading the caller's buffers.
            let _ = self.order(self.ours, self.caller);
        }
    }
}

/// Runs `f` on the device address of a contiguous CUDA tensor's first element. cudarc's
/// access guard lives until `f` returns, so the copy `f` enqueues is inside it.
fn with_device_ptr<R>(t: &Tensor, f: impl FnOnce(sys::CUdeviceptr) -> Result<R>) -> Result<R> {
    fn on<T: cudarc::driver::DeviceRepr, R>(
        slice: &cudarc::driver::CudaSlice<T>,
        stream: &cudarc::driver::CudaStream,
        offset: u64,
        f: impl FnOnce(sys::CUdeviceptr) -> Result<R>,
    ) -> Result<R> {
        let (base, _access) = slice.device_ptr(stream);
        f(base + offset)
    }
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Err(Error::new(ErrorKind::Internal, "expected a CUDA tensor"));
    };
    let stream = cs.device.cuda_stream();
    let offset = (layout.start_offset() * t.dtype().size_in_bytes()) as u64;
    match t.dtype() {
        DType::F32 => on(cs.as_cuda_slice::<f32>()?, &stream, offset, f),
        DType::BF16 => on(cs.as_cuda_slice::<half::bf16>()?, &stream, offset, f),
        DType::F16 => on(cs.as_cuda_slice::<half::f16>()?, &stream, offset, f),
        other => Err(Error::new(
            ErrorKind::Internal,
            format!("no device copies for {other:?}"),
        )),
    }
}

/// A CUDA device for `ordinal` that computes on a non-blocking stream of its own (not
/// candle's per-thread default stream, on which cudarc records no events and which
/// serialises with the legacy default stream), with a clear error where there is none.
pub fn new_device(ordinal: i32) -> Result<Device> {
    let device = Device::new_cuda_with_stream(ordinal as usize).map_err(|e| {
        Error::new(
            ErrorKind::Device,
            format!("device = {ordinal}: no usable CUDA device ({e})"),
        )
    })?;
    keep_pool_memory(&device)?;
    crate::log::emit(
        crate::log::Level::Info,
        format!("CUDA device {ordinal}: a bridge with a non-blocking stream of its own"),
    );
    Ok(device)
}

/// The CUDA devices the driver reports (0 when the driver cannot start).
pub fn device_count() -> i32 {
    cudarc::driver::CudaContext::device_count().unwrap_or(0)
}

/// The total memory of the bridge's GPU, in bytes.
pub fn total_memory(device: &Device) -> Result<u64> {
    let ctx = cuda_device(device)?.cuda_stream().context().clone();
    let mut bytes: usize = 0;
    // SAFETY: writes one size into `bytes`; the device handle is the context's own.
    driver(
        unsafe { sys::cuDeviceTotalMem_v2(&mut bytes, ctx.cu_device()) },
        "cuDeviceTotalMem",
    )?;
    Ok(bytes as u64)
}

/// Raises the release threshold of the device's default memory pool (which cudarc's
/// stream-ordered allocations come from) to "never", once per device. At the default of
/// 0 every synchronisation (a PyTorch `.item()`, our loss read back) returns the pool's
/// free memory to the driver, and the next call maps gigabytes again. The pool is the
/// process-wide default one: PyTorch shares it only when it runs with
/// `PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync`.
fn keep_pool_memory(device: &Device) -> Result<()> {
    static DONE: std::sync::Mutex<Vec<i32>> = std::sync::Mutex::new(Vec::new());
    let ctx = cuda_device(device)?.cuda_stream().context().clone();
    let ordinal = ctx.ordinal() as i32;
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if done.contains(&ordinal) {
        return Ok(());
    }
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: `pool` receives the device's default pool handle (owned by the driver, never
    // freed by us); the attribute's value is a u64, as the driver reads it.
    unsafe {
        driver(
            sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()),
            "cuDeviceGetDefaultMemPool",
        )?;
        driver(
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut c_void,
            ),
            "cuMemPoolSetAttribute(RELEASE_THRESHOLD)",
        )?;
    }
    done.push(ordinal);
    crate::log::emit(
        crate::log::Level::Info,
        format!(
            "CUDA device {ordinal}: the default memory pool's release threshold raised to \
             UINT64_MAX (process-wide)"
        ),
    );
    Ok(())
}
