//! `keyward keys …`: the key lifecycle from the command line.
//!
//! Each editing command is a pure change to a `toml_edit` document (so
//! comments and layout survive) applied through [`crate::edit::Editor`], which
//! locks, validates with the server's parser, keeps history and replaces the
//! file atomically. Secrets go to stdout alone; everything else to stderr.

use std::io::Read as _;
use std::path::Path;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp, Unit};
use toml_edit::{ArrayOfTables, DocumentMut, Item, Table, Value, value};

use crate::edit::{EditError, Editor};
use crate::keyfile::{self, KeyState, ParseOptions};
use crate::secret;

/// What `keys new` adds.
#[derive(Debug, Clone, Default)]
pub struct NewKey {
    /// Key id (generated when `None`).
    pub id: Option<String>,
    /// The client.
    pub client: String,
    /// Scopes granted.
    pub scopes: Vec<String>,
    /// Valid for this long from `not_before` (or now).
    pub expires_in: Option<Duration>,
    /// Not valid before.
    pub not_before: Option<Timestamp>,
    /// Free text.
    pub description: Option<String>,
}

/// The outcome of an edit, for messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Added {
    /// The new key's id.
    pub id: String,
    /// Its secret (print once, never log).
    pub secret: String,
    /// When the new key expires.
    pub expires_at: Option<Timestamp>,
    /// Keys deprecated by a rotation: (id, new expiry).
    pub deprecated: Vec<(String, Timestamp)>,
    /// Active keys a rotation left alone because they are not valid yet
    /// (`not_before` in the future): issued ahead for a later rotation.
    pub scheduled: Vec<String>,
}

/// Default grace window for `keys rotate`.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(7 * 86_400);

fn toml_time(t: Timestamp) -> Value {
    let t = t.round(Unit::Second).unwrap_or(t);
    let text = t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string();
    match text.parse::<toml_edit::Datetime>() {
        Ok(dt) => Value::from(dt),
        Err(_) => Value::from(text),
    }
}

/// Replaces `table[key]` with `v`, keeping the old value's surrounding
/// whitespace and trailing comment.
fn set(table: &mut Table, key: &str, mut v: Value) {
    if let Some(old) = table.get(key).and_then(Item::as_value) {
        *v.decor_mut() = old.decor().clone();
    }
    table[key] = Item::Value(v);
}

fn keys_mut(doc: &mut DocumentMut) -> Result<&mut ArrayOfTables, EditError> {
    let empty = match doc.get("keys") {
        None => true,
        Some(Item::Value(Value::Array(a))) => a.is_empty(),
        Some(_) => false,
    };
    if empty {
        doc.insert("keys", Item::ArrayOfTables(ArrayOfTables::new()));
    }
    doc.get_mut("keys")
        .and_then(Item::as_array_of_tables_mut)
        .ok_or_else(|| EditError::Refused("`keys` is not an array of [[keys]] tables".into()))
}

fn str_field<'t>(t: &'t Table, key: &str) -> Option<&'t str> {
    t.get(key).and_then(Item::as_str)
}

fn state_of(t: &Table) -> Option<KeyState> {
    match str_field(t, "state") {
        None | Some("active") => Some(KeyState::Active),
        Some("deprecated") => Some(KeyState::Deprecated),
        Some("revoked") => Some(KeyState::Revoked),
        Some(_) => None,
    }
}

fn time_field(t: &Table, key: &str) -> Option<Timestamp> {
    match t.get(key)?.as_value()? {
        Value::Datetime(d) => keyfile::parse_time(&d.value().to_string()).ok(),
        Value::String(s) => keyfile::parse_time(s.value()).ok(),
        _ => None,
    }
}

/// A fresh id for `client`: `<client>-<yyyymmdd>-<6 hex>`, restricted to the
/// id alphabet.
fn generate_id(
    client: &str,
    now: Timestamp,
    taken: &dyn Fn(&str) -> bool,
) -> Result<String, EditError> {
    let mut base: String = client
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(100)
        .collect();
    if base.trim_matches('-').is_empty() {
        base = "key".into();
    }
    for _ in 0..16 {
        let mut r = [0u8; 3];
        getrandom::fill(&mut r)
            .map_err(|e| EditError::Refused(format!("no randomness from the OS: {e}")))?;
        let id = format!("{base}-{}-{}", now.strftime("%Y%m%d"), hex::encode(r));
        if !taken(&id) {
            return Ok(id);
        }
    }
    Err(EditError::Refused(
        "could not find a free key id; pass --id".into(),
    ))
}

