//! Errors from loading and validating resources.
//!
//! Contract: every [`Error`] names where the problem is (file, line, column
//! when known), which resource (`HTTPRoute default/reviews`) and which field
//! (`spec.rules[0].matches[0].path.type`), and says what was expected. Its
//! `Display` is one line: `file:line:col: Kind ns/name: field.path: message`,
//! leaving out the parts that are unknown. [`Errors`] carries all the errors
//! of one load or validation, one per line.
//!
//! Non-goals: error codes or localisation; callers match on the message only
//! in tests.

use std::fmt;

/// A path to a field inside a resource, e.g. `spec.rules[0].backendRefs[1].port`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct FieldPath(Vec<Seg>);

/// One step of a [`FieldPath`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Seg {
    /// A mapping key (`spec`, `rules`).
    Key(String),
    /// A sequence index (`[0]`).
    Index(usize),
}

impl FieldPath {
    /// The empty path (the whole resource).
    pub fn root() -> Self {
        FieldPath(Vec::new())
    }

    /// This path followed by the key `k`.
    pub fn key(&self, k: &str) -> Self {
        let mut v = self.0.clone();
        v.push(Seg::Key(k.to_string()));
        FieldPath(v)
    }

    /// This path followed by the index `i`.
    pub fn index(&self, i: usize) -> Self {
        let mut v = self.0.clone();
        v.push(Seg::Index(i));
        FieldPath(v)
    }

    /// Parses the dotted form produced by `Display` (and by `serde_path_to_error`).
    /// Unparseable parts are kept as keys, which is good enough to locate them.
    pub fn parse(s: &str) -> Self {
        let mut segs = Vec::new();
        if s.is_empty() || s == "." {
            return FieldPath(segs);
        }
        for part in s.split('.') {
            let (name, mut rest) = match part.find('[') {
                Some(i) => (&part[..i], &part[i..]),
                None => (part, ""),
            };
            if !name.is_empty() {
                segs.push(Seg::Key(name.to_string()));
            }
            while let Some(stripped) = rest.strip_prefix('[') {
                let Some(end) = stripped.find(']') else { break };
                match stripped[..end].parse::<usize>() {
                    Ok(i) => segs.push(Seg::Index(i)),
                    Err(_) => segs.push(Seg::Key(stripped[..end].to_string())),
                }
                rest = &stripped[end + 1..];
            }
        }
        FieldPath(segs)
    }

    /// The steps of this path.
    pub fn segments(&self) -> &[Seg] {
        &self.0
    }

    /// True for the empty path.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for seg in &self.0 {
            match seg {
                Seg::Key(k) => {
                    if !first {
                        f.write_str(".")?;
                    }
                    f.write_str(k)?;
                }
                Seg::Index(i) => write!(f, "[{i}]")?,
            }
            first = false;
        }
        Ok(())
    }
}

/// One problem with the input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", render(self))]
pub struct Error {
    /// The file (or other source name) the resource came from.
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// `Kind namespace/name` of the resource, when it could be read.
    pub resource: Option<String>,
    /// Path of the offending field inside the resource, when there is one.
    pub field: Option<String>,
    /// What is wrong and what was expected.
    pub message: String,
}

fn render(e: &Error) -> String {
    let mut s = e.file.clone();
    if let Some(line) = e.line {
        s.push_str(&format!(":{line}"));
        if let Some(col) = e.column {
            s.push_str(&format!(":{col}"));
        }
    }
    s.push_str(": ");
    if let Some(r) = &e.resource {
        s.push_str(r);
        s.push_str(": ");
    }
    if let Some(f) = &e.field {
        if !f.is_empty() {
            s.push_str(f);
            s.push_str(": ");
        }
    }
    s.push_str(&e.message);
    s
}

/// All the problems found in one load or validation (never empty when
/// returned as an `Err`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Errors(pub Vec<Error>);

impl Errors {
    /// The errors, in input order.
    pub fn iter(&self) -> std::slice::Iter<'_, Error> {
        self.0.iter()
    }

    /// How many errors there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// True when there is no error.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The errors as a vector.
    pub fn into_vec(self) -> Vec<Error> {
        self.0
    }

    pub(crate) fn push(&mut self, e: Error) {
        self.0.push(e);
    }
}

impl fmt::Display for Errors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            fmt::Display::fmt(e, f)?;
        }
        Ok(())
    }
}

impl std::error::Error for Errors {}

impl IntoIterator for Errors {
    type Item = Error;
    type IntoIter = std::vec::IntoIter<Error>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a Errors {
    type Item = &'a Error;
    type IntoIter = std::slice::Iter<'a, Error>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl From<Error> for Errors {
    fn from(e: Error) -> Self {
        Errors(vec![e])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_round_trips() {
        for s in [
            "spec",
            "spec.rules[0].matches[12].path.type",
            "a[1][2].b",
            "",
        ] {
            assert_eq!(FieldPath::parse(s).to_string(), s);
        }
        let p = FieldPath::root()
            .key("spec")
            .key("rules")
            .index(3)
            .key("name");
        assert_eq!(p.to_string(), "spec.rules[3].name");
    }

    #[test]
    fn display_leaves_out_unknown_parts() {
        let mut e = Error {
            file: "a.yaml".into(),
            line: Some(3),
            column: Some(7),
            resource: Some("HTTPRoute default/r".into()),
            field: Some("spec.rules".into()),
            message: "bad".into(),
        };
        assert_eq!(
            e.to_string(),
            "a.yaml:3:7: HTTPRoute default/r: spec.rules: bad"
        );
        e.column = None;
        e.resource = None;
        e.field = None;
        assert_eq!(e.to_string(), "a.yaml:3: bad");
        e.line = None;
        assert_eq!(e.to_string(), "a.yaml: bad");
    }
}
