//! Transparent huge pages for the large, short-lived blocks of a reload.
//!
//! A million-key reload touches about 290 MB of fresh memory: the file's
//! bytes, the parser's records, the new ring's columns and tables. In 4 KiB
//! pages that is about 70,000 page faults, each one a trap into the kernel
//! and a page to clear, and every probe of a 40 MB hash table is a TLB miss.
//! Most Linux distributions ship transparent huge pages in `madvise` mode:
//! a mapping gets 2 MiB pages only when the program asks for them.
//!
//! [`LargePages`] gives every block of at least [`LARGE`] bytes a mapping of
//! its own (`mmap`; `mremap` to grow or shrink it; `munmap` when it is
//! freed) and advises it `MADV_HUGEPAGE` before anything touches it. Huge
//! pages therefore go back to the system with the ring or buffer that held
//! them, never mix with a heap's small allocations, and the resident set
//! falls back to its steady state after a swap. Smaller blocks, including
//! everything on the verify path, go to the system allocator unchanged,
//! behind one comparison.
//!
//! Where transparent huge pages are off (`never`) the advice is ignored. The
//! advice also opts the block into the kernel's `defrag` policy for advised
//! memory (`madvise` by default): when free 2 MiB pages are scarce, the
//! faulting thread (a reload's, not a serving one) compacts memory first.
//! On other systems [`LargePages`] is the system allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering};

/// Blocks at least this large get a mapping of their own, advised to use
/// huge pages (2 MiB on x86-64 and on most arm64 kernels); smaller ones
/// could not hold a whole huge page.
pub const LARGE: usize = 2 << 20;

/// The system allocator, except that blocks of at least [`LARGE`] bytes are
/// mappings of their own with transparent huge pages. Install it in a binary
/// with `#[global_allocator] static ALLOC: LargePages = LargePages;`.
#[derive(Debug, Clone, Copy, Default)]
pub struct LargePages;

static ADVISING: AtomicBool = AtomicBool::new(true);

thread_local! {
    /// Set while this thread maps blocks that live for one reload only
    /// (see [`transient`]).
    static TRANSIENT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with the blocks this thread maps meanwhile left on ordinary
/// pages: for buffers that live for one reload only (the file's bytes, the
/// parser's records), whose pages a huge page would not make faster to use.
/// A huge page is cleared whole, 2 MiB at once, where the thread faulting
/// it in gives way to a check only between 4 KiB pieces, and in a virtual
/// machine whose host reclaimed that memory, each piece waits for the host
/// too (up to 4.8 ms for one huge page; see BENCHMARKS.md). The ring a
/// reload builds keeps its huge pages: it is probed on every first sight
/// of a key for as long as it serves.
pub fn transient<R>(f: impl FnOnce() -> R) -> R {
    // Threads started meanwhile do not inherit the flag: see
    // [`in_transient`].
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = TRANSIENT.try_with(|t| t.set(self.0));
        }
    }
    let _restore = Restore(TRANSIENT.with(|t| t.replace(true)));
    f()
}

/// Whether this thread runs inside [`transient`]: a thread that starts
/// helpers for the work asks, and runs them inside it too.
pub fn in_transient() -> bool {
    TRANSIENT.try_with(std::cell::Cell::get).unwrap_or(false)
}

/// Turns the advice on or off for blocks mapped from now on (on by
/// default); for measuring what it is worth.
pub fn set_advising(on: bool) {
    ADVISING.store(on, Ordering::Relaxed);
}

/// The system's page size (4096 where it cannot be asked).
pub(crate) fn page_size() -> usize {
    os::page()
}

/// Whether a block of `layout` is mapped here. The same layout always gives
/// the same answer, so a block is freed the way it was allocated.
#[inline]
fn mapped(layout: Layout) -> bool {
    cfg!(target_os = "linux") && layout.size() >= LARGE && layout.align() <= os::page()
}

// SAFETY: blocks below `LARGE` (or aligned beyond a page) are `System`'s,
// with the caller's arguments and `System`'s results unchanged. Larger ones
// are whole anonymous mappings of at least `size` bytes, page-aligned (so
// aligned to any `align` up to a page), zeroed by the kernel, unmapped only
// by `dealloc`, and resized by `mremap`, which keeps their contents; a
// failure returns null and leaves the caller's block as it was.
unsafe impl GlobalAlloc for LargePages {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if mapped(layout) {
            return os::map(layout.size());
        }
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.alloc(layout) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if mapped(layout) {
            // Fresh anonymous memory is zeroed, untouched until written.
            return os::map(layout.size());
        }
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if mapped(layout) {
            // SAFETY: `ptr` was mapped by `os::map` or `os::remap` with this
            // size (the caller's contract), and nothing uses it any more.
            unsafe { os::unmap(ptr, layout.size()) };
            return;
        }
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller guarantees `new_size`, rounded up to `align`,
        // does not overflow `isize`.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (mapped(layout), mapped(new_layout)) {
            // SAFETY: `ptr` is a mapping of `layout.size()` bytes from here.
            (true, true) => unsafe { os::remap(ptr, layout.size(), new_size) },
            // SAFETY: as in `alloc`.
            (false, false) => unsafe { System.realloc(ptr, layout, new_size) },
            // Across the threshold: a new block, the contents, the old block
            // freed (kept if the new one cannot be had).
            _ => {
                // SAFETY: `new_layout` is non-zero (the caller's contract).
                let block = unsafe { self.alloc(new_layout) };
                if !block.is_null() {
                    // SAFETY: both blocks hold at least this many bytes and
                    // are distinct allocations.
                    unsafe {
                        std::ptr::copy_nonoverlapping(ptr, block, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                }
                block
            }
        }
    }
}

