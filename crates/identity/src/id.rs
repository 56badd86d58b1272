//! SPIFFE ids of the mesh: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
//!
//! Validation follows the SPIFFE ID specification (section 2): a lowercase
//! trust domain of `[a-z0-9._-]`, no port, userinfo, query or fragment, and
//! path segments of `[A-Za-z0-9._-]` that are neither empty nor `.`/`..`.
//! On top of that the mesh only issues and accepts the workload shape
//! `/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;

/// The URI scheme prefix every SPIFFE id starts with.
const SCHEME: &str = "spiffe://";
/// Maximum length of a trust domain name (SPIFFE spec 2.1).
const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// Maximum length of a whole SPIFFE id URI (SPIFFE spec 2.3).
const MAX_ID_LEN: usize = 2048;

/// Namespace of the control plane's own identity.
pub const CONTROL_NAMESPACE: &str = "meshwork-system";
/// Service account of the control plane's own identity.
pub const CONTROL_SERVICE_ACCOUNT: &str = "control";

/// Why a string is not a valid trust domain or mesh SPIFFE id.
///
/// Each variant names the offending part so the message can be shown to an
/// operator as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The id does not start with `spiffe://`.
    #[error("SPIFFE id {0:?} must start with \"spiffe://\" (lowercase scheme)")]
    Scheme(String),
    /// The trust domain is empty.
    #[error("the trust domain is empty: write it as spiffe://example.org/...")]
    EmptyTrustDomain,
    /// The trust domain is longer than 255 bytes.
    #[error("the trust domain is {0} bytes long; at most 255 are allowed")]
    TrustDomainTooLong(usize),
    /// The trust domain carries a port (`:`) or userinfo (`@`).
    #[error("trust domain {0:?} contains a port or userinfo; use a bare name like example.org")]
    TrustDomainPortOrUserinfo(String),
    /// The trust domain has a character outside `[a-z0-9._-]`.
    #[error("trust domain {domain:?} contains {ch:?}; only lowercase letters, digits, '.', '-' and '_' are allowed")]
    TrustDomainChar {
        /// The trust domain as given.
        domain: String,
        /// The first offending character.
        ch: char,
    },
    /// The id has a query (`?`) or fragment (`#`).
    #[error("SPIFFE id {0:?} must not have a query or fragment")]
    QueryOrFragment(String),
    /// The id is longer than 2048 bytes.
    #[error("SPIFFE id is {0} bytes long; at most 2048 are allowed")]
    TooLong(usize),
    /// A path segment is empty (`//` or a trailing `/`).
    #[error("SPIFFE id path {0:?} has an empty segment (double or trailing '/')")]
    EmptySegment(String),
    /// A path segment is `.` or `..`.
    #[error("SPIFFE id path {0:?} has a '.' or '..' segment")]
    DotSegment(String),
    /// A path segment has a character outside `[A-Za-z0-9._-]`.
    #[error("SPIFFE id path segment {segment:?} contains {ch:?}; only letters, digits, '.', '-' and '_' are allowed")]
    SegmentChar {
        /// The offending segment.
        segment: String,
        /// The first offending character.
        ch: char,
    },
    /// The path is valid SPIFFE but not `/ns/<namespace>/sa/<service-account>`.
    #[error("SPIFFE id path {0:?} is not of the mesh form /ns/<namespace>/sa/<service-account>")]
    NotWorkloadPath(String),
}

/// A validated SPIFFE trust domain, e.g. `cluster.local`.
///
/// The trust domain names the CA that vouches for an identity; two ids are
/// only comparable within one trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

/// A validated mesh workload identity:
/// `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.
///
/// Parse with [`str::parse`] / [`SpiffeId::parse`], build with
/// [`SpiffeId::new`]; [`fmt::Display`] gives back the URI.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    namespace: String,
    service_account: String,
}

