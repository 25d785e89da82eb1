//! Safe edits of a key file: an exclusive lock, validation with the server's
//! own parser, an atomic replace, and a short history for `keys rollback`.
//!
//! Every edit runs as: lock → read → change → validate → save the previous
//! version to the history → write a temporary file in the same directory →
//! fsync → rename over the key file → fsync the directory → unlock. A change
//! that does not validate leaves the file untouched, and so does one that
//! changes nothing.
//!
//! A key file reached through a symlink is edited where the link points
//! (the link stays), and the replaced file's owner, group and permissions
//! carry over to the new one where the system allows it.
//!
//! A JSON key file (`.json`) is edited as the TOML document it stands for
//! ([`keyfile::json`]) and written back as JSON, its members in their order
//! and indented as before.

use std::fs::{self, File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};

use crate::keyfile::{self, ParseOptions};

/// Versions kept for `keys rollback`.
pub const HISTORY_LEN: usize = 10;

/// Why an edit did not happen.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    /// Filesystem trouble, with the path involved.
    #[error("{path}: {what}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        source: std::io::Error,
    },
    /// The edited file would not validate; nothing was written.
    #[error("the edit was not saved because the result would be invalid:\n{0}")]
    Invalid(String),
    /// The file was not valid TOML (or JSON) to begin with.
    #[error("{0}")]
    Unparsable(String),
    /// The request does not make sense for this file (unknown id, …).
    #[error("{0}")]
    Refused(String),
}

fn io<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(std::io::Error) -> EditError + 'a {
    move |source| EditError::Io {
        path: path.to_owned(),
        what,
        source,
    }
}

/// A key file opened for editing under an exclusive lock (released on drop).
#[derive(Debug)]
pub struct Editor {
    path: PathBuf,
    /// Whether the file is JSON (by its name or the name it was reached by).
    json: bool,
    _lock: File,
    original: Option<String>,
}

impl Editor {
    /// Locks `path` for editing (waiting for other editors) and reads it.
    /// A missing file reads as `None`. A symlink is followed: the file it
    /// points to is the one locked, kept in the history and replaced.
    pub fn open(path: &Path) -> Result<Editor, EditError> {
        let (resolved, json) = resolve(path)?;
        let path = resolved.as_path();
        let lock_path = sibling(path, ".lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path, "cannot open the lock file"))?;
        lock.lock().map_err(io(&lock_path, "cannot lock"))?;
        // Never blocks: a FIFO in the file's place is refused.
        let read = crate::keyfile::open_regular(path).and_then(|(mut file, _)| {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut file, &mut text).map(|_| text)
        });
        let original = match read {
            Ok(s) => Some(s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(path, "cannot read the key file")(e)),
        };
        Ok(Editor {
            path: path.to_owned(),
            json,
            _lock: lock,
            original,
        })
    }

    /// The file's current text, if it exists.
    pub fn original(&self) -> Option<&str> {
        self.original.as_deref()
    }

    /// The file being edited (where a symlink pointed).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The current text parsed for editing (an empty document if missing).
    /// A JSON file comes as the TOML document it stands for.
    pub fn document(&self) -> Result<toml_edit::DocumentMut, EditError> {
        let original = self.original.as_deref().unwrap_or("");
        if self.json && !original.trim().is_empty() {
            return self.json_document(original);
        }
        original.parse::<toml_edit::DocumentMut>().map_err(|e| {
            let at = e.span().map_or(0, |s| s.start);
            let (line, col) = keyfile::position(original, at);
            EditError::Unparsable(format!(
                "{}:{line}:{col}: invalid TOML: {}",
                self.path.display(),
                e.message().trim_end()
            ))
        })
    }

