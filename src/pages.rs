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
//! While [`keep_freed`] is on (from a reload until the reload thread has
//! been idle for a few seconds), freed blocks are kept and handed out
//! again instead: each reload of a run frees about what the next one maps.
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

/// Turns the advice on or off for blocks mapped (or kept blocks handed out
/// again) from now on (on by default); for measuring what it is worth.
pub fn set_advising(on: bool) {
    ADVISING.store(on, Ordering::Relaxed);
}

/// Keeps the blocks of at least [`LARGE`] bytes that any thread frees from
/// now on, to hand them out again for blocks of about their size, instead
/// of returning them to the system, until [`release_kept`].
///
/// For a run of reloads: each one frees about what the next one maps (the
/// file's bytes, the parser's records, the replaced ring). Memory the
/// process holds costs a clear at most to reuse (and a cut, a change of
/// advice, or a grown tail's faults when sizes changed); fresh memory costs a page
/// fault and a cleared page per 4 KiB (or 2 MiB), about a fifth of a
/// million-key reload's time, in the kernel, where a check waiting for the
/// CPU waits for it too; in a virtual machine that reports freed memory to
/// its host, faults wait for the host as well (see BENCHMARKS.md). The
/// resident set stays at the reload's peak while blocks are kept.
pub fn keep_freed() {
    os::keep_freed();
}

/// Stops keeping freed blocks ([`keep_freed`]) and returns the kept ones
/// to the system; returns how many bytes they held.
pub fn release_kept() -> usize {
    os::release_kept()
}

/// How many bytes the blocks kept now hold.
pub fn kept_bytes() -> usize {
    os::kept_bytes()
}

