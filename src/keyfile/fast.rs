//! A fast path for key files written in the common subset of TOML.
//!
//! The full validator ([`super::parse_str_full`]) builds a span-preserving
//! TOML document first, which costs seconds and gigabytes for a million keys.
//! This parser reads the text once into a [`FastFile`]: one compact record
//! per key whose strings are ranges of the text (unescaped copies only for
//! strings written with escapes), with scope sets interned as they are read.
//! The ring is built straight from it; [`FastFile::to_key_file`] gives the
//! [`KeyFile`] the full validator would.
//!
//! The contract is one-sided: [`parse_fast`] returns `Some` only for a file
//! that lies entirely inside the subset below *and* that the full validator
//! accepts, with an equal [`KeyFile`] (through [`FastFile::to_key_file`]).
//! Anything else (an error, a construct outside the subset, a case it does
//! not want to reason about) gives `None`, and the caller runs the full
//! validator, which produces the diagnostics. So declining is always safe;
//! accepting must be exact.
//!
//! The subset:
//!
//! - `[[keys]]` and `[[routes]]` headers (spaces or tabs allowed inside the
//!   brackets), and before the first header only `keys = []` / `routes = []`;
//! - `name = value` lines with bare names, spaces and tabs around `=`;
//! - basic strings `"…"` with the TOML 1.0 escapes (`\b \t \n \f \r \" \\
//!   \uXXXX \UXXXXXXXX`) and literal strings `'…'`; no multi-line strings;
//! - arrays of strings, which may span lines and hold comments, with an
//!   optional trailing comma;
//! - `rate_limit` as a one-line inline table of `requests`, `per` and
//!   `burst`, with plain decimal integers (no sign, underscores or leading
//!   zeros);
//! - offset date-times written `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`
//!   (upper-case `T` and `Z`, 1 to 9 fraction digits, seconds up to 59), or
//!   any string, as the full validator reads them;
//! - comments, blank lines, LF or CRLF line ends.
//!
//! Large files are split at `[[keys]]` headers and the parts parsed on
//! separate threads, each writing its keys straight into its share of the
//! result. Each part records a hash of every id and digest; the hashes,
//! sorted, show duplicates over the whole file without a hash table or a
//! second pass over the keys.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::mem::MaybeUninit;

use jiff::Timestamp;

use super::{
    KeyFile, KeySource, KeySpec, KeyState, KeyView, MAX_ID_LEN, ParseOptions, RateLimitSpec,
    RouteSpec, decode_digest, is_scope, parse_duration, parse_time,
};
use crate::ring::{Digest, DigestPrefix, digest_prefix};

/// Files smaller than this are parsed on one thread.
const PARALLEL_MIN_BYTES: usize = 4 << 20;

/// Most threads used for one file.
const MAX_THREADS: usize = 8;

/// Most threads a large file is parsed on.
pub const PARSE_THREADS: usize = 2;

/// Parses a key file in the common subset of TOML, or returns `None` when the
/// file is outside that subset or invalid (see the module documentation).
/// Large files are parsed on up to two threads, as `opts.threads` allows
/// (more only if asked through [`parse_fast_threads`]).
pub fn parse_fast(text: &str, opts: ParseOptions) -> Option<KeyFile> {
    parse_fast_compact(text, opts).map(|f| f.to_key_file())
}

/// [`parse_fast`], keeping the file in its compact form for the ring build.
pub fn parse_fast_compact(text: &str, opts: ParseOptions) -> Option<FastFile<'_>> {
    let threads = if text.len() >= PARALLEL_MIN_BYTES {
        opts.threads.parse()
    } else {
        1
    };
    parse_fast_compact_threads(text, opts, threads)
}

/// [`parse_fast`] on a given number of threads (at most 8; 0 counts as 1):
/// the text is split at `[[keys]]` headers into that many parts, parsed side
/// by side. For benchmarks and tests; the result does not depend on it.
pub fn parse_fast_threads(text: &str, opts: ParseOptions, threads: usize) -> Option<KeyFile> {
    parse_fast_compact_threads(text, opts, threads).map(|f| f.to_key_file())
}

/// [`parse_fast_compact`] on a given number of threads (see
/// [`parse_fast_threads`]).
pub fn parse_fast_compact_threads(
    text: &str,
    opts: ParseOptions,
    threads: usize,
) -> Option<FastFile<'_>> {
    // Spans are 32-bit offsets into the text and, past its end, into the
    // unescaped strings (which are shorter than their escaped forms).
    if text.len() > MAX_TEXT {
        return None;
    }
    let bounds = split_points(text.as_bytes(), threads.clamp(1, MAX_THREADS));
    let mut texts = Vec::with_capacity(bounds.len() + 1);
    let mut start = 0;
    for &end in bounds.iter().chain(std::iter::once(&text.len())) {
        texts.push((text.get(start..end)?, start));
        start = end;
    }
    let single = || {
        let keys = Vec::with_capacity(key_capacity(text.len()));
        let part = parse_part(text, 0, text.len(), keys, 1, 0)?;
        let file = FastFile {
            text,
            arena: part.arena,
            keys: part.keys,
            scope_sets: part.scopes.sets,
            routes: part.routes,
        };
        Some((file, part.id_tags, part.digest_tags))
    };
    let (file, id_tags, digest_tags) = if texts.len() == 1 {
        single()?
    } else {
        match parse_parts(text, &texts) {
            Ok(parsed) => parsed?,
            // No threads to be had: parse on this one.
            Err(NoThreads) => single()?,
        }
    };
    if (file.keys.is_empty() && !opts.allow_empty) || file.keys.len() > super::MAX_KEYS {
        return None;
    }
    let unique = no_duplicates(&id_tags, |a, b| file.id(a).cmp(file.id(b)))
        && no_duplicates(&digest_tags, |a, b| {
            // What a ring keeps of a digest must be unique (see `DigestPrefix`).
            file.keys[a].digest.cmp(&file.keys[b].digest)
        });
    unique.then_some(file)
}

/// Longest text the fast path takes (files are at most 512 MiB anyway).
const MAX_TEXT: usize = (u32::MAX / 2) as usize;

/// Fewer bytes than the shortest key a file can hold: its header or
/// braces, `id`, `client` and the 64 digits of `sha256`.
const MIN_KEY_BYTES: usize = 80;

/// Room for every key `text_len` bytes could hold: the records are
/// reserved once, never grown (a million keys would be copied or moved six
/// times), and come out the same size for the same file, so a reload can
/// reuse the block the previous reload freed (see `pages::keep_freed`).
/// What a file with longer keys leaves unused is address space, never
/// touched.
fn key_capacity(text_len: usize) -> usize {
    (text_len / MIN_KEY_BYTES).min(super::MAX_KEYS)
}

/// A key file as the fast path reads it: compact records, their strings
/// left in the text. Build a ring from it ([`KeySource`]) or expand it into
/// the [`KeyFile`] the full validator gives.
pub struct FastFile<'t> {
    text: &'t str,
    /// Strings that were written with escapes, unescaped; spans past the
    /// text's end point here.
    arena: String,
    keys: Vec<FastKey>,
    /// Scope sets, deduplicated within each key; a key holds an index.
    scope_sets: Vec<Vec<String>>,
    routes: Vec<RouteSpec>,
}

/// A string of a [`FastFile`]: a range of the text, or one of the arena
/// when `start` is at or past the text's end.
#[derive(Debug, Clone, Copy, Default)]
struct Span {
    start: u32,
    len: u32,
}

/// One key of a [`FastFile`].
#[derive(Debug)]
struct FastKey {
    /// What the ring keeps of the digest; the whole one is read again from
    /// the text at `digest_at` when asked for ([`FastFile::to_key_file`]).
    digest: DigestPrefix,
    id: Span,
    client: Span,
    /// Index into `scope_sets`.
    scopes: u32,
    /// 1-based line of the key's header.
    line: u32,
    /// Where the digest's value starts in the file text.
    digest_at: u32,
    state: KeyState,
    /// The expiry in whole seconds since the epoch ([`NO_EXPIRY`]: none, or
    /// one with a fraction of a second, kept in `extra`): 8 bytes where an
    /// `Option<Timestamp>` takes 24, times a million keys.
    expires_at: i64,
    /// The fields few keys have, for the keys that have any.
    extra: Option<Box<Extra>>,
}

/// [`FastKey::expires_at`] of a key without a whole-second expiry.
const NO_EXPIRY: i64 = i64::MIN;

/// The fields few keys have.
#[derive(Debug, Default)]
struct Extra {
    not_before: Option<Timestamp>,
    /// An expiry with a fraction of a second.
    expires_at: Option<Timestamp>,
    deprecated_at: Option<Timestamp>,
    description: Option<Span>,
    rate_limit: Option<RateLimitSpec>,
}

impl Extra {
    fn is_empty(&self) -> bool {
        self.not_before.is_none()
            && self.expires_at.is_none()
            && self.deprecated_at.is_none()
            && self.description.is_none()
            && self.rate_limit.is_none()
    }
}

impl FastKey {
    fn blank(line: u32) -> FastKey {
        FastKey {
            digest: [0; 16],
            id: Span::default(),
            client: Span::default(),
            scopes: 0,
            line,
            digest_at: 0,
            state: KeyState::Active,
            expires_at: NO_EXPIRY,
            extra: None,
        }
    }

    /// The key's expiry, if it has one (`extra` is the key's or its draft's).
    #[inline]
    fn expires_at(&self, extra: Option<&Extra>) -> Option<Timestamp> {
        if self.expires_at != NO_EXPIRY {
            // Made from a timestamp's seconds, so in range.
            return Timestamp::from_second(self.expires_at).ok();
        }
        extra.and_then(|e| e.expires_at)
    }
}

impl std::fmt::Debug for FastFile<'_> {
    /// The counts, not the text (which can be hundreds of megabytes).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastFile")
            .field("text_bytes", &self.text.len())
            .field("keys", &self.keys.len())
            .field("scope_sets", &self.scope_sets.len())
            .field("routes", &self.routes)
            .finish_non_exhaustive()
    }
}

impl FastFile<'_> {
    #[inline]
    fn str(&self, span: Span) -> &str {
        let (start, len) = (span.start as usize, span.len as usize);
        let s = match start.checked_sub(self.text.len()) {
            None => self.text.get(start..start + len),
            Some(at) => self.arena.get(at..at + len),
        };
        // Every span was cut from one of the two at character boundaries.
        debug_assert!(s.is_some(), "span {span:?} outside the text and arena");
        s.unwrap_or_default()
    }

    #[inline]
    fn id(&self, index: usize) -> &str {
        self.str(self.keys[index].id)
    }

    /// The whole digest of key `index`, read again from the text (the parse
    /// kept only the part a ring needs).
    fn digest(&self, index: usize) -> Digest {
        let mut p = Parser::new(self.text, 0, self.text.len(), 0);
        p.i = self.keys[index].digest_at as usize;
        let digest = p.digest();
        // The parse read it from there before.
        debug_assert!(digest.is_some(), "no digest where key {index}'s was");
        digest.unwrap_or_default()
    }

    /// The file as the full validator gives it: every key as the ring
    /// build sees it ([`KeySource::key`]), owned.
    pub fn to_key_file(&self) -> KeyFile {
        let keys = (0..self.keys.len())
            .map(|i| {
                let k = self.key(i);
                KeySpec {
                    id: k.id.to_owned(),
                    client: k.client.to_owned(),
                    digest: self.digest(i),
                    scopes: k.scopes.to_vec(),
                    state: k.state,
                    not_before: k.not_before,
                    expires_at: k.expires_at,
                    deprecated_at: k.deprecated_at,
                    description: k.description.map(str::to_owned),
                    rate_limit: k.rate_limit,
                    line: self.keys[i].line as usize,
                }
            })
            .collect();
        KeyFile {
            keys,
            routes: self.routes.clone(),
        }
    }
}

