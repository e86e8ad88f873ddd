//! The sensors' memory allocator in WebAssembly: size classes with free
//! lists, carved from the module's own linear memory right after its data.
//!
//! Why not the standard library's: on `wasm32-unknown-unknown` it is
//! dlmalloc, which takes its memory from `memory.grow` in 64 KiB steps and
//! writes at both ends of each step. A sensor that allocates a few hundred
//! bytes then holds two pages (8 KiB) of a fresh 64 KiB page and leaves the
//! rest of its first page, after the data, unused. Half a million sensors
//! share one host, so each sensor's resident memory is what counts: this
//! allocator starts at `__heap_base`, inside the first page, and grows the
//! memory only by what an allocation needs.
//!
//! Blocks carry no header. A request's size (at least its alignment)
//! picks a class: multiples of 16 bytes up to 128, then four classes per
//! power of two, so a block wastes at most a fifth of itself. A freed
//! block goes onto its class's list and is reused by the next request of
//! that class; the block at the top of the heap goes back to the heap
//! instead, and a `realloc` of it grows or shrinks it in place (a growing
//! `Vec` or `VecDeque` that was allocated last moves no bytes). Blocks are
//! never split or merged: a sensor's allocations are a few shapes over and
//! over (readings, its resend buffer, snapshots), which the lists serve.
//! A component instance is single-threaded, so there is no locking.

use std::alloc::Layout;

/// Every block starts at a multiple of this and is a multiple of it long.
const GRAIN: usize = 16;
/// Classes of [`GRAIN`] steps up to this size; above, four per power of two.
const SMALL: usize = 128;
const SMALL_CLASSES: usize = SMALL / GRAIN;
/// Larger requests are refused (the host caps a sensor's memory far below).
const LARGEST: usize = 1 << 30;
/// Classes up to [`LARGEST`]: 2^7 < n ≤ 2^30 in 23 doublings of four.
const CLASSES: usize = SMALL_CLASSES + 4 * (LARGEST.trailing_zeros() as usize - SMALL.trailing_zeros() as usize);

/// The class of a block that holds `n` bytes: its index and its size.
fn class_of(n: usize) -> Option<(usize, usize)> {
    let n = n.max(1);
    if n <= SMALL {
        let index = n.div_ceil(GRAIN) - 1;
        return Some((index, (index + 1) * GRAIN));
    }
    if n > LARGEST {
        return None;
    }
    // 2^k < n <= 2^(k+1), in four steps of 2^(k-2).
    let k = (usize::BITS - 1 - (n - 1).leading_zeros()) as usize;
    let step = 1usize << (k - 2);
    let sub = (n - (1 << k)).div_ceil(step);
    Some((SMALL_CLASSES + (k - SMALL.trailing_zeros() as usize) * 4 + sub - 1, (1 << k) + sub * step))
}

/// The heap between `next` and `end` (bytes not yet handed out), and a list
/// of freed blocks per class, linked through their first word (0 ends it).
pub struct Arena {
    next: usize,
    end: usize,
    free: [usize; CLASSES],
}

impl Arena {
    /// An arena of the bytes from `start` to `end`.
    pub const fn new(start: usize, end: usize) -> Arena {
        Arena { next: start.next_multiple_of(GRAIN), end, free: [0; CLASSES] }
    }

    /// A block for `layout`, or null. `grow(bytes)` asks for at least that
    /// many bytes more at the end of the heap and returns the new end.
    ///
    /// # Safety
    /// The arena's bytes are valid, writable and used by nothing else.
    pub unsafe fn alloc(&mut self, layout: Layout, grow: impl FnOnce(usize) -> Option<usize>) -> *mut u8 {
        let Some((class, size)) = class_of(layout.size().max(layout.align())) else { return std::ptr::null_mut() };
        let head = self.free[class];
        if head != 0 && head.is_multiple_of(layout.align()) {
            // SAFETY: a freed block of this class; its first word links the list.
            self.free[class] = unsafe { *(head as *const usize) };
            return head as *mut u8;
        }
        let start = self.next.next_multiple_of(layout.align().max(GRAIN));
        if !self.reach(start + size, grow) {
            return std::ptr::null_mut();
        }
        self.next = start + size;
        start as *mut u8
    }

    /// Takes back a block from [`Arena::alloc`] with the same `layout`.
    ///
    /// # Safety
    /// `ptr` came from this arena with `layout` and is not used again.
    pub unsafe fn dealloc(&mut self, ptr: *mut u8, layout: Layout) {
        let Some((class, size)) = class_of(layout.size().max(layout.align())) else { return };
        let at = ptr as usize;
        if at + size == self.next {
            self.next = at;
        } else {
            // SAFETY: the block is ours again and at least a word long.
            unsafe { *(at as *mut usize) = self.free[class] };
            self.free[class] = at;
        }
    }

