//! The key file: parsing and validation, with every problem reported at its
//! `file:line:column`.
//!
//! The file is TOML (see the README for the format), or the same structure
//! in JSON when its name ends in `.json` ([`json`]). Parsing walks a
//! span-preserving document rather than deserialising through serde, for two
//! reasons: serde stops at the first error, and an operator fixing a broken
//! file wants *all* of its problems at once; and every diagnostic must point at
//! the exact line and column of the offending value.
//!
//! That walk is thorough but costs seconds and gigabytes for a million keys,
//! so [`parse_str`] first tries [`parse_fast`], a single-pass parser for the
//! subset of TOML that key files use in practice, which accepts only files
//! the full validator accepts (with an equal result) and declines everything
//! else; declined files, including every invalid one, go through the full
//! validator, [`parse_str_full`], for their diagnostics.
//!
//! Nothing here touches the serving path: the output, a [`KeySource`] (the
//! fast path's compact [`FastFile`], or a [`KeyFile`]), is handed to
//! [`crate::ring::KeyRing::build`] off the hot path.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use jiff::Timestamp;
use toml_edit::{Item, Table, Value};

use crate::ring::{Digest, DigestPrefix, FileDigest};

mod fast;
pub mod json;

pub use fast::{
    FastFile, parse_fast, parse_fast_compact, parse_fast_compact_threads, parse_fast_threads,
};

/// Longest key id accepted (ids appear in logs and metric labels).
pub const MAX_ID_LEN: usize = 128;

/// The lifecycle state of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyState {
    /// Accepted.
    Active,
    /// Accepted, with `Deprecation`/`Sunset` headers telling the client to switch.
    Deprecated,
    /// Denied with `revoked_key`.
    Revoked,
}

impl KeyState {
    /// The spelling used in the key file, logs and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::Deprecated => "deprecated",
            KeyState::Revoked => "revoked",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "active" => Some(KeyState::Active),
            "deprecated" => Some(KeyState::Deprecated),
            "revoked" => Some(KeyState::Revoked),
            _ => None,
        }
    }
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A per-key request budget: `requests` per `per`, with bursts up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RateLimitSpec {
    /// Requests allowed per period.
    pub requests: u64,
    /// The period.
    pub per: Duration,
    /// Largest burst (defaults to `requests`).
    pub burst: u64,
}

/// One validated `[[keys]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpec {
    /// Unique id, `[A-Za-z0-9._-]{1,128}`.
    pub id: String,
    /// The principal the key authenticates.
    pub client: String,
    /// SHA-256 of the secret's UTF-8 bytes.
    pub digest: [u8; 32],
    /// Scopes granted to the key.
    pub scopes: Vec<String>,
    /// Lifecycle state.
    pub state: KeyState,
    /// Not valid before this instant.
    pub not_before: Option<Timestamp>,
    /// Not valid at or after this instant.
    pub expires_at: Option<Timestamp>,
    /// When the key was deprecated (set by `keys rotate`).
    pub deprecated_at: Option<Timestamp>,
    /// Free text for operators.
    pub description: Option<String>,
    /// Optional request budget.
    pub rate_limit: Option<RateLimitSpec>,
    /// 1-based line of the entry's `[[keys]]` header (for messages).
    pub line: usize,
}

impl KeySpec {
    /// A key defined on `line` with an empty id, client and digest, active,
    /// and every optional field unset: the start of one being parsed.
    pub fn blank(line: usize) -> KeySpec {
        KeySpec {
            id: String::new(),
            client: String::new(),
            digest: [0; 32],
            scopes: Vec::new(),
            state: KeyState::Active,
            not_before: None,
            expires_at: None,
            deprecated_at: None,
            description: None,
            rate_limit: None,
            line,
        }
    }
}

/// Most keys one file may hold: 16,777,215. The ring packs a key's
/// client-and-scopes index into 24 bits. A file within [`MAX_FILE_BYTES`]
/// holds fewer (about 3.5 million keys of 150 bytes), so this bounds key
/// files built other ways than by reading one.
pub const MAX_KEYS: usize = (1 << 24) - 1;

/// A parsed and validated key file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyFile {
    /// The keys, in file order.
    pub keys: Vec<KeySpec>,
    /// Route rules, in file order (used when Envoy sends no `required_scopes`).
    pub routes: Vec<RouteSpec>,
}

/// What a ring is built from: the keys of a validated file, read one at a
/// time. [`KeyFile`] is one; the fast parser's [`FastFile`], which keeps
/// each key in a compact record that borrows its strings from the file text,
/// is the other, and spares a large file a few allocations per key.
pub trait KeySource: Sync {
    /// How many keys.
    fn key_count(&self) -> usize;
    /// The key at `index` (below [`KeySource::key_count`]), in file order.
    fn key(&self, index: usize) -> KeyView<'_>;
    /// The id of the key at `index`.
    fn key_id(&self, index: usize) -> &str {
        self.key(index).id
    }
    /// The client of the key at `index`.
    fn key_client(&self, index: usize) -> &str {
        self.key(index).client
    }
    /// The route rules, in file order.
    fn route_specs(&self) -> &[RouteSpec];
}

/// One key of a [`KeySource`], borrowed.
#[derive(Debug, Clone, Copy)]
pub struct KeyView<'a> {
    /// Unique id.
    pub id: &'a str,
    /// The principal the key authenticates.
    pub client: &'a str,
    /// What a ring keeps of the SHA-256 of the secret.
    pub digest_prefix: DigestPrefix,
    /// Scopes, deduplicated, in file order.
    pub scopes: &'a [String],
    /// The source's number for this scope set, when it numbers them: keys
    /// with equal numbers have equal scopes. Lets the ring intern a set
    /// once per number instead of hashing it for every key.
    pub scope_set: Option<u32>,
    /// Lifecycle state.
    pub state: KeyState,
    /// Not valid before this instant.
    pub not_before: Option<Timestamp>,
    /// Not valid at or after this instant.
    pub expires_at: Option<Timestamp>,
    /// When the key was deprecated.
    pub deprecated_at: Option<Timestamp>,
    /// Free text for operators.
    pub description: Option<&'a str>,
    /// Optional request budget.
    pub rate_limit: Option<RateLimitSpec>,
}

impl KeySource for KeyFile {
    fn key_count(&self) -> usize {
        self.keys.len()
    }

    fn key(&self, index: usize) -> KeyView<'_> {
        let k = &self.keys[index];
        KeyView {
            id: &k.id,
            client: &k.client,
            digest_prefix: crate::ring::digest_prefix(&k.digest),
            scopes: &k.scopes,
            scope_set: None,
            state: k.state,
            not_before: k.not_before,
            expires_at: k.expires_at,
            deprecated_at: k.deprecated_at,
            description: k.description.as_deref(),
            rate_limit: k.rate_limit,
        }
    }

    fn route_specs(&self) -> &[RouteSpec] {
        &self.routes
    }
}

/// A validated file as the ring build takes it: the fast parser's compact
/// form, or the full validator's [`KeyFile`] for files outside its subset.
/// [`crate::ring::KeyRing::build_parsed`] builds each with a copy of the
/// build made for it.
#[derive(Debug)]
pub enum Parsed<'t> {
    /// From [`parse_fast_compact`].
    Fast(FastFile<'t>),
    /// From [`parse_str_full`].
    Full(KeyFile),
}

impl Parsed<'_> {
    /// The file as the full validator gives it (the compact form expanded).
    pub fn into_key_file(self) -> KeyFile {
        match self {
            Parsed::Fast(f) => f.to_key_file(),
            Parsed::Full(f) => f,
        }
    }
}

/// One validated `[[routes]]` entry: the scopes a request needs when Envoy
/// passes no per-route `required_scopes` (as under Istio, which cannot).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    /// Matches paths starting with this (the query string is ignored).
    pub path_prefix: String,
    /// Matches only these methods (upper case); empty matches every method.
    pub methods: Vec<String>,
    /// Scopes the key must have (all of them).
    pub required_scopes: Vec<String>,
    /// 1-based line of the entry's `[[routes]]` header.
    pub line: usize,
}

/// One problem found in a key file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

/// A key file that could not be read or did not validate.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    /// The file could not be read.
    #[error("{path}: cannot read key file: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file was read but is invalid; every problem is listed.
    #[error("{}", render(path, diagnostics))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem, in file order.
        diagnostics: Vec<Diagnostic>,
    },
}

impl KeyFileError {
    /// The diagnostics, if the file was read.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            KeyFileError::Io { .. } => &[],
            KeyFileError::Invalid { diagnostics, .. } => diagnostics,
        }
    }
}

fn render(path: &Path, diagnostics: &[Diagnostic]) -> String {
    let mut out = String::new();
    for (i, d) in diagnostics.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!(
            "{}:{}:{}: {}",
            path.display(),
            d.line,
            d.column,
            d.message
        ));
    }
    out
}

/// How to load a key file: what counts as valid, and how many threads a
/// large one may keep busy.
#[derive(Debug, Clone, Copy, Default)]
pub struct ParseOptions {
    /// Accept a file with no keys (normally refused as a likely truncated write).
    pub allow_empty: bool,
    /// Threads a large file may keep busy at once.
    pub threads: Threads,
}