impl KeySource for FastFile<'_> {
    fn key_count(&self) -> usize {
        self.keys.len()
    }

    #[inline]
    fn key(&self, index: usize) -> KeyView<'_> {
        let k = &self.keys[index];
        let extra = k.extra.as_deref();
        KeyView {
            id: self.str(k.id),
            client: self.str(k.client),
            digest_prefix: k.digest,
            scopes: &self.scope_sets[k.scopes as usize],
            scope_set: Some(k.scopes),
            state: k.state,
            not_before: extra.and_then(|e| e.not_before),
            expires_at: k.expires_at(extra),
            deprecated_at: extra.and_then(|e| e.deprecated_at),
            description: extra.and_then(|e| e.description).map(|d| self.str(d)),
            rate_limit: extra.and_then(|e| e.rate_limit),
        }
    }

    #[inline]
    fn key_id(&self, index: usize) -> &str {
        self.id(index)
    }

    #[inline]
    fn key_client(&self, index: usize) -> &str {
        self.str(self.keys[index].client)
    }

    fn route_specs(&self) -> &[RouteSpec] {
        &self.routes
    }
}

/// A part's scope sets, interned as keys are read: keys mostly repeat a
/// few sets, so a key costs an index rather than a vector of strings.
struct ScopeSets {
    /// The sets; the first is the empty set (keys without `scopes`).
    sets: Vec<Vec<String>>,
    /// Hash of a set's scopes to the last set added with that hash.
    by_hash: ahash::AHashMap<u64, u32>,
    /// For each set, the set added before it with the same hash
    /// (`u32::MAX`: none).
    same_hash: Vec<u32>,
    hasher: ahash::RandomState,
    /// The set found last (keys often repeat the previous key's).
    last: u32,
}

impl ScopeSets {
    fn new() -> Self {
        let hasher = ahash::RandomState::new();
        let mut by_hash = ahash::AHashMap::new();
        by_hash.insert(Self::hash(&hasher, &[]), 0);
        ScopeSets {
            sets: vec![Vec::new()],
            by_hash,
            same_hash: vec![u32::MAX],
            hasher,
            last: 0,
        }
    }

    fn hash(hasher: &ahash::RandomState, scopes: &[Cow<'_, str>]) -> u64 {
        use std::hash::{BuildHasher as _, Hash as _, Hasher as _};
        let mut h = hasher.build_hasher();
        scopes.len().hash(&mut h);
        for s in scopes {
            s.as_ref().hash(&mut h);
        }
        h.finish()
    }

    fn equal(set: &[String], scopes: &[Cow<'_, str>]) -> bool {
        set.len() == scopes.len() && set.iter().zip(scopes).all(|(a, b)| **a == **b)
    }

    /// The index of the set `scopes` (deduplicated), added if new; `None`
    /// past 2^32 - 1 sets.
    fn intern(&mut self, scopes: &[Cow<'_, str>]) -> Option<u32> {
        if Self::equal(&self.sets[self.last as usize], scopes) {
            return Some(self.last);
        }
        let hash = Self::hash(&self.hasher, scopes);
        let head = self.by_hash.get(&hash).copied().unwrap_or(u32::MAX);
        let mut at = head;
        while at != u32::MAX {
            if Self::equal(&self.sets[at as usize], scopes) {
                self.last = at;
                return Some(at);
            }
            at = self.same_hash[at as usize];
        }
        let index = u32::try_from(self.sets.len())
            .ok()
            .filter(|&i| i != u32::MAX)?;
        self.sets
            .push(scopes.iter().map(|s| s.as_ref().to_owned()).collect());
        self.same_hash.push(head);
        self.by_hash.insert(hash, index);
        self.last = index;
        Some(index)
    }
}

/// The parsed file and its sorted id and digest tags.
type Parsed<'t> = (FastFile<'t>, Vec<u64>, Vec<u64>);

/// A thread could not be started.
struct NoThreads;

/// Runs `f` on every job side by side: the first on this thread, the others
/// on threads of their own. Gives each job's result (`None` for a job that
/// panicked), or `NoThreads` if a thread could not be started (then the first
/// job does not run and the started ones are waited for).
fn side_by_side<T: Send, R: Send>(
    jobs: Vec<T>,
    f: impl Fn(T) -> R + Sync,
) -> Result<Vec<Option<R>>, NoThreads> {
    // The helpers map their buffers as this thread does (see
    // `pages::transient`).
    let transient = crate::pages::in_transient();
    std::thread::scope(|s| {
        let f = &f;
        let mut jobs = jobs.into_iter();
        let first = jobs.next();
        let handles: Vec<_> = jobs
            .map(|job| {
                std::thread::Builder::new().spawn_scoped(s, move || {
                    if transient {
                        crate::pages::transient(|| f(job))
                    } else {
                        f(job)
                    }
                })
            })
            .collect();
        if handles.iter().any(Result::is_err) {
            for h in handles.into_iter().flatten() {
                let _ = h.join();
            }
            return Err(NoThreads);
        }
        let mut out = Vec::with_capacity(handles.len() + 1);
        out.extend(first.map(|job| Some(f(job))));
        out.extend(handles.into_iter().flatten().map(|h| h.join().ok()));
        Ok(out)
    })
}

/// Parses the parts of a file side by side, each writing its keys straight
/// into its share of one vector (so no part's keys are copied afterwards).
/// The shares come from counting each part's `[[keys]]` header lines first;
/// a part whose keys do not fill its share exactly is declined. `texts` are
/// the parts with their offsets in `text`.
fn parse_parts<'t>(
    text: &'t str,
    texts: &[(&'t str, usize)],
) -> Result<Option<Parsed<'t>>, NoThreads> {
    let counts = side_by_side(texts.iter().map(|&(t, _)| t).collect(), count_lines)?;
    let Some(counts) = counts.into_iter().collect::<Option<Vec<_>>>() else {
        return Ok(None);
    };
    fill_parts(text, texts, &counts)
}

/// The second step of [`parse_parts`], given each part's key headers and
/// newlines.
fn fill_parts<'t>(
    text: &'t str,
    texts: &[(&'t str, usize)],
    counts: &[(usize, usize)],
) -> Result<Option<Parsed<'t>>, NoThreads> {
    let total: usize = counts.iter().map(|&(keys, _)| keys).sum();
    // Indices must fit the low half of a tag.
    if u32::try_from(total).is_err() {
        return Ok(None);
    }
    let mut keys: Vec<FastKey> = Vec::with_capacity(total);
    let Some(mut spare) = keys.spare_capacity_mut().get_mut(..total) else {
        return Ok(None);
    };
    let mut jobs = Vec::with_capacity(texts.len());
    let (mut line, mut index) = (1, 0);
    for (&(part, offset), &(n_keys, n_lines)) in texts.iter().zip(counts) {
        let (share, rest) = std::mem::take(&mut spare).split_at_mut(n_keys);
        spare = rest;
        jobs.push((part, offset, Slots::new(share), line, index));
        line += n_lines;
        index += n_keys;
    }
    // A part that panicked is declined like any other doubt (its keys were
    // dropped as it unwound).
    let parts = side_by_side(jobs, |(part, offset, slots, line, index)| {
        parse_part(part, offset, text.len(), slots, line, index)
    })?;
    // Returning early drops the parts, and with them the keys they wrote.
    let parts: Vec<Part<Slots<'_, FastKey>>> =
        match parts.into_iter().map(Option::flatten).collect() {
            Some(parts) => parts,
            None => return Ok(None),
        };
    if !parts.iter().all(|p| p.keys.is_full()) {
        return Ok(None);
    }
    let several_roots = parts.iter().skip(1).any(|p| p.root_keys || p.root_routes);
    let root_keys = parts.first().is_some_and(|p| p.root_keys);
    let root_routes = parts.first().is_some_and(|p| p.root_routes);
    let keys_header = parts.iter().any(|p| p.keys_header);
    let routes_header = parts.iter().any(|p| p.routes_header);
    // Only the first part can hold root-level fields, and `keys = []` with a
    // `[[keys]]` header defines `keys` twice.
    if several_roots || (root_keys && keys_header) || (root_routes && routes_header) {
        return Ok(None);
    }
    let mut routes = Vec::new();
    let mut id_tags = Vec::with_capacity(total);
    let mut digest_tags = Vec::with_capacity(total);
    let mut arena = String::new();
    let mut scope_sets = Vec::new();
    // Each part numbered its scope sets and unescaped strings from zero:
    // what to add to its keys' numbers and arena offsets.
    let mut shifts = Vec::with_capacity(parts.len());
    for part in parts {
        let filled = part.keys.len();
        let arena_shift = u32::try_from(arena.len()).ok();
        let sets_shift = u32::try_from(scope_sets.len()).ok();
        let (Some(arena_shift), Some(sets_shift)) = (arena_shift, sets_shift) else {
            return Ok(None);
        };
        shifts.push((filled, sets_shift, arena_shift, !part.arena.is_empty()));
        routes.extend(part.routes);
        id_tags.extend(part.id_tags);
        digest_tags.extend(part.digest_tags);
        arena.push_str(&part.arena);
        scope_sets.extend(part.scopes.sets);
        part.keys.release();
    }
    // SAFETY: the shares tile the first `total` slots of the spare capacity
    // in order, every share was filled completely (`is_full`), and
    // `release` handed ownership of its keys over without dropping them, so
    // slots 0..total hold initialised keys owned by nothing else.
    unsafe { keys.set_len(total) };
    let mut rest = keys.as_mut_slice();
    for (filled, sets_shift, arena_shift, has_arena) in shifts {
        let (share, after) = std::mem::take(&mut rest).split_at_mut(filled);
        rest = after;
        if sets_shift != 0 || (arena_shift != 0 && has_arena) {
            let shift_span = |s: &mut Span| {
                if s.start as usize >= text.len() {
                    s.start += arena_shift;
                }
            };
            for k in share {
                crate::priority::pace();
                k.scopes += sets_shift;
                shift_span(&mut k.id);
                shift_span(&mut k.client);
                if let Some(d) = k.extra.as_mut().and_then(|e| e.description.as_mut()) {
                    shift_span(d);
                }
            }
        }
    }
    // Each part's tags are sorted; the stable sort merges those runs.
    id_tags.sort();
    digest_tags.sort();
    let file = FastFile {
        text,
        arena,
        keys,
        scope_sets,
        routes,
    };
    Ok(Some((file, id_tags, digest_tags)))
}

/// `[[keys]]` header lines (as the parser reads them: at a line start after
/// spaces or tabs, with spaces or tabs inside the brackets) and newlines in
/// `text`. In any text the parser accepts, every key header is counted.
fn count_lines(text: &str) -> (usize, usize) {
    let b = text.as_bytes();
    // Byte-wide counters over short chunks vectorise well.
    let newlines: usize = b
        .chunks(255 * 256)
        .map(|run| {
            crate::priority::pace_chunk();
            run.chunks(255)
                .map(|chunk| usize::from(chunk.iter().fold(0u8, |n, &c| n + u8::from(c == b'\n'))))
                .sum::<usize>()
        })
        .sum();
    let ws = |c: &u8| *c == b' ' || *c == b'\t';
    let mut headers = 0;
    for at in memchr::memmem::find_iter(b, b"[[") {
        crate::priority::pace();
        let mut start = at;
        while start > 0 && b.get(start - 1).is_some_and(ws) {
            start -= 1;
        }
        if start > 0 && b.get(start - 1) != Some(&b'\n') {
            continue;
        }
        let rest = b.get(at + 2..).unwrap_or_default();
        let rest = &rest[rest.iter().take_while(|c| ws(c)).count()..];
        let Some(rest) = rest.strip_prefix(b"keys") else {
            continue;
        };
        let rest = &rest[rest.iter().take_while(|c| ws(c)).count()..];
        if rest.starts_with(b"]]") {
            headers += 1;
        }
    }
    (headers, newlines)
}

/// Byte offsets (ascending, each just after a newline and at a `[[keys]]`
/// header) that cut `b` into up to `threads` parts of similar size.
fn split_points(b: &[u8], threads: usize) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::new();
    if threads < 2 {
        return out;
    }
    for k in 1..threads {
        let from = (b.len() / threads * k).max(out.last().map_or(0, |&p| p + 1));
        let mut at = from;
        let found = loop {
            let Some(nl) = b.get(at..).and_then(|r| r.iter().position(|&c| c == b'\n')) else {
                break None;
            };
            let line = at + nl + 1;
            crate::priority::pace();
            if b.get(line..).is_some_and(|r| r.starts_with(b"[[keys]]")) {
                break Some(line);
            }
            at = line;
        };
        match found {
            Some(p) => out.push(p),
            None => break,
        }
    }
    out
}

/// Where a part's keys go: a vector of its own, or its share of the
/// file's vector.
trait KeySink<T> {
    /// Keys stored so far.
    fn len(&self) -> usize;
    /// Stores a key; `None` when there is no room for it.
    fn push(&mut self, key: T) -> Option<()>;
}

impl<T> KeySink<T> for Vec<T> {
    fn len(&self) -> usize {
        Vec::len(self)
    }