    fn json_document(&self, json: &str) -> Result<toml_edit::DocumentMut, EditError> {
        // `path:line:column: message` lines, as every key file problem is shown.
        let unparsable = |diagnostics: &[keyfile::Diagnostic]| {
            EditError::Unparsable(
                keyfile::KeyFileError::Invalid {
                    path: self.path.clone(),
                    diagnostics: diagnostics.to_vec(),
                }
                .to_string(),
            )
        };
        let translated =
            keyfile::json::translate(json).map_err(|d| unparsable(std::slice::from_ref(&d)))?;
        if !translated.problems.is_empty() {
            return Err(unparsable(&translated.problems));
        }
        translated
            .toml
            .parse::<toml_edit::DocumentMut>()
            .map_err(|e| {
                let (line, column) =
                    keyfile::position(&translated.toml, e.span().map_or(0, |s| s.start));
                let diagnostic = keyfile::Diagnostic {
                    line,
                    column,
                    message: format!("invalid TOML: {}", e.message().trim_end()),
                };
                unparsable(&translated.diagnostics_in(json, vec![diagnostic]))
            })
    }

    /// `doc` as the file's text, given `toml`, the document's TOML text
    /// (which the caller has made already): a TOML file is that text, a
    /// JSON file is written in its own indentation.
    pub fn render(&self, doc: &toml_edit::DocumentMut, toml: String) -> String {
        if self.json {
            keyfile::json::to_json(
                doc,
                &keyfile::json::indent_of(self.original.as_deref().unwrap_or("")),
            )
        } else {
            toml
        }
    }

    /// Validates `text` as the server would, saves the current version to the
    /// history, and atomically replaces the file.
    pub fn commit(self, text: &str, opts: ParseOptions) -> Result<(), EditError> {
        self.commit_when(text, opts, || Ok(()))
    }

    /// [`Editor::commit`], calling `ready` once `text` has validated and
    /// before anything is written: an error from it writes nothing.
    pub fn commit_when(
        self,
        text: &str,
        opts: ParseOptions,
        ready: impl FnOnce() -> Result<(), EditError>,
    ) -> Result<(), EditError> {
        keyfile::parse_bytes(&self.path, text.as_bytes(), opts)
            .map_err(|e| EditError::Invalid(e.to_string()))?;
        ready()?;
        let saved = match &self.original {
            Some(old) => Some(push_history(&self.path, self.json, old)?),
            None => None,
        };
        if let Err(e) = write_atomically(&self.path, text.as_bytes()) {
            // Nothing changed: the saved entry is the file as it still is,
            // which a rollback would restore as if it undid something.
            if let Some(entry) = saved {
                let _ = fs::remove_file(entry);
            }
            return Err(e);
        }
        // Only once the edit has happened does the oldest version go.
        if let Err(e) = entries(&self.path, self.json, false).and_then(prune) {
            eprintln!("keyward: warning: {e}");
        }
        Ok(())
    }

    /// Restores the newest history entry that differs from the file and is
    /// valid, and drops it from the history. The version it replaces is
    /// kept beside the history as `undone-…` (the last [`HISTORY_LEN`]), so
    /// a rollback loses nothing, not even edits made by hand since the last
    /// `keyward keys` edit.
    ///
    /// Newer entries identical to the file (a version edited back by hand)
    /// would change nothing: they are dropped too. Newer entries that are
    /// not valid key files (a broken file that an edit then mended) cannot
    /// be served: they are passed over with a warning, and stay.
    pub fn rollback(self, opts: ParseOptions) -> Result<RolledBack, EditError> {
        let entries = entries(&self.path, self.json, false)?;
        let mut same = Vec::new();
        let mut invalid = None;
        let mut found = None;
        for entry in entries.iter().rev() {
            let text = fs::read(entry).map_err(io(entry, "cannot read the history entry"))?;
            if self.original.as_deref().map(str::as_bytes) == Some(&text[..]) {
                same.push(entry);
                continue;
            }
            match keyfile::parse_bytes(&self.path, &text, opts) {
                Ok(restored) => {
                    found = Some((entry, text, restored));
                    break;
                }
                Err(e) => {
                    eprintln!(
                        "keyward: warning: passing over history entry {}, which is not a valid key file:\n{e}",
                        entry.display()
                    );
                    invalid.get_or_insert(e);
                }
            }
        }
        let Some((newest, text, restored)) = found else {
            if let Some(e) = invalid {
                return Err(EditError::Invalid(format!(
                    "no earlier version is a valid key file; the newest that differs from the file:\n{e}"
                )));
            }
            return Err(EditError::Refused(format!(
                "{}: no earlier version to roll back to (keyward keeps the last {HISTORY_LEN} versions it replaced)",
                self.path.display()
            )));
        };
        let revived = self
            .original
            .as_deref()
            .and_then(|current| keyfile::parse_bytes(&self.path, current.as_bytes(), opts).ok())
            .map(|current| revived(&current, &restored))
            .unwrap_or_default();
        let undone = match &self.original {
            Some(current) => Some(keep_undone(&self.path, self.json, current)?),
            None => None,
        };
        write_atomically(&self.path, &text)?;
        // The rollback has happened: an entry that cannot be removed is a
        // warning (the next rollback would restore it again).
        if let Err(e) = fs::remove_file(newest) {
            eprintln!(
                "keyward: warning: cannot remove the restored history entry {} ({e}): \
                 remove it before the next rollback, which would restore it again",
                newest.display()
            );
        }
        for entry in same {
            let _ = fs::remove_file(entry);
        }
        let entry = newest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(RolledBack {
            entry,
            undone,
            revived,
        })
    }
}

