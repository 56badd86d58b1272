//! Reading resources from YAML text.
//!
//! Contract: [`load_str`] reads a multi-document YAML stream (`---`
//! separated; empty documents are skipped) into typed resources, each with
//! the file and line of its document. It reports every broken document, not
//! just the first: malformed YAML (with its line and column), documents that
//! are not mappings, unknown `kind`/`apiVersion` (listing the known ones),
//! and type errors (unknown field, wrong type, bad enum value, missing field)
//! with the resource and the field path. It never panics, whatever the input.
//!
//! Non-goals: semantic checks (limits, references, regexes): see
//! [`crate::validate`]. YAML merge keys (`<<`) and tags are not supported.

use std::path::Path;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde_yaml::Value;

use crate::error::{Error, Errors};
use crate::resources::{Kind, Resource, DEFAULT_NAMESPACE};
use crate::source::{Doc, Sourced};

/// Reads every resource in `text`; `file` names the source in messages.
pub fn load_str(file: &str, text: &str) -> Result<Vec<Sourced<Resource>>, Errors> {
    let file: Arc<str> = Arc::from(file);
    let mut out = Vec::new();
    let mut errors = Errors::default();
    for chunk in split_documents(text) {
        match load_document(&file, chunk) {
            Ok(Some(r)) => out.push(r),
            Ok(None) => {}
            Err(e) => errors.push(*e),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// Reads every resource in the file at `path`.
pub fn load_file(path: impl AsRef<Path>) -> Result<Vec<Sourced<Resource>>, Errors> {
    let path = path.as_ref();
    let name = path.display().to_string();
    match std::fs::read(path) {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(text) => load_str(&name, &text),
            Err(e) => Err(Error {
                file: name,
                line: None,
                column: None,
                resource: None,
                field: None,
                message: format!("not UTF-8 text: {e}"),
            }
            .into()),
        },
        Err(e) => Err(Error {
            file: name,
            line: None,
            column: None,
            resource: None,
            field: None,
            message: format!("cannot read file: {e}"),
        }
        .into()),
    }
}

/// One YAML document of a stream: its text and the 0-based line it starts on.
struct Chunk<'a> {
    text: &'a str,
    first_line: usize,
}

/// Splits a stream at `---` (document start) and `...` (document end) marker
/// lines. Markers are only recognised at column 0 followed by whitespace or
/// the end of the line, which is where YAML itself recognises them.
fn split_documents(text: &str) -> Vec<Chunk<'_>> {
    let mut chunks = Vec::new();
    let mut start = 0usize; // byte offset of the current chunk
    let mut start_line = 0usize;
    let mut offset = 0usize;
    for (line_no, line) in text.split_inclusive('\n').enumerate() {
        let next = offset + line.len();
        if is_marker(line, "---") {
            if offset > start {
                chunks.push(Chunk {
                    text: &text[start..offset],
                    first_line: start_line,
                });
            }
            start = offset;
            start_line = line_no;
        } else if is_marker(line, "...") {
            chunks.push(Chunk {
                text: &text[start..next],
                first_line: start_line,
            });
            start = next;
            start_line = line_no + 1;
        }
        offset = next;
    }
    if text.len() > start {
        chunks.push(Chunk {
            text: &text[start..],
            first_line: start_line,
        });
    }
    chunks
}

fn is_marker(line: &str, marker: &str) -> bool {
    match line.strip_prefix(marker) {
        Some(rest) => rest.is_empty() || rest.starts_with([' ', '\t', '\r', '\n']),
        None => false,
    }
}

/// 1-based line of the first line with content (not blank, comment, bare
/// marker or directive), if any.
fn first_content_line(chunk: &Chunk<'_>) -> Option<usize> {
    for (i, line) in chunk.text.lines().enumerate() {
        let mut l = line.trim_start_matches('\u{feff}');
        if is_marker(l, "---") || is_marker(l, "...") {
            l = &l[3..];
        } else if l.starts_with('%') {
            continue;
        }
        let t = l.trim();
        if t.is_empty() || t.starts_with('#') {
            continue;
        }
        return Some(chunk.first_line + i + 1);
    }
    None
}