    fn push(&mut self, key: T) -> Option<()> {
        Vec::push(self, key);
        Some(())
    }
}

/// A part's share of the spare capacity of the file's key vector: one slot
/// for each key header counted in the part, filled in order. Until
/// [`Slots::release`], the keys written belong to the share (and are dropped
/// with it).
struct Slots<'v, T> {
    slots: &'v mut [MaybeUninit<T>],
    filled: usize,
}

impl<'v, T> Slots<'v, T> {
    fn new(slots: &'v mut [MaybeUninit<T>]) -> Self {
        Slots { slots, filled: 0 }
    }

    fn is_full(&self) -> bool {
        self.filled == self.slots.len()
    }

    /// Hands the keys written over to the vector (whose length the caller
    /// then sets over them) instead of dropping them.
    fn release(self) {
        std::mem::forget(self);
    }
}

impl<T> KeySink<T> for Slots<'_, T> {
    fn len(&self) -> usize {
        self.filled
    }

    fn push(&mut self, key: T) -> Option<()> {
        self.slots.get_mut(self.filled)?.write(key);
        self.filled += 1;
        Some(())
    }
}

impl<T> Drop for Slots<'_, T> {
    fn drop(&mut self) {
        for slot in self.slots.iter_mut().take(self.filled) {
            // SAFETY: `push` initialised the first `filled` slots, and they
            // are owned by nothing else: the vector's length covers them
            // only after `release`, which skips this drop.
            unsafe { slot.assume_init_drop() };
        }
    }
}

/// What one part of the file holds.
struct Part<S> {
    keys: S,
    routes: Vec<RouteSpec>,
    /// Unescaped strings; spans at or past the file text's length point
    /// here (before the parts' arenas are joined).
    arena: String,
    scopes: ScopeSets,
    /// `keys = []` at the root.
    root_keys: bool,
    /// `routes = []` at the root.
    root_routes: bool,
    /// Any `[[keys]]` header.
    keys_header: bool,
    /// Any `[[routes]]` header.
    routes_header: bool,
    /// A 32-bit hash of each key's id in the high half and the key's index
    /// in the file in the low half, sorted.
    id_tags: Vec<u64>,
    /// The same for digests.
    digest_tags: Vec<u64>,
}

/// Sorts tags recorded in index order: a stable radix sort on the hash
/// half, which leaves equal hashes in index order, so the whole tags end up
/// in order.
fn sort_tags(tags: &mut Vec<u64>) {
    const BITS: u32 = 11;
    const MASK: u64 = (1 << BITS) - 1;
    if tags.len() < 1024 {
        tags.sort_unstable();
        return;
    }
    let mut other = vec![0u64; tags.len()];
    for shift in [32, 32 + BITS, 32 + 2 * BITS] {
        let digit = |t: u64| ((t >> shift) & MASK) as usize;
        let mut starts = [0usize; 1 << BITS];
        for run in tags.chunks(PACED_TAGS) {
            for &t in run {
                starts[digit(t)] += 1;
            }
            crate::priority::pace_chunk();
        }
        let mut sum = 0;
        for s in starts.iter_mut() {
            let n = *s;
            *s = sum;
            sum += n;
        }
        for run in tags.chunks(PACED_TAGS) {
            for &t in run {
                let d = digit(t);
                other[starts[d]] = t;
                starts[d] += 1;
            }
            crate::priority::pace_chunk();
        }
        std::mem::swap(tags, &mut other);
    }
}

/// Tags [`sort_tags`] handles between two yield points: some tens of
/// microseconds' work.
const PACED_TAGS: usize = 8 << 10;

/// Whether sorted `tags` (hash high, index low) name no two equal values;
/// `cmp` compares the values at two indices, for the rare equal hashes.
fn no_duplicates(tags: &[u64], cmp: impl Fn(usize, usize) -> Ordering) -> bool {
    let index = |t: u64| (t & 0xffff_ffff) as usize;
    let mut run: Vec<usize> = Vec::new();
    for group in tags.chunk_by(|a, b| a >> 32 == b >> 32) {
        crate::priority::pace();
        if let [a, b] = group {
            if cmp(index(*a), index(*b)) == Ordering::Equal {
                return false;
            }
        } else if group.len() > 2 {
            run.clear();
            run.extend(group.iter().map(|&t| index(t)));
            run.sort_unstable_by(|&a, &b| cmp(a, b));
            if run.windows(2).any(|w| cmp(w[0], w[1]) == Ordering::Equal) {
                return false;
            }
        }
    }
    true
}

fn id_hash(id: &str) -> u64 {
    ahash::RandomState::with_seeds(
        0x243f_6a88_85a3_08d3,
        0x1319_8a2e_0370_7344,
        0xa409_3822_299f_31d0,
        0x082e_fa98_ec4e_6c89,
    )
    .hash_one(id)
        >> 32
}

/// Digests are SHA-256 outputs, so folding their words is hash enough.
/// Only the first 128 bits are hashed, and equal hashes compare those bits:
/// they are what must be unique (see `DigestPrefix`).
fn digest_hash(d: &DigestPrefix) -> u64 {
    let mut h: u64 = 0;
    for (i, w) in d.chunks_exact(8).enumerate() {
        let mut word = [0u8; 8];
        word.copy_from_slice(w);
        h ^= u64::from_le_bytes(word).rotate_left(16 * i as u32);
    }
    h.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32
}

/// A `[[routes]]` table being read.
struct RouteDraft {
    line: usize,
    path_prefix: Option<String>,
    methods: Option<Vec<String>>,
    required_scopes: Option<Vec<String>>,
}

impl RouteDraft {
    fn new(line: usize) -> Self {
        RouteDraft {
            line,
            path_prefix: None,
            methods: None,
            required_scopes: None,
        }
    }

    fn finish(self) -> Option<RouteSpec> {
        Some(RouteSpec {
            path_prefix: self.path_prefix?,
            methods: self.methods.unwrap_or_default(),
            required_scopes: self.required_scopes?,
            line: self.line,
        })
    }
}

/// The table the lines being read belong to.
enum Section {
    Root,
    /// A `[[keys]]` table, with the fields seen so far.
    Key(u16),
    Route(RouteDraft),
}

/// A `[[keys]]` table being read: the key, its id's hash, and the fields
/// few keys have (boxed into the key only if any is set).
struct KeyDraft {
    key: FastKey,
    id_hash: u64,
    extra: Extra,
}

impl KeyDraft {
    fn new(line: u32) -> Self {
        KeyDraft {
            key: FastKey::blank(line),
            id_hash: 0,
            extra: Extra::default(),
        }
    }
}

/// Checks a finished `[[keys]]` table, records its tags and stores it.
fn close_key<S: KeySink<FastKey>>(
    part: &mut Part<S>,
    draft: KeyDraft,
    seen: u16,
    first_index: usize,
) -> Option<()> {
    const REQUIRED: u16 = F_ID | F_CLIENT | F_SHA256;
    if seen & REQUIRED != REQUIRED {
        return None;
    }
    let KeyDraft {
        mut key,
        id_hash,
        extra,
    } = draft;
    if let (Some(nb), Some(exp)) = (extra.not_before, key.expires_at(Some(&extra)))
        && exp <= nb
    {
        return None;
    }
    if !extra.is_empty() {
        key.extra = Some(Box::new(extra));
    }
    let index = u64::from(u32::try_from(first_index + part.keys.len()).ok()?);
    part.id_tags.push(id_hash << 32 | index);
    part.digest_tags
        .push(digest_hash(&key.digest) << 32 | index);
    part.keys.push(key)
}

/// Parses one part of a file (all of it, or a piece starting at a
/// `[[keys]]` header at byte `offset` of a file text of `file_len` bytes),
/// whose first line is `first_line` of the file and whose first key is
/// `first_index` of the file.
fn parse_part<S: KeySink<FastKey>>(
    text: &str,
    offset: usize,
    file_len: usize,
    keys: S,
    first_line: usize,
    first_index: usize,
) -> Option<Part<S>> {
    let mut p = Parser::new(text, offset, file_len, first_line);
    let mut part = Part {
        keys,
        routes: Vec::new(),
        arena: String::new(),
        scopes: ScopeSets::new(),
        root_keys: false,
        root_routes: false,
        keys_header: false,
        routes_header: false,
        id_tags: Vec::with_capacity(key_capacity(text.len())),
        digest_tags: Vec::with_capacity(key_capacity(text.len())),
    };
    let mut section = Section::Root;
    let mut key = KeyDraft::new(0);
    loop {
        p.skip_ws();
        let Some(&c) = p.b.get(p.i) else { break };
        match c {
            b'\n' | b'\r' => p.newline()?,
            b'#' => p.comment()?,
            b'[' => {
                crate::priority::pace();
                let line = p.line;
                let name = p.header()?;
                match std::mem::replace(&mut section, Section::Root) {
                    Section::Root => {}
                    Section::Key(seen) => {
                        let done = std::mem::replace(&mut key, KeyDraft::new(0));
                        close_key(&mut part, done, seen, first_index)?;
                    }
                    Section::Route(draft) => part.routes.push(draft.finish()?),
                }
                section = match name {
                    b"keys" if !part.root_keys => {
                        part.keys_header = true;
                        key.key.line = u32::try_from(line).ok()?;
                        Section::Key(0)
                    }
                    b"routes" if !part.root_routes => {
                        part.routes_header = true;
                        Section::Route(RouteDraft::new(line))
                    }
                    _ => return None,
                };
            }
            _ => {
                let name = p.bare_key()?;
                p.skip_ws();
                p.expect(b'=')?;
                p.skip_ws();
                match &mut section {
                    Section::Root => p.root_field(name, &mut part)?,
                    Section::Key(seen) => {
                        p.key_field(name, &mut key, seen, &mut part.scopes)?;
                    }
                    Section::Route(draft) => p.route_field(name, draft)?,
                }
                p.end_of_line()?;
            }
        }
    }
    match section {
        Section::Root => {}
        Section::Key(seen) => close_key(&mut part, key, seen, first_index)?,
        Section::Route(draft) => part.routes.push(draft.finish()?),
    }
    part.arena = p.arena;
    sort_tags(&mut part.id_tags);
    sort_tags(&mut part.digest_tags);
    Some(part)
}