#[cfg(target_os = "linux")]
mod os {
    use std::sync::atomic::{AtomicUsize, Ordering};

    static PAGE: AtomicUsize = AtomicUsize::new(0);

    /// The system's page size.
    #[inline]
    pub fn page() -> usize {
        match PAGE.load(Ordering::Relaxed) {
            0 => {
                // SAFETY: `sysconf` reads a constant the kernel passed at
                // exec; it allocates nothing and has no preconditions.
                let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
                let page = usize::try_from(page)
                    .ok()
                    .filter(|p| p.is_power_of_two())
                    .unwrap_or(4096);
                PAGE.store(page, Ordering::Relaxed);
                page
            }
            page => page,
        }
    }

    /// `size` rounded up to whole pages.
    fn span(size: usize) -> usize {
        size.next_multiple_of(page())
    }

    /// A new anonymous mapping of at least `size` bytes, advised; null if
    /// the system has no memory for it.
    #[cold]
    pub fn map(size: usize) -> *mut u8 {
        let len = span(size);
        // SAFETY: a new private anonymous mapping at an address the kernel
        // picks; it overlaps nothing that exists.
        let block = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if block == libc::MAP_FAILED {
            return std::ptr::null_mut();
        }
        advise(block, len);
        block.cast()
    }

    /// Resizes the mapping at `block` from `old` to `new` bytes, moving it
    /// if need be; null (and the mapping untouched) on failure.
    ///
    /// # Safety
    /// `block` must be a mapping of `old` bytes made by [`map`] or [`remap`].
    #[cold]
    pub unsafe fn remap(block: *mut u8, old: usize, new: usize) -> *mut u8 {
        // SAFETY: the caller's contract: the whole range is one mapping we
        // own (advised whole, so the kernel never split it).
        let moved =
            unsafe { libc::mremap(block.cast(), span(old), span(new), libc::MREMAP_MAYMOVE) };
        if moved == libc::MAP_FAILED {
            return std::ptr::null_mut();
        }
        // A grown mapping keeps its advice, which covers the new pages too.
        moved.cast()
    }

    /// Unmaps `size` bytes at `block`.
    ///
    /// # Safety
    /// `block` must be a mapping of `size` bytes made by [`map`] or
    /// [`remap`] that nothing uses any more.
    #[cold]
    pub unsafe fn unmap(block: *mut u8, size: usize) {
        // SAFETY: the caller's contract. A failure (impossible for a valid
        // mapping) would leak the pages, never free them twice.
        unsafe {
            libc::munmap(block.cast(), span(size));
        }
    }