/// Whether freed blocks are being kept ([`keep_freed`]).
pub fn keeping() -> bool {
    os::keeping()
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
// aligned to any `align` up to a page), zeroed by the kernel or, when a kept
// block is handed out again, by `os::map` for `alloc_zeroed`; given up (kept
// or unmapped) only by `dealloc`, a kept block belonging to no caller until
// it is handed out again; and resized by `mremap`, which keeps their
// contents; a failure returns null and leaves the caller's block as it was.
unsafe impl GlobalAlloc for LargePages {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if mapped(layout) {
            return os::map(layout.size(), false);
        }
        // SAFETY: the caller's contract is `System`'s.
        unsafe { System.alloc(layout) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if mapped(layout) {
            return os::map(layout.size(), true);
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
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Mutex, MutexGuard};

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

    /// `size` rounded up to whole pages: the length of a block's mapping.
    /// (Rounding further, to a few lengths per doubling, would let blocks
    /// of nearly the same size share kept blocks, but the last huge page of
    /// a lasting block would then often be a whole one, most of it unused:
    /// about 3 MiB more for a million-key ring.)
    fn span(size: usize) -> usize {
        size.next_multiple_of(page())
    }

    /// How many freed blocks [`Kept`] holds at most: a million-key reload
    /// frees about a dozen.
    const KEPT_BLOCKS: usize = 64;

    /// A kept block: `len` bytes (whole pages) mapped at `addr`, freed
    /// during `round`; `len` 0 marks a free place.
    #[derive(Debug, Clone, Copy)]
    struct Block {
        addr: usize,
        len: usize,
        round: u64,
    }

    const NO_BLOCK: Block = Block {
        addr: 0,
        len: 0,
        round: 0,
    };

    #[derive(Debug)]
    struct State {
        /// Counts [`Kept::start`]s: reloads.
        round: u64,
        blocks: [Block; KEPT_BLOCKS],
    }

    /// Freed mappings kept for reuse ([`super::keep_freed`]).
    #[derive(Debug)]
    pub struct Kept {
        /// Held for a scan of the places, never across a system call or an
        /// allocation.
        state: Mutex<State>,
        /// The bytes kept, so that `map` skips the lock when none are.
        bytes: AtomicUsize,
        /// Whether freed blocks are kept. Changed only under the lock and
        /// read again under it before a block is kept, so that no block is
        /// kept after a release; read without it, so that a block freed
        /// while nothing is kept skips the lock.
        on: AtomicBool,
    }

    /// The allocator's kept blocks.
    static KEPT: Kept = Kept::new();

    impl Kept {
        pub const fn new() -> Kept {
            Kept {
                state: Mutex::new(State {
                    round: 0,
                    blocks: [NO_BLOCK; KEPT_BLOCKS],
                }),
                bytes: AtomicUsize::new(0),
                on: AtomicBool::new(false),
            }
        }

        fn lock(&self) -> MutexGuard<'_, State> {
            // Nothing panics under the lock; a poisoned one is still sound.
            self.state.lock().unwrap_or_else(|e| e.into_inner())
        }

        /// Keeps blocks freed from now on, for a new round (a reload).
        /// Blocks the previous round could have taken and did not are
        /// unmapped: whatever a run of reloads frees in sizes it does not
        /// map again is kept for one round only.
        pub fn start(&self) {
            let stale = {
                let mut state = self.lock();
                self.on.store(true, Ordering::Relaxed);
                state.round += 1;
                let round = state.round;
                let mut stale = [NO_BLOCK; KEPT_BLOCKS];
                for (b, out) in state.blocks.iter_mut().zip(stale.iter_mut()) {
                    if b.len > 0 && b.round + 1 < round {
                        *out = std::mem::replace(b, NO_BLOCK);
                    }
                }
                stale
            };
            self.unmap_all(&stale);
        }

        /// Keeps the mapping of `len` bytes (whole pages) at `block`;
        /// false if keeping is off or every place is taken.
        pub fn keep(&self, block: *mut u8, len: usize) -> bool {
            if !self.on.load(Ordering::Relaxed) {
                return false;
            }
            let mut state = self.lock();
            let round = state.round;
            let on = self.on.load(Ordering::Relaxed);
            let Some(free) = state.blocks.iter_mut().find(|b| b.len == 0).filter(|_| on) else {
                return false;
            };
            *free = Block {
                addr: block as usize,
                len,
                round,
            };
            self.bytes.fetch_add(len, Ordering::Relaxed);
            true
        }

        /// A kept block for a mapping of `len` bytes (whole pages), and how
        /// many of its first bytes may hold what its last user wrote:
        /// - a block of that very length: a run of reloads of one file
        ///   maps the same lengths in the same order, so each finds the
        ///   block of its own length the last reload freed; a block of
        ///   another length is left for its own;
        /// - else, of the blocks an earlier round kept, the one closest in
        ///   length between half and twice `len` (plus a huge page): a file
        ///   that grew or shrank by more than an eighth still reuses the
        ///   memory the last reload freed instead of mapping all of it
        ///   again beside it (and after a file gained or lost a key, a
        ///   block a page off its length serves). Blocks kept during this
        ///   round are left to the next, which maps what this one freed in
        ///   the same order.
        ///
        /// A larger block is cut to `len` bytes; a smaller one is grown in
        /// place or moved by `mremap`, which keeps its pages.
        pub fn take(&self, len: usize) -> Option<(*mut u8, usize)> {
            if self.bytes.load(Ordering::Relaxed) == 0 {
                return None;
            }
            let fit = {
                let mut state = self.lock();
                let round = state.round;
                let near = |b: &&mut Block| {
                    b.len > 0
                        && b.round < round
                        && b.len >= len / 2
                        && b.len <= 2 * len + super::LARGE
                };
                let best = match state.blocks.iter_mut().find(|b| b.len == len) {
                    Some(b) => b,
                    None => state
                        .blocks
                        .iter_mut()
                        .filter(near)
                        .min_by_key(|b| b.len.abs_diff(len))?,
                };
                std::mem::replace(best, NO_BLOCK)
            };
            self.bytes.fetch_sub(fit.len, Ordering::Relaxed);
            let block = fit.addr as *mut u8;
            if fit.len > len {
                // SAFETY: the tail is part of the kept mapping, which no one
                // uses; the head stays mapped.
                unsafe { unmap_now((fit.addr + len) as *mut u8, fit.len - len) };
            } else if fit.len < len {
                // SAFETY: a kept block is a whole mapping no one uses.
                let grown = unsafe { remap(block, fit.len, len) };
                if grown.is_null() {
                    // SAFETY: as above; `remap` left it as it was.
                    unsafe { unmap_now(block, fit.len) };
                    return None;
                }
                return Some((grown, fit.len));
            }
            Some((block, len))
        }

        /// Stops keeping and unmaps every kept block; returns their bytes.
        pub fn release(&self) -> usize {
            let blocks = {
                let mut state = self.lock();
                self.on.store(false, Ordering::Relaxed);
                std::mem::replace(&mut state.blocks, [NO_BLOCK; KEPT_BLOCKS])
            };
            self.unmap_all(&blocks)
        }

        /// Unmaps `blocks`, taken out of the places; returns their bytes.
        fn unmap_all(&self, blocks: &[Block]) -> usize {
            let mut released = 0;
            for b in blocks.iter().filter(|b| b.len > 0) {
                self.bytes.fetch_sub(b.len, Ordering::Relaxed);
                // SAFETY: a kept block is a whole mapping no one uses.
                unsafe { unmap_now(b.addr as *mut u8, b.len) };
                released += b.len;
            }
            released
        }

        pub fn bytes(&self) -> usize {
            self.bytes.load(Ordering::Relaxed)
        }

        pub fn on(&self) -> bool {
            self.on.load(Ordering::Relaxed)
        }
    }

    pub fn keep_freed() {
        KEPT.start();
    }

    pub fn release_kept() -> usize {
        KEPT.release()
    }

    pub fn kept_bytes() -> usize {
        KEPT.bytes()
    }

    pub fn keeping() -> bool {
        KEPT.on()
    }

    /// A mapping of at least `size` bytes, advised: a kept block of about
    /// that size (cleared if `zeroed`), or a new anonymous one; null if the
    /// system has no memory for it.
    #[cold]
    pub fn map(size: usize, zeroed: bool) -> *mut u8 {
        let len = span(size);
        if let Some((block, used)) = KEPT.take(len) {
            if zeroed {
                clear(block, used);
            }
            readvise(block.cast(), len);
            return block;
        }
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
        let (old, new) = (span(old), span(new));
        if old == new {
            return block;
        }
        // SAFETY: the caller's contract: the whole range is one mapping we
        // own (advised whole, so the kernel never split it).
        let moved = unsafe { libc::mremap(block.cast(), old, new, libc::MREMAP_MAYMOVE) };
        if moved == libc::MAP_FAILED {
            return std::ptr::null_mut();
        }
        // A grown mapping keeps its advice, which covers the new pages too.
        moved.cast()
    }

    /// Unmaps `size` bytes at `block`, or keeps them for reuse while
    /// [`super::keep_freed`] is on.
    ///
    /// # Safety
    /// `block` must be a mapping of `size` bytes made by [`map`] or
    /// [`remap`] that nothing uses any more.
    #[cold]
    pub unsafe fn unmap(block: *mut u8, size: usize) {
        let len = span(size);
        if !KEPT.keep(block, len) {
            // SAFETY: the caller's contract.
            unsafe { unmap_now(block, len) };
        }
    }

    /// Unmaps `len` bytes (whole pages) at `block`.
    ///
    /// # Safety
    /// `block..block + len` must be mapped and unused.
    unsafe fn unmap_now(block: *mut u8, len: usize) {
        // SAFETY: the caller's contract. A failure (impossible for a valid
        // mapping) would leak the pages, never free them twice.
        unsafe {
            libc::munmap(block.cast(), len);
        }
    }

    /// Zeroes the first `len` bytes of a kept block before it is handed out
    /// again (about 10 ms for 150 MB), in pieces with a yield point between
    /// them (see `priority::pace_chunk`). The pages its last user never
    /// touched are faulted in here, as they would be by their first use.
    fn clear(block: *mut u8, len: usize) {
        const PIECE: usize = 256 << 10;
        let mut at = 0;
        while at < len {
            let n = PIECE.min(len - at);
            // SAFETY: `block..block + len` is a mapping handed to no one yet.
            unsafe { std::ptr::write_bytes(block.add(at), 0, n) };
            at += n;
            crate::priority::pace_chunk();
        }
    }

    /// Gives a kept block the advice of its new use, whichever it had
    /// before: huge pages for a lasting block; none for a transient one or
    /// with advising off (`MADV_NOHUGEPAGE`: there is no advice that goes
    /// back to none, so under THP `always`, where an unadvised fresh block
    /// would get huge pages, a reused one does not). Its resident pages stay
    /// as they are; the advice decides its later faults and whether the
    /// kernel may merge its small pages.
    fn readvise(block: *mut libc::c_void, len: usize) {
        let advice = if super::ADVISING.load(Ordering::Relaxed) && !super::in_transient() {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        };
        // SAFETY: `block..block + len` is one mapping of ours; the advice
        // changes how its future faults are served, nothing else.
        unsafe {
            libc::madvise(block, len, advice);
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
    pub fn map(_: usize, _: bool) -> *mut u8 {
        unreachable!("only Linux maps blocks itself")
    }
    pub fn keep_freed() {}
    pub fn release_kept() -> usize {
        0
    }
    pub fn kept_bytes() -> usize {
        0
    }
    pub fn keeping() -> bool {
        false
    }
    pub unsafe fn remap(_: *mut u8, _: usize, _: usize) -> *mut u8 {
        unreachable!("only Linux maps blocks itself")
    }
    pub unsafe fn unmap(_: *mut u8, _: usize) {
        unreachable!("only Linux maps blocks itself")
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Held by tests that switch keeping ([`keep_freed`]) on or off, or
    /// look at whether it is on.
    pub(crate) static KEEPING: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    #[cfg(target_os = "linux")]
    fn freed_blocks_are_kept_for_one_round_and_reused_by_size() {
        // Its blocks come from, and go back to, the allocator's own kept
        // blocks when those are on.
        let _serial = KEEPING.lock().unwrap_or_else(|e| e.into_inner());
        const MIB: usize = 1 << 20;
        let kept = os::Kept::new();
        let block = os::map(8 * MIB, false);
        assert!(!block.is_null());
        assert!(!kept.keep(block, 8 * MIB), "kept before keeping started");
        kept.start();
        // SAFETY: the block is 8 MiB, ours.
        unsafe { std::ptr::write_bytes(block, 7, 8 * MIB) };
        assert!(kept.keep(block, 8 * MIB));
        assert_eq!(kept.bytes(), 8 * MIB);

        // A block of the length asked for is handed out whole, its
        // contents as they were (clearing is the allocator's business).
        assert_eq!(kept.take(8 * MIB), Some((block, 8 * MIB)));
        assert_eq!(kept.bytes(), 0);
        assert!(kept.keep(block, 8 * MIB));
        // One of another length, kept in this round, is left for the next.
        assert_eq!(kept.take(6 * MIB), None);

        // In the next round, a block within a factor of two serves when
        // none has the length: cut to it...
        kept.start();
        assert_eq!(kept.take(2 * MIB), None, "more than twice as long");
        assert_eq!(kept.take(6 * MIB), Some((block, 6 * MIB)));
        assert_eq!(kept.bytes(), 0);
        // SAFETY: the first 6 MiB are still mapped.
        assert_eq!(unsafe { *block.add(6 * MIB - 1) }, 7);

        // ... or grown, keeping its pages and contents.
        let small = os::map(4 * MIB, false);
        // SAFETY: the block is 4 MiB, ours.
        unsafe { std::ptr::write_bytes(small, 5, 4 * MIB) };
        assert!(kept.keep(small, 4 * MIB));
        kept.start();
        let (grown, used) = kept.take(7 * MIB).expect("a kept block of 4 MiB, grown");
        assert_eq!(used, 4 * MIB);
        assert_eq!(kept.bytes(), 0);
        // SAFETY: the block is 7 MiB now.
        let grown_bytes = unsafe { std::slice::from_raw_parts(grown, 7 * MIB) };
        assert!(grown_bytes[..4 * MIB].iter().all(|&b| b == 5));
        assert!(grown_bytes[4 * MIB..].iter().all(|&b| b == 0));
        // SAFETY: `grown` is a 7 MiB mapping no one else has.
        unsafe { os::unmap(grown, 7 * MIB) };

        // Kept in one round, a block may be taken in the next; after that
        // it is unmapped.
        assert!(kept.keep(block, 6 * MIB));
        kept.start();
        assert_eq!(kept.bytes(), 6 * MIB);
        kept.start();
        assert_eq!(kept.bytes(), 0);

        // A release unmaps what is kept and stops keeping.
        let other = os::map(4 * MIB, false);
        assert!(kept.keep(other, 4 * MIB));
        assert_eq!(kept.release(), 4 * MIB);
        assert_eq!(kept.bytes(), 0);
        let last = os::map(4 * MIB, false);
        assert!(!kept.keep(last, 4 * MIB), "kept after a release");
        // SAFETY: `last` is a 4 MiB mapping no one else has.
        unsafe { os::unmap(last, 4 * MIB) };
    }

    #[test]
    #[cfg(target_os = "linux")]
    fn a_block_handed_out_again_is_cleared_and_advised_for_its_new_use() {
        let _serial = KEEPING.lock().unwrap_or_else(|e| e.into_inner());
        let thp = std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists();
        let large = Layout::from_size_align(8 << 20, 8).unwrap();
        keep_freed();
        // SAFETY: each block is freed with its layout; writes stay inside.
        unsafe {
            let first = LargePages.alloc(large);
            assert!(!first.is_null());
            std::ptr::write_bytes(first, 7, large.size());
            LargePages.dealloc(first, large);
            assert!(kept_bytes() >= large.size());
            // Handed out again for a block that lives for one reload, then
            // for a lasting one.
            for (in_transient, huge) in [(true, false), (false, thp)] {
                let again = if in_transient {
                    transient(|| LargePages.alloc_zeroed(large))
                } else {
                    LargePages.alloc_zeroed(large)
                };
                assert_eq!(again, first);
                assert!(
                    std::slice::from_raw_parts(again, large.size())
                        .iter()
                        .all(|&b| b == 0)
                );
                assert_eq!(advised(again as usize + (4 << 20)), Some(huge));
                std::ptr::write_bytes(again, 9, large.size());
                LargePages.dealloc(again, large);
            }
        }
        assert!(release_kept() >= large.size());
        assert_eq!(kept_bytes(), 0);
        assert!(!keeping());
    }

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
        let _serial = KEEPING.lock().unwrap_or_else(|e| e.into_inner());
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
        let _serial = KEEPING.lock().unwrap_or_else(|e| e.into_inner());
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