/// How many threads loading a large file may keep busy at once, counting
/// the calling one: reading it, parsing it, hashing it and indexing its
/// ring. A file of a few megabytes or less always loads on the calling
/// thread alone.
///
/// On a machine with few CPUs a reload that takes every CPU delays the
/// checks, even at idle priority (the kernel or the hypervisor cannot always
/// give a waking serving thread a CPU at once), so reloads leave one CPU
/// free by default where there are two or more ([`Threads::spare_one`]). Start-up, with nothing to
/// serve yet, uses them all ([`Threads::all`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threads(std::num::NonZeroUsize);

impl Threads {
    /// `n` threads (0 counts as 1).
    pub fn new(n: usize) -> Threads {
        Threads(std::num::NonZeroUsize::new(n).unwrap_or(std::num::NonZeroUsize::MIN))
    }

    /// One for each CPU.
    pub fn all() -> Threads {
        Threads::new(cpus())
    }

    /// One for each CPU but one, and at least one.
    pub fn spare_one() -> Threads {
        Threads::new(cpus().saturating_sub(1))
    }

    /// The number of threads.
    pub fn get(self) -> usize {
        self.0.get()
    }

    /// Threads a large file is parsed on: at most [`fast::PARSE_THREADS`].
    pub fn parse(self) -> usize {
        self.get().min(fast::PARSE_THREADS)
    }

    /// Whether a thread is left for the file's SHA-256 beside the parse
    /// (else it is computed once the ring serves; see [`Hashing`]).
    pub fn hash_beside_parse(self) -> bool {
        self.get() > self.parse()
    }

    /// Whether a second thread may share the work of one step (reading the
    /// file, indexing the ring).
    pub fn two(self) -> bool {
        self.get() >= 2
    }
}

impl Default for Threads {
    fn default() -> Threads {
        Threads::all()
    }
}

/// CPUs this process may run on.
fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Reads and validates the key file at `path`.
pub fn load(path: &Path, opts: ParseOptions) -> Result<(KeyFile, Vec<u8>), KeyFileError> {
    let bytes = read(path)?;
    let file = parse_bytes(path, &bytes, opts)?;
    Ok((file, bytes))
}

/// Largest key file read (a million keys take about 150 MB).
pub const MAX_FILE_BYTES: u64 = 512 * 1024 * 1024;

/// Opens `path` for reading if it is a regular file (symlinks followed).
///
/// The file is opened without blocking and its type read from the open
/// handle: opening a FIFO for reading would otherwise wait for a writer
/// (before any check of its type could run), and a check by path before
/// opening could be raced. On a regular file the flag changes nothing.
pub fn open_regular(path: &Path) -> std::io::Result<(std::fs::File, std::fs::Metadata)> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NONBLOCK);
    let file = options.open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok((file, meta))
}

/// Reads a key file: a regular file (symlinks followed) of at most
/// [`MAX_FILE_BYTES`], so a FIFO, a device or a runaway file can neither
/// block the reloader nor exhaust memory.
pub fn read(path: &Path) -> Result<Vec<u8>, KeyFileError> {
    read_on(path, Threads::all())
}

/// [`read`], sharing a large file's reading between at most `threads`.
pub fn read_on(path: &Path, threads: Threads) -> Result<Vec<u8>, KeyFileError> {
    read_checked(path, threads).map(|r| r.bytes)
}

/// A key file's bytes, and whether the file held still while they were read.
#[derive(Debug)]
pub struct Read {
    /// What was read.
    pub bytes: Vec<u8>,
    /// Whether the open file's size and modification time were the same
    /// after the read as before: false if something wrote into it meanwhile,
    /// so the bytes may be a mix, or a file not yet finished.
    pub steady: bool,
}

/// [`read_on`], telling whether the file held still ([`Read::steady`]).
pub fn read_checked(path: &Path, threads: Threads) -> Result<Read, KeyFileError> {
    let io = |source| KeyFileError::Io {
        path: path.to_owned(),
        source,
    };
    let (file, meta) = open_regular(path).map_err(io)?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{} bytes is larger than the {} byte limit",
                meta.len(),
                MAX_FILE_BYTES
            ),
        )));
    }
    let halves = if threads.two() {
        read_halves(&file, meta.len())
    } else {
        None
    };
    let bytes = match halves {
        Some(bytes) => bytes,
        None => read_whole(&file, meta.len()).map_err(io)?,
    };
    // The same open file, so a rename over the path since does not count:
    // the bytes came whole from the file that was there.
    let steady = file.metadata().is_ok_and(|after| {
        after.len() == meta.len() && after.modified().ok() == meta.modified().ok()
    });
    Ok(Read { bytes, steady })
}

/// Reads `file`, whose metadata said `len` bytes, to its end.
fn read_whole(file: &std::fs::File, len: u64) -> std::io::Result<Vec<u8>> {
    // Room for the file as its metadata says, and one byte more to see its
    // end; it grows if the file does. The room is not cleared first: reads
    // go straight into it (a kept block of a million-key file's size would
    // otherwise be zeroed, 150 MB, only to be overwritten).
    let limit = MAX_FILE_BYTES as usize + 1;
    let expected = usize::try_from(len).unwrap_or(0);
    let mut bytes = Vec::with_capacity(expected.saturating_add(1).min(limit));
    loop {
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the file grew past the size limit while being read",
            ));
        }
        if bytes.len() == bytes.capacity() {
            let more = bytes.len().max(64 << 10).min(limit - bytes.len());
            bytes.reserve_exact(more);
        }
        let at = bytes.len() as u64;
        let spare = bytes.spare_capacity_mut();
        let chunk = spare.len().min(READ_CHUNK);
        let room = &mut spare[..chunk];
        fault_in(room);
        match read_at_uninit(file, room, at) {
            Ok(0) => break,
            // SAFETY: `read_at_uninit` initialised the first `n` bytes of
            // the spare capacity, which directly follow the vector's length.
            Ok(n) => unsafe { bytes.set_len(bytes.len() + n) },
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        crate::priority::pace_chunk();
    }
    Ok(bytes)
}

/// Reads from `file` at offset `at` into `buf`, whose bytes may be
/// uninitialised; how many it read, all of them now initialised. One read
/// (on Unix, one `pread`): it may read less than `buf` holds, and 0 means
/// the end of the file.
#[cfg(unix)]
fn read_at_uninit(
    file: &std::fs::File,
    buf: &mut [std::mem::MaybeUninit<u8>],
    at: u64,
) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd as _;
    let at = libc::off_t::try_from(at)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "offset too large"))?;
    // SAFETY: pread writes at most `buf.len()` bytes to `buf`, memory this
    // function borrows mutably, and never reads them, so their being
    // uninitialised does not matter; the bytes it reports are initialised.
    let n = unsafe { libc::pread(file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), at) };
    // A negative count (-1) is an error, reported in errno.
    usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
}

/// Elsewhere: a seek and a read through a zeroed buffer of its own.
#[cfg(not(unix))]
fn read_at_uninit(
    file: &std::fs::File,
    buf: &mut [std::mem::MaybeUninit<u8>],
    at: u64,
) -> std::io::Result<usize> {
    use std::io::{Read as _, Seek as _};
    let mut read = vec![0u8; buf.len()];
    let mut file = file;
    file.seek(std::io::SeekFrom::Start(at))?;
    let n = file.read(&mut read)?;
    for (to, &from) in buf.iter_mut().zip(&read[..n]) {
        to.write(from);
    }
    Ok(n)
}

/// Most bytes one read system call asks for. A kernel built without
/// preemption copies a whole read before it lets another thread have the
/// CPU, even a check that preempts the background reader at once in user
/// space: one 75 MB read held a CPU for 47 ms while a serving thread waited
/// for it (`perf sched timehist` of a million-key reload). A megabyte took
/// 0.7–1.2 ms on the machine in BENCHMARKS.md (`perf trace`), most of it
/// faulting in the fresh buffer inside the call, which [`fault_in`] now does
/// beforehand. In reload storms of 10,000-key files, checks woken onto the
/// reloading CPU waited 272 µs at p99 with megabyte reads faulting in their
/// buffer, 121 µs with the buffer faulted in first (a write to each page),
/// and 92 µs with reads of 256 KiB as well.
const READ_CHUNK: usize = 256 << 10;

/// Faults in every page of `buf` before a read into it. A page faulted in
/// by the read itself is faulted in inside the system call, where a kernel
/// without preemption lets no check have the CPU. Linux's
/// `MADV_POPULATE_WRITE` faults pages in one at a time with a point between
/// them where a waiting check preempts this thread; where the kernel lacks
/// it (before 5.14), a write to each page does, each fault returning to
/// user space, at about 2 µs more a page in a virtual machine. Leaves
/// `buf`'s contents unspecified: call it on bytes about to be read into.
fn fault_in(buf: &mut [std::mem::MaybeUninit<u8>]) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if populate(buf) {
        return;
    }
    let last = buf.len().saturating_sub(1);
    for i in (0..buf.len())
        .step_by(crate::pages::page_size())
        .chain(std::iter::once(last))
    {
        if let Some(b) = buf.get_mut(i) {
            // An opaque value, so the compiler cannot drop the store.
            b.write(std::hint::black_box(0));
        }
    }
}

