//! The crate's global allocator: the system allocator, plus a cache of large
//! blocks (1 MiB and up) that are handed back by exact size.
//!
//! A forward or train step allocates and frees the same few dozen activation buffers
//! (6 to 75 MB) every call. glibc serves blocks that size with fresh `mmap`s and returns
//! them with `munmap`, so every buffer is page-faulted and zeroed by the kernel again,
//! and every release shoots down TLBs on the other cores: a perf profile of a train step
//! showed 8-18% of the time in `clear_page`, page faults and TLB flushes. Kept blocks
//! are reused as they are (zeroed with `memset` where zeroed memory is asked for).
//!
//! The cache holds at most `DINO_BRIDGE_ALLOC_CACHE_MB` (default 8192; 0 turns it off)
//! and only blocks freed by this library's code, so a host process's own allocations
//! are untouched. It is the global allocator of the artifacts this crate builds (the
//! cdylib, `bridge-train`, tests) and of Rust programs that link the rlib, while the
//! default feature `caching-allocator` is on; without it, `hits_and_misses` and
//! `cached_bytes` stay at zero.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

const MIN_BLOCK: usize = 1 << 20;
/// Sizes are rounded up to this grain, so buffers of nearly equal size share blocks.
const GRAIN: usize = 1 << 16;
const SLOTS: usize = 1024;
/// The default bound on cached bytes, in MiB: above a default-config train step's
/// working set at batch 32 (about 5 GB), so that a steady state reuses every buffer.
const DEFAULT_CAP_MB: usize = 8192;
/// Alignment every cached block is allocated with (covers any `Vec<T>` of plain data).
const BLOCK_ALIGN: usize = 64;

pub struct CachingAllocator;

struct Cache {
    lock: AtomicBool,
    /// (rounded size, address); size 0 marks a free slot.
    slots: std::cell::UnsafeCell<[(usize, usize); SLOTS]>,
    held: AtomicUsize,
    hits: AtomicUsize,
    misses: AtomicUsize,
    /// Bytes the cache may hold; `usize::MAX` until read from the environment.
    cap: AtomicUsize,
}

// SAFETY: `slots` is only touched with `lock` held.
unsafe impl Sync for Cache {}

static CACHE: Cache = Cache {
    lock: AtomicBool::new(false),
    slots: std::cell::UnsafeCell::new([(0, 0); SLOTS]),
    held: AtomicUsize::new(0),
    hits: AtomicUsize::new(0),
    misses: AtomicUsize::new(0),
    cap: AtomicUsize::new(usize::MAX),
};

impl Cache {
    fn with<R>(&self, f: impl FnOnce(&mut [(usize, usize); SLOTS]) -> R) -> R {
        while self
            .lock
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::hint::spin_loop();
        }
        // SAFETY: the lock is held.
        let r = f(unsafe { &mut *self.slots.get() });
        self.lock.store(false, Ordering::Release);
        r
    }

    fn cap(&self) -> usize {
        let cap = self.cap.load(Ordering::Relaxed);
        if cap != usize::MAX {
            return cap;
        }
        // Read once.
        let mb = env_usize(c"DINO_BRIDGE_ALLOC_CACHE_MB").unwrap_or(DEFAULT_CAP_MB);
        let cap = mb.saturating_mul(1 << 20).min(usize::MAX - 1);
        self.cap.store(cap, Ordering::Relaxed);
        cap
    }

    fn take(&self, size: usize) -> *mut u8 {
        self.with(|slots| {
            for slot in slots.iter_mut() {
                if slot.0 == size {
                    let p = slot.1 as *mut u8;
                    *slot = (0, 0);
                    self.held.fetch_sub(size, Ordering::Relaxed);
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    return p;
                }
            }
            self.misses.fetch_add(1, Ordering::Relaxed);
            std::ptr::null_mut()
        })
    }

    /// Keeps the block if there is room; false when the caller must free it.
    fn put(&self, size: usize, p: *mut u8) -> bool {
        if self.held.load(Ordering::Relaxed) + size > self.cap() {
            return false;
        }
        self.with(|slots| {
            if self.held.load(Ordering::Relaxed) + size > self.cap() {
                return false;
            }
            match slots.iter_mut().find(|s| s.0 == 0) {
                Some(slot) => {
                    *slot = (size, p as usize);
                    self.held.fetch_add(size, Ordering::Relaxed);
                    true
                }
                None => false,
            }
        })
    }
}

fn cached(layout: &Layout) -> Option<Layout> {
    if layout.size() < MIN_BLOCK || layout.align() > BLOCK_ALIGN {
        return None;
    }
    let size = layout.size().checked_next_multiple_of(GRAIN)?;
    // Blocks of a huge page or more start on one, so that they can be backed by huge
    // pages (see `fresh`).
    let align = if size >= HUGE_PAGE {
        HUGE_PAGE
    } else {
        BLOCK_ALIGN
    };
    Layout::from_size_align(size, align).ok()
}

