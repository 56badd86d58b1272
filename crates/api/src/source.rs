//! Where a resource came from, and finding the line of a field inside it.
//!
//! Contract: [`Sourced`] pairs a value with the file and 1-based line of the
//! YAML document it was read from, and keeps that document's text so that
//! validation errors found later can point at the exact line and column of
//! the offending field ([`Sourced::locate`]). Resources built in code (no
//! text) locate every field at the document line.
//!
//! How: the document is parsed again with a `serde` seed that walks the field
//! path and fails on purpose when it reaches the target; `serde_yaml` stamps
//! that error with the position of the node being read, which is exactly the
//! position we want. Non-goals: positions for flow-style edge cases beyond what
//! `serde_yaml` reports.

use std::fmt;
use std::sync::Arc;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::error::{Error, FieldPath, Seg};

/// A value with the place it was read from.
#[derive(Clone)]
pub struct Sourced<T> {
    /// File (or other source name) of the document.
    pub file: Arc<str>,
    /// 1-based line of the document's first content line.
    pub line: usize,
    /// The value.
    pub value: T,
    doc: Option<Arc<Doc>>,
}

/// The text of one YAML document and the 0-based line where it starts in its file.
#[derive(Debug)]
pub(crate) struct Doc {
    pub(crate) text: String,
    pub(crate) first_line: usize,
}

impl<T> Sourced<T> {
    /// A value that was not read from text (e.g. built by the control plane).
    pub fn new(file: impl Into<Arc<str>>, line: usize, value: T) -> Self {
        Sourced {
            file: file.into(),
            line,
            value,
            doc: None,
        }
    }

    pub(crate) fn with_doc(file: Arc<str>, line: usize, value: T, doc: Arc<Doc>) -> Self {
        Sourced {
            file,
            line,
            value,
            doc: Some(doc),
        }
    }

    /// The same place with another value.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Sourced<U> {
        Sourced {
            file: self.file,
            line: self.line,
            value: f(self.value),
            doc: self.doc,
        }
    }

    /// Takes the value out, leaving the place (with a unit value).
    pub fn split(self) -> (T, Sourced<()>) {
        (
            self.value,
            Sourced {
                file: self.file,
                line: self.line,
                value: (),
                doc: self.doc,
            },
        )
    }

    /// The same place, borrowing the value.
    pub fn as_ref(&self) -> Sourced<&T> {
        Sourced {
            file: self.file.clone(),
            line: self.line,
            value: &self.value,
            doc: self.doc.clone(),
        }
    }

    /// `file:line`, for "first defined at" messages.
    pub fn place(&self) -> String {
        format!("{}:{}", self.file, self.line)
    }

    /// Line and column (1-based) of `path` inside this document; the closest
    /// enclosing field that exists when `path` itself does not; the document
    /// line when there is no text.
    pub fn locate(&self, path: &FieldPath) -> (usize, Option<usize>) {
        let Some(doc) = &self.doc else {
            return (self.line, None);
        };
        let segs = path.segments();
        for n in (0..=segs.len()).rev() {
            if let Some((line, col)) = locate_in(&doc.text, &segs[..n]) {
                return (doc.first_line + line, Some(col));
            }
        }
        (self.line, None)
    }

    /// An error about `path` in this resource; `resource` is `Kind ns/name`.
    pub(crate) fn error(
        &self,
        resource: Option<String>,
        path: &FieldPath,
        message: impl Into<String>,
    ) -> Error {
        let (line, column) = self.locate(path);
        Error {
            file: self.file.to_string(),
            line: Some(line),
            column,
            resource,
            field: if path.is_empty() {
                None
            } else {
                Some(path.to_string())
            },
            message: message.into(),
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for Sourced<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sourced")
            .field("file", &self.file)
            .field("line", &self.line)
            .field("value", &self.value)
            .finish()
    }
}

impl<T: PartialEq> PartialEq for Sourced<T> {
    fn eq(&self, other: &Self) -> bool {
        self.file == other.file && self.line == other.line && self.value == other.value
    }
}

