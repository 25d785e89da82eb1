//! Hot reload: make the ring follow its file, and never publish a broken one.
//!
//! The pipeline is a chain of small steps, each testable alone:
//!
//! 1. **watch** ([`Watch`]): inotify (via `notify`) on the key file's parent
//!    directory — not the file, because editors, config management and
//!    Kubernetes Secret volumes replace files by rename and through the
//!    `..data` symlink swap. The watcher only *signals*, and says whether
//!    the file is being written in place ([`Signal`]). It is set up afresh
//!    when the directories it watches are replaced ([`Watch::refresh`]).
//! 2. **debounce** ([`run`]): bursts of events become one attempt; a file
//!    being written in place is waited for until its writer closes it.
//! 3. **read → parse → validate → build** ([`Reloader::reload`]): off the
//!    serving threads; a file whose digest matches the serving ring is skipped.
//! 4. **publish or keep**: one `ArcSwap` store of a complete ring, or keep the
//!    current ring and remember why (for the log, the admin API and metrics).
//!
//! A polling fallback (file metadata on an interval, then the content digest)
//! covers filesystems where inotify does not deliver; every
//! [`CONTENT_POLL_EVERY`] ticks the content digest of a file of up to
//! [`CONTENT_POLL_MAX_BYTES`] is compared even when its metadata did not
//! change (a tool that restores the modification time). SIGHUP forces an
//! attempt.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use jiff::Timestamp;
use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::sync::Notify;

use crate::keyfile::{self, Fingerprint, ParseOptions};
use crate::ring::{Digest, InPlace, KeyRef, KeyRing};
use crate::service::Shared;

/// Every this many poll ticks that saw no change in the file's metadata,
/// its content is hashed and compared with the serving ring's.
pub const CONTENT_POLL_EVERY: u32 = 6;
/// Files up to this size have their content polled (a few milliseconds of
/// SHA-256, on a blocking thread); larger ones (tens of thousands of keys
/// and up) rely on metadata, inotify and SIGHUP.
pub const CONTENT_POLL_MAX_BYTES: u64 = 4 << 20;

/// Quiet time after the last filesystem event before reloading.
pub const DEBOUNCE: Duration = Duration::from_millis(20);
/// Longest a burst of events can postpone a reload.
pub const MAX_DEBOUNCE: Duration = Duration::from_millis(60);
/// While the file is being written in place (written into and not yet
/// closed), the quiet time after the last event before reloading anyway: a
/// writer that paused that long, or a file system that does not report
/// closes.
pub const WRITE_QUIET: Duration = Duration::from_secs(1);
/// Longest a file being written in place can postpone a reload, and a file
/// that keeps changing while it is read: after that it is read as it is
/// (validation still keeps a broken one out).
pub const MAX_WRITE_WAIT: Duration = Duration::from_secs(10);
/// Reads in a row that found the file changing before one is taken as it
/// is (and [`MAX_WRITE_WAIT`] since the first).
const GIVE_UP_AFTER_READS: u32 = 3;
/// How soon the watch is set up again after that failed (a directory
/// briefly missing while it is replaced, a link whose target is gone), or
/// when it could not watch every directory it should; meanwhile the file's
/// metadata is polled this often too.
pub const WATCH_RETRY: Duration = Duration::from_secs(1);

/// What caused a reload attempt (for logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A filesystem event.
    Watch,
    /// The polling fallback saw the file change.
    Poll,
    /// SIGHUP.
    Signal,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Watch => "watch",
            Trigger::Poll => "poll",
            Trigger::Signal => "signal",
        }
    }
}

/// The result of one reload attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A new ring is serving.
    Published {
        /// Its generation.
        generation: u64,
    },
    /// The file's contents are those of the serving ring (or of the last
    /// failure, already reported).
    Unchanged,
    /// The file could not be loaded; the previous ring keeps serving.
    Failed(String),
    /// The file was written into while it was read: the bytes may be a
    /// mix, or a file not yet finished. Nothing is published or reported;
    /// it is read again once it settles (for at most [`MAX_WRITE_WAIT`]).
    Changing,
}

/// The last failed reload, kept for the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadError {
    /// When it happened.
    pub at: Timestamp,
    /// The full message (`file:line:column: …` lines for invalid files).
    pub message: String,
}

/// Reload counters and the last error; shared with the admin API.
#[derive(Debug, Default)]
pub struct ReloadStats {
    /// Rings published after the first.
    pub success: AtomicU64,
    /// Attempts that kept the previous ring.
    pub failure: AtomicU64,
    /// The most recent failure, cleared by the next success. A std `Mutex`:
    /// only the reloader and admin scrapes take it, and nothing awaits while
    /// it is held.
    last_error: Mutex<Option<ReloadError>>,
}

impl ReloadStats {
    /// The most recent failure, if the last attempt failed.
    pub fn last_error(&self) -> Option<ReloadError> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn set_error(&self, e: Option<ReloadError>) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = e;
    }
}

/// What a poll finds ([`Reloader::settled_change`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollSays {
    /// The metadata is as at the last attempt.
    Unchanged,
    /// It changed, and may still be changing: look again at the next poll.
    Settling,
    /// It changed, and the change is complete: reload.
    Changed,
}

/// Identity of the file's current contents as far as metadata tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    ino: u64,
    dev: u64,
}

impl Stamp {
    /// Whether `self` and `other` are different files (device and inode).
    fn other_file(self, other: Stamp) -> bool {
        (self.dev, self.ino) != (other.dev, other.ino)
    }
}

pub(crate) fn stamp(path: &Path) -> Option<Stamp> {
    // `metadata` follows symlinks, so a Kubernetes `..data` swap shows up as a
    // new inode even though `keys.toml` itself never changes.
    let m = std::fs::metadata(path).ok()?;
    let (dev, ino) = file_id(&m);
    Some(Stamp {
        len: m.len(),
        modified: m.modified().ok(),
        ino,
        dev,
    })
}

#[derive(Debug, Default)]
struct Memory {
    /// Metadata seen at the last attempt (for the poller).
    stamp: Option<Stamp>,
    /// Metadata of a change a poll saw that has not settled yet, and since
    /// when it has been settling (see [`Reloader::settled_change`]).
    settling: Option<(Option<Stamp>, std::time::Instant)>,
    /// Since when attempts have found the file changing while read, and
    /// how many in a row did.
    changing_since: Option<(std::time::Instant, u32)>,
    /// The last attempt found the file changing while read: the next poll
    /// looks again even if the metadata is as it was then.
    look_again: bool,
    /// Digest of the last file that failed validation (not re-reported).
    failed_digest: Option<Digest>,
    /// Generation and file fingerprint of the ring this reloader (or the
    /// startup load) last published.
    serving: Option<(u64, Fingerprint)>,
    /// Replaced rings that a check held past [`crate::ring::RELEASE_WAIT`]: while one is
    /// alive, counters may still be created for its keys, so reloads clean
    /// the usage registry with a full pass.
    held: Vec<std::sync::Weak<KeyRing>>,
}

/// Loads the key file into new rings and publishes them.
#[derive(Debug)]
pub struct Reloader {
    path: PathBuf,
    options: ParseOptions,
    shared: Arc<Shared>,
    memory: Mutex<Memory>,
    /// Files at least this large are hashed after their ring is published.
    defer_digest_min: usize,
    /// How long a replaced ring is waited for ([`crate::ring::RELEASE_WAIT`]).
    release_wait: Duration,
}

impl Reloader {
    /// A reloader for `path` publishing into `shared.ring`.
    pub fn new(path: PathBuf, options: ParseOptions, shared: Arc<Shared>) -> Reloader {
        let memory = Memory {
            stamp: stamp(&path),
            settling: None,
            changing_since: None,
            look_again: false,
            failed_digest: None,
            serving: None,
            held: Vec::new(),
        };
        Reloader {
            path,
            options,
            shared,
            memory: Mutex::new(memory),
            defer_digest_min: keyfile::DEFER_DIGEST_MIN_BYTES,
            release_wait: crate::ring::RELEASE_WAIT,
        }
    }

    /// Hashes files of at least `bytes` after publishing their ring
    /// (normally [`keyfile::DEFER_DIGEST_MIN_BYTES`]; tests lower it).
    pub fn defer_digest_from(mut self, bytes: usize) -> Reloader {
        self.defer_digest_min = bytes;
        self
    }

    /// The file being followed.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a poll should reload: the metadata changed since the last
    /// attempt, and the change is complete. A file that another one
    /// replaced (renamed into place) is; a file written in place is once
    /// two polls in a row see the same metadata, or after it has kept
    /// changing for [`MAX_WRITE_WAIT`]. No clock is compared with the
    /// file's times, which network file systems skew and round.
    pub fn settled_change(&self) -> PollSays {
        let now = stamp(&self.path);
        let mut memory = self.memory();
        if now == memory.stamp && !memory.look_again {
            memory.settling = None;
            return PollSays::Unchanged;
        }
        let replaced = matches!((now, memory.stamp), (Some(a), Some(b)) if a.other_file(b));
        let settled = match memory.settling {
            Some((seen, since)) => seen == now || since.elapsed() >= MAX_WRITE_WAIT,
            None => false,
        };
        if replaced || settled {
            memory.settling = None;
            return PollSays::Changed;
        }
        let since = memory
            .settling
            .map_or_else(std::time::Instant::now, |(_, since)| since);
        memory.settling = Some((now, since));
        PollSays::Settling
    }

    /// Whether the file's content differs from both the serving ring's and
    /// the last file that failed, by SHA-256. Blocking. False when it
    /// cannot tell: a file over [`CONTENT_POLL_MAX_BYTES`], one that cannot
    /// be read (the next attempt reports that), a serving digest still
    /// being computed.
    pub fn content_changed(&self) -> bool {
        use std::io::Read as _;
        let Some(serving) = self.shared.ring.load().file_digest().get() else {
            return false;
        };
        let Ok((file, meta)) = keyfile::open_regular(&self.path) else {
            return false;
        };
        if meta.len() > CONTENT_POLL_MAX_BYTES {
            return false;
        }
        let mut bytes = Vec::new();
        if file
            .take(CONTENT_POLL_MAX_BYTES + 1)
            .read_to_end(&mut bytes)
            .is_err()
            || bytes.len() as u64 > CONTENT_POLL_MAX_BYTES
        {
            return false;
        }
        let digest = keyfile::file_digest(&bytes);
        digest != serving && self.memory().failed_digest != Some(digest)
    }