const HUGE_PAGE: usize = 2 << 20;

/// A new block from the system. Blocks of 2 MiB and more are marked for transparent huge
/// pages (where THP is in `madvise` mode, as on Debian): 512 times fewer page faults
/// and TLB misses over the activation buffers. `DINO_BRIDGE_HUGEPAGES=0` turns it off.
unsafe fn fresh(block: Layout, zeroed: bool) -> *mut u8 {
    let p = unsafe {
        if zeroed {
            System.alloc_zeroed(block)
        } else {
            System.alloc(block)
        }
    };
    if !p.is_null() && block.size() >= HUGE_PAGE && huge_pages_wanted() {
        // SAFETY: the range is the block just allocated; advice never changes contents.
        unsafe { libc::madvise(p.cast(), block.size(), libc::MADV_HUGEPAGE) };
    }
    p
}

fn huge_pages_wanted() -> bool {
    static WANTED: AtomicUsize = AtomicUsize::new(2); // 2: not read yet
    match WANTED.load(Ordering::Relaxed) {
        2 => {
            let on = env_usize(c"DINO_BRIDGE_HUGEPAGES") != Some(0);
            WANTED.store(usize::from(on), Ordering::Relaxed);
            on
        }
        v => v == 1,
    }
}

/// A number from the environment, read without allocating (this runs inside the
/// allocator); `None` when unset or not a number.
fn env_usize(name: &std::ffi::CStr) -> Option<usize> {
    // SAFETY: `getenv` with a valid C string; the result is read at once.
    let v = unsafe { libc::getenv(name.as_ptr()) };
    if v.is_null() {
        return None;
    }
    // SAFETY: a non-NULL `getenv` result is a NUL-terminated string.
    let bytes = unsafe { std::ffi::CStr::from_ptr(v) }.to_bytes();
    std::str::from_utf8(bytes).ok()?.trim().parse().ok()
}

// SAFETY: every block comes from `System` with the layout it is returned with; cached
// blocks are exclusively owned by the cache until handed out again.
unsafe impl GlobalAlloc for CachingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match cached(&layout) {
            None => unsafe { System.alloc(layout) },
            Some(block) => {
                let p = CACHE.take(block.size());
                if p.is_null() {
                    unsafe { fresh(block, false) }
                } else {
                    p
                }
            }
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match cached(&layout) {
            None => unsafe { System.alloc_zeroed(layout) },
            Some(block) => {
                let p = CACHE.take(block.size());
                if p.is_null() {
                    unsafe { fresh(block, true) }
                } else {
                    unsafe { std::ptr::write_bytes(p, 0, layout.size()) };
                    p
                }
            }
        }
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        match cached(&layout) {
            None => unsafe { System.dealloc(p, layout) },
            Some(block) => {
                if !CACHE.put(block.size(), p) {
                    unsafe { System.dealloc(p, block) }
                }
            }
        }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        if cached(&layout).is_none() && cached(&new).is_none() {
            return unsafe { System.realloc(p, layout, new_size) };
        }
        let q = unsafe { self.alloc(new) };
        if !q.is_null() {
            unsafe {
                std::ptr::copy_nonoverlapping(p, q, layout.size().min(new_size));
                self.dealloc(p, layout);
            }
        }
        q
    }
}

/// Bytes held in the cache now (for tests and benchmarks).
pub fn cached_bytes() -> usize {
    CACHE.held.load(Ordering::Relaxed)
}

/// Large-block requests served from the cache and from the system so far.
pub fn hits_and_misses() -> (usize, usize) {
    (
        CACHE.hits.load(Ordering::Relaxed),
        CACHE.misses.load(Ordering::Relaxed),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_blocks_are_reused_and_zeroed_on_request() {
        // A size no other test allocates, so a parallel test cannot take the block.
        let n = (3 << 20) + 12_345;
        let mut a = vec![7u8; n];
        a[n - 1] = 9;
        let addr = a.as_ptr() as usize;
        drop(a);
        let (hits, _) = hits_and_misses();
        let b = vec![0u8; n];
        // glibc may hand back the same address too; the hit count is the cache's alone.
        assert!(
            hits_and_misses().0 > hits,
            "the freed block was not taken from the cache"
        );
        assert_eq!(b.as_ptr() as usize, addr, "the freed block was not reused");
        assert!(b.iter().all(|&v| v == 0), "a reused block was not zeroed");
        drop(b);
        let c = vec![1u8; n];
        assert_eq!(
            c.as_ptr() as usize,
            addr,
            "the block was not kept a second time"
        );
        drop(c);
        // Growing across the threshold keeps the contents.
        let mut v: Vec<u32> = (0..1000).collect();
        v.resize(1 << 20, 1);
        assert_eq!(v[999], 999);
        assert_eq!(v[1 << 19], 1);
    }
}
