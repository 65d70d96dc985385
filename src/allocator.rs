//! The crate's global allocator: the system allocator, plus a cache of large blocks
//! (128 KiB and up, mapped from the kernel directly) that are handed back by size class.
//!
//! A forward or train step allocates and frees the same few dozen activation buffers
//! (6 to 75 MB) every call. glibc serves blocks that size with fresh `mmap`s and returns
//! them with `munmap`, so every buffer is page-faulted and zeroed by the kernel again,
//! and every release shoots down TLBs on the other cores: a perf profile of a train step
//! showed 8-18% of the time in `clear_page`, page faults and TLB flushes. Kept blocks
//! are reused as they are (zeroed with `memset` where zeroed memory is asked for).
//!
//! Sizes are rounded up to classes, eight per doubling (at most 12.5% more than asked),
//! so that buffers of nearly equal size (another batch, another latent size) share
//! blocks. The cache holds no more than the large blocks that were live at once recently
//! (the working set, measured over the last `WINDOW` frees; at least 256 MiB), and at most
//! `DINO_BRIDGE_ALLOC_CACHE_MB` (default 8192; 0 turns it off): with exact sizes and a
//! fixed 8 GiB bound it had held every size a step ever asked for, 4-5 GB for a working
//! set under 1 GB (`bridge-train demo --config repa` peaked at 8.2 GB). When it is full,
//! and for blocks not taken again within `WINDOW` frees, the oldest go back to the
//! system first. Only blocks freed by this library's code are cached, so a host process's
//! own allocations are untouched. It is the global allocator of the artifacts this crate builds (the
//! cdylib, `bridge-train`, tests) and of Rust programs that link the rlib, while the
//! default feature `caching-allocator` is on; without it, `hits_and_misses` and
//! `cached_bytes` stay at zero.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Blocks from this size up are mapped and cached here (smaller ones are glibc's).
const MIN_BLOCK: usize = 1 << 20;
/// Size classes per doubling.
const CLASSES_PER_OCTAVE: u32 = 8;

/// `size` rounded up to its class: a multiple of 1/8 of the power of two below it.
fn size_class(size: usize) -> Option<usize> {
    let octave = usize::BITS - 1 - size.leading_zeros();
    let step = 1usize << octave.saturating_sub(CLASSES_PER_OCTAVE.trailing_zeros());
    size.checked_next_multiple_of(step)
}
const SLOTS: usize = 1024;
/// The default bound on cached bytes, in MiB: above a default-config train step's
/// working set at batch 32 (about 5 GB), so that a steady state reuses every buffer.
const DEFAULT_CAP_MB: usize = 8192;
/// Alignment every cached block is allocated with (covers any `Vec<T>` of plain data).
const BLOCK_ALIGN: usize = 64;

pub struct CachingAllocator;

/// A cached block: rounded size (0: a free slot), address, and the `clock` of its free.
#[derive(Clone, Copy)]
struct Slot {
    size: usize,
    addr: usize,
    freed_at: usize,
}

const EMPTY: Slot = Slot {
    size: 0,
    addr: 0,
    freed_at: 0,
};

/// Frees after which an untaken block is stale; also the window the working set is
/// measured over.
const WINDOW: usize = 4096;
/// The cache may always hold this much, whatever the working set.
const MIN_HELD: usize = 256 << 20;
/// Blocks one `put` gives back at most (they are freed after the lock is released).
const MAX_EVICT: usize = 32;

struct Cache {
    lock: AtomicBool,
    slots: std::cell::UnsafeCell<[Slot; SLOTS]>,
    /// Blocks put so far: the age of a slot is `clock - freed_at`.
    clock: AtomicUsize,
    /// Bytes of large blocks handed out and not freed, and the most of it in this window
    /// and the last.
    live: AtomicUsize,
    peak: AtomicUsize,
    last_peak: AtomicUsize,
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
    slots: std::cell::UnsafeCell::new([EMPTY; SLOTS]),
    clock: AtomicUsize::new(0),
    live: AtomicUsize::new(0),
    peak: AtomicUsize::new(0),
    last_peak: AtomicUsize::new(0),
    held: AtomicUsize::new(0),
    hits: AtomicUsize::new(0),
    misses: AtomicUsize::new(0),
    cap: AtomicUsize::new(usize::MAX),
};