/// `MADV_POPULATE_WRITE` over the whole pages of `buf`; whether the kernel
/// did it. The partial pages at either end are left to the read.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn populate(buf: &mut [std::mem::MaybeUninit<u8>]) -> bool {
    let page = crate::pages::page_size();
    let addr = buf.as_mut_ptr() as usize;
    let start = addr.next_multiple_of(page);
    let end = (addr + buf.len()) / page * page;
    if end <= start {
        return true;
    }
    // SAFETY: [start, end) is a whole number of pages inside `buf`, which
    // this function borrows mutably, so the call can only map memory of
    // ours. Populating maps pages as a write would, without changing their
    // contents, whether it succeeds, fails (EINVAL on kernels without it)
    // or stops partway.
    unsafe {
        libc::madvise(
            start as *mut libc::c_void,
            end - start,
            libc::MADV_POPULATE_WRITE,
        ) == 0
    }
}

/// Fills `buf` from `file` at offset `at` in reads of at most
/// [`READ_CHUNK`] bytes, each faulted in first; an error if the file ends
/// before `buf` is full. All of `buf` is initialised when it returns `Ok`.
#[cfg(unix)]
fn read_exact_at_chunked(
    file: &std::fs::File,
    buf: &mut [std::mem::MaybeUninit<u8>],
    at: u64,
) -> std::io::Result<()> {
    let mut at = at;
    for chunk in buf.chunks_mut(READ_CHUNK) {
        fault_in(chunk);
        let mut done = 0;
        while done < chunk.len() {
            match read_at_uninit(file, &mut chunk[done..], at) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    done += n;
                    at += n as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        crate::priority::pace_chunk();
    }
    Ok(())
}

/// Files at least this large are read by two threads, a half each, when
/// the thread budget allows (see [`Threads::two`]).
const PARALLEL_READ_MIN_BYTES: u64 = 16 << 20;

/// Reads a large file of `len` bytes (as its metadata says) in two halves
/// side by side: most of a read's time goes to faulting in and filling the
/// fresh pages of the buffer, which two CPUs do twice as fast. `None` when
/// the file is small, or changed size meanwhile, or a thread or a read
/// failed: the caller then reads it the plain way, which reports errors.
#[cfg(unix)]
fn read_halves(file: &std::fs::File, len: u64) -> Option<Vec<u8>> {
    if !(PARALLEL_READ_MIN_BYTES..=MAX_FILE_BYTES).contains(&len) {
        return None;
    }
    let len = usize::try_from(len).ok()?;
    // Uncleared room, faulted in chunk by chunk just before each read (a
    // kept block of this size would otherwise be zeroed, only to be
    // overwritten).
    let mut bytes = Vec::with_capacity(len);
    let (first, second) = bytes.spare_capacity_mut()[..len].split_at_mut(len / 2);
    let half = first.len() as u64;
    let both = std::thread::scope(|s| {
        let other = std::thread::Builder::new()
            .name("keyward-read".into())
            .spawn_scoped(s, || read_exact_at_chunked(file, second, half).is_ok())
            .ok()?;
        let mine = read_exact_at_chunked(file, first, 0).is_ok();
        Some(other.join().unwrap_or(false) && mine)
    });
    if both != Some(true) {
        return None;
    }
    // SAFETY: both halves of the first `len` bytes of spare capacity were
    // read into in full (`read_exact_at_chunked` returned `Ok` for each).
    unsafe { bytes.set_len(len) };
    // Exactly `len` bytes: the next byte is the end of the file.
    let mut next = [std::mem::MaybeUninit::uninit()];
    let at_end = read_at_uninit(file, &mut next, len as u64).is_ok_and(|n| n == 0);
    at_end.then_some(bytes)
}

#[cfg(not(unix))]
fn read_halves(_: &std::fs::File, _: u64) -> Option<Vec<u8>> {
    None
}

/// Files at least this large are hashed after their ring is published
/// rather than before (see [`Hashing`]); smaller ones hash in well under the
/// time it takes to notice.
pub const DEFER_DIGEST_MIN_BYTES: usize = 4 << 20;

/// A quick fingerprint of a file's contents: its length and CRC-32.
///
/// Equal contents always have equal fingerprints, so a fingerprint that
/// differs from the serving file's proves the file changed, without waiting
/// for its SHA-256. Equal fingerprints are only a hint (CRC-32 collides), to
/// be confirmed with the SHA-256.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    len: u64,
    crc: u32,
}

/// The [`Fingerprint`] of `bytes` (a few tens of milliseconds for 150 MB).
pub fn fingerprint(bytes: &[u8]) -> Fingerprint {
    let mut crc = crc32fast::Hasher::new();
    for chunk in bytes.chunks(PACED_CHUNK) {
        crc.update(chunk);
        crate::priority::pace_chunk();
    }
    Fingerprint {
        len: bytes.len() as u64,
        crc: crc.finalize(),
    }
}

/// How much of a file the checksum and the UTF-8 check take between two
/// yield points ([`crate::priority::pace_chunk`]): tens of microseconds' work.
const PACED_CHUNK: usize = 64 << 10;

/// How much of a file its SHA-256 takes between two yield points: tens of
/// microseconds' work even without SHA instructions (about 0.3–0.5 GB/s).
const PACED_DIGEST_CHUNK: usize = 16 << 10;

/// The SHA-256 of a file's bytes, with yield points between chunks.
pub fn file_digest(bytes: &[u8]) -> Digest {
    let mut sha = ::ring::digest::Context::new(&::ring::digest::SHA256);
    for chunk in bytes.chunks(PACED_DIGEST_CHUNK) {
        sha.update(chunk);
        crate::priority::pace_chunk();
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(sha.finish().as_ref());
    out
}

/// `bytes` as text if they are UTF-8, checked a chunk at a time with yield
/// points between chunks; the error `std::str::from_utf8` gives otherwise.
fn paced_utf8(bytes: &[u8]) -> Result<&str, std::str::Utf8Error> {
    let mut at = 0;
    while at < bytes.len() {
        let end = (at + PACED_CHUNK).min(bytes.len());
        match std::str::from_utf8(&bytes[at..end]) {
            Ok(_) => at = end,
            // A character cut by the chunk's end: the next chunk starts
            // with it. What came before it is valid, and is most of a chunk.
            Err(e) if e.error_len().is_none() && end < bytes.len() && e.valid_up_to() > 0 => {
                at += e.valid_up_to();
            }
            Err(_) => return std::str::from_utf8(bytes),
        }
        crate::priority::pace_chunk();
    }
    // SAFETY: every byte was checked above, in chunks that each start at a
    // character boundary (the start, or where the previous chunk's valid
    // text ended), so the whole is UTF-8.
    Ok(unsafe { std::str::from_utf8_unchecked(bytes) })
}

/// The SHA-256 of a file's bytes, being computed on a thread of its own (or
/// already computed, for small files and when no thread can be started).
///
/// The digest goes into a [`FileDigest`] cell shared with the ring built
/// from the same bytes, so it appears on the ring as soon as it is known.
///
/// With a thread to spare beside the parse (see
/// [`Threads::hash_beside_parse`]), the hash runs while the file is parsed.
/// Without, it is held back until [`Hashing::resume`] (called once the ring
/// serves): even at idle priority it would otherwise take a CPU from the
/// parse, because the scheduler is slow to move one of two parse threads off
/// a CPU that runs only an idle thread.
#[derive(Debug)]
pub struct Hashing {
    cell: FileDigest,
    thread: Option<(std::thread::JoinHandle<()>, Arc<Vec<u8>>)>,
    held: Option<Held>,
}

/// Bytes whose hash is held back, and the setup for the thread that will
/// hash them.
type Held = (Arc<Vec<u8>>, fn());

impl Hashing {
    /// Starts hashing `bytes`: on the calling thread when they are fewer
    /// than `defer_min` (normally [`DEFER_DIGEST_MIN_BYTES`]), else on a new
    /// thread that first runs `setup` (to lower its priority, say), now or
    /// at [`Hashing::resume`] (see the type's documentation), for a parse
    /// that may keep `threads` busy.
    pub fn start(bytes: &Arc<Vec<u8>>, defer_min: usize, threads: Threads, setup: fn()) -> Hashing {
        let cell = FileDigest::pending();
        if bytes.len() < defer_min {
            cell.set(file_digest(bytes));
            return Hashing {
                cell,
                thread: None,
                held: None,
            };
        }
        let mut hashing = Hashing {
            cell,
            thread: None,
            held: Some((Arc::clone(bytes), setup)),
        };
        if threads.hash_beside_parse() {
            hashing.resume();
        }
        hashing
    }

    /// Starts a hash that [`Hashing::start`] held back; does nothing
    /// otherwise.
    pub fn resume(&mut self) {
        let Some((bytes, setup)) = self.held.take() else {
            return;
        };
        let (theirs, out) = (Arc::clone(&bytes), self.cell.clone());
        let spawned = std::thread::Builder::new()
            .name("keyward-hash".into())
            .spawn(move || {
                setup();
                out.set(file_digest(&theirs));
            });
        match spawned {
            Ok(handle) => self.thread = Some((handle, bytes)),
            Err(_) => {
                self.cell.set(file_digest(&bytes));
            }
        }
    }

    /// The cell the digest goes into (give it to the ring).
    pub fn cell(&self) -> &FileDigest {
        &self.cell
    }

    /// Waits for the digest.
    pub fn wait(&mut self) -> Digest {
        if let Some((bytes, _)) = self.held.take() {
            self.cell.set(file_digest(&bytes));
        }
        if let Some((handle, bytes)) = self.thread.take() {
            // Hashing cannot panic; should the thread fail anyway, hash here.
            if handle.join().is_err() || self.cell.get().is_none() {
                self.cell.set(file_digest(&bytes));
            }
        }
        self.cell.wait()
    }

    /// Waits for the digest of the file behind ring `generation` and, when
    /// that ring was published before the digest was known (its audit record
    /// said `sha256="pending"`), logs the audit record that carries it.
    pub fn finish(&mut self, generation: u64, pending_at_publish: bool) {
        let digest = self.wait();
        if pending_at_publish {
            tracing::info!(
                target: "keyward::audit",
                generation,
                sha256 = %hex::encode(digest),
                "key ring file digest"
            );
        }
    }
}

/// Validates key file contents; `path` is used only in messages.
pub fn parse_bytes(path: &Path, bytes: &[u8], opts: ParseOptions) -> Result<KeyFile, KeyFileError> {
    parse_bytes_for_ring(path, bytes, opts).map(Parsed::into_key_file)
}

/// The file's text, or the error naming where it stops being UTF-8.
fn utf8<'t>(path: &Path, bytes: &'t [u8]) -> Result<&'t str, KeyFileError> {
    paced_utf8(bytes).map_err(|e| {
        let at = e.valid_up_to();
        let (line, column) = position(&String::from_utf8_lossy(&bytes[..at]), at);
        KeyFileError::Invalid {
            path: path.to_owned(),
            diagnostics: vec![Diagnostic {
                line,
                column,
                message: "key file is not valid UTF-8".into(),
            }],
        }
    })
}

