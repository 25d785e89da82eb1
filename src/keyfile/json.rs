//! Key files in JSON: the structure of the TOML file, written as JSON.
//!
//! ```json
//! {
//!   "keys": [
//!     { "id": "acme-2026-11", "client": "acme", "sha256": "9f86d0…",
//!       "scopes": ["read", "trade"], "expires_at": "2027-02-27T00:00:00Z" }
//!   ]
//! }
//! ```
//!
//! A JSON file is read by writing out the TOML it stands for, which the one
//! validator (and the fast parser) then read: both formats accept exactly
//! the same files, with the same rules and messages. Every member name and
//! value of the JSON is marked with where it lands in that TOML text, so
//! each problem is reported at the line and column of the JSON file.
//!
//! Edits (`keyward keys …`) go the same way and back: the JSON becomes a
//! TOML document, the edit changes it, and [`to_json`] writes it out again,
//! members in their order, indented as the file was.

use std::fmt::Write as _;

use jsonc_parser::ast::{Object, ObjectPropName, Value};

use super::{Diagnostic, position};

/// The TOML a JSON key file stands for.
#[derive(Debug)]
pub struct Translated {
    /// The TOML text.
    pub toml: String,
    /// (offset in `toml`, offset in the JSON) of every name and value
    /// written, in TOML order.
    marks: Vec<(usize, usize)>,
    /// Problems the TOML cannot express (a `null`, a member twice), at
    /// their JSON positions.
    pub problems: Vec<Diagnostic>,
    /// (JSON offset of the object, name) of each member left out for being
    /// `null`: already reported, so not again as missing.
    nulls: Vec<(usize, String)>,
}

impl Translated {
    /// The JSON offset of what the TOML holds at `toml_offset`: the start
    /// of the name or value written there.
    fn json_offset(&self, toml_offset: usize) -> usize {
        let i = self.marks.partition_point(|&(t, _)| t <= toml_offset);
        i.checked_sub(1).map_or(0, |i| self.marks[i].1)
    }

    /// Moves diagnostics about the TOML text to where they are in `json`,
    /// worded for JSON, with the translation's own problems among them, in
    /// file order.
    pub fn diagnostics_in(&self, json: &str, toml_diags: Vec<Diagnostic>) -> Vec<Diagnostic> {
        let lines = self.lines(json);
        let mut out: Vec<Diagnostic> = toml_diags
            .into_iter()
            .filter_map(|d| {
                let at = self.json_offset(offset_of(&self.toml, &lines.toml, d.line, d.column));
                let said_null = self.nulls.iter().any(|(object, name)| {
                    *object == at
                        && d.message
                            .strip_prefix("missing required field `")
                            .and_then(|m| m.strip_prefix(name.as_str()))
                            .is_some_and(|m| m.starts_with('`'))
                });
                if said_null {
                    return None;
                }
                let (line, column) = position(json, at);
                Some(Diagnostic {
                    line,
                    column,
                    message: lines.reword(&d.message),
                })
            })
            .chain(self.problems.iter().cloned())
            .collect();
        out.sort_by_key(|d| (d.line, d.column));
        out
    }

    /// Maps lines of the TOML text to lines of `json`.
    pub fn lines<'s>(&'s self, json: &str) -> Lines<'s> {
        Lines {
            translated: self,
            toml: line_starts(&self.toml),
            json: line_starts(json),
        }
    }
}

/// Lines of a translation's TOML text mapped to lines of its JSON file.
#[derive(Debug)]
pub struct Lines<'s> {
    translated: &'s Translated,
    toml: Vec<usize>,
    json: Vec<usize>,
}