const F_ID: u16 = 1;
const F_CLIENT: u16 = 1 << 1;
const F_SHA256: u16 = 1 << 2;
const F_SCOPES: u16 = 1 << 3;
const F_STATE: u16 = 1 << 4;
const F_NOT_BEFORE: u16 = 1 << 5;
const F_EXPIRES_AT: u16 = 1 << 6;
const F_DEPRECATED_AT: u16 = 1 << 7;
const F_DESCRIPTION: u16 = 1 << 8;
const F_RATE_LIMIT: u16 = 1 << 9;

/// The `[[keys]]` field called `name`, as a bit; 0 for none.
#[inline]
fn key_field_bit(name: &[u8]) -> u16 {
    match name.len() {
        2 if name == b"id" => F_ID,
        5 if name == b"state" => F_STATE,
        6 => match name {
            b"client" => F_CLIENT,
            b"sha256" => F_SHA256,
            b"scopes" => F_SCOPES,
            _ => 0,
        },
        10 => match name {
            b"expires_at" => F_EXPIRES_AT,
            b"not_before" => F_NOT_BEFORE,
            b"rate_limit" => F_RATE_LIMIT,
            _ => 0,
        },
        11 if name == b"description" => F_DESCRIPTION,
        13 if name == b"deprecated_at" => F_DEPRECATED_AT,
        _ => 0,
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn valid_client(client: &str) -> bool {
    // Printable ASCII holds no control characters, and only the space is
    // white space.
    if client.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return client.bytes().any(|b| b != b' ');
    }
    !client.trim().is_empty() && !client.chars().any(|c| c.is_control())
}

fn valid_method(m: &str) -> bool {
    !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase())
}

/// Byte classes: control characters other than tab (not allowed raw in
/// strings or comments; this includes the line ends), the characters that
/// end or escape strings, and those of bare keys.
const CONTROL: u8 = 1;
const DQUOTE: u8 = 2;
const BACKSLASH: u8 = 4;
const SQUOTE: u8 = 8;
/// Characters of bare keys: `A-Z a-z 0-9 _ -`.
const BARE: u8 = 16;

static CLASS: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut c = 0;
    while c < 0x20 {
        t[c] = CONTROL;
        c += 1;
    }
    t[b'\t' as usize] = 0;
    t[0x7f] = CONTROL;
    t[b'"' as usize] = DQUOTE;
    t[b'\\' as usize] = BACKSLASH;
    t[b'\'' as usize] = SQUOTE;
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            t[c] = BARE;
        }
        c += 1;
    }
    t
};

/// Hex digit values; 0x80 marks a non-digit.
static HEX: [u8; 256] = {
    let mut t = [0x80u8; 256];
    let mut c = 0;
    while c < 10 {
        t[b'0' as usize + c] = c as u8;
        c += 1;
    }
    let mut c = 0;
    while c < 6 {
        t[b'a' as usize + c] = 10 + c as u8;
        t[b'A' as usize + c] = 10 + c as u8;
        c += 1;
    }
    t
};

/// Exactly 64 hex digits, without `decode_digest`'s trimming.
#[inline]
fn hex64(s: &[u8]) -> Option<[u8; 32]> {
    let s: &[u8; 64] = s.try_into().ok()?;
    let mut out = [0u8; 32];
    let mut bad = 0u8;
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        let (hi, lo) = (HEX[usize::from(pair[0])], HEX[usize::from(pair[1])]);
        bad |= hi | lo;
        *o = (hi << 4) | lo;
    }
    (bad & 0x80 == 0).then_some(out)
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400)) => {
            29
        }
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

struct Parser<'a> {
    text: &'a str,
    b: &'a [u8],
    i: usize,
    /// 1-based line of `i`.
    line: usize,
    /// Strings of the array being read, reused from array to array.
    scratch: Vec<Cow<'a, str>>,
    /// Where `text` starts in the file text.
    offset: usize,
    /// Length of the file text.
    file_len: usize,
    /// Strings kept that were written with escapes, unescaped.
    arena: String,
}

impl<'a> Parser<'a> {
    /// A parser at the start of `text`, which starts at byte `offset` of a
    /// file text of `file_len` bytes, on the file's line `line`.
    fn new(text: &'a str, offset: usize, file_len: usize, line: usize) -> Self {
        Parser {
            text,
            b: text.as_bytes(),
            i: 0,
            line,
            scratch: Vec::new(),
            offset,
            file_len,
            arena: String::new(),
        }
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    #[inline]
    fn expect(&mut self, c: u8) -> Option<()> {
        if self.peek() == Some(c) {
            self.i += 1;
            Some(())
        } else {
            None
        }
    }

    #[inline]
    fn skip_ws(&mut self) {
        let mut j = self.i;
        while let Some(b' ' | b'\t') = self.b.get(j) {
            j += 1;
        }
        self.i = j;
    }

    /// At `\n` or `\r\n`: consumes it.
    #[inline]
    fn newline(&mut self) -> Option<()> {
        match self.peek()? {
            b'\n' => self.i += 1,
            b'\r' if self.b.get(self.i + 1) == Some(&b'\n') => self.i += 2,
            _ => return None,
        }
        self.line += 1;
        Some(())
    }

    /// At `#`: skips the comment, up to the line end.
    fn comment(&mut self) -> Option<()> {
        let mut j = self.i + 1;
        while let Some(&c) = self.b.get(j) {
            if CLASS[usize::from(c)] & CONTROL != 0 {
                self.i = j;
                return matches!(c, b'\n' | b'\r').then_some(());
            }
            j += 1;
        }
        self.i = j;
        Some(())
    }

    /// After a value or header: spaces, an optional comment, then a line end
    /// or the end of the text.
    #[inline]
    fn end_of_line(&mut self) -> Option<()> {
        self.skip_ws();
        match self.peek() {
            None => Some(()),
            Some(b'#') => {
                self.comment()?;
                match self.peek() {
                    None => Some(()),
                    Some(_) => self.newline(),
                }
            }
            Some(_) => self.newline(),
        }
    }

    /// Spaces, line ends and comments, as allowed between array elements.
    fn skip_ws_lines(&mut self) -> Option<()> {
        loop {
            match self.peek() {
                Some(b' ' | b'\t') => self.i += 1,
                Some(b'\n' | b'\r') => self.newline()?,
                Some(b'#') => self.comment()?,
                _ => return Some(()),
            }
        }
    }

    /// A bare key: `[A-Za-z0-9_-]+`.
    #[inline]
    fn bare_key(&mut self) -> Option<&'a [u8]> {
        let b: &'a [u8] = self.b;
        let start = self.i;
        let mut j = start;
        while let Some(&c) = b.get(j)
            && CLASS[usize::from(c)] & BARE != 0
        {
            j += 1;
        }
        if j == start {
            return None;
        }
        self.i = j;
        b.get(start..j)
    }