impl Cache {
    fn with<R>(&self, f: impl FnOnce(&mut [Slot; SLOTS]) -> R) -> R {
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

    /// A large block of `size` handed out.
    fn lent(&self, size: usize) {
        let live = self.live.fetch_add(size, Ordering::Relaxed) + size;
        self.peak.fetch_max(live, Ordering::Relaxed);
    }

    /// The bytes the cache may hold now: the recent working set, within the bounds.
    fn room(&self) -> usize {
        let recent = self
            .peak
            .load(Ordering::Relaxed)
            .max(self.last_peak.load(Ordering::Relaxed));
        (recent * 2).max(MIN_HELD).min(self.cap())
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
                if slot.size == size {
                    let p = slot.addr as *mut u8;
                    *slot = EMPTY;
                    self.held.fetch_sub(size, Ordering::Relaxed);
                    self.hits.fetch_add(1, Ordering::Relaxed);
                    return p;
                }
            }
            self.misses.fetch_add(1, Ordering::Relaxed);
            std::ptr::null_mut()
        })
    }

    /// Keeps the block if there is room (making it by giving back stale and then the
    /// oldest blocks); false when the caller must free it. Given-back blocks are freed
    /// here, after the lock is released.
    fn put(&self, size: usize, p: *mut u8) -> bool {
        self.live.fetch_sub(size, Ordering::Relaxed);
        let cap = self.room();
        if size > cap {
            return false;
        }
        let mut evicted = [EMPTY; MAX_EVICT];
        let kept = self.with(|slots| {
            let now = self.clock.fetch_add(1, Ordering::Relaxed) + 1;
            if now.is_multiple_of(WINDOW) {
                // A new window: the working set is measured afresh.
                let peak = self
                    .peak
                    .swap(self.live.load(Ordering::Relaxed), Ordering::Relaxed);
                self.last_peak.store(peak, Ordering::Relaxed);
            }
            let mut n = 0;
            let mut evict = |slot: &mut Slot, n: &mut usize| {
                evicted[*n] = *slot;
                *n += 1;
                self.held.fetch_sub(slot.size, Ordering::Relaxed);
                *slot = EMPTY;
            };
            for slot in slots.iter_mut() {
                if n < MAX_EVICT && slot.size != 0 && now - slot.freed_at > WINDOW {
                    evict(slot, &mut n);
                }
            }
            while n < MAX_EVICT && self.held.load(Ordering::Relaxed) + size > cap {
                let Some(oldest) = slots
                    .iter_mut()
                    .filter(|s| s.size != 0)
                    .min_by_key(|s| s.freed_at)
                else {
                    break;
                };
                evict(oldest, &mut n);
            }
            if self.held.load(Ordering::Relaxed) + size > cap {
                return false;
            }
            match slots.iter_mut().find(|s| s.size == 0) {
                Some(slot) => {
                    *slot = Slot {
                        size,
                        addr: p as usize,
                        freed_at: now,
                    };
                    self.held.fetch_add(size, Ordering::Relaxed);
                    true
                }
                None => false,
            }
        });
        for slot in evicted.iter().filter(|s| s.size != 0) {
            // SAFETY: the block came from `fresh` with this size, and the cache owned it
            // alone until now.
            unsafe { release(slot.addr as *mut u8, slot.size) };
        }
        kept
    }
}