impl Lines<'_> {
    /// The JSON line of TOML line `line` (1-based): where what starts that
    /// line came from (a key's or route's object, for their headers).
    pub fn json_line(&self, line: usize) -> usize {
        let t = &self.translated;
        let at = t.json_offset(offset_of(&t.toml, &self.toml, line, 1));
        self.json.partition_point(|&start| start <= at).max(1)
    }

    /// `message` worded for JSON, the TOML lines it names (`on line 14`)
    /// turned into JSON lines.
    fn reword(&self, message: &str) -> String {
        let message = for_json(message);
        let mut out = String::with_capacity(message.len());
        let mut rest = message.as_str();
        while let Some(at) = rest.find("on line ") {
            let digits_at = at + "on line ".len();
            let digits = rest[digits_at..]
                .bytes()
                .take_while(u8::is_ascii_digit)
                .count();
            out.push_str(&rest[..digits_at]);
            match rest[digits_at..digits_at + digits].parse::<usize>() {
                Ok(line) => out.push_str(&self.json_line(line).to_string()),
                Err(_) => out.push_str(&rest[digits_at..digits_at + digits]),
            }
            rest = &rest[digits_at + digits..];
        }
        out.push_str(rest);
        out
    }
}

/// Rewords the validator's TOML terms for a JSON file.
fn for_json(message: &str) -> String {
    message
        .replace(
            "an array of tables, written as [[keys]] sections",
            "an array of objects",
        )
        .replace(
            "an array of tables, written as [[routes]] sections",
            "an array of objects",
        )
        .replace("[[keys]] or [[routes]]", "`keys` or `routes`")
        .replace("in [[keys]]", "in a key")
        .replace("in [[routes]]", "in a route")
        .replace("invalid TOML", "invalid value")
}

fn line_starts(text: &str) -> Vec<usize> {
    std::iter::once(0)
        .chain(text.match_indices('\n').map(|(i, _)| i + 1))
        .collect()
}

/// Byte offset of 1-based (line, column in characters) in `text`.
fn offset_of(text: &str, line_starts: &[usize], line: usize, column: usize) -> usize {
    let Some(&start) = line_starts.get(line.saturating_sub(1)) else {
        return text.len();
    };
    let rest = &text[start..];
    rest.char_indices()
        .nth(column.saturating_sub(1))
        .map_or(text.len(), |(i, _)| start + i)
}

/// Translates a JSON key file into TOML, or says where it is not JSON (or
/// not an object at the top).
pub fn translate(json: &str) -> Result<Translated, Diagnostic> {
    let options = jsonc_parser::ParseOptions {
        allow_comments: false,
        allow_loose_object_property_names: false,
        allow_trailing_commas: false,
        allow_missing_commas: false,
        allow_single_quoted_strings: false,
        allow_hexadecimal_numbers: false,
        allow_unary_plus_numbers: false,
        allow_bare_decimal_point_numbers: false,
        allow_non_finite_numbers: false,
        allow_extended_string_escapes: false,
    };
    let parsed = jsonc_parser::parse_to_ast(json, &Default::default(), &options).map_err(|e| {
        let (line, column) = position(json, e.range().start);
        Diagnostic {
            line,
            column,
            message: format!("invalid JSON: {}", e.kind()),
        }
    })?;
    let root = match parsed.value {
        Some(Value::Object(root)) => root,
        other => {
            let at = other.as_ref().map_or(0, |v| range_of(v).start);
            let (line, column) = position(json, at);
            return Err(Diagnostic {
                line,
                column,
                message: "a JSON key file holds one object, with a `keys` array of key objects"
                    .into(),
            });
        }
    };
    let mut t = Writer {
        json,
        out: Translated {
            toml: String::with_capacity(json.len()),
            marks: Vec::new(),
            problems: Vec::new(),
            nulls: Vec::new(),
        },
    };
    t.root(&root);
    Ok(t.out)
}

struct Writer<'j> {
    json: &'j str,
    out: Translated,
}