fn load_document(
    file: &Arc<str>,
    chunk: Chunk<'_>,
) -> Result<Option<Sourced<Resource>>, Box<Error>> {
    let Some(line) = first_content_line(&chunk) else {
        return Ok(None);
    };
    let err = |line: usize,
               column: Option<usize>,
               resource: Option<String>,
               field: Option<String>,
               message: String| {
        Box::new(Error {
            file: file.to_string(),
            line: Some(line),
            column,
            resource,
            field,
            message,
        })
    };
    let value: Value = match serde_yaml::from_str(chunk.text) {
        Ok(v) => v,
        Err(e) => {
            let (l, c) = match e.location() {
                Some(loc) => (chunk.first_line + loc.line(), Some(loc.column())),
                None => (line, None),
            };
            return Err(err(
                l,
                c,
                None,
                None,
                format!(
                    "invalid YAML: {}",
                    shift_lines(&clean_message(&e), chunk.first_line)
                ),
            ));
        }
    };
    let map = match &value {
        Value::Null => return Ok(None),
        Value::Mapping(m) => m,
        other => {
            return Err(err(
                line,
                None,
                None,
                None,
                format!(
                    "expected a resource (a mapping with apiVersion, kind, metadata and spec), found {}",
                    value_kind(other)
                ),
            ))
        }
    };
    let get_str =
        |m: &serde_yaml::Mapping, k: &str| m.get(k).and_then(Value::as_str).map(str::to_string);
    let api_version = get_str(map, "apiVersion");
    let kind_name = get_str(map, "kind");
    let meta = map.get("metadata").and_then(Value::as_mapping);
    let name = meta.and_then(|m| get_str(m, "name"));
    let namespace = meta
        .and_then(|m| get_str(m, "namespace"))
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());

    let Some(kind_name) = kind_name else {
        return Err(err(
            line,
            None,
            None,
            Some("kind".into()),
            format!(
                "missing or not a string; expected one of: {}",
                Kind::known_list()
            ),
        ));
    };
    let resource = Some(match &name {
        Some(n) => format!("{kind_name} {namespace}/{n}"),
        None => kind_name.clone(),
    });
    let Some(kind) = Kind::from_name(&kind_name) else {
        return Err(err(
            line,
            None,
            resource,
            Some("kind".into()),
            format!(
                "unknown kind {kind_name:?}; known kinds: {}",
                Kind::known_list()
            ),
        ));
    };
    let Some(api_version) = api_version else {
        return Err(err(
            line,
            None,
            resource,
            Some("apiVersion".into()),
            format!(
                "missing or not a string; expected {}",
                kind.api_versions().join(" or ")
            ),
        ));
    };
    if !kind.api_versions().contains(&api_version.as_str()) {
        return Err(err(
            line,
            None,
            resource,
            Some("apiVersion".into()),
            format!(
                "unknown apiVersion {api_version:?} for kind {kind}; expected {}; known kinds: {}",
                kind.api_versions().join(" or "),
                Kind::known_list()
            ),
        ));
    }

    let typed = match kind {
        Kind::Mesh => typed(chunk.text).map(Resource::Mesh),
        Kind::Service => typed(chunk.text).map(Resource::Service),
        Kind::Workload => typed(chunk.text).map(Resource::Workload),
        Kind::HttpRoute => typed(chunk.text).map(Resource::HttpRoute),
        Kind::GrpcRoute => typed(chunk.text).map(Resource::GrpcRoute),
        Kind::TcpRoute => typed(chunk.text).map(Resource::TcpRoute),
        Kind::TrafficPolicy => typed(chunk.text).map(Resource::TrafficPolicy),
        Kind::AuthorizationPolicy => typed(chunk.text).map(Resource::AuthorizationPolicy),
    };
    match typed {
        Ok(r) => {
            let doc = Arc::new(Doc {
                text: chunk.text.to_string(),
                first_line: chunk.first_line,
            });
            Ok(Some(Sourced::with_doc(file.clone(), line, r, doc)))
        }
        Err(te) => {
            let (l, c) = match te.location {
                Some((l, c)) => (chunk.first_line + l, Some(c)),
                None => (line, None),
            };
            Err(err(l, c, resource, te.path, te.message))
        }
    }
}

struct TypedError {
    path: Option<String>,
    location: Option<(usize, usize)>,
    message: String,
}

fn typed<T: DeserializeOwned>(text: &str) -> Result<T, TypedError> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        TypedError {
            path: if path.is_empty() || path == "." {
                None
            } else {
                Some(path)
            },
            location: inner.location().map(|l| (l.line(), l.column())),
            message: integer_range(&clean_message(&inner)),
        }
    })
}