    /// Records the file's metadata as it was before the serving ring was
    /// read (taken by whoever read it), so that a change made while that
    /// ring was being read and built shows as a change to the poll.
    pub(crate) fn note_read_stamp(&self, stamp: Option<Stamp>) {
        self.memory().stamp = stamp;
    }

    /// Records that the serving ring (of `generation`) came from a file
    /// with `fingerprint`, so the next attempt can tell a changed file from
    /// the serving one without waiting for its SHA-256.
    pub fn note_serving(&self, generation: u64, fingerprint: Fingerprint) {
        self.memory().serving = Some((generation, fingerprint));
    }

    /// One attempt: read, parse, validate, build, publish — or keep the
    /// current ring and record why. Blocking; call it off the serving threads.
    ///
    /// A large file's SHA-256 is computed on a thread of its own (beside the
    /// parse and build when the reload's [`keyfile::Threads`] leave one for
    /// it, else after publication; see [`keyfile::Hashing`]) and not waited
    /// for: a file whose [`Fingerprint`] differs from the serving file's has
    /// changed, so its ring is published at once. The digest is filled in
    /// when the hash finishes, before this returns: on one thread, before
    /// the audit record, which carries it; on more, beside the audit diff,
    /// logged in a record of its own if it comes after.
    /// A file whose fingerprint matches is compared by SHA-256 first.
    pub fn reload(&self, trigger: Trigger) -> Outcome {
        let started = std::time::Instant::now();
        let mut memory = self.memory();
        memory.stamp = stamp(&self.path);
        memory.look_again = false;
        let threads = self.options.threads;
        // The file's bytes and the parser's records live for this reload
        // only: ordinary pages (see `pages::transient`).
        let bytes = match crate::pages::transient(|| keyfile::read_checked(&self.path, threads)) {
            Ok(read) if !read.steady => {
                let (since, times) = memory
                    .changing_since
                    .map_or((std::time::Instant::now(), 1), |(t, n)| (t, n + 1));
                memory.changing_since = Some((since, times));
                // Given up only after several reads in a row over the whole
                // wait: one slow write can itself take a debounce that long.
                if since.elapsed() < MAX_WRITE_WAIT || times < GIVE_UP_AFTER_READS {
                    return self.changing(&mut memory);
                }
                tracing::warn!(
                    "the key file has kept changing while being read for {MAX_WRITE_WAIT:?}; \
                     taking it as it is"
                );
                memory.changing_since = None;
                read.bytes
            }
            Ok(read) => {
                memory.changing_since = None;
                read.bytes
            }
            Err(err) => {
                memory.changing_since = None;
                memory.failed_digest = None;
                return self.fail(trigger, err.to_string());
            }
        };
        let fingerprint = keyfile::fingerprint(&bytes);
        let current = self.shared.ring.load_full();
        // The serving file's fingerprint, if this reloader knows it.
        let serving = memory
            .serving
            .filter(|&(g, _)| g == current.generation())
            .map(|(_, f)| f);
        if serving == Some(fingerprint)
            && current.file_digest().wait() == keyfile::file_digest(&bytes)
        {
            return self.unchanged(&mut memory);
        }
        let bytes = Arc::new(bytes);
        let mut hashing = keyfile::Hashing::start(&bytes, self.defer_digest_min, threads, || {});
        let generation = current.generation() + 1;
        let read = started.elapsed();
        let parsed = crate::pages::transient(|| {
            keyfile::parse_bytes_for_ring(&self.path, &bytes, self.options)
        });
        let built = parsed.map(|file| {
            let parsed = started.elapsed();
            let ring = KeyRing::build_parsed(
                &file,
                generation,
                Timestamp::now(),
                hashing.cell().clone(),
                &self.shared.usage,
                Some(&current),
                threads,
            );
            (file, ring, parsed)
        });
        let (file, ring, parsed) = match built {
            Ok(b) => b,
            Err(e) => {
                let sha256 = hashing.wait();
                if memory.failed_digest == Some(sha256) {
                    return Outcome::Unchanged;
                }
                memory.failed_digest = Some(sha256);
                return self.fail(trigger, e.to_string());
            }
        };
        // Without the serving file's fingerprint to compare with, the
        // digests decide.
        if serving.is_none() && current.file_digest().wait() == hashing.wait() {
            return self.unchanged(&mut memory);
        }
        memory.failed_digest = None;
        let ring = Arc::new(ring);
        let old = self.shared.ring.publish_shared(Arc::clone(&ring));
        let took = started.elapsed();
        hashing.resume();
        if !threads.two() {
            // One thread's worth: the hash runs alone, then the audit diff.
            hashing.wait();
        }
        memory.serving = Some((generation, fingerprint));
        self.shared.reloads.success.fetch_add(1, Ordering::Relaxed);
        self.shared.reloads.set_error(None);
        drop(current);
        // The audit record, after the ring is serving: the diff walks every
        // key of both rings.
        let diff = Diff::between(&old, &ring);
        let routes_changed = old.routes() != ring.routes();
        let sha256 = ring.file_sha256();
        tracing::info!(
            target: "keyward::audit",
            trigger = trigger.as_str(),
            generation,
            previous_generation = old.generation(),
            sha256 = %sha256.map_or_else(|| "pending".to_string(), hex::encode),
            keys = ring.len(),
            added = ?diff.added,
            removed = ?diff.removed,
            changed = ?diff.changed,
            routes_changed,
            took_ms = took.as_millis(),
            read_ms = read.as_millis(),
            parse_ms = parsed.saturating_sub(read).as_millis(),
            build_ms = took.saturating_sub(parsed).as_millis(),
            "key ring published"
        );
        // Free the previous ring and the parsed file here, on this thread,
        // not on whichever serving thread happens to drop the last reference.
        // Its counts are folded into the new ring first.
        let held = self.shared.ring.retire(old, self.release_wait);
        // Once no check holds the previous ring, none can create counters
        // for a key of it again, so dropping the removed keys' counters
        // leaves the registry with keys of this ring only. Each removal
        // locks the registry's shard only for itself: this thread runs at
        // background priority, and a check needs the shard at a key's first
        // use in the new ring. While some replaced ring is still held, and
        // once more after the last one is let go, the full pass does it.
        let full = held.is_some() || !memory.held.is_empty();
        memory.held.retain(|ring| ring.strong_count() > 0);
        memory.held.extend(held);
        if full {
            self.shared.usage.retain_ring(&ring);
        } else {
            self.shared
                .usage
                .forget(diff.removed.iter().map(String::as_str), &ring);
        }
        drop(diff);
        drop(file);
        drop(bytes);
        hashing.finish(generation, sha256.is_none());
        drop(ring);
        // Hand the freed pages back to the OS so the resident set returns to
        // its steady state.
        crate::ring::release_free_memory();
        Outcome::Published { generation }
    }

    fn unchanged(&self, memory: &mut Memory) -> Outcome {
        memory.failed_digest = None;
        if self.shared.reloads.last_error().is_some() {
            // The file is back to what is serving: nothing is wrong any more.
            self.shared.reloads.set_error(None);
        }
        Outcome::Unchanged
    }

    fn changing(&self, memory: &mut Memory) -> Outcome {
        // The next poll tick looks again (the stamp stays, so a file renamed
        // into place meanwhile still counts as another file).
        memory.look_again = true;
        tracing::info!(
            "the key file was written into while being read; reading it once it settles"
        );
        Outcome::Changing
    }

    fn fail(&self, trigger: Trigger, message: String) -> Outcome {
        self.shared.reloads.failure.fetch_add(1, Ordering::Relaxed);
        self.shared.reloads.set_error(Some(ReloadError {
            at: Timestamp::now(),
            message: message.clone(),
        }));
        let serving = self.shared.ring.load();
        tracing::warn!(
            target: "keyward::audit",
            trigger = trigger.as_str(),
            serving_generation = serving.generation(),
            error = %message,
            "key file rejected; the previous ring keeps serving"
        );
        Outcome::Failed(message)
    }
}

/// What changed between two rings, by key id.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Diff {
    /// Ids only in the new ring.
    pub added: Vec<String>,
    /// Ids only in the old ring.
    pub removed: Vec<String>,
    /// `id: what changed` for ids in both.
    pub changed: Vec<String>,
}

impl Diff {
    /// Compares `old` with `new`.
    pub fn between(old: &KeyRing, new: &KeyRing) -> Diff {
        // Successive versions of a file mostly hold the same keys at the
        // same positions: such pairs are compared slot to slot, with no
        // lookup by id and no field built.
        let mut in_place = InPlace::new(old, new);
        // Keys of `old` that some key of `new` has the id of. Ids are unique
        // in each ring, so the others were removed.
        let mut kept = vec![false; old.len()];
        let mut d = Diff::default();
        for k in new.keys() {
            crate::priority::pace();
            let i = k.index();
            let o = if in_place.same_id(i) {
                if in_place.same_fields(i) {
                    kept[i as usize] = true;
                    continue;
                }
                old.key_at(i)
            } else {
                k.id().with_str(|id| old.by_id(id))
            };
            let Some(o) = o else {
                d.added.push(k.id().to_string());
                continue;
            };
            kept[o.index() as usize] = true;
            let what = changes(o, k);
            if !what.is_empty() {
                d.changed.push(format!("{}: {}", k.id(), what.join(", ")));
            }
        }
        d.removed = old
            .keys()
            .filter(|k| {
                crate::priority::pace();
                !kept[k.index() as usize]
            })
            .map(|k| k.id().to_string())
            .collect();
        d
    }
}