    /// The block at `ptr`, of `layout`, resized to `new_size`: in place when
    /// the class stays or the block is the last one, else moved.
    ///
    /// # Safety
    /// As [`Arena::dealloc`]; `new_size` rounded up to the alignment does
    /// not overflow.
    pub unsafe fn realloc(&mut self, ptr: *mut u8, layout: Layout, new_size: usize, grow: impl FnOnce(usize) -> Option<usize>) -> *mut u8 {
        let align = layout.align();
        let (Some((old_class, old_size)), Some((new_class, new_size_class))) =
            (class_of(layout.size().max(align)), class_of(new_size.max(align)))
        else {
            return std::ptr::null_mut();
        };
        if new_class == old_class {
            return ptr;
        }
        let at = ptr as usize;
        if at + old_size == self.next {
            if !self.reach(at + new_size_class, grow) {
                return std::ptr::null_mut();
            }
            self.next = at + new_size_class;
            return ptr;
        }
        // SAFETY: the alignment is the old layout's, which was valid.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, align) };
        // SAFETY: the caller's guarantees are this call's.
        let moved = unsafe { self.alloc(new_layout, grow) };
        if !moved.is_null() {
            // SAFETY: both blocks are ours, distinct and at least this long.
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        moved
    }

    /// Whether the heap reaches `to`, growing it if needed.
    fn reach(&mut self, to: usize, grow: impl FnOnce(usize) -> Option<usize>) -> bool {
        if to <= self.end {
            return true;
        }
        match grow(to - self.end) {
            Some(end) if end >= to => {
                self.end = end;
                true
            }
            _ => false,
        }
    }
}

#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
mod wasm {
    use std::alloc::{GlobalAlloc, Layout};
    use std::cell::UnsafeCell;

    use super::Arena;

    const PAGE: usize = 65_536;

    unsafe extern "C" {
        /// Where the linker put the end of the data and the stack.
        static __heap_base: u8;
    }

    struct Heap(UnsafeCell<Arena>);

    // SAFETY: a component instance runs on one thread.
    unsafe impl Sync for Heap {}

    impl Heap {
        /// The arena, set up at the first allocation (its end is 0 until then).
        #[allow(clippy::mut_from_ref)]
        fn arena(&self) -> &mut Arena {
            // SAFETY: single-threaded, and nothing below re-enters the allocator.
            let arena = unsafe { &mut *self.0.get() };
            if arena.end == 0 {
                *arena = Arena::new(&raw const __heap_base as usize, core::arch::wasm32::memory_size(0) * PAGE);
            }
            arena
        }
    }

    /// Grows the linear memory by whole pages; the host traps a growth past
    /// the sensor's memory cap.
    fn grow(bytes: usize) -> Option<usize> {
        let pages = bytes.div_ceil(PAGE);
        if core::arch::wasm32::memory_grow(0, pages) == usize::MAX {
            return None;
        }
        Some(core::arch::wasm32::memory_size(0) * PAGE)
    }

    unsafe impl GlobalAlloc for Heap {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: the arena is the memory after the data, ours alone.
            unsafe { self.arena().alloc(layout, grow) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: the caller gives back what alloc handed out.
            unsafe { self.arena().dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            // SAFETY: as dealloc.
            unsafe { self.arena().realloc(ptr, layout, new_size, grow) }
        }
    }