/// Says plainly that a number does not fit its field: serde's `invalid
/// type: integer `-1`, expected u32` (or `invalid value: ...`) becomes `-1
/// is negative: expected a whole number from 0 to 4294967295`.
fn integer_range(msg: &str) -> String {
    let rest = msg
        .strip_prefix("invalid type: integer `")
        .or_else(|| msg.strip_prefix("invalid value: integer `"));
    let Some((n, ty)) = rest.and_then(|r| r.split_once("`, expected ")) else {
        return msg.to_string();
    };
    let max: u64 = match ty {
        "u8" => u8::MAX.into(),
        "u16" => u16::MAX.into(),
        "u32" => u32::MAX.into(),
        "u64" => u64::MAX,
        _ => return msg.to_string(),
    };
    let why = if n.starts_with('-') {
        "is negative"
    } else {
        "is too large"
    };
    format!("{n} {why}: expected a whole number from 0 to {max}")
}

/// `serde_yaml`'s message without the path prefix and position suffix it adds
/// (we print both ourselves, in our own format).
fn clean_message(e: &serde_yaml::Error) -> String {
    let mut s = e.to_string();
    if let Some(loc) = e.location() {
        let suffix = format!(" at line {} column {}", loc.line(), loc.column());
        if let Some(stripped) = s.strip_suffix(&suffix) {
            s = stripped.to_string();
        }
    }
    // A leading `path: ` (no spaces in the path) is serde_yaml's own path.
    if let Some(i) = s.find(": ") {
        let head = &s[..i];
        let looks_like_path = !head.is_empty()
            && head
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '[' | ']' | '_' | '-'))
            && !matches!(head, "invalid" | "unknown" | "missing" | "duplicate");
        if looks_like_path {
            s = s[i + 2..].to_string();
        }
    }
    s
}

/// Rewrites `line N` in a parser message (relative to the document) into
/// file lines.
fn shift_lines(msg: &str, offset: usize) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut rest = msg;
    while let Some(i) = rest.find("line ") {
        let (head, tail) = rest.split_at(i + 5);
        out.push_str(head);
        let digits = tail.bytes().take_while(u8::is_ascii_digit).count();
        match tail[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + offset).to_string()),
            Err(_) => out.push_str(&tail[..digits]),
        }
        rest = &tail[digits..];
    }
    out.push_str(rest);
    out
}

fn value_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn splits_on_markers_only_at_column_zero() {
        let text = "a: 1\n---\nb: 2\n  ---\n--- c: 3\n...\n# tail\n";
        let chunks = split_documents(text);
        let texts: Vec<_> = chunks.iter().map(|c| (c.first_line, c.text)).collect();
        assert_eq!(
            texts,
            vec![
                (0, "a: 1\n"),
                (1, "---\nb: 2\n  ---\n"),
                (4, "--- c: 3\n...\n"),
                (6, "# tail\n")
            ]
        );
        assert_eq!(first_content_line(&chunks[1]), Some(3));
        assert_eq!(first_content_line(&chunks[2]), Some(5));
        assert_eq!(first_content_line(&chunks[3]), None);
    }

    #[test]
    fn empty_and_comment_only_documents_are_skipped() {
        let r = load_str("f", "---\n# nothing\n---\n\n---\n").unwrap();
        assert!(r.is_empty());
        assert!(load_str("f", "").unwrap().is_empty());
    }

    #[test]
    fn parser_positions_are_file_lines() {
        assert_eq!(
            shift_lines("x at line 4 column 9, in line 3", 10),
            "x at line 14 column 9, in line 13"
        );
        assert_eq!(shift_lines("no lines; line x", 10), "no lines; line x");
    }

    #[test]
    fn integer_errors_say_the_range() {
        assert_eq!(
            integer_range("invalid type: integer `-1`, expected u32"),
            "-1 is negative: expected a whole number from 0 to 4294967295"
        );
        assert_eq!(
            integer_range("invalid value: integer `70000`, expected u16"),
            "70000 is too large: expected a whole number from 0 to 65535"
        );
        assert_eq!(
            integer_range("invalid type: string"),
            "invalid type: string"
        );
    }

    #[test]
    fn clean_message_strips_path_and_position() {
        let e = serde_yaml::from_str::<u32>("x").unwrap_err();
        assert!(
            !clean_message(&e).contains(" at line "),
            "{}",
            clean_message(&e)
        );
    }
}