fn changes(old: KeyRef<'_>, new: KeyRef<'_>) -> Vec<String> {
    /// `name old -> new` when a time changed.
    fn time(what: &mut Vec<String>, name: &str, old: Option<Timestamp>, new: Option<Timestamp>) {
        let opt = |t: Option<Timestamp>| t.map_or_else(|| "none".into(), |t| t.to_string());
        if old != new {
            what.push(format!("{name} {} -> {}", opt(old), opt(new)));
        }
    }
    let mut what = Vec::new();
    if old.state() != new.state() {
        what.push(format!("state {} -> {}", old.state(), new.state()));
    }
    time(&mut what, "expires_at", old.expires_at(), new.expires_at());
    time(&mut what, "not_before", old.not_before(), new.not_before());
    if old.scopes() != new.scopes() {
        what.push(format!(
            "scopes [{}] -> [{}]",
            old.scopes_joined(),
            new.scopes_joined()
        ));
    }
    if old.client() != new.client() {
        what.push(format!("client {} -> {}", old.client(), new.client()));
    }
    if old.digest_prefix() != new.digest_prefix() {
        what.push("secret replaced".into());
    }
    if old.rate_limit() != new.rate_limit() {
        what.push("rate_limit changed".into());
    }
    // When clients started being told the key is deprecated (`Deprecation`).
    time(
        &mut what,
        "deprecated_at",
        old.deprecated_at(),
        new.deprecated_at(),
    );
    if old.description() != new.description() {
        what.push("description changed".into());
    }
    what
}

/// What a [`Watch`] tells the reload loop: that something changed, and
/// whether the file is being written in place at the moment.
#[derive(Debug, Default)]
pub struct Signal {
    notify: Notify,
    /// When a write into a followed file was last seen (nanoseconds since
    /// [`epoch`], plus one; 0: none) with no close after writing since:
    /// the file may be half written (a script's `>` redirection, a slow
    /// copy). Renames and new files clear it, and it lapses after
    /// [`MAX_WRITE_WAIT`] (a writer that keeps the file open).
    written_at: AtomicU64,
}

/// The start of the clock [`Signal`] keeps its times on.
fn epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

impl Signal {
    /// A signal no one has raised.
    pub fn new() -> Signal {
        Signal::default()
    }

    /// Asks for a reload attempt.
    pub fn notify(&self) {
        self.notify.notify_one();
    }

    /// Waits for the next [`Signal::notify`] (or one made before this call
    /// and not yet waited for).
    pub async fn notified(&self) {
        self.notify.notified().await;
    }

    /// Whether a followed file is being written in place: written into
    /// less than [`MAX_WRITE_WAIT`] ago and not closed since.
    pub fn writing(&self) -> bool {
        self.writing_at(epoch().elapsed().as_nanos())
    }

    /// [`Signal::writing`] when the clock reads `now` (nanoseconds since
    /// [`epoch`]).
    fn writing_at(&self, now: u128) -> bool {
        match self.written_at.load(Ordering::Relaxed) {
            0 => false,
            at => now.saturating_sub(u128::from(at - 1)) < MAX_WRITE_WAIT.as_nanos(),
        }
    }

    fn set_writing(&self, writing: bool) {
        let at = if writing {
            u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX - 1) + 1
        } else {
            0
        };
        self.written_at.store(at, Ordering::Relaxed);
    }
}

/// The directories to watch for a file, and the names in them that matter.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Plan {
    /// The file's directory first, then the directories of links on the
    /// way and where they point.
    dirs: Vec<PathBuf>,
    /// The file's name, its target's name (if a link), and the names of
    /// directory links on its path.
    names: Vec<std::ffi::OsString>,
    /// Each directory's identity (device and inode, through links) when
    /// the plan was made: a directory renamed away, replaced, or a link
    /// re-pointed, changes it.
    ids: Vec<Option<(u64, u64)>>,
    /// False when the path is a link whose target is gone: where it will
    /// reappear is not known, so the plan is made again until it resolves.
    complete: bool,
}

/// The device and inode `m` describes ((0, 0) where there are none).
fn file_id(m: &std::fs::Metadata) -> (u64, u64) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        (m.dev(), m.ino())
    }
    #[cfg(not(unix))]
    {
        let _ = m;
        (0, 0)
    }
}

fn dir_id(dir: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(dir).ok().as_ref().map(file_id)
}

impl Plan {
    fn of(path: &Path) -> Plan {
        let path = absolute(path);
        let parent = path
            .parent()
            .map_or_else(|| PathBuf::from("/"), Path::to_owned);
        let mut dirs = vec![parent.clone()];
        let mut names: Vec<std::ffi::OsString> =
            path.file_name().map(|n| n.to_owned()).into_iter().collect();
        // A directory link on the way (`current -> v2`): re-pointing it
        // moves the file, and shows only in the link's own directory.
        let mut prefix = PathBuf::new();
        for component in parent.components() {
            prefix.push(component);
            if std::fs::symlink_metadata(&prefix).is_ok_and(|m| m.file_type().is_symlink())
                && let (Some(dir), Some(name)) = (prefix.parent(), prefix.file_name())
            {
                dirs.push(dir.to_owned());
                names.push(name.to_owned());
            }
        }
        let canonical = std::fs::canonicalize(&path);
        let complete = canonical.is_ok()
            || !std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink());
        if let Ok(canonical) = canonical
            && let Some(target_dir) = canonical.parent()
        {
            let parent_canonical = std::fs::canonicalize(&parent).unwrap_or(parent.clone());
            if target_dir != parent_canonical {
                // Kubernetes volumes point into a timestamped `..` directory
                // that each update replaces by swapping the `..data` link
                // beside it: that is where to look, not inside the
                // directory about to go.
                let kubernetes = target_dir
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(".."));
                match target_dir.parent() {
                    Some(volume) if kubernetes => {
                        if volume != parent_canonical {
                            dirs.push(volume.to_owned());
                        }
                    }
                    _ => {
                        dirs.push(target_dir.to_owned());
                        names.extend(canonical.file_name().map(|n| n.to_owned()));
                    }
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        dirs.retain(|d| seen.insert(d.clone()));
        let ids = dirs.iter().map(|d| dir_id(d)).collect();
        Plan {
            dirs,
            names,
            ids,
            complete,
        }
    }

    /// Whether `path`, named in an event, is a followed file (not one of
    /// the directories).
    fn is_file(&self, path: &Path) -> bool {
        self.is_named(path) && !self.is_dir(path)
    }

    /// Whether an event about `path` may change what the file holds.
    fn matters(&self, path: &Path) -> bool {
        self.is_dir(path)
            || self.is_named(path)
            // Kubernetes atomic writer: `..data`, `..data_tmp`.
            || path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".."))
    }

    /// Whether `path` bears one of the names that matter.
    fn is_named(&self, path: &Path) -> bool {
        path.file_name()
            .is_some_and(|n| self.names.iter().any(|m| m == n))
    }

    /// Whether `path` is one of the watched directories.
    fn is_dir(&self, path: &Path) -> bool {
        self.dirs.iter().any(|d| d == path)
    }
}

/// A filesystem watch that signals on relevant events, and follows the
/// file's directories when they are replaced ([`Watch::refresh`]).
pub struct Watch {
    path: PathBuf,
    signal: Arc<Signal>,
    /// Set by an event about a watched directory itself (renamed away or
    /// removed): its watch is no longer where the file is, even if a new
    /// directory got the same inode number.
    stale: Arc<std::sync::atomic::AtomicBool>,
    current: Mutex<Watching>,
}

/// A watcher, the plan it follows, and the directories it could watch.
struct Watching {
    _watcher: notify::RecommendedWatcher,
    plan: Plan,
    watched: Vec<PathBuf>,
}

impl Watching {
    /// Whether it watches everything the file's changes can show in.
    fn whole(&self) -> bool {
        self.plan.complete && self.watched.len() == self.plan.dirs.len()
    }
}

impl std::fmt::Debug for Watch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watch")
            .field("dirs", &self.dirs())
            .finish_non_exhaustive()
    }
}

impl Watch {
    /// Watches the directory holding `path`; if `path` is a symlink into
    /// another directory tree, the directory of its target too (for a
    /// Kubernetes volume, the volume's directory); and the directory of
    /// every directory link on its way.
    pub fn start(path: &Path, signal: Arc<Signal>) -> notify::Result<Watch> {
        let stale = Arc::default();
        let current = watch(Plan::of(path), Arc::clone(&signal), Arc::clone(&stale))?;
        Ok(Watch {
            path: path.to_owned(),
            signal,
            stale,
            current: Mutex::new(current),
        })
    }

    /// Whether every directory the file's changes can show in is watched.
    pub fn is_whole(&self) -> bool {
        self.lock().whole()
    }