impl TrustDomain {
    /// Validates a bare trust domain name (no scheme).
    pub fn new(name: &str) -> Result<Self, IdError> {
        validate_trust_domain(name)?;
        Ok(Self(name.to_owned()))
    }

    /// The trust domain name, e.g. `cluster.local`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The SPIFFE id of the trust domain itself, `spiffe://<td>`, used as
    /// the URI SAN of the CA certificate.
    pub fn id_uri(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }
}

impl SpiffeId {
    /// Builds a workload id from its parts, validating each.
    pub fn new(
        trust_domain: TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, IdError> {
        validate_segment(namespace, &format!("/ns/{namespace}"))?;
        validate_segment(service_account, &format!("/sa/{service_account}"))?;
        Ok(Self {
            trust_domain,
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        })
    }

    /// Parses `spiffe://<td>/ns/<namespace>/sa/<service-account>` strictly.
    pub fn parse(uri: &str) -> Result<Self, IdError> {
        if uri.len() > MAX_ID_LEN {
            return Err(IdError::TooLong(uri.len()));
        }
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| IdError::Scheme(uri.to_owned()))?;
        if rest.contains(['?', '#']) {
            return Err(IdError::QueryOrFragment(uri.to_owned()));
        }
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let trust_domain = TrustDomain::new(td)?;
        validate_path(path)?;
        let segments: Vec<&str> = path.split('/').skip(1).collect();
        match segments.as_slice() {
            ["ns", ns, "sa", sa] => Ok(Self {
                trust_domain,
                namespace: (*ns).to_owned(),
                service_account: (*sa).to_owned(),
            }),
            _ => Err(IdError::NotWorkloadPath(path.to_owned())),
        }
    }

    /// The control plane's own identity in `trust_domain`:
    /// `spiffe://<td>/ns/meshwork-system/sa/control`.
    pub fn control_plane(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            namespace: CONTROL_NAMESPACE.to_owned(),
            service_account: CONTROL_SERVICE_ACCOUNT.to_owned(),
        }
    }

    /// The trust domain part.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The namespace part.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The service account part.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

fn validate_trust_domain(td: &str) -> Result<(), IdError> {
    if td.is_empty() {
        return Err(IdError::EmptyTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdError::TrustDomainTooLong(td.len()));
    }
    if td.contains([':', '@']) {
        return Err(IdError::TrustDomainPortOrUserinfo(td.to_owned()));
    }
    if let Some(ch) = td
        .chars()
        .find(|c| !matches!(c, 'a'..='z' | '0'..='9' | '.' | '-' | '_'))
    {
        return Err(IdError::TrustDomainChar {
            domain: td.to_owned(),
            ch,
        });
    }
    Ok(())
}

/// Validates a SPIFFE path: empty, or `/seg(/seg)*` with valid segments.
fn validate_path(path: &str) -> Result<(), IdError> {
    if path.is_empty() {
        return Ok(());
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Err(IdError::EmptySegment(path.to_owned()));
    };
    rest.split('/')
        .try_for_each(|segment| validate_segment(segment, path))
}