fn add(doc: &mut DocumentMut, spec: &NewKey, now: Timestamp) -> Result<Added, EditError> {
    let aot = keys_mut(doc)?;
    let ids: Vec<String> = aot
        .iter()
        .filter_map(|t| str_field(t, "id").map(str::to_owned))
        .collect();
    let id = match &spec.id {
        Some(id) if ids.iter().any(|i| i == id) => {
            return Err(EditError::Refused(format!(
                "a key with id {id:?} already exists"
            )));
        }
        Some(id) => id.clone(),
        None => generate_id(&spec.client, now, &|c| ids.iter().any(|i| i == c))?,
    };
    let secret = secret::generate()
        .map_err(|e| EditError::Refused(format!("no randomness from the OS: {e}")))?;
    let mut t = Table::new();
    t["id"] = value(id.as_str());
    t["client"] = value(spec.client.as_str());
    t["sha256"] = value(hex::encode(crate::decide::digest(&secret)));
    if !spec.scopes.is_empty() {
        t["scopes"] = value(
            spec.scopes
                .iter()
                .map(String::as_str)
                .collect::<toml_edit::Array>(),
        );
    }
    if let Some(nb) = spec.not_before {
        t["not_before"] = Item::Value(toml_time(nb));
    }
    let mut expires_at = None;
    if let Some(d) = spec.expires_in {
        let from = spec.not_before.unwrap_or(now).max(now);
        let d = SignedDuration::try_from(d)
            .map_err(|e| EditError::Refused(format!("--expires-in: {e}")))?;
        let at = from
            .checked_add(d)
            .map_err(|e| EditError::Refused(format!("--expires-in: {e}")))?;
        let at = at.round(Unit::Second).unwrap_or(at);
        t["expires_at"] = Item::Value(toml_time(at));
        expires_at = Some(at);
    }
    if let Some(desc) = &spec.description {
        t["description"] = value(desc.as_str());
    }
    t.decor_mut()
        .set_prefix(if aot.is_empty() { "" } else { "\n" });
    aot.push(t);
    Ok(Added {
        id,
        secret,
        expires_at,
        deprecated: Vec::new(),
        scheduled: Vec::new(),
    })
}

/// `keys new`: adds a key; returns its id and secret.
pub fn new_key(doc: &mut DocumentMut, spec: &NewKey, now: Timestamp) -> Result<Added, EditError> {
    add(doc, spec, now)
}