    /// Directories being watched.
    pub fn dirs(&self) -> Vec<PathBuf> {
        self.lock().watched.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Watching> {
        self.current.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Watches afresh if the directories to watch are no longer those
    /// watched (a directory renamed away or replaced, a link re-pointed,
    /// a Kubernetes volume's data directory swapped) and signals then, as
    /// a change may have gone unseen. Whether it did. Blocking (a few
    /// `stat`s); call it off the serving threads. On an error (the file's
    /// directory missing for the moment) the old watch stays, marked stale,
    /// and the caller tries again.
    ///
    /// A watch that is not whole (a directory it could not watch, a link
    /// whose target is gone) is made again at every call, and reported as
    /// an error so that the caller keeps calling (and polls meanwhile).
    pub fn refresh(&self) -> notify::Result<bool> {
        let plan = Plan::of(&self.path);
        let stale = self.stale.swap(false, Ordering::Relaxed);
        let (same, whole) = {
            let current = self.lock();
            (current.plan == plan, current.whole())
        };
        let moved = !same || stale;
        if !moved && whole {
            return Ok(false);
        }
        if moved {
            tracing::info!(dirs = ?plan.dirs, "the key file's directories changed; watching them afresh");
        }
        let fresh = match watch(plan, Arc::clone(&self.signal), Arc::clone(&self.stale)) {
            Ok(w) => w,
            Err(e) => {
                self.stale.store(true, Ordering::Relaxed);
                return Err(e);
            }
        };
        let whole = fresh.whole();
        *self.lock() = fresh;
        if moved {
            // A write seen by the old watch may never see its close, and a
            // change may have gone unseen.
            self.signal.set_writing(false);
            self.signal.notify();
        }
        if !whole {
            return Err(notify::Error::generic(
                "not every directory the key file's changes show in is watched",
            ));
        }
        Ok(true)
    }
}

/// A watcher of `plan`'s directories, raising `signal`, and setting `stale`
/// when a watched directory itself is renamed or removed. The file's own
/// directory must be watched; the others are watched where they can be (a
/// directory that may be passed through but not read refuses a watch).
fn watch(
    plan: Plan,
    signal: Arc<Signal>,
    stale: Arc<std::sync::atomic::AtomicBool>,
) -> notify::Result<Watching> {
    use notify::event::{AccessKind, AccessMode, ModifyKind};
    let seen = plan.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let ev = match res {
            Ok(ev) => ev,
            // An error may mean lost events: reload to be safe.
            Err(_) => return signal.notify(),
        };
        if ev.need_rescan() || ev.paths.is_empty() {
            signal.set_writing(false);
            return signal.notify();
        }
        let file = ev.paths.iter().any(|p| seen.is_file(p));
        match ev.kind {
            // Written into: more may follow until the writer closes it.
            EventKind::Modify(ModifyKind::Data(_) | ModifyKind::Any) if file => {
                signal.set_writing(true);
            }
            EventKind::Access(AccessKind::Close(AccessMode::Write)) if file => {
                signal.set_writing(false);
            }
            EventKind::Access(_) => return,
            // Renamed into place, created, removed: whole files.
            EventKind::Create(_)
            | EventKind::Remove(_)
            | EventKind::Modify(ModifyKind::Name(_))
                if file =>
            {
                signal.set_writing(false);
            }
            _ => {}
        }
        if matches!(
            ev.kind,
            EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_))
        ) && ev.paths.iter().any(|p| seen.is_dir(p))
        {
            stale.store(true, Ordering::Relaxed);
        }
        if ev.paths.iter().any(|p| seen.matters(p)) {
            signal.notify();
        }
    })?;
    let mut watched = Vec::with_capacity(plan.dirs.len());
    for (i, dir) in plan.dirs.iter().enumerate() {
        match watcher.watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => watched.push(dir.clone()),
            Err(e) if i == 0 => return Err(e),
            Err(e) => tracing::debug!(
                dir = %dir.display(),
                error = %e,
                "cannot watch a directory on the key file's way"
            ),
        }
    }
    Ok(Watching {
        _watcher: watcher,
        plan,
        watched,
    })
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

/// How the reloader learns about changes.
#[derive(Debug)]
pub struct ReloadSettings {
    /// The watch raising the loop's signal, refreshed after every attempt
    /// and poll tick ([`Watch::refresh`]); `None` when not watching.
    pub watch: Option<Arc<Watch>>,
    /// Poll the file's metadata this often (`None` disables polling).
    pub poll_interval: Option<Duration>,
    /// Reload on SIGHUP (see [`listen_sighup`]).
    #[cfg(unix)]
    pub sighup: Option<tokio::signal::unix::Signal>,
}

/// Installs the SIGHUP handler. Call it before announcing readiness: until
/// it is installed, SIGHUP's default action terminates the process.
#[cfg(unix)]
pub fn listen_sighup() -> Option<tokio::signal::unix::Signal> {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; reload by signal is off");
            None
        }
    }
}

/// How long a reload runs at background priority (see [`crate::priority`])
/// before it may be raised to normal priority: from then on it is raised as
/// soon as its threads are starved (see [`STARVED_BELOW`]). Short enough
/// that a revocation lands within a second on a machine whose CPUs are all
/// busy, where a thread at background priority gets next to nothing: a
/// starved reload of a small file is raised after about 0.5–0.6 s and then
/// takes milliseconds.
pub const RAISE_AFTER: Duration = Duration::from_millis(500);

/// How often a long reload's progress is sampled: often enough that few of
/// its short-lived threads start and end between two looks unseen.
const PROGRESS_SAMPLE: Duration = Duration::from_millis(100);

/// The span over which a reload's progress is judged.
const PROGRESS_WINDOW: Duration = Duration::from_millis(300);

// The first look at a reload's progress only sets a baseline, taken at the
// first sample rather than at the start (see `wait_for_reload`): that is
// sound while no decision reaches back to it.
const _: () =
    assert!(RAISE_AFTER.as_millis() > PROGRESS_SAMPLE.as_millis() + PROGRESS_WINDOW.as_millis());

/// A reload whose background threads got less than this share of one CPU
/// over the last [`PROGRESS_WINDOW`] is starved: the checks leave it too
/// little spare CPU to finish soon, so it is raised.
const STARVED_BELOW_CPU_SHARE: f64 = 0.25;

/// However well it progresses, a reload still running after this long is
/// raised, so that a revocation lands within a bound.
pub const RAISE_ANYWAY_AFTER: Duration = Duration::from_secs(10);