/// Marker message of the deliberate error raised when the walk reaches its target.
const FOUND: &str = "\u{0}meshwork-locate-found\u{0}";

/// 1-based (line, column) within `text` of the node at `path`, if it exists.
fn locate_in(text: &str, path: &[Seg]) -> Option<(usize, usize)> {
    let de = serde_yaml::Deserializer::from_str(text);
    let seed = Find { path };
    match seed.deserialize(de) {
        Ok(()) => None,
        Err(e) => {
            if !e.to_string().contains(FOUND) {
                return None;
            }
            let loc = e.location()?;
            Some((loc.line(), loc.column()))
        }
    }
}

struct Find<'a> {
    path: &'a [Seg],
}

impl<'de> DeserializeSeed<'de> for Find<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(FindVisitor { path: self.path })
    }
}

struct FindVisitor<'a> {
    path: &'a [Seg],
}

impl FindVisitor<'_> {
    fn leaf<E: de::Error>(&self) -> Result<(), E> {
        if self.path.is_empty() {
            Err(E::custom(FOUND))
        } else {
            Ok(())
        }
    }
}

macro_rules! leaf_visits {
    ($($name:ident: $ty:ty),*) => {
        $(fn $name<E: de::Error>(self, _v: $ty) -> Result<(), E> { self.leaf() })*
    };
}

impl<'de> Visitor<'de> for FindVisitor<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any YAML node")
    }

    leaf_visits!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_f64: f64,
        visit_str: &str, visit_i128: i128, visit_u128: u128);

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.leaf()
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.leaf()
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, _data: A) -> Result<(), A::Error> {
        // Tagged YAML values (`!tag`) are never part of our resources.
        self.leaf()
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((first, rest)) = self.path.split_first() else {
            return Err(de::Error::custom(FOUND));
        };
        while let Some(key) = map.next_key::<KeyText>()? {
            match first {
                Seg::Key(k) if *k == key.0 => {
                    map.next_value_seed(Find { path: rest })?;
                    return Ok(());
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((first, rest)) = self.path.split_first() else {
            return Err(de::Error::custom(FOUND));
        };
        let mut i = 0usize;
        loop {
            match first {
                Seg::Index(want) if *want == i => {
                    return seq.next_element_seed(Find { path: rest }).map(|_| ());
                }
                _ => {
                    if seq.next_element::<IgnoredAny>()?.is_none() {
                        return Ok(());
                    }
                }
            }
            i += 1;
        }
    }
}

/// A mapping key read as text, whatever its YAML type.
struct KeyText(String);

impl<'de> de::Deserialize<'de> for KeyText {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = KeyText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<KeyText, E> {
                Ok(KeyText(v.to_string()))
            }
            fn visit_unit<E: de::Error>(self) -> Result<KeyText, E> {
                Ok(KeyText(String::new()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<KeyText, A::Error> {
                while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(KeyText(String::new()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<KeyText, A::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Ok(KeyText(String::new()))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const DOC: &str = "\
apiVersion: v1
kind: X
spec:
  rules:
  - matches:
    - path:
        type: Exact
        value: /a
  - backendRefs:
    - name: b
      port: 80
";

    fn at(path: &str) -> (usize, Option<usize>) {
        let s = Sourced::with_doc(
            "f".into(),
            1,
            (),
            Arc::new(Doc {
                text: DOC.to_string(),
                first_line: 10,
            }),
        );
        s.locate(&FieldPath::parse(path))
    }

    #[test]
    fn finds_fields_by_path() {
        assert_eq!(at("kind"), (12, Some(7)));
        assert_eq!(at("spec.rules[0].matches[0].path.type"), (17, Some(15)));
        assert_eq!(at("spec.rules[1].backendRefs[0].port"), (21, Some(13)));
        // Missing fields fall back to the closest existing parent.
        assert_eq!(at("spec.rules[1].backendRefs[0].weight").0, 20);
        assert_eq!(at("spec.nothing").0, 14);
    }
}