/// Validates one path segment; `path` is named in errors.
fn validate_segment(segment: &str, path: &str) -> Result<(), IdError> {
    if segment.is_empty() {
        return Err(IdError::EmptySegment(path.to_owned()));
    }
    if segment == "." || segment == ".." {
        return Err(IdError::DotSegment(path.to_owned()));
    }
    if let Some(ch) = segment
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
    {
        return Err(IdError::SegmentChar {
            segment: segment.to_owned(),
            ch,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn parses_and_formats_round_trip() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        assert_eq!(id.trust_domain().as_str(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "web");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
        let built =
            SpiffeId::new(TrustDomain::new("cluster.local").unwrap(), "default", "web").unwrap();
        assert_eq!(built, id);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
    }

    #[test]
    fn control_plane_id() {
        let td = TrustDomain::new("td").unwrap();
        assert_eq!(
            SpiffeId::control_plane(td).to_string(),
            "spiffe://td/ns/meshwork-system/sa/control"
        );
    }

    #[test]
    fn rejects_bad_ids_with_named_reasons() {
        type Check = fn(&IdError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("https://td/ns/a/sa/b", |e| matches!(e, IdError::Scheme(_))),
            ("SPIFFE://td/ns/a/sa/b", |e| matches!(e, IdError::Scheme(_))),
            ("spiffe:///ns/a/sa/b", |e| {
                matches!(e, IdError::EmptyTrustDomain)
            }),
            ("spiffe://TD/ns/a/sa/b", |e| {
                matches!(e, IdError::TrustDomainChar { ch: 'T', .. })
            }),
            ("spiffe://td:443/ns/a/sa/b", |e| {
                matches!(e, IdError::TrustDomainPortOrUserinfo(_))
            }),
            ("spiffe://u@td/ns/a/sa/b", |e| {
                matches!(e, IdError::TrustDomainPortOrUserinfo(_))
            }),
            ("spiffe://td/ns/a/sa/b?x=1", |e| {
                matches!(e, IdError::QueryOrFragment(_))
            }),
            ("spiffe://td/ns/a/sa/b#f", |e| {
                matches!(e, IdError::QueryOrFragment(_))
            }),
            ("spiffe://td/ns//sa/b", |e| {
                matches!(e, IdError::EmptySegment(_))
            }),
            ("spiffe://td/ns/a/sa/b/", |e| {
                matches!(e, IdError::EmptySegment(_))
            }),
            ("spiffe://td/ns/../sa/b", |e| {
                matches!(e, IdError::DotSegment(_))
            }),
            ("spiffe://td/ns/./sa/b", |e| {
                matches!(e, IdError::DotSegment(_))
            }),
            ("spiffe://td/ns/a%20/sa/b", |e| {
                matches!(e, IdError::SegmentChar { ch: '%', .. })
            }),
            ("spiffe://td/ns/a/sa", |e| {
                matches!(e, IdError::NotWorkloadPath(_))
            }),
            ("spiffe://td", |e| matches!(e, IdError::NotWorkloadPath(_))),
            ("spiffe://td/x/a/sa/b", |e| {
                matches!(e, IdError::NotWorkloadPath(_))
            }),
            ("spiffe://td/ns/a/sa/b/c", |e| {
                matches!(e, IdError::NotWorkloadPath(_))
            }),
        ];
        for (input, check) in cases {
            let err = SpiffeId::parse(input).unwrap_err();
            assert!(check(&err), "{input}: unexpected error {err:?}");
            assert!(!err.to_string().is_empty());
        }
        let long = format!("spiffe://td/ns/{}/sa/b", "a".repeat(MAX_ID_LEN));
        assert!(matches!(SpiffeId::parse(&long), Err(IdError::TooLong(_))));
        let long_td = "a".repeat(256);
        assert!(matches!(
            TrustDomain::new(&long_td),
            Err(IdError::TrustDomainTooLong(256))
        ));
        assert!(SpiffeId::new(TrustDomain::new("td").unwrap(), "a/b", "c").is_err());
        assert!(SpiffeId::new(TrustDomain::new("td").unwrap(), "", "c").is_err());
    }

    #[test]
    fn never_panics_on_random_input() {
        let mut rng = fastrand::Rng::with_seed(7);
        let alphabet: Vec<char> = "spiffe:/.-_?#@%aZ09 é\u{0}ns".chars().collect();
        for _ in 0..20_000 {
            let len = rng.usize(0..40);
            let mut s: String = if rng.bool() {
                "spiffe://".into()
            } else {
                String::new()
            };
            for _ in 0..len {
                s.push(alphabet[rng.usize(0..alphabet.len())]);
            }
            if let Ok(id) = SpiffeId::parse(&s) {
                assert_eq!(id.to_string(), s);
            }
        }
    }
}
