//! Safe edits of a key file: an exclusive lock, validation with the server's
//! own parser, an atomic replace, and a short history for `keys rollback`.
//!
//! Every edit runs as: lock → read → change → validate → save the previous
//! version to the history → write a temporary file in the same directory →
//! fsync → rename over the key file → fsync the directory → unlock. A change
//! that does not validate leaves the file untouched.

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
    /// The file was not valid TOML to begin with.
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
    _lock: File,
    original: Option<String>,
}

impl Editor {
    /// Locks `path` for editing (waiting for other editors) and reads it.
    /// A missing file reads as `None`.
    pub fn open(path: &Path) -> Result<Editor, EditError> {
        let lock_path = sibling(path, ".lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path, "cannot open the lock file"))?;
        lock.lock().map_err(io(&lock_path, "cannot lock"))?;
        let original = match fs::read_to_string(path) {
            Ok(s) => Some(s),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(path, "cannot read the key file")(e)),
        };
        Ok(Editor {
            path: path.to_owned(),
            _lock: lock,
            original,
        })
    }

    /// The file's current text, if it exists.
    pub fn original(&self) -> Option<&str> {
        self.original.as_deref()
    }

    /// The current text parsed for editing (an empty document if missing).
    pub fn document(&self) -> Result<toml_edit::DocumentMut, EditError> {
        self.original
            .as_deref()
            .unwrap_or("")
            .parse::<toml_edit::DocumentMut>()
            .map_err(|e| {
                let at = e.span().map_or(0, |s| s.start);
                let (line, col) = keyfile::position(self.original.as_deref().unwrap_or(""), at);
                EditError::Unparsable(format!(
                    "{}:{line}:{col}: invalid TOML: {}",
                    self.path.display(),
                    e.message().trim_end()
                ))
            })
    }

    /// Validates `text` as the server would, saves the current version to the
    /// history, and atomically replaces the file.
    pub fn commit(self, text: &str, opts: ParseOptions) -> Result<(), EditError> {
        keyfile::parse_bytes(&self.path, text.as_bytes(), opts)
            .map_err(|e| EditError::Invalid(e.to_string()))?;
        if let Some(old) = &self.original {
            push_history(&self.path, old)?;
        }
        write_atomically(&self.path, text.as_bytes())
    }

    /// Restores the newest history entry (validated first) and drops it from
    /// the history; returns the entry's name.
    pub fn rollback(self, opts: ParseOptions) -> Result<String, EditError> {
        let entries = history(&self.path)?;
        let Some(newest) = entries.last() else {
            return Err(EditError::Refused(format!(
                "{}: no earlier version to roll back to (keyward keeps the last {HISTORY_LEN} versions it replaced)",
                self.path.display()
            )));
        };
        let text = fs::read(newest).map_err(io(newest, "cannot read the history entry"))?;
        keyfile::parse_bytes(&self.path, &text, opts)
            .map_err(|e| EditError::Invalid(e.to_string()))?;
        write_atomically(&self.path, &text)?;
        fs::remove_file(newest).map_err(io(newest, "cannot remove the restored history entry"))?;
        Ok(newest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default())
    }
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

/// History entries, oldest first.
pub fn history(path: &Path) -> Result<Vec<PathBuf>, EditError> {
    let dir = history_dir(path);
    let read = match fs::read_dir(&dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(&dir, "cannot list the history")(e)),
    };
    let mut entries: Vec<PathBuf> = read
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    // Names start with a zero-padded sequence number, so they sort by age.
    entries.sort();
    Ok(entries)
}

fn push_history(path: &Path, text: &str) -> Result<(), EditError> {
    let dir = history_dir(path);
    fs::create_dir_all(&dir).map_err(io(&dir, "cannot create the history directory"))?;
    let entries = history(path)?;
    let next = entries
        .last()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_string_lossy().split('-').next().map(str::to_owned))
        .and_then(|n| n.parse::<u64>().ok())
        .map_or(1, |n| n + 1);
    let stamp = jiff::Timestamp::now().strftime("%Y%m%dT%H%M%SZ");
    let entry = dir.join(format!("{next:010}-{stamp}.toml"));
    write_atomically(&entry, text.as_bytes())?;
    let entries = history(path)?;
    if entries.len() > HISTORY_LEN {
        for old in &entries[..entries.len() - HISTORY_LEN] {
            fs::remove_file(old).map_err(io(old, "cannot prune the history"))?;
        }
    }
    Ok(())
}

/// Writes `bytes` to a temporary file beside `path`, fsyncs it, renames it
/// over `path` and fsyncs the directory. Keeps the permissions of an existing
/// file; new files are private (0600).
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
            f.set_permissions(meta.permissions())
                .map_err(io(&tmp, "cannot copy permissions"))?;
        }
        f.write_all(bytes).map_err(io(&tmp, "cannot write"))?;
        f.sync_all().map_err(io(&tmp, "cannot fsync"))?;
        fs::rename(&tmp, path).map_err(io(path, "cannot replace"))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&dir, "cannot fsync the directory"))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "[[keys]]\nid = \"a\"\nclient = \"c\"\nsha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\n";

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