impl Writer<'_> {
    fn mark(&mut self, json_offset: usize) {
        self.out.marks.push((self.out.toml.len(), json_offset));
    }

    fn problem(&mut self, json_offset: usize, message: String) {
        let (line, column) = position(self.json, json_offset);
        self.out.problems.push(Diagnostic {
            line,
            column,
            message,
        });
    }

    /// The members of `object` to write: each name once, no `null`.
    fn members<'o, 'a>(&mut self, object: &'o Object<'a>) -> Vec<(&'o str, usize, &'o Value<'a>)> {
        let mut seen = ahash::AHashSet::new();
        let mut out = Vec::with_capacity(object.properties.len());
        for prop in &object.properties {
            let (name, at) = match &prop.name {
                ObjectPropName::String(s) => (s.value.as_ref(), s.range.start),
                ObjectPropName::Word(w) => (w.value, w.range.start),
            };
            if !seen.insert(name) {
                self.problem(at, format!("`{name}` appears twice in this object"));
                continue;
            }
            if let Value::NullKeyword(n) = &prop.value {
                self.problem(
                    n.range.start,
                    format!("`{name}` is null: leave the field out instead"),
                );
                self.out.nulls.push((object.range.start, name.to_owned()));
                continue;
            }
            out.push((name, at, &prop.value));
        }
        out
    }

    fn root(&mut self, root: &Object<'_>) {
        let members = self.members(root);
        // A TOML value after a table header would belong to that table:
        // plain values first, then the arrays of tables.
        let is_tables = |v: &Value<'_>| {
            matches!(v, Value::Array(a)
                if !a.elements.is_empty() && a.elements.iter().all(|e| matches!(e, Value::Object(_))))
        };
        for &(name, at, value) in members.iter().filter(|(_, _, v)| !is_tables(v)) {
            self.mark(at);
            write_key(&mut self.out.toml, name);
            self.out.toml.push_str(" = ");
            self.value(value);
            self.out.toml.push('\n');
        }
        for &(name, at, value) in members.iter().filter(|(_, _, v)| is_tables(v)) {
            let Value::Array(array) = value else {
                continue;
            };
            for element in &array.elements {
                let Value::Object(table) = element else {
                    continue;
                };
                self.out.toml.push('\n');
                self.mark(table.range.start);
                self.out.toml.push_str("[[");
                self.mark(at);
                write_key(&mut self.out.toml, name);
                self.mark(table.range.start);
                self.out.toml.push_str("]]\n");
                for (field, field_at, v) in self.members(table) {
                    self.mark(field_at);
                    write_key(&mut self.out.toml, field);
                    self.out.toml.push_str(" = ");
                    self.value(v);
                    self.out.toml.push('\n');
                }
            }
        }
        // Where the TOML ends (a problem reported at its end) is the end of
        // the JSON object.
        self.mark(root.range.end.saturating_sub(1));
    }

    /// Writes `value` inline, on one line.
    fn value(&mut self, value: &Value<'_>) {
        self.mark(range_of(value).start);
        match value {
            Value::StringLit(s) => write_string(&mut self.out.toml, &s.value),
            // JSON's number syntax is a subset of TOML's (for integers and
            // floats alike); numbers TOML cannot hold are reported there.
            Value::NumberLit(n) => self.out.toml.push_str(n.value),
            Value::BooleanLit(b) => self
                .out
                .toml
                .push_str(if b.value { "true" } else { "false" }),
            Value::Array(a) => {
                self.out.toml.push('[');
                let mut first = true;
                for element in &a.elements {
                    if let Value::NullKeyword(n) = element {
                        self.problem(n.range.start, "null in an array".into());
                        continue;
                    }
                    if !first {
                        self.out.toml.push_str(", ");
                    }
                    first = false;
                    self.value(element);
                }
                self.out.toml.push(']');
            }
            Value::Object(o) => {
                self.out.toml.push('{');
                let members = self.members(o);
                for (i, (name, at, v)) in members.into_iter().enumerate() {
                    self.out.toml.push_str(if i == 0 { " " } else { ", " });
                    self.mark(at);
                    write_key(&mut self.out.toml, name);
                    self.out.toml.push_str(" = ");
                    self.value(v);
                }
                self.out.toml.push_str(" }");
            }
            // Members and elements that are null are left out above.
            Value::NullKeyword(_) => {}
        }
    }
}

fn range_of(value: &Value<'_>) -> jsonc_parser::common::Range {
    match value {
        Value::StringLit(v) => v.range,
        Value::NumberLit(v) => v.range,
        Value::BooleanLit(v) => v.range,
        Value::Object(v) => v.range,
        Value::Array(v) => v.range,
        Value::NullKeyword(v) => v.range,
    }
}

/// A TOML key: bare when TOML allows it, else a quoted string.
fn write_key(out: &mut String, name: &str) {
    if !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        out.push_str(name);
    } else {
        write_string(out, name);
    }
}