    /// Advises `MADV_HUGEPAGE` for the whole mapping (a part would split it
    /// in two, and `mremap` cannot move a split one). Failure (no THP in
    /// this kernel) leaves ordinary pages.
    fn advise(block: *mut libc::c_void, len: usize) {
        if super::ADVISING.load(Ordering::Relaxed) && !super::in_transient() {
            // SAFETY: `block..block + len` is the mapping just made; the
            // advice changes how its future faults are served, nothing else.
            unsafe {
                libc::madvise(block, len, libc::MADV_HUGEPAGE);
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod os {
    pub fn page() -> usize {
        4096
    }
    pub fn map(_: usize) -> *mut u8 {
        unreachable!("only Linux maps blocks itself")
    }
    pub unsafe fn remap(_: *mut u8, _: usize, _: usize) -> *mut u8 {
        unreachable!("only Linux maps blocks itself")
    }
    pub unsafe fn unmap(_: *mut u8, _: usize) {
        unreachable!("only Linux maps blocks itself")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the mapping holding `addr` is advised for huge pages: its
    /// `VmFlags` line in /proc/self/smaps carries `hg`.
    #[cfg(target_os = "linux")]
    fn advised(addr: usize) -> Option<bool> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            let mut fields = line.split_whitespace();
            let first = fields.next()?;
            if let Some((lo, hi)) = first.split_once('-')
                && let (Ok(lo), Ok(hi)) =
                    (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
            {
                inside = (lo..hi).contains(&addr);
                continue;
            }
            if inside && first == "VmFlags:" {
                return Some(fields.any(|f| f == "hg"));
            }
        }
        None
    }

    /// The mapping holding `addr`: its start and end.
    #[cfg(target_os = "linux")]
    fn mapping(addr: usize) -> Option<(usize, usize)> {
        let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
        maps.lines().find_map(|line| {
            let (lo, hi) = line.split_whitespace().next()?.split_once('-')?;
            let (lo, hi) = (
                usize::from_str_radix(lo, 16).ok()?,
                usize::from_str_radix(hi, 16).ok()?,
            );
            (lo..hi).contains(&addr).then_some((lo, hi))
        })
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn blocks_mapped_for_one_reload_keep_ordinary_pages() {
        let thp = std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists();
        let large = Layout::from_size_align(8 << 20, 8).unwrap();
        // SAFETY: as below; each block is freed with its layout.
        unsafe {
            let transient_block = transient(|| LargePages.alloc(large));
            let after = LargePages.alloc(large);
            assert!(!transient_block.is_null() && !after.is_null());
            assert_eq!(advised(transient_block as usize + (4 << 20)), Some(false));
            // The scope ends with `transient`, even on this thread.
            assert_eq!(advised(after as usize + (4 << 20)), Some(thp));
            LargePages.dealloc(transient_block, large);
            LargePages.dealloc(after, large);
        }
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn large_blocks_are_advised_mappings_of_their_own() {
        // A kernel built without transparent huge pages refuses the advice.
        let thp = std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists();
        let large = Layout::from_size_align(8 << 20, 8).unwrap();
        // SAFETY: a non-zero layout; the block is freed with the layout it
        // has at that point.
        let block = unsafe { LargePages.alloc_zeroed(large) };
        assert!(!block.is_null());
        assert_eq!(block as usize % os::page(), 0);
        // Its own mapping (the kernel may merge it with a neighbour that has
        // the same flags, but never cuts it).
        assert!(
            mapping(block as usize)
                .is_some_and(|(lo, hi)| lo <= block as usize && hi >= block as usize + (8 << 20))
        );
        assert_eq!(advised(block as usize + (4 << 20)), Some(thp));
        // SAFETY: the block is 8 MiB, zeroed.
        assert!(
            unsafe { std::slice::from_raw_parts(block, 8 << 20) }
                .iter()
                .all(|&b| b == 0)
        );
        // SAFETY: writes stay inside the block.
        unsafe { std::ptr::write_bytes(block, 7, large.size()) };

        // Growing it keeps its contents and its advice over the whole
        // (still single) mapping.
        // SAFETY: `block` came from `LargePages` with `large`.
        let grown = unsafe { LargePages.realloc(block, large, 24 << 20) };
        assert!(!grown.is_null());
        // SAFETY: the first 8 MiB were kept by the realloc.
        assert_eq!(unsafe { *grown.add((8 << 20) - 1) }, 7);
        assert!(
            mapping(grown as usize)
                .is_some_and(|(lo, hi)| lo <= grown as usize && hi >= grown as usize + (24 << 20))
        );
        assert_eq!(advised(grown as usize + (20 << 20)), Some(thp));

        // Shrinking below the threshold hands it to the system allocator,
        // contents first; growing back maps it again.
        let big = Layout::from_size_align(24 << 20, 8).unwrap();
        // SAFETY: `grown` came from `LargePages` with `big`.
        let small = unsafe { LargePages.realloc(grown, big, 64 << 10) };
        assert!(!small.is_null());
        // SAFETY: 64 KiB were kept.
        assert!(
            unsafe { std::slice::from_raw_parts(small, 64 << 10) }
                .iter()
                .all(|&b| b == 7)
        );
        let small_layout = Layout::from_size_align(64 << 10, 8).unwrap();
        // SAFETY: `small` came from `LargePages` with `small_layout`.
        let again = unsafe { LargePages.realloc(small, small_layout, 4 << 20) };
        assert!(!again.is_null());
        assert_eq!(again as usize % os::page(), 0);
        // SAFETY: 64 KiB were kept.
        assert!(
            unsafe { std::slice::from_raw_parts(again, 64 << 10) }
                .iter()
                .all(|&b| b == 7)
        );
        // SAFETY: `again` came from `LargePages` with this layout.
        unsafe { LargePages.dealloc(again, Layout::from_size_align(4 << 20, 8).unwrap()) };
    }

    #[test]
    fn small_or_overaligned_blocks_are_the_system_allocators() {
        assert!(!mapped(Layout::from_size_align(LARGE - 1, 8).unwrap()));
        assert!(!mapped(Layout::from_size_align(LARGE, 1 << 20).unwrap()));
        assert_eq!(
            mapped(Layout::from_size_align(LARGE, 64).unwrap()),
            cfg!(target_os = "linux")
        );
    }
}