/// `keys rotate`: adds a new key for an existing client and deprecates the
/// client's active keys with `expires_at = now + grace` (never later than an
/// expiry they already had). An active key that is not valid yet was issued
/// ahead of time and is left as it is: deprecating it would end it before
/// it began. The new key takes the scopes (unless given) and the rate limit
/// of the client's newest active key in effect (valid now), else of its
/// newest active key, else of its newest key (a rotation after a
/// revocation).
pub fn rotate(
    doc: &mut DocumentMut,
    client: &str,
    id: Option<String>,
    scopes: Option<Vec<String>>,
    grace: Duration,
    now: Timestamp,
) -> Result<Added, EditError> {
    let aot = keys_mut(doc)?;
    let of_client: Vec<usize> = aot
        .iter()
        .enumerate()
        .filter(|(_, t)| str_field(t, "client") == Some(client))
        .map(|(i, _)| i)
        .collect();
    if of_client.is_empty() {
        return Err(EditError::Refused(format!(
            "no keys for client {client:?}: rotate replaces an existing client's keys; \
             use `keyward keys new --client {client}` for a new client"
        )));
    }
    let active = |t: &Table| state_of(t) == Some(KeyState::Active);
    let begun = |t: &Table| time_field(t, "not_before").is_none_or(|nb| nb <= now);
    let in_effect = |t: &Table| begun(t) && time_field(t, "expires_at").is_none_or(|exp| exp > now);
    let newest = |pick: &dyn Fn(&Table) -> bool| {
        of_client
            .iter()
            .rev()
            .filter_map(|&i| aot.get(i))
            .find(|t| pick(t))
    };
    let model = newest(&|t| active(t) && in_effect(t))
        .or_else(|| newest(&active))
        .or_else(|| newest(&|_| true));
    let scopes = scopes.unwrap_or_else(|| {
        model
            .and_then(|t| t.get("scopes"))
            .and_then(Item::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    });
    // Written inline, as a `[keys.rate_limit]` section or as dotted keys:
    // the new key gets it inline, without the model's comments.
    let rate_limit = model
        .and_then(|t| t.get("rate_limit"))
        .and_then(|item| match item {
            Item::Value(v) => Some(v.clone()),
            Item::Table(t) => Some(Value::InlineTable(t.clone().into_inline_table())),
            _ => None,
        })
        .map(|mut limit| {
            limit.decor_mut().clear();
            if let Value::InlineTable(t) = &mut limit {
                for (_, v) in t.iter_mut() {
                    v.decor_mut().clear();
                }
                t.fmt();
            }
            limit
        });
    let grace =
        SignedDuration::try_from(grace).map_err(|e| EditError::Refused(format!("--grace: {e}")))?;
    let sunset = now
        .checked_add(grace)
        .map_err(|e| EditError::Refused(format!("--grace: {e}")))?;
    let sunset = sunset.round(Unit::Second).unwrap_or(sunset);
    // Whole seconds, and not after the rotation: a deprecation date in the
    // future would announce one to come.
    let since = now
        .round(
            jiff::TimestampRound::new()
                .smallest(Unit::Second)
                .mode(jiff::RoundMode::Trunc),
        )
        .unwrap_or(now);
    let mut deprecated = Vec::new();
    let mut scheduled = Vec::new();
    for &i in &of_client {
        let Some(t) = aot.get_mut(i) else { continue };
        if !active(t) {
            continue;
        }
        if !begun(t) {
            scheduled.push(str_field(t, "id").unwrap_or_default().to_owned());
            continue;
        }
        let expires = match time_field(t, "expires_at") {
            Some(existing) if existing < sunset => existing,
            _ => sunset,
        };
        set(t, "state", Value::from("deprecated"));
        set(t, "deprecated_at", toml_time(since));
        set(t, "expires_at", toml_time(expires));
        deprecated.push((str_field(t, "id").unwrap_or_default().to_owned(), expires));
    }
    let spec = NewKey {
        id,
        client: client.to_owned(),
        scopes,
        ..NewKey::default()
    };
    let mut added = add(doc, &spec, now)?;
    if let Some(limit) = rate_limit
        && let Some(t) = keys_mut(doc)?.iter_mut().last()
    {
        t["rate_limit"] = Item::Value(limit);
    }
    added.deprecated = deprecated;
    added.scheduled = scheduled;
    Ok(added)
}

/// `keys revoke`: marks a key revoked. Returns false if it already was.
pub fn revoke(doc: &mut DocumentMut, id: &str) -> Result<bool, EditError> {
    let aot = keys_mut(doc)?;
    let Some(t) = aot.iter_mut().find(|t| str_field(t, "id") == Some(id)) else {
        return Err(EditError::Refused(format!("no key with id {id:?}")));
    };
    if state_of(t) == Some(KeyState::Revoked) {
        return Ok(false);
    }
    set(t, "state", Value::from("revoked"));
    Ok(true)
}

/// A comma-separated scope list from the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeList(pub Vec<String>);

/// Parses a `--scopes` argument.
pub fn parse_scope_list(s: &str) -> Result<ScopeList, String> {
    parse_scopes(s).map(ScopeList)
}

/// Parses `a,b c` into scopes, validating each.
pub fn parse_scopes(s: &str) -> Result<Vec<String>, String> {
    let mut out: Vec<String> = Vec::new();
    for scope in s.split([',', ' ']).filter(|x| !x.is_empty()) {
        if !keyfile::is_scope(scope) {
            return Err(format!("invalid scope {scope:?}"));
        }
        if !out.iter().any(|o| o == scope) {
            out.push(scope.to_owned());
        }
    }
    Ok(out)
}

/// Runs an edit under the file lock and commits it. An edit that leaves
/// the document as it was (revoking a revoked key) writes nothing and adds
/// no history entry, so the next rollback undoes a real change.
pub fn edit<T>(
    path: &Path,
    change: impl FnOnce(&mut DocumentMut) -> Result<T, EditError>,
) -> Result<T, EditError> {
    edit_when(path, change, |_| Ok(()))
}

/// [`edit`], calling `ready` with the change's result once the edited file
/// has validated and before it is written; an error from `ready` leaves
/// the file as it was. `keys new` and `keys rotate` print the secret there,
/// so a secret that cannot be handed over is never a key.
pub fn edit_when<T>(
    path: &Path,
    change: impl FnOnce(&mut DocumentMut) -> Result<T, EditError>,
    ready: impl FnOnce(&T) -> Result<(), EditError>,
) -> Result<T, EditError> {
    let editor = Editor::open(path)?;
    let mut doc = editor.document()?;
    let before = doc.to_string();
    let out = change(&mut doc)?;
    let after = doc.to_string();
    if editor.original().is_some() && after == before {
        ready(&out)?;
        return Ok(out);
    }
    let text = editor.render(&doc, after);
    editor.commit_when(&text, ParseOptions::default(), || ready(&out))?;
    Ok(out)
}

/// `keys rollback`: restores the version before the last edit.
pub fn rollback(path: &Path) -> Result<crate::edit::RolledBack, EditError> {
    Editor::open(path)?.rollback(ParseOptions {
        allow_empty: true,
        ..ParseOptions::default()
    })
}

/// `keys list`: a table of the keys (no digests).
pub fn list(path: &Path, now: Timestamp) -> Result<String, keyfile::KeyFileError> {
    let (file, _) = keyfile::load(
        path,
        ParseOptions {
            allow_empty: true,
            ..ParseOptions::default()
        },
    )?;
    let fmt_time = |t: Option<Timestamp>| t.map_or_else(|| "-".to_owned(), |t| t.to_string());
    let mut rows = vec![[
        "ID".to_owned(),
        "CLIENT".to_owned(),
        "STATE".to_owned(),
        "SCOPES".to_owned(),
        "NOT_BEFORE".to_owned(),
        "EXPIRES_AT".to_owned(),
    ]];
    for k in &file.keys {
        let mut state = k.state.to_string();
        if k.state != KeyState::Revoked {
            if k.expires_at.is_some_and(|e| now >= e) {
                state.push_str(" (expired)");
            } else if k.not_before.is_some_and(|nb| now < nb) {
                state.push_str(" (not yet valid)");
            }
        }
        rows.push([
            k.id.clone(),
            k.client.clone(),
            state,
            if k.scopes.is_empty() {
                "-".into()
            } else {
                k.scopes.join(",")
            },
            fmt_time(k.not_before),
            fmt_time(k.expires_at),
        ]);
    }
    Ok(render_table(&rows))
}

/// Left-aligned columns separated by two spaces.
pub fn render_table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == N {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `keys hash`: SHA-256 hex of the secret on `input` (one trailing newline
/// ignored, so `echo "$SECRET" | keyward keys hash` works). Refuses what
/// no check could ever present as a key: nothing at all, or a secret of
/// keyward's shape whose checksum fails (a copying mistake: keyward refuses
/// it before any lookup).
pub fn hash(mut input: impl std::io::Read) -> std::io::Result<String> {
    let mut buf = Vec::new();
    input.read_to_end(&mut buf)?;
    if buf.ends_with(b"\n") {
        buf.pop();
        if buf.ends_with(b"\r") {
            buf.pop();
        }
    }
    let refuse = |why: &str| Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, why));
    if buf.is_empty() {
        return refuse("no secret on standard input");
    }
    if !secret::plausible(&buf) {
        return refuse(
            "this secret has the shape of a keyward secret but its checksum fails: \
             it was probably copied wrong, and keyward would refuse it",
        );
    }
    Ok(hex::encode(crate::decide::digest_bytes(&buf)))
}

/// Reads all of stdin (for `keys hash`).
pub fn stdin() -> impl std::io::Read {
    std::io::stdin().take(1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Timestamp {
        "2026-11-27T12:00:00Z".parse().unwrap()
    }

    const FILE: &str = r#"# Production keys. Edited by keyward; comments survive.

# acme's trading bot
[[keys]]
id = "acme-1"   # the first key
client = "acme"
sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
scopes = ["read", "trade"]
expires_at = 2026-12-01T00:00:00Z # contract end

[[keys]]
id = "acme-0"
client = "acme"
sha256 = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752"
state = "revoked"

[[keys]]
id = "globex-1"
client = "globex"
sha256 = "fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9"
"#;

    fn doc() -> DocumentMut {
        FILE.parse().unwrap()
    }

    fn valid(doc: &DocumentMut) -> keyfile::KeyFile {
        keyfile::parse_str(&doc.to_string(), ParseOptions::default()).unwrap()
    }

    #[test]
    fn new_appends_a_valid_key_and_keeps_everything_else() {
        let mut d = doc();
        let spec = NewKey {
            client: "initech".into(),
            scopes: vec!["read".into()],
            expires_in: Some(Duration::from_secs(86_400)),
            ..NewKey::default()
        };
        let added = new_key(&mut d, &spec, now()).unwrap();
        let text = d.to_string();
        assert!(
            text.starts_with(FILE),
            "existing text is untouched:\n{text}"
        );
        assert!(added.id.starts_with("initech-20261127-"), "{}", added.id);
        assert!(secret::checksum_ok(&added.secret));
        assert!(!text.contains(&added.secret), "the secret is never written");
        let file = valid(&d);
        let k = file.keys.iter().find(|k| k.id == added.id).unwrap();
        assert_eq!(k.digest, crate::decide::digest(&added.secret));
        assert_eq!(k.expires_at.unwrap().to_string(), "2026-11-28T12:00:00Z");
        assert_eq!(k.scopes, vec!["read"]);
    }

    #[test]
    fn new_into_an_empty_file() {
        let mut d = DocumentMut::new();
        let added = new_key(
            &mut d,
            &NewKey {
                client: "a b/c".into(),
                ..NewKey::default()
            },
            now(),
        )
        .unwrap();
        assert!(added.id.starts_with("a-b-c-20261127-"), "{}", added.id);
        assert_eq!(valid(&d).keys.len(), 1);
        let mut d: DocumentMut = "keys = []\n".parse().unwrap();
        new_key(
            &mut d,
            &NewKey {
                client: "x".into(),
                ..NewKey::default()
            },
            now(),
        )
        .unwrap();
        assert_eq!(valid(&d).keys.len(), 1);
    }

    #[test]
    fn duplicate_ids_are_refused() {
        let mut d = doc();
        let spec = NewKey {
            id: Some("acme-1".into()),
            client: "acme".into(),
            ..NewKey::default()
        };
        assert!(
            new_key(&mut d, &spec, now())
                .unwrap_err()
                .to_string()
                .contains("already exists")
        );
    }

    #[test]
    fn rotate_deprecates_active_keys_without_extending_expiry() {
        let mut d = doc();
        let added = rotate(
            &mut d,
            "acme",
            Some("acme-2".into()),
            None,
            Duration::from_secs(7 * 86_400),
            now(),
        )
        .unwrap();
        // acme-1 already expired on Dec 1, earlier than now + 7d: kept.
        assert_eq!(
            added.deprecated,
            vec![("acme-1".to_owned(), "2026-12-01T00:00:00Z".parse().unwrap())]
        );
        let file = valid(&d);
        let old = file.keys.iter().find(|k| k.id == "acme-1").unwrap();
        assert_eq!(old.state, KeyState::Deprecated);
        assert_eq!(
            old.deprecated_at.unwrap().to_string(),
            "2026-11-27T12:00:00Z"
        );
        let new = file.keys.iter().find(|k| k.id == "acme-2").unwrap();
        assert_eq!(new.scopes, vec!["read", "trade"], "scopes inherited");
        assert_eq!(new.state, KeyState::Active);
        // The revoked key is left alone; comments and trailing comments survive.
        assert_eq!(
            file.keys.iter().find(|k| k.id == "acme-0").unwrap().state,
            KeyState::Revoked
        );
        let text = d.to_string();
        assert!(text.contains("id = \"acme-1\"   # the first key"), "{text}");
        assert!(text.contains("# contract end"), "{text}");
        assert!(text.contains("# acme's trading bot"), "{text}");

        // A short grace window shortens the expiry.
        let mut d = doc();
        rotate(
            &mut d,
            "acme",
            None,
            Some(vec!["read".into()]),
            Duration::from_secs(3600),
            now(),
        )
        .unwrap();
        let file = valid(&d);
        assert_eq!(
            file.keys[0].expires_at.unwrap().to_string(),
            "2026-11-27T13:00:00Z"
        );
        assert_eq!(file.keys.last().unwrap().scopes, vec!["read"]);
    }

    #[test]
    fn rotate_leaves_keys_issued_ahead_and_passes_on_the_rate_limit() {
        let mut d: DocumentMut = r#"[[keys]]
id = "bot-1"
client = "bot"
sha256 = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752"
scopes = ["read"]
rate_limit = { requests = 5, per = "1s" } # tight

[[keys]]
id = "bot-next"
client = "bot"
sha256 = "fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9"
scopes = ["read"]
not_before = 2026-12-31T00:00:00Z
"#
        .parse()
        .unwrap();
        // Half a second past the second: the deprecation is not dated after it.
        let at = now() + SignedDuration::from_millis(600);
        let added = rotate(&mut d, "bot", Some("bot-2".into()), None, DEFAULT_GRACE, at).unwrap();
        // Also when the limit is written as a section of its own.
        let mut sectioned: DocumentMut = "[[keys]]\nid = \"s-1\"\nclient = \"s\"\n\
            sha256 = \"60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752\"\n\
            [keys.rate_limit] # per key\nrequests = 5\nper = \"1s\"\n"
            .parse()
            .unwrap();
        rotate(
            &mut sectioned,
            "s",
            Some("s-2".into()),
            None,
            DEFAULT_GRACE,
            at,
        )
        .unwrap();
        let file = valid(&sectioned);
        assert!(file.keys[1].rate_limit.is_some(), "{sectioned}");
        assert_eq!(file.keys[1].rate_limit, file.keys[0].rate_limit);
        // A newer active key that has expired is not the model.
        let mut expired: DocumentMut = "[[keys]]\nid = \"e-1\"\nclient = \"e\"\n\
            sha256 = \"60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752\"\n\
            scopes = [\"read\"]\n\n[[keys]]\nid = \"e-2\"\nclient = \"e\"\n\
            sha256 = \"fcde2b2edba56bf408601fb721fe9b5c338d10ee429ea04fae5511b68fbf8fb9\"\n\
            scopes = [\"old\"]\nexpires_at = 2026-01-01T00:00:00Z\n"
            .parse()
            .unwrap();
        rotate(
            &mut expired,
            "e",
            Some("e-3".into()),
            None,
            DEFAULT_GRACE,
            at,
        )
        .unwrap();
        assert_eq!(valid(&expired).keys[2].scopes, vec!["read"]);
        assert_eq!(added.scheduled, vec!["bot-next".to_owned()]);
        assert_eq!(added.deprecated.len(), 1);
        let file = valid(&d);
        let key = |id: &str| file.keys.iter().find(|k| k.id == id).unwrap();
        assert_eq!(key("bot-next").state, KeyState::Active, "left alone");
        assert_eq!(key("bot-next").expires_at, None);
        assert_eq!(key("bot-1").state, KeyState::Deprecated);
        assert_eq!(
            key("bot-1").deprecated_at.unwrap().to_string(),
            "2026-11-27T12:00:00Z"
        );
        assert_eq!(key("bot-2").rate_limit, key("bot-1").rate_limit);
        assert!(key("bot-2").rate_limit.is_some());
        let text = d.to_string();
        assert_eq!(text.matches("# tight").count(), 1, "{text}");
    }

    #[test]
    fn rotate_of_an_unknown_client_is_refused() {
        let err = rotate(&mut doc(), "hooli", None, None, DEFAULT_GRACE, now()).unwrap_err();
        assert!(
            err.to_string().contains("no keys for client \"hooli\""),
            "{err}"
        );
    }

    #[test]
    fn revoke_marks_and_reports() {
        let mut d = doc();
        assert!(revoke(&mut d, "globex-1").unwrap());
        assert!(!revoke(&mut d, "globex-1").unwrap());
        assert!(
            revoke(&mut d, "nope")
                .unwrap_err()
                .to_string()
                .contains("no key with id")
        );
        assert_eq!(valid(&d).keys[2].state, KeyState::Revoked);
    }

    #[test]
    fn hash_ignores_one_trailing_newline() {
        let expected = hex::encode(crate::decide::digest("test"));
        assert_eq!(hash(&b"test"[..]).unwrap(), expected);
        assert_eq!(hash(&b"test\n"[..]).unwrap(), expected);
        assert_eq!(hash(&b"test\r\n"[..]).unwrap(), expected);
        assert_ne!(hash(&b"test\n\n"[..]).unwrap(), expected);
        assert!(hash(&b""[..]).is_err(), "nothing");
        assert!(hash(&b"\n"[..]).is_err(), "nothing but a newline");
        let good = secret::generate().unwrap();
        assert!(hash(good.as_bytes()).is_ok());
        let last = if good.ends_with('0') { "1" } else { "0" };
        let typo = format!("{}{last}", &good[..good.len() - 1]);
        let e = hash(typo.as_bytes()).unwrap_err().to_string();
        assert!(e.contains("checksum fails"), "{e}");
    }

    #[test]
    fn scopes_parse() {
        assert_eq!(
            parse_scopes("read,trade read").unwrap(),
            vec!["read", "trade"]
        );
        assert!(parse_scopes("a,b\u{1}").is_err());
    }
}