/// What a rollback did.
#[derive(Debug)]
pub struct RolledBack {
    /// The history entry restored.
    pub entry: String,
    /// Where the version it replaced is kept.
    pub undone: Option<PathBuf>,
    /// Keys that were revoked, or not in the file, and that the restored
    /// version lets in again: worth a second look after a leak.
    pub revived: Vec<String>,
}

/// Ids of keys `restored` accepts (not revoked) that `current` revokes or
/// does not hold.
fn revived(current: &keyfile::KeyFile, restored: &keyfile::KeyFile) -> Vec<String> {
    use keyfile::KeyState;
    let states: std::collections::HashMap<&str, KeyState> = current
        .keys
        .iter()
        .map(|k| (k.id.as_str(), k.state))
        .collect();
    restored
        .keys
        .iter()
        .filter(|k| {
            k.state != KeyState::Revoked
                && states
                    .get(k.id.as_str())
                    .is_none_or(|s| *s == KeyState::Revoked)
        })
        .map(|k| k.id.clone())
        .collect()
}

/// `dir/.name<suffix>` for `dir/name`.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}{suffix}"))
}

/// The history directory of a key file: `dir/.name.history/`.
pub fn history_dir(path: &Path) -> PathBuf {
    sibling(path, ".history")
}

/// The file a key file's path names (where a symlink at it points), and
/// whether it is JSON: by the name it was given or by its own (a
/// `keys.json` link to `keys.v3` is JSON, as the server reads it).
fn resolve(path: &Path) -> Result<(PathBuf, bool), EditError> {
    let resolved = match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            fs::canonicalize(path).map_err(io(path, "cannot follow the symlink"))?
        }
        _ => path.to_owned(),
    };
    let json = keyfile::is_json(path) || keyfile::is_json(&resolved);
    Ok((resolved, json))
}

/// The extension of history entries: the key file's format.
fn extension(json: bool) -> &'static str {
    if json { "json" } else { "toml" }
}

/// Prefix of the versions that rollbacks replaced.
const UNDONE: &str = "undone-";

/// History entries of the key file at `path`, oldest first (not the
/// versions rollbacks replaced).
pub fn history(path: &Path) -> Result<Vec<PathBuf>, EditError> {
    let (path, json) = resolve(path)?;
    entries(&path, json, false)
}

/// The versions that rollbacks of the key file at `path` replaced, oldest
/// first.
pub fn undone(path: &Path) -> Result<Vec<PathBuf>, EditError> {
    let (path, json) = resolve(path)?;
    entries(&path, json, true)
}

/// The history entries (or `undone` versions) of the key file `path`
/// (already resolved).
fn entries(path: &Path, json: bool, undone: bool) -> Result<Vec<PathBuf>, EditError> {
    let dir = history_dir(path);
    let read = match fs::read_dir(&dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(&dir, "cannot list the history")(e)),
    };
    let mut entries: Vec<PathBuf> = read
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == extension(json)))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(UNDONE) == undone)
        })
        .collect();
    // Names start with a zero-padded sequence number, so they sort by age.
    entries.sort();
    Ok(entries)
}