/// A quoted string, in the escapes TOML's basic strings and JSON share.
fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The indentation unit of a JSON text: that of its first indented line
/// (two spaces if none is).
pub fn indent_of(json: &str) -> String {
    json.lines()
        .map(|l| &l[..l.len() - l.trim_start_matches([' ', '\t']).len()])
        .find(|w| !w.is_empty())
        .unwrap_or("  ")
        .to_owned()
}

/// Writes a key file's TOML document as JSON: the top-level object and
/// each key or route object one member per line, indented by `indent`;
/// lists and nested objects (scopes, a rate limit) on one line. TOML
/// datetimes become RFC 3339 strings.
pub fn to_json(doc: &toml_edit::DocumentMut, indent: &str) -> String {
    use toml_edit::Item;
    let mut out = String::from("{");
    let mut first = true;
    for (name, item) in doc.as_table().iter() {
        out.push_str(if first { "\n" } else { ",\n" });
        first = false;
        out.push_str(indent);
        write_string(&mut out, name);
        out.push_str(": ");
        match item {
            Item::ArrayOfTables(aot) => {
                out.push('[');
                for (i, table) in aot.iter().enumerate() {
                    out.push_str(if i == 0 { "\n" } else { ",\n" });
                    let inner = indent.repeat(2);
                    out.push_str(&inner);
                    out.push('{');
                    for (j, (field, value)) in table.iter().enumerate() {
                        out.push_str(if j == 0 { "\n" } else { ",\n" });
                        out.push_str(&indent.repeat(3));
                        write_string(&mut out, field);
                        out.push_str(": ");
                        json_item(&mut out, value);
                    }
                    out.push('\n');
                    out.push_str(&inner);
                    out.push('}');
                }
                out.push('\n');
                out.push_str(indent);
                out.push(']');
            }
            other => json_item(&mut out, other),
        }
    }
    out.push_str(if first { "}\n" } else { "\n}\n" });
    out
}

fn json_item(out: &mut String, item: &toml_edit::Item) {
    match item {
        toml_edit::Item::Value(v) => json_value(out, v),
        // A table (or array of them) nested in a key, written inline.
        other => match other.clone().into_value() {
            Ok(v) => json_value(out, &v),
            Err(_) => out.push_str("null"),
        },
    }
}