    #[global_allocator]
    static HEAP: Heap = Heap(UnsafeCell::new(Arena::new(0, 0)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_cover_every_size_and_waste_at_most_a_fifth_above_128_bytes() {
        let mut last = (0, GRAIN);
        for n in 1..=70_000usize {
            let (class, size) = class_of(n).unwrap();
            assert!(size >= n && size % GRAIN == 0, "{n} -> {size}");
            assert!(class >= last.0 && class < CLASSES, "{n} -> class {class}");
            if class == last.0 {
                assert_eq!(size, last.1, "one size per class");
            }
            if n > SMALL {
                assert!(size * 4 <= n * 5, "{n} -> {size}");
            }
            last = (class, size);
        }
        assert_eq!(class_of(LARGEST), Some((CLASSES - 1, LARGEST)));
        assert_eq!(class_of(LARGEST + 1), None);
        assert_eq!(class_of(0), class_of(1));
    }

    /// An arena over a buffer of `cap` bytes that may grow to `max`.
    struct Fixture {
        buf: Vec<u8>,
        arena: Arena,
        end: usize,
        max: usize,
    }

    impl Fixture {
        fn new(cap: usize, max: usize) -> Fixture {
            let buf = vec![0u8; max + 64];
            let start = buf.as_ptr() as usize;
            Fixture { arena: Arena::new(start, start + cap), end: start + cap, max: start + max, buf }
        }
        fn grower(&mut self) -> impl FnOnce(usize) -> Option<usize> + use<> {
            let (end, max) = (self.end, self.max);
            move |bytes| Some(end + bytes.div_ceil(4096) * 4096).filter(|&e| e <= max)
        }
        fn alloc(&mut self, size: usize, align: usize) -> *mut u8 {
            let grow = self.grower();
            let p = unsafe { self.arena.alloc(Layout::from_size_align(size, align).unwrap(), grow) };
            self.end = self.arena.end;
            p
        }
        fn realloc(&mut self, p: *mut u8, size: usize, align: usize, new_size: usize) -> *mut u8 {
            let grow = self.grower();
            let q = unsafe { self.arena.realloc(p, Layout::from_size_align(size, align).unwrap(), new_size, grow) };
            self.end = self.arena.end;
            q
        }
        fn dealloc(&mut self, p: *mut u8, size: usize, align: usize) {
            unsafe { self.arena.dealloc(p, Layout::from_size_align(size, align).unwrap()) }
        }
        fn contains(&self, p: *mut u8, size: usize) -> bool {
            let (lo, hi) = (self.buf.as_ptr() as usize, self.buf.as_ptr() as usize + self.buf.len());
            p as usize >= lo && p as usize + size <= hi
        }
    }

    #[test]
    fn blocks_never_overlap_keep_their_bytes_and_are_reused() {
        let mut f = Fixture::new(4096, 1 << 20);
        // (ptr, size, align, fill byte)
        let mut live: Vec<(*mut u8, usize, usize, u8)> = Vec::new();
        let mut rng = crate::rng::Rng::new(7);
        for step in 0..20_000u32 {
            let op = rng.next_u64() % 3;
            if op == 0 || live.is_empty() {
                let size = 1 + (rng.next_u64() % if rng.next_u64().is_multiple_of(8) { 5000 } else { 200 }) as usize;
                let align = [1, 2, 4, 8, 16, 32, 64][(rng.next_u64() % 7) as usize];
                let p = f.alloc(size, align);
                if p.is_null() {
                    continue;
                }
                assert_eq!(p as usize % align, 0);
                assert!(f.contains(p, size));
                let fill = step as u8;
                unsafe { std::ptr::write_bytes(p, fill, size) };
                live.push((p, size, align, fill));
            } else {
                let i = (rng.next_u64() % live.len() as u64) as usize;
                let (p, size, align, fill) = live[i];
                assert!(unsafe { std::slice::from_raw_parts(p, size) }.iter().all(|&b| b == fill), "block {i} was overwritten");
                if op == 1 {
                    f.dealloc(p, size, align);
                    live.swap_remove(i);
                } else {
                    let new_size = 1 + (rng.next_u64() % 3000) as usize;
                    let q = f.realloc(p, size, align, new_size);
                    if q.is_null() {
                        continue;
                    }
                    assert_eq!(q as usize % align, 0);
                    let kept = size.min(new_size);
                    assert!(unsafe { std::slice::from_raw_parts(q, kept) }.iter().all(|&b| b == fill), "realloc lost bytes");
                    unsafe { std::ptr::write_bytes(q, fill, new_size) };
                    live[i] = (q, new_size, align, fill);
                }
            }
            if step % 1000 == 0 {
                let mut spans: Vec<(usize, usize)> = live.iter().map(|&(p, s, _, _)| (p as usize, p as usize + s)).collect();
                spans.sort();
                assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "overlapping blocks at step {step}");
            }
        }
    }

    #[test]
    fn a_freed_block_is_reused_and_the_last_one_grows_in_place() {
        let mut f = Fixture::new(4096, 1 << 16);
        let a = f.alloc(100, 8);
        let b = f.alloc(100, 8);
        f.dealloc(a, 100, 8);
        assert_eq!(f.alloc(97, 8), a, "same class, same block");
        let grown = f.realloc(b, 100, 8, 3000);
        assert_eq!(grown, b, "the last block grows in place");
        let end = f.arena.next;
        f.dealloc(grown, 3000, 8);
        assert!(f.arena.next < end, "the last block goes back to the heap");
    }

    #[test]
    fn the_heap_grows_on_demand_and_refuses_past_its_limit() {
        let mut f = Fixture::new(1024, 1 << 16);
        let p = f.alloc(40_000, 16);
        assert!(!p.is_null() && f.arena.end >= p as usize + 40_000);
        assert!(f.alloc(40_000, 16).is_null(), "past the limit");
        assert!(!f.alloc(64, 16).is_null(), "small ones still fit");
    }
}