/// Runs the reload loop until `stop` is set: waits for a watch signal, a
/// poll tick that saw a change, or SIGHUP, then reloads off the serving
/// threads, on a thread kept for reloads ([`ReloadThread`]) at background
/// priority (raised when it starves; see [`wait_for_reload`]).
pub async fn run(
    reloader: Arc<Reloader>,
    signal: Arc<Signal>,
    settings: ReloadSettings,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    #[cfg(unix)]
    let mut hup = settings.sighup;
    let mut thread = ReloadThread::default();
    // Whether the watch is not whole or could not be set up afresh (made
    // again every WATCH_RETRY, polling the metadata meanwhile).
    let mut watch_broken = settings.watch.as_ref().is_some_and(|w| !w.is_whole());
    if watch_broken {
        tracing::warn!(
            "cannot watch every directory the key file's changes show in; \
             trying again and polling its metadata every {WATCH_RETRY:?}"
        );
    }
    // Poll ticks since the content was last compared.
    let mut quiet_ticks = 0u32;
    let mut poll = settings.poll_interval.map(|every| {
        // The first tick is one interval from now, not immediately.
        let mut i = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        i
    });
    loop {
        let hup_recv = async {
            #[cfg(unix)]
            if let Some(h) = hup.as_mut() {
                h.recv().await;
                return;
            }
            std::future::pending::<()>().await
        };
        let tick = async {
            match poll.as_mut() {
                Some(p) => {
                    p.tick().await;
                }
                None => std::future::pending::<()>().await,
            }
        };
        let stopped = async {
            let _ = stop.wait_for(|s| *s).await;
        };
        let retry = async {
            if watch_broken {
                tokio::time::sleep(WATCH_RETRY).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let trigger = tokio::select! {
            () = stopped => return,
            () = retry => {
                watch_broken = !refresh(settings.watch.as_ref(), watch_broken).await;
                // Meanwhile the file's metadata is polled as often.
                if reloader.settled_change() == PollSays::Changed {
                    Trigger::Poll
                } else {
                    continue;
                }
            }
            () = signal.notified() => {
                debounce(&signal).await;
                Trigger::Watch
            }
            () = tick => {
                quiet_ticks += 1;
                watch_broken = !refresh(settings.watch.as_ref(), watch_broken).await;
                let says = reloader.settled_change();
                if says == PollSays::Changed {
                    quiet_ticks = 0;
                    Trigger::Poll
                } else if says == PollSays::Unchanged && quiet_ticks >= CONTENT_POLL_EVERY {
                    quiet_ticks = 0;
                    let r = Arc::clone(&reloader);
                    match tokio::task::spawn_blocking(move || r.content_changed()).await {
                        Ok(true) => Trigger::Poll,
                        _ => continue,
                    }
                } else {
                    continue;
                }
            }
            () = hup_recv => Trigger::Signal,
        };
        match thread.start(&reloader, trigger) {
            Ok(mut rx) => match wait_for_reload(&mut rx).await {
                // Half written, most likely: once more after the next
                // quiet spell (a poll's next tick looks again by itself).
                Ok(Outcome::Changing) if trigger != Trigger::Poll => signal.notify(),
                Ok(_) => {}
                Err(_) => tracing::error!("reload thread failed"),
            },
            Err(e) => tracing::error!(error = %e, "cannot start a reload thread"),
        }
        watch_broken = !refresh(settings.watch.as_ref(), watch_broken).await;
    }
}

/// [`Watch::refresh`], off the serving threads; whether the watch is
/// sound. A failure is logged as a warning when it follows a success
/// (`broken` false), else quietly: it is retried every [`WATCH_RETRY`].
async fn refresh(watch: Option<&Arc<Watch>>, broken: bool) -> bool {
    let Some(watch) = watch else { return true };
    let watch = Arc::clone(watch);
    let error = match tokio::task::spawn_blocking(move || watch.refresh()).await {
        Ok(Ok(_)) => return true,
        Ok(Err(e)) => e.to_string(),
        Err(e) => e.to_string(),
    };
    if broken {
        tracing::debug!(%error, "still cannot watch the key file's directories");
    } else {
        tracing::warn!(
            %error,
            "cannot watch the key file's directories afresh; trying again every {WATCH_RETRY:?}"
        );
    }
    false
}

/// A reload and where its outcome goes.
type Job = (Trigger, tokio::sync::oneshot::Sender<Outcome>);

/// How long the memory a reload freed (the file's bytes, the parser's
/// records, the replaced ring) is kept for the next reload once the reload
/// thread has nothing to do; then it goes back to the system, and the
/// resident set to its steady state. A run of reloads (a storm of writes,
/// a script rotating keys one client at a time) reuses memory it already
/// holds instead of faulting in fresh pages: see `pages::keep_freed`.
pub const KEEP_MEMORY_FOR: Duration = Duration::from_secs(5);

/// The thread reloads run on, started at the first reload and kept.
///
/// Starting a thread per reload cost a serving thread the `clone` (the
/// reload loop runs on one), and the new thread ran at normal priority until
/// it lowered itself. A thread that dies (a reload that panicked) is
/// replaced at the next reload. It keeps the memory reloads free until it
/// has been idle for `keep_memory_for` ([`KEEP_MEMORY_FOR`]).
struct ReloadThread {
    jobs: Option<std::sync::mpsc::Sender<Job>>,
    keep_memory_for: Duration,
}

impl Default for ReloadThread {
    fn default() -> ReloadThread {
        ReloadThread::keeping_memory_for(KEEP_MEMORY_FOR)
    }
}

impl ReloadThread {
    /// A reload thread, not started yet, that keeps the memory reloads free
    /// until it has been idle for `keep_memory_for`.
    fn keeping_memory_for(keep_memory_for: Duration) -> ReloadThread {
        ReloadThread {
            jobs: None,
            keep_memory_for,
        }
    }

    /// Hands a reload to the thread, starting it if there is none; returns
    /// where the outcome will arrive.
    fn start(
        &mut self,
        reloader: &Arc<Reloader>,
        trigger: Trigger,
    ) -> std::io::Result<tokio::sync::oneshot::Receiver<Outcome>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut job = (trigger, tx);
        if let Some(jobs) = &self.jobs {
            match jobs.send(job) {
                Ok(()) => return Ok(rx),
                // The thread is gone: start another one.
                Err(std::sync::mpsc::SendError(back)) => job = back,
            }
        }
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        let reloader = Arc::clone(reloader);
        let keep_memory_for = self.keep_memory_for;
        std::thread::Builder::new()
            .name("keyward-reload".into())
            .spawn(move || {
                use std::sync::mpsc::RecvTimeoutError;
                /// Returns the kept memory when the thread ends, even by a
                /// panic.
                struct ReturnKept;
                impl Drop for ReturnKept {
                    fn drop(&mut self) {
                        crate::pages::release_kept();
                    }
                }
                let _return_kept = ReturnKept;
                let mut keeping = false;
                loop {
                    let next = if keeping {
                        queue.recv_timeout(keep_memory_for)
                    } else {
                        queue.recv().map_err(|_| RecvTimeoutError::Disconnected)
                    };
                    let (trigger, done) = match next {
                        Ok(job) => job,
                        Err(RecvTimeoutError::Timeout) => {
                            let bytes = crate::pages::release_kept();
                            tracing::debug!(bytes, "memory kept for reloads returned");
                            keeping = false;
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => break,
                    };
                    // Again for every reload: a reload that starved was
                    // raised to normal priority (see `wait_for_reload`).
                    crate::priority::lower_current();
                    crate::pages::keep_freed();
                    keeping = true;
                    let _ = done.send(reloader.reload(trigger));
                }
            })?;
        // The thread has not started receiving yet; the job waits for it.
        jobs.send(job)
            .map_err(|_| std::io::Error::other("reload thread exited"))?;
        self.jobs = Some(jobs);
        Ok(rx)
    }
}

/// Waits for the reload running on its own thread. It stays at background
/// priority while its threads progress on the spare CPU; once it has run
/// for [`RAISE_AFTER`], it is raised to normal priority when they are
/// starved (or when the kernel cannot say), and in any case after
/// [`RAISE_ANYWAY_AFTER`], so that the change lands under any load.
async fn wait_for_reload(
    rx: &mut tokio::sync::oneshot::Receiver<Outcome>,
) -> Result<Outcome, tokio::sync::oneshot::error::RecvError> {
    let started = tokio::time::Instant::now();
    // Looking at the background threads' CPU time reads `/proc` on this
    // thread, which serves checks too: a dozen or more system calls. Most
    // reloads end before the first sample, so the baseline is taken then,
    // not now; no decision comes before RAISE_AFTER, and by then the
    // window no longer reaches back to the first sample.
    let mut progress: Option<crate::priority::BackgroundProgress> = None;
    // Samples of the last window: when each was taken and the CPU the
    // background threads used since the one before (`None`: unknown).
    let mut samples: std::collections::VecDeque<(tokio::time::Instant, Option<Duration>)> =
        std::collections::VecDeque::new();
    loop {
        match tokio::time::timeout(PROGRESS_SAMPLE, &mut *rx).await {
            Ok(done) => return done,
            Err(_) => {
                let now = tokio::time::Instant::now();
                let used = match progress.as_mut() {
                    Some(p) => p.advance(),
                    None => {
                        progress = Some(crate::priority::BackgroundProgress::start());
                        None
                    }
                };
                samples.push_back((now, used));
                // Keep the samples that cover the last window (the oldest
                // kept marks where it starts).
                while samples
                    .get(1)
                    .is_some_and(|&(at, _)| now.duration_since(at) >= PROGRESS_WINDOW)
                {
                    samples.pop_front();
                }
                let running = started.elapsed();
                if running < RAISE_AFTER {
                    continue;
                }
                let (since, _) = samples[0];
                let span = now.duration_since(since);
                // The first sample's CPU came before `since`.
                let used: Option<Duration> = samples.iter().skip(1).map(|&(_, u)| u).sum();
                let starved = span.is_zero()
                    || used.is_none_or(|u| {
                        u.as_secs_f64() < span.as_secs_f64() * STARVED_BELOW_CPU_SHARE
                    });
                if starved || running >= RAISE_ANYWAY_AFTER {
                    let raised = crate::priority::raise_background();
                    if raised > 0 {
                        tracing::info!(
                            raised,
                            running_ms = running.as_millis(),
                            background_cpu_ms = used.map(|u| u.as_millis()),
                            window_ms = span.as_millis(),
                            "reload {} raised to normal priority",
                            if starved {
                                "starved of CPU;"
                            } else {
                                "still running;"
                            }
                        );
                    }
                    return rx.await;
                }
            }
        }
    }
}

/// Waits until events stop arriving for [`DEBOUNCE`] (at most [`MAX_DEBOUNCE`]).
/// Waits for a burst of events to end: [`DEBOUNCE`] of quiet, at most
/// [`MAX_DEBOUNCE`]; while the file is being written in place, until the
/// writer closes it, or after [`WRITE_QUIET`] of quiet, at most
/// [`MAX_WRITE_WAIT`].
async fn debounce(signal: &Signal) {
    let started = tokio::time::Instant::now();
    loop {
        let quiet = if signal.writing() {
            WRITE_QUIET
        } else {
            DEBOUNCE
        };
        tokio::select! {
            () = signal.notified() => {
                // Asked after the event: a write that began with it
                // postpones the reload as much as one under way before.
                let most = if signal.writing() {
                    MAX_WRITE_WAIT
                } else {
                    MAX_DEBOUNCE
                };
                if started.elapsed() >= most {
                    return;
                }
            }
            () = tokio::time::sleep(quiet) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::{RingSource, UsageRegistry};

    fn key(id: &str, secret: &str, extra: &str) -> String {
        format!(
            "[[keys]]\nid = \"{id}\"\nclient = \"c\"\nsha256 = \"{}\"\n{extra}\n",
            hex::encode(crate::decide::digest(secret))
        )
    }

    fn setup(text: &str) -> (tempfile::TempDir, PathBuf, Reloader, Arc<Shared>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        std::fs::write(&path, text).unwrap();
        let (file, bytes) = keyfile::load(&path, ParseOptions::default()).unwrap();
        let usage = UsageRegistry::default();
        let source = RingSource {
            generation: 1,
            sha256: crate::decide::digest_bytes(&bytes),
            loaded_at: Timestamp::now(),
        };
        let ring = KeyRing::build(&file, source, &usage, None);
        let shared = Arc::new(Shared::new(ring, usage, Default::default()));
        let r = Reloader::new(path.clone(), ParseOptions::default(), Arc::clone(&shared));
        (dir, path, r, shared)
    }

    /// Ids of this process's threads named `keyward-reload`.
    #[cfg(target_os = "linux")]
    fn reload_threads() -> Vec<String> {
        std::fs::read_dir("/proc/self/task")
            .map(|tasks| {
                tasks
                    .flatten()
                    .filter(|t| {
                        std::fs::read_to_string(t.path().join("comm"))
                            .is_ok_and(|c| c.trim() == "keyward-reload")
                    })
                    .map(|t| t.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn a_reload_drops_the_counters_of_removed_keys_only() {
        let (_d, path, mut r, shared) = setup(&(key("a", "sa", "") + &key("b", "sb", "")));
        r.release_wait = Duration::from_millis(50);
        let used = |id: &str| {
            let ring = shared.ring.load();
            let key = ring.by_id(id).unwrap();
            key.record_use(5);
            key.usage().denied[0].fetch_add(1, Ordering::Relaxed);
        };
        used("a");
        used("b");
        let allowed = |id: &str| {
            let view = shared.ring.usage_view();
            let key = view.ring().by_id(id).unwrap();
            (view.requests(key), view.last_used(key))
        };
        assert_eq!(shared.usage.len(), 2);
        let count = |id: &str| {
            let ring = shared.ring.load();
            let key = ring.by_id(id).unwrap();
            key.usage_if_used()
                .map(|u| u.denied[0].load(Ordering::Relaxed))
        };

        std::fs::write(&path, key("a", "sa", "") + &key("c", "sc", "")).unwrap();
        assert_eq!(
            r.reload(Trigger::Watch),
            Outcome::Published { generation: 2 }
        );
        assert_eq!(shared.usage.len(), 1, "b's counters are gone");
        assert_eq!(count("a"), Some(1), "a's survive");
        assert_eq!(allowed("a"), (1, Some(5)), "folded into the new ring");
        assert_eq!(allowed("c"), (0, None));

        // A check that holds the ring past the wait: counters it creates for
        // a key the next ring drops are caught once it lets go.
        let held = shared.ring.load_full();
        std::fs::write(&path, key("a", "sa", "") + &key("d", "sd", "")).unwrap();
        assert_eq!(
            r.reload(Trigger::Watch),
            Outcome::Published { generation: 3 }
        );
        let _ = held.by_id("c").unwrap().usage();
        assert_eq!(shared.usage.len(), 2, "c's counters, made after the reload");
        drop(held);
        std::fs::write(&path, key("a", "sa", "") + &key("e", "se", "")).unwrap();
        assert_eq!(
            r.reload(Trigger::Watch),
            Outcome::Published { generation: 4 }
        );
        assert_eq!(shared.usage.len(), 1, "c's counters are gone too");
        assert_eq!(count("a"), Some(1));
        assert!(r.memory().held.is_empty());
    }

    #[tokio::test]
    async fn only_a_reload_still_running_at_the_first_sample_is_watched() {
        let starts = || crate::priority::STARTS.with(std::cell::Cell::get);
        let before = starts();
        // Done before its first sample: no look at /proc from this thread.
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        tx.send(Outcome::Unchanged).unwrap();
        assert_eq!(wait_for_reload(&mut rx).await.unwrap(), Outcome::Unchanged);
        assert_eq!(starts(), before);

        // Still running at the first sample: the watch starts then, once.
        // The reload "ends" only after that, or after a deadline, which
        // the assertion then reports.
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let ender = tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while starts() == before && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // Across more samples than the first.
            tokio::time::sleep(PROGRESS_SAMPLE * 2).await;
            let _ = tx.send(Outcome::Unchanged);
        });
        assert_eq!(wait_for_reload(&mut rx).await.unwrap(), Outcome::Unchanged);
        ender.await.unwrap();
        assert_eq!(starts(), before + 1);
    }

    /// The locks a test of reload threads holds: the threads switch
    /// keeping freed memory on and off (see `pages::keep_freed`), and lower
    /// themselves (tests check their priority: no other may change it).
    fn reload_thread_locks() -> (
        std::sync::MutexGuard<'static, ()>,
        std::sync::MutexGuard<'static, ()>,
    ) {
        let keeping = crate::pages::tests::KEEPING
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let serial = crate::priority::tests::SERIAL
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        (keeping, serial)
    }

    /// A reload by `reloader` on `thread`, waited for.
    fn reload_on(thread: &mut ReloadThread, reloader: &Arc<Reloader>) -> Outcome {
        thread
            .start(reloader, Trigger::Watch)
            .unwrap()
            .blocking_recv()
            .unwrap()
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn reloads_run_on_one_kept_thread_replaced_when_it_is_gone() {
        let _locks = reload_thread_locks();
        let (_d, path, r, shared) = setup(&key("a", "sa", ""));
        let r = Arc::new(r);
        let mut thread = ReloadThread::keeping_memory_for(Duration::ZERO);
        let run = |thread: &mut ReloadThread| reload_on(thread, &r);
        assert_eq!(run(&mut thread), Outcome::Unchanged);
        let first = reload_threads();
        assert_eq!(first.len(), 1, "{first:?}");
        std::fs::write(&path, key("a", "sa", "") + &key("b", "sb", "")).unwrap();
        assert_eq!(run(&mut thread), Outcome::Published { generation: 2 });
        assert_eq!(reload_threads(), first, "the same thread ran both");
        assert_eq!(shared.ring.load().len(), 2);

        // A reload raised to normal priority (it starved) leaves the thread
        // raised; the next reload lowers it again.
        let tid: libc::pid_t = first[0].parse().unwrap();
        // SAFETY: sched_getscheduler takes a thread id and returns an integer.
        let policy = || unsafe { libc::sched_getscheduler(tid) };
        if policy() == libc::SCHED_IDLE {
            assert!(crate::priority::set_policy(tid, libc::SCHED_OTHER));
            assert_eq!(run(&mut thread), Outcome::Unchanged);
            assert_eq!(policy(), libc::SCHED_IDLE, "lowered again");
        } else {
            // Where SCHED_IDLE could not be undone the thread got a nice
            // value instead, and keeps it.
            // SAFETY: getpriority takes plain integers.
            let nice = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t) };
            assert_eq!(nice, crate::priority::BACKGROUND_NICENESS);
        }

        // Its queue closed, the thread exits; the next reload starts another.
        drop(thread.jobs.take());
        until("the thread exits", || reload_threads().is_empty());
        thread.jobs = Some(std::sync::mpsc::channel().0);
        std::fs::write(&path, key("b", "sb", "")).unwrap();
        assert_eq!(run(&mut thread), Outcome::Published { generation: 3 });
        let second = reload_threads();
        assert_eq!(second.len(), 1, "{second:?}");
        assert_ne!(second, first);
        end_reload_thread(thread);
        assert!(!crate::pages::keeping());
    }

    /// Polls `done` until it holds; fails after 10 s.
    fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what}: timed out");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn memory_freed_is_kept_while_reloads_may_follow_and_returned_after() {
        use std::alloc::{GlobalAlloc, Layout};
        let _locks = reload_thread_locks();
        let (_d, path, r, _shared) = setup(&key("a", "sa", ""));
        let r = Arc::new(r);
        let run = |thread: &mut ReloadThread| reload_on(thread, &r);
        let large = Layout::from_size_align(crate::pages::LARGE, 8).unwrap();

        // After a reload, blocks freed anywhere are kept.
        let mut thread = ReloadThread::keeping_memory_for(Duration::from_secs(3600));
        std::fs::write(&path, key("a", "sa", "") + &key("b", "sb", "")).unwrap();
        assert_eq!(run(&mut thread), Outcome::Published { generation: 2 });
        assert!(crate::pages::keeping());
        // SAFETY: a non-zero layout; the block is freed with it.
        unsafe {
            let block = crate::pages::LargePages.alloc(large);
            assert!(!block.is_null());
            crate::pages::LargePages.dealloc(block, large);
        }
        assert!(crate::pages::kept_bytes() >= large.size());
        // A thread that exits returns them.
        end_reload_thread(thread);
        assert!(!crate::pages::keeping());
        assert_eq!(crate::pages::kept_bytes(), 0);

        // So does a thread idle for its `keep_memory_for`.
        let mut thread = ReloadThread::keeping_memory_for(Duration::from_millis(50));
        std::fs::write(&path, key("b", "sb", "")).unwrap();
        assert_eq!(run(&mut thread), Outcome::Published { generation: 3 });
        until("the idle thread returns the memory", || {
            !crate::pages::keeping() && crate::pages::kept_bytes() == 0
        });
        end_reload_thread(thread);
    }

    /// Closes `thread`'s queue and waits for the thread to exit (it returns
    /// the memory it kept), so that it cannot act once the test's locks
    /// are let go.
    fn end_reload_thread(mut thread: ReloadThread) {
        drop(thread.jobs.take());
        until("the reload thread exits", || reload_threads().is_empty());
    }

    #[test]
    fn publishes_valid_changes_and_skips_identical_content() {
        let (_d, path, r, shared) = setup(&key("a", "sa", ""));
        assert_eq!(r.reload(Trigger::Signal), Outcome::Unchanged);
        std::fs::write(&path, key("a", "sa", "") + &key("b", "sb", "")).unwrap();
        assert_eq!(
            r.reload(Trigger::Watch),
            Outcome::Published { generation: 2 }
        );
        let ring = shared.ring.load();
        assert_eq!(ring.len(), 2);
        assert_eq!(
            ring.file_sha256().unwrap(),
            crate::decide::digest_bytes(&std::fs::read(&path).unwrap())
        );
        assert_eq!(shared.reloads.success.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_reload_on_one_thread_publishes_with_its_digest() {
        // The audit records, as the log would show them.
        #[derive(Clone, Default)]
        struct Records(Arc<Mutex<Vec<u8>>>);
        impl Write for Records {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        use std::io::Write;
        let records = Records::default();
        let writer = records.clone();
        let capture = tracing::Dispatch::new(
            tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .finish(),
        );
        // With a single subscriber registered in the process, tracing works
        // out whether a log statement is wanted with the default subscriber
        // of whichever thread reaches it first, and remembers the answer for
        // all threads: a reload in a concurrent test, on a thread without a
        // subscriber, would silence the audit record here. With a second
        // one registered, every subscriber is asked.
        let _second = tracing::Dispatch::new(tracing::subscriber::NoSubscriber::default());
        let (_d, path, r, shared) = setup(&key("a", "sa", ""));
        let options = ParseOptions {
            threads: keyfile::Threads::new(1),
            ..ParseOptions::default()
        };
        let r =
            Reloader::new(r.path().to_owned(), options, Arc::clone(&shared)).defer_digest_from(0);
        // The first reload does not know the serving file's fingerprint, so
        // it waits for the digest before it publishes; the second does not.
        std::fs::write(&path, key("a", "sa", "") + &key("c", "sc", "")).unwrap();
        assert_eq!(
            r.reload(Trigger::Watch),
            Outcome::Published { generation: 2 }
        );
        // Long enough to hash that the audit diff of two keys, were it not
        // waiting, would be written first.
        let padding = format!("# {}\n", "x".repeat(8 << 20));
        std::fs::write(&path, key("a", "sa", "") + &key("b", "sb", "") + &padding).unwrap();
        let outcome = tracing::dispatcher::with_default(&capture, || r.reload(Trigger::Watch));
        assert_eq!(outcome, Outcome::Published { generation: 3 });
        let ring = shared.ring.load_full();
        assert!(ring.by_id("b").is_some());
        let sha256 = hex::encode(crate::decide::digest_bytes(&std::fs::read(&path).unwrap()));
        assert_eq!(ring.file_sha256().map(hex::encode), Some(sha256.clone()));
        // The hash ran before the audit record, which carries it: no
        // "pending", and no second record for the digest.
        let log = String::from_utf8(records.0.lock().unwrap().clone()).unwrap();
        let published: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("key ring published"))
            .collect();
        assert_eq!(published.len(), 1, "{log}");
        assert!(published[0].contains(&format!("sha256={sha256}")), "{log}");
        assert!(!log.contains("key ring file digest"), "{log}");
    }

    #[test]
    fn a_ring_is_published_before_its_digest_is_known() {
        let (_d, path, r, shared) = setup(&key("a", "sa", ""));
        let r = r.defer_digest_from(0);
        // The reloader does not know the serving file's fingerprint: the
        // digests decide that identical content is unchanged.
        assert_eq!(r.reload(Trigger::Signal), Outcome::Unchanged);
        std::fs::write(&path, key("a", "sa", "") + &key("b", "sb", "")).unwrap();
        assert_eq!(
            r.reload(Trigger::Watch),
            Outcome::Published { generation: 2 }
        );
        // Filled in by the time the attempt returns.
        let ring = shared.ring.load_full();
        assert_eq!(
            ring.file_sha256(),
            Some(crate::decide::digest_bytes(&std::fs::read(&path).unwrap()))
        );
        // Now the fingerprint is known: same bytes, no new ring; a change of
        // the same length is still seen.
        assert_eq!(r.reload(Trigger::Poll), Outcome::Unchanged);
        std::fs::write(&path, key("a", "sa", "") + &key("c", "sc", "")).unwrap();
        assert_eq!(
            r.reload(Trigger::Watch),
            Outcome::Published { generation: 3 }
        );
        assert!(shared.ring.load().by_id("c").is_some());
        assert_eq!(shared.reloads.success.load(Ordering::Relaxed), 2);
        // A bad file is still reported once, by its digest.
        std::fs::write(&path, key("a", "sa", "stat = 1")).unwrap();
        assert!(matches!(r.reload(Trigger::Watch), Outcome::Failed(_)));
        assert_eq!(r.reload(Trigger::Poll), Outcome::Unchanged);
        assert_eq!(shared.reloads.failure.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_replaced_ring_is_freed_by_the_reloader_once_readers_let_go() {
        let (_d, _path, _r, shared) = setup(&key("a", "sa", ""));
        let reader = shared.ring.load_full();
        let ring = shared
            .ring
            .publish_shared(Arc::new(KeyRing::empty(RingSource {
                generation: 2,
                sha256: [0; 32],
                loaded_at: Timestamp::now(),
            })));
        let weak = Arc::downgrade(&ring);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            let _ = rx.recv();
            drop(reader);
        });
        let handle = shared.ring.clone();
        let release = std::thread::spawn(move || handle.retire(ring, crate::ring::RELEASE_WAIT));
        tx.send(()).unwrap();
        assert!(release.join().unwrap().is_none(), "released in time");
        holder.join().unwrap();
        assert!(weak.upgrade().is_none());
    }

    #[test]
    fn a_bad_file_keeps_the_ring_and_is_remembered_once() {
        let (_d, path, r, shared) = setup(&key("a", "sa", ""));
        std::fs::write(&path, key("a", "sa", "expire_at = 2027-01-01T00:00:00Z")).unwrap();
        let Outcome::Failed(msg) = r.reload(Trigger::Watch) else {
            panic!()
        };
        assert!(
            msg.contains("keys.toml:5:1: unknown field `expire_at`"),
            "{msg}"
        );
        assert_eq!(shared.ring.load().generation(), 1);
        assert_eq!(shared.reloads.last_error().unwrap().message, msg);
        // The same bad bytes are not re-reported.
        assert_eq!(r.reload(Trigger::Poll), Outcome::Unchanged);
        assert_eq!(shared.reloads.failure.load(Ordering::Relaxed), 1);
        // The next valid write is picked up and clears the error.
        std::fs::write(&path, key("b", "sb", "")).unwrap();
        assert_eq!(
            r.reload(Trigger::Watch),
            Outcome::Published { generation: 2 }
        );
        assert!(shared.reloads.last_error().is_none());
    }

    #[test]
    fn a_deleted_file_keeps_the_ring() {
        let (_d, path, r, shared) = setup(&key("a", "sa", ""));
        std::fs::remove_file(&path).unwrap();
        let Outcome::Failed(msg) = r.reload(Trigger::Watch) else {
            panic!()
        };
        assert!(msg.contains("cannot read key file"), "{msg}");
        assert_eq!(shared.ring.load().len(), 1);
        // Restoring the same content clears the error without a new generation.
        std::fs::write(&path, key("a", "sa", "")).unwrap();
        assert_eq!(r.reload(Trigger::Watch), Outcome::Unchanged);
        assert!(shared.reloads.last_error().is_none());
    }

    #[test]
    fn metadata_changes_are_noticed() {
        let (_d, path, r, _shared) = setup(&key("a", "sa", ""));
        assert_eq!(r.settled_change(), PollSays::Unchanged);
        std::fs::write(&path, key("a", "sa", "") + "# more\n").unwrap();
        assert_ne!(r.settled_change(), PollSays::Unchanged);
        r.reload(Trigger::Poll);
        assert_eq!(r.settled_change(), PollSays::Unchanged);
    }

    #[cfg(unix)]
    #[test]
    fn the_plan_watches_where_links_point_and_where_they_are() {
        use std::os::unix::fs::symlink;
        let root = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(root.path()).unwrap();
        // app/keys.toml -> vol/keys.toml -> ..data/keys.toml, with
        // ..data -> ..2026_A: a Kubernetes volume reached from elsewhere.
        let vol = root.join("vol");
        std::fs::create_dir_all(vol.join("..2026_A")).unwrap();
        std::fs::write(vol.join("..2026_A/keys.toml"), "").unwrap();
        symlink("..2026_A", vol.join("..data")).unwrap();
        symlink("..data/keys.toml", vol.join("keys.toml")).unwrap();
        std::fs::create_dir(root.join("app")).unwrap();
        symlink(vol.join("keys.toml"), root.join("app/keys.toml")).unwrap();
        let plan = Plan::of(&root.join("app/keys.toml"));
        assert_eq!(plan.dirs, [root.join("app"), vol.clone()]);
        assert!(plan.matters(&root.join("app")), "the directory itself");
        // Not the data directory, which the next update removes.
        assert!(plan.matters(&vol.join("..data")));
        // A directory link on the way: current -> v1.
        std::fs::create_dir(root.join("v1")).unwrap();
        std::fs::write(root.join("v1/keys.toml"), "").unwrap();
        symlink("v1", root.join("current")).unwrap();
        let plan = Plan::of(&root.join("current/keys.toml"));
        assert_eq!(plan.dirs, [root.join("current"), root.clone()]);
        assert!(plan.matters(&root.join("current")), "the link, re-pointed");
        assert!(plan.is_file(&root.join("current/keys.toml")));
        assert!(!plan.is_file(&root.join("current")));
        assert!(!plan.matters(&root.join("v1")));
        // Re-pointing the link changes the plan.
        std::fs::create_dir(root.join("v2")).unwrap();
        symlink("v2", root.join("next")).unwrap();
        std::fs::rename(root.join("next"), root.join("current")).unwrap();
        assert_ne!(Plan::of(&root.join("current/keys.toml")), plan);
        // A link whose target is gone: incomplete until it resolves.
        symlink(root.join("gone/keys.toml"), root.join("dangling.toml")).unwrap();
        assert!(!Plan::of(&root.join("dangling.toml")).complete);
        assert!(plan.complete);
    }

    #[test]
    fn a_watch_is_made_again_only_when_its_directories_change() {
        let root = tempfile::tempdir().unwrap();
        let current = root.path().join("current");
        std::fs::create_dir(&current).unwrap();
        std::fs::write(current.join("keys.toml"), "").unwrap();
        let signal = Arc::new(Signal::new());
        let watch = Watch::start(&current.join("keys.toml"), Arc::clone(&signal)).unwrap();
        assert!(watch.is_whole());
        assert!(!watch.refresh().unwrap(), "nothing changed");
        assert!(!watch.refresh().unwrap());
        // The directory renamed away: no directory to watch for now.
        std::fs::rename(&current, root.path().join("old")).unwrap();
        assert!(watch.refresh().is_err());
        // Another put in its place: watched afresh, then left alone.
        std::fs::create_dir(&current).unwrap();
        assert!(watch.refresh().unwrap());
        assert!(!watch.refresh().unwrap());
        assert_eq!(watch.dirs(), [current]);
    }

    #[test]
    fn a_write_in_progress_ends_with_its_close() {
        let signal = Signal::new();
        assert!(!signal.writing());
        signal.set_writing(true);
        assert!(signal.writing());
        signal.set_writing(false);
        assert!(!signal.writing());
        // It lapses after MAX_WRITE_WAIT (a writer that keeps the file open).
        signal.set_writing(true);
        let now = epoch().elapsed().as_nanos();
        assert!(signal.writing_at(now + MAX_WRITE_WAIT.as_nanos() / 2));
        assert!(!signal.writing_at(now + MAX_WRITE_WAIT.as_nanos()));
    }

    #[test]
    fn a_poll_waits_for_a_write_in_place_to_settle_but_not_for_a_rename() {
        use PollSays::{Changed, Settling, Unchanged};
        let (dir, path, r, _shared) = setup(&key("a", "sa", ""));
        assert_eq!(r.settled_change(), Unchanged);
        // Written in place: the first poll that sees it waits for the next.
        std::fs::write(&path, key("a", "sa", "") + &key("b", "sb", "")).unwrap();
        assert_eq!(r.settled_change(), Settling);
        assert_eq!(r.settled_change(), Changed, "the same metadata twice");
        // Written again between polls: it settles again.
        std::fs::write(&path, key("b", "sb", "")).unwrap();
        assert_eq!(r.settled_change(), Settling);
        std::fs::write(&path, key("b", "sb", "") + "# more\n").unwrap();
        assert_eq!(r.settled_change(), Settling, "changed since the last poll");
        assert_eq!(r.settled_change(), Changed);
        r.reload(Trigger::Poll);
        assert_eq!(r.settled_change(), Unchanged);
        // Another file renamed into place is whole at once.
        let tmp = dir.path().join("next.toml");
        std::fs::write(&tmp, key("c", "sc", "")).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(r.settled_change(), Changed);
        // A read that found the file changing is looked at again, even
        // with the metadata as it was.
        r.reload(Trigger::Poll);
        r.memory().look_again = true;
        assert_eq!(r.settled_change(), Settling);
        assert_eq!(r.settled_change(), Changed);
    }

    #[test]
    fn a_fifo_in_place_of_the_file_fails_the_reload_without_blocking() {
        let (dir, path, r, shared) = setup(&key("a", "sa", ""));
        std::fs::remove_file(&path).unwrap();
        crate::keyfile::tests::fifo(dir.path(), "keys.toml");
        let r = Arc::new(r);
        let (changed, outcome) = crate::keyfile::tests::promptly({
            let r = Arc::clone(&r);
            move || (r.content_changed(), r.reload(Trigger::Poll))
        });
        assert!(!changed);
        assert!(matches!(outcome, Outcome::Failed(_)), "{outcome:?}");
        assert_eq!(shared.ring.load().generation(), 1, "still serving");
        assert!(shared.ring.load().by_id("a").is_some());
    }

    #[test]
    fn a_change_that_keeps_the_metadata_is_found_by_its_content() {
        let (_d, path, r, _shared) = setup(&key("a", "sa", ""));
        assert!(!r.content_changed(), "the serving file");
        // Same length, same modification time: only the content tells.
        let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let edited = text.replacen("id = \"a\"", "id = \"b\"", 1);
        assert_eq!(edited.len(), text.len());
        std::fs::write(&path, &edited).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(modified)
            .unwrap();
        assert!(r.content_changed());
        assert_eq!(
            r.reload(Trigger::Poll),
            Outcome::Published { generation: 2 }
        );
        assert!(!r.content_changed(), "now serving");
        // A broken file is looked at once, not at every content poll.
        std::fs::write(&path, "[[keys]]\nid = \"b\"\n").unwrap();
        assert!(r.content_changed());
        assert!(matches!(r.reload(Trigger::Poll), Outcome::Failed(_)));
        assert!(!r.content_changed(), "the file that failed");
    }

    #[test]
    fn a_change_while_the_first_ring_was_read_is_noticed() {
        // The server takes the stamp before its first read, and the file
        // changes before the reloader exists: the poll must still see it.
        let (_d, path, r, _shared) = setup(&key("a", "sa", ""));
        let before = stamp(&path);
        std::fs::write(&path, key("a", "sa", "") + "# written during startup\n").unwrap();
        let r2 = Reloader::new(path.clone(), ParseOptions::default(), Arc::clone(&r.shared));
        assert_eq!(
            r2.settled_change(),
            PollSays::Unchanged,
            "a stamp taken now sees no change"
        );
        r2.note_read_stamp(before);
        assert_ne!(r2.settled_change(), PollSays::Unchanged);
    }

    #[test]
    fn diffs_follow_keys_that_moved() {
        let (_d, path, r, shared) =
            setup(&(key("a", "sa", "") + &key("b", "sb", "") + &key("c", "sc", "")));
        let old = shared.ring.load_full();
        std::fs::write(&path, key("c", "sc", "") + &key("a", "sa2", "")).unwrap();
        r.reload(Trigger::Watch);
        let d = Diff::between(&old, &shared.ring.load());
        assert!(d.added.is_empty(), "{d:?}");
        assert_eq!(d.removed, vec!["b"]);
        assert_eq!(d.changed, vec!["a: secret replaced"]);
    }

    #[test]
    fn diffs_name_added_removed_and_changed_keys() {
        let (_d, path, r, shared) =
            setup(&(key("a", "sa", "") + &key("b", "sb", "") + &key("c", "sc", "")));
        let old = shared.ring.load_full();
        std::fs::write(
            &path,
            key(
                "a",
                "sa",
                "state = \"deprecated\"\nexpires_at = 2030-01-01T00:00:00Z",
            ) + &key("b", "sb2", "scopes = [\"read\"]\ndescription = \"rotated\"")
                + &key("d", "sd", ""),
        )
        .unwrap();
        r.reload(Trigger::Watch);
        let new = shared.ring.load();
        let d = Diff::between(&old, &new);
        assert_eq!(d.added, vec!["d"]);
        assert_eq!(d.removed, vec!["c"]);
        // Deprecated without a time in the file: since this reload.
        let since = new.by_id("a").unwrap().deprecated_at().unwrap();
        assert_eq!(
            d.changed,
            vec![
                format!(
                    "a: state active -> deprecated, expires_at none -> 2030-01-01T00:00:00Z, \
                     deprecated_at none -> {since}"
                ),
                "b: scopes [] -> [read], secret replaced, description changed".to_string(),
            ]
        );
    }

    /// The diff as plainly as it can be written: every key of each ring
    /// looked up by id in the other, every field compared.
    fn reference_diff(old: &KeyRing, new: &KeyRing) -> Diff {
        let mut d = Diff::default();
        for k in new.keys() {
            match k.id().with_str(|id| old.by_id(id)) {
                None => d.added.push(k.id().to_string()),
                Some(o) => {
                    let what = changes(o, k);
                    if !what.is_empty() {
                        d.changed.push(format!("{}: {}", k.id(), what.join(", ")));
                    }
                }
            }
        }
        for k in old.keys() {
            if k.id().with_str(|id| new.by_id(id)).is_none() {
                d.removed.push(k.id().to_string());
            }
        }
        d
    }

    #[test]
    fn diffs_match_a_plain_comparison_of_every_key() {
        use crate::keyfile::{KeyFile, KeySpec, KeyState, RateLimitSpec};
        let mut state = 0x5eed_u64;
        let mut next = move |n: u64| {
            state = crate::bench_support::splitmix64(state);
            state % n
        };
        let times: Vec<Option<Timestamp>> = vec![
            None,
            Some("2030-01-01T00:00:00Z".parse().unwrap()),
            Some("2031-01-01T00:00:00Z".parse().unwrap()),
            // Not a whole second: kept outside the slot.
            Some("2030-01-01T00:00:00.5Z".parse().unwrap()),
            Some("2030-01-01T00:00:00.25Z".parse().unwrap()),
        ];
        let scopes: [&[&str]; 4] = [&[], &["read"], &["read", "trade"], &["trade"]];
        let clients = ["acme", "acme-eu", "bank", "c"];
        let descriptions = [None, Some("trading bot"), Some("market data")];
        let limits = [
            None,
            Some(RateLimitSpec {
                requests: 10,
                per: std::time::Duration::from_secs(1),
                burst: 10,
            }),
            Some(RateLimitSpec {
                requests: 20,
                per: std::time::Duration::from_secs(1),
                burst: 40,
            }),
        ];
        let random_key = |n: u64, next: &mut dyn FnMut(u64) -> u64| {
            let client = clients[next(4) as usize];
            // Most ids start with their client's name, as the ring stores
            // them specially; a few other keys have ids that do too.
            let id = match next(3) {
                0 => format!("k{n}"),
                _ => format!("{}-{n}", clients[next(4) as usize]),
            };
            KeySpec {
                digest: crate::decide::digest(&format!("{id}-{}", next(2))),
                id,
                client: client.to_string(),
                scopes: scopes[next(4) as usize]
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                state: [KeyState::Active, KeyState::Deprecated, KeyState::Revoked]
                    [next(3) as usize],
                not_before: times[next(5) as usize],
                expires_at: times[next(5) as usize]
                    .map(|t| t + jiff::SignedDuration::from_hours(24 * 366 * 5)),
                deprecated_at: times[next(5) as usize],
                description: descriptions[next(3) as usize].map(str::to_string),
                rate_limit: limits[next(3) as usize],
                line: 1,
            }
        };
        let usage = UsageRegistry::default();
        let ring = |keys: &[KeySpec]| {
            let file = KeyFile {
                keys: keys.to_vec(),
                routes: Vec::new(),
            };
            let source = RingSource {
                generation: 1,
                sha256: [0; 32],
                loaded_at: Timestamp::now(),
            };
            KeyRing::build(&file, source, &usage, None)
        };
        for _ in 0..300 {
            let old: Vec<KeySpec> = (0..next(40)).map(|n| random_key(n, &mut next)).collect();
            // The next version: mostly the same keys in the same places.
            let mut new = Vec::new();
            for (i, k) in old.iter().enumerate() {
                match next(12) {
                    0 => {}
                    // Another key; with the same number, its id may differ
                    // from this one's only in the client's name.
                    1 => new.push(random_key(i as u64 + 100 * next(2), &mut next)),
                    2 | 3 => {
                        // One field changed (or set to what it was).
                        let other = random_key(0, &mut next);
                        let mut changed = k.clone();
                        match next(9) {
                            0 => changed.digest = other.digest,
                            1 => changed.client = other.client,
                            2 => changed.scopes = other.scopes,
                            3 => changed.state = other.state,
                            4 => changed.not_before = other.not_before,
                            5 => changed.expires_at = other.expires_at,
                            6 => changed.deprecated_at = other.deprecated_at,
                            7 => changed.description = other.description,
                            _ => changed.rate_limit = other.rate_limit,
                        }
                        new.push(changed);
                    }
                    _ => new.push(k.clone()),
                }
            }
            if next(4) == 0 && !new.is_empty() {
                let at = next(new.len() as u64) as usize;
                let k = new.remove(at);
                new.push(k);
            }
            // Ids stay unique within each version.
            let mut seen = std::collections::HashSet::new();
            new.retain(|k| seen.insert(k.id.clone()));
            let (old, new) = (ring(&old), ring(&new));
            let (got, want) = (Diff::between(&old, &new), reference_diff(&old, &new));
            let sorted = |mut v: Vec<String>| {
                v.sort();
                v
            };
            assert_eq!(got.added, want.added);
            assert_eq!(got.changed, want.changed);
            assert_eq!(sorted(got.removed), sorted(want.removed));
        }
    }
}
