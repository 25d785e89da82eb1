//! Transparent huge pages for the large, short-lived blocks of a reload.
//!
//! A million-key reload touches about 340 MB of fresh memory: the file's
//! bytes, the parser's records, the new ring's columns and tables. In 4 KiB
//! pages that is about 95,000 page faults, each one a trap into the kernel
//! and a page to clear, and every probe of a 40 MB hash table is a TLB miss.
//! Most Linux distributions ship transparent huge pages in `madvise` mode:
//! a mapping gets 2 MiB pages only when the program asks for them.
//!
//! [`LargePages`] is the system allocator plus that request: every block of
//! at least [`ADVISE_FROM`] bytes is advised `MADV_HUGEPAGE` as soon as it is
//! allocated, before anything touches it. The allocator maps such blocks on
//! their own (see [`crate::ring::configure_allocator`]) and unmaps them when
//! they are freed, so huge pages go back to the system with the ring or
//! buffer that held them, and the resident set still falls back to its
//! steady state after a swap. Small allocations, including everything on the
//! verify path, take the system allocator's path unchanged, behind one
//! comparison.
//!
//! Where transparent huge pages are off (`never`) the advice is ignored, and
//! with `always` it changes nothing. On other systems [`LargePages`] is the
//! system allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, Ordering};

/// Size of a transparent huge page on x86-64 and most arm64 kernels.
pub const HUGE_PAGE: usize = 2 << 20;

/// Blocks at least this large are advised to use huge pages: smaller ones
/// cannot hold a whole aligned huge page.
pub const ADVISE_FROM: usize = HUGE_PAGE;

/// The system allocator, asking for transparent huge pages for every block
/// of at least [`ADVISE_FROM`] bytes. Install it in a binary with
/// `#[global_allocator] static ALLOC: LargePages = LargePages;`.
#[derive(Debug, Clone, Copy, Default)]
pub struct LargePages;

static ADVISING: AtomicBool = AtomicBool::new(true);

/// Turns the advice on or off for blocks allocated from now on (on by
/// default); for measuring what it is worth.
pub fn set_advising(on: bool) {
    ADVISING.store(on, Ordering::Relaxed);
}

// SAFETY: every method forwards to `System` with the caller's arguments and
// returns its result unchanged; `advise` only sets advice on memory the
// block owns and moves nothing.
unsafe impl GlobalAlloc for LargePages {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is `System`'s.
        let block = unsafe { System.alloc(layout) };
        if layout.size() >= ADVISE_FROM {
            advise(block, layout.size());
        }
        block
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above. A large zeroed block comes straight from the
        // kernel, untouched, so the advice still applies to every page.
        let block = unsafe { System.alloc_zeroed(layout) };
        if layout.size() >= ADVISE_FROM {
            advise(block, layout.size());
        }
        block
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let block = unsafe { System.realloc(ptr, layout, new_size) };
        // A block that grows past the threshold, or moves, is advised again;
        // advising a range twice is harmless.
        if new_size >= ADVISE_FROM {
            advise(block, new_size);
        }
        block
    }
}

/// Advises `MADV_HUGEPAGE` for the whole pages spanned by `len` bytes at
/// `block`. Failure (no THP support, an old kernel) leaves ordinary pages.
#[cold]
#[inline(never)]
fn advise(block: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    if !block.is_null() && ADVISING.load(Ordering::Relaxed) {
        const PAGE: usize = 4096;
        let start = block as usize & !(PAGE - 1);
        let end = (block as usize).saturating_add(len).next_multiple_of(PAGE);
        // SAFETY: `[start, end)` is made of the pages holding the block just
        // returned by the allocator, which the block owns or shares only
        // with its own allocator header (a large block is a mapping of its
        // own). MADV_HUGEPAGE changes how future faults in that range are
        // served; it does not change contents or validity of any memory,
        // and on error it changes nothing.
        unsafe {
            libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (block, len);
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

    #[test]
    #[cfg(target_os = "linux")]
    fn large_blocks_are_advised_even_when_they_grow() {
        let large = Layout::from_size_align(8 << 20, 8).unwrap();
        // SAFETY: a non-zero layout; the block is freed with the same one.
        let block = unsafe { LargePages.alloc(large) };
        assert!(!block.is_null());
        // A kernel built without transparent huge pages refuses the advice.
        let thp = std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists();
        assert_eq!(advised(block as usize + (4 << 20)), Some(thp));
        // The block is usable memory, and growing it keeps the advice.
        // SAFETY: writes stay inside the block.
        unsafe { std::ptr::write_bytes(block, 7, large.size()) };
        // SAFETY: `block` came from `LargePages` with `large`.
        let grown = unsafe { LargePages.realloc(block, large, 24 << 20) };
        assert!(!grown.is_null());
        // SAFETY: the first 8 MiB were kept by the realloc.
        assert_eq!(unsafe { *grown.add((8 << 20) - 1) }, 7);
        assert_eq!(advised(grown as usize + (20 << 20)), Some(thp));
        // SAFETY: as above, with the grown layout.
        unsafe {
            LargePages.dealloc(grown, Layout::from_size_align(24 << 20, 8).unwrap());
        }

        // A small block takes the system allocator's path. (Whether its
        // mapping is advised says nothing here: small blocks share heaps,
        // which may hold large blocks in a process that did not raise the
        // allocator's mapping threshold, as this test binary does not.)
        let small = Layout::from_size_align(64 << 10, 8).unwrap();
        // SAFETY: as above.
        let block = unsafe { LargePages.alloc_zeroed(small) };
        assert!(!block.is_null());
        // SAFETY: the block is `small.size()` bytes, zeroed.
        assert!(
            unsafe { std::slice::from_raw_parts(block, small.size()) }
                .iter()
                .all(|&b| b == 0)
        );
        // SAFETY: as above.
        unsafe { LargePages.dealloc(block, small) };
    }
}