    /// At `[`: an array-of-tables header and the rest of its line; returns
    /// the table name.
    fn header(&mut self) -> Option<&'a [u8]> {
        if self.b.get(self.i + 1) != Some(&b'[') {
            return None;
        }
        self.i += 2;
        self.skip_ws();
        let name = self.bare_key()?;
        self.skip_ws();
        if self.b.get(self.i..self.i + 2) != Some(b"]]") {
            return None;
        }
        self.i += 2;
        self.end_of_line()?;
        Some(name)
    }

    /// A basic or literal string on one line.
    #[inline]
    fn string(&mut self) -> Option<Cow<'a, str>> {
        match self.peek()? {
            b'"' => self.basic_string(),
            b'\'' => self.literal_string(),
            _ => None,
        }
    }

    /// Index of the first byte at or after `j` whose class is in `stop`.
    #[inline]
    fn scan(&self, mut j: usize, stop: u8) -> Option<usize> {
        loop {
            let c = *self.b.get(j)?;
            if CLASS[usize::from(c)] & stop != 0 {
                return Some(j);
            }
            j += 1;
        }
    }

    fn basic_string(&mut self) -> Option<Cow<'a, str>> {
        let text: &'a str = self.text;
        let start = self.i + 1;
        let j = self.scan(start, CONTROL | DQUOTE | BACKSLASH)?;
        match self.b.get(j)? {
            b'"' => {
                self.i = j + 1;
                text.get(start..j).map(Cow::Borrowed)
            }
            b'\\' => self.escaped_string(start, j).map(Cow::Owned),
            _ => None,
        }
    }

    /// The rest of a basic string whose first escape is at `j`.
    fn escaped_string(&mut self, start: usize, mut j: usize) -> Option<String> {
        let mut out = String::with_capacity(j - start + 16);
        out.push_str(self.text.get(start..j)?);
        loop {
            match *self.b.get(j)? {
                b'"' => {
                    self.i = j + 1;
                    return Some(out);
                }
                b'\\' => {
                    let e = *self.b.get(j + 1)?;
                    j += 2;
                    let c = match e {
                        b'b' => '\u{8}',
                        b't' => '\t',
                        b'n' => '\n',
                        b'f' => '\u{c}',
                        b'r' => '\r',
                        b'"' => '"',
                        b'\\' => '\\',
                        b'u' | b'U' => {
                            let n = if e == b'u' { 4 } else { 8 };
                            let digits = self.b.get(j..j + n)?;
                            j += n;
                            let mut v: u32 = 0;
                            for &d in digits {
                                v = (v << 4) | char::from(d).to_digit(16)?;
                            }
                            char::from_u32(v)?
                        }
                        _ => return None,
                    };
                    out.push(c);
                }
                c if CLASS[usize::from(c)] & CONTROL == 0 => {
                    let end = self.scan(j, CONTROL | DQUOTE | BACKSLASH)?;
                    out.push_str(self.text.get(j..end)?);
                    j = end;
                }
                _ => return None,
            }
        }
    }

    fn literal_string(&mut self) -> Option<Cow<'a, str>> {
        let text: &'a str = self.text;
        let start = self.i + 1;
        let j = self.scan(start, CONTROL | SQUOTE)?;
        if self.b.get(j)? != &b'\'' {
            return None;
        }
        self.i = j + 1;
        text.get(start..j).map(Cow::Borrowed)
    }

    /// A `sha256` value: a 64-digit string read directly when it is one,
    /// otherwise any string as the full validator decodes it.
    #[inline]
    fn digest(&mut self) -> Option<[u8; 32]> {
        let i = self.i;
        if self.b.get(i) == Some(&b'"')
            && self.b.get(i + 65) == Some(&b'"')
            && let Some(d) = self.b.get(i + 1..i + 65).and_then(hex64)
        {
            self.i = i + 66;
            return Some(d);
        }
        let s = self.string()?;
        hex64(s.as_bytes()).or_else(|| decode_digest(&s))
    }

    /// An array of strings, possibly over several lines, into `scratch`.
    fn string_array(&mut self) -> Option<()> {
        self.scratch.clear();
        self.expect(b'[')?;
        loop {
            self.skip_ws_lines()?;
            if self.peek()? == b']' {
                self.i += 1;
                return Some(());
            }
            let s = self.string()?;
            self.scratch.push(s);
            self.skip_ws_lines()?;
            match self.peek()? {
                b',' => self.i += 1,
                b']' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// A decimal integer of at least 1 (TOML's plain form: no sign,
    /// underscores or leading zeros).
    fn positive_int(&mut self) -> Option<u64> {
        let start = self.i;
        let mut n: i64 = 0;
        while let Some(c @ b'0'..=b'9') = self.peek() {
            n = n.checked_mul(10)?.checked_add(i64::from(c - b'0'))?;
            self.i += 1;
        }
        let len = self.i - start;
        if len == 0 || (len > 1 && self.b.get(start) == Some(&b'0')) || n < 1 {
            return None;
        }
        u64::try_from(n).ok()
    }

    /// A one-line inline table `{ requests = N, per = "D", burst = N }`.
    fn rate_limit(&mut self) -> Option<RateLimitSpec> {
        self.expect(b'{')?;
        let mut requests = None;
        let mut per = None;
        let mut burst = None;
        loop {
            self.skip_ws();
            let name = self.bare_key()?;
            self.skip_ws();
            self.expect(b'=')?;
            self.skip_ws();
            match name {
                b"requests" if requests.is_none() => requests = Some(self.positive_int()?),
                b"burst" if burst.is_none() => burst = Some(self.positive_int()?),
                b"per" if per.is_none() => {
                    let d = parse_duration(&self.string()?).ok()?;
                    if d.is_zero() {
                        return None;
                    }
                    per = Some(d);
                }
                _ => return None,
            }
            self.skip_ws();
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    break;
                }
                _ => return None,
            }
        }
        let requests = requests?;
        Some(RateLimitSpec {
            requests,
            per: per?,
            burst: burst.unwrap_or(requests),
        })
    }

    /// A date-time value: a string (read as the full validator reads it) or a
    /// TOML offset date-time in the strict form.
    fn time(&mut self) -> Option<Timestamp> {
        match self.peek()? {
            b'"' | b'\'' => parse_time(&self.string()?).ok(),
            _ => self.offset_datetime(),
        }
    }

    /// `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`, checked as strictly as the
    /// TOML parser checks it (or more), converted as the full validator
    /// converts it (the same instant).
    fn offset_datetime(&mut self) -> Option<Timestamp> {
        let b = self.b.get(self.i..)?;
        let num = |from: usize, len: usize| -> Option<u32> {
            let mut v = 0;
            for &c in b.get(from..from + len)? {
                v = v * 10 + char::from(c).to_digit(10)?;
            }
            Some(v)
        };
        let sep = |at: usize, c: u8| b.get(at) == Some(&c);
        if !(sep(4, b'-') && sep(7, b'-') && sep(10, b'T') && sep(13, b':') && sep(16, b':')) {
            return None;
        }
        let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
        let (hour, minute, second) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
        if !(1..=12).contains(&month)
            || day < 1
            || day > days_in_month(year, month)
            || hour > 23
            || minute > 59
            || second > 59
        {
            return None;
        }
        let mut at = 19;
        let mut nanos = 0u32;
        if sep(at, b'.') {
            at += 1;
            let from = at;
            while let Some(c @ b'0'..=b'9') = b.get(at).copied() {
                if at - from == 9 {
                    return None;
                }
                nanos = nanos * 10 + u32::from(c - b'0');
                at += 1;
            }
            let digits = at - from;
            if digits == 0 {
                return None;
            }
            nanos *= 10u32.pow(u32::try_from(9 - digits).ok()?);
        }
        let offset_minutes: i32 = match *b.get(at)? {
            b'Z' => {
                at += 1;
                0
            }
            s @ (b'+' | b'-') => {
                if !sep(at + 3, b':') {
                    return None;
                }
                let (oh, om) = (num(at + 1, 2)?, num(at + 4, 2)?);
                if oh > 23 || om > 59 {
                    return None;
                }
                at += 6;
                let m = i32::try_from(oh * 60 + om).ok()?;
                if s == b'-' { -m } else { m }
            }
            _ => return None,
        };
        let civil = jiff::civil::DateTime::new(
            i16::try_from(year).ok()?,
            i8::try_from(month).ok()?,
            i8::try_from(day).ok()?,
            i8::try_from(hour).ok()?,
            i8::try_from(minute).ok()?,
            i8::try_from(second).ok()?,
            i32::try_from(nanos).ok()?,
        )
        .ok()?;
        let ts = jiff::tz::Offset::from_seconds(offset_minutes * 60)
            .ok()?
            .to_timestamp(civil)
            .ok()?;
        self.i += at;
        Some(ts)
    }

    /// `keys = []` or `routes = []` before the first header.
    fn root_field<S>(&mut self, name: &[u8], part: &mut Part<S>) -> Option<()> {
        let seen = match name {
            b"keys" => &mut part.root_keys,
            b"routes" => &mut part.root_routes,
            _ => return None,
        };
        if *seen {
            return None;
        }
        *seen = true;
        self.string_array()?;
        self.scratch.is_empty().then_some(())
    }

    /// Where a string read from the text is kept: its range in the file
    /// text, or (when it was unescaped) its range in the arena, numbered
    /// from the file text's end.
    fn span(&mut self, s: Cow<'a, str>) -> Option<Span> {
        let len = u32::try_from(s.len()).ok()?;
        let start = match s {
            // Borrowed strings are slices of `text`.
            Cow::Borrowed(b) => {
                self.offset + (b.as_ptr() as usize).checked_sub(self.text.as_ptr() as usize)?
            }
            Cow::Owned(o) => {
                let at = self.file_len + self.arena.len();
                self.arena.push_str(&o);
                at
            }
        };
        Some(Span {
            start: u32::try_from(start).ok()?,
            len,
        })
    }

    /// One `name = value` of a `[[keys]]` table, validated into `d`.
    fn key_field(
        &mut self,
        name: &[u8],
        d: &mut KeyDraft,
        seen: &mut u16,
        sets: &mut ScopeSets,
    ) -> Option<()> {
        let bit = key_field_bit(name);
        if bit == 0 || *seen & bit != 0 {
            return None;
        }
        *seen |= bit;
        let k = &mut d.key;
        match bit {
            F_ID => {
                let s = self.string()?;
                if !valid_id(&s) {
                    return None;
                }
                d.id_hash = id_hash(&s);
                k.id = self.span(s)?;
            }
            F_CLIENT => {
                let s = self.string()?;
                if !valid_client(&s) {
                    return None;
                }
                k.client = self.span(s)?;
            }
            F_SHA256 => {
                k.digest_at = u32::try_from(self.offset + self.i).ok()?;
                k.digest = digest_prefix(&self.digest()?);
            }
            F_SCOPES => {
                self.string_array()?;
                if !self.scratch.iter().all(|s| is_scope(s)) {
                    return None;
                }
                // Duplicates are dropped, keeping the first of each.
                let mut unique = 0;
                for i in 0..self.scratch.len() {
                    if !self.scratch[..unique].contains(&self.scratch[i]) {
                        self.scratch.swap(unique, i);
                        unique += 1;
                    }
                }
                k.scopes = sets.intern(&self.scratch[..unique])?;
            }
            F_STATE => k.state = KeyState::parse(&self.string()?)?,
            F_NOT_BEFORE => d.extra.not_before = Some(self.time()?),
            F_EXPIRES_AT => {
                let t = self.time()?;
                if t.subsec_nanosecond() == 0 {
                    k.expires_at = t.as_second();
                } else {
                    d.extra.expires_at = Some(t);
                }
            }
            F_DEPRECATED_AT => d.extra.deprecated_at = Some(self.time()?),
            F_DESCRIPTION => {
                let s = self.string()?;
                d.extra.description = Some(self.span(s)?);
            }
            _ => d.extra.rate_limit = Some(self.rate_limit()?),
        }
        Some(())
    }

    fn route_field(&mut self, name: &[u8], d: &mut RouteDraft) -> Option<()> {
        match name {
            b"path_prefix" if d.path_prefix.is_none() => {
                let p = self.string()?;
                if !p.starts_with('/') || p.contains(['?', '#']) {
                    return None;
                }
                d.path_prefix = Some(p.into_owned());
            }
            b"methods" if d.methods.is_none() => {
                d.methods = Some(self.owned_strings(valid_method)?);
            }
            b"required_scopes" if d.required_scopes.is_none() => {
                d.required_scopes = Some(self.owned_strings(is_scope)?);
            }
            _ => return None,
        }
        Some(())
    }

    /// An array of strings that all pass `valid`, owned.
    fn owned_strings(&mut self, valid: fn(&str) -> bool) -> Option<Vec<String>> {
        self.string_array()?;
        let mut out = Vec::with_capacity(self.scratch.len());
        for s in self.scratch.drain(..) {
            if !valid(&s) {
                return None;
            }
            out.push(s.into_owned());
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::keyfile::parse_str_full;

    const D1: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    const D2: &str = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752";

    #[test]
    fn helper_threads_map_their_buffers_as_the_caller_does() {
        let flags = |outer: bool| {
            let run = || match side_by_side(vec![0, 1, 2], |_| crate::pages::in_transient()) {
                Ok(flags) => flags,
                Err(NoThreads) => panic!("no threads"),
            };
            if outer {
                crate::pages::transient(run)
            } else {
                run()
            }
        };
        assert_eq!(flags(true), vec![Some(true); 3]);
        assert_eq!(flags(false), vec![Some(false); 3]);
    }

    /// The contract, checked on one text under both options: whatever the
    /// fast path accepts the full validator accepts with an equal result, and
    /// whatever the full validator refuses the fast path declines. Returns
    /// whether the fast path accepted (with default options).
    pub(crate) fn agree(text: &str) -> bool {
        let mut accepted = false;
        for allow_empty in [false, true] {
            let opts = ParseOptions {
                allow_empty,
                ..ParseOptions::default()
            };
            let fast = parse_fast_threads(text, opts, 1);
            let full = parse_str_full(text, opts);
            match (&fast, &full) {
                (Some(f), Ok(s)) => assert_eq!(f, s, "different results for:\n{text}"),
                (Some(_), Err(d)) => {
                    panic!("fast path accepted a file the validator refuses ({d:?}):\n{text}")
                }
                (None, _) => {}
            }
            for threads in [2, 3] {
                assert_eq!(
                    parse_fast_threads(text, opts, threads),
                    fast,
                    "{threads} threads differ on:\n{text}"
                );
            }
            if !allow_empty {
                accepted = fast.is_some();
            }
        }
        accepted
    }

    fn key(extra: &str) -> String {
        format!("[[keys]]\nid = \"a\"\nclient = \"c\"\nsha256 = \"{D1}\"\n{extra}")
    }

    #[test]
    fn accepts_the_common_shapes() {
        let accepted = [
            key(""),
            key("scopes = [\"read\", \"trade\", \"read\"]\n"),
            key("scopes = [\n  \"read\", # the basics\n  'trade',\n]\n"),
            key("scopes = []\nstate = \"revoked\"\n"),
            key("not_before = 2026-11-27T00:00:00Z\nexpires_at = 2027-02-27T00:00:00.5+01:00\n"),
            key(
                "expires_at = \"2027-02-27T00:00:00+01:00\"\ndeprecated_at = 2026-11-28T00:00:00.123456789-05:30\n",
            ),
            key("description = \"tab\\there, quote \\\" and \\u00e9 \\U0001F600\"\n"),
            key("description = 'C:\\path \"quoted\"'\n"),
            key("rate_limit = { requests = 100, per = \"1s\", burst = 200 }\n"),
            key("rate_limit = {requests=5,per='250ms'}\n"),
            format!(
                "# head\r\n\r\n[[keys]]   # c\r\nid=\"a\"\r\nclient\t=\t\"c\" # c\r\nsha256 = \"{}\"\r\n",
                D1.to_uppercase()
            ),
            "keys = []\nroutes = [ ]\n".to_owned(),
            format!(
                "{}\n[[routes]]\npath_prefix = \"/trade\"\nmethods = [\"POST\"]\nrequired_scopes = [\"trade\"]\n[[ routes ]]\npath_prefix = '/'\nrequired_scopes = []\n",
                key("")
            ),
            format!(
                "[[routes]]\npath_prefix = \"/x\"\nrequired_scopes = []\n\n{}",
                key("")
            ),
            format!(
                "{}[[keys]]\nid = \"b\"\nclient = \"c\"\nsha256 = \"{D2}\"",
                key("")
            ),
            format!("[[keys]]\nid = \"a\"\nclient = \"c\"\nsha256 = \" {D1}\t\"\n"),
        ];
        for text in &accepted {
            let expect_some = !text.starts_with("keys = []");
            assert_eq!(agree(text), expect_some, "{text}");
        }
        let empty = ParseOptions {
            allow_empty: true,
            ..ParseOptions::default()
        };
        assert!(parse_fast("", empty).is_some());
        assert!(parse_fast("# nothing\n", empty).is_some());
        assert!(parse_fast("keys = []\n", empty).is_some());
        assert!(parse_fast("", ParseOptions::default()).is_none());
    }

    #[test]
    fn declines_errors_and_constructs_outside_the_subset() {
        let long_id = "x".repeat(129);
        let declined = [
            // Invalid by the validator's rules.
            key("bogus = 1\n"),
            key("id = \"b\"\n"),
            key("scopes = [\"a b\"]\n"),
            key("scopes = [\"\"]\n"),
            key("scopes = [\"a,b\"]\n"),
            key("scopes = [1]\n"),
            key("scopes = \"read\"\n"),
            key("state = \"retired\"\n"),
            key("state = 1\n"),
            key("not_before = 2027-01-01T00:00:00Z\nexpires_at = 2027-01-01T00:00:00Z\n"),
            key("expires_at = \"2027-01-01T00:00:00\"\n"),
            key("expires_at = 2027-01-01T00:00:00\n"),
            key("expires_at = 2027-01-01\n"),
            key("expires_at = 2027-02-29T00:00:00Z\n"),
            key("description = 3\n"),
            key("rate_limit = { requests = 0, per = \"1s\" }\n"),
            key("rate_limit = { requests = 5 }\n"),
            key("rate_limit = { requests = 5, per = \"0s\" }\n"),
            key("rate_limit = { requests = 5, per = \"1y\" }\n"),
            key("rate_limit = { requests = 5, per = \"1s\", every = 2 }\n"),
            key("rate_limit = {}\n"),
            "[[keys]]\nid = \"a\"\nclient = \"c\"\n".to_owned(),
            format!("[[keys]]\nid = \"{long_id}\"\nclient = \"c\"\nsha256 = \"{D1}\"\n"),
            format!("[[keys]]\nid = \"a b\"\nclient = \"c\"\nsha256 = \"{D1}\"\n"),
            format!("[[keys]]\nid = \"a\"\nclient = \" \"\nsha256 = \"{D1}\"\n"),
            format!("[[keys]]\nid = \"a\"\nclient = \"c\\u0007\"\nsha256 = \"{D1}\"\n"),
            format!(
                "[[keys]]\nid = \"a\"\nclient = \"c\"\nsha256 = \"{}\"\n",
                &D1[1..]
            ),
            format!("{}{}", key(""), key("")),
            format!(
                "{}[[keys]]\nid = \"b\"\nclient = \"c\"\nsha256 = \"{D1}\"\n",
                key("")
            ),
            format!("kyes = 1\n{}", key("")),
            format!("keys = []\n{}", key("")),
            "keys = [\"x\"]\n".to_owned(),
            format!(
                "{}[[routes]]\npath_prefix = \"x\"\nrequired_scopes = []\n",
                key("")
            ),
            format!(
                "{}[[routes]]\npath_prefix = \"/x?a\"\nrequired_scopes = []\n",
                key("")
            ),
            format!("{}[[routes]]\npath_prefix = \"/x\"\n", key("")),
            format!(
                "{}[[routes]]\npath_prefix = \"/x\"\nmethods = [\"get\"]\nrequired_scopes = []\n",
                key("")
            ),
            // Outside the subset (some valid TOML, declined all the same).
            key("description = \"\"\"multi\nline\"\"\"\n"),
            key("description = '''x'''\n"),
            key("rate_limit = { requests = 1_000, per = \"1s\" }\n"),
            key("rate_limit = { requests = +5, per = \"1s\" }\n"),
            key("rate_limit = { requests = 05, per = \"1s\" }\n"),
            key("rate_limit = { requests = 5, per = \"1s\", }\n"),
            key("expires_at = 2027-01-01 00:00:00Z\n"),
            key("expires_at = 2027-01-01t00:00:00z\n"),
            key("[keys.rate_limit]\nrequests = 1\nper = \"1s\"\n"),
            key("\"description\" = \"x\"\n"),
            key("description.x = \"x\"\n"),
            key("description = \"\\e\"\n"),
            key("description = \"\\x41\"\n"),
            format!("\u{feff}{}", key("")),
            "[keys]\nid = \"a\"\n".to_owned(),
            // Not TOML at all.
            key("description = \"x\" y\n"),
            key("description = \"x\ny\"\n"),
            key("description = \"\\uD800\"\n"),
            key("description = \"a\u{7f}\"\n"),
            key("# bell \u{7}\n"),
            key("description = \"x\"\r"),
            key("scopes = [\"a\" \"b\"]\n"),
            key("scopes = [,]\n"),
            key("scopes = [\"a\",,]\n"),
            key("scopes = [\"a\"\n"),
            key("rate_limit = { requests = 99999999999999999999, per = \"1s\" }\n"),
            key("rate_limit = { requests = 5, requests = 6, per = \"1s\" }\n"),
            format!("[[keys]]]\n{}", key("")),
            "[ [keys]]\n".to_owned(),
            "[[keys] ]\n".to_owned(),
            "[[keys.x]]\n".to_owned(),
        ];
        for text in &declined {
            assert!(!agree(text), "fast path accepted:\n{text}");
        }
    }

    #[test]
    fn lines_are_header_lines_across_parts() {
        let mut text = String::from("# a ring\n\n");
        for i in 0..50 {
            text.push_str(&format!(
                "[[keys]]\r\nid = \"k{i}\"\r\nclient = \"c\"\r\n# note\r\nsha256 = \"{:032x}00000000000000000000000000000000\"\r\n\r\n",
                i + 1
            ));
            if i % 7 == 0 {
                text.push_str("[[routes]]\npath_prefix = \"/\"\nrequired_scopes = [\n\"a\",\n]\n");
            }
        }
        assert!(agree(&text));
        let file = parse_fast_threads(&text, ParseOptions::default(), 4).unwrap();
        assert_eq!(file.keys[0].line, 3);
        assert_eq!(file.keys[1].line, 14);
    }

    /// Parallel parts that fail at different points (each part's keys are
    /// dropped exactly once; run under a leak checker to see it).
    #[test]
    fn parts_fail_cleanly() {
        let entry = |i: usize| {
            format!(
                "[[keys]]\nid = \"k{i}\"\nclient = \"c\"\nsha256 = \"{:032x}00000000000000000000000000000000\"\n",
                i + 1
            )
        };
        let many: String = (0..40).map(entry).collect();
        assert!(agree(&many));
        let variants = [
            format!("{many}bogus = 1\n"),
            format!("[[keys]]\nbogus = 1\n{many}"),
            format!(
                "{many}[[keys]]\nid = \"k0\"\nclient = \"c\"\nsha256 = \"{:032x}00000000000000000000000000000000\"\n",
                99
            ),
            format!(
                "{many}  [[ keys ]]\nid = \"x\"\nclient = \"c\"\nsha256 = \"{:032x}00000000000000000000000000000000\"\n",
                99
            ),
            format!("{many}description = \"\n[[keys]]\"\n"),
            format!("{}description = '[[keys]]'\n{}", entry(100), many),
            format!("keys = []\n{many}"),
            format!("{many}[[routes]]\npath_prefix = \"/\"\nrequired_scopes = []\n"),
        ];
        let accepted: Vec<bool> = variants.iter().map(|t| agree(t)).collect();
        assert_eq!(
            accepted,
            [false, false, false, true, false, true, false, true]
        );
    }

    #[test]
    fn tags_sort_in_order() {
        let mut x: u64 = 7;
        let mut tags: Vec<u64> = (0..5_000u64)
            .map(|i| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                // Few distinct hashes, so many ties between indices.
                ((x >> 40) % 300) << 32 | i
            })
            .collect();
        let mut expected = tags.clone();
        expected.sort_unstable();
        sort_tags(&mut tags);
        assert_eq!(tags, expected);
    }

    #[test]
    fn duplicates_are_found_among_many_keys() {
        let entry = |i: usize, d: usize| {
            format!(
                "[[keys]]\nid = \"k{i}\"\nclient = \"c\"\nsha256 = \"{d:032x}00000000000000000000000000000000\"\n"
            )
        };
        let many: String = (0..3_000).map(|i| entry(i, i + 1)).collect();
        assert!(agree(&many));
        assert!(!agree(&format!("{many}{}", entry(5, 99_999))));
        assert!(!agree(&format!("{many}{}", entry(99_999, 2_999))));
        // A digest that repeats another's first 128 bits is a duplicate.
        let late = format!(
            "[[keys]]\nid = \"late\"\nclient = \"c\"\nsha256 = \"{:032x}{}\"\n",
            17,
            "f".repeat(32)
        );
        assert!(!agree(&format!("{many}{late}")));
        assert!(!agree(&format!("{}{many}", entry(2_999, 99_999))));
    }

    #[test]
    fn splitting_finds_headers_only_at_line_starts() {
        let b = b"[[keys]]\na = 1\n[[keys]]\nb = 2\n  [[keys]]\n# [[keys]]\n[[keys]]\n";
        assert_eq!(split_points(b, 1), Vec::<usize>::new());
        let points = split_points(b, 3);
        for &p in &points {
            assert!(b[..p].ends_with(b"\n") && b[p..].starts_with(b"[[keys]]"));
        }
        assert!(points.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn datetimes_match_the_validator() {
        let cases = [
            "0000-01-01T00:00:00Z",
            "1970-01-01T00:00:00Z",
            "2000-02-29T23:59:59.999999999Z",
            "2024-02-29T12:00:00+23:59",
            "2024-03-01T00:30:00-23:59",
            "2026-11-27T00:00:00.1-00:00",
            "9999-12-31T23:59:59Z",
            "9999-12-31T23:59:59-23:59",
            "0000-01-01T00:00:00+23:59",
            "1900-02-29T00:00:00Z",
            "2026-11-27T00:00:60Z",
            "2026-11-27T24:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-11-27T00:00:00.0000000001Z",
            "2026-11-27T00:00:00.Z",
            "2026-11-27T00:00:00+24:00",
            "2026-11-27T00:00Z",
        ];
        for (i, dt) in cases.iter().enumerate() {
            let as_datetime = agree(&key(&format!("expires_at = {dt}\n")));
            let as_string = agree(&key(&format!("not_before = \"{dt}\"\n")));
            if i < 6 {
                assert!(as_datetime && as_string, "{dt}");
            }
        }
    }

    #[test]
    fn corpus_and_examples_agree_and_the_valid_ones_are_fast() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut seen = 0;
        for dir in ["tests/corpus", "examples"] {
            for entry in std::fs::read_dir(root.join(dir)).unwrap() {
                let path = entry.unwrap().path();
                let bytes = std::fs::read(&path).unwrap();
                let Ok(text) = std::str::from_utf8(&bytes) else {
                    continue;
                };
                seen += 1;
                let fast = agree(text);
                let valid = parse_str_full(text, ParseOptions::default()).is_ok();
                assert_eq!(fast, valid, "{}", path.display());
            }
        }
        assert!(seen >= 3);
        let example = std::fs::read_to_string(root.join("examples/keys.toml")).unwrap();
        assert!(parse_fast(&example, ParseOptions::default()).is_some());
    }

    /// A ring built from the compact form equals one built from the
    /// expanded file, for keys spread over several parts, with strings
    /// written with escapes (kept in the arena) and scope sets numbered by
    /// each part (renumbered when the parts are joined).
    #[test]
    fn rings_from_the_compact_form_match_rings_from_the_key_file() {
        use crate::ring::{KeyRing, RingSource, UsageRegistry};
        let scopes = [
            "",
            "scopes = [\"read\"]",
            "scopes = [\"read\", \"trade\"]",
            "scopes = [\"trade\", \"read\", \"trade\"]",
            "scopes = [\"r\\u0065ad\"]",
        ];
        let mut text = String::new();
        for i in 0..120 {
            let id = if i % 7 == 3 {
                format!("\"c{}\\u002dk{i}\"", i % 4)
            } else {
                format!("\"c{}-k{i}\"", i % 4)
            };
            let client = if i % 11 == 5 {
                format!("\"\\u0063{}\"", i % 4)
            } else {
                format!("'c{}'", i % 4)
            };
            text.push_str(&format!(
                "[[keys]]\nid = {id}\nclient = {client}\nsha256 = \"{:032x}00000000000000000000000000000000\"\n{}\n",
                i + 1,
                scopes[i % scopes.len()]
            ));
            if i % 9 == 2 {
                text.push_str(
                    "description = \"tab\\there\"\nexpires_at = 2027-01-01T00:00:00.5Z\n",
                );
            }
            if i % 13 == 4 {
                text.push_str(
                    "state = \"deprecated\"\nrate_limit = { requests = 5, per = \"1s\" }\n",
                );
            }
        }
        assert!(agree(&text));
        let source = RingSource {
            generation: 1,
            sha256: [0; 32],
            loaded_at: "2026-11-27T12:00:00Z".parse().unwrap(),
        };
        for threads in [1, 2, 3, 5] {
            let compact =
                parse_fast_compact_threads(&text, ParseOptions::default(), threads).unwrap();
            assert!(!compact.arena.is_empty());
            let expanded = compact.to_key_file();
            let usage = UsageRegistry::default();
            let a = KeyRing::build(&compact, source, &usage, None);
            let b = KeyRing::build(&expanded, source, &usage, None);
            assert_eq!(a.len(), 120);
            assert_eq!(a.len(), b.len());
            for (x, y) in a.keys().zip(b.keys()) {
                assert_eq!(x.id(), y.id());
                assert_eq!(x.client(), y.client());
                assert_eq!(x.digest_prefix(), y.digest_prefix());
                assert_eq!(x.scopes(), y.scopes());
                assert_eq!(x.scopes_joined(), y.scopes_joined());
                assert_eq!(x.state(), y.state());
                assert_eq!(x.not_before(), y.not_before());
                assert_eq!(x.expires_at(), y.expires_at());
                assert_eq!(x.deprecated_at(), y.deprecated_at());
                assert_eq!(x.description(), y.description());
                assert_eq!(x.rate_limit(), y.rate_limit());
            }
            for (i, spec) in expanded.keys.iter().enumerate() {
                assert_eq!(a.by_id(&spec.id).map(|k| k.index()), Some(i as u32));
                assert_eq!(a.lookup(&spec.digest).map(|k| k.index()), Some(i as u32));
            }
            assert_eq!(a.key_at(3).unwrap().id(), "c3-k3");
            assert_eq!(a.key_at(5).unwrap().client(), "c1");
            assert_eq!(a.key_at(2).unwrap().description(), Some("tab\there"));
            assert_eq!(a.key_at(1).unwrap().scopes_joined(), "read");
            assert_eq!(a.key_at(3).unwrap().scopes_joined(), "trade read");
        }
    }

    #[test]
    fn files_written_by_the_cli_take_the_fast_path() {
        use crate::keys::{NewKey, new_key, revoke, rotate};
        let now: Timestamp = "2026-11-27T12:00:00Z".parse().unwrap();
        let mut doc = toml_edit::DocumentMut::new();
        let check = |doc: &toml_edit::DocumentMut| {
            let text = doc.to_string();
            assert!(agree(&text), "declined:\n{text}");
        };
        new_key(
            &mut doc,
            &NewKey {
                client: "acme".into(),
                scopes: vec!["read".into(), "trade".into()],
                expires_in: Some(std::time::Duration::from_secs(86_400 * 90)),
                description: Some("trading bot \"v2\"\tnew".into()),
                ..NewKey::default()
            },
            now,
        )
        .unwrap();
        check(&doc);
        new_key(
            &mut doc,
            &NewKey {
                id: Some("globex-1".into()),
                client: "globex".into(),
                not_before: Some("2026-12-01T00:00:00Z".parse().unwrap()),
                expires_in: Some(std::time::Duration::from_secs(3600)),
                ..NewKey::default()
            },
            now,
        )
        .unwrap();
        check(&doc);
        rotate(
            &mut doc,
            "acme",
            None,
            None,
            crate::keys::DEFAULT_GRACE,
            now,
        )
        .unwrap();
        check(&doc);
        revoke(&mut doc, "globex-1").unwrap();
        check(&doc);
        let mut from_empty: toml_edit::DocumentMut = "keys = []\n".parse().unwrap();
        new_key(
            &mut from_empty,
            &NewKey {
                client: "é client".into(),
                ..NewKey::default()
            },
            now,
        )
        .unwrap();
        check(&from_empty);
    }
}

#[cfg(test)]
mod properties {
    //! Differential tests on generated files: realistic key files with
    //! random field subsets and orders, layouts, encodings and mistakes, and
    //! random edits of them.

    use super::tests::agree;
    use proptest::prelude::*;

    /// A seeded generator; `bad` is the percentage of choices that go wrong.
    struct Rng {
        state: u64,
        bad: u64,
    }

    impl Rng {
        fn new(seed: u64) -> Self {
            let mut r = Rng {
                state: seed,
                bad: 0,
            };
            r.bad = [0, 0, 1, 3, 10][r.below(5)];
            r
        }
        fn next(&mut self) -> u64 {
            use crate::bench_support::{SPLITMIX64_GAMMA, splitmix64};
            let x = self.state;
            self.state = x.wrapping_add(SPLITMIX64_GAMMA);
            splitmix64(x)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.next() % 100 < percent
        }
        /// Whether to make a mistake here.
        fn slip(&mut self) -> bool {
            let bad = self.bad;
            self.chance(bad)
        }
        fn pick<'a, T: ?Sized>(&mut self, xs: &[&'a T]) -> &'a T {
            xs[self.below(xs.len())]
        }
    }

    const DIGESTS: &[&str] = &[
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752",
        "FCDE2B2EDBA56BF408601FB721FE9B5C338D10EE429EA04FAE5511B68FBF8FB9",
        "587648881be295427f24a63dbd7c2cd8a76df8edc38a0876cb74bacc83c714e1",
        "f0d4c6283b01574cc5f3c714b81eaee0104e1fb075e822cce31d4e8198655053",
        "00bc1225a47358a27eb77fd131749a1b6799cb1ae9d6445636cfa2d4fa20f24d",
        "32d33073bb5a4bb90f4a2f254ca55d7681c02e3017aa26e2f296269bd623a91d",
        // The previous digest with different case: the same digest.
        "32D33073bb5a4bb90f4a2f254ca55d7681c02e3017aa26e2f296269bd623a91d",
    ];

    /// `s` as a TOML string: a basic string with escapes (some gratuitous) or
    /// a literal string when `s` allows it.
    fn quote(r: &mut Rng, s: &str) -> String {
        let literal_ok = !s
            .chars()
            .any(|c| c == '\'' || (c.is_control() && c != '\t'));
        if literal_ok && r.chance(25) {
            return format!("'{s}'");
        }
        let mut out = String::from("\"");
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\t' if r.chance(50) => out.push_str("\\t"),
                c if (c as u32) < 0x20 || c == '\u{7f}' => {
                    out.push_str(&format!("\\u{:04X}", c as u32))
                }
                c if r.chance(3) => out.push_str(&format!("\\U{:08x}", c as u32)),
                c if r.chance(3) && (c as u32) < 0x10000 => {
                    out.push_str(&format!("\\u{:04x}", c as u32))
                }
                c => out.push(c),
            }
        }
        out.push('"');
        out
    }

    /// A quoted pick from `valid`, or sometimes a raw pick from `invalid`.
    fn text_value(r: &mut Rng, valid: &[&str], invalid: &[&str]) -> String {
        if !r.slip() || invalid.is_empty() {
            let s = r.pick(valid);
            quote(r, s)
        } else {
            r.pick(invalid).to_owned()
        }
    }

    /// An array of quoted picks from `items`, sometimes with a raw pick from
    /// `odd`; on one line or several.
    fn string_array(r: &mut Rng, items: &[&str], odd: &[&str], nl: &str) -> String {
        let n = r.below(4);
        let mut elems: Vec<String> = (0..n)
            .map(|_| {
                if r.slip() {
                    r.pick(odd).to_owned()
                } else {
                    let s = r.pick(items);
                    quote(r, s)
                }
            })
            .collect();
        if r.slip() && r.chance(20) {
            elems.insert(0, String::new());
        }
        let trailing = if !elems.is_empty() && r.chance(20) {
            ","
        } else {
            ""
        };
        if r.chance(25) {
            let mut out = format!("[{nl}");
            for e in &elems {
                out.push_str(&format!("  {e},"));
                if r.chance(30) {
                    out.push_str(" # why");
                }
                out.push_str(nl);
            }
            out.push(']');
            out
        } else {
            let sep = if r.chance(80) { ", " } else { "," };
            format!("[{}{trailing}]", elems.join(sep))
        }
    }

    fn datetime(r: &mut Rng) -> String {
        let year = if r.slip() {
            r.pick(&["0000", "9999", "202", "1900"])
        } else {
            r.pick(&["1970", "2000", "2024", "2026", "2027", "2100"])
        };
        let (month, day, hour, minute, second) = if r.slip() {
            (
                r.below(14),
                r.below(33),
                r.below(25),
                r.below(61),
                r.below(61),
            )
        } else {
            (
                1 + r.below(12),
                1 + r.below(28),
                r.below(24),
                r.below(60),
                r.below(60),
            )
        };
        let sep = if r.chance(99) {
            "T"
        } else {
            r.pick(&["t", " "])
        };
        let frac = if r.chance(20) {
            let len = if r.slip() {
                r.below(12)
            } else {
                1 + r.below(9)
            };
            let digits: String = (0..len)
                .map(|_| char::from(b'0' + r.below(10) as u8))
                .collect();
            format!(".{digits}")
        } else {
            String::new()
        };
        let offset = if r.slip() {
            r.pick(&["", "z", "+24:00", "-00:60", "+1:00"]).to_owned()
        } else if r.chance(60) {
            "Z".to_owned()
        } else {
            format!(
                "{}{:02}:{:02}",
                r.pick(&["+", "-"]),
                r.below(24),
                [0usize, 30, 45, 59][r.below(4)]
            )
        };
        let secs = if r.chance(99) {
            format!(":{second:02}")
        } else {
            String::new()
        };
        format!("{year}-{month:02}-{day:02}{sep}{hour:02}:{minute:02}{secs}{frac}{offset}")
    }

    fn time_value(r: &mut Rng) -> String {
        if r.slip() {
            return r
                .pick(&[
                    "2026-11-27",
                    "\"2026-11-27T00:00:00+01:00[Europe/Paris]\"",
                    "\" 2026-11-27T00:00:00Z \"",
                    "\"2026-11-27 00:00:00Z\"",
                    "\"yesterday\"",
                    "1",
                    "00:00:00",
                ])
                .to_owned();
        }
        let dt = datetime(r);
        if r.chance(60) { dt } else { quote(r, &dt) }
    }

    fn rate_limit(r: &mut Rng) -> String {
        let mut fields = vec![];
        let ints = [
            "1",
            "100",
            "0",
            "05",
            "1_000",
            "-1",
            "+3",
            "9223372036854775807",
            "9223372036854775808",
            "1.5",
            "\"5\"",
        ];
        if !r.slip() || r.chance(50) {
            let v = if r.slip() {
                r.pick(&ints)
            } else {
                r.pick(&["100", "1", "5000"])
            };
            fields.push(format!("requests = {v}"));
        }
        if !r.slip() || r.chance(50) {
            let v = if r.slip() {
                r.pick(&[
                    "\"0s\"",
                    "\"1y\"",
                    "\"1 s\"",
                    "5",
                    "\"99999999999999999999d\"",
                ])
            } else {
                r.pick(&["\"1s\"", "'250ms'", "\"1m\"", "\"2w\"", "\" 1s \""])
            };
            fields.push(format!("per = {v}"));
        }
        if r.chance(50) {
            let v = if r.slip() { r.pick(&ints) } else { "200" };
            fields.push(format!("burst = {v}"));
        }
        if r.slip() && r.chance(20) {
            fields.push("every = 2".into());
        }
        if r.slip() && r.chance(20) && !fields.is_empty() {
            let again = fields[0].clone();
            fields.push(again);
        }
        shuffle(r, &mut fields);
        let sep = r.pick(&[", ", ",", " , "]);
        let trailing = if r.slip() && r.chance(20) { "," } else { "" };
        if r.chance(50) {
            format!("{{ {}{trailing} }}", fields.join(sep))
        } else {
            format!("{{{}{trailing}}}", fields.join(sep))
        }
    }

    fn shuffle<T>(r: &mut Rng, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            let j = r.below(i + 1);
            xs.swap(i, j);
        }
    }

    /// The fields of the `index`th `[[keys]]` table.
    fn key_entry(r: &mut Rng, nl: &str, index: usize) -> Vec<(String, String)> {
        let long = "k".repeat(128);
        let too_long = format!("\"{}\"", "k".repeat(129));
        let mut fields: Vec<(String, String)> = Vec::new();
        let ids = ["a", "b", "c", "key-1", "k.2_x", "A-b", long.as_str()];
        let id = if r.slip() {
            text_value(r, &ids, &["\"bad id\"", "\"\"", &too_long, "\"é\"", "7"])
        } else {
            // Unique within the file.
            let id = format!("{}{index}", &r.pick(&ids)[..1]);
            quote(r, &id)
        };
        fields.push(("id".into(), id));
        let client = text_value(
            r,
            &[
                "acme",
                "globex",
                "é client",
                "a \"quoted\" name",
                "back\\slash",
            ],
            &[
                "\"tab\there\"",
                "\" \"",
                "\"\"",
                "\"x\\u0001\"",
                "\"\\u0085\"",
                "3",
            ],
        );
        fields.push(("client".into(), client));
        let digest = if !r.slip() {
            // Unique within the file.
            quote(r, DIGESTS[index % 7])
        } else if r.chance(50) {
            let d = r.pick(DIGESTS);
            quote(r, d)
        } else {
            r.pick(&[
                "\"zz\"",
                "\" 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08 \"",
                "\"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a0\"",
                "\"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a0g\"",
                "\"0x9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a\"",
            ])
            .to_owned()
        };
        fields.push(("sha256".into(), digest));
        if r.slip() && r.chance(30) {
            // Drop a required field.
            let i = r.below(3);
            fields.remove(i);
        }
        if r.chance(50) {
            let v = if r.slip() && r.chance(20) {
                "\"read\"".to_owned()
            } else {
                string_array(
                    r,
                    &["read", "trade", "read", "admin:*", "x.y/z"],
                    &[
                        "\"a b\"", "\"\"", "\"x,y\"", "\"é\"", "3", "true", "[\"x\"]",
                    ],
                    nl,
                )
            };
            fields.push(("scopes".into(), v));
        }
        if r.chance(30) {
            let v = text_value(
                r,
                &["active", "deprecated", "revoked"],
                &["\"retired\"", "\"Active\"", "1"],
            );
            fields.push(("state".into(), v));
        }
        for name in ["not_before", "expires_at", "deprecated_at"] {
            if r.chance(25) {
                let v = time_value(r);
                fields.push((name.into(), v));
            }
        }
        if r.chance(25) {
            let v = text_value(
                r,
                &[
                    "free text",
                    "",
                    "tab\tand \"quotes\" \\ back",
                    "é ü 😀",
                    "line\nbreak",
                    "nul\u{0}",
                ],
                &["3", "[]"],
            );
            fields.push(("description".into(), v));
        }
        if r.chance(15) {
            let v = rate_limit(r);
            fields.push(("rate_limit".into(), v));
        }
        if r.slip() && r.chance(20) {
            let typo = r.pick(&["bogus", "expire_at", "ID", "scope"]);
            fields.push((typo.to_owned(), "\"x\"".to_owned()));
        }
        if r.slip() && r.chance(20) {
            let i = r.below(fields.len());
            let again = fields[i].clone();
            fields.push(again);
        }
        shuffle(r, &mut fields);
        fields
    }

    fn route_entry(r: &mut Rng, nl: &str) -> Vec<(String, String)> {
        let mut fields = Vec::new();
        if !r.slip() || r.chance(50) {
            let v = text_value(
                r,
                &["/", "/trade", "/é/x"],
                &["\"trade\"", "\"/x?y\"", "\"/x#y\"", "1"],
            );
            fields.push(("path_prefix".to_owned(), v));
        }
        if r.chance(50) {
            let v = string_array(r, &["GET", "POST", "GET"], &["\"get\"", "\"\"", "1"], nl);
            fields.push(("methods".to_owned(), v));
        }
        if !r.slip() || r.chance(50) {
            let v = string_array(r, &["read", "trade"], &["\"a b\"", "\"\"", "1"], nl);
            fields.push(("required_scopes".to_owned(), v));
        }
        if r.slip() && r.chance(20) {
            fields.push(("scope".to_owned(), "\"x\"".to_owned()));
        }
        shuffle(r, &mut fields);
        fields
    }

    /// A generated key file: some clean, some with mistakes or constructs
    /// outside the fast path's subset.
    fn key_file(seed: u64) -> String {
        let r = &mut Rng::new(seed);
        let crlf = r.chance(20);
        let mut out = String::new();
        let line_end =
            |r: &mut Rng| -> &'static str { if crlf || r.chance(2) { "\r\n" } else { "\n" } };
        if r.chance(30) {
            out.push_str("# a key ring");
            out.push_str(line_end(r));
        }
        if r.slip() {
            let root = r.pick(&[
                "keys = []",
                "routes = [ ]",
                "kyes = 1",
                "keys = [\"x\"]",
                "routes = []",
            ]);
            out.push_str(root);
            out.push_str(line_end(r));
        }
        let entries = if r.slip() { r.below(6) } else { 1 + r.below(5) };
        for index in 0..entries {
            let nl = line_end(r);
            let routes = r.chance(15);
            let header = if routes {
                r.pick(&["[[routes]]", "[[ routes ]]", "[[routes]] # rule"])
            } else if !r.slip() || r.chance(70) {
                r.pick(&[
                    "[[keys]]",
                    "[[keys]]",
                    "[[ keys ]]",
                    "  [[keys]]",
                    "[[keys]]\t# entry",
                ])
            } else {
                r.pick(&["[keys]", "[[key]]", "[[keys.x]]"])
            };
            out.push_str(header);
            out.push_str(nl);
            let fields = if routes {
                route_entry(r, nl)
            } else {
                key_entry(r, nl, index)
            };
            for (name, value) in fields {
                let eq = r.pick(&[" = ", " = ", "=", " =\t", "  =  "]);
                let indent = if r.chance(5) { "  " } else { "" };
                let comment = if r.chance(8) {
                    r.pick(&[" # note", "\t#", "#x", " # é"])
                } else {
                    ""
                };
                out.push_str(&format!("{indent}{name}{eq}{value}{comment}"));
                let nl = line_end(r);
                out.push_str(nl);
            }
            if r.chance(40) {
                let nl = line_end(r);
                out.push_str(nl);
            }
            if r.chance(10) {
                out.push_str("# between");
                let nl = line_end(r);
                out.push_str(nl);
            }
        }
        if r.chance(10) {
            // No newline at the end of the file.
            while out.ends_with('\n') || out.ends_with('\r') {
                out.pop();
            }
        }
        out
    }

    /// Random small edits (on characters, so the text stays UTF-8).
    fn mutate(text: &str, seed: u64) -> String {
        let r = &mut Rng::new(seed ^ 0x5eed);
        let mut chars: Vec<char> = text.chars().collect();
        const INSERTS: &[char] = &[
            ' ', '\n', '\r', '"', '\'', '#', '[', ']', '=', ',', '\\', '{', '}', '0', 'a', 'é',
            '\t', '.', ':', 'Z', '\u{0}', '\u{7f}', '\u{85}', '-', '_',
        ];
        for _ in 0..1 + r.below(3) {
            if chars.is_empty() {
                break;
            }
            let at = r.below(chars.len());
            match r.below(4) {
                0 => {
                    chars.remove(at);
                }
                1 => chars.insert(at, INSERTS[r.below(INSERTS.len())]),
                2 => chars[at] = INSERTS[r.below(INSERTS.len())],
                _ => {
                    let end = (at + 1 + r.below(20)).min(chars.len());
                    let piece: Vec<char> = chars[at..end].to_vec();
                    let to = r.below(chars.len());
                    for (k, c) in piece.into_iter().enumerate() {
                        chars.insert(to + k, c);
                    }
                }
            }
        }
        chars.into_iter().collect()
    }

    #[test]
    fn generated_files_are_often_accepted() {
        let accepted = (0..2_000u64).filter(|&s| agree(&key_file(s))).count();
        // Some generated files have a mistake or stray outside the subset,
        // but the fast path must carry most of them.
        assert!(accepted >= 1_000, "only {accepted} of 2000 accepted");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn fast_path_agrees_on_generated_files(seed in any::<u64>()) {
            agree(&key_file(seed));
        }

        #[test]
        fn fast_path_agrees_on_edited_files(seed in any::<u64>(), edit in any::<u64>()) {
            agree(&mutate(&key_file(seed), edit));
        }

        #[test]
        fn fast_path_agrees_on_edited_corpus_files(which in 0usize..3, edit in any::<u64>()) {
            let corpus = [
                include_str!("../../tests/corpus/keys-full.toml"),
                include_str!("../../tests/corpus/keys-broken.toml"),
                include_str!("../../examples/keys.toml"),
            ];
            agree(&mutate(corpus[which], edit));
        }

        #[test]
        fn fast_path_agrees_on_any_text(text in any::<String>()) {
            agree(&text);
        }
    }
}