/// Saves `text` as the newest history entry, and returns its path. The
/// caller prunes the history once its edit has happened.
fn push_history(path: &Path, json: bool, text: &str) -> Result<PathBuf, EditError> {
    let dir = history_dir(path);
    fs::create_dir_all(&dir).map_err(io(&dir, "cannot create the history directory"))?;
    let entries = entries(path, json, false)?;
    let next = entries
        .last()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_string_lossy().split('-').next().map(str::to_owned))
        .and_then(|n| n.parse::<u64>().ok())
        .map_or(1, |n| n + 1);
    let stamp = jiff::Timestamp::now().strftime("%Y%m%dT%H%M%SZ");
    let entry = dir.join(format!("{next:010}-{stamp}.{}", extension(json)));
    write_atomically(&entry, text.as_bytes())?;
    Ok(entry)
}

/// Keeps `text`, the version a rollback replaces, as the newest `undone-…`
/// entry.
fn keep_undone(path: &Path, json: bool, text: &str) -> Result<PathBuf, EditError> {
    let dir = history_dir(path);
    fs::create_dir_all(&dir).map_err(io(&dir, "cannot create the history directory"))?;
    let stamp = jiff::Timestamp::now().strftime("%Y%m%dT%H%M%SZ");
    let n = entries(path, json, true)?.len();
    let ext = extension(json);
    let entry = (n..)
        .map(|i| dir.join(format!("{UNDONE}{stamp}-{i:04}.{ext}")))
        .find(|p| !p.exists())
        .unwrap_or_else(|| dir.join(format!("{UNDONE}{stamp}.{ext}")));
    write_atomically(&entry, text.as_bytes())?;
    prune(entries(path, json, true)?)?;
    Ok(entry)
}

/// Removes all but the newest [`HISTORY_LEN`] of `entries` (oldest first).
fn prune(entries: Vec<PathBuf>) -> Result<(), EditError> {
    if entries.len() > HISTORY_LEN {
        for old in &entries[..entries.len() - HISTORY_LEN] {
            fs::remove_file(old).map_err(io(old, "cannot prune the history"))?;
        }
    }
    Ok(())
}