/// [`parse_bytes`] for building a ring: a TOML file the fast path accepts
/// stays in its compact form, borrowing from `bytes`. A file whose name
/// ends in `.json` is read as JSON ([`parse_json_str`]).
pub fn parse_bytes_for_ring<'t>(
    path: &Path,
    bytes: &'t [u8],
    opts: ParseOptions,
) -> Result<Parsed<'t>, KeyFileError> {
    let text = utf8(path, bytes)?;
    let parsed = if is_json(path) {
        parse_json_str(text, opts).map(Parsed::Full)
    } else {
        parse_str_for_ring(text, opts)
    };
    parsed.map_err(|diagnostics| KeyFileError::Invalid {
        path: path.to_owned(),
        diagnostics,
    })
}

/// Whether `path` names a JSON key file: its name ends in `.json` (in any
/// case). Every other file is TOML.
pub fn is_json(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

/// Validates a JSON key file: the structure of the TOML file, in JSON, read
/// by the same validator ([`json`]); every problem is reported at its JSON
/// line and column.
pub fn parse_json_str(text: &str, opts: ParseOptions) -> Result<KeyFile, Vec<Diagnostic>> {
    let translated = json::translate(text).map_err(|d| vec![d])?;
    match parse_str(&translated.toml, opts) {
        Ok(mut file) if translated.problems.is_empty() => {
            let lines = translated.lines(text);
            for key in &mut file.keys {
                key.line = lines.json_line(key.line);
            }
            for route in &mut file.routes {
                route.line = lines.json_line(route.line);
            }
            Ok(file)
        }
        Ok(_) => Err(translated.diagnostics_in(text, Vec::new())),
        Err(diagnostics) => Err(translated.diagnostics_in(text, diagnostics)),
    }
}

/// Validates key file text, returning every problem found.
///
/// Files in the common shape (what `keyward keys` writes and what people write
/// by hand) go through [`parse_fast`]; anything it declines, including every
/// invalid file, goes through [`parse_str_full`], which reports the problems.
/// Both give the same result for any file the fast path accepts.
pub fn parse_str(text: &str, opts: ParseOptions) -> Result<KeyFile, Vec<Diagnostic>> {
    parse_str_for_ring(text, opts).map(Parsed::into_key_file)
}

/// [`parse_str`] for building a ring: a file the fast path accepts stays in
/// its compact form ([`parse_fast_compact`]), borrowing from `text`.
pub fn parse_str_for_ring(text: &str, opts: ParseOptions) -> Result<Parsed<'_>, Vec<Diagnostic>> {
    match parse_fast_compact(text, opts) {
        Some(file) => Ok(Parsed::Fast(file)),
        None => parse_str_full(text, opts).map(Parsed::Full),
    }
}

/// Validates key file text with the complete TOML parser, returning every
/// problem found at its line and column. [`parse_str`] uses it for the files
/// the fast path declines; it is the reference the fast path is tested against.
pub fn parse_str_full(text: &str, opts: ParseOptions) -> Result<KeyFile, Vec<Diagnostic>> {
    let doc = match toml_edit::Document::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            let at = e.span().map(|s| s.start).unwrap_or(0);
            let (line, column) = position(text, at);
            return Err(vec![Diagnostic {
                line,
                column,
                message: format!("invalid TOML: {}", e.message().trim_end()),
            }]);
        }
    };
    let mut v = Validator {
        text,
        diags: Vec::new(),
        line_starts: std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect(),
        names: Vec::new(),
    };
    let (keys, routes) = v.document(doc.as_table());
    if keys.is_empty() && v.diags.is_empty() && !opts.allow_empty {
        v.diags.push(Diagnostic {
            line: 1,
            column: 1,
            message: "the key file defines no keys (refused as a likely truncated write; \
                      start the server with --allow-empty to accept an empty ring)"
                .into(),
        });
    }
    if v.diags.is_empty() {
        Ok(KeyFile { keys, routes })
    } else {
        v.diags.sort_by_key(|d| (d.line, d.column));
        Err(v.diags)
    }
}

/// 1-based (line, column) of byte offset `at` in `text`; columns count characters.
pub fn position(text: &str, at: usize) -> (usize, usize) {
    let at = at.min(text.len());
    let mut at = at;
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

/// Parses a duration written like `500ms`, `30s`, `30m`, `1h`, `7d` or `2w`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("duration {s:?} has no unit (use ms, s, m, h, d or w)"))?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("duration {s:?} must start with a whole number"))?;
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 604_800_000,
        _ => {
            return Err(format!(
                "duration {s:?} has unknown unit {unit:?} (use ms, s, m, h, d or w)"
            ));
        }
    };
    n.checked_mul(unit_ms)
        .map(Duration::from_millis)
        .ok_or_else(|| format!("duration {s:?} is too large"))
}

/// Parses an RFC 3339 instant (an offset is required).
pub fn parse_time(s: &str) -> Result<Timestamp, String> {
    s.trim().parse::<Timestamp>().map_err(|e| {
        format!("invalid time {s:?} (expected RFC 3339 such as 2026-11-27T00:00:00Z): {e}")
    })
}

const KEY_FIELDS: &[&str] = &[
    "id",
    "client",
    "sha256",
    "scopes",
    "state",
    "not_before",
    "expires_at",
    "deprecated_at",
    "description",
    "rate_limit",
];

struct Validator<'t> {
    text: &'t str,
    diags: Vec<Diagnostic>,
    /// Byte offset of the start of each line, for O(log n) positions.
    line_starts: Vec<usize>,
    /// Every key's id and digest as far as they could be read, for the
    /// uniqueness checks: a key with other problems is compared too, so
    /// every problem is reported at once.
    names: Vec<Named>,
}

/// What tells a [`KeySpec`] apart from the others, as far as it was read.
struct Named {
    id: Option<String>,
    digest: Option<Digest>,
    line: usize,
}