/// The layout a cached block of `size` (already rounded) was allocated with.
fn block_layout(size: usize) -> Layout {
    let align = if size >= HUGE_PAGE {
        HUGE_PAGE
    } else {
        BLOCK_ALIGN
    };
    // SAFETY: sizes here are size classes (multiples of 16 KiB) and the alignments powers
    // of two.
    unsafe { Layout::from_size_align_unchecked(size, align) }
}

fn cached(layout: &Layout) -> Option<Layout> {
    if layout.size() < MIN_BLOCK || layout.align() > BLOCK_ALIGN {
        return None;
    }
    let size = size_class(layout.size())?;
    // Blocks of a huge page or more start on one, so that they can be backed by huge
    // pages (see `fresh`); `block_layout` says so.
    Layout::from_size_align(size, block_layout(size).align()).ok()
}

const HUGE_PAGE: usize = 2 << 20;

/// A new block, mapped from the kernel directly (not through glibc: freeing a mapped
/// block there raises glibc's mmap threshold, after which blocks of that size come from
/// its heap and stay in the process when freed, 0.8 GB of a small training run). Fresh
/// pages are zero, so `zeroed` costs nothing. Blocks of 2 MiB and more start on a 2 MiB
/// boundary and are marked for transparent huge pages (where THP is in `madvise` mode,
/// as on Debian): 512 times fewer page faults and TLB misses over the activation buffers.
/// `DINO_BRIDGE_HUGEPAGES=0` turns that off.
unsafe fn fresh(block: Layout) -> *mut u8 {
    let (size, align) = (block.size(), block.align().max(4096));
    // Over-map by the alignment and trim both ends.
    let span = size + align;
    // SAFETY: an anonymous private mapping of `span` bytes; no existing memory is touched.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return std::ptr::null_mut();
    }
    let start = (base as usize).next_multiple_of(align);
    let (head, tail) = (start - base as usize, base as usize + span - (start + size));
    // SAFETY: the trimmed ranges are whole pages of the mapping just made, outside the
    // block handed out.
    unsafe {
        if head > 0 {
            libc::munmap(base, head);
        }
        if tail > 0 {
            libc::munmap((start + size) as *mut libc::c_void, tail);
        }
        if size >= HUGE_PAGE && huge_pages_wanted() {
            // Advice never changes contents.
            libc::madvise(start as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
        }
    }
    start as *mut u8
}

/// Gives a block from `fresh` back to the kernel.
///
/// # Safety
/// `p` came from `fresh` with a layout of this `size`, and nothing uses it any more.
unsafe fn release(p: *mut u8, size: usize) {
    // SAFETY: the block's pages are exactly the mapping `fresh` left (sizes are multiples
    // of the page size).
    unsafe { libc::munmap(p.cast(), size) };
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

// SAFETY: blocks of the cached sizes come from `fresh` (mappings of their own) and go back
// through `release` with the size `cached` gives their layout; everything else comes
// from `System` with the layout it is returned with. Cached blocks are exclusively owned
// by the cache until handed out again.
unsafe impl GlobalAlloc for CachingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match cached(&layout) {
            None => unsafe { System.alloc(layout) },
            Some(block) => {
                CACHE.lent(block.size());
                let p = CACHE.take(block.size());
                if p.is_null() {
                    unsafe { fresh(block) }
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
                CACHE.lent(block.size());
                let p = CACHE.take(block.size());
                if p.is_null() {
                    unsafe { fresh(block) } // fresh pages are zero
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
                    unsafe { release(p, block.size()) }
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
    fn size_classes_waste_at_most_an_eighth() {
        assert_eq!(size_class(1 << 20), Some(1 << 20));
        assert_eq!(size_class((1 << 20) + 1), Some((1 << 20) + (1 << 17)));
        for size in [(1 << 20) + 12_345, 25_165_824 + 1, 3 << 27] {
            let c = size_class(size).unwrap();
            assert!(c >= size && c - size <= size / 8, "{size} -> {c}");
            assert!(c.is_multiple_of(4096), "{c} is not whole pages");
        }
    }

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