/// Writes `bytes` to a temporary file beside `path`, fsyncs it, renames it
/// over `path` and fsyncs the directory. Keeps the permissions of an existing
/// file, and its owner and group where the system allows (as root, or a
/// group the user is in); new files are private (0600).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), EditError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let tmp = sibling(path, &format!(".tmp-{}", std::process::id()));
    let mut opts = OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let result = (|| {
        let mut f = opts
            .open(&tmp)
            .map_err(io(&tmp, "cannot create a temporary file"))?;
        if let Ok(meta) = fs::metadata(path) {
            keep_owner(&f, &meta, path);
            f.set_permissions(meta.permissions())
                .map_err(io(&tmp, "cannot copy permissions"))?;
        }
        f.write_all(bytes).map_err(io(&tmp, "cannot write"))?;
        f.sync_all().map_err(io(&tmp, "cannot fsync"))?;
        fs::rename(&tmp, path).map_err(io(path, "cannot replace"))?;
        // The new version is in place: from here on the edit has happened,
        // so a directory that cannot be synced (not readable, or a file
        // system that refuses) is a warning, not a failure.
        if let Err(e) = File::open(&dir).and_then(|d| d.sync_all()) {
            eprintln!(
                "keyward: warning: {} was replaced, but its directory could not be synced \
                 ({e}): a crash in the next moments could bring the old version back",
                path.display()
            );
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Gives `new` the owner and group of the file it replaces, or as much of
/// them as the system allows; says so on stderr when the new file cannot
/// keep them (a server running as the old owner may then fail to read it,
/// and keeps serving its current ring until it can).
#[cfg(unix)]
fn keep_owner(new: &File, old: &fs::Metadata, path: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(now) = new.metadata() else { return };
    if (now.uid(), now.gid()) == (old.uid(), old.gid()) {
        return;
    }
    if std::os::unix::fs::fchown(new, Some(old.uid()), Some(old.gid())).is_ok() {
        return;
    }
    let group = std::os::unix::fs::fchown(new, None, Some(old.gid())).is_ok();
    eprintln!(
        "keyward: warning: {} was owned by {}:{}; the new version belongs to you{}",
        path.display(),
        old.uid(),
        old.gid(),
        if group { " (the group is kept)" } else { "" }
    );
}

#[cfg(not(unix))]
fn keep_owner(_: &File, _: &fs::Metadata, _: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "[[keys]]\nid = \"a\"\nclient = \"c\"\nsha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\n";

    #[test]
    fn a_fifo_in_place_of_the_file_is_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::keyfile::tests::fifo(dir.path(), "keys.toml");
        let err =
            crate::keyfile::tests::promptly(move || Editor::open(&path).map(|_| ())).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }

    #[test]
    fn commit_validates_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        fs::write(&path, KEY).unwrap();
        let ed = Editor::open(&path).unwrap();
        let err = ed
            .commit("[[keys]]\nid = \"a\"\n", ParseOptions::default())
            .unwrap_err();
        assert!(matches!(err, EditError::Invalid(_)), "{err}");
        assert_eq!(fs::read_to_string(&path).unwrap(), KEY, "untouched");
        assert!(history(&path).unwrap().is_empty());
    }

    #[test]
    fn history_is_bounded_and_rollback_walks_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let version = |i: usize| format!("# version {i}\n{KEY}");
        fs::write(&path, version(0)).unwrap();
        for i in 1..=12 {
            Editor::open(&path)
                .unwrap()
                .commit(&version(i), ParseOptions::default())
                .unwrap();
        }
        assert_eq!(history(&path).unwrap().len(), HISTORY_LEN);
        Editor::open(&path)
            .unwrap()
            .rollback(ParseOptions::default())
            .unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), version(11));
        Editor::open(&path)
            .unwrap()
            .rollback(ParseOptions::default())
            .unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), version(10));
        for _ in 0..8 {
            Editor::open(&path)
                .unwrap()
                .rollback(ParseOptions::default())
                .unwrap();
        }
        assert_eq!(fs::read_to_string(&path).unwrap(), version(2));
        let err = Editor::open(&path)
            .unwrap()
            .rollback(ParseOptions::default())
            .unwrap_err();
        assert!(err.to_string().contains("no earlier version"), "{err}");
    }

    /// A key file written as `# v1` and edited to `# v2`.
    fn edited_once() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        fs::write(&path, format!("# v1\n{KEY}")).unwrap();
        Editor::open(&path)
            .unwrap()
            .commit(&format!("# v2\n{KEY}"), ParseOptions::default())
            .unwrap();
        (dir, path)
    }

    #[test]
    fn an_edit_that_cannot_be_written_leaves_the_history_as_it_was() {
        let (_dir, path) = edited_once();
        // The temporary file's name taken by a directory: the write fails.
        let tmp = sibling(&path, &format!(".tmp-{}", std::process::id()));
        fs::create_dir(&tmp).unwrap();
        let err = Editor::open(&path)
            .unwrap()
            .commit(&format!("# v3\n{KEY}"), ParseOptions::default())
            .unwrap_err();
        assert!(err.to_string().contains("temporary file"), "{err}");
        fs::remove_dir(&tmp).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), format!("# v2\n{KEY}"));
        assert_eq!(history(&path).unwrap().len(), 1);
        // So a rollback undoes the edit that happened.
        Editor::open(&path)
            .unwrap()
            .rollback(ParseOptions::default())
            .unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), format!("# v1\n{KEY}"));
    }

    #[test]
    fn a_rollback_passes_over_versions_that_are_the_file_or_are_invalid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        let commit = |text: &str| {
            Editor::open(&path)
                .unwrap()
                .commit(text, ParseOptions::default())
                .unwrap()
        };
        let v1 = format!("# v1\n{KEY}");
        let v2 = format!("# v2\n{KEY}");
        fs::write(&path, &v1).unwrap();
        commit(&v2);
        // Broken by hand, then mended by an edit: the broken version is
        // saved. Then an edit, and the file put back to v2 by hand.
        fs::write(&path, "[[keys]]\nid = \"a\"\n").unwrap();
        commit(&v2);
        commit(&format!("# v3\n{KEY}"));
        fs::write(&path, &v2).unwrap();
        assert_eq!(history(&path).unwrap().len(), 3);
        let rolled = Editor::open(&path)
            .unwrap()
            .rollback(ParseOptions::default())
            .unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), v1, "{rolled:?}");
        // The v2 entry that was the file went with the restored one; the
        // broken one stays.
        assert_eq!(history(&path).unwrap().len(), 1);
        let err = Editor::open(&path)
            .unwrap()
            .rollback(ParseOptions::default())
            .unwrap_err();
        assert!(matches!(err, EditError::Invalid(_)), "{err}");
        assert!(
            err.to_string().contains("no earlier version is a valid"),
            "{err}"
        );
    }

    #[test]
    fn a_rollback_keeps_the_version_it_replaces() {
        let (_dir, path) = edited_once();
        // Edited by hand after the last keyward edit.
        fs::write(&path, format!("# by hand\n{KEY}")).unwrap();
        let undone = Editor::open(&path)
            .unwrap()
            .rollback(ParseOptions::default())
            .unwrap()
            .undone;
        assert_eq!(fs::read_to_string(&path).unwrap(), format!("# v1\n{KEY}"));
        let undone = undone.expect("the replaced version is kept");
        assert_eq!(
            fs::read_to_string(&undone).unwrap(),
            format!("# by hand\n{KEY}")
        );
        assert_eq!(super::undone(&path).unwrap(), vec![undone]);
        assert!(history(&path).unwrap().is_empty(), "not a rollback target");
    }

    #[cfg(unix)]
    #[test]
    fn an_edit_through_a_symlink_changes_the_target_and_keeps_the_link() {
        let dir = tempfile::tempdir().unwrap();
        let real_dir = dir.path().join("real");
        fs::create_dir(&real_dir).unwrap();
        let target = real_dir.join("prod.toml");
        fs::write(&target, KEY).unwrap();
        let link = dir.path().join("keys.toml");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let ed = Editor::open(&link).unwrap();
        assert_eq!(ed.path(), fs::canonicalize(&target).unwrap());
        ed.commit(&format!("# edited\n{KEY}"), ParseOptions::default())
            .unwrap();
        assert!(
            fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(
            fs::read_to_string(&target).unwrap(),
            format!("# edited\n{KEY}")
        );
        assert_eq!(history(&target).unwrap().len(), 1, "kept beside the target");
    }

    #[test]
    fn a_json_file_is_edited_as_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let json = "{\n\t\"keys\": [\n\t\t{\n\t\t\t\"id\": \"a\",\n\t\t\t\"client\": \"c\",\n\t\t\t\
                    \"sha256\": \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\n\t\t}\n\t]\n}\n";
        fs::write(&path, json).unwrap();
        let ed = Editor::open(&path).unwrap();
        let mut doc = ed.document().unwrap();
        assert_eq!(
            ed.render(&doc, doc.to_string()),
            json,
            "unchanged, byte for byte"
        );
        let keys = doc["keys"].as_array_of_tables_mut().unwrap();
        keys.get_mut(0).unwrap()["state"] = toml_edit::value("revoked");
        let text = ed.render(&doc, doc.to_string());
        assert!(text.contains("\t\t\t\"state\": \"revoked\"\n"), "{text}");
        ed.commit(&text, ParseOptions::default()).unwrap();
        let file = keyfile::load(&path, ParseOptions::default()).unwrap().0;
        assert_eq!(file.keys[0].state, keyfile::KeyState::Revoked);
        let entries = history(&path).unwrap();
        assert_eq!(entries.len(), 1);
        assert!(
            entries[0].to_string_lossy().ends_with(".json"),
            "{entries:?}"
        );
        assert_eq!(fs::read_to_string(&entries[0]).unwrap(), json);

        fs::write(&path, "{\"keys\": [{\"id\": null}]}").unwrap();
        let err = Editor::open(&path).unwrap().document().unwrap_err();
        assert!(err.to_string().contains("keys.json:1:"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn permissions_are_kept_and_new_files_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        write_atomically(&path, b"x").unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        fs::set_permissions(&path, fs::Permissions::from_mode(0o640)).unwrap();
        write_atomically(&path, b"y").unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
    }
}