impl Validator<'_> {
    /// 1-based (line, column) of byte offset `at`, like [`position`] but
    /// without rescanning the text (files can hold a million keys).
    fn pos(&self, at: usize) -> (usize, usize) {
        let mut at = at.min(self.text.len());
        while !self.text.is_char_boundary(at) {
            at -= 1;
        }
        let line = self.line_starts.partition_point(|&s| s <= at);
        let start = self.line_starts[line - 1];
        (line, self.text[start..at].chars().count() + 1)
    }

    fn at(&mut self, span: Option<Range<usize>>, message: impl Into<String>) {
        let (line, column) = self.pos(span.map(|s| s.start).unwrap_or(0));
        self.diags.push(Diagnostic {
            line,
            column,
            message: message.into(),
        });
    }

    fn document(&mut self, root: &Table) -> (Vec<KeySpec>, Vec<RouteSpec>) {
        let mut keys = Vec::new();
        let mut routes = Vec::new();
        for (name, item) in root.iter() {
            let key_span = root.key(name).and_then(|k| k.span());
            match name {
                "keys" => match item {
                    Item::ArrayOfTables(aot) => {
                        for table in aot.iter() {
                            if let Some(k) = self.key_table(table) {
                                keys.push(k);
                            }
                        }
                    }
                    Item::Value(Value::Array(a)) if a.is_empty() => {}
                    _ => self.at(
                        key_span,
                        "`keys` must be an array of tables, written as [[keys]] sections",
                    ),
                },
                "routes" => match item {
                    Item::ArrayOfTables(aot) => {
                        for table in aot.iter() {
                            if let Some(r) = self.route_table(table) {
                                routes.push(r);
                            }
                        }
                    }
                    Item::Value(Value::Array(a)) if a.is_empty() => {}
                    _ => self.at(
                        key_span,
                        "`routes` must be an array of tables, written as [[routes]] sections",
                    ),
                },
                other => self.at(
                    key_span,
                    format!("unknown top-level field `{other}` (expected [[keys]] or [[routes]])"),
                ),
            }
        }
        self.cross_checks(&keys);
        (keys, routes)
    }

    fn route_table(&mut self, t: &Table) -> Option<RouteSpec> {
        const FIELDS: &[&str] = &["path_prefix", "methods", "required_scopes"];
        let before = self.diags.len();
        for (name, _) in t.iter() {
            if !FIELDS.contains(&name) {
                let hint = suggest(name, FIELDS)
                    .map(|s| format!(" (did you mean `{s}`?)"))
                    .unwrap_or_default();
                self.at(
                    t.key(name).and_then(|k| k.span()),
                    format!("unknown field `{name}` in [[routes]]{hint}"),
                );
            }
        }
        let prefix = match t.get("path_prefix") {
            None => {
                self.at(
                    t.span(),
                    "missing required field `path_prefix` in [[routes]]",
                );
                None
            }
            Some(item) => match item.as_str() {
                Some(p) if p.starts_with('/') && !p.contains(['?', '#']) => Some(p.to_owned()),
                _ => {
                    self.at(
                        item.span(),
                        "`path_prefix` must be a string starting with / (without query or fragment)",
                    );
                    None
                }
            },
        };
        let mut strings =
            |field: &str, valid: &dyn Fn(&str) -> bool, what: &str| -> Option<Vec<String>> {
                let Some(item) = t.get(field) else {
                    return Some(Vec::new());
                };
                let Some(array) = item.as_array() else {
                    self.at(
                        item.span(),
                        format!("`{field}` must be an array of strings"),
                    );
                    return None;
                };
                let mut out = Vec::new();
                for v in array.iter() {
                    match v.as_str() {
                        Some(s) if valid(s) => out.push(s.to_owned()),
                        _ => self.at(v.span(), format!("invalid {what} in `{field}`")),
                    }
                }
                Some(out)
            };
        let methods = strings(
            "methods",
            &|m| !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()),
            "method (use upper case, e.g. \"GET\")",
        );
        let scopes = strings("required_scopes", &is_scope, "scope");
        if t.get("required_scopes").is_none() {
            self.at(
                t.span(),
                "missing required field `required_scopes` in [[routes]] (use [] for a route that needs only a valid key)",
            );
        }
        if self.diags.len() != before {
            return None;
        }
        Some(RouteSpec {
            path_prefix: prefix?,
            methods: methods?,
            required_scopes: scopes?,
            line: self.pos(t.span().map_or(0, |s| s.start)).0,
        })
    }

    fn key_table(&mut self, t: &Table) -> Option<KeySpec> {
        let table_span = t.span();
        let before = self.diags.len();
        for (name, _) in t.iter() {
            if !KEY_FIELDS.contains(&name) {
                let span = t.key(name).and_then(|k| k.span());
                let hint = suggest(name, KEY_FIELDS)
                    .map(|s| format!(" (did you mean `{s}`?)"))
                    .unwrap_or_default();
                self.at(span, format!("unknown field `{name}` in [[keys]]{hint}"));
            }
        }
        let id = self.required_str(t, "id", table_span.clone());
        if let Some((id, span)) = &id
            && (id.is_empty()
                || id.len() > MAX_ID_LEN
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')))
        {
            self.at(
                span.clone(),
                format!("invalid id {id:?}: ids are 1 to 128 characters of A-Z a-z 0-9 . _ -"),
            );
        }
        let client = self.required_str(t, "client", table_span.clone());
        if let Some((client, span)) = &client
            && (client.trim().is_empty() || client.chars().any(|c| c.is_control()))
        {
            self.at(
                span.clone(),
                "`client` must be non-empty and contain no control characters",
            );
        }
        let digest = self
            .required_str(t, "sha256", table_span.clone())
            .and_then(|(hex, span)| match decode_digest(&hex) {
                Some(d) => Some(d),
                None => {
                    self.at(
                        span,
                        "`sha256` must be 64 hexadecimal digits (the SHA-256 of the secret; \
                         `keyward keys hash` prints it)",
                    );
                    None
                }
            });
        let scopes = self.scopes(t);
        let state = match t.get("state") {
            None => Some(KeyState::Active),
            Some(item) => match item.as_str() {
                Some(s) => match KeyState::parse(s) {
                    Some(st) => Some(st),
                    None => {
                        self.at(
                            item.span(),
                            format!("unknown state {s:?} (expected active, deprecated or revoked)"),
                        );
                        None
                    }
                },
                None => {
                    self.at(item.span(), "`state` must be a string");
                    None
                }
            },
        };
        let not_before = self.time(t, "not_before");
        let expires_at = self.time(t, "expires_at");
        let deprecated_at = self.time(t, "deprecated_at");
        if let (Some(nb), Some(exp)) = (not_before, expires_at)
            && exp <= nb
        {
            let span = t.get("expires_at").and_then(Item::span);
            self.at(
                span,
                format!("`expires_at` ({exp}) must be after `not_before` ({nb})"),
            );
        }
        let description = match t.get("description") {
            None => None,
            Some(item) => match item.as_str() {
                Some(s) => Some(s.to_owned()),
                None => {
                    self.at(item.span(), "`description` must be a string");
                    None
                }
            },
        };
        let rate_limit = self.rate_limit(t);
        let line = self.pos(table_span.map(|s| s.start).unwrap_or(0)).0;
        self.names.push(Named {
            id: id.as_ref().map(|(id, _)| id.clone()),
            digest,
            line,
        });
        if self.diags.len() != before {
            return None;
        }
        Some(KeySpec {
            id: id?.0,
            client: client?.0,
            digest: digest?,
            scopes: scopes?,
            state: state?,
            not_before,
            expires_at,
            deprecated_at,
            description,
            rate_limit,
            line,
        })
    }

    fn required_str(
        &mut self,
        t: &Table,
        field: &str,
        table_span: Option<Range<usize>>,
    ) -> Option<(String, Option<Range<usize>>)> {
        match t.get(field) {
            None => {
                self.at(
                    table_span,
                    format!("missing required field `{field}` in [[keys]]"),
                );
                None
            }
            Some(item) => match item.as_str() {
                Some(s) => Some((s.to_owned(), item.span())),
                None => {
                    self.at(item.span(), format!("`{field}` must be a string"));
                    None
                }
            },
        }
    }

    fn scopes(&mut self, t: &Table) -> Option<Vec<String>> {
        let Some(item) = t.get("scopes") else {
            return Some(Vec::new());
        };
        let Some(array) = item.as_array() else {
            self.at(
                item.span(),
                "`scopes` must be an array of strings, e.g. [\"read\"]",
            );
            return None;
        };
        let mut out = Vec::with_capacity(array.len());
        let mut ok = true;
        for v in array.iter() {
            match v.as_str() {
                Some(s) if is_scope(s) => {
                    if !out.iter().any(|o: &String| o == s) {
                        out.push(s.to_owned());
                    }
                }
                Some(s) => {
                    self.at(
                        v.span(),
                        format!("invalid scope {s:?}: scopes are non-empty visible ASCII without spaces or commas"),
                    );
                    ok = false;
                }
                None => {
                    self.at(v.span(), "each scope must be a string");
                    ok = false;
                }
            }
        }
        ok.then_some(out)
    }

    fn time(&mut self, t: &Table, field: &str) -> Option<Timestamp> {
        let item = t.get(field)?;
        let parsed = match item.as_value() {
            Some(Value::Datetime(dt)) => {
                let dt = dt.value();
                if dt.date.is_none() || dt.time.is_none() || dt.offset.is_none() {
                    Err(format!(
                        "`{field}` must be a full date-time with an offset, such as 2026-11-27T00:00:00Z"
                    ))
                } else {
                    parse_time(&dt.to_string()).map_err(|e| format!("`{field}`: {e}"))
                }
            }
            Some(Value::String(s)) => parse_time(s.value()).map_err(|e| format!("`{field}`: {e}")),
            _ => Err(format!(
                "`{field}` must be a date-time such as 2026-11-27T00:00:00Z"
            )),
        };
        match parsed {
            Ok(ts) => Some(ts),
            Err(msg) => {
                self.at(item.span(), msg);
                None
            }
        }
    }

    fn rate_limit(&mut self, t: &Table) -> Option<RateLimitSpec> {
        let item = t.get("rate_limit")?;
        let Some(table) = item.as_table_like() else {
            self.at(
                item.span(),
                "`rate_limit` must be a table such as { requests = 100, per = \"1s\", burst = 200 }",
            );
            return None;
        };
        let span = item.span();
        let mut requests = None;
        let mut per = None;
        let mut burst = None;
        let mut invalid = false;
        for (name, value) in table.iter() {
            let vspan = value.span();
            let before = self.diags.len();
            match name {
                "requests" | "burst" => match value.as_integer() {
                    Some(n) if n >= 1 => {
                        if name == "requests" {
                            requests = Some(n as u64);
                        } else {
                            burst = Some(n as u64);
                        }
                    }
                    _ => self.at(
                        vspan,
                        format!("`rate_limit.{name}` must be a positive integer"),
                    ),
                },
                "per" => match value.as_str().map(parse_duration) {
                    Some(Ok(d)) if !d.is_zero() => per = Some(d),
                    Some(Ok(_)) => self.at(vspan, "`rate_limit.per` must be longer than zero"),
                    Some(Err(e)) => self.at(vspan, format!("`rate_limit.per`: {e}")),
                    None => self.at(
                        vspan,
                        "`rate_limit.per` must be a duration string such as \"1s\"",
                    ),
                },
                other => {
                    let kspan = table.key(other).and_then(|k| k.span()).or(vspan);
                    self.at(
                        kspan,
                        format!(
                            "unknown field `{other}` in rate_limit (expected requests, per, burst)"
                        ),
                    );
                }
            }
            invalid |= self.diags.len() != before;
        }
        let (Some(requests), Some(per)) = (requests, per) else {
            if !invalid {
                self.at(span, "`rate_limit` needs both `requests` and `per`");
            }
            return None;
        };
        if invalid {
            return None;
        }
        let burst = burst.unwrap_or(requests);
        Some(RateLimitSpec {
            requests,
            per,
            burst,
        })
    }

    fn cross_checks(&mut self, keys: &[KeySpec]) {
        self.diags.extend(too_many_keys(keys, MAX_KEYS));
        let names = std::mem::take(&mut self.names);
        let mut ids: ahash::AHashMap<&str, usize> = ahash::AHashMap::new();
        // Keyed by what a ring keeps of a digest (see `DigestPrefix`).
        let mut digests: ahash::AHashMap<crate::ring::DigestPrefix, (&Named, &Digest)> =
            ahash::AHashMap::new();
        let mut found = Vec::new();
        // A key whose id could not be read is named by its line.
        let name = |k: &Named| match &k.id {
            Some(id) => format!("key {id:?}"),
            None => format!("the key on line {}", k.line),
        };
        for k in &names {
            // The line of an id's first key is kept: a third key with it
            // names the first too.
            if let Some(id) = &k.id {
                match ids.entry(id) {
                    std::collections::hash_map::Entry::Vacant(e) => {
                        e.insert(k.line);
                    }
                    std::collections::hash_map::Entry::Occupied(first) => {
                        found.push(Diagnostic {
                            line: k.line,
                            column: 1,
                            message: format!(
                                "duplicate id {id:?} (first defined on line {})",
                                first.get()
                            ),
                        });
                    }
                }
            }
            let Some(digest) = &k.digest else { continue };
            // Each key is compared with the first key of its prefix, so a
            // repeated digest is named as such even after a near miss.
            let prefix = crate::ring::digest_prefix(digest);
            let (first, first_digest) = *digests.entry(prefix).or_insert((k, digest));
            if !std::ptr::eq(first, k) {
                let (this, other) = (name(k), name(first));
                let message = if first_digest == digest {
                    format!("{this} has the same sha256 as {other}: digests must be unique")
                } else {
                    format!(
                        "{this} has a sha256 whose first 32 hex digits are those of {other}'s: \
                         keys are told apart by them, so they must be unique \
                         (two real SHA-256 digests never share them)"
                    )
                };
                found.push(Diagnostic {
                    line: k.line,
                    column: 1,
                    message,
                });
            }
        }
        self.diags.extend(found);
    }
}