fn json_value(out: &mut String, value: &toml_edit::Value) {
    use toml_edit::Value as V;
    match value {
        V::String(s) => write_string(out, s.value()),
        V::Integer(i) => {
            let _ = write!(out, "{}", i.value());
        }
        V::Float(f) => {
            let f = *f.value();
            if f.is_finite() {
                let _ = write!(out, "{f:?}");
            } else {
                out.push_str("null");
            }
        }
        V::Boolean(b) => out.push_str(if *b.value() { "true" } else { "false" }),
        V::Datetime(d) => write_string(out, &d.value().to_string()),
        V::Array(a) => {
            out.push('[');
            for (i, v) in a.iter().enumerate() {
                out.push_str(if i == 0 { "" } else { ", " });
                json_value(out, v);
            }
            out.push(']');
        }
        V::InlineTable(t) => {
            out.push('{');
            for (i, (k, v)) in t.iter().enumerate() {
                out.push_str(if i == 0 { "" } else { ", " });
                write_string(out, k);
                out.push_str(": ");
                json_value(out, v);
            }
            out.push('}');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyfile::{ParseOptions, parse_json_str, parse_str};

    const D1: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    const D2: &str = "60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752";

    #[test]
    fn a_json_file_reads_as_its_toml_twin() {
        let json = format!(
            r#"{{
  "keys": [
    {{
      "id": "acme-2026-11",
      "client": "acme",
      "sha256": "{D1}",
      "scopes": ["read", "trade"],
      "state": "deprecated",
      "not_before": "2026-11-01T00:00:00Z",
      "expires_at": "2027-02-27T00:00:00Z",
      "deprecated_at": "2026-11-27T00:00:00Z",
      "description": "a \"quoted\" line\nand a second, caf\u00e9",
      "rate_limit": {{ "requests": 100, "per": "1s", "burst": 200 }}
    }},
    {{ "id": "bot", "client": "bot", "sha256": "{D2}" }}
  ],
  "routes": [
    {{ "path_prefix": "/v1/orders", "methods": ["POST"], "required_scopes": ["trade"] }}
  ]
}}"#
        );
        let toml = format!(
            r#"[[keys]]
id = "acme-2026-11"
client = "acme"
sha256 = "{D1}"
scopes = ["read", "trade"]
state = "deprecated"
not_before = 2026-11-01T00:00:00Z
expires_at = 2027-02-27T00:00:00Z
deprecated_at = 2026-11-27T00:00:00Z
description = "a \"quoted\" line\nand a second, café"
rate_limit = {{ requests = 100, per = "1s", burst = 200 }}

[[keys]]
id = "bot"
client = "bot"
sha256 = "{D2}"

[[routes]]
path_prefix = "/v1/orders"
methods = ["POST"]
required_scopes = ["trade"]
"#
        );
        let from_json = parse_json_str(&json, ParseOptions::default()).unwrap();
        let mut from_toml = parse_str(&toml, ParseOptions::default()).unwrap();
        // Only the lines differ: each points into its own file (an object's
        // line in the JSON, a [[keys]] or [[routes]] header's in the TOML).
        let lines = |f: &crate::keyfile::KeyFile| {
            (
                f.keys.iter().map(|k| k.line).collect::<Vec<_>>(),
                f.routes[0].line,
            )
        };
        assert_eq!(lines(&from_json), (vec![3, 15], 18));
        assert_eq!(lines(&from_toml), (vec![1, 13], 18));
        for (j, t) in from_json.keys.iter().zip(&mut from_toml.keys) {
            t.line = j.line;
        }
        assert_eq!(from_json, from_toml);
    }

    fn problems(json: &str) -> Vec<(usize, usize, String)> {
        parse_json_str(json, ParseOptions::default())
            .unwrap_err()
            .into_iter()
            .map(|d| (d.line, d.column, d.message))
            .collect()
    }

    #[test]
    fn problems_are_reported_at_their_json_line_and_column() {
        let json = format!(
            "{{\n  \"keys\": [\n    {{\n      \"id\": \"a\",\n      \"client\": \"c\",\n      \
             \"sha256\": \"{D1}\",\n      \"expire_at\": \"2027-01-01T00:00:00Z\"\n    }},\n    \
             {{ \"id\": \"b\", \"client\": \"c\", \"sha256\": \"xyz\", \"scopes\": [\"ok\", 7] }},\n    \
             {{ \"id\": \"c\", \"client\": \"c\", \"sha256\": \"{D2}\" }},\n    \
             {{ \"id\": \"c\", \"client\": \"c\", \"sha256\": \"{D1}\" }}\n  ]\n}}\n"
        );
        let p = problems(&json);
        let at: Vec<(usize, usize)> = p.iter().map(|(l, c, _)| (*l, *c)).collect();
        assert!(
            p.iter().any(|(l, c, m)| (*l, *c) == (7, 7)
                && m.contains("expire_at")
                && m.contains("expires_at")),
            "the typo, at its name: {p:?}"
        );
        // Line 9: the bad digest at its value, the scope that is not a
        // string; line 11: the repeated id at its value (column 13).
        let sha = json.lines().nth(8).unwrap().find("\"xyz\"").unwrap() + 1;
        assert!(at.contains(&(9, sha)), "bad digest: {p:?}");
        let seven = json.lines().nth(8).unwrap().find("7]").unwrap() + 1;
        assert!(at.contains(&(9, seven)), "the scope 7: {p:?}");
        assert!(
            p.contains(&(
                11,
                5,
                "duplicate id \"c\" (first defined on line 10)".into()
            )),
            "repeated id, at its object, naming the JSON line of the first: {p:?}"
        );
        assert!(
            !p.iter()
                .any(|(_, _, m)| m.contains("TOML") || m.contains("[[")),
            "{p:?}"
        );
    }

    #[test]
    fn a_null_is_reported_once() {
        let json =
            format!("{{\"keys\": [{{\"id\": \"a\", \"client\": null, \"sha256\": \"{D1}\"}}]}}\n");
        let p = problems(&json);
        assert_eq!(
            p,
            vec![(
                1,
                33,
                "`client` is null: leave the field out instead".into()
            )],
            "{p:?}"
        );
    }

    #[test]
    fn every_line_a_message_names_is_a_json_line() {
        let json = format!(
            "{{\n  \"keys\": [\n    {{ \"client\": \"c\", \"sha256\": \"{D1}\" }},\n\n    \
             {{ \"client\": \"c\", \"sha256\": \"{D1}\" }}\n  ]\n}}\n"
        );
        let p = problems(&json);
        assert!(
            p.iter().any(|(l, _, m)| *l == 5
                && m == "the key on line 5 has the same sha256 as the key on line 3: \
                         digests must be unique"),
            "{p:?}"
        );
    }

    #[test]
    fn json_syntax_nulls_and_repeated_members_are_clear_errors() {
        let p = problems("{\n  \"keys\": [\n    { \"id\": \"a\", }\n  ]\n}\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(
            (p[0].0, p[0].2.starts_with("invalid JSON")),
            (3, true),
            "{p:?}"
        );

        let json = format!(
            "{{\"keys\": [{{\"id\": \"a\", \"client\": \"c\", \"sha256\": \"{D1}\", \
             \"expires_at\": null, \"client\": \"d\"}}]}}"
        );
        let p = problems(&json);
        assert!(
            p.iter()
                .any(|(_, c, m)| m.contains("null") && *c == json.find("null").unwrap() + 1),
            "{p:?}"
        );
        assert!(p.iter().any(|(_, c, m)| m.contains("twice") && *c == json.rfind("\"client\"").unwrap() + 1), "{p:?}");

        for not_an_object in ["[]", "\"keys\"", "", "  7"] {
            let p = problems(not_an_object);
            assert_eq!(p.len(), 1, "{not_an_object:?}: {p:?}");
        }
        let p = problems("{\"keys\": [1, 2]}");
        assert!(p[0].2.contains("array of objects"), "{p:?}");
        let p = problems("{\"keys\": []}");
        assert!(p[0].2.contains("no keys"), "{p:?}");
        assert!(
            parse_json_str(
                "{\"keys\": []}",
                ParseOptions {
                    allow_empty: true,
                    ..Default::default()
                }
            )
            .is_ok()
        );
    }

    #[test]
    fn strings_survive_the_translation_whatever_they_hold() {
        for text in [
            "plain",
            "quote \" backslash \\ tab \t",
            "nul \u{0} del \u{7f}",
            "ünï 🦀",
            "\u{2028}",
        ] {
            let mut toml = String::from("x = ");
            write_string(&mut toml, text);
            let doc: toml_edit::DocumentMut =
                toml.parse().unwrap_or_else(|e| panic!("{toml}: {e}"));
            assert_eq!(doc["x"].as_str(), Some(text));
            let mut json = String::new();
            write_string(&mut json, text);
            let back = jsonc_parser::parse_to_ast(&json, &Default::default(), &Default::default())
                .unwrap();
            let Some(Value::StringLit(s)) = back.value else {
                panic!("{json}")
            };
            assert_eq!(s.value, text);
        }
        let mut key = String::new();
        write_key(&mut key, "with space");
        assert_eq!(key, "\"with space\"");
    }

    #[test]
    fn a_document_goes_back_to_json_in_the_file_indentation() {
        let json = format!(
            "{{\n    \"keys\": [\n        {{\n            \"id\": \"a\",\n            \"client\": \"c\",\n            \
             \"sha256\": \"{D1}\",\n            \"scopes\": [\"read\"],\n            \
             \"rate_limit\": {{\"requests\": 5, \"per\": \"1s\", \"burst\": 5}}\n        }}\n    ]\n}}\n"
        );
        assert_eq!(indent_of(&json), "    ");
        let t = translate(&json).unwrap();
        let doc: toml_edit::DocumentMut = t.toml.parse().unwrap();
        assert_eq!(
            to_json(&doc, &indent_of(&json)),
            json,
            "unchanged, byte for byte"
        );
        assert_eq!(to_json(&toml_edit::DocumentMut::new(), "  "), "{}\n");
    }
}