/// The complaint about a file with more than `max` keys, at the first key
/// past the limit.
fn too_many_keys(keys: &[KeySpec], max: usize) -> Option<Diagnostic> {
    keys.get(max).map(|k| Diagnostic {
        line: k.line,
        column: 1,
        message: format!(
            "more than {max} keys in one file (split the clients across several keyward instances)"
        ),
    })
}

/// Whether `s` is a valid scope name.
pub fn is_scope(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// Decodes 64 hex digits (either case) into a digest.
pub fn decode_digest(hex: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex.trim(), &mut out).ok()?;
    Some(out)
}

fn suggest<'a>(name: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(name, c), *c))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A FIFO at `dir/name`, made with `mkfifo`.
    pub(crate) fn fifo(dir: &Path, name: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        let made = std::process::Command::new("mkfifo")
            .arg(&path)
            .status()
            .expect("run mkfifo");
        assert!(made.success());
        path
    }

    /// What `f` returns, or a panic if it takes more than ten seconds (it
    /// would have blocked).
    pub(crate) fn promptly<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(10))
            .expect("returned instead of blocking")
    }

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = fifo(dir.path(), "keys.toml");
        let err = promptly(move || read(&path)).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[test]
    fn paced_passes_agree_with_the_one_shot_ones() {
        // Several chunks, with a character of each width cut by every
        // chunk boundary in turn.
        for width in ["é", "€", "𝄞"] {
            for shift in 0..4 {
                let mut text = "x".repeat(PACED_CHUNK - shift);
                while text.len() < 3 * PACED_CHUNK + 7 {
                    text.push_str(width);
                }
                let bytes = text.as_bytes();
                assert_eq!(paced_utf8(bytes), Ok(text.as_str()));
                assert_eq!(file_digest(bytes), crate::decide::digest_bytes(bytes));
                assert_eq!(
                    fingerprint(bytes),
                    Fingerprint {
                        len: bytes.len() as u64,
                        crc: crc32fast::hash(bytes),
                    }
                );
            }
        }
        // Invalid bytes anywhere (inside a chunk, across a boundary, a
        // character cut short at the very end) give std's error.
        let base = "é".repeat(PACED_CHUNK);
        for at in [
            0,
            5,
            PACED_CHUNK - 1,
            PACED_CHUNK,
            PACED_CHUNK + 1,
            base.len() - 1,
        ] {
            let mut bytes = base.clone().into_bytes();
            bytes[at] = 0xff;
            assert_eq!(paced_utf8(&bytes), std::str::from_utf8(&bytes), "at {at}");
        }
        let mut cut = base.into_bytes();
        cut.pop();
        assert_eq!(paced_utf8(&cut), std::str::from_utf8(&cut));
        assert!(paced_utf8(&cut).is_err());
        assert_eq!(paced_utf8(b""), Ok(""));
    }

    const D1: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    const D2: &str = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752";

    fn errors(text: &str) -> Vec<String> {
        match parse_str(text, ParseOptions::default()) {
            Ok(_) => vec![],
            Err(d) => d
                .into_iter()
                .map(|d| format!("{}:{}: {}", d.line, d.column, d.message))
                .collect(),
        }
    }

    #[test]
    fn parses_a_complete_key() {
        let text = format!(
            r#"# comment
[[keys]]
id = "acme-2026-11"
client = "acme"
sha256 = "{}"
scopes = ["read", "trade", "read"]
state = "deprecated"
not_before = 2026-11-27T00:00:00Z
expires_at = "2027-02-27T00:00:00+01:00"
deprecated_at = 2026-11-28T00:00:00Z
description = "free text"
rate_limit = {{ requests = 100, per = "1s", burst = 200 }}
"#,
            D1.to_uppercase()
        );
        let file = parse_str(&text, ParseOptions::default()).unwrap();
        let k = &file.keys[0];
        assert_eq!(k.id, "acme-2026-11");
        assert_eq!(k.client, "acme");
        assert_eq!(hex::encode(k.digest), D1);
        assert_eq!(k.scopes, vec!["read", "trade"]);
        assert_eq!(k.state, KeyState::Deprecated);
        assert_eq!(k.not_before.unwrap().to_string(), "2026-11-27T00:00:00Z");
        assert_eq!(k.expires_at.unwrap().to_string(), "2027-02-26T23:00:00Z");
        assert_eq!(k.deprecated_at.unwrap().to_string(), "2026-11-28T00:00:00Z");
        assert_eq!(k.description.as_deref(), Some("free text"));
        assert_eq!(
            k.rate_limit,
            Some(RateLimitSpec {
                requests: 100,
                per: Duration::from_secs(1),
                burst: 200
            })
        );
        assert_eq!(k.line, 2);
    }

    #[test]
    fn defaults_are_active_without_scopes() {
        let text = format!("[[keys]]\nid = \"a\"\nclient = \"c\"\nsha256 = \"{D1}\"\n");
        let k = &parse_str(&text, ParseOptions::default()).unwrap().keys[0];
        assert_eq!(k.state, KeyState::Active);
        assert!(k.scopes.is_empty());
        assert!(k.expires_at.is_none() && k.not_before.is_none() && k.rate_limit.is_none());
    }

    #[test]
    fn unknown_field_is_an_error_with_a_suggestion() {
        let text = format!(
            "[[keys]]\nid = \"a\"\nclient = \"c\"\nsha256 = \"{D1}\"\nexpire_at = 2027-01-01T00:00:00Z\n"
        );
        assert_eq!(
            errors(&text),
            vec!["5:1: unknown field `expire_at` in [[keys]] (did you mean `expires_at`?)"]
        );
    }

    #[test]
    fn unknown_top_level_field_is_an_error() {
        let text = format!("kyes = 1\n[[keys]]\nid = \"a\"\nclient = \"c\"\nsha256 = \"{D1}\"\n");
        assert_eq!(
            errors(&text),
            vec!["1:1: unknown top-level field `kyes` (expected [[keys]] or [[routes]])"]
        );
    }

    #[test]
    fn invalid_toml_reports_position() {
        let e = errors("[[keys]]\nid = \"a\nclient = \"c\"\n");
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("2:"), "{e:?}");
        assert!(e[0].contains("invalid TOML"), "{e:?}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = format!(
            r#"[[keys]]
client = "c"
sha256 = "abc"

[[keys]]
id = "bad id!"
client = "c"
sha256 = "{D1}"
state = "retired"
not_before = 2027-01-01T00:00:00Z
expires_at = 2026-01-01T00:00:00Z
scopes = ["ok", "has space", 3]
rate_limit = {{ requests = 0, per = "1 fortnight" }}

[[keys]]
id = "dup"
client = "c"
sha256 = "{D1}"
[[keys]]
id = "dup"
client = "c"
sha256 = "{D2}"
[[keys]]
id = "x"
client = 7
sha256 = "{D2}"
deprecated_at = 2026-01-01
"#
        );
        let e = errors(&text);
        let expected = [
            "1:1: missing required field `id` in [[keys]]",
            "3:10: `sha256` must be 64 hexadecimal digits",
            "6:6: invalid id \"bad id!\"",
            "9:9: unknown state \"retired\"",
            "11:14: `expires_at` (2026-01-01T00:00:00Z) must be after `not_before` (2027-01-01T00:00:00Z)",
            "12:17: invalid scope \"has space\"",
            "12:30: each scope must be a string",
            "13:27: `rate_limit.requests` must be a positive integer",
            "13:36: `rate_limit.per`: duration \"1 fortnight\"",
            // Keys with other problems are compared too.
            "15:1: key \"dup\" has the same sha256 as key \"bad id!\"",
            "19:1: duplicate id \"dup\" (first defined on line 15)",
            "23:1: key \"x\" has the same sha256 as key \"dup\"",
            "25:10: `client` must be a string",
            "27:17: `deprecated_at` must be a full date-time",
        ];
        for (want, got) in expected.iter().zip(&e) {
            assert!(
                got.starts_with(want),
                "want {want:?}\n got {got:?}\nall: {e:#?}"
            );
        }
        assert_eq!(e.len(), expected.len(), "{e:#?}");
    }

    #[test]
    fn large_files_are_read_in_halves_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let len = PARALLEL_READ_MIN_BYTES as usize + 3;
        let content: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &content).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        assert!(read_halves(&file, len as u64) == Some(content.clone()));
        // A length that no longer matches the file is declined, whichever
        // way it is off; `read` then reads it whole.
        assert!(read_halves(&file, len as u64 - 1).is_none());
        assert!(read_halves(&file, len as u64 + 1).is_none());
        assert!(read_halves(&file, 1000).is_none());
        assert!(read(&path).unwrap() == content);
        // On one thread's budget it is read the plain way, to the same bytes.
        assert!(read_on(&path, Threads::new(1)).unwrap() == content);
    }

    #[test]
    fn thread_budgets_share_out_the_steps_of_a_load() {
        let one = Threads::new(1);
        assert_eq!(Threads::new(0), one);
        assert_eq!(
            (one.parse(), one.hash_beside_parse(), one.two()),
            (1, false, false)
        );
        let two = Threads::new(2);
        assert_eq!(
            (two.parse(), two.hash_beside_parse(), two.two()),
            (2, false, true)
        );
        // A third thread hashes beside the two that parse.
        let three = Threads::new(3);
        assert_eq!((three.parse(), three.hash_beside_parse()), (2, true));
        assert_eq!(Threads::new(16).parse(), fast::PARSE_THREADS);
        let (all, spare) = (Threads::all().get(), Threads::spare_one().get());
        assert!(spare >= 1 && spare <= all && (all == 1 || spare == all - 1));
    }

    #[test]
    fn a_large_file_parses_alike_on_any_thread_budget() {
        let text = crate::bench_support::synthetic_key_file(40_000);
        assert!(text.len() > 4 << 20, "large enough to be split");
        let on = |n| {
            let opts = ParseOptions {
                threads: Threads::new(n),
                ..ParseOptions::default()
            };
            parse_str_for_ring(&text, opts).unwrap().into_key_file()
        };
        let one = on(1);
        assert_eq!(one.keys.len(), 40_000);
        assert!(on(2) == one);
    }

    #[test]
    fn files_are_read_exactly_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        for len in [
            0,
            1,
            READ_CHUNK - 1,
            READ_CHUNK,
            READ_CHUNK + 1,
            3 * READ_CHUNK + 7,
        ] {
            let content: Vec<u8> = (0..len).map(|i| (i % 253) as u8).collect();
            std::fs::write(&path, &content).unwrap();
            assert!(read(&path).unwrap() == content, "{len} bytes");
        }
        // A file longer than its metadata says (here: size 0) is read to
        // its end all the same.
        #[cfg(target_os = "linux")]
        {
            let status = read(Path::new("/proc/self/status")).unwrap();
            assert!(String::from_utf8_lossy(&status).contains("VmRSS:"));
        }
    }

    /// `bytes` as room for a read: initialised, typed as if it were not.
    fn as_room(bytes: &[u8]) -> Vec<std::mem::MaybeUninit<u8>> {
        bytes
            .iter()
            .map(|&b| std::mem::MaybeUninit::new(b))
            .collect()
    }

    /// The bytes of `room`, every one of which must be initialised.
    #[cfg_attr(not(unix), allow(dead_code))]
    fn contents(room: &[std::mem::MaybeUninit<u8>]) -> Vec<u8> {
        // SAFETY: callers pass only rooms made by `as_room` or read into in
        // full, and neither populating nor faulting in de-initialises bytes.
        room.iter().map(|b| unsafe { b.assume_init() }).collect()
    }

    #[test]
    fn faulting_in_covers_any_slice_and_populating_keeps_contents() {
        let page = crate::pages::page_size();
        assert!(page.is_power_of_two() && page >= 4096, "{page}");
        // Fresh pages, as a large zeroed vector gets them from the kernel.
        let mut fresh = vec![0u8; 64 * page];
        let len = fresh.len();
        // SAFETY: `MaybeUninit<u8>` has the layout of `u8`, and neither
        // populating nor faulting in writes an uninitialised byte, so the
        // bytes stay initialised for the checks below.
        let room = unsafe {
            &mut *(fresh.as_mut_slice() as *mut [u8] as *mut [std::mem::MaybeUninit<u8>])
        };
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if populate(&mut room[1..len - 1]) {
            assert!(fresh.iter().all(|&b| b == 0), "populating changed bytes");
        }
        // SAFETY: as above.
        let room = unsafe {
            &mut *(fresh.as_mut_slice() as *mut [u8] as *mut [std::mem::MaybeUninit<u8>])
        };
        fault_in(room);
        // Pages already written to.
        let before: Vec<u8> = (0..5 * page + 123).map(|i| (i % 251) as u8).collect();
        // Slices starting and ending mid-page, inside one page, and empty.
        for (from, to) in [(3, 5 * page + 100), (7, 9), (page, page), (0, before.len())] {
            let mut buf = as_room(&before);
            #[cfg(any(target_os = "linux", target_os = "android"))]
            if populate(&mut buf[from..to]) {
                assert!(
                    contents(&buf) == before,
                    "populating {from}..{to} changed bytes"
                );
            }
            fault_in(&mut buf[from..to]);
        }
        // Whatever way the pages were faulted in, reading into them works,
        // and a file shorter than the room is an error.
        #[cfg(unix)]
        {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("keys.toml");
            std::fs::write(&path, &before).unwrap();
            let file = std::fs::File::open(&path).unwrap();
            let mut room = as_room(&vec![7u8; before.len()]);
            fault_in(&mut room);
            read_exact_at_chunked(&file, &mut room, 0).unwrap();
            assert!(contents(&room) == before);
            let mut fresh: Vec<u8> = Vec::with_capacity(before.len());
            let room = &mut fresh.spare_capacity_mut()[..before.len()];
            read_exact_at_chunked(&file, room, 0).unwrap();
            assert!(contents(room) == before);
            let mut longer = as_room(&vec![0u8; before.len() + 1]);
            let err = read_exact_at_chunked(&file, &mut longer, 0).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
            // Reads from an offset, and past the end.
            let mut tail = as_room(&[0u8; 100]);
            assert_eq!(
                read_at_uninit(&file, &mut tail, (before.len() - 40) as u64).unwrap(),
                40
            );
            assert!(contents(&tail[..40]) == before[before.len() - 40..]);
            assert_eq!(
                read_at_uninit(&file, &mut tail, before.len() as u64).unwrap(),
                0
            );
            assert_eq!(
                read_at_uninit(&file, &mut tail, u64::MAX)
                    .unwrap_err()
                    .kind(),
                std::io::ErrorKind::InvalidInput
            );
        }
    }

    #[test]
    fn files_past_the_key_limit_are_refused_at_the_first_key_too_many() {
        let text = (0..3)
            .map(|i| {
                let digest = hex::encode(crate::decide::digest(&format!("secret-{i}")));
                format!("[[keys]]\nid = \"k{i}\"\nclient = \"c\"\nsha256 = \"{digest}\"\n")
            })
            .collect::<String>();
        let file = parse_str_full(&text, ParseOptions::default()).unwrap();
        assert_eq!(too_many_keys(&file.keys, 3), None);
        let d = too_many_keys(&file.keys, 2).expect("over the limit");
        assert_eq!((d.line, d.column), (file.keys[2].line, 1));
        assert!(d.message.starts_with("more than 2 keys"), "{}", d.message);
    }

    #[test]
    fn every_repeat_of_an_id_names_its_first_line() {
        let key = |i: usize| {
            let digest = hex::encode(crate::decide::digest(&format!("secret-{i}")));
            format!("[[keys]]\nid = \"a\"\nclient = \"c\"\nsha256 = \"{digest}\"\n")
        };
        let text: String = (0..3).map(key).collect();
        assert_eq!(
            errors(&text),
            vec![
                "5:1: duplicate id \"a\" (first defined on line 1)",
                "9:1: duplicate id \"a\" (first defined on line 1)",
            ]
        );
    }

    #[test]
    fn keys_with_other_problems_are_still_compared() {
        let text = format!(
            "[[keys]]\nid = \"a\"\nclient = \"c\"\nsha256 = \"{D1}\"\n\
             [[keys]]\nid = \"a\"\nclient = \"c\"\nsha256 = \"{D1}\"\nstate = \"bogus\"\n\
             [[keys]]\nclient = \"c\"\nsha256 = \"{D1}\"\n"
        );
        assert_eq!(
            errors(&text),
            vec![
                "5:1: duplicate id \"a\" (first defined on line 1)",
                "5:1: key \"a\" has the same sha256 as key \"a\": digests must be unique",
                "9:9: unknown state \"bogus\" (expected active, deprecated or revoked)",
                "10:1: missing required field `id` in [[keys]]",
                "10:1: the key on line 10 has the same sha256 as key \"a\": digests must be unique",
            ]
        );
    }

    #[test]
    fn duplicate_digests_are_refused() {
        let text = format!(
            "[[keys]]\nid = \"a\"\nclient = \"c\"\nsha256 = \"{D1}\"\n[[keys]]\nid = \"b\"\nclient = \"c\"\nsha256 = \"{}\"\n",
            D1.to_uppercase()
        );
        assert_eq!(
            errors(&text),
            vec!["5:1: key \"b\" has the same sha256 as key \"a\": digests must be unique"]
        );
        // Digests that differ only past their first 128 bits are one key to
        // a ring, so they are refused too; one bit earlier, they are not.
        let with = |d2: &str| {
            format!(
                "[[keys]]\nid = \"a\"\nclient = \"c\"\nsha256 = \"{D1}\"\n[[keys]]\nid = \"b\"\nclient = \"c\"\nsha256 = \"{d2}\"\n"
            )
        };
        let late = format!("{}{}", &D1[..32], "0".repeat(32));
        let e = errors(&with(&late));
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with(
                "5:1: key \"b\" has a sha256 whose first 32 hex digits are those of key \"a\"'s"
            ),
            "{e:?}"
        );
        // A key repeating the first digest after a near miss is named as a
        // repeat of the first key.
        let third = format!(
            "{}[[keys]]\nid = \"c\"\nclient = \"c\"\nsha256 = \"{D1}\"\n",
            with(&late)
        );
        let e = errors(&third);
        assert_eq!(e.len(), 2, "{e:?}");
        assert_eq!(
            e[1],
            "9:1: key \"c\" has the same sha256 as key \"a\": digests must be unique"
        );
        let early = format!(
            "{}{}{}",
            &D1[..31],
            if &D1[31..32] == "0" { "1" } else { "0" },
            &D1[32..]
        );
        assert!(parse_str(&with(&early), ParseOptions::default()).is_ok());
    }

    #[test]
    fn empty_file_is_refused_unless_allowed() {
        for text in ["", "# nothing\n", "keys = []\n"] {
            let e = errors(text);
            assert_eq!(e.len(), 1, "{text:?}");
            assert!(e[0].contains("--allow-empty"));
            let ok = parse_str(
                text,
                ParseOptions {
                    allow_empty: true,
                    ..ParseOptions::default()
                },
            )
            .unwrap();
            assert!(ok.keys.is_empty());
        }
    }

    #[test]
    fn route_rules_are_validated() {
        let text = format!(
            r#"[[keys]]
id = "a"
client = "c"
sha256 = "{D1}"

[[routes]]
path_prefix = "/trade"
methods = ["POST"]
required_scopes = ["trade"]

[[routes]]
path_prefix = "trade"
methods = ["post"]
required_scopes = ["a b"]
scope = "x"

[[routes]]
path_prefix = "/x"
"#
        );
        let e = errors(&text);
        let expected = [
            "12:15: `path_prefix` must be a string starting with /",
            "13:12: invalid method",
            "14:20: invalid scope in `required_scopes`",
            "15:1: unknown field `scope` in [[routes]]",
            "17:1: missing required field `required_scopes` in [[routes]]",
        ];
        assert_eq!(e.len(), expected.len(), "{e:#?}");
        for (want, got) in expected.iter().zip(&e) {
            assert!(got.starts_with(want), "want {want:?}\n got {got:?}");
        }
        let ok = text
            .split("[[routes]]\npath_prefix = \"trade\"")
            .next()
            .unwrap();
        let file = parse_str(ok, ParseOptions::default()).unwrap();
        assert_eq!(
            file.routes,
            vec![RouteSpec {
                path_prefix: "/trade".into(),
                methods: vec!["POST".into()],
                required_scopes: vec!["trade".into()],
                line: 6,
            }]
        );
    }

    #[test]
    fn keys_must_be_tables() {
        assert_eq!(
            errors("keys = \"x\"\n"),
            vec!["1:1: `keys` must be an array of tables, written as [[keys]] sections"]
        );
    }

    #[test]
    fn offsetless_times_are_refused() {
        let text = format!(
            "[[keys]]\nid = \"a\"\nclient = \"c\"\nsha256 = \"{D1}\"\nexpires_at = \"2027-01-01T00:00:00\"\n"
        );
        let e = errors(&text);
        assert!(
            e[0].starts_with("5:14: `expires_at`: invalid time"),
            "{e:?}"
        );
    }

    #[test]
    fn non_utf8_is_reported() {
        let err = parse_bytes(
            Path::new("k.toml"),
            b"[[keys]]\nid = \"\xff\"\n",
            ParseOptions::default(),
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "k.toml:2:7: key file is not valid UTF-8");
    }

    #[test]
    fn error_display_is_file_line_column() {
        let err = parse_bytes(
            Path::new("keys.toml"),
            b"[[keys]]\nid = 1\n",
            ParseOptions::default(),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("keys.toml:1:1: missing required field `client`"),
            "{text}"
        );
        assert!(
            text.contains("keys.toml:2:6: `id` must be a string"),
            "{text}"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86400)
        );
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("5y").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
    }

    #[test]
    fn positions_count_characters() {
        assert_eq!(position("ab\ncé d", 7), (2, 4));
        assert_eq!(position("", 0), (1, 1));
        for text in ["ab\ncé d", "", "\n\nx", "é\n"] {
            let v = Validator {
                text,
                diags: Vec::new(),
                line_starts: std::iter::once(0)
                    .chain(text.match_indices('\n').map(|(i, _)| i + 1))
                    .collect(),
                names: Vec::new(),
            };
            for at in 0..=text.len() + 1 {
                assert_eq!(v.pos(at), position(text, at), "{text:?} at {at}");
            }
        }
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any text is either a valid key file or a list of diagnostics
        /// pointing inside it; never a panic.
        #[test]
        fn parsing_never_panics(text in any::<String>()) {
            if let Err(diags) = parse_str(&text, ParseOptions::default()) {
                prop_assert!(!diags.is_empty());
                let lines = text.split('\n').count();
                for d in diags {
                    prop_assert!(d.line >= 1 && d.line <= lines.max(1), "{:?} in {} lines", d, lines);
                    prop_assert!(d.column >= 1);
                }
            }
        }

        /// TOML-shaped noise exercises the validator, not just the TOML parser.
        #[test]
        fn key_tables_with_arbitrary_values_never_panic(
            fields in proptest::collection::vec(
                (prop_oneof![
                    Just("id"), Just("client"), Just("sha256"), Just("scopes"), Just("state"),
                    Just("not_before"), Just("expires_at"), Just("rate_limit"), Just("bogus")
                ],
                prop_oneof![
                    Just("\"x\"".to_owned()), Just("1".to_owned()), Just("[]".to_owned()),
                    Just("[1, \"a\"]".to_owned()), Just("2026-01-01T00:00:00Z".to_owned()),
                    Just("{ requests = 0, per = \"0s\" }".to_owned()),
                    Just("{ requests = 5, per = \"1s\", burst = 9223372036854775807 }".to_owned()),
                    "\"[a-f0-9]{0,70}\"",
                ]),
                0..12,
            )
        ) {
            let mut text = String::from("[[keys]]\n");
            let mut seen = std::collections::HashSet::new();
            for (k, v) in fields {
                if seen.insert(k) {
                    text.push_str(&format!("{k} = {v}\n"));
                }
            }
            let _ = parse_str(&text, ParseOptions::default());
        }
    }
}
